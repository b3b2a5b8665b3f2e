//! Where tokens come from.
//!
//! This module owns the [`TokenSource`] trait (one method: fetch a fresh token) and the
//! client-credentials grant, [`ClientCredentials`], over any tower HTTP service. A source
//! does one request per call and never retries: when to ask again is the cache's decision.
//!
//! The grants that act for a user live beside it: the authorization URL and its callback
//! (`authorize`), PKCE (`pkce`), the code exchange and the refresh-token source (`user`),
//! and their errors (`login_error`).

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{BoxError, Service, ServiceExt};

use crate::credentials::{ClientSecret, Credentials, SecretSlot};
use crate::error::{AuthError, ConfigError, OAuthErrorCode};
use crate::rotation::CredentialStore;
use crate::token::IssuedToken;

mod authorize;
mod login_error;
pub mod parse;
mod pkce;
mod user;

pub use authorize::{AuthorizationCode, AuthorizationState, AuthorizeRequest, AuthorizeUrl};
pub use login_error::LoginError;
pub use pkce::{PkceChallenge, PkceVerifier, PKCE_VERIFIER_MAX_LEN, PKCE_VERIFIER_MIN_LEN};
pub use user::{
    ClientAuth, RefreshToken, RefreshTokenSource, UserGrant, UserTokens, DETACHED_REFRESH_BOUND,
};

/// A boxed, `Send` future, as [`TokenSource::fetch`] returns (the trait's docs show one
/// built with `Box::pin(async { … })`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can obtain a fresh token: one request to a token endpoint per call.
///
/// Implement it to plug another grant or a token broker into a
/// [`TokenCache`](crate::TokenCache). The cache calls `fetch` at most once at a time, bounds
/// it with a timeout, and decides about retries and backoff; `fetch` should just try once.
///
/// ```
/// use std::time::Duration;
/// use genesys_auth_layer::{AuthError, IssuedToken, TokenSource, BoxFuture};
///
/// /// A source for tests: always the same token.
/// struct Fixed;
///
/// impl TokenSource for Fixed {
///     fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
///         Box::pin(async {
///             Ok(IssuedToken::bearer("fixed", Duration::from_secs(3600)).expect("valid token"))
///         })
///     }
/// }
/// ```
pub trait TokenSource: Send + Sync + 'static {
    /// Requests one new token.
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>>;

    /// A number that changes whenever the credentials this source sends change (a
    /// rotation). After a fatal answer (`invalid_client`, …) the cache waits the longest
    /// backoff, and ends that wait as soon as this number changes. The default, for sources
    /// whose credentials never change, is `0`. It is read under the cache's lock: only read
    /// a number here.
    fn credentials_version(&self) -> u64 {
        0
    }
}

/// A tower HTTP service that can carry token requests: what [`ClientCredentials`] and
/// [`GenesysAuthBuilder::build`](crate::GenesysAuthBuilder::build) accept.
///
/// Implemented for every `Clone + Send + Sync` service from `http::Request<Full<Bytes>>` to
/// `http::Response<B>` whose future is `Send` and whose errors box, hyper-util's client
/// among them; there is nothing to implement by hand.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use genesys_auth_layer::GenesysAuth;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // A fake token endpoint for tests is one too.
/// let fake = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
///     let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
///     Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
/// });
/// let auth = GenesysAuth::client_credentials("my-client-id", "my-client-secret").build(fake)?;
/// assert_eq!(auth.token().await?.generation().0, 1);
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
pub trait TokenHttpService:
    Service<
        Request<Full<Bytes>>,
        Response = Response<Self::ResponseBody>,
        Future: Send,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body type.
    type ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> TokenHttpService for S
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type ResponseBody = B;
}

/// The largest token response read by default. A Genesys token response is a few hundred
/// bytes; 64 KiB leaves room for any gateway's decorations and stops a hostile server from
/// making us buffer megabytes.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The OAuth client-credentials grant over any tower HTTP service.
///
/// Each fetch is one `POST <token_url>` with HTTP Basic client authentication (id and
/// secret form-urlencoded first, RFC 6749 §2.3.1) and the form body
/// `grant_type=client_credentials`. The answer is read up to a size cap and parsed into an
/// [`IssuedToken`] or a typed [`AuthError`].
///
/// With a secondary secret, a request refused with `invalid_client` (or any other `401`,
/// see [`AuthError::is_client_rejected`]) is tried once with the other secret; the one
/// that works is used first from then on (a `warn` event says so).
/// Both refused is [`AuthError::BothSecretsRejected`]. Credentials are read from a
/// [`CredentialStore`] at each fetch, so they can be rotated while the process runs.
///
/// ```
/// use genesys_auth_layer::{ClientCredentials, Credentials, Region};
/// # fn http_client() -> tower::util::BoxCloneSyncService<http::Request<http_body_util::Full<bytes::Bytes>>, http::Response<http_body_util::Full<bytes::Bytes>>, tower::BoxError> { unimplemented!() }
/// # fn demo() -> Result<(), genesys_auth_layer::ConfigError> {
/// let creds = Credentials::new("my-client-id", "my-secret")?;
/// let source = ClientCredentials::new(http_client(), Region::EuWest1.token_url(), creds)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientCredentials<S> {
    http: S,
    token_url: Uri,
    credentials: CredentialStore,
    max_response_bytes: usize,
}

