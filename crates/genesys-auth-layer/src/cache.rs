//! The token cell.
//!
//! This module owns [`TokenCache`]: the current token in an `arc-swap` cell that requests
//! read without a lock (beside it, one atomic word naming the fresh token's generation, which
//! services check the header they kept against), and the slow path that replaces it:
//! single-flight refresh with a shared outcome, refresh ahead of expiry, generation-scoped
//! invalidation after a 401, and backoff after failures. It must never hold a lock across an
//! `.await`, never let two token requests be in flight at once, and never let a caller wait
//! without a bound.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{AuthError, InvalidTokenResponse};
use crate::observe::{CacheStats, Counters, Health};
use crate::source::TokenSource;
use crate::token::{Phase, Token, TokenGeneration, MAX_TOKEN_LIFETIME};

/// Refresh at least this long before expiry. Genesys tokens live for hours; a minute
/// covers a slow token endpoint, a retry or two, and clock drift between hosts.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, DEFAULT_REFRESH_AHEAD, DEFAULT_REFRESH_AHEAD_FRACTION};
///
/// assert_eq!(DEFAULT_REFRESH_AHEAD, Duration::from_secs(60));
/// let config = CacheConfig::default()
///     .refresh_ahead(DEFAULT_REFRESH_AHEAD, DEFAULT_REFRESH_AHEAD_FRACTION);
/// assert_eq!(config, CacheConfig::default());
/// ```
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// ... or this share of the token's lifetime, if larger (10 %: 2.4 h of a 24 h token).
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::DEFAULT_REFRESH_AHEAD_FRACTION;
///
/// assert_eq!(DEFAULT_REFRESH_AHEAD_FRACTION, 0.10);
/// let day = Duration::from_secs(24 * 60 * 60);
/// assert_eq!(day.mul_f64(DEFAULT_REFRESH_AHEAD_FRACTION), Duration::from_secs(8640)); // 2.4 h
/// ```
pub const DEFAULT_REFRESH_AHEAD_FRACTION: f64 = 0.10;
/// Up to this share of the refresh window is added at random, so that a fleet started
/// together does not refresh in lock-step.
///
/// ```
/// use genesys_auth_layer::{CacheConfig, DEFAULT_REFRESH_JITTER};
///
/// assert_eq!(DEFAULT_REFRESH_JITTER, 0.25);
/// let config = CacheConfig::default().refresh_jitter(DEFAULT_REFRESH_JITTER);
/// assert_eq!(config, CacheConfig::default());
/// ```
pub const DEFAULT_REFRESH_JITTER: f64 = 0.25;
/// How long one token request may take, body included. Every caller waiting on a refresh
/// gets an answer within this bound.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, DEFAULT_FETCH_TIMEOUT};
///
/// assert_eq!(DEFAULT_FETCH_TIMEOUT, Duration::from_secs(10));
/// assert_eq!(CacheConfig::default().fetch_timeout_value(), DEFAULT_FETCH_TIMEOUT);
/// ```
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed token request; doubled per consecutive failure.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX};
///
/// assert_eq!(DEFAULT_BACKOFF_INITIAL, Duration::from_secs(1));
/// let config = CacheConfig::default().backoff(DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX);
/// assert_eq!(config, CacheConfig::default());
/// ```
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between failed token requests, also the cap on an honoured `Retry-After`:
/// a misconfigured client is retried once a minute, not in a loop, yet recovers without a
/// restart once it is fixed.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX};
///
/// assert_eq!(DEFAULT_BACKOFF_MAX, Duration::from_secs(60));
/// // A longer cap, with the default first wait:
/// let config = CacheConfig::default().backoff(DEFAULT_BACKOFF_INITIAL, Duration::from_secs(300));
/// assert_ne!(config, CacheConfig::default());
/// ```
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The shortest backoff after a failure: a floor so that no configuration turns a failing
/// token endpoint into a loop of requests.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, MIN_BACKOFF};
///
/// assert_eq!(MIN_BACKOFF, Duration::from_millis(10));
/// // No wait at all is not accepted: the floor is used instead.
/// let none = CacheConfig::default().backoff(Duration::ZERO, Duration::from_secs(5));
/// let floor = CacheConfig::default().backoff(MIN_BACKOFF, Duration::from_secs(5));
/// assert_eq!(none, floor);
/// ```
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// The shortest refresh window (see [`CacheConfig::refresh_ahead`]).
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, TokenCache, MIN_REFRESH_WINDOW};
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
/// // Asked for no window at all, a one-hour token still gets the shortest one.
/// let config = CacheConfig::default().refresh_ahead(Duration::ZERO, 0.0).refresh_jitter(0.0);
/// let cache = TokenCache::new(Fixed, config);
/// let token = cache.token().await?;
/// assert_eq!(token.expires_at() - token.refresh_at(), MIN_REFRESH_WINDOW);
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
pub const MIN_REFRESH_WINDOW: Duration = Duration::from_secs(1);
/// The longest backoff accepted.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);
/// How much longer than the fetch timeout a caller waits for a refresh before giving up on
/// it: the refresh task's own timeout normally answers first.
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
///     .backoff(Duration::from_millis(500), Duration::from_secs(30));
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
    check_clock: bool,
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
            check_clock: false,
        }
    }
}

impl CacheConfig {
    /// Refresh once the remaining life is under `max(at_least, fraction × lifetime)`, but
    /// never earlier than half-way through the lifetime. `fraction` is clamped to `0..=0.5`.
    ///
    /// The window is never shorter than [`MIN_REFRESH_WINDOW`] (or a tenth of the lifetime,
    /// if that is shorter): a token refreshed only at its expiry would be sent expired
    /// whenever its timer runs a moment late, and never refreshed ahead.
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

    /// The share of the refresh window added at random (`0` for none; clamped to `0..=1`).
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// // No jitter: every process refreshes at the same point of a token's life.
    /// let exact = CacheConfig::default().refresh_jitter(0.0);
    /// assert_ne!(exact, CacheConfig::default());
    /// // Shares above 1 count as 1.
    /// let most = CacheConfig::default().refresh_jitter(1.0);
    /// assert_eq!(CacheConfig::default().refresh_jitter(5.0), most);
    /// ```
    pub fn refresh_jitter(mut self, share: f64) -> Self {
        self.refresh_jitter = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Bounds one token request, body included (kept between 1 ms and 1 hour).
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// let config = CacheConfig::default().fetch_timeout(Duration::from_secs(3));
    /// assert_eq!(config.fetch_timeout_value(), Duration::from_secs(3));
    /// // Zero is raised to the 1 ms floor.
    /// let zero = CacheConfig::default().fetch_timeout(Duration::ZERO);
    /// assert_eq!(zero.fetch_timeout_value(), Duration::from_millis(1));
    /// ```
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self
    }

