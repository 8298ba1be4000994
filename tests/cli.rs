//! The CLI as scripts use it: exit codes that tell failures apart, `diff` and `apply
//! --dry-run` that exit 1 when something would change, durations in any unit, quiet on a closed
//! pipe, completions, JSON logs for the daemons.

mod common;

use common::{Cluster, examples, write_spec};

fn code(c: &Cluster, args: &[&str]) -> Option<i32> {
    c.cli(args).status.code()
}

#[test]
fn exit_codes_say_what_went_wrong_and_diff_says_whether_anything_would_change() {
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(c.dir.path(), "hello.toml", &text);
    let spec = spec.to_str().unwrap();

    // Not applied yet: it would change; nothing changed.
    assert_eq!(code(&c, &["diff", "-f", spec]), Some(1));
    assert_eq!(code(&c, &["apply", "--dry-run", "-f", spec]), Some(1));
    assert_eq!(code(&c, &["describe", "app", "hello"]), Some(3));
    c.cli_ok(&["apply", "-f", spec]);
    // Applied: nothing would change.
    assert_eq!(code(&c, &["diff", "-f", spec]), Some(0));
    let changed = write_spec(
        c.dir.path(),
        "changed.toml",
        &text.replace("Hello from Shoal!", "Bonjour"),
    );
    let out = c.cli(&["diff", "-f", changed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("env.GREETING"));
    // An error in a diff is never 1.
    assert_eq!(code(&c, &["diff", "-f", "/nonexistent.toml"]), Some(2));

    c.cli_ok(&["config", "create", "shared", "--from-literal", "a=1"]);
    assert_eq!(
        code(&c, &["config", "create", "shared", "--from-literal", "a=1"]),
        Some(4),
        "exists: a conflict"
    );
    assert_eq!(code(&c, &["--token", "wrong", "get", "apps"]), Some(6));
    assert_eq!(
        code(&c, &["--server", "https://127.0.0.1:1", "get", "apps"]),
        Some(5)
    );
    assert_eq!(code(&c, &["get", "no-such-kind"]), Some(2), "usage");
}

#[test]
fn a_closed_pipe_ends_a_command_quietly_completions_print_and_durations_mix_units() {
    let c = Cluster::start();
    for i in 0..3 {
        c.cli_ok(&[
            "config",
            "create",
            &format!("set-{i}"),
            "--from-literal",
            "a=1",
        ]);
    }
    // The reader is gone before the command writes: no panic, no message.
    let mut child = std::process::Command::new(common::SHOAL)
        .args(["events"])
        .env("SHOAL_CONFIG", c.config())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");

    let script = c.cli_ok(&["completion", "bash"]);
    assert!(
        script.contains("_shoal()") && script.contains("rollout"),
        "{script}"
    );
    assert!(c.cli_ok(&["completion", "zsh"]).contains("#compdef shoal"));

    // A duration in two units.
    let waited = c.cli(&[
        "rollout",
        "status",
        "nothing",
        "--wait",
        "--timeout",
        "1m30s",
    ]);
    assert_eq!(waited.status.code(), Some(3), "{waited:?}");
}

#[test]
fn daemons_log_json_lines_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(dir.path());
    // A node logs at info as it starts (its engine, its memory budget).
    let node = common::NodeProc::join(&server, "node-1", &["--log-format", "json"]);
    let log = node.dir.with_extension("log");
    assert!(common::poll(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 2)
    }));
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
