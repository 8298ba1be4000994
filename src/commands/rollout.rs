use super::Context;
use crate::output::{self, Format, age, short_digest, table};
use anyhow::Result;
use shoal_control::{ApplyOutcome, ApplyResult, Describe};

#[derive(clap::Args)]
pub struct RolloutCommand {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// List an app's revisions: number, age, module, why it was made.
    History { app: String },
    /// Run an earlier revision again (default: the one before the current), as a new revision.
    Undo {
        app: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

pub async fn run(ctx: Context, cmd: RolloutCommand) -> Result<()> {
    let client = ctx.client()?;
    let ns = &ctx.namespace;
    match cmd.action {
        Action::History { app } => {
            let d: Describe = client
                .get(&format!("/v1/apps/{app}?namespace={ns}"))
                .await?;
            if ctx.output == Format::Json {
                output::json(&d.revisions);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = d
                .revisions
                .iter()
                .map(|r| {
                    let current = if r.number == d.app.revision { "*" } else { "" };
                    vec![
                        format!("{}{current}", r.number),
                        age(r.created_at),
                        short_digest(&r.template.component.digest),
                        r.cause.clone(),
                    ]
                })
                .collect();
            table(&["REVISION", "AGE", "MODULE", "CAUSE"], &rows);
        }
        Action::Undo { app, to_revision } => {
            let mut path = format!("/v1/apps/{app}/rollback?namespace={ns}");
            if let Some(n) = to_revision {
                path.push_str(&format!("&to={n}"));
            }
            let r: ApplyResult = client
                .send(client.request(reqwest::Method::POST, &path))
                .await?;
            match ctx.output {
                Format::Json => output::json(&r),
                Format::Table if r.outcome == ApplyOutcome::Unchanged => {
                    println!("app {ns}/{app} already runs that revision")
                }
                Format::Table => {
                    println!(
                        "app {ns}/{app} rolled back: now revision {}",
                        r.app.revision
                    );
                    for c in &r.changes {
                        println!("  {c}");
                    }
                }
            }
        }
    }
    Ok(())
}
