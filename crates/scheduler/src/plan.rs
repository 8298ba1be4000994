//! One controller pass as a pure function. The controller reads a [`World`]
//! (every app, revision, replica, node, lease and rollout, with the store
//! revision each was read at, and the gateways' measurements), [`plan`] makes
//! every decision the pass makes, and the controller writes the [`Plan`]: one
//! transaction per [`Batch`], each guarded by the revisions its decisions were
//! made on, so one app's lost race does not redo the whole cluster.
//!
//! Jobs of a pass, in order: leases ([`NodeState::NotReady`] after the
//! grace), replicas of deleted apps and of lost nodes, each app's size
//! ([`autoscale::decide`]: load and schedule windows), each app's rollout
//! (progress, canary steps and their measurements' baselines, rollback),
//! replicas their node gave up on (replaced, preferably elsewhere), a job's
//! runs ([`cron::decide`]: its schedule, `shoal job run`, history), reconcile
//! (create and delete), and placement of what is pending.

use crate::autoscale::{self, Load};
use crate::cron;
use crate::placement::{Cluster, Request, Strategy, matches_selector};
use crate::reconcile::{Mode, reconcile};
use crate::rollout::{self, Measured};
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::LIVENESS_FAILED;
use shoal_core::quota::QuotaLimits;
use shoal_core::spec::AppKey;
use shoal_core::{
    App, Capacity, EventType, Kind, Millis, Node, NodeState, Phase, Replica, Revision,
    RolloutPhase, RolloutStatus, Volume,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// An object as read, with the store revision of its last change: a write
/// decided on it applies only if it is still the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    pub value: T,
    pub mod_revision: u64,
}

impl<T> Read<T> {
    pub fn new(value: T, mod_revision: u64) -> Self {
        Read {
            value,
            mod_revision,
        }
    }
}

/// Everything one pass decides on.
#[derive(Debug, Clone)]
pub struct World {
    pub apps: BTreeMap<AppKey, Read<App>>,
    pub revisions: BTreeMap<(AppKey, u64), Read<Revision>>,
    /// Per app (that app may be gone), by replica id.
    pub replicas: BTreeMap<AppKey, BTreeMap<String, Read<Replica>>>,
    pub nodes: BTreeMap<String, Read<Node>>,
    /// How long each node has been silent, as the controller heard it.
    pub leases: Leases,
    pub rollouts: BTreeMap<AppKey, Read<RolloutStatus>>,
    /// By namespace and name.
    pub volumes: BTreeMap<(String, String), Read<Volume>>,
    /// What their nodes last measured them holding, by namespace and name: a rollback
    /// resizes a volume only as far as it fits.
    pub volume_usage: BTreeMap<(String, String), u64>,
    /// What the gateways measured, per app.
    pub measurements: BTreeMap<AppKey, Measurements>,
    /// Namespaces' quotas, by namespace: what growth they leave ([`Plan::quota_room`]).
    pub quotas: BTreeMap<String, QuotaLimits>,
    /// When this control plane started: load is known from then on only, so
    /// an app without measurements had no traffic since, not ever.
    pub started_at: Millis,
    /// A node whose lease is older than this is lost (see [`Leases`]).
    pub node_grace_ms: u64,
    pub strategy: Strategy,
    /// Whether replicas move to even out apps spread unevenly over the nodes
    /// (a node joined, or a failover left the cluster lopsided).
    pub rebalance: bool,
}

/// Rebalancing moves in flight at once, cluster-wide: a node that joins takes
/// its share a few cold starts at a time.
pub const REBALANCE_MOVES: usize = 2;

/// Node heartbeats as the controller heard them, in milliseconds of its own
/// clock: monotonic, so a wall-clock step ages no lease, and standing still
/// while the controller does not run, so nothing is evicted for the time the
/// control plane itself was stopped or suspended. It starts with the
/// controller: every node gets a full grace after a (re)start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    /// Node name → for how long its lease has not been renewed. A node
    /// missing here counts as just renewed: it has not been heard long
    /// enough to judge.
    pub ages: BTreeMap<String, u64>,
    /// How long ago this controller last marked a node NotReady, if it has:
    /// evictions are rate-limited.
    pub since_eviction: Option<u64>,
    /// Whether the previous pass held evictions back ([`Plan::held`]), so
    /// the warning is recorded when a hold begins, not at every pass.
    pub held: bool,
}

/// An app's gateway measurements: running totals per revision, the totals
/// when its current canary step began (a step is judged on the difference),
/// and its recent load, which sizes an autoscaled app.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurements {
    pub totals: BTreeMap<u64, RevisionStats>,
    pub baseline: Option<Baseline>,
    pub load: Load,
}

/// The running totals per revision when the canary step that started at `step` began.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub step: Millis,
    pub totals: BTreeMap<u64, RevisionStats>,
}

impl Measurements {
    /// What `revision` of `app` served since the step at `step` began: `None`
    /// until a baseline for that step is taken. A revision first seen during
    /// the step counts whole.
    pub fn since_step(&self, app: &AppKey, revision: u64, step: Millis) -> Option<RevisionStats> {
        let base = self.baseline.as_ref().filter(|b| b.step == step)?;
        let zero = RevisionStats::new(app.clone(), revision);
        let total = self.totals.get(&revision).unwrap_or(&zero);
        Some(match base.totals.get(&revision) {
            Some(b) => total.since(b),
            None => total.clone(),
        })
    }
}

/// Where new replica ids come from: random in the controller, a counter in tests.
pub trait Ids {
    /// A short suffix, unique among the app's replicas.
    fn next_id(&mut self) -> String;
}

/// What a guarded write expects of the key it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Absent,
    At(u64),
}

/// One write of a pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    PutNode {
        node: Node,
        expect: u64,
    },
    /// The app record (its size and scale status, a job's status, a
    /// rollback: one per batch); guarded by its batch. Boxed: an app is
    /// several times the size of any other change.
    PutApp {
        app: Box<App>,
    },
    PutRevision {
        /// Boxed: a template is many times the size of the other changes.
        revision: Box<Revision>,
        expect: u64,
    },
    PutRollout {
        status: RolloutStatus,
        expect: Expect,
    },
    DeleteRollout {
        app: AppKey,
        expect: u64,
    },
    PutReplica {
        replica: Replica,
        expect: Expect,
    },
    DeleteReplica {
        app: AppKey,
        id: String,
        expect: u64,
    },
    /// A volume bound to the node its first replica was placed on.
    PutVolume {
        volume: Volume,
        expect: u64,
    },
    /// Writes nothing: the batch applies only while node `name` is as read
    /// (still NotReady, not re-registered meanwhile; still deleted).
    KeepNode {
        name: String,
        expect: Expect,
    },
}

/// An event to record with its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventType,
    pub reason: &'static str,
    /// `app/ns/name`, `replica/ns/name/id`, `node/name`, `cluster`.
    pub object: String,
    pub app: Option<AppKey>,
    pub message: String,
}

/// What a batch is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A node marked NotReady.
    Node(String),
    App(AppKey),
    /// The cluster as a whole: an event only.
    Cluster,
}

/// Writes that commit together or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub scope: Scope,
    /// For an app's batch, what its app record must still be (`Absent` for
    /// the cleanup of a deleted app): an apply landing meanwhile voids it.
    pub app: Option<Expect>,
    pub changes: Vec<Change>,
    pub events: Vec<NewEvent>,
}

impl Batch {
    /// A batch about `app`, applying only while its record is as `expect` says.
    pub fn for_app(app: AppKey, expect: Expect) -> Self {
        Batch::new(Scope::App(app), Some(expect))
    }

    fn new(scope: Scope, app: Option<Expect>) -> Self {
        Batch {
            scope,
            app,
            changes: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The replicas this batch puts on a node, each with its `Scheduled` event: placed at
    /// their `updated_at`, they waited from their `created_at`.
    pub fn placed(&self) -> impl Iterator<Item = &Replica> {
        let scheduled: BTreeSet<&str> = self
            .events
            .iter()
            .filter(|e| e.reason == "Scheduled")
            .map(|e| e.object.as_str())
            .collect();
        self.changes.iter().filter_map(move |c| match c {
            Change::PutReplica { replica, .. }
                if scheduled
                    .contains(format!("replica/{}/{}", replica.app, replica.id).as_str()) =>
            {
                Some(replica)
            }
            _ => None,
        })
    }

    pub fn event(
        &mut self,
        kind: EventType,
        reason: &'static str,
        object: String,
        app: Option<&AppKey>,
        message: String,
    ) {
        self.events.push(NewEvent {
            kind,
            reason,
            object,
            app: app.cloned(),
            message,
        });
    }
}

/// Everything one pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub batches: Vec<Batch>,
    /// Canary steps that began (or whose baseline was lost): record these
    /// totals as their baselines. In memory only, whatever the batches do.
    pub baselines: Vec<(AppKey, Baseline)>,
    /// State that cannot be acted on (e.g. an app pointing at a missing
    /// revision), for the log.
    pub warnings: Vec<String>,
    /// Nodes were lost but too many at once to mark any NotReady (full
    /// disruption): the controller hands this back as [`Leases::held`].
    pub held: bool,
}

impl Plan {
    /// Whether the pass writes nothing to the store.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// Decides one pass over every app. Pure: same world, time and ids, same plan.
pub fn plan(world: &World, now: Millis, ids: &mut impl Ids) -> Plan {
    plan_for(world, None, now, ids)
}

/// Decides one pass over the apps in `focus` only (present or deleted):
/// what a controller that knows what changed since its last pass asks, so
/// a pass costs what changed, not the size of the cluster. Leases and
/// capacity are still judged on every node and replica; apps outside
/// `focus` are taken as they are.
pub fn plan_apps(world: &World, focus: &BTreeSet<AppKey>, now: Millis, ids: &mut impl Ids) -> Plan {
    plan_for(world, Some(focus), now, ids)
}

fn plan_for(
    world: &World,
    focus: Option<&BTreeSet<AppKey>>,
    now: Millis,
    ids: &mut impl Ids,
) -> Plan {
    let mut out = Plan::default();
    let nodes = expire_leases(world, &mut out);
    // Replicas move off nodes that were NotReady when read; one that becomes
    // NotReady in this pass loses its replicas in the next, once that is
    // stored, so a node batch that loses its race moves nothing. A node that
    // was deleted is lost for good (and its batch holds while it stays so).
    let mut lost: HashMap<&str, Expect> = world
        .nodes
        .values()
        .filter(|n| n.value.state != NodeState::Ready)
        .map(|n| (n.value.name.as_str(), Expect::At(n.mod_revision)))
        .collect();
    for replica in world.replicas.values().flat_map(|rs| rs.values()) {
        if let Some(node) = replica.value.node.as_deref()
            && !world.nodes.contains_key(node)
        {
            lost.insert(node, Expect::Absent);
        }
    }
    let draining: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.draining)
        .map(|n| n.name.as_str())
        .collect();
    let mut cluster = Cluster::new(nodes.iter(), world.strategy);
    // Every replica takes its room; only those of apps this pass looks at
    // count towards their app's balance.
    for (app, replicas) in &world.replicas {
        let placing = focus.is_none_or(|f| f.contains(app));
        for r in replicas.values() {
            if let (true, Some(n)) = (r.value.is_active(), &r.value.node) {
                let room = Capacity::of(&r.value.resources);
                if placing {
                    cluster.reserve(n, app, &room);
                } else {
                    cluster.occupy(n, &room);
                }
            }
        }
    }
    let mut pass = Pass {
        world,
        now,
        lost,
        draining,
        cluster,
        released: Vec::new(),
        bound: BTreeMap::new(),
        moves: world
            .replicas
            .values()
            .flat_map(|rs| rs.values())
            .filter(|r| r.value.moving())
            .count(),
        out,
    };
    let replicas_of = |key: &AppKey| -> Vec<&Read<Replica>> {
        world
            .replicas
            .get(key)
            .map(|rs| rs.values().collect())
            .unwrap_or_default()
    };
    let mut orphans: BTreeSet<&AppKey> = BTreeSet::new();
    match focus {
        None => {
            for (key, app) in &world.apps {
                pass.app(app, replicas_of(key), ids);
            }
            orphans.extend(
                (world.replicas.keys().chain(world.rollouts.keys()))
                    .filter(|k| !world.apps.contains_key(*k)),
            );
        }
        Some(focus) => {
            for key in focus {
                match world.apps.get(key) {
                    Some(app) => pass.app(app, replicas_of(key), ids),
                    None => {
                        orphans.insert(key);
                    }
                }
            }
        }
    }
    pass.deleted_apps(orphans);
    pass.out
}

/// Whether a pass must look at app `key` even when none of its objects
/// changed: something about it moves with time (its load and idleness,
/// schedule windows or cron, a rollout's deadline and pauses, a replica
/// starting, backing off, waiting for room or serving for less than its app's
/// `min_ready` at `now`, the cleanup of a deleted app). Otherwise only a change to
/// its objects, to a node or to its measurements can change what a pass decides
/// for it.
pub fn needs_look(world: &World, key: &AppKey, now: Millis) -> bool {
    let replicas = world.replicas.get(key);
    let min_ready = world
        .apps
        .get(key)
        .map_or(0, |a| a.value.spec.rollout.min_ready_ms);
    let unsettled =
        replicas.is_some_and(|rs| rs.values().any(|r| !r.value.available(min_ready, now)));
    if unsettled
        || world
            .rollouts
            .get(key)
            .is_some_and(|s| !s.value.phase.is_done())
    {
        return true;
    }
    let Some(app) = world.apps.get(key) else {
        return replicas.is_some() || world.rollouts.contains_key(key);
    };
    let spec = &app.value.spec;
    spec.component.kind == Kind::Job
        || !spec.scale.schedule.is_empty()
        || (spec.scale.autoscale.is_some() && (spec.replicas > 0 || replicas.is_some()))
}

/// Nodes as they are after this pass. A Ready node whose lease is older
/// than the grace is lost, and is marked NotReady in a batch of its own
/// (its replicas move in the next pass), with two brakes, as Kubernetes'
/// node lifecycle controller has:
///
/// - Full disruption: in a cluster of two or more nodes, while more than
///   half of them are NotReady or silent for over half the grace, none is
///   marked. So many at once more likely means the control plane cannot hear
///   them (its network, its host) than that they all failed, and replacing
///   every replica would only add to the outage. Half the grace counts, not
///   only the whole, so that nodes that went silent together, whose leases
///   run out a few passes apart, are judged together and not one by one.
///   A single node is judged alone.
/// - Rate: one node per pass, the longest silent, and none within a grace
///   of the last one this controller marked.
fn expire_leases(world: &World, out: &mut Plan) -> Vec<Node> {
    let mut nodes: Vec<Node> = world.nodes.values().map(|n| n.value.clone()).collect();
    let grace = world.node_grace_ms;
    let age = |n: &Node| world.leases.ages.get(&n.name).copied().unwrap_or(0);
    // The longest silent, ties to the first by name.
    let Some((lost, expect)) = world
        .nodes
        .values()
        .enumerate()
        .filter(|(_, n)| n.value.state == NodeState::Ready && age(&n.value) > grace)
        .max_by(|(a, na), (b, nb)| age(&na.value).cmp(&age(&nb.value)).then(b.cmp(a)))
        .map(|(i, n)| (i, n.mod_revision))
    else {
        return nodes;
    };
    let troubled = nodes
        .iter()
        .filter(|n| n.state != NodeState::Ready || age(n) > grace / 2)
        .count();
    if nodes.len() >= 2 && troubled * 2 > nodes.len() {
        out.held = true;
        if !world.leases.held {
            let message = format!(
                "{troubled} of {} nodes are NotReady or silent: more likely the control plane \
                 cannot hear them than that they all failed; no node is marked NotReady until \
                 most are heard again",
                nodes.len()
            );
            let mut batch = Batch::new(Scope::Cluster, None);
            batch.event(
                EventType::Warning,
                "NodeEvictionHeld",
                "cluster".into(),
                None,
                message.clone(),
            );
            out.batches.push(batch);
            out.warnings.push(message);
        }
        return nodes;
    }
    if world.leases.since_eviction.is_some_and(|t| t < grace) {
        return nodes;
    }
    let node = &mut nodes[lost];
    node.state = NodeState::NotReady;
    let mut batch = Batch::new(Scope::Node(node.name.clone()), None);
    // A node that said it was shutting down is expected to go quiet: no cause for alarm.
    let (kind, message) = match node.leaving {
        Some(_) => (
            EventType::Normal,
            format!("node {} shut down as it said it would", node.name),
        ),
        None => (
            EventType::Warning,
            format!("no heartbeat from node {} for {} ms", node.name, age(node)),
        ),
    };
    batch.event(
        kind,
        "NodeNotReady",
        format!("node/{}", node.name),
        None,
        message,
    );
    batch.changes.push(Change::PutNode {
        node: node.clone(),
        expect,
    });
    out.batches.push(batch);
    nodes
}

/// One pass in progress: the world, the placements made so far, the plan.
struct Pass<'w> {
    world: &'w World,
    now: Millis,
    lost: HashMap<&'w str, Expect>,
    draining: HashSet<&'w str>,
    cluster: Cluster<'w>,
    /// Room the current app's deletes gave back: its own placements may use
    /// it, and it is taken again before the next app's turn.
    released: Vec<(String, AppKey, Capacity)>,
    /// Volumes bound by placements of this pass, by namespace and name: to their node.
    bound: BTreeMap<(String, String), String>,
    /// Rebalancing moves in flight, those this pass starts included.
    moves: usize,
    out: Plan,
}

