//! Refresh and replay once on 401.
//!
//! This module owns [`RefreshOn401`], a [`tower::retry::Policy`], and [`ReplayableBody`],
//! which says whether a request body can be sent twice. The policy replays a request at most
//! once, only when the 401 answered a token this crate attached, and only with an exact copy
//! of the request. It must sit *outside* [`AuthLayer`](crate::AuthLayer), so that the replay
//! passes through [`AuthService`](crate::AuthService) again and gets the new token.

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use tower::retry::Policy;

use crate::token::TokenGeneration;

/// A request body that may be copyable, so that a request can be replayed.
///
/// Implemented for the bodies that hold their bytes (`Full`, `Empty`, `String`, `Bytes`,
/// `Vec<u8>`, `&'static str`, `()`), for [`BufferedBody`](crate::BufferedBody), for
/// `Either` of two such bodies, and, returning `None`, for streaming bodies (hyper's
/// `Incoming`, the boxed bodies of `http-body-util`). A request whose body returns `None`
/// is sent once; if it meets a 401, the 401 goes back to the caller. Wrap a streaming body
/// in a [`BufferedBody`](crate::BufferedBody) to have it replayed when it was sent in full.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use genesys_auth_layer::ReplayableBody;
///
/// let body = Full::new(Bytes::from_static(b"{\"a\":1}"));
/// assert!(body.try_clone_body().is_some());
/// ```
pub trait ReplayableBody: Sized {
    /// A copy of the body with the same bytes, if the body can be copied.
    fn try_clone_body(&self) -> Option<Self>;

    /// Whether this copy can be sent now, asked of the copy when the API answered 401.
    /// Always, for a body copied whole; a [`BufferedBody`](crate::BufferedBody)'s copy only
    /// once the body it copies was sent in full. A body that wraps another must forward
    /// this to it (as `Either` does).
    fn can_replay(&self) -> bool {
        true
    }
}

