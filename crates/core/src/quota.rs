//! Namespace quotas (`shoal quota`), as Kubernetes' ResourceQuota: caps on what a namespace's
//! apps may ask for together — apps, replicas, CPU and memory requests.
//!
//! Counted at admission (apply, scale, `rollout undo`), on each app's most replicas
//! ([`AppSpec::most_replicas`]: the autoscaler's max, the most a schedule window allows, or
//! its replicas), so neither the autoscaler nor a schedule ever runs a namespace past its
//! quota, and nothing running is stopped when a quota is lowered: only a change that would
//! grow past it is refused, and the controller grows an app then only into the room the
//! namespace's other apps leave (`shoal_scheduler::autoscale::decide_within`). Not counted: a rollout's surge and canary replicas, and the
//! template a rollout that is aborted or rolled back by itself returns to (it was admitted
//! once). A job whose runs may pile up (`concurrency = "allow"`) has no most, so it is
//! refused where a quota caps replicas, CPU or memory; so is an app that requests no CPU where
//! CPU is capped (no memory where memory is), as Kubernetes refuses pods without requests
//! under a quota. A job without a schedule counts one replica more: a run started by hand
//! beside its own. Pure: the control plane brings the apps.

use serde::{Deserialize, Serialize};

use crate::quantity::format_memory;
use crate::spec::{AppSpec, Concurrency, Kind};

/// What an admin sets for a namespace; a cap left out is no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    /// Millicores of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Bytes of memory requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// What apps ask for, counted as a quota counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub apps: u64,
    pub replicas: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// A job whose runs may pile up without bound (`concurrency = "allow"`): its replicas are
    /// one run's.
    #[serde(skip)]
    pub unbounded: bool,
    /// Replicas that request no CPU, or no memory: what a cap on it would not see.
    #[serde(skip)]
    pub no_cpu: bool,
    #[serde(skip)]
    pub no_memory: bool,
}

impl Usage {
    /// One app's: its most replicas times its requests. A job without a schedule may run
    /// one run by hand beside its own replicas.
    pub fn of(spec: &AppSpec) -> Usage {
        let job = spec.component.kind == Kind::Job;
        let by_hand = u64::from(job && spec.runs.schedule.is_none());
        let replicas = u64::from(spec.most_replicas()) + by_hand;
        let requests = &spec.resources.requests;
        Usage {
            apps: 1,
            replicas,
            cpu_millis: replicas * u64::from(requests.cpu_millis),
            memory_bytes: replicas.saturating_mul(requests.memory_bytes),
            unbounded: job && spec.runs.concurrency == Concurrency::Allow,
            no_cpu: replicas > 0 && requests.cpu_millis == 0,
            no_memory: replicas > 0 && requests.memory_bytes == 0,
        }
    }

    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            apps: self.apps + other.apps,
            replicas: self.replicas + other.replicas,
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            unbounded: self.unbounded || other.unbounded,
            no_cpu: self.no_cpu || other.no_cpu,
            no_memory: self.no_memory || other.no_memory,
        }
    }

    /// Whether `self` asks for more than `before` on any cap: only then can it take a quota
    /// past one, and only then is it refused or guarded.
    pub fn grows_from(&self, before: &Usage) -> bool {
        self.apps > before.apps
            || self.replicas > before.replicas
            || self.cpu_millis > before.cpu_millis
            || self.memory_bytes > before.memory_bytes
            || (self.unbounded && !before.unbounded)
            || (self.no_cpu && !before.no_cpu)
            || (self.no_memory && !before.no_memory)
    }
}

/// The caps `used` is past, each as `what: used of cap` (`replicas: 4 of 1`): what a cap
/// lowered below what runs says, so an admin knows nothing there may grow until it is under.
pub fn past(limits: &QuotaLimits, used: &Usage) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, cap: Option<u64>, used: u64, show: fn(u64) -> String| {
        if let Some(cap) = cap.filter(|&cap| used > cap) {
            out.push(format!("{what}: {} of {}", show(used), show(cap)));
        }
    };
    check("apps", limits.apps, used.apps, |n| n.to_string());
    check("replicas", limits.replicas, used.replicas, |n| {
        n.to_string()
    });
    check("cpu", limits.cpu_millis, used.cpu_millis, |m| {
        format!("{m}m")
    });
    check(
        "memory",
        limits.memory_bytes,
        used.memory_bytes,
        format_memory,
    );
    out
}

