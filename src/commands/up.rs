//! `shoal up`, `shoal server` and `shoal node join`: the three ways to run
//! Shoal's parts. `up` is control plane, node agent and gateway in one
//! process; `server` is the control plane alone; `node join` is a worker.

use super::Context;
use super::apply::{SpecFile, apply_spec, read_specs};
use crate::client::{
    CliConfig, Client, ContextEntry, default_config_path, private_dir, private_file, write_private,
};
use anyhow::{Context as _, Result};
use shoal_agent::{Agent, AgentConfig};
use shoal_api::{CertificateRequest, Link};
use shoal_control::{ControlConfig, ControlPlane, LocalLink};
use shoal_core::Capacity;
use shoal_core::quantity::{parse_cpu, parse_memory};
use shoal_etcd::{EtcdConfig, EtcdStore};
use shoal_gateway::{Gateway, GatewayConfig};
use shoal_runtime::{Runtime, RuntimeConfig};
use shoal_store::{BlobStore, Store};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Flags of the control plane (`up`, `server`).
#[derive(clap::Args)]
pub struct ControlArgs {
    /// Where state, modules and compiled code live.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the /v1 API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub api: SocketAddr,
    /// The URL nodes, pool workers and the other servers of a shared store reach this API at
    /// (default: the --api address; for an unspecified one, 0.0.0.0 or ::, this machine's
    /// address on its default route). The API's certificate is valid for its host too.
    #[arg(long, value_name = "URL")]
    pub advertise_api: Option<String>,
    /// App specs to apply once the cluster is up: files, or directories of them, read and
    /// checked as `shoal apply -f` does before anything starts.
    #[arg(long = "apply")]
    pub apply: Vec<PathBuf>,
    /// Largest module upload accepted.
    #[arg(long, default_value = "64Mi")]
    pub max_module_size: String,
    /// Connections one client (an IP address, IPv6 too) may hold on the API at once; more
    /// are closed as they come. Nodes count too, 2 to 4 each: nodes behind one address need
    /// 4 per node. 0: no cap.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub api_client_connections: usize,
    /// What one key-value bucket (`wasi:keyvalue`, `shoal kv`) may hold, keys and values.
    #[arg(long, default_value = "64Mi")]
    pub kv_bucket_size: String,
    /// How long a node may be silent before it is NotReady and its replicas move.
    #[arg(long, default_value = "3s")]
    pub node_grace: String,
    /// How the scheduler scores nodes: fill the fullest first, or the emptiest.
    #[arg(long, value_enum, default_value_t = Scheduling::BinPack)]
    pub scheduling: Scheduling,
    /// Leave replicas where they are when apps end up spread unevenly (a node joined, or
    /// came back after a failover) instead of moving them, new before old, to even out.
    #[arg(long)]
    pub no_rebalance: bool,
    /// How long a module no revision uses is kept after its last upload or apply.
    #[arg(long, default_value = "10m")]
    pub module_gc_grace: String,
    /// Start with an empty state where the data dir holds a cluster's identity (ca.pem) but
    /// no state (state.redb missing or empty): every node joins again, stopping what it ran.
    /// Without it that start is refused, so that a lost state is restored, not replaced.
    #[arg(long)]
    pub new_state: bool,
    /// More names or addresses the API's certificate is valid for (repeatable), besides
    /// localhost, 127.0.0.1, the --api address and the host name.
    #[arg(long = "tls-san", value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Serve the API over plain HTTP instead of TLS: tokens cross the network in clear.
    #[arg(long)]
    pub plain_http: bool,
    /// How long the certificates the cluster CA issues are valid: the API's, each node's and
    /// the control plane's own. Each is renewed in place two thirds into it.
    #[arg(long, default_value = "30d")]
    pub cert_validity: String,
    /// An OCI registry (HOST:PORT) to pull components from over plain HTTP
    /// (repeatable); loopback registries always are, every other one over HTTPS.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registry: Vec<String>,
    /// The audit log: a JSON line for each admin-API request that changes something, each
    /// backup, join and refused token, saying who, from where, what and with what status (default:
    /// audit.log in the data dir; past 10 MiB it is renamed .1, and 5 of those are kept).
    /// `off`: none.
    #[arg(long, value_name = "FILE|off")]
    pub audit_log: Option<PathBuf>,
    /// Take a backup (as `shoal backup` does) this often, into backups/ in the data dir, the
    /// first one that long after the newest one there; where the controller runs. 0: never.
    #[arg(long, default_value = "12h", value_name = "DURATION")]
    pub backup_every: String,
    /// Scheduled backups kept; older ones are removed.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub backups_kept: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Scheduling {
    BinPack,
    Spread,
}

