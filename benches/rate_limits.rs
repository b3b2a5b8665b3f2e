//! Rate-limit benchmark (issue #14): `genesys-fake` over loopback at a scaled per-token
//! limit (30 requests per 1 s window instead of 300 per minute), 256 concurrent callers
//! offering 4× one token's limit, side by side:
//!
//! * (a) `auth.layers()` alone;
//! * (b) `ApiRetry` over `auth.layers()`;
//! * (c) `ApiRetry` over a `TokenPool` of up to 4 tokens;
//!
//! then (c) again with the same limit per client, and per org (wider than a token: the pool
//! must stop growing, and no caller may see a 429).
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench rate_limits              # 5 rows of 20 s (~2 min)
//! cargo bench -p genesys-auth-benches --bench rate_limits -- --smoke   # 5 rows of 3 s; checks (c) only
//! cargo bench -p genesys-auth-benches --bench rate_limits -- --duration 10 --callers 128
//! ```
//!
//! Callers are closed-loop: caller `i` sends at `offset_i + k × interval` (the callers
//! together offer the rate), or as soon as its previous answer arrived if that is later.
//! "Offered" counts the requests sent in the offering window. Latency is from the send to
//! the final answer (pacing waits and retries included). "Allowed" is what the fake lets
//! through per second: 30 per token for up to 4 tokens (120/s) in the per-token rows with a
//! pool, one token's 30/s without one, and 30/s when the limit is the client's or the
//! org's. Exits non-zero when a goal of the issue fails (in `--smoke`, only (c)'s "every
//! request succeeds, no 429 reaches a caller").

#![allow(missing_docs)] // a bench binary

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{ApiRetry, GenesysAuth, TokenPool, TokenPoolConfig};
use genesys_fake::{ApiLimits, FakeGenesys};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Stack = BoxCloneService<Request<Full<Bytes>>, Response<Bytes>, BoxError>;

const WINDOW: Duration = Duration::from_secs(1);

struct Knobs {
    smoke: bool,
    duration: Duration,
    callers: usize,
    limit: u32,
    factor: u32,
    max_tokens: usize,
}

