//! The front door: [`GenesysAuth`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use tower::retry::RetryLayer;

use crate::auth::{AuthLayer, AuthReplayLayer, Scope, Shared};
use crate::cache::{CacheConfig, TokenCache};
use crate::credentials::{ClientId, ClientSecret, Credentials};
use crate::error::{AuthError, ConfigError};
use crate::observe::{CacheStats, Health};
use crate::pool::{TokenPool, TokenPoolConfig};
use crate::region::{check_absolute, join, Region};
use crate::retry::RefreshOn401;
use crate::rotation::CredentialStore;
use crate::source::{ClientCredentials, TokenHttpService, TokenSource, DEFAULT_MAX_RESPONSE_BYTES};
use crate::token::Token;

/// Genesys Cloud authentication for a tower HTTP client: one token cache, the layer that
/// attaches its tokens, and the policy that replays a request once after a 401.
///
/// Cheap to clone; clones share the cache.
///
/// ```no_run
/// use genesys_auth_layer::{GenesysAuth, Region};
/// use tower::ServiceBuilder;
/// use tower_http::trace::TraceLayer;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
///     .region(Region::EuWest1)
///     .build_with_default_client()?;
/// let client = ServiceBuilder::new()
///     .layer(TraceLayer::new_for_http())
///     .layer(auth.layers()) // attach the token, refresh and replay a 401 once
///     .service(genesys_auth_layer::default_client::https_client::<http_body_util::Full<bytes::Bytes>>());
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct GenesysAuth {
    shared: Arc<Shared>,
    credentials: Option<CredentialStore>,
}

impl GenesysAuth {
    /// Starts building authentication with the client-credentials grant.
    ///
    /// ```
    /// use genesys_auth_layer::{GenesysAuth, Region};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    ///
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .region(Region::EuWest1)
    ///     .build(http_client())?;
    /// assert!(auth.scope().contains(&Region::EuWest1.api_uri()));
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn client_credentials(
        client_id: impl Into<ClientId>,
        client_secret: impl Into<ClientSecret>,
    ) -> GenesysAuthBuilder {
        Self::builder(CredentialSpec::Given {
            id: client_id.into(),
            secret: client_secret.into(),
        })
    }

    /// Starts building authentication with the client-credentials grant from a
    /// [`CredentialStore`] (or [`Credentials`]) that can be rotated at run time, for example
    /// one from [`CredentialStore::watch_file`] or [`Credentials::from_env`]. This is also
    /// how to give a secondary secret ([`Credentials::with_secondary`]), for rotating the
    /// client's secret without downtime.
    ///
    /// ```
    /// use genesys_auth_layer::{CredentialStore, Credentials, GenesysAuth};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    ///
    /// let store = CredentialStore::new(Credentials::new("my-client-id", "my-client-secret")?);
    /// let auth = GenesysAuth::with_credentials(store.clone()).build(http_client())?;
    /// // What the store holds is what the next token request sends.
    /// store.rotate(Credentials::new("new-client-id", "new-client-secret")?);
    /// let current = auth.credentials().expect("client credentials").current();
    /// assert_eq!(current.id().as_str(), "new-client-id");
    ///
    /// // A secondary secret, tried once when the primary one is refused.
    /// let both = Credentials::new("my-client-id", "current-secret")?.with_secondary("next-secret")?;
    /// let auth = GenesysAuth::with_credentials(both).build(http_client())?;
    /// assert!(auth.credentials().unwrap().current().secondary_secret().is_some());
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    ///
    /// The secondary secret belongs to the [`Credentials`], so the builder has no method that
    /// could be ignored for credentials given this way:
    ///
    /// ```compile_fail,E0599
    /// use genesys_auth_layer::{Credentials, GenesysAuth};
    ///
    /// let store = Credentials::new("my-client-id", "my-client-secret").unwrap();
    /// let builder = GenesysAuth::with_credentials(store).secondary_secret("next-secret");
    /// ```
    pub fn with_credentials(credentials: impl Into<CredentialStore>) -> GenesysAuthBuilder {
        Self::builder(CredentialSpec::Store(credentials.into()))
    }

