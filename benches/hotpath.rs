//! The hot path's fastest modes side by side: Shoal's gateway and `wasmtime serve` on the same
//! components, fresh instance per request vs reused instances, WASIp2 (`examples/hello`) vs
//! WASIp3 (`examples/hello-p3`), with a native hyper "hello" as the ceiling; then, on a
//! two-node cluster, each Shoal mode through the replica's own gateway vs one hop away, with
//! hops over keep-alive HTTP/1.1 and over HTTP/2.
//!
//! Fair to the peer: `wasmtime serve` gets the pooling allocator with the same memory and
//! tables kept resident as Shoal's and the kernel's `PAGEMAP_SCAN` where Shoal uses it
//! ([`shoal_runtime::memory_reset`]), and the same reuse counts (128 requests per instance; 16
//! at once for p3, its default). One server at a time (the others stopped), each warmed up
//! first, every side in turn for several rounds; prints every round, then medians with the
//! spread (lowest–highest) and the ratios.
//!
//! Run with `cargo bench --bench hotpath` (also part of `make bench`). Needs `wrk` and
//! `wasmtime` 48 (`WASMTIME=/path/to/wasmtime` if it is not on PATH). Knobs: `BENCH_SECONDS`
//! (default 10), `BENCH_CONNECTIONS` (32), `BENCH_ROUNDS` (3), `BENCH_ONLY` (`local` or `hop`),
//! `BENCH_PIN` (`1`: in the hop runs, the replica's node started on CPU 1 alone and the rest on
//! CPU 0, as two one-CPU machines would have it), `BENCH_WRK_BATCH` (`1`: pinned, `wrk` runs
//! under `SCHED_BATCH`, so it does not preempt the forwarding node beside it on every response).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/proc.rs"]
mod proc;
#[path = "support/wrk.rs"]
mod wrk;

use proc::{Proc, free_port};
use wrk::{env_or, millis};

