//! "Log in with Genesys" in a web app: `cargo run --example web_login --features web-login`.
//!
//! An axum app on `127.0.0.1`: `/login` sends the browser to Genesys' authorize page (the
//! `state` kept on the server, bound to the browser by a short-lived cookie), `/callback`
//! checks the state, exchanges the code, caches the user's tokens in a [`UserTokenCache`]
//! under a new random session id and sets that id as an `HttpOnly`, `SameSite=Lax` cookie;
//! `/` shows the user's name from `GET /api/v2/users/me`, sent through
//! [`UserTokenCache::layer`] with the session's [`UserKey`] in the request's extensions;
//! `/logout` (a POST) logs the user out (`DELETE /api/v2/tokens/me`) and clears the cookie.
//!
//! With no configuration it starts the embedded fake Genesys on loopback: its login page
//! lets you pick one of three fake users. With `GENESYSCLOUD_OAUTHCLIENT_ID`,
//! `GENESYSCLOUD_OAUTHCLIENT_SECRET` (an OAuth client with the Code Authorization grant),
//! `GENESYSCLOUD_REGION` and `GENESYSCLOUD_REDIRECT_URI` (one of the client's authorized
//! redirect URIs, ending in `/callback`, such as `http://localhost:8080/callback`) set, it
//! logs in on the real Genesys Cloud. It listens on `WEB_LOGIN_PORT`, else the redirect URI's
//! port, else a free port, and prints the URL to open.
//!
//! `tests/browser.rs` drives this app in a real headless Chromium.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use genesys_auth_layer::default_client::{https_client, HttpsClient};
use genesys_auth_layer::{
    AuthError, AuthorizeUrl, Credentials, OAuthErrorCode, Region, UserAuthError, UserAuthService,
    UserCacheConfig, UserGrant, UserKey, UserTokenCache,
};
use genesys_fake::FakeGenesys;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tower::{BoxError, Layer, ServiceExt};

type Http = HttpsClient<Full<Bytes>>;

/// The session cookie: a random id, the [`UserKey`] of the user's tokens.
const SESSION_COOKIE: &str = "session";
/// The cookie that binds a pending login (its `state`) to the browser that started it.
const LOGIN_COOKIE: &str = "login";
/// How long a login may take between `/login` and `/callback`.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Pending logins kept at most: beyond it, `/login` answers 503 until some expire.
const MAX_PENDING_LOGINS: usize = 10_000;

/// Where the users log in, and how the app reaches it.
pub(crate) struct Genesys {
    /// `https://login.<domain>` (or the fake's login host).
    pub(crate) login_uri: Uri,
    /// `https://api.<domain>` (or the fake's API host).
    pub(crate) api_uri: Uri,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    /// This app's `/callback`, as registered on the OAuth client.
    pub(crate) redirect_uri: String,
}

impl Genesys {
    /// The embedded fake, with the app listening on `app`.
    pub(crate) fn fake(fake: &FakeGenesys, app: SocketAddr) -> Self {
        Self {
            login_uri: fake.login_uri(),
            api_uri: fake.api_uri(),
            client_id: fake.client_id(),
            client_secret: fake.client_secret(),
            redirect_uri: format!("http://{app}/callback"),
        }
    }
}

struct App {
    genesys: Genesys,
    grant: UserGrant<Http>,
    users: UserTokenCache<Http>,
    /// The client for API requests made for a user: the user's token by the request's
    /// `UserKey`, a 401 refreshed and replayed once.
    api: UserAuthService<Http>,
    /// Pending logins by the id in the login cookie: the `state` sent to Genesys.
    pending: Mutex<HashMap<String, (genesys_auth_layer::AuthorizationState, Instant)>>,
    /// Cookies get `Secure` when the app is served over https.
    secure_cookies: bool,
}

/// The app's routes, logging users in on `genesys`.
pub(crate) fn app(genesys: Genesys) -> Result<Router, BoxError> {
    let http = https_client::<Full<Bytes>>();
    let credentials = Credentials::new(genesys.client_id.clone(), genesys.client_secret.clone())?;
    let token_url = format!(
        "{}/oauth/token",
        genesys.login_uri.to_string().trim_end_matches('/')
    )
    .parse()?;
    let grant = UserGrant::confidential(http.clone(), token_url, credentials)?;
    let users = UserTokenCache::new(
        grant.clone(),
        genesys.api_uri.clone(),
        UserCacheConfig::new(),
    )?;
    let api = users.layers().layer(http);
    let secure_cookies = genesys.redirect_uri.starts_with("https://");
    let state = Arc::new(App {
        genesys,
        grant,
        users,
        api,
        pending: Mutex::new(HashMap::new()),
        secure_cookies,
    });
    Ok(Router::new()
        .route("/", get(home))
        .route("/login", get(login))
        .route("/callback", get(callback))
        .route("/logout", post(logout))
        .route("/logged-out", get(logged_out))
        .with_state(state))
}