    /// The configured fetch timeout.
    ///
    /// ```
    /// use genesys_auth_layer::{CacheConfig, DEFAULT_FETCH_TIMEOUT};
    ///
    /// assert_eq!(CacheConfig::default().fetch_timeout_value(), DEFAULT_FETCH_TIMEOUT);
    /// ```
    pub fn fetch_timeout_value(&self) -> Duration {
        self.fetch_timeout
    }

    /// Exponential backoff between failed token requests: `initial`, doubling, capped at
    /// `max`. A 429's `Retry-After` replaces it, kept between `initial` and `max`.
    ///
    /// `initial` is at least [`MIN_BACKOFF`] (no failure may turn into a loop of token
    /// requests) and `max` at most one day.
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// let (initial, max) = (Duration::from_secs(2), Duration::from_secs(120));
    /// assert_ne!(CacheConfig::default().backoff(initial, max), CacheConfig::default());
    /// // `max` is never below `initial`.
    /// let five = Duration::from_secs(5);
    /// let inverted = CacheConfig::default().backoff(five, Duration::from_secs(1));
    /// assert_eq!(inverted, CacheConfig::default().backoff(five, five));
    /// ```
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial.clamp(MIN_BACKOFF, MAX_BACKOFF);
        self.backoff_max = max.clamp(self.backoff_initial, MAX_BACKOFF);
        self
    }

    /// Whether the token's own timer starts the refresh when its refresh window opens,
    /// even if no request comes (default: `false`, a request in the window starts it).
    ///
    /// With `true`, a client idle for longer than a token's lifetime still finds a valid
    /// token on its next request instead of waiting for one, at the price of a token
    /// request per lifetime while the cache exists, used or not (more while the token
    /// endpoint fails). If the refresh fails, the timer tries again each time the backoff
    /// allows (by default 1 s doubling to 60 s, each wait between half and all of that,
    /// never sooner), until a new token arrives or the old one expires; then requests take
    /// over, as without the option.
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// let config = CacheConfig::default().refresh_while_idle(true);
    /// assert!(config.refreshes_while_idle());
    /// ```
    pub fn refresh_while_idle(mut self, enabled: bool) -> Self {
        self.refresh_while_idle = enabled;
        self
    }

    /// Whether [`refresh_while_idle`](Self::refresh_while_idle) is on.
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// assert!(!CacheConfig::default().refreshes_while_idle());
    /// assert!(CacheConfig::default().refresh_while_idle(true).refreshes_while_idle());
    /// ```
    pub fn refreshes_while_idle(&self) -> bool {
        self.refresh_while_idle
    }

    /// Whether every request compares the clock with the token's refresh time (default:
    /// `false`).
    ///
    /// By default a token's phase (fresh, due for refresh, expired) is moved on by a timer
    /// task on the runtime, so a request with a fresh token reads no clock. Where that timer
    /// may not run on time, turn this on:
    ///
    /// * a runtime driven only while a request runs (`block_on` per call behind a
    ///   synchronous facade): the timer's runtime sleeps between calls, and a call is
    ///   polled before the timers that fell due meanwhile;
    /// * a process frozen between requests (serverless platforms that throttle the CPU
    ///   outside requests, a paused VM).
    ///
    /// Without it, after such a gap the first requests can carry a token past its refresh
    /// time, or past its expiry, until the timer runs; the API answers 401 and the full
    /// stack ([`AuthReplayLayer`](crate::AuthReplayLayer), or
    /// [`RefreshOn401`](crate::RefreshOn401) with tower's `Retry`) replays them (with
    /// [`AuthLayer`](crate::AuthLayer) alone, the caller gets the 401). With it, each request costs one clock read (about
    /// 20–25 ns), never carries a token past its expiry, and past its refresh time asks
    /// for the refresh ahead (which starts unless one runs, a backoff forbids it, or another
    /// thread holds the cache's lock at that instant; the next request asks again).
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// let config = CacheConfig::default().check_clock_per_request(true);
    /// assert!(config.checks_clock_per_request());
    /// ```
    pub fn check_clock_per_request(mut self, enabled: bool) -> Self {
        self.check_clock = enabled;
        self
    }

    /// Whether [`check_clock_per_request`](Self::check_clock_per_request) is on.
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// assert!(!CacheConfig::default().checks_clock_per_request());
    /// assert!(CacheConfig::default().check_clock_per_request(true).checks_clock_per_request());
    /// ```
    pub fn checks_clock_per_request(&self) -> bool {
        self.check_clock
    }

    /// Names this cache in what operators see: the `cache` label of every `metrics` series
    /// it publishes (feature `metrics`) and the `cache` field of its `token_fetch` spans.
    /// Without a name the series carry no `cache` label, so two caches in one process (two
    /// organisations, say) add to the same series; name them to tell them apart.
    ///
    /// A name is shown in telemetry: never put a secret in it.
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// let config = CacheConfig::default().name("org-emea");
    /// assert_eq!(config.name_value(), Some("org-emea"));
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(Arc::from(name.into()));
        self
    }

    /// The name given with [`name`](Self::name), if any.
    ///
    /// ```
    /// use genesys_auth_layer::CacheConfig;
    ///
    /// assert_eq!(CacheConfig::default().name_value(), None);
    /// assert_eq!(CacheConfig::default().name("org-apac").name_value(), Some("org-apac"));
    /// ```
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

    /// How long to wait after the `consecutive`-th failure in a row.
    fn backoff_after(&self, consecutive: u32, error: &AuthError) -> Duration {
        if let Some(asked) = error.retry_after() {
            // Honour the server, within bounds: `Retry-After: 0` must not turn every
            // caller into a token request, nor a huge value stop refreshing for hours.
            return asked.clamp(self.backoff_initial, self.backoff_max);
        }
        let doubled = self
            .backoff_initial
            .saturating_mul(1u32 << consecutive.saturating_sub(1).min(20));
        let capped = doubled.min(self.backoff_max);
        // "Equal jitter": between half and all of the exponential value, never under the
        // floor.
        (capped / 2 + (capped / 2).mul_f64(random_fraction())).max(MIN_BACKOFF)
    }
}

