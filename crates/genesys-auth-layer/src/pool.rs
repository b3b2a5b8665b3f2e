//! [`TokenPool`]: several tokens of one client, each paced under Genesys' per-token limit.
//!
//! Genesys lets each client-credentials token send 300 API requests a minute. A pool holds
//! up to `max_tokens` tokens of the same client (each slot a [`TokenCache`] of its own, with
//! its own single flight, refresh ahead and generation-scoped 401) and sends each request on
//! a slot that has budget left, so that no token goes over its limit.
//!
//! The whole schedule is one small state under one lock, taken once or twice per request:
//!
//! * **Pacing.** Each slot keeps the send times of its last `budget` requests. A request
//!   may go on a slot at `max(now, oldest of those + window)`: no window of that length
//!   ever holds more than `budget` of the slot's requests (with 1 % of the window as margin
//!   for the network's jitter). A request takes the slot that frees first and *reserves*
//!   its instant there, then sleeps until it: waiting requests are served in order, with no
//!   wake-up machinery.
//! * **Growth.** When no slot is free now, the pool adds one (up to `max_tokens`) rather
//!   than make the request wait.
//! * **429.** A 429 parks its slot until the answer's `Retry-After` (3 s when absent) and
//!   the request is replayed once, on the slot that frees first. If another slot is parked
//!   at that moment, tokens with budget are being refused: the limit is wider than a token
//!   (the client's or the org's), so the pool stops growing for a while and gives up its
//!   newest slot (at most one per window), and requests wait out the `Retry-After`.
//! * **Bounded wait.** A request that would wait longer than `max_wait`, or find
//!   `max_queued` requests already waiting, fails at once with [`RateLimited`] instead of
//!   being sent to a certain 429.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::api_retry::MIN_RETRY_WAIT;
use crate::auth::{AuthReplayLayer, Scope};
use crate::cache::{TokenCache, RETRY_AFTER_CAP};
use crate::retry::{replayable_copy, ReplayableBody};
use crate::source::parse::parse_retry_after;
use crate::source::BoxFuture;

/// The most tokens a pool holds unless told otherwise.
pub const DEFAULT_POOL_MAX_TOKENS: usize = 4;
/// Genesys' per-token limit: 300 API requests ...
pub const DEFAULT_TOKEN_BUDGET: u32 = 300;
/// ... per minute (`client.credentials.token.rate.per.minute`).
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(60);
/// The longest a request waits for budget before it fails with [`RateLimited`].
pub const DEFAULT_MAX_BUDGET_WAIT: Duration = Duration::from_secs(60);
/// The most requests waiting for budget at once; one more fails with [`RateLimited`].
pub const DEFAULT_MAX_QUEUED: usize = 4_096;
/// How long the pool stops growing after it saw that the limit is wider than a token.
pub const DEFAULT_GROWTH_HOLD: Duration = Duration::from_secs(10 * 60);
/// How long a 429 without a readable `Retry-After` parks its token (as Genesys' SDKs wait).
/// A `Retry-After` is honoured from [`MIN_RETRY_WAIT`] up to
/// [`RETRY_AFTER_CAP`](crate::RETRY_AFTER_CAP).
pub const DEFAULT_PARK: Duration = Duration::from_secs(3);

/// The longest window, wait or hold a [`TokenPoolConfig`] takes: a day, so that no instant
/// computed from them overflows.
const LONGEST: Duration = Duration::from_secs(24 * 60 * 60);

