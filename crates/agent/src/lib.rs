//! The node agent. It watches what is placed on its node, makes the runtime
//! match (load, start, stop), keeps its gateway's routes and endpoints true,
//! and reports every replica's phase to the control plane. It never writes
//! cluster state itself: it reads and reports through a [`Link`], in process
//! or over HTTP. While the control plane is unreachable it keeps serving what
//! it runs, and it re-sends any report the cluster state does not reflect.

mod kv_batch;
mod link;
mod metrics;
mod plan;
mod probe;
#[cfg(test)]
mod testing;
mod view;

pub use link::{JoinToken, Rejoin, RemoteLink, http_client, join};
pub use plan::{
    AppTables, NodePlan, all_tables, app_tables, gateway_tables, node_plan, unused_modules,
};
pub use view::{ClusterView, IngressWanted, Touched};

use probe::{Action, Backoff, Probe, ProbeState};

use futures::{FutureExt, StreamExt};
use shoal_api::{
    AppCpu, Changes, Link, LinkError, NodeUsage, ReplicaIncident, ReplicaReport, ReplicaSecrets,
    VolumeUsage, Waiting,
};
use shoal_core::metrics::RevisionStats;
use shoal_core::now_ms;
use shoal_core::objects::LIVENESS_FAILED;
use shoal_core::spec::AppKey;
use shoal_core::spec::{Restart, Template};
use shoal_core::{Capacity, Kind, Node, NodeState, Phase, Replica, Revision};
use shoal_gateway::{Endpoint, Gateway};
use shoal_runtime::{
    CpuShare, DEFAULT_LOG_BYTES, ExitStatus, HttpService, Incident, IncidentHook, IncidentKind,
    InstanceConfig, KvGrant, LogFiles, LogSink, Reuse, Runtime, VolumeMount, VolumeQuota,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How often the agent looks again at its replicas even when nothing changed,
/// in its own view of the cluster: to resend a report the cluster lost while
/// all is quiet, and put remote endpoints marked down back in rotation.
const RESYNC: Duration = Duration::from_secs(2);

/// Pause before watching again after a watch's connection broke.
const WATCH_AGAIN: Duration = Duration::from_millis(100);

/// Pauses between failed reads of the cluster state (snapshot, watch), each round having
/// tried every server: from the first, doubling to the last, and from the first again once
/// one succeeds.
const READ_RETRY_START: Duration = Duration::from_millis(300);
const READ_RETRY_MAX: Duration = Duration::from_secs(2);

/// Lines of output kept in memory per replica (the rest on disk, [`LOG_FILE_BYTES`]).
const LOG_LINES: usize = 5000;

/// The size of each of a replica's two log files on disk: about 16 MiB kept per replica.
const LOG_FILE_BYTES: u64 = 8 << 20;

/// How long the log files of a replica that no longer runs here are kept: its output stays
/// readable for a while after it stopped, was replaced or moved.
const LOG_KEEP: Duration = Duration::from_secs(3600);

/// How often the gateway's per-revision measurements go to the control plane.
const METRICS_PERIOD: Duration = Duration::from_secs(1);
/// How often the node measures its volumes for `shoal get volumes`.
const VOLUMES_PERIOD: Duration = Duration::from_secs(2);

/// How long the agent waits to fetch the apps' HTTPS certificates again after a failure.
const INGRESS_RETRY: Duration = Duration::from_secs(2);

/// Incidents of one kind on one replica reported at most this often; the rest are counted.
const INCIDENT_PERIOD: Duration = Duration::from_secs(10);
/// How often a node shutting down looks whether its replicas have moved, and says it waits.
const LEAVE_POLL: Duration = Duration::from_millis(100);
const LEAVE_PROGRESS: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub gateway_addr: String,
    /// What the node offers the scheduler; its memory no more than the runtime's
    /// `memory_budget_bytes` (lowered to it by [`Agent::new`]).
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
    /// How long a module no replica on the node runs stays compiled and fetched on it.
    pub module_cache_grace: Duration,
    /// Where volumes bound to this node keep their data: `NAMESPACE/NAME` under it.
    pub volumes_dir: std::path::PathBuf,
    /// Where replicas' output is kept: `NAMESPACE/APP/REPLICA.log` (and `.log.1`) under it.
    pub logs_dir: std::path::PathBuf,
    /// The gateway's public certificates, where the apps' (`[http] tls`) go. `None`: the
    /// gateway has no HTTPS for the public, and apps' certificates are not fetched.
    pub ingress: Option<shoal_tls::IngressCerts>,
}

#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    config: AgentConfig,
    link: Arc<dyn Link>,
    runtime: Runtime,
    gateway: Gateway,
    running: Mutex<HashMap<String, Running>>,
    /// The size limit of each volume on this node, shared by the replicas that mount it.
    volumes: Mutex<HashMap<(String, String), Arc<VolumeQuota>>>,
    /// The apps' HTTPS certificates as the cluster view names them; `tend_ingress` fetches
    /// them when this changes.
    ingress: tokio::sync::watch::Sender<IngressWanted>,
    /// What each app revision's instances here do, for [`Agent::prometheus`].
    revisions: metrics::Revisions,
    /// How many times the node registered again after the control plane said it did not know
    /// it (its state was reset, the node deleted): the view is then read whole again, since a
    /// watch resumed there may be going on in another store's history.
    registered_again: tokio::sync::watch::Sender<u64>,
    /// Set once the node is shutting down ([`Agent::leave`]): deleted meanwhile, it stays
    /// deleted rather than join again on its way out.
    leaving: AtomicBool,
}

/// A replica this node runs.
struct Running {
    app: AppKey,
    /// The module it runs.
    digest: String,
    logs: LogSink,
    task: JoinHandle<()>,
    /// The last status reported for it, to resend if the cluster lost it.
    status: Arc<Mutex<Option<ReplicaReport>>>,
    /// Held while one of its reports is sent: a resend and the replica's own next report go
    /// one after the other, each reading `status` when its turn comes, so the last to arrive
    /// is the latest, never an older phase over a newer one.
    sending: Arc<tokio::sync::Mutex<()>>,
}

