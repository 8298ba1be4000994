//! The `/v1` API's request and response bodies, and what nodes and the
//! control plane exchange. Serde shapes are the wire format: renaming a field
//! here changes the API.

use serde::{Deserialize, Serialize};
use shoal_core::auth::Role;
use shoal_core::metrics::RevisionStats;
use shoal_core::spec::{AppKey, Concurrency};
use shoal_core::{
    App, Capacity, Event, Kind, Millis, Module, Node, NodeState, Phase, Replica, Revision,
    RolloutStatus,
};

/// The answer to `POST /v1/modules`: the module, and whether it was there before (the
/// upload then stored nothing new).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModuleUploaded {
    pub module: Module,
    pub existed: bool,
}

/// The answer to a delete that says what it deleted: an app as `namespace/name`, a config
/// set, secret or volume by its name.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// The answer to `DELETE /v1/nodes/{name}`: the node, and the volumes bound to it, as
/// `namespace/name`, whose data stayed on its machine (apps mounting them cannot run elsewhere).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeDeleted {
    pub deleted: String,
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// The answer to `GET /v1/version`: the server's release, for `shoal version`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServerVersion {
    pub version: String,
}

/// The answer to `POST /v1/cluster/nodes`: the store revision that recorded the node.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Registered {
    pub revision: u64,
}

/// What `apply` did or would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyResult {
    pub outcome: ApplyOutcome,
    pub dry_run: bool,
    /// Field-level differences from what was stored, `field: old -> new`.
    pub changes: Vec<String>,
    pub app: App,
    /// What was applied but likely not meant, as kubectl's server warnings: an outbound
    /// grant that names an app, say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One row of `shoal get apps`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSummary {
    pub namespace: String,
    pub name: String,
    pub kind: Kind,
    pub revision: u64,
    /// Replicas wanted now: the app's size, or its autoscaled one, within the
    /// bounds of any open schedule window; for a job, its runs not over yet.
    pub desired: u32,
    pub ready: usize,
    pub routes: Vec<String>,
    pub digest: String,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    /// Autoscaling only: the bounds in force now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<ScaleView>,
    /// Schedule windows open now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
}

/// One row of `shoal get jobs`: a job app, its schedule and its runs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub namespace: String,
    pub name: String,
    /// None: it runs once per revision, and when `shoal job run` asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub timezone: String,
    pub concurrency: Concurrency,
    /// Its replicas that have not finished.
    pub active: usize,
    /// Its newest replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunView>,
    /// When the schedule next fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub next: Option<Millis>,
    /// A run `shoal job run` asked for that has not started yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub run_requested: Option<Millis>,
    #[schema(value_type = u64)]
    pub created_at: Millis,
}

/// One run of a job: its replica.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunView {
    pub replica: String,
    pub phase: Phase,
    /// The firing (or `shoal job run` request) it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub scheduled_at: Option<Millis>,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    /// When it last changed phase: when it finished, once it has.
    #[schema(value_type = u64)]
    pub updated_at: Millis,
}

/// What `POST /v1/apps/{name}/run` answers: the request recorded. The run is
/// the replica whose `scheduled_at` is `requested_at`, once the controller
/// starts it (or none, if the concurrency policy skips it).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRun {
    pub app: AppKey,
    #[schema(value_type = u64)]
    pub requested_at: Millis,
}

/// Requests a gateway holds for an app that has no ready replica (it scaled to
/// zero): what wakes it. Sent when the count changes, zero included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Waiting {
    pub app: AppKey,
    pub requests: u32,
}

/// An autoscaled app's bounds and what it is scaled on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScaleView {
    pub min: u32,
    pub max: u32,
    pub target_concurrency: u32,
    /// In-flight requests across the app, averaged over its stable window, as
    /// the gateways last reported; `None` before any report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<f64>,
}