    fn builder(credentials: CredentialSpec) -> GenesysAuthBuilder {
        GenesysAuthBuilder {
            credentials,
            login_uri: Ok(Region::UsEast1.login_uri()),
            api_uri: Ok(Region::UsEast1.api_uri()),
            extra_origins: Vec::new(),
            cache: CacheConfig::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// Authentication from any [`TokenSource`], attaching its tokens to `scope`.
    ///
    /// ```
    /// use genesys_auth_layer::{CacheConfig, GenesysAuth, Region, Scope};
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
    /// let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// let auth = GenesysAuth::from_source(Fixed, CacheConfig::default(), scope);
    /// assert_eq!(auth.token().await?.generation().0, 1); // from `Fixed`
    /// assert!(auth.credentials().is_none()); // no client credentials to rotate
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn from_source(source: impl TokenSource, config: CacheConfig, scope: Scope) -> Self {
        Self::from_layer(AuthLayer::new(TokenCache::new(source, config), scope))
    }

    fn from_layer(layer: AuthLayer) -> Self {
        Self {
            shared: layer.shared,
            credentials: None,
        }
    }

    /// The credentials used for token requests, if this was built with the
    /// client-credentials grant (`None` from [`from_source`](Self::from_source)).
    pub fn credentials(&self) -> Option<&CredentialStore> {
        self.credentials.as_ref()
    }

    /// Replaces the credentials for the next token requests, as
    /// [`CredentialStore::rotate`] on [`credentials`](Self::credentials) does. Returns
    /// `false` (and changes nothing) if this was built from a custom [`TokenSource`].
    pub fn rotate_credentials(&self, credentials: Credentials) -> bool {
        match &self.credentials {
            Some(store) => {
                store.rotate(credentials);
                true
            }
            None => false,
        }
    }

    /// A [`TokenPool`] of up to `config`'s `max_tokens` tokens of this client: its
    /// [`layer`](TokenPool::layer) paces requests under Genesys' per-token limit and
    /// spreads them over the tokens. The pool's tokens are its own (new caches with this
    /// auth's source and configuration), so [`layers`](Self::layers) and
    /// [`token`](Self::token) do not spend their budget. Build it once and clone it: each
    /// call makes a new pool, with new tokens and budgets.
    ///
    /// ```
    /// # fn demo(auth: genesys_auth_layer::GenesysAuth) {
    /// use genesys_auth_layer::TokenPoolConfig;
    ///
    /// let pool = auth.token_pool(TokenPoolConfig::new().max_tokens(4));
    /// assert_eq!(pool.stats().tokens, 1); // it grows when one token's budget is not enough
    /// # }
    /// ```
    pub fn token_pool(&self, config: TokenPoolConfig) -> TokenPool {
        TokenPool::new(self.cache(), self.scope().clone(), config)
    }

    /// The layer that attaches tokens. Put it *inside* [`retry_layer`](Self::retry_layer);
    /// alone, it attaches tokens and replays nothing.
    pub fn layer(&self) -> AuthLayer {
        AuthLayer {
            shared: self.shared.clone(),
        }
    }

    /// The refresh-and-replay-once policy: `ServiceBuilder::retry(auth.retry_policy())` is
    /// the same as `.layer(auth.retry_layer())`.
    pub fn retry_policy(&self) -> RefreshOn401 {
        self.layer().retry_policy()
    }

    /// `tower::retry::RetryLayer` with [`RefreshOn401`]. Put it *outside*
    /// [`layer`](Self::layer).
    ///
    /// ```
    /// use genesys_auth_layer::{CacheConfig, GenesysAuth, Region, Scope};
    /// use tower::{ServiceBuilder, ServiceExt};
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
    /// # let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// let auth = GenesysAuth::from_source(Fixed, CacheConfig::default(), scope);
    /// // `api` answers 401 to the first request, 200 to the next.
    /// # let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    /// # let api = tower::service_fn(move |_: http::Request<String>| {
    /// #     let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
    /// #     let status = if first { 401 } else { 200 };
    /// #     async move { http::Response::builder().status(status).body(String::new()) }
    /// # });
    /// let client = ServiceBuilder::new()
    ///     .layer(auth.retry_layer()) // outside: sees the 401, replays through `layer`
    ///     .layer(auth.layer()) // inside: attaches the (new) token
    ///     .service(api);
    /// let request = http::Request::get("https://api.mypurecloud.com/api/v2/users/me");
    /// let response = client.oneshot(request.body(String::new())?).await?;
    /// assert_eq!(response.status(), 200);
    /// assert_eq!(auth.stats().tokens_fetched, 2); // a new token for the replay
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn retry_layer(&self) -> RetryLayer<RefreshOn401> {
        RetryLayer::new(self.retry_policy())
    }

    /// Attaching the token and replaying a 401 once, in one layer: it behaves as
    /// [`retry_layer`](Self::retry_layer) outside [`layer`](Self::layer), and costs less
    /// per request (see [`AuthReplayLayer`]). Stack those two yourself to put another
    /// layer between them.
    pub fn layers(&self) -> AuthReplayLayer {
        AuthReplayLayer {
            shared: self.shared.clone(),
        }
    }

    /// The token cache, shared by every clone and every layer this gives.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The counters so far (see [`CacheStats`]).
    pub fn stats(&self) -> CacheStats {
        self.shared.cache.stats()
    }

    /// The token supply's health, for a readiness probe (see [`Health`]).
    ///
    /// ```
    /// use genesys_auth_layer::GenesysAuth;
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// /// A readiness probe.
    /// fn ready(auth: &GenesysAuth) -> bool {
    ///     let health = auth.health();
    ///     health.has_valid_token() && health.can_obtain_tokens()
    /// }
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .build(http_client())?;
    /// assert!(!ready(&auth)); // no token yet
    /// auth.token().await?;
    /// assert!(ready(&auth));
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn health(&self) -> Health {
        self.shared.cache.health()
    }

    /// The origins tokens are attached to: the API origin of the region (or of the custom
    /// endpoints) and those added with
    /// [`authorize_origin`](GenesysAuthBuilder::authorize_origin).
    pub fn scope(&self) -> &Scope {
        &self.shared.scope
    }

    /// A valid token, fetching one if needed. Call it at start-up to fail fast on bad
    /// credentials, before the first API call.
    pub async fn token(&self) -> Result<Arc<Token>, AuthError> {
        self.shared.cache.token().await
    }

    /// The same as [`layers`](Self::layers) for a `reqwest` client: a
    /// `reqwest_middleware::Middleware` on this cache and scope (see
    /// [`AuthMiddleware`](crate::AuthMiddleware)).
    #[cfg(feature = "reqwest")]
    #[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
    pub fn middleware(&self) -> crate::AuthMiddleware {
        crate::AuthMiddleware::from_shared(self.shared.clone())
    }
}

impl fmt::Debug for GenesysAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenesysAuth")
            .field("scope", &self.shared.scope)
            .field("cache", &self.shared.cache)
            .finish()
    }
}

