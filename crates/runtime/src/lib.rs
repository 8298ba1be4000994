//! The wasmtime embedding of a Shoal node: one engine per node, components compiled once per
//! digest (and cached on disk across restarts), and a fresh sandboxed instance per HTTP request
//! or command run, with memory limits, timeouts and captured stdout/stderr.
//!
//! A pure library: it serves no network itself. The gateway feeds requests to
//! [`HttpService::handle`]; the agent runs jobs with [`Command::run`]. Guests run on the
//! runtime's own threads, whoever calls, and share them between apps by CPU weight
//! ([`CpuShare`]); [`Runtime::cpu_usage`] says what each app used. Every instance holds its
//! memory limit of the node's budget ([`RuntimeConfig::memory_budget_bytes`]) while it lives, so
//! guests together never use more ([`Runtime::memory_reserved`]). What instances do is counted
//! per replica ([`InstanceStats`]) and what loading found in the compile cache per runtime
//! ([`Runtime::compile_cache`]), for the node's metrics.
//!
//! **Architecture Invariant:** a guest gets only what its [`InstanceConfig`] grants — its env
//! vars and args, stdout/stderr into a [`LogSink`], outgoing HTTP through an
//! [`OutboundPolicy`] (deny-all by default). No files, no sockets, nothing inherited from the
//! node.

mod cache;
mod command;
mod config;
mod cpu;
mod error;
mod host;
mod http;
mod keyvalue;
mod logs;
mod memory;
mod outbound;
mod p3;
mod runtime;
mod stats;
mod volumes;

pub use command::{Command, ExitStatus};
pub use config::{Incident, IncidentHook, IncidentKind, InstanceConfig, Reuse, RuntimeConfig};
pub use cpu::{CPU_PERIOD, CpuShare, CpuUsage};
pub use error::RuntimeError;
pub use http::{ClientTls, HttpService, ResponseBody, problem_response};
pub use keyvalue::{KeyValue, KvGrant};
pub use logs::{DEFAULT_LOG_BYTES, LogFiles, LogLine, LogSink, LogStream, MAX_LINE_BYTES};
pub use memory::{available_memory, default_memory_budget};
pub use outbound::{DENIED, DenyAll, OutboundPolicy};
pub use runtime::{LoadSource, Loaded, Runtime, memory_reset};
pub use stats::{CompileCache, InstanceCounts, InstanceStats};
pub use volumes::{BLOCK_BYTES, VolumeMount, VolumeQuota, du};

/// Types an [`OutboundPolicy`] works with, re-exported so implementors need not depend on
/// wasmtime-wasi-http directly.
pub use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};
