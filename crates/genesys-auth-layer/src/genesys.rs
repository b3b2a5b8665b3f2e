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
use crate::region::{Endpoints, Region};
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
    pub fn client_credentials(
        client_id: impl Into<ClientId>,
        client_secret: impl Into<ClientSecret>,
    ) -> GenesysAuthBuilder {
        Self::builder(CredentialSpec::Given {
            id: client_id.into(),
            secret: client_secret.into(),
            secondary: None,
        })
    }

    /// Starts building authentication with the client-credentials grant from a
    /// [`CredentialStore`] (or [`Credentials`]) that can be rotated at run time, for example
    /// one from [`CredentialStore::watch_file`] or [`Credentials::from_env`].
    pub fn with_credentials(credentials: impl Into<CredentialStore>) -> GenesysAuthBuilder {
        Self::builder(CredentialSpec::Store(credentials.into()))
    }

    fn builder(credentials: CredentialSpec) -> GenesysAuthBuilder {
        GenesysAuthBuilder {
            credentials,
            endpoints: Region::UsEast1.endpoints(),
            extra_origins: Vec::new(),
            cache: CacheConfig::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// Authentication from any [`TokenSource`], attaching its tokens to `scope`.
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
    /// client-credentials grant.
    pub fn credentials(&self) -> Option<&CredentialStore> {
        self.credentials.as_ref()
    }

    /// Replaces the credentials for the next token requests. Returns `false` (and changes
    /// nothing) if this was built from a custom [`TokenSource`].
    pub fn rotate_credentials(&self, credentials: Credentials) -> bool {
        match &self.credentials {
            Some(store) => {
                store.rotate(credentials);
                true
            }
            None => false,
        }
    }

    /// The layer that attaches tokens. Put it *inside* [`retry_layer`](Self::retry_layer).
    ///
    /// ```
    /// # fn demo(auth: genesys_auth_layer::GenesysAuth) {
    /// use tower::ServiceBuilder;
    /// // Attach tokens only, with no replay on 401:
    /// let client = ServiceBuilder::new()
    ///     .layer(auth.layer())
    ///     .service_fn(|req: http::Request<String>| async move {
    ///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
    ///     });
    /// # }
    /// ```
    pub fn layer(&self) -> AuthLayer {
        AuthLayer {
            shared: self.shared.clone(),
        }
    }

    /// The refresh-and-replay-once policy.
    pub fn retry_policy(&self) -> RefreshOn401 {
        self.layer().retry_policy()
    }

    /// `tower::retry::RetryLayer` with [`RefreshOn401`]. Put it *outside*
    /// [`layer`](Self::layer).
    pub fn retry_layer(&self) -> RetryLayer<RefreshOn401> {
        RetryLayer::new(self.retry_policy())
    }

    /// Attaching the token and replaying a 401 once, in one layer: it behaves as
    /// [`retry_layer`](Self::retry_layer) outside [`layer`](Self::layer), and costs less
    /// per request (see [`AuthReplayLayer`]). Stack those two yourself to put another
    /// layer between them.
    ///
    /// ```
    /// # fn demo(auth: genesys_auth_layer::GenesysAuth) {
    /// use tower::ServiceBuilder;
    /// let client = ServiceBuilder::new()
    ///     .layer(auth.layers())
    ///     .service_fn(|req: http::Request<String>| async move {
    ///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
    ///     });
    /// # }
    /// ```
    pub fn layers(&self) -> AuthReplayLayer {
        AuthReplayLayer {
            shared: self.shared.clone(),
        }
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The counters so far (see [`CacheStats`]).
    pub fn stats(&self) -> CacheStats {
        self.shared.cache.stats()
    }

    /// The token supply's health, for a readiness probe (see [`Health`]).
    pub fn health(&self) -> Health {
        self.shared.cache.health()
    }

    /// The origins tokens are attached to.
    pub fn scope(&self) -> &Scope {
        &self.shared.scope
    }

    /// A valid token, fetching one if needed. Call it at start-up to fail fast on bad
    /// credentials, before the first API call.
    pub async fn token(&self) -> Result<Arc<Token>, AuthError> {
        self.shared.cache.token().await
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

/// Configures a [`GenesysAuth`] using the client-credentials grant.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{GenesysAuth, Region};
///
/// let builder = GenesysAuth::client_credentials("id", "secret")
///     .region(Region::ApSoutheast2)
///     .fetch_timeout(Duration::from_secs(5));
/// assert!(!format!("{builder:?}").contains("secret\""));
/// ```
pub struct GenesysAuthBuilder {
    credentials: CredentialSpec,
    endpoints: Endpoints,
    extra_origins: Vec<Uri>,
    cache: CacheConfig,
    max_response_bytes: usize,
}

/// Credentials as given to the builder, checked when it builds.
#[derive(Debug)]
enum CredentialSpec {
    Given {
        id: ClientId,
        secret: ClientSecret,
        secondary: Option<ClientSecret>,
    },
    Store(CredentialStore),
}

impl CredentialSpec {
    fn into_store(self) -> Result<CredentialStore, ConfigError> {
        match self {
            Self::Given {
                id,
                secret,
                secondary,
            } => {
                let credentials = Credentials::new(id, secret)?;
                let credentials = match secondary {
                    Some(secondary) => credentials.with_secondary(secondary)?,
                    None => credentials,
                };
                Ok(CredentialStore::new(credentials))
            }
            Self::Store(store) => Ok(store),
        }
    }
}

impl GenesysAuthBuilder {
    /// A secondary client secret, tried once when the primary one is refused with
    /// `invalid_client` or any other `401` (zero-downtime secret rotation; see
    /// [`AuthError::is_client_rejected`](crate::AuthError::is_client_rejected)). Ignored
    /// when the credentials came from [`GenesysAuth::with_credentials`].
    pub fn secondary_secret(mut self, secret: impl Into<ClientSecret>) -> Self {
        if let CredentialSpec::Given { secondary, .. } = &mut self.credentials {
            *secondary = Some(secret.into());
        }
        self
    }

    /// The region (default `us-east-1`): tokens come from `https://login.<domain>` and are
    /// attached to requests for `https://api.<domain>`.
    pub fn region(mut self, region: Region) -> Self {
        self.endpoints = region.endpoints();
        self
    }

    /// Custom endpoints, for proxies, gateways and tests.
    pub fn endpoints(mut self, endpoints: Endpoints) -> Self {
        self.endpoints = endpoints;
        self
    }

    /// Also attach tokens to requests for this origin (scheme, host and port of `uri`).
    pub fn authorize_origin(mut self, uri: Uri) -> Self {
        self.extra_origins.push(uri);
        self
    }

    /// All cache settings at once.
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
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.cache = self.cache.fetch_timeout(timeout);
        self
    }

    /// See [`CacheConfig::backoff`].
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.cache = self.cache.backoff(initial, max);
        self
    }

    /// See [`ClientCredentials::max_response_bytes`].
    pub fn max_token_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Builds it, sending token requests through `token_http` (any tower HTTP service, such
    /// as a hyper-util client).
    pub fn build<S: TokenHttpService>(self, token_http: S) -> Result<GenesysAuth, ConfigError> {
        let store = self.credentials.into_store()?;
        let source = ClientCredentials::new(
            token_http,
            self.endpoints.token_url().clone(),
            store.clone(),
        )?
        .max_response_bytes(self.max_response_bytes);
        let mut scope = Scope::new([self.endpoints.api_uri().clone()])?;
        for origin in self.extra_origins {
            scope = scope.with_origin(origin)?;
        }
        let mut auth = GenesysAuth::from_source(source, self.cache, scope);
        auth.credentials = Some(store);
        Ok(auth)
    }

    /// Builds it with the crate's default HTTPS client for token requests.
    #[cfg(feature = "default-client")]
    #[cfg_attr(docsrs, doc(cfg(feature = "default-client")))]
    pub fn build_with_default_client(self) -> Result<GenesysAuth, ConfigError> {
        self.build(crate::default_client::https_client::<
            http_body_util::Full<bytes::Bytes>,
        >())
    }
}

impl fmt::Debug for GenesysAuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenesysAuthBuilder")
            .field("credentials", &self.credentials)
            .field("endpoints", &self.endpoints)
            .field("extra_origins", &self.extra_origins)
            .field("cache", &self.cache)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}
