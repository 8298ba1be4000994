//! How many applies the control plane acknowledges per second, and their p99 latency, with 1, 8
//! and 32 concurrent clients: each client POSTs `/v1/apps` over HTTP (plain, keep-alive), one
//! request at a time, each creating a new app; an apply is acknowledged when its 201 arrives,
//! after the store commit holding its write is durable. Beside it, the store alone: `txn`s
//! from as many threads, each putting one key, through the same store.
//!
//! The control plane runs in this process with its controller, as `shoal server --plain-http`
//! does, on a fresh store; clients share the process and its cores. Apps are created with
//! `replicas = 0`: there are no nodes, so the controller has nothing to place and the number is
//! the apply path's own. The store is a redb file in a temp dir (group commit), or with
//! `BENCH_STORE=etcd` a three-member etcd cluster on loopback (`shoal_etcd::testing`, each
//! member fsyncing to the same disk), kept as `shoal server --store etcd://…` keeps it (module
//! bytes in the store too); this process is then the one server, so the controller runs
//! without an election. On etcd every round also says what etcd did meanwhile, from its own
//! metrics: raft proposals committed (one per Shoal transaction that writes), WAL fsyncs per
//! member (raft batches the proposals that arrive together into one) and reads answered.
//!
//! Run with `cargo bench -p shoal-control --bench applies`. Knobs: `BENCH_STORE` (`redb` or
//! `etcd`, default `redb`), `BENCH_SECONDS` (per measurement, default 5), `BENCH_ROUNDS` (3),
//! `BENCH_CLIENTS` (`1,8,32`), `BENCH_AUDIT_LOG` (`on`, or `off` as `--audit-log off`). Prints
//! every round, then per client count the median round with
//! the spread of the rounds.

use std::time::{Duration, Instant};

use std::sync::Arc;

use shoal_control::{ControlConfig, ControlPlane, ServeLimits};
use shoal_etcd::EtcdStore;
use shoal_etcd::testing::EtcdCluster;
use shoal_store::{BlobStore, KvStore, Op, Store, Txn};

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
fn store_txns(store: &dyn KvStore, tag: &str, threads: usize, seconds: u64) -> Round {
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
                        // Outside `/`, where the cluster's keys are: the controller, which
                        // watches `/`, does not wake for each of these.
                        let key = format!("bench/{tag}/{t}/{i}");
                        let txn = Txn::new().then(Op::put(key, [0u8; 64]));
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
/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

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
    let value = |name: &str| metric(&text, name);
    (
        value("shoal_store_commit_duration_seconds_count") as u64,
        value("shoal_store_commit_duration_seconds_sum"),
    )
}

/// What etcd's members have done so far, from their `/metrics`: raft proposals committed (the
/// highest of the members' counts: the leader's), WAL fsyncs and reads (`Range` calls) answered,
/// both summed over the members.
#[derive(Clone, Copy, Default)]
struct EtcdWork {
    proposals: f64,
    fsyncs: f64,
    reads: f64,
}