/// `shoal describe app`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Describe {
    pub app: App,
    /// The spec's [`AppSpec::fingerprint`](shoal_core::AppSpec::fingerprint): what an edit
    /// sends back as `?if_spec=` so that it is refused if the spec changed meanwhile. Empty
    /// from servers before it.
    #[serde(default)]
    pub fingerprint: String,
    /// Where the rollout of its current revision stands (none for jobs).
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    pub revisions: Vec<Revision>,
    pub replicas: Vec<Replica>,
    pub events: Vec<Event>,
    /// The world its component is served as (`wasi:http/proxy`, `wasi:http/service, WASIp3`,
    /// `wasi:cli/command`), read from its module's exports; absent for a module recorded
    /// before Shoal read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<String>,
    /// CPU its guests used lately, over every node; `None` before any node reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuView>,
}

/// An app's guest CPU over the nodes' last two reports: what `describe` sets
/// beside its requests and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CpuView {
    /// Average over the interval, in millicores.
    pub used_millis: u64,
    /// Time its guests waited for their share or their limit, in millicores too
    /// (1000: one guest waiting all the time).
    pub throttled_millis: u64,
}

/// What a node's guests of one app used since its first replica there started:
/// CPU time running and time waiting for their share or limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppCpu {
    pub app: AppKey,
    pub used_ns: u64,
    pub throttled_ns: u64,
}

/// What a node says of its guests' memory with each heartbeat, for `shoal top nodes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeUsage {
    /// What the instances alive now hold of the budget.
    pub memory_reserved_bytes: u64,
    /// The guest memory the node hands out at once.
    pub memory_budget_bytes: u64,
    /// Instances alive now: serving, kept for reuse or running a job (absent from nodes of
    /// earlier releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
}

/// One row of `shoal top nodes`: what a node's guests use now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeTop {
    pub name: String,
    pub state: NodeState,
    /// Its guests' CPU between its last two reports, in millicores; `None` without two
    /// reports in the last 10 s.
    pub cpu_millis: Option<u64>,
    pub cpu_capacity_millis: u64,
    /// Its guests' memory, as its last heartbeat in the last 10 s said.
    pub memory: Option<NodeUsage>,
    /// Replicas placed on it that have not finished.
    pub replicas: usize,
    /// Requests its gateway routed per second, over the last minute.
    pub requests_per_second: f64,
}

/// One row of `shoal top apps`: what an app serves and uses now, over every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppTop {
    pub namespace: String,
    pub name: String,
    pub ready: usize,
    pub desired: u32,
    /// Over the last minute, as the gateways counted.
    pub requests_per_second: f64,
    /// Answers with a 5xx status per second, over the last minute.
    pub errors_per_second: f64,
    /// The 99th percentile of the time to the response head over the last minute (the upper
    /// bound of its histogram bucket), in milliseconds; `None` without requests.
    pub p99_ms: Option<u64>,
    /// Its guests' CPU, as in `describe`.
    pub cpu: Option<CpuView>,
}

/// One row of `shoal get servers`: a server of the control plane, by the URL it advertises,
/// and whether its controller runs (the leader; the one server on a store of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServerSummary {
    pub url: String,
    pub leader: bool,
}

/// One row of `shoal get nodes`: the node plus what is placed on it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeSummary {
    #[serde(flatten)]
    pub node: Node,
    pub allocated: Capacity,
    pub replicas: usize,
    #[schema(value_type = u64)]
    pub last_heartbeat: Millis,
    /// Ready, but not heard from within the node grace: it is down, or the control plane
    /// cannot hear it (then, with most nodes silent, it stays Ready so that nothing is
    /// evicted). `shoal get nodes` shows it as `Unknown`, as kubectl does.
    #[serde(default)]
    pub silent: bool,
    /// Instances alive on it now, of `node.capacity.instances`, as its last heartbeat in the
    /// last 10 s said (to the server answering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances_alive: Option<u64>,
}

