//! A local stand-in for Genesys Cloud's login host and API host, for tests,
//! examples and benchmarks of OAuth client code.
//!
//! [`FakeGenesys::start`] binds two real HTTP servers on `127.0.0.1:0` (one for the
//! login host, one for the API host, so they have different origins). Both speak
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c), and allow 20,000 concurrent
//! HTTP/2 streams per connection.
//!
//! * Login host: `POST /oauth/token` with the client-credentials grant; client
//!   authentication with HTTP Basic (id and secret form-urlencoded, RFC 6749 §2.3.1) or
//!   `client_id`/`client_secret` form fields; a primary and an optional secondary secret;
//!   Genesys' error JSON (`error`, `description`, `error_description`).
//! * Login for a person: `GET /oauth/authorize` shows a login page (pick one of the
//!   [`FakeUser`]s, submit) or, with [`FakeGenesys::set_auto_approve`], sends the browser
//!   straight back with a code; `POST /oauth/token` also takes the `authorization_code`
//!   grant (HTTP Basic, or PKCE with `client_id` and `code_verifier`) and the
//!   `refresh_token` grant. Codes are single-use, bound to the client, `redirect_uri` and
//!   PKCE challenge, and short-lived ([`DEFAULT_CODE_LIFETIME`]); refresh tokens rotate
//!   (configurable) and a superseded one is refused and counted.
//! * API host: every path under `/api/` checks `Authorization: Bearer …` and answers
//!   Genesys' 401 body otherwise. Routes: `GET /api/v2/organizations/me`,
//!   `GET /api/v2/users/me` (the user a token was issued for; `400` for a
//!   client-credentials token), `GET`/`DELETE /api/v2/tokens/me` (`DELETE` with a user's
//!   token ends that login session, its refresh token included), `/api/v2/echo` (any method, returns the body),
//!   `GET /api/v2/ping`. Every API answer carries an `ININ-Correlation-Id` header.
//!
//! Knobs, all changeable while the fake runs:
//!
//! * token lifetime, token-endpoint and API latencies;
//! * a rate limit on the token endpoint ([`FakeBuilder::rate_limit`]);
//! * API rate limits like Genesys', per token, per client and per org ([`ApiLimits`]; off
//!   by default, [`ApiLimits::genesys`] for the real ones), answered with Genesys' 429;
//! * scripted [`TokenFault`]s on the token endpoint and [`ApiFault`]s (502, 503, 504,
//!   429, with or without `Retry-After`) on the API host;
//! * revocation, secret rotation, client deletion.
//!
//! Counters (token requests, tokens issued, API requests, 401s, 429s by scope, scripted
//! faults answered, connections) are readable from the handle. [`FakeGenesys::service`]
//! gives the same behaviour as an in-process [`tower::Service`] for tests that run with
//! paused tokio time.
//!
//! With the cargo feature `auth-layer`, [`FakeGenesys::auth_builder`] hands back a
//! `genesys_auth_layer::GenesysAuthBuilder` already pointed at the fake.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use genesys_fake::FakeGenesys;
//!
//! let fake = FakeGenesys::start().await.unwrap();
//! assert_eq!(fake.token_url().path(), "/oauth/token");
//! assert_ne!(fake.login_uri(), fake.api_uri());
//! assert_eq!(fake.client_id(), "fake-client-id");
//! fake.shutdown().await;
//! # });
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod fault;
mod handler;
mod limit;
mod login;
mod server;
mod state;
mod users;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use tokio::task::JoinHandle;

pub use body::FakeBody;
pub use fault::{ApiFault, ConnectionClosed, TokenFault};
pub use limit::{
    ApiLimitScope, ApiLimits, GENESYS_CLIENT_RATE_PER_MINUTE, GENESYS_TOKEN_RATE_PER_MINUTE,
};
pub use login::DEFAULT_CODE_LIFETIME;
pub use state::RecordedRequest;
pub use users::FakeUser;

use handler::Host;
use state::{lock, nanos, Inner};

/// A boxed, thread-safe error, as used by tower and hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Default client id.
pub const DEFAULT_CLIENT_ID: &str = "fake-client-id";
/// Default client secret.
pub const DEFAULT_CLIENT_SECRET: &str = "fake-client-secret";
/// Default token lifetime (Genesys' usual `expires_in`).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_399);

