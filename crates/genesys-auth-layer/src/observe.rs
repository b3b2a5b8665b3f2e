//! What operators can see: counters, the health view, and `metrics` export.
//!
//! This module owns the cache's counters ([`CacheStats`], a cheap snapshot), the
//! [`Health`] view for readiness probes, and, behind the `metrics` cargo feature, the same
//! counters through the `metrics` crate facade. Counting must stay off the hot path's
//! critical costs: the one counter bumped per request is striped across cache lines so two
//! cores authorizing requests do not fight over one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::AuthError;
use crate::token::TokenGeneration;

/// Token-request failures by cause (see [`AuthError::cause`]), read from
/// [`CacheStats::failures_by_cause`]: a `502` from the token endpoint counts under
/// `http_status`, say. An aborted refresh has no field of its own, so the fields can sum to
/// less than [`CacheStats::fetch_failures`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureCounts {
    /// The token endpoint answered an OAuth error (`invalid_client`, `invalid_scope`, …).
    pub oauth_error: u64,
    /// Both the primary and the secondary secret were refused.
    pub secrets_rejected: u64,
    /// 429 Too Many Requests.
    pub rate_limited: u64,
    /// Another unexpected HTTP status (5xx, …).
    pub http_status: u64,
    /// Connection refused or closed, TLS or body errors.
    pub transport: u64,
    /// No answer within the fetch timeout.
    pub timeout: u64,
    /// The answer was larger than the size cap.
    pub too_large: u64,
    /// The answer was not a usable token (bad JSON, wrong `token_type`, bad `expires_in`…).
    pub invalid_response: u64,
}

/// A snapshot of a cache's counters: a few relaxed atomic loads.
///
/// Comparable to Duende.AccessTokenManagement's meter: tokens retrieved, retrieval failures
/// by cause, requests authorized, 401 answers and replays, and requests that waited for a
/// token.
///
/// ```
/// use genesys_auth_layer::{CacheConfig, CacheStats, TokenCache};
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
/// assert_eq!(cache.stats(), CacheStats::default());
/// cache.token().await?;
/// let stats = cache.stats();
/// assert_eq!((stats.refreshes, stats.tokens_fetched, stats.waited_for_token), (1, 1, 1));
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Token refreshes started, successful or not: the unit of the single flight (any
    /// number of concurrent callers or 401s share one). Each sends one request to the
    /// token endpoint, or two when the primary secret is refused and the secondary one is
    /// tried: [`CredentialStore::fallbacks`](crate::CredentialStore::fallbacks) counts
    /// those second requests.
    pub refreshes: u64,
    /// Tokens retrieved.
    pub tokens_fetched: u64,
    /// Refreshes that failed.
    pub fetch_failures: u64,
    /// The failures, by cause.
    pub failures_by_cause: FailureCounts,
    /// Requests the layer attached a token to.
    pub requests_authorized: u64,
    /// Requests that found no usable token and had to wait for one.
    pub waited_for_token: u64,
    /// Requests replayed after a 401: each waited for a token newer than the one the API
    /// refused, to be sent again once (counted when it starts waiting, so also when no
    /// newer token could be had). A direct call of
    /// [`TokenCache::refresh_after_401`](crate::TokenCache::refresh_after_401) counts as
    /// one too.
    pub replays_after_401: u64,
    /// Every 401 answer from the API to a request this layer attached a token to,
    /// replays included. A first 401 drops the refused token at once,
    /// replayed or not; this minus [`replays_after_401`](Self::replays_after_401)
    /// counts the 401s that reached the caller (a body that cannot be copied, a
    /// [`BufferedBody`](crate::BufferedBody) not sent in full or over its limit, no replay
    /// in the stack ([`AuthLayer`](crate::AuthLayer) alone), or a replay refused again).
    /// [`TokenCache::refresh_after_401`](crate::TokenCache::refresh_after_401) called
    /// directly adds to `replays_after_401` only, so take the difference with
    /// `saturating_sub` when the cache is used that way too.
    pub api_401s: u64,
}

const CAUSES: [&str; 8] = [
    "oauth_error",
    "secrets_rejected",
    "rate_limited",
    "http_status",
    "transport",
    "timeout",
    "too_large",
    "invalid_response",
];

/// The cache's counters.
pub(crate) struct Counters {
    refreshes: AtomicU64,
    tokens_fetched: AtomicU64,
    failures: [AtomicU64; CAUSES.len() + 1],
    requests_authorized: AtomicU64,
    waited_for_token: AtomicU64,
    replays_after_401: AtomicU64,
    api_401s: AtomicU64,
    #[cfg(feature = "metrics")]
    metrics: MetricHandles,
}