macro_rules! replayable_by_clone {
    ($($ty:ty),* $(,)?) => {$(
        impl ReplayableBody for $ty {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

replayable_by_clone!(String, Bytes, Vec<u8>, &'static str, &'static [u8], ());

impl<D: Clone> ReplayableBody for http_body_util::Full<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayableBody for http_body_util::Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }
}

macro_rules! not_replayable {
    ($($ty:ty),* $(,)?) => {$(
        impl ReplayableBody for $ty {
            fn try_clone_body(&self) -> Option<Self> {
                None
            }
        }
    )*};
}

not_replayable!(hyper::body::Incoming);

impl<L: ReplayableBody, R: ReplayableBody> ReplayableBody for http_body_util::Either<L, R> {
    fn try_clone_body(&self) -> Option<Self> {
        match self {
            Self::Left(body) => body.try_clone_body().map(Self::Left),
            Self::Right(body) => body.try_clone_body().map(Self::Right),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            Self::Left(body) => body.can_replay(),
            Self::Right(body) => body.can_replay(),
        }
    }
}

impl<D, E> ReplayableBody for http_body_util::combinators::BoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayableBody for http_body_util::combinators::UnsyncBoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

/// A [`Policy`] that refreshes the token and replays a request once when the API answers
/// `401` to a token this crate attached.
///
/// * The 401 must carry the [`TokenGeneration`] stamp that [`AuthService`](crate::AuthService)
///   adds; a 401 to a request the layer did not authorize (out of scope, or with the caller's
///   own `Authorization`) is returned as is.
/// * The replay carries the refused generation to [`AuthService`](crate::AuthService), which
///   waits for a newer token before sending it: a 401 for the current generation drops that
///   token and starts one refresh; 401s for an older generation just wait for (or use) the
///   newer token. A thousand concurrent 401s cost one token request. If that refresh fails,
///   the caller gets its [`AuthError`](crate::AuthError) instead of the 401. While the token
///   endpoint is backing off, the refused token stays in use and the 401 is not replayed.
/// * At most one replay per request: a second 401 goes back to the caller.
/// * The replay has the same method, URI, version, headers, extensions and body bytes.
///   Bodies that cannot be copied (see [`ReplayableBody`]) are not replayed.
///
/// Cost: tower's `Retry` asks the policy for a copy of every request before sending it
/// (headers, extensions and body: a reference-count bump for `Full<Bytes>`, a deep copy for
/// `String` or `Vec<u8>`), whether or not a 401 comes. Prefer `Full<Bytes>` bodies. The
/// policy holds no shared state (tower copies it for every request), so it copies every
/// request without an `Authorization` header of its own, in scope or not: in a client
/// shared with other hosts, requests to them pay for a copy that is never used.
///
/// Get one from [`GenesysAuth::retry_layer`](crate::GenesysAuth::retry_layer),
/// [`GenesysAuth::retry_policy`](crate::GenesysAuth::retry_policy) or
/// [`AuthLayer::retry_policy`](crate::AuthLayer::retry_policy). It replays only 401s to
/// tokens of its own cache, so two stacks (two organisations) can be nested in one client
/// (see [`AuthLayer::retry_policy`](crate::AuthLayer::retry_policy)). One stack:
///
/// ```
/// use genesys_auth_layer::{GenesysAuth, Region};
/// use tower::ServiceBuilder;
///
/// # fn demo(auth: GenesysAuth) {
/// let client = ServiceBuilder::new()
///     .retry(auth.retry_policy()) // outside: sees the 401, replays through auth
///     .layer(auth.layer())        // inside: attaches the (new) token
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, tower::BoxError>(http::Response::new(String::new()))
///     });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RefreshOn401 {
    /// The cache whose tokens this policy replays 401s for.
    cache: u64,
    replayed: bool,
}

impl RefreshOn401 {
    pub(crate) fn new(cache: u64) -> Self {
        Self {
            cache,
            replayed: false,
        }
    }
}

/// Which token a 401 answered: the cache that issued it and its generation. Put by
/// [`AuthService`](crate::AuthService) into the extensions of a 401 to a request it
/// authorized (next to the public [`TokenGeneration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) cache: u64,
    pub(crate) generation: TokenGeneration,
    /// The request was a replay already: however the layers are stacked, it is not
    /// replayed again.
    pub(crate) replay: bool,
    /// The cache has (or is getting) another token to replay it with; `false` while a
    /// backoff keeps the refused token in use.
    pub(crate) replayable: bool,
}

/// Put by [`RefreshOn401`] into the extensions of the request it replays: the token the API
/// refused. The [`AuthService`](crate::AuthService) of that cache takes it out and waits for
/// a newer token before sending the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused(pub(crate) Stamp);

/// A copy of `request`'s head around `body`.
pub(crate) fn copy_request<B>(request: &Request<B>, body: B) -> Request<B> {
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    // Most requests carry no extension and many no header: the new request's own empty
    // ones are kept rather than cloned (about 170 instructions of a 1,700 per request).
    if !request.headers().is_empty() {
        *copy.headers_mut() = request.headers().clone();
    }
    if !request.extensions().is_empty() {
        *copy.extensions_mut() = request.extensions().clone();
    }
    copy
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RefreshOn401
where
    B: ReplayableBody,
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        if self.replayed {
            return None;
        }
        let stamp = refused_stamp(result.as_ref().ok()?, self.cache, request)?;
        self.replayed = true;
        // The refresh happens in AuthService when the replay reaches it: it holds the cache
        // (this policy holds nothing, so that tower's per-request copy of it is free).
        request.extensions_mut().insert(Refused(stamp));
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if self.replayed {
            return None;
        }
        replayable_copy(request)
    }
}