/// `genesys_auth_pool_tokens`: a gauge, the slots a pool is using.
pub const METRIC_POOL_TOKENS: &str = "genesys_auth_pool_tokens";
/// `genesys_auth_pool_rate_limited_total`: 429 answers to a pooled token (each parks it).
pub const METRIC_POOL_RATE_LIMITED: &str = "genesys_auth_pool_rate_limited_total";
/// `genesys_auth_pool_replays_total`: requests replayed on another slot after a 429.
pub const METRIC_POOL_REPLAYS: &str = "genesys_auth_pool_replays_total";
/// `genesys_auth_pool_budget_wait_ms_total`: time requests waited for budget, summed, in
/// milliseconds.
pub const METRIC_POOL_BUDGET_WAIT: &str = "genesys_auth_pool_budget_wait_ms_total";
/// `genesys_auth_pool_rejected_total`: requests failed with [`RateLimited`].
pub const METRIC_POOL_REJECTED: &str = "genesys_auth_pool_rejected_total";

/// How a [`TokenPool`] paces and grows. Built from [`TokenPoolConfig::new`] (Genesys'
/// defaults) and its setters; out-of-range values are raised to the smallest that works,
/// never a panic.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::TokenPoolConfig;
///
/// // An org whose per-token limit support raised to 600 a minute, and callers who would
/// // rather fail fast than wait more than 5 s for budget.
/// let config = TokenPoolConfig::new()
///     .max_tokens(8)
///     .token_budget(600, Duration::from_secs(60))
///     .max_wait(Duration::from_secs(5));
/// assert_eq!(config.max_tokens_value(), 8);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPoolConfig {
    max_tokens: usize,
    budget: u32,
    window: Duration,
    max_wait: Duration,
    max_queued: usize,
    growth_hold: Duration,
}

impl Default for TokenPoolConfig {
    fn default() -> Self {
        Self {
            max_tokens: DEFAULT_POOL_MAX_TOKENS,
            budget: DEFAULT_TOKEN_BUDGET,
            window: DEFAULT_BUDGET_WINDOW,
            max_wait: DEFAULT_MAX_BUDGET_WAIT,
            max_queued: DEFAULT_MAX_QUEUED,
            growth_hold: DEFAULT_GROWTH_HOLD,
        }
    }
}

impl TokenPoolConfig {
    /// Genesys' defaults: up to [`DEFAULT_POOL_MAX_TOKENS`] tokens, each paced to
    /// [`DEFAULT_TOKEN_BUDGET`] requests per [`DEFAULT_BUDGET_WINDOW`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The most tokens the pool holds (at least 1).
    pub fn max_tokens(mut self, max: usize) -> Self {
        self.max_tokens = max.max(1);
        self
    }

    /// The most tokens the pool holds.
    pub fn max_tokens_value(&self) -> usize {
        self.max_tokens
    }

    /// Each token sends at most `requests` requests (at least 1) in any `window` (at least
    /// 1 ms, at most a day). Set it to your org's per-token limit when support raised it.
    pub fn token_budget(mut self, requests: u32, window: Duration) -> Self {
        self.budget = requests.max(1);
        self.window = window.clamp(Duration::from_millis(1), LONGEST);
        self
    }

    /// The longest a request waits for budget (at most a day); past it, [`RateLimited`]
    /// at once.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait.min(LONGEST);
        self
    }

    /// The most requests that wait for budget at once; one more gets [`RateLimited`].
    pub fn max_queued(mut self, requests: usize) -> Self {
        self.max_queued = requests;
        self
    }

    /// How long the pool stops growing once it has seen that the limit is wider than a
    /// token (at most a day); after it, the pool tries growing again (and stops again if
    /// that still fails).
    pub fn growth_hold(mut self, hold: Duration) -> Self {
        self.growth_hold = hold.min(LONGEST);
        self
    }

    /// The pacing period: the window and 1 % of it as margin, so that requests sent a
    /// window apart do not land in one server window by the network's jitter.
    fn period(&self) -> Duration {
        self.window + self.window / 100
    }
}

