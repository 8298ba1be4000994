//! Node identity on real processes: the join token only bootstraps, each node
//! then acts with a credential of its own, reads other apps without their
//! configuration, and can be deleted.

mod common;

use common::{NodeProc, Server, examples, poll, write_spec};
use std::time::Duration;

/// Every env value of `app`'s revisions in what `node` reads.
fn env_seen(server: &Server, node: &NodeProc, app: &str) -> Vec<String> {
    let resp = server.as_node(node, "/v1/cluster/snapshot");
    assert_eq!(resp.status(), 200);
    let snapshot: serde_json::Value = resp.json().unwrap();
    let mut seen = Vec::new();
    for r in snapshot["revisions"].as_array().unwrap() {
        if r["app"]["name"] == app {
            for v in r["template"]["env"].as_object().unwrap().values() {
                seen.push(v.as_str().unwrap().to_string());
            }
        }
    }
    for a in snapshot["apps"].as_array().unwrap() {
        for v in a["spec"]["env"]
            .as_object()
            .into_iter()
            .flat_map(|e| e.values())
        {
            seen.push(v.as_str().unwrap().to_string());
        }
    }
    seen
}

fn node_listed(server: &Server, name: &str) -> bool {
    let nodes = server.api_json("/v1/nodes");
    nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == name && n["state"] == "Ready")
}

#[test]
fn each_node_reads_only_the_configuration_of_what_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let runs = NodeProc::join(&server, "node-1", &["--label", "role=a"]);
    let other = NodeProc::join(&server, "node-2", &["--label", "role=b"]);
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("Hello from Shoal!", "only-for-node-1")
        .replace(
            "[scale]",
            "[placement]\nnode_selector = { role = \"a\" }\n\n[scale]",
        );
    let spec = write_spec(dir.path(), "hello.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(
        poll(Duration::from_secs(30), || server.ready_nodes("hello")
            == ["node-1"]),
        "{:#}",
        server.api_json("/v1/replicas?app=hello")
    );
    let (code, body) = runs.get("/hello").unwrap();
    assert_eq!(
        (code, body.contains("only-for-node-1")),
        (200, true),
        "{body}"
    );
    // node-2 still routes to it, through node-1.
    let (code, body) = other.get("/hello").unwrap();
    assert_eq!(
        (code, body.contains("only-for-node-1")),
        (200, true),
        "{body}"
    );

    assert!(env_seen(&server, &runs, "hello").contains(&"only-for-node-1".to_string()));
    assert_eq!(env_seen(&server, &other, "hello"), Vec::<String>::new());

    // The watch, too: node-2 follows changes without ever seeing the value.
    let revision = {
        let s: serde_json::Value = server
            .as_node(&other, "/v1/cluster/snapshot")
            .json()
            .unwrap();
        s["revision"].as_u64().unwrap()
    };
    let text = text.replace("only-for-node-1", "changed-for-node-1");
    let spec = write_spec(dir.path(), "hello.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || {
        runs.get("/hello")
            .is_ok_and(|(_, b)| b.contains("changed-for-node-1"))
    }));
    let mut watch = server
        .http()
        .get(format!("{}/v1/cluster/watch?from={revision}", server.api))
        .bearer_auth(other.credential())
        .timeout(Duration::from_secs(2))
        .send()
        .unwrap();
    let mut seen = Vec::new();
    let _ = std::io::Read::read_to_end(&mut watch, &mut seen);
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("\"revision\""), "the watch streamed: {seen}");
    assert!(!seen.contains("for-node-1"), "{seen}");

    // Modules go only to the nodes that run them.
    let app = server.api_json("/v1/apps/hello");
    let digest = app["app"]["spec"]["component"]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{app:#}"));
    let path = format!("/v1/cluster/modules/{digest}");
    assert_eq!(server.as_node(&runs, &path).status(), 200);
    assert_eq!(server.as_node(&other, &path).status(), 403);
}

#[test]
fn a_node_restarts_on_its_own_credential_and_a_deleted_one_must_join_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut node = NodeProc::join(&server, "node-1", &[]);
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));
    let first = node.credential();
    let identity = node.dir.join("node-identity.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&identity).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the credential is its owner's only");

    // A restart needs no join token: the node's own credential is in its data dir.
    node.kill();
    std::fs::remove_file(node.dir.with_extension("join-token")).unwrap();
    node.restart();
    assert_eq!(node.credential(), first);
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));

    // Nobody joins again under its name with the join token.
    let intruder = std::process::Command::new(common::SHOAL)
        .args(["node", "join", &server.api, "--node-name", "node-1"])
        .arg("--data-dir")
        .arg(dir.path().join("intruder"))
        .args(["--gateway", "127.0.0.1:0"])
        .env("SHOAL_JOIN_TOKEN", &server.join_token)
        .output()
        .unwrap();
    assert_eq!(intruder.status.code(), Some(4), "a conflict");
    let err = String::from_utf8_lossy(&intruder.stderr);
    assert!(err.contains("node-1 has joined already"), "{err}");

    // Deleted, its credential is refused; it joins again with the join token.
    server.cli_ok(&["node", "delete", "node-1"]);
    assert!(!node_listed(&server, "node-1"));
    // Asked with the credential it had: the node, still running, may already have joined
    // again with the join token (its file is back since the restart) and hold a new one.
    let refused = server
        .http()
        .get(format!("{}/v1/cluster/snapshot", server.api))
        .bearer_auth(&first)
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    node.kill();
    node.restart();
    assert_ne!(node.credential(), first);
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));
    let events = server.cli_ok(&["events"]);
    assert!(events.contains("NodeDeleted"), "{events}");
}

