//! [`LocalLink`]: the node link of `shoal up`, where the agent and the control
//! plane share a process and the agent calls [`ControlPlane`] directly.

use crate::error::ControlError;
use crate::state::{ControlPlane, decode};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use shoal_api::{
    AppCpu, CertificateRequest, Change, Changes, Delta, IngressCertificate, Link, LinkError,
    LinkResult, NodeUsage, Object, ObjectKey, ReplicaIncident, ReplicaReport, ReplicaSecrets,
    Snapshot, VolumeUsage, Waiting,
};
use shoal_core::Node;
use shoal_core::kv::{KvAnswer, KvOp};
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::keys;
use shoal_core::spec::AppKey;
use shoal_store::{Event, EventKind, KeyValue, WatchStream};
use std::path::PathBuf;

/// The control plane in the same process.
pub struct LocalLink(pub ControlPlane);

/// Runs store work off the executor; "not found" means the node is unknown.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> LinkResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(ControlError::NotFound(_))) => Err(LinkError::Unregistered),
        Ok(Err(e)) => Err(LinkError::Failed(e.to_string())),
        Err(e) => Err(LinkError::Failed(e.to_string())),
    }
}

impl Link for LocalLink {
    fn register(&self, node: Node) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.register_node(node).map(|_| ())).await })
    }

    fn certificate(
        &self,
        node: &str,
        request: CertificateRequest,
    ) -> BoxFuture<'_, LinkResult<String>> {
        let (cp, node) = (self.0.clone(), node.to_string());
        Box::pin(async move { blocking(move || cp.issue_certificate(&node, &request)).await })
    }

    fn heartbeat(&self, node: &str, usage: NodeUsage) -> BoxFuture<'_, LinkResult<()>> {
        let (cp, node) = (self.0.clone(), node.to_string());
        Box::pin(async move { blocking(move || cp.heartbeat(&node, Some(usage))).await })
    }

    fn leave(&self, node: &str) -> BoxFuture<'_, LinkResult<()>> {
        let (cp, node) = (self.0.clone(), node.to_string());
        Box::pin(async move { blocking(move || cp.leave_node(&node).map(|_| ())).await })
    }

    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.report_replica(report)).await })
    }

    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.snapshot()).await })
    }

    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<Changes>> {
        let watcher = self.0.store().watch("/", after + 1);
        Box::pin(async move {
            let watcher = watcher.map_err(|e| match e {
                shoal_store::StoreError::Compacted { .. } => LinkError::Compacted,
                other => LinkError::Failed(other.to_string()),
            })?;
            // In process nothing breaks: an end is one the watch cannot go on from.
            Ok(deltas(watcher).map(Ok).boxed())
        })
    }

    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>> {
        let path = self.0.module_path(digest);
        Box::pin(async move { Ok(path) })
    }

    fn metrics(&self, node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_metrics(node, stats);
        Box::pin(async { Ok(()) })
    }

    fn cpu(&self, node: &str, usage: Vec<AppCpu>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_cpu(node, usage);
        Box::pin(async { Ok(()) })
    }

    fn waiting(&self, node: &str, waiting: Vec<Waiting>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_waiting(node, waiting);
        Box::pin(async { Ok(()) })
    }

    fn secrets(
        &self,
        node: &str,
        replica: &AppKey,
        id: &str,
    ) -> BoxFuture<'_, LinkResult<ReplicaSecrets>> {
        let (cp, node, app, id) = (
            self.0.clone(),
            node.to_string(),
            replica.clone(),
            id.to_string(),
        );
        Box::pin(async move {
            // Not through `blocking`: a replica or secret not found is no reason to register again.
            tokio::task::spawn_blocking(move || cp.replica_secrets(&node, &app, &id))
                .await
                .map_err(|e| LinkError::Failed(e.to_string()))?
                .map_err(|e| LinkError::Failed(e.to_string()))
        })
    }

    fn ingress(&self, _node: &str) -> BoxFuture<'_, LinkResult<Vec<IngressCertificate>>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.ingress_certificates()).await })
    }

    fn kv(
        &self,
        node: &str,
        app: &AppKey,
        bucket: &str,
        op: KvOp,
    ) -> BoxFuture<'_, LinkResult<KvAnswer>> {
        let (cp, node, app, bucket) = (
            self.0.clone(),
            node.to_string(),
            app.clone(),
            bucket.to_string(),
        );
        Box::pin(async move {
            // Not through `blocking`: a refusal is no reason to register again.
            tokio::task::spawn_blocking(move || cp.kv_for_node(&node, &app, &bucket, op))
                .await
                .map_err(|e| LinkError::Failed(e.to_string()))?
                .map_err(|e| LinkError::Failed(e.to_string()))
        })
    }

    fn volumes(
        &self,
        node: &str,
        usage: Vec<VolumeUsage>,
    ) -> BoxFuture<'_, LinkResult<Vec<VolumeUsage>>> {
        let (cp, node) = (self.0.clone(), node.to_string());
        Box::pin(async move { blocking(move || cp.record_volume_usage(&node, usage)).await })
    }

    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.record_incident(incident)).await })
    }
}

