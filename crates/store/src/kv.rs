//! The revisioned key-value store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use redb::{Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable};
use tokio::sync::broadcast;

use crate::tables::{
    FORMAT, KV, KV_MOVED, KvRow, LOG, LogRow, META, META_COMPACTED, META_FORMAT, META_ID,
    META_REVISION,
};
use crate::watch::Watcher;
use crate::{
    CommitObserver, Compare, Event, EventKind, KeyValue, KvStore, Op, StoreError, Txn, TxnResponse,
    WatchStream,
};

/// A row of [`LOG`]: (revision, index within the revision).
type RowId = (u64, u32);

/// Revisions one step of [`Store::compact`] drops.
const COMPACT_STEP: u64 = 10_000;

/// Tuning knobs for [`Store::open_with`]; [`Store::open`] uses the defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// redb page cache in bytes. redb's own default (1 GiB) is far more than cluster state needs.
    pub cache_size: usize,
    /// Revisions buffered for live watchers. A watcher that falls further behind is not failed:
    /// it catches up from the on-disk log.
    pub watch_capacity: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            cache_size: 64 << 20,
            watch_capacity: 1024,
        }
    }
}

/// The cluster state: an etcd-shaped key-value store in one redb file.
///
/// Cheap to clone; all clones share the database. Methods block on disk I/O (each acknowledged
/// write is fsync'd), so call them from `spawn_blocking` or `block_in_place` in async code.
///
/// # Group commit
/// An fsync costs about a millisecond whatever it carries, so concurrent writers share one.
/// Each [`Store::txn`] is queued; if no commit is running its caller commits at once (a lone
/// writer waits for nothing), otherwise it waits. The caller that finishes a commit hands the
/// turn to the first transaction queued meanwhile, whose caller takes everything queued and runs
/// it in order in one redb write transaction: each transaction still gets its own revision and
/// its compares see the transactions before it, so the outcome is the one running them one by
/// one would have given. One durable commit then answers them all, and their events go out in
/// revision order. If that commit fails, every transaction of the batch fails, none of it is
/// published or counted in [`Store::revision`], and redb refuses further writes until the file
/// is reopened (whether a failed fsync's data reached the disk is unknown).
///
/// # Layout
/// The file is an event log (see [`crate::tables`], format 2): a commit appends its rows at
/// the log's end, a few pages, where a table of current keys would rewrite a leaf (and its
/// branches) wherever each key falls. The current keys are an index in memory, built from the
/// log at open and changed after each durable commit, so reads take no redb transaction and
/// see only what is durable. Compaction keeps, below its point, the row of each key still
/// present.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// All writes of one revision, as published to live watchers.
pub(crate) struct Batch {
    pub(crate) revision: u64,
    pub(crate) events: Vec<Event>,
}

/// A slice of the event log read for a watcher.
pub(crate) struct LogChunk {
    /// Events matching the watcher's prefix, in revision order.
    pub(crate) events: Vec<Event>,
    /// The first revision not covered by this chunk.
    pub(crate) next_revision: u64,
    /// Whether the chunk reached the end of the log as of its snapshot.
    pub(crate) caught_up: bool,
}

pub(crate) struct Inner {
    db: Database,
    /// Held by whoever writes to redb (a batch's committer, `compact`) through publication, so
    /// live events go out in revision order. It holds the log rows at or below the compaction
    /// point that no key holds any more, for the next compaction to remove.
    write_lock: parking_lot::Mutex<Vec<RowId>>,
    /// The current keys, as of the last durable commit.
    index: RwLock<Index>,
    /// Transactions waiting for the next group commit.
    queue: Mutex<Queue>,
    /// Mirrors of the meta table, updated after each commit, for lock-free reads.
    revision: AtomicU64,
    compacted: AtomicU64,
    pub(crate) events: broadcast::Sender<Arc<Batch>>,
    /// Told how long each durable (group) commit took.
    commits: RwLock<Option<CommitObserver>>,
    /// Why the last commit failed, until one succeeds: [`KvStore::write_failure`].
    failure: Mutex<Option<String>>,
    /// [`KvStore::id`].
    id: u64,
}

/// A store file opened to be read and never written, as `shoal server migrate` copies it:
/// nothing on disk changes, and it is refused with [`StoreError::InUse`] while a process has
/// the file open as a [`Store`].
pub struct ReadOnlyStore {
    db: Readable,
}

enum Readable {
    /// The file itself.
    File(ReadOnlyDatabase),
    /// A repaired copy of a file its last writer did not close (a killed server): redb
    /// repairs only what it opens for writing, so that is done on a copy, never the file.
    Repaired {
        db: Database,
        _dir: tempfile::TempDir,
    },
}

/// The current keys, from the log: what a [`Store`] reads.
#[derive(Default)]
struct Index {
    keys: BTreeMap<String, Entry>,
    /// The revision they are at.
    revision: u64,
}

/// A key present, and where its row is in the log.
#[derive(Clone)]
struct Entry {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    /// Its row's index within `mod_revision`.
    index: u32,
    value: Vec<u8>,
}

impl Entry {
    fn key_value(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }

    fn row(&self) -> RowId {
        (self.mod_revision, self.index)
    }
}

impl Index {
    /// The keys as the log says, and the rows at or below `compacted` that none of them holds
    /// (left by a compaction before the last write of their key: the next one removes them).
    fn load(
        log: &impl ReadableTable<RowId, LogRow<'static>>,
        compacted: u64,
    ) -> Result<(BTreeMap<String, Entry>, Vec<RowId>), StoreError> {
        let mut keys: BTreeMap<String, Entry> = BTreeMap::new();
        let mut stale = Vec::new();
        for item in log.iter()? {
            let (id, row) = item?;
            let (revision, index) = id.value();
            let (key, deleted, create_revision, version, value, _) = row.value();
            // A deletion's own row never outlives a compaction that reaches it.
            let replaced = if deleted {
                keys.remove(key)
            } else {
                let entry = Entry {
                    create_revision,
                    mod_revision: revision,
                    version,
                    index,
                    value: value.to_vec(),
                };
                keys.insert(key.to_owned(), entry)
            };
            if let Some(old) = replaced.filter(|old| old.mod_revision <= compacted) {
                stale.push(old.row());
            }
        }
        Ok((keys, stale))
    }

