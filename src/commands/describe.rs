use super::Context;
use super::get::{event_rows, node_state, replica_rows};
use crate::output::{self, Format, age, duration, table_indented};
use anyhow::Result;
use shoal_api::{Describe, NodeDescribe, seg};
use shoal_core::quantity::format_memory;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal describe app hello                        spec, revisions, replicas, recent events
  shoal describe app hello -o json                the same, for scripts
  shoal describe node n1                          capacity, what is placed there, usage, events")]
pub struct DescribeArgs {
    /// What to describe.
    #[arg(value_enum)]
    what: What,
    /// Its name.
    #[arg(value_parser = crate::commands::object_name)]
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    App,
    Node,
}

pub async fn run(ctx: Context, args: DescribeArgs) -> Result<()> {
    match args.what {
        What::App => app(ctx, args).await,
        What::Node => node(ctx, args).await,
    }
}

/// `describe node`: what `kubectl describe node` shows that Shoal has: state, labels,
/// capacity against what is placed and what is used, the replicas there, its events.
async fn node(ctx: Context, args: DescribeArgs) -> Result<()> {
    ctx.no_namespace("nodes")?;
    let client = ctx.client()?;
    let d: NodeDescribe = client
        .get(&format!("/v1/nodes/{}", seg(&args.name)))
        .await?;
    if ctx.output == Format::Json {
        output::json(&d);
        return Ok(());
    }
    let n = &d.summary.node;
    let (cap, used) = (&n.capacity, &d.summary.allocated);
    // A share of capacity, as kubectl's "Allocated resources" shows it.
    let share = |part: u64, whole: u64| match whole {
        0 => String::new(),
        w => format!(" ({}%)", part.saturating_mul(100) / w),
    };
    println!("Name:         {}", n.name);
    println!("State:        {}", node_state(&d.summary));
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    match labels.is_empty() {
        true => println!("Labels:       <none>"),
        false => println!("Labels:       {}", labels.join(", ")),
    }
    println!("Gateway:      {}", n.gateway);
    println!("Joined:       {} ago", age(n.joined_at));
    println!("Heartbeat:    {} ago", age(d.summary.last_heartbeat));
    println!(
        "Capacity:     cpu {}m, memory {}, {} instances",
        cap.cpu_millis,
        format_memory(cap.memory_bytes),
        cap.instances
    );
    println!(
        "Requested:    cpu {}m{}, memory {}{}, by {} replicas",
        used.cpu_millis,
        share(used.cpu_millis, cap.cpu_millis),
        format_memory(used.memory_bytes),
        share(used.memory_bytes, cap.memory_bytes),
        d.summary.replicas
    );
    let u = &d.usage;
    let memory = u.memory.map_or("-".into(), |m| {
        format!(
            "{} of {}",
            format_memory(m.memory_reserved_bytes),
            format_memory(m.memory_budget_bytes)
        )
    });
    let instances = u
        .memory
        .and_then(|m| m.instances)
        .map_or("-".into(), |n| n.to_string());
    println!(
        "Used:         cpu {}, memory {memory}, {instances} instances alive, {:.2} requests/s routed",
        u.cpu_millis.map_or("-".into(), |c| format!("{c}m")),
        u.requests_per_second
    );
    println!("\nReplicas:");
    if d.placed.is_empty() {
        println!("  <none>");
    } else {
        let rows: Vec<Vec<String>> = d
            .placed
            .iter()
            .map(|r| {
                vec![
                    r.app.namespace.clone(),
                    r.app.name.clone(),
                    r.id.clone(),
                    r.revision.to_string(),
                    r.phase.to_string(),
                    format!("{}m", r.resources.requests.cpu_millis),
                    format_memory(r.resources.requests.memory_bytes),
                    age(r.created_at),
                ]
            })
            .collect();
        table_indented(
            "  ",
            &[
                "NAMESPACE",
                "APP",
                "NAME",
                "REVISION",
                "PHASE",
                "CPU",
                "MEMORY",
                "AGE",
            ],
            &rows,
        );
    }
    println!("\nEvents:");
    if d.events.is_empty() {
        println!("  <none>");
    } else {
        table_indented(
            "  ",
            &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            &event_rows(&d.events),
        );
    }
    Ok(())
}

