//! Test helpers shared by the unit tests of several modules.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use crate::source::BoxFuture;
use crate::{AuthError, CacheConfig, GenesysAuth, IssuedToken, Scope, TokenSource};

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
