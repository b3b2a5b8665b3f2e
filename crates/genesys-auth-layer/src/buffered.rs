//! [`BufferedBody`]: a streaming request body that keeps what it sent, so that a request
//! can be replayed after a 401.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::retry::ReplayableBody;

/// How many bytes a [`BufferedBody`] keeps by default (64 KiB): more than any JSON body the
/// Genesys Cloud API takes, far less than a file upload.
///
/// ```
/// assert_eq!(genesys_auth_layer::DEFAULT_BUFFER_LIMIT, 64 * 1024);
/// ```
pub const DEFAULT_BUFFER_LIMIT: usize = 64 * 1024;

pin_project! {
    /// A streaming request body that keeps a copy of what it sends (up to a limit), so
    /// that the request can be replayed after a 401.
    ///
    /// A streaming body (hyper's `Incoming`, a boxed body, a channel) cannot be copied
    /// before it is sent, so the replay stacks send it once and give a 401 back to the
    /// caller. Wrapped in a `BufferedBody`, it is copied as it is sent: its copy (the one
    /// the replay stacks keep) replays the same frames, data and trailers.
    ///
    /// * The request is replayed only if the body was sent **in full** before the 401
    ///   arrived. A server may answer 401 before it read the body; the rest of the body
    ///   is then lost to the copy, and the 401 goes back to the caller (the refused token
    ///   is still dropped, and the next request gets a new one).
    /// * Past its limit ([`DEFAULT_BUFFER_LIMIT`], or [`with_limit`](Self::with_limit)),
    ///   it stops keeping bytes and frees those it kept; the request is then sent once.
    /// * The data comes out as [`Bytes`] (a `Bytes` chunk is kept without copying its
    ///   bytes) and errors as a [`BoxError`] holding the inner body's error.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use bytes::Bytes;
    /// use genesys_auth_layer::{BufferedBody, ReplayableBody};
    /// use http_body_util::{BodyExt, Channel};
    ///
    /// // A body streamed from elsewhere (here a channel, as from a file or another request).
    /// let (mut tx, stream) = Channel::<Bytes, std::io::Error>::new(2);
    /// let body = BufferedBody::new(stream);
    /// let copy = body.try_clone_body().expect("nothing over the limit yet");
    /// tokio::spawn(async move {
    ///     tx.send_data(Bytes::from("{\"a\":")).await.unwrap();
    ///     tx.send_data(Bytes::from("1}")).await.unwrap();
    /// });
    /// assert!(!copy.can_replay(), "nothing was sent yet");
    ///
    /// let sent = body.collect().await.unwrap().to_bytes(); // as the client sends it
    /// assert!(copy.can_replay());
    /// let replayed = copy.collect().await.unwrap().to_bytes();
    /// assert_eq!(sent, Bytes::from("{\"a\":1}"));
    /// assert_eq!(replayed, sent);
    /// # });
    /// ```
    pub struct BufferedBody<B> {
        // The body itself; `None` in a copy.
        #[pin]
        inner: Option<B>,
        record: Arc<Mutex<Record>>,
        // A copy's next recorded frame.
        next: usize,
    }
}

/// What the body sent, kept for its copies.
struct Record {
    frames: Vec<Kept>,
    bytes: usize,
    limit: usize,
    state: State,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Sent in part so far; everything sent is kept.
    Sending,
    /// Sent in full and kept in full: a copy can replay it.
    Sent,
    /// Past the limit: nothing is kept.
    OverLimit,
    /// The body failed while it was being sent.
    Failed,
}

impl Record {
    fn keep(&mut self, frame: &Frame<Bytes>) {
        if self.state != State::Sending {
            return;
        }
        if let Some(data) = frame.data_ref() {
            if self.bytes + data.len() > self.limit {
                self.state = State::OverLimit;
                self.frames = Vec::new();
                self.bytes = 0;
                return;
            }
            self.bytes += data.len();
            self.frames.push(Kept::Data(data.clone()));
        } else if let Some(trailers) = frame.trailers_ref() {
            self.frames.push(Kept::Trailers(trailers.clone()));
        }
    }
}

fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B> BufferedBody<B> {
    /// `body`, keeping up to [`DEFAULT_BUFFER_LIMIT`] bytes of it.
    ///
    /// ```
    /// use genesys_auth_layer::BufferedBody;
    /// let body = BufferedBody::new(http_body_util::Full::new(bytes::Bytes::from("{}")));
    /// ```
    pub fn new(body: B) -> Self {
        Self::with_limit(body, DEFAULT_BUFFER_LIMIT)
    }

    /// `body`, keeping up to `limit` bytes of it: a longer body is sent once, never
    /// replayed.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use genesys_auth_layer::{BufferedBody, ReplayableBody};
    /// use http_body_util::BodyExt;
    ///
    /// let body = BufferedBody::with_limit(http_body_util::Full::new(bytes::Bytes::from("12345")), 4);
    /// let copy = body.try_clone_body().unwrap();
    /// body.collect().await.unwrap(); // sent: 5 bytes, over the limit
    /// assert!(!copy.can_replay());
    /// # });
    /// ```
    pub fn with_limit(body: B, limit: usize) -> Self {
        Self {
            inner: Some(body),
            record: Arc::new(Mutex::new(Record {
                frames: Vec::new(),
                bytes: 0,
                limit,
                state: State::Sending,
            })),
            next: 0,
        }
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            // A copy: the frames the body sent, once it sent them all.
            let record = lock(this.record);
            if record.state != State::Sent {
                return Poll::Ready(Some(Err(
                    "BufferedBody copy polled, but the body was not sent in full".into(),
                )));
            }
            let frame = match record.frames.get(*this.next) {
                Some(Kept::Data(data)) => Frame::data(data.clone()),
                Some(Kept::Trailers(trailers)) => Frame::trailers(trailers.clone()),
                None => return Poll::Ready(None),
            };
            *this.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        };
        let mut inner = inner;
        match ready!(inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                let mut record = lock(this.record);
                record.keep(&frame);
                // A client may stop at the last frame, without the final poll for `None`.
                if inner.is_end_stream() && record.state == State::Sending {
                    record.state = State::Sent;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                lock(this.record).state = State::Failed;
                Poll::Ready(Some(Err(error.into())))
            }
            None => {
                let mut record = lock(this.record);
                if record.state == State::Sending {
                    record.state = State::Sent;
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => {
                // A client that learns here that the body ended polls it no more.
                let end = inner.is_end_stream();
                let mut record = lock(&self.record);
                if end && record.state == State::Sending {
                    record.state = State::Sent;
                }
                end
            }
            None => {
                let record = lock(&self.record);
                record.state == State::Sent && self.next >= record.frames.len()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => {
                let record = lock(&self.record);
                if record.state != State::Sent {
                    return SizeHint::default();
                }
                let left = record.frames[self.next.min(record.frames.len())..]
                    .iter()
                    .map(|kept| match kept {
                        Kept::Data(data) => data.len() as u64,
                        Kept::Trailers(_) => 0,
                    })
                    .sum();
                SizeHint::with_exact(left)
            }
        }
    }
}

impl<B> ReplayableBody for BufferedBody<B> {
    /// A copy that will replay what this body sends, unless it already went past its
    /// limit or failed.
    fn try_clone_body(&self) -> Option<Self> {
        if matches!(lock(&self.record).state, State::OverLimit | State::Failed) {
            return None;
        }
        Some(Self {
            inner: None,
            record: self.record.clone(),
            next: 0,
        })
    }

    /// Whether the body was sent in full and kept in full.
    fn can_replay(&self) -> bool {
        lock(&self.record).state == State::Sent
    }
}

impl<B> fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = lock(&self.record);
        f.debug_struct("BufferedBody")
            .field("copy", &self.inner.is_none())
            .field("state", &record.state)
            .field("kept_bytes", &record.bytes)
            .field("limit", &record.limit)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex as StdMutex;

    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Channel};
    use tower::{Service, ServiceBuilder, ServiceExt};

    use super::*;
    use crate::test_support::{auth, Counter};

    type Stream = Channel<Bytes, std::io::Error>;

    /// A streamed body with `chunks` and, if given, trailers, already queued.
    fn streamed(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Stream {
        let (mut tx, body) = Channel::new(chunks.len() + 1);
        for chunk in chunks {
            tx.try_send(Frame::data(Bytes::from_static(chunk.as_bytes())))
                .unwrap();
        }
        if let Some(trailers) = trailers {
            tx.try_send(Frame::trailers(trailers)).unwrap();
        }
        body
    }

    fn trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        trailers
    }

    #[tokio::test]
    async fn a_copy_replays_the_frames_and_trailers_that_were_sent() {
        let body = BufferedBody::new(streamed(&["{\"a\":", "1}"], Some(trailers())));
        let copy = body.try_clone_body().unwrap();
        let sent = body.collect().await.unwrap();
        assert!(copy.can_replay());
        assert_eq!(copy.size_hint().exact(), Some(7));
        let replayed = copy.collect().await.unwrap();
        assert_eq!(replayed.trailers(), Some(&trailers()));
        assert_eq!(sent.trailers(), Some(&trailers()));
        assert_eq!(replayed.to_bytes(), sent.to_bytes());
    }

    #[tokio::test]
    async fn a_copy_of_a_body_not_sent_in_full_cannot_replay() {
        let (mut tx, stream) = Stream::new(4);
        tx.try_send(Frame::data(Bytes::from_static(b"part")))
            .unwrap();
        let mut body = BufferedBody::new(stream);
        let mut copy = body.try_clone_body().unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        assert!(!copy.can_replay(), "the rest is still to come");
        let polled = copy.frame().await.unwrap();
        assert!(
            polled.is_err(),
            "a copy polled too early errs, never sends a part"
        );
        drop(tx); // the body ends: now it was sent in full
        assert!(body.frame().await.is_none());
        assert!(body.try_clone_body().unwrap().can_replay());
    }

    #[tokio::test]
    async fn a_body_that_says_it_ended_was_sent_in_full() {
        // `Full` says it ended once its one frame is out; a client stops polling there.
        let mut body = BufferedBody::new(http_body_util::Full::new(Bytes::from_static(b"{}")));
        let copy = body.try_clone_body().unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "{}");
        assert!(copy.can_replay(), "no poll for the end was needed");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "{}");

        // An empty body that says so at once is sent in full without any poll.
        let body = BufferedBody::new(http_body_util::Empty::<Bytes>::new());
        let copy = body.try_clone_body().unwrap();
        assert!(body.is_end_stream());
        assert!(copy.can_replay());
    }

    #[tokio::test]
    async fn past_its_limit_it_keeps_nothing_and_is_sent_once() {
        let body = BufferedBody::with_limit(streamed(&["123", "45"], None), 4);
        let copy = body.try_clone_body().unwrap();
        let shared = body.record.clone();
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent, "12345", "the body itself is sent whole");
        assert!(!copy.can_replay());
        assert!(copy.try_clone_body().is_none());
        let record = lock(&shared);
        assert_eq!(
            (record.frames.len(), record.bytes),
            (0, 0),
            "what it kept is freed"
        );
        assert_eq!(record.state, State::OverLimit);
    }

    #[tokio::test]
    async fn a_body_that_failed_cannot_be_replayed() {
        let (mut tx, stream) = Stream::new(4);
        tx.try_send(Frame::data(Bytes::from_static(b"part")))
            .unwrap();
        tx.abort(std::io::Error::other("disk gone"));
        let body = BufferedBody::new(stream);
        let copy = body.try_clone_body().unwrap();
        let error = body.collect().await.unwrap_err();
        assert!(error.to_string().contains("disk gone"), "{error}");
        assert!(!copy.can_replay());
        assert!(copy.try_clone_body().is_none());
        let shown = format!("{copy:?}");
        assert!(
            shown.contains("Failed") && !shown.contains("part"),
            "{shown}"
        );
    }

    /// The stack `name` (`fused`: `auth.layers()`, `tower`: tower's `Retry` over
    /// `auth.layer()`) of a new auth, over `inner`.
    fn stack<S>(name: &str, inner: S) -> Boxed
    where
        S: Service<Request<BufferedBody<Stream>>, Response = Response<()>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let auth = auth(Counter::default());
        match name {
            "fused" => Boxed::new(ServiceBuilder::new().layer(auth.layers()).service(inner)),
            _ => Boxed::new(
                ServiceBuilder::new()
                    .layer(auth.retry_layer())
                    .layer(auth.layer())
                    .service(inner),
            ),
        }
    }

    type Boxed =
        tower::util::BoxCloneService<Request<BufferedBody<Stream>>, Response<()>, BoxError>;

    type Seen = Arc<StdMutex<Vec<(String, Bytes)>>>;

    /// An API that accepts only `token-2`; it reads the whole body first if `reads`.
    fn api(
        seen: Seen,
        reads: bool,
    ) -> impl Service<
        Request<BufferedBody<Stream>>,
        Response = Response<()>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send {
        tower::service_fn(move |request: Request<BufferedBody<Stream>>| {
            let seen = seen.clone();
            async move {
                let token = request.headers()["authorization"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let body = if reads {
                    request.into_body().collect().await.unwrap().to_bytes()
                } else {
                    Bytes::new()
                };
                let ok = token == "Bearer token-2";
                seen.lock().unwrap().push((token, body));
                let mut response = Response::new(());
                if !ok {
                    *response.status_mut() = StatusCode::UNAUTHORIZED;
                }
                Ok::<_, Infallible>(response)
            }
        })
    }

    fn post(body: Stream) -> Request<BufferedBody<Stream>> {
        Request::post("https://api.example.test/x")
            .body(BufferedBody::new(body))
            .unwrap()
    }

    #[tokio::test]
    async fn a_streamed_body_sent_in_full_is_replayed_by_both_stacks() {
        for name in ["fused", "tower"] {
            let seen = Seen::default();
            let client = stack(name, api(seen.clone(), true));
            let response = client
                .oneshot(post(streamed(&["{\"n\":", "[1,2]}"], None)))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{name}");
            let body = Bytes::from_static(b"{\"n\":[1,2]}");
            assert_eq!(
                *seen.lock().unwrap(),
                [
                    ("Bearer token-1".to_owned(), body.clone()),
                    ("Bearer token-2".to_owned(), body)
                ],
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_401_before_the_body_was_read_goes_back_to_the_caller() {
        for name in ["fused", "tower"] {
            let seen = Seen::default();
            let client = stack(name, api(seen.clone(), false));
            let response = client
                .oneshot(post(streamed(&["never read"], None)))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
            assert_eq!(seen.lock().unwrap().len(), 1, "{name}: sent once");
        }
    }
}
