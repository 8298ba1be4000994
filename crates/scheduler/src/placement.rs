//! Placement as a pipeline: cheap filters that record why each node was
//! rejected, then a scorer over the survivors.

use shoal_core::{Capacity, Node, NodeState};
use std::collections::BTreeMap;

/// A node as the scheduler sees it: the node plus what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo<'a> {
    pub node: &'a Node,
    pub allocated: Capacity,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Most-allocated first: fill nodes so whole ones stay free.
    #[default]
    BinPack,
    /// Least-allocated first.
    Spread,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub node: String,
    pub score: f64,
}

/// Why nothing fits, counted per reason, for `describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub total: usize,
    pub reasons: BTreeMap<&'static str, usize>,
}

impl std::fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0/{} nodes available", self.total)?;
        if self.reasons.is_empty() {
            return Ok(());
        }
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        write!(f, ": {}", parts.join(", "))
    }
}

/// The first filter a node fails, if any.
fn rejection(n: &NodeInfo<'_>, req: &Capacity) -> Option<&'static str> {
    let cap = &n.node.capacity;
    if n.node.state != NodeState::Ready {
        return Some("not ready");
    }
    if !n.node.schedulable {
        return Some("cordoned");
    }
    if n.allocated.memory_bytes + req.memory_bytes > cap.memory_bytes {
        return Some("insufficient memory");
    }
    if n.allocated.cpu_millis + req.cpu_millis > cap.cpu_millis {
        return Some("insufficient cpu");
    }
    if n.allocated.instances + req.instances > cap.instances {
        return Some("insufficient instance slots");
    }
    None
}

/// Fraction of cpu and memory in use after placing `req`, in [0, 2].
fn utilisation(n: &NodeInfo<'_>, req: &Capacity) -> f64 {
    let cap = &n.node.capacity;
    let frac = |used: u64, total: u64| {
        if total == 0 {
            1.0
        } else {
            used as f64 / total as f64
        }
    };
    frac(n.allocated.cpu_millis + req.cpu_millis, cap.cpu_millis)
        + frac(
            n.allocated.memory_bytes + req.memory_bytes,
            cap.memory_bytes,
        )
}

/// Picks a node for a replica needing `req`. Ties go to the lowest name, so
/// the same inputs always give the same answer.
pub fn place(
    req: &Capacity,
    nodes: &[NodeInfo<'_>],
    strategy: Strategy,
) -> Result<Placement, Unschedulable> {
    let mut reasons = BTreeMap::new();
    let mut best: Option<Placement> = None;
    for n in nodes {
        if let Some(reason) = rejection(n, req) {
            *reasons.entry(reason).or_insert(0) += 1;
            continue;
        }
        let u = utilisation(n, req);
        let score = match strategy {
            Strategy::BinPack => u,
            Strategy::Spread => 2.0 - u,
        };
        let better = match &best {
            None => true,
            Some(b) => score > b.score || (score == b.score && n.node.name < b.node),
        };
        if better {
            best = Some(Placement {
                node: n.node.name.clone(),
                score,
            });
        }
    }
    best.ok_or(Unschedulable {
        total: nodes.len(),
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: u64, mem_mi: u64) -> Node {
        Node {
            name: name.into(),
            gateway: "127.0.0.1:0".into(),
            capacity: Capacity {
                cpu_millis: cpu,
                memory_bytes: mem_mi << 20,
                instances: 100,
            },
            labels: Default::default(),
            state: NodeState::Ready,
            schedulable: true,
            last_heartbeat: 0,
            joined_at: 0,
        }
    }

    fn req(cpu: u64, mem_mi: u64) -> Capacity {
        Capacity {
            cpu_millis: cpu,
            memory_bytes: mem_mi << 20,
            instances: 1,
        }
    }

    #[test]
    fn bin_packs_onto_the_fullest_node_that_fits() {
        let (a, b) = (node("a", 1000, 1024), node("b", 1000, 1024));
        let nodes = [
            NodeInfo {
                node: &a,
                allocated: req(100, 100),
            },
            NodeInfo {
                node: &b,
                allocated: req(500, 500),
            },
        ];
        assert_eq!(
            place(&req(100, 100), &nodes, Strategy::BinPack)
                .unwrap()
                .node,
            "b"
        );
        assert_eq!(
            place(&req(100, 100), &nodes, Strategy::Spread)
                .unwrap()
                .node,
            "a"
        );
        // b cannot take 600Mi more; a can.
        assert_eq!(
            place(&req(100, 600), &nodes, Strategy::BinPack)
                .unwrap()
                .node,
            "a"
        );
    }

    #[test]
    fn ties_break_by_name() {
        let (a, b) = (node("a", 1000, 1024), node("b", 1000, 1024));
        let nodes = [
            NodeInfo {
                node: &b,
                allocated: Capacity::default(),
            },
            NodeInfo {
                node: &a,
                allocated: Capacity::default(),
            },
        ];
        assert_eq!(
            place(&req(1, 1), &nodes, Strategy::BinPack).unwrap().node,
            "a"
        );
    }

    #[test]
    fn every_rejection_is_counted() {
        let a = node("a", 1000, 64);
        let b = node("b", 1000, 64);
        let mut c = node("c", 1000, 4096);
        c.schedulable = false;
        let mut d = node("d", 10, 4096);
        d.state = NodeState::Ready;
        let mut e = node("e", 1000, 4096);
        e.state = NodeState::NotReady;
        let nodes: Vec<NodeInfo> = [&a, &b, &c, &d, &e]
            .into_iter()
            .map(|node| NodeInfo {
                node,
                allocated: Capacity::default(),
            })
            .collect();
        let err = place(&req(100, 128), &nodes, Strategy::BinPack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes available: 1 cordoned, 1 insufficient cpu, 2 insufficient memory, 1 not ready"
        );
    }

    #[test]
    fn instance_slots_are_capacity() {
        let a = node("a", 1000, 1024);
        let nodes = [NodeInfo {
            node: &a,
            allocated: Capacity {
                cpu_millis: 0,
                memory_bytes: 0,
                instances: 100,
            },
        }];
        let err = place(&req(1, 1), &nodes, Strategy::BinPack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes available: 1 insufficient instance slots"
        );
    }

    #[test]
    fn no_nodes() {
        let err = place(&req(1, 1), &[], Strategy::BinPack).unwrap_err();
        assert_eq!(err.to_string(), "0/0 nodes available");
    }
}
