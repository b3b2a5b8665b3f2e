//! `RedisStore` (feature `redis`) against a real `redis-server` on a free loopback port.
//!
//! Every test is `#[ignore]`d, so that `cargo test --workspace` passes on a machine without
//! Redis; `.ci/run` installs Debian's `redis-server` when it is missing and runs them:
//!
//! ```text
//! apt-get install -y redis-server
//! cargo test -p genesys-auth-suite --test redis_store -- --ignored
//! ```
//!
//! Run on a machine without `redis-server`, each test fails with a message naming the apt
//! package. Waits are on conditions with generous bounds, never a sleep then an assertion.

#[path = "common/redis_server.rs"]
mod redis_server;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use genesys_auth_layer::{
    EncryptionKey, HashKey, RedisStore, RefreshToken, StoreError, StoredTokens, TokenStore, UserKey,
};
use redis::aio::MultiplexedConnection;
use redis_server::RedisServer;

/// A bound for conditions that should hold soon, for a busy machine.
const SOON: Duration = Duration::from_secs(20);

fn key(id: u32) -> EncryptionKey {
    EncryptionKey::new(id, [id as u8; 32])
}

fn hash_key() -> HashKey {
    HashKey::new([0x42; 32])
}

async fn connect(server: &RedisServer) -> RedisStore {
    connect_with(server, key(1), &[]).await
}

async fn connect_with(server: &RedisServer, current: EncryptionKey, old: &[u32]) -> RedisStore {
    old.iter()
        .fold(RedisStore::builder(server.url()), |builder, &id| {
            builder.old_key(key(id))
        })
        .encryption_key(current)
        .hash_key(hash_key())
        .connect()
        .await
        .expect("connect to redis-server")
}

fn tokens(user: &str, version: u64) -> StoredTokens {
    StoredTokens::new(
        format!("ACCESS-{user}-{version}"),
        SystemTime::now() + Duration::from_secs(3600),
        Some(RefreshToken::new(format!("REFRESH-{user}-{version}"))),
        version,
    )
}

