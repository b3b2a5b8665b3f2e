//! Retry what the API refused for now: 429, 502, 503, 504.
//!
//! This module owns [`ApiRetry`], a [`tower::retry::Policy`] that waits out a Genesys rate
//! limit (429) or a passing outage (502/503/504) and sends the request again, and
//! [`ApiRetryStats`], its counters. It must never invent an answer: when it stops retrying,
//! the caller gets the last response the API sent. It never retries a 500 or an error of
//! the service below (the request may have been processed), never a request it cannot copy
//! whole, and never a retry that would start past the request's time budget.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, RetryLayer};

use crate::cache::equal_jitter_backoff;
use crate::observe::Count;
use crate::retry::{copy_request, ReplayableBody};
use crate::source::parse::parse_retry_after;

/// The wait after a 429 that has no `Retry-After`: 3 s, what Genesys' Java and .NET SDKs
/// wait (see `GENESYS.md`, "SDK retries"). Genesys sends `Retry-After` on its 429s since
/// November 2021, so this is a fallback.
pub const DEFAULT_RATE_LIMITED_WAIT: Duration = Duration::from_secs(3);
/// How long after a request was first sent its last retry may start: 60 s. Past it, the
/// caller gets the last answer. A minute covers a Genesys rate-limit window (limits are per
/// minute) and is about what a caller that sits behind an HTTP timeout can still wait.
pub const DEFAULT_RETRY_TIME_BUDGET: Duration = Duration::from_secs(60);
/// The backoff before the first retry of a 502/503/504 without `Retry-After`: between half
/// of this and all of it (equal jitter), doubled per retry.
pub const DEFAULT_RETRY_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest backoff between retries of a 502/503/504 without `Retry-After` (before
/// jitter): reached at the fifth retry, about 30 s into an outage.
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(16);
/// The shortest wait before any retry, also when the server says `Retry-After: 0`: a floor
/// so that no answer or configuration turns into a loop of requests.
pub const MIN_RETRY_WAIT: Duration = Duration::from_millis(100);
/// The methods whose 502/503/504 are retried by default: those HTTP defines as idempotent,
/// except `TRACE`, which API clients do not send. A `POST` or `PATCH` that met a 5xx
/// may have been processed, so it goes back to the caller unless configured otherwise with
/// [`ApiRetry::retry_5xx_methods`].
pub const IDEMPOTENT_METHODS: [Method; 5] = [
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::PUT,
    Method::DELETE,
];

/// A [`Policy`] that retries the Genesys Cloud API's "not now" answers: `429 Too Many
/// Requests` always, `502`/`503`/`504` for idempotent methods.
///
/// | answer | methods | waits | draws on the retry budget |
/// | --- | --- | --- | --- |
/// | 429 | all: a 429 was not processed | `Retry-After`, else [`DEFAULT_RATE_LIMITED_WAIT`] (3 s, as Genesys' SDKs) | no |
/// | 502, 503, 504 | [`IDEMPOTENT_METHODS`] (GET HEAD OPTIONS PUT DELETE) unless [configured](Self::retry_5xx_methods) | `Retry-After`, else an exponential backoff with jitter (1 s, 2 s, 4 s… up to 16 s; each between half and all of it) | yes |
/// | anything else (500 included), or an error from the service below | — | not retried | — |
///
/// Every wait is at least [`MIN_RETRY_WAIT`]. `Retry-After` may be seconds or an HTTP date.
///
/// Two budgets bound what it costs:
///
/// * **Time, per request** ([`time_budget`](Self::time_budget), default
///   [`DEFAULT_RETRY_TIME_BUDGET`], 60 s): a retry whose wait would end more than the budget
///   after the request was first sent is not attempted; the answer that asked for it goes
///   back to the caller at once (a 429 with a `Retry-After` longer than the budget comes
///   back without waiting). The budget bounds when the last retry *starts*; that retry's
///   own round trip comes on top.
/// * **Retries, across requests** ([`retry_budget`](Self::retry_budget), default tower's
///   [`TpsBudget::default`]: over the last 10 s, 20 % of the requests sent plus 10 a
///   second): each request sent deposits, each retry of a 5xx withdraws. In an outage where
///   every answer is a 503, the requests sent in any 10 s cost at most 20 % more attempts
///   plus 100, not `×` the retries that fit in the time budget. 429s do not draw on it: they wait the time the
///   server asked for, which is the server's own load control, and a rate limit that lasts
///   is what the time budget is for.
///
/// Clones share the retry budget and the counters ([`stats`](Self::stats)), so keep one
/// `ApiRetry` (or clones of it) per client.
///
/// # Where it goes
///
/// Outside [`GenesysAuth::layers`](crate::GenesysAuth::layers) (or outside the pair
/// [`GenesysAuth::retry_layer`](crate::GenesysAuth::retry_layer) over
/// [`GenesysAuth::layer`](crate::GenesysAuth::layer)): each retry then passes through the
/// auth layer again, gets the current token, and a 401 on a retry is refreshed and replayed
/// by the auth layer as on a first send. Inside, a retry would reuse the request the auth
/// layer already authorized, and the auth layer's replay would not see the retries' 401s.
///
/// ```
/// use genesys_auth_layer::{ApiRetry, GenesysAuth};
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// # fn demo(auth: GenesysAuth) {
/// let retry = ApiRetry::new().time_budget(Duration::from_secs(30));
/// let client = ServiceBuilder::new()
///     .layer(retry.layer())  // outside: waits out 429s and 503s, sends again through auth
///     .layer(auth.layers())  // inside: attaches the current token, replays a 401 once
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// // Later, for a dashboard: retry.stats().retries_after_429, …
/// # }
/// ```
///
/// # Replays
///
/// A retry has the same method, URI, version, headers (an `Authorization` of the caller's
/// own too), extensions and body bytes, copied as [`RefreshOn401`](crate::RefreshOn401)
/// copies them: a body that cannot be copied ([`ReplayableBody`]) is sent once and its
/// answer returned; a [`BufferedBody`](crate::BufferedBody) is retried only if it was sent
/// in full. Stacked with the auth layers, a request is copied twice before it is sent
/// (once per layer): prefer `Full<Bytes>` bodies, whose copy is a reference-count bump.
///
/// # Observing it
///
/// [`stats`](Self::stats) counts the answers it saw and what it did with them. Each retry
/// is a `tracing` debug event with target `genesys_auth_layer::api_retry` and fields
/// `status`, `wait_ms`, `attempt` (the retry's number, from 1), `method` and `path`; an
/// answer not retried for a reason other than its status or method is one too (field
/// `reason`). No header or body is ever logged. Answers to requests whose body could not be
/// copied are not seen by the policy (tower does not ask it), so they are not counted.
///
/// The waits are `tokio` timers: the client must run on a tokio runtime with time enabled.
#[derive(Clone)]
pub struct ApiRetry {
    config: Arc<Config>,
    budget: Arc<dyn Budget + Send + Sync>,
    counters: Arc<Counters>,
    /// When this request was first sent. tower's `Retry` asks the policy it holds to copy
    /// each new request, then clones that policy for the request: the clone starts with
    /// the instant of that call and no retries.
    started: Option<Instant>,
    /// Retries of this request so far.
    retries: u32,
}

#[derive(Clone, Debug)]
struct Config {
    rate_limited_wait: Duration,
    time_budget: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    methods_5xx: Vec<Method>,
}

/// What an answer asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 429: not processed, come back after `Retry-After`.
    RateLimited,
    /// 502, 503, 504: maybe processed (a gateway or the service failed).
    Unavailable,
}

