//! Response bodies the fake can produce.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// The body type of every response the fake produces, over sockets and from
/// [`FakeService`](crate::FakeService).
///
/// It is boxed so that one type can express a plain buffered body, an empty
/// body and a slowly dripping body ([`TokenFault::Drip`](crate::TokenFault::Drip)).
/// It never fails: its error type is [`Infallible`].
pub type FakeBody = BoxBody<Bytes, Infallible>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> FakeBody {
    Full::new(bytes.into()).boxed()
}

pub(crate) fn empty() -> FakeBody {
    Empty::new().boxed()
}

pub(crate) fn drip(body: impl Into<Bytes>, every: Duration) -> FakeBody {
    DripBody {
        data: body.into(),
        every,
        sleep: Box::pin(tokio::time::sleep(every)),
    }
    .boxed()
}

/// Sends its data one byte per `every`.
struct DripBody {
    data: Bytes,
    every: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl Body for DripBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.data.is_empty() {
            return Poll::Ready(None);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let chunk = this.data.split_to(1);
        let next = Instant::now()
            .checked_add(this.every)
            .unwrap_or_else(far_future);
        this.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

/// An instant about thirty years from now (what tokio itself uses for "never").
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}
