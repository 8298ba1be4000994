//! Node pools: which workers a pool starts, drains and stops now, as a cluster
//! autoscaler decides. Pure; the control plane's provisioner runs the provider
//! commands and writes what this returns.
//!
//! A pool grows while replicas wait because they fit on no node, once its last
//! nodes have settled (joined and had a pass to take them): by as many nodes
//! as the waiting replicas' requests fill, going by the size of a node it
//! runs, or ran last (one node when it never ran one); it keeps at least `min` and at most
//! `max` nodes; a node that ran no replica for the cool-down, or only replicas that would all
//! fit on the other nodes ([`movable`], one such node at a time, while no other retires), is
//! drained and, once empty for [`DRAINED_GRACE_MS`], stopped. A node that never becomes Ready
//! within [`START_TIMEOUT_MS`] of its provider's `start` returning, or is lost, is stopped and
//! forgotten, so a failing provider is retried at most once per that time. A member being
//! stopped stays one until its stop is known to be done ([`PoolMember::stopping_since`]):
//! stopped again if it was cut short, and after [`stop_backoff`] if it failed.
//!
//! With several pools, [`assign`] gives each waiting replica to one pool, the first by name
//! whose nodes carry what its `node_selector` asks for, so one replica never grows them all.

use crate::placement::{Cluster, Request, Strategy};
use shoal_core::spec::AppKey;
use shoal_core::{Capacity, Millis, Node, NodeState, POOL_LABEL, Pool, PoolMember, StartedBy};
use std::collections::{BTreeMap, BTreeSet};

/// An active replica, as [`movable`] weighs it.
#[derive(Debug, Clone)]
pub struct Placed<'a> {
    pub node: &'a str,
    pub app: &'a AppKey,
    pub request: Request<'a>,
    /// Bound to its node: it mounts a volume there, or is a job's run.
    pub pinned: bool,
}

/// The nodes of `candidates` that run replicas which would all fit on the other nodes now,
/// each node judged alone, as the cluster autoscaler's scale-down judges: a pool node kept
/// up only by those is as idle as an empty one (replicas spread onto a new node would
/// otherwise keep it up for good). A node with a pinned replica is never one.
pub fn movable<'a>(
    nodes: &'a BTreeMap<String, Node>,
    replicas: &[Placed<'_>],
    candidates: impl IntoIterator<Item = &'a str>,
    strategy: Strategy,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for candidate in candidates {
        let on: Vec<&Placed<'_>> = replicas.iter().filter(|r| r.node == candidate).collect();
        if on.is_empty() || on.iter().any(|r| r.pinned) {
            continue;
        }
        let mut cluster = Cluster::new(nodes.values().filter(|n| n.name != candidate), strategy);
        for r in replicas.iter().filter(|r| r.node != candidate) {
            cluster.reserve(r.node, r.app, &r.request.resources);
        }
        if on.iter().all(|r| cluster.place(r.app, &r.request).is_ok()) {
            out.insert(candidate.to_string());
        }
    }
    out
}

/// A replica that waits because it fits on no node, and that a new node could take: not
/// one bound to a node by its volume.
#[derive(Debug, Clone)]
pub struct Waiting<'a> {
    pub asks: Capacity,
    /// The memory one of its instances may use: a node with less never takes it.
    pub instance_memory: u64,
    /// Labels its node must carry.
    pub node_selector: &'a BTreeMap<String, String>,
}

/// The waiting replicas each pool is to grow for, by pool name: each goes to the first pool,
/// by name, whose nodes carry every label its selector names ([`POOL_LABEL`] included) and
/// whose node (as one it runs is, or the last one it ran was) is big enough for its
/// requests and its instances' memory limit; among those, one that may still grow comes
/// first. A replica no pool's nodes could take is no pool's.
pub fn assign(
    pools: &[Pool],
    nodes: &BTreeMap<String, Node>,
    waiting: &[Waiting<'_>],
    now: Millis,
) -> BTreeMap<String, Vec<Capacity>> {
    let mut out: BTreeMap<String, Vec<Capacity>> =
        pools.iter().map(|p| (p.name.clone(), Vec::new())).collect();
    let mut by_name: Vec<&Pool> = pools.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    // Every member counts against the maximum, as in `decide`.
    let held = |pool: &Pool| pool.members.len();
    let size = |pool: &Pool| {
        pool.members
            .iter()
            .filter(|(_, m)| m.live() && m.started_at >= pool.workers_since)
            .find_map(|(n, _)| nodes.get(n))
            .map(|n| n.capacity.clone())
            .or_else(|| pool.node_size.clone())
    };
    for w in waiting {
        let takes = |pool: &Pool| {
            let labelled = w.node_selector.iter().all(|(k, v)| {
                if k == POOL_LABEL {
                    *v == pool.name
                } else {
                    pool.spec.labels.get(k) == Some(v)
                }
            });
            let fits = size(pool).is_none_or(|c| {
                w.asks.memory_bytes.max(w.instance_memory) <= c.memory_bytes
                    && w.asks.cpu_millis <= c.cpu_millis
            });
            labelled && fits
        };
        let can_grow = |pool: &Pool| held(pool) < pool.spec.bounds(now).max as usize;
        let chosen = by_name
            .iter()
            .find(|p| takes(p) && can_grow(p))
            .or_else(|| by_name.iter().find(|p| takes(p)));
        if let Some(pool) = chosen {
            out.entry(pool.name.clone())
                .or_default()
                .push(w.asks.clone());
        }
    }
    out
}

/// How long a started node may take to join and be Ready.
pub const START_TIMEOUT_MS: u64 = 60_000;
/// How long a node that joined may be not Ready before it is stopped and replaced: a
/// missed heartbeat or two is no lost machine (the cluster autoscaler waits 20 minutes).
pub const UNREADY_TIMEOUT_MS: u64 = 300_000;
/// How long after its drain a retiring node may still take replicas before it is drained
/// again.
pub const DRAIN_RETRY_MS: u64 = 10_000;
/// How long a draining node may take to empty before it is stopped anyway.
pub const RETIRE_TIMEOUT_MS: u64 = 60_000;
/// How long a drained node runs no replica before it is stopped: time for the gateways of
/// other nodes to stop sending it requests, and for those in flight to finish.
pub const DRAINED_GRACE_MS: u64 = 5_000;
/// How long after its provider's `stop` first failed a member is stopped again; each
/// failure after doubles it, up to [`STOP_RETRY_MAX_MS`].
pub const STOP_RETRY_MS: u64 = 10_000;
pub const STOP_RETRY_MAX_MS: u64 = 300_000;

/// How long to wait before starting a node after the `failures`-th in a row that never
/// joined: nothing after the first (a machine may fail once), then 30 s, doubling to 30
/// minutes.
pub fn start_backoff(failures: u32) -> u64 {
    match failures {
        0 | 1 => 0,
        n => (30_000u64 << (n - 2).min(16)).min(1_800_000),
    }
}

/// How long to wait after the `failures`-th failed stop in a row.
pub fn stop_backoff(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(16);
    (STOP_RETRY_MS << doublings).min(STOP_RETRY_MAX_MS)
}
/// How long after a node joined before its pool may grow again: time for the
/// controller to place what waits on it.
pub const SETTLE_MS: u64 = 3_000;

/// What the cluster looks like to a pool.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub nodes: &'a BTreeMap<String, Node>,
    /// Active replicas per node name.
    pub active: &'a BTreeMap<String, usize>,
    /// What each replica waiting because no node can take it requests.
    pub pending: &'a [Capacity],
    /// What the scheduler said about one of them.
    pub pending_why: Option<&'a str>,
    /// Nodes whose replicas would all fit elsewhere now ([`movable`]).
    pub movable: &'a BTreeSet<String>,
    /// Members whose worker is known not to run (a local one that exited, or was started
    /// by a control plane that has since restarted): stopped at once, not waited for.
    pub gone: &'a BTreeSet<String>,
    /// Members whose provider's `start` or `stop` is running now: no stop is decided for them
    /// until it is done.
    pub busy: &'a BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker that joins as `node`.
    Start { node: String, why: String },
    /// Drain `node`: its replicas move, new before old, before it is stopped.
    Drain { node: String, why: String },
    /// Stop `node`'s worker and delete the node: with `provider`, the command that started
    /// it; without, it is a local worker.
    Stop {
        node: String,
        why: String,
        provider: Option<String>,
    },
}

