//! `shoal top` end to end on a real `shoal up` with its node's metrics served (`--metrics`):
//! after known traffic, `top apps` shows each app's ready replicas, requests and 5xx per second
//! in the same proportions as what was sent, a p99 and its CPU, per namespace (`-n`, `-A`) and
//! as JSON; `top nodes` the node's CPU, its guests' memory (what its own `/metrics` says),
//! replicas and requests per second.

mod common;

use common::{Cluster, client, examples, free_addr, poll, sample, write_spec};
use std::time::Duration;

/// The rows of a table printed under exactly `header`, split into cells.
fn rows(out: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut lines = out.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(head, header, "{out}");
    lines
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn app<'a>(apps: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    apps.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {apps}"))
}

#[test]
fn top_shows_what_the_node_and_apps_use_and_serve_after_known_traffic() {
    let metrics = free_addr();
    let c = Cluster::start_with(&["--metrics", &metrics]);
    c.cli_ok(&["apply", "-f", &format!("{}/hello/app.toml", examples())]);
    let faulty = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "name = \"faulty\"",
            "name = \"faulty\"\nnamespace = \"team-b\"",
        );
    let faulty = write_spec(c.dir.path(), "faulty.toml", &faulty);
    c.cli_ok(&["apply", "-f", faulty.to_str().unwrap()]);

    // Ready as the API says before any request through the gateway, which has its replica
    // by then: a request answered 503 with no replica to take it would count too (an error
    // of the app's). So the gateway answers these and only these: hello's 31 all 200,
    // faulty's 11 all 500.
    for ns in ["default", "team-b"] {
        let ready = || {
            let replicas = c.api_json(&format!("/v1/replicas?namespace={ns}"));
            replicas
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["phase"] == "Ready")
        };
        assert!(
            poll(Duration::from_secs(30), ready),
            "nothing Ready in {ns}"
        );
    }
    for _ in 0..31 {
        assert_eq!(c.gw("/hello").status(), 200);
    }
    for _ in 0..11 {
        assert_eq!(c.gw("/faulty/status/500").status(), 500);
    }

    // Once every report is in, the rates (one window, one call) are as 31 to 11, and
    // faulty's are all errors. The CPU needs two reports of the node's.
    let mut apps = serde_json::Value::Null;
    assert!(
        poll(Duration::from_secs(30), || {
            apps = serde_json::from_str(&c.cli_ok(&["top", "apps", "-A", "-o", "json"])).unwrap();
            let (h, f) = (app(&apps, "hello"), app(&apps, "faulty"));
            let rps = |a: &serde_json::Value, k: &str| a[k].as_f64().unwrap();
            (rps(h, "requests_per_second") * 11.0 - rps(f, "requests_per_second") * 31.0).abs()
                < 1e-9
                && rps(h, "requests_per_second") > 0.0
                && rps(f, "errors_per_second") == rps(f, "requests_per_second")
                && !h["cpu"].is_null()
        }),
        "{apps:#}"
    );
    let hello = app(&apps, "hello");
    assert_eq!(hello["errors_per_second"], 0.0);
    assert!(hello["p99_ms"].as_u64().is_some(), "{hello}");
    assert_eq!(
        (hello["ready"].as_u64(), hello["desired"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(app(&apps, "faulty")["namespace"], "team-b");

    // The table: `-n`'s namespace, default by default, or every one with `-A`.
    let header = ["NAME", "READY", "REQ/S", "5XX/S", "P99", "CPU"];
    let table = rows(&c.cli_ok(&["top", "apps"]), &header);
    assert_eq!(table.len(), 1, "{table:?}");
    let row = &table[0];
    assert_eq!(
        (&row[0][..], &row[1][..], &row[3][..]),
        ("hello", "1/1", "0.00")
    );
    assert!(row[2].parse::<f64>().unwrap() > 0.0, "{row:?}");
    assert!(
        row[4].starts_with('≤') && row[4].ends_with("ms") && row[5].ends_with('m'),
        "{row:?}"
    );
    let team_b = rows(&c.cli_ok(&["top", "apps", "-n", "team-b"]), &header);
    assert_eq!(team_b.len(), 1);
    assert_eq!(team_b[0][0], "faulty");
    assert_eq!(team_b[0][2], team_b[0][3], "every request a 5xx");
    let all_header: Vec<&str> = std::iter::once("NAMESPACE").chain(header).collect();
    let all = rows(&c.cli_ok(&["top", "apps", "-A"]), &all_header);
    let names: Vec<(&str, &str)> = all.iter().map(|r| (&r[0][..], &r[1][..])).collect();
    assert_eq!(names, [("default", "hello"), ("team-b", "faulty")]);

    // The node: its CPU, its guests' memory as its own metrics say, both replicas, and the
    // requests its gateway routed.
    let mut nodes = serde_json::Value::Null;
    assert!(
        poll(Duration::from_secs(30), || {
            nodes = serde_json::from_str(&c.cli_ok(&["top", "nodes", "-o", "json"])).unwrap();
            !nodes[0]["cpu_millis"].is_null() && !nodes[0]["memory"].is_null()
        }),
        "{nodes:#}"
    );
    let node = &nodes[0];
    assert_eq!(node["name"], "node-1");
    assert_eq!(node["replicas"], 2);
    assert!(
        node["requests_per_second"].as_f64().unwrap() > 0.0,
        "{node}"
    );
    let text = client()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        sample(&text, "shoal_node_memory_budget_bytes"),
        node["memory"]["memory_budget_bytes"].as_f64(),
        "{text}"
    );
    let table = rows(
        &c.cli_ok(&["top", "nodes"]),
        &["NAME", "CPU", "MEMORY", "REPLICAS", "REQ/S"],
    );
    assert_eq!(table.len(), 1);
    let row = &table[0];
    assert_eq!((&row[0][..], &row[3][..]), ("node-1", "2"));
    let capacity = node["cpu_capacity_millis"].as_u64().unwrap();
    assert!(
        row[1].ends_with(&format!("m/{capacity}m")) && row[2].contains('/'),
        "{row:?}"
    );
    assert!(row[4].parse::<f64>().unwrap() > 0.0, "{row:?}");
}
