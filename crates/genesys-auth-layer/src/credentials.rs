//! Client credentials.
//!
//! This module owns the OAuth client id and secret. A [`ClientSecret`] never prints its
//! value (`Debug` shows `[redacted]`, there is no `Display`) and is overwritten with zeros
//! when dropped.

use std::fmt;

use base64::Engine as _;
use http::HeaderValue;
use zeroize::Zeroizing;

use crate::error::ConfigError;

/// The environment variable holding the client id, read by [`Credentials::from_env`].
pub const ENV_CLIENT_ID: &str = "GENESYSCLOUD_OAUTHCLIENT_ID";
/// The environment variable holding the client secret, read by [`Credentials::from_env`].
pub const ENV_CLIENT_SECRET: &str = "GENESYSCLOUD_OAUTHCLIENT_SECRET";
/// The environment variable holding an optional secondary client secret, read by
/// [`Credentials::from_env`].
pub const ENV_SECONDARY_SECRET: &str = "GENESYSCLOUD_OAUTHCLIENT_SECONDARY_SECRET";

/// Which of a client's two secrets. New or rotated credentials are tried with the primary
/// one first; [`CredentialStore::preferred_slot`](crate::CredentialStore::preferred_slot)
/// says which one a token request tries first now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SecretSlot {
    /// The primary secret.
    Primary,
    /// The secondary secret.
    Secondary,
}

impl SecretSlot {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            Self::Primary => Self::Secondary,
            Self::Secondary => Self::Primary,
        }
    }

    /// `"primary"` or `"secondary"`, as the `secret fallback used` event names the slots.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Secondary => "secondary",
        }
    }
}

/// An OAuth client id. Not a secret: it is shown in `Debug` to help tell clients apart.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Wraps a client id (as do `From<&str>` and `From<String>`).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClientId").field(&self.0).finish()
    }
}

impl From<&str> for ClientId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for ClientId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// An OAuth client secret: redacted in `Debug`, zeroized on drop, readable only through
/// [`ClientSecret::expose_secret`].
///
/// ```
/// use genesys_auth_layer::ClientSecret;
/// let secret = ClientSecret::new("s3cr3t");
/// assert_eq!(format!("{secret:?}"), "ClientSecret([redacted])");
/// assert_eq!(secret.expose_secret(), "s3cr3t");
/// ```
#[derive(Clone)]
pub struct ClientSecret(Zeroizing<String>);

impl ClientSecret {
    /// Wraps a secret (as do `From<&str>` and `From<String>`).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Zeroizing::new(secret.into()))
    }

    /// The secret itself. Call it only to send it to the token endpoint.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl zeroize::Zeroize for ClientSecret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// Dropping a `ClientSecret` overwrites its bytes (through `Zeroizing`).
impl zeroize::ZeroizeOnDrop for ClientSecret {}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

impl From<&str> for ClientSecret {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for ClientSecret {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// A client id with its secret, and optionally a secondary secret: what the
/// client-credentials grant authenticates with.
///
/// Genesys lets an OAuth client hold two secrets while one is rotated. Give both and a
/// token request refused with `invalid_client` is tried once with the other secret; the one
/// that works is kept for later requests.
///
/// ```
/// use genesys_auth_layer::Credentials;
/// let creds = Credentials::new("my-client", "my-secret")?.with_secondary("my-next-secret")?;
/// assert!(creds.secondary_secret().is_some());
/// assert!(!format!("{creds:?}").contains("secret\""));
/// # Ok::<(), genesys_auth_layer::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Credentials {
    id: ClientId,
    secret: ClientSecret,
    secondary: Option<ClientSecret>,
}

impl Credentials {
    /// Pairs an id with a secret; neither may be empty.
    ///
    /// ```
    /// use genesys_auth_layer::{ConfigError, Credentials};
    ///
    /// let creds = Credentials::new("my-client", "my-secret")?;
    /// assert_eq!(creds.id().as_str(), "my-client");
    /// assert_eq!(Credentials::new("", "my-secret").unwrap_err(), ConfigError::EmptyClientId);
    /// assert_eq!(Credentials::new("my-client", "").unwrap_err(), ConfigError::EmptyClientSecret);
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn new(
        id: impl Into<ClientId>,
        secret: impl Into<ClientSecret>,
    ) -> Result<Self, ConfigError> {
        let (id, secret) = (id.into(), secret.into());
        if id.as_str().is_empty() {
            return Err(ConfigError::EmptyClientId);
        }
        if secret.expose_secret().is_empty() {
            return Err(ConfigError::EmptyClientSecret);
        }
        Ok(Self {
            id,
            secret,
            secondary: None,
        })
    }

    /// Adds a secondary secret, tried when the primary one is refused (`invalid_client` or
    /// any other `401` from the token endpoint).
    ///
    /// ```
    /// use genesys_auth_layer::{ConfigError, Credentials};
    ///
    /// let creds = Credentials::new("my-client", "current-secret")?.with_secondary("next-secret")?;
    /// assert!(creds.secondary_secret().is_some());
    /// let empty = Credentials::new("my-client", "current-secret")?.with_secondary("");
    /// assert_eq!(empty.unwrap_err(), ConfigError::EmptyClientSecret);
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn with_secondary(mut self, secret: impl Into<ClientSecret>) -> Result<Self, ConfigError> {
        let secret = secret.into();
        if secret.expose_secret().is_empty() {
            return Err(ConfigError::EmptyClientSecret);
        }
        self.secondary = Some(secret);
        Ok(self)
    }

