//! `shoal up`: control plane, node agent and gateway in one process, state
//! in a redb file under the data dir.

use super::Context;
use crate::client::{CliConfig, Client, default_config_path, write_private};
use anyhow::{Context as _, Result};
use shoal_agent::{Agent, AgentConfig};
use shoal_control::{ControlConfig, ControlPlane};
use shoal_core::Capacity;
use shoal_core::quantity::parse_memory;
use shoal_gateway::{Gateway, GatewayConfig};
use shoal_runtime::{Runtime, RuntimeConfig};
use shoal_store::{BlobStore, Store};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where state, modules and compiled code live.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the /v1 API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    api: SocketAddr,
    /// Address of the gateway serving app traffic.
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway: SocketAddr,
    /// App spec files to apply once the cluster is up.
    #[arg(long = "apply")]
    apply: Vec<PathBuf>,
    /// Largest module upload accepted.
    #[arg(long, default_value = "64Mi")]
    max_module_size: String,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Instances the node may run at once (its pool size).
    #[arg(long, default_value_t = 1000)]
    max_instances: u32,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("shoal")
}

/// The admin token: made once, kept in the data dir, readable by its owner only.
fn load_or_create_token(data: &Path) -> Result<String> {
    let path = data.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no system randomness for the API token: {e}"))?;
    let token = hex::encode(bytes);
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

fn node_capacity(instances: u32) -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024);
    Capacity {
        cpu_millis: cpus * 1000,
        memory_bytes: memory,
        instances: instances as u64,
    }
}

pub async fn run(ctx: Context, args: UpArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create data dir {}", data.display()))?;
    let token = load_or_create_token(&data)?;
    let max_module_bytes = parse_memory(&args.max_module_size)
        .map_err(|e| anyhow::anyhow!("--max-module-size: {e}"))?;

    let store = Store::open(&data.join("state.redb"))
        .with_context(|| format!("cannot open the state in {}", data.display()))?;
    let blobs = BlobStore::open(&data.join("modules"))?;
    let control = ControlPlane::new(
        store,
        blobs,
        ControlConfig {
            token: token.clone(),
            max_module_bytes,
            ..ControlConfig::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot start the control plane: {e}"))?;
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: data.join("cache"),
        max_instances: args.max_instances,
        ..RuntimeConfig::default()
    })
    .context("cannot start the wasm runtime")?;

    let api_listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the API (is another shoal running? use --api)",
                args.api
            )
        })?;
    let gw_listener = tokio::net::TcpListener::bind(args.gateway)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the gateway (use --gateway)",
                args.gateway
            )
        })?;
    let api_addr = api_listener.local_addr()?;
    let gw_addr = gw_listener.local_addr()?;

    let gateway = Gateway::new(GatewayConfig::default());
    let node = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_lowercase())
            .filter(|h| shoal_core::validate_name(h).is_ok())
            .unwrap_or_else(|| "local".into())
    });
    shoal_core::validate_name(&node).map_err(|e| anyhow::anyhow!("--node-name: {e}"))?;
    let agent = Agent::new(
        AgentConfig {
            node: node.clone(),
            gateway_addr: gw_addr.to_string(),
            capacity: node_capacity(args.max_instances),
            labels: Default::default(),
            heartbeat: Duration::from_secs(1),
        },
        control.clone(),
        runtime,
        gateway.clone(),
    );
    control.set_log_source(Arc::new(agent.clone()));

    tokio::spawn(control.clone().run_controller());
    tokio::spawn(agent.run());
    tokio::spawn(shoal_gateway::serve(gw_listener, gateway));
    let router = shoal_control::router(control);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api_listener, router).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });

    let server = format!("http://{api_addr}");
    let config_path = ctx.config.clone().unwrap_or_else(default_config_path);
    CliConfig {
        server: server.clone(),
        token: token.clone(),
    }
    .save(&config_path)?;

    println!("Shoal is up: one node ({node}), data in {}", data.display());
    println!("  API:      {server}");
    println!("  gateway:  http://{gw_addr}");
    println!("  CLI config (server + token): {}", config_path.display());
    println!("Try: shoal get apps | shoal get replicas | shoal logs APP");

    let client = Client::new(Some(server), Some(token), None)?;
    for file in &args.apply {
        match super::apply::apply_file(&client, file, false).await {
            Ok(r) => println!(
                "applied {}: app {} {:?}",
                file.display(),
                r.app.spec.key(),
                r.outcome
            ),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }

    shutdown_signal().await;
    println!("Shoal is stopping");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
