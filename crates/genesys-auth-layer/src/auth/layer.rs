use std::sync::Arc;

use tower::Layer;

use super::{AuthService, Scope, Shared};
use crate::cache::TokenCache;
use crate::retry::RefreshOn401;

/// A [`Layer`] that wraps services in [`AuthService`].
///
/// Usually obtained from [`GenesysAuth::layer`](crate::GenesysAuth::layer); build one by hand
/// to pair your own [`TokenCache`] with a [`Scope`]. Requests outside the scope go out
/// untouched:
///
/// ```
/// use genesys_auth_layer::{AuthLayer, CacheConfig, Region, Scope, TokenCache};
/// use tower::{Layer, ServiceExt};
/// # mod fake {
/// #     use std::time::Duration;
/// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
/// #     pub struct Fixed;
/// #     impl TokenSource for Fixed {
/// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
/// #             let token = IssuedToken::bearer("t", Duration::from_secs(3600));
/// #             Box::pin(async move { Ok(token.expect("a valid token")) })
/// #         }
/// #     }
/// # }
/// # use fake::Fixed;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // `api` answers whether the request carried a token.
/// # let api = tower::service_fn(|req: http::Request<String>| async move {
/// #     let authorized = req.headers().contains_key(http::header::AUTHORIZATION);
/// #     let body = if authorized { "authorized" } else { "anonymous" };
/// #     Ok::<_, tower::BoxError>(http::Response::new(body.to_owned()))
/// # });
/// let cache = TokenCache::new(Fixed, CacheConfig::default());
/// let service = AuthLayer::new(cache, Scope::new([Region::UsEast1.api_uri()])?).layer(api);
/// let to_api = http::Request::get("https://api.mypurecloud.com/api/v2/users/me");
/// let response = service.clone().oneshot(to_api.body(String::new())?).await?;
/// assert_eq!(response.into_body(), "authorized");
/// let elsewhere = http::Request::get("https://example.com/").body(String::new())?;
/// assert_eq!(service.oneshot(elsewhere).await?.into_body(), "anonymous"); // out of scope
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
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

    /// The cache the tokens come from: `layer.cache().token().await` at start-up gets the
    /// first token before a request needs one.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The refresh-and-replay-once policy for this layer's tokens; put
    /// `tower::retry::RetryLayer::new(policy)` *outside* this layer.
    ///
    /// It replays only 401s to tokens of this layer's cache, so stacks for two
    /// organisations can be nested in one client without replaying each other's 401s.
    ///
    /// ```
    /// use genesys_auth_layer::AuthLayer;
    /// use tower::ServiceBuilder;
    ///
    /// # fn demo(emea: AuthLayer, apac: AuthLayer) {
    /// // Two organisations in one client: each policy replays only its own layer's 401s.
    /// let client = ServiceBuilder::new()
    ///     .retry(emea.retry_policy())
    ///     .layer(emea)
    ///     .retry(apac.retry_policy())
    ///     .layer(apac)
    ///     .service_fn(|req: http::Request<String>| async move {
    ///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
    ///     });
    /// # let _ = client; }
    /// ```
    pub fn retry_policy(&self) -> RefreshOn401 {
        RefreshOn401::new(self.shared.cache.id())
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService::new(inner, self.shared.clone())
    }
}
