use super::Context;
use super::get::event_rows;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::seg;
use shoal_core::Event;
use std::time::Duration;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal events                                    what happened, oldest first
  shoal events --app hello --follow               one app's, as they happen")]
pub struct EventsArgs {
    /// Only this app's events (and the cluster's).
    #[arg(long)]
    #[arg(value_parser = crate::commands::object_name)]
    app: Option<String>,
    /// Keep printing events as they happen.
    #[arg(short, long)]
    follow: bool,
}

const HEADER: &[&str] = &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"];

/// `shoal events`: what happened, oldest first; `--follow` polls for more.
pub async fn run(ctx: Context, args: EventsArgs) -> Result<()> {
    let client = ctx.client()?;
    if args.follow {
        output::end_when_stdout_closes();
    }
    let app = args
        .app
        .as_deref()
        .map(|a| format!("&app={}", seg(a)))
        .unwrap_or_default();
    let base = format!("/v1/events?namespace={}{app}", seg(&ctx.namespace));
    let mut events: Vec<Event> = client.get(&base).await?;
    let mut widths: Option<Vec<usize>> = None;
    // The last event printed: what comes next is asked for after it, however many empty
    // answers come between.
    let mut after = None;
    loop {
        if let Some(last) = events.last() {
            after = Some(last.seq);
            match ctx.output {
                // NDJSON: one event a line, as they come.
                Format::Json => {
                    for event in &events {
                        println!("{}", serde_json::to_string(event)?);
                    }
                }
                Format::Table => {
                    let rows = event_rows(&events);
                    // Later batches keep the first one's columns, as `get -w` does.
                    let widths = widths.get_or_insert_with(|| {
                        let widths = output::widths(HEADER, &rows);
                        let header: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
                        output::print_row(&widths, &header);
                        widths
                    });
                    for row in &rows {
                        output::print_row(widths, row);
                    }
                }
            }
        }
        if !args.follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let path = match after {
            Some(after) => format!("{base}&after={after}"),
            None => base.clone(),
        };
        events = client.patiently(|| client.get(&path)).await?;
    }
}
