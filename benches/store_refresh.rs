//! What a shared `TokenStore` adds to a user's refresh (issue #16's benchmark row): the
//! store round trips a refresh makes under the fleet's single flight (take the lease, read
//! the entry, save the new one, release the lease), for `MemoryStore` and for `RedisStore`
//! on a local `redis-server`. A cache hit never touches the store: `users_cost`'s
//! `user_1_store` row measures that.
//!
//! ```text
//! cargo bench -p genesys-auth-benches --bench store_refresh            # 2,000 refreshes' round trips per store
//! cargo bench -p genesys-auth-benches --bench store_refresh -- --smoke  # 200
//! ```
//!
//! The Redis row needs `redis-server` (Debian's package): the bench starts one on a free
//! loopback port and stops it; without it, the row says so and the bench still succeeds.

#![allow(missing_docs)] // a bench binary

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use genesys_auth_layer::{
    EncryptionKey, HashKey, MemoryStore, RedisStore, RefreshToken, StoredTokens, TokenStore,
    UserKey,
};

/// A `redis-server` on a free loopback port, stopped on drop.
struct Server(Child, u16);

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Self(child, port))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One refresh's store round trips; panics if the store fails (a bench, not a test).
async fn refresh_round_trips(store: &dyn TokenStore, key: &UserKey, version: u64) {
    let ttl = Duration::from_secs(600);
    let lease = store
        .try_lease(key, Duration::from_secs(15))
        .await
        .expect("lease")
        .expect("free");
    let stored = store.load(key).await.expect("load").expect("stored");
    let next = StoredTokens::new(
        format!("access-token-{version:080}"),
        SystemTime::now() + Duration::from_secs(3600),
        Some(RefreshToken::new(format!("refresh-token-{version:080}"))),
        stored.version() + 1,
    );
    store.save(key, &next, ttl).await.expect("save");
    store.release(key, &lease).await.expect("release");
}

/// The median and 99th percentile of `n` refreshes' round trips, in microseconds.
async fn measure(store: &dyn TokenStore, n: usize) -> (f64, f64) {
    let key = UserKey::new("session-0123456789abcdef0123456789abcdef");
    let first = StoredTokens::new("a", SystemTime::now(), Some(RefreshToken::new("r")), 1);
    store
        .save(&key, &first, Duration::from_secs(600))
        .await
        .expect("save");
    for v in 0..50 {
        refresh_round_trips(store, &key, v).await;
    }
    let mut times = Vec::with_capacity(n);
    for v in 0..n {
        let start = Instant::now();
        refresh_round_trips(store, &key, v as u64).await;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    (times[n / 2], times[(n * 99) / 100])
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let n = if smoke { 200 } else { 2_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "`cargo bench -p genesys-auth-benches --bench store_refresh{}`: the store round trips of {n} refreshes (lease, load, save, release), one after the other\n",
        if smoke { " -- --smoke" } else { "" }
    );
    println!("| store | per refresh: median | p99 |");
    println!("| --- | ---: | ---: |");
    let memory = MemoryStore::new();
    let (p50, p99) = rt.block_on(measure(&memory, n));
    println!("| `MemoryStore` | {p50:.1} µs | {p99:.1} µs |");
    let Some(server) = Server::start() else {
        println!("| `RedisStore` | redis-server not installed (apt-get install -y redis-server): skipped | |");
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", server.1);
    let store = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connected = RedisStore::builder(url.clone())
                .encryption_key(EncryptionKey::new(1, [7; 32]))
                .hash_key(HashKey::new([9; 32]))
                .connect()
                .await;
            match connected {
                Ok(store) if store.load(&UserKey::new("ping")).await.is_ok() => break store,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(_) | Err(_) => panic!("redis-server did not come up"),
            }
        }
    });
    let store: Arc<dyn TokenStore> = Arc::new(store);
    let (p50, p99) = rt.block_on(measure(store.as_ref(), n));
    println!("| `RedisStore` (local redis-server, encrypted values) | {p50:.1} µs | {p99:.1} µs |");
    drop(server);
}
