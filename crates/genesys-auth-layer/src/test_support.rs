//! Test helpers shared by the unit tests of several modules.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder};

use crate::source::BoxFuture;
use crate::{AuthError, CacheConfig, GenesysAuth, IssuedToken, ReplayableBody, Scope, TokenSource};

/// Issues `token-1`, `token-2`, … (valid an hour) 10 ms after being asked, and counts them.
#[derive(Clone, Default)]
pub(crate) struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// Tokens asked for so far.
    pub(crate) fn issued(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl TokenSource for Counter {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(IssuedToken::bearer(&format!("token-{n}"), Duration::from_secs(3600)).unwrap())
        })
    }
}

/// An auth over `source`, for requests to `https://api.example.test`.
pub(crate) fn auth(source: Counter) -> GenesysAuth {
    let scope = Scope::new([Uri::from_static("https://api.example.test")]).unwrap();
    GenesysAuth::from_source(source, CacheConfig::default(), scope)
}

/// The two ways to stack auth and replay.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// `auth.layers()`: the fused [`AuthReplayLayer`](crate::AuthReplayLayer).
    Fused,
    /// tower's `Retry` with `RefreshOn401` (`auth.retry_layer()`) over `auth.layer()`.
    Tower,
}

impl Kind {
    /// Both kinds.
    pub(crate) const BOTH: [Kind; 2] = [Kind::Fused, Kind::Tower];
}

/// A stack, boxed so that both kinds have one type.
pub(crate) type Boxed<B, R> = BoxCloneService<Request<B>, Response<R>, BoxError>;

/// `auth`'s stack of `kind` over `inner`.
pub(crate) fn over<S, B, R>(auth: &GenesysAuth, kind: Kind, inner: S) -> Boxed<B, R>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: ReplayableBody + Send + 'static,
    R: Send + 'static,
{
    match kind {
        Kind::Fused => Boxed::new(ServiceBuilder::new().layer(auth.layers()).service(inner)),
        Kind::Tower => Boxed::new(
            ServiceBuilder::new()
                .layer(auth.retry_layer())
                .layer(auth.layer())
                .service(inner),
        ),
    }
}

/// Every counter the recorder holds, as `name["label=value", …]` (labels sorted).
#[cfg(feature = "metrics")]
pub(crate) fn counter_values(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> std::collections::HashMap<String, u64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => {
                let key = key.key();
                let mut labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                labels.sort();
                Some((format!("{}{:?}", key.name(), labels), n))
            }
            _ => None,
        })
        .collect()
}
