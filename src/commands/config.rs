//! `shoal config`: named config sets that the apps of a namespace share (`config_sets` in a
//! spec). Changing one rolls the apps that name it.

use super::Context;
use crate::client::{CliConfig, default_config_path};
use crate::output::{self, Format, age, table};
use anyhow::{Context as _, Result, bail};
use shoal_api::{ConfigSetRequest, ConfigSetView, ConfigSetWritten, seg};
use shoal_core::ConfigSet;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal config create shared --from-literal color=blue --from-file motd=motd.txt
  shoal config set shared color=green             the apps that use it roll to the new value
  shoal config get shared                         its keys and values
  shoal config get-contexts                       the clusters this CLI knows; use-context NAME
  shoal config set-context team-a --server https://cp:7700 --ca-file ca.pem --token-file ci.token -n team-a")]
pub struct ConfigCommand {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(clap::Subcommand)]
enum ConfigAction {
    #[command(flatten)]
    Set(SetAction),
    #[command(flatten)]
    Context(ContextAction),
}

/// The clusters this CLI can talk to, as kubectl's contexts.
#[derive(clap::Subcommand)]
enum ContextAction {
    /// Make a context of the CLI config the one commands use (`shoal up` and `shoal server`
    /// add theirs and make it current).
    UseContext {
        /// The context, as `get-contexts` lists it.
        name: String,
    },
    /// Add a context, or change one: where a cluster's API is (--server, --ca-file), the
    /// token to use (read from a file an admin gave, `shoal token create --write`) and the
    /// namespace commands act in when -n is left out (-n). A new context needs --server and
    /// --token-file; a change sets what it is given and keeps the rest.
    SetContext {
        /// The context's name.
        name: String,
        /// A file holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// List the CLI config's contexts: the clusters this CLI can talk to.
    GetContexts,
    /// Print the context commands use.
    CurrentContext,
}

/// Config sets.
#[derive(clap::Subcommand)]
enum SetAction {
    /// Make a config set in the namespace (`-n`); apps name it in `config_sets`.
    Create {
        /// The set's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// A value, KEY=VALUE (repeatable).
        #[arg(long = "from-literal", value_name = "KEY=VALUE")]
        literals: Vec<String>,
        /// A value read from a file, KEY=PATH (repeatable).
        #[arg(long = "from-file", value_name = "KEY=PATH")]
        files: Vec<String>,
    },
    /// Set values of a config set (KEY=VALUE…), keeping the others; the apps that name it
    /// roll to the new values.
    Set {
        /// The set's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// The values, KEY=VALUE.
        #[arg(required_unless_present = "files", value_name = "KEY=VALUE")]
        values: Vec<String>,
        /// A value read from a file, KEY=PATH (repeatable): one too long or too many lines
        /// for the command line (a certificate, a JSON document).
        #[arg(long = "from-file", value_name = "KEY=PATH")]
        files: Vec<String>,
    },
    /// Take keys out of a config set; the apps that name it roll without them.
    Unset {
        /// The set's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// The keys.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List the namespace's config sets (keys and the apps using each), or show one's values.
    Get {
        /// A set to show; none: list them all.
        #[arg(value_parser = crate::commands::object_name)]
        name: Option<String>,
    },
    /// Delete a config set no app names.
    Delete {
        /// The set's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
}

/// Splits `KEY=VALUE`.
fn pair(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(crate::exit::usage(format!("{text:?} is not KEY=VALUE"))),
    }
}

/// Adds the values of `--from-file KEY=PATH` arguments to `data`, each key once.
fn read_files(data: &mut BTreeMap<String, String>, files: &[String]) -> Result<()> {
    for text in files {
        let (k, file) = pair(text)?;
        let v = crate::files::read_text(&PathBuf::from(&file), crate::files::VALUE_LIMIT)
            .with_context(|| format!("--from-file {k}: cannot read {file}"))?;
        super::insert_once(data, k, v)?;
    }
    Ok(())
}

pub async fn run(ctx: Context, cmd: ConfigCommand) -> Result<()> {
    match cmd.action {
        ConfigAction::Context(action) => contexts(&ctx, action),
        ConfigAction::Set(action) => sets(ctx, action).await,
    }
}

/// `use-context`, `get-contexts`, `current-context`: the CLI config alone, no server.
fn contexts(ctx: &Context, action: ContextAction) -> Result<()> {
    let path = ctx.config.clone().unwrap_or_else(default_config_path);
    match action {
        ContextAction::UseContext { name } => {
            let mut config = CliConfig::load(&path)?;
            config.context(Some(&name))?;
            config.current = Some(name.clone());
            config.save(&path)?;
            println!("now using context {name}");
        }
        ContextAction::SetContext { name, token_file } => {
            let mut config = CliConfig::load_or_new(&path)?;
            let token = match &token_file {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read the token from {}", file.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            if token.as_deref() == Some("") {
                return Err(crate::exit::usage("the token file is empty".into()));
            }
            let ca = match &ctx.ca_file {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read the CA from {}", file.display()))?,
                ),
                None => None,
            };
            if let Some(server) = &ctx.server {
                shoal_api::Servers::parse(server)
                    .map_err(|e| crate::exit::usage(format!("--server: {e}")))?;
            }
            let namespace = ctx.namespace_given.then(|| ctx.namespace.clone());
            let entry = match config.contexts.remove(&name) {
                Some(mut entry) => {
                    entry.server = ctx.server.clone().unwrap_or(entry.server);
                    entry.token = token.unwrap_or(entry.token);
                    entry.ca = ca.or(entry.ca);
                    entry.namespace = namespace.or(entry.namespace);
                    entry
                }
                None => {
                    let (Some(server), Some(token)) = (ctx.server.clone(), token) else {
                        return Err(crate::exit::usage(format!(
                            "context {name} is new: it needs --server and --token-file"
                        )));
                    };
                    crate::client::ContextEntry {
                        server,
                        token,
                        ca,
                        namespace,
                    }
                }
            };
            config.contexts.insert(name.clone(), entry);
            config.save(&path)?;
            println!("context {name} set");
        }
        ContextAction::GetContexts => {
            let config = CliConfig::load(&path)?;
            if ctx.output == Format::Json {
                let list: Vec<_> = config
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        serde_json::json!({
                            "name": name,
                            "server": c.server,
                            "namespace": c.namespace,
                            "current": config.current.as_deref() == Some(name),
                        })
                    })
                    .collect();
                output::json(&list);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = config
                .contexts
                .iter()
                .map(|(name, c)| {
                    let current = config.current.as_deref() == Some(name);
                    vec![
                        if current { "*" } else { "" }.to_string(),
                        name.clone(),
                        c.server.clone(),
                        c.namespace.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(&["CURRENT", "NAME", "SERVER", "NAMESPACE"], &rows);
        }
        ContextAction::CurrentContext => {
            let config = CliConfig::load(&path)?;
            match &config.current {
                Some(name) if ctx.output == Format::Json => output::json(name),
                Some(name) => println!("{name}"),
                None => bail!("the CLI config names no current context"),
            }
        }
    }
    Ok(())
}

async fn sets(ctx: Context, action: SetAction) -> Result<()> {
    let client = ctx.client()?;
    let ns = ctx.namespace.clone();
    let path = |name: &str| format!("/v1/configs/{}?namespace={}", seg(name), seg(&ns));
    // A change is merged by the server into what the set has then: read here and written
    // whole, one of two changes at once was lost.
    let put = |name: &str, data: BTreeMap<String, String>, create: bool, unset: Vec<String>| {
        let req = client
            .request(reqwest::Method::PUT, &path(name))
            .json(&ConfigSetRequest {
                data,
                create,
                merge: !create,
                unset,
            });
        client.send::<ConfigSetWritten>(req)
    };
    match action {
        SetAction::Create {
            name,
            literals,
            files,
        } => {
            let mut data = BTreeMap::new();
            for text in &literals {
                let (k, v) = pair(text)?;
                super::insert_once(&mut data, k, v)?;
            }
            read_files(&mut data, &files)?;
            let written = put(&name, data, true, Vec::new()).await?;
            report(&ctx, &written, "created");
        }
        SetAction::Set {
            name,
            values,
            files,
        } => {
            let mut data = BTreeMap::new();
            for text in &values {
                let (k, v) = pair(text)?;
                super::insert_once(&mut data, k, v)?;
            }
            read_files(&mut data, &files)?;
            let written = put(&name, data, false, Vec::new()).await?;
            report(&ctx, &written, "changed");
        }
        SetAction::Unset { name, keys } => {
            let written = put(&name, BTreeMap::new(), false, keys).await?;
            report(&ctx, &written, "changed");
        }
        SetAction::Get { name: Some(name) } => {
            let set: ConfigSet = client.get(&path(&name)).await?;
            match ctx.output {
                Format::Json => output::json(&set),
                Format::Table => {
                    for (k, v) in &set.data {
                        println!("{k}={v}");
                    }
                }
            }
        }
        SetAction::Get { name: None } => {
            let sets: Vec<ConfigSetView> = client
                .get(&format!("/v1/configs?namespace={}", seg(&ns)))
                .await?;
            if ctx.output == Format::Json {
                output::json(&sets);
                return Ok(());
            }
            table(CONFIG_COLUMNS, &config_rows(&sets));
        }
        SetAction::Delete { name } => {
            client
                .checked(client.request(reqwest::Method::DELETE, &path(&name)))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "deleted": name })),
                Format::Table => println!("config set {name} deleted"),
            }
        }
    }
    Ok(())
}

/// What `config get` and `get configs` show of each set.
pub const CONFIG_COLUMNS: &[&str] = &["NAME", "KEYS", "USED BY", "UPDATED"];

/// One row per config set, as [`CONFIG_COLUMNS`].
pub fn config_rows(sets: &[ConfigSetView]) -> Vec<Vec<String>> {
    sets.iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.keys.join(","),
                s.used_by.join(","),
                age(s.updated_at),
            ]
        })
        .collect()
}

fn report(ctx: &Context, written: &ConfigSetWritten, verb: &str) {
    match ctx.output {
        Format::Json => output::json(written),
        Format::Table => {
            let verb = if written.unchanged { "unchanged" } else { verb };
            println!(
                "config set {} {verb} ({})",
                written.set.name,
                output::count(written.set.data.len(), "key")
            );
            for app in &written.rolled {
                println!("  app {app} applied again");
            }
        }
    }
}
