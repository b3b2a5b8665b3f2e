//! Load harness and 401-storm benchmark: a hyper-util client (HTTP/2, prior knowledge)
//! through the full stack (`RetryLayer<RefreshOn401>` + `AuthLayer`) against `genesys-fake`
//! over loopback, side by side with the same client and a static token.
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench load             # full run: 9 paired rounds of 3 s + storm (~75 s)
//! cargo bench -p genesys-auth-benches --bench load -- --smoke  # a few seconds; also LOAD_SMOKE=1
//! cargo bench -p genesys-auth-benches --bench load -- --concurrency 512 --duration 10 --rounds 3 \
//!     --lifetime-ms 2000 --token-latency-ms 50 --storm 100,1000,10000
//! cargo bench -p genesys-auth-benches --bench load -- --variants --rounds 8 --duration 3   # per-layer comparison
//! ```
//!
//! `--variants` runs, instead of the load table and the storm, one round of each stack per
//! round (order rotating): (a) static token, (a′) the same again (A/A: the noise floor),
//! (b) static + `Retry` with a copy-only policy, (c) `AuthLayer` alone, (d) the full stack,
//! (e) copy-only `Retry` + `AuthLayer`; with each one's paired ratio to (a) and, on Linux,
//! the process CPU time per request (from `/proc`).
//!
//! Every knob is also an environment variable: `LOAD_CONCURRENCY`, `LOAD_DURATION`
//! (seconds per round), `LOAD_ROUNDS`, `LOAD_LIFETIME_MS`, `LOAD_TOKEN_LATENCY_MS`,
//! `LOAD_STORM` (comma-separated sizes), `LOAD_SMOKE=1`. Command-line flags win.
//!
//! The fake, the callers and the client share one 2-worker tokio runtime, so on a 2-core
//! machine the absolute numbers are the fake's as much as the client's: read the ratios.
//! Exits non-zero if a request fails or a storm costs more than one token request.

#![allow(missing_docs)] // a bench binary

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{CacheConfig, GenesysAuth};
use genesys_fake::FakeGenesys;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Stack = BoxCloneService<Request<Full<Bytes>>, Response<Bytes>, BoxError>;

#[derive(Clone, Debug)]
struct Knobs {
    smoke: bool,
    concurrency: usize,
    duration: Duration,
    rounds: usize,
    lifetime: Duration,
    token_latency: Duration,
    refresh_window: Duration,
    storm: Vec<usize>,
    /// `--variants`: only the per-layer comparison (see [`run_variants`]), no storm.
    variants: bool,
}

impl Knobs {
    fn parse() -> Result<Self, String> {
        let env = |name: &str| std::env::var(name).ok();
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        let mut flag = |name: &str| -> Option<String> {
            let i = args.iter().position(|a| a == name)?;
            args.remove(i);
            (i < args.len()).then(|| args.remove(i))
        };
        let concurrency = flag("--concurrency").or_else(|| env("LOAD_CONCURRENCY"));
        let duration = flag("--duration").or_else(|| env("LOAD_DURATION"));
        let rounds = flag("--rounds").or_else(|| env("LOAD_ROUNDS"));
        let lifetime = flag("--lifetime-ms").or_else(|| env("LOAD_LIFETIME_MS"));
        let latency = flag("--token-latency-ms").or_else(|| env("LOAD_TOKEN_LATENCY_MS"));
        let storm = flag("--storm").or_else(|| env("LOAD_STORM"));
        let smoke = args.iter().any(|a| a == "--smoke")
            || env("LOAD_SMOKE").is_some_and(|v| v != "0" && !v.is_empty());
        let variants = args.iter().any(|a| a == "--variants");
        // `cargo bench` appends `--bench`; anything else unknown is a mistake.
        if let Some(bad) = args.iter().find(|a| {
            !matches!(
                a.as_str(),
                "--smoke" | "--variants" | "--bench" | "--nocapture"
            )
        }) {
            return Err(format!("unknown argument {bad:?}"));
        }
        let num = |v: Option<String>, default: u64| -> Result<u64, String> {
            v.map_or(Ok(default), |s| {
                s.parse().map_err(|_| format!("not a number: {s}"))
            })
        };
        let storm = match storm {
            Some(list) => list
                .split(',')
                .map(|s| s.trim().parse().map_err(|_| format!("not a number: {s}")))
                .collect::<Result<Vec<usize>, _>>()?,
            None if smoke => vec![100, 1_000],
            None => vec![100, 1_000, 10_000],
        };
        Ok(Self {
            smoke,
            concurrency: num(concurrency, if smoke { 64 } else { 256 })? as usize,
            duration: Duration::from_secs(num(duration, if smoke { 1 } else { 3 })?),
            rounds: num(rounds, if smoke { 1 } else { 9 })?.max(1) as usize,
            lifetime: Duration::from_millis(num(lifetime, 2_000)?),
            token_latency: Duration::from_millis(num(latency, 50)?),
            refresh_window: Duration::from_millis(300),
            storm,
            variants,
        })
    }
}

