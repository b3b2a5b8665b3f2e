//! [`TokenPool`]: several tokens of one client, each paced under Genesys' per-token limit.
//!
//! Genesys lets each client-credentials token send 300 API requests a minute. A pool holds
//! up to `max_tokens` tokens of the same client (each slot a [`TokenCache`] of its own, with
//! its own single flight, refresh ahead and generation-scoped 401) and sends each request on
//! a slot that has budget left, so that no token goes over its limit.
//!
//! The rules are on [`TokenPool`].

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
use crate::cache::TokenCache;
use crate::observe::Count;
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
/// A `Retry-After` is honoured from [`MIN_RETRY_WAIT`] up to one pacing period (the
/// budget's window and its margin): a token's own window is free by then, and a longer
/// wait, such as one endpoint's limit, should not take a whole token out of the pool.
pub const DEFAULT_PARK: Duration = Duration::from_secs(3);

/// The longest window, wait or hold a [`TokenPoolConfig`] takes: a day, so that no instant
/// computed from them overflows.
const LONGEST: Duration = Duration::from_secs(24 * 60 * 60);

/// The least margin added to a pacing window.
const MIN_MARGIN: Duration = Duration::from_millis(20);

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

    /// The pacing period: the window and a margin (1 % of it, at least [`MIN_MARGIN`]),
    /// so that requests sent a window apart do not land in one server window by the
    /// network's (or a busy machine's) jitter.
    fn period(&self) -> Duration {
        self.window + (self.window / 100).max(MIN_MARGIN)
    }
}

/// Every token of a [`TokenPool`] is out of budget for longer than the pool lets a request
/// wait (or too many requests wait already): the request was not sent.
///
/// It comes boxed in the service's [`BoxError`]; `downcast_ref::<RateLimited>()` gets it
/// back. Not to be confused with [`AuthError::RateLimited`](crate::AuthError::RateLimited),
/// a 429 from the *token* endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "every pooled token is out of budget: the next request could be sent in {retry_after:?}, {}",
    if *queue_full { "but the queue of waiting requests is full" } else { "past the pool's wait bound" }
)]
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
/// share the pool.
///
/// Build it once from a [`GenesysAuth`](crate::GenesysAuth) with
/// [`GenesysAuth::token_pool`](crate::GenesysAuth::token_pool). Each slot is a
/// [`TokenCache`] of its own (single flight, refresh ahead, generation-scoped 401 and
/// replay), created as the pool grows; the auth's own cache is not one of them.
///
/// The whole schedule is one small state under one lock:
///
/// * **Pacing.** Each slot logs its requests of the last period (the budget's window plus
///   a margin of 1 % of it, at least 20 ms), each as the latest instant the server may
///   have counted it: its send instant until its answer arrives, then the answer's
///   instant (a token fetch or a 401 replay can delay a send). A request may go at `x`
///   when the log holds fewer than `budget` entries in the period before `x`, so no window
///   of that length holds more than `budget` of the slot's requests. A request *reserves*
///   the earliest such instant on the slot that frees first, after every earlier
///   reservation there (in order), and sleeps until it; it checks the rule again when it
///   wakes, since answers may have moved entries later, and reserves again if it fails.
///   A request dropped while it waits gives its instant up to the next one.
/// * **Growth.** When no slot is free now, the pool adds one (up to `max_tokens`) rather
///   than make the request wait.
/// * **429.** A 429 parks its slot until the answer's `Retry-After` (3 s when absent; at
///   most one period) and the request is replayed once, on the slot that frees first.
///   The limit is wider than a token (the client's or the org's) when a token with budget
///   is refused: another slot was already parked when the refused request was sent, or
///   the slot is refused again within a period after its park ended. Then the pool stops
///   growing for `growth_hold`, gives up its newest slot (at most one per period), and
///   requests wait out the `Retry-After` instead.
/// * **Bounded wait.** A request that would wait longer than `max_wait` in all, or find
///   `max_queued` requests already waiting, fails at once with [`RateLimited`] instead of
///   being sent to a certain 429. A replay that cannot go within the bound returns the
///   API's 429 at once.
///
/// Costs, beside the token cache's: one mutex taken two or three times per request, a
/// boxed future, and a copy of a replayable body for the 429 replay (besides the one for
/// the 401 replay). At Genesys' 300 requests a minute per token, none of it shows.
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
/// * `1 <= usable <= slots.len() <= max_tokens`; new requests go on `slots[..usable]`.
/// * each slot's `sent` is sorted; its `given_up` instants each stand for one entry of
///   `sent` (entries are dropped only once a period old, and given-up ones in the past
///   are never taken over).
struct PoolState {
    slots: Vec<Slot>,
    usable: usize,
    growth_stopped_until: Option<Instant>,
    last_shrink: Option<Instant>,
    queued: usize,
}