/// Flags of a node (`up`, `node join`).
#[derive(clap::Args)]
pub struct NodeArgs {
    /// Address of the gateway serving app traffic.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub gateway: SocketAddr,
    /// Address other nodes and the control plane reach this gateway at
    /// (default: --gateway; required when that is 0.0.0.0 or [::]).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Instances the node may run at once (its pool size).
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// CPU offered to the scheduler (default: all cores), e.g. "2" or "1500m".
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory offered to the scheduler (default: what the process may use, RAM or its
    /// cgroup's limit; never more than --memory-budget), e.g. "4Gi".
    #[arg(long)]
    pub memory: Option<String>,
    /// Guest memory the node hands out at once, each instance holding its app's
    /// `limits.memory` of it while it lives (default: three quarters of what the process may
    /// use), e.g. "6Gi".
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Node labels for node selectors, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Heartbeat period.
    #[arg(long, default_value = "1s")]
    pub heartbeat: String,
    /// How long a module no replica on this node runs stays compiled and fetched on it.
    #[arg(long, default_value = "5m")]
    pub module_cache_grace: String,
    /// How requests for replicas on other nodes travel: pooled keep-alive HTTP/1.1
    /// connections, or HTTP/2, one multiplexed connection per node.
    #[arg(long, value_enum, default_value = "http1")]
    pub hop_protocol: HopProtocol,
    /// Let guests reach loopback and private addresses their spec grants explicitly
    /// (`[network] outbound`); link-local ones stay refused.
    #[arg(long)]
    pub allow_private_egress: bool,
    /// PEM certificates that guests' `https://` egress trusts besides the Web PKI's roots
    /// (repeatable), e.g. a company CA.
    #[arg(long = "egress-ca", value_name = "FILE")]
    pub egress_ca: Vec<PathBuf>,
    /// A PEM certificate chain the gateway serves HTTPS with (repeatable, each with its
    /// --gateway-key in the same order): a client gets the one naming the host it asks for,
    /// or else the first.
    #[arg(long = "gateway-cert", value_name = "FILE", requires = "gateway_key")]
    pub gateway_cert: Vec<PathBuf>,
    /// The PEM private key of the --gateway-cert in the same position.
    #[arg(long = "gateway-key", value_name = "FILE", requires = "gateway_cert")]
    pub gateway_key: Vec<PathBuf>,
    /// Connections one client (an IPv4 address, an IPv6 /64) may hold on the gateway at
    /// once; more are closed as they come. 0: no cap (behind a proxy that is every client).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub gateway_client_connections: usize,
    /// Serve this node's own Prometheus metrics at http://ADDR/metrics, in plain text and
    /// to anyone who reaches ADDR (e.g. 127.0.0.1:9100); off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

/// `--hop-protocol`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HopProtocol {
    Http1,
    Http2,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal up --apply examples/hello/app.toml        a one-node cluster with an app serving
  shoal up --gateway-cert site.pem --gateway-key site-key.pem   HTTPS on the gateway too")]
pub struct UpArgs {
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    node: NodeArgs,
}

pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("labels are KEY=VALUE")?;
    Ok((k.to_string(), v.to_string()))
}

/// The daemons' log on stderr: lines for people, or one JSON object per line (`--log-format
/// json`) for a log pipeline.
pub fn init_tracing(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour for a person at a terminal; a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Raises the daemon's soft limit on open files to its hard limit (as Go programs do at
/// start): every replica keeps its log file open and every client and hop holds a socket, so
/// a soft limit of 1024 or less is met by a few hundred replicas, and then the API cannot
/// accept a connection at all. Says so when the limit in force stays low.
#[cfg(unix)]
pub fn raise_open_files_limit() {
    /// What the kernel takes at most by default (`fs.nr_open`), where the hard limit is
    /// unlimited.
    const MOST: libc::rlim_t = 1 << 20;
    /// Below this, a node of a few hundred replicas runs out.
    const FEW: libc::rlim_t = 4096;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the struct they are given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let want = limit.rlim_max.min(MOST);
    if limit.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = want,
                "raised the open files limit"
            );
            limit.rlim_cur = want;
        }
    }
    if limit.rlim_cur < FEW {
        tracing::warn!(
            limit = limit.rlim_cur,
            "this process may open only a few files (ulimit -n), and each replica keeps its log open: raise the hard limit"
        );
    }
}

/// How `shoal up`, `server` and `node join` write their log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("shoal")
}

/// A secret made once and kept in the data dir, readable by its owner only.
pub(crate) fn load_or_create_secret(path: &Path) -> Result<String> {
    load_or_create(path, |secret| hex::encode(secret))
}

/// The secret kept in `path`, or one made of 32 random bytes by `make` and kept there.
fn load_or_create(path: &Path, make: impl FnOnce(&[u8; 32]) -> String) -> Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    let token = make(&bytes);
    write_private(path, token.as_bytes())?;
    Ok(token)
}

/// The names and addresses the API's certificate is for: this machine's, the
/// address it listens on, and `--tls-san`.
fn api_names(args: &ControlArgs, addr: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim().to_lowercase();
        if !host.is_empty() {
            names.push(host);
        }
    }
    names.extend(args.tls_san.iter().cloned());
    names.dedup();
    names
}

