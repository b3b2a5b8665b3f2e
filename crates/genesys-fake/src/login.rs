//! The login side for a person: `GET`/`POST /oauth/authorize` (a login page, or an
//! automatic approval for tests), the `authorization_code` and `refresh_token` grants of
//! `POST /oauth/token`, and the sessions behind them.
//!
//! Codes are single-use, bound to the client, the `redirect_uri` and the PKCE challenge,
//! and live [`DEFAULT_CODE_LIFETIME`] (tokio's clock, so paused-time tests control it).
//! Refresh tokens rotate on use unless told not to; a superseded one is refused and counted.
//! Every refusal uses the OAuth error JSON of the client-credentials grant; the
//! descriptions name what was wrong (`redirect_uri`, `code_verifier`, …), since Genesys'
//! own texts are not documented.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::body::{self, FakeBody};
use crate::handler::{basic_credentials, json, oauth_error};
use crate::state::{ceil_secs, lock, Inner};
use crate::users::{default_users, FakeUser};
use crate::{BoxError, FakeGenesys};

/// How long an authorization code can be exchanged. Genesys does not document it; RFC 6749
/// §4.1.2 asks for at most ten minutes. One minute keeps tests of expiry short.
pub const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(60);

/// Cap on a login form's body.
const FORM_CAP: usize = 16 * 1024;
/// Beyond this many codes, spent and expired ones are forgotten.
const MAX_CODES: usize = 100_000;

struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    user_id: String,
    expires_at: Instant,
    redeemed: bool,
}

struct RefreshGrant {
    user_id: String,
    session: u64,
    /// Issued through a public (PKCE, no secret) exchange: refreshable with `client_id` alone.
    public: bool,
    superseded: bool,
}

struct Session {
    user_id: String,
    id: u64,
}

struct Login {
    users: Vec<FakeUser>,
    auto_approve: Option<String>,
    code_lifetime: Duration,
    rotate: bool,
    codes: HashMap<String, Code>,
    refresh: HashMap<String, RefreshGrant>,
    /// Access tokens issued to a person, by token.
    access: HashMap<String, Session>,
    per_user: HashMap<String, u64>,
    next_session: u64,
}

/// The login state of one fake (a field of its shared state).
pub(crate) struct LoginState {
    login: Mutex<Login>,
    codes_issued: AtomicU64,
    codes_redeemed: AtomicU64,
    refreshes: AtomicU64,
    superseded_seen: AtomicU64,
}

impl Default for LoginState {
    fn default() -> Self {
        Self {
            login: Mutex::new(Login {
                users: default_users(),
                auto_approve: None,
                code_lifetime: DEFAULT_CODE_LIFETIME,
                rotate: true,
                codes: HashMap::new(),
                refresh: HashMap::new(),
                access: HashMap::new(),
                per_user: HashMap::new(),
                next_session: 0,
            }),
            codes_issued: AtomicU64::new(0),
            codes_redeemed: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            superseded_seen: AtomicU64::new(0),
        }
    }
}

impl LoginState {
    /// The user an access token was issued for, if it was issued for one.
    pub(crate) fn user_of(&self, access_token: &str) -> Option<FakeUser> {
        let login = lock(&self.login);
        let user_id = &login.access.get(access_token)?.user_id;
        login.users.iter().find(|u| &u.id == user_id).cloned()
    }
}

/// The parameters of an authorization request (query of the `GET`, form of the `POST`).
#[derive(Default)]
struct AuthorizeParams {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    org: Option<String>,
    provider: Option<String>,
    user_id: Option<String>,
}

impl AuthorizeParams {
    fn parse(bytes: &[u8]) -> Self {
        let mut p = Self::default();
        for (k, v) in form_urlencoded::parse(bytes) {
            let slot = match &*k {
                "response_type" => &mut p.response_type,
                "client_id" => &mut p.client_id,
                "redirect_uri" => &mut p.redirect_uri,
                "state" => &mut p.state,
                "code_challenge" => &mut p.code_challenge,
                "code_challenge_method" => &mut p.code_challenge_method,
                "org" => &mut p.org,
                "provider" => &mut p.provider,
                "user_id" => &mut p.user_id,
                _ => continue,
            };
            slot.get_or_insert_with(|| v.into_owned());
        }
        p
    }
}

