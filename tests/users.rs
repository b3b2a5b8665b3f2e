//! Acting for users through `UserTokenCache` and its layer (issue #15, item 2), against
//! genesys-fake over loopback: each user's requests carry that user's token, a storm of
//! 401s costs one refresh per user, rotating refresh tokens are never sent twice, and
//! requests without a user are not sent.

mod common;

use std::time::Duration;

use genesys_auth_layer::{
    Credentials, IssuedToken, UserAuthError, UserCacheConfig, UserGrant, UserKey, UserTokenCache,
    UserTokens,
};
use genesys_fake::{FakeGenesys, FakeUser};
use http::Request;
use http_body_util::Full;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use common::{base, h2_client, log_in_user, user_grant, users_me, HttpClient};

fn users(fake: &FakeGenesys) -> UserTokenCache<HttpClient> {
    UserTokenCache::new(user_grant(fake), fake.api_uri(), UserCacheConfig::new()).unwrap()
}

/// Logs `user_id` in through the fake's authorize endpoint (auto-approved) and caches her
/// tokens under `key`.
async fn log_in(fake: &FakeGenesys, users: &UserTokenCache<HttpClient>, user_id: &str, key: &str) {
    let tokens = log_in_user(fake, user_id).await;
    users.insert(UserKey::new(key), tokens).await.unwrap();
}

fn me(fake: &FakeGenesys, key: Option<&str>) -> Request<Full<bytes::Bytes>> {
    let mut request = Request::get(format!("{}/api/v2/users/me", base(&fake.api_uri())))
        .body(Full::default())
        .unwrap();
    if let Some(key) = key {
        request.extensions_mut().insert(UserKey::new(key));
    }
    request
}

fn client(
    users: &UserTokenCache<HttpClient>,
) -> impl Service<
    Request<Full<bytes::Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
    Error = BoxError,
    Future: Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(users.layers())
        .service(h2_client())
}

/// Two users at once: each request carries its own user's token.
#[tokio::test]
async fn each_request_carries_its_users_token() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let [ada, grace, _] = <[FakeUser; 3]>::try_from(fake.users()).unwrap();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    log_in(&fake, &users, &grace.id, "session-grace").await;
    let client = client(&users);

    let (a, g) = tokio::join!(
        users_me(client.clone(), me(&fake, Some("session-ada"))),
        users_me(client.clone(), me(&fake, Some("session-grace"))),
    );
    assert_eq!(a.unwrap(), ada.name);
    assert_eq!(g.unwrap(), grace.name);
    assert_eq!(fake.refreshes(), 0, "the login's token is used as it is");
    assert_eq!(users.stats().users, 2);
}

/// A request for the API without a key, or with one nobody is logged in under, is not
/// sent: never with no token, never with another user's.
#[tokio::test]
async fn a_request_without_its_user_is_not_sent() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    let client = client(&users);
    let before = fake.api_requests();

    let err = users_me(client.clone(), me(&fake, None)).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<UserAuthError>(),
        Some(&UserAuthError::MissingKey)
    );
    let err = users_me(client.clone(), me(&fake, Some("session-eve")))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<UserAuthError>(),
        Some(&UserAuthError::NotLoggedIn)
    );
    assert_eq!(fake.api_requests(), before, "neither was sent");
    assert_eq!(users.stats().refused, 2);

    // A request to another host passes through untouched, key or not.
    let other = Request::get(format!("{}/oauth/token", base(&fake.login_uri())))
        .body(Full::default())
        .unwrap();
    let response = client.clone().oneshot(other).await;
    assert!(response.is_ok(), "sent, not refused: {response:?}");
    assert_eq!(users.stats().refused, 2);
}

