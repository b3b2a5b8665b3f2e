//! [`AuthService`]: attaching the token to each in-scope request.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use tower::{BoxError, Service};

use super::future::Attached;
use super::{ResponseFuture, Shared};
use crate::retry::Refused;
use crate::token::TokenGeneration;

/// Attaches `Authorization: Bearer …` to in-scope requests.
///
/// * With a valid token cached, `call` takes no lock: one load of the cached token and one
///   clock read, and the header (marked sensitive) is inserted.
/// * With none (first call, expiry, or right after a 401), the request waits for the one
///   refresh in flight, then for the inner service to be ready again: the capacity that
///   `poll_ready` reserved is given back while it waits, since the token request may need
///   it. A failed refresh comes back as an [`AuthError`](crate::AuthError) boxed in the
///   service error. A request replayed by [`RefreshOn401`](crate::RefreshOn401) waits for a
///   token newer than the one the API refused.
/// * Requests outside the [`Scope`](crate::Scope), or with their own `Authorization`,
///   pass through untouched.
/// * A `401` answer to a request it authorized is reported to the cache (at most one
///   refresh for any number of 401s to the same token) and carries the
///   [`TokenGeneration`] it sent in its extensions.
///
/// Errors of the inner service are boxed into [`BoxError`] unchanged; a token that could
/// not be obtained is an [`AuthError`](crate::AuthError) in that box. The inner service must
/// be `Clone` (as hyper-util's client and tower's buffers are): a request that waits for a
/// token takes a clone with it.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> AuthService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

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

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let applies = self.shared.scope.applies_to(&request);
        self.call_checked(request, applies)
    }
}

impl<S> AuthService<S> {
    /// `call`, with the scope already checked: `applies` says whether this layer
    /// authorizes `request` (in scope, no `Authorization` of its own).
    #[inline]
    pub(crate) fn call_checked<B, ResBody>(
        &mut self,
        request: Request<B>,
        applies: bool,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    {
        attach(&mut self.inner, &self.shared, request, applies)
    }
}

/// What [`AuthService`] does with a request, on a ready `inner` and the shared state of the
/// cache whose token it attaches (also used per request by the users' layer, which picks
/// `shared` by the request's user).
#[inline]
pub(crate) fn attach<S, B, ResBody>(
    inner: &mut S,
    shared: &Shared,
    mut request: Request<B>,
    applies: bool,
) -> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
{
    let cache = &shared.cache;
    if !applies {
        return ResponseFuture::called(inner.call(request), None);
    }
    if let Some(refused) = take_refused(&mut request, cache.id()) {
        return wait_for_token(inner, shared, request, Some(refused));
    }
    match cache.header() {
        Some((header, generation)) => {
            request.headers_mut().insert(AUTHORIZATION, header);
            let attached = Attached {
                cache: cache.clone(),
                generation,
                replay: false,
            };
            ResponseFuture::called(inner.call(request), Some(attached))
        }
        None => wait_for_token(inner, shared, request, None),
    }
}

/// The request waits for a token (one newer than `refused`, for a replay), then for a
/// clone of the inner service to be ready. The ready service is dropped now, which gives
/// back what its `poll_ready` reserved (a concurrency permit, a buffer slot): the token
/// request may need that capacity.
fn wait_for_token<S, B>(
    inner: &mut S,
    shared: &Shared,
    request: Request<B>,
    refused: Option<TokenGeneration>,
) -> ResponseFuture<S, B>
where
    S: Service<Request<B>> + Clone,
{
    let unready = inner.clone();
    drop(std::mem::replace(inner, unready));
    if refused.is_none() {
        tracing::debug!(
            target: "genesys_auth_layer::auth",
            "no valid token cached; request waits for one"
        );
    }
    let service = inner.clone();
    ResponseFuture::waiting(shared.cache.clone(), service, request, refused)
}

/// The generation the API refused, if `request` is a replay for cache `cache` (marked by
/// [`RefreshOn401`](crate::RefreshOn401)); the mark is removed so it never reaches the API.
fn take_refused<B>(request: &mut Request<B>, cache: u64) -> Option<TokenGeneration> {
    let Refused(stamp) = *request.extensions().get::<Refused>()?;
    if stamp.cache != cache {
        return None;
    }
    request.extensions_mut().remove::<Refused>();
    Some(stamp.generation)
}
#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::{HeaderValue, Uri};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::source::BoxFuture;
    use crate::{AuthError, AuthLayer, CacheConfig, IssuedToken, Scope, TokenCache, TokenSource};

