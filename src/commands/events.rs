use super::Context;
use super::get::event_rows;
use crate::output::{Format, table};
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

/// `shoal events`: what happened, oldest first; `--follow` polls for more.
pub async fn run(ctx: Context, args: EventsArgs) -> Result<()> {
    let client = ctx.client()?;
    let app = args
        .app
        .as_deref()
        .map(|a| format!("&app={}", seg(a)))
        .unwrap_or_default();
    let base = format!("/v1/events?namespace={}{app}", seg(&ctx.namespace));
    let mut events: Vec<Event> = client.get(&base).await?;
    let mut header = ctx.output == Format::Table;
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
                Format::Table if header => table(
                    &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
                    &event_rows(&events),
                ),
                Format::Table => table_rows(&events),
            }
            header = false;
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

/// Rows without the header, for follow-up batches.
fn table_rows(events: &[Event]) {
    for row in event_rows(events) {
        println!("{}", row.join("   "));
    }
}
