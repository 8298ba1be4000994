//! Rollout decisions: given an app, its rollout status, its replicas and (for a
//! canary) what the gateways measured, where the rollout stands now, what
//! replica counts it asks for ([`mode`]), and whether to roll back. Pure: the
//! controller reads the inputs and writes what comes out.

use crate::reconcile::Mode;
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::LIVENESS_RESTARTS;
use shoal_core::spec::{Analysis, Rollout, Strategy};
use shoal_core::{App, EventType, Millis, Phase, Replica, RolloutPhase, RolloutStatus};

/// Latency differences below this are noise, whatever the ratio.
pub const P99_NOISE_MS: u64 = 25;

/// Requests each side needs before their p99s are compared: below this a p99 is
/// little more than the single slowest request, and a fresh replica's first
/// requests are slower than a warm one's.
pub const P99_MIN_SAMPLES: u64 = 100;

/// What the canary and the stable revision served since the current step began.
#[derive(Debug, Clone, Copy)]
pub struct Measured<'a> {
    pub canary: &'a RevisionStats,
    pub stable: &'a RevisionStats,
}

/// The outcome of one look at a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to store (unchanged if nothing happened).
    pub status: RolloutStatus,
    /// Something worth an event: (type, reason, message).
    pub event: Option<(EventType, &'static str, String)>,
    /// Go back to `status.stable`: the new revision is bad.
    pub roll_back: Option<RollBack>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollBack {
    pub to: u64,
    /// `RolledBack` (deadline, crash loop) or `Aborted` (canary analysis).
    pub phase: RolloutPhase,
    pub reason: String,
}

/// A fresh status for `app.revision`, following `previous` (the status of the revision before).
pub fn start(app: &App, previous: Option<&RolloutStatus>, now: Millis) -> RolloutStatus {
    let stable = previous.and_then(|p| {
        if p.phase == RolloutPhase::Complete {
            Some(p.revision)
        } else {
            p.stable
        }
    });
    // Paused rollouts stay paused through applies, as a Kubernetes Deployment's: several
    // changes made while paused roll out as one, on `rollout resume`.
    let paused = previous.is_some_and(|p| p.paused);
    RolloutStatus {
        app: app.spec.key(),
        revision: app.revision,
        stable: stable.filter(|s| *s != app.revision),
        strategy: app.spec.rollout.strategy,
        phase: RolloutPhase::Progressing,
        paused,
        step: 0,
        step_started_at: None,
        ready: 0,
        progressed_at: now,
        started_at: now,
        rolled_back_from: None,
        previous_stable: None,
        message: if paused {
            format!(
                "rollout of revision {} paused (`shoal rollout resume` starts it)",
                app.revision
            )
        } else {
            format!("rolling out revision {}", app.revision)
        },
    }
}

/// The replica counts the rollout asks for now.
pub fn mode(app: &App, status: Option<&RolloutStatus>) -> Mode {
    let Some(s) = status.filter(|s| s.revision == app.revision && !s.phase.is_done()) else {
        return Mode::Roll;
    };
    // Paused holds whatever it rolls, a first rollout (no stable revision) too.
    if s.paused {
        return Mode::Hold;
    }
    let Some(stable) = s.stable else {
        return Mode::Roll;
    };
    let n = app.spec.replicas;
    if let Some(step) = s.canary_step(&app.spec.rollout) {
        return Mode::Split {
            stable,
            canary: Rollout::canary_replicas(n, step.weight),
            stable_replicas: n,
        };
    }
    Mode::Roll
}

/// `30s`, `1.5s`, `250ms`.
fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms >= 1000 && ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms if ms >= 1000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms => format!("{ms}ms"),
    }
}

/// Whether the canary is worse than the stable revision, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Not enough canary requests yet.
    Wait(String),
    Fail(String),
}

pub fn judge(analysis: &Analysis, m: Measured<'_>) -> Verdict {
    let (c, s) = (m.canary, m.stable);
    if c.requests < analysis.min_requests {
        // Not the count so far: the status is written only when it changes.
        return Verdict::Wait(format!(
            "waiting for at least {} canary requests",
            analysis.min_requests
        ));
    }
    let allowed = s.error_rate() + analysis.max_error_rate_increase_bp as f64 / 10_000.0;
    if c.requests > 0 && c.error_rate() > allowed {
        return Verdict::Fail(format!(
            "canary error rate {:.1}% ({} of {}) exceeds stable {:.1}% by more than {:.1} points",
            c.error_rate() * 100.0,
            c.errors,
            c.requests,
            s.error_rate() * 100.0,
            analysis.max_error_rate_increase_bp as f64 / 100.0
        ));
    }
    if c.latency.total() >= P99_MIN_SAMPLES
        && s.latency.total() >= P99_MIN_SAMPLES
        && let (Some(cp), Some(sp)) = (c.latency.quantile(0.99), s.latency.quantile(0.99))
        && cp * 100 > sp * analysis.max_p99_ratio_pct as u64
        && cp > sp + P99_NOISE_MS
    {
        return Verdict::Fail(format!(
            "canary p99 {cp} ms exceeds {:.2}x stable p99 {sp} ms",
            analysis.max_p99_ratio_pct as f64 / 100.0
        ));
    }
    Verdict::Pass
}

