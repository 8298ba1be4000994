//! The controller: apps → replicas → nodes. Level-triggered: on any change
//! (or every 250 ms, to notice silent nodes) a pass reads the whole state as a
//! [`World`], asks [`shoal_scheduler::plan::plan`] what to do, and writes the
//! [`Plan`]: one transaction per batch (per app, per node), each guarded by
//! the revisions its decisions were made on, so a concurrent write voids only
//! the batch it touches, and the next pass looks again.

use crate::error::ControlError;
use crate::state::{ControlPlane, blocking, decode, encode};
use shoal_core::objects::keys::{self, Key, Prefix};
use shoal_core::spec::AppKey;
use shoal_scheduler::plan::{self, Batch, Change, Expect, Ids, Plan, Read, World};
use shoal_store::{Op, Txn};
use std::collections::HashSet;
use std::time::Duration;
use tracing::Instrument;

impl ControlPlane {
    /// Runs the controller until the process ends.
    pub async fn run_controller(self) {
        // Leases written before this control plane started are judged from its
        // start: a restart after a long outage must not evict every node.
        let _ = self.inner.started_at.set(self.now());
        let mut watcher = match self.store().watch("/", self.store().revision() + 1) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "controller cannot watch the store");
                return;
            }
        };
        loop {
            let cp = self.clone();
            let span = tracing::debug_span!("reconcile");
            match blocking(move || cp.pass()).instrument(span).await {
                Ok(true) => continue, // wrote something or lost a race: look again
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying"),
            }
            // Sleep until something that matters changes, or the periodic tick.
            let tick = tokio::time::sleep(Duration::from_millis(250));
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = &mut tick => break,
                    _ = self.inner.kick.notified() => break,
                    ev = watcher.next() => match ev {
                        Some(Ok(ev)) if !ev.kv.key.starts_with(keys::EVENTS.as_str())
                            && !ev.kv.key.starts_with(keys::MODULES.as_str())
                            && !ev.kv.key.starts_with(keys::LEASES.as_str()) => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "controller watch failed; rewatching");
                            match self.store().watch("/", self.store().revision() + 1) {
                                Ok(w) => watcher = w,
                                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                            }
                            break;
                        }
                        None => return,
                    },
                }
            }
        }
    }

    /// One pass: read, plan, write. Returns whether it wrote (or tried to write) anything.
    pub(crate) fn pass(&self) -> Result<bool, ControlError> {
        let world = self.read_world()?;
        let now = self.now();
        let plan = plan::plan(&world, now, &mut RandomIds);
        let live: HashSet<AppKey> = world.apps.iter().map(|a| a.value.spec.key()).collect();
        self.write(plan, live)
    }

    /// Everything a pass decides on, each object with the revision it was read
    /// at. In an order that never sees a reference before what it refers to:
    /// apps before the revisions they point at (written with them or
    /// before), nodes before their leases (a registration writes both).
    fn read_world(&self) -> Result<World, ControlError> {
        let apps = read_all(self, &keys::APPS)?;
        let revisions = read_all(self, &keys::REVISIONS)?
            .into_iter()
            .map(|r| ((r.value.app.clone(), r.value.number), r))
            .collect();
        let rollouts = read_all(self, &keys::ROLLOUTS)?
            .into_iter()
            .map(|r| (r.value.app.clone(), r))
            .collect();
        let replicas = read_all(self, &keys::REPLICAS)?;
        let nodes = read_all(self, &keys::NODES)?;
        let leases = read_all(self, &keys::LEASES)?
            .into_iter()
            .map(|l| (l.value.node, l.value.renewed_at))
            .collect();
        Ok(World {
            apps,
            revisions,
            replicas,
            nodes,
            leases,
            rollouts,
            measurements: self.inner.metrics.snapshot(),
            leases_from: self.inner.started_at.get().copied().unwrap_or(0),
            node_grace_ms: self.config().node_grace.as_millis() as u64,
            strategy: self.config().strategy,
        })
    }

    /// Commits each batch of `plan` on its own; one that lost a race is
    /// dropped, and the next pass decides again. `live` are the apps that
    /// exist, whose measurements are kept.
    fn write(&self, plan: Plan, live: HashSet<AppKey>) -> Result<bool, ControlError> {
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        for (app, baseline) in plan.baselines {
            self.inner.metrics.set_baseline(app, baseline);
        }
        if plan.batches.is_empty() {
            self.prune_events()?;
            self.compact_history()?;
            self.inner.metrics.retain_apps(|app| live.contains(app));
            return Ok(false);
        }
        for batch in plan.batches {
            let scope = format!("{:?}", batch.scope);
            if !self.store().txn(self.batch_txn(batch))?.succeeded {
                tracing::debug!(%scope, "lost a race; the next pass decides again");
            }
        }
        Ok(true)
    }

    /// A batch as one guarded transaction, with its events.
    pub(crate) fn batch_txn(&self, batch: Batch) -> Txn {
        let mut txn = match (&batch.scope, batch.app) {
            (plan::Scope::App(key), Some(expect)) => guard(Txn::new(), &keys::app(key), expect),
            _ => Txn::new(),
        };
        for change in batch.changes {
            txn = match change {
                Change::PutNode { node, expect } => {
                    let key = keys::node(&node.name);
                    guard(txn, &key, Expect::At(expect)).then(Op::put(key, encode(&node)))
                }
                Change::PutApp { app } => {
                    txn.then(Op::put(keys::app(&app.spec.key()), encode(&app)))
                }
                Change::PutRevision { revision, expect } => {
                    let key = keys::revision(&revision.app, revision.number);
                    guard(txn, &key, Expect::At(expect)).then(Op::put(key, encode(&revision)))
                }
                Change::PutRollout { status, expect } => {
                    let key = keys::rollout(&status.app);
                    guard(txn, &key, expect).then(Op::put(key, encode(&status)))
                }
                Change::DeleteRollout { app, expect } => {
                    let key = keys::rollout(&app);
                    guard(txn, &key, Expect::At(expect)).then(Op::delete(key))
                }
                Change::PutReplica { replica, expect } => {
                    let key = keys::replica(&replica.app, &replica.id);
                    guard(txn, &key, expect).then(Op::put(key, encode(&replica)))
                }
                Change::KeepNode { name, expect } => {
                    guard(txn, &keys::node(&name), Expect::At(expect))
                }
                Change::DeleteReplica { app, id, expect } => {
                    let key = keys::replica(&app, &id);
                    guard(txn, &key, Expect::At(expect)).then(Op::delete(key))
                }
            };
        }
        for e in batch.events {
            txn = txn.then(self.event_op(e.kind, e.reason, e.object, e.app.as_ref(), e.message));
        }
        txn
    }

    /// Keeps the watch history to its last [`HISTORY`] revisions: older
    /// watchers re-read the snapshot, and the file stops growing.
    fn compact_history(&self) -> Result<(), ControlError> {
        let store = self.store();
        let target = store.revision().saturating_sub(HISTORY);
        if target > store.compacted_revision() + HISTORY / 10 {
            store.compact(target)?;
        }
        Ok(())
    }

    /// Keeps the newest `max_events` events.
    fn prune_events(&self) -> Result<(), ControlError> {
        let (mut events, _) = self.store().range(keys::EVENTS.as_str())?;
        events.sort_by_key(|kv| kv.create_revision);
        let excess = events.len().saturating_sub(self.config().max_events);
        if excess > 0 {
            let mut txn = Txn::new();
            for kv in &events[..excess] {
                txn = txn.then(Op::delete(kv.key.clone()));
            }
            self.store().txn(txn)?;
        }
        Ok(())
    }
}

/// Every object under `prefix`, with the revision it was read at.
fn read_all<T: serde::de::DeserializeOwned>(
    cp: &ControlPlane,
    prefix: &Prefix<T>,
) -> Result<Vec<Read<T>>, ControlError> {
    let (kvs, _) = cp.store().range(prefix.as_str())?;
    kvs.iter()
        .map(|kv| Ok(Read::new(decode(kv)?, kv.mod_revision)))
        .collect()
}

/// `txn` applying only if `key` is still as `expect` says.
fn guard<T>(txn: Txn, key: &Key<T>, expect: Expect) -> Txn {
    match expect {
        Expect::Absent => txn.when_absent(key),
        Expect::At(revision) => txn.when_mod_revision(key, revision),
    }
}

/// Revisions of watch history kept (about 3 hours of one node's heartbeats).
const HISTORY: u64 = 10_000;

/// Replica ids as Kubernetes makes pod suffixes: five random base-36 characters.
struct RandomIds;

impl Ids for RandomIds {
    fn next_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut bytes = [0u8; 5];
        getrandom::fill(&mut bytes).expect("system randomness");
        bytes
            .iter()
            .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
            .collect()
    }
}
