//! [`UserTokenCache`]: one token per logged-in user, and [`UserAuthLayer`], which attaches
//! the token of the user a request is for.
//!
//! Each user's entry is a [`TokenCache`] of its own whose source is the user's
//! [`RefreshTokenSource`]: the same lock-free read, single flight, refresh ahead (with the
//! refresh token), generation-scoped 401 and replay once as the client-credentials cache,
//! per user. The entries live in a concurrent map (`papaya`, lock-free reads) keyed by the
//! application's [`UserKey`]; a request names its user with that key in its extensions.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::auth::{attach, AuthReplayFuture, AuthReplayService, ResponseFuture, Scope, Shared};
use crate::cache::{CacheConfig, TokenCache};
use crate::error::{AuthError, ConfigError, OAuthErrorCode};
use crate::fleet::{
    adoptable, is_tombstone, to_stored, tombstone, Fleet, FleetSettings, StoreSource,
};
use crate::observe::{CacheStats, Counters};
use crate::region::join;
use crate::retry::ReplayableBody;
use crate::source::{
    BoxFuture, RefreshToken, RefreshTokenSource, TokenHttpService, TokenSource, UserGrant,
    UserTokens,
};
use crate::store::{Lease, StoreError, StoredTokens, TokenStore};
use crate::token::IssuedToken;

/// How long a user's entry stays cached without a request, unless told otherwise.
pub const DEFAULT_USER_IDLE_TIMEOUT: Duration = Duration::from_secs(8 * 60 * 60);
/// How long a shared [`TokenStore`] keeps a user's tokens after her last login or refresh,
/// unless told otherwise.
pub const DEFAULT_STORE_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How long a refresh waits for the lease or the store, unless told otherwise.
pub const DEFAULT_STORE_WAIT: Duration = Duration::from_secs(8);
/// How long a user's lease holds in the shared store: its holder's token request is bounded
/// 5 s under it, so the lease outlives any answer it could still get.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// The application's key for one user's tokens: a session id, or a user id. Insert it in
/// each request's extensions; [`UserAuthService`] attaches that user's token.
///
/// Its `Debug` shows only its length: a session id is a secret.
///
/// ```
/// use genesys_auth_layer::UserKey;
///
/// let mut request = http::Request::get("https://api.mypurecloud.ie/api/v2/users/me")
///     .body(String::new())?;
/// request.extensions_mut().insert(UserKey::new("session-4f9c"));
/// # Ok::<(), http::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserKey(Arc<str>);

impl UserKey {
    /// A key.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The key itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserKey([{} bytes])", self.0.len())
    }
}

/// Why [`UserAuthService`] did not send a request. It comes boxed in the service's
/// [`BoxError`]; `downcast_ref::<UserAuthError>()` gets it back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UserAuthError {
    /// The request is for the API but carries no [`UserKey`] extension: it is not sent,
    /// rather than sent with no token or another user's.
    #[error("the request carries no UserKey extension, so it has no user to act for")]
    MissingKey,
    /// No user is logged in under the request's key (never, logged out, or evicted after
    /// being idle): the user must log in.
    #[error("no user is logged in under this key: the user must log in")]
    NotLoggedIn,
}

/// How a [`UserTokenCache`] caches.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{CacheConfig, UserCacheConfig};
///
/// let config = UserCacheConfig::new()
///     .idle_timeout(Duration::from_secs(30 * 60))
///     .cache(CacheConfig::default().name("agents"));
/// assert_eq!(config.idle_timeout_value(), Duration::from_secs(30 * 60));
/// ```
#[derive(Clone, Debug)]
pub struct UserCacheConfig {
    cache: CacheConfig,
    idle_timeout: Duration,
    store_ttl: Duration,
    store_wait: Duration,
}

impl Default for UserCacheConfig {
    fn default() -> Self {
        Self {
            cache: CacheConfig::default(),
            idle_timeout: DEFAULT_USER_IDLE_TIMEOUT,
            store_ttl: DEFAULT_STORE_TTL,
            store_wait: DEFAULT_STORE_WAIT,
        }
    }
}

impl UserCacheConfig {
    /// The defaults: each user's cache as [`CacheConfig::default`], evicted after
    /// [`DEFAULT_USER_IDLE_TIMEOUT`] without a request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Each user's token cache (refresh ahead, fetch timeout, backoff).
    pub fn cache(mut self, config: CacheConfig) -> Self {
        self.cache = config;
        self
    }

