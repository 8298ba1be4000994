//! Gateway measurements: running totals per app revision since this control
//! plane started, and per app the totals when its current canary step began,
//! so a step is judged on the difference. The controller's plan decides when
//! a baseline is taken (the pass that starts a step); reading a rollout's
//! status changes nothing. Memory stays one entry per revision that served,
//! whatever the traffic; deleted apps' entries are dropped. In memory only: a
//! restarted control plane judges a canary step on what arrives after it.
//!
//! Load for autoscaling is kept apart from the totals: per app, one sample per
//! second of arrival (requests and the average in flight, summed over every
//! gateway that reported in that second), for the last hour at most (the
//! longest stable window a spec may ask for). Gateways report once a second,
//! so a report's in-flight integral over 1,000 ms is its average concurrency.

use shoal_api::CpuView;
use shoal_core::Millis;
use shoal_core::metrics::RevisionStats;
use shoal_core::spec::AppKey;
use shoal_scheduler::autoscale::LoadSample;
use shoal_scheduler::plan::{Baseline, Measurements};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Load samples older than this are dropped: the longest stable window.
const LOAD_HISTORY_MS: Millis = 3_600_000;
/// What one gateway report covers.
const REPORT_MS: f64 = 1_000.0;

/// A node's previous and latest CPU report for one app.
type LastTwo = [Option<CpuSample>; 2];

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Millis,
    used_ns: u64,
    throttled_ns: u64,
}

pub(crate) struct Metrics {
    apps: Mutex<BTreeMap<AppKey, Measurements>>,
    /// Apps measured since the controller last asked: its next pass looks at them.
    touched: Mutex<BTreeSet<AppKey>>,
    /// Per app, the requests each node's gateway holds for it: an app's `waiting` is their sum.
    waiting: Mutex<BTreeMap<AppKey, BTreeMap<String, u32>>>,
    /// Per app and node, the node's last two CPU reports.
    cpu: Mutex<BTreeMap<AppKey, BTreeMap<String, LastTwo>>>,
    /// When this control plane started measuring: windows before it are not covered.
    since: Millis,
}