async fn etcd_work(endpoints: &[String]) -> EtcdWork {
    let mut work = EtcdWork::default();
    for endpoint in endpoints {
        let text = reqwest::get(format!("http://{endpoint}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| metric(&text, name);
        work.proposals = work
            .proposals
            .max(value("etcd_server_proposals_committed_total"));
        work.fsyncs += value("etcd_disk_wal_fsync_duration_seconds_count");
        work.reads += text
            .lines()
            .filter(|l| {
                l.starts_with("grpc_server_handled_total{") && l.contains("grpc_method=\"Range\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    work
}

/// Where the control plane keeps its state, and how to ask etcd what it did.
struct Backend {
    name: &'static str,
    store: Arc<dyn KvStore>,
    /// The etcd cluster (kept alive for the run) and its members' addresses.
    etcd: Option<(EtcdCluster, Vec<String>)>,
}

impl Backend {
    fn start(kind: &str, dir: &std::path::Path) -> Backend {
        match kind {
            "redb" => Backend {
                name: "redb",
                store: Arc::new(Store::open(&dir.join("state.redb")).unwrap()),
                etcd: None,
            },
            "etcd" => {
                let cluster = EtcdCluster::on_disk();
                let store = EtcdStore::connect(&cluster.config()).unwrap();
                let endpoints = cluster.endpoints();
                Backend {
                    name: "etcd ×3",
                    store: Arc::new(store),
                    etcd: Some((cluster, endpoints)),
                }
            }
            other => panic!("BENCH_STORE={other}: redb or etcd"),
        }
    }

    /// etcd's work so far; nothing on redb.
    async fn etcd_work(&self) -> Option<EtcdWork> {
        match &self.etcd {
            Some((_, endpoints)) => Some(etcd_work(endpoints).await),
            None => None,
        }
    }

    fn members(&self) -> f64 {
        self.etcd.as_ref().map_or(0.0, |(_, e)| e.len() as f64)
    }
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

/// Bytes this process has caused to be written to storage, from `/proc/self/io`: the pages
/// its commits write, counted when they reach the page cache.
fn written_bytes() -> f64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("write_bytes in /proc/self/io")
}

/// Prints one round, with how many acknowledged operations shared a durable commit, how much
/// of the round's wall time went to committing (`(count, seconds)` of the commits meanwhile),
/// the process's CPU time and storage writes per acknowledged operation (`cpu` seconds and
/// `written` bytes meanwhile), and its writes per commit; on etcd,
/// also its proposals and WAL fsyncs per member meanwhile (`etcd`: theirs, and the members).
fn print_round(
    what: &str,
    clients: usize,
    round: usize,
    r: &Round,
    commits: (u64, f64),
    (cpu, written): (f64, f64),
    etcd: Option<(EtcdWork, f64)>,
) {
    // On redb a commit is a group commit, one at a time; on etcd each transaction is one and
    // many overlap, so their summed time says nothing of the wall time.
    let committing = match etcd {
        None => format!(
            "committing {:.0} % of the time, ",
            commits.1 / r.took.as_secs_f64() * 100.0
        ),
        Some(_) => String::new(),
    };
    let etcd = etcd.map_or(String::new(), |(work, members)| {
        let fsyncs = work.fsyncs / members;
        format!(
            "; etcd: {:.0} proposals, {:.2} per op, {:.0} WAL fsyncs per member, {:.2} per op, {:.1} reads per op",
            work.proposals,
            work.proposals / r.count.max(1) as f64,
            fsyncs,
            fsyncs / r.count.max(1) as f64,
            work.reads / r.count.max(1) as f64,
        )
    });
    println!(
        "{what:<6} clients={clients:<3} round={round} {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} acked, {} commits, {:.1} acked per commit, {committing}{:.2} ms each; CPU {:.3} ms per op, {:.2} cores; wrote {:.1} KiB per op, {:.0} KiB per commit{etcd})",
        r.per_second,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.count,
        commits.0,
        r.count as f64 / commits.0.max(1) as f64,
        commits.1 / commits.0.max(1) as f64 * 1e3,
        cpu / r.count.max(1) as f64 * 1e3,
        cpu / r.took.as_secs_f64(),
        written / r.count.max(1) as f64 / 1024.0,
        written / commits.0.max(1) as f64 / 1024.0,
    );
}

/// What a round is measured from: the store's commits and their seconds, this process's CPU
/// seconds and bytes written, and etcd's work.
type Before = ((u64, f64), (f64, f64), Option<EtcdWork>);

fn since(before: (u64, f64), after: (u64, f64)) -> (u64, f64) {
    (after.0 - before.0, after.1 - before.1)
}

fn etcd_since(before: Option<EtcdWork>, after: Option<EtcdWork>) -> Option<EtcdWork> {
    Some(EtcdWork {
        proposals: after?.proposals - before?.proposals,
        fsyncs: after?.fsyncs - before?.fsyncs,
        reads: after?.reads - before?.reads,
    })
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
    let backend = Backend::start(&env_or("BENCH_STORE", "redb"), dir.path());
    let blobs = BlobStore::open(&dir.path().join("modules")).unwrap();
    let config = ControlConfig {
        token: TOKEN.into(),
        shared_store: backend.etcd.is_some(),
        // As `shoal server` runs by default: each apply is a line of the audit log
        // (`BENCH_AUDIT_LOG=off`: none, as `--audit-log off`).
        audit_log: (env_or("BENCH_AUDIT_LOG", "on") != "off").then(|| dir.path().join("audit.log")),
        ..ControlConfig::default()
    };
    let cp = ControlPlane::with_clock(
        Arc::clone(&backend.store),
        blobs,
        config,
        Arc::new(shoal_core::clock::SystemClock),
    )
    .unwrap();
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
            ServeLimits::default().clients(),
        ));
        base
    });
    // A real component: an apply checks that it exports what its kind runs.
    let digest = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{base}/v1/modules"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/wasm")
            .body(shoal_fixtures::read(shoal_fixtures::HELLO_WASM))
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
    let measured = |r: &Round, what: &str, clients, round, before: Before| {
        let used = (cpu_seconds() - before.1.0, written_bytes() - before.1.1);
        let during = since(before.0, rt.block_on(commits(&base)));
        let etcd = etcd_since(before.2, rt.block_on(backend.etcd_work()));
        let members = backend.members();
        print_round(
            what,
            clients,
            round,
            r,
            during,
            used,
            etcd.map(|w| (w, members)),
        );
    };
    let before = || -> Before {
        (
            rt.block_on(commits(&base)),
            (cpu_seconds(), written_bytes()),
            rt.block_on(backend.etcd_work()),
        )
    };
    // Every apply round first: a store round's hundreds of thousands of revisions would leave
    // the apply round after it a controller whose watch fell behind them (and lost them to
    // its own compaction, so it read the state anew).
    for round in 0..rounds {
        for (n, &clients) in client_counts.iter().enumerate() {
            let at = before();
            let r = rt.block_on(applies(
                &base,
                &digest,
                &format!("r{round}c{clients}"),
                clients,
                seconds,
            ));
            measured(&r, "apply", clients, round, at);
            api[n].push(r);
        }
    }
    for round in 0..rounds {
        for (n, &clients) in client_counts.iter().enumerate() {
            let at = before();
            let r = store_txns(
                &*backend.store,
                &format!("r{round}c{clients}"),
                clients,
                seconds,
            );
            measured(&r, "txn", clients, round, at);
            raw[n].push(r);
        }
    }
    println!("| path | clients | median /s | spread /s | p99 (median round) | p99 spread |");
    println!("|---|---|---|---|---|---|");
    for (n, &clients) in client_counts.iter().enumerate() {
        summary(
            &format!("apply (HTTP), {}", backend.name),
            clients,
            &mut api[n],
        );
    }
    for (n, &clients) in client_counts.iter().enumerate() {
        summary(
            &format!("store txn, {}", backend.name),
            clients,
            &mut raw[n],
        );
    }
}
