//! Prometheus metrics end to end: after a known number of requests through the gateway, the
//! control plane's `/v1/metrics` counts exactly them for the app's revision, in a histogram too,
//! with the cluster's apps, replicas and nodes, what the controller did, how long store commits
//! took and replicas waited for a node, and the API's connections refused past a client's cap;
//! `promtool check metrics` (Debian's prometheus package) finds nothing to say about names,
//! labels or format.

mod common;

use common::{Cluster, NodeProc, examples, poll, promtool_check, sample};
use std::time::Duration;

#[test]
fn requests_are_counted_by_app_revision_and_promtool_accepts_the_format() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &format!("{}/hello/app.toml", examples())]);
    // Ready as the API says, without a request through the gateway: every request the
    // gateway answers from here on is one the test sent. One it answers itself, before its
    // table has the replicas (503 no_ready_replicas), counts under revision 0, not 1.
    assert!(poll(Duration::from_secs(30), || c
        .api_json("/v1/replicas?app=hello")
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["phase"] == "Ready")
        .count()
        == 1));
    let mut served = 0;
    assert!(poll(Duration::from_secs(30), || {
        if c.gw("/hello").status() == 200 {
            served += 1;
        }
        served == 20
    }));
    let want = 20.0;
    let labels = r#"{namespace="default",app="hello",revision="1"}"#;
    let mut text = String::new();
    assert!(
        poll(Duration::from_secs(30), || {
            text = c.api_get("/v1/metrics").text().unwrap();
            sample(&text, &format!("shoal_http_requests_total{labels}")) == Some(want)
        }),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("shoal_http_request_duration_seconds_count{labels}")
        ),
        Some(want)
    );
    let inf = r#"shoal_http_request_duration_seconds_bucket{le="+Inf",namespace="default",app="hello",revision="1"}"#;
    assert_eq!(sample(&text, inf), Some(want), "{text}");
    assert!(
        sample(
            &text,
            &format!("shoal_http_request_duration_seconds_sum{labels}")
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        sample(&text, &format!("shoal_http_server_errors_total{labels}")),
        Some(0.0)
    );
    assert_eq!(sample(&text, "shoal_apps"), Some(1.0));
    let hello = r#"{namespace="default",app="hello"}"#;
    for (name, want) in [
        ("shoal_app_replicas_desired", 1.0),
        ("shoal_app_replicas_ready", 1.0),
        ("shoal_app_replica_restarts", 0.0),
    ] {
        assert_eq!(
            sample(&text, &format!("{name}{hello}")),
            Some(want),
            "{text}"
        );
    }
    assert_eq!(
        sample(&text, r#"shoal_replicas{phase="Ready"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, r#"shoal_nodes{state="Ready"}"#), Some(1.0));
    // None of them: a series at 0 all the same, for an alert to compare.
    assert_eq!(sample(&text, r#"shoal_nodes{state="NotReady"}"#), Some(0.0));
    assert_eq!(
        sample(&text, r#"shoal_replicas{phase="CrashLoopBackOff"}"#),
        Some(0.0)
    );

    // What the control plane counts as it works.
    assert!(
        sample(
            &text,
            r#"shoal_controller_decisions_total{reason="Scheduled"}"#
        ) >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_node_heartbeats_total") >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_controller_pass_duration_seconds_count") >= Some(1.0),
        "{text}"
    );
    // The apply, the placement and the reports follow one another: each a commit the store timed.
    assert!(
        sample(&text, "shoal_store_commit_duration_seconds_count") >= Some(3.0),
        "{text}"
    );
    assert!(sample(&text, "shoal_store_commit_duration_seconds_sum") > Some(0.0));
    // The one replica was placed in the pass that made it: it waited for nothing.
    assert_eq!(
        sample(&text, "shoal_replica_scheduling_duration_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"shoal_replica_scheduling_duration_seconds_bucket{le="0.01"}"#
        ),
        Some(1.0),
        "{text}"
    );

    promtool_check(&text);

    // With no replica to take them, the gateway's own 503s count for the app, under
    // revision 0: an app that cannot serve shows in its error rate.
    c.cli_ok(&["scale", "hello", "--replicas", "0"]);
    // The replica may answer a last few while it goes, counted for revision 1: every
    // request sent is counted once, under one revision or the other.
    let (mut refused, mut sent) = (0, 0.0);
    assert!(poll(Duration::from_secs(30), || {
        sent += 1.0;
        if c.gw("/hello").status() == 503 {
            refused += 1;
        }
        refused == 5
    }));
    let now = c.api_get("/v1/metrics").text().unwrap();
    assert_eq!(
        sample(&now, &format!("shoal_app_replicas_desired{hello}")),
        Some(0.0),
        "{now}"
    );
    let none = r#"{namespace="default",app="hello",revision="0"}"#;
    let requests = |text: &str, labels: &str| {
        sample(text, &format!("shoal_http_requests_total{labels}")).unwrap_or(0.0)
    };
    assert!(
        poll(Duration::from_secs(30), || {
            text = c.api_get("/v1/metrics").text().unwrap();
            requests(&text, labels) + requests(&text, none) == want + sent
        }),
        "{sent} sent: {text}"
    );
    assert!(
        sample(&text, &format!("shoal_http_server_errors_total{none}")) >= Some(1.0),
        "{text}"
    );

    // A token is needed, as for every other route.
    let anonymous = c
        .http()
        .get(format!("{}/v1/metrics", c.api))
        .send()
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

/// Nodes on one address do not fill its share of the API's connections: a connection that a
/// node's credential authenticates leaves the count (still open), so the nodes keep their
/// heartbeats and an operator on the same address still gets in.
#[test]
fn nodes_sharing_an_address_leave_room_for_its_other_clients() {
    let c = Cluster::start_with(&["--api-client-connections", "2"]);
    let nodes: Vec<NodeProc> = ["n2", "n3", "n4"]
        .iter()
        .map(|name| NodeProc::join_up(&c, name, &[]))
        .collect();
    let mut listed = String::new();
    assert!(
        poll(Duration::from_secs(60), || {
            let out = c.cli(&["get", "nodes"]);
            listed = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
                && nodes.iter().all(|n| {
                    listed
                        .lines()
                        .any(|l| l.starts_with(&n.name) && l.contains(" Ready "))
                })
        }),
        "{listed}"
    );
    let text = c.api_get("/v1/metrics").text().unwrap();
    // Each node's connection is open, besides this request's.
    assert!(
        sample(&text, "shoal_api_connections") >= Some(4.0),
        "{text}"
    );
}

/// A client past its share of the API's connections is closed as it comes, and counted.
#[test]
fn api_connections_refused_at_a_clients_cap_are_counted() {
    let c = Cluster::start_with(&["--api-client-connections", "8"]);
    let text = c.api_get("/v1/metrics").text().unwrap();
    assert_eq!(
        sample(&text, "shoal_api_connections_refused_total"),
        Some(0.0),
        "{text}"
    );
    // The metrics request itself is open.
    assert!(
        sample(&text, "shoal_api_connections") >= Some(1.0),
        "{text}"
    );
    // More than 8 connections from this address, saying nothing: the ones past the cap are
    // closed at once, the others wait for a TLS handshake.
    let addr = c.api.trim_start_matches("https://");
    let held: Vec<std::net::TcpStream> = (0..12)
        .map(|_| {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let closed =
        |s: &std::net::TcpStream| matches!(std::io::Read::read(&mut &*s, &mut [0u8; 1]), Ok(0));
    let mut refused = 0;
    assert!(poll(Duration::from_secs(10), || {
        refused = held.iter().filter(|s| closed(s)).count();
        refused > 0
    }));
    drop(held);
    let mut text = String::new();
    assert!(
        poll(Duration::from_secs(30), || {
            // Refused too while the server has not yet seen the held ones go.
            text = c
                .http()
                .get(format!("{}/v1/metrics", c.api))
                .bearer_auth(&c.token)
                .send()
                .and_then(|r| r.text())
                .unwrap_or_default();
            sample(&text, "shoal_api_connections_refused_total") >= Some(refused as f64)
        }),
        "{text}"
    );
    promtool_check(&text);
}

/// A node whose replicas all report at once (an app of 80 starting) keeps to a few
/// connections: under its server's cap on one client's connections, none is refused.
#[test]
fn a_node_reporting_many_replicas_at_once_stays_under_the_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start_with(dir.path(), &["--api-client-connections", "30"]);
    let _node = NodeProc::join(&server, "node-1", &["--cpu", "64"]);
    let spec = common::write_spec(
        dir.path(),
        "hello.toml",
        &common::example_spec("hello", 80, "Hello"),
    );
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let ready = || {
        server
            .api_json("/v1/replicas")
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["phase"] == "Ready")
            .count()
    };
    assert!(
        poll(Duration::from_secs(120), || ready() == 80),
        "{} ready",
        ready()
    );
    let text = server
        .http()
        .get(format!("{}/v1/metrics", server.api))
        .bearer_auth(&server.token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        sample(&text, "shoal_api_connections_refused_total"),
        Some(0.0),
        "{text}"
    );
}
