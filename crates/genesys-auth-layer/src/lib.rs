#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
//! Genesys Cloud OAuth for tower HTTP clients, as one layer.
//!
//! `genesys-auth-layer` obtains client-credentials tokens, attaches them to the requests your
//! client sends to the Genesys Cloud API, refreshes them before they expire, and refreshes
//! and replays a request once when the API answers 401, so that a thousand concurrent 401s
//! cost one token request.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use genesys_auth_layer::{default_client::https_client, GenesysAuth, Region};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # async fn demo() -> Result<(), tower::BoxError> {
//! let auth = GenesysAuth::client_credentials("client-id", "client-secret")
//!     .region(Region::EuWest1)
//!     .build_with_default_client()?;
//! let client = ServiceBuilder::new()
//!     .layer(auth.layers())
//!     .service(https_client::<Full<Bytes>>());
//! let request = http::Request::get("https://api.mypurecloud.ie/api/v2/organizations/me")
//!     .body(Full::default())?;
//! let response = client.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(()) }
//! ```
//!
//! # Pieces
//!
//! | piece | what it does |
//! | --- | --- |
//! | [`Region`] | where tokens come from and which origin they are for |
//! | [`Credentials`] | client id and secret (redacted, zeroized) |
//! | [`TokenSource`], [`ClientCredentials`] | one token request |
//! | [`TokenCache`] | lock-free reads, single-flight refresh, refresh ahead, backoff |
//! | [`AuthLayer`], [`AuthService`] | attach the token to in-scope requests |
//! | [`AuthReplayLayer`], [`AuthReplayService`] | both: attach, and on a 401 refresh and replay once |
//! | [`RefreshOn401`] | a `tower::retry::Policy`: refresh and replay once, with tower's `Retry` |
//! | [`TokenPool`], [`TokenPoolLayer`] | up to `max` tokens of one client, each paced under Genesys' per-token limit; a 429 parks its token and the request goes on another |
//! | [`ApiRetry`] | a `tower::retry::Policy`: wait out 429s (`Retry-After`) and 502/503/504s, within a time and a retry budget; outside the auth layers |
//! | [`ReplayableBody`], [`BufferedBody`] | which request bodies can be replayed; a streaming body made replayable |
//! | [`UserTokenCache`], [`UserAuthLayer`] | one token per logged-in user (authorization code or PKCE, refreshed with the user's refresh token), picked by the request's [`UserKey`] |
//! | [`TokenStore`], [`MemoryStore`], `RedisStore` (feature `redis`) | users' tokens shared by a fleet of replicas, one refresh at a time fleet-wide ([`UserTokenCache::with_store`]) |
//! | [`GenesysAuth`] | all of the above, built in a few lines |
//! | `AuthMiddleware` (feature `reqwest`) | the same for a `reqwest` client, as a `reqwest_middleware::Middleware` |
//!
//! # Order of layers
//!
//! [`GenesysAuth::layers`] gives one service that attaches the token and replays a 401
//! ([`AuthReplayLayer`]). To put a layer between the two, stack them yourself: the retry
//! layer ([`GenesysAuth::retry_layer`]) must sit *outside* the auth layer
//! ([`GenesysAuth::layer`]) so the replayed request passes through [`AuthService`] again
//! and gets the new token. Both stacks behave the same; the single service costs less per
//! request, since tower's `Retry` clones the whole service below it for every request.

mod api_retry;
mod auth;
mod buffered;
mod cache;
mod credentials;
#[cfg(feature = "default-client")]
#[cfg_attr(docsrs, doc(cfg(feature = "default-client")))]
pub mod default_client;
mod error;
mod fleet;
mod genesys;
mod observe;
mod pool;
#[cfg(feature = "redis")]
mod redis_store;
mod region;
#[cfg(feature = "reqwest")]
mod reqwest;
mod retry;
mod rotation;
mod source;
mod store;
#[cfg(test)]
mod test_support;
mod token;
mod users;

