//! A real cluster: `shoal server` plus `shoal node join` workers, each a
//! process with its own ports and data dir.

mod common;

use common::{Load, NodeProc, Server, cluster, examples, poll, write_spec};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

fn hello_spec(dir: &std::path::Path, replicas: u32, extra: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", &format!("replicas = {replicas}"));
    let path = write_spec(dir, "hello.toml", &format!("{text}\n{extra}"));
    path.to_str().unwrap().to_string()
}

/// Applies hello with `replicas` replicas and waits until they are all Ready.
fn apply_hello(server: &Server, dir: &std::path::Path, replicas: usize) {
    server.cli_ok(&["apply", "-f", &hello_spec(dir, replicas as u32, "")]);
    assert!(
        poll(Duration::from_secs(30), || ready_count(server, "hello")
            == replicas),
        "{:?}",
        server.placement("hello")
    );
}

fn ready_count(server: &Server, app: &str) -> usize {
    server.placement(app).values().sum()
}

#[test]
fn nodes_join_with_the_token_and_only_with_it() {
    let (dir, server, _nodes) = cluster(1, &[]);
    // The right CA hash, a wrong secret.
    let hash = server.join_token.split_once('.').unwrap().0;
    let wrong = format!("{hash}.{}", "0".repeat(64));
    let out = Command::new(common::SHOAL)
        .args([
            "node",
            "join",
            &server.api,
            "--token",
            &wrong,
            "--node-name",
            "intruder",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("intruder"))
        .args(["--gateway", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "denied");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the join token"), "{err}");
    let nodes = server.cli_ok(&["get", "nodes"]);
    assert!(
        nodes.contains("node-1") && !nodes.contains("intruder"),
        "{nodes}"
    );
    // The join token opens the node endpoints only, not the admin API.
    let resp = server
        .http()
        .get(format!("{}/v1/apps", server.api))
        .bearer_auth(&server.join_token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[test]
fn replicas_spread_and_every_gateway_serves_them() {
    let (dir, server, nodes) = cluster(3, &[]);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), 6, "")]);
    assert!(
        poll(Duration::from_secs(30), || ready_count(&server, "hello")
            == 6),
        "{:#}",
        server.api_json("/v1/replicas?app=hello")
    );
    let spread = server.placement("hello");
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|n| *n == 2), "{spread:?}");
    for node in &nodes {
        for _ in 0..20 {
            let (code, body) = node.get("/hello").unwrap();
            assert_eq!(code, 200, "{}: {body}", node.name);
            assert!(body.contains("Hello from Shoal!"));
        }
    }
    let nodes_table = server.cli_ok(&["get", "nodes"]);
    assert_eq!(nodes_table.matches("Ready").count(), 3, "{nodes_table}");
    // Logs come from every node's replicas, through their gateways.
    let logs = server.cli_ok(&["logs", "hello"]);
    let replicas_logged: std::collections::BTreeSet<&str> = logs
        .lines()
        .filter(|l| l.contains("GET /hello"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(replicas_logged.len(), 6, "{logs}");

    // Hops between gateways go over TLS between members of the cluster: a client
    // forging the internal headers in plain text is refused, never pinned, routed or
    // forwarded; over TLS, one that trusts the cluster CA but has no certificate of
    // its own gets no connection.
    let replica = server.replicas("hello")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = common::client()
        .get(format!("{}/elsewhere", nodes[0].gateway))
        .header("x-shoal-replica", &replica)
        .header("x-shoal-app", "default/hello")
        .header("x-shoal-hop", "1")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let tls_gateway = nodes[0].gateway.replace("http://", "https://");
    let refused = common::api_client(&server.ca)
        .get(format!("{tls_gateway}/_shoal/logs/{replica}"))
        .send();
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.status()));
}