/// One HTTP/2 connection (prior knowledge): thousands of concurrent requests stay far
/// below the file-descriptor limit.
fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_max_concurrent_reset_streams(100_000)
        .build_http()
}

/// Collects the body so that a "success" means the whole answer arrived.
fn boxed<S, B>(service: S) -> Stack
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    BoxCloneService::new(
        service
            .map_err(Into::into)
            .and_then(|response: Response<B>| async move {
                let (parts, body) = response.into_parts();
                let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
                Ok(Response::from_parts(parts, bytes))
            }),
    )
}

fn auth_for(fake: &FakeGenesys, config: CacheConfig) -> Result<GenesysAuth, BoxError> {
    Ok(fake
        .auth_builder()
        .cache_config(config)
        .build(h2_client())?)
}

fn ping_uri(fake: &FakeGenesys) -> Result<Uri, BoxError> {
    Ok(format!("{}api/v2/ping", fake.api_uri()).parse()?)
}

fn get(uri: &Uri) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    *req.uri_mut() = uri.clone();
    req
}

/// What C callers measured in one timed round.
#[derive(Default)]
struct Round {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

impl Round {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[i]))
    }
}

/// C callers, each sending one request after another until `duration` is over.
///
/// Each caller keeps its own clone of the stack for the whole round and calls it again and
/// again (`ready`, then `call`), as a worker task holding a client does; the services in it
/// therefore live across requests, as they do in such an application.
async fn hammer(client: &Stack, uri: &Uri, concurrency: usize, duration: Duration) -> Round {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, uri) = (client.clone(), uri.clone());
        tasks.spawn(async move {
            let mut round = Round::default();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let answer = match client.ready().await {
                    Ok(ready) => ready.call(get(&uri)).await,
                    Err(error) => Err(error),
                };
                match answer {
                    Ok(res) if res.status() == StatusCode::OK => {
                        round.ok += 1;
                        let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        round.latencies_us.push(us);
                    }
                    _ => round.errors += 1,
                }
            }
            round
        });
    }
    let mut total = Round::default();
    while let Some(done) = tasks.join_next().await {
        let round = done.unwrap_or_default();
        total.ok += round.ok;
        total.errors += round.errors;
        total.latencies_us.extend(round.latencies_us);
    }
    total.elapsed = start.elapsed();
    total
}

/// The cache counters that moved during a round.
struct Delta {
    token_requests: u64,
    waited_for_token: u64,
    replays_after_401: u64,
}

struct LoadResult {
    round: Round,
    /// Cache counters during the timed round (after the first token).
    stats: Delta,
    token_requests_at_fake: u64,
    api_401: u64,
}

