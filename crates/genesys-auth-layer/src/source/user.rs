//! The token requests that act for a user: the authorization-code exchange (with or
//! without PKCE) and the refresh-token grant.
//!
//! This module owns [`UserGrant`] (one OAuth client's code exchange), [`RefreshTokenSource`]
//! (a [`TokenSource`] holding one user's refresh token, replaced by the one each answer
//! brings) and the secrets they carry, [`RefreshToken`] and [`UserTokens`]. Answers are read
//! by the same code as the client-credentials grant's (size cap, `token_type` bearer,
//! `expires_in` checks); refused grants become typed [`LoginError`]s. A refresh token is
//! never sent by two requests at once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Uri};
use http_body_util::Full;
use serde_json::Value;
use tokio::time::Instant;
use tower::ServiceExt;
use zeroize::Zeroizing;

use super::authorize::AuthorizationCode;
use super::login_error::LoginError;
use super::pkce::PkceVerifier;
use super::{
    is_loopback, parse, read_token_body, scrub, without_secret, BoxFuture, TokenHttpService,
    TokenSource, DEFAULT_MAX_RESPONSE_BYTES,
};
use crate::credentials::ClientId;
use crate::error::{AuthError, ConfigError, OAuthErrorCode};
use crate::rotation::CredentialStore;
use crate::token::IssuedToken;

/// A refresh token: redacted in `Debug`, zeroized on drop.
///
/// ```
/// use genesys_auth_layer::RefreshToken;
///
/// let token = RefreshToken::new("r1");
/// assert_eq!(format!("{token:?}"), "RefreshToken([redacted])");
/// assert_eq!(token.expose_secret(), "r1");
/// ```
#[derive(Clone)]
pub struct RefreshToken(Zeroizing<String>);

impl RefreshToken {
    /// Wraps a refresh token kept from before (a session store, a file).
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }

    /// The token itself. Call it only to store it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken([redacted])")
    }
}

/// What a successful code exchange returns. `Debug` hides both tokens.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UserTokens {
    /// The user's access token.
    pub access_token: IssuedToken,
    /// The refresh token, when the server sent one (Genesys does for the authorization-code
    /// grant, GENESYS.md "Grants"). Give it to [`UserGrant::refresh_source`].
    pub refresh_token: Option<RefreshToken>,
    /// When the token request was sent: the access token's lifetime counts from here.
    pub requested_at: Instant,
}

impl UserTokens {
    /// Tokens obtained elsewhere (restored from the application's own store, say): an
    /// access token requested at `requested_at`, and its refresh token if any.
    pub fn new(
        access_token: IssuedToken,
        refresh_token: Option<RefreshToken>,
        requested_at: Instant,
    ) -> Self {
        Self {
            access_token,
            refresh_token,
            requested_at,
        }
    }
}

/// How an OAuth client authenticates to the token endpoint.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ClientAuth {
    /// A confidential client (a web backend): HTTP Basic with its id and secret.
    Confidential(CredentialStore),
    /// A public client (a CLI, a desktop app; PKCE): its id in the form, no secret.
    Public(ClientId),
}

/// The authorization-code grant of one OAuth client, over any tower HTTP service: the
/// code exchange, and the [`RefreshTokenSource`] that keeps the user's token fresh.
///
/// A confidential client ([`UserGrant::confidential`]) authenticates with HTTP Basic and
/// sends `grant_type=authorization_code&code&redirect_uri` (plus `code_verifier` with
/// [`exchange_pkce`](Self::exchange_pkce)); a public client ([`UserGrant::public`]) sends
/// `code_verifier` and `client_id` and no secret (GENESYS.md, "Grants").
///
/// ```
/// use genesys_auth_layer::{AuthorizationCode, LoginError, Region, UserGrant};
/// # fn http_client() -> impl genesys_auth_layer::TokenHttpService {
/// #     tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
/// #         let body = r#"{"access_token":"a","token_type":"bearer","expires_in":3600,"refresh_token":"r"}"#;
/// #         Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
/// #     })
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let creds = genesys_auth_layer::Credentials::new("my-client-id", "my-client-secret")?;
/// let grant = UserGrant::confidential(http_client(), Region::EuWest1.token_url(), creds)?;
/// // `code` comes from `AuthorizationState::verify_callback` on the callback request.
/// let code = AuthorizationCode::new("code-from-the-callback");
/// let tokens = grant.exchange(&code, "https://app.example.com/callback").await?;
/// let source = grant.refresh_source(tokens.refresh_token.expect("a refresh token"));
/// let fresh = source.refresh().await?; // sends the refresh token, keeps the new one
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct UserGrant<S> {
    http: S,
    token_url: Uri,
    client: ClientAuth,
    max_response_bytes: usize,
}

