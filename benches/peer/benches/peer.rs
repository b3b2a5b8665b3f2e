//! Side by side with the closest Rust peer, `cf-gears-toolkit-auth` 0.8.3: its
//! `BearerAuthLayer` (header only) and `BearerAuthAutoRefreshLayer` (header + one replay on
//! 401), against our `AuthLayer` and full stack, and `SetRequestHeaderLayer` as the floor,
//! all in one run on the same in-memory inner service and the same request.
//!
//! The peer's inner service must have `toolkit_http::HttpError` as its error type, so every
//! variant here uses that inner service. Its `TokenProvider` gets its token from
//! `genesys-fake`'s token endpoint over loopback once, before measuring.
//!
//! ```text
//! cargo bench --manifest-path benches/peer/Cargo.toml
//! ```

#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, GenesysAuth, IssuedToken, Scope, TokenSource,
};
use genesys_fake::FakeGenesys;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use toolkit_auth::oauth2::{
    BearerAuthAutoRefreshLayer, BearerAuthLayer, OAuthClientConfig, TokenProvider,
};
use toolkit_http::HttpError;
use tower::{Service, ServiceBuilder};
use tower_http::set_header::SetRequestHeaderLayer;

type Body = Full<Bytes>;
const API: &str = "https://api.mypurecloud.com";
const PATH: &str = "https://api.mypurecloud.com/api/v2/users/me";

fn inner() -> impl Service<Request<Body>, Response = Response<()>, Error = HttpError, Future: Send>
       + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<Body>| {
        black_box(&req);
        std::future::ready(Ok::<_, HttpError>(Response::new(())))
    })
}

struct Fixed(String);

impl TokenSource for Fixed {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        let token = self.0.clone();
        Box::pin(async move {
            Ok(IssuedToken::bearer(&token, Duration::from_secs(86_399)).expect("valid token"))
        })
    }
}

fn request(uri: &Uri) -> Request<Body> {
    let mut req = Request::new(Body::default());
    *req.uri_mut() = uri.clone();
    req
}

fn bench<S>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut svc: S,
) where
    S: Service<Request<Body>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let uri = Uri::from_static(PATH);
    let mut cx = Context::from_waker(Waker::noop());
    c.bench_function(name, |b| {
        b.iter(|| {
            assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
            let mut fut = pin!(svc.call(request(&uri)));
            loop {
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(res)) => break black_box(res),
                    Poll::Ready(Err(e)) => panic!("call failed: {e:?}"),
                    Poll::Pending => std::hint::spin_loop(),
                }
            }
        })
    });
}

fn peer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let fake = rt.block_on(FakeGenesys::start()).expect("fake");
    let token = fake.issue_token();

    // The peer: a TokenProvider warmed from the fake's token endpoint.
    let config = OAuthClientConfig {
        token_endpoint: Some(url::Url::parse(&fake.token_url().to_string()).expect("url")),
        client_id: fake.client_id(),
        client_secret: toolkit_auth::oauth2::SecretString::new(fake.client_secret()),
        http_config: Some(toolkit_http::HttpClientConfig::for_testing()),
        ..Default::default()
    };
    let provider = TokenProvider::new(config).expect("peer token provider");
    rt.block_on(provider.get()).expect("peer token");

    // Ours, warmed from a fixed source.
    let scope = Scope::new([Uri::from_static(API)]).expect("scope");
    let auth = GenesysAuth::from_source(Fixed(token.clone()), CacheConfig::default(), scope);
    rt.block_on(auth.token()).expect("token");
    let mut header = HeaderValue::try_from(format!("Bearer {token}")).expect("header");
    header.set_sensitive(true);

    let mut g = c.benchmark_group("peer");
    bench(&mut g, "1_no_layer", inner());
    bench(
        &mut g,
        "2_set_header",
        ServiceBuilder::new()
            .layer(SetRequestHeaderLayer::overriding(AUTHORIZATION, header))
            .service(inner()),
    );
    bench(
        &mut g,
        "3_auth_layer",
        ServiceBuilder::new().layer(auth.layer()).service(inner()),
    );
    bench(
        &mut g,
        "4_full_stack",
        ServiceBuilder::new().layer(auth.layers()).service(inner()),
    );
    bench(
        &mut g,
        "6a_peer_bearer_auth_layer",
        ServiceBuilder::new()
            .layer(BearerAuthLayer::new(provider.clone()))
            .service(inner()),
    );
    bench(
        &mut g,
        "6b_peer_bearer_auto_refresh_layer",
        ServiceBuilder::new()
            .layer(BearerAuthAutoRefreshLayer::new(provider.clone()))
            .service(inner()),
    );
    g.finish();
    assert_eq!(
        fake.token_requests(),
        1,
        "the peer fetched one token and reused it"
    );
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = peer
}
criterion_main!(benches);
