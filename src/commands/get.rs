use super::Context;
use crate::output::{self, Format, age, short_digest, table};
use anyhow::Result;
use shoal_api::{AppSummary, JobSummary, NodeSummary, SecretView, Service, VolumeView};
use shoal_core::quantity::format_memory;
use shoal_core::{Event, Module, Replica};

#[derive(clap::Args)]
pub struct GetArgs {
    #[arg(value_enum)]
    what: What,
    /// Only this app's replicas or events.
    #[arg(long)]
    app: Option<String>,
    /// Every namespace, with a NAMESPACE column, instead of `-n`'s.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    #[value(alias = "app")]
    Apps,
    #[value(alias = "job")]
    Jobs,
    #[value(alias = "replica")]
    Replicas,
    #[value(alias = "module")]
    Modules,
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "event")]
    Events,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "secret")]
    Secrets,
    #[value(alias = "volume")]
    Volumes,
}

pub async fn run(ctx: Context, args: GetArgs) -> Result<()> {
    let client = ctx.client()?;
    let all = args.all_namespaces;
    let ns = if all {
        String::new()
    } else {
        format!("namespace={}", ctx.namespace)
    };
    let app_q = args
        .app
        .as_deref()
        .map(|a| format!("&app={a}"))
        .unwrap_or_default();
    match args.what {
        What::Apps => {
            let apps: Vec<AppSummary> = client.get(&format!("/v1/apps?{ns}")).await?;
            if ctx.output == Format::Json {
                output::json(&apps);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = apps
                .iter()
                .map(|a| {
                    // Like `kubectl get hpa`: bounds, and load against the target.
                    let (scale, load) = match &a.autoscale {
                        Some(s) => (
                            format!("{}-{}", s.min, s.max),
                            format!(
                                "{}/{}",
                                s.concurrency.map_or("-".into(), |c| format!("{c:.1}")),
                                s.target_concurrency
                            ),
                        ),
                        None => ("fixed".into(), "-".into()),
                    };
                    let window = if a.windows.is_empty() {
                        "-".into()
                    } else {
                        a.windows.join(",")
                    };
                    vec![
                        a.name.clone(),
                        a.kind.to_string(),
                        a.revision.to_string(),
                        format!("{}/{}", a.ready, a.desired),
                        scale,
                        load,
                        window,
                        a.routes.join(","),
                        short_digest(&a.digest),
                        age(a.created_at),
                    ]
                })
                .collect();
            ns_table(
                all,
                &[
                    "NAME", "KIND", "REVISION", "READY", "SCALE", "LOAD", "WINDOW", "ROUTES",
                    "MODULE", "AGE",
                ],
                apps.iter().map(|a| a.namespace.as_str()),
                rows,
            );
        }
        What::Jobs => {
            let jobs: Vec<JobSummary> = client.get(&format!("/v1/jobs?{ns}")).await?;
            if ctx.output == Format::Json {
                output::json(&jobs);
                return Ok(());
            }
            let now = shoal_core::now_ms();
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|j| {
                    let schedule = j
                        .schedule
                        .as_ref()
                        .map_or("-".into(), |s| format!("{s} ({})", j.timezone));
                    let last = j.last_run.as_ref().map_or("-".into(), |r| {
                        format!("{} ({} ago)", r.phase, age(r.created_at))
                    });
                    let next = match (j.run_requested, j.next) {
                        (Some(_), _) => "now (requested)".into(),
                        (None, Some(t)) => {
                            format!("in {}", output::duration(t.saturating_sub(now)))
                        }
                        (None, None) => "-".into(),
                    };
                    vec![
                        j.name.clone(),
                        schedule,
                        j.active.to_string(),
                        last,
                        next,
                        age(j.created_at),
                    ]
                })
                .collect();
            ns_table(
                all,
                &["NAME", "SCHEDULE", "ACTIVE", "LAST RUN", "NEXT", "AGE"],
                jobs.iter().map(|j| j.namespace.as_str()),
                rows,
            );
        }
        What::Replicas => {
            let replicas: Vec<Replica> = client.get(&format!("/v1/replicas?{ns}{app_q}")).await?;
            if ctx.output == Format::Json {
                output::json(&replicas);
                return Ok(());
            }
            ns_table(
                all,
                &[
                    "NAME", "APP", "REVISION", "NODE", "PHASE", "RESTARTS", "AGE", "MESSAGE",
                ],
                replicas.iter().map(|r| r.app.namespace.as_str()),
                replica_rows(&replicas),
            );
        }
        What::Volumes => {
            let volumes: Vec<VolumeView> = client.get(&format!("/v1/volumes?{ns}")).await?;
            if ctx.output == Format::Json {
                output::json(&volumes);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.node.clone().unwrap_or_else(|| "-".into()),
                        format_memory(v.size_bytes),
                        v.used_bytes.map_or_else(|| "-".into(), format_memory),
                        v.used_by.join(","),
                        age(v.created_at),
                    ]
                })
                .collect();
            ns_table(
                all,
                &["NAME", "NODE", "SIZE", "USED", "USED BY", "AGE"],
                volumes.iter().map(|v| v.namespace.as_str()),
                rows,
            );
        }
        What::Secrets => {
            let secrets: Vec<SecretView> = client.get(&format!("/v1/secrets?{ns}")).await?;
            if all && ctx.output != Format::Json {
                let rows = super::secret::secret_rows(&secrets);
                ns_table(
                    true,
                    super::secret::SECRET_COLUMNS,
                    secrets.iter().map(|s| s.namespace.as_str()),
                    rows,
                );
            } else {
                super::secret::print_secrets(&ctx, &secrets);
            }
        }
        What::Modules => {
            let modules: Vec<Module> = client.get("/v1/modules").await?;
            if ctx.output == Format::Json {
                output::json(&modules);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = modules
                .iter()
                .map(|m| {
                    vec![
                        m.digest.clone(),
                        m.kind.to_string(),
                        m.size.to_string(),
                        age(m.uploaded_at),
                    ]
                })
                .collect();
            table(&["DIGEST", "KIND", "BYTES", "AGE"], &rows);
        }
        What::Nodes => {
            let nodes: Vec<NodeSummary> = client.get("/v1/nodes").await?;
            if ctx.output == Format::Json {
                output::json(&nodes);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let state = match (n.node.schedulable, n.node.draining) {
                        (true, _) => format!("{:?}", n.node.state),
                        (false, false) => format!("{:?},Cordoned", n.node.state),
                        (false, true) => format!("{:?},Cordoned,Draining", n.node.state),
                    };
                    vec![
                        n.node.name.clone(),
                        state,
                        format!(
                            "{}m/{}m",
                            n.allocated.cpu_millis, n.node.capacity.cpu_millis
                        ),
                        format!(
                            "{}/{}",
                            format_memory(n.allocated.memory_bytes),
                            format_memory(n.node.capacity.memory_bytes)
                        ),
                        format!("{}/{}", n.allocated.instances, n.node.capacity.instances),
                        n.replicas.to_string(),
                        n.node.gateway.clone(),
                        age(n.last_heartbeat),
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "STATE",
                    "CPU",
                    "MEMORY",
                    "INSTANCES",
                    "REPLICAS",
                    "GATEWAY",
                    "HEARTBEAT",
                ],
                &rows,
            );
        }
        What::Services => {
            let services: Vec<Service> = client.get(&format!("/v1/services?{ns}")).await?;
            if ctx.output == Format::Json {
                output::json(&services);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = services
                .iter()
                .map(|s| {
                    let endpoints: Vec<String> = s
                        .endpoints
                        .iter()
                        .map(|e| format!("{}@{}", e.replica, e.node))
                        .collect();
                    vec![
                        s.name.clone(),
                        s.host.clone(),
                        s.routes.join(","),
                        endpoints.len().to_string(),
                        endpoints.join(","),
                    ]
                })
                .collect();
            ns_table(
                all,
                &["NAME", "HOST", "ROUTES", "READY", "ENDPOINTS"],
                services.iter().map(|s| s.namespace.as_str()),
                rows,
            );
        }
        What::Events => {
            let events: Vec<Event> = client.get(&format!("/v1/events?{ns}{app_q}")).await?;
            if ctx.output == Format::Json {
                output::json(&events);
                return Ok(());
            }
            ns_table(
                all,
                &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
                events
                    .iter()
                    .map(|e| e.app.as_ref().map_or("-", |a| a.namespace.as_str())),
                event_rows(&events),
            );
        }
    }
    Ok(())
}

/// `table`, with each row's namespace in a first NAMESPACE column when every namespace was
/// asked for (`-A`), as kubectl shows it.
pub fn ns_table<'a>(
    all: bool,
    header: &[&str],
    namespaces: impl Iterator<Item = &'a str>,
    rows: Vec<Vec<String>>,
) {
    if !all {
        table(header, &rows);
        return;
    }
    let header: Vec<&str> = std::iter::once("NAMESPACE")
        .chain(header.iter().copied())
        .collect();
    let rows: Vec<Vec<String>> = namespaces
        .zip(rows)
        .map(|(ns, row)| std::iter::once(ns.to_string()).chain(row).collect())
        .collect();
    table(&header, &rows);
}

pub fn replica_rows(replicas: &[Replica]) -> Vec<Vec<String>> {
    replicas
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.app.name.clone(),
                r.revision.to_string(),
                r.node.clone().unwrap_or_else(|| "<none>".into()),
                r.phase.to_string(),
                r.restarts.to_string(),
                age(r.created_at),
                r.message.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

pub fn event_rows(events: &[Event]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                age(e.time),
                format!("{:?}", e.kind),
                e.reason.clone(),
                e.object.clone(),
                e.message.clone(),
            ]
        })
        .collect()
}
