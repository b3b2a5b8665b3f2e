//! Credentials that change while the process runs.
//!
//! This module owns [`CredentialStore`]: the credentials a token source reads at each token
//! request, replaceable at run time ([`CredentialStore::rotate`]) and re-read from a secrets
//! file or directory when its contents change ([`CredentialStore::watch_file`]). It also
//! remembers which of the two secrets last worked. It never logs a secret, and never keeps a
//! file's contents beyond parsing them.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::credentials::{
    Credentials, SecretSlot, ENV_CLIENT_ID, ENV_CLIENT_SECRET, ENV_SECONDARY_SECRET,
};
use crate::error::ConfigError;

/// How often a watched credentials file is re-read by default. Mounted Kubernetes secrets
/// change within about a minute of an update; ten seconds adds little to that.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(10);

/// The credentials used for token requests, shared and replaceable at run time.
///
/// Cheap to clone; clones share the credentials.
///
/// ```
/// use genesys_auth_layer::{CredentialStore, Credentials};
///
/// let store = CredentialStore::new(Credentials::new("id", "old-secret")?);
/// store.rotate(Credentials::new("id", "new-secret")?);
/// // Compared without printing it, even if the check failed.
/// assert!(store.current().secret().expose_secret() == "new-secret");
/// # Ok::<(), genesys_auth_layer::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct CredentialStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    current: ArcSwap<Entry>,
    /// How many times the credentials were replaced: a cache waiting out a fatal error
    /// (`invalid_client`) stops waiting when it changes.
    rotations: AtomicU64,
    /// Token requests sent with the other secret after the first one was refused.
    fallbacks: AtomicU64,
}

/// One set of credentials and what was learnt about it: replaced as a whole by a rotation,
/// so a preference learnt for old credentials can never attach to new ones.
struct Entry {
    credentials: Arc<Credentials>,
    /// Whether the secondary secret is the one that last worked.
    prefer_secondary: AtomicBool,
}

impl Entry {
    fn new(credentials: Credentials) -> Self {
        Self {
            credentials: Arc::new(credentials),
            prefer_secondary: AtomicBool::new(false),
        }
    }

    fn preferred_slot(&self) -> SecretSlot {
        if self.prefer_secondary.load(Ordering::Relaxed) {
            SecretSlot::Secondary
        } else {
            SecretSlot::Primary
        }
    }
}

impl CredentialStore {
    /// A store holding `credentials` (as does `From<Credentials>`).
    pub fn new(credentials: Credentials) -> Self {
        Self {
            inner: Arc::new(StoreInner {
                current: ArcSwap::from_pointee(Entry::new(credentials)),
                rotations: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
            }),
        }
    }

    /// The credentials now: a snapshot, which a later [`rotate`](Self::rotate) leaves as it
    /// is.
    pub fn current(&self) -> Arc<Credentials> {
        self.inner.current.load().credentials.clone()
    }

    /// The credentials now and the secret to try first, read together.
    pub(crate) fn snapshot(&self) -> (Arc<Credentials>, SecretSlot) {
        let entry = self.inner.current.load();
        (entry.credentials.clone(), entry.preferred_slot())
    }

    /// Replaces the credentials. The next token request uses the new primary secret; tokens
    /// already issued stay in use until they expire or are refused.
    ///
    /// ```
    /// use genesys_auth_layer::{CredentialStore, Credentials, SecretSlot};
    ///
    /// let store = CredentialStore::new(Credentials::new("my-client", "old-secret")?);
    /// store.rotate(Credentials::new("my-client", "new-secret")?);
    /// // The next token request starts with the new primary secret.
    /// assert_eq!(store.preferred_slot(), SecretSlot::Primary);
    /// assert!(!format!("{store:?}").contains("new-secret"));
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn rotate(&self, credentials: Credentials) {
        tracing::info!(
            target: "genesys_auth_layer::credentials",
            client_id = credentials.id().as_str(),
            has_secondary = credentials.secondary_secret().is_some(),
            "credentials rotated"
        );
        // One store: the new credentials come with no preference of their own.
        self.inner.current.store(Arc::new(Entry::new(credentials)));
        self.inner.rotations.fetch_add(1, Ordering::Release);
    }

