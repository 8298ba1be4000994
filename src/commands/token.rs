use super::Context;
use crate::client::write_private;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::RotatedJoinToken;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TokenCommand {
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(clap::Subcommand)]
enum TokenAction {
    /// Make a new join token; the old one stops working at once. Nodes that have joined
    /// keep their own credentials.
    RotateJoin {
        /// Also write the new token to this file (readable by its owner only), for
        /// `shoal node join --token-file` on another machine. It is never printed.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

pub async fn run(ctx: Context, cmd: TokenCommand) -> Result<()> {
    let TokenAction::RotateJoin { write } = cmd.action;
    let client = ctx.client()?;
    let path = if write.is_some() {
        "/v1/join-token/rotate?reveal=true"
    } else {
        "/v1/join-token/rotate"
    };
    let mut rotated: RotatedJoinToken = client
        .send(client.request(reqwest::Method::POST, path))
        .await?;
    if let (Some(file), Some(token)) = (&write, rotated.token.take()) {
        write_private(file, token.as_bytes())?;
    }
    match ctx.output {
        Format::Json => output::json(&rotated),
        Format::Table => {
            println!("join token rotated");
            if let Some(file) = &rotated.file {
                println!("  kept by the control plane in {file}");
            }
            if let Some(file) = &write {
                println!("  written to {}", file.display());
            }
        }
    }
    Ok(())
}