    /// How long an entry stays at least without a request before it is evicted (at least a
    /// second, at most a year): a sweep each idle time evicts the entries no request used
    /// since the sweep before, so an entry goes after one to two idle times without a
    /// request. Eviction forgets the tokens; it does not revoke them.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle.clamp(Duration::from_secs(1), Duration::from_secs(365 * 86_400));
        self
    }

    /// How long an entry stays without a request.
    pub fn idle_timeout_value(&self) -> Duration {
        self.idle_timeout
    }

    /// With a shared [`TokenStore`]: how long it keeps a user's tokens after her last
    /// login or refresh (at least a minute); a user idle longer must log in again.
    pub fn store_ttl(mut self, ttl: Duration) -> Self {
        self.store_ttl = ttl.max(Duration::from_secs(60));
        self
    }

    /// With a shared [`TokenStore`]: how long a refresh waits for the user's lease,
    /// another replica's new token, or an unreachable store, before it fails with
    /// [`AuthError::Store`] (at least 100 ms, at most 10 minutes; kept half a second under
    /// the cache's fetch timeout, so that callers see the store's error). It never refreshes
    /// without the lease.
    pub fn store_wait(mut self, wait: Duration) -> Self {
        self.store_wait = wait.clamp(Duration::from_millis(100), Duration::from_secs(600));
        self
    }
}

/// A snapshot of a [`UserTokenCache`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserCacheStats {
    /// Users cached now.
    pub users: usize,
    /// Users added (logins).
    pub logins: u64,
    /// Users removed by [`UserTokenCache::logout`] or [`UserTokenCache::remove`].
    pub logouts: u64,
    /// Users evicted after being idle.
    pub evicted: u64,
    /// Requests refused: no [`UserKey`], or no user under it.
    pub refused: u64,
}

/// One token per logged-in user, each refreshed with that user's refresh token.
///
/// * [`insert`](Self::insert) a user after the login's code exchange, under the key the
///   application will put in that user's requests ([`UserKey`]);
/// * send the requests through [`layers`](Self::layers) ([`UserAuthLayer`]);
/// * [`logout`](Self::logout) removes the user and revokes the token
///   (`DELETE /api/v2/tokens/me`).
///
/// Each entry is a [`TokenCache`] of its own, so per user: one refresh at a time (a
/// rotating refresh token is never sent twice), refresh ahead, a 401 to the current token
/// refreshes once and replays once. Entries idle past
/// [`UserCacheConfig::idle_timeout`] are evicted (swept at most once an idle time, as users
/// are added, or by [`evict_idle`](Self::evict_idle)). Cheap to clone: clones share the entries.
///
/// ```no_run
/// # async fn demo(
/// #     grant: genesys_auth_layer::UserGrant<genesys_auth_layer::default_client::HttpsClient<http_body_util::Full<bytes::Bytes>>>,
/// #     code: genesys_auth_layer::AuthorizationCode,
/// # ) -> Result<(), tower::BoxError> {
/// use genesys_auth_layer::{Region, UserCacheConfig, UserKey, UserTokenCache};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// let users = UserTokenCache::new(grant.clone(), Region::EuWest1.api_uri(), UserCacheConfig::new())?;
/// // On the login callback:
/// let tokens = grant.exchange(&code, "https://app.example.com/callback").await?;
/// users.insert(UserKey::new("session-4f9c"), tokens).await?;
/// // For each request the application sends for that user:
/// let client = ServiceBuilder::new()
///     .layer(users.layers())
///     .service(genesys_auth_layer::default_client::https_client::<http_body_util::Full<bytes::Bytes>>());
/// let mut request = http::Request::get("https://api.mypurecloud.ie/api/v2/users/me")
///     .body(http_body_util::Full::default())?;
/// request.extensions_mut().insert(UserKey::new("session-4f9c"));
/// let response = client.oneshot(request).await?;
/// # let _ = response; Ok(()) }
/// ```
pub struct UserTokenCache<S> {
    inner: Arc<Users<S>>,
}

impl<S> Clone for UserTokenCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Users<S> {
    /// One grant for every user's refresh source.
    grant: Arc<UserGrant<S>>,
    /// With a shared store: the store, and what every user's `StoreSource` shares.
    fleet: Option<Arc<Fleet<S>>>,
    /// One configuration for every user's cache.
    cache_config: Arc<CacheConfig>,
    /// One set of counters for every user's cache: [`UserTokenCache::cache_stats`].
    counters: Arc<Counters>,
    api_uri: Uri,
    config: UserCacheConfig,
    shared: Arc<Lookup>,
    logins: AtomicU64,
    logouts: AtomicU64,
    evicted: AtomicU64,
    /// When the last sweep for idle entries ran, in ms since `Lookup::epoch`.
    last_sweep: AtomicU64,
}

