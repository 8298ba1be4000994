//! Request outcomes per app revision, as gateways measure them and the control
//! plane compares them when it judges a canary. Counts merge by addition, so
//! each gateway sends what it saw since its last report and nothing is lost
//! or counted twice. And the one fix-up the control plane's and the nodes'
//! Prometheus text needs ([`classic_counter_names`]).

use crate::spec::AppKey;
use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the latency buckets; the last bucket takes the rest.
/// Roughly logarithmic: fine where web latencies live, coarse past a second.
pub const LATENCY_BOUNDS_MS: [u64; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000,
];

/// A latency histogram with the fixed buckets of [`LATENCY_BOUNDS_MS`] plus one overflow bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Histogram {
    /// `counts[i]` requests took at most `LATENCY_BOUNDS_MS[i]` (and more than the bound
    /// before it); the last entry counts the slower ones. Empty means no samples.
    #[serde(default)]
    pub counts: Vec<u64>,
    /// The samples' sum, in microseconds: what a Prometheus histogram's `_sum` needs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sum_us: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Histogram {
    pub fn record(&mut self, millis: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        }
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| millis <= *b as f64)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.counts[i] += 1;
        self.sum_us = self.sum_us.saturating_add((millis * 1_000.0) as u64);
    }

    /// Adds `other`'s counts, saturating; buckets past the known bounds (from a node that
    /// sent more than there are) are dropped, so a report cannot grow a histogram.
    pub fn merge(&mut self, other: &Histogram) {
        let buckets = LATENCY_BOUNDS_MS.len() + 1;
        let wanted = other.counts.len().min(buckets);
        if self.counts.len() < wanted {
            self.counts.resize(wanted, 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// What was recorded after `base` was taken from the same histogram.
    pub fn since(&self, base: &Histogram) -> Histogram {
        Histogram {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(base.counts.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_us: self.sum_us.saturating_sub(base.sum_us),
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0, |sum, c| sum.saturating_add(*c))
    }

    /// The upper bound (ms) of the bucket holding the `q` quantile; `None` without
    /// samples. Overflow samples report twice the largest bound.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_MS
                        .get(i)
                        .copied()
                        .unwrap_or(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1] * 2),
                );
            }
        }
        None
    }
}

/// The revision requests count under that a gateway answered itself, with no replica to send
/// them to (none ready, too many waiting for one to start): revisions count from 1.
pub const NO_REVISION: u64 = 0;

/// What one gateway saw of one revision of an app since its last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevisionStats {
    pub app: AppKey,
    /// The revision that answered, or [`NO_REVISION`].
    pub revision: u64,
    pub requests: u64,
    /// Responses with a 5xx status, including the gateway's own (unreachable, timed out).
    pub errors: u64,
    /// Time to the response head.
    pub latency: Histogram,
    /// Requests in flight integrated over the report's interval, in
    /// request-milliseconds: 1,000 over a one-second report is an average of
    /// one request in flight. What autoscaling reads.
    #[serde(default)]
    pub busy_ms: u64,
}

impl RevisionStats {
    pub fn new(app: AppKey, revision: u64) -> Self {
        RevisionStats {
            app,
            revision,
            requests: 0,
            errors: 0,
            latency: Histogram::default(),
            busy_ms: 0,
        }
    }

    /// Adds `other`'s counts, saturating: totals come from nodes, and no report may make
    /// them overflow (a panic there would poison the control plane's measurements).
    pub fn merge(&mut self, other: &RevisionStats) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
        self.busy_ms = self.busy_ms.saturating_add(other.busy_ms);
    }

    /// What was counted after `base` was taken from the same running totals.
    pub fn since(&self, base: &RevisionStats) -> RevisionStats {
        RevisionStats {
            app: self.app.clone(),
            revision: self.revision,
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            latency: self.latency.since(&base.latency),
            busy_ms: self.busy_ms.saturating_sub(base.busy_ms),
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// prometheus-client writes OpenMetrics, whose counter families are named without the
/// `_total` their samples carry; Prometheus' classic text format, which every scraper and
/// `promtool check metrics` read, names them with it. The two comment lines are renamed.
pub fn classic_counter_names(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 32 * counters.len());
    for line in openmetrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let name = counters
                .iter()
                .find(|c| rest.strip_prefix(**c).is_some_and(|r| r.starts_with(' ')))?;
            Some(format!("{tag}{name}_total{}", &rest[name.len()..]))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_take_their_samples_names_and_nothing_else_changes() {
        let om = "# HELP a_requests Requests\n# TYPE a_requests counter\na_requests_total 3\n# HELP a_requests_per Other\n# TYPE a_requests_per gauge\na_requests_per 1\n# EOF\n";
        assert_eq!(
            classic_counter_names(om),
            "# HELP a_requests_total Requests\n# TYPE a_requests_total counter\na_requests_total 3\n# HELP a_requests_per Other\n# TYPE a_requests_per gauge\na_requests_per 1\n# EOF\n"
        );
    }

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.99), None);
        for _ in 0..99 {
            h.record(0.4);
        }
        h.record(120.0);
        assert_eq!(h.quantile(0.5), Some(1));
        assert_eq!(h.quantile(0.99), Some(1));
        assert_eq!(h.quantile(1.0), Some(150));
        h.record(60_000.0);
        assert_eq!(h.quantile(1.0), Some(10_000));
    }

    #[test]
    fn merging_saturates_and_keeps_to_the_known_buckets() {
        let app = AppKey::new("default", "a");
        let mut a = RevisionStats::new(app.clone(), 1);
        a.requests = u64::MAX - 1;
        a.latency.record(3.0);
        let mut b = RevisionStats::new(app, 1);
        b.requests = 5;
        b.busy_ms = u64::MAX;
        b.latency.counts = vec![u64::MAX; 1 << 20];
        a.merge(&b);
        a.merge(&b);
        assert_eq!((a.requests, a.busy_ms), (u64::MAX, u64::MAX));
        assert_eq!(a.latency.counts.len(), LATENCY_BOUNDS_MS.len() + 1);
        assert_eq!(a.latency.total(), u64::MAX);
    }

    #[test]
    fn merging_adds_counts() {
        let app = AppKey::new("default", "a");
        let mut a = RevisionStats::new(app.clone(), 1);
        a.requests = 10;
        a.errors = 1;
        a.latency.record(3.0);
        let mut b = RevisionStats::new(app, 1);
        b.requests = 30;
        b.errors = 3;
        b.latency.record(3.0);
        b.latency.record(800.0);
        let before = a.clone();
        a.merge(&b);
        assert_eq!((a.requests, a.errors), (40, 4));
        assert_eq!(
            a.since(&before),
            RevisionStats {
                revision: 1,
                ..b.clone()
            }
        );
        assert_eq!(a.latency.total(), 3);
        assert!((a.error_rate() - 0.1).abs() < 1e-9);
    }
}
