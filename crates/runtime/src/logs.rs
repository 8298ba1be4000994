//! Guest stdout/stderr capture. Guests never see the node's own stdio: every write lands, split
//! into lines, in a bounded in-memory ring per replica that `shoal logs [-f]` reads from, and,
//! for a replica the agent runs, in files on the node's disk ([`LogFiles`]): two of them,
//! rotated by size, so a replica's output survives a node restart within a bounded space.
//! Lines reach the files in batches from one flusher thread ([`FLUSH_EVERY`]), not by a write
//! per guest write on the request's thread.

use serde::{Deserialize, Serialize};
pub use shoal_core::logs::{LogLine, LogStream};
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Where a replica's output is kept on disk, and how much of it.
#[derive(Debug, Clone)]
pub struct LogFiles {
    /// The files are this path with `.log` (being written) and `.log.1` (the one before).
    pub base: PathBuf,
    /// The size past which `.log` becomes `.log.1` (replacing it) and a new one starts: a
    /// replica keeps at most about twice this on disk.
    pub file_bytes: u64,
}

impl LogFiles {
    fn current(&self) -> PathBuf {
        self.base.with_extension("log")
    }

    fn previous(&self) -> PathBuf {
        self.base.with_extension("log.1")
    }

    /// The lines kept in both files, oldest first. A line cut short by a crash, or otherwise
    /// unreadable, is skipped.
    fn read(&self) -> Vec<Stored> {
        let mut out = Vec::new();
        for path in [self.previous(), self.current()] {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
        out
    }
}

/// One line as kept on disk (JSON, one per line).
#[derive(Serialize, Deserialize)]
struct Stored {
    seq: usize,
    /// Milliseconds since the Unix epoch.
    time: u64,
    stream: LogStream,
    line: String,
}

impl Stored {
    fn into_line(self) -> LogLine {
        LogLine {
            time: UNIX_EPOCH + Duration::from_millis(self.time),
            stream: self.stream,
            line: self.line,
        }
    }
}

/// How long a line may wait in a journal's buffer before the flusher writes it: lines reach
/// the disk in batches, off the guest's thread, instead of one `write` per guest write on the
/// hot path. A node killed with SIGKILL loses at most this much of its replicas' output from
/// disk (the in-memory ring had it until then).
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Buffered bytes past which a journal writes at once, bounding each replica's buffer.
const FLUSH_BYTES: usize = 64 << 10;

/// The file being written, how much is in it, and the lines waiting to be written.
struct Journal {
    files: LogFiles,
    file: std::fs::File,
    written: u64,
    pending: Vec<u8>,
}

impl Journal {
    fn open(files: LogFiles) -> std::io::Result<Journal> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.current())?;
        let written = file.metadata()?.len();
        Ok(Journal {
            files,
            file,
            written,
            pending: Vec::new(),
        })
    }

    /// Appends `lines` (numbered from `first_seq`) to the buffer, starting a new file first
    /// if they would take the current one past its size. Whether the buffer was empty before
    /// and holds lines now, so the flusher must be told.
    fn append(&mut self, first_seq: usize, lines: &[LogLine]) -> std::io::Result<bool> {
        let was_empty = self.pending.is_empty();
        let mut text = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let stored = Stored {
                seq: first_seq + i,
                time: l.millis(),
                stream: l.stream,
                line: l.line.clone(),
            };
            serde_json::to_writer(&mut text, &stored)?;
            text.push(b'\n');
        }
        let held = self.written + self.pending.len() as u64;
        if held > 0 && held + text.len() as u64 > self.files.file_bytes {
            self.flush()?;
            std::fs::rename(self.files.current(), self.files.previous())?;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.files.current())?;
            self.written = 0;
        }
        self.pending.extend_from_slice(&text);
        if self.pending.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(was_empty && !self.pending.is_empty())
    }

    /// Writes the buffered lines to the file.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending)?;
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(file = %self.files.current().display(), error = %e, "a replica's last output was not kept on disk");
        }
    }
}

