//! Request handling for the login host and the API host.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::body::{self, FakeBody};
use crate::limit::Refused;
use crate::state::{ceil_secs, Inner, RecordedRequest};
use crate::{ApiFault, BoxError, ConnectionClosed, TokenFault};

/// Cap on token request bodies.
const TOKEN_BODY_CAP: usize = 64 * 1024;
/// Cap on API request bodies.
const API_BODY_CAP: usize = 16 * 1024 * 1024;

/// The id Genesys puts on its API answers (GENESYS.md names it on 429s; the fake sends
/// one on every API answer, a new one each time).
const ININ_CORRELATION_ID: HeaderName = HeaderName::from_static("inin-correlation-id");

/// Which host a request arrived at.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Host {
    /// The login host: only `/oauth/token`.
    Login,
    /// The API host: everything goes through the API logic.
    Api,
    /// In-process: route by path.
    Any,
}

pub(crate) async fn handle<B>(
    inner: Arc<Inner>,
    host: Host,
    req: Request<B>,
) -> Result<Response<FakeBody>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    let is_token = path == "/oauth/token";
    let is_authorize = path == "/oauth/authorize";
    let is_api = path == "/api" || path.starts_with("/api/");
    match host {
        Host::Login if is_token => token(&inner, req).await,
        Host::Login if is_authorize => Ok(crate::login::authorize(&inner, req).await),
        Host::Login => Ok(genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            "no such path on the login host",
        )),
        Host::Api => Ok(api(&inner, req).await),
        Host::Any if is_token => token(&inner, req).await,
        Host::Any if is_authorize => Ok(crate::login::authorize(&inner, req).await),
        Host::Any if is_api => Ok(api(&inner, req).await),
        Host::Any => Ok(genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            "no such path (expected /oauth/token, /oauth/authorize or /api/...)",
        )),
    }
}

