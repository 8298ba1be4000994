//! `shoal job run NAME`: start one run of a job now, as `kubectl create job
//! --from=cronjob/NAME` does, under the job's concurrency policy.

use super::Context;
use crate::output::{self, Format};
use anyhow::{Result, bail};
use shoal_api::{JobRun, JobSummary, seg};
use shoal_core::Replica;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal job run greet-job                         start a run now; prints its replica")]
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
        /// Give up waiting for the run to start after this long.
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
}

pub async fn run(ctx: Context, cmd: JobCommand) -> Result<()> {
    let Action::Run { name, timeout } = cmd.action;
    let timeout = Duration::from_millis(shoal_core::quantity::parse_duration_ms(&timeout)?);
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
