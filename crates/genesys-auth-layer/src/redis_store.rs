//! [`RedisStore`]: users' tokens shared by a fleet of replicas through Redis (feature `redis`),
//! encrypted, under hashed key names (what Redis holds is listed on [`RedisStore`]).
//!
//! This module must never send a token, a refresh token or a user key to Redis in clear,
//! wait for Redis longer than its command timeout, or panic on what Redis answers.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::time::{Duration, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, RedisResult};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::source::{BoxFuture, RefreshToken};
use crate::store::{Lease, StoreError, StoredTokens, TokenStore};
use crate::users::UserKey;

/// The default prefix of [`RedisStore`]'s key names (`genesys-auth:tok:…`).
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub const DEFAULT_REDIS_PREFIX: &str = "genesys-auth";

/// The default bound on each Redis command of a [`RedisStore`]: a Redis on the same network
/// answers in a millisecond; a second means it is down or overloaded, and a request that
/// waits for the store should learn so while its own caller still waits.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub const DEFAULT_REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest TTL sent to Redis (100 years, as `MemoryStore`'s): `Duration::MAX` in
/// milliseconds would overflow Redis' expiry clock and be refused.
const MAX_TTL_MS: u64 = 100 * 365 * 86_400 * 1_000;

/// The format byte of an encrypted value.
const FORMAT_V1: u8 = 1;
/// Format byte and key id: authenticated, not encrypted.
const HEADER_LEN: usize = 1 + 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Compare and delete: a lease is released only by the holder whose id it still has.
const RELEASE_SCRIPT: &str =
    "if redis.call('get',KEYS[1])==ARGV[1] then return redis.call('del',KEYS[1]) else return 0 end";

/// A 256-bit key that encrypts users' tokens in Redis, and its id, written beside every
/// value it encrypts so that a replica knows which key opens it.
///
/// Give a [`RedisStore`] the current key (it writes with it) and any older ones still in
/// use ([`RedisStoreBuilder::old_key`]): rotate by deploying the new key as an old one
/// everywhere, then as the current one, then dropping the oldest once its values expired.
/// The bytes are zeroized when dropped and never shown by `Debug`.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct EncryptionKey {
    id: u32,
    bytes: Zeroizing<[u8; 32]>,
}

impl EncryptionKey {
    /// The key `bytes` (32 random bytes from a secret store), known by `id`. The array
    /// passed in is the caller's to wipe.
    pub fn new(id: u32, bytes: [u8; 32]) -> Self {
        Self {
            id,
            bytes: Zeroizing::new(bytes),
        }
    }

    /// The key's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn cipher(&self) -> Result<XChaCha20Poly1305, StoreError> {
        // `new_from_slice` fails only on a length other than 32; the cipher wipes its copy
        // of the key when dropped (chacha20poly1305's `zeroize` feature).
        XChaCha20Poly1305::new_from_slice(&self.bytes[..])
            .map_err(|_| StoreError::unavailable("a 32-byte key was refused"))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("bytes", &"[redacted]")
            .finish()
    }
}

/// The 256-bit key under which a [`RedisStore`] hashes user keys into Redis key names
/// (HMAC-SHA-256). It is separate from the encryption keys and must stay the same across
/// the fleet and across encryption-key rotations: a new hash key makes every stored entry
/// unfindable (its users log in again). Zeroized when dropped, never shown by `Debug`.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct HashKey(Zeroizing<[u8; 32]>);

impl HashKey {
    /// The key `bytes` (32 random bytes from a secret store). The array passed in is the
    /// caller's to wipe.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey([redacted])")
    }
}