/// The URL others reach this API at, and its host: `--advertise-api`, else the --api
/// address, where an unspecified one is this machine's address on its default route (as
/// kube-apiserver's `--advertise-address` defaults), or loopback without one. Servers sharing
/// a store register under it, so on 0.0.0.0 they would otherwise all be one.
fn advertised_api(args: &ControlArgs, scheme: &str, addr: SocketAddr) -> Result<(String, String)> {
    let Some(url) = &args.advertise_api else {
        let ip = match addr.ip() {
            ip if ip.is_unspecified() => {
                default_route_ip(ip.is_ipv6()).unwrap_or(if ip.is_ipv6() {
                    std::net::Ipv6Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv4Addr::LOCALHOST.into()
                })
            }
            ip => ip,
        };
        let at = SocketAddr::new(ip, addr.port());
        return Ok((format!("{scheme}://{at}"), ip.to_string()));
    };
    let bad = |why: &str| crate::exit::usage(format!("--advertise-api {url}: {why}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != scheme {
        return Err(bad(&format!(
            "this API serves {scheme}, so its URL starts with {scheme}://"
        )));
    }
    // An IPv6 host comes in brackets; the certificate names the address without them.
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err(bad("no host")),
    }
    .to_string();
    if parsed.path() != "/" || parsed.query().is_some() || !parsed.username().is_empty() {
        return Err(bad("a URL of scheme, host and port only is expected"));
    }
    Ok((url.trim_end_matches('/').to_string(), host))
}

/// This machine's address on the route to the internet, looked up, not used: connecting a
/// UDP socket sends nothing.
fn default_route_ip(v6: bool) -> Option<std::net::IpAddr> {
    let (local, probe) = if v6 {
        ("[::]:0", "[2001:db8::1]:9")
    } else {
        ("0.0.0.0:0", "192.0.2.1:9")
    };
    let socket = std::net::UdpSocket::bind(local).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

fn duration(flag: &str, s: &str) -> Result<Duration> {
    shoal_core::quantity::parse_duration_ms(s)
        .map(Duration::from_millis)
        .map_err(|e| crate::exit::usage(format!("--{flag}: {e}")))
}

fn node_capacity(args: &NodeArgs) -> Result<Capacity> {
    let cpu_millis = match &args.cpu {
        Some(c) => parse_cpu(c).map_err(|e| crate::exit::usage(format!("--cpu: {e}")))? as u64,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()) as u64 * 1000,
    };
    let memory_bytes = match &args.memory {
        Some(m) => parse_memory(m).map_err(|e| crate::exit::usage(format!("--memory: {e}")))?,
        None => shoal_runtime::available_memory().unwrap_or(4 << 30),
    };
    Ok(Capacity {
        cpu_millis,
        memory_bytes,
        instances: args.max_instances as u64,
    })
}

/// An etcd cluster to keep the state in, and the admin token of the cluster already there,
/// for a server that joins it with an empty data dir.
pub struct SharedStore {
    pub etcd: EtcdConfig,
    pub token_file: Option<PathBuf>,
}

