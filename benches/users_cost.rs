//! What a request for a cached user costs through `users.layer()`, beside a
//! client-credentials request through `auth.layer()` (each attaches a token and replays
//! nothing), interleaved in one process (issue #15's bar: ≤ 1.5×); and through
//! `users.layers()` beside `auth.layers()` (each also replays a 401 once).
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench users_cost                 # 400 rounds, ~10 s
//! cargo bench -p genesys-auth-benches --bench users_cost -- --rounds 1000 --per-round
//! cargo bench -p genesys-auth-benches --bench users_cost -- --only user_1   # one variant, for perf
//! ```
//!
//! A file of its own rather than more variants of `hot_path.rs`: a user's request carries
//! its `UserKey` in its extensions, which `hot_path`'s callers (one request shape for every
//! variant) do not build, and caching 100,000 users would slow every `hot_path` run (the
//! criterion groups, `rounds.py`, `instructions.py`) and move the memory layout under the
//! variants BENCHMARKS.md section 1 reports. The inner service, the request and the call
//! are `hot_path.rs`'s, and the rounds are its `--paired` rounds: every variant runs a
//! batch of `BATCH` calls per round, in an order that rotates each round and is reversed
//! every other round, and each ratio is taken within a round.
//!
//! Variants:
//! - `cc_auth_layer`: `auth.layer()` with a valid token cached (`hot_path`'s (3)), the
//!   denominator of the bar;
//! - `cc_auth_layers`: `auth.layers()` (auth + replay once, `hot_path`'s (4)): what a
//!   user's request does besides finding the user, since `users.layer()` replays on 401;
//! - `cc_auth_layer_keyed`: (3) with a `UserKey` in the request's extensions, which it
//!   ignores: the application's part of a user's request (the extension map, the key);
//! - `cc_auth_layers_keyed`: (4) with the same `UserKey`, which its replay copy clones:
//!   `user_layers_1` less finding the user;
//! - `user_layers_1`: `users.layers()` (attach + replay once, like (4)) with 1 user cached,
//!   the request carrying her key;
//! - `user_1`: `users.layer()` (attach only, like (3)) with 1 user cached, the request
//!   carrying her key: the bar's numerator, against `auth.layer()`;
//! - `user_1_store`: `user_1` on a fleet's cache (`UserTokenCache::with_store`, a
//!   `MemoryStore`): a hit never touches the store (issue #16's benchmark row);
//! - `user_100k_same`: 100,000 users cached, always the same user's key;
//! - `user_100k_spread`: 100,000 users cached, each call for the next user in a shuffled
//!   order of all of them (a lookup that misses the CPU caches, as many users would).
//!
//! The key is a clone of a `UserKey` the application keeps (an `Arc` increment); building
//! it from a session cookie's string per request would add an allocation. Every token
//! stays valid for the whole run; the token endpoint is a service that counts calls, and
//! the run fails if any was made or any request was refused.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, Credentials, GenesysAuth, IssuedToken, MemoryStore,
    RefreshToken, Scope, TokenHttpService, TokenSource, TokenStore, UserCacheConfig, UserGrant,
    UserKey, UserTokenCache, UserTokens,
};
use http::{Request, Response, Uri};
use http_body_util::Full;
use tower::{Service, ServiceBuilder};

type Body = Full<Bytes>;

const API: &str = "https://api.mypurecloud.com";
const PATH: &str = "https://api.mypurecloud.com/api/v2/users/me";
const TOKEN: &str = "b2x5bXBpYy1yaW5nLXN0b25lLWNvdW50cnktMjAyNC0xMC0xNw";
/// Calls per variant per round, as in `hot_path.rs`'s `--paired`.
const BATCH: u32 = 5_000;
/// Users in the big cache.
const USERS: usize = 100_000;

/// The in-memory "API": a ready `200` for anything (`hot_path.rs`'s).
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

/// One request, as an application builds it: method, URI, empty body.
fn request(uri: &Uri) -> Request<Body> {
    let mut req = Request::new(Body::default());
    *req.uri_mut() = uri.clone();
    req
}

/// The same request for the user under `key`.
fn user_request(uri: &Uri, key: &UserKey) -> Request<Body> {
    let mut req = request(uri);
    req.extensions_mut().insert(key.clone());
    req
}

/// `poll_ready`, `call`, and one poll of the (immediately ready) response future.
#[inline]
fn one_call<S>(svc: &mut S, req: Request<Body>, cx: &mut Context<'_>)
where
    S: Service<Request<Body>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("inner service not ready"),
    }
    match pin!(svc.call(req)).poll(cx) {
        Poll::Ready(Ok(res)) => {
            black_box(res);
        }
        Poll::Ready(Err(e)) => panic!("call failed: {e:?}"),
        Poll::Pending => panic!("the call waited (no token?)"),
    }
}

