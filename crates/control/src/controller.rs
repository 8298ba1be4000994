//! The controller: apps → replicas → nodes. Level-triggered over a
//! [`Mirror`] of the cluster state that the store's watch keeps current: on
//! any change (or every 250 ms, for what moves with time) a pass asks
//! [`shoal_scheduler::plan`] what to do about the apps that changed, were
//! measured, or have something in motion ([`plan::needs_look`]), and every
//! [`FULL_PASS`] about every app. It writes the [`Plan`]: one transaction
//! per batch (per app, per node), each guarded by the revisions its decisions
//! were made on, so a concurrent write voids only the batch it touches, and
//! the next pass looks again. Node leases are judged on the controller's own
//! clock ([`LeaseClock`]), not on the wall clock their renewals carry.

use crate::error::ControlError;
use crate::measurements::in_wall_time;
use crate::mirror::Mirror;
use crate::state::{ControlPlane, Fence, blocking, encode};
use futures::FutureExt;
use shoal_core::objects::keys::{self, Key};
use shoal_core::{Node, NodeState};
use shoal_scheduler::plan::{self, Batch, Change, Expect, Ids, Leases, Plan, Read, Scope};
use shoal_store::{Op, Txn, WatchStream};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// A pass over every app at least this often, whatever changed: the safety
/// net under change tracking, and when old events and history are dropped.
const FULL_PASS: Duration = Duration::from_secs(5);

/// The most operations (and compares) the controller puts in one transaction of pruning:
/// within etcd's `--max-txn-ops`, 128 unless configured.
const PRUNE_OPS: usize = 100;

/// How long catching up with the store's watch may take before the mirror
/// is thrown away and loaded again.
const CATCH_UP: Duration = Duration::from_secs(5);

/// The most a gap between two passes counts against nodes' leases. A
/// running controller passes at least every 250 ms (plus the pass), so a
/// longer gap means it was not running (the process stopped, the machine
/// suspended or starved) and could not hear the heartbeats sent meanwhile.
const MAX_GAP: Duration = Duration::from_secs(1);

