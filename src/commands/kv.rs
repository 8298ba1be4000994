//! `shoal kv`: the namespace's key-value buckets, which guests granted them reach through
//! `wasi:keyvalue`.

use super::Context;
use crate::output::{self, Format, table};
use anyhow::{Context as _, Result, bail};
use shoal_api::{BucketView, seg};
use shoal_core::kv::KvAnswer;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal kv put counter greeting hello             a key of bucket counter
  shoal kv get counter hits                       its value, as stored
  shoal kv list counter                           its keys; `kv buckets` lists the buckets")]
pub struct KvCommand {
    #[command(subcommand)]
    action: KvAction,
}

#[derive(clap::Subcommand)]
enum KvAction {
    /// Print a key's value, as stored (bytes).
    Get {
        /// The bucket.
        #[arg(value_parser = crate::commands::object_name)]
        bucket: String,
        /// The key.
        #[arg(value_parser = kv_key)]
        key: String,
    },
    /// Store a value under a key: the argument, or a file's bytes.
    Put {
        /// The bucket.
        #[arg(value_parser = crate::commands::object_name)]
        bucket: String,
        /// The key.
        #[arg(value_parser = kv_key)]
        key: String,
        /// The value; or --from-file.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from this file (`-`: standard input).
        #[arg(long = "from-file", value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// Delete a key (no error if it is not there).
    Delete {
        /// The bucket.
        #[arg(value_parser = crate::commands::object_name)]
        bucket: String,
        /// The key.
        #[arg(value_parser = kv_key)]
        key: String,
    },
    /// List a bucket's keys, in order.
    List {
        /// The bucket.
        #[arg(value_parser = crate::commands::object_name)]
        bucket: String,
    },
    /// List the namespace's buckets: keys and bytes each holds.
    Buckets,
}

/// Reads a key for clap: refused before any request (an empty key would name the bucket,
/// and a `..` step up the API's paths).
fn kv_key(text: &str) -> Result<String, String> {
    shoal_core::kv::check_new_key(text).map(|()| text.to_string())
}

pub async fn run(ctx: Context, cmd: KvCommand) -> Result<()> {
    let client = ctx.client()?;
    let ns = ctx.namespace.clone();
    let at = |bucket: &str, key: &str| {
        // Each segment escaped; the slashes stay, and the server takes the rest of the path.
        let key: String = key
            .split('/')
            .map(|part| seg(part).to_string())
            .collect::<Vec<_>>()
            .join("/");
        format!("/v1/kv/{}/{key}?namespace={}", seg(bucket), seg(&ns))
    };
    match cmd.action {
        KvAction::Get { bucket, key } => {
            let resp = client
                .checked(client.request(reqwest::Method::GET, &at(&bucket, &key)))
                .await?;
            let bytes = resp.bytes().await.context("reading the value")?;
            if ctx.output == Format::Json {
                let value = std::str::from_utf8(&bytes).map_err(|_| {
                    anyhow::anyhow!(
                        "the value of {key} is not UTF-8 text, which JSON cannot hold: without -o json, its bytes are written as they are"
                    )
                })?;
                output::json(&serde_json::json!({ "bucket": bucket, "key": key, "value": value }));
                return Ok(());
            }
            output::write_stdout(&bytes)?;
            // The exact bytes to a pipe; on a terminal, the prompt on a line of its own.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) && !bytes.ends_with(b"\n") {
                output::write_stdout(b"\n")?;
            }
        }
        KvAction::Put {
            bucket,
            key,
            value,
            file,
        } => {
            let body = match (value, file) {
                (Some(v), None) => v.into_bytes(),
                (None, Some(path)) => crate::files::read(&path, crate::files::VALUE_LIMIT)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                _ => bail!("give a value or --from-file, not both"),
            };
            client
                .checked(
                    client
                        .request(reqwest::Method::PUT, &at(&bucket, &key))
                        .body(body),
                )
                .await?;
        }
        KvAction::Delete { bucket, key } => {
            client
                .checked(client.request(reqwest::Method::DELETE, &at(&bucket, &key)))
                .await?;
        }
        KvAction::List { bucket } => {
            let mut cursor: Option<u64> = None;
            let mut all = Vec::new();
            loop {
                let mut path = format!("/v1/kv/{}?namespace={}", seg(&bucket), seg(&ns));
                if let Some(c) = cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                match client.get::<KvAnswer>(&path).await? {
                    KvAnswer::Keys { keys, cursor: next } => {
                        all.extend(keys);
                        match next {
                            Some(n) => cursor = Some(n),
                            None => break,
                        }
                    }
                    other => bail!("the server answered {other:?} to a list"),
                }
            }
            match ctx.output {
                Format::Json => output::json(&all),
                Format::Table => {
                    for key in &all {
                        println!("{key}");
                    }
                }
            }
        }
        KvAction::Buckets => {
            let buckets: Vec<BucketView> = client
                .get(&format!("/v1/kv?namespace={}", seg(&ns)))
                .await?;
            if ctx.output == Format::Json {
                output::json(&buckets);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = buckets
                .iter()
                .map(|b| vec![b.bucket.clone(), b.keys.to_string(), b.bytes.to_string()])
                .collect();
            table(&["BUCKET", "KEYS", "BYTES"], &rows);
        }
    }
    Ok(())
}
