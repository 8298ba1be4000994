//! The objects the control plane stores, as JSON, under etcd-style keys.
//! Each is written by exactly one controller or API handler; see
//! ARCHITECTURE.md for who owns what.

use crate::spec::{
    AppKey, AppSpec, CanaryStep, Kind, Resources, Rollout, Route, Strategy, Template,
};
use crate::wasm::WasmKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where objects live in the store, typed: a [`keys::Key<T>`] names one `T`
/// and a [`keys::Prefix<T>`] a collection of them, so reading an app from a
/// revision's key does not compile. One place, so a typo cannot split a
/// collection in two.
pub mod keys {
    use super::{
        ApiToken, App, ConfigSet, Event, Lease, Module, ModuleUse, Node, NodeCredential, Pool,
        Quota, Replica, Revision, RolloutStatus, RouteClaim, RouteHost, Secret, Volume,
        VolumeDeletion,
    };
    use crate::spec::AppKey;
    use crate::spec::Route;
    use std::borrow::Cow;
    use std::fmt;
    use std::marker::PhantomData;

    /// The key of one `T`. A key of another type does not read as a `T`:
    ///
    /// ```compile_fail
    /// use shoal_core::objects::keys::{self, Key};
    /// use shoal_core::{App, spec::AppKey};
    /// fn get<T>(_key: &Key<T>) -> Option<T> { None }
    /// let app: Option<App> = get(&keys::revision(&AppKey::new("default", "web"), 1));
    /// ```
    pub struct Key<T> {
        path: String,
        of: PhantomData<fn() -> T>,
    }

    /// The keys of a collection of `T`s: everything under it is a `T`.
    pub struct Prefix<T> {
        path: Cow<'static, str>,
        of: PhantomData<fn() -> T>,
    }

    impl<T> Key<T> {
        fn new(path: String) -> Self {
            Key {
                path,
                of: PhantomData,
            }
        }

        pub fn as_str(&self) -> &str {
            &self.path
        }
    }

    impl<T> Prefix<T> {
        const fn fixed(path: &'static str) -> Self {
            Prefix {
                path: Cow::Borrowed(path),
                of: PhantomData,
            }
        }

        fn of(path: String) -> Self {
            Prefix {
                path: Cow::Owned(path),
                of: PhantomData,
            }
        }

        pub fn as_str(&self) -> &str {
            &self.path
        }

        /// Whether `key` is in this collection.
        pub fn contains(&self, key: &str) -> bool {
            key.starts_with(self.as_str())
        }
    }

    impl<T> From<Key<T>> for String {
        fn from(k: Key<T>) -> String {
            k.path
        }
    }

    impl<T> From<Prefix<T>> for String {
        fn from(p: Prefix<T>) -> String {
            p.path.into_owned()
        }
    }

    impl<T> From<&Key<T>> for String {
        fn from(k: &Key<T>) -> String {
            k.path.clone()
        }
    }

    impl<T> Clone for Key<T> {
        fn clone(&self) -> Self {
            Key::new(self.path.clone())
        }
    }

