//! Shoal side by side with `wasmtime serve` on the same component, plus deploy
//! latency and idle memory. Run with `make bench` (or `cargo bench --bench gateway`).
//!
//! Needs `wrk` (the load generator) and `wasmtime` 48 (`cargo install --locked
//! wasmtime-cli@48.0.8`); set `WASMTIME=/path/to/wasmtime` if it is not on PATH.
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 32).

use std::io::{BufRead, BufReader};
#[path = "support/proc.rs"]
mod proc;
#[path = "support/wrk.rs"]
mod wrk;

use proc::{Proc, free_port};
use wrk::env_or;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `url` every 200 µs until it answers 200; returns when it did.
fn wait_200(client: &reqwest::blocking::Client, url: &str, limit: Duration) -> Instant {
    let end = Instant::now() + limit;
    loop {
        if let Ok(r) = client.get(url).send()
            && r.status() == 200
        {
            return Instant::now();
        }
        assert!(Instant::now() < end, "{url} never answered 200");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// An app as `shoal apply` posts it: one replica of `digest` serving `route`.
fn spec_json(name: &str, route: &str, digest: &str) -> shoal_core::spec::AppSpec {
    let src = format!(
        "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
         [resources]\nlimits = {{ memory = \"32Mi\" }}\nrequests = {{ cpu = \"50m\" }}\n\
         max_concurrency = 64\n[scale]\nreplicas = 1\n[http]\nroutes = [\"{route}\"]\n"
    );
    shoal_core::spec::parse_app(&src)
        .and_then(|m| m.resolve(digest.to_string()))
        .expect("the bench's spec is valid")
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let wasm = shoal_fixtures::HELLO_WASM;
    let client = http();

    // --- Shoal: one-node cluster, fresh data dir.
    let dir = tempfile::tempdir().unwrap();
    let (api_port, gw_port) = (free_port(), free_port());
    let mut child = Command::new(SHOAL)
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--api",
            &format!("127.0.0.1:{api_port}"),
            "--gateway",
            &format!("127.0.0.1:{gw_port}"),
        ])
        .env("SHOAL_CONFIG", dir.path().join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn shoal up");
    let stdout = child.stdout.take().unwrap();
    let shoal_pid = child.id();
    let _shoal = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("shoal up started");
        if line.trim_start().starts_with("gateway:") {
            break;
        }
    }
    let api = format!("https://127.0.0.1:{api_port}");
    let gw = format!("http://127.0.0.1:{gw_port}");
    let token = std::fs::read_to_string(dir.path().join("data/token")).unwrap();
    let ca = std::fs::read(dir.path().join("data/ca.pem")).unwrap();
    let api_client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();

    let upload: serde_json::Value = api_client
        .post(format!("{api}/v1/modules"))
        .bearer_auth(&token)
        .body(std::fs::read(wasm).unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let digest = upload["module"]["digest"].as_str().unwrap().to_string();

    // Deploy latency: POST of the app to its first 200 through the gateway.
    let deploy = |name: &str, route: &str| {
        let start = Instant::now();
        let resp = api_client
            .post(format!("{api}/v1/apps"))
            .bearer_auth(&token)
            .json(&spec_json(name, route, &digest))
            .send()
            .unwrap();
        assert!(
            resp.status().is_success(),
            "apply {name}: {}",
            resp.status()
        );
        wait_200(&client, &format!("{gw}{route}"), Duration::from_secs(60)) - start
    };
    let first = deploy("hello", "/hello");
    let mut cached: Vec<Duration> = (1..=9)
        .map(|i| deploy(&format!("hello-{i}"), &format!("/hello-{i}")))
        .collect();
    cached.sort();
    for i in 1..=9 {
        api_client
            .delete(format!("{api}/v1/apps/hello-{i}"))
            .bearer_auth(&token)
            .send()
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(3)); // let it settle before measuring idle memory
    let idle_rss = proc::rss_mb(shoal_pid);

    // Throughput: Shoal's gateway, then wasmtime serve, same load, same component.
    let shoal = wrk::run(&format!("{gw}/hello"), seconds, connections);

    let wasmtime_bin = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let port = free_port();
    let child = Command::new(&wasmtime_bin)
        .args([
            "serve",
            "-Scli",
            "-O",
            "pooling-allocator",
            "--addr",
            &format!("127.0.0.1:{port}"),
            wasm,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let peer = match child {
        Ok(c) => {
            let _wasmtime = Proc(c);
            wait_200(
                &client,
                &format!("http://127.0.0.1:{port}/hello"),
                Duration::from_secs(60),
            );
            Some(wrk::run(
                &format!("http://127.0.0.1:{port}/hello"),
                seconds,
                connections,
            ))
        }
        Err(e) => {
            eprintln!("wasmtime not runnable ({wasmtime_bin}: {e}); set WASMTIME=… to compare");
            None
        }
    };

    let version = Command::new(&wasmtime_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "not found".into());
    println!(
        "## Gateway throughput: GET /hello, wrk -t2 -c{connections} -d{seconds}s, same machine"
    );
    println!();
    println!("| server | requests/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|");
    println!(
        "| shoal up (gateway) | {:.0} | {} | {} | {} |",
        shoal.rps, shoal.p50, shoal.p99, shoal.errors
    );
    if let Some(p) = &peer {
        println!(
            "| {version} serve -Scli -O pooling-allocator | {:.0} | {} | {} | {} |",
            p.rps, p.p50, p.p99, p.errors
        );
        println!();
        println!(
            "shoal / wasmtime serve throughput ratio: {:.2}x",
            shoal.rps / p.rps
        );
    }
    println!();
    println!("## Deploy latency: POST /v1/apps to the first 200 through the gateway");
    println!();
    println!("| case | time |");
    println!("|---|---|");
    println!(
        "| first deploy of a digest (compile) | {:.1} ms |",
        first.as_secs_f64() * 1e3
    );
    println!(
        "| cached digest, median of 9 (min {:.1}, max {:.1}) | {:.1} ms |",
        cached[0].as_secs_f64() * 1e3,
        cached[8].as_secs_f64() * 1e3,
        cached[4].as_secs_f64() * 1e3
    );
    println!();
    println!("## Idle memory of `shoal up` with hello deployed: {idle_rss:.1} MB RSS");
}
