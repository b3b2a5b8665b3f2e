//! The token pool against the fake's API limits (issue #14, item 3), on tokio's paused
//! clock: pacing, growth, a 429 parking its token, a limit wider than a token, the bounded
//! queue, and a 401 storm costing one token request per slot.

mod common;

use std::time::Duration;

use genesys_auth_layer::{ApiRetry, GenesysAuth, RateLimited, TokenPool, TokenPoolConfig};
use genesys_fake::{ApiFault, ApiLimitScope, ApiLimits, FakeGenesys};
use tokio::time::Instant;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use common::get;

/// The in-process fake routes by path; a loopback origin satisfies the https rule.
const BASE: &str = "http://127.0.0.1:9";
const SECOND: Duration = Duration::from_secs(1);

fn fake(limits: ApiLimits) -> FakeGenesys {
    FakeGenesys::builder().api_limits(limits).build_in_process()
}

fn auth(fake: &FakeGenesys) -> GenesysAuth {
    GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri(BASE)
        .api_uri(BASE)
        .build(fake.service())
        .unwrap()
}

fn per_token(requests: u32) -> ApiLimits {
    ApiLimits {
        per_token: Some((requests, SECOND)),
        ..ApiLimits::default()
    }
}

/// Sends `n` concurrent GETs, each on its own clone of `client`; their statuses, or errors.
async fn send_all<S>(client: &S, n: usize) -> Vec<Result<u16, BoxError>>
where
    S: tower::Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<genesys_fake::FakeBody>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let response = client.oneshot(get(BASE, "/api/v2/ping")).await?;
                Ok(response.status().as_u16())
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

fn all_ok(results: &[Result<u16, BoxError>]) -> bool {
    results.iter().all(|r| matches!(r, Ok(200)))
}

/// One token, 5 a second: 20 concurrent requests are paced over 3 s and the fake refuses
/// none of them.
#[tokio::test(start_paused = true)]
async fn pacing_keeps_one_token_under_its_limit() {
    let fake = fake(per_token(5));
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1).token_budget(5, SECOND));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    let start = Instant::now();
    let results = send_all(&client, 20).await;
    let took = Instant::now() - start;

    assert!(all_ok(&results), "{results:?}");
    assert_eq!(fake.api_rate_limited(), 0, "pacing sent nothing to a 429");
    assert_eq!(fake.token_requests(), 1);
    let stats = pool.stats();
    assert_eq!((stats.tokens, stats.budget_waits), (1, 15), "{stats:?}");
    // Four batches of 5, a window and its 20 ms margin apart.
    assert!(
        took >= Duration::from_millis(3_060) && took < Duration::from_millis(3_500),
        "{took:?}"
    );
}

/// Up to 4 tokens of 5 a second: 20 concurrent requests go at once on 4 tokens.
#[tokio::test(start_paused = true)]
async fn the_pool_grows_instead_of_waiting() {
    let fake = fake(per_token(5));
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(4).token_budget(5, SECOND));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    let start = Instant::now();
    let results = send_all(&client, 20).await;

    assert!(all_ok(&results), "{results:?}");
    assert!(Instant::now() - start < SECOND, "nobody waited a window");
    assert_eq!(fake.api_rate_limited(), 0);
    assert_eq!(fake.token_requests(), 4, "one token per slot");
    let stats = pool.stats();
    assert_eq!((stats.tokens, stats.budget_waits), (4, 0), "{stats:?}");

    // A 21st request: every token spent its budget, the pool is full, so it waits for the
    // first token's window to pass.
    let start = Instant::now();
    assert!(all_ok(&send_all(&client, 1).await));
    assert!(Instant::now() - start >= SECOND);
    assert_eq!(fake.api_rate_limited(), 0);
}

