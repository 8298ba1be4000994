use super::Context;
use crate::client::Client;
use crate::output::{self, Format, age, short_digest, table};
use anyhow::Result;
use shoal_api::{
    AppSummary, ConfigSetView, JobSummary, NodeSummary, ScaleView, SecretView, Service, VolumeView,
    seg,
};
use shoal_core::quantity::format_memory;
use shoal_core::{Event, Module, NodeState, Replica};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal get apps                                  NAME KIND REVISION READY … in the namespace
  shoal get app hello -o json                     one app, as an object (exit 3 if none)
  shoal get replicas --app hello -w               then each change as it happens
  shoal get apps -A -o json                       every namespace, for scripts
  shoal get app hello -o toml > hello.toml        its spec as a file, for `shoal apply -f`")]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    what: What,
    /// Only the one with this name (a module: its digest), as `kubectl get KIND NAME`;
    /// `-o json` then prints it as an object, not a list.
    name: Option<String>,
    /// Only this app's replicas or events.
    #[arg(long)]
    #[arg(value_parser = crate::commands::object_name)]
    app: Option<String>,
    /// Every namespace, with a NAMESPACE column, instead of `-n`'s.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// After the list, print each change as it happens, until interrupted (as `kubectl get
    /// -w`): a new or changed row, or a gone one marked `(deleted)`.
    #[arg(short = 'w', long)]
    watch: bool,
    /// Nodes: a LABELS column, `k=v,k=v` (as `kubectl get nodes --show-labels`).
    #[arg(long)]
    show_labels: bool,
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
    #[value(alias = "server")]
    Servers,
    #[value(alias = "pool")]
    Pools,
    #[value(alias = "event")]
    Events,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "secret")]
    Secrets,
    /// Config sets (`shoal config`).
    #[value(alias = "config")]
    Configs,
    #[value(alias = "volume")]
    Volumes,
}

impl What {
    /// One of them, for messages.
    fn singular(self) -> &'static str {
        match self {
            What::Apps => "app",
            What::Jobs => "job",
            What::Replicas => "replica",
            What::Modules => "module",
            What::Nodes => "node",
            What::Servers => "server",
            What::Pools => "pool",
            What::Events => "event",
            What::Services => "service",
            What::Secrets => "secret",
            What::Configs => "config set",
            What::Volumes => "volume",
        }
    }
}

pub async fn run(ctx: Context, args: GetArgs) -> Result<()> {
    if ctx.spec_toml {
        return spec_file(&ctx, &args).await;
    }
    if args.show_labels && !matches!(args.what, What::Nodes) {
        return Err(crate::exit::usage(
            "--show-labels is for nodes: they are what carries labels".into(),
        ));
    }
    if let Some(name) = &args.name {
        if matches!(args.what, What::Events) {
            return Err(crate::exit::usage(format!(
                "events have no names: `shoal get events` lists them, not {name}"
            )));
        }
        if args.all_namespaces {
            return Err(crate::exit::usage(
                "a name is looked up in one namespace: give -n, not -A".into(),
            ));
        }
    }
    let client = ctx.client()?;
    let first = list(&ctx, &client, &args).await?;
    if let Some(name) = &args.name
        && first.rows.is_empty()
    {
        let namespace = match first.namespaces {
            Some(_) => format!(" in namespace {}", ctx.namespace),
            None => String::new(),
        };
        return Err(crate::exit::fail(
            crate::exit::NOT_FOUND,
            format!("{} {name} not found{namespace}", args.what.singular()),
        ));
    }
    let all = args.all_namespaces;
    if ctx.output == Format::Json {
        output::json(&first.json);
    } else {
        first.print(all);
    }
    if !args.watch {
        return Ok(());
    }
    output::end_when_stdout_closes();
    // As `kubectl get -w`: what changes from then on, a row at a time (a watch event at a
    // time with `-o json`); a change of age alone is none.
    let widths = output::widths(&first.header(all), &first.rows(all));
    let mut shown = first;
    let mut tick = tokio::time::interval(WATCH_PERIOD);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = client.patiently(|| list(&ctx, &client, &args)).await?;
        if ctx.output == Format::Json {
            for change in json_changes(&shown, &now) {
                println!("{}", serde_json::to_string(&change)?);
            }
        } else {
            let before = shown.settled();
            let (rows, after) = (now.rows(all), now.settled());
            for (row, key) in rows.iter().zip(&after) {
                if !before.contains(key) {
                    output::print_row(&widths, row);
                }
            }
            // Gone (what has a name: events only pass): shown once more, marked.
            let named = matches!(shown.header.first(), Some(&"NAME" | &"DIGEST"));
            for (row, key) in shown.rows(all).iter().zip(&before) {
                if named && !after.iter().any(|k| k[..2] == key[..2]) {
                    let mut row = row.clone();
                    if let Some(last) = row.last_mut() {
                        last.push_str(" (deleted)");
                    }
                    output::print_row(&widths, &row);
                }
            }
        }
        shown = now;
    }
}

