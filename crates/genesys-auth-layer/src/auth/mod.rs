//! Attaching the token.
//!
//! This module owns [`AuthLayer`] and [`AuthService`]: for each request to an in-scope
//! origin without an `Authorization` header of its own, attach the current token (sensitive
//! header) and, on a `401` answer, stamp the response with the [`TokenGeneration`] that was
//! sent (and, privately, which cache issued it). `AuthService` never retries; it waits only
//! when there is no valid token, or when a request replayed by
//! [`RefreshOn401`](crate::RefreshOn401) needs a token newer than the one the API refused.
//! It also owns [`AuthReplayLayer`], which wraps an `AuthService` and replays a stamped
//! `401` once itself.
//!
//! [`TokenGeneration`]: crate::TokenGeneration

mod future;
mod layer;
mod replay;
mod scope;
mod service;

pub use future::ResponseFuture;
pub use layer::AuthLayer;
pub use replay::{AuthReplayFuture, AuthReplayLayer, AuthReplayService};
pub use scope::Scope;
pub use service::AuthService;

use crate::cache::TokenCache;

/// What every clone of a layer and service shares.
///
/// Aligned to a cache line pair so that, behind an `Arc`, these read-mostly fields do not
/// share a line with the reference counts, which services cloned per request (tower's
/// `Retry` does) change on every call from every core.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shared {
    pub(crate) cache: TokenCache,
    pub(crate) scope: Scope,
    /// `cache.id()`, next to the scope that every call reads anyway.
    pub(crate) cache_id: u64,
    /// `cache.checks_clock()`: whether a kept header is also checked against the clock.
    pub(crate) check_clock: bool,
}

impl Shared {
    pub(crate) fn new(cache: TokenCache, scope: Scope) -> Self {
        let cache_id = cache.id();
        let check_clock = cache.checks_clock();
        Self {
            cache,
            scope,
            cache_id,
            check_clock,
        }
    }
}