    /// Credentials from the environment variables Genesys' CLI and Terraform provider use:
    /// `GENESYSCLOUD_OAUTHCLIENT_ID`, `GENESYSCLOUD_OAUTHCLIENT_SECRET` and, optionally,
    /// `GENESYSCLOUD_OAUTHCLIENT_SECONDARY_SECRET`.
    ///
    /// ```
    /// use genesys_auth_layer::Credentials;
    /// # use genesys_auth_layer::{ENV_CLIENT_ID, ENV_CLIENT_SECRET, ENV_SECONDARY_SECRET};
    /// # std::env::set_var(ENV_CLIENT_ID, "my-client");
    /// # std::env::set_var(ENV_CLIENT_SECRET, "my-secret");
    /// # std::env::remove_var(ENV_SECONDARY_SECRET);
    ///
    /// let creds = Credentials::from_env()?;
    /// assert_eq!(creds.id().as_str(), "my-client");
    /// assert!(creds.secondary_secret().is_none());
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Credentials from `KEY=value` pairs looked up by name, as [`Credentials::from_env`].
    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let id = lookup(ENV_CLIENT_ID).ok_or(ConfigError::Missing(ENV_CLIENT_ID))?;
        let secret = lookup(ENV_CLIENT_SECRET).ok_or(ConfigError::Missing(ENV_CLIENT_SECRET))?;
        let credentials = Self::new(id, secret)?;
        match lookup(ENV_SECONDARY_SECRET).filter(|s| !s.is_empty()) {
            Some(secondary) => credentials.with_secondary(secondary),
            None => Ok(credentials),
        }
    }

    /// The client id.
    pub fn id(&self) -> &ClientId {
        &self.id
    }

    /// The (primary) client secret, redacted in `Debug`.
    pub fn secret(&self) -> &ClientSecret {
        &self.secret
    }

    /// The secondary secret, if any.
    pub fn secondary_secret(&self) -> Option<&ClientSecret> {
        self.secondary.as_ref()
    }

    /// The secret in `slot`, if present.
    pub(crate) fn secret_in(&self, slot: SecretSlot) -> Option<&ClientSecret> {
        match slot {
            SecretSlot::Primary => Some(&self.secret),
            SecretSlot::Secondary => self.secondary.as_ref(),
        }
    }

    /// The `Authorization: Basic …` header for the token endpoint, marked sensitive.
    ///
    /// Per RFC 6749 §2.3.1 the id and the secret are each form-urlencoded before they are
    /// joined with `:` and base64-encoded.
    pub(crate) fn basic_authorization(&self, secret: &ClientSecret) -> HeaderValue {
        let value = self.basic_value(secret);
        // Base64 output and "Basic " are visible ASCII, always a valid header value.
        let mut header =
            HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        header.set_sensitive(true);
        header
    }

    /// `Basic <base64>`, in a buffer wiped when dropped.
    pub(crate) fn basic_value(&self, secret: &ClientSecret) -> Zeroizing<String> {
        // Both buffers get their final capacity up front: a buffer that grew would leave
        // its earlier, smaller copy of the secret unwiped in freed memory.
        let encoded_max = 3 * (self.id.as_str().len() + secret.expose_secret().len()) + 1;
        let mut pair = Zeroizing::new(String::with_capacity(encoded_max));
        pair.extend(form_urlencoded::byte_serialize(self.id.as_str().as_bytes()));
        pair.push(':');
        pair.extend(form_urlencoded::byte_serialize(
            secret.expose_secret().as_bytes(),
        ));
        debug_assert!(pair.len() <= encoded_max, "the pair buffer never grew");
        let value_len = 6 + pair.len().div_ceil(3) * 4;
        let mut value = Zeroizing::new(String::with_capacity(value_len));
        value.push_str("Basic ");
        base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut value);
        debug_assert_eq!(
            value.len(),
            value_len,
            "the header buffer was sized exactly"
        );
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authorization_form_encodes_before_base64() {
        let creds = Credentials::new("id:with space", "p@ss/wörd").unwrap();
        let header = creds.basic_authorization(creds.secret());
        assert!(header.is_sensitive());
        let encoded = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "id%3Awith+space:p%40ss%2Fw%C3%B6rd"
        );
    }

    #[test]
    fn the_basic_buffers_are_sized_for_the_worst_case() {
        // Every byte percent-encoded (3 chars), and lengths around base64's groups of 3:
        // the debug assertions in `basic_authorization` check that no buffer grew.
        for n in 1..12 {
            let secret = "é/".repeat(n);
            let creds = Credentials::new("ü".repeat(n), secret.as_str()).unwrap();
            assert!(creds.basic_authorization(creds.secret()).is_sensitive());
        }
    }

    #[test]
    fn empty_parts_are_config_errors() {
        assert_eq!(
            Credentials::new("", "x").unwrap_err(),
            ConfigError::EmptyClientId
        );
        assert_eq!(
            Credentials::new("x", "").unwrap_err(),
            ConfigError::EmptyClientSecret
        );
    }

    #[test]
    fn secrets_are_wiped_by_zeroize_which_drop_runs() {
        use zeroize::Zeroize;
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let mut secret = ClientSecret::new("wipe-me");
        zeroized_on_drop(&secret);
        secret.zeroize();
        assert_eq!(
            secret.expose_secret(),
            "",
            "the bytes are overwritten and cleared"
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let creds = Credentials::new("visible-id", "hidden-secret").unwrap();
        let shown = format!("{creds:?} {:?}", creds.secret());
        assert!(shown.contains("visible-id"));
        assert!(!shown.contains("hidden-secret"));
    }
}