/// The stamp of a 401 that answered a token of the cache `cache`: the request (`request`,
/// the copy) is to be replayed with a newer one (and this says so in a debug event). `None`
/// for any other answer, including a 401 to another cache's token (a nested stack's policy
/// replays it), and for a copy that cannot be sent ([`ReplayableBody::can_replay`]).
pub(crate) fn refused_stamp<R, B: ReplayableBody>(
    response: &Response<R>,
    cache: u64,
    request: &Request<B>,
) -> Option<Stamp> {
    if response.status() != StatusCode::UNAUTHORIZED {
        return None;
    }
    let stamp = *response.extensions().get::<Stamp>()?;
    if stamp.cache != cache || stamp.replay {
        return None;
    }
    let not_replayed = if !stamp.replayable {
        Some("no other token: the token endpoint is backing off")
    } else if !request.body().can_replay() {
        Some("body not kept in full (not sent in full, over its limit, or failed)")
    } else {
        None
    };
    if let Some(reason) = not_replayed {
        tracing::debug!(
            target: "genesys_auth_layer::retry",
            generation = stamp.generation.0,
            method = %request.method(),
            path = request.uri().path(),
            reason,
            "401 not replayed"
        );
        return None;
    }
    tracing::debug!(
        target: "genesys_auth_layer::retry",
        generation = stamp.generation.0,
        method = %request.method(),
        path = request.uri().path(),
        "401 replayed with a newer token"
    );
    Some(stamp)
}

