//! Lifecycle measurements on real processes (`shoal server` + 3 `shoal node
//! join`): rolling updates of 20 replicas under load, `rollout undo`, the
//! automatic rollback of a revision that never gets ready, and the
//! replacement of a replica whose liveness probe fails on its node.
//! Run with `make bench` (or `cargo bench --bench lifecycle`).
//! Knob: `BENCH_RUNS` (default 1): repeat everything, print medians.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/wrk.rs"]
mod wrk;

use common::{Load, LoadResult, NodeProc, Server, cluster, faulty_spec, poll};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wrk::env_or;

const REPLICAS: u32 = 20;
const READINESS: &str =
    "[health.readiness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";
const SURGE5: &str = "[rollout]\nmax_surge = 5\n";
const BAD: &str = "HEALTHZ_STATUS = \"503\"";
const DEADLINE: &str = "[rollout]\nprogress_deadline = \"5s\"\n";
const LIVENESS: &str =
    "[health.liveness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";
const SICK: &str = "NODE = \"$(node)\"\nSICK_NODE = \"node-1\"";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The faulty example as `VERSION = version`, with more env and sections; returns its path.
fn faulty(dir: &std::path::Path, replicas: u32, version: u32, env: &str, extra: &str) -> String {
    faulty_spec(
        dir,
        &format!("v{version}.toml"),
        replicas,
        &format!("[env]\nVERSION = \"{version}\"\n{env}\n{extra}"),
    )
}

fn rollout_view(server: &Server) -> serde_json::Value {
    server.api_json("/v1/apps/faulty/rollout")
}

/// The app runs `rev`, with all `REPLICAS` replicas of `rev` Ready and no other.
fn settled(server: &Server, rev: u64) -> bool {
    if rollout_view(server)["revision"] != rev {
        return false;
    }
    let replicas = server.replicas("faulty");
    replicas.len() == REPLICAS as usize
        && replicas
            .iter()
            .all(|r| r["revision"] == rev && r["phase"] == "Ready")
}

/// Rollout of the current revision Complete, and every replica on it and Ready.
fn complete(server: &Server) -> bool {
    let view = rollout_view(server);
    let rev = view["revision"].as_u64().unwrap();
    view["status"]["revision"] == rev
        && view["status"]["phase"] == "Complete"
        && settled(server, rev)
}

fn merge(a: LoadResult, b: LoadResult) -> LoadResult {
    let mut r = a;
    r.ok += b.ok;
    r.failed += b.failed;
    r.failures.extend(b.failures);
    for (body, n) in b.bodies {
        *r.bodies.entry(body).or_default() += n;
    }
    r
}

/// Starts 2 clients on node-1's and node-2's gateways, runs `act`, waits for
/// `done`; returns the time from `act` to `done` and what the clients saw.
fn under_load(
    server: &Server,
    nodes: &[NodeProc],
    what: &str,
    act: impl FnOnce(),
    done: impl Fn() -> bool,
) -> (f64, LoadResult, usize) {
    let loads: Vec<Load> = nodes[..2]
        .iter()
        .map(|n| Load::start(format!("{}/faulty/env/VERSION", n.gateway)))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    act();
    // Sampled between checks, so a short-lived peak can be missed.
    let mut peak = 0;
    let finished = poll(Duration::from_secs(120), || {
        peak = peak.max(server.replicas("faulty").len());
        done()
    });
    let secs = start.elapsed().as_secs_f64();
    let result = loads
        .into_iter()
        .map(Load::stop)
        .reduce(merge)
        .unwrap_or_default();
    assert!(
        finished,
        "{what}: not done after 120 s: {}\n{:?}",
        rollout_view(server),
        server.replicas("faulty")
    );
    (secs, result, peak)
}