    impl<T> fmt::Display for Key<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.path)
        }
    }

    impl<T> fmt::Debug for Key<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Debug::fmt(&self.path, f)
        }
    }

    pub const APPS: Prefix<App> = Prefix::fixed("/apps/");
    pub const REVISIONS: Prefix<Revision> = Prefix::fixed("/revisions/");
    pub const REPLICAS: Prefix<Replica> = Prefix::fixed("/replicas/");
    pub const NODES: Prefix<Node> = Prefix::fixed("/nodes/");
    pub const EVENTS: Prefix<Event> = Prefix::fixed("/events/");
    pub const MODULES: Prefix<Module> = Prefix::fixed("/modules/");
    pub const MODULE_USES: Prefix<ModuleUse> = Prefix::fixed("/module-uses/");
    pub const LEASES: Prefix<Lease> = Prefix::fixed("/leases/");
    pub const ROLLOUTS: Prefix<RolloutStatus> = Prefix::fixed("/rollouts/");
    pub const ROUTES: Prefix<RouteClaim> = Prefix::fixed("/routes/");
    pub const CREDENTIALS: Prefix<NodeCredential> = Prefix::fixed("/credentials/nodes/");
    pub const TOKENS: Prefix<ApiToken> = Prefix::fixed("/credentials/tokens/");
    pub const CONFIG_SETS: Prefix<ConfigSet> = Prefix::fixed("/configs/");
    pub const SECRETS: Prefix<Secret> = Prefix::fixed("/secrets/");
    pub const VOLUMES: Prefix<Volume> = Prefix::fixed("/volumes/");
    pub const VOLUME_DELETIONS: Prefix<VolumeDeletion> = Prefix::fixed("/volume-deletions/");
    pub const POOLS: Prefix<Pool> = Prefix::fixed("/pools/");
    pub const QUOTAS: Prefix<Quota> = Prefix::fixed("/quotas/");
    /// Guests' key-value buckets (`wasi:keyvalue`): their values, opaque bytes, under
    /// `NAMESPACE/BUCKET/`, and what each bucket holds, under [`KEYVALUE_USAGE`].
    pub const KEYVALUE: &str = "/kv/";
    pub const KEYVALUE_USAGE: &str = "/kv-usage/";
    pub fn quota(namespace: &str) -> Key<Quota> {
        Key::new(format!("{}{namespace}", QUOTAS.as_str()))
    }
    pub fn pool(name: &str) -> Key<Pool> {
        Key::new(format!("{}{name}", POOLS.as_str()))
    }

    pub fn app(k: &AppKey) -> Key<App> {
        Key::new(format!("{}{}/{}", APPS.as_str(), k.namespace, k.name))
    }
    /// Every app of namespace `ns`.
    pub fn apps_in(ns: &str) -> Prefix<App> {
        Prefix::of(format!("{}{ns}/", APPS.as_str()))
    }
    /// Every revision of every app in namespace `ns`.
    pub fn revisions_in(ns: &str) -> Prefix<Revision> {
        Prefix::of(format!("{}{ns}/", REVISIONS.as_str()))
    }
    pub fn revisions_of(k: &AppKey) -> Prefix<Revision> {
        Prefix::of(format!("{}{}/{}/", REVISIONS.as_str(), k.namespace, k.name))
    }
    pub fn revision(k: &AppKey, number: u64) -> Key<Revision> {
        Key::new(format!("{}{number:010}", revisions_of(k).as_str()))
    }
    /// Every replica of every app in namespace `ns`.
    pub fn replicas_in(ns: &str) -> Prefix<Replica> {
        Prefix::of(format!("{}{ns}/", REPLICAS.as_str()))
    }
    pub fn replicas_of(k: &AppKey) -> Prefix<Replica> {
        Prefix::of(format!("{}{}/{}/", REPLICAS.as_str(), k.namespace, k.name))
    }
    pub fn replica(k: &AppKey, id: &str) -> Key<Replica> {
        Key::new(format!("{}{id}", replicas_of(k).as_str()))
    }
    /// Whether a change under `key` is one node agents act on (the rest —
    /// events, leases, modules — they never read from the watch).
    pub fn agents_watch(key: &str) -> bool {
        APPS.contains(key)
            || REVISIONS.contains(key)
            || REPLICAS.contains(key)
            || NODES.contains(key)
            || ROLLOUTS.contains(key)
    }

    pub fn rollout(k: &AppKey) -> Key<RolloutStatus> {
        Key::new(format!("{}{}/{}", ROLLOUTS.as_str(), k.namespace, k.name))
    }
    pub fn node(name: &str) -> Key<Node> {
        Key::new(format!("{}{name}", NODES.as_str()))
    }
    /// Events are numbered by the store revision that records them (see
    /// [`Event::seq`]); `id` and `writer` only make each key unique: `id` counts one
    /// server's events, `writer` tells apart servers sharing a store, whose counts meet.
    pub fn event(id: u64, writer: u32) -> Key<Event> {
        Key::new(format!("{}{id:020}-{writer:08x}", EVENTS.as_str()))
    }
    /// The count an event's key carries (written before `writer` was, a key is the count
    /// alone).
    pub fn event_id(key: &str) -> Option<u64> {
        let id = key.strip_prefix(EVENTS.as_str())?;
        id.split_once('-').map_or(id, |(id, _)| id).parse().ok()
    }
    /// `/routes/{host}{path}`, or `/routes/*{path}` for any host.
    pub fn route(r: &Route) -> Key<RouteClaim> {
        let host = r.host.as_deref().unwrap_or("*");
        Key::new(format!("{}{host}{}", ROUTES.as_str(), r.path))
    }
    /// The claims of every route bound to `host`.
    pub fn routes_of_host(host: &str) -> Prefix<RouteClaim> {
        Prefix::of(format!("{}{host}/", ROUTES.as_str()))
    }
    /// `/route-hosts/{host}`: see [`RouteHost`].
    pub fn route_host(host: &str) -> Key<RouteHost> {
        Key::new(format!("/route-hosts/{host}"))
    }
    pub fn lease(node: &str) -> Key<Lease> {
        Key::new(format!("{}{node}", LEASES.as_str()))
    }
    pub fn credential(node: &str) -> Key<NodeCredential> {
        Key::new(format!("{}{node}", CREDENTIALS.as_str()))
    }
    pub fn token(name: &str) -> Key<ApiToken> {
        Key::new(format!("{}{name}", TOKENS.as_str()))
    }
    pub fn module(digest: &str) -> Key<Module> {
        Key::new(format!("{}{digest}", MODULES.as_str()))
    }
    pub fn config_sets_in(ns: &str) -> Prefix<ConfigSet> {
        Prefix::of(format!("{}{ns}/", CONFIG_SETS.as_str()))
    }
    pub fn config_set(ns: &str, name: &str) -> Key<ConfigSet> {
        Key::new(format!("{}{name}", config_sets_in(ns).as_str()))
    }
    pub fn secrets_in(ns: &str) -> Prefix<Secret> {
        Prefix::of(format!("{}{ns}/", SECRETS.as_str()))
    }
    pub fn secret(ns: &str, name: &str) -> Key<Secret> {
        Key::new(format!("{}{name}", secrets_in(ns).as_str()))
    }
    pub fn volumes_in(ns: &str) -> Prefix<Volume> {
        Prefix::of(format!("{}{ns}/", VOLUMES.as_str()))
    }
    pub fn volume(ns: &str, name: &str) -> Key<Volume> {
        Key::new(format!("{}{name}", volumes_in(ns).as_str()))
    }
    pub fn volume_deletion(ns: &str, name: &str) -> Key<VolumeDeletion> {
        Key::new(format!("{}{ns}/{name}", VOLUME_DELETIONS.as_str()))
    }
    pub fn module_use(digest: &str) -> Key<ModuleUse> {
        Key::new(format!("{}{digest}", MODULE_USES.as_str()))
    }
}

