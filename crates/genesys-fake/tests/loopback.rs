//! Tests over real loopback sockets with hyper-util's legacy client.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use genesys_fake::{FakeGenesys, TokenFault};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn send(c: &HttpClient, req: Request<Full<Bytes>>) -> Answer {
    let res = c.request(req).await.expect("request failed");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

fn token_req(fake: &FakeGenesys, id: &str, secret: &str) -> Request<Full<Bytes>> {
    Request::post(fake.token_url())
        .header("authorization", basic(id, secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )))
        .unwrap()
}

async fn get_token(fake: &FakeGenesys, c: &HttpClient) -> String {
    let a = send(c, token_req(fake, &fake.client_id(), &fake.client_secret())).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.json()["access_token"].as_str().unwrap().to_owned()
}

fn api_uri(fake: &FakeGenesys, path: &str) -> Uri {
    format!(
        "{}{}",
        fake.api_uri().to_string().trim_end_matches('/'),
        path
    )
    .parse()
    .unwrap()
}

fn api_req(
    fake: &FakeGenesys,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(api_uri(fake, path));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

fn assert_oauth_error(a: &Answer, status: u16, error: &str) {
    assert_eq!(a.status, status, "body: {:?}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
    let j = a.json();
    assert_eq!(j["error"], error, "{j}");
    assert!(j["description"].is_string(), "{j}");
    assert_eq!(j["description"], j["error_description"], "{j}");
}

#[tokio::test]
async fn issues_tokens_with_basic_auth_and_urlencoded_credentials() {
    let id = "my id:1";
    let secret = "p@ss:w+rd/=%";
    let fake = FakeGenesys::builder()
        .client(id, secret)
        .start()
        .await
        .unwrap();
    assert_ne!(fake.login_uri(), fake.api_uri());
    assert_eq!(fake.login_uri().path(), "/");
    let c = client();

    let a = send(&c, token_req(&fake, id, secret)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    let j = a.json();
    assert_eq!(j["token_type"], "bearer");
    assert_eq!(j["expires_in"], 86399);
    let token = j["access_token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 43, "{token}");
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

    // A second token is different.
    let j2 = send(&c, token_req(&fake, id, secret)).await.json();
    assert_ne!(j2["access_token"].as_str().unwrap(), token);
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.tokens_issued(), 2);

    // Not urlencoding the secret is a different secret.
    let raw = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
    let req = Request::post(fake.token_url())
        .header("authorization", raw)
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )))
        .unwrap();
    assert_oauth_error(&send(&c, req).await, 401, "invalid_client");

    let a = send(
        &c,
        api_req(&fake, Method::GET, "/api/v2/organizations/me", Some(&token)),
    )
    .await;
    assert_eq!(a.status, 200);
    let org = a.json();
    assert_eq!(org["name"], "Fake Genesys Org");
    assert_eq!(org["state"], "active");
    assert_eq!(org["id"].as_str().unwrap().len(), 36);

    let a = send(
        &c,
        api_req(&fake, Method::GET, "/api/v2/tokens/me", Some(&token)),
    )
    .await;
    assert_eq!(a.status, 200);
    let me = a.json();
    assert_eq!(me["OAuthClient"]["id"], id);
    assert_eq!(me["organization"]["id"], org["id"]);
    assert_eq!(me["homeOrganization"]["id"], org["id"]);

    let a = send(
        &c,
        api_req(&fake, Method::GET, "/api/v2/ping", Some(&token)),
    )
    .await;
    assert_eq!(a.json(), serde_json::json!({"ok": true}));
    assert_eq!(fake.api_requests(), 3);
    assert_eq!(fake.api_unauthorized(), 0);
    fake.shutdown().await;
}

