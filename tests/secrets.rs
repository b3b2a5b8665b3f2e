//! Secrets stay secret (DESIGN.md invariants 9 and 10).
//!
//! * Every path — success, every token-endpoint fault, a 401 replay, secret fallback,
//!   both secrets refused, rotation — runs under a `tracing` subscriber at TRACE that
//!   captures everything (this crate's events, hyper's, h2's, tower-http's `TraceLayer`
//!   with request headers), and neither the client secrets, their HTTP Basic encoding, nor
//!   any access token appears in it, nor in `Debug`/`Display` of the public types and every
//!   error met on the way.
//! * A plain-`http` token endpoint is refused unless its host is loopback.
//! * With `tower_http::follow_redirect` outside the layer, a redirect to another origin
//!   carries no token.
//!
//! Zeroize on drop is not observable from a test without `unsafe` (forbidden in this
//! workspace): `ClientSecret` wraps `zeroize::Zeroizing<String>`, which is what makes it so.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::{base, get, h1_client, h2_client, Captured, TinyServer};
use genesys_auth_layer::parse::parse_token_response;
use genesys_auth_layer::{
    AuthError, ClientCredentials, ClientId, ClientSecret, ConfigError, CredentialStore,
    Credentials, GenesysAuth, Region,
};
use genesys_fake::{FakeGenesys, TokenFault};
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::FollowRedirectLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnRequest, TraceLayer};
use tracing::Level;

const ID: &str = "secrets-client";
const SECRET: &str = "Pr1mary-SECRET-do-not-log-7f3a";
const NEXT_SECRET: &str = "R0tated-SECRET-do-not-log-91c2";
const WRONG_PRIMARY: &str = "Wr0ng-primary-SECRET-b81e";
const WRONG_SECONDARY: &str = "Wr0ng-secondary-SECRET-5d07";

/// Everything any test of this binary logs, at every level, from every crate.
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        captured
    })
}

/// RFC 4648 base64, for the HTTP Basic form of a secret (no extra dev-dependency).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every string that must never be shown: the secrets, their Basic encodings, and the
/// given access tokens.
fn forbidden(tokens: &[String]) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for secret in [SECRET, NEXT_SECRET, WRONG_PRIMARY, WRONG_SECONDARY] {
        all.push(secret.to_owned());
        let basic = base64(format!("{ID}:{secret}").as_bytes());
        // The part of the Basic value that encodes the secret (the id's part may be shared).
        all.push(basic[basic.len() / 2..].to_owned());
    }
    all.extend(tokens.iter().cloned());
    all
}

fn assert_clean(what: &str, text: &str, forbidden: &[String]) {
    for secret in forbidden {
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows a secret or token ({secret}):\n{}",
            excerpt(text, secret)
        );
    }
}

fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(300)
        .map_or(0, |(i, _)| i);
    text[start..(at + needle.len() + 100).min(text.len())].to_owned()
}

/// `Display`, `Debug` and the `source()` chain of an error.
fn shown(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{err} | {err:?}");
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(&format!(" | caused by {s} | {s:?}"));
        source = s.source();
    }
    out
}

fn auth_for(fake: &FakeGenesys, id: &str, secret: &str, secondary: Option<&str>) -> GenesysAuth {
    let mut credentials = Credentials::new(id, secret).unwrap();
    if let Some(secondary) = secondary {
        credentials = credentials.with_secondary(secondary).unwrap();
    }
    let builder = GenesysAuth::with_credentials(credentials)
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .fetch_timeout(Duration::from_millis(300))
        .backoff(Duration::from_millis(10), Duration::from_millis(20));
    builder.build(h1_client()).expect("auth")
}