/// Which app serves a route: one key per route, written in the transaction
/// that writes the app, so two apps applied at once cannot both claim it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteClaim {
    pub route: Route,
    pub app: AppKey,
}

/// The namespace that last claimed a route on a host. Every new claim on the host rewrites it,
/// guarded on what it read, so two namespaces claiming routes on one host at once cannot both
/// pass the check that a host is one namespace's: one of them is judged again and refused.
/// A stale record (its routes gone) stands for nothing: the routes are what is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHost {
    pub namespace: String,
}

/// [`Replica::reason`] of a replica whose node gave up restarting it because its
/// liveness probe kept failing; the controller replaces it on another node.
pub const LIVENESS_FAILED: &str = "LivenessFailed";

/// Liveness restarts after which a node says a replica keeps failing ([`LIVENESS_FAILED`]);
/// a replica that stays live for a minute starts counting again.
pub const LIVENESS_RESTARTS: u32 = 3;

/// Milliseconds since the Unix epoch: the one time format objects carry. Fields of this type
/// say `#[schema(value_type = u64)]`: utoipa takes an alias for a schema of its own, named `u64`.
pub type Millis = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct App {
    pub spec: AppSpec,
    /// Number of the revision replicas should run.
    pub revision: u64,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    #[schema(value_type = u64)]
    pub updated_at: Millis,
    /// What the controller last decided about the app's size on its own.
    #[serde(default, skip_serializing_if = "ScaleStatus::is_default")]
    pub scale: ScaleStatus,
    /// What the controller remembers of a job's runs between passes.
    #[serde(default, skip_serializing_if = "JobStatus::is_default")]
    pub job: JobStatus,
}

/// A job's schedule as the controller left it, and a run asked for by hand:
/// what the next pass needs to start each firing's run once. Written with the
/// app (guarded), by the controller and by `shoal job run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStatus {
    /// The latest firing dealt with (its run started, skipped or missed): only
    /// later ones are due. None yet: the app's creation, so a new app waits
    /// for its schedule's next firing instead of running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub last_scheduled: Option<Millis>,
    /// When `shoal job run` asked for a run that has not been dealt with yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub run_requested: Option<Millis>,
}

impl JobStatus {
    pub fn is_default(&self) -> bool {
        self == &JobStatus::default()
    }
}

/// The controller's memory of its own scaling decisions for one app: what the
/// next decision needs (when it last changed the size, whether a burst put it
/// in panic mode) and what `describe` shows. Written only when a decision is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScaleStatus {
    /// When it last set `spec.replicas` by itself (autoscaling or a window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub last_change: Option<Millis>,
    /// Why, in words: "concurrency 23.4 for a target of 10 per replica".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Knative's panic mode: a burst scaled the app up, and until this time
    /// it is not scaled down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub panic_until: Option<Millis>,
    /// Schedule windows open at the last decision, so that a window opening
    /// or closing is seen once (and recorded as an event).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
}

impl ScaleStatus {
    pub fn is_default(&self) -> bool {
        self == &ScaleStatus::default()
    }
}

/// An immutable snapshot of what runs; a new one is made for every template change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revision {
    pub app: AppKey,
    pub number: u64,
    pub template: Template,
    pub hash: String,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    /// Why it was made: "created", "env changed", …
    pub cause: String,
    /// Made by `rollout undo`: the revision the app ran then, which the user chose to leave.
    /// Once this one has rolled out, a crash of it does not roll back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undid: Option<u64>,
    /// How its rollout ended: "rolled out", "failed: …" (a new app's, with nothing to fall
    /// back to), "rolled back: …", "aborted: …".
    /// The only field written after creation; the template never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

impl Revision {
    /// Its outcome if its rollout was rolled back or aborted: a build known to fail, which
    /// neither the same file applied again nor a plain `rollout undo` brings back.
    pub fn abandoned(&self) -> Option<&str> {
        self.outcome
            .as_deref()
            .filter(|o| o.starts_with("rolled back") || o.starts_with("aborted"))
    }
}

/// Where an app's rollout of its current revision stands; written by the
/// controller (and by `rollout pause|resume|promote|abort`), one per app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutStatus {
    pub app: AppKey,
    /// The revision being rolled out (after a rollback: the one rolled back to).
    pub revision: u64,
    /// The last revision that rolled out completely, what a failure rolls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<u64>,
    pub strategy: Strategy,
    pub phase: RolloutPhase,
    /// Set by `shoal rollout pause`: replica counts per revision are held.
    #[serde(default)]
    pub paused: bool,
    /// Canary: index of the current step; `steps.len()` once promoted.
    #[serde(default)]
    pub step: usize,
    /// Canary: when the current step's replicas were all ready and its clock
    /// started; `None` while they are starting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub step_started_at: Option<Millis>,
    /// Ready replicas of `revision` at the last look; more than that is progress, whose
    /// time `progressed_at` keeps.
    pub ready: u32,
    #[schema(value_type = u64)]
    pub progressed_at: Millis,
    #[schema(value_type = u64)]
    pub started_at: Millis,
    /// The revision a rollback or abort left (when `revision` is what it went back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
    /// Once complete: the stable revision before this one, which a replica of this one
    /// crash-looping or failing liveness within `progress_deadline` of the completion
    /// still rolls back to (a replica may be up a moment before it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_stable: Option<u64>,
    pub message: String,
}