impl Default for ApiRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiRetry {
    /// The policy with the defaults in the table above.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                rate_limited_wait: DEFAULT_RATE_LIMITED_WAIT,
                time_budget: DEFAULT_RETRY_TIME_BUDGET,
                backoff_initial: DEFAULT_RETRY_BACKOFF_INITIAL,
                backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
                methods_5xx: IDEMPOTENT_METHODS.to_vec(),
            }),
            budget: Arc::new(TpsBudget::default()),
            counters: Arc::default(),
            started: None,
            retries: 0,
        }
    }

    /// The wait after a 429 without `Retry-After` (default [`DEFAULT_RATE_LIMITED_WAIT`]),
    /// at least [`MIN_RETRY_WAIT`].
    pub fn rate_limited_wait(mut self, wait: Duration) -> Self {
        Arc::make_mut(&mut self.config).rate_limited_wait = wait.max(MIN_RETRY_WAIT);
        self
    }

    /// How long after a request was first sent its last retry may start (default
    /// [`DEFAULT_RETRY_TIME_BUDGET`]). `Duration::ZERO` turns retries off.
    pub fn time_budget(mut self, budget: Duration) -> Self {
        Arc::make_mut(&mut self.config).time_budget = budget;
        self
    }

    /// The backoff for a 502/503/504 without `Retry-After`: the `n`-th retry waits between
    /// half and all of `min(initial × 2ⁿ⁻¹, max)` (defaults [`DEFAULT_RETRY_BACKOFF_INITIAL`],
    /// [`DEFAULT_RETRY_BACKOFF_MAX`]). `initial` is at least [`MIN_RETRY_WAIT`] × 2 (so the
    /// jittered wait is at least the floor), `max` at least `initial`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.backoff_initial = initial.max(MIN_RETRY_WAIT * 2);
        config.backoff_max = max.max(config.backoff_initial);
        self
    }

    /// The methods whose 502/503/504 are retried, instead of [`IDEMPOTENT_METHODS`]. Add
    /// `POST` only for requests that are safe to repeat (a 5xx may come after the request
    /// was processed), or pass none to retry 429s only.
    ///
    /// ```
    /// use genesys_auth_layer::{ApiRetry, IDEMPOTENT_METHODS};
    /// use http::Method;
    ///
    /// let retry = ApiRetry::new()
    ///     .retry_5xx_methods(IDEMPOTENT_METHODS.into_iter().chain([Method::POST]));
    /// ```
    pub fn retry_5xx_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        Arc::make_mut(&mut self.config).methods_5xx = methods.into_iter().collect();
        self
    }

    /// The retry budget across requests, instead of tower's [`TpsBudget::default`]: every
    /// request sent [deposits](Budget::deposit), every retry of a 502/503/504
    /// [withdraws](Budget::withdraw), and a 5xx is not retried when the withdrawal fails.
    /// With `TpsBudget::new(ttl, min_per_sec, retry_percent)`, requests sent within one
    /// `ttl` get at most `retry_percent × requests + min_per_sec × ttl` retries.
    pub fn retry_budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// A layer that wraps a service in tower's `Retry` with this policy (sharing its
    /// budget and counters); `ServiceBuilder::retry(policy.clone())` is the same.
    pub fn layer(&self) -> RetryLayer<Self> {
        RetryLayer::new(self.fresh())
    }

    /// A snapshot of the counters shared by this policy and its clones.
    pub fn stats(&self) -> ApiRetryStats {
        self.counters.snapshot()
    }

    /// This policy without a request's state.
    fn fresh(&self) -> Self {
        Self {
            started: None,
            retries: 0,
            ..self.clone()
        }
    }

    /// What `status` asks for, if it is retried at all.
    fn refusal(status: StatusCode) -> Option<Refusal> {
        match status {
            StatusCode::TOO_MANY_REQUESTS => Some(Refusal::RateLimited),
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Some(Refusal::Unavailable),
            _ => None,
        }
    }

    /// How long to wait before sending `request` (the copy) again after `response`, or
    /// `None` to give `response` to the caller. Counts and logs the decision.
    fn wait_before_retry<B: ReplayableBody, R>(
        &mut self,
        request: &Request<B>,
        response: &Response<R>,
    ) -> Option<Duration> {
        let status = response.status();
        let refusal = Self::refusal(status)?;
        let counters = &self.counters;
        match refusal {
            Refusal::RateLimited => counters.rate_limited.add(1),
            Refusal::Unavailable => counters.unavailable.add(1),
        };
        if refusal == Refusal::Unavailable && !self.config.methods_5xx.contains(request.method()) {
            return None;
        }
        let not_retried = |reason: &'static str| {
            tracing::debug!(
                target: "genesys_auth_layer::api_retry",
                status = status.as_u16(),
                method = %request.method(),
                path = request.uri().path(),
                reason,
                "answer not retried"
            );
        };
        if !request.body().can_replay() {
            not_retried("body not kept in full (not sent in full, over its limit, or failed)");
            return None;
        }
        let asked = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let wait = match (refusal, asked) {
            (_, Some(asked)) => asked,
            (Refusal::RateLimited, None) => self.config.rate_limited_wait,
            (Refusal::Unavailable, None) => equal_jitter_backoff(
                self.config.backoff_initial,
                self.config.backoff_max,
                self.retries + 1,
            ),
        }
        .max(MIN_RETRY_WAIT);
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        // Saturating, so that no configured duration (`Duration::MAX` included) overflows.
        let spent = now.saturating_duration_since(started);
        if spent.saturating_add(wait) > self.config.time_budget {
            counters.over_time_budget.add(1);
            not_retried("the wait would end past the request's time budget");
            return None;
        }
        if refusal == Refusal::Unavailable && !self.budget.withdraw() {
            counters.over_retry_budget.add(1);
            not_retried("retry budget spent");
            return None;
        }
        self.retries += 1;
        match refusal {
            Refusal::RateLimited => counters.retries_after_429.add(1),
            Refusal::Unavailable => counters.retries_after_5xx.add(1),
        };
        counters.waited(wait);
        tracing::debug!(
            target: "genesys_auth_layer::api_retry",
            status = status.as_u16(),
            wait_ms = wait.as_millis() as u64,
            attempt = self.retries,
            method = %request.method(),
            path = request.uri().path(),
            "retrying after the wait"
        );
        Some(wait)
    }
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for ApiRetry
where
    B: ReplayableBody,
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        let wait = self.wait_before_retry(request, result.as_ref().ok()?)?;
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if self.retries == 0 {
            // A request sent for the first time (tower asks before each retry too, of the
            // request's own policy, whose `retries` is then above zero).
            self.started = Some(Instant::now());
            self.budget.deposit();
        }
        let Some(body) = request.body().try_clone_body() else {
            tracing::debug!(
                target: "genesys_auth_layer::api_retry",
                method = %request.method(),
                path = request.uri().path(),
                reason = "body cannot be copied",
                "request will not be retried if the API answers 429 or 5xx"
            );
            return None;
        };
        Some(copy_request(request, body))
    }
}