impl<S> ClientCredentials<S> {
    /// A grant against `token_url`, sent through `http`.
    ///
    /// Fails with [`ConfigError::InsecureTokenEndpoint`] if `token_url` is plain `http` on a
    /// host that is not loopback: the secret must not cross a network in clear.
    ///
    /// ```
    /// use genesys_auth_layer::{ClientCredentials, ConfigError, Credentials, Region};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    ///
    /// let creds = Credentials::new("my-client-id", "my-client-secret")?;
    /// let url = Region::EuWest1.token_url();
    /// let source = ClientCredentials::new(http_client(), url.clone(), creds.clone())?;
    /// assert_eq!(source.token_url(), &url);
    /// // Plain http is refused, except on loopback.
    /// let insecure = http::Uri::from_static("http://login.example.com/oauth/token");
    /// let err = ClientCredentials::new(http_client(), insecure, creds).unwrap_err();
    /// assert!(matches!(err, ConfigError::InsecureTokenEndpoint(_)));
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn new(
        http: S,
        token_url: Uri,
        credentials: impl Into<CredentialStore>,
    ) -> Result<Self, ConfigError> {
        let token_url = crate::region::check_absolute(token_url)?;
        if token_url.scheme_str() != Some("https") && !is_loopback(&token_url) {
            return Err(ConfigError::InsecureTokenEndpoint(crate::error::shown_uri(
                &token_url.to_string(),
            )));
        }
        Ok(Self {
            http,
            token_url,
            credentials: credentials.into(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    /// Caps how many bytes of a token response are read (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]); a larger answer is [`AuthError::ResponseTooLarge`].
    ///
    /// ```
    /// use genesys_auth_layer::{AuthError, ClientCredentials, Credentials, Region, TokenSource};
    /// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
    /// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600}"#;
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
    /// #     })
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let creds = Credentials::new("my-client-id", "my-client-secret")?;
    /// let source = ClientCredentials::new(http_client(), Region::EuWest1.token_url(), creds)?
    ///     .max_response_bytes(16); // the endpoint's token responses are longer
    /// let err = source.fetch().await.unwrap_err();
    /// assert!(matches!(err, AuthError::ResponseTooLarge { limit: 16 }));
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &Uri {
        &self.token_url
    }

    /// The credentials sent, read anew at each fetch, so that a
    /// [`rotate`](CredentialStore::rotate) on this store takes effect at the next token
    /// request.
    pub fn credentials(&self) -> &CredentialStore {
        &self.credentials
    }

    fn token_request(
        &self,
        credentials: &Credentials,
        secret: &ClientSecret,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.token_url.clone();
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, credentials.basic_authorization(secret));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        request
    }
}

impl<S> fmt::Debug for ClientCredentials<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.token_url)
            .field("credentials", &self.credentials)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl<S: TokenHttpService> TokenSource for ClientCredentials<S> {
    fn credentials_version(&self) -> u64 {
        self.credentials.rotations()
    }

    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async move {
            let (credentials, preferred) = self.credentials.snapshot();
            let first = match preferred {
                slot if credentials.secret_in(slot).is_some() => slot,
                _ => SecretSlot::Primary,
            };
            let first_result = self.request_with(&credentials, first).await;
            let other = first.other();
            let refused = matches!(&first_result, Err(e) if e.is_client_rejected());
            if !refused || credentials.secret_in(other).is_none() {
                return first_result;
            }
            let first_error = Arc::new(first_result.err().unwrap_or(AuthError::RefreshAborted));
            self.credentials.count_fallback();
            let second_result = self.request_with(&credentials, other).await;
            tracing::warn!(
                target: "genesys_auth_layer::credentials",
                client_id = credentials.id().as_str(),
                refused = first.as_str(),
                tried = other.as_str(),
                succeeded = second_result.is_ok(),
                "secret fallback used"
            );
            match second_result {
                Ok(token) => {
                    self.credentials.prefer(&credentials, other);
                    Ok(token)
                }
                Err(e) if e.is_client_rejected() => {
                    let second_error = Arc::new(e);
                    let (primary, secondary) = match first {
                        SecretSlot::Primary => (first_error, second_error),
                        SecretSlot::Secondary => (second_error, first_error),
                    };
                    Err(AuthError::BothSecretsRejected { primary, secondary })
                }
                Err(e) => Err(e),
            }
        })
    }
}

