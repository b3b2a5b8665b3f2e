//! The single-flight cache under a multi-threaded runtime: thousands of tasks racing
//! refreshes, 401s for the current and older generations, cancelled callers (including the
//! one that started the refresh) and failing refreshes, repeated for many rounds.
//!
//! DESIGN.md invariants checked in every round: 2 (never two token requests in flight),
//! 3 (any number of 401s for one generation cost one token request; 401s for an older
//! generation cost none), 7 (dropping the caller that started a refresh does not cancel
//! it), and that nothing hangs. Also: services reused for many requests never send a
//! revoked token once they have seen the new one.
//!
//! Short by default (CI); `STRESS_LONG=1` runs many more rounds and tasks.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, GenesysAuth, IssuedToken, TokenCache, TokenGeneration,
    TokenSource,
};
use genesys_fake::FakeGenesys;
use http::StatusCode;
use http_body_util::Full;
use tokio::task::JoinHandle;
use tower::ServiceExt;

const LOGIN: &str = "http://127.0.0.1:1";
const API: &str = "http://127.0.0.1:2";

fn long() -> bool {
    std::env::var_os("STRESS_LONG").is_some()
}

/// A token source that records how many fetches overlap, and fails when told to.
#[derive(Default)]
struct Probe {
    fetches: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    fail_next: AtomicBool,
    started: tokio::sync::Notify,
    /// Callers of the current round that have started.
    callers_started: AtomicUsize,
    /// Set for each round: the next fetch holds until this many callers have started.
    hold_for_callers: AtomicUsize,
    /// Signalled when the last caller the fetch holds for has started.
    caller_started: tokio::sync::Notify,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
struct ProbeSource(Arc<Probe>);

impl TokenSource for ProbeSource {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async move {
            let probe = &self.0;
            let n = probe.fetches.fetch_add(1, Ordering::SeqCst);
            let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let _guard = InFlight(&probe.in_flight);
            probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
            probe.started.notify_waiters();
            // The round's first fetch holds until its callers have started: each joins this
            // fetch in its first poll, so thousands pile up on it however slowly a busy
            // machine spawns them (a fixed sleep let the fetch, and in failing rounds its
            // short backoff, end before any caller came).
            let hold = probe.hold_for_callers.swap(0, Ordering::SeqCst);
            // It waits on a signal, not in a polling loop: every wake-up of a refresh wakes
            // each caller waiting on it (they all poll the one shared refresh), so a fetch
            // that woke every millisecond would keep thousands of callers busy.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let signal = probe.caller_started.notified();
                if probe.callers_started.load(Ordering::SeqCst) >= hold
                    || tokio::time::Instant::now() >= deadline
                {
                    break;
                }
                let _ = tokio::time::timeout_at(deadline, signal).await;
            }
            tokio::time::sleep(Duration::from_millis(2 + n % 3)).await;
            if probe.fail_next.swap(false, Ordering::SeqCst) {
                return Err(AuthError::UnexpectedStatus {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    retry_after: None,
                });
            }
            Ok(
                IssuedToken::bearer(&format!("stress-{n}"), Duration::from_secs(3_600))
                    .expect("token"),
            )
        })
    }
}

