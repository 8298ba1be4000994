//! `shoal job run NAME`: start one run of a job now, as `kubectl create job
//! --from=cronjob/NAME` does, under the job's concurrency policy.

use super::Context;
use crate::output::{self, Format};
use anyhow::{Result, bail};
use shoal_api::{JobRun, JobSummary, seg};
use shoal_core::{Phase, Replica};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal job run greet-job                         start a run now; prints its replica
  shoal job run migrate --wait --timeout 10m      and wait for it to end: exit 0 if it
                                                  succeeded, 1 if it failed (a CI step)")]
pub struct JobCommand {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start one run of a job now (scheduled or not), and say which replica it is.
    Run {
        /// The job app's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// Wait for the run to end, its retries included: exit 0 if it succeeded, 1 if it
        /// failed, as `kubectl wait --for=condition=complete` does.
        #[arg(long)]
        wait: bool,
        /// Give up waiting for the run to start (with --wait, to end) after this long
        /// (default: 10s; with --wait, 10m).
        #[arg(long)]
        timeout: Option<String>,
    },
}

pub async fn run(ctx: Context, cmd: JobCommand) -> Result<()> {
    let Action::Run {
        name,
        wait,
        timeout,
    } = cmd.action;
    let timeout = timeout.unwrap_or_else(|| if wait { "10m" } else { "10s" }.to_string());
    let timeout = Duration::from_millis(
        shoal_core::quantity::parse_duration_ms(&timeout)
            .map_err(|e| crate::exit::usage(format!("--timeout: {e}")))?,
    );
    let client = ctx.client()?;
    let ns = &ctx.namespace;
    let asked: JobRun = client
        .send(client.request(
            reqwest::Method::POST,
            &format!("/v1/apps/{}/run?namespace={}", seg(&name), seg(ns)),
        ))
        .await?;
    // The controller's next pass starts it: the run is the replica for this
    // request. It clears the request in the transaction that creates the run,
    // so the request is read first: once it is gone, the run is there or
    // was skipped.
    let started = Instant::now();
    let run = loop {
        let jobs: Vec<JobSummary> = client
            .get(&format!("/v1/jobs?namespace={}", seg(ns)))
            .await?;
        let replicas: Vec<Replica> = client
            .get(&format!(
                "/v1/replicas?namespace={}&app={}",
                seg(ns),
                seg(&name)
            ))
            .await?;
        if let Some(r) = replicas
            .into_iter()
            .find(|r| r.scheduled_at == Some(asked.requested_at))
        {
            break Some(r);
        }
        let job = jobs.iter().find(|j| j.name == name);
        if let Some(job) = job.filter(|j| j.run_requested != Some(asked.requested_at)) {
            bail!(
                "the run of {ns}/{name} was not started: see `shoal events --app {name}` (its concurrency is \"{}\": \"forbid\" skips a run while another is active)",
                job.concurrency
            );
        }
        if started.elapsed() > timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match (wait, &run) {
        (true, Some(r)) => return wait_for(&ctx, &client, r, started + timeout).await,
        // Waited for, a run that never started is no success.
        (true, None) => bail!(
            "the run of {ns}/{name} has not started after {}: see `shoal get jobs` and `shoal events --app {name}`",
            output::duration(timeout.as_millis() as u64)
        ),
        (false, _) => {}
    }
    match (ctx.output, run) {
        (Format::Json, run) => output::json(&serde_json::json!({
            "app": asked.app,
            "requested_at": asked.requested_at,
            "replica": run.map(|r| r.id),
        })),
        (Format::Table, Some(r)) => println!("job {ns}/{name}: run {} started", r.id),
        (Format::Table, None) => println!(
            "job {ns}/{name}: run requested; not started after {}, see `shoal get jobs`",
            output::duration(timeout.as_millis() as u64)
        ),
    }
    Ok(())
}

/// `job run --wait`: follows run `r` until it has ended (succeeded, or failed past its
/// retries), or `deadline`; says how it ended, with its exit code, and exits by it.
async fn wait_for(
    ctx: &Context,
    client: &crate::client::Client,
    r: &Replica,
    deadline: Instant,
) -> Result<()> {
    let ns = &r.app.namespace;
    let path = format!(
        "/v1/replicas?namespace={}&app={}",
        seg(ns),
        seg(&r.app.name)
    );
    if ctx.output == Format::Table {
        println!("job {}: run {} started", r.app, r.id);
    }
    let ended = loop {
        let replicas: Vec<Replica> = client.get(&path).await?;
        let Some(now) = replicas.into_iter().find(|x| x.id == r.id) else {
            bail!("run {} of job {} is gone (the job deleted?)", r.id, r.app);
        };
        if now.phase.is_terminal() {
            break now;
        }
        if Instant::now() >= deadline {
            bail!(
                "run {} of job {} has not ended: {}{} (see `shoal logs {} --replica {}`)",
                r.id,
                r.app,
                now.phase,
                now.message.map(|m| format!(": {m}")).unwrap_or_default(),
                r.app.name,
                r.id
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let code = ended
        .exit_code
        .map(|c| format!(", exit code {c}"))
        .unwrap_or_default();
    match ctx.output {
        Format::Json => output::json(&ended),
        Format::Table if ended.phase == Phase::Succeeded => {
            println!("job {}: run {} succeeded{code}", r.app, r.id)
        }
        Format::Table => {}
    }
    if ended.phase != Phase::Succeeded {
        bail!(
            "run {} of job {} {}{code}{} (see `shoal logs {} --replica {}`)",
            r.id,
            r.app,
            ended.phase.to_string().to_lowercase(),
            ended.message.map(|m| format!(": {m}")).unwrap_or_default(),
            r.app.name,
            r.id
        );
    }
    Ok(())
}
