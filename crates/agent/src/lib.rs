//! The node agent. It watches what is placed on its node, makes the runtime
//! match (load, start, stop), keeps its gateway's routes and endpoints true,
//! and reports every replica's phase to the control plane. It never writes
//! cluster state itself: it reads and reports through a [`Link`], in process
//! or over HTTP. While the control plane is unreachable it keeps serving what
//! it runs, and it re-sends any report the cluster state does not reflect.

mod link;

pub use link::{Link, LinkError, LocalLink, RemoteLink};

use futures::StreamExt;
use shoal_control::{LogSource, ReplicaIncident, ReplicaReport, Snapshot, now_ms};
use shoal_core::objects::LIVENESS_FAILED;
use shoal_core::spec::AppKey;
use shoal_core::spec::{Restart, Template};
use shoal_core::{App, Capacity, Kind, Node, NodeState, Phase, Replica, Revision};
use shoal_gateway::{Endpoint, Gateway, RemoteReplica, Split};
use shoal_runtime::{
    ExitStatus, HttpService, Incident, IncidentHook, IncidentKind, InstanceConfig, LogSink, Runtime,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How often the agent re-reads the cluster state even when nothing changed.
const RESYNC: Duration = Duration::from_secs(2);

/// Restart backoff of jobs and daemons: first delay, cap, and how long a run
/// must last for the delay to start over.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// Lines of output kept per replica.
const LOG_LINES: usize = 5000;

/// How often the gateway's per-revision measurements go to the control plane.
const METRICS_PERIOD: Duration = Duration::from_secs(1);

/// Liveness restarts after which the node gives up on a replica, so the
/// controller replaces it elsewhere; a replica that stays live for
/// [`BACKOFF_RESET`] starts counting again.
const LIVENESS_RESTARTS: u32 = 3;

/// Incidents of one kind on one replica reported at most this often; the rest are counted.
const INCIDENT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub gateway_addr: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
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
}

