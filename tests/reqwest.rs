//! `AuthMiddleware` (feature `reqwest`) seen from outside: a real `reqwest::Client` through
//! `reqwest_middleware` against `genesys-fake` over loopback.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{AuthError, CacheConfig, GenesysAuth, OAuthErrorCode, TokenGeneration};
use genesys_fake::{FakeGenesys, TokenFault};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Extensions, StatusCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};

use common::{base, h2_client, TinyServer};

/// Auth against `fake`'s login host with `secret`, for its API origin.
fn auth_for(fake: &FakeGenesys, secret: &str) -> GenesysAuth {
    GenesysAuth::client_credentials(fake.client_id(), secret)
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .build(h2_client())
        .expect("auth for the fake")
}

/// A reqwest client speaking HTTP/2 to the fake (prior knowledge, as the tower tests'
/// `h2_client`): a thousand concurrent requests share one connection instead of opening a
/// thousand, which a default open-file limit of 1,024 would not allow.
fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("a reqwest client")
}

/// A reqwest client with the auth middleware.
fn client(auth: &GenesysAuth) -> ClientWithMiddleware {
    ClientBuilder::new(h2c()).with(auth.middleware()).build()
}

/// The URL of `path` on `fake`'s API host.
fn url(fake: &FakeGenesys, path: &str) -> String {
    format!("{}{path}", base(&fake.api_uri()))
}

/// The generation of the token the cache holds now.
fn current_generation(auth: &GenesysAuth) -> TokenGeneration {
    auth.cache().current().expect("a token").generation()
}

/// Sent after the auth middleware: holds the first `n` requests until all `n` have
/// arrived, so that all of them carry the same token and none of them has been answered.
struct HoldFirst {
    n: usize,
    arrived: AtomicUsize,
    barrier: tokio::sync::Barrier,
}

impl HoldFirst {
    fn new(n: usize) -> Self {
        Self {
            n,
            arrived: AtomicUsize::new(0),
            barrier: tokio::sync::Barrier::new(n),
        }
    }
}

#[async_trait::async_trait]
impl Middleware for HoldFirst {
    async fn handle(
        &self,
        request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        if self.arrived.fetch_add(1, Ordering::SeqCst) < self.n {
            self.barrier.wait().await;
        }
        next.run(request, extensions).await
    }
}

/// Sent after the auth middleware: revokes every token just before each request, so the
/// API refuses whatever token it carries.
struct RevokeFirst(FakeGenesys);

#[async_trait::async_trait]
impl Middleware for RevokeFirst {
    async fn handle(
        &self,
        request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        self.0.revoke_all_tokens();
        next.run(request, extensions).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_401s_cost_one_token_request() {
    const REQUESTS: usize = 1_000;
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, &fake.client_secret());
    let warm_up = client(&auth)
        .get(url(&fake, "/api/v2/ping"))
        .send()
        .await
        .unwrap();
    assert_eq!(warm_up.status(), StatusCode::OK);
    assert_eq!(fake.token_requests(), 1);

    // All 1,000 leave with the revoked token before the first 401 can start a refresh.
    fake.revoke_all_tokens();
    let client = ClientBuilder::new(h2c())
        .with(auth.middleware())
        .with(HoldFirst::new(REQUESTS))
        .build();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let request = client.clone().get(url(&fake, "/api/v2/ping"));
        tasks.spawn(async move { request.send().await.map(|r| r.status()) });
    }
    let all = async {
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.unwrap().unwrap(), StatusCode::OK);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every request answered");

    assert_eq!(
        fake.token_requests(),
        2,
        "one token request for all 1,000 401s"
    );
    assert_eq!(fake.api_unauthorized(), REQUESTS as u64);
    assert_eq!(
        fake.api_requests(),
        1 + 2 * REQUESTS as u64,
        "each replayed once"
    );
    let stats = auth.stats();
    assert_eq!(
        (stats.api_401s, stats.replays_after_401),
        (REQUESTS as u64, REQUESTS as u64)
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn only_in_scope_requests_without_their_own_authorization_get_the_token() {
    let fake = FakeGenesys::start().await.unwrap();
    let other = FakeGenesys::start().await.unwrap(); // another origin: another port
    let auth = auth_for(&fake, &fake.client_secret());
    let client = client(&auth);

    // Another origin: sent as it is, its 401 returned as it is.
    let response = client
        .post(url(&other, "/api/v2/echo"))
        .body("for another host")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.extensions().get::<TokenGeneration>(), None);
    let seen = other.recorded_api_requests();
    assert_eq!(seen.len(), 1, "not replayed");
    assert_eq!(seen[0].headers.get(AUTHORIZATION), None);
    assert_eq!(seen[0].body, "for another host");
    assert_eq!(fake.token_requests(), 0, "no token fetched for it");

    // In scope, with the caller's own `Authorization`: left alone, not replayed.
    let response = client
        .get(url(&fake, "/api/v2/ping"))
        .bearer_auth("mine")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.extensions().get::<TokenGeneration>(), None);
    let seen = fake.recorded_api_requests();
    assert_eq!(seen.len(), 1, "not replayed");
    assert_eq!(seen[0].headers[AUTHORIZATION], "Bearer mine");
    assert_eq!(fake.token_requests(), 0);