/// `pool` as it should be stored after this decision, and what to do.
pub fn decide(pool: &Pool, facts: &Facts<'_>, now: Millis) -> (Pool, Vec<Action>) {
    let mut next = pool.clone();
    let mut actions = Vec::new();
    let ready = |name: &str| {
        facts
            .nodes
            .get(name)
            .is_some_and(|n| n.state == NodeState::Ready)
    };
    let active = |name: &str| facts.active.get(name).copied().unwrap_or(0);
    let age = |since: Millis| now.saturating_sub(since);

    // A node of this pool's that is no member (one forgotten as never joined while its
    // machine was still coming up, or started by a `start` a restart cut short) is taken
    // back, to be drained and stopped: it would run for good as a node no pool manages.
    for (name, node) in facts.nodes {
        let numbered = name
            .strip_prefix(&format!("{}-", pool.name))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < pool.next);
        if numbered
            && node.labels.get(POOL_LABEL) == Some(&pool.name)
            && !pool.members.contains_key(name)
        {
            next.members.insert(
                name.clone(),
                PoolMember {
                    started_at: now,
                    start_returned_at: None,
                    empty_since: None,
                    retiring_since: Some(now),
                    started_by: None,
                    stopping_since: None,
                    stop_failed_at: None,
                    stop_failures: 0,
                    not_ready_since: None,
                    drain_asked_at: None,
                },
            );
            actions.push(Action::Drain {
                node: name.clone(),
                why: "it joined after the pool had given it up".into(),
            });
        }
    }

    for (name, member) in &pool.members {
        // Nothing is decided for a member while its provider runs.
        if facts.busy.contains(name) {
            continue;
        }
        // A joined node's time not Ready, from the first pass that saw it so.
        let not_ready_since = match facts.nodes.get(name) {
            Some(node) if node.state != NodeState::Ready => member.not_ready_since.or(Some(now)),
            _ => None,
        };
        if let Some(m) = next.members.get_mut(name) {
            m.not_ready_since = not_ready_since;
        }
        // A member whose stop failed and that is no node any more (deleted by hand, or it
        // never joined) is forgotten: there is nothing left of it to stop.
        if member.stop_failed_at.is_some() && !facts.nodes.contains_key(name) {
            next.members.remove(name);
            continue;
        }
        let why = if member.stopping_since.is_some() {
            // A stop decided before and not known to be done: cut short by a restart, or
            // failed, and then tried again later and later.
            match member.stop_failed_at {
                Some(failed) if age(failed) < stop_backoff(member.stop_failures) => None,
                Some(failed) => Some(format!(
                    "trying again: its provider's stop failed {} s ago",
                    age(failed) / 1000
                )),
                None => Some("its stop did not finish".to_string()),
            }
        } else if let Some(since) = member.retiring_since {
            // Empty for a while (or not Ready, so nothing reaches it): nothing is cut.
            let drained = active(name) == 0
                && (!ready(name)
                    || member
                        .empty_since
                        .is_some_and(|t| age(t) >= DRAINED_GRACE_MS));
            if !facts.nodes.contains_key(name) || drained {
                Some("drained".into())
            } else if age(since) > RETIRE_TIMEOUT_MS && active(name) > 0 {
                Some(format!(
                    "still running {} replicas {} s after its drain began",
                    active(name),
                    RETIRE_TIMEOUT_MS / 1000
                ))
            } else {
                None
            }
        } else if facts.gone.contains(name) {
            Some("its worker is not running".into())
        } else if not_ready_since.is_some_and(|t| age(t) > UNREADY_TIMEOUT_MS) {
            Some(format!(
                "not Ready for {} minutes",
                UNREADY_TIMEOUT_MS / 60_000
            ))
        } else if !facts.nodes.contains_key(name)
            && age(member
                .start_returned_at
                .map_or(member.started_at, |t| t.max(member.started_at)))
                > START_TIMEOUT_MS
        {
            next.start_failures = next.start_failures.saturating_add(1);
            next.start_failed_at = Some(now);
            Some(format!("never joined within {} s", START_TIMEOUT_MS / 1000))
        } else {
            None
        };
        let Some(why) = why else {
            // A drain that did not take (it failed, or the node was uncordoned by hand):
            // asked again, or the node would be stopped with its replicas on it.
            if member
                .drain_asked_at
                .or(member.retiring_since)
                .is_some_and(|since| age(since) >= DRAIN_RETRY_MS)
                && member.stopping_since.is_none()
                && facts.nodes.get(name).is_some_and(|n| n.schedulable)
            {
                actions.push(Action::Drain {
                    node: name.clone(),
                    why: "its drain did not take".into(),
                });
                if let Some(m) = next.members.get_mut(name) {
                    m.drain_asked_at = Some(now);
                }
            }
            continue;
        };
        let provider = match &member.started_by {
            Some(StartedBy::Local) => None,
            Some(StartedBy::Provider(command)) => Some(command.clone()),
            None => pool.spec.provider.clone(),
        };
        actions.push(Action::Stop {
            node: name.clone(),
            why,
            provider,
        });
        // A member until its stop is known to be done.
        if let Some(m) = next.members.get_mut(name) {
            m.stopping_since = Some(now);
            m.stop_failed_at = None;
        }
    }
    for (name, member) in next.members.iter_mut() {
        // A retiring node is idle once empty: the time it was movable before its drain
        // is no time it was empty.
        let idle = active(name) == 0 || (member.live() && facts.movable.contains(name));
        member.empty_since = match (ready(name) && idle, member.empty_since) {
            (true, since) => since.or(Some(now)),
            (false, _) => None,
        };
    }

    let live: Vec<&String> = next
        .members
        .iter()
        .filter(|(_, m)| m.live())
        .map(|(n, _)| n)
        .collect();
    // A node that joined ends a run of starts that failed.
    if live.iter().any(|n| ready(n)) {
        next.start_failures = 0;
        next.start_failed_at = None;
    }
    let backing_off = next
        .start_failed_at
        .is_some_and(|t| age(t) < start_backoff(next.start_failures));
    // Still joining, or joined a moment ago; a node that joined and is not Ready now (a
    // lost machine) holds nothing up.
    let settling = live.iter().any(|n| {
        facts
            .nodes
            .get(n.as_str())
            .is_none_or(|node| node.state == NodeState::Ready && age(node.joined_at) < SETTLE_MS)
    });
    // Every member counts against the maximum, those being drained or stopped too (a stop
    // that keeps failing holds a machine), as the cluster autoscaler counts deleting nodes.
    let held = next.members.len();
    let bounds = pool.spec.bounds(now);
    let (min, max) = (bounds.min as usize, bounds.max as usize);
    // The size of this pool's nodes, from one it runs; and the waiting replicas an empty
    // one would take (all of them, with no node to go by): one bigger than a whole node
    // starts none, or the pool would start and retire nodes for it forever.
    let seen = live
        .iter()
        .filter(|n| next.members[n.as_str()].started_at >= pool.workers_since)
        .find_map(|n| facts.nodes.get(n.as_str()))
        .map(|n| n.capacity.clone());
    if seen.is_some() {
        next.node_size = seen;
    }
    let size = next.node_size.clone();
    let size = size.as_ref();
    let fitting: Vec<&Capacity> = facts
        .pending
        .iter()
        .filter(|r| {
            size.is_none_or(|c| r.memory_bytes <= c.memory_bytes && r.cpu_millis <= c.cpu_millis)
        })
        .collect();
    let windows = match bounds.windows.as_slice() {
        [] => String::new(),
        names => format!(" (schedule window {})", names.join(", ")),
    };
    let mut start = |next: &mut Pool, why: String| {
        let node = format!("{}-{}", pool.name, next.next);
        next.next += 1;
        next.members.insert(
            node.clone(),
            PoolMember {
                started_at: now,
                start_returned_at: None,
                empty_since: None,
                retiring_since: None,
                started_by: Some(match &pool.spec.provider {
                    Some(command) => StartedBy::Provider(command.clone()),
                    None => StartedBy::Local,
                }),
                stopping_since: None,
                stop_failed_at: None,
                stop_failures: 0,
                not_ready_since: None,
                drain_asked_at: None,
            },
        );
        actions.push(Action::Start { node, why });
    };
    if live.len() < min {
        let room = match backing_off {
            true => 0,
            false => max.saturating_sub(held),
        };
        for _ in 0..(min - live.len()).min(room) {
            start(
                &mut next,
                format!("the pool keeps at least {min} nodes{windows}"),
            );
        }
    } else if !fitting.is_empty() && !settling && held < max && !backing_off {
        let waiting = facts.pending.len();
        let why = match facts.pending_why {
            Some(said) => format!("{waiting} replicas fit on no node ({said})"),
            None => format!("{waiting} replicas fit on no node"),
        };
        let mut asked = Capacity::default();
        for r in &fitting {
            asked.add(r);
        }
        let needed = size.map_or(1, |c| nodes_for(&asked, c));
        for _ in 0..needed.clamp(1, max - held) {
            start(&mut next, why.clone());
        }
    } else if live.len() > max {
        // Newest by start, not by name (`w-10` sorts before `w-9`).
        let mut by_start: Vec<&String> = live.clone();
        by_start.sort_by_key(|n| (next.members[n.as_str()].started_at, n.len(), n.as_str()));
        let newest: Vec<String> = by_start
            .iter()
            .rev()
            .take(live.len() - max)
            .map(|n| n.to_string())
            .collect();
        for node in newest {
            retire(
                &mut next,
                &mut actions,
                node,
                format!("the pool keeps at most {max} nodes{windows}"),
                now,
            );
        }
    } else if fitting.is_empty() {
        let cooldown = pool.spec.cooldown_ms;
        let idle: Vec<String> = live
            .iter()
            .filter(|n| {
                next.members[n.as_str()]
                    .empty_since
                    .is_some_and(|since| age(since) >= cooldown)
            })
            .take(live.len().saturating_sub(min))
            .map(|n| n.to_string())
            .collect();
        // Replicas that fit elsewhere move off one node at a time, and only while no other
        // node retires: each node was judged alone, with every other node there, and its
        // replicas may have room only on one that goes too. For the same reason an empty
        // node stays while replicas move off another: they may be on their way to it.
        // Members being stopped are out of it: their replicas are not moving anywhere.
        let draining = |m: &PoolMember| m.retiring_since.is_some() && m.stopping_since.is_none();
        let moving = next
            .members
            .iter()
            .any(|(n, m)| draining(m) && active(n) > 0);
        let mut retiring = next.members.values().any(draining);
        let (empty, loaded): (Vec<String>, Vec<String>) =
            idle.into_iter().partition(|n| active(n) == 0);
        if !moving {
            for node in empty {
                retiring = true;
                let why = format!("ran no replica for {} s", cooldown / 1000);
                retire(&mut next, &mut actions, node, why, now);
            }
        }
        if let Some(node) = loaded.into_iter().next().filter(|_| !retiring) {
            let why = format!(
                "its {} replicas have fit on other nodes for {} s",
                active(&node),
                cooldown / 1000
            );
            retire(&mut next, &mut actions, node, why, now);
        }
    }
    (next, actions)
}