/// A running control plane: API served, controller started.
pub struct StartedControl {
    pub control: ControlPlane,
    pub server: String,
    /// The servers its CLI context lists, comma-separated: this one, and on a shared store
    /// the others of the cluster started with the same context before it. What a node joins.
    pub servers: String,
    pub token: String,
    /// The cluster CA's certificate, PEM.
    pub ca: String,
    pub data: PathBuf,
    /// On a shared store: tells the campaign to step down, and the campaign's task.
    leading: Option<(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl StartedControl {
    /// Stops the control plane's part in the cluster: on a shared store, a leader steps down
    /// (its lease revoked, so another server takes over at once, not after the lease's TTL).
    pub async fn stop(self) {
        if let Some((stop, campaign)) = self.leading {
            stop.send_replace(true);
            let _ = tokio::time::timeout(STEP_DOWN_WITHIN, campaign).await;
        }
    }
}

/// How long a leader stopping waits for etcd to revoke its lease.
const STEP_DOWN_WITHIN: Duration = Duration::from_secs(3);

/// Starts the control plane on the state in the data dir, or in `etcd` when given.
pub async fn start_control(
    ctx: &Context,
    args: &ControlArgs,
    etcd: Option<SharedStore>,
) -> Result<StartedControl> {
    // Flags first: a bad one changes nothing.
    let ControlFlags {
        validity,
        max_module_bytes,
        kv_bucket_bytes,
        node_grace,
        module_gc_grace,
        backup_every,
    } = control_flags(args)?;
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    private_dir(&data)?;
    // On a shared store the identity comes from it, or goes into it, before it is read here.
    let etcd = match etcd {
        Some(shared) => {
            let endpoints = shared.etcd.endpoints.join(",");
            let config = shared.etcd;
            let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&config))
                .await?
                .with_context(|| format!("cannot reach the etcd store at {endpoints}"))?;
            let store = Arc::new(store);
            let (settling, dir) = (Arc::clone(&store), data.clone());
            tokio::task::spawn_blocking(move || {
                super::identity::settle(&*settling, &dir, shared.token_file.as_deref())
            })
            .await??;
            Some(store)
        }
        None => None,
    };
    // The state is opened before the identity is made, so that a data dir with an identity
    // and no state is one whose state was lost: starting would make a new, empty cluster
    // that every node of the old one re-joins, stopping all it runs.
    let state = data.join("state.redb");
    if etcd.is_none()
        && !args.new_state
        && match std::fs::metadata(&state) {
            Ok(m) => m.len() == 0,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
        && data.join("ca.pem").exists()
    {
        return Err(crate::exit::fail(
            crate::exit::CONFLICT,
            format!(
                "{} holds a cluster's identity (ca.pem) but its state {} is missing or empty: restore state.redb from a backup, or start with --new-state for an empty one (every node joins again, stopping what it ran)",
                data.display(),
                state.display()
            ),
        ));
    }
    let local = match etcd {
        Some(_) => None,
        None => {
            let store = Store::open(&state)
                .with_context(|| format!("cannot open the state in {}", data.display()))?;
            private_file(&state)?;
            Some(store)
        }
    };
    let token = load_or_create_secret(&data.join("token"))?;
    let ca = shoal_tls::Authority::load_or_create(&data)
        .map(|ca| Arc::new(ca.valid_for(validity)))
        .with_context(|| format!("cannot make or read the cluster CA in {}", data.display()))?;
    let ca_hash = ca.hash()?;
    let join_token = load_or_create(&data.join("join-token"), |secret| {
        shoal_core::auth::join_token(Some(&ca_hash), secret)
    })?;
    let shared = etcd.is_some();

    let blobs = BlobStore::open(&data.join("modules"))?;
    let config = ControlConfig {
        token: token.clone(),
        join_token,
        join_token_file: Some(data.join("join-token")),
        authority: Some(ca.clone()),
        secret_key_file: Some(data.join("secret.key")),
        kv_bucket_bytes,
        max_module_bytes,
        node_grace,
        module_gc_grace,
        strategy: match args.scheduling {
            Scheduling::BinPack => shoal_scheduler::Strategy::BinPack,
            Scheduling::Spread => shoal_scheduler::Strategy::Spread,
        },
        insecure_registries: args.insecure_registry.clone(),
        shared_store: shared,
        rebalance: !args.no_rebalance,
        audit_log: match &args.audit_log {
            Some(off) if off.as_os_str() == "off" => None,
            Some(file) => Some(file.clone()),
            None => Some(data.join("audit.log")),
        },
        ..ControlConfig::default()
    };
    let (control, etcd) = match etcd {
        Some(store) => {
            let control = ControlPlane::with_clock(
                Arc::clone(&store) as Arc<dyn shoal_store::KvStore>,
                blobs,
                config,
                Arc::new(shoal_core::clock::SystemClock),
            );
            (control, Some(store))
        }
        None => {
            let store = local.expect("a store is opened unless it is etcd");
            (ControlPlane::new(store, blobs, config), None)
        }
    };
    let control = control.map_err(|e| anyhow::anyhow!("cannot start the control plane: {e}"))?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the API (is another shoal running? use --api)",
                args.api
            )
        })?;
    let addr = listener.local_addr()?;
    let scheme = if args.plain_http { "http" } else { "https" };
    let (server, advertised_host) = advertised_api(args, scheme, addr)?;
    let tls = if args.plain_http {
        None
    } else {
        let mut names = api_names(args, addr);
        names.push(advertised_host);
        names.dedup();
        let cert = shoal_tls::LiveCert::new(&ca.issue_api(&names)?)?;
        let ca = ca.clone();
        tokio::spawn(keep_renewed("API", cert.clone(), move || {
            let issued = ca.issue_api(&names);
            async move { Ok(issued?) }
        }));
        Some(shoal_tls::server_config(&cert)?)
    };
    let backups = match backup_every {
        every if every.is_zero() => None,
        every => Some(shoal_control::BackupSchedule {
            dir: data.join("backups"),
            every,
            keep: args.backups_kept as usize,
        }),
    };
    let pools = shoal_control::PoolHost {
        join_url: server.clone(),
        token_file: data.join("join-token"),
        exe: std::env::current_exe().context("cannot find the shoal binary for pool workers")?,
        dir: data.join("pools"),
    };
    control.serves_at(&server);
    let leading = match etcd {
        // Servers sharing a store take turns: the controller runs where the leadership is.
        // Every one of them passes on what its nodes report, for the leader's decisions.
        Some(store) => {
            tokio::spawn(control.clone().share_reports());
            tokio::spawn(control.clone().follow_join_token());
            let (stop, stopping) = tokio::sync::watch::channel(false);
            let campaign = tokio::spawn(lead(
                store,
                control.clone(),
                (pools, backups),
                server.clone(),
                stopping,
            ));
            Some((stop, campaign))
        }
        None => {
            tokio::spawn(run_control_loops(control.clone(), pools, backups));
            None
        }
    };
    let router = shoal_control::router(control.clone());
    let limits = shoal_control::ServeLimits {
        max_client_connections: args.api_client_connections,
        ..shoal_control::ServeLimits::default()
    };
    let clients = limits.clients();
    control.count_api_clients(clients.clone());
    tokio::spawn(shoal_control::serve(listener, router, limits, tls, clients));
    // Its own context, made current; the CLI's other clusters stay. Servers on one shared
    // store are one cluster: started with the same context, each adds itself to it.
    let config_path = ctx.config.clone().unwrap_or_else(default_config_path);
    let mut config = CliConfig::load_or_new(&config_path)?;
    let name = ctx.context.clone().unwrap_or_else(|| addr.to_string());
    let entry = ContextEntry {
        server: server.clone(),
        token: token.clone(),
        ca: Some(ca.pem().to_string()),
        // The namespace a user chose for the context stays its own.
        namespace: config.contexts.get(&name).and_then(|c| c.namespace.clone()),
    };
    let entry = match config.contexts.get(&name) {
        Some(old) if shared && old.token == entry.token && old.ca == entry.ca => {
            old.with_server(&server)
        }
        _ => entry,
    };
    let servers = entry.server.clone();
    config.contexts.insert(name.clone(), entry);
    config.current = Some(name);
    config.save(&config_path)?;
    Ok(StartedControl {
        control,
        server,
        servers,
        token,
        ca: ca.pem().to_string(),
        data,
        leading,
    })
}