/// What `get -w -o json` prints for the changes from `before` to `after`: a document per
/// object added, changed or gone, as `kubectl get -w -o json --output-watch-events` does
/// (`{"type": "ADDED" | "MODIFIED" | "DELETED", "object": …}`); events are only added.
fn json_changes(before: &Listing, after: &Listing) -> Vec<serde_json::Value> {
    fn objects(json: &serde_json::Value) -> Vec<&serde_json::Value> {
        match json {
            serde_json::Value::Array(items) => items.iter().collect(),
            serde_json::Value::Null => Vec::new(),
            one => vec![one],
        }
    }
    let (was, is) = (before.settled(), after.settled());
    let (old, new) = (objects(&before.json), objects(&after.json));
    let change = |kind: &str, object: &serde_json::Value| serde_json::json!({ "type": kind, "object": object });
    // Named rows (not events) are one object over time: its namespace and name.
    let named = matches!(after.header.first(), Some(&"NAME" | &"DIGEST"));
    let same = |a: &[String], b: &[String]| named && a[..2] == b[..2];
    let mut changes: Vec<serde_json::Value> = is
        .iter()
        .zip(&new)
        .filter(|(key, _)| !was.contains(key))
        .map(|(key, object)| {
            let kind = if was.iter().any(|k| same(k, key)) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            change(kind, object)
        })
        .collect();
    if named {
        changes.extend(
            was.iter()
                .zip(&old)
                .filter(|(key, _)| !is.iter().any(|k| same(k, key)))
                .map(|(_, object)| change("DELETED", object)),
        );
    }
    changes
}

/// How often `get -w` looks again.
const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Columns whose change alone is no change to show: ages and times to come.
const VOLATILE: &[&str] = &["AGE", "HEARTBEAT", "LAST RUN", "NEXT", "UPDATED"];

/// What one `get` shows: its JSON, and its table.
struct Listing {
    json: serde_json::Value,
    header: &'static [&'static str],
    /// Each row's namespace, for `-A`'s first column; `None`: what belongs to no namespace.
    namespaces: Option<Vec<String>>,
    rows: Vec<Vec<String>>,
    /// What tells rows apart that reads alike: an event's number (a node cordoned twice is
    /// two events). Empty: the row's cells do.
    ids: Vec<String>,
}

impl Listing {
    /// Only the rows whose first column (the name, or a module's digest) is `name`, and
    /// their JSON: the one object, or `null` when there is none.
    fn only(self, name: &str) -> Listing {
        let keep: Vec<bool> = self.rows.iter().map(|r| r[0] == name).collect();
        fn kept<T>(items: Vec<T>, keep: &[bool]) -> Vec<T> {
            items
                .into_iter()
                .zip(keep)
                .filter_map(|(x, k)| k.then_some(x))
                .collect()
        }
        let json = match self.json {
            serde_json::Value::Array(items) => kept(items, &keep).pop(),
            other => Some(other),
        };
        Listing {
            json: json.unwrap_or(serde_json::Value::Null),
            header: self.header,
            namespaces: self.namespaces.map(|n| kept(n, &keep)),
            rows: kept(self.rows, &keep),
            ids: kept(self.ids, &keep),
        }
    }