impl Agent {
    /// The node offers the scheduler no more memory than its runtime's budget lets guests use
    /// at once: `config.capacity` is lowered to it if need be.
    pub fn new(
        mut config: AgentConfig,
        link: Arc<dyn Link>,
        runtime: Runtime,
        gateway: Gateway,
    ) -> Self {
        let budget = runtime.config().memory_budget_bytes;
        if config.capacity.memory_bytes > budget {
            tracing::info!(
                offered = config.capacity.memory_bytes,
                budget,
                "the node offers the scheduler its guests' memory budget, not more"
            );
            config.capacity.memory_bytes = budget;
        }
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                link,
                runtime,
                gateway,
                running: Mutex::new(HashMap::new()),
                volumes: Mutex::new(HashMap::new()),
                ingress: tokio::sync::watch::Sender::new(IngressWanted::new()),
                revisions: metrics::Revisions::default(),
                registered_again: tokio::sync::watch::Sender::new(0),
                leaving: AtomicBool::new(false),
            }),
        };
        // The control plane reads replicas' output through this node's gateway.
        let weak = Arc::downgrade(&agent.inner);
        agent
            .inner
            .gateway
            .set_log_lookup(Arc::new(move |replica: &str, app: Option<&AppKey>| {
                let inner = weak.upgrade()?;
                if let Some(r) = inner.running.lock().expect("agent lock").get(replica) {
                    return app.is_none_or(|a| *a == r.app).then(|| r.logs.clone());
                }
                // One that stopped: what its files still hold, and nothing to follow.
                let base = stopped_logs(&inner.config.logs_dir, replica, app)?;
                let sink =
                    LogSink::persistent(log_files(base), LOG_LINES, DEFAULT_LOG_BYTES).ok()?;
                sink.close();
                Some(sink)
            }));
        agent
    }

    /// Has this node's replicas moved to other nodes as it shuts down, and waits until none
    /// runs here or `within` has passed: the control plane drains the node, new before old, so
    /// a planned stop fails no request (kubelet's graceful node shutdown, Nomad's
    /// `drain_on_shutdown`). Returns how many still run: those with nowhere else to go.
    pub async fn leave(&self, within: Duration) -> Result<usize, LinkError> {
        self.inner.leaving.store(true, Ordering::SeqCst);
        self.inner.link.leave(&self.inner.config.node).await?;
        let deadline = tokio::time::Instant::now() + within;
        let mut said = tokio::time::Instant::now();
        loop {
            let left = self
                .inner
                .running
                .lock()
                .expect("agent lock")
                .values()
                .filter(|r| {
                    // A job's finished run has nothing left to lose.
                    let status = r.status.lock().expect("status lock");
                    !status.as_ref().is_some_and(|s| s.phase.is_terminal())
                })
                .count();
            let now = tokio::time::Instant::now();
            if left == 0 || now >= deadline {
                return Ok(left);
            }
            if now - said >= LEAVE_PROGRESS {
                tracing::info!(
                    replicas = left,
                    "waiting for replicas to move to other nodes"
                );
                said = now;
            }
            tokio::time::sleep(LEAVE_POLL).await;
        }
    }

    /// This node's metrics in Prometheus' text format (see `metrics.rs`), read now.
    pub fn prometheus(&self) -> Result<String, std::fmt::Error> {
        let inner = &self.inner;
        let mut scrape = metrics::Scrape::new(&inner.revisions);
        scrape.in_flight = inner.gateway.local_in_flight();
        scrape.cpu = inner.runtime.cpu_usage();
        scrape.compile_cache = inner.runtime.compile_cache();
        scrape.memory_reserved = inner.runtime.memory_reserved();
        scrape.memory_budget = inner.runtime.memory_budget();
        scrape.certificate_expires = inner.gateway.member_certificate_expires();
        scrape.connections = inner.gateway.connections();
        scrape.kv_sent = inner.link.kv_sent();
        for r in inner.running.lock().expect("agent lock").values() {
            let phase = r
                .status
                .lock()
                .expect("status lock")
                .as_ref()
                .map_or(Phase::Pending, |s| s.phase);
            *scrape.phases.entry(phase.to_string()).or_default() += 1;
        }
        scrape.encode()
    }

    fn node(&self) -> Node {
        Node {
            name: self.inner.config.node.clone(),
            gateway: self.inner.config.gateway_addr.clone(),
            capacity: self.inner.config.capacity.clone(),
            labels: self.inner.config.labels.clone(),
            state: NodeState::Ready,
            schedulable: true,
            draining: false,
            leaving: None,
            joined_at: now_ms(),
            label_overrides: Default::default(),
        }
    }

    /// Registers, retrying until the control plane answers.
    async fn register(&self) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.link.register(self.node()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "node registration failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Registers the node, then keeps it in line with the cluster state
    /// until the process ends: a snapshot, then the changes after it applied
    /// to its own view. The snapshot is read again only when the watch ends.
    pub async fn run(self) {
        self.register().await;
        tokio::spawn(self.clone().heartbeats());
        tokio::spawn(self.clone().send_metrics());
        tokio::spawn(self.clone().tend_volumes());
        tokio::spawn(self.clone().send_waiting());
        tokio::spawn(self.clone().collect_modules());
        tokio::spawn(self.clone().collect_logs());
        if let Some(certs) = self.inner.config.ingress.clone() {
            tokio::spawn(self.clone().tend_ingress(certs));
        }
        // What the gateway was last given per app, so only changed apps go again.
        let mut sent: HashMap<AppKey, AppTables> = HashMap::new();
        let mut registered_again = self.inner.registered_again.subscribe();
        let mut retry = READ_RETRY_START;
        loop {
            let snapshot = match self.inner.link.snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read cluster state; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(READ_RETRY_MAX);
                    continue;
                }
            };
            retry = READ_RETRY_START;
            registered_again.mark_unchanged();
            let mut view = ClusterView::new(&self.inner.config.node, snapshot);
            self.reload(&view, &mut sent);
            // The gateway knows every route now: requests that waited for them go on.
            self.inner.gateway.loaded();
            // Watches, each from the last revision applied, at whichever server the link
            // reaches: revisions are the store's, the same at every server.
            loop {
                let changes = match self.inner.link.changes(view.revision()).await {
                    Ok(c) => c,
                    Err(LinkError::Compacted) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch cluster state; retrying");
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(READ_RETRY_MAX);
                        continue;
                    }
                };
                retry = READ_RETRY_START;
                if !self
                    .follow(changes, &mut view, &mut sent, &mut registered_again)
                    .await
                {
                    break;
                }
                tracing::info!(
                    revision = view.revision(),
                    "watch connection broke; watching again from the last revision applied"
                );
                tokio::time::sleep(WATCH_AGAIN).await;
            }
            tracing::debug!("the watch cannot go on; re-reading the cluster state");
        }
    }

    /// Applies a watch's deltas to the view as they come, a sync after each burst, until it
    /// ends: true if its connection broke (the changes after the view's revision are to be
    /// asked for again), false if it cannot go on or the node had to register again (the
    /// snapshot is to be read again).
    async fn follow(
        &self,
        mut changes: Changes,
        view: &mut ClusterView,
        sent: &mut HashMap<AppKey, AppTables>,
        registered_again: &mut tokio::sync::watch::Receiver<u64>,
    ) -> bool {
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        loop {
            tokio::select! {
                next = changes.next() => {
                    let delta = match next {
                        Some(Ok(delta)) => delta,
                        end => return end.is_some(),
                    };
                    let mut touched = Touched::default();
                    view.apply(delta, &mut touched);
                    let ended = apply_arrived(&mut changes, view, &mut touched);
                    self.inner.gateway.set_members(view.node_names());
                    if !touched.apps.is_empty() {
                        self.want_ingress(view);
                    }
                    self.sync(view, &touched, sent);
                    if let Some(broke) = ended {
                        return broke;
                    }
                }
                _ = resync.tick() => self.resync(view, sent),
                _ = registered_again.changed() => return false,
            }
        }
    }

    /// Forgets, in memory and on disk, the modules no replica on this node has run for the
    /// grace: compiled components and fetched module files do not pile up on a long-lived node.
    async fn collect_modules(self) {
        let grace = self.inner.config.module_cache_grace;
        let mut tick = tokio::time::interval((grace / 2).clamp(Duration::from_millis(100), RESYNC));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unused_since = HashMap::new();
        loop {
            tick.tick().await;
            let in_use: HashSet<String> = {
                let running = self.inner.running.lock().expect("agent lock");
                running.values().map(|r| r.digest.clone()).collect()
            };
            let cached = self.inner.runtime.cached();
            let now = std::time::Instant::now();
            for digest in plan::unused_modules(&cached, &in_use, &mut unused_since, now, grace) {
                // Judged again under the lock a starting replica is added under: one added
                // since `in_use` was read would find its module gone and fail to load.
                let running = self.inner.running.lock().expect("agent lock");
                if running.values().any(|r| r.digest == digest) {
                    continue;
                }
                self.inner.runtime.forget(&digest);
                self.inner.link.forget_module(&digest);
                drop(running);
                tracing::info!(%digest, "forgot a module no replica here runs");
            }
        }
    }

    async fn heartbeats(self) {
        let mut tick = tokio::time::interval(self.inner.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let usage = NodeUsage {
                memory_reserved_bytes: self.inner.runtime.memory_reserved(),
                memory_budget_bytes: self.inner.runtime.memory_budget(),
                instances: Some(self.inner.runtime.instances_alive()),
            };
            match self
                .inner
                .link
                .heartbeat(&self.inner.config.node, usage)
                .await
            {
                Ok(()) => {}
                Err(LinkError::Unregistered) if self.inner.leaving.load(Ordering::SeqCst) => {
                    tracing::info!("the node was deleted as it shut down: it does not join again");
                }
                Err(LinkError::Unregistered) => {
                    self.register().await;
                    self.inner.registered_again.send_modify(|n| *n += 1);
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Sends what the gateway measured per app revision since the last time.
    /// And the CPU its guests used per app (running totals, so a lost report loses nothing).
    async fn send_metrics(self) {
        let mut tick = tokio::time::interval(METRICS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let node = &self.inner.config.node;
        // What could not be delivered goes with the next report: the requests and errors of
        // a control plane's outage are what its metrics most need to show.
        let mut undelivered = Vec::new();
        loop {
            tick.tick().await;
            self.inner.revisions.prune(std::time::Instant::now());
            let stats = with_undelivered(self.inner.gateway.take_metrics(), undelivered);
            undelivered = Vec::new();
            if !stats.is_empty()
                && let Err(e) = self.inner.link.metrics(node, stats.clone()).await
            {
                tracing::debug!(error = %e, "metrics not delivered; they go with the next report");
                undelivered = stats;
            }
            // Groups are named after their app, `namespace/name`.
            let usage: Vec<AppCpu> = self
                .inner
                .runtime
                .cpu_usage()
                .into_iter()
                .filter_map(|(group, u)| {
                    let (namespace, name) = group.split_once('/')?;
                    Some(AppCpu {
                        app: AppKey::new(namespace, name),
                        used_ns: u.used_ns,
                        throttled_ns: u.throttled_ns,
                    })
                })
                .collect();
            if !usage.is_empty()
                && let Err(e) = self.inner.link.cpu(node, usage).await
            {
                tracing::debug!(error = %e, "CPU usage not delivered; it only feeds describe");
            }
        }
    }

    /// Measures the volumes on this node for the control plane every few seconds, and removes
    /// the directory of each the answer says was deleted and no replica here mounts. A
    /// directory of a volume the control plane does not know is kept, and said once: its
    /// state may be older than the volume (restored from a backup, or made anew), and the
    /// data is what no backup holds.
    async fn tend_volumes(self) {
        let mut tick = tokio::time::interval(VOLUMES_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unknown_said = HashSet::new();
        loop {
            tick.tick().await;
            let agent = self.clone();
            let usage = match tokio::task::spawn_blocking(move || agent.measure_volumes()).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "measuring volumes failed");
                    continue;
                }
            };
            let node = &self.inner.config.node;
            let bound = match self.inner.link.volumes(node, usage.clone()).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(error = %e, "volume usage not delivered; it only feeds get volumes");
                    continue;
                }
            };
            for unknown in usage.iter().filter(|u| {
                !bound
                    .iter()
                    .any(|b| b.namespace == u.namespace && b.name == u.name)
            }) {
                let key = (unknown.namespace.clone(), unknown.name.clone());
                if unknown_said.insert(key.clone()) {
                    tracing::warn!(
                        volume = %self.volume_dir(&key.0, &key.1).display(),
                        "the control plane knows no volume of this directory: its data is kept (remove it by hand if it is not wanted)"
                    );
                }
            }
            for gone in bound.iter().filter(|b| b.deleted) {
                let key = (gone.namespace.clone(), gone.name.clone());
                let mut volumes = self.inner.volumes.lock().expect("volumes lock");
                // Mounted by a replica here (its settings hold the quota): kept for now.
                if volumes.get(&key).is_some_and(|q| Arc::strong_count(q) > 1) {
                    continue;
                }
                volumes.remove(&key);
                let dir = self.volume_dir(&key.0, &key.1);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::info!(volume = %dir.display(), "volume deleted: its data removed")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %dir.display(), error = %e, "cannot remove a deleted volume's data")
                    }
                }
            }
        }
    }

    /// Removes the log files of replicas that have not run here for [`LOG_KEEP`].
    async fn collect_logs(self) {
        let mut tick = tokio::time::interval(LOG_KEEP / 60);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let running: HashSet<String> = {
                let running = self.inner.running.lock().expect("agent lock");
                running.keys().cloned().collect()
            };
            let dir = self.inner.config.logs_dir.clone();
            let swept = tokio::task::spawn_blocking(move || sweep_logs(&dir, &running, LOG_KEEP));
            if let Ok(removed) = swept.await
                && removed > 0
            {
                tracing::info!(files = removed, "removed the logs of replicas long gone");
            }
        }
    }

    /// Tells `tend_ingress` which certificates the view names, if that changed.
    fn want_ingress(&self, view: &ClusterView) {
        let wanted = view.ingress();
        self.inner.ingress.send_if_modified(|now| {
            let changed = *now != wanted;
            *now = wanted;
            changed
        });
    }

    /// Keeps the gateway serving the apps' HTTPS certificates: fetched from the control
    /// plane whenever the apps, their secret versions or route hosts change (and again
    /// after a failure), each checked to belong with its key and name its hosts.
    async fn tend_ingress(self, certs: shoal_tls::IngressCerts) {
        let mut wanted = self.inner.ingress.subscribe();
        loop {
            let want = wanted.borrow_and_update().clone();
            let fetched = if want.is_empty() {
                Ok(Vec::new())
            } else {
                self.inner.link.ingress(&self.inner.config.node).await
            };
            match fetched {
                Ok(list) => {
                    let mut serving = Vec::new();
                    for cert in list {
                        let chain = shoal_tls::KeyedChain {
                            chain: cert.chain,
                            key: cert.key,
                        };
                        match shoal_tls::HostCertificate::new(&chain, &cert.hosts) {
                            Ok(c) => serving.push(c),
                            Err(e) => tracing::warn!(
                                app = %format!("{}/{}", cert.namespace, cert.app),
                                secret = %cert.secret,
                                error = %e,
                                "an app's HTTPS certificate is not served"
                            ),
                        }
                    }
                    tracing::info!(
                        certificates = serving.len(),
                        "the gateway serves the apps' HTTPS certificates"
                    );
                    certs.set_hosts(serving);
                    if wanted.changed().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the apps' HTTPS certificates; retrying");
                    tokio::time::sleep(INGRESS_RETRY).await;
                }
            }
        }
    }

    fn volume_dir(&self, ns: &str, name: &str) -> std::path::PathBuf {
        self.inner.config.volumes_dir.join(ns).join(name)
    }

    /// What every volume directory on this node holds, those no replica mounted since the
    /// node started included.
    fn measure_volumes(&self) -> Vec<VolumeUsage> {
        let mut usage = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(&self.inner.config.volumes_dir) else {
            return usage;
        };
        for ns in namespaces.flatten() {
            let Ok(volumes) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for v in volumes.flatten() {
                let (namespace, name) = (
                    ns.file_name().to_string_lossy().into_owned(),
                    v.file_name().to_string_lossy().into_owned(),
                );
                let known = self
                    .inner
                    .volumes
                    .lock()
                    .expect("volumes lock")
                    .get(&(namespace.clone(), name.clone()))
                    .cloned();
                let bytes = match known {
                    Some(quota) => quota.measure(),
                    None => shoal_runtime::du(&v.path()),
                };
                usage.push(VolumeUsage {
                    namespace,
                    name,
                    bytes,
                    deleted: false,
                });
            }
        }
        usage
    }

    /// Volume `mount` of namespace `ns` as a replica mounts it: its directory, made if new,
    /// and its quota, at the limit the spec gives.
    fn volume(
        &self,
        ns: &str,
        mount: &shoal_core::spec::VolumeMount,
    ) -> std::io::Result<VolumeMount> {
        let dir = self.volume_dir(ns, &mount.name);
        std::fs::create_dir_all(&dir)?;
        let quota = self
            .inner
            .volumes
            .lock()
            .expect("volumes lock")
            .entry((ns.to_string(), mount.name.clone()))
            .or_insert_with(|| VolumeQuota::new(&dir, mount.size()))
            .clone();
        // A reader writes nothing, and a writer that gives no size takes the volume's as
        // it is: the limit is what the writers that give one say.
        if !mount.read_only
            && let Some(size) = mount.size_bytes
        {
            quota.set_limit(size);
        }
        Ok(VolumeMount {
            host: dir,
            guest: mount.mount.clone(),
            read_only: mount.read_only,
            quota,
        })
    }

    /// Tells the control plane at once how many requests the gateway holds for
    /// apps at zero replicas: that is what wakes them, so it cannot wait for
    /// the next metrics tick. While any is held, or a count was not delivered, the
    /// counts go again every second: a report lost, or a control plane that
    /// restarted (and forgot them), must not leave a held request without its wake.
    async fn send_waiting(self) {
        let mut pending: BTreeMap<AppKey, u32> = BTreeMap::new();
        loop {
            let changed = self.inner.gateway.waiting_changed();
            if !pending.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            } else {
                changed.await;
            }
            pending.extend(self.inner.gateway.take_waiting());
            let waiting = pending
                .iter()
                .map(|(app, &requests)| Waiting {
                    app: app.clone(),
                    requests,
                })
                .collect();
            match self
                .inner
                .link
                .waiting(&self.inner.config.node, waiting)
                .await
            {
                // Held ones are sent again until they are let go.
                Ok(()) => pending.retain(|_, n| *n > 0),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting requests not reported; retrying in a second")
                }
            }
        }
    }

    /// Starts over from a fresh view: the gateway gets every app's tables,
    /// and every replica here or running is looked at.
    fn reload(&self, view: &ClusterView, sent: &mut HashMap<AppKey, AppTables>) {
        *sent = all_tables(view);
        self.want_ingress(view);
        self.inner.gateway.set_members(view.node_names());
        self.inner.gateway.set_tables(gateway_tables(sent.iter()));
        self.resync(view, sent);
    }

    /// Looks at every replica placed here or running (not at the tables, which
    /// change only with the view), and puts remote endpoints marked down back
    /// in rotation, as a fresh status listing them would.
    fn resync(&self, view: &ClusterView, sent: &mut HashMap<AppKey, AppTables>) {
        self.inner.gateway.revive_remotes();
        let mut touched = Touched::default();
        touched.replicas.extend(view.mine().map(|r| r.id.clone()));
        touched.replicas.extend(
            self.inner
                .running
                .lock()
                .expect("agent lock")
                .keys()
                .cloned(),
        );
        self.sync(view, &touched, sent);
    }

    /// Level-triggered on what changed: compares the touched replicas placed
    /// here with what runs, and the touched apps' gateway tables with what the
    /// gateway has, and fixes the difference as [`node_plan`] says.
    fn sync(&self, view: &ClusterView, touched: &Touched, sent: &mut HashMap<AppKey, AppTables>) {
        if touched.is_empty() {
            return;
        }
        let mut running = self.inner.running.lock().expect("agent lock");
        let reports: BTreeMap<String, Option<ReplicaReport>> = touched
            .replicas
            .iter()
            .filter_map(|id| {
                let r = running.get(id)?;
                Some((id.clone(), r.status.lock().expect("status lock").clone()))
            })
            .collect();
        let plan = node_plan(view, touched, &reports, sent);
        if !plan.tables.is_empty() {
            let apps = plan.tables.iter().map(|(app, _)| app.clone()).collect();
            let tables = gateway_tables(plan.tables.iter().map(|(app, t)| (app, t)));
            self.inner.gateway.update_tables(apps, tables);
            for (app, tables) in plan.tables {
                if tables == AppTables::default() {
                    sent.remove(&app);
                } else {
                    sent.insert(app, tables);
                }
            }
        }
        for id in &plan.stop {
            if let Some(r) = running.remove(id) {
                self.inner.gateway.remove_endpoint(&r.app, id);
                r.task.abort();
                r.logs.close();
                tracing::info!(replica = %id, "stopped");
            }
        }
        for id in &plan.resend {
            let Some(r) = running.get(id) else { continue };
            // Send what is current when the resend's turn comes, never an older report.
            // Not while one is being sent: that one carries the latest already, and resends
            // must not queue up behind a slow control plane, nor hold up the replica's own.
            let Ok(turn) = r.sending.clone().try_lock_owned() else {
                continue;
            };
            let (link, status) = (self.inner.link.clone(), r.status.clone());
            tokio::spawn(async move {
                let _turn = turn;
                let report = status.lock().expect("status lock").clone();
                if let Some(report) = report
                    && let Err(e) = link.report(report).await
                {
                    tracing::warn!(error = %e, "status resend failed");
                }
            });
        }
        for (replica, revision) in plan.start {
            let base = self
                .inner
                .config
                .logs_dir
                .join(&replica.app.namespace)
                .join(&replica.app.name)
                .join(&replica.id);
            let logs = LogSink::persistent(log_files(base), LOG_LINES, DEFAULT_LOG_BYTES)
                .unwrap_or_else(|e| {
                    tracing::warn!(replica = %replica.id, error = %e, "cannot keep the replica's output on disk; it stays in memory only");
                    LogSink::new(LOG_LINES)
                });
            let span = tracing::info_span!("replica", id = %replica.id, app = %replica.app);
            let id = replica.id.clone();
            let app = replica.app.clone();
            let digest = revision.template.component.digest.clone();
            let task = tokio::spawn(
                self.clone()
                    .start(replica, revision, logs.clone())
                    .instrument(span),
            );
            running.insert(
                id,
                Running {
                    app,
                    digest,
                    logs,
                    task,
                    status: Arc::new(Mutex::new(None)),
                    sending: Arc::default(),
                },
            );
        }
    }

    async fn report(
        &self,
        replica: &Replica,
        phase: Phase,
        message: Option<String>,
        exit_code: Option<i32>,
    ) {
        // The restarts on its record: an agent before this one may have made some.
        self.report_status(replica, phase, message, exit_code, replica.restarts, None)
            .await
    }

    /// Records the replica's status locally, then tells the control plane.
    /// A report that does not get through is sent again by the next sync.
    async fn report_status(
        &self,
        replica: &Replica,
        phase: Phase,
        message: Option<String>,
        exit_code: Option<i32>,
        restarts: u32,
        reason: Option<&str>,
    ) {
        let report = ReplicaReport {
            app: replica.app.clone(),
            replica: replica.id.clone(),
            node: self.inner.config.node.clone(),
            phase,
            message,
            exit_code,
            restarts,
            reason: reason.map(str::to_string),
        };
        let slot = self
            .inner
            .running
            .lock()
            .expect("agent lock")
            .get(&replica.id)
            .map(|r| (r.status.clone(), r.sending.clone()));
        let (report, _turn) = match slot {
            Some((status, sending)) => {
                *status.lock().expect("status lock") = Some(report.clone());
                let turn = sending.lock_owned().await;
                let latest = status.lock().expect("status lock").clone();
                (latest.unwrap_or(report), Some(turn))
            }
            None => (report, None),
        };
        if let Err(e) = self.inner.link.report(report).await {
            tracing::warn!(error = %e, "status report failed; will resend");
        }
    }

    /// Loads and starts one replica, then reports how it went.
    async fn start(self, replica: Replica, revision: Revision, logs: LogSink) {
        self.report(&replica, Phase::Starting, None, None).await;
        let t = &revision.template;
        // Fetching can fail for passing reasons (the control plane restarting):
        // keep trying, saying why, instead of failing the replica.
        let mut delay = Duration::from_millis(200);
        let path = loop {
            match self.inner.link.module(&t.component.digest).await {
                Ok(p) => break p,
                Err(e) => {
                    let message = format!("module fetch failed, retrying: {e}");
                    logs.push_system(&message);
                    self.report(&replica, Phase::Starting, Some(message), None)
                        .await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let loaded = match self.inner.runtime.load(&t.component.digest, &path).await {
            Ok(l) => l,
            Err(e) => {
                logs.push_system(format!("failed to load module: {e}"));
                self.report(
                    &replica,
                    Phase::Failed,
                    Some(format!("load failed: {e}")),
                    None,
                )
                .await;
                return;
            }
        };
        // Secret values, only if the revision names some: asked for now, held in this
        // replica's instance settings only. Until they can be had (the key file missing, a
        // value damaged) the replica does not start, and says why.
        let secrets = if t.secret_env.is_empty() && t.secret_config.is_empty() {
            ReplicaSecrets::default()
        } else {
            let mut delay = Duration::from_millis(200);
            loop {
                let node = &self.inner.config.node;
                match self
                    .inner
                    .link
                    .secrets(node, &replica.app, &replica.id)
                    .await
                {
                    Ok(s) => break s,
                    Err(e) => {
                        let message = format!("secrets unavailable, retrying: {e}");
                        logs.push_system(&message);
                        self.report(&replica, Phase::Starting, Some(message), None)
                            .await;
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        };
        let mut volumes = Vec::new();
        for mount in &t.volumes {
            match self.volume(&replica.app.namespace, mount) {
                Ok(v) => volumes.push(v),
                Err(e) => {
                    let message = format!("volume {}: {e}", mount.name);
                    logs.push_system(&message);
                    self.report(&replica, Phase::Failed, Some(message), None)
                        .await;
                    return;
                }
            }
        }
        let mut values = t.effective_config();
        values.extend(secrets.config);
        let config = InstanceConfig {
            env: t
                .env
                .iter()
                .map(|(k, v)| (k.clone(), self.downward(&replica, &values, v)))
                .chain(secrets.env)
                .collect(),
            config: values.into_iter().collect(),
            args: t.component.args.clone(),
            memory_limit: t.resources.limits.memory_bytes,
            timeout: match t.component.kind {
                Kind::Http => (t.timeout_ms > 0).then(|| Duration::from_millis(t.timeout_ms)),
                _ => t
                    .job
                    .as_ref()
                    .and_then(|j| j.deadline_ms)
                    .map(Duration::from_millis),
            },
            logs: logs.clone(),
            outbound: self
                .inner
                .gateway
                .outbound(&replica.app, t.outbound.clone()),
            incidents: Some(self.incident_hook(&replica)),
            // One CPU group per app on this node: each replica adds its request to the
            // group's weight and its limit to the group's quota.
            cpu: CpuShare {
                group: replica.app.to_string().into(),
                request_millis: t.resources.requests.cpu_millis,
                limit_millis: t.resources.limits.cpu_millis,
            },
            reuse: Reuse {
                requests: t.reuse,
                idle: Duration::from_millis(t.reuse_idle_ms),
                concurrent: t.reuse_concurrent,
            },
            keyvalue: (!t.keyvalue.is_empty()).then(|| KvGrant {
                backend: Arc::new(ClusterKv {
                    link: self.inner.link.clone(),
                    node: self.inner.config.node.clone(),
                    app: replica.app.clone(),
                }),
                buckets: t.keyvalue.clone(),
            }),
            volumes,
            stats: self.inner.revisions.stats(&replica.app, replica.revision),
        };
        match t.component.kind {
            Kind::Http => match self.inner.runtime.http_service(&loaded, config.clone()) {
                Ok(service) if t.health.is_default() => {
                    if self.serve(&replica, t, service) {
                        self.report(&replica, Phase::Ready, None, None).await;
                    }
                }
                Ok(service) => {
                    self.supervise(&replica, t, &loaded, config, service, &logs)
                        .await
                }
                Err(e) => {
                    logs.push_system(e.to_string());
                    self.report(&replica, Phase::Failed, Some(e.to_string()), None)
                        .await;
                }
            },
            Kind::Job | Kind::Daemon => match self.inner.runtime.command(&loaded, config) {
                Ok(command) => self.run_command(&replica, t, command, &logs).await,
                Err(e) => {
                    logs.push_system(e.to_string());
                    self.report(&replica, Phase::Failed, Some(e.to_string()), None)
                        .await;
                }
            },
        }
    }
}

impl Agent {
    /// Turns a replica's killed instances into cluster events: the first of each
    /// kind at once, then at most one per [`INCIDENT_PERIOD`] carrying how many
    /// more happened, so a guest timing out under load cannot flood the event log.
    /// Those held back are said when their period ends, if no other comes to say them.
    fn incident_hook(&self, replica: &Replica) -> IncidentHook {
        let link = self.inner.link.clone();
        let (app, id, node) = (
            replica.app.clone(),
            replica.id.clone(),
            self.inner.config.node.clone(),
        );
        type Last = Mutex<HashMap<IncidentKind, (std::time::Instant, u32)>>;
        let last: Arc<Last> = Arc::default();
        let send = move |kind: IncidentKind, message: String| {
            let report = ReplicaIncident {
                app: app.clone(),
                replica: id.clone(),
                node: node.clone(),
                reason: kind.reason().to_string(),
                message,
            };
            let link = link.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = link.incident(report).await {
                        tracing::debug!(error = %e, "incident not delivered");
                    }
                });
            }
        };
        let send = Arc::new(send);
        Arc::new(move |incident: Incident| {
            let message = {
                let mut held = last.lock().expect("incident lock");
                match held.get_mut(&incident.kind) {
                    Some((at, more)) if at.elapsed() < INCIDENT_PERIOD => {
                        *more += 1;
                        // The first held back: said when the period ends, even if no other
                        // of its kind comes then to carry the count.
                        if *more == 1
                            && let Ok(handle) = tokio::runtime::Handle::try_current()
                        {
                            let due = tokio::time::Instant::from_std(*at + INCIDENT_PERIOD);
                            let (last, send, kind) = (last.clone(), send.clone(), incident.kind);
                            handle.spawn(async move {
                                tokio::time::sleep_until(due).await;
                                let n = {
                                    let mut held = last.lock().expect("incident lock");
                                    match held.get_mut(&kind) {
                                        Some((at, more)) if *more > 0 => {
                                            *at = std::time::Instant::now();
                                            std::mem::take(more)
                                        }
                                        _ => return,
                                    }
                                };
                                send(kind, format!("{n} more since the last report"));
                            });
                        }
                        return;
                    }
                    Some((at, more)) => {
                        let message = match std::mem::take(more) {
                            0 => incident.message,
                            n => {
                                format!("{} (and {n} more since the last report)", incident.message)
                            }
                        };
                        *at = std::time::Instant::now();
                        message
                    }
                    None => {
                        held.insert(incident.kind, (std::time::Instant::now(), 0));
                        incident.message
                    }
                }
            };
            send(incident.kind, message);
        })
    }

    /// Puts a replica in its gateway, only while it is still wanted: a sync
    /// that stopped it meanwhile must not see it come back.
    fn serve(&self, replica: &Replica, template: &Template, service: HttpService) -> bool {
        let running = self.inner.running.lock().expect("agent lock");
        if !running.contains_key(&replica.id) {
            return false;
        }
        let endpoint = Endpoint::local(
            replica.id.clone(),
            replica.revision,
            service,
            template.resources.max_concurrency,
        );
        self.inner
            .gateway
            .add_endpoint(replica.app.clone(), endpoint);
        true
    }

    /// Runs an http replica's probes for its life and does what its
    /// [`ProbeState`] makes of them: readiness puts it in or out of the
    /// gateway, liveness restarts it with a fresh instance pre-image. When
    /// restarts do not help it reports so (the controller replaces it on
    /// another node if one can take it) and goes on restarting it here, with
    /// growing delays.
    async fn supervise(
        &self,
        replica: &Replica,
        template: &Template,
        loaded: &shoal_runtime::Loaded,
        config: InstanceConfig,
        mut service: HttpService,
        logs: &LogSink,
    ) {
        let health = &template.health;
        let origin = tokio::time::Instant::now();
        // Restarts an agent before this one made count on (a job's retries, the record's).
        let mut state = ProbeState::new(health, Duration::ZERO, replica.restarts);
        // What the last report said: its phase, and whether it said `LivenessFailed`.
        let mut shown = match &health.readiness {
            None => {
                self.serve(replica, template, service.clone());
                self.report_status(replica, Phase::Ready, None, None, state.restarts(), None)
                    .await;
                (Phase::Ready, false)
            }
            Some(r) => {
                let message = format!("waiting for readiness probe {}", r.path);
                let restarts = state.restarts();
                self.report_status(
                    replica,
                    Phase::Starting,
                    Some(message),
                    None,
                    restarts,
                    None,
                )
                .await;
                (Phase::Starting, false)
            }
        };
        // What the last report while Starting said of the readiness probe.
        let mut starting_said: Option<String> = None;
        while let Some(due) = state.next_due() {
            tokio::time::sleep_until(origin + due).await;
            for kind in state.due(origin.elapsed()) {
                let spec = match kind {
                    Probe::Readiness => &health.readiness,
                    Probe::Liveness => &health.liveness,
                };
                let Some(spec) = spec else { continue };
                let result = probe(&service, spec).await;
                // A replica that does not get ready says why, as each new answer comes (a
                // 503, a timeout): not only that it waits.
                if let (Probe::Readiness, Phase::Starting, Err(e)) = (kind, shown.0, &result) {
                    let message = format!("waiting for readiness probe: {e}");
                    if starting_said.as_ref() != Some(&message) {
                        self.report_status(
                            replica,
                            Phase::Starting,
                            Some(message.clone()),
                            None,
                            state.restarts(),
                            None,
                        )
                        .await;
                        starting_said = Some(message);
                    }
                }
                let now = origin.elapsed();
                let action = state.observe(kind, result, now);
                let restarts = state.restarts();
                // While restarts have not helped, every report says so.
                let reason = state.keeps_failing().then_some(LIVENESS_FAILED);
                match action {
                    Action::Nothing => {}
                    Action::Serve => {
                        self.serve(replica, template, service.clone());
                        self.report_status(replica, Phase::Ready, None, None, restarts, reason)
                            .await;
                        shown = (Phase::Ready, reason.is_some());
                    }
                    Action::Unserve(message) => {
                        self.inner
                            .gateway
                            .remove_endpoint(&replica.app, &replica.id);
                        logs.push_system(&message);
                        self.report_status(
                            replica,
                            Phase::Unready,
                            Some(message),
                            None,
                            restarts,
                            reason,
                        )
                        .await;
                        shown = (Phase::Unready, reason.is_some());
                    }
                    Action::Restart(restart) => {
                        let phase = if restart.serve {
                            Phase::Ready
                        } else {
                            Phase::Unready
                        };
                        shown = (phase, restart.failing);
                        match self
                            .restart(replica, template, loaded, &config, logs, restart)
                            .await
                        {
                            Some(fresh) => service = fresh,
                            None => return,
                        }
                        // The other probe's result was about the instance just replaced.
                        break;
                    }
                }
            }
            // Live again for a while: the controller must hear that restarts have helped,
            // or it goes on taking the replica for one to replace.
            let (phase, failing) = shown;
            if failing && !state.keeps_failing() {
                self.report_status(replica, phase, None, None, state.restarts(), None)
                    .await;
                shown = (phase, false);
            }
        }
    }

    /// Restarts an http replica whose liveness kept failing: a fresh instance
    /// pre-image, after a delay if restarts have not helped. `None` if it could
    /// not be rebuilt (then it has failed).
    async fn restart(
        &self,
        replica: &Replica,
        template: &Template,
        loaded: &shoal_runtime::Loaded,
        config: &InstanceConfig,
        logs: &LogSink,
        restart: probe::Restart,
    ) -> Option<HttpService> {
        let reason = restart.failing.then_some(LIVENESS_FAILED);
        self.inner
            .gateway
            .remove_endpoint(&replica.app, &replica.id);
        let before = restart.restarts - 1;
        if let Some((delay, message)) = restart.keeps_failing {
            logs.push_system(&message);
            self.report_status(replica, Phase::Unready, Some(message), None, before, reason)
                .await;
            tokio::time::sleep(delay).await;
        }
        logs.push_system(&restart.message);
        let service = match self.inner.runtime.http_service(loaded, config.clone()) {
            Ok(fresh) => fresh,
            Err(e) => {
                let message = Some(e.to_string());
                self.report_status(replica, Phase::Failed, message, None, before, None)
                    .await;
                return None;
            }
        };
        let phase = if restart.serve {
            self.serve(replica, template, service.clone());
            Phase::Ready
        } else {
            Phase::Unready
        };
        self.report_status(
            replica,
            phase,
            Some(restart.message),
            None,
            restart.restarts,
            reason,
        )
        .await;
        Some(service)
    }

    /// Runs a job or daemon, restarting it as its kind and policy say, with
    /// exponential backoff (100 ms doubling to 30 s, reset after a stable run).
    async fn run_command(
        &self,
        replica: &Replica,
        template: &Template,
        command: shoal_runtime::Command,
        logs: &LogSink,
    ) {
        // Restarts an agent before this one made count against a job's retries.
        let mut restarts = replica.restarts;
        let mut backoff = Backoff::default();
        loop {
            self.report_status(replica, Phase::Running, None, None, restarts, None)
                .await;
            let started = tokio::time::Instant::now();
            let status = command.run().await;
            let code = match status {
                ExitStatus::Exited(n) => Some(n),
                _ => None,
            };
            let retry = match (replica.kind, &template.job) {
                (Kind::Daemon, _) => true,
                (_, _) if status.success() => false,
                (_, Some(job)) => job.restart == Restart::OnFailure && restarts < job.retries,
                _ => false,
            };
            if !retry {
                // Its output is complete: followers of it are done.
                logs.close();
                let phase = if status.success() {
                    Phase::Succeeded
                } else {
                    Phase::Failed
                };
                self.report_status(
                    replica,
                    phase,
                    Some(status.to_string()),
                    code,
                    restarts,
                    None,
                )
                .await;
                return;
            }
            let delay = backoff.after(started.elapsed());
            restarts += 1;
            // The log has the status already, from the runtime; its replica's message both.
            logs.push_system(format!("restart {restarts} in {delay:?}"));
            let message = format!("{status}; restart {restarts} in {delay:?}");
            self.report_status(
                replica,
                Phase::CrashLoopBackOff,
                Some(message),
                code,
                restarts,
                None,
            )
            .await;
            tokio::time::sleep(delay).await;
        }
    }
}

/// A replica's `wasi:keyvalue` calls, to the cluster's store through the control plane.
struct ClusterKv {
    link: Arc<dyn Link>,
    node: String,
    app: AppKey,
}

impl shoal_runtime::KeyValue for ClusterKv {
    fn call(
        &self,
        bucket: &str,
        op: shoal_core::kv::KvOp,
    ) -> futures::future::BoxFuture<'static, Result<shoal_core::kv::KvAnswer, String>> {
        let (link, node, app, bucket) = (
            self.link.clone(),
            self.node.clone(),
            self.app.clone(),
            bucket.to_string(),
        );
        Box::pin(async move {
            link.kv(&node, &app, &bucket, op)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Agent {
    /// An env value with its references filled in ([`shoal_core::spec::env_parts`]): a fact
    /// about the replica (`$(node)`, `$(replica)`, `$(revision)`, `$(app)`, `$(namespace)`)
    /// becomes that fact, as Kubernetes' downward API does, and `$(config.KEY)` the app's
    /// config value of KEY (`[config]` over its config sets); only what the spec asks for
    /// reaches the guest.
    fn downward(
        &self,
        replica: &Replica,
        config: &BTreeMap<String, String>,
        value: &str,
    ) -> String {
        use shoal_core::spec::EnvPart;
        let parts = shoal_core::spec::env_parts(value);
        let whole = parts.len() == 1;
        let mut filled = String::with_capacity(value.len());
        for part in parts {
            match part {
                EnvPart::Text(text) => filled.push_str(text),
                EnvPart::Config(key) => match config.get(key) {
                    Some(v) => filled.push_str(v),
                    // The apply refused a whole value naming no key; within a longer one a
                    // reference that resolves to nothing is passed as written.
                    None if whole => {}
                    None => {
                        filled.push_str("$(config.");
                        filled.push_str(key);
                        filled.push(')');
                    }
                },
                EnvPart::Fact("node") => filled.push_str(&self.inner.config.node),
                EnvPart::Fact("replica") => filled.push_str(&replica.id),
                EnvPart::Fact("revision") => filled.push_str(&replica.revision.to_string()),
                EnvPart::Fact("app") => filled.push_str(&replica.app.name),
                EnvPart::Fact("namespace") => filled.push_str(&replica.app.namespace),
                // Passed as written, as Kubernetes passes a reference it cannot resolve.
                EnvPart::Fact(other) => {
                    filled.push_str("$(");
                    filled.push_str(other);
                    filled.push(')');
                }
            }
        }
        filled
    }
}

/// A replica's log files, as the agent keeps them.
fn log_files(base: std::path::PathBuf) -> LogFiles {
    LogFiles {
        base,
        file_bytes: LOG_FILE_BYTES,
    }
}

/// The base path of replica `id`'s log files under `dir` (`NAMESPACE/APP/ID.log`), if it
/// has any: a replica that ran here and stopped. Only a valid name is looked for.
fn stopped_logs(
    dir: &std::path::Path,
    id: &str,
    app: Option<&AppKey>,
) -> Option<std::path::PathBuf> {
    shoal_core::validate_name(id).ok()?;
    if let Some(app) = app {
        shoal_core::validate_name(&app.namespace).ok()?;
        shoal_core::validate_name(&app.name).ok()?;
        let base = dir.join(&app.namespace).join(&app.name).join(id);
        return base.with_extension("log").is_file().then_some(base);
    }
    for ns in std::fs::read_dir(dir).ok()?.flatten() {
        for app in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let base = app.path().join(id);
            if base.with_extension("log").is_file() {
                return Some(base);
            }
        }
    }
    None
}

/// Removes the log files under `dir` of replicas not in `running` that were last written
/// longer than `keep` ago, and the directories left empty; how many files went.
fn sweep_logs(dir: &std::path::Path, running: &HashSet<String>, keep: Duration) -> usize {
    let mut removed = 0;
    let old = |path: &std::path::Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > keep)
    };
    for ns in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for app in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(app.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = file.path();
                let name = file.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".log").or(name.strip_suffix(".log.1")) else {
                    continue;
                };
                // By the file being written: the one before may be older.
                let current = path.with_file_name(format!("{id}.log"));
                if running.contains(id) || (current.exists() && !old(&current)) {
                    continue;
                }
                if std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            // Fails, as it should, while files remain.
            let _ = std::fs::remove_dir(app.path());
        }
        let _ = std::fs::remove_dir(ns.path());
    }
    removed
}

