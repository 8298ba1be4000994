//! Request bodies from clients that may be slow. A request takes one of its replica's
//! `max_concurrency` permits for as long as its guest runs; a client trickling its body in
//! would hold that permit and, a few clients later, take the app offline (slowloris). So the
//! gateway first reads a body's beginning — all of a small one — and only then takes a
//! permit; the client must send that much within the body timeout, and every later piece
//! within the same time of the one before.
//!
//! Response bodies a guest has already finished are sent with their length ([`settle`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use shoal_runtime::{HttpError, WasiBody};
use tokio::time::{Instant, Sleep};

/// Bytes of a body read before the request takes a permit: all of most bodies (forms, JSON),
/// and enough of an upload to show its client is sending.
pub(crate) const READ_AHEAD: usize = 64 << 10;

/// Why a body's beginning did not arrive.
#[derive(Debug)]
pub(crate) enum ReadAheadError {
    /// Not within the body timeout.
    TimedOut,
    /// The client's connection failed.
    Broken(HttpError),
}

/// Reads `body` up to [`READ_AHEAD`] bytes or its end, within `timeout`; gives back a body
/// that yields what was read and then the rest, each later piece due within `timeout` of the
/// one before.
pub(crate) async fn read_ahead(
    body: WasiBody,
    timeout: Duration,
) -> Result<WasiBody, ReadAheadError> {
    if body.is_end_stream() {
        return Ok(body);
    }
    let mut rest = BodyStream::new(body);
    let mut read = Vec::new();
    let mut bytes = 0;
    let deadline = Instant::now() + timeout;
    let mut ended = false;
    while bytes < READ_AHEAD {
        match tokio::time::timeout_at(deadline, rest.next()).await {
            Err(_) => return Err(ReadAheadError::TimedOut),
            Ok(None) => {
                ended = true;
                break;
            }
            Ok(Some(Err(e))) => return Err(ReadAheadError::Broken(e)),
            Ok(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, Bytes::len);
                read.push(Ok(frame));
            }
        }
    }
    let read = stream::iter(read);
    if ended {
        return Ok(StreamBody::new(read).boxed_unsync());
    }
    let rest = Paced {
        inner: rest,
        every: timeout,
        due: Box::pin(tokio::time::sleep(timeout)),
        waiting: false,
    };
    Ok(StreamBody::new(read.chain(rest)).boxed_unsync())
}

/// The rest of a body, each piece due within `every` from when the guest asked for it: time
/// the guest spends before asking is not the client's.
struct Paced<S> {
    inner: S,
    every: Duration,
    due: Pin<Box<Sleep>>,
    /// Whether the guest is waiting for a piece (since `due - every`).
    waiting: bool,
}

impl<S> Stream for Paced<S>
where
    S: Stream<Item = Result<Frame<Bytes>, HttpError>> + Unpin,
{
    type Item = Result<Frame<Bytes>, HttpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                self.waiting = false;
                Poll::Ready(item)
            }
            Poll::Pending => {
                if !self.waiting {
                    self.waiting = true;
                    let due = Instant::now() + self.every;
                    self.due.as_mut().reset(due);
                }
                match self.due.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Bytes of a response body [`settle`] takes at most: a guest that writes as fast as it is
/// read must not keep its head from going out.
const SETTLE_MAX: usize = 64 << 10;

/// Takes the frames of a guest's response body that are there already, without waiting for
/// more, up to [`SETTLE_MAX`] bytes. A body found complete comes back with its exact length, so hyper sends a
/// `content-length` and the whole answer in one write, instead of chunks and a last write
/// for their end: on a hop that is one segment fewer each way, and the forwarding gateway,
/// reading a length, ends its own answer with the last byte rather than on a second
/// wake-up. Otherwise the frames taken come first, then the rest as it comes.
pub(crate) async fn settle<B>(mut body: B) -> Settled<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut taken = VecDeque::new();
    let mut length_unknown = false;
    let mut ended = false;
    let mut bytes = 0;
    while bytes < SETTLE_MAX && !body.is_end_stream() {
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match next {
            // Nothing more yet: the guest is still writing.
            None => break,
            Some(None) => {
                ended = true;
                break;
            }
            Some(Some(Ok(frame))) => {
                // Trailers cannot follow a length over HTTP/1.1; the body stays chunked.
                let data = frame.is_data();
                length_unknown |= !data;
                bytes += frame.data_ref().map_or(0, Bytes::len);
                taken.push_back(Ok(frame));
                if !data {
                    break;
                }
            }
            // A length would let the bytes before the error pass for the whole answer.
            Some(Some(Err(e))) => {
                length_unknown = true;
                taken.push_back(Err(e));
                break;
            }
        }
    }
    // A body that says it is done after its last frame is dropped as well as one that said
    // so with `None`; after trailers or an error it is kept, so the length stays unknown.
    ended |= body.is_end_stream() && !length_unknown;
    Settled {
        taken,
        rest: (!ended).then_some(body),
        length_unknown,
    }
}

/// A body some of whose frames were read already ([`settle`], a request's peek): those,
/// then the rest if it had not ended.
pub(crate) struct Settled<B: Body> {
    taken: VecDeque<Result<Frame<Bytes>, B::Error>>,
    rest: Option<B>,
    /// Trailers or an error were taken: the length must stay unknown.
    length_unknown: bool,
}

