//! `shoal`: the one binary. `shoal up` runs a whole one-node cluster; every
//! other verb is a client of the `/v1` API.

mod client;
mod commands;
mod exit;
mod files;
mod output;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "An orchestrator for WebAssembly components"
)]
struct Cli {
    /// API server URL, or the URLs of several servers of one cluster, comma-separated: a
    /// request that cannot reach one goes to the next (default: from the CLI config written by
    /// `shoal up` and `shoal server`).
    #[arg(long, global = true, env = "SHOAL_SERVER", value_name = "URL[,URL…]")]
    server: Option<String>,
    /// API token (default: from the CLI config).
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CLI config file (default: ~/.config/shoal/config.toml).
    #[arg(long, global = true, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// The cluster CA to check the API's certificate against (default: from the CLI config).
    #[arg(long, global = true, env = "SHOAL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = output::OutputArg::Table)]
    output: output::OutputArg,
    /// Namespace of the apps to act on (default: `default`). Refused by commands on what
    /// belongs to no namespace (nodes, modules, tokens).
    #[arg(short, long, global = true, value_parser = commands::object_name)]
    namespace: Option<String>,
    /// A context of the CLI config to use for this command instead of its current one.
    #[arg(long, global = true, env = "SHOAL_CONTEXT")]
    context: Option<String>,
    /// How `up`, `server` and `node join` write their log to stderr.
    #[arg(long, global = true, value_enum, default_value_t = commands::up::LogFormat::Text)]
    log_format: commands::up::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a one-node cluster: control plane, node agent and gateway in one process.
    Up(Box<commands::up::UpArgs>),
    /// Run the control plane alone; worker nodes join it with `shoal node join`.
    Server(Box<commands::server::ServerArgs>),
    /// Join a worker node, or cordon, uncordon, drain or delete one.
    Node(commands::node::NodeCommand),
    /// Manage node pools: workers started and stopped as replicas need them (create, set,
    /// delete).
    Pool(commands::pool::PoolCommand),
    /// Manage API tokens (create, list, revoke) and rotate the join token.
    Token(commands::token::TokenCommand),
    /// Cap what a namespace's apps ask for together: apps, replicas, CPU and memory (set,
    /// get, delete).
    Quota(commands::quota::QuotaCommand),
    /// Manage config sets that apps share (create, set, unset, get, delete).
    Config(commands::config::ConfigCommand),
    /// Manage secrets apps read (create, set, unset, get, delete, rotate-key); values are
    /// never shown.
    Secret(commands::secret::SecretCommand),
    /// Read and write the namespace's key-value buckets (get, put, delete, list, buckets).
    Kv(commands::kv::KvCommand),
    /// Push a component to an OCI registry, for specs to name with `oci = "…"`.
    Push(commands::push::PushArgs),
    /// Write the cluster's state and modules, at one revision, to a file for `shoal server
    /// restore`.
    Backup(commands::backup::BackupArgs),
    /// Create or update apps from spec files, uploading their modules.
    Apply(commands::apply::ApplyArgs),
    /// What applying spec files would change; exits 1 if anything would.
    Diff(commands::apply::DiffArgs),
    /// List apps, jobs, replicas, modules, nodes, pools, services, secrets, volumes or events.
    Get(commands::get::GetArgs),
    /// What nodes or apps use and serve now: CPU, memory, replicas, requests, 5xx, p99.
    Top(commands::top::TopArgs),
    /// Show an app in detail: spec, revisions, replicas, recent events.
    Describe(commands::describe::DescribeArgs),
    /// Edit an app's spec in $VISUAL or $EDITOR and apply it on save.
    Edit(commands::edit::EditArgs),
    /// Delete an app (its replicas stop, its routes go away), an unused module or volume.
    Delete(commands::delete::DeleteArgs),
    /// Print what an app's replicas wrote to stdout and stderr.
    Logs(commands::logs::LogsArgs),
    /// Serve an app on a local port, through the API: for apps with no route (kubectl
    /// port-forward).
    PortForward(commands::port_forward::PortForwardArgs),
    /// What happened in the cluster, oldest first (--follow to keep watching).
    Events(commands::events::EventsArgs),
    /// An app's rollouts and revisions: status, pause, resume, promote, abort, history, undo, restart.
    Rollout(commands::rollout::RolloutCommand),
    /// Set how many replicas an app runs now (the next apply of its file sets it again).
    Scale(commands::scale::ScaleArgs),
    /// Start a run of a job now.
    Job(commands::job::JobCommand),
    /// Print the CLI's release and the server's.
    Version(commands::version::VersionArgs),
    /// Print a completion script for a shell: `source <(shoal completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = match &cli.command {
        Command::Up(_) | Command::Server(_) => true,
        Command::Node(node) => node.is_join(),
        _ => false,
    };
    if !daemon {
        quiet_on_closed_pipe();
    }
    let diff = match &cli.command {
        Command::Diff(_) => true,
        Command::Apply(args) => args.dry_run,
        _ => false,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cluster_wide = match &cli.command {
        Command::Up(_) => Some("up"),
        Command::Server(_) => Some("server"),
        Command::Node(_) => Some("node"),
        Command::Token(_) => Some("token"),
        Command::Pool(_) => Some("pool"),
        Command::Push(_) => Some("push"),
        Command::Backup(_) => Some("backup"),
        Command::Completion { .. } => Some("completion"),
        Command::Version(_) => Some("version"),
        _ => None,
    };
    if cli.output == output::OutputArg::Toml && !matches!(cli.command, Command::Get(_)) {
        eprintln!("error: -o toml writes an app's spec as a file: `shoal get app NAME -o toml`");
        return ExitCode::from(exit::USAGE);
    }
    if let (Some(command), Some(_)) = (cluster_wide, &cli.namespace) {
        eprintln!(
            "error: -n/--namespace means nothing to `shoal {command}`: what it acts on belongs to no namespace"
        );
        return ExitCode::from(exit::USAGE);
    }
    // Left out, -n is the context's namespace if it names one (as kubectl's), when the context
    // is the cluster in use (no --server of another).
    let namespace = cli.namespace.clone().or_else(|| {
        if cluster_wide.is_some() || cli.server.is_some() {
            return None;
        }
        let path = cli
            .config
            .clone()
            .unwrap_or_else(client::default_config_path);
        let config = client::CliConfig::load(&path).ok()?;
        config
            .context(cli.context.as_deref())
            .ok()?
            .namespace
            .clone()
    });
    let result = runtime.block_on(async {
        let ctx = commands::Context {
            server: cli.server,
            token: cli.token,
            config: cli.config,
            ca_file: cli.ca_file,
            output: match cli.output {
                output::OutputArg::Json => output::Format::Json,
                output::OutputArg::Table | output::OutputArg::Toml => output::Format::Table,
            },
            spec_toml: cli.output == output::OutputArg::Toml,
            namespace_given: cli.namespace.is_some(),
            namespace: namespace.unwrap_or_else(|| shoal_core::spec::DEFAULT_NAMESPACE.into()),
            log_format: cli.log_format,
            context: cli.context,
        };
        match cli.command {
            Command::Up(args) => commands::up::run(ctx, *args).await,
            Command::Server(args) => commands::server::run(ctx, *args).await,
            Command::Node(cmd) => commands::node::run(ctx, cmd).await,
            Command::Token(cmd) => commands::token::run(ctx, cmd).await,
            Command::Quota(cmd) => commands::quota::run(ctx, cmd).await,
            Command::Pool(cmd) => commands::pool::run(ctx, cmd).await,
            Command::Config(cmd) => commands::config::run(ctx, cmd).await,
            Command::Secret(cmd) => commands::secret::run(ctx, cmd).await,
            Command::Kv(cmd) => commands::kv::run(ctx, cmd).await,
            Command::Push(args) => commands::push::run(ctx, args).await,
            Command::Backup(args) => commands::backup::run(ctx, args).await,
            Command::Apply(args) => commands::apply::run(ctx, args).await,
            Command::Diff(args) => commands::apply::diff(ctx, args).await,
            Command::Get(args) => commands::get::run(ctx, args).await,
            Command::Top(args) => commands::top::run(ctx, args).await,
            Command::Describe(args) => commands::describe::run(ctx, args).await,
            Command::Edit(args) => commands::edit::run(ctx, args).await,
            Command::Delete(args) => commands::delete::run(ctx, args).await,
            Command::Logs(args) => commands::logs::run(ctx, args).await,
            Command::PortForward(args) => commands::port_forward::run(ctx, args).await,
            Command::Rollout(cmd) => commands::rollout::run(ctx, cmd).await,
            Command::Events(args) => commands::events::run(ctx, args).await,
            Command::Scale(args) => commands::scale::run(ctx, args).await,
            Command::Job(cmd) => commands::job::run(ctx, cmd).await,
            Command::Version(args) => commands::version::run(ctx, args).await,
            Command::Completion { shell } => {
                use clap::CommandFactory as _;
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut out);
                output::write_stdout(&out)
            }
        }
    });
    if let Err(e) = &result
        && e.downcast_ref::<exit::WouldChange>().is_none()
        && e.downcast_ref::<exit::Reported>().is_none()
    {
        eprintln!("error: {e:#}");
    }
    exit::code(&result, diff)
}

/// A command whose reader went away (`shoal events | head -3`) ends there, silently, as Unix
/// tools do. Not by SIGPIPE's default action: a socket written with `writev` (as the HTTP
/// client's are) raises SIGPIPE too when its server dies, and the CLI would then die silently
/// instead of trying its next server. So the handler ends the process by SIGPIPE only when
/// stdout is the broken pipe; otherwise the write fails with EPIPE, as with Rust's default.
/// The daemons keep Rust's default, so a closed log pipe is an error they can report.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut out = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: poll, signal and raise are async-signal-safe; `out` lives on this stack.
        unsafe {
            if libc::poll(&mut out, 1, 0) == 1 && out.revents & libc::POLLERR != 0 {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
    }
    #[cfg(unix)]
    // SAFETY: installing a handler that only calls async-signal-safe functions, before any
    // thread starts.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}
