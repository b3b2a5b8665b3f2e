//! Behaviour seen from outside: a real hyper-util client through the full stack
//! (`auth.layers()`; the storm and replay tests also through tower's `Retry` with
//! `RefreshOn401` over `AuthLayer`) against `genesys-fake` over loopback, and, for
//! tests that drive expiry with paused time, against the fake's in-process service.

mod common;

use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{AuthError, CacheConfig, Credentials, GenesysAuth, OAuthErrorCode};
use genesys_fake::FakeGenesys;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, ServiceBuilder, ServiceExt};

use common::{h2_client, stack, HttpClient, Stack};

/// Builds one kind of stack: [`common::stack`] or [`common::tower_stack`].
type MakeStack = fn(&GenesysAuth, HttpClient) -> Stack;

/// Runs `check` on each kind of stack, as two tests: `check::fused`, `check::tower`.
macro_rules! on_both_stacks {
    ($(#[$attr:meta])* $check:ident) => {
        mod $check {
            $(#[$attr])*
            async fn fused() {
                super::$check(super::common::stack).await
            }
            $(#[$attr])*
            async fn tower() {
                super::$check(super::common::tower_stack).await
            }
        }
    };
}

fn auth_for(fake: &FakeGenesys, config: CacheConfig) -> GenesysAuth {
    fake.auth_builder()
        .cache_config(config)
        .build(h2_client())
        .unwrap()
}

fn get(fake: &FakeGenesys, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!(
        "{}{}",
        fake.api_uri(),
        path.trim_start_matches('/')
    ))
    .body(Full::default())
    .unwrap()
}

fn fire(
    client: &Stack,
    request: Request<Full<Bytes>>,
) -> impl std::future::Future<Output = Result<Response<Bytes>, BoxError>> + Send {
    client.clone().oneshot(request)
}

fn auth_error(err: &BoxError) -> &AuthError {
    err.downcast_ref::<AuthError>()
        .unwrap_or_else(|| panic!("expected an AuthError, got {err}"))
}

on_both_stacks!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    ten_thousand_concurrent_401s_cost_one_token_request
);
async fn ten_thousand_concurrent_401s_cost_one_token_request(make: MakeStack) {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = make(&auth, h2_client());
    assert_eq!(
        fire(&client, get(&fake, "/api/v2/ping"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(fake.token_requests(), 1);

    fake.revoke_all_tokens();
    let tasks: Vec<_> = (0..10_000)
        .map(|_| {
            let client = client.clone();
            let request = get(&fake, "/api/v2/ping");
            tokio::spawn(async move { fire(&client, request).await.map(|r| r.status()) })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        fake.token_requests(),
        2,
        "exactly one token request for the whole storm"
    );
    assert!(fake.api_unauthorized() > 0 && fake.api_unauthorized() <= 10_000);
    assert_eq!(fake.api_requests(), 1 + 10_000 + fake.api_unauthorized());
    fake.shutdown().await;
}

on_both_stacks!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    late_401s_after_the_refresh_cost_no_more_token_requests
);
async fn late_401s_after_the_refresh_cost_no_more_token_requests(make: MakeStack) {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = make(&auth, h2_client());
    fire(&client, get(&fake, "/api/v2/ping")).await.unwrap();

    // Every API answer takes 1 s. Eight waves of requests leave 25 ms apart with the revoked
    // token, all long before the first 401 comes back, however busy the machine: that 401
    // refreshes, and the early waves' other 401s arrive after the refresh already finished
    // (late 401s for an old generation). Once the refresh has started, eight more waves
    // leave; they get the new token and never see a 401.
    fake.set_api_latency(Duration::from_secs(1));
    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    let wave = |tasks: &mut Vec<_>| {
        for _ in 0..625 {
            let client = client.clone();
            let request = get(&fake, "/api/v2/ping");
            tasks.push(tokio::spawn(async move {
                fire(&client, request).await.map(|r| r.status())
            }));
        }
    };
    for _ in 0..8 {
        wave(&mut tasks);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let refreshed = common::eventually(Duration::from_secs(60), || async {
        fake.token_requests() == 2
    })
    .await;
    assert!(refreshed, "the first 401 starts a refresh");
    fake.set_api_latency(Duration::ZERO);
    for _ in 0..8 {
        wave(&mut tasks);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        fake.token_requests(),
        2,
        "late 401s for the old generation must not refresh"
    );
    let stats = auth.cache().stats();
    assert!(
        stats.replays_after_401 >= 625 * 2,
        "several waves must have hit 401 ({} did)",
        stats.replays_after_401
    );
    fake.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_once_per_lifetime_and_no_request_waits() {
    let fake = FakeGenesys::builder()
        .token_lifetime(Duration::from_secs(100))
        .token_latency(Duration::from_millis(300))
        .build_in_process();
    // The in-process fake routes by path; a loopback origin satisfies the https rule.
    let config = CacheConfig::default()
        .refresh_ahead(Duration::from_secs(10), 0.0)
        .refresh_jitter(0.0);
    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri("http://127.0.0.1:9")
        .api_uri("http://127.0.0.1:9")
        .cache_config(config)
        .build(fake.service())
        .unwrap();
    let client = stack(&auth, fake.service());
    let ping = || {
        Request::get("http://127.0.0.1:9/api/v2/ping")
            .body(Full::default())
            .unwrap()
    };

    fire(&client, ping()).await.unwrap();
    assert_eq!(auth.cache().stats().waited_for_token, 1);

    // One request a second for 300 s: refreshes start at 90 s of each token's life
    // (requested at 0, 90.3, 180.6 s...), in the background.
    for _ in 0..300 {
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(fire(&client, ping()).await.unwrap().status(), 200);
    }
    assert_eq!(
        fake.token_requests(),
        4,
        "one initial fetch and one per lifetime"
    );
    assert_eq!(
        auth.cache().stats().waited_for_token,
        1,
        "no request waited after the first"
    );
    assert_eq!(fake.api_unauthorized(), 0);

    // Idle past hard expiry: the next request waits for exactly one refresh.
    tokio::time::advance(Duration::from_secs(200)).await;
    // The token's expiry timer runs on the runtime: let it, as any real gap would.
    tokio::task::yield_now().await;
    let before = tokio::time::Instant::now();
    assert_eq!(fire(&client, ping()).await.unwrap().status(), 200);
    assert_eq!(
        before.elapsed(),
        Duration::from_millis(300),
        "it waited one token round trip"
    );
    assert_eq!(fake.token_requests(), 5);
    assert_eq!(auth.cache().stats().waited_for_token, 2);
}

on_both_stacks!(
    #[tokio::test]
    a_replayed_post_reaches_the_api_byte_for_byte
);
async fn a_replayed_post_reaches_the_api_byte_for_byte(make: MakeStack) {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = make(&auth, h2_client());
    fire(&client, get(&fake, "/api/v2/ping")).await.unwrap();
    fake.revoke_all_tokens();
    fake.clear_recorded();

    let json = r#"{"name":"Ünïcode & spaces","list":[1,2,3],"nested":{"empty":""}}"#;
    let request = Request::post(format!("{}api/v2/echo", fake.api_uri()))
        .header("content-type", "application/json")
        .header("x-correlation-id", "abc-123")
        .body(Full::new(Bytes::from_static(json.as_bytes())))
        .unwrap();
    let response = fire(&client, request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body(), json.as_bytes());

    let recorded = fake.recorded_api_requests();
    assert_eq!(recorded.len(), 2, "sent, refused, replayed once");
    assert_eq!((recorded[0].status, recorded[1].status), (401, 200));
    for r in &recorded {
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.path, "/api/v2/echo");
        assert_eq!(r.body, json.as_bytes());
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-correlation-id"], "abc-123");
    }
    assert_ne!(
        recorded[0].headers[AUTHORIZATION],
        recorded[1].headers[AUTHORIZATION]
    );
    assert_eq!(fake.token_requests(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_second_401_goes_back_to_the_caller_without_a_loop() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    // An API that refuses every token: all tokens are revoked just before each request.
    let revoking = {
        let fake = fake.clone();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            fake.revoke_all_tokens();
            h2_client().oneshot(request)
        })
    };
    let client = stack(&auth, revoking);
    let response = fire(&client, get(&fake, "/api/v2/ping")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(
        body["code"], "bad.credentials",
        "the API's own 401 reaches the caller"
    );
    assert_eq!(
        fake.api_requests(),
        2,
        "one request and one replay, no more"
    );
    assert_eq!(fake.token_requests(), 2);
    let stats = auth.stats();
    assert_eq!(stats.api_401s, 2, "the request's 401 and the replay's");
    assert_eq!(stats.replays_after_401, 1, "one replay");
    fake.shutdown().await;
}

#[tokio::test]
async fn the_callers_own_authorization_is_never_replaced_nor_retried() {
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = stack(&auth, h2_client());
    let mut request = get(&fake, "/api/v2/ping");
    request
        .headers_mut()
        .insert(AUTHORIZATION, "Bearer callers-own-token".parse().unwrap());
    let response = fire(&client, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let recorded = fake.recorded_api_requests();
    assert_eq!(recorded.len(), 1, "not retried");
    assert_eq!(
        recorded[0].headers[AUTHORIZATION],
        "Bearer callers-own-token"
    );
    assert_eq!(fake.token_requests(), 0, "no token was even fetched");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_request_to_another_host_carries_no_token() {
    let fake = FakeGenesys::start().await.unwrap();
    let other = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = stack(&auth, h2_client());
    // Warm the cache so a token exists that could leak.
    fire(&client, get(&fake, "/api/v2/ping")).await.unwrap();

    let response = fire(&client, get(&other, "/api/v2/ping")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let recorded = other.recorded_api_requests();
    assert_eq!(recorded.len(), 1, "its 401 is not retried either");
    assert!(recorded[0].headers.get(AUTHORIZATION).is_none());
    // Nor does the login host of our own region get it.
    let to_login = Request::get(format!("{}anything", fake.login_uri()))
        .body(Full::default())
        .unwrap();
    let _ = fire(&client, to_login).await.unwrap();
    assert_eq!(fake.token_requests(), 1);
    fake.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_request_that_started_a_refresh_does_not_cancel_it() {
    // The token answer takes 2 s: far longer than the steps below take before the starter
    // is dropped, even on a busy machine.
    let fake = FakeGenesys::builder()
        .token_latency(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = stack(&auth, h2_client());

    let starter = tokio::spawn({
        let client = client.clone();
        let request = get(&fake, "/api/v2/ping");
        async move { fire(&client, request).await }
    });
    // The starter's refresh is in flight once the fake has its token request.
    let in_flight = common::eventually(Duration::from_secs(60), || async {
        fake.token_requests() == 1
    })
    .await;
    assert!(in_flight, "the starter's token request reached the fake");
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            let request = get(&fake, "/api/v2/ping");
            tokio::spawn(async move { fire(&client, request).await.map(|r| r.status()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    starter.abort();
    assert!(starter.await.unwrap_err().is_cancelled());
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(fake.token_requests(), 1);
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_reaches_every_waiter_once_and_the_backoff_holds() {
    let fake = FakeGenesys::builder()
        .token_latency(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    fake.delete_client();
    // `invalid_client` is fatal: the wait is the longest backoff (60 s), so the 200 callers
    // and the calls after them fall inside it, however busy the machine.
    let config = CacheConfig::default().backoff(Duration::from_secs(3), Duration::from_secs(60));
    let auth = auth_for(&fake, config);
    let client = stack(&auth, h2_client());

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            let request = get(&fake, "/api/v2/ping");
            tokio::spawn(async move { fire(&client, request).await })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        let err = auth_error(&err);
        assert!(
            matches!(
                err,
                AuthError::OAuth {
                    code: OAuthErrorCode::InvalidClient,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_fatal());
        assert!(err.to_string().contains("invalid_client"), "{err}");
    }
    assert_eq!(
        fake.token_requests(),
        1,
        "one token request for all 200 callers"
    );
    assert_eq!(fake.api_requests(), 0);

    // Within the backoff: the same typed error at once (the obvious match works), and no
    // token request.
    let err = fire(&client, get(&fake, "/api/v2/ping")).await.unwrap_err();
    let err = auth_error(&err);
    assert!(
        matches!(
            err,
            AuthError::OAuth {
                code: OAuthErrorCode::InvalidClient,
                ..
            }
        ),
        "{err}"
    );
    assert!(auth.health().backoff_remaining.is_some());
    assert_eq!(fake.token_requests(), 1);

    // The client is fixed. A fatal answer waits the longest backoff (60 s here), not the
    // first one: no token request goes out before it ...
    fake.restore_client();
    let err = fire(&client, get(&fake, "/api/v2/ping")).await.unwrap_err();
    assert!(matches!(auth_error(&err), AuthError::OAuth { .. }), "{err}");
    assert_eq!(fake.token_requests(), 1);
    // ... unless the credentials are rotated (here: the same ones, re-read from a vault or a
    // mounted secret), which ends it at once: the next call recovers.
    let credentials = auth.credentials().unwrap().current();
    auth.rotate_credentials(Credentials::clone(&credentials));
    let response = fire(&client, get(&fake, "/api/v2/ping")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(fake.token_requests(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn tower_http_layers_compose_around_the_stack() {
    use tower_http::trace::TraceLayer;
    let fake = FakeGenesys::start().await.unwrap();
    let auth = auth_for(&fake, CacheConfig::default());
    let client = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(auth.retry_layer())
        .layer(auth.layer())
        .service(h2_client());
    let response = client
        .oneshot(get(&fake, "/api/v2/organizations/me"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let org: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(org["name"], "Fake Genesys Org");
    fake.shutdown().await;
}

/// A streamed body (a channel) wrapped in `BufferedBody` is replayed byte for byte after a
/// revocation, over HTTP/1.1 and HTTP/2, through both stacks, with and without trailers
/// (hyper stops at the trailers without polling for the body's end), and the fake receives
/// the trailers on the first send and on the replay. Over HTTP/2 also with a known length,
/// as a proxied HTTP/2 request with a `Content-Length` has: its last data frame leaves 0
/// bytes but the trailers still to come. The fake reads a request's whole body before it
/// answers 401, so the body was always sent in full by then.
#[tokio::test]
async fn a_streamed_post_in_a_buffered_body_is_replayed_over_h1_and_h2() {
    use genesys_auth_layer::BufferedBody;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower::util::BoxCloneService;

    type Api =
        BoxCloneService<Request<BufferedBody<Upload>>, Response<hyper::body::Incoming>, BoxError>;
    let json = r#"{"name":"streamed in pieces","list":[1,2,3],"more":"0123456789abcdef"}"#;

    // A channel, with its exact length (the data bytes left) if `known`.
    struct Upload {
        channel: http_body_util::Channel<Bytes, std::io::Error>,
        left: Option<u64>,
    }

    impl http_body::Body for Upload {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            let polled = std::pin::Pin::new(&mut self.channel).poll_frame(cx);
            if let (std::task::Poll::Ready(Some(Ok(frame))), Some(left)) = (&polled, &mut self.left)
            {
                *left -= frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            polled
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.left
                .map_or_else(Default::default, http_body::SizeHint::with_exact)
        }
    }

    // A known length only over HTTP/2: over HTTP/1.1 it becomes a `Content-Length`, which
    // carries no trailers.
    for (http2, fused, with_trailers, known) in [false, true]
        .into_iter()
        .flat_map(|h| [(h, true), (h, false)])
        .flat_map(|(h, f)| [(h, f, false), (h, f, true)])
        .flat_map(|(h, f, t)| [(h, f, t, false), (h, f, t, true)])
        .filter(|&(h, _, _, known)| h || !known)
    {
        let case = format!("http2={http2} fused={fused} trailers={with_trailers} known={known}");
        let fake = FakeGenesys::start().await.unwrap();
        let auth = auth_for(&fake, CacheConfig::default());
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(http2);
        let api = builder.build_http::<BufferedBody<Upload>>();
        let client: Api = if fused {
            BoxCloneService::new(ServiceBuilder::new().layer(auth.layers()).service(api))
        } else {
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(auth.retry_layer())
                    .layer(auth.layer())
                    .service(api),
            )
        };
        auth.token().await.unwrap();
        fake.revoke_all_tokens();
        fake.clear_recorded();

        let (mut tx, channel) = http_body_util::Channel::new(2);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let sent_trailers = with_trailers.then(|| trailers.clone());
        tokio::spawn(async move {
            for chunk in json.as_bytes().chunks(7) {
                tx.send_data(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            if let Some(trailers) = sent_trailers {
                tx.send_trailers(trailers).await.unwrap();
            }
        });
        let stream = Upload {
            channel,
            left: known.then_some(json.len() as u64),
        };
        let mut request = Request::post(format!("{}api/v2/echo", fake.api_uri()))
            .header("content-type", "application/json")
            .body(BufferedBody::new(stream))
            .unwrap();
        if with_trailers {
            // HTTP/1.1 sends trailers only when the request announces them.
            request
                .headers_mut()
                .insert("trailer", "x-checksum".parse().unwrap());
        }
        let response = client.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200, "{case}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, json.as_bytes(), "{case}");

        let recorded = fake.recorded_api_requests();
        assert_eq!(recorded.len(), 2, "{case}: sent, refused, replayed once");
        assert_eq!(
            (recorded[0].status, recorded[1].status),
            (401, 200),
            "{case}"
        );
        for r in &recorded {
            assert_eq!(r.body, json.as_bytes(), "{case}");
            assert_eq!(r.headers["content-type"], "application/json", "{case}");
        }
        let expected = with_trailers.then_some(&trailers);
        assert_eq!(
            recorded[0].trailers.as_ref(),
            expected,
            "{case}: the first send"
        );
        assert_eq!(
            recorded[1].trailers.as_ref(),
            expected,
            "{case}: the replay"
        );
        assert_eq!(fake.token_requests(), 2, "{case}");
        fake.shutdown().await;
    }
}