impl<S: TokenHttpService> ClientCredentials<S> {
    /// One token request with the secret in `slot`.
    async fn request_with(
        &self,
        credentials: &Credentials,
        slot: SecretSlot,
    ) -> Result<IssuedToken, AuthError> {
        let secret = credentials
            .secret_in(slot)
            .unwrap_or_else(|| credentials.secret());
        let request = self.token_request(credentials, secret);
        let response = self
            .http
            .clone()
            .oneshot(request)
            .await
            .map_err(AuthError::transport)?;
        match read_token_response(response, self.max_response_bytes).await {
            Err(AuthError::OAuth {
                status,
                code,
                description,
            }) => Err(AuthError::OAuth {
                status,
                // A code outside the RFC is the server's text too (up to 64 bytes).
                code: match code {
                    OAuthErrorCode::Extension(text) => {
                        OAuthErrorCode::Extension(without_secret(text, credentials, secret))
                    }
                    known => known,
                },
                description: description.map(|d| without_secret(d, credentials, secret)),
            }),
            other => other,
        }
    }
}

/// A server's error text (description, or a code outside the RFC) with the secret it was
/// sent (as it is, form-encoded, or inside the Basic header) replaced: some gateways echo
/// what they refused, and the text ends up in errors and logs.
fn without_secret(description: String, credentials: &Credentials, secret: &ClientSecret) -> String {
    let raw = secret.expose_secret();
    let encoded: zeroize::Zeroizing<String> =
        zeroize::Zeroizing::new(form_urlencoded::byte_serialize(raw.as_bytes()).collect());
    let basic = credentials.basic_value(secret);
    let basic = basic.trim_start_matches("Basic ");
    scrub(description, &[basic, encoded.as_str(), raw])
}

/// `text` with every one of `echoed` replaced by `[redacted]`, also when the text ends
/// with the start of one (a server's text is cut at 512 bytes, which may cut a secret in
/// two). Give each secret in every form it was sent in (as it is, form-encoded, …).
pub(crate) fn scrub(text: String, echoed: &[&str]) -> String {
    let mut shown = text;
    for &echoed in echoed {
        if !echoed.is_empty() && shown.contains(echoed) {
            shown = shown.replace(echoed, "[redacted]");
        }
        // The description is cut at 512 bytes: a secret cut in two leaves its start.
        let cut = (4..echoed.len())
            .rev()
            .filter(|&n| echoed.is_char_boundary(n))
            .find(|&n| shown.ends_with(&echoed[..n]));
        if let Some(n) = cut {
            shown.truncate(shown.len() - n);
            shown.push_str("[redacted]");
        }
    }
    shown
}

/// Turns a token endpoint's answer into a token or a typed error.
async fn read_token_response<B>(
    response: Response<B>,
    max_bytes: usize,
) -> Result<IssuedToken, AuthError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let body = read_token_body(response, max_bytes).await?;
    Ok(parse::parse_token_response(&body)?)
}

/// A token endpoint's successful answer's body (read up to `max_bytes`), or the typed
/// error its status and body say: what every grant parses its token from.
pub(crate) async fn read_token_body<B>(
    response: Response<B>,
    max_bytes: usize,
) -> Result<Bytes, AuthError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| parse::parse_retry_after(v, SystemTime::now()));
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(AuthError::RateLimited { retry_after });
    }
    // Only a 503 says "come back later" with its `Retry-After` (RFC 9110, 10.2.3).
    let retry_after = retry_after.filter(|_| status == StatusCode::SERVICE_UNAVAILABLE);
    let body = Limited::new(response.into_body(), max_bytes)
        .collect()
        .await
        .map(|collected| collected.to_bytes());
    if status.is_success() {
        return body.map_err(|e| body_error(e, max_bytes));
    }
    // An error status: its body, if readable, may say which OAuth error it is.
    match body.ok().as_deref().and_then(parse::parse_error_body) {
        Some(error) => Err(AuthError::OAuth {
            status,
            code: error.code,
            description: error.description,
        }),
        None => Err(AuthError::UnexpectedStatus {
            status,
            retry_after,
        }),
    }
}

