use super::Context;
use crate::client::Client;
use crate::output::{self, Format};
use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_api::{ApplyOutcome, ApplyResult, seg};
use shoal_core::spec::{AppKey, Route};
use shoal_core::{AppManifest, ModuleRef, parse_app};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal apply -f examples/hello/app.toml          create or update; uploads the module if new
  shoal apply -f a.toml -f b.toml -n staging      several files, into namespace staging
  shoal apply -f apps/ -R                         every .toml spec under apps/, in name order
  sed s/1.2/1.3/ app.toml | shoal apply -f -      a spec from standard input (paths in it
                                                  are relative to the current directory)
  shoal apply --dry-run -f app.toml               what would change (exit 1 if anything)
  shoal apply --retry -f app.toml                 roll out again what was rolled back")]
pub struct ApplyArgs {
    /// App spec files (TOML); a directory: its .toml files (Rust's Cargo.toml,
    /// rust-toolchain.toml, rustfmt.toml and clippy.toml aside) in name order; `-`: standard
    /// input. All are read before any is applied.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// With a directory: its subdirectories' specs too (not through links).
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Show what would change without changing anything; exit 1 if anything would.
    #[arg(long)]
    pub dry_run: bool,
    /// Roll out a spec whose last rollout was rolled back or aborted once more (without it,
    /// applying that spec again is refused, exit 4, so a loop re-applying a file does not
    /// send traffic to a build known to fail).
    #[arg(long)]
    pub retry: bool,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal diff -f examples/hello/app.toml           exit 0: nothing would change; 1: something would")]
pub struct DiffArgs {
    /// App spec files (TOML); a directory: its .toml files (Rust's Cargo.toml,
    /// rust-toolchain.toml, rustfmt.toml and clippy.toml aside) in name order; `-`: standard
    /// input.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// With a directory: its subdirectories' specs too (not through links).
    #[arg(short = 'R', long)]
    recursive: bool,
}

/// `apply --dry-run` under kubectl's name.
pub async fn diff(ctx: Context, args: DiffArgs) -> Result<()> {
    let apply = ApplyArgs {
        files: args.files,
        recursive: args.recursive,
        dry_run: true,
        retry: false,
    };
    run(ctx, apply).await
}

pub async fn run(ctx: Context, args: ApplyArgs) -> Result<()> {
    let client = ctx.client()?;
    let specs = read_specs(&args.files, args.recursive, ctx.spec_namespace())?;
    let mut results = Vec::new();
    let mut modules = Modules::default();
    for spec in specs {
        let applied = apply_spec(&client, spec, &mut modules, args.dry_run, args.retry, None);
        let result = match applied.await {
            Ok(result) => result,
            // What was applied before the one refused is said, in JSON too.
            Err(e) => {
                if ctx.output == Format::Json && !results.is_empty() {
                    output::json(&results);
                }
                return Err(e);
            }
        };
        if ctx.output == Format::Table {
            print_result(&result);
        }
        results.push(result);
    }
    if ctx.output == Format::Json {
        output::json(&results);
    }
    if args.dry_run && results.iter().any(|r| r.outcome != ApplyOutcome::Unchanged) {
        return Err(crate::exit::WouldChange.into());
    }
    Ok(())
}

/// Every spec `files` name (see [`spec_files`]), read, parsed and checked against each other
/// before any is applied: a malformed one, an app in two files or a route served by two apps
/// changes nothing rather than half a directory. (What needs the server, a module upload or a
/// missing config set, still fails at its file, after the ones before it.)
pub fn read_specs(
    files: &[PathBuf],
    recursive: bool,
    namespace: Option<SpecNamespace>,
) -> Result<Vec<SpecFile>> {
    let specs = spec_files(files, recursive)?
        .iter()
        .map(|file| read_spec(file, namespace))
        .collect::<Result<Vec<_>>>()?;
    let mut seen: HashMap<AppKey, &Path> = HashMap::new();
    for spec in &specs {
        if let Some(first) = seen.insert(spec.key(), &spec.file) {
            return Err(crate::exit::usage(format!(
                "{}: app {} is also in {}: one file per app",
                spec.file.display(),
                spec.key(),
                first.display()
            )));
        }
    }
    drop(seen);
    // A route is one app's: the second would be refused by the server after the first was
    // applied, and a dry run judges each file alone against the server.
    let mut served: HashMap<&Route, &SpecFile> = HashMap::new();
    for spec in &specs {
        for route in spec.manifest.routes() {
            if let Some(first) = served.insert(route, spec)
                && first.key() != spec.key()
            {
                return Err(crate::exit::usage(format!(
                    "{}: route {route} is also served by app {} in {}: a route is one app's",
                    spec.file.display(),
                    first.key(),
                    first.file.display()
                )));
            }
        }
    }
    drop(served);
    Ok(specs)
}

/// What `-f` names, a spec each: a file; `-`, standard input (once); a directory, its `.toml`
/// files in name order (with `recursive`, its subdirectories' too; hidden ones never), as
/// `kubectl apply -f DIR [-R]` takes a directory's manifests. Rust's own files are left
/// out ([`NOT_SPECS`]): a component's crate keeps its spec beside its `Cargo.toml`.
fn spec_files(given: &[PathBuf], recursive: bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in given {
        if path.as_os_str() == "-" {
            if files.contains(path) {
                return Err(crate::exit::usage(
                    "-f - names standard input twice: it is read once".into(),
                ));
            }
            files.push(path.clone());
        } else if path.is_dir() {
            let before = files.len();
            specs_in(path, recursive, &mut files)?;
            if files.len() == before {
                let hint = if recursive {
                    ""
                } else {
                    " (-R reads its subdirectories)"
                };
                return Err(crate::exit::usage(format!(
                    "{}: no .toml spec in this directory{hint}",
                    path.display()
                )));
            }
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Rust's own files, which sit beside a component's spec in its crate.
const NOT_SPECS: [&str; 4] = [
    "Cargo.toml",
    "rust-toolchain.toml",
    "rustfmt.toml",
    "clippy.toml",
];

fn specs_in(dir: &Path, recursive: bool, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .and_then(|d| {
            d.map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?))))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in entries {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') || NOT_SPECS.contains(&name.as_ref()) {
            continue;
        }
        // A link to a directory is not followed: a loop would never end.
        if kind.is_dir() {
            if recursive {
                specs_in(&path, true, files)?;
            }
        } else if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// Modules smaller than this go up without a progress line.
const PROGRESS_FROM: usize = 4 << 20;

/// `bytes` as a request body; a big module on a terminal shows how much of it went up, on
/// one stderr line rewritten in place, as `docker push` does. Not with several servers to
/// go to: a streamed body cannot be sent again to the next.
fn upload_body(bytes: Vec<u8>, path: &Path, fails_over: bool) -> reqwest::Body {
    use std::io::IsTerminal;
    if bytes.len() < PROGRESS_FROM || !std::io::stderr().is_terminal() || fails_over {
        return reqwest::Body::from(bytes);
    }
    let total = bytes.len();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let chunks: Vec<bytes::Bytes> = bytes::Bytes::from(bytes)
        .chunks(256 << 10)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let mut sent = 0;
    let stream = futures::stream::iter(chunks).map(move |chunk| {
        sent += chunk.len();
        let mib = |n: usize| n as f64 / f64::from(1 << 20);
        let end = if sent == total { "\n" } else { "" };
        eprint!(
            "\ruploading {name}: {:.1}/{:.1} MiB ({}%){end}",
            mib(sent),
            mib(total),
            sent * 100 / total
        );
        Ok::<_, std::io::Error>(chunk)
    });
    reqwest::Body::wrap_stream(stream)
}

/// A spec file's error as `FILE:LINE:COLUMN: field: message`, as compilers say theirs.
pub(super) fn in_file(file: &Path, e: shoal_core::SpecError) -> anyhow::Error {
    match (e.line, e.column) {
        (Some(l), Some(c)) => {
            let mut e = e;
            e.line = None;
            e.column = None;
            anyhow::anyhow!("{}:{l}:{c}: {e}", file.display())
        }
        _ => anyhow::anyhow!("{}: {e}", file.display()),
    }
}

/// A spec file read and parsed, not applied yet.
pub struct SpecFile {
    /// Where it came from, as errors name it (`<stdin>` for `-`).
    file: PathBuf,
    /// What its module path is relative to.
    dir: PathBuf,
    text: String,
    manifest: AppManifest,
}

impl SpecFile {
    pub(super) fn key(&self) -> AppKey {
        AppKey::new(self.manifest.namespace(), self.manifest.name())
    }

    /// Where the spec came from, as errors name it.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// Where a spec file that names no namespace goes, as kubectl sends it: to `-n`'s, and a
/// file naming another is then refused; or to the context's, and a file naming another
/// keeps its own.
#[derive(Debug, Clone, Copy)]
pub struct SpecNamespace<'a> {
    pub name: &'a str,
    /// Given with `-n`.
    pub given: bool,
}

/// Reads and parses one spec file (`-`: standard input, whose module paths are relative to
/// the current directory), into `namespace` ([`SpecNamespace`]).
fn read_spec(file: &Path, namespace: Option<SpecNamespace>) -> Result<SpecFile> {
    let stdin = file.as_os_str() == "-";
    let text = if stdin {
        crate::files::read_stdin_text(crate::files::SPEC_LIMIT)
            .context("cannot read the spec from standard input")?
    } else {
        crate::files::read_text(file, crate::files::SPEC_LIMIT)
            .with_context(|| format!("cannot read {}", file.display()))?
    };
    // Errors name where the spec came from; its module paths are relative to its directory.
    let (file, dir) = match stdin {
        true => (Path::new("<stdin>"), Path::new(".")),
        false => (file, file.parent().unwrap_or(Path::new("."))),
    };
    parse_spec(file, dir, text, namespace)
}

/// A spec's `text`, from `file`, parsed; its module paths are relative to `dir`. With
/// `namespace`, as [`read_spec`] takes it.
pub(super) fn parse_spec(
    file: &Path,
    dir: &Path,
    text: String,
    namespace: Option<SpecNamespace>,
) -> Result<SpecFile> {
    let mut manifest = parse_app(&text).map_err(|e| in_file(file, e))?;
    if let Some(SpecNamespace { name: ns, given }) = namespace {
        let written = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("namespace")?.as_str().map(str::to_string));
        match written {
            Some(w) if w != ns && given => {
                return Err(crate::exit::usage(format!(
                    "{}: the file says namespace {w}, -n says {ns}: drop one of them",
                    file.display()
                )));
            }
            Some(_) => {}
            None => {
                shoal_core::validate_name(ns).map_err(|e| anyhow::anyhow!("-n: {e}"))?;
                manifest.set_namespace(ns);
            }
        }
    }
    Ok(SpecFile {
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        text,
        manifest,
    })
}

/// The module digests one apply run has found on the server or uploaded (in a dry run: would
/// upload): specs sharing a module ask for it, and upload or announce it, once.
pub type Modules = std::collections::HashSet<String>;

/// Uploads a read spec's module if the server lacks it, and applies the spec; with
/// `if_spec`, only over the stored spec of that fingerprint (an edit's base).
pub async fn apply_spec(
    client: &Client,
    spec: SpecFile,
    modules: &mut Modules,
    dry_run: bool,
    retry: bool,
    if_spec: Option<&str>,
) -> Result<ApplyResult> {
    let SpecFile {
        file,
        dir,
        text,
        manifest,
    } = spec;
    let file = file.as_path();
    // An OCI reference is the control plane's to resolve and pull.
    let digest = match &manifest.module {
        ModuleRef::Oci(_) => None,
        ModuleRef::Digest(d) => {
            // The server refuses an unknown digest, but not in a dry run (which may come
            // before the upload of a `component.path`): one named outright is checked here.
            let resp = client
                .answer(client.request(reqwest::Method::GET, &format!("/v1/modules/{}", seg(d))))
                .await;
            if resp.is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND) {
                return Err(crate::exit::fail(
                    crate::exit::NOT_FOUND,
                    format!(
                        "{}: component.digest: module {d} has not been uploaded (`shoal get modules` lists those that are; or set component.path to the .wasm file and let apply upload it)",
                        file.display()
                    ),
                ));
            }
            Some(d.clone())
        }
        ModuleRef::Path(p) => {
            let path = dir.join(p);
            let bytes = crate::files::read(&path, crate::files::MODULE_LIMIT).with_context(|| {
                format!(
                    "{}: component.path: cannot read {} (is the component built? `cargo build --release --target wasm32-wasip2`)",
                    file.display(),
                    path.display()
                )
            })?;
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            let known = modules.contains(&digest)
                || client
                    .answer(client.request(
                        reqwest::Method::GET,
                        &format!("/v1/modules/{}", seg(&digest)),
                    ))
                    .await
                    .is_ok_and(|r| r.status().is_success());
            if !known {
                if dry_run {
                    eprintln!(
                        "module {} ({} bytes) would be uploaded",
                        output::short_digest(&digest),
                        bytes.len()
                    );
                } else {
                    // Content-addressed: a second upload stores nothing new.
                    let resp: serde_json::Value = client
                        .send_idempotent(
                            client
                                .request(reqwest::Method::POST, "/v1/modules")
                                .body(upload_body(bytes, &path, client.fails_over())),
                        )
                        .await
                        .with_context(|| format!("uploading {}", path.display()))?;
                    if resp["module"]["digest"].as_str() != Some(digest.as_str()) {
                        bail!(
                            "the server stored {} under a different digest than {digest}",
                            path.display()
                        );
                    }
                }
            }
            modules.insert(digest.clone());
            Some(digest)
        }
    };
    let spec = match digest {
        Some(digest) => manifest
            .resolve(digest)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
        None => manifest.unresolved(),
    };
    // Named where the file names them: the server refuses an unknown set or secret too,
    // but cannot say on which line.
    for set in &spec.config_sets {
        let path = format!(
            "/v1/configs/{}?namespace={}",
            seg(&set.name),
            seg(&spec.namespace)
        );
        let resp = client
            .answer(client.request(reqwest::Method::GET, &path))
            .await;
        if resp.is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND) {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with("config_sets"))
                .map_or(String::new(), |n| format!("{}:", n + 1));
            bail!(
                "{}:{line} config_sets: config set {} does not exist in namespace {}: create it with `shoal config create {}`",
                file.display(),
                set.name,
                spec.namespace,
                set.name
            );
        }
    }
    for (field, refs) in [("env", &spec.secret_env), ("config", &spec.secret_config)] {
        for (name, r) in refs {
            let path = format!(
                "/v1/secrets/{}?namespace={}",
                seg(&r.secret),
                seg(&spec.namespace)
            );
            let problem = match client
                .answer(client.request(reqwest::Method::GET, &path))
                .await
            {
                Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => format!(
                    "secret {} does not exist in namespace {}: create it with `shoal secret create {}`",
                    r.secret, spec.namespace, r.secret
                ),
                Ok(resp) if resp.status().is_success() => {
                    match resp.json::<shoal_api::SecretView>().await {
                        Ok(view) if !view.keys.contains(&r.key) => format!(
                            "secret {} has no key {:?} (it has: {})",
                            r.secret,
                            r.key,
                            view.keys.join(", ")
                        ),
                        _ => continue,
                    }
                }
                // The server judges what cannot be checked here.
                _ => continue,
            };
            let line = text
                .lines()
                .position(|l| {
                    l.trim_start()
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| {
                            rest.trim_start().starts_with('=') && l.contains("secret")
                        })
                })
                .map_or(String::new(), |n| format!("{}:", n + 1));
            bail!("{}:{line} {field}.{name}: {problem}", file.display());
        }
    }
    let mut query = Vec::new();
    if dry_run {
        query.push(("dry_run", "true"));
    }
    if retry {
        query.push(("retry", "true"));
    }
    if let Some(base) = if_spec {
        query.push(("if_spec", base));
    }
    // Declarative: applied twice, the spec leaves the app as applied once (an edit too: the
    // server passes one that changes nothing whatever it was made from).
    client
        .send_idempotent(
            client
                .request(reqwest::Method::POST, "/v1/apps")
                .query(&query)
                .json(&spec),
        )
        .await
        .with_context(|| format!("applying {}", file.display()))
}

pub(super) fn print_result(r: &ApplyResult) {
    let key = r.app.spec.key();
    let would = if r.dry_run { " (dry run)" } else { "" };
    match r.outcome {
        ApplyOutcome::Created => println!("app {key} created, revision {}{would}", r.app.revision),
        ApplyOutcome::Configured => {
            println!("app {key} configured, revision {}{would}", r.app.revision);
            for c in &r.changes {
                println!("  {c}");
            }
        }
        ApplyOutcome::Unchanged => println!("app {key} unchanged"),
    }
    // As kubectl shows a server's warnings: on stderr, the apply itself done.
    for w in &r.warnings {
        eprintln!("Warning: app {key}: {w}");
    }
}
