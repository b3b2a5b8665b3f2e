//! Typed errors.
//!
//! This module owns [`AuthError`], the one error type the token machinery returns, and the
//! RFC 6749 error codes it can carry. No variant ever holds a client secret or an access
//! token, so every error can be logged as it is.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// An OAuth 2.0 error code from a token endpoint (RFC 6749 §5.2), with an arm for codes
/// outside the RFC.
///
/// ```
/// use genesys_auth_layer::OAuthErrorCode;
///
/// let code = OAuthErrorCode::from_code("invalid_client");
/// assert_eq!(code, OAuthErrorCode::InvalidClient);
/// assert!(code.is_fatal());
/// assert_eq!(OAuthErrorCode::from_code("rate_limited").as_str(), "rate_limited");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OAuthErrorCode {
    /// `invalid_request`: the request is missing a parameter or is malformed.
    InvalidRequest,
    /// `invalid_client`: client authentication failed (unknown client, wrong secret).
    InvalidClient,
    /// `invalid_grant`: the grant (code, refresh token) is invalid or expired.
    InvalidGrant,
    /// `unauthorized_client`: the client may not use this grant type.
    UnauthorizedClient,
    /// `unsupported_grant_type`: the server does not support this grant type.
    UnsupportedGrantType,
    /// `invalid_scope`: the requested scope is invalid or exceeds what the client may ask.
    InvalidScope,
    /// Any other code the server sent, kept verbatim (at most 64 bytes).
    Extension(String),
}

impl OAuthErrorCode {
    /// Maps a code string to its variant; unknown codes become [`OAuthErrorCode::Extension`].
    ///
    /// ```
    /// use genesys_auth_layer::OAuthErrorCode;
    ///
    /// assert_eq!(OAuthErrorCode::from_code("invalid_scope"), OAuthErrorCode::InvalidScope);
    /// // Other codes are kept as they are, cut to 64 bytes.
    /// let other = OAuthErrorCode::from_code("temporarily_unavailable");
    /// assert_eq!(other, OAuthErrorCode::Extension("temporarily_unavailable".into()));
    /// assert_eq!(OAuthErrorCode::from_code(&"x".repeat(100)).as_str().len(), 64);
    /// ```
    pub fn from_code(code: &str) -> Self {
        match code {
            "invalid_request" => Self::InvalidRequest,
            "invalid_client" => Self::InvalidClient,
            "invalid_grant" => Self::InvalidGrant,
            "unauthorized_client" => Self::UnauthorizedClient,
            "unsupported_grant_type" => Self::UnsupportedGrantType,
            "invalid_scope" => Self::InvalidScope,
            other => Self::Extension(truncate(other, 64)),
        }
    }

    /// The code as the server spells it; its `Display` prints the same.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::Extension(code) => code,
        }
    }

    /// Whether asking again with the same credentials cannot succeed: the configuration
    /// (client, secret, grant, scope) or the grant itself has to change first. True for
    /// `invalid_client`, `unauthorized_client`, `invalid_scope`, `unsupported_grant_type`
    /// and `invalid_grant` (a refused authorization code or refresh token: the user must
    /// log in again); false for `invalid_request` and codes outside the RFC.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::InvalidClient
                | Self::UnauthorizedClient
                | Self::InvalidScope
                | Self::UnsupportedGrantType
                | Self::InvalidGrant
        )
    }
}

impl fmt::Display for OAuthErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token response could not be used. Built by the parser, never from the token's
/// own characters, so it is safe to log.
///
/// ```
/// use genesys_auth_layer::{parse::parse_token_response, AuthError, InvalidTokenResponse};
///
/// let body = br#"{"access_token":"abc","token_type":"bearer"}"#;
/// let err = parse_token_response(body).unwrap_err();
/// assert_eq!(err, InvalidTokenResponse::MissingExpiresIn);
/// assert_eq!(err.to_string(), "`expires_in` is missing");
/// // Inside an `AuthError`, it is an invalid response.
/// assert_eq!(AuthError::from(err).cause(), "invalid_response");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTokenResponse {
    /// The body is not JSON.
    #[error("the body is not valid JSON")]
    NotJson,
    /// The body is JSON but not an object.
    #[error("the body is not a JSON object")]
    NotAnObject,
    /// `access_token` is absent or not a string.
    #[error("`access_token` is missing or not a string")]
    MissingAccessToken,
    /// `access_token` is empty or cannot be sent in an HTTP header (control characters,
    /// CR/LF, non-visible ASCII).
    #[error("`access_token` is empty or not a valid HTTP header value")]
    InvalidAccessToken,
    /// `token_type` is absent or not a string.
    #[error("`token_type` is missing or not a string")]
    MissingTokenType,
    /// `token_type` is not `bearer` (in any case).
    #[error("`token_type` is {0:?}, expected \"bearer\"")]
    UnsupportedTokenType(String),
    /// `expires_in` is absent.
    #[error("`expires_in` is missing")]
    MissingExpiresIn,
    /// `expires_in` is not a positive whole number of seconds.
    #[error("`expires_in` is {0}, expected a positive whole number of seconds")]
    InvalidExpiresIn(String),
    /// The token's lifetime ran out before its response arrived.
    #[error(
        "the token expired before its response arrived (lifetime shorter than the request took)"
    )]
    ExpiredOnArrival,
}

