//! Zero-downtime secret rotation, seen from outside: load runs through the full stack over
//! loopback while the fake Genesys goes through a whole rotation.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{
    AuthError, ClientCredentials, CredentialStore, Credentials, GenesysAuth, SecretSlot,
    TokenSource,
};
use genesys_fake::FakeGenesys;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use common::h2_client;

/// Requests answered so far by [`load`]: succeeded and failed.
#[derive(Clone, Default)]
struct Progress {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Progress {
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have been answered: each step of a rotation happens
    /// under load however slowly a busy machine runs it.
    async fn more(&self, n: u64) {
        let target = self.answered() + n;
        let reached = common::eventually(PATIENCE, || async { self.answered() >= target }).await;
        assert!(reached, "the load stalled: {} answered", self.answered());
    }
}

/// How long a wait for something that must happen may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `workers` loops of GET /api/v2/ping until `stop`, counting answers in `progress`;
/// returns (ok, failed).
async fn load<S, B>(
    client: S,
    fake: &FakeGenesys,
    workers: usize,
    stop: Arc<AtomicBool>,
    progress: Progress,
) -> (u64, u64)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Progress { ok, failed } = progress;
    let uri = format!("{}api/v2/ping", fake.api_uri());
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, stop, ok, failed, uri) = (
                client.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                uri.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = Request::get(&uri).body(Full::default()).unwrap();
                    let result = client.clone().oneshot(request).await.map_err(Into::into);
                    let good = match result {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            status == 200
                        }
                        Err(_) => false,
                    };
                    if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rotation_under_load_fails_no_request() {
    let fake = FakeGenesys::builder()
        .client("rotating-client", "secret-A")
        .token_latency(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    // The application knows the old secret and the next one.
    let credentials = Credentials::new("rotating-client", "secret-A")
        .and_then(|c| c.with_secondary("secret-B"))
        .unwrap();
    let auth = GenesysAuth::with_credentials(credentials)
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .build(h2_client())
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(auth.layers())
        .service(h2_client());

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Progress::default();
    let running = tokio::spawn({
        let (client, fake, stop) = (client.clone(), fake.clone(), stop.clone());
        let progress = progress.clone();
        async move { load(client, &fake, 32, stop, progress).await }
    });
    // Each step after the load has answered some more requests.
    let step = 50;
    progress.more(step).await;
    fake.add_secondary_secret("secret-B"); // 1. the operator adds the new secret
    progress.more(step).await;
    fake.promote_secondary_secret(); // 2. switches to it
    progress.more(step).await;
    fake.remove_secondary_secret(); // 3. deletes the old one
    progress.more(step).await;
    fake.revoke_all_tokens(); // 4. and revokes every token issued with it
                              // The revocation is felt and the refresh done (A refused, B accepted); load goes on.
    let refreshed = common::eventually(PATIENCE, || async {
        fake.api_unauthorized() > 0 && fake.tokens_issued() >= 2
    })
    .await;
    assert!(refreshed, "no refresh after the revocation");
    progress.more(2 * step).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = running.await.unwrap();

    assert_eq!(
        failed, 0,
        "no request may fail during the rotation ({ok} succeeded)"
    );
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert!(fake.api_unauthorized() > 0, "the revocation was felt");
    assert_eq!(
        auth.credentials().unwrap().preferred_slot(),
        SecretSlot::Secondary,
        "the secret that works is kept"
    );
    // Initial token, then one refresh after the revocation: A refused, B accepted.
    assert_eq!(fake.token_requests(), 3);
    assert_eq!(fake.tokens_issued(), 2);
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secrets_file_update_rotates_without_a_restart() {
    let fake = FakeGenesys::builder()
        .client("file-client", "first")
        .start()
        .await
        .unwrap();
    let path = std::env::temp_dir().join(format!("genesys-rotation-{}.env", std::process::id()));
    std::fs::write(
        &path,
        "GENESYSCLOUD_OAUTHCLIENT_ID=file-client\nGENESYSCLOUD_OAUTHCLIENT_SECRET=first\n",
    )
    .unwrap();
    let (store, _watcher) = CredentialStore::watch_file(&path, Duration::from_millis(20))
        .await
        .unwrap();
    let auth = GenesysAuth::with_credentials(store.clone())
        .login_uri(fake.login_uri())
        .api_uri(fake.api_uri())
        .build(h2_client())
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(auth.layers())
        .service(h2_client());

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Progress::default();
    let running = tokio::spawn({
        let (client, fake, stop) = (client.clone(), fake.clone(), stop.clone());
        let progress = progress.clone();
        async move { load(client, &fake, 16, stop, progress).await }
    });
    progress.more(50).await;
    // The vault agent writes the new secret; the fake starts accepting it; later the old
    // one goes away and its tokens are revoked.
    fake.add_secondary_secret("second");
    std::fs::write(
        &path,
        "GENESYSCLOUD_OAUTHCLIENT_ID=file-client\nGENESYSCLOUD_OAUTHCLIENT_SECRET=second\n",
    )
    .unwrap();
    common::eventually(PATIENCE, || async {
        store.current().secret().expose_secret() == "second"
    })
    .await;
    assert_eq!(
        store.current().secret().expose_secret(),
        "second",
        "the file was re-read"
    );
    fake.promote_secondary_secret();
    fake.remove_secondary_secret();
    fake.revoke_all_tokens();
    // The revocation is felt and the refresh done; load goes on with the new token.
    let refreshed = common::eventually(PATIENCE, || async { fake.token_requests() >= 2 }).await;
    assert!(refreshed, "no refresh after the revocation");
    progress.more(50).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = running.await.unwrap();
    assert_eq!(failed, 0, "{ok} succeeded");
    assert_eq!(
        fake.token_requests(),
        2,
        "one refresh, with the new secret at once"
    );
    let _ = std::fs::remove_file(&path);
    fake.shutdown().await;
}

/// The token source on its own, against the in-process fake: a refused primary secret is
/// followed by one request with the secondary one, which is then preferred.
#[tokio::test]
async fn secondary_secret_fallback_is_tried_once_and_remembered() {
    let fake = FakeGenesys::builder()
        .client("id", "current")
        .build_in_process();
    let creds = Credentials::new("id", "retired")
        .unwrap()
        .with_secondary("current")
        .unwrap();
    let source = ClientCredentials::new(
        fake.service(),
        Uri::from_static("http://127.0.0.1:9/oauth/token"),
        creds,
    )
    .unwrap();
    source.fetch().await.unwrap();
    assert_eq!(
        fake.token_requests(),
        2,
        "primary refused, secondary accepted"
    );
    assert_eq!(source.credentials().fallbacks(), 1);
    assert_eq!(source.credentials().preferred_slot(), SecretSlot::Secondary);
    source.fetch().await.unwrap();
    assert_eq!(
        fake.token_requests(),
        3,
        "the secret that worked is tried first"
    );
    assert_eq!(source.credentials().fallbacks(), 1);

    // Both refused: one typed error naming both attempts, after exactly two requests.
    fake.set_primary_secret("something-else");
    fake.remove_secondary_secret();
    let err = source.fetch().await.unwrap_err();
    assert!(
        matches!(err, AuthError::BothSecretsRejected { .. }),
        "{err}"
    );
    assert!(err.is_fatal());
    let shown = err.to_string();
    assert!(
        shown.contains("primary: token endpoint refused") && shown.contains("secondary:"),
        "{shown}"
    );
    assert!(
        !shown.contains("retired") && !shown.contains("current"),
        "{shown}"
    );
    assert_eq!(fake.token_requests(), 5);
    assert_eq!(source.credentials().fallbacks(), 2);
}

/// The token source reads the store at each fetch.
#[tokio::test]
async fn rotated_credentials_are_used_by_the_next_fetch() {
    let fake = FakeGenesys::builder()
        .client("id", "one")
        .build_in_process();
    let source = ClientCredentials::new(
        fake.service(),
        Uri::from_static("http://127.0.0.1:9/oauth/token"),
        Credentials::new("id", "one").unwrap(),
    )
    .unwrap();
    source.fetch().await.unwrap();
    fake.set_primary_secret("two");
    assert!(source.fetch().await.is_err());
    source
        .credentials()
        .rotate(Credentials::new("id", "two").unwrap());
    source.fetch().await.unwrap();
}
