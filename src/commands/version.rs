//! `shoal version`: this CLI's release and the server's, as `kubectl version` tells them, so
//! a mismatch between the two is seen before it surprises.

use super::Context;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::ServerVersion;

/// What a server that does not say its release is: one from before `shoal version`.
const OLDER: &str = "unknown (a server from before `shoal version`)";

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal version                                   the CLI's release and the server's
  shoal version --client                          the CLI's alone, asking no server")]
pub struct VersionArgs {
    /// The CLI's release alone: no server is asked.
    #[arg(long)]
    client: bool,
}

pub async fn run(ctx: Context, args: VersionArgs) -> Result<()> {
    let client = env!("CARGO_PKG_VERSION");
    let server = match args.client {
        true => None,
        // The CLI's own release is said first, whatever becomes of the server's.
        false => Some(async { ctx.client()?.get::<ServerVersion>("/v1/version").await }),
    };
    if ctx.output == Format::Table {
        println!("Client: {client}");
    }
    let server = match server {
        // A server from before `/v1/version` has none to tell: the mismatch itself.
        Some(asked) => match asked.await {
            Ok(answer) => Some(answer.version),
            Err(e) if crate::exit::is_not_found(&e) => Some(OLDER.to_string()),
            Err(e) => return Err(e),
        },
        None => None,
    };
    match ctx.output {
        Format::Json => output::json(&serde_json::json!({ "client": client, "server": server })),
        Format::Table => {
            if let Some(server) = server {
                println!("Server: {server}");
            }
        }
    }
    Ok(())
}
