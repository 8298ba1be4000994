//! Typed operations on cluster state. Every write goes through here, as a
//! compare-and-swap transaction, so concurrent writers never lose an update.

use crate::error::ControlError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_api::{
    AppSummary, ApplyOutcome, ApplyResult, Describe, NodeAction, NodeLabels, NodeSummary,
    NodeUsage, ReplicaReport, ScaleView, Service, ServiceEndpoint, Snapshot,
};
use shoal_core::objects::keys::{self, Key, Prefix};
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{AppKey, AppSpec, OutboundGrant, OutboundHost, Route};
use shoal_core::wasm::WasmKind;
use shoal_core::{
    App, Capacity, Clock, Event, EventType, JobStatus, Kind, Lease, Leaving, Millis, Module,
    ModuleUse, Node, NodeState, OciOrigin, Phase, Replica, Revision, RolloutStatus, RouteClaim,
    SystemClock, Volume,
};
use shoal_store::{BlobStore, KeyValue, KvStore, Op, Txn};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Admin token: every API call.
    pub token: String,
    /// Join token: opens only `POST /v1/cluster/join`, where a node gets its
    /// own credential for everything else it does. Rotated at run time.
    pub join_token: String,
    /// Where the join token is kept, so a rotation outlives a restart and
    /// `--token-file` readers see the new one.
    pub join_token_file: Option<std::path::PathBuf>,
    /// The cluster CA: its certificate is served to nodes that join, its hash
    /// goes in join tokens, it signs nodes' certificates, and the control
    /// plane reads nodes' logs with a client certificate of its own from it.
    pub authority: Option<Arc<shoal_tls::Authority>>,
    /// Largest module upload accepted.
    pub max_module_bytes: u64,
    /// A node silent this long is NotReady.
    pub node_grace: Duration,
    /// Events kept; older ones are pruned.
    pub max_events: usize,
    /// How long a module no revision uses is kept after its last upload or apply.
    pub module_gc_grace: Duration,
    /// How the scheduler scores nodes, cluster-wide.
    pub strategy: shoal_scheduler::Strategy,
    /// Whether replicas move to even out apps spread unevenly over the nodes.
    pub rebalance: bool,
    /// The key file that seals secrets (`shoal_secrets`); none: secrets are refused.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// What one key-value bucket may hold, keys and values, in bytes.
    pub kv_bucket_bytes: u64,
    /// Registries (`host:port`) pulled from over plain HTTP, besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The store is shared with other servers (etcd): module bytes are kept in it too
    /// (`shared_modules`), so each serves nodes any module, whichever took its upload, and
    /// what nodes report goes through it to every server (`shared_reports`).
    pub shared_store: bool,
    /// Where the audit log goes (`audit.rs`); none: no audit log.
    pub audit_log: Option<std::path::PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            token: String::new(),
            join_token: String::new(),
            join_token_file: None,
            authority: None,
            max_module_bytes: 64 << 20,
            node_grace: Duration::from_secs(3),
            max_events: 2000,
            module_gc_grace: Duration::from_secs(600),
            strategy: shoal_scheduler::Strategy::BinPack,
            rebalance: true,
            secret_key_file: None,
            kv_bucket_bytes: shoal_core::kv::DEFAULT_BUCKET_BYTES,
            insecure_registries: Vec::new(),
            shared_store: false,
            audit_log: None,
        }
    }
}

#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The cluster state, through the backend-agnostic trait.
    pub(crate) store: Arc<dyn KvStore>,
    pub(crate) blobs: BlobStore,
    pub(crate) config: ControlConfig,
    /// The join token in force: [`ControlConfig::join_token`] until rotated.
    pub(crate) join_token: std::sync::RwLock<String>,
    pub(crate) event_seq: AtomicU64,
    /// Drawn at start, in each event's key: servers sharing a store count events from the
    /// same number, and one's would overwrite another's.
    pub(crate) event_writer: u32,
    /// Wakes the controller when something it owns should be looked at again.
    pub(crate) kick: Notify,
    /// On a shared store, the leader key and its revision when this server won the
    /// leadership: every controller write is guarded on it, so a deposed leader's pass (one
    /// still running, or a write etcd answers late) changes nothing. See [`ControlPlane::lead`].
    pub(crate) fence: std::sync::RwLock<Option<(String, u64)>>,
    /// Held by digest while a module is recorded, and while its record is deleted and its
    /// file unlinked.
    pub(crate) module_locks: crate::modules::ModuleLocks,
    /// The newest revision of the controller's own writes that landed: what its mirror must
    /// have caught up with before it plans again.
    pub(crate) controller_wrote: AtomicU64,
    /// When the controller started; see `run_controller`.
    pub(crate) started_at: OnceLock<Millis>,
    /// The URL this server's API is reached at (`--advertise-api`), once it listens.
    pub(crate) api_url: OnceLock<String>,
    /// What the gateways measured per app revision, for canary analysis.
    pub(crate) metrics: crate::measurements::Metrics,
    /// Where time comes from: the wall clock, or a test's.
    pub(crate) clock: Arc<dyn Clock>,
    /// The control plane's own certificate, to reach nodes' gateways with for logs
    /// ([`ControlPlane::member_client`]); none without a CA.
    pub(crate) members: Option<shoal_tls::Mutual>,
    /// The clients made with it, by node, and when each was last handed out.
    pub(crate) member_clients:
        std::sync::Mutex<std::collections::HashMap<String, (reqwest::Client, std::time::Instant)>>,
    /// The servers running on a shared store as last read, and when: what heartbeats'
    /// answers tell nodes ([`ControlPlane::servers_running`]).
    pub(crate) servers_read: std::sync::Mutex<Option<(std::time::Instant, Arc<str>)>>,
    /// What seals and opens secrets. Writers of secrets hold it shared; a key rotation
    /// holds it alone.
    pub(crate) secret_keys: std::sync::RwLock<crate::secrets::Keys>,
    /// What each volume's node last measured it holding, by namespace and name.
    pub(crate) volume_usage: std::sync::Mutex<std::collections::HashMap<(String, String), u64>>,
    /// What the control plane counts as it works, for `/v1/metrics`.
    pub(crate) observed: crate::prometheus::Observed,
    /// Key-value writes waiting for their bucket's turn (`kv.rs`).
    pub(crate) kv_queues: crate::kv::KvQueues,
    /// When each (node, app, bucket) was last found granted, to spare guests' calls a read.
    pub(crate) kv_grants:
        std::sync::Mutex<std::collections::HashMap<(String, AppKey, String), std::time::Instant>>,
    /// What this server's nodes reported, for the other servers of a shared store.
    pub(crate) outbox: Option<crate::shared_reports::Outbox>,
    /// Since when the controller's passes have failed, one after another (the log says why).
    pub(crate) failing: std::sync::Mutex<Option<std::time::Instant>>,
    /// The store's last health check: when it ended ([`ControlPlane::steady_now`]) and what
    /// it found wrong. Held while one runs, so probes coming together share it.
    store_checked: std::sync::Mutex<Option<(Millis, Option<String>)>>,
    /// The API's connections, once it serves them ([`ControlPlane::count_api_clients`]).
    pub(crate) api_clients: OnceLock<Arc<shoal_core::clients::Clients>>,
    /// Who did what through the API ([`ControlConfig::audit_log`]).
    pub(crate) audit: Option<crate::audit::AuditLog>,
}

/// How long a declarative change (an apply, a scale) is read and judged again while other
/// writes come between its read and its own: each round one of them lands, so a crowd of
/// changes to one namespace or one key all land in turn. A count of tries is not enough: a
/// writer that keeps winning (it does not wait) can outlast any count of another's tries.
const RACED_FOR: Duration = Duration::from_secs(5);

/// Waits before the `tries`-th read of a change that lost a race: 10 to 30 ms at most, more
/// each time, and a random share of it, so two writers that keep meeting fall out of step.
fn raced_again(tries: u32) {
    let most = u64::from(tries.min(20));
    let jitter = u64::from(getrandom::u32().unwrap_or(0)) % (most + 1);
    std::thread::sleep(Duration::from_millis(most / 2 + jitter));
}

/// `change` made again from a new read while it loses races ([`ControlError::Raced`]), for up
/// to [`RACED_FOR`]: applies, scales, key-value writes, and secret and config-set writes.
pub(crate) fn retrying<T>(
    mut change: impl FnMut() -> Result<T, ControlError>,
) -> Result<T, ControlError> {
    let since = std::time::Instant::now();
    let mut tries = 1;
    loop {
        match change() {
            Err(ControlError::Raced(_)) if since.elapsed() < RACED_FOR => {
                raced_again(tries);
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Keys an apply read to resolve its spec (config sets, secrets): the revision read and the
/// bytes. Its write is guarded on them, and writes them again as read, so a deletion that
/// found no app naming them fails its own guard rather than leave the app naming nothing.
/// The first read of a key is the one kept: what was resolved from it must still hold.
pub(crate) type Read = BTreeMap<String, (u64, Vec<u8>)>;

/// How long an apply that makes an app waits for the replicas of one of that name, deleted a
/// moment ago, to go: the controller's next pass, unless no controller runs now. And one that
/// makes a volume, for the data of one of that name deleted a moment ago to go.
pub(crate) const DELETED_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(5)
};

/// Past this size the audit log is renamed aside, and this many of those are kept.
const AUDIT_LOG_BYTES: u64 = 10 << 20;
const AUDIT_LOGS_KEPT: usize = 5;

/// How long the controller's passes may fail, one after another, before the server says it
/// is unhealthy: longer than a store leader election or a brief outage.
const UNHEALTHY_AFTER: Duration = Duration::from_secs(10);

/// How long the store's answer to a health check stands for the probes after it.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, ControlError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ControlError::internal(format!("corrupt object at {}: {e}", kv.key)))
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("objects serialise")
}

/// Runs blocking store work off the async executor.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ControlError>
where
    F: FnOnce() -> Result<T, ControlError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| match e.is_cancelled() {
            // The runtime is shutting down (SIGTERM) and dropped the call before it ran: nothing
            // was done, so the caller may send it again, to this server once back or another.
            true => ControlError::Unavailable("the server is shutting down; try again".into()),
            false => ControlError::internal(e),
        })?
}

/// TLS with a certificate of the cluster CA `ca`, trusting only that CA: what a node's
/// gateway lets read its logs.
fn member_tls(ca: &shoal_tls::Authority) -> Result<shoal_tls::Mutual, ControlError> {
    let issued = ca
        .issue_client(shoal_tls::CONTROL_PLANE)
        .map_err(ControlError::internal)?;
    shoal_tls::mutual(&issued, ca.pem()).map_err(ControlError::internal)
}

impl ControlPlane {
    pub fn new(
        store: impl KvStore,
        blobs: BlobStore,
        config: ControlConfig,
    ) -> Result<Self, ControlError> {
        Self::with_clock(Arc::new(store), blobs, config, Arc::new(SystemClock))
    }

