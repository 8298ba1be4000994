//! The store as a trait, so a backend other than redb (etcd) can replace [`crate::Store`]
//! without touching its callers.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::{Event, KeyValue, StoreError, Txn, TxnResponse};

/// An etcd-shaped key-value store: what the control plane keeps cluster state in.
///
/// Object safe: callers hold an `Arc<dyn KvStore>`. [`crate::Store`] (redb) is the one
/// backend today; an etcd backend maps each method onto the etcd call of the same name.
/// Writes go through [`KvStore::txn`] only, so every write a caller makes can be guarded.
///
/// # Contract
///
/// Every backend keeps etcd's semantics, which the callers (and `tests/kv_store.rs`) rely on:
///
/// - **One revision per write transaction.** There is one cluster-wide revision, 0 for an empty
///   store. A [`Txn`] whose executed branch writes anything bumps it by exactly one, and all its
///   writes carry that revision and become visible atomically. A transaction that writes
///   nothing (no ops, or only deletes of absent keys) creates no revision; its
///   [`TxnResponse::revision`] is then the current one. Once `txn` returns `Ok`, the write is
///   durable. Concurrent transactions take effect one at a time in revision order, even when
///   a backend makes several durable with one commit (redb's group commit).
/// - **Per-key bookkeeping.** [`KeyValue::mod_revision`] is the revision of the last write to
///   the key; [`KeyValue::create_revision`] the revision of the put that created it (since its
///   last delete); [`KeyValue::version`] counts puts since then (1 after the first). A deleted
///   and re-created key starts over.
/// - **Compare-and-swap.** Every [`crate::Compare`] of a `Txn` is checked against the state
///   just before the transaction, atomically with its writes: `ModRevision` against the key's
///   `mod_revision` and `Version` against its `version`, where 0 means "the key is absent". If
///   all hold, `success` runs and `succeeded` is true, else `failure` runs. Empty keys in
///   compares or ops fail the whole transaction with [`StoreError::EmptyKey`].
/// - **Reads.** [`KvStore::get`] and [`KvStore::range`] see committed writes only.
///   `range(prefix)` returns the keys under `prefix` sorted by key together with the revision
///   of that same snapshot, so `watch(prefix, revision + 1)` continues exactly after it.
/// - **Watch: replay, then live, with no gap and no repeat.** `watch(prefix, from)` yields every
///   event with revision >= `from` for keys under `prefix`, in revision order (events of one
///   revision in the order the transaction wrote them), first from history and then live as
///   writes commit, without missing or repeating one, however far behind the consumer falls.
///   `from == 0` means "changes after now". A delete event has an empty value,
///   `create_revision` and `version` 0, and `mod_revision` = the delete's revision;
///   [`Event::prev_value`] is the value before the change, if the key existed.
/// - **Compaction.** [`KvStore::compact`] drops history up to and including `revision` but
///   keeps every current key; compacting at or below the current point is a no-op and beyond
///   the current revision fails with [`StoreError::FutureRevision`]. Watching from a revision
///   at or below [`KvStore::compacted_revision`] fails with [`StoreError::Compacted`] — from
///   `watch` itself, or from the stream if the history it still needed is compacted while it
///   is behind (it then yields that error rather than skip events): re-list and watch again.
///
/// # Blocking
/// Every method but the returned stream is synchronous and may block on I/O (redb fsyncs each
/// commit, which concurrent writes share; a network backend waits for its server), so async
/// code calls them from `spawn_blocking`. A [`WatchStream`] is polled from async code inside a tokio runtime.
pub trait KvStore: Send + Sync + 'static {
    /// The current cluster-wide revision (0 for an empty store).
    fn revision(&self) -> u64;

    /// The revision up to which history has been compacted (0 if never).
    fn compacted_revision(&self) -> u64;

    /// The key, if it exists.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// All keys starting with `prefix`, sorted by key, and the revision they were read at.
    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError>;

    /// Runs a compare-and-swap transaction atomically; all its writes share one new revision.
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Runs `txns` as [`KvStore::txn`] would run each one after another (its compares seeing
    /// the ones before), answering each in the order given: for a writer with many independent
    /// transactions at once, such as a controller pass. A backend that can commits them
    /// together (redb: once, each at its own revision; etcd: those that share no key as one
    /// transaction, so their writes share a revision); the default runs them one by one.
    fn txns(&self, txns: Vec<Txn>) -> Vec<Result<TxnResponse, StoreError>> {
        txns.into_iter().map(|t| self.txn(t)).collect()
    }

    /// Events for keys under `prefix` from revision `from_revision` on (0 = after now): history
    /// first, then live. Fails with [`StoreError::Compacted`] if that history is gone.
    fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError>;

    /// Drops history up to and including `revision`; current keys are kept.
    fn compact(&self, revision: u64) -> Result<(), StoreError>;

    /// Has `observer` told how long each durable commit takes (redb's: the durable write, its
    /// fsync; one per group commit, however many transactions share it, and one per step of a
    /// compaction), for the control
    /// plane's metrics; replaces any observer before it. A backend with no such step to time
    /// ignores it.
    fn observe_commits(&self, _observer: CommitObserver) {}

    /// Which store this is, fixed when it was made (redb: drawn at random, so a copy of the
    /// file is the same store; etcd: its cluster's id): a client resuming a watch can tell a
    /// store that replaced the one it read. 0: not known.
    fn id(&self) -> u64 {
        0
    }

    /// Why the last commit failed, if it did and none has succeeded since: for a health check
    /// (redb cannot write again after a failed write to its file, a full disk say, until it
    /// is opened again). A backend whose failures pass by itself says nothing.
    fn write_failure(&self) -> Option<String> {
        None
    }

    /// Whether the store answers now, asked quickly (about a second at most), for a health
    /// check: a shared store may lose its quorum while this server is fine. A local file
    /// always answers.
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Told how long one commit took; called on the writer's thread, so it should be quick.
pub type CommitObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// The events of a [`KvStore::watch`], whatever the backend: a boxed stream of
/// `Result<Event, StoreError>`.
///
/// Use [`WatchStream::next`] (no trait import needed) or any [`Stream`] combinator. It ends
/// (`None`) only when the store behind it is gone; an `Err` is final in practice (watch
/// again). Cancel-safe: dropping a `next()` future loses no event.
pub struct WatchStream {
    inner: BoxStream<'static, Result<Event, StoreError>>,
}

impl WatchStream {
    /// Wraps a backend's event stream.
    pub fn new(stream: impl Stream<Item = Result<Event, StoreError>> + Send + 'static) -> Self {
        WatchStream {
            inner: stream.boxed(),
        }
    }

    /// The next event; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        StreamExt::next(&mut self.inner).await
    }
}

impl Stream for WatchStream {
    type Item = Result<Event, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}