impl RolloutStatus {
    /// What a completed rollout of `revision` says, `ready` of the `wanted` replicas ready.
    pub fn rolled_out(revision: u64, ready: u32, wanted: u32) -> String {
        format!("revision {revision} rolled out: {ready}/{wanted} replicas ready")
    }

    /// Whether `other` says the same as this status, whatever its message: the
    /// controller writes a status when where the rollout stands changes, not
    /// when only the wording does.
    pub fn same_state(&self, other: &RolloutStatus) -> bool {
        let wording = |s: &RolloutStatus| RolloutStatus {
            message: String::new(),
            ..s.clone()
        };
        wording(self) == wording(other)
    }

    /// The canary step in progress, if any.
    pub fn canary_step<'a>(&self, rollout: &'a Rollout) -> Option<&'a CanaryStep> {
        let canary = self.phase == RolloutPhase::Progressing
            && self.strategy == Strategy::Canary
            && self.stable.is_some_and(|s| s != self.revision);
        rollout.steps.get(self.step).filter(|_| canary)
    }

    /// The traffic split in force: (canary revision, percent). A step's weight
    /// applies once its replicas are all ready (its clock started); until then
    /// the previous step's does, so a few canary replicas never take a bigger
    /// step's share.
    pub fn split(&self, rollout: &Rollout) -> Option<(u64, u8)> {
        let step = self.canary_step(rollout)?;
        let weight = match (self.step_started_at, self.step) {
            (Some(_), _) => step.weight,
            (None, 0) => 0,
            (None, n) => rollout.steps[n - 1].weight,
        };
        Some((self.revision, weight))
    }

    /// How gateways split the app's traffic: [`RolloutStatus::split`] while a canary step
    /// runs; after a canary's rollback or abort, none to the revision left (0 %) while its
    /// replicas wait to be removed, which may take passes while the stable side is short.
    /// Without a split every ready replica takes its share, the revision left included.
    pub fn traffic(&self, rollout: &Rollout) -> Option<(u64, u8)> {
        // Only a canary's replicas come on top of a full stable side; after a rolling
        // update the revision left may hold most of the ready replicas, and takes its share.
        let abandoned = (self.strategy == Strategy::Canary
            && matches!(self.phase, RolloutPhase::RolledBack | RolloutPhase::Aborted))
        .then_some(self.rolled_back_from)
        .flatten()
        .filter(|r| *r != self.revision);
        self.split(rollout).or(abandoned.map(|r| (r, 0)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum RolloutPhase {
    Progressing,
    /// Every replica runs the revision and is ready.
    Complete,
    /// Rolled back by itself: no progress within the deadline, or crash-looping replicas.
    RolledBack,
    /// A canary stopped by its analysis or by `shoal rollout abort`.
    Aborted,
    /// No progress within the deadline and nothing to roll back to (a new app).
    Failed,
}

impl RolloutPhase {
    pub fn is_done(self) -> bool {
        self != RolloutPhase::Progressing
    }
}

impl std::fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Phase {
    /// Not placed yet, or placed and not started by its node.
    Pending,
    /// Its node is loading or instantiating it.
    Starting,
    /// Serving: http replicas receive traffic only in this phase.
    Ready,
    /// Running but failing its readiness probe: no traffic until it passes.
    Unready,
    /// A job or daemon instance is executing.
    Running,
    /// A daemon (or a job allowed to retry) exited and waits, with a growing
    /// delay, to be started again.
    CrashLoopBackOff,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One running copy of an app's revision on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replica {
    pub id: String,
    pub app: AppKey,
    pub revision: u64,
    pub kind: Kind,
    pub resources: Resources,
    /// Set once by the scheduler; a replica never moves (a new one is made instead).
    pub node: Option<String>,
    pub phase: Phase,
    /// Why it is in its phase: scheduling failures, trap messages, exit reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Times its node started it again after it exited.
    #[serde(default)]
    pub restarts: u32,
    /// Machine-readable cause of its phase, e.g. `LivenessFailed`: its node gave
    /// up restarting it, and the controller replaces it on another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Nodes the scheduler should avoid for it (where its predecessor failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
    /// A job's run started by its schedule or by `shoal job run`: the firing
    /// (or request) it is for. Such runs are started, replaced and trimmed by
    /// the job's schedule and history, not counted against `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub scheduled_at: Option<Millis>,
    /// Since when the controller is moving it to another node to rebalance the
    /// cluster: a replacement is made as for a rollout (new before old, within the
    /// app's `max_surge` and `max_unavailable`), and it serves until it is removed.
    /// A move whose replacement is not serving within the app's progress deadline is
    /// given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub moving_since: Option<Millis>,
    /// What the controller says of it that its node does not (`message` is the node's):
    /// why it stays on a node its app's `node_selector` no longer matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Since when it serves (Ready, or Running) without a restart: what an app's
    /// `rollout.min_ready` is counted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub ready_since: Option<Millis>,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    #[schema(value_type = u64)]
    pub updated_at: Millis,
}

impl Replica {
    /// Whether it holds resources on its node (terminal replicas free them).
    pub fn is_active(&self) -> bool {
        self.node.is_some() && !self.phase.is_terminal()
    }

    /// Whether the controller is moving it to another node.
    pub fn moving(&self) -> bool {
        self.moving_since.is_some()
    }

    /// Whether it serves: Ready, or Running (a daemon or a job executing).
    pub fn serving(&self) -> bool {
        matches!(self.phase, Phase::Ready | Phase::Running)
    }

    /// Whether it has served for `min_ready_ms` at `now`, without a restart: only such a
    /// replica lets a rollout remove an old one, start a canary step or complete. A
    /// record written before `ready_since` existed counts from its last update.
    pub fn available(&self, min_ready_ms: u64, now: Millis) -> bool {
        self.serving()
            && (min_ready_ms == 0
                || now.saturating_sub(self.ready_since.unwrap_or(self.updated_at)) >= min_ready_ms)
    }
}

/// What a node offers to the scheduler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Size of the node's instance pool.
    pub instances: u64,
}

impl Capacity {
    /// What a replica reserves: its cpu and memory requests. No pool slots: a
    /// node's instances are shared by its replicas and held only while a
    /// request (or a job's run) uses one.
    pub fn of(r: &Resources) -> Capacity {
        Capacity {
            cpu_millis: r.requests.cpu_millis as u64,
            memory_bytes: r.requests.memory_bytes,
            instances: 0,
        }
    }

    pub fn add(&mut self, o: &Capacity) {
        self.cpu_millis += o.cpu_millis;
        self.memory_bytes += o.memory_bytes;
        self.instances += o.instances;
    }

    /// Gives back what [`Capacity::add`] took.
    pub fn sub(&mut self, o: &Capacity) {
        self.cpu_millis = self.cpu_millis.saturating_sub(o.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(o.memory_bytes);
        self.instances = self.instances.saturating_sub(o.instances);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum NodeState {
    Ready,
    NotReady,
}

/// The label every node of a pool carries: `shoal.dev/pool=NAME`.
pub const POOL_LABEL: &str = "shoal.dev/pool";

/// A namespace's quota (`shoal quota`, [`crate::quota`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quota {
    pub namespace: String,
    pub limits: crate::quota::QuotaLimits,
    #[schema(value_type = u64)]
    pub updated_at: Millis,
}

/// A node pool (`shoal pool`): workers Shoal starts and stops itself through a
/// provider command, between `min` and `max`, as a cluster autoscaler does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pool {
    pub name: String,
    pub spec: PoolSpec,
    /// The nodes it started and has not stopped yet, by node name.
    #[serde(default)]
    pub members: BTreeMap<String, PoolMember>,
    /// The number the next node's name ends in (`NAME-N`): names are never reused.
    pub next: u64,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    /// The capacity of the last node of it seen: what a new one will hold, to judge a
    /// waiting replica by while the pool runs none (one bigger starts no node for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_size: Option<Capacity>,
    /// When its workers last changed (another provider, other flags): only nodes started
    /// since tell what size a new one will be.
    #[serde(default)]
    #[schema(value_type = u64)]
    pub workers_since: Millis,
    /// Nodes stopped in a row for never joining, and when the last was: the pool starts
    /// the next one later and later, as the cluster autoscaler backs off a node group
    /// whose scale-ups fail. A node that joins ends the run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub start_failed_at: Option<Millis>,
}

/// What a pool's owner sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolSpec {
    pub min: u32,
    pub max: u32,
    /// A command run as `sh -c 'COMMAND "$@"' - start|stop NODE` with `SHOAL_POOL`,
    /// `SHOAL_JOIN_URL` and `SHOAL_JOIN_TOKEN_FILE` set; its `start` must make a worker
    /// that runs `shoal node join` under the name NODE. None: local `shoal node join`
    /// processes of the control plane itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// How long a node must run no replica before it is drained and stopped.
    pub cooldown_ms: u64,
    /// Labels the pool's nodes carry besides [`POOL_LABEL`]: waiting replicas grow the pool
    /// only if their `node_selector` asks for no other label. Local workers get them as
    /// `--label`; a provider gets them in `SHOAL_NODE_LABELS` (`k=v,k=v`) to pass on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// More `shoal node join` flags for local workers (e.g. `--memory`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_args: Vec<String>,
    /// Windows on a cron schedule that set other bounds while open (none at night,
    /// more in business hours), as an app's `[[scale.schedule]]` do for its replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<crate::spec::ScheduleWindow>,
}

/// The most nodes one pool may hold.
pub const MAX_POOL_SIZE: u32 = 1000;

impl PoolSpec {
    /// Why the spec cannot be kept, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.min > self.max {
            return Err(format!("min ({}) is above max ({})", self.min, self.max));
        }
        if self.max > MAX_POOL_SIZE {
            return Err(format!("max is at most {MAX_POOL_SIZE}"));
        }
        if self
            .provider
            .as_deref()
            .is_some_and(|p| p.trim().is_empty())
        {
            return Err("provider is an empty command".into());
        }
        if self.provider.is_some() && !self.node_args.is_empty() {
            return Err("node args are for local workers; a provider starts its own".into());
        }
        for (key, value) in &self.labels {
            if key == POOL_LABEL {
                return Err(format!(
                    "label {POOL_LABEL} is the pool's name, set by Shoal on every node of it"
                ));
            }
            crate::spec::validate_label("label key", key)
                .and_then(|()| crate::spec::validate_label("label value", value))
                .map_err(|m| format!("labels: {m}"))?;
        }
        for (i, w) in self.schedule.iter().enumerate() {
            w.check()
                .map_err(|(field, m)| format!("schedule[{i}].{field}: {m}"))?;
            if w.min.max(w.max).is_some_and(|n| n > MAX_POOL_SIZE) {
                return Err(format!("schedule[{i}]: at most {MAX_POOL_SIZE} nodes"));
            }
        }
        Ok(())
    }

    /// The node bounds in force at `now`, open windows applied.
    pub fn bounds(&self, now: Millis) -> crate::spec::Bounds {
        crate::spec::window_bounds((self.min, self.max), &self.schedule, |w| {
            w.open_at(now).is_some()
        })
    }
}