impl<'w> Pass<'w> {
    /// Everything about one app, as one batch.
    fn app(&mut self, app: &Read<App>, replicas: Vec<&Read<Replica>>, ids: &mut impl Ids) {
        let key = app.value.spec.key();
        let mut batch = Batch::new(Scope::App(key.clone()), Some(Expect::At(app.mod_revision)));
        let (mut existing, lost) = self.drop_lost(&mut batch, replicas);
        let (mut record, size) = self.autoscale(&mut batch, &app.value, &existing);
        // What the rest of the pass counts with: the size in effect, which for
        // a fixed-size app in a schedule window is not the stored one.
        let effective = if size == record.spec.replicas {
            Cow::Borrowed(&*record)
        } else {
            let mut a = App::clone(&record);
            a.spec.replicas = size;
            Cow::Owned(a)
        };
        let mode = if effective.spec.component.kind == Kind::Job {
            Some(Mode::Roll)
        } else {
            let current: Vec<Replica> = existing.iter().map(|r| r.value.clone()).collect();
            self.advance_rollout(&mut batch, &effective, &record, &current)
        };
        // A rollback writes the app; the next pass reconciles towards it.
        let mut job = None;
        // A replica that starts moving this pass, as reconcile must see it.
        let moving: Option<Read<Replica>>;
        // One whose move is given up this pass, and one said to be pinned off its selector,
        // likewise.
        let (mut kept, mut noted) = (None, None);
        if let Some(mode) = mode {
            if let Some((i, replica)) = self.give_up_move(&mut batch, &effective, &existing) {
                rewrite(&mut batch, &mut kept, &mut existing, i, replica);
            }
            if let Some((i, replica)) = self.note_pinned(&mut batch, &effective, &existing) {
                rewrite(&mut batch, &mut noted, &mut existing, i, replica);
            }
            let mut avoid = self.replace_failing(&mut batch, &effective, &mut existing);
            // Reconcile creates nothing for a paused rollout: it gets back, of the revision
            // each had, what lost nodes took away, as it does a failing replica.
            if mode == Mode::Hold {
                let gone = lost.iter().filter(|r| r.kind != Kind::Job);
                avoid.lost_revisions.extend(gone.map(|r| r.revision));
            }
            if effective.spec.component.kind == Kind::Job {
                job = Some(self.job_runs(&mut batch, &effective, &mut existing, &lost, ids));
            }
            // A scheduled job's replicas are all runs: its schedule starts them, not a count.
            if effective.spec.runs.schedule.is_none() {
                let mut started = None;
                if mode == Mode::Roll
                    && let Some((i, replica, off)) =
                        self.rebalance(&mut batch, &effective, &existing)
                {
                    // Its replacement goes where the move chose: off the nodes it avoided.
                    avoid.count += 1;
                    avoid.nodes.extend(off);
                    moving = Some(Read::new(replica, existing[i].mod_revision));
                    existing[i] = moving.as_ref().expect("just set");
                    started = moving.as_ref();
                }
                self.reconcile(&mut batch, &effective, existing, mode, avoid, ids);
                // Marked as moving unless reconcile already removed it.
                if let Some(r) = started
                    && !batch
                        .changes
                        .iter()
                        .any(|c| matches!(c, Change::DeleteReplica { id, .. } if *id == r.value.id))
                {
                    batch.changes.push(Change::PutReplica {
                        replica: r.value.clone(),
                        expect: Expect::At(r.mod_revision),
                    });
                }
            }
        }
        if let Some(status) = job
            && status != record.job
        {
            record.to_mut().job = status;
        }
        // A rollback already wrote the record, scale status included.
        if let Cow::Owned(record) = record
            && !batch
                .changes
                .iter()
                .any(|c| matches!(c, Change::PutApp { .. }))
        {
            batch.changes.push(Change::PutApp {
                app: Box::new(record),
            });
        }
        // Until this batch commits, the room its deletes free is not another batch's.
        for (node, app, room) in std::mem::take(&mut self.released) {
            self.cluster.reserve(&node, &app, &room);
        }
        if !batch.changes.is_empty() {
            self.out.batches.push(batch);
        }
    }

