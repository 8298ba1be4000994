//! Per-store host state: the WASI and wasi:http contexts a guest sees, its memory limiter and
//! its deadline. One `Host` per request (HTTP) or per run (commands).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::config::format_bytes;
use crate::cpu::{Member, TaskMeter};
use crate::logs::{LogSink, LogStream};
use crate::outbound::{OutboundHooks, OutboundPolicy};

/// Bounds on the number of core instances, tables and memories one store may create. A
/// wasm32-wasip2 component needs a handful of each; these leave room for composed components
/// while stopping a pathological one from exhausting the pool on its own.
const MAX_INSTANCES_PER_STORE: usize = 64;
const MAX_TABLES_PER_STORE: usize = 64;
const MAX_MEMORIES_PER_STORE: usize = 16;

/// The validated, shareable part of an [`crate::InstanceConfig`].
pub(crate) struct InstanceSettings {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) args: Vec<String>,
    pub(crate) memory_limit: usize,
    pub(crate) timeout: Option<Duration>,
    pub(crate) logs: LogSink,
    pub(crate) outbound: Arc<dyn OutboundPolicy>,
    pub(crate) incidents: Option<crate::IncidentHook>,
    /// The replica's place in its CPU group; each run gets a [`TaskMeter`] from it.
    pub(crate) cpu: Arc<Member>,
    pub(crate) reuse: crate::Reuse,
}

pub(crate) struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundHooks,
    limiter: MemoryLimiter,
    deadline: Option<Instant>,
    timed_out: bool,
    meter: Arc<TaskMeter>,
}

impl Host {
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

/// `StoreLimits` plus a record of whether the memory limit was hit. Growth past the limit traps
/// instead of making `memory.grow` return -1: like a container's OOM kill, the outcome is then
/// the same for every guest language, and the host can say why the request failed.
struct MemoryLimiter {
    limit: usize,
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
        if desired > self.limit {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} exceeded (growing a linear memory to {})",
                format_bytes(self.limit as u64),
                format_bytes(desired as u64)
            );
        }
        self.limits.memory_growing(current, desired, maximum)
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
/// run under `meter` (which the caller's task must be [`crate::cpu::Metered`] with).
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
) -> Store<Host> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.envs(&settings.env)
        .args(&settings.args)
        .stdout(settings.logs.guest_output(LogStream::Stdout))
        .stderr(settings.logs.guest_output(LogStream::Stderr))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);

    let host = Host {
        table: ResourceTable::new(),
        wasi: wasi.build(),
        http: WasiHttpCtx::new(),
        hooks: OutboundHooks {
            policy: settings.outbound.clone(),
            logs: settings.logs.clone(),
        },
        limiter: MemoryLimiter {
            limit: settings.memory_limit,
            limits: StoreLimitsBuilder::new()
                .memory_size(settings.memory_limit)
                .instances(MAX_INSTANCES_PER_STORE)
                .tables(MAX_TABLES_PER_STORE)
                .memories(MAX_MEMORIES_PER_STORE)
                .build(),
            exceeded: false,
        },
        deadline: settings.timeout.map(|t| Instant::now() + t),
        timed_out: false,
        meter,
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