    /// [`ControlPlane::new`] telling time by `clock`.
    pub fn with_clock(
        store: Arc<dyn KvStore>,
        blobs: BlobStore,
        config: ControlConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ControlError> {
        // Continue event numbering after the newest stored event.
        let (events, _) = store.range(keys::EVENTS.as_str())?;
        let next = events
            .last()
            .and_then(|kv| keys::event_id(&kv.key))
            .map_or(1, |n| n + 1);
        let members = match &config.authority {
            Some(ca) => Some(member_tls(ca)?),
            None => None,
        };
        let secret_keys = crate::secrets::open_keys(config.secret_key_file.as_deref(), &*store);
        let audit = match &config.audit_log {
            Some(path) => Some(
                crate::audit::AuditLog::open(path, AUDIT_LOG_BYTES, AUDIT_LOGS_KEPT).map_err(
                    |e| {
                        ControlError::internal(format!(
                            "cannot open the audit log {}: {e}",
                            path.display()
                        ))
                    },
                )?,
            ),
            None => None,
        };
        let cp = ControlPlane {
            inner: Arc::new(Inner {
                secret_keys: std::sync::RwLock::new(secret_keys),
                kv_queues: crate::kv::KvQueues::default(),
                observed: crate::prometheus::Observed::new(),
                volume_usage: std::sync::Mutex::new(std::collections::HashMap::new()),
                kv_grants: std::sync::Mutex::new(std::collections::HashMap::new()),
                outbox: config.shared_store.then(crate::shared_reports::Outbox::new),
                failing: std::sync::Mutex::new(None),
                store_checked: std::sync::Mutex::new(None),
                api_clients: OnceLock::new(),
                audit,
                store,
                blobs,
                join_token: std::sync::RwLock::new(config.join_token.clone()),
                config,
                event_seq: AtomicU64::new(next),
                event_writer: {
                    let mut bytes = [0; 4];
                    getrandom::fill(&mut bytes).expect("system randomness");
                    u32::from_le_bytes(bytes)
                },
                kick: Notify::new(),
                fence: std::sync::RwLock::new(None),
                module_locks: Default::default(),
                controller_wrote: AtomicU64::new(0),
                started_at: OnceLock::new(),
                api_url: OnceLock::new(),
                metrics: crate::measurements::Metrics::new(clock.steady_ms()),
                clock,
                members,
                member_clients: Default::default(),
                servers_read: Default::default(),
            }),
        };
        let commits = cp.inner.observed.commits.clone();
        cp.inner
            .store
            .observe_commits(Box::new(move |took| commits.observe(took.as_secs_f64())));
        cp.claim_stored_routes()?;
        if cp.inner.config.shared_store {
            // Another server sharing the store may have rotated the join token meanwhile.
            cp.join_token()?;
        }
        Ok(cp)
    }

    /// Now, by this control plane's clock.
    pub(crate) fn now(&self) -> Millis {
        self.inner.clock.now_ms()
    }

    /// Now, by the clock that never steps ([`Clock::steady_ms`]): the time of the gateways'
    /// measurements, which are kept in memory.
    pub(crate) fn steady_now(&self) -> Millis {
        self.inner.clock.steady_ms()
    }

    pub fn store(&self) -> &dyn KvStore {
        &*self.inner.store
    }

    /// Where this server's API is reached, as others are told (`shoal get servers`); set
    /// once, when it listens.
    pub fn serves_at(&self, url: &str) {
        let _ = self.inner.api_url.set(url.to_string());
    }

    /// From now on, the controller's writes take effect only while `key` (the leader key of a
    /// shared store) has the revision `revision`, at which this server won the leadership.
    pub fn lead(&self, key: &str, revision: u64) {
        *self.inner.fence.write().unwrap_or_else(|p| p.into_inner()) =
            Some((key.to_string(), revision));
    }

    /// Says in the cluster's events that `server` leads now (`Leading`), as Kubernetes'
    /// leader election does: which server runs the controller, and when that changed. Written
    /// only while the leadership [`Self::lead`] recorded holds.
    pub fn say_leading(&self, server: &str) -> Result<(), ControlError> {
        let Fence(Some((key, revision))) = self.fence() else {
            return Ok(());
        };
        let txn = Txn::new()
            .when_mod_revision(key, revision)
            .then(self.event_op(
                EventType::Normal,
                "Leading",
                "cluster".into(),
                None,
                format!("server {server} leads: the controller runs there"),
            ));
        self.inner.store.txn(txn)?;
        Ok(())
    }

    /// The leadership this server's loops that act on the cluster write under, as it is now.
    /// Each loop reads it once, when it starts, and keeps it: a pass still running after the
    /// leadership was lost and won again belongs to the old one, and must not land.
    pub(crate) fn fence(&self) -> Fence {
        Fence(
            self.inner
                .fence
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }

    /// Deletes `key` (`what`, e.g. "secret db"), as read at store revision `at`, with a Normal
    /// event `reason` about `object`; a change since that read is a conflict.
    pub(crate) fn delete_as_read(
        &self,
        key: String,
        at: u64,
        what: &str,
        reason: &str,
        object: String,
    ) -> Result<(), ControlError> {
        let message = format!("{what} deleted");
        self.delete_as_read_with(key, at, what, reason, object, Vec::new(), message)
    }

    /// [`Self::delete_as_read`], writing `also` in the same transaction, its event saying
    /// `message`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn delete_as_read_with(
        &self,
        key: String,
        at: u64,
        what: &str,
        reason: &str,
        object: String,
        also: Vec<Op>,
        message: String,
    ) -> Result<(), ControlError> {
        let txn = also
            .into_iter()
            .fold(
                Txn::new()
                    .when_mod_revision(key.clone(), at)
                    .then(Op::delete(key)),
                Txn::then,
            )
            .then(self.event_op(EventType::Normal, reason, object, None, message));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "{what} changed meanwhile; try again"
            )));
        }
        Ok(())
    }

    /// Builds an event and its store op; callers put it in their transaction.
    pub(crate) fn event_op(
        &self,
        kind: EventType,
        reason: &str,
        object: String,
        app: Option<&AppKey>,
        message: String,
    ) -> Op {
        let seq = self.inner.event_seq.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            seq,
            time: self.now(),
            kind,
            reason: reason.to_string(),
            object,
            app: app.cloned(),
            message,
        };
        Op::put(keys::event(seq, self.inner.event_writer), encode(&event))
    }

    pub(crate) fn list<T: DeserializeOwned>(
        &self,
        prefix: &Prefix<T>,
    ) -> Result<Vec<T>, ControlError> {
        let (kvs, _) = self.inner.store.range(prefix.as_str())?;
        kvs.iter().map(decode).collect()
    }

    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        key: &Key<T>,
    ) -> Result<Option<(T, u64)>, ControlError> {
        match self.inner.store.get(key.as_str())? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    // ---- modules ----

    /// Records an uploaded or pulled blob after checking that it is WebAssembly.
    pub(crate) fn register_module(
        &self,
        digest: &str,
        size: u64,
        existed: bool,
        oci: Option<OciOrigin>,
    ) -> Result<(Module, bool), ControlError> {
        let key = keys::module(digest);
        if let Some((m, _)) = self.get::<Module>(&key)? {
            return Ok((m, true));
        }
        // Its file went with a delete of the module that came first (the upload found it
        // there, and wrote nothing).
        let gone = || {
            ControlError::conflict(format!(
                "module {digest} was deleted as it was uploaded: upload it again"
            ))
        };
        // Checked before the lock, which a module's own upload or delete waits on: the same
        // bytes are as valid whatever happens to their file meanwhile.
        let bytes = match self.inner.blobs.read(digest) {
            Ok(bytes) => bytes,
            Err(shoal_store::BlobError::NotFound(_)) => return Err(gone()),
            Err(e) => return Err(ControlError::internal(e)),
        };
        let kind = match shoal_core::wasm::validate(&bytes) {
            Ok(kind) => kind,
            Err(e) => {
                if !existed {
                    let _ = self.inner.blobs.delete(digest);
                }
                return Err(ControlError::invalid(
                    ErrorCode::InvalidWasm,
                    format!("upload rejected: {e}"),
                ));
            }
        };
        let module = Module {
            digest: digest.to_string(),
            size,
            kind,
            uploaded_at: self.now(),
            oci,
            exports: Some(shoal_core::wasm::component_exports(&bytes)),
        };
        drop(bytes);
        let _recording = self.inner.module_locks.lock(digest);
        if let Some((m, _)) = self.get::<Module>(&key)? {
            return Ok((m, true));
        }
        if !self.inner.blobs.contains(digest) {
            return Err(gone());
        }
        if self.inner.config.shared_store {
            crate::shared_modules::copy_in(&*self.inner.store, &self.inner.blobs, digest)?;
        }
        // Compare-and-swap like every other write: the first of two concurrent
        // uploads of the same module records it, the second finds it.
        let txn = Txn::new()
            .when_absent(&key)
            .then(Op::put(&key, encode(&module)));
        if !self.inner.store.txn(txn)?.succeeded {
            // Another server recorded it first; or recorded it and deleted it since.
            return match self.get(&key)? {
                Some((m, _)) => Ok((m, true)),
                None => Err(gone()),
            };
        }
        Ok((module, false))
    }

    // ---- apps ----

    #[cfg(test)]
    pub(crate) fn apply(&self, spec: AppSpec, dry_run: bool) -> Result<ApplyResult, ControlError> {
        self.apply_retrying(spec, dry_run, false, None)
    }

    /// [`ControlPlane::apply`]; with `retry`, a template whose rollout was rolled back or
    /// aborted is rolled out again rather than refused; with `if_spec`, a change is refused as
    /// a conflict unless the stored spec has that [`AppSpec::fingerprint`] (an edit's base).
    ///
    /// Declarative, it is read and judged again when another write came first (another
    /// app's change in a namespace with a quota, say), a few times, before that is a conflict.
    pub(crate) fn apply_retrying(
        &self,
        spec: AppSpec,
        dry_run: bool,
        retry: bool,
        if_spec: Option<&str>,
    ) -> Result<ApplyResult, ControlError> {
        retrying(|| self.apply_over(spec.clone(), dry_run, None, retry, if_spec))
    }

    /// [`ControlPlane::apply`], refused as a conflict unless the stored app is still at
    /// revision `over` (when given): for a spec read from the store, so an apply made since
    /// is not undone. `if_spec` does the same for a client's edit (see [`Self::apply_retrying`]).
    pub(crate) fn apply_over(
        &self,
        spec: AppSpec,
        dry_run: bool,
        over: Option<u64>,
        retry: bool,
        if_spec: Option<&str>,
    ) -> Result<ApplyResult, ControlError> {
        spec.validate().map_err(ControlError::from)?;
        let mut read = Read::new();
        let spec = self.resolve_config_sets(spec, &mut read)?;
        let spec = self.resolve_secrets(spec, &mut read)?;
        spec.validate().map_err(ControlError::from)?;
        // A dry run may precede the upload of its module: judge the rest.
        let module = self.get::<Module>(&keys::module(&spec.component.digest))?;
        match &module {
            None if dry_run => {}
            None => {
                return Err(ControlError::invalid(
                    ErrorCode::UnknownModule,
                    format!(
                        "module {} has not been uploaded: upload it first (POST /v1/modules), or point `component.path` at the .wasm file and let `shoal apply` upload it",
                        spec.component.digest
                    ),
                ));
            }
            Some((module, _)) if module.kind == WasmKind::Module => {
                return Err(ControlError::invalid(
                    ErrorCode::NotAComponent,
                    format!(
                        "module {} is a core WebAssembly module, but kind = \"{}\" needs a component implementing {} (build it with `cargo build --target wasm32-wasip2`)",
                        module.digest,
                        spec.component.kind,
                        spec.component.kind.world()
                    ),
                ));
            }
            Some((module, _)) => {
                if let Some(exports) = &module.exports
                    && !spec.component.kind.runs(exports)
                {
                    let exports = if exports.is_empty() {
                        "nothing".to_string()
                    } else {
                        exports.join(", ")
                    };
                    return Err(ControlError::Invalid {
                        code: ErrorCode::InvalidSpec,
                        field: Some("component.kind".into()),
                        message: format!(
                            "component {} cannot run as kind = \"{}\": that needs a {} component, exporting {}, and it exports {exports}",
                            module.digest,
                            spec.component.kind,
                            spec.component.kind.world(),
                            spec.component.kind.needs()
                        ),
                    });
                }
                // The runtime serves a p3 component on its own engine, where a writable
                // volume's size limit cannot be kept: its replicas would only fail.
                if let Some(exports) = &module.exports
                    && spec.component.kind == Kind::Http
                    && shoal_core::spec::serves_p3(exports)
                    && let Some(v) = spec.volumes.iter().find(|v| !v.read_only)
                {
                    return Err(ControlError::Invalid {
                        code: ErrorCode::InvalidSpec,
                        field: Some("volumes".into()),
                        message: format!(
                            "volume {} is writable, and component {} is served as WASIp3 (it exports wasi:http/handler@0.3): a writable volume needs a WASIp2 component, whose filesystem calls keep its size limit; mount it read_only = true",
                            v.name, module.digest
                        ),
                    });
                }
            }
        }
        let claims = self.route_claims(&spec)?;
        let mut warnings = self.grants_naming_apps(&spec)?;
        warnings.extend(spec.env_warnings());
        let exports = module.as_ref().and_then(|(m, _)| m.exports.as_deref());
        warnings.extend(spec.reuse_warnings(exports.map(shoal_core::spec::serves_p3)));

        let key = spec.key();
        let app_key = keys::app(&key);
        let existing = self.get::<App>(&app_key)?;
        // An edit of an app deleted since it was read can only be refused: say so at once.
        if existing.is_none() && if_spec.is_some() {
            return Err(ControlError::conflict(format!(
                "app {key} was deleted since the spec this change was made from was read"
            )));
        }
        // The replicas of an app deleted a moment ago go in the controller's next pass; a
        // new app of the same name would take them for its own (its revisions start at 1
        // again) and serve the old code. So it waits for them, a while.
        if existing.is_none() && !dry_run {
            let waited = Instant::now();
            loop {
                let left = self.list::<Replica>(&keys::replicas_of(&key))?.len();
                if left == 0 && self.get::<RolloutStatus>(&keys::rollout(&key))?.is_none() {
                    break;
                }
                if waited.elapsed() >= DELETED_WAIT {
                    return Err(ControlError::conflict(format!(
                        "app {key} is still being deleted ({left} replicas left): apply again in a moment"
                    )));
                }
                self.inner.kick.notify_one();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(over) = over
            && existing.as_ref().map(|(_, at)| *at) != Some(over)
        {
            return Err(ControlError::conflict(format!(
                "app {key} was changed concurrently; apply again"
            )));
        }
        let now = self.now();
        let mut spec = spec;
        if let Some((old, _)) = &existing {
            self.keep_secret_versions(&mut spec, &old.spec);
        }
        // An autoscaled app's size is the controller's to set, as a Deployment's
        // is an HPA's: re-applying the file keeps it (within the new bounds, as the windows
        // open now make them: else an unchanged file undid what a window set).
        if let (Some(_), Some((old, _))) = (&spec.scale.autoscale, &existing)
            && old.spec.scale.autoscale.is_some()
        {
            spec.replicas = (spec.scale.bounds(old.spec.replicas, now)).clamp(old.spec.replicas);
        }
        // Judged in a dry run too: it says what the apply would meet.
        let admitted = self.admit(existing.as_ref().map(|(a, _)| &a.spec), &spec)?;
        let revisions = self.list::<Revision>(&keys::revisions_of(&key))?;
        let latest_revision = revisions.last();
        // What runs now: after an automatic rollback, not the latest revision.
        let current_revision = existing
            .as_ref()
            .and_then(|(a, _)| revisions.iter().find(|r| r.number == a.revision));
        let template = spec.template();
        let hash = template.hash();

        let (outcome, changes, app, new_revision) = match &existing {
            Some((old, _)) if old.spec == spec => {
                (ApplyOutcome::Unchanged, vec![], old.clone(), None)
            }
            _ => {
                let changes = match &existing {
                    Some((old, _)) => diff(&old.spec, &spec),
                    None => vec![],
                };
                let (revision, new_revision) = if let Some(r) =
                    current_revision.filter(|r| r.hash == hash)
                {
                    (r.number, None)
                } else {
                    // The template of the rollout just rolled back or aborted is not rolled
                    // out again by the same file applied again: a loop re-applying it (GitOps)
                    // would send traffic to a build known to fail every cycle. Flagger and
                    // Argo Rollouts hold the same way; `retry` tries it again.
                    // Copies of what runs made since (a restart) do not hide it.
                    let running = current_revision.map(|r| r.hash.as_str());
                    let attempted = revisions
                        .iter()
                        .rev()
                        .find(|r| Some(r.hash.as_str()) != running);
                    if let Some(bad) = attempted.filter(|r| r.hash == hash && !retry)
                        && let Some(outcome) = bad.abandoned()
                    {
                        return Err(ControlError::conflict(format!(
                            "revision {} of app {key} has this template, and was {outcome}; change the spec to roll out a new revision, or apply with --retry to try this one again",
                            bad.number
                        )));
                    }
                    let number = latest_revision.as_ref().map_or(1, |r| r.number + 1);
                    // What differs from the template that runs now.
                    let running = current_revision
                        .map(|r| r.template.clone())
                        .or_else(|| existing.as_ref().map(|(a, _)| a.spec.template()));
                    let cause = match running {
                        None => "created".to_string(),
                        Some(t) => format!("{} changed", template.changed_fields(&t).join(", ")),
                    };
                    let rev = Revision {
                        app: key.clone(),
                        number,
                        template,
                        hash,
                        created_at: now,
                        cause,
                        undid: None,
                        outcome: None,
                    };
                    (number, Some(rev))
                };
                let app = App {
                    spec: spec.clone(),
                    revision,
                    created_at: existing.as_ref().map_or(now, |(a, _)| a.created_at),
                    updated_at: now,
                    scale: existing
                        .as_ref()
                        .map(|(a, _)| a.scale.clone())
                        .unwrap_or_default(),
                    job: existing
                        .as_ref()
                        .map(|(a, _)| job_status(a, &spec, now))
                        .unwrap_or_default(),
                };
                let outcome = if existing.is_some() {
                    ApplyOutcome::Configured
                } else {
                    ApplyOutcome::Created
                };
                (outcome, changes, app, new_revision)
            }
        };

        // The stored spec is read once, above, and the write is guarded on its revision.
        if let (Some(base), Some((stored, _))) = (if_spec, &existing)
            && outcome != ApplyOutcome::Unchanged
            && stored.spec.fingerprint() != base
        {
            return Err(ControlError::conflict(format!(
                "app {key} has changed since the spec this change was made from was read: read it again and make the change over what is there now"
            )));
        }
        // A dry run meets the volume checks the apply would.
        if dry_run && outcome != ApplyOutcome::Unchanged {
            for mount in &spec.volumes {
                match self.get::<Volume>(&keys::volume(&key.namespace, &mount.name))? {
                    Some((volume, _)) => {
                        self.applied_size(&key.namespace, mount, volume)?;
                    }
                    None => self.may_make_volume(&key.namespace, &mount.name, false)?,
                }
            }
        }
        if !dry_run && outcome != ApplyOutcome::Unchanged {
            let mut txn = match &existing {
                Some((_, mod_rev)) => Txn::new().when_mod_revision(app_key.clone(), *mod_rev),
                None => Txn::new().when_absent(app_key.clone()),
            };
            txn = txn.then(Op::put(app_key.clone(), encode(&app)));
            if let Some(admitted) = admitted {
                txn = admitted.guard(txn);
            }
            let message = match (&new_revision, outcome) {
                (Some(r), ApplyOutcome::Created) => format!("created with revision {}", r.number),
                (Some(r), _) => format!("new revision {}: {}", r.number, r.cause),
                (None, _) => format!("updated: {}", changes.join("; ")),
            };
            if let Some(rev) = &new_revision {
                txn = txn.then(Op::put(keys::revision(&key, rev.number), encode(rev)));
                // The module must still be there, and is in use again: a collection that
                // read its use before this revision existed cannot delete it (`modules.rs`).
                if let Some((module, at)) = &module {
                    txn = txn
                        .when_mod_revision(keys::module(&module.digest), *at)
                        .then(Op::put(
                            keys::module_use(&module.digest),
                            encode(&ModuleUse { last_used: now }),
                        ));
                }
            }
            let old_routes = existing
                .as_ref()
                .map_or(&[][..], |(a, _)| routes_of(&a.spec));
            txn = claim_routes(txn, &key, claims, old_routes, routes_of(&spec));
            // What the spec was resolved with is still what is there: a set or secret
            // written or deleted meanwhile makes it judged again. Written again as read, so
            // a deletion that found no app naming it fails its own guard instead.
            for (k, (at, bytes)) in read {
                txn = txn.when_mod_revision(k.clone(), at).then(Op::put(k, bytes));
            }
            // The volumes it mounts exist from this apply on, with the size it says.
            for mount in &spec.volumes {
                let vkey = keys::volume(&key.namespace, &mount.name);
                match self.get::<Volume>(&vkey)? {
                    None => {
                        self.may_make_volume(&key.namespace, &mount.name, true)?;
                        let volume = Volume {
                            namespace: key.namespace.clone(),
                            name: mount.name.clone(),
                            size_bytes: mount.size(),
                            node: None,
                            created_at: now,
                        };
                        txn = txn
                            .when_absent(vkey.clone())
                            .when_absent(keys::volume_deletion(&key.namespace, &mount.name))
                            .then(Op::put(vkey, encode(&volume)));
                    }
                    // Written again, resized if the mount gives another size: a
                    // `delete_volume` that found no app mounting it fails its guard, and a
                    // deletion first voids this.
                    Some((volume, at)) => {
                        let volume = self.applied_size(&key.namespace, mount, volume)?;
                        txn = txn
                            .when_mod_revision(vkey.clone(), at)
                            .then(Op::put(vkey, encode(&volume)));
                    }
                }
            }
            let reason = if outcome == ApplyOutcome::Created {
                "Created"
            } else {
                "Updated"
            };
            txn = txn.then(self.event_op(
                EventType::Normal,
                reason,
                format!("app/{key}"),
                Some(&key),
                message,
            ));
            if !self.inner.store.txn(txn)?.succeeded {
                return Err(ControlError::Raced(format!(
                    "app {key} was changed concurrently; apply again"
                )));
            }
            self.inner.kick.notify_one();
        }
        Ok(ApplyResult {
            outcome,
            dry_run,
            changes,
            app,
            warnings,
        })
    }

    /// An outbound grant that names an app the guest could call by its service name (`APP`,
    /// or `APP.NAMESPACE`): a granted host is always called over the network, so the grant
    /// sends those calls to DNS instead of the app, which is seldom what was meant.
    fn grants_naming_apps(&self, spec: &AppSpec) -> Result<Vec<String>, ControlError> {
        let mut warnings = Vec::new();
        for grant in &spec.outbound {
            let Ok(OutboundGrant {
                host: OutboundHost::Name(host),
                ..
            }) = OutboundGrant::parse(grant)
            else {
                continue;
            };
            let app = match host.split_once('.') {
                None => AppKey::new(&spec.namespace, &host),
                Some((name, namespace)) if !namespace.contains('.') => AppKey::new(namespace, name),
                Some(_) => continue,
            };
            if self.get::<App>(&keys::app(&app))?.is_some() {
                warnings.push(format!(
                    "outbound grant {grant:?} names app {app}: a granted host is called over the network, so calls to http://{host}/ go to DNS, not to the app; drop the grant to call the app"
                ));
            }
        }
        Ok(warnings)
    }

    /// Each route `spec` serves, with the revision of its claim if `spec`'s
    /// app holds it already; an error if another app does. Two apps may not
    /// serve the same host and path.
    fn route_claims(&self, spec: &AppSpec) -> Result<RouteClaims, ControlError> {
        let key = spec.key();
        let mut claims = RouteClaims::default();
        for route in routes_of(spec) {
            let held = match self.get(&keys::route(route))? {
                // Another namespace's app is not named: a tenant learns that the route is
                // taken, not who took it.
                Some((claim, _)) if claim.app != key => {
                    let whose = match claim.app.namespace == key.namespace {
                        true => format!("app {}", claim.app),
                        false => "an app of another namespace".to_string(),
                    };
                    return Err(ControlError::conflict(format!(
                        "route {route} is already served by {whose}"
                    )));
                }
                Some((_, mod_rev)) => Some(mod_rev),
                None => {
                    if let Some(served) = self.route_taken_from(&key, route, &mut claims)? {
                        return Err(ControlError::conflict(format!(
                            "route {route} would take requests from route {} of another namespace: a host bound in one namespace is its own, and on any host a path may not go under another namespace's route (bind a host of your own)",
                            served.route
                        )));
                    }
                    None
                }
            };
            claims.routes.push((route.clone(), held));
        }
        Ok(claims)
    }

    /// A claim of another namespace that a new claim of `route` by `app` may not be made
    /// beside: a host bound by one namespace is its own (as OpenShift routes own hosts), and
    /// on any host a longer path under another namespace's route would capture its traffic
    /// (the gateway prefers the longest path), unless that route is the catch-all `/`. The
    /// first claim wins. Routes of one namespace (one tenant) overlap freely, and a route
    /// bound to a host goes before any-host routes, whoever's they are.
    ///
    /// What it read is added to `claims`' guards: the claim is written only if that is still
    /// what is there, so two namespaces claiming at once cannot both pass.
    fn route_taken_from(
        &self,
        app: &AppKey,
        route: &Route,
        claims: &mut RouteClaims,
    ) -> Result<Option<RouteClaim>, ControlError> {
        let foreign = |claim: RouteClaim| (claim.app.namespace != app.namespace).then_some(claim);
        if let Some(host) = &route.host {
            // A claim another namespace makes on the host meanwhile rewrites its record too.
            let owner = keys::route_host(host);
            let read = self.get(&owner)?.map(|(_, at)| at);
            claims.guards.entry(owner.to_string()).or_insert(read);
            claims.hosts.insert(host.clone());
            return Ok(self
                .list(&keys::routes_of_host(host))?
                .into_iter()
                .find_map(foreign));
        }
        // The longest route above it serves its paths now: the one it would take them from.
        // Not a catch-all `/`: it serves what no other route does, and claims no path.
        let above = shoal_core::spec::path_prefixes(&route.path)
            .skip(1)
            .filter(|path| *path != "/");
        for path in above {
            let above = keys::route(&Route {
                host: None,
                path: path.to_string(),
            });
            let read = self.get(&above)?;
            let at = read.as_ref().map(|(_, at)| *at);
            claims.guards.entry(above.to_string()).or_insert(at);
            if let Some((claim, _)) = read {
                return Ok(foreign(claim));
            }
        }
        Ok(None)
    }

    /// Claims what the apps in the store serve but do not hold yet: apps
    /// written before routes were claimed in their own keys.
    fn claim_stored_routes(&self) -> Result<(), ControlError> {
        for app in self.list(&keys::APPS)? {
            let key = app.spec.key();
            for route in routes_of(&app.spec) {
                let claim = RouteClaim {
                    route: route.clone(),
                    app: key.clone(),
                };
                let k = keys::route(route);
                let txn = Txn::new().when_absent(&k).then(Op::put(&k, encode(&claim)));
                self.inner.store.txn(txn)?;
            }
        }
        Ok(())
    }

    /// `rollout undo`: runs an earlier revision's template again, as a new
    /// revision (so history only grows), keeping scale and routes.
    pub(crate) fn rollback(
        &self,
        key: &AppKey,
        to: Option<u64>,
    ) -> Result<ApplyResult, ControlError> {
        let app_key = keys::app(key);
        let Some((app, mod_rev)) = self.get::<App>(&app_key)? else {
            return Err(ControlError::not_found(format!("app {key} does not exist")));
        };
        let revisions = self.list::<Revision>(&keys::revisions_of(key))?;
        let current_hash = app.spec.template().hash();
        let target = match to {
            Some(n) => revisions
                .iter()
                .find(|r| r.number == n)
                .ok_or_else(|| ControlError::not_found(format!("app {key} has no revision {n}")))?,
            // The last one that differs from the latest and was not itself rolled back or
            // aborted: after an automatic rollback and a fix, undoing the fix goes back to
            // what ran before, not to the build that failed (name it to get that one).
            None => revisions
                .iter()
                .rev()
                .find(|r| {
                    r.number < app.revision
                        && r.hash != revisions.last().map_or("", |l| l.hash.as_str())
                        && r.abandoned().is_none()
                })
                .ok_or_else(|| {
                    ControlError::invalid(
                        ErrorCode::NoEarlierRevision,
                        format!("app {key} has no earlier revision to roll back to"),
                    )
                })?,
        };
        if target.hash == current_hash {
            return Ok(ApplyResult {
                outcome: ApplyOutcome::Unchanged,
                dry_run: false,
                changes: vec![],
                app,
                warnings: Vec::new(),
            });
        }
        let cause = format!("rollback to revision {}", target.number);
        // Named on purpose, so not refused as `apply` refuses it without `--retry`; but said.
        let warning = target.abandoned().map(|outcome| {
            format!(
                "revision {} was {outcome}: it runs again, and a rolling update does not stop a build that fails again",
                target.number
            )
        });
        let mut result =
            self.run_again(key, (app, mod_rev), &revisions, target, cause, "RolledBack")?;
        result.warnings.extend(warning);
        Ok(result)
    }

    /// `rollout restart`: what runs now, again as a new revision, so its rollout replaces
    /// every replica the way the app rolls out (new before old, a canary's steps), as
    /// `kubectl rollout restart` does: fresh instances, without a change to the spec (its
    /// file applied again changes nothing).
    pub(crate) fn restart(&self, key: &AppKey) -> Result<ApplyResult, ControlError> {
        let app_key = keys::app(key);
        let Some((app, mod_rev)) = self.get::<App>(&app_key)? else {
            return Err(ControlError::not_found(format!("app {key} does not exist")));
        };
        if app.spec.component.kind == Kind::Job {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                format!(
                    "app {key} is a job: each run starts afresh (`shoal job run {}` starts one now)",
                    key.name
                ),
            ));
        }
        let revisions = self.list::<Revision>(&keys::revisions_of(key))?;
        let current = revisions
            .iter()
            .find(|r| r.number == app.revision)
            .ok_or_else(|| {
                ControlError::internal(format!(
                    "app {key} runs revision {}, which is not in its history",
                    app.revision
                ))
            })?;
        let cause = format!("restart of revision {}", current.number);
        self.run_again(key, (app, mod_rev), &revisions, current, cause, "Restarted")
    }

    /// Makes `target`'s template the app's again, as a new revision numbered after the last
    /// (history only grows) that keeps scale and routes; the event says `reason` and `cause`.
    fn run_again(
        &self,
        key: &AppKey,
        (app, mod_rev): (App, u64),
        revisions: &[Revision],
        target: &Revision,
        cause: String,
        reason: &str,
    ) -> Result<ApplyResult, ControlError> {
        let app_key = keys::app(key);
        // Its replicas could never start: they would wait for values that are not there.
        for r in target
            .template
            .secret_env
            .values()
            .chain(target.template.secret_config.values())
        {
            let secret =
                self.get::<shoal_core::Secret>(&keys::secret(&key.namespace, &r.secret))?;
            let kept =
                secret.is_some_and(|(s, _)| r.version.is_none_or(|v| s.versions.contains_key(&v)));
            if !kept {
                return Err(ControlError::conflict(format!(
                    "revision {} of app {key} names {r}, which has been deleted since: apply a spec instead",
                    target.number
                )));
            }
        }
        // Nor could they mount a volume deleted since: each replica would get a directory of
        // its own on whatever node, which no record names and its node soon removes.
        let mut volumes = Vec::new();
        for mount in &target.template.volumes {
            let vkey = keys::volume(&key.namespace, &mount.name);
            let Some((volume, at)) = self.get::<Volume>(&vkey)? else {
                return Err(ControlError::conflict(format!(
                    "revision {} of app {key} mounts volume {}, which has been deleted since: apply a spec instead",
                    target.number, mount.name
                )));
            };
            // A rollback's size is the volume's again, unless the volume now holds more; a
            // restart changes nothing in the spec, so nothing of the volume either.
            let volume = if reason != "RolledBack" {
                Ok(volume)
            } else {
                self.sized(&key.namespace, mount, volume)
            };
            let volume = volume.map_err(|shrunk| {
                ControlError::conflict(format!(
                    "revision {} of app {key}: {}; apply a spec instead",
                    target.number,
                    shrunk.say(&mount.name)
                ))
            })?;
            volumes.push((vkey, volume, at));
        }
        let spec = app.spec.with_template(&target.template);
        // An earlier template may ask for more than its namespace now allows.
        let admitted = self.admit(Some(&app.spec), &spec)?;
        let changes = diff(&app.spec, &spec);
        let number = revisions.last().map_or(1, |r| r.number + 1);
        let now = self.now();
        let revision = Revision {
            app: key.clone(),
            number,
            template: target.template.clone(),
            hash: target.hash.clone(),
            created_at: now,
            cause,
            undid: (reason == "RolledBack").then_some(app.revision),
            outcome: None,
        };
        let updated = App {
            spec,
            revision: number,
            created_at: app.created_at,
            updated_at: now,
            scale: app.scale.clone(),
            job: app.job.clone(),
        };
        let mut txn = Txn::new()
            .when_mod_revision(app_key.clone(), mod_rev)
            .then(Op::put(app_key, encode(&updated)));
        if let Some(admitted) = admitted {
            txn = admitted.guard(txn);
        }
        // Written again, as an apply does: a deletion that found no app mounting them fails
        // its guard, and one first voids this.
        for (vkey, volume, at) in volumes {
            txn = txn
                .when_mod_revision(vkey.clone(), at)
                .then(Op::put(vkey, encode(&volume)));
        }
        let txn = txn
            .then(Op::put(keys::revision(key, number), encode(&revision)))
            .then(self.event_op(
                EventType::Normal,
                reason,
                format!("app/{key}"),
                Some(key),
                format!("revision {number}: {}", revision.cause),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "app {key}, or the quota of its namespace, was changed concurrently; try again"
            )));
        }
        self.inner.kick.notify_one();
        Ok(ApplyResult {
            outcome: ApplyOutcome::Configured,
            dry_run: false,
            changes,
            app: updated,
            warnings: Vec::new(),
        })
    }

    /// `shoal scale`: sets the app's replica count, as `kubectl scale` does.
    /// Scale is not part of the template, so no revision is made; the next
    /// apply of the app's file sets it again.
    pub(crate) fn scale(&self, key: &AppKey, replicas: u32) -> Result<App, ControlError> {
        retrying(|| self.scale_once(key, replicas))
    }

    fn scale_once(&self, key: &AppKey, replicas: u32) -> Result<App, ControlError> {
        let app_key = keys::app(key);
        let Some((mut app, mod_rev)) = self.get(&app_key)? else {
            return Err(ControlError::not_found(format!("app {key} does not exist")));
        };
        if let Some(a) = &app.spec.scale.autoscale {
            return Err(ControlError::invalid(
                ErrorCode::InvalidSpec,
                format!(
                    "app {key} is autoscaled between {} and {} replicas: change min and max in its [scale] section instead",
                    a.min, a.max
                ),
            ));
        }
        let was = app.spec.replicas;
        if was == replicas {
            return Ok(app);
        }
        let before = app.spec.clone();
        app.spec.replicas = replicas;
        app.spec.validate()?;
        let admitted = self.admit(Some(&before), &app.spec)?;
        app.updated_at = self.now();
        let mut txn = Txn::new()
            .when_mod_revision(&app_key, mod_rev)
            .then(Op::put(&app_key, encode(&app)));
        if let Some(admitted) = admitted {
            txn = admitted.guard(txn);
        }
        let txn = txn.then(self.event_op(
            EventType::Normal,
            "Scaled",
            format!("app/{key}"),
            Some(key),
            format!("scaled from {was} to {replicas} replicas"),
        ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::Raced(format!(
                "app {key} was changed concurrently; scale again"
            )));
        }
        self.inner.kick.notify_one();
        Ok(app)
    }

    pub(crate) fn delete_app(&self, key: &AppKey) -> Result<(), ControlError> {
        let app_key = keys::app(key);
        let Some((app, mod_rev)) = self.get(&app_key)? else {
            return Err(ControlError::not_found(format!("app {key} does not exist")));
        };
        let mut txn = Txn::new().when_mod_revision(app_key.clone(), mod_rev);
        for route in routes_of(&app.spec) {
            txn = txn.then(Op::delete(keys::route(route)));
        }
        let txn = txn
            .then(Op::delete(app_key))
            .then(Op::delete_prefix(keys::revisions_of(key)))
            .then(Op::delete(keys::rollout(key)))
            .then(self.event_op(
                EventType::Normal,
                "Deleted",
                format!("app/{key}"),
                Some(key),
                "app deleted; its replicas are stopping".into(),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "app {key} was changed concurrently; delete again"
            )));
        }
        // Now, not at the controller's next pass: an app of that name made again before it
        // would take this one's load and totals (its revisions are numbered from 1 again).
        self.inner.metrics.retain_apps(|app| app != key);
        self.inner.kick.notify_one();
        Ok(())
    }

    pub(crate) fn app(&self, key: &AppKey) -> Result<App, ControlError> {
        self.get::<App>(&keys::app(key))?
            .map(|(a, _)| a)
            .ok_or_else(|| ControlError::not_found(format!("app {key} does not exist")))
    }

    pub(crate) fn summaries(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<AppSummary>, ControlError> {
        self.summaries_of(namespace, &self.list::<Replica>(&keys::REPLICAS)?)
    }

    /// [`ControlPlane::summaries`] with every replica already read.
    pub(crate) fn summaries_of(
        &self,
        namespace: Option<&str>,
        replicas: &[Replica],
    ) -> Result<Vec<AppSummary>, ControlError> {
        // Counted in one walk: with thousands of apps, a scan per app is quadratic.
        let mut ready_of: HashMap<&AppKey, usize> = HashMap::new();
        // A job wants as many replicas as it has runs going: none once they are over, so a
        // finished job does not read as 0 of 1 ready.
        let mut runs_of: HashMap<&AppKey, u32> = HashMap::new();
        for r in replicas {
            if r.kind == Kind::Job && !r.phase.is_terminal() {
                *runs_of.entry(&r.app).or_default() += 1;
            }
            if r.serving() {
                *ready_of.entry(&r.app).or_default() += 1;
            }
        }
        let now = self.now();
        let mut out = Vec::new();
        for app in self.list::<App>(&keys::APPS)? {
            if namespace.is_some_and(|ns| ns != app.spec.namespace) {
                continue;
            }
            let key = app.spec.key();
            let bounds = app.spec.scale.bounds(app.spec.replicas, now);
            let autoscale = app.spec.scale.autoscale.as_ref().map(|a| ScaleView {
                min: bounds.min,
                max: bounds.max,
                target_concurrency: a.target_concurrency,
                concurrency: (self.inner.metrics).concurrency(&key, a.window_ms, self.steady_now()),
            });
            out.push(AppSummary {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                kind: app.spec.component.kind,
                revision: app.revision,
                desired: match app.spec.component.kind {
                    Kind::Job => runs_of.get(&key).copied().unwrap_or(0),
                    _ => bounds.clamp(app.spec.replicas),
                },
                ready: ready_of.get(&key).copied().unwrap_or(0),
                autoscale,
                windows: bounds.windows,
                routes: app
                    .spec
                    .http
                    .iter()
                    .flat_map(|h| h.routes.iter().map(|r| r.to_string()))
                    .collect(),
                digest: app.spec.component.digest.clone(),
                created_at: app.created_at,
            });
        }
        Ok(out)
    }

    pub(crate) fn describe(&self, key: &AppKey) -> Result<Describe, ControlError> {
        let app = self.app(key)?;
        let revisions = self.list::<Revision>(&keys::revisions_of(key))?;
        let replicas = self.list::<Replica>(&keys::replicas_of(key))?;
        let events = self.events(Some(key), 20)?;
        let mut rollout = self
            .get::<RolloutStatus>(&keys::rollout(key))?
            .map(|(s, _)| s);
        if let Some(status) = &mut rollout {
            crate::rollouts::completed_now(status, &app, &replicas, self.now());
        }
        let world = self
            .get::<Module>(&keys::module(&app.spec.component.digest))?
            .and_then(|(m, _)| m.exports)
            .map(|exports| app.spec.component.kind.served_world(&exports).to_string());
        Ok(Describe {
            fingerprint: app.spec.fingerprint(),
            cpu: self.inner.metrics.cpu(key, self.steady_now()),
            world,
            app,
            rollout,
            revisions,
            replicas,
            events,
        })
    }

    /// Every event, oldest first, each numbered (`seq`) by the store revision
    /// that committed it: commits are serial, so a reader that has seen
    /// number N will only ever find later events above N.
    fn all_events(&self) -> Result<Vec<Event>, ControlError> {
        let (kvs, _) = self.inner.store.range(keys::EVENTS.as_str())?;
        let mut events = kvs
            .iter()
            .map(|kv| {
                let mut e: Event = decode(kv)?;
                e.seq = kv.create_revision;
                Ok(e)
            })
            .collect::<Result<Vec<Event>, ControlError>>()?;
        // Stable: events of one transaction keep the order they were written in.
        events.sort_by_key(|e| e.seq);
        Ok(events)
    }

    /// The newest `limit` events of `app` (all apps' and the cluster's if `None`).
    pub(crate) fn events(
        &self,
        app: Option<&AppKey>,
        limit: usize,
    ) -> Result<Vec<Event>, ControlError> {
        let mut events = self.all_events()?;
        events.retain(|e| app.is_none() || e.app.as_ref() == app);
        let skip = events.len().saturating_sub(limit);
        Ok(events.split_off(skip))
    }

    /// For followers: the oldest events numbered above `after` that `keep`
    /// accepts, at least `limit` of them if there are, and never half of one
    /// transaction's, so asking again after the last one skips nothing.
    pub fn events_after(
        &self,
        keep: Option<&dyn Fn(&Event) -> bool>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, ControlError> {
        let mut events = self.all_events()?;
        events.retain(|e| e.seq > after && keep.is_none_or(|k| k(e)));
        if let Some(last) = events.get(limit.max(1) - 1).map(|e| e.seq) {
            events.retain(|e| e.seq <= last);
        }
        Ok(events)
    }

    pub(crate) fn services(&self) -> Result<Vec<Service>, ControlError> {
        let nodes: HashMap<String, Node> = self
            .list::<Node>(&keys::NODES)?
            .into_iter()
            .filter(|n| n.state == NodeState::Ready)
            .map(|n| (n.name.clone(), n))
            .collect();
        let replicas = self.list::<Replica>(&keys::REPLICAS)?;
        Ok(self
            .list::<App>(&keys::APPS)?
            .into_iter()
            .filter_map(|app| {
                let http = app.spec.http.as_ref()?;
                let key = app.spec.key();
                let endpoints = replicas
                    .iter()
                    .filter(|r| r.app == key && r.phase == Phase::Ready)
                    .filter_map(|r| {
                        let node = nodes.get(r.node.as_deref()?)?;
                        Some(ServiceEndpoint {
                            replica: r.id.clone(),
                            node: node.name.clone(),
                            gateway: node.gateway.clone(),
                        })
                    })
                    .collect();
                Some(Service {
                    host: format!("{}.{}", key.name, key.namespace),
                    routes: http.routes.iter().map(|r| r.to_string()).collect(),
                    callers: app
                        .spec
                        .inbound()
                        .callers()
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                    namespace: key.namespace,
                    name: key.name,
                    endpoints,
                })
            })
            .collect())
    }

    pub(crate) fn node_summaries(&self) -> Result<Vec<NodeSummary>, ControlError> {
        let replicas = self.list::<Replica>(&keys::REPLICAS)?;
        let leases: HashMap<String, Millis> = self
            .list::<Lease>(&keys::LEASES)?
            .into_iter()
            .map(|l| (l.node, l.renewed_at))
            .collect();
        let (now, grace) = (self.now(), self.config().node_grace.as_millis() as u64);
        Ok(self
            .list::<Node>(&keys::NODES)?
            .into_iter()
            .map(|node| {
                let mut allocated = Capacity::default();
                let mut count = 0;
                for r in replicas
                    .iter()
                    .filter(|r| r.is_active() && r.node.as_deref() == Some(&node.name))
                {
                    allocated.add(&Capacity::of(&r.resources));
                    count += 1;
                }
                let last_heartbeat = leases.get(&node.name).copied().unwrap_or(0);
                let (usage, _) = self.inner.metrics.node(&node.name, now);
                NodeSummary {
                    silent: node.state == NodeState::Ready
                        && now.saturating_sub(last_heartbeat) > grace,
                    instances_alive: usage.and_then(|u| u.instances),
                    last_heartbeat,
                    node,
                    allocated,
                    replicas: count,
                }
            })
            .collect())
    }

    /// Why this server is not healthy, for `GET /v1/healthz`: its store does not answer (etcd
    /// without a quorum), cannot write (redb after a failed write, a full disk say, until the
    /// server is restarted), or the
    /// controller's passes have failed for [`UNHEALTHY_AFTER`] on end. Details go to the
    /// log, not to this public answer.
    pub(crate) fn unhealthy(&self) -> Option<String> {
        if let Some(why) = self.store_unhealthy() {
            return Some(why);
        }
        if self.inner.store.write_failure().is_some() {
            return Some(
                "the store cannot write (see the server log); restart the server once the cause (a full disk?) is fixed".into(),
            );
        }
        let failing = self.inner.failing.lock().expect("failing lock");
        match &*failing {
            Some(since) if since.elapsed() >= UNHEALTHY_AFTER => Some(format!(
                "the controller's passes have failed for {} s (see the server log)",
                since.elapsed().as_secs()
            )),
            _ => None,
        }
    }

    /// Whether the store answers, asked at most once per [`STORE_CHECK_EVERY`]: the health
    /// check is public, and a flood of probes must not become a flood of quorum reads.
    fn store_unhealthy(&self) -> Option<String> {
        let mut last = self
            .inner
            .store_checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, why)) = &*last
            && self.steady_now().saturating_sub(*at) < STORE_CHECK_EVERY.as_millis() as u64
        {
            return why.clone();
        }
        let why = self.inner.store.check().err().map(|e| {
            tracing::warn!(error = %e, "the store does not answer the health check");
            "the store does not answer now (see the server log)".to_string()
        });
        *last = Some((self.steady_now(), why.clone()));
        why
    }

    /// Records whether the controller's last pass failed, for [`ControlPlane::unhealthy`].
    pub(crate) fn pass_failed(&self, failed: bool) {
        let mut failing = self.inner.failing.lock().expect("failing lock");
        *failing = failed.then(|| failing.unwrap_or_else(std::time::Instant::now));
    }

    // ---- node-facing ----

    /// A node (re)joins: its record is replaced, keeping its join time and
    /// whether it was cordoned (unless the cordon was its own, made as it shut
    /// down: [`Node::leaving`]), and its lease is renewed.
    pub fn register_node(&self, node: Node) -> Result<u64, ControlError> {
        shoal_core::validate_name(&node.name).map_err(|e| {
            ControlError::invalid(ErrorCode::InvalidNode, format!("node name: {e}"))
        })?;
        let key = keys::node(&node.name);
        // Compare-and-swap, so a cordon or drain landing meanwhile is kept.
        for _ in 0..5 {
            let previous = self.get::<Node>(&key)?;
            let mut node = node.clone();
            node.state = NodeState::Ready;
            let txn = match &previous {
                Some((old, mod_rev)) => {
                    node.joined_at = old.joined_at;
                    // What an operator labelled stays: the node declares only its own.
                    node.label_overrides = old.label_overrides.clone();
                    let declared = std::mem::take(&mut node.labels);
                    node.declare_labels(declared);
                    // Back from a shutdown that drained it: as it was before. The record
                    // says so, never the node.
                    match old.leaving {
                        Some(before) => {
                            node.schedulable = before.schedulable;
                            node.draining = false;
                        }
                        None => {
                            node.schedulable = old.schedulable;
                            node.draining = old.draining;
                        }
                    }
                    node.leaving = None;
                    Txn::new().when_mod_revision(key.clone(), *mod_rev)
                }
                None => {
                    node.leaving = None;
                    node.label_overrides.clear();
                    Txn::new().when_absent(key.clone())
                }
            };
            let lease = Lease {
                node: node.name.clone(),
                renewed_at: self.now(),
            };
            let txn = txn
                .then(Op::put(key.clone(), encode(&node)))
                .then(Op::put(keys::lease(&node.name), encode(&lease)))
                .then(self.event_op(
                    EventType::Normal,
                    "NodeReady",
                    format!("node/{}", node.name),
                    None,
                    format!("node {} joined with gateway {}", node.name, node.gateway),
                ));
            let resp = self.inner.store.txn(txn)?;
            if resp.succeeded {
                self.node_started(&node.name);
                self.inner.kick.notify_one();
                return Ok(resp.revision);
            }
        }
        Err(ControlError::conflict(format!(
            "node {} kept changing while it registered; try again",
            node.name
        )))
    }

    /// Renews a node's lease; a NotReady node that heartbeats is Ready again. What it says
    /// of its guests' memory is kept for `shoal top`.
    pub fn heartbeat(&self, name: &str, usage: Option<NodeUsage>) -> Result<(), ControlError> {
        self.inner.observed.heartbeats.inc();
        let key = keys::node(name);
        let Some((mut node, mod_rev)) = self.get::<Node>(&key)? else {
            return Err(ControlError::not_found(format!(
                "node {name} is not registered"
            )));
        };
        let lease = Lease {
            node: name.to_string(),
            renewed_at: self.now(),
        };
        let mut txn = Txn::new().then(Op::put(keys::lease(name), encode(&lease)));
        if node.state != NodeState::Ready {
            node.state = NodeState::Ready;
            txn = txn
                .when_mod_revision(key.clone(), mod_rev)
                .then(Op::put(key, encode(&node)))
                .then(self.event_op(
                    EventType::Normal,
                    "NodeReady",
                    format!("node/{name}"),
                    None,
                    format!("node {name} is sending heartbeats again"),
                ));
        }
        self.inner.store.txn(txn)?;
        if let Some(usage) = usage {
            self.share(|| crate::shared_reports::Report::Usage {
                node: name.to_string(),
                usage,
            });
            self.inner.metrics.set_usage(name, usage, self.steady_now());
        }
        Ok(())
    }

    /// Cordon, uncordon or drain a node. Draining cordons it too, and the
    /// controller then replaces its replicas elsewhere, new before old.
    pub(crate) fn set_node_scheduling(
        &self,
        name: &str,
        action: NodeAction,
    ) -> Result<Node, ControlError> {
        let key = keys::node(name);
        let Some((mut node, mod_rev)) = self.get::<Node>(&key)? else {
            return Err(ControlError::not_found(format!(
                "node {name} does not exist"
            )));
        };
        let (schedulable, draining, reason) = match action {
            // A drain the node made itself, shutting down, is not the operator's to keep.
            NodeAction::Cordon => (false, node.draining && node.leaving.is_none(), "Cordoned"),
            NodeAction::Uncordon => (true, false, "Uncordoned"),
            NodeAction::Drain => (false, true, "Draining"),
        };
        // Asked again: nothing changes, and no second event says it did.
        if (node.schedulable, node.draining, node.leaving.is_none())
            == (schedulable, draining, true)
        {
            return Ok(node);
        }
        node.schedulable = schedulable;
        node.draining = draining;
        // The operator's word from now on: a node back from shutting down keeps it.
        node.leaving = None;
        let txn = Txn::new()
            .when_mod_revision(key.clone(), mod_rev)
            .then(Op::put(key, encode(&node)))
            .then(self.event_op(
                EventType::Normal,
                reason,
                format!("node/{name}"),
                None,
                format!("node {name}: {}", reason.to_lowercase()),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "node {name} changed concurrently; try again"
            )));
        }
        self.inner.kick.notify_one();
        Ok(node)
    }

    /// `shoal node label`: sets and removes a node's labels ([`Node::relabel`]); replicas
    /// whose `node_selector` it no longer matches then move, as after any label change.
    pub(crate) fn label_node(&self, name: &str, change: NodeLabels) -> Result<Node, ControlError> {
        use shoal_core::objects::RelabelError;
        let key = keys::node(name);
        let Some((mut node, mod_rev)) = self.get::<Node>(&key)? else {
            return Err(ControlError::not_found(format!(
                "node {name} does not exist"
            )));
        };
        let changes = node
            .relabel(&change.set, &change.remove, change.overwrite)
            .map_err(|e| match e {
                RelabelError::Invalid(m) => ControlError::invalid(ErrorCode::InvalidNode, m),
                RelabelError::HasAnother(m) => ControlError::conflict(m),
            })?;
        if changes.is_empty() {
            return Ok(node);
        }
        let txn = Txn::new()
            .when_mod_revision(key.clone(), mod_rev)
            .then(Op::put(key, encode(&node)))
            .then(self.event_op(
                EventType::Normal,
                "Labeled",
                format!("node/{name}"),
                None,
                format!("node {name}: {}", changes.join(", ")),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "node {name} changed concurrently; try again"
            )));
        }
        self.inner.kick.notify_one();
        Ok(node)
    }

    /// A node shutting down asks for its replicas to move elsewhere, new before old, as a
    /// drain does: kubelet's graceful node shutdown, Nomad's `drain_on_shutdown`. Marked
    /// [`Node::leaving`] with whether it was schedulable, so that registering again lifts
    /// the drain and a cordon that was its own, never an operator's. A node an operator
    /// drains already is left as it is.
    pub fn leave_node(&self, name: &str) -> Result<Node, ControlError> {
        let key = keys::node(name);
        for _ in 0..5 {
            let Some((mut node, mod_rev)) = self.get::<Node>(&key)? else {
                return Err(ControlError::not_found(format!(
                    "node {name} does not exist"
                )));
            };
            if node.draining {
                return Ok(node);
            }
            node.leaving = Some(Leaving {
                schedulable: node.schedulable,
            });
            node.schedulable = false;
            node.draining = true;
            let txn = Txn::new()
                .when_mod_revision(key.clone(), mod_rev)
                .then(Op::put(key.clone(), encode(&node)))
                .then(self.event_op(
                    EventType::Normal,
                    "Leaving",
                    format!("node/{name}"),
                    None,
                    format!(
                        "node {name} is shutting down: its replicas move to other nodes, new before old"
                    ),
                ));
            if self.inner.store.txn(txn)?.succeeded {
                self.inner.kick.notify_one();
                return Ok(node);
            }
        }
        Err(ControlError::conflict(format!(
            "node {name} kept changing while it left; try again"
        )))
    }

    /// Records what a node says about a replica. Reports about replicas that
    /// no longer exist, or that belong to another node, are dropped.
    pub fn report_replica(&self, report: ReplicaReport) -> Result<(), ControlError> {
        let key = keys::replica(&report.app, &report.replica);
        for _ in 0..3 {
            let Some((mut replica, mod_rev)) = self.get::<Replica>(&key)? else {
                return Ok(());
            };
            if replica.node.as_deref() != Some(report.node.as_str()) {
                return Ok(());
            }
            if replica.phase == report.phase
                && replica.message == report.message
                && replica.exit_code == report.exit_code
                && replica.restarts == report.restarts
                && replica.reason == report.reason
            {
                return Ok(());
            }
            let replica_restarts = replica.restarts;
            let was_serving = replica.serving();
            // What a record from before `ready_since` counts from (`Replica::available`).
            let serving_since = replica.ready_since.unwrap_or(replica.updated_at);
            replica.phase = report.phase;
            replica.message = report.message.clone();
            replica.exit_code = report.exit_code;
            replica.restarts = report.restarts;
            replica.reason = report.reason.clone();
            replica.updated_at = self.now();
            // Serving again after a restart is serving anew: `min_ready` counts from then.
            replica.ready_since = match replica.serving() {
                false => None,
                true if !was_serving || report.restarts > replica_restarts => {
                    Some(replica.updated_at)
                }
                true => Some(serving_since),
            };
            let (kind, reason) = match report.phase {
                Phase::Pending => (EventType::Normal, "Pending"),
                Phase::Starting => (EventType::Normal, "Starting"),
                Phase::Ready if report.restarts > replica_restarts => {
                    (EventType::Warning, "Restarted")
                }
                Phase::Ready => (EventType::Normal, "Ready"),
                Phase::Unready => (EventType::Warning, "Unready"),
                Phase::Running => (EventType::Normal, "Started"),
                Phase::Succeeded => (EventType::Normal, "Succeeded"),
                Phase::CrashLoopBackOff => (EventType::Warning, "BackOff"),
                Phase::Failed => (EventType::Warning, "Failed"),
            };
            let mut message = format!(
                "replica {} on node {}: {}",
                report.replica, report.node, report.phase
            );
            if let Some(m) = &report.message {
                message.push_str(&format!(" ({m})"));
            }
            let txn = Txn::new()
                .when_mod_revision(key.clone(), mod_rev)
                .then(Op::put(key.clone(), encode(&replica)))
                .then(self.event_op(
                    kind,
                    reason,
                    format!("replica/{}/{}", report.app, report.replica),
                    Some(&report.app),
                    message,
                ));
            if self.inner.store.txn(txn)?.succeeded {
                return Ok(());
            }
        }
        Err(ControlError::conflict(format!(
            "replica {} kept changing while its status was reported",
            report.replica
        )))
    }

    /// Every app, revision, replica, node and rollout, for node agents and
    /// gateways to act on, and the revision their watch continues after.
    ///
    /// Each kind is listed in its own read, so the lists may be of different
    /// moments; the revision is taken before the first, so every change a list
    /// misses comes after it and the watch delivers it. A change that a list
    /// already reflects is delivered too, and replaying it is harmless: deltas
    /// carry whole objects and are applied in order, so an object may look
    /// older for a moment, and is as the store has it once the changes after
    /// its list are applied.
    pub fn snapshot(&self) -> Result<Snapshot, ControlError> {
        Ok(Snapshot {
            revision: self.inner.store.revision(),
            store: self.inner.store.id(),
            apps: self.list::<App>(&keys::APPS)?,
            revisions: self.list::<Revision>(&keys::REVISIONS)?,
            replicas: self.list::<Replica>(&keys::REPLICAS)?,
            nodes: self.list::<Node>(&keys::NODES)?,
            rollouts: self.list::<RolloutStatus>(&keys::ROLLOUTS)?,
        })
    }

    pub fn module_path(&self, digest: &str) -> std::path::PathBuf {
        self.inner.blobs.path(digest)
    }
}

