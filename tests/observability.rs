//! What an operator sees: the documented tracing events with their fields, the counters,
//! and the health view turning unready before the cached token runs out.

mod common;

use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{CacheConfig, Credentials, GenesysAuth, OAuthErrorCode};
use genesys_fake::FakeGenesys;
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};

use common::{h2_client, Captured};

/// Captures this thread's tracing output up to `level` while the guard lives.
fn capture(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

// Current-thread runtime: spawned tasks (the refresh) run on this thread, under the
// thread-local subscriber set below.
#[tokio::test]
async fn documented_events_counters_and_health() {
    let (captured, _guard) = capture(tracing::Level::TRACE);

    let fake = FakeGenesys::builder()
        .client("obs-client", "primary")
        .token_lifetime(Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    let credentials = Credentials::new("obs-client", "wrong-primary")
        .and_then(|c| c.with_secondary("primary"))
        .unwrap();
    let auth = GenesysAuth::with_credentials(credentials)
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .cache_config(
            CacheConfig::default().backoff(Duration::from_millis(50), Duration::from_millis(50)),
        )
        .build(h2_client())
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(auth.layers())
        .service(h2_client());
    let ping = || {
        Request::get(format!("{}api/v2/ping", fake.api_uri()))
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // 1. First call: the primary secret is refused, the secondary works.
    assert_eq!(client.clone().oneshot(ping()).await.unwrap().status(), 200);
    let fallback = captured.events("secret fallback used");
    assert_eq!(fallback.len(), 1, "{}", captured.text());
    assert!(fallback[0].contains("refused=\"primary\"") && fallback[0].contains("succeeded=true"));
    let fetched = captured.events("token fetched");
    assert!(fetched[0].contains("generation=1") && fetched[0].contains("reason=\"initial\""));
    assert!(fetched[0].contains("lifetime_secs=600"), "{}", fetched[0]);
    assert!(
        captured.text().contains("token_fetch{reason=\"initial\"}"),
        "span around the fetch"
    );

    // 2. A revocation: the 401 is replayed once with a token fetched "after-401".
    fake.revoke_all_tokens();
    assert_eq!(client.clone().oneshot(ping()).await.unwrap().status(), 200);
    assert!(captured.events("401 replayed")[0].contains("generation=1"));
    assert!(captured.events("token fetched")[1].contains("reason=\"after-401\""));

    // 3. The client is deleted while a valid token is cached: the health view says the
    //    process cannot obtain tokens any more, before the token runs out.
    fake.delete_client();
    fake.revoke_all_tokens();
    let err = client.clone().oneshot(ping()).await.unwrap_err();
    assert!(err.to_string().contains("invalid_client"), "{err}");
    let failed = captured.events("token fetch failed");
    assert!(
        failed[0].contains("cause=\"secrets_rejected\""),
        "{}",
        failed[0]
    );
    assert!(
        failed[0].contains("oauth_error=\"invalid_client\"")
            && failed[0].contains("http_status=401")
    );
    assert_eq!(captured.events("backoff entered").len(), 1);
    let health = auth.health();
    assert!(!health.can_obtain_tokens());
    assert_eq!(health.consecutive_failures, 1);
    assert_eq!(
        health.last_error.as_ref().and_then(|e| e.oauth_code()),
        Some(&OAuthErrorCode::InvalidClient)
    );

    // 4. The client is restored: after the backoff the next call recovers.
    fake.restore_client();
    let backoff_over = common::eventually(Duration::from_secs(60), || async {
        auth.health().backoff_remaining.is_none()
    })
    .await;
    assert!(backoff_over, "the backoff ends");
    assert_eq!(client.clone().oneshot(ping()).await.unwrap().status(), 200);
    let left = captured.events("backoff left");
    assert_eq!(left.len(), 1);
    assert!(left[0].contains("failed_attempts=1"));
    let health = auth.health();
    assert!(health.can_obtain_tokens() && health.has_valid_token());
    assert!(health.last_error.is_some(), "the last error stays visible");

    let stats = auth.stats();
    assert_eq!(stats.tokens_fetched, 3);
    assert_eq!(stats.fetch_failures, 1);
    assert_eq!(stats.failures_by_cause.secrets_rejected, 1);
    assert_eq!(stats.replays_after_401, 2);
    assert_eq!(
        stats.api_401s, 2,
        "every 401 the API answered: both were replayed"
    );
    assert!(stats.requests_authorized >= 4, "{stats:?}");
    // The token endpoint saw one request per refresh (initial, after the 401, the failed
    // one, the recovery), plus one per fallback to the other secret (steps 1 and 3).
    assert_eq!(stats.refreshes, 4, "{stats:?}");
    let fallbacks = auth.credentials().unwrap().fallbacks();
    assert_eq!(fallbacks, 2);
    assert_eq!(fake.token_requests(), stats.refreshes + fallbacks);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_named_cache_names_its_fetch_span() {
    let (captured, _guard) = capture(tracing::Level::INFO);

    let fake = FakeGenesys::start().await.unwrap();
    let auth = fake
        .auth_builder()
        .cache_config(CacheConfig::default().name("org-emea"))
        .build(h2_client())
        .unwrap();
    auth.token().await.unwrap();
    assert!(
        captured
            .text()
            .contains("token_fetch{reason=\"initial\" cache=\"org-emea\"}"),
        "{}",
        captured.text()
    );
}

// Every stack, the fused `auth.layers()`, tower's `Retry` over `auth.layer()` and reqwest
// through `AuthMiddleware`, tells an operator the same story about a refused token: one
// 401 event, one replay event naming the refused generation, one token fetched
// "after-401", and the same counters.
#[tokio::test]
async fn every_stack_logs_and_counts_a_replay_alike() {
    for name in ["fused", "tower", "reqwest"] {
        let (captured, _guard) = capture(tracing::Level::DEBUG);
        let fake = FakeGenesys::start().await.unwrap();
        let auth = fake.auth_builder().build(h2_client()).unwrap();
        let url = format!("{}api/v2/ping", fake.api_uri());
        let statuses = if name == "reqwest" {
            let http = reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap();
            let client = reqwest_middleware::ClientBuilder::new(http)
                .with(auth.middleware())
                .build();
            let first = client.get(&url).send().await.unwrap().status();
            fake.revoke_all_tokens();
            (first, client.get(&url).send().await.unwrap().status())
        } else {
            let client = if name == "fused" {
                common::stack(&auth, h2_client())
            } else {
                common::tower_stack(&auth, h2_client())
            };
            let ping = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            let first = client.clone().oneshot(ping.clone()).await.unwrap().status();
            fake.revoke_all_tokens();
            (first, client.oneshot(ping).await.unwrap().status())
        };
        assert_eq!(statuses, (StatusCode::OK, StatusCode::OK), "{name}");

        let answered = captured.events("API answered 401 for a token this layer attached");
        assert_eq!(answered.len(), 1, "{name}: {}", captured.text());
        assert!(
            answered[0].contains("generation=1"),
            "{name}: {}",
            answered[0]
        );
        let replayed = captured.events("401 replayed with a newer token");
        assert_eq!(replayed.len(), 1, "{name}: {}", captured.text());
        assert!(
            replayed[0].contains("generation=1"),
            "{name}: {}",
            replayed[0]
        );
        let fetched = captured.events("token fetched");
        assert_eq!(fetched.len(), 2, "{name}: {}", captured.text());
        assert!(
            fetched[1].contains("reason=\"after-401\""),
            "{name}: {}",
            fetched[1]
        );
        let stats = auth.stats();
        assert_eq!(
            (
                stats.api_401s,
                stats.replays_after_401,
                stats.requests_authorized
            ),
            (1, 1, 3),
            "{name}: two requests and one replay authorized: {stats:?}"
        );
        fake.shutdown().await;
    }
}