    /// Removes the live replicas of lost nodes, so reconcile (or, for a job's
    /// runs, [`cron::decide`]) replaces them elsewhere, while the node stays
    /// as read; if it comes back later, its agent finds them gone and stops
    /// them. Returns the others, and the removed ones.
    fn drop_lost<'r>(
        &mut self,
        batch: &mut Batch,
        replicas: Vec<&'r Read<Replica>>,
    ) -> (Vec<&'r Read<Replica>>, Vec<&'r Replica>) {
        let (gone, kept): (Vec<_>, Vec<_>) = replicas.into_iter().partition(|r| {
            r.value
                .node
                .as_deref()
                .is_some_and(|n| self.lost.contains_key(n))
                && !r.value.phase.is_terminal()
        });
        let mut guarded: Vec<&str> = Vec::new();
        for r in &gone {
            let name = r.value.node.as_deref().unwrap_or_default();
            if !guarded.contains(&name) {
                guarded.push(name);
                batch.changes.push(Change::KeepNode {
                    name: name.to_string(),
                    expect: self.lost[name],
                });
            }
            let (r, expect) = (&r.value, r.mod_revision);
            let node = r.node.as_deref().unwrap_or_default();
            let why = match self.lost[node] {
                Expect::Absent => "was deleted",
                Expect::At(_) => "is not ready",
            };
            batch.event(
                EventType::Warning,
                "Rescheduled",
                format!("replica/{}/{}", r.app, r.id),
                Some(&r.app),
                format!(
                    "node {node} {why}; replica {} will be replaced elsewhere",
                    r.id
                ),
            );
            self.remove(batch, r, expect);
        }
        (kept, gone.into_iter().map(|r| &r.value).collect())
    }

    /// A delete of `r`, giving its room to this app's placements (they commit
    /// in the same batch), never to another batch's.
    fn remove(&mut self, batch: &mut Batch, r: &Replica, expect: u64) {
        if let (true, Some(node)) = (r.is_active(), &r.node) {
            let room = Capacity::of(&r.resources);
            self.cluster.release(node, &r.app, &room);
            self.released.push((node.clone(), r.app.clone(), room));
        }
        batch.changes.push(Change::DeleteReplica {
            app: r.app.clone(),
            id: r.id.clone(),
            expect,
        });
    }

    /// Sizes the app by its load and the schedule ([`autoscale::decide`]),
    /// recording the events. Returns the app record as it is to be stored
    /// (owned when it changed, so it is to be written) and the size in effect.
    fn autoscale<'a>(
        &self,
        batch: &mut Batch,
        app: &'a App,
        replicas: &[&Read<Replica>],
    ) -> (Cow<'a, App>, u32) {
        let key = app.spec.key();
        // Nothing was measured before the control plane started, whatever a
        // missing or default `Load` says: that must not pass for idleness.
        let start = self.world.started_at;
        let floored;
        let load = match self.world.measurements.get(&key) {
            Some(m) if m.load.since >= start => &m.load,
            m => {
                floored = Load {
                    since: start,
                    ..m.map(|m| m.load.clone()).unwrap_or_default()
                };
                &floored
            }
        };
        let ready = replicas
            .iter()
            .filter(|r| r.value.phase == Phase::Ready)
            .count();
        let ready = u32::try_from(ready).unwrap_or(u32::MAX);
        let decision =
            autoscale::decide_within(app, load, ready, self.now, || self.quota_room(app));
        for (reason, message) in &decision.events {
            batch.event(
                EventType::Normal,
                reason,
                format!("app/{key}"),
                Some(&key),
                message.clone(),
            );
        }
        let record = if decision.changes(app) {
            Cow::Owned(decision.record(app))
        } else {
            Cow::Borrowed(app)
        };
        (record, decision.replicas)
    }

    /// How many replicas `app` may run under its namespace's quota, beside what the
    /// namespace's other apps run now; `None` without a quota.
    fn quota_room(&self, app: &App) -> Option<u32> {
        let quota = self.world.quotas.get(&app.spec.namespace)?;
        let key = app.spec.key();
        let (mut replicas, mut cpu, mut memory) = (0u64, 0u64, 0u64);
        for other in self.world.apps.values().map(|r| &r.value) {
            if other.spec.namespace != app.spec.namespace || other.spec.key() == key {
                continue;
            }
            let n = u64::from(autoscale::running(other));
            let asks = &other.spec.resources.requests;
            replicas += n;
            cpu += n * u64::from(asks.cpu_millis);
            memory = memory.saturating_add(n.saturating_mul(asks.memory_bytes));
        }
        let asks = &app.spec.resources.requests;
        let mut room = u64::from(u32::MAX);
        if let Some(cap) = quota.replicas {
            room = room.min(cap.saturating_sub(replicas));
        }
        if let Some(cap) = quota.cpu_millis
            && asks.cpu_millis > 0
        {
            room = room.min(cap.saturating_sub(cpu) / u64::from(asks.cpu_millis));
        }
        if let Some(cap) = quota.memory_bytes
            && asks.memory_bytes > 0
        {
            room = room.min(cap.saturating_sub(memory) / asks.memory_bytes);
        }
        Some(u32::try_from(room).unwrap_or(u32::MAX))
    }

    /// Moves the app's rollout on by what its replicas and the gateways show;
    /// `a` is the app at the size in effect, `record` as it is stored (what a
    /// rollback rewrites). Returns the replica counts it asks for, or `None`
    /// if it rolled back.
    fn advance_rollout(
        &mut self,
        batch: &mut Batch,
        a: &App,
        record: &App,
        replicas: &[Replica],
    ) -> Option<Mode> {
        let key = a.spec.key();
        let previous = self.world.rollouts.get(&key);
        let expect = previous.map_or(Expect::Absent, |p| Expect::At(p.mod_revision));
        let status = match previous {
            Some(p) if p.value.revision == a.revision => p.value.clone(),
            _ => rollout::start(a, previous.map(|p| &p.value), self.now),
        };
        let measurements = self.world.measurements.get(&key);
        let measured = measured(a, &status, measurements);
        let mut decision = rollout::decide(
            a,
            &status,
            replicas,
            measured
                .as_ref()
                .map(|(canary, stable)| Measured { canary, stable }),
            self.now,
        );
        if let Some(rb) = &decision.roll_back {
            self.roll_back(batch, record, &decision.status, expect, rb);
            return None;
        }
        // A revision `rollout undo` made, once rolled out, does not fall back to the revision
        // the user undid if it crashes: that was left on purpose (a crash is said instead).
        if decision.status.phase == RolloutPhase::Complete
            && let Some(rev) = self.world.revisions.get(&(key.clone(), a.revision))
            && rev.value.undid.is_some()
            && rev.value.undid == decision.status.previous_stable
        {
            decision.status.previous_stable = None;
        }
        // A canary step that began now (or whose baseline was lost) is judged
        // on what is served from here on.
        if let (Some(step), Some(_)) = (
            decision.status.step_started_at,
            decision.status.split(&a.spec.rollout),
        ) && measurements
            .and_then(|m| m.baseline.as_ref())
            .is_none_or(|b| b.step != step)
        {
            let totals = measurements.map(|m| m.totals.clone()).unwrap_or_default();
            self.out
                .baselines
                .push((key.clone(), Baseline { step, totals }));
        }
        let mode = rollout::mode(a, Some(&decision.status));
        if previous.is_some_and(|p| p.value.same_state(&decision.status)) {
            return Some(mode);
        }
        if let Some((kind, reason, message)) = decision.event {
            batch.event(kind, reason, format!("app/{key}"), Some(&key), message);
        }
        // How the revision's rollout ended, for its history: rolled out, or (a new app, with
        // nothing to fall back to) failed, before its completion or after it; a new app's
        // rollout that fails its deadline and gets there later rolls out after all.
        let outcome = match decision.status.phase {
            RolloutPhase::Complete => Some("rolled out".to_string()),
            RolloutPhase::Failed => Some(format!("failed: {}", decision.status.message)),
            _ => None,
        };
        if let Some(outcome) = outcome
            && decision.status.revision == a.revision
            && let Some(rev) = self.world.revisions.get(&(key.clone(), a.revision))
            && rev
                .value
                .outcome
                .as_deref()
                .is_none_or(|o| o == "rolled out" || o.starts_with("failed: "))
            && rev.value.outcome.as_deref() != Some(outcome.as_str())
        {
            let mut revision = Box::new(rev.value.clone());
            revision.outcome = Some(outcome);
            batch.changes.push(Change::PutRevision {
                revision,
                expect: rev.mod_revision,
            });
        }
        batch.changes.push(Change::PutRollout {
            status: decision.status,
            expect,
        });
        Some(mode)
    }

    /// Goes back to revision `rb.to` (see [`rollout::roll_back`]).
    fn roll_back(
        &mut self,
        batch: &mut Batch,
        app: &App,
        status: &RolloutStatus,
        expect: Expect,
        rb: &rollout::RollBack,
    ) {
        let key = app.spec.key();
        let Some(target) = self.world.revisions.get(&(key.clone(), rb.to)) else {
            self.out.warnings.push(format!(
                "app {key}: revision {} to roll back to is missing",
                rb.to
            ));
            return;
        };
        let bad = self.world.revisions.get(&(key, status.revision));
        let volumes = Volumes {
            records: &self.world.volumes,
            used: &self.world.volume_usage,
        };
        roll_back_into(
            batch,
            app,
            status,
            expect,
            &target.value,
            bad,
            rb,
            &volumes,
            self.now,
        );
    }

    /// One replica of `app` to move, and where it is in `existing`, if the app's
    /// replicas are spread unevenly: some node holds at least two more of them
    /// than the node a new replica of it would go to (off that node). With the
    /// spread strategy the nodes themselves are evened out too: a replica leaves
    /// the most allocated of its app's nodes when the node it would go to stays
    /// no more allocated than that one after the move, and holds fewer of the
    /// app's replicas (so no two nodes trade a replica back and forth). Only a
    /// settled app moves, one replica at a time: every replica serving its
    /// current revision (for its `min_ready`), as many as it wants (so neither a rollout nor the
    /// autoscaler is fought), none on a node being drained, no volume pinning
    /// it, and fewer than [`REBALANCE_MOVES`] moves in flight cluster-wide. Before evening
    /// out, a replica on a node its app's `node_selector` no longer matches (the selector or
    /// the node's labels changed) moves to one it does, as Kubernetes rolls pods when their
    /// nodeSelector changes; that happens with `--no-rebalance` too.
    fn rebalance(
        &mut self,
        batch: &mut Batch,
        app: &App,
        existing: &[&Read<Replica>],
    ) -> Option<(usize, Replica, Vec<String>)> {
        let key = app.spec.key();
        if self.moves >= REBALANCE_MOVES
            || app.spec.component.kind == Kind::Job
            || existing.len() != app.spec.replicas as usize
            || self
                .world
                .rollouts
                .get(&key)
                .is_some_and(|s| !s.value.phase.is_done())
        {
            return None;
        }
        let revision = self.world.revisions.get(&(key.clone(), app.revision))?;
        if !revision.value.template.volumes.is_empty() {
            return None;
        }
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for r in existing {
            let r = &r.value;
            let node = r.node.as_deref()?;
            if r.moving()
                || r.revision != app.revision
                || !r.available(app.spec.rollout.min_ready_ms, self.now)
                || self.draining.contains(node)
            {
                return None;
            }
            *counts.entry(node).or_default() += 1;
        }
        let resources = &revision.value.template.resources;
        let req = Request::new(resources, &app.spec.placement);
        let room = Capacity::of(resources);
        // Off `from`, and off where a given-up move of one of its replicas there went.
        let off = |from: &str| -> Vec<String> {
            let mut off = vec![from.to_string()];
            for r in existing
                .iter()
                .filter(|r| r.value.node.as_deref() == Some(from))
            {
                off.extend(r.value.avoid.iter().cloned());
            }
            off
        };
        let selector = &app.spec.placement.node_selector;
        let misplaced: Vec<&str> = counts
            .keys()
            .copied()
            .filter(|n| {
                self.world
                    .nodes
                    .get(*n)
                    .is_some_and(|node| !matches_selector(&node.value, selector))
            })
            .collect();
        // The first misplaced node whose replica has somewhere to go: one that cannot move
        // does not hold the others. Where its earlier moves went is avoided only while
        // another node fits: a node the selector alone now matches (the one a replica was
        // balanced off, say) is better than one it does not.
        for from in misplaced {
            let mut avoided = off(from);
            let mut to = self.cluster.best_avoiding(&key, &req, &avoided);
            if to.is_none() {
                avoided = vec![from.to_string()];
                to = self.cluster.best_avoiding(&key, &req, &avoided);
            }
            if let Some(to) = to {
                let why = format!(
                    "which the app's node_selector no longer matches, to node {to}, which it does"
                );
                let from = from.to_string();
                return self.start_move(batch, &key, existing, &from, &why, avoided);
            }
        }
        if !self.world.rebalance {
            return None;
        }
        // The node with the most (the first by name among equals).
        let (mut from, mut most) = counts
            .iter()
            .map(|(n, c)| (*n, *c))
            .reduce(|best, next| if next.1 > best.1 { next } else { best })?;
        let mut to = self.cluster.best_avoiding(&key, &req, &off(from))?;
        let mut there = counts.get(to).copied().unwrap_or(0);
        if most < there + 2 {
            if self.cluster.strategy() != Strategy::Spread {
                return None;
            }
            let cluster = &self.cluster;
            let usage = |n: &str| cluster.usage(n, &room).unwrap_or((0.0, 0.0));
            from = counts
                .keys()
                .copied()
                .reduce(|a, b| if usage(b).0 > usage(a).0 { b } else { a })?;
            most = counts[from];
            to = self.cluster.best_avoiding(&key, &req, &off(from))?;
            there = counts.get(to).copied().unwrap_or(0);
            let usage = |n: &str| self.cluster.usage(n, &room).unwrap_or((0.0, 0.0));
            let ((was, left), (will, added)) = (usage(from), usage(to));
            if there >= most || will + added > was - left {
                return None;
            }
        }
        let why =
            format!("which runs {most} of the app's replicas, to node {to}, which runs {there}");
        let avoided = off(from);
        let from = from.to_string();
        self.start_move(batch, &key, existing, &from, &why, avoided)
    }

    /// A serving replica of the app's revision that mounts volumes, on a node its app's
    /// `node_selector` no longer matches, cannot move as others do (its volumes are bound to
    /// that node): said once, in its `note` and a `Pinned` warning, rather than left there
    /// silently; the note goes when the selector matches again. Returns it as it is to be
    /// written.
    fn note_pinned(
        &self,
        batch: &mut Batch,
        app: &App,
        existing: &[&Read<Replica>],
    ) -> Option<(usize, Replica)> {
        let key = app.spec.key();
        let revision = self.world.revisions.get(&(key.clone(), app.revision))?;
        let pinned = !revision.value.template.volumes.is_empty();
        let selector = &app.spec.placement.node_selector;
        let (i, r, note) = existing.iter().enumerate().find_map(|(i, r)| {
            let node = r.value.node.as_deref()?;
            let off = pinned
                && r.value.serving()
                && r.value.revision == app.revision
                && self
                    .world
                    .nodes
                    .get(node)
                    .is_some_and(|n| !matches_selector(&n.value, selector));
            let note = off.then(|| {
                format!(
                    "stays on node {node}, which the app's node_selector no longer matches: the volumes it mounts are bound there"
                )
            });
            (r.value.note != note).then_some((i, r, note))
        })?;
        let mut noted = r.value.clone();
        if let Some(note) = &note {
            batch.event(
                EventType::Warning,
                "Pinned",
                format!("replica/{key}/{}", noted.id),
                Some(&key),
                format!("replica {} {note}", noted.id),
            );
        }
        noted.note = note;
        Some((i, noted))
    }

    /// Marks the newest replica of the app on `from` (the one with the least warmed up to
    /// lose) as moving, saying `why` in the event. Returns it as it is to be written, and the
    /// nodes its replacement is to stay off (`avoided`: those the move was chosen off).
    fn start_move(
        &mut self,
        batch: &mut Batch,
        key: &AppKey,
        existing: &[&Read<Replica>],
        from: &str,
        why: &str,
        avoided: Vec<String>,
    ) -> Option<(usize, Replica, Vec<String>)> {
        let (i, r) = existing
            .iter()
            .enumerate()
            .filter(|(_, r)| r.value.node.as_deref() == Some(from))
            .max_by_key(|(_, r)| (r.value.created_at, &r.value.id))?;
        let mut moved = r.value.clone();
        moved.moving_since = Some(self.now);
        moved.updated_at = self.now;
        self.moves += 1;
        batch.event(
            EventType::Normal,
            "Rebalancing",
            format!("replica/{key}/{}", moved.id),
            Some(key),
            format!(
                "moving replica {} off node {from}, {why}: its replacement starts first",
                moved.id
            ),
        );
        Some((i, moved, avoided))
    }

    /// A move whose replacement is not serving within the app's progress deadline is given
    /// up: the replica stays where it is, no longer moving (so reconcile removes the surplus
    /// replacement, the least ready first), and it avoids the nodes its replacements were
    /// tried on, so the next move of it goes elsewhere or not at all. Returns the replica as
    /// it is to be written.
    fn give_up_move(
        &mut self,
        batch: &mut Batch,
        app: &App,
        existing: &[&Read<Replica>],
    ) -> Option<(usize, Replica)> {
        let deadline = app.spec.rollout.progress_deadline_ms;
        let (i, r) = existing.iter().enumerate().find(|(_, r)| {
            r.value
                .moving_since
                .is_some_and(|since| self.now.saturating_sub(since) > deadline)
        })?;
        let since = r.value.moving_since?;
        let tried: Vec<String> = existing
            .iter()
            .filter(|o| {
                o.value.created_at >= since
                    && !o.value.available(app.spec.rollout.min_ready_ms, self.now)
            })
            .filter_map(|o| o.value.node.clone())
            .collect();
        let mut kept = r.value.clone();
        kept.moving_since = None;
        kept.updated_at = self.now;
        for node in &tried {
            if !kept.avoid.contains(node) {
                kept.avoid.push(node.clone());
            }
        }
        self.moves = self.moves.saturating_sub(1);
        let key = app.spec.key();
        let on = match tried.as_slice() {
            [] => "no replacement could be placed".to_string(),
            nodes => format!("its replacement on {} is not serving", nodes.join(", ")),
        };
        batch.event(
            EventType::Warning,
            "RebalanceAbandoned",
            format!("replica/{key}/{}", kept.id),
            Some(&key),
            format!(
                "replica {} stays on node {}: {on} after {} s (progress_deadline)",
                kept.id,
                kept.node.as_deref().unwrap_or("?"),
                deadline / 1000
            ),
        );
        Some((i, kept))
    }

    /// Replicas whose node says liveness keeps failing there through restarts
    /// are replaced on another node if one could take them (their node keeps
    /// restarting them, with backoff, until then). Returns how many were
    /// removed and the nodes their replacements should avoid.
    fn replace_failing(
        &mut self,
        batch: &mut Batch,
        app: &App,
        existing: &mut Vec<&Read<Replica>>,
    ) -> Replacements {
        let mut avoid = Replacements::default();
        let mut kept = Vec::with_capacity(existing.len());
        for r in existing.drain(..) {
            let failing =
                r.value.kind != Kind::Job && r.value.reason.as_deref() == Some(LIVENESS_FAILED);
            let node = r.value.node.clone().unwrap_or_default();
            let elsewhere: Vec<String> = std::iter::once(&node)
                .chain(&r.value.avoid)
                .cloned()
                .collect();
            let req = Request::new(&r.value.resources, &app.spec.placement);
            if !failing || !self.cluster.fits_avoiding(&r.value.app, &req, &elsewhere) {
                kept.push(r);
                continue;
            }
            let (r, expect) = (&r.value, r.mod_revision);
            self.remove(batch, r, expect);
            avoid.revisions.push(r.revision);
            batch.event(
                EventType::Warning,
                "Replacing",
                format!("replica/{}/{}", r.app, r.id),
                Some(&r.app),
                format!(
                    "replica {} kept failing its liveness probe on node {node} after {} restarts; replacing it on another node",
                    r.id, r.restarts
                ),
            );
            for n in elsewhere {
                if !avoid.nodes.contains(&n) {
                    avoid.nodes.push(n);
                }
            }
            avoid.count += 1;
        }
        *existing = kept;
        avoid
    }

    /// A job's runs: starts, skips, replaces and trims them as
    /// [`cron::decide`] says, and places those pending. Takes the runs out of
    /// `existing` (all its replicas, if the job is scheduled), leaving reconcile
    /// the rest; `lost` are replicas removed this pass with their node.
    /// Returns the app's job status after the decision.
    fn job_runs(
        &mut self,
        batch: &mut Batch,
        app: &App,
        existing: &mut Vec<&Read<Replica>>,
        lost: &[&Replica],
        ids: &mut impl Ids,
    ) -> shoal_core::JobStatus {
        let key = app.spec.key();
        let scheduled = app.spec.runs.schedule.is_some();
        let is_run = |r: &Replica| scheduled || r.scheduled_at.is_some();
        let (runs, rest): (Vec<&Read<Replica>>, Vec<&Read<Replica>>) =
            existing.drain(..).partition(|r| is_run(&r.value));
        *existing = rest;
        let lost: Vec<&Replica> = lost.iter().copied().filter(|r| is_run(r)).collect();
        let values: Vec<&Replica> = runs.iter().map(|r| &r.value).collect();
        let decided = cron::decide(app, &values, &lost, self.now);
        for (kind, reason, message) in decided.events {
            batch.event(kind, reason, format!("app/{key}"), Some(&key), message);
        }
        let mut pending: Vec<(Replica, Expect)> = Vec::new();
        for r in runs {
            if decided.delete.contains(&r.value.id) {
                self.remove(batch, &r.value, r.mod_revision);
            } else if r.value.node.is_none() && r.value.phase == Phase::Pending {
                pending.push((r.value.clone(), Expect::At(r.mod_revision)));
            }
        }
        let starts = decided
            .restart
            .iter()
            .map(|at| (*at, None))
            .chain(decided.start.map(|s| (Some(s.scheduled_at), Some(s.why))));
        for (scheduled_at, why) in starts {
            let Some(revision) = self.world.revisions.get(&(key.clone(), app.revision)) else {
                self.out.warnings.push(format!(
                    "app {key} points at a missing revision {}",
                    app.revision
                ));
                break;
            };
            let mut replica = new_replica(&revision.value, Vec::new(), self.now, ids);
            replica.scheduled_at = scheduled_at;
            if let Some(why) = why {
                batch.event(
                    EventType::Normal,
                    "JobStarted",
                    format!("replica/{key}/{}", replica.id),
                    Some(&key),
                    format!("run {} started {why}", replica.id),
                );
            }
            pending.push((replica, Expect::Absent));
        }
        for (replica, expect) in pending {
            self.place(batch, app, replica, expect);
        }
        decided.status
    }

    /// Creates and removes replicas as the rollout's `mode` asks, then places
    /// what is pending.
    fn reconcile(
        &mut self,
        batch: &mut Batch,
        app: &App,
        existing: Vec<&Read<Replica>>,
        mode: Mode,
        replaced: Replacements,
        ids: &mut impl Ids,
    ) {
        let key = app.spec.key();
        let current: Vec<Replica> = existing.iter().map(|r| r.value.clone()).collect();
        let draining = &self.draining;
        let replace =
            |r: &Replica| r.moving() || r.node.as_deref().is_some_and(|n| draining.contains(n));
        let decided = reconcile(app, &current, replace, mode, self.now);
        let mut pending: Vec<(Replica, Expect)> = Vec::new();
        for r in existing {
            if decided.delete.contains(&r.value.id) {
                self.remove(batch, &r.value, r.mod_revision);
                batch.event(
                    EventType::Normal,
                    "Killing",
                    format!("replica/{key}/{}", r.value.id),
                    Some(&key),
                    format!("stopping replica {}", r.value.id),
                );
            } else if r.value.node.is_none() && r.value.phase == Phase::Pending {
                pending.push((r.value.clone(), Expect::At(r.mod_revision)));
            }
        }
        let stable = match mode {
            Mode::Split { stable, .. } => stable,
            Mode::Roll | Mode::Hold => app.revision,
        };
        // Per revision: how many to create, and how many of those replace failing replicas,
        // which keep off the nodes that failed them.
        let mut wanted = vec![
            (app.revision, decided.create, replaced.count),
            (stable, decided.create_stable, 0),
        ];
        // A paused rollout holds the counts per revision where they are: what a failing
        // replica or a lost node took away comes back as it was, or nothing would heal.
        if mode == Mode::Hold {
            wanted.extend(replaced.revisions.iter().map(|&number| (number, 1, 1)));
            wanted.extend(replaced.lost_revisions.iter().map(|&number| (number, 1, 0)));
        }
        for (number, count, replacing) in wanted {
            if count == 0 {
                continue;
            }
            let Some(revision) = self.world.revisions.get(&(key.clone(), number)) else {
                self.out
                    .warnings
                    .push(format!("app {key} points at a missing revision {number}"));
                continue;
            };
            for i in 0..count {
                let avoid = if i < replacing {
                    replaced.nodes.clone()
                } else {
                    Vec::new()
                };
                let replica = new_replica(&revision.value, avoid, self.now, ids);
                pending.push((replica, Expect::Absent));
            }
        }
        for (replica, expect) in pending {
            self.place(batch, app, replica, expect);
        }
    }

    /// Puts a pending replica on a node, or says why it fits nowhere. A replica mounting a
    /// bound volume goes to the volume's node; one mounting an unbound volume binds it to
    /// where it goes, in its batch.
    fn place(&mut self, batch: &mut Batch, app: &App, mut replica: Replica, expect: Expect) {
        let req = Request::new(&replica.resources, &app.spec.placement);
        let object = format!("replica/{}/{}", replica.app, replica.id);
        let ns = replica.app.namespace.clone();
        let volumes: Vec<String> = self
            .world
            .revisions
            .get(&(replica.app.clone(), replica.revision))
            .map(|r| {
                r.value
                    .template
                    .volumes
                    .iter()
                    .map(|v| v.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut pinned: Option<String> = None;
        for name in &volumes {
            let key = (ns.clone(), name.clone());
            let node = self.bound.get(&key).cloned().or_else(|| {
                self.world
                    .volumes
                    .get(&key)
                    .and_then(|v| v.value.node.clone())
            });
            match (&pinned, node) {
                // Bound to two different nodes: it fits nowhere.
                (Some(p), Some(n)) if *p != n => pinned = Some(String::new()),
                (None, Some(n)) => pinned = Some(n),
                _ => {}
            }
        }
        let placed = match &pinned {
            Some(node) => self.cluster.place_pinned(&replica.app, &req, node),
            None => self
                .cluster
                .place_avoiding(&replica.app, &req, &replica.avoid),
        };
        match placed {
            Ok(p) => {
                for name in &volumes {
                    let key = (ns.clone(), name.clone());
                    if self.bound.contains_key(&key) {
                        continue;
                    }
                    if let Some(v) = self.world.volumes.get(&key)
                        && v.value.node.is_none()
                    {
                        let mut volume = v.value.clone();
                        volume.node = Some(p.node.name.clone());
                        batch.event(
                            EventType::Normal,
                            "VolumeBound",
                            format!("volume/{ns}/{name}"),
                            Some(&replica.app),
                            format!("volume {name} bound to node {}", p.node.name),
                        );
                        batch.changes.push(Change::PutVolume {
                            volume,
                            expect: v.mod_revision,
                        });
                        self.bound.insert(key, p.node.name.clone());
                    }
                }
                replica.node = Some(p.node.name.clone());
                replica.message = None;
                replica.updated_at = self.now;
                batch.event(
                    EventType::Normal,
                    "Scheduled",
                    object,
                    Some(&replica.app),
                    format!("replica {} assigned to node {}", replica.id, p.node.name),
                );
            }
            Err(why) => {
                let message = why.to_string();
                if expect != Expect::Absent && replica.message.as_deref() == Some(&message) {
                    return; // already says so; don't write or repeat the event
                }
                replica.message = Some(message.clone());
                replica.updated_at = self.now;
                batch.event(
                    EventType::Warning,
                    "FailedScheduling",
                    object,
                    Some(&replica.app),
                    message,
                );
            }
        }
        batch.changes.push(Change::PutReplica { replica, expect });
    }

    /// Replicas and rollouts of apps that are gone go with them, one batch per
    /// app, applied only while the app is still absent.
    fn deleted_apps(&mut self, gone: BTreeSet<&AppKey>) {
        for key in gone {
            let mut batch = Batch::new(Scope::App(key.clone()), Some(Expect::Absent));
            for r in self
                .world
                .replicas
                .get(key)
                .into_iter()
                .flat_map(BTreeMap::values)
            {
                batch.changes.push(Change::DeleteReplica {
                    app: key.clone(),
                    id: r.value.id.clone(),
                    expect: r.mod_revision,
                });
            }
            if let Some(status) = self.world.rollouts.get(key) {
                batch.changes.push(Change::DeleteRollout {
                    app: key.clone(),
                    expect: status.mod_revision,
                });
            }
            if !batch.changes.is_empty() {
                self.out.batches.push(batch);
            }
        }
    }
}

/// The volumes a rollback may resize, by namespace and name: as read, and what their nodes
/// last measured them holding.
#[derive(Debug, Clone, Copy)]
pub struct Volumes<'a> {
    pub records: &'a BTreeMap<(String, String), Read<Volume>>,
    pub used: &'a BTreeMap<(String, String), u64>,
}

/// Adds to `batch` going back to `target` (the rollout `status`, stored as
/// `expect`, failed or was aborted): the app, its rollout, the abandoned
/// revision's outcome (`bad`, as read), the sizes `target` gives the volumes it
/// mounts, and events. What the controller and `shoal rollout abort` write.
#[allow(clippy::too_many_arguments)]
pub fn roll_back_into(
    batch: &mut Batch,
    app: &App,
    status: &RolloutStatus,
    expect: Expect,
    target: &Revision,
    bad: Option<&Read<Revision>>,
    rb: &rollout::RollBack,
    volumes: &Volumes<'_>,
    now: Millis,
) {
    let key = app.spec.key();
    let done = rollout::roll_back(app, target, status, rb, now);
    // Its writers limit a volume to the size their own spec gives, so the record follows, as
    // `rollout undo` does; a volume that now holds more keeps its size (the rollback goes
    // ahead, and says so). One deleted since is not made again.
    for mount in &target.template.volumes {
        let name = (key.namespace.clone(), mount.name.clone());
        let Some(read) = volumes.records.get(&name) else {
            continue;
        };
        match read
            .value
            .clone()
            .sized(mount, volumes.used.get(&name).copied())
        {
            Ok(volume) if volume != read.value => batch.changes.push(Change::PutVolume {
                volume,
                expect: read.mod_revision,
            }),
            Ok(_) => {}
            Err(shrunk) => batch.event(
                EventType::Warning,
                "VolumeNotResized",
                format!("volume/{}/{}", key.namespace, mount.name),
                Some(&key),
                format!(
                    "revision {}: {}; it stays at {}",
                    target.number,
                    shrunk.say(&mount.name),
                    shoal_core::quantity::format_memory(read.value.size_bytes)
                ),
            ),
        }
    }
    batch.changes.push(Change::PutApp {
        app: Box::new(done.app),
    });
    batch.changes.push(Change::PutRollout {
        status: done.status,
        expect,
    });
    if let Some(bad) = bad {
        let mut revision = Box::new(bad.value.clone());
        revision.outcome = Some(done.outcome);
        batch.changes.push(Change::PutRevision {
            revision,
            expect: bad.mod_revision,
        });
    }
    let (kind, reason, message) = done.event;
    batch.event(kind, reason, format!("app/{key}"), Some(&key), message);
}

/// Replicas replaced this pass: how many, and the nodes their
/// replacements should keep off.
#[derive(Debug, Default)]
struct Replacements {
    count: usize,
    nodes: Vec<String>,
    /// The revision of each failing replica removed, for a paused rollout to replace.
    revisions: Vec<u64>,
    /// A paused rollout's replicas removed with their lost nodes: their revisions.
    lost_revisions: Vec<u64>,
}

/// What the canary and the stable revision served since the current step
/// began; zero for both until its baseline is taken.
fn measured(
    app: &App,
    status: &RolloutStatus,
    measurements: Option<&Measurements>,
) -> Option<(RevisionStats, RevisionStats)> {
    let (canary, _) = status.split(&app.spec.rollout)?;
    let (stable, step) = (status.stable?, status.step_started_at?);
    let key = app.spec.key();
    let since = |revision| {
        measurements
            .and_then(|m| m.since_step(&key, revision, step))
            .unwrap_or_else(|| RevisionStats::new(key.clone(), revision))
    };
    Some((since(canary), since(stable)))
}

/// A new, unplaced replica of `revision`.
fn new_replica(
    revision: &Revision,
    avoid: Vec<String>,
    now: Millis,
    ids: &mut impl Ids,
) -> Replica {
    Replica {
        id: format!(
            "{}-{}-{}",
            revision.app.name,
            revision.number,
            ids.next_id()
        ),
        app: revision.app.clone(),
        revision: revision.number,
        kind: revision.template.component.kind,
        resources: revision.template.resources.clone(),
        node: None,
        phase: Phase::Pending,
        message: None,
        exit_code: None,
        restarts: 0,
        reason: None,
        avoid,
        scheduled_at: None,
        moving_since: None,
        note: None,
        ready_since: None,
        created_at: now,
        updated_at: now,
    }
}

/// Writes `replica`, changed from what `existing[i]` read, and has the rest of the pass see
/// it so: it is kept in `slot`, which outlives `existing`.
fn rewrite<'r>(
    batch: &mut Batch,
    slot: &'r mut Option<Read<Replica>>,
    existing: &mut [&'r Read<Replica>],
    i: usize,
    replica: Replica,
) {
    let read = slot.insert(Read::new(replica, existing[i].mod_revision));
    batch.changes.push(Change::PutReplica {
        replica: read.value.clone(),
        expect: Expect::At(read.mod_revision),
    });
    existing[i] = read;
}

/// Revisions an app keeps besides those in use, as Kubernetes' `revisionHistoryLimit`: enough
/// to roll back a few changes, and no longer every revision ever made in every snapshot.
pub const REVISION_HISTORY: usize = 10;

/// An app's revision past its history, with what must still be as read for it to go: the
/// revision's and the app's modification revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRevision {
    pub app: AppKey,
    pub number: u64,
    pub mod_revision: u64,
    pub app_mod_revision: u64,
}

