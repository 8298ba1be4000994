//! HTTP/2 streams a client has stopped reading. hyper asks a response body for its next
//! frame only once the client's flow-control window has room for it, so a client that sends
//! no window update holds that stream's answer (and its guest's output) forever, while its
//! socket still takes writes and it answers pings: the socket's send timeout never trips.
//! [`Stalls`] notes, per stream, since when hyper has not come back for the next frame, and
//! the connection is cut once one has waited the send timeout, as nginx's `send_timeout`
//! cuts a client that reads nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use shoal_runtime::ResponseBody;
use tokio::time::Instant;

type Error = <ResponseBody as Body>::Error;

/// The streams of one connection whose answers are watched.
pub(crate) struct Stalls {
    epoch: Instant,
    /// Since when (ms after `epoch`) each stream has waited for hyper to take its next
    /// frame; 0 while its body is being polled or has nothing to give.
    streams: Mutex<Vec<Weak<AtomicU64>>>,
    /// Told when the first stream is watched: till then nothing wakes to look (most
    /// connections are HTTP/1.1, and never have one).
    first: tokio::sync::Notify,
}

impl Stalls {
    pub(crate) fn new() -> Stalls {
        Stalls {
            epoch: Instant::now(),
            streams: Mutex::new(Vec::new()),
            first: tokio::sync::Notify::new(),
        }
    }

    /// `body`, watched from now: hyper has not asked for its first frame yet.
    pub(crate) fn watch(&self, body: ResponseBody) -> Watched {
        let since = Arc::new(AtomicU64::new(ms_since(self.epoch)));
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams.len() >= 64 {
            streams.retain(|s| s.strong_count() > 0);
        }
        streams.push(Arc::downgrade(&since));
        if streams.len() == 1 {
            self.first.notify_one();
        }
        drop(streams);
        Watched {
            inner: body,
            stall: Some((since, self.epoch)),
        }
    }

    /// Ends once a stream has waited `timeout` for hyper to take its next frame.
    pub(crate) async fn stalled(&self, timeout: Duration) {
        let every = (timeout / 4).max(Duration::from_millis(100));
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let none = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if none {
            // A watch between the look and this leaves a permit: no wake-up is missed.
            self.first.notified().await;
        }
        loop {
            tokio::time::sleep(every).await;
            let now = ms_since(self.epoch);
            let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let stalled = streams.iter().filter_map(Weak::upgrade).any(|since| {
                let since = since.load(Relaxed);
                since != 0 && now.saturating_sub(since) >= timeout
            });
            if stalled {
                return;
            }
        }
    }
}

/// Milliseconds since `epoch`, at least 1 (0 means "not waiting").
fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A response body, and, when watched, since when hyper has left it waiting.
pub(crate) struct Watched {
    inner: ResponseBody,
    stall: Option<(Arc<AtomicU64>, Instant)>,
}

impl Watched {
    /// A body no one watches: HTTP/1.1 (a client that reads nothing stops the socket's
    /// writes, which the send timeout cuts) and members' hops.
    pub(crate) fn plain(inner: ResponseBody) -> Watched {
        Watched { inner, stall: None }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some((since, _)) = &self.stall {
            since.store(0, Relaxed);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // A frame given: until hyper asks for the next one, the stream waits on the client.
        if let (Poll::Ready(Some(Ok(_))), Some((since, epoch))) = (&polled, &self.stall) {
            since.store(ms_since(*epoch), Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn body(text: &'static str) -> ResponseBody {
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    /// A stream waits on the client from when its answer is given until hyper asks for a
    /// frame, and again after each frame; not while its body has nothing to give.
    #[tokio::test(start_paused = true)]
    async fn a_stream_hyper_does_not_come_back_for_is_stalled() {
        let stalls = Stalls::new();
        let mut watched = stalls.watch(body("hello"));
        let timeout = Duration::from_secs(4);
        // Polled at once, to its end: nothing waits.
        let frame = watched.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(watched.frame().await.is_none());
        let quiet = tokio::time::timeout(Duration::from_secs(10), stalls.stalled(timeout));
        assert!(quiet.await.is_err(), "a stream read to its end is no stall");
        // Never asked for its first frame.
        let _left = stalls.watch(body("unread"));
        tokio::time::timeout(Duration::from_secs(10), stalls.stalled(timeout))
            .await
            .expect("the unread stream is a stall");
    }
}
