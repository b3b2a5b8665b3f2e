//! Scripted misbehaviour of the token endpoint and of the API host.

use std::fmt;
use std::time::Duration;

/// A scripted misbehaviour of the token endpoint (`POST /oauth/token`).
///
/// Queue faults with [`FakeGenesys::push_token_faults`](crate::FakeGenesys::push_token_faults)
/// (each token request consumes one) or make one permanent with
/// [`FakeGenesys::set_persistent_token_fault`](crate::FakeGenesys::set_persistent_token_fault).
/// A request answered with a fault is counted in
/// [`token_requests`](crate::FakeGenesys::token_requests) but never in
/// [`tokens_issued`](crate::FakeGenesys::tokens_issued), does not consume the rate limit,
/// and is answered without any client authentication.
///
/// ```
/// use genesys_fake::{FakeGenesys, TokenFault};
/// let fake = FakeGenesys::builder().build_in_process();
/// fake.push_token_faults([TokenFault::Status(503), TokenFault::MalformedJson]);
/// assert_eq!(fake.pending_token_faults(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenFault {
    /// Answer with this status and a small Genesys-style JSON body
    /// (`{"message":…,"code":"fake.fault","status":N}`). Statuses outside
    /// `200..=999` are answered as 500.
    Status(u16),
    /// Answer with Genesys' OAuth error JSON:
    /// `{"error":…,"description":…,"error_description":…}`.
    OAuthError {
        /// HTTP status (outside `200..=999` is answered as 400).
        status: u16,
        /// The `error` code, e.g. `invalid_client`.
        error: String,
        /// Used for both `description` and `error_description`.
        description: String,
    },
    /// 429 with the rate-limit JSON body; `Retry-After` is sent verbatim when `Some`
    /// (`"2"` or an HTTP-date). A value that is not a valid header value is left out.
    RateLimited {
        /// The `Retry-After` header value, sent as is.
        retry_after: Option<String>,
    },
    /// 200 with a truncated JSON body: `{"access_token": "abc",`.
    MalformedJson,
    /// 200 with exactly this body and `content-type: application/json`.
    ///
    /// Use it for missing `access_token`, `token_type` other than bearer, odd
    /// `expires_in` values, control characters in the token, and so on.
    Body(String),
    /// 200 with a valid token JSON object padded (in a `padding` field) to exactly
    /// this many bytes, sent with a `content-length`. If the number is smaller than
    /// the unpadded object, the unpadded object is sent.
    Oversized(usize),
    /// Never answer: the request stays pending until the client gives up.
    Hang,
    /// Drop the connection without answering. Over HTTP/1.1 the connection is closed;
    /// over HTTP/2 the stream is reset. From [`FakeService`](crate::FakeService) the
    /// call fails with [`ConnectionClosed`].
    CloseConnection,
    /// 200 with this body (with a `content-length`), sent one byte every `every`.
    Drip {
        /// The body to send.
        body: String,
        /// Delay before each byte.
        every: Duration,
    },
}

/// The error [`FakeService`](crate::FakeService) fails with for
/// [`TokenFault::CloseConnection`] (over sockets the connection is dropped instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionClosed;

impl fmt::Display for ConnectionClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("genesys-fake closed the connection without answering (scripted fault)")
    }
}

impl std::error::Error for ConnectionClosed {}

/// A scripted misbehaviour of the API host (any path under `/api/`).
///
/// Queue faults with [`FakeGenesys::push_api_faults`](crate::FakeGenesys::push_api_faults):
/// each following API request consumes one, in order, whatever its token (a request
/// without a valid token gets the fault too, not a 401). The fault is answered before
/// the token is checked and before routing, so the request has no effect (a
/// `DELETE /api/v2/tokens/me` revokes nothing) and consumes no [`ApiLimits`] budget. It
/// is counted in [`api_requests`](crate::FakeGenesys::api_requests) and
/// [`api_faults_answered`](crate::FakeGenesys::api_faults_answered), and recorded with
/// its status.
///
/// Every answer carries an `ININ-Correlation-Id` header, like every API answer.
///
/// ```
/// use genesys_fake::{ApiFault, FakeGenesys};
/// let fake = FakeGenesys::builder().build_in_process();
/// fake.push_api_faults([
///     ApiFault::Status { status: 503, retry_after: Some("2".into()) },
///     ApiFault::Status { status: 502, retry_after: None },
///     ApiFault::RateLimited { retry_after: None },
/// ]);
/// assert_eq!(fake.pending_api_faults(), 3);
/// ```
///
/// [`ApiLimits`]: crate::ApiLimits
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiFault {
    /// Answer with this status (e.g. 502, 503 or 504) and a small Genesys-style JSON body
    /// (`{"message":"scripted fault: status N","code":"fake.fault","status":N}`; what
    /// Genesys' gateways put in such bodies is not documented). Statuses outside
    /// `200..=999` are answered as 500.
    Status {
        /// HTTP status.
        status: u16,
        /// The `Retry-After` header value, sent as is when `Some` (`"2"` or an
        /// HTTP-date). A value that is not a valid header value is left out.
        retry_after: Option<String>,
    },
    /// 429 as Genesys answers it. With a `retry_after` of whole seconds, exactly what the
    /// API limits send: `Retry-After: N` and the `too.many.requests.retry.after` body
    /// naming `[N]` seconds. With any other value (an HTTP-date, sent as is) or `None`
    /// (no `Retry-After`), the other code Genesys has, `too.many.requests`, with the
    /// message `Rate limit exceeded the maximum` (the fake's wording: Genesys' exact
    /// message for that code is not documented).
    RateLimited {
        /// The `Retry-After` header value.
        retry_after: Option<String>,
    },
}