    // In scope without one: the token.
    let response = client.get(url(&fake, "/api/v2/ping")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.token_requests(), 1);
    let sent = &fake.recorded_api_requests()[1].headers[AUTHORIZATION];
    let cached = auth.cache().current().expect("a token");
    assert_eq!(sent, cached.header());
    let stats = auth.stats();
    assert_eq!(
        (stats.api_401s, stats.replays_after_401),
        (0, 0),
        "401s to requests it did not authorize are not its own"
    );
    fake.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn a_byte_body_is_replayed_whole_with_a_newer_token() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, &fake.client_secret());
    let client = client(&auth);
    client.get(url(&fake, "/api/v2/ping")).send().await.unwrap();
    let refused = fake.recorded_api_requests()[0].headers[AUTHORIZATION].clone();
    fake.revoke_all_tokens();
    fake.clear_recorded();

    let body = r#"{"name":"replayed","n":1}"#;
    let response = client
        .post(url(&fake, "/api/v2/echo?x=1"))
        .header(CONTENT_TYPE, "application/json")
        .header("x-request-id", "42")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), body);

    let seen = fake.recorded_api_requests();
    assert_eq!(seen.len(), 2, "sent, then replayed once");
    assert_eq!((seen[0].status, seen[1].status), (401, 200));
    assert_eq!(seen[0].headers[AUTHORIZATION], refused);
    assert_ne!(seen[1].headers[AUTHORIZATION], refused);
    for request in &seen {
        assert_eq!(request.method, http::Method::POST);
        assert_eq!(request.path, "/api/v2/echo?x=1");
        assert_eq!(request.body, body);
        assert_eq!(request.headers[CONTENT_TYPE], "application/json");
        assert_eq!(request.headers["x-request-id"], "42");
    }
    assert_eq!(fake.token_requests(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_its_401_returned() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, &fake.client_secret());
    let client = client(&auth);
    client.get(url(&fake, "/api/v2/ping")).send().await.unwrap();
    let refused = current_generation(&auth);
    fake.revoke_all_tokens();
    fake.clear_recorded();

    let chunks: [Result<Bytes, std::io::Error>; 2] = [Ok("a streamed ".into()), Ok("body".into())];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = client
        .post(url(&fake, "/api/v2/echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.extensions().get::<TokenGeneration>(),
        Some(&refused)
    );
    let seen = fake.recorded_api_requests();
    assert_eq!(seen.len(), 1, "sent once");
    assert_eq!(seen[0].body, "a streamed body");

    // The 401 was reported: the refused token is gone, the next request gets a new one.
    let response = client.get(url(&fake, "/api/v2/ping")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.token_requests(), 2);
    assert!(current_generation(&auth) > refused);
    let stats = auth.stats();
    assert_eq!((stats.api_401s, stats.replays_after_401), (1, 0));
    fake.shutdown().await;
}

#[tokio::test]
async fn a_replay_answered_401_is_returned_and_not_replayed_again() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, &fake.client_secret());
    let client = ClientBuilder::new(h2c())
        .with(auth.middleware())
        .with(RevokeFirst(fake.clone()))
        .build();

    for round in 1..=2u64 {
        let response = client.get(url(&fake, "/api/v2/ping")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // The replay's token: it stays in use (a replay's 401 starts no refresh).
        assert_eq!(
            response.extensions().get::<TokenGeneration>(),
            Some(&current_generation(&auth))
        );
        assert_eq!(fake.api_requests(), 2 * round, "sent, replayed once");
        assert_eq!(fake.token_requests(), 1 + round, "one refresh per request");
    }
    let stats = auth.stats();
    assert_eq!((stats.api_401s, stats.replays_after_401), (4, 2));
    fake.shutdown().await;
}

