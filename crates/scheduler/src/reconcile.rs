//! App → replicas: given the app and the replicas that exist, what to create
//! and what to remove. Never told why it was called, so it is idempotent.
//!
//! A change of revision rolls: `max_surge` new replicas above the desired
//! count, `max_unavailable` below it. New replicas are created a few at a time
//! and an old one is removed only once enough replicas serve without it. A
//! canary step (or a paused rollout) instead holds a number of replicas of
//! each of two revisions; see [`Mode`].

use shoal_core::spec::AppSpec;
use shoal_core::{App, Kind, Millis, Phase, Replica};

/// What the app's rollout asks of its replica counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every replica runs `app.revision`; others are replaced, new before old.
    Roll,
    /// `canary` replicas of `app.revision` and `stable_replicas` of `stable`: a
    /// canary step.
    Split {
        stable: u64,
        canary: u32,
        stable_replicas: u32,
    },
    /// A paused rollout: nothing is created or removed until it resumes.
    Hold,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// How many replicas of the app's current revision to create.
    pub create: usize,
    /// How many replicas of the stable revision to create ([`Mode::Split`] only).
    pub create_stable: usize,
    /// Replica ids to remove.
    pub delete: Vec<String>,
}

/// How long a replica of a long-running app stays `Failed` (its node gave up on it: its module
/// or a volume could not be loaded) before it is replaced: soon, but not on every pass when
/// each replacement fails the same way.
pub const REPLACE_FAILED_AFTER_MS: Millis = 10_000;

/// Removal order among surplus replicas: the ones doing least first, newest first.
fn removal_rank(r: &Replica) -> (u8, std::cmp::Reverse<u64>) {
    let rank = match r.phase {
        Phase::Pending => 0,
        Phase::Failed | Phase::CrashLoopBackOff => 1,
        Phase::Starting | Phase::Unready => 2,
        Phase::Succeeded => 3,
        Phase::Ready | Phase::Running => 4,
    };
    (rank, std::cmp::Reverse(r.created_at))
}

/// `replace(replica)` says whether a replica must go although its revision is
/// right (its node is being drained, or it moves to rebalance the cluster): it
/// is replaced like one of an old revision, new before old.
///
/// A new replica counts as serving once it is available at `now` (served for the app's
/// `rollout.min_ready`): only then may an old one go for it.
pub fn reconcile(
    app: &App,
    replicas: &[Replica],
    replace: impl Fn(&Replica) -> bool,
    mode: Mode,
    now: Millis,
) -> Plan {
    match mode {
        Mode::Hold => Plan::default(),
        Mode::Roll => {
            let (create, delete) = roll(
                &app.spec,
                app.revision,
                app.spec.replicas,
                replicas,
                &replace,
                now,
            );
            Plan {
                create,
                create_stable: 0,
                delete,
            }
        }
        Mode::Split {
            stable,
            canary,
            stable_replicas,
        } => {
            let (new, rest): (Vec<Replica>, Vec<Replica>) = replicas
                .iter()
                .cloned()
                .partition(|r| r.revision == app.revision);
            let (create, mut delete) = roll(&app.spec, app.revision, canary, &new, &replace, now);
            let (create_stable, more) =
                roll(&app.spec, stable, stable_replicas, &rest, &replace, now);
            delete.extend(more);
            Plan {
                create,
                create_stable,
                delete,
            }
        }
    }
}