    fn range(&self, prefix: &str) -> impl Iterator<Item = (&String, &Entry)> {
        self.keys
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix))
    }
}

/// The keys as a batch being written sees them: the index, under the batch's own writes so far.
struct Staged<'a> {
    index: &'a Index,
    /// Keys written by the batch: `None` if deleted.
    changed: HashMap<String, Option<Entry>>,
    /// Rows at or below the compaction point the batch leaves no key holding.
    stale: Vec<RowId>,
    compacted: u64,
}

impl Staged<'_> {
    fn get(&self, key: &str) -> Option<&Entry> {
        match self.changed.get(key) {
            Some(written) => written.as_ref(),
            None => self.index.keys.get(key),
        }
    }

    /// Sets `key` (or deletes it) and returns what it held.
    fn set(&mut self, key: &str, to: Option<Entry>) -> Option<Entry> {
        let old = self.get(key).cloned();
        if let Some(old) = old.as_ref().filter(|o| o.mod_revision <= self.compacted) {
            self.stale.push(old.row());
        }
        self.changed.insert(key.to_owned(), to);
        old
    }

    /// The keys present under `prefix`, sorted.
    fn keys_under(&self, prefix: &str) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self
            .index
            .range(prefix)
            .filter(|(key, _)| !self.changed.contains_key(key.as_str()))
            .map(|(key, _)| key.clone())
            .collect();
        keys.extend(
            self.changed
                .iter()
                .filter(|(key, entry)| entry.is_some() && key.starts_with(prefix))
                .map(|(key, _)| key.clone()),
        );
        keys
    }
}

impl ReadOnlyStore {
    /// Opens the existing store file at `path`; one that needs a repair is copied into a
    /// temporary directory and read from there.
    pub fn open(path: &Path) -> Result<ReadOnlyStore, StoreError> {
        match ReadOnlyDatabase::open(path) {
            Ok(db) => Ok(ReadOnlyStore {
                db: Readable::File(db),
            }),
            Err(redb::DatabaseError::RepairAborted) => {
                let dir = tempfile::tempdir()?;
                let copy = dir.path().join("state.redb");
                std::fs::copy(path, &copy)?;
                // A server that opened the file during the copy has it now, or has repaired
                // it: refuse the first, and read the file itself in the second case.
                match ReadOnlyDatabase::open(path) {
                    Ok(db) => {
                        return Ok(ReadOnlyStore {
                            db: Readable::File(db),
                        });
                    }
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse),
                    Err(_) => {}
                }
                tracing::info!(path = %path.display(), "the store was not closed cleanly: reading a repaired copy");
                let db = Database::create(&copy)?;
                Ok(ReadOnlyStore {
                    db: Readable::Repaired { db, _dir: dir },
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// All keys starting with `prefix`, sorted by key, and the revision of that snapshot.
    pub fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let rtx = match &self.db {
            Readable::File(db) => db.begin_read()?,
            Readable::Repaired { db, .. } => db.begin_read()?,
        };
        let meta = rtx.open_table(META)?;
        let revision = meta_get(&meta, META_REVISION)?;
        if meta_get(&meta, META_FORMAT)? < 2 {
            return Ok((range_v1(&rtx, prefix)?, revision));
        }
        let compacted = meta_get(&meta, META_COMPACTED)?;
        let (keys, _) = Index::load(&rtx.open_table(LOG)?, compacted)?;
        let index = Index { keys, revision };
        let kvs = index
            .range(prefix)
            .map(|(key, entry)| entry.key_value(key))
            .collect();
        Ok((kvs, revision))
    }
}

impl Store {
    /// Opens (or creates) the store file at `path` with default options.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store file at `path`. A damaged file is an error, even where
    /// redb's repair of it would panic (a file cut short: an allocator assertion).
    ///
    /// Commits do not use redb's quick repair: it costs a second fsync and an allocator
    /// write per commit (a lone commit took 1.6× as long). The price is a full repair, a walk
    /// of every page, when opening a file a killed server left; its progress is logged so a
    /// slow start says why.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let open = || {
            let shown = path.display().to_string();
            let logged = std::cell::Cell::new(-1i32);
            let db = redb::Builder::new()
                .set_cache_size(options.cache_size)
                .set_repair_callback(move |session| {
                    let tenth = (session.progress() * 10.0) as i32;
                    if tenth > logged.get() {
                        logged.set(tenth);
                        tracing::warn!(
                            path = %shown,
                            percent = tenth * 10,
                            "the store was not closed cleanly: repairing it"
                        );
                    }
                })
                .create(path)?;
            tracing::debug!(path = %path.display(), "opening store");
            Store::from_db(db, options)
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(StoreError::Db(format!(
                "the store file {} is damaged and cannot be repaired ({why}): restore it from a backup",
                path.display()
            )))
        })
    }

