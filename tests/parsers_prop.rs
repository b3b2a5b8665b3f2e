//! The token endpoint's parsers under property-based fuzzing (proptest; cargo-fuzz needs a
//! nightly toolchain CI does not have): `parse_token_response`, `parse_error_body` and
//! `parse_retry_after` never panic on any input, and structured inputs round-trip.
//!
//! 2,000 cases per property by default; `PROPTEST_CASES=100000 cargo test -p
//! genesys-auth-suite --test parsers_prop` for a longer run.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use genesys_auth_layer::parse::{
    parse_error_body, parse_retry_after, parse_token_response, MAX_RETRY_AFTER, MAX_TOKEN_LIFETIME,
};
use genesys_auth_layer::{
    AuthError, BoxFuture, CacheConfig, InvalidTokenResponse, IssuedToken, OAuthErrorCode,
    TokenCache, TokenSource,
};
use http::HeaderValue;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// The `Authorization` header a parsed token would be sent with, read back through a
/// [`TokenCache`] (the only public way to see an issued token's header).
fn header_of(issued: IssuedToken, rt: &tokio::runtime::Runtime) -> HeaderValue {
    struct Once(std::sync::Mutex<Option<IssuedToken>>);
    impl TokenSource for Once {
        fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
            let issued = self.0.lock().unwrap().take();
            Box::pin(async move { issued.ok_or(AuthError::RefreshAborted) })
        }
    }
    let cache = TokenCache::new(
        Once(std::sync::Mutex::new(Some(issued))),
        CacheConfig::default(),
    );
    let token: Arc<_> = rt.block_on(cache.token()).expect("the token");
    token.header().clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// A JSON value of any shape, biased towards what a broken token endpoint sends.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        "[0-9]{0,30}".prop_map(Value::String),
        Just(json!("bearer")),
        Just(json!("BeArEr")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A token the library must accept: visible ASCII, no spaces, 1–300 characters.
fn valid_token() -> impl Strategy<Value = String> {
    "[!-~]{1,300}"
}

/// "bearer" in any mix of cases.
fn bearer_any_case() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), 6).prop_map(|upper| {
        "bearer"
            .chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// The characters the crate never shows as they are in server text (the spec of
/// `error::truncate`).
fn hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}' | '\u{0600}'..='\u{0605}' | '\u{06dd}' | '\u{070f}'
            | '\u{08e2}' | '\u{110bd}' | '\u{110cd}' | '\u{fe00}'..='\u{fe0f}'
            | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}' | '\u{e0100}'..='\u{e01ef}')
}

