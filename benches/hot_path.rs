//! What one `call` costs on the hot path, side by side with the alternatives.
//!
//! Every variant wraps the same in-memory inner service (`tower::service_fn` returning a
//! ready `Response`), builds the same request, calls `poll_ready`, `call`, and polls the
//! response future once (it is ready at once: nothing here touches the network).
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench hot_path
//! ```
//!
//! Variants (numbers as in the benchmark issue):
//! 1. `no_layer`: the inner service alone;
//! 2. `set_header`: `tower_http::set_header::SetRequestHeaderLayer` with a fixed, pre-built
//!    bearer `HeaderValue`, the physical limit of header injection;
//! 3. `auth_layer`: our `AuthLayer`, valid token cached;
//! 4. `full_stack`: our `auth.layers()` (`AuthReplayLayer`: auth and replay-once in one
//!    service); `4t_tower_retry_stack` is the same two pieces stacked with tower's `Retry`
//!    (`auth.retry_layer()` outside `auth.layer()`);
//! 5. `rwlock_layer` / `mutex_layer`: the hand-written `Arc<tokio::sync::RwLock<Option<Token>>>`
//!    (and `tokio::sync::Mutex`) layer users write themselves;
//! 6. `floor_swap_clock`: the floor issue #13 has in mind, a hand-written layer doing exactly
//!    one `ArcSwap` load of an `Arc<Token>`-like value and one `tokio::time::Instant::now()`
//!    compared with its refresh instant, then inserting the cloned header: no scope, no
//!    counter, no 401 reporting (its future is the inner one, or an error);
//! 7. `retry_clone_set_header`: `tower::retry::Retry` with a policy that only copies the
//!    request, over (2): the intrinsic price of being able to replay a request at all.
//!
//! (The issue's peer crate, `cf-gears-toolkit-auth`, is measured by the separate crate in
//! `benches/peer/`; see BENCHMARKS.md for why it is not a dev-dependency here.)
//!
//! The `two_threads` group runs the same call on both cores at once, each thread on its own
//! clone of one service (sharing one token cache): the time shown is the wall time per call
//! *per thread*, so perfect scaling shows the single-thread time.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, GenesysAuth, IssuedToken, Scope, TokenSource,
};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use tower::retry::{Policy, RetryLayer};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::set_header::SetRequestHeaderLayer;

type Body = Full<Bytes>;

const API: &str = "https://api.mypurecloud.com";
const PATH: &str = "https://api.mypurecloud.com/api/v2/users/me";
const TOKEN: &str = "b2x5bXBpYy1yaW5nLXN0b25lLWNvdW50cnktMjAyNC0xMC0xNw";

/// The in-memory "API": a ready `200` for anything.
fn inner(
) -> impl Service<Request<Body>, Response = Response<()>, Error = Infallible, Future: Send + Unpin>
       + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<Body>| {
        black_box(&req);
        std::future::ready(Ok::<_, Infallible>(Response::new(())))
    })
}

/// A token source that is asked once (the cache is warmed before measuring).
struct Fixed;

impl TokenSource for Fixed {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async {
            Ok(IssuedToken::bearer(TOKEN, Duration::from_secs(86_399)).expect("valid token"))
        })
    }
}

fn warm_auth(rt: &tokio::runtime::Runtime) -> GenesysAuth {
    let scope = Scope::new([Uri::from_static(API)]).expect("valid scope");
    let auth = GenesysAuth::from_source(Fixed, CacheConfig::default(), scope);
    rt.block_on(auth.token()).expect("token");
    auth
}

fn bearer() -> HeaderValue {
    let mut value = HeaderValue::try_from(format!("Bearer {TOKEN}")).expect("header");
    value.set_sensitive(true);
    value
}

/// `Retry` with a policy that never retries but copies every request with `Request::clone`
/// (http 1's derived clone, the obvious way to copy a request whose body is `Clone`): the
/// price any replay-capable stack pays.
#[derive(Clone)]
struct CloneOnly;