type Caller = Box<dyn FnMut(&mut Context<'_>)>;

/// A user's tokens as a login leaves them: a day's access token and a refresh token.
fn login(n: usize) -> UserTokens {
    let access = format!("{TOKEN}{n:08}");
    UserTokens::new(
        IssuedToken::bearer(&access, Duration::from_secs(86_399)).expect("valid token"),
        Some(RefreshToken::new(format!("refresh-{TOKEN}{n:08}"))),
        tokio::time::Instant::now(),
    )
}

/// A 32-character session id, distinct for each `n`.
fn session_id(n: usize) -> UserKey {
    let mixed = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    UserKey::new(format!(
        "{mixed:016x}{:016x}",
        mixed.rotate_left(29) ^ n as u64
    ))
}

/// A user cache of `count` users whose token endpoint counts the calls it gets.
/// The output of a future that needs no waiting (a `UserTokenCache` without a shared store
/// inserts at once).
fn at_once<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future waited"),
    }
}

fn users(
    count: usize,
    token_calls: &Arc<AtomicUsize>,
    store: Option<Arc<dyn TokenStore>>,
) -> UserTokenCache<impl TokenHttpService> {
    let calls = token_calls.clone();
    let endpoint = tower::service_fn(move |_: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .status(500)
                .body(Full::<Bytes>::default())
                .expect("response"),
        ))
    });
    let creds = Credentials::new("bench-client-id", "bench-client-secret").expect("credentials");
    let grant = UserGrant::confidential(
        endpoint,
        Uri::from_static("http://127.0.0.1:9/oauth/token"),
        creds,
    )
    .expect("grant");
    let api = Uri::from_static(API);
    let cache = match store {
        Some(store) => UserTokenCache::with_store(grant, api, UserCacheConfig::new(), store),
        None => UserTokenCache::new(grant, api, UserCacheConfig::new()),
    }
    .expect("user cache");
    for n in 0..count {
        at_once(cache.insert(session_id(n), login(n))).expect("insert");
    }
    cache
}

/// The keys of `0..count` in a shuffled order (a fixed seed: every run walks the same one).
fn shuffled_keys(count: usize) -> Vec<UserKey> {
    let mut keys: Vec<UserKey> = (0..count).map(session_id).collect();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..keys.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        keys.swap(i, (state % (i as u64 + 1)) as usize);
    }
    keys
}

