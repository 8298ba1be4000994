//! Placement as a pipeline: cheap filters that record why each node was
//! rejected, then scorers over the survivors.
//!
//! Filters, cheapest first: the node is Ready, not cordoned, carries the
//! app's node selector labels, holds no replica of the app when spread is
//! required, has the memory the replica requests, offers at least the memory
//! one of its instances may use (`limits.memory`: a node offers its memory
//! budget, so one with less could never start an instance), and has the cpu
//! the replica requests. Instance slots
//! are not a dimension: a replica's `max_concurrency` caps it, the node's
//! pool is shared and held only while a request runs, so placement reserves
//! none (see [`Capacity::of`]).
//! Scorers: balance (fewer replicas of the app first) dominates fit (the
//! cluster's [`Strategy`]), so an app's replicas land on distinct nodes
//! whenever capacity allows, even when bin-packing. Ties go to the lowest
//! node name.
//!
//! [`place`] decides one replica; [`Cluster`] keeps one pass's bookkeeping so
//! the controller places many in O(replicas × nodes) without rebuilding node
//! lists per replica.

use shoal_core::spec::{self, AppKey, Spread};
use shoal_core::{Capacity, Node, NodeState};
use std::collections::{BTreeMap, HashMap};

/// Score per replica of the app already on a node. Fit is in [0, 2], so one
/// replica fewer always beats any difference in fit.
const BALANCE_WEIGHT: f64 = 4.0;

/// A node as [`place`] sees it: the node plus what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo<'a> {
    pub node: &'a Node,
    /// What active replicas (of any app) reserve on it.
    pub allocated: Capacity,
    /// Active replicas of the app being placed that are already on it.
    pub app_replicas: usize,
}

/// What one replica needs from a node.
#[derive(Debug, Clone)]
pub struct Request<'r> {
    /// What it reserves: see [`Capacity::of`].
    pub resources: Capacity,
    /// The memory one of its instances may use: the node's memory must be at least that.
    pub instance_memory: u64,
    /// Labels the node must carry, all of them, with these values.
    pub node_selector: &'r BTreeMap<String, String>,
    pub spread: Spread,
}

impl<'r> Request<'r> {
    /// A replica with `resources`, placed as its app's spec says.
    pub fn new(resources: &spec::Resources, placement: &'r spec::Placement) -> Self {
        Request {
            resources: Capacity::of(resources),
            instance_memory: resources.limits.memory_bytes,
            node_selector: &placement.node_selector,
            spread: placement.spread,
        }
    }
}

/// How the cluster fills its nodes; the balance of each app comes first either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Most-allocated first: fill nodes so whole ones stay free.
    #[default]
    BinPack,
    /// Least-allocated first.
    Spread,
}

/// Where a replica goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<'a> {
    pub node: &'a Node,
    /// The node's position in the list (or iterator) the caller passed.
    pub index: usize,
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
        let mut sep = ": ";
        for (reason, n) in &self.reasons {
            write!(f, "{sep}{n} {reason}")?;
            sep = ", ";
        }
        Ok(())
    }
}

/// Why a node was rejected; [`Reason::as_str`] is what `describe` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    NotReady,
    Cordoned,
    Avoided,
    Selector,
    AppAlreadyThere,
    Memory,
    InstanceMemory,
    Cpu,
    Volume,
}

impl Reason {
    /// In declaration order, so `reason as usize` indexes it.
    const ALL: [Reason; 9] = [
        Reason::NotReady,
        Reason::Cordoned,
        Reason::Avoided,
        Reason::Selector,
        Reason::AppAlreadyThere,
        Reason::Memory,
        Reason::InstanceMemory,
        Reason::Cpu,
        Reason::Volume,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::NotReady => "not ready",
            Reason::Cordoned => "cordoned",
            Reason::Avoided => "where its predecessor failed",
            Reason::Selector => "didn't match node selector",
            Reason::AppAlreadyThere => "already running a replica of this app",
            Reason::Memory => "insufficient memory",
            Reason::InstanceMemory => "less memory than one instance may use",
            Reason::Cpu => "insufficient cpu",
            Reason::Volume => "not the node its volume is bound to",
        }
    }
}