/// Login URI reported by a fake built with [`FakeBuilder::build_in_process`].
pub const IN_PROCESS_LOGIN_URI: &str = "http://login.fake.invalid";
/// API URI reported by a fake built with [`FakeBuilder::build_in_process`].
pub const IN_PROCESS_API_URI: &str = "http://api.fake.invalid";

struct Shared {
    inner: Arc<Inner>,
    login_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    login_uri: Uri,
    api_uri: Uri,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// A running fake Genesys Cloud (login host + API host).
///
/// Cheap to clone (an `Arc` inside); every clone controls the same fake.
/// The listeners stop when [`shutdown`](Self::shutdown) is called or when the last
/// clone is dropped. A [`FakeService`] obtained from [`service`](Self::service) keeps
/// working (it needs no sockets) after that.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use genesys_fake::{FakeGenesys, TokenFault};
///
/// let fake = FakeGenesys::builder()
///     .client("my-id", "my-secret")
///     .token_lifetime(Duration::from_secs(60))
///     .start()
///     .await
///     .unwrap();
/// fake.push_token_faults([TokenFault::Status(503)]);
/// fake.set_api_latency(Duration::from_millis(1));
/// assert_eq!(fake.client_secret(), "my-secret");
/// assert_eq!(fake.token_requests(), 0);
/// fake.shutdown().await;
/// # });
/// ```
#[derive(Clone)]
pub struct FakeGenesys {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FakeGenesys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGenesys")
            .field("login_uri", &self.shared.login_uri)
            .field("api_uri", &self.shared.api_uri)
            .field("client_id", &self.client_id())
            .finish_non_exhaustive()
    }
}

/// Configures a [`FakeGenesys`] before it starts.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use genesys_fake::FakeGenesys;
///
/// let fake = FakeGenesys::builder()
///     .token_latency(Duration::from_millis(5))
///     .rate_limit(10, Duration::from_secs(1))
///     .start()
///     .await
///     .unwrap();
/// assert_eq!(fake.login_uri().host(), Some("127.0.0.1"));
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct FakeBuilder {
    client_id: String,
    client_secret: String,
    token_lifetime: Duration,
    token_latency: Duration,
    api_latency: Duration,
    rate_limit: Option<(u32, Duration)>,
    api_limits: ApiLimits,
}

impl Default for FakeBuilder {
    fn default() -> Self {
        FakeBuilder {
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            client_secret: DEFAULT_CLIENT_SECRET.to_owned(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            token_latency: Duration::ZERO,
            api_latency: Duration::ZERO,
            rate_limit: None,
            api_limits: ApiLimits::default(),
        }
    }
}

impl FakeBuilder {
    /// The OAuth client's id and (primary) secret. Default
    /// [`DEFAULT_CLIENT_ID`] / [`DEFAULT_CLIENT_SECRET`].
    pub fn client(mut self, id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.client_id = id.into();
        self.client_secret = secret.into();
        self
    }

    /// Lifetime of issued tokens. Default [`DEFAULT_TOKEN_LIFETIME`] (86,399 s).
    pub fn token_lifetime(mut self, d: Duration) -> Self {
        self.token_lifetime = d;
        self
    }

    /// Delay before the token endpoint answers. Default zero.
    pub fn token_latency(mut self, d: Duration) -> Self {
        self.token_latency = d;
        self
    }

    /// Delay before the API host answers. Default zero.
    pub fn api_latency(mut self, d: Duration) -> Self {
        self.api_latency = d;
        self
    }

    /// At most `n` token requests per window of `per`; beyond that, 429. Default none.
    pub fn rate_limit(mut self, n: u32, per: Duration) -> Self {
        self.rate_limit = Some((n, per));
        self
    }

    /// Rate limits on API requests, per token, per client and per org. Default
    /// [`ApiLimits::default`]: none, so tests and benchmarks that push thousands of
    /// requests through one token keep working; [`ApiLimits::genesys`] gives Genesys'
    /// documented limits. See [`FakeGenesys::set_api_limits`].
    pub fn api_limits(mut self, limits: ApiLimits) -> Self {
        self.api_limits = limits;
        self
    }