/// A node that has joined and is restarted while its control plane is down waits for it, as
/// a kubelet does for its API server, and starts when it answers: no supervisor needed.
#[test]
fn a_node_restarted_during_a_control_plane_outage_starts_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let mut node = NodeProc::join(&server, "node-1", &[]);
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));
    server.kill();
    node.kill();
    let log_file = node.dir.with_extension("log");
    std::fs::remove_file(&log_file).unwrap();
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let gateway = node.gateway.clone();
    std::thread::scope(|s| {
        // The node starts again first, finds no server and waits; it prints its gateway
        // only once the server is back.
        let restarted = s.spawn(|| node.restart());
        let waits = poll(Duration::from_secs(20), || {
            log().contains("starts when it answers")
        });
        // Meanwhile its port answers at once that it is starting, rather than leaving
        // clients' connections unanswered until the control plane is back.
        let reply = common::client()
            .get(format!("{gateway}/hello"))
            .timeout(Duration::from_secs(5))
            .send()
            .unwrap();
        assert_eq!(reply.status(), 503);
        assert!(reply.text().unwrap().contains("unavailable"));
        server.restart();
        restarted.join().unwrap();
        assert!(waits, "{}", log());
    });
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));
    assert!(
        !log().contains('\u{1b}'),
        "no colour codes in a log file: {:?}",
        log()
    );
}

/// A node joining for the first time while its control plane is down waits for it within
/// `--join-wait` (a server still starting, or closing connections past an address's cap), and
/// past that exits 5.
#[test]
fn a_first_join_waits_for_the_control_plane_within_its_join_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    server.kill();
    let token_file = dir.path().join("join-token");
    std::fs::write(&token_file, &server.join_token).unwrap();
    let impatient = common::run_cli(
        &dir.path().join("config.toml"),
        &[
            "node",
            "join",
            &server.api,
            "--token-file",
            token_file.to_str().unwrap(),
            "--data-dir",
            dir.path().join("impatient").to_str().unwrap(),
            "--node-name",
            "impatient",
            "--join-wait",
            "1s",
        ],
    );
    assert_eq!(impatient.status.code(), Some(5), "{impatient:?}");
    let said = String::from_utf8_lossy(&impatient.stderr);
    assert!(said.contains("cannot read the cluster CA"), "{said}");

    let (api, token) = (server.api.clone(), server.join_token.clone());
    let node_dir = dir.path().join("node-1");
    let log_file = node_dir.with_extension("log");
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let node = std::thread::scope(|s| {
        let joining = s.spawn(|| {
            NodeProc::spawn(
                &node_dir,
                "node-1",
                &api,
                &token,
                &common::free_addr(),
                Vec::new(),
            )
        });
        let waits = poll(Duration::from_secs(20), || {
            log().contains("does not answer yet")
        });
        server.restart();
        let node = joining.join().unwrap();
        assert!(waits, "{}", log());
        node
    });
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, &node.name
    )));
}

#[test]
fn a_rotated_join_token_lets_new_nodes_in_and_the_old_one_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let joined = NodeProc::join(&server, "node-1", &[]);
    let new_token = dir.path().join("new-join-token");
    let out = server.cli_ok(&[
        "token",
        "rotate-join",
        "--write",
        new_token.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&new_token).unwrap();
    assert!(
        !out.contains(&token),
        "the token is written, never printed: {out}"
    );
    assert_ne!(token, server.join_token);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("server/join-token")).unwrap(),
        token,
        "the control plane keeps the new one"
    );

    let old = std::process::Command::new(common::SHOAL)
        .args(["node", "join", &server.api, "--node-name", "node-2"])
        .arg("--data-dir")
        .arg(dir.path().join("node-2"))
        .args(["--gateway", "127.0.0.1:0"])
        .env("SHOAL_JOIN_TOKEN", &server.join_token)
        .output()
        .unwrap();
    assert_eq!(old.status.code(), Some(6), "denied");
    assert!(String::from_utf8_lossy(&old.stderr).contains("refused the join token"));

    server.join_token = token;
    let _second = NodeProc::join(&server, "node-2", &[]);
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-2"
    )));
    // The node that joined before carries on with its own credential.
    assert_eq!(
        server.as_node(&joined, "/v1/cluster/snapshot").status(),
        200
    );
    assert!(node_listed(&server, "node-1"));
}