/// A node a pool started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolMember {
    #[schema(value_type = u64)]
    pub started_at: Millis,
    /// When its provider's `start` returned: its time to join counts from then, not from
    /// the decision (a provider may take minutes to make a machine). Kept in the store, so
    /// a control plane that restarts meanwhile does not stop a machine about to join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub start_returned_at: Option<Millis>,
    /// Since when it has run no replica while Ready, or only replicas that would all fit on
    /// the other nodes (`shoal_scheduler::pools::movable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub empty_since: Option<Millis>,
    /// Since when it is being drained to be stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub retiring_since: Option<Millis>,
    /// What started it, which is what stops it even after the pool's provider changed.
    /// None: recorded before this was kept (stopped as the pool's spec says now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<StartedBy>,
    /// Since when it is being stopped: decided, and not known to be done. It stays a member
    /// until its stop went through, so a stop cut short (a restart, a failed provider) is
    /// made again rather than leave its worker running as a node no pool manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub stopping_since: Option<Millis>,
    /// When its provider's `stop` last failed, and how many times in a row: it is tried
    /// again later, each time later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub stop_failed_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stop_failures: u32,
    /// Since when its node, which joined, has not been Ready: stopped after
    /// `UNREADY_TIMEOUT_MS` of it, not at a missed heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub not_ready_since: Option<Millis>,
    /// When a drain that did not take (the node is still schedulable) was last asked for
    /// again: it is asked again no more often than every `DRAIN_RETRY_MS`, not at every pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub drain_asked_at: Option<Millis>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl PoolMember {
    /// Counted among the pool's nodes: neither being drained to go nor being stopped.
    pub fn live(&self) -> bool {
        self.retiring_since.is_none() && self.stopping_since.is_none()
    }
}

