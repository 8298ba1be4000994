use super::Context;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::seg;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal delete app hello                          its replicas stop, its routes go away
  shoal delete volume data                        refused while an app mounts it
  shoal delete module sha256:…                    refused while a revision uses it")]
pub struct DeleteArgs {
    #[arg(value_enum)]
    what: What,
    /// The app's or volume's name, or the module's digest (`sha256:…`, as `shoal get modules`
    /// shows it).
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    App,
    /// An uploaded module no revision uses (revision history included).
    Module,
    /// A volume no app mounts: its node removes its data.
    Volume,
}

pub async fn run(ctx: Context, args: DeleteArgs) -> Result<()> {
    // What the API would take, checked first: a name goes into the request's path.
    let checked = match args.what {
        // As `shoal get modules` shows it (`sha256:` and 12 hex digits) will do.
        What::Module => shoal_core::spec::validate_digest(&args.name).or_else(|e| {
            let hex = args.name.strip_prefix("sha256:").unwrap_or("");
            let short = hex.len() >= 8
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if short { Ok(()) } else { Err(e) }
        }),
        What::App | What::Volume => super::object_name(&args.name).map(drop),
    };
    checked.map_err(crate::exit::usage)?;
    let client = ctx.client()?;
    match args.what {
        What::App => {
            let path = format!(
                "/v1/apps/{}?namespace={}",
                seg(&args.name),
                seg(&ctx.namespace)
            );
            let resp: serde_json::Value = client
                .send(client.request(reqwest::Method::DELETE, &path))
                .await?;
            match ctx.output {
                Format::Json => output::json(&resp),
                Format::Table => println!("app {}/{} deleted", ctx.namespace, args.name),
            }
        }
        What::Volume => {
            let path = format!(
                "/v1/volumes/{}?namespace={}",
                seg(&args.name),
                seg(&ctx.namespace)
            );
            client
                .checked(client.request(reqwest::Method::DELETE, &path))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "deleted": args.name })),
                Format::Table => println!("volume {}/{} deleted", ctx.namespace, args.name),
            }
        }
        What::Module => {
            ctx.no_namespace("modules")?;
            let digest = full_digest(&client, &args.name).await?;
            let path = format!("/v1/modules/{}", seg(&digest));
            client
                .checked(client.request(reqwest::Method::DELETE, &path))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "deleted": digest })),
                Format::Table => println!("module {digest} deleted"),
            }
        }
    }
    Ok(())
}

/// The module digest `given` means: itself if whole, else the one uploaded module it starts.
async fn full_digest(client: &crate::client::Client, given: &str) -> Result<String> {
    if shoal_core::spec::validate_digest(given).is_ok() {
        return Ok(given.to_string());
    }
    let modules: Vec<shoal_core::Module> = client.get("/v1/modules").await?;
    let mut matching = modules.into_iter().filter(|m| m.digest.starts_with(given));
    match (matching.next(), matching.next()) {
        (Some(m), None) => Ok(m.digest),
        (None, _) => Err(crate::exit::fail(
            crate::exit::NOT_FOUND,
            format!("no uploaded module's digest starts with {given}"),
        )),
        (Some(_), Some(_)) => Err(crate::exit::usage(format!(
            "{given} starts the digests of several modules: give more of it"
        ))),
    }
}
