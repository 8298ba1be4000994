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
//!
//! Every time here is by the control plane's clock that never steps (`Clock::steady_ms`): a
//! step of the wall clock would otherwise age every sample at once, and the autoscaler would
//! take an hour forward for an hour without load. The controller gets them [`in_wall_time`].
//!
//! For `shoal top`, the last minute in 5 s buckets: per app, requests, 5xx and
//! latency; per node, the requests its gateway routed; and what each node's
//! last heartbeat said of its guests' memory.

use shoal_api::{CpuView, NodeUsage};
use shoal_core::Millis;
use shoal_core::metrics::{Histogram, RevisionStats};
use shoal_core::spec::AppKey;
use shoal_scheduler::autoscale::LoadSample;
use shoal_scheduler::plan::{Baseline, Measurements};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

/// `measured` (by the clock that never steps, which reads `steady` now) with its load's times
/// moved to the wall clock, which reads `now`, as the controller's pure decisions judge them:
/// each as many whole seconds before `now`'s second as it was before `steady`'s, so a window
/// of whole seconds holds the same samples by either clock.
pub(crate) fn in_wall_time(
    mut measured: BTreeMap<AppKey, Measurements>,
    now: Millis,
    steady: Millis,
) -> BTreeMap<AppKey, Measurements> {
    let second = |t: Millis| (t - t % 1_000) as i64;
    let shift = second(now) - second(steady);
    let to_wall = |at: Millis| at.saturating_add_signed(shift);
    // The last request, to the millisecond: how long the app has been idle.
    let exact = now as i64 - steady as i64;
    for m in measured.values_mut() {
        let load = &mut m.load;
        load.since = to_wall(load.since);
        load.last_request = (load.last_request).map(|at| at.saturating_add_signed(exact));
        for s in &mut load.samples {
            s.at = to_wall(s.at);
        }
    }
    measured
}

/// Load samples older than this are dropped: the longest stable window.
const LOAD_HISTORY_MS: Millis = 3_600_000;
/// What one gateway report covers.
const REPORT_MS: f64 = 1_000.0;
/// How far back `shoal top`'s rates look.
const RECENT_MS: Millis = 60_000;
/// The buckets they are kept in: a minute of them is a few kilobytes per app.
const BUCKET_MS: Millis = 5_000;
/// A CPU report or heartbeat older than this says nothing about now.
const FRESH_MS: Millis = 10_000;

/// What gateways reported in the last minute or so, in [`BUCKET_MS`] buckets, oldest first.
#[derive(Debug, Clone, Default)]
struct Recent(VecDeque<Bucket>);

#[derive(Debug, Clone, Default)]
struct Bucket {
    at: Millis,
    requests: u64,
    errors: u64,
    latency: Histogram,
}

/// Rates over the last minute, from [`Recent`].
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rates {
    pub(crate) requests_per_second: f64,
    pub(crate) errors_per_second: f64,
    /// Every request's time to its response head.
    pub(crate) latency: Histogram,
}

impl Recent {
    /// Adds what a report that arrived at `now` counted.
    fn add(&mut self, now: Millis, requests: u64, errors: u64, latency: &Histogram) {
        let at = now - now % BUCKET_MS;
        if self.0.back().is_none_or(|b| b.at != at) {
            self.0.push_back(Bucket {
                at,
                ..Bucket::default()
            });
        }
        let bucket = self.0.back_mut().expect("just pushed");
        bucket.requests = bucket.requests.saturating_add(requests);
        bucket.errors = bucket.errors.saturating_add(errors);
        bucket.latency.merge(latency);
        while self
            .0
            .front()
            .is_some_and(|b| b.at + RECENT_MS + BUCKET_MS <= now)
        {
            self.0.pop_front();
        }
    }

    /// The rates over the buckets that begin in the last minute, or began with the bucket it
    /// starts in, as measured since `since`: so over 60 to 65 s, all of it counted.
    fn rates(&self, now: Millis, since: Millis) -> Rates {
        let from = now.saturating_sub(RECENT_MS);
        let from = from - from % BUCKET_MS;
        let mut rates = Rates::default();
        let (mut requests, mut errors) = (0u64, 0u64);
        for b in self.0.iter().filter(|b| b.at >= from) {
            requests = requests.saturating_add(b.requests);
            errors = errors.saturating_add(b.errors);
            rates.latency.merge(&b.latency);
        }
        let covered = (now.saturating_sub(from.max(since)) as f64 / 1_000.0).max(1.0);
        rates.requests_per_second = requests as f64 / covered;
        rates.errors_per_second = errors as f64 / covered;
        rates
    }
}

