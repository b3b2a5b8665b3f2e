//! [`TokenStore`]: where users' tokens live beyond one process, and the lease that lets one
//! replica of a fleet refresh a user's token at a time.
//!
//! A [`UserTokenCache`](crate::UserTokenCache) keeps each user's token in process memory
//! (a request never waits for the store on a hit) and goes to its store on a login, on a
//! refresh, on a logout, and for a user it does not know yet. [`MemoryStore`] keeps them
//! in this process (the default); the `redis` feature adds a store every replica shares.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::source::{BoxFuture, RefreshToken};
use crate::users::UserKey;

/// A user's tokens as a [`TokenStore`] keeps them. `Debug` hides both tokens.
#[derive(Clone)]
pub struct StoredTokens {
    access_token: Zeroizing<String>,
    expires_at: SystemTime,
    refresh_token: Option<RefreshToken>,
    version: u64,
}

impl StoredTokens {
    /// Tokens: the access token, when it expires (wall-clock time: replicas share no other
    /// clock), its refresh token, and the entry's version (one more at each refresh).
    pub fn new(
        access_token: impl Into<String>,
        expires_at: SystemTime,
        refresh_token: Option<RefreshToken>,
        version: u64,
    ) -> Self {
        Self {
            access_token: Zeroizing::new(access_token.into()),
            expires_at,
            refresh_token,
            version,
        }
    }

    /// The access token.
    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    /// When the access token expires.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The refresh token, if the user has one.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    /// The entry's version: 1 at login, one more at each refresh.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl fmt::Debug for StoredTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredTokens")
            .field("access_token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("version", &self.version)
            .finish()
    }
}

/// The right to refresh one user's tokens for a while, fleet-wide: whoever holds it is the
/// only replica that sends that user's refresh token. Its id is random and unique, so only
/// its holder can release it.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease(Arc<str>);

impl Lease {
    /// A new lease id: 128 random bits, hex. Fails only if the operating system's random
    /// source does.
    pub fn random() -> Result<Self, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::unavailable(e.to_string()))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(hex.into()))
    }

    /// The lease's id, as the store records its owner.
    pub fn id(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&&*self.0).finish()
    }
}

/// A [`TokenStore`] failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or did not answer (Redis down, a timeout, …).
    #[error("the token store is unavailable")]
    Unavailable(#[source] Arc<dyn StdError + Send + Sync>),
    /// A stored entry could not be read: tampered with, encrypted with a key this replica
    /// does not have, or of another format. It is treated as absent by nobody: the caller
    /// gets this error.
    #[error("a stored token entry could not be read (tampered, unknown key, or another format)")]
    Unreadable,
    /// Another replica holds the user's lease and no new tokens appeared within the bound:
    /// with rotating refresh tokens, refreshing without the lease could log the user out,
    /// so this replica does not.
    #[error("another replica is refreshing this user; no new token within {0:?}")]
    LeaseWait(Duration),
}

impl StoreError {
    /// [`StoreError::Unavailable`] from any error (or message).
    pub fn unavailable(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::Unavailable(Arc::from(error.into()))
    }
}

/// Where users' tokens live beyond one process, and the fleet-wide lease of each user's
/// refresh. Implement it to keep tokens elsewhere; [`MemoryStore`] is the in-process one,
/// and `RedisStore` (feature `redis`) the shared one.
///
/// Every method is one round trip at most and never retries: the cache decides. Keys are
/// the application's [`UserKey`]s; a shared store should not keep them in clear.
pub trait TokenStore: Send + Sync + 'static {
    /// The tokens stored for `key`, if any (and not expired from the store).
    fn load<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<StoredTokens>, StoreError>>;

    /// Stores `tokens` for `key`, replacing what was there, kept at least `ttl`.
    fn save<'a>(
        &'a self,
        key: &'a UserKey,
        tokens: &'a StoredTokens,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes what is stored for `key` (its lease too).
    fn remove<'a>(&'a self, key: &'a UserKey) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Takes `key`'s lease for `ttl` if nobody holds it (an expired lease is nobody's):
    /// `Some` lease, or `None` when another holder has it.
    fn try_lease<'a>(
        &'a self,
        key: &'a UserKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;

    /// Gives `lease` back, if it is still the one held for `key` (compare and delete).
    fn release<'a>(
        &'a self,
        key: &'a UserKey,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// A [`TokenStore`] in this process's memory: the default. Its leases make the refreshes
/// of the caches sharing it (through an `Arc`) take turns, as a shared store does for a
/// fleet; tests use it to stand for a fleet in one process.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    entries: HashMap<UserKey, (StoredTokens, Instant)>,
    leases: HashMap<UserKey, (Lease, Instant)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("entries", &state.entries.len())
            .field("leases", &state.leases.len())
            .finish()
    }
}

