use super::Context;
use super::up::{NodeArgs, default_data_dir, init_tracing, shutdown_signal, start_node};
use crate::client::private_dir;
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use shoal_agent::RemoteLink;
use shoal_core::auth::hop_secret;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct NodeCommand {
    #[command(subcommand)]
    action: NodeAction,
}

#[derive(clap::Subcommand)]
enum NodeAction {
    /// Run a worker node that joins the control plane at URL.
    Join(Box<JoinArgs>),
    /// Stop placing new replicas on a node; what runs there stays.
    Cordon { name: String },
    /// Allow placing replicas on a node again.
    Uncordon { name: String },
    /// Cordon a node and move its replicas elsewhere, each new one Ready before its old one stops.
    Drain { name: String },
}

#[derive(clap::Args)]
struct JoinArgs {
    /// Control plane URL, e.g. http://10.0.0.1:7700.
    url: String,
    /// The cluster's join token (`join-token` in the server's data dir). Prefer
    /// `--token-file` or the environment: a command line is visible to every user in `ps`.
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where this node keeps fetched modules and compiled code.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(ctx: Context, cmd: NodeCommand) -> Result<()> {
    let (name, verb) = match cmd.action {
        NodeAction::Join(args) => return join(*args).await,
        NodeAction::Cordon { name } => (name, "cordon"),
        NodeAction::Uncordon { name } => (name, "uncordon"),
        NodeAction::Drain { name } => (name, "drain"),
    };
    let client = ctx.client()?;
    let node: serde_json::Value = client
        .send(client.request(reqwest::Method::POST, &format!("/v1/nodes/{name}/{verb}")))
        .await?;
    match ctx.output {
        Format::Json => output::json(&node),
        Format::Table => println!("node {name}: {verb} requested"),
    }
    Ok(())
}

async fn join(args: JoinArgs) -> Result<()> {
    init_tracing();
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the join token from {}", file.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("give the join token with --token-file or SHOAL_JOIN_TOKEN"),
    };
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    private_dir(&data)?;
    let link = RemoteLink::new(&args.url, &token, data.join("modules"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Refuse early and clearly when the token is wrong.
    let probe = shoal_api::Client::new(&args.url, &token)
        .request(reqwest::Method::GET, "/v1/cluster/snapshot")
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {}", args.url))?;
    if probe.status() == 401 {
        anyhow::bail!("the control plane at {} refused the join token", args.url);
    }
    let node = start_node(&data, &args.node, Arc::new(link), hop_secret(&token)).await?;
    println!("Shoal node {} joined {}", node.name, args.url);
    println!("  gateway:  http://{}", node.gateway);
    shutdown_signal().await;
    println!("Shoal node is stopping");
    Ok(())
}