/// What the layer needs: the entries and the API's scope.
struct Lookup {
    /// Hashed with foldhash (randomly seeded per process): SipHash cost a fifth of a
    /// cached user's request.
    entries: papaya::HashMap<UserKey, Entry, foldhash::fast::RandomState>,
    scope: Scope,
    /// The instant `Users::last_sweep` counts from.
    epoch: Instant,
    refused: AtomicU64,
    /// With a shared store: loads a user this replica does not know yet.
    loader: Option<Loader>,
}

/// Loads a user from the shared store into the entries: `None` if the store has none.
type Loader = Arc<
    dyn Fn(UserKey) -> BoxFuture<'static, Result<Option<Arc<Shared>>, StoreError>> + Send + Sync,
>;

struct Entry {
    /// The user's cache, with an empty scope: the layer checks the scope once.
    shared: Arc<Shared>,
    /// The user's refresh token, as the cache's source holds it (none without one).
    refresh: Option<Arc<dyn HoldsRefreshToken>>,
    /// Whether a request used this entry since the last sweep.
    used: AtomicBool,
}

impl Lookup {
    fn now_ms(&self) -> u64 {
        u64::try_from((Instant::now() - self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The user's shared state, marking the entry used.
    fn get(&self, key: &UserKey) -> Option<Arc<Shared>> {
        let entries = self.entries.pin();
        let entry = entries.get(key)?;
        entry.mark_used();
        Some(entry.shared.clone())
    }
}

impl Entry {
    /// Written once per sweep, so that a user's requests on several cores do not fight
    /// over the line, and with no clock read.
    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
}

/// Reads a user's current refresh token, whatever the HTTP client type.
trait HoldsRefreshToken: Send + Sync {
    fn refresh_token(&self) -> BoxFuture<'_, Option<RefreshToken>>;
}

impl<S: TokenHttpService> HoldsRefreshToken for RefreshTokenSource<S> {
    fn refresh_token(&self) -> BoxFuture<'_, Option<RefreshToken>> {
        Box::pin(RefreshTokenSource::refresh_token(self))
    }
}

/// The source of a user logged in without a refresh token: the token cannot be renewed.
struct NoRefreshToken;

impl TokenSource for NoRefreshToken {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async {
            Err(AuthError::OAuth {
                status: StatusCode::BAD_REQUEST,
                code: OAuthErrorCode::InvalidGrant,
                description: Some("no refresh token: the user must log in again".into()),
            })
        })
    }
}

impl<S: TokenHttpService> UserTokenCache<S> {
    /// A cache of users' tokens refreshed through `grant`, attached to requests for
    /// `api_uri` (the region's API origin, such as [`Region::api_uri`](crate::Region::api_uri)).
    /// Fails with a [`ConfigError`] if `api_uri` is not an absolute https URI (or http on
    /// loopback).
    pub fn new(
        grant: UserGrant<S>,
        api_uri: Uri,
        config: UserCacheConfig,
    ) -> Result<Self, ConfigError> {
        Self::build(grant, api_uri, config, None)
    }

    /// A cache as [`new`](Self::new) makes, whose users' tokens also live in `store`,
    /// shared by the replicas of a fleet: a user who logged in on one replica is found by
    /// the others, and one replica at a time refreshes her (the store's lease), with the
    /// newest refresh token. Reads stay in process: the store is asked on a login, a
    /// refresh, a logout, and for a user this replica does not know yet. If the store is
    /// unreachable, cached tokens keep serving; a refresh waits up to
    /// [`UserCacheConfig::store_wait`] for it, then fails, rather than refresh without the
    /// lease (a rotating refresh token sent twice logs the user out).
    pub fn with_store(
        grant: UserGrant<S>,
        api_uri: Uri,
        config: UserCacheConfig,
        store: Arc<dyn TokenStore>,
    ) -> Result<Self, ConfigError> {
        Self::build(grant, api_uri, config, Some(store))
    }

    fn build(
        grant: UserGrant<S>,
        api_uri: Uri,
        config: UserCacheConfig,
        store: Option<Arc<dyn TokenStore>>,
    ) -> Result<Self, ConfigError> {
        let scope = Scope::new([api_uri.clone()])?;
        let grant = Arc::new(grant);
        let cache_config = Arc::new(config.cache.clone());
        let counters = Arc::new(Counters::new(config.cache.name_value()));
        let fleet = store.map(|store| {
            Arc::new(Fleet {
                grant: grant.clone(),
                store,
                settings: FleetSettings {
                    lease_ttl: LEASE_TTL,
                    refresh_bound: LEASE_TTL - Duration::from_secs(5),
                    // Under the cache's fetch timeout, so that a caller sees the store's
                    // error rather than a timeout.
                    wait: config.store_wait.min(
                        config
                            .cache
                            .fetch_timeout_value()
                            .saturating_sub(Duration::from_millis(500))
                            .max(Duration::from_millis(100)),
                    ),
                    poll: Duration::from_millis(50),
                    entry_ttl: config.store_ttl,
                },
            })
        });
        let shared = Arc::new_cyclic(|lookup| Lookup {
            entries: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            scope,
            epoch: Instant::now(),
            refused: AtomicU64::new(0),
            loader: fleet.as_ref().map(|fleet| {
                loader(
                    fleet.clone(),
                    lookup.clone(),
                    cache_config.clone(),
                    counters.clone(),
                )
            }),
        });
        Ok(Self {
            inner: Arc::new(Users {
                grant,
                fleet,
                cache_config,
                counters,
                api_uri,
                config,
                shared,
                logins: AtomicU64::new(0),
                logouts: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                last_sweep: AtomicU64::new(0),
            }),
        })
    }

