//! `shoal quota`: caps on what a namespace's apps ask for together, as Kubernetes'
//! ResourceQuota.

use super::Context;
use crate::output::{self, Format};
use anyhow::Result;
use shoal_api::{Cap, QuotaPatch, QuotaView, seg};
use shoal_core::quantity::{format_memory, parse_cpu, parse_memory};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal quota set team-a --apps 20 --replicas 50 --cpu 4 --memory 8Gi
  shoal quota set team-a --cpu 8 --memory none    one cap changed, one taken away, the rest kept
  shoal quota get                                 NAMESPACE APPS REPLICAS CPU MEMORY, used/cap
  shoal quota delete team-a")]
pub struct QuotaCommand {
    #[command(subcommand)]
    action: QuotaAction,
}

#[derive(clap::Subcommand)]
enum QuotaAction {
    /// Set caps of a namespace's quota (admin), keeping those not given. An apply, scale or
    /// rollback that would take the namespace past one is refused (exit 6); what runs past a
    /// lowered cap keeps running. Apps count at their most replicas: autoscaled, their max
    /// or a schedule window's largest bound; else their replicas, or a window's min above them.
    Set {
        /// The namespace (or `-n`).
        #[arg(value_name = "NAMESPACE", value_parser = crate::commands::object_name)]
        ns: Option<String>,
        /// Apps in the namespace at most; `none`: no cap.
        #[arg(long, value_name = "N|none")]
        apps: Option<String>,
        /// Replicas its apps may run together at most; `none`: no cap.
        #[arg(long, value_name = "N|none")]
        replicas: Option<String>,
        /// CPU its replicas may request together, e.g. 4 or 4000m; `none`: no cap.
        #[arg(long, value_name = "CPU|none")]
        cpu: Option<String>,
        /// Memory its replicas may request together, e.g. 8Gi; `none`: no cap.
        #[arg(long, value_name = "BYTES|none")]
        memory: Option<String>,
    },
    /// The quotas (of one namespace, or all), with what their apps ask for.
    Get {
        /// The namespace (or `-n`; neither: every namespace's).
        #[arg(value_name = "NAMESPACE", value_parser = crate::commands::object_name)]
        ns: Option<String>,
    },
    /// Take a namespace's quota away (admin).
    Delete {
        /// The namespace (or `-n`).
        #[arg(value_name = "NAMESPACE", value_parser = crate::commands::object_name)]
        ns: Option<String>,
    },
}

/// The namespace a command names, by argument or `-n`.
fn namespace(ctx: &Context, ns: Option<String>) -> Result<Option<String>> {
    let flag = ctx.namespace_given.then(|| ctx.namespace.clone());
    match (ns, flag) {
        (Some(a), Some(f)) if a != f => Err(crate::exit::usage(format!(
            "namespace {a} and -n {f} disagree: name one"
        ))),
        (ns, flag) => Ok(ns.or(flag)),
    }
}

/// The namespace a command must name.
fn named(ctx: &Context, ns: Option<String>) -> Result<String> {
    namespace(ctx, ns)?.ok_or_else(|| {
        crate::exit::usage(
            "name the namespace: shoal quota set|delete NAMESPACE (or -n NAMESPACE)".into(),
        )
    })
}

/// Each command says a usage error (a namespace not named, a cap that does not parse) before
/// it reads the CLI config.
pub async fn run(ctx: Context, cmd: QuotaCommand) -> Result<()> {
    match cmd.action {
        QuotaAction::Set {
            ns,
            apps,
            replicas,
            cpu,
            memory,
        } => {
            let namespace = named(&ctx, ns)?;
            // The server merges it into the quota as stored: caps not given stay.
            let patch = QuotaPatch {
                apps: cap(apps, "--apps", count)?,
                replicas: cap(replicas, "--replicas", count)?,
                cpu_millis: cap(cpu, "--cpu", |s| {
                    parse_cpu(s).map(u64::from).map_err(|e| e.to_string())
                })?,
                memory_bytes: cap(memory, "--memory", |s| {
                    parse_memory(s).map_err(|e| e.to_string())
                })?,
            };
            let client = ctx.client()?;
            let quota: QuotaView = client
                .send(
                    client
                        .request(
                            reqwest::Method::PATCH,
                            &format!("/v1/quotas/{}", seg(&namespace)),
                        )
                        .json(&patch),
                )
                .await?;
            match ctx.output {
                Format::Json => output::json(&quota),
                Format::Table => println!("quota of namespace {namespace} set"),
            }
            let past = shoal_core::quota::past(&quota.limits, &quota.used);
            if !past.is_empty() {
                eprintln!(
                    "Warning: namespace {namespace} is past its quota now ({}): what runs keeps \
                     running, and nothing there may grow until it is under",
                    past.join(", ")
                );
            }
        }
        QuotaAction::Get { ns } => {
            let namespace = namespace(&ctx, ns)?;
            let path = match &namespace {
                Some(ns) => format!("/v1/quotas?namespace={}", seg(ns)),
                None => "/v1/quotas".to_string(),
            };
            let quotas: Vec<QuotaView> = ctx.client()?.get(&path).await?;
            if let (Some(ns), true) = (&namespace, quotas.is_empty()) {
                return Err(crate::exit::fail(
                    crate::exit::NOT_FOUND,
                    format!("namespace {ns} has no quota"),
                ));
            }
            match ctx.output {
                Format::Json => output::json(&quotas),
                Format::Table => output::table(
                    &["NAMESPACE", "APPS", "REPLICAS", "CPU", "MEMORY"],
                    &quotas.iter().map(row).collect::<Vec<_>>(),
                ),
            }
        }
        QuotaAction::Delete { ns } => {
            let namespace = named(&ctx, ns)?;
            let client = ctx.client()?;
            client
                .checked(client.request(
                    reqwest::Method::DELETE,
                    &format!("/v1/quotas/{}", seg(&namespace)),
                ))
                .await?;
            if ctx.output == Format::Table {
                println!("quota of namespace {namespace} deleted");
            }
        }
    }
    Ok(())
}

/// A cap from a flag's `value`: kept if not given, `none` takes it away.
fn cap(
    value: Option<String>,
    flag: &str,
    parse: impl Fn(&str) -> Result<u64, String>,
) -> Result<Cap> {
    Ok(match value.as_deref() {
        None => Cap::Keep,
        Some("none") => Cap::Remove,
        Some(v) => Cap::Set(parse(v).map_err(|e| crate::exit::usage(format!("{flag}: {e}")))?),
    })
}

fn count(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|e| e.to_string())
}

/// `used/cap`, or `used` alone without a cap.
fn row(q: &QuotaView) -> Vec<String> {
    let cell = |used: String, cap: Option<String>| match cap {
        Some(cap) => format!("{used}/{cap}"),
        None => used,
    };
    let (l, u) = (&q.limits, &q.used);
    vec![
        q.namespace.clone(),
        cell(u.apps.to_string(), l.apps.map(|n| n.to_string())),
        cell(u.replicas.to_string(), l.replicas.map(|n| n.to_string())),
        cell(
            format!("{}m", u.cpu_millis),
            l.cpu_millis.map(|n| format!("{n}m")),
        ),
        cell(
            format_memory(u.memory_bytes),
            l.memory_bytes.map(format_memory),
        ),
    ]
}