/// What an apply of `spec` keeps of `old`'s job status. A schedule that
/// changes counts from the apply, as a new app's counts from its creation:
/// firings of the new schedule before it are not missed runs.
fn job_status(old: &App, spec: &AppSpec, now: Millis) -> JobStatus {
    let (was, is) = (&old.spec.runs, &spec.runs);
    let mut status = old.job.clone();
    if is.schedule.is_some() && (is.schedule != was.schedule || is.timezone != was.timezone) {
        status.last_scheduled = Some(now);
    }
    status
}

/// The routes an app serves.
fn routes_of(spec: &AppSpec) -> &[Route] {
    spec.http.as_ref().map_or(&[][..], |h| &h.routes)
}

/// What an apply claims of the routes its app serves ([`ControlPlane::route_claims`]).
#[derive(Default)]
struct RouteClaims {
    /// Each route, with the revision of its claim if the app holds it already.
    routes: Vec<(Route, Option<u64>)>,
    /// Keys read to judge the new claims, at the revision read (`None`: absent): claims of
    /// routes above a new any-host one, and the records of hosts it binds.
    guards: BTreeMap<String, Option<u64>>,
    /// Hosts whose [`RouteHost`] record the new claims rewrite.
    hosts: std::collections::BTreeSet<String>,
}