/// The node's one log flusher: a thread that writes the journals with buffered lines every
/// [`FLUSH_EVERY`], told of each when its buffer stops being empty, so idle replicas cost it
/// nothing.
struct Flusher {
    dirty: Mutex<Vec<std::sync::Weak<SinkInner>>>,
    wake: std::sync::Condvar,
}

impl Flusher {
    fn get() -> &'static Flusher {
        static FLUSHER: std::sync::OnceLock<&'static Flusher> = std::sync::OnceLock::new();
        FLUSHER.get_or_init(|| {
            let flusher: &'static Flusher = Box::leak(Box::new(Flusher {
                dirty: Mutex::new(Vec::new()),
                wake: std::sync::Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("shoal-logs".into())
                .spawn(move || flusher.run())
                .expect("start the log flusher thread");
            flusher
        })
    }

    fn mark(&self, sink: &Arc<SinkInner>) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(sink));
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            {
                let dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                let _dirty = self
                    .wake
                    .wait_while(dirty, |d| d.is_empty())
                    .unwrap_or_else(|p| p.into_inner());
            }
            // Lines that come meanwhile join this batch.
            std::thread::sleep(FLUSH_EVERY);
            let due = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
            for sink in due.iter().filter_map(std::sync::Weak::upgrade) {
                let mut state = sink.state.lock().unwrap_or_else(|p| p.into_inner());
                flush_journal(&mut state);
            }
        }
    }
}

/// How long after writing a replica's output failed (a full disk, no file descriptor left)
/// its files are opened again: until then its lines stay in memory only.
const REOPEN_AFTER: Duration = Duration::from_secs(5);

/// Writes `state`'s buffered lines; a journal that cannot be written is given up for now.
fn flush_journal(state: &mut SinkState) {
    if let Some(journal) = &mut state.journal
        && let Err(e) = journal.flush()
    {
        give_up(state, &e);
    }
}

/// Stops writing `state`'s journal after `e`, to try again in [`REOPEN_AFTER`].
fn give_up(state: &mut SinkState, e: &std::io::Error) {
    if let Some(journal) = state.journal.take() {
        tracing::warn!(
            file = %journal.files.current().display(),
            error = %e,
            "cannot keep a replica's output on disk; it stays in memory only for now"
        );
        state.reopen = Some((journal.files.clone(), std::time::Instant::now()));
    }
}