impl Metrics {
    pub(crate) fn new(since: Millis) -> Metrics {
        Metrics {
            apps: Mutex::default(),
            touched: Mutex::default(),
            waiting: Mutex::default(),
            cpu: Mutex::default(),
            since,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AppKey, Measurements>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(
        &self,
        apps: &'a mut BTreeMap<AppKey, Measurements>,
        app: &AppKey,
    ) -> &'a mut Measurements {
        let m = apps.entry(app.clone()).or_default();
        m.load.since = self.since;
        m
    }

    /// Adds what a gateway counted since its last report, which arrived at `now`.
    pub(crate) fn record(&self, stats: Vec<RevisionStats>, now: Millis) {
        let mut apps = self.lock();
        let second = now - now % 1_000;
        self.touch(stats.iter().map(|s| s.app.clone()));
        for s in stats {
            let m = self.entry(&mut apps, &s.app);
            m.totals
                .entry(s.revision)
                .or_insert_with(|| RevisionStats::new(s.app.clone(), s.revision))
                .merge(&s);
            let load = &mut m.load;
            if s.requests > 0 {
                load.last_request = Some(now);
            }
            let concurrency = s.busy_ms as f64 / REPORT_MS;
            match load.samples.last_mut() {
                Some(last) if last.at == second => {
                    last.concurrency += concurrency;
                    last.requests = last.requests.saturating_add(s.requests);
                }
                _ => load.samples.push(LoadSample {
                    at: second,
                    concurrency,
                    requests: s.requests,
                }),
            }
            let cut = now.saturating_sub(LOAD_HISTORY_MS);
            let old = load.samples.partition_point(|x| x.at < cut);
            load.samples.drain(..old);
        }
    }

    /// Requests `node`'s gateway holds right now because `app` has no ready replica. Each
    /// node's count stands until that node sends another: a node that reports 0 does not
    /// cancel what another still holds.
    pub(crate) fn set_waiting(&self, app: &AppKey, node: &str, waiting: u32, now: Millis) {
        let mut apps = self.lock();
        self.touch([app.clone()]);
        let total = {
            let mut all = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let nodes = all.entry(app.clone()).or_default();
            if waiting > 0 {
                nodes.insert(node.to_string(), waiting);
            } else {
                nodes.remove(node);
            }
            let total = nodes.values().sum();
            if nodes.is_empty() {
                all.remove(app);
            }
            total
        };
        let load = &mut self.entry(&mut apps, app).load;
        load.waiting = total;
        if waiting > 0 {
            load.last_request = Some(now);
        }
    }

    /// A node's running CPU totals for `app`.
    pub(crate) fn set_cpu(
        &self,
        app: &AppKey,
        node: &str,
        used_ns: u64,
        throttled_ns: u64,
        now: Millis,
    ) {
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let samples = cpu
            .entry(app.clone())
            .or_default()
            .entry(node.to_string())
            .or_default();
        samples[0] = samples[1].take();
        samples[1] = Some(CpuSample {
            at: now,
            used_ns,
            throttled_ns,
        });
    }

    /// `app`'s guest CPU between each node's last two reports, summed over the
    /// nodes that reported in the last 10 s; `None` without two such reports.
    pub(crate) fn cpu(&self, app: &AppKey, now: Millis) -> Option<CpuView> {
        let cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let mut view: Option<CpuView> = None;
        for samples in cpu.get(app)?.values() {
            let [Some(a), Some(b)] = samples else {
                continue;
            };
            // A node that restarted starts its totals again: that interval says nothing.
            if b.at <= a.at || now.saturating_sub(b.at) > 10_000 || b.used_ns < a.used_ns {
                continue;
            }
            let per_ms = |ns: u64| ns / (b.at - a.at);
            let v = view.get_or_insert(CpuView {
                used_millis: 0,
                throttled_millis: 0,
            });
            // ns per ms of wall time is millicores divided by 1,000.
            v.used_millis += per_ms(b.used_ns - a.used_ns) / 1_000;
            v.throttled_millis += per_ms(b.throttled_ns.saturating_sub(a.throttled_ns)) / 1_000;
        }
        view
    }

    /// `app`'s average concurrency over the last `window_ms` (or as much of it
    /// as has been measured), for `get apps`; `None` before any report.
    pub(crate) fn concurrency(&self, app: &AppKey, window_ms: u64, now: Millis) -> Option<f64> {
        let apps = self.lock();
        let load = &apps.get(app)?.load;
        let from = now.saturating_sub(window_ms).max(self.since);
        let covered = ((now - from) as f64 / 1_000.0).max(1.0);
        let sum: f64 = load
            .samples
            .iter()
            .filter(|s| s.at > from.saturating_sub(1_000))
            .map(|s| s.concurrency)
            .sum();
        Some(sum / covered)
    }

    /// Every app's measurements now, for a controller pass.
    pub(crate) fn snapshot(&self) -> BTreeMap<AppKey, Measurements> {
        self.lock().clone()
    }

    /// The measurements of `apps` now, for a pass that looks at those only.
    pub(crate) fn snapshot_of(&self, apps: &BTreeSet<AppKey>) -> BTreeMap<AppKey, Measurements> {
        let all = self.lock();
        apps.iter()
            .filter_map(|k| Some((k.clone(), all.get(k)?.clone())))
            .collect()
    }

    fn touch(&self, apps: impl IntoIterator<Item = AppKey>) {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(apps);
    }

    /// The apps measured since the last call.
    pub(crate) fn take_touched(&self) -> BTreeSet<AppKey> {
        std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()))
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

