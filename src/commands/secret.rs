//! `shoal secret`: values an app reads as env values or config keys (`{ secret = "db",
//! key = "password" }` in a spec), sealed at rest and never shown again. Changing one rolls
//! the apps that name it.

use super::Context;
use crate::output::{self, Format, age, table};
use anyhow::{Context as _, Result, bail};
use shoal_api::{KeyRotated, SecretView, SecretWrite, SecretWritten, seg};
use shoal_core::spec::{
    REGISTRY_KEY, REGISTRY_PASSWORD_KEY, REGISTRY_USERNAME_KEY, TLS_CERT_KEY, TLS_KEY_KEY,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal secret create db --from-file password=pw.txt --from-literal user=app
  shoal secret create shop-tls --tls-cert cert.pem --tls-key key.pem
  shoal secret create regcred --registry registry.example.com --username ci --password-stdin < pw.txt
  shoal secret set db --from-literal user=admin   a new version; the apps that use it roll
  shoal get secrets                               names, keys and versions; never values")]
pub struct SecretCommand {
    #[command(subcommand)]
    action: SecretAction,
}

#[derive(clap::Subcommand)]
enum SecretAction {
    /// Make a secret in the namespace (`-n`); apps name its keys as env values or config keys.
    Create {
        /// The secret's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        #[command(flatten)]
        values: Values,
    },
    /// Set keys of a secret, keeping the others: a new version; the apps that name it roll,
    /// and a new certificate is served from the next connections.
    Set {
        /// The secret's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        #[command(flatten)]
        values: Values,
    },
    /// Take keys out of a secret: a new version without them.
    Unset {
        /// The secret's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
        /// The keys.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List the namespace's secrets (keys, versions, users), or one; never their values.
    Get {
        /// A secret to show; none: list them all.
        name: Option<String>,
    },
    /// Delete a secret no app names.
    Delete {
        /// The secret's name.
        #[arg(value_parser = crate::commands::object_name)]
        name: String,
    },
    /// Seal every secret again under a new key and retire the old one (admin).
    RotateKey,
}

/// The values a `create` or `set` writes.
#[derive(clap::Args)]
struct Values {
    /// A value, KEY=VALUE (repeatable). It ends up in your shell's history: prefer
    /// --from-file for real secrets.
    #[arg(long = "from-literal", value_name = "KEY=VALUE")]
    literals: Vec<String>,
    /// A value read from a file, KEY=PATH (repeatable).
    #[arg(long = "from-file", value_name = "KEY=PATH")]
    files: Vec<String>,
    /// A certificate chain (PEM) for `[http] tls`: key tls.crt, as `kubectl create secret
    /// tls` makes it.
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM): key tls.key.
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// For `[component] pull_secret`: the registry host (and port) the credentials are
    /// for, as references name it: key registry.
    #[arg(long, value_name = "HOST", requires = "username")]
    registry: Option<String>,
    /// The registry user name: key username.
    #[arg(long, value_name = "USER", requires = "registry")]
    username: Option<String>,
    /// Read the registry password (or token) from standard input: key password.
    #[arg(long, requires = "registry")]
    password_stdin: bool,
}

/// A password given on standard input, as `docker login --password-stdin` takes it: the
/// whole input without its trailing line break.
pub(super) fn password_from_stdin() -> Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("--password-stdin: cannot read standard input")?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("--password-stdin: standard input is empty");
    }
    Ok(password)
}

/// Splits `KEY=VALUE`.
fn pair(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        // Not echoed back: it may be the secret itself.
        _ => Err(crate::exit::usage(
            "a value is not KEY=VALUE (or KEY=PATH)".into(),
        )),
    }
}

/// The values of `--from-literal`, `--from-file`, `--tls-cert`, `--tls-key` and the
/// registry flags.
fn values(given: &Values) -> Result<BTreeMap<String, String>> {
    let mut data = BTreeMap::new();
    for text in &given.literals {
        let (k, v) = pair(text)?;
        super::insert_once(&mut data, k, v)?;
    }
    let read = |flag: &str, k: &str, file: &std::path::Path| {
        crate::files::read_text(file, crate::files::VALUE_LIMIT)
            .with_context(|| format!("{flag} {k}: cannot read {} as text", file.display()))
    };
    for text in &given.files {
        let (k, file) = pair(text)?;
        let v = read("--from-file", &k, file.as_ref())?;
        super::insert_once(&mut data, k, v)?;
    }
    for (flag, key, file) in [
        ("--tls-cert", TLS_CERT_KEY, &given.tls_cert),
        ("--tls-key", TLS_KEY_KEY, &given.tls_key),
    ] {
        if let Some(file) = file {
            super::insert_once(&mut data, key.to_string(), read(flag, key, file)?)?;
        }
    }
    if let (Some(registry), Some(username)) = (&given.registry, &given.username) {
        super::insert_once(&mut data, REGISTRY_KEY.to_string(), registry.clone())?;
        super::insert_once(
            &mut data,
            REGISTRY_USERNAME_KEY.to_string(),
            username.clone(),
        )?;
    }
    if given.password_stdin {
        super::insert_once(
            &mut data,
            REGISTRY_PASSWORD_KEY.to_string(),
            password_from_stdin()?,
        )?;
    }
    Ok(data)
}

