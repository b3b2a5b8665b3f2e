//! The login side of the fake, through its in-process service: the login page, auto
//! approval, the code and refresh grants, `users/me` and logout.

use bytes::Bytes;
use genesys_fake::{FakeGenesys, FakeService, FakeUser};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::ServiceExt;

const REDIRECT: &str = "http://127.0.0.1:7/callback";

async fn call(
    svc: &FakeService,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = svc.clone().oneshot(req).await.expect("service error");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn authorize(fake: &FakeGenesys, extra: &str) -> Request<Full<Bytes>> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", &fake.client_id())
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "st<&>")
        .finish();
    Request::get(format!("{}?{query}{extra}", fake.authorize_url()))
        .body(Full::default())
        .unwrap()
}

fn form_post(uri: impl AsRef<str>, body: String) -> Request<Full<Bytes>> {
    Request::post(uri.as_ref())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The query parameters of a redirect's `Location`.
fn location_params(headers: &http::HeaderMap) -> Vec<(String, String)> {
    let location = headers["location"].to_str().unwrap();
    assert!(location.starts_with(REDIRECT), "{location}");
    let query = location.split_once('?').unwrap().1;
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> &'a str {
    &params.iter().find(|(k, _)| k == key).unwrap().1
}

/// Exchanges `code` with HTTP Basic; the JSON answer.
async fn exchange(fake: &FakeGenesys, code: &str) -> (StatusCode, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", code)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("client_id", &fake.client_id())
        .append_pair("client_secret", &fake.client_secret())
        .finish();
    let (status, _, body) = call(
        &fake.service(),
        form_post(fake.token_url().to_string(), body),
    )
    .await;
    (status, serde_json::from_slice(&body).unwrap())
}

async fn refresh(fake: &FakeGenesys, refresh_token: &str) -> (StatusCode, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "refresh_token")
        .append_pair("refresh_token", refresh_token)
        .append_pair("client_id", &fake.client_id())
        .append_pair("client_secret", &fake.client_secret())
        .finish();
    let (status, _, body) = call(
        &fake.service(),
        form_post(fake.token_url().to_string(), body),
    )
    .await;
    (status, serde_json::from_slice(&body).unwrap())
}

async fn api(
    fake: &FakeGenesys,
    method: http::Method,
    path: &str,
    token: &str,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!(
            "{}{}",
            fake.api_uri(),
            path.trim_start_matches('/')
        ))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    let (status, _, body) = call(&fake.service(), req).await;
    (status, body)
}

#[tokio::test]
async fn the_login_page_lists_the_users_and_its_form_logs_one_in() {
    let fake = FakeGenesys::builder().build_in_process();
    fake.set_users([
        FakeUser::new("u1", "Ada <Lovelace>"),
        FakeUser::new("u2", "Grace Hopper"),
    ]);
    let (status, headers, page) = call(&fake.service(), authorize(&fake, "")).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains("Ada &lt;Lovelace&gt;"), "{page}");
    assert!(page.contains("value=\"u2\""));
    assert!(
        page.contains("name=\"state\" value=\"st&lt;&amp;&gt;\""),
        "{page}"
    );
    assert_eq!(fake.codes_issued(), 0);

    // Submitting the form (the hidden fields, and the second user).
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", &fake.client_id())
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "st<&>")
        .append_pair("user_id", "u2")
        .finish();
    let (status, headers, _) = call(
        &fake.service(),
        form_post(fake.authorize_url().to_string(), form),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let params = location_params(&headers);
    assert_eq!(param(&params, "state"), "st<&>");
    assert_eq!(fake.codes_issued(), 1);

    let (status, tokens) = exchange(&fake, param(&params, "code")).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(fake.codes_redeemed(), 1);
    assert_eq!(fake.user_token_requests("u2"), 1);
    let access = tokens["access_token"].as_str().unwrap();
    let (status, me) = api(&fake, http::Method::GET, "/api/v2/users/me", access).await;
    assert_eq!(status, 200);
    let me: Value = serde_json::from_slice(&me).unwrap();
    assert_eq!(me, serde_json::json!({"id": "u2", "name": "Grace Hopper"}));
}

#[tokio::test]
async fn auto_approve_redirects_at_once_and_codes_are_single_use() {
    let fake = FakeGenesys::builder().build_in_process();
    let ada = fake.users()[0].id.clone();
    fake.set_auto_approve(Some(&ada));
    let (status, headers, _) = call(&fake.service(), authorize(&fake, "")).await;
    assert_eq!(status, StatusCode::FOUND);
    let params = location_params(&headers);
    let code = param(&params, "code");
    assert_eq!(exchange(&fake, code).await.0, 200);
    let (status, error) = exchange(&fake, code).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"], "invalid_grant");
    assert_eq!(error["description"], "authorization code already used");
    assert_eq!(fake.user_token_requests(&ada), 2);
}

