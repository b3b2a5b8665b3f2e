//! Acting for a user, seen from outside: the authorization URL, the callback's `state`, the
//! code exchange (confidential and PKCE) and the refresh-token source of genesys-auth-layer
//! against genesys-fake's login side, over loopback (or in-process where the clock is
//! paused).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{
    AuthError, AuthorizationState, AuthorizeUrl, Credentials, LoginError, OAuthErrorCode,
    PkceVerifier, TokenSource, UserGrant, UserTokens,
};
use genesys_fake::{FakeGenesys, DEFAULT_CODE_LIFETIME};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

use common::{base, h1_client, HttpClient};

const REDIRECT: &str = "http://127.0.0.1:7/callback";

/// A fake that logs its first user in without showing the login page.
async fn fake_with_auto_approve() -> (FakeGenesys, String) {
    let fake = FakeGenesys::start().await.unwrap();
    let user = fake.users()[0].id.clone();
    fake.set_auto_approve(Some(&user));
    (fake, user)
}

/// Opens `url` as a browser would and returns the query of the redirect back to the app.
async fn browse<S, B>(mut http: S, url: &str) -> String
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    let request = Request::get(url).body(Full::default()).unwrap();
    let response = http.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (to, query) = location.split_once('?').unwrap();
    assert_eq!(to, REDIRECT);
    query.to_owned()
}

fn confidential(fake: &FakeGenesys) -> UserGrant<HttpClient> {
    let creds = Credentials::new(fake.client_id(), fake.client_secret()).unwrap();
    UserGrant::confidential(h1_client(), fake.token_url(), creds).unwrap()
}

fn public(fake: &FakeGenesys) -> UserGrant<HttpClient> {
    UserGrant::public(h1_client(), fake.token_url(), fake.client_id()).unwrap()
}

/// A login through the fake: the state to check and the callback's query.
async fn login(
    fake: &FakeGenesys,
    verifier: Option<&PkceVerifier>,
) -> (AuthorizationState, String) {
    let mut url = AuthorizeUrl::new(fake.login_uri(), fake.client_id(), REDIRECT);
    if let Some(verifier) = verifier {
        url = url.pkce(verifier);
    }
    let request = url.build().unwrap();
    let query = browse(h1_client(), request.url()).await;
    (request.into_state(), query)
}