    /// The store in `db`, as [`Store::open_with`] opened it (tests hand it other backends).
    fn from_db(db: Database, options: StoreOptions) -> Result<Store, StoreError> {
        // Create every table up front: read transactions fail on tables that don't exist yet.
        let wtx = db.begin_write()?;
        let (revision, compacted, id, keys, stale) = {
            let mut log = wtx.open_table(LOG)?;
            let mut meta = wtx.open_table(META)?;
            let mut id = meta_get(&meta, META_ID)?;
            if id == 0 {
                id = random_id();
                meta.insert(META_ID, id)?;
            }
            let revision = meta_get(&meta, META_REVISION)?;
            let compacted = meta_get(&meta, META_COMPACTED)?;
            match meta_get(&meta, META_FORMAT)? {
                FORMAT => {}
                0 | 1 => {
                    let moved = migrate_v1(&wtx, &mut log, compacted)?;
                    wtx.open_table(KV_MOVED)?;
                    meta.insert(META_FORMAT, FORMAT)?;
                    if revision > 0 {
                        tracing::info!(
                            keys = moved,
                            "moved the store's keys into its log (format 2)"
                        );
                    }
                }
                newer => {
                    return Err(StoreError::Db(format!(
                        "the store file has format {newer}, written by a newer shoal: this one reads up to format {FORMAT}; run the release that wrote it, or a later one"
                    )));
                }
            }
            let (keys, stale) = Index::load(&log, compacted)?;
            (revision, compacted, id, keys, stale)
        };
        wtx.commit()?;
        tracing::debug!(revision, compacted, keys = keys.len(), "opened store");
        let (events, _) = broadcast::channel(options.watch_capacity.max(1));
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                write_lock: parking_lot::Mutex::new(stale),
                index: RwLock::new(Index { keys, revision }),
                queue: Mutex::new(Queue::default()),
                revision: AtomicU64::new(revision),
                compacted: AtomicU64::new(compacted),
                events,
                commits: RwLock::new(None),
                failure: Mutex::new(None),
                id,
            }),
        })
    }

    /// The current cluster-wide revision (0 for an empty store).
    pub fn revision(&self) -> u64 {
        self.inner.revision.load(Ordering::SeqCst)
    }

    /// The revision up to which the event log has been compacted (0 if never).
    pub fn compacted_revision(&self) -> u64 {
        self.inner.compacted.load(Ordering::SeqCst)
    }

    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let index = self.inner.index();
        Ok(index.keys.get(key).map(|entry| entry.key_value(key)))
    }

    /// All keys starting with `prefix`, sorted by key, and the revision they were read at.
    /// Both come from one snapshot, so `watch(prefix, revision + 1)` continues exactly after it.
    pub fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let index = self.inner.index();
        let kvs = index
            .range(prefix)
            .map(|(key, entry)| entry.key_value(key))
            .collect();
        Ok((kvs, index.revision))
    }

    /// Writes `key`, returning the new revision.
    ///
    /// A redb-only convenience, not part of [`KvStore`]: code that must work on any backend
    /// writes through [`KvStore::txn`] (`Txn::new().then(Op::put(key, value))`).
    pub fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let txn = Txn::new().then(Op::Put {
            key: key.to_owned(),
            value,
        });
        // A put always writes, so its revision is always a new one.
        Ok(self.execute(txn)?.revision)
    }

    /// Deletes `key`, returning the new revision, or `None` (and no new revision) if it was absent.
    /// Like [`Store::put`], not part of [`KvStore`].
    pub fn delete(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let done = self.execute(Txn::new().then(Op::delete(key)))?;
        Ok(done.wrote.then_some(done.revision))
    }

    /// Runs a compare-and-swap transaction atomically; all its writes share one revision.
    /// A transaction that writes nothing does not create a revision.
    pub fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let done = self.execute(txn)?;
        Ok(TxnResponse {
            succeeded: done.succeeded,
            revision: done.revision,
        })
    }

    /// Runs `txns` in order, as many [`Store::txn`] calls would, but queued at once, so they
    /// share one durable commit (with whatever else is queued then).
    pub fn txns(&self, txns: Vec<Txn>) -> Vec<Result<TxnResponse, StoreError>> {
        let mut answers: Vec<Option<Result<TxnResponse, StoreError>>> = Vec::new();
        let mut slots = Vec::new();
        let mut turn = {
            let mut queue = self.inner.queue();
            for txn in txns {
                // A malformed transaction fails alone, before it can share a batch.
                if let Err(e) = txn.validate() {
                    answers.push(Some(Err(e)));
                    continue;
                }
                let slot = Arc::new(Slot::default());
                queue.pending.push(Queued {
                    txn,
                    slot: Arc::clone(&slot),
                });
                slots.push((answers.len(), slot));
                answers.push(None);
            }
            !slots.is_empty() && !std::mem::replace(&mut queue.committing, true)
        };
        // Queued together, they are taken together: only the first can be handed the turn.
        for (at, slot) in slots {
            let answer = loop {
                if turn {
                    Turn {
                        inner: &self.inner,
                        batch: Vec::new(),
                    }
                    .commit();
                    turn = false;
                }
                match slot.wait() {
                    Some(answer) => break answer,
                    None => turn = true,
                }
            };
            answers[at] = Some(answer.map(|done| TxnResponse {
                succeeded: done.succeeded,
                revision: done.revision,
            }));
        }
        answers
            .into_iter()
            .map(|a| a.expect("every transaction is answered"))
            .collect()
    }

    /// Watches keys starting with `prefix`: first the logged events with revision >=
    /// `from_revision`, then live ones. `from_revision == 0` means "only changes after now".
    /// Fails with [`StoreError::Compacted`] if that history has been compacted away.
    pub fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher, StoreError> {
        // Subscribe before looking at the revision, so nothing committed later can slip by.
        let rx = self.inner.events.subscribe();
        let weak = Arc::downgrade(&self.inner);
        if from_revision == 0 {
            return Ok(Watcher::new(weak, rx, prefix, self.revision() + 1, false));
        }
        let compacted = self.compacted_revision();
        if from_revision <= compacted {
            return Err(StoreError::Compacted { compacted });
        }
        Ok(Watcher::new(weak, rx, prefix, from_revision, true))
    }

    /// Has `observer` told how long each durable commit (its fsync included) takes, from now
    /// on: one call per group commit, however many transactions it holds; see
    /// [`KvStore::observe_commits`].
    pub fn observe_commits(&self, observer: CommitObserver) {
        *self
            .inner
            .commits
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    /// Drops the watch history (event log) up to and including `revision`. Current keys are kept.
    /// Compacting to a revision at or below the current compaction point is a no-op.
    ///
    /// It goes [`COMPACT_STEP`] revisions at a time, each step a commit of its own that hands
    /// the write lock to a commit waiting for it: writers wait for a step (milliseconds), not
    /// for the whole (280,000 revisions took 180 ms in one).
    pub fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let current = self.revision();
        if revision > current {
            return Err(StoreError::FutureRevision { revision, current });
        }
        loop {
            let mut stale = self.inner.lock();
            let compacted = self.compacted_revision();
            if revision <= compacted {
                return Ok(());
            }
            let to = revision.min(compacted.saturating_add(COMPACT_STEP));
            let wtx = self.inner.db.begin_write()?;
            {
                let mut log = wtx.open_table(LOG)?;
                // No commit runs meanwhile (the write lock): the index is the log's last state.
                let index = self.inner.index();
                log.retain_in((compacted + 1, 0)..=(to, u32::MAX), |(at, i), (key, ..)| {
                    index.keys.get(key).is_some_and(|e| e.row() == (at, i))
                })?;
                for row in stale.iter() {
                    log.remove(row)?;
                }
                wtx.open_table(META)?.insert(META_COMPACTED, to)?;
            }
            let committing = Instant::now();
            wtx.commit()?;
            if let Some(observe) = &*self
                .inner
                .commits
                .read()
                .unwrap_or_else(PoisonError::into_inner)
            {
                observe(committing.elapsed());
            }
            stale.clear();
            self.inner.compacted.store(to, Ordering::SeqCst);
            tracing::debug!(revision = to, "compacted store log");
            parking_lot::MutexGuard::unlock_fair(stale);
        }
    }

    /// The write path shared by put, delete and txn: queues `txn` for the next group commit and
    /// returns once the commit holding it is durable (or has failed).
    fn execute(&self, txn: Txn) -> Result<Done, StoreError> {
        // A malformed transaction fails alone, before it can share a batch.
        txn.validate()?;
        let slot = Arc::new(Slot::default());
        let mut turn = {
            let mut queue = self.inner.queue();
            queue.pending.push(Queued {
                txn,
                slot: Arc::clone(&slot),
            });
            !std::mem::replace(&mut queue.committing, true)
        };
        loop {
            if turn {
                Turn {
                    inner: &self.inner,
                    batch: Vec::new(),
                }
                .commit();
            }
            match slot.wait() {
                Some(answer) => return answer,
                None => turn = true,
            }
        }
    }
}