/// A uniform number in `[0, 1)`, from the standard library's randomly keyed hasher: jitter
/// needs spread, not cryptographic quality, and this keeps `rand` out of the build.
fn random_fraction() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a token was requested; recorded in tracing events (the `token_fetch` span, and the
/// fetched and failed events), not in counters.
///
/// ```
/// use genesys_auth_layer::RefreshReason;
///
/// let reasons = [RefreshReason::Initial, RefreshReason::AheadOfExpiry, RefreshReason::After401];
/// let names = reasons.map(RefreshReason::as_str);
/// assert_eq!(names, ["initial", "ahead-of-expiry", "after-401"]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshReason {
    /// No token was cached, or it had expired: the caller waits.
    Initial,
    /// The token entered its refresh window; requests keep using it meanwhile.
    AheadOfExpiry,
    /// The API answered 401 for the current token.
    After401,
}

impl RefreshReason {
    /// A stable name for logs and metrics.
    ///
    /// ```
    /// use genesys_auth_layer::RefreshReason;
    ///
    /// assert_eq!(RefreshReason::After401.as_str(), "after-401");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::AheadOfExpiry => "ahead-of-expiry",
            Self::After401 => "after-401",
        }
    }
}

type Outcome = Result<Arc<Token>, AuthError>;
type Channel = watch::Receiver<Option<Outcome>>;

/// The slow-path state, behind a mutex that is only ever held for a few instructions and
/// never across an `.await`.
struct RefreshState {
    /// The refresh in flight, if any; its receivers see its outcome.
    in_flight: Option<Channel>,
    /// Its task, so that a refresh given up on is stopped rather than left to run late.
    in_flight_task: Option<AbortHandle>,
    /// Failures since the last success; `retry_at` is when the next attempt is allowed.
    failure: Option<Failure>,
    last_generation: u64,
    last_success: Option<Instant>,
    last_error: Option<(Instant, Arc<AuthError>)>,
}

impl RefreshState {
    /// Whether `channel` is the refresh in flight (and not one given up on or finished).
    fn is_in_flight(&self, channel: &Channel) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|r| r.same_channel(channel))
    }

    /// Whether a backoff after a failure forbids a new token request at `now`.
    fn backing_off(&self, now: Instant) -> bool {
        self.failure.as_ref().is_some_and(|f| now < f.retry_at)
    }
}

/// Failures since the last success.
struct Failure {
    error: Arc<AuthError>,
    consecutive: u32,
    since: Instant,
    retry_at: Instant,
}

struct Inner {
    /// Unique among the caches of this process: names the cache in 401 stamps, so a retry
    /// policy acts only on 401s to its own tokens.
    id: u64,
    current: ArcSwapOption<Token>,
    /// The generation of the current token while it is fresh (before its refresh window),
    /// else 0. `AuthService`s keep the header of the fresh token they last used and check it
    /// against this one load, instead of loading `current`.
    fresh: FreshGeneration,
    state: Mutex<RefreshState>,
    /// A lock-free mirror of `state` for requests in a token's refresh window: nanoseconds
    /// after `epoch` before which no refresh ahead may start (`u64::MAX` while one is in
    /// flight, the end of the backoff after a failure, 0 when idle).
    refresh_blocked_until: AtomicU64,
    epoch: Instant,
    source: Box<dyn TokenSource>,
    config: CacheConfig,
    counters: Counters,
}

/// The next [`TokenCache`]'s identity.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// Every live cache, by id. A response future carries only its cache's id (an `Arc` per
/// request would cost the hot path a reference-count round trip); a 401 it sees reaches
/// the cache through this list, on the cold path. A cache leaves it when dropped.
static CACHES: Mutex<BTreeMap<u64, std::sync::Weak<Inner>>> = Mutex::new(BTreeMap::new());

fn caches() -> MutexGuard<'static, BTreeMap<u64, std::sync::Weak<Inner>>> {
    CACHES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Inner {
    fn drop(&mut self) {
        caches().remove(&self.id);
    }
}

/// The API answered 401 to a token of the cache `id` (a response's stamp); `replay` says
/// whether the request was [`RefreshOn401`](crate::RefreshOn401)'s replay. Counted either
/// way. A first 401's token, if still current, is dropped at once and one refresh starts,
/// without waiting for it. This holds whether or not the request is replayed: a request
/// whose body cannot be copied is not, and the refused token must not be sent again until
/// it expires. A replay's 401 is only counted: its own refresh just ran, and a second one
/// per request would double the token requests of an API that refuses every token.
pub(crate) fn report_401(id: u64, generation: TokenGeneration, replay: bool) {
    // The list's lock is released before the cache is used (or dropped: its `Drop` takes it).
    let inner = caches().get(&id).and_then(std::sync::Weak::upgrade);
    if let Some(inner) = inner {
        inner.counters.unauthorized_answer();
        if !replay {
            TokenCache { inner }.refused(generation);
        }
    }
}

