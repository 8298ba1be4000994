//! API tokens with roles and namespace scopes, through the CLI of a real `shoal up`.

mod common;

use common::{Cluster, SHOAL, examples, write_spec};
use std::process::{Command, Output};

/// The CLI run with `token` in place of the admin token.
fn cli_as(c: &Cluster, token: &str, args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_CONFIG", c.config())
        .env("SHOAL_TOKEN", token)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn hello_in(c: &Cluster, ns: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "name = \"hello\"",
            &format!("name = \"hello\"\nnamespace = \"{ns}\""),
        )
        .replace(
            "routes = [\"/hello\"]",
            &format!("routes = [\"/{ns}/hello\"]"),
        );
    let path = write_spec(c.dir.path(), &format!("hello-{ns}.toml"), &text);
    path.to_str().unwrap().to_string()
}

#[test]
fn tokens_act_in_their_role_and_namespaces_and_stop_when_revoked() {
    let c = Cluster::start();
    let dir = c.dir.path();
    let deployer_file = dir.join("ci-token");
    let viewer_file = dir.join("view-token");
    let out = c.cli_ok(&[
        "token",
        "create",
        "ci",
        "--role",
        "deployer",
        "--scope",
        "team-a",
        "--write",
        deployer_file.to_str().unwrap(),
    ]);
    c.cli_ok(&[
        "token",
        "create",
        "view",
        "--role",
        "viewer",
        "--write",
        viewer_file.to_str().unwrap(),
    ]);
    let deployer = std::fs::read_to_string(&deployer_file).unwrap();
    let viewer = std::fs::read_to_string(&viewer_file).unwrap();
    assert!(!out.contains(&deployer), "written, never printed: {out}");
    // A file that cannot be written makes no token: its secret would be lost, its name taken.
    let nowhere = dir.join("no-such-dir/lost-token");
    let out = c.cli(&[
        "token",
        "create",
        "lost",
        "--role",
        "viewer",
        "--write",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("cannot write"), "{}", stderr(&out));
    assert!(!c.cli_ok(&["token", "list"]).contains("lost"));
    // Nor does a file there already, which may hold another token, unless --force.
    let over = [
        "token",
        "create",
        "over",
        "--role",
        "viewer",
        "--write",
        viewer_file.to_str().unwrap(),
    ];
    let out = c.cli(&over);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&viewer_file).unwrap(), viewer);
    assert!(!c.cli_ok(&["token", "list"]).contains("over"));
    c.cli_ok(&[&over[..], &["--force"]].concat());
    let over_token = std::fs::read_to_string(&viewer_file).unwrap();
    assert_ne!(over_token, viewer);
    std::fs::write(&viewer_file, &viewer).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&deployer_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // The deployer deploys in team-a, and nowhere else.
    let ok = cli_as(
        &c,
        &deployer,
        &["apply", "-n", "team-a", "-f", &hello_in(&c, "team-a")],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let refused = cli_as(&c, &deployer, &["apply", "-f", &hello_in(&c, "default")]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("acts in namespaces team-a, not default"),
        "{}",
        stderr(&refused)
    );
    let listed = cli_as(&c, &deployer, &["get", "apps", "-n", "team-a"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("hello"));
    // A context for the token, in its namespace: no -n needed, and a file naming no
    // namespace goes there (one naming its own keeps it, as with kubectl).
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &c.ca).unwrap();
    c.cli_ok(&[
        "config",
        "set-context",
        "team",
        "--server",
        &c.api,
        "--ca-file",
        ca_file.to_str().unwrap(),
        "--token-file",
        deployer_file.to_str().unwrap(),
        "-n",
        "team-a",
    ]);
    let contexts = c.cli_ok(&["config", "get-contexts"]);
    assert!(contexts.contains("team-a"), "{contexts}");
    assert!(
        c.cli_ok(&["--context", "team", "get", "apps"])
            .contains("hello")
    );
    let plain = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("name = \"hello\"", "name = \"plain\"")
        .replace("routes = [\"/hello\"]", "routes = [\"/team-a/plain\"]");
    let plain = write_spec(dir, "plain.toml", &plain);
    c.cli_ok(&["--context", "team", "apply", "-f", plain.to_str().unwrap()]);
    assert!(c.cli_ok(&["get", "apps", "-n", "team-a"]).contains("plain"));
    assert!(!c.cli_ok(&["get", "apps"]).contains("plain"));
    // A new context needs a server and a token, and a token file something in it.
    let out = c.cli(&["config", "set-context", "half", "-n", "team-a"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let out = c.cli(&[
        "config",
        "set-context",
        "team",
        "--token-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let nodes = cli_as(&c, &deployer, &["get", "nodes"]);
    assert!(!nodes.status.success());
    assert!(
        stderr(&nodes).contains("cluster-wide"),
        "{}",
        stderr(&nodes)
    );

    // The viewer reads everywhere, and changes nothing.
    let read = cli_as(&c, &viewer, &["get", "apps", "-n", "team-a"]);
    assert!(
        String::from_utf8_lossy(&read.stdout).contains("hello"),
        "{}",
        stderr(&read)
    );
    assert!(cli_as(&c, &viewer, &["get", "nodes"]).status.success());
    let scale = cli_as(
        &c,
        &viewer,
        &["scale", "hello", "-n", "team-a", "--replicas", "2"],
    );
    assert!(!scale.status.success());
    assert!(
        stderr(&scale).contains("needs a deployer"),
        "{}",
        stderr(&scale)
    );
    let mint = cli_as(&c, &viewer, &["token", "list"]);
    assert!(!mint.status.success(), "only admins see tokens");

    // The admin lists tokens, never their secrets, and revokes one.
    let list = c.cli_ok(&["token", "list"]);
    assert!(
        list.contains("ci") && list.contains("deployer") && list.contains("team-a"),
        "{list}"
    );
    assert!(
        !list.contains(&deployer[3..]) && !list.contains(&viewer[5..]),
        "{list}"
    );
    // Its events are its namespace's: not the cluster's own (nodes, tokens), and its
    // quota's but not another namespace's; the admin's `-n` leaves those out too.
    c.cli_ok(&["quota", "set", "team-a", "--apps", "20"]);
    c.cli_ok(&["quota", "set", "team-b", "--apps", "20"]);
    let events = cli_as(&c, &deployer, &["events", "-n", "team-a"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("app/team-a/hello"), "{events}");
    assert!(
        !events.contains("node/") && !events.contains("TokenCreated"),
        "{events}"
    );
    assert!(
        events.contains("quota/team-a") && !events.contains("quota/team-b"),
        "{events}"
    );
    let admin_view = c.cli_ok(&["events", "-n", "team-a"]);
    assert!(
        admin_view.contains("quota/team-a") && !admin_view.contains("quota/team-b"),
        "{admin_view}"
    );
    // A stream it follows ends with its token: one request that would otherwise never end.
    let mut follower = common::Killed::new(
        Command::new(SHOAL)
            .args(["logs", "hello", "-n", "team-a", "--follow"])
            .env("SHOAL_CONFIG", c.config())
            .env("SHOAL_TOKEN", &deployer)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Following: still running a moment after it connected (a refusal would end it at once).
    assert!(!common::poll(std::time::Duration::from_secs(2), || {
        follower.try_wait().unwrap().is_some()
    }));
    c.cli_ok(&["token", "revoke", "ci"]);
    let ended = common::poll(std::time::Duration::from_secs(20), || {
        follower.try_wait().unwrap().is_some()
    });
    if !ended {
        let _ = follower.kill();
    }
    let out = follower.wait_with_output();
    assert!(ended, "logs --follow outlived its revoked token");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let after = cli_as(&c, &deployer, &["get", "apps", "-n", "team-a"]);
    assert!(!after.status.success());
    assert!(
        stderr(&after).contains("invalid token"),
        "{}",
        stderr(&after)
    );
    let events = c.cli_ok(&["events"]);
    assert!(
        events.contains("TokenCreated") && events.contains("TokenRevoked"),
        "{events}"
    );
    assert!(!events.contains(&deployer[3..]), "{events}");
}

/// A token made with `--expires-in` works, shows when it expires, and after that is refused
/// as denied (exit 6), the error saying it expired; a follow stream it holds ends then too.
#[test]
fn a_token_with_a_life_stops_working_when_it_is_over() {
    let c = Cluster::start();
    let file = c.dir.path().join("short-token");
    c.cli_ok(&[
        "token",
        "create",
        "short",
        "--role",
        "viewer",
        "--expires-in",
        "4s",
        "--write",
        file.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&file).unwrap();
    let list = c.cli_ok(&["token", "list"]);
    let row = list.lines().find(|l| l.starts_with("short")).unwrap();
    assert!(row.contains(" in ") && list.contains("EXPIRES"), "{list}");
    let works = cli_as(&c, &token, &["get", "apps"]);
    assert!(works.status.success(), "{}", stderr(&works));
    let mut follower = common::Killed::new(
        Command::new(SHOAL)
            .args(["events", "--follow"])
            .env("SHOAL_CONFIG", c.config())
            .env("SHOAL_TOKEN", &token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut refused = None;
    assert!(
        common::poll(std::time::Duration::from_secs(15), || {
            let out = cli_as(&c, &token, &["get", "apps"]);
            let done = !out.status.success();
            refused = Some(out);
            done
        }),
        "still working 15 s after a life of 4 s"
    );
    let refused = refused.unwrap();
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("token short expired"),
        "{}",
        stderr(&refused)
    );
    assert!(
        common::poll(std::time::Duration::from_secs(5), || follower
            .try_wait()
            .unwrap()
            .is_some()),
        "the follow stream outlived its token"
    );
    let list = c.cli_ok(&["token", "list"]);
    assert!(list.contains("expired"), "{list}");
}