/// Every token of a [`TokenPool`] is out of budget for longer than the pool lets a request
/// wait (or too many requests wait already): the request was not sent.
///
/// It comes boxed in the service's [`BoxError`]; `downcast_ref::<RateLimited>()` gets it
/// back. Not to be confused with [`AuthError::RateLimited`](crate::AuthError::RateLimited),
/// a 429 from the *token* endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("every pooled token is out of budget: the next request could be sent in {retry_after:?}, past the pool's wait bound")]
#[non_exhaustive]
pub struct RateLimited {
    /// When the pool could have sent the request.
    pub retry_after: Duration,
    /// `true`: the queue of waiting requests was full; `false`: the wait was too long.
    pub queue_full: bool,
}

/// A snapshot of a [`TokenPool`]'s counters and state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Slots in use now.
    pub tokens: usize,
    /// Slots ever created (each has its own token): `tokens` and the ones given up.
    pub slots_created: usize,
    /// Slots parked by a 429 now.
    pub parked: usize,
    /// Requests waiting for budget now.
    pub waiting: usize,
    /// Whether growth is stopped now, because the limit was seen to be wider than a token.
    pub growth_stopped: bool,
    /// 429 answers to pooled tokens.
    pub rate_limited: u64,
    /// Requests replayed on another slot after a 429.
    pub replays_after_429: u64,
    /// Times the pool saw tokens with budget refused (the limit is the client's or org's).
    pub wider_limit_seen: u64,
    /// Requests that waited for budget.
    pub budget_waits: u64,
    /// The time requests waited for budget, summed.
    pub budget_waited: Duration,
    /// Requests failed with [`RateLimited`].
    pub rejected: u64,
    /// Token refreshes of all slots (each one token request).
    pub refreshes: u64,
}

/// Up to `max_tokens` tokens of one client, each paced under its budget; its
/// [`layer`](Self::layer) sends each request on a token with budget. Cheap to clone: clones
/// share the pool. The module docs (above) give the rules.
///
/// Build it once from a [`GenesysAuth`](crate::GenesysAuth) with
/// [`GenesysAuth::token_pool`](crate::GenesysAuth::token_pool): its first slot is the
/// auth's own cache, the others are created as the pool grows. Use the pool's layer
/// *instead of* [`GenesysAuth::layers`](crate::GenesysAuth::layers) for the API calls it
/// paces; requests sent through both share the first token's budget unknowingly.
///
/// ```
/// # async fn demo(auth: genesys_auth_layer::GenesysAuth) -> Result<(), tower::BoxError> {
/// use genesys_auth_layer::{ApiRetry, TokenPoolConfig};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(4));
/// let client = ServiceBuilder::new()
///     .layer(ApiRetry::new().layer()) // waits out the 429s of a limit wider than a token
///     .layer(pool.layer())
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: TokenPoolConfig,
    scope: Scope,
    state: Mutex<PoolState>,
    counters: Counters,
}

/// The schedule. Invariants, kept under the lock:
/// * `1 <= usable <= slots.len() <= max_tokens`; requests are reserved on `slots[..usable]`.
/// * each slot's `sent` is non-decreasing and holds at most `budget` instants.
struct PoolState {
    slots: Vec<Slot>,
    usable: usize,
    growth_stopped_until: Option<Instant>,
    last_shrink: Option<Instant>,
    queued: usize,
}

struct Slot {
    layer: AuthReplayLayer,
    /// The instants the last `budget` requests were (or are to be) sent at.
    sent: VecDeque<Instant>,
    parked_until: Option<Instant>,
}

impl Slot {
    fn new(cache: TokenCache, scope: Scope) -> Self {
        Self {
            layer: AuthReplayLayer::new(cache, scope),
            sent: VecDeque::new(),
            parked_until: None,
        }
    }

    /// The earliest instant from `now` a request may be sent on this slot: not parked,
    /// the `budget`-th last request a period back, and not before the last one reserved.
    fn free_at(&self, now: Instant, config: &TokenPoolConfig) -> Instant {
        let mut at = now;
        if let Some(parked) = self.parked_until {
            at = at.max(parked);
        }
        if let Some(&last) = self.sent.back() {
            at = at.max(last);
        }
        if self.sent.len() >= config.budget as usize {
            at = at.max(self.sent[0] + config.period());
        }
        at
    }

