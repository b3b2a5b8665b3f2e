//! The token cell.
//!
//! This module owns [`TokenCache`]: the current token in an `arc-swap` cell that requests
//! read without a lock, and the slow path that replaces it: single-flight refresh with a
//! shared outcome, refresh ahead of expiry, generation-scoped invalidation after a 401, and
//! backoff after failures. It must never hold its lock across an `.await` or while a token
//! source runs, never let two token requests be in flight at once, and never let a caller
//! wait without a bound.
//!
//! # Why it is correct
//!
//! * **A request decides alone.** It loads the current token and reads the clock once:
//!   before the token's refresh instant it is sent; between refresh and expiry it is sent
//!   and a refresh ahead is started unless one runs or a backoff forbids it; past expiry,
//!   or with no token, the request waits for a refresh. No timer, kept copy or flag takes
//!   part in that decision.
//! * **One lock for the slow path.** Which refresh is in flight, the backoff, and the token
//!   the API refused change only under `state`'s mutex, held for a few instructions.
//! * **A refresh is one shared future**, kept in `state` while it runs. A task spawned on
//!   the runtime that started it drives it, and so does every caller waiting for it
//!   (`futures_util`'s `Shared`): a refresh never depends on one runtime still running, and
//!   dropping one waiter cancels nothing. It ends at the fetch timeout; each waiter also
//!   bounds its own wait (in case the timer's runtime has stopped), and the first to give
//!   up records the failure.
//! * **Its outcome is decided once**, in `complete`, under the lock: a success becomes the
//!   next generation; a failure starts the backoff and, if a 401 had withdrawn a token that
//!   is still within its lifetime, puts that token back (due for refresh) so requests keep
//!   using it.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::{FutureExt, Shared};
use http::HeaderValue;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{AuthError, InvalidTokenResponse};
use crate::observe::{CacheStats, Counters, Health};
use crate::source::{BoxFuture, TokenSource};
use crate::token::{IssuedToken, Token, TokenGeneration, MAX_TOKEN_LIFETIME};

/// Refresh at least this long before expiry. Genesys tokens live for hours; a minute
/// covers a slow token endpoint, a retry or two, and clock drift between hosts.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// ... or this share of the token's lifetime, if larger (10 %: 2.4 h of a 24 h token).
pub const DEFAULT_REFRESH_AHEAD_FRACTION: f64 = 0.10;
/// Up to this share of the refresh window is added at random, so that a fleet started
/// together does not refresh in lock-step.
pub const DEFAULT_REFRESH_JITTER: f64 = 0.25;
/// How long one token request may take, body included. Every caller waiting on a refresh
/// gets an answer within this bound and a second.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed token request; doubled per consecutive failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between failed token requests, and the wait after a fatal answer
/// (`invalid_client`, …): a deleted or misconfigured client costs about one token request a
/// minute, never a loop, yet recovers without a restart once it is fixed.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The shortest backoff after a failure: a floor so that no configuration turns a failing
/// token endpoint into a loop of requests.
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// The shortest refresh window (see [`CacheConfig::refresh_ahead`]).
pub const MIN_REFRESH_WINDOW: Duration = Duration::from_secs(1);
/// The longest `Retry-After` (of a 429 or a 503 from the token endpoint) that is honoured
/// as it is; a longer one waits this long. Genesys asks for seconds; ten minutes bounds a
/// mistaken or hostile header while still letting the server spread a fleet's retries over
/// several minutes.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(10 * 60);
/// The longest backoff accepted.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);
/// How much longer than the fetch timeout a caller waits for a refresh before giving up on
/// it: the task driving the refresh normally gives up first.
const WAIT_GRACE: Duration = Duration::from_secs(1);

/// How a [`TokenCache`] refreshes and backs off. Every field has a documented default.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::CacheConfig;
///
/// let config = CacheConfig::default()
///     .refresh_ahead(Duration::from_secs(120), 0.2)
///     .fetch_timeout(Duration::from_secs(5))
///     .backoff(Duration::from_millis(500), Duration::from_secs(30))
///     .name("org-emea");
/// assert_eq!(config.fetch_timeout_value(), Duration::from_secs(5));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    refresh_ahead: Duration,
    refresh_ahead_fraction: f64,
    refresh_jitter: f64,
    fetch_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    name: Option<Arc<str>>,
    refresh_while_idle: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            refresh_ahead_fraction: DEFAULT_REFRESH_AHEAD_FRACTION,
            refresh_jitter: DEFAULT_REFRESH_JITTER,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            name: None,
            refresh_while_idle: false,
        }
    }
}

impl CacheConfig {
    /// Refresh once the remaining life is under `max(at_least, fraction × lifetime)`, but
    /// never earlier than half-way through the lifetime. `fraction` is clamped to `0..=0.5`.
    ///
    /// The window is never shorter than [`MIN_REFRESH_WINDOW`] (or a tenth of the lifetime,
    /// if that is shorter), so that a token is refreshed ahead rather than at its expiry.
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::{CacheConfig, TokenCache};
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
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// // Five minutes before expiry, with no share of the lifetime and no jitter:
    /// let config = CacheConfig::default()
    ///     .refresh_ahead(Duration::from_secs(300), 0.0)
    ///     .refresh_jitter(0.0);
    /// let cache = TokenCache::new(Fixed, config);
    /// let token = cache.token().await?; // a one-hour token
    /// assert_eq!(token.expires_at() - token.refresh_at(), Duration::from_secs(300));
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn refresh_ahead(mut self, at_least: Duration, fraction: f64) -> Self {
        self.refresh_ahead = at_least.min(MAX_TOKEN_LIFETIME);
        self.refresh_ahead_fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 0.5)
        } else {
            0.0
        };
        self
    }

    /// Adds up to `share` (clamped to `0..=1`) of the refresh window at random, per token
    /// (default [`DEFAULT_REFRESH_JITTER`]); `0.0` makes refresh times exact, for tests.
    pub fn refresh_jitter(mut self, share: f64) -> Self {
        self.refresh_jitter = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// How long one token request may take (default [`DEFAULT_FETCH_TIMEOUT`]; clamped to
    /// 1 ms – 1 h). A caller waiting for a refresh gets an answer within this and a second.
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self
    }

    /// The fetch timeout in force.
    pub fn fetch_timeout_value(&self) -> Duration {
        self.fetch_timeout
    }

    /// Exponential backoff between failed token requests: `initial`, doubling, capped at
    /// `max` (each wait between half and all of that, at random). A fatal answer
    /// (`invalid_client`, `invalid_scope`, …, see [`AuthError::is_fatal`]) waits `max` at
    /// once; rotating the credentials ends that wait. A `Retry-After` on a 429 or a 503
    /// replaces the backoff, honoured from `initial` up to [`RETRY_AFTER_CAP`].
    ///
    /// `initial` is at least [`MIN_BACKOFF`] (no failure may turn into a loop of token
    /// requests), `max` at most one day and never below `initial`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial.clamp(MIN_BACKOFF, MAX_BACKOFF);
        self.backoff_max = max.clamp(self.backoff_initial, MAX_BACKOFF);
        self
    }

    /// Whether the cache refreshes ahead of expiry even when no request comes (default:
    /// `false`, a request in the refresh window starts it).
    ///
    /// With `true`, one task per cache sleeps until the token's refresh instant and starts
    /// the refresh itself, so a client idle for longer than a token's lifetime still finds
    /// a valid token on its next request, at the price of a token request per lifetime while
    /// the cache exists, used or not. If the refresh fails, the task tries again each time
    /// the backoff allows, until a new token arrives or the old one expires; then requests
    /// take over, as without the option.
    pub fn refresh_while_idle(mut self, enabled: bool) -> Self {
        self.refresh_while_idle = enabled;
        self
    }

    /// Whether [`refresh_while_idle`](Self::refresh_while_idle) is on.
    pub fn refreshes_while_idle(&self) -> bool {
        self.refresh_while_idle
    }

    /// Names this cache in what operators see: the `cache` label of every `metrics` series
    /// it publishes (feature `metrics`) and the `cache` field of its `token_fetch` spans.
    /// Without a name the series carry no `cache` label, so two caches in one process (two
    /// organisations, say) add to the same series; name them to tell them apart.
    ///
    /// A name is shown in telemetry: never put a secret in it.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(Arc::from(name.into()));
        self
    }

    /// The name given with [`name`](Self::name), if any.
    pub fn name_value(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// How long before expiry a token of `lifetime` starts being refreshed.
    fn refresh_window(&self, lifetime: Duration) -> Duration {
        let base = self
            .refresh_ahead
            .max(lifetime.mul_f64(self.refresh_ahead_fraction));
        let jittered = base + base.mul_f64(self.refresh_jitter * random_fraction());
        jittered
            .max(MIN_REFRESH_WINDOW.min(lifetime / 10))
            .min(lifetime / 2)
    }

    /// How long to wait after the `consecutive`-th failure in a row, `error`.
    fn backoff_after(&self, consecutive: u32, error: &AuthError) -> Duration {
        if error.is_fatal() {
            // Retrying sooner cannot help: only a changed configuration can.
            return self.backoff_max;
        }
        if let Some(asked) = error.retry_after() {
            // The server knows best, within reason (a 429's or a 503's `Retry-After`).
            return asked.max(self.backoff_initial).min(RETRY_AFTER_CAP);
        }
        equal_jitter_backoff(self.backoff_initial, self.backoff_max, consecutive).max(MIN_BACKOFF)
    }
}