/// Adds to an apply's `txn` the route claims of `app`: each route it serves
/// is held (already its own, unchanged since read) or taken (nobody's), and
/// those it no longer serves are let go. A route another apply took meanwhile,
/// or a claim on what was read to judge them, voids the transaction.
fn claim_routes(
    mut txn: Txn,
    app: &AppKey,
    claims: RouteClaims,
    old: &[Route],
    new: &[Route],
) -> Txn {
    for (key, read) in claims.guards {
        txn = match read {
            Some(at) => txn.when_mod_revision(key, at),
            None => txn.when_absent(key),
        };
    }
    for host in claims.hosts {
        let owner = shoal_core::RouteHost {
            namespace: app.namespace.clone(),
        };
        txn = txn.then(Op::put(keys::route_host(&host), encode(&owner)));
    }
    for (route, held) in claims.routes {
        let k = keys::route(&route);
        txn = match held {
            Some(mod_rev) => txn.when_mod_revision(&k, mod_rev),
            None => {
                let claim = RouteClaim {
                    route,
                    app: app.clone(),
                };
                txn.when_absent(&k).then(Op::put(&k, encode(&claim)))
            }
        };
    }
    for gone in old.iter().filter(|r| !new.contains(r)) {
        txn = txn.then(Op::delete(keys::route(gone)));
    }
    txn
}

