//! A job's runs, as Kubernetes' CronJob controller decides them: which run to
//! start now (the latest firing of the schedule due since the last one dealt
//! with: older missed firings collapse into it), which firing to skip (an
//! active run under `concurrency = "forbid"`, or one past its starting
//! deadline), which active runs `replace` stops, and which finished runs fall
//! out of the history. A run asked for by `shoal job run` goes through the
//! same concurrency policy.
//!
//! A run is a replica of the app's current revision whose `scheduled_at` says
//! which firing (or request) it is for. Pure: what it remembers between passes
//! is the app's [`JobStatus`], and time is an argument.

use crate::autoscale::human;
use shoal_core::spec::Concurrency;
use shoal_core::{App, EventType, JobStatus, Millis, Replica};

/// A run to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The firing (or request) it is for: the new replica's `scheduled_at`.
    pub scheduled_at: Millis,
    /// What it is for, in words: "for the firing at …", "by `shoal job run`".
    pub why: String,
}

/// What [`decide`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub start: Option<Start>,
    /// Runs lost with their node, to start again elsewhere: each one's
    /// `scheduled_at`. The same run goes on, whatever the concurrency policy.
    pub restart: Vec<Option<Millis>>,
    /// Runs to delete: active ones `replace` stops, then finished ones past
    /// the history, oldest first.
    pub delete: Vec<String>,
    /// The app's [`JobStatus`] after this decision.
    pub status: JobStatus,
    /// (type, reason, message) to record with the decision.
    pub events: Vec<(EventType, &'static str, String)>,
}

/// Missed firings counted for a message; past this many it says "100+".
const MISSED_COUNTED: usize = 100;

/// What `app`'s runs need at `now`. `runs` are its runs as read, `lost` those
/// removed this pass because their node is lost (still active, so they count
/// against `forbid`). At most one run starts per pass: a run asked for by hand
/// goes first, and a firing due meanwhile is dealt with by the next pass.
pub fn decide(app: &App, runs: &[&Replica], lost: &[&Replica], now: Millis) -> Decision {
    let policy = &app.spec.runs;
    let mut status = app.job.clone();
    let mut events = Vec::new();
    let due = match status.run_requested.take() {
        Some(at) => Some(Start {
            scheduled_at: at,
            why: "by `shoal job run`".into(),
        }),
        None => fired(app, &mut status, &mut events, now),
    };
    let active: Vec<&Replica> = runs
        .iter()
        .copied()
        .filter(|r| !r.phase.is_terminal())
        .chain(lost.iter().copied())
        .collect();
    let mut restart: Vec<Option<Millis>> = lost.iter().map(|r| r.scheduled_at).collect();
    let mut delete = Vec::new();
    let start = match due {
        Some(start) if active.is_empty() => Some(start),
        Some(start) => match policy.concurrency {
            Concurrency::Allow => Some(start),
            Concurrency::Forbid => {
                let ids: Vec<&str> = active.iter().map(|r| r.id.as_str()).collect();
                events.push((
                    EventType::Normal,
                    "RunSkipped",
                    format!(
                        "run {} skipped: {} still active (concurrency = \"forbid\")",
                        start.why,
                        runs_named(&ids)
                    ),
                ));
                None
            }
            Concurrency::Replace => {
                restart.clear();
                for r in &active {
                    // A lost run is being deleted already.
                    if !lost.iter().any(|l| l.id == r.id) {
                        delete.push(r.id.clone());
                    }
                    events.push((
                        EventType::Normal,
                        "RunReplaced",
                        format!(
                            "run {} stopped for the run {} (concurrency = \"replace\")",
                            r.id, start.why
                        ),
                    ));
                }
                Some(start)
            }
        },
        None => None,
    };
    delete.extend(past_history(app, runs, &delete));
    Decision {
        start,
        restart,
        delete,
        status,
        events,
    }
}

