//! How the control plane reads replicas' output without knowing where it is
//! kept. Output lives on the nodes, in per-replica rings (the runtime's
//! `LogSink`); in one process (`shoal up`) the agent hands the control plane
//! a [`LogReader`] per replica through [`LogSource`], which is what
//! `shoal logs` and `shoal logs -f` read.

use futures::future::BoxFuture;
pub use shoal_core::logs::{LogLine, LogStream};
use shoal_core::spec::AppKey;
use std::sync::Arc;

/// Where replica output lives: on the nodes. In one process the agent hands
/// its log buffers over directly.
pub trait LogSource: Send + Sync {
    /// The replicas of `app` this source runs, by id (sorted), each with its output.
    fn logs(&self, app: &AppKey) -> Vec<(String, Arc<dyn LogReader>)>;
}

/// One replica's output, read by cursor: every line has a sequence number, a
/// reader asks for `lines(cursor)` and gets back the cursor to use next time,
/// so a follower sees each line once even while old ones are dropped.
pub trait LogReader: Send + Sync {
    /// Lines with a sequence number `>= since` still kept, and the cursor to
    /// pass next time.
    fn lines(&self, since: usize) -> (Vec<LogLine>, usize);
    /// The cursor the next line will get.
    fn next_cursor(&self) -> usize;
    /// Resolves once a line with sequence number `>= cursor` exists (at once
    /// if one already does).
    fn wait_for(&self, cursor: usize) -> BoxFuture<'_, ()>;
}