/// Everything that can go wrong while obtaining a token.
///
/// Cloneable, because one failed refresh is shared by every request that waited on it.
/// While the backoff after a failure runs, requests that need a new token get that same
/// failure again at once (no token request is sent for them; the cache's
/// [`health`](crate::TokenCache::health) says when the next attempt is due), so matching on
/// the variant works whether a caller's request was the one that failed or came after it.
/// Boxes into [`tower::BoxError`]; the services of this crate return it that way, so get it
/// back with `downcast_ref::<AuthError>()`.
///
/// ```
/// use genesys_auth_layer::{AuthError, OAuthErrorCode};
/// use http::StatusCode;
///
/// let err = AuthError::OAuth {
///     status: StatusCode::UNAUTHORIZED,
///     code: OAuthErrorCode::InvalidClient,
///     description: Some("client not found".into()),
/// };
/// assert!(err.is_fatal());
/// assert_eq!(err.oauth_code(), Some(&OAuthErrorCode::InvalidClient));
/// assert_eq!(
///     err.to_string(),
///     "token endpoint refused the request: invalid_client (HTTP 401): client not found"
/// );
/// let boxed: tower::BoxError = err.into();
/// assert!(boxed.downcast_ref::<AuthError>().is_some());
/// ```
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token endpoint answered with an OAuth error body.
    #[error("token endpoint refused the request: {code} (HTTP {}){}", status.as_u16(), Described(description))]
    OAuth {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The OAuth `error` code.
        code: OAuthErrorCode,
        /// The server's `error_description` or Genesys' `description`, if any.
        description: Option<String>,
    },
    /// The token endpoint answered 429 Too Many Requests.
    #[error(
        "token endpoint is rate limiting this client (HTTP 429){}",
        RetryAfter(retry_after)
    )]
    RateLimited {
        /// The delay the server asked for in `Retry-After`, if it gave a readable one.
        retry_after: Option<Duration>,
    },
    /// The token endpoint answered a status that is neither success nor an OAuth error.
    #[error("token endpoint answered HTTP {}", status.as_u16())]
    UnexpectedStatus {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The delay a `503 Service Unavailable` asked for in `Retry-After`, if it gave a
        /// readable one (the next token request waits for it); `None` for other statuses.
        retry_after: Option<Duration>,
    },
    /// The token request could not be sent or its answer could not be read (connection
    /// refused or closed, TLS failure, a broken body).
    #[error("token request failed in transport")]
    Transport(#[source] Arc<dyn StdError + Send + Sync>),
    /// The token endpoint did not answer, body included, within the configured time.
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// The token response body was larger than the configured cap.
    #[error("token response is larger than {limit} bytes")]
    ResponseTooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The token endpoint answered success with a body that is not a usable token.
    #[error("token endpoint answered an unusable token response: {0}")]
    InvalidResponse(#[from] InvalidTokenResponse),
    /// Both the primary and the secondary secret were refused; each attempt's error is kept.
    #[error("token endpoint refused both secrets: primary: {primary}; secondary: {secondary}")]
    BothSecretsRejected {
        /// The answer to the primary secret.
        primary: Arc<AuthError>,
        /// The answer to the secondary secret.
        secondary: Arc<AuthError>,
    },
    /// The refresh was stopped before it finished (its runtime shut down).
    #[error("the token refresh stopped before it finished")]
    RefreshAborted,
    /// A token was needed outside a Tokio runtime, so no refresh could be started.
    #[error("a token refresh needs a Tokio runtime")]
    NoRuntime,
    /// A user's tokens live in a shared [`TokenStore`](crate::TokenStore) (a fleet's) and it
    /// failed: unreachable, an unreadable entry, or another replica's refresh that did not
    /// come in time. No token request was sent: without the store's lease, refreshing could
    /// send a rotated refresh token twice.
    #[error("no token: the shared token store failed")]
    Store(#[source] crate::store::StoreError),
}

impl AuthError {
    /// The OAuth error code, looking through [`AuthError::BothSecretsRejected`] (the
    /// secondary secret's answer, else the primary's: one of them may have been a 401
    /// without an OAuth body).
    pub fn oauth_code(&self) -> Option<&OAuthErrorCode> {
        match self {
            Self::OAuth { code, .. } => Some(code),
            Self::BothSecretsRejected { primary, secondary } => {
                secondary.oauth_code().or_else(|| primary.oauth_code())
            }
            _ => None,
        }
    }

    /// A stable, low-cardinality name for the kind of failure, for logs and metrics:
    /// `oauth_error`, `rate_limited`, `http_status`, `transport`, `timeout`, `too_large`,
    /// `invalid_response`, `secrets_rejected`, `aborted` or `no_runtime`.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::OAuth { .. } => "oauth_error",
            Self::RateLimited { .. } => "rate_limited",
            Self::UnexpectedStatus { .. } => "http_status",
            Self::Transport(_) => "transport",
            Self::Timeout(_) => "timeout",
            Self::ResponseTooLarge { .. } => "too_large",
            Self::InvalidResponse(_) => "invalid_response",
            Self::BothSecretsRejected { .. } => "secrets_rejected",
            Self::RefreshAborted => "aborted",
            Self::NoRuntime => "no_runtime",
            Self::Store(_) => "store",
        }
    }

    /// The HTTP status the token endpoint answered, if the failure came with one (429 for
    /// [`AuthError::RateLimited`]); for [`AuthError::BothSecretsRejected`], the secondary
    /// secret's answer.
    pub fn http_status(&self) -> Option<StatusCode> {
        match self {
            Self::OAuth { status, .. } | Self::UnexpectedStatus { status, .. } => Some(*status),
            Self::RateLimited { .. } => Some(StatusCode::TOO_MANY_REQUESTS),
            Self::BothSecretsRejected { secondary, .. } => secondary.http_status(),
            _ => None,
        }
    }

    /// Whether retrying with the same configuration cannot help: a fatal OAuth error code
    /// (see [`OAuthErrorCode::is_fatal`]) or refused credentials (see
    /// [`AuthError::is_client_rejected`]), looking through
    /// [`AuthError::BothSecretsRejected`].
    pub fn is_fatal(&self) -> bool {
        self.oauth_code().is_some_and(OAuthErrorCode::is_fatal) || self.is_client_rejected()
    }

    /// Whether the token endpoint refused the client's credentials: an OAuth
    /// `invalid_client`, or any `401 Unauthorized` whatever its body says, another OAuth
    /// code included (a 401 from the token endpoint is a refused client authentication,
    /// RFC 6749 §5.2; a gateway may answer it with its own body, Genesys with
    /// `{"code":"bad.credentials",…}`). Looks through [`AuthError::BothSecretsRejected`].
    ///
    /// A token request refused this way is tried once with the secondary secret, when
    /// there is one.
    pub fn is_client_rejected(&self) -> bool {
        self.oauth_code() == Some(&OAuthErrorCode::InvalidClient)
            || self.http_status() == Some(StatusCode::UNAUTHORIZED)
    }

    /// The delay a 429 or a 503 answer asked for in `Retry-After`, if any, as of that
    /// answer: callers that get the same failure again later in the backoff see the same
    /// value; [`Health::backoff_remaining`](crate::Health::backoff_remaining) is the wait
    /// left.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::UnexpectedStatus { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    pub(crate) fn transport(err: impl Into<tower::BoxError>) -> Self {
        Self::Transport(Arc::from(err.into()))
    }
}