impl<S> UserGrant<S> {
    /// The grant of a confidential client against `token_url`, sent through `http`.
    ///
    /// Fails with [`ConfigError::InsecureTokenEndpoint`] if `token_url` is plain `http` on
    /// a host that is not loopback.
    pub fn confidential(
        http: S,
        token_url: Uri,
        credentials: impl Into<CredentialStore>,
    ) -> Result<Self, ConfigError> {
        Self::new(
            http,
            token_url,
            ClientAuth::Confidential(credentials.into()),
        )
    }

    /// The grant of a public client (PKCE, no secret) against `token_url`.
    ///
    /// Fails with [`ConfigError::EmptyClientId`] for an empty id, and with
    /// [`ConfigError::InsecureTokenEndpoint`] as [`confidential`](Self::confidential).
    pub fn public(
        http: S,
        token_url: Uri,
        client_id: impl Into<ClientId>,
    ) -> Result<Self, ConfigError> {
        let client_id = client_id.into();
        if client_id.as_str().is_empty() {
            return Err(ConfigError::EmptyClientId);
        }
        Self::new(http, token_url, ClientAuth::Public(client_id))
    }

    fn new(http: S, token_url: Uri, client: ClientAuth) -> Result<Self, ConfigError> {
        let token_url = crate::region::check_absolute(token_url)?;
        if token_url.scheme_str() != Some("https") && !is_loopback(&token_url) {
            return Err(ConfigError::InsecureTokenEndpoint(crate::error::shown_uri(
                &token_url.to_string(),
            )));
        }
        Ok(Self {
            http,
            token_url,
            client,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    /// Caps how many bytes of a token response are read (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]).
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &Uri {
        &self.token_url
    }

    /// A number that changes when the client's credentials rotate (see
    /// [`TokenSource::credentials_version`]).
    pub(crate) fn credentials_version(&self) -> u64 {
        match &self.client {
            ClientAuth::Confidential(store) => store.rotations(),
            ClientAuth::Public(_) => 0,
        }
    }

    /// The HTTP service token requests go through.
    pub(crate) fn http(&self) -> &S {
        &self.http
    }

    /// How the client authenticates.
    pub fn client(&self) -> &ClientAuth {
        &self.client
    }
}

impl<S> fmt::Debug for UserGrant<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserGrant")
            .field("token_url", &self.token_url)
            .field("client", &self.client)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl<S: TokenHttpService> UserGrant<S> {
    /// Exchanges an authorization code for the user's tokens (confidential client, no
    /// PKCE). `redirect_uri` must be the one of the authorization request.
    ///
    /// A refused code is [`LoginError::CodeExpiredOrUsed`],
    /// [`LoginError::RedirectUriMismatch`] or [`LoginError::VerifierMismatch`] (see
    /// [`LoginError`] for how they are told apart); anything else is
    /// [`LoginError::Token`].
    pub async fn exchange(
        &self,
        code: &AuthorizationCode,
        redirect_uri: &str,
    ) -> Result<UserTokens, LoginError> {
        self.exchange_with(code, redirect_uri, None).await
    }

    /// Exchanges an authorization code with the PKCE verifier whose challenge was in the
    /// authorization URL. The only exchange a public client can make.
    pub async fn exchange_pkce(
        &self,
        code: &AuthorizationCode,
        redirect_uri: &str,
        verifier: &PkceVerifier,
    ) -> Result<UserTokens, LoginError> {
        self.exchange_with(code, redirect_uri, Some(verifier)).await
    }

    async fn exchange_with(
        &self,
        code: &AuthorizationCode,
        redirect_uri: &str,
        verifier: Option<&PkceVerifier>,
    ) -> Result<UserTokens, LoginError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("redirect_uri", redirect_uri),
        ];
        if let Some(verifier) = verifier {
            form.push(("code_verifier", verifier.expose_secret()));
        }
        let mut sent = vec![code.expose_secret()];
        sent.extend(verifier.map(PkceVerifier::expose_secret));
        self.request(&form, &sent).await.map_err(|e| match e {
            LoginError::Token(e) => LoginError::from_code_exchange(e),
            other => other,
        })
    }

    /// A [`TokenSource`] that refreshes the user's access token with `refresh_token` and
    /// keeps the refresh token each answer brings.
    pub fn refresh_source(&self, refresh_token: RefreshToken) -> RefreshTokenSource<S> {
        RefreshTokenSource::new(self.clone(), refresh_token)
    }

    /// One refresh-token request: the access token of the answer, and its refresh token
    /// apart, so that a new refresh token is kept even when the access token beside it is
    /// unusable (the server superseded the one sent either way).
    pub(crate) async fn refresh_once(
        &self,
        refresh_token: &RefreshToken,
    ) -> (Result<IssuedToken, LoginError>, Option<RefreshToken>) {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        let body = match self.post(&form, &[refresh_token.expose_secret()]).await {
            Ok((body, _)) => body,
            Err(LoginError::Token(e)) => return (Err(LoginError::from_refresh(e)), None),
            Err(other) => return (Err(other), None),
        };
        let next = refresh_token_of(&body);
        let access =
            parse::parse_token_response(&body).map_err(|e| LoginError::Token(AuthError::from(e)));
        match next {
            Ok(next) => (access, next),
            Err(e) => (access.and(Err(e)), None),
        }
    }

    /// One `POST` of `form` to the token endpoint, parsed: the tokens of the answer.
    async fn request(
        &self,
        form: &[(&str, &str)],
        sent: &[&str],
    ) -> Result<UserTokens, LoginError> {
        let (body, requested_at) = self.post(form, sent).await?;
        let access_token = parse::parse_token_response(&body).map_err(AuthError::from)?;
        let refresh_token = refresh_token_of(&body)?;
        Ok(UserTokens {
            access_token,
            refresh_token,
            requested_at,
        })
    }

    /// One `POST` of `form` (plus the client's id for a public client) to the token
    /// endpoint: the body of a successful answer, and when the request was sent. `sent`
    /// lists the secret values of the form: they are scrubbed from the server's error text.
    async fn post(
        &self,
        form: &[(&str, &str)],
        sent: &[&str],
    ) -> Result<(Bytes, Instant), LoginError> {
        // Built in a block: the serializer is not `Send`, the request future must be.
        let public_id = match &self.client {
            ClientAuth::Public(id) => Some(id.as_str()),
            ClientAuth::Confidential(_) => None,
        };
        let body = {
            let mut body = form_urlencoded::Serializer::new(String::new());
            body.extend_pairs(form);
            if let Some(id) = public_id {
                body.append_pair("client_id", id);
            }
            body.finish()
        };
        let mut request_builder = Request::post(self.token_url.clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        let credentials = match &self.client {
            ClientAuth::Confidential(store) => {
                let (credentials, slot) = store.snapshot();
                let secret = credentials
                    .secret_in(slot)
                    .unwrap_or_else(|| credentials.secret())
                    .clone();
                request_builder =
                    request_builder.header(AUTHORIZATION, credentials.basic_authorization(&secret));
                Some((credentials, secret))
            }
            ClientAuth::Public(_) => None,
        };
        let request = request_builder
            .body(Full::new(Bytes::from(body)))
            .map_err(AuthError::transport)?;
        let requested_at = Instant::now();
        let response = self
            .http
            .clone()
            .oneshot(request)
            .await
            .map_err(AuthError::transport)?;
        let shown = |text: String| {
            let text = match &credentials {
                Some((credentials, secret)) => without_secret(text, credentials, secret),
                None => text,
            };
            let encoded: Vec<Zeroizing<String>> = sent
                .iter()
                .map(|s| Zeroizing::new(form_urlencoded::byte_serialize(s.as_bytes()).collect()))
                .collect();
            let mut echoed: Vec<&str> = sent.to_vec();
            echoed.extend(encoded.iter().map(|s| s.as_str()));
            scrub(text, &echoed)
        };
        let body = match read_token_body(response, self.max_response_bytes).await {
            Ok(body) => body,
            Err(AuthError::OAuth {
                status,
                code,
                description,
            }) => {
                return Err(LoginError::Token(AuthError::OAuth {
                    status,
                    code: match code {
                        OAuthErrorCode::Extension(text) => OAuthErrorCode::Extension(shown(text)),
                        known => known,
                    },
                    description: description.map(shown),
                }))
            }
            Err(other) => return Err(LoginError::Token(other)),
        };
        Ok((body, requested_at))
    }
}

/// The `refresh_token` of a successful token response: `None` when absent or `null`.
fn refresh_token_of(body: &[u8]) -> Result<Option<RefreshToken>, LoginError> {
    // The body parsed as a token response already: it is a JSON object.
    let value: Value = serde_json::from_slice(body).map_err(|_| LoginError::InvalidRefreshToken)?;
    match value.get("refresh_token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(token)) if !token.is_empty() => {
            Ok(Some(RefreshToken::new(token.as_str())))
        }
        Some(_) => Err(LoginError::InvalidRefreshToken),
    }
}

/// What a [`RefreshTokenSource`] holds between refreshes.
enum Slot {
    /// The refresh token to send next.
    Held(RefreshToken),
    /// Taken out by the refresh in flight (only seen under the lock, by that refresh).
    Sending,
    /// Refused with `invalid_grant`: nothing more is sent, this error is answered again.
    Refused(LoginError),
}

/// One user's refresh token, as a [`TokenSource`]: each fetch sends it
/// (`grant_type=refresh_token`; HTTP Basic for a confidential client, `client_id` in the
/// form for a public one) and replaces it with the refresh token of the answer.
///
/// Refreshes are serialized by an async mutex held across the request, and the token is
/// taken out of the source before it is sent: two calls at once never send the same refresh
/// token, and a token that an answer replaced is never sent again. An answer without a
/// `refresh_token` keeps the current one (RFC 6749 §6).
///
/// When a refresh fails without the server refusing the token (a transport error, a 5xx,
/// a 429, another OAuth error, no answer within [`DETACHED_REFRESH_BOUND`]), the same token
/// is kept for the next attempt: the server may never have seen it. (If it did and rotated
/// it, that answer was lost, and the next attempt gets `invalid_grant`.) A caller that stops
/// waiting does not stop the request: its answer's refresh token is kept. After
/// `invalid_grant` ([`LoginError::RefreshTokenRejected`]) the source sends nothing more and
/// answers that error: the user must log in again.
///
/// ```
/// use genesys_auth_layer::{LoginError, RefreshToken, TokenSource, UserGrant};
/// # use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
/// # let n = Arc::new(AtomicUsize::new(0));
/// # let http = tower::service_fn(move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
/// #     let i = n.fetch_add(1, Ordering::SeqCst);
/// #     async move {
/// #         let body = format!(r#"{{"access_token":"a{i}","token_type":"bearer","expires_in":3600,"refresh_token":"r{}"}}"#, i + 1);
/// #         Ok::<_, std::convert::Infallible>(http::Response::new(body))
/// #     }
/// # });
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let grant = UserGrant::public(http, "http://127.0.0.1:9/oauth/token".parse()?, "my-cli")?;
/// let source = grant.refresh_source(RefreshToken::new("r0"));
/// source.fetch().await?; // sent r0, got r1
/// assert_eq!(source.refresh_token().await.unwrap().expose_secret(), "r1");
/// # Ok::<(), tower::BoxError>(()) }).unwrap();
/// ```
pub struct RefreshTokenSource<S> {
    grant: Arc<UserGrant<S>>,
    slot: Arc<tokio::sync::Mutex<Slot>>,
}

impl<S> RefreshTokenSource<S> {
    /// A source that refreshes with `refresh_token` through `grant`.
    pub fn new(grant: UserGrant<S>, refresh_token: RefreshToken) -> Self {
        Self::shared(Arc::new(grant), refresh_token)
    }

