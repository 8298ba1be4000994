//! [`LocalLink`]: the node link of `shoal up`, where the agent and the control
//! plane share a process and the agent calls [`ControlPlane`] directly.

use crate::error::ControlError;
use crate::state::ControlPlane;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use shoal_api::{
    AppCpu, Link, LinkError, LinkResult, ReplicaIncident, ReplicaReport, Snapshot, Waiting,
};
use shoal_core::Node;
use shoal_core::metrics::RevisionStats;
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

    fn heartbeat(&self, node: &str) -> BoxFuture<'_, LinkResult<()>> {
        let (cp, node) = (self.0.clone(), node.to_string());
        Box::pin(async move { blocking(move || cp.heartbeat(&node)).await })
    }

    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.report_replica(report)).await })
    }

    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.snapshot()).await })
    }

    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<BoxStream<'static, u64>>> {
        let watcher = self.0.store().watch("/", after + 1);
        Box::pin(async move {
            let watcher = watcher.map_err(|e| LinkError::Failed(e.to_string()))?;
            let stream = futures::stream::unfold(watcher, |mut w| async move {
                loop {
                    match w.next().await? {
                        Ok(ev) if shoal_core::objects::keys::agents_watch(&ev.kv.key) => {
                            return Some((ev.kv.mod_revision, w));
                        }
                        Ok(_) => continue,
                        Err(_) => return None,
                    }
                }
            });
            Ok(stream.boxed())
        })
    }

    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>> {
        let path = self.0.module_path(digest);
        Box::pin(async move { Ok(path) })
    }

    fn metrics(&self, _node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_metrics(stats);
        Box::pin(async { Ok(()) })
    }

    fn cpu(&self, node: &str, usage: Vec<AppCpu>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_cpu(node, usage);
        Box::pin(async { Ok(()) })
    }

    fn waiting(&self, _node: &str, waiting: Vec<Waiting>) -> BoxFuture<'_, LinkResult<()>> {
        self.0.record_waiting(waiting);
        Box::pin(async { Ok(()) })
    }

    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.record_incident(incident)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_node_is_unregistered() {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let blobs = shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap();
        let cp = ControlPlane::new(store, blobs, Default::default()).unwrap();
        let link = LocalLink(cp);
        assert!(matches!(
            link.heartbeat("ghost").await,
            Err(LinkError::Unregistered)
        ));
    }
}
