use super::Context;
use crate::output::Format;
use anyhow::{Context as _, Result};
use futures::StreamExt;
use std::io::Write;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal logs hello                      every replica's output, merged in time order
  shoal logs hello -f --since 10m       the last ten minutes, then what comes, across rollouts
  shoal logs greet-job --replica ID     one run of a job (`shoal get replicas --app greet-job`)
  shoal logs hello -o json | jq .line   one JSON object per line")]
pub struct LogsArgs {
    /// App name.
    app: String,
    /// Keep streaming new output: new replicas (a rollout, a replacement) join in, and a
    /// node that restarts is read again from where it was.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines of each replica.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// Only lines written in the last DURATION (`10m`, `1h30m`).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Only this replica: one run of a job (`shoal get replicas --app APP` lists them).
    #[arg(long, value_name = "ID")]
    replica: Option<String>,
    /// Put each line's time (RFC 3339, UTC) after its replica.
    #[arg(long)]
    timestamps: bool,
}

pub async fn run(ctx: Context, args: LogsArgs) -> Result<()> {
    let client = ctx.client()?;
    let format = match ctx.output {
        Format::Json => "json",
        Format::Table => "text",
    };
    let mut path = format!(
        "/v1/apps/{}/logs?namespace={}&follow={}&timestamps={}&format={format}",
        args.app, ctx.namespace, args.follow, args.timestamps
    );
    if let Some(n) = args.tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(since) = &args.since {
        let ms = shoal_core::quantity::parse_duration_ms(since).context("--since")?;
        path.push_str(&format!("&since_ms={ms}"));
    }
    if let Some(id) = &args.replica {
        path.push_str(&format!("&replica={id}"));
    }
    let resp = client
        .checked(client.request(reqwest::Method::GET, &path))
        .await?;
    let mut body = resp.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        stdout.write_all(&chunk?)?;
        stdout.flush()?;
    }
    Ok(())
}