/// The shared token cell behind an [`AuthLayer`](crate::AuthLayer).
///
/// Cloning is cheap and every clone shares the same token. An [`AuthService`](crate::AuthService)
/// reads a valid token with no lock and no clock read: an `ArcSwap` load and the token's
/// phase (fresh, due for refresh, expired), which a timer moves forward.
/// [`token`](Self::token) takes no lock either, and reads the clock once. An [`AuthService`](crate::AuthService) does even
/// less while the token is fresh: it keeps the header it last sent and checks one atomic
/// word holding the fresh token's generation. When a token is missing or expired, one request
/// goes to the token endpoint and every caller awaits its outcome; once a token enters its
/// refresh window, the next request starts a background refresh and goes on with the
/// still-valid token.
///
/// Refreshes run on their own Tokio task (so dropping a waiting request cannot cancel one)
/// and need a runtime with its time driver enabled.
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
/// let token = cache.token().await?;
/// assert_eq!(token.generation().0, 1);
/// assert_eq!(cache.stats().token_requests, 1);
/// cache.token().await?; // cached: no second request
/// assert_eq!(cache.stats().token_requests, 1);
/// # Ok::<(), AuthError>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl TokenCache {
    /// A cache that obtains its tokens from `source`.
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
    /// let cache = TokenCache::new(Fixed, CacheConfig::default().name("org-emea"));
    /// // Nothing is fetched until a token is needed.
    /// assert!(cache.current().is_none());
    /// assert_eq!(cache.stats().token_requests, 0);
    /// ```
    pub fn new(source: impl TokenSource, config: CacheConfig) -> Self {
        let counters = Counters::new(config.name_value());
        let cache = Self {
            inner: Arc::new(Inner {
                id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
                current: ArcSwapOption::empty(),
                state: Mutex::new(RefreshState {
                    in_flight: None,
                    in_flight_task: None,
                    failure: None,
                    last_generation: 0,
                    last_success: None,
                    last_error: None,
                }),
                fresh: FreshGeneration::default(),
                refresh_blocked_until: AtomicU64::new(0),
                epoch: Instant::now(),
                source: Box::new(source),
                config,
                counters,
            }),
        };
        caches().insert(cache.inner.id, Arc::downgrade(&cache.inner));
        cache
    }

    /// The hot path: the header and generation of a token valid now, if there is one.
    ///
    /// Takes no lock, reads no clock while the token is fresh, and allocates nothing (a
    /// `HeaderValue` clone is a reference-count increment). Inside the refresh window it
    /// reads the clock and, unless a refresh runs or the backoff forbids it (both known from
    /// one atomic load), starts a background refresh.
    #[inline]
    pub(crate) fn fresh_header(&self) -> Option<(HeaderValue, TokenGeneration, Instant)> {
        let guard = self.inner.current.load();
        let token = guard.as_deref()?;
        match self.phase_of(token) {
            Phase::Fresh => {}
            Phase::Due => {
                let now = Instant::now();
                if !token.is_valid_at(now) {
                    return None;
                }
                self.refresh_ahead(now);
            }
            Phase::Expired => return None,
        }
        self.inner.counters.request_authorized();
        Some((
            token.header().clone(),
            token.generation(),
            token.refresh_at(),
        ))
    }

    /// The token's phase; with [`CacheConfig::check_clock_per_request`], checked against
    /// the clock too, doing the work of a timer that runs late (the token is marked due and
    /// withdrawn from the services' kept headers).
    #[inline]
    fn phase_of(&self, token: &Token) -> Phase {
        let phase = token.phase();
        if phase == Phase::Fresh && self.inner.config.check_clock {
            self.phase_by_clock(token)
        } else {
            phase
        }
    }

    #[cold]
    #[inline(never)]
    fn phase_by_clock(&self, token: &Token) -> Phase {
        if Instant::now() < token.refresh_at() {
            return Phase::Fresh;
        }
        self.inner.mark_due(token);
        token.phase()
    }

    /// Whether every request checks the clock (see [`CacheConfig::check_clock_per_request`]).
    pub(crate) fn checks_clock(&self) -> bool {
        self.inner.config.check_clock
    }

    /// This cache's identity, unique in the process.
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// The generation of the current token while it is fresh, else 0: a service that
    /// kept the header of that generation may send it without loading the token.
    #[inline]
    pub(crate) fn fresh_generation(&self) -> u64 {
        self.inner.fresh.0.load(Ordering::Acquire)
    }

    /// Counts a request authorized with a header the service kept, or after waiting for a
    /// token.
    #[inline]
    pub(crate) fn count_authorized(&self) {
        self.inner.counters.request_authorized();
    }

    /// A token valid now: the cached one, or a fresh one after waiting for the single
    /// refresh in flight (starting it if needed).
    ///
    /// Fails with the refresh's error (shared by all its waiters) or, while a backoff after
    /// a failure runs, at once with [`AuthError::BackingOff`]. Never waits longer than the
    /// fetch timeout and a second.
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
    /// // Two callers at once share one token request.
    /// let (a, b) = tokio::join!(cache.token(), cache.token());
    /// assert_eq!(a?.generation(), b?.generation());
    /// assert_eq!(cache.stats().token_requests, 1);
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
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
    /// If `generation` is still current, it is dropped and one refresh starts; a 401 for an
    /// older generation (it arrived after a refresh) causes no token request at all, and
    /// neither does one for a generation this cache never issued (the current token is
    /// returned). Any number of concurrent calls for the same generation cause at most one
    /// token request.
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
    /// assert_eq!(cache.stats().token_requests, 2);
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub async fn refresh_after_401(
        &self,
        generation: TokenGeneration,
    ) -> Result<Arc<Token>, AuthError> {
        self.inner.counters.unauthorized_reported();
        self.wait_for_token(RefreshReason::After401, Some(generation))
            .await
    }

    /// The cached token, valid or not, without side effects.
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
    /// assert!(cache.current().is_none());
    /// let token = cache.token().await?;
    /// assert_eq!(cache.current().map(|t| t.generation()), Some(token.generation()));
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }

    /// The counters so far.
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
    /// let token = cache.token().await?;
    /// cache.refresh_after_401(token.generation()).await?;
    /// let stats = cache.stats();
    /// assert_eq!((stats.token_requests, stats.tokens_fetched, stats.fetch_failures), (2, 2, 0));
    /// assert_eq!(stats.unauthorized_reported, 1);
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
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
    /// #             Box::pin(async move { Err(AuthError::UnexpectedStatus { status }) })
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
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
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
            backoff_remaining: state
                .failure
                .as_ref()
                .filter(|f| now < f.retry_at)
                .map(|f| f.retry_at - now),
        }
    }

    /// The API refused the current token: nobody may use it any more, kept headers
    /// included. Called with the state lock held.
    fn withdraw_current(&self) {
        self.inner.current.store(None);
        self.inner.fresh.clear();
    }

    /// Drops the token of `generation` if it is still current, and starts one refresh
    /// (unless one runs or the backoff forbids it) without waiting for it.
    fn refused(&self, generation: TokenGeneration) {
        let launch = {
            let mut state = self.lock_state();
            let current = self.inner.current.load().as_deref().map(Token::generation);
            if current != Some(generation) {
                return;
            }
            self.withdraw_current();
            let now = Instant::now();
            if state.backing_off(now) || self.joinable_refresh(&mut state).is_some() {
                return;
            }
            match self.begin_refresh(&mut state, RefreshReason::After401, false) {
                Ok((_, launch)) => launch,
                // Without a runtime, the next request starts it.
                Err(_) => return,
            }
        };
        launch.spawn();
    }

    /// The slow path, shared by a missing/expired token and a 401.
    async fn wait_for_token(
        &self,
        reason: RefreshReason,
        rejected: Option<TokenGeneration>,
    ) -> Result<Arc<Token>, AuthError> {
        let (mut receiver, launch) = {
            let mut state = self.lock_state();
            let now = Instant::now();
            if let Some(token) = self.inner.current.load_full() {
                // Any generation but the current one is no reason to drop it: an older one
                // was refused before a refresh, and a newer one cannot be this cache's
                // (another cache's generation passed by mistake must not cost a refresh).
                let not_refused = rejected.is_none_or(|g| token.generation() != g);
                if not_refused && token.is_valid_at(now) {
                    return Ok(token);
                }
                if rejected == Some(token.generation()) {
                    self.withdraw_current();
                }
            }
            if reason == RefreshReason::Initial {
                self.inner.counters.waited_for_token();
            }
            match self.joinable_refresh(&mut state) {
                Some(receiver) => (receiver, None),
                None => {
                    if let Some(failure) = &state.failure {
                        if now < failure.retry_at {
                            return Err(AuthError::BackingOff {
                                retry_in: failure.retry_at - now,
                                last: failure.error.clone(),
                            });
                        }
                    }
                    let (receiver, launch) = self.begin_refresh(&mut state, reason, true)?;
                    (receiver, Some(launch))
                }
            }
        };
        // Spawned with the lock released: a runtime that is shutting down drops the task
        // at once, and its guard must be able to take the lock to record that.
        if let Some(launch) = launch {
            launch.spawn();
        }
        // Already decided (for instance a task that could not start published its failure
        // at once): no need to wait, nor to touch a timer.
        let decided = receiver.borrow().clone();
        if let Some(outcome) = decided {
            return outcome;
        }
        // The refresh task bounds itself with the fetch timeout; this bound also holds if
        // that task cannot run (its runtime is blocked or gone).
        let patience = self.inner.config.fetch_timeout + WAIT_GRACE;
        let refresh = receiver.clone();
        let outcome = match tokio::time::timeout(patience, receiver.wait_for(Option::is_some)).await
        {
            Ok(Ok(outcome)) => outcome.clone(),
            Ok(Err(_)) => None,
            Err(_) => {
                let error = AuthError::Timeout(self.inner.config.fetch_timeout);
                self.abandon(&refresh, &error);
                return Err(error);
            }
        };
        outcome.unwrap_or(Err(AuthError::RefreshAborted))
    }

    /// Starts a background refresh for a token inside its refresh window, unless one runs,
    /// the backoff forbids it (both known without a lock), or another thread is deciding.
    fn refresh_ahead(&self, now: Instant) {
        if self.nanos(now) < self.inner.refresh_blocked_until.load(Ordering::Relaxed) {
            return;
        }
        let state = match self.inner.state.try_lock() {
            Ok(state) => state,
            // Like `lock_state`: a panic elsewhere must not stop refreshing for good.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        self.refresh_ahead_locked(state, now);
    }

    /// [`refresh_ahead`](Self::refresh_ahead) for the token's timer, which is the only one
    /// to ask when no request comes: it waits for the lock (never held across an await)
    /// instead of leaving the decision to a caller that may never come, and decides from
    /// the state under the lock rather than from the lock-free hint.
    fn refresh_ahead_from_timer(&self, now: Instant) {
        let state = self.lock_state();
        self.refresh_ahead_locked(state, now);
    }

    /// When the timer of an idle cache looks again after asking for a refresh at `now`: once
    /// the refresh in flight has ended (or had its time), or at the end of the backoff after
    /// a failure.
    fn next_idle_attempt(&self, now: Instant) -> IdleWait {
        let deadline = now + self.inner.config.fetch_timeout + WAIT_GRACE;
        let mut state = self.lock_state();
        if let Some(refresh) = self.joinable_refresh(&mut state) {
            return IdleWait::Refresh(refresh, deadline);
        }
        match &state.failure {
            Some(failure) if failure.retry_at > now => IdleWait::Until(failure.retry_at),
            // Neither running nor backing off: the refresh already published a newer token
            // (or the current one is not due), so there is nothing left to do.
            _ => IdleWait::Done,
        }
    }

    fn refresh_ahead_locked(&self, mut state: MutexGuard<'_, RefreshState>, now: Instant) {
        let still_due = self
            .inner
            .current
            .load()
            .as_deref()
            .is_some_and(|t| now >= t.refresh_at() && t.is_valid_at(now));
        let backing_off = state.backing_off(now);
        if still_due && !backing_off && self.joinable_refresh(&mut state).is_none() {
            // Without a runtime the request goes on with the still-valid token.
            if let Ok((_, launch)) =
                self.begin_refresh(&mut state, RefreshReason::AheadOfExpiry, false)
            {
                drop(state);
                launch.spawn();
            }
        }
    }

    /// The refresh in flight, if its task is still alive.
    fn joinable_refresh(&self, state: &mut RefreshState) -> Option<Channel> {
        match &state.in_flight {
            // `has_changed` fails once the sender is gone: the task died without reporting.
            Some(receiver) if receiver.has_changed().is_ok() => Some(receiver.clone()),
            Some(_) => {
                state.in_flight = None;
                self.inner.refresh_blocked_until.store(0, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Marks a refresh as in flight (under the lock) and returns what spawns it, to be
    /// called once the lock is released. The task runs to completion even if every caller
    /// that waits on it goes away, so dropping a request never cancels a refresh others need.
    /// `awaited`: a caller waits for this refresh from its start.
    fn begin_refresh(
        &self,
        state: &mut RefreshState,
        reason: RefreshReason,
        awaited: bool,
    ) -> Result<(Channel, RefreshLaunch), AuthError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AuthError::NoRuntime)?;
        let (sender, receiver) = watch::channel(None);
        state.in_flight = Some(receiver.clone());
        state.in_flight_task = None;
        self.inner
            .refresh_blocked_until
            .store(u64::MAX, Ordering::Relaxed);
        self.inner.counters.token_request();
        let launch = RefreshLaunch {
            runtime,
            guard: RefreshGuard {
                cache: self.clone(),
                channel: receiver.clone(),
                sender: Some(sender),
                reason,
            },
            // With a caller waiting, counted from now, not from when the task first runs: a
            // task that starts late must not send a request its waiters have already given
            // up on. A refresh nobody waits for yet (ahead of expiry, or after a 401 seen
            // in a response) is counted from its first run, since its runtime may not run
            // it before the next call (`block_on` per call), which would otherwise find it
            // timed out without having asked.
            deadline: awaited.then(|| Instant::now() + self.inner.config.fetch_timeout),
        };
        Ok((receiver, launch))
    }

    /// Records a refresh's result: the new token, or the failure and its backoff. Events
    /// are emitted after the lock is released.
    ///
    /// `channel` identifies the refresh: if a waiter gave up on it and another refresh
    /// started meanwhile, this late result must not clear that one's in-flight marker.
    fn complete(
        &self,
        channel: &Channel,
        result: Result<crate::IssuedToken, AuthError>,
        requested_at: Instant,
        reason: RefreshReason,
    ) -> Outcome {
        let now = Instant::now();
        let mut state = self.lock_state();
        let own = state.is_in_flight(channel);
        if own {
            state.in_flight = None;
            state.in_flight_task = None;
        }
        let idle = state.in_flight.is_none();
        let result = result.and_then(|issued| {
            let lifetime = issued.lifetime();
            let window = self.inner.config.refresh_window(lifetime);
            let generation = TokenGeneration(state.last_generation + 1);
            let token = Token::new(issued, generation, requested_at, window);
            // A token with almost no life left would cost a refresh per round trip.
            let least = (lifetime / 10).min(Duration::from_secs(1));
            if token.is_valid_at(now + least) {
                Ok((Arc::new(token), lifetime, window))
            } else {
                Err(InvalidTokenResponse::ExpiredOnArrival.into())
            }
        });
        match result {
            Ok((token, lifetime, window)) => {
                state.last_generation = token.generation().0;
                state.last_success = Some(now);
                let recovered = if idle { state.failure.take() } else { None };
                self.inner.current.store(Some(token.clone()));
                self.inner.fresh.publish(&token);
                // Armed once the token is current: a token that arrives already due has a
                // timer that may run at once on another thread, and its idle refresh gives
                // up on a token that is not current.
                self.arm_timers(&token);
                if idle {
                    self.inner.refresh_blocked_until.store(0, Ordering::Relaxed);
                }
                drop(state);

                self.inner.counters.token_fetched();
                tracing::info!(
                    target: "genesys_auth_layer::token",
                    generation = token.generation().0,
                    lifetime_secs = lifetime.as_secs(),
                    refresh_in_secs = (lifetime - window).as_secs(),
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
            Err(error) => {
                if own {
                    state.in_flight_task = None;
                    self.record_failure(state, &error, now, reason);
                }
                // Otherwise a waiter gave up on this refresh and recorded that already, or
                // a newer refresh is in flight and its outcome decides what happens next.
                Err(error)
            }
        }
    }

    /// Records a failure and its backoff, and releases the lock before logging.
    fn record_failure(
        &self,
        mut state: MutexGuard<'_, RefreshState>,
        error: &AuthError,
        now: Instant,
        reason: RefreshReason,
    ) {
        let previous = state.failure.take();
        let consecutive = previous
            .as_ref()
            .map_or(0, |f| f.consecutive)
            .saturating_add(1);
        let wait = self.inner.config.backoff_after(consecutive, error);
        let retry_at = now + wait;
        let shared = Arc::new(error.clone());
        state.last_error = Some((now, shared.clone()));
        state.failure = Some(Failure {
            error: shared,
            consecutive,
            since: previous.map_or(now, |f| f.since),
            retry_at,
        });
        self.inner
            .refresh_blocked_until
            .store(self.nanos(retry_at), Ordering::Relaxed);
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

    /// A caller gave up waiting on `channel`: if it is still the refresh in flight, forget
    /// it and record the failure, so the next caller starts afresh after the backoff.
    fn abandon(&self, channel: &Channel, error: &AuthError) {
        let mut state = self.lock_state();
        if state.is_in_flight(channel) {
            state.in_flight = None;
            if let Some(task) = state.in_flight_task.take() {
                task.abort();
            }
            self.record_failure(state, error, Instant::now(), RefreshReason::Initial);
        }
    }

    /// Spawns the timer that moves a new token's phase to "due" at its refresh time and to
    /// "expired" at its expiry; it stops when the token is dropped.
    fn arm_timers(&self, token: &Arc<Token>) {
        let (refresh_at, expires_at) = (token.refresh_at(), token.expires_at());
        let mut guard = PhaseTimerGuard {
            token: Arc::downgrade(token),
            cache: Arc::downgrade(&self.inner),
            finished: false,
        };
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(refresh_at).await;
            let Some(token) = guard.token.upgrade() else {
                return guard.finish();
            };
            guard.mark_due(&token);
            let generation = token.generation();
            drop(token);
            guard.refresh_while_idle(generation, expires_at).await;
            tokio::time::sleep_until(expires_at).await;
            if let Some(token) = guard.token.upgrade() {
                token.advance_phase(Phase::Expired);
            }
            guard.finish();
        });
        token.set_timer(timer.abort_handle());
    }

    fn nanos(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.inner.epoch).as_nanos();
        u64::try_from(since)
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1)
    }

    fn lock_state(&self) -> MutexGuard<'_, RefreshState> {
        // The lock guards plain data that every writer leaves consistent; if a panic ever
        // poisoned it, carry on rather than turn one panic into many.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A refresh marked in flight, to be spawned once the state lock is released.
struct RefreshLaunch {
    runtime: tokio::runtime::Handle,
    guard: RefreshGuard,
    /// When the fetch is given up; `None`: the fetch timeout from the task's first run.
    deadline: Option<Instant>,
}

impl RefreshLaunch {
    fn spawn(self) {
        let Self {
            runtime,
            mut guard,
            deadline,
        } = self;
        let cache = guard.cache.clone();
        let channel = guard.channel.clone();
        let reason = guard.reason;
        let span = tracing::info_span!(
            target: "genesys_auth_layer::token",
            "token_fetch",
            reason = reason.as_str(),
            cache = guard.cache.inner.config.name_value()
        );
        let task = runtime.spawn(
            async move {
                let requested_at = Instant::now();
                let timeout = guard.cache.inner.config.fetch_timeout;
                let deadline = deadline.unwrap_or(requested_at + timeout);
                let result = if requested_at >= deadline {
                    Err(AuthError::Timeout(timeout))
                } else {
                    let fetch = guard.cache.inner.source.fetch();
                    match tokio::time::timeout_at(deadline, fetch).await {
                        Ok(result) => result,
                        Err(_) => Err(AuthError::Timeout(timeout)),
                    }
                };
                let outcome = guard
                    .cache
                    .complete(&guard.channel, result, requested_at, reason);
                guard.publish(outcome);
            }
            .instrument(span),
        );
        // Recorded so that a waiter giving up on this refresh can stop it.
        let mut state = cache.lock_state();
        if state.is_in_flight(&channel) {
            state.in_flight_task = Some(task.abort_handle());
        }
    }
}

/// Lives in the refresh task and owns its result channel: if the task ends before
/// publishing (the token source panicked, the runtime shut down, a waiter aborted it), the
/// failure is recorded with its backoff and published, so the next caller neither reuses a
/// dead refresh nor starts one per call.
struct RefreshGuard {
    cache: TokenCache,
    channel: Channel,
    sender: Option<watch::Sender<Option<Outcome>>>,
    reason: RefreshReason,
}

impl RefreshGuard {
    /// Tells every waiter the outcome. Nobody listening is fine: the token is stored
    /// either way.
    fn publish(&mut self, outcome: Outcome) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Some(outcome));
        }
    }
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        if self.sender.is_some() {
            let outcome = self.cache.complete(
                &self.channel,
                Err(AuthError::RefreshAborted),
                Instant::now(),
                self.reason,
            );
            self.publish(outcome);
        }
    }
}