/// Configures a [`GenesysAuth`] using the client-credentials grant; start from
/// [`GenesysAuth::client_credentials`] or [`GenesysAuth::with_credentials`]. Its `Debug`
/// never shows the secret.
pub struct GenesysAuthBuilder {
    credentials: CredentialSpec,
    /// The login host's base URI (the token URL is `<login>/oauth/token`), or why the URI
    /// given is not one: reported by `build`.
    login_uri: Result<Uri, ConfigError>,
    /// The API's base URI, or why the URI given is not one.
    api_uri: Result<Uri, ConfigError>,
    extra_origins: Vec<Uri>,
    cache: CacheConfig,
    max_response_bytes: usize,
}

/// Credentials as given to the builder, checked when it builds.
#[derive(Debug)]
enum CredentialSpec {
    Given { id: ClientId, secret: ClientSecret },
    Store(CredentialStore),
}

impl CredentialSpec {
    fn into_store(self) -> Result<CredentialStore, ConfigError> {
        match self {
            Self::Given { id, secret } => Ok(CredentialStore::new(Credentials::new(id, secret)?)),
            Self::Store(store) => Ok(store),
        }
    }
}

impl GenesysAuthBuilder {
    /// The region (default `us-east-1`): tokens come from `https://login.<domain>` and are
    /// attached to requests for `https://api.<domain>`. It replaces both URIs that
    /// [`login_uri`](Self::login_uri) and [`api_uri`](Self::api_uri) set before it.
    pub fn region(mut self, region: Region) -> Self {
        self.login_uri = Ok(region.login_uri());
        self.api_uri = Ok(region.api_uri());
        self
    }