#[tokio::test]
async fn form_credentials_and_error_answers() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    let form = |body: &str| {
        Request::post(fake.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    };
    let ok = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        fake.client_id(),
        fake.client_secret()
    );
    assert_eq!(send(&c, form(&ok)).await.status, 200);

    // Wrong secret.
    let a = send(&c, token_req(&fake, &fake.client_id(), "nope")).await;
    assert_oauth_error(&a, 401, "invalid_client");
    assert_eq!(
        a.json()["error_description"],
        "client not found or bad secret"
    );
    // Wrong id.
    assert_oauth_error(
        &send(&c, token_req(&fake, "who", &fake.client_secret())).await,
        401,
        "invalid_client",
    );
    // Missing credentials.
    assert_oauth_error(
        &send(&c, form("grant_type=client_credentials")).await,
        401,
        "invalid_client",
    );
    // Garbage Authorization headers.
    for h in ["Basic !!!", "Basic", "Bearer abc", "Basic bm9jb2xvbg=="] {
        let req = Request::post(fake.token_url())
            .header("authorization", h)
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials",
            )))
            .unwrap();
        assert_oauth_error(&send(&c, req).await, 401, "invalid_client");
    }
    // Grant types.
    let bad_grant = format!(
        "grant_type=password&client_id={}&client_secret={}",
        fake.client_id(),
        fake.client_secret()
    );
    assert_oauth_error(
        &send(&c, form(&bad_grant)).await,
        400,
        "unsupported_grant_type",
    );
    let no_grant = format!(
        "client_id={}&client_secret={}",
        fake.client_id(),
        fake.client_secret()
    );
    assert_oauth_error(&send(&c, form(&no_grant)).await, 400, "invalid_request");
    // Garbage body bytes.
    let mut garbage = vec![0xff, b'&', b'=', b'%', 0x00];
    garbage.extend_from_slice(b"&grant_type=client_credentials");
    let req = Request::post(fake.token_url())
        .header(
            "authorization",
            basic(&fake.client_id(), &fake.client_secret()),
        )
        .body(Full::new(Bytes::from(garbage)))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 200);
    // Body over the 64 KiB cap.
    let big = "a".repeat(70 * 1024);
    assert_oauth_error(&send(&c, form(&big)).await, 413, "invalid_request");
    // Wrong method.
    let req = Request::get(fake.token_url())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 405);
    // Other paths on the login host.
    let req = Request::get(format!("{}api/v2/ping", fake.login_uri()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 404);

    assert_eq!(fake.tokens_issued(), 2);
    assert_eq!(fake.token_requests(), 13);
    fake.reset_counters();
    assert_eq!(fake.token_requests(), 0);
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn api_401_body_and_recording() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    for token in [None, Some("unknown-token")] {
        let a = send(&c, api_req(&fake, Method::GET, "/api/v2/ping", token)).await;
        assert_eq!(a.status, 401);
        assert_eq!(a.headers["content-type"], "application/json");
        assert_eq!(
            a.json(),
            serde_json::json!({"message":"Invalid login credentials.","code":"bad.credentials","status":401})
        );
    }
    assert_eq!(fake.api_unauthorized(), 2);
    assert_eq!(fake.api_requests(), 2);
    let rec = fake.recorded_api_requests();
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[1].status, 401);
    assert_eq!(rec[1].headers["authorization"], "Bearer unknown-token");

    // Scheme is case-insensitive.
    let token = get_token(&fake, &c).await;
    let req = Request::get(api_uri(&fake, "/api/v2/ping"))
        .header("authorization", format!("bEaReR {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 200);

    // Unknown route.
    let a = send(
        &c,
        api_req(&fake, Method::GET, "/api/v2/nothing", Some(&token)),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["code"], "not.found");
    assert_eq!(a.json()["status"], 404);
    fake.clear_recorded();
    assert!(fake.recorded_api_requests().is_empty());
}

#[tokio::test]
async fn echo_returns_and_records_the_body() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    let token = get_token(&fake, &c).await;
    let payload = Bytes::from((0..=255u8).cycle().take(100_000).collect::<Vec<u8>>());
    let req = Request::put(api_uri(&fake, "/api/v2/echo?x=1&y=2"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/octet-stream")
        .header("x-custom", "yes")
        .body(Full::new(payload.clone()))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, payload);
    assert_eq!(a.headers["content-type"], "application/octet-stream");

    let rec = fake.recorded_api_requests();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].method, Method::PUT);
    assert_eq!(rec[0].path, "/api/v2/echo?x=1&y=2");
    assert_eq!(rec[0].body, payload);
    assert_eq!(rec[0].headers["x-custom"], "yes");
    assert_eq!(rec[0].status, 200);
}

#[tokio::test]
async fn revocation() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    let t1 = get_token(&fake, &c).await;
    let t2 = get_token(&fake, &c).await;
    let t3 = get_token(&fake, &c).await;
    let ping = |t: &str| api_req(&fake, Method::GET, "/api/v2/ping", Some(t));

    fake.revoke_token(&t1);
    assert_eq!(send(&c, ping(&t1)).await.status, 401);
    assert_eq!(send(&c, ping(&t2)).await.status, 200);

    let a = send(
        &c,
        api_req(&fake, Method::DELETE, "/api/v2/tokens/me", Some(&t2)),
    )
    .await;
    assert_eq!(a.status, 204);
    assert!(a.body.is_empty());
    assert_eq!(send(&c, ping(&t2)).await.status, 401);
    assert_eq!(send(&c, ping(&t3)).await.status, 200);

    fake.revoke_all_tokens();
    assert_eq!(send(&c, ping(&t3)).await.status, 401);
    assert!(!fake.token_is_valid(&t3));
    // New tokens work again.
    let t4 = get_token(&fake, &c).await;
    assert_eq!(send(&c, ping(&t4)).await.status, 200);
    assert_eq!(fake.api_unauthorized(), 3);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let fake = FakeGenesys::builder()
        .rate_limit(2, Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let c = client();
    get_token(&fake, &c).await;
    get_token(&fake, &c).await;
    let a = send(
        &c,
        token_req(&fake, &fake.client_id(), &fake.client_secret()),
    )
    .await;
    assert_oauth_error(&a, 429, "rate_limited");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(fake.tokens_issued(), 2);
    assert_eq!(fake.token_requests(), 3);

    fake.set_rate_limit(None);
    get_token(&fake, &c).await;
}

