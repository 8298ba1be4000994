//! Cluster measurements on real processes: a cross-node hop through a
//! gateway vs a local call, and failover time after kill -9 of a node.
//! Run with `make bench` (or `cargo bench --bench cluster`); needs `wrk`.
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 32).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/wrk.rs"]
mod wrk;

use wrk::env_or;

use common::{NodeProc, Server, examples, poll, write_spec};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn spec(dir: &std::path::Path, name: &str, replicas: u32) -> String {
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("\"/hello\"", &format!("\"/{name}\""))
        .replace("replicas = 1", &format!("replicas = {replicas}"));
    write_spec(dir, &format!("{name}.toml"), &text)
        .to_str()
        .unwrap()
        .to_string()
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut nodes: Vec<NodeProc> = (1..=3)
        .map(|i| NodeProc::join(&server, &format!("node-{i}"), &[]))
        .collect();
    assert!(poll(Duration::from_secs(30), || server.nodes_ready() == 3));

    // Cross-node hop: one replica; its own node's gateway vs another's.
    server.cli_ok(&["apply", "-f", &spec(dir.path(), "hop", 1)]);
    assert!(poll(Duration::from_secs(30), || server
        .ready_nodes("hop")
        .len()
        == 1));
    let home = server.ready_nodes("hop")[0].clone();
    let local = nodes.iter().find(|n| n.name == home).unwrap();
    let remote = nodes.iter().find(|n| n.name != home).unwrap();
    assert!(poll(Duration::from_secs(10), || remote
        .get("/hop")
        .is_ok_and(|(c, _)| c == 200)));
    let local_run = wrk::run(&format!("{}/hop", local.gateway), seconds, connections);
    let remote_run = wrk::run(&format!("{}/hop", remote.gateway), seconds, connections);

    // Failover: 3 replicas, kill -9 a node other than the one taking traffic.
    server.cli_ok(&["apply", "-f", &spec(dir.path(), "web", 3)]);
    assert!(poll(Duration::from_secs(30), || server
        .ready_nodes("web")
        .len()
        == 3));
    let victim = server
        .ready_nodes("web")
        .into_iter()
        .find(|n| n != &nodes[0].name)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let gw = nodes[0].gateway.clone();
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let http = common::client();
            let (mut ok, mut failed, mut last_failure) = (0u64, 0u64, None);
            while !stop.load(Ordering::Relaxed) {
                match http.get(format!("{gw}/web")).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => {
                        failed += 1;
                        last_failure = Some(Instant::now());
                    }
                }
            }
            (ok, failed, last_failure)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let idx = nodes.iter().position(|n| n.name == victim).unwrap();
    let killed = Instant::now();
    nodes[idx].kill();
    assert!(poll(Duration::from_secs(60), || {
        let placed = server.ready_nodes("web");
        placed.len() == 3 && !placed.contains(&victim)
    }));
    let recovered = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, last_failure) = load.join().unwrap();

    println!("## Cross-node hop: GET through a gateway, wrk -t2 -c{connections} -d{seconds}s");
    println!();
    println!("| path | requests/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|");
    for (path, run) in [
        ("local replica (its node's gateway)", &local_run),
        (
            "remote replica (another node's gateway → its node)",
            &remote_run,
        ),
    ] {
        println!(
            "| {path} | {:.0} | {} | {} | {} |",
            run.rps, run.p50, run.p99, run.errors
        );
    }
    println!();
    println!(
        "remote / local ratio: {:.2}x",
        remote_run.rps / local_run.rps
    );
    println!();
    println!("## Failover: kill -9 of a node holding 1 of 3 replicas (heartbeat 1 s, grace 3 s)");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| kill -9 → all 3 replicas Ready on the other nodes | {:.2} s |",
        recovered.as_secs_f64()
    );
    match last_failure {
        Some(t) => println!(
            "| kill -9 → last failed request at the surviving gateway | {:.2} s |",
            (t - killed).as_secs_f64()
        ),
        None => println!("| failed requests at the surviving gateway | none |"),
    }
    println!("| requests during the run: ok / failed | {ok} / {failed} |");
}
