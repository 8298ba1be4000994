//! Gateway measurements: running totals per app revision since this control
//! plane started, and per app the totals when its current canary step began,
//! so a step is judged on the difference. The controller's plan decides when
//! a baseline is taken (the pass that starts a step); reading a rollout's
//! status changes nothing. Memory stays one entry per revision that served,
//! whatever the traffic; deleted apps' entries are dropped. In memory only: a
//! restarted control plane judges a canary step on what arrives after it.

use shoal_core::Millis;
use shoal_core::metrics::RevisionStats;
use shoal_core::spec::AppKey;
use shoal_scheduler::plan::{Baseline, Measurements};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Metrics {
    apps: Mutex<BTreeMap<AppKey, Measurements>>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AppKey, Measurements>> {
        self.apps.lock().expect("metrics lock")
    }

    /// Adds what a gateway counted since its last report.
    pub(crate) fn record(&self, stats: Vec<RevisionStats>) {
        let mut apps = self.lock();
        for s in stats {
            apps.entry(s.app.clone())
                .or_default()
                .totals
                .entry(s.revision)
                .or_insert_with(|| RevisionStats::new(s.app.clone(), s.revision))
                .merge(&s);
        }
    }

    /// Every app's measurements now, for a controller pass.
    pub(crate) fn snapshot(&self) -> BTreeMap<AppKey, Measurements> {
        self.lock().clone()
    }

    /// Records the totals a canary step is judged against.
    pub(crate) fn set_baseline(&self, app: AppKey, baseline: Baseline) {
        self.lock().entry(app).or_default().baseline = Some(baseline);
    }

    /// What `app`'s `revision` served since the step that started at `step`,
    /// if that step's baseline has been taken.
    pub(crate) fn since_step(
        &self,
        app: &AppKey,
        revision: u64,
        step: Millis,
    ) -> Option<RevisionStats> {
        self.lock().get(app)?.since_step(app, revision, step)
    }

    /// Forgets the measurements of apps that are gone.
    pub(crate) fn retain_apps(&self, keep: impl Fn(&AppKey) -> bool) {
        self.lock().retain(|app, _| keep(app));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_counts_from_its_baseline_and_reads_change_nothing() {
        let m = Metrics::default();
        let app = AppKey::new("default", "a");
        let stats = |rev, requests| {
            let mut s = RevisionStats::new(app.clone(), rev);
            s.requests = requests;
            s
        };
        m.record(vec![stats(1, 10), stats(2, 1)]);
        // No baseline for the step yet: nothing to say, however often asked.
        assert_eq!(m.since_step(&app, 2, 100), None);
        assert_eq!(m.since_step(&app, 2, 100), None);
        let totals = m.snapshot()[&app].totals.clone();
        m.set_baseline(app.clone(), Baseline { step: 100, totals });
        m.record(vec![stats(1, 20), stats(2, 2)]);
        assert_eq!(m.since_step(&app, 2, 100).unwrap().requests, 2);
        assert_eq!(m.since_step(&app, 1, 100).unwrap().requests, 20);
        // A revision first seen during the step counts whole.
        m.record(vec![stats(3, 5)]);
        assert_eq!(m.since_step(&app, 3, 100).unwrap().requests, 5);
        // Another step's question finds no baseline.
        assert_eq!(m.since_step(&app, 2, 200), None);
        m.retain_apps(|a| a.name != "a");
        assert!(m.snapshot().is_empty());
    }
}