/// What started a pool's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartedBy {
    /// A local `shoal node join` process of the control plane.
    Local,
    /// The provider command.
    Provider(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    pub name: String,
    /// Where its gateway listens, for proxying and for users.
    pub gateway: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// False when cordoned: running replicas stay, new ones go elsewhere.
    pub schedulable: bool,
    /// Set by `drain`: its replicas are replaced elsewhere, new before old.
    #[serde(default)]
    pub draining: bool,
    /// Set when the node drained itself as it shut down (`shoal node join` on SIGTERM): its
    /// next registration lifts that drain and puts back what it was, so an operator's cordon
    /// stays and the node's own goes. Any cordon, uncordon or drain by an operator clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving: Option<Leaving>,
    #[schema(value_type = u64)]
    pub joined_at: Millis,
    /// Labels an operator set (a value) or removed (none) with `shoal node label`, on top of
    /// those the node declares (`--label`): kept when it registers again, as `kubectl
    /// label node` outlives a kubelet restart. [`Node::labels`] holds the result.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_overrides: BTreeMap<String, Option<String>>,
}

/// Why [`Node::relabel`] changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelabelError {
    /// A label breaks a rule (its key or value, the pool's label, set and removed at once).
    #[error("{0}")]
    Invalid(String),
    /// A label has another value, and changing it was not asked for: a conflict, as
    /// `kubectl label` says it.
    #[error("{0}")]
    HasAnother(String),
}

impl Node {
    /// Its labels once registered with `declared` (its `--label`s): the operator's
    /// overrides on top.
    pub fn declare_labels(&mut self, declared: BTreeMap<String, String>) {
        let mut labels = declared;
        for (key, value) in &self.label_overrides {
            match value {
                Some(v) => labels.insert(key.clone(), v.clone()),
                None => labels.remove(key),
            };
        }
        self.labels = labels;
    }

    /// `shoal node label`: sets the labels of `set` and removes those of `remove`, as
    /// overrides kept across registrations. As `kubectl label`, a label that has another
    /// value changes only with `overwrite`; the pool label is Shoal's. What changed, for
    /// the event; an error says why, and then nothing changed.
    pub fn relabel(
        &mut self,
        set: &BTreeMap<String, String>,
        remove: &[String],
        overwrite: bool,
    ) -> Result<Vec<String>, RelabelError> {
        for key in set.keys().chain(remove) {
            if key == POOL_LABEL {
                return Err(RelabelError::Invalid(format!(
                    "label {POOL_LABEL} is the node's pool, set by Shoal"
                )));
            }
            crate::spec::validate_label("label key", key).map_err(RelabelError::Invalid)?;
        }
        if let Some(key) = remove.iter().find(|k| set.contains_key(*k)) {
            return Err(RelabelError::Invalid(format!(
                "label {key} is both set and removed"
            )));
        }
        for (key, value) in set {
            crate::spec::validate_label("label value", value).map_err(RelabelError::Invalid)?;
            match self.labels.get(key) {
                Some(old) if old != value && !overwrite => {
                    return Err(RelabelError::HasAnother(format!(
                        "node {} already has label {key}={old}: pass --overwrite to change it",
                        self.name
                    )));
                }
                _ => {}
            }
        }
        let mut changes = Vec::new();
        for (key, value) in set {
            match self.labels.insert(key.clone(), value.clone()) {
                Some(old) if old == *value => continue,
                Some(old) => changes.push(format!("{key}={value} (was {old})")),
                None => changes.push(format!("{key}={value}")),
            }
            self.label_overrides
                .insert(key.clone(), Some(value.clone()));
        }
        for key in remove {
            if let Some(old) = self.labels.remove(key) {
                changes.push(format!("{key} removed (was {old})"));
                self.label_overrides.insert(key.clone(), None);
            }
        }
        Ok(changes)
    }
}

