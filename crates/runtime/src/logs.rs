//! Guest stdout/stderr capture. Guests never see the node's own stdio: every write lands, split
//! into lines, in a bounded in-memory ring per replica that `shoal logs [-f]` reads from.

pub use shoal_core::logs::{LogLine, LogStream};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Default byte budget of a [`LogSink`]: old lines are dropped past it even if the line count
/// allows more, so one chatty replica cannot eat the node's memory.
pub const DEFAULT_LOG_BYTES: usize = 1 << 20;

/// A line longer than this is cut and recorded in pieces, so a guest that never writes a
/// newline still shows up in the logs and cannot grow an unbounded buffer.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Rough per-line bookkeeping cost counted against the byte budget besides the text itself.
const LINE_OVERHEAD: usize = 48;

/// Prefix of lines the runtime writes itself (traps, timeouts), so they stand out from the
/// guest's own stderr.
const SYSTEM_PREFIX: &str = "[shoal] ";

/// A bounded ring of log lines shared by every instance of one replica. Clones share the ring.
///
/// Lines carry a monotonic sequence number: a reader asks for `lines(cursor)` and gets back the
/// cursor to use next time, so a follower sees each line once even while old ones are dropped.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    max_lines: usize,
    max_bytes: usize,
    state: Mutex<SinkState>,
    notify: Notify,
}

#[derive(Default)]
struct SinkState {
    lines: VecDeque<LogLine>,
    /// Sequence number of `lines[0]`.
    first_seq: usize,
    bytes: usize,
}

impl SinkState {
    fn next_seq(&self) -> usize {
        self.first_seq + self.lines.len()
    }
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("LogSink")
            .field("max_lines", &self.inner.max_lines)
            .field("max_bytes", &self.inner.max_bytes)
            .field("lines", &state.lines.len())
            .field("next_cursor", &state.next_seq())
            .finish()
    }
}

impl Default for LogSink {
    fn default() -> Self {
        LogSink::new(5000)
    }
}

impl LogSink {
    /// A sink keeping at most `capacity` lines and [`DEFAULT_LOG_BYTES`] bytes.
    pub fn new(capacity: usize) -> LogSink {
        LogSink::with_limits(capacity, DEFAULT_LOG_BYTES)
    }

    /// A sink keeping at most `max_lines` lines and about `max_bytes` bytes of text.
    pub fn with_limits(max_lines: usize, max_bytes: usize) -> LogSink {
        LogSink {
            inner: Arc::new(SinkInner {
                max_lines: max_lines.max(1),
                max_bytes: max_bytes.max(1),
                state: Mutex::new(SinkState::default()),
                notify: Notify::new(),
            }),
        }
    }

    /// Lines with a sequence number `>= since` still in the ring, and the cursor to pass next
    /// time. A cursor older than the oldest kept line just starts at the oldest one.
    pub fn lines(&self, since: usize) -> (Vec<LogLine>, usize) {
        let state = self.state();
        let skip = since.saturating_sub(state.first_seq);
        let lines = state.lines.iter().skip(skip).cloned().collect();
        (lines, state.next_seq())
    }

    /// The cursor the next line will get: `lines(next_cursor())` returns only future lines.
    pub fn next_cursor(&self) -> usize {
        self.state().next_seq()
    }

    /// Resolves once a line with sequence number `>= cursor` exists (at once if one already
    /// does). This is what `logs -f` awaits between polls of [`LogSink::lines`].
    pub async fn wait_for(&self, cursor: usize) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a push between the check and the await is not lost.
            notified.as_mut().enable();
            if self.next_cursor() > cursor {
                return;
            }
            notified.await;
        }
    }

    /// Records a line written by the runtime itself (a trap, a timeout), as stderr with a
    /// `[shoal] ` prefix.
    pub fn push_system(&self, text: impl AsRef<str>) {
        let lines = text
            .as_ref()
            .lines()
            .map(|l| format!("{SYSTEM_PREFIX}{l}"))
            .collect::<Vec<_>>();
        self.push_lines(LogStream::Stderr, lines);
    }

    /// Appends complete lines, dropping the oldest past either limit, and wakes followers.
    fn push_lines(&self, stream: LogStream, lines: impl IntoIterator<Item = String>) {
        let time = SystemTime::now();
        let mut pushed = false;
        {
            let mut state = self.state();
            for line in lines {
                state.bytes += line.len() + LINE_OVERHEAD;
                state.lines.push_back(LogLine { time, stream, line });
                pushed = true;
            }
            while state.lines.len() > self.inner.max_lines
                || (state.bytes > self.inner.max_bytes && state.lines.len() > 1)
            {
                if let Some(old) = state.lines.pop_front() {
                    state.bytes -= old.line.len() + LINE_OVERHEAD;
                    state.first_seq += 1;
                }
            }
        }
        if pushed {
            self.inner.notify.notify_waiters();
        }
    }

    fn state(&self) -> MutexGuard<'_, SinkState> {
        // A panic while holding the lock cannot leave the ring inconsistent in a way that
        // matters for logs, so keep serving it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stdout or stderr given to one store. Each store gets its own so a partial line of
    /// one request is not glued to output of another running concurrently.
    pub(crate) fn guest_output(&self, stream: LogStream) -> GuestOutput {
        GuestOutput(Arc::new(LineBuffer {
            sink: self.clone(),
            stream,
            pending: Mutex::new(Vec::new()),
        }))
    }
}

