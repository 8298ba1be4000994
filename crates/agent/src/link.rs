//! How an agent reaches its control plane: in process (`shoal up`) or over
//! HTTP (`shoal node join`). The agent only reads state and reports; both
//! links offer exactly those operations, so the agent cannot tell them apart.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use shoal_control::{ControlPlane, ReplicaIncident, ReplicaReport, Snapshot};
use shoal_core::Node;
use shoal_core::metrics::RevisionStats;
use std::path::PathBuf;
use std::time::Duration;

/// Longest a control-plane call may take before the agent tries again, so a
/// stalled control plane cannot wedge a node's sync loop.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The control plane does not know this node (e.g. it was removed): register again.
    #[error("node is not registered")]
    Unregistered,
    #[error("{0}")]
    Failed(String),
}

pub type LinkResult<T> = Result<T, LinkError>;

pub trait Link: Send + Sync + 'static {
    fn register(&self, node: Node) -> BoxFuture<'_, LinkResult<()>>;
    fn heartbeat(&self, node: &str) -> BoxFuture<'_, LinkResult<()>>;
    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>>;
    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>>;
    /// Revisions of changes after `after` that the agent acts on; ends when
    /// the link breaks, and the agent then re-reads the snapshot.
    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<BoxStream<'static, u64>>>;
    /// A local file with the module's bytes, verified against its digest.
    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>>;
    /// What this node's gateway measured per app revision since the last call.
    fn metrics(&self, node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>>;
    /// A request killed by its timeout, an instance out of memory, a trap.
    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>>;
}

/// The control plane in the same process.
pub struct LocalLink(pub ControlPlane);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, shoal_control::ApiError> + Send + 'static,
) -> LinkResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.status == 404 => Err(LinkError::Unregistered),
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

    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>> {
        let cp = self.0.clone();
        Box::pin(async move { blocking(move || cp.record_incident(incident)).await })
    }
}

/// Whether a fetched module is on disk whole: a crash or a full disk must not
/// leave a truncated file that every later start trusts.
async fn verified(path: &std::path::Path, hex: &str) -> bool {
    match tokio::fs::read(path).await {
        Ok(bytes) => hex::encode(Sha256::digest(&bytes)) == hex,
        Err(_) => false,
    }
}

/// A control plane reached over HTTP with the join token.
pub struct RemoteLink {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Where fetched modules are kept, content-addressed like the server's.
    modules: PathBuf,
    /// One download at a time, so replicas starting together fetch a module once.
    fetching: tokio::sync::Mutex<()>,
}

impl RemoteLink {
    pub fn new(base: &str, token: &str, modules: PathBuf) -> LinkResult<Self> {
        std::fs::create_dir_all(&modules)
            .map_err(|e| LinkError::Failed(format!("cannot create {}: {e}", modules.display())))?;
        Ok(RemoteLink {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .map_err(|e| LinkError::Failed(e.to_string()))?,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            modules,
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> LinkResult<reqwest::Response> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            LinkError::Failed(format!("control plane at {} unreachable: {e}", self.base))
        })?;
        match resp.status().as_u16() {
            200..=299 => Ok(resp),
            code => {
                let body = resp.text().await.unwrap_or_default();
                Err(LinkError::Failed(format!(
                    "control plane answered {code}: {}",
                    body.trim()
                )))
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Link for RemoteLink {
    fn register(&self, node: Node) -> BoxFuture<'_, LinkResult<()>> {
        Box::pin(async move {
            let req = self
                .http
                .post(self.url("/v1/cluster/nodes"))
                .json(&node)
                .timeout(CALL_TIMEOUT);
            self.call(req).await.map(|_| ())
        })
    }

    fn heartbeat(&self, node: &str) -> BoxFuture<'_, LinkResult<()>> {
        let url = self.url(&format!("/v1/cluster/nodes/{node}/heartbeat"));
        Box::pin(async move {
            let req = self
                .http
                .post(url)
                .timeout(std::time::Duration::from_secs(2));
            self.call(req).await.map(|_| ())
        })
    }

    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>> {
        let url = self.url(&format!("/v1/cluster/nodes/{}/reports", report.node));
        Box::pin(async move {
            let req = self.http.post(url).json(&report).timeout(CALL_TIMEOUT);
            self.call(req).await.map(|_| ())
        })
    }

    fn metrics(&self, node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>> {
        let url = self.url(&format!("/v1/cluster/nodes/{node}/metrics"));
        Box::pin(async move {
            let req = self.http.post(url).json(&stats).timeout(CALL_TIMEOUT);
            self.call(req).await.map(|_| ())
        })
    }

    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>> {
        let url = self.url(&format!("/v1/cluster/nodes/{}/incidents", incident.node));
        Box::pin(async move {
            let req = self.http.post(url).json(&incident).timeout(CALL_TIMEOUT);
            self.call(req).await.map(|_| ())
        })
    }

    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>> {
        Box::pin(async move {
            let resp = self
                .call(
                    self.http
                        .get(self.url("/v1/cluster/snapshot"))
                        .timeout(CALL_TIMEOUT),
                )
                .await?;
            resp.json()
                .await
                .map_err(|e| LinkError::Failed(format!("unreadable snapshot: {e}")))
        })
    }

    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<BoxStream<'static, u64>>> {
        let url = self.url(&format!("/v1/cluster/watch?from={}", after + 1));
        Box::pin(async move {
            let resp = self.call(self.http.get(url)).await?;
            let bytes = resp.bytes_stream().map_err(std::io::Error::other);
            let reader = tokio_util::io::StreamReader::new(bytes);
            let lines =
                tokio_util::codec::FramedRead::new(reader, tokio_util::codec::LinesCodec::new());
            // A broken line ends the stream; the agent then re-reads the snapshot.
            let revisions = lines
                .take_while(|line| futures::future::ready(line.is_ok()))
                .filter_map(|line| {
                    let revision = line
                        .ok()
                        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
                        .and_then(|v| v["revision"].as_u64());
                    futures::future::ready(revision)
                });
            Ok(revisions.boxed())
        })
    }

    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>> {
        let digest = digest.to_string();
        Box::pin(async move {
            let hex = digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| LinkError::Failed(format!("bad module digest {digest:?}")))?;
            let path = self.modules.join(hex);
            let _one_at_a_time = self.fetching.lock().await;
            if verified(&path, hex).await {
                return Ok(path);
            }
            let resp = self
                .call(
                    self.http
                        .get(self.url(&format!("/v1/cluster/modules/{digest}"))),
                )
                .await?;
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| LinkError::Failed(format!("module download failed: {e}")))?;
            let got = hex::encode(Sha256::digest(&bytes));
            if got != hex {
                return Err(LinkError::Failed(format!(
                    "module {digest} downloaded with digest sha256:{got}; refusing it"
                )));
            }
            let tmp = self.modules.join(format!("{hex}.tmp"));
            let store = async {
                let mut f = tokio::fs::File::create(&tmp).await?;
                tokio::io::AsyncWriteExt::write_all(&mut f, &bytes).await?;
                f.sync_all().await?;
                tokio::fs::rename(&tmp, &path).await
            };
            store
                .await
                .map_err(|e| LinkError::Failed(format!("cannot store module: {e}")))?;
            Ok(path)
        })
    }
}