/// `PUT /v1/nodes/{name}/labels` (`shoal node label`): labels to set and to remove, as
/// `kubectl label node` takes them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeLabels {
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
    /// Change a label that has another value (without it, that is refused).
    #[serde(default)]
    pub overwrite: bool,
}

/// `GET /v1/nodes/{name}` (`shoal describe node`): one node, what is placed on it, what it
/// uses now and what happened to it, as `kubectl describe node` shows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeDescribe {
    #[serde(flatten)]
    pub summary: NodeSummary,
    /// What its guests use now and what its gateway routed, as `shoal top nodes` shows.
    pub usage: NodeTop,
    /// The replicas placed on it that have not finished, every namespace's.
    pub placed: Vec<Replica>,
    /// Its own events (object `node/NAME`), the newest 20, oldest first.
    pub events: Vec<Event>,
}

/// `POST /v1/tokens`: a new API token named `name` with `role`, acting in
/// `namespaces` (none: every namespace), working for `expires_in_seconds` if given (as
/// Kubernetes' TokenRequest `expirationSeconds`), else until revoked.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRequest {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// An API token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[schema(value_type = u64)]
    pub created_at: Millis,
    /// When it stops working; absent: when it is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub expires_at: Option<Millis>,
}

/// The answer to `POST /v1/tokens`: the one time the token itself is sent.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    pub token: String,
}

/// A config set as `shoal config get` lists it: its keys and the apps that name it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSetView {
    pub namespace: String,
    pub name: String,
    pub keys: Vec<String>,
    pub used_by: Vec<String>,
    #[schema(value_type = u64)]
    pub updated_at: shoal_core::Millis,
}

/// The body of `PUT /v1/configs/{name}`: the set's values, whole; with `create`, only if the
/// set does not exist yet; with `merge`, `data`'s keys set and `unset`'s removed in the set as
/// it is when the write is made (so two changes at once both land, as `shoal config set`
/// makes them).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSetRequest {
    pub data: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub create: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unset: Vec<String>,
}

/// The answer to a `PUT /v1/configs/{name}`: the set, and the apps applied again with it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSetWritten {
    pub set: shoal_core::ConfigSet,
    pub rolled: Vec<String>,
    /// The data was the set's already: nothing was written, and no app applied again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// A namespace's quota and what its apps ask for, counted as the quota counts them
/// (`GET /v1/quotas`, `PUT /v1/quotas/{namespace}`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaView {
    pub namespace: String,
    pub limits: shoal_core::quota::QuotaLimits,
    pub used: shoal_core::quota::Usage,
}

/// A change to some caps of a namespace's quota (`PATCH /v1/quotas/{namespace}`, `shoal quota
/// set`): a cap left out is kept, `null` takes it away, a number sets it. The server merges it
/// into the quota as stored, so two admins changing different caps at once both land.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaPatch {
    #[serde(default, skip_serializing_if = "Cap::is_kept")]
    #[schema(value_type = Option<u64>)]
    pub apps: Cap,
    #[serde(default, skip_serializing_if = "Cap::is_kept")]
    #[schema(value_type = Option<u64>)]
    pub replicas: Cap,
    #[serde(default, skip_serializing_if = "Cap::is_kept")]
    #[schema(value_type = Option<u64>)]
    pub cpu_millis: Cap,
    #[serde(default, skip_serializing_if = "Cap::is_kept")]
    #[schema(value_type = Option<u64>)]
    pub memory_bytes: Cap,
}

/// One cap in a [`QuotaPatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cap {
    /// Left out: as it is.
    #[default]
    Keep,
    /// `null`: no cap.
    Remove,
    Set(u64),
}

impl Cap {
    pub fn is_kept(&self) -> bool {
        *self == Cap::Keep
    }

    /// `cap` as this changes it.
    pub fn applied(self, cap: Option<u64>) -> Option<u64> {
        match self {
            Cap::Keep => cap,
            Cap::Remove => None,
            Cap::Set(n) => Some(n),
        }
    }
}