#[tokio::test]
async fn secondary_secret_rotation_and_client_deletion() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    let id = fake.client_id();
    let old = fake.client_secret();
    let status = |secret: &str| {
        let req = token_req(&fake, &id, secret);
        let c = c.clone();
        async move { send(&c, req).await.status }
    };
    assert_eq!(status("new-secret").await, 401);
    fake.add_secondary_secret("new-secret");
    assert_eq!(fake.secondary_secret().as_deref(), Some("new-secret"));
    assert_eq!(status("new-secret").await, 200);
    assert_eq!(status(&old).await, 200);

    fake.promote_secondary_secret();
    assert_eq!(fake.client_secret(), "new-secret");
    assert_eq!(fake.secondary_secret(), Some(old.clone()));
    assert_eq!(status(&old).await, 200);

    fake.remove_secondary_secret();
    assert_eq!(status(&old).await, 401);
    assert_eq!(status("new-secret").await, 200);

    fake.add_secondary_secret("other");
    assert_eq!(status("other").await, 200);
    fake.remove_secondary_secret();
    assert_eq!(status("other").await, 401);

    fake.set_primary_secret("third");
    assert_eq!(status("new-secret").await, 401);
    assert_eq!(status("third").await, 200);

    let token = get_token(&fake, &c).await;
    fake.delete_client();
    assert_eq!(status("third").await, 401);
    // Tokens already issued stay valid.
    assert_eq!(
        send(
            &c,
            api_req(&fake, Method::GET, "/api/v2/ping", Some(&token))
        )
        .await
        .status,
        200
    );
    fake.restore_client();
    assert_eq!(status("third").await, 200);
}