impl Counters {
    /// Counters for a cache named `name` (the `cache` label of its metrics), if named.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: Option<&str>) -> Self {
        // Spelled out rather than `..Self::default()`, which would also register the
        // unlabelled series with the recorder.
        Self {
            refreshes: AtomicU64::new(0),
            tokens_fetched: AtomicU64::new(0),
            failures: Default::default(),
            requests_authorized: AtomicU64::new(0),
            waited_for_token: AtomicU64::new(0),
            replays_after_401: AtomicU64::new(0),
            api_401s: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metrics: MetricHandles::new(name),
        }
    }

    pub(crate) fn refresh_started(&self) {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn token_fetched(&self) {
        self.tokens_fetched.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.tokens_retrieved.increment(1);
    }

    pub(crate) fn fetch_failed(&self, error: &AuthError) {
        let cause = error.cause();
        let slot = CAUSES
            .iter()
            .position(|c| *c == cause)
            .unwrap_or(CAUSES.len());
        self.failures[slot].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.failures[slot].increment(1);
    }

    /// The hot path's only counter.
    #[inline]
    pub(crate) fn request_authorized(&self) {
        self.requests_authorized.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.requests_authorized.increment(1);
    }

    pub(crate) fn waited_for_token(&self) {
        self.waited_for_token.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.requests_waited.increment(1);
    }

    pub(crate) fn replay_after_401(&self) {
        self.replays_after_401.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.replays.increment(1);
    }

    pub(crate) fn api_401(&self) {
        self.api_401s.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.unauthorized.increment(1);
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let failure = |i: usize| self.failures[i].load(Ordering::Relaxed);
        let failures_by_cause = FailureCounts {
            oauth_error: failure(0),
            secrets_rejected: failure(1),
            rate_limited: failure(2),
            http_status: failure(3),
            transport: failure(4),
            timeout: failure(5),
            too_large: failure(6),
            invalid_response: failure(7),
        };
        CacheStats {
            refreshes: self.refreshes.load(Ordering::Relaxed),
            tokens_fetched: self.tokens_fetched.load(Ordering::Relaxed),
            fetch_failures: (0..self.failures.len()).map(failure).sum(),
            failures_by_cause,
            requests_authorized: self.requests_authorized.load(Ordering::Relaxed),
            waited_for_token: self.waited_for_token.load(Ordering::Relaxed),
            replays_after_401: self.replays_after_401.load(Ordering::Relaxed),
            api_401s: self.api_401s.load(Ordering::Relaxed),
        }
    }
}

/// `genesys_auth_tokens_retrieved_total`: tokens obtained.
pub const METRIC_TOKENS_RETRIEVED: &str = "genesys_auth_tokens_retrieved_total";
/// `genesys_auth_token_failures_total{cause}`: failed token requests by
/// [`AuthError::cause`] (`cause="timeout"`, …); a refresh that was aborted (its task gone)
/// is labelled `other`.
pub const METRIC_FAILURES: &str = "genesys_auth_token_failures_total";
/// `genesys_auth_requests_authorized_total`: requests a token was attached to.
pub const METRIC_REQUESTS_AUTHORIZED: &str = "genesys_auth_requests_authorized_total";
/// `genesys_auth_replays_total`: requests replayed after a 401, plus direct calls of
/// [`TokenCache::refresh_after_401`](crate::TokenCache::refresh_after_401) (the same count as
/// [`CacheStats::replays_after_401`]).
pub const METRIC_REPLAYS: &str = "genesys_auth_replays_total";
/// `genesys_auth_requests_waited_total`: requests that waited for a token.
pub const METRIC_REQUESTS_WAITED: &str = "genesys_auth_requests_waited_total";
/// `genesys_auth_unauthorized_total`: 401 answers to requests a token was attached to,
/// replays included ([`CacheStats::api_401s`]).
pub const METRIC_UNAUTHORIZED: &str = "genesys_auth_unauthorized_total";

