//! Refresh and replay once on 401.
//!
//! This module owns [`RefreshOn401`], a [`tower::retry::Policy`], and [`ReplayableBody`],
//! which says whether a request body can be sent twice. The policy replays a request at most
//! once, only when the 401 answered a token this crate attached, and only with an exact copy
//! of the request. It must sit *outside* [`AuthLayer`](crate::AuthLayer), so that the replay
//! passes through [`AuthService`](crate::AuthService) again and gets the new token.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::retry::Policy;

use crate::auth::Shared;
use crate::source::BoxFuture;
use crate::token::TokenGeneration;

/// A request body that may be copyable, so that a request can be replayed.
///
/// Implemented for the bodies that hold their bytes (`Full`, `Empty`, `String`, `Bytes`,
/// `Vec<u8>`, `&'static str`, `()`) and, returning `None`, for streaming bodies (hyper's
/// `Incoming`, the boxed bodies of `http-body-util`). A request whose body returns `None`
/// is sent once; if it meets a 401, the 401 goes back to the caller.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use genesys_auth_layer::ReplayableBody;
///
/// let body = Full::new(Bytes::from_static(b"{\"a\":1}"));
/// assert!(body.try_clone_body().is_some());
/// ```
pub trait ReplayableBody: Sized {
    /// A copy of the body with the same bytes, if the body can be copied.
    fn try_clone_body(&self) -> Option<Self>;
}

macro_rules! replayable_by_clone {
    ($($ty:ty),* $(,)?) => {$(
        impl ReplayableBody for $ty {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

replayable_by_clone!(String, Bytes, Vec<u8>, &'static str, &'static [u8], ());

impl<D: Clone> ReplayableBody for http_body_util::Full<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayableBody for http_body_util::Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }
}

macro_rules! not_replayable {
    ($($ty:ty),* $(,)?) => {$(
        impl ReplayableBody for $ty {
            fn try_clone_body(&self) -> Option<Self> {
                None
            }
        }
    )*};
}

not_replayable!(hyper::body::Incoming);

impl<D, E> ReplayableBody for http_body_util::combinators::BoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayableBody for http_body_util::combinators::UnsyncBoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

/// A [`Policy`] that refreshes the token and replays a request once when the API answers
/// `401` to a token this crate attached.
///
/// * The 401 must carry the [`TokenGeneration`] stamp that [`AuthService`](crate::AuthService)
///   adds; a 401 to a request the layer did not authorize (out of scope, or with the caller's
///   own `Authorization`) is returned as is.
/// * A 401 for the current generation drops that token and starts one refresh; 401s for an
///   older generation just wait for (or use) the newer token. A thousand concurrent 401s
///   cost one token request.
/// * At most one replay per request: a second 401 goes back to the caller.
/// * The replay has the same method, URI, version, headers, extensions and body bytes.
///   Bodies that cannot be copied (see [`ReplayableBody`]) are not replayed.
///
/// Get one from [`GenesysAuth::retry_layer`](crate::GenesysAuth::retry_layer) or
/// [`GenesysAuth::retry_policy`](crate::GenesysAuth::retry_policy).
#[derive(Clone)]
pub struct RefreshOn401 {
    shared: Arc<Shared>,
    replayed: bool,
}

impl RefreshOn401 {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            replayed: false,
        }
    }
}

impl fmt::Debug for RefreshOn401 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshOn401")
            .field("scope", &self.shared.scope)
            .field("replayed", &self.replayed)
            .finish()
    }
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RefreshOn401
where
    B: ReplayableBody,
{
    type Future = BoxFuture<'static, ()>;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        let response = result.as_ref().ok()?;
        if response.status() != StatusCode::UNAUTHORIZED || self.replayed {
            return None;
        }
        let generation = *response.extensions().get::<TokenGeneration>()?;
        self.replayed = true;
        tracing::info!(
            target: "genesys_auth_layer::retry",
            generation = generation.0,
            method = %request.method(),
            path = request.uri().path(),
            "401 replayed with a newer token"
        );
        let cache = self.shared.cache.clone();
        Some(Box::pin(async move {
            // A failed refresh needs no handling here: the replay passes through AuthService,
            // which finds no token and returns the refresh's error to the caller.
            let _ = cache.refresh_after_401(generation).await;
        }))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if self.replayed || !self.shared.scope.applies_to(request) {
            return None;
        }
        let Some(body) = request.body().try_clone_body() else {
            tracing::debug!(
                target: "genesys_auth_layer::retry",
                method = %request.method(),
                path = request.uri().path(),
                reason = "body cannot be copied",
                "request will not be replayed if the API answers 401"
            );
            return None;
        };
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}
