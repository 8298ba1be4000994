//! Node pools (`shoal pool`): workers the control plane starts and stops itself, as a
//! cluster autoscaler does. Every second the provisioner ([`ControlPlane::run_pools`])
//! asks [`shoal_scheduler::pools::decide`] what each pool needs, stores the pool's new
//! members with events saying why, and only then acts: it runs the pool's provider to
//! start or stop a worker, drains a node to retire it, and deletes a stopped one.
//!
//! A pool without a provider runs its workers as local `shoal node join` processes of
//! this control plane, each with its own port and data dir under `pools/` in the data
//! dir. They stop with the control plane (a local pool is for one machine); a pool whose
//! nodes are gone starts new ones, as it does for any node that never joins.

use crate::error::ControlError;
use crate::state::{ControlPlane, Fence, blocking, encode};
use shoal_api::PoolWrite;
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::{App, EventType, Kind, Node, POOL_LABEL, Pool, Replica, Revision, Volume};
use shoal_scheduler::Request;
use shoal_scheduler::pools::{Action, Facts, Placed, Waiting, assign, decide, movable};
use shoal_store::{Op, Txn};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// How long a provider's `start` or `stop` may run.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a pool's workers join, and where local ones live.
#[derive(Debug, Clone)]
pub struct PoolHost {
    /// This server's URL, as `shoal node join` takes it; workers are given the other
    /// servers sharing its store after it ([`ControlPlane::join_urls`]).
    pub join_url: String,
    pub token_file: PathBuf,
    /// The `shoal` binary local workers run.
    pub exe: PathBuf,
    /// Local workers' data dirs and logs.
    pub dir: PathBuf,
}

