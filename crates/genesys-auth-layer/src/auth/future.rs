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
        // Waiting for a token before the inner service can be called.
        WaitingForToken {
            token: BoxFuture<'static, Result<Arc<Token>, AuthError>>,
            service: Option<S>,
            request: Option<Request<B>>,
        },
        // The inner service was called; `generation` is the token attached, if any.
        Called {
            #[pin]
            future: S::Future,
            generation: Option<TokenGeneration>,
        },
    }
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
                token,
                service: Some(service),
                request: Some(request),
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
                StateProj::WaitingForToken {
                    token,
                    service,
                    request,
                } => {
                    let token = match ready!(token.as_mut().poll(cx)) {
                        Ok(token) => token,
                        Err(error) => return Poll::Ready(Err(error.into())),
                    };
                    let (Some(mut service), Some(mut request)) = (service.take(), request.take())
                    else {
                        return Poll::Ready(Err(
                            "AuthService future polled after completion".into()
                        ));
                    };
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