impl<E> Policy<Request<Body>, Response<()>, E> for CloneOnly {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<Body>,
        _result: &mut Result<Response<()>, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        Some(request.clone())
    }
}

/// The layer users write themselves: a token behind an async lock, a boxed future.
mod hand_written {
    use super::*;
    use tokio::sync::{Mutex, RwLock};

    pub struct Token {
        pub header: HeaderValue,
        pub expires_at: Instant,
    }

    pub fn token() -> Option<Token> {
        Some(Token {
            header: bearer(),
            expires_at: Instant::now() + Duration::from_secs(86_399),
        })
    }

    #[derive(Clone)]
    pub struct RwLockLayer(pub Arc<RwLock<Option<Token>>>);
    #[derive(Clone)]
    pub struct MutexLayer(pub Arc<Mutex<Option<Token>>>);

    #[derive(Clone)]
    pub struct RwLockAuth<S> {
        inner: S,
        token: Arc<RwLock<Option<Token>>>,
    }
    #[derive(Clone)]
    pub struct MutexAuth<S> {
        inner: S,
        token: Arc<Mutex<Option<Token>>>,
    }

    impl<S> Layer<S> for RwLockLayer {
        type Service = RwLockAuth<S>;
        fn layer(&self, inner: S) -> Self::Service {
            RwLockAuth {
                inner,
                token: self.0.clone(),
            }
        }
    }
    impl<S> Layer<S> for MutexLayer {
        type Service = MutexAuth<S>;
        fn layer(&self, inner: S) -> Self::Service {
            MutexAuth {
                inner,
                token: self.0.clone(),
            }
        }
    }

    type Boxed<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, tower::BoxError>> + Send>>;

    impl<S> Service<Request<Body>> for RwLockAuth<S>
    where
        S: Service<Request<Body>, Response = Response<()>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<tower::BoxError>,
    {
        type Response = Response<()>;
        type Error = tower::BoxError;
        type Future = Boxed<Response<()>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, mut req: Request<Body>) -> Self::Future {
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let token = self.token.clone();
            Box::pin(async move {
                let header = {
                    let guard = token.read().await;
                    match guard.as_ref() {
                        Some(t) if Instant::now() < t.expires_at => t.header.clone(),
                        _ => return Err("no token (refresh omitted in the benchmark)".into()),
                    }
                };
                req.headers_mut().insert(AUTHORIZATION, header);
                inner.call(req).await.map_err(Into::into)
            })
        }
    }

    impl<S> Service<Request<Body>> for MutexAuth<S>
    where
        S: Service<Request<Body>, Response = Response<()>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<tower::BoxError>,
    {
        type Response = Response<()>;
        type Error = tower::BoxError;
        type Future = Boxed<Response<()>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, mut req: Request<Body>) -> Self::Future {
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let token = self.token.clone();
            Box::pin(async move {
                let header = {
                    let guard = token.lock().await;
                    match guard.as_ref() {
                        Some(t) if Instant::now() < t.expires_at => t.header.clone(),
                        _ => return Err("no token (refresh omitted in the benchmark)".into()),
                    }
                };
                req.headers_mut().insert(AUTHORIZATION, header);
                inner.call(req).await.map_err(Into::into)
            })
        }
    }
}

/// The floor of issue #13: one `ArcSwap` load and one clock read, nothing else.
mod floor {
    use super::*;
    use arc_swap::ArcSwapOption;

    pub struct Token {
        pub header: HeaderValue,
        pub refresh_at: tokio::time::Instant,
    }

    pub fn cell() -> Arc<ArcSwapOption<Token>> {
        Arc::new(ArcSwapOption::from_pointee(Token {
            header: bearer(),
            refresh_at: tokio::time::Instant::now() + Duration::from_secs(86_399),
        }))
    }

    #[derive(Clone)]
    pub struct FloorLayer(pub Arc<ArcSwapOption<Token>>);

    #[derive(Clone)]
    pub struct Floor<S> {
        inner: S,
        token: Arc<ArcSwapOption<Token>>,
    }

