//! Request bodies from clients that may be slow. A request takes one of its replica's
//! `max_concurrency` permits for as long as its guest runs; a client trickling its body in
//! would hold that permit and, a few clients later, take the app offline (slowloris). So the
//! gateway first reads a body's beginning — all of a small one — and only then takes a
//! permit; the client must send that much within the body timeout, and every later piece
//! within the same time of the one before.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use http_body::{Body, Frame};
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
}