    /// Caches the tokens of a user who just logged in, under `key` (replacing whatever was
    /// under it). The access token is used as it is, refreshed ahead of its expiry with
    /// the refresh token. An access token already (nearly) expired is dropped and the first
    /// request refreshes with the refresh token; without a refresh token that is an error,
    /// and nothing is cached: the user must log in again.
    pub async fn insert(&self, key: UserKey, tokens: UserTokens) -> Result<(), AuthError> {
        let version = login_version();
        if let Some(fleet) = &self.inner.fleet {
            let stored = to_stored(
                &tokens.access_token,
                tokens.refresh_token.clone(),
                tokens.requested_at,
                version,
            );
            fleet
                .store
                .save(&key, &stored, fleet.settings.entry_ttl)
                .await
                .map_err(AuthError::Store)?;
        }
        let (cache, refresh) = self.new_cache(&key, tokens.refresh_token, version);
        if let Err(e) = cache.seed(tokens.access_token, tokens.requested_at) {
            if refresh.is_none() && self.inner.fleet.is_none() {
                return Err(e);
            }
        }
        self.put(key, cache, refresh);
        Ok(())
    }

    /// Caches a user from a refresh token alone (one the application kept, read with
    /// [`refresh_token`](Self::refresh_token)): her first request refreshes with it. With
    /// a shared store, the store keeps it (an error if it cannot).
    pub async fn insert_refresh_token(
        &self,
        key: UserKey,
        refresh_token: RefreshToken,
    ) -> Result<(), AuthError> {
        if let Some(fleet) = &self.inner.fleet {
            let stored = StoredTokens::new(
                "",
                SystemTime::UNIX_EPOCH,
                Some(refresh_token.clone()),
                login_version(),
            );
            fleet
                .store
                .save(&key, &stored, fleet.settings.entry_ttl)
                .await
                .map_err(AuthError::Store)?;
        }
        let (cache, refresh) = self.new_cache(&key, Some(refresh_token), 0);
        self.put(key, cache, refresh);
        Ok(())
    }

    /// The refresh token the user under `key` will refresh with next, for the
    /// application to keep (it changes when the server rotates it); waits for a refresh in
    /// flight. `None` if no user is cached under `key`, she has none, or it was refused.
    /// With a shared store, the store's (the newest, whichever replica rotated it).
    pub async fn refresh_token(&self, key: &UserKey) -> Option<RefreshToken> {
        if let Some(fleet) = &self.inner.fleet {
            let stored = fleet.store.load(key).await.ok()??;
            return stored.refresh_token().cloned();
        }
        let holder = {
            let entries = self.inner.shared.entries.pin();
            entries.get(key)?.refresh.clone()?
        };
        holder.refresh_token().await
    }

    /// A user's cache: over the shared store (as of version `seen`) in a fleet, else over
    /// her refresh token (or none).
    fn new_cache(
        &self,
        key: &UserKey,
        refresh_token: Option<RefreshToken>,
        seen: u64,
    ) -> (TokenCache, Option<Arc<dyn HoldsRefreshToken>>) {
        let config = self.inner.cache_config.clone();
        let counters = self.inner.counters.clone();
        if let Some(fleet) = &self.inner.fleet {
            let source = StoreSource::new(fleet.clone(), key.clone(), seen, refresh_token);
            return (
                TokenCache::with_source(Arc::new(source), config, counters),
                None,
            );
        }
        match refresh_token {
            Some(refresh) => {
                let source = Arc::new(RefreshTokenSource::shared(
                    self.inner.grant.clone(),
                    refresh,
                ));
                let cache = TokenCache::with_source(source.clone(), config, counters);
                (cache, Some(source))
            }
            None => (
                TokenCache::with_source(Arc::new(NoRefreshToken), config, counters),
                None,
            ),
        }
    }

