//! The CLI as scripts and people use it: exit codes that tell failures apart, `diff` and
//! `apply --dry-run` that exit 1 when something would change, `get -A` across namespaces and
//! `get -w`, `-n` honoured or refused, durations in any unit, quiet on a closed pipe,
//! completions, help with examples, upload progress on a terminal, JSON logs for the
//! daemons, contexts for several clusters.

mod common;

use common::{Cluster, examples, write_spec};

fn code(c: &Cluster, args: &[&str]) -> Option<i32> {
    c.cli(args).status.code()
}

#[test]
fn exit_codes_say_what_went_wrong_diff_says_whether_anything_would_change_and_a_lists_all() {
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(c.dir.path(), "hello.toml", &text);
    let spec = spec.to_str().unwrap();

    // Not applied yet: it would change; nothing changed.
    assert_eq!(code(&c, &["diff", "-f", spec]), Some(1));
    // Two specs sharing a module: a dry run over their directory announces its upload once.
    let both = c.dir.path().join("both");
    std::fs::create_dir(&both).unwrap();
    write_spec(&both, "a.toml", &text);
    write_spec(
        &both,
        "b.toml",
        &text
            .replace("name = \"hello\"", "name = \"hello-b\"")
            .replace("routes = [\"/hello\"]", "routes = [\"/hello-b\"]"),
    );
    let out = c.cli(&["diff", "-f", both.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("would be uploaded").count(), 1, "{said}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("(dry run)")
            .count(),
        2,
        "{out:?}"
    );
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

    // Every namespace at once, each row saying which.
    let other = write_spec(
        c.dir.path(),
        "team-b.toml",
        &text
            .replace(
                "name = \"hello\"",
                "name = \"hello\"\nnamespace = \"team-b\"",
            )
            .replace("routes = [\"/hello\"]", "routes = [\"/team-b\"]"),
    );
    c.cli_ok(&["apply", "-f", other.to_str().unwrap()]);
    assert_eq!(
        c.cli_ok(&["get", "apps"]).lines().count(),
        2,
        "default only"
    );
    let all = c.cli_ok(&["get", "apps", "-A"]);
    assert!(all.starts_with("NAMESPACE"), "{all}");
    assert!(
        all.lines().any(|l| l.starts_with("default"))
            && all.lines().any(|l| l.starts_with("team-b")),
        "{all}"
    );

    // One by name, as `kubectl get deployment NAME`: its row, or as JSON the object itself.
    let one = c.cli_ok(&["-n", "team-b", "get", "app", "hello"]);
    assert_eq!(one.lines().count(), 2, "{one}");
    let json: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["get", "app", "hello", "-o", "json"])).unwrap();
    assert_eq!(
        (json["name"].as_str(), json["namespace"].as_str()),
        (Some("hello"), Some("default")),
        "{json}"
    );
    let out = c.cli(&["get", "app", "nope"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("app nope not found in namespace default"),
        "{out:?}"
    );
    assert_eq!(code(&c, &["get", "apps", "hello", "-A"]), Some(2));
    assert_eq!(code(&c, &["get", "events", "hello"]), Some(2));

    c.cli_ok(&["config", "create", "shared", "--from-literal", "a=1"]);
    assert_eq!(
        code(&c, &["config", "create", "shared", "--from-literal", "a=1"]),
        Some(4),
        "exists: a conflict"
    );
    // A key given twice is refused, as kubectl refuses it, and nothing is written.
    for args in [
        &["config", "set", "shared", "a=2", "a=3"][..],
        &[
            "secret",
            "create",
            "s",
            "--from-literal",
            "k=1",
            "--from-literal",
            "k=2",
        ],
    ] {
        let out = c.cli(args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is given twice"),
            "{out:?}"
        );
    }
    assert_eq!(
        code(&c, &["secret", "get", "s"]),
        Some(3),
        "nothing created"
    );
    assert_eq!(code(&c, &["--token", "wrong", "get", "apps"]), Some(6));
    assert_eq!(
        code(&c, &["--server", "https://127.0.0.1:1", "get", "apps"]),
        Some(5)
    );
    assert_eq!(code(&c, &["get", "no-such-kind"]), Some(2), "usage");
    // A value that is not KEY=VALUE is a usage error, found before any request.
    for args in [
        &["config", "set", "shared", "=1"][..],
        &["config", "create", "cc", "--from-literal", "novalue"],
        &["secret", "create", "x", "--from-literal", "=v"],
    ] {
        let out = c.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"),
            "{args:?}: {out:?}"
        );
    }

    // A name is checked before it goes into a request's path: one that is no name would
    // otherwise end the path there, and delete another app.
    for args in [
        &["delete", "app", "hello#typo"][..],
        &["delete", "app", "hello?namespace=team-b&x="],
        &["-n", "Team-B", "get", "apps"],
        &["describe", "app", "team-b/hello"],
        &["scale", "hello?x=", "--replicas", "0"],
        &["delete", "module", "sha256:zzz"],
    ] {
        let out = c.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a"),
            "{args:?}: {out:?}"
        );
    }
    assert_eq!(
        c.cli_ok(&["get", "apps", "-A"]).lines().count(),
        3,
        "both stay"
    );

    // A module is named as `get apps` shows it, too: here one in use, so a conflict.
    let apps = c.cli_ok(&["get", "apps"]);
    let short = apps
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap();
    assert!(short.len() < 71, "{apps}");
    assert_eq!(code(&c, &["delete", "module", short]), Some(4), "{apps}");
    assert_eq!(code(&c, &["delete", "module", "sha256:00000000"]), Some(3));
    // `get module` takes it as `delete module` does.
    let got = c.cli_ok(&["get", "module", short, "-o", "json"]);
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    let digest = got["digest"].as_str().unwrap();
    assert!(digest.starts_with(short) && digest.len() == 71, "{got}");
    assert_eq!(code(&c, &["get", "module", "sha256:00000000"]), Some(3));
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
    // The reader is gone before the command writes: no panic, no message. `node` commands
    // too, which were left out with `node join`.
    for args in [&["events"][..], &["node", "cordon", "node-1"]] {
        let mut child = std::process::Command::new(common::SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", c.config())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }

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

/// A `shoal server` on data dir `data`, writing its context into the CLI config `config`,
/// killed when dropped; and its API address, as it advertises it. On 127.0.0.1:0 unless
/// `extra` says `--api`.
fn server(
    data: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
) -> (common::Killed, String) {
    let api: &[&str] = if extra.contains(&"--api") {
        &[]
    } else {
        &["--api", "127.0.0.1:0"]
    };
    let mut child = std::process::Command::new(common::SHOAL)
        .arg("server")
        .args(api)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("SHOAL_CONFIG", config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = common::read_lines(&mut child);
    let api = common::wait_line(&lines, "API:");
    let addr = api.split("https://").nth(1).unwrap().trim().to_string();
    (common::Killed::new(child), addr)
}

/// A server on every address advertises an address others can reach, not 0.0.0.0;
/// `--advertise-api` names another, which the API's certificate is valid for; a URL of the
/// wrong scheme is refused before anything starts.
#[test]
fn a_server_advertises_where_others_reach_its_api() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let shoal = |args: &[&str]| {
        std::process::Command::new(common::SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", &config)
            .output()
            .unwrap()
    };
    let port = common::free_addr().rsplit(':').next().unwrap().to_string();
    let any = format!("0.0.0.0:{port}");
    let (server_a, a) = server(&dir.path().join("a"), &config, &["--api", &any]);
    assert!(!a.starts_with("0.0.0.0"), "advertised {a}");
    let out = shoal(&["get", "nodes", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    drop(server_a);

    // 127.0.0.2 is loopback too, and in no certificate unless advertised.
    let port = common::free_addr().rsplit(':').next().unwrap().to_string();
    let (any, there) = (
        format!("0.0.0.0:{port}"),
        format!("https://127.0.0.2:{port}"),
    );
    let (_b, b) = server(
        &dir.path().join("b"),
        &config,
        &["--api", &any, "--advertise-api", &there],
    );
    assert_eq!(format!("https://{b}"), there);
    let out = shoal(&["get", "nodes", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    // The one server of its own store leads, under the URL it advertises.
    let out = shoal(&["get", "servers", "-o", "json"]);
    let servers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        servers,
        serde_json::json!([{ "url": there, "leader": true }]),
        "{out:?}"
    );

    let refused = std::process::Command::new(common::SHOAL)
        .args(["server", "--api", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("c"))
        .args(["--advertise-api", "http://127.0.0.1:7700"])
        .env("SHOAL_CONFIG", &config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("this API serves https"), "{said}");
}

#[test]
fn starting_a_cluster_adds_its_context_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let (_a, a) = server(&dir.path().join("a"), &config, &[]);
    let (_b, _) = server(&dir.path().join("b"), &config, &["--context", "second"]);
    let shoal = |args: &[&str]| {
        let out = std::process::Command::new(common::SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", &config)
            .output()
            .unwrap();
        assert!(out.status.success(), "shoal {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The second start named its context and made it current; the first is still there.
    let listed = shoal(&["config", "get-contexts"]);
    assert!(listed.contains(&a) && listed.contains("second"), "{listed}");
    assert_eq!(shoal(&["config", "current-context"]), "second\n");
    assert_eq!(
        shoal(&["config", "current-context", "-o", "json"]).trim(),
        "\"second\""
    );
    assert!(shoal(&["get", "nodes", "-o", "json"]).contains('['));
    // `version` tells the CLI's release and the server's; `--client` asks no server, and one
    // that cannot be reached still has the CLI's said.
    let release = env!("CARGO_PKG_VERSION");
    assert_eq!(
        shoal(&["version"]),
        format!("Client: {release}\nServer: {release}\n")
    );
    let nowhere = ["--server", "http://127.0.0.1:1", "version"];
    assert_eq!(
        shoal(&[&nowhere[..], &["--client"]].concat()),
        format!("Client: {release}\n")
    );
    let unreachable = std::process::Command::new(common::SHOAL)
        .args(nowhere)
        .env("SHOAL_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(5), "{unreachable:?}");
    // It says why, as the system said it: not only that a request failed.
    let said = String::from_utf8_lossy(&unreachable.stderr);
    assert!(said.contains("Connection refused"), "{said}");
    assert_eq!(
        unreachable.stdout,
        format!("Client: {release}\n").as_bytes()
    );
    // A server from before `/v1/version` answers 404 there, as a server does.
    let older = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", older.local_addr().unwrap());
    let answering = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut conn, _) = older.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        let body = r#"{"error":{"code":"not_found","message":"no such API endpoint"}}"#;
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).unwrap();
    });
    assert_eq!(
        shoal(&["--server", &url, "version"]),
        format!("Client: {release}\nServer: unknown (a server from before `shoal version`)\n")
    );
    answering.join().unwrap();
    // Each context reaches its own cluster: a config set made in one is not in the other.
    shoal(&[
        "--context",
        &a,
        "config",
        "create",
        "only-in-a",
        "--from-literal",
        "k=v",
    ]);
    // The table's header alone: the second cluster has no sets.
    assert_eq!(shoal(&["config", "get"]).lines().count(), 1);
    shoal(&["config", "use-context", &a]);
    assert!(shoal(&["config", "get"]).contains("only-in-a"));
    let listed = shoal(&["config", "get-contexts"]);
    assert!(
        listed.lines().any(|l| l.starts_with('*') && l.contains(&a)),
        "{listed}"
    );
    // A cluster that cannot start (its gateway's or metrics' port is taken, a flag is wrong)
    // changes no context, and makes no data dir.
    let before = std::fs::read_to_string(&config).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for (flag, value, says) in [
        ("--cert-validity", "1s", "--cert-validity"),
        ("--backup-every", "soon", "--backup-every"),
        ("--gateway", taken.as_str(), "cannot listen on"),
        ("--metrics", taken.as_str(), "cannot listen on"),
    ] {
        let gateway = if flag == "--gateway" {
            value
        } else {
            "127.0.0.1:0"
        };
        let data = dir.path().join(format!("failed{flag}"));
        let failed = std::process::Command::new(common::SHOAL)
            .args(["up", "--api", "127.0.0.1:0", "--gateway", gateway])
            .arg("--data-dir")
            .arg(&data)
            .args(
                if flag == "--gateway" {
                    None
                } else {
                    Some([flag, value])
                }
                .into_iter()
                .flatten(),
            )
            .env("SHOAL_CONFIG", &config)
            .output()
            .unwrap();
        assert!(!failed.status.success(), "{failed:?}");
        assert!(
            String::from_utf8_lossy(&failed.stderr).contains(says),
            "{failed:?}"
        );
        assert_eq!(std::fs::read_to_string(&config).unwrap(), before, "{flag}");
        assert!(!data.exists(), "{flag}");
    }
    let missing = std::process::Command::new(common::SHOAL)
        .args(["--context", "nope", "get", "apps"])
        .env("SHOAL_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(3),
        "an unknown context is not found"
    );
}

/// `--server` (and `SHOAL_SERVER`) take several URLs of one cluster: a request that cannot
/// reach the first goes to the next, reads and writes alike when the first refuses the
/// connection; when none answers, the error names them all. A malformed list is a usage error.
#[test]
fn the_cli_goes_on_to_the_next_server_when_one_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let (_server, addr) = server(&dir.path().join("a"), &config, &[]);
    let dead = format!("https://{}", common::free_addr());
    let servers = format!("{dead},https://{addr}");
    let shoal = |env: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(common::SHOAL);
        cmd.args(args)
            .env("SHOAL_CONFIG", &config)
            .env_remove("SHOAL_SERVER");
        if let Some(list) = env {
            cmd.env("SHOAL_SERVER", list);
        }
        cmd.output().unwrap()
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(
        ok(shoal(
            None,
            &["--server", &servers, "get", "nodes", "-o", "json"]
        ))
        .contains('[')
    );
    ok(shoal(
        Some(&servers),
        &[
            "config",
            "create",
            "via-the-second",
            "--from-literal",
            "k=v",
        ],
    ));
    assert!(ok(shoal(None, &["config", "get"])).contains("via-the-second"));

    let other_dead = format!("https://{}", common::free_addr());
    let none = shoal(
        None,
        &["--server", &format!("{dead},{other_dead}"), "get", "apps"],
    );
    assert_eq!(none.status.code(), Some(5), "{none:?}");
    let said = String::from_utf8(none.stderr).unwrap();
    assert!(said.contains(&dead) && said.contains(&other_dead), "{said}");

    let bad = shoal(
        None,
        &[
            "--server",
            &format!("{dead},,https://{addr}"),
            "get",
            "apps",
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

/// `shoal events --follow` and `get -w` wait out a restart of the API (all its servers down
/// for a while) and go on, rather than exit; `logs -f` waits the same way
/// (`Client::patiently`).
#[test]
fn followers_wait_out_a_restart_of_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::Server::start(dir.path());
    let follower = |args: &[&str]| {
        let mut child = std::process::Command::new(common::SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", dir.path().join("config.toml"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let said = child.stderr.take().unwrap();
        let (tx, said_lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(said).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let lines = common::read_lines(&mut child);
        (common::Killed::new(child), lines, said_lines)
    };
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(dir.path(), "hello.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let (mut events, event_lines, events_said) = follower(&["events", "--follow", "-o", "json"]);
    let (mut watch, watch_lines, watch_said) = follower(&["get", "apps", "-w"]);
    // Both have answered once. One JSON document a line, each event once: numbered upwards.
    let last_seq = std::cell::Cell::new(0);
    let created = |app: &'static str| {
        let last_seq = &last_seq;
        move |l: &str| {
            let event: serde_json::Value = serde_json::from_str(l).unwrap();
            let seq = event["seq"].as_u64().unwrap();
            assert!(
                seq > last_seq.get(),
                "event {seq} again, after {}",
                last_seq.get()
            );
            last_seq.set(seq);
            event["reason"] == "Created" && event["object"] == format!("app/default/{app}")
        }
    };
    assert!(line_until(&event_lines, created("hello")));
    assert!(line_until(&watch_lines, |l| l.starts_with("hello")));
    server.kill();
    // Each finds the API gone, and says it waits.
    for said in [&events_said, &watch_said] {
        let seen = std::cell::RefCell::new(Vec::new());
        let waits = line_until(said, |l| {
            seen.borrow_mut().push(l.to_string());
            l.contains("trying again")
        });
        assert!(waits, "{:?}", seen.borrow());
    }
    server.restart();
    let text = text
        .replace("name = \"hello\"", "name = \"again\"")
        .replace("routes = [\"/hello\"]", "routes = [\"/again\"]");
    let spec = write_spec(dir.path(), "again.toml", &text);
    server.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(line_until(&event_lines, created("again")));
    assert!(line_until(&watch_lines, |l| l.starts_with("again")));
    // Polls that find nothing new print nothing: none of what came before comes again
    // (four polls' worth of quiet, each line checked as it comes).
    let quiet = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let check = created("none");
    while let Ok(line) =
        event_lines.recv_timeout(quiet.saturating_duration_since(std::time::Instant::now()))
    {
        check(&line);
    }
    for child in [&mut events, &mut watch] {
        assert_eq!(child.try_wait().unwrap(), None, "still following");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Reads `lines` until one satisfies `ok`, for up to 30 s; whether one did.
fn line_until(lines: &std::sync::mpsc::Receiver<String>, ok: impl Fn(&str) -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Ok(line) =
        lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if ok(&line) {
            return true;
        }
    }
    false
}

#[test]
fn get_w_prints_each_change_and_n_is_honoured_or_refused() {
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let plain = write_spec(c.dir.path(), "hello.toml", &text);
    let plain = plain.to_str().unwrap();

    // -n puts a file that names no namespace there; a file naming another is refused.
    c.cli_ok(&["apply", "-n", "staging", "-f", plain]);
    assert!(
        c.cli_ok(&["get", "apps", "-n", "staging"])
            .contains("hello")
    );
    assert!(!c.cli_ok(&["get", "apps"]).contains("hello"));
    let named = write_spec(
        c.dir.path(),
        "named.toml",
        &format!("namespace = \"prod\"\n{text}"),
    );
    let out = c.cli(&["apply", "-n", "staging", "-f", named.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the file says namespace prod"),
        "{out:?}"
    );
    // What belongs to no namespace refuses -n as a usage error.
    for args in [
        &["get", "nodes", "-n", "staging"][..],
        &["get", "modules", "-n", "staging"],
        &["top", "nodes", "-n", "staging"],
        &["token", "list", "-n", "staging"],
        &["node", "cordon", "local", "-n", "staging"],
    ] {
        let out = c.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("means nothing"),
            "{args:?}: {out:?}"
        );
    }

    // get -w: the list, then each change: a new replica, and one gone.
    let mut watch = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["get", "replicas", "-n", "staging", "-w"])
            .env("SHOAL_CONFIG", c.dir.path().join("config.toml"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = common::read_lines(&mut watch);
    assert!(line_until(&lines, |l| l.starts_with("NAME")));
    assert!(line_until(&lines, |l| l.starts_with("hello-1-") && l.contains("Ready")));
    c.cli_ok(&["scale", "hello", "-n", "staging", "--replicas", "2"]);
    assert!(line_until(&lines, |l| l.starts_with("hello-1-") && l.contains("Ready")));
    c.cli_ok(&["scale", "hello", "-n", "staging", "--replicas", "1"]);
    assert!(line_until(&lines, |l| l.ends_with("(deleted)")));
    let _ = watch.kill();
    let _ = watch.wait();

    // get events -w: every new event, one that reads like an earlier one too (a node
    // cordoned twice).
    let mut watch = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["get", "events", "-A", "-w"])
            .env("SHOAL_CONFIG", c.dir.path().join("config.toml"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = common::read_lines(&mut watch);
    assert!(line_until(&lines, |l| l.starts_with("NAMESPACE")));
    for _ in 0..2 {
        c.cli_ok(&["node", "cordon", "node-1"]);
        c.cli_ok(&["node", "uncordon", "node-1"]);
        // Shown before the next: the second is new to a watcher that has shown the first.
        assert!(line_until(&lines, |l| l.contains(" Uncordoned ")));
    }
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn every_command_has_examples_and_every_argument_a_help_text() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(common::SHOAL)
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&[]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .filter(|c| c != "help" && c != "completion")
        .collect();
    assert!(commands.len() > 15, "{top}");
    let subcommands = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .filter(|c| c != "help")
            .collect()
    };
    // An argument or option line is followed on the same line, or the next, by its help.
    let explained = |what: &str, text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let entry = line.starts_with("  <") || line.starts_with("  -");
            if !entry || line.contains("possible values") {
                continue;
            }
            let same = line.trim().split("  ").filter(|p| !p.is_empty()).count() > 1;
            let next = lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("          "));
            assert!(same || next, "shoal {what}: {line:?} has no help text");
        }
    };
    for command in &commands {
        let text = help(&[command]);
        assert!(
            text.contains("Examples:"),
            "shoal {command} --help:\n{text}"
        );
        explained(command, &text);
        for sub in subcommands(&text) {
            explained(&format!("{command} {sub}"), &help(&[command, &sub]));
        }
    }
}

/// `bytes` with a custom section of `size` bytes appended: the same component, bigger.
fn padded(mut bytes: Vec<u8>, size: usize) -> Vec<u8> {
    let leb = |mut n: usize| {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    };
    let name = b"padding";
    let mut payload = leb(name.len());
    payload.extend_from_slice(name);
    payload.resize(payload.len() + size, 0);
    bytes.push(0);
    bytes.extend(leb(payload.len()));
    bytes.extend(payload);
    bytes
}

#[test]
fn a_big_upload_shows_its_progress_on_a_terminal() {
    let c = Cluster::start();
    let hello = std::fs::read(format!(
        "{}/target/wasm32-wasip2/release/hello.wasm",
        examples()
    ))
    .unwrap();
    std::fs::write(
        c.dir.path().join("big.wasm"),
        padded(hello.clone(), 6 << 20),
    )
    .unwrap();
    std::fs::write(c.dir.path().join("big2.wasm"), padded(hello, (6 << 20) + 1)).unwrap();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target/wasm32-wasip2/release/hello.wasm", "big.wasm");
    let spec = write_spec(c.dir.path(), "big.toml", &text);
    // `script` gives the CLI a terminal, as a person at a shell has.
    let command = format!(
        "SHOAL_CONFIG={} {} apply -f {}",
        c.dir.path().join("config.toml").display(),
        common::SHOAL,
        spec.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("uploading big.wasm: "), "{shown}");
    assert!(shown.contains("(100%)"), "{shown}");
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    // Without a terminal (a pipe, CI): no progress line.
    let again = text
        .replace("big.wasm", "big2.wasm")
        .replace("hello", "hello-two");
    let again = write_spec(c.dir.path(), "again.toml", &again);
    let out = c.cli(&["apply", "-f", again.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("uploading"));
    assert!(c.cli_ok(&["get", "modules"]).lines().count() >= 3);
}

/// `-f DIR` applies a directory's specs (`-R`: and its subdirectories'), never the crate's
/// own files; `-f -` one from standard input, its errors placed in `<stdin>`.
#[test]
fn apply_takes_a_directory_of_specs_or_one_from_standard_input() {
    let c = Cluster::start();
    let hello = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let named = |name: &str| {
        hello
            .replace("name = \"hello\"", &format!("name = \"{name}\""))
            .replace("\"/hello\"", &format!("\"/{name}\""))
    };
    let apps = c.dir.path().join("apps");
    std::fs::create_dir_all(apps.join("more")).unwrap();
    std::fs::create_dir_all(apps.join(".hidden")).unwrap();
    std::fs::write(apps.join("a.toml"), named("dir-a")).unwrap();
    std::fs::write(apps.join("more/b.toml"), named("dir-b")).unwrap();
    for skipped in [
        "Cargo.toml",
        "rustfmt.toml",
        ".draft.toml",
        "notes.txt",
        ".hidden/c.toml",
    ] {
        std::fs::write(apps.join(skipped), "not = [a spec").unwrap();
    }
    // A link back up is not followed: the walk ends.
    std::os::unix::fs::symlink(&apps, apps.join("more/loop")).unwrap();
    let apps_dir = apps.clone();
    let apps = apps.to_str().unwrap();

    let out = c.cli(&["diff", "-f", apps]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        shown.contains("dir-a") && !shown.contains("dir-b"),
        "{shown}"
    );
    // In name order, each once; nothing applied while one file is bad, names an app twice
    // or another file's route, and a dry run says so too.
    for (file, text, why) in [
        ("z-bad.toml", "name = \"x\"\n[component\n".to_string(), ""),
        (
            "z-again.toml",
            named("dir-a"),
            "app default/dir-a is also in",
        ),
        (
            "z-route.toml",
            named("dir-a").replace("name = \"dir-a\"", "name = \"dir-z\""),
            "route /dir-a is also served by app default/dir-a in",
        ),
    ] {
        std::fs::write(apps_dir.join(file), text).unwrap();
        let out = c.cli(&["diff", "-f", apps, "-R"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(said.contains(file) && said.contains(why), "{said}");
        let out = c.cli(&["apply", "-f", apps, "-R"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(file), "{said}");
        assert!(!c.cli_ok(&["get", "apps"]).contains("dir-a"), "{file}");
        std::fs::remove_file(apps_dir.join(file)).unwrap();
    }
    let applied: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["apply", "-f", apps, "-R", "-o", "json"])).unwrap();
    let names: Vec<&str> = applied
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["app"]["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dir-a", "dir-b"]);
    // One that needs the server to refuse it stops the apply there: what came before stays
    // applied, and is listed in JSON too.
    std::fs::write(apps_dir.join("c.toml"), named("dir-c")).unwrap();
    let ghost = format!(
        "name = \"dir-z\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n",
        "0".repeat(64)
    );
    std::fs::write(apps_dir.join("more/z-ghost.toml"), ghost).unwrap();
    let out = c.cli(&["apply", "-f", apps, "-R", "-o", "json"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("z-ghost.toml"), "{said}");
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let outcomes: Vec<(&str, &str)> = applied
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["app"]["spec"]["name"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("dir-a", "unchanged"),
            ("dir-c", "created"),
            ("dir-b", "unchanged")
        ]
    );
    std::fs::remove_file(apps_dir.join("more/z-ghost.toml")).unwrap();
    let empty = c.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = c.cli(&["apply", "-f", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no .toml spec"));

    let out = c.cli_stdin(&["apply", "-f", "-"], &named("piped"));
    assert!(out.status.success(), "{out:?}");
    c.wait_gw("/piped", 200, "Hello from Shoal!");
    let out = c.cli_stdin(&["apply", "-f", "-"], "name = \"x\"\n[component\n");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("<stdin>:2:"),
        "{said}"
    );
    let out = c.cli_stdin(&["apply", "-f", "-", "-f", "-"], "");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // An outbound grant naming an app is applied, with a warning on stderr, as kubectl shows
    // a server's warnings: its calls would go to DNS, not to the app.
    let granting = format!("{}\n[network]\noutbound = [\"piped\"]\n", named("caller"));
    let out = c.cli_stdin(&["apply", "-f", "-"], &granting);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(
            "Warning: app default/caller: outbound grant \"piped\" names app default/piped"
        ),
        "{said}"
    );

    // `delete -f` takes the same files and deletes the apps they name; several names at
    // once go on past one that fails, which sets the exit code and is said once.
    let out = c.cli(&["delete", "-f", apps, "-R"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [
            "app default/dir-a deleted",
            "app default/dir-c deleted",
            "app default/dir-b deleted"
        ]
    );
    let out = c.cli(&["delete", "-f", apps, "-R"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = c.cli(&["delete", "-f", apps, "-R", "--ignore-not-found"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let out = c.cli(&["delete", "app", "piped", "nope", "caller", "-o", "json"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(said.matches("error:").count(), 1, "{said}");
    assert!(said.contains("nope"), "{said}");
    let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        deleted,
        serde_json::json!([{ "deleted": "default/piped" }, { "deleted": "default/caller" }])
    );
    let left = c.cli_ok(&["get", "apps"]);
    assert!(
        !left.contains("piped") && !left.contains("caller"),
        "{left}"
    );
    assert_eq!(
        code(&c, &["delete", "app", "nope", "--ignore-not-found"]),
        Some(0)
    );
    assert_eq!(code(&c, &["delete", "app"]), Some(2));
    assert_eq!(code(&c, &["delete", "app", "x", "-f", apps]), Some(2));
}

/// `get app NAME -o toml` gives back a file that `apply -f` takes as unchanged. `edit` applies
/// what the editor saved; an unchanged file, or a failed editor, applies nothing; a malformed
/// or renamed spec is refused and kept; and an edit made while another change came first is
/// refused (exit 4) and kept, so it undoes nothing.
#[test]
fn edit_applies_what_the_editor_saved_and_not_over_a_change_that_came_first() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(c.dir.path(), "hello.toml", &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/hello", 200, "Hello from Shoal!");

    let got = c.cli_ok(&["get", "app", "hello", "-o", "toml"]);
    assert!(
        got.contains("digest = \"sha256:") && got.contains("routes = [\"/hello\"]"),
        "{got}"
    );
    let back = write_spec(c.dir.path(), "back.toml", &got);
    let out = c.cli_ok(&["apply", "-f", back.to_str().unwrap()]);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(code(&c, &["get", "apps", "-o", "toml"]), Some(2));
    assert_eq!(
        code(&c, &["describe", "app", "hello", "-o", "toml"]),
        Some(2)
    );
    assert_eq!(code(&c, &["get", "app", "nope", "-o", "toml"]), Some(3));
    assert_eq!(code(&c, &["get", "job", "hello", "-o", "toml"]), Some(3));

    // Each editor is a script given the file to edit, as $EDITOR is.
    let edit = |name: &str, script: &str| {
        let editor = c.dir.path().join(name);
        std::fs::write(&editor, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new(common::SHOAL)
            .args(["edit", "app", "hello"])
            .env("SHOAL_CONFIG", c.config())
            .env("SHOAL", common::SHOAL)
            .env("EDITOR", &editor)
            // The edits it keeps go with the test's directory.
            .env("TMPDIR", c.dir.path())
            .env_remove("VISUAL")
            .env_remove("SHOAL_SERVER")
            .env_remove("SHOAL_TOKEN")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            said,
        )
    };
    // Where a refused edit was kept, and what it holds.
    let kept = |said: &str| {
        let path = said
            .lines()
            .find_map(|l| l.strip_prefix("your edit is kept in "))
            .unwrap_or_else(|| panic!("no kept file named in: {said}"));
        std::fs::read_to_string(path).unwrap()
    };
    let revision = || c.api_json("/v1/apps/hello")["app"]["revision"].as_u64();

    let (status, _, said) = edit("same", "exit 0");
    assert_eq!(status, Some(0), "{said}");
    assert!(said.contains("Edit cancelled, no changes made."), "{said}");
    let (status, _, said) = edit("emptied", ": > \"$1\"");
    assert_eq!(status, Some(0), "{said}");
    assert!(said.contains("Edit cancelled"), "{said}");
    let (status, _, said) = edit("fails", "exit 3");
    assert_eq!(status, Some(1), "{said}");
    assert!(
        said.contains("exited with") && said.contains("nothing applied"),
        "{said}"
    );
    let (status, _, said) = edit("broken", "echo '[component' >> \"$1\"");
    assert_eq!(status, Some(1), "{said}");
    assert!(said.contains(".toml:"), "the error names the line: {said}");
    assert!(kept(&said).ends_with("[component\n"), "{said}");
    let (status, _, said) = edit("renamed", "sed -i 's/^name = .*/name = \"other\"/' \"$1\"");
    assert_eq!(status, Some(2), "{said}");
    assert!(said.contains("keeps the app's name"), "{said}");
    assert_eq!(revision(), Some(1));

    let (status, out, said) = edit(
        "greet",
        "sed -i 's/^GREETING = .*/GREETING = \"Howdy from an edit\"/' \"$1\"",
    );
    assert_eq!(status, Some(0), "{said}");
    assert!(
        out.contains("app default/hello configured, revision 2"),
        "{out}"
    );
    c.wait_gw("/hello", 200, "Howdy from an edit");

    // Someone scales the app while the editor is open: the edit, made from the spec before,
    // would set replicas back to 1.
    let (status, _, said) = edit(
        "raced",
        "\"$SHOAL\" scale hello --replicas 2 > /dev/null || exit 9\nsed -i 's/^GREETING = .*/GREETING = \"lost\"/' \"$1\"",
    );
    assert_eq!(status, Some(4), "{said}");
    assert!(said.contains("has changed since"), "{said}");
    assert!(kept(&said).contains("GREETING = \"lost\""), "{said}");
    assert_eq!(revision(), Some(2));
    let now = c.cli_ok(&["get", "app", "hello", "-o", "toml"]);
    assert!(
        now.contains("replicas = 2") && now.contains("Howdy from an edit"),
        "{now}"
    );
}

/// `up` given one address for two of its listeners says so at once (exit 2), before it makes
/// a data dir, rather than fail to listen blaming another shoal.
#[test]
fn up_refuses_one_address_for_two_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(common::SHOAL)
        .args(["up", "--data-dir", data.to_str().unwrap()])
        .args(["--api", "127.0.0.1:47017", "--gateway", "127.0.0.1:47017"])
        .env("SHOAL_CONFIG", dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--api and --gateway are both 127.0.0.1:47017"),
        "{said}"
    );
    assert!(!data.exists());
}

/// A token about to go over plain HTTP to another machine is warned of, once; to this
/// machine's loopback it is not.
#[test]
fn a_token_sent_in_clear_text_off_this_machine_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = |server: &str| {
        let out = std::process::Command::new(common::SHOAL)
            .args(["--server", server, "--token", "t", "get", "apps"])
            .env("SHOAL_CONFIG", dir.path().join("config.toml"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "nothing listens at {server}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // TEST-NET-1 (RFC 5737): no machine, the same warning.
    let said = stderr("http://192.0.2.1:9");
    assert_eq!(said.matches("clear text").count(), 1, "{said}");
    assert!(!stderr("http://127.0.0.1:9").contains("clear text"));
}

/// A follower whose reader goes away ends at once, by SIGPIPE as a write to the closed pipe
/// would, though nothing new comes for it to write (`shoal events -f | head -1`).
#[test]
fn a_follower_ends_when_its_reader_goes_though_nothing_new_comes() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let c = Cluster::start();
    for args in [
        &["events", "--follow"][..],
        &["get", "nodes", "--watch"][..],
    ] {
        let mut child = std::process::Command::new(common::SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", c.config())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert!(!first.is_empty(), "{args:?}");
        drop(out);
        let mut status = None;
        let ended = common::poll(std::time::Duration::from_secs(10), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if !ended {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(ended, "{args:?} went on after its reader went");
        assert_eq!(status.unwrap().signal(), Some(libc::SIGPIPE), "{args:?}");
    }
}

/// A daemon started with a low soft limit on open files (a shell's `ulimit -n 256`) raises it
/// to the hard limit: each replica keeps its log open, and at the soft limit the API could
/// not accept a connection.
#[test]
fn a_daemon_raises_its_open_files_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut hard: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    let low = 256.min(hard.rlim_max);
    let mut command = std::process::Command::new(common::SHOAL);
    command
        .args([
            "up",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ])
        .args(["--api", "127.0.0.1:0", "--gateway", "127.0.0.1:0"])
        .env("SHOAL_CONFIG", dir.path().join("config.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe, and only lowers this child's soft limit.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: low,
                rlim_max: hard.rlim_max,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut child = common::Killed::new(command.spawn().unwrap());
    let lines = common::read_lines(&mut child);
    common::wait_line(&lines, "API:");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: Vec<&str> = open_files.split_whitespace().collect();
    let want = hard.rlim_max.min(1 << 20).to_string();
    assert_eq!(soft[3], want, "{open_files}");
}