/// Another node's hops leave a gateway's per-client share to the clients on their address:
/// a member's connection is off the count once its certificate is checked (still open), so
/// with a share of one, a client on the same address as the hopping node still gets in.
#[test]
fn hops_leave_a_gateways_client_share_to_the_clients_on_their_address() {
    let (dir, server, nodes) = cluster(2, &["--gateway-client-connections", "1"]);
    server.cli_ok(&["apply", "-f", &hello_spec(dir.path(), 1, "")]);
    assert!(
        poll(Duration::from_secs(30), || ready_count(&server, "hello")
            == 1),
        "{:#}",
        server.api_json("/v1/replicas?app=hello")
    );
    let placement = server.placement("hello");
    let (there, here) = match placement.contains_key(&nodes[0].name) {
        true => (&nodes[0], &nodes[1]),
        false => (&nodes[1], &nodes[0]),
    };
    // Through the other node: a hop, whose pooled connection stays open for a while.
    let (code, body) = here.get("/hello").unwrap();
    assert_eq!(code, 200, "{body}");
    let served = |node: &common::NodeProc| node.get("/hello").is_ok_and(|(code, _)| code == 200);
    assert!(
        poll(Duration::from_secs(10), || served(there)),
        "the hop's connection took this address's only slot at {}",
        there.name
    );
    assert!(poll(Duration::from_secs(10), || served(here)));
}

/// A guest behind a hop sees the host its client addressed, as a local one does, not the node
/// the request was forwarded to (the URI of an HTTP/2 hop names it).
#[test]
fn a_guest_behind_a_hop_sees_the_host_its_client_addressed() {
    let (dir, server, nodes) = cluster(2, &[]);
    server.cli_ok(&[
        "apply",
        "-f",
        &common::faulty_spec(dir.path(), "f.toml", 1, ""),
    ]);
    assert!(poll(Duration::from_secs(30), || ready_count(
        &server, "faulty"
    ) == 1));
    let client = common::client();
    for node in &nodes {
        let url = format!("{}/faulty/authority", node.gateway);
        let seen = client
            .get(&url)
            .header("host", "shop.example")
            .send()
            .and_then(|r| r.text())
            .unwrap();
        assert_eq!(seen, "http://shop.example", "through {}", node.name);
    }
}

