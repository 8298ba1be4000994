//! Per-store host state: the WASI and wasi:http contexts a guest sees, its memory limiter, its
//! reservation in the node's memory budget and its deadline. One `Host` per instance: a request
//! (HTTP), the requests of a reused instance or a p3 worker, a run (commands).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::config::format_bytes;
use crate::cpu::{Member, TaskMeter};
use crate::keyvalue::{KvGrant, KvView};
use crate::logs::{LogSink, LogStream};
use crate::memory::Reservation;
use crate::outbound::{OutboundHooks, OutboundPolicy};
use crate::stats::{Alive, InstanceStats};
use crate::volumes::{VolumeMount, VolumeQuota};

/// Bounds on the number of core instances, tables and memories one store may create. A
/// wasm32-wasip2 component needs a handful of each; these leave room for composed components
/// while stopping a pathological one from exhausting the pool on its own.
const MAX_INSTANCES_PER_STORE: usize = 64;
const MAX_TABLES_PER_STORE: usize = 64;
const MAX_MEMORIES_PER_STORE: usize = 16;

/// The validated, shareable part of an [`crate::InstanceConfig`].
pub(crate) struct InstanceSettings {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    pub(crate) args: Vec<String>,
    pub(crate) memory_limit: usize,
    pub(crate) timeout: Option<Duration>,
    pub(crate) logs: LogSink,
    pub(crate) outbound: Arc<dyn OutboundPolicy>,
    pub(crate) incidents: Option<crate::IncidentHook>,
    /// The replica's place in its CPU group; each run gets a [`TaskMeter`] from it.
    pub(crate) cpu: Arc<Member>,
    pub(crate) reuse: crate::Reuse,
    pub(crate) keyvalue: Option<Arc<KvGrant>>,
    pub(crate) volumes: Vec<VolumeMount>,
    pub(crate) stats: Arc<InstanceStats>,
}

pub(crate) struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    keyvalue: Option<Arc<KvGrant>>,
    /// The size limit of the volume the guest may write, if it mounts one.
    volume_quota: Option<Arc<VolumeQuota>>,
    http: WasiHttpCtx,
    hooks: OutboundHooks,
    limiter: MemoryLimiter,
    deadline: Option<Instant>,
    timed_out: bool,
    meter: Arc<TaskMeter>,
    /// The instance's memory limit in the node's budget, held as long as the store lives:
    /// given back as the store drops, its memories going back to the pool in the same drop.
    _memory: Reservation,
    /// Counts the instance alive in its replica's stats for as long as the store lives.
    _alive: Alive,
}

impl Host {
    /// What the guest reads through `wasi:config/store`.
    pub(crate) fn wasi_config(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::from(&*self.config)
    }