    fn is_parked(&self, now: Instant) -> bool {
        self.parked_until.is_some_and(|until| until > now)
    }
}

/// A slot reserved at an instant.
struct Reservation {
    slot: usize,
    at: Instant,
    layer: AuthReplayLayer,
}

impl TokenPool {
    /// A pool whose first slot is `cache` (the others are its siblings: same source and
    /// configuration), attaching tokens to requests in `scope`.
    pub fn new(cache: TokenCache, scope: Scope, config: TokenPoolConfig) -> Self {
        let counters = Counters::default();
        counters.tokens(1);
        Self {
            inner: Arc::new(PoolInner {
                state: Mutex::new(PoolState {
                    slots: vec![Slot::new(cache, scope.clone())],
                    usable: 1,
                    growth_stopped_until: None,
                    last_shrink: None,
                    queued: 0,
                }),
                config,
                scope,
                counters,
            }),
        }
    }

    /// The layer that sends each request in scope on a pooled token with budget.
    pub fn layer(&self) -> TokenPoolLayer {
        TokenPoolLayer { pool: self.clone() }
    }

    /// The configuration.
    pub fn config(&self) -> &TokenPoolConfig {
        &self.inner.config
    }

    /// A snapshot of the counters and of the schedule.
    pub fn stats(&self) -> PoolStats {
        let now = Instant::now();
        let state = self.lock();
        let c = &self.inner.counters;
        PoolStats {
            tokens: state.usable,
            slots_created: state.slots.len(),
            parked: state.slots.iter().filter(|s| s.is_parked(now)).count(),
            waiting: state.queued,
            growth_stopped: state.growth_stopped_until.is_some_and(|until| until > now),
            rate_limited: c.rate_limited.get(),
            replays_after_429: c.replays.get(),
            wider_limit_seen: c.wider.load(Ordering::Relaxed),
            budget_waits: c.waits.load(Ordering::Relaxed),
            budget_waited: Duration::from_micros(c.waited_micros.load(Ordering::Relaxed)),
            rejected: c.rejected.get(),
            refreshes: state
                .slots
                .iter()
                .map(|s| s.layer.cache().stats().refreshes)
                .sum(),
        }
    }