struct Slot {
    layer: AuthReplayLayer,
    /// The slot's requests of the last period and the ones reserved, each as the latest
    /// instant the server may have counted it: its reserved send instant until its answer
    /// arrives, then the instant of the answer (a token fetch or a 401 replay can delay a
    /// send past its reservation; the answer bounds it). Sorted.
    sent: VecDeque<Instant>,
    /// Reserved instants of requests dropped before they were sent: a new request may
    /// take one over (it is in `sent` already), so a caller's timeout wastes no budget.
    given_up: Vec<Instant>,
    /// The end of the current or last park.
    parked_until: Option<Instant>,
    /// When the current or last park began.
    parked_since: Option<Instant>,
}

impl Slot {
    fn new(cache: TokenCache, scope: Scope) -> Self {
        Self {
            layer: AuthReplayLayer::new(cache, scope),
            sent: VecDeque::new(),
            given_up: Vec::new(),
            parked_until: None,
            parked_since: None,
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
        let budget = config.budget as usize;
        if self.sent.len() >= budget {
            at = at.max(self.sent[self.sent.len() - budget] + config.period());
        }
        at
    }

    /// Puts `at` in `sent` at its place.
    fn insert(&mut self, at: Instant) {
        let i = self.sent.partition_point(|&t| t <= at);
        self.sent.insert(i, at);
    }

    /// Takes one entry `at` out of `sent`.
    fn withdraw(&mut self, at: Instant) {
        if let Some(i) = self.sent.iter().rposition(|&t| t == at) {
            self.sent.remove(i);
        }
    }

    /// Drops the entries a period old or older: no window from `now` on holds them.
    fn prune(&mut self, now: Instant, config: &TokenPoolConfig) {
        let Some(horizon) = now.checked_sub(config.period()) else {
            return;
        };
        while self.sent.front().is_some_and(|&t| t <= horizon) {
            self.sent.pop_front();
        }
    }

    /// Whether a request may go now: the entries of the period up to `now` (its own
    /// included) are within budget. Answers that came after its reservation may have moved
    /// entries later since.
    fn fits(&self, now: Instant, config: &TokenPoolConfig) -> bool {
        let from = now.checked_sub(config.period());
        let first = from.map_or(0, |from| self.sent.partition_point(|&t| t <= from));
        let last = self.sent.partition_point(|&t| t <= now);
        last - first <= config.budget as usize
    }

    /// The request reserved at `reserved` was answered (or failed, or was dropped) at
    /// `now`: its entry moves to `now`.
    fn answered(&mut self, reserved: Instant, now: Instant) {
        self.withdraw(reserved);
        self.insert(now.max(reserved));
    }

    fn is_parked(&self, now: Instant) -> bool {
        self.parked_until.is_some_and(|until| until > now)
    }
}

/// A slot reserved at an instant.
struct Reservation {
    slot: usize,
    at: Instant,
    /// Counted in the queue: the instant was in the future when reserved.
    queued: bool,
    layer: AuthReplayLayer,
}

impl TokenPool {
    /// A pool of tokens from `cache`'s source, with its configuration, attached to
    /// requests in `scope`. Every slot is a new cache (`cache` itself is left alone), so
    /// the pool's tokens and budgets are its own.
    pub fn new(cache: &TokenCache, scope: Scope, config: TokenPoolConfig) -> Self {
        let counters = Counters::default();
        counters.tokens(1);
        Self {
            inner: Arc::new(PoolInner {
                state: Mutex::new(PoolState {
                    slots: vec![Slot::new(cache.sibling(), scope.clone())],
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

    /// Reserves the slot instant that comes first: an instant given up by a dropped
    /// request, or the next free one of a slot (growing the pool when none is free now).
    /// Fails when that is past `deadline` or the queue is full.
    fn reserve(&self, now: Instant, deadline: Instant) -> Result<Reservation, RateLimited> {
        let config = &self.inner.config;
        let mut state = self.lock();
        for slot in &mut state.slots {
            slot.prune(now, config);
        }
        let (mut slot, mut at) = state.first_free(now, config);
        let taken_over = state.first_given_up(now);
        let first = taken_over.map_or(at, |(_, t)| t.min(at));
        if first > now && state.can_grow(now, config) {
            state.grow(&self.inner.scope);
            self.inner.counters.tokens(state.usable);
            tracing::debug!(
                target: "genesys_auth_layer::pool",
                tokens = state.usable,
                "every pooled token is out of budget; the pool grows"
            );
            (slot, at) = state.first_free(now, config);
        }
        let take_over = taken_over.filter(|&(_, t)| t < at);
        if let Some((given_up_slot, t)) = take_over {
            (slot, at) = (given_up_slot, t);
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
        if take_over.is_some() {
            let i = chosen.given_up.iter().position(|&t| t == at);
            chosen
                .given_up
                .swap_remove(i.expect("the instant just found"));
        } else {
            chosen.insert(at);
        }
        Ok(Reservation {
            slot,
            at,
            queued: at > now,
            layer: chosen.layer.clone(),
        })
    }

    /// Waits for `reservation` (counted in the queue meanwhile); if its slot was parked by
    /// then, reserves again, until `deadline`. Returns the reservation to send on.
    async fn wait(
        &self,
        mut reservation: Reservation,
        start: Instant,
        deadline: Instant,
    ) -> Result<Reservation, RateLimited> {
        loop {
            if reservation.queued {
                let mut waiting = Waiting {
                    pool: self,
                    slot: reservation.slot,
                    at: reservation.at,
                    done: false,
                };
                tokio::time::sleep_until(reservation.at).await;
                waiting.done = true;
            }
            let now = Instant::now();
            {
                let mut state = self.lock();
                let slot = &mut state.slots[reservation.slot];
                if !slot.is_parked(now) && slot.fits(now, &self.inner.config) {
                    drop(state);
                    if now > start {
                        self.inner.counters.waited(now - start);
                    }
                    return Ok(reservation);
                }
                // Parked while this request waited, or answers moved the slot's entries
                // later: its instant is given back, and it reserves another.
                slot.withdraw(reservation.at);
            }
            reservation = self.reserve(now, deadline)?;
        }
    }

    /// The request reserved at `at` on `slot` was answered, failed or dropped.
    fn answered(&self, slot: usize, at: Instant) {
        let now = Instant::now();
        self.lock().slots[slot].answered(at, now);
    }

    /// The API answered 429 to a request sent on slot `slot` at `sent_at`: park the slot
    /// for `wait` (at most a pacing period). A token with budget was refused, and the
    /// limit is wider than a token, when another slot was parked already when that request
    /// was sent, or when this slot is refused again within a period of its last park's
    /// end (a token's own window is free by then). Then stop growing, and give up the
    /// newest slot (at most once per period).
    fn refused(&self, slot: usize, sent_at: Instant, wait: Duration) {
        let config = &self.inner.config;
        let now = Instant::now();
        let mut state = self.lock();
        let usable = state.usable;
        let other_parked = state.slots[..usable].iter().enumerate().any(|(i, s)| {
            i != slot && s.is_parked(now) && s.parked_since.is_some_and(|at| at < sent_at)
        });
        let refused = &mut state.slots[slot];
        let again = refused
            .parked_until
            .is_some_and(|end| end <= sent_at && sent_at < end + config.period());
        let until = now + wait.min(config.period()).max(MIN_RETRY_WAIT);
        if !refused.is_parked(now) {
            refused.parked_since = Some(now);
        }
        refused.parked_until = Some(refused.parked_until.map_or(until, |end| end.max(until)));
        self.inner.counters.rate_limited.add(1);
        if !(other_parked || again) {
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
            "429 to a token with budget: the limit is wider than a token; the pool stops growing"
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

    /// The earliest instant given up on a usable slot that is still to come, if any;
    /// the passed ones are dropped (their budget is spent).
    fn first_given_up(&mut self, now: Instant) -> Option<(usize, Instant)> {
        let mut best: Option<(usize, Instant)> = None;
        for (i, slot) in self.slots[..self.usable].iter_mut().enumerate() {
            slot.given_up.retain(|&t| t > now);
            if let Some(&t) = slot.given_up.iter().min() {
                if best.is_none_or(|(_, b)| t < b) {
                    best = Some((i, t));
                }
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

/// A request waiting for its reserved instant, counted in the queue; dropped before that
/// instant, it gives the instant up for another request to take over.
struct Waiting<'a> {
    pool: &'a TokenPool,
    slot: usize,
    at: Instant,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        state.queued -= 1;
        if !self.done && self.at > Instant::now() {
            state.slots[self.slot].given_up.push(self.at);
        }
    }
}

/// A request sent on a slot: when its answer arrives (or it fails, or is dropped), its
/// entry in the slot's log moves to that instant.
struct InFlight<'a> {
    pool: &'a TokenPool,
    slot: usize,
    at: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.pool.answered(self.slot, self.at);
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

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
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
            let start = Instant::now();
            let deadline = start + pool.inner.config.max_wait;
            let copy = replayable_copy(&request);
            let first = pool.reserve(start, deadline)?;
            let (slot, sent_at, response) =
                send(&pool, inner.clone(), request, first, start, deadline).await?;
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                return Ok(response);
            }
            pool.refused(slot, sent_at, park_for(&response));
            let Some(copy) = copy else {
                tracing::debug!(
                    target: "genesys_auth_layer::pool",
                    reason = "body cannot be copied",
                    "429 not replayed"
                );
                return Ok(response);
            };
            // No instant within the wait bound: the API's own 429 is the caller's, at once.
            // Else the 429 is dropped before the wait, so that its connection is free.
            let Ok(replay) = pool.reserve(Instant::now(), deadline) else {
                return Ok(response);
            };
            drop(response);
            let (slot, sent_at, replayed) =
                send(&pool, inner, copy, replay, start, deadline).await?;
            pool.inner.counters.replays.add(1);
            if replayed.status() == StatusCode::TOO_MANY_REQUESTS {
                pool.refused(slot, sent_at, park_for(&replayed));
            }
            Ok(replayed)
        })
    }
}

/// Waits for `reservation`, then sends `request` on its slot, through that slot's
/// auth-and-replay service. Returns the slot, when the request went, and the answer.
async fn send<S, B, R>(
    pool: &TokenPool,
    inner: S,
    request: Request<B>,
    reservation: Reservation,
    start: Instant,
    deadline: Instant,
) -> Result<(usize, Instant, Response<R>), BoxError>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    let reservation = pool.wait(reservation, start, deadline).await?;
    let sent_at = Instant::now();
    let _in_flight = InFlight {
        pool,
        slot: reservation.slot,
        at: reservation.at,
    };
    let response = reservation.layer.layer(inner).oneshot(request).await?;
    Ok((reservation.slot, sent_at, response))
}

/// How long a 429 parks its token: its `Retry-After`, else [`DEFAULT_PARK`].
fn park_for<R>(response: &Response<R>) -> Duration {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| parse_retry_after(value, SystemTime::now()))
        .unwrap_or(DEFAULT_PARK)
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
            rate_limited: Count::new(METRIC_POOL_RATE_LIMITED, None),
            replays: Count::new(METRIC_POOL_REPLAYS, None),
            rejected: Count::new(METRIC_POOL_REJECTED, None),
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

    /// A hostile `Retry-After` (a century) parks the token for one pacing period, not
    /// longer; the replay, which could not go within the wait bound, is not sent, and the
    /// caller gets the 429 at once.
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
        assert_eq!(
            limited.retry_after,
            pool.config().period(),
            "a park is one period at most"
        );
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
