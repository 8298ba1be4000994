use super::Context;
use super::up::{
    NodeArgs, default_data_dir, init_tracing, node_name, prepare_node, shutdown_signal, start_node,
};
use crate::client::{private_dir, write_private};
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use shoal_agent::{JoinToken, Rejoin, RemoteLink};
use shoal_api::{JoinResponse, NodeDeleted, Resend, Servers, seg};
use shoal_core::auth::Credential;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal node join https://cp:7700 --token-file join.token --gateway 0.0.0.0:8080 --advertise 10.0.0.5:8080
  shoal node join https://cp-1:7700,https://cp-2:7700,https://cp-3:7700 --token-file join.token
                                                  servers sharing an etcd store: fails over between them
  shoal node drain node-2                         move its replicas away, new before old
  shoal node label node-2 zone=b disk-            set zone, remove disk (--overwrite: change a value)
  shoal node uncordon node-2                      place replicas there again")]
pub struct NodeCommand {
    #[command(subcommand)]
    action: NodeAction,
}

impl NodeCommand {
    /// Whether it runs a node (a daemon, which keeps Rust's way with a closed pipe), not a
    /// command on one.
    pub fn is_join(&self) -> bool {
        matches!(self.action, NodeAction::Join(_))
    }
}

#[derive(clap::Subcommand)]
enum NodeAction {
    /// Run a worker node that joins the control plane at URL (or at several servers of it).
    Join(Box<JoinArgs>),
    /// Stop placing new replicas on a node; what runs there stays.
    Cordon {
        /// The node's name (`shoal get nodes` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
    /// Allow placing replicas on a node again.
    Uncordon {
        /// The node's name (`shoal get nodes` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
    /// Cordon a node and move its replicas elsewhere, each new one Ready before its old one stops.
    Drain {
        /// The node's name (`shoal get nodes` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// Return only once no replica runs there (exit 0), as `kubectl drain` does; exit 1
        /// if some still do after --timeout (with nowhere to go they keep serving there).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. 90s, 10m).
        #[arg(long, default_value = "5m", requires = "wait")]
        timeout: String,
    },
    /// Set or remove a node's labels, as `kubectl label node` does. They outlive the node's
    /// restarts (over its own --label); replicas whose node_selector it no longer matches move.
    Label {
        /// The node's name (`shoal get nodes` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// KEY=VALUE sets a label, KEY- removes one.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        labels: Vec<String>,
        /// Change a label that already has another value (without it, that is refused).
        #[arg(long)]
        overwrite: bool,
    },
    /// Remove a node: its credential is revoked and its replicas are replaced elsewhere.
    /// A node that still runs must join again with the join token.
    Delete {
        /// The node's name (`shoal get nodes` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
}

#[derive(clap::Args)]
struct JoinArgs {
    /// Control plane URL, e.g. https://10.0.0.1:7700; or the URLs of several servers of one
    /// cluster (sharing an etcd store), comma-separated: the node calls the first and, when
    /// one does not answer, the next, its watch resuming there.
    #[arg(value_name = "URL[,URL…]", value_parser = super::parse_servers)]
    servers: Servers,
    /// The cluster's join token (`join-token` in the server's data dir), needed the first
    /// time only: the node then keeps a credential of its own in its data dir. Prefer
    /// `--token-file` or the environment: a command line is visible to every user in `ps`.
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where this node keeps fetched modules and compiled code.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, first have this node's replicas move to other nodes (each new
    /// one Ready before its old one stops), waiting up to this long, then let the requests in
    /// flight through its gateway finish (at least 5 s); a second signal stops at once. When
    /// it next starts it is as it was (schedulable, or cordoned by an operator). 0: stop at once.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    drain_timeout: String,
    /// On SIGTERM or Ctrl-C, the gateway's `/_shoal/ready` answers 503 at once, and the
    /// gateway goes on taking connections for at least this long (within the drain timeout),
    /// so a load balancer checking it stops sending clients here before it closes (as a
    /// preStop sleep does for a Kubernetes pod). 0: it closes once its replicas have moved.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    shutdown_delay: String,
    /// How long a node that has not joined yet waits for a server to take its join (one still
    /// starting, or, over TLS, one closing connections past its per-address cap), trying again
    /// up to 5 s apart; then it exits 5. 0: one try.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    join_wait: String,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(ctx: Context, cmd: NodeCommand) -> Result<()> {
    let (name, verb) = match cmd.action {
        NodeAction::Join(args) => return join(*args, ctx.log_format).await,
        NodeAction::Delete { name } => return delete(ctx, name).await,
        NodeAction::Label {
            name,
            labels,
            overwrite,
        } => return label(ctx, name, &labels, overwrite).await,
        NodeAction::Cordon { name } => (name, "cordon"),
        NodeAction::Uncordon { name } => (name, "uncordon"),
        NodeAction::Drain {
            name,
            wait: true,
            timeout,
        } => return drain_and_wait(ctx, name, &timeout).await,
        NodeAction::Drain { name, .. } => (name, "drain"),
    };
    let client = ctx.client()?;
    let node: serde_json::Value = client
        .send(client.request(
            reqwest::Method::POST,
            &format!("/v1/nodes/{}/{verb}", seg(&name)),
        ))
        .await?;
    match ctx.output {
        Format::Json => output::json(&node),
        Format::Table => println!("node {name}: {verb} requested"),
    }
    Ok(())
}

/// `node drain --wait`: drains, then follows the node's replica count down to zero.
async fn drain_and_wait(ctx: Context, name: String, timeout: &str) -> Result<()> {
    let timeout = shoal_core::quantity::parse_duration_ms(timeout)
        .map_err(|e| crate::exit::usage(format!("--timeout: {e}")))?;
    let client = ctx.client()?;
    client
        .checked(client.request(
            reqwest::Method::POST,
            &format!("/v1/nodes/{}/drain", seg(&name)),
        ))
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout);
    let mut said = None;
    loop {
        let nodes: Vec<shoal_api::NodeSummary> = client.get("/v1/nodes").await?;
        let Some(node) = nodes.into_iter().find(|n| n.node.name == name) else {
            return Err(crate::exit::fail(
                crate::exit::NOT_FOUND,
                format!("node {name} is gone"),
            ));
        };
        if node.replicas == 0 {
            if ctx.output == Format::Table {
                println!("node {name} drained");
            }
            return Ok(());
        }
        if ctx.output == Format::Table && said != Some(node.replicas) {
            println!(
                "node {name}: {} still running there",
                output::count(node.replicas, "replica")
            );
            said = Some(node.replicas);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "node {name} still runs {} after {}: with nowhere to go they keep serving there (see `shoal get replicas`)",
                output::count(node.replicas, "replica"),
                output::duration(timeout)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `KEY=VALUE` and `KEY-` arguments as the API takes them.
fn label_changes(args: &[String], overwrite: bool) -> Result<shoal_api::NodeLabels> {
    let mut change = shoal_api::NodeLabels {
        overwrite,
        ..Default::default()
    };
    for arg in args {
        match (arg.split_once('='), arg.strip_suffix('-')) {
            (Some((key, value)), _) => {
                super::insert_once(&mut change.set, key.to_string(), value.to_string())?;
            }
            (None, Some(key)) if change.remove.iter().any(|k| k == key) => {
                return Err(crate::exit::usage(format!("key {key:?} is given twice")));
            }
            (None, Some(key)) => change.remove.push(key.to_string()),
            (None, None) => {
                return Err(crate::exit::usage(format!(
                    "{arg:?}: labels are KEY=VALUE to set or KEY- to remove"
                )));
            }
        }
    }
    Ok(change)
}

async fn label(ctx: Context, name: String, args: &[String], overwrite: bool) -> Result<()> {
    let change = label_changes(args, overwrite)?;
    let client = ctx.client()?;
    let node: shoal_core::Node = client
        .send_idempotent(
            client
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/nodes/{}/labels", seg(&name)),
                )
                .json(&change),
        )
        .await?;
    match ctx.output {
        Format::Json => output::json(&node),
        Format::Table => println!("node {name} labeled"),
    }
    Ok(())
}

async fn delete(ctx: Context, name: String) -> Result<()> {
    let client = ctx.client()?;
    let deleted: NodeDeleted = client
        .send(client.request(
            reqwest::Method::DELETE,
            &format!("/v1/nodes/{}", seg(&name)),
        ))
        .await?;
    match ctx.output {
        Format::Json => output::json(&deleted),
        Format::Table => println!("node {name} deleted"),
    }
    if !deleted.volumes.is_empty() {
        eprintln!(
            "Warning: volumes {} were bound to node {name}; their data stays on its machine. \
             Replicas mounting them wait for a node {name} to join again with its data dir, \
             or for the volumes to be deleted (`shoal delete volume NAME -n NAMESPACE`).",
            deleted.volumes.join(", ")
        );
    }
    Ok(())
}

/// The least time a node shutting down gives the requests in flight through its gateway.
const IN_FLIGHT_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a node keeps its credential.
fn identity_file(data: &Path) -> PathBuf {
    data.join("node-identity.json")
}

/// Where a node keeps the servers it learnt of (`RemoteLink::remember_servers`).
fn servers_file(data: &Path) -> PathBuf {
    data.join("servers")
}

async fn join(args: JoinArgs, log_format: super::up::LogFormat) -> Result<()> {
    init_tracing(log_format);
    #[cfg(unix)]
    super::up::raise_open_files_limit();
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    private_dir(&data)?;
    let name = node_name(&args.node)?;
    let drain_ms = shoal_core::quantity::parse_duration_ms(&args.drain_timeout)
        .map_err(|e| crate::exit::usage(format!("--drain-timeout: {e}")))?;
    let drain = std::time::Duration::from_millis(drain_ms);
    let shutdown_delay = shoal_core::quantity::parse_duration_ms(&args.shutdown_delay)
        .map_err(|e| crate::exit::usage(format!("--shutdown-delay: {e}")))?;
    let shutdown_delay = std::time::Duration::from_millis(shutdown_delay).min(drain);
    let join_wait = shoal_core::quantity::parse_duration_ms(&args.join_wait)
        .map_err(|e| crate::exit::usage(format!("--join-wait: {e}")))?;
    let mut patience = Patience::new(std::time::Duration::from_millis(join_wait));
    // The servers it learnt when it last ran: the ones given may be gone since.
    if let Ok(learnt) = std::fs::read_to_string(servers_file(&data)) {
        args.servers.learn(&learnt);
    }
    let site = prepare_node(&data, &args.node).await?;
    let starting = site.answer_starting()?;
    let ca = cluster_ca(&args, &data, &mut patience).await?;
    let http = shoal_agent::http_client(&ca).map_err(|e| anyhow::anyhow!("{e}"))?;
    let identity = identity(&args, &http, &data, &name, &mut patience).await?;
    starting.stop().await;
    let mut link = RemoteLink::new(
        http,
        args.servers.clone(),
        &identity.credential,
        data.join("modules"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .remember_servers(servers_file(&data));
    if let Some(token) = join_token(&args) {
        link = link.rejoin(Rejoin {
            node: name.clone(),
            token,
            identity_file: identity_file(&data),
        });
    }
    let node = start_node(&data, &args.node, site, name, Arc::new(link), &ca).await?;
    println!("Shoal node {} joined {}", node.name, args.servers);
    node.print_addresses();
    shutdown_signal().await;
    if drain.is_zero() {
        println!("Shoal node is stopping");
        return Ok(());
    }
    node.stopping();
    let signalled = tokio::time::Instant::now();
    println!(
        "Shoal node is stopping: its replicas move to other nodes first (up to {}; signal again to stop now)",
        output::duration(drain_ms)
    );
    let deadline = tokio::time::Instant::now() + drain;
    let agent = node.agent.clone();
    let graceful = async move {
        match agent.leave(drain).await {
            Ok(0) => println!("Shoal node is stopping: its replicas run on other nodes now"),
            Ok(left) => println!(
                "Shoal node is stopping: {} still here after {}, with nowhere else to go; they are replaced once the node is missed",
                output::count(left, "replica"),
                output::duration(drain_ms)
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot ask the control plane to move this node's replicas; stopping with them: they are replaced once the node is missed"
            ),
        }
        // A load balancer told at /_shoal/ready has had its time to look elsewhere.
        tokio::time::sleep_until(signalled + shutdown_delay).await;
        // What is in flight through the gateway finishes, within what is left of the time,
        // and never less than a few seconds, even after replicas that had nowhere to go.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        node.close(left.max(IN_FLIGHT_AT_LEAST)).await;
    };
    tokio::select! {
        _ = graceful => {}
        _ = shutdown_signal() => println!("Shoal node is stopping now"),
    }
    Ok(())
}

/// The cluster CA, which the control plane's certificate (for an `https://`
/// URL) and the certificates of the other nodes' gateways are checked
/// against: the one kept in the data dir, or else the one the first server
/// that answers presents, taken only if its hash is the one the join token
/// carries.
async fn cluster_ca(args: &JoinArgs, data: &Path, patience: &mut Patience) -> Result<String> {
    let file = data.join("ca.pem");
    if let Ok(pem) = std::fs::read_to_string(&file) {
        return Ok(pem);
    }
    let token = join_token(args)
        .context("a node joins the first time with the cluster's join token: give --token-file or SHOAL_JOIN_TOKEN")?
        .read()
        .map_err(|e| anyhow::anyhow!(e))?;
    let Some(expected) = shoal_core::auth::join_token_ca_hash(&token) else {
        anyhow::bail!(
            "the join token carries no CA hash to check {} against: it is not one a control plane wrote (copy `join-token` from its data dir again; `shoal token rotate-join` makes a new one, and the old one stops working)",
            args.servers
        );
    };
    // Not trusted yet: what the server presents is taken only if it hashes to the token's.
    let unchecked = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()?;
    loop {
        let mut unreachable = Vec::new();
        for url in args.servers.urls().iter() {
            let read = async {
                unchecked
                    .get(format!("{url}/v1/cluster/ca"))
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            };
            let pem = match read.await {
                Ok(pem) => pem,
                Err(e) => {
                    unreachable.push(format!("{url}: {e}"));
                    continue;
                }
            };
            let presented = shoal_tls::ca_hash(&pem).map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(
                presented == expected,
                "the server at {url} presents a CA with hash {presented}, not the join token's {expected}: refusing to join it"
            );
            // The checked certificate alone: anything else in the answer is not trusted.
            let pem = shoal_tls::only_certificate(&pem).map_err(|e| anyhow::anyhow!("{e}"))?;
            write_private(&file, pem.as_bytes())?;
            return Ok(pem);
        }
        let why = format!("cannot read the cluster CA from {}", unreachable.join("; "));
        if !patience.again(&why).await {
            return Err(crate::exit::fail(crate::exit::UNAVAILABLE, why));
        }
    }
}

/// How long a node that has not joined yet keeps trying to reach its control plane
/// (`--join-wait`), and how long it waits before the next try.
struct Patience {
    deadline: tokio::time::Instant,
    wait: std::time::Duration,
}

impl Patience {
    fn new(within: std::time::Duration) -> Self {
        Patience {
            deadline: tokio::time::Instant::now() + within,
            wait: std::time::Duration::from_millis(250),
        }
    }

    /// After a try that failed for `why`: waits before the next one and says yes, or says no
    /// once the time is up.
    async fn again(&mut self, why: &str) -> bool {
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let wait = self.wait.min(left);
        tracing::warn!(
            error = why,
            retry_in_ms = wait.as_millis() as u64,
            "the control plane does not answer yet; trying again"
        );
        tokio::time::sleep(wait).await;
        self.wait = (self.wait * 2).min(std::time::Duration::from_secs(5));
        true
    }
}

/// This node's credential: the one in its data dir if the control plane
/// still takes it, else a new one got with the join token.
async fn identity(
    args: &JoinArgs,
    http: &reqwest::Client,
    data: &Path,
    name: &str,
    patience: &mut Patience,
) -> Result<JoinResponse> {
    let file = identity_file(data);
    if let Ok(text) = std::fs::read_to_string(&file) {
        let kept: JoinResponse = serde_json::from_str(&text)
            .with_context(|| format!("unreadable node identity {}", file.display()))?;
        let owner = Credential::parse(&kept.credential)
            .with_context(|| format!("unreadable node credential in {}", file.display()))?
            .id;
        anyhow::ensure!(
            owner == name,
            "the data dir {} belongs to node {owner}: run it with --node-name {owner}, or give node {name} a data dir of its own",
            data.display()
        );
        let api =
            shoal_api::Client::with_http(http.clone(), args.servers.clone(), &kept.credential);
        // A node that has joined waits for its control plane, as a kubelet does for its API
        // server: one restarted during an outage comes back with it, no supervisor needed.
        let mut wait = std::time::Duration::from_secs(1);
        let probe = loop {
            let probe = api
                .answer_as(
                    api.request(
                        reqwest::Method::POST,
                        &format!("/v1/cluster/nodes/{}/heartbeat?probe=true", seg(name)),
                    ),
                    Resend::Idempotent,
                )
                .await;
            match probe {
                Ok(probe) => break probe,
                Err(e) => tracing::warn!(
                    error = %e,
                    retry_in_s = wait.as_secs(),
                    "cannot reach the control plane; node {name} starts when it answers"
                ),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(10));
        };
        if probe.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(kept);
        }
        if join_token(args).is_none() {
            anyhow::bail!(
                "the control plane at {} refused node {name}'s credential (was the node deleted?): join again with --token-file",
                api.base()
            );
        }
        tracing::warn!(
            node = name,
            "the control plane refused this node's credential; joining again"
        );
    }
    let token = join_token(args)
        .context("a node joins the first time with the cluster's join token: give --token-file or SHOAL_JOIN_TOKEN")?
        .read()
        .map_err(|e| anyhow::anyhow!(e))?;
    let joined = loop {
        match shoal_agent::join(http, &args.servers, &token, name).await {
            // No server took the request: trying again cannot join twice.
            Err(e) if e.unsent() && patience.again(&e.to_string()).await => {}
            joined => break joined,
        }
    };
    let identity = match joined {
        Ok(identity) => identity,
        Err(e) if e.status() == Some(reqwest::StatusCode::UNAUTHORIZED) => {
            return Err(crate::exit::fail(
                crate::exit::DENIED,
                format!(
                    "the control plane at {} refused the join token",
                    args.servers.current()
                ),
            ));
        }
        Err(e) => {
            let code = match e.status() {
                Some(status) => crate::exit::for_status(status.as_u16()),
                None => Some(crate::exit::UNAVAILABLE),
            };
            let message = format!("node {name} cannot join {}: {e}", args.servers);
            return Err(match code {
                Some(code) => crate::exit::fail(code, message),
                None => anyhow::anyhow!(message),
            });
        }
    };
    write_private(&file, &serde_json::to_vec(&identity)?)?;
    Ok(identity)
}

/// Where the join token comes from: `--token` or the environment, or `--token-file`.
fn join_token(args: &JoinArgs) -> Option<JoinToken> {
    match (&args.token, &args.token_file) {
        (Some(token), _) => Some(JoinToken::Value(token.clone())),
        (None, Some(file)) => Some(JoinToken::File(file.clone())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_arguments_set_with_a_value_and_remove_with_a_dash() {
        let args: Vec<String> = ["zone=b", "disk-", "note=a=b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let change = label_changes(&args, true).unwrap();
        assert_eq!(change.set["zone"], "b");
        assert_eq!(change.set["note"], "a=b");
        assert_eq!(change.remove, ["disk"]);
        assert!(change.overwrite);
        let e = label_changes(&["zone".to_string()], false).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
        // A key given twice is refused (exit 2), as kubectl refuses it, not the last one kept.
        for twice in [["zone=a", "zone=b"], ["disk-", "disk-"]] {
            let args: Vec<String> = twice.iter().map(|s| s.to_string()).collect();
            let e = label_changes(&args, false).unwrap_err();
            assert!(e.to_string().contains("\"zone\"") || e.to_string().contains("\"disk\""));
            let code = crate::exit::code(&Err(e), false);
            assert_eq!(
                format!("{code:?}"),
                format!("{:?}", std::process::ExitCode::from(2))
            );
        }
    }
}