    fn put(&self, key: UserKey, cache: TokenCache, refresh: Option<Arc<dyn HoldsRefreshToken>>) {
        let lookup = &self.inner.shared;
        let entry = Entry {
            shared: Arc::new(Shared::new(cache, Scope::empty())),
            refresh,
            used: AtomicBool::new(true),
        };
        lookup.entries.pin().insert(key, entry);
        self.inner.logins.fetch_add(1, Ordering::Relaxed);
        self.sweep_if_due();
    }

    /// The token cache of the user under `key`, if one is logged in. (Its
    /// [`stats`](TokenCache::stats) are every user's together, as
    /// [`cache_stats`](Self::cache_stats) gives them: the users share one set of counters.)
    pub fn token_cache(&self, key: &UserKey) -> Option<TokenCache> {
        self.inner
            .shared
            .get(key)
            .map(|shared| shared.cache.clone())
    }

    /// Whether a user is cached under `key`.
    pub fn contains(&self, key: &UserKey) -> bool {
        self.inner.shared.entries.pin().contains_key(key)
    }

    /// The users cached now.
    pub fn len(&self) -> usize {
        self.inner.shared.entries.len()
    }

    /// Whether no user is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the user under `key` without revoking anything; returns whether one was
    /// cached. Requests already sent with its token finish.
    pub fn remove(&self, key: &UserKey) -> bool {
        let removed = self.inner.shared.entries.pin().remove(key).is_some();
        if removed {
            self.inner.logouts.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// Logs the user under `key` out: removes the entry at once, then revokes her access
    /// token with `DELETE /api/v2/tokens/me`: the one cached here and, with a shared store,
    /// the fleet's newest if another replica refreshed since (a fresh one first if neither
    /// is valid, so that the revocation is never skipped), and leaves a tombstone in the
    /// store, which the other replicas find at their next refresh. With a store, the newest
    /// token and the tombstone are taken under her lease, after any refresh in flight.
    /// Returns `false` if no user was cached under `key`.
    ///
    /// Each step is bounded by the cache's fetch timeout. A token the API already refuses
    /// (401) counts as revoked. Errors (the first, after every step was tried): no token
    /// could be had (the refresh's [`AuthError`]), the store failed
    /// ([`AuthError::Store`]), the API answered something else
    /// ([`AuthError::UnexpectedStatus`]), or did not answer ([`AuthError::Timeout`]); the
    /// entry stays removed either way.
    pub async fn logout(&self, key: &UserKey) -> Result<bool, AuthError> {
        let shared = {
            let entries = self.inner.shared.entries.pin();
            let Some(entry) = entries.remove(key) else {
                return Ok(false);
            };
            entry.shared.clone()
        };
        self.inner.logouts.fetch_add(1, Ordering::Relaxed);
        let bound = self.inner.config.cache.fetch_timeout_value();
        let now = Instant::now();
        // The tokens to revoke: hers on this replica, and the fleet's newest (another
        // replica may have refreshed since); a fresh one if neither is valid. All before the
        // tombstone, which ends refreshes.
        let mut tokens: Vec<HeaderValue> = Vec::new();
        if let Some(token) = shared.cache.current().filter(|t| t.is_valid_at(now)) {
            tokens.push(token.header().clone());
        }
        if let Some(fleet) = &self.inner.fleet {
            if let Ok(Ok(Some(stored))) = tokio::time::timeout(bound, fleet.store.load(key)).await {
                let newest = adoptable(&stored).map(|issued| issued.header().clone());
                if let Some(newest) = newest.filter(|h| !tokens.contains(h)) {
                    tokens.push(newest);
                }
            }
        }
        let mut failed = None;
        if tokens.is_empty() {
            match tokio::time::timeout(bound, shared.cache.token()).await {
                Ok(Ok(token)) => tokens.push(token.header().clone()),
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(AuthError::Timeout(bound)),
            }
        }
        // The other replicas drop her at their next refresh, which finds this tombstone.
        // It is written under her lease, so that a refresh in flight (which saves before it
        // lets the lease go) cannot write over it; if the lease does not come in time (its
        // holder died), it is written anyway.
        if let Some(fleet) = &self.inner.fleet {
            let lease = take_lease(fleet, key).await;
            // A refresh that held the lease has saved by now: its token is revoked too.
            if let Ok(Ok(Some(stored))) = tokio::time::timeout(bound, fleet.store.load(key)).await {
                let newest = adoptable(&stored).map(|issued| issued.header().clone());
                if let Some(newest) = newest.filter(|h| !tokens.contains(h)) {
                    tokens.push(newest);
                }
            }
            let dead = tombstone();
            let gone = fleet.store.save(key, &dead, fleet.settings.entry_ttl);
            match tokio::time::timeout(bound, gone).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(AuthError::Store(e))),
                Err(_) => failed = failed.or(Some(AuthError::Timeout(bound))),
            }
            if let Some(lease) = lease {
                let _ = tokio::time::timeout(bound, fleet.store.release(key, &lease)).await;
            }
        }
        for token in tokens {
            if let Err(e) = self.revoke(token, bound).await {
                failed = failed.or(Some(e));
            }
        }
        match failed {
            None => {
                tracing::info!(target: "genesys_auth_layer::users", "user logged out; token revoked");
                Ok(true)
            }
            Some(e) => Err(e),
        }
    }