/// The control plane's flags that need reading.
struct ControlFlags {
    validity: Duration,
    max_module_bytes: u64,
    kv_bucket_bytes: u64,
    node_grace: Duration,
    module_gc_grace: Duration,
    backup_every: Duration,
}

fn control_flags(args: &ControlArgs) -> Result<ControlFlags> {
    let validity = duration("cert-validity", &args.cert_validity)?;
    if validity < MIN_CERT_VALIDITY {
        return Err(crate::exit::usage(format!(
            "--cert-validity {}: at least {}s, time to renew in",
            args.cert_validity,
            MIN_CERT_VALIDITY.as_secs()
        )));
    }
    let max_module_bytes = match parse_memory(&args.max_module_size) {
        Ok(0) => Err("no upload would fit".to_string()),
        other => other.map_err(|e| e.to_string()),
    }
    .map_err(|e| crate::exit::usage(format!("--max-module-size: {e}")))?;
    let kv_bucket_bytes = parse_memory(&args.kv_bucket_size)
        .map_err(|e| crate::exit::usage(format!("--kv-bucket-size: {e}")))?;
    Ok(ControlFlags {
        validity,
        max_module_bytes,
        kv_bucket_bytes,
        node_grace: duration("node-grace", &args.node_grace)?,
        module_gc_grace: duration("module-gc-grace", &args.module_gc_grace)?,
        backup_every: duration("backup-every", &args.backup_every)?,
    })
}

/// The control plane's loops that act on the cluster, the controller, the node pools'
/// provisioner and the scheduled backups: what exactly one server runs at a time.
async fn run_control_loops(
    control: ControlPlane,
    pools: shoal_control::PoolHost,
    backups: Option<shoal_control::BackupSchedule>,
) {
    let backups = async {
        if let Some(schedule) = backups {
            control.clone().run_backups(schedule).await;
        }
    };
    tokio::join!(
        control.clone().run_controller(),
        control.clone().run_pools(pools),
        backups
    );
}