/// The store's watch as nodes see it, in process or over HTTP: the kinds they
/// act on ([`keys::agents_watch`]), one [`Delta`] per store revision. It ends,
/// saying why, at the first event it cannot pass on (the history it needed was
/// compacted, an object does not decode) rather than skip one: a node missing
/// a change would act on a wrong picture until it re-reads the snapshot.
pub(crate) fn deltas(watch: WatchStream) -> BoxStream<'static, Delta> {
    let state = Deltas { watch, held: None };
    futures::stream::unfold(state, |mut d| async move {
        let delta = d.next().await?;
        Some((delta, d))
    })
    .boxed()
}

struct Deltas {
    watch: WatchStream,
    /// The first change of the next revision, read while looking for the end of this one.
    held: Option<(u64, Change)>,
}

impl Deltas {
    async fn next(&mut self) -> Option<Delta> {
        let (revision, first) = match self.held.take() {
            Some(held) => held,
            None => self.change().await?,
        };
        let mut changes = vec![first];
        // The store hands a transaction's events over together, so the rest of
        // this revision is ready now: take it without waiting for the next one.
        loop {
            match self.change().now_or_never() {
                Some(Some((r, change))) if r == revision => changes.push(change),
                Some(Some(next)) => {
                    self.held = Some(next);
                    break;
                }
                // Ended inside a transaction: half of it is not passed on.
                Some(None) => return None,
                None => break,
            }
        }
        Some(Delta { revision, changes })
    }

    /// The next change nodes act on, with its revision; `None` once the watch
    /// ends. Cancel-safe, as the store's watch is: only events it skips are
    /// consumed before it returns.
    async fn change(&mut self) -> Option<(u64, Change)> {
        loop {
            let event = match self.watch.next().await? {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "node watch ended");
                    return None;
                }
            };
            if !keys::agents_watch(&event.kv.key) {
                continue;
            }
            match change_of(&event) {
                Ok(change) => return Some((event.kv.mod_revision, change)),
                Err(e) => {
                    tracing::warn!(error = %e, "node watch ended");
                    return None;
                }
            }
        }
    }
}

fn change_of(event: &Event) -> Result<Change, ControlError> {
    match event.kind {
        EventKind::Put => object_of(&event.kv).map(Change::Put),
        EventKind::Delete => key_of(&event.kv.key)
            .map(Change::Delete)
            .ok_or_else(|| ControlError::internal(format!("unexpected key {}", event.kv.key))),
    }
}

fn object_of(kv: &KeyValue) -> Result<Object, ControlError> {
    let key = kv.key.as_str();
    Ok(if keys::APPS.contains(key) {
        Object::App(decode(kv)?)
    } else if keys::REVISIONS.contains(key) {
        Object::Revision(decode(kv)?)
    } else if keys::REPLICAS.contains(key) {
        Object::Replica(decode(kv)?)
    } else if keys::NODES.contains(key) {
        Object::Node(decode(kv)?)
    } else if keys::ROLLOUTS.contains(key) {
        Object::Rollout(decode(kv)?)
    } else {
        return Err(ControlError::internal(format!("unexpected key {key}")));
    })
}