/// One timed round through the full stack, on a fresh fake.
async fn load_dynamic(k: &Knobs) -> Result<LoadResult, BoxError> {
    let fake = FakeGenesys::builder()
        .token_lifetime(k.lifetime)
        .token_latency(k.token_latency)
        .start()
        .await?;
    let config = CacheConfig::default()
        .refresh_ahead(k.refresh_window, 0.0)
        .refresh_jitter(0.0);
    let auth = auth_for(&fake, config)?;
    auth.token().await?; // the first token: requests may wait for it, none after it
    let before = auth.cache().stats();
    let fake_before = fake.token_requests();
    let client = boxed(
        ServiceBuilder::new()
            .layer(auth.layers())
            .service(h2_client()),
    );
    let round = hammer(&client, &ping_uri(&fake)?, k.concurrency, k.duration).await;
    let after = auth.cache().stats();
    let result = LoadResult {
        round,
        stats: Delta {
            token_requests: after.refreshes - before.refreshes,
            waited_for_token: after.waited_for_token - before.waited_for_token,
            replays_after_401: after.replays_after_401 - before.replays_after_401,
        },
        token_requests_at_fake: fake.token_requests() - fake_before,
        api_401: fake.api_unauthorized(),
    };
    fake.shutdown().await;
    Ok(result)
}

/// The same round with a static token (no refresh, no retry): the baseline.
async fn load_static(k: &Knobs) -> Result<Round, BoxError> {
    let fake = FakeGenesys::builder()
        .token_latency(k.token_latency)
        .start()
        .await?;
    let mut header = HeaderValue::try_from(format!("Bearer {}", fake.issue_token()))?;
    header.set_sensitive(true);
    let client = boxed(
        ServiceBuilder::new()
            .layer(SetRequestHeaderLayer::overriding(AUTHORIZATION, header))
            .service(h2_client()),
    );
    let round = hammer(&client, &ping_uri(&fake)?, k.concurrency, k.duration).await;
    fake.shutdown().await;
    Ok(round)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Knobs {
    /// The settings a table was measured with, for its heading.
    fn describe(&self) -> String {
        format!(
            "concurrency {}, {} s per round, {} round(s), token lifetime {} ms, \
             token latency {} ms, refresh window {} ms",
            self.concurrency,
            self.duration.as_secs(),
            self.rounds,
            self.lifetime.as_millis(),
            self.token_latency.as_millis(),
            self.refresh_window.as_millis()
        )
    }
}

/// Runs the load rounds; reports whether correctness and the throughput bar held.
async fn run_load(k: &Knobs) -> Result<LoadOutcome, BoxError> {
    println!("## Load: {}", k.describe());
    println!();
    println!(
        "| round | stack | requests/s | p50 ms | p99 ms | max ms | token requests | \
         waited for token | 401 replays | errors |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let (mut dyn_rps, mut static_rps) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    let (mut all_good, mut no_errors) = (true, true);
    let window = k.lifetime.saturating_sub(k.refresh_window);
    if !k.smoke {
        // One discarded second of each, so neither side pays the process's warm-up.
        let warm = Knobs {
            duration: Duration::from_secs(1),
            ..k.clone()
        };
        load_static(&warm).await?;
        load_dynamic(&warm).await?;
    }
    for r in 1..=k.rounds {
        // Alternate, static first, so that drift on a shared machine hits both sides.
        let mut base = load_static(k).await?;
        println!(
            "| {r} | static token (SetRequestHeaderLayer) | {:.0} | {} | {} | {} | 0 | 0 | 0 | {} |",
            base.rps(),
            ms(base.percentile(0.50)),
            ms(base.percentile(0.99)),
            ms(base.percentile(1.0)),
            base.errors
        );
        static_rps.push(base.rps());
        let mut ours = load_dynamic(k).await?;
        let secs = ours.round.elapsed.as_secs_f64();
        let lifetimes = secs / k.lifetime.as_secs_f64();
        let refresh_periods = secs / (window + k.token_latency).as_secs_f64();
        println!(
            "| {r} | full stack (auth + replay) | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            ours.round.rps(),
            ms(ours.round.percentile(0.50)),
            ms(ours.round.percentile(0.99)),
            ms(ours.round.percentile(1.0)),
            ours.stats.token_requests,
            ours.stats.waited_for_token,
            ours.stats.replays_after_401,
            ours.round.errors
        );
        println!(
            "|   | (token requests seen by the fake: {}; lifetimes elapsed: {lifetimes:.2}; \
             refresh periods of lifetime − window + latency: {refresh_periods:.2}; API 401s: {}) \
             | | | | | | | | |",
            ours.token_requests_at_fake, ours.api_401
        );
        ratios.push(ours.round.rps() / base.rps());
        dyn_rps.push(ours.round.rps());
        let expected = refresh_periods.floor() as i64;
        let got = ours.stats.token_requests as i64;
        no_errors &= ours.round.errors == 0 && base.errors == 0;
        all_good &= ours.stats.waited_for_token == 0 && (got - expected).abs() <= 1;
    }
    let (d, s) = (median(dyn_rps), median(static_rps));
    let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    let ratio = median(ratios);
    println!();
    println!(
        "Median requests/s: full stack {d:.0}, static token {s:.0}. Paired per-round ratios \
         (full stack ÷ static, same round): [{}]; median {ratio:.3} (bar ≥ 0.95)",
        shown.join(", ")
    );
    println!();
    // Correctness (no errors, no waits, token requests per lifetime) decides the exit code;
    // the throughput ratio is reported against its bar but, on a shared machine, is noise
    // more than signal from one run, so it never fails the command.
    let timing = ratio >= 0.95;
    Ok(LoadOutcome {
        correct: no_errors && (k.smoke || all_good),
        throughput_bar_met: timing,
    })
}

/// What a load run showed.
struct LoadOutcome {
    correct: bool,
    throughput_bar_met: bool,
}

/// N requests, all prepared (token attached) before any is sent, then sent at once; the
/// time until every one has a 200.
async fn burst(client: &Stack, uri: &Uri, n: usize) -> Result<(Duration, u64), BoxError> {
    let mut futures = Vec::with_capacity(n);
    for _ in 0..n {
        let mut svc = client.clone();
        svc.ready().await?;
        futures.push(svc.call(get(uri)));
    }
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for f in futures {
        tasks.spawn(f);
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(res)) if res.status() == StatusCode::OK => {}
            _ => failed += 1,
        }
    }
    Ok((start.elapsed(), failed))
}

