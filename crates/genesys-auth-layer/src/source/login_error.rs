//! Typed errors of the grants that act for a user: the authorization callback, the code
//! exchange and the refresh.
//!
//! This module owns [`LoginError`]. Like [`AuthError`], no variant ever holds a client
//! secret, an authorization code, a PKCE verifier, a `state` value or a token: the server's
//! descriptions are scrubbed of every value the request sent before they are kept.

use http::StatusCode;

use crate::error::{AuthError, OAuthErrorCode};

/// Why a login (authorization callback, code exchange) or a refresh failed.
///
/// Genesys answers every refused code or refresh token with the OAuth code
/// `invalid_grant` (RFC 6749 §5.2, RFC 7636 §4.6); which of the variants below it becomes
/// depends on the request and on the server's description. Genesys does not document its
/// descriptions (GENESYS.md has none), so the split is made on words any server uses: a
/// description naming `redirect` is [`RedirectUriMismatch`](Self::RedirectUriMismatch), one
/// naming the `verifier` or `challenge` is [`VerifierMismatch`](Self::VerifierMismatch),
/// and every other refused code is [`CodeExpiredOrUsed`](Self::CodeExpiredOrUsed). Each of
/// them means the same to a user: start the login again.
///
/// Boxes into [`tower::BoxError`]; never prints a secret.
///
/// ```
/// use genesys_auth_layer::{AuthorizationState, LoginError};
///
/// let state = AuthorizationState::generate()?;
/// let err = state.verify_callback("code=abc&state=forged").unwrap_err();
/// assert!(matches!(err, LoginError::StateMismatch));
/// assert!(err.must_log_in_again());
/// assert!(!err.to_string().contains("abc"));
/// let boxed: tower::BoxError = err.into();
/// assert!(boxed.downcast_ref::<LoginError>().is_some());
/// # Ok::<(), LoginError>(())
/// ```
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// The callback's `state` is missing or is not the one this login sent: a forged
    /// callback (cross-site request forgery) or a stale one. Its code was not used.
    #[error("the callback's state does not match this login's (forged or stale callback)")]
    StateMismatch,
    /// The authorization server sent the user back with an `error` instead of a code (the
    /// user declined, the client may not use this flow, …).
    #[error(
        "the authorization server refused the login: {code}{}",
        Described(description)
    )]
    AuthorizationDenied {
        /// The `error` parameter of the callback.
        code: OAuthErrorCode,
        /// Its `error_description`, if any (at most 512 bytes).
        description: Option<String>,
    },
    /// The callback has a valid `state` but no `code` and no `error`.
    #[error("the callback carries no authorization code")]
    MissingCode,
    /// The token endpoint refused the authorization code: it expired, was already
    /// redeemed, was issued to another client, or is unknown (`invalid_grant`). Codes are
    /// single-use and short-lived: the user must log in again.
    #[error("the authorization code is expired, already used or unknown (HTTP {}){}", status.as_u16(), Described(description))]
    CodeExpiredOrUsed {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The server's description, scrubbed of what the request sent.
        description: Option<String>,
    },
    /// The token endpoint refused the code because the exchange's `redirect_uri` is not
    /// the one of the authorization request (`invalid_grant` naming the redirect URI).
    #[error("the redirect_uri of the code exchange does not match the authorization request's (HTTP {}){}", status.as_u16(), Described(description))]
    RedirectUriMismatch {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The server's description, scrubbed of what the request sent.
        description: Option<String>,
    },
    /// The token endpoint refused the code because the PKCE verifier does not match the
    /// challenge of the authorization request, or is missing (`invalid_grant` naming the
    /// verifier or the challenge).
    #[error("the PKCE code verifier does not match the authorization request's challenge (HTTP {}){}", status.as_u16(), Described(description))]
    VerifierMismatch {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The server's description, scrubbed of what the request sent.
        description: Option<String>,
    },
    /// The token endpoint refused the refresh token (`invalid_grant`): it expired, was
    /// revoked (logout, password change; GENESYS.md) or superseded. The user must log in
    /// again; the source sends nothing more and answers this error from now on.
    #[error("the refresh token was refused, the user must log in again (HTTP {}){}", status.as_u16(), Described(description))]
    RefreshTokenRejected {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// The server's description, scrubbed of what the request sent.
        description: Option<String>,
    },
    /// The token endpoint answered success with a `refresh_token` that is not a non-empty
    /// string.
    #[error("the token response's `refresh_token` is not a non-empty string")]
    InvalidRefreshToken,
    /// A PKCE code verifier that is not 43 to 128 characters of `[A-Za-z0-9-._~]`.
    #[error("a PKCE code verifier must be 43 to 128 characters of [A-Za-z0-9-._~]")]
    InvalidVerifier,
    /// The operating system's random number generator gave no bytes.
    #[error("the operating system's random number generator is unavailable")]
    RandomnessUnavailable,
    /// The token request failed otherwise: transport, timeout, rate limit, another OAuth
    /// error (`invalid_client`, …), an unusable answer. See [`AuthError`].
    #[error(transparent)]
    Token(#[from] AuthError),
}

