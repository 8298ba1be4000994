//! How an agent reaches its control plane: in process (`shoal up`, through
//! `shoal_control::LocalLink`) or over HTTP (`shoal node join`, through
//! `shoal_agent::RemoteLink`). The agent only reads state and reports; both
//! links offer exactly those operations, so the agent cannot tell them apart.

use crate::types::{
    AppCpu, CertificateRequest, Delta, NodeUsage, ReplicaIncident, ReplicaReport, ReplicaSecrets,
    Snapshot, Waiting,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use shoal_core::Node;
use shoal_core::metrics::RevisionStats;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The control plane does not know this node (e.g. it was removed): register again.
    #[error("node is not registered")]
    Unregistered,
    /// The history a watch asked for is compacted away: read the snapshot again.
    #[error("the history asked for is compacted; the snapshot is to be read again")]
    Compacted,
    #[error("{0}")]
    Failed(String),
}

pub type LinkResult<T> = Result<T, LinkError>;

/// Key-value calls a node sent over the network ([`Link::kv_sent`]): fewer requests than
/// calls when calls went together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvSent {
    pub calls: u64,
    pub requests: u64,
}

/// The last item of a watch whose connection broke (its server died, or the link moved to
/// another server): the changes after the last one received can be asked for again, of any
/// server of the cluster, since they share one store and its revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the watch's connection to the control plane broke")]
pub struct WatchBroken;

/// A watch: one [`Delta`] per store revision, in order, ending with [`WatchBroken`] if its
/// connection broke. One that ends without it cannot go on from where it stopped (the history
/// it needed is compacted, a change could not be read or passed on): the snapshot is to be
/// read again.
pub type Changes = BoxStream<'static, Result<Delta, WatchBroken>>;

pub trait Link: Send + Sync + 'static {
    fn register(&self, node: Node) -> BoxFuture<'_, LinkResult<()>>;
    /// A certificate of the cluster CA for this node's key, which its gateway
    /// presents on hops (to peers, as server and as client) and to the control
    /// plane reading its logs. PEM.
    fn certificate(
        &self,
        node: &str,
        request: CertificateRequest,
    ) -> BoxFuture<'_, LinkResult<String>>;
    /// Renews the node's lease, saying what its guests' memory is now.
    fn heartbeat(&self, node: &str, usage: NodeUsage) -> BoxFuture<'_, LinkResult<()>>;
    /// The node is shutting down: its replicas are to move to other nodes, new before old
    /// (a drain of its own, lifted when it registers again).
    fn leave(&self, node: &str) -> BoxFuture<'_, LinkResult<()>>;
    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>>;
    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>>;
    /// The changes after revision `after` (a [`Snapshot`]'s, or the last [`Delta`]'s the
    /// agent applied) that the agent acts on, as [`Changes`]. [`LinkError::Compacted`] when
    /// that history is gone.
    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<Changes>>;
    /// A local file with the module's bytes, verified against its digest.
    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>>;
    /// The secret values the revision of `replica`, placed on this node, names: what it
    /// needs to start. Refused for a replica placed elsewhere.
    fn secrets(
        &self,
        node: &str,
        replica: &shoal_core::spec::AppKey,
        id: &str,
    ) -> BoxFuture<'_, LinkResult<ReplicaSecrets>>;
    /// Every app's HTTPS certificate for its route hosts: each gateway serves every route.
    fn ingress(
        &self,
        node: &str,
    ) -> BoxFuture<'_, LinkResult<Vec<crate::types::IngressCertificate>>>;
    /// A `wasi:keyvalue` call of a guest of `app` on this node, on `bucket` of the app's
    /// namespace. Refused unless a replica of `app` here is granted the bucket.
    fn kv(
        &self,
        node: &str,
        app: &shoal_core::spec::AppKey,
        bucket: &str,
        op: shoal_core::kv::KvOp,
    ) -> BoxFuture<'_, LinkResult<shoal_core::kv::KvAnswer>>;
    /// Guests' key-value calls this link sent to the control plane, and the requests that
    /// carried them, since it was made; `None` in process, where no request carries them.
    fn kv_sent(&self) -> Option<KvSent> {
        None
    }
    /// What this node's volumes hold; answers the volumes bound to this node that still
    /// exist (a directory of any other, no replica using it, may go).
    fn volumes(
        &self,
        node: &str,
        usage: Vec<crate::types::VolumeUsage>,
    ) -> BoxFuture<'_, LinkResult<Vec<crate::types::VolumeUsage>>>;
    /// The node runs `digest` no more: a copy [`Link::module`] fetched may go. The
    /// in-process link hands out the control plane's own file, which stays.
    fn forget_module(&self, _digest: &str) {}
    /// What this node's gateway measured per app revision since the last call.
    fn metrics(&self, node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>>;
    /// CPU this node's guests used per app (running totals).
    fn cpu(&self, node: &str, usage: Vec<AppCpu>) -> BoxFuture<'_, LinkResult<()>>;
    /// Requests this node's gateway holds for apps without a ready replica.
    fn waiting(&self, node: &str, waiting: Vec<Waiting>) -> BoxFuture<'_, LinkResult<()>>;
    /// A request killed by its timeout, an instance out of memory, a trap.
    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>>;
}