async fn run_storm(k: &Knobs) -> Result<bool, BoxError> {
    println!(
        "## Storm: every token revoked, N requests carrying it sent at once (token latency {} ms)",
        k.token_latency.as_millis()
    );
    println!();
    println!(
        "| N | no-storm ms | storm ms | extra ms | token requests | API 401s | 401 replays | \
         failed | one token round trip ms | one API round trip ms (best of 5) | floor ms | \
         storm ÷ floor |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut all_good = true;
    for &n in &k.storm {
        let fake = FakeGenesys::builder()
            .token_latency(k.token_latency)
            .start()
            .await?;
        let auth = auth_for(&fake, CacheConfig::default())?;
        let client = boxed(
            ServiceBuilder::new()
                .layer(auth.layers())
                .service(h2_client()),
        );
        let uri = ping_uri(&fake)?;
        let token_started = Instant::now();
        auth.token().await?;
        let token_rtt = token_started.elapsed();
        // Warm the connection, then time one API round trip.
        client.clone().oneshot(get(&uri)).await?;
        let mut api_rtt = Duration::MAX;
        for _ in 0..5 {
            let api_started = Instant::now();
            client.clone().oneshot(get(&uri)).await?;
            api_rtt = api_rtt.min(api_started.elapsed());
        }

        let (calm, calm_failed) = burst(&client, &uri, n).await?;
        fake.revoke_all_tokens();
        fake.reset_counters();
        let before = auth.cache().stats();
        let (storm, storm_failed) = burst(&client, &uri, n).await?;
        let after = auth.cache().stats();
        let token_requests = after.refreshes - before.refreshes;
        // The least any single-flight, replay-once client can take: no replay before one
        // token round trip after the first 401, and every request reaches the API twice
        // (twice the no-storm work, when the API is the bottleneck).
        let floor = (calm + token_rtt).max(calm * 2);
        println!(
            "| {n} | {} | {} | {} | {token_requests} | {} | {} | {} | {} | {} | {} | {:.2} |",
            ms(calm),
            ms(storm),
            ms(storm.saturating_sub(calm)),
            fake.api_unauthorized(),
            after.replays_after_401 - before.replays_after_401,
            calm_failed + storm_failed,
            ms(token_rtt),
            ms(api_rtt),
            ms(floor),
            storm.as_secs_f64() / floor.as_secs_f64()
        );
        all_good &= token_requests == 1
            && fake.token_requests() == 1
            && calm_failed == 0
            && storm_failed == 0
            && fake.api_unauthorized() == n as u64;
        fake.shutdown().await;
    }
    println!();
    Ok(all_good)
}

/// CPU time from `/proc` (Linux; `None` elsewhere), in clock ticks (USER_HZ, 100 per second
/// on Linux): this process's user + system time, the whole machine's busy time, and the
/// time the hypervisor stole from it.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    process: u64,
    machine_busy: u64,
    steal: u64,
    at: Instant,
}