/// The longest value a spec diff prints; a longer one is said to have changed.
const LONG_VALUE: usize = 120;

/// Field-level differences between two specs, `path: old -> new`, from
/// their JSON forms so every field is covered without a hand-written list.
fn diff(old: &AppSpec, new: &AppSpec) -> Vec<String> {
    fn flatten(prefix: String, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(p, v, out);
                }
            }
            other => {
                out.insert(prefix, other.to_string());
            }
        }
    }
    // Sections at their defaults are left out of a stored spec: what they hold is their
    // defaults', not nothing, so adding `[rollout]` with one setting is one change.
    let mut defaults = BTreeMap::new();
    let sections = serde_json::json!({
        "placement": shoal_core::spec::Placement::default(),
        "runs": shoal_core::spec::JobRuns::default(),
        "health": shoal_core::spec::Health::default(),
        "rollout": shoal_core::spec::Rollout::default(),
        "scale": shoal_core::spec::Scale::default(),
    });
    flatten(String::new(), &sections, &mut defaults);
    // Left out of a stored rollout while 0, its default.
    defaults.insert("rollout.min_ready_ms".to_string(), "0".to_string());
    // The config sets an apply resolved are their names in order, then each set's values by
    // key, as `[config]`'s are: one value changed is one line, not the whole list again.
    let value = |spec: &AppSpec| {
        let mut v = serde_json::to_value(spec).expect("spec serialises");
        if let Some(sets) = v.get_mut("config_sets").map(serde_json::Value::take) {
            let sets = sets.as_array().cloned().unwrap_or_default();
            let names: Vec<&serde_json::Value> = sets.iter().map(|s| &s["name"]).collect();
            v["config_sets"] = serde_json::json!(names);
            let values: serde_json::Map<String, serde_json::Value> = sets
                .iter()
                .filter_map(|s| Some((s["name"].as_str()?.to_string(), s["data"].clone())))
                .collect();
            v["config_set"] = values.into();
        }
        v
    };
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(String::new(), &value(old), &mut a);
    flatten(String::new(), &value(new), &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            let (x, y) = (x.or(defaults.get(k)), y.or(defaults.get(k)));
            // Env values may be secrets: say that they changed, not what they are.
            if k.starts_with("env.") && x != y {
                let what = match (x, y) {
                    (None, _) => "added",
                    (_, None) => "removed",
                    _ => "changed",
                };
                return Some(format!("{k}: {what}"));
            }
            (x != y).then(|| {
                let (name, x) = readable(k, x.map(String::as_str));
                let (_, y) = readable(k, y.map(String::as_str));
                // A long value (a file's worth of config) is said to change, not printed.
                match x.len().max(y.len()) > LONG_VALUE {
                    true => format!("{name}: changed"),
                    false => format!("{name}: {x} -> {y}"),
                }
            })
        })
        .collect()
}