/// An http app with no route, that no other app may call by name, is reached through
/// `shoal port-forward`: the API sends each request, path, query, headers and body as the
/// client wrote them, to a ready replica on whichever node runs it, and the API's token
/// never reaches the guest.
#[test]
fn port_forward_reaches_an_app_with_no_route() {
    let (dir, server, nodes) = cluster(2, &[]);
    let text = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", "replicas = 2")
        .replace("routes = [\"/faulty\"]", "routes = []");
    let spec = write_spec(
        dir.path(),
        "internal.toml",
        &format!("{text}\n[network]\ninbound = []\n"),
    );
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || ready_count(
        &server, "faulty"
    ) == 2));
    let client = common::client();
    for node in &nodes {
        let status = client
            .get(format!("{}/headers", node.gateway))
            .send()
            .unwrap()
            .status();
        assert_eq!(status, 404, "no route through {}", node.name);
    }

    /// Killed however the test ends.
    struct Forward(std::process::Child);
    impl Drop for Forward {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut forward = Forward(
        Command::new(common::SHOAL)
            .args(["port-forward", "faulty"])
            .env("SHOAL_CONFIG", dir.path().join("config.toml"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = common::read_lines(&mut forward.0);
    let line = common::wait_line(&lines, "Forwarding from");
    let local = line.split_whitespace().next().unwrap().to_string();
    assert!(line.ends_with("to app default/faulty"), "{line}");

    // Many requests at once take about 32 API connections (a few more while ones just used
    // go back to the pool), not one each: the API's cap on one client's connections (100)
    // stays open to other commands. Its sockets: the listener, one per local connection, and
    // the API connections.
    let sockets = || {
        std::fs::read_dir(format!("/proc/{}/fd", forward.0.id()))
            .unwrap()
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|to| to.to_string_lossy().starts_with("socket:"))
            })
            .count()
    };
    let slow: Vec<_> = (0..48)
        .map(|_| {
            let url = format!("{local}/sleep/2000");
            std::thread::spawn(move || {
                common::client()
                    .get(url)
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let mut most = 0;
    poll(Duration::from_secs(60), || {
        most = most.max(sockets());
        slow.iter().all(|request| request.is_finished())
    });
    let answered: Vec<u16> = slow
        .into_iter()
        .map(|request| request.join().unwrap().unwrap())
        .collect();
    assert!(
        (49..=1 + 48 + 40).contains(&most),
        "{most} sockets at most: 48 local connections, the listener, about 32 to the API"
    );
    assert!(
        answered.iter().all(|s| [200, 503].contains(s)),
        "{answered:?}"
    );
    server.cli_ok(&["get", "apps"]);

    let seen = client
        .get(format!("{local}/authority"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        seen, "http://faulty.default",
        "called as by its service name"
    );
    let headers = client
        .get(format!("{local}/headers?x=1"))
        .header("x-test", "kept")
        .header("authorization", "Bearer mine")
        .header("x-shoal-replica", "elsewhere")
        .send()
        .unwrap();
    assert_eq!(headers.status(), 200);
    let headers = headers.text().unwrap();
    assert!(headers.contains("x-test: kept"), "{headers}");
    assert!(!headers.contains(&server.token), "{headers}");
    assert!(
        !headers.to_lowercase().contains("authorization"),
        "{headers}"
    );
    assert!(!headers.contains("x-shoal"), "{headers}");
    let echoed = client
        .post(format!("{local}/echo"))
        .body("a body, streamed")
        .send()
        .unwrap();
    assert_eq!(echoed.status(), 200);
    assert_eq!(echoed.text().unwrap(), "a body, streamed");
    // The guest's own status comes back as it answered.
    let status = client
        .get(format!("{local}/status/418"))
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 418);
    let status = client
        .head(format!("{local}/status/202"))
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 202, "HEAD goes through");
    let options = client
        .request(reqwest::Method::OPTIONS, format!("{local}/status/204"))
        .send()
        .unwrap()
        .status();
    assert_eq!(options, 204, "OPTIONS goes through");
    // What went through it is the app's load, as `top apps` and the autoscaler see it.
    let mut top = serde_json::Value::Null;
    assert!(
        poll(Duration::from_secs(15), || {
            top = common::app_row(&server.api_json("/v1/top/apps"), "faulty");
            top["requests_per_second"].as_f64().unwrap_or(0.0) > 0.0
        }),
        "{top}"
    );

    // Paths as a client may write them, unresolved (an HTTP client resolves them first).
    let raw = |path: &str| {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(local.trim_start_matches("http://")).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    };
    // Dot segments stay within the app: the app answers, not the API's list of apps.
    let climbed = raw("/../../../../../../v1/apps");
    assert!(climbed.starts_with("HTTP/1.1 200"), "{climbed}");
    assert!(!climbed.contains("application/json"), "{climbed}");
    // The nodes' own paths (replicas' output) are not the proxy's to open.
    let id = server.replica_ids("faulty").into_iter().next().unwrap();
    for path in [
        format!("/_shoal/logs/{id}"),
        format!("/a/../_shoal/logs/{id}"),
    ] {
        let refused = raw(&path);
        assert!(refused.starts_with("HTTP/1.1 403"), "{path}: {refused}");
    }

    // With no replica ready, the API says so.
    server.cli_ok(&["scale", "faulty", "--replicas", "0"]);
    assert!(poll(Duration::from_secs(30), || ready_count(
        &server, "faulty"
    ) == 0));
    let none = client.get(format!("{local}/headers")).send().unwrap();
    assert_eq!(none.status(), 503);
    assert!(none.text().unwrap().contains("no_ready_replicas"));
    drop(forward);

    // An app that is not there, or not http, is refused before anything listens.
    let out = server.cli(&["port-forward", "nothing"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

#[test]
fn a_replica_that_fits_nowhere_says_why() {
    let (dir, server, _nodes) = cluster(3, &["--memory", "64Mi"]);
    let spec = hello_spec(dir.path(), 1, "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            "requests = { cpu = \"50m\" }",
            "requests = { memory = \"128Mi\" }",
        )
        .replace("\"32Mi\"", "\"128Mi\"");
    let spec = write_spec(dir.path(), "big.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(20), || {
        server
            .replicas("hello")
            .first()
            .and_then(|r| r["message"].as_str())
            .is_some_and(|m| m == "0/3 nodes available: 3 insufficient memory")
    }));
}

#[test]
fn a_killed_node_is_replaced_and_does_not_come_back_with_duplicates() {
    let (dir, server, mut nodes) = cluster(3, &[]);
    apply_hello(&server, dir.path(), 3);

    let killed_replica = server
        .replicas("hello")
        .iter()
        .find(|r| r["node"] == "node-3")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .expect("a replica on node-3");
    // Constant traffic through node-1's gateway while node-3 dies.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let gw = nodes[0].gateway.clone();
    let load = {
        let (stop, failures) = (stop.clone(), failures.clone());
        std::thread::spawn(move || {
            let http = common::client();
            let mut ok = 0;
            while !stop.load(Ordering::Relaxed) {
                match http.get(format!("{gw}/hello")).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            ok
        })
    };
    nodes[2].kill();
    let killed = std::time::Instant::now();
    assert!(
        poll(Duration::from_secs(20), || {
            let p = server.placement("hello");
            p.values().sum::<usize>() == 3 && !p.contains_key("node-3")
        }),
        "replicas not replaced: {:?}",
        server.placement("hello")
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    stop.store(true, Ordering::Relaxed);
    let ok = load.join().unwrap();
    assert!(ok > 0);
    // Requests to replicas on the dead node are retried elsewhere; a few may
    // fail only in the instant before the retry learns the node is gone.
    let failed = failures.load(Ordering::Relaxed);
    assert!(failed * 100 <= ok, "{failed} failed of {ok}");

    // The node comes back: it runs none of the replicas that moved away, but the
    // cluster evens out again, a new replica moving there.
    nodes[2].restart();
    assert!(poll(Duration::from_secs(20), || {
        server
            .api_json("/v1/nodes")
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "Ready")
    }));
    assert!(poll(Duration::from_secs(10), || nodes[2]
        .get("/hello")
        .is_ok_and(|(c, _)| c == 200)));
    let even: BTreeMap<String, usize> = (1..=3).map(|i| (format!("node-{i}"), 1)).collect();
    assert!(
        poll(Duration::from_secs(30), || server.placement("hello")
            == even
            && server.replicas("hello").len() == 3),
        "{:?}",
        server.placement("hello")
    );
    let back = server.replicas("hello");
    let on_3 = back.iter().find(|r| r["node"] == "node-3").unwrap();
    assert_ne!(
        on_3["id"],
        killed_replica.as_str(),
        "the dead replica came back"
    );
}

#[test]
fn a_node_joining_a_lopsided_cluster_gets_its_share_without_failed_requests() {
    let (dir, server, nodes) = cluster(1, &[]);
    apply_hello(&server, dir.path(), 4);
    let load = Load::start(format!("{}/hello", nodes[0].gateway));
    let joined = common::NodeProc::join(&server, "node-2", &[]);
    let even: BTreeMap<String, usize> =
        [("node-1".to_string(), 2), ("node-2".to_string(), 2)].into();
    assert!(
        poll(Duration::from_secs(60), || server.placement("hello")
            == even
            && server.replicas("hello").len() == 4),
        "{:?}",
        server.placement("hello")
    );
    // The new node's own gateway serves it too.
    assert!(poll(Duration::from_secs(10), || joined
        .get("/hello")
        .is_ok_and(|(c, _)| c == 200)));
    let r = load.stop();
    assert!(r.ok > 0);
    assert_eq!(r.failed, 0, "failed while replicas moved: {r:?}");
    let events = server.cli_ok(&["events"]);
    assert_eq!(events.matches("Rebalancing").count(), 2, "{events}");
}

#[test]
fn with_rebalancing_off_a_joining_node_gets_only_new_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--no-rebalance"]);
    let _first = common::NodeProc::join(&server, "node-1", &[]);
    apply_hello(&server, dir.path(), 4);
    let before = server.replica_ids("hello");
    let _second = common::NodeProc::join(&server, "node-2", &[]);
    assert!(poll(Duration::from_secs(20), || server.nodes_ready() == 2));
    // Two more replicas: both go to node-2 (the app's balance first); by the time they
    // serve, the controller has seen node-2 for several passes and moved nothing.
    server.cli_ok(&["scale", "hello", "--replicas", "6"]);
    let expected: BTreeMap<String, usize> =
        [("node-1".to_string(), 4), ("node-2".to_string(), 2)].into();
    assert!(
        poll(Duration::from_secs(30), || server.placement("hello")
            == expected),
        "{:?}",
        server.placement("hello")
    );
    assert!(server.replica_ids("hello").is_superset(&before));
    assert!(!server.cli_ok(&["events"]).contains("Rebalancing"));
}

/// A changed node_selector moves the replicas it no longer allows, new before old.
#[test]
fn a_changed_node_selector_moves_the_replicas_it_no_longer_allows() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--no-rebalance"]);
    let _a = common::NodeProc::join(&server, "node-a", &["--label", "zone=a"]);
    let mut b = common::NodeProc::join(&server, "node-b", &["--label", "zone=b"]);
    let placed = |zone: &str| {
        server.cli_ok(&[
            "apply",
            "-f",
            &hello_spec(
                dir.path(),
                2,
                &format!("[placement]\nnode_selector = {{ zone = \"{zone}\" }}\n"),
            ),
        ]);
        let expected: BTreeMap<String, usize> = [(format!("node-{zone}"), 2)].into();
        assert!(
            poll(Duration::from_secs(30), || server.placement("hello")
                == expected),
            "{:?}",
            server.placement("hello")
        );
    };
    placed("a");
    // `describe node`: its labels, what is placed there (and asks for what), its events.
    let described = server.cli_ok(&["describe", "node", "node-a"]);
    for needle in [
        "Name:         node-a",
        "State:        Ready",
        "Labels:       zone=a",
        "Requested:    cpu 100m",
        "by 2 replicas",
        "NodeJoined",
    ] {
        assert!(described.contains(needle), "{needle}: {described}");
    }
    let placed_rows = described
        .lines()
        .filter(|l| l.trim_start().starts_with("default ") && l.contains(" hello "))
        .count();
    assert_eq!(placed_rows, 2, "{described}");
    let empty = server.cli_ok(&["describe", "node", "node-b"]);
    assert!(empty.contains("Replicas:\n  <none>"), "{empty}");
    let json: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["describe", "node", "node-a", "-o", "json"]))
            .unwrap();
    assert_eq!(json["placed"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json["labels"]["zone"], "a", "{json}");
    let missing = server.cli(&["describe", "node", "node-z"]);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    let labelled = server.cli_ok(&["get", "nodes", "--show-labels"]);
    assert!(
        labelled.lines().next().unwrap().ends_with("LABELS")
            && labelled.contains("zone=a")
            && labelled.contains("zone=b"),
        "{labelled}"
    );
    assert!(!server.cli_ok(&["get", "nodes"]).contains("zone=a"));
    let refused = server.cli(&["get", "apps", "--show-labels"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let before = server.replica_ids("hello");
    placed("b");
    assert!(server.replica_ids("hello").is_disjoint(&before));
    let events = server.cli_ok(&["events"]);
    assert!(
        events.contains("node_selector no longer matches"),
        "{events}"
    );

    // `node label`, as kubectl's: a value changes only with --overwrite; replicas leave a
    // node their selector no longer matches; the operator's labels outlive a restart.
    let refused = server.cli(&["node", "label", "node-b", "zone=c"]);
    assert_eq!(refused.status.code(), Some(4), "a conflict: {refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--overwrite"),
        "{refused:?}"
    );
    let malformed = server.cli(&["node", "label", "node-b", "zone"]);
    assert_eq!(malformed.status.code(), Some(2), "{malformed:?}");
    server.cli_ok(&[
        "node",
        "label",
        "node-a",
        "zone=b",
        "tier=web",
        "--overwrite",
    ]);
    let on_b = server.replica_ids("hello");
    server.cli_ok(&["node", "label", "node-b", "zone=c", "--overwrite"]);
    let on_a: BTreeMap<String, usize> = [("node-a".to_string(), 2)].into();
    assert!(
        poll(Duration::from_secs(30), || server.placement("hello")
            == on_a),
        "{:?} {:#} {:#}",
        server.placement("hello"),
        server.api_json("/v1/replicas?app=hello"),
        server.api_json("/v1/apps/hello/rollout")
    );
    assert!(server.replica_ids("hello").is_disjoint(&on_b));
    let labels = |node: &str| {
        server
            .api_json("/v1/nodes")
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap()["labels"]
            .clone()
    };
    b.kill();
    b.restart();
    // Registered again with its own --label zone=b: the operator's zone=c stays.
    assert!(
        poll(Duration::from_secs(30), || server
            .cli_ok(&["events"])
            .matches("NodeReady")
            .count()
            >= 3),
        "{}",
        server.cli_ok(&["events"])
    );
    assert_eq!(labels("node-b"), serde_json::json!({"zone": "c"}));
    assert_eq!(server.placement("hello"), on_a);
    server.cli_ok(&["node", "label", "node-a", "tier-"]);
    assert_eq!(labels("node-a"), serde_json::json!({"zone": "b"}));
    let events = server.cli_ok(&["events"]);
    assert!(
        events.contains("Labeled")
            && events.contains("zone=c (was b)")
            && events.contains("tier removed (was web)"),
        "{events}"
    );
}

#[test]
fn a_control_plane_restart_loses_nothing() {
    let (dir, mut server, nodes) = cluster(2, &[]);
    apply_hello(&server, dir.path(), 2);
    let before = server.replica_ids("hello");
    server.kill();
    // Nodes keep serving while the control plane is down, for longer than
    // the node grace (3 s): every request during that time must succeed.
    let down = std::time::Instant::now();
    while down.elapsed() < Duration::from_millis(3500) {
        for node in &nodes {
            assert_eq!(
                node.get("/hello").unwrap().0,
                200,
                "{} while down",
                node.name
            );
        }
    }
    server.restart();
    assert!(poll(Duration::from_secs(20), || ready_count(
        &server, "hello"
    ) == 2));
    // Coming back after an outage longer than the grace evicts nobody.
    assert_eq!(server.replica_ids("hello"), before);
    let apps = server.api_json("/v1/apps");
    assert_eq!(apps.as_array().unwrap().len(), 1);
    // Nodes are back in touch: a new app is placed and served.
    let text = std::fs::read_to_string(hello_spec(dir.path(), 2, ""))
        .unwrap()
        .replace("name = \"hello\"", "name = \"hello-2\"")
        .replace("\"/hello\"", "\"/hello-2\"");
    let spec = write_spec(dir.path(), "hello2.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || ready_count(
        &server, "hello-2"
    ) == 2));
    assert!(poll(Duration::from_secs(10), || nodes[0]
        .get("/hello-2")
        .is_ok_and(|(c, _)| c == 200)));
}

#[test]
fn drain_moves_replicas_without_failed_requests() {
    let (dir, server, nodes) = cluster(3, &[]);
    apply_hello(&server, dir.path(), 3);
    let load = Load::start(format!("{}/hello", nodes[0].gateway));
    // --wait returns once nothing runs there.
    let said = server.cli_ok(&["node", "drain", "node-2", "--wait"]);
    assert!(said.ends_with("node node-2 drained\n"), "{said}");
    assert!(!server.placement("hello").contains_key("node-2"));
    assert!(
        poll(Duration::from_secs(30), || {
            let p = server.placement("hello");
            p.values().sum::<usize>() == 3
                && !p.contains_key("node-2")
                && server.replicas("hello").len() == 3
        }),
        "{:?}",
        server.placement("hello")
    );
    let r = load.stop();
    assert!(r.ok > 0);
    assert_eq!(r.failed, 0, "failed during the drain: {r:?}");
    let nodes_table = server.cli_ok(&["get", "nodes"]);
    assert!(nodes_table.contains("Cordoned"), "{nodes_table}");
}

/// A load balancer checking a node's `/_shoal/ready` is told it shuts down as soon as it gets
/// SIGTERM, and the node's gateway goes on serving for its `--shutdown-delay`: clients the
/// balancer has not moved yet are served, not refused.
#[test]
fn a_stopping_node_says_so_at_its_ready_path_and_serves_on_for_its_delay() {
    let (dir, server, mut nodes) = cluster(2, &["--shutdown-delay", "4s"]);
    apply_hello(&server, dir.path(), 2);
    let status = |node: &NodeProc, path: &str| {
        common::client()
            .get(format!("{}{path}", node.gateway))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let ready = |node: &NodeProc| status(node, "/_shoal/ready");
    let hello = |node: &NodeProc| status(node, "/hello");
    assert!(poll(Duration::from_secs(30), || ready(&nodes[1]) == 200
        && hello(&nodes[1]) == 200));
    nodes[1].signal_term();
    assert!(
        poll(Duration::from_secs(3), || ready(&nodes[1]) == 503),
        "still ready after SIGTERM"
    );
    // Told, the balancer may still send some: they are served, even once its replicas have
    // moved, for the rest of its delay.
    assert_eq!(hello(&nodes[1]), 200);
    assert!(poll(Duration::from_secs(3), || !server
        .placement("hello")
        .contains_key("node-2")));
    assert!(
        !poll(Duration::from_secs(2), || hello(&nodes[1]) != 200),
        "refused within its delay"
    );
    assert_eq!(ready(&nodes[0]), 200, "the other node stays ready");
    let status = nodes[1].exit_within(Duration::from_secs(40));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// `systemctl stop` of a worker: on SIGTERM it has its replicas replaced on the other nodes,
/// each new one Ready before its old one stops, and only then exits; back, it takes work again.
#[test]
fn a_node_stopped_with_sigterm_hands_its_replicas_over_first() {
    let (dir, server, mut nodes) = cluster(2, &[]);
    apply_hello(&server, dir.path(), 4);
    assert!(
        server.placement("hello").contains_key("node-2"),
        "{:?}",
        server.placement("hello")
    );
    server.cli_ok(&[
        "apply",
        "-f",
        &common::faulty_spec(dir.path(), "faulty.toml", 2, ""),
    ]);
    assert!(
        poll(Duration::from_secs(30), || ready_count(&server, "faulty")
            == 2),
        "{:?}",
        server.placement("faulty")
    );
    let load = Load::start(format!("{}/hello", nodes[0].gateway));
    // Slow requests entering through the stopping node finish before it exits: they are in
    // flight well before its replicas have moved (each replacement must be Ready first).
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("{}/faulty/sleep/3000", nodes[1].gateway);
            std::thread::spawn(move || {
                let reply = common::client()
                    .get(url)
                    .send()
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((reply.status().as_u16(), reply.text().unwrap_or_default()))
            })
        })
        .collect();
    let status = nodes[1]
        .terminate(Duration::from_secs(40))
        .expect("node-2 exits within its drain timeout");
    assert!(status.success(), "{status:?}");
    for request in slow {
        let answer = request.join().unwrap();
        assert_eq!(answer, Ok((200, "slept 3000 ms".to_string())));
    }
    // Handed over before it exited, not replaced after it was missed.
    assert_eq!(
        server.placement("hello"),
        BTreeMap::from([("node-1".to_string(), 4)])
    );
    assert_eq!(server.replicas("hello").len(), 4);
    let r = load.stop();
    assert!(r.ok > 0);
    assert_eq!(r.failed, 0, "failed as the node stopped: {r:?}");
    let row = |server: &Server| {
        let table = server.cli_ok(&["get", "nodes"]);
        let row = table
            .lines()
            .find(|l| l.starts_with("node-2 "))
            .map(str::to_string);
        row.unwrap_or_else(|| panic!("no node-2 in {table}"))
    };
    assert!(
        poll(Duration::from_secs(30), || row(&server).contains(",Left ")),
        "{}",
        row(&server)
    );
    let events = server.cli_ok(&["events"]);
    assert!(events.contains("node node-2 is shutting down"), "{events}");

    // Started again, it is schedulable (the cordon was its own) and gets its share back.
    nodes[1].restart();
    assert!(
        poll(Duration::from_secs(30), || {
            let n = server.api_json("/v1/nodes");
            n.as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "node-2" && n["state"] == "Ready" && n["schedulable"] == true)
        }),
        "{}",
        row(&server)
    );
    assert!(
        poll(Duration::from_secs(30), || server
            .placement("hello")
            .get("node-2")
            .is_some_and(|&n| n > 0)),
        "{:?}",
        server.placement("hello")
    );
}

#[test]
fn apps_call_each_other_by_service_name_across_nodes() {
    let (dir, server, nodes) = cluster(3, &[]);
    let target = format!("{}/target", examples());
    let backend = std::fs::read_to_string(format!("{}/backend/app.toml", examples()))
        .unwrap()
        .replace("../target", &target)
        .replace("replicas = 2", "replicas = 1");
    let backend = write_spec(dir.path(), "backend.toml", &backend);
    // One frontend per node, so most calls cross to the backend's node.
    let frontend = std::fs::read_to_string(format!("{}/frontend/app.toml", examples()))
        .unwrap()
        .replace("../target", &target)
        .replace("replicas = 2", "replicas = 3");
    let frontend = write_spec(
        dir.path(),
        "frontend.toml",
        &format!("{frontend}\n[placement]\nspread = \"required\"\n"),
    );
    server.cli_ok(&[
        "apply",
        "-f",
        backend.to_str().unwrap(),
        "-f",
        frontend.to_str().unwrap(),
    ]);
    assert!(poll(Duration::from_secs(30), || {
        ready_count(&server, "backend") == 1 && ready_count(&server, "frontend") == 3
    }));
    assert_eq!(server.placement("frontend").len(), 3);
    for node in &nodes {
        let mut last = String::new();
        let ok = poll(Duration::from_secs(10), || match node.get("/frontend") {
            Ok((200, body)) => {
                last = body;
                last.contains("frontend -> 200") && last.contains("Hello from the backend!")
            }
            other => {
                last = format!("{other:?}");
                false
            }
        });
        assert!(ok, "{}: {last}", node.name);
    }
    let services = server.api_json("/v1/services");
    let backend = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backend")
        .unwrap();
    assert_eq!(backend["host"], "backend.default");
    assert_eq!(backend["endpoints"].as_array().unwrap().len(), 1);

    // Anything not granted stays unreachable from a sandbox.
    let faulty = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &target);
    let faulty = write_spec(dir.path(), "faulty.toml", &faulty);
    server.cli_ok(&["apply", "-f", faulty.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || ready_count(
        &server, "faulty"
    ) == 1));
    let mut last = String::new();
    assert!(
        poll(Duration::from_secs(10), || {
            match nodes[0].get("/faulty/net") {
                Ok((200, body)) => {
                    last = body;
                    true
                }
                _ => false,
            }
        }),
        "faulty never answered"
    );
    assert!(last.contains("denied"), "{last}");
}

