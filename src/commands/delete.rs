use super::Context;
use crate::output::{self, Format};
use anyhow::Result;

#[derive(clap::Args)]
pub struct DeleteArgs {
    #[arg(value_enum)]
    what: What,
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    App,
}

pub async fn run(ctx: Context, args: DeleteArgs) -> Result<()> {
    let What::App = args.what;
    let client = ctx.client()?;
    let path = format!("/v1/apps/{}?namespace={}", args.name, ctx.namespace);
    let resp: serde_json::Value = client
        .send(client.request(reqwest::Method::DELETE, &path))
        .await?;
    match ctx.output {
        Format::Json => output::json(&resp),
        Format::Table => println!("app {}/{} deleted", ctx.namespace, args.name),
    }
    Ok(())
}
