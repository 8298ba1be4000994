use super::Context;
use super::get::{event_rows, replica_rows};
use crate::output::{self, Format, age, table_indented};
use anyhow::Result;
use shoal_api::Describe;
use shoal_core::quantity::format_memory;

#[derive(clap::Args)]
pub struct DescribeArgs {
    #[arg(value_enum)]
    what: What,
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    App,
}

pub async fn run(ctx: Context, args: DescribeArgs) -> Result<()> {
    let What::App = args.what;
    let client = ctx.client()?;
    let d: Describe = client
        .get(&format!(
            "/v1/apps/{}?namespace={}",
            args.name, ctx.namespace
        ))
        .await?;
    if ctx.output == Format::Json {
        output::json(&d);
        return Ok(());
    }
    let s = &d.app.spec;
    let ready = d
        .replicas
        .iter()
        .filter(|r| {
            matches!(
                r.phase,
                shoal_core::Phase::Ready | shoal_core::Phase::Running
            )
        })
        .count();
    println!("Name:         {}", s.name);
    println!("Namespace:    {}", s.namespace);
    println!(
        "Kind:         {} ({})",
        s.component.kind,
        s.component.kind.world()
    );
    println!("Module:       {}", s.component.digest);
    println!("Revision:     {}", d.app.revision);
    if let Some(r) = &d.rollout {
        let paused = if r.paused { ", paused" } else { "" };
        println!(
            "Rollout:      {} {}{paused}: {}",
            r.strategy, r.phase, r.message
        );
    }
    println!("Replicas:     {} desired, {ready} ready", s.replicas);
    println!(
        "Resources:    memory {}, cpu {}m, max concurrency {}",
        format_memory(s.resources.memory_bytes),
        s.resources.cpu_millis,
        s.resources.max_concurrency
    );
    if let Some(h) = &s.http {
        let routes: Vec<String> = h.routes.iter().map(|r| r.to_string()).collect();
        println!("Routes:       {}", routes.join(", "));
        println!("Timeout:      {} ms", h.timeout_ms);
    }
    if !s.env.is_empty() {
        println!("Env:");
        for (k, v) in &s.env {
            println!("  {k}={v}");
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
