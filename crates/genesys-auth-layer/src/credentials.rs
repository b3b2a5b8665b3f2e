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

/// An OAuth client id. Not a secret: it is shown in `Debug` to help tell clients apart.
///
/// ```
/// use genesys_auth_layer::ClientId;
/// let id = ClientId::new("6d2f5b1a-client");
/// assert_eq!(id.as_str(), "6d2f5b1a-client");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Wraps a client id.
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
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Zeroizing::new(secret.into()))
    }

    /// The secret itself. Call it only to send it to the token endpoint.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

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

/// A client id with its secret: what the client-credentials grant authenticates with.
///
/// ```
/// use genesys_auth_layer::Credentials;
/// let creds = Credentials::new("my-client", "my-secret")?;
/// assert!(!format!("{creds:?}").contains("my-secret"));
/// # Ok::<(), genesys_auth_layer::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Credentials {
    id: ClientId,
    secret: ClientSecret,
}

impl Credentials {
    /// Pairs an id with a secret; neither may be empty.
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
        Ok(Self { id, secret })
    }

    /// The client id.
    pub fn id(&self) -> &ClientId {
        &self.id
    }

    /// The client secret.
    pub fn secret(&self) -> &ClientSecret {
        &self.secret
    }

    /// The `Authorization: Basic …` header for the token endpoint, marked sensitive.
    ///
    /// Per RFC 6749 §2.3.1 the id and the secret are each form-urlencoded before they are
    /// joined with `:` and base64-encoded.
    pub(crate) fn basic_authorization(&self) -> HeaderValue {
        let mut pair = Zeroizing::new(String::new());
        pair.extend(form_urlencoded::byte_serialize(self.id.as_str().as_bytes()));
        pair.push(':');
        pair.extend(form_urlencoded::byte_serialize(
            self.secret.expose_secret().as_bytes(),
        ));
        let mut value = Zeroizing::new(String::from("Basic "));
        base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut value);
        // Base64 output and "Basic " are visible ASCII, always a valid header value.
        let mut header =
            HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        header.set_sensitive(true);
        header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authorization_form_encodes_before_base64() {
        let creds = Credentials::new("id:with space", "p@ss/wörd").unwrap();
        let header = creds.basic_authorization();
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
    fn debug_never_shows_the_secret() {
        let creds = Credentials::new("visible-id", "hidden-secret").unwrap();
        let shown = format!("{creds:?} {:?}", creds.secret());
        assert!(shown.contains("visible-id"));
        assert!(!shown.contains("hidden-secret"));
    }
}
