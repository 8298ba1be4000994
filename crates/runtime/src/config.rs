//! Node-level and instance-level settings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cpu::CpuShare;
use crate::keyvalue::KvGrant;
use crate::logs::LogSink;
use crate::outbound::{DenyAll, OutboundPolicy};
use crate::stats::InstanceStats;
use crate::volumes::VolumeMount;

const MIB: u64 = 1 << 20;

/// Settings of a node's one wasmtime engine. They shape the pooling allocator and are part of
/// the precompiled-code compatibility, so changing them invalidates the disk cache (a new
/// subdirectory is used; nothing stale is loaded).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where precompiled components are kept across restarts.
    pub cache_dir: PathBuf,
    /// Instances that can exist at once across all components of the node (pool slots).
    pub max_instances: u32,
    /// Hard ceiling for one instance's memory, the size of each memory slot in the pool;
    /// per-app limits must stay below it.
    pub max_memory_bytes: u64,
    /// Guest memory the node hands out at once: every live instance holds its whole memory
    /// limit of it, so guests together can never use more (the rest of the process and the
    /// machine keep theirs). By default three quarters of the memory available to the process
    /// ([`crate::default_memory_budget`]).
    pub memory_budget_bytes: u64,
    /// How long an instance may wait for room in the memory budget (never longer than its
    /// request's timeout) before its request is answered `at_capacity` or its run fails.
    pub memory_wait: Duration,
    /// Granularity of timeouts and of the time slice after which a busy guest yields.
    pub epoch_tick: Duration,
    /// Worker threads of the runtime's own executor, where every guest runs (so guests
    /// cannot hold up the caller's executor, e.g. the gateway's); 0 means one per core.
    pub guest_threads: usize,
}

impl RuntimeConfig {
    /// Defaults (1000 instances, 512 MiB each at most, three quarters of the memory available
    /// for all of them, a 1 s wait for it as the gateway waits for a replica's permit, 10 ms
    /// ticks, a guest thread per core) with the given cache directory.
    pub fn new(cache_dir: impl Into<PathBuf>) -> RuntimeConfig {
        RuntimeConfig {
            cache_dir: cache_dir.into(),
            max_instances: 1000,
            max_memory_bytes: shoal_core::spec::MAX_INSTANCE_MEMORY,
            memory_budget_bytes: crate::memory::default_memory_budget(),
            memory_wait: Duration::from_secs(1),
            epoch_tick: Duration::from_millis(10),
            guest_threads: 0,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig::new(std::env::temp_dir().join("shoal-runtime-cache"))
    }
}

/// What one replica's instances get. Nothing else is granted: no files, no inherited env,
/// args or stdio, no sockets; outgoing HTTP only as `outbound` allows.
#[derive(Clone)]
pub struct InstanceConfig {
    pub env: Vec<(String, String)>,
    /// What the guest reads through `wasi:config/store`.
    pub config: Vec<(String, String)>,
    /// Passed as-is; by convention the first one is the program name.
    pub args: Vec<String>,
    /// All of one instance's linear memories together, in bytes: what it reserves of the
    /// node's budget. Must not exceed [`RuntimeConfig::max_memory_bytes`] nor
    /// [`RuntimeConfig::memory_budget_bytes`].
    pub memory_limit: u64,
    /// Per request for HTTP components (headers and body included); whole run for commands.
    pub timeout: Option<Duration>,
    pub logs: LogSink,
    pub outbound: Arc<dyn OutboundPolicy>,
    /// Told when a request's instance is killed (timeout, memory, trap), so the
    /// node can report it beyond the replica's own log.
    pub incidents: Option<IncidentHook>,
    /// The CPU group the replica is charged to and its weight and limit in it.
    pub cpu: CpuShare,
    /// For HTTP components: how many requests one instance serves.
    pub reuse: Reuse,
    /// The `wasi:keyvalue` buckets the guest may open, and where their calls go; none: every
    /// bucket is `access-denied`.
    pub keyvalue: Option<KvGrant>,
    /// Directories the guest sees (wasi:filesystem preopens); at most one writable, whose
    /// size limit the host keeps.
    pub volumes: Vec<VolumeMount>,
    /// Where the instances' requests, starts, reuses and kills are counted; replicas given
    /// the same one add up.
    pub stats: Arc<InstanceStats>,
}

/// How an HTTP component's instances serve requests: `requests` in their life (1: a fresh
/// instance per request, the default), each kept at most `idle` between two of them. A reused
/// instance keeps its memory, so a guest must accept that state carries over; one that traps,
/// times out, runs out of memory or leaves any part of a request or response behind is dropped.
/// A p2 instance serves its requests one after another; a p3 one up to `concurrent` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    pub requests: u32,
    pub idle: Duration,
    pub concurrent: u32,
}

impl Default for Reuse {
    fn default() -> Self {
        Reuse {
            requests: 1,
            idle: Duration::from_secs(10),
            concurrent: 16,
        }
    }
}

/// An HTTP request whose instance the runtime had to kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    pub kind: IncidentKind,
    /// What the replica's log says about it: method, path and cause.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncidentKind {
    TimedOut,
    OutOfMemory,
    Trapped,
}

impl IncidentKind {
    /// The event reason it becomes.
    pub fn reason(self) -> &'static str {
        match self {
            IncidentKind::TimedOut => "KilledByTimeout",
            IncidentKind::OutOfMemory => "OutOfMemory",
            IncidentKind::Trapped => "Trapped",
        }
    }
}

pub type IncidentHook = Arc<dyn Fn(Incident) + Send + Sync>;

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            env: Vec::new(),
            config: Vec::new(),
            args: Vec::new(),
            memory_limit: 128 * MIB,
            timeout: None,
            logs: LogSink::default(),
            outbound: Arc::new(DenyAll),
            incidents: None,
            cpu: CpuShare::default(),
            reuse: Reuse::default(),
            keyvalue: None,
            volumes: Vec::new(),
            stats: Arc::default(),
        }
    }
}

impl std::fmt::Debug for InstanceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values of env vars may be secrets: show names only.
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("InstanceConfig")
            .field("env", &env_names)
            .field("args", &self.args)
            .field("memory_limit", &self.memory_limit)
            .field("timeout", &self.timeout)
            .field("logs", &self.logs)
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

/// `5s`, `1.5s`, `250ms`: short enough for a response body or a log line.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{ms}ms")
    }
}

/// `32 MiB`, `1 GiB`, `1536 KiB`: the unit the user most likely wrote in their spec.
pub(crate) fn format_bytes(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB && b.is_multiple_of(GIB) => format!("{} GiB", b / GIB),
        b if b >= MIB && b.is_multiple_of(MIB) => format!("{} MiB", b / MIB),
        b if b >= KIB && b.is_multiple_of(KIB) => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_for_humans() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_bytes(32 * MIB), "32 MiB");
        assert_eq!(format_bytes(1 << 30), "1 GiB");
        assert_eq!(format_bytes(1536 << 10), "1536 KiB");
        assert_eq!(format_bytes(100), "100 bytes");
    }
}