/// A [`TokenStore`] in Redis, shared by every replica of a fleet: users' tokens encrypted,
/// their keys hashed, the refresh lease a `SET NX PX` released by compare-and-delete.
///
/// What Redis holds, and nothing else:
///
/// - key names `<prefix>:tok:<hex>` (a user's tokens) and `<prefix>:lease:<hex>` (her
///   refresh lease), where `<hex>` is HMAC-SHA-256 of the [`UserKey`] under the
///   application's [`HashKey`]: no user identifier in clear;
/// - token values `1 | key id (4 bytes, big endian) | nonce (24 random bytes) | ciphertext`:
///   XChaCha20-Poly1305 under the application's [`EncryptionKey`] with that id, whose
///   associated data is the value's first five bytes and its key name, so that a value
///   edited, or copied under another user's key, does not decrypt;
/// - lease values: the random id of a [`Lease`].
///
/// Each command is one round trip bounded by the command timeout
/// ([`DEFAULT_REDIS_COMMAND_TIMEOUT`]); an error or a timeout is
/// [`StoreError::Unavailable`], a value that does not decrypt (edited, moved under another
/// key, written with a key this replica lacks) [`StoreError::Unreadable`]. The connection is
/// redis-rs' `ConnectionManager`, reconnecting by itself: while Redis is down, a command
/// fails as soon as the connection attempt it waits on does (at once when connections are
/// refused, at the timeout when nothing answers) and its failure starts the next attempt;
/// once Redis is back, the store works again without help. Plain TCP: no TLS to Redis.
///
/// ```no_run
/// use std::sync::Arc;
/// use genesys_auth_layer::{EncryptionKey, HashKey, RedisStore, StoreError, TokenStore};
///
/// # async fn demo(current: [u8; 32], previous: [u8; 32], names: [u8; 32]) -> Result<(), StoreError> {
/// // The three keys come from the application's secret store, the same on every replica.
/// let store = RedisStore::builder("redis://redis.internal:6379")
///     .encryption_key(EncryptionKey::new(2, current)) // writes, and reads its values
///     .old_key(EncryptionKey::new(1, previous)) // reads values written before the rotation
///     .hash_key(HashKey::new(names))
///     .connect()
///     .await?;
/// let store: Arc<dyn TokenStore> = Arc::new(store);
/// # let _ = store; Ok(()) }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    connection: ConnectionManager,
    keys: Keys,
    prefix: String,
    command_timeout: Duration,
    release: redis::Script,
    /// `host:port` (or socket path): no password.
    address: String,
}

