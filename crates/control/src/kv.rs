//! The cluster-wide key-value store behind guests' `wasi:keyvalue` (and `shoal kv`): buckets of
//! a namespace, kept in the control plane's store, so every replica on every node sees the same
//! data and it follows the store wherever the store goes.
//!
//! Each value is a key of its own (`/kv/{ns}/{bucket}/{key}`, the raw bytes), and each bucket
//! has a usage record (`/kv-usage/{ns}/{bucket}`) written in the same transaction as every
//! change, so the bucket's limit holds exactly. Each write is guarded on what it read (the
//! values it replaces and the usage record) and made again from a new read when another
//! server's write came first: servers sharing a store (etcd) cannot lose an increment or pass
//! a limit. Within one server, the writes to a bucket queue: one caller at a time has the
//! bucket's turn and writes what queued meanwhile with its own, judged one after another as if
//! made in turn, in one transaction. So they do not race each other and share one read and one
//! durable commit (32 clients incrementing one counter would otherwise wait for 32 fsyncs in a
//! row), while writes to other buckets go on beside them.

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};
use serde::{Deserialize, Serialize};
use shoal_core::kv::{
    KvAnswer, KvOp, LIST_PAGE, MAX_SET_BYTES, check_key, check_new_key, check_set,
};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::AppKey;
use shoal_core::{Replica, Revision};
use shoal_store::{KeyValue, Op, Txn};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Distinct keys past which no more queued writes join a bucket's write: within etcd's
/// `--max-txn-ops` (128), each key taking a compare and an operation, the usage record one of
/// each. A single write past it goes alone, as it always did.
const KEYS_PER_WRITE: usize = 100;

/// Where bucket `bucket` of `ns` keeps its values.
fn bucket_prefix(ns: &str, bucket: &str) -> String {
    format!("{}{ns}/{bucket}/", keys::KEYVALUE)
}

fn usage_key(ns: &str, bucket: &str) -> String {
    format!("{}{ns}/{bucket}", keys::KEYVALUE_USAGE)
}

/// What a bucket holds, kept beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvUsage {
    pub keys: u64,
    pub bytes: u64,
}

/// What a write does to one key.
enum Change {
    Put(Vec<u8>),
    Delete,
    /// Adds to a decimal number (none: 0).
    Add(u64),
}

fn invalid(message: String) -> ControlError {
    ControlError::invalid(ErrorCode::BadRequest, message)
}

impl ControlPlane {
    /// `op` on bucket `bucket` of namespace `ns`.
    pub fn kv(&self, ns: &str, bucket: &str, op: KvOp) -> Result<KvAnswer, ControlError> {
        shoal_core::validate_name(ns).map_err(|e| invalid(format!("namespace: {e}")))?;
        shoal_core::validate_name(bucket).map_err(|e| invalid(format!("bucket: {e}")))?;
        let prefix = bucket_prefix(ns, bucket);
        let store = &*self.inner.store;
        let value_of = |key: &str| -> Result<Option<Vec<u8>>, ControlError> {
            check_key(key).map_err(invalid)?;
            Ok(store.get(&format!("{prefix}{key}"))?.map(|kv| kv.value))
        };
        match op {
            KvOp::Get { keys } => Ok(KvAnswer::Values {
                values: keys.iter().map(|k| value_of(k)).collect::<Result<_, _>>()?,
            }),
            KvOp::Exists { key } => Ok(KvAnswer::Exists {
                exists: value_of(&key)?.is_some(),
            }),
            KvOp::List { cursor } => {
                let (all, _) = store.range(&prefix)?;
                let from = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
                let page: Vec<String> = all
                    .iter()
                    .skip(from)
                    .take(LIST_PAGE)
                    .map(|kv| kv.key[prefix.len()..].to_string())
                    .collect();
                let next = from.saturating_add(page.len());
                Ok(KvAnswer::Keys {
                    cursor: (next < all.len()).then_some(next as u64),
                    keys: page,
                })
            }
            KvOp::Set { entries } => {
                for (k, _) in &entries {
                    check_new_key(k).map_err(invalid)?;
                }
                check_set(&entries).map_err(invalid)?;
                let changes = entries
                    .into_iter()
                    .map(|(k, v)| (k, Change::Put(v)))
                    .collect();
                self.kv_write(ns, bucket, changes).map(|_| KvAnswer::Done)
            }
            KvOp::Delete { keys } => {
                for k in &keys {
                    check_key(k).map_err(invalid)?;
                }
                let changes = keys.into_iter().map(|k| (k, Change::Delete)).collect();
                self.kv_write(ns, bucket, changes).map(|_| KvAnswer::Done)
            }
            KvOp::Increment { key, delta } => {
                check_new_key(&key).map_err(invalid)?;
                let changes = BTreeMap::from([(key, Change::Add(delta))]);
                let value = self.kv_write(ns, bucket, changes)?;
                Ok(KvAnswer::Count {
                    value: value.unwrap_or(delta),
                })
            }
        }
    }