    impl<S> Layer<S> for FloorLayer {
        type Service = Floor<S>;
        fn layer(&self, inner: S) -> Self::Service {
            Floor {
                inner,
                token: self.0.clone(),
            }
        }
    }

    /// The inner future, or no fresh token (the slow path, omitted in the benchmark).
    /// `Unpin` keeps it free of pin projection; the bench's inner future is.
    pub enum FloorFuture<F> {
        Called(F),
        NoToken,
    }

    impl<F, T, E> Future for FloorFuture<F>
    where
        F: Future<Output = Result<T, E>> + Unpin,
        E: Into<tower::BoxError>,
    {
        type Output = Result<T, tower::BoxError>;

        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.get_mut() {
                FloorFuture::Called(future) => {
                    std::pin::Pin::new(future).poll(cx).map_err(Into::into)
                }
                FloorFuture::NoToken => Poll::Ready(Err("no fresh token (refresh omitted)".into())),
            }
        }
    }

    impl<S> Service<Request<Body>> for Floor<S>
    where
        S: Service<Request<Body>, Response = Response<()>>,
        S::Future: Unpin,
        S::Error: Into<tower::BoxError>,
    {
        type Response = Response<()>;
        type Error = tower::BoxError;
        type Future = FloorFuture<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, mut req: Request<Body>) -> Self::Future {
            let guard = self.token.load();
            match guard.as_deref() {
                Some(t) if tokio::time::Instant::now() < t.refresh_at => {
                    req.headers_mut().insert(AUTHORIZATION, t.header.clone());
                    FloorFuture::Called(self.inner.call(req))
                }
                _ => FloorFuture::NoToken,
            }
        }
    }
}

/// One request, as an application builds it: method, URI, empty body.
fn request(uri: &Uri) -> Request<Body> {
    let mut req = Request::new(Body::default());
    *req.uri_mut() = uri.clone();
    req
}