    /// `DELETE /api/v2/tokens/me` with `token`, within `bound`; a 401 (already invalid)
    /// counts as done.
    async fn revoke(&self, token: HeaderValue, bound: Duration) -> Result<(), AuthError> {
        let uri = join(&self.inner.api_uri, "/api/v2/tokens/me");
        let mut request = Request::delete(uri)
            .body(Full::<Bytes>::default())
            .map_err(|e| AuthError::Transport(Arc::new(e)))?;
        request.headers_mut().insert(AUTHORIZATION, token);
        let sent = self.inner.grant.http().clone().oneshot(request);
        let response = match tokio::time::timeout(bound, sent).await {
            Ok(response) => response.map_err(|e| AuthError::Transport(Arc::from(e.into())))?,
            Err(_) => return Err(AuthError::Timeout(bound)),
        };
        let status = response.status();
        if status.is_success() || status == StatusCode::UNAUTHORIZED {
            Ok(())
        } else {
            Err(AuthError::UnexpectedStatus {
                status,
                retry_after: None,
            })
        }
    }

    /// A sweep: evicts the users no request used since the previous sweep (or their
    /// login), and starts counting again; returns how many were evicted. Sweeps run by
    /// themselves at most once an idle time as users are added; call this on a timer to
    /// evict without logins.
    pub fn evict_idle(&self) -> usize {
        let lookup = &self.inner.shared;
        self.inner
            .last_sweep
            .store(lookup.now_ms(), Ordering::Relaxed);
        let mut evicted = 0;
        lookup.entries.pin().retain(|_, entry| {
            let keep = entry.used.swap(false, Ordering::Relaxed);
            evicted += usize::from(!keep);
            keep
        });
        if evicted > 0 {
            self.inner
                .evicted
                .fetch_add(evicted as u64, Ordering::Relaxed);
            tracing::debug!(target: "genesys_auth_layer::users", evicted, "idle users evicted");
        }
        evicted
    }

    /// Sweeps if none ran for an idle time: memory stays bounded by the users active
    /// within about two idle times, without a background task.
    fn sweep_if_due(&self) {
        let now = self.inner.shared.now_ms();
        let idle = u64::try_from(self.inner.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let last = self.inner.last_sweep.load(Ordering::Relaxed);
        // One caller sweeps: the one that moves `last_sweep`.
        if now.saturating_sub(last) >= idle
            && self
                .inner
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.evict_idle();
        }
    }

    /// The layer that attaches to each request its user's token (by its [`UserKey`]) and,
    /// when the API answers 401 to it, refreshes it and replays the request once: what
    /// [`GenesysAuth::layers`](crate::GenesysAuth::layers) does for the client's token.
    pub fn layers(&self) -> UserAuthLayer {
        UserAuthLayer {
            lookup: self.inner.shared.clone(),
            replay: true,
        }
    }

    /// The layer that attaches to each request its user's token (by its [`UserKey`]) and
    /// replays nothing: a 401 to that token still starts one refresh, and the caller gets
    /// the 401. What [`GenesysAuth::layer`](crate::GenesysAuth::layer) does for the client's
    /// token; [`layers`](Self::layers) is the one to use unless the caller retries itself.
    pub fn layer(&self) -> UserAuthLayer {
        UserAuthLayer {
            lookup: self.inner.shared.clone(),
            replay: false,
        }
    }

    /// The token counters of every user's cache, added up (refreshes, failures by cause,
    /// requests authorized, 401s and replays), as [`TokenCache::stats`] gives one cache's.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> UserCacheStats {
        UserCacheStats {
            users: self.len(),
            logins: self.inner.logins.load(Ordering::Relaxed),
            logouts: self.inner.logouts.load(Ordering::Relaxed),
            evicted: self.inner.evicted.load(Ordering::Relaxed),
            refused: self.inner.shared.refused.load(Ordering::Relaxed),
        }
    }
}

/// `key`'s lease, waiting for it (polling) up to the fleet's wait; `None` if it did not come.
async fn take_lease<S>(fleet: &Fleet<S>, key: &UserKey) -> Option<Lease> {
    let settings = &fleet.settings;
    let deadline = Instant::now() + settings.wait;
    loop {
        let attempt = tokio::time::timeout(
            settings.wait,
            fleet.store.try_lease(key, settings.lease_ttl),
        );
        if let Ok(Ok(Some(lease))) = attempt.await {
            return Some(lease);
        }
        if Instant::now() + settings.poll > deadline {
            return None;
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// The version of a login's stored entry: the login's time in microseconds since the Unix
/// epoch, so that a new login (after a logout, or on another replica) is newer than any
/// version a replica saw before it (each refresh adds one).
fn login_version() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1))
}