impl Inner {
    /// `token` is due for refresh: its phase first, then the fresh-generation word (the
    /// order `FreshGeneration::publish` relies on). Done by the token's timer, or by a
    /// request that read the clock before a late timer.
    fn mark_due(&self, token: &Token) {
        token.advance_phase(Phase::Due);
        self.fresh.retire(token.generation());
    }
}

/// What the timer of an idle cache waits for before it looks again.
enum IdleWait {
    /// The refresh in flight to end, at the latest by the instant given.
    Refresh(Channel, Instant),
    /// The end of a backoff.
    Until(Instant),
    /// Nothing: a newer token is current.
    Done,
}

/// Lives in a token's phase timer: if the timer is dropped before it finished (its runtime
/// shut down), the token is marked due, so requests read the clock again instead of
/// trusting a phase nobody will advance.
struct PhaseTimerGuard {
    token: std::sync::Weak<Token>,
    cache: std::sync::Weak<Inner>,
    finished: bool,
}

impl PhaseTimerGuard {
    fn finish(&mut self) {
        self.finished = true;
    }

    /// Marks the token due, and withdraws it from the services' kept headers.
    fn mark_due(&self, token: &Token) {
        match self.cache.upgrade() {
            Some(cache) => cache.mark_due(token),
            None => token.advance_phase(Phase::Due),
        }
    }