/// `poll_ready`, `call`, and one poll of the (immediately ready) response future.
#[inline]
fn one_call<S>(svc: &mut S, uri: &Uri, cx: &mut Context<'_>)
where
    S: Service<Request<Body>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("inner service not ready"),
    }
    let mut fut = pin!(svc.call(request(uri)));
    loop {
        match fut.as_mut().poll(cx) {
            Poll::Ready(Ok(res)) => {
                black_box(res);
                return;
            }
            Poll::Ready(Err(e)) => panic!("call failed: {e:?}"),
            // Only the hand-written lock layers can get here, when the other thread holds
            // the lock: spin until it is released (the waker is a no-op).
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// One service clone, ready to make calls.
type Caller = Box<dyn FnMut(&Uri, &mut Context<'_>) + Send>;
/// Every variant, boxed behind one name so the groups below can loop over them.
type Variant = Box<dyn Fn() -> Caller + Send + Sync>;

fn boxed<S>(svc: S) -> Caller
where
    S: Service<Request<Body>, Response = Response<()>> + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let mut svc = svc;
    Box::new(move |uri, cx| one_call(&mut svc, uri, cx))
}

/// `(name, factory)`: the factory gives a fresh clone of one shared service per call.
fn variants(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, Variant)> {
    let auth = warm_auth(rt);
    let rw = Arc::new(tokio::sync::RwLock::new(hand_written::token()));
    let mx = Arc::new(tokio::sync::Mutex::new(hand_written::token()));

    let no_layer = inner();
    let set_header = ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(AUTHORIZATION, bearer()))
        .service(inner());
    let auth_layer = ServiceBuilder::new().layer(auth.layer()).service(inner());
    let full_stack = ServiceBuilder::new().layer(auth.layers()).service(inner());
    let tower_stack = ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(auth.layer())
        .service(inner());
    let rwlock_layer = ServiceBuilder::new()
        .layer(hand_written::RwLockLayer(rw))
        .service(inner());
    let mutex_layer = ServiceBuilder::new()
        .layer(hand_written::MutexLayer(mx))
        .service(inner());
    let floor_layer = ServiceBuilder::new()
        .layer(floor::FloorLayer(floor::cell()))
        .service(inner());
    let retry_clone = ServiceBuilder::new()
        .layer(RetryLayer::new(CloneOnly))
        .layer(SetRequestHeaderLayer::overriding(AUTHORIZATION, bearer()))
        .service(inner());

    vec![
        ("1_no_layer", Box::new(move || boxed(no_layer.clone()))),
        ("2_set_header", Box::new(move || boxed(set_header.clone()))),
        ("3_auth_layer", Box::new(move || boxed(auth_layer.clone()))),
        ("4_full_stack", Box::new(move || boxed(full_stack.clone()))),
        (
            "4t_tower_retry_stack",
            Box::new(move || boxed(tower_stack.clone())),
        ),
        (
            "5a_rwlock_layer",
            Box::new(move || boxed(rwlock_layer.clone())),
        ),
        (
            "5b_mutex_layer",
            Box::new(move || boxed(mutex_layer.clone())),
        ),
        (
            "6_floor_swap_clock",
            Box::new(move || boxed(floor_layer.clone())),
        ),
        (
            "7_retry_clone_set_header",
            Box::new(move || boxed(retry_clone.clone())),
        ),
    ]
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn single_thread(c: &mut Criterion) {
    let rt = runtime();
    // Inside a runtime context, as in an application (tokio's clock reads its context).
    let _guard = rt.enter();
    let uri = Uri::from_static(PATH);
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("one_call");
    for (name, make) in variants(&rt) {
        let mut call = make();
        group.bench_function(name, |b| b.iter(|| call(&uri, &mut cx)));
    }
    group.finish();
}

fn two_threads(c: &mut Criterion) {
    let rt = runtime();
    let handle = rt.handle().clone();
    let uri = Uri::from_static(PATH);
    let mut group = c.benchmark_group("two_threads");
    for (name, make) in variants(&rt) {
        if name == "1_no_layer" {
            continue;
        }
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(2);
                std::thread::scope(|s| {
                    let workers: Vec<_> = (0..2)
                        .map(|_| {
                            let mut call = make();
                            let (barrier, handle, uri) = (&barrier, &handle, &uri);
                            s.spawn(move || {
                                let _guard = handle.enter();
                                let mut cx = Context::from_waker(Waker::noop());
                                barrier.wait();
                                let start = Instant::now();
                                for _ in 0..iters {
                                    call(uri, &mut cx);
                                }
                                start.elapsed()
                            })
                        })
                        .collect();
                    workers
                        .into_iter()
                        .map(|w| w.join().expect("worker"))
                        .max()
                        .unwrap_or_default()
                })
            })
        });
    }
    group.finish();
}

/// What the pieces of `AuthService::call`'s extra work cost on their own, to explain the
/// gap between (3) and (2).
fn parts(c: &mut Criterion) {
    let rt = runtime();
    let auth = warm_auth(&rt);
    let uri = Uri::from_static(PATH);
    let req = request(&uri);
    let token = rt.block_on(auth.token()).expect("token");
    let mut group = c.benchmark_group("parts");
    {
        let _guard = rt.enter();
        group.bench_function("tokio_instant_now_in_runtime", |b| {
            b.iter(tokio::time::Instant::now)
        });
    }
    group.bench_function("std_instant_now", |b| b.iter(Instant::now));
    group.bench_function("scope_applies_to", |b| {
        b.iter(|| auth.scope().applies_to(black_box(&req)))
    });
    group.bench_function("scope_contains", |b| {
        b.iter(|| auth.scope().contains(black_box(req.uri())))
    });
    group.bench_function("has_authorization", |b| {
        b.iter(|| black_box(&req).headers().contains_key(AUTHORIZATION))
    });
    group.bench_function("header_value_clone_drop", |b| {
        b.iter(|| black_box(token.header().clone()))
    });
    group.bench_function("build_request", |b| b.iter(|| request(black_box(&uri))));
    group.finish();
}

