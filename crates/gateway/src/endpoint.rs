//! Endpoints (where a request can go) and power-of-two-choices picking among them.

use shoal_runtime::HttpService;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Semaphore;

/// One ready replica the gateway can send requests to: in this process, or on another node
/// reached through that node's gateway.
pub struct Endpoint {
    pub replica: String,
    pub(crate) target: Target,
    inflight: AtomicUsize,
    /// Set when a connection to a remote endpoint failed; cleared only by the next status
    /// ([`Gateway::set_remote_endpoints`](crate::Gateway::set_remote_endpoints)) listing it.
    down: AtomicBool,
}

pub(crate) enum Target {
    /// The permits enforce the replica's `max_concurrency` on the node that runs it.
    Local {
        service: HttpService,
        permits: Arc<Semaphore>,
    },
    /// `host:port` of the node's gateway. No permits here: the receiving node enforces them.
    Remote { node: String },
}

impl Endpoint {
    pub fn local(replica: String, service: HttpService, max_concurrency: u32) -> Self {
        Endpoint::new(
            replica,
            Target::Local {
                service,
                permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            },
        )
    }

    /// A replica on another node, reached through that node's gateway (`"10.0.0.2:8080"`).
    pub fn remote(replica: String, node_gateway: String) -> Self {
        Endpoint::new(replica, Target::Remote { node: node_gateway })
    }

    fn new(replica: String, target: Target) -> Self {
        Endpoint {
            replica,
            target,
            inflight: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// Requests sent to this endpoint whose responses have not finished streaming.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn is_local(&self) -> bool {
        matches!(self.target, Target::Local { .. })
    }

    /// The gateway address of the node a remote endpoint lives on; `None` when local.
    pub fn node_gateway(&self) -> Option<&str> {
        match &self.target {
            Target::Local { .. } => None,
            Target::Remote { node } => Some(node),
        }
    }

    /// Out of rotation after a failed connection, until the next status lists it again.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub(crate) fn status(&self) -> EndpointStatus {
        EndpointStatus {
            replica: self.replica.clone(),
            node_gateway: self.node_gateway().map(str::to_string),
            inflight: self.inflight(),
            down: self.is_down(),
        }
    }

    /// Counts a request in flight until the returned guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }
}

/// A snapshot of one endpoint, for callers that show or assert the gateway's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub replica: String,
    /// `None` for a replica in this process.
    pub node_gateway: Option<String>,
    pub inflight: usize,
    pub down: bool,
}

pub(crate) struct InflightGuard(Arc<Endpoint>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Power of two choices among the endpoints not marked down: two at random, the one with
/// fewer requests in flight wins; on a tie a local one wins (no network hop), else the first.
pub(crate) fn pick(endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
    // The common case, nothing down, needs no allocation.
    if !endpoints.iter().any(|e| e.is_down()) {
        return two_choices(endpoints).cloned();
    }
    let ready: Vec<Arc<Endpoint>> = endpoints.iter().filter(|e| !e.is_down()).cloned().collect();
    two_choices(&ready).cloned()
}

fn two_choices(candidates: &[Arc<Endpoint>]) -> Option<&Arc<Endpoint>> {
    match candidates.len() {
        0 => None,
        1 => Some(&candidates[0]),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (&candidates[a], &candidates[b]);
            Some(match a.inflight().cmp(&b.inflight()) {
                std::cmp::Ordering::Less => a,
                std::cmp::Ordering::Greater => b,
                std::cmp::Ordering::Equal if b.is_local() && !a.is_local() => b,
                std::cmp::Ordering::Equal => a,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(id: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::remote(id.into(), "127.0.0.1:1".into()))
    }

    #[test]
    fn down_endpoints_are_never_picked() {
        let eps = vec![remote("a"), remote("b"), remote("c")];
        eps[0].set_down(true);
        eps[2].set_down(true);
        for _ in 0..100 {
            assert_eq!(pick(&eps).unwrap().replica, "b");
        }
        eps[1].set_down(true);
        assert!(pick(&eps).is_none());
    }

    #[test]
    fn the_less_busy_of_two_wins() {
        let eps = vec![remote("busy"), remote("idle")];
        let guards: Vec<_> = (0..3).map(|_| eps[0].enter()).collect();
        for _ in 0..100 {
            assert_eq!(pick(&eps).unwrap().replica, "idle");
        }
        drop(guards);
        assert_eq!(eps[0].inflight(), 0);
    }
}