/// A node as the scan reads it: numbers only, packed, so a scan over
/// thousands of nodes streams through one small array and never follows a
/// pointer to a `Node`.
#[derive(Debug, Clone, Copy)]
struct Fit {
    /// Capacity minus allocation, per resource; negative when overcommitted.
    free_memory: i64,
    /// The node's whole memory: the most one instance may use there.
    memory: i64,
    free_cpu: i64,
    /// Fraction of cpu plus fraction of memory allocated, in [0, 2]; a
    /// resource the node has none of counts as full.
    used: f64,
    /// 1 / capacity, or 0 for a resource the node has none of.
    per_cpu: f64,
    per_memory: f64,
    /// Set when the node takes no replica whatever is asked.
    closed: Option<Reason>,
}

fn saturate(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

impl Fit {
    fn new(node: &Node, allocated: &Capacity) -> Fit {
        let (cap, a) = (&node.capacity, allocated);
        let frac = |used: u64, total: u64| {
            if total == 0 {
                1.0
            } else {
                used as f64 / total as f64
            }
        };
        let per = |total: u64| if total == 0 { 0.0 } else { 1.0 / total as f64 };
        let closed = if node.state != NodeState::Ready {
            Some(Reason::NotReady)
        } else if !node.schedulable {
            Some(Reason::Cordoned)
        } else {
            None
        };
        Fit {
            free_memory: saturate(cap.memory_bytes) - saturate(a.memory_bytes),
            memory: saturate(cap.memory_bytes),
            free_cpu: saturate(cap.cpu_millis) - saturate(a.cpu_millis),
            used: frac(a.cpu_millis, cap.cpu_millis) + frac(a.memory_bytes, cap.memory_bytes),
            per_cpu: per(cap.cpu_millis),
            per_memory: per(cap.memory_bytes),
            closed,
        }
    }
}

/// The rest of a node: what answers and bookkeeping need, not the scan.
#[derive(Debug, Clone)]
struct Slot<'a> {
    node: &'a Node,
    /// Position in the caller's list.
    index: usize,
    allocated: Capacity,
}

/// A [`Request`] in the scan's terms, converted once per placement.
struct Ask {
    memory: i64,
    instance_memory: i64,
    cpu: i64,
    required: bool,
    memory_f: f64,
    cpu_f: f64,
    /// Fit is `offset + sign * utilisation`: most-allocated or least-allocated first.
    offset: f64,
    sign: f64,
}

impl Ask {
    fn new(req: &Request<'_>, strategy: Strategy) -> Ask {
        let r = &req.resources;
        let (offset, sign) = match strategy {
            Strategy::BinPack => (0.0, 1.0),
            Strategy::Spread => (2.0, -1.0),
        };
        Ask {
            memory: saturate(r.memory_bytes),
            instance_memory: saturate(req.instance_memory),
            cpu: saturate(r.cpu_millis),
            required: req.spread == Spread::Required,
            memory_f: r.memory_bytes as f64,
            cpu_f: r.cpu_millis as f64,
            offset,
            sign,
        }
    }
}

/// The first filter a node fails, if any. `selected`: whether it matches the
/// node selector; `app_replicas`: replicas of the app already on it.
#[inline(always)]
fn rejection(f: &Fit, selected: bool, app_replicas: u32, ask: &Ask) -> Option<Reason> {
    if f.closed.is_some() {
        f.closed
    } else if !selected {
        Some(Reason::Selector)
    } else if ask.required && app_replicas > 0 {
        Some(Reason::AppAlreadyThere)
    } else if ask.memory > f.free_memory {
        Some(Reason::Memory)
    } else if ask.instance_memory > f.memory {
        Some(Reason::InstanceMemory)
    } else if ask.cpu > f.free_cpu {
        Some(Reason::Cpu)
    } else {
        None
    }
}

/// Balance, then fit: utilisation after placing (cpu and memory fractions
/// summed, in [0, 2]) by the cluster's strategy, minus a weight per replica
/// of the app already there.
#[inline(always)]
fn score(f: &Fit, app_replicas: u32, ask: &Ask) -> f64 {
    let utilisation = f.used + ask.cpu_f * f.per_cpu + ask.memory_f * f.per_memory;
    ask.offset + ask.sign * utilisation - BALANCE_WEIGHT * f64::from(app_replicas)
}

/// Whether `node` has every label of `selector`.
pub(crate) fn matches_selector(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| node.labels.get(k).is_some_and(|l| l == v))
}