/// Rolls `replicas` towards `desired` of `revision`: how many to create, which to remove.
fn roll(
    spec: &AppSpec,
    revision: u64,
    desired: u32,
    replicas: &[Replica],
    replace: &impl Fn(&Replica) -> bool,
    now: Millis,
) -> (usize, Vec<String>) {
    let desired = desired as usize;
    let surge = spec.rollout.max_surge as usize;
    let floor = desired.saturating_sub(spec.rollout.max_unavailable as usize);
    // A finished job stays what it is wherever it ran: draining does not rerun it. A
    // long-running replica its node gave up on counts for nothing, and is replaced.
    let given_up = |r: &Replica| {
        r.kind != Kind::Job
            && r.phase == Phase::Failed
            && now.saturating_sub(r.updated_at) >= REPLACE_FAILED_AFTER_MS
    };
    let (mut current, old): (Vec<&Replica>, Vec<&Replica>) = replicas.iter().partition(|r| {
        r.revision == revision
            && !given_up(r)
            && (!replace(r) || (r.kind == Kind::Job && r.phase.is_terminal()))
    });
    let mut create = 0;
    let mut delete = Vec::new();

    // Old replicas that serve nothing go at once; a job's old runs are stale.
    let mut old_serving: Vec<&Replica> = Vec::new();
    for r in old {
        if r.serving() && spec.component.kind != Kind::Job {
            old_serving.push(r);
        } else {
            delete.push(r.id.clone());
        }
    }

    if current.len() > desired {
        current.sort_by_key(|r| removal_rank(r));
        let surplus = current.len() - desired;
        delete.extend(current.drain(..surplus).map(|r| r.id.clone()));
    } else if current.len() < desired {
        let missing = desired - current.len();
        create = if old_serving.is_empty() {
            missing
        } else {
            (desired + surge)
                .saturating_sub(current.len() + old_serving.len())
                .min(missing)
        };
    }

    // Retire old replicas, oldest first, while enough others serve.
    let min_ready = spec.rollout.min_ready_ms;
    let mut serving_now = current
        .iter()
        .filter(|r| r.available(min_ready, now))
        .count()
        + old_serving.len();
    old_serving.sort_by_key(|r| r.created_at);
    let mut kept = Vec::new();
    let serving_before = serving_now;
    for r in old_serving {
        if serving_now > floor {
            delete.push(r.id.clone());
            serving_now -= 1;
        } else {
            kept.push(r);
        }
    }
    // A new replica fits nowhere while old ones may hold the room it needs (a full
    // cluster, or one replica per node required): one of them goes although one fewer
    // then serves than the rollout allows, so it progresses; one at a time, never further
    // below, and only if none was retired above (that one frees the room). Only one on a
    // node that takes replicas: one leaving a drained node, or moving off its node, frees
    // room where no new replica may go, and would only stop serving.
    let blocked = current
        .iter()
        .any(|r| r.node.is_none() && r.phase == Phase::Pending && r.message.is_some());
    if blocked
        && serving_now == serving_before
        && serving_now >= floor
        && let Some(r) = kept.iter().find(|r| !replace(r))
    {
        delete.push(r.id.clone());
    }
    (create, delete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(kind: &str, replicas: u32, revision: u64) -> App {
        crate::testing::app_with(kind, replicas, revision, "")
    }

    fn replica(id: &str, revision: u64, phase: Phase, created_at: u64) -> Replica {
        crate::testing::replica_at(id, revision, phase, created_at)
    }

    #[test]
    fn creates_missing_replicas() {
        assert_eq!(
            reconcile(&app("http", 3, 1), &[], |_| false, Mode::Roll, 0),
            Plan {
                create: 3,
                delete: vec![],
                ..Plan::default()
            }
        );
        let rs = [replica("x", 1, Phase::Ready, 1)];
        assert_eq!(
            reconcile(&app("http", 3, 1), &rs, |_| false, Mode::Roll, 0).create,
            2
        );
    }

    #[test]
    fn steady_state_is_a_no_op() {
        let rs = [
            replica("x", 1, Phase::Ready, 1),
            replica("y", 1, Phase::Pending, 2),
        ];
        assert_eq!(
            reconcile(&app("http", 2, 1), &rs, |_| false, Mode::Roll, 0),
            Plan::default()
        );
    }

    #[test]
    fn scales_down_least_useful_first() {
        let rs = [
            replica("ready-old", 1, Phase::Ready, 1),
            replica("ready-new", 1, Phase::Ready, 3),
            replica("pending", 1, Phase::Pending, 2),
        ];
        let plan = reconcile(&app("http", 1, 1), &rs, |_| false, Mode::Roll, 0);
        assert_eq!(plan.delete, vec!["pending", "ready-new"]);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn rolls_with_one_surge_and_none_unavailable() {
        let a = app("http", 2, 2);
        let mut rs = vec![
            replica("o1", 1, Phase::Ready, 1),
            replica("o2", 1, Phase::Ready, 2),
        ];
        // Step 1: one new replica, no old one removed yet.
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 1,
                delete: vec![],
                ..Plan::default()
            }
        );
        rs.push(replica("n1", 2, Phase::Starting, 3));
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan::default()
        );
        // Step 2: n1 ready → the oldest old replica goes.
        rs[2].phase = Phase::Ready;
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 0,
                delete: vec!["o1".into()],
                ..Plan::default()
            }
        );
        rs.remove(0);
        // Step 3: room for the second new replica.
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 1,
                delete: vec![],
                ..Plan::default()
            }
        );
        rs.push(replica("n2", 2, Phase::Ready, 4));
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 0,
                delete: vec!["o2".into()],
                ..Plan::default()
            }
        );
    }

    /// With `min_ready`, a new replica that is ready frees an old one only once it has
    /// served that long; one that restarted meanwhile counts from its restart.
    #[test]
    fn min_ready_holds_the_old_replica_until_the_new_one_has_served_long_enough() {
        let a = crate::testing::app_with("http", 1, 2, "[rollout]\nmin_ready = \"10s\"\n");
        let mut new = replica("n1", 2, Phase::Ready, 3);
        new.ready_since = Some(5_000);
        let rs = vec![replica("o1", 1, Phase::Ready, 1), new];
        let roll = |now| reconcile(&a, &rs, |_| false, Mode::Roll, now);
        assert_eq!(roll(5_000), Plan::default());
        assert_eq!(roll(14_999), Plan::default());
        assert_eq!(roll(15_000).delete, vec!["o1".to_string()]);
        let mut restarted = rs.clone();
        restarted[1].ready_since = Some(12_000);
        assert_eq!(
            reconcile(&a, &restarted, |_| false, Mode::Roll, 15_000),
            Plan::default()
        );
    }

    #[test]
    fn max_unavailable_lets_old_replicas_go_first() {
        let mut a = app("http", 2, 2);
        a.spec.rollout = shoal_core::spec::Rollout {
            max_surge: 0,
            max_unavailable: 1,
            ..Default::default()
        };
        let rs = [
            replica("o1", 1, Phase::Ready, 1),
            replica("o2", 1, Phase::Ready, 2),
        ];
        // No surge: one old replica goes before any new one exists.
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 0,
                delete: vec!["o1".into()],
                ..Plan::default()
            }
        );
        assert_eq!(reconcile(&a, &rs[1..], |_| false, Mode::Roll, 0).create, 1);
    }

    #[test]
    fn a_failing_new_revision_keeps_the_old_one_serving() {
        let a = app("http", 1, 2);
        let rs = [
            replica("o1", 1, Phase::Ready, 1),
            replica("n1", 2, Phase::Failed, 2),
        ];
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan::default()
        );
    }

    /// A long-running replica its node gave up on (`Failed`: its module or a volume could
    /// not be loaded) is replaced once it has been so for a while, not on every pass. It
    /// counted as one of the app's replicas for good, and the app ran one short.
    #[test]
    fn a_failed_replica_of_a_long_running_app_is_replaced_after_a_while() {
        let mut failed = replica("y", 1, Phase::Failed, 2);
        failed.updated_at = 1_000;
        let rs = [replica("x", 1, Phase::Ready, 1), failed];
        let a = app("http", 2, 1);
        let at = |now| reconcile(&a, &rs, |_| false, Mode::Roll, now);
        assert_eq!(at(1_000 + REPLACE_FAILED_AFTER_MS - 1), Plan::default());
        assert_eq!(
            at(1_000 + REPLACE_FAILED_AFTER_MS),
            Plan {
                create: 1,
                delete: vec!["y".into()],
                ..Plan::default()
            }
        );
        // A job's failed run is its own to retry (or not).
        let job = app("job", 2, 1);
        let mut run = replica("r", 1, Phase::Failed, 2);
        run.kind = Kind::Job;
        let runs = [replica("x", 1, Phase::Running, 1), run];
        assert_eq!(
            reconcile(&job, &runs, |_| false, Mode::Roll, 1_000_000),
            Plan::default()
        );
    }

    #[test]
    fn old_replicas_that_do_not_serve_go_at_once() {
        let a = app("http", 1, 2);
        let rs = [
            replica("o1", 1, Phase::Pending, 1),
            replica("o2", 1, Phase::Failed, 1),
        ];
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 1,
                delete: vec!["o1".into(), "o2".into()],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn scale_to_zero_removes_everything() {
        let rs = [
            replica("o1", 1, Phase::Ready, 1),
            replica("n1", 2, Phase::Ready, 2),
        ];
        let plan = reconcile(&app("http", 0, 2), &rs, |_| false, Mode::Roll, 0);
        assert_eq!(plan.delete, vec!["n1".to_string(), "o1".to_string()]);
    }

    #[test]
    fn draining_moves_replicas_new_before_old() {
        let a = app("http", 2, 1);
        let mut rs = vec![
            replica("d1", 1, Phase::Ready, 1),
            replica("k1", 1, Phase::Ready, 2),
        ];
        rs[0].node = Some("draining".into());
        let drain = |r: &Replica| r.node.as_deref() == Some("draining");
        assert_eq!(
            reconcile(&a, &rs, drain, Mode::Roll, 0),
            Plan {
                create: 1,
                delete: vec![],
                ..Plan::default()
            }
        );
        rs.push(replica("n1", 1, Phase::Starting, 3));
        assert_eq!(reconcile(&a, &rs, drain, Mode::Roll, 0), Plan::default());
        rs[2].phase = Phase::Ready;
        assert_eq!(
            reconcile(&a, &rs, drain, Mode::Roll, 0),
            Plan {
                create: 0,
                delete: vec!["d1".into()],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn draining_with_nowhere_to_go_keeps_the_old_replicas_serving() {
        let a = app("http", 2, 1);
        let mut rs = vec![
            replica("d1", 1, Phase::Ready, 1),
            replica("d2", 1, Phase::Ready, 2),
            replica("n1", 1, Phase::Pending, 3),
        ];
        rs[0].node = Some("draining".into());
        rs[1].node = Some("draining".into());
        rs[2].node = None;
        rs[2].message = Some("0/1 nodes available: 1 cordoned".into());
        let drain = |r: &Replica| r.node.as_deref() == Some("draining");
        // Freeing room on the drained node helps nothing: both stay, pass after pass.
        assert_eq!(reconcile(&a, &rs, drain, Mode::Roll, 0), Plan::default());
        // Beside an old revision's replica elsewhere, that one makes room, once.
        let mut b = app("http", 2, 2);
        b.spec.rollout.max_unavailable = 0;
        rs[1].node = Some("other".into());
        rs[2].revision = 2;
        assert_eq!(
            reconcile(&b, &rs, drain, Mode::Roll, 0).delete,
            vec!["d2".to_string()]
        );
        rs.remove(1);
        assert_eq!(
            reconcile(&b, &rs, drain, Mode::Roll, 0).delete,
            Vec::<String>::new()
        );
    }

    /// With room to retire one within `max_unavailable`, a blocked rollout retires that one
    /// alone: retiring a second as well left a two-replica app with nothing serving.
    #[test]
    fn a_blocked_rollout_retiring_one_within_its_budget_retires_no_more() {
        let a = crate::testing::app_with("http", 2, 2, "[rollout]\nmax_unavailable = 1\n");
        let mut rs = vec![
            replica("o1", 1, Phase::Ready, 1),
            replica("o2", 1, Phase::Ready, 2),
            replica("n1", 2, Phase::Pending, 3),
            replica("n2", 2, Phase::Pending, 4),
        ];
        for r in &mut rs[2..] {
            r.node = None;
            r.message = Some("0/2 nodes available: not enough memory".into());
        }
        let plan = reconcile(&a, &rs, |_| false, Mode::Roll, 0);
        assert_eq!(plan.delete, ["o1"]);
    }

    #[test]
    fn an_unschedulable_new_replica_frees_room_from_an_old_one() {
        let a = app("http", 2, 2);
        let mut rs = vec![
            replica("o1", 1, Phase::Ready, 1),
            replica("o2", 1, Phase::Ready, 2),
            replica("n1", 2, Phase::Pending, 3),
        ];
        rs[2].node = None;
        // Merely pending (not yet tried): wait.
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan::default()
        );
        // The scheduler said it fits nowhere: one old replica makes room.
        rs[2].message = Some("0/2 nodes available: 2 already running a replica of this app".into());
        assert_eq!(
            reconcile(&a, &rs, |_| false, Mode::Roll, 0),
            Plan {
                create: 0,
                delete: vec!["o1".into()],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn draining_does_not_rerun_finished_jobs() {
        let mut done = replica("j1", 1, Phase::Succeeded, 1);
        done.kind = Kind::Job;
        assert_eq!(
            reconcile(&app("job", 1, 1), &[done], |_| true, Mode::Roll, 0),
            Plan::default()
        );
    }

    #[test]
    fn finished_jobs_are_not_rerun() {
        let mut done = replica("j1", 1, Phase::Succeeded, 1);
        done.kind = Kind::Job;
        assert_eq!(
            reconcile(&app("job", 1, 1), &[done], |_| false, Mode::Roll, 0),
            Plan::default()
        );
    }

    #[test]
    fn jobs_of_an_old_revision_are_replaced() {
        let mut old = replica("j1", 1, Phase::Running, 1);
        old.kind = Kind::Job;
        assert_eq!(
            reconcile(&app("job", 1, 2), &[old], |_| false, Mode::Roll, 0),
            Plan {
                create: 1,
                delete: vec!["j1".into()],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn a_split_holds_both_revisions_and_replaces_what_each_loses() {
        let a = app("http", 4, 2);
        let split = Mode::Split {
            stable: 1,
            canary: 1,
            stable_replicas: 4,
        };
        let mut rs: Vec<Replica> = (0..4)
            .map(|i| replica(&format!("o{i}"), 1, Phase::Ready, i))
            .collect();
        assert_eq!(
            reconcile(&a, &rs, |_| false, split, 0),
            Plan {
                create: 1,
                ..Plan::default()
            }
        );
        rs.push(replica("c1", 2, Phase::Ready, 10));
        assert_eq!(reconcile(&a, &rs, |_| false, split, 0), Plan::default());
        // A stable replica lost: a stable one replaces it, not a canary.
        rs.remove(0);
        assert_eq!(
            reconcile(&a, &rs, |_| false, split, 0),
            Plan {
                create_stable: 1,
                ..Plan::default()
            }
        );
        // Back to rolling (promoted or aborted): the other revision is retired as usual.
        let plan = reconcile(&a, &rs, |_| false, Mode::Roll, 0);
        assert_eq!(plan.create, 1);
    }
}