/// The loader of a cache with a shared store: a user this replica does not know yet is
/// read from the store and cached (her stored token adopted if still valid).
fn loader<S: TokenHttpService>(
    fleet: Arc<Fleet<S>>,
    lookup: Weak<Lookup>,
    config: Arc<CacheConfig>,
    counters: Arc<Counters>,
) -> Loader {
    Arc::new(move |key: UserKey| {
        let (fleet, lookup) = (fleet.clone(), lookup.clone());
        let (config, counters) = (config.clone(), counters.clone());
        Box::pin(async move {
            let bound = fleet.settings.wait;
            let loaded = tokio::time::timeout(bound, fleet.store.load(&key)).await;
            let timed_out = |_| StoreError::unavailable(format!("no answer within {bound:?}"));
            let Some(stored) = loaded.map_err(timed_out)?? else {
                return Ok(None);
            };
            if is_tombstone(&stored) {
                return Ok(None);
            }
            let Some(lookup) = lookup.upgrade() else {
                return Ok(None);
            };
            let last = stored.refresh_token().cloned();
            let source = StoreSource::new(fleet, key.clone(), stored.version(), last);
            let cache = TokenCache::with_source(Arc::new(source), config, counters);
            if let Some(token) = adoptable(&stored) {
                // An unusable one is refreshed by the first request instead.
                let _ = cache.seed(token, Instant::now());
            }
            let entry = Entry {
                shared: Arc::new(Shared::new(cache, Scope::empty())),
                refresh: None,
                used: AtomicBool::new(true),
            };
            let entries = lookup.entries.pin();
            // Requests that loaded her at the same time keep the first entry.
            Ok(Some(entries.get_or_insert(key, entry).shared.clone()))
        })
    })
}

impl<S> fmt::Debug for UserTokenCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserTokenCache")
            .field("api_uri", &self.inner.api_uri)
            .field("config", &self.inner.config)
            .field("users", &self.inner.shared.entries.len())
            .finish()
    }
}

/// The layer of a [`UserTokenCache`]: [`UserTokenCache::layers`] (attach, and replay a
/// 401 once) or [`UserTokenCache::layer`] (attach only).
#[derive(Clone)]
pub struct UserAuthLayer {
    lookup: Arc<Lookup>,
    replay: bool,
}

impl fmt::Debug for UserAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserAuthLayer")
            .field("scope", &self.lookup.scope)
            .field("replay", &self.replay)
            .finish()
    }
}

impl<S> Layer<S> for UserAuthLayer {
    type Service = UserAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UserAuthService {
            inner,
            lookup: self.lookup.clone(),
            replay: self.replay,
        }
    }
}

/// The service of a [`UserAuthLayer`].
///
/// * A request for the API origin, without an `Authorization` of its own, goes out with
///   the token of the user its [`UserKey`] extension names, exactly as
///   [`AuthReplayService`](crate::AuthReplayService) (from [`UserTokenCache::layers`]) or
///   [`AuthService`](crate::AuthService) (from [`UserTokenCache::layer`]) would send it
///   with that user's cache: a `401` to that token refreshes it (once for any number of
///   401s) and, with `layers`, the request is replayed once.
/// * Without a `UserKey`, or with one no user is logged in under, it is not sent: a
///   [`UserAuthError`] (boxed).
/// * Other requests pass through untouched.
#[derive(Clone)]
pub struct UserAuthService<S> {
    inner: S,
    lookup: Arc<Lookup>,
    replay: bool,
}

impl<S> fmt::Debug for UserAuthService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserAuthService")
            .field("scope", &self.lookup.scope)
            .finish_non_exhaustive()
    }
}