async fn sleep_if(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<FakeBody> {
    let mut res = Response::new(body::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

pub(crate) fn oauth_error(
    status: StatusCode,
    error: &str,
    description: &str,
) -> Response<FakeBody> {
    let body = serde_json::json!({
        "error": error,
        "description": description,
        "error_description": description,
    });
    json(status, body.to_string())
}

pub(crate) fn genesys_error(status: StatusCode, code: &str, message: &str) -> Response<FakeBody> {
    let body = serde_json::json!({
        "message": message,
        "code": code,
        "status": status.as_u16(),
    });
    json(status, body.to_string())
}

fn rate_limited(retry_after: Option<&str>) -> Response<FakeBody> {
    let mut res = oauth_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Rate limit exceeded",
    );
    insert_retry_after(&mut res, retry_after);
    res
}

/// Genesys' 429 for an API request (GENESYS.md, "Rate limits"; normalised since
/// November 2021): `Retry-After` in whole seconds and the same number in the message.
/// `contextId` is the request's correlation id.
fn too_many_requests(retry_after_secs: u64, correlation_id: &str) -> Response<FakeBody> {
    let body = format!(
        r#"{{"message":"Rate limit exceeded the maximum. Retry the request in [{retry_after_secs}] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"{correlation_id}","details":[],"errors":[]}}"#
    );
    let mut res = json(StatusCode::TOO_MANY_REQUESTS, body);
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    res
}

/// A 429 with Genesys' other rate-limit code and no number of seconds (see
/// [`ApiFault::RateLimited`]).
fn too_many_requests_without_seconds(
    retry_after: Option<&str>,
    correlation_id: &str,
) -> Response<FakeBody> {
    let body = format!(
        r#"{{"message":"Rate limit exceeded the maximum","code":"too.many.requests","status":429,"contextId":"{correlation_id}","details":[],"errors":[]}}"#
    );
    let mut res = json(StatusCode::TOO_MANY_REQUESTS, body);
    insert_retry_after(&mut res, retry_after);
    res
}

fn insert_retry_after(res: &mut Response<FakeBody>, retry_after: Option<&str>) {
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        res.headers_mut().insert(RETRY_AFTER, v);
    }
}

fn api_fault_response(fault: ApiFault, correlation_id: &str) -> Response<FakeBody> {
    match fault {
        ApiFault::Status {
            status,
            retry_after,
        } => {
            let status = status_or(status, StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = genesys_error(
                status,
                "fake.fault",
                &format!("scripted fault: status {}", status.as_u16()),
            );
            insert_retry_after(&mut res, retry_after.as_deref());
            res
        }
        ApiFault::RateLimited { retry_after } => {
            match retry_after.as_deref().map(str::parse::<u64>) {
                Some(Ok(secs)) => too_many_requests(secs, correlation_id),
                _ => too_many_requests_without_seconds(retry_after.as_deref(), correlation_id),
            }
        }
    }
}

fn invalid_client() -> Response<FakeBody> {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client not found or bad secret",
    )
}

fn status_or(code: u16, fallback: StatusCode) -> StatusCode {
    match StatusCode::from_u16(code) {
        Ok(s) if code >= 200 => s,
        _ => fallback,
    }
}

async fn fault_response(fault: TokenFault) -> Result<Response<FakeBody>, BoxError> {
    Ok(match fault {
        TokenFault::Status(code) => {
            let status = status_or(code, StatusCode::INTERNAL_SERVER_ERROR);
            genesys_error(
                status,
                "fake.fault",
                &format!("scripted fault: status {}", status.as_u16()),
            )
        }
        TokenFault::OAuthError {
            status,
            error,
            description,
        } => oauth_error(
            status_or(status, StatusCode::BAD_REQUEST),
            &error,
            &description,
        ),
        TokenFault::RateLimited { retry_after } => rate_limited(retry_after.as_deref()),
        TokenFault::MalformedJson => json(StatusCode::OK, r#"{"access_token": "abc","#),
        TokenFault::Body(b) => json(StatusCode::OK, b),
        TokenFault::Oversized(n) => {
            let prefix = r#"{"access_token":"oversized-token","token_type":"bearer","expires_in":86399,"padding":""#;
            let suffix = r#""}"#;
            let pad = n.saturating_sub(prefix.len() + suffix.len());
            let mut b = Vec::with_capacity(prefix.len() + pad + suffix.len());
            b.extend_from_slice(prefix.as_bytes());
            b.resize(prefix.len() + pad, b'x');
            b.extend_from_slice(suffix.as_bytes());
            json(StatusCode::OK, b)
        }
        TokenFault::Hang => std::future::pending().await,
        TokenFault::CloseConnection => return Err(Box::new(ConnectionClosed)),
        TokenFault::Drip { body, every } => {
            let mut res = Response::new(body::drip(body, every));
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        }
    })
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `None`: no Authorization header. `Some(None)`: present but not usable Basic.
pub(crate) fn basic_credentials(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let value = headers.get(AUTHORIZATION)?;
    Some((|| {
        let value = value.to_str().ok()?.trim();
        let (scheme, rest) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(rest.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        Some((form_decode(id), form_decode(secret)))
    })())
}

async fn token<B>(inner: &Inner, req: Request<B>) -> Result<Response<FakeBody>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    inner.token_requests.fetch_add(1, Ordering::Relaxed);
    if req.method() != Method::POST {
        let mut res = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint only accepts POST",
        );
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return Ok(res);
    }
    if let Some(fault) = inner.next_fault() {
        return fault_response(fault).await;
    }
    if let Some(secs) = inner.check_rate() {
        return Ok(rate_limited(Some(&secs.to_string())));
    }
    sleep_if(Inner::duration(&inner.token_latency)).await;

    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, TOKEN_BODY_CAP).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Ok(oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "request body too large",
            ))
        }
        Err(_) => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "could not read the request body",
            ))
        }
    };
    let mut grant_type = None;
    let mut form_id = None;
    let mut form_secret = None;
    for (k, v) in form_urlencoded::parse(&bytes) {
        match &*k {
            "grant_type" => grant_type = Some(v.into_owned()),
            "client_id" => form_id = Some(v.into_owned()),
            "client_secret" => form_secret = Some(v.into_owned()),
            _ => {}
        }
    }
    if matches!(
        grant_type.as_deref(),
        Some("authorization_code" | "refresh_token")
    ) {
        return Ok(crate::login::token(inner, &parts.headers, &bytes));
    }
    let creds = match basic_credentials(&parts.headers) {
        Some(basic) => basic,
        None => form_id.zip(form_secret),
    };
    match creds {
        Some((id, secret)) if inner.client_ok(&id, &secret) => {}
        _ => return Ok(invalid_client()),
    }
    match grant_type.as_deref() {
        None => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing grant_type",
            ))
        }
        Some("client_credentials") => {}
        Some(_) => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials, authorization_code and refresh_token are supported",
            ))
        }
    }
    let (token, lifetime) = inner.issue_token();
    inner.tokens_issued.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ceil_secs(lifetime).max(1),
    });
    Ok(json(StatusCode::OK, body.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn api<B>(inner: &Inner, req: Request<B>) -> Response<FakeBody>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    inner.api_requests.fetch_add(1, Ordering::Relaxed);
    sleep_if(Inner::duration(&inner.api_latency)).await;

    let (parts, body) = req.into_parts();
    let (bytes, trailers, read_error) = match Limited::new(body, API_BODY_CAP).collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            (c.to_bytes(), trailers, None)
        }
        Err(e) if e.is::<LengthLimitError>() => (
            Bytes::new(),
            None,
            Some(genesys_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload.too.large",
                "request body too large",
            )),
        ),
        Err(_) => (
            Bytes::new(),
            None,
            Some(genesys_error(
                StatusCode::BAD_REQUEST,
                "bad.request",
                "could not read the request body",
            )),
        ),
    };

    // Order: a scripted fault stands for the gateway failing before anything else; the
    // limits count only requests with a valid token, and a refused one reaches no route.
    let correlation_id = inner.new_correlation_id();
    let mut res = if let Some(fault) = inner.next_api_fault() {
        inner.api_faults_answered.fetch_add(1, Ordering::Relaxed);
        api_fault_response(fault, &correlation_id)
    } else {
        match bearer(&parts.headers).and_then(|t| Some((t, inner.token_client(t)?))) {
            None => {
                inner.api_unauthorized.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"message":"Invalid login credentials.","code":"bad.credentials","status":401}"#,
                )
            }
            Some((token, client)) => match (inner.admit_api(token, &client), read_error) {
                (Err(Refused { retry_after, .. }), _) => {
                    too_many_requests(ceil_secs(retry_after).max(1), &correlation_id)
                }
                (Ok(()), Some(err)) => err,
                (Ok(()), None) => route(inner, &parts, &bytes, token),
            },
        }
    };
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        res.headers_mut().insert(ININ_CORRELATION_ID, v);
    }

    inner.record(RecordedRequest {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts.headers,
        body: bytes,
        trailers,
        status: res.status().as_u16(),
    });
    res
}

