//! `shoal backup FILE`: the cluster's state and modules at one revision, from its API, into a
//! file that `shoal server restore` brings back.

use super::Context;
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use futures::StreamExt;
use shoal_core::quantity::format_memory;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal backup shoal.tar                          the state and every module it records
  shoal backup - | gzip > shoal.tar.gz            to standard output
  shoal server restore shoal.tar --data-dir /var/lib/shoal   into a stopped server's data dir")]
pub struct BackupArgs {
    /// Where to write it (created readable by its owner only: it holds every app's
    /// configuration, and secrets sealed with the server's `secret.key`); `-`: standard output.
    /// Written beside it first and renamed over it once whole.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// What a backup written to a file holds, for `-o json`.
#[derive(serde::Serialize)]
struct Written {
    file: PathBuf,
    revision: u64,
    keys: u64,
    modules: u64,
    bytes: u64,
}

pub async fn run(ctx: Context, args: BackupArgs) -> Result<()> {
    let to_stdout = args.file.as_os_str() == "-";
    // Made before the server is asked, so a file that cannot be written costs it nothing. A
    // temp file is its owner's only, and gone if the download fails.
    let temp = if to_stdout {
        None
    } else {
        let dir = match args.file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some(
            tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("cannot write in {}", dir.display()))?,
        )
    };
    let client = ctx.client()?;
    let resp = client
        .checked(client.request(reqwest::Method::GET, "/v1/backup"))
        .await?;
    let said = |name: &str| -> u64 {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let (revision, keys, modules) = (
        said("shoal-backup-revision"),
        said("shoal-backup-keys"),
        said("shoal-backup-modules"),
    );
    let mut body = resp.bytes_stream();
    let Some(mut temp) = temp else {
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = body.next().await {
            out.write_all(&chunk.context("the backup broke off")?)?;
        }
        out.flush()?;
        return Ok(());
    };
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the backup broke off")?;
        bytes += chunk.len() as u64;
        temp.write_all(&chunk)
            .with_context(|| format!("cannot write {}", temp.path().display()))?;
    }
    temp.as_file().sync_all()?;
    temp.persist(&args.file)
        .with_context(|| format!("cannot write {}", args.file.display()))?;
    let written = Written {
        file: args.file,
        revision,
        keys,
        modules,
        bytes,
    };
    match ctx.output {
        Format::Json => output::json(&written),
        Format::Table => println!(
            "backup of revision {revision} written to {}: {keys} keys, {modules} modules, {}",
            written.file.display(),
            format_memory(bytes)
        ),
    }
    Ok(())
}
