//! `shoal edit app NAME`: the app's spec in an editor, applied on save, as `kubectl edit`.

use super::Context;
use super::apply::{Modules, apply_spec, parse_spec, print_result};
use crate::output::{self, Format};
use anyhow::{Context as _, Result};
use shoal_api::{Describe, seg};
use std::path::Path;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal edit app hello                            its spec in $VISUAL or $EDITOR (vi), applied on save
  EDITOR='code --wait' shoal edit app hello -n staging
  shoal get app hello -o toml > hello.toml        the same spec as a file, for `apply -f`")]
pub struct EditArgs {
    /// What to edit (jobs are apps).
    #[arg(value_enum)]
    what: What,
    /// Its name.
    #[arg(value_parser = crate::commands::object_name)]
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    #[value(alias = "apps", alias = "job", alias = "jobs")]
    App,
}

/// Above the spec in the file the editor opens.
const HEADER: &str = "\
# Edit the spec and save it to apply it; leave it unchanged, or empty, to change nothing.
# The module is its `digest`, or the `oci` reference it was pulled from (resolved again: a
# moved tag rolls out what it names now); a `path` is read relative to the current directory.
# If another change comes first, nothing is applied and this file is kept.
";

pub async fn run(ctx: Context, args: EditArgs) -> Result<()> {
    let What::App = args.what;
    let client = ctx.client()?;
    let read: Describe = client
        .get(&format!(
            "/v1/apps/{}?namespace={}",
            seg(&args.name),
            seg(&ctx.namespace)
        ))
        .await?;
    let key = read.app.spec.key();
    let original = format!("{HEADER}{}", read.app.spec.to_toml());
    let mut file = tempfile::Builder::new()
        .prefix(&format!("shoal-edit-{}-", args.name))
        .suffix(".toml")
        .tempfile()
        .context("cannot make a file to edit the spec in")?;
    std::io::Write::write_all(&mut file, original.as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .context("cannot write the spec to edit")?;
    // Kept unless the edit is applied or changes nothing: work is not lost to a typo.
    let path = file
        .into_temp_path()
        .keep()
        .context("cannot keep the file to edit the spec in")?;
    let kept = |e: anyhow::Error| {
        eprintln!("your edit is kept in {}", path.display());
        e
    };
    let editor = editor();
    let status = tokio::task::block_in_place(|| {
        // Through the shell, as git and kubectl run it: EDITOR may carry its own flags.
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("shoal-edit")
            .arg(&path)
            .status()
    })
    .with_context(|| format!("cannot run the editor {editor:?}"))
    .map_err(kept)?;
    if !status.success() {
        return Err(kept(anyhow::anyhow!(
            "the editor {editor:?} exited with {status}: nothing applied"
        )));
    }
    let edited = crate::files::read_text(&path, crate::files::SPEC_LIMIT)
        .with_context(|| format!("cannot read {}", path.display()))
        .map_err(kept)?;
    if edited == original || is_blank(&edited) {
        let _ = std::fs::remove_file(&path);
        eprintln!("Edit cancelled, no changes made.");
        return Ok(());
    }
    let spec = parse_spec(&path, Path::new("."), edited, None).map_err(kept)?;
    if spec.key() != key {
        return Err(kept(crate::exit::usage(format!(
            "the edit names app {}, not {key}: an edit keeps the app's name and namespace (apply a file to make another app)",
            spec.key()
        ))));
    }
    // An older server sends no fingerprint: the edit then goes through unguarded.
    let base = Some(read.fingerprint.as_str()).filter(|f| !f.is_empty());
    let result = apply_spec(&client, spec, &mut Modules::default(), false, false, base)
        .await
        .map_err(kept)?;
    let _ = std::fs::remove_file(&path);
    match ctx.output {
        Format::Json => output::json(&result),
        _ => print_result(&result),
    }
    Ok(())
}

/// The editor to run: `$VISUAL`, else `$EDITOR`, else `vi`, as git and kubectl choose.
fn editor() -> String {
    ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".into())
}

/// Nothing left but comments and blank lines: an edit that emptied the file cancels it.
fn is_blank(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#'))
}