/// A 429 parks its token: the request is replayed at once on another token (the pool
/// grows), and the parked token is not used until its `Retry-After` has passed.
#[tokio::test(start_paused = true)]
async fn a_429_parks_its_token_and_the_request_goes_on_another() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(2));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    fake.push_api_faults([ApiFault::RateLimited {
        retry_after: Some("2".into()),
    }]);

    let start = Instant::now();
    assert!(all_ok(&send_all(&client, 1).await));
    assert!(Instant::now() - start < SECOND, "replayed without waiting");
    let stats = pool.stats();
    assert_eq!(
        (
            stats.rate_limited,
            stats.replays_after_429,
            stats.tokens,
            stats.parked
        ),
        (1, 1, 2, 1),
        "{stats:?}"
    );
    assert_eq!(fake.token_requests(), 2);

    // While the first token is parked, requests go on the second.
    let before = fake.api_requests();
    assert!(all_ok(&send_all(&client, 10).await));
    assert_eq!(fake.api_requests() - before, 10);
    let tokens: Vec<_> = pool.caches().iter().map(|c| c.stats()).collect();
    assert_eq!(tokens[0].requests_authorized, 1, "{tokens:?}");

    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(pool.stats().parked, 0);
}

/// With one token, the replay after a 429 waits out the token's `Retry-After`.
#[tokio::test(start_paused = true)]
async fn with_one_token_the_replay_waits_out_the_429() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    fake.push_api_faults([ApiFault::RateLimited { retry_after: None }]);

    let start = Instant::now();
    assert!(all_ok(&send_all(&client, 1).await));
    let took = Instant::now() - start;
    assert!(took >= Duration::from_secs(3), "the default park: {took:?}");
    assert_eq!(pool.stats().replays_after_429, 1);
    assert_eq!(fake.token_requests(), 1);
}

/// A second 429 to the replay goes back to the caller: a request is replayed once.
#[tokio::test(start_paused = true)]
async fn a_request_is_replayed_once_after_a_429() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(4));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    let limited = ApiFault::RateLimited {
        retry_after: Some("1".into()),
    };
    fake.push_api_faults([limited.clone(), limited]);

    let results = send_all(&client, 1).await;
    assert!(matches!(results[0], Ok(429)), "{results:?}");
    assert_eq!(fake.api_requests(), 2);
    let stats = pool.stats();
    assert_eq!(
        (stats.rate_limited, stats.replays_after_429),
        (2, 1),
        "{stats:?}"
    );
}

/// A limit wider than a token (the client's, or the whole org's): tokens with budget are
/// refused too, so the pool stops growing and shrinks back to what the limit allows;
/// `ApiRetry` outside waits out the 429s, and no caller sees one.
#[tokio::test(start_paused = true)]
async fn a_limit_wider_than_a_token_stops_the_growth() {
    for scope in [ApiLimitScope::Client, ApiLimitScope::Org] {
        let wide = Some((5, SECOND));
        let limits = match scope {
            ApiLimitScope::Client => ApiLimits {
                per_client: wide,
                ..per_token(5)
            },
            _ => ApiLimits {
                per_org: wide,
                ..per_token(5)
            },
        };
        let fake = fake(limits);
        let auth = auth(&fake);
        let pool = auth.token_pool(
            TokenPoolConfig::new()
                .max_tokens(4)
                .token_budget(5, SECOND)
                .growth_hold(Duration::from_secs(30)),
        );
        let retry = ApiRetry::new();
        let client = ServiceBuilder::new()
            .layer(retry.layer())
            .layer(pool.layer())
            .service(fake.service());

        let results = send_all(&client, 40).await;

        assert!(all_ok(&results), "{scope:?}: {results:?}");
        assert!(fake.api_rate_limited_by(scope) > 0, "{scope:?}");
        let stats = pool.stats();
        assert!(stats.growth_stopped, "{scope:?}: {stats:?}");
        assert!(stats.wider_limit_seen >= 1, "{scope:?}: {stats:?}");
        assert_eq!(
            stats.tokens, 1,
            "{scope:?}: shrunk to what the limit allows"
        );
        assert!(fake.token_requests() <= 4);

        // Once the limit is learnt, one token's pace is within it: no more 429s.
        let refused = fake.api_rate_limited();
        tokio::time::sleep(2 * SECOND).await;
        assert!(all_ok(&send_all(&client, 10).await), "{scope:?}");
        assert_eq!(fake.api_rate_limited(), refused, "{scope:?}");

        // After the hold, the pool may try growing again.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!pool.stats().growth_stopped, "{scope:?}");
    }
}