/// Advances `status` (the rollout of `app.revision`) by what is observed.
pub fn decide(
    app: &App,
    status: &RolloutStatus,
    replicas: &[Replica],
    measured: Option<Measured<'_>>,
    now: Millis,
) -> Decision {
    let mut next = status.clone();
    let decision = |next: RolloutStatus, event, roll_back| Decision {
        status: next,
        event,
        roll_back,
    };
    // A new app's rollout that missed its deadline still completes when it gets
    // there, so its revision becomes the stable one later rollouts fall back to.
    let late = status.phase == RolloutPhase::Failed;
    let spec = &app.spec.rollout;
    let n = app.spec.replicas;
    let target = status.revision;
    let new: Vec<&Replica> = replicas.iter().filter(|r| r.revision == target).collect();
    // Complete, but a replica of it fails within the deadline of the completion: a daemon
    // up for a moment before it crashes, an http one whose liveness fails a while after
    // its readiness passed. Back to the revision before, as while it progressed; a new app,
    // with none, has failed.
    if status.phase == RolloutPhase::Complete
        && status.revision == app.revision
        && now.saturating_sub(status.progressed_at) <= watched_after_completion(app)
        && let Some(reason) = hopeless(&new)
    {
        let reason = format!("{reason}, after its rollout completed");
        let Some(to) = status.previous_stable else {
            // Not a revision to fall back to, nor a canary's baseline, for the next rollout.
            next.phase = RolloutPhase::Failed;
            next.stable = None;
            next.message = reason.clone();
            return decision(
                next,
                Some((EventType::Warning, "RolloutFailed", reason)),
                None,
            );
        };
        let rb = RollBack {
            to,
            phase: RolloutPhase::RolledBack,
            reason,
        };
        return decision(next, None, Some(rb));
    }
    if (status.phase.is_done() && !late) || status.revision != app.revision {
        return decision(next, None, None);
    }
    // Ready and, with `min_ready`, up that long: what completes a rollout.
    let ready = new
        .iter()
        .filter(|r| r.available(spec.min_ready_ms, now))
        .count() as u32;
    let fallback = status.stable.filter(|s| *s != target);

    if let (Some(to), Some(reason)) = (fallback, hopeless(&new)) {
        let rb = RollBack {
            to,
            phase: RolloutPhase::RolledBack,
            reason,
        };
        return decision(next, None, Some(rb));
    }

    // Progress is more ready than last seen, as Kubernetes counts it: replicas lost with a
    // node and ready again count, where a high-water mark would let the deadline run out
    // on a rollout that is recovering.
    if ready > next.ready {
        next.progressed_at = now;
    }
    next.ready = ready;
    if status.paused {
        // A paused canary step keeps its share of traffic, so it is still judged: a pause
        // holds its progress, not its analysis.
        if let (Some(stable), Some(_), Some(_), Some(m)) = (
            fallback,
            status.canary_step(spec),
            status.step_started_at,
            measured,
        ) && let Verdict::Fail(why) = judge(&spec.analysis, m)
        {
            return decision(next, None, Some(aborted(stable, &why)));
        }
        next.message = format!("rollout of revision {target} paused");
        return decision(next, None, None);
    }

    let mut event = None;
    // A timed canary pause is waiting, not being stuck.
    let mut clock_from = next.progressed_at;
    // Why it is stuck, in live numbers, if the deadline passes.
    let mut stuck = String::new();
    if let (Some(stable), Some(step)) = (fallback, status.canary_step(spec)) {
        let canary = Canary {
            app,
            status,
            step,
            stable,
            measured,
            now,
        };
        match canary.advance(&new, &mut next) {
            Ok(step) => {
                event = step.event;
                clock_from = step.clock_from.map_or(clock_from, |c| c.max(clock_from));
                if let Some(w) = step.waiting {
                    stuck = format!("{}: {w}", next.message);
                }
            }
            Err(rb) => return decision(next, None, Some(rb)),
        }
    } else {
        let old = replicas
            .iter()
            .filter(|r| r.revision != target && !r.phase.is_terminal())
            .count();
        // A late completion needs replicas that never restarted, or have stayed up for a
        // progress deadline since: one up again between crashes is no proof that the
        // revision works, one that crashed while its database came up and runs since is.
        let proven = !late
            || new
                .iter()
                .all(|r| r.restarts == 0 || r.available(spec.progress_deadline_ms, now));
        if ready >= n && old == 0 && proven {
            next.phase = RolloutPhase::Complete;
            next.previous_stable = fallback;
            next.progressed_at = now;
            next.stable = Some(target);
            next.message = RolloutStatus::rolled_out(target, ready, n);
            return decision(
                next.clone(),
                Some((EventType::Normal, "RolledOut", next.message)),
                None,
            );
        }
        if late {
            return decision(status.clone(), None, None);
        }
        let ready_for = ready_for(spec);
        next.message = format!(
            "{}/{n} replicas of revision {target} {ready_for}",
            next.ready
        );
        stuck = format!(
            "{ready}/{n} replicas of revision {target} {ready_for}, {old} of older revisions left"
        );
    }

    if now.saturating_sub(clock_from) > spec.progress_deadline_ms {
        if stuck.is_empty() {
            stuck = next.message.clone();
        }
        return past_deadline(status, next, fallback, spec, &stuck);
    }
    decision(next, event, None)
}

/// What a replica must be to count: "ready", or "ready for 10s" with a `min_ready`.
fn ready_for(spec: &Rollout) -> String {
    match spec.min_ready_ms {
        0 => "ready".into(),
        ms => format!("ready for {}", human_ms(ms)),
    }
}

/// What a person asks of a rollout in progress (`shoal rollout pause|resume|promote|abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    /// Canary: end the current step now; `full`: skip every remaining step.
    Promote {
        full: bool,
    },
    /// Back to the stable revision.
    Abort,
}

/// Why an [`Action`] cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error(
        "app {app} has no rollout in progress (the last one, of revision {revision}, is {phase})"
    )]
    NotInProgress {
        /// The revision the last rollout rolled out: after a roll back, the one abandoned.
        app: shoal_core::spec::AppKey,
        revision: u64,
        phase: RolloutPhase,
    },
    #[error(
        "app {0} rolls with strategy = \"rolling\": there is no step to promote; `shoal rollout resume` continues a paused one"
    )]
    NotACanary(shoal_core::spec::AppKey),
    #[error("app {0} has no earlier revision that rolled out to go back to")]
    NothingToGoBackTo(shoal_core::spec::AppKey),
}

/// What an [`Action`] does.
#[derive(Debug, Clone, PartialEq)]
pub enum Acted {
    /// Store this status, with an event `(reason, message)`.
    Status {
        status: RolloutStatus,
        reason: &'static str,
    },
    /// Go back to the stable revision ([`roll_back`] says how).
    RollBack(RollBack),
}