/// Serves the app on `listener` until the process ends.
pub(crate) async fn serve(listener: TcpListener, genesys: Genesys) -> Result<(), BoxError> {
    axum::serve(listener, app(genesys)?).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "genesys_auth_layer=info,web_login=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let id = env("GENESYSCLOUD_OAUTHCLIENT_ID");
    let secret = env("GENESYSCLOUD_OAUTHCLIENT_SECRET");
    let redirect = env("GENESYSCLOUD_REDIRECT_URI");
    let port = match env("WEB_LOGIN_PORT") {
        Some(port) => port.parse::<u16>()?,
        None => redirect
            .as_deref()
            .and_then(|r| r.parse::<Uri>().ok())
            .and_then(|r| r.port_u16())
            .unwrap_or(0),
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;

    let (genesys, fake) = match (id, secret, redirect) {
        (Some(client_id), Some(client_secret), Some(redirect_uri)) => {
            let region: Region = env("GENESYSCLOUD_REGION")
                .unwrap_or_else(|| "us-east-1".into())
                .parse()?;
            println!("Logging in on Genesys Cloud, region {region}");
            let genesys = Genesys {
                login_uri: region.login_uri(),
                api_uri: region.api_uri(),
                client_id,
                client_secret,
                redirect_uri,
            };
            (genesys, None)
        }
        (None, None, _) => {
            let fake = FakeGenesys::start().await?;
            println!(
                "No GENESYSCLOUD_OAUTHCLIENT_ID/SECRET set: logging in on the embedded fake Genesys ({})",
                fake.login_uri()
            );
            (Genesys::fake(&fake, addr), Some(fake))
        }
        _ => {
            return Err(
                "set GENESYSCLOUD_OAUTHCLIENT_ID, GENESYSCLOUD_OAUTHCLIENT_SECRET and \
                 GENESYSCLOUD_REDIRECT_URI (and GENESYSCLOUD_REGION), or none of them"
                    .into(),
            )
        }
    };
    // The app's own origin as the redirect URI names it: cookies set on `localhost` are not
    // sent to `127.0.0.1`, so the login must start where the callback lands.
    let redirect: Uri = genesys.redirect_uri.parse()?;
    let (Some(scheme), Some(authority)) = (redirect.scheme_str(), redirect.authority()) else {
        return Err("GENESYSCLOUD_REDIRECT_URI must be an absolute URI".into());
    };
    if redirect.path() != "/callback" {
        return Err("GENESYSCLOUD_REDIRECT_URI must end in /callback (this app's route)".into());
    }
    println!("Open {scheme}://{authority}/ (listening on {addr}; Ctrl-C to stop)");
    serve(listener, genesys).await?;
    drop(fake);
    Ok(())
}

/// `/`: the user's name, or the login link.
async fn home(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(key) = cookie(&headers, SESSION_COOKIE).map(UserKey::new) else {
        return logged_out_page("Welcome", "");
    };
    match my_name(&app, &key).await {
        Ok(name) => page(
            StatusCode::OK,
            "Logged in",
            &format!(
                "<p>Logged in as <strong id=\"user-name\">{}</strong>.</p>\n\
                 <form method=\"post\" action=\"/logout\"><button type=\"submit\" id=\"logout\">Log out</button></form>",
                escape(&name)
            ),
        ),
        Err(Outcome::LoggedOut) => {
            // Unknown or evicted session, or Genesys ended it: forget it.
            app.users.remove(&key);
            let mut response = logged_out_page("Welcome", "<p>Your session has ended.</p>");
            set_cookie(&mut response, &clear_cookie(SESSION_COOKIE, "/"));
            response
        }
        Err(Outcome::Failed(message)) => page(
            StatusCode::BAD_GATEWAY,
            "Genesys did not answer",
            &format!("<p>{}</p>", escape(&message)),
        ),
    }
}

enum Outcome {
    LoggedOut,
    Failed(String),
}

/// `GET /api/v2/users/me` for the user under `key`, through the layer.
async fn my_name(app: &App, key: &UserKey) -> Result<String, Outcome> {
    let uri = format!(
        "{}/api/v2/users/me",
        app.genesys.api_uri.to_string().trim_end_matches('/')
    );
    let mut request = Request::get(uri)
        .body(Full::default())
        .map_err(|e| Outcome::Failed(e.to_string()))?;
    request.extensions_mut().insert(key.clone());
    let response = match app.api.clone().oneshot(request).await {
        Ok(response) => response,
        Err(error) => {
            let no_user = error.downcast_ref::<UserAuthError>().is_some();
            // The refresh token was refused (revoked, expired): the user must log in again.
            let refused = error
                .downcast_ref::<AuthError>()
                .and_then(AuthError::oauth_code)
                .is_some_and(|code| *code == OAuthErrorCode::InvalidGrant);
            return Err(if no_user || refused {
                Outcome::LoggedOut
            } else {
                Outcome::Failed(format!("GET /api/v2/users/me failed: {error}"))
            });
        }
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Outcome::Failed(format!("GET /api/v2/users/me: {e}")))?
        .to_bytes();
    match status {
        // Still refused after a refresh and a replay: the session is gone.
        StatusCode::UNAUTHORIZED => Err(Outcome::LoggedOut),
        StatusCode::OK => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|me| me.get("name")?.as_str().map(str::to_owned))
            .ok_or_else(|| Outcome::Failed("GET /api/v2/users/me: no name in the answer".into())),
        status => Err(Outcome::Failed(format!(
            "GET /api/v2/users/me answered {status}"
        ))),
    }
}