    /// With [`CacheConfig::refresh_while_idle`], does what requests in the window would do
    /// while none comes: starts the refresh ahead, and after a failure starts it again once
    /// the backoff allows, until a newer token is current or this one (`generation`)
    /// expires. The cache is held only while deciding, never while sleeping: the refresh
    /// task keeps it alive until its fetch ends, and a cache whose every handle is gone is
    /// not refreshed.
    async fn refresh_while_idle(&self, generation: TokenGeneration, expires_at: Instant) {
        loop {
            let next = {
                let Some(inner) = self.cache.upgrade() else {
                    return;
                };
                if !inner.config.refresh_while_idle {
                    return;
                }
                let cache = TokenCache { inner };
                let still_current = cache
                    .inner
                    .current
                    .load()
                    .as_deref()
                    .is_some_and(|t| t.generation() == generation);
                let now = Instant::now();
                if !still_current || now >= expires_at {
                    return;
                }
                cache.refresh_ahead_from_timer(now);
                cache.next_idle_attempt(now)
            };
            match next {
                IdleWait::Refresh(mut refresh, deadline) => {
                    let ended = refresh.wait_for(Option::is_some);
                    let _ = tokio::time::timeout_at(deadline.min(expires_at), ended).await;
                }
                IdleWait::Until(at) => tokio::time::sleep_until(at.min(expires_at)).await,
                IdleWait::Done => return,
            }
        }
    }
}