#[test]
fn a_node_the_control_plane_forgot_registers_again() {
    let (dir, mut server, nodes) = cluster(1, &[]);
    assert!(poll(Duration::from_secs(20), || {
        server.api_json("/v1/nodes").as_array().unwrap().len() == 1
    }));
    // Changes the node's watch brings (it is cordoned and uncordoned), so that its view is at
    // a revision the new state will not reach for a while.
    for i in 0..50 {
        let verb = if i % 2 == 0 { "cordon" } else { "uncordon" };
        let resp = server
            .http()
            .post(format!("{}/v1/nodes/node-1/{verb}", server.api))
            .bearer_auth(&server.token)
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{verb}: {}", resp.status());
    }
    // The control plane comes back with its tokens but without its state: refused unless
    // asked for, so that a lost state is restored rather than replaced by an empty one.
    server.kill();
    std::fs::remove_file(dir.path().join("server/state.redb")).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["server", "--data-dir"])
        .arg(dir.path().join("server"))
        .args(["--api", &common::free_addr()])
        .env("SHOAL_CONFIG", dir.path().join("config.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{said}");
    assert!(said.contains("restore state.redb from a backup"), "{said}");
    assert!(!dir.path().join("server/state.redb").exists());
    // Asked for: the node's heartbeats answer 404, and it joins again by itself.
    server.restart_with(&["--new-state"]);
    assert!(
        poll(Duration::from_secs(30), || {
            let nodes = server.api_json("/v1/nodes");
            nodes
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "node-1")
        }),
        "{}",
        server.api_json("/v1/nodes")
    );
    // It reads the new state whole: its watch does not go on at a revision of the old one.
    let spec = common::write_spec(
        dir.path(),
        "hello.toml",
        &common::example_spec("hello", 1, "Hello after the reset"),
    );
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        poll(Duration::from_secs(30), || matches!(
            nodes[0].get("/hello"),
            Ok((200, body)) if body.contains("Hello after the reset")
        )),
        "the node never served what was applied after the reset: {:?}",
        nodes[0].get("/hello")
    );
}