/// `/login`: to Genesys' authorize page, the `state` kept here.
async fn login(State(app): State<Arc<App>>) -> Response {
    let request = match AuthorizeUrl::new(
        app.genesys.login_uri.clone(),
        app.genesys.client_id.clone(),
        app.genesys.redirect_uri.clone(),
    )
    .build()
    {
        Ok(request) => request,
        Err(error) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    };
    let Ok(login_id) = random_id() else {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "no random numbers");
    };
    {
        let mut pending = app.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING_LOGINS {
            pending.retain(|_, (_, started)| started.elapsed() < LOGIN_TIMEOUT);
        }
        if pending.len() >= MAX_PENDING_LOGINS {
            return error_page(StatusCode::SERVICE_UNAVAILABLE, "Too many logins at once.");
        }
        pending.insert(login_id.clone(), (request.state().clone(), Instant::now()));
    }
    let mut response = Redirect::to(request.url()).into_response();
    let cookie = format!(
        "{LOGIN_COOKIE}={login_id}; Path=/callback; Max-Age={}; HttpOnly; SameSite=Lax{}",
        LOGIN_TIMEOUT.as_secs(),
        secure(&app)
    );
    set_cookie(&mut response, &cookie);
    response
}

/// `/callback?code=…&state=…`: checks the state, exchanges the code, starts the session.
async fn callback(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut response = match start_session(&app, &headers, query.as_deref().unwrap_or("")).await {
        Ok(session) => {
            let mut response = Redirect::to("/").into_response();
            let cookie = format!(
                "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax{}",
                secure(&app)
            );
            set_cookie(&mut response, &cookie);
            response
        }
        Err(message) => error_page(StatusCode::BAD_REQUEST, &message),
    };
    // The pending login is spent either way.
    set_cookie(&mut response, &clear_cookie(LOGIN_COOKIE, "/callback"));
    response
}

/// The new session's id, or what went wrong.
async fn start_session(app: &App, headers: &HeaderMap, query: &str) -> Result<String, String> {
    let pending = cookie(headers, LOGIN_COOKIE)
        .and_then(|id| {
            app.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id)
        })
        .filter(|(_, started)| started.elapsed() < LOGIN_TIMEOUT);
    let Some((state, _)) = pending else {
        return Err("This login expired or was not started here.".into());
    };
    // The `state` is compared in constant time; a forged or replayed callback stops here.
    let code = state
        .verify_callback(query)
        .map_err(|e| format!("Login refused: {e}"))?;
    let tokens = app
        .grant
        .exchange(&code, &app.genesys.redirect_uri)
        .await
        .map_err(|e| format!("The code exchange failed: {e}"))?;
    let session = random_id().map_err(|_| "no random numbers".to_owned())?;
    app.users
        .insert(UserKey::new(session.as_str()), tokens)
        .await
        .map_err(|e| format!("The tokens could not be cached: {e}"))?;
    tracing::info!(target: "web_login", "a user logged in");
    Ok(session)
}

/// `POST /logout`: revokes the token, forgets the session, clears the cookie.
async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(key) = cookie(&headers, SESSION_COOKIE).map(UserKey::new) {
        match app.users.logout(&key).await {
            Ok(_) => tracing::info!(target: "web_login", "a user logged out"),
            // The session is forgotten either way; only the revocation failed.
            Err(error) => tracing::warn!(target: "web_login", %error, "token not revoked"),
        }
    }
    let mut response = Redirect::to("/logged-out").into_response();
    set_cookie(&mut response, &clear_cookie(SESSION_COOKIE, "/"));
    response
}

/// `/logged-out`.
async fn logged_out() -> Response {
    logged_out_page("Logged out", "<p id=\"logged-out\">You are logged out.</p>")
}

fn logged_out_page(title: &str, message: &str) -> Response {
    page(
        StatusCode::OK,
        title,
        &format!("{message}\n<p><a id=\"login\" href=\"/login\">Log in with Genesys</a></p>"),
    )
}

fn error_page(status: StatusCode, message: &str) -> Response {
    page(
        status,
        "Login failed",
        &format!(
            "<p id=\"error\">{}</p>\n<p><a id=\"login\" href=\"/login\">Try again</a></p>",
            escape(message)
        ),
    )
}

fn page(status: StatusCode, title: &str, content: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body>\n<h1>{title}</h1>\n{content}\n</body></html>\n",
        title = escape(title)
    );
    let mut response = (status, Html(html)).into_response();
    // Pages that show a user's name are not for shared caches.
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// The value of the cookie `name` the browser sent.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value)
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}

fn clear_cookie(name: &str, path: &str) -> String {
    format!("{name}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Lax")
}

fn secure(app: &App) -> &'static str {
    if app.secure_cookies {
        "; Secure"
    } else {
        ""
    }
}

/// 256 random bits from the OS, as hex: a session or pending-login id.
fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