    fn plain(
        json: serde_json::Value,
        header: &'static [&'static str],
        rows: Vec<Vec<String>>,
    ) -> Listing {
        Listing {
            json,
            header,
            namespaces: None,
            rows,
            ids: Vec::new(),
        }
    }

    fn namespaced<'a>(
        json: serde_json::Value,
        header: &'static [&'static str],
        namespaces: impl Iterator<Item = &'a str>,
        rows: Vec<Vec<String>>,
    ) -> Listing {
        Listing {
            json,
            header,
            namespaces: Some(namespaces.map(str::to_string).collect()),
            rows,
            ids: Vec::new(),
        }
    }

    /// With every namespace asked for (`-A`), a NAMESPACE column first, as kubectl shows it.
    fn header(&self, all: bool) -> Vec<&'static str> {
        let ns = (all && self.namespaces.is_some()).then_some("NAMESPACE");
        ns.into_iter().chain(self.header.iter().copied()).collect()
    }

    fn rows(&self, all: bool) -> Vec<Vec<String>> {
        match (&self.namespaces, all) {
            (Some(namespaces), true) => namespaces
                .iter()
                .zip(&self.rows)
                .map(|(ns, row)| {
                    std::iter::once(ns.clone())
                        .chain(row.iter().cloned())
                        .collect()
                })
                .collect(),
            _ => self.rows.clone(),
        }
    }

    fn print(&self, all: bool) {
        match &self.namespaces {
            Some(namespaces) => ns_table(
                all,
                self.header,
                namespaces.iter().map(String::as_str),
                self.rows.clone(),
            ),
            None => table(self.header, &self.rows),
        }
    }

    /// Each row with its namespace first and the volatile columns left out: what tells
    /// whether a row changed. Its first two cells name the row.
    fn settled(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let ns = self.namespaces.as_ref().map_or("", |n| n[i].as_str());
                std::iter::once(ns.to_string())
                    .chain(
                        row.iter()
                            .zip(self.header)
                            .filter(|(_, h)| !VOLATILE.contains(h))
                            .map(|(cell, _)| cell.clone()),
                    )
                    .chain(self.ids.get(i).cloned())
                    .collect()
            })
            .collect()
    }
}