/// One measure: seconds per run, requests per run ("ok / failed"), failures seen.
#[derive(Default)]
struct Row {
    measure: String,
    secs: Vec<f64>,
    requests: Vec<String>,
    failures: Vec<String>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn record(&mut self, measure: &str, secs: f64, load: Option<(&LoadResult, usize)>) {
        let i = match self.rows.iter().position(|r| r.measure == measure) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    measure: measure.to_string(),
                    ..Row::default()
                });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[i];
        row.secs.push(secs);
        if let Some((l, peak)) = load {
            row.requests.push(format!("{} / {}", l.ok, l.failed));
            row.failures.extend(l.failures.iter().cloned());
            self.notes.push(format!(
                "{measure}: responses by body {:?}; most replicas seen at once {peak}",
                l.bodies
            ));
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rollouts(report: &mut Report) {
    let (dir, server, nodes) = cluster(3, &[]);
    let d = dir.path();
    let apply = |path: String| {
        server.cli_ok(&["apply", "-f", &path]);
    };

    // v1: 20 replicas, default rollout knobs.
    apply(faulty(d, REPLICAS, 1, "", READINESS));
    assert!(poll(Duration::from_secs(120), || complete(&server)));
    let on: BTreeMap<String, usize> =
        server
            .replicas("faulty")
            .iter()
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r["node"].as_str().unwrap().to_string())
                    .or_default() += 1;
                m
            });
    report.notes.push(format!("v1 replicas per node: {on:?}"));

    // 1a. v1 → v2, max_surge 1, max_unavailable 0 (defaults).
    let (secs, load, peak) = under_load(
        &server,
        &nodes,
        "v1 → v2",
        || apply(faulty(d, REPLICAS, 2, "", READINESS)),
        || complete(&server),
    );
    report.record(
        "rolling update v1 → v2, max_surge 1, max_unavailable 0 (defaults)",
        secs,
        Some((&load, peak)),
    );

    // 2. `rollout undo` → a new revision with v1's template (still the default knobs).
    let (secs, load, peak) = under_load(
        &server,
        &nodes,
        "undo",
        || {
            server.cli_ok(&["rollout", "undo", "faulty"]);
        },
        || complete(&server),
    );
    report.record(
        "`shoal rollout undo` v2 → v1 (new revision), default knobs",
        secs,
        Some((&load, peak)),
    );

    // 1b. v1 → v2 again, max_surge 5.
    let (secs, load, peak) = under_load(
        &server,
        &nodes,
        "v1 → v2 surge 5",
        || apply(faulty(d, REPLICAS, 2, "", &format!("{READINESS}{SURGE5}"))),
        || complete(&server),
    );
    report.record(
        "rolling update v1 → v2, max_surge 5, max_unavailable 0",
        secs,
        Some((&load, peak)),
    );
    let stable = rollout_view(&server)["revision"].as_u64().unwrap();

    // 3. Bad v3 (readiness never passes): rolled back by itself after progress_deadline.
    let (secs, load, peak) = under_load(
        &server,
        &nodes,
        "bad v3",
        || {
            apply(faulty(
                d,
                REPLICAS,
                3,
                BAD,
                &format!("{READINESS}{DEADLINE}"),
            ))
        },
        || settled(&server, stable),
    );
    report.record(
        "bad v3 (HEALTHZ_STATUS=503, progress_deadline 5s) → back on v2's revision, no v3 replica",
        secs,
        Some((&load, peak)),
    );
    let view = rollout_view(&server);
    report.notes.push(format!(
        "after bad v3: revision {} (stable was {stable}), rollout {}: {}",
        view["revision"], view["status"]["phase"], view["status"]["message"]
    ));
}