/// A configuration mistake found while building the layer.
///
/// ```
/// use genesys_auth_layer::{ConfigError, Credentials};
///
/// let err = Credentials::new("", "my-secret").unwrap_err();
/// assert_eq!(err, ConfigError::EmptyClientId);
/// assert_eq!(err.to_string(), "the client id is empty");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The token endpoint is plain `http` on a host that is not loopback.
    #[error("token endpoint {0} must use https (plain http is allowed only on loopback)")]
    InsecureTokenEndpoint(String),
    /// An API origin is plain `http` on a host that is not loopback.
    #[error("API origin {0} must use https (plain http is allowed only on loopback, or through Scope::with_insecure_origin)")]
    InsecureOrigin(String),
    /// A URI is not absolute (`scheme://host[:port]`), uses a scheme other than http(s), or
    /// carries user info (`user:password@`, shown redacted).
    #[error("{0} is not an absolute http(s) URI without user info")]
    InvalidUri(String),
    /// The client id is empty.
    #[error("the client id is empty")]
    EmptyClientId,
    /// The client secret is empty.
    #[error("the client secret is empty")]
    EmptyClientSecret,
    /// A required setting (an environment variable or a key of a credentials file) is absent.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A credentials file could not be read.
    #[error("cannot read credentials from {path}: {reason}")]
    CredentialsFile {
        /// The file or directory.
        path: String,
        /// Why (an I/O error's description; never file contents).
        reason: String,
    },
}

