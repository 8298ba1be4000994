//! Node pools on real processes: how long a replica that fits on no node waits until it is
//! Ready on a node its pool started for it (a local `shoal node join` worker), split into
//! the wait for the node to join and the wait from there to a ready replica.
//! Run with `cargo bench --bench pools` (also part of `make bench`); `BENCH_ROUNDS` rounds
//! (default 5), each on a fresh `shoal server`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Server, write_spec};
use std::time::{Duration, Instant};

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Median, lowest and highest.
fn summary(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn round() -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.cli_ok(&["pool", "create", "w", "--max", "1", "--cooldown", "1h"]);
    let spec = common::example_spec("hello", 1, "Hello from a pool!");
    let file = write_spec(dir.path(), "hello.toml", &spec);
    server.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let pending = Instant::now();
    let (mut joined, mut ready) = (None, None);
    let done = common::poll(Duration::from_secs(120), || {
        if joined.is_none()
            && server
                .api_json("/v1/nodes")
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["state"] == "Ready")
        {
            joined = Some(pending.elapsed());
        }
        if server
            .replicas("hello")
            .iter()
            .any(|r| r["phase"] == "Ready")
        {
            ready = Some(pending.elapsed());
        }
        ready.is_some()
    });
    assert!(done, "no ready replica in 120 s");
    let ready = ready.unwrap();
    let joined = joined.unwrap_or(ready);
    (seconds(joined), seconds(ready - joined))
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let (mut joins, mut readies, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (join, ready) = round();
        println!(
            "round {}: node Ready after {join:.2} s, replica Ready {ready:.2} s later",
            i + 1
        );
        joins.push(join);
        readies.push(ready);
        totals.push(join + ready);
    }
    for (what, xs) in [
        (
            "Pending to node Ready (start, join, first heartbeat)",
            joins,
        ),
        (
            "node Ready to replica Ready (place, fetch, compile, start)",
            readies,
        ),
        ("Pending to replica Ready", totals),
    ] {
        let (median, low, high) = summary(xs);
        println!("{what}: median {median:.2} s ({low:.2}-{high:.2} s)");
    }
}