    /// What the guest reaches through `wasi:keyvalue`: the buckets it was granted.
    pub(crate) fn keyvalue(&mut self) -> KvView<'_> {
        KvView {
            grant: self.keyvalue.as_deref(),
            table: &mut self.table,
        }
    }

    /// The size limit its writes are charged to (`volumes.rs`).
    pub(crate) fn volume_quota(&self) -> Option<Arc<VolumeQuota>> {
        self.volume_quota.clone()
    }

    /// When the guest's timeout runs out, if it has one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the epoch callback stopped the guest because its deadline passed.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Whether the guest tried to grow a memory past its limit (and was trapped for it).
    pub(crate) fn memory_exceeded(&self) -> bool {
        self.limiter.exceeded
    }

    /// Readies a reused store for its next request: its own deadline, `timeout` from now,
    /// and the meter of the task that runs it.
    pub(crate) fn next_request(&mut self, timeout: Option<Duration>, meter: Arc<TaskMeter>) {
        self.deadline = timeout.map(|t| Instant::now() + t);
        self.timed_out = false;
        self.meter = meter;
    }

    /// Moves the deadline out to `deadline` if that is later: a p3 instance serving several
    /// requests at once runs until the last of them is out of time.
    pub(crate) fn extend_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = match (self.deadline, deadline) {
            (Some(current), Some(new)) => Some(current.max(new)),
            _ => None,
        };
    }

    /// Records that the guest was stopped for running out of time outside the epoch
    /// callback (blocked where no epoch check happens).
    pub(crate) fn mark_timed_out(&mut self) {
        self.timed_out = true;
    }

    /// Whether the guest kept any part of a request or response past the call that handled
    /// it: an instance that did cannot serve another.
    pub(crate) fn holds_request_parts(&mut self) -> bool {
        use wasmtime_wasi_http::p2::body::{HostIncomingBody, HostOutgoingBody};
        use wasmtime_wasi_http::p2::types::{
            HostIncomingRequest, HostOutgoingResponse, HostResponseOutparam,
        };
        self.table.iter_mut().any(|entry| {
            entry.is::<HostIncomingRequest>()
                || entry.is::<HostIncomingBody>()
                || entry.is::<HostResponseOutparam>()
                || entry.is::<HostOutgoingResponse>()
                || entry.is::<HostOutgoingBody>()
        })
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `StoreLimits` plus the memory limit over all of the store's linear memories together, and a
/// record of whether it was hit. The limit is per store, not per memory, because it is what the
/// instance reserved of the node's budget: a component with several memories shares it. Growth
/// past the limit traps instead of making `memory.grow` return -1: like a container's OOM kill,
/// the outcome is then the same for every guest language, and the host can say why the request
/// failed.
struct MemoryLimiter {
    limit: usize,
    /// Bytes of all the store's linear memories, counted when a growth is allowed. One that
    /// fails after that (the host out of memory) stays counted: an error on the safe side.
    used: usize,
    limits: StoreLimits,
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.limit {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} exceeded (growing a linear memory to {}, {} in all)",
                format_bytes(self.limit as u64),
                format_bytes(desired as u64),
                format_bytes(used as u64)
            );
        }
        // Within the limit; the memory's own declared maximum may still refuse it.
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.used = used;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A fresh store granting exactly what `settings` says, with a deadline `timeout` from now,
/// run under `meter` (which the caller's task must be [`crate::cpu::Metered`] with), holding
/// `memory`, its room in the node's budget, for its life.
///
/// Every store also gets an epoch callback: past the deadline it interrupts the guest (a trap
/// the caller recognises through [`Host::timed_out`]); before it, at each epoch tick (a time
/// slice), it charges the slice to the guest's CPU group and makes the guest yield to the
/// executor, and wait there while its group is over its share or its limit
/// ([`TaskMeter::admit`]), so a busy guest can monopolise neither a worker nor the CPU.
pub(crate) fn new_store(
    engine: &Engine,
    settings: &InstanceSettings,
    meter: Arc<TaskMeter>,
    memory: Reservation,
) -> Store<Host> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.envs(&settings.env)
        .args(&settings.args)
        .stdout(settings.logs.guest_output(LogStream::Stdout))
        .stderr(settings.logs.guest_output(LogStream::Stderr))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for v in &settings.volumes {
        let perms = if v.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        // Checked when the settings were made; a directory removed since leaves the guest
        // without it rather than failing the request here.
        if let Err(e) = wasi.preopened_dir(&v.host, &v.guest, perms) {
            tracing::warn!(volume = %v.host.display(), error = %e, "volume directory unavailable");
        }
    }

    let host = Host {
        table: ResourceTable::new(),
        wasi: wasi.build(),
        config: settings.config.clone(),
        keyvalue: settings.keyvalue.clone(),
        volume_quota: settings
            .volumes
            .iter()
            .find(|v| !v.read_only)
            .map(|v| v.quota.clone()),
        http: WasiHttpCtx::new(),
        hooks: OutboundHooks {
            policy: settings.outbound.clone(),
            logs: settings.logs.clone(),
        },
        limiter: MemoryLimiter {
            limit: settings.memory_limit,
            used: 0,
            limits: StoreLimitsBuilder::new()
                .instances(MAX_INSTANCES_PER_STORE)
                .tables(MAX_TABLES_PER_STORE)
                .memories(MAX_MEMORIES_PER_STORE)
                .build(),
            exceeded: false,
        },
        deadline: settings.timeout.map(|t| Instant::now() + t),
        timed_out: false,
        meter,
        _memory: memory,
        _alive: Alive::new(&settings.stats),
    };

    let mut store = Store::new(engine, host);
    store.limiter(|host| &mut host.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut cx| {
        let host = cx.data_mut();
        match host.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                host.timed_out = true;
                Ok(UpdateDeadline::Interrupt)
            }
            deadline => {
                host.meter.mark_slice();
                let admit = host.meter.clone().admit(deadline, true);
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(admit)))
            }
        }
    });
    store
}

