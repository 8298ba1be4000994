use super::Context;
use super::up::{
    ControlArgs, SharedStore, apply_specs, init_tracing, read_apply, shutdown_signal, start_control,
};
use crate::exit;
use anyhow::{Context as _, Result};
use shoal_control::{BackupError, MigrateError};
use shoal_core::quantity::format_memory;
use shoal_etcd::{EtcdConfig, EtcdStore, EtcdTls, LEADER_KEY};
use shoal_store::{BlobStore, KvStore, Op, ReadOnlyStore, StoreError, Txn};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  shoal server --api 0.0.0.0:7700 --tls-san cp.example.com
  shoal node join https://cp.example.com:7700 --token-file join.token   on each worker
  shoal server --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379
  shoal server --store etcd://10.0.0.1:2379 --token-file token   another server of that cluster
  shoal server --store etcd://etcd.example.com:2379 --etcd-ca etcd-ca.pem \\
      --etcd-cert client.pem --etcd-key client-key.pem
  shoal server migrate --from /var/lib/shoal --to etcd://10.0.0.1:2379   redb state into etcd
  shoal server restore shoal.tar --data-dir /var/lib/shoal   a `shoal backup`, server stopped"
)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    #[command(flatten)]
    control: ControlArgs,
    /// Keep the cluster state in an etcd cluster, etcd://HOST:PORT[,HOST:PORT…], instead of
    /// state.redb in the data dir; module bytes are kept there too, so servers sharing it
    /// serve the same cluster.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The CA etcd's certificates chain to: talk to etcd over TLS.
    #[arg(long, value_name = "FILE", requires = "store")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM), with --etcd-key, for members that require one.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The admin token of the cluster already in --store (the `token` file of one of its
    /// servers): with an empty data dir, this server takes the cluster's CA and secret key
    /// from the store, sealed there under that token.
    #[arg(long, value_name = "FILE", requires = "store")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum ServerCommand {
    /// Copy a stopped server's state (redb) and modules into an empty etcd cluster, for
    /// `shoal server --store etcd://…` to serve the same cluster.
    Migrate(MigrateArgs),
    /// Restore a backup (`shoal backup`) into the data dir of a stopped server, which must
    /// hold no state: its state and modules, as of the backup's revision.
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal backup shoal.tar                          on the running cluster, now and then
  shoal server restore shoal.tar --data-dir /var/lib/shoal-new
  cp /var/lib/shoal/{token,join-token,ca.pem,ca-key.pem,secret.key} /var/lib/shoal-new/
  shoal server --data-dir /var/lib/shoal-new")]