/// A node checks the server before it sends its join token: the server's CA must hash to what
/// the token carries (as k3s's tokens do), and the API speaks TLS, not plain text.
#[test]
fn a_node_joins_only_a_server_whose_ca_its_token_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    assert!(server.api.starts_with("https://"), "{}", server.api);
    let plain = common::client()
        .get(format!(
            "{}/v1/healthz",
            server.api.replace("https://", "http://")
        ))
        .send();
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    let secret = server.join_token.split_once('.').unwrap().1;
    let join = |token: &str, name: &str| {
        std::process::Command::new(common::SHOAL)
            .args(["node", "join", &server.api, "--node-name", name])
            .arg("--data-dir")
            .arg(dir.path().join(name))
            .args(["--gateway", "127.0.0.1:0"])
            .env("SHOAL_JOIN_TOKEN", token)
            .output()
            .unwrap()
    };
    // Another cluster's CA hash: refused before the token is sent.
    let impostor = join(&format!("{}.{secret}", "ab".repeat(32)), "node-x");
    assert!(!impostor.status.success());
    let err = String::from_utf8_lossy(&impostor.stderr);
    assert!(err.contains("refusing to join"), "{err}");
    assert!(!server.cli_ok(&["events"]).contains("node-x"));
    // A node that cannot start (its gateway on every interface, and no --advertise) joins
    // nothing: its name is not left taken by a node that never ran.
    let unstartable = std::process::Command::new(common::SHOAL)
        .args(["node", "join", &server.api, "--node-name", "node-z"])
        .arg("--data-dir")
        .arg(dir.path().join("node-z"))
        .args(["--gateway", "0.0.0.0:0"])
        .env("SHOAL_JOIN_TOKEN", &server.join_token)
        .output()
        .unwrap();
    assert!(!unstartable.status.success());
    let err = String::from_utf8_lossy(&unstartable.stderr);
    assert!(err.contains("--advertise"), "{err}");
    assert!(!server.cli_ok(&["events"]).contains("node-z"));
    // No hash at all: nothing to check the server against.
    let bare = join(secret, "node-y");
    assert!(!bare.status.success());
    assert!(String::from_utf8_lossy(&bare.stderr).contains("carries no CA hash"));

    // The right token: the node keeps the CA it checked, and joins.
    let node = NodeProc::join(&server, "node-1", &[]);
    assert_eq!(
        std::fs::read_to_string(node.dir.join("ca.pem")).unwrap(),
        server.ca
    );
    assert!(poll(Duration::from_secs(10), || node_listed(
        &server, "node-1"
    )));
}

/// The certificate node `node`'s gateway presents to a cluster member connecting now (a
/// client certificate of the cluster CA, issued here from the server's data dir), DER.
fn presented(server: &Server, node: &NodeProc) -> Vec<u8> {
    let ca = shoal_tls::Authority::load_or_create(&server.dir.join("server")).unwrap();
    let issued = ca.issue_client(shoal_tls::CONTROL_PLANE).unwrap();
    let members = shoal_tls::mutual(&issued, &server.ca).unwrap();
    let addr: std::net::SocketAddr = node.gateway.trim_start_matches("http://").parse().unwrap();
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(members.client_for(&node.name)),
        rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
    )
    .unwrap();
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut socket).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn certificates_are_renewed_in_place_and_the_cluster_works_past_the_first_ones_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--cert-validity", "6s"]);
    let mut runs = NodeProc::join(&server, "node-1", &["--label", "role=a"]);
    let other = NodeProc::join(&server, "node-2", &["--label", "role=b"]);
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "[scale]",
            "[placement]\nnode_selector = { role = \"a\" }\n\n[scale]",
        );
    let spec = write_spec(dir.path(), "hello.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || server
        .ready_nodes("hello")
        == ["node-1"]));
    let first = presented(&server, &runs);
    let (_, first_ends) = shoal_tls::validity(&first).unwrap();
    let left = first_ends
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(6), "valid {left:?} more");

    // Past its end, the node presents a renewed certificate, still of node-1.
    let mut now = first.clone();
    assert!(poll(Duration::from_secs(30), || {
        now = presented(&server, &runs);
        now != first && std::time::SystemTime::now() > first_ends + Duration::from_secs(1)
    }));
    let (from, until) = shoal_tls::validity(&now).unwrap();
    assert!(from < std::time::SystemTime::now() && std::time::SystemTime::now() < until);
    assert_eq!(shoal_tls::member_of(&now).as_deref(), Some("node-1"));

    // The API's certificate was renewed too (the CLI checks it on every call), and the
    // control plane's own: it reads node-1's logs over a new connection.
    server.cli_ok(&["get", "apps"]);
    assert_eq!(runs.get("/hello").map(|(code, _)| code), Ok(200));
    let logs = server.cli_ok(&["logs", "hello"]);
    assert!(logs.contains("GET /hello"), "{logs}");
    // node-2 hops with its renewed certificate: node-1 restarted, so over a new connection.
    runs.kill();
    runs.restart();
    assert!(
        poll(Duration::from_secs(30), || other
            .get("/hello")
            .is_ok_and(|(code, _)| code == 200)),
        "{:?}",
        other.get("/hello")
    );
}