impl RedisStore {
    /// A builder for a store on the Redis at `redis_url` (`redis://[:password@]host:port[/db]`
    /// or `redis+unix:///path`).
    pub fn builder(redis_url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: Zeroizing::new(redis_url.into()),
            current: None,
            old: Vec::new(),
            hash: None,
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            command_timeout: DEFAULT_REDIS_COMMAND_TIMEOUT,
        }
    }

    /// The Redis key names of `key`'s tokens and lease.
    fn names(&self, key: &UserKey) -> Result<Names, StoreError> {
        let hex = self.keys.hash(key)?;
        Ok(Names {
            tokens: format!("{}:tok:{hex}", self.prefix),
            lease: format!("{}:lease:{hex}", self.prefix),
        })
    }

    /// `command` on its own clone of the connection, within the command timeout.
    async fn run<T, F>(&self, command: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = RedisResult<T>>,
    {
        match tokio::time::timeout(self.command_timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            // A key of another type where ours should be: garbage, not an outage.
            Ok(Err(error)) if error.code() == Some("WRONGTYPE") => Err(StoreError::Unreadable),
            Ok(Err(error)) => Err(StoreError::unavailable(Failure::Redis { command, error })),
            Err(_) => Err(StoreError::unavailable(Failure::Timeout {
                command,
                after: self.command_timeout,
            })),
        }
    }

    async fn query<T: FromRedisValue>(
        &self,
        command: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.run(command, cmd.query_async(&mut connection)).await
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("address", &self.address)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`]: [`RedisStore::builder`], then at least
/// [`encryption_key`](Self::encryption_key) and [`hash_key`](Self::hash_key), then
/// [`connect`](Self::connect).
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStoreBuilder {
    url: Zeroizing<String>,
    current: Option<EncryptionKey>,
    old: Vec<EncryptionKey>,
    hash: Option<HashKey>,
    prefix: String,
    command_timeout: Duration,
}

impl RedisStoreBuilder {
    /// The key that encrypts what this replica writes (and reads what was written with it).
    /// Required.
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.current = Some(key);
        self
    }

    /// An older key, still accepted for reading values written with it; call once per key.
    pub fn old_key(mut self, key: EncryptionKey) -> Self {
        self.old.push(key);
        self
    }

    /// The key under which user keys are hashed into Redis key names. Required, and the
    /// same on every replica for as long as their entries should be found.
    pub fn hash_key(mut self, key: HashKey) -> Self {
        self.hash = Some(key);
        self
    }

    /// The first part of every key name ([`DEFAULT_REDIS_PREFIX`]): several applications,
    /// or environments, can share one Redis under different prefixes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The bound on each Redis command, and on connecting
    /// ([`DEFAULT_REDIS_COMMAND_TIMEOUT`]).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Connects to Redis (within the command timeout) and gives the store.
    /// [`StoreError::Unavailable`] when Redis cannot be reached, the URL is not a Redis
    /// URL, a key is missing, or two keys share an id.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let current = self.current.ok_or(Failure::Config(
            "no encryption key: call .encryption_key(..)",
        ))?;
        let hash = self
            .hash
            .ok_or(Failure::Config("no hash key: call .hash_key(..)"))?;
        let mut ids: Vec<u32> = self.old.iter().map(EncryptionKey::id).collect();
        ids.push(current.id);
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(Failure::Config("two encryption keys have the same id").into());
        }
        // The URL may carry a password: its parse error is not passed on, in case it
        // quotes it.
        let client = redis::Client::open(self.url.as_str())
            .map_err(|_| Failure::Config("not a Redis URL (redis://host:port)"))?;
        let address = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(Some(self.command_timeout))
            // One connection attempt per reconnection, no retry loop: while Redis is down, a
            // command fails as soon as the attempt does (a refused connection: at once)
            // rather than waiting out the timeout behind a backoff, and the next command
            // starts the next attempt. Commands are rare (a miss, a refresh, a logout), so
            // this does not hammer a Redis that is coming back.
            .set_number_of_retries(0);
        let store = |connection| RedisStore {
            connection,
            keys: Keys {
                current,
                old: self.old,
                hash,
            },
            prefix: self.prefix,
            command_timeout: self.command_timeout,
            release: redis::Script::new(RELEASE_SCRIPT),
            address,
        };
        match tokio::time::timeout(
            self.command_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(store(connection)),
            Ok(Err(error)) => Err(Failure::Redis {
                command: "connect",
                error,
            }
            .into()),
            Err(_) => Err(Failure::Timeout {
                command: "connect",
                after: self.command_timeout,
            }
            .into()),
        }
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &"[redacted]")
            .field("encryption_key", &self.current)
            .field("old_keys", &self.old)
            .field("hash_key", &self.hash)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl TokenStore for RedisStore {
    fn load<'a>(
        &'a self,
        key: &'a UserKey,
    ) -> BoxFuture<'a, Result<Option<StoredTokens>, StoreError>> {
        Box::pin(async move {
            let names = self.names(key)?;
            let value: Option<Vec<u8>> = self
                .query("GET", redis::cmd("GET").arg(&names.tokens))
                .await?;
            value
                .map(|value| self.keys.open(&names.tokens, &value))
                .transpose()
        })
    }

    fn save<'a>(
        &'a self,
        key: &'a UserKey,
        tokens: &'a StoredTokens,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let names = self.names(key)?;
            let value = self.keys.seal(&names.tokens, tokens)?;
            self.query(
                "SET",
                redis::cmd("SET")
                    .arg(&names.tokens)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms(ttl)),
            )
            .await
        })
    }

    fn remove<'a>(&'a self, key: &'a UserKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let names = self.names(key)?;
            self.query(
                "DEL",
                redis::cmd("DEL").arg(&names.tokens).arg(&names.lease),
            )
            .await
        })
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a UserKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(async move {
            let names = self.names(key)?;
            let lease = Lease::random()?;
            // `OK` when taken, nil when someone holds it.
            let taken: Option<()> = self
                .query(
                    "SET NX",
                    redis::cmd("SET")
                        .arg(&names.lease)
                        .arg(lease.id())
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms(ttl)),
                )
                .await?;
            Ok(taken.map(|()| lease))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a UserKey,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let names = self.names(key)?;
            let mut connection = self.connection.clone();
            let mut invocation = self.release.key(&names.lease);
            invocation.arg(lease.id());
            self.run("EVALSHA release", invocation.invoke_async(&mut connection))
                .await
        })
    }
}

/// A user's two key names.
struct Names {
    tokens: String,
    lease: String,
}

/// `ttl` in whole milliseconds for `PX`: at least 1 (Redis refuses 0), at most 100 years.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

/// The store's keys: the current encryption key, the older ones, the hash key.
struct Keys {
    current: EncryptionKey,
    old: Vec<EncryptionKey>,
    hash: HashKey,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old: Vec<u32> = self.old.iter().map(EncryptionKey::id).collect();
        f.debug_struct("Keys")
            .field("encryption_key_id", &self.current.id)
            .field("old_key_ids", &old)
            .finish_non_exhaustive()
    }
}

/// The plaintext of a value: short field names, since every entry carries them.
#[derive(Serialize, Deserialize)]
struct Plain<'a> {
    /// The access token.
    #[serde(borrow)]
    a: Cow<'a, str>,
    /// The expiry: seconds and nanoseconds since the Unix epoch.
    s: u64,
    n: u32,
    /// The refresh token.
    #[serde(borrow)]
    r: Option<Cow<'a, str>>,
    /// The version.
    v: u64,
}

impl Keys {
    /// Lowercase hex HMAC-SHA-256 of the user key under the hash key.
    fn hash(&self, key: &UserKey) -> Result<String, StoreError> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.hash.0[..])
            .map_err(|_| StoreError::unavailable("HMAC refused a 32-byte key"))?;
        mac.update(key.as_str().as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(2 * digest.len());
        for byte in digest {
            // Writing to a `String` cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        Ok(hex)
    }

    fn by_id(&self, id: u32) -> Option<&EncryptionKey> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|key| key.id == id)
    }

    /// `tokens` encrypted for the key name `name`, with the current key.
    fn seal(&self, name: &str, tokens: &StoredTokens) -> Result<Vec<u8>, StoreError> {
        let since_epoch = tokens
            .expires_at()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let plain = Plain {
            a: Cow::Borrowed(tokens.access_token()),
            s: since_epoch.as_secs(),
            n: since_epoch.subsec_nanos(),
            r: tokens
                .refresh_token()
                .map(|token| Cow::Borrowed(token.expose_secret())),
            v: tokens.version(),
        };
        let plaintext =
            Zeroizing::new(serde_json::to_vec(&plain).map_err(StoreError::unavailable)?);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::unavailable(e.to_string()))?;
        let mut value = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
        value.push(FORMAT_V1);
        value.extend_from_slice(&self.current.id.to_be_bytes());
        let aad = associated_data(&value, name);
        let ciphertext = self
            .current
            .cipher()?
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::unavailable("encryption failed"))?;
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&ciphertext);
        Ok(value)
    }

    /// The tokens in `value`, read from the key name `name`; [`StoreError::Unreadable`] for
    /// anything but a value [`seal`](Self::seal) wrote for that name with a key we have.
    fn open(&self, name: &str, value: &[u8]) -> Result<StoredTokens, StoreError> {
        if value.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(StoreError::Unreadable);
        }
        let (header, rest) = value.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let [format, id @ ..] = header else {
            return Err(StoreError::Unreadable);
        };
        let id = <[u8; 4]>::try_from(id).map_err(|_| StoreError::Unreadable)?;
        if *format != FORMAT_V1 {
            return Err(StoreError::Unreadable);
        }
        let key = self
            .by_id(u32::from_be_bytes(id))
            .ok_or(StoreError::Unreadable)?;
        let nonce = <[u8; NONCE_LEN]>::try_from(nonce).map_err(|_| StoreError::Unreadable)?;
        let aad = associated_data(header, name);
        let plaintext = Zeroizing::new(
            key.cipher()?
                .decrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| StoreError::Unreadable)?,
        );
        let plain: Plain<'_> =
            serde_json::from_slice(&plaintext).map_err(|_| StoreError::Unreadable)?;
        let expires_at = Duration::from_secs(plain.s)
            .checked_add(Duration::from_nanos(u64::from(plain.n)))
            .and_then(|since| UNIX_EPOCH.checked_add(since))
            .ok_or(StoreError::Unreadable)?;
        Ok(StoredTokens::new(
            plain.a.into_owned(),
            expires_at,
            plain.r.map(|token| RefreshToken::new(token.into_owned())),
            plain.v,
        ))
    }
}

/// The AEAD's associated data: the value's header, then the key name it is stored under.
fn associated_data(header: &[u8], name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Why Redis was unavailable: the source of a [`StoreError::Unavailable`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("Redis {command} failed")]
    Redis {
        command: &'static str,
        #[source]
        error: RedisError,
    },
    #[error("Redis {command}: no answer within {after:?}")]
    Timeout {
        command: &'static str,
        after: Duration,
    },
    #[error("RedisStore: {0}")]
    Config(&'static str),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        StoreError::unavailable(Box::new(failure) as Box<dyn StdError + Send + Sync>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(current: u32, old: &[u32]) -> Keys {
        Keys {
            current: EncryptionKey::new(current, [current as u8; 32]),
            old: old
                .iter()
                .map(|&id| EncryptionKey::new(id, [id as u8; 32]))
                .collect(),
            hash: HashKey::new([0x5a; 32]),
        }
    }

    fn tokens() -> StoredTokens {
        StoredTokens::new(
            "access-\"quoted\"-token",
            UNIX_EPOCH + Duration::new(1_900_000_000, 123_456_789),
            Some(RefreshToken::new("refresh-token")),
            7,
        )
    }

    #[test]
    fn a_value_opens_under_its_own_name_only() {
        let keys = keys(1, &[]);
        let value = keys.seal("p:tok:aa", &tokens()).unwrap();
        let opened = keys.open("p:tok:aa", &value).unwrap();
        assert_eq!(opened.access_token(), "access-\"quoted\"-token");
        assert_eq!(opened.expires_at(), tokens().expires_at());
        assert_eq!(
            opened.refresh_token().map(RefreshToken::expose_secret),
            Some("refresh-token")
        );
        assert_eq!(opened.version(), 7);
        assert!(matches!(
            keys.open("p:tok:bb", &value),
            Err(StoreError::Unreadable)
        ));
        // Two seals of the same tokens differ (random nonce).
        assert_ne!(value, keys.seal("p:tok:aa", &tokens()).unwrap());
    }

    #[test]
    fn no_token_in_clear_in_a_value() {
        let value = keys(1, &[]).seal("n", &tokens()).unwrap();
        let shown = String::from_utf8_lossy(&value);
        assert!(!shown.contains("access") && !shown.contains("refresh"));
    }

    #[test]
    fn an_edited_value_or_garbage_is_unreadable_never_a_panic() {
        let keys = keys(1, &[]);
        let value = keys.seal("n", &tokens()).unwrap();
        for at in 0..value.len() {
            let mut edited = value.clone();
            edited[at] ^= 0x01;
            assert!(
                matches!(keys.open("n", &edited), Err(StoreError::Unreadable)),
                "byte {at}"
            );
        }
        for len in 0..value.len() {
            assert!(matches!(
                keys.open("n", &value[..len]),
                Err(StoreError::Unreadable)
            ));
        }
        for garbage in [&b""[..], b"\x01", &[0xff; 200], b"{\"a\":\"x\"}"] {
            assert!(matches!(
                keys.open("n", garbage),
                Err(StoreError::Unreadable)
            ));
        }
    }

    #[test]
    fn old_keys_read_and_unknown_keys_do_not() {
        let before = keys(1, &[]);
        let value = before.seal("n", &tokens()).unwrap();
        let rotated = keys(2, &[1]);
        assert_eq!(rotated.open("n", &value).unwrap().version(), 7);
        let rewritten = rotated.seal("n", &tokens()).unwrap();
        assert_eq!(&rewritten[1..5], &2u32.to_be_bytes());
        let dropped = keys(2, &[]);
        assert!(matches!(
            dropped.open("n", &value),
            Err(StoreError::Unreadable)
        ));
        // A key with the right id but other bytes does not open it either.
        let mut wrong = keys(1, &[]);
        wrong.current = EncryptionKey::new(1, [9; 32]);
        assert!(matches!(
            wrong.open("n", &value),
            Err(StoreError::Unreadable)
        ));
    }

    #[test]
    fn names_are_keyed_hashes() {
        let keys = keys(1, &[]);
        let hex = keys.hash(&UserKey::new("alice@example.com")).unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(hex, keys.hash(&UserKey::new("bob@example.com")).unwrap());
        let mut other = self::keys(1, &[]);
        other.hash = HashKey::new([0xa5; 32]);
        assert_ne!(hex, other.hash(&UserKey::new("alice@example.com")).unwrap());
    }

    #[test]
    fn ttls_fit_redis() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_ms(Duration::from_secs(60)), 60_000);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = EncryptionKey::new(3, [0xab; 32]);
        let shown = format!(
            "{key:?} {:?} {:?}",
            HashKey::new([0xcd; 32]),
            RedisStore::builder("redis://:hunter2@h:6379")
                .encryption_key(key.clone())
                .hash_key(HashKey::new([0xcd; 32]))
        );
        for secret in ["171", "ab", "205", "cd", "hunter2"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("id: 3"), "{shown}");
    }

    #[tokio::test]
    async fn a_builder_without_keys_or_with_twin_ids_is_refused() {
        let url = "redis://127.0.0.1:1";
        let without_keys = RedisStore::builder(url).connect().await;
        let without_hash = RedisStore::builder(url)
            .encryption_key(EncryptionKey::new(1, [1; 32]))
            .connect()
            .await;
        let twins = RedisStore::builder(url)
            .encryption_key(EncryptionKey::new(1, [1; 32]))
            .old_key(EncryptionKey::new(1, [2; 32]))
            .hash_key(HashKey::new([3; 32]))
            .connect()
            .await;
        for (result, says) in [
            (without_keys, "encryption key"),
            (without_hash, "hash key"),
            (twins, "same id"),
        ] {
            let error = result.expect_err(says);
            let cause = StdError::source(&error).map(ToString::to_string);
            assert!(
                cause.as_deref().is_some_and(|c| c.contains(says)),
                "{cause:?}"
            );
        }
    }
}
