//! Safe eviction: a control plane that was itself stopped for longer than
//! the node grace evicts nobody when it runs again, nor does one that hears
//! no node at all (a full disruption), and a node that really dies is still
//! found out and its replicas replaced.

#![cfg(target_os = "linux")]

mod common;

use common::{Cluster, Server, cluster, examples, poll, write_spec};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The control plane's default `--node-grace`.
const GRACE: Duration = Duration::from_secs(3);

fn hello_spec(dir: &Path, name: &str, replicas: u32) -> String {
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", &format!("replicas = {replicas}"))
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("\"/hello\"", &format!("\"/{name}\""));
    let path = write_spec(dir, &format!("{name}.toml"), &text);
    path.to_str().unwrap().to_string()
}

/// Ready replicas of `app`: node → replica ids.
fn ready(server: &Server, app: &str) -> BTreeMap<String, Vec<String>> {
    ready_of(server.replicas(app))
}

fn ready_of(replicas: Vec<serde_json::Value>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in replicas {
        if r["phase"] == "Ready" {
            out.entry(r["node"].as_str().unwrap().to_string())
                .or_default()
                .push(r["id"].as_str().unwrap().to_string());
        }
    }
    out
}

/// Objects named in `reason` events.
fn objects_with(server: &Server, reason: &str) -> Vec<String> {
    objects_in(server.api_json("/v1/events?limit=100000"), reason)
}

fn objects_in(events: serde_json::Value, reason: &str) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["object"].as_str().unwrap().to_string())
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The pid of the `shoal server` this test started in `dir` (the harness
/// keeps its handle to itself): our child whose `--data-dir` is `dir/server`.
fn server_pid(dir: &Path) -> libc::pid_t {
    child_pid(&["server", "--data-dir"], &dir.join("server"))
}

/// The pid of the worker `dir/node` this test started.
fn node_pid(dir: &Path, node: &str) -> libc::pid_t {
    child_pid(&["node", "join"], &dir.join(node))
}

/// Our child `shoal` whose arguments begin with `verb` and whose
/// `--data-dir` is `data`.
fn child_pid(verb: &[&str], data: &Path) -> libc::pid_t {
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(cmdline), Ok(stat)) = (
            std::fs::read(entry.path().join("cmdline")),
            std::fs::read_to_string(entry.path().join("stat")),
        ) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.len() > verb.len()
            && verb.iter().zip(&args[1..]).all(|(v, a)| v.as_bytes() == *a)
            && args
                .windows(2)
                .any(|w| w[0] == b"--data-dir" && w[1] == data.as_os_str().as_bytes());
        // `pid (comm) state ppid …`: the parent follows the last ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ours && parent == Some(me) {
            return pid as libc::pid_t;
        }
    }
    panic!("no shoal {verb:?} of ours in {}", data.display());
}

/// Waits until every node was heard from after `since` (wall clock, ms).
fn heard_since(server: &Server, since: u64) {
    assert!(
        poll(Duration::from_secs(20), || {
            let nodes = server.api_json("/v1/nodes");
            let nodes = nodes.as_array().unwrap();
            nodes.len() == 2
                && nodes
                    .iter()
                    .all(|n| n["state"] == "Ready" && n["last_heartbeat"].as_u64().unwrap() > since)
        }),
        "{:#}",
        server.api_json("/v1/nodes")
    );
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn a_stopped_control_plane_evicts_nobody_and_a_dead_node_is_still_replaced() {
    let (dir, server, mut nodes) = cluster(2, &[]);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), "hello", 2)]);
    assert!(
        poll(Duration::from_secs(30), || ready(&server, "hello").len()
            == 2),
        "not one Ready replica per node: {:?}",
        ready(&server, "hello")
    );
    let before = ready(&server, "hello");

    let pid = server_pid(dir.path());
    signal(pid, libc::SIGSTOP);
    // The behaviour under test is what the control plane does once it runs
    // again after being stopped for longer than the grace: this wait is the
    // stop itself, not synchronisation.
    std::thread::sleep(GRACE * 2);
    let resumed = now_ms();
    signal(pid, libc::SIGCONT);

    // Settled: both nodes heard from since, and the controller has passed
    // since (it placed an app applied after the stop).
    heard_since(&server, resumed);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), "probe", 1)]);
    assert!(poll(Duration::from_secs(30), || ready(&server, "probe")
        .len()
        == 1));
    assert_eq!(
        objects_with(&server, "NodeNotReady"),
        Vec::<String>::new(),
        "a live node was marked NotReady"
    );
    assert_eq!(ready(&server, "hello"), before, "replicas were replaced");
    assert_eq!(server.replicas("hello").len(), 2);

    // A node that really dies is still found out, and its replica replaced
    // on the other.
    nodes[1].kill();
    let survivor = before["node-1"][0].clone();
    assert!(
        poll(Duration::from_secs(20), || {
            let now = ready(&server, "hello");
            now.len() == 1
                && now
                    .get("node-1")
                    .is_some_and(|ids| ids.len() == 2 && ids.contains(&survivor))
        }),
        "not replaced: {:?}",
        ready(&server, "hello")
    );
    assert_eq!(objects_with(&server, "NodeNotReady"), ["node/node-2"]);
    let states: BTreeMap<String, String> = server
        .api_json("/v1/nodes")
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap().to_string();
            (field("name"), field("state"))
        })
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            ("node-1".into(), "Ready".into()),
            ("node-2".into(), "NotReady".into()),
        ])
    );
}

