//! Attaching the token.
//!
//! This module owns [`AuthLayer`] and [`AuthService`]: for each request to an in-scope
//! origin without an `Authorization` header of its own, attach the current token (sensitive
//! header) and, on a `401` answer, stamp the response with the [`TokenGeneration`] that was
//! sent. It never retries and never waits unless there is no valid token at all.
//!
//! [`TokenGeneration`]: crate::TokenGeneration

mod future;
mod layer;
mod scope;
mod service;

pub use future::ResponseFuture;
pub use layer::AuthLayer;
pub use scope::Scope;
pub use service::AuthService;

use crate::cache::TokenCache;

/// What every clone of a layer, service and retry policy shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cache: TokenCache,
    pub(crate) scope: Scope,
}