/// A replica this node runs.
struct Running {
    app: AppKey,
    logs: LogSink,
    task: JoinHandle<()>,
    /// The last status reported for it, to resend if the cluster lost it.
    status: Arc<Mutex<Option<ReplicaReport>>>,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        link: Arc<dyn Link>,
        runtime: Runtime,
        gateway: Gateway,
    ) -> Self {
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                link,
                runtime,
                gateway,
                running: Mutex::new(HashMap::new()),
            }),
        };
        // The control plane reads replicas' output through this node's gateway.
        let weak = Arc::downgrade(&agent.inner);
        agent
            .inner
            .gateway
            .set_log_lookup(Arc::new(move |replica: &str| {
                let inner = weak.upgrade()?;
                let running = inner.running.lock().expect("agent lock");
                running.get(replica).map(|r| r.logs.clone())
            }));
        agent
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
            joined_at: now_ms(),
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
    /// until the process ends.
    pub async fn run(self) {
        self.register().await;
        tokio::spawn(self.clone().heartbeats());
        tokio::spawn(self.clone().send_metrics());
        loop {
            let snapshot = match self.inner.link.snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read cluster state; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            let mut seen = snapshot.revision;
            self.sync(snapshot);
            let mut changes = match self.inner.link.changes(seen).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch cluster state; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            // Each change means "look again"; a burst of them, one look. A
            // periodic look too, so nothing waits on a change that never comes
            // (e.g. a report to resend while the cluster is quiet).
            let mut resync = tokio::time::interval(RESYNC);
            resync.tick().await;
            loop {
                let revision = tokio::select! {
                    next = changes.next() => match next {
                        Some(r) if r <= seen => continue,
                        Some(r) => r,
                        None => break,
                    },
                    _ = resync.tick() => seen,
                };
                match self.inner.link.snapshot().await {
                    Ok(s) => {
                        seen = s.revision.max(revision);
                        self.sync(s);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read cluster state");
                        break;
                    }
                }
            }
            tracing::debug!("watch ended; re-reading the cluster state");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn heartbeats(self) {
        let mut tick = tokio::time::interval(self.inner.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.inner.link.heartbeat(&self.inner.config.node).await {
                Ok(()) => {}
                Err(LinkError::Unregistered) => self.register().await,
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Sends what the gateway measured per app revision since the last time.
    async fn send_metrics(self) {
        let mut tick = tokio::time::interval(METRICS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let stats = self.inner.gateway.take_metrics();
            if stats.is_empty() {
                continue;
            }
            if let Err(e) = self
                .inner
                .link
                .metrics(&self.inner.config.node, stats)
                .await
            {
                tracing::debug!(error = %e, "metrics not delivered; they only feed canary analysis");
            }
        }
    }

    /// Level-triggered: compares what is placed here with what runs, and fixes the difference.
    fn sync(&self, snapshot: Snapshot) {
        let Snapshot {
            apps,
            revisions,
            replicas,
            nodes,
            rollouts,
            ..
        } = snapshot;
        let me = &self.inner.config.node;

        let routes = apps
            .iter()
            .filter_map(|a: &App| a.spec.http.as_ref().map(|h| (a.spec.key(), h)))
            .flat_map(|(key, h)| h.routes.iter().map(move |r| (r.clone(), key.clone())))
            .collect();
        self.inner.gateway.set_routes(routes);
        self.inner.gateway.set_services(
            apps.iter()
                .filter(|a| a.spec.component.kind == Kind::Http)
                .map(|a| a.spec.key())
                .collect(),
        );
        // Ready replicas on other Ready nodes are reachable through their gateways;
        // a node that stops heartbeating drops out of every gateway at once.
        let ready_nodes: HashMap<&str, &str> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready && n.name != *me)
            .map(|n| (n.name.as_str(), n.gateway.as_str()))
            .collect();
        let mut remote: HashMap<AppKey, Vec<RemoteReplica>> = HashMap::new();
        for r in replicas.iter().filter(|r| r.phase == Phase::Ready) {
            if let Some(gw) = r.node.as_deref().and_then(|n| ready_nodes.get(n)) {
                remote
                    .entry(r.app.clone())
                    .or_default()
                    .push(RemoteReplica {
                        replica: r.id.clone(),
                        revision: r.revision,
                        gateway: gw.to_string(),
                    });
            }
        }
        self.inner.gateway.set_remote_endpoints(remote);
        // Canary steps split each app's traffic by weight between two revisions.
        let splits = rollouts
            .iter()
            .filter_map(|s| {
                let app = apps.iter().find(|a| a.spec.key() == s.app)?;
                let (canary, weight) = s.split(&app.spec.rollout)?;
                Some((s.app.clone(), Split { canary, weight }))
            })
            .collect();
        self.inner.gateway.set_splits(splits);

        let mine: HashMap<&str, &Replica> = replicas
            .iter()
            .filter(|r| r.node.as_deref() == Some(me.as_str()))
            .map(|r| (r.id.as_str(), r))
            .collect();
        let mut running = self.inner.running.lock().expect("agent lock");
        running.retain(|id, r| {
            if mine.contains_key(id.as_str()) {
                return true;
            }
            self.inner.gateway.remove_endpoint(&r.app, id);
            r.task.abort();
            tracing::info!(replica = %id, "stopped");
            false
        });
        for (id, replica) in mine {
            if let Some(r) = running.get(id) {
                let last = r.status.lock().expect("status lock").clone();
                let stale = last.is_some_and(|rep| {
                    rep.phase != replica.phase
                        || rep.message != replica.message
                        || rep.exit_code != replica.exit_code
                        || rep.restarts != replica.restarts
                });
                if stale {
                    // Send what is current when the resend runs, never an older report.
                    let (link, status) = (self.inner.link.clone(), r.status.clone());
                    tokio::spawn(async move {
                        let report = status.lock().expect("status lock").clone();
                        if let Some(report) = report
                            && let Err(e) = link.report(report).await
                        {
                            tracing::warn!(error = %e, "status resend failed");
                        }
                    });
                }
                continue;
            }
            if replica.phase.is_terminal() {
                continue;
            }
            let Some(revision) = revisions
                .iter()
                .find(|r| r.app == replica.app && r.number == replica.revision)
                .cloned()
            else {
                continue;
            };
            // Whether giving up on it here can help: some other node its app may use
            // could take it. Placed on a node it was to avoid, it had nowhere else.
            let selector = apps
                .iter()
                .find(|a| a.spec.key() == replica.app)
                .map(|a| &a.spec.placement.node_selector);
            let may_move = !replica.avoid.contains(me)
                && nodes.iter().any(|n| {
                    n.name != *me
                        && n.state == NodeState::Ready
                        && n.schedulable
                        && !replica.avoid.contains(&n.name)
                        && selector
                            .is_none_or(|sel| sel.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
                });
            let logs = LogSink::new(LOG_LINES);
            let span = tracing::info_span!("replica", id = %id, app = %replica.app);
            let task = tokio::spawn(
                self.clone()
                    .start(replica.clone(), revision, logs.clone(), may_move)
                    .instrument(span),
            );
            running.insert(
                id.to_string(),
                Running {
                    app: replica.app.clone(),
                    logs,
                    task,
                    status: Arc::new(Mutex::new(None)),
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
        self.report_status(replica, phase, message, exit_code, 0, None)
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
        if let Some(r) = self
            .inner
            .running
            .lock()
            .expect("agent lock")
            .get(&replica.id)
        {
            *r.status.lock().expect("status lock") = Some(report.clone());
        }
        if let Err(e) = self.inner.link.report(report).await {
            tracing::warn!(error = %e, "status report failed; will resend");
        }
    }

    /// Loads and starts one replica, then reports how it went.
    async fn start(self, replica: Replica, revision: Revision, logs: LogSink, may_move: bool) {
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
        let config = InstanceConfig {
            env: t
                .env
                .iter()
                .map(|(k, v)| (k.clone(), self.downward(&replica, v)))
                .collect(),
            args: t.component.args.clone(),
            memory_limit: t.resources.memory_bytes,
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
                .outbound(&replica.app.namespace, t.outbound.clone()),
            incidents: Some(self.incident_hook(&replica)),
        };
        match t.component.kind {
            Kind::Http => match self.inner.runtime.http_service(&loaded, config.clone()) {
                Ok(service) if t.health.is_default() => {
                    if self.serve(&replica, t, service) {
                        self.report(&replica, Phase::Ready, None, None).await;
                    }
                }
                Ok(service) => {
                    self.supervise(&replica, t, &loaded, config, service, &logs, may_move)
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
    fn incident_hook(&self, replica: &Replica) -> IncidentHook {
        let link = self.inner.link.clone();
        let (app, id, node) = (
            replica.app.clone(),
            replica.id.clone(),
            self.inner.config.node.clone(),
        );
        let last: Mutex<HashMap<IncidentKind, (std::time::Instant, u32)>> = Mutex::default();
        Arc::new(move |incident: Incident| {
            let message = {
                let mut last = last.lock().expect("incident lock");
                match last.get_mut(&incident.kind) {
                    Some((at, more)) if at.elapsed() < INCIDENT_PERIOD => {
                        *more += 1;
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
                        last.insert(incident.kind, (std::time::Instant::now(), 0));
                        incident.message
                    }
                }
            };
            let report = ReplicaIncident {
                app: app.clone(),
                replica: id.clone(),
                node: node.clone(),
                reason: incident.kind.reason().to_string(),
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

    /// Runs an http replica's probes for its life: readiness decides whether
    /// it is in the gateway, liveness restarts it (a fresh instance pre-image)
    /// when it keeps failing. After [`LIVENESS_RESTARTS`] restarts that did not
    /// help, it gives the replica up to be replaced elsewhere if `may_move`;
    /// otherwise it keeps restarting it here, with growing delays.
    #[allow(clippy::too_many_arguments)]
    async fn supervise(
        &self,
        replica: &Replica,
        template: &Template,
        loaded: &shoal_runtime::Loaded,
        config: InstanceConfig,
        mut service: HttpService,
        logs: &LogSink,
        may_move: bool,
    ) {
        let health = &template.health;
        let mut restarts = 0u32;
        // Liveness restarts since the replica last stayed live for BACKOFF_RESET.
        let mut recent_restarts = 0u32;
        let mut last_restart = tokio::time::Instant::now();
        let mut backoff = Backoff::default();
        let mut ready = false;
        let (mut passes, mut failures, mut live_failures) = (0u32, 0u32, 0u32);
        match &health.readiness {
            None => {
                ready = self.serve(replica, template, service.clone());
                self.report_status(replica, Phase::Ready, None, None, 0, None)
                    .await;
            }
            Some(r) => {
                let message = format!("waiting for readiness probe {}", r.path);
                self.report_status(replica, Phase::Starting, Some(message), None, 0, None)
                    .await;
            }
        }
        let period = [&health.readiness, &health.liveness]
            .into_iter()
            .flatten()
            .map(|p| p.period_ms)
            .min()
            .unwrap_or(1000);
        let mut tick = tokio::time::interval(Duration::from_millis(period));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(r) = &health.readiness {
                match probe(&service, r).await {
                    Ok(()) => (passes, failures) = (passes + 1, 0),
                    Err(why) => {
                        (passes, failures) = (0, failures + 1);
                        if ready && failures >= r.failure_threshold {
                            ready = false;
                            self.inner
                                .gateway
                                .remove_endpoint(&replica.app, &replica.id);
                            let message = format!("readiness probe failed {failures} times: {why}");
                            logs.push_system(&message);
                            self.report_status(
                                replica,
                                Phase::Unready,
                                Some(message),
                                None,
                                restarts,
                                None,
                            )
                            .await;
                        }
                    }
                }
                if !ready && passes >= r.success_threshold {
                    ready = self.serve(replica, template, service.clone());
                    self.report_status(replica, Phase::Ready, None, None, restarts, None)
                        .await;
                }
            }
            if let Some(l) = &health.liveness {
                let why = match probe(&service, l).await {
                    Ok(()) => {
                        live_failures = 0;
                        continue;
                    }
                    Err(why) => why,
                };
                live_failures += 1;
                if live_failures >= l.failure_threshold {
                    if last_restart.elapsed() >= BACKOFF_RESET {
                        recent_restarts = 0;
                    }
                    if recent_restarts >= LIVENESS_RESTARTS {
                        self.inner
                            .gateway
                            .remove_endpoint(&replica.app, &replica.id);
                        // Given up to be replaced elsewhere, or (nowhere else to go)
                        // restarted here ever more slowly.
                        let (phase, reason, delay, message) = if may_move {
                            let message = format!(
                                "liveness probe failed {live_failures} times ({why}) after {recent_restarts} restarts; giving up on this node"
                            );
                            (Phase::Failed, Some(LIVENESS_FAILED), None, message)
                        } else {
                            let delay = backoff.after(last_restart.elapsed());
                            let message = format!(
                                "liveness probe failed {live_failures} times ({why}); no other node to move to, restarting in {delay:?}"
                            );
                            (Phase::Unready, None, Some(delay), message)
                        };
                        logs.push_system(&message);
                        self.report_status(replica, phase, Some(message), None, restarts, reason)
                            .await;
                        match delay {
                            Some(delay) => tokio::time::sleep(delay).await,
                            None => return,
                        }
                    }
                    let message =
                        format!("liveness probe failed {live_failures} times ({why}); restarted");
                    logs.push_system(&message);
                    self.inner
                        .gateway
                        .remove_endpoint(&replica.app, &replica.id);
                    match self.inner.runtime.http_service(loaded, config.clone()) {
                        Ok(fresh) => service = fresh,
                        Err(e) => {
                            self.report_status(
                                replica,
                                Phase::Failed,
                                Some(e.to_string()),
                                None,
                                restarts,
                                None,
                            )
                            .await;
                            return;
                        }
                    }
                    restarts += 1;
                    recent_restarts += 1;
                    last_restart = tokio::time::Instant::now();
                    (live_failures, passes, failures) = (0, 0, 0);
                    ready = health.readiness.is_none()
                        && self.serve(replica, template, service.clone());
                    let phase = if ready { Phase::Ready } else { Phase::Unready };
                    self.report_status(replica, phase, Some(message), None, restarts, None)
                        .await;
                }
            }
        }
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
        let mut restarts = 0u32;
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
            logs.push_system(format!("exited: {status}"));
            let retry = match (replica.kind, &template.job) {
                (Kind::Daemon, _) => true,
                (_, _) if status.success() => false,
                (_, Some(job)) => job.restart == Restart::OnFailure && restarts < job.retries,
                _ => false,
            };
            if !retry {
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
            let message = format!("{status}; restart {restarts} in {delay:?}");
            logs.push_system(&message);
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

/// Restart delays of a command that keeps exiting: [`BACKOFF_START`] doubling up
/// to [`BACKOFF_MAX`], and back to the start after a run of [`BACKOFF_RESET`].
/// Time is an argument, so the schedule is tested without waiting for it.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// The delay before starting again a run that lasted `ran`.
    fn after(&mut self, ran: Duration) -> Duration {
        if ran >= BACKOFF_RESET {
            self.next = BACKOFF_START;
        }
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

impl Agent {
    /// An env value that names a fact about the replica (`$(node)`, `$(replica)`,
    /// `$(revision)`, `$(app)`, `$(namespace)`) becomes that fact, as Kubernetes'
    /// downward API does; only what the spec asks for reaches the guest.
    fn downward(&self, replica: &Replica, value: &str) -> String {
        match value {
            "$(node)" => self.inner.config.node.clone(),
            "$(replica)" => replica.id.clone(),
            "$(revision)" => replica.revision.to_string(),
            "$(app)" => replica.app.name.clone(),
            "$(namespace)" => replica.app.namespace.clone(),
            other => other.to_string(),
        }
    }
}

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
    match tokio::time::timeout(timeout, service.handle(request)).await {
        Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => Ok(()),
        Ok(resp) => Err(format!("{} answered {}", probe.path, resp.status())),
        Err(_) => Err(format!("{} timed out after {timeout:?}", probe.path)),
    }
}

impl LogSource for Agent {
    fn logs(&self, app: &AppKey) -> Vec<(String, LogSink)> {
        let running = self.inner.running.lock().expect("agent lock");
        let mut out: Vec<(String, LogSink)> = running
            .iter()
            .filter(|(_, r)| &r.app == app)
            .map(|(id, r)| (id.clone(), r.logs.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_stable_run() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(5);
        let delays: Vec<u64> = (0..12).map(|_| b.after(quick).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        // A run just short of the reset period keeps the cap; a long enough one starts over.
        assert_eq!(b.after(BACKOFF_RESET - quick), BACKOFF_MAX);
        assert_eq!(b.after(BACKOFF_RESET), BACKOFF_START);
        assert_eq!(b.after(quick), BACKOFF_START * 2);
    }
}