impl LoginError {
    /// Whether the user has to go through the browser login again: true for a forged or
    /// refused callback and for every refused code or refresh token; false for failures
    /// that asking again later may cure (transport, rate limit, server errors).
    pub fn must_log_in_again(&self) -> bool {
        match self {
            Self::StateMismatch
            | Self::AuthorizationDenied { .. }
            | Self::MissingCode
            | Self::CodeExpiredOrUsed { .. }
            | Self::RedirectUriMismatch { .. }
            | Self::VerifierMismatch { .. }
            | Self::RefreshTokenRejected { .. } => true,
            Self::InvalidRefreshToken
            | Self::InvalidVerifier
            | Self::RandomnessUnavailable
            | Self::Token(_) => false,
        }
    }

    /// An `invalid_grant` answer to a code exchange, typed by its description (see the
    /// type's docs); any other error is [`LoginError::Token`].
    pub(crate) fn from_code_exchange(err: AuthError) -> Self {
        match err {
            AuthError::OAuth {
                status,
                code: OAuthErrorCode::InvalidGrant,
                description,
            } => {
                let text = description.as_deref().unwrap_or("").to_ascii_lowercase();
                if text.contains("redirect") {
                    Self::RedirectUriMismatch {
                        status,
                        description,
                    }
                } else if text.contains("verifier") || text.contains("challenge") {
                    Self::VerifierMismatch {
                        status,
                        description,
                    }
                } else {
                    Self::CodeExpiredOrUsed {
                        status,
                        description,
                    }
                }
            }
            other => Self::Token(other),
        }
    }

    /// An `invalid_grant` answer to a refresh is [`LoginError::RefreshTokenRejected`];
    /// any other error is [`LoginError::Token`].
    pub(crate) fn from_refresh(err: AuthError) -> Self {
        match err {
            AuthError::OAuth {
                status,
                code: OAuthErrorCode::InvalidGrant,
                description,
            } => Self::RefreshTokenRejected {
                status,
                description,
            },
            other => Self::Token(other),
        }
    }

    /// The error as the token cache sees it ([`TokenSource`](crate::TokenSource) returns an
    /// [`AuthError`]): a refused grant is the `invalid_grant` answer it was.
    pub(crate) fn into_auth_error(self) -> AuthError {
        match self {
            Self::Token(err) => err,
            Self::CodeExpiredOrUsed {
                status,
                description,
            }
            | Self::RedirectUriMismatch {
                status,
                description,
            }
            | Self::VerifierMismatch {
                status,
                description,
            }
            | Self::RefreshTokenRejected {
                status,
                description,
            } => AuthError::OAuth {
                status,
                code: OAuthErrorCode::InvalidGrant,
                description,
            },
            // Not an answer the cache can type: an unusable response, carried as the cause.
            other => AuthError::transport(other),
        }
    }
}

/// `": description"`, or nothing.
struct Described<'a>(&'a Option<String>);

impl std::fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_grant(description: &str) -> AuthError {
        AuthError::OAuth {
            status: StatusCode::BAD_REQUEST,
            code: OAuthErrorCode::InvalidGrant,
            description: Some(description.to_owned()),
        }
    }

    #[test]
    fn code_exchange_errors_are_typed_by_description() {
        assert!(matches!(
            LoginError::from_code_exchange(invalid_grant("redirect_uri mismatch")),
            LoginError::RedirectUriMismatch { .. }
        ));
        assert!(matches!(
            LoginError::from_code_exchange(invalid_grant("Code_Verifier is wrong")),
            LoginError::VerifierMismatch { .. }
        ));
        assert!(matches!(
            LoginError::from_code_exchange(invalid_grant("code already used")),
            LoginError::CodeExpiredOrUsed { .. }
        ));
        let bare = AuthError::OAuth {
            status: StatusCode::BAD_REQUEST,
            code: OAuthErrorCode::InvalidGrant,
            description: None,
        };
        assert!(matches!(
            LoginError::from_code_exchange(bare),
            LoginError::CodeExpiredOrUsed { .. }
        ));
        let client = AuthError::OAuth {
            status: StatusCode::UNAUTHORIZED,
            code: OAuthErrorCode::InvalidClient,
            description: Some("redirect".into()),
        };
        let err = LoginError::from_code_exchange(client);
        assert!(matches!(err, LoginError::Token(_)));
        assert!(!err.must_log_in_again());
    }

    #[test]
    fn refresh_errors_round_trip_to_invalid_grant() {
        let err = LoginError::from_refresh(invalid_grant("revoked"));
        assert!(matches!(err, LoginError::RefreshTokenRejected { .. }));
        assert!(err.must_log_in_again());
        assert_eq!(
            err.into_auth_error().oauth_code(),
            Some(&OAuthErrorCode::InvalidGrant)
        );
        assert!(matches!(
            LoginError::from_refresh(AuthError::RateLimited { retry_after: None }),
            LoginError::Token(AuthError::RateLimited { .. })
        ));
    }
}
