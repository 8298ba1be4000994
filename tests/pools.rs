//! Node pools end to end: a `shoal server` with no node of its own starts local workers
//! (real `shoal node join` processes) when replicas fit on no node, and drains and stops
//! them once they run nothing.

mod common;

use common::{Server, poll};
use std::collections::BTreeMap;
use std::time::Duration;

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
        "2",
        "--cooldown",
        "2s",
        "--node-arg=--memory",
        "--node-arg=1Gi",
    ]);
    // Twenty replicas of 100Mi: ten fit on a 1Gi worker, so two workers (the most the pool
    // may run, so that a slow controller on a busy machine cannot make it ask for more).
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
        poll(Duration::from_secs(90), || server.placement("hello") == two),
        "{:?} on {:?}",
        server.placement("hello"),
        nodes(&server)
    );
    let listed = server.cli_ok(&["get", "pools"]);
    assert!(
        listed.contains("workers") && listed.contains("workers-1,workers-2"),
        "{listed}"
    );
    assert!(
        listed.contains(" 2/2 "),
        "both members joined and are Ready: {listed}"
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

    // Scaled down to what one worker holds: the other's replicas fit there, so after the
    // cool-down it is drained (they move, new before old) and stopped, as a cluster
    // autoscaler consolidates.
    server.cli_ok(&["scale", "hello", "--replicas", "8"]);
    assert!(
        poll(Duration::from_secs(90), || {
            let on = server.placement("hello");
            on.len() == 1 && on.values().sum::<usize>() == 8 && nodes(&server).len() == 1
        }),
        "{:?} on {:?}",
        server.placement("hello"),
        nodes(&server)
    );
    let events = server.cli_ok(&["events"]);
    assert!(
        events.contains("its 4 replicas have fit on other nodes for 2 s"),
        "{events}"
    );

    // Gone: after the cool-down the last worker is drained, stopped and deleted.
    server.cli_ok(&["delete", "app", "hello"]);
    // The node goes first, then the member: both, in one look.
    let gone = || {
        nodes(&server).is_empty()
            && server.api_json("/v1/pools/workers")["members"] == serde_json::json!({})
    };
    assert!(
        poll(Duration::from_secs(60), gone),
        "{:?}\n{}",
        nodes(&server),
        server.api_json("/v1/pools/workers")
    );
    let events = server.cli_ok(&["events"]);
    assert_eq!(events.matches("PoolNodeStopped").count(), 2, "{events}");
    assert!(events.contains("ran no replica for 2 s"), "{events}");
    server.cli_ok(&["pool", "delete", "workers"]);
}

/// A local pool's workers stop with the control plane that started them; the one started
/// again replaces them once their nodes are not Ready or silent past the node grace, not
/// after the start timeout (a minute), so the pool's minimum is back within seconds. With
/// the workers all of the cluster's nodes, the controller holds off marking them (most
/// nodes silent at once looks like its own trouble): the pool must not wait for that.
#[test]
fn a_restarted_control_plane_replaces_the_local_workers_that_stopped_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    server.cli_ok(&["pool", "create", "workers", "--min", "2", "--max", "2"]);
    let ready = |server: &Server, name: &str| {
        nodes(server)
            .iter()
            .any(|n| n["name"] == name && n["state"] == "Ready")
    };
    assert!(
        poll(Duration::from_secs(30), || ready(&server, "workers-1")
            && ready(&server, "workers-2")),
        "{:?}",
        nodes(&server)
    );
    server.kill();
    server.restart();
    assert!(
        poll(Duration::from_secs(30), || ready(&server, "workers-3")
            && ready(&server, "workers-4")),
        "{:?}\n{}",
        nodes(&server),
        server.cli_ok(&["events"])
    );
    let events = server.cli_ok(&["events"]);
    for gone in ["workers-1", "workers-2"] {
        assert!(
            events.contains(&format!("stopping node {gone}: its worker is not running")),
            "{events}"
        );
    }
    let pool = server.api_json("/v1/pools/workers");
    let members: Vec<&String> = pool["members"].as_object().unwrap().keys().collect();
    assert_eq!(members, ["workers-3", "workers-4"], "{pool}");
}

