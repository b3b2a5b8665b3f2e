//! [`AuthReplayLayer`]: attaching the token and replaying a 401 once, in one service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use super::service::wait_then_call;
use super::{AuthService, ResponseFuture, Scope, Shared};
use crate::cache::TokenCache;
use crate::retry::{refused_stamp, replayable_copy, ReplayableBody};
use crate::token::TokenGeneration;

/// Attaches the token and, when the API answers `401` to it, refreshes it and replays the
/// request once: [`AuthLayer`](crate::AuthLayer) and `RetryLayer<`[`RefreshOn401`](crate::RefreshOn401)`>`
/// in one service. [`GenesysAuth::layers`](crate::GenesysAuth::layers) returns it.
///
/// It behaves as the two stacked (retry outside, auth inside), and costs less per request:
/// tower's `Retry` clones the whole service below it for every request (here
/// [`AuthService`], whose shared state's reference count every core then bumps), where
/// this layer clones only the service it wraps. Stack the two pieces yourself when you
/// want another layer between them.
///
/// ```
/// # fn demo(auth: genesys_auth_layer::GenesysAuth) {
/// use tower::ServiceBuilder;
///
/// let client = ServiceBuilder::new()
///     .layer(auth.layers()) // an AuthReplayLayer
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AuthReplayLayer {
    pub(crate) shared: Arc<Shared>,
}

impl AuthReplayLayer {
    /// The layer for `cache`'s tokens, attached to requests in `scope`.
    ///
    /// ```
    /// # fn demo(cache: genesys_auth_layer::TokenCache) -> Result<(), genesys_auth_layer::ConfigError> {
    /// use genesys_auth_layer::{AuthReplayLayer, Scope};
    ///
    /// let scope = Scope::new([http::Uri::from_static("https://api.mypurecloud.com")])?;
    /// let layer = AuthReplayLayer::new(cache, scope);
    /// # Ok(()) }
    /// ```
    pub fn new(cache: TokenCache, scope: Scope) -> Self {
        Self {
            shared: Arc::new(Shared::new(cache, scope)),
        }
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }
}

impl<S> Layer<S> for AuthReplayLayer {
    type Service = AuthReplayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthReplayService {
            auth: AuthService::new(inner, self.shared.clone()),
        }
    }
}

/// The service of an [`AuthReplayLayer`]: an [`AuthService`] that replays a `401` to the
/// token it attached, once, with a newer token.
///
/// * Each request whose body can be copied ([`ReplayableBody`]) and that has no
///   `Authorization` of its own is copied before it is sent, with a clone of the inner
///   service to send the copy on.
/// * A `401` answer to the token this service attached drops that token (one refresh
///   starts, shared by every request that got a `401` to it); the copy waits for a newer
///   token, then goes to the inner service once it is ready. The replay's answer, whatever
///   it is, is the caller's: a request is replayed at most once.
/// * Any other answer (or a `401` to a request it did not authorize) is the caller's at
///   once.
///
/// Errors are those of [`AuthService`]: the inner service's, boxed, or an
/// [`AuthError`](crate::AuthError) when no token could be had.
///
/// ```
/// # async fn demo(auth: genesys_auth_layer::GenesysAuth) {
/// use tower::{ServiceBuilder, ServiceExt};
///
/// let service = ServiceBuilder::new()
///     .layer(auth.layers())
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// let request = http::Request::get("https://api.mypurecloud.com/api/v2/users/me")
///     .body(String::new())
///     .unwrap();
/// let response = service.oneshot(request).await;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AuthReplayService<S> {
    auth: AuthService<S>,
}

impl<S> AuthReplayService<S> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        self.auth.get_ref()
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        self.auth.get_mut()
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.auth.into_inner()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthReplayService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: ReplayableBody,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = AuthReplayFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.auth.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The copy is moved only after the call: read back at once, its just-written
        // words would stall the read (a failed store-to-load forward).
        let copy = replayable_copy(&request);
        let future = self.auth.call(request);
        let replay = copy.map(|request| Replay {
            service: self.auth.inner.clone(),
            shared: self.auth.shared.clone(),
            request,
        });
        AuthReplayFuture {
            state: State::First { future, replay },
        }
    }
}

/// The copy to replay, the service to send it on, and the cache that is to give it a newer
/// token (held, so that it outlives every other handle to it while this request runs).
struct Replay<S, B> {
    service: S,
    shared: Arc<Shared>,
    request: Request<B>,
}

pin_project! {
    /// The response future of [`AuthReplayService`].
    pub struct AuthReplayFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // The request as the caller sent it; `replay` is its copy, if it can be replayed.
        First {
            #[pin]
            future: ResponseFuture<S, B>,
            replay: Option<Replay<S, B>>,
        },
        // The API refused the token: waiting for the replay's service to be ready.
        Readying {
            replay: Option<(Replay<S, B>, TokenGeneration)>,
        },
        // The replay, whose answer is the caller's.
        Second {
            #[pin]
            future: ResponseFuture<S, B>,
        },
    }
}

impl<S, B, ResBody> Future for AuthReplayFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            match state.as_mut().project() {
                StateProj::First { future, replay } => {
                    let output = ready!(future.poll(cx));
                    if let Ok(response) = &output {
                        if response.status() == StatusCode::UNAUTHORIZED && replay.is_some() {
                            if let Some(next) = replay_after(response, replay) {
                                state.set(next);
                                continue;
                            }
                        }
                    }
                    return Poll::Ready(output);
                }
                StateProj::Readying { replay } => {
                    let Some((pending, _)) = replay.as_mut() else {
                        return Poll::Ready(Err("AuthReplayFuture polled after an error".into()));
                    };
                    let ready = ready!(pending.service.poll_ready(cx)).map_err(Into::into);
                    let Some((pending, refused)) = replay.take() else {
                        return Poll::Ready(Err("AuthReplayFuture polled after an error".into()));
                    };
                    ready?;
                    let Replay {
                        service,
                        shared,
                        request,
                    } = pending;
                    let cache = shared.cache.clone();
                    state.set(State::Second {
                        future: wait_then_call(cache, service, request, Some(refused)),
                    });
                }
                StateProj::Second { future } => return future.poll(cx),
            }
        }
    }
}

/// The next state after the API answered `response` (a 401) to the first request, if it is
/// to be replayed: the 401 answered a token of this service's cache.
#[cold]
#[inline(never)]
fn replay_after<S, B, R>(
    response: &Response<R>,
    replay: &mut Option<Replay<S, B>>,
) -> Option<State<S, B>>
where
    S: Service<Request<B>>,
{
    let pending = replay.as_ref()?;
    let stamp = refused_stamp(response, pending.shared.cache_id, &pending.request)?;
    let pending = replay.take()?;
    Some(State::Readying {
        replay: Some((pending, stamp.generation)),
    })
}

impl<S, B> fmt::Debug for AuthReplayFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::First { replay: None, .. } => "first attempt, not replayable",
            State::First { .. } => "first attempt",
            State::Readying { .. } => "replay waiting for its service",
            State::Second { .. } => "replay",
        };
        f.debug_struct("AuthReplayFuture")
            .field("state", &state)
            .finish()
    }
}
