//! Seeing the layer work, and seeing it fail: `cargo run --example observability`.
//!
//! Runs against the embedded fake Genesys with `tracing-subscriber` printing the layer's
//! events and spans, then deletes the OAuth client on the fake (what happens when someone
//! removes it in the Genesys admin UI). Client-credentials failures raise no Genesys
//! operational event; only the program calling `/oauth/token` can see them. Here the health
//! view notices before the cached token runs out, which is what a readiness probe needs.

use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::default_client::https_client;
use genesys_auth_layer::GenesysAuth;
use genesys_fake::FakeGenesys;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "genesys_auth_layer=debug".into()),
        )
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let fake = FakeGenesys::builder()
        .token_lifetime(Duration::from_secs(3600))
        .start()
        .await?;
    let auth = GenesysAuth::client_credentials(fake.client_id(), fake.client_secret())
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .backoff(Duration::from_millis(200), Duration::from_secs(2))
        .build_with_default_client()?;
    let client = ServiceBuilder::new()
        .layer(auth.layers())
        .service(https_client::<Full<Bytes>>());
    let ping = format!("{}api/v2/ping", fake.api_uri());
    let call = || {
        let request = Request::get(&ping).body(Full::<Bytes>::default());
        let client = client.clone();
        async move {
            let response = client.oneshot(request?).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        }
    };

    println!("--- normal operation");
    call().await?;
    fake.revoke_all_tokens();
    call().await?; // 401, one refresh, one replay
    println!("health: {:#?}", auth.health());

    println!("\n--- the OAuth client is deleted in Genesys; every token is revoked");
    fake.delete_client();
    fake.revoke_all_tokens();
    for _ in 0..3 {
        match call().await {
            Ok(status) => println!("call answered {status}"),
            Err(err) => println!("call failed: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let health = auth.health();
    println!(
        "readiness: can_obtain_tokens={} consecutive_failures={} last_error={}",
        health.can_obtain_tokens(),
        health.consecutive_failures,
        health
            .last_error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );

    println!("\n--- the client is restored; the next call after the backoff recovers");
    fake.restore_client();
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("call answered {}", call().await?);
    println!("stats: {:#?}", auth.stats());
    fake.shutdown().await;
    Ok(())
}
