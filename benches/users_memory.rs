//! What a `UserTokenCache` costs in memory: 100,000 users cached, measured (issue #15's
//! bar: ≤ 100 MiB, about 1 KiB an entry).
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench users_memory              # 100,000 users
//! cargo bench -p genesys-auth-benches --bench users_memory -- --smoke   # 10,000 users (CI)
//! cargo bench -p genesys-auth-benches --bench users_memory -- --users 50000 --token-len 200
//! ```
//!
//! The global allocator is `stats_alloc`'s counting wrapper of the system allocator: live
//! heap bytes are the bytes allocated minus the bytes freed (the sizes the program asked
//! for; the allocator's own per-block overhead, about 8–16 bytes a block with glibc, is
//! not in them, so the allocation count is printed too). VmRSS from `/proc/self/status`
//! before and after is printed as a cross-check: it includes that overhead, and pages the
//! allocator keeps.
//!
//! Each user is what a login leaves: a 32-character session id as the `UserKey`, an access
//! token and a refresh token of `--token-len` characters each (default 90: GENESYS.md does
//! not give their length; Genesys access tokens seen in the wild are 80-odd base64url
//! characters, so 90 is a guess on the generous side), inserted with
//! `UserTokenCache::insert` into a cache whose grant holds the crate's default HTTPS client,
//! as an application's would. The strings are built at their exact length, as a JSON parser
//! would leave them. Exits with status 1 if the users cost more than the bar, scaled to
//! their number (100 MiB per 100,000).

use std::time::{Duration, Instant};

use bytes::Bytes;
use genesys_auth_layer::default_client::{https_client, HttpsClient};
use genesys_auth_layer::{
    Credentials, IssuedToken, RefreshToken, UserCacheConfig, UserGrant, UserKey, UserTokenCache,
    UserTokens,
};
use http::Uri;
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

// A counting wrapper around the system allocator, from a crate: implementing `GlobalAlloc`
// takes `unsafe impl`, which the workspace forbids.
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The issue's bar: 100 MiB for 100,000 users.
const BAR_BYTES_PER_100K: f64 = 100.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

type Client = HttpsClient<Full<Bytes>>;

/// Live heap bytes and allocation count since `region` started.
fn live(region: &Region<'_, std::alloc::System>) -> (i64, i64) {
    let change = region.change();
    let bytes = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let blocks = change.allocations as i64 - change.deallocations as i64;
    (bytes, blocks)
}

/// Live heap bytes and blocks that what `make` returns keeps (it is dropped after).
fn measure<T>(make: impl FnOnce() -> T) -> (i64, i64) {
    let region = Region::new(GLOBAL);
    let kept = make();
    let measured = live(&region);
    drop(kept);
    measured
}

/// VmRSS in bytes, if `/proc/self/status` has it.
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A small deterministic generator (xorshift64*): distinct, well-spread keys and tokens.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `len` characters of `alphabet`, in a string of exactly that capacity.
    fn string(&mut self, len: usize, alphabet: &[u8]) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            let mut word = self.next();
            for _ in 0..8 {
                if s.len() == len {
                    break;
                }
                s.push(char::from(
                    alphabet[(word % alphabet.len() as u64) as usize],
                ));
                word /= alphabet.len() as u64;
            }
        }
        s
    }
}

const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const HEX: &[u8] = b"0123456789abcdef";

/// One login's tokens: an access token valid for a day, and a refresh token.
fn tokens(random: &mut Random, token_len: usize) -> UserTokens {
    let access = random.string(token_len, BASE64URL);
    let access = IssuedToken::bearer(&access, Duration::from_secs(86_399)).expect("a valid token");
    let refresh = RefreshToken::new(random.string(token_len, BASE64URL));
    UserTokens::new(access, Some(refresh), tokio::time::Instant::now())
}

