//! How many applies the control plane acknowledges per second, and their p99 latency, with 1, 8
//! and 32 concurrent clients: each client POSTs `/v1/apps` over HTTP (plain, keep-alive), one
//! request at a time, each creating a new app; an apply is acknowledged when its 201 arrives,
//! after the store commit holding its write is durable. Beside it, the store alone: `txn`s
//! from as many threads, each putting one key, through the same group commit.
//!
//! The control plane runs in this process with its controller, as `shoal server --plain-http`
//! does, on a fresh redb file in a temp dir; clients share the process and its cores. Apps are
//! created with `replicas = 0`: there are no nodes, so the controller has nothing to place and
//! the number is the apply path's own.
//!
//! Run with `cargo bench -p shoal-control --bench applies`. Knobs: `BENCH_SECONDS` (per
//! measurement, default 5), `BENCH_ROUNDS` (3), `BENCH_CLIENTS` (`1,8,32`). Prints every round,
//! then per client count the median round with the spread of the rounds.

use std::time::{Duration, Instant};

use shoal_control::{ControlConfig, ControlPlane, ServeLimits};
use shoal_store::{BlobStore, Op, Store, Txn};

const TOKEN: &str = "bench";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One measurement: acknowledged operations per second and latency percentiles.
struct Round {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    count: usize,
    took: Duration,
}

impl Round {
    fn of(mut latencies: Vec<Duration>, took: Duration) -> Round {
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        Round {
            per_second: latencies.len() as f64 / took.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            count: latencies.len(),
            took,
        }
    }
}

