//! Rollouts as users drive them (`shoal rollout status|pause|resume|promote|abort`;
//! the arithmetic is `shoal_scheduler::rollout::act`), and what nodes tell the
//! control plane besides replica phases: gateway measurements and incidents.

use crate::error::ControlError;
use crate::shared_reports::Report;
use crate::state::ControlPlane;
use shoal_api::{
    AppCpu, INCIDENT_REASONS, ReplicaIncident, RevisionCount, RolloutAction, RolloutView, Waiting,
};
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{AppKey, Kind};
use shoal_core::{App, EventType, Replica, Revision, RolloutPhase, RolloutStatus, Volume};
use shoal_scheduler::plan::{Batch, Change, Expect, Read, Volumes, roll_back_into};
use shoal_scheduler::rollout::{self, Acted, Action, ActionError};
use shoal_store::Txn;
use std::collections::BTreeMap;

impl ControlPlane {
    pub(crate) fn rollout_view(&self, key: &AppKey) -> Result<RolloutView, ControlError> {
        let app = self.app(key)?;
        let status = self
            .get::<RolloutStatus>(&keys::rollout(key))?
            .map(|(s, _)| s);
        let replicas = self.list::<Replica>(&keys::replicas_of(key))?;
        let mut counts: Vec<RevisionCount> = Vec::new();
        for r in replicas.iter().filter(|r| !r.phase.is_terminal()) {
            let ready = r.serving() as usize;
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
        let mut status = status;
        if let Some(s) = &mut status {
            completed_now(s, &app, &replicas, self.now());
        }
        let split = status.as_ref().and_then(|s| s.split(&app.spec.rollout));
        let (canary, stable) = match (&status, split) {
            (Some(s), Some((c, _))) => match (s.step_started_at, s.stable) {
                (Some(step), Some(stable)) => (
                    self.inner.metrics.since_step(key, c, step),
                    self.inner.metrics.since_step(key, stable, step),
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
            // What the gateways do: 0 % to a canary rolled back while its replicas go (and
            // nothing once they are gone).
            weight: split.map(|(_, w)| w).or_else(|| {
                let (left, w) = status.as_ref()?.traffic(&app.spec.rollout)?;
                counts.iter().any(|c| c.revision == left).then_some(w)
            }),
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
    ) -> Result<RolloutStatus, ControlError> {
        for _ in 0..5 {
            if let Some(status) = self.try_rollout_action(key, action, full)? {
                return Ok(status);
            }
        }
        Err(ControlError::conflict(format!(
            "rollout of {key} kept changing; try again"
        )))
    }

    /// One attempt; `None` if it lost a race.
    fn try_rollout_action(
        &self,
        key: &AppKey,
        action: RolloutAction,
        full: bool,
    ) -> Result<Option<RolloutStatus>, ControlError> {
        let (app, app_rev) = self
            .get::<App>(&keys::app(key))?
            .ok_or_else(|| ControlError::not_found(format!("app {key} does not exist")))?;
        if app.spec.component.kind == Kind::Job {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                format!("app {key} is a job: jobs run to completion and do not roll out"),
            ));
        }
        let Some((status, status_rev)) = self.get::<RolloutStatus>(&keys::rollout(key))? else {
            return Err(ControlError::conflict(format!(
                "app {key} has no rollout yet; try again in a moment"
            )));
        };
        let action = match action {
            RolloutAction::Pause => Action::Pause,
            RolloutAction::Resume => Action::Resume,
            RolloutAction::Promote => Action::Promote { full },
            RolloutAction::Abort => Action::Abort,
        };
        let now = self.now();
        // Guarded by the app too: an apply landing meanwhile starts a new rollout,
        // and this action must not silently go to the one it replaced.
        let mut batch = Batch::for_app(key.clone(), Expect::At(app_rev));
        let expect = Expect::At(status_rev);
        match rollout::act(&app, &status, action, now).map_err(action_error)? {
            Acted::Status { status, reason } => {
                let message = status.message.clone();
                batch.changes.push(Change::PutRollout { status, expect });
                batch.event(
                    EventType::Normal,
                    reason,
                    format!("app/{key}"),
                    Some(key),
                    message,
                );
            }
            Acted::RollBack(rb) => {
                let Some((target, _)) = self.get::<Revision>(&keys::revision(key, rb.to))? else {
                    return Err(ControlError::internal(format!(
                        "app {key}: revision {} to roll back to is missing",
                        rb.to
                    )));
                };
                let bad = self
                    .get::<Revision>(&keys::revision(key, status.revision))?
                    .map(|(r, m)| Read::new(r, m));
                let mut records = BTreeMap::new();
                for mount in &target.template.volumes {
                    let name = (key.namespace.clone(), mount.name.clone());
                    let vkey = keys::volume(&name.0, &name.1);
                    if let Some((volume, at)) = self.get::<Volume>(&vkey)? {
                        records.insert(name, Read::new(volume, at));
                    }
                }
                let used = self.volume_usage();
                roll_back_into(
                    &mut batch,
                    &app,
                    &status,
                    expect,
                    &target,
                    bad.as_ref(),
                    &rb,
                    &Volumes {
                        records: &records,
                        used: &used,
                    },
                    now,
                );
            }
        }
        if !self.store().txn(self.batch_txn(batch))?.succeeded {
            return Ok(None);
        }
        self.inner.kick.notify_one();
        Ok(self
            .get::<RolloutStatus>(&keys::rollout(key))?
            .map(|(s, _)| s))
    }

    /// Gateway measurements from `node`, counted from now: only for apps and revisions that
    /// exist (or the no-replica revision 0 of an app that exists), so reports cannot grow the
    /// measurements without bound.
    pub fn record_metrics(&self, node: &str, stats: Vec<RevisionStats>) {
        self.share(|| Report::Metrics {
            node: node.to_string(),
            stats: stats.clone(),
        });
        self.note_metrics(node, stats);
    }

    /// Records a node's report of its gateway's measurements, from it or another server.
    pub(crate) fn note_metrics(&self, node: &str, stats: Vec<RevisionStats>) {
        let mut current = BTreeMap::new();
        let stats: Vec<RevisionStats> = stats
            .into_iter()
            .filter(|s| {
                let revision = *current.entry(s.app.clone()).or_insert_with(|| {
                    self.get::<App>(&keys::app(&s.app))
                        .ok()
                        .flatten()
                        .map_or(0, |(app, _)| app.revision)
                });
                revision > 0 && s.revision <= revision
            })
            .collect();
        self.inner.metrics.record(node, stats, self.steady_now());
    }

    /// A node's running CPU totals per app, for `describe`.
    pub fn record_cpu(&self, node: &str, usage: Vec<AppCpu>) {
        self.share(|| Report::Cpu {
            node: node.to_string(),
            usage: usage.clone(),
        });
        self.note_cpu(node, usage);
    }

    pub(crate) fn note_cpu(&self, node: &str, usage: Vec<AppCpu>) {
        let now = self.steady_now();
        for u in usage {
            self.inner
                .metrics
                .set_cpu(&u.app, node, u.used_ns, u.throttled_ns, now);
        }
    }

    /// Requests `node`'s gateway holds for apps with no ready replica. A waiting
    /// request starts the next pass at once: it is someone waiting on a wake.
    pub fn record_waiting(&self, node: &str, waiting: Vec<Waiting>) {
        self.share(|| Report::Waiting {
            node: node.to_string(),
            waiting: waiting.clone(),
        });
        self.note_waiting(node, waiting);
    }

    /// `node` (re)registered: a gateway that starts holds nothing, so what its previous run
    /// said it held goes, on every server. It would else keep its apps awake (or up) for good.
    pub(crate) fn node_started(&self, node: &str) {
        let held: Vec<Waiting> = (self.inner.metrics.held_by(node).into_iter())
            .map(|app| Waiting { app, requests: 0 })
            .collect();
        if !held.is_empty() {
            self.record_waiting(node, held);
        }
    }

    pub(crate) fn note_waiting(&self, node: &str, waiting: Vec<Waiting>) {
        let now = self.steady_now();
        let mut wake = false;
        for w in waiting {
            wake |= w.requests > 0;
            self.inner
                .metrics
                .set_waiting(&w.app, node, w.requests, now);
        }
        if wake {
            self.inner.kick.notify_one();
        }
    }

    /// An incident on a node's replica becomes an event, if the node runs it.
    pub fn record_incident(&self, incident: ReplicaIncident) -> Result<(), ControlError> {
        let Some(reason) = INCIDENT_REASONS
            .iter()
            .find(|r| **r == incident.reason)
            .copied()
        else {
            return Err(ControlError::invalid(
                ErrorCode::InvalidIncident,
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
        let counted = crate::prometheus::AppReason {
            namespace: incident.app.namespace.clone(),
            app: incident.app.name.clone(),
            reason: reason.to_string(),
        };
        self.inner.observed.incidents.get_or_create(&counted).inc();
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

/// A completed rollout of `app`'s revision as it stands now (`now`): how many of its
/// `replicas` are ready of those the app wants, schedule windows open now included. `shoal
/// scale`, the autoscaler and windows change how many there are after it completed, and the
/// record is not written again for that.
pub(crate) fn completed_now(
    status: &mut RolloutStatus,
    app: &App,
    replicas: &[Replica],
    now: shoal_core::objects::Millis,
) {
    if status.phase != RolloutPhase::Complete || status.revision != app.revision || status.paused {
        return;
    }
    let ready = (replicas.iter())
        .filter(|r| r.revision == status.revision && !r.phase.is_terminal() && r.serving())
        .count();
    status.ready = u32::try_from(ready).unwrap_or(u32::MAX);
    let wanted = (app.spec.scale.bounds(app.spec.replicas, now)).clamp(app.spec.replicas);
    status.message = RolloutStatus::rolled_out(status.revision, status.ready, wanted);
}

/// Why a rollout action cannot be taken, as the API says it.
fn action_error(e: ActionError) -> ControlError {
    match e {
        ActionError::NotACanary(_) => ControlError::invalid(ErrorCode::NotACanary, e.to_string()),
        ActionError::NotInProgress { .. } | ActionError::NothingToGoBackTo(_) => {
            ControlError::conflict(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RolloutAction;
    use crate::state::encode;
    use crate::state::tests::{control_plane, replica_of, uploaded};
    use shoal_core::Volume;
    use shoal_core::objects::keys;
    use shoal_core::spec::parse_app;
    use shoal_core::{Phase, RolloutPhase, RolloutStatus};
    use shoal_store::{Op, Txn};

    /// After a canary is aborted, the view says 0 % goes to its revision while replicas of
    /// it are there, and nothing once they are gone.
    #[test]
    fn an_aborted_canary_shows_no_traffic_while_its_replicas_go() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/web\"]\n[rollout]\nstrategy = \"canary\"\n\
             steps = [{{ weight = 25, pause = \"1s\" }}]\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        let key = spec.key();
        cp.apply(spec.clone(), false).unwrap();
        let app = cp.app(&key).unwrap();
        let mut status = shoal_scheduler::rollout::start(&app, None, 0);
        status.phase = RolloutPhase::Aborted;
        status.rolled_back_from = Some(2);
        status.stable = Some(1);
        let canary = replica_of(&spec, "c", 2, "n", Phase::Ready);
        cp.store()
            .txn(
                Txn::new()
                    .then(Op::put(
                        keys::rollout(&key),
                        encode::<RolloutStatus>(&status),
                    ))
                    .then(Op::put(keys::replica(&key, "c"), encode(&canary))),
            )
            .unwrap();
        assert_eq!(cp.rollout_view(&key).unwrap().weight, Some(0));
        cp.store()
            .txn(Txn::new().then(Op::delete(keys::replica(&key, "c"))))
            .unwrap();
        assert_eq!(cp.rollout_view(&key).unwrap().weight, None);
    }

    /// After `shoal scale`, a completed rollout says how many replicas are ready now, not
    /// what was true when it completed.
    #[test]
    fn a_completed_rollout_says_how_many_replicas_are_ready_now() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/web\"]\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        let key = spec.key();
        cp.apply(spec.clone(), false).unwrap();
        let app = cp.app(&key).unwrap();
        let mut status = shoal_scheduler::rollout::start(&app, None, 0);
        status.phase = RolloutPhase::Complete;
        status.ready = 1;
        status.message = RolloutStatus::rolled_out(1, 1, 1);
        let mut txn = Txn::new().then(Op::put(keys::rollout(&key), encode(&status)));
        for (id, phase) in [
            ("a", Phase::Ready),
            ("b", Phase::Ready),
            ("c", Phase::Pending),
        ] {
            let replica = replica_of(&spec, id, 1, "n", phase);
            txn = txn.then(Op::put(keys::replica(&key, id), encode(&replica)));
        }
        cp.store().txn(txn).unwrap();
        cp.scale(&key, 3).unwrap();
        let view = cp.rollout_view(&key).unwrap();
        let status = view.status.unwrap();
        assert_eq!(status.message, "revision 1 rolled out: 2/3 replicas ready");
        assert_eq!(status.ready, 2);
        let described = cp.describe(&key).unwrap().rollout.unwrap();
        assert_eq!(described, status, "describe says the same");
        // A schedule window open now sets how many it wants, as `get apps` says.
        let windowed = format!(
            "{src}[[scale.schedule]]\nname = \"always\"\ncron = \"* * * * *\"\n\
             duration = \"10m\"\nreplicas = 4\n"
        );
        let windowed = parse_app(&windowed)
            .unwrap()
            .resolve(uploaded(&cp))
            .unwrap();
        cp.apply(windowed, false).unwrap();
        let status = cp.rollout_view(&key).unwrap().status.unwrap();
        assert_eq!(status.message, "revision 1 rolled out: 2/4 replicas ready");
    }

    /// An aborted canary gives the volumes it mounts back the stable revision's sizes, as
    /// `rollout undo` would; one that holds more keeps its size, and the abort goes ahead.
    #[test]
    fn an_abort_gives_volumes_the_stable_revisions_sizes_as_far_as_they_fit() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |size: &str| {
            let src = format!(
                "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
                 [http]\nroutes = [\"/web\"]\n[rollout]\nstrategy = \"canary\"\n\
                 steps = [{{ weight = 25, pause = \"1h\" }}]\n\
                 [[volumes]]\nname = \"data\"\nmount = \"/data\"\nsize = \"{size}\"\n"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let size = || {
            let volume = cp.get::<Volume>(&keys::volume("default", "data")).unwrap();
            volume.unwrap().0.size_bytes
        };
        let key = spec("10Mi").key();
        // A canary of `size` in progress from what runs now, as the controller starts one.
        let canary = |size: &str| {
            let (status, at) = cp
                .get::<RolloutStatus>(&keys::rollout(&key))
                .unwrap()
                .unzip();
            let mut stable = status.unwrap_or_else(|| {
                shoal_scheduler::rollout::start(&cp.app(&key).unwrap(), None, 0)
            });
            stable.phase = RolloutPhase::Complete;
            cp.apply(spec(size), false).unwrap();
            let started = shoal_scheduler::rollout::start(&cp.app(&key).unwrap(), Some(&stable), 0);
            let guard = match at {
                Some(at) => Txn::new().when_mod_revision(keys::rollout(&key), at),
                None => Txn::new(),
            };
            cp.store()
                .txn(guard.then(Op::put(keys::rollout(&key), encode(&started))))
                .unwrap();
        };
        cp.apply(spec("10Mi"), false).unwrap();
        canary("20Mi");
        assert_eq!(size(), 20 << 20);
        cp.rollout_action(&key, RolloutAction::Abort, false)
            .unwrap();
        assert_eq!((cp.app(&key).unwrap().revision, size()), (1, 10 << 20));

        canary("30Mi");
        cp.inner
            .volume_usage
            .lock()
            .unwrap()
            .insert(("default".into(), "data".into()), 15 << 20);
        let status = cp
            .rollout_action(&key, RolloutAction::Abort, false)
            .unwrap();
        assert_eq!(status.phase, RolloutPhase::Aborted);
        assert_eq!(size(), 30 << 20, "it holds 15Mi: kept");
        let events = cp.events(Some(&key), 100).unwrap();
        assert!(
            events.iter().any(|e| e.reason == "VolumeNotResized"
                && e.message
                    .contains("volume data holds 15Mi: size = \"10Mi\" is less")),
            "{events:?}"
        );
    }
}
