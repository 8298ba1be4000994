use super::Context;
use super::up::{ControlArgs, apply_files, init_tracing, shutdown_signal, start_control};
use anyhow::Result;

#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    control: ControlArgs,
}

/// `shoal server`: the control plane alone; nodes join it.
pub async fn run(ctx: Context, args: ServerArgs) -> Result<()> {
    init_tracing();
    let c = start_control(&ctx, &args.control).await?;
    println!("Shoal control plane is up, data in {}", c.data.display());
    println!("  API:      {}", c.server);
    println!(
        "  join:     shoal node join {} --token {}",
        c.server, c.join_token
    );
    apply_files(&c.server, &c.token, &args.control.apply).await?;
    shutdown_signal().await;
    println!("Shoal is stopping");
    Ok(())
}