impl Knobs {
    fn parse() -> Result<Self, String> {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        let mut flag = |name: &str| -> Result<Option<u64>, String> {
            let Some(i) = args.iter().position(|a| a == name) else {
                return Ok(None);
            };
            args.remove(i);
            let value = (i < args.len()).then(|| args.remove(i));
            let value = value.ok_or(format!("{name} needs a value"))?;
            value
                .parse()
                .map(Some)
                .map_err(|e| format!("{name} {value}: {e}"))
        };
        let duration = flag("--duration")?;
        let callers = flag("--callers")?.unwrap_or(256) as usize;
        let limit = flag("--limit")?.unwrap_or(30) as u32;
        let factor = flag("--factor")?.unwrap_or(4) as u32;
        let max_tokens = flag("--max-tokens")?.unwrap_or(4) as usize;
        let smoke = args.iter().any(|a| a == "--smoke");
        let duration = Duration::from_secs(duration.unwrap_or(if smoke { 3 } else { 20 }));
        if callers == 0 || limit == 0 || factor == 0 || max_tokens == 0 || duration.is_zero() {
            return Err("every knob must be positive".into());
        }
        Ok(Self {
            smoke,
            duration,
            callers,
            limit,
            factor,
            max_tokens,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Token,
    Client,
    Org,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stacking {
    /// (a)
    Layers,
    /// (b)
    Retry,
    /// (c)
    Pool,
}

struct Row {
    name: String,
    stacking: Stacking,
    offered: u64,
    ok: u64,
    caller_429s: u64,
    errors: u64,
    server_answers: u64,
    server_429s: u64,
    p50: Duration,
    p99: Duration,
    throughput: f64,
    allowed: f64,
    token_requests: u64,
    tokens_at_end: Option<(usize, bool)>,
}

fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Collects the body, so that a success means the whole answer arrived.
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

async fn run_row(knobs: &Knobs, scope: Scope, stacking: Stacking) -> Result<Row, BoxError> {
    let limit = Some((knobs.limit, WINDOW));
    let limits = ApiLimits {
        per_token: limit,
        per_client: (scope == Scope::Client).then_some(limit).flatten(),
        per_org: (scope == Scope::Org).then_some(limit).flatten(),
    };
    let fake = FakeGenesys::builder().api_limits(limits).start().await?;
    let auth: GenesysAuth = fake.auth_builder().build(h2_client())?;
    let api = h2_client();
    let mut pool: Option<TokenPool> = None;
    let stack = match stacking {
        Stacking::Layers => boxed(ServiceBuilder::new().layer(auth.layers()).service(api)),
        Stacking::Retry => boxed(
            ServiceBuilder::new()
                .layer(ApiRetry::new().layer())
                .layer(auth.layers())
                .service(api),
        ),
        Stacking::Pool => {
            let p = auth.token_pool(
                TokenPoolConfig::new()
                    .max_tokens(knobs.max_tokens)
                    .token_budget(knobs.limit, WINDOW),
            );
            let stack = boxed(
                ServiceBuilder::new()
                    .layer(ApiRetry::new().layer())
                    .layer(p.layer())
                    .service(api),
            );
            pool = Some(p);
            stack
        }
    };
    let uri: Uri = format!("{}api/v2/ping", fake.api_uri()).parse()?;

    let rate = f64::from(knobs.limit * knobs.factor);
    let interval = Duration::from_secs_f64(knobs.callers as f64 / rate);
    let start = Instant::now();
    let end = start + knobs.duration;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..knobs.callers {
        let stack = stack.clone();
        let uri = uri.clone();
        let latencies = latencies.clone();
        let offset = interval.mul_f64(i as f64 / knobs.callers as f64);
        callers.spawn(async move {
            // (offered, ok, 429s, errors)
            let mut counts = (0u64, 0u64, 0u64, 0u64);
            let mut next = start + offset;
            while next < end {
                tokio::time::sleep_until(next).await;
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                counts.0 += 1;
                let request = Request::get(uri.clone()).body(Full::default())?;
                match stack.clone().oneshot(request).await {
                    Ok(response) if response.status() == 200 => counts.1 += 1,
                    Ok(response) if response.status() == 429 => counts.2 += 1,
                    _ => counts.3 += 1,
                }
                let done = Instant::now();
                latencies.lock().unwrap().push(done - sent);
                next = (next + interval).max(done);
            }
            Ok::<_, BoxError>(counts)
        });
    }
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    while let Some(joined) = callers.join_next().await {
        let c = joined??;
        totals = (
            totals.0 + c.0,
            totals.1 + c.1,
            totals.2 + c.2,
            totals.3 + c.3,
        );
    }
    let elapsed = Instant::now() - start;

    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let tokens = match (stacking, scope) {
        (Stacking::Pool, Scope::Token) => knobs.max_tokens as f64,
        _ => 1.0,
    };
    let allowed = (f64::from(knobs.limit) * tokens).min(rate);
    let name = match stacking {
        Stacking::Layers => "(a) auth.layers()",
        Stacking::Retry => "(b) + ApiRetry",
        Stacking::Pool => "(c) + pool ≤ 4",
    };
    let row = Row {
        name: format!("{name}, limit per {}", format!("{scope:?}").to_lowercase()),
        stacking,
        offered: totals.0,
        ok: totals.1,
        caller_429s: totals.2,
        errors: totals.3,
        server_answers: fake.api_requests(),
        server_429s: fake.api_rate_limited(),
        p50: pick(0.50),
        p99: pick(0.99),
        throughput: totals.1 as f64 / elapsed.as_secs_f64(),
        allowed,
        token_requests: fake.token_requests(),
        tokens_at_end: pool.map(|p| {
            let stats = p.stats();
            (stats.tokens, stats.growth_stopped)
        }),
    };
    Ok(row)
}

/// The issue's goals for a row; empty when all are met.
fn unmet(row: &Row, scope: Scope, smoke: bool) -> Vec<String> {
    let mut unmet = Vec::new();
    let every_ok = row.ok == row.offered;
    match row.stacking {
        Stacking::Pool => {
            if !every_ok {
                unmet.push("every request succeeds".to_owned());
            }
            if row.caller_429s > 0 {
                unmet.push("no 429 reaches a caller".to_owned());
            }
            if smoke {
                return unmet;
            }
            if scope == Scope::Token {
                if row.server_429s * 100 > row.server_answers {
                    unmet.push("≤ 1 % of the server's answers are 429".to_owned());
                }
                if row.throughput < 0.95 * row.allowed {
                    unmet.push("throughput ≥ 0.95 × allowed".to_owned());
                }
            } else if row.tokens_at_end.is_some_and(|(_, stopped)| !stopped) {
                unmet.push("the pool stops growing".to_owned());
            }
        }
        Stacking::Retry if !smoke && !every_ok => {
            unmet.push("every request succeeds".to_owned());
        }
        _ => {}
    }
    unmet
}

fn main() -> ExitCode {
    let knobs = match Knobs::parse() {
        Ok(knobs) => knobs,
        Err(e) => {
            eprintln!("rate_limits: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "rate limits: {} callers offering {}/s ({}× a token's {} per {:?}) for {:?} per row{}",
        knobs.callers,
        knobs.limit * knobs.factor,
        knobs.factor,
        knobs.limit,
        WINDOW,
        knobs.duration,
        if knobs.smoke { " (smoke)" } else { "" }
    );
    println!();
    println!("| row | ok / offered | 429s to callers | errors | server 429s / answers | p50 | p99 | ok/s | allowed/s | ratio | token requests | pool at end | goals |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let rows = [
        (Scope::Token, Stacking::Layers),
        (Scope::Token, Stacking::Retry),
        (Scope::Token, Stacking::Pool),
        (Scope::Client, Stacking::Pool),
        (Scope::Org, Stacking::Pool),
    ];
    let mut failed = false;
    for (scope, stacking) in rows {
        let row = match runtime.block_on(run_row(&knobs, scope, stacking)) {
            Ok(row) => row,
            Err(e) => {
                eprintln!("rate_limits: {scope:?} {stacking:?}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let unmet = unmet(&row, scope, knobs.smoke);
        failed |= !unmet.is_empty();
        let pool = row
            .tokens_at_end
            .map_or("—".to_owned(), |(tokens, stopped)| {
                format!(
                    "{tokens} token(s){}",
                    if stopped { ", growth stopped" } else { "" }
                )
            });
        let goals = if unmet.is_empty() {
            "met".to_owned()
        } else {
            format!("NOT MET: {}", unmet.join("; "))
        };
        println!(
            "| {} | {} / {} | {} | {} | {} / {} ({:.1} %) | {:.0} ms | {:.0} ms | {:.1} | {:.0} | {:.3} | {} | {} | {} |",
            row.name,
            row.ok,
            row.offered,
            row.caller_429s,
            row.errors,
            row.server_429s,
            row.server_answers,
            100.0 * row.server_429s as f64 / row.server_answers.max(1) as f64,
            row.p50.as_secs_f64() * 1e3,
            row.p99.as_secs_f64() * 1e3,
            row.throughput,
            row.allowed,
            row.throughput / row.allowed,
            row.token_requests,
            pool,
            goals,
        );
    }
    if failed {
        eprintln!("rate_limits: a goal was not met");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
