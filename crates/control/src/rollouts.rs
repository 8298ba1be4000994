//! Rollouts as users drive them (`shoal rollout status|pause|resume|promote|abort`),
//! the rollback write the controller and `abort` share, and what nodes tell the
//! control plane besides replica phases: gateway measurements and incidents.

use crate::error::ApiError;
use crate::state::{ControlPlane, encode, now_ms};
use serde::{Deserialize, Serialize};
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::keys;
use shoal_core::spec::{AppKey, Strategy};
use shoal_core::{
    App, EventType, Kind, Millis, Phase, Replica, Revision, RolloutPhase, RolloutStatus,
};
use shoal_scheduler::rollout::RollBack;
use shoal_store::{Op, Txn};
use std::collections::HashMap;
use std::sync::Mutex;

/// Gateway measurements: running totals per app revision since this control
/// plane started, and per app the totals when its current canary step began,
/// so a step is judged on the difference. Memory stays one entry per revision
/// that served, whatever the traffic; deleted apps' entries are dropped. In memory only: a restarted control
/// plane judges a canary step on what arrives after it.
#[derive(Default)]
pub(crate) struct Metrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Default)]
struct MetricsInner {
    totals: HashMap<(AppKey, u64), RevisionStats>,
    /// App → (step start it was taken for, totals per revision then).
    baselines: HashMap<AppKey, (Millis, HashMap<u64, RevisionStats>)>,
}

impl Metrics {
    pub(crate) fn record(&self, stats: Vec<RevisionStats>) {
        let mut inner = self.inner.lock().expect("metrics lock");
        for s in stats {
            inner
                .totals
                .entry((s.app.clone(), s.revision))
                .or_insert_with(|| RevisionStats::new(s.app.clone(), s.revision))
                .merge(&s);
        }
    }

    /// Forgets the measurements of apps that are gone.
    pub(crate) fn retain_apps(&self, keep: impl Fn(&AppKey) -> bool) {
        let mut inner = self.inner.lock().expect("metrics lock");
        inner.totals.retain(|(app, _), _| keep(app));
        inner.baselines.retain(|app, _| keep(app));
    }

    /// What `app`'s revision `revision` served since the step that started at
    /// `step`: counted from the first time anyone asks about that step.
    pub(crate) fn since_step(&self, app: &AppKey, revision: u64, step: Millis) -> RevisionStats {
        let mut guard = self.inner.lock().expect("metrics lock");
        let inner = &mut *guard;
        let fresh = inner.baselines.get(app).is_none_or(|(t, _)| *t != step);
        if fresh {
            let now: HashMap<u64, RevisionStats> = inner
                .totals
                .iter()
                .filter(|((a, _), _)| a == app)
                .map(|((_, rev), s)| (*rev, s.clone()))
                .collect();
            inner.baselines.insert(app.clone(), (step, now));
        }
        let zero = RevisionStats::new(app.clone(), revision);
        let total = inner.totals.get(&(app.clone(), revision)).unwrap_or(&zero);
        match inner.baselines.get(app).and_then(|(_, b)| b.get(&revision)) {
            Some(base) => total.since(base),
            None => total.clone(),
        }
    }
}

/// `shoal rollout status`: where the rollout stands and what runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    pub app: AppKey,
    /// The revision the app runs now; `status` may still describe an earlier
    /// one until the controller has seen the change.
    pub revision: u64,
    pub kind: Kind,
    pub desired: u32,
    /// `None` for jobs, which run to completion instead of rolling, and for a
    /// new app until the controller has seen it.
    pub status: Option<RolloutStatus>,
    pub steps: usize,
    /// Percent of traffic the canary gets now, during a canary step.
    pub weight: Option<u8>,
    /// Replicas per revision, newest first.
    pub revisions: Vec<RevisionCount>,
    /// What the gateways measured of canary and stable since the step began.
    pub canary: Option<RevisionStats>,
    pub stable: Option<RevisionStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevisionCount {
    pub revision: u64,
    pub replicas: usize,
    pub ready: usize,
}

/// What `shoal rollout <action>` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    Pause,
    Resume,
    /// Canary: end the current step now; `full`: skip every remaining step.
    Promote,
    /// Back to the stable revision.
    Abort,
}

/// Something that happened to a replica that only its node sees: a request
/// killed by its timeout, an instance out of memory, a trap.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaIncident {
    pub app: AppKey,
    pub replica: String,
    pub node: String,
    /// `KilledByTimeout`, `OutOfMemory` or `Trapped`.
    pub reason: String,
    pub message: String,
}

pub const INCIDENT_REASONS: [&str; 3] = ["KilledByTimeout", "OutOfMemory", "Trapped"];

