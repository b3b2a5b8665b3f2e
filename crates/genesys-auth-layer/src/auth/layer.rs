use std::sync::Arc;

use tower::Layer;

use super::{AuthService, Scope, Shared};
use crate::cache::TokenCache;
use crate::retry::RefreshOn401;

/// A [`Layer`] that wraps services in [`AuthService`].
///
/// Usually obtained from [`GenesysAuth::layer`](crate::GenesysAuth::layer); build one by hand
/// to pair your own [`TokenCache`] with a [`Scope`].
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{AuthLayer, BoxFuture, AuthError, CacheConfig, IssuedToken, Region, Scope, TokenCache, TokenSource};
/// use tower::ServiceBuilder;
///
/// struct Fixed;
/// impl TokenSource for Fixed {
///     fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
///         Box::pin(async { Ok(IssuedToken::bearer("t", Duration::from_secs(3600)).unwrap()) })
///     }
/// }
///
/// let cache = TokenCache::new(Fixed, CacheConfig::default());
/// let layer = AuthLayer::new(cache, Scope::new([Region::UsEast1.api_uri()])?);
/// let service = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     });
/// # Ok::<(), genesys_auth_layer::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AuthLayer {
    pub(crate) shared: Arc<Shared>,
}

impl AuthLayer {
    /// A layer attaching tokens from `cache` to requests whose origin is in `scope`.
    pub fn new(cache: TokenCache, scope: Scope) -> Self {
        Self {
            shared: Arc::new(Shared::new(cache, scope)),
        }
    }

    /// The cache the tokens come from.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The refresh-and-replay-once policy for this layer's tokens; put
    /// `tower::retry::RetryLayer::new(policy)` *outside* this layer.
    ///
    /// It replays only 401s to tokens of this layer's cache, so stacks for two
    /// organisations can be nested in one client without replaying each other's 401s.
    pub fn retry_policy(&self) -> RefreshOn401 {
        RefreshOn401::new(self.shared.cache_id)
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService::new(inner, self.shared.clone())
    }
}
