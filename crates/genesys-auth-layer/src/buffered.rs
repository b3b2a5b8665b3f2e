//! [`BufferedBody`]: a streaming request body that keeps what it sent, so that a request
//! can be replayed after a 401.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::retry::ReplayableBody;

/// How many bytes a [`BufferedBody`] keeps by default (64 KiB): more than any JSON body the
/// Genesys Cloud API takes, far less than a file upload.
pub const DEFAULT_BUFFER_LIMIT: usize = 64 * 1024;

pin_project! {
    /// A streaming request body that keeps a copy of what it sends (up to a limit), so
    /// that the request can be replayed after a 401.
    ///
    /// A streaming body (hyper's `Incoming`, a boxed body, a channel) cannot be copied
    /// before it is sent, so the replay stacks send it once and give a 401 back to the
    /// caller. Wrapped in a `BufferedBody`, it is copied as it is sent: its copy (the one
    /// the replay stacks keep) replays the same data and trailers.
    ///
    /// * The request is replayed only if the client had taken the **whole** body out of
    ///   it when the 401 arrived: it polled it to its end, got its trailers, or learnt
    ///   from it (`is_end_stream`) that it had ended. An exact remaining size of 0 is not
    ///   the end, since trailers may follow (as on an HTTP/2 request with a
    ///   `Content-Length` and trailers), so the body is polled on and its trailers are
    ///   sent. A server that answers before it has read the body can leave part of it
    ///   unsent; the 401 then goes back to the caller (the refused token is still dropped,
    ///   and the next request gets a new one). So does, over HTTP/1.1, a body sent with a
    ///   `Content-Length` (its exact size, or the request's header) that does not say
    ///   `is_end_stream` once its last byte is out: the client stops at that length
    ///   without polling the body to its end. hyper's `Incoming`, `Full` and `Empty` say
    ///   it.
    /// * It copies what it sends into one buffer (so the memory it holds is what it
    ///   counts); past its limit ([`DEFAULT_BUFFER_LIMIT`], or
    ///   [`with_limit`](Self::with_limit)) it stops, frees the buffer, and the request is
    ///   sent once. A failed body is not replayed either.
    /// * The copy sends the data as one frame, then the trailers. With trailers, its size
    ///   is not given exactly, so that an HTTP/1.1 client sends it chunked, trailers
    ///   included, as it did the first time.
    /// * The data comes out as [`Bytes`], and errors as a [`BoxError`] holding the inner
    ///   body's error. Its `Debug` shows how much it keeps, never the bytes.
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
        // A copy's progress: 0, nothing sent; 1, the data sent; 2, the trailers too.
        sent: u8,
    }
}

/// What the body sent, kept for its copies.
struct Record {
    /// The data so far, while the body is being sent.
    sending: BytesMut,
    /// All of the data, once it was sent in full.
    data: Bytes,
    trailers: Option<HeaderMap>,
    limit: usize,
    state: State,
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
            if self.sending.len() + data.len() > self.limit {
                self.state = State::OverLimit;
                self.sending = BytesMut::new();
                return;
            }
            self.sending.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
            // Trailers are a body's last frame.
            self.finish();
        }
    }

    /// The body ended: what was kept is all of it.
    fn finish(&mut self) {
        if self.state == State::Sending {
            self.data = std::mem::take(&mut self.sending).freeze();
            self.state = State::Sent;
        }
    }

    fn fail(&mut self) {
        if self.state == State::Sending {
            self.state = State::Failed;
            self.sending = BytesMut::new();
        }
    }
}

fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B> BufferedBody<B> {
    /// `body`, keeping up to [`DEFAULT_BUFFER_LIMIT`] bytes of it.
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
                sending: BytesMut::new(),
                data: Bytes::new(),
                trailers: None,
                limit,
                state: State::Sending,
            })),
            sent: 0,
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
        let Some(mut inner) = this.inner.as_pin_mut() else {
            // A copy: the data the body sent, then its trailers, once it sent them all.
            let record = lock(this.record);
            if record.state != State::Sent {
                return Poll::Ready(Some(Err(
                    "BufferedBody copy polled, but the body was not sent in full".into(),
                )));
            }
            if *this.sent == 0 {
                *this.sent = 1;
                if !record.data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(record.data.clone()))));
                }
            }
            if *this.sent == 1 {
                *this.sent = 2;
                if let Some(trailers) = &record.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
                }
            }
            return Poll::Ready(None);
        };
        if lock(this.record).state == State::Sent {
            // It said it ended: the inner body is not asked again.
            return Poll::Ready(None);
        }
        match ready!(inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                // A client may stop here, without the final poll for `None`, when the body
                // says it ended. No byte left is not the end: trailers may follow.
                let ended = inner.is_end_stream();
                let mut record = lock(this.record);
                record.keep(&frame);
                if ended {
                    record.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                lock(this.record).fail();
                Poll::Ready(Some(Err(error.into())))
            }
            None => {
                lock(this.record).finish();
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
                if end {
                    record.finish();
                }
                end || record.state == State::Sent
            }
            None => {
                let record = lock(&self.record);
                record.state == State::Sent
                    && (self.sent >= 2
                        || (self.sent == 1 || record.data.is_empty()) && record.trailers.is_none())
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
                let left = if self.sent == 0 {
                    record.data.len() as u64
                } else {
                    0
                };
                if record.trailers.is_some() {
                    // Not exact: an HTTP/1.1 client then sends it chunked, with the trailers.
                    let mut hint = SizeHint::new();
                    hint.set_lower(left);
                    hint
                } else {
                    SizeHint::with_exact(left)
                }
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
            sent: 0,
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
            .field("kept_bytes", &(record.sending.len() + record.data.len()))
            .field("trailers", &record.trailers.is_some())
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
    use tower::{Service, ServiceExt};

    use super::*;
    use crate::test_support::{auth, over, Counter, Kind};

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
    async fn a_copy_replays_the_data_and_trailers_that_were_sent() {
        let body = BufferedBody::new(streamed(&["{\"a\":", "1}"], Some(trailers())));
        let copy = body.try_clone_body().unwrap();
        let sent = body.collect().await.unwrap();
        assert!(copy.can_replay());
        assert_eq!(copy.size_hint().lower(), 7);
        assert_eq!(
            copy.size_hint().exact(),
            None,
            "with trailers, not exact: HTTP/1.1 then sends it chunked, trailers included"
        );
        let replayed = copy.collect().await.unwrap();
        assert_eq!(replayed.trailers(), Some(&trailers()));
        assert_eq!(sent.trailers(), Some(&trailers()));
        assert_eq!(replayed.to_bytes(), sent.to_bytes());

        // Without trailers, the copy's size is exact.
        let body = BufferedBody::new(streamed(&["ab", "c"], None));
        let copy = body.try_clone_body().unwrap();
        body.collect().await.unwrap();
        assert_eq!(copy.size_hint().exact(), Some(3));
    }

    #[tokio::test]
    async fn trailers_end_the_body_without_a_poll_for_its_end() {
        // hyper stops at the trailers: they are a body's last frame.
        let (mut tx, stream) = Stream::new(4);
        tx.try_send(Frame::data(Bytes::from_static(b"abc")))
            .unwrap();
        tx.try_send(Frame::trailers(trailers())).unwrap();
        let mut body = BufferedBody::new(stream);
        let copy = body.try_clone_body().unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(!copy.can_replay());
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert!(copy.can_replay(), "sent in full at its trailers");
        assert!(body.is_end_stream());
        drop(tx);
    }

    /// Its frames one after another, with an exact size hint (the data bytes left), like
    /// hyper's `Incoming` for a request with a `Content-Length`; says it ended once its
    /// frames are out, if `says_end`; yields `late` if polled past its end.
    struct Pieces {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        says_end: bool,
        late: Option<Bytes>,
    }

    impl Pieces {
        fn new(chunks: &[&'static str], trailers: Option<HeaderMap>, says_end: bool) -> Self {
            let data = chunks
                .iter()
                .map(|c| Frame::data(Bytes::from_static(c.as_bytes())));
            Pieces {
                frames: data.chain(trailers.map(Frame::trailers)).collect(),
                says_end,
                late: None,
            }
        }
    }

    impl Body for Pieces {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            let next = self
                .frames
                .pop_front()
                .or_else(|| self.late.take().map(Frame::data));
            Poll::Ready(next.map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.says_end && self.frames.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            let data = self.frames.iter().filter_map(Frame::data_ref);
            SizeHint::with_exact(data.map(|d| d.len() as u64).sum())
        }
    }

    #[tokio::test]
    async fn a_body_that_says_it_ended_is_sent_in_full_and_not_polled_again() {
        let mut body = BufferedBody::new(Pieces {
            late: Some(Bytes::from("LATE")),
            ..Pieces::new(&["ab", "cd"], None, true)
        });
        let copy = body.try_clone_body().unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert!(!copy.can_replay());
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "cd"
        );
        assert!(copy.can_replay(), "it said it ended");
        assert!(
            body.frame().await.is_none(),
            "the inner body is not asked again"
        );
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn trailers_arrive_on_the_first_send_and_on_the_replay() {
        // As hyper's `Incoming` for an HTTP/2 request with a `Content-Length` and trailers:
        // after the last data frame, 0 bytes are left but the trailers are still to come.
        let mut body = BufferedBody::new(Pieces::new(&["ab", "cd"], Some(trailers()), true));
        let copy = body.try_clone_body().unwrap();
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(
            !body.is_end_stream(),
            "0 bytes left is not the end: over HTTP/2 the stream would end before the trailers"
        );
        assert!(!copy.can_replay(), "the trailers are not sent yet");
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers(), "the first send");
        assert!(body.is_end_stream());
        assert!(copy.can_replay());
        let replayed = copy.collect().await.unwrap();
        assert_eq!(replayed.trailers(), Some(&trailers()), "the replay");
        assert_eq!(replayed.to_bytes(), "abcd");

        // The same body collected, as an HTTP/2 client sends it.
        let body = BufferedBody::new(Pieces::new(&["ab", "cd"], Some(trailers()), true));
        let copy = body.try_clone_body().unwrap();
        let sent = body.collect().await.unwrap();
        assert_eq!(sent.trailers(), Some(&trailers()), "the first send");
        let replayed = copy.collect().await.unwrap();
        assert_eq!(replayed.trailers(), Some(&trailers()), "the replay");
    }

    #[tokio::test]
    async fn a_body_with_0_bytes_left_that_does_not_say_it_ended_is_polled_to_its_end() {
        let mut body = BufferedBody::new(Pieces::new(&["ab", "cd"], None, false));
        let copy = body.try_clone_body().unwrap();
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(!body.is_end_stream());
        assert!(!copy.can_replay(), "trailers could still come");
        assert!(body.frame().await.is_none());
        assert!(copy.can_replay(), "sent in full at its end");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn either_asks_its_side_whether_it_can_replay() {
        type Side = http_body_util::Either<BufferedBody<Stream>, http_body_util::Full<Bytes>>;
        let (mut tx, stream) = Stream::new(2);
        tx.try_send(Frame::data(Bytes::from_static(b"part")))
            .unwrap();
        let mut body: Side = http_body_util::Either::Left(BufferedBody::new(stream));
        let copy = body.try_clone_body().unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(!copy.can_replay(), "the streamed side was not sent in full");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(copy.can_replay());
        let full: Side = http_body_util::Either::Right(http_body_util::Full::new(Bytes::new()));
        assert!(full.try_clone_body().unwrap().can_replay());
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
        assert_eq!(record.sending.capacity(), 0, "what it kept is freed");
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
        for kind in Kind::BOTH {
            let seen = Seen::default();
            let client = over(&auth(Counter::default()), kind, api(seen.clone(), true));
            let response = client
                .oneshot(post(streamed(&["{\"n\":", "[1,2]}"], None)))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{kind:?}");
            let body = Bytes::from_static(b"{\"n\":[1,2]}");
            assert_eq!(
                *seen.lock().unwrap(),
                [
                    ("Bearer token-1".to_owned(), body.clone()),
                    ("Bearer token-2".to_owned(), body)
                ],
                "{kind:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_401_before_the_body_was_read_goes_back_to_the_caller() {
        for kind in Kind::BOTH {
            let seen = Seen::default();
            let auth = auth(Counter::default());
            let client = over(&auth, kind, api(seen.clone(), false));
            let response = client
                .clone()
                .oneshot(post(streamed(&["never read"], None)))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{kind:?}");
            assert_eq!(seen.lock().unwrap().len(), 1, "{kind:?}: sent once");
            let stats = auth.stats();
            assert_eq!(
                (stats.api_401s, stats.replays_after_401),
                (1, 0),
                "{kind:?}: the 401 went back to the caller"
            );
            // The refused token was still dropped: the next request carries a new one.
            client
                .oneshot(post(streamed(&["next"], None)))
                .await
                .unwrap();
            assert_eq!(seen.lock().unwrap()[1].0, "Bearer token-2", "{kind:?}");
        }
    }
}