impl fmt::Debug for ApiRetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        f.debug_struct("ApiRetry")
            .field("rate_limited_wait", &config.rate_limited_wait)
            .field("time_budget", &config.time_budget)
            .field("backoff_initial", &config.backoff_initial)
            .field("backoff_max", &config.backoff_max)
            .field("retry_5xx_methods", &config.methods_5xx)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A snapshot of an [`ApiRetry`]'s counters (shared by its clones): a few relaxed atomic
/// loads.
///
/// The answers that reached the caller are the differences: `rate_limited -
/// retries_after_429` 429s, `unavailable - retries_after_5xx` 502/503/504s (a method not
/// retried, a budget spent, a body not kept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiRetryStats {
    /// 429 answers seen, retried or not.
    pub rate_limited: u64,
    /// 502, 503 and 504 answers seen, retried or not.
    pub unavailable: u64,
    /// Retries sent after a 429.
    pub retries_after_429: u64,
    /// Retries sent after a 502, 503 or 504.
    pub retries_after_5xx: u64,
    /// Answers returned because the wait they asked for would end past the request's time
    /// budget.
    pub over_time_budget: u64,
    /// 502/503/504 answers returned because the retry budget was spent.
    pub over_retry_budget: u64,
    /// The waits before retries, summed.
    pub waited: Duration,
}