/// A stored field and its value as the spec file writes them: `rollout.progress_deadline:
/// 10m`, not `rollout.progress_deadline_ms: 600000`; `requests.memory: 64Mi`, not bytes.
fn readable(key: &str, value: Option<&str>) -> (String, String) {
    const UNITS: [&str; 5] = ["_ms", "_bytes", "_millis", "_bp", "_pct"];
    let Some((name, unit)) = UNITS
        .iter()
        .find_map(|u| key.strip_suffix(u).map(|name| (name, *u)))
    else {
        return (key.to_string(), value.unwrap_or("(none)").to_string());
    };
    let Some(n) = value.and_then(|v| v.parse::<u64>().ok()) else {
        return (name.to_string(), value.unwrap_or("(none)").to_string());
    };
    let value = match unit {
        "_ms" => shoal_core::quantity::format_duration_ms(n),
        "_bytes" => shoal_core::quantity::format_memory(n),
        "_millis" => format!("{n}m"),
        // Basis points and percents of what the file writes as a fraction or a ratio.
        "_bp" => (n as f64 / 10_000.0).to_string(),
        _ => (n as f64 / 100.0).to_string(),
    };
    (name.to_string(), value)
}

/// The leader key and its revision when this server won the leadership of a shared store
/// (none: the store is its own); see [`ControlPlane::fence`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Fence(Option<(String, u64)>);

impl Fence {
    /// `txn`, taking effect only while the leadership is still the one fenced.
    pub(crate) fn guard(&self, txn: Txn) -> Txn {
        match &self.0 {
            Some((key, revision)) => txn.when_mod_revision(key.clone(), *revision),
            None => txn,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shoal_core::spec::parse_app;
    use shoal_store::{BlobStore, Store};

    /// What an automatic rollback from revision `from` writes: the app back on revision
    /// `to`, whose spec is `spec`, and `from`'s outcome.
    fn rolled_back_automatically(cp: &ControlPlane, spec: &AppSpec, to: u64, from: u64) {
        let key = spec.key();
        let (mut app, _) = cp.get::<App>(&keys::app(&key)).unwrap().unwrap();
        app.spec = spec.clone();
        app.revision = to;
        let (mut rev, _) = cp
            .get::<Revision>(&keys::revision(&key, from))
            .unwrap()
            .unwrap();
        rev.outcome = Some("rolled back: no progress".into());
        cp.store()
            .txn(
                Txn::new()
                    .then(Op::put(keys::app(&key), encode(&app)))
                    .then(Op::put(keys::revision(&key, from), encode(&rev))),
            )
            .unwrap();
    }

    /// An apply says when `reuse_concurrent` changes nothing: the uploaded module's exports
    /// tell a WASIp2 component, whose instances serve one request at a time.
    #[test]
    fn reuse_concurrent_on_a_p2_component_is_applied_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let mut app = spec(&cp, "web", &["/web"]);
        let http = app.http.as_mut().unwrap();
        http.reuse = 128;
        http.reuse_concurrent = 4;
        let exports = |handler: &str| {
            let key = keys::module(&app.component.digest);
            let (mut module, _) = cp.get::<Module>(&key).unwrap().unwrap();
            module.exports = Some(vec![format!("wasi:http/{handler}")]);
            cp.store()
                .txn(Txn::new().then(Op::put(&key, encode(&module))))
                .unwrap();
        };
        exports("incoming-handler@0.2.6");
        let result = cp.apply(app.clone(), true).unwrap();
        assert!(
            result.warnings.len() == 1 && result.warnings[0].contains("served as WASIp2"),
            "{:?}",
            result.warnings
        );
        exports("handler@0.3.0-rc-2025-09-16");
        let result = cp.apply(app, true).unwrap();
        assert!(result.warnings.is_empty(), "{:?}", result.warnings);
    }

    /// After an automatic rollback and a fix, a plain `rollout undo` goes back to what ran
    /// before the failed build, not to that build (which a named revision still gets).
    #[test]
    fn a_plain_undo_skips_a_revision_that_was_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let good = spec(&cp, "web", &["/web"]);
        let mut bad = good.clone();
        bad.env.insert("BROKEN".into(), "1".into());
        cp.apply(good.clone(), false).unwrap();
        cp.apply(bad.clone(), false).unwrap();
        rolled_back_automatically(&cp, &good, 1, 2);
        let mut fix = good.clone();
        fix.env.insert("FIX".into(), "1".into());
        assert_eq!(cp.apply(fix, false).unwrap().app.revision, 3);
        let undone = cp.rollback(&good.key(), None).unwrap();
        assert_eq!(
            (undone.app.revision, undone.app.spec.template()),
            (4, good.template())
        );
        // It says what it undid; a restart undoes nothing.
        let revision = |n| cp.get::<Revision>(&keys::revision(&good.key(), n)).unwrap();
        assert_eq!(revision(4).unwrap().0.undid, Some(3));
        cp.restart(&good.key()).unwrap();
        assert_eq!(revision(5).unwrap().0.undid, None);
        assert!(undone.warnings.is_empty(), "{:?}", undone.warnings);
        let named = cp.rollback(&good.key(), Some(2)).unwrap();
        assert_eq!(named.app.spec.template(), bad.template());
        // Named, it runs again, but not without a word.
        assert_eq!(named.warnings.len(), 1, "{:?}", named.warnings);
        assert!(
            named.warnings[0].starts_with("revision 2 was rolled back: no progress"),
            "{:?}",
            named.warnings
        );
    }

