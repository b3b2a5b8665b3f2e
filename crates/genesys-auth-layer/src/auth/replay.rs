//! [`AuthReplayLayer`]: attaching the token and replaying a 401 once, in one service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use super::{AuthService, ResponseFuture, Scope, Shared};
use crate::cache::TokenCache;
use crate::retry::{refused_stamp, replayable_copy, Refused, ReplayableBody};

/// Attaches the token and, when the API answers `401` to it, refreshes it and replays the
/// request once: [`AuthLayer`](crate::AuthLayer) and `RetryLayer<`[`RefreshOn401`](crate::RefreshOn401)`>`
/// in one service. [`GenesysAuth::layers`](crate::GenesysAuth::layers) returns it.
///
/// It behaves as the two stacked (retry outside, auth inside), and costs less per request:
/// tower's `Retry` clones the whole service below it for every request (policy and
/// [`AuthService`]) and wraps the response future in its own, where this layer clones the
/// service it wraps and the `Arc` of the shared state, and polls one future. Stack the two
/// pieces yourself when you want another layer between them.
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
    /// The layer for `cache`'s tokens, attached to requests in `scope`: to pair your own
    /// [`TokenCache`] with a [`Scope`], as [`AuthLayer::new`](crate::AuthLayer::new) does.
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
/// * Each request in scope whose body can be copied ([`ReplayableBody`]) and that has no
///   `Authorization` of its own is copied before it is sent, with a clone of the inner
///   service to send the copy on.
/// * A `401` answer to the token this service attached drops that token (one refresh
///   starts, shared by every request that got a `401` to it); the copy waits for a newer
///   token, then goes to the inner service once it is ready. The replay's answer, whatever
///   it is, is the caller's: a request is replayed at most once. While the token endpoint
///   is backing off, the refused token stays in use and the `401` is the caller's.
/// * Any other answer (or a `401` to a request it did not authorize) is the caller's at
///   once.
///
/// Errors are those of [`AuthService`]: the inner service's, boxed, or an
/// [`AuthError`](crate::AuthError) when no token could be had.
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
        let applies = self.auth.shared.scope.applies_to(&request);
        self.call_checked(request, applies)
    }
}

impl<S> AuthReplayService<S> {
    /// A service over `inner` for `shared`'s cache, whose scope its caller checks.
    pub(crate) fn with_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            auth: AuthService::new(inner, shared),
        }
    }

    /// `call`, with the scope already checked: `applies` says whether this service
    /// authorizes `request` (in scope, no `Authorization` of its own).
    pub(crate) fn call_checked<ReqBody, ResBody>(
        &mut self,
        request: Request<ReqBody>,
        applies: bool,
    ) -> AuthReplayFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
        ReqBody: ReplayableBody,
    {
        // Only a request this service may authorize can be replayed: one to another host
        // is not copied (for a `String` or `Vec` body, that would copy every byte). Nor is
        // one that is itself a replay for this cache (a `RefreshOn401` of the same auth
        // stacked outside this service): a request is replayed once per cache.
        let cache = &self.auth.shared.cache;
        let copy = if applies && !is_replay_for(&request, cache.id()) {
            replayable_copy(&request)
        } else {
            None
        };
        let replay = copy.map(|request| Replay {
            service: self.auth.inner.clone(),
            request,
        });
        let future = self.auth.call_checked(request, applies);
        AuthReplayFuture {
            state: State::First { future, replay },
        }
    }
}

/// Whether `request` carries `RefreshOn401`'s marker for the cache `cache`: it is a
/// replay already.
fn is_replay_for<B>(request: &Request<B>, cache: u64) -> bool {
    request
        .extensions()
        .get::<Refused>()
        .is_some_and(|Refused(stamp)| stamp.cache == cache)
}

/// The copy to replay and the service to send it on. The cache that is to give it a newer
/// token is the one the first attempt holds to report its 401.
struct Replay<S, B> {
    service: S,
    request: Request<B>,
}

pin_project! {
    /// The response future of [`AuthReplayService`]: the first attempt, then (after a
    /// `401` to its token) the replay's wait for its service and a newer token, and the
    /// replay. Its `Debug` names the state it is in: `first attempt`, `replay`, or
    /// `first attempt, not replayable` when no copy was kept.
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
        // The replay, whose answer is the caller's.
        Second {
            #[pin]
            future: ResponseFuture<S, B>,
        },
    }
}

