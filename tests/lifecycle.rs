//! Rollouts and self-healing end to end, under load from a real client: rolling
//! updates across nodes, automatic rollback, canaries judged by what the
//! gateways measure, replicas replaced when their node cannot keep them alive,
//! and the events that say what happened.

mod common;

use common::{Cluster, Load, Server, cluster, faulty_spec, poll};
use std::time::Duration;

const READINESS: &str =
    "[health.readiness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";

/// The faulty example as revision `version` (its `VERSION` env var) with more env and sections.
fn faulty(dir: &std::path::Path, replicas: u32, version: u32, env: &str, extra: &str) -> String {
    faulty_spec(
        dir,
        &format!("v{version}.toml"),
        replicas,
        &format!("[env]\nVERSION = \"{version}\"\n{env}\n{extra}"),
    )
}

fn events(server: &Server) -> String {
    server.cli_ok(&["events", "--app", "faulty"])
}

/// Waits for the app's rollout; returns whether it completed, and what the CLI said.
fn wait_rollout(cli: impl Fn(&[&str]) -> std::process::Output) -> (bool, String) {
    let out = cli(&["rollout", "status", "faulty", "--wait", "--timeout", "90s"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn revisions_running(replicas: &[serde_json::Value]) -> Vec<u64> {
    let mut revs: Vec<u64> = replicas
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    revs.sort();
    revs.dedup();
    revs
}

#[test]
fn a_rolling_update_across_nodes_drops_nothing_and_a_bad_revision_rolls_back_by_itself() {
    let (dir, server, nodes) = cluster(3, &[]);
    let d = dir.path();
    let rollout = "[rollout]\nprogress_deadline = \"8s\"\n";
    let extra = format!("{READINESS}{rollout}");
    server.cli_ok(&["apply", "-f", &faulty(d, 4, 1, "", &extra)]);
    let (done, out) = wait_rollout(|a| server.cli(a));
    assert!(done, "{out}");
    let on_nodes: std::collections::BTreeSet<String> = server
        .replicas("faulty")
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    assert!(on_nodes.len() >= 2, "replicas on {on_nodes:?}");

    let load = Load::start(format!("{}/faulty/env/VERSION", nodes[0].gateway));
    server.cli_ok(&["apply", "-f", &faulty(d, 4, 2, "", &extra)]);
    let (done, out) = wait_rollout(|a| server.cli(a));
    assert!(done, "{out}");
    assert!(out.contains("revision 2 rolled out: 4/4"), "{out}");
    let replicas = server.replicas("faulty");
    assert_eq!(revisions_running(&replicas), [2], "{replicas:?}");
    // Four Ready; a fifth may be starting already if the rebalancer moves one (new before
    // old) to even out the spread the rollout left.
    let ready = replicas.iter().filter(|r| r["phase"] == "Ready").count();
    assert!(ready >= 4, "{replicas:#?}");

    // v3 never becomes ready: rolled back after the progress deadline, by itself.
    server.cli_ok(&[
        "apply",
        "-f",
        &faulty(d, 4, 3, "HEALTHZ_STATUS = \"503\"", &extra),
    ]);
    let (done, out) = wait_rollout(|a| server.cli(a));
    assert!(!done, "{out}");
    assert!(
        out.contains("RolledBack") && out.contains("progress_deadline"),
        "{out}"
    );
    assert!(poll(Duration::from_secs(20), || {
        revisions_running(&server.replicas("faulty")) == [2]
    }));
    let app = server.api_json("/v1/apps/faulty");
    assert_eq!(app["app"]["revision"], 2);

    // A restart, under the same load: every replica replaced by a fresh one of what runs
    // (revision 2's template, as revision 4), new before old.
    let ids = |replicas: &[serde_json::Value]| -> std::collections::BTreeSet<String> {
        replicas
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let old = ids(&server.replicas("faulty"));
    let out = server.cli_ok(&["rollout", "restart", "faulty"]);
    assert!(out.contains("restarting: revision 4"), "{out}");
    let (done, out) = wait_rollout(|a| server.cli(a));
    assert!(done, "{out}");
    assert!(poll(Duration::from_secs(20), || {
        let replicas = server.replicas("faulty");
        revisions_running(&replicas) == [4] && ids(&replicas).is_disjoint(&old)
    }));
    // The spec did not change: its file applied again changes nothing.
    let out = server.cli_ok(&["apply", "-f", &faulty(d, 4, 2, "", &extra)]);
    assert!(out.contains("unchanged"), "{out}");

    let result = load.stop();
    assert_eq!(result.failed, 0, "{result:?}\n{}", events(&server));
    assert!(
        result.bodies.contains_key("1") && result.bodies.contains_key("2"),
        "{result:?}"
    );
    assert!(!result.bodies.contains_key("3"), "{result:?}");

    let app = server.api_json("/v1/apps/faulty");
    assert_eq!(app["app"]["revision"], 4);
    let history = server.cli_ok(&["rollout", "history", "faulty"]);
    assert!(
        history.contains("rolled back: no progress")
            && history.contains("rolled out")
            && history.contains("restart of revision 2"),
        "{history}"
    );
    let ev = events(&server);
    assert!(
        ev.contains("RolledOut") && ev.contains("RolledBack") && ev.contains("Restarted"),
        "{ev}"
    );
}

/// Short steps; a lenient p99 bound, as latency on a busy 2-core CI machine is noise (the
/// latency judgement is unit-tested in shoal-scheduler).
const CANARY: &str = "[rollout]\nstrategy = \"canary\"\nprogress_deadline = \"30s\"\nsteps = [{ weight = 25, pause = \"1s\" }, { weight = 50, pause = \"1s\" }]\n[rollout.analysis]\nmin_requests = 20\nmax_p99_ratio = 4.0\n";

#[test]
fn a_canary_returning_errors_is_aborted_and_a_healthy_one_is_promoted() {
    let c = Cluster::start();
    let d = c.dir.path();
    let extra = format!("{READINESS}{CANARY}");
    c.cli_ok(&["apply", "-f", &faulty(d, 4, 1, "", &extra)]);
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(done, "{out}");

    // v2 answers 500: the analysis sees its error rate and aborts.
    let load = Load::start(format!("{}/faulty/", c.gateway));
    c.cli_ok(&[
        "apply",
        "-f",
        &faulty(d, 4, 2, "DEFAULT_STATUS = \"500\"", &extra),
    ]);
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(!done, "{out}");
    assert!(
        out.contains("Aborted") && out.contains("canary error rate"),
        "{out}"
    );
    assert!(poll(Duration::from_secs(20), || {
        revisions_running(c.api_json("/v1/replicas?app=faulty").as_array().unwrap()) == [1]
    }));
    let result = load.stop();
    // The canary took its share, and only its share, before it was stopped.
    assert!(result.failed > 0, "{result:?}");
    assert!(result.failed < result.ok, "{result:?}");
    // Back on v1 alone: every request succeeds.
    let http = common::client();
    for _ in 0..200 {
        let resp = http.get(format!("{}/faulty/", c.gateway)).send().unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The same file applied again (a GitOps loop) is refused, not canaried once more; with
    // --retry it would roll out.
    let v2 = faulty(d, 4, 2, "DEFAULT_STATUS = \"500\"", &extra);
    let again = c.cli(&["apply", "-f", &v2]);
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("was aborted") && said.contains("--retry"),
        "{said}"
    );
    let retry = c.cli(&["apply", "--retry", "--dry-run", "-f", &v2]);
    assert_eq!(retry.status.code(), Some(1), "would change: {retry:?}");
    assert_eq!(
        revisions_running(c.api_json("/v1/replicas?app=faulty").as_array().unwrap()),
        [1]
    );

    // v3 is healthy: it walks 25% and 50% and is promoted to every replica.
    let load = Load::start(format!("{}/faulty/env/VERSION", c.gateway));
    c.cli_ok(&["apply", "-f", &faulty(d, 4, 3, "", &extra)]);
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(done, "{out}");
    assert!(out.contains("step 1/2") && out.contains("25%"), "{out}");
    let result = load.stop();
    assert_eq!(result.failed, 0, "{result:?}");
    assert!(
        result.bodies.contains_key("1") && result.bodies.contains_key("3"),
        "{result:?}"
    );
    let replicas = c.api_json("/v1/replicas?app=faulty");
    assert_eq!(
        revisions_running(replicas.as_array().unwrap()),
        [3],
        "{replicas}"
    );
    let ev = c.cli_ok(&["events", "--app", "faulty"]);
    for reason in ["CanaryStep", "Promoted", "RolledOut", "Aborted"] {
        assert!(ev.contains(reason), "no {reason} in:\n{ev}");
    }
}

/// With `min_ready`, an old replica stops, and the rollout completes, only once a new one has
/// been Ready that long.
#[test]
fn min_ready_keeps_the_old_replica_until_the_new_one_has_been_ready_that_long() {
    let c = Cluster::start();
    let d = c.dir.path();
    let extra = format!("{READINESS}[rollout]\nmin_ready = \"3s\"\n");
    c.cli_ok(&["apply", "-f", &faulty(d, 1, 1, "", &extra)]);
    assert!(wait_rollout(|a| c.cli(a)).0);
    let replicas = c.api_json("/v1/replicas?app=faulty");
    let old = replicas[0]["id"].as_str().unwrap().to_string();
    c.cli_ok(&["apply", "-f", &faulty(d, 1, 2, "", &extra)]);
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(done, "{out}");
    let replicas = c.api_json("/v1/replicas?app=faulty");
    let new = replicas
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["revision"] == 2)
        .unwrap_or_else(|| panic!("{replicas:#}"));
    let ready_since = new["ready_since"].as_u64().unwrap();
    let events = c.api_json("/v1/events?app=faulty");
    let time = |reason: &str, saying: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["reason"] == reason && e["message"].as_str().unwrap().contains(saying))
            .and_then(|e| e["time"].as_u64())
            .unwrap_or_else(|| panic!("no {reason} event saying {saying}: {events:#}"))
    };
    let killed = time("Killing", &old);
    assert!(
        killed >= ready_since + 3_000,
        "old replica stopped {} ms after the new one was ready",
        killed as i64 - ready_since as i64
    );
    assert!(time("RolledOut", "revision 2") >= ready_since + 3_000);
}

#[test]
fn rollouts_pause_resume_and_promote_on_command() {
    let c = Cluster::start();
    let d = c.dir.path();
    // A step without a pause waits for `promote`.
    let manual = "[rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 50 }]\n[rollout.analysis]\nmin_requests = 0\n";
    c.cli_ok(&["apply", "-f", &faulty(d, 2, 1, "", manual)]);
    assert!(wait_rollout(|a| c.cli(a)).0);
    c.cli_ok(&["apply", "-f", &faulty(d, 2, 2, "", manual)]);
    assert!(poll(Duration::from_secs(20), || {
        c.cli_ok(&["rollout", "status", "faulty"])
            .contains("waiting for `shoal rollout promote`")
    }));
    let status = c.cli_ok(&["rollout", "status", "faulty"]);
    assert!(status.contains("revision 2: 1/1 ready"), "{status}");
    assert!(status.contains("revision 1: 2/2 ready"), "{status}");
    c.cli_ok(&["rollout", "pause", "faulty"]);
    assert!(
        c.cli_ok(&["rollout", "status", "faulty"])
            .contains("paused")
    );
    c.cli_ok(&["rollout", "resume", "faulty"]);
    let out = c.cli_ok(&["rollout", "promote", "faulty"]);
    assert!(out.contains("promoted to 100%"), "{out}");
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(done, "{out}");
    // Nothing in progress: the actions say so.
    let err = String::from_utf8(c.cli(&["rollout", "abort", "faulty"]).stderr).unwrap();
    assert!(err.contains("no rollout in progress"), "{err}");

    // Paused between rollouts, as a Kubernetes Deployment: what is applied next waits, and
    // so does what is applied over it, until resumed; then the last one rolls out.
    let out = c.cli_ok(&["rollout", "pause", "faulty"]);
    assert!(out.contains("waits for `shoal rollout resume`"), "{out}");
    c.cli_ok(&["apply", "-f", &faulty(d, 2, 3, "", "")]);
    c.cli_ok(&["apply", "-f", &faulty(d, 2, 4, "", "")]);
    assert!(poll(Duration::from_secs(20), || {
        c.cli_ok(&["rollout", "status", "faulty"])
            .contains("revision 4 paused")
    }));
    let replicas = c.api_json("/v1/replicas?app=faulty");
    assert_eq!(
        revisions_running(replicas.as_array().unwrap()),
        [2],
        "held: {replicas:#}"
    );
    c.cli_ok(&["rollout", "resume", "faulty"]);
    let (done, out) = wait_rollout(|a| c.cli(a));
    assert!(done, "{out}");
    assert!(poll(Duration::from_secs(20), || {
        let replicas = c.api_json("/v1/replicas?app=faulty");
        revisions_running(replicas.as_array().unwrap()) == [4]
    }));
}

#[test]
fn a_replica_that_stays_unhealthy_on_its_node_is_replaced_on_another() {
    let (dir, server, nodes) = cluster(2, &[]);
    // Unhealthy only on node-1, where bin packing puts the first replica (ties go by name).
    let liveness =
        "[health.liveness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";
    server.cli_ok(&[
        "apply",
        "-f",
        &faulty(
            dir.path(),
            1,
            1,
            "NODE = \"$(node)\"\nWHERE = \"$(app) on $(node)\"\nSICK_NODE = \"node-1\"",
            liveness,
        ),
    ]);
    assert!(
        poll(Duration::from_secs(30), || {
            server
                .replicas("faulty")
                .iter()
                .any(|r| r["node"] == "node-2" && r["phase"] == "Ready")
        }),
        "{:?}",
        server.replicas("faulty")
    );
    let ev = events(&server);
    assert!(
        ev.contains("Restarted") && ev.contains("Replacing") && ev.contains("node-1"),
        "{ev}"
    );
    let (status, body) = nodes[0].get("/faulty/env/NODE").unwrap();
    assert_eq!((status, body.as_str()), (200, "node-2"));
    let (status, body) = nodes[0].get("/faulty/env/WHERE").unwrap();
    assert_eq!((status, body.as_str()), (200, "faulty on node-2"));
}

#[test]
fn killed_requests_become_events() {
    let c = Cluster::start();
    let spec = faulty(c.dir.path(), 1, 1, "", "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"300ms\"")
        .replace("memory = \"32Mi\"", "memory = \"16Mi\"");
    std::fs::write(&spec, text).unwrap();
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty/", 200, "ok");
    assert_eq!(c.gw("/faulty/sleep/5000").status(), 504);
    assert_eq!(c.gw("/faulty/oom").status(), 500);
    assert!(
        poll(Duration::from_secs(10), || {
            let ev = c.cli_ok(&["events", "--app", "faulty"]);
            ev.contains("KilledByTimeout") && ev.contains("OutOfMemory")
        }),
        "{}",
        c.cli_ok(&["events", "--app", "faulty"])
    );
    // A burst of one kind is one event at once, then one when its 10 s are up saying how
    // many more, though none of its kind comes then to carry the count.
    for _ in 0..3 {
        assert_eq!(c.gw("/faulty/trap").status(), 500);
    }
    assert!(
        poll(Duration::from_secs(30), || {
            let ev = c.cli_ok(&["events", "--app", "faulty"]);
            let trapped: Vec<&str> = ev.lines().filter(|l| l.contains("Trapped")).collect();
            trapped.len() == 2 && trapped[1].contains("2 more since the last report")
        }),
        "{}",
        c.cli_ok(&["events", "--app", "faulty"])
    );
}

#[test]
fn revisions_past_the_history_limit_are_pruned_and_undo_still_works() {
    let c = Cluster::start();
    let dir = c.dir.path().to_path_buf();
    for version in 1..=13 {
        c.cli_ok(&["apply", "-f", &faulty(&dir, 1, version, "", "")]);
    }
    let (done, out) = wait_rollout(|args| c.cli(args));
    assert!(done, "{out}");
    // The controller's next quiet full pass keeps the newest 10 and what is in use.
    let kept = || -> Vec<u64> {
        c.api_json("/v1/apps/faulty")["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["number"].as_u64().unwrap())
            .collect()
    };
    assert!(
        poll(Duration::from_secs(30), || !kept().contains(&1)),
        "{:?}",
        kept()
    );
    let kept = kept();
    assert!(
        kept.len() <= 11 && (4..=13).all(|n| kept.contains(&n)),
        "{kept:?}"
    );
    let out = c.cli_ok(&["rollout", "undo", "faulty"]);
    assert!(out.contains("now revision 14"), "{out}");
}

/// A daemon whose new revision is up for a moment and then crash-loops (its arguments are
/// wrong) goes back to the revision before, even when its rollout had completed in that
/// moment: one replica, new before old, so the old one was already stopped.
#[test]
fn a_daemon_that_crashes_once_up_is_rolled_back_and_a_new_one_fails() {
    let c = Cluster::start();
    let text = std::fs::read_to_string(format!("{}/notes/reader.toml", common::examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", common::examples()));
    let v1 = common::write_spec(c.dir.path(), "reader.toml", &text);
    c.cli_ok(&["apply", "-f", v1.to_str().unwrap()]);
    c.cli_ok(&[
        "rollout",
        "status",
        "notes-reader",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let bogus = text.replace(
        "args = [\"notes\", \"read\"]",
        "args = [\"notes\", \"bogus\"]",
    );
    let v2 = common::write_spec(c.dir.path(), "bogus.toml", &bogus);
    c.cli_ok(&["apply", "-f", v2.to_str().unwrap()]);
    let status = || c.api_json("/v1/apps/notes-reader/rollout");
    assert!(
        poll(Duration::from_secs(60), || {
            let s = status();
            s["status"]["phase"] == "RolledBack" && s["status"]["revision"] == 1
        }),
        "{:#}",
        status()
    );
    assert!(
        poll(Duration::from_secs(30), || {
            let replicas = c.api_json("/v1/replicas?app=notes-reader");
            let replicas = replicas.as_array().unwrap();
            revisions_running(replicas) == [1] && replicas.iter().any(|r| r["phase"] == "Running")
        }),
        "{:#}",
        c.api_json("/v1/replicas?app=notes-reader")
    );
    let history = c.cli_ok(&["rollout", "history", "notes-reader"]);
    assert!(history.contains("rolled back"), "{history}");

    // A new app has no revision to go back to: its rollout fails, and stays failed while
    // its replica is up between crashes. (Seen up for its moment, it completed and then
    // fails; its moment missed, its deadline fails it.)
    let new = bogus.replace("name = \"notes-reader\"", "name = \"notes-bogus\"")
        + "\n[rollout]\nprogress_deadline = \"5s\"\n";
    let v3 = common::write_spec(c.dir.path(), "new-bogus.toml", &new);
    c.cli_ok(&["apply", "-f", v3.to_str().unwrap()]);
    let status = || c.api_json("/v1/apps/notes-bogus/rollout");
    let failed = || {
        let s = status();
        s["status"]["phase"] == "Failed"
            && s["status"]["message"].as_str().is_some_and(|m| {
                m.ends_with("after its rollout completed") || m.contains("progress_deadline")
            })
    };
    assert!(poll(Duration::from_secs(60), failed), "{:#}", status());
    let replica = || c.api_json("/v1/replicas?app=notes-bogus")[0].clone();
    assert!(
        poll(Duration::from_secs(30), || replica()["restarts"]
            .as_u64()
            .is_some_and(|n| n >= 2)),
        "{:#}",
        replica()
    );
    assert!(failed(), "{:#}", status());
    let events = c.cli_ok(&["events", "--app", "notes-bogus"]);
    assert!(
        events.contains("RolloutFailed") || events.contains("ProgressDeadlineExceeded"),
        "{events}"
    );
}
