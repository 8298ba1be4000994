//! [`RemoteLink`]: how a worker node (`shoal node join`) reaches its control
//! plane, over HTTP with its own credential through the shared
//! [`shoal_api::Client`]. The [`Link`] trait it implements, and the in-process
//! `LocalLink` of `shoal up`, live in `shoal-api` and `shoal-control`.
//!
//! Given several servers of the cluster, every call goes to the current one and
//! fails over to the others ([`Servers`]); a watch follows: it ends, resumable,
//! when the link leaves the server it is on.

use crate::kv_batch::{KvBatches, SharedClient, current};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, RequestBuilder, Response};
use shoal_api::{
    AppCpu, CertificateRequest, Changes, Client, ClientError, Delta, IngressCertificate,
    IssuedCertificate, JoinRequest, JoinResponse, Link, LinkError, LinkResult, NodeUsage,
    ReplicaIncident, ReplicaReport, ReplicaSecrets, Resend, Servers, Snapshot, VolumeUsage,
    Waiting, WatchBroken, seg,
};
use shoal_core::kv::{KvAnswer, KvOp};
use shoal_core::metrics::RevisionStats;
use shoal_core::spec::AppKey;
use shoal_core::{Digest, Node};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Longest a control-plane call may take before the agent tries again, so a
/// stalled control plane cannot wedge a node's sync loop.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a module download may take: a 64 MiB module at ~250 KiB/s.
const MODULE_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest line of the watch stream (one revision's changes) the agent reads; past it the
/// stream ends and the agent reads the snapshot again, rather than buffer without bound.
const MAX_DELTA_LINE: usize = 32 << 20;

/// How often a watch looks whether the link has left its server: a server that vanished
/// without closing its connections is found out by the calls that time out there (a
/// heartbeat every second), and the watch then follows them to the next server.
const FOLLOW_PERIOD: Duration = Duration::from_secs(1);

/// Whether a fetched module is on disk whole: a crash or a full disk must not
/// leave a truncated file that every later start trusts.
async fn verified(path: &std::path::Path, digest: &Digest) -> bool {
    match tokio::fs::read(path).await {
        Ok(bytes) => Digest::of(&bytes) == *digest,
        Err(_) => false,
    }
}

/// A failed call in the words nodes have always used: they end up in logs and
/// in replica messages ("module fetch failed, retrying: …").
fn failed(e: ClientError) -> LinkError {
    LinkError::Failed(match e {
        ClientError::Send { base, source } => {
            format!("control plane at {base} unreachable: {source}")
        }
        // The body as the control plane sent it.
        ClientError::Api {
            status,
            code,
            message,
        } => format!(
            "control plane answered {}: {}",
            status.as_u16(),
            serde_json::json!({ "error": { "code": code, "message": message } })
        ),
        ClientError::Status { status, body } => {
            format!("control plane answered {}: {body}", status.as_u16())
        }
        ClientError::Decode(e) => format!("unreadable answer from the control plane: {e}"),
    })
}

/// Where a node's join token is: read each time it is needed, so a token
/// rotated into the file is the one used.
pub enum JoinToken {
    Value(String),
    File(PathBuf),
}

impl JoinToken {
    pub fn read(&self) -> Result<String, String> {
        match self {
            JoinToken::Value(token) => Ok(token.clone()),
            JoinToken::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read the join token from {}: {e}", path.display())),
        }
    }
}

/// The HTTP client a node reaches its control plane with: trusting the
/// cluster CA `ca` (PEM) when the API speaks TLS.
pub fn http_client(ca: &str) -> LinkResult<reqwest::Client> {
    let tls = shoal_tls::api_client(ca)
        .map_err(|e| LinkError::Failed(format!("the cluster CA is unreadable: {e}")))?;
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| LinkError::Failed(e.to_string()))
}

/// Gets node `node` its own credential from the control plane at `servers`,
/// with the join token: `POST /v1/cluster/join`. Sent to another server only
/// when refused a connection: a second join of one name is refused.
pub async fn join(
    http: &reqwest::Client,
    servers: &Servers,
    join_token: &str,
    node: &str,
) -> Result<JoinResponse, ClientError> {
    let api = Client::with_http(http.clone(), servers.clone(), join_token);
    let req = api
        .request(Method::POST, "/v1/cluster/join")
        .json(&JoinRequest {
            node: node.to_string(),
        })
        .timeout(CALL_TIMEOUT);
    api.send_as(req, Resend::IfUnsent).await
}