    fn inner(self) -> Arc<Inner> {
        Arc::new(Inner::new(
            self.client_id,
            self.client_secret,
            self.token_lifetime,
            self.token_latency,
            self.api_latency,
            self.rate_limit,
            self.api_limits,
        ))
    }

    /// Binds the login host and the API host on `127.0.0.1:0` and starts serving.
    ///
    /// Must be called within a tokio runtime (the servers are spawned onto it).
    pub async fn start(self) -> std::io::Result<FakeGenesys> {
        let inner = self.inner();
        let (login_addr, login_task) = server::listen(inner.clone(), Host::Login).await?;
        let (api_addr, api_task) = match server::listen(inner.clone(), Host::Api).await {
            Ok(v) => v,
            Err(e) => {
                login_task.abort();
                return Err(e);
            }
        };
        let uri = |addr: SocketAddr| -> Uri {
            format!("http://{addr}")
                .parse()
                .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1"))
        };
        Ok(FakeGenesys {
            shared: Arc::new(Shared {
                inner,
                login_uri: uri(login_addr),
                api_uri: uri(api_addr),
                login_addr: Some(login_addr),
                api_addr: Some(api_addr),
                tasks: Mutex::new(vec![login_task, api_task]),
            }),
        })
    }

    /// Builds a fake without any listener: only [`FakeGenesys::service`] answers.
    ///
    /// [`FakeGenesys::login_uri`] and [`FakeGenesys::api_uri`] then return the
    /// placeholders [`IN_PROCESS_LOGIN_URI`] and [`IN_PROCESS_API_URI`] (the service
    /// routes by path only, so any authority works). Needs no runtime to build, which
    /// makes it the choice for tests with paused tokio time.
    ///
    /// ```
    /// use genesys_fake::FakeGenesys;
    /// let fake = FakeGenesys::builder().build_in_process();
    /// assert_eq!(fake.token_url(), "http://login.fake.invalid/oauth/token");
    /// assert_eq!(fake.login_addr(), None);
    /// ```
    pub fn build_in_process(self) -> FakeGenesys {
        FakeGenesys {
            shared: Arc::new(Shared {
                inner: self.inner(),
                login_addr: None,
                api_addr: None,
                login_uri: Uri::from_static(IN_PROCESS_LOGIN_URI),
                api_uri: Uri::from_static(IN_PROCESS_API_URI),
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl FakeGenesys {
    /// A [`FakeBuilder`] with the defaults.
    pub fn builder() -> FakeBuilder {
        FakeBuilder::default()
    }

    /// Starts a fake with the defaults; same as `FakeGenesys::builder().start()`.
    pub async fn start() -> std::io::Result<FakeGenesys> {
        Self::builder().start().await
    }

    fn inner(&self) -> &Inner {
        &self.shared.inner
    }

    /// The login host, `http://127.0.0.1:PORT` (its path is `/`).
    pub fn login_uri(&self) -> Uri {
        self.shared.login_uri.clone()
    }

    /// The API host, `http://127.0.0.1:OTHERPORT` (its path is `/`).
    pub fn api_uri(&self) -> Uri {
        self.shared.api_uri.clone()
    }

    /// The token endpoint: [`login_uri`](Self::login_uri) + `/oauth/token`.
    pub fn token_url(&self) -> Uri {
        let mut parts = self.shared.login_uri.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/oauth/token"));
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/oauth/token"))
    }

    /// A [`GenesysAuthBuilder`](genesys_auth_layer::GenesysAuthBuilder) already pointed at
    /// this fake: its client id and current secret, its login URI for token requests and
    /// its API URI as the origin tokens are attached to. Add settings, then `build(…)`
    /// with an HTTP client (plain HTTP on loopback).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use genesys_fake::FakeGenesys;
    ///
    /// let fake = FakeGenesys::start().await.unwrap();
    /// let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
    ///     .build_http::<http_body_util::Full<bytes::Bytes>>();
    /// let auth = fake.auth_builder().build(http).unwrap();
    /// auth.token().await.unwrap();
    /// assert_eq!(fake.token_requests(), 1);
    /// assert!(auth.scope().contains(&fake.api_uri()));
    /// # });
    /// ```
    #[cfg(feature = "auth-layer")]
    #[cfg_attr(docsrs, doc(cfg(feature = "auth-layer")))]
    pub fn auth_builder(&self) -> genesys_auth_layer::GenesysAuthBuilder {
        genesys_auth_layer::GenesysAuth::client_credentials(self.client_id(), self.client_secret())
            .login_uri(self.login_uri())
            .api_uri(self.api_uri())
    }

    /// The login host's socket address (`None` for an in-process fake).
    pub fn login_addr(&self) -> Option<SocketAddr> {
        self.shared.login_addr
    }

    /// The API host's socket address (`None` for an in-process fake).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.shared.api_addr
    }

    /// The OAuth client id.
    pub fn client_id(&self) -> String {
        lock(&self.inner().client).id.clone()
    }

    /// The current primary secret.
    pub fn client_secret(&self) -> String {
        lock(&self.inner().client).primary.clone()
    }

    /// The current secondary secret, if any.
    pub fn secondary_secret(&self) -> Option<String> {
        lock(&self.inner().client).secondary.clone()
    }

    /// Requests that reached `/oauth/token`, whatever the answer.
    pub fn token_requests(&self) -> u64 {
        self.inner().token_requests.load(Ordering::Relaxed)
    }

    /// Successful (200) token answers with a token the fake issued
    /// (200s produced by a [`TokenFault`] are not counted).
    pub fn tokens_issued(&self) -> u64 {
        self.inner().tokens_issued.load(Ordering::Relaxed)
    }

    /// Requests to the API host (in-process: to paths under `/api`), whatever the
    /// answer (including 401s, 429s and scripted faults).
    pub fn api_requests(&self) -> u64 {
        self.inner().api_requests.load(Ordering::Relaxed)
    }

    /// API requests refused with 429 by the [`ApiLimits`] (not counting
    /// [`ApiFault::RateLimited`]).
    pub fn api_rate_limited(&self) -> u64 {
        self.inner().api_rate_limited.load(Ordering::Relaxed)
    }

    /// API requests refused because this scope's window was full. A request refused by
    /// two full scopes at once counts in both (and once in
    /// [`api_rate_limited`](Self::api_rate_limited)).
    pub fn api_rate_limited_by(&self, scope: ApiLimitScope) -> u64 {
        self.inner()
            .api_rate_limited_by(scope)
            .load(Ordering::Relaxed)
    }

    /// API requests answered with a scripted [`ApiFault`].
    pub fn api_faults_answered(&self) -> u64 {
        self.inner().api_faults_answered.load(Ordering::Relaxed)
    }

    /// 401s answered by the API host.
    pub fn api_unauthorized(&self) -> u64 {
        self.inner().api_unauthorized.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far by both listeners.
    pub fn connections_accepted(&self) -> u64 {
        self.inner().connections.load(Ordering::Relaxed)
    }

    /// Sets every counter (including [`connections_accepted`](Self::connections_accepted))
    /// back to zero.
    pub fn reset_counters(&self) {
        let i = self.inner();
        for c in [
            &i.token_requests,
            &i.tokens_issued,
            &i.api_requests,
            &i.api_unauthorized,
            &i.api_rate_limited,
            &i.api_faults_answered,
            &i.connections,
        ]
        .into_iter()
        .chain(&i.api_rate_limited_by)
        {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Lifetime of tokens issued from now on. `expires_in` is sent in whole seconds,
    /// rounded up, at least 1; the token itself expires after exactly `d`.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.inner()
            .token_lifetime
            .store(nanos(d), Ordering::Relaxed);
    }

    /// Delay (`tokio::time::sleep`) before the token endpoint answers, after faults and
    /// the rate limit were applied.
    pub fn set_token_latency(&self, d: Duration) {
        self.inner()
            .token_latency
            .store(nanos(d), Ordering::Relaxed);
    }

    /// Delay before the API host answers.
    pub fn set_api_latency(&self, d: Duration) {
        self.inner().api_latency.store(nanos(d), Ordering::Relaxed);
    }

    /// At most `n` token requests per window (fixed windows, the first starting with the
    /// first request after this call); beyond that, 429 with `Retry-After` in whole
    /// seconds until the window ends (at least 1) and Genesys' error JSON. `None` lifts
    /// the limit.
    pub fn set_rate_limit(&self, limit: Option<(u32, Duration)>) {
        let mut r = lock(&self.inner().rate);
        r.limit = limit;
        r.window_end = None;
        r.count = 0;
    }

    /// Replaces the API rate limits (see [`ApiLimits`]) and starts every window afresh.
    ///
    /// Requests that carry a valid token count against the limits of their token, of the
    /// client the token was issued to, and of the org. A request beyond any of them is
    /// not processed (it reaches no route) and is answered as Genesys does (GENESYS.md,
    /// "Rate limits"): status 429, `Retry-After` in whole seconds until the full window
    /// ends (at least 1; with several full windows, the one that ends last), an
    /// `ININ-Correlation-Id` header and the body
    /// `{"message":"Rate limit exceeded the maximum. Retry the request in [N] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"<the correlation id>","details":[],"errors":[]}`.
    /// It is counted in [`api_rate_limited`](Self::api_rate_limited) and
    /// [`api_rate_limited_by`](Self::api_rate_limited_by), and recorded. Requests without
    /// a valid token get their 401 and count nowhere.
    ///
    /// Windows run on tokio's clock, so tests with paused time control them.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use genesys_fake::{ApiLimitScope, ApiLimits, FakeGenesys};
    /// use tower::ServiceExt;
    ///
    /// let fake = FakeGenesys::builder().build_in_process();
    /// fake.set_api_limits(ApiLimits {
    ///     per_token: Some((1, Duration::from_secs(10))),
    ///     ..ApiLimits::default()
    /// });
    /// let token = fake.issue_token();
    /// let ping = || {
    ///     http::Request::get("/api/v2/ping")
    ///         .header("authorization", format!("Bearer {token}"))
    ///         .body(http_body_util::Empty::<bytes::Bytes>::new())
    ///         .unwrap()
    /// };
    /// assert_eq!(fake.service().oneshot(ping()).await.unwrap().status(), 200);
    /// let res = fake.service().oneshot(ping()).await.unwrap();
    /// assert_eq!(res.status(), 429);
    /// assert_eq!(res.headers()["retry-after"], "10");
    /// assert_eq!(fake.api_rate_limited_by(ApiLimitScope::Token), 1);
    /// # });
    /// ```
    pub fn set_api_limits(&self, limits: ApiLimits) {
        lock(&self.inner().api_limiter).set_limits(limits);
    }

    /// The API rate limits in force.
    pub fn api_limits(&self) -> ApiLimits {
        lock(&self.inner().api_limiter).limits()
    }

    /// Queues API faults: each following API request consumes one, in order (see
    /// [`ApiFault`]).
    pub fn push_api_faults(&self, faults: impl IntoIterator<Item = ApiFault>) {
        lock(&self.inner().api_faults).extend(faults);
    }

    /// Queued API faults not yet consumed.
    pub fn pending_api_faults(&self) -> usize {
        lock(&self.inner().api_faults).len()
    }

    /// Drops every queued API fault.
    pub fn clear_api_faults(&self) {
        lock(&self.inner().api_faults).clear();
    }

    /// Queues faults: each following token request consumes one, in order.
    pub fn push_token_faults(&self, faults: impl IntoIterator<Item = TokenFault>) {
        lock(&self.inner().faults).queue.extend(faults);
    }

    /// Queued faults not yet consumed.
    pub fn pending_token_faults(&self) -> usize {
        lock(&self.inner().faults).queue.len()
    }

    /// Drops every queued fault (the persistent one stays).
    pub fn clear_token_faults(&self) {
        lock(&self.inner().faults).queue.clear();
    }

    /// Every token request answers with this fault until cleared with `None`
    /// (queued faults take precedence).
    pub fn set_persistent_token_fault(&self, fault: Option<TokenFault>) {
        lock(&self.inner().faults).persistent = fault;
    }

    /// Every token issued so far gets 401 at the API from now on. Refresh tokens stay
    /// valid (see [`revoke_user`](Self::revoke_user) to end a user's sessions).
    pub fn revoke_all_tokens(&self) {
        self.inner().revoke_all();
    }

    /// This token gets 401 at the API from now on.
    pub fn revoke_token(&self, access_token: &str) {
        self.inner().revoke(access_token);
    }

    /// Issues a valid token directly, without a token request (not counted).
    pub fn issue_token(&self) -> String {
        self.inner().issue_token().0
    }

    /// Whether the API host would accept this token now.
    pub fn token_is_valid(&self, access_token: &str) -> bool {
        self.inner().token_valid(access_token)
    }

    /// Lets the client also authenticate with `secret` (replaces any secondary secret).
    pub fn add_secondary_secret(&self, secret: &str) {
        lock(&self.inner().client).secondary = Some(secret.to_owned());
    }

    /// Swaps the secrets: the secondary becomes primary, the old primary becomes
    /// secondary. Does nothing without a secondary secret.
    pub fn promote_secondary_secret(&self) {
        let mut c = lock(&self.inner().client);
        if let Some(secondary) = c.secondary.take() {
            let old = std::mem::replace(&mut c.primary, secondary);
            c.secondary = Some(old);
        }
    }

    /// Removes the secondary secret; only the primary authenticates from now on.
    pub fn remove_secondary_secret(&self) {
        lock(&self.inner().client).secondary = None;
    }

    /// Replaces the primary secret (the secondary is unchanged).
    pub fn set_primary_secret(&self, secret: &str) {
        lock(&self.inner().client).primary = secret.to_owned();
    }

    /// Deletes the OAuth client: token requests answer 401 `invalid_client`.
    /// Tokens already issued stay valid.
    pub fn delete_client(&self) {
        lock(&self.inner().client).deleted = true;
    }

    /// Undoes [`delete_client`](Self::delete_client).
    pub fn restore_client(&self) {
        lock(&self.inner().client).deleted = false;
    }

    /// The API requests answered so far (the last 100,000 at most), oldest first,
    /// including the ones answered 401, refused with 429 or answered with an [`ApiFault`].
    pub fn recorded_api_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner().recorded).iter().cloned().collect()
    }

    /// Forgets the recorded API requests.
    pub fn clear_recorded(&self) {
        lock(&self.inner().recorded).clear();
    }

    /// Stops accepting connections and aborts every connection task. Other clones of
    /// the handle keep working for everything but the listeners ([`service`](Self::service),
    /// knobs, counters).
    pub async fn shutdown(self) {
        let tasks: Vec<_> = lock(&self.shared.tasks).drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// An in-process [`tower::Service`] (no sockets) that answers exactly like the
    /// login host and the API host, routing by path: `/oauth/token` to the login logic,
    /// `/api` and `/api/...` to the API logic, anything else 404. It shares all state
    /// (tokens, knobs, counters, recordings) with this fake.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use genesys_fake::FakeGenesys;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::ServiceExt;
    ///
    /// let fake = FakeGenesys::builder().build_in_process();
    /// let req = http::Request::post(fake.token_url())
    ///     .header("content-type", "application/x-www-form-urlencoded")
    ///     .body(Full::new(bytes::Bytes::from(format!(
    ///         "grant_type=client_credentials&client_id={}&client_secret={}",
    ///         fake.client_id(),
    ///         fake.client_secret()
    ///     ))))
    ///     .unwrap();
    /// let res = fake.service().oneshot(req).await.unwrap();
    /// assert_eq!(res.status(), 200);
    /// let body = res.into_body().collect().await.unwrap().to_bytes();
    /// let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    /// assert_eq!(json["token_type"], "bearer");
    /// assert_eq!(fake.tokens_issued(), 1);
    /// # });
    /// ```
    pub fn service(&self) -> FakeService {
        FakeService {
            inner: self.shared.inner.clone(),
        }
    }
}

/// The in-process fake: a [`tower::Service`] answering like both hosts.
/// Obtain it from [`FakeGenesys::service`].
///
/// Responses have the body [`FakeBody`]. Errors are only produced for
/// [`TokenFault::CloseConnection`] (a boxed [`ConnectionClosed`]). The service is always
/// ready.
#[derive(Clone)]
pub struct FakeService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeService").finish_non_exhaustive()
    }
}

/// The future returned by [`FakeService`].
pub type FakeFuture = Pin<Box<dyn Future<Output = Result<Response<FakeBody>, BoxError>> + Send>>;

impl<B> tower::Service<Request<B>> for FakeService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FakeBody>;
    type Error = BoxError;
    type Future = FakeFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(handler::handle(self.inner.clone(), Host::Any, req))
    }
}