    /// The caches of the slots created so far, first slot first.
    pub fn caches(&self) -> Vec<TokenCache> {
        self.lock()
            .slots
            .iter()
            .map(|s| s.layer.cache().clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The lock guards plain data changed in small steps that cannot panic halfway; a
        // poisoned lock still holds a consistent schedule.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves the slot that frees first (growing the pool when none is free now), or
    /// fails when that is past `deadline` or the queue is full.
    fn reserve(&self, now: Instant, deadline: Instant) -> Result<Reservation, RateLimited> {
        let config = &self.inner.config;
        let mut state = self.lock();
        let (mut slot, mut at) = state.first_free(now, config);
        if at > now && state.can_grow(now, config) {
            state.grow(&self.inner.scope);
            self.inner.counters.tokens(state.usable);
            tracing::debug!(
                target: "genesys_auth_layer::pool",
                tokens = state.usable,
                "every pooled token is out of budget; the pool grows"
            );
            (slot, at) = state.first_free(now, config);
        }
        if at > now {
            let full = state.queued >= config.max_queued;
            if at > deadline || full {
                drop(state);
                self.inner.counters.rejected.add(1);
                tracing::debug!(
                    target: "genesys_auth_layer::pool",
                    wait_ms = (at - now).as_millis() as u64,
                    queue_full = full,
                    "request not sent: no pooled token has budget within the wait bound"
                );
                return Err(RateLimited {
                    retry_after: at - now,
                    queue_full: full,
                });
            }
            state.queued += 1;
        }
        let chosen = &mut state.slots[slot];
        chosen.sent.push_back(at);
        if chosen.sent.len() > config.budget as usize {
            chosen.sent.pop_front();
        }
        Ok(Reservation {
            slot,
            at,
            layer: chosen.layer.clone(),
        })
    }

    /// A slot with budget, waiting for it up to the configured bound: a reservation, then
    /// a sleep until it; if the slot was parked meanwhile, another reservation.
    async fn acquire(&self) -> Result<(usize, AuthReplayLayer), RateLimited> {
        let start = Instant::now();
        let deadline = start + self.inner.config.max_wait;
        loop {
            let now = Instant::now();
            let reservation = self.reserve(now, deadline)?;
            if reservation.at > now {
                let _queued = Queued(self);
                tokio::time::sleep_until(reservation.at).await;
            }
            let now = Instant::now();
            if !self.lock().slots[reservation.slot].is_parked(now) {
                if now > start {
                    self.inner.counters.waited(now - start);
                }
                return Ok((reservation.slot, reservation.layer));
            }
        }
    }

    /// The API answered 429 to slot `slot`: park it for `wait`. If another slot is parked
    /// too, the limit is wider than a token: stop growing, and give up the newest slot (at
    /// most once per window).
    fn refused(&self, slot: usize, wait: Duration) {
        let config = &self.inner.config;
        let now = Instant::now();
        let mut state = self.lock();
        let others_parked = state
            .slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != slot && s.is_parked(now));
        let until = now + wait.clamp(MIN_RETRY_WAIT, RETRY_AFTER_CAP);
        let parked = &mut state.slots[slot].parked_until;
        *parked = Some(parked.map_or(until, |earlier| earlier.max(until)));
        self.inner.counters.rate_limited.add(1);
        if !others_parked {
            tracing::debug!(
                target: "genesys_auth_layer::pool",
                slot,
                wait_ms = wait.as_millis() as u64,
                "429: pooled token parked"
            );
            return;
        }
        self.inner.counters.wider.fetch_add(1, Ordering::Relaxed);
        state.growth_stopped_until = Some(now + config.growth_hold);
        let may_shrink = state
            .last_shrink
            .is_none_or(|at| now >= at + config.period());
        if may_shrink && state.usable > 1 {
            state.usable -= 1;
            state.last_shrink = Some(now);
            self.inner.counters.tokens(state.usable);
        }
        tracing::info!(
            target: "genesys_auth_layer::pool",
            slot,
            tokens = state.usable,
            wait_ms = wait.as_millis() as u64,
            "429 to a token with budget while another is parked: the limit is wider than a token; the pool stops growing"
        );
    }
}

impl PoolState {
    /// The usable slot that frees first (the lowest on a tie), and when.
    fn first_free(&self, now: Instant, config: &TokenPoolConfig) -> (usize, Instant) {
        let mut best = (0, self.slots[0].free_at(now, config));
        for (i, slot) in self.slots[..self.usable].iter().enumerate().skip(1) {
            let at = slot.free_at(now, config);
            if at < best.1 {
                best = (i, at);
            }
        }
        best
    }

    fn can_grow(&self, now: Instant, config: &TokenPoolConfig) -> bool {
        self.usable < config.max_tokens
            && self.growth_stopped_until.is_none_or(|until| now >= until)
    }

    /// One more usable slot: a slot given up earlier, else a new one.
    fn grow(&mut self, scope: &Scope) {
        if self.usable == self.slots.len() {
            let cache = self.slots[0].layer.cache().sibling();
            self.slots.push(Slot::new(cache, scope.clone()));
        }
        self.usable += 1;
    }
}

/// A request waiting for its reserved instant; counted in the queue until dropped.
struct Queued<'a>(&'a TokenPool);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.lock().queued -= 1;
    }
}

impl fmt::Debug for TokenPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenPool")
            .field("config", &self.inner.config)
            .field("scope", &self.inner.scope)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The layer of a [`TokenPool`]: [`TokenPool::layer`].
#[derive(Clone, Debug)]
pub struct TokenPoolLayer {
    pool: TokenPool,
}