/// `GET /api/v2/users/me` with `header`: the user's name.
async fn my_name(fake: &FakeGenesys, header: &HeaderValue) -> String {
    let request = Request::get(format!("{}/api/v2/users/me", base(&fake.api_uri())))
        .header(http::header::AUTHORIZATION, header.clone())
        .body(Full::default())
        .unwrap();
    let response = h1_client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let me: serde_json::Value = serde_json::from_slice(&body).unwrap();
    me["name"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_confidential_client_logs_a_user_in_and_refreshes_for_her() {
    let (fake, user) = fake_with_auto_approve().await;
    let (state, callback) = login(&fake, None).await;
    let code = state.verify_callback(&callback).unwrap();
    let grant = confidential(&fake);
    let UserTokens {
        access_token,
        refresh_token,
        ..
    } = grant.exchange(&code, REDIRECT).await.unwrap();
    assert_eq!(my_name(&fake, access_token.header()).await, "Ada Lovelace");

    let source = grant.refresh_source(refresh_token.unwrap());
    let refreshed = source.refresh().await.unwrap();
    assert_eq!(my_name(&fake, refreshed.header()).await, "Ada Lovelace");
    assert_eq!(fake.refreshes(), 1);
    assert_eq!(fake.user_token_requests(&user), 2);
}

#[tokio::test]
async fn a_public_client_logs_in_with_pkce_and_refreshes_without_a_secret() {
    let (fake, _) = fake_with_auto_approve().await;
    let verifier = PkceVerifier::generate().unwrap();
    let (state, callback) = login(&fake, Some(&verifier)).await;
    let code = state.verify_callback(&callback).unwrap();
    let grant = public(&fake);
    let tokens = grant
        .exchange_pkce(&code, REDIRECT, &verifier)
        .await
        .unwrap();
    assert_eq!(
        my_name(&fake, tokens.access_token.header()).await,
        "Ada Lovelace"
    );
    let source = grant.refresh_source(tokens.refresh_token.unwrap());
    source.refresh().await.unwrap();
    assert_eq!(fake.refreshes(), 1);
}

#[tokio::test]
async fn a_forged_state_is_rejected_and_its_code_never_sent() {
    let (fake, _) = fake_with_auto_approve().await;
    // The attacker's own login: a real code, with the attacker's state.
    let (_attacker_state, attacker_callback) = login(&fake, None).await;
    // The victim's browser is made to open the callback; her session holds her state.
    let victim_state = AuthorizationState::generate().unwrap();
    let err = victim_state
        .verify_callback(&attacker_callback)
        .unwrap_err();
    assert!(matches!(err, LoginError::StateMismatch), "{err:?}");
    assert!(err.must_log_in_again());
    assert_eq!(fake.codes_redeemed(), 0);
    assert_eq!(fake.token_requests(), 0);
}

#[tokio::test]
async fn a_reused_code_gets_its_typed_error() {
    let (fake, _) = fake_with_auto_approve().await;
    let (state, callback) = login(&fake, None).await;
    let code = state.verify_callback(&callback).unwrap();
    let grant = confidential(&fake);
    grant.exchange(&code, REDIRECT).await.unwrap();
    let err = grant.exchange(&code, REDIRECT).await.unwrap_err();
    assert!(
        matches!(err, LoginError::CodeExpiredOrUsed { status, .. } if status == 400),
        "{err:?}"
    );
    assert!(err.must_log_in_again());
    assert!(!err.to_string().contains(code.expose_secret()));
    assert_eq!(fake.codes_redeemed(), 1);
}

#[tokio::test]
async fn a_redirect_uri_mismatch_gets_its_typed_error() {
    let (fake, _) = fake_with_auto_approve().await;
    let (state, callback) = login(&fake, None).await;
    let code = state.verify_callback(&callback).unwrap();
    let err = confidential(&fake)
        .exchange(&code, "http://127.0.0.1:7/other")
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoginError::RedirectUriMismatch { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_verifier_mismatch_gets_its_typed_error() {
    let (fake, _) = fake_with_auto_approve().await;
    let verifier = PkceVerifier::generate().unwrap();
    let (state, callback) = login(&fake, Some(&verifier)).await;
    let code = state.verify_callback(&callback).unwrap();
    let other = PkceVerifier::generate().unwrap();
    let err = public(&fake)
        .exchange_pkce(&code, REDIRECT, &other)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoginError::VerifierMismatch { .. }),
        "{err:?}"
    );
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(other.expose_secret()));
    assert!(!shown.contains(code.expose_secret()));
}

#[tokio::test(start_paused = true)]
async fn an_expired_code_gets_its_typed_error() {
    // In-process, so the fake's clock is the paused one.
    let fake = FakeGenesys::builder().build_in_process();
    fake.set_auto_approve(Some(&fake.users()[0].id));
    let token_url: http::Uri = "http://127.0.0.1/oauth/token".parse().unwrap();
    let creds = Credentials::new(fake.client_id(), fake.client_secret()).unwrap();
    let grant = UserGrant::confidential(fake.service(), token_url, creds).unwrap();
    let start = |state: &AuthorizationState| {
        AuthorizeUrl::new(
            "http://127.0.0.1/".parse().unwrap(),
            fake.client_id(),
            REDIRECT,
        )
        .state(state.clone())
        .build()
        .unwrap()
    };

    // Within its lifetime a code works…
    let state = AuthorizationState::generate().unwrap();
    let callback = browse(fake.service(), start(&state).url()).await;
    tokio::time::advance(DEFAULT_CODE_LIFETIME - Duration::from_secs(1)).await;
    let code = state.verify_callback(&callback).unwrap();
    grant.exchange(&code, REDIRECT).await.unwrap();

    // …past it, it is refused.
    let callback = browse(fake.service(), start(&state).url()).await;
    tokio::time::advance(DEFAULT_CODE_LIFETIME).await;
    let code = state.verify_callback(&callback).unwrap();
    let err = grant.exchange(&code, REDIRECT).await.unwrap_err();
    assert!(
        matches!(err, LoginError::CodeExpiredOrUsed { .. }),
        "{err:?}"
    );
    assert_eq!(fake.codes_issued(), 2);
    assert_eq!(fake.codes_redeemed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_never_send_a_superseded_refresh_token() {
    let (fake, user) = fake_with_auto_approve().await;
    let (state, callback) = login(&fake, None).await;
    let grant = confidential(&fake);
    let tokens = grant
        .exchange(&state.verify_callback(&callback).unwrap(), REDIRECT)
        .await
        .unwrap();
    let source = Arc::new(grant.refresh_source(tokens.refresh_token.unwrap()));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.fetch().await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fake.superseded_refresh_tokens_seen(), 0);
    assert_eq!(fake.refreshes(), 100);
    assert_eq!(fake.user_token_requests(&user), 101);
    // The source holds the newest refresh token, the only one the fake still accepts.
    let current = source.refresh_token().await.unwrap();
    assert!(fake.refresh_token_is_valid(current.expose_secret()));
}

#[tokio::test]
async fn after_logout_the_refresh_token_is_refused_and_the_user_must_log_in_again() {
    let (fake, _) = fake_with_auto_approve().await;
    let (state, callback) = login(&fake, None).await;
    let grant = confidential(&fake);
    let tokens = grant
        .exchange(&state.verify_callback(&callback).unwrap(), REDIRECT)
        .await
        .unwrap();
    // Logout: DELETE /api/v2/tokens/me with the user's token.
    let request = Request::delete(format!("{}/api/v2/tokens/me", base(&fake.api_uri())))
        .header(
            http::header::AUTHORIZATION,
            tokens.access_token.header().clone(),
        )
        .body(Full::default())
        .unwrap();
    assert_eq!(h1_client().request(request).await.unwrap().status(), 204);

    let source = grant.refresh_source(tokens.refresh_token.unwrap());
    let err = source.refresh().await.unwrap_err();
    assert!(
        matches!(err, LoginError::RefreshTokenRejected { .. }),
        "{err:?}"
    );
    assert!(err.must_log_in_again());
    // Nothing more is sent; a cache over the source sees the `invalid_grant` it was.
    let requests = fake.token_requests();
    let err: AuthError = source.fetch().await.unwrap_err();
    assert_eq!(err.oauth_code(), Some(&OAuthErrorCode::InvalidGrant));
    assert_eq!(fake.token_requests(), requests);
}

#[tokio::test]
async fn revoking_the_user_everywhere_refuses_her_refresh_token() {
    let (fake, user) = fake_with_auto_approve().await;
    let verifier = PkceVerifier::generate().unwrap();
    let (state, callback) = login(&fake, Some(&verifier)).await;
    let grant = public(&fake);
    let tokens = grant
        .exchange_pkce(
            &state.verify_callback(&callback).unwrap(),
            REDIRECT,
            &verifier,
        )
        .await
        .unwrap();
    let source = grant.refresh_source(tokens.refresh_token.unwrap());
    source.refresh().await.unwrap();
    fake.revoke_user(&user);
    assert!(matches!(
        source.refresh().await.unwrap_err(),
        LoginError::RefreshTokenRejected { .. }
    ));
}