/// What is known of one node lately.
#[derive(Debug, Default)]
struct NodeSeen {
    /// The requests its gateway routed (no errors or latency: those are the apps').
    routed: Recent,
    /// Its last heartbeat's word on its guests' memory, and when it came.
    usage: Option<(NodeUsage, Millis)>,
}

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
    /// Per app, the last minute's requests, 5xx and latency.
    recent: Mutex<BTreeMap<AppKey, Recent>>,
    /// Per node, what it routed lately and said of its memory.
    nodes: Mutex<BTreeMap<String, NodeSeen>>,
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
            recent: Mutex::default(),
            nodes: Mutex::default(),
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

    /// Adds what `node`'s gateway counted since its last report, which arrived at `now`.
    pub(crate) fn record(&self, node: &str, stats: Vec<RevisionStats>, now: Millis) {
        {
            let mut recent = lock(&self.recent);
            for s in &stats {
                let app = recent.entry(s.app.clone()).or_default();
                app.add(now, s.requests, s.errors, &s.latency);
            }
            let routed = stats.iter().map(|s| s.requests).sum();
            lock(&self.nodes)
                .entry(node.to_string())
                .or_default()
                .routed
                .add(now, routed, 0, &Histogram::default());
        }
        let mut apps = self.lock();
        let second = now - now % 1_000;
        self.touch(stats.iter().map(|s| s.app.clone()));
        for s in stats {
            let m = self.entry(&mut apps, &s.app);
            m.totals
                .entry(s.revision)
                .or_insert_with(|| RevisionStats::new(s.app.clone(), s.revision))
                .merge(&s);
            // Answered with no replica to take them: counted, but not load the autoscaler
            // sizes the app by (requests held for a replica reach it as `waiting`).
            if s.revision == shoal_core::metrics::NO_REVISION {
                continue;
            }
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

    /// The apps `node`'s gateway last said it holds requests for.
    pub(crate) fn held_by(&self, node: &str) -> Vec<AppKey> {
        let all = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(app, _)| app.clone())
            .collect()
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
        let cpu = lock(&self.cpu);
        let mut view: Option<CpuView> = None;
        for samples in cpu.get(app)?.values() {
            add_rate(&mut view, samples, now);
        }
        view
    }

    /// Each node's guest CPU, as [`Metrics::cpu`] but summed over the apps on the node.
    pub(crate) fn cpu_by_node(&self, now: Millis) -> BTreeMap<String, CpuView> {
        let cpu = lock(&self.cpu);
        let mut by_node: BTreeMap<String, Option<CpuView>> = BTreeMap::new();
        for nodes in cpu.values() {
            for (node, samples) in nodes {
                add_rate(by_node.entry(node.clone()).or_default(), samples, now);
            }
        }
        by_node
            .into_iter()
            .filter_map(|(node, view)| Some((node, view?)))
            .collect()
    }

    /// A node's heartbeat said this of its guests' memory at `now`.
    pub(crate) fn set_usage(&self, node: &str, usage: NodeUsage, now: Millis) {
        lock(&self.nodes).entry(node.to_string()).or_default().usage = Some((usage, now));
    }

    /// What `node` said of its memory in the last 10 s, and the requests its gateway routed
    /// per second over the last minute.
    pub(crate) fn node(&self, node: &str, now: Millis) -> (Option<NodeUsage>, f64) {
        let nodes = lock(&self.nodes);
        let Some(seen) = nodes.get(node) else {
            return (None, 0.0);
        };
        let usage = seen
            .usage
            .filter(|(_, at)| now.saturating_sub(*at) <= FRESH_MS)
            .map(|(u, _)| u);
        let routed = seen.routed.rates(now, self.since).requests_per_second;
        (usage, routed)
    }

    /// `app`'s rates over the last minute.
    pub(crate) fn rates(&self, app: &AppKey, now: Millis) -> Rates {
        lock(&self.recent)
            .get(app)
            .map(|r| r.rates(now, self.since))
            .unwrap_or_default()
    }

    /// `app`'s average concurrency over the last `window_ms` (or as much of it as has been
    /// measured), as the autoscaler judges it, for `get apps`; `None` before any report.
    pub(crate) fn concurrency(&self, app: &AppKey, window_ms: u64, now: Millis) -> Option<f64> {
        let apps = self.lock();
        let load = &apps.get(app)?.load;
        Some(shoal_scheduler::autoscale::concurrency(
            load, window_ms, now,
        ))
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

    /// Forgets what nodes that are gone or not ready held (nobody waits there any more)
    /// and what they said of themselves.
    pub(crate) fn retain_nodes(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.nodes).retain(|node, _| keep(node));
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
        lock(&self.recent).retain(|app, _| keep(app));
    }

    /// Keeps the totals of the revisions `keep` says are still there: every apply and
    /// `rollout restart` makes one, and their histograms went on being kept, copied into each
    /// pass and exported as metric series long after their revision was pruned.
    pub(crate) fn retain_revisions(&self, keep: impl Fn(&AppKey, u64) -> bool) {
        for (app, m) in self.lock().iter_mut() {
            m.totals.retain(|revision, _| keep(app, *revision));
            if let Some(baseline) = &mut m.baseline {
                baseline.totals.retain(|revision, _| keep(app, *revision));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds to `view` the CPU rate between a node's last two reports of one app, if both are
/// there, the later within the last 10 s, and the node did not restart between them.
fn add_rate(view: &mut Option<CpuView>, samples: &LastTwo, now: Millis) {
    let [Some(a), Some(b)] = samples else {
        return;
    };
    // A node that restarted starts its totals again: that interval says nothing.
    if b.at <= a.at || now.saturating_sub(b.at) > FRESH_MS || b.used_ns < a.used_ns {
        return;
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
        m.record("n1", vec![stats(1, 10), stats(2, 1)], 1_000);
        // No baseline for the step yet: nothing to say, however often asked.
        assert_eq!(m.since_step(&app, 2, 100), None);
        assert_eq!(m.since_step(&app, 2, 100), None);
        let totals = m.snapshot()[&app].totals.clone();
        m.set_baseline(app.clone(), Baseline { step: 100, totals });
        m.record("n1", vec![stats(1, 20), stats(2, 2)], 2_000);
        assert_eq!(m.since_step(&app, 2, 100).unwrap().requests, 2);
        assert_eq!(m.since_step(&app, 1, 100).unwrap().requests, 20);
        // A revision first seen during the step counts whole.
        m.record("n1", vec![stats(3, 5)], 3_000);
        assert_eq!(m.since_step(&app, 3, 100).unwrap().requests, 5);
        // Another step's question finds no baseline.
        assert_eq!(m.since_step(&app, 2, 200), None);
        // Revisions pruned from the store go from the totals and the baseline.
        m.retain_revisions(|_, revision| revision != 1);
        let left = &m.snapshot()[&app];
        assert_eq!(left.totals.keys().collect::<Vec<_>>(), [&2, &3]);
        let baseline = left.baseline.as_ref().unwrap();
        assert_eq!(baseline.totals.keys().collect::<Vec<_>>(), [&2]);
        m.retain_apps(|a| a.name != "a");
        assert!(m.snapshot().is_empty());
    }

    /// What gateways answered with no replica to send it to (revision 0) is in the app's
    /// totals and its rates, so it shows as errors, and stays there while the app does;
    /// it is not load, which would size or wake the app.
    #[test]
    fn requests_no_replica_took_count_as_errors_but_not_as_load() {
        use shoal_core::metrics::NO_REVISION;
        let m = Metrics::new(0);
        let app = AppKey::new("default", "a");
        let mut unserved = RevisionStats::new(app.clone(), NO_REVISION);
        unserved.requests = 30;
        unserved.errors = 30;
        m.record("n1", vec![unserved], 10_100);
        let seen = &m.snapshot()[&app];
        assert_eq!(seen.totals[&NO_REVISION].errors, 30);
        assert!(seen.load.samples.is_empty() && seen.load.last_request.is_none());
        assert_eq!(m.rates(&app, 11_000).errors_per_second, 30.0 / 11.0);
        m.retain_revisions(|_, n| n == NO_REVISION);
        assert_eq!(m.snapshot()[&app].totals[&NO_REVISION].requests, 30);
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
        m.retain_nodes(|n| n != "n1");
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
        m.record("n1", vec![stats(1, 10, 500), stats(2, 2, 500)], 10_100);
        m.record("n1", vec![stats(1, 4, 2_000)], 10_900);
        m.record("n1", vec![stats(1, 1, 0)], 11_200);
        let load = m.snapshot()[&app].load.clone();
        assert_eq!(load.samples.len(), 2, "{load:?}");
        assert_eq!((load.samples[0].at, load.samples[0].requests), (10_000, 16));
        assert!((load.samples[0].concurrency - 3.0).abs() < 1e-9);
        assert_eq!(load.last_request, Some(11_200));
        // Averaged over the whole seconds measured: 3 in flight in one of eleven (the
        // twelfth, still going, does not count).
        let c = m.concurrency(&app, 60_000, 11_500).unwrap();
        assert!((c - 3.0 / 11.0).abs() < 1e-9, "{c}");
        // An hour later the samples are gone.
        m.record("n1", vec![stats(1, 1, 0)], 3_700_000);
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
        // Per node, every app's: another app on n2 at 0.05 cores.
        let other = AppKey::new("default", "b");
        m.set_cpu(&other, "n2", 0, 0, 10_000);
        m.set_cpu(&other, "n2", 50_000_000, 0, 11_000);
        let by_node: Vec<(String, u64)> = m
            .cpu_by_node(11_500)
            .into_iter()
            .map(|(n, v)| (n, v.used_millis))
            .collect();
        assert_eq!(by_node, [("n1".to_string(), 380), ("n2".to_string(), 250)]);
        // A node silent for 10 s no longer counts; one that restarted says nothing.
        m.set_cpu(&app, "n1", 5_000, 0, 12_000);
        assert_eq!(m.cpu(&app, 22_000), None);
        assert!(m.cpu_by_node(22_000).is_empty());
    }

    /// A step of the wall clock changes nothing the autoscaler sees: the load measured by
    /// the clock that never steps, moved to the wall clock, averages the same over any window,
    /// and the last request is as long ago. (Judged by the wall clock as it was measured, an
    /// hour forward would be an hour without load.)
    #[test]
    fn load_judged_by_the_wall_clock_is_the_same_after_it_steps() {
        // Steady time as a process that started a day after the epoch reads it.
        const BASE: Millis = 86_400_000;
        let m = Metrics::new(BASE + 500);
        let app = AppKey::new("default", "a");
        for t in 1..=30u64 {
            let mut s = RevisionStats::new(app.clone(), 1);
            s.requests = t;
            s.busy_ms = 100 * t;
            m.record("n1", vec![s], BASE + t * 1_000 + 250);
        }
        let steady = BASE + 30_700;
        let seen = |now| {
            let load = in_wall_time(m.snapshot(), now, steady)[&app].load.clone();
            let over = [5_000, 10_000, 60_000]
                .map(|window| shoal_scheduler::autoscale::concurrency(&load, window, now));
            (over, now.saturating_sub(load.last_request.unwrap()))
        };
        let unstepped = seen(steady);
        assert_eq!(unstepped.1, 450);
        assert!(unstepped.0[0] > 2.0, "{unstepped:?}");
        // An hour forward, most of a day back, and a second's phase apart.
        for now in [steady + 3_600_000, steady - 80_000_000 + 523] {
            let (over, idle) = seen(now);
            assert_eq!((over, idle), unstepped, "{now}");
        }
    }

    #[test]
    fn top_rates_are_the_last_minute_of_every_gateway() {
        // Measuring since 1 s: the first rates cover only what was measured.
        let m = Metrics::new(1_000);
        let app = AppKey::new("default", "a");
        let stats = |requests, errors, millis: &[f64]| {
            let mut s = RevisionStats::new(app.clone(), 1);
            s.requests = requests;
            s.errors = errors;
            for ms in millis {
                s.latency.record(*ms);
            }
            s
        };
        m.record("n1", vec![stats(10, 1, &[2.0; 10])], 2_000);
        m.record("n2", vec![stats(10, 1, &[40.0; 10])], 6_000);
        // 20 requests, 2 of them 5xx, over the 10 s measured.
        let r = m.rates(&app, 11_000);
        assert_eq!((r.requests_per_second, r.errors_per_second), (2.0, 0.2));
        assert_eq!(r.latency.quantile(0.99), Some(50));
        assert_eq!(m.node("n1", 11_000).1, 1.0);
        assert_eq!(
            m.rates(&AppKey::new("default", "b"), 11_000),
            Rates::default()
        );

        // A minute on, the first report has left the window; the one at 6 s is in the bucket
        // the window starts in, so the window is that bucket's start to now: 64 s.
        m.record("n1", vec![stats(13, 0, &[1.0; 13])], 69_000);
        let r = m.rates(&app, 69_000);
        assert!((r.requests_per_second - 23.0 / 64.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.latency.total(), 23);
        assert_eq!(m.node("n2", 69_000).1, 10.0 / 64.0);
        let r = m.rates(&app, 80_000);
        assert!((r.requests_per_second - 13.0 / 60.0).abs() < 1e-9, "{r:?}");

        // Memory as the last heartbeat said, while it is fresh.
        let usage = NodeUsage {
            memory_reserved_bytes: 1 << 20,
            memory_budget_bytes: 1 << 30,
            instances: Some(3),
        };
        m.set_usage("n1", usage, 70_000);
        assert_eq!(m.node("n1", 80_000).0, Some(usage));
        assert_eq!(m.node("n1", 80_001).0, None);
        m.retain_nodes(|n| n != "n1");
        assert_eq!(m.node("n1", 70_000), (None, 0.0));
    }
}
