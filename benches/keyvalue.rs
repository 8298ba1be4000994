//! What `wasi:keyvalue` costs a request, from a guest: the `counter` example reading a key
//! (`get`) and adding one to a counter (`increment`) in the cluster's store, on the node of the
//! control plane (`shoal up`: the call stays in the process) and on a node that joined it (each
//! call a request to the control plane over mutual TLS), with `hello` (no store call) on the same
//! node as the baseline. A fresh instance per request, as the apps are written.
//!
//! Each URL is warmed up, then measured in turn for several rounds with the others idle; prints
//! every round, then medians with the spread. Run with `cargo bench --bench keyvalue`; needs
//! `wrk`. Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (32), `BENCH_ROUNDS` (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/wrk.rs"]
mod wrk;

use common::{Cluster, NodeProc, examples, poll, write_spec};
use std::time::Duration;
use wrk::env_or;

/// `example`'s spec named `name` at `route`, on the node labelled `at`.
fn pinned(c: &Cluster, example: &str, name: &str, route: &str, at: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/{example}/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            &format!("name = \"{example}\""),
            &format!("name = \"{name}\""),
        )
        .replace(
            &format!("routes = [\"/{example}\"]"),
            &format!("routes = [\"{route}\"]"),
        )
        .replace("replicas = 2", "replicas = 1");
    let text = format!("{text}\n[placement]\nnode_selector = {{ at = \"{at}\" }}\n");
    write_spec(c.dir.path(), &format!("{name}.toml"), &text)
        .to_str()
        .unwrap()
        .to_string()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds = env_or("BENCH_ROUNDS", 3) as usize;
    let c = Cluster::start_with(&["--label", "at=control-plane"]);
    let joined = NodeProc::join_up(&c, "node-2", &["--label", "at=joined"]);
    for spec in [
        pinned(&c, "counter", "counter", "/counter", "control-plane"),
        pinned(&c, "counter", "counter-2", "/counter-2", "joined"),
        pinned(&c, "hello", "hello", "/hello", "control-plane"),
    ] {
        c.cli_ok(&["apply", "-f", &spec]);
    }
    c.cli_ok(&["kv", "put", "counter", "greeting", "hello from the store"]);
    for path in ["/counter/greeting", "/counter-2/greeting"] {
        assert!(
            poll(Duration::from_secs(60), || {
                c.gw(path).text().unwrap_or_default() == "hello from the store\n"
            }),
            "{path} never served"
        );
    }
    c.wait_gw("/hello", 200, "Hello");

    // The joined node's apps are measured through its own gateway: no hop.
    let sides = [
        ("hello, control plane's node", c.gateway.clone(), "/hello"),
        (
            "get, control plane's node",
            c.gateway.clone(),
            "/counter/greeting",
        ),
        (
            "increment, control plane's node",
            c.gateway.clone(),
            "/counter/hits/incr",
        ),
        (
            "get, joined node",
            joined.gateway.clone(),
            "/counter-2/greeting",
        ),
        (
            "increment, joined node",
            joined.gateway.clone(),
            "/counter-2/hits/incr",
        ),
    ];
    for (_, gateway, path) in &sides {
        wrk::run(&format!("{gateway}{path}"), 3, connections);
    }
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    println!("| round | side | requests/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|");
    for round in 1..=rounds {
        for (i, (name, gateway, path)) in sides.iter().enumerate() {
            let run = wrk::run(&format!("{gateway}{path}"), seconds, connections);
            println!(
                "| {round} | {name} | {:.0} | {} | {} | {} |",
                run.rps, run.p50, run.p99, run.errors
            );
            runs[i].push(run.rps);
        }
    }
    println!();
    println!("| side | median requests/s | spread | / hello |");
    println!("|---|---|---|---|");
    let mut hello = None;
    for ((name, _, _), v) in sides.iter().zip(runs.iter_mut()) {
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        let base = *hello.get_or_insert(median);
        println!(
            "| {name} | {median:.0} | {:.0}–{:.0} | {:.2}x |",
            v[0],
            v[v.len() - 1],
            median / base
        );
    }
    // What the counter holds after every increment above, warm-ups included.
    let count: u64 = c
        .cli_ok(&["kv", "get", "counter", "hits"])
        .trim()
        .parse()
        .unwrap();
    println!();
    println!("increments stored: {count}");
}