/// Which slots match `selector`, in slot order.
fn selector_mask(slots: &[Slot<'_>], selector: &BTreeMap<String, String>) -> Vec<bool> {
    slots
        .iter()
        .map(|s| matches_selector(s.node, selector))
        .collect()
}

/// The best node and its score, or why there is none. `fits` are in name
/// order, so keeping the first of equal scores breaks ties by name;
/// `selected` is `None` without a selector; `app_replicas` is per node.
fn choose(
    fits: &[Fit],
    selected: Option<&[bool]>,
    app_replicas: &[u32],
    ask: &Ask,
) -> Result<(usize, f64), Unschedulable> {
    let mut best = None;
    let mut best_score = f64::NEG_INFINITY;
    let mut consider = |i: usize, f: &Fit, sel: bool, n: u32| {
        if rejection(f, sel, n, ask).is_none() {
            let score = score(f, n, ask);
            if score > best_score {
                best = Some(i);
                best_score = score;
            }
        }
    };
    // Two loops rather than a branch on `selected` per node.
    match selected {
        None => {
            for (i, (f, &n)) in fits.iter().zip(app_replicas).enumerate() {
                consider(i, f, true, n);
            }
        }
        Some(mask) => {
            for (i, ((f, &n), &sel)) in fits.iter().zip(app_replicas).zip(mask).enumerate() {
                consider(i, f, sel, n);
            }
        }
    }
    match best {
        Some(i) => Ok((i, best_score)),
        None => Err(explain(fits, selected, app_replicas, ask)),
    }
}

/// Counts every node's first failed filter. Only run when nothing fits, so
/// the scan that succeeds never touches a map.
#[cold]
fn explain(
    fits: &[Fit],
    selected: Option<&[bool]>,
    app_replicas: &[u32],
    ask: &Ask,
) -> Unschedulable {
    let mut counts = [0usize; Reason::ALL.len()];
    for (i, (f, &n)) in fits.iter().zip(app_replicas).enumerate() {
        let sel = selected.is_none_or(|m| m[i]);
        if let Some(reason) = rejection(f, sel, n, ask) {
            counts[reason as usize] += 1;
        }
    }
    let reasons = Reason::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.as_str(), n))
        .collect();
    Unschedulable {
        total: fits.len(),
        reasons,
    }
}

/// Picks a node for one replica. The same inputs, in any order, give the same answer.
pub fn place<'a>(
    req: &Request<'_>,
    nodes: &[NodeInfo<'a>],
    strategy: Strategy,
) -> Result<Placement<'a>, Unschedulable> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| nodes[a].node.name.cmp(&nodes[b].node.name));
    let slots: Vec<Slot<'a>> = order
        .iter()
        .map(|&i| Slot {
            node: nodes[i].node,
            index: i,
            allocated: nodes[i].allocated.clone(),
        })
        .collect();
    let fits: Vec<Fit> = slots
        .iter()
        .map(|s| Fit::new(s.node, &s.allocated))
        .collect();
    let counts: Vec<u32> = order
        .iter()
        .map(|&i| u32::try_from(nodes[i].app_replicas).unwrap_or(u32::MAX))
        .collect();
    let mask = (!req.node_selector.is_empty()).then(|| selector_mask(&slots, req.node_selector));
    let (i, score) = choose(&fits, mask.as_deref(), &counts, &Ask::new(req, strategy))?;
    Ok(Placement {
        node: slots[i].node,
        index: slots[i].index,
        score,
    })
}

/// One scheduling pass over a fixed set of nodes: what is allocated on each
/// and where each app's replicas are. Every [`Cluster::place`] reserves what
/// it places, so the next sees it, as if [`place`] were called with updated
/// [`NodeInfo`]s — without building them per replica.
///
/// Use: [`Cluster::new`] with the nodes, [`Cluster::reserve`] every active
/// replica, then [`Cluster::place`] each pending one.
#[derive(Debug, Clone)]
pub struct Cluster<'a> {
    strategy: Strategy,
    /// Sorted by node name, so the first best node found is the lowest name.
    slots: Vec<Slot<'a>>,
    /// `slots[i]` as the scan reads it.
    fits: Vec<Fit>,
    /// Per app, the slot of each of its active replicas (repeated per replica).
    apps: HashMap<AppKey, Vec<usize>>,
    /// Per slot, replicas of the app being placed; all zero between calls.
    counts: Vec<u32>,
    /// Per node selector seen this pass, which slots match it: labels do not
    /// change during a pass, so each selector is matched against nodes once.
    selectors: HashMap<BTreeMap<String, String>, Vec<bool>>,
}