impl ControlPlane {
    /// Creates pool `name` or replaces its spec, as `write` says.
    pub fn put_pool(&self, name: &str, write: PoolWrite) -> Result<Pool, ControlError> {
        let bad = |m: String| ControlError::invalid(ErrorCode::InvalidSpec, m);
        shoal_core::validate_name(name).map_err(|e| bad(format!("pool name: {e}")))?;
        write
            .spec
            .validate()
            .map_err(|m| bad(format!("pool {name}: {m}")))?;
        let key = keys::pool(name);
        let (pool, txn, verb) = match (self.get::<Pool>(&key)?, write.create) {
            (Some(_), true) => {
                return Err(ControlError::conflict(format!(
                    "pool {name} exists: change it with `shoal pool set`"
                )));
            }
            (None, false) => {
                return Err(ControlError::not_found(format!(
                    "pool {name} does not exist: create it with `shoal pool create`"
                )));
            }
            (None, true) => {
                let pool = Pool {
                    name: name.into(),
                    spec: write.spec,
                    members: BTreeMap::new(),
                    next: 1,
                    created_at: self.now(),
                    node_size: None,
                    start_failures: 0,
                    start_failed_at: None,
                    workers_since: self.now(),
                };
                (pool, Txn::new().when_absent(key.clone()), "created")
            }
            (Some((mut pool, at)), false) => {
                // Other workers may be of another size: the last one's is no guide.
                let (old, new) = (&pool.spec, &write.spec);
                if old.provider != new.provider || old.node_args != new.node_args {
                    pool.node_size = None;
                    pool.workers_since = self.now();
                }
                pool.spec = write.spec;
                (
                    pool,
                    Txn::new().when_mod_revision(key.clone(), at),
                    "changed",
                )
            }
        };
        let s = &pool.spec;
        let txn = txn.then(Op::put(key, encode(&pool))).then(self.event_op(
            EventType::Normal,
            "PoolChanged",
            format!("pool/{name}"),
            None,
            format!("pool {name} {verb}: {} to {} nodes", s.min, s.max),
        ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "pool {name} changed meanwhile; try again"
            )));
        }
        Ok(pool)
    }

    pub fn pools(&self) -> Result<Vec<Pool>, ControlError> {
        self.list(&keys::POOLS)
    }

    pub fn pool(&self, name: &str) -> Result<Pool, ControlError> {
        self.get::<Pool>(&keys::pool(name))?
            .map(|(p, _)| p)
            .ok_or_else(|| ControlError::not_found(format!("pool {name} does not exist")))
    }

    /// Deletes a pool that runs no node: a pool with nodes is scaled to zero first, so
    /// that its nodes are drained, not cut off.
    pub fn delete_pool(&self, name: &str) -> Result<(), ControlError> {
        let key = keys::pool(name);
        let Some((pool, at)) = self.get::<Pool>(&key)? else {
            return Err(ControlError::not_found(format!(
                "pool {name} does not exist"
            )));
        };
        if !pool.members.is_empty() {
            // A schedule window's bounds outrank `--min 0 --max 0`: only a spec without
            // windows lets the pool empty for good.
            let how = match pool.spec.schedule.is_empty() {
                true => format!("`shoal pool set {name} --min 0 --max 0` first"),
                false => format!(
                    "apply it with min = 0, max = 0 and no [[schedule]] windows first (its windows' bounds outrank `shoal pool set {name} --min 0 --max 0`)"
                ),
            };
            return Err(ControlError::conflict(format!(
                "pool {name} runs {}: {how}",
                shoal_core::counted(pool.members.len() as u64, "node")
            )));
        }
        let txn = Txn::new()
            .when_mod_revision(key.clone(), at)
            .then(Op::delete(key))
            .then(self.event_op(
                EventType::Normal,
                "PoolDeleted",
                format!("pool/{name}"),
                None,
                format!("pool {name} deleted"),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "pool {name} changed meanwhile; try again"
            )));
        }
        Ok(())
    }

    /// One decision per pool, stored with its events; returns what to do for the pools
    /// whose write went through.
    fn pool_pass(
        &self,
        fence: &Fence,
        workers: &LocalWorkers,
    ) -> Result<Vec<(Pool, Vec<Action>)>, ControlError> {
        let (kvs, _) = self.inner.store.range(keys::POOLS.as_str())?;
        if kvs.is_empty() {
            return Ok(Vec::new());
        }
        let nodes: BTreeMap<String, Node> = self
            .list(&keys::NODES)?
            .into_iter()
            .map(|n: Node| (n.name.clone(), n))
            .collect();
        let replicas: Vec<Replica> = self.list(&keys::REPLICAS)?;
        let apps: HashMap<_, _> = self
            .list::<App>(&keys::APPS)?
            .into_iter()
            .map(|a| (a.spec.key(), a.spec))
            .collect();
        let none = BTreeMap::new();
        let mut active: BTreeMap<String, usize> = BTreeMap::new();
        let mut waiting = Vec::new();
        let mut why = None;
        let mut bound: Option<HashSet<(String, String)>> = None;
        // Per app and revision: a thousand waiting replicas of one are one read.
        let mut mounting: HashMap<(shoal_core::spec::AppKey, u64), bool> = HashMap::new();
        for r in &replicas {
            match &r.node {
                Some(n) if r.is_active() => *active.entry(n.clone()).or_default() += 1,
                None if r.message.is_some() && !r.phase.is_terminal() => {
                    // Read once, and only when something waits.
                    let bound = match &mut bound {
                        Some(b) => b,
                        None => bound.insert(
                            self.list::<Volume>(&keys::VOLUMES)?
                                .into_iter()
                                .filter(|v| v.node.is_some())
                                .map(|v| (v.namespace, v.name))
                                .collect(),
                        ),
                    };
                    let pinned = match mounting.get(&(r.app.clone(), r.revision)) {
                        Some(&pinned) => pinned,
                        None => {
                            let pinned = self.mounts_bound(r, bound)?;
                            mounting.insert((r.app.clone(), r.revision), pinned);
                            pinned
                        }
                    };
                    if pinned {
                        continue;
                    }
                    waiting.push(Waiting {
                        asks: shoal_core::Capacity::of(&r.resources),
                        instance_memory: r.resources.limits.memory_bytes,
                        node_selector: apps
                            .get(&r.app)
                            .map_or(&none, |a| &a.placement.node_selector),
                    });
                    why = why.or(r.message.as_deref());
                }
                _ => {}
            }
        }
        let pools: Vec<Pool> = kvs
            .iter()
            .map(crate::state::decode)
            .collect::<Result<_, _>>()?;
        let now = self.now();
        let mut pending = assign(&pools, &nodes, &waiting, now);
        let placed: Vec<Placed<'_>> = replicas
            .iter()
            .filter(|r| r.is_active())
            .filter_map(|r| {
                let (node, app) = (r.node.as_deref()?, apps.get(&r.app)?);
                Some(Placed {
                    node,
                    app: &r.app,
                    request: Request::new(&r.resources, &app.placement),
                    pinned: r.kind == Kind::Job || !app.volumes.is_empty(),
                })
            })
            .collect();
        let members = pools
            .iter()
            .flat_map(|p| p.members.iter())
            .filter(|(_, m)| m.live())
            .map(|(n, _)| n.as_str());
        let movable = movable(&nodes, &placed, members, self.config().strategy);
        // Heard from within the node grace: a node the controller keeps Ready while most
        // nodes are silent (it holds off marking them, taking the silence for its own) is
        // not, when it is a local worker an earlier control plane started. Those stopped
        // with it, and when they are most of the cluster they would hold that brake on.
        let leases: HashMap<String, shoal_core::Millis> = self
            .list::<shoal_core::Lease>(&keys::LEASES)?
            .into_iter()
            .map(|l| (l.node, l.renewed_at))
            .collect();
        let grace = self.config().node_grace.as_millis() as u64;
        let gone: BTreeSet<String> = pools
            .iter()
            .filter(|p| p.spec.provider.is_none())
            .flat_map(|p| p.members.iter())
            .filter(|(name, m)| {
                let ready = nodes.get(name.as_str()).is_some_and(|n| {
                    n.state == shoal_core::NodeState::Ready
                        && leases
                            .get(name.as_str())
                            .is_some_and(|at| now.saturating_sub(*at) <= grace)
                });
                m.live() && workers.gone(name, m.started_at, ready)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut out = Vec::new();
        for (kv, pool) in kvs.iter().zip(pools) {
            let facts = Facts {
                nodes: &nodes,
                active: &active,
                pending: &pending.remove(&pool.name).unwrap_or_default(),
                pending_why: why,
                movable: &movable,
                gone: &gone,
                busy: &workers.busy,
            };
            let (next, actions) = decide(&pool, &facts, now);
            if next == pool && actions.is_empty() {
                continue;
            }
            let mut txn = Txn::new()
                .when_mod_revision(kv.key.clone(), kv.mod_revision)
                .then(Op::put(kv.key.clone(), encode(&next)));
            for action in &actions {
                let (kind, reason, message) = match action {
                    Action::Start { node, why } => (
                        EventType::Normal,
                        "PoolNodeStarting",
                        format!("pool {}: starting node {node}: {why}", pool.name),
                    ),
                    Action::Drain { node, why } => (
                        EventType::Normal,
                        "PoolNodeDraining",
                        format!("pool {}: draining node {node} to stop it: {why}", pool.name),
                    ),
                    Action::Stop { node, why, .. } => (
                        EventType::Normal,
                        "PoolNodeStopped",
                        format!("pool {}: stopping node {node}: {why}", pool.name),
                    ),
                };
                txn = txn.then(self.event_op(
                    kind,
                    reason,
                    format!("pool/{}", pool.name),
                    None,
                    message,
                ));
            }
            if self.inner.store.txn(fence.guard(txn))?.succeeded {
                out.push((next, actions));
            }
        }
        Ok(out)
    }

    /// Whether replica `r` mounts a volume bound to a node (`bound`): it goes there or
    /// nowhere, so no new node would take it.
    fn mounts_bound(
        &self,
        r: &Replica,
        bound: &HashSet<(String, String)>,
    ) -> Result<bool, ControlError> {
        if bound.is_empty() {
            return Ok(false);
        }
        let Some((revision, _)) = self.get::<Revision>(&keys::revision(&r.app, r.revision))? else {
            return Ok(false);
        };
        Ok(revision
            .template
            .volumes
            .iter()
            .any(|v| bound.contains(&(r.app.namespace.clone(), v.name.clone()))))
    }

    /// Where a new worker joins, as `shoal node join` takes it: `own` (this server's URL),
    /// then every other server running on a shared store, so the worker outlives this one.
    async fn join_urls_now(&self, own: &str) -> String {
        let (cp, mine) = (self.clone(), own.to_string());
        blocking(move || Ok(cp.join_urls(&mine)))
            .await
            .unwrap_or_else(|_| own.to_string())
    }

    /// [`Self::join_urls_now`], a store read.
    fn join_urls(&self, own: &str) -> String {
        let mut urls = vec![own.to_string()];
        match self.servers_running() {
            Ok(running) => urls.extend(running.into_iter().filter(|url| url != own)),
            Err(e) => {
                tracing::warn!(error = %e, "node pools: cannot list the other servers; a worker joins this one alone");
            }
        }
        urls.join(",")
    }

    /// The provisioner: a pass every second for as long as the control plane runs. A
    /// provider's `start` or `stop` (and a local worker's stop) runs in a task of its own,
    /// so one slow provider holds neither the passes nor the other pools.
    pub async fn run_pools(self, host: PoolHost) {
        let mut local: HashMap<String, Child> = HashMap::new();
        let mut running: JoinSet<()> = JoinSet::new();
        // The member each task works for, so that one that panicked frees it too.
        let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
        let since = self.now();
        // Started when this server won the leadership, if it shares its store: a deposed
        // server's pass starts no worker.
        let fence = self.fence();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            while let Some(done) = running.try_join_next_with_id() {
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                let node = busy.remove(&id);
                if let Err(e) = done {
                    tracing::warn!(error = %e, ?node, "node pools: a provider task failed");
                }
            }
            let mut exited = HashSet::new();
            local.retain(|name, child| match child.try_wait() {
                Ok(None) => true,
                _ => {
                    exited.insert(name.clone());
                    false
                }
            });
            let workers = LocalWorkers {
                running: local.keys().cloned().collect(),
                exited,
                since,
                busy: busy.values().cloned().collect(),
            };
            let (cp, pass_fence) = (self.clone(), fence.clone());
            let decided = match blocking(move || cp.pool_pass(&pass_fence, &workers)).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "node pools: pass failed");
                    continue;
                }
            };
            for (pool, actions) in decided {
                for action in actions {
                    self.act(
                        &host,
                        &fence,
                        &pool,
                        action,
                        &mut local,
                        &mut running,
                        &mut busy,
                    )
                    .await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        host: &PoolHost,
        fence: &Fence,
        pool: &Pool,
        action: Action,
        local: &mut HashMap<String, Child>,
        running: &mut JoinSet<()>,
        busy: &mut HashMap<tokio::task::Id, String>,
    ) {
        match action {
            Action::Start { node, .. } => {
                // The token file the worker reads must hold the token in force, which another
                // server sharing the store may have rotated.
                let cp = self.clone();
                if let Err(e) = blocking(move || cp.join_token()).await {
                    tracing::warn!(error = %e, "node pools: cannot read the join token in force");
                }
                let join_url = self.join_urls_now(&host.join_url).await;
                match &pool.spec.provider {
                    None => match start_local(host, &join_url, pool, &node) {
                        Ok(child) => {
                            local.insert(node, child);
                        }
                        Err(why) => self.provider_failed(pool, &node, "start", why).await,
                    },
                    Some(command) => {
                        let (cp, host, pool, command, fence) = (
                            self.clone(),
                            host.clone(),
                            pool.clone(),
                            command.clone(),
                            fence.clone(),
                        );
                        let task = node.clone();
                        let handle = running.spawn(async move {
                            if let Err(why) =
                                run_provider(&host, &join_url, &pool, &command, "start", &node)
                                    .await
                            {
                                cp.provider_failed(&pool, &node, "start", why).await;
                            }
                            cp.start_returned(&fence, &pool.name, &node).await;
                        });
                        busy.insert(handle.id(), task);
                    }
                }
            }
            Action::Drain { node, .. } => {
                let cp = self.clone();
                let drained =
                    blocking(move || cp.set_node_scheduling(&node, shoal_api::NodeAction::Drain))
                        .await;
                if let Err(e) = drained
                    && !matches!(e, ControlError::NotFound(_))
                {
                    tracing::warn!(pool = %pool.name, error = %e, "node pools: cannot drain");
                }
            }
            Action::Stop { node, provider, .. } => {
                // A local worker of this control plane is stopped as one, whatever the pool's
                // provider has become since.
                let child = local.remove(&node);
                let (cp, host, pool, fence) =
                    (self.clone(), host.clone(), pool.clone(), fence.clone());
                let task = node.clone();
                let handle = running.spawn(async move {
                    // Cordoned and drained first: a node that comes back (its stop failed,
                    // or it was only unreachable) takes no replica to be cut off with it.
                    let name = node.clone();
                    let drain = cp.clone();
                    let _ = blocking(move || {
                        drain.set_node_scheduling(&name, shoal_api::NodeAction::Drain)
                    })
                    .await;
                    let stopped = match (child, &provider) {
                        (None, Some(command)) => {
                            let join_url = cp.join_urls_now(&host.join_url).await;
                            run_provider(&host, &join_url, &pool, command, "stop", &node).await
                        }
                        (child, _) => {
                            if let Some(child) = child {
                                stop_local(child).await;
                            }
                            let _ = std::fs::remove_dir_all(host.dir.join(&pool.name).join(&node));
                            Ok(())
                        }
                    };
                    match stopped {
                        Ok(()) => {
                            cp.forget_node(&pool, &node).await;
                            if let Err(e) = cp.stop_done(&fence, &pool.name, &node, false).await {
                                tracing::warn!(%node, error = %e, "node pools: a stopped member stays until a pass stops it again");
                            }
                        }
                        Err(why) => {
                            let kept = cp.stop_done(&fence, &pool.name, &node, true).await;
                            let why = match kept {
                                Ok(Some(wait)) => format!(
                                    "{why}; trying again in {} s (`shoal node delete {node}` \
                                     forgets it)",
                                    wait / 1000
                                ),
                                Ok(None) => format!("{why}; it never joined, so it is forgotten"),
                                Err(e) => format!("{why}; tried again soon (not recorded: {e})"),
                            };
                            cp.provider_failed(&pool, &node, "stop", why).await;
                        }
                    }
                });
                busy.insert(handle.id(), task);
            }
        }
    }

    /// Deletes the node of a worker that was stopped.
    async fn forget_node(&self, pool: &Pool, node: &str) {
        let cp = self.clone();
        let name = node.to_string();
        if let Err(e) = blocking(move || cp.delete_node(&name)).await
            && !matches!(e, ControlError::NotFound(_))
        {
            tracing::warn!(pool = %pool.name, %node, error = %e, "node pools: cannot delete a stopped node");
        }
    }

    /// Records how member `node` of pool `name` came out of its stop. Done (not `failed`):
    /// no longer a member. Failed: kept, to be stopped again after a backoff, if it ever
    /// joined (it is a node, or has a node credential): its worker may still run, and would
    /// rejoin as a node no pool manages; one that never did (or was deleted as a node by
    /// hand meanwhile) is forgotten. Returns the backoff of a member kept; an error if it
    /// could not be written (the member is then stopped again at the next pass).
    async fn stop_done(
        &self,
        fence: &Fence,
        name: &str,
        node: &str,
        failed: bool,
    ) -> Result<Option<u64>, ControlError> {
        let (cp, fence, name, node) = (
            self.clone(),
            fence.clone(),
            name.to_string(),
            node.to_string(),
        );
        blocking(move || {
            let joined = failed
                && (cp.get(&keys::node(&node))?.is_some()
                    || cp.get(&keys::credential(&node))?.is_some());
            let now = cp.now();
            let wait = cp.edit_pool(&fence, &name, |pool| {
                if !joined {
                    return pool.members.remove(&node).map(|_| None);
                }
                let member = pool.members.get_mut(&node)?;
                member.stop_failed_at = Some(now);
                member.stop_failures = member.stop_failures.saturating_add(1);
                Some(Some(shoal_scheduler::pools::stop_backoff(
                    member.stop_failures,
                )))
            })?;
            Ok(wait.flatten())
        })
        .await
    }

    /// Records that the provider's `start` of member `node` of pool `name` returned now:
    /// its time to join counts from then, even across a restart of this control plane.
    async fn start_returned(&self, fence: &Fence, name: &str, node: &str) {
        let (cp, fence, pool, member) = (
            self.clone(),
            fence.clone(),
            name.to_string(),
            node.to_string(),
        );
        let recorded = blocking(move || {
            let now = cp.now();
            cp.edit_pool(&fence, &pool, |pool| {
                pool.members.get_mut(&member)?.start_returned_at = Some(now);
                Some(())
            })
        })
        .await;
        if let Err(e) = recorded {
            tracing::warn!(pool = %name, %node, error = %e, "node pools: a node's time to join counts from the decision to start it");
        }
    }

    /// Writes pool `name` as `edit` changes it, unless `edit` returns `None` (nothing to
    /// write) or the pool is gone. A pass may write the pool meanwhile: read again and retried.
    fn edit_pool<T>(
        &self,
        fence: &Fence,
        name: &str,
        mut edit: impl FnMut(&mut Pool) -> Option<T>,
    ) -> Result<Option<T>, ControlError> {
        let key = keys::pool(name);
        for _ in 0..5 {
            let Some((mut pool, at)) = self.get::<Pool>(&key)? else {
                return Ok(None);
            };
            let Some(out) = edit(&mut pool) else {
                return Ok(None);
            };
            let txn = Txn::new()
                .when_mod_revision(key.clone(), at)
                .then(Op::put(key.clone(), encode(&pool)));
            if self.inner.store.txn(fence.guard(txn))?.succeeded {
                return Ok(Some(out));
            }
        }
        Err(ControlError::conflict(format!("pool {name} kept changing")))
    }

    async fn provider_failed(&self, pool: &Pool, node: &str, verb: &str, why: String) {
        tracing::warn!(pool = %pool.name, %node, verb, %why, "node pools: the provider failed");
        let cp = self.clone();
        let (object, message) = (
            format!("pool/{}", pool.name),
            format!("pool {}: could not {verb} node {node}: {why}", pool.name),
        );
        let recorded = blocking(move || {
            let op = cp.event_op(
                EventType::Warning,
                "PoolProviderFailed",
                object,
                None,
                message,
            );
            cp.inner
                .store
                .txn(Txn::new().then(op))
                .map_err(ControlError::from)
        })
        .await;
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "node pools: cannot record an event");
        }
    }
}