impl Drop for PhaseTimerGuard {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(token) = self.token.upgrade() {
                self.mark_due(&token);
            }
        }
    }
}

/// The generation of the current token while it is fresh, else 0; on a cache line of its
/// own, since every request reads it and almost nothing writes it.
#[repr(align(128))]
#[derive(Default)]
struct FreshGeneration(AtomicU64);

impl FreshGeneration {
    /// `token` was just stored as the current token. Its timer may already have marked it
    /// due (on another thread, with a tiny lifetime): then the timer's `retire` either ran
    /// after this store and cleared it, or ran before and this check clears it. `SeqCst` on
    /// both sides (here and in `Token::advance_phase`) is what makes that either-or hold.
    fn publish(&self, token: &Token) {
        let generation = token.generation().0;
        self.0.store(generation, Ordering::SeqCst);
        if token.phase() != Phase::Fresh {
            self.retire(token.generation());
        }
    }

    /// No token is fresh (the current one was refused).
    fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// `generation` is not fresh any more (if it is still the one published).
    fn retire(&self, generation: TokenGeneration) {
        let _ = self
            .0
            .compare_exchange(generation.0, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
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

    /// A token source whose answers are scripted; it counts calls and can be slow.
    #[derive(Clone, Default)]
    struct Scripted {
        calls: Arc<AtomicUsize>,
        script: Arc<Mutex<VecDeque<Result<IssuedToken, AuthError>>>>,
        delay: Duration,
        lifetime: Duration,
        hang: bool,
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

    #[test]
    fn publishing_races_with_the_timer_never_leave_a_due_token_fresh() {
        // The timer (another thread) marks the token due while it is being published:
        // whichever order the two land in, the word ends at 0.
        for round in 1..=5_000u64 {
            let issued = IssuedToken::bearer("t", Duration::from_secs(100)).unwrap();
            let token = Arc::new(Token::new(
                issued,
                TokenGeneration(round),
                Instant::now(),
                Duration::from_secs(10),
            ));
            let word = Arc::new(FreshGeneration::default());
            let timer = {
                let (token, word) = (token.clone(), word.clone());
                std::thread::spawn(move || {
                    token.advance_phase(Phase::Due);
                    word.retire(token.generation());
                })
            };
            word.publish(&token);
            timer.join().unwrap();
            assert_eq!(word.0.load(Ordering::SeqCst), 0, "round {round}");
        }
    }

    #[test]
    fn the_fresh_generation_names_only_a_fresh_current_token() {
        let token = |generation| {
            let issued = IssuedToken::bearer("t", Duration::from_secs(100)).unwrap();
            Token::new(
                issued,
                TokenGeneration(generation),
                Instant::now(),
                Duration::from_secs(10),
            )
        };
        let word = FreshGeneration::default();
        let first = token(1);
        word.publish(&first);
        assert_eq!(word.0.load(Ordering::SeqCst), 1);
        // An older token's timer cannot withdraw a newer one.
        let second = token(2);
        word.publish(&second);
        first.advance_phase(Phase::Due);
        word.retire(first.generation());
        assert_eq!(word.0.load(Ordering::SeqCst), 2);
        word.retire(second.generation());
        assert_eq!(word.0.load(Ordering::SeqCst), 0);
        // A token whose timer marked it due before it was published is not published.
        let third = token(3);
        third.advance_phase(Phase::Due);
        word.publish(&third);
        assert_eq!(word.0.load(Ordering::SeqCst), 0);
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
        assert_eq!(cache.stats().token_requests, 1);
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
            let (_, generation, _) = cache.fresh_header().expect("a valid token at every step");
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
        // The token outlives the cache (a caller still holds it), so its timer still runs.
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
        // The token's timer marks it expired once the runtime runs it.
        tokio::task::yield_now().await;
        assert!(
            cache.fresh_header().is_none(),
            "an expired token is never sent"
        );
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
        assert_eq!(cache.stats().unauthorized_reported, 1001);
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
    fn a_dropped_cache_leaves_the_list_401s_are_reported_through() {
        let listed = |id| caches().contains_key(&id);
        let cache = TokenCache::new(Scripted::default(), config());
        let id = cache.id();
        assert!(listed(id));
        let clone = cache.clone();
        drop(cache);
        assert!(listed(id), "a clone keeps it");
        drop(clone);
        assert!(!listed(id));
        // A report for a cache that is gone is ignored.
        report_401(id, TokenGeneration(1), false);
    }

    #[test]
    fn backoff_never_goes_under_its_floor() {
        let config = CacheConfig::default().backoff(Duration::ZERO, Duration::ZERO);
        let error = AuthError::UnexpectedStatus {
            status: http::StatusCode::BAD_GATEWAY,
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
            cache.fresh_header().is_none(),
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
        let err = cache.token().await.unwrap_err();
        assert!(matches!(err, AuthError::BackingOff { .. }), "{err}");
        assert!(err.is_fatal());
        assert_eq!(source.calls(), 1);

        // After it (1 s with equal jitter is at most 1 s): one new request, which succeeds.
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
            }));
        }
        let mut waits = Vec::new();
        for _ in 0..6 {
            assert!(cache.token().await.is_err());
            let Err(AuthError::BackingOff { retry_in, .. }) = cache.token().await else {
                panic!("expected backoff");
            };
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
        assert!(matches!(
            cache.token().await,
            Err(AuthError::BackingOff { .. })
        ));
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
        let Err(AuthError::BackingOff { retry_in, .. }) = cache.token().await else {
            panic!("Retry-After: 0 still backs off");
        };
        assert_eq!(retry_in, Duration::from_secs(1));
        tokio::time::advance(retry_in).await;
        assert!(cache.token().await.is_err());
        let Err(AuthError::BackingOff { retry_in, .. }) = cache.token().await else {
            panic!("expected backoff");
        };
        assert_eq!(
            retry_in,
            Duration::from_secs(8),
            "capped at the configured maximum"
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
            }));
        }
        // In the refresh window with a failing endpoint: every request still gets the token,
        // and token requests are spaced by the backoff, not made per request.
        tokio::time::advance(Duration::from_secs(91)).await;
        for _ in 0..80 {
            assert!(cache.fresh_header().is_some());
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
        assert!(matches!(b, Err(AuthError::RefreshAborted)), "{b:?}");
        for _ in 0..5 {
            assert!(matches!(
                cache.token().await,
                Err(AuthError::BackingOff { .. })
            ));
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
        assert!(matches!(
            cache.token().await,
            Err(AuthError::BackingOff { .. })
        ));
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
        let Err(AuthError::BackingOff { retry_in, .. }) = cache.token().await else {
            panic!("expected a backoff");
        };
        assert_eq!(retry_in, MAX_BACKOFF);
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
            assert!(matches!(
                cache.token().await,
                Err(AuthError::BackingOff { .. })
            ));
        });
        drop(a);
    }

    #[test]
    fn a_token_whose_timer_runtime_is_gone_is_checked_against_the_clock() {
        let source = Scripted::new(Duration::from_millis(300), Duration::ZERO);
        let cache = TokenCache::new(source.clone(), config());
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let a = runtime();
        a.block_on(cache.token()).unwrap();
        assert_eq!(cache.fresh_generation(), 1);
        drop(a); // the token's phase timer dies with it
                 // ... and withdraws the fresh generation, so no service keeps sending its header.
        assert_eq!(cache.fresh_generation(), 0);
        std::thread::sleep(Duration::from_millis(400));
        runtime().block_on(async {
            assert!(
                cache.fresh_header().is_none(),
                "expired, though no timer said so"
            );
            let token = cache.token().await.unwrap();
            assert_eq!(token.generation(), TokenGeneration(2));
        });
        assert_eq!(source.calls(), 2);
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
}