    /// Forgets what nodes that are gone or not ready held: nobody waits there any more.
    pub(crate) fn retain_waiting_nodes(&self, keep: impl Fn(&str) -> bool) {
        let mut apps = self.lock();
        let mut all = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|app, nodes| {
            nodes.retain(|node, _| keep(node));
            if let Some(m) = apps.get_mut(app) {
                m.load.waiting = nodes.values().sum();
            }
            !nodes.is_empty()
        });
    }

    /// Forgets the measurements of apps that are gone.
    pub(crate) fn retain_apps(&self, keep: impl Fn(&AppKey) -> bool) {
        self.lock().retain(|app, _| keep(app));
        self.waiting
            .lock()
            .expect("metrics lock")
            .retain(|app, _| keep(app));
        self.cpu
            .lock()
            .expect("metrics lock")
            .retain(|app, _| keep(app));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_counts_from_its_baseline_and_reads_change_nothing() {
        let m = Metrics::new(0);
        let app = AppKey::new("default", "a");
        let stats = |rev, requests| {
            let mut s = RevisionStats::new(app.clone(), rev);
            s.requests = requests;
            s
        };
        m.record(vec![stats(1, 10), stats(2, 1)], 1_000);
        // No baseline for the step yet: nothing to say, however often asked.
        assert_eq!(m.since_step(&app, 2, 100), None);
        assert_eq!(m.since_step(&app, 2, 100), None);
        let totals = m.snapshot()[&app].totals.clone();
        m.set_baseline(app.clone(), Baseline { step: 100, totals });
        m.record(vec![stats(1, 20), stats(2, 2)], 2_000);
        assert_eq!(m.since_step(&app, 2, 100).unwrap().requests, 2);
        assert_eq!(m.since_step(&app, 1, 100).unwrap().requests, 20);
        // A revision first seen during the step counts whole.
        m.record(vec![stats(3, 5)], 3_000);
        assert_eq!(m.since_step(&app, 3, 100).unwrap().requests, 5);
        // Another step's question finds no baseline.
        assert_eq!(m.since_step(&app, 2, 200), None);
        m.retain_apps(|a| a.name != "a");
        assert!(m.snapshot().is_empty());
    }

    #[test]
    fn waiting_is_the_sum_of_what_each_node_still_holds() {
        let m = Metrics::new(0);
        let app = AppKey::new("default", "a");
        let waiting = |m: &Metrics| m.snapshot()[&app].load.waiting;
        m.set_waiting(&app, "n1", 3, 10);
        m.set_waiting(&app, "n2", 2, 11);
        assert_eq!(waiting(&m), 5);
        m.set_waiting(&app, "n2", 0, 12);
        assert_eq!(waiting(&m), 3, "n2 letting go does not cancel n1's");
        m.set_waiting(&app, "n2", 1, 13);
        m.retain_waiting_nodes(|n| n != "n1");
        assert_eq!(waiting(&m), 1, "a lost node's requests are nobody's");
        assert_eq!(m.take_touched(), BTreeSet::from([app.clone()]));
    }

    #[test]
    fn load_is_one_sample_per_second_summed_over_gateways() {
        let m = Metrics::new(0);
        let app = AppKey::new("default", "a");
        let stats = |rev, requests, busy_ms| {
            let mut s = RevisionStats::new(app.clone(), rev);
            s.requests = requests;
            s.busy_ms = busy_ms;
            s
        };
        // Two gateways in the same second, two revisions in one report.
        m.record(vec![stats(1, 10, 500), stats(2, 2, 500)], 10_100);
        m.record(vec![stats(1, 4, 2_000)], 10_900);
        m.record(vec![stats(1, 1, 0)], 11_200);
        let load = m.snapshot()[&app].load.clone();
        assert_eq!(load.samples.len(), 2, "{load:?}");
        assert_eq!((load.samples[0].at, load.samples[0].requests), (10_000, 16));
        assert!((load.samples[0].concurrency - 3.0).abs() < 1e-9);
        assert_eq!(load.last_request, Some(11_200));
        // Averaged over what was measured: 3 in flight for one of two seconds.
        let c = m.concurrency(&app, 60_000, 11_500).unwrap();
        assert!((c - 3.0 / 11.5).abs() < 1e-9, "{c}");
        // An hour later the samples are gone.
        m.record(vec![stats(1, 1, 0)], 3_700_000);
        assert_eq!(m.snapshot()[&app].load.samples.len(), 1);
    }

    #[test]
    fn cpu_is_the_rate_between_each_nodes_last_two_reports() {
        let m = Metrics::new(0);
        let app = AppKey::new("default", "a");
        assert_eq!(m.cpu(&app, 0), None);
        m.set_cpu(&app, "n1", 1_000_000_000, 0, 10_000);
        assert_eq!(m.cpu(&app, 10_000), None, "one report is no rate");
        // 0.38 s of CPU in one second, 0.1 s throttled; another node at 0.2 cores.
        m.set_cpu(&app, "n1", 1_380_000_000, 100_000_000, 11_000);
        m.set_cpu(&app, "n2", 0, 0, 9_000);
        m.set_cpu(&app, "n2", 400_000_000, 0, 11_000);
        let v = m.cpu(&app, 11_500).unwrap();
        assert_eq!((v.used_millis, v.throttled_millis), (580, 100));
        // A node silent for 10 s no longer counts; one that restarted says nothing.
        m.set_cpu(&app, "n1", 5_000, 0, 12_000);
        assert_eq!(m.cpu(&app, 22_000), None);
    }
}