/// A transaction waiting in [`Inner::queue`], and where its answer goes.
struct Queued {
    txn: Txn,
    slot: Arc<Slot>,
}

/// The transactions waiting for the next group commit.
#[derive(Default)]
struct Queue {
    pending: Vec<Queued>,
    /// Whether some caller has the turn (is committing, or has been handed it): callers that
    /// queue meanwhile wait for their answer instead of committing themselves.
    committing: bool,
}

/// What a write transaction did, as its caller is answered.
struct Done {
    succeeded: bool,
    /// Its new revision if it wrote, else the revision it was checked against.
    revision: u64,
    wrote: bool,
}

/// Where one caller's answer is left for it by whoever commits its transaction.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Waiting,
    /// The previous committer handed this caller the turn: it commits what is queued.
    Turn,
    Answered(Result<Done, StoreError>),
}

impl Slot {
    /// Blocks until this caller is answered (`Some`) or handed the turn to commit (`None`).
    fn wait(&self) -> Option<Result<Done, StoreError>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match std::mem::take(&mut *state) {
                SlotState::Waiting => {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                SlotState::Turn => return None,
                SlotState::Answered(answer) => return Some(answer),
            }
        }
    }

    fn set(&self, to: SlotState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = to;
        self.changed.notify_one();
    }
}

/// A caller's turn to commit what is queued. Dropping it answers whatever of its batch is still
/// unanswered (only if committing panicked) and hands the turn on, so writers never hang.
struct Turn<'a> {
    inner: &'a Inner,
    batch: Vec<Queued>,
}

impl Turn<'_> {
    fn commit(mut self) {
        let mut stale = self.inner.lock();
        self.batch = std::mem::take(&mut self.inner.queue().pending);
        let txns: Vec<&Txn> = self.batch.iter().map(|q| &q.txn).collect();
        let written = self.inner.write_batch(&txns, &mut stale);
        *self
            .inner
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            written.as_ref().err().map(|e| e.to_string());
        let answers = match written {
            Ok(done) => done.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!(error = %e, transactions = txns.len(), "store commit failed");
                txns.iter().map(|_| Err(e.duplicate())).collect::<Vec<_>>()
            }
        };
        for (queued, answer) in self.batch.drain(..).zip(answers) {
            queued.slot.set(SlotState::Answered(answer));
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        for queued in self.batch.drain(..) {
            queued.slot.set(SlotState::Answered(Err(StoreError::Db(
                "the commit holding this transaction panicked".into(),
            ))));
        }
        let mut queue = self.inner.queue();
        match queue.pending.first() {
            Some(next) => next.slot.set(SlotState::Turn),
            None => queue.committing = false,
        }
    }
}

/// The redb backend. Each method is the inherent one of the same name; `watch` boxes the
/// [`Watcher`].
impl KvStore for Store {
    fn revision(&self) -> u64 {
        Store::revision(self)
    }

    fn compacted_revision(&self) -> u64 {
        Store::compacted_revision(self)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Store::get(self, key)
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        Store::range(self, prefix)
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        Store::txn(self, txn)
    }

    fn txns(&self, txns: Vec<Txn>) -> Vec<Result<TxnResponse, StoreError>> {
        Store::txns(self, txns)
    }

    fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        Store::watch(self, prefix, from_revision).map(WatchStream::from)
    }

    fn compact(&self, revision: u64) -> Result<(), StoreError> {
        Store::compact(self, revision)
    }

    fn observe_commits(&self, observer: CommitObserver) {
        Store::observe_commits(self, observer)
    }

    fn id(&self) -> u64 {
        self.inner.id
    }

    fn write_failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.revision())
            .field("compacted", &self.compacted_revision())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<RowId>> {
        // Not poisoned by a panic: redb aborts a panicked writer's transaction, and the rows
        // it holds are only added after a commit.
        self.write_lock.lock()
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // Changed only whole, after a commit, by a writer that does not panic meanwhile.
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it, but a poisoned queue is still a consistent one.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `txns` in order in one redb write transaction and commits it once, durably; then
    /// makes their revisions current (the index, then [`Store::revision`]) and publishes their
    /// events. The caller holds the write lock, and `stale` with it. On error nothing of the
    /// batch is committed and the revision is unchanged.
    fn write_batch(&self, txns: &[&Txn], stale: &mut Vec<RowId>) -> Result<Vec<Done>, StoreError> {
        let wtx = self.db.begin_write()?;
        let mut done = Vec::with_capacity(txns.len());
        let mut written = Vec::new();
        let index = self.index();
        let mut staged = Staged {
            index: &index,
            changed: HashMap::new(),
            stale: Vec::new(),
            compacted: self.compacted.load(Ordering::SeqCst),
        };
        let revision = {
            let mut meta = wtx.open_table(META)?;
            let mut revision = index.revision;
            let mut log = wtx.open_table(LOG)?;
            for txn in txns {
                let succeeded = compares_hold(&staged, &txn.compares);
                let ops = if succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                let next = revision + 1;
                let mut events = Vec::new();
                for op in ops {
                    apply(&mut staged, op, next, &mut events);
                }
                let wrote = !events.is_empty();
                if wrote {
                    for (index, event) in (0u32..).zip(&events) {
                        log.insert((next, index), log_row(event))?;
                    }
                    revision = next;
                    written.push(Batch { revision, events });
                }
                done.push(Done {
                    succeeded,
                    revision,
                    wrote,
                });
            }
            if !written.is_empty() {
                meta.insert(META_REVISION, revision)?;
            }
            revision
        };
        let Staged {
            changed,
            stale: left,
            ..
        } = staged;
        drop(index);
        if written.is_empty() {
            wtx.abort()?;
            return Ok(done);
        }
        let committing = Instant::now();
        wtx.commit()?;
        if let Some(observe) = &*self.commits.read().unwrap_or_else(PoisonError::into_inner) {
            observe(committing.elapsed());
        }
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            for (key, entry) in changed {
                match entry {
                    Some(entry) => index.keys.insert(key, entry),
                    None => index.keys.remove(&key),
                };
            }
            index.revision = revision;
        }
        stale.extend(left);
        self.revision.store(revision, Ordering::SeqCst);
        for batch in written {
            // An error only means nobody is watching right now; the log has the events anyway.
            let _ = self.events.send(Arc::new(batch));
        }
        Ok(done)
    }

    /// Reads logged events with revision >= `from` for keys under `prefix`, scanning at most
    /// about `limit` log entries (never splitting a revision), from one consistent snapshot.
    pub(crate) fn read_log(
        &self,
        prefix: &str,
        from: u64,
        limit: usize,
    ) -> Result<LogChunk, StoreError> {
        let rtx = self.db.begin_read()?;
        let meta = rtx.open_table(META)?;
        let current = meta_get(&meta, META_REVISION)?;
        let compacted = meta_get(&meta, META_COMPACTED)?;
        if from <= compacted {
            return Err(StoreError::Compacted { compacted });
        }
        let log = rtx.open_table(LOG)?;
        let mut events = Vec::new();
        let mut last_revision = None;
        for (scanned, item) in log.range((from, 0u32)..)?.enumerate() {
            let (id, row) = item?;
            let (revision, _) = id.value();
            if scanned >= limit && last_revision != Some(revision) {
                return Ok(LogChunk {
                    events,
                    next_revision: revision,
                    caught_up: false,
                });
            }
            last_revision = Some(revision);
            let (key, deleted, create_revision, version, value, prev) = row.value();
            if key.starts_with(prefix) {
                events.push(Event {
                    kind: if deleted {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv: KeyValue {
                        key: key.to_owned(),
                        value: value.to_vec(),
                        create_revision,
                        mod_revision: revision,
                        version,
                    },
                    prev_value: prev.map(<[u8]>::to_vec),
                });
            }
        }
        Ok(LogChunk {
            events,
            next_revision: from.max(current + 1),
            caught_up: true,
        })
    }
}

/// The keys under `prefix` of a format-1 file (its key table), sorted.
fn range_v1(rtx: &ReadTransaction, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    let kv = rtx.open_table(KV)?;
    let mut out = Vec::new();
    for item in kv.range(prefix..)? {
        let (key, row) = item?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        out.push(kv_from_row(key, row.value()));
    }
    Ok(out)
}

/// Moves a format-1 file's keys into its log, in the write transaction that opens it: a key
/// last written after the compaction point has its row there already; one written before gets
/// a row at its revision (none is left there). The key table makes way for [`KV_MOVED`].
/// Returns how many keys there were.
fn migrate_v1(
    wtx: &redb::WriteTransaction,
    log: &mut redb::Table<'_, RowId, LogRow<'static>>,
    compacted: u64,
) -> Result<usize, StoreError> {
    let rows = {
        let kv = match wtx.open_table(KV) {
            Ok(kv) => kv,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut rows = Vec::new();
        for item in kv.iter()? {
            let (key, row) = item?;
            rows.push(kv_from_row(key.value(), row.value()));
        }
        rows
    };
    let mut next_index: HashMap<u64, u32> = HashMap::new();
    for kv in rows.iter().filter(|kv| kv.mod_revision <= compacted) {
        let index = next_index.entry(kv.mod_revision).or_default();
        let row: LogRow<'_> = (
            kv.key.as_str(),
            false,
            kv.create_revision,
            kv.version,
            kv.value.as_slice(),
            None,
        );
        log.insert((kv.mod_revision, *index), row)?;
        *index += 1;
    }
    wtx.delete_table(KV)?;
    Ok(rows.len())
}

/// A nonzero number no other store is likely to draw: std's per-process random hash keys,
/// over the time.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish().max(1)
}

fn meta_get(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
    Ok(meta.get(key)?.map(|v| v.value()).unwrap_or(0))
}

fn kv_from_row(key: &str, (create, modified, version, value): KvRow<'_>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: modified,
        version,
    }
}

fn compares_hold(staged: &Staged<'_>, compares: &[Compare]) -> bool {
    compares.iter().all(|compare| {
        let (key, expected, pick): (&str, u64, fn(&Entry) -> u64) = match compare {
            Compare::ModRevision { key, revision } => (key, *revision, |e| e.mod_revision),
            Compare::Version { key, version } => (key, *version, |e| e.version),
        };
        staged.get(key).map_or(0, pick) == expected
    })
}

/// Applies `op` at `revision` to `staged`, adding its events (the next indices of the
/// revision's rows).
fn apply(staged: &mut Staged<'_>, op: &Op, revision: u64, events: &mut Vec<Event>) {
    match op {
        Op::Put { key, value } => {
            let (create_revision, version) = match staged.get(key) {
                Some(old) => (old.create_revision, old.version + 1),
                None => (revision, 1),
            };
            let entry = Entry {
                create_revision,
                mod_revision: revision,
                version,
                index: events.len() as u32,
                value: value.clone(),
            };
            let prev = staged.set(key, Some(entry));
            events.push(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision,
                    mod_revision: revision,
                    version,
                },
                prev_value: prev.map(|old| old.value),
            });
        }
        Op::Delete { key } => delete_key(staged, key, revision, events),
        Op::DeletePrefix { prefix } => {
            for key in staged.keys_under(prefix) {
                delete_key(staged, &key, revision, events);
            }
        }
    }
}