pub struct RestoreArgs {
    /// The backup; `-`: standard input.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The data dir to restore into (as `shoal server`'s and `shoal up`'s --data-dir). It must
    /// hold no state.redb: a new one, or the old one with its state moved away.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// What a data dir keeps beside its state, which a backup leaves out: without them the
/// restored server makes new ones, and then nodes must join again and secrets stay sealed.
const KEPT_APART: [&str; 5] = ["token", "join-token", "ca.pem", "ca-key.pem", "secret.key"];

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal server migrate --from /var/lib/shoal --to etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379
  shoal server migrate --from ~/.local/share/shoal/state.redb --to etcd://etcd.example.com:2379 \\
      --etcd-ca etcd-ca.pem --etcd-cert client.pem --etcd-key client-key.pem
  cp /var/lib/shoal/{token,join-token,ca.pem,ca-key.pem,secret.key} /var/lib/shoal-etcd/
  shoal server --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379 --data-dir /var/lib/shoal-etcd")]
pub struct MigrateArgs {
    /// The data dir of the server to copy (`shoal up`'s and `shoal server`'s --data-dir), or
    /// the state.redb in it; its modules are read from modules/ beside it. Stop that server
    /// first: a state in use is refused, and nothing in it is changed.
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// The etcd cluster to copy into, etcd://HOST:PORT[,HOST:PORT…]; it must hold no keys.
    #[arg(long, value_name = "URL")]
    to: String,
    /// The CA etcd's certificates chain to: talk to etcd over TLS.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM), with --etcd-key, for members that require one.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Delete every key the etcd cluster holds before copying: to copy again after a copy that
    /// failed part way. Refused while a server runs on it.
    #[arg(long)]
    force: bool,
}

/// The etcd cluster at `url` with the TLS files, as `--store` and `--to` name it.
fn etcd_config(
    url: &str,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<EtcdConfig> {
    let mut config = EtcdConfig::parse(url)?;
    config.tls = ca.map(|ca| EtcdTls {
        ca,
        identity: cert.zip(key),
    });
    Ok(config)
}

impl ServerArgs {
    /// The etcd cluster `--store` names, with the TLS files and the cluster's admin token.
    fn etcd(&self) -> Result<Option<SharedStore>> {
        let Some(url) = &self.store else {
            return Ok(None);
        };
        let etcd = etcd_config(
            url,
            self.etcd_ca.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
        )
        .context("--store")?;
        Ok(Some(SharedStore {
            etcd,
            token_file: self.token_file.clone(),
        }))
    }
}

/// `shoal server`: the control plane alone; nodes join it.
pub async fn run(ctx: Context, args: ServerArgs) -> Result<()> {
    match args.command {
        Some(ServerCommand::Migrate(args)) => {
            return tokio::task::spawn_blocking(move || migrate(args)).await?;
        }
        Some(ServerCommand::Restore(args)) => {
            return tokio::task::spawn_blocking(move || restore(args)).await?;
        }
        None => {}
    }
    let specs = read_apply(&args.control.apply)?;
    init_tracing(ctx.log_format);
    #[cfg(unix)]
    super::up::raise_open_files_limit();
    let c = start_control(&ctx, &args.control, args.etcd()?).await?;
    println!("Shoal control plane is up, data in {}", c.data.display());
    println!("  API:      {}", c.server);
    // The join token stays in its file: a terminal's scrollback or a log is no place for it.
    println!(
        "  join:     shoal node join {} --token-file {}",
        c.servers,
        c.data.join("join-token").display()
    );
    apply_specs(&c, specs).await?;
    shutdown_signal().await;
    println!("Shoal is stopping");
    c.stop().await;
    Ok(())
}

/// `shoal server restore`: a backup into a data dir without a state. Blocking: it reads and
/// writes files.
fn restore(args: RestoreArgs) -> Result<()> {
    let data = args.data_dir.unwrap_or_else(super::up::default_data_dir);
    crate::client::private_dir(&data)?;
    let input: Box<dyn std::io::Read> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.file).map_err(|e| {
            exit::fail(
                exit::NOT_FOUND,
                format!("cannot read {}: {e}", args.file.display()),
            )
        })?;
        Box::new(std::io::BufReader::new(file))
    };
    let restored = shoal_control::restore_backup(input, &data).map_err(|e| match e {
        BackupError::Occupied(_) => exit::fail(exit::CONFLICT, e.to_string()),
        other => anyhow::anyhow!("restoring {}: {other}", args.file.display()),
    })?;
    let m = &restored.manifest;
    println!(
        "Restored revision {} (taken by Shoal {}) into {}",
        m.revision,
        m.version,
        data.display()
    );
    println!("  keys:     {}", m.keys);
    println!(
        "  modules:  {} ({}), {} of them new here",
        m.modules,
        format_memory(m.module_bytes),
        restored.modules_written
    );
    let missing: Vec<&str> = KEPT_APART
        .into_iter()
        .filter(|f| !data.join(f).exists())
        .collect();
    if missing.is_empty() {
        println!("Next: shoal server --data-dir {}", data.display());
    } else {
        println!(
            "Next: copy {} from the old server's data dir into {} (a backup leaves them out: \
             without them new ones are made, nodes must join again and secrets cannot be \
             opened), then shoal server --data-dir {}",
            missing.join(", "),
            data.display(),
            data.display()
        );
    }
    Ok(())
}

