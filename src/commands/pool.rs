//! `shoal pool`: node pools, workers Shoal starts when replicas fit on no node and stops
//! when they run nothing, between a minimum and a maximum, through a provider command.

use super::Context;
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use shoal_api::{PoolWrite, seg};
use shoal_core::{Pool, PoolSpec};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal pool create workers --min 0 --max 5                    local `shoal node join` workers
  shoal pool create workers --min 1 --max 5 --node-arg=--memory --node-arg=2Gi
  shoal pool create cloud --max 20 --provider /usr/local/bin/shoal-ec2
  shoal pool create big --max 3 --label size=big --node-arg=--memory --node-arg=16Gi
  shoal pool set workers --max 10
  shoal pool apply -f workers.toml                              with [[schedule]] windows
  shoal get pools
  shoal pool delete workers                                     once it runs no node")]
pub struct PoolCommand {
    #[command(subcommand)]
    action: PoolAction,
}

#[derive(clap::Subcommand)]
enum PoolAction {
    /// Make a pool; it starts its minimum at once.
    Create {
        /// The pool's name; its nodes are NAME-1, NAME-2, …
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Change a pool's bounds, provider, cool-down or worker flags; its nodes stay.
    Set {
        /// The pool's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Create or change pools from TOML files: name, min, max, provider, cooldown,
    /// [labels], node_args and [[schedule]] windows (cron, timezone, duration or end,
    /// min/max).
    Apply {
        /// Pool files (repeatable).
        #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
        files: Vec<std::path::PathBuf>,
    },
    /// Delete a pool that runs no node (set its max to 0 first).
    Delete {
        /// The pool's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
}

#[derive(clap::Args)]
struct SpecArgs {
    /// Nodes the pool always runs (create: 0).
    #[arg(long)]
    min: Option<u32>,
    /// Nodes the pool runs at most (create: the minimum, or 1; set: kept, and a minimum above
    /// it refused).
    #[arg(long)]
    max: Option<u32>,
    /// A command that starts and stops workers: run as `COMMAND start NODE` and `COMMAND
    /// stop NODE` with SHOAL_POOL, SHOAL_JOIN_URL and SHOAL_JOIN_TOKEN_FILE set; `start`
    /// makes a worker run `shoal node join` as NODE. Without it, local processes.
    #[arg(long, value_name = "COMMAND")]
    provider: Option<String>,
    /// How long a node runs no replica before it is drained and stopped (create: 5m).
    #[arg(long, value_name = "DURATION")]
    cooldown: Option<String>,
    /// A label every node of the pool carries, KEY=VALUE (repeatable; set replaces them
    /// all): replicas whose node_selector asks for it grow this pool and no other.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = super::up::parse_label)]
    labels: Vec<(String, String)>,
    /// A `shoal node join` flag for local workers (repeatable), e.g. --node-arg=--memory
    /// --node-arg=2Gi; set replaces them all.
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    node_args: Vec<String>,
}

impl SpecArgs {
    /// These flags over `base` (the pool's spec, or, `creating`, the defaults for a new
    /// pool, whose maximum is then its minimum if that is more). A pool's maximum, a cap on
    /// what it costs, changes only when asked: a minimum above it is refused.
    fn over(self, base: PoolSpec, creating: bool) -> Result<PoolSpec> {
        let cooldown_ms = match self.cooldown {
            Some(text) => shoal_core::quantity::parse_duration_ms(&text)
                .map_err(|e| crate::exit::usage(format!("--cooldown: {e}")))?,
            None => base.cooldown_ms,
        };
        let min = self.min.unwrap_or(base.min);
        Ok(PoolSpec {
            min,
            max: match self.max {
                Some(max) => max,
                None if creating => base.max.max(min),
                None => base.max,
            },
            provider: self.provider.or(base.provider),
            cooldown_ms,
            labels: if self.labels.is_empty() {
                base.labels
            } else {
                self.labels.into_iter().collect()
            },
            node_args: if self.node_args.is_empty() {
                base.node_args
            } else {
                self.node_args
            },
            schedule: base.schedule,
        })
    }
}

pub async fn run(ctx: Context, cmd: PoolCommand) -> Result<()> {
    ctx.no_namespace("pools")?;
    let client = ctx.client()?;
    let path = |name: &str| format!("/v1/pools/{}", seg(name));
    let (name, write, verb) = match cmd.action {
        PoolAction::Apply { files } => {
            for file in files {
                let text = crate::files::read_text(&file, crate::files::SPEC_LIMIT)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let (name, spec) = shoal_core::spec::parse_pool(&text)
                    .map_err(|e| super::apply::in_file(&file, e))?;
                // Only "no such pool" makes a new one: an API that cannot answer, or a token
                // that may not look, is said as it is.
                let exists = match client
                    .checked(client.request(reqwest::Method::GET, &path(&name)))
                    .await
                {
                    Ok(_) => true,
                    Err(e) if crate::exit::is_not_found(&e) => false,
                    Err(e) => return Err(e),
                };
                let write = PoolWrite {
                    create: !exists,
                    spec,
                };
                let verb = if exists { "changed" } else { "created" };
                put(&ctx, &client, &name, write, verb).await?;
            }
            return Ok(());
        }
        PoolAction::Create { name, spec } => {
            let defaults = PoolSpec {
                min: 0,
                max: 1,
                provider: None,
                cooldown_ms: shoal_core::spec::DEFAULT_POOL_COOLDOWN_MS,
                labels: Default::default(),
                node_args: Vec::new(),
                schedule: Vec::new(),
            };
            let spec = spec.over(defaults, true)?;
            (name, PoolWrite { create: true, spec }, "created")
        }
        PoolAction::Set { name, spec } => {
            let pool: Pool = client.get(&path(&name)).await?;
            let spec = spec.over(pool.spec, false)?;
            (
                name,
                PoolWrite {
                    create: false,
                    spec,
                },
                "changed",
            )
        }
        PoolAction::Delete { name } => {
            client
                .checked(client.request(reqwest::Method::DELETE, &path(&name)))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "deleted": name })),
                Format::Table => println!("pool {name} deleted"),
            }
            return Ok(());
        }
    };
    put(&ctx, &client, &name, write, verb).await
}

async fn put(
    ctx: &Context,
    client: &crate::client::Client,
    name: &str,
    write: PoolWrite,
    verb: &str,
) -> Result<()> {
    let req = client
        .request(reqwest::Method::PUT, &format!("/v1/pools/{}", seg(name)))
        .json(&write);
    // The server's answers name the pool already.
    let pool: Pool = client.send(req).await?;
    match ctx.output {
        Format::Json => output::json(&pool),
        Format::Table => println!(
            "pool {name} {verb}: {} to {} nodes, {} running",
            pool.spec.min,
            pool.spec.max,
            pool.members.len()
        ),
    }
    Ok(())
}
