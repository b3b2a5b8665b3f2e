//! A fleet of replicas sharing users' tokens through a `TokenStore` (issue #16), with the
//! in-process `MemoryStore` standing for the shared store: four `UserTokenCache`s, each
//! with its own HTTP clients, against genesys-fake over loopback. The same logic runs over
//! Redis in `redis_store.rs`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use genesys_auth_layer::{
    AuthError, BoxFuture, Lease, MemoryStore, OAuthErrorCode, StoreError, StoredTokens, TokenStore,
    UserCacheConfig, UserKey, UserTokenCache,
};
use genesys_fake::FakeGenesys;
use http::Request;
use http_body_util::Full;
use tower::{BoxError, ServiceBuilder};

use common::{h2_client, log_in_user, user_grant, user_name, HttpClient};

fn replica(
    fake: &FakeGenesys,
    store: Arc<dyn TokenStore>,
    config: UserCacheConfig,
) -> UserTokenCache<HttpClient> {
    UserTokenCache::with_store(user_grant(fake), fake.api_uri(), config, store).unwrap()
}

/// Logs the fake's first user in (auto-approved) and caches her tokens under `key` on
/// `replica`; her name.
async fn log_in(fake: &FakeGenesys, replica: &UserTokenCache<HttpClient>, key: &str) -> String {
    let user = fake.users()[0].clone();
    let tokens = log_in_user(fake, &user.id).await;
    replica.insert(UserKey::new(key), tokens).await.unwrap();
    user.name
}

type Client = tower::util::BoxCloneSyncService<
    Request<Full<bytes::Bytes>>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

fn client(replica: &UserTokenCache<HttpClient>) -> Client {
    Client::new(
        ServiceBuilder::new()
            .layer(replica.layers())
            .service(h2_client()),
    )
}

/// She logs in on one replica; the other three find her in the store. After her token is
/// revoked, 4 replicas × 250 concurrent requests cost exactly one refresh fleet-wide, and
/// no replica ever sends a superseded refresh token (the fake rotates them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_refresh_a_user_once() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let replicas: Vec<_> = (0..4)
        .map(|_| replica(&fake, store.clone(), UserCacheConfig::new()))
        .collect();
    let her = log_in(&fake, &replicas[0], "session-ada").await;
    for replica in &replicas {
        assert_eq!(
            user_name(&fake.api_uri(), client(replica), "session-ada")
                .await
                .unwrap(),
            her
        );
    }
    assert_eq!(fake.refreshes(), 0, "the others adopted her stored token");

    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for replica in &replicas {
        let client = client(replica);
        for _ in 0..250 {
            let (api, client) = (fake.api_uri(), client.clone());
            tasks.push(tokio::spawn(async move {
                user_name(&api, client, "session-ada").await
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), her);
    }
    assert_eq!(fake.refreshes(), 1, "one refresh fleet-wide");
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);

    // Again: the rotated refresh token is the one every replica uses next.
    fake.revoke_all_tokens();
    for replica in replicas.iter().rev() {
        assert_eq!(
            user_name(&fake.api_uri(), client(replica), "session-ada")
                .await
                .unwrap(),
            her
        );
    }
    assert_eq!(fake.refreshes(), 2);
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}

/// Logout on one replica removes her from the store: another replica that still caches her
/// token gets a 401 (revoked), finds no stored entry, and gives the typed `invalid_grant`.
#[tokio::test]
async fn logout_on_one_replica_logs_her_out_everywhere() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let a = replica(&fake, store.clone(), UserCacheConfig::new());
    let b = replica(&fake, store.clone(), UserCacheConfig::new());
    let her = log_in(&fake, &a, "session-ada").await;
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );

    assert!(a.logout(&UserKey::new("session-ada")).await.unwrap());
    let key = UserKey::new("session-ada");
    let left = store.load(&key).await.unwrap().expect("a tombstone");
    assert!(left.refresh_token().is_none() && left.access_token().is_empty());
    let err = user_name(&fake.api_uri(), client(&b), "session-ada")
        .await
        .unwrap_err();
    let auth = err.downcast_ref::<AuthError>().expect("an AuthError");
    assert_eq!(
        auth.oauth_code(),
        Some(&OAuthErrorCode::InvalidGrant),
        "{auth}"
    );
    assert_eq!(fake.refreshes(), 0, "nothing sent");
}