impl ControlPlane {
    pub(crate) fn rollout_view(&self, key: &AppKey) -> Result<RolloutView, ApiError> {
        let app = self.app(key)?;
        let status = self
            .get::<RolloutStatus>(&keys::rollout(key))?
            .map(|(s, _)| s);
        let replicas = self.list::<Replica>(&keys::replicas_of(key))?;
        let mut counts: Vec<RevisionCount> = Vec::new();
        for r in replicas.iter().filter(|r| !r.phase.is_terminal()) {
            let ready = matches!(r.phase, Phase::Ready | Phase::Running) as usize;
            match counts.iter_mut().find(|c| c.revision == r.revision) {
                Some(c) => {
                    c.replicas += 1;
                    c.ready += ready;
                }
                None => counts.push(RevisionCount {
                    revision: r.revision,
                    replicas: 1,
                    ready,
                }),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.revision));
        let split = status.as_ref().and_then(|s| s.split(&app.spec.rollout));
        let (canary, stable) = match (&status, split) {
            (Some(s), Some((c, _))) => match (s.step_started_at, s.stable) {
                (Some(step), Some(stable)) => (
                    Some(self.inner.metrics.since_step(key, c, step)),
                    Some(self.inner.metrics.since_step(key, stable, step)),
                ),
                _ => (None, None),
            },
            _ => (None, None),
        };
        Ok(RolloutView {
            app: key.clone(),
            revision: app.revision,
            kind: app.spec.component.kind,
            desired: app.spec.replicas,
            steps: app.spec.rollout.steps.len(),
            weight: split.map(|(_, w)| w),
            status,
            revisions: counts,
            canary,
            stable,
        })
    }

    /// Pause, resume, promote or abort the app's rollout in progress, retrying
    /// when the controller updated it meanwhile.
    pub(crate) fn rollout_action(
        &self,
        key: &AppKey,
        action: RolloutAction,
        full: bool,
    ) -> Result<RolloutStatus, ApiError> {
        for _ in 0..5 {
            if let Some(status) = self.try_rollout_action(key, action, full)? {
                return Ok(status);
            }
        }
        Err(ApiError::conflict(format!(
            "rollout of {key} kept changing; try again"
        )))
    }

    /// One attempt; `None` if it lost a race.
    fn try_rollout_action(
        &self,
        key: &AppKey,
        action: RolloutAction,
        full: bool,
    ) -> Result<Option<RolloutStatus>, ApiError> {
        let (app, app_rev) = self
            .get::<App>(&keys::app(key))?
            .ok_or_else(|| ApiError::not_found(format!("app {key} does not exist")))?;
        let Some((mut status, status_rev)) = self.get::<RolloutStatus>(&keys::rollout(key))? else {
            return Err(ApiError::conflict(format!(
                "app {key} has no rollout yet; try again in a moment"
            )));
        };
        if status.phase.is_done() || status.revision != app.revision {
            return Err(ApiError::conflict(format!(
                "app {key} has no rollout in progress (revision {} is {})",
                status.revision, status.phase
            )));
        }
        let now = now_ms();
        let (reason, message) = match action {
            RolloutAction::Pause => {
                status.paused = true;
                (
                    "Paused",
                    format!("rollout of revision {} paused", status.revision),
                )
            }
            RolloutAction::Resume => {
                status.paused = false;
                // The deadline and the step's pause count from now.
                status.progressed_at = now;
                if status.step_started_at.is_some() {
                    status.step_started_at = Some(now);
                }
                (
                    "Resumed",
                    format!("rollout of revision {} resumed", status.revision),
                )
            }
            RolloutAction::Promote => {
                if status.strategy != Strategy::Canary {
                    return Err(ApiError::bad_request(
                        "not_a_canary",
                        format!(
                            "app {key} rolls with strategy = \"rolling\": there is no step to promote; `shoal rollout resume` continues a paused one"
                        ),
                    ));
                }
                let steps = app.spec.rollout.steps.len();
                status.step = if full {
                    steps
                } else {
                    (status.step + 1).min(steps)
                };
                status.step_started_at = None;
                status.progressed_at = now;
                status.paused = false;
                let message = if status.step == steps {
                    format!("revision {} promoted to 100%", status.revision)
                } else {
                    format!(
                        "revision {} promoted to step {}/{steps}",
                        status.revision,
                        status.step + 1
                    )
                };
                ("Promoted", message)
            }
            RolloutAction::Abort => {
                let Some(to) = status.stable.filter(|s| *s != status.revision) else {
                    return Err(ApiError::conflict(format!(
                        "app {key} has no earlier revision that rolled out to go back to"
                    )));
                };
                let rb = RollBack {
                    to,
                    phase: RolloutPhase::Aborted,
                    reason: "aborted by `shoal rollout abort`".into(),
                };
                let txn =
                    self.roll_back(Txn::new(), &app, app_rev, &status, Some(status_rev), &rb)?;
                if !self.store().txn(txn)?.succeeded {
                    return Ok(None);
                }
                self.inner.kick.notify_one();
                return Ok(self
                    .get::<RolloutStatus>(&keys::rollout(key))?
                    .map(|(s, _)| s));
            }
        };
        status.message = message.clone();
        // Guarded by the app too: an apply landing meanwhile starts a new rollout,
        // and this action must not silently go to the one it replaced.
        let txn = Txn::new()
            .when_mod_revision(keys::app(key), app_rev)
            .when_mod_revision(keys::rollout(key), status_rev)
            .then(Op::put(keys::rollout(key), encode(&status)))
            .then(self.event_op(
                EventType::Normal,
                reason,
                format!("app/{key}"),
                Some(key),
                message,
            ));
        if !self.store().txn(txn)?.succeeded {
            return Ok(None);
        }
        self.inner.kick.notify_one();
        Ok(Some(status))
    }