    /// A restart after an automatic rollback does not let the template that was rolled back
    /// out again by the same file: the gate looks past the restart's copy.
    #[test]
    fn a_restart_does_not_open_the_gate_on_a_rolled_back_template() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let good = spec(&cp, "web", &["/web"]);
        let mut bad = good.clone();
        bad.env.insert("BROKEN".into(), "1".into());
        cp.apply(good.clone(), false).unwrap();
        cp.apply(bad.clone(), false).unwrap();
        let key = good.key();
        rolled_back_automatically(&cp, &good, 1, 2);
        assert!(matches!(
            cp.apply(bad.clone(), false),
            Err(ControlError::Conflict(_))
        ));
        let restarted = cp.restart(&key).unwrap();
        assert_eq!(restarted.app.revision, 3);
        let e = cp.apply(bad.clone(), false).unwrap_err();
        assert!(e.to_string().contains("revision 2"), "{e}");
        // --retry still rolls it out.
        assert_eq!(
            cp.apply_retrying(bad, false, true, None)
                .unwrap()
                .app
                .revision,
            4
        );
    }

    /// A volume deleted while an app that mounts it is applied: either the deletion is
    /// refused or comes first (and the apply makes it again), never an app mounting nothing.
    #[test]
    fn a_volume_is_not_deleted_under_an_app_applied_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let mounting = |name: &str| {
            let src = format!(
                "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"job\"\n[[volumes]]\nname = \"data\"\nmount = \"/data\"\n"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let mut lost = Vec::new();
        for i in 0..20 {
            let first = mounting(&format!("first{i}"));
            cp.apply(first.clone(), false).unwrap();
            cp.delete_app(&first.key()).unwrap();
            let second = mounting(&format!("second{i}"));
            let start = std::sync::Barrier::new(2);
            let applied = std::thread::scope(|s| {
                s.spawn(|| {
                    start.wait();
                    let _ = cp.delete_volume("default", "data");
                });
                let applied = s.spawn(|| {
                    start.wait();
                    cp.apply(second.clone(), false).is_ok()
                });
                applied.join().unwrap()
            });
            let volume = cp.get::<Volume>(&keys::volume("default", "data")).unwrap();
            if applied && volume.is_none() {
                lost.push(i);
            }
            cp.delete_app(&second.key()).unwrap();
        }
        assert!(
            lost.is_empty(),
            "rounds where the app mounts no volume: {lost:?}"
        );
    }

    /// Re-applying an autoscaled app's unchanged file keeps the size a schedule window gave
    /// it: clamped to the app's own bounds, it was a change, undone by the next pass.
    #[test]
    fn an_unchanged_autoscaled_app_keeps_the_size_its_window_gave() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/web\"]\n[scale]\nmin = 1\nmax = 4\n[[scale.schedule]]\nname = \"always\"\ncron = \"* * * * *\"\nduration = \"1h\"\nmax = 10\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        cp.apply(spec.clone(), false).unwrap();
        let key = keys::app(&spec.key());
        let (mut app, _) = cp.get::<App>(&key).unwrap().unwrap();
        app.spec.replicas = 8;
        cp.store()
            .txn(Txn::new().then(Op::put(&key, encode(&app))))
            .unwrap();
        assert_eq!(
            cp.apply(spec, false).unwrap().outcome,
            ApplyOutcome::Unchanged
        );
        assert_eq!(cp.get::<App>(&key).unwrap().unwrap().0.spec.replicas, 8);
    }

    /// A spec that gives no size takes the volume's as it is, now and later: a reader's apply
    /// set a writer's 10 MiB volume to the default 1 GiB, which its node let the writer fill.
    #[test]
    fn a_mount_without_a_size_takes_the_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |name: &str, extra: &str| {
            let src = format!(
                "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"daemon\"\n[[volumes]]\nname = \"data\"\nmount = \"/data\"\n{extra}"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let size = || {
            let volume = cp.get::<Volume>(&keys::volume("default", "data")).unwrap();
            volume.unwrap().0.size_bytes
        };
        cp.apply(spec("writer", "size = \"10Mi\"\n"), false)
            .unwrap();
        let reader = spec("reader", "read_only = true\n");
        cp.apply(reader.clone(), false).unwrap();
        assert_eq!(size(), 10 << 20);
        // Its spec still gives none: when the writer resizes the volume, applying the reader
        // again (as a config set's change does) leaves it as it is, and changes nothing.
        cp.apply(spec("writer", "size = \"20Mi\"\n"), false)
            .unwrap();
        let again = cp.apply(reader.clone(), false).unwrap();
        assert_eq!(again.outcome, ApplyOutcome::Unchanged);
        let stored = cp.describe(&reader.key()).unwrap().app.spec;
        assert_eq!(stored.volumes[0].size_bytes, None);
        let mut changed = reader;
        changed.env.insert("X".into(), "1".into());
        cp.apply(changed, false).unwrap();
        assert_eq!(size(), 20 << 20);
        // The volume's first spec giving none makes it of the default size.
        cp.delete_app(&stored.key()).unwrap();
        cp.delete_app(&spec("writer", "").key()).unwrap();
        cp.delete_volume("default", "data").unwrap();
        cp.apply(spec("reader", ""), false).unwrap();
        assert_eq!(size(), shoal_core::spec::DEFAULT_VOLUME_BYTES);
    }

    /// A deleted volume's node is told to remove its data (and only then does so); until it
    /// has, no volume of that name is made again, so the new one never starts with the old
    /// data. A node deleted for good takes that with it.
    #[test]
    fn a_deleted_volumes_data_goes_before_its_name_is_used_again() {
        use shoal_api::VolumeUsage;
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |name: &str| {
            let src = format!(
                "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"daemon\"\n[[volumes]]\nname = \"data\"\nmount = \"/data\"\n"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let bind = |node: &str| {
            let vkey = keys::volume("default", "data");
            let (mut volume, _) = cp.get::<Volume>(&vkey).unwrap().unwrap();
            volume.node = Some(node.into());
            let put = Txn::new().then(Op::put(vkey.to_string(), encode(&volume)));
            cp.inner.store.txn(put).unwrap();
        };
        let report = |node: &str, holds: bool| {
            let usage = holds
                .then(|| VolumeUsage {
                    namespace: "default".into(),
                    name: "data".into(),
                    bytes: 7,
                    deleted: false,
                })
                .into_iter()
                .collect();
            let answer = cp.record_volume_usage(node, usage).unwrap();
            answer.iter().filter(|u| u.deleted).count()
        };
        cp.register_node(ready_node("n1")).unwrap();
        cp.apply(spec("a"), false).unwrap();
        bind("n1");
        // Bound and in use: nothing to remove; a directory the node has of no known volume
        // is not answered at all (the node keeps it).
        assert_eq!(report("n1", true), 0);
        cp.delete_app(&spec("a").key()).unwrap();
        cp.delete_volume("default", "data").unwrap();

        let refused = |dry_run: bool| match cp.apply(spec("b"), dry_run) {
            Err(ControlError::Conflict(m)) => m.contains("node n1 has not removed its data yet"),
            other => panic!("{other:?}"),
        };
        assert!(refused(true) && refused(false));
        // Another node is told nothing; n1, which still has the data, is told to remove it,
        // and once it no longer has it the name is free again.
        assert_eq!(report("n2", true), 0);
        assert_eq!(report("n1", true), 1);
        assert!(refused(false));
        assert_eq!(report("n1", false), 0);
        cp.apply(spec("b"), false).unwrap();

        // A node deleted for good frees the names of the volumes deleted in its absence.
        bind("n1");
        cp.delete_app(&spec("b").key()).unwrap();
        cp.delete_volume("default", "data").unwrap();
        assert!(refused(false));
        cp.delete_node("n1").unwrap();
        cp.apply(spec("c"), false).unwrap();
        // A volume bound to a node deleted before it is deleted leaves nothing behind.
        bind("n1");
        cp.delete_app(&spec("c").key()).unwrap();
        cp.delete_volume("default", "data").unwrap();
        cp.apply(spec("d"), false).unwrap();
    }

    /// A rollback to a revision mounting a volume deleted since is refused, as one naming a
    /// deleted secret is: its replicas would each get a directory no record names, on
    /// whatever node, which the node then removes with what was written there.
    #[test]
    fn a_rollback_to_a_revision_mounting_a_deleted_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |mounts: bool| {
            let volume = match mounts {
                true => "[[volumes]]\nname = \"data\"\nmount = \"/data\"\n",
                false => "",
            };
            let src = format!(
                "name = \"d\"\n[component]\ndigest = \"{digest}\"\nkind = \"daemon\"\n[env]\nMOUNTS = \"{mounts}\"\n{volume}"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let key = spec(true).key();
        cp.apply(spec(true), false).unwrap();
        cp.apply(spec(false), false).unwrap();
        cp.delete_volume("default", "data").unwrap();
        let refused = cp.rollback(&key, Some(1)).unwrap_err();
        assert!(
            matches!(&refused, ControlError::Conflict(m) if m.contains("volume data, which has been deleted since")),
            "{refused}"
        );
        assert_eq!(cp.describe(&key).unwrap().app.revision, 2);
        // While the volume is there, a rollback mounts it as it was.
        cp.apply(spec(true), false).unwrap();
        cp.apply(spec(false), false).unwrap();
        assert!(cp.rollback(&key, Some(3)).is_ok());
    }

    /// A rollback sets the volume's size to what the revision gave, as an apply does, and is
    /// refused below what the volume holds: the revision's writers would each hit EDQUOT on
    /// their node, which sets the limit from the writers' specs.
    #[test]
    fn a_rollback_resizes_the_volume_and_never_below_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |size: &str| {
            let src = format!(
                "name = \"d\"\n[component]\ndigest = \"{digest}\"\nkind = \"daemon\"\n[[volumes]]\nname = \"data\"\nmount = \"/data\"\nsize = \"{size}\"\n"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let size = || {
            let volume = cp.get::<Volume>(&keys::volume("default", "data")).unwrap();
            volume.unwrap().0.size_bytes
        };
        let key = spec("10Mi").key();
        cp.apply(spec("10Mi"), false).unwrap();
        cp.apply(spec("20Mi"), false).unwrap();
        cp.apply(spec("30Mi"), false).unwrap();
        cp.rollback(&key, Some(2)).unwrap();
        assert_eq!(size(), 20 << 20);
        cp.inner
            .volume_usage
            .lock()
            .unwrap()
            .insert(("default".into(), "data".into()), 15 << 20);
        let refused = cp.rollback(&key, Some(1)).unwrap_err();
        assert!(
            matches!(&refused, ControlError::Conflict(m) if m.contains("volume data holds 15Mi: size = \"10Mi\" is less")),
            "{refused}"
        );
        assert_eq!(
            (cp.describe(&key).unwrap().app.revision, size()),
            (4, 20 << 20)
        );
        // An apply is refused the same way, and so is its dry run.
        for dry_run in [true, false] {
            assert!(matches!(
                cp.apply(spec("10Mi"), dry_run),
                Err(ControlError::Conflict(_))
            ));
        }
        cp.rollback(&key, Some(3)).unwrap();
        assert_eq!(size(), 30 << 20);

        // A restart is no rollback: the volume keeps its size even when the app's own spec
        // says less (another app sharing the volume made it bigger), and holding more than
        // that spec's size does not refuse it.
        let other = {
            let mut s = spec("40Mi");
            s.name = "e".into();
            s
        };
        cp.apply(other, false).unwrap();
        assert_eq!(size(), 40 << 20);
        cp.inner
            .volume_usage
            .lock()
            .unwrap()
            .insert(("default".into(), "data".into()), 35 << 20);
        cp.restart(&key).unwrap();
        assert_eq!(size(), 40 << 20);
    }

    /// An app applied again right after its deletion, while its replicas are still there,
    /// waits for the controller to take them away rather than adopt them as its own.
    #[test]
    fn an_app_made_again_does_not_take_the_replicas_of_the_one_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let web = spec(&cp, "web", &["/web"]);
        let key = web.key();
        cp.apply(web.clone(), false).unwrap();
        let old = replica_of(&web, "web-1", 1, "n1", Phase::Running);
        let at = keys::replica(&key, &old.id);
        cp.store()
            .txn(Txn::new().then(Op::put(&at, encode(&old))))
            .unwrap();
        cp.delete_app(&key).unwrap();
        let e = cp.apply(web.clone(), false).unwrap_err();
        assert!(
            matches!(&e, ControlError::Conflict(m) if m.contains("still being deleted (1 replicas left)")),
            "{e}"
        );
        assert!(
            cp.apply(web.clone(), true).is_ok(),
            "a dry run says what would be"
        );
        cp.store().txn(Txn::new().then(Op::delete(&at))).unwrap();
        assert_eq!(cp.apply(web, false).unwrap().outcome, ApplyOutcome::Created);
    }

    /// Two namespaces claiming at once a route each that the other's would forbid (a new
    /// host; a path, and a path under it): one is refused, never both applied, unless the
    /// path under came first, which it may.
    #[test]
    fn namespaces_claiming_at_once_do_not_both_get_a_host_or_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let in_ns = |name: &str, ns: &str, route: &str| {
            let mut s = spec(&cp, name, &[route]);
            s.namespace = ns.into();
            s
        };
        let mut both = Vec::new();
        for i in 0..30 {
            let pairs = [
                (
                    in_ns(&format!("site{i}"), "default", &format!("h{i}.example/")),
                    in_ns(&format!("cart{i}"), "team-a", &format!("h{i}.example/cart")),
                ),
                (
                    in_ns(&format!("p{i}"), "default", &format!("/p{i}")),
                    in_ns(&format!("q{i}"), "team-a", &format!("/p{i}/admin")),
                ),
            ];
            for (a, b) in pairs {
                let start = std::sync::Barrier::new(2);
                let (x, y) = std::thread::scope(|s| {
                    let x = s.spawn(|| {
                        start.wait();
                        cp.apply(a.clone(), false).is_ok()
                    });
                    let y = s.spawn(|| {
                        start.wait();
                        cp.apply(b.clone(), false).is_ok()
                    });
                    (x.join().unwrap(), y.join().unwrap())
                });
                assert!(
                    x || y,
                    "round {i}: neither of {} and {} applied",
                    a.name,
                    b.name
                );
                // A path under another namespace's is allowed only if it came first: it
                // takes no request the other served then.
                let claimed = |s: &AppSpec| {
                    let route = &s.http.as_ref().unwrap().routes[0];
                    cp.get(&keys::route(route)).unwrap().unwrap().1
                };
                let host = a.http.as_ref().unwrap().routes[0].host.is_some();
                if x && y && (host || claimed(&a) < claimed(&b)) {
                    both.push(format!("{} and {}", a.name, b.name));
                }
            }
        }
        assert!(
            both.is_empty(),
            "both applied, the second over the first: {both:?}"
        );
    }

    /// Servers sharing a store (etcd) count their events from the same number: each keeps
    /// the other's, and a restart goes on counting after both.
    #[test]
    fn servers_sharing_a_store_keep_each_others_events() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KvStore> =
            Arc::new(Store::open(&dir.path().join("state.redb")).unwrap());
        let server = |n: &str| {
            let blobs = BlobStore::open(&dir.path().join(n)).unwrap();
            let config = ControlConfig::default();
            ControlPlane::with_clock(store.clone(), blobs, config, Arc::new(SystemClock)).unwrap()
        };
        let (a, b) = (server("a"), server("b"));
        for (cp, said) in [(&a, "from a"), (&b, "from b"), (&a, "a again")] {
            let event = cp.event_op(EventType::Normal, "Said", "x".into(), None, said.into());
            store.txn(Txn::new().then(event)).unwrap();
        }
        let said = |cp: &ControlPlane| -> Vec<String> {
            let events = cp.events(None, 10).unwrap();
            events.into_iter().map(|e| e.message).collect()
        };
        assert_eq!(said(&b), ["from a", "from b", "a again"]);
        let c = server("c");
        let event = c.event_op(EventType::Normal, "Said", "x".into(), None, "from c".into());
        store.txn(Txn::new().then(event)).unwrap();
        assert_eq!(said(&c), ["from a", "from b", "a again", "from c"]);
    }

    /// An edit (`if_spec`) goes through over the spec it was made from, and is refused as a
    /// conflict over any other: one changed since, or a deleted app. One that changes nothing
    /// passes whatever it was made from, so a retried edit is not refused by its own write.
    #[test]
    fn an_edit_is_refused_over_a_spec_changed_since_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let first = spec(&cp, "web", &["/web"]);
        cp.apply(first.clone(), false).unwrap();
        let key = first.key();
        let base = cp.describe(&key).unwrap().fingerprint;
        let mut edit = first.clone();
        edit.env.insert("A".into(), "1".into());
        let done = cp.apply_retrying(edit.clone(), false, false, Some(&base));
        assert_eq!(done.unwrap().outcome, ApplyOutcome::Configured);
        // The same edit sent again, as a client does when its answer was lost.
        let again = cp.apply_retrying(edit.clone(), false, false, Some(&base));
        assert_eq!(again.unwrap().outcome, ApplyOutcome::Unchanged);
        // Another edit made from the first spec would undo A = 1.
        let mut stale = first.clone();
        stale.env.insert("B".into(), "2".into());
        let e = cp
            .apply_retrying(stale.clone(), true, false, Some(&base))
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Conflict(m) if m.contains("has changed")),
            "{e}"
        );
        let now = cp.describe(&key).unwrap().fingerprint;
        assert_ne!(now, base);
        assert!(
            cp.apply_retrying(stale.clone(), false, false, Some(&now))
                .is_ok()
        );
        cp.delete_app(&key).unwrap();
        let e = cp
            .apply_retrying(stale, false, false, Some(&now))
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Conflict(m) if m.contains("was deleted")),
            "{e}"
        );
    }

    /// An outbound grant naming an app (`APP` or `APP.NAMESPACE`) is applied with a warning:
    /// its calls go to the network, not to the app. Other hosts, and names of no app, pass.
    /// A reference within a longer env value that resolves to nothing is applied, passed as
    /// written, with a warning; the whole value naming nothing is refused.
    #[test]
    fn an_env_reference_to_nothing_is_warned_of_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let mut web = spec(&cp, "web", &["/web"]);
        web.env.insert("AT".into(), "$(app)@$(nodee)".into());
        let result = cp.apply(web.clone(), false).unwrap();
        assert_eq!(result.warnings.len(), 1, "{:?}", result.warnings);
        assert!(
            result.warnings[0].contains("$(nodee)"),
            "{:?}",
            result.warnings
        );
        web.env.insert("AT".into(), "$(nodee)".into());
        assert!(cp.apply(web, false).is_err());
    }

    #[test]
    fn an_outbound_grant_naming_an_app_is_applied_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.apply(spec(&cp, "billing", &["/billing"]), false)
            .unwrap();
        let mut web = spec(&cp, "web", &["/web"]);
        web.outbound = vec![
            "billing".into(),
            "billing.default:8080".into(),
            "ledger".into(),
            "api.example.com".into(),
        ];
        let result = cp.apply(web.clone(), false).unwrap();
        assert_eq!(result.warnings.len(), 2, "{:?}", result.warnings);
        assert!(
            result.warnings[0].starts_with("outbound grant \"billing\" names app default/billing"),
            "{:?}",
            result.warnings
        );
        assert!(
            result.warnings[1].contains("http://billing.default/"),
            "{:?}",
            result.warnings
        );
        web.outbound = vec!["api.example.com".into()];
        assert!(cp.apply(web, false).unwrap().warnings.is_empty());
    }

    /// A store call the runtime drops without running it, as one shutting down (SIGTERM)
    /// does, is a 503 to send again, not an internal error: nothing was done.
    #[test]
    fn a_call_dropped_by_a_runtime_shutting_down_is_unavailable() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.shutdown_background();
        let _on = handle.enter();
        match futures::executor::block_on(blocking(|| Ok(1))) {
            Err(ControlError::Unavailable(message)) => {
                assert!(message.contains("shutting down"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A clock a test sets.
    pub(crate) struct SetClock(pub(crate) std::sync::atomic::AtomicU64);

    impl shoal_core::clock::Clock for SetClock {
        fn now_ms(&self) -> Millis {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// What a replica's `min_ready` counts from: when its node first reports it serving, and
    /// again after a restart; nothing while it does not serve.
    #[test]
    fn a_replica_is_ready_since_its_node_says_it_serves_and_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(SetClock(1_000.into()));
        let cp = ControlPlane::with_clock(
            Arc::new(Store::open(&dir.path().join("state.redb")).unwrap()),
            BlobStore::open(&dir.path().join("modules")).unwrap(),
            ControlConfig::default(),
            clock.clone(),
        )
        .unwrap();
        let spec = spec(&cp, "web", &["/web"]);
        let key = keys::replica(&spec.key(), "r1");
        let replica = replica_of(&spec, "r1", 1, "n", Phase::Starting);
        cp.store()
            .txn(Txn::new().then(Op::put(key.clone(), encode(&replica))))
            .unwrap();
        let report = |phase, restarts, at: Millis| {
            clock.0.store(at, std::sync::atomic::Ordering::SeqCst);
            cp.report_replica(ReplicaReport {
                app: spec.key(),
                replica: "r1".into(),
                node: "n".into(),
                phase,
                message: None,
                exit_code: None,
                restarts,
                reason: None,
            })
            .unwrap();
            cp.get::<Replica>(&key).unwrap().unwrap().0.ready_since
        };
        assert_eq!(report(Phase::Ready, 0, 2_000), Some(2_000));
        assert_eq!(report(Phase::Ready, 0, 3_000), Some(2_000), "nothing new");
        assert_eq!(report(Phase::Ready, 1, 4_000), Some(4_000), "restarted");
        assert_eq!(report(Phase::Unready, 1, 5_000), None);
        assert_eq!(report(Phase::Ready, 1, 6_000), Some(6_000));
    }

    #[test]
    fn what_an_apply_changed_is_said_in_the_spec_files_words() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let spec = |extra: &str| {
            let src = format!(
                "name = \"x\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
                 [http]\nroutes = [\"/x\"]\n{extra}"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        let old = spec("");
        let new = spec(
            "[resources]\nrequests = { cpu = \"250m\", memory = \"32Mi\" }\n\
             [rollout]\nprogress_deadline = \"20s\"\n",
        );
        let changes = diff(&old, &new);
        let has = |prefix: &str, end: &str| {
            changes
                .iter()
                .any(|c| c.starts_with(prefix) && c.ends_with(end))
        };
        assert!(
            has("rollout.progress_deadline: 10m", " -> 20s"),
            "{changes:?}"
        );
        // The rest of `[rollout]` is as it was, by default.
        assert!(
            !changes.iter().any(|c| c.contains("max_surge")),
            "{changes:?}"
        );
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(has("resources.requests.cpu: ", " -> 250m"), "{changes:?}");
        assert!(
            has("resources.requests.memory: ", " -> 32Mi"),
            "{changes:?}"
        );
        let internal = changes
            .iter()
            .any(|c| c.contains("_ms") || c.contains("_bytes") || c.contains("_millis"));
        assert!(!internal, "{changes:?}");
        // A setting left out of the stored spec at its default reads as that default.
        let ready = spec("[rollout]\nmin_ready = \"15s\"\n");
        assert_eq!(diff(&old, &ready), ["rollout.min_ready: 0s -> 15s"]);

        // A config set's value is one line by its key, and a long one is not printed.
        let with_sets = |color: &str, motd: &str| {
            let mut s = spec("");
            let set = |name: &str, data: &[(&str, &str)]| shoal_core::spec::ConfigSetRef {
                name: name.into(),
                data: Some(
                    data.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            };
            s.config_sets = vec![
                set("shared", &[("color", color), ("motd", motd)]),
                set("team", &[]),
            ];
            s
        };
        let long = "x".repeat(1 << 20);
        let changes = diff(&with_sets("blue", "hi"), &with_sets("green", &long));
        assert_eq!(
            changes,
            [
                "config_set.shared.color: \"blue\" -> \"green\"",
                "config_set.shared.motd: changed"
            ]
        );
        let mut reordered = with_sets("blue", "hi");
        reordered.config_sets.reverse();
        assert_eq!(
            diff(&with_sets("blue", "hi"), &reordered),
            ["config_sets: [\"shared\",\"team\"] -> [\"team\",\"shared\"]"]
        );
    }

    /// A Ready, schedulable node `name` with its gateway at `name:8080`, for unit tests.
    pub(crate) fn ready_node(name: &str) -> Node {
        Node {
            name: name.into(),
            gateway: format!("{name}:8080"),
            capacity: Default::default(),
            labels: Default::default(),
            state: NodeState::Ready,
            schedulable: true,
            draining: false,
            leaving: None,
            joined_at: 0,
            label_overrides: Default::default(),
        }
    }

    /// A control plane on a fresh store in `dir`, for unit tests.
    pub(crate) fn control_plane(dir: &std::path::Path) -> ControlPlane {
        control_plane_with(dir, ControlConfig::default())
    }

    /// [`control_plane`] with `config`.
    pub(crate) fn control_plane_with(dir: &std::path::Path, config: ControlConfig) -> ControlPlane {
        let store = Store::open(&dir.join("state.redb")).unwrap();
        let blobs = BlobStore::open(&dir.join("modules")).unwrap();
        ControlPlane::new(store, blobs, config).unwrap()
    }

    /// A replica of `spec` at `revision` on `node`, in `phase`, as the scheduler's record of it.
    pub(crate) fn replica_of(
        spec: &AppSpec,
        id: &str,
        revision: u64,
        node: &str,
        phase: Phase,
    ) -> Replica {
        Replica {
            id: id.into(),
            app: spec.key(),
            revision,
            kind: spec.component.kind,
            resources: spec.resources.clone(),
            node: Some(node.into()),
            phase,
            message: None,
            exit_code: None,
            restarts: 0,
            reason: None,
            avoid: Vec::new(),
            scheduled_at: None,
            moving_since: None,
            note: None,
            ready_since: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// Records a component module as uploaded, as an upload would; returns its digest.
    pub(crate) fn uploaded(cp: &ControlPlane) -> String {
        let digest = format!("sha256:{}", "a".repeat(64));
        let module = Module {
            digest: digest.clone(),
            size: 1,
            kind: WasmKind::Component,
            uploaded_at: 0,
            oci: None,
            exports: None,
        };
        let k = keys::module(&digest);
        cp.store()
            .txn(Txn::new().then(Op::put(&k, encode(&module))))
            .unwrap();
        digest
    }

    /// An http app `name` serving `routes`, its module recorded as uploaded.
    fn spec(cp: &ControlPlane, name: &str, routes: &[&str]) -> AppSpec {
        let digest = uploaded(cp);
        let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
        let src = format!(
            "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [{}]\n",
            routes.join(", ")
        );
        parse_app(&src).unwrap().resolve(digest).unwrap()
    }

    fn holder(cp: &ControlPlane, route: &str) -> Option<String> {
        let route = Route::parse(route).unwrap();
        cp.get(&keys::route(&route))
            .unwrap()
            .map(|(c, _)| c.app.name)
    }

    /// Applies of several apps at once in a namespace with a quota each rewrite the quota:
    /// those that lose that race are judged again, so all that fit land, and no more.
    #[test]
    fn concurrent_applies_under_a_quota_are_judged_again_and_never_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.set_quota(
            "default",
            shoal_core::quota::QuotaLimits {
                apps: Some(6),
                ..Default::default()
            },
        )
        .unwrap();
        let specs: Vec<AppSpec> = (0..8)
            .map(|i| spec(&cp, &format!("a{i}"), &[&format!("/a{i}")]))
            .collect();
        let results: Vec<Result<ApplyResult, ControlError>> = std::thread::scope(|s| {
            let running: Vec<_> = specs
                .into_iter()
                .map(|spec| {
                    let cp = cp.clone();
                    s.spawn(move || cp.apply(spec, false))
                })
                .collect();
            running.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let landed = results.iter().filter(|r| r.is_ok()).count();
        let refused: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(landed, 6, "{refused:?}");
        assert!(
            refused.iter().all(|e| e.contains("6 apps")),
            "refused for the quota, not for the race: {refused:?}"
        );
        assert_eq!(cp.list::<App>(&keys::APPS).unwrap().len(), 6);
    }

    #[test]
    fn measurements_count_only_for_apps_and_revisions_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.apply(spec(&cp, "m", &["/m"]), false).unwrap();
        let stats = |app: &str, revision| {
            let mut s =
                shoal_core::metrics::RevisionStats::new(AppKey::new("default", app), revision);
            s.requests = 1;
            s
        };
        cp.record_metrics("n", vec![stats("m", 1), stats("m", 2), stats("ghost", 1)]);
        let seen = |cp: &ControlPlane| -> Vec<(String, Vec<u64>)> {
            cp.inner
                .metrics
                .snapshot()
                .into_iter()
                .map(|(app, m)| (app.name, m.totals.keys().copied().collect()))
                .collect()
        };
        assert_eq!(seen(&cp), [("m".to_string(), vec![1])]);
        // Deleted and made again at once, before any pass: the new app starts from nothing.
        cp.delete_app(&AppKey::new("default", "m")).unwrap();
        cp.apply(spec(&cp, "m", &["/m"]), false).unwrap();
        assert_eq!(seen(&cp), []);
    }

    #[test]
    fn two_apps_applied_at_once_never_both_get_a_route() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        for round in 0..20 {
            let route = format!("/shared{round}");
            let specs: Vec<AppSpec> = ["a", "b"]
                .iter()
                .map(|n| spec(&cp, &format!("{n}{round}"), &[&route]))
                .collect();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let applied: Vec<bool> = specs
                .into_iter()
                .map(|s| {
                    let (cp, barrier) = (cp.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        cp.apply(s, false).is_ok()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert_eq!(
                applied.iter().filter(|ok| **ok).count(),
                1,
                "round {round}: {applied:?}"
            );
            let winner = if applied[0] { "a" } else { "b" };
            assert_eq!(holder(&cp, &route), Some(format!("{winner}{round}")));
        }
    }

    #[test]
    fn routes_are_let_go_when_an_app_stops_serving_them() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.apply(spec(&cp, "a", &["/x", "/y"]), false).unwrap();
        let err = cp.apply(spec(&cp, "b", &["/x"]), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("route /x is already served by app default/a")
        );
        // Re-applying keeps what it holds; dropping /x lets it go.
        cp.apply(spec(&cp, "a", &["/x", "/y"]), false).unwrap();
        cp.apply(spec(&cp, "a", &["/y"]), false).unwrap();
        assert_eq!(holder(&cp, "/x"), None);
        cp.apply(spec(&cp, "b", &["/x"]), false).unwrap();
        assert_eq!(holder(&cp, "/x").as_deref(), Some("b"));
        cp.delete_app(&AppKey::new("default", "a")).unwrap();
        assert_eq!(holder(&cp, "/y"), None);
    }

    #[test]
    fn the_server_is_unhealthy_when_its_controller_keeps_failing() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        assert_eq!(cp.unhealthy(), None);
        cp.pass_failed(true);
        assert_eq!(cp.unhealthy(), None, "one failed pass is no outage");
        // Failing since 11 s ago, pass after pass.
        *cp.inner.failing.lock().unwrap() =
            Some(std::time::Instant::now() - Duration::from_secs(11));
        cp.pass_failed(true);
        let why = cp.unhealthy().expect("unhealthy");
        assert!(why.contains("have failed for 11 s"), "{why}");
        cp.pass_failed(false);
        assert_eq!(cp.unhealthy(), None);
    }

    /// A store whose health check a test counts and sets; the rest is a real store's.
    struct Checked {
        store: Store,
        checks: std::sync::atomic::AtomicU32,
        down: std::sync::atomic::AtomicBool,
    }

    use shoal_store::StoreError;

    impl shoal_store::KvStore for Checked {
        fn revision(&self) -> u64 {
            self.store.revision()
        }
        fn compacted_revision(&self) -> u64 {
            self.store.compacted_revision()
        }
        fn get(&self, key: &str) -> Result<Option<shoal_store::KeyValue>, StoreError> {
            self.store.get(key)
        }
        fn range(&self, prefix: &str) -> Result<(Vec<shoal_store::KeyValue>, u64), StoreError> {
            self.store.range(prefix)
        }
        fn txn(&self, txn: Txn) -> Result<shoal_store::TxnResponse, StoreError> {
            self.store.txn(txn)
        }
        fn watch(&self, prefix: &str, from: u64) -> Result<shoal_store::WatchStream, StoreError> {
            shoal_store::KvStore::watch(&self.store, prefix, from)
        }
        fn compact(&self, revision: u64) -> Result<(), StoreError> {
            self.store.compact(revision)
        }
        fn check(&self) -> Result<(), StoreError> {
            self.checks
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("no quorum".into()));
            }
            Ok(())
        }
    }

    /// The public health check asks the store once a second at most, however many probes
    /// come, at once or one after another; an outage shows at the first check after it.
    #[test]
    fn health_probes_share_one_store_check_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Checked {
            store: Store::open(&dir.path().join("state.redb")).unwrap(),
            checks: 0.into(),
            down: false.into(),
        });
        let clock = Arc::new(SetClock(1_000_000.into()));
        let cp = ControlPlane::with_clock(
            store.clone(),
            BlobStore::open(&dir.path().join("modules")).unwrap(),
            ControlConfig::default(),
            clock.clone(),
        )
        .unwrap();
        let checks = || store.checks.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| assert_eq!(cp.unhealthy(), None));
            }
        });
        assert_eq!(checks(), 1, "probes at once");
        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        clock
            .0
            .store(1_000_999, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(cp.unhealthy(), None, "the last answer stands for a second");
        assert_eq!(checks(), 1);
        clock
            .0
            .store(1_001_000, std::sync::atomic::Ordering::SeqCst);
        let why = cp.unhealthy().expect("the store is down");
        assert!(why.contains("does not answer"), "{why}");
        assert_eq!(cp.unhealthy(), Some(why), "and so is its answer");
        assert_eq!(checks(), 2);
        store.down.store(false, std::sync::atomic::Ordering::SeqCst);
        clock
            .0
            .store(1_002_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(cp.unhealthy(), None);
        assert_eq!(checks(), 3);
    }

    /// The security review's hijacks: a tenant may not take requests another namespace's
    /// app serves by a longer path under its route, nor add routes to its host.
    #[test]
    fn a_route_may_not_take_another_namespaces_requests() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let in_ns = |ns: &str, name: &str, routes: &[&str]| {
            let mut spec = spec(&cp, name, routes);
            spec.namespace = ns.to_string();
            spec
        };
        let apply =
            |ns: &str, name: &str, routes: &[&str]| cp.apply(in_ns(ns, name, routes), false);
        apply("default", "hello", &["/hello"]).unwrap();
        apply("default", "site", &["shop.example/"]).unwrap();
        for hijack in [
            "/hello/admin",
            "/hello/admin/x",
            "shop.example/cart",
            "shop.example/a/b",
        ] {
            let err = apply("team-a", "hj", &[hijack]).unwrap_err();
            assert!(matches!(err, ControlError::Conflict(_)), "{hijack}: {err}");
            let err = err.to_string();
            assert!(err.contains("of another namespace"), "{hijack}: {err}");
            // Whose it is stays with that namespace.
            assert!(
                !err.contains("default") && !err.contains("site"),
                "{hijack}: {err}"
            );
        }
        let err = apply("team-a", "hj", &["/hello"]).unwrap_err().to_string();
        assert!(
            err.ends_with("already served by an app of another namespace"),
            "{err}"
        );
        // What takes nothing another namespace serves: a catch-all on any host (shorter
        // routes lose to longer ones), a host of its own, a path beside /hello.
        let ok = ["/", "api.team-a.example/", "/hellothere"];
        apply("team-a", "ok", &ok).unwrap();
        // The same namespace may overlap its own routes, and re-applying keeps what is held.
        apply("default", "admin", &["/hello/admin"]).unwrap();
        apply("team-a", "ok", &ok).unwrap();
        apply(
            "team-a",
            "more",
            &["api.team-a.example/v2", "/hellothere/x"],
        )
        .unwrap();
        // Now team-a's: its host, and the paths under its routes.
        for hijack in ["api.team-a.example/v3", "/hellothere/y"] {
            let err = apply("team-b", "hj", &[hijack]).unwrap_err().to_string();
            assert!(err.contains("of another namespace"), "{hijack}: {err}");
        }
        // But not every path under its catch-all `/`.
        apply("team-b", "world", &["/world"]).unwrap();
    }

    #[test]
    fn apps_stored_before_route_claims_get_them_at_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cp = control_plane(dir.path());
            cp.apply(spec(&cp, "a", &["/x"]), false).unwrap();
            let k = keys::route(&Route::parse("/x").unwrap());
            cp.store().txn(Txn::new().then(Op::delete(&k))).unwrap();
            assert_eq!(holder(&cp, "/x"), None);
        }
        let cp = control_plane(dir.path());
        assert_eq!(holder(&cp, "/x").as_deref(), Some("a"));
    }
}
