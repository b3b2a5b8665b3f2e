use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, Response};
use tower::{BoxError, Service};

use super::{ResponseFuture, Shared};
use crate::cache::TokenCache;
use crate::retry::{Refused, Stamp};
use crate::token::TokenGeneration;

/// Attaches `Authorization: Bearer …` to in-scope requests.
///
/// * With a valid token cached, `call` takes no lock and allocates nothing beyond the
///   header insert. A service used more than once keeps a private copy of the fresh
///   token's header (one allocation per service and token, on its second visit to the
///   cache) and then checks it with one atomic load per call.
/// * With none (first call, expiry, or right after a 401), the request waits for the one
///   refresh in flight; a failed refresh comes back as an [`AuthError`](crate::AuthError)
///   boxed in the service error. A request replayed by
///   [`RefreshOn401`](crate::RefreshOn401) waits for a token newer than the one the API
///   refused.
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
#[derive(Debug)]
pub struct AuthService<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    /// A private copy of the header of the fresh token this service last attached. While
    /// the cache's fresh generation still names it, `call` sends it without loading the
    /// cache's token: one atomic load instead of an `ArcSwap` guard.
    kept: Option<KeptHeader>,
    /// Whether this instance went to the cache before. A header is kept only on the second
    /// visit: a clone made for one request and dropped (the usual `clone().oneshot(…)`)
    /// would pay for keeping it and never use it.
    reused: bool,
}

#[derive(Clone)]
struct KeptHeader {
    generation: TokenGeneration,
    header: HeaderValue,
    /// The token's refresh time, for [`CacheConfig::check_clock_per_request`](crate::CacheConfig::check_clock_per_request).
    refresh_at: tokio::time::Instant,
}

impl fmt::Debug for KeptHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptHeader")
            .field("generation", &self.generation.0)
            .finish_non_exhaustive()
    }
}

/// A clone starts without the kept header: tower's `Retry` clones its service for every
/// request (to replay it), and copying the header would cost a reference-count round trip
/// per request for a clone that is almost never called.
impl<S: Clone> Clone for AuthService<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.clone())
    }
}

impl<S> AuthService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            kept: None,
            reused: false,
        }
    }

    /// A reference to the inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// # mod fake {
    /// #     use std::time::Duration;
    /// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
    /// #     pub struct Fixed;
    /// #     impl TokenSource for Fixed {
    /// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
    /// #             let token = IssuedToken::bearer("t", Duration::from_secs(3600));
    /// #             Box::pin(async move { Ok(token.expect("a valid token")) })
    /// #         }
    /// #     }
    /// # }
    /// # use fake::Fixed;
    /// # let layer = {
    /// #     use genesys_auth_layer::{AuthLayer, Region, Scope, TokenCache};
    /// #     let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// #     AuthLayer::new(TokenCache::new(Fixed, Default::default()), scope)
    /// # };
    ///
    /// /// The inner client, with settings of its own.
    /// #[derive(Clone)]
    /// struct ApiClient {
    ///     user_agent: String,
    /// }
    /// let service = layer.layer(ApiClient { user_agent: "my-app/1.0".into() });
    /// assert_eq!(service.get_ref().user_agent, "my-app/1.0");
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// # mod fake {
    /// #     use std::time::Duration;
    /// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
    /// #     pub struct Fixed;
    /// #     impl TokenSource for Fixed {
    /// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
    /// #             let token = IssuedToken::bearer("t", Duration::from_secs(3600));
    /// #             Box::pin(async move { Ok(token.expect("a valid token")) })
    /// #         }
    /// #     }
    /// # }
    /// # use fake::Fixed;
    /// # let layer = {
    /// #     use genesys_auth_layer::{AuthLayer, Region, Scope, TokenCache};
    /// #     let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// #     AuthLayer::new(TokenCache::new(Fixed, Default::default()), scope)
    /// # };
    ///
    /// /// The inner client, with settings of its own.
    /// #[derive(Clone)]
    /// struct ApiClient {
    ///     user_agent: String,
    /// }
    /// let mut service = layer.layer(ApiClient { user_agent: "my-app/1.0".into() });
    /// service.get_mut().user_agent = "my-app/2.0".into();
    /// assert_eq!(service.get_ref().user_agent, "my-app/2.0");
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// # mod fake {
    /// #     use std::time::Duration;
    /// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
    /// #     pub struct Fixed;
    /// #     impl TokenSource for Fixed {
    /// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
    /// #             let token = IssuedToken::bearer("t", Duration::from_secs(3600));
    /// #             Box::pin(async move { Ok(token.expect("a valid token")) })
    /// #         }
    /// #     }
    /// # }
    /// # use fake::Fixed;
    /// # let layer = {
    /// #     use genesys_auth_layer::{AuthLayer, Region, Scope, TokenCache};
    /// #     let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// #     AuthLayer::new(TokenCache::new(Fixed, Default::default()), scope)
    /// # };
    ///
    /// /// The inner client, with settings of its own.
    /// #[derive(Clone)]
    /// struct ApiClient {
    ///     user_agent: String,
    /// }
    /// let service = layer.layer(ApiClient { user_agent: "my-app/1.0".into() });
    /// let client: ApiClient = service.into_inner();
    /// assert_eq!(client.user_agent, "my-app/1.0");
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
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
        self.authorize_and_call(request)
    }
}

