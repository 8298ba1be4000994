//! Request outcomes per app revision, counted by the gateway that routed each request so
//! a forwarded one is counted once. Atomic counters shared by an app revision's endpoints:
//! recording takes no lock, and reporting ([`Registry::take`]) swaps them back to zero.
//! Besides outcomes, requests in flight integrated over time (what autoscaling reads):
//! a small lock per revision, taken when a request starts and when it ends.

use http::StatusCode;
use shoal_core::metrics::{Histogram, LATENCY_BOUNDS_MS, RevisionStats};
use shoal_core::spec::AppKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// What one app revision's endpoints saw since the last report.
#[derive(Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Buckets as [`Histogram::counts`].
    latency: [AtomicU64; BUCKETS],
    /// As [`Histogram::sum_us`].
    latency_sum_us: AtomicU64,
    busy: Mutex<Busy>,
}

/// Requests in flight, and their integral over time since the last report.
#[derive(Default)]
struct Busy {
    in_flight: u64,
    since: Option<Instant>,
    integral: Duration,
}

impl Busy {
    /// Adds the time since the last change at the current count.
    fn settle(&mut self, now: Instant) {
        if let Some(since) = self.since {
            let n = u32::try_from(self.in_flight).unwrap_or(u32::MAX);
            self.integral += now.saturating_duration_since(since) * n;
        }
        self.since = Some(now);
    }
}

/// Counts one request in flight until dropped.
pub(crate) struct BusyGuard(Arc<Counters>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().expect("busy lock");
        busy.settle(Instant::now());
        busy.in_flight -= 1;
    }
}

impl Counters {
    /// Counts a request in flight from now until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> BusyGuard {
        let mut busy = self.busy.lock().expect("busy lock");
        busy.settle(Instant::now());
        busy.in_flight += 1;
        drop(busy);
        BusyGuard(self.clone())
    }

    /// One request's final response: its status and the time to its head.
    pub(crate) fn record(&self, status: StatusCode, elapsed: Duration) {
        let bucket = bucket(elapsed.as_secs_f64() * 1_000.0);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        if status.is_server_error() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything counted so far, leaving zeros; `None` if nothing was. A request recorded
    /// meanwhile may split between this report and the next, but is never lost or doubled.
    fn take(&self, app: &AppKey, revision: u64) -> Option<RevisionStats> {
        let (busy_ms, in_flight) = {
            let mut busy = self.busy.lock().expect("busy lock");
            busy.settle(Instant::now());
            let ms = std::mem::take(&mut busy.integral).as_millis() as u64;
            (ms, busy.in_flight)
        };
        // A revision that finished nothing and runs nothing now has nothing to say
        // (its time in flight was a try that moved on to another endpoint).
        if self.requests.load(Ordering::Relaxed) == 0 && in_flight == 0 {
            return None;
        }
        let mut stats = RevisionStats::new(app.clone(), revision);
        stats.busy_ms = busy_ms;
        stats.requests = self.requests.swap(0, Ordering::Relaxed);
        stats.errors = self.errors.swap(0, Ordering::Relaxed);
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let sum_us = self.latency_sum_us.swap(0, Ordering::Relaxed);
        if counts.iter().any(|&c| c > 0) {
            stats.latency = Histogram { counts, sum_us };
        }
        Some(stats)
    }
}

/// The bucket [`Histogram::record`] puts `millis` in.
fn bucket(millis: f64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|b| millis <= *b as f64)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// Every app revision's counters. An entry outlives its endpoints until the next report,
/// so what a removed replica served is still reported.
#[derive(Default)]
pub(crate) struct Registry(Mutex<HashMap<(AppKey, u64), Arc<Counters>>>);

impl Registry {
    /// The counters an endpoint of `app` at `revision` records into.
    pub(crate) fn counters(&self, app: &AppKey, revision: u64) -> Arc<Counters> {
        let mut map = self.0.lock().expect("metrics lock");
        map.entry((app.clone(), revision)).or_default().clone()
    }

    /// What was recorded since the last call, per app revision that served any request.
    pub(crate) fn take(&self) -> Vec<RevisionStats> {
        let mut map = self.0.lock().expect("metrics lock");
        let mut out = Vec::new();
        map.retain(|(app, revision), counters| {
            // Unique: no endpoint holds these any more, and new holders clone them only
            // under this lock, so after this report nothing can be recorded into them.
            let retired = Arc::get_mut(counters).is_some();
            out.extend(counters.take(app, *revision));
            !retired
        });
        out.sort_by(|a, b| (&a.app, a.revision).cmp(&(&b.app, b.revision)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_shared_histogram() {
        for millis in [0.0, 0.4, 1.0, 1.01, 7.5, 99.9, 999.0, 4_999.0, 5_000.1, 1e9] {
            let mut h = Histogram::default();
            h.record(millis);
            assert_eq!(h.counts[bucket(millis)], 1, "{millis} ms");
        }
    }

    #[test]
    fn a_report_takes_what_was_recorded_and_retires_unused_counters() {
        let registry = Registry::default();
        let app = AppKey::new("default", "a");
        let counters = registry.counters(&app, 3);
        assert!(Arc::ptr_eq(&counters, &registry.counters(&app, 3)));
        counters.record(StatusCode::OK, Duration::from_micros(500));
        counters.record(StatusCode::BAD_GATEWAY, Duration::from_millis(40));
        counters.record(StatusCode::NOT_FOUND, Duration::from_secs(60));
        registry.counters(&app, 4);

        let stats = registry.take();
        assert_eq!(stats.len(), 1, "{stats:?}");
        assert_eq!(
            (stats[0].revision, stats[0].requests, stats[0].errors),
            (3, 3, 1)
        );
        assert_eq!(stats[0].latency.total(), 3);
        assert_eq!(stats[0].latency.quantile(0.3), Some(1));
        assert!(registry.take().is_empty());

        // Counts of an endpoint that is gone are reported once, then forgotten.
        counters.record(StatusCode::OK, Duration::ZERO);
        drop(counters);
        assert_eq!(registry.take()[0].requests, 1);
        assert!(registry.0.lock().unwrap().is_empty());
    }

    #[test]
    fn time_in_flight_adds_up_per_request() {
        let t0 = Instant::now();
        let mut busy = Busy::default();
        busy.settle(t0);
        busy.in_flight = 2;
        busy.settle(t0 + Duration::from_millis(500));
        busy.in_flight = 1;
        busy.settle(t0 + Duration::from_millis(800));
        // Two for half a second, then one for 300 ms.
        assert_eq!(busy.integral, Duration::from_millis(1_300));
    }
}