/// Why an app whose footprint goes from `before` (zero for a new app) to `after` does not fit
/// a namespace quota of `limits` whose other apps use `others`; `None` if it fits. A cap it
/// would pass refuses it only if the app grows on it: a quota lowered below what runs does
/// not block a change that asks for no more.
pub fn refusal(limits: &QuotaLimits, others: Usage, before: Usage, after: Usage) -> Option<String> {
    let capped =
        limits.replicas.is_some() || limits.cpu_millis.is_some() || limits.memory_bytes.is_some();
    if capped && after.unbounded && !before.unbounded {
        return Some(
            "a job with concurrency = \"allow\" may start runs beside those still running, \
             without end; under a quota of replicas, CPU or memory it needs concurrency = \
             \"forbid\" or \"replace\""
                .into(),
        );
    }
    // Newly without a request, or more replicas without one.
    let unrequested = |after_none: bool, before_none: bool| {
        after_none && (!before_none || after.replicas > before.replicas)
    };
    if limits.cpu_millis.is_some() && unrequested(after.no_cpu, before.no_cpu) {
        return Some(
            "it caps CPU requests, and this app requests no CPU (resources.requests.cpu)".into(),
        );
    }
    if limits.memory_bytes.is_some() && unrequested(after.no_memory, before.no_memory) {
        return Some(
            "it caps memory requests, and this app requests no memory (resources.requests.memory)"
                .into(),
        );
    }
    let total = others.plus(after);
    let over = |limit: Option<u64>, total: u64, before: u64, after: u64| {
        limit.filter(|&l| total > l && after > before)
    };
    if let Some(limit) = over(limits.apps, total.apps, before.apps, after.apps) {
        return Some(format!(
            "it allows {limit} apps, and {} are there already",
            others.apps
        ));
    }
    if let Some(limit) = over(
        limits.replicas,
        total.replicas,
        before.replicas,
        after.replicas,
    ) {
        return Some(format!(
            "it allows {limit} replicas; the other apps may run {} and this one {}",
            others.replicas, after.replicas
        ));
    }
    if let Some(limit) = over(
        limits.cpu_millis,
        total.cpu_millis,
        before.cpu_millis,
        after.cpu_millis,
    ) {
        return Some(format!(
            "it allows {limit}m of CPU requests; the other apps ask for {}m and this one {}m ({} replicas at most)",
            others.cpu_millis, after.cpu_millis, after.replicas
        ));
    }
    if let Some(limit) = over(
        limits.memory_bytes,
        total.memory_bytes,
        before.memory_bytes,
        after.memory_bytes,
    ) {
        return Some(format!(
            "it allows {} of memory requests; the other apps ask for {} and this one {} ({} replicas at most)",
            format_memory(limit),
            format_memory(others.memory_bytes),
            format_memory(after.memory_bytes),
            after.replicas
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(apps: u64, replicas: u64, cpu_millis: u64, memory_bytes: u64) -> Usage {
        Usage {
            apps,
            replicas,
            cpu_millis,
            memory_bytes,
            unbounded: false,
            no_cpu: replicas > 0 && cpu_millis == 0,
            no_memory: replicas > 0 && memory_bytes == 0,
        }
    }

    #[test]
    fn the_caps_a_namespace_is_past_are_named_with_use_and_cap() {
        let limits = QuotaLimits {
            apps: Some(5),
            replicas: Some(1),
            cpu_millis: Some(300),
            memory_bytes: None,
        };
        let used = usage(2, 4, 400, 128 << 20);
        assert_eq!(
            past(&limits, &used),
            ["replicas: 4 of 1", "cpu: 400m of 300m"]
        );
        assert!(past(&limits, &usage(1, 1, 300, 0)).is_empty());
    }

    #[test]
    fn piling_jobs_and_apps_without_cpu_requests_are_refused_under_caps_they_would_escape() {
        let cpu = QuotaLimits {
            cpu_millis: Some(1000),
            ..QuotaLimits::default()
        };
        let none = Usage::default();
        let job = Usage {
            unbounded: true,
            ..usage(1, 1, 100, 0)
        };
        let why = refusal(&cpu, none, none, job).unwrap();
        assert!(why.contains("concurrency"), "{why}");
        // A quota of apps alone does not mind.
        let apps = QuotaLimits {
            apps: Some(5),
            ..QuotaLimits::default()
        };
        assert_eq!(refusal(&apps, none, none, job), None);
        // One that ran before the quota may still change.
        assert_eq!(refusal(&cpu, none, job, job), None);
        let why = refusal(&cpu, none, none, usage(1, 2, 0, 0)).unwrap();
        assert!(why.contains("requests no CPU"), "{why}");
        assert_eq!(
            refusal(&cpu, none, usage(1, 2, 0, 0), usage(1, 2, 0, 0)),
            None
        );
        assert!(usage(1, 2, 0, 0).grows_from(&usage(1, 1, 0, 0)));
        assert!(!usage(1, 1, 0, 0).grows_from(&usage(1, 2, 0, 0)));
        // Dropping the request of an app that had one is growth, and refused.
        assert!(usage(1, 2, 0, 0).grows_from(&usage(1, 2, 500, 0)));
        let why = refusal(&cpu, none, usage(1, 2, 500, 0), usage(1, 2, 0, 0)).unwrap();
        assert!(why.contains("requests no CPU"), "{why}");
        let memory = QuotaLimits {
            memory_bytes: Some(1 << 30),
            ..QuotaLimits::default()
        };
        let why = refusal(&memory, none, none, usage(1, 1, 100, 0)).unwrap();
        assert!(why.contains("requests no memory"), "{why}");
        assert!(job.grows_from(&usage(1, 1, 100, 0)));
    }

    #[test]
    fn a_change_that_grows_past_a_cap_is_refused_and_says_which() {
        let limits = QuotaLimits {
            apps: Some(3),
            replicas: Some(10),
            cpu_millis: Some(2000),
            memory_bytes: Some(1 << 30),
        };
        let others = usage(2, 6, 1500, 512 << 20);
        let none = Usage::default();
        // A new app that fits.
        assert_eq!(
            refusal(&limits, others, none, usage(1, 2, 400, 256 << 20)),
            None
        );
        // One too many apps.
        let why = refusal(&limits, usage(3, 3, 0, 0), none, usage(1, 1, 10, 1)).unwrap();
        assert!(why.contains("3 apps"), "{why}");
        // Replicas, CPU and memory each.
        let why = refusal(&limits, others, none, usage(1, 5, 10, 1)).unwrap();
        assert!(
            why.contains("10 replicas") && why.contains("may run 6"),
            "{why}"
        );
        let why = refusal(&limits, others, none, usage(1, 2, 600, 1)).unwrap();
        assert!(
            why.contains("2000m") && why.contains("this one 600m"),
            "{why}"
        );
        let why = refusal(&limits, others, none, usage(1, 2, 10, 600 << 20)).unwrap();
        assert!(
            why.contains("1Gi") && why.contains("this one 600Mi"),
            "{why}"
        );
    }

    #[test]
    fn under_a_quota_lowered_below_what_runs_only_growth_is_refused() {
        let limits = QuotaLimits {
            replicas: Some(4),
            ..QuotaLimits::default()
        };
        let others = usage(1, 4, 0, 0);
        let app = usage(1, 2, 0, 0);
        // Already past it: the same footprint (an env change, say), or less, goes through.
        assert_eq!(refusal(&limits, others, app, app), None);
        assert_eq!(refusal(&limits, others, app, usage(1, 1, 0, 0)), None);
        assert!(refusal(&limits, others, app, usage(1, 3, 0, 0)).is_some());
        // No cap, no refusal.
        assert_eq!(
            refusal(&QuotaLimits::default(), others, app, usage(1, 99, 99, 99)),
            None
        );
    }
}