/// Campaigns for the leadership of the servers sharing `store` and runs the controller while
/// it holds it, for ever: a server that loses it (its lease ran out: it could not reach etcd)
/// stops its controller and campaigns again.
async fn lead(
    store: Arc<EtcdStore>,
    control: ControlPlane,
    loops: (
        shoal_control::PoolHost,
        Option<shoal_control::BackupSchedule>,
    ),
    id: String,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut stop = async move || {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    loop {
        let campaign = tokio::select! {
            campaign = store.campaign(&id) => campaign,
            () = stop() => return,
        };
        let mut leadership = match campaign {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaigning for the controller's leadership");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tracing::info!(server = %id, "leading: the controller runs here");
        control.lead(shoal_etcd::LEADER_KEY, leadership.revision());
        let (said, server) = (control.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = said.say_leading(&server) {
                tracing::warn!(error = %e, "cannot record the leadership's event");
            }
        });
        let stepping_down = tokio::select! {
            () = run_control_loops(control.clone(), loops.0.clone(), loops.1.clone()) => return,
            () = leadership.lost() => {
                tracing::warn!(server = %id, "lost the leadership: the controller stops here");
                false
            }
            () = stop() => true,
        };
        if stepping_down {
            leadership.step_down().await;
            tracing::info!(server = %id, "stepped down: another server's controller takes over");
            return;
        }
    }
}

/// A running node: gateway listening, agent started.
pub struct StartedNode {
    pub name: String,
    pub gateway: SocketAddr,
    /// Whether the gateway serves HTTPS to the public too.
    pub https: bool,
    /// Where its metrics are served, if they are.
    pub metrics: Option<SocketAddr>,
    pub agent: Agent,
    front: shoal_gateway::Gateway,
    served: tokio::task::JoinHandle<()>,
}

impl StartedNode {
    /// Says at the gateway's `/_shoal/ready` that the node shuts down, serving on.
    pub fn stopping(&self) {
        self.front.stopping();
    }

    /// Stops taking requests and waits up to `within` for those in flight to finish.
    pub async fn close(self, within: std::time::Duration) {
        self.front.close();
        let _ = tokio::time::timeout(within, self.served).await;
    }

    /// The addresses it serves at, as `up` and `node join` print them.
    pub fn print_addresses(&self) {
        println!("  gateway:  http://{}", self.gateway);
        if self.https {
            println!("            https:// too, for the hosts of --gateway-cert");
        }
        if let Some(addr) = self.metrics {
            println!("  metrics:  http://{addr}/metrics");
        }
    }
}

/// Serves the node's metrics at `GET /metrics` on `listener` (`--metrics`), in plain HTTP
/// with the API's connection limits; returns its address.
fn serve_metrics(listener: tokio::net::TcpListener, agent: Agent) -> Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let agent = agent.clone();
            async move {
                use axum::http::{StatusCode, header};
                use axum::response::IntoResponse as _;
                match agent.prometheus() {
                    Ok(text) => (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode the node's metrics");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    let limits = shoal_control::ServeLimits::default();
    tokio::spawn(shoal_control::serve(
        listener,
        router,
        limits,
        None,
        limits.clients(),
    ));
    Ok(bound)
}

/// The certificates in the `--egress-ca` files, DER.
fn egress_roots(files: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    let mut roots = Vec::new();
    for file in files {
        let pem = std::fs::read_to_string(file)
            .with_context(|| format!("--egress-ca: cannot read {}", file.display()))?;
        let certs = shoal_tls::certificates_der(&pem)
            .with_context(|| format!("--egress-ca {}", file.display()))?;
        roots.extend(certs);
    }
    Ok(roots)
}

/// The shortest `--cert-validity`: a renewal needs a moment.
const MIN_CERT_VALIDITY: Duration = Duration::from_secs(3);

/// What the node's gateway proves itself with on hops: a key made here, which never leaves
/// the process, and the certificate the cluster CA signed for it, naming the address the
/// gateway is reached at. Made again at every start, so a new address is named, and
/// renewed, with a new key, as long as the node runs.
async fn member_tls(
    link: Arc<dyn Link>,
    node: &str,
    advertise: SocketAddr,
    ca: &str,
) -> Result<shoal_tls::Mutual> {
    let members = shoal_tls::mutual(&member_cert(&*link, node, advertise).await?, ca)?;
    let node = node.to_string();
    tokio::spawn(keep_renewed("node", members.cert().clone(), move || {
        let (link, node) = (link.clone(), node.clone());
        async move { member_cert(&*link, &node, advertise).await }
    }));
    Ok(members)
}

/// A new key for node `node` and the certificate the control plane signs for it.
async fn member_cert(
    link: &dyn Link,
    node: &str,
    advertise: SocketAddr,
) -> Result<shoal_tls::Issued> {
    let key = shoal_tls::NodeKey::generate()?;
    let request = CertificateRequest {
        csr: key.request(node)?,
        hosts: vec![advertise.ip().to_string()],
    };
    let pem = link.certificate(node, request).await.map_err(|e| {
        anyhow::anyhow!("cannot get node {node}'s certificate from the control plane: {e}")
    })?;
    Ok(key.with_certificate(&pem)?)
}

/// Keeps `cert` renewed for as long as the process runs: two thirds into the validity of
/// the one in use, `renew` makes the next. One that fails is tried again, more often as the
/// end nears; past it, TLS peers refuse the expired one until a renewal succeeds.
async fn keep_renewed<F, Fut>(what: &'static str, cert: shoal_tls::LiveCert, mut renew: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<shoal_tls::Issued>>,
{
    let left = |t: std::time::SystemTime| {
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    loop {
        tokio::time::sleep(left(cert.renew_at())).await;
        match renew().await.and_then(|issued| Ok(cert.replace(&issued)?)) {
            Ok(()) => tracing::info!(
                certificate = what,
                valid_for = ?left(cert.expires()),
                "renewed the certificate"
            ),
            Err(e) => {
                let left = left(cert.expires());
                tracing::warn!(
                    certificate = what,
                    error = %format!("{e:#}"),
                    expires_in = ?left,
                    "cannot renew the certificate; trying again"
                );
                let retry = (left / 10).clamp(Duration::from_millis(500), Duration::from_secs(30));
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// The gateway's HTTPS settings: the certificates of `--gateway-cert` and `--gateway-key`,
/// paired in order, and those apps bring for their route hosts (`[http] tls`, which the
/// agent keeps in the returned [`shoal_tls::IngressCerts`]). The files are read again on
/// SIGHUP (a renewed certificate), as nginx does.
fn ingress_tls(
    certs: &[PathBuf],
    keys: &[PathBuf],
) -> Result<(Arc<rustls::ServerConfig>, shoal_tls::IngressCerts)> {
    anyhow::ensure!(
        certs.len() == keys.len(),
        "{} --gateway-cert but {} --gateway-key: give each certificate its key",
        certs.len(),
        keys.len()
    );
    let (config, live) = shoal_tls::ingress_config(&read_pairs(certs, keys)?)
        .context("--gateway-cert/--gateway-key")?;
    if !certs.is_empty() {
        tokio::spawn(reload_on_hangup(
            certs.to_vec(),
            keys.to_vec(),
            live.clone(),
        ));
    }
    Ok((config, live))
}

/// Each certificate file with its key file, read.
fn read_pairs(certs: &[PathBuf], keys: &[PathBuf]) -> Result<Vec<shoal_tls::KeyedChain>> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    certs
        .iter()
        .zip(keys)
        .map(|(cert, key)| {
            Ok(shoal_tls::KeyedChain {
                chain: read(cert)?,
                key: read(key)?,
            })
        })
        .collect()
}

/// Reads the gateway's certificate files again at every SIGHUP; a set that does not load
/// leaves the one in use serving.
async fn reload_on_hangup(certs: Vec<PathBuf>, keys: Vec<PathBuf>, live: shoal_tls::IngressCerts) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            return tracing::warn!(error = %e, "no SIGHUP: gateway certificates reload only at a restart");
        }
    };
    while hangups.recv().await.is_some() {
        let loaded = read_pairs(&certs, &keys)
            .and_then(|pairs| live.replace(&pairs).context("--gateway-cert/--gateway-key"));
        match loaded {
            Ok(()) => tracing::info!("SIGHUP: the gateway serves the certificates read again"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "SIGHUP: kept the gateway certificates in use"
            ),
        }
    }
}

/// The node's name: `--node-name`, or the host name when it is a valid one.
pub fn node_name(args: &NodeArgs) -> Result<String> {
    let name = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_lowercase())
            .filter(|h| shoal_core::validate_name(h).is_ok())
            .unwrap_or_else(|| "local".into())
    });
    shoal_core::validate_name(&name)
        .map_err(|e| crate::exit::usage(format!("--node-name: {e}")))?;
    Ok(name)
}

/// What a node needs of this machine, taken before it registers: its flags read, its wasm
/// runtime made, its gateway's port bound. A node that cannot start must not join first: its
/// name would stay taken by a node that never ran.
pub struct NodeSite {
    runtime: Runtime,
    listener: tokio::net::TcpListener,
    advertise: SocketAddr,
    capacity: Capacity,
    heartbeat: Duration,
    module_cache_grace: Duration,
    egress_roots: Vec<Vec<u8>>,
    ingress: (Arc<rustls::ServerConfig>, shoal_tls::IngressCerts),
    metrics: Option<tokio::net::TcpListener>,
}

/// The gateway's port answering 503 while the node waits for its control plane (see
/// [`NodeSite::answer_starting`]); [`Starting::stop`] ends that before the gateway serves.
pub struct Starting {
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Starting {
    /// Ends the answering: open connections finish, within a second (one that never sends a
    /// request is not waited for longer).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut served = self.served;
        if tokio::time::timeout(Duration::from_secs(1), &mut served)
            .await
            .is_err()
        {
            served.abort();
        }
    }
}

impl NodeSite {
    /// Answers every request on the gateway's port with a 503 (`unavailable`, closing the
    /// connection) until [`Starting::stop`]: a node that waits for its control plane, before
    /// it has a gateway, would else leave clients' connections unanswered in its backlog for
    /// as long as the control plane is away.
    pub fn answer_starting(&self) -> Result<Starting> {
        use std::os::fd::AsFd as _;
        let copy = std::net::TcpListener::from(self.listener.as_fd().try_clone_to_owned()?);
        copy.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(copy)?;
        let answer = || async {
            let body = shoal_core::problem::ErrorBody::new(
                shoal_core::problem::ErrorCode::Unavailable,
                "this node is starting and waits for its control plane: try another node",
            );
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [
                    (axum::http::header::CONNECTION, "close"),
                    (axum::http::header::RETRY_AFTER, "1"),
                ],
                axum::Json(body),
            )
        };
        let router = axum::Router::new().fallback(answer);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Starting { stop, served })
    }
}

