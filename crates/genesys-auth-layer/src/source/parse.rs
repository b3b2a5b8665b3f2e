//! Parsers for what a token endpoint sends back: the token response, the error body and
//! `Retry-After`. Pure functions over bytes, total on every input (fuzzed), and careful to
//! build their errors from field names, never from the token's characters.

use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde_json::Value;

use crate::error::{truncate, InvalidTokenResponse, OAuthErrorCode};
use crate::token::IssuedToken;

pub use crate::token::MAX_TOKEN_LIFETIME;

/// Parses a successful token response body.
///
/// Accepts `{"access_token": "...", "token_type": "bearer", "expires_in": N}` with
/// `token_type` in any case and `expires_in` a positive whole number of seconds (a JSON
/// number, or a string of digits as some gateways send). An `expires_in` above
/// [`MAX_TOKEN_LIFETIME`] is clamped to it. Other fields are ignored.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::parse::parse_token_response;
///
/// let token = parse_token_response(
///     br#"{"access_token":"abc","token_type":"bearer","expires_in":86399}"#,
/// ).unwrap();
/// assert_eq!(token.lifetime(), Duration::from_secs(86399));
///
/// assert!(parse_token_response(br#"{"access_token":"abc","token_type":"mac","expires_in":60}"#).is_err());
/// ```
pub fn parse_token_response(body: &[u8]) -> Result<IssuedToken, InvalidTokenResponse> {
    let value: Value = serde_json::from_slice(body).map_err(|_| InvalidTokenResponse::NotJson)?;
    let object = value.as_object().ok_or(InvalidTokenResponse::NotAnObject)?;

    let access_token = object
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or(InvalidTokenResponse::MissingAccessToken)?;

    let token_type = object
        .get("token_type")
        .and_then(Value::as_str)
        .ok_or(InvalidTokenResponse::MissingTokenType)?;
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(InvalidTokenResponse::UnsupportedTokenType(truncate(
            token_type, 32,
        )));
    }

    let lifetime = parse_expires_in(
        object
            .get("expires_in")
            .ok_or(InvalidTokenResponse::MissingExpiresIn)?,
    )?;

    IssuedToken::bearer(access_token, lifetime).ok_or(InvalidTokenResponse::InvalidAccessToken)
}

fn parse_expires_in(value: &Value) -> Result<Duration, InvalidTokenResponse> {
    let invalid = || InvalidTokenResponse::InvalidExpiresIn(truncate(&value.to_string(), 32));
    let seconds = match value {
        Value::Number(n) => n.as_u64().ok_or_else(invalid)?,
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            // Digits only, so the only failure is overflow: clamp like a huge number.
            s.parse::<u64>().unwrap_or(u64::MAX)
        }
        _ => return Err(invalid()),
    };
    if seconds == 0 {
        return Err(invalid());
    }
    Ok(Duration::from_secs(seconds).min(MAX_TOKEN_LIFETIME))
}

/// An OAuth error body as Genesys sends it: `error`, plus `description` and/or
/// `error_description`.
///
/// ```
/// use genesys_auth_layer::parse::{parse_error_body, OAuthErrorBody};
/// use genesys_auth_layer::OAuthErrorCode;
///
/// let body = parse_error_body(br#"{"error":"invalid_client","description":"client not found"}"#);
/// let expected = OAuthErrorBody {
///     code: OAuthErrorCode::InvalidClient,
///     description: Some("client not found".to_owned()),
/// };
/// assert_eq!(body, Some(expected));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthErrorBody {
    /// The `error` code.
    pub code: OAuthErrorCode,
    /// `error_description` if present, else Genesys' `description` (at most 512 bytes).
    pub description: Option<String>,
}

/// Parses an OAuth error body; `None` when the body is not JSON with a string `error`.
///
/// ```
/// use genesys_auth_layer::{parse::parse_error_body, OAuthErrorCode};
///
/// let body = parse_error_body(
///     br#"{"error":"invalid_client","description":"bad secret","error_description":"bad secret"}"#,
/// ).unwrap();
/// assert_eq!(body.code, OAuthErrorCode::InvalidClient);
/// assert_eq!(body.description.as_deref(), Some("bad secret"));
/// assert!(parse_error_body(b"<html>502</html>").is_none());
/// ```
pub fn parse_error_body(body: &[u8]) -> Option<OAuthErrorBody> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object()?;
    let code = object.get("error").and_then(Value::as_str)?;
    let description = ["error_description", "description"]
        .iter()
        .filter_map(|k| object.get(*k).and_then(Value::as_str))
        .find(|d| !d.is_empty())
        .map(|d| truncate(d, 512));
    Some(OAuthErrorBody {
        code: OAuthErrorCode::from_code(code),
        description,
    })
}