const TICKS_PER_SECOND: f64 = 100.0;

impl CpuSample {
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces), from field 4 (ppid) on:
        // utime (field 14) and stime (15) are at 10 and 11.
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<u64> = after
            .split_whitespace()
            .skip(1)
            .take(12)
            .map(|s| s.parse().unwrap_or(0))
            .collect();
        let process = f.get(10)? + f.get(11)?;
        let machine = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = machine
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|s| s.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let busy = cpu.first()? + cpu.get(1)? + cpu.get(2)? + cpu.get(5)? + cpu.get(6)?;
        Some(Self {
            process,
            machine_busy: busy,
            steal: *cpu.get(7)?,
            at: Instant::now(),
        })
    }
}

/// Where the machine's CPU went between two samples.
struct CpuUse {
    /// Cores this process kept busy on average.
    process_cores: f64,
    /// Cores busy with anything else (other processes, the kernel on their behalf).
    other_cores: f64,
    /// Cores' worth of time stolen by the hypervisor.
    steal_cores: f64,
    /// Process CPU time per successful request, in microseconds.
    us_per_request: f64,
}

impl CpuUse {
    fn between(before: Option<CpuSample>, after: Option<CpuSample>, ok: u64) -> Option<Self> {
        let (b, a) = (before?, after?);
        let secs = a.at.duration_since(b.at).as_secs_f64();
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / secs;
        let process = a.process.saturating_sub(b.process);
        let busy = a.machine_busy.saturating_sub(b.machine_busy);
        Some(Self {
            process_cores: cores(process),
            other_cores: cores(busy.saturating_sub(process)),
            steal_cores: cores(a.steal.saturating_sub(b.steal)),
            us_per_request: process as f64 / TICKS_PER_SECOND * 1e6 / ok.max(1) as f64,
        })
    }
}

/// A [`tower::retry::Policy`] that copies every request with `Request::clone` (method, URI,
/// version, headers, extensions, body) and never replays: what `Retry` costs on its own,
/// whatever the policy.
#[derive(Clone, Copy, Debug)]
struct CopyOnly;

impl<Res, E> tower::retry::Policy<Request<Full<Bytes>>, Res, E> for CopyOnly {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        _: &mut Result<Res, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(request.clone())
    }
}