impl<'a> Cluster<'a> {
    /// Nodes in any order; [`Placement::index`] is a node's position in `nodes`.
    pub fn new(nodes: impl IntoIterator<Item = &'a Node>, strategy: Strategy) -> Self {
        let mut slots: Vec<Slot<'a>> = nodes
            .into_iter()
            .enumerate()
            .map(|(index, node)| Slot {
                node,
                index,
                allocated: Capacity::default(),
            })
            .collect();
        slots.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        Cluster {
            strategy,
            counts: vec![0; slots.len()],
            fits: slots
                .iter()
                .map(|s| Fit::new(s.node, &s.allocated))
                .collect(),
            slots,
            apps: HashMap::new(),
            selectors: HashMap::new(),
        }
    }

    /// Accounts for a replica of `app` already on the node called `node`:
    /// its resources are taken and it counts towards the app's balance.
    /// False if there is no such node (nothing to account on).
    pub fn reserve(&mut self, node: &str, app: &AppKey, resources: &Capacity) -> bool {
        let Ok(i) = self
            .slots
            .binary_search_by(|s| s.node.name.as_str().cmp(node))
        else {
            return false;
        };
        self.take(i, app, resources);
        true
    }

    /// Accounts for what a replica on the node called `node` takes, without
    /// counting it towards any app's balance: for the replicas of apps a pass
    /// does not place, which cost it no allocation. False if there is no such node.
    pub fn occupy(&mut self, node: &str, resources: &Capacity) -> bool {
        let Ok(i) = self
            .slots
            .binary_search_by(|s| s.node.name.as_str().cmp(node))
        else {
            return false;
        };
        let s = &mut self.slots[i];
        s.allocated.add(resources);
        self.fits[i] = Fit::new(s.node, &s.allocated);
        true
    }

    /// Gives back what [`Cluster::reserve`] took for one replica of `app` on
    /// `node`: a replica this pass removes.
    pub fn release(&mut self, node: &str, app: &AppKey, resources: &Capacity) {
        let Ok(i) = self
            .slots
            .binary_search_by(|s| s.node.name.as_str().cmp(node))
        else {
            return;
        };
        let s = &mut self.slots[i];
        s.allocated.sub(resources);
        self.fits[i] = Fit::new(s.node, &s.allocated);
        if let Some(v) = self.apps.get_mut(app)
            && let Some(at) = v.iter().position(|&x| x == i)
        {
            v.swap_remove(at);
        }
    }