    /// The login host's base URI, instead of the region's: token requests go to
    /// `<login_uri>/oauth/token` (a path in it is kept, for a gateway that serves Genesys
    /// under a prefix; a URI whose path already ends in `/oauth/token` is taken as the token
    /// URL itself). For proxies, gateways and local fakes; `genesys-fake` hands out a
    /// builder already pointed at itself. Plain `http` is accepted only on loopback: the
    /// secret must not cross the network in clear. A URI that does not parse, is not
    /// absolute http(s), or carries `user:password@` fails [`build`](Self::build) with a
    /// [`ConfigError`].
    ///
    /// ```
    /// use genesys_auth_layer::{ConfigError, GenesysAuth};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    ///
    /// // A local fake: plain http is allowed on loopback.
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .login_uri("http://127.0.0.1:8081")
    ///     .api_uri("http://127.0.0.1:8082")
    ///     .build(http_client())?;
    /// assert!(auth.scope().contains(&"http://127.0.0.1:8082/api/v2/users".parse().unwrap()));
    /// // Anywhere else, the secret must not cross the network in clear.
    /// let built = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .login_uri("http://login.example.com")
    ///     .build(http_client());
    /// assert!(matches!(built, Err(ConfigError::InsecureTokenEndpoint(_))));
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn login_uri<T>(mut self, uri: T) -> Self
    where
        T: TryInto<Uri>,
        T::Error: Into<http::Error>,
    {
        self.login_uri = base_uri(uri, "the login URI");
        self
    }

    /// The API's base URI, instead of the region's: its origin (scheme, host, port) is
    /// where tokens are attached. Same rules as [`login_uri`](Self::login_uri); see
    /// [`authorize_origin`](Self::authorize_origin) to attach tokens to more origins.
    pub fn api_uri<T>(mut self, uri: T) -> Self
    where
        T: TryInto<Uri>,
        T::Error: Into<http::Error>,
    {
        self.api_uri = base_uri(uri, "the API URI");
        self
    }

    /// Also attach tokens to requests for this origin (scheme, host and port of `uri`).
    ///
    /// ```
    /// use genesys_auth_layer::{GenesysAuth, Region};
    /// use http::Uri;
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    ///
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .authorize_origin(Uri::from_static("https://gateway.example.com"))
    ///     .build(http_client())?;
    /// let users = Uri::from_static("https://gateway.example.com/api/v2/users");
    /// assert!(auth.scope().contains(&users));
    /// assert!(auth.scope().contains(&Region::UsEast1.api_uri())); // and the region's API
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn authorize_origin(mut self, uri: Uri) -> Self {
        self.extra_origins.push(uri);
        self
    }

    /// All cache settings at once (a name, `refresh_while_idle`, …; see [`CacheConfig`]):
    /// it replaces what [`refresh_ahead`](Self::refresh_ahead),
    /// [`fetch_timeout`](Self::fetch_timeout) and [`backoff`](Self::backoff) set before it.
    pub fn cache_config(mut self, config: CacheConfig) -> Self {
        self.cache = config;
        self
    }

    /// See [`CacheConfig::refresh_ahead`].
    pub fn refresh_ahead(mut self, at_least: Duration, fraction: f64) -> Self {
        self.cache = self.cache.refresh_ahead(at_least, fraction);
        self
    }