/// Counter handles registered once, when the cache is built: install the `metrics`
/// recorder before building the layer.
#[cfg(feature = "metrics")]
struct MetricHandles {
    tokens_retrieved: metrics::Counter,
    /// One per cause in `CAUSES`, then one for any other cause.
    failures: [metrics::Counter; CAUSES.len() + 1],
    requests_authorized: metrics::Counter,
    replays: metrics::Counter,
    requests_waited: metrics::Counter,
    unauthorized: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl MetricHandles {
    /// Registers every series, with a `cache` label when the cache is named.
    fn new(name: Option<&str>) -> Self {
        let cache: Vec<metrics::Label> = name
            .map(|name| metrics::Label::new("cache", name.to_owned()))
            .into_iter()
            .collect();
        let with = |extra: Option<metrics::Label>| -> Vec<metrics::Label> {
            cache.iter().cloned().chain(extra).collect()
        };
        Self {
            tokens_retrieved: metrics::counter!(METRIC_TOKENS_RETRIEVED, with(None)),
            failures: std::array::from_fn(|i| {
                let cause = CAUSES.get(i).copied().unwrap_or("other");
                metrics::counter!(
                    METRIC_FAILURES,
                    with(Some(metrics::Label::new("cause", cause)))
                )
            }),
            requests_authorized: metrics::counter!(METRIC_REQUESTS_AUTHORIZED, with(None)),
            replays: metrics::counter!(METRIC_REPLAYS, with(None)),
            requests_waited: metrics::counter!(METRIC_REQUESTS_WAITED, with(None)),
            unauthorized: metrics::counter!(METRIC_UNAUTHORIZED, with(None)),
        }
    }
}

/// How the token supply is doing, for a readiness probe or a status page: see
/// [`GenesysAuth::health`](crate::GenesysAuth::health) and
/// [`TokenCache::health`](crate::TokenCache::health).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Health {
    /// The cached token's generation, if a valid one is cached.
    pub generation: Option<TokenGeneration>,
    /// How long the cached token stays valid (`None`: no valid token).
    pub token_expires_in: Option<Duration>,
    /// How long ago the cached token was requested.
    pub token_age: Option<Duration>,
    /// How long ago a token was last obtained.
    pub since_last_success: Option<Duration>,
    /// The most recent failure, even if a success followed it.
    pub last_error: Option<AuthError>,
    /// How long ago that failure happened.
    pub since_last_error: Option<Duration>,
    /// Failed token requests since the last success.
    pub consecutive_failures: u32,
    /// How long until the next token request is allowed, while backing off.
    pub backoff_remaining: Option<Duration>,
}

/// From this many failures in a row, [`Health::can_obtain_tokens`] says no: one or two
/// failures are routine (a 503, a timeout), three in a row with backoff between them span
/// several seconds of the token endpoint failing.
pub const UNHEALTHY_AFTER_FAILURES: u32 = 3;

impl Health {
    /// Whether a token valid now is cached (`token_expires_in` is set): requests are
    /// authorized without waiting. False before the first token.
    pub fn has_valid_token(&self) -> bool {
        self.token_expires_in.is_some()
    }

    /// Whether the process can still obtain tokens: false once the last failure was fatal
    /// (`invalid_client`, …) or [`UNHEALTHY_AFTER_FAILURES`] requests failed in a row. It
    /// turns false while the cached token is still valid, so a readiness probe sees the
    /// problem before requests start failing. A token endpoint that refuses the client (a
    /// `401`) turns it false at the first failure.
    pub fn can_obtain_tokens(&self) -> bool {
        if self.consecutive_failures == 0 {
            return true;
        }
        let fatal = self.last_error.as_ref().is_some_and(AuthError::is_fatal);
        !fatal && self.consecutive_failures < UNHEALTHY_AFTER_FAILURES
    }
}

