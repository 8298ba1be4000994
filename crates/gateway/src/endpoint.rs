//! Endpoints (where a request can go) and power-of-two-choices picking among them, within
//! the group of revisions a traffic split chose.

use crate::metrics::Counters;
use shoal_runtime::HttpService;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// One ready replica the gateway can send requests to: in this process, or on another node
/// reached through that node's gateway.
pub struct Endpoint {
    pub replica: String,
    /// The app revision the replica runs: what a [`Split`] chooses by and metrics are kept per.
    pub revision: u64,
    pub(crate) target: Target,
    /// Where this endpoint's request outcomes are counted; shared by every endpoint of the
    /// same app revision once the gateway holds it.
    pub(crate) counters: Arc<Counters>,
    inflight: AtomicUsize,
    /// Since when it is out of rotation (a connection to it failed), in ms of [`clock_ms`];
    /// 0 while in rotation. It comes back once a status lists it again
    /// ([`Endpoint::relist`]), and not before [`DOWN_AT_LEAST`] has passed.
    down_since: AtomicU64,
    /// Whether a status listed it since it went out of rotation.
    relisted: AtomicBool,
}

/// The least time an endpoint stays out of rotation, however soon a status lists it again:
/// a node killed is still listed by the cluster until it misses its heartbeats (3 s by
/// default), and each listing brought its endpoints back for another request to fail on.
pub(crate) const DOWN_AT_LEAST: Duration = Duration::from_secs(3);

/// Monotonic milliseconds: since this process first asked, counted from a day in, so that
/// no time is 0 (which says "in rotation") and a time a while before it still is one.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 86_400_000
}

pub(crate) enum Target {
    /// The permits enforce the replica's `max_concurrency` on the node that runs it.
    Local {
        service: HttpService,
        permits: Arc<Semaphore>,
    },
    /// A replica on node `node`, whose gateway is at `gateway` (`host:port`). No permits
    /// here: the receiving node enforces them.
    Remote {
        node: String,
        gateway: String,
        /// Reaches that node's gateway only: over TLS it must present `node`'s certificate.
        client: Box<crate::proxy::Client>,
        timeout: Option<Duration>,
    },
}

impl Endpoint {
    pub fn local(
        replica: String,
        revision: u64,
        service: HttpService,
        max_concurrency: u32,
    ) -> Self {
        Endpoint::new(
            replica,
            revision,
            Target::Local {
                service,
                permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            },
        )
    }

    /// A replica on node `remote.node`, reached through that node's gateway with `client`.
    pub(crate) fn remote(remote: RemoteReplica, client: crate::proxy::Client) -> Self {
        Endpoint::new(
            remote.replica,
            remote.revision,
            Target::Remote {
                node: remote.node,
                gateway: remote.gateway,
                client: Box::new(client),
                timeout: remote.timeout,
            },
        )
    }

    fn new(replica: String, revision: u64, target: Target) -> Self {
        Endpoint {
            replica,
            revision,
            target,
            counters: Arc::default(),
            inflight: AtomicUsize::new(0),
            down_since: AtomicU64::new(0),
            relisted: AtomicBool::new(false),
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
            Target::Remote { gateway, .. } => Some(gateway),
        }
    }

    /// Out of rotation after a failed connection: until a status lists it again, and for
    /// [`DOWN_AT_LEAST`] at least.
    pub fn is_down(&self) -> bool {
        let since = self.down_since.load(Ordering::Relaxed);
        since != 0 && self.down_at(since, clock_ms())
    }

    fn down_at(&self, since: u64, now: u64) -> bool {
        let held = u64::try_from(DOWN_AT_LEAST.as_millis()).unwrap_or(u64::MAX);
        !(self.relisted.load(Ordering::Relaxed) && now.saturating_sub(since) >= held)
    }

    /// Takes it out of rotation (see [`Endpoint::is_down`]).
    pub(crate) fn set_down(&self) {
        self.relisted.store(false, Ordering::Relaxed);
        self.down_since.store(clock_ms(), Ordering::Relaxed);
    }

    /// A status lists it: back in rotation, once it has been out [`DOWN_AT_LEAST`].
    pub(crate) fn relist(&self) {
        self.relisted.store(true, Ordering::Relaxed);
    }

    /// As if it went out of rotation `ago` earlier than it did.
    #[cfg(test)]
    pub(crate) fn down_earlier(&self, ago: Duration) {
        let ago = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
        let since = self.down_since.load(Ordering::Relaxed);
        self.down_since
            .store(since.saturating_sub(ago).max(1), Ordering::Relaxed);
    }

