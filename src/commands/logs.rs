use super::Context;
use crate::output::Format;
use anyhow::{Context as _, Result};
use futures::StreamExt;
use shoal_api::seg;
use shoal_core::logs::LogEntry;
use std::collections::HashMap;
use std::io::Write;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal logs hello                      every replica's output, merged in time order
  shoal logs hello -f --since 10m       the last ten minutes, then what comes, across rollouts
  shoal logs greet-job --replica ID     one run of a job (`shoal get replicas --app greet-job`)
  shoal logs hello -o json | jq .line   one JSON object per line")]
pub struct LogsArgs {
    /// App name.
    #[arg(value_parser = crate::commands::object_name)]
    app: String,
    /// Keep streaming new output: new replicas (a rollout, a replacement) join in, a node
    /// that restarts is read again from where it was, and if the server streaming goes away
    /// the next of the context's servers takes over, each line still shown once. A job's
    /// ends when its runs have (with none going, once the next has).
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
    let since_ms = match &args.since {
        Some(since) => Some(
            shoal_core::quantity::parse_duration_ms(since)
                .map_err(|e| crate::exit::usage(format!("--since: {e}")))?,
        ),
        None => None,
    };
    if args.follow {
        return follow(&ctx, &client, &args, since_ms).await;
    }
    let format = match ctx.output {
        Format::Json => "json",
        Format::Table => "text",
    };
    let resp = client
        .checked(client.request(
            reqwest::Method::GET,
            &query(&ctx, &args, format, args.tail, since_ms),
        ))
        .await?;
    let mut body = resp.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        stdout.write_all(&chunk?)?;
        stdout.flush()?;
    }
    Ok(())
}

/// The API path for `args` with this format, tail and window.
fn query(
    ctx: &Context,
    args: &LogsArgs,
    format: &str,
    tail: Option<usize>,
    since_ms: Option<u64>,
) -> String {
    let mut path = format!(
        "/v1/apps/{}/logs?namespace={}&follow={}&timestamps={}&format={format}",
        seg(&args.app),
        seg(&ctx.namespace),
        args.follow,
        args.timestamps
    );
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(ms) = since_ms {
        path.push_str(&format!("&since_ms={ms}"));
    }
    if let Some(id) = &args.replica {
        path.push_str(&format!("&replica={}", seg(id)));
    }
    path
}

/// How far before the last line shown a resumed stream starts: room for the clocks of the
/// CLI, the servers and the nodes to differ. Lines shown already are skipped by their number.
const RESUME_SLACK_MS: u64 = 5_000;

/// `--follow`, going on at another server of the context when the one streaming goes away (a
/// server killed or restarted): the stream is read as JSON entries, written as asked, and
/// each replica's entries numbered below the next one due are skipped, so a resumed stream
/// (from a little before the oldest of each replica's last lines) shows each line once.
async fn follow(
    ctx: &Context,
    client: &crate::client::Client,
    args: &LogsArgs,
    since_ms: Option<u64>,
) -> Result<()> {
    crate::output::end_when_stdout_closes();
    let mut next: HashMap<String, (u64, shoal_core::Millis)> = HashMap::new();
    let mut stdout = std::io::stdout();
    let mut path = query(ctx, args, "json", args.tail, since_ms);
    let mut resp = client
        .checked(client.request(reqwest::Method::GET, &path))
        .await?;
    loop {
        let mut body = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let broke = loop {
            match body.next().await {
                None => return Ok(()),
                Some(Err(e)) => break e,
                Some(Ok(chunk)) => pending.extend_from_slice(&chunk),
            }
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let entry: LogEntry = serde_json::from_slice(&line)
                    .context("the server sent a log line that is not a JSON entry")?;
                let due = next.get(&entry.replica).map_or(0, |(seq, _)| *seq);
                if entry.seq < due {
                    continue;
                }
                // A notice that the replica's output could not be read is shown, and is no
                // line to resume after (its number would have wrapped the next one due).
                if entry.seq != LogEntry::NOTICE {
                    next.insert(entry.replica.clone(), (entry.seq + 1, entry.time));
                }
                match ctx.output {
                    Format::Json => stdout.write_all(&line)?,
                    Format::Table => stdout.write_all(entry.text(args.timestamps).as_bytes())?,
                }
            }
            stdout.flush()?;
        };
        eprintln!(
            "shoal: the log stream from {} broke ({broke}); following on",
            client.base()
        );
        // From a little before the oldest of the replicas' last lines shown; none shown: as
        // asked at first.
        path = match next.values().map(|(_, time)| *time).min() {
            Some(oldest) => {
                let ago = shoal_core::now_ms().saturating_sub(oldest) + RESUME_SLACK_MS;
                query(ctx, args, "json", None, Some(ago))
            }
            None => query(ctx, args, "json", args.tail, since_ms),
        };
        // Through a restart of every server, too.
        resp = client
            .patiently(|| client.checked(client.request(reqwest::Method::GET, &path)))
            .await?;
    }
}