impl Serialize for Cap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Cap::Set(n) => s.serialize_u64(*n),
            Cap::Keep | Cap::Remove => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for Cap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<u64>::deserialize(d)? {
            Some(n) => Cap::Set(n),
            None => Cap::Remove,
        })
    }
}

/// A secret as the API shows it: never its values, only its keys, its versions and the
/// apps that name it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretView {
    pub namespace: String,
    pub name: String,
    pub keys: Vec<String>,
    /// The latest version, which an apply pins.
    pub version: u64,
    /// Every version kept: the latest and those revisions still name.
    pub versions: Vec<u64>,
    pub used_by: Vec<String>,
    #[schema(value_type = u64)]
    pub updated_at: shoal_core::Millis,
}

/// The body of `PUT /v1/pools/{name}`: with `create`, a new pool (refused if it exists);
/// otherwise the existing pool's spec replaced, its nodes kept.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolWrite {
    #[serde(default)]
    pub create: bool,
    pub spec: shoal_core::PoolSpec,
}

/// The body of `PUT /v1/secrets/{name}`. With `create`, a new secret holding `set`
/// (refused if it exists); otherwise a new version of an existing one: its latest values,
/// with `set` over them and `unset` taken out. The API never returns a value, so a change is
/// described rather than sent whole.
#[derive(Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretWrite {
    #[serde(default)]
    pub create: bool,
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

impl std::fmt::Debug for SecretWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretWrite")
            .field("create", &self.create)
            .field("set", &self.set.keys().collect::<Vec<_>>())
            .field("unset", &self.unset)
            .finish()
    }
}

/// The answer to a `PUT /v1/secrets/{name}`: the secret, and the apps applied again with it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretWritten {
    pub secret: SecretView,
    pub rolled: Vec<String>,
    /// Every value was the secret's already: no new version, and no app applied again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// What `shoal secret rotate-key` did: the new key's id and how many values it sealed again.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyRotated {
    pub key: String,
    pub secrets: usize,
    pub values: usize,
}

/// The secret values one replica's revision names, opened for the node that runs it: env
/// values and config keys, by name. A node keeps them in memory only; they are not printed.
#[derive(Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaSecrets {
    pub env: std::collections::BTreeMap<String, String>,
    pub config: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for ReplicaSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSecrets")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// An app's HTTPS certificate for its route hosts (`[http] tls`), opened for the nodes'
/// gateways, which all serve every route. A node keeps it in memory only.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IngressCertificate {
    pub namespace: String,
    pub app: String,
    /// The app's route hosts: the names a client may ask for to get this certificate.
    pub hosts: Vec<String>,
    /// The secret and version it came from: what a node compares to know it has it.
    pub secret: String,
    pub version: u64,
    /// PEM.
    pub chain: String,
    pub key: String,
}

impl std::fmt::Debug for IngressCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressCertificate")
            .field("namespace", &self.namespace)
            .field("app", &self.app)
            .field("hosts", &self.hosts)
            .field("secret", &self.secret)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A volume as `shoal get volumes` lists it: where it is, its limit, what its node last
/// measured it holding, and the apps that mount it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeView {
    pub namespace: String,
    pub name: String,
    pub size_bytes: u64,
    pub node: Option<String>,
    pub used_bytes: Option<u64>,
    pub used_by: Vec<String>,
    #[schema(value_type = u64)]
    pub created_at: shoal_core::Millis,
}

/// What a node measured one of its volumes holding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeUsage {
    pub namespace: String,
    pub name: String,
    pub bytes: u64,
    /// In the control plane's answer: the volume was deleted, and the node removes its data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// A key-value bucket as `shoal kv buckets` lists it: how many keys and bytes it holds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BucketView {
    pub namespace: String,
    pub bucket: String,
    pub keys: u64,
    pub bytes: u64,
}

/// What a node sends with the join token to get its own credential.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinRequest {
    pub node: String,
}