/// A store that can be switched off (Redis down), around a `MemoryStore`.
#[derive(Default)]
struct Switchable {
    store: MemoryStore,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::unavailable("the store is down (test)"))
        } else {
            Ok(())
        }
    }
}

impl TokenStore for Switchable {
    fn load<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<StoredTokens>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.store.load(key).await
        })
    }
    fn save<'a>(
        &'a self,
        key: &'a UserKey,
        tokens: &'a StoredTokens,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.store.save(key, tokens, ttl).await
        })
    }
    fn remove<'a>(&'a self, key: &'a UserKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.store.remove(key).await
        })
    }
    fn try_lease<'a>(
        &'a self,
        key: &'a UserKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.store.try_lease(key, ttl).await
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a UserKey,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.store.release(key, lease).await
        })
    }
}

/// The store down: cached tokens keep serving every replica; a refresh does not run blind
/// (no request to the token endpoint) and fails with the store's typed error after the
/// bound; once the store is back, the fleet refreshes by itself.
#[tokio::test]
async fn with_the_store_down_tokens_serve_and_no_refresh_runs_blind() {
    let fake = FakeGenesys::start().await.unwrap();
    let switch = Arc::new(Switchable::default());
    let store: Arc<dyn TokenStore> = switch.clone();
    let config = UserCacheConfig::new().store_wait(Duration::from_millis(300));
    let a = replica(&fake, store.clone(), config.clone());
    let b = replica(&fake, store.clone(), config);
    let her = log_in(&fake, &a, "session-ada").await;
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );

    switch.down.store(true, Ordering::SeqCst);
    for replica in [&a, &b] {
        for _ in 0..20 {
            assert_eq!(
                user_name(&fake.api_uri(), client(replica), "session-ada")
                    .await
                    .unwrap(),
                her
            );
        }
    }
    fake.revoke_all_tokens();
    let before = fake.token_requests();
    let err = user_name(&fake.api_uri(), client(&a), "session-ada")
        .await
        .unwrap_err();
    let auth = err.downcast_ref::<AuthError>().expect("an AuthError");
    let cause = std::error::Error::source(auth).expect("the store's error");
    assert!(
        cause.downcast_ref::<StoreError>().is_some(),
        "{auth}: {cause}"
    );
    assert_eq!(
        fake.token_requests(),
        before,
        "no refresh without the lease"
    );

    switch.down.store(false, Ordering::SeqCst);
    // The failed refresh left a backoff; past it, the next request refreshes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ok = false;
    for _ in 0..40 {
        if user_name(&fake.api_uri(), client(&a), "session-ada")
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ok, "the fleet recovered once the store was back");
    assert_eq!(fake.refreshes(), 1);
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );
    assert_eq!(fake.refreshes(), 1, "the other replica adopted it");
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}

/// A replica that took the lease and died: its lease expires and the next replica
/// refreshes.
#[tokio::test]
async fn a_dead_holders_lease_expires() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let a = replica(&fake, store.clone(), UserCacheConfig::new());
    let her = log_in(&fake, &a, "session-ada").await;
    fake.revoke_all_tokens();
    let key = UserKey::new("session-ada");
    let dead = store
        .try_lease(&key, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(dead.is_some(), "the dead replica's lease");

    let started = std::time::Instant::now();
    assert_eq!(
        user_name(&fake.api_uri(), client(&a), "session-ada")
            .await
            .unwrap(),
        her
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited for the lease"
    );
    assert_eq!(fake.refreshes(), 1);
}