/// What `args` asks for, read once.
async fn list(ctx: &Context, client: &Client, args: &GetArgs) -> Result<Listing> {
    let all = args.all_namespaces;
    let ns = if all {
        String::new()
    } else {
        format!("namespace={}", seg(&ctx.namespace))
    };
    let app_q = args
        .app
        .as_deref()
        .map(|a| format!("&app={}", seg(a)))
        .unwrap_or_default();
    let listing = match args.what {
        What::Apps => {
            let apps: Vec<AppSummary> = client.get(&format!("/v1/apps?{ns}")).await?;
            let json = serde_json::to_value(&apps)?;
            let rows: Vec<Vec<String>> = apps
                .iter()
                .map(|a| {
                    // Like `kubectl get hpa`: bounds, and load against the target.
                    let (scale, load) = match &a.autoscale {
                        Some(s) => (format!("{}-{}", s.min, s.max), load_column(a.ready, s)),
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
            Listing::namespaced(
                json,
                &[
                    "NAME", "KIND", "REVISION", "READY", "SCALE", "LOAD", "WINDOW", "ROUTES",
                    "MODULE", "AGE",
                ],
                apps.iter().map(|a| a.namespace.as_str()),
                rows,
            )
        }
        What::Jobs => {
            let jobs: Vec<JobSummary> = client.get(&format!("/v1/jobs?{ns}")).await?;
            let json = serde_json::to_value(&jobs)?;
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
            Listing::namespaced(
                json,
                &["NAME", "SCHEDULE", "ACTIVE", "LAST RUN", "NEXT", "AGE"],
                jobs.iter().map(|j| j.namespace.as_str()),
                rows,
            )
        }
        What::Replicas => {
            let replicas: Vec<Replica> = client.get(&format!("/v1/replicas?{ns}{app_q}")).await?;
            let json = serde_json::to_value(&replicas)?;
            Listing::namespaced(
                json,
                &[
                    "NAME", "APP", "REVISION", "NODE", "PHASE", "RESTARTS", "AGE", "MESSAGE",
                ],
                replicas.iter().map(|r| r.app.namespace.as_str()),
                replica_rows(&replicas),
            )
        }
        What::Volumes => {
            let volumes: Vec<VolumeView> = client.get(&format!("/v1/volumes?{ns}")).await?;
            let json = serde_json::to_value(&volumes)?;
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
            Listing::namespaced(
                json,
                &["NAME", "NODE", "SIZE", "USED", "USED BY", "AGE"],
                volumes.iter().map(|v| v.namespace.as_str()),
                rows,
            )
        }
        What::Secrets => {
            let secrets: Vec<SecretView> = client.get(&format!("/v1/secrets?{ns}")).await?;
            Listing::namespaced(
                serde_json::to_value(&secrets)?,
                super::secret::SECRET_COLUMNS,
                secrets.iter().map(|s| s.namespace.as_str()),
                super::secret::secret_rows(&secrets),
            )
        }
        What::Configs => {
            let sets: Vec<ConfigSetView> = client.get(&format!("/v1/configs?{ns}")).await?;
            Listing::namespaced(
                serde_json::to_value(&sets)?,
                super::config::CONFIG_COLUMNS,
                sets.iter().map(|s| s.namespace.as_str()),
                super::config::config_rows(&sets),
            )
        }
        What::Modules => {
            ctx.no_namespace("modules")?;
            let modules: Vec<Module> = client.get("/v1/modules").await?;
            let json = serde_json::to_value(&modules)?;
            let rows: Vec<Vec<String>> = modules
                .iter()
                .map(|m| {
                    vec![
                        m.digest.clone(),
                        m.kind.to_string(),
                        m.size.to_string(),
                        age(m.uploaded_at),
                        m.oci.as_ref().map_or_else(
                            || "upload".to_string(),
                            |o| format!("{} ({})", o.reference, o.manifest),
                        ),
                    ]
                })
                .collect();
            Listing::plain(json, &["DIGEST", "KIND", "BYTES", "AGE", "SOURCE"], rows)
        }
        What::Servers => {
            ctx.no_namespace("servers")?;
            let servers: Vec<shoal_api::ServerSummary> = client.get("/v1/servers").await?;
            let json = serde_json::to_value(&servers)?;
            let rows = servers
                .iter()
                .map(|s| {
                    let role = if s.leader { "leader" } else { "follower" };
                    vec![s.url.clone(), role.to_string()]
                })
                .collect();
            Listing::plain(json, &["URL", "ROLE"], rows)
        }
        What::Nodes => {
            ctx.no_namespace("nodes")?;
            let nodes: Vec<NodeSummary> = client.get("/v1/nodes").await?;
            let json = serde_json::to_value(&nodes)?;
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node.name.clone(),
                        node_state(n),
                        format!(
                            "{}m/{}m",
                            n.allocated.cpu_millis, n.node.capacity.cpu_millis
                        ),
                        format!(
                            "{}/{}",
                            format_memory(n.allocated.memory_bytes),
                            format_memory(n.node.capacity.memory_bytes)
                        ),
                        format!(
                            "{}/{}",
                            n.instances_alive.map_or("-".into(), |a| a.to_string()),
                            n.node.capacity.instances
                        ),
                        n.replicas.to_string(),
                        n.node.gateway.clone(),
                        age(n.last_heartbeat),
                    ]
                })
                .collect();
            let header: &'static [&'static str] = &[
                "NAME",
                "STATE",
                "CPU",
                "MEMORY",
                "INSTANCES",
                "REPLICAS",
                "GATEWAY",
                "HEARTBEAT",
                "LABELS",
            ];
            match args.show_labels {
                false => Listing::plain(json, &header[..header.len() - 1], rows),
                true => {
                    let rows = rows
                        .into_iter()
                        .zip(&nodes)
                        .map(|(mut row, n)| {
                            let labels: Vec<String> = n
                                .node
                                .labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect();
                            row.push(match labels.is_empty() {
                                true => "<none>".into(),
                                false => labels.join(","),
                            });
                            row
                        })
                        .collect();
                    Listing::plain(json, header, rows)
                }
            }
        }
        What::Pools => {
            ctx.no_namespace("pools")?;
            let pools: Vec<shoal_core::Pool> = client.get("/v1/pools").await?;
            let json = serde_json::to_value(&pools)?;
            // A member counts as ready once its worker has joined and is up: one whose
            // provider failed, or that is still starting, does not.
            let nodes: Vec<NodeSummary> = client.get("/v1/nodes").await?;
            let up: std::collections::HashSet<&str> = nodes
                .iter()
                .filter(|n| !n.silent && n.node.state == NodeState::Ready)
                .map(|n| n.node.name.as_str())
                .collect();
            let rows: Vec<Vec<String>> = pools
                .iter()
                .map(|p| {
                    // Retiring: being drained or stopped.
                    let retiring = p.members.values().filter(|m| !m.live()).count();
                    let ready = p
                        .members
                        .iter()
                        .filter(|(n, m)| m.live() && up.contains(n.as_str()))
                        .count();
                    let nodes = p.members.keys().cloned().collect::<Vec<_>>().join(",");
                    vec![
                        p.name.clone(),
                        p.spec.min.to_string(),
                        p.spec.max.to_string(),
                        format!("{ready}/{}", p.members.len() - retiring),
                        retiring.to_string(),
                        p.spec.provider.clone().unwrap_or_else(|| "local".into()),
                        if p.spec.labels.is_empty() {
                            "<none>".into()
                        } else {
                            p.spec
                                .labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                        if nodes.is_empty() {
                            "<none>".into()
                        } else {
                            nodes
                        },
                    ]
                })
                .collect();
            Listing::plain(
                json,
                &[
                    "NAME", "MIN", "MAX", "READY", "RETIRING", "PROVIDER", "LABELS", "MEMBERS",
                ],
                rows,
            )
        }
        What::Services => {
            let services: Vec<Service> = client.get(&format!("/v1/services?{ns}")).await?;
            let json = serde_json::to_value(&services)?;
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
                        match s.callers.is_empty() {
                            true => "-".into(),
                            false => s.callers.join(","),
                        },
                        endpoints.len().to_string(),
                        endpoints.join(","),
                    ]
                })
                .collect();
            Listing::namespaced(
                json,
                &["NAME", "HOST", "ROUTES", "CALLERS", "READY", "ENDPOINTS"],
                services.iter().map(|s| s.namespace.as_str()),
                rows,
            )
        }
        What::Events => {
            let events: Vec<Event> = client.get(&format!("/v1/events?{ns}{app_q}")).await?;
            let json = serde_json::to_value(&events)?;
            Listing {
                ids: events.iter().map(|e| e.seq.to_string()).collect(),
                ..Listing::namespaced(
                    json,
                    &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
                    events
                        .iter()
                        .map(|e| e.app.as_ref().map_or("-", |a| a.namespace.as_str())),
                    event_rows(&events),
                )
            }
        }
    };
    Ok(match &args.name {
        Some(name) if matches!(args.what, What::Modules) => {
            let digest = module_digest(&listing, name)?;
            listing.only(&digest)
        }
        Some(name) => listing.only(name),
        None => listing,
    })
}