use common::{Cluster, NodeProc, Server, cluster, examples, poll, write_spec};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Requests per instance on the reusing side of both servers (`wasmtime serve`'s default
/// for p3 components).
const REUSE: u32 = 128;
/// Requests one p3 instance serves at once (`wasmtime serve`'s default, and Shoal's).
const CONCURRENT: u32 = 16;

/// The body every server answers with, native or not.
const GREETING: &str = "Hello from Shoal!";

#[derive(Clone, Copy)]
struct Mode {
    p3: bool,
    reuse: u32,
}

impl Mode {
    fn name(self) -> String {
        let wasi = if self.p3 { "p3" } else { "p2" };
        match self.reuse {
            1 => format!("{wasi}, fresh instance"),
            n if self.p3 => format!("{wasi}, reuse {n} ({CONCURRENT} at once)"),
            n => format!("{wasi}, reuse {n}"),
        }
    }

    /// The app's name, route and spec: the example's, with this mode's reuse.
    fn app(self) -> (&'static str, String) {
        let reuse = self.reuse;
        if self.p3 {
            let text = std::fs::read_to_string(format!("{}/hello-p3/app.toml", examples()))
                .unwrap()
                .replace("reuse = 128", &format!("reuse = {reuse}"));
            ("hello-p3", text)
        } else {
            let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
                .unwrap()
                .replace(
                    "routes = [\"/hello\"]",
                    &format!("routes = [\"/hello\"]\nreuse = {reuse}"),
                );
            ("hello", text)
        }
    }
}

const MODES: [Mode; 4] = [
    Mode {
        p3: false,
        reuse: 1,
    },
    Mode {
        p3: false,
        reuse: REUSE,
    },
    Mode { p3: true, reuse: 1 },
    Mode {
        p3: true,
        reuse: REUSE,
    },
];

/// A load of `url` after a warm-up of a few seconds.
fn measure(url: &str, seconds: u64, connections: u64) -> wrk::Wrk {
    wrk::run(url, 3, connections);
    let result = wrk::run(url, seconds, connections);
    assert_eq!(result.errors, "none", "{url}: {}", result.errors);
    result
}

/// `shoal up` serving `mode`'s app.
fn shoal(mode: Mode) -> (Cluster, String) {
    let c = Cluster::start();
    let (name, text) = mode.app();
    let text = text.replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(c.config().parent().unwrap(), &format!("{name}.toml"), &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw(&format!("/{name}"), 200, "");
    let url = format!("{}/{name}", c.gateway);
    (c, url)
}

/// `wasmtime serve` on `mode`'s component with the same reuse.
fn wasmtime(mode: Mode) -> (Proc, String) {
    let bin = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "serve",
        "-Scli",
        "-O",
        "pooling-allocator",
        "-O",
        &format!(
            "pooling-memory-keep-resident={}",
            shoal_runtime::memory_reset().0
        ),
        "-O",
        "pooling-table-keep-resident=65536",
        "-O",
        "pooling-pagemap-scan=auto",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--max-instance-reuse-count",
        &mode.reuse.to_string(),
    ]);
    if mode.p3 {
        cmd.args([
            "--max-instance-concurrent-reuse-count",
            &CONCURRENT.to_string(),
        ]);
    }
    let wasm = if mode.p3 { "hello_p3" } else { "hello" };
    let child = cmd
        .arg(format!(
            "{}/target/wasm32-wasip2/release/{wasm}.wasm",
            examples()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}; set WASMTIME=/path/to/wasmtime 48"));
    let url = format!("http://127.0.0.1:{port}/hello");
    wait_up(&url);
    (Proc(child), url)
}

/// A native hyper server answering every request with the greeting, on two threads (the
/// machine's cores), keep-alive: what serving costs with no Wasm at all.
fn native() -> (tokio::runtime::Runtime, String) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/hello", listener.local_addr().unwrap());
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(|_req| async {
                let body = http_body_util::Full::new(bytes::Bytes::from(format!("{GREETING}\n")));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    wait_up(&url);
    (runtime, url)
}

fn wait_up(url: &str) {
    let client = common::client();
    let up = poll(Duration::from_secs(30), || {
        client
            .get(url)
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    assert!(up, "nothing answered on {url}");
}

/// Median and spread of one side's rounds.
struct Summary {
    rps: f64,
    low: f64,
    high: f64,
    p99: f64,
}

fn summary(rounds: &[wrk::Wrk]) -> Summary {
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let rps: Vec<f64> = rounds.iter().map(|r| r.rps).collect();
    Summary {
        low: rps.iter().copied().fold(f64::INFINITY, f64::min),
        high: rps.iter().copied().fold(0.0, f64::max),
        rps: median(rps),
        p99: median(rounds.iter().map(|r| millis(&r.p99)).collect()),
    }
}

fn print_summaries(sides: &[String], results: &[Vec<wrk::Wrk>]) -> Vec<Summary> {
    println!();
    println!("| server | median requests/s | spread | median p99 |");
    println!("|---|---|---|---|");
    let summaries: Vec<Summary> = results.iter().map(|r| summary(r)).collect();
    for (side, s) in sides.iter().zip(&summaries) {
        println!(
            "| {side} | {:.0} | {:.0}–{:.0} | {:.2} ms |",
            s.rps, s.low, s.high, s.p99
        );
    }
    summaries
}

fn local(seconds: u64, connections: u64, rounds: usize) {
    let version = Command::new(std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "wasmtime (not found)".into());
    let mut sides = vec!["native hyper hello (no Wasm)".to_string()];
    for mode in MODES {
        sides.push(format!("shoal, {}", mode.name()));
        sides.push(format!("{version} serve, {}", mode.name()));
    }
    println!(
        "## Hot path: GET through each server, wrk -t2 -c{connections} -d{seconds}s, one server at a time"
    );
    println!();
    println!("| round | server | requests/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let mut results: Vec<Vec<wrk::Wrk>> = sides.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, side) in sides.iter().enumerate() {
            let result = if i == 0 {
                let (runtime, url) = native();
                let result = measure(&url, seconds, connections);
                runtime.shutdown_background();
                result
            } else {
                let mode = MODES[(i - 1) / 2];
                if i % 2 == 1 {
                    let (_shoal, url) = shoal(mode);
                    measure(&url, seconds, connections)
                } else {
                    let (_wasmtime, url) = wasmtime(mode);
                    measure(&url, seconds, connections)
                }
            };
            println!(
                "| {round} | {side} | {:.0} | {} | {} |",
                result.rps, result.p50, result.p99
            );
            results[i].push(result);
        }
    }
    let s = print_summaries(&sides, &results);
    println!();
    println!("| mode | shoal / wasmtime serve | shoal / native | wasmtime serve / native |");
    println!("|---|---|---|---|");
    for (m, mode) in MODES.iter().enumerate() {
        let (shoal, peer) = (&s[1 + 2 * m], &s[2 + 2 * m]);
        println!(
            "| {} | {:.2}x | {:.2}x | {:.2}x |",
            mode.name(),
            shoal.rps / peer.rps,
            shoal.rps / s[0].rps,
            peer.rps / s[0].rps
        );
    }
}

/// A control plane and two nodes (hops over HTTP/2 if `http2`) running one replica of each
/// mode's app; for each app, its own node's gateway URL and the other node's, and the two
/// nodes' process ids in that order.
type Paths = Vec<([String; 2], [u32; 2])>;

/// With `pinned`, the replica's node is started on CPU 1 alone and the control plane and the
/// other node on CPU 0 alone, as two one-CPU machines: each sizes its threads (tokio's
/// workers, the guests' and the batch pools) by the one CPU it has, as it would there. The
/// replicas go to the CPU 1 node by a node selector.
fn two_nodes(
    modes: &[Mode],
    http2: bool,
    pinned: bool,
) -> (tempfile::TempDir, Server, Vec<NodeProc>, Paths) {
    let protocol = if http2 { "http2" } else { "http1" };
    let (dir, server, nodes) = match pinned {
        false => cluster(2, &["--hop-protocol", protocol]),
        true => {
            let dir = tempfile::tempdir().unwrap();
            let server = on_cpu(0, || Server::start(dir.path()));
            let replica = ["--hop-protocol", protocol, "--label", "bench=replica"];
            let nodes = vec![
                on_cpu(1, || NodeProc::join(&server, "node-1", &replica)),
                on_cpu(0, || {
                    NodeProc::join(&server, "node-2", &["--hop-protocol", protocol])
                }),
            ];
            let ready = || server.nodes_ready() == 2;
            assert!(poll(Duration::from_secs(20), ready), "nodes never Ready");
            (dir, server, nodes)
        }
    };
    let mut urls = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        // One app per mode, each under its own name and route.
        let (name, text) = mode.app();
        let app = format!("m{i}-{name}");
        let mut text = text
            .replace("../target", &format!("{}/target", examples()))
            .replace(&format!("name = \"{name}\""), &format!("name = \"{app}\""))
            .replace(&format!("\"/{name}\""), &format!("\"/{app}\""));
        if pinned {
            text.push_str("\n[placement]\nnode_selector = { bench = \"replica\" }\n");
        }
        let spec = write_spec(dir.path(), &format!("{app}.toml"), &text);
        server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
        assert!(poll(Duration::from_secs(30), || server
            .ready_nodes(&app)
            .len()
            == 1));
        let home = server.ready_nodes(&app)[0].clone();
        let own = nodes.iter().find(|n| n.name == home).unwrap();
        let other = nodes.iter().find(|n| n.name != home).unwrap();
        let path = format!("/{app}");
        assert!(poll(Duration::from_secs(10), || other
            .get(&path)
            .is_ok_and(|(c, _)| c == 200)));
        urls.push((
            [
                format!("{}{path}", own.gateway),
                format!("{}{path}", other.gateway),
            ],
            [own.pid(), other.pid()],
        ));
    }
    (dir, server, nodes, urls)
}

/// Runs `start` (which spawns processes) with this thread on CPU `cpu` alone, so what it
/// spawns starts there and inherits it, then puts the thread back where it was.
fn on_cpu<T>(cpu: usize, start: impl FnOnce() -> T) -> T {
    // SAFETY: plain system calls on this thread (0) with a set of the right size.
    unsafe {
        let mut was: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of_val(&was), &mut was);
        let set = wrk::cpu_set(cpu);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        let started = start();
        libc::sched_setaffinity(0, std::mem::size_of_val(&was), &was);
        started
    }
}

/// `pinned`: the replica's node alone on CPU 1, and the other node, the control plane and
/// `wrk` on CPU 0, as if the nodes were two one-CPU machines (`wrk` shares the forwarding
/// node's: a third machine is what this one lacks). `wrk_batch`: `wrk` under `SCHED_BATCH`.
fn hop(seconds: u64, connections: u64, rounds: usize, pinned: bool, wrk_batch: bool) {
    // `BENCH_MODES=p3,reuse` keeps the modes whose names hold every word; `BENCH_PROTOCOLS`
    // is `http1`, `http2` or both (the default).
    let words = std::env::var("BENCH_MODES").unwrap_or_default();
    let modes: Vec<Mode> = MODES
        .into_iter()
        .filter(|m| words.split(',').all(|w| m.name().contains(w.trim())))
        .collect();
    assert!(!modes.is_empty(), "BENCH_MODES={words:?} matches no mode");
    let protocols: Vec<(&str, bool)> = [("HTTP/1.1", false), ("HTTP/2", true)]
        .into_iter()
        .filter(
            |(_, http2)| match std::env::var("BENCH_PROTOCOLS").as_deref() {
                Ok("http1") => !http2,
                Ok("http2") => *http2,
                _ => true,
            },
        )
        .collect();
    let mut sides = Vec::new();
    for (protocol, _) in &protocols {
        for mode in &modes {
            sides.push(format!("{}, its node's gateway", mode.name()));
            sides.push(format!("{}, one hop ({protocol})", mode.name()));
        }
    }
    println!();
    let placement = match (pinned, wrk_batch) {
        (true, true) => {
            ", the replica's node alone on CPU 1, the rest on CPU 0, wrk under SCHED_BATCH"
        }
        (true, false) => ", the replica's node alone on CPU 1, the rest on CPU 0",
        (false, _) => "",
    };
    println!(
        "## Cross-node hop: 2 nodes{placement}, GET through a gateway, wrk -t2 -c{connections} -d{seconds}s"
    );
    println!();
    println!("| round | path | requests/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let mut results: Vec<Vec<wrk::Wrk>> = sides.iter().map(|_| Vec::new()).collect();
    // CPU µs per request of [the replica's node, the other node], then the share of one CPU
    // the replica's node kept busy, per side and round.
    let mut cpu: Vec<Vec<[f64; 3]>> = sides.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (p, &(_, http2)) in protocols.iter().enumerate() {
            let (_dir, _server, _nodes, urls) = two_nodes(&modes, http2, pinned);
            let wrk_cpu = pinned.then_some(0);
            for (m, ([own, other], pids)) in urls.iter().enumerate() {
                for (k, url) in [own, other].into_iter().enumerate() {
                    let i = p * 2 * modes.len() + 2 * m + k;
                    wrk::run_on(url, 3, connections, wrk_cpu, wrk_batch);
                    let before = pids.map(cpu_seconds);
                    let result = wrk::run_on(url, seconds, connections, wrk_cpu, wrk_batch);
                    let after = pids.map(cpu_seconds);
                    assert_eq!(result.errors, "none", "{url}: {}", result.errors);
                    let requests = result.rps * seconds as f64;
                    let used = [0, 1].map(|n| after[n] - before[n]);
                    let per_request = [
                        used[0] / requests * 1e6,
                        used[1] / requests * 1e6,
                        used[0] / seconds as f64,
                    ];
                    println!(
                        "| {round} | {} | {:.0} | {} | {} |",
                        sides[i], result.rps, result.p50, result.p99
                    );
                    results[i].push(result);
                    cpu[i].push(per_request);
                }
            }
        }
    }
    let s = print_summaries(&sides, &results);
    println!();
    let heads: Vec<String> = protocols
        .iter()
        .map(|(protocol, _)| format!("one hop / local, {protocol}"))
        .collect();
    println!("| mode | {} |", heads.join(" | "));
    println!("|---{}|", "|---".repeat(protocols.len()));
    let n = modes.len();
    for (m, mode) in modes.iter().enumerate() {
        let ratios: Vec<String> = (0..protocols.len())
            .map(|p| {
                format!(
                    "{:.2}x",
                    s[p * 2 * n + 2 * m + 1].rps / s[p * 2 * n + 2 * m].rps
                )
            })
            .collect();
        println!("| {} | {} |", mode.name(), ratios.join(" | "));
    }
    // Unpinned, both nodes and wrk share this machine's cores, so a hop's forwarding pass is
    // paid from the CPU the serving node would use. Apart, the serving node's own CPU per
    // request is what bounds it: local over hop is what the hop would reach with the
    // forwarding gateway on cores of its own (an estimate; `BENCH_PIN=1` measures it).
    // Pinned, the replica's node busy below 100 % of its CPU on a hop says what bounds the
    // hop is the other CPU: the forwarding node, with `wrk` beside it.
    println!();
    println!(
        "| mode | protocol | CPU µs/request, replica's node, local | same, one hop | forwarding node, one hop | replica's node local / hop | replica's node busy, local / hop |"
    );
    println!("|---|---|---|---|---|---|---|");
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (p, (protocol, _)) in protocols.iter().enumerate() {
        for (m, mode) in modes.iter().enumerate() {
            let (local, hop) = (p * 2 * n + 2 * m, p * 2 * n + 2 * m + 1);
            let serving_local = median(cpu[local].iter().map(|c| c[0]).collect());
            let serving_hop = median(cpu[hop].iter().map(|c| c[0]).collect());
            let forwarding = median(cpu[hop].iter().map(|c| c[1]).collect());
            let busy = |side: usize| median(cpu[side].iter().map(|c| c[2] * 100.0).collect());
            println!(
                "| {} | {protocol} | {serving_local:.0} | {serving_hop:.0} | {forwarding:.0} | {:.2}x | {:.0} % / {:.0} % |",
                mode.name(),
                serving_local / serving_hop,
                busy(local),
                busy(hop)
            );
        }
    }
}

/// CPU time a process has used so far, in seconds (`/proc/PID/stat`: user + system ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the node's stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds = env_or("BENCH_ROUNDS", 3) as usize;
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let pinned = env_or("BENCH_PIN", 0) == 1;
    let wrk_batch = pinned && env_or("BENCH_WRK_BATCH", 0) == 1;
    // SAFETY: sysconf has no preconditions.
    if pinned && unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        panic!("BENCH_PIN=1 needs two CPUs");
    }
    if only.is_empty() || only == "local" {
        local(seconds, connections, rounds);
    }
    if only.is_empty() || only == "hop" {
        hop(seconds, connections, rounds, pinned, wrk_batch);
    }
}
