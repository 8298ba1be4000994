use super::Context;
use crate::client::Client;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::seg;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal delete app hello                          its replicas stop, its routes go away
  shoal delete app hello world                    several at once
  shoal delete -f apps/ -R                        the apps the spec files name
  shoal delete app hello --ignore-not-found       exit 0 if there is no app hello
  shoal delete volume data                        refused while an app mounts it
  shoal delete module sha256:…                    refused while a revision uses it")]
pub struct DeleteArgs {
    #[arg(
        value_enum,
        required_unless_present = "files",
        conflicts_with = "files"
    )]
    what: Option<What>,
    /// The apps' or volumes' names, or the modules' digests (`sha256:…`, as `shoal get
    /// modules` shows them).
    #[arg(required_unless_present = "files", conflicts_with = "files")]
    names: Vec<String>,
    /// Delete the apps these spec files name (read as `shoal apply -f` reads them: a
    /// directory's .toml files, `-` for standard input), each in its file's namespace.
    #[arg(short = 'f', long = "file")]
    files: Vec<PathBuf>,
    /// With a directory: its subdirectories' specs too (not through links).
    #[arg(short = 'R', long, requires = "files")]
    recursive: bool,
    /// What does not exist is no error: skipped, exit 0 (as kubectl's flag).
    #[arg(long)]
    ignore_not_found: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    App,
    /// An uploaded module no revision uses (revision history included).
    Module,
    /// A volume no app mounts: its node removes its data.
    Volume,
}

/// One thing to delete.
struct Target {
    what: What,
    namespace: String,
    name: String,
}

/// Deletes every target in turn. One that fails does not stop the rest (as `kubectl delete`):
/// its error is written as it happens, and the command exits with the first one's code.
pub async fn run(ctx: Context, args: DeleteArgs) -> Result<()> {
    let several = !args.files.is_empty() || args.names.len() > 1;
    let targets = match args.what {
        Some(what) => {
            if matches!(what, What::Module) {
                ctx.no_namespace("modules")?;
            }
            let targets: Vec<Target> = args
                .names
                .into_iter()
                .map(|name| Target {
                    what,
                    namespace: ctx.namespace.clone(),
                    name,
                })
                .collect();
            // What the API would take, checked first: a name goes into the request's path.
            for target in &targets {
                check(target).map_err(crate::exit::usage)?;
            }
            targets
        }
        None => super::apply::read_specs(&args.files, args.recursive, ctx.spec_namespace())?
            .iter()
            .map(|spec| {
                let key = spec.key();
                Target {
                    what: What::App,
                    namespace: key.namespace,
                    name: key.name,
                }
            })
            .collect(),
    };
    let client = ctx.client()?;
    let mut deleted = Vec::new();
    let mut first_error = None;
    for target in &targets {
        match delete(&client, target).await {
            Ok(answer) => {
                if ctx.output == Format::Table {
                    println!("{}", said(target, &answer));
                }
                deleted.push(answer);
            }
            Err(e) if args.ignore_not_found && crate::exit::is_not_found(&e) => {}
            Err(e) if several => {
                eprintln!("error: {e:#}");
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if ctx.output == Format::Json {
        if several {
            output::json(&deleted);
        } else if let Some(answer) = deleted.first() {
            output::json(answer);
        }
    }
    match first_error {
        // Already written: the exit code is all that is left to say.
        Some(e) => Err(crate::exit::Reported(e).into()),
        None => Ok(()),
    }
}

/// Whether the API would take `target`'s name (a module as `shoal get modules` shows it,
/// `sha256:` and a few hex digits, will do).
fn check(target: &Target) -> std::result::Result<(), String> {
    match target.what {
        What::Module => {
            let hex = target.name.strip_prefix("sha256:").unwrap_or("");
            let digits = (8..=64).contains(&hex.len())
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            digits.then_some(()).ok_or_else(|| {
                format!(
                    "{:?} is not a module digest: expected \"sha256:\" followed by 8 to 64 of its lowercase hex digits, as `shoal get modules` shows them",
                    target.name
                )
            })
        }
        What::App | What::Volume => super::object_name(&target.name).map(drop),
    }
}

/// Deletes `target`; the answer is what `-o json` prints for it.
async fn delete(client: &Client, target: &Target) -> Result<serde_json::Value> {
    let (namespace, name) = (seg(&target.namespace), seg(&target.name));
    match target.what {
        What::App => {
            let path = format!("/v1/apps/{name}?namespace={namespace}");
            client
                .send(client.request(reqwest::Method::DELETE, &path))
                .await
        }
        What::Volume => {
            let path = format!("/v1/volumes/{name}?namespace={namespace}");
            client
                .checked(client.request(reqwest::Method::DELETE, &path))
                .await?;
            Ok(serde_json::json!({ "deleted": target.name }))
        }
        What::Module => {
            let digest = full_digest(client, &target.name).await?;
            let path = format!("/v1/modules/{}", seg(&digest));
            client
                .checked(client.request(reqwest::Method::DELETE, &path))
                .await?;
            Ok(serde_json::json!({ "deleted": digest }))
        }
    }
}

/// The line the table output prints for a deleted `target`.
fn said(target: &Target, answer: &serde_json::Value) -> String {
    let (namespace, name) = (&target.namespace, &target.name);
    match target.what {
        What::App => format!("app {namespace}/{name} deleted"),
        What::Volume => format!("volume {namespace}/{name} deleted"),
        What::Module => format!(
            "module {} deleted",
            answer["deleted"].as_str().unwrap_or(name)
        ),
    }
}

/// The module digest `given` means: itself if whole, else the one uploaded module it starts.
async fn full_digest(client: &Client, given: &str) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A module is named by its digest or, as `shoal get modules` shows it, its first hex
    /// digits; anything else is refused saying so.
    #[test]
    fn a_module_is_named_by_its_digest_or_a_prefix_of_it() {
        let module = |name: &str| Target {
            what: What::Module,
            namespace: "default".into(),
            name: name.into(),
        };
        let full = format!("sha256:{}", "ab".repeat(32));
        for ok in [full.as_str(), "sha256:0123abcd", "sha256:0123456789abcdef"] {
            assert_eq!(check(&module(ok)), Ok(()), "{ok}");
        }
        let long = format!("{full}0");
        for bad in ["sha256:0123abc", "0123abcd", "sha256:0123ABCD", &long] {
            let e = check(&module(bad)).unwrap_err();
            assert!(e.contains("8 to 64"), "{e}");
        }
    }
}