/// One counter of `ApiRetryStats` or `PoolStats`, and its `metrics` series with the
/// `metrics` feature.
pub(crate) struct Count {
    value: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Count {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &'static str, label: Option<(&'static str, &'static str)>) -> Self {
        Self {
            value: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: match label {
                Some((key, value)) => metrics::counter!(name, key => value),
                None => metrics::counter!(name),
            },
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series names are a contract with dashboards: a rename must be deliberate.
    #[test]
    fn metric_names_are_stable() {
        assert_eq!(
            METRIC_TOKENS_RETRIEVED,
            "genesys_auth_tokens_retrieved_total"
        );
        assert_eq!(METRIC_FAILURES, "genesys_auth_token_failures_total");
        assert_eq!(
            METRIC_REQUESTS_AUTHORIZED,
            "genesys_auth_requests_authorized_total"
        );
        assert_eq!(METRIC_REPLAYS, "genesys_auth_replays_total");
        assert_eq!(METRIC_REQUESTS_WAITED, "genesys_auth_requests_waited_total");
        assert_eq!(METRIC_UNAUTHORIZED, "genesys_auth_unauthorized_total");
    }

    #[test]
    fn requests_authorized_sums_across_threads() {
        let counters = std::sync::Arc::new(Counters::new(None));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counters = counters.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| counters.request_authorized()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counters.snapshot().requests_authorized, 80_000);
    }

    #[test]
    fn failures_are_counted_by_cause() {
        let counters = Counters::new(None);
        counters.fetch_failed(&AuthError::Timeout(Duration::from_secs(1)));
        counters.fetch_failed(&AuthError::RateLimited { retry_after: None });
        counters.fetch_failed(&AuthError::RefreshAborted);
        let stats = counters.snapshot();
        assert_eq!(stats.fetch_failures, 3);
        assert_eq!(stats.failures_by_cause.timeout, 1);
        assert_eq!(stats.failures_by_cause.rate_limited, 1);
    }

    #[test]
    fn health_turns_unready_on_fatal_or_repeated_failures() {
        let mut health = Health {
            generation: None,
            token_expires_in: Some(Duration::from_secs(60)),
            token_age: None,
            since_last_success: None,
            last_error: Some(AuthError::Timeout(Duration::from_secs(1))),
            since_last_error: None,
            consecutive_failures: 2,
            backoff_remaining: None,
        };
        assert!(health.can_obtain_tokens());
        health.consecutive_failures = 3;
        assert!(!health.can_obtain_tokens());
        health.consecutive_failures = 1;
        health.last_error = Some(AuthError::OAuth {
            status: http::StatusCode::UNAUTHORIZED,
            code: crate::OAuthErrorCode::InvalidClient,
            description: None,
        });
        assert!(!health.can_obtain_tokens());
        assert!(health.has_valid_token());
    }

    #[cfg(feature = "metrics")]
    #[tokio::test]
    async fn counters_reach_a_metrics_recorder() {
        use crate::{BoxFuture, CacheConfig, IssuedToken, TokenCache, TokenSource};
        use metrics_util::debugging::DebuggingRecorder;

        struct FailsOnce(std::sync::atomic::AtomicBool);
        impl TokenSource for FailsOnce {
            fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
                let fail = !self.0.swap(true, Ordering::SeqCst);
                Box::pin(async move {
                    if fail {
                        Err(AuthError::Timeout(Duration::from_secs(1)))
                    } else {
                        Ok(IssuedToken::bearer("t", Duration::from_secs(60)).unwrap())
                    }
                })
            }
        }

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let config = CacheConfig::default().backoff(Duration::ZERO, Duration::ZERO);
        let cache = metrics::with_local_recorder(&recorder, || {
            TokenCache::new(FailsOnce(Default::default()), config)
        });
        assert!(cache.token().await.is_err());
        tokio::time::sleep(crate::MIN_BACKOFF * 2).await;
        cache.token().await.unwrap();
        for _ in 0..5 {
            assert!(cache.header().is_some());
        }
        // A 401 to its token, as `AuthService` reports one.
        let generation = cache.current().unwrap().generation();
        assert!(cache.answered_401(generation, false));
        let counters = crate::test_support::counter_values(&snapshotter);
        assert_eq!(counters[&format!("{METRIC_TOKENS_RETRIEVED}[]")], 1);
        assert_eq!(
            counters[&format!("{METRIC_FAILURES}[\"cause=timeout\"]")],
            1
        );
        assert_eq!(
            counters[&format!("{METRIC_FAILURES}[\"cause=transport\"]")],
            0
        );
        assert_eq!(counters[&format!("{METRIC_REQUESTS_AUTHORIZED}[]")], 5);
        assert_eq!(counters[&format!("{METRIC_REQUESTS_WAITED}[]")], 2);
        assert_eq!(counters[&format!("{METRIC_UNAUTHORIZED}[]")], 1);
        assert_eq!(counters[&format!("{METRIC_REPLAYS}[]")], 0);
    }

    #[cfg(feature = "metrics")]
    #[tokio::test]
    async fn named_caches_publish_their_own_series() {
        use crate::{BoxFuture, CacheConfig, IssuedToken, TokenCache, TokenSource};
        use metrics_util::debugging::DebuggingRecorder;

        struct Fixed;
        impl TokenSource for Fixed {
            fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
                Box::pin(async { Ok(IssuedToken::bearer("t", Duration::from_secs(60)).unwrap()) })
            }
        }

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (emea, apac) = metrics::with_local_recorder(&recorder, || {
            (
                TokenCache::new(Fixed, CacheConfig::default().name("emea")),
                TokenCache::new(Fixed, CacheConfig::default().name("apac")),
            )
        });
        emea.token().await.unwrap();
        apac.token().await.unwrap();
        for _ in 0..3 {
            assert!(emea.header().is_some());
        }
        assert!(apac.header().is_some());
        let series = crate::test_support::counter_values(&snapshotter);
        assert_eq!(
            series[&format!("{METRIC_REQUESTS_AUTHORIZED}[\"cache=emea\"]")],
            3
        );
        assert_eq!(
            series[&format!("{METRIC_REQUESTS_AUTHORIZED}[\"cache=apac\"]")],
            1
        );
        assert_eq!(
            series[&format!("{METRIC_TOKENS_RETRIEVED}[\"cache=emea\"]")],
            1
        );
        assert_eq!(
            series[&format!("{METRIC_FAILURES}[\"cache=apac\", \"cause=timeout\"]")],
            0
        );
        // Named caches register no unlabelled series.
        assert!(
            series.keys().all(|key| key.contains("cache=")),
            "{series:?}"
        );
    }
}