/// Takes what [`NodeSite`] holds, or says which flag or port stands in the way.
pub async fn prepare_node(data: &Path, args: &NodeArgs) -> Result<NodeSite> {
    let mut config = RuntimeConfig {
        cache_dir: data.join("cache"),
        max_instances: args.max_instances,
        ..RuntimeConfig::default()
    };
    if let Some(budget) = &args.memory_budget {
        config.memory_budget_bytes = parse_memory(budget)
            .map_err(|e| crate::exit::usage(format!("--memory-budget: {e}")))?;
    }
    let capacity = node_capacity(args)?;
    let heartbeat = duration("heartbeat", &args.heartbeat)?;
    let module_cache_grace = duration("module-cache-grace", &args.module_cache_grace)?;
    let egress_roots = egress_roots(&args.egress_ca)?;
    let ingress = ingress_tls(&args.gateway_cert, &args.gateway_key)?;
    let listener = tokio::net::TcpListener::bind(args.gateway)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the gateway (use --gateway)",
                args.gateway
            )
        })?;
    let metrics = match args.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the node's metrics (--metrics)")
        })?),
        None => None,
    };
    let gw_addr = listener.local_addr()?;
    let advertise = match args.advertise {
        Some(a) => a,
        None if gw_addr.ip().is_unspecified() => anyhow::bail!(
            "--gateway {gw_addr} listens on every interface: pass --advertise HOST:PORT, the address other nodes reach it at"
        ),
        None => gw_addr,
    };
    // The data dir last, private before the runtime makes its code cache in it.
    private_dir(data)?;
    let runtime = Runtime::new(config).with_context(|| {
        format!(
            "cannot start the wasm runtime (its instance pool reserves address space, not memory, for --max-instances {} instances: under an address-space limit such as `ulimit -v` or LimitAS, lower --max-instances)",
            args.max_instances
        )
    })?;
    Ok(NodeSite {
        runtime,
        listener,
        advertise,
        capacity,
        heartbeat,
        module_cache_grace,
        egress_roots,
        ingress,
        metrics,
    })
}

