//! One issued access token.
//!
//! This module owns [`Token`]: the ready-to-send `Authorization` header (built once, marked
//! sensitive), when the token expires and when to start refreshing it, and its generation
//! number. A token's value is never printed.

use std::fmt;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

/// The longest lifetime a token is believed to have. Genesys documents 48 hours as the
/// maximum for client-credentials tokens; a longer one is clamped to this, so a hostile or
/// broken server cannot hand out a token that is "valid forever": one said to live a year
/// is believed for 48 hours.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 60 * 60);

/// Which token a request was authorized with: 1 for the first token a cache obtained, then
/// increasing by one per token, so a newer token compares greater.
///
/// [`AuthService`](crate::AuthService) puts it in the extensions of every `401` response to a
/// request it authorized. When [`RefreshOn401`](crate::RefreshOn401) replays that request,
/// the generation travels with it, and the cache tells a 401 for the current token (drop it,
/// refresh once) from a late 401 for an older one (just use the newer token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenGeneration(pub u64);

/// A token as the token endpoint issued it, before the cache dates it.
///
/// Returned by a [`TokenSource`](crate::TokenSource); build one with
/// [`bearer`](Self::bearer). `Debug` hides the token.
#[derive(Clone)]
pub struct IssuedToken {
    header: HeaderValue,
    lifetime: Duration,
}

impl IssuedToken {
    /// A bearer token valid for `lifetime` from when its request was sent (at most
    /// [`MAX_TOKEN_LIFETIME`]; a longer one is clamped). Fails if the token is empty or not
    /// a valid header value.
    ///
    /// ```
    /// use std::time::Duration;
    /// use genesys_auth_layer::IssuedToken;
    ///
    /// let t = IssuedToken::bearer("abc123", Duration::from_secs(60)).unwrap();
    /// assert_eq!(t.lifetime(), Duration::from_secs(60));
    /// assert!(IssuedToken::bearer("abc\r\nX-Evil: 1", Duration::from_secs(60)).is_none());
    /// assert!(!format!("{t:?}").contains("abc123"));
    /// ```
    pub fn bearer(access_token: &str, lifetime: Duration) -> Option<Self> {
        if access_token.is_empty() || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut header = HeaderValue::try_from(format!("Bearer {access_token}")).ok()?;
        header.set_sensitive(true);
        Some(Self {
            header,
            lifetime: lifetime.min(MAX_TOKEN_LIFETIME),
        })
    }

    /// How long the token is valid from when it was requested (clamped to
    /// [`MAX_TOKEN_LIFETIME`]).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The `Authorization` header value to send, `Bearer …`, marked sensitive: for a token
    /// used without a cache (one a code exchange returned).
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// A token held by a [`TokenCache`](crate::TokenCache): the header to send, its expiry,
/// when refreshing it ahead of expiry starts, and its generation. `Debug` hides the token.
///
/// Without the layer (another HTTP client, a WebSocket handshake), attach its header
/// yourself:
///
/// ```
/// use genesys_auth_layer::{CacheConfig, TokenCache};
/// use http::header::AUTHORIZATION;
/// # mod fake {
/// #     use std::time::Duration;
/// #     use genesys_auth_layer::{AuthError, BoxFuture, IssuedToken, TokenSource};
/// #     pub struct Fixed;
/// #     impl TokenSource for Fixed {
/// #         fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
/// #             let token = IssuedToken::bearer("t", Duration::from_secs(3600));
/// #             Box::pin(async move { Ok(token.expect("a valid token")) })
/// #         }
/// #     }
/// # }
/// # use fake::Fixed;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache = TokenCache::new(Fixed, CacheConfig::default());
/// let token = cache.token().await?;
/// let mut request = http::Request::get("https://api.mypurecloud.com/api/v2/users").body(())?;
/// request.headers_mut().insert(AUTHORIZATION, token.header().clone());
/// assert!(request.headers()[AUTHORIZATION].is_sensitive());
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
pub struct Token {
    header: HeaderValue,
    generation: TokenGeneration,
    requested_at: Instant,
    refresh_at: Instant,
    expires_at: Instant,
}

impl Token {
    pub(crate) fn new(
        issued: IssuedToken,
        generation: TokenGeneration,
        requested_at: Instant,
        refresh_ahead: Duration,
    ) -> Self {
        // `lifetime` is at most MAX_TOKEN_LIFETIME (IssuedToken::bearer clamps it).
        let expires_at = requested_at + issued.lifetime;
        Self {
            header: issued.header,
            generation,
            requested_at,
            refresh_at: expires_at - refresh_ahead.min(issued.lifetime),
            expires_at,
        }
    }