/// The answer to a [`JoinRequest`]: the node's credential (`NAME.SECRET`,
/// its bearer token for every later call). It goes to the node's data dir,
/// readable by its owner only.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinResponse {
    pub credential: String,
}

/// What a node asks the cluster CA to sign at every start: a request for a
/// key it made and keeps (PEM), and the addresses or names its gateway is
/// reached at, which the certificate will name.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertificateRequest {
    pub csr: String,
    pub hosts: Vec<String>,
}

/// The certificate the cluster CA signed for a [`CertificateRequest`], PEM.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IssuedCertificate {
    pub certificate: String,
}

/// The answer to `POST /v1/join-token/rotate`: where the control
/// plane keeps the new join token (and the token, only when asked for it).
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotatedJoinToken {
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeAction {
    Cordon,
    Uncordon,
    Drain,
}

/// What a node acts on: every object of the kinds [`Delta`]s carry. Each list
/// was read at `revision` or later, so watching from `revision + 1` misses
/// nothing; applying a change a list already reflects is harmless, since a put
/// carries the whole object and a delete is a delete (see [`Delta`]).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    pub revision: u64,
    /// Which store the revision is of (the store's `KvStore::id`): a watch resumed with
    /// it is refused by a store that replaced this one (restored from elsewhere, migrated).
    /// 0: not known.
    #[serde(default)]
    pub store: u64,
    pub apps: Vec<App>,
    pub revisions: Vec<Revision>,
    pub replicas: Vec<Replica>,
    pub nodes: Vec<Node>,
    /// For the canary traffic splits gateways apply.
    #[serde(default)]
    pub rollouts: Vec<RolloutStatus>,
}

/// One store revision's changes to what nodes act on: what the watch streams
/// after a [`Snapshot`]. A transaction's writes share a revision and travel in
/// one delta, so a node never acts on half of one. Applied in revision order
/// they rebuild the cluster state; a put carries the whole object, so applying
/// again one that a snapshot already reflects changes nothing that a later
/// delta does not set right.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delta {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// One object written or deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    #[schema(value_type = ObjectSchema)]
    Put(Object),
    Delete(ObjectKey),
}

/// [`Object`] as the OpenAPI schemas name it: utoipa takes a type named `Object` for any JSON
/// object, so [`Change::Put`] names its schema through this alias.
type ObjectSchema = Object;

/// An object of a kind nodes act on, whole. The large kinds are boxed, so a
/// batch of small changes (replicas, mostly) stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Object {
    App(Box<App>),
    Revision(Box<Revision>),
    Replica(Box<Replica>),
    Node(Node),
    Rollout(RolloutStatus),
}

/// Which object a [`Change::Delete`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKey {
    App(AppKey),
    Revision { app: AppKey, number: u64 },
    Replica { app: AppKey, id: String },
    Node(String),
    Rollout(AppKey),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::App(a) => ObjectKey::App(a.spec.key()),
            Object::Revision(r) => ObjectKey::Revision {
                app: r.app.clone(),
                number: r.number,
            },
            Object::Replica(r) => ObjectKey::Replica {
                app: r.app.clone(),
                id: r.id.clone(),
            },
            Object::Node(n) => ObjectKey::Node(n.name.clone()),
            Object::Rollout(s) => ObjectKey::Rollout(s.app.clone()),
        }
    }
}

/// A service: every http app, reachable by name from other apps.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `name.namespace`: the host other apps call it by (`name` alone within its namespace).
    pub host: String,
    pub routes: Vec<String>,
    /// The apps that may call it by name, each `APP.NS`, `*.NS` or `*`: its `[network]
    /// inbound`, or `*.NAMESPACE` (its namespace's apps) when it has none. Empty: none, it
    /// takes only routed requests.
    #[serde(default)]
    pub callers: Vec<String>,
    pub endpoints: Vec<ServiceEndpoint>,
}

