use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::error::AuthError;
use crate::retry::Stamp;
use crate::source::BoxFuture;
use crate::token::Token;

pin_project! {
    /// The response future of [`AuthService`](super::AuthService).
    ///
    /// ```
    /// use genesys_auth_layer::ResponseFuture;
    /// use tower::{Layer, Service, ServiceExt};
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
    /// # let layer = {
    /// #     use genesys_auth_layer::{AuthLayer, Region, Scope, TokenCache};
    /// #     let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// #     AuthLayer::new(TokenCache::new(Fixed, Default::default()), scope)
    /// # };
    /// // `api` answers whether the request carried a token.
    /// # let api = tower::service_fn(|req: http::Request<String>| async move {
    /// #     let authorized = req.headers().contains_key(http::header::AUTHORIZATION);
    /// #     let body = if authorized { "authorized" } else { "anonymous" };
    /// #     Ok::<_, tower::BoxError>(http::Response::new(body.to_owned()))
    /// # });
    /// let mut service = layer.layer(api);
    /// let request = http::Request::get("https://api.mypurecloud.com/api/v2/users/me")
    ///     .body(String::new())?;
    /// let future: ResponseFuture<_, String> = service.ready().await?.call(request);
    /// assert_eq!(future.await?.into_body(), "authorized");
    /// # Ok::<(), tower::BoxError>(()) }).unwrap();
    /// ```
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // Waiting for a token before the inner service can be called. Boxed: it is the
        // slow path, and keeping it small keeps the hot path's future small.
        WaitingForToken {
            waiting: Pending<S, B>,
        },
        // The inner service was called; `stamp` names the token attached, if any, and
        // `replay` says whether this is a replay (`RefreshOn401`'s or `AuthReplayService`'s),
        // whose refresh already ran.
        Called {
            #[pin]
            future: S::Future,
            stamp: Option<Stamp>,
            replay: bool,
        },
    }
}

/// The waiting state's box, dropped out of line, so that the future's drop glue keeps only
/// the hot path's state inline (three instructions fewer per call, callgrind; the glue is
/// still a call of its own).
pub(crate) struct Pending<S, B>(Option<Box<Waiting<S, B>>>);

impl<S, B> Drop for Pending<S, B> {
    #[inline(never)]
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// What a request waiting for its token holds.
pub(crate) struct Waiting<S, B> {
    token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
    cache: u64,
    /// A replay (`RefreshOn401`'s or `AuthReplayService`'s), waiting for a token newer than
    /// the one refused.
    replay: bool,
    service: S,
    request: Request<B>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, stamp: Option<Stamp>) -> Self {
        Self {
            state: State::Called {
                future,
                stamp,
                replay: false,
            },
        }
    }

    pub(crate) fn waiting(
        token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
        cache: u64,
        replay: bool,
        service: S,
        request: Request<B>,
    ) -> Self {
        Self {
            state: State::WaitingForToken {
                waiting: Pending(Some(Box::new(Waiting {
                    token,
                    cache,
                    replay,
                    service,
                    request,
                }))),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The hot path (the inner service was called at once) stays small enough to inline,
        // and moves the response as few times as it can: a 401 is stamped in place. Waiting
        // for a token is out of line and returns no response of its own: once the token is
        // there it moves the state to `Called`, and the one path below polls the inner
        // future. (When it returned the response, the two paths' responses met in one slot
        // that the hot path's response was copied into: 3 % of (3)'s time, `--paired`.)
        if let StateProj::WaitingForToken { .. } = self.as_mut().project().state.project() {
            ready!(self.as_mut().poll_token(cx))?;
        }
        // `poll_token` returns `Ok` only once the state is `Called`: the `else` cannot run,
        // and answers with an error rather than a panic if that ever changes.
        let StateProj::Called {
            future,
            stamp,
            replay,
        } = self.project().state.project()
        else {
            return Poll::Ready(Err("AuthService future in no state to poll".into()));
        };
        let mut output = ready!(future.poll(cx)).map_err(Into::into);
        if let (Some(stamp), Ok(response)) = (stamp, &mut output) {
            if response.status() == StatusCode::UNAUTHORIZED {
                stamp_401(response, *stamp, *replay);
            }
        }
        Poll::Ready(output)
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// Waits for the token; once it is there, calls the inner service and moves to the
    /// `Called` state (`Ok`). An error is the caller's answer.
    #[cold]
    #[inline(never)]
    fn poll_token(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut state = self.project().state;
        let StateProj::WaitingForToken { waiting } = state.as_mut().project() else {
            return Poll::Ready(Ok(()));
        };
        let Some(pending) = waiting.0.as_mut() else {
            return Poll::Ready(Err("AuthService future polled after completion".into()));
        };
        let result = ready!(pending.token.as_mut().poll(cx));
        let Some(pending) = waiting.0.take() else {
            return Poll::Ready(Err("AuthService future polled after completion".into()));
        };
        let token = result?;
        let Waiting {
            cache,
            replay,
            mut service,
            mut request,
            ..
        } = *pending;
        request
            .headers_mut()
            .insert(AUTHORIZATION, token.header().clone());
        let future = service.call(request);
        state.set(State::Called {
            future,
            stamp: Some(Stamp {
                cache,
                generation: token.generation(),
            }),
            replay,
        });
        Poll::Ready(Ok(()))
    }
}

/// Reports the 401 to the cache (the refused token is dropped and a refresh starts) and
/// puts the generation in the response's extensions. Only 401s are stamped: inserting the
/// first extension allocates, and the hot path must not.
#[cold]
#[inline(never)]
fn stamp_401<B>(response: &mut Response<B>, stamp: Stamp, replay: bool) {
    // The token is refused whether or not the request will be replayed (a body that cannot
    // be copied is not). A replay's 401 is only counted: its own refresh just ran, and a
    // second one per request would double the token requests of an API that refuses
    // every token; the next request's first 401 reports that token.
    crate::cache::report_401(stamp.cache, stamp.generation, replay);
    response.extensions_mut().insert(stamp.generation);
    response.extensions_mut().insert(stamp);
    tracing::debug!(
        target: "genesys_auth_layer::auth",
        generation = stamp.generation.0,
        "API answered 401 for a token this layer attached"
    );
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::WaitingForToken { .. } => "waiting for token",
            State::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
