//! Node pools end to end: a `shoal server` with no node of its own starts local workers
//! (real `shoal node join` processes) when replicas fit on no node, and drains and stops
//! them once they run nothing.

mod common;

use common::{Server, poll};
use std::collections::BTreeMap;
use std::time::Duration;

/// Ready replicas of `app` per node.
fn placement(server: &Server, app: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in server.replicas(app) {
        if r["phase"] == "Ready" {
            *out.entry(r["node"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    out
}

fn nodes(server: &Server) -> Vec<serde_json::Value> {
    server.api_json("/v1/nodes").as_array().unwrap().clone()
}

#[test]
fn a_pool_grows_when_replicas_do_not_fit_and_shrinks_when_they_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    server.cli_ok(&[
        "pool",
        "create",
        "workers",
        "--max",
        "3",
        "--cooldown",
        "2s",
        "--node-arg=--memory",
        "--node-arg=1Gi",
    ]);
    // Twenty replicas of 100Mi: ten fit on a 1Gi worker, so two workers.
    let spec = common::example_spec("hello", 20, "Hello from a pool!")
        .replace(
            "requests = { cpu = \"50m\" }",
            "requests = { cpu = \"50m\", memory = \"100Mi\" }",
        )
        .replace(
            "limits = { memory = \"32Mi\" }",
            "limits = { memory = \"100Mi\" }",
        );
    let file = common::write_spec(dir.path(), "hello.toml", &spec);
    server.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let two: BTreeMap<String, usize> =
        [("workers-1".to_string(), 10), ("workers-2".to_string(), 10)].into();
    assert!(
        poll(Duration::from_secs(90), || placement(&server, "hello")
            == two),
        "{:?} on {:?}",
        placement(&server, "hello"),
        nodes(&server)
    );
    let listed = server.cli_ok(&["get", "pools"]);
    assert!(
        listed.contains("workers") && listed.contains("workers-1,workers-2"),
        "{listed}"
    );
    let events = server.cli_ok(&["events"]);
    assert_eq!(events.matches("PoolNodeStarting").count(), 2, "{events}");
    assert!(events.contains("fit on no node"), "{events}");
    // The workers serve: each is a real node with its own gateway.
    for node in nodes(&server) {
        let gateway = node["gateway"].as_str().unwrap().to_string();
        let body = common::client()
            .get(format!("http://{gateway}/hello"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(body.contains("Hello from a pool!"), "{gateway}: {body}");
    }
    let err = server.cli(&["pool", "delete", "workers"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("runs 2 nodes"),
        "{err:?}"
    );

    // Gone: after the cool-down both workers are drained, stopped and deleted.
    server.cli_ok(&["delete", "app", "hello"]);
    assert!(
        poll(Duration::from_secs(60), || nodes(&server).is_empty()),
        "{:?}",
        nodes(&server)
    );
    let pool = server.api_json("/v1/pools/workers");
    assert_eq!(pool["members"], serde_json::json!({}), "{pool}");
    let events = server.cli_ok(&["events"]);
    assert_eq!(events.matches("PoolNodeStopped").count(), 2, "{events}");
    assert!(events.contains("ran no replica for 2 s"), "{events}");
    server.cli_ok(&["pool", "delete", "workers"]);
}