impl<S> UserAuthService<S> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for UserAuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: ReplayableBody,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = UserAuthFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.lookup.scope.applies_to(&request) {
            return UserAuthFuture::new(State::Pass {
                future: self.inner.call(request),
            });
        }
        let entries = self.lookup.entries.pin();
        let entry = match request.extensions().get::<UserKey>() {
            None => Err(UserAuthError::MissingKey),
            Some(key) => match (entries.get(key), &self.lookup.loader) {
                (Some(entry), _) => Ok(entry),
                // A user this replica does not know: she may be in the shared store. What
                // `poll_ready` reserved is given back while the store answers (the ready
                // service is dropped), and this request readies a clone afterwards.
                (None, Some(load)) => {
                    let load = load(key.clone());
                    drop(entries);
                    let unready = self.inner.clone();
                    drop(std::mem::replace(&mut self.inner, unready));
                    return UserAuthFuture::new(State::Loading {
                        pending: Box::new(Pending {
                            load,
                            shared: None,
                            request: Some(request),
                            service: Some(self.inner.clone()),
                            replay: self.replay,
                        }),
                    });
                }
                (None, None) => Err(UserAuthError::NotLoggedIn),
            },
        };
        match entry {
            Ok(entry) => {
                entry.mark_used();
                if self.replay {
                    // The ready service goes with this request; the next call readies a clone.
                    let clone = self.inner.clone();
                    let ready = std::mem::replace(&mut self.inner, clone);
                    let shared = entry.shared.clone();
                    let future =
                        AuthReplayService::with_shared(ready, shared).call_checked(request, true);
                    UserAuthFuture::new(State::Replay { future })
                } else {
                    // Within the map's guard: the user's state is borrowed, not counted.
                    let future = attach(&mut self.inner, &entry.shared, request, true);
                    UserAuthFuture::new(State::Attach { future })
                }
            }
            Err(error) => {
                self.lookup.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "genesys_auth_layer::users", %error, "request not sent");
                UserAuthFuture::new(State::Refused { error: Some(error) })
            }
        }
    }
}

pin_project! {
    /// The response future of [`UserAuthService`].
    pub struct UserAuthFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = Projected]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // With the user's token, replayed once after a 401.
        Replay { #[pin] future: AuthReplayFuture<S, B> },
        // With the user's token.
        Attach { #[pin] future: ResponseFuture<S, B> },
        // Not for the API: passed through.
        Pass { #[pin] future: S::Future },
        // A user this replica does not know yet, read from the shared store.
        // A user this replica does not know yet, read from the shared store, then the
        // inner service made ready (boxed: a cached user's future stays small).
        Loading { pending: Box<Pending<S, B>> },
        // Not sent; the error is taken when polled.
        Refused { error: Option<UserAuthError> },
    }
}

/// A request for a user being read from the shared store: the load, then her state, the
/// request, and a clone of the inner service to make ready.
struct Pending<S, B> {
    load: BoxFuture<'static, Result<Option<Arc<Shared>>, StoreError>>,
    shared: Option<Arc<Shared>>,
    request: Option<Request<B>>,
    service: Option<S>,
    replay: bool,
}

impl<S, B> UserAuthFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn new(state: State<S, B>) -> Self {
        Self { state }
    }
}

impl<S, B, ResBody> Future for UserAuthFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                Projected::Replay { future } => return future.poll(cx),
                Projected::Attach { future } => return future.poll(cx),
                Projected::Pass { future } => {
                    return Poll::Ready(ready!(future.poll(cx)).map_err(Into::into))
                }
                Projected::Refused { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => "UserAuthFuture polled after it completed".into(),
                    }))
                }
                Projected::Loading { pending } => {
                    let pending = &mut **pending;
                    if pending.shared.is_none() {
                        match ready!(pending.load.as_mut().poll(cx)) {
                            Ok(Some(shared)) => pending.shared = Some(shared),
                            Ok(None) => {
                                state.set(State::Refused {
                                    error: Some(UserAuthError::NotLoggedIn),
                                });
                                continue;
                            }
                            Err(error) => {
                                state.set(State::Refused { error: None });
                                return Poll::Ready(Err(AuthError::Store(error).into()));
                            }
                        }
                    }
                    let Some(unready) = pending.service.as_mut() else {
                        return Poll::Ready(Err("UserAuthFuture polled after it completed".into()));
                    };
                    if let Err(e) = ready!(unready.poll_ready(cx)) {
                        state.set(State::Refused { error: None });
                        return Poll::Ready(Err(e.into()));
                    }
                    let (Some(mut ready), Some(request), Some(shared)) = (
                        pending.service.take(),
                        pending.request.take(),
                        pending.shared.take(),
                    ) else {
                        return Poll::Ready(Err("UserAuthFuture polled after it completed".into()));
                    };
                    if pending.replay {
                        let future = AuthReplayService::with_shared(ready, shared)
                            .call_checked(request, true);
                        State::Replay { future }
                    } else {
                        let future = attach(&mut ready, &shared, request, true);
                        State::Attach { future }
                    }
                }
            };
            state.set(next);
        }
    }
}

impl<S, B> fmt::Debug for UserAuthFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Loading { .. } => "Loading",
            State::Replay { .. } => "Replay",
            State::Attach { .. } => "Attach",
            State::Pass { .. } => "Pass",
            State::Refused { .. } => "Refused",
        };
        f.debug_tuple("UserAuthFuture").field(&state).finish()
    }
}