/// `GET /oauth/authorize` (the login page, or straight back with a code when auto-approve
/// is on) and `POST /oauth/authorize` (the login page's form).
pub(crate) async fn authorize<B>(inner: &Inner, req: Request<B>) -> Response<FakeBody>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let params = match parts.method {
        Method::GET => AuthorizeParams::parse(parts.uri.query().unwrap_or("").as_bytes()),
        Method::POST => match Limited::new(body, FORM_CAP).collect().await {
            Ok(c) => AuthorizeParams::parse(&c.to_bytes()),
            Err(_) => return page(StatusCode::BAD_REQUEST, "Login", "<p>Bad form.</p>"),
        },
        _ => {
            let mut res = page(
                StatusCode::METHOD_NOT_ALLOWED,
                "Login",
                "<p>GET or POST.</p>",
            );
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, POST"));
            return res;
        }
    };
    // Errors about the client or the redirect URI are shown, never redirected: the
    // redirect URI cannot be trusted yet (RFC 6749 §4.1.2.1).
    let client_ok = {
        let c = lock(&inner.client);
        !c.deleted && params.client_id.as_deref() == Some(c.id.as_str())
    };
    if !client_ok {
        return page(StatusCode::BAD_REQUEST, "Login", "<p>Unknown client.</p>");
    }
    let redirect_uri = match params.redirect_uri.as_deref() {
        Some(uri) if uri.starts_with("http://") || uri.starts_with("https://") => uri,
        _ => return page(StatusCode::BAD_REQUEST, "Login", "<p>Bad redirect_uri.</p>"),
    };
    if params.response_type.as_deref() != Some("code") {
        return redirect_error(&params, redirect_uri, "unsupported_response_type");
    }
    let challenge = match (
        &params.code_challenge,
        params.code_challenge_method.as_deref(),
    ) {
        (None, None) => None,
        (Some(c), Some("S256")) if !c.is_empty() => Some(c.clone()),
        // `plain` (or no method, which means plain) is refused: S256 only.
        _ => return redirect_error(&params, redirect_uri, "invalid_request"),
    };
    let user = {
        let login = lock(&inner.login.login);
        let chosen = match parts.method {
            Method::POST => params.user_id.clone(),
            _ => login.auto_approve.clone(),
        };
        chosen.and_then(|id| login.users.iter().find(|u| u.id == id).cloned())
    };
    let Some(user) = user else {
        if parts.method == Method::POST {
            return page(StatusCode::BAD_REQUEST, "Login", "<p>Unknown user.</p>");
        }
        return login_page(inner, &params);
    };
    let code = issue_code(inner, &params, redirect_uri, challenge, &user.id);
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("code", &code);
    if let Some(state) = &params.state {
        query.append_pair("state", state);
    }
    redirect(redirect_uri, &query.finish(), parts.method == Method::POST)
}

fn issue_code(
    inner: &Inner,
    params: &AuthorizeParams,
    redirect_uri: &str,
    challenge: Option<String>,
    user_id: &str,
) -> String {
    let code = inner.new_token_string();
    let now = Instant::now();
    let mut login = lock(&inner.login.login);
    if login.codes.len() >= MAX_CODES {
        login.codes.retain(|_, c| !c.redeemed && c.expires_at > now);
    }
    let expires_at = now
        .checked_add(login.code_lifetime)
        .unwrap_or_else(crate::body::far_future);
    login.codes.insert(
        code.clone(),
        Code {
            client_id: params.client_id.clone().unwrap_or_default(),
            redirect_uri: redirect_uri.to_owned(),
            challenge,
            user_id: user_id.to_owned(),
            expires_at,
            redeemed: false,
        },
    );
    inner.login.codes_issued.fetch_add(1, Ordering::Relaxed);
    code
}

/// `302` (`303` after a form) to `redirect_uri` with `query` added.
fn redirect(redirect_uri: &str, query: &str, after_post: bool) -> Response<FakeBody> {
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let location = format!("{redirect_uri}{separator}{query}");
    let mut res = Response::new(body::empty());
    *res.status_mut() = if after_post {
        StatusCode::SEE_OTHER
    } else {
        StatusCode::FOUND
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            res.headers_mut().insert(LOCATION, v);
            res
        }
        Err(_) => page(StatusCode::BAD_REQUEST, "Login", "<p>Bad redirect_uri.</p>"),
    }
}