/// 1,000 concurrent requests for one user after her token was revoked: one refresh, and
/// every request answered with her name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_401s_for_one_user_cost_one_refresh() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    let client = client(&users);
    assert_eq!(
        users_me(client.clone(), me(&fake, Some("session-ada")))
            .await
            .unwrap(),
        ada.name
    );

    fake.revoke_all_tokens();
    let tasks: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(users_me(client.clone(), me(&fake, Some("session-ada")))))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), ada.name);
    }
    assert_eq!(fake.refreshes(), 1);
    assert_eq!(
        fake.user_token_requests(&ada.id),
        2,
        "login, then one refresh"
    );
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}

/// 100 users × 10 concurrent requests after every token was revoked: exactly 100
/// refreshes, each user's requests answered with her own name (the fake never saw one
/// user's token on another's request), and no superseded refresh token sent though the
/// fake rotates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_users_storm_costs_one_refresh_each() {
    let fake = FakeGenesys::start().await.unwrap();
    let people: Vec<FakeUser> = (0..100)
        .map(|i| FakeUser::new(format!("user-{i}"), format!("Person {i}")))
        .collect();
    fake.set_users(people.clone());
    let users = users(&fake);
    for person in &people {
        log_in(&fake, &users, &person.id, &format!("session-{}", person.id)).await;
    }
    let client = client(&users);

    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for person in &people {
        for _ in 0..10 {
            let key = format!("session-{}", person.id);
            let request = me(&fake, Some(&key));
            let expected = person.name.clone();
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                (expected, users_me(client, request).await)
            }));
        }
    }
    for task in tasks {
        let (expected, got) = task.await.unwrap();
        assert_eq!(
            got.unwrap(),
            expected,
            "a user's request carried her own token"
        );
    }
    assert_eq!(fake.refreshes(), 100);
    for person in &people {
        assert_eq!(
            fake.user_token_requests(&person.id),
            2,
            "login, then one refresh"
        );
    }
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}

/// Logout removes the user and revokes her token; her next request is not sent.
#[tokio::test]
async fn logout_removes_the_user_and_revokes_her_token() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    let token = users
        .token_cache(&UserKey::new("session-ada"))
        .unwrap()
        .current()
        .unwrap();
    let bearer = token
        .header()
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    assert!(fake.token_is_valid(&bearer));

    assert!(users.logout(&UserKey::new("session-ada")).await.unwrap());
    assert!(!fake.token_is_valid(&bearer), "revoked at Genesys");
    assert!(!users.contains(&UserKey::new("session-ada")));
    let err = users_me(client(&users), me(&fake, Some("session-ada")))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<UserAuthError>(),
        Some(&UserAuthError::NotLoggedIn)
    );
    assert!(
        !users.logout(&UserKey::new("session-ada")).await.unwrap(),
        "already out"
    );
}

