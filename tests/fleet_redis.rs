//! Issue #16's bars over a real `redis-server`: four replicas, each a `UserTokenCache` with
//! its own `RedisStore` connection, against genesys-fake over loopback.
//!
//! Every test is `#[ignore]`d, like `redis_store.rs`, so that `cargo test --workspace`
//! passes on a machine without `redis-server`; `.ci/run` installs it and runs them with
//! `-- --ignored`. Run on a machine without it, each fails with a message naming the apt
//! package.

#[path = "common/redis_server.rs"]
mod redis_server;

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use genesys_auth_layer::{
    EncryptionKey, HashKey, RedisStore, TokenStore, UserCacheConfig, UserKey, UserTokenCache,
};
use genesys_fake::FakeGenesys;
use http::Request;
use http_body_util::Full;
use redis_server::RedisServer;
use tower::{BoxError, ServiceBuilder};

use common::{h2_client, log_in_user, user_grant, user_name, HttpClient};

const KEY: &str = "session-ada-4f9c1e";

type Client = tower::util::BoxCloneSyncService<
    Request<Full<bytes::Bytes>>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

async fn replica(fake: &FakeGenesys, redis: &RedisServer) -> UserTokenCache<HttpClient> {
    let store = RedisStore::builder(redis.url())
        .encryption_key(EncryptionKey::new(1, [7; 32]))
        .hash_key(HashKey::new([9; 32]))
        .connect()
        .await
        .expect("connect to redis-server");
    let store: Arc<dyn TokenStore> = Arc::new(store);
    UserTokenCache::with_store(
        user_grant(fake),
        fake.api_uri(),
        UserCacheConfig::new(),
        store,
    )
    .unwrap()
}

fn client(replica: &UserTokenCache<HttpClient>) -> Client {
    Client::new(
        ServiceBuilder::new()
            .layer(replica.layers())
            .service(h2_client()),
    )
}

/// Logs the fake's first user in on `replica`: her (id, name).
async fn log_in(fake: &FakeGenesys, replica: &UserTokenCache<HttpClient>) -> (String, String) {
    let user = fake.users()[0].clone();
    let tokens = log_in_user(fake, &user.id).await;
    replica.insert(UserKey::new(KEY), tokens).await.unwrap();
    (user.id, user.name)
}

/// Her name from `GET /api/v2/users/me` through `client` (owned arguments: spawned).
async fn her_name(api: http::Uri, client: Client) -> Result<String, BoxError> {
    user_name(&api, client, KEY).await
}

/// Every key and value in Redis, as text.
async fn dump(redis: &RedisServer) -> Vec<(String, String)> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut pairs = Vec::new();
    for key in keys {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let value = value.unwrap_or_default();
        pairs.push((key, String::from_utf8_lossy(&value).into_owned()));
    }
    pairs
}

/// 4 replicas × 250 concurrent requests after her token was revoked: exactly one refresh
/// fleet-wide, no superseded refresh token sent; and nothing in Redis shows her tokens,
/// her refresh token, her session key or her user id in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run with -- --ignored (.ci/run does)"]
async fn four_replicas_over_redis_refresh_a_user_once() {
    let redis = RedisServer::start();
    let fake = FakeGenesys::start().await.unwrap();
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(replica(&fake, &redis).await);
    }
    let (user_id, her) = log_in(&fake, &replicas[0]).await;
    for replica in &replicas {
        assert_eq!(
            her_name(fake.api_uri(), client(replica)).await.unwrap(),
            her
        );
    }

    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for replica in &replicas {
        let client = client(replica);
        for _ in 0..250 {
            tasks.push(tokio::spawn(her_name(fake.api_uri(), client.clone())));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), her);
    }
    assert_eq!(fake.refreshes(), 1, "one refresh fleet-wide");
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);

    let secrets = [
        replicas[1]
            .token_cache(&UserKey::new(KEY))
            .unwrap()
            .current()
            .unwrap()
            .header()
            .to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_owned(),
        replicas[2]
            .refresh_token(&UserKey::new(KEY))
            .await
            .unwrap()
            .expose_secret()
            .to_owned(),
        KEY.to_owned(),
        user_id,
    ];
    let pairs = dump(&redis).await;
    assert!(!pairs.is_empty());
    for (key, value) in &pairs {
        for secret in &secrets {
            assert!(!key.contains(secret.as_str()), "{key} shows a secret");
            assert!(
                !value.contains(secret.as_str()),
                "{key}'s value shows a secret"
            );
        }
    }
}

/// `redis-server` killed under load: no request fails while her token is valid. Restarted
/// (empty: no persistence in the test), the fleet's single flight resumes: after her token
/// is revoked, one refresh (the lease holder puts her back from its last refresh token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run with -- --ignored (.ci/run does)"]
async fn redis_killed_under_load_fails_no_request_and_the_fleet_resumes() {
    let mut redis = RedisServer::start();
    let fake = FakeGenesys::start().await.unwrap();
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(replica(&fake, &redis).await);
    }
    let (_, her) = log_in(&fake, &replicas[0]).await;
    let clients: Vec<Client> = replicas.iter().map(client).collect();
    for client in &clients {
        assert_eq!(her_name(fake.api_uri(), client.clone()).await.unwrap(), her);
    }

    // Load on every replica while Redis dies.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for client in &clients {
        for _ in 0..8 {
            let (client, stop, done, api, her) = (
                client.clone(),
                stop.clone(),
                done.clone(),
                fake.api_uri(),
                her.clone(),
            );
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let got = her_name(api.clone(), client.clone()).await;
                    assert_eq!(got.unwrap(), her, "a request failed with Redis down");
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while done.load(Ordering::SeqCst) < n && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(done.load(Ordering::SeqCst) >= n, "the load made progress");
        }
    };
    wait_for(200).await;
    redis.kill();
    let at_kill = done.load(Ordering::SeqCst);
    wait_for(at_kill + 1_000).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(fake.refreshes(), 0);

    redis.restart();
    fake.revoke_all_tokens();
    // The first command after the restart may still see the old connection's error; the
    // cache's backoff then passes, and the next request refreshes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match her_name(fake.api_uri(), clients[1].clone()).await {
            Ok(got) => {
                assert_eq!(got, her);
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the fleet did not resume: {e}"),
        }
    }
    let mut tasks = Vec::new();
    for client in &clients {
        for _ in 0..50 {
            tasks.push(tokio::spawn(her_name(fake.api_uri(), client.clone())));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), her);
    }
    assert_eq!(
        fake.refreshes(),
        1,
        "one refresh fleet-wide after the restart"
    );
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}