/// The wait before the `attempt`-th retry (from 1): `initial` doubled per attempt, capped at
/// `max`, with "equal jitter": between half and all of that, so that a fleet that failed
/// together spreads its retries, yet never retries sooner than half of it. Shared by the
/// token cache's backoff and [`ApiRetry`](crate::ApiRetry)'s.
pub(crate) fn equal_jitter_backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let doubled = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = doubled.min(max);
    capped / 2 + (capped / 2).mul_f64(random_fraction())
}

/// A number in `[0, 1)` that differs from call to call: enough randomness to spread a
/// fleet's refreshes, with no dependency for it.
fn random_fraction() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a token request was made, as recorded in `tracing` (the `reason` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshReason {
    /// No valid token was cached.
    Initial,
    /// The token entered its refresh window.
    AheadOfExpiry,
    /// The API refused the token (401).
    After401,
}

impl RefreshReason {
    /// The name used in `tracing` fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::AheadOfExpiry => "ahead-of-expiry",
            Self::After401 => "after-401",
        }
    }
}

type Outcome = Result<Arc<Token>, AuthError>;
/// A refresh in flight: one token request whose outcome every poller shares.
type Refresh = Shared<BoxFuture<'static, Outcome>>;

/// Which cache a stamp or a policy refers to; ids are never reused in a process.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    /// The token requests use; `None` before the first, after a 401 withdrew it, or never
    /// (an expired token stays until replaced: requests check its expiry).
    current: ArcSwapOption<Token>,
    state: Mutex<State>,
    source: Arc<dyn TokenSource>,
    /// Shared by the caches made alike (a pool's slots, the users of a `UserTokenCache`).
    config: Arc<CacheConfig>,
    /// Shared by the users of a `UserTokenCache` (their counters add up there).
    counters: Arc<Counters>,
}

/// The slow path's state, changed only under `Inner::state`'s lock.
struct State {
    in_flight: Option<InFlight>,
    failure: Option<Failure>,
    /// The token a 401 withdrew from `current`, put back if its refresh fails while it is
    /// still within its lifetime.
    refused: Option<Arc<Token>>,
    refreshes_started: u64,
    last_generation: u64,
    last_success: Option<Instant>,
    last_error: Option<(Instant, Arc<AuthError>)>,
    /// The `refresh_while_idle` task, once started (it ends when no valid token is left,
    /// or with its runtime; the next token starts another).
    idle_task: Option<tokio::task::AbortHandle>,
}

struct InFlight {
    id: u64,
    outcome: Refresh,
    /// The source's credentials version when it started: a fatal answer is about these.
    credentials: u64,
}

/// The last failures in a row, and when the next token request may go out.
struct Failure {
    error: Arc<AuthError>,
    consecutive: u32,
    since: Instant,
    retry_at: Instant,
    /// For a fatal error, the source's credentials version when it happened: a rotation
    /// since then ends the wait.
    credentials: Option<u64>,
}

/// A refresh just marked in flight, whose driving task is spawned once the lock is free.
struct Started {
    id: u64,
    outcome: Refresh,
    runtime: tokio::runtime::Handle,
}

