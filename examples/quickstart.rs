//! The README's first command: `cargo run --release --example quickstart`.
//!
//! With no configuration it starts the embedded fake Genesys (`genesys-fake`) on loopback
//! and shows the layer at work: calls across a token's refresh window and expiry, then a
//! server-side revocation of every token hit by 50 concurrent calls. With
//! `GENESYSCLOUD_OAUTHCLIENT_ID`, `GENESYSCLOUD_OAUTHCLIENT_SECRET` and `GENESYSCLOUD_REGION`
//! set (the names Genesys' CLI and Terraform provider use), it makes one real call,
//! `GET /api/v2/organizations/me`, and prints the organization's name. With
//! `GENESYSCLOUD_LOGIN_URI` and `GENESYSCLOUD_API_URI` set as well, that call goes to the
//! hosts they name instead of the region's (a private gateway, or a `genesys-fake` started on
//! its own, which is how CI runs this path).

use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::default_client::https_client;
use genesys_auth_layer::{GenesysAuth, Region};
use genesys_fake::FakeGenesys;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "genesys_auth_layer=info".into()),
        )
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let id = std::env::var("GENESYSCLOUD_OAUTHCLIENT_ID").ok();
    let secret = std::env::var("GENESYSCLOUD_OAUTHCLIENT_SECRET").ok();
    match (id, secret) {
        (Some(id), Some(secret)) => real_genesys(id, secret).await,
        _ => fake_genesys().await,
    }
}

/// One call to the real Genesys Cloud (or to the hosts `GENESYSCLOUD_LOGIN_URI` and
/// `GENESYSCLOUD_API_URI` name).
async fn real_genesys(id: String, secret: String) -> Result<(), BoxError> {
    let login = std::env::var("GENESYSCLOUD_LOGIN_URI").ok();
    let api = std::env::var("GENESYSCLOUD_API_URI").ok();
    let builder = GenesysAuth::client_credentials(id, secret);
    let (builder, api_uri, place) = match (login, api) {
        (Some(login), Some(api)) => {
            let api_uri: Uri = api.parse()?;
            (
                builder.login_uri(login).api_uri(api_uri.clone()),
                api_uri,
                api,
            )
        }
        (None, None) => {
            let region: Region = std::env::var("GENESYSCLOUD_REGION")
                .unwrap_or_else(|_| "us-east-1".into())
                .parse()?;
            (
                builder.region(region),
                region.api_uri(),
                format!("Region {region}"),
            )
        }
        _ => {
            return Err(
                "set both GENESYSCLOUD_LOGIN_URI and GENESYSCLOUD_API_URI, or neither".into(),
            )
        }
    };
    let auth = builder.build_with_default_client()?;
    let client = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(auth.layers())
        .service(https_client::<Full<Bytes>>());

    let uri = format!(
        "{}/api/v2/organizations/me",
        api_uri.to_string().trim_end_matches('/')
    );
    let response = client
        .oneshot(Request::get(uri).body(Full::default())?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!("GET /api/v2/organizations/me answered {status}").into());
    }
    let org: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "{place}: organization {:?}",
        org.get("name").and_then(|n| n.as_str()).unwrap_or("?")
    );
    Ok(())
}

/// A tour of the layer against the embedded fake.
async fn fake_genesys() -> Result<(), BoxError> {
    const LIFETIME: Duration = Duration::from_secs(4);
    let fake = FakeGenesys::builder()
        .token_lifetime(LIFETIME)
        .start()
        .await?;
    println!("No GENESYSCLOUD_OAUTHCLIENT_ID/SECRET set: using the embedded fake Genesys");
    println!(
        "  login host {}  API host {}",
        fake.login_uri(),
        fake.api_uri()
    );
    println!("  token lifetime {LIFETIME:?}\n");

    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        // Refresh in the last second of the token's life, for a short demo.
        .refresh_ahead(Duration::from_secs(1), 0.0)
        .build_with_default_client()?;
    let client = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(auth.layers())
        .service(https_client::<Full<Bytes>>());
    let ping: Uri = format!("{}api/v2/ping", fake.api_uri()).parse()?;
    let mut calls = 0u64;

    println!("1. Five calls: the first fetches a token, the rest reuse it.");
    for _ in 0..5 {
        call(&client, &ping).await?;
        calls += 1;
    }
    report(&fake, &auth, calls);

    println!("2. Calls every 500 ms for 9 s: two lifetimes pass; tokens are refreshed");
    println!("   in the background before they expire, so no call waits for one.");
    let waited_before = auth.cache().stats().waited_for_token;
    for _ in 0..18 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        call(&client, &ping).await?;
        calls += 1;
    }
    report(&fake, &auth, calls);
    println!(
        "   calls that waited for a token in this phase: {}",
        auth.cache().stats().waited_for_token - waited_before
    );

    println!("3. The server revokes every token; 50 concurrent calls all get 401,");
    println!("   share ONE token request, and are replayed once with the new token.");
    // Let a background refresh started by the last call finish first: a token the server
    // issues after the revocation would not be revoked.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tokens_before = fake.tokens_issued();
    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = client.clone();
        let ping = ping.clone();
        tasks.push(tokio::spawn(async move { call(&client, &ping).await }));
    }
    for task in tasks {
        task.await??;
        calls += 1;
    }
    report(&fake, &auth, calls);
    println!(
        "   token requests caused by the revocation: {}",
        fake.tokens_issued() - tokens_before
    );
    println!("\nEvery call succeeded.");
    fake.shutdown().await;
    Ok(())
}

async fn call<S, B>(client: &S, uri: &Uri) -> Result<(), BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let response = client
        .clone()
        .oneshot(Request::get(uri.clone()).body(Full::default())?)
        .await
        .map_err(Into::into)?;
    let status = response.status();
    response.into_body().collect().await.map_err(Into::into)?;
    if status != StatusCode::OK {
        return Err(format!("GET {uri} answered {status}").into());
    }
    Ok(())
}

fn report(fake: &FakeGenesys, auth: &GenesysAuth, calls: u64) {
    println!(
        "   calls {calls:>3} | token requests {:>2} | API 401s (each replayed once) {:>2} | token generation {}\n",
        fake.token_requests(),
        fake.api_unauthorized(),
        auth.cache().current().map_or(0, |t| t.generation().0),
    );
}
