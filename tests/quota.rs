//! Namespace quotas on a real cluster: what would grow past a cap is refused with the cap
//! named, at apply and at scale; what runs past a lowered cap keeps running and may change.

mod common;

use common::{Cluster, example_spec, write_spec};

/// Hello as app `name` in namespace team-a, at route `/name`, with `replicas` and `greeting`.
fn team_app(c: &Cluster, name: &str, replicas: u32, greeting: &str) -> String {
    let text = example_spec("hello", replicas, greeting)
        .replace(
            "name = \"hello\"",
            &format!("name = \"{name}\"\nnamespace = \"team-a\""),
        )
        .replace("routes = [\"/hello\"]", &format!("routes = [\"/{name}\"]"));
    let file = write_spec(c.dir.path(), &format!("{name}-{replicas}.toml"), &text);
    file.to_str().unwrap().to_string()
}

#[test]
fn a_namespace_quota_refuses_what_would_grow_past_it_and_lets_the_rest_run() {
    let c = Cluster::start();
    c.cli_ok(&[
        "quota",
        "set",
        "team-a",
        "--apps",
        "2",
        "--replicas",
        "3",
        "--cpu",
        "200m",
    ]);
    c.cli_ok(&["apply", "-f", &team_app(&c, "a", 2, "A")]);

    // Two more replicas would make four of three.
    let refused = c.cli(&["apply", "-f", &team_app(&c, "b", 2, "B")]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("does not fit the quota of namespace team-a") && said.contains("3 replicas"),
        "{said}"
    );
    // A dry run says so too.
    let dry = c.cli(&["diff", "-f", &team_app(&c, "b", 2, "B")]);
    assert_eq!(dry.status.code(), Some(6), "{dry:?}");
    c.cli_ok(&["apply", "-f", &team_app(&c, "b", 1, "B")]);
    let third = c.cli_err(&["apply", "-f", &team_app(&c, "c", 1, "C")]);
    assert!(third.contains("2 apps"), "{third}");
    let scaled = c.cli(&["scale", "a", "--replicas", "3", "-n", "team-a"]);
    assert_eq!(scaled.status.code(), Some(6), "{scaled:?}");
    // Another namespace has no quota.
    c.cli_ok(&[
        "apply",
        "-f",
        &write_spec(c.dir.path(), "d.toml", &example_spec("hello", 3, "D")).to_string_lossy(),
    ]);

    assert_eq!(
        c.cli_ok(&["quota", "get", "-n", "team-a"]).lines().count(),
        2,
        "-n names the namespace"
    );
    assert_eq!(
        c.cli(&["quota", "set", "--cpu", "1"]).status.code(),
        Some(2)
    );
    assert_eq!(
        c.cli(&["quota", "delete", "team-a", "-n", "team-b"])
            .status
            .code(),
        Some(2)
    );
    let got = c.cli_ok(&["quota", "get"]);
    let row = got.lines().find(|l| l.starts_with("team-a")).expect(&got);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..4], ["team-a", "2/2", "3/3", "150m/200m"], "{got}");
    assert!(!cells[4].contains('/'), "no memory cap: {got}");

    // Lowered below what runs: it says so, it keeps running, and a change that asks for no
    // more goes.
    let lowered = c.cli(&[
        "quota",
        "set",
        "team-a",
        "--replicas",
        "1",
        "--apps",
        "none",
    ]);
    assert!(lowered.status.success(), "{lowered:?}");
    let warned = String::from_utf8_lossy(&lowered.stderr);
    assert!(
        warned.contains("namespace team-a is past its quota now (replicas: 3 of 1)"),
        "{warned}"
    );
    c.cli_ok(&["apply", "-f", &team_app(&c, "a", 2, "A, again")]);
    c.wait_gw("/a", 200, "A, again");
    let json: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["quota", "get", "team-a", "-o", "json"])).unwrap();
    assert_eq!(json[0]["limits"]["replicas"], 1);
    assert!(json[0]["limits"].get("apps").is_none(), "{json}");
    assert_eq!(json[0]["limits"]["cpu_millis"], 200, "kept: {json}");

    // Without a quota, the scale goes.
    c.cli_ok(&["quota", "delete", "team-a"]);
    c.cli_ok(&["scale", "a", "--replicas", "3", "-n", "team-a"]);
    assert_eq!(c.cli(&["quota", "get", "team-a"]).status.code(), Some(3));
}