/// Which object a store key names: the layout of [`keys`], read back.
pub(crate) fn key_of(key: &str) -> Option<ObjectKey> {
    let app = |path: &str| {
        let (namespace, name) = path.split_once('/')?;
        Some(AppKey::new(namespace, name))
    };
    if let Some(rest) = key.strip_prefix(keys::APPS.as_str()) {
        app(rest).map(ObjectKey::App)
    } else if let Some(rest) = key.strip_prefix(keys::REVISIONS.as_str()) {
        let (path, number) = rest.rsplit_once('/')?;
        Some(ObjectKey::Revision {
            app: app(path)?,
            number: number.parse().ok()?,
        })
    } else if let Some(rest) = key.strip_prefix(keys::REPLICAS.as_str()) {
        let (path, id) = rest.rsplit_once('/')?;
        Some(ObjectKey::Replica {
            app: app(path)?,
            id: id.to_string(),
        })
    } else if let Some(name) = key.strip_prefix(keys::NODES.as_str()) {
        Some(ObjectKey::Node(name.to_string()))
    } else {
        key.strip_prefix(keys::ROLLOUTS.as_str())
            .and_then(app)
            .map(ObjectKey::Rollout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::tests::ready_node;
    use shoal_store::{Op, Txn};
    use std::time::Duration;

    fn control_plane() -> (tempfile::TempDir, ControlPlane) {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let blobs = shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap();
        let cp = ControlPlane::new(store, blobs, Default::default()).unwrap();
        (dir, cp)
    }

    fn write(cp: &ControlPlane, ops: Vec<Op>) -> u64 {
        let txn = ops.into_iter().fold(Txn::new(), Txn::then);
        cp.store().txn(txn).unwrap().revision
    }

    #[tokio::test]
    async fn an_unknown_node_is_unregistered() {
        let (_dir, cp) = control_plane();
        let link = LocalLink(cp);
        assert!(matches!(
            link.heartbeat("ghost", NodeUsage::default()).await,
            Err(LinkError::Unregistered)
        ));
    }

    /// A node whose gateway starts again holds no request: what its previous run said it held
    /// goes when it registers, as it would have kept the app awake, or up, for good.
    #[tokio::test]
    async fn a_node_registering_again_holds_no_request() {
        let (_dir, cp) = control_plane();
        let link = LocalLink(cp.clone());
        let web = AppKey::new("default", "web");
        let waiting = |cp: &ControlPlane| {
            let all = cp.inner.metrics.snapshot();
            all.get(&web).map_or(0, |m| m.load.waiting)
        };
        link.register(ready_node("n1")).await.unwrap();
        let held = |requests| shoal_api::Waiting {
            app: web.clone(),
            requests,
        };
        cp.record_waiting("n1", vec![held(5)]);
        cp.record_waiting("n2", vec![held(2)]);
        assert_eq!(waiting(&cp), 7);
        link.register(ready_node("n1")).await.unwrap();
        assert_eq!(waiting(&cp), 2, "n2's still wait");
    }

    #[test]
    fn store_keys_read_back_as_object_keys() {
        let web = AppKey::new("default", "web");
        let cases = [
            (String::from(keys::app(&web)), ObjectKey::App(web.clone())),
            (
                keys::revision(&web, 7).into(),
                ObjectKey::Revision {
                    app: web.clone(),
                    number: 7,
                },
            ),
            (
                keys::replica(&web, "web-1-x7k2p").into(),
                ObjectKey::Replica {
                    app: web.clone(),
                    id: "web-1-x7k2p".into(),
                },
            ),
            (keys::node("n1").into(), ObjectKey::Node("n1".into())),
            (keys::rollout(&web).into(), ObjectKey::Rollout(web.clone())),
        ];
        for (key, expected) in cases {
            assert_eq!(key_of(&key), Some(expected), "{key}");
        }
        assert_eq!(key_of(keys::lease("n1").as_str()), None);
        assert_eq!(
            Object::Node(ready_node("n1")).key(),
            key_of(keys::node("n1").as_str()).unwrap()
        );
    }

    #[tokio::test]
    async fn changes_are_one_delta_per_revision_and_end_at_what_cannot_be_read() {
        let (_dir, cp) = control_plane();
        let web = AppKey::new("default", "web");
        let replica = keys::replica(&web, "web-1-a");
        let before = write(&cp, vec![Op::put(&replica, b"{}".to_vec())]);
        let link = LocalLink(cp.clone());
        let mut changes = link.changes(before).await.unwrap();
        let n1 = ready_node("n1");
        let revision = write(
            &cp,
            vec![
                Op::put(keys::node("n1"), serde_json::to_vec(&n1).unwrap()),
                Op::put(keys::event(1, 0), b"{}".to_vec()),
                Op::delete(&replica),
            ],
        );
        let wait = Duration::from_secs(10);
        let delta = tokio::time::timeout(wait, changes.next())
            .await
            .expect("a delta");
        assert_eq!(
            delta,
            Some(Ok(Delta {
                revision,
                changes: vec![
                    Change::Put(Object::Node(n1)),
                    Change::Delete(ObjectKey::Replica {
                        app: web.clone(),
                        id: "web-1-a".into()
                    }),
                ],
            })),
            "events and leases are not for nodes"
        );
        write(&cp, vec![Op::put(keys::lease("n1"), b"{}".to_vec())]);
        write(&cp, vec![Op::put(keys::app(&web), b"not an app".to_vec())]);
        let end = tokio::time::timeout(wait, changes.next())
            .await
            .expect("the end");
        assert_eq!(end, None, "an app that does not decode ends the watch");
        cp.store().compact(revision).unwrap();
        assert!(
            matches!(link.changes(before).await, Err(LinkError::Compacted)),
            "history compacted away is said so, for the agent to read the snapshot"
        );
    }
}