    /// The same token, next refreshed at `at` (never after its expiry): a token kept in
    /// use through a backoff is refreshed when the backoff ends.
    pub(crate) fn refreshed_at(&self, at: Instant) -> Self {
        Self {
            header: self.header.clone(),
            refresh_at: at.min(self.expires_at),
            ..*self
        }
    }

    /// The `Authorization` header value (`Bearer …`), marked sensitive so that tracing and
    /// `Debug` of a header map do not show it.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// This token's generation: pass it to
    /// [`TokenCache::refresh_after_401`](crate::TokenCache::refresh_after_401) when the API
    /// refuses the token.
    pub fn generation(&self) -> TokenGeneration {
        self.generation
    }

    /// When the request for this token was sent; its lifetime counts from here.
    pub fn requested_at(&self) -> Instant {
        self.requested_at
    }

    /// From this instant requests still use the token but start a refresh ahead (see
    /// [`CacheConfig::refresh_ahead`](crate::CacheConfig::refresh_ahead); by default the
    /// larger of a minute and 10 % of the lifetime before expiry, plus up to a quarter of
    /// that at random).
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// From this instant the token is not used any more: [`requested_at`](Self::requested_at)
    /// plus the token's lifetime.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Whether the token may still be sent at `now`: `now` is before
    /// [`expires_at`](Self::expires_at).
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = Instant::now();
        f.debug_struct("Token")
            .field("access_token", &"[redacted]")
            .field("generation", &self.generation.0)
            .field(
                "expires_in",
                &self.expires_at.saturating_duration_since(now),
            )
            .field(
                "refresh_in",
                &self.refresh_at.saturating_duration_since(now),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sensitive_and_debug_redacts() {
        let issued = IssuedToken::bearer("tok-value", Duration::from_secs(100)).unwrap();
        let now = Instant::now();
        let token = Token::new(issued, TokenGeneration(3), now, Duration::from_secs(10));
        assert!(token.header().is_sensitive());
        assert_eq!(token.header(), "Bearer tok-value");
        assert_eq!(
            token.expires_at() - token.refresh_at(),
            Duration::from_secs(10)
        );
        let shown = format!("{token:?}");
        assert!(!shown.contains("tok-value"), "{shown}");
        assert!(shown.contains("generation: 3"), "{shown}");
    }

    #[test]
    fn refresh_window_never_precedes_the_request() {
        let issued = IssuedToken::bearer("t", Duration::from_secs(5)).unwrap();
        let now = Instant::now();
        let token = Token::new(issued, TokenGeneration(1), now, Duration::from_secs(60));
        assert_eq!(token.refresh_at(), now);
    }

    #[test]
    fn lifetimes_are_clamped() {
        let issued = IssuedToken::bearer("t", Duration::MAX).unwrap();
        assert_eq!(issued.lifetime(), MAX_TOKEN_LIFETIME);
        let token = Token::new(issued, TokenGeneration(1), Instant::now(), Duration::MAX);
        assert!(token.refresh_at() <= token.expires_at());
    }

    #[test]
    fn rejects_tokens_that_are_not_header_safe() {
        for bad in ["", "a b", "a\nb", "a\rb", "tök", "a\0b"] {
            assert!(
                IssuedToken::bearer(bad, Duration::from_secs(1)).is_none(),
                "{bad:?}"
            );
        }
    }
}