fn liveness(report: &mut Report) {
    let (dir, server, nodes) = cluster(3, &[]);
    let spec = faulty(dir.path(), 1, 1, SICK, LIVENESS);
    let applied_ms = now_ms();
    let applied = Instant::now();
    server.cli_ok(&["apply", "-f", &spec]);
    let mut landed = String::new();
    assert!(poll(Duration::from_secs(30), || {
        match server.replicas("faulty").first() {
            Some(r) if r["node"].is_string() => {
                landed = r["node"].as_str().unwrap().to_string();
                true
            }
            _ => false,
        }
    }));
    if landed != "node-1" {
        report.notes.push(format!(
            "liveness: the replica landed on {landed}, not node-1: never sick, nothing measured"
        ));
        return;
    }
    // node-3's gateway: not the sick node, and not where bin packing puts the replacement.
    let gw = &nodes[2];
    let (mut served_ms, mut served_by) = (0, String::new());
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut error_window: Option<(f64, f64)> = None;
    let mut failed = |what: String| {
        *errors.entry(what).or_default() += 1;
        let t = applied.elapsed().as_secs_f64();
        error_window = Some(error_window.map_or((t, t), |(first, _)| (first, t)));
        false
    };
    let replaced = poll(Duration::from_secs(60), || {
        match gw.get("/faulty/env/NODE") {
            Ok((200, body)) if body != landed => {
                served_ms = now_ms();
                served_by = body;
                true
            }
            Ok((200, _)) => false,
            Ok((code, body)) => failed(format!("{code}: {body}")),
            Err(e) => failed(e),
        }
    });
    let served = applied.elapsed().as_secs_f64();
    assert!(
        replaced,
        "never served elsewhere: {:?}\n{}",
        server.replicas("faulty"),
        server.cli_ok(&["events", "--app", "faulty"])
    );
    let events = server.api_json("/v1/events?app=faulty&limit=1000");
    let first = |reason: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["reason"] == reason)
            .and_then(|e| e["time"].as_u64())
    };
    let since = |t: u64| (t as f64 - applied_ms as f64) / 1000.0;
    let restarted = first("Restarted").expect("a Restarted event");
    report.record(
        "liveness: apply → first 200 from the replacement on another node",
        served,
        None,
    );
    report.record(
        "liveness: first `Restarted` event → first 200 from the replacement",
        (served_ms - restarted) as f64 / 1000.0,
        None,
    );
    let mut timeline = format!("liveness timeline (s after apply, replica on {landed}):");
    for reason in ["Restarted", "Failed", "Replacing"] {
        if let Some(t) = first(reason) {
            timeline.push_str(&format!(" first {reason} {:.2},", since(t)));
        }
    }
    let restarts = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "Restarted")
        .count();
    timeline.push_str(&format!(
        " served by {served_by} {:.2}; {restarts} Restarted events",
        since(served_ms)
    ));
    if let Some((first, last)) = error_window {
        timeline.push_str(&format!(
            "; answers other than 200 at node-3's gateway between {first:.2} and {last:.2}: {errors:?}"
        ));
    }
    report.notes.push(timeline);
}

fn main() {
    let runs = env_or("BENCH_RUNS", 1).max(1);
    let mut report = Report::default();
    let started = Instant::now();
    for _ in 0..runs {
        rollouts(&mut report);
        liveness(&mut report);
    }

    println!(
        "## Lifecycle: `shoal server` + 3 nodes, {REPLICAS} replicas of faulty, 2 clients looping GET /faulty/env/VERSION on node-1's and node-2's gateways"
    );
    println!();
    println!("Spec knobs (appended to examples/faulty/app.toml, `[env] VERSION = \"N\"`):");
    println!("  all rollouts: {READINESS:?}");
    println!("  max_surge 5: {SURGE5:?}");
    println!("  bad v3: env {BAD:?} + {DEADLINE:?}");
    println!("  liveness app (1 replica): env {SICK:?} + {LIVENESS:?}");
    println!();
    let what = if runs > 1 {
        format!("median of {runs} (min–max)")
    } else {
        "time".to_string()
    };
    println!("| measure | {what} | requests ok / failed |");
    println!("|---|---|---|");
    for Row {
        measure,
        secs,
        requests,
        ..
    } in &report.rows
    {
        let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = secs.iter().copied().fold(0.0, f64::max);
        let time = if secs.len() > 1 {
            format!("{:.2} s ({min:.2}–{max:.2})", median(secs))
        } else {
            format!("{:.2} s", median(secs))
        };
        let requests = if requests.is_empty() {
            "-".to_string()
        } else {
            requests.join(", ")
        };
        println!("| {measure} | {time} | {requests} |");
    }
    println!();
    for Row {
        measure, failures, ..
    } in &report.rows
    {
        for f in failures {
            println!("failure during {measure}: {f}");
        }
    }
    for note in &report.notes {
        println!("{note}");
    }
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}