/// Cancels a guest's task when dropped while armed: its caller stopped waiting (a client that
/// went away), so nothing would read what it does.
pub(crate) struct CancelOnDrop(Option<tokio::task::AbortHandle>);

impl CancelOnDrop {
    pub(crate) fn new(task: tokio::task::AbortHandle) -> CancelOnDrop {
        CancelOnDrop(Some(task))
    }

    /// Lets the task run on: its caller has what it waited for.
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// How a guest's execution ended when it did not end normally.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    TimedOut,
    OutOfMemory,
    /// A wasm trap (panic, unreachable, stack overflow…), summarised on one line.
    Trapped(String),
    /// The instance pool is full: a capacity problem, not the guest's fault.
    AtCapacity(String),
    /// The node's memory budget had no room for the instance in time: capacity again.
    NoMemory,
    /// Anything else, e.g. a host error during instantiation.
    Failed(String),
}

impl Failure {
    /// Sorts an error out of a call into the guest, using what the store recorded.
    pub(crate) fn classify(host: &Host, err: &wasmtime::Error) -> Failure {
        tracing::debug!(error = ?err, "guest call failed");
        if host.timed_out() {
            Failure::TimedOut
        } else if host.memory_exceeded() {
            Failure::OutOfMemory
        } else if err.is::<wasmtime::PoolConcurrencyLimitError>() {
            Failure::AtCapacity(summarize(err))
        } else if err.is::<wasmtime::Trap>() {
            Failure::Trapped(summarize(err))
        } else {
            Failure::Failed(summarize(err))
        }
    }
}

/// One line for logs and statuses: the error chain without wasm backtraces, which are
/// multi-line and, for stripped release guests, only function indices. The full error is
/// logged at debug level.
fn summarize(err: &wasmtime::Error) -> String {
    let parts: Vec<String> = err
        .chain()
        .map(|cause| cause.to_string())
        .filter(|text| !text.contains('\n'))
        .collect();
    if parts.is_empty() {
        err.root_cause().to_string()
    } else {
        parts.join(": ")
    }
}

/// Runs `fut` under `timeout`, if any; `None` when it ran out.
///
/// Running wasm is interrupted by the epoch callback; this timer catches guests blocked in
/// host calls (on a clock, on a body), where no epoch check happens. It fires one `slack`
/// after the epoch deadline so a running guest is reported through the trap path.
pub(crate) async fn with_timeout<F: Future>(
    timeout: Option<Duration>,
    slack: Duration,
    fut: F,
) -> Option<F::Output> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout + slack, fut).await.ok(),
        None => Some(fut.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// What a store may grow to is what it reserved, however many memories share it.
    #[test]
    fn the_limit_covers_all_of_a_stores_memories_together() {
        let mut limiter = MemoryLimiter {
            limit: 10 * MIB,
            used: 0,
            limits: StoreLimitsBuilder::new().build(),
            exceeded: false,
        };
        // Two memories of 4 MiB.
        assert!(limiter.memory_growing(0, 4 * MIB, None).unwrap());
        assert!(limiter.memory_growing(0, 4 * MIB, None).unwrap());
        // A growth the memory's own maximum refuses counts nothing.
        assert!(
            !limiter
                .memory_growing(4 * MIB, 5 * MIB, Some(4 * MIB))
                .unwrap()
        );
        assert_eq!(limiter.used, 8 * MIB);
        // The first grows to 6 MiB: 10 MiB in all, the limit.
        assert!(limiter.memory_growing(4 * MIB, 6 * MIB, None).unwrap());
        assert!(!limiter.exceeded);
        // The second may not grow by a page: each alone is under the limit, both are not.
        let err = limiter
            .memory_growing(4 * MIB, 4 * MIB + 65536, None)
            .unwrap_err();
        assert!(limiter.exceeded);
        assert_eq!(
            err.to_string(),
            "memory limit of 10 MiB exceeded (growing a linear memory to 4160 KiB, 10304 KiB in all)"
        );
    }
}
