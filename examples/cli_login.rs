//! A command-line login with PKCE: `cargo run --example cli_login`.
//!
//! It listens on `127.0.0.1` for the redirect back (a free port), prints the authorization
//! URL to open in a browser, waits for the callback, checks its `state`, exchanges the code
//! with the PKCE verifier (a public client: no secret), caches the tokens in a
//! [`UserTokenCache`], prints the user's name from `GET /api/v2/users/me` sent through its
//! layer, and logs out (`DELETE /api/v2/tokens/me`).
//!
//! With no configuration it runs on the embedded fake Genesys and completes by itself: the
//! fake approves its first user, and the example opens the URL itself, as a browser would,
//! so CI can run it. With `GENESYSCLOUD_OAUTHCLIENT_ID` (an OAuth client with the PKCE
//! grant) and `GENESYSCLOUD_REGION` set, it logs in on the real Genesys Cloud and waits for
//! you (up to five minutes). If the client accepts only a registered redirect URI, set it in
//! `GENESYSCLOUD_REDIRECT_URI` (such as `http://127.0.0.1:8765/callback`): the example then
//! listens on its port. Whether Genesys accepts any loopback port (RFC 8252 §7.3) is not
//! confirmed.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::default_client::https_client;
use genesys_auth_layer::{
    AuthorizeUrl, PkceVerifier, Region, UserCacheConfig, UserGrant, UserKey, UserTokenCache,
};
use genesys_fake::FakeGenesys;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{BoxError, Layer, ServiceExt};

/// Where the login happens.
struct Genesys {
    login_uri: Uri,
    api_uri: Uri,
    client_id: String,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "genesys_auth_layer=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let redirect = env("GENESYSCLOUD_REDIRECT_URI");
    match env("GENESYSCLOUD_OAUTHCLIENT_ID") {
        Some(client_id) => {
            let region: Region = env("GENESYSCLOUD_REGION")
                .unwrap_or_else(|| "us-east-1".into())
                .parse()?;
            println!("Logging in on Genesys Cloud, region {region}");
            let genesys = Genesys {
                login_uri: region.login_uri(),
                api_uri: region.api_uri(),
                client_id,
            };
            log_in(&genesys, redirect, None).await?;
        }
        None => {
            let fake = FakeGenesys::start().await?;
            let user = fake.users()[0].clone();
            // The fake's login page would wait for a click: approve its first user at once.
            fake.set_auto_approve(Some(&user.id));
            println!(
                "No GENESYSCLOUD_OAUTHCLIENT_ID set: logging in on the embedded fake Genesys ({}),",
                fake.login_uri()
            );
            println!("which approves {} without asking.", user.name);
            let genesys = Genesys {
                login_uri: fake.login_uri(),
                api_uri: fake.api_uri(),
                client_id: fake.client_id(),
            };
            let name = log_in(&genesys, redirect, Some(&fake)).await?;
            if name != user.name {
                return Err(format!("expected {:?}, got {name:?}", user.name).into());
            }
            fake.shutdown().await;
        }
    }
    Ok(())
}

/// The whole login; the user's name. With `fake`, the example opens the URL itself.
async fn log_in(
    genesys: &Genesys,
    redirect: Option<String>,
    fake: Option<&FakeGenesys>,
) -> Result<String, BoxError> {
    // The redirect listener: the registered URI's port, or any free one.
    let port = match &redirect {
        Some(uri) => uri
            .parse::<Uri>()?
            .port_u16()
            .ok_or("GENESYSCLOUD_REDIRECT_URI has no port")?,
        None => 0,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let redirect_uri = match redirect {
        Some(uri) => uri,
        None => format!("http://{}/callback", listener.local_addr()?),
    };
    let callback_path = redirect_uri.parse::<Uri>()?.path().to_owned();
    let mut callbacks = listen(listener, callback_path);

    let verifier = PkceVerifier::generate()?;
    let request = AuthorizeUrl::new(
        genesys.login_uri.clone(),
        genesys.client_id.clone(),
        redirect_uri.clone(),
    )
    .pkce(&verifier)
    .build()?;
    println!(
        "\nOpen this URL in your browser to log in:\n\n  {}\n",
        request.url()
    );

    let wait = if fake.is_some() {
        open_as_a_browser(request.url()).await?;
        Duration::from_secs(30)
    } else {
        Duration::from_secs(5 * 60)
    };
    let query = tokio::time::timeout(wait, callbacks.recv())
        .await
        .map_err(|_| format!("no login within {wait:?}"))?
        .ok_or("the redirect listener stopped")?;

    // A callback with another `state` (not from this login) is refused here.
    let code = request.into_state().verify_callback(&query)?;
    let token_url = format!(
        "{}/oauth/token",
        genesys.login_uri.to_string().trim_end_matches('/')
    )
    .parse()?;
    let grant = UserGrant::public(
        https_client::<Full<Bytes>>(),
        token_url,
        genesys.client_id.clone(),
    )?;
    let tokens = grant.exchange_pkce(&code, &redirect_uri, &verifier).await?;

    let users = UserTokenCache::new(grant, genesys.api_uri.clone(), UserCacheConfig::new())?;
    let key = UserKey::new("cli");
    users.insert(key.clone(), tokens).await?;
    let client = users.layers().layer(https_client::<Full<Bytes>>());
    let mut me = Request::get(format!(
        "{}/api/v2/users/me",
        genesys.api_uri.to_string().trim_end_matches('/')
    ))
    .body(Full::default())?;
    me.extensions_mut().insert(key.clone());
    let response = client.oneshot(me).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!("GET /api/v2/users/me answered {status}").into());
    }
    let me: serde_json::Value = serde_json::from_slice(&body)?;
    let name = me["name"]
        .as_str()
        .ok_or("no name in /users/me")?
        .to_owned();
    println!("Logged in as {name}.");

    users.logout(&key).await?;
    println!("Logged out: the token is revoked.");
    Ok(name)
}

/// Serves `listener` in the background: each request to `callback_path` sends its query
/// on the returned channel and gets a page saying to go back to the terminal.
fn listen(listener: TcpListener, callback_path: String) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let callback_path = callback_path.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                let is_callback = req.uri().path() == callback_path;
                let query = req.uri().query().unwrap_or("").to_owned();
                async move {
                    let (status, text) = if is_callback {
                        let _ = tx.try_send(query);
                        (
                            StatusCode::OK,
                            "Login received: you can close this tab and return to the terminal.",
                        )
                    } else {
                        (StatusCode::NOT_FOUND, "Not found.")
                    };
                    let mut response = Response::new(Full::new(Bytes::from(format!(
                        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>cli_login</title></head><body><p>{text}</p></body></html>\n"
                    ))));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        http::HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    rx
}

/// What a browser does with the URL on the fake: `GET` it, and follow the redirect back to
/// the listener.
async fn open_as_a_browser(url: &str) -> Result<(), BoxError> {
    let http = https_client::<Full<Bytes>>();
    let response = http
        .request(Request::get(url).body(Full::default())?)
        .await?;
    let location = response
        .headers()
        .get(LOCATION)
        .ok_or_else(|| format!("the authorize page answered {}", response.status()))?
        .to_str()?
        .to_owned();
    let back = http
        .request(Request::get(location).body(Full::default())?)
        .await?;
    back.into_body().collect().await?;
    Ok(())
}