    /// Picks a node for one replica of `app` and reserves it there.
    pub fn place(
        &mut self,
        app: &AppKey,
        req: &Request<'_>,
    ) -> Result<Placement<'a>, Unschedulable> {
        let (i, score) = self.pick(app, req)?;
        self.take(i, app, &req.resources);
        let s = &self.slots[i];
        Ok(Placement {
            node: s.node,
            index: s.index,
            score,
        })
    }

    /// How allocated node `node` is, and what one replica of `resources` adds to
    /// that: fractions of its cpu plus of its memory, as the scores weigh them.
    pub fn usage(&self, node: &str, resources: &Capacity) -> Option<(f64, f64)> {
        let i = self
            .slots
            .binary_search_by(|s| s.node.name.as_str().cmp(node))
            .ok()?;
        let f = &self.fits[i];
        let share =
            resources.cpu_millis as f64 * f.per_cpu + resources.memory_bytes as f64 * f.per_memory;
        Some((f.used, share))
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Whether a replica of `app` would fit on some node not named in `avoid`;
    /// reserves nothing.
    pub fn fits_avoiding(&mut self, app: &AppKey, req: &Request<'_>, avoid: &[String]) -> bool {
        self.best_avoiding(app, req, avoid).is_some()
    }

    /// The node [`Cluster::place`] would pick for one more replica of `app`, off
    /// the nodes named in `avoid`; reserves nothing.
    pub fn best_avoiding(
        &mut self,
        app: &AppKey,
        req: &Request<'_>,
        avoid: &[String],
    ) -> Option<&'a str> {
        let closed = self.close(avoid);
        let best = self.pick(app, req).ok().map(|(i, _)| self.slots[i].node);
        self.reopen(closed);
        best.map(|n| n.name.as_str())
    }

    /// The best node for one replica of `app` and its score.
    fn pick(&mut self, app: &AppKey, req: &Request<'_>) -> Result<(usize, f64), Unschedulable> {
        let Cluster {
            strategy,
            slots,
            fits,
            apps,
            counts,
            selectors,
        } = self;
        let selected = if req.node_selector.is_empty() {
            None
        } else {
            if !selectors.contains_key(req.node_selector) {
                let mask = selector_mask(slots, req.node_selector);
                selectors.insert(req.node_selector.clone(), mask);
            }
            selectors.get(req.node_selector).map(Vec::as_slice)
        };
        let mine = apps.get(app).map_or(&[][..], Vec::as_slice);
        for &s in mine {
            counts[s] = counts[s].saturating_add(1);
        }
        let chosen = choose(fits, selected, counts, &Ask::new(req, *strategy));
        for &s in mine {
            counts[s] = 0;
        }
        chosen
    }

    /// [`Cluster::place`], keeping off the nodes named in `avoid` unless nothing
    /// else fits: a replacement for a replica that kept failing on its node.
    pub fn place_avoiding(
        &mut self,
        app: &AppKey,
        req: &Request<'_>,
        avoid: &[String],
    ) -> Result<Placement<'a>, Unschedulable> {
        let closed = self.close(avoid);
        let any = !closed.is_empty();
        let placed = self.place(app, req);
        self.reopen(closed);
        match placed {
            Err(_) if any => self.place(app, req),
            other => other,
        }
    }

    /// [`Cluster::place`] on node `only` or nowhere: a replica mounting a volume bound there.
    pub fn place_pinned(
        &mut self,
        app: &AppKey,
        req: &Request<'_>,
        only: &str,
    ) -> Result<Placement<'a>, Unschedulable> {
        let closed: Vec<(usize, Option<Reason>)> = (0..self.slots.len())
            .filter(|&i| self.slots[i].node.name != only)
            .map(|i| (i, self.fits[i].closed.replace(Reason::Volume)))
            .collect();
        let placed = self.place(app, req);
        self.reopen(closed);
        placed
    }

    /// Closes the nodes named in `avoid`; returns what to [`Cluster::reopen`].
    fn close(&mut self, avoid: &[String]) -> Vec<(usize, Option<Reason>)> {
        avoid
            .iter()
            .filter_map(|n| {
                let i = self
                    .slots
                    .binary_search_by(|s| s.node.name.as_str().cmp(n))
                    .ok()?;
                Some((i, self.fits[i].closed.replace(Reason::Avoided)))
            })
            .collect()
    }

    /// Undoes [`Cluster::close`], last first: a node avoided twice was closed by its first
    /// entry, and opens as it was before that.
    fn reopen(&mut self, closed: Vec<(usize, Option<Reason>)>) {
        for (i, was) in closed.into_iter().rev() {
            self.fits[i].closed = was;
        }
    }

    /// [`Cluster::place`] for each request in turn, each seeing the ones before.
    pub fn place_all<'r>(
        &mut self,
        requests: impl IntoIterator<Item = (&'r AppKey, &'r Request<'r>)>,
    ) -> Vec<Result<Placement<'a>, Unschedulable>> {
        requests
            .into_iter()
            .map(|(app, req)| self.place(app, req))
            .collect()
    }

    fn take(&mut self, slot: usize, app: &AppKey, resources: &Capacity) {
        let s = &mut self.slots[slot];
        s.allocated.add(resources);
        self.fits[slot] = Fit::new(s.node, &s.allocated);
        match self.apps.get_mut(app) {
            Some(v) => v.push(slot),
            None => {
                self.apps.insert(app.clone(), vec![slot]);
            }
        }
    }
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
            draining: false,
            leaving: None,
            joined_at: 0,
            label_overrides: Default::default(),
        }
    }

    fn cap(cpu: u64, mem_mi: u64) -> Capacity {
        Capacity {
            cpu_millis: cpu,
            memory_bytes: mem_mi << 20,
            instances: 0,
        }
    }

    static ANYWHERE: BTreeMap<String, String> = BTreeMap::new();

    fn req(cpu: u64, mem_mi: u64) -> Request<'static> {
        Request {
            resources: cap(cpu, mem_mi),
            instance_memory: mem_mi << 20,
            node_selector: &ANYWHERE,
            spread: Spread::Preferred,
        }
    }

    fn info(node: &Node, allocated: Capacity) -> NodeInfo<'_> {
        NodeInfo {
            node,
            allocated,
            app_replicas: 0,
        }
    }

    fn free(nodes: &[Node]) -> Vec<NodeInfo<'_>> {
        nodes.iter().map(|n| info(n, Capacity::default())).collect()
    }

    fn app(name: &str) -> AppKey {
        AppKey::new("default", name)
    }

    #[test]
    fn bin_packs_onto_the_fullest_node_that_fits() {
        let (a, b) = (node("a", 1000, 1024), node("b", 1000, 1024));
        let nodes = [info(&a, cap(100, 100)), info(&b, cap(500, 500))];
        let on = |r: Request<'_>, s| place(&r, &nodes, s).unwrap().node.name.clone();
        assert_eq!(on(req(100, 100), Strategy::BinPack), "b");
        assert_eq!(on(req(100, 100), Strategy::Spread), "a");
        // b cannot take 600Mi more; a can.
        assert_eq!(on(req(100, 600), Strategy::BinPack), "a");
    }

    #[test]
    fn ties_break_by_name_whatever_the_order() {
        let nodes = [
            node("c", 1000, 1024),
            node("a", 1000, 1024),
            node("b", 1000, 1024),
        ];
        let p = place(&req(1, 1), &free(&nodes), Strategy::BinPack).unwrap();
        assert_eq!((p.node.name.as_str(), p.index), ("a", 1));
        let mut cluster = Cluster::new(&nodes, Strategy::Spread);
        let p = cluster.place(&app("x"), &req(1, 1)).unwrap();
        assert_eq!((p.node.name.as_str(), p.index), ("a", 1));
    }

    #[test]
    fn every_rejection_is_counted() {
        let mut nodes = vec![
            node("a", 1000, 64),
            node("b", 1000, 64),
            node("c", 1000, 4096),
            node("d", 10, 4096),
            node("e", 1000, 4096),
        ];
        nodes[2].schedulable = false;
        nodes[4].state = NodeState::NotReady;
        let err = place(&req(100, 128), &free(&nodes), Strategy::BinPack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes available: 1 cordoned, 1 insufficient cpu, 2 insufficient memory, 1 not ready"
        );
    }

    /// Each filter alone, and the reason it is reported under.
    #[test]
    fn each_filter_has_its_reason() {
        type Break = fn(&mut Node, &mut Capacity, &mut usize);
        let cases: [(&str, Break); 7] = [
            ("not ready", |n, _, _| n.state = NodeState::NotReady),
            ("cordoned", |n, _, _| n.schedulable = false),
            ("didn't match node selector", |n, _, _| {
                n.labels.insert("zone".into(), "b".into());
            }),
            ("already running a replica of this app", |_, _, r| *r = 1),
            ("insufficient memory", |_, a, _| a.memory_bytes = 1000 << 20),
            // Room for the request (100Mi), not for one instance (200Mi).
            ("less memory than one instance may use", |n, _, _| {
                n.capacity.memory_bytes = 150 << 20
            }),
            ("insufficient cpu", |_, a, _| a.cpu_millis = 950),
        ];
        let zone_a = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let r = Request {
            node_selector: &zone_a,
            spread: Spread::Required,
            instance_memory: 200 << 20,
            ..req(100, 100)
        };
        for (reason, break_it) in cases {
            let mut n = node("a", 1000, 1024);
            n.labels.insert("zone".into(), "a".into());
            let (mut allocated, mut app_replicas) = (Capacity::default(), 0);
            assert!(place(&r, &[info(&n, allocated.clone())], Strategy::BinPack).is_ok());
            break_it(&mut n, &mut allocated, &mut app_replicas);
            let broken = NodeInfo {
                node: &n,
                allocated,
                app_replicas,
            };
            let err = place(&r, &[broken], Strategy::BinPack).unwrap_err();
            assert_eq!(err.to_string(), format!("0/1 nodes available: 1 {reason}"));
        }
    }

    #[test]
    fn node_selector_needs_every_label() {
        let mut nodes = vec![
            node("a", 1000, 1024),
            node("b", 1000, 1024),
            node("c", 1000, 1024),
        ];
        nodes[0].labels = BTreeMap::from([("zone".into(), "a".into())]);
        nodes[1].labels =
            BTreeMap::from([("zone".into(), "a".into()), ("gpu".into(), "yes".into())]);
        nodes[2].labels = BTreeMap::from([("gpu".into(), "yes".into())]);
        let selector = BTreeMap::from([
            ("zone".to_string(), "a".to_string()),
            ("gpu".to_string(), "yes".to_string()),
        ]);
        let r = Request {
            node_selector: &selector,
            ..req(1, 1)
        };
        assert_eq!(
            place(&r, &free(&nodes), Strategy::BinPack)
                .unwrap()
                .node
                .name,
            "b"
        );
        nodes[1].labels.insert("zone".into(), "b".into());
        let err = place(&r, &free(&nodes), Strategy::BinPack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 nodes available: 3 didn't match node selector"
        );
        // The cluster matches each selector once per pass; same answers.
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        assert_eq!(cluster.place(&app("x"), &r).unwrap_err(), err);
        assert_eq!(cluster.place(&app("x"), &req(1, 1)).unwrap().node.name, "a");
    }

    /// Under bin-pack, an app's replicas still go to distinct nodes while
    /// there are any; only then do they double up.
    #[test]
    fn spread_preferred_balances_even_when_bin_packing() {
        let nodes = [
            node("a", 4000, 4096),
            node("b", 4000, 4096),
            node("c", 4000, 4096),
        ];
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        let placed: Vec<String> = (0..5)
            .map(|_| {
                cluster
                    .place(&app("web"), &req(100, 100))
                    .unwrap()
                    .node
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(placed, ["a", "b", "c", "a", "b"]);
        // Another app still bin-packs: onto the fullest node, a or b, so a.
        let p = cluster.place(&app("db"), &req(100, 100)).unwrap();
        assert_eq!(p.node.name, "a");
    }

    #[test]
    fn spread_required_is_hard_anti_affinity() {
        let nodes = [
            node("a", 4000, 4096),
            node("b", 4000, 4096),
            node("c", 10, 4096),
        ];
        let r = Request {
            spread: Spread::Required,
            ..req(100, 100)
        };
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        let results = cluster.place_all([(&app("web"), &r), (&app("web"), &r), (&app("web"), &r)]);
        let names: Vec<_> = results
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| p.node.name.as_str())
                    .map_err(ToString::to_string)
            })
            .collect();
        assert_eq!(
            names,
            [
                Ok("a"),
                Ok("b"),
                Err(
                    "0/3 nodes available: 2 already running a replica of this app, 1 insufficient cpu"
                        .into()
                )
            ]
        );
        // Only this app is kept apart.
        assert!(cluster.place(&app("other"), &r).is_ok());
    }

    #[test]
    fn reserved_replicas_take_capacity_and_count_for_balance() {
        let nodes = [node("a", 1000, 1024), node("b", 1000, 1024)];
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        assert!(cluster.reserve("b", &app("web"), &cap(100, 100)));
        assert!(!cluster.reserve("gone", &app("web"), &cap(100, 100)));
        // b is fuller, but already runs web.
        assert_eq!(
            cluster
                .place(&app("web"), &req(100, 100))
                .unwrap()
                .node
                .name,
            "a"
        );
        assert!(cluster.reserve("a", &app("db"), &cap(900, 100)));
        assert!(cluster.reserve("b", &app("db"), &cap(850, 0)));
        // a lacks the memory, b the cpu.
        let err = cluster.place(&app("db"), &req(200, 850)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes available: 1 insufficient cpu, 1 insufficient memory"
        );
    }

    /// `max_concurrency` caps a replica; it reserves none of the node's pool,
    /// so a small pool takes as many replicas as cpu and memory allow.
    #[test]
    fn instance_slots_are_not_reserved() {
        let mut n = node("a", 1000, 1024);
        n.capacity.instances = 10;
        let app = crate::testing::app_with(
            "http",
            1,
            1,
            "[resources]\nrequests = { cpu = \"50m\", memory = \"8Mi\" }\nlimits = { memory = \"32Mi\" }\nmax_concurrency = 100\n",
        );
        let r = Request::new(&app.spec.resources, &app.spec.placement);
        assert_eq!((r.resources.cpu_millis, r.resources.instances), (50, 0));
        let mut cluster = Cluster::new([&n], Strategy::BinPack);
        // 1000m of cpu takes 20 of them; the 10-slot pool limits nothing.
        for _ in 0..20 {
            assert!(cluster.place(&self::app("x"), &r).is_ok());
        }
        let err = cluster.place(&self::app("x"), &r).unwrap_err();
        assert_eq!(err.to_string(), "0/1 nodes available: 1 insufficient cpu");
    }

    #[test]
    fn no_nodes() {
        let err = place(&req(1, 1), &[], Strategy::BinPack).unwrap_err();
        assert_eq!(err.to_string(), "0/0 nodes available");
        let err = Cluster::new(&[], Strategy::BinPack)
            .place(&app("x"), &req(1, 1))
            .unwrap_err();
        assert_eq!(err.to_string(), "0/0 nodes available");
    }

    /// A small deterministic generator, so the test needs no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// The batch gives what one `place` per replica gives with NodeInfos
    /// rebuilt each time, and the same inputs give the same outputs.
    #[test]
    fn cluster_agrees_with_place_and_is_deterministic() {
        let mut rng = Lcg(7);
        let nodes: Vec<Node> = (0..40)
            .map(|i| {
                let mut n = node(
                    &format!("n{:02}", rng.next(1000)),
                    500 + 500 * rng.next(4),
                    512 << rng.next(3),
                );
                n.name.push_str(&format!("-{i}"));
                n.labels
                    .insert("zone".into(), ["a", "b", "c"][rng.next(3) as usize].into());
                n.schedulable = rng.next(10) != 0;
                n
            })
            .collect();
        let zone_a = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let apps: Vec<AppKey> = (0..6).map(|i| app(&format!("app{i}"))).collect();
        let requests: Vec<(usize, Request<'_>)> = (0..300)
            .map(|_| {
                let a = rng.next(6) as usize;
                let r = Request {
                    resources: cap(50 * (1 + a as u64), 64 << (a % 3)),
                    instance_memory: 128 << 20,
                    node_selector: if a == 2 { &zone_a } else { &ANYWHERE },
                    spread: if a == 4 {
                        Spread::Required
                    } else {
                        Spread::Preferred
                    },
                };
                (a, r)
            })
            .collect();
        for strategy in [Strategy::BinPack, Strategy::Spread] {
            let mut cluster = Cluster::new(&nodes, strategy);
            let batch = cluster.place_all(requests.iter().map(|(a, r)| (&apps[*a], r)));
            assert!(batch.iter().any(Result::is_err) && batch.iter().any(Result::is_ok));

            let mut allocated = vec![Capacity::default(); nodes.len()];
            let mut on: HashMap<(usize, usize), usize> = HashMap::new();
            for ((a, r), got) in requests.iter().zip(&batch) {
                let infos: Vec<NodeInfo<'_>> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| NodeInfo {
                        node: n,
                        allocated: allocated[i].clone(),
                        app_replicas: on.get(&(*a, i)).copied().unwrap_or(0),
                    })
                    .collect();
                let want = place(r, &infos, strategy);
                assert_eq!(got, &want);
                if let Ok(p) = want {
                    allocated[p.index].add(&r.resources);
                    *on.entry((*a, p.index)).or_default() += 1;
                }
            }

            let mut reversed: Vec<&Node> = nodes.iter().collect();
            reversed.reverse();
            let again = Cluster::new(reversed, strategy)
                .place_all(requests.iter().map(|(a, r)| (&apps[*a], r)));
            let names =
                |v: &[Result<Placement<'_>, Unschedulable>]| -> Vec<Result<String, String>> {
                    v.iter()
                        .map(|p| {
                            p.as_ref()
                                .map(|p| p.node.name.clone())
                                .map_err(ToString::to_string)
                        })
                        .collect()
                };
            assert_eq!(names(&batch), names(&again));
        }
    }

    #[test]
    fn a_replacement_avoids_where_its_predecessor_failed_unless_nothing_else_fits() {
        let nodes = [node("a", 1000, 1024), node("b", 1000, 1024)];
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        cluster.reserve("a", &app("x"), &cap(100, 100));
        let r = req(100, 100);
        // Bin packing alone would pick a (fuller); avoiding it picks b.
        let p = cluster
            .place_avoiding(&app("y"), &r, &["a".to_string()])
            .unwrap();
        assert_eq!(p.node.name, "b");
        // The avoided node is open again for the next replica (equal, first by name).
        assert_eq!(cluster.place(&app("z"), &r).unwrap().node.name, "a");
        // Only the avoided node fits: it is used rather than leaving the replica pending.
        let big = req(100, 900);
        let p = cluster
            .place_avoiding(&app("y"), &big, &["b".to_string()])
            .unwrap();
        assert_eq!(p.node.name, "b");
    }
}