/// A client that stops reading a large response it gets through a hop holds up only its own
/// stream of the hop's one HTTP/2 connection: other requests through the same gateway to
/// the same node are answered whole meanwhile.
#[test]
fn a_client_that_stops_reading_through_a_hop_holds_up_no_one_else() {
    use std::io::{Read, Write};
    let (dir, server, nodes) = cluster(2, &[]);
    let text = std::fs::read_to_string(format!("{}/faulty/app.toml", common::examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", common::examples()))
        .replace("timeout = \"5s\"", "timeout = \"60s\"");
    let spec = common::write_spec(dir.path(), "faulty.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        poll(Duration::from_secs(30), || ready_count(&server, "faulty")
            == 1),
        "{:#}",
        server.api_json("/v1/replicas?app=faulty")
    );
    let here = match server.placement("faulty").contains_key(&nodes[0].name) {
        true => &nodes[1],
        false => &nodes[0],
    };
    let mut slow =
        std::net::TcpStream::connect(here.gateway.trim_start_matches("http://")).unwrap();
    write!(
        slow,
        "GET /faulty/huge/1000 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    // Its head and the start of its body, and then nothing more is read.
    let mut start = [0u8; 4096];
    slow.read_exact(&mut start).unwrap();
    assert!(
        start.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&start)
    );
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Requests back to back for a while: the stalled response fills what the hop lets
    // arrive unread within a moment, and from then on no one else would be answered.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let answer = quick
            .get(format!("{}/faulty/count", here.gateway))
            .send()
            .and_then(|r| Ok((r.status().as_u16(), r.text()?)));
        assert!(
            answer.as_ref().is_ok_and(|(code, _)| *code == 200),
            "{answer:?}"
        );
    }
    drop(slow);
}