/// The arithmetic of `shoal rollout pause|resume|promote|abort` on the rollout
/// of `app.revision`.
pub fn act(
    app: &App,
    status: &RolloutStatus,
    action: Action,
    now: Millis,
) -> Result<Acted, ActionError> {
    let key = app.spec.key();
    // Between rollouts, pause and resume are about the next one: a revision applied while
    // paused waits for `resume`, as a paused Kubernetes Deployment's template does.
    let between = status.phase.is_done() && status.revision == app.revision;
    match action {
        Action::Pause if between => {
            let mut next = status.clone();
            next.paused = true;
            next.message = format!(
                "rollouts of app {key} paused: a revision applied now waits for `shoal rollout resume`"
            );
            return Ok(Acted::Status {
                status: next,
                reason: "Paused",
            });
        }
        Action::Resume if between && status.paused => {
            let mut next = status.clone();
            next.paused = false;
            next.message = format!("rollouts of app {key} resumed");
            return Ok(Acted::Status {
                status: next,
                reason: "Resumed",
            });
        }
        _ => {}
    }
    if status.phase.is_done() || status.revision != app.revision {
        return Err(ActionError::NotInProgress {
            app: key,
            revision: status.rolled_back_from.unwrap_or(status.revision),
            phase: status.phase,
        });
    }
    let mut next = status.clone();
    let reason = match action {
        Action::Pause => {
            next.paused = true;
            next.message = format!("rollout of revision {} paused", status.revision);
            "Paused"
        }
        Action::Resume => {
            next.paused = false;
            // The deadline and the step's pause count from now.
            next.progressed_at = now;
            if next.step_started_at.is_some() {
                next.step_started_at = Some(now);
            }
            next.message = format!("rollout of revision {} resumed", status.revision);
            "Resumed"
        }
        Action::Promote { full } => {
            if status.strategy != Strategy::Canary {
                return Err(ActionError::NotACanary(key));
            }
            let steps = app.spec.rollout.steps.len();
            next.step = if full {
                steps
            } else {
                (status.step + 1).min(steps)
            };
            next.step_started_at = None;
            next.progressed_at = now;
            next.paused = false;
            next.message = if next.step == steps {
                format!("revision {} promoted to 100%", status.revision)
            } else {
                format!(
                    "revision {} promoted to step {}/{steps}",
                    status.revision,
                    next.step + 1
                )
            };
            "Promoted"
        }
        Action::Abort => {
            let Some(to) = status.stable.filter(|s| *s != status.revision) else {
                return Err(ActionError::NothingToGoBackTo(key));
            };
            return Ok(Acted::RollBack(RollBack {
                to,
                phase: RolloutPhase::Aborted,
                reason: "aborted by `shoal rollout abort`".into(),
            }));
        }
    };
    Ok(Acted::Status {
        status: next,
        reason,
    })
}

/// What going back to revision `rb.to` writes: the app runs that revision's
/// template again under its own number (its replicas are current again,
/// nothing restarts; its size and scale status stay), the rollout says so, the abandoned revision records why
/// (its `outcome`), and an event tells.
#[derive(Debug, Clone, PartialEq)]
pub struct RolledBack {
    pub app: App,
    pub status: RolloutStatus,
    /// The abandoned revision's outcome.
    pub outcome: String,
    pub event: (EventType, &'static str, String),
}

/// [`RolledBack`] for the rollout `status` of `app`, going back to `target`.
pub fn roll_back(
    app: &App,
    target: &shoal_core::Revision,
    status: &RolloutStatus,
    rb: &RollBack,
    now: Millis,
) -> RolledBack {
    let (verb, reason) = match rb.phase {
        RolloutPhase::Aborted => ("aborted", "Aborted"),
        _ => ("rolled back", "RolledBack"),
    };
    let after = RolloutStatus {
        revision: rb.to,
        stable: Some(rb.to),
        phase: rb.phase,
        paused: false,
        step_started_at: None,
        progressed_at: now,
        rolled_back_from: Some(status.revision),
        previous_stable: None,
        message: format!(
            "revision {} {verb}, back on revision {}: {}",
            status.revision, rb.to, rb.reason
        ),
        ..status.clone()
    };
    RolledBack {
        app: App {
            spec: app.spec.with_template(&target.template),
            revision: rb.to,
            created_at: app.created_at,
            updated_at: now,
            scale: app.scale.clone(),
            job: app.job.clone(),
        },
        outcome: format!("{verb}: {}", rb.reason),
        event: (EventType::Warning, reason, after.message.clone()),
        status: after,
    }
}

/// How long after its rollout completed a revision is still judged by its replicas: the
/// progress deadline, plus what its liveness probe takes to tell that restarts do not help
/// (a node says so after [`LIVENESS_RESTARTS`] restarts, each after `failure_threshold`
/// failed probes), so a replica that fails liveness within the deadline rolls the app back
/// however slowly it is probed.
fn watched_after_completion(app: &App) -> Millis {
    let deadline = app.spec.rollout.progress_deadline_ms;
    let detection = app.spec.health.liveness.as_ref().map_or(0, |l| {
        let episode = u64::from(l.failure_threshold.max(1)).saturating_mul(l.period_ms);
        episode.saturating_mul(u64::from(LIVENESS_RESTARTS) + 1)
    });
    deadline.saturating_add(detection)
}

/// Why the new revision will not get better, if one of its replicas
/// crash-loops, failed, or keeps failing liveness through restarts.
fn hopeless(new: &[&Replica]) -> Option<String> {
    let bad = new.iter().find(|r| {
        matches!(r.phase, Phase::CrashLoopBackOff | Phase::Failed)
            || r.reason.as_deref() == Some(shoal_core::objects::LIVENESS_FAILED)
    })?;
    Some(format!(
        "replica {} of revision {} is {}{}",
        bad.id,
        bad.revision,
        bad.phase,
        bad.message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    ))
}

/// No progress within the deadline: back to `fallback`, or (a new app, with
/// nothing to go back to) `Failed`.
fn past_deadline(
    status: &RolloutStatus,
    mut next: RolloutStatus,
    fallback: Option<u64>,
    spec: &Rollout,
    stuck: &str,
) -> Decision {
    let why = format!(
        "no progress for {}s (progress_deadline): {stuck}",
        spec.progress_deadline_ms / 1000,
    );
    match fallback {
        Some(to) => Decision {
            status: next,
            event: None,
            roll_back: Some(RollBack {
                to,
                phase: if status.strategy == Strategy::Canary {
                    RolloutPhase::Aborted
                } else {
                    RolloutPhase::RolledBack
                },
                reason: why,
            }),
        },
        None => {
            next.phase = RolloutPhase::Failed;
            next.message = why.clone();
            Decision {
                status: next,
                event: Some((EventType::Warning, "ProgressDeadlineExceeded", why)),
                roll_back: None,
            }
        }
    }
}

/// A canary whose analysis failed (`why`): back to `stable`.
fn aborted(stable: u64, why: &str) -> RollBack {
    RollBack {
        to: stable,
        phase: RolloutPhase::Aborted,
        reason: format!("canary analysis failed: {why}"),
    }
}

/// One look at a canary step in progress: the inputs [`decide`] was given.
struct Canary<'a> {
    app: &'a App,
    status: &'a RolloutStatus,
    step: &'a shoal_core::spec::CanaryStep,
    stable: u64,
    measured: Option<Measured<'a>>,
    now: Millis,
}

