//! The revisioned key-value store.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, Table};
use tokio::sync::broadcast;

use crate::tables::{KV, KvRow, LOG, LogRow, META, META_COMPACTED, META_REVISION};
use crate::watch::Watcher;
use crate::{
    CommitObserver, Compare, Event, EventKind, KeyValue, KvStore, Op, StoreError, Txn, TxnResponse,
    WatchStream,
};

type KvTable<'t> = Table<'t, &'static str, KvRow<'static>>;

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
    /// Serialises writers *and* their publication, so live events go out in revision order.
    write_lock: Mutex<()>,
    /// Mirrors of the meta table, updated after each commit, for lock-free reads.
    revision: AtomicU64,
    compacted: AtomicU64,
    pub(crate) events: broadcast::Sender<Arc<Batch>>,
    /// Told how long each transaction's commit took.
    commits: RwLock<Option<CommitObserver>>,
}

impl Store {
    /// Opens (or creates) the store file at `path` with default options.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store file at `path`.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(options.cache_size)
            .create(path)?;
        // Create every table up front: read transactions fail on tables that don't exist yet.
        let mut wtx = db.begin_write()?;
        wtx.set_quick_repair(true);
        let (revision, compacted) = {
            wtx.open_table(KV)?;
            wtx.open_table(LOG)?;
            let meta = wtx.open_table(META)?;
            (
                meta_get(&meta, META_REVISION)?,
                meta_get(&meta, META_COMPACTED)?,
            )
        };
        wtx.commit()?;
        tracing::debug!(path = %path.display(), revision, compacted, "opened store");
        let (events, _) = broadcast::channel(options.watch_capacity.max(1));
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                write_lock: Mutex::new(()),
                revision: AtomicU64::new(revision),
                compacted: AtomicU64::new(compacted),
                events,
                commits: RwLock::new(None),
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
        let rtx = self.inner.db.begin_read()?;
        let kv = rtx.open_table(KV)?;
        let found = kv.get(key)?;
        Ok(found.map(|row| kv_from_row(key, row.value())))
    }

    /// All keys starting with `prefix`, sorted by key, and the revision they were read at.
    /// Both come from one snapshot, so `watch(prefix, revision + 1)` continues exactly after it.
    pub fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let rtx = self.inner.db.begin_read()?;
        let revision = meta_get(&rtx.open_table(META)?, META_REVISION)?;
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
        Ok((out, revision))
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
        let (_, revision) = self.execute(&txn)?;
        // A put always writes, so there is always a new revision.
        Ok(revision.unwrap_or_else(|| self.revision()))
    }

    /// Deletes `key`, returning the new revision, or `None` (and no new revision) if it was absent.
    /// Like [`Store::put`], not part of [`KvStore`].
    pub fn delete(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let (_, revision) = self.execute(&Txn::new().then(Op::delete(key)))?;
        Ok(revision)
    }

    /// Runs a compare-and-swap transaction atomically; all its writes share one revision.
    /// A transaction that writes nothing does not create a revision.
    pub fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let (succeeded, revision) = self.execute(&txn)?;
        Ok(TxnResponse {
            succeeded,
            revision: revision.unwrap_or_else(|| self.revision()),
        })
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

    /// Has `observer` told how long each write transaction's commit (its fsync included)
    /// takes, from now on; see [`KvStore::observe_commits`].
    pub fn observe_commits(&self, observer: CommitObserver) {
        *self
            .inner
            .commits
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    /// Drops the watch history (event log) up to and including `revision`. Current keys are kept.
    /// Compacting to a revision at or below the current compaction point is a no-op.
    pub fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let _guard = self.inner.lock();
        let current = self.revision();
        if revision > current {
            return Err(StoreError::FutureRevision { revision, current });
        }
        if revision <= self.compacted_revision() {
            return Ok(());
        }
        let mut wtx = self.inner.db.begin_write()?;
        wtx.set_quick_repair(true);
        {
            let mut log = wtx.open_table(LOG)?;
            log.retain_in(..=(revision, u32::MAX), |_, _| false)?;
            wtx.open_table(META)?.insert(META_COMPACTED, revision)?;
        }
        wtx.commit()?;
        self.inner.compacted.store(revision, Ordering::SeqCst);
        tracing::debug!(revision, "compacted store log");
        Ok(())
    }

    /// The write path shared by put, delete and txn: returns whether the compares held and the
    /// new revision if anything was written.
    fn execute(&self, txn: &Txn) -> Result<(bool, Option<u64>), StoreError> {
        validate(txn)?;
        let _guard = self.inner.lock();
        let mut wtx = self.inner.db.begin_write()?;
        wtx.set_quick_repair(true);
        let (succeeded, revision, events) = {
            let mut meta = wtx.open_table(META)?;
            let revision = meta_get(&meta, META_REVISION)? + 1;
            let mut kv = wtx.open_table(KV)?;
            let succeeded = compares_hold(&kv, &txn.compares)?;
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let mut events = Vec::new();
            for op in ops {
                apply(&mut kv, op, revision, &mut events)?;
            }
            if !events.is_empty() {
                let mut log = wtx.open_table(LOG)?;
                for (index, event) in (0u32..).zip(&events) {
                    log.insert((revision, index), log_row(event))?;
                }
                meta.insert(META_REVISION, revision)?;
            }
            (succeeded, revision, events)
        };
        if events.is_empty() {
            wtx.abort()?;
            return Ok((succeeded, None));
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
        self.inner.revision.store(revision, Ordering::SeqCst);
        // An error only means nobody is watching right now; the log has the events anyway.
        let _ = self.inner.events.send(Arc::new(Batch { revision, events }));
        Ok((succeeded, Some(revision)))
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

    fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        Store::watch(self, prefix, from_revision).map(WatchStream::from)
    }

    fn compact(&self, revision: u64) -> Result<(), StoreError> {
        Store::compact(self, revision)
    }

    fn observe_commits(&self, observer: CommitObserver) {
        Store::observe_commits(self, observer)
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
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The mutex guards no data, and redb aborts a panicked writer's transaction.
        self.write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

fn validate(txn: &Txn) -> Result<(), StoreError> {
    let compare_keys = txn.compares.iter().map(|c| match c {
        Compare::ModRevision { key, .. } | Compare::Version { key, .. } => key,
    });
    let op_keys = txn
        .success
        .iter()
        .chain(&txn.failure)
        .filter_map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => Some(key),
            Op::DeletePrefix { .. } => None,
        });
    if compare_keys.chain(op_keys).any(|k| k.is_empty()) {
        return Err(StoreError::EmptyKey);
    }
    Ok(())
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

fn compares_hold(kv: &KvTable<'_>, compares: &[Compare]) -> Result<bool, StoreError> {
    for compare in compares {
        let (key, expected, pick): (&str, u64, fn(u64, u64) -> u64) = match compare {
            Compare::ModRevision { key, revision } => (key, *revision, |m, _| m),
            Compare::Version { key, version } => (key, *version, |_, v| v),
        };
        let actual = match kv.get(key)? {
            Some(row) => {
                let (_, modified, version, _) = row.value();
                pick(modified, version)
            }
            None => 0,
        };
        if actual != expected {
            return Ok(false);
        }
    }
    Ok(true)
}

fn apply(
    kv: &mut KvTable<'_>,
    op: &Op,
    revision: u64,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    match op {
        Op::Put { key, value } => {
            let prev = kv.get(key.as_str())?.map(|row| {
                let (create, _, version, value) = row.value();
                (create, version, value.to_vec())
            });
            let (create_revision, version) = match &prev {
                Some((create, version, _)) => (*create, version + 1),
                None => (revision, 1),
            };
            kv.insert(
                key.as_str(),
                (create_revision, revision, version, value.as_slice()),
            )?;
            events.push(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision,
                    mod_revision: revision,
                    version,
                },
                prev_value: prev.map(|(_, _, value)| value),
            });
        }
        Op::Delete { key } => delete_key(kv, key, revision, events)?,
        Op::DeletePrefix { prefix } => {
            let mut keys = Vec::new();
            for item in kv.range(prefix.as_str()..)? {
                let (key, _) = item?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                keys.push(key.to_owned());
            }
            for key in keys {
                delete_key(kv, &key, revision, events)?;
            }
        }
    }
    Ok(())
}

fn delete_key(
    kv: &mut KvTable<'_>,
    key: &str,
    revision: u64,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    if let Some(row) = kv.remove(key)? {
        let (_, _, _, value) = row.value();
        events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_owned(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
                version: 0,
            },
            prev_value: Some(value.to_vec()),
        });
    }
    Ok(())
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
