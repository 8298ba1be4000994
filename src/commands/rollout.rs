use super::Context;
use crate::output::{self, Format, age, short_digest, table};
use anyhow::Result;
use shoal_api::{ApplyOutcome, ApplyResult, Describe, RolloutView, seg};
use shoal_core::metrics::RevisionStats;
use shoal_core::{Kind, RolloutPhase, RolloutStatus};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal rollout status hello --wait               follow the rollout to its end
  shoal rollout promote hello --full              canary: straight to 100%
  shoal rollout undo hello --to-revision 3        run revision 3 again, as a new revision
  shoal rollout restart hello                     fresh replicas of what runs, new before old")]
pub struct RolloutCommand {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// List an app's revisions: number, age, module, why it was made, how its rollout ended.
    History {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
    },
    /// Where the app's rollout stands; with --wait, follow it until it ends.
    Status {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
        /// Print each change until the rollout completes (exit 0) or is rolled back (exit 1).
        #[arg(long, short)]
        wait: bool,
        /// Give up waiting after this long (e.g. 90s, 10m).
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// Hold the rollout where it stands: replica counts per revision stay as they are. Between
    /// rollouts, the next one (a revision applied now) waits; a pause lasts until `resume`.
    Pause {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
    },
    /// Continue a paused rollout, or let the next one run.
    Resume {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
    },
    /// Canary: end the current step now (with --full, skip to 100%).
    Promote {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
        /// Skip every remaining step: the canary takes all traffic.
        #[arg(long)]
        full: bool,
    },
    /// Stop the rollout and go back to the last revision that rolled out.
    Abort {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
    },
    /// Replace every replica with a fresh one, the way the app rolls out (new before old):
    /// what runs now, again as a new revision; the spec does not change.
    Restart {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
    },
    /// Run an earlier revision again, as a new revision (default: the last before the current
    /// with another template that was not rolled back or aborted).
    Undo {
        /// The app's name.
        #[arg(value_parser = crate::commands::object_name)]
        app: String,
        /// The revision to run again (`shoal rollout history APP` lists them).
        #[arg(long, value_name = "N")]
        to_revision: Option<u64>,
    },
}

pub async fn run(ctx: Context, cmd: RolloutCommand) -> Result<()> {
    let client = ctx.client()?;
    let ns = &ctx.namespace;
    match cmd.action {
        Action::History { app } => {
            let d: Describe = client
                .get(&format!("/v1/apps/{}?namespace={}", seg(&app), seg(ns)))
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
                        match (&r.outcome, &d.rollout) {
                            (Some(o), _) => o.clone(),
                            // The rollout under way says where this revision stands.
                            (None, Some(s)) if s.revision == r.number => {
                                s.phase.to_string().to_lowercase()
                            }
                            (None, _) => String::new(),
                        },
                    ]
                })
                .collect();
            table(&["REVISION", "AGE", "MODULE", "CAUSE", "OUTCOME"], &rows);
        }
        Action::Status { app, wait, timeout } => {
            let path = format!("/v1/apps/{}/rollout?namespace={}", seg(&app), seg(ns));
            if !wait {
                let view: RolloutView = client.get(&path).await?;
                match ctx.output {
                    Format::Json => output::json(&view),
                    Format::Table => println!("{}", describe(&view)),
                }
                return Ok(());
            }
            let limit = Duration::from_millis(
                shoal_core::quantity::parse_duration_ms(&timeout)
                    .map_err(|e| crate::exit::usage(format!("--timeout: {e}")))?,
            );
            let started = Instant::now();
            let mut last = String::new();
            loop {
                let view: RolloutView = client.get(&path).await?;
                let text = describe(&view);
                if text != last {
                    match ctx.output {
                        Format::Json => output::json(&view),
                        Format::Table => println!("{text}"),
                    }
                    last = text;
                }
                let current = view.status.as_ref().filter(|s| s.revision == view.revision);
                // As many ready as the app wants now: a scale-up since the rollout
                // completed (one that fits nowhere) is waited for too, as kubectl does.
                let ready = view
                    .revisions
                    .iter()
                    .find(|c| c.revision == view.revision)
                    .map_or(0, |c| c.ready);
                let all_ready = ready >= view.desired as usize;
                match (&view.status, current.map(|s| s.phase)) {
                    (None, _) if view.kind == Kind::Job => return Ok(()),
                    // Not yet seen by the controller: wait.
                    (_, None) => {}
                    (_, Some(RolloutPhase::Complete)) if all_ready => {
                        // The last look may show a replica still coming (a rebalance's
                        // surge): say plainly that the wait is over, as kubectl does.
                        if ctx.output == Format::Table {
                            println!(
                                "app {ns}/{app}: revision {} rolled out, {ready} of {} replicas ready",
                                view.revision, view.desired
                            );
                        }
                        return Ok(());
                    }
                    (_, Some(RolloutPhase::Complete)) if started.elapsed() > limit => {
                        anyhow::bail!(
                            "revision {} of {ns}/{app} rolled out, but {ready} of its {} replicas are ready after {timeout} (see `shoal get replicas --app {app}`)",
                            view.revision,
                            view.desired
                        )
                    }
                    (_, Some(RolloutPhase::Complete)) => {}
                    (_, Some(RolloutPhase::Progressing)) => {}
                    (_, Some(phase)) => anyhow::bail!(
                        "rollout of {ns}/{app} ended {phase}: {}",
                        view.status.as_ref().map_or("", |s| s.message.as_str())
                    ),
                }
                if started.elapsed() > limit {
                    anyhow::bail!("rollout of {ns}/{app} still in progress after {timeout}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Action::Pause { app } => act(&ctx, &client, &app, "pause", false).await?,
        Action::Resume { app } => act(&ctx, &client, &app, "resume", false).await?,
        Action::Promote { app, full } => act(&ctx, &client, &app, "promote", full).await?,
        Action::Abort { app } => act(&ctx, &client, &app, "abort", false).await?,
        Action::Restart { app } => {
            let path = format!("/v1/apps/{}/restart?namespace={}", seg(&app), seg(ns));
            let r: ApplyResult = client
                .send(client.request(reqwest::Method::POST, &path))
                .await?;
            match ctx.output {
                Format::Json => output::json(&r),
                Format::Table => println!(
                    "app {ns}/{app} restarting: revision {} replaces its replicas (`shoal rollout status {app} --wait` follows it)",
                    r.app.revision
                ),
            }
        }
        Action::Undo { app, to_revision } => {
            let mut path = format!("/v1/apps/{}/rollback?namespace={}", seg(&app), seg(ns));
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
            for w in &r.warnings {
                eprintln!("Warning: app {ns}/{app}: {w}");
            }
        }
    }
    Ok(())
}

async fn act(
    ctx: &Context,
    client: &crate::client::Client,
    app: &str,
    action: &str,
    full: bool,
) -> Result<()> {
    let ns = &ctx.namespace;
    let path = format!(
        "/v1/apps/{}/rollout/{action}?namespace={}&full={full}",
        seg(app),
        seg(ns)
    );
    let status: RolloutStatus = client
        .send(client.request(reqwest::Method::POST, &path))
        .await?;
    match ctx.output {
        Format::Json => output::json(&status),
        Format::Table => println!("app {ns}/{app}: {}", status.message),
    }
    Ok(())
}

/// A few lines on where a rollout stands, the same for one look and for `--wait`.
fn describe(view: &RolloutView) -> String {
    let Some(s) = &view.status else {
        return match view.kind {
            Kind::Job => format!(
                "app {}: jobs run to completion and do not roll out",
                view.app
            ),
            _ => format!(
                "app {}: revision {} waiting for the controller",
                view.app, view.revision
            ),
        };
    };
    let paused = if s.paused { ", paused" } else { "" };
    // After a roll back, the rollout that ended is the abandoned revision's.
    let mut out = match s.rolled_back_from {
        Some(from) => format!(
            "app {}: revision {from} ({}) {}, revision {} runs: {}",
            view.app, s.strategy, s.phase, s.revision, s.message
        ),
        None => format!(
            "app {}: revision {} ({}) {}{paused}: {}",
            view.app, s.revision, s.strategy, s.phase, s.message
        ),
    };
    for c in &view.revisions {
        out.push_str(&format!(
            "\n  revision {}: {}/{} ready",
            c.revision, c.ready, c.replicas
        ));
    }
    if let (Some(0), Some(from)) = (view.weight, s.rolled_back_from)
        && view.revisions.iter().any(|c| c.revision == from)
    {
        out.push_str(&format!(
            "\n  traffic: 0% to revision {from} while its replicas are removed"
        ));
    }
    if let (Some(w), Some(c), Some(st)) = (view.weight, &view.canary, &view.stable) {
        out.push_str(&format!(
            "\n  traffic: {w}% canary | canary {} | stable {}",
            stats(c),
            stats(st)
        ));
    }
    out
}

fn stats(s: &RevisionStats) -> String {
    let p99 = s
        .latency
        .quantile(0.99)
        .map_or("-".to_string(), |p| format!("{p} ms"));
    format!(
        "{} req, {:.1}% errors, p99 {p99}",
        s.requests,
        s.error_rate() * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::RevisionCount;
    use shoal_core::spec::{AppKey, Strategy};

    /// After a canary is aborted, its replicas take no request while they are removed, and
    /// `rollout status` says so rather than nothing.
    #[test]
    fn an_aborted_canarys_replicas_are_shown_taking_no_traffic() {
        let app = AppKey::new("default", "web");
        let status = RolloutStatus {
            app: app.clone(),
            revision: 1,
            stable: Some(1),
            strategy: Strategy::Canary,
            phase: RolloutPhase::Aborted,
            paused: false,
            step: 0,
            step_started_at: None,
            ready: 4,
            progressed_at: 0,
            started_at: 0,
            rolled_back_from: Some(2),
            previous_stable: None,
            message: "canary error rate".into(),
        };
        let count = |revision, n| RevisionCount {
            revision,
            replicas: n,
            ready: n,
        };
        let mut view = RolloutView {
            app,
            revision: 1,
            kind: Kind::Http,
            desired: 4,
            status: Some(status),
            steps: 2,
            weight: Some(0),
            revisions: vec![count(2, 1), count(1, 4)],
            canary: None,
            stable: None,
        };
        let said = describe(&view);
        assert!(
            said.ends_with("\n  traffic: 0% to revision 2 while its replicas are removed"),
            "{said}"
        );
        view.revisions.remove(0);
        assert!(!describe(&view).contains("traffic"), "{}", describe(&view));
    }
}