/// The control plane runs but hears no node (here: every worker stopped at
/// once, past the grace): a full disruption, which evicts nobody and says
/// so, even though the nodes' leases run out a few passes apart.
#[test]
fn nodes_silent_all_at_once_are_held_not_evicted() {
    let (dir, server, _nodes) = cluster(2, &[]);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), "hello", 2)]);
    assert!(
        poll(Duration::from_secs(30), || ready(&server, "hello").len()
            == 2),
        "not one Ready replica per node: {:?}",
        ready(&server, "hello")
    );
    let before = ready(&server, "hello");

    let pids = ["node-1", "node-2"].map(|n| node_pid(dir.path(), n));
    for pid in pids {
        signal(pid, libc::SIGSTOP);
    }
    // The silence under test, as the control plane itself sees it: both nodes
    // unheard for twice the grace, and the hold it decided meanwhile.
    assert!(
        poll(GRACE * 10, || {
            let nodes = server.api_json("/v1/nodes");
            let silent = nodes.as_array().unwrap().iter().all(|n| {
                let heard = n["last_heartbeat"].as_u64().unwrap();
                now_ms().saturating_sub(heard) > (GRACE * 2).as_millis() as u64
            });
            silent && objects_with(&server, "NodeEvictionHeld") == ["cluster"]
        }),
        "{:#}",
        server.api_json("/v1/nodes")
    );
    // Held Ready, they are shown as what they are: unheard.
    let shown = server.cli_ok(&["get", "nodes"]);
    assert_eq!(shown.matches(" Unknown ").count(), 2, "{shown}");
    let resumed = now_ms();
    for pid in pids {
        signal(pid, libc::SIGCONT);
    }

    heard_since(&server, resumed);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), "probe", 1)]);
    assert!(poll(Duration::from_secs(30), || ready(&server, "probe")
        .len()
        == 1));
    assert_eq!(objects_with(&server, "NodeNotReady"), Vec::<String>::new());
    assert_eq!(objects_with(&server, "NodeEvictionHeld"), ["cluster"]);
    assert_eq!(ready(&server, "hello"), before, "replicas were replaced");
    let shown = server.cli_ok(&["get", "nodes"]);
    assert_eq!(shown.matches(" Ready ").count(), 2, "{shown}");
    assert_eq!(server.replicas("hello").len(), 2);
}

/// The reviewer's case: `shoal up` (control plane and its own node in one
/// process) stopped past the grace used to mark its own node NotReady and
/// replace every replica. A cluster of one has no majority to hold
/// evictions back, so this is the control plane's own clock at work alone.
#[test]
fn a_stopped_shoal_up_does_not_evict_its_own_node() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &hello_spec(c.dir.path(), "hello", 2)]);
    let replicas = || {
        c.api_json("/v1/replicas?app=hello")
            .as_array()
            .unwrap()
            .clone()
    };
    assert!(poll(Duration::from_secs(30), || ready_of(replicas())
        .get("node-1")
        .is_some_and(|ids| ids.len() == 2)));
    let before = ready_of(replicas());

    let pid = c.pid() as libc::pid_t;
    signal(pid, libc::SIGSTOP);
    // The stop under test, as above: not synchronisation.
    std::thread::sleep(GRACE * 2);
    let resumed = now_ms();
    signal(pid, libc::SIGCONT);

    assert!(
        poll(Duration::from_secs(20), || {
            let nodes = c.api_json("/v1/nodes");
            nodes[0]["last_heartbeat"].as_u64().unwrap() > resumed
        }),
        "{:#}",
        c.api_json("/v1/nodes")
    );
    c.cli_ok(&["apply", "-f", &hello_spec(c.dir.path(), "probe", 1)]);
    assert!(poll(Duration::from_secs(30), || {
        let probe = c.api_json("/v1/replicas?app=probe");
        ready_of(probe.as_array().unwrap().clone()).len() == 1
    }));
    assert_eq!(
        objects_in(c.api_json("/v1/events?limit=100000"), "NodeNotReady"),
        Vec::<String>::new()
    );
    assert_eq!(ready_of(replicas()), before, "replicas were replaced");
    assert_eq!(replicas().len(), 2);
}
