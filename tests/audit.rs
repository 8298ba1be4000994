//! The audit log on a real cluster: who changed what through the API, who was refused, and
//! nothing of what they sent.

mod common;

use common::{Cluster, example_spec, run_cli, write_spec};

#[test]
fn the_audit_log_says_who_changed_what_and_who_was_refused() {
    let c = Cluster::start();
    let token_file = c.dir.path().join("ci.token");
    c.cli_ok(&[
        "token",
        "create",
        "ci",
        "--role",
        "deployer",
        "--write",
        token_file.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&token_file).unwrap();
    // The admin token's name is not for another: the log could not tell them apart.
    let admin_file = c.dir.path().join("admin.token");
    let admin_file = admin_file.to_str().unwrap();
    let out = c.cli(&[
        "token", "create", "admin", "--role", "viewer", "--write", admin_file,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin token's"),
        "{out:?}"
    );
    let spec = write_spec(
        c.dir.path(),
        "hello.toml",
        &example_spec("hello", 1, "Greetings-not-for-the-log"),
    );
    let as_ci = |args: &[&str]| run_cli(&c.config(), &[&["--token", token.trim()], args].concat());
    let applied = as_ci(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");
    assert!(as_ci(&["get", "apps"]).status.success());
    assert_eq!(as_ci(&["node", "cordon", "node-1"]).status.code(), Some(6));
    let stranger = run_cli(&c.config(), &["--token", "nope", "delete", "app", "hello"]);
    assert_eq!(stranger.status.code(), Some(6), "{stranger:?}");
    c.cli_ok(&["delete", "app", "hello"]);

    let log = std::fs::read_to_string(c.dir.path().join("data/audit.log")).unwrap();
    assert!(!log.contains("Greetings-not-for-the-log"), "no body: {log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |caller: Option<&str>, method: &str, path: &str| {
        lines.iter().find(|l| {
            l["caller"].as_str() == caller
                && l["method"] == method
                && l["path"].as_str().is_some_and(|p| p.starts_with(path))
        })
    };
    let apply = find(Some("ci"), "POST", "/v1/apps").expect(&log);
    assert_eq!(apply["status"], 201, "{log}");
    assert_eq!(apply["client"], "127.0.0.1", "{log}");
    assert!(apply["time"].as_str().unwrap().ends_with('Z'), "{log}");
    assert!(find(Some("ci"), "POST", "/v1/modules").is_some(), "{log}");
    let cordon = find(Some("ci"), "POST", "/v1/nodes/node-1/cordon").expect(&log);
    assert_eq!(cordon["status"], 403, "{log}");
    let refused = find(None, "DELETE", "/v1/apps/hello").expect(&log);
    assert_eq!(refused["status"], 401, "{log}");
    let deleted = find(Some("admin"), "DELETE", "/v1/apps/hello").expect(&log);
    assert_eq!(deleted["status"], 200, "{log}");
    // Reads change nothing and are left out.
    assert!(
        lines.iter().all(|l| l["method"] != "GET"),
        "no reads: {log}"
    );
}
