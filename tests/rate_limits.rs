//! Genesys' API rate limits, seen from outside: `ApiRetry` over `auth.layers()` against the
//! fake's per-token limit (issue #14, items 1 and 2), on tokio's paused clock.

mod common;

use std::time::Duration;

use genesys_auth_layer::{ApiRetry, GenesysAuth};
use genesys_fake::{ApiLimits, FakeGenesys};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

use common::get;

/// The in-process fake routes by path; a loopback origin satisfies the https rule.
const BASE: &str = "http://127.0.0.1:9";

/// 20 concurrent requests through one token the fake lets send 5 a second: every caller
/// gets a 200, the 429s the fake sent were all waited out and retried, one token was
/// fetched, and it took the 4 s the limit asks for, not more.
#[tokio::test(start_paused = true)]
async fn api_retry_over_the_auth_layers_waits_out_a_per_token_limit() {
    let limits = ApiLimits {
        per_token: Some((5, Duration::from_secs(1))),
        ..ApiLimits::default()
    };
    let fake = FakeGenesys::builder().api_limits(limits).build_in_process();
    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri(BASE)
        .api_uri(BASE)
        .build(fake.service())
        .unwrap();
    auth.token().await.unwrap();
    let retry = ApiRetry::new();
    let client = ServiceBuilder::new()
        .layer(retry.layer())
        .layer(auth.layers())
        .service(fake.service());

    let start = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get(BASE, "/api/v2/ping"))))
        .collect();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
    }
    let took = Instant::now() - start;

    // 15 refused in the first window, 10 in the second, 5 in the third.
    assert_eq!(fake.api_rate_limited(), 30);
    let stats = retry.stats();
    assert_eq!(stats.rate_limited, 30, "{stats:?}");
    assert_eq!(stats.retries_after_429, 30, "{stats:?}");
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(auth.stats().api_401s, 0);
    assert!(
        took >= Duration::from_secs(3) && took <= Duration::from_secs(4),
        "{took:?}"
    );
}
