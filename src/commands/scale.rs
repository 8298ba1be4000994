//! `shoal scale APP --replicas N`: set an app's replica count now, as
//! `kubectl scale` does. No new revision; the next `shoal apply` of the app's
//! file sets the count its `[scale]` says.

use super::Context;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::seg;
use shoal_core::App;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal scale hello --replicas 3                  now; the next apply of its file sets it again")]
pub struct ScaleArgs {
    /// The app to scale.
    #[arg(value_parser = crate::commands::object_name)]
    name: String,
    /// How many replicas it should run (0 stops them all).
    #[arg(long)]
    replicas: u32,
}

pub async fn run(ctx: Context, args: ScaleArgs) -> Result<()> {
    let client = ctx.client()?;
    let path = format!(
        "/v1/apps/{}/scale?namespace={}&replicas={}",
        seg(&args.name),
        seg(&ctx.namespace),
        args.replicas
    );
    let app: App = client
        .send(client.request(reqwest::Method::POST, &path))
        .await?;
    match ctx.output {
        Format::Json => output::json(&app),
        Format::Table => println!(
            "app {}/{} scaled to {}",
            ctx.namespace,
            args.name,
            output::count(app.spec.replicas as usize, "replica")
        ),
    }
    Ok(())
}
