//! The cluster-wide key-value store on real processes: the `counter` example counts through
//! `wasi:keyvalue` on two nodes and ends exact, an app not granted the bucket is refused, a
//! bucket keeps to its limit, `shoal kv` reads and writes the same data, and every write the
//! API acknowledged survives a kill -9.

mod common;

use common::{Cluster, NodeProc, Server, client, examples, free_addr, poll, sample, write_spec};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `counter` example's spec (bucket `counter` granted, 2 replicas), under `name` at
/// `route`, granted nothing if `!granted`.
fn counter_spec(dir: &std::path::Path, name: &str, route: &str, granted: bool) -> String {
    let mut text = std::fs::read_to_string(format!("{}/counter/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("name = \"counter\"", &format!("name = \"{name}\""))
        .replace(
            "routes = [\"/counter\"]",
            &format!("routes = [\"{route}\"]"),
        );
    if !granted {
        text = text.replace("[keyvalue]\nbuckets = [\"counter\"]\n", "");
    }
    write_spec(dir, &format!("{name}.toml"), &text)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn increments_from_replicas_on_two_nodes_are_exact_and_only_granted_apps_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = Server::start_with(d, &["--scheduling", "spread", "--kv-bucket-size", "4Ki"]);
    let metrics = [free_addr(), free_addr()];
    let nodes = [
        NodeProc::join(&server, "node-1", &["--metrics", &metrics[0]]),
        NodeProc::join(&server, "node-2", &["--metrics", &metrics[1]]),
    ];
    server.cli_ok(&["apply", "-f", &counter_spec(d, "counter", "/counter", true)]);
    assert!(
        poll(Duration::from_secs(30), || {
            let mut on = server.ready_nodes("counter");
            on.sort();
            on == ["node-1", "node-2"]
        }),
        "{:#}",
        server.api_json("/v1/replicas?app=counter")
    );

    // 32 clients, 16 on each node's gateway, 25 increments each: every answer is a different
    // count, and they are 1 to 800. Enough at once that a node sends calls together.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let url = format!("{}/counter/hits", nodes[i % 2].gateway);
            let seen = seen.clone();
            std::thread::spawn(move || {
                let http = client();
                for _ in 0..25 {
                    let resp = http.post(&url).send().unwrap();
                    assert_eq!(resp.status(), 200);
                    let n: u64 = resp.text().unwrap().trim().parse().unwrap();
                    seen.lock().unwrap().push(n);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let seen: BTreeSet<u64> = seen.lock().unwrap().iter().copied().collect();
    assert_eq!(seen, (1..=800).collect::<BTreeSet<u64>>());
    // Each node counts the calls it sent and the requests that carried them (the gateways
    // spread requests over both nodes' replicas: 800 calls in all).
    let mut all_calls = 0.0;
    for addr in &metrics {
        let text = client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .and_then(|r| r.text())
            .unwrap();
        let calls = sample(&text, "shoal_node_kv_calls_total").unwrap_or(0.0);
        let requests = sample(&text, "shoal_node_kv_requests_total").unwrap_or(0.0);
        assert!((1.0..=calls).contains(&requests), "{text}");
        all_calls += calls;
    }
    assert!(all_calls >= 800.0, "{all_calls} calls");
    for node in &nodes {
        assert_eq!(
            node.get("/counter/hits").unwrap(),
            (200, "800\n".to_string())
        );
    }

    // The CLI sees the same data, and what it writes the guests read.
    assert_eq!(server.cli_ok(&["kv", "get", "counter", "hits"]), "800");
    let json: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["kv", "get", "counter", "hits", "-o", "json"]))
            .unwrap();
    assert_eq!(
        json,
        serde_json::json!({ "bucket": "counter", "key": "hits", "value": "800" })
    );
    server.cli_ok(&["kv", "put", "counter", "greeting", "hello there"]);
    assert_eq!(
        nodes[1].get("/counter/greeting").unwrap(),
        (200, "hello there\n".to_string())
    );
    assert_eq!(
        server.cli_ok(&["kv", "list", "counter"]),
        "greeting\nhits\n"
    );
    let buckets = server.cli_ok(&["kv", "buckets"]);
    assert!(
        buckets.contains("counter") && buckets.contains(" 2 "),
        "{buckets}"
    );

    // Past the bucket's limit (4 KiB here) a write fails, for the guest and the CLI alike,
    // and nothing of it is kept.
    let big = "x".repeat(5000);
    let (code, body) = {
        let resp = client()
            .put(format!("{}/counter/big", nodes[0].gateway))
            .body(big.clone())
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("limit is 4096"), "{body}");
    let err = server.cli(&["kv", "put", "counter", "big", &big]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("limit is 4096"),
        "{err:?}"
    );
    assert_eq!(
        nodes[0].get("/counter/big").unwrap(),
        (200, "0\n".to_string())
    );
    // An empty key is a usage error, not a request.
    let err = server.cli(&["kv", "put", "counter", "", "x"]);
    assert_eq!(err.status.code(), Some(2), "{err:?}");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("a key is 1 to 1024 bytes"),
        "{err:?}"
    );
    // A key is no step up the API's paths: this deleted the app, with exit 0.
    let err = server.cli(&["kv", "delete", "counter", "../../apps/counter"]);
    assert_eq!(err.status.code(), Some(2), "{err:?}");
    server.cli_ok(&["describe", "app", "counter"]);
    server.cli_ok(&["kv", "delete", "counter", "greeting"]);
    assert_eq!(server.cli_ok(&["kv", "list", "counter"]), "hits\n");

    // An app not granted the bucket cannot open it.
    server.cli_ok(&[
        "apply",
        "-f",
        &counter_spec(d, "stranger", "/stranger", false),
    ]);
    assert!(poll(Duration::from_secs(30), || {
        nodes[0]
            .get("/stranger/hits")
            .is_ok_and(|(code, body)| code == 403 && body == "access denied\n")
    }));
    assert_eq!(server.cli_ok(&["kv", "get", "counter", "hits"]), "800");

    // With the control plane gone the guest's call fails, and what the guest is told (and
    // here passes on to its client) says so without where the control plane is.
    server.kill();
    let (code, body) = nodes[0].get("/counter/hits").unwrap();
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("cannot be reached"), "{body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
}

#[test]
fn every_acknowledged_write_survives_a_kill_9() {
    let mut c = Cluster::start();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let (http, api, token) = (c.http(), c.api.clone(), c.token.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("k-{t}-{i}");
                    let sent = http
                        .put(format!("{api}/v1/kv/burst/{key}"))
                        .bearer_auth(&token)
                        .body(format!("value of {key}"))
                        .timeout(Duration::from_secs(5))
                        .send();
                    match sent {
                        Ok(r) if r.status() == 204 => acked.lock().unwrap().push(key),
                        // The server died under it: this write may or may not have landed.
                        _ => break,
                    }
                }
            })
        })
        .collect();
    assert!(poll(Duration::from_secs(30), || acked
        .lock()
        .unwrap()
        .len()
        >= 200));
    c.kill_and_restart();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let listed: BTreeSet<String> = c
        .cli_ok(&["kv", "list", "burst"])
        .lines()
        .map(str::to_string)
        .collect();
    for key in &acked {
        assert!(listed.contains(key), "acknowledged {key} is gone");
    }
    let last = acked.last().unwrap();
    assert_eq!(
        c.cli_ok(&["kv", "get", "burst", last]),
        format!("value of {last}")
    );
}

/// A value read from standard input (`--from-file -`), as `backup` and `restore` take `-`.
#[test]
fn a_value_is_read_from_standard_input() {
    let c = Cluster::start();
    let put = c.cli_stdin(
        &["kv", "put", "notes", "k", "--from-file", "-"],
        "from stdin\n",
    );
    assert!(put.status.success(), "{put:?}");
    assert_eq!(c.cli_ok(&["kv", "get", "notes", "k"]), "from stdin\n");
}
