//! The browser half of a login: the authorization URL and its callback.
//!
//! This module owns [`AuthorizeUrl`] (builds `https://login.<domain>/oauth/authorize?…`),
//! [`AuthorizationState`] (the random `state` that ties a callback to the login that sent
//! it, compared in constant time) and [`AuthorizationCode`] (what the callback carries).
//! Nothing here sends a request; the code exchange is [`UserGrant`](crate::UserGrant)'s.

use std::fmt;

use http::Uri;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::login_error::LoginError;
use super::pkce::{random_url_safe, PkceChallenge, PkceVerifier};
use crate::credentials::ClientId;
use crate::error::{truncate, OAuthErrorCode};

/// Random bytes in a generated `state`: 256 bits, far past guessing.
const STATE_RANDOM_BYTES: usize = 32;

/// The OAuth `state` of one login: random, sent in the authorization URL, kept by the
/// application (in the user's session) and checked on the callback with
/// [`verify_callback`](Self::verify_callback), in constant time. Redacted in `Debug`.
///
/// ```
/// use genesys_auth_layer::{AuthorizationState, LoginError};
///
/// let state = AuthorizationState::generate()?;
/// // Stored in the session as text, restored at the callback.
/// let stored = state.expose_secret().to_owned();
/// let restored = AuthorizationState::new(stored)?;
/// let callback = format!("code=the-code&state={}", restored.expose_secret());
/// assert_eq!(restored.verify_callback(&callback)?.expose_secret(), "the-code");
/// assert!(matches!(
///     restored.verify_callback("code=the-code&state=guess"),
///     Err(LoginError::StateMismatch)
/// ));
/// # Ok::<(), LoginError>(())
/// ```
#[derive(Clone)]
pub struct AuthorizationState(Zeroizing<String>);

impl AuthorizationState {
    /// A new state: 32 bytes of the operating system's CSPRNG, base64url (43 characters).
    pub fn generate() -> Result<Self, LoginError> {
        random_url_safe(STATE_RANDOM_BYTES).map(Self)
    }

    /// A state kept from before. Fails with [`LoginError::StateMismatch`] if it is empty:
    /// an empty state would match a callback without one.
    pub fn new(state: impl Into<String>) -> Result<Self, LoginError> {
        let state = Zeroizing::new(state.into());
        if state.is_empty() {
            return Err(LoginError::StateMismatch);
        }
        Ok(Self(state))
    }

    /// The state itself, to store in the session.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Whether `received` is this state, compared in constant time (a timing difference
    /// must not tell an attacker how much of a guess was right).
    pub fn matches(&self, received: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(received.as_bytes()))
    }

    /// Checks a callback and returns its code.
    ///
    /// `query` is the callback request's query string (`uri.query()`; a leading `?` is
    /// ignored). The `state` is checked first: a callback without this login's state is
    /// [`LoginError::StateMismatch`] whatever else it says (so a forged callback's `error`
    /// is never shown as the server's). Then an `error` parameter is
    /// [`LoginError::AuthorizationDenied`], and no `code` is [`LoginError::MissingCode`].
    /// A parameter given twice counts as forged.
    ///
    /// ```
    /// use genesys_auth_layer::{AuthorizationState, LoginError, OAuthErrorCode};
    ///
    /// let state = AuthorizationState::new("s1")?;
    /// let denied = state.verify_callback("?error=access_denied&state=s1").unwrap_err();
    /// assert!(matches!(
    ///     denied,
    ///     LoginError::AuthorizationDenied { code: OAuthErrorCode::Extension(_), .. }
    /// ));
    /// assert!(matches!(state.verify_callback("state=s1"), Err(LoginError::MissingCode)));
    /// assert!(matches!(state.verify_callback("code=c"), Err(LoginError::StateMismatch)));
    /// # Ok::<(), LoginError>(())
    /// ```
    pub fn verify_callback(&self, query: &str) -> Result<AuthorizationCode, LoginError> {
        let query = query.strip_prefix('?').unwrap_or(query);
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        let mut state = Once::default();
        let mut code = Once::default();
        let mut error = Once::default();
        let mut description = Once::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*key {
                "state" => &mut state,
                "code" => &mut code,
                "error" => &mut error,
                "error_description" => &mut description,
                _ => continue,
            };
            slot.set(Zeroizing::new(value.into_owned()));
        }
        match state.into_value() {
            Some(received) if self.matches(&received) => {}
            _ => return Err(LoginError::StateMismatch),
        }
        if error.repeated || code.repeated {
            return Err(LoginError::StateMismatch);
        }
        if let Some(error) = error.into_value() {
            return Err(LoginError::AuthorizationDenied {
                code: OAuthErrorCode::from_code(&error),
                description: description
                    .into_value()
                    .filter(|d| !d.is_empty())
                    .map(|d| truncate(&d, 512)),
            });
        }
        match code.into_value() {
            Some(code) if !code.is_empty() => Ok(AuthorizationCode(code)),
            _ => Err(LoginError::MissingCode),
        }
    }
}