fn delete_key(staged: &mut Staged<'_>, key: &str, revision: u64, events: &mut Vec<Event>) {
    if staged.get(key).is_none() {
        return;
    }
    let old = staged.set(key, None);
    events.push(Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_owned(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
        },
        prev_value: old.map(|old| old.value),
    });
}

fn log_row(event: &Event) -> LogRow<'_> {
    (
        event.kv.key.as_str(),
        event.kind == EventKind::Delete,
        event.kv.create_revision,
        event.kv.version,
        event.kv.value.as_slice(),
        event.prev_value.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use redb::StorageBackend;
    use redb::backends::FileBackend;

    /// Polls `done` every millisecond until it holds; fails after 30 s.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }

    /// Holds the first commit inside the store (in the commit observer, with the turn taken)
    /// until released, so the test can queue transactions behind it; counts commits.
    #[derive(Default)]
    struct Gate {
        held: AtomicBool,
        open: Mutex<bool>,
        opened: Condvar,
        commits: AtomicUsize,
    }

    impl Gate {
        fn install(self: &Arc<Self>, store: &Store) {
            let gate = Arc::clone(self);
            store.observe_commits(Box::new(move |_| {
                if gate.commits.fetch_add(1, Ordering::SeqCst) == 0 {
                    gate.held.store(true, Ordering::SeqCst);
                    let mut open = gate.open.lock().unwrap();
                    while !*open {
                        open = gate.opened.wait(open).unwrap();
                    }
                }
            }));
        }

        fn release(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    /// Starts a put that gets held in its commit by `gate`, and returns once it is.
    fn hold_a_commit(store: &Store, gate: &Arc<Gate>) -> std::thread::JoinHandle<u64> {
        let first = {
            let store = store.clone();
            std::thread::spawn(move || store.put("/first", b"1".to_vec()).unwrap())
        };
        wait_until("the first commit", || gate.held.load(Ordering::SeqCst));
        first
    }

    fn queued(store: &Store) -> usize {
        store.inner.queue().pending.len()
    }

    #[test]
    fn transactions_queued_during_a_commit_share_the_next_one_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let gate = Arc::new(Gate::default());
        gate.install(&store);
        let mut watch = store.watch("/", 0).unwrap();
        let first = hold_a_commit(&store, &gate);

        // 31 writers race to create one key; a loser records that it lost. One transaction
        // writes nothing, and one is malformed.
        let claims: Vec<_> = (0..31u8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let txn = Txn::new()
                        .when_absent("/claim")
                        .then(Op::put("/claim", [i]))
                        .otherwise(Op::put(format!("/lost/{i}"), [i]));
                    (i, store.txn(txn).unwrap())
                })
            })
            .collect();
        let nothing = {
            let store = store.clone();
            std::thread::spawn(move || store.txn(Txn::new().when_absent("/never")).unwrap())
        };
        wait_until("32 queued transactions", || queued(&store) == 32);
        // Fails alone, at once, while the others wait for the commit.
        assert!(matches!(
            store.txn(Txn::new().then(Op::put("", "x"))),
            Err(StoreError::EmptyKey)
        ));
        gate.release();

        assert_eq!(first.join().unwrap(), 1);
        let mut claims: Vec<(u8, TxnResponse)> =
            claims.into_iter().map(|t| t.join().unwrap()).collect();
        claims.sort_by_key(|(_, r)| r.revision);
        // One revision each, dense after the first, in one more commit.
        let revisions: Vec<u64> = claims.iter().map(|(_, r)| r.revision).collect();
        assert_eq!(revisions, (2..=32).collect::<Vec<u64>>());
        assert_eq!(gate.commits.load(Ordering::SeqCst), 2);
        assert_eq!(store.revision(), 32);
        // The first claim in revision order won; every later one saw it and lost.
        let (winner, won) = claims[0];
        assert!(won.succeeded);
        let claim = store.get("/claim").unwrap().unwrap();
        assert_eq!((claim.value, claim.mod_revision), (vec![winner], 2));
        for (i, lost) in &claims[1..] {
            assert!(!lost.succeeded, "claim {i} won too");
            let kv = store.get(&format!("/lost/{i}")).unwrap().unwrap();
            assert_eq!(kv.mod_revision, lost.revision);
        }
        let nothing = nothing.join().unwrap();
        assert!(nothing.succeeded);
        assert!((1..=32).contains(&nothing.revision));

        // Watchers get every revision once, in order.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let seen: Vec<u64> = runtime.block_on(async {
            let mut seen = Vec::new();
            while seen.len() < 32 {
                let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
                    .await
                    .expect("watch event")
                    .unwrap()
                    .unwrap();
                seen.push(event.kv.mod_revision);
            }
            seen
        });
        assert_eq!(seen, (1..=32).collect::<Vec<u64>>());
    }

    /// A file whose writes and syncs fail while `failing` is set.
    #[derive(Debug)]
    struct FailingDisk {
        file: FileBackend,
        failing: Arc<AtomicBool>,
    }

    impl FailingDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected disk failure"));
            }
            Ok(())
        }
    }

    impl StorageBackend for FailingDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.set_len(len)
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.sync_data()
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.write(offset, data)
        }

        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
    }

    #[test]
    fn a_failed_commit_fails_its_whole_batch_and_leaves_the_revision_as_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let failing = Arc::new(AtomicBool::new(false));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let disk = FailingDisk {
            file: FileBackend::new(file).unwrap(),
            failing: Arc::clone(&failing),
        };
        let db = redb::Builder::new().create_with_backend(disk).unwrap();
        let store = Store::from_db(db, StoreOptions::default()).unwrap();
        let gate = Arc::new(Gate::default());
        gate.install(&store);
        let first = hold_a_commit(&store, &gate);

        let writers: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || store.put(&format!("/doomed/{i}"), vec![i]))
            })
            .collect();
        wait_until("8 queued transactions", || queued(&store) == 8);
        failing.store(true, Ordering::SeqCst);
        gate.release();

        assert_eq!(first.join().unwrap(), 1);
        for writer in writers {
            assert!(writer.join().unwrap().is_err());
        }
        assert_eq!(store.revision(), 1);
        assert_eq!(gate.commits.load(Ordering::SeqCst), 1);
        // redb refuses to write after a failed I/O until the file is reopened, even once the
        // disk is back: no later write can land on a revision the failed batch might hold.
        failing.store(false, Ordering::SeqCst);
        assert!(store.put("/later", vec![]).is_err());
        assert_eq!(store.revision(), 1);
        // Which a health check says, until the store is opened again.
        let failure = KvStore::write_failure(&store).expect("the failure is kept");
        assert!(failure.contains("I/O"), "{failure}");
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(KvStore::write_failure(&store), None);
        assert_eq!(store.revision(), 1);
        assert_eq!(store.get("/first").unwrap().unwrap().mod_revision, 1);
        assert!(store.range("/doomed/").unwrap().0.is_empty());
        assert_eq!(store.put("/after", vec![]).unwrap(), 2);
    }

    #[test]
    fn a_store_keeps_its_id_and_a_copy_has_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (one, other) = (dir.path().join("one.redb"), dir.path().join("other.redb"));
        let id = {
            let store = Store::open(&one).unwrap();
            store.put("/k", vec![1]).unwrap();
            KvStore::id(&store)
        };
        assert_ne!(id, 0);
        assert_eq!(KvStore::id(&Store::open(&one).unwrap()), id);
        assert_ne!(KvStore::id(&Store::open(&other).unwrap()), id);
        let copy = dir.path().join("copy.redb");
        std::fs::copy(&one, &copy).unwrap();
        let copied = Store::open(&copy).unwrap();
        assert_eq!(KvStore::id(&copied), id);
        assert_eq!(copied.revision(), 1, "drawing the id made no revision");
    }

    /// Commits skip redb's quick repair, so a file a killed server left is repaired in full
    /// when it is opened again: every acknowledged write is there and writing goes on.
    #[test]
    fn a_store_left_unclosed_reopens_with_every_committed_write() {
        let dir = tempfile::tempdir().unwrap();
        let (open, path) = (dir.path().join("open.redb"), dir.path().join("left.redb"));
        let writer = Store::open(&open).unwrap();
        for i in 0..300 {
            writer
                .put(&format!("/k/{i:03}"), vec![i as u8; 700])
                .unwrap();
        }
        writer.delete("/k/007").unwrap();
        // The file as a kill -9 would leave it: its writer never closed it.
        std::fs::copy(&open, &path).unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(store.revision(), 301);
        let (kvs, _) = store.range("/k/").unwrap();
        assert_eq!(kvs.len(), 299);
        assert_eq!(kvs[299 - 1].value, vec![43u8; 700], "/k/299 as written");
        assert!(store.get("/k/007").unwrap().is_none());
        assert_eq!(store.put("/after", vec![1]).unwrap(), 302);
        drop(store);
        assert_eq!(Store::open(&path).unwrap().revision(), 302);
    }

    #[test]
    fn a_file_cut_short_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.redb");
        {
            let store = Store::open(&whole).unwrap();
            for i in 0..200 {
                store.put(&format!("/k/{i}"), vec![7; 512]).unwrap();
            }
            // Left unclosed, as by a kill -9: opening it again repairs it.
            std::mem::forget(store);
        }
        let len = std::fs::metadata(&whole).unwrap().len();
        for tenths in 1..10 {
            let path = dir.path().join(format!("cut-{tenths}.redb"));
            std::fs::copy(&whole, &path).unwrap();
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len * tenths / 10 / 4096 * 4096).unwrap();
            drop(file);
            // Cut at a page, redb's repair fails an assertion: an error here all the same.
            let err = Store::open(&path).map(drop).unwrap_err().to_string();
            assert!(
                err.contains("restore it from a backup") || err.contains("I/O error"),
                "{tenths}: {err}"
            );
        }
    }

    /// A file read while a store has it open is refused; one its writer never closed (copied
    /// as a killed server left it) reads, through a repaired copy, with every committed write,
    /// and is left as it was.
    #[test]
    fn a_read_only_open_is_refused_in_use_and_reads_a_file_left_unclosed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).unwrap();
        store.put("/a", b"1".to_vec()).unwrap();
        store.put("/b", b"2".to_vec()).unwrap();
        assert!(matches!(ReadOnlyStore::open(&path), Err(StoreError::InUse)));

        let left = dir.path().join("left.redb");
        std::fs::copy(&path, &left).unwrap();
        let bytes = std::fs::read(&left).unwrap();
        let read = ReadOnlyStore::open(&left).unwrap();
        let (kvs, revision) = read.range("/").unwrap();
        assert_eq!(revision, 2);
        assert_eq!(
            kvs.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(),
            [b"1".to_vec(), b"2".to_vec()]
        );
        drop(read);
        assert_eq!(std::fs::read(&left).unwrap(), bytes, "left as it was");

        drop(store);
        let (kvs, _) = ReadOnlyStore::open(&path).unwrap().range("").unwrap();
        assert_eq!(kvs.len(), 2, "a closed file is read in place");
    }

    /// The log's rows as (revision, index, key), in order.
    fn log_rows(store: &Store) -> Vec<(u64, u32, String)> {
        let rtx = store.inner.db.begin_read().unwrap();
        let log = rtx.open_table(LOG).unwrap();
        log.iter()
            .unwrap()
            .map(|item| {
                let (id, row) = item.unwrap();
                let (revision, index) = id.value();
                (revision, index, row.value().0.to_owned())
            })
            .collect()
    }

    fn row(revision: u64, key: &str) -> (u64, u32, String) {
        (revision, 0, key.to_owned())
    }

    /// The log is the only record of the keys: a compaction keeps the row of each key still
    /// there, whenever it was written, and drops the others, those a later write or a
    /// deletion left behind included, whether or not the store was reopened meanwhile.
    #[test]
    fn compaction_keeps_the_rows_of_present_keys_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        store.put("/a", b"1".to_vec()).unwrap();
        store.put("/b", b"2".to_vec()).unwrap();
        store.put("/a", b"3".to_vec()).unwrap();
        store.delete("/b").unwrap();
        store.put("/c", b"5".to_vec()).unwrap();
        store.compact(4).unwrap();
        assert_eq!(log_rows(&store), [row(3, "/a"), row(5, "/c")]);

        // /a's row is below the compaction point now: the next compaction takes it.
        store.put("/a", b"6".to_vec()).unwrap();
        store.compact(6).unwrap();
        assert_eq!(log_rows(&store), [row(5, "/c"), row(6, "/a")]);

        // Left behind before a restart, found again when the log is read at open.
        store.put("/c", b"7".to_vec()).unwrap();
        store.txn(Txn::new().then(Op::delete_prefix("/a"))).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        store.compact(8).unwrap();
        assert_eq!(log_rows(&store), [row(7, "/c")]);

        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.revision(), 8);
        assert_eq!(store.get("/a").unwrap(), None);
        let c = store.get("/c").unwrap().unwrap();
        assert_eq!(
            (c.value, c.create_revision, c.mod_revision, c.version),
            (b"7".to_vec(), 5, 7, 2)
        );
        assert_eq!(store.range("/").unwrap().0.len(), 1);
    }

    /// A file written by a build that kept its keys in a table (format 1) is moved into the
    /// log when opened for writing, with every key's revisions, the history since the
    /// compaction point still there to watch; after that a binary that reads format 1 is
    /// refused by redb rather than finding no keys.
    #[tokio::test]
    async fn a_format_1_file_is_moved_into_the_log_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.redb");
        {
            // As format 1 left it: revision 5, compacted to 3.
            let db = Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            {
                let mut kv = wtx.open_table(KV).unwrap();
                kv.insert("/old", (1, 2, 2, &b"o"[..])).unwrap();
                kv.insert("/new", (4, 4, 1, &b"n"[..])).unwrap();
                kv.insert("/upd", (3, 5, 2, &b"u2"[..])).unwrap();
                let mut log = wtx.open_table(LOG).unwrap();
                log.insert((4, 0), ("/new", false, 4, 1, &b"n"[..], None))
                    .unwrap();
                log.insert((5, 0), ("/upd", false, 3, 2, &b"u2"[..], Some(&b"u1"[..])))
                    .unwrap();
                let mut meta = wtx.open_table(META).unwrap();
                meta.insert(META_REVISION, 5).unwrap();
                meta.insert(META_COMPACTED, 3).unwrap();
            }
            wtx.commit().unwrap();
        }
        let summary = |kvs: Vec<KeyValue>| {
            kvs.into_iter()
                .map(|kv| {
                    (
                        kv.key,
                        kv.create_revision,
                        kv.mod_revision,
                        kv.version,
                        kv.value,
                    )
                })
                .collect::<Vec<_>>()
        };
        let expected = vec![
            ("/new".to_string(), 4, 4, 1, b"n".to_vec()),
            ("/old".to_string(), 1, 2, 2, b"o".to_vec()),
            ("/upd".to_string(), 3, 5, 2, b"u2".to_vec()),
        ];
        let (kvs, revision) = ReadOnlyStore::open(&path).unwrap().range("/").unwrap();
        assert_eq!(
            (summary(kvs), revision),
            (expected.clone(), 5),
            "read as format 1"
        );

        let store = Store::open(&path).unwrap();
        let (kvs, revision) = store.range("/").unwrap();
        assert_eq!((summary(kvs), revision), (expected.clone(), 5));
        assert_eq!(store.compacted_revision(), 3);
        let mut watch = store.watch("/", 4).unwrap();
        for (key, revision) in [("/new", 4), ("/upd", 5)] {
            let event = watch.next().await.unwrap().unwrap();
            assert_eq!(
                (event.kv.key.as_str(), event.kv.mod_revision),
                (key, revision)
            );
        }
        assert_eq!(store.put("/old", b"o3".to_vec()).unwrap(), 6);
        drop(store);

        let db = Database::open(&path).unwrap();
        let rtx = db.begin_read().unwrap();
        assert!(matches!(
            rtx.open_table(KV),
            Err(redb::TableError::TableTypeMismatch { .. })
        ));
        assert_eq!(
            meta_get(&rtx.open_table(META).unwrap(), META_FORMAT).unwrap(),
            FORMAT
        );
        drop((rtx, db));

        let mut expected = expected;
        expected[1] = ("/old".to_string(), 1, 6, 3, b"o3".to_vec());
        let (kvs, revision) = ReadOnlyStore::open(&path).unwrap().range("/").unwrap();
        assert_eq!(
            (summary(kvs), revision),
            (expected.clone(), 6),
            "read as format 2"
        );
        let (kvs, _) = Store::open(&path).unwrap().range("/").unwrap();
        assert_eq!(summary(kvs), expected, "opened again");
    }

    #[test]
    fn a_file_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(Store::open(&path).unwrap());
        {
            let db = Database::open(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            wtx.open_table(META)
                .unwrap()
                .insert(META_FORMAT, FORMAT + 1)
                .unwrap();
            wtx.commit().unwrap();
        }
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("written by a newer shoal"), "{err}");
    }

    /// A long compaction goes in steps, each a commit of its own (so a writer waits for one
    /// step), and ends where a single one would have.
    #[test]
    fn a_long_compaction_goes_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let put = |i: u64| Txn::new().then(Op::put(format!("/k/{}", i % 100), vec![1; 8]));
        let revisions = COMPACT_STEP * 2 + COMPACT_STEP / 2;
        assert!(
            store
                .txns((0..revisions).map(put).collect())
                .iter()
                .all(Result::is_ok)
        );
        let commits = Arc::new(AtomicUsize::new(0));
        let counted = commits.clone();
        store.observe_commits(Box::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        store.compact(revisions).unwrap();
        assert_eq!(commits.load(Ordering::SeqCst), 3);
        assert_eq!(store.compacted_revision(), revisions);
        let rows = log_rows(&store);
        assert_eq!(rows.len(), 100, "one row per key left");
        assert!(rows.iter().all(|(at, ..)| *at > revisions - 100));
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(store.range("/k/").unwrap().0.len(), 100);
        assert_eq!(store.compacted_revision(), revisions);
    }
}