/// The stacks `--variants` compares, all on the same hyper-util client and the same fake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// (a) `SetRequestHeaderLayer` with a fixed token: the baseline.
    Static,
    /// (a) again, on its own fresh fake: the A/A comparison that shows the noise floor.
    StaticAgain,
    /// (b) (a) under `tower::retry::RetryLayer<CopyOnly>`: what any replay policy costs.
    StaticRetry,
    /// (c) `AuthLayer` alone, no retry.
    Auth,
    /// (d) `auth.layers()`: `AuthReplayLayer`, auth and replay-once in one service.
    Full,
    /// (e) `RetryLayer<CopyOnly>` outside `AuthLayer`: a replay-capable stack built from
    /// tower's `Retry` with a policy that only copies.
    AuthCopyRetry,
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::Static,
        Variant::StaticAgain,
        Variant::StaticRetry,
        Variant::Auth,
        Variant::Full,
        Variant::AuthCopyRetry,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Static => "(a) static SetRequestHeader",
            Variant::StaticAgain => "(a′) static again (A/A)",
            Variant::StaticRetry => "(b) static + Retry<CopyOnly>",
            Variant::Auth => "(c) AuthLayer alone",
            Variant::Full => "(d) full stack (auth + replay)",
            Variant::AuthCopyRetry => "(e) Retry<CopyOnly> + AuthLayer",
        }
    }
}

/// One timed round of `variant` on a fresh fake. Every variant's fake has the same knobs
/// (token lifetime and latency); the static token is issued for an hour.
async fn load_variant(k: &Knobs, variant: Variant) -> Result<(Round, Option<CpuUse>), BoxError> {
    let fake = FakeGenesys::builder()
        .token_lifetime(k.lifetime)
        .token_latency(k.token_latency)
        .start()
        .await?;
    let uri = ping_uri(&fake)?;
    let static_header = || -> Result<HeaderValue, BoxError> {
        fake.set_token_lifetime(Duration::from_secs(3600));
        let token = fake.issue_token();
        fake.set_token_lifetime(k.lifetime);
        let mut header = HeaderValue::try_from(format!("Bearer {token}"))?;
        header.set_sensitive(true);
        Ok(header)
    };
    let auth = match variant {
        Variant::Auth | Variant::Full | Variant::AuthCopyRetry => {
            let config = CacheConfig::default()
                .refresh_ahead(k.refresh_window, 0.0)
                .refresh_jitter(0.0);
            let auth = auth_for(&fake, config)?;
            auth.token().await?;
            Some(auth)
        }
        Variant::Static | Variant::StaticAgain | Variant::StaticRetry => None,
    };
    let client = match (variant, &auth) {
        (Variant::Static | Variant::StaticAgain, _) => boxed(
            ServiceBuilder::new()
                .layer(SetRequestHeaderLayer::overriding(
                    AUTHORIZATION,
                    static_header()?,
                ))
                .service(h2_client()),
        ),
        (Variant::StaticRetry, _) => boxed(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(CopyOnly))
                .layer(SetRequestHeaderLayer::overriding(
                    AUTHORIZATION,
                    static_header()?,
                ))
                .service(h2_client()),
        ),
        (Variant::Auth, Some(auth)) => boxed(
            ServiceBuilder::new()
                .layer(auth.layer())
                .service(h2_client()),
        ),
        (Variant::Full, Some(auth)) => boxed(
            ServiceBuilder::new()
                .layer(auth.layers())
                .service(h2_client()),
        ),
        (Variant::AuthCopyRetry, Some(auth)) => boxed(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(CopyOnly))
                .layer(auth.layer())
                .service(h2_client()),
        ),
        (Variant::Auth | Variant::Full | Variant::AuthCopyRetry, None) => {
            unreachable!("built above")
        }
    };
    let before = CpuSample::now();
    let round = hammer(&client, &uri, k.concurrency, k.duration).await;
    let cpu = CpuUse::between(before, CpuSample::now(), round.ok);
    drop(client);
    drop(auth);
    fake.shutdown().await;
    Ok((round, cpu))
}

