//! The fleet-wide single flight of a user's refresh: [`StoreSource`], the token source of a
//! user whose tokens live in a shared [`TokenStore`].
//!
//! Every replica caches the user's token in its own [`TokenCache`](crate::TokenCache)
//! (reads never touch the store). When one replica needs a new token (expiry, refresh
//! ahead, a 401), its cache asks this source, which:
//!
//! 1. takes the user's lease in the store (one holder fleet-wide, with a TTL so a holder
//!    that died frees it), then reads the stored entry: if another replica refreshed since
//!    this one last saw it (a newer version, still valid), that token is adopted and nothing
//!    is sent; otherwise the *stored* refresh token (the newest, whoever rotated it) is sent
//!    once, the answer saved as the next version, and the lease released;
//! 2. without the lease (another replica is refreshing), polls the stored entry until a
//!    newer version appears, and adopts it; if the holder died, its lease expires and the
//!    next attempt takes it;
//! 3. with the store unreachable, never refreshes blind (a rotating refresh token sent by
//!    two replicas logs the user out): it retries until the bound, then fails with the
//!    store's error. Tokens already cached keep serving requests meanwhile.
//!
//! The work runs in a task of its own, so a caller that stops waiting (the cache's fetch
//! timeout) does not lose a rotated refresh token between the answer and the save.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::error::{AuthError, OAuthErrorCode};
use crate::source::{
    BoxFuture, LoginError, RefreshToken, TokenHttpService, TokenSource, UserGrant,
};
use crate::store::{StoreError, StoredTokens, TokenStore};
use crate::token::IssuedToken;
use crate::users::UserKey;

/// How the replicas of a fleet take turns refreshing a user.
#[derive(Clone, Debug)]
pub(crate) struct FleetSettings {
    /// How long a lease holds: longer than `refresh_bound`, so that no other replica takes
    /// it while the holder's refresh may still be answered.
    pub(crate) lease_ttl: Duration,
    /// How long the lease holder waits for the token endpoint.
    pub(crate) refresh_bound: Duration,
    /// How long a refresh waits for the lease, another replica's token, or the store.
    pub(crate) wait: Duration,
    /// How often a waiting replica reads the store.
    pub(crate) poll: Duration,
    /// How long the store keeps an entry after its last save.
    pub(crate) entry_ttl: Duration,
}

/// The least time a stored token must still be valid to be adopted.
const ADOPT_MARGIN: Duration = Duration::from_secs(5);

/// A user's token source backed by the shared store (see the module docs).
pub(crate) struct StoreSource<S> {
    shared: Arc<Fleet<S>>,
    key: UserKey,
    /// The version of the stored entry this replica last used; a newer one is adopted.
    seen: Arc<AtomicU64>,
    /// The newest refresh token this replica saw: if the store loses the entry (a restart
    /// without persistence), the lease holder puts the user back with it.
    last: Arc<Mutex<Option<RefreshToken>>>,
}

/// What every user's [`StoreSource`] of one cache shares.
pub(crate) struct Fleet<S> {
    pub(crate) grant: Arc<UserGrant<S>>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) settings: FleetSettings,
}

impl<S> StoreSource<S> {
    pub(crate) fn new(
        shared: Arc<Fleet<S>>,
        key: UserKey,
        seen: u64,
        last: Option<RefreshToken>,
    ) -> Self {
        Self {
            shared,
            key,
            seen: Arc::new(AtomicU64::new(seen)),
            last: Arc::new(Mutex::new(last)),
        }
    }
}

/// What a logout (or a refused refresh token) leaves in the store: an entry with no token,
/// so that the other replicas tell "logged out" from "the store lost it".
pub(crate) fn tombstone() -> StoredTokens {
    StoredTokens::new("", SystemTime::UNIX_EPOCH, None, u64::MAX)
}

/// Whether `stored` is what a logout left.
pub(crate) fn is_tombstone(stored: &StoredTokens) -> bool {
    stored.refresh_token().is_none() && stored.version() == u64::MAX
}

/// `tokens` as the store keeps them, as version `version`.
pub(crate) fn to_stored(
    access: &IssuedToken,
    refresh: Option<RefreshToken>,
    requested_at: Instant,
    version: u64,
) -> StoredTokens {
    let bearer = access.header().to_str().unwrap_or_default();
    let token = bearer.strip_prefix("Bearer ").unwrap_or(bearer);
    let left = (requested_at + access.lifetime()).saturating_duration_since(Instant::now());
    StoredTokens::new(token, SystemTime::now() + left, refresh, version)
}

/// The stored access token, if still valid for a while: as an issued token.
pub(crate) fn adoptable(stored: &StoredTokens) -> Option<IssuedToken> {
    let left = stored.expires_at().duration_since(SystemTime::now()).ok()?;
    if left < ADOPT_MARGIN {
        return None;
    }
    IssuedToken::bearer(stored.access_token(), left)
}

fn logged_out() -> AuthError {
    AuthError::OAuth {
        status: http::StatusCode::BAD_REQUEST,
        code: OAuthErrorCode::InvalidGrant,
        description: Some("the user's tokens are no longer stored: she must log in again".into()),
    }
}

fn lock(last: &Mutex<Option<RefreshToken>>) -> MutexGuard<'_, Option<RefreshToken>> {
    last.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn remember(last: &Mutex<Option<RefreshToken>>, refresh: Option<&RefreshToken>) {
    if let Some(refresh) = refresh {
        *lock(last) = Some(refresh.clone());
    }
}

impl<S: TokenHttpService> TokenSource for StoreSource<S> {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        let work = refresh(
            self.shared.clone(),
            self.key.clone(),
            self.seen.clone(),
            self.last.clone(),
        );
        Box::pin(async move {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime
                    .spawn(work)
                    .await
                    .unwrap_or(Err(AuthError::RefreshAborted)),
                Err(_) => work.await,
            }
        })
    }

    fn credentials_version(&self) -> u64 {
        self.shared.grant.credentials_version()
    }
}

