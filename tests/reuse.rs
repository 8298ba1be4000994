//! Instance reuse (`[http] reuse`) end to end on a real `shoal up`: an instance serves at most
//! its count of requests; a new revision answers from its own instances only; bad values are
//! refused with their place. (Which instance serves which request, traps and timeouts
//! included, is tested on the runtime itself: `crates/runtime/tests/http.rs`.)

mod common;

use common::{Cluster, examples, poll, write_spec};
use std::time::Duration;

/// The faulty example as app `faulty-{name}` on `/faulty-{name}`, with `http` lines added to its `[http]`
/// table and `env` as its `[env]` table.
fn faulty(c: &Cluster, name: &str, http: &str, env: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("name = \"faulty\"", &format!("name = \"faulty-{name}\""))
        .replace(
            "routes = [\"/faulty\"]",
            &format!("routes = [\"/faulty-{name}\"]\n{http}"),
        );
    let spec = write_spec(
        c.config().parent().unwrap(),
        &format!("{name}.toml"),
        &format!("{text}\n[env]\n{env}\n"),
    );
    spec.to_str().unwrap().to_string()
}

/// What `/count` says: requests the answering instance has handled, this one included.
fn count(c: &Cluster, app: &str) -> u64 {
    let resp = c.gw(&format!("/faulty-{app}/count"));
    assert_eq!(resp.status(), 200);
    resp.text().unwrap().trim().parse().expect("a count")
}

#[test]
fn instances_serve_up_to_their_count_and_a_new_revision_gets_its_own() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &faulty(&c, "a", "reuse = 3", "V = \"1\"")]);
    c.wait_gw("/faulty-a/count", 200, "");
    // One client, one request at a time: each instance serves three, then a fresh one comes.
    // (A request that arrives while the last one's instance is still finishing gets another.)
    let counts: Vec<u64> = (0..30).map(|_| count(&c, "a")).collect();
    assert!(counts.iter().all(|n| (1..=3).contains(n)), "{counts:?}");
    assert!(counts.contains(&3), "instances were reused: {counts:?}");
    // A trap still fails its own request only.
    assert_eq!(c.gw("/faulty-a/trap").status(), 500);
    assert!((1..=3).contains(&count(&c, "a")));

    // Without reuse, every request has a fresh instance.
    c.cli_ok(&["apply", "-f", &faulty(&c, "b", "", "V = \"1\"")]);
    c.wait_gw("/faulty-b/count", 200, "");
    assert!((0..10).all(|_| count(&c, "b") == 1));

    // Once a new revision has rolled out, only its instances answer, pooled or not.
    let reused = faulty(&c, "b", "reuse = 100", "V = \"2\"");
    c.cli_ok(&["apply", "-f", &reused]);
    let waited = c.cli_ok(&["rollout", "status", "faulty-b", "--wait"]);
    assert!(
        waited
            .trim_end()
            .ends_with("app default/faulty-b: revision 2 rolled out, 1 of 1 replicas ready"),
        "{waited}"
    );
    let rolled = poll(Duration::from_secs(10), || {
        (0..20).all(|_| c.gw("/faulty-b/env/V").text().unwrap_or_default() == "2")
    });
    assert!(rolled, "a revision 1 instance still answers");
    let out = c.cli_ok(&["rollout", "history", "faulty-b"]);
    assert!(out.contains("http.reuse"), "{out}");
    let out = c.cli_ok(&["describe", "app", "faulty-b"]);
    assert!(
        out.contains("Reuse:        100 requests per instance, idle up to 10000 ms"),
        "{out}"
    );
}

#[test]
fn reuse_values_out_of_range_are_refused_with_their_place() {
    let c = Cluster::start();
    for (http, field, line) in [
        ("reuse = 0", "http.reuse", 17),
        ("reuse = 1000000", "http.reuse", 17),
        ("reuse = 2\nreuse_idle = \"0s\"", "http.reuse_idle", 18),
        ("reuse_idle = \"soon\"", "http.reuse_idle", 17),
    ] {
        let err = c.cli_err(&["apply", "-f", &faulty(&c, "bad", http, "V = \"1\"")]);
        assert!(err.contains(field), "{http}: {err}");
        assert!(err.contains(&format!("bad.toml:{line}:")), "{http}: {err}");
    }
}

/// `get nodes` counts the instances alive on each node, as its heartbeat says: one kept for
/// reuse stays counted between requests.
#[test]
fn get_nodes_counts_the_instances_alive() {
    let c = Cluster::start();
    let spec = faulty(&c, "k", "reuse = 100\nreuse_idle = \"60s\"", "V = \"1\"");
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty-k/count", 200, "");
    let mut table = String::new();
    let counted = poll(Duration::from_secs(20), || {
        table = c.cli_ok(&["get", "nodes"]);
        let mut lines = table.lines();
        let at = lines
            .next()
            .and_then(|h| h.split_whitespace().position(|c| c == "INSTANCES"))
            .expect("an INSTANCES column");
        lines
            .filter_map(|l| l.split_whitespace().nth(at)?.split_once('/'))
            .any(|(alive, _)| alive.parse::<u64>().is_ok_and(|n| n >= 1))
    });
    assert!(counted, "{table}");
    let nodes = c.api_json("/v1/nodes");
    assert!(nodes[0]["instances_alive"].as_u64() >= Some(1), "{nodes:#}");
    let name = nodes[0]["name"].as_str().unwrap();
    let described = c.cli_ok(&["describe", "node", name]);
    let used = described
        .lines()
        .find(|l| l.starts_with("Used:"))
        .unwrap_or_default();
    let alive = used
        .split(", ")
        .find_map(|part| part.strip_suffix(" instances alive"))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(alive >= Some(1), "{described}");
}