/// A request that would wait longer than `max_wait` for budget fails at once with the
/// typed `RateLimited`, and is not sent.
#[tokio::test(start_paused = true)]
async fn a_wait_past_the_bound_is_a_typed_error() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(
        TokenPoolConfig::new()
            .max_tokens(1)
            .token_budget(1, SECOND)
            .max_wait(Duration::from_millis(1_500)),
    );
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    let start = Instant::now();
    let results = send_all(&client, 3).await;
    assert!(Instant::now() - start < Duration::from_secs(2));
    let ok = results.iter().filter(|r| matches!(r, Ok(200))).count();
    let limited: Vec<&RateLimited> = results
        .iter()
        .filter_map(|r| r.as_ref().err()?.downcast_ref::<RateLimited>())
        .collect();
    assert_eq!((ok, limited.len()), (2, 1), "{results:?}");
    let retry_after = limited[0].retry_after;
    assert!(
        retry_after > Duration::from_millis(1_500) && retry_after <= Duration::from_millis(2_040),
        "{retry_after:?}"
    );
    assert!(!limited[0].queue_full);
    assert_eq!(fake.api_requests(), 2, "the refused request was not sent");
    assert_eq!(pool.stats().rejected, 1);
}

/// The queue of requests waiting for budget is bounded, and a waiting request that is
/// dropped gives its place back.
#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded_and_a_dropped_waiter_leaves_it() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(
        TokenPoolConfig::new()
            .max_tokens(1)
            .token_budget(1, Duration::from_secs(10))
            .max_queued(1),
    );
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    assert!(all_ok(&send_all(&client, 1).await));
    let waiter = tokio::spawn(client.clone().oneshot(get(BASE, "/api/v2/ping")));
    while pool.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    let err = client
        .clone()
        .oneshot(get(BASE, "/api/v2/ping"))
        .await
        .unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert!(limited.queue_full, "{limited:?}");

    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.stats().waiting, 0);
    let next = tokio::spawn(client.clone().oneshot(get(BASE, "/api/v2/ping")));
    let response = next.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "queued, then sent");
}

/// 400 concurrent requests on a pool grown to 4 tokens, after every token was revoked: one
/// token request per slot, and every request succeeds.
#[tokio::test(start_paused = true)]
async fn a_401_storm_costs_one_token_request_per_slot() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(
        TokenPoolConfig::new()
            .max_tokens(4)
            .token_budget(100, SECOND),
    );
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    assert!(all_ok(&send_all(&client, 400).await));
    assert_eq!((pool.stats().tokens, fake.token_requests()), (4, 4));

    fake.revoke_all_tokens();
    // Every request of the storm is at the fake before the first 401 comes back.
    fake.set_api_latency(Duration::from_millis(100));
    tokio::time::sleep(2 * SECOND).await;
    let results = send_all(&client, 400).await;

    assert!(all_ok(&results), "{results:?}");
    assert_eq!(fake.token_requests(), 8, "one more per slot");
    assert_eq!(pool.stats().refreshes, 8);
    assert_eq!(fake.api_unauthorized(), 400);
}

/// Requests outside the scope, or with their own `Authorization`, pass through unpaced.
#[tokio::test(start_paused = true)]
async fn requests_it_does_not_authorize_pass_through_unpaced() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(
        TokenPoolConfig::new()
            .max_tokens(1)
            .token_budget(1, Duration::from_secs(60)),
    );
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());

    let start = Instant::now();
    for _ in 0..5 {
        let other = get("http://127.0.0.1:10", "/api/v2/ping");
        let response = client.clone().oneshot(other).await.unwrap();
        assert_eq!(response.status(), 401, "sent without a token");
        let mut own = get(BASE, "/api/v2/ping");
        own.headers_mut()
            .insert(http::header::AUTHORIZATION, "Bearer mine".parse().unwrap());
        let response = client.clone().oneshot(own).await.unwrap();
        assert_eq!(response.status(), 401, "its own token, refused by the fake");
    }
    assert_eq!(Instant::now(), start, "nothing waited for budget");
    assert_eq!(fake.token_requests(), 0);
    assert_eq!(pool.stats().budget_waits, 0);
}

/// Two pools of one auth are independent; `TokenPool` is cheap to clone and clones share.
#[tokio::test(start_paused = true)]
async fn clones_share_the_pool() {
    let fake = fake(per_token(5));
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(2).token_budget(5, SECOND));
    let other: TokenPool = pool.clone();
    let client = ServiceBuilder::new()
        .layer(other.layer())
        .service(fake.service());
    assert!(all_ok(&send_all(&client, 10).await));
    assert_eq!(pool.stats().tokens, 2);
    assert_eq!(fake.api_rate_limited(), 0);
}