struct Described<'a>(&'a Option<String>);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) if !d.is_empty() => write!(f, ": {d}"),
            _ => Ok(()),
        }
    }
}

struct RetryAfter<'a>(&'a Option<Duration>);

impl fmt::Display for RetryAfter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, ", retry after {d:?}"),
            None => Ok(()),
        }
    }
}

/// A URI for an error message: user info (`user:password@`) replaced, at most 200 bytes.
pub(crate) fn shown_uri(uri: &str) -> String {
    // Kept visible: a scheme, only when it is one (`letters:` at the start, then `//`), and
    // leading slashes. User info (up to the authority's last `@`) is redacted. Without a
    // real scheme the text may not even be a URI ("user:pass@host", "https:/user:pass@host"):
    // everything up to the last `@` before a query or fragment is redacted then, a path
    // holding an `@` included, which is the safe side.
    let scheme_len = uri
        .find(':')
        .filter(|&colon| {
            let scheme = &uri[..colon];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
                && uri[colon..].starts_with("://")
        })
        .map_or(0, |colon| colon + 1);
    let start =
        scheme_len + uri[scheme_len..].len() - uri[scheme_len..].trim_start_matches('/').len();
    let rest = &uri[start..];
    // With a real scheme the authority ends at the path; without one, nothing says where.
    let ends: &[char] = if scheme_len > 0 {
        &['/', '?', '#']
    } else {
        &['?', '#']
    };
    let authority = &rest[..rest.find(ends).unwrap_or(rest.len())];
    let redacted = authority
        .rfind('@')
        .map(|at| format!("{}[redacted]{}", &uri[..start], &rest[at..]));
    truncate(&redacted.unwrap_or_else(|| uri.to_owned()), 200)
}

/// Cuts untrusted text (a server's error description, a region name) to at most `max`
/// bytes on a character boundary, with control characters (CR, LF, ESC…), Unicode line and
/// paragraph separators and invisible formatting characters (bidirectional overrides,
/// zero-width characters) replaced by spaces, so it cannot forge log lines, terminal
/// escapes, or text that reads differently from what it is.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end]
        .chars()
        .map(|c| if shown_as_is(c) { c } else { ' ' })
        .collect()
}

