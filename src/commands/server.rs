use super::Context;
use super::up::{ControlArgs, apply_files, init_tracing, shutdown_signal, start_control};
use anyhow::Result;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal server --api 0.0.0.0:7700 --tls-san cp.example.com
  shoal node join https://cp.example.com:7700 --token-file join.token   on each worker")]
pub struct ServerArgs {
    #[command(flatten)]
    control: ControlArgs,
}

/// `shoal server`: the control plane alone; nodes join it.
pub async fn run(ctx: Context, args: ServerArgs) -> Result<()> {
    init_tracing(ctx.log_format);
    let c = start_control(&ctx, &args.control).await?;
    println!("Shoal control plane is up, data in {}", c.data.display());
    println!("  API:      {}", c.server);
    // The join token stays in its file: a terminal's scrollback or a log is no place for it.
    println!(
        "  join:     shoal node join {} --token-file {}",
        c.server,
        c.data.join("join-token").display()
    );
    apply_files(&c, &args.control.apply).await?;
    shutdown_signal().await;
    println!("Shoal is stopping");
    Ok(())
}