    /// How many times [`rotate`](Self::rotate) replaced the credentials.
    pub(crate) fn rotations(&self) -> u64 {
        self.inner.rotations.load(Ordering::Acquire)
    }

    /// Token requests sent with the other secret because the first one was refused
    /// ([`AuthError::is_client_rejected`](crate::AuthError::is_client_rejected)). Each
    /// belongs to a refresh that already sent one, so the token endpoint has seen
    /// [`CacheStats::refreshes`](crate::CacheStats::refreshes) plus this many requests.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    pub(crate) fn count_fallback(&self) {
        self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The secret to try first: the primary one for new or rotated credentials, the
    /// secondary one once it was accepted where the primary one was refused.
    pub fn preferred_slot(&self) -> SecretSlot {
        self.inner.current.load().preferred_slot()
    }

    /// Remembers that `slot` of `credentials` worked, unless they were rotated meanwhile.
    /// (If a rotation lands between the check and the store, the preference goes to the
    /// entry it replaced, which nobody reads any more.)
    pub(crate) fn prefer(&self, credentials: &Arc<Credentials>, slot: SecretSlot) {
        let entry = self.inner.current.load();
        if Arc::ptr_eq(&entry.credentials, credentials) {
            entry
                .prefer_secondary
                .store(slot == SecretSlot::Secondary, Ordering::Relaxed);
        }
    }

    /// Loads credentials from `path` and keeps re-reading it every `interval`, rotating
    /// whenever its contents change to valid credentials. A change is applied once two
    /// consecutive reads agree (so up to two intervals after it is written), so a file
    /// caught half-written is never used. A file that becomes unreadable or invalid is
    /// reported (`warn`) and the last good credentials are kept.
    ///
    /// `path` is either a file of `KEY=value` lines (a vault agent template or an env file)
    /// or a directory with one file per key (a mounted Kubernetes secret). Keys are
    /// `GENESYSCLOUD_OAUTHCLIENT_ID` / `_SECRET` / `_SECONDARY_SECRET`, or `client_id`,
    /// `client_secret` and `secondary_client_secret`.
    ///
    /// The watch stops when the returned [`CredentialsWatcher`] is dropped. Needs a Tokio
    /// runtime.
    ///
    /// ```no_run
    /// use genesys_auth_layer::{CredentialStore, DEFAULT_WATCH_INTERVAL};
    /// # async fn demo() -> Result<(), genesys_auth_layer::ConfigError> {
    /// let (store, watcher) =
    ///     CredentialStore::watch_file("/var/run/secrets/genesys", DEFAULT_WATCH_INTERVAL).await?;
    /// // build with GenesysAuth::with_credentials(store.clone()), keep `watcher` alive
    /// # Ok(()) }
    /// ```
    pub async fn watch_file(
        path: impl AsRef<Path>,
        interval: Duration,
    ) -> Result<(Self, CredentialsWatcher), ConfigError> {
        let path = path.as_ref().to_path_buf();
        let (credentials, fingerprint) = read_credentials(&path).await?;
        let store = Self::new(credentials);
        let weak = Arc::downgrade(&store.inner);
        let watched = path.clone();
        let task = tokio::spawn(async move {
            let mut changes = Settling::new(fingerprint);
            let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let store = CredentialStore { inner };
                match read_credentials(&watched).await {
                    Ok((credentials, fingerprint)) => {
                        if changes.settled(fingerprint) {
                            tracing::info!(
                                target: "genesys_auth_layer::credentials",
                                path = %watched.display(),
                                "credentials file changed"
                            );
                            store.rotate(credentials);
                        }
                    }
                    Err(error) => {
                        changes.unreadable();
                        tracing::warn!(
                            target: "genesys_auth_layer::credentials",
                            path = %watched.display(),
                            %error,
                            "credentials file unusable; keeping the last good credentials"
                        );
                    }
                }
            }
        });
        Ok((store, CredentialsWatcher { task, path }))
    }
}