impl<S> AuthService<S> {
    /// [`Service::call`]'s body, inlined also into
    /// [`AuthReplayService`](crate::AuthReplayService)'s `call`, so that the request is not
    /// copied once more on its way in.
    #[inline(always)]
    pub(crate) fn authorize_and_call<B, ResBody>(
        &mut self,
        mut request: Request<B>,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    {
        match self.attach(&mut request) {
            Attach::Skipped => ResponseFuture::called(self.inner.call(request), None),
            Attach::Attached(generation) => {
                let stamp = Stamp {
                    cache: self.shared.cache_id,
                    generation,
                };
                ResponseFuture::called(self.inner.call(request), Some(stamp))
            }
            Attach::MustWait => self.wait_for_token(request, None),
            Attach::Refused(generation) => self.wait_for_token(request, Some(generation)),
        }
    }
}

/// A copy of `header` in an allocation of its own. A clone would share the token's
/// reference count with every service on every core; the kept copy's count is only touched
/// by this service and its clones (usually on one thread), so bumping it per request does
/// not bounce a cache line between cores.
///
/// The buffer gets one spare byte: `bytes` turns a `Vec` with spare capacity into its
/// shared representation at once, whose clone is a plain reference-count increment; an
/// exactly sized one goes through a check of its representation on every clone. (Only
/// speed depends on this; any representation is correct.)
fn private_copy(header: &HeaderValue) -> HeaderValue {
    let bytes = header.as_bytes();
    let mut buffer = Vec::with_capacity(bytes.len() + 1);
    buffer.extend_from_slice(bytes);
    let mut copy = HeaderValue::from_maybe_shared(bytes::Bytes::from(buffer))
        .unwrap_or_else(|_| header.clone());
    copy.set_sensitive(true);
    copy
}

/// What [`AuthService::attach`] did to a request.
enum Attach {
    /// Out of scope, or the caller's own `Authorization`: sent as it is.
    Skipped,
    /// The token of this generation is attached.
    Attached(TokenGeneration),
    /// In scope, but no valid token is cached.
    MustWait,
    /// A replay after the API refused this generation: wait for a newer token.
    Refused(TokenGeneration),
}

impl<S> AuthService<S> {
    /// Attaches a valid cached token to an in-scope request without its own header.
    #[inline]
    fn attach<B>(&mut self, request: &mut Request<B>) -> Attach {
        // The kept header is copied first and inserted last. Its copy comes back from the
        // `bytes` clone written eight bytes at a time; moved into the insert at once, it
        // was read back before those writes had landed, and the read waited for them (a
        // failed store-to-load forward: 7 % of (3)'s time, `--paired`). The checks between
        // give the writes time to land. A request that skips the header (out of scope, its
        // own `Authorization`, a replay) pays for this: the fresh generation's load (and
        // with `check_clock_per_request`, a clock read), and the copy dropped, one
        // reference count up and down on the header this service keeps for itself.
        let fresh = self.shared.cache.fresh_generation();
        let kept = match &self.kept {
            Some(kept)
                if kept.generation.0 == fresh
                    && (!self.shared.check_clock
                        || tokio::time::Instant::now() < kept.refresh_at) =>
            {
                Some((kept.header.clone(), kept.generation))
            }
            _ => None,
        };
        // A lookup for the caller's own header, then an insert: on the small maps requests
        // have, measured faster than one `entry` call. `is_empty` inlines (`contains_key`
        // does not), and many requests (a GET) carry no header at all.
        if !self.shared.scope.contains(request.uri())
            || (!request.headers().is_empty() && request.headers().contains_key(AUTHORIZATION))
        {
            return Attach::Skipped;
        }
        // `is_empty` inlines; most requests carry no extensions at all.
        if !request.extensions().is_empty() {
            if let Some(generation) = self.take_refused(request) {
                return Attach::Refused(generation);
            }
        }
        match kept {
            Some((header, generation)) => {
                request.headers_mut().insert(AUTHORIZATION, header);
                self.shared.cache.count_authorized();
                Attach::Attached(generation)
            }
            None => self.attach_from_cache(request.headers_mut(), fresh),
        }
    }