/// A dropped waiter's reserved instant is taken over by the next request: it does not
/// wait behind a ghost (20.2 s instead of 10.1 s).
#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_back_its_instant() {
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(
        TokenPoolConfig::new()
            .max_tokens(1)
            .token_budget(1, Duration::from_secs(10)),
    );
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    let t0 = Instant::now();
    assert!(all_ok(&send_all(&client, 1).await));
    let waiter = tokio::spawn(client.clone().oneshot(get(BASE, "/api/v2/ping")));
    while pool.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    waiter.abort();
    let _ = waiter.await;
    assert!(all_ok(&send_all(&client, 1).await));
    let took = Instant::now() - t0;
    assert!(
        took <= Duration::from_millis(10_200),
        "waited behind a ghost: {took:?}"
    );
}

/// Callers with a 2 s timeout offering 2× one token's budget for 30 s: the instants of
/// timed-out waiters are taken over, so the token still carries about its budget.
#[tokio::test(start_paused = true)]
async fn caller_timeouts_do_not_starve_the_pool() {
    let fake = fake(per_token(5));
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1).token_budget(5, SECOND));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(2 * SECOND, client.oneshot(get(BASE, "/api/v2/ping"))).await
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Ok(Ok(ref r)) if r.status() == 200) {
            ok += 1;
        }
    }
    // The token allows ~150 in 30 s.
    assert!(
        ok >= 100,
        "only {ok} of 300 succeeded; stats {:?}",
        pool.stats()
    );
}

/// A 401 replay is sent later than its reservation and the new token's server window
/// starts then: the slot's log holds the answer's instant, so the next batch waits for it.
#[tokio::test(start_paused = true)]
async fn pacing_holds_across_a_401_replay() {
    let fake = fake(per_token(5));
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1).token_budget(5, SECOND));
    let client = ServiceBuilder::new()
        .layer(pool.layer())
        .service(fake.service());
    fake.set_api_latency(Duration::from_millis(100));
    assert!(all_ok(&send_all(&client, 5).await));
    tokio::time::sleep(2 * SECOND).await;
    fake.revoke_all_tokens();
    let results = send_all(&client, 10).await;
    assert!(all_ok(&results), "{results:?}");
    assert_eq!(fake.api_rate_limited(), 0, "stats {:?}", pool.stats());
}

/// A client limit as wide as one token, with 2 tokens: the 429s may always land on the
/// same slot; refused again right after its park, the pool learns the limit is wider.
#[tokio::test(start_paused = true)]
async fn wider_limit_is_learnt_with_two_tokens() {
    let fake = fake(ApiLimits {
        per_client: Some((5, SECOND)),
        ..per_token(5)
    });
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(2).token_budget(5, SECOND));
    let client = ServiceBuilder::new()
        .layer(ApiRetry::new().layer())
        .layer(pool.layer())
        .service(fake.service());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .oneshot(get(BASE, "/api/v2/ping"))
                .await
                .map(|r| r.status().as_u16())
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        let _ = t.await.unwrap();
    }
    let answered = fake.api_requests();
    let refused = fake.api_rate_limited();
    assert!(
        refused * 20 <= answered,
        "{refused} of {answered} answers were 429; stats {:?}",
        pool.stats()
    );
}

struct Tracked(std::sync::Arc<std::sync::atomic::AtomicUsize>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The first 429 (and its unread body, i.e. its connection) is not held while the replay
/// waits for budget.
#[tokio::test(start_paused = true)]
async fn the_429_is_not_held_while_the_replay_waits() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let fake = fake(ApiLimits::default());
    let auth = auth(&fake);
    let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(1));
    let live = Arc::new(AtomicUsize::new(0));
    let l = live.clone();
    let inner = tower::service_fn(move |_: http::Request<String>| {
        l.fetch_add(1, Ordering::SeqCst);
        let body = Tracked(l.clone());
        async move {
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(429)
                    .header("retry-after", "5")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let client = tower::Layer::layer(&pool.layer(), inner);
    let task = tokio::spawn(
        client.oneshot(
            http::Request::get(format!("{BASE}/api/v2/ping"))
                .body(String::new())
                .unwrap(),
        ),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = live.load(Ordering::SeqCst);
    task.abort();
    assert_eq!(
        held, 0,
        "a 429 response (and its connection) held while waiting for budget"
    );
}