fn redirect_error(params: &AuthorizeParams, redirect_uri: &str, error: &str) -> Response<FakeBody> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("error", error);
    if let Some(state) = &params.state {
        query.append_pair("state", state);
    }
    redirect(redirect_uri, &query.finish(), false)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, content: &str) -> Response<FakeBody> {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title></head>\n<body>\n<h1>{}</h1>\n{content}\n</body></html>\n",
        escape(title),
        escape(title)
    );
    let mut res = Response::new(body::full(html));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// The login page: one radio button per user and a submit button; the form posts the
/// authorization request's parameters back with the chosen `user_id`.
fn login_page(inner: &Inner, params: &AuthorizeParams) -> Response<FakeBody> {
    let mut form = String::from("<form method=\"post\" action=\"/oauth/authorize\">\n");
    let hidden = [
        ("response_type", &params.response_type),
        ("client_id", &params.client_id),
        ("redirect_uri", &params.redirect_uri),
        ("state", &params.state),
        ("code_challenge", &params.code_challenge),
        ("code_challenge_method", &params.code_challenge_method),
        ("org", &params.org),
        ("provider", &params.provider),
    ];
    for (name, value) in hidden {
        if let Some(value) = value {
            form.push_str(&format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">\n",
                escape(value)
            ));
        }
    }
    let users = lock(&inner.login.login).users.clone();
    for (i, user) in users.iter().enumerate() {
        form.push_str(&format!(
            "<p><label><input type=\"radio\" name=\"user_id\" value=\"{}\"{}> {}</label></p>\n",
            escape(&user.id),
            if i == 0 { " checked" } else { "" },
            escape(&user.name)
        ));
    }
    form.push_str("<p><button type=\"submit\" id=\"login\">Log in</button></p>\n</form>");
    page(StatusCode::OK, "Log in to Fake Genesys", &form)
}

/// How the client authenticated a user-grant token request.
enum Client {
    /// HTTP Basic or `client_id` + `client_secret`.
    Confidential,
    /// `client_id` alone (PKCE).
    Public,
}

/// `POST /oauth/token` with `grant_type=authorization_code` or `refresh_token` (the
/// endpoint's faults, rate limit and latency have been applied already).
pub(crate) fn token(inner: &Inner, headers: &HeaderMap, bytes: &Bytes) -> Response<FakeBody> {
    let mut form: HashMap<String, String> = HashMap::new();
    for (k, v) in form_urlencoded::parse(bytes) {
        form.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    let field = |k: &str| form.get(k).map(String::as_str);
    let client = match basic_credentials(headers) {
        Some(Some((id, secret))) if inner.client_ok(&id, &secret) => Client::Confidential,
        Some(_) => return invalid_client(),
        None => match (field("client_id"), field("client_secret")) {
            (Some(id), Some(secret)) if inner.client_ok(id, secret) => Client::Confidential,
            (Some(id), None)
                if {
                    let c = lock(&inner.client);
                    !c.deleted && c.id == id
                } =>
            {
                Client::Public
            }
            _ => return invalid_client(),
        },
    };
    match field("grant_type") {
        Some("authorization_code") => redeem_code(
            inner,
            &client,
            field("code"),
            field("redirect_uri"),
            field("code_verifier"),
        ),
        _ => refresh(inner, &client, field("refresh_token")),
    }
}

fn invalid_client() -> Response<FakeBody> {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client not found or bad secret",
    )
}