impl fmt::Debug for AuthorizationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthorizationState([redacted])")
    }
}

/// A query parameter that may appear at most once.
#[derive(Default)]
struct Once {
    value: Option<Zeroizing<String>>,
    repeated: bool,
}

impl Once {
    fn set(&mut self, value: Zeroizing<String>) {
        self.repeated |= self.value.is_some();
        self.value = Some(value);
    }

    /// The value, or `None` if absent or given twice.
    fn into_value(self) -> Option<Zeroizing<String>> {
        self.value.filter(|_| !self.repeated)
    }
}

/// An authorization code from a callback: single-use, short-lived, exchanged once with
/// [`UserGrant::exchange`](crate::UserGrant::exchange). Redacted in `Debug`, zeroized on
/// drop.
///
/// ```
/// use genesys_auth_layer::AuthorizationCode;
///
/// let code = AuthorizationCode::new("abc");
/// assert_eq!(format!("{code:?}"), "AuthorizationCode([redacted])");
/// assert_eq!(code.expose_secret(), "abc");
/// ```
#[derive(Clone)]
pub struct AuthorizationCode(Zeroizing<String>);

impl AuthorizationCode {
    /// Wraps a code received some other way (the callback is best read with
    /// [`AuthorizationState::verify_callback`], which checks its `state`).
    pub fn new(code: impl Into<String>) -> Self {
        Self(Zeroizing::new(code.into()))
    }

    /// The code itself. Call it only to send it to the token endpoint.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthorizationCode([redacted])")
    }
}

/// Builds the URL that starts a login in the user's browser:
/// `GET https://login.<domain>/oauth/authorize?response_type=code&client_id=…&redirect_uri=…&state=…`,
/// with `code_challenge` and `code_challenge_method=S256` for PKCE and Genesys' optional
/// `org` and `provider` pair (GENESYS.md, "Grants").
///
/// [`build`](Self::build) generates the `state` (unless one is given) and returns it with
/// the URL: keep it in the user's session and check the callback with
/// [`AuthorizationState::verify_callback`].
///
/// ```
/// use genesys_auth_layer::{AuthorizeUrl, PkceVerifier, Region};
///
/// let verifier = PkceVerifier::generate()?; // kept in the session with the state
/// let login = AuthorizeUrl::new(Region::EuWest1.login_uri(), "my-client-id", "http://127.0.0.1:8080/callback")
///     .pkce(&verifier)
///     .build()?;
/// let url = login.url().to_string();
/// assert!(url.starts_with("https://login.mypurecloud.ie/oauth/authorize?response_type=code&client_id=my-client-id"));
/// assert!(url.contains("&redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Fcallback"));
/// assert!(url.contains(&format!("&state={}", login.state().expose_secret())));
/// assert!(url.contains(&format!("&code_challenge={}&code_challenge_method=S256", verifier.challenge().as_str())));
/// # Ok::<(), genesys_auth_layer::LoginError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AuthorizeUrl {
    login_uri: Uri,
    client_id: ClientId,
    redirect_uri: String,
    state: Option<AuthorizationState>,
    challenge: Option<PkceChallenge>,
    org_provider: Option<(String, String)>,
}

impl AuthorizeUrl {
    /// A login of `client_id` on the login host `login_uri` (e.g.
    /// [`Region::login_uri`](crate::Region::login_uri)), sending the user back to
    /// `redirect_uri` (one of the OAuth client's registered redirect URIs).
    pub fn new(
        login_uri: Uri,
        client_id: impl Into<ClientId>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        Self {
            login_uri,
            client_id: client_id.into(),
            redirect_uri: redirect_uri.into(),
            state: None,
            challenge: None,
            org_provider: None,
        }
    }

    /// Adds PKCE: the S256 challenge of `verifier` (keep the verifier for the exchange).
    pub fn pkce(mut self, verifier: &PkceVerifier) -> Self {
        self.challenge = Some(verifier.challenge());
        self
    }