/// `--variants`: per round, every [`Variant`] once (the order rotating from round to
/// round, so that no variant always runs first or last), each against a fresh fake; then
/// each variant's paired ratio to the static baseline of the same round.
async fn run_variants(k: &Knobs) -> Result<bool, BoxError> {
    println!("## Variants: {}", k.describe());
    println!();
    println!(
        "| round | variant | requests/s | ÷ (a) same round | p50 ms | p99 ms | errors | \
         CPU µs/request | ÷ (a) | cores: ours | others | stolen |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    if !k.smoke {
        let warm = Knobs {
            duration: Duration::from_secs(1),
            ..k.clone()
        };
        for v in Variant::ALL {
            let _ = load_variant(&warm, v).await?;
        }
    }
    let n = Variant::ALL.len();
    let mut ratios = vec![Vec::new(); n];
    let mut cpu_ratios = vec![Vec::new(); n];
    let mut no_errors = true;
    for r in 1..=k.rounds {
        let mut rounds: Vec<Option<(Round, Option<CpuUse>)>> = (0..n).map(|_| None).collect();
        for i in 0..n {
            let idx = (i + r - 1) % n;
            rounds[idx] = Some(load_variant(k, Variant::ALL[idx]).await?);
        }
        let base = rounds[0].as_ref().map_or(0.0, |(round, _)| round.rps());
        let base_cpu = rounds[0]
            .as_ref()
            .and_then(|(_, cpu)| cpu.as_ref())
            .map(|cpu| cpu.us_per_request);
        for (idx, slot) in rounds.iter_mut().enumerate() {
            let Some((round, cpu)) = slot else { continue };
            let ratio = round.rps() / base;
            ratios[idx].push(ratio);
            no_errors &= round.errors == 0;
            let cpu_cols = match (cpu, base_cpu) {
                (Some(c), Some(b)) => {
                    cpu_ratios[idx].push(c.us_per_request / b);
                    format!(
                        "{:.2} | {:.3} | {:.2} | {:.2} | {:.2}",
                        c.us_per_request,
                        c.us_per_request / b,
                        c.process_cores,
                        c.other_cores,
                        c.steal_cores
                    )
                }
                _ => "n/a | n/a | n/a | n/a | n/a".to_owned(),
            };
            println!(
                "| {r} | {} | {:.0} | {ratio:.3} | {} | {} | {} | {cpu_cols} |",
                Variant::ALL[idx].label(),
                round.rps(),
                ms(round.percentile(0.50)),
                ms(round.percentile(0.99)),
                round.errors
            );
        }
    }
    let show = |v: &[f64]| -> String {
        let shown: Vec<String> = v.iter().map(|r| format!("{r:.3}")).collect();
        shown.join(", ")
    };
    println!();
    println!(
        "| variant | requests/s ÷ (a), paired | median | CPU per request ÷ (a), paired | median |"
    );
    println!("| --- | --- | ---: | --- | ---: |");
    for (idx, v) in Variant::ALL.iter().enumerate().skip(1) {
        let cpu_median = if cpu_ratios[idx].is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.3}", median(cpu_ratios[idx].clone()))
        };
        println!(
            "| {} | {} | {:.3} | {} | {cpu_median} |",
            v.label(),
            show(&ratios[idx]),
            median(ratios[idx].clone()),
            show(&cpu_ratios[idx]),
        );
    }
    println!();
    Ok(no_errors)
}

fn main() -> ExitCode {
    let knobs = match Knobs::parse() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("load: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if knobs.smoke {
        println!("(smoke mode: short rounds; bars on timing are reported, not enforced)");
        println!();
    }
    if knobs.variants {
        return match rt.block_on(run_variants(&knobs)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("load: some requests failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("load: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let outcome = rt.block_on(async {
        let load = run_load(&knobs).await?;
        let storm = run_storm(&knobs).await?;
        Ok::<_, BoxError>((load, storm))
    });
    match outcome {
        Ok((load, storm)) => {
            println!(
                "load: correctness {}, throughput bar {}; storm bars {}",
                if load.correct { "met" } else { "NOT met" },
                if load.throughput_bar_met {
                    "met"
                } else {
                    "not met (timing, reported only)"
                },
                if storm { "met" } else { "NOT met" }
            );
            if storm && load.correct {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}