#[tokio::test]
async fn an_unknown_client_gets_a_page_never_a_redirect() {
    let fake = FakeGenesys::builder().build_in_process();
    fake.set_auto_approve(Some(&fake.users()[0].id));
    let req = Request::get(format!(
        "{}?response_type=code&client_id=other&redirect_uri=http%3A%2F%2Fevil.example%2F",
        fake.authorize_url()
    ))
    .body(Full::default())
    .unwrap();
    let (status, headers, _) = call(&fake.service(), req).await;
    assert_eq!(status, 400);
    assert!(headers.get("location").is_none());
    // `plain` PKCE is refused (sent back to the client as an error).
    let (status, headers, _) = call(
        &fake.service(),
        authorize(&fake, "&code_challenge=abc&code_challenge_method=plain"),
    )
    .await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        param(&location_params(&headers), "error"),
        "invalid_request"
    );
    assert_eq!(fake.codes_issued(), 0);
}

#[tokio::test]
async fn users_me_needs_a_user_token() {
    let fake = FakeGenesys::builder().build_in_process();
    let token = fake.issue_token(); // a client-credentials token
    let (status, body) = api(&fake, http::Method::GET, "/api/v2/users/me", &token).await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "bad.request");
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_superseded_one_is_refused_and_counted() {
    let fake = FakeGenesys::builder().build_in_process();
    fake.set_auto_approve(Some(&fake.users()[0].id));
    let (_, headers, _) = call(&fake.service(), authorize(&fake, "")).await;
    let (_, tokens) = exchange(&fake, param(&location_params(&headers), "code")).await;
    let r0 = tokens["refresh_token"].as_str().unwrap().to_owned();

    let (status, answer) = refresh(&fake, &r0).await;
    assert_eq!(status, 200);
    let r1 = answer["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r0, r1);
    assert!(!fake.refresh_token_is_valid(&r0));
    let (status, error) = refresh(&fake, &r0).await;
    assert_eq!(
        (status.as_u16(), error["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(fake.superseded_refresh_tokens_seen(), 1);
    assert_eq!(fake.refreshes(), 1);

    // Without rotation the same refresh token comes back and keeps working.
    fake.set_rotate_refresh_tokens(false);
    for _ in 0..2 {
        let (status, answer) = refresh(&fake, &r1).await;
        assert_eq!(status, 200);
        assert_eq!(answer["refresh_token"], r1.as_str());
    }
    assert_eq!(fake.refreshes(), 3);
}

#[tokio::test]
async fn logout_ends_the_session_and_revoke_user_ends_all_of_them() {
    let fake = FakeGenesys::builder().build_in_process();
    let ada = fake.users()[0].id.clone();
    fake.set_auto_approve(Some(&ada));
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let (_, headers, _) = call(&fake.service(), authorize(&fake, "")).await;
        let (_, tokens) = exchange(&fake, param(&location_params(&headers), "code")).await;
        sessions.push((
            tokens["access_token"].as_str().unwrap().to_owned(),
            tokens["refresh_token"].as_str().unwrap().to_owned(),
        ));
    }
    let (access, refresh_token) = &sessions[0];
    let (status, _) = api(&fake, http::Method::DELETE, "/api/v2/tokens/me", access).await;
    assert_eq!(status, 204);
    assert!(!fake.token_is_valid(access));
    assert!(!fake.refresh_token_is_valid(refresh_token));
    assert_eq!(
        refresh(&fake, refresh_token).await.1["error"],
        "invalid_grant"
    );
    // The other sessions still work, until the user is revoked everywhere.
    assert!(fake.refresh_token_is_valid(&sessions[1].1));
    fake.revoke_user(&ada);
    for (access, refresh_token) in &sessions[1..] {
        assert!(!fake.token_is_valid(access));
        assert!(!fake.refresh_token_is_valid(refresh_token));
    }
    // Revoking every access token leaves refresh tokens alone.
    fake.set_auto_approve(Some(&ada));
    let (_, headers, _) = call(&fake.service(), authorize(&fake, "")).await;
    let (_, tokens) = exchange(&fake, param(&location_params(&headers), "code")).await;
    fake.revoke_all_tokens();
    assert!(fake.refresh_token_is_valid(tokens["refresh_token"].as_str().unwrap()));
}