    /// See [`CacheConfig::fetch_timeout`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::{AuthError, GenesysAuth};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
    /// #             .await
    /// #     })
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .fetch_timeout(Duration::from_millis(50))
    ///     .build(http_client())?; // a token endpoint that never answers
    /// let err = auth.token().await.unwrap_err();
    /// assert!(matches!(err, AuthError::Timeout(limit) if limit == Duration::from_millis(50)));
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.cache = self.cache.fetch_timeout(timeout);
        self
    }

    /// See [`CacheConfig::backoff`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::{AuthError, GenesysAuth};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         http::Response::builder().status(503).body(String::new())
    /// #     })
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret")
    ///     .backoff(Duration::from_secs(5), Duration::from_secs(120))
    ///     .build(http_client())?; // a token endpoint that answers 503
    /// assert!(auth.token().await.is_err());
    /// // No second request before the backoff ends (2.5 to 5 s after a first failure):
    /// // callers get the same error again at once.
    /// let err = auth.token().await.unwrap_err();
    /// assert!(matches!(err, AuthError::UnexpectedStatus { status, .. } if status == 503));
    /// assert!(auth.health().backoff_remaining.unwrap() <= Duration::from_secs(5));
    /// assert_eq!(auth.stats().refreshes, 1);
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.cache = self.cache.backoff(initial, max);
        self
    }

    /// See [`ClientCredentials::max_response_bytes`]: a longer token response fails with
    /// [`AuthError::ResponseTooLarge`].
    pub fn max_token_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Builds it, sending token requests through `token_http` (any tower HTTP service, such
    /// as a hyper-util client). Nothing is sent yet: the first token request goes out when
    /// a token is needed. Fails with a [`ConfigError`] on empty credentials, a plain-`http`
    /// token endpoint or origin off loopback, or a URI that is not absolute.
    pub fn build<S: TokenHttpService>(self, token_http: S) -> Result<GenesysAuth, ConfigError> {
        let store = self.credentials.into_store()?;
        let login_uri = self.login_uri?;
        // A token URL given as the login URI (as `Endpoints::custom` took) is used as it is.
        let token_url = if login_uri
            .path()
            .trim_end_matches('/')
            .ends_with("/oauth/token")
        {
            login_uri
        } else {
            join(&login_uri, "/oauth/token")
        };
        let source = ClientCredentials::new(token_http, token_url, store.clone())?
            .max_response_bytes(self.max_response_bytes);
        let mut scope = Scope::new([self.api_uri?])?;
        for origin in self.extra_origins {
            scope = scope.with_origin(origin)?;
        }
        let mut auth = GenesysAuth::from_source(source, self.cache, scope);
        auth.credentials = Some(store);
        Ok(auth)
    }

    /// Builds it with the crate's default HTTPS client
    /// ([`https_client`](crate::default_client::https_client)) for token requests; as with
    /// [`build`](Self::build), nothing is sent until a token is needed.
    #[cfg(feature = "default-client")]
    #[cfg_attr(docsrs, doc(cfg(feature = "default-client")))]
    pub fn build_with_default_client(self) -> Result<GenesysAuth, ConfigError> {
        self.build(crate::default_client::https_client::<
            http_body_util::Full<bytes::Bytes>,
        >())
    }
}

/// `uri` as an absolute http(s) URI; `what` names it in the error.
fn base_uri<T>(uri: T, what: &str) -> Result<Uri, ConfigError>
where
    T: TryInto<Uri>,
    T::Error: Into<http::Error>,
{
    let uri = uri
        .try_into()
        .map_err(|e| ConfigError::InvalidUri(format!("{what} ({})", e.into())))?;
    check_absolute(uri).map_err(|e| match e {
        ConfigError::InvalidUri(shown) => ConfigError::InvalidUri(format!("{what} {shown}")),
        other => other,
    })
}