/// How a node joins again by itself when the control plane no longer takes
/// its credential (its state was reset, or the node was deleted), as a
/// kubelet bootstraps again: the join token, and where to keep the new
/// credential.
pub struct Rejoin {
    pub node: String,
    pub token: JoinToken,
    pub identity_file: PathBuf,
}

/// A control plane reached over HTTP with the node's own credential (which
/// `shoal node join` gets with the join token the first time), at any of its
/// servers.
pub struct RemoteLink {
    http: reqwest::Client,
    /// Shared with `api`, so a new credential keeps the server the calls go to.
    servers: Servers,
    /// Carries the node's credential; replaced when the node joins again.
    api: SharedClient,
    rejoin: Option<Rejoin>,
    /// Where fetched modules are kept, content-addressed like the server's.
    modules: PathBuf,
    /// One download per module at a time, so replicas starting together fetch it once,
    /// while other modules download beside it.
    fetching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The store the last snapshot was read from ([`Snapshot::store`]), which a watch names so
    /// that a store that replaced it refuses to resume.
    store: std::sync::atomic::AtomicU64,
    /// Guests' key-value calls, sent together when they pile up.
    kv_batches: Arc<KvBatches>,
    /// Where the servers it knows are kept when it learns more: a node started again with the
    /// one it was given, gone since, goes on at the others ([`RemoteLink::remember_servers`]).
    servers_file: Option<PathBuf>,
    /// Calls in flight at once ([`CALLS_AT_ONCE`]).
    calls: Arc<tokio::sync::Semaphore>,
}

/// The most calls a node has in flight to its control plane at once. Each takes a connection
/// of its own (HTTP/1.1), and a server counts a client's connections against its
/// `--api-client-connections` (100) until one's first request says it is a node's: a burst of
/// 150 replicas' reports, each on a new connection, was refused past the 100th.
const CALLS_AT_ONCE: usize = 16;

impl RemoteLink {
    /// A link to the control plane at `servers` over `http` (see [`http_client`]).
    pub fn new(
        http: reqwest::Client,
        servers: Servers,
        credential: &str,
        modules: PathBuf,
    ) -> LinkResult<Self> {
        std::fs::create_dir_all(&modules)
            .map_err(|e| LinkError::Failed(format!("cannot create {}: {e}", modules.display())))?;
        Ok(RemoteLink {
            api: Arc::new(std::sync::RwLock::new(Client::with_http(
                http.clone(),
                servers.clone(),
                credential,
            ))),
            http,
            servers,
            rejoin: None,
            modules,
            fetching: std::sync::Mutex::default(),
            store: std::sync::atomic::AtomicU64::new(0),
            kv_batches: Arc::default(),
            servers_file: None,
            calls: Arc::new(tokio::sync::Semaphore::new(CALLS_AT_ONCE)),
        })
    }

    /// Keeps the servers it learns in `file` (comma-separated URLs), which the node reads
    /// again when it starts (as Nomad's clients keep the servers they learnt).
    pub fn remember_servers(mut self, file: PathBuf) -> Self {
        self.servers_file = Some(file);
        self
    }

    /// Lets the link join again by itself when its credential is refused.
    pub fn rejoin(mut self, rejoin: Rejoin) -> Self {
        self.rejoin = Some(rejoin);
        self
    }

    fn api(&self) -> Client {
        current(&self.api)
    }

    /// Sends, and wants any 2xx; at another server too if this one does not answer and
    /// `resend` allows.
    async fn call(&self, req: RequestBuilder, resend: Resend) -> LinkResult<Response> {
        let _turn = self.calls.acquire().await.expect("never closed");
        self.api().checked_as(req, resend).await.map_err(failed)
    }

