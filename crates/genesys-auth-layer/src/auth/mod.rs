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
pub(crate) use service::attach;
pub use service::AuthService;

use crate::cache::TokenCache;

/// What every clone of a layer and service shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cache: TokenCache,
    pub(crate) scope: Scope,
}

impl Shared {
    pub(crate) fn new(cache: TokenCache, scope: Scope) -> Self {
        Self { cache, scope }
    }
}
