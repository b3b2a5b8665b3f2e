//! [`AuthMiddleware`]: the token on a `reqwest` client, through `reqwest-middleware`.
//!
//! The same [`TokenCache`] and [`Scope`] as the tower layers, and the same behaviour as
//! [`AuthReplayService`](crate::AuthReplayService): attach the cached token (lock-free) or
//! wait for the one refresh in flight, report a `401` to the token it attached, replay a
//! copy of the request once with a newer token. It never attaches a token to a request
//! outside the scope or with an `Authorization` of its own, and never logs one.

use std::sync::Arc;

use ::reqwest::header::AUTHORIZATION;
use ::reqwest::{Request, Response, StatusCode, Url};
use http::uri::{PathAndQuery, Uri};
use http::Extensions;
use reqwest_middleware::{Middleware, Next};

use crate::auth::{Scope, Shared};
use crate::cache::TokenCache;
use crate::error::AuthError;
use crate::token::TokenGeneration;

/// Attaches the token to the requests of a `reqwest` client, and refreshes it and replays a
/// request once when the API answers `401`: a [`reqwest_middleware::Middleware`] on the same
/// [`TokenCache`] as [`GenesysAuth::layers`](crate::GenesysAuth::layers), behaving as it does.
/// Get one from [`GenesysAuth::middleware`](crate::GenesysAuth::middleware), or pair your own
/// cache and scope with [`AuthMiddleware::new`].
///
/// * Requests outside the [`Scope`], or with their own `Authorization`, go on untouched
///   (and are never replayed).
/// * With a valid token cached, the header (marked sensitive) is attached without a lock.
///   With none, the request waits for the one refresh in flight.
/// * A `401` to the token it attached is reported to the cache (any number of them for one
///   token cost one token request) and carries that token's [`TokenGeneration`] in the
///   response's extensions. The request is then sent once more with a newer token, if it
///   could be copied (`Request::try_clone`: a body of bytes can, a streaming body cannot, so
///   it is sent once and its `401` returned). The replay's answer is the caller's, `401` or
///   not. If the refresh after a `401` fails, the caller gets its [`AuthError`] instead
///   of the `401`. While the token endpoint is backing off, the refused token stays in use
///   and the `401` is the caller's.
/// * reqwest follows redirects below the middleware and drops `Authorization` on one that
///   leads to another origin: a `401` from there is returned as it is (no refresh, no
///   replay, no stamp).
/// * An `Authorization` set with `reqwest::ClientBuilder::default_headers` is merged in by
///   reqwest after the middleware ran, and only where the request has none: the token
///   wins on in-scope requests. Set your own header on the request itself to keep it.
///
/// A token that could not be had is a [`reqwest_middleware::Error::Middleware`] holding the
/// [`AuthError`]; get it back with `downcast_ref`:
///
/// ```
/// use genesys_auth_layer::{AuthError, GenesysAuth};
///
/// # async fn demo(auth: GenesysAuth) -> Result<(), reqwest_middleware::Error> {
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(auth.middleware())
///     .build();
/// match client.get("https://api.mypurecloud.ie/api/v2/users/me").send().await {
///     Ok(response) => println!("{}", response.status()),
///     Err(reqwest_middleware::Error::Middleware(error)) => {
///         match error.downcast_ref::<AuthError>() {
///             Some(AuthError::OAuth { code, .. }) => eprintln!("credentials refused: {code}"),
///             Some(other) => eprintln!("no token: {other}"),
///             None => eprintln!("another middleware failed: {error}"),
///         }
///     }
///     Err(other) => return Err(other),
/// }
/// # Ok(()) }
/// ```
///
/// Place it after (inside) a retrying middleware, so that each retry gets a valid token.
/// Cheap to clone: clones share the cache. reqwest drops the `Authorization` header itself
/// when it follows a redirect to another origin.
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub struct AuthMiddleware {
    shared: Arc<Shared>,
}

