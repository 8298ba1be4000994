//! The node's own metrics in Prometheus' text format, as a kubelet serves its own: what this
//! node's replicas and runtime do, read at each scrape from counters kept as they work — the
//! runtime's [`InstanceStats`] (one per app revision here, shared by its replicas), its compile
//! cache, memory budget and CPU groups, the gateway's requests in flight, the agent's replicas
//! by phase. Names follow the control plane's `/v1/metrics` (`shoal_node_` first, units in
//! names, `_total` counters, `namespace`/`app`/`revision` labels).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use shoal_core::spec::AppKey;
use shoal_gateway::ConnectionStats;
use shoal_runtime::{CompileCache, CpuUsage, InstanceCounts, InstanceStats};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the counters of a revision no replica here runs any more are kept: longer than
/// any scrape interval, so a scrape sees their last values before they go.
const RETIRE: Duration = Duration::from_secs(600);

/// Each app revision's [`InstanceStats`] on this node.
#[derive(Default)]
pub(crate) struct Revisions(Mutex<HashMap<(AppKey, u64), Kept>>);

struct Kept {
    stats: Arc<InstanceStats>,
    /// Since when no replica holds them.
    unused_since: Option<Instant>,
}

impl Revisions {
    /// The counters `app`'s `revision` counts into here, shared by its replicas.
    pub(crate) fn stats(&self, app: &AppKey, revision: u64) -> Arc<InstanceStats> {
        let mut map = self.0.lock().expect("metrics lock");
        let kept = map.entry((app.clone(), revision)).or_insert_with(|| Kept {
            stats: Arc::default(),
            unused_since: None,
        });
        kept.unused_since = None;
        kept.stats.clone()
    }

    /// Every revision's counts now, in order.
    fn read(&self) -> Vec<(AppKey, u64, InstanceCounts)> {
        let map = self.0.lock().expect("metrics lock");
        let mut out: Vec<_> = map
            .iter()
            .map(|((app, revision), kept)| (app.clone(), *revision, kept.stats.read()))
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }

    /// Forgets the counters no replica has held for [`RETIRE`] by `now`.
    pub(crate) fn prune(&self, now: Instant) {
        let mut map = self.0.lock().expect("metrics lock");
        map.retain(|_, kept| {
            // Handed out only under this lock: alone now, it stays so until `stats`.
            if Arc::strong_count(&kept.stats) > 1 {
                kept.unused_since = None;
                return true;
            }
            let since = *kept.unused_since.get_or_insert(now);
            now.saturating_duration_since(since) < RETIRE
        });
    }
}

/// What one scrape reports, read before encoding.
#[derive(Debug)]
pub(crate) struct Scrape {
    pub(crate) revisions: Vec<(AppKey, u64, InstanceCounts)>,
    pub(crate) in_flight: Vec<(AppKey, u64, usize)>,
    /// CPU groups are named after their app, `namespace/name`.
    pub(crate) cpu: Vec<(Arc<str>, CpuUsage)>,
    pub(crate) compile_cache: CompileCache,
    pub(crate) memory_reserved: u64,
    pub(crate) memory_budget: u64,
    /// Replicas this node runs, by phase.
    pub(crate) phases: BTreeMap<String, u64>,
    /// When the node's certificate for other members expires.
    pub(crate) certificate_expires: Option<std::time::SystemTime>,
    /// The gateway's client connections: open now, refused so far.
    pub(crate) connections: ConnectionStats,
    /// Guests' key-value calls sent to the control plane, on a joined node.
    pub(crate) kv_sent: Option<shoal_api::KvSent>,
}

impl Scrape {
    pub(crate) fn new(revisions: &Revisions) -> Scrape {
        Scrape {
            revisions: revisions.read(),
            in_flight: Vec::new(),
            cpu: Vec::new(),
            compile_cache: CompileCache::default(),
            memory_reserved: 0,
            memory_budget: 0,
            phases: BTreeMap::new(),
            certificate_expires: None,
            connections: ConnectionStats::default(),
            kv_sent: None,
        }
    }