/// How many nodes of capacity `node` the requests `asked` fill, by their scarcer resource.
fn nodes_for(asked: &Capacity, node: &Capacity) -> usize {
    let fill = |asked: u64, has: u64| {
        if has == 0 {
            1
        } else {
            asked.div_ceil(has) as usize
        }
    };
    fill(asked.memory_bytes, node.memory_bytes).max(fill(asked.cpu_millis, node.cpu_millis))
}

fn retire(next: &mut Pool, actions: &mut Vec<Action>, node: String, why: String, now: Millis) {
    if let Some(m) = next.members.get_mut(&node) {
        m.retiring_since = Some(now);
        m.drain_asked_at = None;
        m.empty_since = None;
    }
    actions.push(Action::Drain { node, why });
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Capacity, PoolSpec};

    const NOW: Millis = 1_000_000;

    fn pool(min: u32, max: u32) -> Pool {
        Pool {
            name: "w".into(),
            spec: PoolSpec {
                min,
                max,
                provider: None,
                cooldown_ms: 30_000,
                labels: BTreeMap::new(),
                node_args: Vec::new(),
                schedule: Vec::new(),
            },
            members: BTreeMap::new(),
            next: 1,
            created_at: 0,
            node_size: None,
            start_failures: 0,
            start_failed_at: None,
            workers_since: 0,
        }
    }

    fn member(started_at: Millis) -> PoolMember {
        PoolMember {
            started_at,
            start_returned_at: None,
            empty_since: None,
            retiring_since: None,
            started_by: None,
            stopping_since: None,
            stop_failed_at: None,
            stop_failures: 0,
            not_ready_since: None,
            drain_asked_at: None,
        }
    }

    fn node(name: &str, joined_at: Millis) -> (String, Node) {
        (
            name.to_string(),
            Node {
                name: name.into(),
                gateway: "127.0.0.1:1".into(),
                capacity: Capacity {
                    cpu_millis: 2000,
                    memory_bytes: 1 << 30,
                    instances: 1000,
                },
                labels: BTreeMap::new(),
                state: NodeState::Ready,
                schedulable: true,
                draining: false,
                leaving: None,
                joined_at,
                label_overrides: BTreeMap::new(),
            },
        )
    }

    /// `n` waiting replicas of 100Mi each.
    fn waiting(n: usize) -> Vec<Capacity> {
        vec![
            Capacity {
                memory_bytes: 100 << 20,
                ..Capacity::default()
            };
            n
        ]
    }

    fn facts<'a>(
        nodes: &'a BTreeMap<String, Node>,
        active: &'a BTreeMap<String, usize>,
        pending: &'a [Capacity],
    ) -> Facts<'a> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        Facts {
            nodes,
            active,
            pending,
            pending_why: Some("0/1 nodes available: 1 insufficient memory"),
            movable: &NONE,
            gone: &NONE,
            busy: &NONE,
        }
    }

    /// The members counted among the pool's nodes.
    fn live(p: &Pool) -> Vec<&str> {
        p.members
            .iter()
            .filter(|(_, m)| m.live())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Start { node, .. } => format!("start {node}"),
                Action::Drain { node, .. } => format!("drain {node}"),
                Action::Stop { node, .. } => format!("stop {node}"),
            })
            .collect()
    }

    #[test]
    fn each_waiting_replica_grows_one_pool_the_first_that_carries_its_labels_and_may_grow() {
        let labelled = |name: &str, max: u32, labels: &[(&str, &str)]| {
            let mut p = pool(0, max);
            p.name = name.into();
            p.spec.labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            p
        };
        let mut full = labelled("a-full", 1, &[("size", "big")]);
        full.members.insert("a-full-1".into(), member(0));
        let pools = [
            labelled("c-small", 5, &[("size", "small")]),
            labelled("b-big", 5, &[("size", "big"), ("zone", "1")]),
            full,
        ];
        let nodes: BTreeMap<String, Node> = [node("a-full-1", 0)].into();
        let asks = Capacity {
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            instances: 1,
        };
        let selector = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (any, big, small, by_name, nowhere) = (
            selector(&[]),
            selector(&[("size", "big")]),
            selector(&[("size", "small")]),
            selector(&[(POOL_LABEL, "c-small")]),
            selector(&[("size", "huge")]),
        );
        let huge = Capacity {
            memory_bytes: 4 << 30,
            ..asks.clone()
        };
        let waiting = |selector, asks: &Capacity| Waiting {
            asks: asks.clone(),
            instance_memory: 0,
            node_selector: selector,
        };
        let got = assign(
            &pools,
            &nodes,
            &[
                // Anything: the first pool by name that may grow (a-full is at its max).
                waiting(&any, &asks),
                // size=big: a-full carries it but is full, so b-big.
                waiting(&big, &asks),
                waiting(&small, &asks),
                waiting(&by_name, &asks),
                // No pool carries size=huge: no pool grows for it.
                waiting(&nowhere, &asks),
                // Bigger than a-full's node, the only one known: the others may be bigger.
                waiting(&any, &huge),
            ],
            NOW,
        );
        let count = |pool: &str| got[pool].len();
        assert_eq!(
            (count("a-full"), count("b-big"), count("c-small")),
            (0, 3, 2)
        );
        // A pool at its max still takes what only it could hold, so that it is no other's.
        let got = assign(&pools[2..], &nodes, &[waiting(&big, &asks)], NOW);
        assert_eq!(got["a-full"].len(), 1);
    }

    #[test]
    fn a_pool_starts_its_minimum_then_grows_one_settled_node_at_a_time() {
        let (none, idle) = (BTreeMap::new(), BTreeMap::new());
        let (p, a) = decide(&pool(1, 3), &facts(&none, &idle, &waiting(0)), NOW);
        assert_eq!(names(&a), ["start w-1"]);
        assert_eq!(p.next, 2);
        assert!(p.members.contains_key("w-1"));

        // Replicas wait while w-1 is still joining: nothing more yet.
        let (p, a) = decide(&p, &facts(&none, &idle, &waiting(5)), NOW + 1000);
        assert!(a.is_empty(), "{a:?}");
        // Joined, but just now: the controller gets its pass first.
        let nodes: BTreeMap<_, _> = [node("w-1", NOW + 1000)].into();
        let (p, a) = decide(&p, &facts(&nodes, &idle, &waiting(5)), NOW + 2000);
        assert!(a.is_empty(), "{a:?}");
        let (p, a) = decide(
            &p,
            &facts(&nodes, &idle, &waiting(5)),
            NOW + 1000 + SETTLE_MS,
        );
        assert_eq!(names(&a), ["start w-2"]);
        match &a[0] {
            Action::Start { why, .. } => {
                assert!(why.contains("5 replicas fit on no node (0/1"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // 25 replicas of 100Mi waiting, nodes of 1Gi: three more, as many as max allows.
        let sized: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let mut big = pool(0, 10);
        big.members.insert("w-1".into(), member(0));
        big.members.insert("w-2".into(), member(0));
        big.next = 3;
        let (_, a) = decide(&big, &facts(&sized, &idle, &waiting(25)), NOW);
        assert_eq!(names(&a), ["start w-3", "start w-4", "start w-5"]);
        big.spec.max = 3;
        let (_, a) = decide(&big, &facts(&sized, &idle, &waiting(25)), NOW);
        assert_eq!(names(&a), ["start w-3"]);
        // At max, no more.
        let mut full = p.clone();
        full.members.insert("w-3".into(), member(NOW));
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0), node("w-3", 0)].into();
        let (_, a) = decide(&full, &facts(&nodes, &idle, &waiting(5)), NOW + 100_000);
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn an_idle_node_is_drained_after_the_cooldown_then_stopped_once_empty() {
        let mut p = pool(1, 3);
        p.members.insert("w-1".into(), member(0));
        p.members.insert("w-2".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let busy: BTreeMap<_, _> = [("w-1".to_string(), 2), ("w-2".to_string(), 1)].into();
        let (p, a) = decide(&p, &facts(&nodes, &busy, &waiting(0)), NOW);
        assert!(a.is_empty());
        assert!(p.members.values().all(|m| m.empty_since.is_none()));

        let idle = BTreeMap::new();
        let (p, a) = decide(&p, &facts(&nodes, &idle, &waiting(0)), NOW);
        assert!(a.is_empty());
        assert_eq!(p.members["w-1"].empty_since, Some(NOW));
        // Cool-down over: one goes (the pool keeps its minimum of one).
        let (p, a) = decide(&p, &facts(&nodes, &idle, &waiting(0)), NOW + 30_000);
        assert_eq!(names(&a), ["drain w-1"]);
        assert_eq!(p.members["w-1"].retiring_since, Some(NOW + 30_000));
        // Drained and empty: stopped and forgotten, once empty for a grace period (gateways
        // elsewhere may still send it requests).
        let (p, a) = decide(&p, &facts(&nodes, &idle, &waiting(0)), NOW + 31_000);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(p.members["w-1"].empty_since, Some(NOW + 31_000));
        let (p, a) = decide(
            &p,
            &facts(&nodes, &idle, &waiting(0)),
            NOW + 31_000 + DRAINED_GRACE_MS - 1,
        );
        assert!(a.is_empty(), "{a:?}");
        let (p, a) = decide(
            &p,
            &facts(&nodes, &idle, &waiting(0)),
            NOW + 31_000 + DRAINED_GRACE_MS,
        );
        assert_eq!(names(&a), ["stop w-1"]);
        assert_eq!(live(&p), ["w-2"]);
        assert!(
            p.members["w-1"].stopping_since.is_some(),
            "a member until stopped"
        );
        // Work waiting keeps idle nodes.
        let (_, a) = decide(&p, &facts(&nodes, &idle, &waiting(3)), NOW + 100_000);
        assert!(!names(&a).iter().any(|a| a.starts_with("drain")), "{a:?}");
    }

    /// An app asking for (and limited to) `memory`.
    fn asking(memory: &str) -> shoal_core::spec::AppSpec {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"x\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/x\"]\n[resources]\n\
             requests = {{ memory = \"{memory}\" }}\nlimits = {{ memory = \"{memory}\" }}\n"
        );
        let parsed = shoal_core::spec::parse_app(&src).unwrap();
        parsed.resolve(digest).unwrap()
    }

    fn placed<'a>(node: &'a str, s: &'a shoal_core::spec::AppSpec, pinned: bool) -> Placed<'a> {
        static APP: std::sync::LazyLock<AppKey> =
            std::sync::LazyLock::new(|| AppKey::new("default", "x"));
        Placed {
            node,
            app: &APP,
            request: Request::new(&s.resources, &s.placement),
            pinned,
        }
    }

    #[test]
    fn a_node_whose_replicas_fit_elsewhere_is_movable_unless_one_is_pinned() {
        let nodes: BTreeMap<_, _> = [node("a", 0), node("w-1", 0)].into();
        let (small, big) = (asking("100Mi"), asking("450Mi"));
        let judge = |replicas: &[Placed<'_>]| movable(&nodes, replicas, ["w-1"], Strategy::Spread);
        let two = [placed("w-1", &small, false), placed("w-1", &small, false)];
        assert_eq!(judge(&two), BTreeSet::from(["w-1".to_string()]));
        // `a` (1 GiB) has room for one of them, not both.
        let full = [
            placed("a", &big, false),
            placed("a", &big, false),
            placed("w-1", &small, false),
            placed("w-1", &small, false),
        ];
        assert!(judge(&full).is_empty());
        // A pinned one stays, and so does its node.
        let pinned = [placed("w-1", &small, false), placed("w-1", &small, true)];
        assert!(judge(&pinned).is_empty());
        // An empty node is no candidate: it is idle anyway.
        assert!(judge(&[]).is_empty());
    }

    #[test]
    fn nodes_kept_up_by_replicas_that_fit_elsewhere_are_drained_one_at_a_time() {
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(0));
        p.members.insert("w-2".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let busy: BTreeMap<_, _> = [("w-1".to_string(), 2), ("w-2".to_string(), 1)].into();
        let movable: BTreeSet<String> = ["w-1".to_string(), "w-2".to_string()].into();
        let mut f = facts(&nodes, &busy, &[]);
        f.movable = &movable;
        let (p, a) = decide(&p, &f, NOW);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(p.members["w-1"].empty_since, Some(NOW));
        let (p, a) = decide(&p, &f, NOW + 30_000);
        assert_eq!(names(&a), ["drain w-1"]);
        let Action::Drain { why, .. } = &a[0] else {
            unreachable!()
        };
        assert_eq!(why, "its 2 replicas have fit on other nodes for 30 s");
        // While w-1 drains, w-2 waits its turn.
        let (p, a) = decide(&p, &f, NOW + 31_000);
        assert!(a.is_empty(), "{a:?}");
        // Not movable any more (w-1 gone, nowhere to go): w-2 is kept.
        let none = BTreeSet::new();
        f.movable = &none;
        let idle: BTreeMap<_, _> = [("w-2".to_string(), 1)].into();
        f.active = &idle;
        let (p, a) = decide(&p, &f, NOW + 32_000);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(p.members["w-2"].empty_since, None);
        let (_, a) = decide(&p, &f, NOW + 32_000 + DRAINED_GRACE_MS);
        assert_eq!(names(&a), ["stop w-1"]);
    }

    #[test]
    fn a_member_whose_worker_is_gone_is_stopped_and_replaced_at_once() {
        let mut p = pool(1, 3);
        p.members.insert("w-1".into(), member(NOW - 1_000));
        p.next = 2;
        let nodes: BTreeMap<_, _> = [node("w-1", NOW - 1_000)].into();
        let gone: BTreeSet<String> = ["w-1".to_string()].into();
        let idle = BTreeMap::new();
        let mut f = facts(&nodes, &idle, &[]);
        f.gone = &gone;
        let (p, a) = decide(&p, &f, NOW);
        assert_eq!(names(&a), ["stop w-1", "start w-2"]);
        assert_eq!(live(&p), ["w-2"]);
    }

    #[test]
    fn a_replica_bigger_than_the_pools_nodes_neither_grows_nor_keeps_it() {
        let mut p = pool(0, 5);
        p.members.insert("w-1".into(), member(0));
        p.next = 2;
        let nodes: BTreeMap<_, _> = [node("w-1", 0)].into();
        let idle = BTreeMap::new();
        let huge = [Capacity {
            memory_bytes: 4 << 30,
            ..Capacity::default()
        }];
        let (p, a) = decide(&p, &facts(&nodes, &idle, &huge), NOW);
        assert!(a.is_empty(), "{a:?}");
        let (_, a) = decide(&p, &facts(&nodes, &idle, &huge), NOW + 30_000);
        assert_eq!(names(&a), ["drain w-1"]);
    }

    #[test]
    fn a_schedule_window_sets_the_pools_bounds_while_it_is_open() {
        // 2026-11-30 09:30 UTC, inside a business-hours window of 09:00-10:00 UTC.
        const HALF_NINE: Millis = 1_796_031_000_000;
        let src = "name = \"w\"\nmax = 3\n[[schedule]]\nname = \"day\"\ncron = \"0 9 * * *\"\nduration = \"1h\"\nmin = 2\n";
        let (_, spec) = shoal_core::spec::parse_pool(src).unwrap();
        let mut p = pool(0, 3);
        p.spec = spec;
        let (none, idle) = (BTreeMap::new(), BTreeMap::new());
        let (open, a) = decide(&p, &facts(&none, &idle, &waiting(0)), HALF_NINE);
        assert_eq!(names(&a), ["start w-1", "start w-2"]);
        match &a[0] {
            Action::Start { why, .. } => {
                assert_eq!(why, "the pool keeps at least 2 nodes (schedule window day)")
            }
            other => panic!("{other:?}"),
        }
        // Closed (an hour later) and idle for the default cool-down of 5m: back to none.
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let later = HALF_NINE + 3_600_000;
        let (p, _) = decide(&open, &facts(&nodes, &idle, &waiting(0)), later);
        let (_, a) = decide(&p, &facts(&nodes, &idle, &waiting(0)), later + 300_000);
        assert_eq!(names(&a), ["drain w-1", "drain w-2"]);
    }

    #[test]
    fn nodes_that_never_join_are_stopped_and_a_lower_max_drains_the_newest() {
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(NOW));
        p.next = 2;
        let (none, idle) = (BTreeMap::new(), BTreeMap::new());
        let (p, a) = decide(
            &p,
            &facts(&none, &idle, &waiting(0)),
            NOW + START_TIMEOUT_MS + 1,
        );
        assert_eq!(names(&a), ["stop w-1"]);
        assert!(live(&p).is_empty());
        // With work waiting, a new one is tried in its place, under a new name.
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(NOW));
        p.next = 2;
        let (_, a) = decide(
            &p,
            &facts(&none, &idle, &waiting(1)),
            NOW + START_TIMEOUT_MS + 1,
        );
        assert_eq!(names(&a), ["stop w-1", "start w-2"]);

        let mut p = pool(0, 1);
        p.members.insert("w-1".into(), member(0));
        p.members.insert("w-2".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let busy: BTreeMap<_, _> = [("w-1".to_string(), 1), ("w-2".to_string(), 1)].into();
        let (_, a) = decide(&p, &facts(&nodes, &busy, &waiting(0)), NOW);
        assert_eq!(names(&a), ["drain w-2"]);
    }

    /// An empty node and a node whose replicas would fit only on it both look idle; draining
    /// both at once would leave those replicas nowhere. The empty one goes first, and the
    /// other waits for the next pass with no node retiring (when it is judged again).
    #[test]
    fn an_idle_node_and_one_whose_replicas_fit_only_there_are_not_drained_together() {
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(0));
        p.members.insert("w-2".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let on_w2: BTreeMap<_, _> = [("w-2".to_string(), 1)].into();
        let movable: BTreeSet<String> = ["w-2".to_string()].into();
        let mut f = facts(&nodes, &on_w2, &[]);
        f.movable = &movable;
        let (p, a) = decide(&p, &f, NOW);
        assert!(a.is_empty(), "{a:?}");
        let (p, a) = decide(&p, &f, NOW + 30_000);
        assert_eq!(names(&a), ["drain w-1"]);
        // While w-1 retires, w-2 stays, whatever it looked like.
        let (_, a) = decide(&p, &f, NOW + 31_000);
        assert!(a.is_empty(), "{a:?}");

        // Replicas on their way off a retiring node keep an empty one up: they may go there.
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(0));
        p.members.insert("w-2".into(), member(0));
        p.members.get_mut("w-1").unwrap().empty_since = Some(0);
        p.members.get_mut("w-2").unwrap().retiring_since = Some(NOW);
        let (_, a) = decide(&p, &facts(&nodes, &on_w2, &[]), NOW + 1_000);
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn a_retiring_node_that_is_not_ready_is_stopped_once_empty_without_a_grace() {
        let mut p = pool(0, 3);
        let mut m = member(0);
        m.retiring_since = Some(NOW);
        p.members.insert("w-1".into(), m);
        let (mut lost, idle) = (BTreeMap::from([node("w-1", 0)]), BTreeMap::new());
        lost.get_mut("w-1").unwrap().state = NodeState::NotReady;
        let (_, a) = decide(&p, &facts(&lost, &idle, &[]), NOW + 1_000);
        assert_eq!(names(&a), ["stop w-1"]);
        // Ready and emptied just before the drain's time is up: it gets its grace all the
        // same (the drain did finish).
        let mut ready = BTreeMap::from([node("w-1", 0)]);
        ready.get_mut("w-1").unwrap().schedulable = false;
        let late = NOW + RETIRE_TIMEOUT_MS + 1;
        let mut p = p.clone();
        p.members.get_mut("w-1").unwrap().empty_since = Some(late - 1_000);
        let (_, a) = decide(&p, &facts(&ready, &idle, &[]), late);
        assert!(a.is_empty(), "{a:?}");
        let (_, a) = decide(
            &p,
            &facts(&ready, &idle, &[]),
            late - 1_000 + DRAINED_GRACE_MS,
        );
        assert_eq!(names(&a), ["stop w-1"]);
    }

    /// A provider may take minutes to make a machine: the time to join counts from when its
    /// `start` returned, and nothing is decided for a member while its provider runs.
    #[test]
    fn the_time_to_join_counts_from_when_the_providers_start_returned() {
        let mut p = pool(1, 3);
        p.spec.provider = Some("./cloud".into());
        p.members.insert("w-1".into(), member(NOW));
        p.next = 2;
        let (none, idle) = (BTreeMap::new(), BTreeMap::new());
        let late = NOW + START_TIMEOUT_MS + 1;
        let busy: BTreeSet<String> = ["w-1".to_string()].into();
        let mut f = facts(&none, &idle, &[]);
        f.busy = &busy;
        let (_, a) = decide(&p, &f, late);
        assert!(a.is_empty(), "{a:?}");
        p.members.get_mut("w-1").unwrap().start_returned_at = Some(NOW + 90_000);
        let f = facts(&none, &idle, &[]);
        let (_, a) = decide(&p, &f, NOW + 90_000 + START_TIMEOUT_MS);
        assert!(a.is_empty(), "{a:?}");
        let (_, a) = decide(&p, &f, NOW + 90_000 + START_TIMEOUT_MS + 1);
        assert_eq!(names(&a), ["stop w-1", "start w-2"]);
        match &a[0] {
            Action::Stop { why, provider, .. } => {
                assert_eq!(why, "never joined within 60 s");
                assert_eq!(provider.as_deref(), Some("./cloud"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A member whose provider's `stop` failed stays one, out of the count and out of the
    /// way of other drains, and is stopped again later and later with what started it, even
    /// after the pool's provider changed; a stop decided and never done (a restart) is made
    /// again at once.
    #[test]
    fn a_member_whose_stop_failed_is_stopped_again_with_what_started_it() {
        let mut p = pool(1, 3);
        p.spec.provider = Some("./new".into());
        let mut m = member(0);
        m.retiring_since = Some(NOW);
        m.stopping_since = Some(NOW);
        m.stop_failed_at = Some(NOW);
        m.stop_failures = 2;
        m.started_by = Some(StartedBy::Provider("./old".into()));
        p.members.insert("w-1".into(), m);
        p.next = 2;
        let nodes: BTreeMap<_, _> = [node("w-1", 0)].into();
        let idle = BTreeMap::new();
        let (p, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW + 1_000);
        assert_eq!(names(&a), ["start w-2"], "the failed one does not count");
        assert_eq!(
            p.members["w-2"].started_by,
            Some(StartedBy::Provider("./new".into()))
        );
        // The second failure in a row waits twice the first's.
        let (_, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW + STOP_RETRY_MS);
        assert!(a.is_empty(), "{a:?}");
        let (next, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW + 2 * STOP_RETRY_MS);
        assert_eq!(names(&a), ["stop w-1"]);
        let Action::Stop { provider, why, .. } = &a[0] else {
            unreachable!()
        };
        assert_eq!(provider.as_deref(), Some("./old"));
        assert!(why.contains("stop failed 20 s ago"), "{why}");
        assert_eq!(
            next.members["w-1"].stopping_since,
            Some(NOW + 2 * STOP_RETRY_MS)
        );
        assert_eq!(next.members["w-1"].stop_failed_at, None);
        // While its provider runs, nothing; once it is not known to run (a restart cut it
        // short), again.
        let busy: BTreeSet<String> = ["w-1".to_string()].into();
        let mut f = facts(&nodes, &idle, &[]);
        f.busy = &busy;
        let (_, a) = decide(&next, &f, NOW + 3 * STOP_RETRY_MS);
        assert!(a.is_empty(), "{a:?}");
        let (_, a) = decide(&next, &facts(&nodes, &idle, &[]), NOW + 3 * STOP_RETRY_MS);
        assert_eq!(names(&a), ["stop w-1"]);
        // A local worker is stopped as one, whatever the provider now.
        let mut local = next.clone();
        local.members.get_mut("w-1").unwrap().started_by = Some(StartedBy::Local);
        let (_, a) = decide(&local, &facts(&nodes, &idle, &[]), NOW + 3 * STOP_RETRY_MS);
        assert!(
            matches!(&a[..], [Action::Stop { provider: None, .. }]),
            "{a:?}"
        );

        // A member being stopped holds no drain up: an empty node and a movable one go.
        let mut p = pool(0, 5);
        let mut stuck = member(0);
        stuck.retiring_since = Some(0);
        stuck.stopping_since = Some(0);
        stuck.stop_failed_at = Some(NOW);
        stuck.stop_failures = 1;
        p.members.insert("w-1".into(), stuck);
        for n in ["w-2", "w-3", "w-4"] {
            let mut m = member(0);
            m.empty_since = Some(0);
            p.members.insert(n.into(), m);
        }
        let nodes: BTreeMap<_, _> = ["w-1", "w-2", "w-3", "w-4"]
            .into_iter()
            .map(|n| node(n, 0))
            .collect();
        let active: BTreeMap<_, _> = [("w-1".to_string(), 1), ("w-3".to_string(), 1)].into();
        let movable: BTreeSet<String> = ["w-3".to_string()].into();
        let mut f = facts(&nodes, &active, &[]);
        f.movable = &movable;
        let (_, a) = decide(&p, &f, NOW + 1_000);
        assert_eq!(names(&a), ["drain w-2", "drain w-4"]);
        let mut f2 = facts(&nodes, &active, &[]);
        f2.movable = &movable;
        let only_w3: BTreeMap<_, _> = [("w-1".to_string(), 1), ("w-3".to_string(), 1)].into();
        f2.active = &only_w3;
        p.members.remove("w-2");
        p.members.remove("w-4");
        let (_, a) = decide(&p, &f2, NOW + 1_000);
        assert_eq!(names(&a), ["drain w-3"]);
    }

    /// A replica whose instances may use more memory than a node of the pool has never grows
    /// it, and a pool that runs no node goes by the size of the last one it ran.
    #[test]
    fn a_replica_no_node_of_the_pool_could_take_is_no_pools() {
        let mut p = pool(0, 5);
        p.members.insert("w-1".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-1", 0)].into();
        let any = BTreeMap::new();
        let small = Capacity {
            memory_bytes: 100 << 20,
            ..Capacity::default()
        };
        let wide = Waiting {
            asks: small.clone(),
            instance_memory: 2 << 30,
            node_selector: &any,
        };
        let got = assign(
            std::slice::from_ref(&p),
            &nodes,
            std::slice::from_ref(&wide),
            NOW,
        );
        assert!(got["w"].is_empty(), "{got:?}");
        // Its node gone, the pool remembers what one holds.
        let (mut p, _) = decide(&p, &facts(&nodes, &BTreeMap::new(), &[]), NOW);
        assert_eq!(p.node_size, Some(nodes["w-1"].capacity.clone()));
        p.members.clear();
        let none = BTreeMap::new();
        let got = assign(std::slice::from_ref(&p), &none, &[wide], NOW);
        assert!(got["w"].is_empty(), "{got:?}");
        let fits = Waiting {
            asks: small,
            instance_memory: 0,
            node_selector: &any,
        };
        let got = assign(std::slice::from_ref(&p), &none, &[fits], NOW);
        assert_eq!(got["w"].len(), 1);
    }

    /// Members being stopped count against the maximum (a stop that keeps failing holds a
    /// machine), not toward the minimum.
    #[test]
    fn members_being_stopped_count_against_the_maximum() {
        let mut p = pool(1, 2);
        let mut stuck = member(0);
        stuck.stopping_since = Some(NOW);
        stuck.stop_failed_at = Some(NOW);
        stuck.stop_failures = 1;
        p.members.insert("w-1".into(), stuck);
        p.members.insert("w-2".into(), member(0));
        p.next = 3;
        let nodes: BTreeMap<_, _> = [node("w-1", 0), node("w-2", 0)].into();
        let full: BTreeMap<_, _> = [("w-2".to_string(), 5)].into();
        let (_, a) = decide(&p, &facts(&nodes, &full, &waiting(5)), NOW + 1_000);
        assert!(a.is_empty(), "at its max of 2 with one stuck: {a:?}");
        let got = assign(std::slice::from_ref(&p), &nodes, &[], NOW);
        assert!(got["w"].is_empty());
        // The minimum is of live nodes, but never past the maximum.
        p.members.remove("w-2");
        let (_, a) = decide(&p, &facts(&nodes, &full, &[]), NOW + 1_000);
        assert_eq!(names(&a), ["start w-3"]);
        p.spec.max = 1;
        let (_, a) = decide(&p, &facts(&nodes, &full, &[]), NOW + 1_000);
        assert!(a.is_empty(), "{a:?}");
    }

    /// A node that joined and then stopped answering is stopped only after a while, not at
    /// a missed heartbeat, and meanwhile holds no growth up.
    #[test]
    fn a_node_not_ready_for_a_while_is_stopped_and_holds_nothing_up_meanwhile() {
        let mut p = pool(0, 3);
        p.members.insert("w-1".into(), member(0));
        p.next = 2;
        let mut nodes: BTreeMap<_, _> = [node("w-1", 0)].into();
        nodes.get_mut("w-1").unwrap().state = NodeState::NotReady;
        let idle = BTreeMap::new();
        let (p, a) = decide(&p, &facts(&nodes, &idle, &waiting(1)), NOW);
        assert_eq!(
            names(&a),
            ["start w-2"],
            "a lost node is not still settling"
        );
        assert_eq!(p.members["w-1"].not_ready_since, Some(NOW));
        let (_, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW + UNREADY_TIMEOUT_MS);
        assert!(!names(&a).contains(&"stop w-1".to_string()), "{a:?}");
        let (_, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW + UNREADY_TIMEOUT_MS + 1);
        assert!(names(&a).contains(&"stop w-1".to_string()), "{a:?}");
        // Ready again in between: the count starts over.
        nodes.get_mut("w-1").unwrap().state = NodeState::Ready;
        let (p, _) = decide(&p, &facts(&nodes, &idle, &[]), NOW + 1_000);
        assert_eq!(p.members["w-1"].not_ready_since, None);
    }

    /// A node of the pool's that is no member (given up as never joined while its machine
    /// came up) is taken back and drained; a member whose failed stop left no node is
    /// forgotten; a drain that did not take is asked again; the newest is by start.
    #[test]
    fn strays_are_taken_back_and_what_is_gone_is_forgotten() {
        let mut p = pool(0, 5);
        p.next = 12;
        let mut stray = node("w-3", 0);
        stray.1.labels.insert(POOL_LABEL.into(), "w".into());
        let mut other = node("w-20", 0);
        other.1.labels.insert(POOL_LABEL.into(), "w".into());
        let nodes: BTreeMap<_, _> = [stray, other, node("w-4", 0)].into();
        let idle = BTreeMap::new();
        let (next, a) = decide(&p, &facts(&nodes, &idle, &[]), NOW);
        assert_eq!(
            names(&a),
            ["drain w-3"],
            "w-20 is no name it gave, w-4 has no label"
        );
        assert!(next.members["w-3"].retiring_since.is_some());

        let mut failed = member(0);
        failed.stopping_since = Some(NOW);
        failed.stop_failed_at = Some(NOW);
        failed.stop_failures = 1;
        p.members.insert("w-5".into(), failed);
        let (next, a) = decide(&p, &facts(&BTreeMap::new(), &idle, &[]), NOW + 1_000);
        assert!(a.is_empty(), "{a:?}");
        assert!(!next.members.contains_key("w-5"));

        let mut p = pool(0, 5);
        let mut retiring = member(0);
        retiring.retiring_since = Some(NOW);
        p.members.insert("w-6".into(), retiring);
        let nodes: BTreeMap<_, _> = [node("w-6", 0)].into();
        let busy: BTreeMap<_, _> = [("w-6".to_string(), 1)].into();
        let (next, a) = decide(&p, &facts(&nodes, &busy, &[]), NOW + DRAIN_RETRY_MS);
        assert_eq!(names(&a), ["drain w-6"]);
        // Asked again every DRAIN_RETRY_MS while it does not take, not at every pass.
        let (_, a) = decide(
            &next,
            &facts(&nodes, &busy, &[]),
            NOW + DRAIN_RETRY_MS + 1_000,
        );
        assert!(a.is_empty(), "{a:?}");
        let (_, a) = decide(&next, &facts(&nodes, &busy, &[]), NOW + 2 * DRAIN_RETRY_MS);
        assert_eq!(names(&a), ["drain w-6"]);

        let mut p = pool(0, 1);
        p.members.insert("w-10".into(), member(NOW));
        p.members.insert("w-9".into(), member(0));
        let nodes: BTreeMap<_, _> = [node("w-9", 0), node("w-10", 0)].into();
        let busy: BTreeMap<_, _> = [("w-9".to_string(), 1), ("w-10".to_string(), 1)].into();
        let (_, a) = decide(&p, &facts(&nodes, &busy, &[]), NOW);
        assert_eq!(names(&a), ["drain w-10"]);
    }

    /// Nodes that never join, one after another, are started later and later; one that
    /// joins ends the run.
    #[test]
    fn starts_that_keep_failing_back_off() {
        let (none, idle) = (BTreeMap::new(), BTreeMap::new());
        let mut p = pool(1, 3);
        p.members.insert("w-1".into(), member(NOW));
        p.next = 2;
        let late = NOW + START_TIMEOUT_MS + 1;
        // The first failure: tried again at once.
        let (p, a) = decide(&p, &facts(&none, &idle, &[]), late);
        assert_eq!(names(&a), ["stop w-1", "start w-2"]);
        assert_eq!(p.start_failures, 1);
        // The second: 30 s before the next try.
        let mut p = p;
        p.members.clear();
        p.members.insert("w-2".into(), member(late));
        let later = late + START_TIMEOUT_MS + 1;
        let (p, a) = decide(&p, &facts(&none, &idle, &[]), later);
        assert_eq!(names(&a), ["stop w-2"]);
        assert_eq!(p.start_failures, 2);
        let mut p = p;
        p.members.clear();
        let (_, a) = decide(&p, &facts(&none, &idle, &[]), later + 29_999);
        assert!(a.is_empty(), "{a:?}");
        // Replicas waiting grow it no sooner.
        let mut grow = p.clone();
        grow.spec.min = 0;
        let (_, a) = decide(&grow, &facts(&none, &idle, &waiting(3)), later + 29_999);
        assert!(a.is_empty(), "{a:?}");
        let (p, a) = decide(&p, &facts(&none, &idle, &[]), later + 30_000);
        assert_eq!(names(&a), ["start w-3"]);
        // It joins: the run is over.
        let nodes: BTreeMap<_, _> = [node("w-3", later)].into();
        let (p, _) = decide(&p, &facts(&nodes, &idle, &[]), later + 40_000);
        assert_eq!((p.start_failures, p.start_failed_at), (0, None));
        assert_eq!(start_backoff(40), 1_800_000);
    }
}