#[test]
fn a_provider_command_starts_and_stops_workers_and_its_failures_are_said() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let workers = dir.path().join("workers");
    std::fs::create_dir_all(&workers).unwrap();
    let _cleanup = common::Started(workers.clone());
    let script = dir.path().join("provider.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nd={workers}\ncase \"$1\" in\n\
             start)\n  mkdir -p \"$d/$2\"\n  {shoal} node join \"$SHOAL_JOIN_URL\" --token-file \"$SHOAL_JOIN_TOKEN_FILE\" \
             --node-name \"$2\" --gateway 127.0.0.1:0 --data-dir \"$d/$2\" --memory 1Gi --label pool=\"$SHOAL_POOL\" \
             > \"$d/$2.log\" 2>&1 &\n  echo $! > \"$d/$2.pid\" ;;\n\
             stop)\n  if [ -e \"$d/fail-stop\" ]; then rm \"$d/fail-stop\"; echo cloud down >&2; exit 1; fi\n  \
             kill \"$(cat \"$d/$2.pid\")\"\n  echo \"$2\" >> \"$d/stopped\" ;;\nesac\n",
            workers = workers.display(),
            shoal = common::SHOAL,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pool = common::write_spec(
        dir.path(),
        "cloud.toml",
        &format!(
            "name = \"cloud\"\nmax = 1\nprovider = \"{}\"\ncooldown = \"1s\"\n",
            script.display()
        ),
    );
    let said = server.cli_ok(&["pool", "apply", "-f", pool.to_str().unwrap()]);
    assert!(said.contains("pool cloud created"), "{said}");

    let spec = common::example_spec("hello", 3, "Hello from a provider!");
    let file = common::write_spec(dir.path(), "hello.toml", &spec);
    server.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let one: BTreeMap<String, usize> = [("cloud-1".to_string(), 3)].into();
    assert!(
        poll(Duration::from_secs(60), || server.placement("hello") == one),
        "{:?} on {:?}",
        server.placement("hello"),
        nodes(&server)
    );
    assert_eq!(nodes(&server)[0]["labels"]["pool"], "cloud");
    // When the provider's start returned is kept with the member, where a restarted control
    // plane still counts the time to join from.
    let member = &server.api_json("/v1/pools/cloud")["members"]["cloud-1"];
    let returned = member["start_returned_at"].as_u64();
    assert!(
        returned >= member["started_at"].as_u64() && returned.is_some(),
        "{member}"
    );

    // The provider's first stop fails: the node stays, and is still the pool's (its worker
    // runs on), until a later stop goes through.
    std::fs::write(workers.join("fail-stop"), "").unwrap();
    server.cli_ok(&["delete", "app", "hello"]);
    // Seen together, in one look: the retry comes 10 s after the failure.
    let failed = || {
        let pool = server.api_json("/v1/pools/cloud");
        server
            .cli_ok(&["events"])
            .contains("cloud down; trying again")
            && pool["members"]["cloud-1"]["stop_failed_at"].is_u64()
            && nodes(&server).len() == 1
    };
    assert!(
        poll(Duration::from_secs(60), failed),
        "{}\n{}\n{:?}",
        server.cli_ok(&["events"]),
        server.api_json("/v1/pools/cloud"),
        nodes(&server)
    );
    assert!(
        poll(Duration::from_secs(60), || nodes(&server).is_empty()),
        "{:?}",
        nodes(&server)
    );
    let stopped = std::fs::read_to_string(workers.join("stopped")).unwrap();
    assert_eq!(stopped, "cloud-1\n");

    // A provider that fails is said, and a pool scaled to nothing goes.
    server.cli_ok(&[
        "pool",
        "create",
        "broken",
        "--min",
        "1",
        "--provider",
        "false",
    ]);
    assert!(
        poll(Duration::from_secs(30), || {
            let events = server.cli_ok(&["events"]);
            events.contains("PoolProviderFailed")
                && events.contains("could not start node broken-1")
        }),
        "{}",
        server.cli_ok(&["events"])
    );
    // Its member is not counted ready: no worker joined for it.
    let listed = server.cli_ok(&["get", "pools"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with("broken"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row.split_whitespace().nth(3), Some("0/1"), "{listed}");
    // A pool's maximum, a cap on what it costs, moves only when asked: a minimum above it
    // is refused, not a raised cap.
    let refused = server.cli(&["pool", "set", "broken", "--min", "2"]);
    assert!(!refused.status.success(), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("above max"), "{said}");
    assert_eq!(server.api_json("/v1/pools/broken")["spec"]["max"], 1);
    server.cli_ok(&["pool", "set", "broken", "--min", "0", "--max", "0"]);
    assert!(
        poll(Duration::from_secs(30), || server
            .cli(&["pool", "delete", "broken"])
            .status
            .success()),
        "{}",
        server.cli_ok(&["get", "pools"])
    );
}

/// With several pools, a waiting replica grows the one whose labels its node selector asks
/// for, and no other: its node carries the pool's labels.
#[test]
fn a_replica_grows_only_the_pool_whose_labels_it_selects() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    for (pool, size) in [("big", "big"), ("small", "small")] {
        let label = format!("size={size}");
        server.cli_ok(&[
            "pool",
            "create",
            pool,
            "--max",
            "1",
            "--label",
            &label,
            "--cooldown",
            "1h",
        ]);
    }
    let listed = server.cli_ok(&["get", "pools"]);
    assert!(listed.contains("size=small"), "{listed}");
    // "big" is first by name, so the selector, not the order, must pick "small".
    let spec = format!(
        "{}\n[placement]\nnode_selector = {{ size = \"small\" }}\n",
        common::example_spec("hello", 1, "Hello from a small node")
    );
    let file = common::write_spec(dir.path(), "hello.toml", &spec);
    server.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let on_small: BTreeMap<String, usize> = [("small-1".to_string(), 1)].into();
    assert!(
        poll(Duration::from_secs(60), || server.placement("hello")
            == on_small),
        "{:?} on {:?}",
        server.placement("hello"),
        nodes(&server)
    );
    let node = nodes(&server)
        .into_iter()
        .find(|n| n["name"] == "small-1")
        .expect("small-1 is listed");
    assert_eq!(node["labels"]["size"], "small", "{node}");
    assert_eq!(node["labels"]["shoal.dev/pool"], "small", "{node}");
    assert_eq!(
        server.api_json("/v1/pools/big")["members"],
        serde_json::json!({}),
        "the other pool stays empty"
    );
    let events = server.cli_ok(&["events"]);
    assert_eq!(events.matches("PoolNodeStarting").count(), 1, "{events}");
}