/// `now + ttl`, or far in the future if that overflows.
fn until(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

impl TokenStore for MemoryStore {
    fn load<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<StoredTokens>, StoreError>> {
        let now = Instant::now();
        let found = {
            let mut state = self.lock();
            match state.entries.get(key) {
                Some((_, expiry)) if *expiry <= now => {
                    state.entries.remove(key);
                    None
                }
                Some((tokens, _)) => Some(tokens.clone()),
                None => None,
            }
        };
        Box::pin(async move { Ok(found) })
    }

    fn save<'a>(
        &'a self,
        key: &'a UserKey,
        tokens: &'a StoredTokens,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let expiry = until(Instant::now(), ttl);
        self.lock()
            .entries
            .insert(key.clone(), (tokens.clone(), expiry));
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, key: &'a UserKey) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut state = self.lock();
        state.entries.remove(key);
        state.leases.remove(key);
        Box::pin(async { Ok(()) })
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a UserKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        let now = Instant::now();
        let taken = Lease::random().map(|lease| {
            let mut state = self.lock();
            match state.leases.get(key) {
                Some((_, expiry)) if *expiry > now => None,
                _ => {
                    state
                        .leases
                        .insert(key.clone(), (lease.clone(), until(now, ttl)));
                    Some(lease)
                }
            }
        });
        Box::pin(async move { taken })
    }

    fn release<'a>(
        &'a self,
        key: &'a UserKey,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut state = self.lock();
        if state.leases.get(key).is_some_and(|(held, _)| held == lease) {
            state.leases.remove(key);
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(version: u64) -> StoredTokens {
        StoredTokens::new(
            format!("access-{version}"),
            SystemTime::now() + Duration::from_secs(3600),
            Some(RefreshToken::new(format!("refresh-{version}"))),
            version,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_one_holders_until_released_or_expired() {
        let store = MemoryStore::new();
        let key = UserKey::new("u");
        let ttl = Duration::from_secs(5);
        let first = store.try_lease(&key, ttl).await.unwrap().expect("free");
        assert!(store.try_lease(&key, ttl).await.unwrap().is_none(), "held");
        // Only its holder releases it.
        let other = Lease::random().unwrap();
        store.release(&key, &other).await.unwrap();
        assert!(store.try_lease(&key, ttl).await.unwrap().is_none());
        store.release(&key, &first).await.unwrap();
        let second = store.try_lease(&key, ttl).await.unwrap().expect("released");
        // A holder that died: its lease expires.
        tokio::time::sleep(ttl).await;
        let third = store.try_lease(&key, ttl).await.unwrap().expect("expired");
        assert_ne!(second, third);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_kept_for_their_ttl() {
        let store = MemoryStore::new();
        let key = UserKey::new("u");
        store
            .save(&key, &tokens(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(store.load(&key).await.unwrap().is_none());
        store.save(&key, &tokens(2), Duration::MAX).await.unwrap();
        store.remove(&key).await.unwrap();
        assert!(store.load(&key).await.unwrap().is_none());
    }

    #[test]
    fn debug_hides_the_tokens() {
        let shown = format!("{:?}", tokens(7));
        assert!(
            !shown.contains("access-7") && !shown.contains("refresh-7"),
            "{shown}"
        );
        assert!(shown.contains("version: 7"), "{shown}");
    }
}