/// Whether `c` may appear in a log line as it is.
fn shown_as_is(c: char) -> bool {
    !(c.is_control()
        || matches!(c,
            '\u{00ad}'                    // soft hyphen
            | '\u{061c}'                  // Arabic letter mark
            | '\u{180e}'                  // Mongolian vowel separator
            | '\u{200b}'..='\u{200f}'     // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202e}'     // line/paragraph separators, bidi embeddings
            | '\u{2060}'..='\u{206f}'     // word joiner, invisible operators, bidi isolates
            | '\u{feff}'                  // zero-width no-break space (BOM)
            | '\u{fff9}'..='\u{fffb}'     // interlinear annotations
            | '\u{0600}'..='\u{0605}'     // Arabic number signs (format)
            | '\u{06dd}' | '\u{070f}' | '\u{08e2}' | '\u{110bd}' | '\u{110cd}'
            | '\u{fe00}'..='\u{fe0f}'     // variation selectors
            | '\u{1d173}'..='\u{1d17a}'   // musical formatting
            | '\u{e0000}'..='\u{e007f}'   // tags ("ASCII smuggling")
            | '\u{e0100}'..='\u{e01ef}'   // variation selectors supplement
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_secrets_rejected_keeps_the_oauth_code_of_either_answer() {
        let invalid_client = Arc::new(AuthError::OAuth {
            status: StatusCode::UNAUTHORIZED,
            code: OAuthErrorCode::InvalidClient,
            description: None,
        });
        let bare_401 = Arc::new(AuthError::UnexpectedStatus {
            status: StatusCode::UNAUTHORIZED,
            retry_after: None,
        });
        for (primary, secondary) in [
            (invalid_client.clone(), bare_401.clone()),
            (bare_401.clone(), invalid_client.clone()),
        ] {
            let both = AuthError::BothSecretsRejected { primary, secondary };
            assert_eq!(both.oauth_code(), Some(&OAuthErrorCode::InvalidClient));
            assert!(both.is_client_rejected() && both.is_fatal());
        }
        let neither = AuthError::BothSecretsRejected {
            primary: bare_401.clone(),
            secondary: bare_401,
        };
        assert_eq!(neither.oauth_code(), None);
        assert!(neither.is_client_rejected() && neither.is_fatal());
    }

    #[test]
    fn user_info_is_redacted_with_or_without_a_scheme() {
        for (given, shown) in [
            (
                "https://u:p@gw.example.com/oauth/token",
                "https://[redacted]@gw.example.com/oauth/token",
            ),
            (
                "u:p@gw.example.com/oauth",
                "[redacted]@gw.example.com/oauth",
            ),
            ("//u:p@gw.example.com", "//[redacted]@gw.example.com"),
            ("gw.example.com/a@b", "[redacted]@b"),
            ("https://api.example.com/a@b", "https://api.example.com/a@b"),
            (
                "https://api.example.com/x?email=a@b",
                "https://api.example.com/x?email=a@b",
            ),
            (
                "gwuser:GWPASS@gw.example.com/oauth/token?next=https://x",
                "[redacted]@gw.example.com/oauth/token?next=https://x",
            ),
            (
                "https:/gwuser:GWPASS@gw.example.com/t",
                "[redacted]@gw.example.com/t",
            ),
            (
                "https//gwuser:GWPASS@gw.example.com/t",
                "[redacted]@gw.example.com/t",
            ),
            ("é://ü:p@h/é", "[redacted]@h/é"),
        ] {
            assert_eq!(shown_uri(given), shown, "{given}");
        }
    }

    #[test]
    fn server_text_cannot_break_or_disguise_a_log_line() {
        let hostile = "a\r\nb\u{2028}c\u{2029}d\u{202e}e\u{200b}f\u{feff}g\u{1b}[31mh\u{e0041}i";
        assert_eq!(truncate(hostile, 200), "a  b c d e f g [31mh i");
        assert_eq!(truncate("plain é 名前", 200), "plain é 名前");
    }

    #[test]
    fn extension_codes_are_bounded() {
        let long = "x".repeat(1000);
        match OAuthErrorCode::from_code(&long) {
            OAuthErrorCode::Extension(s) => assert_eq!(s.len(), 64),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(
            shown_uri("https://user:pass@login.example.com/oauth/token"),
            "https://[redacted]@login.example.com/oauth/token"
        );
        assert_eq!(
            shown_uri("https://api.example.com/a@b"),
            "https://api.example.com/a@b"
        );
        assert_eq!(truncate("a\r\nb\x1b[31m", 100), "a  b [31m");
    }

    #[test]
    fn accessors_name_the_failure() {
        assert_eq!(OAuthErrorCode::InvalidGrant.as_str(), "invalid_grant");
        assert_eq!(OAuthErrorCode::InvalidGrant.to_string(), "invalid_grant");
        assert!(OAuthErrorCode::UnauthorizedClient.is_fatal());
        assert!(!OAuthErrorCode::InvalidRequest.is_fatal());
        let limited = AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(limited.cause(), "rate_limited");
        assert_eq!(limited.http_status(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(30)));
        assert_eq!(
            AuthError::Timeout(Duration::from_secs(10)).cause(),
            "timeout"
        );
        assert_eq!(AuthError::NoRuntime.http_status(), None);
        let bare_401 = AuthError::UnexpectedStatus {
            status: StatusCode::UNAUTHORIZED,
            retry_after: None,
        };
        assert!(bare_401.is_client_rejected() && bare_401.is_fatal());
        let bad_gateway = AuthError::UnexpectedStatus {
            status: StatusCode::BAD_GATEWAY,
            retry_after: None,
        };
        assert!(!bad_gateway.is_client_rejected() && !bad_gateway.is_fatal());
    }

    #[test]
    fn rate_limited_display_names_the_delay() {
        let err = AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
        assert!(err.to_string().contains("retry after 2s"), "{err}");
        assert!(!err.is_fatal());
    }
}