/// The run due by the schedule: its latest firing after the last one dealt
/// with (or the app's creation), which is then dealt with; `None` if there is
/// none, or it is past its starting deadline (a `MissedRun`).
fn fired(
    app: &App,
    status: &mut JobStatus,
    events: &mut Vec<(EventType, &'static str, String)>,
    now: Millis,
) -> Option<Start> {
    let policy = &app.spec.runs;
    let cron = policy.cron()?;
    let from = status.last_scheduled.unwrap_or(app.created_at);
    let latest = cron.previous(now).filter(|t| *t > from)?;
    status.last_scheduled = Some(latest);
    let at = policy.local_time(latest);
    if let Some(deadline) = policy.starting_deadline_ms
        && now.saturating_sub(latest) > deadline
    {
        events.push((
            EventType::Warning,
            "MissedRun",
            format!(
                "run for the firing at {at} skipped: it could not start within starting_deadline ({}) of it",
                human(deadline)
            ),
        ));
        return None;
    }
    let mut why = format!("for the firing at {at}");
    let mut missed = 0;
    let mut t = cron.next_after(from);
    while let Some(earlier) = t.filter(|at| *at < latest && missed <= MISSED_COUNTED) {
        missed += 1;
        t = cron.next_after(earlier);
    }
    match missed {
        0 => {}
        1 => why.push_str(" (1 earlier firing missed)"),
        n if n > MISSED_COUNTED => {
            why.push_str(&format!(" ({MISSED_COUNTED}+ earlier firings missed)"))
        }
        n => why.push_str(&format!(" ({n} earlier firings missed)")),
    }
    Some(Start {
        scheduled_at: latest,
        why,
    })
}

/// Finished runs beyond what the history keeps of their outcome, oldest
/// first; `deleted` are going already.
fn past_history(app: &App, runs: &[&Replica], deleted: &[String]) -> Vec<String> {
    let history = &app.spec.runs.history;
    let mut out = Vec::new();
    for (phase, keep) in [
        (shoal_core::Phase::Succeeded, history.succeeded),
        (shoal_core::Phase::Failed, history.failed),
    ] {
        let mut done: Vec<&Replica> = runs
            .iter()
            .copied()
            .filter(|r| r.phase == phase && !deleted.contains(&r.id))
            .collect();
        done.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let surplus = done.len().saturating_sub(keep as usize);
        out.extend(done[..surplus].iter().map(|r| r.id.clone()));
    }
    out
}

/// "run a-1-x is" / "runs a-1-x, a-1-y are".
fn runs_named(ids: &[&str]) -> String {
    match ids {
        [one] => format!("run {one} is"),
        many => format!("runs {} are", many.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{app_with, replica_at};
    use shoal_core::Phase;

    /// 2026-11-30 10:03:00 UTC.
    const CREATED: Millis = 1_796_032_980_000;
    const MINUTE: Millis = 60_000;
    const HOUR: Millis = 3_600_000;
    /// 2026-11-30 11:00:00 UTC.
    const ELEVEN: Millis = CREATED + 57 * MINUTE;

    /// Job `default/a`, created at [`CREATED`], with `job` appended to its `[job]` section.
    fn job(runs: &str) -> App {
        let mut app = app_with("job", 1, 1, &format!("[job]\n{runs}\n"));
        app.created_at = CREATED;
        app
    }

    fn run(id: &str, phase: Phase, created_at: Millis) -> Replica {
        let mut r = replica_at(id, 1, phase, created_at);
        r.kind = shoal_core::Kind::Job;
        r.scheduled_at = Some(created_at);
        r
    }

    fn reasons(d: &Decision) -> Vec<&'static str> {
        d.events.iter().map(|e| e.1).collect()
    }

    #[test]
    fn the_first_run_waits_for_a_firing_after_the_apps_creation() {
        let app = job("schedule = \"0 * * * *\"");
        // Created at 10:03: the 10:00 firing is before it.
        let d = decide(&app, &[], &[], CREATED + 10 * MINUTE);
        assert_eq!(d, Decision::default());
        let d = decide(&app, &[], &[], ELEVEN + 1_500);
        let start = d.start.expect("the 11:00 firing starts a run");
        assert_eq!(start.scheduled_at, ELEVEN);
        assert_eq!(start.why, "for the firing at 2026-11-30 11:00:00 UTC");
        assert_eq!(d.status.last_scheduled, Some(ELEVEN));
        // Once dealt with, the same firing starts nothing more.
        let mut app = app;
        app.job = d.status;
        assert_eq!(decide(&app, &[], &[], ELEVEN + 5_000).start, None);
    }

    #[test]
    fn missed_firings_collapse_into_the_latest() {
        let mut app = job("schedule = \"0 * * * *\"");
        app.job.last_scheduled = Some(ELEVEN);
        // Down from 11:30 to 14:10: 12:00 and 13:00 were missed, 14:00 runs.
        let d = decide(&app, &[], &[], ELEVEN + 3 * HOUR + 10 * MINUTE);
        let start = d.start.unwrap();
        assert_eq!(start.scheduled_at, ELEVEN + 3 * HOUR);
        assert!(
            start.why.ends_with("(2 earlier firings missed)"),
            "{start:?}"
        );
        assert_eq!(d.status.last_scheduled, Some(ELEVEN + 3 * HOUR));
    }

    #[test]
    fn a_firing_past_its_starting_deadline_is_missed() {
        let app = job("schedule = \"0 * * * *\"\nstarting_deadline = \"30s\"");
        let d = decide(&app, &[], &[], ELEVEN + 31_000);
        assert_eq!(d.start, None);
        assert_eq!(reasons(&d), ["MissedRun"]);
        assert_eq!(d.events[0].0, EventType::Warning);
        assert!(
            d.events[0].2.contains("within starting_deadline (30s)"),
            "{d:?}"
        );
        // Missed once: the next pass does not report it again.
        assert_eq!(d.status.last_scheduled, Some(ELEVEN));
        let d = decide(&app, &[], &[], ELEVEN + 29_000);
        assert_eq!(d.start.unwrap().scheduled_at, ELEVEN);
    }

    #[test]
    fn seconds_and_zones_are_the_schedules() {
        let app = job("schedule = \"*/2 * * * * *\"\ntimezone = \"Asia/Seoul\"");
        let d = decide(&app, &[], &[], CREATED + 3_500);
        let start = d.start.unwrap();
        assert_eq!(start.scheduled_at, CREATED + 2_000);
        assert_eq!(start.why, "for the firing at 2026-11-30 19:03:02 KST");
    }

    #[test]
    fn allow_starts_beside_an_active_run() {
        let app = job("schedule = \"0 * * * *\"");
        let active = run("a-1-x", Phase::Running, CREATED);
        let d = decide(&app, &[&active], &[], ELEVEN);
        assert_eq!(d.start.as_ref().unwrap().scheduled_at, ELEVEN);
        assert!(d.delete.is_empty() && d.events.is_empty(), "{d:?}");
    }

    #[test]
    fn forbid_skips_a_firing_while_a_run_is_active() {
        let app = job("schedule = \"0 * * * *\"\nconcurrency = \"forbid\"");
        let active = run("a-1-x", Phase::Running, CREATED);
        let d = decide(&app, &[&active], &[], ELEVEN);
        assert_eq!(d.start, None);
        assert_eq!(reasons(&d), ["RunSkipped"]);
        assert!(d.events[0].2.contains("run a-1-x is still active"), "{d:?}");
        // The firing is dealt with: skipped once, not on every pass after.
        assert_eq!(d.status.last_scheduled, Some(ELEVEN));
        // A finished run does not stand in the way.
        let done = run("a-1-x", Phase::Succeeded, CREATED);
        assert!(decide(&app, &[&done], &[], ELEVEN).start.is_some());
    }

    #[test]
    fn replace_stops_the_active_runs_and_starts() {
        let app = job("schedule = \"0 * * * *\"\nconcurrency = \"replace\"");
        let (a, b) = (
            run("a-1-x", Phase::Running, CREATED),
            run("a-1-y", Phase::Pending, CREATED + 1),
        );
        let done = run("a-1-z", Phase::Succeeded, CREATED - 1);
        let d = decide(&app, &[&done, &a, &b], &[], ELEVEN);
        assert_eq!(d.start.as_ref().unwrap().scheduled_at, ELEVEN);
        assert_eq!(d.delete, ["a-1-x", "a-1-y"]);
        assert_eq!(reasons(&d), ["RunReplaced", "RunReplaced"]);
        // Nothing due: nothing replaced.
        let mut app = app;
        app.job.last_scheduled = Some(ELEVEN);
        assert!(decide(&app, &[&a], &[], ELEVEN).delete.is_empty());
    }

    #[test]
    fn history_keeps_the_newest_runs_of_each_outcome() {
        let app = job("history = { succeeded = 2, failed = 1 }");
        let rs = [
            run("s1", Phase::Succeeded, 1),
            run("f1", Phase::Failed, 2),
            run("s2", Phase::Succeeded, 3),
            run("s3", Phase::Succeeded, 4),
            run("f2", Phase::Failed, 5),
            run("r1", Phase::Running, 6),
        ];
        let refs: Vec<&Replica> = rs.iter().collect();
        let d = decide(&app, &refs, &[], ELEVEN);
        assert_eq!(d.delete, ["s1", "f1"]);
        assert_eq!(d.start, None);
        // Within the limits: nothing goes.
        assert!(decide(&app, &refs[2..], &[], ELEVEN).delete.is_empty());
    }

    #[test]
    fn a_run_asked_for_by_hand_starts_now_under_the_same_policy() {
        let mut app = job("");
        app.job.run_requested = Some(CREATED + MINUTE);
        let d = decide(&app, &[], &[], CREATED + MINUTE + 100);
        let start = d.start.unwrap();
        assert_eq!(
            (start.scheduled_at, start.why.as_str()),
            (CREATED + MINUTE, "by `shoal job run`")
        );
        assert_eq!(d.status.run_requested, None, "dealt with");

        let mut forbid = job("concurrency = \"forbid\"");
        forbid.job.run_requested = Some(CREATED + MINUTE);
        let active = run("a-1-x", Phase::Running, CREATED);
        let d = decide(&forbid, &[&active], &[], CREATED + MINUTE);
        assert_eq!((&d.start, reasons(&d)), (&None, vec!["RunSkipped"]));
        assert_eq!(d.status.run_requested, None);
    }

    #[test]
    fn a_request_goes_first_and_the_firing_waits_a_pass() {
        let mut app = job("schedule = \"0 * * * *\"");
        app.job.run_requested = Some(ELEVEN - 1);
        let d = decide(&app, &[], &[], ELEVEN);
        assert_eq!(d.start.unwrap().scheduled_at, ELEVEN - 1);
        assert_eq!(d.status.last_scheduled, None, "the firing is still due");
        app.job = d.status;
        let started = run("a-1-x", Phase::Running, ELEVEN - 1);
        let d = decide(&app, &[&started], &[], ELEVEN + 100);
        assert_eq!(d.start.unwrap().scheduled_at, ELEVEN);
    }

    #[test]
    fn a_run_lost_with_its_node_starts_again_and_counts_as_active() {
        let app = job("schedule = \"0 * * * *\"\nconcurrency = \"forbid\"");
        let lost = run("a-1-x", Phase::Running, CREATED);
        let d = decide(&app, &[], &[&lost], ELEVEN);
        assert_eq!(d.restart, [Some(CREATED)]);
        assert_eq!((&d.start, reasons(&d)), (&None, vec!["RunSkipped"]));
        // Replaced instead, it is not started again.
        let app = job("schedule = \"0 * * * *\"\nconcurrency = \"replace\"");
        let d = decide(&app, &[], &[&lost], ELEVEN);
        assert!(d.restart.is_empty() && d.delete.is_empty(), "{d:?}");
        assert!(d.start.is_some());
    }
}