/// Each app's revisions older than its newest `keep` and used by nothing: not the current one,
/// not a rollout's target, stable or rolled-back-from one, not any replica's.
pub fn stale_revisions(world: &World, keep: usize) -> Vec<StaleRevision> {
    let mut stale = Vec::new();
    for (key, app) in &world.apps {
        let mut in_use = vec![app.value.revision];
        if let Some(rollout) = world.rollouts.get(key) {
            let r = &rollout.value;
            in_use.extend(
                [
                    Some(r.revision),
                    r.stable,
                    r.rolled_back_from,
                    r.previous_stable,
                ]
                .into_iter()
                .flatten(),
            );
        }
        if let Some(replicas) = world.replicas.get(key) {
            in_use.extend(replicas.values().map(|r| r.value.revision));
        }
        let range = (key.clone(), 0)..=(key.clone(), u64::MAX);
        for ((_, number), revision) in world.revisions.range(range).rev().skip(keep) {
            if !in_use.contains(number) {
                stale.push(StaleRevision {
                    app: key.clone(),
                    number: *number,
                    mod_revision: revision.mod_revision,
                    app_mod_revision: app.mod_revision,
                });
            }
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::LoadSample;
    use crate::testing::{app_with, replica_at, scaled_app};
    use shoal_core::spec::AppKey;

    /// Ids `0`, `1`, … in order.
    #[derive(Default)]
    struct Counter(u32);

    impl Ids for Counter {
        fn next_id(&mut self) -> String {
            self.0 += 1;
            (self.0 - 1).to_string()
        }
    }

    const NOW: Millis = 100_000;

    fn node(name: &str) -> Read<Node> {
        Read::new(
            Node {
                name: name.into(),
                gateway: format!("{name}:8080"),
                capacity: Capacity {
                    cpu_millis: 4000,
                    memory_bytes: 8 << 30,
                    instances: 1000,
                },
                labels: Default::default(),
                state: NodeState::Ready,
                schedulable: true,
                draining: false,
                leaving: None,
                joined_at: 0,
                label_overrides: Default::default(),
            },
            1,
        )
    }

    fn key() -> AppKey {
        AppKey::new("default", "a")
    }

    /// A world with app `default/a` (`replicas` of revision `revision`, whose
    /// revisions 1..=revision exist), nodes `n` and `m` with fresh leases.
    fn world(replicas: u32, revision: u64, extra: &str) -> World {
        let app = app_with("http", replicas, revision, extra);
        let revisions = (1..=revision)
            .map(|n| {
                let r = Revision {
                    app: key(),
                    number: n,
                    template: app.spec.template(),
                    hash: String::new(),
                    created_at: 0,
                    cause: "created".into(),
                    undid: None,
                    outcome: None,
                };
                ((key(), n), Read::new(r, 10 + n))
            })
            .collect();
        World {
            apps: [(key(), Read::new(app, 5))].into(),
            revisions,
            replicas: BTreeMap::new(),
            nodes: [node("m"), node("n")]
                .into_iter()
                .map(|n| (n.value.name.clone(), n))
                .collect(),
            leases: Leases::default(),
            rollouts: BTreeMap::new(),
            volumes: BTreeMap::new(),
            volume_usage: BTreeMap::new(),
            measurements: BTreeMap::new(),
            quotas: BTreeMap::new(),
            started_at: 0,
            node_grace_ms: 3000,
            strategy: Strategy::Spread,
            rebalance: true,
        }
    }

    #[test]
    fn revisions_past_the_history_go_unless_in_use() {
        // Revisions 1..=14, the app at 14: the newest 3 stay, and 2 (a replica's) and 5 (the
        // rollout's stable one) stay in use.
        let mut w = with_replicas(world(1, 14, ""), &[replica_at("r", 2, Phase::Ready, 0)]);
        let rollout = RolloutStatus {
            app: key(),
            revision: 14,
            stable: Some(5),
            strategy: Default::default(),
            phase: RolloutPhase::Complete,
            paused: false,
            step: 0,
            step_started_at: None,
            ready: 1,
            progressed_at: 0,
            started_at: 0,
            rolled_back_from: None,
            previous_stable: None,
            message: String::new(),
        };
        w.rollouts.insert(key(), Read::new(rollout, 1));
        let stale = stale_revisions(&w, 3);
        let numbers: Vec<u64> = stale.iter().map(|s| s.number).collect();
        assert_eq!(numbers, [11, 10, 9, 8, 7, 6, 4, 3, 1]);
        assert_eq!((stale[0].mod_revision, stale[0].app_mod_revision), (21, 5));
        assert!(stale_revisions(&w, 14).is_empty());
    }

    fn with_replicas(mut w: World, replicas: &[Replica]) -> World {
        w.replicas = BTreeMap::new();
        for (i, r) in replicas.iter().enumerate() {
            w.replicas
                .entry(r.app.clone())
                .or_default()
                .insert(r.id.clone(), Read::new(r.clone(), 100 + i as u64));
        }
        w
    }

    fn app_mut(w: &mut World) -> &mut Read<App> {
        w.apps.get_mut(&key()).expect("app a")
    }

    fn replica_mut<'w>(w: &'w mut World, id: &str) -> &'w mut Read<Replica> {
        w.replicas
            .values_mut()
            .find_map(|rs| rs.get_mut(id))
            .expect("replica")
    }

    fn remove_replica(w: &mut World, id: &str) {
        for rs in w.replicas.values_mut() {
            rs.remove(id);
        }
    }

    fn on(mut r: Replica, node: &str) -> Replica {
        r.node = Some(node.into());
        r
    }

    /// A complete rollout of `revision`, as stored at mod revision 50.
    fn complete(w: &mut World, revision: u64) {
        let app = app_with("http", 1, revision, "");
        let mut s = rollout::start(&app, None, 0);
        s.phase = RolloutPhase::Complete;
        s.stable = Some(revision);
        w.rollouts.insert(key(), Read::new(s, 50));
    }

    fn app_batch(p: &Plan) -> &Batch {
        p.batches
            .iter()
            .find(|b| b.scope == Scope::App(key()))
            .expect("a batch for the app")
    }

    fn reasons(b: &Batch) -> Vec<&'static str> {
        b.events.iter().map(|e| e.reason).collect()
    }

    fn puts(b: &Batch) -> Vec<&Replica> {
        b.changes
            .iter()
            .filter_map(|c| match c {
                Change::PutReplica { replica, .. } => Some(replica),
                _ => None,
            })
            .collect()
    }

    fn deletes(b: &Batch) -> Vec<&str> {
        b.changes
            .iter()
            .filter_map(|c| match c {
                Change::DeleteReplica { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_app_gets_a_rollout_and_placed_replicas() {
        let w = world(2, 1, "");
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(p.batches.len(), 1);
        let b = app_batch(&p);
        assert_eq!(b.app, Some(Expect::At(5)), "guarded by the app as read");
        let placed = puts(b);
        assert_eq!(
            placed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a-1-0", "a-1-1"]
        );
        // Spread: one on each node, and both created absent.
        let mut nodes: Vec<_> = placed.iter().map(|r| r.node.clone().unwrap()).collect();
        nodes.sort();
        assert_eq!(nodes, ["m", "n"]);
        assert!(b.changes.iter().any(|c| matches!(
            c,
            Change::PutRollout { status, expect: Expect::Absent } if status.revision == 1
        )));
        assert!(b.changes.iter().all(|c| !matches!(
            c,
            Change::PutReplica {
                expect: Expect::At(_),
                ..
            }
        )));
        assert_eq!(reasons(b), ["Scheduled", "Scheduled"]);
        assert_eq!(b.placed().count(), 2);
    }

    #[test]
    fn the_same_world_gives_the_same_plan_and_a_steady_one_gives_none() {
        let w = world(2, 1, "");
        let a = plan(&w, NOW, &mut Counter::default());
        assert_eq!(a, plan(&w, NOW, &mut Counter::default()));

        let mut steady = with_replicas(
            world(2, 1, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        complete(&mut steady, 1);
        let p = plan(&steady, NOW, &mut Counter::default());
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn replicas_of_a_deleted_node_move_while_it_stays_deleted() {
        let mut w = with_replicas(
            world(2, 1, ""),
            &[on(replica_at("y", 1, Phase::Ready, 2), "n")],
        );
        complete(&mut w, 1);
        w.nodes.remove("n");
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["y"]);
        assert!(b.changes.contains(&Change::KeepNode {
            name: "n".into(),
            expect: Expect::Absent
        }));
        assert_eq!(puts(b)[0].node.as_deref(), Some("m"));
        assert!(b.events[0].message.contains("node n was deleted"), "{b:?}");
    }

    #[test]
    fn an_expired_lease_makes_the_node_not_ready_and_its_replicas_move() {
        let mut w = with_replicas(
            world(2, 1, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        w.leases.ages.insert("n".into(), 3001);
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(p.batches.len(), 1, "{p:?}");
        let nb = &p.batches[0];
        assert_eq!(nb.scope, Scope::Node("n".into()));
        assert!(matches!(
            &nb.changes[..],
            [Change::PutNode { node, expect: 1 }] if node.state == NodeState::NotReady
        ));
        assert_eq!(reasons(nb), ["NodeNotReady"]);

        // Once stored NotReady, its replicas move, while it stays so.
        let mut after = w.clone();
        let n = after.nodes.get_mut("n").unwrap();
        n.value.state = NodeState::NotReady;
        n.value.schedulable = true;
        n.mod_revision = 7;
        let p = plan(&after, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["y"]);
        assert!(b.changes.contains(&Change::KeepNode {
            name: "n".into(),
            expect: Expect::At(7)
        }));
        let placed = puts(b);
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].node.as_deref(), Some("m"), "not on the lost node");
        assert_eq!(reasons(b), ["Rescheduled", "Scheduled"]);

        assert_eq!(nb.events[0].kind, EventType::Warning);
        // One that said it was shutting down went quiet as expected: a Normal event.
        let mut leaving = w.clone();
        leaving.nodes.get_mut("n").unwrap().value.leaving =
            Some(shoal_core::Leaving { schedulable: true });
        let p = plan(&leaving, NOW, &mut Counter::default());
        let event = &p.batches[0].events[0];
        assert_eq!(
            (event.kind, event.reason),
            (EventType::Normal, "NodeNotReady")
        );
        assert!(event.message.contains("shut down"), "{event:?}");

        // Within the grace: nothing.
        w.leases.ages.insert("n".into(), 3000);
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
    }

    /// Leases are judged by their age on the controller's own clock, so a
    /// step of the wall clock (`now`), either way, expires nothing, and
    /// does not save a node that is silent.
    #[test]
    fn a_wall_clock_step_neither_expires_nor_keeps_a_lease() {
        let mut w = with_replicas(
            world(2, 1, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        w.leases.ages = [("m".to_string(), 900), ("n".to_string(), 100)].into();
        for now in [NOW + 3_600_000, NOW - 60_000] {
            assert!(plan(&w, now, &mut Counter::default()).is_empty());
        }
        w.leases.ages.insert("n".into(), 3001);
        for now in [NOW + 3_600_000, NOW - 60_000] {
            let p = plan(&w, now, &mut Counter::default());
            assert_eq!(p.batches.len(), 1, "{p:?}");
            assert_eq!(p.batches[0].scope, Scope::Node("n".into()));
        }
    }

    /// Nodes `a`, `b`, … (as many as `ages`), with lease ages `ages`; node
    /// `i` is NotReady where `not_ready[i]`.
    fn nodes_aged(ages: &[u64], not_ready: &[usize]) -> World {
        let mut w = world(0, 1, "");
        w.nodes.clear();
        for (i, age) in ages.iter().enumerate() {
            let name = ((b'a' + i as u8) as char).to_string();
            let mut n = node(&name);
            if not_ready.contains(&i) {
                n.value.state = NodeState::NotReady;
            }
            w.nodes.insert(name.clone(), n);
            w.leases.ages.insert(name, *age);
        }
        complete(&mut w, 1);
        w
    }

    /// The nodes a plan marks NotReady.
    fn marked(p: &Plan) -> Vec<&str> {
        p.batches
            .iter()
            .filter_map(|b| match &b.scope {
                Scope::Node(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// More than half of the nodes silent at once is a control plane that
    /// cannot hear them: none is marked, and a Warning says so once.
    #[test]
    fn most_nodes_silent_at_once_mark_none_and_warn_once() {
        for (ages, not_ready) in [
            // Both of two lost.
            (&[3001, 3001][..], &[][..]),
            // Two of three lost, or one lost and another late.
            (&[3001, 3500, 100][..], &[][..]),
            (&[3001, 1501, 100][..], &[][..]),
            // One lost, another already NotReady.
            (&[3001, 100, 100][..], &[1][..]),
        ] {
            let w = nodes_aged(ages, not_ready);
            let p = plan(&w, NOW, &mut Counter::default());
            assert!(marked(&p).is_empty(), "{ages:?} {not_ready:?}: {p:?}");
            assert!(p.held);
            assert_eq!(p.batches.len(), 1, "{p:?}");
            let b = &p.batches[0];
            assert_eq!(b.scope, Scope::Cluster);
            assert!(b.changes.is_empty());
            assert_eq!(reasons(b), ["NodeEvictionHeld"]);
            assert_eq!(b.events[0].kind, EventType::Warning);
            assert_eq!(p.warnings.len(), 1);

            // Still held at the next pass: the warning is not repeated.
            let mut again = w.clone();
            again.leases.held = true;
            let p = plan(&again, NOW, &mut Counter::default());
            assert!(p.held && p.is_empty(), "{p:?}");
        }
        // Half or fewer: the lost node is marked as usual.
        for (ages, not_ready) in [
            (&[3001, 100][..], &[][..]),
            (&[3001, 1500, 100][..], &[][..]),
            (&[3001, 100, 100, 100][..], &[1][..]),
        ] {
            let p = plan(&nodes_aged(ages, not_ready), NOW, &mut Counter::default());
            assert_eq!(marked(&p), ["a"], "{ages:?} {not_ready:?}: {p:?}");
            assert!(!p.held);
        }
    }

    /// A cluster of one has no majority to compare with: its node is
    /// judged alone.
    #[test]
    fn a_lone_silent_node_is_marked_not_ready() {
        let p = plan(&nodes_aged(&[3001], &[]), NOW, &mut Counter::default());
        assert_eq!(marked(&p), ["a"]);
        assert!(plan(&nodes_aged(&[3000], &[]), NOW, &mut Counter::default()).is_empty());
    }

    /// One node per pass, the longest silent first, and none within a grace
    /// of the last one marked.
    #[test]
    fn evictions_are_one_per_grace_longest_silent_first() {
        let mut w = nodes_aged(&[3500, 100, 9000, 100, 100], &[]);
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(marked(&p), ["c"]);
        assert_eq!(
            p.batches[0].events[0].message,
            "no heartbeat from node c for 9000 ms"
        );
        w.nodes.get_mut("c").unwrap().value.state = NodeState::NotReady;
        w.leases.since_eviction = Some(2999);
        assert!(marked(&plan(&w, NOW, &mut Counter::default())).is_empty());
        w.leases.since_eviction = Some(3000);
        assert_eq!(marked(&plan(&w, NOW, &mut Counter::default())), ["a"]);

        // Equally silent: the first by name.
        let w = nodes_aged(&[100, 4000, 4000, 100, 100], &[]);
        assert_eq!(marked(&plan(&w, NOW, &mut Counter::default())), ["b"]);
    }

    #[test]
    fn a_deleted_apps_replicas_and_rollout_go_while_it_stays_deleted() {
        let mut w = with_replicas(
            world(1, 1, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        w.apps.clear();
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(p.batches.len(), 1);
        let b = &p.batches[0];
        assert_eq!(b.app, Some(Expect::Absent));
        assert_eq!(
            b.changes,
            [
                Change::DeleteReplica {
                    app: key(),
                    id: "x".into(),
                    expect: 100
                },
                Change::DeleteRollout {
                    app: key(),
                    expect: 50
                }
            ]
        );
    }

    #[test]
    fn a_focused_pass_decides_for_its_apps_only_on_the_whole_clusters_room() {
        // App a wants a replica; b, outside the focus, fills node m and
        // wants one too. Node n is gone from this world: m is the only room.
        // a's instances are small enough for m: only b's replica is in the way.
        let mut w = world(1, 1, "[resources]\nlimits = { memory = \"1Mi\" }\n");
        complete(&mut w, 1);
        let mut m = node("m");
        let per = Capacity::of(&app_mut(&mut w).value.spec.resources);
        m.value.capacity = Capacity {
            cpu_millis: per.cpu_millis,
            memory_bytes: per.memory_bytes,
            instances: 1000,
        };
        w.nodes = [("m".to_string(), m)].into();
        let b_key = AppKey::new("default", "b");
        let mut b_app = app_with("http", 2, 1, "");
        b_app.spec.name = "b".into();
        w.apps.insert(b_key.clone(), Read::new(b_app, 6));
        let mut b_ready = on(replica_at("b-1-y", 1, Phase::Ready, 3), "m");
        b_ready.app = b_key.clone();
        let mut w = with_replicas(w, &[b_ready]);
        complete(&mut w, 1);

        let nothing = plan_apps(&w, &BTreeSet::new(), NOW, &mut Counter::default());
        assert!(nothing.is_empty(), "no focus, no decisions: {nothing:?}");

        let p = plan_apps(&w, &BTreeSet::from([key()]), NOW, &mut Counter::default());
        assert_eq!(p.batches.len(), 1, "b is not looked at");
        let b = app_batch(&p);
        assert_eq!(puts(b).len(), 1);
        assert_eq!(puts(b)[0].node, None, "m's room is b's: {:?}", puts(b)[0]);
        assert_eq!(reasons(b), ["FailedScheduling"]);

        // The full pass makes the same decision for a, and b's too.
        let full = plan(&w, NOW, &mut Counter::default());
        assert_eq!(full.batches.len(), 2);
        assert_eq!(app_batch(&full), b);
    }

    #[test]
    fn a_focused_pass_cleans_up_after_a_deleted_app_in_its_focus() {
        let mut w = with_replicas(
            world(1, 1, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        w.apps.clear();
        let focus = BTreeSet::from([key()]);
        assert_eq!(
            plan_apps(&w, &focus, NOW, &mut Counter::default()),
            plan(&w, NOW, &mut Counter::default())
        );
        assert_eq!(
            deletes(app_batch(&plan_apps(
                &w,
                &focus,
                NOW,
                &mut Counter::default()
            ))),
            ["x"]
        );
    }

    #[test]
    fn only_apps_with_something_in_motion_need_a_look() {
        // Settled: all replicas ready, the rollout complete, a fixed size.
        let mut w = with_replicas(
            world(1, 1, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        assert!(!needs_look(&w, &key(), NOW));

        // A replica starting, waiting for room or backing off.
        for phase in [Phase::Pending, Phase::Starting, Phase::CrashLoopBackOff] {
            replica_mut(&mut w, "x").value.phase = phase;
            assert!(needs_look(&w, &key(), NOW), "{phase:?}");
        }
        replica_mut(&mut w, "x").value.phase = Phase::Ready;

        // Ready for less than the app's min_ready: it is counted once it has served that long.
        app_mut(&mut w).value.spec.rollout.min_ready_ms = 10_000;
        replica_mut(&mut w, "x").value.ready_since = Some(NOW - 5_000);
        assert!(needs_look(&w, &key(), NOW));
        assert!(!needs_look(&w, &key(), NOW + 5_000));
        app_mut(&mut w).value.spec.rollout.min_ready_ms = 0;

        // A rollout in progress (its deadline and pauses run on the clock).
        let mut s = w.rollouts[&key()].clone();
        s.value.phase = RolloutPhase::Progressing;
        w.rollouts.insert(key(), s);
        assert!(needs_look(&w, &key(), NOW));
        complete(&mut w, 1);

        // Autoscaled: while it has replicas (idleness, load); not asleep at zero.
        let auto = with_app(w.clone(), scaled_app("[scale]\nmin = 0\nmax = 3\n"));
        assert!(needs_look(&auto, &key(), NOW));
        let mut asleep = auto;
        asleep.replicas.clear();
        app_mut(&mut asleep).value.spec.replicas = 0;
        assert!(
            !needs_look(&asleep, &key(), NOW),
            "woken by its measurements, not the clock"
        );

        // A schedule window or a job's schedule.
        let windows = "[scale]\nreplicas = 1\n[[scale.schedule]]\ncron = \"0 9 * * *\"\nduration = \"1h\"\nmin = 2\n";
        assert!(needs_look(
            &with_app(w.clone(), scaled_app(windows)),
            &key(),
            NOW
        ));
        assert!(needs_look(
            &job_world("schedule = \"*/5 * * * *\""),
            &key(),
            NOW
        ));

        // Deleted, with something left to clean up.
        w.apps.clear();
        assert!(needs_look(&w, &key(), NOW));
        w.replicas.clear();
        w.rollouts.clear();
        assert!(!needs_look(&w, &key(), NOW));
    }

    #[test]
    fn scaling_down_kills_the_surplus() {
        let mut w = with_replicas(
            world(1, 1, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["y"], "the newest goes");
        assert_eq!(reasons(b), ["Killing"]);
    }

    #[test]
    fn a_rollout_writes_only_when_its_state_changes() {
        // Revision 2 rolling over a complete revision 1: one new replica starting.
        let mut w = with_replicas(
            world(1, 2, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 2, Phase::Starting, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        let p = plan(&w, NOW, &mut Counter::default());
        let status = app_batch(&p)
            .changes
            .iter()
            .find_map(|c| match c {
                Change::PutRollout { status, expect } => {
                    assert_eq!(*expect, Expect::At(50));
                    Some(status.clone())
                }
                _ => None,
            })
            .expect("a new rollout");
        assert_eq!((status.revision, status.stable), (2, Some(1)));

        // Stored as decided, only the wording differing: nothing to write.
        let mut reworded = status.clone();
        reworded.message = "something else".into();
        w.rollouts.insert(key(), Read::new(reworded, 60));
        assert!(plan(&w, NOW + 10, &mut Counter::default()).is_empty());

        // The new replica ready: the old one goes and the rollout completes.
        replica_mut(&mut w, "y").value.phase = Phase::Ready;
        let p = plan(&w, NOW + 20, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["x"]);
        let mut w2 = w.clone();
        remove_replica(&mut w2, "x");
        let p = plan(&w2, NOW + 30, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["RolledOut"]);
        assert!(b.changes.iter().any(|c| matches!(
            c,
            Change::PutRevision { revision, expect: 12 }
                if revision.number == 2 && revision.outcome.as_deref() == Some("rolled out")
        )));
    }

    /// A new app's revision, with nothing to fall back to, is recorded as it ended: rolled
    /// out, then failed when its replica crash-loops within the deadline of that.
    #[test]
    fn a_new_apps_revision_that_fails_after_rolling_out_is_recorded_failed() {
        let mut w = with_replicas(
            world(1, 1, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "n")],
        );
        let outcome = |b: &Batch| {
            b.changes.iter().find_map(|c| match c {
                Change::PutRevision { revision, .. } => revision.outcome.clone(),
                _ => None,
            })
        };
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(outcome(b).as_deref(), Some("rolled out"));
        let status = b
            .changes
            .iter()
            .find_map(|c| match c {
                Change::PutRollout { status, .. } => Some(status.clone()),
                _ => None,
            })
            .expect("a rollout status");
        assert_eq!(status.phase, RolloutPhase::Complete);
        w.rollouts.insert(key(), Read::new(status, 60));
        w.revisions.get_mut(&(key(), 1)).unwrap().value.outcome = Some("rolled out".into());

        replica_mut(&mut w, "x").value.phase = Phase::CrashLoopBackOff;
        let p = plan(&w, NOW + 10, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["RolloutFailed"]);
        let failed = outcome(b).expect("the revision's outcome");
        assert!(
            failed.starts_with("failed: replica x of revision 1 is CrashLoopBackOff"),
            "{failed}"
        );
    }

    #[test]
    fn a_crash_looping_revision_is_rolled_back_without_reconciling() {
        let mut w = with_replicas(
            world(1, 2, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 2, Phase::CrashLoopBackOff, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(b.app, Some(Expect::At(5)));
        assert_eq!(reasons(b), ["RolledBack"]);
        let mut app = None;
        let mut status = None;
        let mut outcome = None;
        for c in &b.changes {
            match c {
                Change::PutApp { app: a } => app = Some(a),
                Change::PutRollout { status: s, .. } => status = Some(s),
                Change::PutRevision { revision, expect } => {
                    assert_eq!((revision.number, *expect), (2, 12));
                    outcome = revision.outcome.clone();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(app.unwrap().revision, 1);
        let status = status.unwrap();
        assert_eq!(
            (status.revision, status.phase, status.rolled_back_from),
            (1, RolloutPhase::RolledBack, Some(2))
        );
        assert!(outcome.unwrap().starts_with("rolled back: replica y"));
    }

    /// Rolling back gives the volumes the sizes the earlier revision gives them, as `rollout
    /// undo` does (its writers limit themselves to those), unless a volume holds more now.
    #[test]
    fn a_rollback_resizes_volumes_as_far_as_they_fit() {
        const MIB: u64 = 1 << 20;
        let rolled_back = |used: Option<u64>| {
            let mut w = with_replicas(
                world(1, 2, "[[volumes]]\nname = \"data\"\nmount = \"/data\"\n"),
                &[
                    on(replica_at("x", 1, Phase::Ready, 1), "m"),
                    on(replica_at("y", 2, Phase::CrashLoopBackOff, 2), "n"),
                ],
            );
            for (n, size) in [(1, MIB), (2, 4 * MIB)] {
                let r = &mut w.revisions.get_mut(&(key(), n)).unwrap().value;
                r.template.volumes[0].size_bytes = Some(size);
            }
            app_mut(&mut w).value.spec.volumes[0].size_bytes = Some(4 * MIB);
            let name = ("default".to_string(), "data".to_string());
            let volume = Volume {
                namespace: name.0.clone(),
                name: name.1.clone(),
                size_bytes: 4 * MIB,
                node: Some("n".into()),
                created_at: 0,
            };
            w.volumes.insert(name.clone(), Read::new(volume, 70));
            if let Some(used) = used {
                w.volume_usage.insert(name, used);
            }
            complete(&mut w, 1);
            let p = plan(&w, NOW, &mut Counter::default());
            let b = app_batch(&p).clone();
            let sizes: Vec<(u64, u64)> = b
                .changes
                .iter()
                .filter_map(|c| match c {
                    Change::PutVolume { volume, expect } => Some((volume.size_bytes, *expect)),
                    _ => None,
                })
                .collect();
            (sizes, b)
        };
        let (sizes, b) = rolled_back(Some(MIB / 2));
        assert_eq!(sizes, [(MIB, 70)], "resized to revision 1's size, guarded");
        assert_eq!(reasons(&b), ["RolledBack"]);
        let (sizes, _) = rolled_back(None);
        assert_eq!(sizes, [(MIB, 70)], "unmeasured: resized");
        let (sizes, b) = rolled_back(Some(3 * MIB));
        assert!(sizes.is_empty(), "it holds more than 1 MiB: {sizes:?}");
        assert_eq!(reasons(&b), ["VolumeNotResized", "RolledBack"]);
        assert_eq!(
            b.events[0].message,
            "revision 1: volume data holds 3Mi: size = \"1Mi\" is less, and its writers would fail; it stays at 4Mi"
        );
        assert!(
            b.changes
                .iter()
                .any(|c| matches!(c, Change::PutApp { app } if app.revision == 1)),
            "and the rollback goes ahead"
        );
    }

    /// A revision made by `rollout undo` completes with no fallback to the revision it
    /// undid: crashing later, it fails (and says so) rather than bring back what the user
    /// chose to leave. Any other revision keeps the stable one before it as its fallback.
    #[test]
    fn a_revision_made_by_undo_does_not_fall_back_to_the_one_undone() {
        let completed = |undid: Option<u64>| {
            let mut w = with_replicas(
                world(1, 3, ""),
                &[on(replica_at("r", 3, Phase::Ready, 1), "m")],
            );
            w.revisions.get_mut(&(key(), 3)).unwrap().value.undid = undid;
            complete(&mut w, 2);
            let s = &mut w.rollouts.get_mut(&key()).unwrap().value;
            *s = rollout::start(&w.apps[&key()].value, Some(&s.clone()), 0);
            let p = plan(&w, NOW, &mut Counter::default());
            app_batch(&p)
                .changes
                .iter()
                .find_map(|c| match c {
                    Change::PutRollout { status, .. } => Some(status.clone()),
                    _ => None,
                })
                .expect("the rollout written")
        };
        let undo = completed(Some(2));
        assert_eq!(
            (undo.phase, undo.stable, undo.previous_stable),
            (RolloutPhase::Complete, Some(3), None)
        );
        let applied = completed(None);
        assert_eq!(applied.previous_stable, Some(2));
    }

    /// Four ready replicas of `a`, all on node `m`, its rollout complete.
    fn lopsided() -> World {
        let replicas: Vec<Replica> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, id)| on(replica_at(id, 1, Phase::Ready, i as u64 + 1), "m"))
            .collect();
        let mut w = with_replicas(world(4, 1, ""), &replicas);
        complete(&mut w, 1);
        w
    }

    /// A replica on a node the app's node_selector no longer matches moves to one it
    /// does, new before old, `--no-rebalance` or not; none moves while none matches.
    #[test]
    fn a_replica_its_node_selector_no_longer_matches_moves() {
        let mut w = with_replicas(
            world(1, 1, "[placement]\nnode_selector = { zone = \"b\" }\n"),
            &[on(replica_at("r", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        w.rebalance = false;
        let label = |w: &mut World, node: &str, zone: &str| {
            let labels = &mut w.nodes.get_mut(node).unwrap().value.labels;
            labels.insert("zone".into(), zone.into());
        };
        label(&mut w, "m", "a");
        label(&mut w, "n", "a");
        let p = plan(&w, NOW, &mut Counter::default());
        assert!(
            p.batches
                .iter()
                .all(|b| !reasons(b).contains(&"Rebalancing")),
            "nowhere to go"
        );
        label(&mut w, "n", "b");
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Rebalancing", "Scheduled"]);
        assert!(deletes(b).is_empty(), "new before old");
        let put = puts(b);
        assert_eq!(put[0].node.as_deref(), Some("n"));
        assert_eq!((put[1].id.as_str(), put[1].moving_since), ("r", Some(NOW)));
        assert!(
            b.events[0]
                .message
                .contains("node_selector no longer matches"),
            "{:?}",
            b.events
        );
    }

    /// A replica whose volume binds it to a node its selector no longer matches stays, and
    /// says so once: in its note and a `Pinned` warning, not again while that stands.
    #[test]
    fn a_pinned_replica_off_its_selector_says_so_once() {
        let mut w = with_replicas(
            world(
                1,
                1,
                "[placement]\nnode_selector = { zone = \"b\" }\n[[volumes]]\nname = \"data\"\nmount = \"/data\"\n",
            ),
            &[on(replica_at("r", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        for (name, zone) in [("m", "a"), ("n", "b")] {
            let labels = &mut w.nodes.get_mut(name).unwrap().value.labels;
            labels.insert("zone".into(), zone.into());
        }
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Pinned"], "{:?}", b.events);
        assert!(deletes(b).is_empty(), "it stays");
        let put = puts(b);
        assert_eq!(put.len(), 1);
        let note = put[0].note.clone().unwrap();
        assert!(note.starts_with("stays on node m"), "{note}");
        assert_eq!(put[0].message, None, "the node's field is left to the node");
        replica_mut(&mut w, "r").value.note = Some(note);
        let p = plan(&w, NOW, &mut Counter::default());
        assert!(p.batches.is_empty(), "said once: {:?}", p.batches);
        // Its node matches again: the note goes, without a word.
        let labels = &mut w.nodes.get_mut("m").unwrap().value.labels;
        labels.insert("zone".into(), "b".into());
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert!(reasons(b).is_empty(), "{:?}", b.events);
        assert_eq!(puts(b)[0].note, None);
    }

    /// A replica whose move was given up on a node goes to another the next time: its
    /// replacement is placed off the nodes the move was chosen off.
    #[test]
    fn a_move_given_up_on_a_node_goes_elsewhere_next() {
        let mut r = on(replica_at("r", 1, Phase::Ready, 1), "m");
        r.avoid = vec!["n".into()];
        let mut w = with_replicas(
            world(1, 1, "[placement]\nnode_selector = { zone = \"b\" }\n"),
            &[r],
        );
        complete(&mut w, 1);
        let mut third = node("o");
        third.value.labels.insert("zone".into(), "b".into());
        w.nodes.insert("o".into(), third);
        for (name, zone) in [("m", "a"), ("n", "b")] {
            let labels = &mut w.nodes.get_mut(name).unwrap().value.labels;
            labels.insert("zone".into(), zone.into());
        }
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Rebalancing", "Scheduled"]);
        assert_eq!(puts(b)[0].node.as_deref(), Some("o"), "{:?}", b.events);
    }

    /// ... but to a node it avoids when that is the only one its selector matches: a replica
    /// balanced off node n, whose labels then change, goes back there.
    #[test]
    fn a_misplaced_replica_goes_back_to_a_node_it_avoided_when_only_that_matches() {
        let mut r = on(replica_at("r", 1, Phase::Ready, 1), "m");
        r.avoid = vec!["n".into()];
        let mut w = with_replicas(
            world(1, 1, "[placement]\nnode_selector = { zone = \"b\" }\n"),
            &[r],
        );
        complete(&mut w, 1);
        for (name, zone) in [("m", "a"), ("n", "b")] {
            let labels = &mut w.nodes.get_mut(name).unwrap().value.labels;
            labels.insert("zone".into(), zone.into());
        }
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Rebalancing", "Scheduled"]);
        let put = puts(b);
        assert_eq!(put[0].node.as_deref(), Some("n"), "{:?}", b.events);
        assert_eq!(put[0].avoid, ["m"]);
    }

    /// Two replicas that avoid one node name it twice: that node is closed for the move
    /// and opens again after, as it was.
    #[test]
    fn replicas_avoiding_one_node_twice_still_go_back_to_it() {
        let mut r1 = on(replica_at("r1", 1, Phase::Ready, 1), "n");
        r1.avoid = vec!["m".into()];
        let mut r2 = on(replica_at("r2", 1, Phase::Ready, 1), "n");
        r2.avoid = vec!["m".into()];
        let mut w = with_replicas(
            world(2, 1, "[placement]\nnode_selector = { zone = \"b\" }\n"),
            &[r1, r2],
        );
        complete(&mut w, 1);
        w.rebalance = false;
        for (name, zone) in [("m", "b"), ("n", "c")] {
            let labels = &mut w.nodes.get_mut(name).unwrap().value.labels;
            labels.insert("zone".into(), zone.into());
            labels.insert("tier".into(), "web".into());
        }
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Rebalancing", "Scheduled"]);
        assert_eq!(puts(b)[0].node.as_deref(), Some("m"), "{:?}", b.events);
    }

    #[test]
    fn an_uneven_app_moves_one_replica_at_a_time_new_before_old() {
        let mut w = lopsided();
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(reasons(b), ["Rebalancing", "Scheduled"]);
        assert!(deletes(b).is_empty(), "new before old");
        let put = puts(b);
        assert_eq!(put.len(), 2);
        let (new, moved) = (put[0].clone(), put[1].clone());
        assert_eq!(new.node.as_deref(), Some("n"));
        assert_eq!(new.avoid, ["m"]);
        assert_eq!(
            (moved.id.as_str(), moved.moving_since),
            ("d", Some(NOW)),
            "the newest"
        );
        assert!(b.events[0].message.contains("off node m"), "{:?}", b.events);

        // Stored: nothing more until the replacement serves, then the moved one goes.
        *replica_mut(&mut w, "d") = Read::new(moved, 200);
        let mut starting = new.clone();
        starting.phase = Phase::Starting;
        w.replicas
            .get_mut(&key())
            .unwrap()
            .insert(new.id.clone(), Read::new(starting, 201));
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
        replica_mut(&mut w, &new.id).value.phase = Phase::Ready;
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(deletes(app_batch(&p)), ["d"]);

        // Three on m, one on n: one more moves; two and two is even.
        remove_replica(&mut w, "d");
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(puts(app_batch(&p))[1].id, "c");
        remove_replica(&mut w, "c");
        let mut second = new.clone();
        second.id = "e".into();
        w.replicas
            .get_mut(&key())
            .unwrap()
            .insert("e".into(), Read::new(on(second, "n"), 202));
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
    }

    #[test]
    fn a_move_whose_replacement_never_serves_is_given_up_after_the_progress_deadline() {
        let mut w = lopsided();
        let p = plan(&w, NOW, &mut Counter::default());
        let put = puts(app_batch(&p));
        let new = put[0].clone();
        *replica_mut(&mut w, "d") = Read::new(put[1].clone(), 200);
        let mut starting = new.clone();
        starting.phase = Phase::Starting;
        w.replicas
            .get_mut(&key())
            .unwrap()
            .insert(new.id.clone(), Read::new(starting, 201));
        let deadline = w.apps[&key()].value.spec.rollout.progress_deadline_ms;
        assert!(plan(&w, NOW + deadline, &mut Counter::default()).is_empty());

        let later = NOW + deadline + 1;
        let p = plan(&w, later, &mut Counter::default());
        let b = app_batch(&p);
        assert!(
            reasons(b).contains(&"RebalanceAbandoned"),
            "{:?}",
            reasons(b)
        );
        assert_eq!(
            deletes(b),
            [new.id.as_str()],
            "the surplus replacement goes"
        );
        let kept = puts(b)
            .into_iter()
            .find(|r| r.id == "d")
            .expect("d is written")
            .clone();
        assert_eq!(kept.moving_since, None);
        assert_eq!(kept.avoid, ["n"], "where its replacement did not serve");
        assert!(
            b.events[0].message.contains("not serving"),
            "{:?}",
            b.events
        );

        // Settled again: the move is not tried again towards the node it failed on.
        remove_replica(&mut w, &new.id);
        *replica_mut(&mut w, "d") = Read::new(kept, 300);
        assert!(moved(&plan(&w, later + 1, &mut Counter::default())).is_empty());
    }

    /// `w` with one more settled app, `name`, one ready replica (id `name`) on `node`.
    fn with_single(mut w: World, name: &str, node: &str) -> World {
        let mut app = app_with("http", 1, 1, "");
        app.spec.name = name.into();
        let key = app.spec.key();
        let revision = Revision {
            app: key.clone(),
            number: 1,
            template: app.spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        };
        let mut status = rollout::start(&app, None, 0);
        status.phase = RolloutPhase::Complete;
        status.stable = Some(1);
        let mut r = on(replica_at(name, 1, Phase::Ready, 1), node);
        r.app = key.clone();
        w.revisions
            .insert((key.clone(), 1), Read::new(revision, 11));
        w.rollouts.insert(key.clone(), Read::new(status, 50));
        w.replicas
            .entry(key.clone())
            .or_default()
            .insert(name.into(), Read::new(r, 100));
        w.apps.insert(key, Read::new(app, 5));
        w
    }

    fn moved(p: &Plan) -> Vec<&str> {
        p.batches
            .iter()
            .flat_map(|b| puts(b))
            .filter(|r| r.moving())
            .map(|r| r.id.as_str())
            .collect()
    }

    #[test]
    fn with_the_spread_strategy_single_replicas_even_out_the_nodes() {
        let mut w = world(0, 1, "");
        w.apps.clear();
        w.revisions.clear();
        for name in ["b", "c", "d"] {
            w = with_single(w, name, "m");
        }
        // Three on m, none on n: two move (the most in flight at once), and each
        // lands on n.
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(moved(&p), ["b", "c"]);
        let landed: Vec<_> = p
            .batches
            .iter()
            .flat_map(|b| puts(b))
            .filter(|r| !r.moving())
            .map(|r| r.node.as_deref())
            .collect();
        assert_eq!(landed, [Some("n"), Some("n")]);

        // One on m and two on n: even enough; nothing trades back.
        let mut w2 = world(0, 1, "");
        w2.apps.clear();
        w2.revisions.clear();
        for (name, node) in [("b", "n"), ("c", "n"), ("d", "m")] {
            w2 = with_single(w2, name, node);
        }
        assert!(plan(&w2, NOW, &mut Counter::default()).is_empty());

        // A lone replica stays: moving it would only load the other node as much.
        let mut w3 = world(0, 1, "");
        w3.apps.clear();
        w3.revisions.clear();
        assert!(plan(&with_single(w3, "b", "m"), NOW, &mut Counter::default()).is_empty());

        // Bin-packing wants them together.
        w.strategy = Strategy::BinPack;
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
    }

    #[test]
    fn only_a_settled_app_moves_and_never_when_rebalancing_is_off() {
        let mut w = lopsided();
        w.rebalance = false;
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());

        let mut w = lopsided();
        replica_mut(&mut w, "a").value.phase = Phase::Unready;
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());

        // n cannot take it: nowhere better to go.
        let mut w = lopsided();
        w.nodes.get_mut("n").unwrap().value.schedulable = false;
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());

        // The autoscaler (here a scale-up) goes first.
        let mut w = lopsided();
        app_mut(&mut w).value.spec.replicas = 5;
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(reasons(app_batch(&p)), ["Scheduled"]);

        // Enough moves in flight elsewhere in the cluster: wait.
        let mut w = lopsided();
        for i in 0..REBALANCE_MOVES {
            let other = AppKey::new("default", &format!("other-{i}"));
            let mut r = on(replica_at("o", 1, Phase::Ready, 1), "n");
            r.app = other.clone();
            r.moving_since = Some(NOW);
            w.replicas
                .entry(other)
                .or_default()
                .insert(format!("o{i}"), Read::new(r, 300));
        }
        let p = plan(&w, NOW, &mut Counter::default());
        assert!(
            !p.batches
                .iter()
                .any(|b| reasons(b).contains(&"Rebalancing"))
        );
    }

    #[test]
    fn a_replica_failing_liveness_moves_only_if_another_node_can_take_it() {
        let mut failing = on(replica_at("y", 1, Phase::Unready, 2), "n");
        failing.reason = Some(LIVENESS_FAILED.into());
        failing.restarts = 3;
        let mut w = with_replicas(
            world(2, 1, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "n"), failing],
        );
        complete(&mut w, 1);
        w.strategy = Strategy::BinPack;
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["y"]);
        let placed = puts(b);
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].avoid, ["n"]);
        assert_eq!(placed[0].node.as_deref(), Some("m"), "kept off n");
        // Revision 1, the app's first, completed within its progress deadline: its rollout
        // fails too (with nothing to go back to), and the replica is replaced all the same.
        assert_eq!(reasons(b), ["RolloutFailed", "Replacing", "Scheduled"]);

        // With nowhere else to go (m cordoned), it stays where its node restarts it.
        w.nodes.get_mut("m").unwrap().value.schedulable = false;
        let p = plan(&w, NOW, &mut Counter::default());
        assert!(
            p.batches
                .iter()
                .all(|b| deletes(b).is_empty() && puts(b).is_empty())
        );
    }

    #[test]
    fn an_unplaceable_replica_says_why_once() {
        let mut w = world(1, 1, "[placement]\nnode_selector = { zone = \"mars\" }\n");
        complete(&mut w, 1);
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        let pending = puts(b)[0].clone();
        assert_eq!(pending.node, None);
        assert!(pending.message.as_deref().unwrap().contains("0/2 nodes"));
        assert_eq!(reasons(b), ["FailedScheduling"]);
        // Stored with that message: the next pass writes nothing.
        let w = with_replicas(w, &[pending]);
        assert!(plan(&w, NOW + 1, &mut Counter::default()).is_empty());
    }

    #[test]
    fn room_freed_by_an_apps_delete_serves_only_that_app() {
        // One node with room for two replicas, both taken by app a, which
        // scales down to one; app b has a pending replica. a's delete commits
        // in a's batch: b, in its own batch, must not count on that room.
        let mut w = world(1, 1, "");
        let mut n = node("n");
        let per = Capacity::of(&app_mut(&mut w).value.spec.resources);
        n.value.capacity = Capacity {
            cpu_millis: per.cpu_millis * 2,
            memory_bytes: per.memory_bytes * 2,
            instances: 1000,
        };
        w.nodes = [("n".to_string(), n)].into();
        let mut b_app = app_with("http", 1, 1, "");
        b_app.spec.name = "b".into();
        let b_key = AppKey::new("default", "b");
        let mut b_pending = replica_at("b-1-z", 1, Phase::Pending, 3);
        b_pending.app = b_key.clone();
        b_pending.node = None;
        w.apps.insert(b_key.clone(), Read::new(b_app, 6));
        // Limits no larger than requests: the node's memory is enough for one instance.
        let small = |mut r: Replica| {
            r.resources.limits.memory_bytes = r.resources.requests.memory_bytes;
            r
        };
        let mut w = with_replicas(
            w,
            &[
                small(on(replica_at("x", 1, Phase::Ready, 1), "n")),
                small(on(replica_at("y", 1, Phase::Ready, 2), "n")),
                small(b_pending),
            ],
        );
        complete(&mut w, 1);
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(deletes(app_batch(&p)), ["y"]);
        let b = p
            .batches
            .iter()
            .find(|b| b.scope == Scope::App(b_key.clone()))
            .expect("b's batch");
        let placed = puts(b);
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].node, None, "a's freed room is not b's");
        assert!(reasons(b).contains(&"FailedScheduling"));
        assert_eq!(b.placed().count(), 0, "written, not placed");

        // Once a's delete has landed, the room is b's.
        remove_replica(&mut w, "y");
        let p = plan(&w, NOW + 1, &mut Counter::default());
        let b = p
            .batches
            .iter()
            .find(|b| b.scope == Scope::App(b_key.clone()))
            .expect("b's batch");
        assert_eq!(puts(b)[0].node.as_deref(), Some("n"));
        // Placed now, it waited since it was made.
        let placed: Vec<(&str, u64)> = b
            .placed()
            .map(|r| (r.id.as_str(), r.updated_at - r.created_at))
            .collect();
        assert_eq!(placed, [("b-1-z", NOW + 1 - 3)]);
    }

    #[test]
    fn a_canary_step_takes_its_baseline_when_it_begins() {
        const CANARY: &str = "[rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 50, pause = \"10s\" }]\n[rollout.analysis]\nmin_requests = 1\n";
        let mut w = with_replicas(
            world(2, 2, CANARY),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
                on(replica_at("c", 2, Phase::Ready, 3), "n"),
            ],
        );
        complete(&mut w, 1);
        let stats = |rev, requests, errors| {
            let mut s = RevisionStats::new(key(), rev);
            s.requests = requests;
            s.errors = errors;
            s
        };
        // Errors from before the step must not count against it.
        w.measurements.insert(
            key(),
            Measurements {
                totals: [(1, stats(1, 100, 0)), (2, stats(2, 50, 50))].into(),
                baseline: None,
                ..Measurements::default()
            },
        );
        let p = plan(&w, NOW, &mut Counter::default());
        let status = app_batch(&p)
            .changes
            .iter()
            .find_map(|c| match c {
                Change::PutRollout { status, .. } => Some(status.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(status.step_started_at, Some(NOW));
        assert_eq!(p.baselines.len(), 1);
        let (app, base) = &p.baselines[0];
        assert_eq!((app, base.step), (&key(), NOW));
        assert_eq!(base.totals[&2].errors, 50);

        // The next pass judges on what came after: healthy, so no abort, and no new baseline.
        w.rollouts.insert(key(), Read::new(status, 60));
        let m = w.measurements.get_mut(&key()).unwrap();
        m.baseline = Some(base.clone());
        m.totals.insert(1, stats(1, 110, 0));
        m.totals.insert(2, stats(2, 60, 50));
        let p = plan(&w, NOW + 1000, &mut Counter::default());
        assert!(p.baselines.is_empty());
        assert!(p.is_empty(), "{p:?}");

        // New errors after the step began abort it.
        w.measurements
            .get_mut(&key())
            .unwrap()
            .totals
            .insert(2, stats(2, 70, 60));
        let p = plan(&w, NOW + 2000, &mut Counter::default());
        assert_eq!(reasons(app_batch(&p)), ["Aborted"]);
    }

    /// The app records the batch writes.
    fn put_apps(b: &Batch) -> Vec<&App> {
        b.changes
            .iter()
            .filter_map(|c| match c {
                Change::PutApp { app } => Some(&**app),
                _ => None,
            })
            .collect()
    }

    /// `concurrency` in flight every second of the minute up to `now`,
    /// measured since 0.
    fn busy(now: Millis, concurrency: f64) -> Measurements {
        let samples = (0..=60)
            .map(|ago| LoadSample {
                at: now - ago * 1000,
                concurrency,
                requests: 0,
            })
            .rev()
            .collect();
        Measurements {
            load: Load {
                samples,
                last_request: Some(now),
                ..Load::default()
            },
            ..Measurements::default()
        }
    }

    /// `app` (revision 1, the template of [`world`]'s) in place of `default/a`.
    fn with_app(mut w: World, app: App) -> World {
        app_mut(&mut w).value = app;
        w
    }

    /// The room a namespace's quota leaves an app is what its other apps do not run now: here
    /// 4 replicas capped, another app running 2, so 2 for this one, which wants 3.
    #[test]
    fn an_autoscaled_app_grows_only_into_the_room_its_namespace_quota_leaves() {
        let mut app = scaled_app("[scale]\nmin = 1\nmax = 5\ntarget_concurrency = 10\n");
        app.spec.replicas = 1;
        let mut w = with_replicas(
            with_app(world(1, 1, ""), app.clone()),
            &[on(replica_at("x", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        let mut other = app.clone();
        other.spec.name = "b".into();
        other.spec.scale.autoscale = None;
        other.spec.replicas = 2;
        w.apps.insert(other.spec.key(), Read::new(other, 1));
        w.quotas.insert(
            "default".into(),
            QuotaLimits {
                replicas: Some(4),
                ..QuotaLimits::default()
            },
        );
        w.measurements.insert(key(), busy(NOW, 23.4));
        let p = plan(&w, NOW, &mut Counter::default());
        let stored = put_apps(app_batch(&p));
        assert_eq!(stored[0].spec.replicas, 2, "{stored:?}");
        assert!(
            (stored[0].scale.reason.as_deref())
                .is_some_and(|r| r.ends_with("at most 2 replicas under namespace default's quota")),
            "{:?}",
            stored[0].scale
        );
    }

    #[test]
    fn an_autoscaled_app_is_resized_in_one_write_then_left_alone() {
        let mut app = scaled_app("[scale]\nmin = 1\nmax = 5\ntarget_concurrency = 10\n");
        app.spec.replicas = 2;
        let mut w = with_replicas(
            with_app(world(2, 1, ""), app),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        w.measurements.insert(key(), busy(NOW, 23.4));
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(b.app, Some(Expect::At(5)), "guarded by the app as read");
        let stored = put_apps(b);
        assert_eq!(stored.len(), 1, "{b:?}");
        let stored = stored[0].clone();
        assert_eq!(stored.spec.replicas, 3);
        assert_eq!(stored.scale.last_change, Some(NOW));
        assert_eq!(
            stored.scale.reason.as_deref(),
            Some("concurrency 23.4 for a target of 10 per replica")
        );
        assert_eq!(puts(b).len(), 1, "the third replica");
        assert_eq!(reasons(b), ["ScaledUp", "Scheduled"]);
        assert_eq!(
            b.events[0].message,
            "concurrency 23.4 for a target of 10 per replica: 2 → 3 replicas"
        );

        // Stored, with the third replica ready: nothing to write.
        *app_mut(&mut w) = Read::new(stored, 6);
        let mut w = with_replicas(
            w,
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
                on(replica_at("z", 1, Phase::Ready, 3), "m"),
            ],
        );
        complete(&mut w, 1);
        let p = plan(&w, NOW + 1000, &mut Counter::default());
        assert!(p.is_empty(), "{p:?}");
    }

    /// Idleness is counted from the control plane's start: a fresh one has
    /// seen no requests yet, which is not five minutes without any.
    #[test]
    fn an_app_without_measurements_is_idle_only_since_the_control_plane_started() {
        let app = scaled_app("[scale]\nmin = 0\nmax = 3\nidle = \"1m\"\n");
        let mut w = with_replicas(
            with_app(world(1, 1, ""), app),
            &[on(replica_at("x", 1, Phase::Ready, 1), "m")],
        );
        complete(&mut w, 1);
        w.started_at = NOW - 30_000;
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
        w.started_at = NOW - 60_000;
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(put_apps(b)[0].spec.replicas, 0);
        assert_eq!(deletes(b), ["x"]);
        assert_eq!(reasons(b), ["ScaledDown", "Killing"]);
        assert_eq!(b.events[0].message, "idle for 1m: 1 → 0 replicas");
    }

    /// A fixed-size app runs a window's size while it is open; only the
    /// scale status is written, its own `replicas` stays the user's.
    #[test]
    fn a_fixed_app_in_a_window_runs_its_size_and_keeps_its_own() {
        // 2026-11-30 09:00 in Seoul.
        const NINE: Millis = 1_795_996_800_000;
        let app = scaled_app(
            "[scale]\nreplicas = 2\n[[scale.schedule]]\nname = \"peak\"\ncron = \"0 9 * * *\"\ntimezone = \"Asia/Seoul\"\nduration = \"1h\"\nreplicas = 5\n",
        );
        let two = [
            on(replica_at("x", 1, Phase::Ready, 1), "m"),
            on(replica_at("y", 1, Phase::Ready, 2), "n"),
        ];
        let mut w = with_replicas(with_app(world(2, 1, ""), app), &two);
        complete(&mut w, 1);
        let p = plan(&w, NINE + 1_800_000, &mut Counter::default());
        let b = app_batch(&p);
        let stored = put_apps(b);
        assert_eq!(stored.len(), 1);
        let stored = stored[0].clone();
        assert_eq!(stored.spec.replicas, 2, "the user's count");
        assert_eq!(stored.scale.windows, ["peak"]);
        assert_eq!(puts(b).len(), 3);
        assert_eq!(
            reasons(b),
            [
                "WindowOpened",
                "ScaledUp",
                "Scheduled",
                "Scheduled",
                "Scheduled"
            ]
        );

        // Stored, with five replicas: steady while the window is open.
        *app_mut(&mut w) = Read::new(stored, 6);
        let five: Vec<Replica> = two
            .iter()
            .cloned()
            .chain(
                [("p", "n"), ("q", "m"), ("r", "n")]
                    .map(|(id, node)| on(replica_at(id, 1, Phase::Ready, 3), node)),
            )
            .collect();
        let mut w = with_replicas(w, &five);
        complete(&mut w, 1);
        assert!(plan(&w, NINE + 2_700_000, &mut Counter::default()).is_empty());

        // Closed: back to 2, and the status says no window is open.
        let p = plan(&w, NINE + 3_600_000, &mut Counter::default());
        let b = app_batch(&p);
        let stored = put_apps(b);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].spec.replicas, 2);
        assert!(stored[0].scale.windows.is_empty());
        assert_eq!(deletes(b).len(), 3);
        assert_eq!(
            reasons(b)[..2],
            ["WindowClosed", "ScaledDown"],
            "{:?}",
            reasons(b)
        );
    }

    /// A rollback and a resize in the same pass write the app once, with both.
    #[test]
    fn a_rollback_and_a_resize_write_one_app_record() {
        let mut app = scaled_app("[scale]\nmin = 1\nmax = 5\ntarget_concurrency = 10\n");
        app.spec.replicas = 2;
        app.revision = 2;
        let mut w = with_replicas(
            with_app(world(2, 2, ""), app),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("w", 1, Phase::Ready, 1), "n"),
                on(replica_at("y", 2, Phase::CrashLoopBackOff, 2), "n"),
            ],
        );
        complete(&mut w, 1);
        w.measurements.insert(key(), busy(NOW, 23.4));
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        let stored = put_apps(b);
        assert_eq!(stored.len(), 1, "{b:?}");
        assert_eq!(stored[0].revision, 1, "rolled back");
        assert_eq!(stored[0].spec.replicas, 3, "and resized");
        assert_eq!(stored[0].scale.last_change, Some(NOW));
        assert_eq!(reasons(b), ["ScaledUp", "RolledBack"]);
    }

    /// A world whose app `default/a` is a job at revision 1, created at 0,
    /// with `job` as its `[job]` section.
    fn job_world(job: &str) -> World {
        let app = app_with("job", 1, 1, &format!("[job]\n{job}\n"));
        let mut w = world(1, 1, "");
        w.revisions.get_mut(&(key(), 1)).unwrap().value.template = app.spec.template();
        with_app(w, app)
    }

    fn job_run(id: &str, phase: Phase, scheduled_at: Option<Millis>) -> Replica {
        let mut r = on(replica_at(id, 1, phase, 1), "m");
        r.kind = Kind::Job;
        r.scheduled_at = scheduled_at;
        r
    }

    #[test]
    fn a_scheduled_job_starts_a_placed_run_per_firing_and_remembers_it() {
        // Every minute; the app was created at 0 and it is now 1:40.
        let w = job_world("schedule = \"* * * * *\"");
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        let placed = puts(b);
        assert_eq!(placed.len(), 1, "one run, not one per replica: {b:?}");
        assert_eq!(placed[0].scheduled_at, Some(60_000));
        assert!(placed[0].node.is_some());
        assert_eq!(reasons(b), ["JobStarted", "Scheduled"]);
        assert!(
            b.events[0]
                .message
                .ends_with("started for the firing at 1970-01-01 00:01:00 UTC"),
            "{:?}",
            b.events[0]
        );
        let stored = put_apps(b);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].job.last_scheduled, Some(60_000));

        // Stored: the same minute starts nothing, and the replica count does not either.
        let mut w = with_replicas(w, &[job_run("a-1-0", Phase::Running, Some(60_000))]);
        app_mut(&mut w).value.job = stored[0].job.clone();
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
    }

    #[test]
    fn runs_by_hand_are_not_the_unscheduled_jobs_replicas() {
        let mut w = with_replicas(
            job_world("history = { succeeded = 1 }"),
            &[
                job_run("once", Phase::Succeeded, None),
                job_run("by-hand-1", Phase::Succeeded, Some(10)),
            ],
        );
        // Reconcile counts only "once": nothing to do.
        assert!(plan(&w, NOW, &mut Counter::default()).is_empty());
        // A run asked for: it starts, and the history keeps only the newest
        // finished run, never touching the job's own replica.
        app_mut(&mut w).value.job.run_requested = Some(NOW - 5);
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(puts(b)[0].scheduled_at, Some(NOW - 5));
        assert!(deletes(b).is_empty(), "the new run is not finished yet");
        assert_eq!(put_apps(b)[0].job.run_requested, None);
        let mut w = with_replicas(
            w,
            &[
                job_run("once", Phase::Succeeded, None),
                job_run("by-hand-1", Phase::Succeeded, Some(10)),
                job_run("by-hand-2", Phase::Succeeded, Some(NOW - 5)),
            ],
        );
        app_mut(&mut w).value.job.run_requested = None;
        replica_mut(&mut w, "by-hand-2").value.created_at = 2;
        let p = plan(&w, NOW, &mut Counter::default());
        assert_eq!(deletes(app_batch(&p)), ["by-hand-1"]);
    }

    #[test]
    fn a_run_on_a_lost_node_starts_again_for_the_same_firing() {
        let mut w = with_replicas(
            job_world("schedule = \"0 0 1 1 *\""),
            &[job_run("a-1-x", Phase::Running, Some(7))],
        );
        w.nodes.get_mut("m").unwrap().value.state = NodeState::NotReady;
        let p = plan(&w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["a-1-x"]);
        let again = puts(b);
        assert_eq!(again.len(), 1);
        assert_eq!(
            (again[0].scheduled_at, again[0].node.as_deref()),
            (Some(7), Some("n"))
        );
        assert_eq!(reasons(b), ["Rescheduled", "Scheduled"]);
    }

    /// A paused rollout (`rollout pause`, or a canary step waiting) holds the counts per
    /// revision where they are, and still heals: a lost node's replicas come back elsewhere,
    /// of the revision they had. They were deleted, and nothing replaced them until a resume.
    #[test]
    fn a_paused_rollout_still_replaces_the_replicas_of_a_lost_node() {
        let mut w = with_replicas(
            world(2, 2, ""),
            &[
                on(replica_at("x", 1, Phase::Ready, 1), "m"),
                on(replica_at("y", 1, Phase::Ready, 2), "n"),
            ],
        );
        pause(&mut w);
        let n = w.nodes.get_mut("n").unwrap();
        n.value.state = NodeState::NotReady;
        n.mod_revision = 7;
        replaced_on_m(&w, "of the revision it had, where it can run");
    }

    /// Likewise a replica that keeps failing liveness: replaced on another node, paused or not.
    #[test]
    fn a_paused_rollout_still_replaces_a_failing_replica() {
        let mut failing = on(replica_at("y", 1, Phase::Unready, 2), "n");
        failing.reason = Some(LIVENESS_FAILED.into());
        let mut w = with_replicas(
            world(2, 2, ""),
            &[on(replica_at("x", 1, Phase::Ready, 1), "n"), failing],
        );
        pause(&mut w);
        replaced_on_m(&w, "off the node that failed it");
    }

    /// `w`'s app in a rollout to revision 2 from 1, paused.
    fn pause(w: &mut World) {
        let app1 = app_with("http", 2, 1, "");
        let mut done = rollout::start(&app1, None, 0);
        done.phase = RolloutPhase::Complete;
        let mut s = rollout::start(&w.apps[&key()].value, Some(&done), NOW - 1000);
        s.paused = true;
        w.rollouts.insert(key(), Read::new(s, 50));
    }

    /// Asserts that `w`'s plan removes replica `y` and places one of revision 1 on node m.
    fn replaced_on_m(w: &World, why: &str) {
        let p = plan(w, NOW, &mut Counter::default());
        let b = app_batch(&p);
        assert_eq!(deletes(b), ["y"]);
        let placed = puts(b);
        assert_eq!(placed.len(), 1, "{:?}", reasons(b));
        assert_eq!(
            (placed[0].revision, placed[0].node.as_deref()),
            (1, Some("m")),
            "{why}"
        );
    }
}