/// Entries idle past the configured time are evicted; active ones stay.
#[tokio::test(start_paused = true)]
async fn idle_users_are_evicted() {
    let fake = FakeGenesys::builder().build_in_process();
    let users = UserTokenCache::new(
        UserGrant::confidential(
            fake.service(),
            "http://127.0.0.1:9/oauth/token".parse().unwrap(),
            Credentials::new(fake.client_id(), fake.client_secret()).unwrap(),
        )
        .unwrap(),
        "http://127.0.0.1:9".parse().unwrap(),
        UserCacheConfig::new().idle_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    let tokens = |n: u32| {
        let token = IssuedToken::bearer(&format!("t{n}"), Duration::from_secs(3600)).unwrap();
        UserTokens::new(token, None, tokio::time::Instant::now())
    };
    users.insert(UserKey::new("idle"), tokens(1)).await.unwrap();
    users
        .insert(UserKey::new("active"), tokens(2))
        .await
        .unwrap();
    // A login counts as a use: the first sweep evicts nobody.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(users.evict_idle(), 0);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        users.token_cache(&UserKey::new("active")).is_some(),
        "used now"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;

    assert_eq!(users.evict_idle(), 1, "unused since the last sweep");
    assert!(!users.contains(&UserKey::new("idle")));
    assert!(users.contains(&UserKey::new("active")));
    assert_eq!(users.stats().evicted, 1);

    // Adding a user sweeps when an idle time has passed since the last sweep.
    tokio::time::sleep(Duration::from_secs(30)).await;
    users
        .insert(UserKey::new("early"), tokens(3))
        .await
        .unwrap();
    assert_eq!(users.len(), 2, "no sweep yet");
    tokio::time::sleep(Duration::from_secs(31)).await;
    users.insert(UserKey::new("new"), tokens(4)).await.unwrap();
    assert!(
        !users.contains(&UserKey::new("active")),
        "unused for a whole idle time"
    );
    assert!(users.contains(&UserKey::new("early")) && users.contains(&UserKey::new("new")));
}

/// `UserKey`'s `Debug` hides the key (a session id is a secret).
#[test]
fn a_key_is_not_shown() {
    let key = UserKey::new("session-secret-4f9c");
    assert!(!format!("{key:?}").contains("secret"));
}

/// The rotated refresh token can be read and kept; a user restored from it alone works,
/// with one refresh, and the superseded one is never sent.
#[tokio::test]
async fn a_kept_refresh_token_restores_the_user() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    let key = UserKey::new("session-ada");
    let client = client(&users);
    fake.revoke_all_tokens();
    assert_eq!(
        users_me(client.clone(), me(&fake, Some("session-ada")))
            .await
            .unwrap(),
        ada.name
    );
    assert_eq!(fake.refreshes(), 1);
    let kept = users.refresh_token(&key).await.expect("a refresh token");
    assert!(
        fake.refresh_token_is_valid(kept.expose_secret()),
        "the rotated one"
    );

    // A restart: a new cache, the user restored from the kept refresh token.
    let restored = self::users(&fake);
    restored
        .insert_refresh_token(key.clone(), kept)
        .await
        .unwrap();
    let client = self::client(&restored);
    assert_eq!(
        users_me(client, me(&fake, Some("session-ada")))
            .await
            .unwrap(),
        ada.name
    );
    assert_eq!(fake.refreshes(), 2);
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
}

/// A user whose refresh token Genesys refused (revoked): her request fails at once with the
/// typed `invalid_grant` error (she must log in again), and no second refresh is sent.
#[tokio::test]
async fn a_refused_refresh_token_is_a_typed_error() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    fake.revoke_user(&ada.id);
    let client = client(&users);
    let before = fake.token_requests();

    for _ in 0..3 {
        let err = users_me(client.clone(), me(&fake, Some("session-ada")))
            .await
            .unwrap_err();
        let auth = err
            .downcast_ref::<genesys_auth_layer::AuthError>()
            .expect("an AuthError");
        assert_eq!(
            auth.oauth_code(),
            Some(&genesys_auth_layer::OAuthErrorCode::InvalidGrant),
            "{auth}"
        );
    }
    assert_eq!(
        fake.token_requests() - before,
        1,
        "one refused refresh, then none"
    );
}

/// Logout of a user whose token a 401 withdrew: a fresh token is had first, so the
/// revocation (and the end of the session) is not skipped.
#[tokio::test]
async fn logout_revokes_even_after_the_token_was_withdrawn() {
    let fake = FakeGenesys::start().await.unwrap();
    let users = users(&fake);
    let ada = fake.users()[0].clone();
    log_in(&fake, &users, &ada.id, "session-ada").await;
    let key = UserKey::new("session-ada");
    let kept = users.refresh_token(&key).await.unwrap();
    // Her token is revoked behind the cache's back and a request sees the 401 and refreshes.
    fake.revoke_all_tokens();
    assert_eq!(
        users_me(client(&users), me(&fake, Some("session-ada")))
            .await
            .unwrap(),
        ada.name
    );
    let rotated = users.refresh_token(&key).await.unwrap();
    assert_ne!(rotated.expose_secret(), kept.expose_secret());

    assert!(users.logout(&key).await.unwrap());
    assert!(
        !fake.refresh_token_is_valid(rotated.expose_secret()),
        "the session ended"
    );
}
