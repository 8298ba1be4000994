//! The controller: apps → replicas → nodes. Level-triggered: on any change
//! (or every 250 ms, to notice silent nodes) it reads the whole state, asks the pure functions in
//! `shoal-scheduler` what to do, and writes the result in one transaction
//! guarded by the revisions it read, so a concurrent write makes it retry
//! instead of clobbering.

use crate::error::ApiError;
use crate::state::{ControlPlane, blocking, encode, now_ms};
use shoal_core::objects::LIVENESS_FAILED;
use shoal_core::objects::keys;
use shoal_core::spec::AppKey;
use shoal_core::{
    App, Capacity, EventType, Kind, Lease, Node, NodeState, Phase, Replica, Revision, RolloutPhase,
    RolloutStatus,
};
use shoal_scheduler::rollout::{self, Measured};
use shoal_scheduler::{Cluster, Mode, Request, reconcile};
use shoal_store::{Op, Txn};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tracing::Instrument;

impl ControlPlane {
    /// Runs the controller until the process ends.
    pub async fn run_controller(self) {
        // Leases written before this control plane started are judged from its
        // start: a restart after a long outage must not evict every node.
        let _ = self.inner.started_at.set(now_ms());
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
            match blocking(move || cp.reconcile_once()).instrument(span).await {
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
                        Some(Ok(ev)) if !ev.kv.key.starts_with(keys::EVENTS)
                            && !ev.kv.key.starts_with(keys::MODULES)
                            && !ev.kv.key.starts_with(keys::LEASES) => break,
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

    /// One pass. Returns whether it wrote (or tried to write) anything.
    pub(crate) fn reconcile_once(&self) -> Result<bool, ApiError> {
        let store = self.store();
        let (app_kvs, _) = store.range(keys::APPS)?;
        let (replica_kvs, _) = store.range(keys::REPLICAS)?;
        let (node_kvs, _) = store.range(keys::NODES)?;
        let apps_with_revs: Vec<(App, u64)> = app_kvs
            .iter()
            .map(|kv| Ok((crate::state::decode(kv)?, kv.mod_revision)))
            .collect::<Result<_, ApiError>>()?;
        let apps: Vec<App> = apps_with_revs.iter().map(|(a, _)| a.clone()).collect();
        let app_revs: HashMap<AppKey, u64> = apps_with_revs
            .iter()
            .map(|(a, m)| (a.spec.key(), *m))
            .collect();
        let mut rollouts: HashMap<AppKey, (RolloutStatus, u64)> = store
            .range(keys::ROLLOUTS)?
            .0
            .iter()
            .map(|kv| {
                let s: RolloutStatus = crate::state::decode(kv)?;
                Ok((s.app.clone(), (s, kv.mod_revision)))
            })
            .collect::<Result<_, ApiError>>()?;
        let mut replicas: Vec<(Replica, u64)> = replica_kvs
            .iter()
            .map(|kv| Ok((crate::state::decode(kv)?, kv.mod_revision)))
            .collect::<Result<_, ApiError>>()?;
        let mut nodes: Vec<(Node, u64)> = node_kvs
            .iter()
            .map(|kv| Ok((crate::state::decode(kv)?, kv.mod_revision)))
            .collect::<Result<_, ApiError>>()?;

        let mut txn = Txn::new();
        let mut writes = 0;
        let now = now_ms();

        // Nodes whose lease is older than the grace are NotReady.
        let leases: HashMap<String, u64> = store
            .range(keys::LEASES)?
            .0
            .iter()
            .map(|kv| crate::state::decode::<Lease>(kv).map(|l| (l.node, l.renewed_at)))
            .collect::<Result<_, _>>()?;
        let grace = self.config().node_grace.as_millis() as u64;
        let started_at = self.inner.started_at.get().copied().unwrap_or(now);
        for (node, mod_rev) in &mut nodes {
            let renewed = leases.get(&node.name).copied().unwrap_or(0).max(started_at);
            if node.state == NodeState::Ready && now.saturating_sub(renewed) > grace {
                node.state = NodeState::NotReady;
                txn = txn
                    .when_mod_revision(keys::node(&node.name), *mod_rev)
                    .then(Op::put(keys::node(&node.name), encode(node)))
                    .then(self.event_op(
                        EventType::Warning,
                        "NodeNotReady",
                        format!("node/{}", node.name),
                        None,
                        format!(
                            "no heartbeat from node {} for {} ms",
                            node.name,
                            now - renewed
                        ),
                    ));
                writes += 1;
            }
        }
        let draining: HashSet<String> = nodes
            .iter()
            .filter(|(n, _)| n.draining)
            .map(|(n, _)| n.name.clone())
            .collect();
        let lost: HashSet<&str> = nodes
            .iter()
            .filter(|(n, _)| n.state != NodeState::Ready)
            .map(|(n, _)| n.name.as_str())
            .collect();

        // Replicas whose app is gone are removed; so are the live replicas of a
        // lost node, so the app's reconcile replaces them elsewhere. If the node
        // comes back, its agent finds them gone and stops them: no duplicates.
        let app_keys: HashMap<AppKey, &App> = apps.iter().map(|a| (a.spec.key(), a)).collect();
        replicas.retain(|(r, mod_rev)| {
            let on_lost_node =
                r.node.as_deref().is_some_and(|n| lost.contains(n)) && !r.phase.is_terminal();
            if app_keys.contains_key(&r.app) && !on_lost_node {
                return true;
            }
            let key = keys::replica(&r.app, &r.id);
            txn = std::mem::take(&mut txn)
                .when_mod_revision(key.clone(), *mod_rev)
                .then(Op::delete(key));
            if on_lost_node {
                txn = std::mem::take(&mut txn).then(self.event_op(
                    EventType::Warning,
                    "Rescheduled",
                    format!("replica/{}/{}", r.app, r.id),
                    Some(&r.app),
                    format!(
                        "node {} is not ready; replica {} will be replaced elsewhere",
                        r.node.as_deref().unwrap_or("?"),
                        r.id
                    ),
                ));
            }
            writes += 1;
            false
        });

        // Apps → replicas, as each app's rollout asks.
        let mut by_app: BTreeMap<AppKey, Vec<Replica>> = BTreeMap::new();
        for (r, _) in &replicas {
            by_app.entry(r.app.clone()).or_default().push(r.clone());
        }
        let mut new_replicas: Vec<Replica> = Vec::new();
        for app in &apps {
            let key = app.spec.key();
            let mut existing = by_app.remove(&key).unwrap_or_default();
            let previous = rollouts.remove(&key);
            let mode = if app.spec.component.kind == Kind::Job {
                Mode::Roll
            } else {
                let app_rev = app_revs.get(&key).copied().unwrap_or(0);
                match self.advance_rollout(txn, app, app_rev, previous, &existing, now)? {
                    Advanced::RolledBack(t) => {
                        // The next pass reconciles towards the revision rolled back to.
                        txn = t;
                        writes += 1;
                        continue;
                    }
                    Advanced::Mode(t, mode, wrote) => {
                        txn = t;
                        writes += wrote as usize;
                        mode
                    }
                }
            };

            // A replica its node gave up on (liveness kept failing through restarts)
            // is replaced, preferably on another node.
            let mut avoid: Vec<String> = Vec::new();
            let mut replaced: Vec<String> = Vec::new();
            existing.retain(|r| {
                if r.kind == Kind::Job || r.reason.as_deref() != Some(LIVENESS_FAILED) {
                    return true;
                }
                let rkey = keys::replica(&key, &r.id);
                let mod_rev = replicas
                    .iter()
                    .find(|(x, _)| x.id == r.id && x.app == key)
                    .map_or(0, |(_, m)| *m);
                let node = r.node.clone().unwrap_or_default();
                txn = std::mem::take(&mut txn)
                    .when_mod_revision(rkey.clone(), mod_rev)
                    .then(Op::delete(rkey))
                    .then(self.event_op(
                        EventType::Warning,
                        "Replacing",
                        format!("replica/{key}/{}", r.id),
                        Some(&key),
                        format!(
                            "replica {} kept failing its liveness probe on node {node} after {} restarts; replacing it on another node",
                            r.id, r.restarts
                        ),
                    ));
                writes += 1;
                for n in std::iter::once(&node).chain(&r.avoid) {
                    if !avoid.contains(n) {
                        avoid.push(n.clone());
                    }
                }
                replaced.push(r.id.clone());
                false
            });
            replicas.retain(|(r, _)| !(r.app == key && replaced.contains(&r.id)));

            let plan = reconcile(app, &existing, |n| draining.contains(n), mode);
            for id in &plan.delete {
                let rkey = keys::replica(&key, id);
                let mod_rev = replicas
                    .iter()
                    .find(|(r, _)| &r.id == id && r.app == key)
                    .map_or(0, |(_, m)| *m);
                txn = txn
                    .when_mod_revision(rkey.clone(), mod_rev)
                    .then(Op::delete(rkey))
                    .then(self.event_op(
                        EventType::Normal,
                        "Killing",
                        format!("replica/{key}/{id}"),
                        Some(&key),
                        format!("stopping replica {id}"),
                    ));
                writes += 1;
            }
            replicas.retain(|(r, _)| !(r.app == key && plan.delete.contains(&r.id)));
            let stable = match mode {
                Mode::Split { stable, .. } => stable,
                Mode::Roll | Mode::Hold => app.revision,
            };
            for (revision, count) in [(app.revision, plan.create), (stable, plan.create_stable)] {
                if count == 0 {
                    continue;
                }
                let Some((revision, _)) = self.get::<Revision>(&keys::revision(&key, revision))?
                else {
                    tracing::warn!(app = %key, revision, "app points at a missing revision");
                    continue;
                };
                for i in 0..count {
                    // Only the replacements keep off the nodes that failed them.
                    let avoid = if revision.number == app.revision && i < replaced.len() {
                        avoid.clone()
                    } else {
                        Vec::new()
                    };
                    new_replicas.push(Replica {
                        id: format!("{}-{}-{}", key.name, revision.number, short_id()),
                        app: key.clone(),
                        revision: revision.number,
                        kind: revision.template.component.kind,
                        resources: revision.template.resources.clone(),
                        node: None,
                        phase: Phase::Pending,
                        message: None,
                        exit_code: None,
                        restarts: 0,
                        reason: None,
                        avoid,
                        created_at: now,
                        updated_at: now,
                    });
                }
            }
        }
        // Rollouts of deleted apps go with them.
        for (key, (_, mod_rev)) in rollouts {
            let rkey = keys::rollout(&key);
            txn = txn
                .when_mod_revision(rkey.clone(), mod_rev)
                .then(Op::delete(rkey));
            writes += 1;
        }

        // Pending replicas → nodes, one at a time so each sees the last placement.
        let mut cluster = Cluster::new(nodes.iter().map(|(n, _)| n), self.config().strategy);
        for (r, _) in &replicas {
            if let (true, Some(n)) = (r.is_active(), &r.node) {
                cluster.reserve(n, &r.app, &Capacity::of(&r.resources));
            }
        }
        let mut to_place: Vec<(Replica, Option<u64>)> = replicas
            .iter()
            .filter(|(r, _)| r.node.is_none() && r.phase == Phase::Pending)
            .map(|(r, m)| (r.clone(), Some(*m)))
            .collect();
        to_place.extend(new_replicas.into_iter().map(|r| (r, None)));
        let default_placement = shoal_core::spec::Placement::default();
        for (mut replica, mod_rev) in to_place {
            let placement = app_keys
                .get(&replica.app)
                .map_or(&default_placement, |a| &a.spec.placement);
            let req = Request::new(Capacity::of(&replica.resources), placement);
            let rkey = keys::replica(&replica.app, &replica.id);
            let object = format!("replica/{}/{}", replica.app, replica.id);
            match cluster.place_avoiding(&replica.app, &req, &replica.avoid) {
                Ok(p) => {
                    replica.node = Some(p.node.name.clone());
                    replica.message = None;
                    replica.updated_at = now;
                    txn = txn.then(self.event_op(
                        EventType::Normal,
                        "Scheduled",
                        object,
                        Some(&replica.app),
                        format!("replica {} assigned to node {}", replica.id, p.node.name),
                    ));
                }
                Err(why) => {
                    let message = why.to_string();
                    if mod_rev.is_some() && replica.message.as_deref() == Some(message.as_str()) {
                        continue; // already says so; don't write or repeat the event
                    }
                    replica.message = Some(message.clone());
                    replica.updated_at = now;
                    txn = txn.then(self.event_op(
                        EventType::Warning,
                        "FailedScheduling",
                        object,
                        Some(&replica.app),
                        message,
                    ));
                }
            }
            txn = match mod_rev {
                Some(m) => txn.when_mod_revision(rkey.clone(), m),
                None => txn.when_absent(rkey.clone()),
            };
            txn = txn.then(Op::put(rkey, encode(&replica)));
            writes += 1;
        }

        if writes == 0 {
            self.prune_events()?;
            self.compact_history()?;
            self.inner
                .metrics
                .retain_apps(|app| app_revs.contains_key(app));
            return Ok(false);
        }
        let resp = store.txn(txn)?;
        if !resp.succeeded {
            tracing::debug!("reconcile lost a race; retrying");
        }
        Ok(true)
    }

    /// Moves the app's rollout on by what its replicas and the gateways show,
    /// adding its writes to `txn`.
    fn advance_rollout(
        &self,
        txn: Txn,
        app: &App,
        app_rev: u64,
        previous: Option<(RolloutStatus, u64)>,
        replicas: &[Replica],
        now: u64,
    ) -> Result<Advanced, ApiError> {
        let key = app.spec.key();
        let (status, mod_rev) = match &previous {
            Some((s, m)) if s.revision == app.revision => (s.clone(), Some(*m)),
            _ => (
                rollout::start(app, previous.as_ref().map(|(s, _)| s), now),
                previous.as_ref().map(|(_, m)| *m),
            ),
        };
        let sums = match (
            status.split(&app.spec.rollout),
            status.stable,
            status.step_started_at,
        ) {
            (Some((canary, _)), Some(stable), Some(step)) => Some((
                self.inner.metrics.since_step(&key, canary, step),
                self.inner.metrics.since_step(&key, stable, step),
            )),
            _ => None,
        };
        let measured = sums
            .as_ref()
            .map(|(canary, stable)| Measured { canary, stable });
        let decision = rollout::decide(app, &status, replicas, measured, now);
        if let Some(rb) = &decision.roll_back {
            tracing::warn!(app = %key, from = status.revision, to = rb.to, reason = %rb.reason, "rolling back");
            let txn = self.roll_back(txn, app, app_rev, &decision.status, mod_rev, rb)?;
            return Ok(Advanced::RolledBack(txn));
        }
        let mode = rollout::mode(app, Some(&decision.status));
        let unchanged = previous
            .as_ref()
            .is_some_and(|(s, _)| *s == decision.status);
        if unchanged {
            return Ok(Advanced::Mode(txn, mode, false));
        }
        let rkey = keys::rollout(&key);
        let mut txn = match mod_rev {
            Some(m) => txn.when_mod_revision(rkey.clone(), m),
            None => txn.when_absent(rkey.clone()),
        }
        .then(Op::put(rkey, encode(&decision.status)));
        if let Some((kind, reason, message)) = decision.event {
            txn = txn.then(self.event_op(kind, reason, format!("app/{key}"), Some(&key), message));
        }
        if decision.status.phase == RolloutPhase::Complete
            && let Some((mut revision, m)) =
                self.get::<Revision>(&keys::revision(&key, decision.status.revision))?
            && revision.outcome.is_none()
        {
            revision.outcome = Some("rolled out".into());
            let k = keys::revision(&key, revision.number);
            txn = txn
                .when_mod_revision(k.clone(), m)
                .then(Op::put(k, encode(&revision)));
        }
        Ok(Advanced::Mode(txn, mode, true))
    }

    /// Keeps the watch history to its last [`HISTORY`] revisions: older
    /// watchers re-read the snapshot, and the file stops growing.
    fn compact_history(&self) -> Result<(), ApiError> {
        let store = self.store();
        let target = store.revision().saturating_sub(HISTORY);
        if target > store.compacted_revision() + HISTORY / 10 {
            store.compact(target)?;
        }
        Ok(())
    }

    /// Keeps the newest `max_events` events.
    fn prune_events(&self) -> Result<(), ApiError> {
        let (events, _) = self.store().range(keys::EVENTS)?;
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

/// What [`ControlPlane::advance_rollout`] did.
enum Advanced {
    /// The rollout failed and is rolled back; reconcile on the next pass.
    RolledBack(Txn),
    /// The replica counts to reconcile towards, and whether it wrote.
    Mode(Txn, Mode, bool),
}

/// Revisions of watch history kept (about 3 hours of one node's heartbeats).
const HISTORY: u64 = 10_000;

/// Five random base-36 characters, like Kubernetes pod suffixes.
fn short_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut bytes = [0u8; 5];
    getrandom::fill(&mut bytes).expect("system randomness");
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}