    /// Adds Genesys' `org` (organization name) and `provider` (identity provider)
    /// parameters, which go together, to send the user straight to that org's single
    /// sign-on.
    pub fn org_provider(mut self, org: impl Into<String>, provider: impl Into<String>) -> Self {
        self.org_provider = Some((org.into(), provider.into()));
        self
    }

    /// Uses this `state` instead of a generated one.
    pub fn state(mut self, state: AuthorizationState) -> Self {
        self.state = Some(state);
        self
    }

    /// The URL and the `state` it carries. Fails only if no state was given and the
    /// operating system's random number generator is unavailable.
    pub fn build(self) -> Result<AuthorizeRequest, LoginError> {
        let state = match self.state {
            Some(state) => state,
            None => AuthorizationState::generate()?,
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", self.client_id.as_str())
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("state", state.expose_secret());
        if let Some(challenge) = &self.challenge {
            query
                .append_pair("code_challenge", challenge.as_str())
                .append_pair("code_challenge_method", challenge.method());
        }
        if let Some((org, provider)) = &self.org_provider {
            query
                .append_pair("org", org)
                .append_pair("provider", provider);
        }
        let endpoint = crate::region::join(&self.login_uri, "/oauth/authorize");
        let url = Zeroizing::new(format!("{endpoint}?{}", query.finish()));
        Ok(AuthorizeRequest { url, state })
    }
}

/// A built authorization URL and the `state` in it (see [`AuthorizeUrl`]). `Debug` hides
/// the URL, which holds the state.
#[derive(Clone)]
pub struct AuthorizeRequest {
    url: Zeroizing<String>,
    state: AuthorizationState,
}

impl AuthorizeRequest {
    /// The URL to send the user's browser to (a `302 Location`, a link).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The state to keep for the callback.
    pub fn state(&self) -> &AuthorizationState {
        &self.state
    }

    /// The state, giving up the URL.
    pub fn into_state(self) -> AuthorizationState {
        self.state
    }
}

impl fmt::Debug for AuthorizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeRequest")
            .field("url", &"[redacted]")
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_or_missing_state_is_refused_before_anything_else() {
        let state = AuthorizationState::new("the-real-state").unwrap();
        for query in [
            "code=c",
            "code=c&state=",
            "code=c&state=the-real-stat",
            "code=c&state=the-real-statee",
            "code=c&state=THE-REAL-STATE",
            "error=access_denied&state=forged",
            "code=c&state=the-real-state&state=the-real-state",
            "code=c&state=forged&state=the-real-state",
        ] {
            assert!(
                matches!(state.verify_callback(query), Err(LoginError::StateMismatch)),
                "{query}"
            );
        }
        assert!(AuthorizationState::new("").is_err());
    }

    #[test]
    fn a_good_callback_gives_its_code_decoded() {
        let state = AuthorizationState::new("s+/=").unwrap();
        let code = state
            .verify_callback("?code=a%2Bb&state=s%2B%2F%3D#fragment")
            .unwrap();
        assert_eq!(code.expose_secret(), "a+b");
        assert!(matches!(
            state.verify_callback("code=&state=s%2B%2F%3D"),
            Err(LoginError::MissingCode)
        ));
        assert!(matches!(
            state.verify_callback("code=a&code=b&state=s%2B%2F%3D"),
            Err(LoginError::StateMismatch)
        ));
    }

    #[test]
    fn generated_states_differ_and_are_redacted() {
        let a = AuthorizationState::generate().unwrap();
        let b = AuthorizationState::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 43);
        assert!(!format!("{a:?}").contains(a.expose_secret()));
        let request = AuthorizeUrl::new(Uri::from_static("https://login.example.com/"), "id", "x")
            .state(a.clone())
            .build()
            .unwrap();
        assert!(!format!("{request:?}").contains(a.expose_secret()));
    }

    #[test]
    fn the_url_has_every_parameter_encoded() {
        let request = AuthorizeUrl::new(
            Uri::from_static("http://127.0.0.1:9/"),
            "id with space",
            "https://app.example.com/cb?x=1&y=2",
        )
        .org_provider("My Org", "PureCloud")
        .state(AuthorizationState::new("st").unwrap())
        .build()
        .unwrap();
        assert_eq!(
            request.url(),
            "http://127.0.0.1:9/oauth/authorize?response_type=code&client_id=id+with+space\
             &redirect_uri=https%3A%2F%2Fapp.example.com%2Fcb%3Fx%3D1%26y%3D2&state=st\
             &org=My+Org&provider=PureCloud"
        );
        assert!(!request.url().contains("code_challenge"));
        // The URL parses as a URI.
        request.url().parse::<Uri>().unwrap();
    }
}
