//! A node's own metrics end to end (`shoal node join --metrics`): after a known number of
//! requests, its `/metrics` counts exactly them per app revision — requests, cold starts,
//! reuses, instances alive and idle, the memory they hold, a trap — with its replicas by phase;
//! after a restart on the same data dir its components come from the compile cache; and
//! `promtool check metrics` finds nothing to say.

mod common;

use common::{
    NodeProc, Server, client, examples, free_addr, poll, promtool_check, sample, write_spec,
};
use std::time::Duration;

/// The node's metrics now.
fn scrape(addr: &str) -> String {
    let resp = client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .expect("the node's metrics answer");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    resp.text().unwrap()
}

/// `name{namespace="default",app=APP,revision="1"}`.
fn series(name: &str, app: &str) -> String {
    format!(r#"{name}{{namespace="default",app="{app}",revision="1"}}"#)
}

/// Polls the node's metrics until `name` of `app` is `want`; returns the text.
fn wait_for(addr: &str, name: &str, app: &str, want: f64) -> String {
    let mut text = String::new();
    assert!(
        poll(Duration::from_secs(30), || {
            text = scrape(addr);
            sample(&text, &series(name, app)) == Some(want)
        }),
        "{name} of {app} never {want}:\n{text}"
    );
    text
}

/// GETs `path` from the node's gateway until it answers 200, then `n - 1` more times;
/// answers from before the app had a ready endpoint there never reached an instance.
fn serve_n(node: &NodeProc, path: &str, n: usize) {
    assert!(
        poll(Duration::from_secs(30), || node
            .get(path)
            .is_ok_and(|(code, _)| code == 200)),
        "{path} never answered"
    );
    for _ in 1..n {
        assert_eq!(node.get(path).unwrap().0, 200, "{path}");
    }
}

#[test]
fn a_node_counts_its_requests_instances_and_compile_cache_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let metrics = free_addr();
    let mut node = NodeProc::join(&server, "node-1", &["--metrics", &metrics]);

    // hello: a fresh instance per request.
    server.cli_ok(&["apply", "-f", &format!("{}/hello/app.toml", examples())]);
    serve_n(&node, "/hello", 20);
    // Each instance goes once its request's task is done with the body.
    let text = wait_for(&metrics, "shoal_node_instances", "hello", 0.0);
    for (name, want) in [
        ("shoal_node_http_requests_total", 20.0),
        ("shoal_node_cold_starts_total", 20.0),
        ("shoal_node_instance_reuses_total", 0.0),
        ("shoal_node_instances_idle", 0.0),
        ("shoal_node_requests_in_flight", 0.0),
    ] {
        assert_eq!(
            sample(&text, &series(name, "hello")),
            Some(want),
            "{name}:\n{text}"
        );
    }
    // The node's gateway counts its clients' connections, and refused none.
    let held = std::net::TcpStream::connect(node.gateway.trim_start_matches("http://")).unwrap();
    let mut text = String::new();
    assert!(
        poll(Duration::from_secs(30), || {
            text = scrape(&metrics);
            sample(&text, "shoal_node_gateway_connections").is_some_and(|n| n >= 1.0)
        }),
        "a connection held open is counted:\n{text}"
    );
    drop(held);
    assert_eq!(
        sample(&text, "shoal_node_gateway_connections_refused_total"),
        Some(0.0),
        "{text}"
    );

    // faulty with `reuse = 100`: one instance, kept between requests, then killed by a trap.
    let spec = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("timeout = \"5s\"", "timeout = \"5s\"\nreuse = 100");
    let spec = write_spec(dir.path(), "faulty.toml", &spec);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    serve_n(&node, "/faulty/status/200", 1);
    for requests in 2..=10 {
        // Back in the pool before the next request, which it then serves.
        wait_for(&metrics, "shoal_node_instances_idle", "faulty", 1.0);
        assert_eq!(node.get("/faulty/status/200").unwrap().0, 200);
        wait_for(
            &metrics,
            "shoal_node_http_requests_total",
            "faulty",
            requests as f64,
        );
    }
    let text = wait_for(&metrics, "shoal_node_instances_idle", "faulty", 1.0);
    assert_eq!(
        sample(&text, &series("shoal_node_cold_starts_total", "faulty")),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, &series("shoal_node_instance_reuses_total", "faulty")),
        Some(9.0)
    );
    assert_eq!(
        sample(&text, &series("shoal_node_instances", "faulty")),
        Some(1.0)
    );
    // The one instance alive holds faulty's `limits.memory` of the budget, whole.
    assert_eq!(
        sample(&text, "shoal_node_memory_reserved_bytes"),
        Some((32 << 20) as f64),
        "{text}"
    );
    assert!(sample(&text, "shoal_node_memory_budget_bytes") > Some((32 << 20) as f64));
    assert_eq!(node.get("/faulty/trap").unwrap().0, 500);
    let text = wait_for(&metrics, "shoal_node_instances", "faulty", 0.0);
    let trapped = r#"shoal_node_incidents_total{namespace="default",app="faulty",revision="1",reason="Trapped"}"#;
    assert_eq!(sample(&text, trapped), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, &series("shoal_node_instances_idle", "faulty")),
        Some(0.0)
    );
    assert_eq!(sample(&text, "shoal_node_memory_reserved_bytes"), Some(0.0));
    assert_eq!(
        sample(&text, r#"shoal_node_replicas{phase="Ready"}"#),
        Some(2.0)
    );
    // Both modules were compiled here: nothing was in the cache yet.
    assert_eq!(
        sample(&text, "shoal_node_compile_cache_misses_total"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "shoal_node_compile_cache_hits_total"),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            r#"shoal_node_guest_cpu_seconds_total{namespace="default",app="hello"}"#
        ) > Some(0.0),
        "{text}"
    );
    promtool_check(&text);

    // Started again on its data dir, the node loads both from its compile cache.
    node.kill();
    node.restart();
    let mut text = String::new();
    assert!(
        poll(Duration::from_secs(60), || {
            text = client()
                .get(format!("http://{metrics}/metrics"))
                .send()
                .and_then(|r| r.text())
                .unwrap_or_default();
            sample(&text, r#"shoal_node_replicas{phase="Ready"}"#) == Some(2.0)
        }),
        "{text}"
    );
    assert_eq!(
        sample(&text, "shoal_node_compile_cache_hits_total"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "shoal_node_compile_cache_misses_total"),
        Some(0.0)
    );
    serve_n(&node, "/hello", 1);
    promtool_check(&scrape(&metrics));
}