/// `genesys_auth_api_refusals_total{status}`: 429 (`status="429"`) and 502/503/504
/// (`status="5xx"`) answers [`ApiRetry`] saw, retried or not.
pub const METRIC_API_REFUSALS: &str = "genesys_auth_api_refusals_total";
/// `genesys_auth_api_retries_total{status}`: retries sent after a 429 (`status="429"`) or a
/// 502/503/504 (`status="5xx"`).
pub const METRIC_API_RETRIES: &str = "genesys_auth_api_retries_total";
/// `genesys_auth_api_retries_given_up_total{reason}`: answers returned because a budget was
/// spent: `reason="time_budget"` or `reason="retry_budget"`.
pub const METRIC_API_GIVEN_UP: &str = "genesys_auth_api_retries_given_up_total";
/// `genesys_auth_api_retry_wait_ms_total`: the waits before retries, summed, in
/// milliseconds.
pub const METRIC_API_RETRY_WAIT: &str = "genesys_auth_api_retry_wait_ms_total";

/// The counters of an [`ApiRetry`] and its clones; their `metrics` series are registered
/// when it is built (install the recorder first).
struct Counters {
    rate_limited: Count,
    unavailable: Count,
    retries_after_429: Count,
    retries_after_5xx: Count,
    over_time_budget: Count,
    over_retry_budget: Count,
    waited_micros: AtomicU64,
    #[cfg(feature = "metrics")]
    waited_ms: metrics::Counter,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            rate_limited: Count::new(METRIC_API_REFUSALS, Some(("status", "429"))),
            unavailable: Count::new(METRIC_API_REFUSALS, Some(("status", "5xx"))),
            retries_after_429: Count::new(METRIC_API_RETRIES, Some(("status", "429"))),
            retries_after_5xx: Count::new(METRIC_API_RETRIES, Some(("status", "5xx"))),
            over_time_budget: Count::new(METRIC_API_GIVEN_UP, Some(("reason", "time_budget"))),
            over_retry_budget: Count::new(METRIC_API_GIVEN_UP, Some(("reason", "retry_budget"))),
            waited_micros: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            waited_ms: metrics::counter!(METRIC_API_RETRY_WAIT),
        }
    }
}