    /// [`RemoteLink::call`], decoding the JSON answer.
    async fn fetch<T: serde::de::DeserializeOwned>(
        &self,
        req: RequestBuilder,
        resend: Resend,
    ) -> LinkResult<T> {
        let _turn = self.calls.acquire().await.expect("never closed");
        self.api().send_as(req, resend).await.map_err(failed)
    }

    fn post(&self, path: &str) -> RequestBuilder {
        self.api().request(Method::POST, path)
    }

    /// Gets a new credential with the join token and uses it from now on.
    async fn join_again(&self) -> LinkResult<()> {
        let Some(rejoin) = &self.rejoin else {
            return Err(LinkError::Failed(
                "the control plane refused this node's credential (was the node deleted?) \
                 and no join token was given to join again"
                    .into(),
            ));
        };
        let token = rejoin.token.read().map_err(LinkError::Failed)?;
        let identity = join(&self.http, &self.servers, &token, &rejoin.node)
            .await
            .map_err(failed)?;
        let bytes = serde_json::to_vec(&identity).expect("an identity serialises");
        shoal_tls::write_private(&rejoin.identity_file, &bytes).map_err(|e| {
            LinkError::Failed(format!(
                "cannot keep the node's credential in {}: {e}",
                rejoin.identity_file.display()
            ))
        })?;
        *self.api.write().unwrap_or_else(|p| p.into_inner()) = Client::with_http(
            self.http.clone(),
            self.servers.clone(),
            &identity.credential,
        );
        tracing::warn!(node = %rejoin.node, "joined the control plane again with the join token");
        Ok(())
    }
}