/// A local worker: `shoal node join` on a free loopback port (it advertises the port it
/// got), its own data dir and log.
fn start_local(host: &PoolHost, join_url: &str, pool: &Pool, node: &str) -> Result<Child, String> {
    let dir = host.dir.join(&pool.name).join(node);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = std::fs::File::create(dir.with_extension("log"))
        .map_err(|e| format!("{}.log: {e}", dir.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&host.exe);
    cmd.arg("node")
        .arg("join")
        .arg(join_url)
        .arg("--token-file")
        .arg(&host.token_file)
        .args(["--node-name", node])
        .args(["--gateway", "127.0.0.1:0"])
        // The pool drains a worker before it stops it, so nothing is left to move; what is
        // in flight through its gateway still finishes (`stop_local` waits past this).
        .args(["--drain-timeout", "10s"])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--label", &format!("{POOL_LABEL}={}", pool.name)])
        .args(
            pool.spec
                .labels
                .iter()
                .flat_map(|(k, v)| ["--label".to_string(), format!("{k}={v}")]),
        )
        .args(&pool.spec.node_args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            // The worker stops when this control plane does, even on kill -9.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot run {}: {e}", host.exe.display()))
}

/// SIGTERM, then SIGKILL if it is still there after twenty seconds (its drain timeout is
/// ten).
async fn stop_local(mut child: Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The labels a provider's worker is to join with, as `k=v,k=v`: the pool's own first.
fn node_labels(pool: &Pool) -> String {
    std::iter::once(format!("{POOL_LABEL}={}", pool.name))
        .chain(pool.spec.labels.iter().map(|(k, v)| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the provisioner knows of the workers it started, for a pass.
struct LocalWorkers {
    running: HashSet<String>,
    /// Exited since the last pass.
    exited: HashSet<String>,
    /// When this provisioner started: local workers started before then stopped with the
    /// control plane that started them (`PR_SET_PDEATHSIG`), once their node is not Ready.
    since: shoal_core::Millis,
    /// Members whose provider (or local stop) is running now.
    busy: BTreeSet<String>,
}

impl LocalWorkers {
    /// Whether the local worker of member `name`, started at `started_at`, is known not to
    /// run: it exited, or an earlier control plane started it and its node is not Ready
    /// (one still heard may be another server's, on a shared store, that lost the lead).
    /// One this provisioner could not start is not: it is left to the start timeout, so a
    /// failing start is not tried again every second.
    fn gone(&self, name: &str, started_at: shoal_core::Millis, ready: bool) -> bool {
        !self.running.contains(name)
            && ((started_at < self.since && !ready) || self.exited.contains(name))
    }
}

/// Runs `COMMAND verb NODE` through `sh`, with where to join in its environment.
async fn run_provider(
    host: &PoolHost,
    join_url: &str,
    pool: &Pool,
    command: &str,
    verb: &str,
    node: &str,
) -> Result<(), String> {
    let run = Command::new("sh")
        .arg("-c")
        .arg(format!("{command} \"$@\""))
        .args(["provider", verb, node])
        .env("SHOAL_POOL", &pool.name)
        .env("SHOAL_JOIN_URL", join_url)
        .env("SHOAL_JOIN_TOKEN_FILE", &host.token_file)
        .env("SHOAL_NODE_LABELS", node_labels(pool))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PROVIDER_TIMEOUT, run)
        .await
        .map_err(|_| {
            format!(
                "`{command} {verb}` ran past {} s",
                PROVIDER_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
    Err(match tail.trim() {
        "" => format!("`{command} {verb}` exited with {}", out.status),
        tail => format!("`{command} {verb}` exited with {}: {tail}", out.status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{control_plane, replica_of, uploaded};
    use shoal_core::Phase;
    use shoal_core::spec::parse_app;

    /// A local pool of up to five nodes.
    fn spec() -> shoal_core::PoolSpec {
        shoal_core::PoolSpec {
            min: 0,
            max: 5,
            provider: None,
            cooldown_ms: 30_000,
            labels: BTreeMap::new(),
            node_args: Vec::new(),
            schedule: Vec::new(),
        }
    }

    /// A pool that runs nodes is not deleted, and says how to empty it: with a schedule
    /// window, whose bounds outrank `pool set`, by a spec without windows.
    #[test]
    fn a_pool_with_nodes_says_how_to_empty_it_before_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let (_, windowed) = shoal_core::spec::parse_pool(
            "name = \"w\"\nmin = 0\nmax = 2\n[[schedule]]\ncron = \"* * * * *\"\nduration = \"10m\"\nmin = 1\n",
        )
        .unwrap();
        for (spec, advice) in [
            (spec(), "`shoal pool set w --min 0 --max 0` first"),
            (windowed, "no [[schedule]] windows first"),
        ] {
            cp.put_pool("w", PoolWrite { create: true, spec }).unwrap();
            let (mut pool, _) = cp.get::<Pool>(&keys::pool("w")).unwrap().unwrap();
            let member: shoal_core::PoolMember =
                serde_json::from_value(serde_json::json!({"started_at": 0})).unwrap();
            pool.members.insert("w-1".into(), member);
            cp.store()
                .txn(Txn::new().then(Op::put(keys::pool("w"), encode(&pool))))
                .unwrap();
            let refused = cp.delete_pool("w").unwrap_err().to_string();
            assert!(refused.contains(advice), "{refused}");
            pool.members.clear();
            cp.store()
                .txn(Txn::new().then(Op::put(keys::pool("w"), encode(&pool))))
                .unwrap();
            cp.delete_pool("w").unwrap();
        }
    }

    /// A worker started on a shared store is told every server running there, this one
    /// first, so it goes on when this one dies; on a store of its own, only this one.
    #[test]
    fn a_worker_joins_every_server_running_on_a_shared_store_this_one_first() {
        let register = |cp: &ControlPlane, urls: &[&str]| {
            for url in urls {
                let key = format!("{}{url}", shoal_store::SERVERS_PREFIX);
                cp.store()
                    .txn(Txn::new().then(Op::put(key, url.as_bytes().to_vec())))
                    .unwrap();
            }
        };
        let servers = [
            "https://10.0.0.1:7700",
            "https://10.0.0.2:7700",
            "https://10.0.0.3:7700",
        ];
        let dir = tempfile::tempdir().unwrap();
        let shared = crate::state::tests::control_plane_with(
            dir.path(),
            crate::ControlConfig {
                shared_store: true,
                ..crate::ControlConfig::default()
            },
        );
        register(&shared, &servers);
        assert_eq!(
            shared.join_urls("https://10.0.0.2:7700"),
            "https://10.0.0.2:7700,https://10.0.0.1:7700,https://10.0.0.3:7700"
        );
        let dir = tempfile::tempdir().unwrap();
        let alone = control_plane(dir.path());
        register(&alone, &servers);
        assert_eq!(
            alone.join_urls("https://10.0.0.2:7700"),
            "https://10.0.0.2:7700"
        );
    }

    /// The size a pool remembers of its last node goes when its workers change (other
    /// flags, another provider), not when only its bounds do.
    #[test]
    fn a_pool_forgets_its_nodes_size_when_its_workers_change() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let spec = spec();
        cp.put_pool(
            "w",
            PoolWrite {
                create: true,
                spec: spec.clone(),
            },
        )
        .unwrap();
        let remember = || {
            let (mut pool, _) = cp.get::<Pool>(&keys::pool("w")).unwrap().unwrap();
            pool.node_size = Some(shoal_core::Capacity::default());
            let txn = Txn::new().then(Op::put(keys::pool("w"), encode(&pool)));
            cp.store().txn(txn).unwrap();
        };
        let set = |spec: &shoal_core::PoolSpec| {
            let write = PoolWrite {
                create: false,
                spec: spec.clone(),
            };
            cp.put_pool("w", write).unwrap().node_size.is_some()
        };
        remember();
        let mut wider = spec.clone();
        wider.max = 9;
        assert!(set(&wider), "only the bounds changed");
        let mut bigger = wider.clone();
        bigger.node_args = vec!["--memory".into(), "2Gi".into()];
        assert!(!set(&bigger), "its workers changed");
        remember();
        let mut elsewhere = bigger.clone();
        elsewhere.node_args.clear();
        elsewhere.provider = Some("./cloud".into());
        assert!(!set(&elsewhere), "another provider");
    }

    /// A replica that waits for a node grows a pool only if a new node could take it: not
    /// one whose volume is bound to a node (gone, here), nor one whose instances may use
    /// more memory than a node of the pool has. Either would grow the pool to its max and
    /// keep it there.
    #[test]
    fn only_replicas_a_new_node_could_take_grow_a_pool() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let app = |name: &str, extra: &str| {
            let src = format!(
                "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
                 [http]\nroutes = [\"/{name}\"]\n{extra}"
            );
            let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
            cp.apply(spec.clone(), false).unwrap();
            spec
        };
        let db = app("db", "[[volumes]]\nname = \"data\"\nmount = \"/data\"\n");
        let wide = app("wide", "[resources]\nlimits = { memory = \"512Mi\" }\n");
        cp.put_pool(
            "w",
            PoolWrite {
                create: true,
                spec: spec(),
            },
        )
        .unwrap();
        // Its last node held 256 MiB.
        let (mut pool, _) = cp.get::<Pool>(&keys::pool("w")).unwrap().unwrap();
        pool.node_size = Some(shoal_core::Capacity {
            cpu_millis: 2000,
            memory_bytes: 256 << 20,
            instances: 100,
        });
        let mut volume: Volume = cp.get(&keys::volume("default", "data")).unwrap().unwrap().0;
        volume.node = Some("gone".into());
        let waiting = |spec: &shoal_core::spec::AppSpec| {
            let mut r = replica_of(spec, "r1", 1, "-", Phase::Pending);
            r.node = None;
            r.message = Some("0/0 nodes available".into());
            Op::put(keys::replica(&spec.key(), "r1"), encode(&r))
        };
        let txn = Txn::new()
            .then(Op::put(keys::pool("w"), encode(&pool)))
            .then(Op::put(keys::volume("default", "data"), encode(&volume)))
            .then(waiting(&db))
            .then(waiting(&wide));
        cp.store().txn(txn).unwrap();
        let workers = LocalWorkers {
            running: HashSet::new(),
            exited: HashSet::new(),
            since: 0,
            busy: BTreeSet::new(),
        };
        let pass = |cp: &ControlPlane| cp.pool_pass(&cp.fence(), &workers).unwrap();
        assert!(pass(&cp).is_empty(), "{:?}", pass(&cp));

        // The volume not bound yet: its replica goes wherever it is placed, a new node too.
        volume.node = None;
        let txn = Txn::new().then(Op::put(keys::volume("default", "data"), encode(&volume)));
        cp.store().txn(txn).unwrap();
        let decided = pass(&cp);
        let [(_, actions)] = decided.as_slice() else {
            panic!("{decided:?}")
        };
        assert!(
            matches!(&actions[..], [Action::Start { node, why }] if node == "w-1" && why.starts_with("1 replicas")),
            "{actions:?}"
        );
    }
}