    /// Writes `changes` and the bucket's new usage in one transaction, refusing what would
    /// take the bucket past its limit; answers an increment's new value. Queued behind the
    /// bucket's turn, and written with what queued beside it (see the module's doc).
    fn kv_write(
        &self,
        ns: &str,
        bucket: &str,
        changes: BTreeMap<String, Change>,
    ) -> Result<Option<u64>, ControlError> {
        let bucket_id = (ns.to_string(), bucket.to_string());
        let me = Arc::new(Queued::new(changes));
        let queues = &self.inner.kv_queues;
        let queued = {
            let mut queues = queues.lock();
            match queues.get_mut(&bucket_id) {
                Some(waiting) => {
                    waiting.push_back(me.clone());
                    true
                }
                None => {
                    queues.insert(bucket_id.clone(), VecDeque::new());
                    false
                }
            }
        };
        if queued && let Some(answer) = me.wait() {
            return answer;
        }
        let mut turn = Turn {
            queues,
            bucket: bucket_id,
            batch: vec![me.clone()],
        };
        turn.write(self);
        drop(turn);
        me.answer()
    }

    /// One read and guarded write of all of `batch`, each judged on what those before it
    /// left, as if made one after another: the answer of each, or [`ControlError::Raced`] if
    /// the guard failed. What one of them is refused (past the limit, not a number) leaves no
    /// trace for the others.
    fn kv_write_batch(
        &self,
        ns: &str,
        bucket: &str,
        batch: &[&BTreeMap<String, Change>],
    ) -> Result<Vec<Result<Option<u64>, ControlError>>, ControlError> {
        let store = &*self.inner.store;
        let prefix = bucket_prefix(ns, bucket);
        let usage_at = usage_key(ns, bucket);
        let usage_read = store.get(&usage_at)?;
        let mut usage = match &usage_read {
            Some(kv) => {
                serde_json::from_slice::<KvUsage>(&kv.value).map_err(ControlError::internal)?
            }
            None => KvUsage::default(),
        };
        let mut read: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
        for key in batch.iter().flat_map(|changes| changes.keys()) {
            let at = format!("{prefix}{key}");
            if let std::collections::btree_map::Entry::Vacant(entry) = read.entry(at) {
                let kv = store.get(entry.key())?;
                entry.insert(kv);
            }
        }
        // What each key holds after the writes judged so far, where one changed it.
        let mut now: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let limit = self.inner.config.kv_bucket_bytes;
        let mut answers = Vec::with_capacity(batch.len());
        for changes in batch {
            let holds = |at: &str| match now.get(at) {
                Some(value) => value.as_deref(),
                None => read[at].as_ref().map(|kv| kv.value.as_slice()),
            };
            match judge(ns, bucket, &prefix, changes, usage, limit, holds) {
                Ok(judged) => {
                    usage = judged.usage;
                    now.extend(judged.values);
                    answers.push(Ok(judged.counted));
                }
                Err(refused) => answers.push(Err(refused)),
            }
        }
        if now.is_empty() {
            return Ok(answers);
        }
        let mut txn = match &usage_read {
            Some(kv) => Txn::new().when_mod_revision(usage_at.clone(), kv.mod_revision),
            None => Txn::new().when_absent(usage_at.clone()),
        };
        for (at, value) in now {
            txn = match &read[&at] {
                Some(kv) => txn.when_mod_revision(at.clone(), kv.mod_revision),
                None => txn.when_absent(at.clone()),
            };
            txn = match value {
                Some(v) => txn.then(Op::put(at, v)),
                None => txn.then(Op::delete(at)),
            };
        }
        let txn = if usage.keys == 0 {
            txn.then(Op::delete(usage_at))
        } else {
            txn.then(Op::put(usage_at, encode(&usage)))
        };
        match store.txn(txn)?.succeeded {
            true => Ok(answers),
            false => Err(ControlError::Raced(format!(
                "bucket {bucket} of namespace {ns} kept changing under this write: try again"
            ))),
        }
    }

