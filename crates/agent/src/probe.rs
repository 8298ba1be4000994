//! What an http replica's probe results mean, as a pure state machine: the
//! replica's task runs the probes and does what [`ProbeState::observe`] says.
//! Time is an argument, so every rule is tested without waiting.

use shoal_core::spec::{Health, Probe as ProbeSpec};
use std::time::Duration;

/// Restart delays of something that keeps failing: 100 ms doubling to 30 s,
/// back to the start after a run of [`BACKOFF_RESET`].
pub const BACKOFF_START: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// Liveness restarts after which the node says the replica keeps failing here (so the
/// controller may replace it on another node, or roll its revision back); a replica that
/// stays live for [`BACKOFF_RESET`] starts counting again.
pub use shoal_core::objects::LIVENESS_RESTARTS;

/// Restart delays of a command or replica that keeps exiting or failing.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// The delay before starting again a run that lasted `ran`.
    pub fn after(&mut self, ran: Duration) -> Duration {
        if ran >= BACKOFF_RESET {
            self.next = BACKOFF_START;
        }
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

/// Which probe a result is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Readiness,
    Liveness,
}

/// What the replica's task does after a probe result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Readiness passed often enough: into the gateway, report Ready.
    Serve,
    /// Readiness failed often enough: out of the gateway, report Unready.
    Unserve(String),
    /// Liveness failed often enough: out of the gateway and restarted with a
    /// fresh instance pre-image, served at once if no readiness probe gates it.
    Restart(Restart),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// For the replica's log and its report after the restart.
    pub message: String,
    /// Restarts so far, this one included.
    pub restarts: u32,
    /// Whether to serve right after the restart (no readiness probe).
    pub serve: bool,
    /// Restarts did not help: report that liveness keeps failing here (the
    /// controller replaces the replica elsewhere if it can) and wait this long
    /// before restarting it here, with this message.
    pub keeps_failing: Option<(Duration, String)>,
    /// [`ProbeState::keeps_failing`] once restarted: what its reports say.
    pub failing: bool,
}

/// The probe counters of one replica.
#[derive(Debug)]
pub struct ProbeState {
    health: Health,
    ready: bool,
    passes: u32,
    failures: u32,
    live_failures: u32,
    restarts: u32,
    /// Liveness restarts since the replica last stayed live for [`BACKOFF_RESET`].
    recent_restarts: u32,
    last_restart: Duration,
    /// The last liveness probe that passed since then.
    last_live: Option<Duration>,
    backoff: Backoff,
    /// When each probe (readiness, liveness) is due next: each at its own period.
    next: [Duration; 2],
}

impl ProbeState {
    /// A replica started at `now` (time since any fixed origin), restarted `restarts` times
    /// before (by an agent before this one); without a readiness probe it is served at once,
    /// which the caller does. Both probes are due at once.
    pub fn new(health: &Health, now: Duration, restarts: u32) -> Self {
        ProbeState {
            health: health.clone(),
            ready: health.readiness.is_none(),
            passes: 0,
            failures: 0,
            live_failures: 0,
            restarts,
            recent_restarts: 0,
            last_restart: now,
            last_live: None,
            backoff: Backoff::default(),
            next: [now; 2],
        }
    }

    fn probes(&self) -> [(Probe, Option<&ProbeSpec>); 2] {
        [
            (Probe::Readiness, self.health.readiness.as_ref()),
            (Probe::Liveness, self.health.liveness.as_ref()),
        ]
    }

    /// When the next probe is due (`None`: it has none).
    pub fn next_due(&self) -> Option<Duration> {
        self.probes()
            .iter()
            .zip(self.next)
            .filter(|((_, spec), _)| spec.is_some())
            .map(|(_, at)| at)
            .min()
    }