    /// The refused generation of a request our policy replays, taken out of it. A marker of
    /// another cache (a nested stack's) stays for that stack's service.
    #[cold]
    #[inline(never)]
    fn take_refused<B>(&self, request: &mut Request<B>) -> Option<TokenGeneration> {
        let Refused(stamp) = *request.extensions().get::<Refused>()?;
        if stamp.cache != self.shared.cache_id {
            return None;
        }
        request.extensions_mut().remove::<Refused>();
        Some(stamp.generation)
    }

    /// The token changed since this service last attached one (or it is due for refresh,
    /// or there is none): load it from the cache, and keep its header if it is fresh.
    #[cold]
    #[inline(never)]
    fn attach_from_cache(&mut self, headers: &mut HeaderMap, fresh: u64) -> Attach {
        match self.shared.cache.fresh_header() {
            Some((header, generation, refresh_at)) => {
                // Kept only if it is the fresh generation read before loading it.
                self.kept = (self.reused && generation.0 == fresh).then(|| KeptHeader {
                    generation,
                    header: private_copy(&header),
                    refresh_at,
                });
                self.reused = true;
                headers.insert(AUTHORIZATION, header);
                Attach::Attached(generation)
            }
            None => {
                self.kept = None;
                self.reused = true;
                Attach::MustWait
            }
        }
    }

    /// Hands the ready service and the request to a future that waits for the token: any
    /// valid one, or one newer than the generation the API refused.
    #[cold]
    #[inline(never)]
    fn wait_for_token<B>(
        &mut self,
        request: Request<B>,
        refused: Option<TokenGeneration>,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        // The ready service goes into the future, which calls it once a token is there;
        // this service keeps a fresh clone (tower's usual hand-off).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        if refused.is_none() {
            tracing::debug!(
                target: "genesys_auth_layer::auth",
                "no valid token cached; request waits for one"
            );
        }
        wait_then_call(self.shared.cache.clone(), ready, request, refused)
    }
}

