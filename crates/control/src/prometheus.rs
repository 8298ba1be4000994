//! `GET /v1/metrics`: the cluster in Prometheus' text format (encoded by prometheus-client, with
//! counter families named as the classic format names them), read at each scrape. Per app revision, what every gateway counted since this control plane
//! started (requests, 5xx answers, time to the response head as a histogram); per phase, the
//! replicas; per state, the nodes; the apps, and per app the replicas it wants, those ready and
//! their restarts. And what the control plane observes as it works:
//! controller passes and decisions, heartbeats, incidents, store commits, how long replicas
//! waited for a node. Names and labels follow Prometheus' conventions
//! (`promtool check metrics` passes, `tests/metrics.rs`).

use crate::error::ControlError;
use crate::state::ControlPlane;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_core::clients::{Clients, ConnectionStats};
use shoal_core::metrics::{LATENCY_BOUNDS_MS, RevisionStats, classic_counter_names};
use shoal_core::objects::keys;
use shoal_core::{Node, NodeState, Phase, Replica};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the control plane counts as it works, since it started.
#[derive(Clone)]
pub(crate) struct Observed {
    /// How long each controller pass took.
    pub(crate) passes: Histogram,
    pub(crate) heartbeats: Counter,
    /// What the controller decided and wrote, by the reason of its event (`Scheduled`,
    /// `FailedScheduling`, `ScaledUp`, `RolledBack`, …).
    pub(crate) decisions: Family<Reason, Counter>,
    /// Requests killed on a node (timeout, out of memory, trap), as nodes report them
    /// (each node reports one per replica and kind every 10 s at most).
    pub(crate) incidents: Family<AppReason, Counter>,
    /// How long each durable store commit took (the store times it; concurrent transactions
    /// share one).
    pub(crate) commits: Histogram,
    /// How long each replica the controller placed waited for a node, from its creation.
    pub(crate) scheduling: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AppReason {
    pub(crate) namespace: String,
    pub(crate) app: String,
    pub(crate) reason: String,
}

impl Observed {
    pub(crate) fn new() -> Observed {
        Observed {
            // 1 ms to about 16 s.
            passes: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            heartbeats: Counter::default(),
            decisions: Family::default(),
            incidents: Family::default(),
            // 100 µs to about 3 s: an fsync, on a good disk or a struggling one.
            commits: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 10 ms to about 45 min: most are placed in the pass that makes them (0 s);
            // the rest wait for room.
            scheduling: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "shoal_controller_pass_duration_seconds",
            "How long each controller pass (mirror, plan, write) took",
            self.passes.clone(),
        );
        registry.register(
            "shoal_node_heartbeats",
            "Heartbeats the control plane received from nodes",
            self.heartbeats.clone(),
        );
        registry.register(
            "shoal_controller_decisions",
            "Decisions the controller wrote, by the reason of their event",
            self.decisions.clone(),
        );
        registry.register(
            "shoal_incidents",
            "Requests killed on a node by their timeout, memory limit or a trap, as nodes report them",
            self.incidents.clone(),
        );
        registry.register(
            "shoal_store_commit_duration_seconds",
            "How long each durable store commit took, fsync included; concurrent transactions share one",
            self.commits.clone(),
        );
        registry.register(
            "shoal_replica_scheduling_duration_seconds",
            "How long each replica the controller placed waited for a node, from its creation",
            self.scheduling.clone(),
        );
    }
}

/// Reads one of [`AppReplicas`]' gauges.
type AppGauge = fn(&AppReplicas) -> &i64;

/// One app's replicas as a scrape reports them.
#[derive(Debug)]
struct AppReplicas {
    namespace: String,
    app: String,
    desired: i64,
    ready: i64,
    restarts: i64,
}

/// What one scrape reports, read before encoding.
#[derive(Debug)]
struct Scrape {
    revisions: Vec<RevisionStats>,
    apps: i64,
    /// Per app: the replicas it wants now, those serving, and the restarts of its replicas.
    app_replicas: Vec<AppReplicas>,
    replicas: BTreeMap<String, i64>,
    nodes: BTreeMap<String, i64>,
    /// The API's connections, once it serves.
    api: Option<ConnectionStats>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |s: &RevisionStats| {
            vec![
                ("namespace", s.app.namespace.clone()),
                ("app", s.app.name.clone()),
                ("revision", s.revision.to_string()),
            ]
        };
        let mut requests = encoder.encode_descriptor(
            "shoal_http_requests",
            "Requests the gateways answered, per app revision (0: with no replica to take them)",
            None,
            MetricType::Counter,
        )?;
        for s in &self.revisions {
            requests
                .encode_family(&labels(s))?
                .encode_counter::<NoLabelSet, _, u64>(&s.requests, None)?;
        }
        let mut errors = encoder.encode_descriptor(
            "shoal_http_server_errors",
            "Requests answered with a 5xx status (the guest's or the gateway's), per app revision",
            None,
            MetricType::Counter,
        )?;
        for s in &self.revisions {
            errors
                .encode_family(&labels(s))?
                .encode_counter::<NoLabelSet, _, u64>(&s.errors, None)?;
        }
        let mut latency = encoder.encode_descriptor(
            "shoal_http_request_duration_seconds",
            "Time from a request's arrival at a gateway to its response head, per app revision",
            None,
            MetricType::Histogram,
        )?;
        for s in &self.revisions {
            let counts = &s.latency.counts;
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_MS
                .iter()
                .map(|ms| *ms as f64 / 1_000.0)
                .chain([f64::MAX])
                .enumerate()
                .map(|(i, bound)| (bound, counts.get(i).copied().unwrap_or(0)))
                .collect();
            latency
                .encode_family(&labels(s))?
                .encode_histogram::<NoLabelSet>(
                    s.latency.sum_us as f64 / 1e6,
                    s.latency.total(),
                    &buckets,
                    None,
                )?;
        }
        encoder
            .encode_descriptor("shoal_apps", "Apps", None, MetricType::Gauge)?
            .encode_gauge(&self.apps)?;
        let per_app: [(&str, &str, AppGauge); 3] = [
            (
                "shoal_app_replicas_desired",
                "Replicas an app wants now, as get apps shows them (a job: its runs going)",
                |a| &a.desired,
            ),
            (
                "shoal_app_replicas_ready",
                "An app's replicas serving now (Ready; Running for daemons and jobs)",
                |a| &a.ready,
            ),
            (
                "shoal_app_replica_restarts",
                "Times nodes started an app's current replicas again after they exited, summed",
                |a| &a.restarts,
            ),
        ];
        for (name, help, value) in per_app {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for a in &self.app_replicas {
                family
                    .encode_family(&vec![
                        ("namespace", a.namespace.clone()),
                        ("app", a.app.clone()),
                    ])?
                    .encode_gauge(value(a))?;
            }
        }
        let mut replicas = encoder.encode_descriptor(
            "shoal_replicas",
            "Replicas by phase",
            None,
            MetricType::Gauge,
        )?;
        for (phase, n) in &self.replicas {
            replicas
                .encode_family(&vec![("phase", phase.clone())])?
                .encode_gauge(n)?;
        }
        let mut nodes =
            encoder.encode_descriptor("shoal_nodes", "Nodes by state", None, MetricType::Gauge)?;
        for (state, n) in &self.nodes {
            nodes
                .encode_family(&vec![("state", state.clone())])?
                .encode_gauge(n)?;
        }
        if let Some(api) = &self.api {
            encoder
                .encode_descriptor(
                    "shoal_api_connections",
                    "Connections this server's API serves now",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&api.open)?;
            encoder
                .encode_descriptor(
                    "shoal_api_connections_refused",
                    "Connections this server's API closed as they came: their client held its most (--api-client-connections)",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, u64>(&api.refused, None)?;
        }
        Ok(())
    }
}

impl ControlPlane {
    /// Reports the connections of the API this server serves (on `clients`) in its metrics;
    /// the first call holds (a server serves one API).
    pub fn count_api_clients(&self, clients: Arc<Clients>) {
        let _ = self.inner.api_clients.set(clients);
    }