fn invalid_grant(description: &str) -> Response<FakeBody> {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn invalid_request(description: &str) -> Response<FakeBody> {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn redeem_code(
    inner: &Inner,
    client: &Client,
    code: Option<&str>,
    redirect_uri: Option<&str>,
    verifier: Option<&str>,
) -> Response<FakeBody> {
    let Some(code) = code else {
        return invalid_request("missing code");
    };
    let client_id = lock(&inner.client).id.clone();
    let now = Instant::now();
    let (user_id, public) = {
        let mut guard = lock(&inner.login.login);
        let login = &mut *guard;
        let Some(entry) = login.codes.get_mut(code) else {
            return invalid_grant("authorization code not found");
        };
        *login.per_user.entry(entry.user_id.clone()).or_default() += 1;
        if entry.redeemed {
            return invalid_grant("authorization code already used");
        }
        // Single use: any attempt spends it.
        entry.redeemed = true;
        if now >= entry.expires_at {
            return invalid_grant("authorization code expired");
        }
        if entry.client_id != client_id {
            return invalid_grant("authorization code was issued to another client");
        }
        if redirect_uri != Some(entry.redirect_uri.as_str()) {
            return invalid_grant("redirect_uri does not match the authorization request");
        }
        match (&entry.challenge, verifier) {
            (Some(challenge), Some(verifier)) if &s256(verifier) == challenge => {}
            (Some(_), Some(_)) => {
                return invalid_grant("code_verifier does not match the code_challenge")
            }
            (Some(_), None) => return invalid_grant("code_verifier is missing"),
            (None, Some(_)) => {
                return invalid_grant(
                    "code_verifier sent, but the authorization had no code_challenge",
                )
            }
            (None, None) if matches!(client, Client::Public) => {
                return invalid_grant("no code_challenge: a client without a secret must use PKCE")
            }
            (None, None) => {}
        }
        (entry.user_id.clone(), matches!(client, Client::Public))
    };
    inner.login.codes_redeemed.fetch_add(1, Ordering::Relaxed);
    let session = {
        let mut login = lock(&inner.login.login);
        login.next_session += 1;
        login.next_session
    };
    let refresh_token = inner.new_token_string();
    lock(&inner.login.login).refresh.insert(
        refresh_token.clone(),
        RefreshGrant {
            user_id: user_id.clone(),
            session,
            public,
            superseded: false,
        },
    );
    answer(inner, &user_id, session, &refresh_token)
}

fn refresh(inner: &Inner, client: &Client, refresh_token: Option<&str>) -> Response<FakeBody> {
    let Some(sent) = refresh_token else {
        return invalid_request("missing refresh_token");
    };
    let (user_id, session, next) = {
        let mut guard = lock(&inner.login.login);
        let login = &mut *guard;
        let rotate = login.rotate;
        let Some(grant) = login.refresh.get_mut(sent) else {
            return invalid_grant("refresh token is invalid or revoked");
        };
        *login.per_user.entry(grant.user_id.clone()).or_default() += 1;
        if grant.superseded {
            inner.login.superseded_seen.fetch_add(1, Ordering::Relaxed);
            return invalid_grant("refresh token was superseded by a newer one");
        }
        if matches!(client, Client::Public) && !grant.public {
            return invalid_client();
        }
        let (user_id, session, public) = (grant.user_id.clone(), grant.session, grant.public);
        let next = if rotate {
            grant.superseded = true;
            let next = inner.new_token_string();
            login.refresh.insert(
                next.clone(),
                RefreshGrant {
                    user_id: user_id.clone(),
                    session,
                    public,
                    superseded: false,
                },
            );
            next
        } else {
            sent.to_owned()
        };
        (user_id, session, next)
    };
    inner.login.refreshes.fetch_add(1, Ordering::Relaxed);
    answer(inner, &user_id, session, &next)
}

/// Issues an access token for the user's session; the token answer with `refresh_token`.
fn answer(inner: &Inner, user_id: &str, session: u64, refresh_token: &str) -> Response<FakeBody> {
    let (token, lifetime) = inner.issue_token();
    inner.tokens_issued.fetch_add(1, Ordering::Relaxed);
    lock(&inner.login.login).access.insert(
        token.clone(),
        Session {
            user_id: user_id.to_owned(),
            id: session,
        },
    );
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ceil_secs(lifetime).max(1),
        "refresh_token": refresh_token,
    });
    json(StatusCode::OK, body.to_string())
}