/// Opens `state`'s files again if writing them failed long enough ago.
fn reopen_journal(state: &mut SinkState) {
    let Some((files, failed)) = &mut state.reopen else {
        return;
    };
    if failed.elapsed() < REOPEN_AFTER {
        return;
    }
    match Journal::open(files.clone()) {
        Ok(journal) => {
            tracing::info!(file = %files.current().display(), "keeping a replica's output on disk again");
            state.journal = Some(journal);
            state.reopen = None;
        }
        Err(_) => *failed = std::time::Instant::now(),
    }
}

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
    /// Where lines also go on disk; `None` for a sink in memory only, or since writing failed.
    journal: Option<Journal>,
    /// Since writing failed: the files to open again, and when it failed (or last tried).
    reopen: Option<(LogFiles, std::time::Instant)>,
    /// The replica stopped: no line will come, and followers end.
    closed: bool,
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

    /// A sink that also keeps its lines in `files`, starting from what they hold: the last
    /// lines kept there fill the ring and the sequence numbers go on from theirs, so a
    /// replica's output and cursors survive a restart of its node.
    pub fn persistent(
        files: LogFiles,
        max_lines: usize,
        max_bytes: usize,
    ) -> std::io::Result<LogSink> {
        if let Some(dir) = files.base.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let kept = files.read();
        let journal = Journal::open(files)?;
        let sink = LogSink::with_limits(max_lines, max_bytes);
        {
            let mut state = sink.state();
            let next = kept.last().map_or(0, |s| s.seq + 1);
            let lines: Vec<LogLine> = kept.into_iter().map(Stored::into_line).collect();
            state.first_seq = next.saturating_sub(lines.len());
            sink.keep(&mut state, lines);
            state.journal = Some(journal);
        }
        Ok(sink)
    }

    /// Lines with a sequence number `>= since`, and the cursor to pass next time; the lines
    /// are consecutive and end just before that cursor. Lines the ring has dropped come from
    /// the sink's files, while they keep them; a cursor older than the oldest line kept
    /// anywhere starts at the oldest one.
    pub fn lines(&self, since: usize) -> (Vec<LogLine>, usize) {
        let mut state = self.state();
        let skip = since.saturating_sub(state.first_seq);
        let mut lines: Vec<LogLine> = state.lines.iter().skip(skip).cloned().collect();
        if since < state.first_seq {
            flush_journal(&mut state);
        }
        if since < state.first_seq
            && let Some(journal) = &state.journal
        {
            // Only the run that ends where the ring starts: the cursors stay consecutive.
            let mut expect = state.first_seq;
            let mut older: Vec<LogLine> = Vec::new();
            for stored in journal.files.read().into_iter().rev() {
                if stored.seq >= expect {
                    continue;
                }
                if stored.seq < since || stored.seq + 1 != expect {
                    break;
                }
                expect = stored.seq;
                older.push(stored.into_line());
            }
            older.reverse();
            lines.splice(0..0, older);
        }
        (lines, state.next_seq())
    }

    /// Says the replica stopped: followers ([`LogSink::wait_for`]) return and see no more.
    pub fn close(&self) {
        self.state().closed = true;
        self.inner.notify.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// The cursor the next line will get: `lines(next_cursor())` returns only future lines.
    pub fn next_cursor(&self) -> usize {
        self.state().next_seq()
    }

    /// Resolves once a line with sequence number `>= cursor` exists (at once if one already
    /// does), or the sink is closed. This is what `logs -f` awaits between polls of
    /// [`LogSink::lines`].
    pub async fn wait_for(&self, cursor: usize) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a push between the check and the await is not lost.
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.next_seq() > cursor || state.closed {
                    return;
                }
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

    /// Appends complete lines (to the files too), dropping the oldest past either limit, and
    /// wakes followers.
    fn push_lines(&self, stream: LogStream, lines: impl IntoIterator<Item = String>) {
        let time = SystemTime::now();
        let lines: Vec<LogLine> = lines
            .into_iter()
            .map(|line| LogLine { time, stream, line })
            .collect();
        if lines.is_empty() {
            return;
        }
        {
            let mut state = self.state();
            let next = state.next_seq();
            reopen_journal(&mut state);
            match state.journal.as_mut().map(|j| j.append(next, &lines)) {
                Some(Ok(true)) => Flusher::get().mark(&self.inner),
                Some(Err(e)) => give_up(&mut state, &e),
                Some(Ok(false)) | None => {}
            }
            self.keep(&mut state, lines);
        }
        self.inner.notify.notify_waiters();
    }

    /// Puts `lines` in the ring after the ones there, dropping the oldest past either limit.
    fn keep(&self, state: &mut SinkState, lines: Vec<LogLine>) {
        for line in lines {
            state.bytes += line.line.len() + LINE_OVERHEAD;
            state.lines.push_back(line);
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

    /// Once its files could not be written (here: their directory gone, as a rotation meets
    /// a full disk or no descriptor left), a sink keeps lines in memory, and a while later
    /// writes its files again.
    #[test]
    fn a_sink_whose_files_failed_writes_them_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles {
            base: dir.path().join("ns/app/replica-1"),
            file_bytes: 256,
        };
        let sink = LogSink::persistent(files.clone(), 100, usize::MAX).unwrap();
        std::fs::remove_dir_all(dir.path().join("ns")).unwrap();
        for i in 0..20 {
            sink.push_lines(LogStream::Stdout, [format!("line {i:03}")]);
        }
        assert!(sink.state().journal.is_none(), "the rotation failed");
        std::fs::create_dir_all(dir.path().join("ns/app")).unwrap();
        sink.push_lines(LogStream::Stdout, ["too soon".to_string()]);
        assert!(!files.current().exists(), "tried again at once");
        sink.state().reopen.as_mut().unwrap().1 -= REOPEN_AFTER;
        sink.push_lines(LogStream::Stdout, ["on disk again".to_string()]);
        drop(sink);
        let kept = std::fs::read_to_string(files.current()).unwrap();
        assert!(kept.contains("on disk again"), "{kept}");
    }

    #[test]
    fn a_persistent_sink_starts_from_its_files_and_keeps_two_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles {
            base: dir.path().join("ns/app/replica-1"),
            file_bytes: 4096,
        };
        let sink = LogSink::persistent(files.clone(), 10, usize::MAX).unwrap();
        for i in 0..200 {
            sink.push_lines(LogStream::Stdout, [format!("line {i:03}")]);
        }
        assert_eq!(sink.next_cursor(), 200);
        let on_disk = std::fs::metadata(files.current()).unwrap().len()
            + std::fs::metadata(files.previous()).unwrap().len();
        assert!(on_disk <= 2 * 4096, "{on_disk} bytes kept");
        // Older lines than the ring holds come from the files, consecutive up to the cursor.
        let (lines, next) = sink.lines(150);
        assert_eq!(next, 200);
        assert_eq!(lines.len(), 50);
        assert_eq!(lines[0].line, "line 150");
        assert_eq!(lines[49].line, "line 199");
        // Past what the files keep: from the oldest kept line on.
        let (all, _) = sink.lines(0);
        assert!(all.len() > 10 && all.len() < 200, "{}", all.len());
        assert_eq!(all.last().unwrap().line, "line 199");
        drop(sink);

        // A restart, after a crash cut the last line short: the sink goes on where it was.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(files.current())
            .unwrap();
        file.write_all(b"{\"seq\":200,\"ti").unwrap();
        let again = LogSink::persistent(files, 10, usize::MAX).unwrap();
        assert_eq!(again.next_cursor(), 200);
        let (lines, _) = again.lines(195);
        assert_eq!(
            texts(&lines),
            ["line 195", "line 196", "line 197", "line 198", "line 199"]
        );
        again.push_lines(LogStream::Stderr, ["after".to_string()]);
        assert_eq!(again.lines(200).0[0].line, "after");
    }

    #[tokio::test]
    async fn buffered_lines_reach_the_file_while_the_sink_lives_and_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles {
            base: dir.path().join("ns/app/replica-1"),
            file_bytes: 1 << 20,
        };
        let sink = LogSink::persistent(files.clone(), 10, usize::MAX).unwrap();
        let on_disk = || std::fs::read_to_string(files.current()).unwrap();
        sink.push_lines(LogStream::Stdout, ["buffered".to_string()]);
        // Written by the flusher, the sink still alive.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while !on_disk().contains("\"buffered\"") {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            tick.tick().await;
        }
        // A burst past the buffer's bound is written at once; the rest when the sink goes.
        let line = "x".repeat(1000);
        for _ in 0..(FLUSH_BYTES / 1000 + 1) {
            sink.push_lines(LogStream::Stdout, [line.clone()]);
        }
        assert!(on_disk().len() > FLUSH_BYTES);
        sink.push_lines(LogStream::Stderr, ["last".to_string()]);
        drop(sink);
        assert!(on_disk().ends_with("\"line\":\"last\"}\n"), "{}", on_disk());
    }

    #[tokio::test]
    async fn a_closed_sink_lets_its_followers_go() {
        let sink = LogSink::new(10);
        let waiter = tokio::spawn({
            let sink = sink.clone();
            async move { sink.wait_for(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        sink.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the follower went")
            .unwrap();
        assert!(sink.is_closed());
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