    /// A source over a grant shared with other users' sources (one copy for them all).
    pub(crate) fn shared(grant: Arc<UserGrant<S>>, refresh_token: RefreshToken) -> Self {
        Self {
            grant,
            slot: Arc::new(tokio::sync::Mutex::new(Slot::Held(refresh_token))),
        }
    }

    /// The refresh token the next refresh will send, to store it (waits for a refresh in
    /// flight); `None` once it was refused.
    pub async fn refresh_token(&self) -> Option<RefreshToken> {
        match &*self.slot.lock().await {
            Slot::Held(token) => Some(token.clone()),
            Slot::Sending | Slot::Refused(_) => None,
        }
    }

    /// The grant this source refreshes with.
    pub fn grant(&self) -> &UserGrant<S> {
        &self.grant
    }
}

impl<S> fmt::Debug for RefreshTokenSource<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenSource")
            .field("grant", &self.grant)
            .field("refresh_token", &"[redacted]")
            .finish()
    }
}

/// The refresh token taken out of its source for one request. Dropped without being
/// consumed (an error that did not refuse the token, or the request's future dropped), it
/// goes back to the source.
struct Lease {
    slot: tokio::sync::OwnedMutexGuard<Slot>,
    token: Option<RefreshToken>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            *self.slot = Slot::Held(token);
        }
    }
}