impl Counters {
    fn waited(&self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.waited_micros.fetch_add(micros, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.waited_ms
            .increment(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    }

    fn snapshot(&self) -> ApiRetryStats {
        ApiRetryStats {
            rate_limited: self.rate_limited.get(),
            unavailable: self.unavailable.get(),
            retries_after_429: self.retries_after_429.get(),
            retries_after_5xx: self.retries_after_5xx.get(),
            over_time_budget: self.over_time_budget.get(),
            over_retry_budget: self.over_retry_budget.get(),
            waited: Duration::from_micros(self.waited_micros.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{auth, Counter};
    use crate::BufferedBody;
    use bytes::Bytes;
    use http::header::AUTHORIZATION;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tower::util::BoxCloneService;
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

    /// One answer of the scripted API: a status and maybe a `Retry-After`.
    type Answer = (u16, Option<&'static str>);

    /// What the API saw of one attempt.
    #[derive(Clone, Debug)]
    struct Sent {
        method: Method,
        authorization: Option<String>,
        body: Bytes,
        /// When, since the API was made.
        at: Duration,
    }

    /// An API that answers its script in order, then `then` for ever, and records every
    /// attempt. Each answer carries `x-attempt` (its number, from 1).
    #[derive(Clone)]
    struct Api {
        script: Arc<Mutex<VecDeque<Answer>>>,
        then: Answer,
        /// Whether it reads the body before answering (a server may answer first).
        read_body: bool,
        sent: Arc<Mutex<Vec<Sent>>>,
        start: Instant,
    }

    impl Api {
        fn new(script: &[Answer], then: Answer) -> Self {
            Self {
                script: Arc::new(Mutex::new(script.iter().copied().collect())),
                then,
                read_body: true,
                sent: Arc::default(),
                start: Instant::now(),
            }
        }

        fn service<B>(
            &self,
        ) -> impl Service<
            Request<B>,
            Response = Response<String>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
               + Send
        where
            B: http_body::Body + Send + 'static,
            B::Data: Send,
            B::Error: Into<BoxError>,
        {
            let api = self.clone();
            tower::service_fn(move |req: Request<B>| {
                let api = api.clone();
                async move {
                    let method = req.method().clone();
                    let authorization = req
                        .headers()
                        .get(AUTHORIZATION)
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = if api.read_body {
                        let body = req.into_body().collect().await.map_err(Into::into)?;
                        body.to_bytes()
                    } else {
                        Bytes::new()
                    };
                    let at = api.start.elapsed();
                    let attempt = {
                        let mut sent = api.sent.lock().unwrap();
                        sent.push(Sent {
                            method,
                            authorization,
                            body,
                            at,
                        });
                        sent.len()
                    };
                    let (status, retry_after) =
                        api.script.lock().unwrap().pop_front().unwrap_or(api.then);
                    let mut res = Response::builder()
                        .status(status)
                        .header("x-attempt", attempt);
                    if let Some(retry_after) = retry_after {
                        res = res.header(RETRY_AFTER, retry_after);
                    }
                    Ok(res.body(String::new())?)
                }
            })
        }

        fn sent(&self) -> Vec<Sent> {
            self.sent.lock().unwrap().clone()
        }

        /// When each attempt reached the API.
        fn times(&self) -> Vec<Duration> {
            self.sent().iter().map(|s| s.at).collect()
        }
    }

    type Client<B> = BoxCloneService<Request<B>, Response<String>, BoxError>;

    /// `retry`'s layer over `api`.
    fn client<B>(retry: &ApiRetry, api: &Api) -> Client<B>
    where
        B: ReplayableBody + http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(retry.layer())
                .service(api.service()),
        )
    }

    fn request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri("https://api.example.test/api/v2/users")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn get() -> Request<Full<Bytes>> {
        request(Method::GET, "")
    }

    fn attempt(res: &Response<String>) -> &str {
        res.headers()["x-attempt"].to_str().unwrap()
    }

    const fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_waits_its_retry_after_then_retries_once() {
        let api = Api::new(&[(429, Some("2"))], (200, None));
        let retry = ApiRetry::new();
        let pending = tokio::spawn(client(&retry, &api).oneshot(get()));

        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(api.sent().len(), 1, "no retry before the 2 s asked for");

        let res = pending.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(api.times(), [Duration::ZERO, secs(2)]);
        let stats = retry.stats();
        assert_eq!((stats.rate_limited, stats.retries_after_429), (1, 1));
        assert_eq!(stats.waited, secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_retry_after_waits_3_s_and_any_method_is_retried() {
        for method in [Method::POST, Method::PATCH, Method::GET] {
            let api = Api::new(&[(429, None)], (200, None));
            let body = r#"{"name":"x","n":[1,2,3]}"#;
            let res = client(&ApiRetry::new(), &api)
                .oneshot(request(method.clone(), body))
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{method}");
            let sent = api.sent();
            assert_eq!(api.times(), [Duration::ZERO, secs(3)], "{method}");
            for s in &sent {
                assert_eq!((&s.method, &s.body[..]), (&method, body.as_bytes()));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_date_is_honoured() {
        // Whole seconds of the wall clock (which paused time does not move) from now.
        let at = SystemTime::now() + secs(10);
        let date: &'static str = httpdate::fmt_http_date(at).leak();
        let api = Api::new(&[(503, Some(date))], (200, None));
        let res = client(&ApiRetry::new(), &api).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
        let times = api.times();
        assert!(times[1] > secs(8) && times[1] <= secs(10), "{times:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_on_a_get_waits_its_retry_after() {
        let api = Api::new(&[(503, Some("5"))], (200, None));
        let res = client(&ApiRetry::new(), &api).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(api.times(), [Duration::ZERO, secs(5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_without_retry_after_backs_off_exponentially_with_jitter() {
        for _ in 0..20 {
            let script = [(503, None), (502, None), (504, None), (503, None)];
            let api = Api::new(&script, (200, None));
            let retry = ApiRetry::new();
            let res = client(&retry, &api).oneshot(get()).await.unwrap();
            assert_eq!(res.status(), 200);
            let times = api.times();
            assert_eq!(times.len(), 5);
            // Equal jitter: the n-th wait is between half and all of 1 s × 2ⁿ⁻¹.
            for (n, gap) in times.windows(2).map(|w| w[1] - w[0]).enumerate() {
                let full = DEFAULT_RETRY_BACKOFF_INITIAL * (1 << n);
                assert!(gap >= full / 2 && gap <= full, "wait {n}: {gap:?}");
            }
            assert_eq!(retry.stats().retries_after_5xx, 4);
        }
        // The cap: 0.4 s, then 0.5 s at most.
        let api = Api::new(&[(503, None); 3], (200, None));
        let retry = ApiRetry::new().backoff(Duration::from_millis(400), Duration::from_millis(500));
        client(&retry, &api).oneshot(get()).await.unwrap();
        let times = api.times();
        assert!(
            times[3] - times[2] <= Duration::from_millis(500),
            "{times:?}"
        );
        assert!(
            times[3] - times[2] >= Duration::from_millis(250),
            "{times:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_on_a_post_is_retried_only_when_configured() {
        let api = Api::new(&[(503, None)], (200, None));
        let retry = ApiRetry::new();
        let res = client(&retry, &api)
            .oneshot(request(Method::POST, "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "a POST may have been processed");
        assert_eq!(api.sent().len(), 1);
        let stats = retry.stats();
        assert_eq!((stats.unavailable, stats.retries_after_5xx), (1, 0));

        let api = Api::new(&[(503, Some("1"))], (200, None));
        let retry =
            ApiRetry::new().retry_5xx_methods(IDEMPOTENT_METHODS.into_iter().chain([Method::POST]));
        let res = client(&retry, &api)
            .oneshot(request(Method::POST, "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(api.times(), [Duration::ZERO, secs(1)]);

        // No method at all: 5xx go back, 429s are still retried.
        let api = Api::new(&[(429, Some("1")), (503, Some("1"))], (200, None));
        let retry = ApiRetry::new().retry_5xx_methods([]);
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        assert_eq!((res.status().as_u16(), attempt(&res)), (503, "2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_500_or_an_error_is_never_retried() {
        for status in [500, 501, 400, 404, 401, 200] {
            let api = Api::new(&[(status, Some("1"))], (200, None));
            let retry = ApiRetry::new();
            let res = client(&retry, &api).oneshot(get()).await.unwrap();
            assert_eq!(res.status(), status);
            assert_eq!(api.sent().len(), 1, "{status}");
            assert_eq!(retry.stats(), ApiRetryStats::default());
        }

        let calls = Arc::new(AtomicU64::new(0));
        let failing = {
            let calls = calls.clone();
            tower::service_fn(move |_: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<Response<String>, BoxError>("connection reset".into()) }
            })
        };
        let client = ServiceBuilder::new()
            .layer(ApiRetry::new().layer())
            .service(failing);
        assert!(client.oneshot(get()).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_budget_stops_retries_and_returns_the_last_answer() {
        let api = Api::new(&[], (503, Some("2")));
        let retry = ApiRetry::new().time_budget(secs(5));
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        // Sent at 0, 2 and 4 s; a retry at 6 s would be past the budget.
        assert_eq!(api.times(), [Duration::ZERO, secs(2), secs(4)]);
        assert_eq!((res.status().as_u16(), attempt(&res)), (503, "3"));
        assert_eq!(res.headers()[RETRY_AFTER], "2", "the API's own answer");
        let stats = retry.stats();
        assert_eq!((stats.retries_after_5xx, stats.over_time_budget), (2, 1));
        assert_eq!(Instant::now() - api.start, secs(4), "no wait for nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_longer_than_the_time_budget_returns_the_429_at_once() {
        let api = Api::new(&[(429, Some("120"))], (200, None));
        let retry = ApiRetry::new();
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(Instant::now(), api.start, "returned without waiting");
        assert_eq!(api.sent().len(), 1);
        assert_eq!(retry.stats().over_time_budget, 1);

        // No budget at all: nothing is retried.
        let api = Api::new(&[(429, None)], (200, None));
        let retry = ApiRetry::new().time_budget(Duration::ZERO);
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 429);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_has_its_own_time_budget() {
        let script = [(503, Some("4")), (200, None), (503, Some("4")), (200, None)];
        let api = Api::new(&script, (200, None));
        let retry = ApiRetry::new().time_budget(secs(5));
        let mut client = client(&retry, &api);
        for _ in 0..2 {
            let res = client.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(res.status(), 200);
            tokio::time::sleep(secs(100)).await;
        }
        assert_eq!(api.times(), [secs(0), secs(4), secs(104), secs(108)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_costs_what_the_retry_budget_allows() {
        // A total outage: every answer is a 503 asking for 1 s. Each request could retry 4
        // times within its 5 s budget; the retry budget allows, within its 10 s window,
        // 10 % of the requests plus 1 a second: (100 deposits + 1 × 10 s × 10) / 10 = 20.
        const N: usize = 100;
        let api = Api::new(&[], (503, Some("1")));
        let retry = ApiRetry::new()
            .time_budget(secs(5))
            .retry_budget(TpsBudget::new(secs(10), 1, 0.1));
        let client = client(&retry, &api);
        let requests: Vec<_> = (0..N)
            .map(|_| tokio::spawn(client.clone().oneshot(get())))
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap().unwrap().status(), 503);
        }
        let bound = N + N / 10 + 10;
        assert_eq!(
            api.sent().len(),
            bound,
            "every retry the budget allows, no more"
        );
        let stats = retry.stats();
        assert_eq!(stats.unavailable, bound as u64);
        assert_eq!(stats.retries_after_5xx, (bound - N) as u64);
        assert_eq!(stats.over_retry_budget + stats.over_time_budget, N as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_copied_is_sent_once() {
        let api = Api::new(&[(429, Some("1"))], (200, None));
        let retry = ApiRetry::new();
        let body = Full::new(Bytes::from_static(b"stream"))
            .map_err(|e| -> BoxError { match e {} })
            .boxed_unsync();
        let req = Request::post("https://api.example.test/x")
            .body(body)
            .unwrap();
        let res = client::<UnsyncBoxBody<Bytes, BoxError>>(&retry, &api)
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(api.sent().len(), 1);
        assert_eq!(
            retry.stats().rate_limited,
            0,
            "tower does not show it to the policy"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_buffered_body_is_retried_once_it_was_sent_in_full() {
        let streaming = || {
            let body = Full::new(Bytes::from_static(b"{\"streamed\":true}"))
                .map_err(|e| -> BoxError { match e {} })
                .boxed_unsync();
            Request::post("https://api.example.test/x")
                .body(BufferedBody::new(body))
                .unwrap()
        };
        let api = Api::new(&[(429, Some("1"))], (200, None));
        let res = client(&ApiRetry::new(), &api)
            .oneshot(streaming())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let sent = api.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].body, "{\"streamed\":true}");
        assert_eq!(sent[0].body, sent[1].body);

        // A server that answers before reading the body: the 429 goes back.
        let mut api = Api::new(&[(429, Some("1"))], (200, None));
        api.read_body = false;
        let res = client(&ApiRetry::new(), &api)
            .oneshot(streaming())
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(api.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn outside_the_auth_layers_each_answer_goes_to_its_layer() {
        // A 429, then a 401 (the token was revoked meanwhile), then a 200.
        let api = Api::new(&[(429, Some("1")), (401, None)], (200, None));
        let source = Counter::default();
        let auth = auth(source.clone());
        let retry = ApiRetry::new();
        let client = ServiceBuilder::new()
            .layer(retry.layer())
            .layer(auth.layers())
            .service(api.service());
        let res = client
            .oneshot(request(Method::POST, "{\"a\":1}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let sent = api.sent();
        let tokens: Vec<_> = sent.iter().map(|s| s.authorization.as_deref()).collect();
        assert_eq!(
            tokens,
            [
                Some("Bearer token-1"),
                Some("Bearer token-1"), // the retry, through auth again
                Some("Bearer token-2"), // auth's replay after the 401
            ]
        );
        assert!(sent.iter().all(|s| s.body == "{\"a\":1}"));
        assert_eq!(source.issued(), 2);
        assert_eq!(retry.stats().retries_after_429, 1);
        let stats = auth.stats();
        assert_eq!((stats.api_401s, stats.replays_after_401), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_configured_duration_overflows() {
        let api = Api::new(&[(429, None), (503, None)], (200, None));
        let retry = ApiRetry::new()
            .rate_limited_wait(Duration::MAX)
            .backoff(Duration::MAX, Duration::MAX)
            .time_budget(Duration::MAX - secs(1));
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        assert_eq!(
            res.status(),
            429,
            "a wait past the budget: the answer at once"
        );
        let res = client(&retry.time_budget(secs(1)), &api)
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    }

    /// Records the events of `genesys_auth_layer::api_retry` as `field=value` lists.
    #[derive(Clone, Default)]
    struct Events(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Events {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            metadata.target() == "genesys_auth_layer::api_retry"
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Fields(Vec<String>);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                    self.0.push(format!("{}={value:?}", field.name()));
                }
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            let level = event.metadata().level();
            self.0
                .lock()
                .unwrap()
                .push(format!("{level} {}", fields.0.join(" ")));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[tokio::test(start_paused = true)]
    async fn each_retry_is_a_debug_event_without_headers() {
        let scenario = || async {
            let api = Api::new(&[(429, Some("1")), (503, Some("2"))], (503, Some("60")));
            let mut req = get();
            req.headers_mut()
                .insert("x-api-key", "hunter2".parse().unwrap());
            client(&ApiRetry::new(), &api).oneshot(req).await.unwrap()
        };
        // tracing caches each callsite's interest when it is first hit, and while a single
        // dispatcher is registered, as seen by the thread that hits it: another test's
        // thread, with no subscriber, would switch these events off for this test too. So:
        // the callsites are hit (registered) first; then two dispatchers make every thread
        // ask both; then what was cached is recomputed.
        scenario().await;
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let events = Events::default();
        let _guard = tracing::subscriber::set_default(events.clone());
        tracing::callsite::rebuild_interest_cache();

        let res = scenario().await;
        assert_eq!(res.status(), 503);
        let events = events.0.lock().unwrap().clone();
        assert_eq!(
            events,
            [
                "DEBUG message=retrying after the wait status=429 wait_ms=1000 attempt=1 \
                 method=GET path=\"/api/v2/users\"",
                "DEBUG message=retrying after the wait status=503 wait_ms=2000 attempt=2 \
                 method=GET path=\"/api/v2/users\"",
                "DEBUG message=answer not retried status=503 method=GET \
                 path=\"/api/v2/users\" \
                 reason=\"the wait would end past the request's time budget\"",
            ]
        );
        assert!(!events.concat().contains("hunter2"));
    }

    /// With the `metrics` feature, the counters also reach a `metrics` recorder installed
    /// before the policy is built.
    #[cfg(feature = "metrics")]
    #[tokio::test(start_paused = true)]
    async fn counters_reach_a_metrics_recorder() {
        use metrics_util::debugging::DebuggingRecorder;

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let retry = metrics::with_local_recorder(&recorder, ApiRetry::new);
        let api = Api::new(&[(429, Some("2")), (503, Some("1"))], (200, None));
        let res = client(&retry, &api).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
        let counters = crate::test_support::counter_values(&snapshotter);
        assert_eq!(
            counters[&format!("{METRIC_API_REFUSALS}[\"status=429\"]")],
            1
        );
        assert_eq!(
            counters[&format!("{METRIC_API_REFUSALS}[\"status=5xx\"]")],
            1
        );
        assert_eq!(
            counters[&format!("{METRIC_API_RETRIES}[\"status=429\"]")],
            1
        );
        assert_eq!(
            counters[&format!("{METRIC_API_RETRIES}[\"status=5xx\"]")],
            1
        );
        assert_eq!(
            counters[&format!("{METRIC_API_GIVEN_UP}[\"reason=time_budget\"]")],
            0
        );
        assert_eq!(counters[&format!("{METRIC_API_RETRY_WAIT}[]")], 3_000);
    }

    #[test]
    fn debug_shows_the_configuration_and_the_counters() {
        let retry = ApiRetry::new().time_budget(secs(30));
        let debug = format!("{retry:?}");
        assert!(debug.contains("time_budget: 30s"), "{debug}");
        assert!(debug.contains("rate_limited_wait: 3s"), "{debug}");
        assert!(debug.contains("stats: ApiRetryStats"), "{debug}");
    }
}