    pub(crate) fn status(&self) -> EndpointStatus {
        EndpointStatus {
            replica: self.replica.clone(),
            revision: self.revision,
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
    pub revision: u64,
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

/// A replica on another node, as the cluster's status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReplica {
    pub replica: String,
    pub revision: u64,
    /// The node that runs it: hops to it over TLS take only that node's certificate.
    pub node: String,
    /// `host:port` of the gateway of the node that runs it.
    pub gateway: String,
    /// Its revision's request timeout: that node answers 504 by then, so a hop that has
    /// no response head a little after it is stuck.
    pub timeout: Option<Duration>,
}

/// Splits an app's traffic between one revision and the rest, for a canary rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The revision that gets `weight` percent of requests.
    pub canary: u64,
    /// Percent (0..=100) of requests for the canary; more than 100 counts as 100.
    pub weight: u8,
}

/// The endpoints one request may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    All,
    /// Endpoints of this revision: the canary.
    Revision(u64),
    /// Endpoints of any other revision: the stable side.
    Except(u64),
}

impl Group {
    /// Draws the side of `split` this request goes to; `All` without a split.
    pub(crate) fn draw(split: Option<Split>) -> Group {
        match split {
            None => Group::All,
            Some(s) if fastrand::u8(..100) < s.weight => Group::Revision(s.canary),
            Some(s) => Group::Except(s.canary),
        }
    }

    fn contains(self, endpoint: &Endpoint) -> bool {
        match self {
            Group::All => true,
            Group::Revision(r) => endpoint.revision == r,
            Group::Except(r) => endpoint.revision != r,
        }
    }
}

/// Power of two choices among the endpoints of `group` not marked down, or among all of
/// them when none of the group is in rotation: a split shifts traffic, it never refuses it.
pub(crate) fn pick(endpoints: &[Arc<Endpoint>], group: Group) -> Option<Arc<Endpoint>> {
    match two_choices(endpoints, group) {
        None if group != Group::All => two_choices(endpoints, Group::All),
        picked => picked,
    }
    .cloned()
}

/// Two candidates at random, the one with fewer requests in flight wins; on a tie a local
/// one wins (no network hop), else the first. Counts and walks the candidates in place:
/// the hot path allocates nothing.
fn two_choices(endpoints: &[Arc<Endpoint>], group: Group) -> Option<&Arc<Endpoint>> {
    let eligible = |e: &&Arc<Endpoint>| !e.is_down() && group.contains(e);
    let n = endpoints.iter().filter(eligible).count();
    let nth = |i: usize| {
        if n == endpoints.len() {
            &endpoints[i]
        } else {
            endpoints
                .iter()
                .filter(eligible)
                .nth(i)
                .expect("fewer than counted")
        }
    };
    match n {
        0 => None,
        1 => Some(nth(0)),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a), nth(b));
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
        revision(id, 1)
    }

    fn revision(id: &str, revision: u64) -> Arc<Endpoint> {
        let replica = RemoteReplica {
            replica: id.into(),
            revision,
            node: "b".into(),
            gateway: "127.0.0.1:1".into(),
            timeout: None,
        };
        let hops = crate::proxy::Hops::new(Duration::from_secs(1), false, None);
        Arc::new(Endpoint::remote(replica, hops.client("b")))
    }

    #[test]
    fn down_endpoints_are_never_picked() {
        let eps = vec![remote("a"), remote("b"), remote("c")];
        eps[0].set_down();
        eps[2].set_down();
        for _ in 0..100 {
            assert_eq!(pick(&eps, Group::All).unwrap().replica, "b");
        }
        eps[1].set_down();
        assert!(pick(&eps, Group::All).is_none());
    }

    #[test]
    fn the_less_busy_of_two_wins() {
        let eps = vec![remote("busy"), remote("idle")];
        let guards: Vec<_> = (0..3).map(|_| eps[0].enter()).collect();
        for _ in 0..100 {
            assert_eq!(pick(&eps, Group::All).unwrap().replica, "idle");
        }
        drop(guards);
        assert_eq!(eps[0].inflight(), 0);
    }

    #[test]
    fn a_group_picks_only_its_revisions_while_it_has_any_in_rotation() {
        let eps = vec![
            revision("old-1", 1),
            revision("old-2", 1),
            revision("new", 2),
        ];
        for _ in 0..100 {
            assert_eq!(pick(&eps, Group::Revision(2)).unwrap().replica, "new");
            assert_eq!(pick(&eps, Group::Except(2)).unwrap().revision, 1);
        }
        // An empty group falls back to every endpoint rather than to none.
        eps[2].set_down();
        for _ in 0..100 {
            assert_eq!(pick(&eps, Group::Revision(2)).unwrap().revision, 1);
        }
        assert_eq!(pick(&eps, Group::Revision(3)).unwrap().revision, 1);
        eps[0].set_down();
        eps[1].set_down();
        assert!(pick(&eps, Group::Except(2)).is_none());
    }

    #[test]
    fn the_weight_is_the_canary_share() {
        let split = |weight| Some(Split { canary: 2, weight });
        for _ in 0..100 {
            assert_eq!(Group::draw(split(0)), Group::Except(2));
            assert_eq!(Group::draw(split(100)), Group::Revision(2));
            assert_eq!(Group::draw(split(255)), Group::Revision(2));
            assert_eq!(Group::draw(None), Group::All);
        }
        let canary = (0..10_000)
            .filter(|_| Group::draw(split(20)) == Group::Revision(2))
            .count();
        assert!((1_500..2_500).contains(&canary), "{canary}");
    }
}