    /// The text exposition, counter families named as the classic format names them.
    pub(crate) fn encode(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(shoal_core::metrics::classic_counter_names(&out))
    }
}

fn revision_labels(app: &AppKey, revision: u64) -> Vec<(&'static str, String)> {
    vec![
        ("namespace", app.namespace.clone()),
        ("app", app.name.clone()),
        ("revision", revision.to_string()),
    ]
}

/// One counter family with a sample per app revision.
fn per_revision(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    revisions: &[(AppKey, u64, InstanceCounts)],
    value: impl Fn(&InstanceCounts) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (app, revision, counts) in revisions {
        family
            .encode_family(&revision_labels(app, *revision))?
            .encode_counter::<NoLabelSet, _, u64>(&value(counts), None)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let revisions = &self.revisions;
        let mut in_flight = encoder.encode_descriptor(
            "shoal_node_requests_in_flight",
            "Requests this node's replicas are serving now (from their permit to the end of the response body), whichever gateway routed them",
            None,
            MetricType::Gauge,
        )?;
        for (app, revision, n) in &self.in_flight {
            in_flight
                .encode_family(&revision_labels(app, *revision))?
                .encode_gauge(n)?;
        }
        per_revision(
            &mut encoder,
            "shoal_node_http_requests",
            "HTTP requests handed to this node's instances, health probes' included",
            revisions,
            |c| c.requests,
        )?;
        per_revision(
            &mut encoder,
            "shoal_node_cold_starts",
            "Instances created: one per request without reuse, per WASIp3 worker, per command run",
            revisions,
            |c| c.cold_starts,
        )?;
        per_revision(
            &mut encoder,
            "shoal_node_instance_reuses",
            "Requests served by an instance that had served one before",
            revisions,
            |c| c.reuses,
        )?;
        for (name, help, value) in [
            (
                "shoal_node_instances",
                "Instances alive, idle ones included; each holds its memory limit of the budget",
                (|c: &InstanceCounts| c.live) as fn(&InstanceCounts) -> u64,
            ),
            (
                "shoal_node_instances_idle",
                "Instances kept for reuse, waiting for a request",
                |c: &InstanceCounts| c.idle,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (app, revision, counts) in revisions {
                family
                    .encode_family(&revision_labels(app, *revision))?
                    .encode_gauge(&value(counts))?;
            }
        }
        let mut incidents = encoder.encode_descriptor(
            "shoal_node_incidents",
            "Requests whose instance was killed, by reason (timeout, out of memory, trap): every one, where the control plane's shoal_incidents_total counts reports",
            None,
            MetricType::Counter,
        )?;
        for (app, revision, counts) in revisions {
            for (kind, n) in counts.incidents() {
                let mut labels = revision_labels(app, *revision);
                labels.push(("reason", kind.reason().to_string()));
                incidents
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        for (name, help, value) in [
            (
                "shoal_node_compile_cache_hits",
                "Components loaded from the on-disk compile cache",
                self.compile_cache.hits,
            ),
            (
                "shoal_node_compile_cache_misses",
                "Components compiled because the compile cache did not have them",
                self.compile_cache.misses,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        for (name, help, value) in [
            (
                "shoal_node_memory_reserved_bytes",
                "Guest memory reserved by the instances alive now",
                self.memory_reserved,
            ),
            (
                "shoal_node_memory_budget_bytes",
                "Guest memory the node hands out at once",
                self.memory_budget,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        for (name, help, value) in [
            (
                "shoal_node_guest_cpu_seconds",
                "CPU time this node's guests of each app ran, since the app's first replica here started",
                (|u: &CpuUsage| u.used_ns) as fn(&CpuUsage) -> u64,
            ),
            (
                "shoal_node_guest_cpu_throttled_seconds",
                "Time this node's guests of each app waited for their CPU share or limit",
                |u: &CpuUsage| u.throttled_ns,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (group, usage) in &self.cpu {
                let Some((namespace, app)) = group.split_once('/') else {
                    continue;
                };
                let labels = vec![("namespace", namespace), ("app", app)];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&(value(usage) as f64 / 1e9), None)?;
            }
        }
        if let Some(expires) = self.certificate_expires {
            let at = expires
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            encoder
                .encode_descriptor(
                    "shoal_node_certificate_expiration_timestamp_seconds",
                    "When the certificate the node presents to the cluster's other members expires, renewed two thirds into its validity",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&at)?;
        }
        encoder
            .encode_descriptor(
                "shoal_node_gateway_connections",
                "Connections the node's gateway serves now, other nodes' hops and the control plane's included",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&self.connections.open)?;
        encoder
            .encode_descriptor(
                "shoal_node_gateway_connections_refused",
                "Connections the node's gateway closed as they came: their client held its most (--gateway-client-connections)",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.connections.refused, None)?;
        if let Some(sent) = self.kv_sent {
            for (name, help, value) in [
                (
                    "shoal_node_kv_calls",
                    "Guests' wasi:keyvalue calls this node sent to the control plane",
                    sent.calls,
                ),
                (
                    "shoal_node_kv_requests",
                    "Requests to the control plane that carried them: fewer than the calls when calls that piled up went together",
                    sent.requests,
                ),
            ] {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
            }
        }
        let mut phases = encoder.encode_descriptor(
            "shoal_node_replicas",
            "Replicas this node runs, by phase",
            None,
            MetricType::Gauge,
        )?;
        for (phase, n) in &self.phases {
            phases
                .encode_family(&vec![("phase", phase.clone())])?
                .encode_gauge(n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_no_replica_holds_go_after_a_while_and_held_ones_stay() {
        let revisions = Revisions::default();
        let app = AppKey::new("default", "a");
        let held = revisions.stats(&app, 1);
        let gone = revisions.stats(&app, 2);
        assert!(Arc::ptr_eq(&held, &revisions.stats(&app, 1)));
        drop(gone);
        let t0 = Instant::now();
        revisions.prune(t0);
        assert_eq!(revisions.read().len(), 2, "kept for the next scrapes");
        revisions.prune(t0 + RETIRE);
        let left: Vec<u64> = revisions.read().iter().map(|r| r.1).collect();
        assert_eq!(left, [1]);
        // Held again before its time, a revision's counters are kept on.
        drop(held);
        revisions.prune(t0);
        let again = revisions.stats(&app, 1);
        revisions.prune(t0 + RETIRE);
        assert_eq!(revisions.read().len(), 1);
        drop(again);
    }

    #[test]
    fn a_scrape_names_every_family_with_its_labels() {
        let revisions = Revisions::default();
        let app = AppKey::new("default", "a");
        let _held = revisions.stats(&app, 3);
        let mut scrape = Scrape::new(&revisions);
        scrape.in_flight = vec![(app.clone(), 3, 2)];
        scrape.cpu = vec![(
            "default/a".into(),
            CpuUsage {
                used_ns: 1_500_000_000,
                throttled_ns: 0,
            },
        )];
        scrape.compile_cache = CompileCache { hits: 1, misses: 0 };
        scrape.memory_budget = 1 << 30;
        scrape.phases.insert("Ready".into(), 1);
        scrape.certificate_expires =
            Some(std::time::UNIX_EPOCH + Duration::from_secs(4_102_444_800));
        let text = scrape.encode().unwrap();
        let labels = r#"{namespace="default",app="a",revision="3"}"#;
        for line in [
            format!("shoal_node_requests_in_flight{labels} 2"),
            format!("shoal_node_http_requests_total{labels} 0"),
            format!("shoal_node_cold_starts_total{labels} 0"),
            format!("shoal_node_instances{labels} 0"),
            r#"shoal_node_incidents_total{namespace="default",app="a",revision="3",reason="Trapped"} 0"#.to_string(),
            "shoal_node_compile_cache_hits_total 1".to_string(),
            "shoal_node_memory_budget_bytes 1073741824".to_string(),
            r#"shoal_node_guest_cpu_seconds_total{namespace="default",app="a"} 1.5"#.to_string(),
            r#"shoal_node_replicas{phase="Ready"} 1"#.to_string(),
            "shoal_node_certificate_expiration_timestamp_seconds 4102444800".to_string(),
            "# TYPE shoal_node_cold_starts_total counter".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