/// Splits a guest's byte stream into lines. Shared by all handles the guest opens on the same
/// stream of the same store; the partial last line is flushed when the store goes away.
struct LineBuffer {
    sink: LogSink,
    stream: LogStream,
    pending: Mutex<Vec<u8>>,
}

impl LineBuffer {
    fn write(&self, bytes: &[u8]) {
        let mut lines = Vec::new();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut rest = bytes;
            while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
                pending.extend_from_slice(&rest[..pos]);
                lines.push(take_line(&mut pending));
                rest = &rest[pos + 1..];
            }
            pending.extend_from_slice(rest);
            while pending.len() >= MAX_LINE_BYTES {
                let tail = pending.split_off(MAX_LINE_BYTES);
                lines.push(take_line(&mut pending));
                *pending = tail;
            }
        }
        if !lines.is_empty() {
            self.sink.push_lines(self.stream, lines);
        }
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        let pending = self.pending.get_mut().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            let line = take_line(pending);
            self.sink.push_lines(self.stream, [line]);
        }
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let line = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    line
}

/// Handle implementing WASI's stdout/stderr on top of a [`LogSink`]. Writes never block: the
/// ring drops old lines instead of pushing back on the guest.
#[derive(Clone)]
pub(crate) struct GuestOutput(Arc<LineBuffer>);

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    // Direct implementation: the default adapter would spawn a writer task per stream, which
    // is wasted work for an in-memory sink on every request.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// How much a guest may write in one call; the sink accepts anything, this only keeps single
/// host copies reasonable.
const WRITE_BUDGET: usize = 1 << 20;

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.0.write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    #[test]
    fn splits_lines_and_keeps_partial_until_drop() {
        let sink = LogSink::new(10);
        let out = sink.guest_output(LogStream::Stdout);
        out.0.write(b"one\ntw");
        out.0.write(b"o\r\nthr");
        let (lines, cursor) = sink.lines(0);
        assert_eq!(texts(&lines), ["one", "two"]);
        assert_eq!(cursor, 2);
        drop(out);
        let (lines, cursor) = sink.lines(cursor);
        assert_eq!(texts(&lines), ["thr"]);
        assert_eq!(cursor, 3);
    }

    #[test]
    fn drops_oldest_past_line_and_byte_limits() {
        let sink = LogSink::with_limits(3, usize::MAX);
        for i in 0..5 {
            sink.push_system(format!("l{i}"));
        }
        let (lines, cursor) = sink.lines(0);
        assert_eq!(texts(&lines), ["[shoal] l2", "[shoal] l3", "[shoal] l4"]);
        assert_eq!(cursor, 5);
        assert_eq!(texts(&sink.lines(4).0), ["[shoal] l4"]);

        let sink = LogSink::with_limits(1000, 3 * (LINE_OVERHEAD + 10));
        for i in 0..10 {
            sink.push_lines(LogStream::Stdout, [format!("{i:010}")]);
        }
        let (lines, _) = sink.lines(0);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].line, "0000000009");
    }

    #[test]
    fn cuts_overlong_lines() {
        let sink = LogSink::new(10);
        let out = sink.guest_output(LogStream::Stderr);
        out.0.write(&vec![b'x'; MAX_LINE_BYTES * 2 + 5]);
        let (lines, _) = sink.lines(0);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.line.len() == MAX_LINE_BYTES));
        assert!(lines.iter().all(|l| l.stream == LogStream::Stderr));
        drop(out);
        assert_eq!(sink.lines(2).0[0].line.len(), 5);
    }

    #[tokio::test]
    async fn wait_for_wakes_on_new_lines() {
        let sink = LogSink::new(10);
        sink.push_system("before");
        // A line at or past the cursor already exists: no waiting.
        sink.wait_for(0).await;

        let waiter = tokio::spawn({
            let sink = sink.clone();
            async move { sink.wait_for(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        sink.push_system("after");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke up")
            .expect("waiter did not panic");
    }
}
