//! Running `wasi:cli/command` components (jobs and daemons) to completion.

use std::sync::Arc;
use std::time::Instant;

use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::config::{format_bytes, format_duration};
use crate::cpu::{Metered, TaskMeter};
use crate::host::{CancelOnDrop, Failure, Host, InstanceSettings, new_store, with_timeout};
use crate::runtime::Runtime;

/// How a command run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest returned or called `exit`: 0 on success.
    Exited(i32),
    /// A wasm trap (panic, unreachable, stack overflow…), with wasmtime's message.
    Trapped(String),
    TimedOut,
    /// The guest tried to grow its memory past the limit.
    OutOfMemory,
    /// The guest could not be run at all (instantiation failure, pool full…).
    Failed(String),
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Trapped(message) => write!(f, "trapped: {message}"),
            ExitStatus::TimedOut => f.write_str("timed out"),
            ExitStatus::OutOfMemory => f.write_str("exceeded its memory limit"),
            ExitStatus::Failed(message) => write!(f, "failed to run: {message}"),
        }
    }
}

/// A linked command with its instance settings. Each [`Command::run`] is an independent run in
/// a fresh instance.
#[derive(Clone)]
pub struct Command {
    inner: Arc<CommandInner>,
}

struct CommandInner {
    runtime: Runtime,
    digest: Arc<str>,
    pre: CommandPre<Host>,
    settings: InstanceSettings,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("digest", &self.inner.digest)
            .finish_non_exhaustive()
    }
}

impl Command {
    pub(crate) fn new(
        runtime: Runtime,
        digest: Arc<str>,
        pre: CommandPre<Host>,
        settings: InstanceSettings,
    ) -> Command {
        Command {
            inner: Arc::new(CommandInner {
                runtime,
                digest,
                pre,
                settings,
            }),
        }
    }

    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Runs `wasi:cli/run` once, with the configured timeout for the whole run. Output goes to
    /// the log sink; abnormal ends are also recorded there. The guest runs on the runtime's
    /// guest threads, metered for its CPU group; dropping the returned future cancels the run.
    pub async fn run(&self) -> ExitStatus {
        let command = self.clone();
        let task = self.inner.runtime.guests().spawn(async move {
            let meter = command.inner.settings.cpu.meter();
            Metered::new(meter.clone(), async move {
                let started = Instant::now();
                let status = command.run_here(meter).await;
                command.report(&status, started.elapsed());
                status
            })
            .await
        });
        let _cancel = CancelOnDrop::new(task.abort_handle());
        match task.await {
            Ok(status) => status,
            Err(e) => ExitStatus::Failed(format!("the run's task ended: {e}")),
        }
    }

    async fn run_here(&self, meter: Arc<TaskMeter>) -> ExitStatus {
        let inner = &self.inner;
        let Some(memory) = inner.runtime.reserve_memory(&inner.settings).await else {
            return ExitStatus::Failed(format!(
                "no room for {} in the node's memory budget",
                format_bytes(inner.settings.memory_limit as u64)
            ));
        };
        let mut store = new_store(inner.pre.engine(), &inner.settings, meter.clone(), memory);
        let deadline = store.data().deadline();
        let run = async {
            meter.admit(deadline, false).await;
            let command = inner.pre.instantiate_async(&mut store).await?;
            command.wasi_cli_run().call_run(&mut store).await
        };
        let outcome = with_timeout(
            inner.settings.timeout,
            inner.runtime.config().epoch_tick,
            run,
        )
        .await;
        let status = match outcome {
            None => ExitStatus::TimedOut,
            Some(Ok(Ok(()))) => ExitStatus::Exited(0),
            Some(Ok(Err(()))) => ExitStatus::Exited(1),
            Some(Err(e)) => match e.downcast_ref::<I32Exit>() {
                Some(exit) => ExitStatus::Exited(exit.0),
                None => match Failure::classify(store.data(), &e) {
                    Failure::TimedOut => ExitStatus::TimedOut,
                    Failure::OutOfMemory => ExitStatus::OutOfMemory,
                    Failure::Trapped(message) => ExitStatus::Trapped(message),
                    Failure::AtCapacity(message) | Failure::Failed(message) => {
                        ExitStatus::Failed(message)
                    }
                    Failure::NoMemory => {
                        ExitStatus::Failed("no room in the node's memory budget".into())
                    }
                },
            },
        };
        // Flush the guest's partial last lines before the runtime's own verdict.
        drop(store);
        status
    }

    fn report(&self, status: &ExitStatus, elapsed: std::time::Duration) {
        let settings = &self.inner.settings;
        let digest = self.digest();
        let line = match status {
            ExitStatus::Exited(0) => {
                tracing::debug!(%digest, ?elapsed, "command exited with code 0");
                settings.logs.push_system("exited with code 0");
                return;
            }
            ExitStatus::Exited(code) => format!("exited with code {code}"),
            ExitStatus::TimedOut => format!(
                "timed out after {}",
                format_duration(settings.timeout.unwrap_or_default())
            ),
            ExitStatus::OutOfMemory => format!(
                "exceeded its memory limit ({})",
                format_bytes(settings.memory_limit as u64)
            ),
            ExitStatus::Trapped(message) => format!("trapped: {message}"),
            ExitStatus::Failed(message) => format!("failed to run: {message}"),
        };
        tracing::info!(%digest, ?elapsed, "command {line}");
        settings.logs.push_system(line);
    }
}
