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
use crate::source::BoxFuture;
use crate::token::{Token, TokenGeneration};

pin_project! {
    /// The response future of [`AuthService`](super::AuthService).
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
            waiting: Option<Box<Waiting<S, B>>>,
        },
        // The inner service was called; `generation` is the token attached, if any.
        Called {
            #[pin]
            future: S::Future,
            generation: Option<TokenGeneration>,
        },
    }
}

/// What a request waiting for its token holds.
pub(crate) struct Waiting<S, B> {
    token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
    service: S,
    request: Request<B>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, generation: Option<TokenGeneration>) -> Self {
        Self {
            state: State::Called { future, generation },
        }
    }

    pub(crate) fn waiting(
        token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
        service: S,
        request: Request<B>,
    ) -> Self {
        Self {
            state: State::WaitingForToken {
                waiting: Some(Box::new(Waiting {
                    token,
                    service,
                    request,
                })),
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::WaitingForToken { waiting } => {
                    let Some(pending) = waiting.as_mut() else {
                        return Poll::Ready(Err(
                            "AuthService future polled after completion".into()
                        ));
                    };
                    let result = ready!(pending.token.as_mut().poll(cx));
                    let Some(pending) = waiting.take() else {
                        return Poll::Ready(Err(
                            "AuthService future polled after completion".into()
                        ));
                    };
                    let token = match result {
                        Ok(token) => token,
                        Err(error) => return Poll::Ready(Err(error.into())),
                    };
                    let Waiting {
                        mut service,
                        mut request,
                        ..
                    } = *pending;
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, token.header().clone());
                    let future = service.call(request);
                    this.state.set(State::Called {
                        future,
                        generation: Some(token.generation()),
                    });
                }
                StateProj::Called { future, generation } => {
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if let Some(generation) = *generation {
                        if response.status() == StatusCode::UNAUTHORIZED {
                            // Only 401s are stamped: inserting the first extension allocates,
                            // and the hot path must not.
                            response.extensions_mut().insert(generation);
                            tracing::debug!(
                                target: "genesys_auth_layer::auth",
                                generation = generation.0,
                                "API answered 401 for a token this layer attached"
                            );
                        }
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
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
