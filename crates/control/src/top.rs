//! `shoal top`: what nodes and apps use and serve now, from what the control plane already
//! measures in memory (`measurements.rs`: the gateways' reports, the nodes' CPU reports and
//! heartbeats) beside the stored nodes, apps and replicas. Nothing here is stored.

use crate::error::ControlError;
use crate::state::ControlPlane;
use shoal_api::{AppTop, NodeDescribe, NodeTop};
use shoal_core::objects::keys;
use shoal_core::{Node, Replica};
use std::collections::HashMap;

/// The events `describe node` shows, the newest.
const NODE_EVENTS: usize = 20;

impl ControlPlane {
    /// One node as `describe node` shows it: its summary, what it uses now, the replicas
    /// placed on it and its own newest events.
    pub(crate) fn describe_node(&self, name: &str) -> Result<NodeDescribe, ControlError> {
        let summary = self
            .node_summaries()?
            .into_iter()
            .find(|s| s.node.name == name)
            .ok_or_else(|| ControlError::not_found(format!("node {name} does not exist")))?;
        let usage = self
            .top_nodes()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ControlError::not_found(format!("node {name} does not exist")))?;
        let mut placed: Vec<Replica> = self
            .list::<Replica>(&keys::REPLICAS)?
            .into_iter()
            .filter(|r| r.is_active() && r.node.as_deref() == Some(name))
            .collect();
        placed.sort_by(|a, b| (&a.app, &a.id).cmp(&(&b.app, &b.id)));
        let object = format!("node/{name}");
        let mut events = self.events(None, usize::MAX)?;
        events.retain(|e| e.object == object);
        let events = events.split_off(events.len().saturating_sub(NODE_EVENTS));
        Ok(NodeDescribe {
            summary,
            usage,
            placed,
            events,
        })
    }

    /// Every node: its guests' CPU and memory, its replicas, the requests its gateway routed.
    pub(crate) fn top_nodes(&self) -> Result<Vec<NodeTop>, ControlError> {
        // The gateways' measurements are by the clock that never steps.
        let now = self.steady_now();
        let mut replicas: HashMap<String, usize> = HashMap::new();
        for r in self.list::<Replica>(&keys::REPLICAS)? {
            if let Some(node) = r.node.as_ref().filter(|_| r.is_active()) {
                *replicas.entry(node.clone()).or_default() += 1;
            }
        }
        let cpu = self.inner.metrics.cpu_by_node(now);
        Ok(self
            .list::<Node>(&keys::NODES)?
            .into_iter()
            .map(|node| {
                let (memory, requests_per_second) = self.inner.metrics.node(&node.name, now);
                NodeTop {
                    cpu_millis: cpu.get(&node.name).map(|c| c.used_millis),
                    cpu_capacity_millis: node.capacity.cpu_millis,
                    memory,
                    replicas: replicas.get(&node.name).copied().unwrap_or(0),
                    requests_per_second,
                    state: node.state,
                    name: node.name,
                }
            })
            .collect())
    }

    /// The apps of `namespace` (every namespace's without): ready and desired replicas, and
    /// over the last minute requests, 5xx and p99 latency per second, with their guests' CPU.
    pub(crate) fn top_apps(&self, namespace: Option<&str>) -> Result<Vec<AppTop>, ControlError> {
        // The gateways' measurements are by the clock that never steps.
        let now = self.steady_now();
        Ok(self
            .summaries(namespace)?
            .into_iter()
            .map(|a| {
                let key = shoal_core::spec::AppKey::new(&a.namespace, &a.name);
                let rates = self.inner.metrics.rates(&key, now);
                AppTop {
                    cpu: self.inner.metrics.cpu(&key, now),
                    p99_ms: rates.latency.quantile(0.99),
                    requests_per_second: rates.requests_per_second,
                    errors_per_second: rates.errors_per_second,
                    ready: a.ready,
                    desired: a.desired,
                    namespace: a.namespace,
                    name: a.name,
                }
            })
            .collect())
    }
}