impl AuthMiddleware {
    /// The middleware for `cache`'s tokens, attached to requests in `scope`.
    pub fn new(cache: TokenCache, scope: Scope) -> Self {
        Self::from_shared(Arc::new(Shared::new(cache, scope)))
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The origins tokens are attached to.
    pub fn scope(&self) -> &Scope {
        &self.shared.scope
    }

    /// Whether this middleware authorizes `request`: its origin is in scope and it has no
    /// `Authorization` of its own.
    fn applies_to(&self, request: &Request) -> bool {
        !request.headers().contains_key(AUTHORIZATION)
            && in_scope(&self.shared.scope, request.url())
    }

    /// Attaches a valid token to `request`: the cached one, or the outcome of the refresh
    /// it waits for. Returns the token's generation.
    async fn attach(&self, request: &mut Request) -> Result<TokenGeneration, AuthError> {
        let cache = &self.shared.cache;
        let (header, generation) = match cache.header() {
            Some(cached) => cached,
            None => {
                tracing::debug!(
                    target: "genesys_auth_layer::auth",
                    "no valid token cached; request waits for one"
                );
                let token = cache.token().await?;
                cache.count_authorized();
                (token.header().clone(), token.generation())
            }
        };
        request.headers_mut().insert(AUTHORIZATION, header);
        Ok(generation)
    }

    /// Reports a `401` to a token of `generation` that this middleware attached (`replay`:
    /// to a replay) and stamps the response with the generation. Returns whether a replay
    /// may run.
    fn answered_401(
        &self,
        response: &mut Response,
        generation: TokenGeneration,
        replay: bool,
    ) -> bool {
        let replayable = self.shared.cache.answered_401(generation, replay);
        response.extensions_mut().insert(generation);
        tracing::debug!(
            target: "genesys_auth_layer::auth",
            generation = generation.0,
            "API answered 401 for a token this layer attached"
        );
        replayable
    }
}

#[async_trait::async_trait]
impl Middleware for AuthMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.applies_to(&request) {
            return next.run(request, extensions).await;
        }
        let copy = replayable_copy(&request);
        // Whether an answer is a 401 to the token sent. reqwest follows redirects below the
        // middleware and drops `Authorization` when one leads to another origin: a 401 from
        // there is not an answer to the token, and goes back as it is.
        let origin = request.url().origin();
        let refuses_token = |response: &Response| {
            response.status() == StatusCode::UNAUTHORIZED && response.url().origin() == origin
        };
        let generation = self.attach(&mut request).await.map_err(middleware_error)?;
        let mut response = next.clone().run(request, extensions).await?;
        if !refuses_token(&response) {
            return Ok(response);
        }
        let replayable = self.answered_401(&mut response, generation, false);
        let Some(mut copy) = copy else {
            // Said when the copy could not be made.
            return Ok(response);
        };
        if !replayable {
            tracing::debug!(
                target: "genesys_auth_layer::retry",
                generation = generation.0,
                method = %copy.method(),
                path = copy.url().path(),
                reason = "no other token: the token endpoint is backing off",
                "401 not replayed"
            );
            return Ok(response);
        }
        tracing::debug!(
            target: "genesys_auth_layer::retry",
            generation = generation.0,
            method = %copy.method(),
            path = copy.url().path(),
            "401 replayed with a newer token"
        );
        drop(response);
        let cache = &self.shared.cache;
        let token = cache
            .refresh_after_401(generation)
            .await
            .map_err(middleware_error)?;
        cache.count_authorized();
        copy.headers_mut()
            .insert(AUTHORIZATION, token.header().clone());
        let mut response = next.run(copy, extensions).await?;
        if refuses_token(&response) {
            self.answered_401(&mut response, token.generation(), true);
        }
        Ok(response)
    }
}

/// A copy of `request` (made before the token is attached) to replay if the API answers
/// 401; `None`, with a debug event, for a streaming body.
fn replayable_copy(request: &Request) -> Option<Request> {
    let copy = request.try_clone();
    if copy.is_none() {
        tracing::debug!(
            target: "genesys_auth_layer::retry",
            method = %request.method(),
            path = request.url().path(),
            reason = "body cannot be copied",
            "request will not be replayed if the API answers 401"
        );
    }
    copy
}

/// Whether `url`'s origin is in `scope`, by the rules of [`Scope::contains`]: the URL's
/// scheme and authority (user info included, which no origin matches) as a `Uri`. reqwest's
/// URLs spell a scheme's default port by leaving it out, which the scope matches. A URL that
/// is no valid `Uri` origin is out of scope: it gets no token.
fn in_scope(scope: &Scope, url: &Url) -> bool {
    Uri::builder()
        .scheme(url.scheme())
        .authority(url.authority())
        .path_and_query(PathAndQuery::from_static("/"))
        .build()
        .is_ok_and(|origin| scope.contains(&origin))
}

/// A token error as reqwest-middleware's error, from which `downcast_ref::<AuthError>()`
/// gets it back.
fn middleware_error(error: AuthError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope::new([
            Uri::from_static("https://api.mypurecloud.ie"),
            Uri::from_static("http://127.0.0.1:8080"),
            Uri::from_static("https://[::1]:8443"),
        ])
        .unwrap()
    }

    fn contains(url: &str) -> bool {
        in_scope(&scope(), &Url::parse(url).unwrap())
    }

    #[test]
    fn urls_are_scoped_as_uris_are() {
        assert!(contains("https://api.mypurecloud.ie/api/v2/users/me?x=1#f"));
        assert!(contains("https://api.mypurecloud.ie:443/"));
        assert!(contains("HTTPS://API.MyPureCloud.ie/"));
        assert!(contains("http://127.0.0.1:8080/api"));
        assert!(contains("https://[::1]:8443/api"));

        assert!(!contains("http://api.mypurecloud.ie/"));
        assert!(!contains("https://api.mypurecloud.ie:8443/"));
        assert!(!contains("https://api.mypurecloud.ie.evil.com/"));
        assert!(!contains("https://login.mypurecloud.ie/oauth/token"));
        assert!(!contains("http://127.0.0.1:8081/api"));
        assert!(!contains("http://127.0.0.1/api"));
        assert!(!contains("https://user:pw@api.mypurecloud.ie/"));
        assert!(!contains("https://user@api.mypurecloud.ie/"));
        assert!(!contains("ftp://api.mypurecloud.ie/"));
        assert!(!contains("data:text/plain,api.mypurecloud.ie"));
        assert!(!contains("file:///etc/passwd"));
    }

    #[test]
    fn own_authorization_is_left_alone() {
        let cache = crate::test_support::auth(crate::test_support::Counter::default())
            .cache()
            .clone();
        let middleware = AuthMiddleware::new(cache, scope());
        let url = Url::parse("https://api.mypurecloud.ie/x").unwrap();
        let mut request = Request::new(::reqwest::Method::GET, url);
        assert!(middleware.applies_to(&request));
        request
            .headers_mut()
            .insert(AUTHORIZATION, "Bearer mine".parse().unwrap());
        assert!(!middleware.applies_to(&request));
    }
}