/// What a look at a step says.
#[derive(Default)]
struct StepOutcome {
    event: Option<(EventType, &'static str, String)>,
    /// From when the progress deadline counts, if the step says (a timed
    /// pause is waiting, not being stuck; a manual step waits for a person).
    clock_from: Option<Millis>,
    /// What the step waits for now, in live numbers: why it is stuck if the
    /// deadline passes.
    waiting: Option<String>,
}

impl Canary<'_> {
    /// Starts the step once its replicas are ready, judges it while it runs,
    /// and moves to the next once its pause is over and the analysis passed.
    /// `Err` if the analysis failed: abort to the stable revision.
    fn advance(&self, new: &[&Replica], next: &mut RolloutStatus) -> Result<StepOutcome, RollBack> {
        let (status, step, now) = (self.status, self.step, self.now);
        let spec = &self.app.spec.rollout;
        let (target, stable, weight) = (status.revision, self.stable, step.weight);
        let want = Rollout::canary_replicas(self.app.spec.replicas, weight);
        let canary_ready = new
            .iter()
            .filter(|r| r.phase == Phase::Ready && r.available(spec.min_ready_ms, now))
            .count() as u32;
        let (nth, steps) = (status.step + 1, spec.steps.len());
        // What a step in progress says; fixed text, as the status is written
        // only when where the rollout stands changes.
        let in_step = match step.pause_ms {
            None => format!(
                "step {nth}/{steps}: {weight}% to revision {target}; waiting for `shoal rollout promote`"
            ),
            Some(pause) => format!(
                "step {nth}/{steps}: {weight}% to revision {target} for {}",
                human_ms(pause)
            ),
        };
        let Some(started) = status.step_started_at else {
            if canary_ready < want {
                next.message = format!(
                    "step {nth}/{steps}: waiting for {want} replicas of revision {target} to be {}",
                    ready_for(spec)
                );
                return Ok(StepOutcome {
                    waiting: Some(format!(
                        "{canary_ready}/{want} canary replicas {}",
                        ready_for(spec)
                    )),
                    ..StepOutcome::default()
                });
            }
            next.step_started_at = Some(now);
            next.progressed_at = now;
            next.message = in_step;
            let event = format!(
                "step {nth}/{steps}: {weight}% of traffic to revision {target} ({want} replicas), {stable} keeps the rest"
            );
            return Ok(StepOutcome {
                event: Some((EventType::Normal, "CanaryStep", event)),
                ..StepOutcome::default()
            });
        };
        let verdict = match self.measured {
            Some(m) => judge(&spec.analysis, m),
            None => Verdict::Wait("no measurements yet".into()),
        };
        if let Verdict::Fail(why) = &verdict {
            return Err(aborted(stable, why));
        }
        next.message = in_step;
        let Some(pause) = step.pause_ms else {
            // Waiting for a person, not stuck.
            return Ok(StepOutcome {
                clock_from: Some(now),
                ..StepOutcome::default()
            });
        };
        // Live measurements are in `shoal rollout status`: a step that waits
        // for enough of them keeps its text.
        if now.saturating_sub(started) < pause || verdict != Verdict::Pass {
            // Its time is up, and too few requests came: what it waits for now, which
            // nothing but traffic (or `promote`) ends. Fixed text, written once.
            if let Verdict::Wait(why) = &verdict
                && now.saturating_sub(started) >= pause
            {
                next.message = format!("{}; {why}", next.message);
            }
            // The deadline counts from the pause's end, where the message says what it
            // waits for: that is why it is stuck, said once.
            return Ok(StepOutcome {
                clock_from: Some(started.saturating_add(pause)),
                ..StepOutcome::default()
            });
        }
        next.step += 1;
        next.step_started_at = None;
        next.progressed_at = now;
        let promoted = next.step == steps;
        next.message = if promoted {
            format!("canary passed; promoting revision {target} to 100%")
        } else {
            format!("canary passed step {nth}")
        };
        let reason = if promoted { "Promoted" } else { "CanaryStep" };
        Ok(StepOutcome {
            event: Some((EventType::Normal, reason, next.message.clone())),
            clock_from: Some(started.saturating_add(pause)),
            waiting: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::spec::{AppKey, CanaryStep};

    fn app(replicas: u32, revision: u64, rollout: &str) -> App {
        crate::testing::app_with("http", replicas, revision, rollout)
    }

    fn replica(id: &str, revision: u64, phase: Phase) -> Replica {
        crate::testing::replica_at(id, revision, phase, 0)
    }

    fn stats(requests: u64, errors: u64, latency_ms: f64) -> RevisionStats {
        let mut s = RevisionStats::new(AppKey::new("default", "a"), 0);
        s.requests = requests;
        s.errors = errors;
        for _ in 0..requests {
            s.latency.record(latency_ms);
        }
        s
    }

    /// A rollout of revision 2 over a complete revision 1.
    fn rolling_to_2(a: &App) -> RolloutStatus {
        let mut done = start(&app(a.spec.replicas, 1, ""), None, 0);
        done.phase = RolloutPhase::Complete;
        start(a, Some(&done), 1_000)
    }

    /// A daemon up for a moment, or an http replica whose liveness fails a while after
    /// readiness passed: the rollout completed, and still goes back within the deadline.
    #[test]
    fn a_replica_failing_soon_after_completion_rolls_back_to_the_revision_before() {
        let a = app(1, 2, "[rollout]\nprogress_deadline = \"60s\"\n");
        let s = rolling_to_2(&a);
        let up = [replica("n1", 2, Phase::Running)];
        let done = decide(&a, &s, &up, None, 2_000);
        assert_eq!(done.status.phase, RolloutPhase::Complete);
        assert_eq!(done.status.previous_stable, Some(1));
        let done = done.status;

        let crashing = [replica("n1", 2, Phase::CrashLoopBackOff)];
        let d = decide(&a, &done, &crashing, None, 30_000);
        let rb = d.roll_back.expect("rolled back");
        assert_eq!((rb.to, rb.phase), (1, RolloutPhase::RolledBack));
        assert!(
            rb.reason.ends_with("after its rollout completed"),
            "{}",
            rb.reason
        );
        let mut failing = replica("n1", 2, Phase::Unready);
        failing.reason = Some(shoal_core::objects::LIVENESS_FAILED.into());
        assert!(
            decide(&a, &done, &[failing], None, 30_000)
                .roll_back
                .is_some()
        );
        // Past the deadline it is the stable revision: its replicas are restarted, not undone.
        assert!(
            decide(&a, &done, &crashing, None, 63_000)
                .roll_back
                .is_none()
        );
        assert!(decide(&a, &done, &up, None, 30_000).roll_back.is_none());
    }

    /// A liveness probe tells that restarts do not help only after several of them: a
    /// failure that starts within the deadline of the completion is still caught when that
    /// takes past the deadline, and not once that time has passed too.
    #[test]
    fn a_liveness_failure_within_the_deadline_is_caught_however_slow_the_probe() {
        let a = app(
            1,
            2,
            "[rollout]\nprogress_deadline = \"15s\"\n[health.liveness]\npath = \"/\"\nperiod = \"2s\"\nfailure_threshold = 3\n",
        );
        let s = rolling_to_2(&a);
        let done = decide(&a, &s, &[replica("n1", 2, Phase::Running)], None, 2_000).status;
        assert_eq!(done.phase, RolloutPhase::Complete);
        let mut failing = replica("n1", 2, Phase::Unready);
        failing.reason = Some(shoal_core::objects::LIVENESS_FAILED.into());
        // Four episodes of three failed probes two seconds apart: 24 s after the first.
        let told = 2_000 + 4_000 + 24_000;
        let d = decide(&a, &done, std::slice::from_ref(&failing), None, told);
        assert!(d.roll_back.is_some(), "{:?}", d.status);
        let after = 2_000 + 15_000 + 24_000 + 1;
        assert!(
            decide(&a, &done, &[failing], None, after)
                .roll_back
                .is_none()
        );
    }

    const CANARY: &str = "[rollout]\nstrategy = \"canary\"\nprogress_deadline = \"60s\"\nsteps = [{ weight = 25, pause = \"10s\" }, { weight = 50, pause = \"10s\" }]\n";

    #[test]
    fn a_rolling_update_completes_when_every_replica_is_new_and_ready() {
        let a = app(2, 2, "");
        let s = rolling_to_2(&a);
        assert_eq!(s.stable, Some(1));
        let mid = [
            replica("o", 1, Phase::Ready),
            replica("n1", 2, Phase::Ready),
            replica("n2", 2, Phase::Starting),
        ];
        let d = decide(&a, &s, &mid, None, 2_000);
        assert_eq!(d.status.phase, RolloutPhase::Progressing);
        assert_eq!((d.status.ready, d.status.progressed_at), (1, 2_000));
        let done = [
            replica("n1", 2, Phase::Ready),
            replica("n2", 2, Phase::Ready),
        ];
        // Its ready replica lost with a node, and ready again: progress, both times it comes.
        let lost = [
            replica("o", 1, Phase::Ready),
            replica("n2", 2, Phase::Starting),
        ];
        let d = decide(&a, &d.status, &lost, None, 2_500);
        assert_eq!((d.status.ready, d.status.progressed_at), (0, 2_000));
        let d = decide(&a, &d.status, &mid, None, 2_700);
        assert_eq!((d.status.ready, d.status.progressed_at), (1, 2_700));
        let d = decide(&a, &d.status, &done, None, 3_000);
        assert_eq!(d.status.phase, RolloutPhase::Complete);
        assert_eq!(d.status.stable, Some(2));
        assert_eq!(d.event.unwrap().1, "RolledOut");
        // A new app has nothing to fall back to, and completes the same way.
        let fresh = start(&app(1, 1, ""), None, 0);
        assert_eq!(fresh.stable, None);
    }

    /// With `min_ready`, ready is not enough: a rollout completes, and a canary step starts,
    /// once its replicas have been ready that long.
    #[test]
    fn min_ready_delays_completion_and_canary_steps_until_replicas_have_served_long_enough() {
        let a = app(1, 2, "[rollout]\nmin_ready = \"5s\"\n");
        let s = rolling_to_2(&a);
        let mut n1 = replica("n1", 2, Phase::Ready);
        n1.ready_since = Some(2_000);
        let d = decide(&a, &s, std::slice::from_ref(&n1), None, 6_999);
        assert_eq!(d.status.phase, RolloutPhase::Progressing);
        assert_eq!(d.status.ready, 0);
        assert_eq!(d.status.message, "0/1 replicas of revision 2 ready for 5s");
        let d = decide(&a, &s, std::slice::from_ref(&n1), None, 7_000);
        assert_eq!(d.status.phase, RolloutPhase::Complete);

        let c = app(
            4,
            2,
            &CANARY.replace("[rollout]\n", "[rollout]\nmin_ready = \"5s\"\n"),
        );
        let s = rolling_to_2(&c);
        let mut canary = replica("c", 2, Phase::Ready);
        canary.ready_since = Some(2_000);
        let waiting = decide(&c, &s, std::slice::from_ref(&canary), None, 3_000);
        assert!(
            waiting.status.step_started_at.is_none(),
            "{:?}",
            waiting.status
        );
        assert!(
            waiting
                .status
                .message
                .contains("waiting for 1 replicas of revision 2 to be ready for 5s"),
            "{}",
            waiting.status.message
        );
        let started = decide(&c, &s, std::slice::from_ref(&canary), None, 7_000);
        assert_eq!(started.status.step_started_at, Some(7_000));
    }

    #[test]
    fn no_progress_within_the_deadline_rolls_back() {
        let a = app(2, 2, "[rollout]\nprogress_deadline = \"30s\"\n");
        let s = rolling_to_2(&a);
        let stuck = [
            replica("o1", 1, Phase::Ready),
            replica("o2", 1, Phase::Ready),
            replica("n1", 2, Phase::Unready),
        ];
        let d = decide(&a, &s, &stuck, None, 30_000);
        assert!(d.roll_back.is_none());
        let d = decide(&a, &d.status, &stuck, None, 31_001);
        let rb = d.roll_back.unwrap();
        assert_eq!((rb.to, rb.phase), (1, RolloutPhase::RolledBack));
        assert!(rb.reason.contains("no progress for 30s"), "{}", rb.reason);
        assert!(
            rb.reason.contains("of older revisions left"),
            "{}",
            rb.reason
        );
        // Paused, the clock does not run out.
        let mut paused = s.clone();
        paused.paused = true;
        assert!(
            decide(&a, &paused, &stuck, None, 100_000)
                .roll_back
                .is_none()
        );
        // Without a revision to go back to, the rollout fails and says so.
        let mut first = s.clone();
        first.stable = None;
        let d = decide(&a, &first, &stuck, None, 100_000);
        assert_eq!(d.status.phase, RolloutPhase::Failed);
        assert_eq!(d.event.unwrap().1, "ProgressDeadlineExceeded");
    }

    #[test]
    fn crash_looping_new_replicas_roll_back_at_once() {
        let a = app(2, 2, "");
        let s = rolling_to_2(&a);
        let mut bad = replica("n1", 2, Phase::CrashLoopBackOff);
        bad.message = Some("trapped: unreachable".into());
        let rs = [replica("o1", 1, Phase::Ready), bad];
        let rb = decide(&a, &s, &rs, None, 1_500).roll_back.unwrap();
        assert_eq!(rb.to, 1);
        assert!(
            rb.reason.contains("CrashLoopBackOff: trapped"),
            "{}",
            rb.reason
        );
    }

    #[test]
    fn a_paused_rollout_holds_its_counts() {
        let a = app(4, 2, "");
        let mut s = rolling_to_2(&a);
        s.paused = true;
        let rs = [
            replica("o1", 1, Phase::Ready),
            replica("o2", 1, Phase::Ready),
            replica("o3", 1, Phase::Ready),
            replica("n1", 2, Phase::Ready),
        ];
        assert_eq!(mode(&a, Some(&s)), Mode::Hold);
        assert_eq!(
            crate::reconcile(&a, &rs, |_| false, Mode::Hold, 0),
            crate::Plan::default()
        );
        // A first rollout, with no stable revision, holds as well.
        let first = RolloutStatus {
            stable: None,
            ..s.clone()
        };
        assert_eq!(mode(&a, Some(&first)), Mode::Hold);
        s.paused = false;
        assert_eq!(mode(&a, Some(&s)), Mode::Roll);
        assert_eq!(
            crate::reconcile(&a, &rs, |_| false, Mode::Roll, 0).create,
            1
        );
    }

    #[test]
    fn a_healthy_canary_walks_its_steps_then_promotes() {
        let a = app(4, 2, CANARY);
        let s = rolling_to_2(&a);
        assert_eq!(
            mode(&a, Some(&s)),
            Mode::Split {
                stable: 1,
                canary: 1,
                stable_replicas: 4
            }
        );
        let mut rs: Vec<Replica> = (0..4)
            .map(|i| replica(&format!("o{i}"), 1, Phase::Ready))
            .collect();
        rs.push(replica("c1", 2, Phase::Ready));
        // Canary ready: the step's clock starts.
        let d = decide(&a, &s, &rs, None, 2_000);
        assert_eq!(d.status.step_started_at, Some(2_000));
        assert_eq!(d.event.as_ref().unwrap().1, "CanaryStep");
        let good = Measured {
            canary: &stats(50, 0, 3.0),
            stable: &stats(150, 0, 3.0),
        };
        // Mid-pause: no change of step.
        let d = decide(&a, &d.status, &rs, Some(good), 5_000);
        assert_eq!(d.status.step, 0);
        // Pause over, analysis passes: next step.
        let d = decide(&a, &d.status, &rs, Some(good), 12_001);
        assert_eq!((d.status.step, d.status.step_started_at), (1, None));
        assert_eq!(
            mode(&a, Some(&d.status)),
            Mode::Split {
                stable: 1,
                canary: 2,
                stable_replicas: 4
            }
        );
        rs.push(replica("c2", 2, Phase::Ready));
        let d = decide(&a, &d.status, &rs, Some(good), 13_000);
        let d = decide(&a, &d.status, &rs, Some(good), 23_001);
        assert_eq!(d.status.step, 2);
        assert_eq!(d.event.unwrap().1, "Promoted");
        // Promoted: an ordinary rolling update to 4 new replicas finishes it.
        assert_eq!(mode(&a, Some(&d.status)), Mode::Roll);
        assert_eq!(d.status.split(&a.spec.rollout), None);
    }

    #[test]
    fn a_canary_that_fails_analysis_is_aborted() {
        let a = app(4, 2, CANARY);
        let mut s = rolling_to_2(&a);
        s.step_started_at = Some(1_000);
        s.ready = 1;
        let rs = [
            replica("o1", 1, Phase::Ready),
            replica("c1", 2, Phase::Ready),
        ];
        let errors = Measured {
            canary: &stats(40, 20, 3.0),
            stable: &stats(160, 0, 3.0),
        };
        let rb = decide(&a, &s, &rs, Some(errors), 3_000).roll_back.unwrap();
        assert_eq!((rb.to, rb.phase), (1, RolloutPhase::Aborted));
        assert!(rb.reason.contains("error rate 50.0%"), "{}", rb.reason);
        // Paused, it keeps its share of traffic and is judged as well.
        let paused = RolloutStatus {
            paused: true,
            ..s.clone()
        };
        assert_eq!(paused.split(&a.spec.rollout), Some((2, 25)));
        let judged = decide(&a, &paused, &rs, Some(errors), 3_000).roll_back;
        assert_eq!(judged.map(|rb| rb.phase), Some(RolloutPhase::Aborted));
        // Aborted, the canary takes no traffic while its replicas wait to go, which can take
        // passes while a stable one is unready (no split sent it an equal share).
        let target = shoal_core::Revision {
            app: a.spec.key(),
            number: 1,
            template: a.spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        };
        let aborted = roll_back(&a, &target, &s, &rb, 3_000).status;
        assert_eq!(aborted.split(&a.spec.rollout), None);
        assert_eq!(aborted.traffic(&a.spec.rollout), Some((2, 0)));
        assert_eq!(s.traffic(&a.spec.rollout), s.split(&a.spec.rollout));
        let slow = Measured {
            canary: &stats(100, 0, 400.0),
            stable: &stats(160, 0, 20.0),
        };
        let rb = decide(&a, &s, &rs, Some(slow), 3_000).roll_back.unwrap();
        assert!(rb.reason.contains("p99 500 ms"), "{}", rb.reason);
        // Too few requests to judge: it waits, and past the pause the deadline runs.
        let quiet = Measured {
            canary: &stats(3, 3, 3.0),
            stable: &stats(10, 0, 3.0),
        };
        let d = decide(&a, &s, &rs, Some(quiet), 3_000);
        assert!(d.roll_back.is_none());
        // Fixed text: what the analysis waits for is live in `shoal rollout status`.
        assert_eq!(d.status.message, "step 1/2: 25% to revision 2 for 10s");
        let rb = decide(&a, &s, &rs, Some(quiet), 11_000 + 60_001)
            .roll_back
            .unwrap();
        assert_eq!(rb.phase, RolloutPhase::Aborted);
        // The reason says what it waited for, in live numbers.
        assert!(
            rb.reason
                .contains("waiting for at least 20 canary requests"),
            "{}",
            rb.reason
        );
    }

    #[test]
    fn judging_tolerates_noise() {
        let analysis = Analysis::default();
        // One error in 100 against none: within the two points allowed.
        let m = Measured {
            canary: &stats(100, 1, 2.0),
            stable: &stats(100, 0, 1.0),
        };
        assert_eq!(judge(&analysis, m), Verdict::Pass);
        // 20 ms against 1 ms is 20x, but under the noise floor.
        let m = Measured {
            canary: &stats(100, 0, 20.0),
            stable: &stats(100, 0, 1.0),
        };
        assert_eq!(judge(&analysis, m), Verdict::Pass);
        // A slow p99 from a few requests is not judged.
        let m = Measured {
            canary: &stats(50, 0, 400.0),
            stable: &stats(100, 0, 1.0),
        };
        assert_eq!(judge(&analysis, m), Verdict::Pass);
    }

    #[test]
    fn canary_steps_without_a_pause_wait_for_promotion() {
        let mut a = app(2, 2, CANARY);
        a.spec.rollout.steps = vec![CanaryStep {
            weight: 50,
            pause_ms: None,
        }];
        let mut s = rolling_to_2(&a);
        s.step_started_at = Some(1_000);
        let rs = [
            replica("o1", 1, Phase::Ready),
            replica("c1", 2, Phase::Ready),
        ];
        let good = Measured {
            canary: &stats(50, 0, 3.0),
            stable: &stats(50, 0, 3.0),
        };
        let d = decide(&a, &s, &rs, Some(good), 1_000_000);
        assert!(d.roll_back.is_none());
        assert_eq!(d.status.step, 0);
        assert!(d.status.message.contains("promote"), "{}", d.status.message);
    }

    #[test]
    fn a_step_weight_applies_once_its_replicas_are_ready() {
        let a = app(4, 2, CANARY);
        let mut s = rolling_to_2(&a);
        // Before the first step's canary is ready, stable takes everything.
        assert_eq!(s.split(&a.spec.rollout), Some((2, 0)));
        s.step_started_at = Some(1);
        assert_eq!(s.split(&a.spec.rollout), Some((2, 25)));
        // The next step keeps the last weight until its extra replicas are ready.
        s.step = 1;
        s.step_started_at = None;
        assert_eq!(s.split(&a.spec.rollout), Some((2, 25)));
        assert_eq!(
            mode(&a, Some(&s)),
            Mode::Split {
                stable: 1,
                canary: 2,
                stable_replicas: 4
            }
        );
        s.step_started_at = Some(2);
        assert_eq!(s.split(&a.spec.rollout), Some((2, 50)));
    }

    #[test]
    fn the_status_does_not_change_while_a_step_waits() {
        let a = app(4, 2, CANARY);
        let mut s = rolling_to_2(&a);
        s.step_started_at = Some(1_000);
        s.ready = 1;
        let rs = [
            replica("o1", 1, Phase::Ready),
            replica("c1", 2, Phase::Ready),
        ];
        let good = Measured {
            canary: &stats(50, 0, 3.0),
            stable: &stats(150, 0, 3.0),
        };
        let first = decide(&a, &s, &rs, Some(good), 2_000).status;
        let later = decide(&a, &first, &rs, Some(good), 7_000).status;
        assert_eq!(first, later);

        // Its pause over without enough canary requests: the status says what it waits for,
        // once.
        let few = Measured {
            canary: &stats(3, 0, 3.0),
            stable: &stats(150, 0, 3.0),
        };
        let during = decide(&a, &s, &rs, Some(few), 5_000).status;
        assert_eq!(during.message, "step 1/2: 25% to revision 2 for 10s");
        let after = decide(&a, &during, &rs, Some(few), 12_000).status;
        assert_eq!(
            after.message,
            "step 1/2: 25% to revision 2 for 10s; waiting for at least 20 canary requests"
        );
        assert_eq!(decide(&a, &after, &rs, Some(few), 20_000).status, after);
        // Past the deadline with still too few, aborted saying what it waited for, once.
        let rb = decide(&a, &after, &rs, Some(few), 80_000)
            .roll_back
            .expect("aborted");
        assert_eq!(
            rb.reason.matches("waiting for at least 20").count(),
            1,
            "{}",
            rb.reason
        );
    }

    /// A new app has no revision to go back to: a daemon that crashes soon after its
    /// rollout completed fails it, and up again between crashes it does not complete.
    #[test]
    fn a_new_apps_replica_failing_soon_after_completion_fails_its_rollout() {
        let a = app(1, 1, "[rollout]\nprogress_deadline = \"60s\"\n");
        let up = [replica("n1", 1, Phase::Running)];
        let done = decide(&a, &start(&a, None, 0), &up, None, 1_000).status;
        assert_eq!(done.phase, RolloutPhase::Complete);
        assert_eq!(done.previous_stable, None);

        let crashing = [replica("n1", 1, Phase::CrashLoopBackOff)];
        let d = decide(&a, &done, &crashing, None, 30_000);
        assert!(d.roll_back.is_none());
        assert_eq!(d.status.phase, RolloutPhase::Failed);
        assert!(
            d.status.message.ends_with("after its rollout completed"),
            "{}",
            d.status.message
        );
        let (kind, reason, _) = d.event.expect("an event");
        assert_eq!((kind, reason), (EventType::Warning, "RolloutFailed"));
        let failed = d.status;

        assert_eq!(failed.stable, None, "no fallback for the next rollout");
        let mut again = replica("n1", 1, Phase::Running);
        again.restarts = 2;
        again.updated_at = 31_000;
        assert_eq!(
            decide(&a, &failed, &[again.clone()], None, 31_000).status,
            failed
        );
        // Up a whole progress deadline since its last restart: it completes after all.
        let settled = decide(&a, &failed, &[again], None, 91_000).status;
        assert_eq!(settled.phase, RolloutPhase::Complete);
        assert_eq!(settled.stable, Some(1));
        // Past the deadline a crash is its node's to restart, as for any stable revision.
        assert_eq!(
            decide(&a, &done, &crashing, None, 62_000).status.phase,
            RolloutPhase::Complete
        );
    }

    #[test]
    fn a_new_apps_failed_rollout_still_completes_later() {
        let a = app(2, 1, "[rollout]\nprogress_deadline = \"30s\"\n");
        let s = start(&a, None, 0);
        let stuck = [replica("n1", 1, Phase::Starting)];
        let failed = decide(&a, &s, &stuck, None, 31_000).status;
        assert_eq!(failed.phase, RolloutPhase::Failed);
        // Still stuck: nothing to write.
        assert_eq!(decide(&a, &failed, &stuck, None, 50_000).status, failed);
        let ready = [
            replica("n1", 1, Phase::Ready),
            replica("n2", 1, Phase::Ready),
        ];
        let d = decide(&a, &failed, &ready, None, 60_000);
        assert_eq!(d.status.phase, RolloutPhase::Complete);
        assert_eq!(d.status.stable, Some(1));
    }

    #[test]
    fn a_step_that_begins_says_what_it_waits_for_at_once() {
        // The message is written only with a change of state: a step's must be
        // right the moment it begins, and stay right while nothing else changes.
        let a = app(
            2,
            2,
            "[rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 50 }]\n",
        );
        let s = rolling_to_2(&a);
        let rs = [
            replica("o1", 1, Phase::Ready),
            replica("o2", 1, Phase::Ready),
            replica("c", 2, Phase::Ready),
        ];
        let begun = decide(&a, &s, &rs, None, 2_000);
        assert_eq!(begun.status.step_started_at, Some(2_000));
        let waiting = "step 1/1: 50% to revision 2; waiting for `shoal rollout promote`";
        assert_eq!(begun.status.message, waiting);
        assert!(begun.event.unwrap().2.contains("keeps the rest"));
        let later = decide(&a, &begun.status, &rs, None, 9_000);
        assert!(later.status.same_state(&begun.status));
        assert_eq!(later.status.message, waiting);
    }

    #[test]
    fn pause_resume_promote_and_abort() {
        let a = app(4, 2, CANARY);
        let s = rolling_to_2(&a);
        let status = |acted| match acted {
            Ok(Acted::Status { status, reason }) => (status, reason),
            other => panic!("{other:?}"),
        };
        let (paused, reason) = status(act(&a, &s, Action::Pause, 2_000));
        assert!(paused.paused);
        assert_eq!(reason, "Paused");
        assert_eq!(mode(&a, Some(&paused)), Mode::Hold);

        // Resuming restarts the deadline clock, and a running step's pause.
        let mut stepping = paused.clone();
        stepping.step_started_at = Some(1_500);
        let (resumed, _) = status(act(&a, &stepping, Action::Resume, 9_000));
        assert!(!resumed.paused);
        assert_eq!(
            (resumed.progressed_at, resumed.step_started_at),
            (9_000, Some(9_000))
        );

        // Promote: the next step (its clock unstarted), or every step at once.
        let (next, reason) = status(act(&a, &stepping, Action::Promote { full: false }, 9_000));
        assert_eq!(
            (next.step, next.step_started_at, next.paused),
            (1, None, false)
        );
        assert_eq!(reason, "Promoted");
        assert_eq!(next.message, "revision 2 promoted to step 2/2");
        let (full, _) = status(act(&a, &s, Action::Promote { full: true }, 9_000));
        assert_eq!(full.step, 2);
        assert_eq!(full.message, "revision 2 promoted to 100%");

        // Abort goes back to the stable revision.
        assert_eq!(
            act(&a, &s, Action::Abort, 9_000),
            Ok(Acted::RollBack(RollBack {
                to: 1,
                phase: RolloutPhase::Aborted,
                reason: "aborted by `shoal rollout abort`".into(),
            }))
        );

        // What cannot be done says why.
        let rolling = app(4, 2, "");
        let s2 = rolling_to_2(&rolling);
        assert!(matches!(
            act(&rolling, &s2, Action::Promote { full: false }, 0),
            Err(ActionError::NotACanary(_))
        ));
        let fresh = start(&app(1, 1, ""), None, 0);
        assert!(matches!(
            act(&app(1, 1, ""), &fresh, Action::Abort, 0),
            Err(ActionError::NothingToGoBackTo(_))
        ));
        let mut done = s.clone();
        done.phase = RolloutPhase::Complete;
        for action in [
            Action::Resume,
            Action::Promote { full: false },
            Action::Abort,
        ] {
            assert!(
                matches!(
                    act(&a, &done, action, 0),
                    Err(ActionError::NotInProgress { revision: 2, .. })
                ),
                "{action:?}"
            );
        }
        // After a roll back, what is said is the revision abandoned, not the one back on.
        let mut back = done.clone();
        back.phase = RolloutPhase::Aborted;
        back.rolled_back_from = Some(3);
        let e = act(&a, &back, Action::Promote { full: false }, 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("the last one, of revision 3, is Aborted"),
            "{e}"
        );
    }

    /// As a Kubernetes Deployment: paused between rollouts, the next revision applied waits
    /// for `resume`, and so does one applied while a rollout is paused.
    #[test]
    fn a_pause_holds_the_rollouts_applied_after_it_until_resumed() {
        let a = app(2, 2, "");
        let mut done = rolling_to_2(&a);
        done.phase = RolloutPhase::Complete;
        let status = |acted| match acted {
            Ok(Acted::Status { status, reason }) => (status, reason),
            other => panic!("{other:?}"),
        };
        let (paused, reason) = status(act(&a, &done, Action::Pause, 2_000));
        assert_eq!(
            (paused.paused, paused.phase, reason),
            (true, RolloutPhase::Complete, "Paused")
        );
        assert!(paused.message.contains("waits for `shoal rollout resume`"));
        assert_eq!(mode(&a, Some(&paused)), Mode::Roll, "nothing to hold yet");

        // Revision 3 applied: its rollout starts paused, holding the counts as they are.
        let b = app(2, 3, "");
        let held = start(&b, Some(&paused), 3_000);
        assert!(held.paused, "{held:?}");
        assert_eq!(mode(&b, Some(&held)), Mode::Hold);
        // And revision 4 applied over the paused rollout of 3: still paused.
        let c = app(2, 4, "");
        assert!(start(&c, Some(&held), 4_000).paused);
        let (resumed, _) = status(act(&b, &held, Action::Resume, 5_000));
        assert!(!resumed.paused);
        assert_eq!(mode(&b, Some(&resumed)), Mode::Roll);

        // Resumed between rollouts: the next one rolls at once.
        let (unpaused, reason) = status(act(&a, &paused, Action::Resume, 6_000));
        assert_eq!((unpaused.paused, reason), (false, "Resumed"));
        assert!(!start(&b, Some(&unpaused), 7_000).paused);
    }

    #[test]
    fn a_roll_back_runs_the_stable_template_under_its_own_number() {
        let a = app(2, 2, "");
        let s = rolling_to_2(&a);
        let old = app(2, 1, "[env]\nV = \"1\"\n");
        let target = shoal_core::Revision {
            app: a.spec.key(),
            number: 1,
            template: old.spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        };
        let rb = RollBack {
            to: 1,
            phase: RolloutPhase::RolledBack,
            reason: "no progress".into(),
        };
        let done = roll_back(&a, &target, &s, &rb, 7_000);
        // A rolling update's revision left may hold most ready replicas: no 0 % for it.
        assert_eq!(done.status.traffic(&a.spec.rollout), None);
        assert_eq!(done.app.revision, 1);
        assert_eq!(done.app.spec.template(), target.template);
        assert_eq!(
            (done.status.revision, done.status.stable, done.status.phase),
            (1, Some(1), RolloutPhase::RolledBack)
        );
        assert_eq!(done.status.rolled_back_from, Some(2));
        assert_eq!(done.outcome, "rolled back: no progress");
        assert_eq!(done.event.1, "RolledBack");
    }
}