impl<B> Settled<B>
where
    B: Body<Data = Bytes>,
{
    /// `rest` after its first frame, `first`, already read (a peek).
    pub(crate) fn prepend(first: Result<Frame<Bytes>, B::Error>, rest: B) -> Settled<B> {
        let length_unknown = !first.as_ref().is_ok_and(Frame::is_data);
        Settled {
            taken: VecDeque::from([first]),
            rest: Some(rest),
            length_unknown,
        }
    }
}

// Nothing in it is pinned in place: the frames taken are moved out, the rest is `Unpin`.
impl<B: Body + Unpin> Unpin for Settled<B> {}

impl<B> Settled<B>
where
    B: Body<Data = Bytes>,
{
    fn taken_bytes(&self) -> u64 {
        let data = self
            .taken
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref());
        data.map(|d| d.len() as u64).sum()
    }
}

impl<B> Body for Settled<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.taken.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.taken.is_empty() && self.rest.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let taken = self.taken_bytes();
        match &self.rest {
            None if !self.length_unknown => SizeHint::with_exact(taken),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(taken);
                hint
            }
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + taken);
                if let Some(upper) = rest.upper().filter(|_| !self.length_unknown) {
                    hint.set_upper(upper + taken);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::SinkExt;

    fn channel_body() -> (
        futures::channel::mpsc::Sender<Result<Frame<Bytes>, HttpError>>,
        WasiBody,
    ) {
        let (tx, rx) = futures::channel::mpsc::channel(16);
        (tx, StreamBody::new(rx).boxed_unsync())
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_body_is_read_whole_and_a_silent_one_times_out() {
        let (mut tx, body) = channel_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        drop(tx);
        let body = read_ahead(body, Duration::from_secs(10)).await.unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");

        let (mut tx, body) = channel_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"he"))))
            .await
            .unwrap();
        let result = read_ahead(body, Duration::from_secs(10)).await;
        assert!(
            matches!(result, Err(ReadAheadError::TimedOut)),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_read_ahead_every_piece_is_due_within_the_timeout() {
        let (mut tx, body) = channel_body();
        tx.send(Ok(Frame::data(Bytes::from(vec![0; READ_AHEAD]))))
            .await
            .unwrap();
        let mut body = read_ahead(body, Duration::from_secs(10)).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().len(), READ_AHEAD);
        // Time before the guest asks is not the client's; a piece 9 s after it asked is in
        // time; then nothing for 10 s is not.
        tokio::time::advance(Duration::from_secs(60)).await;
        let sender = tokio::spawn(async move {
            tokio::time::advance(Duration::from_secs(9)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
                .await
                .unwrap();
            tx
        });
        assert_eq!(
            body.frame().await.unwrap().unwrap().data_ref().unwrap(),
            "more"
        );
        let _tx = sender.await.unwrap();
        let late = body.frame().await.unwrap();
        assert!(
            matches!(late, Err(HttpError::ConnectionReadTimeout)),
            "{late:?}"
        );
    }

    async fn frames(mut body: impl Body<Data = Bytes, Error = HttpError> + Unpin) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            seen.push(match frame {
                Ok(frame) if frame.is_data() => {
                    String::from_utf8_lossy(frame.data_ref().unwrap()).into_owned()
                }
                Ok(frame) => format!("trailers {:?}", frame.trailers_ref().unwrap()),
                Err(e) => format!("error {e:?}"),
            });
        }
        seen
    }

    #[tokio::test]
    async fn a_finished_body_comes_back_with_its_length() {
        let (mut tx, body) = channel_body();
        for piece in ["hel", "lo"] {
            tx.send(Ok(Frame::data(Bytes::from_static(piece.as_bytes()))))
                .await
                .unwrap();
        }
        drop(tx);
        let body = settle(body).await;
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(frames(body).await, ["hel", "lo"]);
    }

    #[tokio::test]
    async fn a_body_still_being_written_streams_on_after_what_was_there() {
        let (mut tx, body) = channel_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        let body = settle(body).await;
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .await
            .unwrap();
        tx.send(Err(HttpError::ConnectionReadTimeout))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(
            frames(body).await,
            ["a", "b", "error ConnectionReadTimeout"]
        );
    }

    #[tokio::test]
    async fn trailers_keep_the_length_unknown() {
        let (mut tx, body) = channel_body();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        let body = settle(body).await;
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(frames(body).await, ["a", r#"trailers {"x-sum": "1"}"#]);
    }

    /// A body of frames all there, that says when it is done and what is left of it.
    struct Scripted(VecDeque<Result<Frame<Bytes>, HttpError>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = HttpError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
            Poll::Ready(self.0.pop_front())
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            let data = self.0.iter().filter_map(|f| f.as_ref().ok()?.data_ref());
            SizeHint::with_exact(data.map(|d| d.len() as u64).sum())
        }
    }

    #[tokio::test]
    async fn an_error_keeps_the_length_unknown() {
        let body = Scripted(VecDeque::from([
            Ok(Frame::data(Bytes::from_static(b"part"))),
            Err(HttpError::ConnectionReadTimeout),
        ]));
        let body = settle(body).await;
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(frames(body).await, ["part", "error ConnectionReadTimeout"]);
    }

    #[tokio::test]
    async fn no_more_than_the_cap_is_taken_before_the_head_goes() {
        let (mut tx, body) = channel_body();
        for _ in 0..3 {
            tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; SETTLE_MAX / 2]))))
                .await
                .unwrap();
        }
        drop(tx);
        let body = settle(body).await;
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), SETTLE_MAX as u64);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 3 * SETTLE_MAX / 2);
    }
}