/// The module `given` names in `listing` (of modules): its digest, or as `get apps` and `get
/// modules` shorten it, `sha256:` and at least 8 of its first hex digits, as `delete module`
/// takes it. A prefix that starts no digest, or not a digest at all, is left as given (not
/// found); one that starts several is not enough.
fn module_digest(listing: &Listing, given: &str) -> Result<String> {
    let short = given
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() >= 8);
    let mut matching = listing
        .rows
        .iter()
        .map(|r| r[0].as_str())
        .filter(|d| *d == given || (short && d.starts_with(given)));
    match (matching.next(), matching.next()) {
        (Some(digest), None) => Ok(digest.to_string()),
        (None, _) => Ok(given.to_string()),
        (Some(_), Some(_)) => Err(crate::exit::usage(format!(
            "{given} starts the digests of several modules: give more of it"
        ))),
    }
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

/// A node's STATE as `get nodes` and `describe node` show it: Ready, NotReady or Unknown
/// (silent), then Cordoned, Draining, Leaving or Left.
pub fn node_state(n: &NodeSummary) -> String {
    let state = match n.silent {
        true => "Unknown".to_string(),
        false => format!("{:?}", n.node.state),
    };
    // A node that drained itself as it shut down: Leaving while it still runs, Left once it
    // stopped (it is schedulable again when it starts).
    let up = !n.silent && n.node.state == NodeState::Ready;
    let leaving = n.node.leaving.is_some();
    match (n.node.schedulable, n.node.draining, leaving) {
        (true, _, _) => state,
        (false, _, true) if up => format!("{state},Cordoned,Leaving"),
        (false, _, true) => format!("{state},Left"),
        (false, false, false) => format!("{state},Cordoned"),
        (false, true, false) => format!("{state},Cordoned,Draining"),
    }
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
                // The node's word on it first; else the controller's.
                r.message
                    .clone()
                    .or_else(|| r.note.clone())
                    .unwrap_or_default(),
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

/// `get app NAME -o toml`: the app's spec as the file that makes it, as `kubectl get -o yaml`
/// gives back a manifest (see `AppSpec::to_toml`).
async fn spec_file(ctx: &Context, args: &GetArgs) -> Result<()> {
    let (Some(name), What::Apps | What::Jobs, false, false) =
        (&args.name, args.what, args.watch, args.all_namespaces)
    else {
        return Err(crate::exit::usage(
            "-o toml writes one app's spec as a file: `shoal get app NAME -o toml` (no -w, no -A)"
                .into(),
        ));
    };
    let d: shoal_api::Describe = ctx
        .client()?
        .get(&format!(
            "/v1/apps/{}?namespace={}",
            seg(name),
            seg(&ctx.namespace)
        ))
        .await?;
    if matches!(args.what, What::Jobs) && d.app.spec.component.kind != shoal_core::Kind::Job {
        return Err(crate::exit::fail(
            crate::exit::NOT_FOUND,
            format!(
                "job {name} not found in namespace {} (it is an app)",
                ctx.namespace
            ),
        ));
    }
    output::write_stdout(d.app.spec.to_toml().as_bytes())
}

/// `get apps`' LOAD of an autoscaled app with `ready` replicas: in flight per ready replica
/// against the target per replica, as `kubectl get hpa` sets an average beside its target
/// (the app's total against a replica's target read as many times over).
fn load_column(ready: usize, s: &ScaleView) -> String {
    let per_replica = s
        .concurrency
        .map_or("-".into(), |c| format!("{:.1}", c / ready.max(1) as f64));
    format!("{per_replica}/{}", s.target_concurrency)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn load_is_per_ready_replica_against_the_target() {
        let view = |concurrency| ScaleView {
            min: 0,
            max: 4,
            target_concurrency: 2,
            concurrency,
        };
        assert_eq!(load_column(4, &view(Some(12.0))), "3.0/2");
        assert_eq!(load_column(0, &view(Some(1.5))), "1.5/2");
        assert_eq!(load_column(1, &view(None)), "-/2");
    }

    fn apps(list: &[(&str, &str)]) -> Listing {
        let json = list
            .iter()
            .map(|(name, ready)| json!({ "name": name, "ready": ready }))
            .collect();
        let rows = list
            .iter()
            .map(|(name, ready)| vec![name.to_string(), ready.to_string(), "5s".into()])
            .collect();
        Listing::plain(json, &["NAME", "READY", "AGE"], rows)
    }

    /// `get -w -o json`: one document per object that came, changed or went, as kubectl's
    /// watch events; an age going by is no change.
    #[test]
    fn a_json_watch_prints_each_change_as_an_event() {
        let before = apps(&[("a", "1/1"), ("b", "0/1"), ("c", "1/1")]);
        let mut after = apps(&[("b", "1/1"), ("c", "1/1"), ("d", "0/1")]);
        after.rows[1][2] = "6s".into();
        let changes = json_changes(&before, &after);
        assert_eq!(
            changes,
            [
                json!({ "type": "MODIFIED", "object": { "name": "b", "ready": "1/1" } }),
                json!({ "type": "ADDED", "object": { "name": "d", "ready": "0/1" } }),
                json!({ "type": "DELETED", "object": { "name": "a", "ready": "1/1" } }),
            ]
        );
        assert!(json_changes(&after, &after).is_empty());
    }
}