    /// The metrics, in the text exposition format.
    pub fn prometheus(&self) -> Result<String, ControlError> {
        let mut revisions = Vec::new();
        for m in self.inner.metrics.snapshot().into_values() {
            revisions.extend(m.totals.into_values());
        }
        let all = self.list::<Replica>(&keys::REPLICAS)?;
        let apps = self.summaries_of(None, &all)?;
        // Every phase and state, 0 included: an alert on `shoal_nodes{state="NotReady"} > 0`
        // must see a series, not none, when all is well.
        let mut replicas: BTreeMap<String, i64> = [
            Phase::Pending,
            Phase::Starting,
            Phase::Ready,
            Phase::Unready,
            Phase::Running,
            Phase::CrashLoopBackOff,
            Phase::Succeeded,
            Phase::Failed,
        ]
        .iter()
        .map(|p| (format!("{p:?}"), 0))
        .collect();
        let mut restarts: BTreeMap<(&String, &String), i64> = BTreeMap::new();
        for r in &all {
            *replicas.entry(format!("{:?}", r.phase)).or_insert(0) += 1;
            *restarts.entry((&r.app.namespace, &r.app.name)).or_insert(0) += i64::from(r.restarts);
        }
        let app_replicas = apps
            .iter()
            .map(|a| AppReplicas {
                desired: i64::from(a.desired),
                ready: a.ready as i64,
                restarts: restarts.get(&(&a.namespace, &a.name)).copied().unwrap_or(0),
                namespace: a.namespace.clone(),
                app: a.name.clone(),
            })
            .collect();
        let mut nodes: BTreeMap<String, i64> = [NodeState::Ready, NodeState::NotReady]
            .iter()
            .map(|s| (format!("{s:?}"), 0))
            .collect();
        for n in self.list::<Node>(&keys::NODES)? {
            *nodes.entry(format!("{:?}", n.state)).or_insert(0) += 1;
        }
        let mut registry = Registry::default();
        self.inner.observed.register(&mut registry);
        registry.register_collector(Box::new(Scrape {
            revisions,
            apps: apps.len() as i64,
            app_replicas,
            replicas,
            nodes,
            api: self.inner.api_clients.get().map(|c| c.stats()),
        }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .map_err(ControlError::internal)?;
        Ok(classic_counter_names(&out))
    }
}
