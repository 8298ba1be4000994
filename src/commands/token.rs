use super::Context;
use crate::client::{check_writable, write_private};
use crate::output::{self, Format, age, table};
use anyhow::Result;
use shoal_api::{CreatedToken, RotatedJoinToken, TokenRequest, TokenView, seg};
use shoal_core::auth::Role;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal token create ci --role deployer --scope staging --write ci.token
  shoal token create ci --role viewer --expires-in 12h --write ci.token
  shoal token list                                NAME ROLE NAMESPACES EXPIRES AGE, no secrets
  shoal token rotate-join --write join.token      a new join token; joined nodes carry on")]
pub struct TokenCommand {
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(clap::Subcommand)]
enum TokenAction {
    /// Make an API token with a role: viewer (read), deployer (also apply, delete, scale, roll
    /// out, run jobs, upload modules) or admin (also nodes and tokens). The token is written
    /// to a file readable by its owner only, never printed.
    Create {
        /// The token's name; it shows in `token list` and in events.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// What it may do; each role may do what those before it may.
        #[arg(long, value_parser = roles())]
        role: Role,
        /// A namespace the token acts in (repeatable); none: every namespace.
        #[arg(long = "scope", value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        /// How long the token works (`12h`, `30d`), as `kubectl create token --duration`;
        /// without it, until revoked.
        #[arg(long, value_name = "DURATION", value_parser = life)]
        expires_in: Option<u64>,
        /// Where to write the token; a file there already is refused (it may hold another
        /// token, which would be lost) unless --force.
        #[arg(long)]
        write: PathBuf,
        /// Write over a file that is there already.
        #[arg(long)]
        force: bool,
    },
    /// List API tokens: names, roles and scopes, never the tokens.
    List,
    /// Revoke an API token: requests carrying it are refused from now on.
    Revoke {
        /// The token's name (`shoal token list` lists them).
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
    /// Make a new join token; the old one stops working at once. Nodes that have joined
    /// keep their own credentials.
    RotateJoin {
        /// Also write the new token to this file (readable by its owner only), for
        /// `shoal node join --token-file` on another machine. It is never printed.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

/// `--expires-in` in whole seconds: at least one.
fn life(s: &str) -> Result<u64, String> {
    let ms = shoal_core::quantity::parse_duration_ms(s).map_err(|e| e.to_string())?;
    match ms / 1000 {
        0 => Err("a token's life must be at least 1s".into()),
        seconds => Ok(seconds),
    }
}

/// The roles by name, listed in `--help` and in the error for any other.
fn roles() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Role::ALL.map(Role::as_str))
        .try_map(|name| name.parse::<Role>())
}

pub async fn run(ctx: Context, cmd: TokenCommand) -> Result<()> {
    let client = ctx.client()?;
    match cmd.action {
        TokenAction::Create {
            name,
            role,
            namespaces,
            expires_in,
            write,
            force,
        } => {
            if !force && std::fs::symlink_metadata(&write).is_ok() {
                return Err(crate::exit::usage(format!(
                    "{} exists: it may hold another token, which would be lost; give another file, or --force to write over it",
                    write.display()
                )));
            }
            check_writable(&write)?;
            let req = client
                .request(reqwest::Method::POST, "/v1/tokens")
                .json(&TokenRequest {
                    name,
                    role,
                    namespaces,
                    expires_in_seconds: expires_in,
                });
            let created: CreatedToken = client.send(req).await?;
            write_private(&write, created.token.as_bytes())?;
            match ctx.output {
                Format::Json => output::json(&created.view),
                Format::Table => println!(
                    "token {} ({}) written to {}",
                    created.view.name,
                    created.view.role,
                    write.display()
                ),
            }
        }
        TokenAction::List => {
            let tokens: Vec<TokenView> = client.get("/v1/tokens").await?;
            if ctx.output == Format::Json {
                output::json(&tokens);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    let scope = if t.namespaces.is_empty() {
                        "*".to_string()
                    } else {
                        t.namespaces.join(",")
                    };
                    let expires = match t.expires_at {
                        None => "never".to_string(),
                        Some(at) => expiry(at, shoal_core::now_ms()),
                    };
                    vec![
                        t.name.clone(),
                        t.role.to_string(),
                        scope,
                        expires,
                        age(t.created_at),
                    ]
                })
                .collect();
            table(&["NAME", "ROLE", "NAMESPACES", "EXPIRES", "AGE"], &rows);
        }
        TokenAction::Revoke { name } => {
            client
                .checked(client.request(
                    reqwest::Method::DELETE,
                    &format!("/v1/tokens/{}", seg(&name)),
                ))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "revoked": name })),
                Format::Table => println!("token {name} revoked"),
            }
        }
        TokenAction::RotateJoin { write } => rotate_join(&ctx, &client, write).await?,
    }
    Ok(())
}

/// A token's EXPIRES column: `in 23h`, or `expired 2d ago`.
fn expiry(at: u64, now: u64) -> String {
    match at.checked_sub(now) {
        Some(left) if left > 0 => format!("in {}", output::duration(left)),
        _ => format!("expired {} ago", output::duration(now - at)),
    }
}

async fn rotate_join(
    ctx: &Context,
    client: &crate::client::Client,
    write: Option<PathBuf>,
) -> Result<()> {
    if let Some(file) = &write {
        check_writable(file)?;
    }
    let path = if write.is_some() {
        "/v1/join-token/rotate?reveal=true"
    } else {
        "/v1/join-token/rotate"
    };
    let mut rotated: RotatedJoinToken = client
        .send(client.request(reqwest::Method::POST, path))
        .await?;
    if let (Some(file), Some(token)) = (&write, rotated.token.take()) {
        write_private(file, token.as_bytes())?;
    }
    match ctx.output {
        Format::Json => output::json(&rotated),
        Format::Table => {
            println!("join token rotated");
            if let Some(file) = &rotated.file {
                println!("  kept by the control plane in {file}");
            }
            if let Some(file) = &write {
                println!("  written to {}", file.display());
            }
        }
    }
    Ok(())
}