/// Logout on a replica whose token is older than the fleet's newest (another replica
/// refreshed since): both tokens are revoked, so the other replica stops serving her at once.
#[tokio::test]
async fn logout_revokes_the_fleets_newest_token_too() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let a = replica(&fake, store.clone(), UserCacheConfig::new());
    let b = replica(&fake, store.clone(), UserCacheConfig::new());
    let her = log_in(&fake, &a, "session-ada").await;
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );
    // B refreshes (its token revoked behind its back); A still caches the old one.
    fake.revoke_all_tokens();
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );
    let key = UserKey::new("session-ada");
    let newest = b.token_cache(&key).unwrap().current().unwrap();
    let newest = newest
        .header()
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    assert!(fake.token_is_valid(&newest));

    assert!(a.logout(&key).await.unwrap());
    assert!(
        !fake.token_is_valid(&newest),
        "the fleet's newest token was revoked too"
    );
    let err = user_name(&fake.api_uri(), client(&b), "session-ada")
        .await
        .unwrap_err();
    let auth = err.downcast_ref::<AuthError>().expect("an AuthError");
    assert_eq!(
        auth.oauth_code(),
        Some(&OAuthErrorCode::InvalidGrant),
        "{auth}"
    );
}

/// A request for a user this replica does not know yet waits for the store without
/// holding the capacity of the service below (a concurrency limit of 1 here): it does not
/// hang, and the next request goes too.
#[tokio::test]
async fn loading_a_user_holds_no_capacity_below() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let a = replica(&fake, store.clone(), UserCacheConfig::new());
    let b = replica(&fake, store.clone(), UserCacheConfig::new());
    let her = log_in(&fake, &a, "session-ada").await;
    let limited = Client::new(
        ServiceBuilder::new()
            .layer(b.layers())
            .concurrency_limit(1)
            .service(h2_client()),
    );
    for _ in 0..3 {
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            user_name(&fake.api_uri(), limited.clone(), "session-ada"),
        )
        .await
        .expect("no hang");
        assert_eq!(got.unwrap(), her);
    }
}

/// Logout while another replica's refresh is in flight (a slow token endpoint): the
/// tombstone is written after that refresh's save, under her lease, so the refresh cannot
/// bring her back; the other replica's next requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_is_not_undone_by_a_refresh_in_flight() {
    let fake = FakeGenesys::start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let a = replica(&fake, store.clone(), UserCacheConfig::new());
    let b = replica(&fake, store.clone(), UserCacheConfig::new());
    let her = log_in(&fake, &a, "session-ada").await;
    assert_eq!(
        user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .unwrap(),
        her
    );

    fake.revoke_all_tokens();
    fake.set_token_latency(Duration::from_secs(2));
    let sent = fake.token_requests();
    let refreshing = tokio::spawn({
        let (api, client) = (fake.api_uri(), client(&b));
        async move { user_name(&api, client, "session-ada").await }
    });
    // B's refresh holds the lease and waits for the token endpoint (which counts a request
    // when it arrives, then waits its latency).
    let key = UserKey::new("session-ada");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fake.token_requests() == sent {
        assert!(
            std::time::Instant::now() < deadline,
            "B's refresh never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store
        .try_lease(&key, Duration::from_secs(1))
        .await
        .unwrap()
        .is_none());
    a.logout(&key).await.unwrap();
    let _ = refreshing.await.unwrap();
    fake.set_token_latency(Duration::ZERO);

    let left = store.load(&key).await.unwrap().expect("an entry");
    assert!(
        left.refresh_token().is_none(),
        "a tombstone, not the refresh's save"
    );
    // B's token from that refresh was revoked too (the fleet's newest at logout, or hers);
    // either way B refuses her now.
    let mut refused = false;
    for _ in 0..3 {
        if user_name(&fake.api_uri(), client(&b), "session-ada")
            .await
            .is_err()
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "she stays logged out on B");
}