/// Parses a `Retry-After` header: whole seconds, or an HTTP date (counted from `now`; a
/// date in the past means zero). `None` when it is neither.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use http::HeaderValue;
/// use genesys_auth_layer::parse::parse_retry_after;
///
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("2"), now), Some(Duration::from_secs(2)));
/// assert_eq!(
///     parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:47 GMT"), now),
///     Some(Duration::from_secs(10)),
/// );
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
/// ```
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let delay = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    // A caller may add it to an `Instant`: keep it far from overflowing one.
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The longest `Retry-After` [`parse_retry_after`] returns: one day; a longer one is cut to
/// it. (The cache honours at most its backoff cap, one minute by default.)
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

#[cfg(test)]
mod tests {
    use super::*;

    fn body(expires_in: &str) -> Vec<u8> {
        format!(r#"{{"access_token":"tok","token_type":"Bearer","expires_in":{expires_in}}}"#)
            .into_bytes()
    }

    #[test]
    fn expires_in_edge_cases() {
        assert_eq!(
            parse_token_response(&body("60")).unwrap().lifetime(),
            Duration::from_secs(60)
        );
        assert_eq!(
            parse_token_response(&body("\"60\"")).unwrap().lifetime(),
            Duration::from_secs(60)
        );
        for bad in ["0", "-1", "\"abc\"", "1.5", "null", "\"\"", "\"-5\"", "[]"] {
            assert!(
                matches!(
                    parse_token_response(&body(bad)),
                    Err(InvalidTokenResponse::InvalidExpiresIn(_))
                ),
                "{bad}"
            );
        }
        for huge in [
            "1000000000000",
            "18446744073709551615",
            "\"99999999999999999999999\"",
        ] {
            assert_eq!(
                parse_token_response(&body(huge)).unwrap().lifetime(),
                MAX_TOKEN_LIFETIME,
                "{huge}"
            );
        }
        assert_eq!(
            parse_token_response(br#"{"access_token":"t","token_type":"bearer"}"#).unwrap_err(),
            InvalidTokenResponse::MissingExpiresIn
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            parse_token_response(b"{\"access_token\": \"abc\",").unwrap_err(),
            InvalidTokenResponse::NotJson
        );
        assert_eq!(
            parse_token_response(b"[1]").unwrap_err(),
            InvalidTokenResponse::NotAnObject
        );
        assert_eq!(
            parse_token_response(br#"{"token_type":"bearer","expires_in":5}"#).unwrap_err(),
            InvalidTokenResponse::MissingAccessToken
        );
        assert_eq!(
            parse_token_response(br#"{"access_token":"a","expires_in":5}"#).unwrap_err(),
            InvalidTokenResponse::MissingTokenType
        );
        assert_eq!(
            parse_token_response(
                br#"{"access_token":"a\r\nX: y","token_type":"bearer","expires_in":5}"#
            )
            .unwrap_err(),
            InvalidTokenResponse::InvalidAccessToken
        );
        assert_eq!(
            parse_token_response(br#"{"access_token":"a","token_type":"mac","expires_in":5}"#)
                .unwrap_err(),
            InvalidTokenResponse::UnsupportedTokenType("mac".into())
        );
    }

    #[test]
    fn errors_never_contain_the_token() {
        let secret_token = "SECRET-TOKEN-VALUE";
        let bodies = [
            format!(r#"{{"access_token":"{secret_token}","token_type":"mac","expires_in":5}}"#),
            format!(
                r#"{{"access_token":"{secret_token}","token_type":"bearer","expires_in":"x"}}"#
            ),
            format!(
                r#"{{"access_token":"{secret_token} x","token_type":"bearer","expires_in":5}}"#
            ),
            format!(r#"{{"access_token":"{secret_token}","#),
        ];
        for b in bodies {
            let err = parse_token_response(b.as_bytes()).unwrap_err();
            assert!(!format!("{err} {err:?}").contains(secret_token));
        }
    }

    #[test]
    fn error_body_prefers_error_description() {
        let b = parse_error_body(
            br#"{"error":"invalid_scope","description":"d1","error_description":"d2"}"#,
        )
        .unwrap();
        assert_eq!(b.description.as_deref(), Some("d2"));
        let b = parse_error_body(br#"{"error":"x_custom","description":"d1"}"#).unwrap();
        assert_eq!(b.code, OAuthErrorCode::Extension("x_custom".into()));
        assert_eq!(b.description.as_deref(), Some("d1"));
        assert!(parse_error_body(br#"{"message":"no"}"#).is_none());
        assert!(parse_error_body(br#"{"error":5}"#).is_none());
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("0"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("99999999999999999999999"), now),
            Some(MAX_RETRY_AFTER)
        );
        // A caller can add any answer to an `Instant` without overflow.
        let far = parse_retry_after(&HeaderValue::from_static("18446744073709551615"), now);
        let _ = std::time::Instant::now() + far.unwrap();
        let past = httpdate::fmt_http_date(now - Duration::from_secs(100));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&past).unwrap(), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("-1"), now),
            None
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static(""), now), None);
    }
}