impl<S: TokenHttpService> RefreshTokenSource<S> {
    /// Sends the refresh token once and keeps the one the answer brings; returns the new
    /// access token. See the type's docs for what is kept after a failure.
    ///
    /// The request runs in a task of its own (on the current Tokio runtime): dropping this
    /// future (a caller's timeout) stops the waiting, not the request, so a refresh token
    /// the server rotated is still kept when its answer arrives. The next refresh waits for
    /// it; the task gives up after [`DETACHED_REFRESH_BOUND`].
    pub async fn refresh(&self) -> Result<IssuedToken, LoginError> {
        let work = refresh_with(self.grant.clone(), self.slot.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(work)
                .await
                .unwrap_or(Err(LoginError::Token(AuthError::RefreshAborted))),
            Err(_) => work.await,
        }
    }
}

/// How long a refresh's own task waits for the token endpoint before it gives up (and keeps
/// the refresh token it sent, since the server may not have seen it).
pub const DETACHED_REFRESH_BOUND: Duration = Duration::from_secs(120);

/// One refresh: takes the refresh token out of `slot` (waiting for a refresh in flight),
/// sends it, and puts back the one the answer brings, or the one sent if the server did not
/// refuse it.
async fn refresh_with<S: TokenHttpService>(
    grant: Arc<UserGrant<S>>,
    slot: Arc<tokio::sync::Mutex<Slot>>,
) -> Result<IssuedToken, LoginError> {
    let mut slot = slot.lock_owned().await;
    let token = match std::mem::replace(&mut *slot, Slot::Sending) {
        Slot::Held(token) => token,
        Slot::Refused(err) => {
            *slot = Slot::Refused(err.clone());
            return Err(err);
        }
        // Only a refresh holding the lock sees `Sending`, and it puts a value back before
        // it lets go (its `Lease`'s drop); this arm is never taken.
        Slot::Sending => return Err(LoginError::Token(AuthError::RefreshAborted)),
    };
    let mut lease = Lease {
        slot,
        token: Some(token),
    };
    let (result, next) = match &lease.token {
        Some(token) => {
            match tokio::time::timeout(DETACHED_REFRESH_BOUND, grant.refresh_once(token)).await {
                Ok(answer) => answer,
                Err(_) => (
                    Err(LoginError::Token(AuthError::Timeout(
                        DETACHED_REFRESH_BOUND,
                    ))),
                    None,
                ),
            }
        }
        None => (Err(LoginError::Token(AuthError::RefreshAborted)), None),
    };
    if let Some(next) = next {
        lease.token = Some(next);
    }
    match result {
        Ok(access_token) => Ok(access_token),
        Err(err @ LoginError::RefreshTokenRejected { .. }) => {
            lease.token = None;
            *lease.slot = Slot::Refused(err.clone());
            Err(err)
        }
        Err(err) => Err(err),
    }
}