impl<S> Layer<S> for TokenPoolLayer {
    type Service = TokenPoolService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenPoolService {
            inner,
            pool: self.pool.clone(),
        }
    }
}

/// The service of a [`TokenPoolLayer`].
///
/// * A request in the pool's scope, without an `Authorization` of its own, waits for a
///   slot with budget (or fails with [`RateLimited`]), then goes through that slot's
///   [`AuthReplayService`](crate::AuthReplayService): the slot's token is attached and a
///   401 to it is refreshed and replayed once.
/// * A 429 answer parks the slot; the request, if its body can be copied
///   ([`ReplayableBody`]), is replayed once on the slot that frees first. The replay's
///   answer is the caller's. If no slot frees within the wait bound, the 429 is.
/// * Other requests pass through untouched, unpaced.
///
/// `poll_ready` is always ready: the inner service is made ready inside the response
/// future, on a clone, once the request has budget, so that no request holds the inner
/// service's capacity while it waits for budget or a token.
#[derive(Clone, Debug)]
pub struct TokenPoolService<S> {
    inner: S,
    pool: TokenPool,
}

impl<S> TokenPoolService<S> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TokenPoolService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ReqBody: ReplayableBody + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<ResBody>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let inner = self.inner.clone();
        let pool = self.pool.clone();
        let applies = pool.inner.scope.applies_to(&request);
        Box::pin(async move {
            if !applies {
                return inner.oneshot(request).await.map_err(Into::into);
            }
            let copy = replayable_copy(&request);
            let (slot, response) = send(&pool, inner.clone(), request).await?;
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                return Ok(response);
            }
            pool.refused(slot, park_for(&response));
            let Some(copy) = copy else {
                return Ok(response);
            };
            match send(&pool, inner, copy).await {
                Ok((slot, replayed)) => {
                    pool.inner.counters.replays.add(1);
                    if replayed.status() == StatusCode::TOO_MANY_REQUESTS {
                        pool.refused(slot, park_for(&replayed));
                    }
                    Ok(replayed)
                }
                // No slot within the wait bound: the API's own 429 is the better answer.
                Err(e) if e.is::<RateLimited>() => Ok(response),
                Err(e) => Err(e),
            }
        })
    }
}

/// Sends `request` on a slot with budget, through that slot's auth-and-replay service.
async fn send<S, B, R>(
    pool: &TokenPool,
    inner: S,
    request: Request<B>,
) -> Result<(usize, Response<R>), BoxError>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    let (slot, layer) = pool.acquire().await?;
    let response = layer.layer(inner).oneshot(request).await?;
    Ok((slot, response))
}

/// How long a 429 parks its token: its `Retry-After`, else [`DEFAULT_PARK`].
fn park_for<R>(response: &Response<R>) -> Duration {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| parse_retry_after(value, SystemTime::now()))
        .unwrap_or(DEFAULT_PARK)
}

/// One counter of [`PoolStats`], and its `metrics` series with the `metrics` feature.
struct Count {
    value: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Count {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(name: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::counter!(name),
        }
    }

    fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

struct Counters {
    rate_limited: Count,
    replays: Count,
    rejected: Count,
    wider: AtomicU64,
    waits: AtomicU64,
    waited_micros: AtomicU64,
    #[cfg(feature = "metrics")]
    waited_ms: metrics::Counter,
    #[cfg(feature = "metrics")]
    tokens: metrics::Gauge,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            rate_limited: Count::new(METRIC_POOL_RATE_LIMITED),
            replays: Count::new(METRIC_POOL_REPLAYS),
            rejected: Count::new(METRIC_POOL_REJECTED),
            wider: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            waited_micros: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            waited_ms: metrics::counter!(METRIC_POOL_BUDGET_WAIT),
            #[cfg(feature = "metrics")]
            tokens: metrics::gauge!(METRIC_POOL_TOKENS),
        }
    }
}