struct Args {
    users: usize,
    token_len: usize,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|at| argv.get(at + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let smoke = argv.iter().any(|a| a == "--smoke");
    Args {
        users: value("--users").unwrap_or(if smoke { 10_000 } else { 100_000 }),
        token_len: value("--token-len").unwrap_or(90),
    }
}

fn main() {
    let Args {
        users: n,
        token_len,
    } = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let creds = Credentials::new("bench-client-id", "bench-client-secret").expect("credentials");
    let grant: UserGrant<Client> = UserGrant::confidential(
        https_client(),
        Uri::from_static("http://127.0.0.1:9/oauth/token"),
        creds,
    )
    .expect("grant");
    let api = Uri::from_static("https://api.mypurecloud.com");
    let mut random = Random(0x9E37_79B9_7F4A_7C15);

    // The parts of one entry that come from outside, each measured alone (the rest of an
    // entry is given by difference).
    let key_bytes = measure(|| UserKey::new(random.string(32, HEX)));
    let tokens_bytes = measure(|| tokens(&mut Random(7), token_len));

    let cache = UserTokenCache::new(grant.clone(), api, UserCacheConfig::new()).expect("cache");
    // Warm what a first insert sets up once (the collector's thread state, the runtime's).
    rt.block_on(cache.insert(UserKey::new("warm-up"), tokens(&mut random, token_len)))
        .expect("insert");
    cache.remove(&UserKey::new("warm-up"));

    let rss_before = rss();
    let region = Region::new(GLOBAL);
    let started = Instant::now();
    for _ in 0..n {
        let key = UserKey::new(random.string(32, HEX));
        rt.block_on(cache.insert(key, tokens(&mut random, token_len)))
            .expect("insert");
    }
    let elapsed = started.elapsed();
    let (bytes, blocks) = live(&region);
    let rss_after = rss();
    assert_eq!(cache.len(), n, "every user cached");

    let per_user = bytes as f64 / n as f64;
    let per_100k = per_user * 100_000.0;
    let bar = BAR_BYTES_PER_100K * n as f64 / 100_000.0;
    println!(
        "`cargo bench -p genesys-auth-benches --bench users_memory{}`: {n} users, session ids of 32 characters, access and refresh tokens of {token_len} characters\n",
        if n == 100_000 && token_len == 90 {
            String::new()
        } else {
            format!(" -- --users {n} --token-len {token_len}")
        }
    );
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| live heap bytes after − before (`stats_alloc`) | {bytes} ({:.2} MiB) |",
        bytes as f64 / MIB
    );
    println!(
        "| live heap blocks after − before | {blocks} ({:.1} a user) |",
        blocks as f64 / n as f64
    );
    println!(
        "| **bytes a user** | **{per_user:.0}** ({:.2} KiB) |",
        per_user / 1024.0
    );
    println!(
        "| **MiB per 100,000 users** | **{:.2}** (bar ≤ 100) |",
        per_100k / MIB
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "| VmRSS before → after | {:.1} → {:.1} MiB (+{:.2} MiB, {:.0} bytes a user) |",
            before as f64 / MIB,
            after as f64 / MIB,
            (after as f64 - before as f64) / MIB,
            (after as f64 - before as f64) / n as f64
        );
    }
    println!("| time to insert | {:.0} ms |", elapsed.as_secs_f64() * 1e3);
    println!();
    println!("Where one user's bytes go (each piece measured alone, live heap bytes / blocks):\n");
    println!("| piece | bytes | blocks |");
    println!("| --- | ---: | ---: |");
    println!(
        "| `UserKey` (32-character session id, `Arc<str>`) | {} | {} |",
        key_bytes.0, key_bytes.1
    );
    println!(
        "| `UserTokens` as a login returns them (access header + refresh token) | {} | {} |",
        tokens_bytes.0, tokens_bytes.1
    );
    // Every user shares the grant (with its HTTP client), the cache configuration and the
    // counters of the `UserTokenCache`; what is left is hers alone.
    let entry = per_user - (key_bytes.0 + tokens_bytes.0) as f64;
    println!(
        "| the entry, by difference: her `TokenCache` (token cell, lock and slow-path state), her `RefreshTokenSource` (its refresh-token slot; the grant is shared), the seeded `Arc<Token>`, the entry's `Arc<Shared>`, the map's node and slot | {entry:.0} | |"
    );
    println!();
    let met = per_100k <= BAR_BYTES_PER_100K;
    println!(
        "Bar: {n} users cost {:.2} MiB, {:.2} MiB per 100,000 (≤ 100 MiB): {}",
        bytes as f64 / MIB,
        per_100k / MIB,
        if met { "met" } else { "NOT met" }
    );
    drop(cache);
    if bytes as f64 > bar {
        std::process::exit(1);
    }
}