/// `shoal server migrate`: the redb state and modules of a stopped server into an empty etcd
/// cluster. Blocking: the store calls wait on disk and on etcd.
fn migrate(args: MigrateArgs) -> Result<()> {
    let dir = if args.from.is_dir() {
        args.from.clone()
    } else {
        args.from.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let state = if args.from.is_dir() {
        dir.join("state.redb")
    } else {
        args.from.clone()
    };
    if !state.is_file() {
        return Err(exit::fail(
            exit::NOT_FOUND,
            format!("no Shoal state at {}", state.display()),
        ));
    }
    let config =
        etcd_config(&args.to, args.etcd_ca, args.etcd_cert, args.etcd_key).context("--to")?;
    let source = ReadOnlyStore::open(&state).map_err(|e| match e {
        StoreError::InUse => exit::fail(
            exit::CONFLICT,
            format!(
                "{} is in use: a `shoal server` or `shoal up` is running on it; stop it, so \
                 that what is copied is the state it left",
                state.display()
            ),
        ),
        other => anyhow::anyhow!("cannot read {}: {other}", state.display()),
    })?;
    let target = EtcdStore::connect(&config).map_err(|e| {
        exit::fail(
            exit::UNAVAILABLE,
            format!("cannot reach the etcd cluster at {}: {e}", args.to),
        )
    })?;
    let (held, first) = target.keys_held()?;
    if held > 0 {
        let first = first.unwrap_or_default();
        if !args.force {
            return Err(exit::fail(
                exit::CONFLICT,
                format!(
                    "the etcd cluster at {} already holds {held} keys ({first:?} first): the \
                     cluster must be Shoal's alone and empty; nothing was written (--force \
                     deletes every key in it first)",
                    args.to
                ),
            ));
        }
        if target.get(LEADER_KEY)?.is_some() {
            return Err(exit::fail(
                exit::CONFLICT,
                format!(
                    "a `shoal server` is running on the etcd cluster at {}; stop every server \
                     on it first: nothing was written",
                    args.to
                ),
            ));
        }
        target.txn(Txn::new().then(Op::delete_prefix("")))?;
        println!("Deleted the {held} keys the etcd cluster held");
    }
    let copied = shoal_control::copy_state(&source, &BlobStore::at(&dir.join("modules")), &target)
        .map_err(|e| match e {
            MigrateError::Exists(_) => exit::fail(
                exit::CONFLICT,
                format!("{e}; what was copied before it stays (--force deletes it)"),
            ),
            MigrateError::Interrupted { .. } => anyhow::anyhow!(
                "copying {}: {e}; run it again with --force to start over",
                state.display()
            ),
            other => anyhow::anyhow!("copying {}: {other}", state.display()),
        })?;
    println!(
        "Copied {} (revision {}) into {}",
        state.display(),
        copied.revision,
        args.to
    );
    println!(
        "  keys:     {} ({} of keys and values)",
        copied.keys,
        format_memory(copied.key_bytes)
    );
    println!(
        "  modules:  {} ({})",
        copied.modules,
        format_memory(copied.module_bytes)
    );
    println!("  etcd:     {} transactions", copied.txns);
    for (key, bytes) in &copied.too_big_to_apply {
        eprintln!(
            "Warning: {key} holds {}: an apply writes it twice in one request (the app and its new revision), more than etcd takes by default (--max-request-bytes, 1.5 MiB); it runs and scales, and a change needs its [config] smaller or a higher limit",
            format_memory(*bytes as u64)
        );
    }
    println!(
        "Next: copy token, join-token, ca.pem, ca-key.pem and secret.key from {} into the data \
         dir of each `shoal server --store {}` (secrets open with that secret.key only)",
        dir.display(),
        args.to
    );
    Ok(())
}