/// A future that waits for a token of `cache` (any valid one, or one newer than the
/// generation the API `refused`), attaches it and calls the `ready` service.
pub(crate) fn wait_then_call<S, B>(
    cache: TokenCache,
    ready: S,
    request: Request<B>,
    refused: Option<TokenGeneration>,
) -> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    let id = cache.id();
    let token = async move {
        let token = match refused {
            Some(generation) => cache.refresh_after_401(generation).await,
            None => cache.token().await,
        };
        if token.is_ok() {
            cache.count_authorized();
        }
        token
    };
    ResponseFuture::waiting(Box::pin(token), id, refused.is_some(), ready, request)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::Uri;
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

    /// Lets spawned tasks (the token's phase timer, a refresh ahead) run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_header_never_outlives_its_token() {
        let source = Counting::default();
        let config = CacheConfig::default()
            .refresh_ahead(Duration::from_secs(10), 0.0)
            .refresh_jitter(0.0);
        let cache = TokenCache::new(source.clone(), config);
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());

        // A clone used for one request does not keep the header (it would never use it).
        let mut once = service.clone();
        assert_eq!(send(&mut once).await, "Bearer token-0");
        assert!(once.kept.is_none());
        // A service used again keeps it from its second visit to the cache on.
        assert_eq!(send(&mut service).await, "Bearer token-0");
        assert!(service.kept.is_none());
        assert_eq!(send(&mut service).await, "Bearer token-0");
        assert_eq!(service.kept.as_ref().map(|k| k.generation.0), Some(1));
        assert_eq!(cache.fresh_generation(), 1);
        // A clone starts without it, and sends the same token.
        let mut clone = service.clone();
        assert!(clone.kept.is_none());
        assert_eq!(send(&mut clone).await, "Bearer token-0");

        // The API refused generation 1: the same service instance must not send it again,
        // not even while the new token is being fetched.
        let refused = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh_after_401(TokenGeneration(1)).await }
        });
        settle().await;
        assert_eq!(cache.fresh_generation(), 0);
        assert_eq!(send(&mut service).await, "Bearer token-1");
        refused.await.unwrap().unwrap();
        assert_eq!(cache.fresh_generation(), 2);

        // In the refresh window the kept header is withdrawn, so the next request sees the
        // token is due and starts one refresh ahead while still sending the valid token.
        tokio::time::advance(Duration::from_secs(91)).await;
        settle().await;
        assert_eq!(cache.fresh_generation(), 0);
        assert_eq!(send(&mut service).await, "Bearer token-1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.0.load(Ordering::SeqCst), 3);
        assert_eq!(send(&mut service).await, "Bearer token-2");
        assert_eq!(cache.fresh_generation(), 3);

        // Idle past expiry: the next request waits for a new token, never the expired one.
        tokio::time::advance(Duration::from_secs(101)).await;
        settle().await;
        assert_eq!(send(&mut service).await, "Bearer token-3");
        assert_eq!(source.0.load(Ordering::SeqCst), 4);
    }

    /// The kept header is copied before the checks that skip a request: a skipped request
    /// must still go out without it, with the clock checked or not.
    #[tokio::test(start_paused = true)]
    async fn a_kept_header_stays_off_requests_it_skips() {
        for check in [false, true] {
            let config = CacheConfig::default().check_clock_per_request(check);
            let cache = TokenCache::new(Counting::default(), config);
            let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
            let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());
            for _ in 0..3 {
                assert_eq!(send(&mut service).await, "Bearer token-0");
            }
            assert!(
                service.kept.is_some(),
                "the header is kept (clock: {check})"
            );
            let authorized = cache.stats().requests_authorized;

            let mut seen = |request: Request<()>| {
                let future = service.call(request);
                async move { future.await.unwrap().into_body() }
            };
            let elsewhere = Request::get("https://example.org/x").body(()).unwrap();
            assert_eq!(seen(elsewhere).await, None, "another host (clock: {check})");
            let own = Request::get("https://api.example.com/x")
                .header(AUTHORIZATION, "Bearer mine")
                .body(())
                .unwrap();
            assert_eq!(
                seen(own).await,
                Some(HeaderValue::from_static("Bearer mine")),
                "the caller's own header (clock: {check})"
            );
            assert_eq!(cache.stats().requests_authorized, authorized);
            // And the kept header still goes on the next request in scope.
            assert_eq!(send(&mut service).await, "Bearer token-0");
            assert_eq!(cache.stats().requests_authorized, authorized + 1);
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
        let source = Counting::new(Duration::from_secs(2), Duration::ZERO);
        let config = CacheConfig::default()
            .refresh_ahead(Duration::from_secs(1), 0.0)
            .refresh_jitter(0.0)
            .fetch_timeout(Duration::from_millis(300))
            .check_clock_per_request(true);
        let cache = TokenCache::new(source.clone(), config);
        let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
        let mut service = AuthLayer::new(cache.clone(), scope).layer(echo());
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
        // In the refresh window: this call starts the refresh ahead, and returns before
        // the runtime runs it.
        std::thread::sleep(Duration::from_millis(1_200));
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
        // Past the expiry and the fetch timeout, the next call drives the refresh.
        std::thread::sleep(Duration::from_millis(1_000));
        assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-1");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats().fetch_failures, 0);
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

    /// A runtime driven only while a call runs (`block_on` per call, as behind a
    /// synchronous facade): between calls nothing runs the token's timer, and a call is
    /// polled before the timers that fell due meanwhile.
    #[test]
    fn a_late_timer_is_caught_when_the_clock_is_checked() {
        for check in [false, true] {
            let runtime = block_on_runtime();
            let setup = || {
                let source = Counting::new(Duration::from_secs(1), Duration::ZERO);
                let config = CacheConfig::default()
                    .refresh_ahead(Duration::from_millis(500), 0.0)
                    .refresh_jitter(0.0)
                    .check_clock_per_request(check);
                let cache = TokenCache::new(source.clone(), config);
                let scope = Scope::new([Uri::from_static("https://api.example.com")]).unwrap();
                let mut service = AuthLayer::new(cache, scope).layer(echo());
                for _ in 0..3 {
                    assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
                }
                (source, service)
            };

            // Past the refresh time (0.5 s), before the expiry (1 s), nothing driven.
            let (source, mut service) = setup();
            std::thread::sleep(std::time::Duration::from_millis(600));
            assert_eq!(runtime.block_on(send(&mut service)), "Bearer token-0");
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
            let refreshed = source.0.load(Ordering::SeqCst) == 2;
            assert_eq!(
                refreshed, check,
                "a refresh ahead started (clock checked: {check})"
            );

            // Past the expiry, nothing driven.
            let (_, mut service) = setup();
            std::thread::sleep(std::time::Duration::from_millis(1_100));
            let sent = runtime.block_on(send(&mut service));
            if check {
                assert_eq!(sent, "Bearer token-1", "never the expired token");
            } else {
                // The documented cost of trusting the timer: the expired token goes out
                // (the API's 401 is then replayed by `RefreshOn401`).
                assert_eq!(sent, "Bearer token-0");
            }
        }
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

        // Successes carry nothing, on each way a header is attached: after waiting, from
        // the cache, and (from the service's second visit to the cache) the kept copy.
        for _ in 0..3 {
            assert_eq!(
                stamp_of(&call(&mut service, in_scope()).await),
                (None, None)
            );
        }
        assert!(service.kept.is_some());

        // The API now refuses every token. A 401 to the kept header is stamped, and the
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
        assert_eq!(stats.unauthorized_answers, 3, "every 401 counted");
        assert_eq!(stats.unauthorized_reported, 0, "none replayed");

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
        assert_eq!(
            cache.stats().unauthorized_answers,
            3,
            "not ours: not counted"
        );
    }

    #[test]
    fn debug_shows_the_kept_generation_not_the_token() {
        let kept = KeptHeader {
            generation: TokenGeneration(7),
            header: HeaderValue::from_static("Bearer secret-value"),
            refresh_at: tokio::time::Instant::now(),
        };
        let shown = format!("{kept:?}");
        assert!(shown.contains('7') && !shown.contains("secret"), "{shown}");
    }
}
