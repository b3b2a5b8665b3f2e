//! API rate limits and scripted API faults: in process with paused tokio time where time
//! matters, and once over loopback.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use genesys_fake::{ApiFault, ApiLimitScope, ApiLimits, FakeGenesys, FakeService};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;

const SEC: Duration = Duration::from_secs(1);

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn retry_after(&self) -> Option<&str> {
        self.headers.get("retry-after").map(|v| v.to_str().unwrap())
    }

    fn correlation_id(&self) -> &str {
        self.headers["inin-correlation-id"].to_str().unwrap()
    }
}

async fn call(svc: &FakeService, req: Request<Full<Bytes>>) -> Answer {
    let res = svc.clone().oneshot(req).await.expect("service error");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

fn api(method: Method, path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        b = b.header("authorization", format!("Bearer {token}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

async fn ping(fake: &FakeGenesys, token: &str) -> Answer {
    call(
        &fake.service(),
        api(Method::GET, "/api/v2/ping", Some(token)),
    )
    .await
}

/// Sends `n` pings with `token` and asserts each is answered 200.
async fn pings_ok(fake: &FakeGenesys, token: &str, n: usize) {
    for i in 0..n {
        let a = ping(fake, token).await;
        assert_eq!(a.status, 200, "request {} of {n}", i + 1);
    }
}

fn limits(
    token: Option<(u32, Duration)>,
    client: Option<(u32, Duration)>,
    org: Option<(u32, Duration)>,
) -> ApiLimits {
    ApiLimits {
        per_token: token,
        per_client: client,
        per_org: org,
    }
}

/// Asserts Genesys' 429 (GENESYS.md, "Rate limits") with `Retry-After: secs`.
fn assert_genesys_429(a: &Answer, secs: u64) {
    assert_eq!(a.status, 429);
    assert_eq!(a.retry_after(), Some(&*secs.to_string()));
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(
        a.json(),
        json!({
            "message": format!("Rate limit exceeded the maximum. Retry the request in [{secs}] seconds"),
            "code": "too.many.requests.retry.after",
            "status": 429,
            "contextId": a.correlation_id(),
            "details": [],
            "errors": [],
        })
    );
}

fn refused_by(fake: &FakeGenesys) -> [u64; 3] {
    [
        ApiLimitScope::Token,
        ApiLimitScope::Client,
        ApiLimitScope::Org,
    ]
    .map(|s| fake.api_rate_limited_by(s))
}

#[tokio::test(start_paused = true)]
async fn per_token_limit_refuses_the_31st_request_and_each_token_has_its_own_budget() {
    let fake = FakeGenesys::builder()
        .api_limits(limits(Some((30, SEC)), None, None))
        .build_in_process();
    let (a, b) = (fake.issue_token(), fake.issue_token());
    pings_ok(&fake, &a, 30).await;

    // The 31st is refused before routing: a DELETE of the token revokes nothing.
    let refused = call(
        &fake.service(),
        api(Method::DELETE, "/api/v2/tokens/me", Some(&a)),
    )
    .await;
    assert_genesys_429(&refused, 1);
    assert!(fake.token_is_valid(&a));
    assert_genesys_429(&ping(&fake, &a).await, 1);

    pings_ok(&fake, &b, 30).await;
    assert_genesys_429(&ping(&fake, &b).await, 1);

    assert_eq!(fake.api_rate_limited(), 3);
    assert_eq!(refused_by(&fake), [3, 0, 0]);
    assert_eq!(fake.api_requests(), 63);
    let rec = fake.recorded_api_requests();
    assert_eq!(rec.iter().filter(|r| r.status == 429).count(), 3);
    assert_eq!(rec[30].method, Method::DELETE);
    assert_eq!(rec[30].status, 429);
}

#[tokio::test(start_paused = true)]
async fn the_window_frees_after_retry_after() {
    let fake = FakeGenesys::builder()
        .api_limits(limits(Some((30, 10 * SEC)), None, None))
        .build_in_process();
    let token = fake.issue_token();
    pings_ok(&fake, &token, 30).await;

    tokio::time::advance(Duration::from_millis(2_500)).await;
    let refused = ping(&fake, &token).await;
    assert_genesys_429(&refused, 8); // 7.5 s left, rounded up

    tokio::time::advance(Duration::from_secs(7)).await;
    let refused = ping(&fake, &token).await;
    assert_genesys_429(&refused, 1); // 0.5 s left: at least 1

    let wait: u64 = refused.retry_after().unwrap().parse().unwrap();
    tokio::time::advance(Duration::from_secs(wait)).await;
    // A fresh window, with the whole budget again.
    pings_ok(&fake, &token, 30).await;
    assert_genesys_429(&ping(&fake, &token).await, 10);
    assert_eq!(fake.api_rate_limited(), 3);
}

#[tokio::test(start_paused = true)]
async fn per_client_limit_binds_across_the_tokens_of_the_client() {
    let fake = FakeGenesys::builder()
        .api_limits(limits(Some((3, SEC)), Some((5, 2 * SEC)), None))
        .build_in_process();
    // One token from the token endpoint, two issued directly: all of the same client.
    let res = call(
        &fake.service(),
        Request::post(fake.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!(
                "grant_type=client_credentials&client_id={}&client_secret={}",
                fake.client_id(),
                fake.client_secret()
            ))))
            .unwrap(),
    )
    .await;
    let a = res.json()["access_token"].as_str().unwrap().to_owned();
    let (b, c) = (fake.issue_token(), fake.issue_token());

    pings_ok(&fake, &a, 3).await;
    // a's own window is full (1 s left) and so is nothing else: refused by token only.
    assert_genesys_429(&ping(&fake, &a).await, 1);
    pings_ok(&fake, &b, 2).await;
    // The client's 5 are spent: b and a fresh c, each with budget of its own, are refused
    // until the client window ends (2 s).
    assert_genesys_429(&ping(&fake, &b).await, 2);
    assert_genesys_429(&ping(&fake, &c).await, 2);
    assert_eq!(refused_by(&fake), [1, 2, 0]);

    tokio::time::advance(2 * SEC).await;
    pings_ok(&fake, &c, 3).await;
    pings_ok(&fake, &b, 2).await;
    // c is out of its token budget (1 s left) and the client is full (2 s left): both
    // scopes count, and the window that ends last decides Retry-After.
    assert_genesys_429(&ping(&fake, &c).await, 2);
    assert_eq!(refused_by(&fake), [2, 3, 0]);
    assert_eq!(fake.api_rate_limited(), 4);
}

#[tokio::test(start_paused = true)]
async fn per_org_limit_binds_across_tokens_and_ignores_requests_without_a_valid_token() {
    let fake = FakeGenesys::builder()
        .api_limits(limits(None, None, Some((3, 2 * SEC))))
        .build_in_process();
    let svc = fake.service();
    let tokens: Vec<String> = (0..4).map(|_| fake.issue_token()).collect();

    // 401s consume nothing, even when the org's window is full.
    for _ in 0..5 {
        let a = call(&svc, api(Method::GET, "/api/v2/ping", Some("not-a-token"))).await;
        assert_eq!(a.status, 401);
    }
    for t in &tokens[..3] {
        pings_ok(&fake, t, 1).await;
    }
    assert_genesys_429(&ping(&fake, &tokens[3]).await, 2);
    let a = call(&svc, api(Method::GET, "/api/v2/ping", None)).await;
    assert_eq!(a.status, 401);

    assert_eq!(refused_by(&fake), [0, 0, 1]);
    assert_eq!(fake.api_unauthorized(), 6);
    tokio::time::advance(2 * SEC).await;
    pings_ok(&fake, &tokens[3], 3).await;
}

#[tokio::test(start_paused = true)]
async fn limits_change_at_run_time() {
    let fake = FakeGenesys::builder().build_in_process();
    assert_eq!(fake.api_limits(), ApiLimits::default());
    let token = fake.issue_token();
    pings_ok(&fake, &token, 500).await;

    let two_per_second = limits(Some((2, SEC)), None, None);
    fake.set_api_limits(two_per_second);
    assert_eq!(fake.api_limits(), two_per_second);
    pings_ok(&fake, &token, 2).await;
    assert_genesys_429(&ping(&fake, &token).await, 1);

    // Setting limits starts every window afresh, even the same limits.
    fake.set_api_limits(two_per_second);
    pings_ok(&fake, &token, 2).await;
    assert_eq!(ping(&fake, &token).await.status, 429);

    fake.set_api_limits(ApiLimits::genesys());
    pings_ok(&fake, &token, 300).await;
    assert_genesys_429(&ping(&fake, &token).await, 60);

    fake.set_api_limits(ApiLimits::default());
    pings_ok(&fake, &token, 500).await;

    assert_eq!(fake.api_rate_limited(), 3);
    fake.reset_counters();
    assert_eq!(fake.api_rate_limited(), 0);
    assert_eq!(refused_by(&fake), [0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn scripted_api_faults_come_in_order_before_auth_and_limits() {
    let fake = FakeGenesys::builder()
        .api_limits(limits(Some((1, SEC)), None, None))
        .build_in_process();
    let svc = fake.service();
    let token = fake.issue_token();
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    fake.push_api_faults([
        ApiFault::Status {
            status: 503,
            retry_after: Some("2".into()),
        },
        ApiFault::Status {
            status: 502,
            retry_after: None,
        },
        ApiFault::Status {
            status: 504,
            retry_after: Some(date.into()),
        },
        ApiFault::RateLimited {
            retry_after: Some("7".into()),
        },
        ApiFault::RateLimited { retry_after: None },
    ]);
    fake.push_api_faults([ApiFault::Status {
        status: 503,
        retry_after: None,
    }]);
    assert_eq!(fake.pending_api_faults(), 6);

    let a = ping(&fake, &token).await;
    assert_eq!(
        (a.status, a.retry_after()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("2"))
    );
    assert_eq!(a.json()["status"], 503);
    assert_eq!(a.json()["code"], "fake.fault");
    // No token at all: the fault still comes first, not a 401.
    let a = call(&svc, api(Method::GET, "/api/v2/ping", None)).await;
    assert_eq!((a.status, a.retry_after()), (StatusCode::BAD_GATEWAY, None));
    // A faulted DELETE revokes nothing.
    let a = call(&svc, api(Method::DELETE, "/api/v2/tokens/me", Some(&token))).await;
    assert_eq!(
        (a.status, a.retry_after()),
        (StatusCode::GATEWAY_TIMEOUT, Some(date))
    );
    assert!(fake.token_is_valid(&token));
    let a = ping(&fake, &token).await;
    assert_genesys_429(&a, 7);
    let a = ping(&fake, &token).await;
    assert_eq!(
        (a.status, a.retry_after()),
        (StatusCode::TOO_MANY_REQUESTS, None)
    );
    assert_eq!(a.json()["code"], "too.many.requests");
    assert_eq!(a.json()["contextId"], a.correlation_id());
    assert_eq!(fake.pending_api_faults(), 1);
    fake.clear_api_faults();
    assert_eq!(fake.pending_api_faults(), 0);

    // The faults used none of the token's budget of 1, and are not counted as refusals.
    pings_ok(&fake, &token, 1).await;
    assert_eq!(ping(&fake, &token).await.status, 429);
    assert_eq!(fake.api_faults_answered(), 5);
    assert_eq!(fake.api_rate_limited(), 1);
    assert_eq!(fake.api_unauthorized(), 0);
    let statuses: Vec<u16> = fake
        .recorded_api_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [503, 502, 504, 429, 429, 200, 429]);
    fake.reset_counters();
    assert_eq!(fake.api_faults_answered(), 0);
}

#[tokio::test]
async fn every_api_answer_has_its_own_correlation_id() {
    let fake = FakeGenesys::builder().build_in_process();
    let token = fake.issue_token();
    let svc = fake.service();
    let mut ids = HashSet::new();
    for req in [
        api(Method::GET, "/api/v2/ping", Some(&token)),
        api(Method::GET, "/api/v2/ping", None),
        api(Method::GET, "/api/v2/nowhere", Some(&token)),
        api(Method::POST, "/api/v2/echo", Some(&token)),
    ] {
        let a = call(&svc, req).await;
        let id = a.correlation_id().to_owned();
        assert_eq!(id.len(), 36, "{id}");
        assert!(ids.insert(id));
    }
}

/// Over real sockets, with a window long enough that a slow machine cannot spread the
/// requests over two windows.
#[tokio::test]
async fn limits_and_faults_over_loopback() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let fake = FakeGenesys::builder()
        .api_limits(limits(Some((30, Duration::from_secs(600))), None, None))
        .start()
        .await
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let token = fake.issue_token();
    let send = |client: Client<_, Full<Bytes>>| {
        let uri = format!("{}api/v2/ping", fake.api_uri());
        let token = token.clone();
        async move {
            let req = Request::get(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = client.request(req).await.expect("request failed");
            let status = res.status();
            let headers = res.headers().clone();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Answer {
                status,
                headers,
                body,
            }
        }
    };
    for _ in 0..30 {
        assert_eq!(send(client.clone()).await.status, 200);
    }
    let refused = send(client.clone()).await;
    let secs: u64 = refused.retry_after().unwrap().parse().unwrap();
    assert!((1..=600).contains(&secs), "{secs}");
    assert_genesys_429(&refused, secs);

    fake.push_api_faults([ApiFault::Status {
        status: 503,
        retry_after: Some("3".into()),
    }]);
    let a = send(client.clone()).await;
    assert_eq!(
        (a.status, a.retry_after()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("3"))
    );
    assert_eq!(fake.api_rate_limited_by(ApiLimitScope::Token), 1);
    assert_eq!(fake.api_faults_answered(), 1);
    fake.shutdown().await;
}