fn route(
    inner: &Inner,
    parts: &http::request::Parts,
    body: &Bytes,
    token: &str,
) -> Response<FakeBody> {
    let path = parts.uri.path();
    let method = &parts.method;
    match (method, path) {
        (&Method::GET, "/api/v2/organizations/me") => {
            let body = serde_json::json!({
                "id": inner.org_id,
                "name": "Fake Genesys Org",
                "defaultLanguage": "en-us",
                "state": "active",
            });
            json(StatusCode::OK, body.to_string())
        }
        (&Method::GET, "/api/v2/tokens/me") => {
            let client_id = crate::state::lock(&inner.client).id.clone();
            let body = serde_json::json!({
                "organization": { "id": inner.org_id },
                "homeOrganization": { "id": inner.org_id },
                "OAuthClient": { "id": client_id, "name": "fake client" },
            });
            json(StatusCode::OK, body.to_string())
        }
        (&Method::DELETE, "/api/v2/tokens/me") => {
            // A user's token: the whole login session ends, refresh token included.
            crate::login::logout(inner, token);
            inner.revoke(token);
            let mut res = Response::new(body::empty());
            *res.status_mut() = StatusCode::NO_CONTENT;
            res
        }
        (_, "/api/v2/echo") => {
            let mut res = Response::new(body::full(body.clone()));
            if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
                res.headers_mut().insert(CONTENT_TYPE, ct.clone());
            }
            res
        }
        (&Method::GET, "/api/v2/users/me") => crate::users::me(inner, token),
        (&Method::GET, "/api/v2/ping") => json(StatusCode::OK, r#"{"ok":true}"#),
        _ => genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("no route for {method} {path}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decode_handles_garbage() {
        assert_eq!(form_decode("a%3Ab+c"), "a:b c");
        assert_eq!(form_decode("%"), "%");
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("%zz"), "%zz");
        assert_eq!(form_decode("%41"), "A");
        assert_eq!(form_decode("%ff"), "\u{fffd}");
    }
}
