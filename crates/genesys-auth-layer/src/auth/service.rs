use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{Entry, AUTHORIZATION};
use http::{Request, Response};
use tower::{BoxError, Service};

use super::{ResponseFuture, Shared};

/// Attaches `Authorization: Bearer …` to in-scope requests.
///
/// * With a valid token cached, `call` takes no lock and allocates nothing beyond the
///   header insert.
/// * With none (first call, expiry, or right after a 401), the request waits for the one
///   refresh in flight; a failed refresh comes back as an [`AuthError`](crate::AuthError)
///   boxed in the service error.
/// * Requests outside the [`Scope`](crate::Scope), or with their own `Authorization`,
///   pass through untouched.
/// * A `401` answer to a request it authorized carries the
///   [`TokenGeneration`](crate::TokenGeneration) it sent in its extensions.
///
/// Errors of the inner service are boxed into [`BoxError`] unchanged; a token that could
/// not be obtained is an [`AuthError`](crate::AuthError) in that box. The inner service must
/// be `Clone` (as hyper-util's client and tower's buffers are): a request that waits for a
/// token takes the ready service with it.
///
/// ```
/// # async fn demo(auth: genesys_auth_layer::GenesysAuth) {
/// use genesys_auth_layer::AuthError;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// let service = ServiceBuilder::new()
///     .layer(auth.layer())
///     .service_fn(|req: http::Request<String>| async move {
///         // The token is there, marked sensitive.
///         assert!(req.headers()["authorization"].is_sensitive());
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// let request = http::Request::get("https://api.mypurecloud.com/api/v2/users/me")
///     .body(String::new())
///     .unwrap();
/// match service.oneshot(request).await {
///     Ok(response) => println!("{}", response.status()),
///     Err(err) => match err.downcast_ref::<AuthError>() {
///         Some(auth) => eprintln!("no token: {auth}"),
///         None => eprintln!("transport: {err}"),
///     },
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> AuthService<S> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if !self.shared.scope.contains(request.uri()) {
            return ResponseFuture::called(self.inner.call(request), None);
        }
        // One header-map lookup both checks for the caller's own header and inserts ours.
        let slot = match request.headers_mut().entry(AUTHORIZATION) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => Some(slot),
        };
        let Some(slot) = slot else {
            return ResponseFuture::called(self.inner.call(request), None);
        };
        match self.shared.cache.fresh_header() {
            Some((header, generation)) => {
                slot.insert(header);
                ResponseFuture::called(self.inner.call(request), Some(generation))
            }
            None => {
                // The ready service goes into the future, which calls it once a token is
                // there; this service keeps a fresh clone (tower's usual hand-off).
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let cache = self.shared.cache.clone();
                tracing::debug!(
                    target: "genesys_auth_layer::auth",
                    "no valid token cached; request waits for one"
                );
                let token = async move {
                    let token = cache.token().await;
                    if token.is_ok() {
                        cache.count_authorized();
                    }
                    token
                };
                ResponseFuture::waiting(Box::pin(token), ready, request)
            }
        }
    }
}