impl Counters {
    fn waited(&self, wait: Duration) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.waited_micros.fetch_add(micros, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.waited_ms
            .increment(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn tokens(&self, tokens: usize) {
        #[cfg(feature = "metrics")]
        self.tokens.set(tokens as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{auth, Counter};

    #[test]
    fn out_of_range_settings_are_raised_or_capped_not_panics() {
        let config = TokenPoolConfig::new()
            .max_tokens(0)
            .token_budget(0, Duration::ZERO)
            .max_wait(Duration::MAX)
            .growth_hold(Duration::MAX);
        assert_eq!(config.max_tokens_value(), 1);
        assert_eq!(
            (config.budget, config.window),
            (1, Duration::from_millis(1))
        );
        assert_eq!((config.max_wait, config.growth_hold), (LONGEST, LONGEST));
        let config = TokenPoolConfig::new().token_budget(1, Duration::MAX);
        assert_eq!(config.window, LONGEST);
        assert!(config.period() > LONGEST);
    }

    /// A hostile `Retry-After` (a century) parks the token for the documented cap, not
    /// longer, and a request that would wait for it fails at once with `RateLimited`.
    #[tokio::test(start_paused = true)]
    async fn a_hostile_retry_after_is_capped() {
        let auth = auth(Counter::default());
        let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1));
        let inner = tower::service_fn(|_: Request<String>| async {
            let response = Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header(RETRY_AFTER, "3153600000")
                .body(String::new())?;
            Ok::<_, BoxError>(response)
        });
        let client = pool.layer().layer(inner);
        let request = || Request::get("https://api.example.test/x").body(String::new());

        let start = Instant::now();
        let err = client.clone().oneshot(request().unwrap()).await;
        // The replay could not get budget within the wait bound: the API's own 429.
        assert_eq!(err.unwrap().status(), 429);
        assert!(Instant::now() - start < Duration::from_secs(1));
        let stats = pool.stats();
        assert_eq!((stats.parked, stats.rejected), (1, 1), "{stats:?}");

        let err = client
            .clone()
            .oneshot(request().unwrap())
            .await
            .unwrap_err();
        let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
        assert_eq!(limited.retry_after, RETRY_AFTER_CAP);
        assert!(err.to_string().contains("out of budget"), "{err}");
        assert!(!format!("{pool:?}").contains("token-1"), "{pool:?}");
    }

    /// With the `metrics` feature, the pool's counters and its size reach a `metrics`
    /// recorder installed before the pool is built.
    #[cfg(feature = "metrics")]
    #[tokio::test(start_paused = true)]
    async fn counters_reach_a_metrics_recorder() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        use std::collections::HashMap;
        use std::sync::atomic::AtomicUsize;

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let auth = auth(Counter::default());
        let pool = metrics::with_local_recorder(&recorder, || {
            auth.token_pool(TokenPoolConfig::new().max_tokens(2))
        });
        // The first answer is a 429 (Retry-After: 1), the others 200.
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = tower::service_fn(move |_: Request<String>| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                let status = if first { 429 } else { 200 };
                let response = Response::builder()
                    .status(status)
                    .header(RETRY_AFTER, "1")
                    .body(String::new())?;
                Ok::<_, BoxError>(response)
            }
        });
        let client = pool.layer().layer(inner);
        let request = Request::get("https://api.example.test/x").body(String::new());
        let response = client.oneshot(request.unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);

        // One snapshot: taking one resets the values it reads.
        let values: HashMap<String, DebugValue> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
            .collect();
        assert_eq!(values[METRIC_POOL_RATE_LIMITED], DebugValue::Counter(1));
        assert_eq!(values[METRIC_POOL_REPLAYS], DebugValue::Counter(1));
        assert_eq!(values[METRIC_POOL_REJECTED], DebugValue::Counter(0));
        assert_eq!(values[METRIC_POOL_TOKENS], DebugValue::Gauge(2.0.into()));
    }
}