    /// Issues `token-0`, `token-1`, … each valid `lifetime`, `delay` after being asked, and
    /// counts them.
    #[derive(Clone)]
    struct Counting(Arc<AtomicUsize>, Duration, Duration);

    impl Counting {
        fn new(lifetime: Duration, delay: Duration) -> Self {
            Self(Arc::default(), lifetime, delay)
        }
    }

    /// Tokens valid 100 s, issued 50 ms after being asked.
    impl Default for Counting {
        fn default() -> Self {
            Self::new(Duration::from_secs(100), Duration::from_millis(50))
        }
    }

    impl TokenSource for Counting {
        fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(self.2).await;
                Ok(IssuedToken::bearer(&format!("token-{n}"), self.1).unwrap())
            })
        }
    }

    type Echo = tower::util::ServiceFn<
        fn(Request<()>) -> std::future::Ready<Result<Response<Option<HeaderValue>>, Infallible>>,
    >;

    /// The API: answers with the `Authorization` header it got.
    fn echo() -> Echo {
        tower::service_fn(|req: Request<()>| {
            std::future::ready(Ok(Response::new(req.headers().get(AUTHORIZATION).cloned())))
        })
    }

    /// Sends one request on `service` itself (no clone) and returns the header the API saw.
    async fn send(service: &mut AuthService<Echo>) -> String {
        let request = Request::get("https://api.example.com/x").body(()).unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        let header = response.into_body().expect("a token was attached");
        header.to_str().unwrap().to_owned()
    }

    /// A current-thread runtime, driven only inside `block_on`, as behind a synchronous
    /// facade.
    fn block_on_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Lets spawned tasks (a refresh ahead) run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// A token goes out only while it is valid: never again once the API refused it, not
    /// even while the new one is being fetched; in its refresh window it is still sent and
    /// one refresh ahead starts; past its expiry the request waits for a new one.
    #[tokio::test(start_paused = true)]
    async fn a_token_is_sent_only_while_valid_and_refreshed_ahead() {
        let source = Counting::default();
        let config = CacheConfig::default()
            .refresh_ahead(Duration::from_secs(10), 0.0)
            .refresh_jitter(0.0);
        let cache = TokenCache::new(source.clone(), config);
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());
        let mut clone = service.clone();
        assert_eq!(send(&mut clone).await, "Bearer token-0");
        assert_eq!(send(&mut service).await, "Bearer token-0");

        // The API refused generation 1: it is not sent again, not even while the new token
        // is being fetched.
        let refused = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh_after_401(TokenGeneration(1)).await }
        });
        settle().await;
        assert_eq!(send(&mut service).await, "Bearer token-1");
        refused.await.unwrap().unwrap();

        // In the refresh window the token is still sent, and one refresh ahead starts.
        tokio::time::advance(Duration::from_secs(91)).await;
        assert_eq!(send(&mut service).await, "Bearer token-1");
        assert_eq!(send(&mut clone).await, "Bearer token-1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.0.load(Ordering::SeqCst), 3);
        assert_eq!(send(&mut service).await, "Bearer token-2");

        // Idle past expiry: the next request waits for a new token, never the expired one.
        tokio::time::advance(Duration::from_secs(101)).await;
        assert_eq!(send(&mut service).await, "Bearer token-3");
        assert_eq!(source.0.load(Ordering::SeqCst), 4);
    }

    /// Requests to another host, or with the caller's own `Authorization`, go out untouched
    /// and are not counted as authorized.
    #[tokio::test(start_paused = true)]
    async fn requests_it_skips_go_out_untouched() {
        let cache = TokenCache::new(Counting::default(), CacheConfig::default());
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());
        assert_eq!(send(&mut service).await, "Bearer token-0");
        let authorized = cache.stats().requests_authorized;
        let mut seen = |request: Request<()>| {
            let future = service.call(request);
            async move { future.await.unwrap().into_body() }
        };
        let elsewhere = Request::get("https://example.org/x").body(()).unwrap();
        assert_eq!(seen(elsewhere).await, None, "another host");
        let own = Request::get("https://api.example.com/x")
            .header(AUTHORIZATION, "Bearer mine")
            .body(())
            .unwrap();
        assert_eq!(
            seen(own).await,
            Some(HeaderValue::from_static("Bearer mine")),
            "the caller's own header"
        );
        assert_eq!(cache.stats().requests_authorized, authorized);
    }

    /// 2b: one concurrency-limited service (limit 2) carries both the token requests and
    /// the API requests under the full stack. Requests waiting for a token hold none of its
    /// capacity, on the first send and on the replay, so the token request gets a permit.
    #[tokio::test(start_paused = true)]
    async fn requests_waiting_for_a_token_hold_no_inner_capacity() {
        use crate::test_support::{over, Kind};
        use std::sync::Mutex;
        use tower::limit::ConcurrencyLimitLayer;
        use tower::ServiceBuilder;

        type Limited = tower::util::BoxCloneService<Request<()>, Response<()>, BoxError>;

        /// Token requests through the limited service, as `build(limited.clone())` sends them.
        struct Through(Mutex<Limited>, Arc<AtomicUsize>);
        impl TokenSource for Through {
            fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
                let service = self.0.lock().unwrap().clone();
                let n = self.1.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    let request = Request::post("https://login.example.com/oauth/token")
                        .body(())
                        .unwrap();
                    service
                        .oneshot(request)
                        .await
                        .map_err(|e| AuthError::Transport(Arc::from(e)))?;
                    Ok(
                        IssuedToken::bearer(&format!("token-{n}"), Duration::from_secs(3600))
                            .unwrap(),
                    )
                })
            }
        }

        for kind in Kind::BOTH {
            let refusing = Arc::new(AtomicUsize::new(0)); // the API refuses token-1 if set
            let api = tower::service_fn({
                let refusing = refusing.clone();
                move |req: Request<()>| {
                    let refused = refusing.load(Ordering::SeqCst) == 1
                        && req
                            .headers()
                            .get(AUTHORIZATION)
                            .is_some_and(|v| v == "Bearer token-1");
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let mut response = Response::new(());
                        if refused {
                            *response.status_mut() = http::StatusCode::UNAUTHORIZED;
                        }
                        Ok::<_, BoxError>(response)
                    }
                }
            });
            let limited: Limited = Limited::new(
                ServiceBuilder::new()
                    .layer(ConcurrencyLimitLayer::new(2))
                    .service(api),
            );
            let issued = Arc::new(AtomicUsize::new(0));
            let source = Through(Mutex::new(limited.clone()), issued.clone());
            let config = CacheConfig::default().fetch_timeout(Duration::from_secs(5));
            let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
            let auth = crate::GenesysAuth::from_source(source, config, scope);
            let client = over(&auth, kind, limited.clone());
            let fire = |client: &crate::test_support::Boxed<(), ()>| {
                let request = Request::get("https://api.example.com/x").body(()).unwrap();
                let client = client.clone();
                tokio::spawn(async move { client.oneshot(request).await.map(|r| r.status()) })
            };
            // Two first requests at once: each would hold one of the two permits.
            let first = [fire(&client), fire(&client)];
            for task in first {
                assert_eq!(task.await.unwrap().unwrap(), 200, "{kind:?}: first send");
            }
            assert_eq!(issued.load(Ordering::SeqCst), 1, "{kind:?}");
            // The API refuses token-1: both replays wait for token-2 without a permit.
            refusing.store(1, Ordering::SeqCst);
            let replayed = [fire(&client), fire(&client)];
            for task in replayed {
                assert_eq!(task.await.unwrap().unwrap(), 200, "{kind:?}: replay");
            }
            assert_eq!(issued.load(Ordering::SeqCst), 2, "{kind:?}");
            assert_eq!(
                auth.stats().fetch_failures,
                0,
                "{kind:?}: no fetch timed out"
            );
        }
    }

    /// A response future whose token could not be obtained answers with that error, and
    /// with an error again if polled after it; the inner service is never called.
    #[tokio::test(start_paused = true)]
    async fn a_future_polled_again_after_its_token_error_errs_again() {
        use std::future::Future;
        struct Failing;
        impl TokenSource for Failing {
            fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
                Box::pin(async { Err(AuthError::Timeout(Duration::from_secs(1))) })
            }
        }
        let called = Arc::new(AtomicUsize::new(0));
        let inner = tower::service_fn({
            let called = called.clone();
            move |_req: Request<()>| {
                called.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok::<_, Infallible>(Response::new(())))
            }
        });
        let cache = TokenCache::new(Failing, CacheConfig::default());
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache, scope).layer(inner);
        let request = Request::get("https://api.example.com/x").body(()).unwrap();
        let mut future = std::pin::pin!(service.call(request));
        let first = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
        let error = first.unwrap_err();
        assert!(
            matches!(
                error.downcast_ref::<AuthError>(),
                Some(AuthError::Timeout(_))
            ),
            "{error}"
        );
        let again = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
        assert!(
            again.unwrap_err().to_string().contains("after completion"),
            "an error, not a panic nor a call"
        );
        assert_eq!(called.load(Ordering::SeqCst), 0);
    }

    /// Behind a synchronous facade, a refresh started ahead by one call runs only when the
    /// next call drives the runtime, possibly after the fetch timeout: it must still ask,
    /// not fail as timed out (which also started a backoff).
    #[test]
    fn a_refresh_ahead_started_before_a_gap_still_asks() {
        let runtime = block_on_runtime();
        let source = Counting::new(Duration::from_secs(4), Duration::ZERO);
        let config = CacheConfig::default()
            .refresh_ahead(Duration::from_secs(2), 0.0)
            .refresh_jitter(0.0)
            .fetch_timeout(Duration::from_millis(300));
        let cache = TokenCache::new(source.clone(), config);
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
        let token = cache.current().unwrap();
        // In the refresh window (2 s of it left, however busy the machine): this call
        // starts the refresh ahead, and returns before the runtime runs it.
        wait_until(token.refresh_at());
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
        // Past the expiry and the fetch timeout, the next call drives the refresh.
        wait_until(token.expires_at() + Duration::from_millis(400));
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-1");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats().fetch_failures, 0);
    }

    /// Blocks this thread (no runtime running, as between the calls of a synchronous
    /// facade) until the clock reaches `at`.
    fn wait_until(at: tokio::time::Instant) {
        while tokio::time::Instant::now() < at {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The same for the refresh a 401 starts (`AuthLayer` alone, or a body that cannot be
    /// replayed): nobody waits for it until the next call, which may come after the fetch
    /// timeout.
    #[test]
    fn a_refresh_a_401_started_before_a_gap_still_asks() {
        let runtime = block_on_runtime();
        let source = Counting::new(Duration::from_secs(100), Duration::ZERO);
        let config = CacheConfig::default().fetch_timeout(Duration::from_millis(300));
        let cache = TokenCache::new(source.clone(), config);
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let status: Answers = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let mut service = AuthLayer::new(cache.clone(), scope).layer(answering(status.clone()));
        let mut call = |expected: u16| {
            status.store(expected, Ordering::SeqCst);
            let request = Request::get("https://api.example.com/x").body(()).unwrap();
            let response =
                runtime.block_on(async { service.ready().await.unwrap().call(request).await });
            response
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        };
        assert_eq!(call(200), Ok(200));
        // Refused: the token is dropped and a refresh is started, which this runtime runs
        // only during the next call, after the fetch timeout.
        assert_eq!(call(401), Ok(401));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(call(200), Ok(200));
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats().fetch_failures, 0);
    }

    /// What the API answers, as an HTTP status code.
    type Answers = Arc<std::sync::atomic::AtomicU16>;

    /// The API answers every request with the status `status` holds.
    fn answering(
        status: Answers,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
        tower::service_fn(move |_req: Request<()>| {
            let mut response = Response::new(());
            *response.status_mut() =
                http::StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
            std::future::ready(Ok(response))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_to_a_request_it_authorized_is_stamped_and_drops_the_token() {
        use crate::retry::Stamp;
        let source = Counting::default();
        let cache = TokenCache::new(source.clone(), CacheConfig::default());
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let mut service = AuthLayer::new(cache.clone(), scope).layer(answering(status.clone()));
        let stamp_of = |response: &Response<()>| {
            (
                response.extensions().get::<TokenGeneration>().copied(),
                response
                    .extensions()
                    .get::<Stamp>()
                    .map(|s| (s.cache, s.generation)),
            )
        };
        let in_scope = || Request::get("https://api.example.com/x").body(()).unwrap();
        async fn call<S>(service: &mut S, request: Request<()>) -> Response<()>
        where
            S: Service<Request<()>, Response = Response<()>>,
            S::Error: std::fmt::Debug,
        {
            service.ready().await.unwrap().call(request).await.unwrap()
        }

        // Successes carry nothing, on each way a header is attached: after waiting, and
        // from the cache.
        for _ in 0..3 {
            assert_eq!(
                stamp_of(&call(&mut service, in_scope()).await),
                (None, None)
            );
        }

        // The API now refuses every token. A 401 to the cached token is stamped, and the
        // token is dropped at once with one refresh started, even though nothing replays
        // this request (`AuthLayer` alone).
        status.store(401, Ordering::SeqCst);
        let refused = |g| {
            (
                Some(TokenGeneration(g)),
                Some((cache.id(), TokenGeneration(g))),
            )
        };
        assert_eq!(stamp_of(&call(&mut service, in_scope()).await), refused(1));
        assert!(cache.current().is_none(), "the refused token is dropped");
        settle().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.0.load(Ordering::SeqCst), 2, "one refresh started");
        // The new token, from the cache this time: stamped and dropped the same way.
        assert_eq!(stamp_of(&call(&mut service, in_scope()).await), refused(2));
        // Right away, with no token: the request waits for the refresh the 401 started.
        assert_eq!(stamp_of(&call(&mut service, in_scope()).await), refused(3));
        assert_eq!(source.0.load(Ordering::SeqCst), 3);
        let stats = cache.stats();
        assert_eq!(stats.api_401s, 3, "every 401 counted");
        assert_eq!(stats.replays_after_401, 0, "none replayed");

        // A 401 to a request it did not authorize carries nothing and costs no refresh:
        // another host, or the caller's own `Authorization`.
        settle().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = source.0.load(Ordering::SeqCst);
        let elsewhere = Request::get("https://example.org/x").body(()).unwrap();
        assert_eq!(stamp_of(&call(&mut service, elsewhere).await), (None, None));
        let own = Request::get("https://api.example.com/x")
            .header(AUTHORIZATION, "Bearer mine")
            .body(())
            .unwrap();
        assert_eq!(stamp_of(&call(&mut service, own).await), (None, None));
        settle().await;
        assert_eq!(source.0.load(Ordering::SeqCst), before);
        assert_eq!(cache.stats().api_401s, 3, "not ours: not counted");
    }
}