/// Applies every delta that has already arrived, so that a burst of changes
/// (a transaction's come as one delta; a replay, many) costs one sync. If the
/// watch ended meanwhile, whether its connection broke ([`Agent::follow`]).
fn apply_arrived(
    changes: &mut Changes,
    view: &mut ClusterView,
    touched: &mut Touched,
) -> Option<bool> {
    while let Some(next) = changes.next().now_or_never() {
        match next {
            Some(Ok(delta)) => {
                view.apply(delta, touched);
            }
            end => return Some(end.is_some()),
        }
    }
    None
}

/// How much of a probe's answer is read before the probe stops reading.
const PROBE_READ: usize = 64 << 10;

/// One probe: a GET of its path on a fresh instance, passing on 2xx or 3xx
/// within its timeout.
async fn probe(service: &HttpService, probe: &shoal_core::spec::Probe) -> Result<(), String> {
    use http_body_util::BodyExt;
    let request = http::Request::get(probe.path.as_str())
        .header(http::header::HOST, "localhost")
        .header(http::header::USER_AGENT, "shoal-probe")
        .body(http_body_util::Empty::<bytes::Bytes>::new().map_err(
            |never: std::convert::Infallible| -> shoal_runtime::HttpError { match never {} },
        ))
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_millis(probe.timeout_ms);
    let answer = async {
        let resp = service.handle(request).await;
        let status = resp.status();
        // Read to its end (up to PROBE_READ; what it says dropped): an answer left unread
        // breaks off the guest's writing of it, which the guest logs as a failure of its own.
        // A longer one is no health check's: the probe does not wait for the rest.
        let mut body = resp.into_body();
        let mut read = 0;
        while read < PROBE_READ
            && let Some(Ok(frame)) = body.frame().await
        {
            read += frame.data_ref().map_or(0, |d| d.len());
        }
        status
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(status) if status.is_success() || status.is_redirection() => Ok(()),
        Ok(status) => Err(format!("{} answered {status}", probe.path)),
        Err(_) => Err(format!("{} timed out after {timeout:?}", probe.path)),
    }
}