impl<S: TokenHttpService> TokenSource for RefreshTokenSource<S> {
    fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
        Box::pin(async move { self.refresh().await.map_err(LoginError::into_auth_error) })
    }

    fn credentials_version(&self) -> u64 {
        match &self.grant.client {
            ClientAuth::Confidential(store) => store.rotations(),
            ClientAuth::Public(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use http::{Response, StatusCode};
    use http_body_util::BodyExt;
    use tower::BoxError;

    use super::*;
    use crate::credentials::Credentials;

    type Recorded = Arc<Mutex<Vec<(Option<String>, String)>>>;

    /// A token endpoint that records (Authorization, body) and answers `status`/`body`.
    fn endpoint(
        status: u16,
        answer: &'static str,
    ) -> (impl TokenHttpService<ResponseBody = Full<Bytes>>, Recorded) {
        let recorded: Recorded = Arc::default();
        let http = tower::service_fn({
            let recorded = recorded.clone();
            move |req: Request<Full<Bytes>>| {
                let recorded = recorded.clone();
                async move {
                    let auth = req
                        .headers()
                        .get(AUTHORIZATION)
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = req.into_body().collect().await?.to_bytes();
                    recorded
                        .lock()
                        .unwrap()
                        .push((auth, String::from_utf8(body.to_vec()).unwrap()));
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(answer.as_bytes())))?,
                    )
                }
            }
        });
        (http, recorded)
    }

    const TOKENS: &str =
        r#"{"access_token":"a1","token_type":"bearer","expires_in":60,"refresh_token":"r1"}"#;
    const URL: &str = "http://127.0.0.1:9/oauth/token";

    fn form(body: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    #[tokio::test]
    async fn confidential_exchange_sends_basic_and_the_code() {
        let (http, recorded) = endpoint(200, TOKENS);
        let creds = Credentials::new("id", "secret").unwrap();
        let grant = UserGrant::confidential(http, URL.parse().unwrap(), creds).unwrap();
        let tokens = grant
            .exchange(&AuthorizationCode::new("c+1"), "https://app/cb")
            .await
            .unwrap();
        assert_eq!(tokens.refresh_token.unwrap().expose_secret(), "r1");
        assert_eq!(tokens.access_token.lifetime().as_secs(), 60);
        let (auth, body) = recorded.lock().unwrap().pop().unwrap();
        assert!(auth.unwrap().starts_with("Basic "));
        assert_eq!(
            form(&body),
            [
                ("grant_type".into(), "authorization_code".into()),
                ("code".into(), "c+1".into()),
                ("redirect_uri".into(), "https://app/cb".into()),
            ]
        );
    }

    #[tokio::test]
    async fn public_exchange_sends_the_verifier_and_client_id_and_no_secret() {
        let (http, recorded) = endpoint(200, TOKENS);
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let verifier = PkceVerifier::generate().unwrap();
        grant
            .exchange_pkce(
                &AuthorizationCode::new("c"),
                "http://127.0.0.1/cb",
                &verifier,
            )
            .await
            .unwrap();
        let (auth, body) = recorded.lock().unwrap().pop().unwrap();
        assert_eq!(auth, None);
        let form = form(&body);
        assert!(form.contains(&("code_verifier".into(), verifier.expose_secret().into())));
        assert!(form.contains(&("client_id".into(), "cli".into())));
        assert!(!body.contains("client_secret"));
    }

    #[tokio::test]
    async fn errors_never_echo_what_was_sent() {
        // A server that echoes the code and the verifier in its description.
        let verifier = PkceVerifier::new("v".repeat(43)).unwrap();
        let answer: &'static str = Box::leak(
            format!(
                r#"{{"error":"invalid_grant","error_description":"bad code the-code-value for verifier {}"}}"#,
                "v".repeat(43)
            )
            .into_boxed_str(),
        );
        let (http, _) = endpoint(400, answer);
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let err = grant
            .exchange_pkce(
                &AuthorizationCode::new("the-code-value"),
                "http://127.0.0.1/cb",
                &verifier,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, LoginError::VerifierMismatch { .. }),
            "{err:?}"
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("the-code-value"), "{shown}");
        assert!(!shown.contains(verifier.expose_secret()), "{shown}");
    }

    #[tokio::test]
    async fn a_refresh_token_that_is_not_a_string_is_refused() {
        let (http, _) = endpoint(
            200,
            r#"{"access_token":"a","token_type":"bearer","expires_in":60,"refresh_token":5}"#,
        );
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let err = grant
            .exchange(&AuthorizationCode::new("c"), "x")
            .await
            .unwrap_err();
        assert!(matches!(err, LoginError::InvalidRefreshToken));
    }

    /// A refresh endpoint that rotates: only the newest refresh token is accepted; a
    /// superseded one is counted and refused with `invalid_grant`.
    #[derive(Clone, Default)]
    struct Rotating {
        current: Arc<Mutex<(u64, HashSet<u64>)>>,
        superseded_seen: Arc<AtomicUsize>,
    }

    impl Rotating {
        fn service(&self) -> impl TokenHttpService<ResponseBody = Full<Bytes>> {
            let this = self.clone();
            tower::service_fn(move |req: Request<Full<Bytes>>| {
                let this = this.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let sent = form_urlencoded::parse(&body)
                        .find(|(k, _)| k == "refresh_token")
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default();
                    // Let other requests interleave, if the source allowed any.
                    tokio::task::yield_now().await;
                    let answer = {
                        let mut state = this.current.lock().unwrap();
                        let (current, old) = &mut *state;
                        if sent == format!("r{current}") {
                            old.insert(*current);
                            *current += 1;
                            (
                                200,
                                format!(
                                    r#"{{"access_token":"a{current}","token_type":"bearer","expires_in":60,"refresh_token":"r{current}"}}"#
                                ),
                            )
                        } else {
                            this.superseded_seen.fetch_add(1, Ordering::SeqCst);
                            (400, r#"{"error":"invalid_grant","description":"refresh token superseded"}"#.to_owned())
                        }
                    };
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(answer.0)
                            .body(Full::new(Bytes::from(answer.1)))?,
                    )
                }
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_refreshes_never_send_one_refresh_token_twice() {
        let fake = Rotating::default();
        let grant = UserGrant::public(fake.service(), URL.parse().unwrap(), "cli").unwrap();
        let source = Arc::new(grant.refresh_source(RefreshToken::new("r0")));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.fetch().await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(fake.superseded_seen.load(Ordering::SeqCst), 0);
        assert_eq!(fake.current.lock().unwrap().0, 100);
        assert_eq!(
            source.refresh_token().await.unwrap().expose_secret(),
            "r100"
        );
    }

    #[tokio::test]
    async fn invalid_grant_ends_the_source_and_nothing_more_is_sent() {
        let (http, recorded) = endpoint(
            400,
            r#"{"error":"invalid_grant","description":"refresh token revoked"}"#,
        );
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let source = grant.refresh_source(RefreshToken::new("r0"));
        for _ in 0..3 {
            let err = source.refresh().await.unwrap_err();
            assert!(matches!(err, LoginError::RefreshTokenRejected { .. }));
            assert!(err.must_log_in_again());
        }
        assert_eq!(recorded.lock().unwrap().len(), 1);
        assert!(source.refresh_token().await.is_none());
        // Seen by the cache as the `invalid_grant` it was.
        let err = source.fetch().await.unwrap_err();
        assert_eq!(err.oauth_code(), Some(&OAuthErrorCode::InvalidGrant));
    }

    #[tokio::test]
    async fn a_failure_that_did_not_refuse_the_token_keeps_it() {
        let (http, recorded) = endpoint(503, "unavailable");
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let source = grant.refresh_source(RefreshToken::new("r0"));
        let err = source.refresh().await.unwrap_err();
        assert!(matches!(
            err,
            LoginError::Token(AuthError::UnexpectedStatus {
                status: StatusCode::SERVICE_UNAVAILABLE,
                ..
            })
        ));
        assert_eq!(source.refresh_token().await.unwrap().expose_secret(), "r0");
        assert_eq!(recorded.lock().unwrap().len(), 1);
    }

    /// No answer: the refresh's task gives up after its bound and keeps the token it sent
    /// (the server may not have seen it).
    #[tokio::test(start_paused = true)]
    async fn a_refresh_without_an_answer_keeps_the_token_it_sent() {
        let http = tower::service_fn(|_req: Request<Full<Bytes>>| async {
            std::future::pending::<Result<Response<Full<Bytes>>, BoxError>>().await
        });
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let source = grant.refresh_source(RefreshToken::new("r0"));
        let err = source.refresh().await.unwrap_err();
        assert!(
            matches!(err, LoginError::Token(AuthError::Timeout(d)) if d == DETACHED_REFRESH_BOUND),
            "{err:?}"
        );
        assert_eq!(source.refresh_token().await.unwrap().expose_secret(), "r0");
    }

    /// A caller that stops waiting (a fetch timeout) does not stop the request: the refresh
    /// token the late answer rotates in is kept, so the superseded one is never sent again.
    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_waiting_keeps_the_rotated_token() {
        let sent: Recorded = Arc::default();
        let http = tower::service_fn({
            let sent = sent.clone();
            move |req: Request<Full<Bytes>>| {
                let sent = sent.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    sent.lock()
                        .unwrap()
                        .push((None, String::from_utf8(body.to_vec()).unwrap()));
                    let n = sent.lock().unwrap().len();
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    let body = format!(
                        r#"{{"access_token":"a{n}","token_type":"bearer","expires_in":3600,"refresh_token":"r{n}"}}"#
                    );
                    Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
                }
            }
        });
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let source = grant.refresh_source(RefreshToken::new("r0"));
        let attempt = tokio::time::timeout(std::time::Duration::from_millis(10), source.refresh());
        assert!(attempt.await.is_err(), "the caller gave up");
        assert_eq!(source.refresh_token().await.unwrap().expose_secret(), "r1");
        source.refresh().await.unwrap();
        let sent = sent.lock().unwrap();
        assert!(sent[0].1.contains("refresh_token=r0"), "{sent:?}");
        assert!(
            sent[1].1.contains("refresh_token=r1"),
            "never r0 again: {sent:?}"
        );
    }

    /// A 200 whose access token is unusable still rotates the refresh token: the new one is
    /// kept.
    #[tokio::test]
    async fn an_unusable_access_token_still_rotates_the_refresh_token() {
        let (http, _) = endpoint(
            200,
            r#"{"access_token":"","token_type":"bearer","expires_in":3600,"refresh_token":"r1"}"#,
        );
        let grant = UserGrant::public(http, URL.parse().unwrap(), "cli").unwrap();
        let source = grant.refresh_source(RefreshToken::new("r0"));
        assert!(source.refresh().await.is_err());
        assert_eq!(source.refresh_token().await.unwrap().expose_secret(), "r1");
    }

    #[test]
    fn debug_hides_secrets() {
        let creds = Credentials::new("id", "the-secret").unwrap();
        let (http, _) = endpoint(200, TOKENS);
        let grant = UserGrant::confidential(http, URL.parse().unwrap(), creds).unwrap();
        let source = grant.refresh_source(RefreshToken::new("the-refresh-token"));
        let shown = format!("{source:?}");
        assert!(!shown.contains("the-secret"), "{shown}");
        assert!(!shown.contains("the-refresh-token"), "{shown}");
        assert!(UserGrant::confidential(
            tower::service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
            }),
            "http://login.example.com/oauth/token".parse().unwrap(),
            Credentials::new("id", "s").unwrap()
        )
        .is_err());
    }
}