impl From<Credentials> for CredentialStore {
    fn from(credentials: Credentials) -> Self {
        Self::new(credentials)
    }
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("credentials", &self.current())
            .field("preferred", &self.preferred_slot())
            .finish()
    }
}

/// Keeps a credentials file watched; dropping it stops the watch.
///
/// ```
/// use genesys_auth_layer::{CredentialStore, DEFAULT_WATCH_INTERVAL};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # let path = std::env::temp_dir().join(format!("genesys-doc-{}.env", std::process::id()));
/// std::fs::write(&path, "client_id=my-client\nclient_secret=my-secret\n")?;
/// let (store, watcher) = CredentialStore::watch_file(&path, DEFAULT_WATCH_INTERVAL).await?;
/// assert!(!format!("{watcher:?}").contains("my-secret")); // it shows the path only
/// drop(watcher); // stops the watch; the store keeps the last credentials
/// assert_eq!(store.current().id().as_str(), "my-client");
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
pub struct CredentialsWatcher {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl fmt::Debug for CredentialsWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsWatcher")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for CredentialsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The keys credentials are read from, in a file or as a directory's file names.
const CREDENTIAL_KEYS: [&str; 6] = [
    "client_id",
    "client_secret",
    "secondary_client_secret",
    ENV_CLIENT_ID,
    ENV_CLIENT_SECRET,
    ENV_SECONDARY_SECRET,
];

/// Decides when a changed credentials file is applied: only once two consecutive reads
/// agree. A file rewritten in place (`cat > file`, `cp`) can be read half-written, with a
/// secret that is valid as text but cut short; applying it would make the next token
/// request fail with `invalid_client` and start a backoff. A write that is still going on
/// reads differently the next time; a finished one reads the same.
struct Settling {
    /// What was applied last.
    applied: u64,
    /// A change read once, not applied yet.
    seen: Option<u64>,
}

impl Settling {
    fn new(applied: u64) -> Self {
        Self {
            applied,
            seen: None,
        }
    }

    /// Whether credentials read with `fingerprint` are to be applied now.
    fn settled(&mut self, fingerprint: u64) -> bool {
        if fingerprint == self.applied {
            self.seen = None;
            return false;
        }
        if self.seen.replace(fingerprint) == Some(fingerprint) {
            self.applied = fingerprint;
            self.seen = None;
            return true;
        }
        false
    }

