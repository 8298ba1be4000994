use super::Context;
use anyhow::Result;
use futures::StreamExt;
use std::io::Write;

#[derive(clap::Args)]
pub struct LogsArgs {
    /// App name.
    app: String,
    /// Keep streaming new output.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines of each replica.
    #[arg(long)]
    tail: Option<usize>,
    /// Only this replica: one run of a job (`shoal get replicas --app APP` lists them).
    #[arg(long)]
    replica: Option<String>,
}

pub async fn run(ctx: Context, args: LogsArgs) -> Result<()> {
    let client = ctx.client()?;
    let mut path = format!(
        "/v1/apps/{}/logs?namespace={}&follow={}",
        args.app, ctx.namespace, args.follow
    );
    if let Some(n) = args.tail {
        path.push_str(&format!("&tail={n}"));
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