#[tokio::test]
async fn token_faults() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    let good = || token_req(&fake, &fake.client_id(), &fake.client_secret());
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    fake.push_token_faults([
        TokenFault::Status(503),
        TokenFault::OAuthError {
            status: 400,
            error: "invalid_scope".into(),
            description: "nope".into(),
        },
        TokenFault::RateLimited {
            retry_after: Some(date.into()),
        },
        TokenFault::RateLimited { retry_after: None },
        TokenFault::MalformedJson,
        TokenFault::Body(r#"{"token_type":"bearer","expires_in":-1}"#.into()),
        TokenFault::Oversized(1_000_000),
        TokenFault::Oversized(3),
    ]);
    assert_eq!(fake.pending_token_faults(), 8);

    let a = send(&c, good()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["status"], 503);

    let a = send(&c, good()).await;
    assert_oauth_error(&a, 400, "invalid_scope");
    assert_eq!(a.json()["description"], "nope");

    let a = send(&c, good()).await;
    assert_oauth_error(&a, 429, "rate_limited");
    assert_eq!(a.headers["retry-after"], date);
    let a = send(&c, good()).await;
    assert_eq!(a.status, 429);
    assert!(a.headers.get("retry-after").is_none());

    let a = send(&c, good()).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"access_token": "abc","#);
    assert!(serde_json::from_slice::<Value>(&a.body).is_err());

    let a = send(&c, good()).await;
    assert_eq!(&a.body[..], br#"{"token_type":"bearer","expires_in":-1}"#);
    assert_eq!(a.headers["content-type"], "application/json");

    let a = send(&c, good()).await;
    assert_eq!(a.body.len(), 1_000_000);
    assert_eq!(a.headers["content-length"], "1000000");
    assert_eq!(a.json()["token_type"], "bearer");
    let a = send(&c, good()).await;
    assert_eq!(a.status, 200);
    assert!(a.body.len() > 3);

    // Queue drained: a real token again.
    assert_eq!(fake.pending_token_faults(), 0);
    assert_eq!(fake.tokens_issued(), 0);
    get_token(&fake, &c).await;
    assert_eq!(fake.tokens_issued(), 1);
    assert_eq!(fake.token_requests(), 9);

    // Persistent fault; the queue takes precedence.
    fake.set_persistent_token_fault(Some(TokenFault::Status(502)));
    fake.push_token_faults([TokenFault::Status(500)]);
    assert_eq!(send(&c, good()).await.status, 500);
    assert_eq!(send(&c, good()).await.status, 502);
    assert_eq!(send(&c, good()).await.status, 502);
    fake.set_persistent_token_fault(None);
    get_token(&fake, &c).await;

    // Hang: the client gives up.
    fake.push_token_faults([TokenFault::Hang]);
    let r = tokio::time::timeout(Duration::from_millis(200), c.request(good())).await;
    assert!(r.is_err(), "hang answered");

    // CloseConnection: the client sees an error, not a response.
    fake.push_token_faults([TokenFault::CloseConnection]);
    let err = c
        .request(good())
        .await
        .expect_err("closed connection answered");
    let hyper_err = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<hyper::Error>())
        .unwrap_or_else(|| panic!("not a hyper error: {err:?}"));
    assert!(hyper_err.is_incomplete_message(), "{hyper_err:?}");
    get_token(&fake, &c).await;

    // Drip: one byte per 10 ms.
    let body = r#"{"a":1}"#;
    fake.push_token_faults([TokenFault::Drip {
        body: body.into(),
        every: Duration::from_millis(10),
    }]);
    let started = Instant::now();
    let res = c.request(good()).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut frames = 0;
    let mut got = Vec::new();
    let mut b = res.into_body();
    while let Some(f) = b.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            frames += 1;
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, body.as_bytes());
    assert_eq!(frames, body.len());
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn token_latency_delays_answers() {
    let fake = FakeGenesys::builder()
        .token_latency(Duration::from_millis(150))
        .start()
        .await
        .unwrap();
    let c = client();
    let started = Instant::now();
    get_token(&fake, &c).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    // Both latencies change at run time and apply to their own host only. The contrasts are
    // an hour against a bound that holds on a busy machine, not milliseconds against
    // milliseconds.
    fake.set_token_latency(Duration::from_secs(3600));
    let held = tokio::time::timeout(Duration::from_millis(200), get_token(&fake, &c)).await;
    assert!(held.is_err(), "an hour of token latency answered at once");
    fake.set_token_latency(Duration::ZERO);
    fake.set_api_latency(Duration::from_secs(3600));
    let t = tokio::time::timeout(Duration::from_secs(30), get_token(&fake, &c))
        .await
        .expect("a token request waited for the old token latency or the API latency");
    fake.set_api_latency(Duration::from_millis(100));
    let started = Instant::now();
    send(&c, api_req(&fake, Method::GET, "/api/v2/ping", Some(&t))).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn token_lifetime_rounds_up() {
    let fake = FakeGenesys::start().await.unwrap();
    let c = client();
    fake.set_token_lifetime(Duration::from_millis(1500));
    let a = send(
        &c,
        token_req(&fake, &fake.client_id(), &fake.client_secret()),
    )
    .await;
    assert_eq!(a.json()["expires_in"], 2);
    fake.set_token_lifetime(Duration::ZERO);
    let a = send(
        &c,
        token_req(&fake, &fake.client_id(), &fake.client_secret()),
    )
    .await;
    assert_eq!(a.json()["expires_in"], 1);
    // A zero lifetime token is already expired.
    let t = a.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        send(&c, api_req(&fake, Method::GET, "/api/v2/ping", Some(&t)))
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_prior_knowledge_2000_concurrent_echoes_over_one_connection() {
    let fake = FakeGenesys::start().await.unwrap();
    let token = fake.issue_token();
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Warm up so the pool holds exactly one h2 connection.
    let warm = api_req(&fake, Method::GET, "/api/v2/ping", Some(&token));
    let res = c.request(warm).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    fake.reset_counters();

    let mut set = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let c = c.clone();
        let req = Request::post(api_uri(&fake, "/api/v2/echo"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(format!("request {i}"))))
            .unwrap();
        set.spawn(async move {
            let a = send(&c, req).await;
            (i, a.status, a.body)
        });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let (i, status, body) = r.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("request {i}"));
        n += 1;
    }
    assert_eq!(n, 2000);
    assert_eq!(fake.api_requests(), 2000);
    assert_eq!(
        fake.connections_accepted(),
        0,
        "a new connection was opened"
    );
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_listeners() {
    let fake = FakeGenesys::start().await.unwrap();
    let addr = fake.api_addr().unwrap();
    let other = fake.clone();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    fake.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The remaining handle still works in-process.
    assert!(!other.issue_token().is_empty());

    let fake = FakeGenesys::start().await.unwrap();
    let addr = fake.login_addr().unwrap();
    drop(fake);
    // The listener task stops when the runtime next runs it: poll, with a bound that holds
    // on a busy machine, rather than sleep a fixed 20 ms.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