#[tokio::test]
async fn a_refused_secret_is_an_auth_error_inside_the_middleware_error() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, "wrong-secret");
    let client = client(&auth);

    let err = client
        .get(url(&fake, "/api/v2/ping"))
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = &err else {
        panic!("expected a middleware error, got {err:?}");
    };
    let auth_error = error
        .downcast_ref::<AuthError>()
        .unwrap_or_else(|| panic!("expected an AuthError, got {error:?}"));
    assert!(
        matches!(
            auth_error,
            AuthError::OAuth {
                code: OAuthErrorCode::InvalidClient,
                ..
            }
        ),
        "{auth_error:?}"
    );
    for shown in [format!("{err}"), format!("{err:?}"), format!("{err:#}")] {
        assert!(!shown.contains("wrong-secret"), "{shown}");
    }
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(fake.api_requests(), 0, "nothing sent without a token");

    // Within the backoff: the same error at once, with no token request.
    let err = client
        .get(url(&fake, "/api/v2/ping"))
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = &err else {
        panic!("expected a middleware error, got {err:?}");
    };
    let auth_error = error.downcast_ref::<AuthError>().expect("an AuthError");
    assert!(
        matches!(
            auth_error,
            AuthError::OAuth {
                code: OAuthErrorCode::InvalidClient,
                ..
            }
        ),
        "{auth_error:?}"
    );
    assert_eq!(fake.token_requests(), 1);
    fake.shutdown().await;
}

/// reqwest follows a redirect below the middleware and drops the token when it leads to
/// another origin: that origin's 401 was no answer to the token, so it goes back as it is,
/// with no refresh, no replay and no stamp.
#[tokio::test]
async fn a_401_from_another_origin_after_a_redirect_is_not_the_tokens() {
    let fake = FakeGenesys::start().await.unwrap();
    let elsewhere = url(&fake, "/api/v2/ping"); // answers 401 without a token
    let api = TinyServer::start(move |_| (302, Some(elsewhere.clone()))).await;
    let auth = fake
        .auth_builder()
        .api_uri(api.base())
        .build(h2_client())
        .unwrap();
    let client = client(&auth);
    for _ in 0..3 {
        let response = client
            .get(format!("{}/api/v2/users/me", api.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.extensions().get::<TokenGeneration>(), None);
    }
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "no replay");
    assert!(seen
        .iter()
        .all(|(_, headers)| headers.contains_key(AUTHORIZATION)));
    assert_eq!(fake.token_requests(), 1, "the token was kept");
    let stats = auth.stats();
    assert_eq!((stats.api_401s, stats.replays_after_401), (0, 0));
    assert_eq!(fake.api_unauthorized(), 3);
    fake.shutdown().await;
}

/// As on the tower stack: when the refresh after a 401 fails, the caller gets its
/// `AuthError`, not the 401; while the backoff runs, the refused token is sent again
/// (it may have been refused by mistake) and its 401 goes back, not replayed.
#[tokio::test]
async fn a_failed_refresh_after_a_401_is_the_callers_error_then_the_401_goes_back() {
    let fake = FakeGenesys::start().await.unwrap();
    let config = CacheConfig::default().backoff(Duration::from_secs(30), Duration::from_secs(60));
    let auth = fake
        .auth_builder()
        .cache_config(config)
        .build(h2_client())
        .unwrap();
    let client = client(&auth);
    let ping = url(&fake, "/api/v2/ping");
    assert_eq!(
        client.get(&ping).send().await.unwrap().status(),
        StatusCode::OK
    );

    fake.revoke_all_tokens();
    fake.set_persistent_token_fault(Some(TokenFault::Status(503)));
    let err = client.get(&ping).send().await.unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = &err else {
        panic!("expected a middleware error, got {err:?}");
    };
    let auth_error = error.downcast_ref::<AuthError>().expect("an AuthError");
    assert!(
        matches!(auth_error, AuthError::UnexpectedStatus { status, .. } if *status == 503),
        "{auth_error:?}"
    );
    assert_eq!(fake.token_requests(), 2);

    let api_requests = fake.api_requests();
    let response = client.get(&ping).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.extensions().get::<TokenGeneration>(),
        Some(&TokenGeneration(1)),
        "the refused token, put back during the backoff"
    );
    assert_eq!(fake.api_requests(), api_requests + 1, "not replayed");
    assert_eq!(
        fake.token_requests(),
        2,
        "no token request during the backoff"
    );
    fake.shutdown().await;
}
