//! `shoal push FILE REF`: a component into an OCI registry, in the layout the
//! control plane pulls (wkg's), so that a round trip needs no other tool. The CLI
//! talks to the registry itself; the cluster is not involved.

use super::Context;
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use shoal_core::oci::OciRef;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal push hello.wasm registry.example.com/team/hello:1.2.0
  shoal push hello.wasm 127.0.0.1:5000/hello:dev  loopback registries speak plain HTTP
  shoal push --insecure hello.wasm build-host:5000/hello:dev
  shoal push --username ci --password-stdin hello.wasm registry.example.com/team/hello:1.2.0 < pw.txt")]
pub struct PushArgs {
    /// The component (.wasm) to push.
    file: PathBuf,
    /// Where: registry/repository:tag.
    reference: String,
    /// Talk plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    insecure: bool,
    /// The registry user name; without it the push is anonymous.
    #[arg(long, value_name = "USER", requires = "password_stdin")]
    username: Option<String>,
    /// Read the registry password (or token) from standard input.
    #[arg(long, requires = "username")]
    password_stdin: bool,
}

#[derive(serde::Serialize)]
struct Pushed {
    reference: String,
    manifest: String,
    digest: String,
}

pub async fn run(ctx: Context, args: PushArgs) -> Result<()> {
    let reference = OciRef::parse(&args.reference).map_err(crate::exit::usage)?;
    let bytes = crate::files::read(&args.file, crate::files::MODULE_LIMIT)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let kind = shoal_core::wasm::validate(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if kind != shoal_core::wasm::WasmKind::Component {
        anyhow::bail!(
            "{} is a core WebAssembly module, not a component (build it with `cargo build --target wasm32-wasip2`)",
            args.file.display()
        );
    }
    let insecure = if args.insecure {
        vec![reference.registry.clone()]
    } else {
        Vec::new()
    };
    let credentials = match args.username {
        Some(username) => Some(shoal_oci::Credentials {
            username,
            password: super::secret::password_from_stdin()?,
        }),
        None => None,
    };
    let manifest = shoal_oci::Registry::new(&reference, &insecure, credentials)
        .push(&bytes)
        .await
        .map_err(|e| match e {
            shoal_oci::OciError::Registry {
                unreachable: true, ..
            } => crate::exit::fail(crate::exit::UNAVAILABLE, e.to_string()),
            e => e.into(),
        })?;
    let pushed = Pushed {
        reference: reference.to_string(),
        manifest,
        digest: shoal_oci::sha256(&bytes),
    };
    match ctx.output {
        Format::Json => output::json(&pushed),
        Format::Table => println!(
            "pushed {} ({} bytes): manifest {}, module {}",
            pushed.reference,
            bytes.len(),
            pushed.manifest,
            pushed.digest
        ),
    }
    Ok(())
}