    /// [`ControlPlane::kv_write_batch`], made again from a new read while other servers' writes
    /// come first. A store that refuses the whole write for its size (etcd's request limit)
    /// wrote none of it: then each change goes alone, so only one too large by itself fails.
    fn kv_write_together(
        &self,
        ns: &str,
        bucket: &str,
        changes: &[&BTreeMap<String, Change>],
    ) -> Vec<Result<Option<u64>, ControlError>> {
        let write = |changes: &[&BTreeMap<String, Change>]| {
            crate::state::retrying(|| self.kv_write_batch(ns, bucket, changes))
        };
        match write(changes) {
            Ok(answers) => answers,
            Err(ControlError::Invalid {
                code: ErrorCode::TooLarge,
                ..
            }) if changes.len() > 1 => changes
                .iter()
                .map(|&alone| match write(&[alone]) {
                    Ok(mut answers) => answers.pop().unwrap_or_else(|| {
                        Err(ControlError::internal(
                            "a key-value write of one change gave no answer",
                        ))
                    }),
                    Err(e) => Err(e),
                })
                .collect(),
            Err(e) => changes.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// The buckets of `ns` (of all namespaces if `None`) and what each holds.
    pub fn kv_buckets(
        &self,
        ns: Option<&str>,
    ) -> Result<Vec<(String, String, KvUsage)>, ControlError> {
        let prefix = match ns {
            Some(ns) => format!("{}{ns}/", keys::KEYVALUE_USAGE),
            None => keys::KEYVALUE_USAGE.to_string(),
        };
        let (all, _) = self.inner.store.range(&prefix)?;
        all.iter()
            .map(|kv| {
                let rest = &kv.key[keys::KEYVALUE_USAGE.len()..];
                let (ns, bucket) = rest.split_once('/').unwrap_or((rest, ""));
                let usage = serde_json::from_slice(&kv.value).map_err(ControlError::internal)?;
                Ok((ns.to_string(), bucket.to_string(), usage))
            })
            .collect()
    }

    /// `op` for a guest of `app` on `node`: allowed only if a replica placed there runs a
    /// revision of `app` that grants `bucket`.
    pub fn kv_for_node(
        &self,
        node: &str,
        app: &AppKey,
        bucket: &str,
        op: KvOp,
    ) -> Result<KvAnswer, ControlError> {
        if !self.node_may_open(node, app, bucket)? {
            return Err(ControlError::invalid(
                ErrorCode::Forbidden,
                format!("no replica of {app} on node {node} is granted bucket {bucket}"),
            ));
        }
        self.kv(&app.namespace, bucket, op)
    }

    fn node_may_open(&self, node: &str, app: &AppKey, bucket: &str) -> Result<bool, ControlError> {
        let grant = (node.to_string(), app.clone(), bucket.to_string());
        let now = std::time::Instant::now();
        let mut granted = self
            .inner
            .kv_grants
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A grant seen recently stands: a guest's every call would otherwise read the replicas.
        if granted
            .get(&grant)
            .is_some_and(|seen| now.duration_since(*seen) < std::time::Duration::from_secs(2))
        {
            return Ok(true);
        }
        let replicas: Vec<Replica> = self.list(&keys::replicas_of(app))?;
        // Only replicas still there: a job's finished runs, kept as history, grant nothing.
        let revisions = replicas
            .iter()
            .filter(|r| r.is_active() && r.node.as_deref() == Some(node))
            .map(|r| r.revision)
            .collect::<std::collections::BTreeSet<_>>();
        for number in revisions {
            if let Some((revision, _)) = self.get::<Revision>(&keys::revision(app, number))?
                && revision.template.keyvalue.iter().any(|b| b == bucket)
            {
                if granted.len() > 10_000 {
                    granted.clear();
                }
                granted.insert(grant, now);
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// One write judged on what its bucket holds (`holds`, by full key) and uses: what it makes of
/// them, or why it is refused.
struct Judged {
    counted: Option<u64>,
    usage: KvUsage,
    values: Vec<(String, Option<Vec<u8>>)>,
}

fn judge<'a>(
    ns: &str,
    bucket: &str,
    prefix: &str,
    changes: &BTreeMap<String, Change>,
    mut usage: KvUsage,
    limit: u64,
    holds: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Judged, ControlError> {
    let mut counted = None;
    let mut values = Vec::with_capacity(changes.len());
    let held = usage.bytes;
    for (key, change) in changes {
        let at = format!("{prefix}{key}");
        let old = holds(&at);
        let value = match change {
            Change::Put(v) => Some(v.clone()),
            Change::Delete => None,
            Change::Add(delta) => {
                let now = match old {
                    Some(old) => std::str::from_utf8(old)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            invalid(format!("the value of {key:?} is not a decimal number"))
                        })?,
                    None => 0,
                };
                let value = now
                    .checked_add(*delta)
                    .ok_or_else(|| invalid(format!("incrementing {key:?} overflows")))?;
                counted = Some(value);
                Some(value.to_string().into_bytes())
            }
        };
        if let Some(old) = old {
            // Saturating: a usage record out of step with its bucket must not panic here.
            usage.keys = usage.keys.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub((key.len() + old.len()) as u64);
        }
        if let Some(v) = &value {
            usage.keys += 1;
            usage.bytes += (key.len() + v.len()) as u64;
        }
        values.push((at, value));
    }
    // What does not grow the bucket passes: a bucket over a limit lowered since can shrink.
    if usage.bytes > limit && usage.bytes > held {
        return Err(ControlError::invalid(
            ErrorCode::TooLarge,
            format!(
                "bucket {bucket} of namespace {ns} would hold {} bytes: its limit is {limit}",
                usage.bytes
            ),
        ));
    }
    Ok(Judged {
        counted,
        usage,
        values,
    })
}

/// The writes waiting for each bucket (namespace, bucket); a bucket is here while one caller
/// has its turn.
#[derive(Default)]
pub(crate) struct KvQueues(Mutex<Waiting>);

type Waiting = HashMap<(String, String), VecDeque<Arc<Queued>>>;

impl KvQueues {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Nothing panics while holding it, and a poisoned queue is still a consistent one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A write waiting for its bucket, and where its answer is left for it.
struct Queued {
    changes: BTreeMap<String, Change>,
    state: Mutex<QueuedState>,
    changed: Condvar,
}

#[derive(Default)]
enum QueuedState {
    #[default]
    Waiting,
    /// The caller before it handed it the bucket's turn: it writes what is queued.
    Turn,
    Answered(Result<Option<u64>, ControlError>),
}

impl Queued {
    fn new(changes: BTreeMap<String, Change>) -> Queued {
        Queued {
            changes,
            state: Mutex::new(QueuedState::Waiting),
            changed: Condvar::new(),
        }
    }

    /// Keys and bytes it writes, as a set-many's bound counts them.
    fn size(&self) -> (usize, usize) {
        let bytes = self
            .changes
            .iter()
            .map(|(k, change)| match change {
                Change::Put(v) => k.len() + v.len(),
                Change::Delete | Change::Add(_) => k.len() + 20,
            })
            .sum();
        (self.changes.len(), bytes)
    }

    fn state(&self) -> MutexGuard<'_, QueuedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until answered (`Some`) or handed the bucket's turn (`None`).
    fn wait(&self) -> Option<Result<Option<u64>, ControlError>> {
        let mut state = self.state();
        loop {
            match std::mem::take(&mut *state) {
                QueuedState::Waiting => {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                QueuedState::Turn => return None,
                QueuedState::Answered(answer) => return Some(answer),
            }
        }
    }

    fn set(&self, to: QueuedState) {
        *self.state() = to;
        self.changed.notify_one();
    }

    /// The answer its own turn left it.
    fn answer(&self) -> Result<Option<u64>, ControlError> {
        match std::mem::take(&mut *self.state()) {
            QueuedState::Answered(answer) => answer,
            QueuedState::Waiting | QueuedState::Turn => Err(ControlError::internal(
                "a key-value write was left unanswered",
            )),
        }
    }
}

/// A caller's turn at a bucket. Dropping it answers whatever of its batch is still unanswered
/// (only if writing panicked) and hands the turn to the next queued write, so none hangs.
struct Turn<'a> {
    queues: &'a KvQueues,
    bucket: (String, String),
    batch: Vec<Arc<Queued>>,
}

impl Turn<'_> {
    /// Writes its own change with those queued behind it (in order, within one transaction's
    /// bounds), and answers each.
    fn write(&mut self, cp: &ControlPlane) {
        {
            let mut queues = self.queues.lock();
            if let Some(waiting) = queues.get_mut(&self.bucket) {
                let (mut keys, mut bytes) = self.batch[0].size();
                while let Some(next) = waiting.front() {
                    let (k, b) = next.size();
                    if keys + k > KEYS_PER_WRITE || bytes + b > MAX_SET_BYTES {
                        break;
                    }
                    (keys, bytes) = (keys + k, bytes + b);
                    self.batch.extend(waiting.pop_front());
                }
            }
        }
        let (ns, bucket) = &self.bucket;
        let changes: Vec<&BTreeMap<String, Change>> =
            self.batch.iter().map(|q| &q.changes).collect();
        let answers = cp.kv_write_together(ns, bucket, &changes);
        for (queued, answer) in self.batch.drain(..).zip(answers) {
            queued.set(QueuedState::Answered(answer));
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        for queued in self.batch.drain(..) {
            queued.set(QueuedState::Answered(Err(ControlError::internal(
                "the key-value write holding this change failed",
            ))));
        }
        let mut queues = self.queues.lock();
        let next = queues.get_mut(&self.bucket).and_then(VecDeque::pop_front);
        match next {
            Some(next) => next.set(QueuedState::Turn),
            None => {
                queues.remove(&self.bucket);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ControlConfig;
    use crate::state::tests::control_plane_with;

    /// A control plane whose buckets hold 4 KiB.
    fn control_plane(dir: &std::path::Path) -> ControlPlane {
        let config = ControlConfig {
            kv_bucket_bytes: 4096,
            ..ControlConfig::default()
        };
        control_plane_with(dir, config)
    }

    /// A node may open an app's bucket for a replica there that is still running, not for
    /// one that finished (a job's run kept as history) or is elsewhere.
    #[test]
    fn a_node_opens_a_bucket_only_for_a_replica_it_still_runs() {
        use crate::state::tests::{replica_of, uploaded};
        use shoal_core::objects::Phase;
        use shoal_core::parse_app;
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"j\"\n[component]\ndigest = \"{digest}\"\nkind = \"job\"\n[keyvalue]\nbuckets = [\"b\"]\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        cp.apply(spec.clone(), false).unwrap();
        let mut txn = Txn::new();
        for (id, node, phase) in [
            ("r1", "done", Phase::Succeeded),
            ("r2", "busy", Phase::Running),
        ] {
            let replica = replica_of(&spec, id, 1, node, phase);
            txn = txn.then(Op::put(keys::replica(&spec.key(), id), encode(&replica)));
        }
        cp.store().txn(txn).unwrap();
        let get = || KvOp::Get {
            keys: vec!["k".into()],
        };
        let refused = cp.kv_for_node("done", &spec.key(), "b", get()).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("no replica of default/j on node done"),
            "{refused}"
        );
        assert!(
            cp.kv_for_node("elsewhere", &spec.key(), "b", get())
                .is_err()
        );
        assert!(cp.kv_for_node("busy", &spec.key(), "b", get()).is_ok());
        assert!(cp.kv_for_node("busy", &spec.key(), "other", get()).is_err());
    }

    fn set(cp: &ControlPlane, key: &str, value: &str) -> Result<KvAnswer, ControlError> {
        let entries = vec![(key.to_string(), value.as_bytes().to_vec())];
        cp.kv("default", "b", KvOp::Set { entries })
    }

    /// Two servers sharing a store increment one key at once: no increment is lost, and the
    /// bucket's usage record stays exact.
    #[test]
    fn servers_sharing_a_store_lose_no_increment() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn shoal_store::KvStore> =
            std::sync::Arc::new(shoal_store::Store::open(&dir.path().join("state.redb")).unwrap());
        let server = |n: &str| {
            let blobs = shoal_store::BlobStore::open(&dir.path().join(n)).unwrap();
            let clock = std::sync::Arc::new(shoal_core::SystemClock);
            ControlPlane::with_clock(store.clone(), blobs, ControlConfig::default(), clock).unwrap()
        };
        let servers = [server("a"), server("b")];
        std::thread::scope(|s| {
            for cp in &servers {
                s.spawn(move || {
                    for _ in 0..100 {
                        let op = KvOp::Increment {
                            key: "hits".into(),
                            delta: 1,
                        };
                        cp.kv("default", "b", op).unwrap();
                    }
                });
            }
        });
        let get = KvOp::Get {
            keys: vec!["hits".into()],
        };
        let KvAnswer::Values { values } = servers[1].kv("default", "b", get).unwrap() else {
            panic!("not values");
        };
        assert_eq!(values, [Some(b"200".to_vec())]);
        let buckets = servers[0].kv_buckets(Some("default")).unwrap();
        assert_eq!(buckets[0].2, KvUsage { keys: 1, bytes: 7 });
    }

    #[test]
    fn a_bucket_counts_what_it_holds_keeps_its_limit_and_pages_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        set(&cp, "a", "12345").unwrap();
        set(&cp, "a", "1").unwrap();
        set(&cp, "b", "22").unwrap();
        let usage = |cp: &ControlPlane| cp.kv_buckets(Some("default")).unwrap();
        assert_eq!(
            usage(&cp),
            [("default".into(), "b".into(), KvUsage { keys: 2, bytes: 5 })]
        );
        let inc = |key: &str| match cp.kv(
            "default",
            "b",
            KvOp::Increment {
                key: key.into(),
                delta: 2,
            },
        ) {
            Ok(KvAnswer::Count { value }) => value,
            other => panic!("{other:?}"),
        };
        assert_eq!((inc("n"), inc("n")), (2, 4));
        assert!(increments(&cp, "b"), "22 is a number");
        set(&cp, "text", "not a number").unwrap();
        assert!(!increments(&cp, "text"));

        // Past the limit: refused whole, usage unchanged.
        let before = usage(&cp);
        let e = set(&cp, "big", &"x".repeat(4096)).unwrap_err().to_string();
        assert!(e.contains("its limit is 4096"), "{e}");
        assert_eq!(usage(&cp), before);
        let e = set(&cp, "", "x").unwrap_err().to_string();
        assert!(e.contains("1 to 1024 bytes"), "{e}");

        // Pages of keys; a batch is one write.
        cp.kv(
            "default",
            "b",
            KvOp::Delete {
                keys: vec!["text".into()],
            },
        )
        .unwrap();
        let entries = (0..(LIST_PAGE + 5))
            .map(|i| (format!("k{i}"), Vec::new()))
            .collect();
        cp.kv("default", "b", KvOp::Set { entries }).unwrap();
        let page = |cursor| match cp.kv("default", "b", KvOp::List { cursor }).unwrap() {
            KvAnswer::Keys { keys, cursor } => (keys, cursor),
            other => panic!("{other:?}"),
        };
        let (first, next) = page(None);
        assert_eq!(first.len(), LIST_PAGE);
        let (rest, end) = page(next);
        assert_eq!(end, None);
        assert_eq!(first.len() + rest.len(), LIST_PAGE + 5 + 3);

        cp.kv(
            "default",
            "b",
            KvOp::Delete {
                keys: vec!["a".into(), "absent".into()],
            },
        )
        .unwrap();
        let Ok(KvAnswer::Values { values }) = cp.kv(
            "default",
            "b",
            KvOp::Get {
                keys: vec!["a".into(), "b".into()],
            },
        ) else {
            panic!()
        };
        assert_eq!(values, [None, Some(b"23".to_vec())]);
    }

    /// A bucket over its limit (lowered since it filled) takes what does not grow it:
    /// deletes, smaller values, increments of the same width; nothing that grows it.
    #[test]
    fn a_bucket_over_its_limit_takes_what_does_not_grow_it() {
        let held: BTreeMap<String, Vec<u8>> = [("p/a", "12345"), ("p/n", "41")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let usage = KvUsage { keys: 2, bytes: 9 };
        let judged = |changes: Vec<(&str, Change)>| {
            let changes = changes
                .into_iter()
                .map(|(k, c)| (k.to_string(), c))
                .collect();
            judge("ns", "b", "p/", &changes, usage, 4, |k| {
                held.get(k).map(Vec::as_slice)
            })
            .map(|j| j.usage.bytes)
            .map_err(|e| e.to_string())
        };
        assert_eq!(judged(vec![("a", Change::Delete)]), Ok(3));
        assert_eq!(judged(vec![("absent", Change::Delete)]), Ok(9));
        assert_eq!(judged(vec![("a", Change::Put(b"1".to_vec()))]), Ok(5));
        assert_eq!(judged(vec![("n", Change::Add(1))]), Ok(9));
        let grows = judged(vec![("n", Change::Add(100))]).unwrap_err();
        assert!(
            grows.contains("would hold 10 bytes: its limit is 4"),
            "{grows}"
        );
        let grows = judged(vec![("c", Change::Put(Vec::new()))]).unwrap_err();
        assert!(grows.contains("would hold 10 bytes"), "{grows}");
    }

    /// Many callers incrementing one counter at once: each gets a value of its own, none is
    /// lost, the usage record stays exact, and they share transactions (each caller alone
    /// would have made one).
    #[test]
    fn concurrent_writes_to_a_bucket_share_transactions_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let (callers, each) = (32, 25);
        let before = cp.store().revision();
        let start = std::sync::Barrier::new(callers);
        let mut counted: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..callers)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        (0..each)
                            .map(|_| {
                                let op = KvOp::Increment {
                                    key: "hits".into(),
                                    delta: 1,
                                };
                                match cp.kv("default", "b", op) {
                                    Ok(KvAnswer::Count { value }) => value,
                                    other => panic!("{other:?}"),
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        counted.sort_unstable();
        let total = (callers * each) as u64;
        assert_eq!(counted, (1..=total).collect::<Vec<_>>());
        let transactions = cp.store().revision() - before;
        assert!(
            transactions < total,
            "{total} increments took {transactions} transactions"
        );
        let usage = cp.kv_buckets(Some("default")).unwrap();
        let bytes = ("hits".len() + total.to_string().len()) as u64;
        assert_eq!(usage[0].2, KvUsage { keys: 1, bytes });
    }

    /// Writes made together are judged one after another: each sees what those before it
    /// left, and one refused (not a number, past the limit) leaves nothing for the rest.
    #[test]
    fn writes_made_together_are_judged_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        set(&cp, "text", "words").unwrap();
        let put = |k: &str, v: &str| BTreeMap::from([(k.to_string(), Change::Put(v.into()))]);
        let add = |k: &str, n| BTreeMap::from([(k.to_string(), Change::Add(n))]);
        let batch = [
            put("n", "1"),
            add("text", 1),
            BTreeMap::from([
                ("n".to_string(), Change::Put("100".into())),
                (
                    "big".to_string(),
                    Change::Put("x".repeat(4096).into_bytes()),
                ),
            ]),
            add("n", 2),
            BTreeMap::from([("text".to_string(), Change::Delete)]),
            add("text", 5),
        ];
        let refs: Vec<_> = batch.iter().collect();
        let answers = cp.kv_write_batch("default", "b", &refs).unwrap();
        let said: Vec<_> = answers
            .iter()
            .map(|a| a.as_ref().map_err(ToString::to_string))
            .collect();
        assert_eq!(said[0], Ok(&None));
        assert!(said[1].as_ref().unwrap_err().contains("not a decimal"));
        assert!(said[2].as_ref().unwrap_err().contains("its limit is 4096"));
        assert_eq!(said[3], Ok(&Some(3)));
        assert_eq!(said[4], Ok(&None));
        assert_eq!(said[5], Ok(&Some(5)));
        let get = KvOp::Get {
            keys: vec!["n".into(), "text".into(), "big".into()],
        };
        let Ok(KvAnswer::Values { values }) = cp.kv("default", "b", get) else {
            panic!()
        };
        assert_eq!(values, [Some(b"3".to_vec()), Some(b"5".to_vec()), None]);
        let usage = cp.kv_buckets(Some("default")).unwrap();
        assert_eq!(
            usage[0].2,
            KvUsage {
                keys: 2,
                bytes: 2 + 5
            }
        );
    }

    /// Writes made together that etcd refuses as one request for their size are made one by
    /// one: only the one too large by itself is refused, and the others are all written.
    #[test]
    fn writes_too_large_together_for_etcd_go_one_by_one() {
        let etcd = shoal_etcd::testing::EtcdCluster::start_with(1, &["--max-request-bytes=200000"]);
        let store = shoal_etcd::EtcdStore::connect(&etcd.config()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::new(
            store,
            shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap(),
            ControlConfig::default(),
        )
        .unwrap();
        let put =
            |k: &str, bytes| BTreeMap::from([(k.to_string(), Change::Put(vec![b'x'; bytes]))]);
        let add = || BTreeMap::from([("n".to_string(), Change::Add(1))]);
        let batch = [
            put("a", 120_000),
            add(),
            put("b", 120_000),
            put("c", 250_000),
            add(),
        ];
        let refs: Vec<_> = batch.iter().collect();
        let together = cp.kv_write_batch("default", "b", &refs).unwrap_err();
        assert!(
            matches!(
                together,
                ControlError::Invalid {
                    code: ErrorCode::TooLarge,
                    ..
                }
            ),
            "{together}"
        );
        let answers: Vec<_> = cp
            .kv_write_together("default", "b", &refs)
            .into_iter()
            .map(|a| a.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(answers[..3], [Ok(None), Ok(Some(1)), Ok(None)]);
        assert!(
            answers[3]
                .as_ref()
                .unwrap_err()
                .contains("larger than the store takes")
        );
        assert_eq!(answers[4], Ok(Some(2)));
        let usage = cp.kv_buckets(Some("default")).unwrap();
        assert_eq!(usage[0].2.keys, 3, "a, b and n");
    }

    /// Whether incrementing `key` works (its value is a decimal number).
    fn increments(cp: &ControlPlane, key: &str) -> bool {
        cp.kv(
            "default",
            "b",
            KvOp::Increment {
                key: key.into(),
                delta: 1,
            },
        )
        .is_ok()
    }
}