#[cfg(feature = "reqwest")]
pub use self::reqwest::AuthMiddleware;
pub use api_retry::{
    ApiRetry, ApiRetryStats, DEFAULT_RATE_LIMITED_WAIT, DEFAULT_RETRY_BACKOFF_INITIAL,
    DEFAULT_RETRY_BACKOFF_MAX, DEFAULT_RETRY_TIME_BUDGET, IDEMPOTENT_METHODS, METRIC_API_GIVEN_UP,
    METRIC_API_REFUSALS, METRIC_API_RETRIES, METRIC_API_RETRY_WAIT, MIN_RETRY_WAIT,
};
pub use auth::{
    AuthLayer, AuthReplayFuture, AuthReplayLayer, AuthReplayService, AuthService, ResponseFuture,
    Scope,
};
pub use buffered::{BufferedBody, DEFAULT_BUFFER_LIMIT};
pub use cache::{
    CacheConfig, RefreshReason, TokenCache, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX,
    DEFAULT_FETCH_TIMEOUT, DEFAULT_REFRESH_AHEAD, DEFAULT_REFRESH_AHEAD_FRACTION,
    DEFAULT_REFRESH_JITTER, MIN_BACKOFF, MIN_REFRESH_WINDOW, RETRY_AFTER_CAP,
};
pub use credentials::{
    ClientId, ClientSecret, Credentials, SecretSlot, ENV_CLIENT_ID, ENV_CLIENT_SECRET,
    ENV_SECONDARY_SECRET,
};
pub use error::{AuthError, ConfigError, InvalidTokenResponse, OAuthErrorCode};
pub use genesys::{GenesysAuth, GenesysAuthBuilder};
pub use observe::{
    CacheStats, FailureCounts, Health, METRIC_FAILURES, METRIC_REPLAYS, METRIC_REQUESTS_AUTHORIZED,
    METRIC_REQUESTS_WAITED, METRIC_TOKENS_RETRIEVED, METRIC_UNAUTHORIZED, UNHEALTHY_AFTER_FAILURES,
};
pub use pool::{
    PoolStats, RateLimited, TokenPool, TokenPoolConfig, TokenPoolLayer, TokenPoolService,
    DEFAULT_BUDGET_WINDOW, DEFAULT_GROWTH_HOLD, DEFAULT_MAX_BUDGET_WAIT, DEFAULT_MAX_QUEUED,
    DEFAULT_PARK, DEFAULT_POOL_MAX_TOKENS, DEFAULT_TOKEN_BUDGET, METRIC_POOL_BUDGET_WAIT,
    METRIC_POOL_RATE_LIMITED, METRIC_POOL_REJECTED, METRIC_POOL_REPLAYS, METRIC_POOL_TOKENS,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_store::{
    EncryptionKey, HashKey, RedisStore, RedisStoreBuilder, DEFAULT_REDIS_COMMAND_TIMEOUT,
    DEFAULT_REDIS_PREFIX,
};
pub use region::{Region, UnknownRegion};
pub use retry::{RefreshOn401, ReplayableBody};
pub use rotation::{CredentialStore, CredentialsWatcher, DEFAULT_WATCH_INTERVAL};
pub use source::{
    parse, BoxFuture, ClientCredentials, TokenHttpService, TokenSource, DEFAULT_MAX_RESPONSE_BYTES,
};
pub use source::{
    AuthorizationCode, AuthorizationState, AuthorizeRequest, AuthorizeUrl, ClientAuth, LoginError,
    PkceChallenge, PkceVerifier, RefreshToken, RefreshTokenSource, UserGrant, UserTokens,
    DETACHED_REFRESH_BOUND, PKCE_VERIFIER_MAX_LEN, PKCE_VERIFIER_MIN_LEN,
};
pub use store::{Lease, MemoryStore, StoreError, StoredTokens, TokenStore};
pub use token::{IssuedToken, Token, TokenGeneration};
pub use users::{
    UserAuthError, UserAuthFuture, UserAuthLayer, UserAuthService, UserCacheConfig, UserCacheStats,
    UserKey, UserTokenCache, DEFAULT_STORE_TTL, DEFAULT_STORE_WAIT, DEFAULT_USER_IDLE_TIMEOUT,
};

/// The README's code blocks, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
