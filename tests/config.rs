//! An app's `[config]` and its config sets end to end on `shoal up`: served to the guest
//! through `wasi:config/store`, changed by an apply (or a change to the set) without one
//! failed request, recorded in the rollout history and brought back by `rollout undo`, shown
//! by `describe`.

mod common;

use common::{Cluster, Load, LoadResult, examples, poll, write_spec};
use std::time::Duration;

/// The `settings` example with `greeting` set to `greeting`, 2 replicas.
fn settings(dir: &std::path::Path, greeting: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/settings/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "greeting = \"Hello from wasi:config!\"",
            &format!("greeting = \"{greeting}\""),
        );
    assert!(text.contains(greeting), "{text}");
    write_spec(
        dir,
        &format!("{greeting}.toml"),
        &format!("{text}\n[scale]\nreplicas = 2\n"),
    )
    .to_str()
    .unwrap()
    .to_string()
}

/// Whether `path` on the cluster's gateway answers `body` within 30 s.
fn serves(c: &Cluster, path: &str, body: &str) -> bool {
    poll(Duration::from_secs(30), || {
        c.gw(path).text().unwrap() == body
    })
}

/// Makes `change` while a client keeps requesting `path`: `path` comes to answer `body`,
/// the rollout finishes, and no request fails meanwhile. What the client saw.
fn rolls_under_load(c: &Cluster, path: &str, body: &str, change: impl FnOnce()) -> LoadResult {
    let load = Load::start(format!("{}{path}", c.gateway));
    change();
    assert!(serves(c, path, body), "{path} never answered {body:?}");
    let out = c.cli(&[
        "rollout",
        "status",
        "settings",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(out.status.success(), "{out:?}");
    let result = load.stop();
    assert_eq!(result.failed, 0, "{result:?}");
    result
}

#[test]
fn config_is_read_through_wasi_config_and_changes_like_any_revision() {
    let c = Cluster::start();
    let d = c.dir.path();
    c.cli_ok(&["apply", "-f", &settings(d, "one")]);
    c.wait_gw("/settings/greeting", 200, "one");
    let all = c.gw("/settings").text().unwrap();
    assert_eq!(all, "greeting=one\nlog.level=info\n");
    // A key the app was not given is `none`: the guest answers 404.
    let missing = c.gw("/settings/password");
    assert_eq!(missing.status(), 404);

    // A new value reaches new requests, with no failed request in between.
    let result = rolls_under_load(&c, "/settings/greeting", "two\n", || {
        c.cli_ok(&["apply", "-f", &settings(d, "two")]);
    });
    assert!(result.bodies.contains_key("two\n"), "{result:?}");

    let history = c.cli_ok(&["rollout", "history", "settings"]);
    assert!(history.contains("config.greeting"), "{history}");
    let described = c.cli_ok(&["describe", "app", "settings"]);
    assert!(
        described.contains("Config:") && described.contains("greeting=two"),
        "{described}"
    );
    // A finished rollout says when it finished: its message is as of then.
    let finished = |described: &str| {
        described.lines().any(|l| {
            l.starts_with("Rollout:")
                && l.split_once(" Complete ")
                    .and_then(|(_, rest)| rest.split_once(" ago: "))
                    .is_some_and(|(age, said)| {
                        age.ends_with('s') && said.starts_with("revision 2 rolled out")
                    })
        })
    };
    assert!(
        poll(Duration::from_secs(30), || finished(
            &c.cli_ok(&["describe", "app", "settings"])
        )),
        "{}",
        c.cli_ok(&["describe", "app", "settings"])
    );

    // Undone like any change.
    c.cli_ok(&["rollout", "undo", "settings"]);
    assert!(
        serves(&c, "/settings/greeting", "one\n"),
        "undo did not bring the old value back"
    );
}

#[test]
fn env_values_may_come_from_config() {
    let c = Cluster::start();
    let spec = common::faulty_spec(
        c.dir.path(),
        "faulty.toml",
        1,
        "[config]\ndsn = \"db://primary\"\n[env]\nDSN = \"$(config.dsn)\"\n",
    );
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty/env/DSN", 200, "db://primary");
    // Asking for a key [config] lacks is refused at apply, naming it.
    let bad = common::faulty_spec(
        c.dir.path(),
        "bad.toml",
        1,
        "[config]\ndsn = \"db://primary\"\n[env]\nDSN = \"$(config.dns)\"\n",
    );
    let err = c.cli_err(&["apply", "-f", &bad]);
    assert!(
        err.contains("\"dns\"") && err.contains("bad.toml:"),
        "{err}"
    );
}

#[test]
fn config_sets_are_shared_and_a_change_rolls_their_users() {
    let c = Cluster::start();
    let d = c.dir.path();
    let out = c.cli_ok(&[
        "config",
        "create",
        "shared",
        "--from-literal",
        "color=blue",
        "--from-literal",
        "greeting=from the set",
    ]);
    assert!(out.contains("config set shared created (2 keys)"), "{out}");
    // The app's own [config] is over the set's.
    let text = std::fs::read_to_string(format!("{}/settings/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "name = \"settings\"",
            "name = \"settings\"\nconfig_sets = [\"shared\"]",
        );
    let spec = write_spec(d, "settings.toml", &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/settings/color", 200, "blue");
    let all = c.gw("/settings").text().unwrap();
    assert_eq!(
        all,
        "color=blue\ngreeting=Hello from wasi:config!\nlog.level=info\n"
    );

    // Changing the set rolls the app, with no failed request.
    rolls_under_load(&c, "/settings/color", "green\n", || {
        let out = c.cli_ok(&["config", "set", "shared", "color=green"]);
        assert!(out.contains("app settings applied again"), "{out}");
    });
    let history = c.cli_ok(&["rollout", "history", "settings"]);
    assert!(history.contains("config.color"), "{history}");
    // The same value again changes nothing, and says so.
    let out = c.cli_ok(&["config", "set", "shared", "color=green"]);
    assert!(
        out.contains("config set shared unchanged") && !out.contains("applied again"),
        "{out}"
    );
    // The history as it was, but for its AGE column, which a second may pass over.
    let without_age = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| {
                let mut columns: Vec<&str> = l.split_whitespace().collect();
                columns.remove(1);
                columns.join(" ")
            })
            .collect()
    };
    assert_eq!(
        without_age(&c.cli_ok(&["rollout", "history", "settings"])),
        without_age(&history),
        "no new revision"
    );
    let described = c.cli_ok(&["describe", "app", "settings"]);
    assert!(described.contains("Config sets:  shared"), "{described}");

    let listed = c.cli_ok(&["config", "get"]);
    assert!(
        listed.contains("shared")
            && listed.contains("color,greeting")
            && listed.contains("settings"),
        "{listed}"
    );
    assert_eq!(
        c.cli_ok(&["config", "get", "shared"]),
        "color=green\ngreeting=from the set\n"
    );
    // Listed as `get` lists the rest, by name and in every namespace.
    assert_eq!(c.cli_ok(&["get", "configs"]), listed);
    let one = c.cli_ok(&["get", "config", "shared"]);
    assert!(
        one.contains("shared") && one.contains("color,greeting"),
        "{one}"
    );
    let all = c.cli_ok(&["get", "configs", "-A"]);
    assert!(
        all.starts_with("NAMESPACE") && all.contains("default"),
        "{all}"
    );
    let err = c.cli_err(&["get", "config", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    // In use: not deleted.
    let err = c.cli_err(&["config", "delete", "shared"]);
    assert!(err.contains("used by settings"), "{err}");
    // A set that does not exist: refused, with the file and line that names it.
    let missing = write_spec(d, "missing.toml", &text.replace("\"shared\"", "\"nosuch\""));
    let err = c.cli_err(&["apply", "-f", missing.to_str().unwrap()]);
    assert!(
        err.contains("missing.toml:2:") && err.contains("nosuch"),
        "{err}"
    );

    // Undone like any change: the set's old value is back.
    c.cli_ok(&["rollout", "undo", "settings"]);
    assert!(
        serves(&c, "/settings/color", "blue\n"),
        "undo did not bring the set's old value back"
    );
    // A value too big for the command line comes from a file.
    let big = d.join("big.txt");
    std::fs::write(&big, "g".repeat(300_000)).unwrap();
    c.cli_ok(&[
        "config",
        "set",
        "shared",
        "--from-file",
        &format!("big={}", big.display()),
    ]);
    assert!(serves(
        &c,
        "/settings/big",
        &format!("{}\n", "g".repeat(300_000))
    ));
    // Once no app names it, it goes.
    c.cli_ok(&["delete", "app", "settings"]);
    c.cli_ok(&["config", "delete", "shared"]);
    assert!(!c.cli_ok(&["config", "get"]).contains("shared"));
}

/// `config set` and `unset` are merged by the server into what the set has when it writes:
/// read by the CLI and written back whole, one of two changes at once was lost.
#[test]
fn changes_made_at_once_to_a_config_set_all_land() {
    let c = Cluster::start();
    c.cli_ok(&["config", "create", "many", "--from-literal", "base=1"]);
    std::thread::scope(|s| {
        for i in 0..16 {
            let c = &c;
            s.spawn(move || c.cli_ok(&["config", "set", "many", &format!("k{i}=v{i}")]));
        }
    });
    let got = c.cli_ok(&["config", "get", "many"]);
    assert_eq!(got.lines().count(), 17, "{got}");
    for i in 0..16 {
        assert!(got.contains(&format!("k{i}=v{i}\n")), "{got}");
    }
    std::thread::scope(|s| {
        for i in 0..8 {
            let c = &c;
            s.spawn(move || c.cli_ok(&["config", "unset", "many", &format!("k{i}")]));
        }
    });
    let got = c.cli_ok(&["config", "get", "many"]);
    assert_eq!(got.lines().count(), 9, "{got}");
    let out = c.cli(&["config", "unset", "many", "k0"]);
    assert_eq!(out.status.code(), Some(3), "not found: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config set many has no key \"k0\""), "{err}");
}