/// An app spec as `shoal apply` posts it: a new app `name` with no replicas.
fn spec(name: &str, digest: &str) -> Vec<u8> {
    let src = format!(
        "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
         [scale]\nreplicas = 0\n[http]\nroutes = [\"/{name}\"]\n"
    );
    let spec = shoal_core::spec::parse_app(&src)
        .and_then(|m| m.resolve(digest.to_string()))
        .expect("the bench's spec is valid");
    serde_json::to_vec(&spec).unwrap()
}

/// `clients` clients applying new apps for `seconds`; every answer must be a 201.
async fn applies(base: &str, digest: &str, tag: &str, clients: usize, seconds: u64) -> Round {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (base, digest, tag) = (base.to_string(), digest.to_string(), tag.to_string());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut latencies = Vec::new();
                for i in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let body = spec(&format!("{tag}-{c}-{i}"), &digest);
                    let sent = Instant::now();
                    let resp = http
                        .post(format!("{base}/v1/apps"))
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("apply sent");
                    let status = resp.status();
                    let text = resp.text().await.expect("apply answered");
                    assert_eq!(status, reqwest::StatusCode::CREATED, "{text}");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    Round::of(latencies, started.elapsed())
}

/// `threads` threads each putting new keys into `store` for `seconds`.
fn store_txns(store: &Store, tag: &str, threads: usize, seconds: u64) -> Round {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let latencies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut latencies = Vec::new();
                    for i in 0.. {
                        if Instant::now() >= until {
                            break;
                        }
                        let sent = Instant::now();
                        let txn = Txn::new().then(Op::put(format!("/{tag}/{t}/{i}"), [0u8; 64]));
                        store.txn(txn).expect("store txn");
                        latencies.push(sent.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    Round::of(latencies, started.elapsed())
}

/// Durable store commits so far and the seconds they took, as the control plane's own metric
/// counts them.
async fn commits(base: &str) -> (u64, f64) {
    let text = reqwest::Client::new()
        .get(format!("{base}/v1/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    };
    (
        value("shoal_store_commit_duration_seconds_count") as u64,
        value("shoal_store_commit_duration_seconds_sum"),
    )
}

/// CPU seconds this process (server, controller and clients) has used, from `/proc/self/stat`
/// (user + system, in clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks = |i: usize| fields[i].parse::<f64>().unwrap();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Prints one round, with how many acknowledged operations shared a durable commit, how much
/// of the round's wall time went to committing (`(count, seconds)` of the commits meanwhile)
/// and the process's CPU time per acknowledged operation (`cpu` seconds meanwhile).
fn print_round(what: &str, clients: usize, round: usize, r: &Round, commits: (u64, f64), cpu: f64) {
    println!(
        "{what:<6} clients={clients:<3} round={round} {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} acked, {} commits, {:.1} acked per commit, committing {:.0} % of the time, {:.2} ms each; CPU {:.3} ms per op, {:.2} cores)",
        r.per_second,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.count,
        commits.0,
        r.count as f64 / commits.0.max(1) as f64,
        commits.1 / r.took.as_secs_f64() * 100.0,
        commits.1 / commits.0.max(1) as f64 * 1e3,
        cpu / r.count.max(1) as f64 * 1e3,
        cpu / r.took.as_secs_f64(),
    );
}

fn since(before: (u64, f64), after: (u64, f64)) -> (u64, f64) {
    (after.0 - before.0, after.1 - before.1)
}

fn summary(what: &str, clients: usize, rounds: &mut [Round]) {
    rounds.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    let median = &rounds[rounds.len() / 2];
    let mut p99s: Vec<f64> = rounds.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect();
    p99s.sort_by(f64::total_cmp);
    println!(
        "| {what} | {clients} | {:.0} | {:.0}–{:.0} | {:.2} ms | {:.2}–{:.2} ms |",
        median.per_second,
        rounds[0].per_second,
        rounds[rounds.len() - 1].per_second,
        median.p99.as_secs_f64() * 1e3,
        p99s[0],
        p99s[p99s.len() - 1],
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = env_or("BENCH_SECONDS", "5").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let client_counts: Vec<usize> = env_or("BENCH_CLIENTS", "1,8,32")
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let blobs = BlobStore::open(&dir.path().join("modules")).unwrap();
    let config = ControlConfig {
        token: TOKEN.into(),
        ..ControlConfig::default()
    };
    let cp = ControlPlane::new(store.clone(), blobs, config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(cp.clone().run_controller());
        tokio::spawn(shoal_control::serve(
            listener,
            shoal_control::router(cp.clone()),
            ServeLimits::default(),
            None,
        ));
        base
    });
    // The smallest valid component: its header alone.
    let digest = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{base}/v1/modules"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/wasm")
            .body(b"\0asm\x0d\0\x01\0".to_vec())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        let body: serde_json::Value = resp.json().await.unwrap();
        body["module"]["digest"].as_str().unwrap().to_string()
    });
    // Warm up: connections, the blocking pool, redb's cache.
    rt.block_on(applies(&base, &digest, "warm", 8, 1));

    let mut api: Vec<Vec<Round>> = client_counts.iter().map(|_| Vec::new()).collect();
    let mut raw: Vec<Vec<Round>> = client_counts.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (n, &clients) in client_counts.iter().enumerate() {
            let tag = format!("r{round}c{clients}");
            let (before, cpu) = (rt.block_on(commits(&base)), cpu_seconds());
            let r = rt.block_on(applies(&base, &digest, &tag, clients, seconds));
            let cpu = cpu_seconds() - cpu;
            let during = since(before, rt.block_on(commits(&base)));
            print_round("apply", clients, round, &r, during, cpu);
            api[n].push(r);

            let (before, cpu) = (rt.block_on(commits(&base)), cpu_seconds());
            let r = store_txns(&store, &tag, clients, seconds);
            let cpu = cpu_seconds() - cpu;
            let during = since(before, rt.block_on(commits(&base)));
            print_round("txn", clients, round, &r, during, cpu);
            raw[n].push(r);
        }
    }
    println!("| path | clients | median /s | spread /s | p99 (median round) | p99 spread |");
    println!("|---|---|---|---|---|---|");
    for (n, &clients) in client_counts.iter().enumerate() {
        summary("apply (HTTP)", clients, &mut api[n]);
    }
    for (n, &clients) in client_counts.iter().enumerate() {
        summary("store txn", clients, &mut raw[n]);
    }
}