impl Link for RemoteLink {
    fn forget_module(&self, digest: &str) {
        let Ok(digest) = digest.parse::<Digest>() else {
            return;
        };
        let path = self.modules.join(digest.hex());
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a fetched module");
        }
    }

    fn register(&self, node: Node) -> BoxFuture<'_, LinkResult<()>> {
        Box::pin(async move {
            let req = || {
                self.post("/v1/cluster/nodes")
                    .json(&node)
                    .timeout(CALL_TIMEOUT)
            };
            match self.api().checked_as(req(), Resend::Idempotent).await {
                Ok(_) => Ok(()),
                Err(e) if e.status() == Some(reqwest::StatusCode::UNAUTHORIZED) => {
                    self.join_again().await?;
                    self.call(req(), Resend::Idempotent).await.map(|_| ())
                }
                Err(e) => Err(failed(e)),
            }
        })
    }

    fn heartbeat(&self, node: &str, usage: NodeUsage) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/heartbeat", seg(node));
        Box::pin(async move {
            let req = self
                .post(&path)
                .json(&usage)
                .timeout(Duration::from_secs(2));
            match self.api().checked_as(req, Resend::Idempotent).await {
                Ok(answer) => {
                    // The servers running on a shared store: those not given at the start
                    // are called too when the ones given die.
                    if let Some(told) = answer
                        .headers()
                        .get(shoal_api::SERVERS_HEADER)
                        .and_then(|v| v.to_str().ok())
                    {
                        let servers = &self.servers;
                        let learnt = servers.learn(told);
                        if !learnt.is_empty() {
                            tracing::info!(servers = %learnt.join(","), "learnt of more servers of the control plane");
                            if let Some(file) = &self.servers_file {
                                let all = servers.urls().join(",");
                                if let Err(e) = write_whole(file, all.as_bytes()) {
                                    tracing::warn!(file = %file.display(), error = %e, "cannot keep the servers learnt");
                                }
                            }
                        }
                    }
                    Ok(())
                }
                // The control plane does not know this node, or no longer takes
                // its credential (its state was reset, or the node was deleted):
                // register again, joining again first if need be.
                Err(e)
                    if matches!(
                        e.status(),
                        Some(reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::UNAUTHORIZED)
                    ) =>
                {
                    Err(LinkError::Unregistered)
                }
                Err(e) => Err(failed(e)),
            }
        })
    }

    fn leave(&self, node: &str) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/leave", seg(node));
        Box::pin(async move {
            let req = self.post(&path).timeout(CALL_TIMEOUT);
            self.call(req, Resend::Idempotent).await.map(|_| ())
        })
    }

    fn report(&self, report: ReplicaReport) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/reports", seg(&report.node));
        Box::pin(async move {
            let req = self.post(&path).json(&report).timeout(CALL_TIMEOUT);
            self.call(req, Resend::Idempotent).await.map(|_| ())
        })
    }

    fn metrics(&self, node: &str, stats: Vec<RevisionStats>) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/metrics", seg(node));
        Box::pin(async move {
            let req = self.post(&path).json(&stats).timeout(CALL_TIMEOUT);
            // Counts since the last call: received twice, they would count twice.
            self.call(req, Resend::IfUnsent).await.map(|_| ())
        })
    }

    fn cpu(&self, node: &str, usage: Vec<AppCpu>) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/cpu", seg(node));
        Box::pin(async move {
            let req = self.post(&path).json(&usage).timeout(CALL_TIMEOUT);
            // Running totals: the same the second time.
            self.call(req, Resend::Idempotent).await.map(|_| ())
        })
    }

    fn waiting(&self, node: &str, waiting: Vec<Waiting>) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/waiting", seg(node));
        Box::pin(async move {
            let req = self.post(&path).json(&waiting).timeout(CALL_TIMEOUT);
            self.call(req, Resend::Idempotent).await.map(|_| ())
        })
    }

    fn certificate(
        &self,
        node: &str,
        request: CertificateRequest,
    ) -> BoxFuture<'_, LinkResult<String>> {
        let path = format!("/v1/cluster/nodes/{}/certificate", seg(node));
        Box::pin(async move {
            let req = self.post(&path).json(&request).timeout(CALL_TIMEOUT);
            // A second certificate for the same key does no harm.
            let issued: IssuedCertificate = self.fetch(req, Resend::Idempotent).await?;
            Ok(issued.certificate)
        })
    }

    fn secrets(
        &self,
        node: &str,
        replica: &AppKey,
        id: &str,
    ) -> BoxFuture<'_, LinkResult<ReplicaSecrets>> {
        let path = format!(
            "/v1/cluster/nodes/{}/replicas/{}/{}/{}/secrets",
            seg(node),
            seg(&replica.namespace),
            seg(&replica.name),
            seg(id)
        );
        Box::pin(async move {
            let req = self.api().request(Method::GET, &path).timeout(CALL_TIMEOUT);
            self.fetch(req, Resend::Idempotent).await
        })
    }

    fn ingress(&self, node: &str) -> BoxFuture<'_, LinkResult<Vec<IngressCertificate>>> {
        let path = format!("/v1/cluster/nodes/{}/ingress", seg(node));
        Box::pin(async move {
            let req = self.api().request(Method::GET, &path).timeout(CALL_TIMEOUT);
            self.fetch(req, Resend::Idempotent).await
        })
    }

    fn kv(
        &self,
        node: &str,
        app: &AppKey,
        bucket: &str,
        op: KvOp,
    ) -> BoxFuture<'_, LinkResult<KvAnswer>> {
        let path = format!(
            "/v1/cluster/nodes/{}/kv/{}/{}/{}",
            seg(node),
            seg(&app.namespace),
            seg(&app.name),
            seg(bucket)
        );
        Box::pin(self.kv_batches.call(&self.api, path, op, CALL_TIMEOUT))
    }

    fn kv_sent(&self) -> Option<shoal_api::KvSent> {
        Some(self.kv_batches.sent())
    }

    fn volumes(
        &self,
        node: &str,
        usage: Vec<VolumeUsage>,
    ) -> BoxFuture<'_, LinkResult<Vec<VolumeUsage>>> {
        let path = format!("/v1/cluster/nodes/{}/volumes", seg(node));
        Box::pin(async move {
            let req = self.post(&path).json(&usage).timeout(CALL_TIMEOUT);
            self.fetch(req, Resend::Idempotent).await
        })
    }

    fn incident(&self, incident: ReplicaIncident) -> BoxFuture<'_, LinkResult<()>> {
        let path = format!("/v1/cluster/nodes/{}/incidents", seg(&incident.node));
        Box::pin(async move {
            let req = self.post(&path).json(&incident).timeout(CALL_TIMEOUT);
            // Each one is an event: received twice, it would be told twice.
            self.call(req, Resend::IfUnsent).await.map(|_| ())
        })
    }

    fn snapshot(&self) -> BoxFuture<'_, LinkResult<Snapshot>> {
        Box::pin(async move {
            let req = self
                .api()
                .request(Method::GET, "/v1/cluster/snapshot")
                .timeout(CALL_TIMEOUT);
            let snapshot: Snapshot =
                self.api()
                    .send_as(req, Resend::Idempotent)
                    .await
                    .map_err(|e| match e {
                        ClientError::Decode(e) => {
                            LinkError::Failed(format!("unreadable snapshot: {e}"))
                        }
                        other => failed(other),
                    })?;
            self.store
                .store(snapshot.store, std::sync::atomic::Ordering::Relaxed);
            Ok(snapshot)
        })
    }

    fn changes(&self, after: u64) -> BoxFuture<'_, LinkResult<Changes>> {
        let path = match self.store.load(std::sync::atomic::Ordering::Relaxed) {
            0 => format!("/v1/cluster/watch?from={}", after + 1),
            store => format!("/v1/cluster/watch?from={}&store={store}", after + 1),
        };
        Box::pin(async move {
            let resp = match self
                .api()
                .checked_as(self.api().request(Method::GET, &path), Resend::Idempotent)
                .await
            {
                Ok(resp) => resp,
                Err(e) if e.code() == Some("compacted") => return Err(LinkError::Compacted),
                Err(e) => return Err(failed(e)),
            };
            let on = self.servers.of(resp.url().as_str());
            let bytes = resp.bytes_stream().map_err(std::io::Error::other);
            let changes = deltas(tokio_util::io::StreamReader::new(bytes));
            Ok(match on {
                Some(on) => following(changes, self.servers.clone(), on),
                None => changes,
            })
        })
    }

    fn module(&self, digest: &str) -> BoxFuture<'_, LinkResult<PathBuf>> {
        let digest = digest.parse::<Digest>();
        Box::pin(async move {
            let digest = digest.map_err(|e| LinkError::Failed(e.to_string()))?;
            let hex = digest.hex();
            let path = self.modules.join(hex);
            let lock = self
                .fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(hex.to_string())
                .or_default()
                .clone();
            let _one_at_a_time = lock.lock().await;
            if verified(&path, &digest).await {
                return Ok(path);
            }
            let resp = self
                .call(
                    self.api()
                        .request(Method::GET, &format!("/v1/cluster/modules/{digest}"))
                        .timeout(MODULE_TIMEOUT),
                    Resend::Idempotent,
                )
                .await?;
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| LinkError::Failed(format!("module download failed: {e}")))?;
            let got = Digest::of(&bytes);
            if got != digest {
                return Err(LinkError::Failed(format!(
                    "module {digest} downloaded with digest {got}; refusing it"
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

/// The watch stream's deltas, one JSON line each. A broken line, or one longer than
/// [`MAX_DELTA_LINE`], ends the stream rather than be skipped: the agent then re-reads the
/// snapshot instead of missing a change. A connection that breaks ends it with
/// [`WatchBroken`]: the changes after the last line are asked for again. The server ends a
/// watch it cannot go on with cleanly, so a clean end is not one to resume.
fn deltas(reader: impl tokio::io::AsyncRead + Send + 'static) -> Changes {
    use tokio_util::codec::LinesCodecError;
    let codec = tokio_util::codec::LinesCodec::new_with_max_length(MAX_DELTA_LINE);
    tokio_util::codec::FramedRead::new(reader, codec)
        .map(|line| match line {
            Ok(line) => match serde_json::from_str::<Delta>(&line) {
                Ok(delta) => Some(Ok(delta)),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable change from the control plane");
                    None
                }
            },
            Err(LinesCodecError::Io(e)) => {
                tracing::debug!(error = %e, "watch connection broke");
                Some(Err(WatchBroken))
            }
            Err(e @ LinesCodecError::MaxLineLengthExceeded) => {
                tracing::warn!(error = %e, "a change too long to read from the control plane");
                None
            }
        })
        // Up to the first end: a broken connection is passed on as the last item.
        .scan(false, |broke, item| {
            if *broke {
                return futures::future::ready(None);
            }
            *broke = matches!(item, Some(Err(WatchBroken)));
            futures::future::ready(item)
        })
        .boxed()
}

/// `changes` from server `on`, ended as broken once calls no longer go there: the watch then
/// resumes where the calls went.
/// Writes `bytes` to `file` whole: beside it first, then renamed over it.
fn write_whole(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let beside = file.with_extension("tmp");
    std::fs::write(&beside, bytes)?;
    std::fs::rename(&beside, file)
}

fn following(changes: Changes, servers: Servers, on: usize) -> Changes {
    enum Step {
        Item(Option<Result<Delta, WatchBroken>>),
        Look,
    }
    let mut look = tokio::time::interval(FOLLOW_PERIOD);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(Some((changes, look)), move |state| {
        let servers = servers.clone();
        async move {
            let (mut changes, mut look) = state?;
            loop {
                let step = tokio::select! {
                    item = changes.next() => Step::Item(item),
                    _ = look.tick() => Step::Look,
                };
                match step {
                    Step::Item(Some(Ok(delta))) => return Some((Ok(delta), Some((changes, look)))),
                    Step::Item(Some(Err(broken))) => return Some((Err(broken), None)),
                    Step::Item(None) => return None,
                    Step::Look if servers.index() != on => {
                        tracing::info!(
                            from = servers.urls()[on],
                            to = servers.current(),
                            "the link moved to another server; the watch follows"
                        );
                        return Some((Err(WatchBroken), None));
                    }
                    Step::Look => {}
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(revision: u64) -> String {
        let delta = Delta {
            revision,
            changes: Vec::new(),
        };
        format!("{}\n", serde_json::to_string(&delta).unwrap())
    }

    #[tokio::test]
    async fn a_line_past_the_limit_ends_the_watch() {
        // Two good lines, then one longer than the limit, then a good one never reached.
        let huge = format!(
            "{{\"revision\":3,\"pad\":\"{}\"}}\n",
            "x".repeat(MAX_DELTA_LINE)
        );
        let text = [line(1), line(2), huge, line(4)].concat();
        let read: Vec<_> = deltas(std::io::Cursor::new(text.into_bytes()))
            .map(|d| d.map(|d| d.revision))
            .collect()
            .await;
        assert_eq!(
            read,
            [Ok(1), Ok(2)],
            "ended, not as broken: the snapshot is read again"
        );
    }

    #[tokio::test]
    async fn a_connection_that_breaks_ends_the_watch_as_broken() {
        let pieces = [
            Ok(bytes::Bytes::from(line(1))),
            Ok(bytes::Bytes::from(line(2))),
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            Ok(bytes::Bytes::from(line(3))),
        ];
        let reader = tokio_util::io::StreamReader::new(futures::stream::iter(pieces));
        let read: Vec<_> = deltas(reader)
            .map(|d| d.map(|d| d.revision))
            .collect()
            .await;
        assert_eq!(read, [Ok(1), Ok(2), Err(WatchBroken)]);
    }

    #[tokio::test]
    async fn a_watch_ends_as_broken_once_the_link_leaves_its_server() {
        let servers = Servers::parse("http://a:1,http://b:1").unwrap();
        // A quiet watch: nothing comes, and the connection stays up.
        let quiet: Changes = futures::stream::pending().boxed();
        let mut watch = following(quiet, servers.clone(), 0);
        let first = tokio::time::timeout(FOLLOW_PERIOD * 3, watch.next()).await;
        assert!(first.is_err(), "it waits while the link stays: {first:?}");
        servers.failed(0);
        let next = tokio::time::timeout(FOLLOW_PERIOD * 3, watch.next())
            .await
            .expect("it ends once the link has moved");
        assert_eq!(next, Some(Err(WatchBroken)));
        assert_eq!(watch.next().await, None);
        // Deltas pass through, and an end is passed on as it is.
        let some: Changes = futures::stream::iter([Ok(Delta {
            revision: 7,
            changes: Vec::new(),
        })])
        .boxed();
        let read: Vec<_> = following(some, servers.clone(), 1)
            .map(|d| d.map(|d| d.revision))
            .collect()
            .await;
        assert_eq!(read, [Ok(7)]);
    }
}