/// What a node that drained itself as it shut down was before: [`Node::leaving`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Leaving {
    pub schedulable: bool,
}

/// What the control plane keeps of a node's own credential (issued when it
/// joins with the join token): its SHA-256, never the secret. Kept apart from
/// [`Node`], which every node reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredential {
    pub node: String,
    /// Hex SHA-256 of the credential's secret part (see [`crate::auth::Credential`]).
    pub hash: String,
    pub issued_at: Millis,
}

/// A named set of configuration values that the apps of its namespace share: an app names
/// it in `config_sets`, and each of its revisions keeps the values it was made with, so a
/// change to the set rolls its users and `rollout undo` brings the old values back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSet {
    pub namespace: String,
    pub name: String,
    pub data: std::collections::BTreeMap<String, String>,
    #[schema(value_type = u64)]
    pub updated_at: Millis,
}

/// A named directory of a namespace that outlives instances: made by the first apply that
/// mounts it (`[[volumes]]`), bound to the node of the first replica placed with it, and kept,
/// data and all, until `shoal delete volume`. Replicas that mount it are placed on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub namespace: String,
    pub name: String,
    /// What it may hold, in bytes: a write past it fails.
    pub size_bytes: u64,
    /// Where its data lives, once a replica was placed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub created_at: Millis,
}

impl Volume {
    /// This volume as a spec's `mount` leaves it: a writer's size given sets it; one not given,
    /// or a reader's, keeps the volume's (a reader's spec does not reset its writers', whose
    /// limit it is). A size below `used`, what the volume was last measured holding, is
    /// refused with that measure: every writer would fail (EDQUOT).
    pub fn sized(
        mut self,
        mount: &crate::spec::VolumeMount,
        used: Option<u64>,
    ) -> Result<Volume, Shrunk> {
        let given = mount.size_bytes.filter(|_| !mount.read_only);
        let Some(size) = given.filter(|s| *s != self.size_bytes) else {
            return Ok(self);
        };
        if let Some(used) = used.filter(|u| *u > size) {
            return Err(Shrunk { used, size });
        }
        self.size_bytes = size;
        Ok(self)
    }
}

/// A deleted volume whose node has yet to remove its data: written with the deletion, and
/// gone once that node no longer has the directory. A node removes a volume's data only for
/// one of these, never for a volume it does not hear of (a state restored from an older
/// backup, or made anew, knows nothing of volumes made since, and their data stays). Until
/// it is gone no volume of that name is made again, so the old data never shows up in a new
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDeletion {
    pub namespace: String,
    pub name: String,
    /// The node that holds the data.
    pub node: String,
    pub deleted_at: Millis,
}

/// A volume size below what the volume holds: [`Volume::sized`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shrunk {
    pub used: u64,
    pub size: u64,
}

impl Shrunk {
    /// "holds U: size = "S" is less", for the caller to say whose size it is.
    pub fn say(&self, volume: &str) -> String {
        format!(
            "volume {volume} holds {}: size = \"{}\" is less, and its writers would fail",
            crate::quantity::format_memory(self.used),
            crate::quantity::format_memory(self.size)
        )
    }
}

/// A named set of secret values of a namespace, kept sealed: each value is encrypted with
/// the control plane's key (XChaCha20-Poly1305) and bound to its namespace, secret, version
/// and key, so a sealed value moved elsewhere does not open. Apps name a secret's keys as
/// env values or config keys; each revision pins the version it was made with, so the
/// versions that revisions still name are kept (and the latest), and `rollout undo` brings
/// an old value back. Values leave the control plane only for a node that runs a replica
/// using them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub namespace: String,
    pub name: String,
    /// The latest version: what an apply pins.
    pub version: u64,
    pub versions: BTreeMap<u64, SecretVersion>,
    pub updated_at: Millis,
}

impl Secret {
    /// The keys of the latest version.
    pub fn keys(&self) -> Vec<String> {
        self.versions
            .get(&self.version)
            .map(|v| v.data.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub data: BTreeMap<String, Sealed>,
    pub created_at: Millis,
}

/// One encrypted value: which of the control plane's keys sealed it, the nonce, and the
/// ciphertext with its tag (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key: String,
    pub nonce: String,
    pub data: String,
}

/// An API token made by `shoal token create`: a role, and the namespaces it
/// acts in (none listed: every namespace). As for node credentials, only the
/// secret's SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    pub role: crate::auth::Role,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    pub hash: String,
    pub created_at: Millis,
    /// When it stops working, if it was made to; refused from then on, as revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
}

