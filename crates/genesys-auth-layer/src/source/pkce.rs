//! PKCE (RFC 7636): the code verifier a public client keeps and the S256 challenge it
//! sends with the authorization request.
//!
//! This module owns [`PkceVerifier`] and [`PkceChallenge`], and the one source of
//! randomness of the login flow ([`random_url_safe`]). A verifier is a secret until the code
//! exchange: it is redacted in `Debug` and zeroized on drop, and never printed.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::login_error::LoginError;

/// The shortest verifier RFC 7636 §4.1 allows.
pub const PKCE_VERIFIER_MIN_LEN: usize = 43;
/// The longest verifier RFC 7636 §4.1 allows.
pub const PKCE_VERIFIER_MAX_LEN: usize = 128;

/// Random bytes in a generated verifier: 32 bytes (256 bits, as RFC 7636 §4.1 recommends)
/// are 43 base64url characters, the shortest verifier allowed.
const VERIFIER_RANDOM_BYTES: usize = 32;

/// `n` bytes from the operating system's CSPRNG, base64url-encoded without padding (so
/// only `[A-Za-z0-9-_]`, safe in a URL, a form and a cookie).
pub(crate) fn random_url_safe(n: usize) -> Result<Zeroizing<String>, LoginError> {
    let mut bytes = Zeroizing::new(vec![0u8; n]);
    getrandom::fill(&mut bytes).map_err(|_| LoginError::RandomnessUnavailable)?;
    Ok(Zeroizing::new(URL_SAFE_NO_PAD.encode(&*bytes)))
}

/// A PKCE code verifier: 43 to 128 characters of `[A-Za-z0-9-._~]` (RFC 7636 §4.1; Genesys
/// says the same, see GENESYS.md "Grants"). Redacted in `Debug`, zeroized on drop.
///
/// Generate one per login with [`PkceVerifier::generate`], send its
/// [`challenge`](Self::challenge) with the authorization request, keep the verifier (in the
/// session, never in the URL) and send it with the code exchange.
///
/// ```
/// use genesys_auth_layer::PkceVerifier;
///
/// let verifier = PkceVerifier::generate()?;
/// assert_eq!(verifier.expose_secret().len(), 43);
/// assert_eq!(format!("{verifier:?}"), "PkceVerifier([redacted])");
/// // RFC 7636, appendix B.
/// let rfc = PkceVerifier::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")?;
/// assert_eq!(rfc.challenge().as_str(), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
/// # Ok::<(), genesys_auth_layer::LoginError>(())
/// ```
#[derive(Clone)]
pub struct PkceVerifier(Zeroizing<String>);

impl PkceVerifier {
    /// A new verifier of 43 characters from 32 bytes of the operating system's CSPRNG.
    ///
    /// Fails with [`LoginError::RandomnessUnavailable`] only if the operating system cannot
    /// give random bytes.
    pub fn generate() -> Result<Self, LoginError> {
        random_url_safe(VERIFIER_RANDOM_BYTES).map(Self)
    }

    /// A verifier kept from before (a session store, a test vector). Fails with
    /// [`LoginError::InvalidVerifier`] unless it is 43 to 128 characters of
    /// `[A-Za-z0-9-._~]`.
    ///
    /// ```
    /// use genesys_auth_layer::{LoginError, PkceVerifier};
    ///
    /// assert!(PkceVerifier::new("a".repeat(43)).is_ok());
    /// assert!(matches!(PkceVerifier::new("too-short"), Err(LoginError::InvalidVerifier)));
    /// assert!(matches!(PkceVerifier::new("é".repeat(43)), Err(LoginError::InvalidVerifier)));
    /// ```
    pub fn new(verifier: impl Into<String>) -> Result<Self, LoginError> {
        let verifier = Zeroizing::new(verifier.into());
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if !(PKCE_VERIFIER_MIN_LEN..=PKCE_VERIFIER_MAX_LEN).contains(&verifier.len())
            || !verifier.bytes().all(allowed)
        {
            return Err(LoginError::InvalidVerifier);
        }
        Ok(Self(verifier))
    }

    /// The S256 challenge: base64url(SHA-256(verifier)), without padding.
    pub fn challenge(&self) -> PkceChallenge {
        let digest = Sha256::digest(self.0.as_bytes());
        PkceChallenge(URL_SAFE_NO_PAD.encode(digest))
    }

    /// The verifier itself. Call it only to send it to the token endpoint or to store it
    /// in a session.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PkceVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PkceVerifier([redacted])")
    }
}

/// A PKCE S256 challenge, as sent in the authorization URL (`code_challenge`, with
/// `code_challenge_method=S256`). Not a secret: it is public in the URL.
///
/// ```
/// use genesys_auth_layer::PkceVerifier;
///
/// let challenge = PkceVerifier::generate()?.challenge();
/// assert_eq!(challenge.as_str().len(), 43); // 32 bytes of SHA-256, base64url
/// assert_eq!(challenge.method(), "S256");
/// # Ok::<(), genesys_auth_layer::LoginError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkceChallenge(String);

impl PkceChallenge {
    /// The challenge, base64url without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"S256"`, the only method this crate sends (`plain` gives no protection if the
    /// authorization request is seen).
    pub fn method(&self) -> &'static str {
        "S256"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7636, appendix B: the verifier is base64url of these 32 octets, and its S256
    /// challenge is the one the RFC prints.
    #[test]
    fn rfc_7636_appendix_b() {
        let octets = [
            116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212,
            37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121,
        ];
        assert_eq!(
            URL_SAFE_NO_PAD.encode(octets),
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        );
        let verifier = PkceVerifier::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk").unwrap();
        assert_eq!(
            verifier.challenge().as_str(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn generated_verifiers_are_valid_distinct_and_redacted() {
        let a = PkceVerifier::generate().unwrap();
        let b = PkceVerifier::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        // A generated verifier passes the same check as one given from outside.
        PkceVerifier::new(a.expose_secret()).unwrap();
        assert!(!format!("{a:?}").contains(a.expose_secret()));
    }

    #[test]
    fn length_and_alphabet_bounds() {
        assert!(PkceVerifier::new("a".repeat(42)).is_err());
        assert!(PkceVerifier::new("a".repeat(43)).is_ok());
        assert!(PkceVerifier::new("a".repeat(128)).is_ok());
        assert!(PkceVerifier::new("a".repeat(129)).is_err());
        assert!(PkceVerifier::new(format!("{}~._-", "Z9".repeat(20))).is_ok());
        for bad in [" ", "+", "/", "=", "%", "\n"] {
            assert!(
                PkceVerifier::new(format!("{}{bad}", "a".repeat(43))).is_err(),
                "{bad:?}"
            );
        }
        // Multi-byte characters are refused, not sliced (no panic).
        assert!(PkceVerifier::new("ü".repeat(50)).is_err());
    }
}
