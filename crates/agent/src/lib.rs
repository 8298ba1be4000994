//! The node agent. It watches what is placed on its node, makes the runtime
//! match (load, start, stop), keeps its gateway's routes and endpoints true,
//! and reports every replica's phase to the control plane. It never writes
//! cluster state itself: reports go through [`ControlPlane`]'s node-facing
//! methods.

use shoal_control::{ControlPlane, LogSource, ReplicaReport, now_ms};
use shoal_core::spec::AppKey;
use shoal_core::{App, Capacity, Kind, Node, NodeState, Phase, Replica, Revision};
use shoal_gateway::{Endpoint, Gateway};
use shoal_runtime::{ExitStatus, InstanceConfig, LogSink, Runtime};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Lines of output kept per replica.
const LOG_LINES: usize = 5000;

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
    control: ControlPlane,
    runtime: Runtime,
    gateway: Gateway,
    running: Mutex<HashMap<String, Running>>,
}

/// A replica this node runs.
struct Running {
    app: AppKey,
    logs: LogSink,
    task: JoinHandle<()>,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        control: ControlPlane,
        runtime: Runtime,
        gateway: Gateway,
    ) -> Self {
        Agent {
            inner: Arc::new(Inner {
                config,
                control,
                runtime,
                gateway,
                running: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Registers the node, then keeps the node in line with the cluster
    /// state until the process ends.
    pub async fn run(self) {
        let node = Node {
            name: self.inner.config.node.clone(),
            gateway: self.inner.config.gateway_addr.clone(),
            capacity: self.inner.config.capacity.clone(),
            labels: self.inner.config.labels.clone(),
            state: NodeState::Ready,
            schedulable: true,
            last_heartbeat: now_ms(),
            joined_at: now_ms(),
        };
        if let Err(e) = self.inner.control.register_node(node) {
            tracing::error!(error = %e, "node registration failed");
            return;
        }
        tokio::spawn(self.clone().heartbeats());
        let store = self.inner.control.store().clone();
        loop {
            let from = store.revision() + 1;
            if let Err(e) = self.sync() {
                tracing::warn!(error = %e, "agent sync failed; retrying");
            }
            let mut watcher = match store.watch("/", from) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "agent cannot watch; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Re-sync on every change to what the agent acts on.
            loop {
                match watcher.next().await {
                    Some(Ok(ev)) => {
                        let k = &ev.kv.key;
                        let relevant = k.starts_with("/apps/")
                            || k.starts_with("/replicas/")
                            || k.starts_with("/revisions/");
                        if relevant && let Err(e) = self.sync() {
                            tracing::warn!(error = %e, "agent sync failed");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "agent watch broke; relisting");
                        break;
                    }
                    None => return,
                }
            }
        }
    }

    async fn heartbeats(self) {
        let mut tick = tokio::time::interval(self.inner.config.heartbeat);
        loop {
            tick.tick().await;
            let control = self.inner.control.clone();
            let name = self.inner.config.node.clone();
            let result = tokio::task::spawn_blocking(move || control.heartbeat(&name)).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    /// Level-triggered: compares what is placed here with what runs, and fixes the difference.
    fn sync(&self) -> Result<(), shoal_control::ApiError> {
        let shoal_control::Snapshot {
            apps,
            revisions,
            replicas,
            ..
        } = self.inner.control.snapshot()?;
        let me = &self.inner.config.node;

        let routes = apps
            .iter()
            .filter_map(|a: &App| a.spec.http.as_ref().map(|h| (a.spec.key(), h)))
            .flat_map(|(key, h)| h.routes.iter().map(move |r| (r.clone(), key.clone())))
            .collect();
        self.inner.gateway.set_routes(routes);

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
            if running.contains_key(id) || replica.phase.is_terminal() {
                continue;
            }
            let Some(revision) = revisions
                .iter()
                .find(|r| r.app == replica.app && r.number == replica.revision)
                .cloned()
            else {
                continue;
            };
            let logs = LogSink::new(LOG_LINES);
            let span = tracing::info_span!("replica", id = %id, app = %replica.app);
            let task = tokio::spawn(
                self.clone()
                    .start(replica.clone(), revision, logs.clone())
                    .instrument(span),
            );
            running.insert(
                id.to_string(),
                Running {
                    app: replica.app.clone(),
                    logs,
                    task,
                },
            );
        }
        Ok(())
    }

    async fn report(
        &self,
        replica: &Replica,
        phase: Phase,
        message: Option<String>,
        exit_code: Option<i32>,
    ) {
        let report = ReplicaReport {
            app: replica.app.clone(),
            replica: replica.id.clone(),
            node: self.inner.config.node.clone(),
            phase,
            message,
            exit_code,
        };
        let control = self.inner.control.clone();
        match tokio::task::spawn_blocking(move || control.report_replica(report)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "status report failed"),
            Err(e) => tracing::warn!(error = %e, "status report task failed"),
        }
    }

    /// Loads and starts one replica, then reports how it went.
    async fn start(self, replica: Replica, revision: Revision, logs: LogSink) {
        self.report(&replica, Phase::Starting, None, None).await;
        let t = &revision.template;
        let path = self.inner.control.module_path(&t.component.digest);
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
            env: t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            args: t.component.args.clone(),
            memory_limit: t.resources.memory_bytes,
            timeout: (t.timeout_ms > 0).then(|| Duration::from_millis(t.timeout_ms)),
            logs: logs.clone(),
            ..InstanceConfig::default()
        };
        match t.component.kind {
            Kind::Http => match self.inner.runtime.http_service(&loaded, config) {
                Ok(service) => {
                    let endpoint =
                        Endpoint::local(replica.id.clone(), service, t.resources.max_concurrency);
                    self.inner
                        .gateway
                        .add_endpoint(replica.app.clone(), endpoint);
                    self.report(&replica, Phase::Ready, None, None).await;
                }
                Err(e) => {
                    logs.push_system(e.to_string());
                    self.report(&replica, Phase::Failed, Some(e.to_string()), None)
                        .await;
                }
            },
            Kind::Job | Kind::Daemon => match self.inner.runtime.command(&loaded, config) {
                Ok(command) => {
                    self.report(&replica, Phase::Running, None, None).await;
                    let status = command.run().await;
                    let (phase, code) = match &status {
                        ExitStatus::Exited(0) => (Phase::Succeeded, Some(0)),
                        ExitStatus::Exited(n) => (Phase::Failed, Some(*n)),
                        _ => (Phase::Failed, None),
                    };
                    logs.push_system(format!("exited: {status}"));
                    self.report(&replica, phase, Some(status.to_string()), code)
                        .await;
                }
                Err(e) => {
                    logs.push_system(e.to_string());
                    self.report(&replica, Phase::Failed, Some(e.to_string()), None)
                        .await;
                }
            },
        }
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
