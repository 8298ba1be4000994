//! Instance reuse side by side with `wasmtime serve`, on the same `hello` component: Shoal's
//! gateway with a fresh instance per request and with `[http] reuse = 128`, and `wasmtime
//! serve` without and with `--max-instance-reuse-count 128`, both with the pooling allocator
//! keeping the same memory and tables resident as Shoal's. One server at a time (the others
//! stopped), each warmed up first, the four in turn for several rounds; prints every round,
//! the medians and the ratios. Run with `cargo bench --bench reuse` (also part of `make bench`).
//! Needs `wrk` and `wasmtime` 48 (`WASMTIME=/path/to/wasmtime` if it is not on PATH).
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (32), `BENCH_ROUNDS` (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/proc.rs"]
mod proc;
#[path = "support/wrk.rs"]
mod wrk;

use proc::{Proc, free_port};
use wrk::{env_or, millis};

use common::{Cluster, examples, poll, write_spec};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Requests per instance on the reusing side of both servers (`wasmtime serve`'s default
/// for p3 components).
const REUSE: u32 = 128;

/// A load of `url` after a warm-up of a few seconds.
fn measure(url: &str, seconds: u64, connections: u64) -> wrk::Wrk {
    wrk::run(url, 3, connections);
    let result = wrk::run(url, seconds, connections);
    assert_eq!(result.errors, "none", "{url}: {}", result.errors);
    result
}

/// `shoal up` serving hello at `/hello` with `reuse` requests per instance.
fn shoal(reuse: u32) -> (Cluster, String) {
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "routes = [\"/hello\"]",
            &format!("routes = [\"/hello\"]\nreuse = {reuse}"),
        );
    let spec = write_spec(c.config().parent().unwrap(), "hello.toml", &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/hello", 200, "Hello");
    let url = format!("{}/hello", c.gateway);
    (c, url)
}

/// `wasmtime serve` on the same component, reusing instances when `reuse` is more than 1.
fn wasmtime(reuse: u32) -> (Proc, String) {
    let bin = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "serve",
        "-Scli",
        "-O",
        "pooling-allocator",
        "-O",
        "pooling-memory-keep-resident=131072",
        "-O",
        "pooling-table-keep-resident=65536",
        "--addr",
        &format!("127.0.0.1:{port}"),
    ]);
    if reuse > 1 {
        cmd.args(["--max-instance-reuse-count", &reuse.to_string()]);
    }
    let child = cmd
        .arg(format!(
            "{}/target/wasm32-wasip2/release/hello.wasm",
            examples()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}; set WASMTIME=/path/to/wasmtime 48"));
    let url = format!("http://127.0.0.1:{port}/hello");
    let client = common::client();
    let up = poll(Duration::from_secs(30), || {
        client
            .get(&url)
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    assert!(up, "wasmtime serve never answered on {url}");
    (Proc(child), url)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let version = Command::new(std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "wasmtime (not found)".into());
    let sides = [
        "shoal, fresh instance".to_string(),
        format!("shoal, reuse = {REUSE}"),
        format!("{version} serve"),
        format!("{version} serve --max-instance-reuse-count {REUSE}"),
    ];
    println!(
        "## Instance reuse: GET /hello, wrk -t2 -c{connections} -d{seconds}s, one server at a time"
    );
    println!();
    println!("| round | server | requests/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let mut rps = vec![Vec::new(); sides.len()];
    let mut p99 = vec![Vec::new(); sides.len()];
    for round in 1..=rounds {
        for (i, side) in sides.iter().enumerate() {
            let result = match i {
                0 | 1 => {
                    let (_shoal, url) = shoal(if i == 0 { 1 } else { REUSE });
                    measure(&url, seconds, connections)
                }
                _ => {
                    let (_wasmtime, url) = wasmtime(if i == 2 { 1 } else { REUSE });
                    measure(&url, seconds, connections)
                }
            };
            println!(
                "| {round} | {side} | {:.0} | {} | {} |",
                result.rps, result.p50, result.p99
            );
            rps[i].push(result.rps);
            p99[i].push(millis(&result.p99));
        }
    }
    let rps: Vec<f64> = rps.into_iter().map(median).collect();
    let p99: Vec<f64> = p99.into_iter().map(median).collect();
    println!();
    println!("| server | median requests/s | median p99 |");
    println!("|---|---|---|");
    for (i, side) in sides.iter().enumerate() {
        println!("| {side} | {:.0} | {:.2} ms |", rps[i], p99[i]);
    }
    println!();
    println!(
        "shoal / wasmtime serve, fresh instances: {:.2}x; with reuse: {:.2}x; shoal reuse / shoal fresh: {:.2}x",
        rps[0] / rps[2],
        rps[1] / rps[3],
        rps[1] / rps[0]
    );
}
