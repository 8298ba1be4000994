use super::Context;
use super::up::{ControlArgs, apply_files, init_tracing, shutdown_signal, start_control};
use anyhow::{Context as _, Result};
use shoal_etcd::{EtcdConfig, EtcdTls};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal server --api 0.0.0.0:7700 --tls-san cp.example.com
  shoal node join https://cp.example.com:7700 --token-file join.token   on each worker
  shoal server --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379
  shoal server --store etcd://etcd.example.com:2379 --etcd-ca etcd-ca.pem \\
      --etcd-cert client.pem --etcd-key client-key.pem")]
pub struct ServerArgs {
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
}

impl ServerArgs {
    /// The etcd cluster `--store` names, with the TLS files.
    fn etcd(&self) -> Result<Option<EtcdConfig>> {
        let Some(url) = &self.store else {
            return Ok(None);
        };
        let mut config = EtcdConfig::parse(url).context("--store")?;
        config.tls = self.etcd_ca.clone().map(|ca| EtcdTls {
            ca,
            identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
        });
        Ok(Some(config))
    }
}

/// `shoal server`: the control plane alone; nodes join it.
pub async fn run(ctx: Context, args: ServerArgs) -> Result<()> {
    init_tracing(ctx.log_format);
    let c = start_control(&ctx, &args.control, args.etcd()?).await?;
    println!("Shoal control plane is up, data in {}", c.data.display());
    println!("  API:      {}", c.server);
    // The join token stays in its file: a terminal's scrollback or a log is no place for it.
    println!(
        "  join:     shoal node join {} --token-file {}",
        c.servers,
        c.data.join("join-token").display()
    );
    apply_files(&c, &args.control.apply).await?;
    shutdown_signal().await;
    println!("Shoal is stopping");
    Ok(())
}
