//! `shoal server --store etcd://…`: the control plane's state and modules in a real etcd
//! cluster (three members on loopback, `shoal_etcd::testing`), with real server and node
//! processes.

mod common;

use common::{
    Load, NodeProc, Server, app_row, example_spec, expect_ok, faulty_scaled, poll, run_cli,
    write_spec,
};
use shoal_etcd::testing::EtcdCluster;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The files that make a server the cluster's: a second server on the same store is given
/// copies, as a second Kubernetes control plane is given the first one's certificates.
const IDENTITY: [&str; 4] = ["token", "join-token", "ca.pem", "ca-key.pem"];

fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in IDENTITY {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn wait_greeting(node: &NodeProc, greeting: &str) {
    assert!(
        poll(Duration::from_secs(60), || {
            matches!(node.get("/hello"), Ok((200, body)) if body.contains(greeting))
        }),
        "{} never served {greeting:?}: {:?}",
        node.name,
        node.get("/hello")
    );
}

/// A server on etcd runs an app end to end; then it dies for good and a server that never saw
/// the upload, on a data dir of its own, takes over the same store: the app, its revision and
/// its module are there, and a new node gets the module from it.
#[test]
fn a_server_on_etcd_serves_an_app_and_another_takes_over_its_state() {
    let etcd = EtcdCluster::three();
    let store = etcd.url();
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = Server::start_with(first_dir.path(), &["--store", &store]);
    assert!(
        !first_dir.path().join("server/state.redb").exists(),
        "the state is in etcd, not in the data dir"
    );
    let mut node1 = NodeProc::join(&first, "node-1", &[]);
    let spec = write_spec(
        first_dir.path(),
        "hello.toml",
        &example_spec("hello", 1, "Hello from etcd"),
    );
    first.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_greeting(&node1, "Hello from etcd");
    // A [config] near its 1 MiB limit is more than etcd takes in one write (the app and its
    // revision both carry it): refused as too large, saying why, not an internal error.
    let big: String = (0..8)
        .map(|i| format!("k{i} = \"{}\"\n", "x".repeat(120 << 10)))
        .collect();
    let text = example_spec("hello", 1, "big")
        .replace("name = \"hello\"", "name = \"big\"")
        .replace("routes = [\"/hello\"]", "routes = [\"/big\"]");
    let big = write_spec(
        first_dir.path(),
        "big.toml",
        &format!("{text}\n[config]\n{big}"),
    );
    let out = first.cli(&["apply", "-f", big.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("larger than the store takes at once"),
        "{said}"
    );

    first.kill();
    node1.kill();
    let second_dir = tempfile::tempdir().unwrap();
    copy_identity(
        &first_dir.path().join("server"),
        &second_dir.path().join("server"),
    );
    let second = Server::start_with(second_dir.path(), &["--store", &store]);
    assert!(
        !second_dir
            .path()
            .join("server/modules/sha256")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "the second server starts without the module on disk"
    );
    let apps = second.cli_ok(&["get", "apps"]);
    assert!(apps.contains("hello"), "{apps}");
    // node-1 is silent: its replica is replaced on node-2, which fetches the module from
    // the second server.
    let node2 = NodeProc::join(&second, "node-2", &[]);
    if !poll(
        Duration::from_secs(60),
        || matches!(node2.get("/hello"), Ok((200, body)) if body.contains("Hello from etcd")),
    ) {
        panic!(
            "node-2 never served hello:\n{}\n{}",
            second.cli_ok(&["get", "nodes"]),
            second.cli_ok(&["get", "replicas", "-A"])
        );
    }
    let describe = second.cli_ok(&["describe", "app", "hello"]);
    assert!(describe.contains("node-2"), "{describe}");
    // Other servers of the store could not open secrets sealed under a key only this one
    // has: refused while another runs, done once this one is alone (as the README says).
    let third_dir = tempfile::tempdir().unwrap();
    copy_identity(
        &second_dir.path().join("server"),
        &third_dir.path().join("server"),
    );
    let mut third = Server::start_with(third_dir.path(), &["--store", &store]);
    let rotate = second.cli(&["secret", "rotate-key"]);
    assert_eq!(rotate.status.code(), Some(4));
    let said = String::from_utf8_lossy(&rotate.stderr);
    assert!(said.contains("other servers run on this store"), "{said}");
    assert!(said.contains(&third.api), "names the other: {said}");
    third.kill();
    assert!(
        poll(Duration::from_secs(15), || second
            .cli(&["secret", "rotate-key"])
            .status
            .success()),
        "never rotated once alone"
    );
}

/// The tests that kill the leader and time the takeover run one at a time: two at once on a
/// small machine would time each other's load.
static TAKEOVERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Apps the client applies at most (one replica each), so the test's work is bounded. The
/// client runs unpaced (about 50 applies/s here), so this must outlast the takeover.
const APPLIES: usize = 1_000;

/// The apps of `apps` that `server` shows no Ready replica of.
fn not_ready(server: &Server, apps: &[String]) -> Vec<String> {
    let replicas = server.api_json("/v1/replicas");
    let ready: Vec<&str> = replicas
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["phase"] == "Ready")
        .map(|r| r["app"]["name"].as_str().unwrap())
        .collect();
    apps.iter()
        .filter(|a| !ready.contains(&a.as_str()))
        .cloned()
        .collect()
}

/// Which of `servers` lead, by index, as their logs last said: a server that logged that it
/// leads and has not logged since that it lost the leadership or stepped down (a server
/// starved of CPU for its lease's 2 s loses it, and another one leads).
fn leaders(servers: &[&Server]) -> Vec<usize> {
    servers
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            let log = std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default();
            log.lines()
                .rev()
                .find_map(|l| {
                    if l.contains("leading: the controller runs here") {
                        Some(true)
                    } else if l.contains("lost the leadership") || l.contains("stepped down") {
                        Some(false)
                    } else {
                        None
                    }
                })
                .unwrap_or(false)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Three servers on a three-member etcd: exactly one runs the controller. The leader is killed
/// with SIGKILL while a client applies apps through another server and users request an app
/// at the gateways: another server leads within 5 s, every apply that was acknowledged is
/// there, placed by the new leader and started by its node, and no request fails.
#[test]
fn a_killed_leader_is_replaced_within_five_seconds() {
    let _one_at_a_time = TAKEOVERS.lock().unwrap_or_else(|p| p.into_inner());
    let (_etcd, dirs, mut servers, leader) = servers_on(EtcdCluster::three(), 3);
    // Nodes and the client use a server that will stay up.
    let (follower, other) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let nodes: Vec<NodeProc> = (1..=2)
        // Room for every copy of hello (50m of CPU each) the client applies.
        .map(|i| NodeProc::join(&servers[follower], &format!("node-{i}"), &["--cpu", "64"]))
        .collect();
    let spec = write_spec(
        dirs[0].path(),
        "hello.toml",
        &example_spec("hello", 2, "Hello from etcd"),
    );
    servers[follower].cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    for node in &nodes {
        wait_greeting(node, "Hello from etcd");
    }
    let base = servers[follower].api_json("/v1/apps/hello")["app"]["spec"].clone();

    let loads: Vec<Load> = nodes
        .iter()
        .map(|n| Load::start(format!("{}/hello", n.gateway)))
        .collect();
    // Applies of new apps through the follower, before, during and after the kill.
    let acked_count = Arc::new(AtomicUsize::new(0));
    let applier = {
        let (api, token, http) = (
            servers[follower].api.clone(),
            servers[follower].token.clone(),
            servers[follower].http(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = Arc::clone(&stop);
        let count = Arc::clone(&acked_count);
        let thread = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < APPLIES {
                let mut spec = base.clone();
                spec["name"] = format!("a-{i}").into();
                spec["replicas"] = 1.into();
                spec["http"]["routes"] = serde_json::json!([{ "path": format!("/a/{i}") }]);
                let resp = http
                    .post(format!("{api}/v1/apps"))
                    .bearer_auth(&token)
                    .json(&spec)
                    .send();
                if resp.is_ok_and(|r| r.status().is_success()) {
                    acked.push(format!("a-{i}"));
                    count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            acked
        });
        (stopper, thread)
    };
    let apps = |server: &Server| server.api_json("/v1/apps").as_array().unwrap().len();
    assert!(
        poll(Duration::from_secs(10), || apps(&servers[follower]) >= 3),
        "applies are flowing"
    );

    kill_the_leader(&mut servers, leader);

    // Applies go on past the takeover, then stop; the new leader places what was applied.
    let applied = acked_count.load(Ordering::Relaxed);
    eprintln!("{applied} applies acknowledged at the takeover");
    assert!(
        !applier.1.is_finished(),
        "the client finished its {APPLIES} applies before the takeover"
    );
    assert!(
        poll(Duration::from_secs(10), || acked_count
            .load(Ordering::Relaxed)
            > applied + 3),
        "applies go on after the takeover: {} acknowledged, the client {}",
        acked_count.load(Ordering::Relaxed),
        if applier.1.is_finished() {
            "finished"
        } else {
            "still applying"
        }
    );
    applier.0.store(true, Ordering::Relaxed);
    let acked = applier.1.join().unwrap();
    let results: Vec<_> = loads.into_iter().map(Load::stop).collect();
    let names: Vec<String> = servers[other]
        .api_json("/v1/apps")
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acked.iter().filter(|a| !names.contains(a)).collect();
    assert!(lost.is_empty(), "acknowledged applies lost: {lost:?}");
    // The new leader's controller places every acknowledged app, and its node starts it.
    let mut waiting = Vec::new();
    let ok = poll(Duration::from_secs(60), || {
        waiting = not_ready(&servers[other], &acked);
        waiting.is_empty()
    });
    assert!(
        ok,
        "every acknowledged app is placed and started; not yet: {waiting:?}\n{}\n{}",
        servers[other].cli_ok(&["get", "replicas", "-A"]),
        servers[other].cli_ok(&["describe", "app", &waiting[0]])
    );
    for (node, r) in nodes.iter().zip(&results) {
        assert!(r.ok > 0, "{}: {r:?}", node.name);
        assert_eq!(r.failed, 0, "{}: {:?}", node.name, r.failures);
    }
}

/// Nodes report their gateways' load and the requests they hold to the server they talk to,
/// not to the leader: through the store, the leader scales an app on load seen only at
/// another server's node, keeps it up while it serves, and wakes it from zero for a request
/// held there.
#[test]
fn the_leader_scales_and_wakes_an_app_on_reports_sent_to_another_server() {
    let (_etcd, dirs, servers, leader) = servers_on(EtcdCluster::three(), 2);
    let (leader, follower) = (&servers[leader], &servers[1 - leader]);
    let node = NodeProc::join(follower, "node-1", &[]);
    let spec = faulty_scaled(
        dirs[0].path(),
        "[scale]\nmin = 0\nmax = 3\ntarget_concurrency = 1\nwindow = \"2s\"\nidle = \"2s\"\n",
    );
    follower.cli_ok(&["apply", "-f", &spec]);
    assert!(
        poll(Duration::from_secs(30), || node
            .get("/faulty/status/200")
            .is_ok_and(|(s, _)| s == 200)),
        "never served"
    );

    // Four clients each keep a slow request in flight at the follower's node.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(format!("{}/faulty/sleep/200", node.gateway)))
        .collect();
    let mut last = serde_json::Value::Null;
    let up = poll(Duration::from_secs(40), || {
        last = app_row(&leader.api_json("/v1/apps"), "faulty");
        last["desired"] == 3 && last["ready"] == 3
    });
    let seen = app_row(&leader.api_json("/v1/top/apps"), "faulty");
    let results: Vec<_> = loads.into_iter().map(Load::stop).collect();
    assert!(
        up,
        "the leader never scaled to 3 on the load: {last}\n{}\npasses: {}",
        leader.cli_ok(&["describe", "app", "faulty"]),
        controller_passes(leader)
    );
    assert!(
        seen["requests_per_second"].as_f64().unwrap() > 0.0,
        "the leader's top shows no requests: {seen}"
    );
    for r in &results {
        assert_eq!(r.failed, 0, "{:?}", r.failures);
    }

    // Idle: down to zero; a request held at the follower's node wakes it at the leader.
    assert!(
        poll(Duration::from_secs(40), || {
            last = app_row(&leader.api_json("/v1/apps"), "faulty");
            last["desired"] == 0 && last["ready"] == 0
        }),
        "never scaled to zero: {last}"
    );
    let (status, body) = node.get("/faulty/status/200").expect("answered");
    assert_eq!(status, 200, "{body}");
}

/// `shoal server migrate` as a test runs it: the CLI alone, no config.
fn migrate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::SHOAL)
        .args(["server", "migrate"])
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A cluster on `shoal server`'s redb, with an app reading a secret and a config set at its
/// second revision, moves onto etcd with `shoal server migrate`: refused while the server
/// runs, then copied without changing the source; a server on etcd given copies of the
/// identity files (secret.key too) has the apps, their history, the secret and the config,
/// and a new node serves the app with the module it fetched through that server. Copying into
/// the etcd again is refused, as a `--force` copy is while a server runs on it.
#[test]
fn a_redb_state_migrates_into_etcd_and_serves_the_same_cluster() {
    let etcd = EtcdCluster::single();
    let store = etcd.url();
    let old_dir = tempfile::tempdir().unwrap();
    let mut old = Server::start(old_dir.path());
    let mut node1 = NodeProc::join(&old, "node-1", &[]);
    old.cli_ok(&[
        "secret",
        "create",
        "db",
        "--from-literal",
        "password=pw-from-redb",
        "--from-literal",
        "user=app-user",
    ]);
    old.cli_ok(&[
        "config",
        "create",
        "shared",
        "--from-literal",
        "origin=redb",
    ]);
    let spec = std::fs::read_to_string(format!("{}/settings/secret.toml", common::examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", common::examples()))
        .replace(
            "name = \"settings\"",
            "name = \"settings\"\nconfig_sets = [\"shared\"]",
        );
    let spec = write_spec(old_dir.path(), "settings.toml", &spec);
    old.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let serves = |node: &NodeProc, path: &str, body: &str| {
        poll(Duration::from_secs(60), || {
            node.get(path)
                .is_ok_and(|(code, b)| code == 200 && b == body)
        })
    };
    assert!(serves(&node1, "/settings/password", "pw-from-redb\n"));
    // A second revision: the config set changed under the app.
    old.cli_ok(&["config", "set", "shared", "origin=redb-2"]);
    assert!(serves(&node1, "/settings/origin", "redb-2\n"));

    let data = old_dir.path().join("server");
    let from = data.to_str().unwrap();
    let running = migrate(&["--from", from, "--to", &store]);
    assert_eq!(running.status.code(), Some(4), "{running:?}");
    assert!(text(&running.stderr).contains("is in use"), "{running:?}");

    old.kill();
    node1.kill();
    let state = std::fs::read(data.join("state.redb")).unwrap();
    let copied = migrate(&["--from", from, "--to", &store]);
    assert!(copied.status.success(), "{copied:?}");
    let said = text(&copied.stdout);
    assert!(
        said.contains("modules:  1 (") && said.contains("keys:     "),
        "{said}"
    );
    assert_eq!(
        std::fs::read(data.join("state.redb")).unwrap(),
        state,
        "the source is unchanged"
    );
    let again = migrate(&["--from", from, "--to", &store]);
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    assert!(text(&again.stderr).contains("already holds"), "{again:?}");
    // A copy may be made again over the first, while no server runs on it.
    let forced = migrate(&["--from", from, "--to", &store, "--force"]);
    assert!(forced.status.success(), "{forced:?}");

    let new_dir = tempfile::tempdir().unwrap();
    copy_identity(&data, &new_dir.path().join("server"));
    std::fs::copy(
        data.join("secret.key"),
        new_dir.path().join("server/secret.key"),
    )
    .unwrap();
    let new = Server::start_with(new_dir.path(), &["--store", &store]);
    assert!(new.cli_ok(&["get", "secrets"]).contains("db"));
    let history = new.cli_ok(&["rollout", "history", "settings"]);
    assert!(
        history.lines().count() == 3 && history.contains("config.origin"),
        "two revisions:\n{history}"
    );
    // node-1 is gone: its replica is replaced on node-2, which fetches the module from the
    // server on etcd and gets the secret it sealed on redb.
    let node2 = NodeProc::join(&new, "node-2", &[]);
    assert!(
        serves(&node2, "/settings/password", "pw-from-redb\n"),
        "{}",
        new.cli_ok(&["get", "replicas"])
    );
    assert!(serves(&node2, "/settings/origin", "redb-2\n"));

    let over_a_server = migrate(&["--from", from, "--to", &store, "--force"]);
    assert_eq!(over_a_server.status.code(), Some(4), "{over_a_server:?}");
    assert!(
        text(&over_a_server.stderr).contains("is running on the etcd cluster"),
        "{over_a_server:?}"
    );

    // A backup of the cluster on etcd restores into a redb data dir, which serves it: the
    // module whole (the store's chunks of it left out), the secret sealed as it was.
    let backup = new_dir.path().join("backup.tar");
    new.cli_ok(&["backup", backup.to_str().unwrap()]);
    let back_dir = tempfile::tempdir().unwrap();
    let back_data = back_dir.path().join("server");
    copy_identity(&data, &back_data);
    std::fs::copy(data.join("secret.key"), back_data.join("secret.key")).unwrap();
    let restored = run_cli(
        &back_dir.path().join("config.toml"),
        &[
            "server",
            "restore",
            backup.to_str().unwrap(),
            "--data-dir",
            back_data.to_str().unwrap(),
        ],
    );
    assert!(restored.status.success(), "{restored:?}");
    let back = Server::start(back_dir.path());
    assert!(back.cli_ok(&["get", "secrets"]).contains("db"));
    // The nodes of the backup are those of the cluster on etcd, which stays: two of its three
    // silent would hold every eviction, so they are deleted, as after a restore elsewhere.
    for gone in ["node-1", "node-2"] {
        back.cli_ok(&["node", "delete", gone]);
    }
    let node3 = NodeProc::join(&back, "node-3", &[]);
    assert!(
        serves(&node3, "/settings/password", "pw-from-redb\n"),
        "{}",
        back.cli_ok(&["get", "replicas"])
    );
}

/// Servers sharing a store share the join token in force: one rotated at a server stops
/// working at every other at once, and the new one works at all of them (and is in each one's
/// join-token file, for its pools' workers).
/// A store that lost its quorum is an outage, and said so: the API answers 503 (the CLI
/// exits 5, unavailable) and `/v1/healthz` 503, not a 500 and `ok`; both recover with it.
#[test]
fn a_lost_quorum_is_unavailable_and_unhealthy_until_it_is_back() {
    let mut etcd = EtcdCluster::three();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--store", &etcd.url()]);
    let health = || {
        server
            .http()
            .get(format!("{}/v1/healthz", server.api))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert!(poll(Duration::from_secs(20), || health() == 200));
    etcd.kill(1);
    etcd.kill(2);
    let out = server.cli(&["get", "apps"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("503"));
    assert!(poll(Duration::from_secs(10), || health() == 503));
    etcd.restart(1);
    assert!(poll(Duration::from_secs(30), || health() == 200));
    server.cli_ok(&["get", "apps"]);
}

#[test]
fn a_join_token_rotated_at_one_server_is_the_only_one_every_server_takes() {
    let etcd = EtcdCluster::single();
    let store = etcd.url();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Server::start_with(dirs[0].path(), &["--store", &store]);
    copy_identity(
        &dirs[0].path().join("server"),
        &dirs[1].path().join("server"),
    );
    let mut second = Server::start_with(dirs[1].path(), &["--store", &store]);
    let new_token = dirs[0].path().join("new-join-token");
    first.cli_ok(&[
        "token",
        "rotate-join",
        "--write",
        new_token.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&new_token).unwrap();
    assert_ne!(token, second.join_token);
    // The other server's file, which its join command names, holds the new token soon,
    // before any join reaches that server.
    let second_file = dirs[1].path().join("server/join-token");
    assert!(
        poll(Duration::from_secs(10), || {
            std::fs::read_to_string(&second_file).unwrap() == token
        }),
        "the second server's join-token file still holds the old token"
    );

    // A node that got in would run until killed: it gets a deadline to be refused.
    let mut old = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["node", "join", &second.api, "--node-name", "node-1"])
            .arg("--data-dir")
            .arg(dirs[1].path().join("node-1"))
            .args(["--gateway", "127.0.0.1:0"])
            .env("SHOAL_JOIN_TOKEN", &second.join_token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let refused = poll(Duration::from_secs(20), || {
        old.try_wait().unwrap().is_some()
    });
    if !refused {
        old.kill().unwrap();
    }
    let old = old.wait_with_output();
    assert!(
        refused && !old.status.success(),
        "the old token still joins"
    );
    assert!(String::from_utf8_lossy(&old.stderr).contains("refused the join token"));

    second.join_token = token.clone();
    let node = NodeProc::join(&second, "node-1", &[]);
    assert!(
        poll(Duration::from_secs(20), || {
            first.cli_ok(&["get", "nodes"]).contains(&node.name)
        }),
        "node-1 never joined through the second server"
    );
    assert_eq!(
        std::fs::read_to_string(dirs[1].path().join("server/join-token")).unwrap(),
        token,
        "the second server keeps the token in force"
    );
}

/// `shoal server --store etcd://… --token-file FILE` on an empty data dir: the server takes
/// the cluster's CA and secret key from the store, sealed there under the admin token by the
/// first server, instead of having them copied by hand. The wrong token, no token, or a data
/// dir of another cluster are refused with their reason.
#[test]
fn a_server_with_the_admin_token_and_an_empty_data_dir_takes_the_clusters_identity() {
    let etcd = EtcdCluster::single();
    let store = etcd.url();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Server::start_with(dirs[0].path(), &["--store", &store]);
    let token_file = dirs[0].path().join("server/token");
    let stored = {
        use shoal_store::KvStore;
        let etcd = shoal_etcd::EtcdStore::connect(&shoal_etcd::EtcdConfig::parse(&store).unwrap())
            .unwrap();
        let kv = etcd
            .get("cluster/identity")
            .unwrap()
            .expect("the identity is stored");
        String::from_utf8(kv.value).unwrap()
    };
    for file in ["ca-key.pem", "secret.key"] {
        let secret = std::fs::read_to_string(dirs[0].path().join("server").join(file)).unwrap();
        let line = secret.lines().nth(1).unwrap_or(&secret).to_string();
        assert!(
            !stored.contains(&line),
            "{file} is in the store in plain text"
        );
    }

    let second = Server::start_with(
        dirs[1].path(),
        &[
            "--store",
            &store,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    for file in ["token", "ca.pem", "ca-key.pem", "secret.key"] {
        assert_eq!(
            std::fs::read(dirs[1].path().join("server").join(file)).unwrap(),
            std::fs::read(dirs[0].path().join("server").join(file)).unwrap(),
            "{file}"
        );
    }
    // The join token in force is the cluster's too: a node joins through the second server
    // and serves what it is given.
    assert_eq!(second.join_token, first.join_token);
    let node = NodeProc::join(&second, "node-1", &[]);
    let spec = write_spec(
        dirs[1].path(),
        "hello.toml",
        &example_spec("hello", 1, "Hello, second server"),
    );
    second.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_greeting(&node, "Hello, second server");

    let refused = |dir: &Path, extra: &[&str]| -> String {
        let out = std::process::Command::new(common::SHOAL)
            .args(["server", "--data-dir"])
            .arg(dir.join("server"))
            .args(["--api", "127.0.0.1:0", "--store", &store])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let empty = dirs[2].path().join("empty");
    let said = refused(&empty, &[]);
    assert!(said.contains("give this server its admin token"), "{said}");
    let wrong = dirs[2].path().join("wrong-token");
    std::fs::write(&wrong, "0".repeat(64)).unwrap();
    let said = refused(&empty, &["--token-file", wrong.to_str().unwrap()]);
    assert!(said.contains("another cluster's"), "{said}");
    // A data dir with an identity of its own (a redb server's) is another cluster.
    let other = dirs[2].path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    drop(Server::start(&other));
    let said = refused(&other, &[]);
    assert!(said.contains("belongs to another cluster"), "{said}");
}

/// A copy of hello named `name`, routing `route`, one replica, written into `dir`.
fn hello_copy(dir: &Path, name: &str, route: &str) -> std::path::PathBuf {
    let text = example_spec("hello", 1, &format!("Hello from {name}"))
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("routes = [\"/hello\"]", &format!("routes = [\"{route}\"]"));
    write_spec(dir, &format!("{name}.toml"), &text)
}

/// How long a node may be silent before the controller marks it NotReady (`--node-grace`).
const GRACE: Duration = Duration::from_secs(3);

/// Three servers on a three-member etcd, all started with one CLI context, which then lists
/// all three; two nodes join with the three URLs, and the CLI is given them, the leader's
/// first. The leader is killed with SIGKILL while users request an app at both gateways and
/// the CLI applies apps: another server leads within 5 s; no request fails; the nodes'
/// heartbeats go on (no node is judged silent, no replica replaced); applies go on through the
/// CLI, whose first server is dead, and every acknowledged one is started by a node, which
/// its watch, resumed at a live server, told of; an app applied after the kill is served by
/// both nodes.
#[test]
fn nodes_and_the_cli_fail_over_when_the_leader_dies() {
    let _one_at_a_time = TAKEOVERS.lock().unwrap_or_else(|p| p.into_inner());
    let etcd = EtcdCluster::three();
    let store = etcd.url();
    let shared = tempfile::tempdir().unwrap();
    let config = shared.path().join("config.toml");
    let config_arg = config.to_str().unwrap();
    let args = ["--store", &store, "--config", config_arg, "--context", "ha"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers = vec![Server::start_with(dirs[0].path(), &args)];
    for dir in &dirs[1..] {
        copy_identity(&dirs[0].path().join("server"), &dir.path().join("server"));
        servers.push(Server::start_with(dir.path(), &args));
    }
    let contexts = expect_ok(&[], run_cli(&config, &["config", "get-contexts"]));
    for server in &servers {
        assert!(contexts.contains(&server.api), "{contexts}");
    }
    let all: Vec<&Server> = servers.iter().collect();
    assert!(
        poll(Duration::from_secs(20), || leaders(&all).len() == 1),
        "one leader: {:?}",
        leaders(&all)
    );
    let leader = leaders(&all)[0];
    drop(all);
    let order: Vec<usize> = std::iter::once(leader)
        .chain((0..3).filter(|&i| i != leader))
        .collect();
    let survivor = order[1];
    let in_order: Vec<&Server> = order.iter().map(|&i| &servers[i]).collect();
    let urls = in_order
        .iter()
        .map(|s| s.api.as_str())
        .collect::<Vec<_>>()
        .join(",");
    // Room for every copy of hello (50m of CPU each) the CLI applies.
    let nodes: Vec<NodeProc> = (1..=2)
        .map(|i| NodeProc::join_servers(&in_order, &format!("node-{i}"), &["--cpu", "64"]))
        .collect();
    let cli = {
        let (config, urls) = (config.clone(), urls.clone());
        move |args: &[&str]| run_cli(&config, &[&["--server", urls.as_str()], args].concat())
    };
    let spec = write_spec(
        shared.path(),
        "hello.toml",
        &example_spec("hello", 2, "Hello from etcd"),
    );
    let apply = ["apply", "-f", spec.to_str().unwrap()];
    expect_ok(&apply, cli(&apply));
    for node in &nodes {
        wait_greeting(node, "Hello from etcd");
    }
    let replicas = servers[survivor].replica_ids("hello");
    // `logs -f` as JSON, its stream from the leader, first in the list.
    let follower_out = shared.path().join("follower.out");
    let follower_err = shared.path().join("follower.err");
    let follower = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["--server", &urls, "logs", "hello", "-f", "-o", "json"])
            .env("SHOAL_CONFIG", &config)
            .env_remove("SHOAL_SERVER")
            .env_remove("SHOAL_TOKEN")
            .stdout(std::fs::File::create(&follower_out).unwrap())
            .stderr(std::fs::File::create(&follower_err).unwrap())
            .spawn()
            .unwrap(),
    );
    // The follower streams before the kill: a follower still starting would meet the dead
    // server with its first request, and go to the next one without a break to follow on from.
    let streaming = poll(Duration::from_secs(60), || {
        for node in &nodes {
            let _ = node.get("/hello/before-kill");
        }
        std::fs::read_to_string(&follower_out)
            .unwrap()
            .contains("/hello/before-kill")
    });
    assert!(
        streaming,
        "the follower never showed a line: {}",
        std::fs::read_to_string(&follower_err).unwrap()
    );

    let loads: Vec<Load> = nodes
        .iter()
        .map(|n| Load::start(format!("{}/hello", n.gateway)))
        .collect();
    // Applies through the CLI, a process each, before, during and after the kill.
    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let (stop, count, dir, cli) = (
            Arc::clone(&stop),
            Arc::clone(&acked_count),
            shared.path().to_path_buf(),
            cli.clone(),
        );
        std::thread::spawn(move || {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < APPLIES {
                let name = format!("a-{i}");
                let file = hello_copy(&dir, &name, &format!("/a/{i}"));
                let out = cli(&["apply", "-f", file.to_str().unwrap()]);
                if out.status.success() {
                    acked.push(name);
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                i += 1;
            }
            (acked, failed)
        })
    };
    assert!(
        poll(Duration::from_secs(30), || acked_count
            .load(Ordering::Relaxed)
            >= 2),
        "applies are flowing"
    );

    let (killed, takeover) = kill_the_leader(&mut servers, leader);

    // The CLI goes on applying past the dead first server.
    let applied = acked_count.load(Ordering::Relaxed);
    assert!(
        poll(Duration::from_secs(30), || acked_count
            .load(Ordering::Relaxed)
            > applied + 3),
        "applies go on after the kill: {} acknowledged",
        acked_count.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = applier.join().unwrap();
    eprintln!("{} applies acknowledged", acked.len());
    assert!(failed.is_empty(), "applies failed: {failed:?}");

    // An app applied now, through the CLI whose first server is dead, reaches both nodes'
    // gateways: only their watches bring it.
    let after = hello_copy(shared.path(), "after", "/after");
    let apply = ["apply", "-f", after.to_str().unwrap()];
    expect_ok(&apply, cli(&apply));
    for node in &nodes {
        assert!(
            poll(Duration::from_secs(60), || matches!(
                node.get("/after"),
                Ok((200, body)) if body.contains("Hello from after")
            )),
            "{} never served the app applied after the kill: {:?}",
            node.name,
            node.get("/after")
        );
    }
    // The follower went on at another server: what the replicas write now reaches it, and
    // it showed no line twice.
    let marks: Vec<String> = nodes
        .iter()
        .map(|n| format!("/hello/after-kill-{}", n.name))
        .collect();
    let followed = poll(Duration::from_secs(60), || {
        for (node, mark) in nodes.iter().zip(&marks) {
            let _ = node.get(mark);
        }
        let out = std::fs::read_to_string(&follower_out).unwrap();
        marks.iter().all(|m| out.contains(m.as_str()))
    });
    drop(follower);
    let err = std::fs::read_to_string(&follower_err).unwrap();
    assert!(
        followed,
        "the follower never showed lines written after the kill:\n{err}"
    );
    assert!(err.contains("following on"), "{err}");
    let mut shown = std::collections::HashSet::new();
    for line in std::fs::read_to_string(&follower_out).unwrap().lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (entry["replica"].to_string(), entry["seq"].as_u64().unwrap());
        assert!(shown.insert(key), "shown twice: {line}");
    }

    // Every acknowledged apply is started by a node: no delta was lost in the move.
    let mut waiting = Vec::new();
    let ok = poll(Duration::from_secs(60), || {
        waiting = not_ready(&servers[survivor], &acked);
        waiting.is_empty()
    });
    assert!(
        ok,
        "every acknowledged app is placed and started; not yet: {waiting:?}\n{}",
        expect_ok(&[], cli(&["get", "replicas", "-A"]))
    );
    // Past two graces after the takeover, the nodes' heartbeats have gone on all along.
    // A machine that stops every process for a while (seen: 3 s, etcd's members, servers and
    // nodes alike, a VM's host busy) stops the heartbeats too; a gap of that size between
    // this loop's own turns is allowed for on top of the grace.
    let watched_until = killed + takeover + 2 * GRACE;
    let mut turn = Instant::now();
    let mut stalled = Duration::ZERO;
    let watched = poll(Duration::from_secs(30), || {
        let nodes = servers[survivor].api_json("/v1/nodes");
        stalled = stalled.max(turn.elapsed().saturating_sub(Duration::from_millis(500)));
        turn = Instant::now();
        let now = shoal_core::now_ms();
        for node in nodes.as_array().unwrap() {
            assert_eq!(node["state"], "Ready", "{node}");
            let age = now.saturating_sub(node["last_heartbeat"].as_u64().unwrap());
            assert!(
                age < (GRACE + stalled).as_millis() as u64,
                "a silent node ({stalled:?} of this test stalled): {node}"
            );
        }
        Instant::now() >= watched_until
    });
    assert!(watched);
    let events = servers[survivor].api_json("/v1/events?limit=100000");
    let judged: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(
                e["reason"].as_str(),
                Some("NodeNotReady" | "NodeEvictionHeld")
            )
        })
        .collect();
    assert!(judged.is_empty(), "nodes judged silent: {judged:?}");
    assert_eq!(
        servers[survivor].replica_ids("hello"),
        replicas,
        "no replica of hello replaced"
    );
    for (node, r) in nodes.iter().zip(loads.into_iter().map(Load::stop)) {
        assert!(r.ok > 0, "{}: {r:?}", node.name);
        assert_eq!(r.failed, 0, "{}: {:?}", node.name, r.failures);
    }
}

/// `n` servers on `etcd`, the others with the first's identity, once one of them leads: the
/// etcd cluster, their dirs, the servers and which one leads.
fn servers_on(
    etcd: EtcdCluster,
    n: usize,
) -> (EtcdCluster, Vec<tempfile::TempDir>, Vec<Server>, usize) {
    let store = etcd.url();
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers = vec![Server::start_with(dirs[0].path(), &["--store", &store])];
    for dir in &dirs[1..] {
        copy_identity(&dirs[0].path().join("server"), &dir.path().join("server"));
        servers.push(Server::start_with(dir.path(), &["--store", &store]));
    }
    let all: Vec<&Server> = servers.iter().collect();
    assert!(
        poll(Duration::from_secs(20), || leaders(&all).len() == 1),
        "one leader: {:?}",
        leaders(&all)
    );
    let leader = leaders(&all)[0];
    drop(all);
    (etcd, dirs, servers, leader)
}

/// Node `name` as `server` lists it (`null` if it does not).
fn node_seen(server: &Server, name: &str) -> serde_json::Value {
    server
        .api_json("/v1/nodes")
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
        .unwrap_or_default()
}

/// A pool's worker is told every server running on the store, the leader that started it
/// first: when that leader dies, the worker goes on reporting to another, and the new leader
/// finds it Ready and starts no other.
#[test]
fn a_pool_worker_outlives_the_leader_that_started_it() {
    let _one_at_a_time = TAKEOVERS.lock().unwrap_or_else(|p| p.into_inner());
    let (_etcd, dirs, mut servers, leader) = servers_on(EtcdCluster::single(), 2);
    let survivor = 1 - leader;

    // The pool's provider, which whichever server leads runs.
    let workers = dirs[0].path().join("workers");
    std::fs::create_dir_all(&workers).unwrap();
    let _cleanup = common::Started(workers.clone());
    let script = dirs[0].path().join("provider.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nd={workers}\ncase \"$1\" in\n\
             start)\n  mkdir -p \"$d/$2\"\n  echo \"$SHOAL_JOIN_URL\" > \"$d/$2.url\"\n  \
             {shoal} node join \"$SHOAL_JOIN_URL\" --token-file \"$SHOAL_JOIN_TOKEN_FILE\" \
             --node-name \"$2\" --gateway 127.0.0.1:0 --data-dir \"$d/$2\" --memory 1Gi \
             > \"$d/$2.log\" 2>&1 &\n  echo $! > \"$d/$2.pid\" ;;\n\
             stop)\n  kill \"$(cat \"$d/$2.pid\")\" ;;\nesac\n",
            workers = workers.display(),
            shoal = common::SHOAL,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pool = write_spec(
        dirs[0].path(),
        "cloud.toml",
        &format!(
            "name = \"cloud\"\nmax = 1\nprovider = \"{}\"\n",
            script.display()
        ),
    );
    servers[survivor].cli_ok(&["pool", "apply", "-f", pool.to_str().unwrap()]);
    let spec = write_spec(
        dirs[0].path(),
        "hello.toml",
        &example_spec("hello", 1, "Hello from a pool"),
    );
    servers[survivor].cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let on_cloud: std::collections::BTreeMap<String, usize> = [("cloud-1".to_string(), 1)].into();
    assert!(
        poll(Duration::from_secs(60), || servers[survivor]
            .placement("hello")
            == on_cloud),
        "{:?}",
        servers[survivor].placement("hello")
    );
    let joined = std::fs::read_to_string(workers.join("cloud-1.url")).unwrap();
    assert_eq!(
        joined.trim(),
        format!("{},{}", servers[leader].api, servers[survivor].api),
        "the leader that started it first, then every other server"
    );
    let node = |server: &Server| node_seen(server, "cloud-1");
    let gateway = format!(
        "http://{}",
        node(&servers[survivor])["gateway"].as_str().unwrap()
    );
    let served = || {
        common::client()
            .get(format!("{gateway}/hello"))
            .send()
            .and_then(|r| r.text())
            .is_ok_and(|body| body.contains("Hello from a pool"))
    };
    assert!(
        poll(Duration::from_secs(60), served),
        "hello is not served at {gateway}"
    );

    let (_, _) = kill_the_leader(&mut servers, leader);
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Heard from since the leader died: by the survivor, the only server left.
    assert!(
        poll(Duration::from_secs(30), || {
            let n = node(&servers[survivor]);
            n["last_heartbeat"].as_u64() > Some(killed_at + 1_000)
                && n["state"] == "Ready"
                && n["silent"] == false
        }),
        "{}",
        node(&servers[survivor])
    );
    assert!(served(), "hello is still served at {gateway}");
    assert_eq!(servers[survivor].placement("hello"), on_cloud);
    let members = servers[survivor].api_json("/v1/pools/cloud")["members"].clone();
    assert_eq!(
        members
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["cloud-1".to_string()]),
        "{members}"
    );
}

/// A node given one server of several learns the others from its heartbeats' answers, as
/// Nomad's clients do: when that one dies, it goes on at another, Ready, its replica kept.
#[test]
fn a_node_given_one_server_learns_the_others_and_outlives_it() {
    let _one_at_a_time = TAKEOVERS.lock().unwrap_or_else(|p| p.into_inner());
    let (_etcd, dirs, mut servers, leader) = servers_on(EtcdCluster::single(), 2);
    let survivor = 1 - leader;
    let node = NodeProc::join(&servers[leader], "node-1", &[]);
    let log = node.dir.with_extension("log");
    let learnt = format!(
        "learnt of more servers of the control plane servers={}",
        servers[survivor].api
    );
    assert!(
        poll(Duration::from_secs(30), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains(&learnt))),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let spec = write_spec(
        dirs[0].path(),
        "hello.toml",
        &example_spec("hello", 1, "Hello from one server"),
    );
    servers[survivor].cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_greeting(&node, "Hello from one server");
    let replicas = servers[survivor].replica_ids("hello");
    // Any server lists them all, and which one leads.
    let listed = |server: &Server| -> Vec<(String, bool)> {
        let out = server.cli_ok(&["get", "servers", "-o", "json"]);
        let servers: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        servers
            .iter()
            .map(|s| (s["url"].as_str().unwrap().to_string(), s["leader"] == true))
            .collect()
    };
    let mut both = vec![
        (servers[leader].api.clone(), true),
        (servers[survivor].api.clone(), false),
    ];
    both.sort();
    assert_eq!(listed(&servers[survivor]), both);
    let table = servers[survivor].cli_ok(&["get", "servers"]);
    assert!(
        table.lines().any(|l| l
            .split_whitespace()
            .eq([servers[leader].api.as_str(), "leader"])),
        "{table}"
    );

    kill_the_leader(&mut servers, leader);
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let heard = || node_seen(&servers[survivor], "node-1");
    assert!(
        poll(Duration::from_secs(30), || {
            let n = heard();
            n["last_heartbeat"].as_u64() > Some(killed_at + 1_000)
                && n["state"] == "Ready"
                && n["silent"] == false
        }),
        "{}",
        heard()
    );
    wait_greeting(&node, "Hello from one server");
    assert_eq!(
        servers[survivor].replica_ids("hello"),
        replicas,
        "its replica is kept"
    );
    // Who led, and who took over, is in the cluster's events.
    let leading: Vec<String> = servers[survivor]
        .api_json("/v1/events")
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "Leading")
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    let said = |i: usize| format!("server {} leads: the controller runs there", servers[i].api);
    assert!(
        leading.ends_with(&[said(leader), said(survivor)]),
        "{leading:?}"
    );
    let alone = vec![(servers[survivor].api.clone(), true)];
    assert!(
        poll(Duration::from_secs(10), || listed(&servers[survivor])
            == alone),
        "{:?}",
        listed(&servers[survivor])
    );

    // Started again with only the server it was given, gone since: it goes on at the one it
    // learnt, which it kept in its data dir.
    let mut node = node;
    node.kill();
    node.restart();
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        poll(Duration::from_secs(30), || {
            let n = heard();
            n["last_heartbeat"].as_u64() > Some(restarted_at) && n["state"] == "Ready"
        }),
        "{}",
        heard()
    );
    wait_greeting(&node, "Hello from one server");
}

/// Kills `servers[leader]` with SIGKILL and insists that exactly one of the others leads
/// within 5 s; when it was killed and how long the takeover took.
fn kill_the_leader(servers: &mut [Server], leader: usize) -> (Instant, Duration) {
    servers[leader].kill();
    let killed = Instant::now();
    let survivors: Vec<&Server> = (0..servers.len())
        .filter(|&i| i != leader)
        .map(|i| &servers[i])
        .collect();
    assert!(
        poll(Duration::from_secs(10), || !leaders(&survivors).is_empty()),
        "no new leader"
    );
    let takeover = killed.elapsed();
    assert_eq!(leaders(&survivors).len(), 1, "exactly one new leader");
    assert!(
        takeover < Duration::from_secs(5),
        "a new leader took {takeover:?}"
    );
    eprintln!("new leader after {takeover:?}");
    (killed, takeover)
}

/// The leader's controller passes so far, from its metrics: whether it still decides.
fn controller_passes(server: &Server) -> String {
    let text = server
        .http()
        .get(format!("{}/v1/metrics", server.api))
        .bearer_auth(&server.token)
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("shoal_controller_pass_duration_seconds_count"))
        .collect::<Vec<_>>()
        .join(" ")
}