enum Role {
    Current,
    Older,
    Token,
    Cancelled,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_holds_under_races_cancellations_and_failures() {
    let (rounds, tasks) = if long() { (1_000, 5_000) } else { (100, 2_000) };
    let source = ProbeSource::default();
    let probe = source.0.clone();
    let cache = TokenCache::new(
        source,
        CacheConfig::default()
            // Generous: the first fetch of each round holds until its callers have started.
            .fetch_timeout(Duration::from_secs(30))
            .backoff(Duration::from_millis(2), Duration::from_millis(4)),
    );
    let mut previous = cache.token().await.expect("first token").generation();

    for round in 0..rounds {
        // Wait out any backoff left by the previous round, and the refresh ahead that ends
        // it: after a failed refresh the token a 401 withdrew is back in use, due for
        // refresh, so `token()` alone does not say the cache is settled.
        let current = loop {
            match cache.token().await {
                Ok(token)
                    if cache.health().backoff_remaining.is_none()
                        && tokio::time::Instant::now() < token.refresh_at() =>
                {
                    break token.generation()
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        let failing = round % 5 == 4;
        probe.fail_next.store(failing, Ordering::SeqCst);
        let fetches_before = probe.fetches.load(Ordering::SeqCst);
        // Every caller but the cancelled ones (which may not start at all) starts.
        probe.callers_started.store(0, Ordering::SeqCst);
        let starting = (0..tasks).filter(|i| i % 10 != 9).count();
        probe.hold_for_callers.store(starting, Ordering::SeqCst);

        // The caller that starts the refresh is cancelled as soon as the fetch runs
        // (invariant 7): everyone else must still get its outcome from that one fetch.
        let started = probe.started.notified();
        let starter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh_after_401(current).await }
        });
        started.await;
        starter.abort();

        let handles: Vec<(Role, JoinHandle<Result<TokenGeneration, AuthError>>)> = (0..tasks)
            .map(|i| {
                let cache = cache.clone();
                let role = match i % 10 {
                    0..=3 => Role::Current,
                    4 | 5 => Role::Older,
                    6..=8 => Role::Token,
                    _ => Role::Cancelled,
                };
                let older = previous;
                let probe = probe.clone();
                let handle = tokio::spawn(async move {
                    let n = probe.callers_started.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == starting {
                        probe.caller_started.notify_waiters();
                    }
                    let result = match i % 10 {
                        0..=3 | 9 => cache.refresh_after_401(current).await,
                        4 | 5 => cache.refresh_after_401(older).await,
                        _ => cache.token().await,
                    };
                    result.map(|t| t.generation())
                });
                (role, handle)
            })
            .collect();
        for (role, handle) in &handles {
            if let Role::Cancelled = role {
                handle.abort();
            }
        }

        let mut failures = 0;
        for (role, handle) in handles {
            let joined = tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a caller hangs"));
            let result = match joined {
                Ok(result) => result,
                Err(e) if e.is_cancelled() => continue,
                Err(e) => panic!("round {round}: a caller panicked: {e}"),
            };
            match (role, result) {
                (Role::Current, Ok(g)) => assert!(g > current, "round {round}: {g:?}"),
                (Role::Older, Ok(g)) | (Role::Token, Ok(g)) | (Role::Cancelled, Ok(g)) => {
                    assert!(g >= current, "round {round}: {g:?} < {current:?}")
                }
                (_, Err(err)) => {
                    failures += 1;
                    assert!(failing, "round {round}: unexpected failure {err}");
                    assert!(
                        matches!(err, AuthError::UnexpectedStatus { status, .. } if status == 503),
                        "round {round}: {err:?}"
                    );
                }
            }
        }
        let fetches = probe.fetches.load(Ordering::SeqCst) - fetches_before;
        assert_eq!(
            probe.max_in_flight.load(Ordering::SeqCst),
            1,
            "round {round}: two token requests were in flight at once"
        );
        if failing {
            assert!(failures > 0, "round {round}: the failure was not shared");
            // The shared failure, then (after a 2–4 ms backoff) refreshes that succeed.
            assert!(fetches >= 1, "round {round}: {fetches} fetches");
        } else {
            assert_eq!(
                fetches, 1,
                "round {round}: {tasks} callers and a cancelled starter cost {fetches} token requests"
            );
            assert_eq!(
                cache.current().map(|t| t.generation()),
                Some(TokenGeneration(current.0 + 1))
            );
        }
        previous = current;
    }
}

/// The in-process fake, auth for it, and the full stack (retry + auth) in front of it.
fn in_process_stack() -> (FakeGenesys, GenesysAuth, common::Stack) {
    let fake = FakeGenesys::builder().build_in_process();
    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        // The in-process fake routes by path: any loopback authorities will do.
        .login_uri(LOGIN)
        .api_uri(API)
        .build(fake.service())
        .expect("auth");
    let client = common::stack(&auth, fake.service());
    (fake, auth, client)
}

/// The whole stack under load on a multi-threaded runtime, with every token revoked again
/// and again: every request ends (200, or the 401 of a request whose replay was revoked
/// too), and token requests stay within one per revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_under_load_with_repeated_revocation() {
    let (waves, per_wave) = if long() { (300, 2_000) } else { (30, 1_000) };
    let (fake, auth, client) = in_process_stack();
    let mut revocations = 0;
    let mut ok = 0u64;
    let mut unauthorized = 0u64;
    for _ in 0..waves {
        let handles: Vec<_> = (0..per_wave)
            .map(|i| {
                let client = client.clone();
                let request = http::Request::post(format!("{API}/api/v2/echo"))
                    .body(Full::new(Bytes::from(format!("payload-{i}"))))
                    .expect("request");
                tokio::spawn(async move { client.oneshot(request).await })
            })
            .collect();
        // Revoke while the wave is in flight.
        tokio::task::yield_now().await;
        fake.revoke_all_tokens();
        revocations += 1;
        for handle in handles {
            let response = tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("a request hangs")
                .expect("no panic")
                .expect("no error: the token endpoint is healthy");
            match response.status() {
                StatusCode::OK => ok += 1,
                StatusCode::UNAUTHORIZED => unauthorized += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    let token_requests = auth.stats().refreshes;
    assert!(
        token_requests <= revocations + 1,
        "{token_requests} token requests for {revocations} revocations"
    );
    assert_eq!(fake.token_requests(), token_requests);
    assert!(ok > 0);
    assert!(fake.api_unauthorized() > 0, "the revocations caused 401s");
    assert!(auth.stats().replays_after_401 > 0, "and replays");
    eprintln!(
        "{} requests: {ok} ok, {unauthorized} 401 after a replay; {token_requests} token requests",
        waves * per_wave
    );
}

/// Long-lived services (each worker reuses its own clone) while every token is revoked
/// again and again: no service keeps sending a revoked token.
/// Every request ends (200, or the 401 of a replay whose new token was revoked too), token
/// requests stay within one per revocation, and once revocations stop every worker's next
/// requests succeed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reused_services_under_repeated_revocation() {
    let (workers, revocations) = if long() { (32, 300) } else { (8, 40) };
    let (fake, auth, client) = in_process_stack();
    let stop = Arc::new(AtomicBool::new(false));
    // Workers and this task: after the revocations, all warm up, then all send.
    let warmed = Arc::new(tokio::sync::Barrier::new(workers + 1));
    let counted = Arc::new(tokio::sync::Barrier::new(workers + 1));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (mut service, stop) = (client.clone(), stop.clone());
            let (warmed, counted) = (warmed.clone(), counted.clone());
            tokio::spawn(async move {
                let (mut ok, mut unauthorized) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    // The in-process fake answers without I/O: let the revoking task run.
                    tokio::task::yield_now().await;
                    match send_one(&mut service).await {
                        StatusCode::OK => ok += 1,
                        StatusCode::UNAUTHORIZED => unauthorized += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                // Revocations are over. The first request may still meet the last
                // revocation (401, replayed); after it, the same service must send only
                // the current token: no more 401s at all.
                send_one(&mut service).await;
                warmed.wait().await;
                counted.wait().await;
                for _ in 0..5 {
                    let status = send_one(&mut service).await;
                    assert_eq!(status, StatusCode::OK, "a revoked token kept");
                }
                (ok, unauthorized)
            })
        })
        .collect();
    for _ in 0..revocations {
        tokio::time::sleep(Duration::from_millis(2)).await;
        fake.revoke_all_tokens();
    }
    stop.store(true, Ordering::SeqCst);
    warmed.wait().await;
    let unauthorized_before = fake.api_unauthorized();
    counted.wait().await;
    let mut ok = 0;
    for handle in handles {
        let (o, _) = tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("a worker hangs")
            .expect("no panic");
        ok += o;
    }
    let token_requests = auth.stats().refreshes;
    assert!(
        token_requests <= revocations + 1,
        "{token_requests} token requests for {revocations} revocations"
    );
    assert!(ok > 0);
    assert!(unauthorized_before > 0, "the revocations caused 401s");
    assert_eq!(
        fake.api_unauthorized(),
        unauthorized_before,
        "a service sent a revoked token after it had seen the new one"
    );
}

/// One `GET /api/v2/ping` on `service` itself (no clone).
async fn send_one(service: &mut common::Stack) -> StatusCode {
    use tower::Service;
    let request = http::Request::get(format!("{API}/api/v2/ping"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let ready = service.ready().await.expect("ready");
    ready.call(request).await.expect("no error").status()
}