/// One fetch, fleet-wide single flight (see the module docs).
async fn refresh<S: TokenHttpService>(
    fleet: Arc<Fleet<S>>,
    key: UserKey,
    seen: Arc<AtomicU64>,
    last: Arc<Mutex<Option<RefreshToken>>>,
) -> Result<IssuedToken, AuthError> {
    let settings = &fleet.settings;
    let deadline = Instant::now() + settings.wait;
    let mut last_error = None;
    loop {
        match fleet.store.try_lease(&key, settings.lease_ttl).await {
            Ok(Some(lease)) => {
                let result = under_lease(&fleet, &key, &seen, &last).await;
                // After a refresh that timed out, its answer may still rotate the token:
                // the lease is left to expire rather than released. A release that fails
                // leaves it to expire too.
                if !matches!(result, Err(AuthError::Timeout(_))) {
                    let _ = fleet.store.release(&key, &lease).await;
                }
                return result;
            }
            Ok(None) => match fleet.store.load(&key).await {
                Ok(Some(stored)) if is_tombstone(&stored) => {
                    *lock(&last) = None;
                    return Err(logged_out());
                }
                Ok(Some(stored)) if stored.version() > seen.load(Ordering::Acquire) => {
                    if let Some(token) = adoptable(&stored) {
                        seen.store(stored.version(), Ordering::Release);
                        remember(&last, stored.refresh_token());
                        return Ok(token);
                    }
                }
                // Not newer yet, or lost by the store: the lease holder decides.
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            },
            Err(e) => last_error = Some(e),
        }
        if Instant::now() + settings.poll > deadline {
            let error = last_error.unwrap_or(StoreError::LeaseWait(settings.wait));
            tracing::warn!(
                target: "genesys_auth_layer::fleet",
                %error,
                "no token for the user: the store's lease or entry did not come in time"
            );
            return Err(AuthError::Store(error));
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Holding the lease: adopt a newer stored token, or refresh with the stored refresh token
/// and save the answer as the next version.
async fn under_lease<S: TokenHttpService>(
    fleet: &Fleet<S>,
    key: &UserKey,
    seen: &AtomicU64,
    last: &Mutex<Option<RefreshToken>>,
) -> Result<IssuedToken, AuthError> {
    let mut restored = false;
    let stored = match fleet.store.load(key).await {
        Ok(Some(stored)) if is_tombstone(&stored) => {
            *lock(last) = None;
            return Err(logged_out());
        }
        Ok(Some(stored)) => stored,
        // The store lost her (a restart without persistence): put her back with the newest
        // refresh token this replica saw, if any.
        Ok(None) => match lock(last).clone() {
            Some(refresh) => {
                tracing::warn!(
                    target: "genesys_auth_layer::fleet",
                    "the store lost a user's entry; restored from this replica's last refresh token"
                );
                let version = seen.load(Ordering::Acquire);
                restored = true;
                StoredTokens::new("", SystemTime::UNIX_EPOCH, Some(refresh), version)
            }
            None => return Err(logged_out()),
        },
        Err(e) => return Err(AuthError::Store(e)),
    };
    if stored.version() > seen.load(Ordering::Acquire) {
        if let Some(token) = adoptable(&stored) {
            seen.store(stored.version(), Ordering::Release);
            remember(last, stored.refresh_token());
            return Ok(token);
        }
    }
    let Some(refresh_token) = stored.refresh_token().cloned() else {
        return Err(logged_out());
    };
    let requested_at = Instant::now();
    let bound = fleet.settings.refresh_bound;
    let sent = fleet.grant.refresh_once(&refresh_token);
    let Ok((result, next)) = tokio::time::timeout(bound, sent).await else {
        // The answer may still come and rotate the token: the lease is kept to its TTL.
        return Err(AuthError::Timeout(bound));
    };
    let ttl = fleet.settings.entry_ttl;
    let access = match result {
        Ok(access) => access,
        Err(error @ LoginError::RefreshTokenRejected { .. }) => {
            // Refused for good: the user is logged out, on every replica. Unless the token
            // came from this replica's memory after the store lost her: another replica
            // may hold a newer one, so the store is left for it.
            if !restored {
                let _ = fleet.store.save(key, &tombstone(), ttl).await;
            }
            *lock(last) = None;
            return Err(error.into_auth_error());
        }
        Err(error) => {
            if let Some(next) = next {
                // The server rotated the token though the access token is unusable: keep it.
                remember(last, Some(&next));
                let keep =
                    StoredTokens::new("", SystemTime::UNIX_EPOCH, Some(next), stored.version());
                let _ = fleet.store.save(key, &keep, ttl).await;
            }
            return Err(error.into_auth_error());
        }
    };
    let version = stored.version() + 1;
    let refresh_token = next.unwrap_or(refresh_token);
    remember(last, Some(&refresh_token));
    let tokens = to_stored(&access, Some(refresh_token), requested_at, version);
    // The rotated refresh token must reach the store before the lease goes: tried again
    // a few times, within the lease.
    let mut saved = fleet.store.save(key, &tokens, ttl).await;
    for _ in 0..3 {
        if saved.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        saved = fleet.store.save(key, &tokens, ttl).await;
    }
    if let Err(e) = saved {
        // This replica has the new token; the others will find the old refresh token,
        // superseded if the server rotates them. Said loudly: it may log the user out.
        tracing::warn!(
            target: "genesys_auth_layer::fleet",
            error = %e,
            "a refreshed token could not be saved to the store"
        );
    }
    seen.store(version, Ordering::Release);
    Ok(access)
}
