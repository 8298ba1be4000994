//! Noisy neighbours on one node: `examples/hello` measured alone, then while
//! `examples/faulty` keeps its `max_concurrency` requests spinning in `/loop`
//! (each spins until its 5 s timeout and is sent again at once), in alternating
//! rounds on the same `shoal up`. Target: with the neighbour, hello keeps ≥ 80 %
//! of its throughput alone and its p99 stays ≤ 2× alone.
//! Then the same with the neighbour held to `limits.cpu = "100m"`.
//! Run with `cargo bench --bench neighbours`; needs `wrk`.
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 32),
//! `BENCH_ROUNDS` (default 3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/wrk.rs"]
mod wrk;

use wrk::{env_or, millis};

use common::{Cluster, examples, poll};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// `max_concurrency` as the faulty example's spec sets it.
fn max_concurrency(spec: &str) -> usize {
    std::fs::read_to_string(spec)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("max_concurrency"))
        .and_then(|rest| rest.trim_start_matches([' ', '=']).trim().parse().ok())
        .expect("max_concurrency in the faulty example")
}

/// Keeps `n` requests to `/faulty/loop` in flight until stopped.
struct Spinners {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Spinners {
    fn start(gateway: &str, n: usize) -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let url = format!("{gateway}/faulty/loop");
                let (stop, sent) = (stop.clone(), sent.clone());
                std::thread::spawn(move || {
                    let client = common::client();
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let status = client.get(&url).send().map(|r| r.status().as_u16());
                        assert!(
                            matches!(status, Ok(504)),
                            "/faulty/loop should time out: {status:?}"
                        );
                    }
                })
            })
            .collect();
        Spinners {
            stop,
            sent,
            threads,
        }
    }

    /// Stops sending and waits for the requests in flight to time out.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("spinner thread");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// Hello alone, then beside the spinners, `rounds` times; prints a table and returns the
/// medians of the throughput ratio and the p99 ratio.
fn rounds(
    gateway: &str,
    spinners: usize,
    seconds: u64,
    connections: u64,
    rounds: u64,
) -> (f64, f64) {
    let hello = format!("{gateway}/hello");
    println!(
        "| round | hello alone req/s | p50 | p99 | beside the neighbour req/s | p50 | p99 | \
         throughput | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut throughput, mut p99s) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let alone = wrk::run(&hello, seconds, connections);
        let neighbour = Spinners::start(gateway, spinners);
        // Let every spinner reach its guest before measuring.
        std::thread::sleep(Duration::from_secs(1));
        let beside = wrk::run(&hello, seconds, connections);
        let spun = neighbour.stop();
        let ratio = beside.rps / alone.rps;
        let p99_ratio = millis(&beside.p99) / millis(&alone.p99);
        throughput.push(ratio);
        p99s.push(p99_ratio);
        println!(
            "| {round} | {:.0} | {} | {} | {:.0} | {} | {} | {:.0} % | {:.2}× |",
            alone.rps,
            alone.p50,
            alone.p99,
            beside.rps,
            beside.p50,
            beside.p99,
            ratio * 100.0,
            p99_ratio
        );
        assert_eq!(alone.errors, "none", "hello alone: {}", alone.errors);
        assert_eq!(beside.errors, "none", "hello beside: {}", beside.errors);
        assert!(spun >= spinners as u64);
    }
    throughput.sort_by(f64::total_cmp);
    p99s.sort_by(f64::total_cmp);
    let medians = (throughput[throughput.len() / 2], p99s[p99s.len() / 2]);
    println!();
    println!(
        "median over rounds: {:.0} % of the throughput alone (target ≥ 80 %), p99 {:.2}× alone \
         (target ≤ 2×)",
        medians.0 * 100.0,
        medians.1
    );
    println!();
    medians
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds_per_case = env_or("BENCH_ROUNDS", 3);

    let cluster = Cluster::start();
    let hello_spec = format!("{}/hello/app.toml", examples());
    let faulty_spec = format!("{}/faulty/app.toml", examples());
    cluster.cli_ok(&["apply", "-f", &hello_spec]);
    cluster.cli_ok(&["apply", "-f", &faulty_spec]);
    cluster.wait_gw("/hello", 200, "Hello");
    cluster.wait_gw("/faulty/status/200", 200, "status 200");
    let spinners = max_concurrency(&faulty_spec);
    let gateway = cluster.gateway.clone();

    // Warm up: pool slots touched, connections made.
    wrk::run(&format!("{gateway}/hello"), 2, connections);

    println!(
        "## Noisy neighbour: GET /hello alone, then beside {spinners} spinning /faulty/loop \
         requests; wrk -t2 -c{connections} -d{seconds}s, {rounds_per_case} rounds per case"
    );
    println!();
    println!("### The examples as shipped: both apps request 50m, no limit");
    println!();
    rounds(&gateway, spinners, seconds, connections, rounds_per_case);

    // The same neighbour held to a hard limit: a new revision of faulty.
    let shipped = std::fs::read_to_string(&faulty_spec).unwrap();
    let limited = shipped
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "limits = { memory = \"32Mi\" }",
            &format!("limits = {{ memory = \"32Mi\", cpu = \"{LIMIT}\" }}"),
        );
    if !limited.contains(LIMIT) {
        println!("(the faulty example's [resources] changed shape: the limited case is skipped)");
        return;
    }
    let path = cluster.dir.path().join("faulty-limited.toml");
    std::fs::write(&path, limited).unwrap();
    cluster.cli_ok(&["apply", "-f", path.to_str().unwrap()]);
    let rolled = poll(Duration::from_secs(60), || {
        let replicas = cluster.api_json("/v1/replicas?app=faulty");
        let replicas = replicas.as_array().unwrap();
        replicas.len() == 1 && replicas[0]["revision"] == 2 && replicas[0]["phase"] == "Ready"
    });
    assert!(rolled, "faulty with a CPU limit never rolled out");
    println!("### The neighbour with `limits.cpu = \"{LIMIT}\"` (hello as shipped)");
    println!();
    rounds(&gateway, spinners, seconds, connections, rounds_per_case);
}

/// The hard limit of the second case.
const LIMIT: &str = "100m";