/// `describe app`: its spec, rollout, revisions, replicas and events.
async fn app(ctx: Context, args: DescribeArgs) -> Result<()> {
    let client = ctx.client()?;
    let d: Describe = client
        .get(&format!(
            "/v1/apps/{}?namespace={}",
            seg(&args.name),
            seg(&ctx.namespace)
        ))
        .await?;
    if ctx.output == Format::Json {
        output::json(&d);
        return Ok(());
    }
    let s = &d.app.spec;
    let ready = d.replicas.iter().filter(|r| r.serving()).count();
    println!("Name:         {}", s.name);
    println!("Namespace:    {}", s.namespace);
    println!(
        "Kind:         {} ({})",
        s.component.kind,
        d.world.as_deref().unwrap_or(s.component.kind.world())
    );
    println!("Module:       {}", s.component.digest);
    if !s.component.args.is_empty() {
        // Quoted where a space or quote would blur where one ends.
        let args: Vec<String> = s
            .component
            .args
            .iter()
            .map(|a| match a.is_empty() || a.contains([' ', '"', '\'']) {
                true => format!("{a:?}"),
                false => a.clone(),
            })
            .collect();
        println!("Args:         {}", args.join(" "));
    }
    if let Some(reference) = &s.component.oci {
        match &s.pull_secret {
            Some(secret) => println!("Source:       {reference} (pull secret {secret})"),
            None => println!("Source:       {reference}"),
        }
    }
    println!("Revision:     {}", d.app.revision);
    if let Some(r) = &d.rollout {
        let paused = if r.paused { ", paused" } else { "" };
        // A finished rollout's message is as of its end (its replica counts then), so it
        // says when that was.
        let when = if r.phase.is_done() {
            format!(" {} ago", age(r.progressed_at))
        } else {
            String::new()
        };
        println!(
            "Rollout:      {} {}{paused}{when}: {}",
            r.strategy, r.phase, r.message
        );
    }
    let now = shoal_core::now_ms();
    let bounds = s.scale.bounds(s.replicas, now);
    if s.runs.schedule.is_some() {
        println!("Replicas:     one per run, {ready} running");
    } else {
        println!(
            "Replicas:     {} desired, {ready} ready",
            bounds.clamp(s.replicas)
        );
    }
    let r = &s.resources;
    println!(
        "Requests:     cpu {}m, memory {}",
        r.requests.cpu_millis,
        format_memory(r.requests.memory_bytes)
    );
    println!(
        "Limits:       memory {} per instance, cpu {}, {} instances per replica",
        format_memory(r.limits.memory_bytes),
        r.limits.cpu_millis.map_or_else(
            || "none (idle CPU is free)".to_string(),
            |c| format!("{c}m")
        ),
        r.max_concurrency
    );
    // Used beside what it asked for, as `kubectl top` beside the pod's spec.
    if let Some(cpu) = &d.cpu {
        println!(
            "CPU:          {}m used of {}m requested, {}m waiting for its share or limit",
            cpu.used_millis, r.requests.cpu_millis, cpu.throttled_millis
        );
    }
    if let Some(a) = &s.scale.autoscale {
        let idle = if s.scale.may_idle_to_zero() {
            format!(", to zero after {} idle", duration(a.idle_ms))
        } else {
            String::new()
        };
        println!(
            "Autoscale:    {}-{} replicas, {} in flight per replica over {}{}{idle}",
            bounds.min,
            bounds.max,
            a.target_concurrency,
            duration(a.window_ms),
            a.target_rps
                .map_or_else(String::new, |r| format!(" or {r} requests/s per replica")),
        );
    }
    if let (Some(reason), Some(at)) = (&d.app.scale.reason, d.app.scale.last_change) {
        println!("Last scaled:  {} ago: {reason}", age(at));
    }
    if !s.scale.schedule.is_empty() {
        println!("Schedule:");
        for w in &s.scale.schedule {
            let length = match (w.duration_ms, &w.end) {
                (Some(d), _) => format!("for {}", duration(d)),
                (None, Some(end)) => format!("until {end:?}"),
                (None, None) => String::new(),
            };
            let sets = match (w.min, w.max) {
                (Some(a), Some(b)) if a == b => format!("replicas {a}"),
                (min, max) => [
                    min.map(|m| format!("min {m}")),
                    max.map(|m| format!("max {m}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", "),
            };
            let state = match (w.open_at(now), w.next_open(now)) {
                (Some((_, closes)), _) => format!("open, closes in {}", duration(closes - now)),
                (None, Some(next)) => format!("opens in {}", duration(next - now)),
                (None, None) => "never opens again".to_string(),
            };
            println!(
                "  {}: {:?} {} {length}: {sets} ({state})",
                w.name, w.cron, w.timezone
            );
        }
    }
    if s.component.kind == shoal_core::Kind::Job {
        let runs = &s.runs;
        if let (Some(expr), Some(cron)) = (&runs.schedule, runs.cron()) {
            let next = cron.next_after(now).map_or_else(
                || "never fires again".into(),
                |t| format!("next in {}", duration(t - now)),
            );
            println!(
                "Schedule:     {expr:?} {} ({}), {next}",
                runs.timezone,
                cron.describe()
            );
            if let Some(d) = runs.starting_deadline_ms {
                println!(
                    "Deadline:     a run starts within {} of its firing or is skipped",
                    duration(d)
                );
            }
        }
        println!(
            "Runs:         concurrency {}, keeping {} succeeded and {} failed",
            runs.concurrency, runs.history.succeeded, runs.history.failed
        );
        if let Some(t) = d.app.job.last_scheduled {
            println!("Last firing:  {} ago", age(t));
        }
    }
    if let Some(h) = &s.http {
        let routes: Vec<String> = h.routes.iter().map(|r| r.to_string()).collect();
        println!("Routes:       {}", routes.join(", "));
        if let Some(tls) = &h.tls {
            let version = tls.version.map(|v| format!(" (version {v})"));
            println!(
                "HTTPS:        secret {}{}",
                tls.secret,
                version.unwrap_or_default()
            );
        }
        let shown: Vec<String> = s
            .inbound()
            .callers()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let callers = match &s.inbound {
            None => format!("{} (its namespace's apps)", shown.join(", ")),
            Some(_) if shown.is_empty() => "none".into(),
            Some(_) => shown.join(", "),
        };
        println!("Callers:      {callers}");
        println!("Timeout:      {} ms", h.timeout_ms);
        if h.reuse > 1 {
            println!(
                "Reuse:        {} requests per instance, idle up to {} ms, {} at once (p3)",
                h.reuse, h.reuse_idle_ms, h.reuse_concurrent
            );
        }
    }
    if !s.outbound.is_empty() {
        println!("Outbound:     {}", s.outbound.join(", "));
    }
    if !s.keyvalue.is_empty() {
        println!("Buckets:      {}", s.keyvalue.join(", "));
    }
    if !s.volumes.is_empty() {
        println!("Volumes:");
        for v in &s.volumes {
            let access = if v.read_only { "ro" } else { "rw" };
            println!(
                "  {} at {} ({access}, {})",
                v.name,
                v.mount,
                shoal_core::quantity::format_memory(v.size())
            );
        }
    }
    if !s.env.is_empty() || !s.secret_env.is_empty() {
        println!("Env:");
        for (k, v) in &s.env {
            println!("  {k}={v}");
        }
        for (k, r) in &s.secret_env {
            println!("  {k}=<{r}>");
        }
    }
    if !s.config_sets.is_empty() {
        let names: Vec<&str> = s.config_sets.iter().map(|r| r.name.as_str()).collect();
        println!("Config sets:  {}", names.join(", "));
    }
    if !s.config.is_empty() || !s.secret_config.is_empty() {
        println!("Config:");
        for (k, v) in &s.config {
            println!("  {k}={v}");
        }
        for (k, r) in &s.secret_config {
            println!("  {k}=<{r}>");
        }
    }
    println!("Created:      {} ago", age(d.app.created_at));
    println!("\nRevisions:");
    let revs: Vec<Vec<String>> = d
        .revisions
        .iter()
        .map(|r| {
            vec![
                r.number.to_string(),
                age(r.created_at),
                r.cause.clone(),
                r.outcome.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table_indented("  ", &["REVISION", "AGE", "CAUSE", "OUTCOME"], &revs);
    println!("\nReplicas:");
    if d.replicas.is_empty() {
        println!("  <none>");
    } else {
        table_indented(
            "  ",
            &[
                "NAME", "APP", "REVISION", "NODE", "PHASE", "RESTARTS", "AGE", "MESSAGE",
            ],
            &replica_rows(&d.replicas),
        );
    }
    println!("\nEvents:");
    if d.events.is_empty() {
        println!("  <none>");
    } else {
        table_indented(
            "  ",
            &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            &event_rows(&d.events),
        );
    }
    Ok(())
}