/// `fresh` with what earlier reports could not deliver added to it, per app revision. The
/// requests and errors carry over; their time in flight does not, as the autoscaler would
/// take an outage's load, arriving late, for load now.
fn with_undelivered(
    fresh: Vec<RevisionStats>,
    undelivered: Vec<RevisionStats>,
) -> Vec<RevisionStats> {
    let mut merged: BTreeMap<(AppKey, u64), RevisionStats> = fresh
        .into_iter()
        .map(|s| ((s.app.clone(), s.revision), s))
        .collect();
    for mut old in undelivered {
        old.busy_ms = 0;
        merged
            .entry((old.app.clone(), old.revision))
            .and_modify(|s| s.merge(&old))
            .or_insert(old);
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report that could not be delivered goes with the next: counts added per revision,
    /// its time in flight left out.
    #[test]
    fn undelivered_measurements_go_with_the_next_report_without_their_load() {
        let stats = |app: &str, revision, requests, busy_ms| {
            let mut s = RevisionStats::new(AppKey::new("default", app), revision);
            (s.requests, s.errors, s.busy_ms) = (requests, requests / 2, busy_ms);
            s.latency.record(1.0);
            s
        };
        let undelivered = vec![stats("a", 1, 10, 900), stats("b", 0, 4, 0)];
        let next = with_undelivered(
            vec![stats("a", 1, 2, 500), stats("a", 2, 1, 7)],
            undelivered,
        );
        let seen: Vec<_> = next
            .iter()
            .map(|s| {
                (
                    s.app.name.as_str(),
                    s.revision,
                    s.requests,
                    s.errors,
                    s.busy_ms,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("a", 1, 12, 6, 500), ("a", 2, 1, 0, 7), ("b", 0, 4, 2, 0)]
        );
        assert_eq!(next[0].latency.total(), 2);
    }

    #[test]
    fn logs_of_replicas_long_gone_are_swept_and_running_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("default/hello");
        std::fs::create_dir_all(&app).unwrap();
        for file in ["gone.log", "gone.log.1", "runs.log", "notes.txt"] {
            std::fs::write(app.join(file), "{}\n").unwrap();
        }
        let running: HashSet<String> = ["runs".to_string()].into();
        // Kept for an hour: nothing is that old yet.
        assert_eq!(sweep_logs(dir.path(), &running, LOG_KEEP), 0);
        assert_eq!(sweep_logs(dir.path(), &running, Duration::ZERO), 2);
        assert!(app.join("runs.log").exists() && app.join("notes.txt").exists());
        assert!(!app.join("gone.log").exists() && !app.join("gone.log.1").exists());
        assert_eq!(
            stopped_logs(dir.path(), "runs", None),
            Some(app.join("runs")),
            "a replica's files are found by its id"
        );
        assert_eq!(
            stopped_logs(dir.path(), "runs", Some(&AppKey::new("default", "hello"))),
            Some(app.join("runs")),
            "and by its app's"
        );
        for other in [AppKey::new("team", "hello"), AppKey::new("default", "web")] {
            assert_eq!(
                stopped_logs(dir.path(), "runs", Some(&other)),
                None,
                "{other}"
            );
        }
        assert_eq!(
            stopped_logs(dir.path(), "runs", Some(&AppKey::new("..", "default"))),
            None
        );
        assert_eq!(stopped_logs(dir.path(), "../default", None), None);
        std::fs::remove_file(app.join("notes.txt")).unwrap();
        assert_eq!(sweep_logs(dir.path(), &HashSet::new(), Duration::ZERO), 1);
        assert!(
            !dir.path().join("default").exists(),
            "empty directories go too"
        );
    }
}