    /// Adds to `txn` going back to revision `rb.to`: the app runs its template
    /// again under its own number (its replicas are current again, nothing
    /// restarts), the abandoned revision records why, and an event says so.
    pub(crate) fn roll_back(
        &self,
        txn: Txn,
        app: &App,
        app_rev: u64,
        status: &RolloutStatus,
        status_rev: Option<u64>,
        rb: &RollBack,
    ) -> Result<Txn, ApiError> {
        let key = app.spec.key();
        let Some((target, _)) = self.get::<Revision>(&keys::revision(&key, rb.to))? else {
            return Err(ApiError::internal(format!(
                "app {key}: revision {} to roll back to is missing",
                rb.to
            )));
        };
        let now = now_ms();
        let updated = App {
            spec: app.spec.with_template(&target.template),
            revision: rb.to,
            created_at: app.created_at,
            updated_at: now,
        };
        let verb = match rb.phase {
            RolloutPhase::Aborted => "aborted",
            _ => "rolled back",
        };
        let after = RolloutStatus {
            revision: rb.to,
            stable: Some(rb.to),
            phase: rb.phase,
            paused: false,
            step_started_at: None,
            progressed_at: now,
            rolled_back_from: Some(status.revision),
            message: format!(
                "revision {} {verb}, back on revision {}: {}",
                status.revision, rb.to, rb.reason
            ),
            ..status.clone()
        };
        let rkey = keys::rollout(&key);
        let mut txn = txn
            .when_mod_revision(keys::app(&key), app_rev)
            .then(Op::put(keys::app(&key), encode(&updated)));
        txn = match status_rev {
            Some(m) => txn.when_mod_revision(rkey.clone(), m),
            None => txn.when_absent(rkey.clone()),
        };
        txn = txn.then(Op::put(rkey, encode(&after)));
        if let Some((mut bad, m)) = self.get::<Revision>(&keys::revision(&key, status.revision))? {
            bad.outcome = Some(format!("{verb}: {}", rb.reason));
            let k = keys::revision(&key, status.revision);
            txn = txn
                .when_mod_revision(k.clone(), m)
                .then(Op::put(k, encode(&bad)));
        }
        let reason = match rb.phase {
            RolloutPhase::Aborted => "Aborted",
            _ => "RolledBack",
        };
        Ok(txn.then(self.event_op(
            EventType::Warning,
            reason,
            format!("app/{key}"),
            Some(&key),
            after.message,
        )))
    }

    /// Gateway measurements from a node, counted from now.
    pub fn record_metrics(&self, stats: Vec<RevisionStats>) {
        self.inner.metrics.record(stats);
    }

    /// An incident on a node's replica becomes an event, if the node runs it.
    pub fn record_incident(&self, incident: ReplicaIncident) -> Result<(), ApiError> {
        let Some(reason) = INCIDENT_REASONS
            .iter()
            .find(|r| **r == incident.reason)
            .copied()
        else {
            return Err(ApiError::bad_request(
                "invalid_incident",
                format!(
                    "unknown incident {:?}; expected one of {INCIDENT_REASONS:?}",
                    incident.reason
                ),
            ));
        };
        let key = keys::replica(&incident.app, &incident.replica);
        let owned = self
            .get::<Replica>(&key)?
            .is_some_and(|(r, _)| r.node.as_deref() == Some(incident.node.as_str()));
        if !owned {
            return Ok(());
        }
        let txn = Txn::new().then(self.event_op(
            EventType::Warning,
            reason,
            format!("replica/{}/{}", incident.app, incident.replica),
            Some(&incident.app),
            format!(
                "replica {} on node {}: {}",
                incident.replica, incident.node, incident.message
            ),
        ));
        self.store().txn(txn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_counts_from_its_start() {
        let m = Metrics::default();
        let app = AppKey::new("default", "a");
        let stats = |rev, requests| {
            let mut s = RevisionStats::new(app.clone(), rev);
            s.requests = requests;
            s
        };
        m.record(vec![stats(1, 10), stats(2, 1)]);
        // The first question about a step starts its count.
        assert_eq!(m.since_step(&app, 2, 100).requests, 0);
        m.record(vec![stats(1, 20), stats(2, 2)]);
        assert_eq!(m.since_step(&app, 2, 100).requests, 2);
        assert_eq!(m.since_step(&app, 1, 100).requests, 20);
        // A revision first seen during the step counts whole.
        m.record(vec![stats(3, 5)]);
        assert_eq!(m.since_step(&app, 3, 100).requests, 5);
        // The next step starts over.
        assert_eq!(m.since_step(&app, 2, 200).requests, 0);
        assert_eq!(m.since_step(&AppKey::new("x", "a"), 2, 200).requests, 0);
        m.retain_apps(|a| a.name != "a");
        assert_eq!(m.since_step(&app, 1, 300).requests, 0);
        assert!(m.inner.lock().unwrap().totals.is_empty());
    }
}