/// A copy of `request` to replay if the API answers 401, if it may be replayed: one with
/// its own `Authorization` is never authorized by this crate, and a body that cannot be
/// copied cannot be sent twice.
pub(crate) fn replayable_copy<B: ReplayableBody>(request: &Request<B>) -> Option<Request<B>> {
    if request.headers().contains_key(AUTHORIZATION) {
        return None;
    }
    let Some(body) = request.body().try_clone_body() else {
        tracing::debug!(
            target: "genesys_auth_layer::retry",
            method = %request.method(),
            path = request.uri().path(),
            reason = "body cannot be copied",
            "request will not be replayed if the API answers 401"
        );
        return None;
    };
    Some(copy_request(request, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::BoxFuture;
    use crate::test_support::{auth, over, Counter, Kind};
    use crate::{AuthError, CacheConfig, GenesysAuth, IssuedToken, Scope};
    use http::header::AUTHORIZATION;
    use http::Uri;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

    /// What the API saw: the `Authorization` header and the body.
    type Seen = (Option<String>, Bytes);

    /// An API that accepts only the tokens listed in `valid` and records what it saw.
    #[derive(Clone, Default)]
    struct Api {
        valid: Arc<Mutex<Vec<String>>>,
        seen: Arc<Mutex<Vec<Seen>>>,
        /// Requests that reached the API with the policy's internal marker still in them.
        marked: Arc<AtomicUsize>,
    }

    impl Api {
        fn service<B>(
            &self,
        ) -> impl Service<
            Request<B>,
            Response = Response<String>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
               + Send
        where
            B: http_body::Body + Send + 'static,
            B::Data: Send,
            B::Error: Into<BoxError>,
        {
            let api = self.clone();
            tower::service_fn(move |req: Request<B>| {
                let api = api.clone();
                async move {
                    if req.extensions().get::<Refused>().is_some() {
                        api.marked.fetch_add(1, Ordering::SeqCst);
                    }
                    let auth = req
                        .headers()
                        .get(AUTHORIZATION)
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map_err(Into::into)?
                        .to_bytes();
                    api.seen.lock().unwrap().push((auth.clone(), body));
                    let ok = auth.is_some_and(|a| api.valid.lock().unwrap().contains(&a));
                    let status = if ok { 200 } else { 401 };
                    Ok(Response::builder().status(status).body(String::new())?)
                }
            })
        }
        fn accept(&self, tokens: &[&str]) {
            *self.valid.lock().unwrap() = tokens.iter().map(|t| format!("Bearer {t}")).collect();
        }
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    type Boxed<B> = crate::test_support::Boxed<B, String>;

    /// Runs `check` on each [`Kind`] of stack, as two tests: `check::fused`, `check::tower`.
    macro_rules! on_both_stacks {
        ($check:ident) => {
            mod $check {
                #[tokio::test]
                async fn fused() {
                    super::$check(super::Kind::Fused).await
                }
                #[tokio::test]
                async fn tower() {
                    super::$check(super::Kind::Tower).await
                }
            }
        };
    }

    /// A counting token source, the auth over it, an API that accepts no token yet, and
    /// the stack of `kind` in front of that API.
    fn stack<B>(kind: Kind) -> (Counter, GenesysAuth, Api, Boxed<B>)
    where
        B: ReplayableBody + http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let source = Counter::default();
        let auth = auth(source.clone());
        let api = Api::default();
        let client = over(&auth, kind, api.service());
        (source, auth, api, client)
    }

    /// A request whose body cannot be copied (a stream, as far as the policy can tell).
    fn streaming() -> Request<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>> {
        let body = Full::new(Bytes::from_static(b"stream"))
            .map_err(|e| -> BoxError { match e {} })
            .boxed_unsync();
        Request::post("https://api.example.test/x")
            .body(body)
            .unwrap()
    }

    fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    on_both_stacks!(a_401_refreshes_and_replays_the_same_bytes_once);
    async fn a_401_refreshes_and_replays_the_same_bytes_once(kind: Kind) {
        let (source, auth, api, mut client) = stack(kind);
        api.accept(&["token-1"]);

        let ok = client
            .ready()
            .await
            .unwrap()
            .call(post("https://api.example.test/x", "{}"))
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);

        api.accept(&["token-2"]); // the server revoked token-1
        let body = r#"{"name":"replay me","n":[1,2,3]}"#;
        let res = client
            .ready()
            .await
            .unwrap()
            .call(post("https://api.example.test/x", body))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let seen = api.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[1],
            (
                Some("Bearer token-1".into()),
                Bytes::from_static(body.as_bytes())
            )
        );
        assert_eq!(
            seen[2],
            (
                Some("Bearer token-2".into()),
                Bytes::from_static(body.as_bytes())
            )
        );
        assert_eq!(source.issued(), 2);
        assert_eq!(
            api.marked.load(Ordering::SeqCst),
            0,
            "the marker never leaves"
        );
        let stats = auth.stats();
        assert_eq!((stats.api_401s, stats.replays_after_401), (1, 1));
    }

    /// `token-1`, then `invalid_client` for ever.
    struct FailsAfterOne(AtomicUsize);

    impl crate::TokenSource for FailsAfterOne {
        fn fetch(&self) -> BoxFuture<'_, Result<IssuedToken, AuthError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    Ok(IssuedToken::bearer("token-1", Duration::from_secs(3600)).unwrap())
                } else {
                    Err(AuthError::OAuth {
                        status: http::StatusCode::UNAUTHORIZED,
                        code: crate::OAuthErrorCode::InvalidClient,
                        description: Some("client deleted".into()),
                    })
                }
            })
        }
    }

    on_both_stacks!(a_401_whose_refresh_fails_gives_the_caller_the_refresh_error);
    async fn a_401_whose_refresh_fails_gives_the_caller_the_refresh_error(kind: Kind) {
        let scope = Scope::new([Uri::from_static("https://api.example.test")]).unwrap();
        let auth = GenesysAuth::from_source(
            FailsAfterOne(AtomicUsize::new(0)),
            CacheConfig::default(),
            scope,
        );
        let api = Api::default();
        api.accept(&["token-1"]);
        let client = over(&auth, kind, api.service());
        let ok = client
            .clone()
            .oneshot(post("https://api.example.test/x", "{}"));
        assert_eq!(ok.await.unwrap().status(), 200);

        api.accept(&[]); // token-1 revoked, and the client was deleted
        let err = client
            .oneshot(post("https://api.example.test/x", "{}"))
            .await
            .unwrap_err();
        let err = err.downcast_ref::<AuthError>().expect("an AuthError");
        assert_eq!(
            err.oauth_code(),
            Some(&crate::OAuthErrorCode::InvalidClient),
            "{err}"
        );
        assert_eq!(
            api.seen().len(),
            2,
            "the 401'd request is not sent a third time"
        );
        assert_eq!(auth.stats().refreshes, 2);
    }

    on_both_stacks!(nested_stacks_replay_only_their_own_401s);
    async fn nested_stacks_replay_only_their_own_401s(outer: Kind) {
        // Over either kind of inner stack.
        for inner in Kind::BOTH {
            let (source_a, source_b) = (Counter::default(), Counter::default());
            let scoped = |uri| Scope::new([Uri::from_static(uri)]).unwrap();
            let a = GenesysAuth::from_source(
                source_a.clone(),
                CacheConfig::default(),
                scoped("https://api.a.test"),
            );
            let b = GenesysAuth::from_source(
                source_b.clone(),
                CacheConfig::default(),
                scoped("https://api.b.test"),
            );
            let api = Api::default(); // accepts nothing
            let client = over(&a, outer, over(&b, inner, api.service()));

            // Inner stack's host: replayed once, by the inner stack only.
            let res = client
                .clone()
                .oneshot(post("https://api.b.test/x", "{}"))
                .await
                .unwrap();
            assert_eq!(res.status(), 401);
            assert_eq!(
                api.seen().len(),
                2,
                "sent once and replayed once, over {inner:?}"
            );
            assert_eq!(source_a.issued(), 0);
            assert_eq!(source_b.issued(), 2);

            // Outer stack's host: replayed once, by the outer stack only.
            let res = client
                .oneshot(post("https://api.a.test/x", "{}"))
                .await
                .unwrap();
            assert_eq!(res.status(), 401);
            assert_eq!(api.seen().len(), 4);
            assert_eq!(source_a.issued(), 2);
            assert_eq!(source_b.issued(), 2);
            assert_eq!(
                api.marked.load(Ordering::SeqCst),
                0,
                "no marker reached the API"
            );
        }
    }

    on_both_stacks!(a_second_401_goes_back_to_the_caller);
    async fn a_second_401_goes_back_to_the_caller(kind: Kind) {
        let (source, auth, api, client) = stack(kind);
        let res = client
            .oneshot(post("https://api.example.test/x", "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(api.seen().len(), 2, "sent once, replayed once, no loop");
        assert_eq!(source.issued(), 2);
        let stats = auth.stats();
        assert_eq!(
            (stats.api_401s, stats.replays_after_401),
            (2, 1),
            "both 401s counted, one replayed: the difference reached the caller"
        );
    }

    /// 2d: a request is replayed at most once however the pieces are stacked: the policy
    /// of the same auth outside `auth.layers()` (which replays by itself), or `layers()`
    /// outside the two-layer stack.
    #[tokio::test]
    async fn a_request_is_replayed_once_however_the_layers_are_stacked() {
        for outer_policy in [true, false] {
            let source = Counter::default();
            let auth = auth(source.clone());
            let api = Api::default(); // accepts nothing
            let client: Boxed<Full<Bytes>> = if outer_policy {
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(auth.retry_layer())
                        .layer(auth.layers())
                        .service(api.service()),
                )
            } else {
                Boxed::new(
                    ServiceBuilder::new()
                        .layer(auth.layers())
                        .layer(auth.retry_layer())
                        .layer(auth.layer())
                        .service(api.service()),
                )
            };
            let res = client
                .oneshot(post("https://api.example.test/x", "{}"))
                .await
                .unwrap();
            assert_eq!(res.status(), 401, "outer policy: {outer_policy}");
            let sent: Vec<_> = api.seen().into_iter().map(|(auth, _)| auth).collect();
            assert_eq!(
                sent,
                [
                    Some("Bearer token-1".to_owned()),
                    Some("Bearer token-2".to_owned()),
                ],
                "sent once, replayed once with a newer token (outer policy: {outer_policy})"
            );
            assert_eq!(source.issued(), 2, "outer policy: {outer_policy}");
            assert_eq!(
                api.marked.load(Ordering::SeqCst),
                0,
                "no marker reached the API"
            );
        }
    }

    on_both_stacks!(own_authorization_and_other_hosts_are_never_touched_nor_retried);
    async fn own_authorization_and_other_hosts_are_never_touched_nor_retried(kind: Kind) {
        let (source, _, api, client) = stack(kind);

        let mut own = post("https://api.example.test/x", "{}");
        own.headers_mut()
            .insert(AUTHORIZATION, "Bearer mine".parse().unwrap());
        let res = client.clone().oneshot(own).await.unwrap();
        assert_eq!(res.status(), 401);

        let res = client
            .oneshot(post("https://other.example.test/x", "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);

        let seen = api.seen();
        assert_eq!(seen.len(), 2, "neither was replayed");
        assert_eq!(seen[0].0.as_deref(), Some("Bearer mine"));
        assert_eq!(seen[1].0, None, "no token for another host");
        assert_eq!(source.issued(), 0);
    }

    on_both_stacks!(a_body_that_cannot_be_copied_is_sent_once);
    async fn a_body_that_cannot_be_copied_is_sent_once(kind: Kind) {
        let (_, _, api, client) = stack(kind);
        let req = streaming();
        let res = client.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(
            res.extensions().get::<TokenGeneration>(),
            Some(&TokenGeneration(1))
        );
        assert_eq!(api.seen().len(), 1);
    }

    on_both_stacks!(a_refused_token_is_dropped_even_when_the_request_cannot_be_replayed);
    async fn a_refused_token_is_dropped_even_when_the_request_cannot_be_replayed(kind: Kind) {
        let (source, auth, api, client) = stack(kind);
        api.accept(&["token-1"]);
        let res = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(res.status(), 200);

        // token-1 is revoked: its 401 comes back (the body cannot be copied), but the token
        // is dropped and the next request carries a new one.
        api.accept(&["token-2"]);
        let res = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(res.status(), 401);
        let res = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(source.issued(), 2);
        let stats = auth.stats();
        assert_eq!(
            (stats.api_401s, stats.replays_after_401),
            (1, 0),
            "a 401 that reached the caller shows as the difference"
        );
        let sent: Vec<_> = api.seen().into_iter().map(|(auth, _)| auth).collect();
        assert_eq!(
            sent,
            [
                Some("Bearer token-1".to_owned()),
                Some("Bearer token-1".to_owned()),
                Some("Bearer token-2".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn the_copy_keeps_method_uri_version_headers_and_extensions() {
        #[derive(Clone, Debug, PartialEq)]
        struct Marker(u8);
        let auth = auth(Counter::default());
        let mut policy = auth.retry_policy();
        // `GET` is the copy's own method from the start; the others are cloned, an
        // extension method too.
        let methods = [
            http::Method::PUT,
            http::Method::GET,
            http::Method::HEAD,
            http::Method::from_bytes(b"PURGE").unwrap(),
        ];
        for method in methods {
            let mut req = post("https://api.example.test/x?q=1", "abc");
            *req.method_mut() = method.clone();
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().insert("x-trace", "7".parse().unwrap());
            req.extensions_mut().insert(Marker(9));
            let copy =
                <RefreshOn401 as Policy<_, Response<()>, ()>>::clone_request(&mut policy, &req)
                    .unwrap();
            assert_eq!(copy.method(), method);
            assert_eq!(copy.uri(), req.uri());
            assert_eq!(copy.version(), req.version());
            assert_eq!(copy.headers(), req.headers());
            assert_eq!(copy.extensions().get::<Marker>(), Some(&Marker(9)));
            assert_eq!(copy.into_body().collect().await.unwrap().to_bytes(), "abc");
        }
    }

    #[tokio::test]
    async fn the_copy_of_a_bare_request_is_just_as_bare() {
        // No header and no extension: the copy keeps its own empty ones (not clones).
        let auth = auth(Counter::default());
        let mut policy = auth.retry_policy();
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = http::Method::DELETE;
        *req.uri_mut() = "https://api.example.test/api/v2/tokens/me".parse().unwrap();
        *req.version_mut() = http::Version::HTTP_10;
        let copy = <RefreshOn401 as Policy<_, Response<()>, ()>>::clone_request(&mut policy, &req)
            .unwrap();
        assert_eq!(copy.method(), http::Method::DELETE);
        assert_eq!(copy.uri(), req.uri());
        assert_eq!(copy.version(), http::Version::HTTP_10);
        assert!(copy.headers().is_empty());
        assert!(copy.extensions().is_empty());
        assert!(copy
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }

    #[tokio::test]
    async fn an_unstamped_401_is_not_retried_by_the_policy() {
        let auth = auth(Counter::default());
        let mut policy = auth.retry_policy();
        let mut req = post("https://api.example.test/x", "");
        let mut result: Result<Response<()>, ()> =
            Ok(Response::builder().status(401).body(()).unwrap());
        assert!(policy.retry(&mut req, &mut result).is_none());
    }
}