impl fmt::Debug for GenesysAuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenesysAuthBuilder")
            .field("credentials", &self.credentials)
            .field("login_uri", &self.login_uri)
            .field("api_uri", &self.api_uri)
            .field("extra_origins", &self.extra_origins)
            .field("cache", &self.cache)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_called() -> impl TokenHttpService {
        tower::service_fn(
            |_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
                Err::<http::Response<String>, _>(std::io::Error::other("not called"))
            },
        )
    }

    #[test]
    fn the_region_replaces_the_default_and_sets_the_scope() {
        let auth = GenesysAuth::client_credentials("id", "secret")
            .region(Region::EuWest1)
            .build(never_called())
            .unwrap();
        let in_region = Region::EuWest1.api_uri();
        assert!(auth.scope().contains(&in_region));
        assert!(!auth.scope().contains(&Region::UsEast1.api_uri()));
    }

    /// An HTTP client that records the URI of each token request and answers a token.
    fn recording() -> (impl TokenHttpService, Arc<std::sync::Mutex<Vec<Uri>>>) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let http = tower::service_fn({
            let seen = seen.clone();
            move |request: http::Request<http_body_util::Full<bytes::Bytes>>| {
                seen.lock().unwrap().push(request.uri().clone());
                async {
                    let body = r#"{"access_token":"t","token_type":"bearer","expires_in":60}"#;
                    Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
                }
            }
        });
        (http, seen)
    }

    #[tokio::test]
    async fn login_and_api_uris_say_which_is_which() {
        let (http, seen) = recording();
        let auth = GenesysAuth::client_credentials("id", "secret")
            .api_uri("http://127.0.0.1:8082")
            .login_uri(Uri::from_static("http://127.0.0.1:8081/genesys/"))
            .build(http)
            .unwrap();
        auth.token().await.unwrap();
        let token_url = seen.lock().unwrap()[0].to_string();
        assert_eq!(token_url, "http://127.0.0.1:8081/genesys/oauth/token");
        assert!(auth
            .scope()
            .contains(&"http://127.0.0.1:8082/api/v2/x".parse().unwrap()));
        assert!(!auth
            .scope()
            .contains(&"http://127.0.0.1:8081/api/v2/x".parse().unwrap()));
        assert!(!auth.scope().contains(&Region::UsEast1.api_uri()));

        // The region replaces both; a URI set after it replaces its own half only.
        let (http, seen) = recording();
        let auth = GenesysAuth::client_credentials("id", "secret")
            .login_uri("http://127.0.0.1:8081")
            .region(Region::EuWest1)
            .api_uri(String::from("http://127.0.0.1:8082"))
            .build(http)
            .unwrap();
        auth.token().await.unwrap();
        assert_eq!(seen.lock().unwrap()[0], Region::EuWest1.token_url());
        assert!(!auth.scope().contains(&Region::EuWest1.api_uri()));

        // A full token URL given as the login URI is the token URL.
        let (http, seen) = recording();
        let auth = GenesysAuth::client_credentials("id", "secret")
            .login_uri("http://127.0.0.1:8081/genesys/oauth/token")
            .build(http)
            .unwrap();
        auth.token().await.unwrap();
        let token_url = seen.lock().unwrap()[0].to_string();
        assert_eq!(token_url, "http://127.0.0.1:8081/genesys/oauth/token");
    }

    #[test]
    fn a_bad_uri_fails_the_build_and_names_which_without_showing_a_password() {
        let build = |login: &str, api: &str| {
            GenesysAuth::client_credentials("id", "secret")
                .login_uri(login)
                .api_uri(api)
                .build(never_called())
                .unwrap_err()
        };
        let ok = "https://api.example.com";
        for (login, api, names, shows) in [
            ("not a uri", ok, "the login URI", "invalid uri"),
            (ok, "https://exa mple.com", "the API URI", "invalid uri"),
            ("/oauth", ok, "the login URI", "/oauth"),
            (ok, "/api", "the API URI", "/api"),
            (
                "ftp://login.example.com",
                ok,
                "the login URI",
                "ftp://login.example.com",
            ),
            (
                "https://gwuser:GWPASS@login.example.com",
                ok,
                "the login URI",
                "[redacted]",
            ),
            (
                ok,
                "https://gwuser:GWPASS@api.example.com",
                "the API URI",
                "[redacted]",
            ),
        ] {
            let err = build(login, api);
            let shown = format!("{err} {err:?}");
            assert!(matches!(err, ConfigError::InvalidUri(_)), "{shown}");
            assert!(shown.contains(names) && shown.contains(shows), "{shown}");
            assert!(
                !shown.contains("GWPASS") && !shown.contains("gwuser"),
                "{shown}"
            );
        }
        let err = build("http://login.example.com", ok);
        assert!(
            matches!(err, ConfigError::InsecureTokenEndpoint(_)),
            "{err}"
        );
    }

    #[test]
    fn the_builders_debug_hides_the_secrets() {
        let builder = GenesysAuth::client_credentials("my-id", "first-secret-value");
        let shown = format!("{builder:?} {builder:#?}");
        assert!(shown.contains("my-id"), "{shown}");
        assert!(!shown.contains("first-secret-value"), "{shown}");
        let both = Credentials::new("my-id", "first-secret-value")
            .and_then(|c| c.with_secondary("second-secret-value"))
            .unwrap();
        let builder = GenesysAuth::with_credentials(both);
        let shown = format!("{builder:?} {builder:#?}");
        assert!(shown.contains("my-id"), "{shown}");
        assert!(!shown.contains("first-secret-value"), "{shown}");
        assert!(!shown.contains("second-secret-value"), "{shown}");
    }
}
