//! Watches: replay from the event log, then live events, never missing or repeating one.
//!
//! The invariant is `next_revision`: every revision below it has been queued (or filtered out),
//! and nothing at or above it has. Live batches below it are skipped; a gap or a lagged
//! broadcast sends the watcher back to the log, which has every revision not yet compacted.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use tokio::sync::broadcast::{self, error::RecvError};

use crate::kv::{Batch, Inner};
use crate::{Event, StoreError, WatchStream};

/// Log entries read per replay step, bounding memory and time on the blocking pool.
const REPLAY_CHUNK: usize = 1024;

/// A stream of [`Event`]s for keys under a prefix, in revision order.
///
/// Created by [`crate::Store::watch`]. It does not keep the store open: once every
/// [`crate::Store`] clone is dropped, [`Watcher::next`] returns `None`.
pub struct Watcher {
    inner: Weak<Inner>,
    rx: broadcast::Receiver<Arc<Batch>>,
    prefix: Arc<str>,
    next_revision: u64,
    /// Whether the next events must come from the log rather than the broadcast.
    replaying: bool,
    pending: VecDeque<Event>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .field("next_revision", &self.next_revision)
            .field("replaying", &self.replaying)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    pub(crate) fn new(
        inner: Weak<Inner>,
        rx: broadcast::Receiver<Arc<Batch>>,
        prefix: &str,
        next_revision: u64,
        replaying: bool,
    ) -> Watcher {
        Watcher {
            inner,
            rx,
            prefix: prefix.into(),
            next_revision,
            replaying,
            pending: VecDeque::new(),
        }
    }

    /// The next event. `None` only once the store has been dropped.
    ///
    /// `Some(Err(Compacted))` means the history this watcher still needed was compacted while it
    /// was behind; it will keep returning that error, so re-list and watch again.
    ///
    /// Cancel-safe: dropping the future loses no event. Must run inside a tokio runtime
    /// (log replay runs on the blocking pool).
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.replaying {
                let inner = self.inner.upgrade()?;
                let prefix = Arc::clone(&self.prefix);
                let from = self.next_revision;
                let read = tokio::task::spawn_blocking(move || {
                    inner.read_log(&prefix, from, REPLAY_CHUNK)
                })
                .await;
                match read {
                    Ok(Ok(chunk)) => {
                        self.pending.extend(chunk.events);
                        self.next_revision = chunk.next_revision;
                        self.replaying = !chunk.caught_up;
                    }
                    Ok(Err(e)) => return Some(Err(e)),
                    Err(e) => {
                        return Some(Err(StoreError::Db(format!("watch log replay failed: {e}"))));
                    }
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(batch) if batch.revision < self.next_revision => {}
                Ok(batch) if batch.revision > self.next_revision => {
                    // A gap (after a lag): the log has what the broadcast dropped.
                    self.replaying = true;
                }
                Ok(batch) => {
                    self.next_revision = batch.revision + 1;
                    let prefix = &*self.prefix;
                    self.pending.extend(
                        batch
                            .events
                            .iter()
                            .filter(|e| e.kv.key.starts_with(prefix))
                            .cloned(),
                    );
                }
                Err(RecvError::Lagged(skipped)) => {
                    tracing::debug!(
                        skipped,
                        from = self.next_revision,
                        "watcher lagged, replaying log"
                    );
                    self.replaying = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl From<Watcher> for WatchStream {
    /// The backend-agnostic form of a redb watch, as [`crate::KvStore::watch`] returns it.
    fn from(watcher: Watcher) -> WatchStream {
        // The watcher lives inside the stream between polls, so an event a cancelled `next()`
        // was about to return is still there for the next one.
        WatchStream::new(futures::stream::unfold(watcher, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        }))
    }
}