fn body_error(err: BoxError, limit: usize) -> AuthError {
    if err.is::<LengthLimitError>() {
        AuthError::ResponseTooLarge { limit }
    } else {
        AuthError::Transport(err.into())
    }
}

/// Whether `uri`'s host is loopback: `localhost`, 127.0.0.0/8 or `::1`.
pub(crate) fn is_loopback(uri: &Uri) -> bool {
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn creds() -> Credentials {
        Credentials::new("id", "secret").unwrap()
    }

    fn respond(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: &'static str,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync {
        tower::service_fn(move |req: Request<Full<Bytes>>| async move {
            assert_eq!(req.method(), http::Method::POST);
            let mut response = Response::builder().status(status);
            for (k, v) in headers {
                response = response.header(*k, *v);
            }
            Ok::<_, BoxError>(response.body(Full::new(Bytes::from_static(body.as_bytes())))?)
        })
    }

    fn source<S>(http: S) -> ClientCredentials<S> {
        ClientCredentials::new(
            http,
            Uri::from_static("http://127.0.0.1:1/oauth/token"),
            creds(),
        )
        .unwrap()
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for ok in [
            "https://login.mypurecloud.com/oauth/token",
            "http://127.0.0.1:8080/oauth/token",
            "http://127.9.9.9/oauth/token",
            "http://localhost/oauth/token",
            "http://[::1]:9/oauth/token",
        ] {
            assert!(
                ClientCredentials::new((), Uri::from_static(ok), creds()).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "http://login.mypurecloud.com/oauth/token",
            "http://10.0.0.1/oauth/token",
            "http://localhost.evil.com/",
        ] {
            assert!(
                matches!(
                    ClientCredentials::new((), Uri::from_static(bad), creds()),
                    Err(ConfigError::InsecureTokenEndpoint(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn success_and_error_answers_are_typed() {
        let ok = source(respond(
            200,
            &[],
            r#"{"access_token":"t","token_type":"bearer","expires_in":60}"#,
        ));
        assert_eq!(
            ok.fetch().await.unwrap().lifetime(),
            Duration::from_secs(60)
        );

        let denied = source(respond(
            401,
            &[("content-type", "application/json")],
            r#"{"error":"invalid_client","description":"client not found","error_description":"client not found"}"#,
        ));
        match denied.fetch().await.unwrap_err() {
            AuthError::OAuth {
                status,
                code,
                description,
            } => {
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                assert_eq!(code, crate::OAuthErrorCode::InvalidClient);
                assert_eq!(description.as_deref(), Some("client not found"));
            }
            other => panic!("unexpected {other:?}"),
        }

        let limited = source(respond(429, &[("retry-after", "2")], "{}"));
        assert_eq!(
            limited.fetch().await.unwrap_err().retry_after(),
            Some(Duration::from_secs(2))
        );

        // 2f: a 503's `Retry-After` is kept too (the cache waits for it); another status's
        // is not.
        let unavailable = source(respond(503, &[("retry-after", "120")], "down"));
        let err = unavailable.fetch().await.unwrap_err();
        assert!(
            matches!(err, AuthError::UnexpectedStatus { status, .. } if status == 503),
            "{err:?}"
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
        let failing = source(respond(500, &[("retry-after", "120")], "oops"));
        assert_eq!(failing.fetch().await.unwrap_err().retry_after(), None);

        // A 401 without an OAuth body (Genesys' own error JSON, or a gateway's page) is still
        // a refusal of the client's credentials: fatal, not a transient status.
        let refused = source(respond(
            401,
            &[("content-type", "application/json")],
            r#"{"message":"Bad credentials","code":"bad.credentials","status":401}"#,
        ));
        let err = refused.fetch().await.unwrap_err();
        assert!(
            matches!(err, AuthError::UnexpectedStatus { status, .. } if status == 401),
            "{err:?}"
        );
        assert!(err.is_client_rejected() && err.is_fatal(), "{err:?}");

        let broken = source(respond(502, &[], "<html>bad gateway</html>"));
        let err = broken.fetch().await.unwrap_err();
        assert!(
            matches!(err, AuthError::UnexpectedStatus { status, .. } if status == 502),
            "{err:?}"
        );
        assert!(!err.is_client_rejected() && !err.is_fatal(), "{err:?}");

        let big = source(respond(
            200,
            &[],
            r#"{"access_token":"t","token_type":"bearer","expires_in":60}"#,
        ))
        .max_response_bytes(10);
        assert!(matches!(
            big.fetch().await.unwrap_err(),
            AuthError::ResponseTooLarge { limit: 10 }
        ));
    }

    #[tokio::test]
    async fn a_secret_echoed_by_the_server_is_redacted() {
        /// The error a token endpoint answering `status` and `body` gives, with the secret
        /// `s3cr3t+/=value`, and how it shows in `Display` and `Debug`.
        async fn refused(status: u16, body: &'static str) -> (AuthError, String) {
            let credentials = Credentials::new("id", "s3cr3t+/=value").unwrap();
            let source = ClientCredentials::new(
                respond(status, &[], body),
                Uri::from_static("http://127.0.0.1:1/oauth/token"),
                credentials,
            )
            .unwrap();
            let err = source.fetch().await.unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
            (err, shown)
        }

        let credentials = Credentials::new("id", "s3cr3t+/=value").unwrap();
        let basic = credentials.basic_authorization(credentials.secret());
        let basic = basic
            .to_str()
            .unwrap()
            .trim_start_matches("Basic ")
            .to_owned();
        let description = format!(
            "client_secret s3cr3t+/=value (form s3cr3t%2B%2F%3Dvalue) refused; got Basic {basic}"
        );
        let body: &'static str = Box::leak(
            format!(r#"{{"error":"invalid_client","error_description":"{description}"}}"#)
                .into_boxed_str(),
        );
        let (_, shown) = refused(401, body).await;
        assert!(!shown.contains(&basic), "{shown}");
        assert!(
            shown.contains("client_secret [redacted] (form [redacted]) refused"),
            "{shown}"
        );

        // The same in an error code outside the RFC (kept verbatim, up to 64 bytes).
        let body = r#"{"error":"bad_secret:s3cr3t+/=value","error_description":"no"}"#;
        let (err, _) = refused(400, body).await;
        assert_eq!(
            err.oauth_code().map(OAuthErrorCode::as_str),
            Some("bad_secret:[redacted]")
        );

        // Cut by the 512-byte limit in the middle of the secret: its start is redacted too.
        let credentials = Credentials::new("id", "s3cr3t+/=value").unwrap();
        let secret = credentials.secret().clone();
        let cut = format!("{}s3cr3t+/=va", "x".repeat(20));
        assert_eq!(
            without_secret(cut, &credentials, &secret),
            format!("{}[redacted]", "x".repeat(20))
        );
    }

    #[tokio::test]
    async fn sends_basic_auth_and_the_grant() {
        let http = tower::service_fn(|req: Request<Full<Bytes>>| async move {
            assert!(req.headers()[AUTHORIZATION].is_sensitive());
            assert!(req.headers()[AUTHORIZATION]
                .to_str()
                .unwrap()
                .starts_with("Basic "));
            assert_eq!(
                req.headers()[CONTENT_TYPE],
                "application/x-www-form-urlencoded"
            );
            let body = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"grant_type=client_credentials");
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                br#"{"access_token":"t","token_type":"bearer","expires_in":60}"#,
            ))))
        });
        source(http).fetch().await.unwrap();
    }

    #[tokio::test]
    async fn transport_failures_are_typed() {
        let http = tower::service_fn(|_req: Request<Full<Bytes>>| async move {
            Err::<Response<Full<Bytes>>, BoxError>("connection refused".into())
        });
        assert!(matches!(
            source(http).fetch().await.unwrap_err(),
            AuthError::Transport(_)
        ));
    }

    #[tokio::test]
    async fn a_401_without_an_oauth_body_falls_back_to_the_secondary_secret() {
        // The token endpoint refuses the primary secret with a bare 401 (Genesys-style
        // body, no OAuth `error`) and accepts the secondary one.
        let creds = Credentials::new("id", "retired")
            .unwrap()
            .with_secondary("current")
            .unwrap();
        let accepted = creds.basic_authorization(creds.secret_in(SecretSlot::Secondary).unwrap());
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let http = tower::service_fn({
            let requests = requests.clone();
            move |req: Request<Full<Bytes>>| {
                requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let ok = req.headers()[AUTHORIZATION] == accepted;
                async move {
                    let (status, body): (u16, &'static str) = if ok {
                        (
                            200,
                            r#"{"access_token":"t","token_type":"bearer","expires_in":60}"#,
                        )
                    } else {
                        (
                            401,
                            r#"{"message":"Bad credentials","code":"bad.credentials","status":401}"#,
                        )
                    };
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(body.as_bytes())))?,
                    )
                }
            }
        });
        let source = ClientCredentials::new(
            http,
            Uri::from_static("http://127.0.0.1:9/oauth/token"),
            creds,
        )
        .unwrap();
        source.fetch().await.unwrap();
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(source.credentials().preferred_slot(), SecretSlot::Secondary);
    }
}