/// The current token, refreshed ahead of expiry and after a 401, shared by every clone.
///
/// Requests read it without a lock: one `ArcSwap` load and one clock read, compared with
/// the token's refresh and expiry instants. When a token is missing or expired, one
/// request goes to the token endpoint and every caller awaits its outcome; once a token
/// enters its refresh window, the next request starts a background refresh and goes on
/// with the still-valid token.
///
/// A refresh is driven by a task on the runtime that started it *and* by every caller that
/// waits for it, so a caller never waits on a runtime that has stopped (a `block_on` per
/// call behind a synchronous facade, a runtime shut down after start-up). Token requests
/// need a Tokio runtime with its time driver enabled.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{BoxFuture, AuthError, CacheConfig, IssuedToken, TokenCache, TokenSource};
///
/// struct Fixed;
/// impl TokenSource for Fixed {
///     fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
///         Box::pin(async { Ok(IssuedToken::bearer("t", Duration::from_secs(3600)).unwrap()) })
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache = TokenCache::new(Fixed, CacheConfig::default());
/// // Two callers at once share one token request ...
/// let (a, b) = tokio::join!(cache.token(), cache.token());
/// assert_eq!(a?.generation(), b?.generation());
/// // ... and the cached token serves the next ones.
/// cache.token().await?;
/// assert_eq!(cache.stats().refreshes, 1);
/// # Ok::<(), AuthError>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl TokenCache {
    /// A cache that obtains its tokens from `source`. Nothing is fetched until a token is
    /// needed.
    pub fn new(source: impl TokenSource, config: CacheConfig) -> Self {
        let counters = Arc::new(Counters::new(config.name_value()));
        Self::with_source(Arc::new(source), Arc::new(config), counters)
    }

    /// Another cache for the same source and configuration, with its own token, single
    /// flight, backoff and counters: the next slot of a [`TokenPool`](crate::TokenPool).
    pub(crate) fn sibling(&self) -> Self {
        let config = self.inner.config.clone();
        let counters = Arc::new(Counters::new(config.name_value()));
        Self::with_source(self.inner.source.clone(), config, counters)
    }

    /// A cache over `source`, with a configuration and counters it may share with other
    /// caches.
    pub(crate) fn with_source(
        source: Arc<dyn TokenSource>,
        config: Arc<CacheConfig>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
                current: ArcSwapOption::empty(),
                state: Mutex::new(State {
                    in_flight: None,
                    failure: None,
                    refused: None,
                    refreshes_started: 0,
                    last_generation: 0,
                    last_success: None,
                    last_error: None,
                    idle_task: None,
                }),
                source,
                config,
                counters,
            }),
        }
    }

    /// The header to attach to a request now, and its generation; `None`: no valid token,
    /// the request must wait for one. The hot path: no lock, one clock read.
    pub(crate) fn header(&self) -> Option<(HeaderValue, TokenGeneration)> {
        let guard = self.inner.current.load();
        let token = guard.as_deref()?;
        let now = Instant::now();
        if now >= token.refresh_at() {
            if !token.is_valid_at(now) {
                return None;
            }
            self.refresh_ahead(now);
        }
        self.inner.counters.request_authorized();
        Some((token.header().clone(), token.generation()))
    }

    /// Which cache this is, for the stamps on responses.
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// Counts a request authorized after waiting for its token.
    pub(crate) fn count_authorized(&self) {
        self.inner.counters.request_authorized();
    }

    /// A token valid now: the cached one, or a fresh one after waiting for the single
    /// refresh in flight (starting it if needed).
    ///
    /// Fails with the refresh's error (shared by all its waiters) or, while a backoff after
    /// a failure runs, at once with that failure again. Never waits longer than the
    /// fetch timeout and a second.
    pub async fn token(&self) -> Result<Arc<Token>, AuthError> {
        let now = Instant::now();
        if let Some(token) = self.inner.current.load_full() {
            if token.is_valid_at(now) {
                if now >= token.refresh_at() {
                    self.refresh_ahead(now);
                }
                return Ok(token);
            }
        }
        self.wait_for_token(RefreshReason::Initial, None).await
    }

    /// Reports that the API answered 401 for a token of `generation`, and returns a token
    /// newer than it.
    ///
    /// If `generation` is still current, it is withdrawn and one refresh starts; a 401 for
    /// an older generation (it arrived after a refresh) causes no token request at all, and
    /// neither does one for a generation this cache never issued (the current token is
    /// returned). Any number of concurrent calls for the same generation cause at most one
    /// token request. While a backoff runs, the refused token stays in use (it may have
    /// been refused by mistake) and this fails at once with the failure that started the
    /// backoff.
    ///
    /// ```
    /// use genesys_auth_layer::{CacheConfig, TokenCache};
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
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache = TokenCache::new(Fixed, CacheConfig::default());
    /// let refused = cache.token().await?;
    /// let newer = cache.refresh_after_401(refused.generation()).await?;
    /// assert!(newer.generation() > refused.generation());
    /// // A late 401 for the old token costs no token request.
    /// let again = cache.refresh_after_401(refused.generation()).await?;
    /// assert_eq!(again.generation(), newer.generation());
    /// assert_eq!(cache.stats().refreshes, 2);
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub async fn refresh_after_401(
        &self,
        generation: TokenGeneration,
    ) -> Result<Arc<Token>, AuthError> {
        self.inner.counters.replay_after_401();
        self.refused(generation);
        self.wait_for_token(RefreshReason::After401, Some(generation))
            .await
    }

    /// The cached token, valid or not, without side effects.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }

    /// The counters so far: a cheap snapshot.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// How the token supply is doing (takes the slow-path lock briefly; not for every
    /// request).
    ///
    /// ```
    /// use genesys_auth_layer::{CacheConfig, TokenCache};
    /// # mod fake {
    /// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
    /// #     pub struct Failing(pub http::StatusCode);
    /// #     impl TokenSource for Failing {
    /// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
    /// #             let status = self.0;
    /// #             Box::pin(async move { Err(AuthError::UnexpectedStatus { status, retry_after: None }) })
    /// #         }
    /// #     }
    /// # }
    /// # use fake::Failing;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let unavailable = Failing(http::StatusCode::SERVICE_UNAVAILABLE); // answers 503
    /// let cache = TokenCache::new(unavailable, CacheConfig::default());
    /// assert!(cache.token().await.is_err());
    /// let health = cache.health();
    /// assert_eq!(health.consecutive_failures, 1);
    /// assert_eq!(health.last_error.as_ref().map(|e| e.cause()), Some("http_status"));
    /// assert!(health.can_obtain_tokens()); // one 503 is routine
    /// # });
    /// ```
    pub fn health(&self) -> Health {
        let now = Instant::now();
        let token = self
            .inner
            .current
            .load_full()
            .filter(|t| t.is_valid_at(now));
        let state = self.lock_state();
        Health {
            generation: token.as_ref().map(|t| t.generation()),
            token_expires_in: token.as_ref().map(|t| t.expires_at() - now),
            token_age: token.as_ref().map(|t| now - t.requested_at()),
            since_last_success: state.last_success.map(|at| now - at),
            last_error: state.last_error.as_ref().map(|(_, e)| AuthError::clone(e)),
            since_last_error: state.last_error.as_ref().map(|(at, _)| now - *at),
            consecutive_failures: state.failure.as_ref().map_or(0, |f| f.consecutive),
            backoff_remaining: self.backing_off(&state, now).map(|f| f.retry_at - now),
        }
    }

    /// The API answered 401 to a token of `generation` that this cache attached; `replay`:
    /// to a replay, whose refresh already ran (only counted: a second refresh per request
    /// would double the token requests of an API that refuses every token). Returns whether
    /// the request can be replayed with another token.
    pub(crate) fn answered_401(&self, generation: TokenGeneration, replay: bool) -> bool {
        self.inner.counters.api_401();
        !replay && self.refused(generation)
    }

    /// The API answered 401 to a token of `generation` that this cache issued. Returns
    /// whether a replay is worth trying: `false` only when that token stays in use.
    ///
    /// If `generation` is current it is withdrawn and a refresh starts, unless a backoff
    /// runs: then the token stays in use (the 401 may have been a mistake, and there is no
    /// other token to send) and the 401 goes back to the caller.
    pub(crate) fn refused(&self, generation: TokenGeneration) -> bool {
        let (kept, started) = {
            let mut state = self.lock_state();
            let current = self.inner.current.load_full();
            match current.filter(|t| t.generation() == generation) {
                None => (false, None),
                Some(_) if self.backing_off(&state, Instant::now()).is_some() => (true, None),
                Some(token) => {
                    let started = match state.in_flight {
                        Some(_) => None,
                        None => match self.begin(&mut state, RefreshReason::After401) {
                            Ok(started) => Some(started),
                            // No runtime to refresh on: the token stays, as in a backoff.
                            Err(_) => return false,
                        },
                    };
                    self.inner.current.store(None);
                    state.refused = Some(token);
                    (false, started)
                }
            }
        };
        if let Some(started) = started {
            self.drive(started);
        }
        !kept
    }

    /// Waits for a valid token other than `rejected`: the current one, or the outcome of the
    /// refresh in flight (started here if none runs and no backoff forbids it).
    async fn wait_for_token(
        &self,
        reason: RefreshReason,
        rejected: Option<TokenGeneration>,
    ) -> Result<Arc<Token>, AuthError> {
        let usable = |token: &Arc<Token>| {
            token.is_valid_at(Instant::now()) && Some(token.generation()) != rejected
        };
        let (id, refresh, started) = {
            let mut state = self.lock_state();
            if let Some(token) = self.inner.current.load_full().filter(usable) {
                return Ok(token);
            }
            if reason == RefreshReason::Initial {
                self.inner.counters.waited_for_token();
            }
            match &state.in_flight {
                Some(in_flight) => (in_flight.id, in_flight.outcome.clone(), None),
                None => {
                    let now = Instant::now();
                    if let Some(failure) = self.backing_off(&state, now) {
                        return Err(AuthError::clone(&failure.error));
                    }
                    let started = self.begin(&mut state, reason)?;
                    (started.id, started.outcome.clone(), Some(started))
                }
            }
        };
        if let Some(started) = started {
            self.drive(started);
        }
        // This caller polls the refresh too: it makes progress even if the task driving it
        // sits on a runtime that is no longer running.
        let timeout = self.inner.config.fetch_timeout;
        let outcome = match tokio::time::timeout(timeout + WAIT_GRACE, refresh).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let error = AuthError::Timeout(timeout);
                self.abandon(id, &error);
                Err(error)
            }
        };
        match outcome {
            // The refused token was put back (its refresh failed): use it while it lasts.
            Err(error) => self.inner.current.load_full().filter(usable).ok_or(error),
            Ok(token) => Ok(token),
        }
    }

    /// Starts a refresh ahead of expiry if the current token is due, none runs, and no
    /// backoff forbids it. Never waits for the lock: if another thread holds it, that
    /// thread is deciding the same thing, or the next request will.
    fn refresh_ahead(&self, now: Instant) {
        let mut state = match self.inner.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock) => return,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        let started = self.start_ahead(&mut state, now);
        drop(state);
        if let Some(started) = started {
            self.drive(started);
        }
    }

    fn start_ahead(&self, state: &mut State, now: Instant) -> Option<Started> {
        let due = self
            .inner
            .current
            .load()
            .as_deref()
            .is_some_and(|t| now >= t.refresh_at() && t.is_valid_at(now));
        if !due || state.in_flight.is_some() || self.backing_off(state, now).is_some() {
            return None;
        }
        self.begin(state, RefreshReason::AheadOfExpiry).ok()
    }

    /// The failure whose backoff forbids a token request at `now`, if any.
    fn backing_off<'s>(&self, state: &'s State, now: Instant) -> Option<&'s Failure> {
        let rotated = |version| version != self.inner.source.credentials_version();
        state
            .failure
            .as_ref()
            .filter(|f| now < f.retry_at && !f.credentials.is_some_and(rotated))
    }

    /// Marks a refresh in flight. Its future asks the source for a token and decides the
    /// outcome; [`drive`](Self::drive) spawns the task that polls it.
    fn begin(&self, state: &mut State, reason: RefreshReason) -> Result<Started, AuthError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AuthError::NoRuntime)?;
        state.refreshes_started += 1;
        let id = state.refreshes_started;
        let source = self.inner.source.clone();
        // Weak: a refresh nobody polls any more must not keep its cache alive.
        let cache = Arc::downgrade(&self.inner);
        let span = tracing::info_span!(
            target: "genesys_auth_layer::token",
            "token_fetch",
            reason = reason.as_str(),
            cache = self.inner.config.name_value()
        );
        let timeout = self.inner.config.fetch_timeout;
        let fetch = async move {
            let requested_at = Instant::now();
            let fetch = tokio::time::timeout(timeout, source.fetch());
            // A panicking source is a failed refresh, not a panic in every caller polling
            // it; so is a timer whose runtime has shut down.
            let result = match AssertUnwindSafe(fetch).catch_unwind().await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(AuthError::Timeout(timeout)),
                Err(_) => Err(AuthError::RefreshAborted),
            };
            match cache.upgrade() {
                Some(inner) => TokenCache { inner }.complete(id, result, requested_at, reason),
                None => Err(AuthError::RefreshAborted),
            }
        };
        let fetch: BoxFuture<'static, Outcome> = Box::pin(fetch.instrument(span));
        let outcome = fetch.shared();
        state.in_flight = Some(InFlight {
            id,
            outcome: outcome.clone(),
            credentials: self.inner.source.credentials_version(),
        });
        self.inner.counters.refresh_started();
        Ok(Started {
            id,
            outcome,
            runtime,
        })
    }

    /// Spawns the task that drives a refresh to its end even if no caller waits for it (a
    /// refresh ahead, or every waiter gone).
    fn drive(&self, started: Started) {
        drop(started.runtime.spawn(started.outcome));
    }

    /// Decides refresh `id`'s outcome: runs once, inside the refresh's shared future.
    fn complete(
        &self,
        id: u64,
        result: Result<IssuedToken, AuthError>,
        requested_at: Instant,
        reason: RefreshReason,
    ) -> Outcome {
        let now = Instant::now();
        let mut state = self.lock_state();
        let own = state.in_flight.as_ref().is_some_and(|f| f.id == id);
        // Dropped once the lock is released, like every refresh taken out of the state.
        let finished = if own { state.in_flight.take() } else { None };
        let generation = TokenGeneration(state.last_generation + 1);
        let outcome =
            match result.and_then(|issued| self.new_token(issued, generation, requested_at, now)) {
                Ok(token) => {
                    state.last_generation = generation.0;
                    state.last_success = Some(now);
                    // A refresh given up on (timed out) that succeeds late answers its
                    // pollers, but replaces no valid token (a newer one may be current),
                    // and only the refresh in flight ends the backoff.
                    let valid = |t: &Token| t.is_valid_at(now);
                    if own || !self.inner.current.load().as_deref().is_some_and(valid) {
                        state.refused = None;
                        self.inner.current.store(Some(token.clone()));
                        self.keep_idle_task(&mut state);
                    }
                    let recovered = if own { state.failure.take() } else { None };
                    drop(state);
                    self.inner.counters.token_fetched();
                    tracing::info!(
                        target: "genesys_auth_layer::token",
                        generation = generation.0,
                        lifetime_secs = (token.expires_at() - token.requested_at()).as_secs(),
                        refresh_in_secs = (token.refresh_at() - token.requested_at()).as_secs(),
                        duration_ms = (now - requested_at).as_millis() as u64,
                        reason = reason.as_str(),
                        "token fetched"
                    );
                    if let Some(failure) = recovered {
                        tracing::info!(
                            target: "genesys_auth_layer::token",
                            failed_attempts = failure.consecutive,
                            outage_ms = (now - failure.since).as_millis() as u64,
                            "backoff left"
                        );
                    }
                    Ok(token)
                }
                Err(error) if own => {
                    let credentials = finished.as_ref().map_or(0, |f| f.credentials);
                    self.fail(state, &error, now, reason, credentials);
                    Err(error)
                }
                // A refresh given up on already counted as failed.
                Err(error) => Err(error),
            };
        drop(finished);
        outcome
    }

    /// Makes `issued` (requested at `requested_at`, e.g. by a login's code exchange) the
    /// current token, as a refresh would: the next generation, refreshed ahead in time.
    /// Fails, and changes nothing, if it would expire before it could be used.
    pub(crate) fn seed(&self, issued: IssuedToken, requested_at: Instant) -> Result<(), AuthError> {
        let now = Instant::now();
        let mut state = self.lock_state();
        let generation = TokenGeneration(state.last_generation + 1);
        let token = self.new_token(issued, generation, requested_at, now)?;
        state.last_generation = generation.0;
        state.last_success = Some(now);
        state.refused = None;
        self.inner.current.store(Some(token));
        self.keep_idle_task(&mut state);
        Ok(())
    }

    /// A token for `issued`, or an error if it would expire before it could be used.
    fn new_token(
        &self,
        issued: IssuedToken,
        generation: TokenGeneration,
        requested_at: Instant,
        now: Instant,
    ) -> Result<Arc<Token>, AuthError> {
        let lifetime = issued.lifetime();
        let window = self.inner.config.refresh_window(lifetime);
        let token = Token::new(issued, generation, requested_at, window);
        // It must outlive the round trip that brought it by a margin, or it is useless.
        let least = (lifetime / 10).min(Duration::from_secs(1));
        if token.is_valid_at(now + least) {
            Ok(Arc::new(token))
        } else {
            Err(InvalidTokenResponse::ExpiredOnArrival.into())
        }
    }

    /// Gives up on refresh `id` (it outlasted the fetch timeout) if it is still the one in
    /// flight. Whoever still polls it may see it succeed later; its token is then kept.
    fn abandon(&self, id: u64, error: &AuthError) {
        let mut state = self.lock_state();
        if state.in_flight.as_ref().is_none_or(|f| f.id != id) {
            return;
        }
        let abandoned = state.in_flight.take();
        let credentials = abandoned.as_ref().map_or(0, |f| f.credentials);
        self.fail(
            state,
            error,
            Instant::now(),
            RefreshReason::Initial,
            credentials,
        );
        drop(abandoned);
    }

    /// Records the failure of the refresh in flight: the backoff, and the refused token put
    /// back while it is valid. Releases the lock, then logs.
    fn fail(
        &self,
        mut state: MutexGuard<'_, State>,
        error: &AuthError,
        now: Instant,
        reason: RefreshReason,
        credentials: u64,
    ) {
        let previous = state.failure.take();
        let consecutive = previous
            .as_ref()
            .map_or(0, |f| f.consecutive)
            .saturating_add(1);
        let wait = self.inner.config.backoff_after(consecutive, error);
        let shared = Arc::new(error.clone());
        state.last_error = Some((now, shared.clone()));
        state.failure = Some(Failure {
            error: shared,
            consecutive,
            since: previous.map_or(now, |f| f.since),
            retry_at: now + wait,
            credentials: error.is_fatal().then_some(credentials),
        });
        // The token in use, or the one a 401 withdrew (unless a fatal answer says the
        // credentials are refused), is next refreshed when the backoff ends: until then
        // requests send it without looking at the lock.
        let retry_at = now + wait;
        let restore = state
            .refused
            .take()
            .filter(|t| t.is_valid_at(now) && !error.is_fatal());
        let next = match self.inner.current.load_full() {
            Some(token) if token.refresh_at() < retry_at => Some(token),
            Some(_) => None,
            None => restore,
        };
        if let Some(token) = next.filter(|t| t.is_valid_at(now)) {
            self.inner
                .current
                .store(Some(Arc::new(token.refreshed_at(retry_at))));
            self.keep_idle_task(&mut state);
        }
        drop(state);

        self.inner.counters.fetch_failed(error);
        tracing::warn!(
            target: "genesys_auth_layer::token",
            error = %error,
            cause = error.cause(),
            oauth_error = error.oauth_code().map(|c| c.as_str()),
            http_status = error.http_status().map(|s| s.as_u16()),
            attempt = consecutive,
            retry_in_ms = wait.as_millis() as u64,
            reason = reason.as_str(),
            "token fetch failed"
        );
        if consecutive == 1 {
            tracing::warn!(
                target: "genesys_auth_layer::token",
                retry_in_ms = wait.as_millis() as u64,
                "backoff entered"
            );
        }
    }

    /// With [`CacheConfig::refresh_while_idle`], starts the cache's idle task unless it
    /// runs: one task that refreshes ahead while no request comes. It holds the cache only
    /// while deciding, never while it sleeps, and ends when no valid token is left or the
    /// cache is dropped.
    fn keep_idle_task(&self, state: &mut State) {
        let running = state.idle_task.as_ref().is_some_and(|t| !t.is_finished());
        if !self.inner.config.refresh_while_idle || running {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cache = Arc::downgrade(&self.inner);
        let task = runtime.spawn(async move {
            loop {
                let next = match cache.upgrade() {
                    Some(inner) => TokenCache { inner }.idle_step(Instant::now()),
                    None => return,
                };
                match next {
                    IdleStep::Join(refresh, deadline) => {
                        let _ = tokio::time::timeout_at(deadline, refresh).await;
                    }
                    IdleStep::Sleep(until) => tokio::time::sleep_until(until).await,
                    IdleStep::Stop => return,
                }
            }
        });
        state.idle_task = Some(task.abort_handle());
    }

    /// What the idle task does next: start the refresh if it is due, then wait for it, for
    /// the backoff, or for the refresh instant.
    fn idle_step(&self, now: Instant) -> IdleStep {
        let mut state = self.lock_state();
        let started = self.start_ahead(&mut state, now);
        let valid = self
            .inner
            .current
            .load_full()
            .filter(|t| t.is_valid_at(now));
        let step = if let Some(in_flight) = &state.in_flight {
            // A refresh ahead, or one a 401 started (while no token is current).
            let deadline = now + self.inner.config.fetch_timeout + WAIT_GRACE;
            IdleStep::Join(in_flight.outcome.clone(), deadline)
        } else if let Some(token) = valid {
            match self.backing_off(&state, now) {
                Some(failure) => IdleStep::Sleep(failure.retry_at.min(token.expires_at())),
                None if now < token.refresh_at() => IdleStep::Sleep(token.refresh_at()),
                None => IdleStep::Stop,
            }
        } else {
            IdleStep::Stop
        };
        if let IdleStep::Stop = step {
            // Said under the lock, so that the next token starts another task.
            state.idle_task = None;
        }
        drop(state);
        if let Some(started) = started {
            self.drive(started);
        }
        step
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data that every writer leaves consistent; if a panic ever
        // poisoned it, carry on rather than turn one panic into many.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the idle task waits for before it looks again.
enum IdleStep {
    /// The refresh in flight to end, at the latest at the instant given.
    Join(Refresh, Instant),
    /// The end of a backoff, or the refresh instant.
    Sleep(Instant),
    /// Nothing: no valid token is left.
    Stop,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("current", &self.inner.current.load().as_deref())
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OAuthErrorCode;
    use crate::source::BoxFuture;
    use crate::IssuedToken;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;

    /// A backoff runs: a caller gets the failure that started it again, at once and with
    /// no token request. Returns that failure and the wait left.
    async fn backed_off(cache: &TokenCache) -> (AuthError, Duration) {
        let remaining = cache.health().backoff_remaining.expect("a backoff runs");
        let requests = cache.stats().refreshes;
        let err = cache.token().await.expect_err("no token during a backoff");
        assert_eq!(cache.stats().refreshes, requests, "sent a request: {err}");
        let last = cache.health().last_error.expect("the failure is kept");
        assert_eq!(err.to_string(), last.to_string());
        (err, remaining)
    }

    /// A token source whose answers are scripted; it counts calls and can be slow.
    #[derive(Clone, Default)]
    struct Scripted {
        calls: Arc<AtomicUsize>,
        script: Arc<Mutex<VecDeque<Result<IssuedToken, AuthError>>>>,
        delay: Duration,
        lifetime: Duration,
        hang: bool,
        /// What `credentials_version` answers: bumped to simulate a rotation.
        version: Arc<AtomicU64>,
    }

    impl Scripted {
        fn new(lifetime: Duration, delay: Duration) -> Self {
            Self {
                lifetime,
                delay,
                ..Default::default()
            }
        }
        fn then(&self, result: Result<IssuedToken, AuthError>) {
            self.script.lock().unwrap().push_back(result);
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Scripted {
        fn credentials_version(&self) -> u64 {
            self.version.load(Ordering::SeqCst)
        }

        fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if self.hang {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(self.delay).await;
                let scripted = self.script.lock().unwrap().pop_front();
                scripted.unwrap_or_else(|| {
                    Ok(IssuedToken::bearer(&format!("token-{n}"), self.lifetime).unwrap())
                })
            })
        }
    }

    fn config() -> CacheConfig {
        CacheConfig::default()
            .refresh_ahead(Duration::from_secs(10), 0.0)
            .refresh_jitter(0.0)
            .backoff(Duration::from_secs(1), Duration::from_secs(8))
    }

    fn invalid_client() -> AuthError {
        AuthError::OAuth {
            status: http::StatusCode::UNAUTHORIZED,
            code: OAuthErrorCode::InvalidClient,
            description: Some("client not found".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(200));
        let cache = TokenCache::new(source.clone(), config());
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.token().await.map(|t| t.generation()) })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), TokenGeneration(1));
        }
        assert_eq!(source.calls(), 1);
        assert_eq!(cache.stats().refreshes, 1);
        assert_eq!(cache.stats().waited_for_token, 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_runs_in_background_once_per_lifetime() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(500));
        let cache = TokenCache::new(source.clone(), config());
        cache.token().await.unwrap();
        let waited_after_first = cache.stats().waited_for_token;

        // Use the token every second for three lifetimes: each time the token enters its
        // 10 s window a background refresh starts, and no request ever waits.
        for _ in 0..300 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let (_, generation) = cache.header().expect("a valid token at every step");
            assert!(generation.0 >= 1);
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.stats().waited_for_token, waited_after_first);
        // One initial fetch, then one per 90 s of the 300 s: at 90, 180 and 270 s.
        assert_eq!(source.calls(), 4);
        assert_eq!(cache.current().unwrap().generation(), TokenGeneration(4));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_cache_refreshes_on_its_timer_only_when_asked() {
        for enabled in [false, true] {
            let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(500));
            let cache = TokenCache::new(source.clone(), config().refresh_while_idle(enabled));
            cache.token().await.unwrap();
            let waited = cache.stats().waited_for_token;

            // No request for three lifetimes.
            for _ in 0..300 {
                tokio::time::advance(Duration::from_secs(1)).await;
                tokio::task::yield_now().await;
            }
            let token = cache.token().await.unwrap();
            if enabled {
                // Refreshed at 90, 180 and 270 s by the timers alone: the request after
                // the idle spell does not wait.
                assert_eq!(source.calls(), 4);
                assert_eq!(token.generation(), TokenGeneration(4));
                assert_eq!(cache.stats().waited_for_token, waited);
            } else {
                // Nothing happened while idle; the request waits for one fetch.
                assert_eq!(source.calls(), 2);
                assert_eq!(token.generation(), TokenGeneration(2));
                assert_eq!(cache.stats().waited_for_token, waited + 1);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_refresh_that_fails_is_retried_at_the_pace_of_the_backoff_until_expiry() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(50));
        let cache = TokenCache::new(source.clone(), config().refresh_while_idle(true));
        cache.token().await.unwrap();
        for _ in 0..100 {
            source.then(Err(AuthError::Timeout(Duration::from_secs(1))));
        }
        // From 90 s to the expiry at 100 s, no request: the timer retries after each backoff
        // (1 s doubling to 8 s, each between half and all of it), never faster.
        let mut calls_at = Vec::new();
        let mut seen = source.calls();
        for step in 1..=100 {
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
            if step == 1 {
                tokio::time::advance(Duration::from_secs(90) - Duration::from_millis(100)).await;
                tokio::task::yield_now().await;
            }
            while seen < source.calls() {
                calls_at.push(Instant::now());
                seen += 1;
            }
        }
        // An attempt started in the last step answers 50 ms later: let it end (the next
        // attempt is a backoff, at least 400 ms, away).
        tokio::time::advance(Duration::from_millis(60)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let attempts = source.calls() - 1;
        assert!((3..=5).contains(&attempts), "{attempts} attempts in 10 s");
        assert!(
            calls_at
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(400)),
            "attempts spaced by the backoff"
        );
        assert_eq!(cache.stats().fetch_failures as usize, attempts);
        // Past the expiry the timer stops; without a request nothing more is asked.
        tokio::time::advance(Duration::from_secs(60)).await;
        tokio::task::yield_now().await;
        assert_eq!(source.calls() - 1, attempts, "no attempt after the expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_refresh_recovers_after_failures_before_the_token_expires() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(50));
        let cache = TokenCache::new(source.clone(), config().refresh_while_idle(true));
        cache.token().await.unwrap();
        source.then(Err(AuthError::Timeout(Duration::from_secs(1))));
        source.then(Err(AuthError::Timeout(Duration::from_secs(1))));
        tokio::time::advance(Duration::from_secs(90)).await;
        for _ in 0..60 {
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
        }
        // Two failures, then a token, all before 100 s; then quiet until its own window.
        assert_eq!(source.calls(), 4);
        assert_eq!(cache.current().unwrap().generation(), TokenGeneration(2));
        let waited = cache.stats().waited_for_token;
        tokio::time::advance(Duration::from_secs(20)).await;
        tokio::task::yield_now().await;
        assert_eq!(source.calls(), 4);
        cache.token().await.unwrap();
        assert_eq!(cache.stats().waited_for_token, waited, "no request waited");
    }

    #[test]
    fn the_refresh_window_has_a_floor() {
        let config = CacheConfig::default()
            .refresh_ahead(Duration::ZERO, 0.0)
            .refresh_jitter(0.0);
        assert_eq!(
            config.refresh_window(Duration::from_secs(3600)),
            MIN_REFRESH_WINDOW
        );
        // A very short lifetime: a tenth of it, still before half-way.
        assert_eq!(
            config.refresh_window(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_refresh_is_not_lost_when_the_lock_is_busy() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(50));
        let cache = TokenCache::new(source.clone(), config().refresh_while_idle(true));
        cache.token().await.unwrap();
        // Another thread (a health probe, say) holds the state lock when the window opens.
        let (held, release) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let holder = {
            let (inner, held, release) = (cache.inner.clone(), held.clone(), release.clone());
            std::thread::spawn(move || {
                let _state = inner.state.lock().unwrap();
                held.wait();
                release.wait();
                std::thread::sleep(std::time::Duration::from_millis(20));
            })
        };
        held.wait();
        release.wait();
        tokio::time::advance(Duration::from_secs(91)).await;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.join().unwrap();
        assert_eq!(
            source.calls(),
            2,
            "the timer waited for the lock and refreshed"
        );
        assert_eq!(cache.current().unwrap().generation(), TokenGeneration(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_cache_is_not_refreshed_by_its_timer() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(50));
        let cache = TokenCache::new(source.clone(), config().refresh_while_idle(true));
        let token = cache.token().await.unwrap();
        drop(cache);
        // The token outlives the cache (a caller still holds it); the idle task holds only
        // a weak reference, and finds the cache gone when it wakes.
        tokio::time::advance(Duration::from_secs(95)).await;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.calls(), 1);
        drop(token);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_makes_callers_wait_for_exactly_one_fetch() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_millis(50));
        let cache = TokenCache::new(source.clone(), config());
        cache.token().await.unwrap();
        tokio::time::advance(Duration::from_secs(101)).await;
        assert!(cache.header().is_none(), "an expired token is never sent");
        let (a, b) = tokio::join!(cache.token(), cache.token());
        assert_eq!(a.unwrap().generation(), TokenGeneration(2));
        assert_eq!(b.unwrap().generation(), TokenGeneration(2));
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_counts_from_when_the_request_was_sent() {
        let source = Scripted::new(Duration::from_secs(100), Duration::from_secs(5));
        let cache = TokenCache::new(source, config());
        let sent = Instant::now();
        let token = cache.token().await.unwrap();
        assert_eq!(token.requested_at(), sent);
        assert_eq!(token.expires_at(), sent + Duration::from_secs(100));
    }

    #[tokio::test(start_paused = true)]
    async fn many_401s_for_one_generation_cost_one_fetch() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = TokenCache::new(source.clone(), config());
        let first = cache.token().await.unwrap().generation();
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(
                    async move { cache.refresh_after_401(first).await.map(|t| t.generation()) },
                )
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), TokenGeneration(2));
        }
        assert_eq!(source.calls(), 2);
        // A late 401 for the old generation: no fetch, the newer token is returned.
        assert_eq!(
            cache.refresh_after_401(first).await.unwrap().generation(),
            TokenGeneration(2)
        );
        assert_eq!(source.calls(), 2);
        assert_eq!(cache.stats().replays_after_401, 1001);
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_for_a_generation_it_never_issued_costs_no_fetch() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = TokenCache::new(source.clone(), config());
        cache.token().await.unwrap();
        for _ in 0..3 {
            let token = cache.refresh_after_401(TokenGeneration(9)).await.unwrap();
            assert_eq!(token.generation(), TokenGeneration(1));
        }
        assert_eq!(source.calls(), 1);
    }

    #[test]
    fn backoff_never_goes_under_its_floor() {
        let config = CacheConfig::default().backoff(Duration::ZERO, Duration::ZERO);
        let error = AuthError::UnexpectedStatus {
            status: http::StatusCode::BAD_GATEWAY,
            retry_after: None,
        };
        for consecutive in [1, 1, 1, 2, 5] {
            for _ in 0..200 {
                assert!(config.backoff_after(consecutive, &error) >= MIN_BACKOFF);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_drops_the_current_token_at_once() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = TokenCache::new(source.clone(), config());
        let first = cache.token().await.unwrap().generation();
        let refreshing = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh_after_401(first).await }
        });
        tokio::task::yield_now().await;
        assert!(
            cache.header().is_none(),
            "the refused token must not be sent again"
        );
        assert_eq!(
            refreshing.await.unwrap().unwrap().generation(),
            TokenGeneration(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_caller_that_started_a_refresh_does_not_cancel_it() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_secs(1));
        let cache = TokenCache::new(source.clone(), config());
        let starter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.token().await }
        });
        tokio::time::advance(Duration::from_millis(100)).await;
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.token().await }
        });
        tokio::task::yield_now().await;
        starter.abort();
        assert!(starter.await.unwrap_err().is_cancelled());
        assert_eq!(
            waiter.await.unwrap().unwrap().generation(),
            TokenGeneration(1)
        );
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_shared_then_backed_off() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(100));
        source.then(Err(invalid_client()));
        let cache = TokenCache::new(source.clone(), config());
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.token().await })
            })
            .collect();
        for task in tasks {
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(
                err.oauth_code(),
                Some(&OAuthErrorCode::InvalidClient),
                "{err}"
            );
        }
        assert_eq!(source.calls(), 1);

        // Within the backoff: an immediate typed error, no request.
        let (err, _) = backed_off(&cache).await;
        assert_eq!(
            err.oauth_code(),
            Some(&OAuthErrorCode::InvalidClient),
            "{err}"
        );
        assert_eq!(source.calls(), 1);

        // A fatal answer waits the longest backoff (8 s here), not the first one (2h).
        tokio::time::advance(Duration::from_secs(7)).await;
        backed_off(&cache).await;
        assert_eq!(source.calls(), 1);
        // After it: one new request, which succeeds.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            cache.token().await.unwrap().generation(),
            TokenGeneration(1)
        );
        assert_eq!(source.calls(), 2);
        assert_eq!(cache.stats().fetch_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_and_is_capped() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO);
        let cache = TokenCache::new(source.clone(), config());
        for _ in 0..6 {
            source.then(Err(AuthError::UnexpectedStatus {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                retry_after: None,
            }));
        }
        let mut waits = Vec::new();
        for _ in 0..6 {
            assert!(cache.token().await.is_err());
            let (_, retry_in) = backed_off(&cache).await;
            waits.push(retry_in);
            tokio::time::advance(retry_in).await;
        }
        // Equal jitter: attempt n waits between half and all of min(1 s × 2^(n-1), 8 s).
        for (n, wait) in waits.iter().enumerate() {
            let full = Duration::from_secs(1 << n.min(3));
            assert!(
                *wait >= full / 2 && *wait <= full,
                "attempt {}: {wait:?}",
                n + 1
            );
        }
        assert_eq!(source.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO);
        source.then(Err(AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        }));
        let cache = TokenCache::new(source.clone(), config());
        assert!(cache.token().await.is_err());
        tokio::time::advance(Duration::from_millis(4900)).await;
        let (err, _) = backed_off(&cache).await;
        assert!(matches!(err, AuthError::RateLimited { .. }), "{err}");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(cache.token().await.is_ok());
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_bounded() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO);
        source.then(Err(AuthError::RateLimited {
            retry_after: Some(Duration::ZERO),
        }));
        source.then(Err(AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(86_400)),
        }));
        let cache = TokenCache::new(source.clone(), config());
        assert!(cache.token().await.is_err());
        let (_, retry_in) = backed_off(&cache).await; // Retry-After: 0 still backs off
        assert_eq!(retry_in, Duration::from_secs(1));
        tokio::time::advance(retry_in).await;
        assert!(cache.token().await.is_err());
        let (_, retry_in) = backed_off(&cache).await;
        assert_eq!(
            retry_in, RETRY_AFTER_CAP,
            "honoured past the backoff cap, up to its own cap (2f)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_valid_token_keeps_serving_while_refreshes_fail() {
        let source = Scripted::new(Duration::from_secs(100), Duration::ZERO);
        let cache = TokenCache::new(source.clone(), config());
        cache.token().await.unwrap();
        for _ in 0..20 {
            source.then(Err(AuthError::UnexpectedStatus {
                status: http::StatusCode::BAD_GATEWAY,
                retry_after: None,
            }));
        }
        // In the refresh window with a failing endpoint: every request still gets the token,
        // and token requests are spaced by the backoff, not made per request.
        tokio::time::advance(Duration::from_secs(91)).await;
        for _ in 0..80 {
            assert!(cache.header().is_some());
            tokio::task::yield_now().await;
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let calls = source.calls();
        assert!(
            (2..=6).contains(&calls),
            "{calls} token requests in 8 s of backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_endpoint_times_out() {
        let source = Scripted {
            hang: true,
            ..Scripted::new(Duration::from_secs(60), Duration::ZERO)
        };
        let cache = TokenCache::new(source, config().fetch_timeout(Duration::from_secs(3)));
        let started = Instant::now();
        let err = cache.token().await.unwrap_err();
        assert!(
            matches!(err, AuthError::Timeout(d) if d == Duration::from_secs(3)),
            "{err}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn outside_a_runtime_it_is_an_error_not_a_panic() {
        let cache = TokenCache::new(
            Scripted::new(Duration::from_secs(60), Duration::ZERO),
            config(),
        );
        let result = futures_lite_block_on(cache.token());
        assert!(matches!(result, Err(AuthError::NoRuntime)));
    }

    /// Polls a future that completes without a runtime (it must not need one).
    fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(out) => out,
            std::task::Poll::Pending => panic!("future did not complete without a runtime"),
        }
    }

    #[test]
    fn refresh_window_defaults() {
        let config = CacheConfig::default().refresh_jitter(0.0);
        assert_eq!(
            config.refresh_window(Duration::from_secs(86_400)),
            Duration::from_secs(8_640)
        );
        assert_eq!(
            config.refresh_window(Duration::from_secs(300)),
            Duration::from_secs(60)
        );
        assert_eq!(
            config.refresh_window(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        let jittered = CacheConfig::default().refresh_window(Duration::from_secs(86_400));
        assert!(jittered >= Duration::from_secs(8_640) && jittered <= Duration::from_secs(10_800));
    }

    /// A source that panics: the refresh task dies mid-fetch.
    struct Panics(Arc<AtomicUsize>);

    impl TokenSource for Panics {
        fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { panic!("token source bug") })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_source_is_a_failure_with_backoff_not_a_loop() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = TokenCache::new(Panics(calls.clone()), config());
        let (a, b) = tokio::join!(cache.token(), cache.token());
        assert!(matches!(a, Err(AuthError::RefreshAborted)), "{a:?}");
        // `b` joined the refresh or asked after it had failed: the same error either way.
        assert!(matches!(&b, Err(AuthError::RefreshAborted)), "{b:?}");
        for _ in 0..5 {
            let (err, _) = backed_off(&cache).await;
            assert!(matches!(err, AuthError::RefreshAborted), "{err}");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one attempt per backoff window"
        );
        assert_eq!(cache.health().consecutive_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_expired_on_arrival_is_a_failure() {
        let source = Scripted::new(Duration::from_secs(1), Duration::from_secs(2));
        let cache = TokenCache::new(source.clone(), config());
        let err = cache.token().await.unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::InvalidResponse(InvalidTokenResponse::ExpiredOnArrival)
            ),
            "{err}"
        );
        backed_off(&cache).await;
        assert!(cache.current().is_none());
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_settings_do_not_panic() {
        let source = Scripted::new(Duration::MAX, Duration::ZERO);
        source.then(Err(AuthError::RateLimited {
            retry_after: Some(Duration::MAX),
        }));
        let config = CacheConfig::default()
            .refresh_ahead(Duration::MAX, f64::NAN)
            .refresh_jitter(f64::INFINITY)
            .backoff(Duration::ZERO, Duration::MAX)
            .fetch_timeout(Duration::MAX);
        let cache = TokenCache::new(source, config);
        assert!(cache.token().await.is_err());
        let (_, retry_in) = backed_off(&cache).await;
        assert_eq!(retry_in, RETRY_AFTER_CAP);
        tokio::time::advance(retry_in).await;
        let token = cache.token().await.unwrap();
        assert_eq!(
            token.expires_at() - token.requested_at(),
            MAX_TOKEN_LIFETIME
        );
    }

    #[test]
    fn waiters_are_bounded_even_if_the_refresh_task_cannot_run() {
        let slow = Scripted::new(Duration::from_secs(60), Duration::from_secs(30));
        let config = config().fetch_timeout(Duration::from_millis(200));
        let cache = TokenCache::new(slow, config);
        // Runtime A starts the refresh, then is no longer driven: its task is frozen.
        let a = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        a.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(1), cache.token()).await;
        });
        // Runtime B waits on that refresh: it gets an error after the timeout and a grace.
        let b = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        b.block_on(async {
            let started = std::time::Instant::now();
            let err = cache.token().await.unwrap_err();
            assert!(matches!(err, AuthError::Timeout(_)), "{err}");
            assert!(started.elapsed() < Duration::from_secs(3));
            // The abandoned refresh no longer blocks: the next attempt follows the backoff.
            let (err, _) = backed_off(&cache).await;
            assert!(matches!(err, AuthError::Timeout(_)), "{err}");
        });
        drop(a);
    }

    /// 2g: a token fetched on a runtime since shut down (a token prefetched on a temporary
    /// runtime at start-up) is served from another runtime without the lock.
    #[test]
    fn a_token_fetched_on_a_runtime_since_shut_down_is_served_lock_free() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO);
        let cache = TokenCache::new(source.clone(), config());
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let start_up = runtime();
        start_up.block_on(cache.token()).unwrap();
        drop(start_up);
        runtime().block_on(async {
            // The lock is held here: a request that needed it would never return.
            let _held = cache.inner.state.lock().unwrap();
            for _ in 0..1000 {
                let (header, generation) = cache.header().expect("the cached token");
                assert_eq!(header, "Bearer token-0");
                assert_eq!(generation, TokenGeneration(1));
            }
        });
        assert_eq!(source.calls(), 1);
    }

    #[test]
    fn a_refresh_on_a_runtime_that_shut_down_fails_instead_of_deadlocking() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        drop(runtime);
        let _context = handle.enter();
        let cache = TokenCache::new(
            Scripted::new(Duration::from_secs(60), Duration::ZERO),
            config(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let _context = handle.enter();
            let _ = tx.send(futures_lite_block_on(cache.token()).map(|t| t.generation()));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("no deadlock: an answer within 5 s");
        assert!(
            matches!(result, Err(AuthError::RefreshAborted)),
            "{result:?}"
        );
        worker.join().unwrap();
    }

    /// 2a: behind a synchronous facade (a current-thread runtime per thread, driven only by
    /// `block_on`), thread A's request starts the refresh ahead on its runtime and returns
    /// before the runtime runs it. Thread B, after expiry, joins that refresh: it drives it
    /// itself and gets a token at once, not a `Timeout` after the fetch timeout.
    #[test]
    fn a_refresh_parked_on_an_idle_runtime_is_driven_by_its_waiter() {
        let source = Scripted::new(Duration::from_secs(4), Duration::ZERO);
        let config = CacheConfig::default()
            .refresh_ahead(Duration::from_secs(2), 0.0)
            .refresh_jitter(0.0)
            .fetch_timeout(Duration::from_secs(20));
        let cache = TokenCache::new(source.clone(), config);
        let facade = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let wait_until = |at: Instant| {
            while Instant::now() < at {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let a = facade();
        let token = a.block_on(cache.token()).unwrap();
        // In the refresh window (2 s of it left, however busy the machine): A's request
        // sends the token and starts the refresh ahead, which A's runtime never runs.
        wait_until(token.refresh_at());
        let sent = a.block_on(async { cache.header() });
        assert_eq!(sent.map(|(_, g)| g), Some(TokenGeneration(1)));
        assert_eq!(cache.stats().refreshes, 2, "the refresh ahead is in flight");
        assert_eq!(source.calls(), 1, "and has not run");
        // Past the expiry, on thread B.
        wait_until(token.expires_at());
        let b = std::thread::spawn({
            let cache = cache.clone();
            move || {
                let started = std::time::Instant::now();
                let token = facade().block_on(cache.token());
                (token.map(|t| t.generation()), started.elapsed())
            }
        });
        let (token, waited) = b.join().unwrap();
        assert_eq!(token.unwrap(), TokenGeneration(2));
        assert!(
            waited < Duration::from_secs(10),
            "B waited {waited:?}: it drove the refresh itself, not the fetch timeout (20 s)"
        );
        assert_eq!(source.calls(), 2);
        assert_eq!(cache.stats().fetch_failures, 0);
        drop(a);
    }

    /// 2e: a warm token, a token endpoint answering 503, one spurious 401. The token the
    /// 401 withdrew is put back when its refresh fails, and requests keep using it for the
    /// rest of its life; the endpoint is retried on the backoff schedule; a second 401 goes
    /// back to the caller (no replay), and leaves the token in use.
    #[tokio::test(start_paused = true)]
    async fn one_401_during_a_token_endpoint_outage_keeps_the_working_token() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(10));
        let cache = TokenCache::new(source.clone(), config());
        let warm = cache.token().await.unwrap().generation();
        for _ in 0..1000 {
            source.then(Err(AuthError::UnexpectedStatus {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                retry_after: None,
            }));
        }
        // The spurious 401: its replay waits for the refresh, which fails.
        let err = cache.refresh_after_401(warm).await.unwrap_err();
        assert!(matches!(err, AuthError::UnexpectedStatus { .. }), "{err}");
        assert_eq!(source.calls(), 2);
        // Requests keep using the token, lock-free, for the next 30 minutes.
        for _ in 0..(30 * 60) {
            let (_, generation) = cache.header().expect("the working token");
            assert_eq!(generation, warm);
            tokio::time::advance(Duration::from_secs(1)).await;
            tokio::task::yield_now().await;
        }
        // The endpoint was retried on the backoff schedule (1 s doubling to 8 s, each wait
        // between half and all of it): about one request per 4–8 s, never per request.
        let calls = source.calls();
        assert!(
            (200..=460).contains(&calls),
            "{calls} token requests in 30 min of backoff"
        );
        // A second 401 while the backoff runs (not while an attempt is in flight, which a
        // replay could wait for): no replay, the token stays in use.
        // Requests keep coming: one starts the next attempt once the backoff ends, and it
        // fails again within a minute of (paused) time.
        for _ in 0..60_000 {
            if cache.health().backoff_remaining.is_some() {
                break;
            }
            assert!(cache.header().is_some());
            tokio::time::advance(Duration::from_millis(1)).await;
            tokio::task::yield_now().await;
        }
        assert!(cache.health().backoff_remaining.is_some(), "a backoff runs");
        assert!(!cache.refused(warm), "the 401 goes back to the caller");
        assert_eq!(cache.header().map(|(_, g)| g), Some(warm));
        assert_eq!(cache.current().map(|t| t.generation()), Some(warm));
    }

    /// 2e, the other side: a fatal answer means the credentials are refused; the token a
    /// 401 withdrew is not put back.
    #[tokio::test(start_paused = true)]
    async fn a_refused_token_is_not_put_back_after_a_fatal_answer() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(10));
        let cache = TokenCache::new(source.clone(), config());
        let warm = cache.token().await.unwrap().generation();
        source.then(Err(invalid_client()));
        let err = cache.refresh_after_401(warm).await.unwrap_err();
        assert!(err.is_fatal(), "{err}");
        assert!(cache.header().is_none());
        let (err, _) = backed_off(&cache).await;
        assert!(err.is_fatal(), "{err}");
    }

    /// 2f: a `Retry-After` longer than the backoff cap is honoured (up to its own cap), on
    /// a 429 and on a 503 alike.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_above_the_backoff_cap_is_honoured() {
        let secs = Duration::from_secs;
        let answers = [
            AuthError::RateLimited {
                retry_after: Some(secs(300)),
            },
            AuthError::UnexpectedStatus {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                retry_after: Some(secs(120)),
            },
        ];
        for answer in answers {
            let asked = answer.retry_after().unwrap();
            let source = Scripted::new(secs(3600), Duration::ZERO);
            source.then(Err(answer));
            let cache = TokenCache::new(source.clone(), config()); // backoff cap: 8 s
            assert!(cache.token().await.is_err());
            let (_, retry_in) = backed_off(&cache).await;
            assert_eq!(retry_in, asked);
            tokio::time::advance(asked - secs(1)).await;
            backed_off(&cache).await;
            assert_eq!(source.calls(), 1, "no second request before {asked:?}");
            tokio::time::advance(secs(1)).await;
            assert!(cache.token().await.is_ok());
            assert_eq!(source.calls(), 2);
        }
    }

    /// 2h: a fatal answer is not retried like a 500: it waits the longest backoff, so a
    /// deleted client costs about one token request per `backoff_max`; rotating the
    /// credentials ends that wait at once.
    #[tokio::test(start_paused = true)]
    async fn a_fatal_answer_waits_the_longest_backoff_until_the_credentials_rotate() {
        let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO);
        for _ in 0..100 {
            source.then(Err(invalid_client()));
        }
        let cache = TokenCache::new(source.clone(), config()); // backoff: 1 s to 8 s
        for _ in 0..(60 * 10) {
            let _ = cache.token().await;
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // 60 s: one request at 0 s, then one per 8 s.
        assert_eq!(source.calls(), 8, "one request per backoff_max");
        let health = cache.health();
        assert!(health
            .backoff_remaining
            .is_some_and(|r| r > Duration::from_secs(1)));
        // The credentials are rotated (and now work): the next request goes out at once.
        source.script.lock().unwrap().clear();
        source.version.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            cache.token().await.unwrap().generation(),
            TokenGeneration(1)
        );
        assert_eq!(source.calls(), 9);
    }

    /// The fatal wait is about the credentials the refused request carried: a rotation
    /// while that request was out ends it too.
    #[tokio::test(start_paused = true)]
    async fn a_rotation_during_the_refused_request_ends_the_fatal_wait() {
        struct RotatedMidRequest(Scripted);
        impl TokenSource for RotatedMidRequest {
            fn credentials_version(&self) -> u64 {
                self.0.credentials_version()
            }
            fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
                Box::pin(async move {
                    let answer = self.0.fetch().await;
                    // The operator rotates while the old secret's request is out.
                    self.0.version.fetch_add(1, Ordering::SeqCst);
                    answer
                })
            }
        }
        let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(10));
        source.then(Err(invalid_client()));
        let cache = TokenCache::new(RotatedMidRequest(source.clone()), config());
        assert!(cache.token().await.unwrap_err().is_fatal());
        // Not 8 s of backoff: the next request tries the new credentials at once.
        assert!(cache.token().await.is_ok());
        assert_eq!(source.calls(), 2);
    }

    /// A token kept in use through a backoff is next refreshed when the backoff ends, so
    /// that until then requests do not even try the lock.
    #[tokio::test(start_paused = true)]
    async fn a_token_kept_through_a_backoff_is_refreshed_when_it_ends() {
        let source = Scripted::new(Duration::from_secs(100), Duration::ZERO);
        let cache = TokenCache::new(source.clone(), config());
        cache.token().await.unwrap();
        source.then(Err(AuthError::UnexpectedStatus {
            status: http::StatusCode::BAD_GATEWAY,
            retry_after: None,
        }));
        tokio::time::advance(Duration::from_secs(91)).await;
        assert!(
            cache.header().is_some(),
            "in the window: sent, and a refresh starts"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(source.calls(), 2);
        let remaining = cache.health().backoff_remaining.expect("backing off");
        let token = cache.current().unwrap();
        assert_eq!(token.generation(), TokenGeneration(1));
        assert_eq!(token.refresh_at(), Instant::now() + remaining);
        // Until then no request starts one; at its end the next one does.
        tokio::time::advance(remaining - Duration::from_millis(1)).await;
        assert!(cache.header().is_some());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(cache.header().is_some());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(source.calls(), 3);
        assert_eq!(cache.current().unwrap().generation(), TokenGeneration(2));
    }

    /// No reference cycle through a refresh in flight: a cache whose handles are all gone is
    /// freed even while its token request hangs.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_cache_is_freed_while_its_refresh_hangs() {
        let source = Scripted {
            hang: true,
            ..Scripted::new(Duration::from_secs(60), Duration::ZERO)
        };
        let cache = TokenCache::new(source, config());
        let weak = Arc::downgrade(&cache.inner);
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.token().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(cache.stats().refreshes, 1);
        waiter.abort();
        let _ = waiter.await;
        drop(cache);
        assert!(
            weak.upgrade().is_none(),
            "the refresh in flight keeps no cache alive"
        );
    }
}