    /// The probes due at `now`, readiness first, each then due again a period later: each
    /// runs at its own period, not the shortest of the two.
    pub fn due(&mut self, now: Duration) -> Vec<Probe> {
        let mut due = Vec::new();
        for (i, (probe, spec)) in self.probes().into_iter().enumerate() {
            if let Some(spec) = spec
                && self.next[i] <= now
            {
                due.push((i, probe, Duration::from_millis(spec.period_ms)));
            }
        }
        due.into_iter()
            .map(|(i, probe, period)| {
                self.next[i] = now + period;
                probe
            })
            .collect()
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Whether restarts have not helped: more than [`LIVENESS_RESTARTS`] of them, none
    /// after which it stayed live for [`BACKOFF_RESET`]. Every report says so while it
    /// holds, so the controller sees it whenever it looks and can move the replica.
    pub fn keeps_failing(&self) -> bool {
        self.recent_restarts > LIVENESS_RESTARTS && !self.stayed_live()
    }

    /// Whether its liveness probes passed for [`BACKOFF_RESET`] since its last restart:
    /// passed, not merely that long ago, as slow probes (a period of 20 s, failing 3 times)
    /// restart it a minute apart however dead it is.
    fn stayed_live(&self) -> bool {
        self.last_live
            .is_some_and(|at| at.saturating_sub(self.last_restart) >= BACKOFF_RESET)
    }

    /// Takes one probe result, observed at `now`.
    pub fn observe(&mut self, probe: Probe, result: Result<(), String>, now: Duration) -> Action {
        match probe {
            Probe::Readiness => self.readiness(result),
            Probe::Liveness => self.liveness(result, now),
        }
    }

    fn readiness(&mut self, result: Result<(), String>) -> Action {
        let Some(r) = &self.health.readiness else {
            return Action::Nothing;
        };
        match result {
            Ok(()) => (self.passes, self.failures) = (self.passes + 1, 0),
            Err(why) => {
                (self.passes, self.failures) = (0, self.failures + 1);
                if self.ready && self.failures >= r.failure_threshold {
                    self.ready = false;
                    return Action::Unserve(format!(
                        "readiness probe failed {} times: {why}",
                        self.failures
                    ));
                }
            }
        }
        if !self.ready && self.passes >= r.success_threshold {
            self.ready = true;
            return Action::Serve;
        }
        Action::Nothing
    }

    fn liveness(&mut self, result: Result<(), String>, now: Duration) -> Action {
        let Some(l) = &self.health.liveness else {
            return Action::Nothing;
        };
        let why = match result {
            Ok(()) => {
                self.live_failures = 0;
                self.last_live = Some(now);
                return Action::Nothing;
            }
            Err(why) => why,
        };
        self.live_failures += 1;
        let failures = self.live_failures;
        if failures < l.failure_threshold {
            return Action::Nothing;
        }
        if self.stayed_live() {
            // Live for a while: a new episode, from the shortest delay again.
            self.recent_restarts = 0;
            self.backoff = Backoff::default();
        }
        let keeps_failing = (self.recent_restarts >= LIVENESS_RESTARTS).then(|| {
            // Grows on: it was reset above only if it stayed live, however long ago this
            // restart's predecessor was.
            let delay = self.backoff.after(Duration::ZERO);
            let message = format!(
                "liveness probe failed {failures} times ({why}) after {} restarts; restarting in {delay:?}",
                self.recent_restarts
            );
            (delay, message)
        });
        let delay = keeps_failing.as_ref().map_or(Duration::ZERO, |(d, _)| *d);
        self.restarts += 1;
        self.recent_restarts += 1;
        self.last_restart = now + delay;
        self.last_live = None;
        (self.live_failures, self.passes, self.failures) = (0, 0, 0);
        self.ready = self.health.readiness.is_none();
        // The fresh instance is probed for readiness at once, not a period later.
        self.next[0] = now + delay;
        Action::Restart(Restart {
            message: format!("liveness probe failed {failures} times ({why}); restarted"),
            restarts: self.restarts,
            serve: self.ready,
            keeps_failing,
            failing: self.keeps_failing(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(failure_threshold: u32, success_threshold: u32) -> Option<ProbeSpec> {
        Some(ProbeSpec {
            path: "/healthz".into(),
            period_ms: 100,
            timeout_ms: 50,
            failure_threshold,
            success_threshold,
        })
    }

    fn fail() -> Result<(), String> {
        Err("/healthz answered 500".into())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_stable_run() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(5);
        let delays: Vec<u64> = (0..12).map(|_| b.after(quick).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        // A run just short of the reset period keeps the cap; a long enough one starts over.
        assert_eq!(b.after(BACKOFF_RESET - quick), BACKOFF_MAX);
        assert_eq!(b.after(BACKOFF_RESET), BACKOFF_START);
        assert_eq!(b.after(quick), BACKOFF_START * 2);
    }

    #[test]
    fn readiness_gates_by_its_thresholds() {
        let health = Health {
            readiness: probe(2, 2),
            liveness: None,
        };
        let mut s = ProbeState::new(&health, secs(0), 0);
        let r = Probe::Readiness;
        assert_eq!(s.observe(r, Ok(()), secs(1)), Action::Nothing);
        assert_eq!(s.observe(r, Ok(()), secs(2)), Action::Serve);
        assert_eq!(s.observe(r, Ok(()), secs(3)), Action::Nothing);
        assert_eq!(s.observe(r, fail(), secs(4)), Action::Nothing);
        // A pass in between resets the failures.
        assert_eq!(s.observe(r, Ok(()), secs(5)), Action::Nothing);
        assert_eq!(s.observe(r, fail(), secs(6)), Action::Nothing);
        assert_eq!(
            s.observe(r, fail(), secs(7)),
            Action::Unserve("readiness probe failed 2 times: /healthz answered 500".into())
        );
        assert_eq!(s.observe(r, fail(), secs(8)), Action::Nothing);
        assert_eq!(s.observe(r, Ok(()), secs(9)), Action::Nothing);
        assert_eq!(s.observe(r, Ok(()), secs(10)), Action::Serve);
        // Without a liveness probe, liveness results mean nothing.
        assert_eq!(
            s.observe(Probe::Liveness, fail(), secs(11)),
            Action::Nothing
        );
    }

    #[test]
    fn liveness_restarts_then_says_it_keeps_failing_with_growing_delays() {
        let health = Health {
            readiness: None,
            liveness: probe(2, 1),
        };
        let mut s = ProbeState::new(&health, secs(0), 0);
        let l = Probe::Liveness;
        let mut t = 0;
        let mut restart = |s: &mut ProbeState| {
            t += 1;
            assert_eq!(s.observe(l, fail(), secs(t)), Action::Nothing);
            t += 1;
            match s.observe(l, fail(), secs(t)) {
                Action::Restart(r) => r,
                other => panic!("{other:?}"),
            }
        };
        for n in 1..=LIVENESS_RESTARTS {
            let r = restart(&mut s);
            assert_eq!((r.restarts, r.serve, r.keeps_failing), (n, true, None));
            assert!(!r.failing);
            assert_eq!(
                r.message,
                "liveness probe failed 2 times (/healthz answered 500); restarted"
            );
        }
        // Restarts did not help: say so, and restart with backoff.
        let r = restart(&mut s);
        assert!(r.failing);
        let (delay, message) = r.keeps_failing.unwrap();
        assert_eq!(delay, BACKOFF_START);
        assert!(message.contains("after 3 restarts"), "{message}");
        let (delay, _) = restart(&mut s).keeps_failing.unwrap();
        assert_eq!(delay, BACKOFF_START * 2);
        assert_eq!(s.restarts(), LIVENESS_RESTARTS + 2);
        // Said on every report until it has stayed live for a while: its probes passing,
        // not merely time going by.
        assert!(s.keeps_failing());
        let started = secs(t) + BACKOFF_START * 2;
        assert_eq!(s.observe(l, Ok(()), started), Action::Nothing);
        assert_eq!(
            s.observe(l, Ok(()), started + BACKOFF_RESET - secs(1)),
            Action::Nothing
        );
        assert!(s.keeps_failing());
        s.observe(l, Ok(()), started + BACKOFF_RESET);
        assert!(!s.keeps_failing());
    }

    /// Slow probes (every 30 s, failing 3 times) restart a dead replica a minute or more
    /// apart: that is no "live for a while" between restarts, which would make each one the
    /// first again, never with a delay, never said to keep failing (so never moved, nor its
    /// revision rolled back).
    #[test]
    fn slow_liveness_probes_that_keep_failing_are_said_to() {
        let mut spec = probe(3, 1).unwrap();
        spec.period_ms = 30_000;
        let health = Health {
            readiness: None,
            liveness: Some(spec),
        };
        let mut s = ProbeState::new(&health, secs(0), 0);
        let (mut said, mut delays) = (None, Vec::new());
        for n in 0..30 {
            if let Action::Restart(r) = s.observe(Probe::Liveness, fail(), secs(30 * n))
                && r.failing
            {
                said.get_or_insert(s.restarts());
                delays.extend(r.keeps_failing.map(|(d, _)| d));
            }
        }
        assert_eq!(said, Some(LIVENESS_RESTARTS + 1));
        // And the delay grows, as it would with quick probes.
        assert_eq!(
            delays[..3],
            [BACKOFF_START, BACKOFF_START * 2, BACKOFF_START * 4]
        );
    }

    /// Each probe runs at its own period, and a replica started again goes on counting its
    /// restarts from what its record says.
    #[test]
    fn each_probe_runs_at_its_own_period() {
        let mut spec = probe(3, 1).unwrap();
        spec.period_ms = 1_000;
        let mut slow = spec.clone();
        slow.period_ms = 10_000;
        let health = Health {
            readiness: Some(spec),
            liveness: Some(slow),
        };
        let mut s = ProbeState::new(&health, secs(0), 7);
        assert_eq!(s.restarts(), 7);
        let (r, l) = (Probe::Readiness, Probe::Liveness);
        let mut ran = Vec::new();
        while let Some(at) = s.next_due().filter(|at| *at <= secs(20)) {
            ran.push((at.as_secs(), s.due(at)));
        }
        let expected: Vec<(u64, Vec<Probe>)> = (0..=20)
            .map(|t| match t % 10 {
                0 => (t, vec![r, l]),
                _ => (t, vec![r]),
            })
            .collect();
        assert_eq!(ran, expected);
        assert_eq!(
            ProbeState::new(&Health::default(), secs(0), 0).next_due(),
            None
        );
    }

    /// After a while live, a new failing episode starts from the shortest delay again.
    #[test]
    fn the_restart_delay_starts_over_after_a_while_live() {
        let health = Health {
            readiness: None,
            liveness: probe(1, 1),
        };
        let mut s = ProbeState::new(&health, secs(0), 0);
        let l = Probe::Liveness;
        let mut delays = Vec::new();
        let mut t = secs(0);
        for _ in 0..LIVENESS_RESTARTS + 4 {
            t += Duration::from_millis(10);
            if let Action::Restart(r) = s.observe(l, fail(), t) {
                delays.extend(r.keeps_failing.map(|(d, _)| d));
            }
        }
        assert_eq!(delays.last(), Some(&(BACKOFF_START * 8)));
        // Live for a while: its probes pass.
        t += BACKOFF_RESET * 2;
        assert_eq!(s.observe(l, Ok(()), t), Action::Nothing);
        let mut again = Vec::new();
        for _ in 0..LIVENESS_RESTARTS + 1 {
            t += Duration::from_millis(10);
            if let Action::Restart(r) = s.observe(l, fail(), t) {
                again.extend(r.keeps_failing.map(|(d, _)| d));
            }
        }
        assert_eq!(again, [BACKOFF_START]);
    }

    #[test]
    fn a_replica_live_for_a_while_starts_counting_again() {
        let health = Health {
            readiness: probe(1, 1),
            liveness: probe(1, 1),
        };
        let mut s = ProbeState::new(&health, secs(0), 0);
        let l = Probe::Liveness;
        for n in 1..=LIVENESS_RESTARTS {
            match s.observe(l, fail(), secs(n as u64)) {
                // A readiness probe gates it after a restart.
                Action::Restart(r) => assert!(!r.serve && r.keeps_failing.is_none()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(s.observe(l, Ok(()), secs(10)), Action::Nothing);
        assert_eq!(
            s.observe(l, Ok(()), secs(3) + BACKOFF_RESET),
            Action::Nothing
        );
        match s.observe(l, fail(), secs(4) + BACKOFF_RESET) {
            Action::Restart(r) => assert_eq!(r.keeps_failing, None),
            other => panic!("{other:?}"),
        }
    }
}
