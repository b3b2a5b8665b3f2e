//! [`ResponseFuture`]: the answer of [`AuthService`](super::AuthService), and the wait for
//! a token and for capacity when there is no valid token yet.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::cache::TokenCache;
use crate::error::AuthError;
use crate::retry::Stamp;
use crate::source::BoxFuture;
use crate::token::{Token, TokenGeneration};
use tokio::time::Instant;

pin_project! {
    /// The response future of [`AuthService`](super::AuthService): the inner service's
    /// answer, with a `401` to a token this layer attached reported to its cache and
    /// stamped with the token's [`TokenGeneration`].
    ///
    /// A request that had to wait for a token goes through two more states first: the
    /// token, then the inner service's readiness (so that it holds no capacity of the inner
    /// service while the token request, which may need that capacity, runs).
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
        // Waiting for a token, then for the inner service. Boxed: the slow path.
        Waiting {
            waiting: Option<Box<Waiting<S, B>>>,
        },
        // The inner service was called; `attached` names the token sent, if any.
        Called {
            #[pin]
            future: S::Future,
            attached: Option<Attached>,
        },
    }
}

/// The token a request was sent with, so that a 401 can be reported to its cache.
pub(crate) struct Attached {
    pub(crate) cache: TokenCache,
    pub(crate) generation: TokenGeneration,
    /// Whether the request is a replay after a 401 (whose refresh already ran).
    pub(crate) replay: bool,
}

pub(crate) struct Waiting<S, B> {
    token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
    /// The token, once it is there, while the service gets ready.
    got: Option<Arc<Token>>,
    cache: TokenCache,
    replay: bool,
    service: S,
    request: Option<Request<B>>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// The inner service was called at once.
    pub(crate) fn called(future: S::Future, attached: Option<Attached>) -> Self {
        Self {
            state: State::Called { future, attached },
        }
    }

    /// Once the inner service was called: the cache of the token the request was sent with,
    /// taken out of this future (a 401 to it has been reported by then). The replay of
    /// [`AuthReplayService`](super::AuthReplayService) waits on it for a newer token.
    pub(crate) fn take_cache(self: Pin<&mut Self>) -> Option<TokenCache> {
        match self.project().state.project() {
            StateProj::Called { attached, .. } => attached.take().map(|a| a.cache),
            StateProj::Waiting { .. } => None,
        }
    }

    /// Waits for a valid token (one newer than `refused`, for a replay), then for `service`
    /// to be ready, then calls it with `request` carrying that token.
    pub(crate) fn waiting(
        cache: TokenCache,
        service: S,
        request: Request<B>,
        refused: Option<TokenGeneration>,
    ) -> Self {
        let token = {
            let cache = cache.clone();
            Box::pin(async move {
                match refused {
                    Some(generation) => cache.refresh_after_401(generation).await,
                    None => cache.token().await,
                }
            }) as BoxFuture<'static, _>
        };
        Self {
            state: State::Waiting {
                waiting: Some(Box::new(Waiting {
                    token,
                    got: None,
                    cache,
                    replay: refused.is_some(),
                    service,
                    request: Some(request),
                })),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let StateProj::Waiting { waiting } = self.as_mut().project().state.project() {
            let Some(pending) = waiting.as_mut() else {
                return Poll::Ready(Err(
                    "AuthService future polled after an error or after completion".into(),
                ));
            };
            let called = pending.poll_call(cx);
            let called = match ready!(called) {
                Ok(called) => called,
                Err(error) => {
                    *waiting = None;
                    return Poll::Ready(Err(error));
                }
            };
            self.as_mut().project().state.set(called);
        }
        let StateProj::Called { future, attached } = self.project().state.project() else {
            return Poll::Ready(Err("AuthService future in no state to poll".into()));
        };
        let mut output = ready!(future.poll(cx)).map_err(Into::into);
        if let (Some(attached), Ok(response)) = (attached, &mut output) {
            if response.status() == StatusCode::UNAUTHORIZED {
                stamp_401(response, attached);
            }
        }
        Poll::Ready(output)
    }
}

impl<S, B> Waiting<S, B>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
{
    /// Polls for the token, then for readiness; once both are there, calls the service.
    fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Result<State<S, B>, BoxError>> {
        loop {
            if self.got.is_none() {
                let token = ready!(self.token.as_mut().poll(cx))?;
                self.got = Some(token);
            }
            ready!(self.service.poll_ready(cx)).map_err(Into::into)?;
            if self
                .got
                .as_ref()
                .is_some_and(|t| t.is_valid_at(Instant::now()))
            {
                break;
            }
            // The token expired while the service got ready: give the capacity back (a
            // clone is not ready) and wait for a valid one.
            self.service = self.service.clone();
            self.got = None;
            let cache = self.cache.clone();
            self.token = Box::pin(async move { cache.token().await });
        }
        self.cache.count_authorized();
        let (Some(token), Some(mut request)) = (self.got.take(), self.request.take()) else {
            return Poll::Ready(Err(
                "AuthService future polled after an error or after completion".into(),
            ));
        };
        request
            .headers_mut()
            .insert(AUTHORIZATION, token.header().clone());
        let future = self.service.call(request);
        Poll::Ready(Ok(State::Called {
            future,
            attached: Some(Attached {
                cache: self.cache.clone(),
                generation: token.generation(),
                replay: self.replay,
            }),
        }))
    }
}

/// Reports the 401 to the cache (the refused token is withdrawn and a refresh starts,
/// unless the request was a replay or a backoff keeps the token in use) and puts the
/// generation and the stamp the replay reads in the response's extensions.
#[cold]
fn stamp_401<B>(response: &mut Response<B>, attached: &Attached) {
    let replayable = attached
        .cache
        .answered_401(attached.generation, attached.replay);
    let stamp = Stamp {
        cache: attached.cache.id(),
        generation: attached.generation,
        replay: attached.replay,
        replayable,
    };
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
            State::Waiting { waiting: Some(w) } if w.got.is_some() => "waiting for the service",
            State::Waiting { .. } => "waiting for a token",
            State::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