fn rfc_code() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("invalid_request".to_owned()),
        Just("invalid_client".to_owned()),
        Just("invalid_grant".to_owned()),
        Just("unauthorized_client".to_owned()),
        Just("unsupported_grant_type".to_owned()),
        Just("invalid_scope".to_owned()),
        "[a-z_.]{1,64}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn token_parser_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_token_response(&body);
    }

    #[test]
    fn error_parser_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_error_body(&body);
    }

    #[test]
    fn retry_after_never_panics(raw in prop::collection::vec(any::<u8>(), 0..64), now_secs in any::<u32>(), nanos in 0u32..1_000_000_000) {
        if let Ok(value) = HeaderValue::from_bytes(&raw) {
            let now = UNIX_EPOCH + Duration::new(u64::from(now_secs), nanos);
            let _ = parse_retry_after(&value, now);
        }
    }

    /// Any JSON object with any values in the three fields: no panic, an accepted token has
    /// a lifetime in (0, 48 h], and no error's text contains the access token.
    #[test]
    fn token_parser_on_structured_json(
        access in any_json(),
        token_type in any_json(),
        expires_in in any_json(),
        omit in 0u8..8,
        extra in any_json(),
    ) {
        let mut object = serde_json::Map::new();
        if omit & 1 == 0 { object.insert("access_token".into(), access.clone()); }
        if omit & 2 == 0 { object.insert("token_type".into(), token_type); }
        if omit & 4 == 0 { object.insert("expires_in".into(), expires_in); }
        object.insert("extra".into(), extra);
        let body = serde_json::to_vec(&Value::Object(object)).unwrap();
        match parse_token_response(&body) {
            Ok(token) => {
                prop_assert!(token.lifetime() > Duration::ZERO);
                prop_assert!(token.lifetime() <= MAX_TOKEN_LIFETIME);
            }
            Err(err) => {
                if let Some(secret) = access.as_str().filter(|s| s.len() >= 12) {
                    let shown = format!("{err} {err:?}");
                    prop_assert!(!shown.contains(secret), "{}", shown);
                }
            }
        }
    }

    /// A valid bearer token with a positive `expires_in` (number or digit string) is
    /// accepted, sent as exactly `Bearer <token>`, marked sensitive, and lives
    /// `min(expires_in, 48 h)`.
    #[test]
    fn valid_token_round_trips(
        token in valid_token(),
        token_type in bearer_any_case(),
        secs in 1u64..=u64::MAX,
        as_string in any::<bool>(),
    ) {
        let expires_in = if as_string { json!(secs.to_string()) } else { json!(secs) };
        let body = serde_json::to_vec(&json!({
            "access_token": token,
            "token_type": token_type,
            "expires_in": expires_in,
            "scope": "",
        })).unwrap();
        let issued = parse_token_response(&body).expect("a valid token response");
        prop_assert_eq!(issued.lifetime(), Duration::from_secs(secs).min(MAX_TOKEN_LIFETIME));
        if token.len() >= 12 {
            let shown = format!("{issued:?}");
            prop_assert!(!shown.contains(&token), "{}", shown);
        }
        let header = header_of(issued, &runtime());
        prop_assert!(header.is_sensitive());
        prop_assert_eq!(header.to_str().unwrap(), format!("Bearer {token}"));
    }

    /// A token with any character that cannot go in a header unchanged (CR, LF, NUL,
    /// space, non-ASCII, other controls) is refused, never sent.
    #[test]
    fn unsafe_tokens_are_refused(
        prefix in "[!-~]{0,20}",
        bad in prop_oneof![Just('\r'), Just('\n'), Just('\0'), Just(' '), Just('\t'), Just('\u{7f}'), any::<char>().prop_filter("non-ascii", |c| !c.is_ascii())],
        suffix in "[!-~]{0,20}",
    ) {
        let token = format!("{prefix}{bad}{suffix}");
        let body = serde_json::to_vec(&json!({
            "access_token": token, "token_type": "bearer", "expires_in": 60,
        })).unwrap();
        prop_assert_eq!(parse_token_response(&body).unwrap_err(), InvalidTokenResponse::InvalidAccessToken);
    }

    /// `expires_in` zero, negative, fractional or not digits is an error, never a token.
    #[test]
    fn bad_expires_in_is_an_error(
        bad in prop_oneof![
            Just(json!(0)),
            Just(json!("0")),
            (i64::MIN..0).prop_map(|n| json!(n)),
            (0u32..1_000_000, 1u32..1000).prop_map(|(w, f)| json!(f64::from(w) + f64::from(f) / 1000.0)),
            "[^0-9]{1,10}".prop_map(|s| json!(s)),
            Just(json!(null)),
            Just(json!([])),
            Just(json!({})),
        ],
    ) {
        let body = serde_json::to_vec(&json!({
            "access_token": "abc", "token_type": "bearer", "expires_in": bad,
        })).unwrap();
        prop_assert!(matches!(
            parse_token_response(&body),
            Err(InvalidTokenResponse::InvalidExpiresIn(_))
        ));
    }

    /// Any OAuth error code round-trips through Genesys' error body, with the
    /// description (preferring `error_description`, at most 512 bytes, control and
    /// invisible formatting characters replaced by spaces).
    #[test]
    fn error_code_round_trips(
        code in rfc_code(),
        description in prop::option::of(".{0,600}"),
        error_description in prop::option::of(".{0,600}"),
    ) {
        let mut object = serde_json::Map::new();
        object.insert("error".into(), json!(code));
        if let Some(d) = &description { object.insert("description".into(), json!(d)); }
        if let Some(d) = &error_description { object.insert("error_description".into(), json!(d)); }
        let parsed = parse_error_body(&serde_json::to_vec(&Value::Object(object)).unwrap())
            .expect("an error body with a string `error`");
        prop_assert_eq!(parsed.code.as_str(), code.as_str());
        prop_assert_eq!(&parsed.code, &OAuthErrorCode::from_code(&code));
        let expected = [&error_description, &description]
            .into_iter()
            .flatten()
            .find(|d| !d.is_empty())
            .map(|d| {
                let mut end = d.len().min(512);
                while !d.is_char_boundary(end) { end -= 1; }
                // Control characters (CR, LF, ESC…), line separators and invisible
                // formatting characters become spaces: no forged or disguised log lines.
                d[..end].chars().map(|c| if hidden_or_control(c) { ' ' } else { c }).collect::<String>()
            });
        prop_assert_eq!(parsed.description, expected);
    }

    /// Any whole number of seconds round-trips through `Retry-After`, up to the cap of one
    /// day, and never beyond it.
    #[test]
    fn retry_after_seconds_round_trip(secs in any::<u64>(), now_secs in any::<u32>()) {
        let value = HeaderValue::from_str(&secs.to_string()).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(u64::from(now_secs));
        let expected = Duration::from_secs(secs).min(MAX_RETRY_AFTER);
        prop_assert_eq!(parse_retry_after(&value, now), Some(expected));
    }

    /// An HTTP date `delay` after `now` parses back to `delay` (less `now`'s fraction of a
    /// second, since HTTP dates have whole seconds); a date in the past means zero.
    #[test]
    fn retry_after_http_date_round_trips(
        now_secs in 0u64..253_402_300_000, // up to the year 9999
        nanos in 0u32..1_000_000_000,
        delay in 0u64..10_000_000,
        past in any::<bool>(),
    ) {
        let whole_now = UNIX_EPOCH + Duration::from_secs(now_secs);
        let now = whole_now + Duration::from_nanos(u64::from(nanos));
        let (at, expected) = if past {
            // Not before 1970: `SystemTime` could go there, HTTP dates cannot.
            let at = UNIX_EPOCH + Duration::from_secs(now_secs.saturating_sub(delay));
            (at, Duration::ZERO)
        } else {
            let at = whole_now + Duration::from_secs(delay);
            (at, at.duration_since(now).unwrap_or(Duration::ZERO))
        };
        prop_assume!(at.duration_since(UNIX_EPOCH).unwrap().as_secs() < 253_402_300_800);
        let value = HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap();
        prop_assert_eq!(parse_retry_after(&value, now), Some(expected.min(MAX_RETRY_AFTER)));
    }
}

#[test]
fn the_documented_hostile_bodies() {
    // Fixed examples of the fault matrix's bodies, so a regression names itself.
    let cases: &[(&[u8], InvalidTokenResponse)] = &[
        (
            b"{\"access_token\": \"abc\",",
            InvalidTokenResponse::NotJson,
        ),
        (
            br#"{"token_type":"bearer","expires_in":60}"#,
            InvalidTokenResponse::MissingAccessToken,
        ),
        (
            br#"{"access_token":"a","token_type":"mac","expires_in":60}"#,
            InvalidTokenResponse::UnsupportedTokenType("mac".into()),
        ),
        (
            b"{\"access_token\":\"a\\r\\nX-Evil: 1\",\"token_type\":\"bearer\",\"expires_in\":60}",
            InvalidTokenResponse::InvalidAccessToken,
        ),
        (
            br#"{"access_token":"a","token_type":"bearer"}"#,
            InvalidTokenResponse::MissingExpiresIn,
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(
            &parse_token_response(body).unwrap_err(),
            expected,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}
