//! `shoal top nodes|apps`: what nodes and apps use and serve now, as `kubectl top` shows it,
//! from the control plane's `/v1/top` routes.

use super::Context;
use super::get::ns_table;
use crate::output::{self, Format, table};
use anyhow::Result;
use shoal_api::{AppTop, NodeTop, seg};
use shoal_core::quantity::format_memory;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal top nodes                                 CPU and memory each node's guests use, requests/s
  shoal top apps -A                               per app, every namespace: ready, requests/s, 5xx/s, p99, CPU
  shoal top apps -o json                          the same numbers, for scripts")]
pub struct TopArgs {
    #[arg(value_enum)]
    what: What,
    /// Every namespace's apps, with a NAMESPACE column, instead of `-n`'s.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "app")]
    Apps,
}

pub async fn run(ctx: Context, args: TopArgs) -> Result<()> {
    if matches!(args.what, What::Nodes) {
        ctx.no_namespace("nodes")?;
    }
    let client = ctx.client()?;
    match args.what {
        What::Nodes => {
            let nodes: Vec<NodeTop> = client.get("/v1/top/nodes").await?;
            if ctx.output == Format::Json {
                output::json(&nodes);
                return Ok(());
            }
            table(
                &["NAME", "CPU", "MEMORY", "REPLICAS", "REQ/S"],
                &node_rows(&nodes),
            );
        }
        What::Apps => {
            let query = if args.all_namespaces {
                String::new()
            } else {
                format!("?namespace={}", seg(&ctx.namespace))
            };
            let apps: Vec<AppTop> = client.get(&format!("/v1/top/apps{query}")).await?;
            if ctx.output == Format::Json {
                output::json(&apps);
                return Ok(());
            }
            ns_table(
                args.all_namespaces,
                &["NAME", "READY", "REQ/S", "5XX/S", "P99", "CPU"],
                apps.iter().map(|a| a.namespace.as_str()),
                app_rows(&apps),
            );
        }
    }
    Ok(())
}

fn node_rows(nodes: &[NodeTop]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                format!(
                    "{}/{}m",
                    n.cpu_millis.map_or("-".into(), |c| format!("{c}m")),
                    n.cpu_capacity_millis
                ),
                n.memory.map_or("-".into(), |m| {
                    format!(
                        "{}/{}",
                        format_memory(m.memory_reserved_bytes),
                        format_memory(m.memory_budget_bytes)
                    )
                }),
                n.replicas.to_string(),
                rate(n.requests_per_second),
            ]
        })
        .collect()
}

fn app_rows(apps: &[AppTop]) -> Vec<Vec<String>> {
    apps.iter()
        .map(|a| {
            vec![
                a.name.clone(),
                format!("{}/{}", a.ready, a.desired),
                rate(a.requests_per_second),
                rate(a.errors_per_second),
                // The bound of its histogram bucket: the p99 is at most that.
                a.p99_ms.map_or("-".into(), |ms| format!("≤{ms}ms")),
                a.cpu
                    .as_ref()
                    .map_or("-".into(), |c| format!("{}m", c.used_millis)),
            ]
        })
        .collect()
}

/// A rate per second: two decimals below 10, so a trickle does not read as nothing.
fn rate(per_second: f64) -> String {
    if per_second < 10.0 {
        format!("{per_second:.2}")
    } else {
        format!("{per_second:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::{CpuView, NodeUsage};

    #[test]
    fn rows_say_what_is_unknown_with_a_dash() {
        let node = NodeTop {
            name: "n1".into(),
            state: shoal_core::NodeState::Ready,
            cpu_millis: Some(120),
            cpu_capacity_millis: 2000,
            memory: Some(NodeUsage {
                memory_reserved_bytes: 32 << 20,
                memory_budget_bytes: 6 << 30,
                instances: Some(2),
            }),
            replicas: 3,
            requests_per_second: 12.34,
        };
        let silent = NodeTop {
            cpu_millis: None,
            memory: None,
            requests_per_second: 0.0,
            ..node.clone()
        };
        assert_eq!(
            node_rows(&[node, silent]),
            [
                ["n1", "120m/2000m", "32Mi/6Gi", "3", "12.3"],
                ["n1", "-/2000m", "-", "3", "0.00"]
            ]
        );
        let app = AppTop {
            namespace: "default".into(),
            name: "hello".into(),
            ready: 1,
            desired: 2,
            requests_per_second: 0.333,
            errors_per_second: 0.0,
            p99_ms: Some(5),
            cpu: Some(CpuView {
                used_millis: 7,
                throttled_millis: 0,
            }),
        };
        let idle = AppTop {
            p99_ms: None,
            cpu: None,
            ..app.clone()
        };
        assert_eq!(
            app_rows(&[app, idle]),
            [
                ["hello", "1/2", "0.33", "0.00", "≤5ms", "7m"],
                ["hello", "1/2", "0.33", "0.00", "-", "-"]
            ]
        );
    }
}
