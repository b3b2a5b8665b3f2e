//! Tests of the in-process service, mostly with paused tokio time.

use std::time::Duration;

use bytes::Bytes;
use genesys_fake::{ConnectionClosed, FakeGenesys, FakeService, TokenFault};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::time::Instant;
use tower::ServiceExt;

async fn call(
    svc: &FakeService,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = svc.clone().oneshot(req).await.expect("service error");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn token_req(fake: &FakeGenesys) -> Request<Full<Bytes>> {
    let body = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        fake.client_id(),
        fake.client_secret()
    );
    Request::post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn ping(fake: &FakeGenesys, token: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}api/v2/ping", fake.api_uri()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn get_token(fake: &FakeGenesys) -> (String, Value) {
    let (status, _, body) = call(&fake.service(), token_req(fake)).await;
    assert_eq!(status, 200);
    let j: Value = serde_json::from_slice(&body).unwrap();
    (j["access_token"].as_str().unwrap().to_owned(), j)
}

#[tokio::test(start_paused = true)]
async fn tokens_expire_after_their_lifetime() {
    let fake = FakeGenesys::builder()
        .token_lifetime(Duration::from_secs(10))
        .build_in_process();
    let svc = fake.service();
    let (token, j) = get_token(&fake).await;
    assert_eq!(j["expires_in"], 10);
    assert_eq!(call(&svc, ping(&fake, &token)).await.0, 200);
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(call(&svc, ping(&fake, &token)).await.0, 200);
    tokio::time::advance(Duration::from_secs(2)).await;
    let (status, headers, body) = call(&svc, ping(&fake, &token)).await;
    assert_eq!(status, 401);
    assert_eq!(headers["content-type"], "application/json");
    let j: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["code"], "bad.credentials");
    assert_eq!(fake.api_unauthorized(), 1);
    assert_eq!(fake.api_requests(), 3);
    assert_eq!(fake.recorded_api_requests()[2].status, 401);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_window_resets() {
    let fake = FakeGenesys::builder()
        .rate_limit(1, Duration::from_secs(5))
        .build_in_process();
    let svc = fake.service();
    get_token(&fake).await;
    let (status, headers, body) = call(&svc, token_req(&fake)).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "5");
    let j: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["error"], "rate_limited");
    assert_eq!(j["description"], "Rate limit exceeded");
    assert_eq!(j["error_description"], "Rate limit exceeded");

    tokio::time::advance(Duration::from_millis(2500)).await;
    let (status, headers, _) = call(&svc, token_req(&fake)).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "3"); // 2.5 s rounded up
    tokio::time::advance(Duration::from_millis(2500)).await;
    get_token(&fake).await;
    assert_eq!(fake.tokens_issued(), 2);
    assert_eq!(fake.token_requests(), 4);
}

#[tokio::test(start_paused = true)]
async fn latency_hang_drip_and_close_with_paused_time() {
    let fake = FakeGenesys::builder()
        .token_latency(Duration::from_secs(30))
        .build_in_process();
    let svc = fake.service();
    let started = Instant::now();
    get_token(&fake).await;
    assert!(started.elapsed() >= Duration::from_secs(30));
    fake.set_token_latency(Duration::ZERO);

    fake.push_token_faults([TokenFault::Hang]);
    let r = tokio::time::timeout(Duration::from_secs(3600), call(&svc, token_req(&fake))).await;
    assert!(r.is_err());

    fake.push_token_faults([TokenFault::CloseConnection]);
    let err = svc.clone().oneshot(token_req(&fake)).await.unwrap_err();
    assert!(err.downcast_ref::<ConnectionClosed>().is_some(), "{err}");

    fake.push_token_faults([TokenFault::Drip {
        body: "abcd".into(),
        every: Duration::from_secs(1),
    }]);
    let started = Instant::now();
    let (status, _, body) = call(&svc, token_req(&fake)).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"abcd");
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_eq!(fake.token_requests(), 4);
    assert_eq!(fake.tokens_issued(), 1);
}

#[tokio::test]
async fn routing_by_path() {
    let fake = FakeGenesys::builder().build_in_process();
    assert!(fake
        .login_uri()
        .to_string()
        .starts_with("http://login.fake.invalid"));
    let svc = fake.service();
    let req = Request::get("http://anything/elsewhere")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(call(&svc, req).await.0, 404);
    assert_eq!(fake.api_requests(), 0);
    assert_eq!(fake.token_requests(), 0);
    let req = Request::get("/api/v2/ping")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(call(&svc, req).await.0, 401);
    assert_eq!(fake.api_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_calls() {
    let fake = FakeGenesys::builder().build_in_process();
    let token = fake.issue_token();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let svc = fake.service();
        let req = ping(&fake, &token);
        set.spawn(async move { svc.oneshot(req).await.unwrap().status() });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    assert_eq!(fake.api_requests(), 10_000);
    assert_eq!(fake.recorded_api_requests().len(), 10_000);
}