/// A Ready replica on a Ready node.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceEndpoint {
    pub replica: String,
    pub node: String,
    pub gateway: String,
}

/// What a node says about one of its replicas.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaReport {
    pub app: AppKey,
    pub replica: String,
    pub node: String,
    pub phase: Phase,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub restarts: u32,
    /// See [`Replica::reason`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `shoal rollout status`: where the rollout stands and what runs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    pub app: AppKey,
    /// The revision the app runs now; `status` may still describe an earlier
    /// one until the controller has seen the change.
    pub revision: u64,
    pub kind: Kind,
    pub desired: u32,
    /// `None` for jobs, which run to completion instead of rolling, and for a
    /// new app until the controller has seen it.
    pub status: Option<RolloutStatus>,
    pub steps: usize,
    /// Percent of traffic the canary gets now: its step's during a canary step, 0 after a
    /// canary's rollback or abort while its replicas are being removed.
    pub weight: Option<u8>,
    /// Replicas per revision, newest first.
    pub revisions: Vec<RevisionCount>,
    /// What the gateways measured of canary and stable since the step began.
    pub canary: Option<RevisionStats>,
    pub stable: Option<RevisionStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevisionCount {
    pub revision: u64,
    pub replicas: usize,
    pub ready: usize,
}

/// What `shoal rollout <action>` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    Pause,
    Resume,
    /// Canary: end the current step now; `full`: skip every remaining step.
    Promote,
    /// Back to the stable revision.
    Abort,
}

/// Something that happened to a replica that only its node sees: a request
/// killed by its timeout, an instance out of memory, a trap.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaIncident {
    pub app: AppKey,
    pub replica: String,
    pub node: String,
    /// `KilledByTimeout`, `OutOfMemory` or `Trapped`.
    pub reason: String,
    pub message: String,
}

/// Every [`ReplicaIncident::reason`] the control plane accepts.
pub const INCIDENT_REASONS: [&str; 3] = ["KilledByTimeout", "OutOfMemory", "Trapped"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_patch_keeps_what_it_leaves_out_and_takes_away_what_it_nulls() {
        let patch: QuotaPatch =
            serde_json::from_str(r#"{"apps": null, "cpu_millis": 4000}"#).unwrap();
        assert_eq!(
            patch,
            QuotaPatch {
                apps: Cap::Remove,
                cpu_millis: Cap::Set(4000),
                ..QuotaPatch::default()
            }
        );
        assert_eq!(
            serde_json::to_string(&patch).unwrap(),
            r#"{"apps":null,"cpu_millis":4000}"#
        );
        assert_eq!(patch.apps.applied(Some(3)), None);
        assert_eq!(patch.replicas.applied(Some(7)), Some(7));
        assert_eq!(patch.cpu_millis.applied(None), Some(4000));
    }

    #[test]
    fn actions_are_lowercase_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&RolloutAction::Promote).unwrap(),
            r#""promote""#
        );
        assert_eq!(
            serde_json::to_string(&NodeAction::Uncordon).unwrap(),
            r#""uncordon""#
        );
        assert_eq!(
            serde_json::to_string(&ApplyOutcome::Unchanged).unwrap(),
            r#""unchanged""#
        );
    }

    #[test]
    fn deltas_name_what_changed_on_the_wire() {
        let web = AppKey::new("default", "web");
        let delta = Delta {
            revision: 7,
            changes: vec![
                Change::Delete(ObjectKey::Replica {
                    app: web.clone(),
                    id: "web-1-a".into(),
                }),
                Change::Delete(ObjectKey::Rollout(web)),
            ],
        };
        let json = serde_json::to_value(&delta).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"revision": 7, "changes": [
                {"delete": {"replica": {"app": {"namespace": "default", "name": "web"}, "id": "web-1-a"}}},
                {"delete": {"rollout": {"namespace": "default", "name": "web"}}},
            ]})
        );
        assert_eq!(serde_json::from_value::<Delta>(json).unwrap(), delta);
    }
}