/// A plain client, to look at (and tamper with) what the store wrote.
async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn all_keys(connection: &mut MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(connection)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Polls `check` until it is true, failing after [`SOON`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < SOON, "not within {SOON:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn tokens_round_trip_and_are_removed() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let alice = UserKey::new("alice@example.com");
    assert!(store.load(&alice).await.unwrap().is_none());

    let saved = tokens("alice", 3);
    store
        .save(&alice, &saved, Duration::from_secs(600))
        .await
        .unwrap();
    let loaded = store.load(&alice).await.unwrap().expect("saved");
    assert_eq!(loaded.access_token(), saved.access_token());
    assert_eq!(loaded.expires_at(), saved.expires_at());
    assert_eq!(
        loaded.refresh_token().map(RefreshToken::expose_secret),
        Some("REFRESH-alice-3")
    );
    assert_eq!(loaded.version(), 3);

    // A user without a refresh token; a save replaces.
    let bare = StoredTokens::new("ACCESS-bare", SystemTime::UNIX_EPOCH, None, 4);
    store
        .save(&alice, &bare, Duration::from_secs(600))
        .await
        .unwrap();
    let loaded = store.load(&alice).await.unwrap().expect("saved");
    assert!(loaded.refresh_token().is_none());
    assert_eq!(loaded.expires_at(), SystemTime::UNIX_EPOCH);
    assert_eq!(loaded.version(), 4);

    // Another replica (its own connection) sees it; `remove` takes the lease too.
    let replica = connect(&server).await;
    assert_eq!(replica.load(&alice).await.unwrap().unwrap().version(), 4);
    let lease_ttl = Duration::from_secs(600);
    assert!(store.try_lease(&alice, lease_ttl).await.unwrap().is_some());
    replica.remove(&alice).await.unwrap();
    assert!(store.load(&alice).await.unwrap().is_none());
    assert!(all_keys(&mut raw(&server).await).await.is_empty());
    assert!(store.try_lease(&alice, lease_ttl).await.unwrap().is_some());
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn entries_expire_with_their_ttl() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let mut redis = raw(&server).await;
    let long = UserKey::new("long");
    let short = UserKey::new("short");
    store
        .save(&long, &tokens("long", 1), Duration::from_secs(3600))
        .await
        .unwrap();
    let [key] = <[String; 1]>::try_from(all_keys(&mut redis).await).unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (3_000_000..=3_600_000).contains(&pttl),
        "PX is the ttl: {pttl}"
    );

    store
        .save(&short, &tokens("short", 1), Duration::from_millis(300))
        .await
        .unwrap();
    eventually("the short entry expires", || async {
        store.load(&short).await.unwrap().is_none()
    })
    .await;
    assert!(store.load(&long).await.unwrap().is_some());
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn a_lease_is_exclusive_released_by_its_owner_only_and_expires() {
    let server = RedisServer::start();
    let (a, b) = (connect(&server).await, connect(&server).await);
    let user = UserKey::new("carol");
    let ttl = Duration::from_secs(600);

    let first = a.try_lease(&user, ttl).await.unwrap().expect("free");
    assert!(a.try_lease(&user, ttl).await.unwrap().is_none(), "held");
    assert!(
        b.try_lease(&user, ttl).await.unwrap().is_none(),
        "held fleet-wide"
    );
    // Leases are per user.
    assert!(b
        .try_lease(&UserKey::new("dave"), ttl)
        .await
        .unwrap()
        .is_some());

    // Nobody but its owner releases it.
    let stranger = genesys_auth_layer::Lease::random().unwrap();
    b.release(&user, &stranger).await.unwrap();
    assert!(b.try_lease(&user, ttl).await.unwrap().is_none());
    b.release(&user, &first).await.unwrap();
    let second = b
        .try_lease(&user, Duration::from_millis(300))
        .await
        .unwrap();
    let second = second.expect("released by its owner");
    assert_ne!(first, second);

    // A holder that died: its lease expires and the next replica takes it.
    let started = Instant::now();
    let third = loop {
        if let Some(lease) = a.try_lease(&user, ttl).await.unwrap() {
            break lease;
        }
        assert!(
            started.elapsed() < SOON,
            "the dead holder's lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The late holder's release does not free its successor's lease.
    a.release(&user, &second).await.unwrap();
    assert!(b.try_lease(&user, ttl).await.unwrap().is_none());
    a.release(&user, &third).await.unwrap();
    assert!(b.try_lease(&user, ttl).await.unwrap().is_some());
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn a_value_moved_to_another_users_key_or_garbage_is_unreadable() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let mut redis = raw(&server).await;
    let (alice, bob) = (UserKey::new("alice"), UserKey::new("bob"));
    let ttl = Duration::from_secs(600);
    store.save(&alice, &tokens("alice", 1), ttl).await.unwrap();
    let alices_key = all_keys(&mut redis).await.remove(0);
    store.save(&bob, &tokens("bob", 1), ttl).await.unwrap();
    let bobs_key = all_keys(&mut redis)
        .await
        .into_iter()
        .find(|key| *key != alices_key)
        .unwrap();

    let alices_value: Vec<u8> = redis::cmd("GET")
        .arg(&alices_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let set = |key: &str, value: &[u8]| redis::cmd("SET").arg(key).arg(value).clone();
    let _: () = set(&bobs_key, &alices_value)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(matches!(
        store.load(&bob).await,
        Err(StoreError::Unreadable)
    ));
    // Alice's own value still reads.
    assert_eq!(
        store.load(&alice).await.unwrap().unwrap().access_token(),
        "ACCESS-alice-1"
    );

    // Hostile values under Bob's key: never a panic, always Unreadable.
    let mut flipped = alices_value.clone();
    *flipped.last_mut().unwrap() ^= 1;
    for garbage in [&b""[..], b"garbage", &[1; 4096], &flipped] {
        let _: () = set(&bobs_key, garbage)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(matches!(
            store.load(&bob).await,
            Err(StoreError::Unreadable)
        ));
    }
    // A key of another type where a value should be.
    let _: () = redis::cmd("DEL")
        .arg(&bobs_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg(&bobs_key)
        .arg("x")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(matches!(
        store.load(&bob).await,
        Err(StoreError::Unreadable)
    ));
    // A save replaces it.
    store.save(&bob, &tokens("bob", 2), ttl).await.unwrap();
    assert_eq!(store.load(&bob).await.unwrap().unwrap().version(), 2);
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn an_old_key_still_reads_after_rotation_a_removed_one_does_not() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(600);
    let (alice, bob) = (UserKey::new("alice"), UserKey::new("bob"));
    let before = connect_with(&server, key(1), &[]).await;
    let rotating = connect_with(&server, key(2), &[1]).await;
    let after = connect_with(&server, key(2), &[]).await;

    before.save(&alice, &tokens("alice", 1), ttl).await.unwrap();
    assert_eq!(
        rotating.load(&alice).await.unwrap().unwrap().access_token(),
        "ACCESS-alice-1"
    );
    assert!(matches!(
        after.load(&alice).await,
        Err(StoreError::Unreadable)
    ));

    rotating.save(&bob, &tokens("bob", 1), ttl).await.unwrap();
    assert_eq!(after.load(&bob).await.unwrap().unwrap().version(), 1);
    assert!(matches!(
        before.load(&bob).await,
        Err(StoreError::Unreadable)
    ));

    // Another prefix is another namespace.
    let elsewhere = RedisStore::builder(server.url())
        .encryption_key(key(2))
        .old_key(key(1))
        .hash_key(hash_key())
        .prefix("other-app")
        .connect()
        .await
        .unwrap();
    assert!(elsewhere.load(&alice).await.unwrap().is_none());
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn redis_holds_no_token_refresh_token_or_user_key_in_clear() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let users = ["alice@example.com", "bob-1234", "user:carol"];
    for user in users {
        let key = UserKey::new(user);
        store
            .save(&key, &tokens(user, 1), Duration::from_secs(600))
            .await
            .unwrap();
        assert!(store
            .try_lease(&key, Duration::from_secs(600))
            .await
            .unwrap()
            .is_some());
    }

    let mut redis = raw(&server).await;
    let keys = all_keys(&mut redis).await;
    assert_eq!(keys.len(), 2 * users.len(), "{keys:?}");
    let mut secrets: Vec<String> = vec!["ACCESS".into(), "REFRESH".into()];
    for user in users {
        secrets.push(user.to_owned());
        secrets.push(format!("ACCESS-{user}-1"));
        secrets.push(format!("REFRESH-{user}-1"));
    }
    secrets.extend(["alice", "bob", "carol", "example"].map(String::from));
    for key in &keys {
        let (kind, hex) = key
            .strip_prefix("genesys-auth:")
            .and_then(|rest| rest.split_once(':'))
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        assert!(kind == "tok" || kind == "lease", "{key}");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{key}"
        );
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let value = String::from_utf8_lossy(&value).to_lowercase();
        for secret in &secrets {
            let secret = secret.to_lowercase();
            assert!(!key.to_lowercase().contains(&secret), "{secret} in {key}");
            assert!(!value.contains(&secret), "{secret} in the value of {key}");
        }
    }
}

/// `Unavailable` within the command timeout (plus slack for a busy machine), never a hang.
async fn unavailable_in_time<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) {
    let started = Instant::now();
    let result = call.await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{what}: {result:?}"
    );
    assert!(
        took < timeout + Duration::from_secs(3),
        "{what} took {took:?}"
    );
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn redis_down_is_unavailable_in_time_and_the_store_reconnects_when_it_returns() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::builder(server.url())
        .encryption_key(key(1))
        .hash_key(hash_key())
        .command_timeout(timeout)
        .connect()
        .await
        .unwrap();
    // A replica with a long timeout: a dead Redis refuses connections, so it need not
    // wait the timeout out to learn it.
    let patient = RedisStore::builder(server.url())
        .encryption_key(key(1))
        .hash_key(hash_key())
        .command_timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let alice = UserKey::new("alice");
    let ttl = Duration::from_secs(600);
    store.save(&alice, &tokens("alice", 1), ttl).await.unwrap();

    // Frozen: the connection stays open and nothing answers, so only the timeout helps.
    server.pause();
    unavailable_in_time("load, frozen", timeout, store.load(&alice)).await;
    unavailable_in_time("try_lease, frozen", timeout, store.try_lease(&alice, ttl)).await;
    server.resume();
    eventually("the thawed server answers again", || async {
        store.load(&alice).await.is_ok()
    })
    .await;
    assert_eq!(store.load(&alice).await.unwrap().unwrap().version(), 1);

    // Killed: every command fails in time, over and over (no reconnect loop that hangs).
    server.kill();
    let lease = genesys_auth_layer::Lease::random().unwrap();
    for _ in 0..3 {
        unavailable_in_time("load", timeout, store.load(&alice)).await;
        unavailable_in_time(
            "save",
            timeout,
            store.save(&alice, &tokens("alice", 2), ttl),
        )
        .await;
        unavailable_in_time("remove", timeout, store.remove(&alice)).await;
        unavailable_in_time("try_lease", timeout, store.try_lease(&alice, ttl)).await;
        unavailable_in_time("release", timeout, store.release(&alice, &lease)).await;
        // Well under its 60 s: a refused connection fails the command at once.
        unavailable_in_time("load, long timeout", timeout, patient.load(&alice)).await;
    }

    // Back on the same port (empty: no persistence): the store reconnects by itself.
    server.restart();
    eventually("the store reconnects", || async {
        store.load(&alice).await.is_ok()
    })
    .await;
    assert!(store.load(&alice).await.unwrap().is_none());
    store.save(&alice, &tokens("alice", 3), ttl).await.unwrap();
    assert_eq!(store.load(&alice).await.unwrap().unwrap().version(), 3);
    let held = store.try_lease(&alice, ttl).await.unwrap().expect("free");
    // The release script is loaded again on the new server (NOSCRIPT, then SCRIPT LOAD).
    store.release(&alice, &held).await.unwrap();
    assert!(store.try_lease(&alice, ttl).await.unwrap().is_some());
}

#[tokio::test]
#[ignore = "needs redis-server; .ci/run runs it with `-- --ignored`"]
async fn connecting_to_no_redis_is_unavailable_in_time() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let timeout = Duration::from_millis(500);
    unavailable_in_time(
        "connect",
        timeout,
        RedisStore::builder(url)
            .encryption_key(key(1))
            .hash_key(hash_key())
            .command_timeout(timeout)
            .connect(),
    )
    .await;
}
