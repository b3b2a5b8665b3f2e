//! Invariant 1, counted: with a valid token cached, one `call` through `AuthLayer` allocates
//! no more than the same call through `SetRequestHeaderLayer` with a fixed header.
//!
//! A test binary of its own, because it installs a counting global allocator. The workspace
//! forbids `unsafe_code` (and `forbid` cannot be lifted with `allow`), and a `GlobalAlloc`
//! impl is `unsafe impl`, so the counting allocator comes from `stats_alloc`: one small
//! file, no dependencies, and `#[global_allocator]` on its ready-made static needs no
//! `unsafe` on our side. It counts on every thread, so the measured calls run on this
//! thread only, polled by hand with a no-op waker (no runtime thread does work meanwhile),
//! and each measurement is repeated and the smallest count kept.

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, GenesysAuth, IssuedToken, Scope, TokenSource,
};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Service, ServiceBuilder};
use tower_http::set_header::SetRequestHeaderLayer;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const URI: &str = "https://api.mypurecloud.com/api/v2/users/me";

struct Fixed;

impl TokenSource for Fixed {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async {
            Ok(IssuedToken::bearer("a-token", Duration::from_secs(86_399)).expect("token"))
        })
    }
}

fn inner() -> impl Service<Request<Full<Bytes>>, Response = Response<()>, Error = Infallible> + Clone
{
    tower::service_fn(|_req: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(())))
    })
}

/// Allocations (count, bytes) of one ready-to-run call: build the request, `poll_ready`,
/// `call`, poll the response to completion and drop it. Smallest of 20 tries.
fn allocations<S>(svc: &mut S) -> (usize, usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let uri = Uri::from_static(URI);
    let mut cx = Context::from_waker(Waker::noop());
    let mut call = |svc: &mut S| {
        let mut req = Request::new(Full::default());
        *req.uri_mut() = uri.clone();
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let fut = pin!(svc.call(req));
        match fut.poll(&mut cx) {
            Poll::Ready(Ok(res)) => drop(res),
            other => panic!("expected a ready response, got {:?}", other.map(|_| ())),
        }
    };
    // Warm-up: first clones promote shared buffers, thread-locals get initialised.
    for _ in 0..100 {
        call(svc);
    }
    (0..20)
        .map(|_| {
            let region = Region::new(GLOBAL);
            call(svc);
            let change = region.change();
            (
                change.allocations + change.reallocations,
                change.bytes_allocated,
            )
        })
        .min()
        .expect("20 tries")
}

#[test]
fn auth_layer_and_full_stack_allocate_no_more_than_a_fixed_header() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let scope = Scope::new([Uri::from_static("https://api.mypurecloud.com")]).expect("scope");
    let auth = GenesysAuth::from_source(Fixed, CacheConfig::default(), scope);
    rt.block_on(auth.token()).expect("warm the cache");

    let mut header = HeaderValue::from_static("Bearer a-token");
    header.set_sensitive(true);
    let mut fixed = ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(AUTHORIZATION, header))
        .service(inner());
    let mut ours = ServiceBuilder::new().layer(auth.layer()).service(inner());
    let mut full = ServiceBuilder::new().layer(auth.layers()).service(inner());
    let mut none = inner();

    let baseline = allocations(&mut none);
    let set_header = allocations(&mut fixed);
    let auth_layer = allocations(&mut ours);
    let authorized = auth.stats().requests_authorized;
    let full_stack = allocations(&mut full);
    assert_eq!(
        auth.stats().requests_authorized - authorized,
        120,
        "every call through the full stack was authorized (in scope, token attached)"
    );
    println!(
        "allocations per call (count, bytes): no layer {baseline:?}, \
         SetRequestHeaderLayer {set_header:?}, AuthLayer {auth_layer:?}, \
         full stack {full_stack:?}"
    );
    assert!(
        auth_layer.0 <= set_header.0 && auth_layer.1 <= set_header.1,
        "AuthLayer allocates {auth_layer:?} per call, SetRequestHeaderLayer {set_header:?}"
    );
    // The copy kept for a replay (and the clones that go with it) allocates nothing.
    assert!(
        full_stack.0 <= set_header.0 && full_stack.1 <= set_header.1,
        "the full stack allocates {full_stack:?} per call, SetRequestHeaderLayer {set_header:?}"
    );
    assert_eq!(
        auth.cache().stats().refreshes,
        1,
        "the cached token was used"
    );
}