    /// The file could not be read or parsed: a change must be read twice anew.
    fn unreadable(&mut self) {
        self.seen = None;
    }
}

/// Reads credentials from a file or directory, with a fingerprint of what was read (a hash,
/// so the contents themselves need not be kept to notice a change).
async fn read_credentials(path: &Path) -> Result<(Credentials, u64), ConfigError> {
    let unreadable = |e: std::io::Error| ConfigError::CredentialsFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let metadata = tokio::fs::metadata(path).await.map_err(unreadable)?;
    let mut pairs: Vec<(String, Zeroizing<String>)> = Vec::new();
    if metadata.is_dir() {
        // A mounted Kubernetes secret swaps a `..data` link to a new directory in one step:
        // read every key through one resolution of it, so that one read never mixes keys
        // from before and after an update.
        let dir = match tokio::fs::canonicalize(path.join("..data")).await {
            Ok(snapshot) => snapshot,
            Err(_) => path.to_path_buf(),
        };
        for name in CREDENTIAL_KEYS {
            match tokio::fs::read(dir.join(name)).await {
                Ok(bytes) => {
                    let bytes = Zeroizing::new(bytes);
                    let text = Zeroizing::new(lossy_text(&bytes).trim().to_owned());
                    pairs.push((name.to_owned(), text));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(unreadable(e)),
            }
        }
    } else {
        let bytes = Zeroizing::new(tokio::fs::read(path).await.map_err(unreadable)?);
        let text = lossy_text(&bytes);
        pairs = parse_env_lines(&text);
    }
    // Only the keys that make the credentials count: another value in the same env file
    // that changes often must not keep a real change from settling (see `Settling`).
    let mut hasher = DefaultHasher::new();
    for (key, value) in pairs
        .iter()
        .filter(|(key, _)| CREDENTIAL_KEYS.contains(&key.as_str()))
    {
        key.hash(&mut hasher);
        value.as_str().hash(&mut hasher);
    }
    let fingerprint = hasher.finish();
    let credentials = Credentials::from_lookup(|name| {
        let short = match name {
            ENV_CLIENT_ID => "client_id",
            ENV_CLIENT_SECRET => "client_secret",
            _ => "secondary_client_secret",
        };
        pairs
            .iter()
            .find(|(k, _)| k == name || k == short)
            .map(|(_, v)| v.to_string())
    })?;
    Ok((credentials, fingerprint))
}

/// The file's bytes as text (invalid UTF-8 replaced), in a buffer wiped when dropped: the
/// text holds the secret.
fn lossy_text(bytes: &[u8]) -> Zeroizing<String> {
    match String::from_utf8_lossy(bytes) {
        std::borrow::Cow::Borrowed(text) => Zeroizing::new(text.to_owned()),
        std::borrow::Cow::Owned(text) => Zeroizing::new(text),
    }
}

/// Parses `KEY=value` lines: blank lines and `#` comments skipped, an `export ` prefix and
/// matching quotes around the value removed.
fn parse_env_lines(text: &str) -> Vec<(String, Zeroizing<String>)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(value);
            Some((key.trim().to_owned(), Zeroizing::new(value.to_owned())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("genesys-auth-layer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn env_lines() {
        let pairs = parse_env_lines(
            "# comment\nexport GENESYSCLOUD_OAUTHCLIENT_ID=abc\n\nGENESYSCLOUD_OAUTHCLIENT_SECRET=\"s=1\"\nbad line\n",
        );
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].0, "GENESYSCLOUD_OAUTHCLIENT_ID");
        assert_eq!(pairs[1].1.as_str(), "s=1");
    }

    #[tokio::test]
    async fn reads_an_env_file_and_a_secret_directory() {
        let file = temp_path("file");
        std::fs::write(
            &file,
            "GENESYSCLOUD_OAUTHCLIENT_ID=id1\nGENESYSCLOUD_OAUTHCLIENT_SECRET=s1\nGENESYSCLOUD_OAUTHCLIENT_SECONDARY_SECRET=s2\n",
        )
        .unwrap();
        let (creds, _) = read_credentials(&file).await.unwrap();
        assert_eq!(creds.id().as_str(), "id1");
        assert_eq!(creds.secondary_secret().unwrap().expose_secret(), "s2");

        let dir = temp_path("dir");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client_id"), "id2\n").unwrap();
        std::fs::write(dir.join("client_secret"), "s3\n").unwrap();
        let (creds, _) = read_credentials(&dir).await.unwrap();
        assert_eq!(creds.id().as_str(), "id2");
        assert_eq!(creds.secret().expose_secret(), "s3");
        assert!(creds.secondary_secret().is_none());

        std::fs::remove_file(dir.join("client_secret")).unwrap();
        let err = read_credentials(&dir).await.unwrap_err();
        assert_eq!(err, ConfigError::Missing(ENV_CLIENT_SECRET));
        let err = read_credentials(&temp_path("absent")).await.unwrap_err();
        assert!(matches!(err, ConfigError::CredentialsFile { .. }), "{err}");
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_watched_file_rotates_on_change_and_survives_a_bad_edit() {
        let file = temp_path("watched");
        std::fs::write(&file, "client_id=id\nclient_secret=first\n").unwrap();
        let (store, watcher) = CredentialStore::watch_file(&file, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(store.current().secret().expose_secret(), "first");

        std::fs::write(&file, "client_id=id\nclient_secret=second\n").unwrap();
        wait_until(|| store.current().secret().expose_secret() == "second").await;

        std::fs::write(&file, "client_id=id\n").unwrap(); // secret missing: ignored
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.current().secret().expose_secret(), "second");

        drop(watcher);
        std::fs::write(&file, "client_id=id\nclient_secret=third\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            store.current().secret().expose_secret(),
            "second",
            "the watch stopped"
        );
        let _ = std::fs::remove_file(&file);
    }

    async fn wait_until(mut done: impl FnMut() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached within 2 s");
    }

    #[tokio::test]
    async fn other_values_in_the_file_do_not_count_as_a_change() {
        let file = temp_path("other-values");
        std::fs::write(&file, "client_id=id\nclient_secret=s\nREQUEST_ID=1\n").unwrap();
        let (_, before) = read_credentials(&file).await.unwrap();
        std::fs::write(&file, "client_id=id\nclient_secret=s\nREQUEST_ID=2\n").unwrap();
        let (_, after) = read_credentials(&file).await.unwrap();
        assert_eq!(before, after);
        std::fs::write(&file, "client_id=id\nclient_secret=t\nREQUEST_ID=2\n").unwrap();
        let (_, changed) = read_credentials(&file).await.unwrap();
        assert_ne!(after, changed);
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_change_is_applied_only_once_two_reads_agree() {
        let mut changes = Settling::new(1);
        assert!(!changes.settled(1), "unchanged");
        // Caught mid-write (2), then finished (3): neither read twice yet.
        assert!(!changes.settled(2));
        assert!(!changes.settled(3));
        assert!(changes.settled(3), "the same twice: applied");
        assert!(!changes.settled(3), "applied once");
        // A change, an unreadable moment, the change again: it must be read twice anew.
        assert!(!changes.settled(4));
        changes.unreadable();
        assert!(!changes.settled(4));
        assert!(changes.settled(4));
        // Back to what is applied: a pending change is forgotten.
        assert!(!changes.settled(5));
        assert!(!changes.settled(4));
        assert!(!changes.settled(5));
        assert!(changes.settled(5));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_kubernetes_secret_is_read_through_one_resolution_of_its_data_link() {
        use std::os::unix::fs::symlink;
        let dir = temp_path("k8s");
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/client_id"), "id\n").unwrap();
        std::fs::write(dir.join("..v1/client_secret"), "one\n").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/client_id", dir.join("client_id")).unwrap();
        symlink("..data/client_secret", dir.join("client_secret")).unwrap();
        let (creds, _) = read_credentials(&dir).await.unwrap();
        assert_eq!(creds.secret().expose_secret(), "one");

        // The update: a new directory, then the `..data` link swapped to it.
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/client_id"), "id\n").unwrap();
        std::fs::write(dir.join("..v2/client_secret"), "two\n").unwrap();
        symlink("..v2", dir.join("..data.tmp")).unwrap();
        std::fs::rename(dir.join("..data.tmp"), dir.join("..data")).unwrap();
        let (creds, _) = read_credentials(&dir).await.unwrap();
        assert_eq!(creds.secret().expose_secret(), "two");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn preference_is_dropped_by_a_rotation() {
        let store = CredentialStore::new(
            Credentials::new("id", "a")
                .unwrap()
                .with_secondary("b")
                .unwrap(),
        );
        store.prefer(&store.current(), SecretSlot::Secondary);
        assert_eq!(store.preferred_slot(), SecretSlot::Secondary);
        let stale = store.current();
        store.rotate(Credentials::new("id", "c").unwrap());
        assert_eq!(store.preferred_slot(), SecretSlot::Primary);
        store.prefer(&stale, SecretSlot::Secondary);
        assert_eq!(
            store.preferred_slot(),
            SecretSlot::Primary,
            "stale credentials change nothing"
        );
    }
}