/// Ends the sessions matching `ends`: their refresh tokens and access tokens stop working.
fn end_sessions(inner: &Inner, ends: impl Fn(&str, u64) -> bool) {
    let revoked: Vec<String> = {
        let mut login = lock(&inner.login.login);
        login.refresh.retain(|_, g| !ends(&g.user_id, g.session));
        let revoked = login
            .access
            .iter()
            .filter(|(_, s)| ends(&s.user_id, s.id))
            .map(|(t, _)| t.clone())
            .collect();
        login.access.retain(|_, s| !ends(&s.user_id, s.id));
        revoked
    };
    for token in revoked {
        inner.revoke(&token);
    }
}

/// `DELETE /api/v2/tokens/me` with a user's token: logs that session out.
pub(crate) fn logout(inner: &Inner, access_token: &str) {
    let session = lock(&inner.login.login)
        .access
        .get(access_token)
        .map(|s| s.id);
    if let Some(session) = session {
        end_sessions(inner, |_, s| s == session);
    }
}

/// The login side's knobs and counters.
impl FakeGenesys {
    /// The authorization endpoint: [`login_uri`](Self::login_uri) + `/oauth/authorize`.
    pub fn authorize_url(&self) -> http::Uri {
        let mut parts = self.login_uri().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/oauth/authorize"));
        http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/oauth/authorize"))
    }

    /// The people who can log in (three by default).
    pub fn users(&self) -> Vec<FakeUser> {
        lock(&self.inner().login.login).users.clone()
    }

    /// Replaces the people who can log in. Tokens already issued keep their user id;
    /// `GET /api/v2/users/me` answers `400` for a user no longer in the list.
    pub fn set_users(&self, users: impl IntoIterator<Item = FakeUser>) {
        lock(&self.inner().login.login).users = users.into_iter().collect();
    }

    /// With `Some(user_id)`, `GET /oauth/authorize` skips the login page and sends the
    /// browser straight back to `redirect_uri?code=…&state=…` as that user (for tests);
    /// with `None` (the default), it shows the login page.
    pub fn set_auto_approve(&self, user_id: Option<&str>) {
        lock(&self.inner().login.login).auto_approve = user_id.map(str::to_owned);
    }

    /// How long a new authorization code can be exchanged (default
    /// [`DEFAULT_CODE_LIFETIME`]); on tokio's clock.
    pub fn set_code_lifetime(&self, lifetime: Duration) {
        lock(&self.inner().login.login).code_lifetime = lifetime;
    }

    /// Whether each refresh answers a new refresh token and supersedes the one sent
    /// (`true`, the default), or answers the same one again (`false`). Genesys does not
    /// document which it does (GENESYS.md); clients must work with both.
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        lock(&self.inner().login.login).rotate = rotate;
    }

    /// Authorization codes issued (login page submitted, or auto-approved).
    pub fn codes_issued(&self) -> u64 {
        self.inner().login.codes_issued.load(Ordering::Relaxed)
    }

    /// Authorization codes exchanged for tokens.
    pub fn codes_redeemed(&self) -> u64 {
        self.inner().login.codes_redeemed.load(Ordering::Relaxed)
    }

    /// Successful refresh-token grants.
    pub fn refreshes(&self) -> u64 {
        self.inner().login.refreshes.load(Ordering::Relaxed)
    }

    /// Refresh requests that sent a refresh token already superseded by a newer one (each
    /// answered `invalid_grant`). A client that never sends one twice keeps this at zero.
    pub fn superseded_refresh_tokens_seen(&self) -> u64 {
        self.inner().login.superseded_seen.load(Ordering::Relaxed)
    }

    /// Token requests (code exchanges and refreshes, answered or refused) that named a
    /// code or refresh token of this user.
    pub fn user_token_requests(&self, user_id: &str) -> u64 {
        lock(&self.inner().login.login)
            .per_user
            .get(user_id)
            .copied()
            .unwrap_or(0)
    }

    /// Whether this refresh token would be accepted now.
    pub fn refresh_token_is_valid(&self, refresh_token: &str) -> bool {
        lock(&self.inner().login.login)
            .refresh
            .get(refresh_token)
            .is_some_and(|g| !g.superseded)
    }

    /// Logs a user out everywhere (a password change, GENESYS.md): every access token and
    /// refresh token issued for them stops working.
    pub fn revoke_user(&self, user_id: &str) {
        end_sessions(self.inner(), |u, _| u == user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_html_specials() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