/// The stack with `TraceLayer`s outside (default) and inside (headers included, TRACE)
/// the auth layers, so the request with its `Authorization` header is traced.
fn traced_stack(auth: &GenesysAuth) -> common::Stack {
    common::boxed(
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(auth.layers())
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(
                        DefaultMakeSpan::new()
                            .level(Level::TRACE)
                            .include_headers(true),
                    )
                    .on_request(DefaultOnRequest::new().level(Level::TRACE)),
            )
            .service(h2_client()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_in_logs_debug_or_display() {
    let logs = captured();
    let fake = FakeGenesys::builder()
        .client(ID, SECRET)
        .token_lifetime(Duration::from_secs(3_600))
        .start()
        .await
        .expect("fake");
    let api = base(&fake.api_uri());
    let mut shown_text = String::new();
    let mut errors: Vec<AuthError> = Vec::new();
    let mut bad_tokens: Vec<String> = Vec::new();

    // Success, then a POST, then a 401 replay after every token is revoked.
    let auth = auth_for(&fake, ID, SECRET, None);
    let client = traced_stack(&auth);
    let ok = client
        .clone()
        .oneshot(get(&api, "/api/v2/organizations/me"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let echo = Request::post(format!("{api}/api/v2/echo"))
        .body(Full::new(Bytes::from_static(b"{\"hello\":1}")))
        .unwrap();
    assert_eq!(client.clone().oneshot(echo).await.unwrap().status(), 200);
    fake.revoke_all_tokens();
    let replayed = client
        .clone()
        .oneshot(get(&api, "/api/v2/organizations/me"))
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::OK, "replayed after the 401");
    assert!(auth.stats().replays_after_401 >= 1);

    // Every token-endpoint fault, on a fresh cache each (so the fault is met at once).
    let issued_elsewhere = fake.issue_token();
    let faults = vec![
        TokenFault::Status(500),
        TokenFault::Status(503),
        TokenFault::Hang,
        TokenFault::CloseConnection,
        TokenFault::RateLimited {
            retry_after: Some("2".into()),
        },
        TokenFault::RateLimited { retry_after: None },
        TokenFault::MalformedJson,
        TokenFault::Oversized(200_000),
        TokenFault::Drip {
            body: r#"{"access_token":"Dr1p-t0ken-value-1234","token_type":"bearer","expires_in":60}"#
                .into(),
            every: Duration::from_millis(100),
        },
        TokenFault::Body(r#"{"access_token":"M4c-t0ken-value-1234","token_type":"mac","expires_in":60}"#.into()),
        TokenFault::Body(
            "{\"access_token\":\"Crlf-t0ken-value-1234\\r\\nX: y\",\"token_type\":\"bearer\",\"expires_in\":60}"
                .into(),
        ),
        TokenFault::Body(r#"{"access_token":"Zer0-t0ken-value-1234","token_type":"bearer","expires_in":0}"#.into()),
        TokenFault::Body(r#"{"access_token":"Abc-t0ken-value-1234","token_type":"bearer","expires_in":"abc"}"#.into()),
        TokenFault::Body(r#"{"access_token":"N0ne-t0ken-value-1234","token_type":"bearer"}"#.into()),
        TokenFault::Body(format!(
            r#"{{"access_token":"{issued_elsewhere}","token_type":"bearer","expires_in":1000000000000}}"#
        )),
        TokenFault::OAuthError {
            status: 400,
            error: "invalid_scope".into(),
            description: "scope not allowed".into(),
        },
    ];
    bad_tokens.extend(
        [
            "Dr1p-t0ken-value-1234",
            "M4c-t0ken-value-1234",
            "Crlf-t0ken-value-1234",
            "Zer0-t0ken-value-1234",
            "Abc-t0ken-value-1234",
            "N0ne-t0ken-value-1234",
        ]
        .map(str::to_owned),
    );
    bad_tokens.push(issued_elsewhere);
    for fault in faults {
        fake.set_persistent_token_fault(Some(fault.clone()));
        let auth = auth_for(&fake, ID, SECRET, None);
        let client = traced_stack(&auth);
        let result = client.oneshot(get(&api, "/api/v2/organizations/me")).await;
        if let Err(e) = &result {
            shown_text.push_str(&shown(e.as_ref()));
            errors.push(e.downcast_ref::<AuthError>().expect("AuthError").clone());
            // The backoff error too.
            if let Err(again) = auth.token().await {
                errors.push(again);
            }
        }
        shown_text.push_str(&format!("{:?}{:?}", auth.health(), auth));
    }
    fake.set_persistent_token_fault(None);

    // The client is deleted: invalid_client; a wrong primary with the right secondary
    // (fallback); both secrets wrong; then rotation to a new secret.
    fake.delete_client();
    let auth = auth_for(&fake, ID, SECRET, None);
    errors.push(auth.token().await.unwrap_err());
    fake.restore_client();
    let fallback = auth_for(&fake, ID, WRONG_PRIMARY, Some(SECRET));
    fallback.token().await.expect("the secondary secret works");
    let both = auth_for(&fake, ID, WRONG_PRIMARY, Some(WRONG_SECONDARY));
    let err = both.token().await.unwrap_err();
    assert!(
        matches!(err, AuthError::BothSecretsRejected { .. }),
        "{err}"
    );
    errors.push(err);
    fake.set_primary_secret(NEXT_SECRET);
    fallback.rotate_credentials(Credentials::new(ID, NEXT_SECRET).unwrap());
    fake.revoke_all_tokens();
    let rotated = traced_stack(&fallback)
        .oneshot(get(&api, "/api/v2/organizations/me"))
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200, "the rotated secret is used");
    // Transport and timeout errors against a port nothing listens on.
    let refused = GenesysAuth::client_credentials(ID, SECRET)
        .login_uri(format!("http://127.0.0.1:{}", common::free_port().await))
        .api_uri(api.as_str())
        .build(h1_client())
        .unwrap();
    errors.push(refused.token().await.unwrap_err());

    // Debug and Display of every public type this crate hands out.
    let token = fallback.token().await.unwrap();
    let credentials = Credentials::new(ID, SECRET)
        .unwrap()
        .with_secondary(NEXT_SECRET)
        .unwrap();
    let store = CredentialStore::new(credentials.clone());
    let source = ClientCredentials::new(h1_client(), fake.token_url(), store.clone()).unwrap();
    let issued = parse_token_response(
        br#"{"access_token":"Parsed-t0ken-value-1234","token_type":"bearer","expires_in":60}"#,
    )
    .unwrap();
    bad_tokens.push("Parsed-t0ken-value-1234".into());
    let builder = GenesysAuth::with_credentials(credentials.clone());
    let service = fallback.layer().layer(h2_client());
    let future = service.clone().oneshot(get(&api, "/api/v2/ping"));
    shown_text.push_str(&format!(
        "{token:?} {credentials:?} {store:?} {source:?} {issued:?} {builder:?} {service:?} \
         {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {}",
        fallback,
        fallback.cache(),
        fallback.layer(),
        fallback.retry_policy(),
        fallback.stats(),
        fallback.health(),
        fallback.credentials(),
        ClientSecret::new(SECRET),
        ClientId::new(ID),
        token.header(),
        Region::EuWest1,
    ));
    let response = future.await.unwrap();
    assert_eq!(response.status(), 200);
    // A request as the auth layer hands it on: its header map's Debug.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let record = seen.clone();
    let inspect = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let record = record.clone();
        async move {
            let auth_header = req.headers().get(AUTHORIZATION).expect("authorized");
            assert!(auth_header.is_sensitive(), "the header is marked sensitive");
            *record.lock().unwrap() = format!("{req:?}");
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    fallback
        .layer()
        .layer(inspect)
        .oneshot(get(&api, "/api/v2/ping"))
        .await
        .unwrap();
    shown_text.push_str(&seen.lock().unwrap());
    for err in &errors {
        shown_text.push_str(&shown(err));
        shown_text.push_str(&format!("{:?}", err.cause()));
    }
    for err in [
        ConfigError::InsecureTokenEndpoint("http://login.example.com/oauth/token".into()),
        ConfigError::EmptyClientSecret,
    ] {
        shown_text.push_str(&shown(&err));
    }

    // Every token the API saw, plus the ones in hostile responses.
    let mut tokens = common::tokens_seen_by(&fake);
    assert!(tokens.len() >= 3, "tokens seen: {}", tokens.len());
    tokens.extend(bad_tokens);
    let forbidden = forbidden(&tokens);
    assert!(errors.len() >= 15, "{} errors collected", errors.len());

    assert_clean("Debug/Display", &shown_text, &forbidden);
    let log = logs.text();
    for expected in [
        "token fetched",
        "token fetch failed",
        "401 replayed",
        "secret fallback used",
    ] {
        assert!(
            log.contains(expected),
            "the capture works: {expected:?} is logged"
        );
    }
    assert!(
        log.contains("\"authorization\": Sensitive"),
        "TraceLayer saw the header, redacted"
    );
    assert_clean("the TRACE log", &log, &forbidden);
}

#[test]
fn plain_http_token_endpoint_is_refused_off_loopback() {
    for insecure in [
        "http://login.mypurecloud.com",
        "http://10.0.0.1:8080",
        "http://localhost.evil.example",
        "http://192.168.1.5",
    ] {
        let result = GenesysAuth::client_credentials(ID, SECRET)
            .login_uri(insecure)
            .build(h1_client());
        match result {
            Err(err @ ConfigError::InsecureTokenEndpoint(_)) => {
                assert!(!format!("{err} {err:?}").contains(SECRET));
            }
            other => panic!("{insecure}: expected InsecureTokenEndpoint, got {other:?}"),
        }
    }
    for allowed in [
        "https://login.mypurecloud.com",
        "http://127.0.0.1:9",
        "http://localhost:9",
        "http://[::1]:9",
    ] {
        GenesysAuth::client_credentials(ID, SECRET)
            .login_uri(allowed)
            .build(h1_client())
            .unwrap_or_else(|e| panic!("{allowed}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_origin_carries_no_token() {
    let _ = captured();
    let fake = FakeGenesys::builder()
        .client(ID, SECRET)
        .start()
        .await
        .unwrap();
    // The other origin: records what reaches it.
    let elsewhere = TinyServer::start(|_| (200, None)).await;
    let target = format!("{}/landing", elsewhere.base());
    // The API origin (in scope): redirects away, or to itself.
    let api = TinyServer::start(move |uri| match uri.path() {
        "/api/v2/away" => (307, Some(target.clone())),
        "/api/v2/here" => (307, Some("/api/v2/landing".to_owned())),
        _ => (200, None),
    })
    .await;
    let auth = GenesysAuth::client_credentials(ID, SECRET)
        .login_uri(fake.login_uri())
        .api_uri(api.base())
        .build(h1_client())
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(auth.layers())
        .service(h1_client());

    let response = client
        .clone()
        .oneshot(get(&api.base(), "/api/v2/away"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    let at_api = api.seen.lock().unwrap().clone();
    let at_elsewhere = elsewhere.seen.lock().unwrap().clone();
    assert_eq!(at_api.len(), 1);
    assert_eq!(at_elsewhere.len(), 1, "the redirect was followed");
    let sent = at_api[0]
        .1
        .get(AUTHORIZATION)
        .expect("the API got the token");
    assert!(sent.to_str().unwrap().starts_with("Bearer "));
    assert_eq!(at_elsewhere[0].0.path(), "/landing");
    assert!(
        at_elsewhere[0].1.get(AUTHORIZATION).is_none(),
        "the other origin got {:?}",
        at_elsewhere[0].1.get(AUTHORIZATION)
    );

    // Control: a redirect within the API origin keeps the token (it is attached again).
    let response = client
        .oneshot(get(&api.base(), "/api/v2/here"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let at_api = api.seen.lock().unwrap().clone();
    assert_eq!(at_api.len(), 3);
    assert_eq!(at_api[2].0.path(), "/api/v2/landing");
    assert_eq!(at_api[2].1.get(AUTHORIZATION), Some(sent));
}
