//! The token on a `reqwest` client: `cargo run --example reqwest --features reqwest`.
//!
//! Starts the embedded fake Genesys (`genesys-fake`) on loopback and sends its API requests
//! through `reqwest_middleware` with `auth.middleware()`: a few calls on one token, a
//! server-side revocation of every token hit by 50 concurrent POSTs (one token request, each
//! POST replayed once with its body), and a refused secret's typed error. It exits with an
//! error if any count is not the one it prints as expected.
//!
//! The fake speaks plain HTTP on loopback, so this builds reqwest without TLS. Against the
//! real Genesys, give your own reqwest dependency a TLS feature (see the README).

use genesys_auth_layer::{AuthError, GenesysAuth};
use genesys_fake::FakeGenesys;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "genesys_auth_layer=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let fake = FakeGenesys::start().await?;
    println!(
        "Embedded fake Genesys: login host {}  API host {}\n",
        fake.login_uri(),
        fake.api_uri()
    );
    let api = fake.api_uri().to_string();
    let api = api.trim_end_matches('/');

    // The three lines of the README.
    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .build_with_default_client()?;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(auth.middleware())
        .build();

    println!("1. Five calls: the first fetches a token, the rest reuse it.");
    for _ in 0..5 {
        let response = client.get(format!("{api}/api/v2/ping")).send().await?;
        response.error_for_status()?;
    }
    expect("token requests", fake.token_requests(), 1)?;

    println!("2. The server revokes every token; 50 concurrent POSTs follow. Those sent with the");
    println!("   revoked token get 401, share ONE token request, and are replayed once with the");
    println!("   new token and the same body (the last ones may already get the new token).");
    fake.revoke_all_tokens();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let client = client.clone();
        let url = format!("{api}/api/v2/echo");
        tasks.spawn(async move { echo(&client, &url, n).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    expect("token requests", fake.token_requests(), 2)?;
    if fake.api_unauthorized() == 0 {
        return Err("the revoked token drew no 401".into());
    }
    expect(
        "API requests (5 + 50 + one replay per 401)",
        fake.api_requests(),
        55 + fake.api_unauthorized(),
    )?;
    println!(
        "   API 401s, each replayed once: {}",
        fake.api_unauthorized()
    );

    println!("3. A refused secret: the AuthError inside reqwest_middleware::Error::Middleware.");
    let refused = GenesysAuth::client_credentials(fake.client_id(), "not-the-secret")
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .build_with_default_client()?;
    let refused_client = ClientBuilder::new(reqwest::Client::new())
        .with(refused.middleware())
        .build();
    match refused_client
        .get(format!("{api}/api/v2/ping"))
        .send()
        .await
    {
        Err(reqwest_middleware::Error::Middleware(error)) => {
            match error.downcast_ref::<AuthError>() {
                Some(auth_error) => println!(
                    "   no token: {} ({auth_error})",
                    auth_error.oauth_code().map_or("?", |code| code.as_str())
                ),
                None => return Err(format!("expected an AuthError, got {error}").into()),
            }
        }
        other => return Err(format!("expected a middleware error, got {other:?}").into()),
    }

    println!("\nEvery call succeeded.");
    fake.shutdown().await;
    Ok(())
}

/// POSTs a body to the echo route and checks it comes back.
async fn echo(client: &ClientWithMiddleware, url: &str, n: u32) -> Result<(), BoxError> {
    let body = format!(r#"{{"call":{n}}}"#);
    let response = client.post(url).body(body.clone()).send().await?;
    let status = response.status();
    let echoed = response.text().await?;
    if status != reqwest::StatusCode::OK || echoed != body {
        return Err(format!("POST {url}: {status}, body {echoed:?}").into());
    }
    Ok(())
}

/// Prints `what` and fails unless it is `expected`.
fn expect(what: &str, got: u64, expected: u64) -> Result<(), BoxError> {
    println!("   {what}: {got}");
    if got != expected {
        return Err(format!("{what}: expected {expected}, got {got}").into());
    }
    Ok(())
}