impl ControlPlane {
    /// Runs the controller until the process ends.
    pub async fn run_controller(self) {
        // Load is measured from this control plane's start.
        let _ = self.inner.started_at.set(self.now());
        // Started when this server won the leadership, if it shares its store: its writes
        // land only while that leadership lasts.
        let fence = self.fence();
        // Leases are judged from its start too, on its own clock: a restart
        // after a long outage must not evict every node.
        let mut clock = LeaseClock::default();
        let mut kept: Option<(Mirror, WatchStream)> = None;
        let mut last_full: Option<Instant> = None;
        let mut values_checked = false;
        loop {
            if !values_checked {
                let cp = self.clone();
                match blocking(move || cp.apply_references_again()).await {
                    Ok(applied) => {
                        values_checked = true;
                        tracing::debug!(
                            apps = applied.len(),
                            "applied again the apps naming config sets or secrets"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot apply again the apps naming config sets or secrets; retrying")
                    }
                }
            }
            let (mut mirror, mut watcher) = match kept.take() {
                Some(k) => k,
                None => match self.load_mirror().await {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(error = %e, "controller cannot read the store; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            let to = self.catch_up_to(&mirror);
            match tokio::time::timeout(CATCH_UP, catch_up(&mut mirror, &mut watcher, to)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "controller watch failed; reloading");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("controller watch fell behind; reloading");
                    continue;
                }
            }
            let full = last_full.is_none_or(|t| t.elapsed() >= FULL_PASS);
            let cp = self.clone();
            let fence = fence.clone();
            let span = tracing::debug_span!("reconcile", full);
            let passed = blocking(move || {
                let started = Instant::now();
                let passed = cp.pass(&fence, &mut mirror, &mut clock, full);
                cp.inner
                    .observed
                    .passes
                    .observe(started.elapsed().as_secs_f64());
                Ok((mirror, clock, passed))
            })
            .instrument(span)
            .await;
            let Ok((mut mirror, kept_clock, passed)) = passed else {
                // The pass panicked, with the clock: start judging afresh.
                clock = LeaseClock::default();
                continue;
            };
            clock = kept_clock;
            if full {
                last_full = Some(Instant::now());
            }
            self.pass_failed(passed.is_err());
            let keep = match passed {
                Ok(Passed::Wrote) => {
                    // Look again once the mirror has the writes.
                    kept = Some((mirror, watcher));
                    continue;
                }
                // A race lost: look again once the write that won it comes through the watch,
                // not at once on the mirror that lost it.
                Ok(Passed::Quiet | Passed::Lost) => true,
                Err(e) => {
                    // A write that failed may have landed all the same, whole or in part:
                    // read the store afresh.
                    tracing::warn!(error = %e, "reconcile failed; retrying");
                    false
                }
            };
            // Sleep until something that matters changes, or the periodic tick.
            let tick = tokio::time::sleep(Duration::from_millis(250));
            tokio::pin!(tick);
            let healthy = loop {
                tokio::select! {
                    _ = &mut tick => break true,
                    _ = self.inner.kick.notified() => break true,
                    ev = watcher.next() => match ev {
                        Some(Ok(ev)) => {
                            if let Err(e) = mirror.apply(&ev) {
                                tracing::warn!(error = %e, "controller cannot follow the store");
                                break false;
                            }
                            if wakes(ev.kv.key.as_str()) {
                                break true;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "controller watch failed; reloading");
                            break false;
                        }
                        None => return,
                    },
                }
            };
            if healthy && keep {
                kept = Some((mirror, watcher));
            }
        }
    }

    /// The whole state in one read, and a watch continuing right after it.
    async fn load_mirror(&self) -> Result<(Mirror, WatchStream), ControlError> {
        let cp = self.clone();
        let mirror = blocking(move || {
            let (kvs, revision) = cp.store().range("/")?;
            Mirror::load(&kvs, revision)
        })
        .await?;
        let watcher = self.store().watch("/", mirror.revision + 1)?;
        Ok((mirror, watcher))
    }

    /// One pass: plan on the mirror, write under `fence`. `full`: about every app, else
    /// about those that changed, were measured, or have something in motion.
    pub(crate) fn pass(
        &self,
        fence: &Fence,
        mirror: &mut Mirror,
        clock: &mut LeaseClock,
        full: bool,
    ) -> Result<Passed, ControlError> {
        let now = self.now();
        let changes = mirror.take_changes(now);
        let measured = self.inner.metrics.take_touched();
        // A node that came, went or changed concerns every app.
        let full = full || changes.nodes;
        let focus = (!full).then(|| {
            let mut focus = changes.apps;
            focus.extend(measured);
            focus.extend(mirror.active().iter().cloned());
            focus
        });
        if changes.nodes {
            let nodes = &mirror.world.nodes;
            self.inner.metrics.retain_nodes(|name| {
                nodes
                    .get(name)
                    .is_some_and(|n| n.value.state == NodeState::Ready)
            });
        }
        let world = &mut mirror.world;
        world.leases = clock.observe(Instant::now(), &world.nodes, &mirror.leases);
        world.started_at = self.inner.started_at.get().copied().unwrap_or(0);
        world.node_grace_ms = self.config().node_grace.as_millis() as u64;
        world.strategy = self.config().strategy;
        world.rebalance = self.config().rebalance;
        world.volume_usage = self.volume_usage();
        // Measured by the clock that never steps, judged by the wall clock.
        let steady = self.steady_now();
        let plan = match &focus {
            None => {
                world.measurements = in_wall_time(self.inner.metrics.snapshot(), now, steady);
                plan::plan(world, now, &mut RandomIds)
            }
            Some(focus) => {
                let measured = self.inner.metrics.snapshot_of(focus);
                world.measurements = in_wall_time(measured, now, steady);
                plan::plan_apps(world, focus, now, &mut RandomIds)
            }
        };
        world.measurements = BTreeMap::new();
        clock.decided(&plan);
        let quiet = plan.batches.is_empty();
        let lost = self.write(fence, plan)?;
        if quiet && full {
            self.prune_events(fence)?;
            self.prune_revisions(fence, &mirror.world)?;
            self.collect_modules(self.config().module_gc_grace)?;
            self.compact_history(mirror.revision)?;
            let apps = &mirror.world.apps;
            self.inner.metrics.retain_apps(|app| apps.contains_key(app));
            let revisions = &mirror.world.revisions;
            (self.inner.metrics).retain_revisions(|app, n| {
                n == shoal_core::metrics::NO_REVISION || revisions.contains_key(&(app.clone(), n))
            });
        }
        Ok(if quiet {
            Passed::Quiet
        } else if lost {
            Passed::Lost
        } else {
            Passed::Wrote
        })
    }

    /// Commits each batch of `plan` as a transaction of its own, all queued at
    /// once so that they share a durable commit; one that lost a race is
    /// dropped, and the next pass decides again. Returns whether one did.
    fn write(&self, fence: &Fence, plan: Plan) -> Result<bool, ControlError> {
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        for (app, baseline) in plan.baselines {
            self.inner.metrics.set_baseline(app, baseline);
        }
        let mut written = Vec::with_capacity(plan.batches.len());
        let mut txns = Vec::with_capacity(plan.batches.len());
        for batch in plan.batches {
            let scope = format!("{:?}", batch.scope);
            let reasons: Vec<&'static str> = batch.events.iter().map(|e| e.reason).collect();
            let waited: Vec<f64> = batch
                .placed()
                .map(|r| r.updated_at.saturating_sub(r.created_at) as f64 / 1_000.0)
                .collect();
            written.push((scope, reasons, waited));
            txns.push(fence.guard(self.batch_txn(batch)));
        }
        let answers = self.store().txns(txns);
        // Every answer is looked at: the next pass must wait for each write that landed,
        // whatever became of the others.
        let (mut failed, mut lost) = (None, false);
        for ((scope, reasons, waited), answer) in written.into_iter().zip(answers) {
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            if answer.succeeded {
                self.wrote_at(answer.revision);
                let observed = &self.inner.observed;
                for reason in reasons {
                    let reason = crate::prometheus::Reason {
                        reason: reason.to_string(),
                    };
                    observed.decisions.get_or_create(&reason).inc();
                }
                for seconds in waited {
                    observed.scheduling.observe(seconds);
                }
            } else {
                // Its revision is the store's, writes outside `/` included: not one to wait for.
                lost = true;
                tracing::debug!(%scope, "lost a race; the next pass decides again");
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(lost),
        }
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
                Change::PutVolume { volume, expect } => {
                    let key = keys::volume(&volume.namespace, &volume.name);
                    guard(txn, &key, Expect::At(expect)).then(Op::put(key, encode(&volume)))
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
                Change::KeepNode { name, expect } => guard(txn, &keys::node(&name), expect),
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
    /// watchers re-read the snapshot, and the file stops growing. Never past `read`, what
    /// the controller's own watch has delivered: one that fell behind a burst of writes
    /// (outside `/`, say) finds its history in the log rather than reading the whole state
    /// again.
    fn compact_history(&self, read: u64) -> Result<(), ControlError> {
        let store = self.store();
        let target = store.revision().saturating_sub(HISTORY).min(read);
        if target > store.compacted_revision() + HISTORY / 10 {
            store.compact(target)?;
        }
        Ok(())
    }

    /// Deletes the revisions past each app's history ([`plan::stale_revisions`]), one app per
    /// transaction, while the app and each revision are still as the mirror read them (an
    /// apply or an undo meanwhile keeps them for the next quiet pass to look at again).
    fn prune_revisions(&self, fence: &Fence, world: &plan::World) -> Result<(), ControlError> {
        let stale = plan::stale_revisions(world, plan::REVISION_HISTORY);
        for app in stale.chunk_by(|a, b| a.app == b.app) {
            let first = &app[0];
            // A long history (many applies between quiet passes) goes in several
            // transactions: deleting revisions leaves the app as it was for the next.
            for part in app.chunks(PRUNE_OPS / 2) {
                let mut txn =
                    Txn::new().when_mod_revision(keys::app(&first.app), first.app_mod_revision);
                for revision in part {
                    let key = keys::revision(&revision.app, revision.number);
                    txn = txn
                        .when_mod_revision(key.clone(), revision.mod_revision)
                        .then(Op::delete(key));
                }
                let answer = self.store().txn(fence.guard(txn))?;
                let done = answer.succeeded;
                if done {
                    self.wrote_at(answer.revision);
                }
                tracing::debug!(app = %first.app, revisions = part.len(), done, "pruned revision history");
            }
        }
        Ok(())
    }

    /// Keeps the newest `max_events` events.
    fn prune_events(&self, fence: &Fence) -> Result<(), ControlError> {
        let (mut events, _) = self.store().range(keys::EVENTS.as_str())?;
        events.sort_by_key(|kv| kv.create_revision);
        let excess = events.len().saturating_sub(self.config().max_events);
        for part in events[..excess].chunks(PRUNE_OPS) {
            let mut txn = Txn::new();
            for kv in part {
                txn = txn.then(Op::delete(kv.key.clone()));
            }
            let answer = self.store().txn(fence.guard(txn))?;
            if answer.succeeded {
                self.wrote_at(answer.revision);
            }
        }
        Ok(())
    }

    /// The revision the mirror must have caught up with before a pass: this controller's
    /// own writes, whatever else the store holds. Not the store's revision: writes outside
    /// `/` (a shared store's reports, every second) would hold every pass until the next
    /// write under it came through the watch. What others wrote comes in with the watch; a
    /// pass that missed it loses its race, as its writes are guarded.
    pub(crate) fn catch_up_to(&self, mirror: &Mirror) -> u64 {
        let wrote = self
            .inner
            .controller_wrote
            .load(std::sync::atomic::Ordering::Relaxed);
        wrote.max(mirror.revision)
    }

    fn wrote_at(&self, revision: u64) {
        (self.inner.controller_wrote).fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Applies the watch's events to `mirror` until it reflects revision `to`, and
/// with it every event already arrived: the rest of a transaction's writes come
/// together, so the mirror never holds half of one (an app without the revision
/// written with it).
async fn catch_up(
    mirror: &mut Mirror,
    watcher: &mut WatchStream,
    to: u64,
) -> Result<(), ControlError> {
    while mirror.revision < to {
        match watcher.next().await {
            Some(Ok(ev)) => mirror.apply(&ev)?,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ControlError::internal("the store's watch ended")),
        }
    }
    while let Some(next) = watcher.next().now_or_never() {
        match next {
            Some(Ok(ev)) => mirror.apply(&ev)?,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ControlError::internal("the store's watch ended")),
        }
    }
    Ok(())
}

/// `txn` applying only if `key` is still as `expect` says.
fn guard<T>(txn: Txn, key: &Key<T>, expect: Expect) -> Txn {
    match expect {
        Expect::Absent => txn.when_absent(key),
        Expect::At(revision) => txn.when_mod_revision(key, revision),
    }
}

/// What a pass did, which says when the next one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Passed {
    /// Nothing to write.
    Quiet,
    /// Wrote every batch of its plan.
    Wrote,
    /// Some batch lost a race to another write.
    Lost,
}

/// When this controller heard each node's lease renewed, on a clock of its
/// own that plan takes as [`Leases`]: monotonic (`Instant`), so a wall-clock
/// step ages no lease, and moving by at most [`MAX_GAP`] from one pass to
/// the next, so the time the controller itself was not running is not held
/// against any node. It starts at zero with the controller, every node
/// heard at its first pass: a full grace after a (re)start.
#[derive(Default)]
pub(crate) struct LeaseClock {
    /// The last pass, by the monotonic clock.
    last: Option<Instant>,
    /// Milliseconds of this clock so far.
    now: u64,
    /// Node → its lease's store revision as last seen (none: no lease yet),
    /// and when, on this clock, it was first seen at that revision.
    heard: HashMap<String, (Option<u64>, u64)>,
    /// When, on this clock, the last node was marked NotReady.
    evicted: Option<u64>,
    /// Whether the last pass held evictions back.
    held: bool,
}

impl LeaseClock {
    /// Moves the clock to `at` and says how long each of `nodes` has not
    /// renewed its lease (`leases`: node → revision of its last renewal).
    fn observe(
        &mut self,
        at: Instant,
        nodes: &BTreeMap<String, Read<Node>>,
        leases: &BTreeMap<String, u64>,
    ) -> Leases {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            if gap > MAX_GAP {
                tracing::warn!(
                    ?gap,
                    "the controller did not run for a while; that time is not held against nodes"
                );
            }
            self.now += gap.min(MAX_GAP).as_millis() as u64;
        }
        self.last = Some(at);
        self.heard.retain(|name, _| nodes.contains_key(name));
        let mut ages = BTreeMap::new();
        for name in nodes.keys() {
            let revision = leases.get(name).copied();
            let heard = self
                .heard
                .entry(name.clone())
                .or_insert((revision, self.now));
            if heard.0 != revision {
                *heard = (revision, self.now);
            }
            ages.insert(name.clone(), self.now - heard.1);
        }
        Leases {
            ages,
            since_eviction: self.evicted.map(|t| self.now - t),
            held: self.held,
        }
    }

    /// Remembers what `plan`, made on the last [`LeaseClock::observe`],
    /// decided about nodes, for the rate limit and the hold's warning.
    fn decided(&mut self, plan: &Plan) {
        self.held = plan.held;
        if plan
            .batches
            .iter()
            .any(|b| matches!(b.scope, Scope::Node(_)))
        {
            self.evicted = Some(self.now);
        }
    }
}

/// Whether a change to `key` is one to plan on at once. Not events, modules or leases (the
/// tick judges those), nor guests' key-value writes, which the controller does not read and
/// which come at thousands a second under a counter.
fn wakes(key: &str) -> bool {
    !keys::EVENTS.contains(key)
        && !keys::MODULES.contains(key)
        && !keys::LEASES.contains(key)
        && !key.starts_with(keys::KEYVALUE)
        && !key.starts_with(keys::KEYVALUE_USAGE)
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::Node;
    use shoal_store::{KvStore, Store};
    use std::sync::Arc;

    fn node(name: &str) -> Vec<u8> {
        encode(&crate::state::tests::ready_node(name))
    }

    fn nodes(names: &[&str]) -> BTreeMap<String, Read<Node>> {
        names
            .iter()
            .map(|n| {
                let node: Node = serde_json::from_slice(&node(n)).unwrap();
                (n.to_string(), Read::new(node, 1))
            })
            .collect()
    }

    fn revisions(leases: &[(&str, u64)]) -> BTreeMap<String, u64> {
        leases.iter().map(|(n, r)| (n.to_string(), *r)).collect()
    }

    fn ages(leases: &Leases) -> Vec<(&str, u64)> {
        leases.ages.iter().map(|(n, a)| (n.as_str(), *a)).collect()
    }

    /// Changes to what it plans on wake the controller; guests' key-value writes, events,
    /// modules and leases do not.
    #[test]
    fn guests_key_value_writes_do_not_wake_the_controller() {
        for key in ["/apps/default/web", "/replicas/default/web/r1", "/nodes/n1"] {
            assert!(wakes(key), "{key}");
        }
        for key in [
            "/kv/default/counter/hits",
            "/kv-usage/default/counter",
            "/events/00000000000000000001-00000001",
            "/leases/n1",
        ] {
            assert!(!wakes(key), "{key}");
        }
    }

    /// History is compacted to [`HISTORY`] revisions back, but never past what the
    /// controller's watch has delivered.
    #[test]
    fn history_is_compacted_no_further_than_the_controller_has_read() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let store = cp.store();
        let txn = |i: u64| shoal_store::Txn::new().then(Op::put(format!("bench/{i}"), vec![]));
        let written = store.txns((0..HISTORY * 2).map(txn).collect());
        assert!(written.iter().all(Result::is_ok));
        let revision = store.revision();
        cp.compact_history(5_000).unwrap();
        assert_eq!(store.compacted_revision(), 5_000);
        cp.compact_history(revision).unwrap();
        assert_eq!(store.compacted_revision(), revision - HISTORY);
    }

    /// A long history (many applies between quiet passes) and many events are pruned in
    /// transactions etcd takes: within its `--max-txn-ops` (128).
    #[test]
    fn pruning_on_etcd_keeps_within_its_transaction_limit() {
        let etcd = shoal_etcd::testing::EtcdCluster::single();
        let store = Arc::new(shoal_etcd::EtcdStore::connect(&etcd.config()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let config = crate::ControlConfig {
            max_events: 10,
            ..Default::default()
        };
        let cp = ControlPlane::with_clock(
            store.clone() as Arc<dyn KvStore>,
            shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap(),
            config,
            Arc::new(shoal_core::clock::SystemClock),
        )
        .unwrap();
        let digest = crate::state::tests::uploaded(&cp);
        for i in 0..150 {
            let src = format!(
                "name = \"long\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
                 [env]\nN = \"{i}\"\n"
            );
            let spec = shoal_core::spec::parse_app(&src)
                .unwrap()
                .resolve(digest.clone())
                .unwrap();
            cp.apply(spec, false).unwrap();
        }
        let count = |prefix: &str| store.range(prefix).unwrap().0.len();
        assert_eq!(count("/revisions/"), 150);
        assert!(count(keys::EVENTS.as_str()) >= 150);

        cp.prune_events(&cp.fence()).unwrap();
        let (kvs, revision) = store.range("/").unwrap();
        let mirror = Mirror::load(&kvs, revision).unwrap();
        cp.prune_revisions(&cp.fence(), &mirror.world).unwrap();
        assert_eq!(count(keys::EVENTS.as_str()), 10);
        assert!(
            count("/revisions/") <= plan::REVISION_HISTORY + 1,
            "{}",
            count("/revisions/")
        );
    }

    #[test]
    fn leases_age_on_the_controllers_clock_and_not_while_it_is_away() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut clock = LeaseClock::default();
        let both = nodes(&["a", "b"]);
        // First heard at the first pass, lease or none: a full grace from it.
        let l = clock.observe(t0, &both, &revisions(&[("a", 5)]));
        assert_eq!(ages(&l), [("a", 0), ("b", 0)]);
        let l = clock.observe(ms(250), &both, &revisions(&[("a", 5)]));
        assert_eq!(ages(&l), [("a", 250), ("b", 250)]);
        // A renewal is a new revision of the lease.
        let l = clock.observe(ms(500), &both, &revisions(&[("a", 9), ("b", 8)]));
        assert_eq!(ages(&l), [("a", 0), ("b", 0)]);
        // Stopped for 10 s: only MAX_GAP of it counts.
        let l = clock.observe(ms(10_500), &both, &revisions(&[("a", 9), ("b", 8)]));
        assert_eq!(ages(&l), [("a", 1000), ("b", 1000)]);
        let l = clock.observe(ms(10_750), &both, &revisions(&[("a", 9), ("b", 12)]));
        assert_eq!(ages(&l), [("a", 1250), ("b", 0)]);
        // A node that goes is forgotten; if it comes back, it is heard anew.
        clock.observe(ms(11_000), &nodes(&["a"]), &revisions(&[("a", 9)]));
        let l = clock.observe(ms(11_250), &both, &revisions(&[("a", 9), ("b", 12)]));
        assert_eq!(ages(&l), [("a", 1750), ("b", 0)]);
    }

    #[test]
    fn the_clock_remembers_evictions_and_holds_for_the_next_pass() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        let one = nodes(&["a"]);
        let l = clock.observe(t0, &one, &BTreeMap::new());
        assert_eq!((l.since_eviction, l.held), (None, false));
        let marked = Plan {
            batches: vec![Batch {
                scope: Scope::Node("a".into()),
                app: None,
                changes: Vec::new(),
                events: Vec::new(),
            }],
            ..Plan::default()
        };
        clock.decided(&marked);
        let l = clock.observe(t0 + Duration::from_millis(300), &one, &BTreeMap::new());
        assert_eq!((l.since_eviction, l.held), (Some(300), false));
        clock.decided(&Plan {
            held: true,
            ..Plan::default()
        });
        let l = clock.observe(t0 + Duration::from_millis(600), &one, &BTreeMap::new());
        assert_eq!((l.since_eviction, l.held), (Some(600), true));
    }

    /// An HTTP app of module `digest` with no replicas, its spec ending with `more`.
    fn idle_app(digest: &str, name: &str, more: &str) -> shoal_core::spec::AppSpec {
        let src = format!(
            "name = \"{name}\"\n[scale]\nreplicas = 0\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n{more}"
        );
        shoal_core::spec::parse_app(&src)
            .unwrap()
            .resolve(digest.to_string())
            .unwrap()
    }

    /// A server that lost the leadership of a shared store may still be in a pass, or have
    /// a write on its way: guarded on the leader key's revision when it won, none of it lands
    /// once the key is another's, nor once the server won it again (the pass belongs to the
    /// leadership it started under; the new one runs passes of its own).
    #[test]
    fn a_deposed_leaders_writes_do_not_land() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let digest = crate::state::tests::uploaded(&cp);
        let win = || {
            let won = cp
                .store()
                .txn(Txn::new().then(Op::put("/leader", "this")))
                .unwrap()
                .revision;
            cp.lead("/leader", won);
            cp.fence()
        };
        let rolled_out = |name: &str, fence: &Fence| {
            let spec = idle_app(&digest, name, "");
            let key = spec.key();
            cp.apply(spec, false).unwrap();
            let (kvs, revision) = cp.store().range("/").unwrap();
            let mut mirror = Mirror::load(&kvs, revision).unwrap();
            cp.pass(fence, &mut mirror, &mut LeaseClock::default(), true)
                .unwrap();
            cp.get::<shoal_core::RolloutStatus>(&keys::rollout(&key))
                .unwrap()
                .is_some()
        };
        let first = win();
        assert!(rolled_out("while-leading", &first));
        cp.store()
            .txn(Txn::new().then(Op::put("/leader", "another")))
            .unwrap();
        assert!(!rolled_out("after-losing", &first));
        let second = win();
        assert!(!rolled_out("after-winning-again", &first));
        assert!(rolled_out("in-the-new-leadership", &second));
    }

    /// A pass waits for its mirror to have the controller's own writes, not every revision
    /// of the store: a shared store's reports, written outside `/` every second, held each
    /// pass until the next write under `/` came through the watch.
    #[test]
    fn a_pass_waits_for_its_own_writes_and_not_for_writes_outside_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let digest = crate::state::tests::uploaded(&cp);
        let load = || {
            let (kvs, revision) = cp.store().range("/").unwrap();
            Mirror::load(&kvs, revision).unwrap()
        };
        let mirror = load();
        cp.store()
            .txn(Txn::new().then(Op::put("reports/server-a", "{}")))
            .unwrap();
        assert!(cp.store().revision() > mirror.revision);
        assert_eq!(cp.catch_up_to(&mirror), mirror.revision);

        cp.apply(idle_app(&digest, "web", ""), false).unwrap();
        let mut mirror = load();
        assert_eq!(
            cp.pass(&cp.fence(), &mut mirror, &mut LeaseClock::default(), true)
                .unwrap(),
            Passed::Wrote
        );
        assert_eq!(
            cp.catch_up_to(&mirror),
            cp.store().revision(),
            "its rollout status"
        );

        // A transaction that lost a race answers with the store's revision, which may be of
        // writes outside `/`: no revision to wait for.
        let api = |greeting: &str| {
            let env = format!("[env]\nGREETING = \"{greeting}\"\n");
            cp.apply(idle_app(&digest, "api", &env), false).unwrap();
        };
        api("hello");
        let mut stale = load();
        api("hi");
        cp.store()
            .txn(Txn::new().then(Op::put("reports/server-a", "{}")))
            .unwrap();
        assert_eq!(
            cp.pass(&cp.fence(), &mut stale, &mut LeaseClock::default(), true)
                .unwrap(),
            Passed::Lost
        );
        assert_eq!(cp.catch_up_to(&stale), stale.revision);
    }

    #[tokio::test]
    async fn catching_up_never_stops_inside_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let mut mirror = Mirror::load(&[], 0).unwrap();
        let mut watcher = KvStore::watch(&store, "/", 1).unwrap();
        let txn = Txn::new()
            .then(Op::put(keys::node("a"), node("a")))
            .then(Op::put(keys::node("b"), node("b")));
        let revision = store.txn(txn).unwrap().revision;
        catch_up(&mut mirror, &mut watcher, revision).await.unwrap();
        assert_eq!(mirror.revision, revision);
        assert_eq!(
            mirror.world.nodes.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "both writes of the transaction"
        );
    }
}