impl<S, B, ResBody> Future for AuthReplayFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.as_mut().project().state;
        if let StateProj::First { mut future, replay } = state.as_mut().project() {
            let output = ready!(future.as_mut().poll(cx));
            let refused = match &output {
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                    let cache = future.take_cache();
                    cache.zip(replay.take()).and_then(|(cache, replay)| {
                        refused_stamp(response, cache.id(), &replay.request)
                            .map(|stamp| (cache, replay, stamp.generation))
                    })
                }
                _ => None,
            };
            let Some((cache, replay, refused)) = refused else {
                return Poll::Ready(output);
            };
            // The replay waits for a newer token, then for its service, then is sent once.
            let Replay { service, request } = replay;
            state.set(State::Second {
                future: ResponseFuture::waiting(cache, service, request, Some(refused)),
            });
        }
        match self.project().state.project() {
            StateProj::Second { future } => future.poll(cx),
            StateProj::First { .. } => {
                Poll::Ready(Err("AuthReplayFuture in no state to poll".into()))
            }
        }
    }
}

impl<S, B> fmt::Debug for AuthReplayFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::First { replay: None, .. } => "first attempt, not replayable",
            State::First { .. } => "first attempt",
            State::Second { .. } => "replay",
        };
        f.debug_struct("AuthReplayFuture")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use http::header::AUTHORIZATION;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::test_support::{auth, over, Counter, Kind};
    use crate::{GenesysAuth, TokenGeneration};

    const URI: &str = "https://api.example.test/x";

    /// The header that carries `token-{n}`.
    fn bearer(n: usize) -> Option<String> {
        Some(format!("Bearer token-{n}"))
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    /// A request whose body cannot be copied.
    fn streaming() -> Request<UnsyncBoxBody<Bytes, BoxError>> {
        let body = Full::new(Bytes::from_static(b"stream"))
            .map_err(|e| -> BoxError { match e {} })
            .boxed_unsync();
        Request::post(URI).body(body).unwrap()
    }

    /// An API that accepts only the tokens it was told to, and records the `Authorization`
    /// of every request it gets.
    #[derive(Clone, Default)]
    struct Api {
        valid: Arc<Mutex<Vec<String>>>,
        seen: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl Api {
        fn accept(&self, tokens: &[&str]) {
            *self.valid.lock().unwrap() = tokens.iter().map(|t| format!("Bearer {t}")).collect();
        }

        fn seen(&self) -> Vec<Option<String>> {
            self.seen.lock().unwrap().clone()
        }

        /// Records `request`'s header; 200 to an accepted token, else 401.
        fn answer<B>(&self, request: &Request<B>) -> Response<()> {
            let auth = request
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned());
            let ok = auth
                .as_ref()
                .is_some_and(|a| self.valid.lock().unwrap().contains(a));
            self.seen.lock().unwrap().push(auth);
            let mut response = Response::new(());
            if !ok {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            response
        }

        /// The API as a service: it sees the request at once and answers `delay` later.
        fn service<B: Send + 'static>(
            &self,
            delay: Duration,
        ) -> impl Service<Request<B>, Response = Response<()>, Error = BoxError, Future = impl Send>
               + Clone
               + Send {
            let api = self.clone();
            tower::service_fn(move |request: Request<B>| {
                let response = api.answer(&request);
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, BoxError>(response)
                }
            })
        }
    }

    /// A counting source, the auth over it, an API that accepts no token, and
    /// `auth.layers()` in front of that API.
    fn stack<B: ReplayableBody + Send + 'static>() -> (
        Counter,
        GenesysAuth,
        Api,
        impl Service<Request<B>, Response = Response<()>, Error = BoxError> + Clone,
    ) {
        let source = Counter::default();
        let auth = auth(source.clone());
        let api = Api::default();
        let client = ServiceBuilder::new()
            .layer(auth.layers())
            .service(api.service(Duration::ZERO));
        (source, auth, api, client)
    }

    /// What a [`Gate`]'s `poll_ready` does once the API has been called, and what happened.
    #[derive(Default)]
    struct Gating {
        /// `Pending` answers (each waking the task) to give before `Ready`.
        pending: usize,
        /// Whether `poll_ready` fails instead.
        fail: bool,
        calls: usize,
        log: Vec<&'static str>,
    }

    #[derive(Debug, PartialEq)]
    enum GateError {
        Overloaded,
        CalledUnready,
    }

    impl fmt::Display for GateError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                Self::Overloaded => "overloaded",
                Self::CalledUnready => "called without a Ready poll_ready first",
            })
        }
    }

    impl std::error::Error for GateError {}

    /// The API behind a service that must be polled ready before each call, as tower
    /// requires: a clone starts unready, and a call without a `Ready` first fails (and is
    /// logged). Once the API was called, `poll_ready` follows [`Gating`].
    struct Gate {
        api: Api,
        gating: Arc<Mutex<Gating>>,
        ready: bool,
    }

    impl Clone for Gate {
        fn clone(&self) -> Self {
            Self {
                api: self.api.clone(),
                gating: self.gating.clone(),
                ready: false,
            }
        }
    }

    impl fmt::Debug for Gate {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Gate")
        }
    }

    impl<B> Service<Request<B>> for Gate {
        type Response = Response<()>;
        type Error = GateError;
        type Future = std::future::Ready<Result<Response<()>, GateError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GateError>> {
            let mut gating = self.gating.lock().unwrap();
            if gating.calls > 0 {
                if gating.fail {
                    gating.log.push("error");
                    return Poll::Ready(Err(GateError::Overloaded));
                }
                if gating.pending > 0 {
                    gating.pending -= 1;
                    gating.log.push("pending");
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            gating.log.push("ready");
            self.ready = true;
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<B>) -> Self::Future {
            let mut gating = self.gating.lock().unwrap();
            if !std::mem::take(&mut self.ready) {
                gating.log.push("unready call");
                return std::future::ready(Err(GateError::CalledUnready));
            }
            gating.calls += 1;
            gating.log.push("call");
            std::future::ready(Ok(self.api.answer(&request)))
        }
    }

    /// The source, an auth with `token-1` cached, an API that accepts only `token-2`, the
    /// gate's state, and the fused service over the gated API.
    async fn gated(
        gating: Gating,
    ) -> (
        Counter,
        GenesysAuth,
        Api,
        Arc<Mutex<Gating>>,
        AuthReplayService<Gate>,
    ) {
        let source = Counter::default();
        let auth = auth(source.clone());
        auth.token().await.unwrap();
        let api = Api::default();
        api.accept(&["token-2"]);
        let gating = Arc::new(Mutex::new(gating));
        let service = auth.layers().layer(Gate {
            api: api.clone(),
            gating: gating.clone(),
            ready: false,
        });
        (source, auth, api, gating, service)
    }

    /// Waits for `service` to be ready for a request with a body of type `B`.
    async fn ready_for<B, S: Service<Request<B>>>(service: &mut S)
    where
        S::Error: fmt::Debug,
    {
        service.ready().await.unwrap();
    }

    /// Polls `future` once.
    async fn poll_once<F: Future>(future: &mut Pin<&mut F>) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
    }

    /// `value`'s `Debug` (plain), checked (plain and pretty) not to show a token.
    fn shown(value: &impl fmt::Debug) -> String {
        let (plain, pretty) = (format!("{value:?}"), format!("{value:#?}"));
        for shown in [&plain, &pretty] {
            assert!(!shown.contains("token-"), "a token in {shown}");
        }
        plain
    }

    #[tokio::test(start_paused = true)]
    async fn the_replay_is_sent_only_once_its_service_is_ready() {
        // On this service, and on the two-layer stack. The replay gets its token first,
        // then asks for capacity (2b). tower's `Retry` readies `AuthService` before calling
        // it with the replay; `AuthService` gives that capacity back while it waits for the
        // newer token, and readies the service again once it has it: one "ready" more.
        for kind in Kind::BOTH {
            let (source, auth, api, gating, _) = gated(Gating {
                pending: 3,
                ..Gating::default()
            })
            .await;
            let gate = Gate {
                api: api.clone(),
                gating: gating.clone(),
                ready: false,
            };
            let response = over(&auth, kind, gate).oneshot(get(URI)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{kind:?}");
            let expected: &[&str] = match kind {
                Kind::Fused => &[
                    "ready", "call", "pending", "pending", "pending", "ready", "call",
                ],
                Kind::Tower => &[
                    "ready", "call", "pending", "pending", "pending", "ready", "ready", "call",
                ],
            };
            assert_eq!(gating.lock().unwrap().log, expected, "{kind:?}");
            assert_eq!(api.seen(), [bearer(1), bearer(2)], "{kind:?}");
            assert_eq!(source.issued(), 2, "{kind:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_readying_the_replay_is_the_callers_and_nothing_is_resent() {
        let (source, auth, api, gating, mut service) = gated(Gating {
            fail: true,
            ..Gating::default()
        })
        .await;
        ready_for::<(), _>(&mut service).await;
        let future = service.call(get(URI));
        let mut future = std::pin::pin!(future);
        let error = std::future::poll_fn(|cx| future.as_mut().poll(cx))
            .await
            .unwrap_err();
        assert_eq!(
            error.downcast_ref::<GateError>(),
            Some(&GateError::Overloaded),
            "{error}"
        );
        // Polled again: an error, neither a panic nor a call.
        let again = poll_once(&mut future).await;
        assert!(
            matches!(&again, Poll::Ready(Err(e)) if e.to_string().contains("after an error")),
            "{again:?}"
        );
        assert_eq!(gating.lock().unwrap().log, ["ready", "call", "error"]);
        assert_eq!(api.seen(), [bearer(1)], "sent once");
        let stats = auth.stats();
        assert_eq!(
            (stats.api_401s, stats.replays_after_401),
            (1, 1),
            "the 401 is counted; the replay got its newer token before asking for capacity"
        );
        assert_eq!(source.issued(), 2, "one refresh for the refused token");
    }

    #[tokio::test(start_paused = true)]
    async fn the_replay_outlives_every_other_handle_to_the_cache() {
        let source = Counter::default();
        let auth = auth(source.clone());
        auth.token().await.unwrap();
        let api = Api::default();
        api.accept(&["token-2"]);
        let layer = auth.layers();
        let shared = Arc::downgrade(&layer.shared);
        let client = ServiceBuilder::new()
            .layer(layer)
            .service(api.service(Duration::from_secs(1)));
        let request = tokio::spawn(client.oneshot(get(URI)));
        // Once the API has the request, `oneshot` has dropped the service.
        for _ in 0..100 {
            if !api.seen().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(api.seen(), [bearer(1)], "the request is at the API");
        drop(auth);
        assert_eq!(
            shared.strong_count(),
            0,
            "the response future holds the cache, not the layer"
        );

        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(api.seen(), [bearer(1), bearer(2)]);
        assert_eq!(source.issued(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_to_a_request_it_did_not_authorize_is_not_replayed() {
        let (source, auth, api, client) = stack::<()>();
        let elsewhere = client
            .clone()
            .oneshot(get("https://other.example.test/x"))
            .await
            .unwrap();
        assert_eq!(elsewhere.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(elsewhere.extensions().get::<TokenGeneration>(), None);

        let mut own = get(URI);
        own.headers_mut()
            .insert(AUTHORIZATION, "Bearer mine".parse().unwrap());
        let own = client.oneshot(own).await.unwrap();
        assert_eq!(own.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(own.extensions().get::<TokenGeneration>(), None);

        assert_eq!(api.seen(), [None, Some("Bearer mine".to_owned())]);
        assert_eq!(source.issued(), 0);
        assert_eq!(auth.stats().api_401s, 0);
    }

    /// A body that counts its copies.
    #[derive(Default)]
    struct Counted(Arc<AtomicUsize>);

    impl ReplayableBody for Counted {
        fn try_clone_body(&self) -> Option<Self> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Some(Self(self.0.clone()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_request_it_may_authorize_is_copied() {
        let (_, _, api, client) = stack::<Counted>();
        api.accept(&["token-1"]);
        let copies = Arc::new(AtomicUsize::new(0));
        let send = |uri: &str, own: bool| {
            let mut request = Request::post(uri).body(Counted(copies.clone())).unwrap();
            if own {
                request
                    .headers_mut()
                    .insert(AUTHORIZATION, "Bearer mine".parse().unwrap());
            }
            client.clone().oneshot(request)
        };
        send("https://other.example.test/x", false).await.unwrap();
        assert_eq!(copies.load(Ordering::SeqCst), 0, "another host: not copied");
        send(URI, true).await.unwrap();
        assert_eq!(
            copies.load(Ordering::SeqCst),
            0,
            "its own header: not copied"
        );
        send(URI, false).await.unwrap();
        assert_eq!(copies.load(Ordering::SeqCst), 1, "in scope: copied once");
        assert_eq!(api.seen().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_copied_is_sent_once_and_its_token_still_reported() {
        let (source, auth, api, client) = stack();
        api.accept(&["token-1"]);
        let ok = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);

        api.accept(&["token-2"]); // token-1 revoked
        let refused = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            refused.extensions().get::<TokenGeneration>(),
            Some(&TokenGeneration(1))
        );
        assert_eq!(api.seen().len(), 2, "not replayed");

        let next = client.oneshot(streaming()).await.unwrap();
        assert_eq!(next.status(), StatusCode::OK);
        assert_eq!(api.seen(), [bearer(1), bearer(1), bearer(2)]);
        assert_eq!(source.issued(), 2, "the refused token was replaced");
        let stats = auth.stats();
        assert_eq!((stats.api_401s, stats.replays_after_401), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn debug_names_the_state_and_never_the_token() {
        let (_source, _auth, _api, gating, mut service) = gated(Gating {
            pending: 1,
            ..Gating::default()
        })
        .await;
        ready_for::<(), _>(&mut service).await;
        let future = service.call(get(URI));
        let mut future = std::pin::pin!(future);
        assert_eq!(
            shown(&future),
            r#"AuthReplayFuture { state: "first attempt" }"#
        );
        // token-1 refused; the replay waits for token-2, then for its service.
        assert!(poll_once(&mut future).await.is_pending());
        assert_eq!(shown(&future), r#"AuthReplayFuture { state: "replay" }"#);
        assert_eq!(future.await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            gating.lock().unwrap().log.len(),
            5,
            "ready call pending ready call"
        );

        // Requests it would not replay.
        ready_for::<UnsyncBoxBody<Bytes, BoxError>, _>(&mut service).await;
        let not_replayable = service.call(streaming());
        assert_eq!(
            shown(&not_replayable),
            r#"AuthReplayFuture { state: "first attempt, not replayable" }"#
        );
        let mut own = get(URI);
        own.headers_mut()
            .insert(AUTHORIZATION, "Bearer token-mine".parse().unwrap());
        ready_for::<(), _>(&mut service).await;
        let own = service.call(own);
        assert_eq!(
            shown(&own),
            r#"AuthReplayFuture { state: "first attempt, not replayable" }"#
        );
        drop((not_replayable, own));

        // The service, with a cached token: its cache shows the generation, not the token.
        for _ in 0..2 {
            ready_for::<(), _>(&mut service).await;
            let response = service.call(get(URI)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let service = shown(&service);
        assert!(service.contains("generation: 2"), "{service}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_401s_to_one_token_cost_one_token_request() {
        const REQUESTS: usize = 200;
        let source = Counter::default();
        let auth = auth(source.clone());
        auth.token().await.unwrap();
        let api = Api::default();
        api.accept(&["token-2"]);
        // Every request sent with token-1 is held until all of them were: all 401s answer
        // the same token, none sees the refresh the first of them starts.
        let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
        let inner = tower::service_fn({
            let api = api.clone();
            move |request: Request<()>| {
                let response = api.answer(&request);
                let first = request.headers().get(AUTHORIZATION).unwrap() == "Bearer token-1";
                let barrier = barrier.clone();
                async move {
                    if first {
                        barrier.wait().await;
                    }
                    Ok::<_, BoxError>(response)
                }
            }
        });
        let service = auth.layers().layer(inner);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..REQUESTS {
            tasks.spawn(service.clone().oneshot(get(URI)));
        }
        let all = async {
            while let Some(result) = tasks.join_next().await {
                assert_eq!(result.unwrap().unwrap().status(), StatusCode::OK);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("every request answered");

        assert_eq!(source.issued(), 2, "one extra token request");
        let seen = api.seen();
        let count = |n| seen.iter().filter(|s| **s == bearer(n)).count();
        assert_eq!(
            (seen.len(), count(1), count(2)),
            (2 * REQUESTS, REQUESTS, REQUESTS)
        );
        let stats = auth.stats();
        assert_eq!(
            (stats.api_401s, stats.replays_after_401),
            (REQUESTS as u64, REQUESTS as u64)
        );
    }
}