pub async fn run(ctx: Context, cmd: SecretCommand) -> Result<()> {
    let client = ctx.client()?;
    let ns = ctx.namespace.clone();
    let path = |name: &str| format!("/v1/secrets/{}?namespace={}", seg(name), seg(&ns));
    let put = |name: &str, write: SecretWrite| {
        let req = client
            .request(reqwest::Method::PUT, &path(name))
            .json(&write);
        client.send::<SecretWritten>(req)
    };
    match cmd.action {
        SecretAction::Create { name, values: v } => {
            let set = values(&v)?;
            let written = put(
                &name,
                SecretWrite {
                    create: true,
                    set,
                    unset: vec![],
                },
            )
            .await?;
            report(&ctx, &written, "created");
        }
        SecretAction::Set { name, values: v } => {
            let set = values(&v)?;
            if set.is_empty() {
                bail!(
                    "nothing to set: give --from-literal KEY=VALUE, --from-file KEY=PATH, --tls-cert FILE --tls-key FILE or --registry HOST --username USER --password-stdin"
                );
            }
            let write = SecretWrite {
                create: false,
                set,
                unset: vec![],
            };
            report(&ctx, &put(&name, write).await?, "changed");
        }
        SecretAction::Unset { name, keys } => {
            let write = SecretWrite {
                create: false,
                set: BTreeMap::new(),
                unset: keys,
            };
            report(&ctx, &put(&name, write).await?, "changed");
        }
        SecretAction::Get { name: Some(name) } => {
            let secret: SecretView = client.get(&path(&name)).await?;
            print_secrets(&ctx, &[secret]);
        }
        SecretAction::Get { name: None } => {
            let secrets: Vec<SecretView> = client
                .get(&format!("/v1/secrets?namespace={}", seg(&ns)))
                .await?;
            print_secrets(&ctx, &secrets);
        }
        SecretAction::Delete { name } => {
            client
                .checked(client.request(reqwest::Method::DELETE, &path(&name)))
                .await?;
            match ctx.output {
                Format::Json => output::json(&serde_json::json!({ "deleted": name })),
                Format::Table => println!("secret {name} deleted"),
            }
        }
        SecretAction::RotateKey => {
            ctx.no_namespace("the secret key")?;
            let rotated: KeyRotated = client
                .send(client.request(reqwest::Method::POST, "/v1/secret-key/rotate"))
                .await?;
            match ctx.output {
                Format::Json => output::json(&rotated),
                Format::Table => println!(
                    "secrets sealed again under key {}: {} secrets, {} values",
                    rotated.key, rotated.secrets, rotated.values
                ),
            }
        }
    }
    Ok(())
}

/// What `secret get` and `get secrets` show of each secret.
pub const SECRET_COLUMNS: &[&str] = &["NAME", "KEYS", "VERSION", "USED BY", "UPDATED"];

/// NAME KEYS VERSION USED BY UPDATED: what `secret get` and `get secrets` show.
pub fn print_secrets(ctx: &Context, secrets: &[SecretView]) {
    if ctx.output == Format::Json {
        output::json(&secrets);
        return;
    }
    table(SECRET_COLUMNS, &secret_rows(secrets));
}

/// One row per secret, as [`SECRET_COLUMNS`].
pub fn secret_rows(secrets: &[SecretView]) -> Vec<Vec<String>> {
    secrets
        .iter()
        .map(|s| {
            let kept = s
                .versions
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            vec![
                s.name.clone(),
                s.keys.join(","),
                format!("{} (kept: {kept})", s.version),
                s.used_by.join(","),
                age(s.updated_at),
            ]
        })
        .collect()
}

fn report(ctx: &Context, written: &SecretWritten, verb: &str) {
    match ctx.output {
        Format::Json => output::json(written),
        Format::Table => {
            let s = &written.secret;
            let verb = if written.unchanged { "unchanged" } else { verb };
            println!(
                "secret {} {verb}: version {} ({})",
                s.name,
                s.version,
                output::count(s.keys.len(), "key")
            );
            for app in &written.rolled {
                println!("  app {app} applied again");
            }
        }
    }
}