/// A node's liveness, renewed by every heartbeat. Kept apart from [`Node`]
/// (as Kubernetes keeps Lease objects) so a heartbeat does not look like a
/// change of the node to everyone watching nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node: String,
    pub renewed_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventType {
    Normal,
    Warning,
}

/// Something that happened, for `shoal describe` and `shoal events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// The store revision that recorded it, filled in when read: commits are
    /// serial, so a follower asking for what comes after the last one it saw
    /// never skips one. Events of one transaction share it.
    #[serde(default)]
    pub seq: u64,
    #[schema(value_type = u64)]
    pub time: Millis,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// CamelCase reason: Scheduled, FailedScheduling, Ready, Failed, …
    pub reason: String,
    /// `app/default/hello`, `replica/default/hello/hello-1-x7k2p`, `node/local`.
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppKey>,
    pub message: String,
}

/// An uploaded, validated module, stored by content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Module {
    pub digest: String,
    pub size: u64,
    pub kind: WasmKind,
    #[schema(value_type = u64)]
    pub uploaded_at: Millis,
    /// Where the control plane pulled it from; absent for an upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciOrigin>,
    /// What a component exports at its top level, which says what kind of app it can run
    /// as (`Kind::runs`); absent for one recorded before Shoal read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports: Option<Vec<String>>,
}

/// The registry a module was pulled from, for `shoal get modules`: the reference as
/// the spec wrote it and the manifest it resolved to then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OciOrigin {
    pub reference: String,
    pub manifest: String,
}

/// When an apply last made a revision of a module: written (blindly, so
/// concurrent applies of one module do not conflict) in the transaction that
/// writes the revision. A collection guards its delete on it as read before
/// it read the revisions, so it cannot delete a module from under a revision
/// made meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleUse {
    pub last_used: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer's size sets the volume's unless it holds more; a reader's, or none, keeps it.
    #[test]
    fn a_volume_takes_its_writers_size_not_its_readers() {
        let volume = Volume {
            namespace: "default".into(),
            name: "data".into(),
            size_bytes: 4 << 20,
            node: None,
            created_at: 0,
        };
        let mount = |size: Option<u64>, read_only: bool| crate::spec::VolumeMount {
            name: "data".into(),
            mount: "/data".into(),
            read_only,
            size_bytes: size,
        };
        let sized = |m, used| volume.clone().sized(&m, used).map(|v| v.size_bytes);
        assert_eq!(sized(mount(Some(8 << 20), false), None), Ok(8 << 20));
        assert_eq!(sized(mount(None, false), None), Ok(4 << 20));
        assert_eq!(
            sized(mount(Some(1 << 20), true), Some(3 << 20)),
            Ok(4 << 20)
        );
        assert_eq!(
            sized(mount(Some(1 << 20), false), Some(3 << 20)),
            Err(Shrunk {
                used: 3 << 20,
                size: 1 << 20
            })
        );
    }

    fn node(labels: &[(&str, &str)]) -> Node {
        Node {
            name: "n1".into(),
            gateway: "n1:8080".into(),
            capacity: Capacity::default(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: NodeState::Ready,
            schedulable: true,
            draining: false,
            leaving: None,
            joined_at: 0,
            label_overrides: BTreeMap::new(),
        }
    }

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn relabelling_changes_a_value_only_when_told_to_and_never_the_pool() {
        let mut n = node(&[("zone", "a"), (POOL_LABEL, "workers")]);
        let e = n.relabel(&set(&[("zone", "b")]), &[], false).unwrap_err();
        assert!(
            matches!(&e, RelabelError::HasAnother(m) if m.contains("--overwrite")),
            "{e}"
        );
        // The same value is no change, with or without --overwrite.
        assert_eq!(n.relabel(&set(&[("zone", "a")]), &[], false), Ok(vec![]));
        let changes = n
            .relabel(&set(&[("zone", "b"), ("tier", "web")]), &[], true)
            .unwrap();
        assert_eq!(changes, ["tier=web", "zone=b (was a)"]);
        let changes = n
            .relabel(&BTreeMap::new(), &["tier".into()], false)
            .unwrap();
        assert_eq!(changes, ["tier removed (was web)"]);
        assert_eq!(n.labels, set(&[("zone", "b"), (POOL_LABEL, "workers")]));
        for refused in [
            n.relabel(&set(&[(POOL_LABEL, "other")]), &[], true),
            n.relabel(&BTreeMap::new(), &[POOL_LABEL.into()], true),
            n.relabel(&set(&[("zone", "c")]), &["zone".into()], true),
            n.relabel(&set(&[("bad key", "x")]), &[], true),
            n.relabel(&set(&[("k", "")]), &[], true),
        ] {
            assert!(
                matches!(refused, Err(RelabelError::Invalid(_))),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn an_operators_labels_outlive_what_the_node_declares() {
        let mut n = node(&[("zone", "a"), ("disk", "ssd")]);
        n.relabel(&set(&[("zone", "b")]), &["disk".into()], true)
            .unwrap();
        // The node registers again with its own --label flags, and one more.
        n.declare_labels(set(&[("zone", "a"), ("disk", "ssd"), ("gpu", "yes")]));
        assert_eq!(n.labels, set(&[("zone", "b"), ("gpu", "yes")]));
    }
}