/// The ratios reported: (label, numerator, denominator, bar).
const RATIOS: [(&str, &str, &str, &str); 10] = [
    (
        "user_1_store / user_1",
        "user_1_store",
        "user_1",
        "(context: a fleet's cache hit, #16)",
    ),
    (
        "user_1 / cc_auth_layer",
        "user_1",
        "cc_auth_layer",
        "<= 1.5",
    ),
    (
        "user_100k_same / cc_auth_layer",
        "user_100k_same",
        "cc_auth_layer",
        "<= 1.5",
    ),
    (
        "user_layers_1 / cc_auth_layers",
        "user_layers_1",
        "cc_auth_layers",
        "(context: with replay, like for like)",
    ),
    (
        "user_1 / cc_auth_layer_keyed",
        "user_1",
        "cc_auth_layer_keyed",
        "(context: finding the user)",
    ),
    (
        "user_layers_1 / cc_auth_layers_keyed",
        "user_layers_1",
        "cc_auth_layers_keyed",
        "(context: finding the user)",
    ),
    (
        "cc_auth_layer_keyed / cc_auth_layer",
        "cc_auth_layer_keyed",
        "cc_auth_layer",
        "(context: the key in the request)",
    ),
    (
        "cc_auth_layers / cc_auth_layer",
        "cc_auth_layers",
        "cc_auth_layer",
        "(context)",
    ),
    (
        "user_100k_spread / cc_auth_layer",
        "user_100k_spread",
        "cc_auth_layer",
        "(context: a cold entry each call)",
    ),
    (
        "user_100k_spread / user_1",
        "user_100k_spread",
        "user_1",
        "(context)",
    ),
];

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let rounds = argv
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|at| argv.get(at + 1))
        .and_then(|r| r.parse::<usize>().ok())
        .unwrap_or(400)
        .max(1);
    let per_round = argv.iter().any(|a| a == "--per-round");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Inside a runtime context, as in an application (tokio's clock reads its context).
    let _guard = rt.enter();
    let uri = Uri::from_static(PATH);

    let scope = Scope::new([Uri::from_static(API)]).expect("valid scope");
    let auth = GenesysAuth::from_source(Fixed, CacheConfig::default(), scope);
    rt.block_on(auth.token()).expect("token");

    let token_calls = Arc::new(AtomicUsize::new(0));
    let one = users(1, &token_calls, None);
    let many = users(USERS, &token_calls, None);
    // A fleet's cache (its users in a shared store; `MemoryStore` here): a hit is served in
    // process, by the same code.
    let fleet = users(1, &token_calls, Some(Arc::new(MemoryStore::new())));
    let one_key = session_id(0);
    let same_key = session_id(USERS / 2);
    let spread = shuffled_keys(USERS);

    let mut callers: Vec<(&str, Caller)> = Vec::new();
    {
        let mut svc = ServiceBuilder::new().layer(auth.layer()).service(inner());
        let uri = uri.clone();
        callers.push((
            "cc_auth_layer",
            Box::new(move |cx| one_call(&mut svc, request(&uri), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(auth.layers()).service(inner());
        let uri = uri.clone();
        callers.push((
            "cc_auth_layers",
            Box::new(move |cx| one_call(&mut svc, request(&uri), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(auth.layer()).service(inner());
        let (uri, key) = (uri.clone(), one_key.clone());
        callers.push((
            "cc_auth_layer_keyed",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(auth.layers()).service(inner());
        let (uri, key) = (uri.clone(), one_key.clone());
        callers.push((
            "cc_auth_layers_keyed",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(one.layers()).service(inner());
        let (uri, key) = (uri.clone(), one_key.clone());
        callers.push((
            "user_layers_1",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(fleet.layer()).service(inner());
        let (uri, key) = (uri.clone(), one_key.clone());
        callers.push((
            "user_1_store",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(one.layer()).service(inner());
        let (uri, key) = (uri.clone(), one_key);
        callers.push((
            "user_1",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(many.layer()).service(inner());
        let (uri, key) = (uri.clone(), same_key);
        callers.push((
            "user_100k_same",
            Box::new(move |cx| one_call(&mut svc, user_request(&uri, &key), cx)),
        ));
    }
    {
        let mut svc = ServiceBuilder::new().layer(many.layer()).service(inner());
        let uri = uri.clone();
        let mut next = 0;
        callers.push((
            "user_100k_spread",
            Box::new(move |cx| {
                let key = &spread[next];
                next = if next + 1 == spread.len() {
                    0
                } else {
                    next + 1
                };
                one_call(&mut svc, user_request(&uri, key), cx)
            }),
        ));
    }

    // `--only NAME`: that variant alone (for a profiler), timed the same way.
    if let Some(only) = argv
        .iter()
        .position(|a| a == "--only")
        .and_then(|at| argv.get(at + 1))
    {
        callers.retain(|(name, _)| name == only);
        assert!(!callers.is_empty(), "no variant named {only}");
    }
    let mut cx = Context::from_waker(Waker::noop());
    let n = callers.len();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); n];
    // Warm-up: every variant's code and data in the caches.
    for (_, call) in &mut callers {
        for _ in 0..BATCH {
            call(&mut cx);
        }
    }
    let started = Instant::now();
    for round in 0..rounds {
        for k in 0..n {
            let k = if round % 2 == 0 { k } else { n - 1 - k };
            let i = (round + k) % n;
            let call = &mut callers[i].1;
            let start = Instant::now();
            for _ in 0..BATCH {
                call(&mut cx);
            }
            times[i].push(start.elapsed().as_nanos() as f64 / f64::from(BATCH));
        }
    }
    let elapsed = started.elapsed();

    let calls = token_calls.load(Ordering::Relaxed);
    let refused = one.stats().refused + many.stats().refused + fleet.stats().refused;
    assert_eq!(calls, 0, "no token request during the run");
    assert_eq!(refused, 0, "no request refused");

    let index = |name: &str| callers.iter().position(|(n, _)| *n == name);
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let at = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!("`cargo bench -p genesys-auth-benches --bench users_cost -- --rounds {rounds}`: {rounds} rounds of {BATCH} calls per variant, interleaved ({:.1} s); {USERS} users in the big cache\n", elapsed.as_secs_f64());
    println!("| variant | ns per call: p25 | median | p75 |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, (name, _)) in callers.iter().enumerate() {
        let v = sorted(times[i].clone());
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            at(&v, 0.25),
            at(&v, 0.5),
            at(&v, 0.75)
        );
    }
    println!("\n| ratio (same round) | min | p10 | p25 | median | p75 | p90 | max | bar |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let mut per_round_lines = Vec::new();
    for (label, num, den, bar) in RATIOS {
        let (Some(x), Some(y)) = (index(num), index(den)) else {
            continue;
        };
        let ratios: Vec<f64> = times[x].iter().zip(&times[y]).map(|(a, b)| a / b).collect();
        let v = sorted(ratios.clone());
        println!(
            "| {label} | {:.3} | {:.3} | {:.3} | **{:.3}** | {:.3} | {:.3} | {:.3} | {bar} |",
            v[0],
            at(&v, 0.1),
            at(&v, 0.25),
            at(&v, 0.5),
            at(&v, 0.75),
            at(&v, 0.9),
            v[v.len() - 1]
        );
        if !bar.starts_with("(context") {
            let cells: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
            per_round_lines.push(format!("{label}: {}", cells.join(" ")));
        }
    }
    if per_round {
        println!("\nPer-round ratios, in round order:\n");
        for line in per_round_lines {
            println!("{line}\n");
        }
    }
    println!("\nToken requests during the run: {calls}; requests refused: {refused}");
}