/// The ratios the benchmark issue sets bars on: (label, numerator, denominator, bar).
const BARS: [(&str, &str, &str, &str); 11] = [
    ("(3) / (2)", "3_auth_layer", "2_set_header", "<= 1.40"),
    (
        "(4) / (7)",
        "4_full_stack",
        "7_retry_clone_set_header",
        "<= 1.20",
    ),
    ("(3) / (5a)", "3_auth_layer", "5a_rwlock_layer", "< 1"),
    ("(3) / (5b)", "3_auth_layer", "5b_mutex_layer", "< 1"),
    ("(4) / (5a)", "4_full_stack", "5a_rwlock_layer", "< 1"),
    ("(4) / (5b)", "4_full_stack", "5b_mutex_layer", "< 1"),
    (
        "(7) / (5a)",
        "7_retry_clone_set_header",
        "5a_rwlock_layer",
        "(context)",
    ),
    (
        "(4t) / (7)",
        "4t_tower_retry_stack",
        "7_retry_clone_set_header",
        "(context)",
    ),
    (
        "(4) / (4t)",
        "4_full_stack",
        "4t_tower_retry_stack",
        "(context)",
    ),
    (
        "(3) / (6)",
        "3_auth_layer",
        "6_floor_swap_clock",
        "(context)",
    ),
    (
        "(6) / (2)",
        "6_floor_swap_clock",
        "2_set_header",
        "(context)",
    ),
];

/// `--paired`: the variants measured side by side in short interleaved batches, and each
/// bar's ratio taken within a round.
///
/// Criterion measures one variant for seconds and then the next, so a change in the
/// machine's speed between the two (this shared machine's speed drifts by several percent
/// from one second to the next) lands in their ratio. Here every round runs one batch of
/// `BATCH` calls of each variant, in an order that rotates from round to round and is
/// reversed every other round (so no variant always follows the same one), so the
/// variants of one round share the machine's state; the median over rounds of each
/// round's ratio is reported, with its quartiles.
fn paired(rounds: usize) {
    const BATCH: u32 = 5_000;
    let rt = runtime();
    let _guard = rt.enter();
    let uri = Uri::from_static(PATH);
    let mut cx = Context::from_waker(Waker::noop());
    let mut callers: Vec<(&str, Caller)> = variants(&rt)
        .into_iter()
        .map(|(name, make)| (name, make()))
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); callers.len()];
    // Warm-up: every variant's code and data in the caches.
    for (_, call) in &mut callers {
        for _ in 0..BATCH {
            call(&uri, &mut cx);
        }
    }
    let n = callers.len();
    for round in 0..rounds {
        for k in 0..n {
            let k = if round % 2 == 0 { k } else { n - 1 - k };
            let i = (round + k) % n;
            let call = &mut callers[i].1;
            let start = Instant::now();
            for _ in 0..BATCH {
                call(&uri, &mut cx);
            }
            times[i].push(start.elapsed().as_nanos() as f64 / f64::from(BATCH));
        }
    }
    let index = |name: &str| callers.iter().position(|(n, _)| *n == name);
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.25), at(0.5), at(0.75))
    };
    println!("`cargo bench -p genesys-auth-benches --bench hot_path -- --paired {rounds}`: {rounds} rounds of {BATCH} calls per variant, interleaved\n");
    println!("| variant | ns per call: p25 | median | p75 |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, (name, _)) in callers.iter().enumerate() {
        let (a, m, b) = quartiles(times[i].clone());
        println!("| {name} | {a:.1} | {m:.1} | {b:.1} |");
    }
    println!("\n| ratio (same round) | p25 | median | p75 | bar |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (label, num, den, bar) in BARS {
        let (Some(x), Some(y)) = (index(num), index(den)) else {
            continue;
        };
        let ratios = times[x].iter().zip(&times[y]).map(|(a, b)| a / b).collect();
        let (a, m, b) = quartiles(ratios);
        println!("| {label} | {a:.3} | **{m:.3}** | {b:.3} | {bar} |");
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = single_thread, two_threads, parts
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--paired") {
        let rounds = args.get(at + 1).and_then(|r| r.parse().ok()).unwrap_or(400);
        paired(rounds.max(1));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