pub async fn start_node(
    data: &Path,
    args: &NodeArgs,
    site: NodeSite,
    name: String,
    link: Arc<dyn Link>,
    ca: &str,
) -> Result<StartedNode> {
    let NodeSite {
        runtime,
        listener,
        advertise,
        capacity,
        heartbeat,
        module_cache_grace,
        egress_roots,
        ingress: (ingress, ingress_certs),
        metrics,
    } = site;
    let gw_addr = listener.local_addr()?;
    let members = member_tls(link.clone(), &name, advertise, ca).await?;
    let gateway = Gateway::new(GatewayConfig {
        members: Some(members),
        hop_http2: args.hop_protocol == HopProtocol::Http2,
        allow_private_egress: args.allow_private_egress,
        max_client_connections: args.gateway_client_connections,
        egress_roots,
        ingress_tls: Some(ingress),
        ..GatewayConfig::default()
    });
    let agent = Agent::new(
        AgentConfig {
            node: name.clone(),
            gateway_addr: advertise.to_string(),
            capacity,
            labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            heartbeat,
            module_cache_grace,
            volumes_dir: data.join("volumes"),
            logs_dir: data.join("logs"),
            ingress: Some(ingress_certs),
        },
        link,
        runtime,
        gateway.clone(),
    );
    let metrics = match metrics {
        Some(listener) => Some(serve_metrics(listener, agent.clone())?),
        None => None,
    };
    // Requests wait for the routes (a 503 after a while) rather than miss them: the agent
    // says they are loaded once it has read the cluster's state.
    gateway.starting();
    tokio::spawn(agent.clone().run());
    let served = tokio::spawn(shoal_gateway::serve(listener, gateway.clone()));
    Ok(StartedNode {
        name,
        gateway: gw_addr,
        https: !args.gateway_cert.is_empty(),
        metrics,
        agent,
        front: gateway,
        served,
    })
}

/// `--apply`'s specs, read and checked as `shoal apply -f` reads them (a directory's too), before
/// anything starts: a typo exits with its line and column instead of leaving a cluster up
/// without the app.
pub fn read_apply(files: &[PathBuf]) -> Result<Vec<SpecFile>> {
    read_specs(files, false, None).context("--apply")
}

/// Applies `--apply`'s specs once the cluster is up. One the server refuses is reported and the
/// rest still go: the cluster serves what it already had.
pub async fn apply_specs(c: &StartedControl, specs: Vec<SpecFile>) -> Result<()> {
    let client = Client::connect(&c.server, &c.token, Some(&c.ca))?;
    let mut modules = super::apply::Modules::default();
    for spec in specs {
        let file = spec.file().display().to_string();
        match apply_spec(&client, spec, &mut modules, false, false, None).await {
            Ok(r) => println!("applied {file}: app {} {:?}", r.app.spec.key(), r.outcome),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}

/// Refuses two listeners of `up` given one address (port 0 aside, which picks a free one):
/// the second would fail to listen with a message blaming another shoal.
fn distinct_addresses(args: &UpArgs) -> Result<()> {
    let named = [
        ("--api", Some(args.control.api)),
        ("--gateway", Some(args.node.gateway)),
        ("--metrics", args.node.metrics),
    ];
    let given: Vec<(&str, SocketAddr)> = (named.iter())
        .filter_map(|(flag, addr)| Some((*flag, (*addr)?)))
        .filter(|(_, addr)| addr.port() != 0)
        .collect();
    for (i, (flag, addr)) in given.iter().enumerate() {
        if let Some((other, _)) = given[..i].iter().find(|(_, a)| a == addr) {
            return Err(crate::exit::usage(format!(
                "{other} and {flag} are both {addr}: each needs an address of its own"
            )));
        }
    }
    Ok(())
}

pub async fn run(ctx: Context, args: UpArgs) -> Result<()> {
    let specs = read_apply(&args.control.apply)?;
    init_tracing(ctx.log_format);
    #[cfg(unix)]
    raise_open_files_limit();
    // Every flag and the node's ports first: a cluster that cannot start its node must not
    // make its context the CLI's current one, which start_control does, nor a data dir.
    control_flags(&args.control)?;
    distinct_addresses(&args)?;
    let name = node_name(&args.node)?;
    let data = args
        .control
        .data_dir
        .clone()
        .unwrap_or_else(default_data_dir);
    let site = prepare_node(&data, &args.node).await?;
    let c = start_control(&ctx, &args.control, None).await?;
    let node = start_node(
        &c.data,
        &args.node,
        site,
        name,
        Arc::new(LocalLink(c.control.clone())),
        &c.ca,
    )
    .await?;

    let config_path = ctx.config.clone().unwrap_or_else(default_config_path);
    println!(
        "Shoal is up: one node ({}), data in {}",
        node.name,
        c.data.display()
    );
    println!("  API:      {}", c.server);
    node.print_addresses();
    println!("  CLI config (server + token): {}", config_path.display());
    println!(
        "  more nodes: shoal node join {} --token-file {} --gateway ADDR",
        c.server,
        c.data.join("join-token").display()
    );
    println!("Try: shoal get apps | shoal get replicas | shoal logs APP");
    apply_specs(&c, specs).await?;
    shutdown_signal().await;
    println!("Shoal is stopping");
    Ok(())
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
