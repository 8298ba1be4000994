//! End to end on a real one-node cluster: `shoal up`, the CLI, the gateway.

mod common;

use common::{Cluster, examples, poll, write_spec};
use std::time::Duration;

fn hello_spec() -> String {
    format!("{}/hello/app.toml", examples())
}

#[test]
fn apply_serve_inspect_update_delete() {
    let c = Cluster::start();
    let spec = hello_spec();

    let out = c.cli_ok(&["apply", "-f", &spec]);
    assert!(
        out.contains("app default/hello created, revision 1"),
        "{out}"
    );
    let out = c.cli_ok(&["apply", "-f", &spec]);
    assert!(out.contains("app default/hello unchanged"), "{out}");

    c.wait_gw("/hello", 200, "Hello from Shoal!");

    // Status reaches the store just after the endpoint reaches the gateway.
    let mut apps = String::new();
    let ready = poll(Duration::from_secs(10), || {
        apps = c.cli_ok(&["get", "apps"]);
        apps.contains("1/1")
    });
    assert!(
        ready && apps.contains("hello") && apps.contains("/hello"),
        "{apps}"
    );
    let replicas = c.cli_ok(&["get", "replicas"]);
    assert!(
        replicas.contains("Ready") && replicas.contains("node-1"),
        "{replicas}"
    );
    let describe = c.cli_ok(&["describe", "app", "hello"]);
    for needle in [
        "Revision:     1",
        "Scheduled",
        "Ready",
        "Kind:         http (wasi:http/proxy)",
        "GREETING=",
    ] {
        assert!(
            describe.contains(needle),
            "describe lacks {needle:?}:\n{describe}"
        );
    }
    let modules: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["get", "modules", "-o", "json"])).unwrap();
    assert_eq!(modules.as_array().unwrap().len(), 1, "{modules}");
    assert_eq!(modules[0]["kind"], "component");

    // The guest's stdout is captured per replica.
    let logs = c.cli_ok(&["logs", "hello"]);
    assert!(logs.contains("GET /hello"), "{logs}");

    // A dry run shows the change and changes nothing.
    let changed = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("GREETING = \"Hello from Shoal!\"", "GREETING = \"Bonjour\"");
    let changed = write_spec(c.dir.path(), "hello2.toml", &changed);
    let changed = changed.to_str().unwrap();
    let out = c.cli(&["apply", "--dry-run", "-f", changed]);
    assert_eq!(out.status.code(), Some(1), "something would change");
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.contains("(dry run)") && out.contains("env.GREETING"),
        "{out}"
    );
    assert!(c.gw("/hello").text().unwrap().contains("Hello from Shoal!"));

    // The real update makes revision 2 and traffic moves to it.
    let out = c.cli_ok(&["apply", "-f", changed]);
    assert!(out.contains("configured, revision 2"), "{out}");
    c.wait_gw("/hello", 200, "Bonjour");
    let history: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["describe", "app", "hello", "-o", "json"])).unwrap();
    assert_eq!(history["revisions"].as_array().unwrap().len(), 2);
    // The old replica goes once the new one is ready.
    assert!(poll(Duration::from_secs(20), || {
        let r = c.api_json("/v1/replicas?app=hello");
        r.as_array().unwrap().len() == 1 && r[0]["revision"] == 2
    }));

    // Undo runs revision 1 again as revision 3; history shows all three.
    let out = c.cli_ok(&["rollout", "undo", "hello"]);
    assert!(out.contains("now revision 3"), "{out}");
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    let history = c.cli_ok(&["rollout", "history", "hello"]);
    assert!(
        history.contains("3*") && history.contains("rollback to revision 1"),
        "{history}"
    );
    let out = c.cli_ok(&["rollout", "undo", "hello", "--to-revision", "3"]);
    assert!(out.contains("already runs"), "{out}");
    let err = c.cli_err(&["rollout", "undo", "hello", "--to-revision", "9"]);
    assert!(err.contains("no revision 9"), "{err}");

    let events = c.cli_ok(&["events", "--app", "hello"]);
    assert!(
        events.contains("Scheduled") && events.contains("RolledBack"),
        "{events}"
    );

    // `events --follow` prints what happens next.
    let mut follower = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["events", "--follow", "--app", "hello"])
            .env("SHOAL_CONFIG", c.config())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });

    // Delete: replicas stop, the route goes away.
    let out = c.cli_ok(&["delete", "app", "hello"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains("Deleted"))
        && std::time::Instant::now() < deadline
    {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let deleted = seen.last().filter(|l| l.contains("Deleted"));
    let deleted = deleted.expect("events --follow never showed the delete");
    // In the first batch's columns: its message starts under MESSAGE.
    let at = seen[0].find("MESSAGE").expect("a header first");
    assert!(
        deleted.len() > at && &deleted[at - 1..at] == " " && &deleted[at..=at] != " ",
        "{}",
        seen.join("\n")
    );
    assert!(out.contains("deleted"), "{out}");
    c.wait_gw("/hello", 404, "no_route");
    assert!(poll(Duration::from_secs(20), || c
        .api_json("/v1/replicas")
        .as_array()
        .unwrap()
        .is_empty()));
    let err = c.cli_err(&["describe", "app", "hello"]);
    assert!(err.contains("does not exist"), "{err}");

    // Made again at once after a delete, an app does not take the old one's replicas (its
    // revisions start at 1 again): what serves is the new spec.
    c.cli_ok(&["apply", "-f", changed]);
    c.wait_gw("/hello", 200, "Bonjour");
    c.cli_ok(&["delete", "app", "hello"]);
    let out = c.cli_ok(&["apply", "-f", &spec]);
    assert!(out.contains("created, revision 1"), "{out}");
    c.wait_gw("/hello", 200, "Hello from Shoal!");
}

#[test]
fn the_gateway_streams_bodies_and_keeps_status_and_headers() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &format!("{}/faulty/app.toml", examples())]);
    c.wait_gw("/faulty/healthz", 200, "status 200");

    // 8 MiB sent chunked (no length known up front) comes back byte for byte.
    let body: Vec<u8> = (0..8usize << 20).map(|i| (i % 251) as u8).collect();
    let resp = common::client()
        .post(format!("{}/faulty/echo", c.gateway))
        .header("content-type", "application/x-shoal-test")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            body.clone(),
        )))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-shoal-test");
    let echoed = resp.bytes().unwrap();
    assert_eq!(echoed.len(), body.len());
    assert!(echoed[..] == body[..], "echoed body differs");

    assert_eq!(c.gw("/faulty/status/418").status(), 418);
    let headers = common::client()
        .get(format!("{}/faulty/headers", c.gateway))
        .header("x-team", "yes")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(headers.contains("x-team: yes"), "{headers}");
}

#[test]
fn api_requires_the_token_but_the_gateway_does_not() {
    let c = Cluster::start();
    let http = c.http();
    let resp = http.get(format!("{}/v1/apps", c.api)).send().unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let resp = http
        .get(format!("{}/v1/apps", c.api))
        .bearer_auth("wrong")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(c.api_get("/v1/apps").status(), 200);
    // No route is a 404 with a JSON body, without any token.
    let resp = c.gw("/nothing-here");
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "no_route");
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.dir.path().join("data/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "token readable by others: {mode:o}");
}

#[test]
fn the_gateway_serves_https_with_the_certificates_it_is_given() {
    let site = tempfile::tempdir().unwrap();
    let ca = shoal_tls::Authority::load_or_create(site.path()).unwrap();
    let (cert, key) = (site.path().join("cert.pem"), site.path().join("key.pem"));
    let issued = ca
        .issue_server(&["hello.test".into()])
        .unwrap()
        .keyed_chain();
    std::fs::write(&cert, &issued.chain).unwrap();
    std::fs::write(&key, &issued.key).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let c = Cluster::start_with(&[
        "--gateway-cert",
        cert,
        "--gateway-key",
        key,
        "--apply",
        // A directory, as `apply -f` takes one: its app.toml, not its Cargo.toml.
        &format!("{}/hello", examples()),
    ]);
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    let addr: std::net::SocketAddr = c.gateway.trim_start_matches("http://").parse().unwrap();
    let https = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("hello.test", addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = https
        .get(format!("https://hello.test:{}/hello", addr.port()))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().unwrap().contains("Hello from Shoal!"));

    // Renewed in place: new files and a SIGHUP, and the next connections get the new
    // certificate (here from another CA, to tell them apart). (That files which do not load
    // leave the one in use serving is `shoal-tls`'s unit test.)
    let renewed_dir = tempfile::tempdir().unwrap();
    let renewed_ca = shoal_tls::Authority::load_or_create(renewed_dir.path()).unwrap();
    let renewed = renewed_ca
        .issue_server(&["hello.test".into()])
        .unwrap()
        .keyed_chain();
    std::fs::write(cert, &renewed.chain).unwrap();
    std::fs::write(key, &renewed.key).unwrap();
    assert_eq!(unsafe { libc::kill(c.pid() as i32, libc::SIGHUP) }, 0);
    let trusting = |ca: &str| {
        reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .resolve("hello.test", addr)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let url = format!("https://hello.test:{}/hello", addr.port());
    let new_client = trusting(renewed_ca.pem());
    assert!(
        poll(Duration::from_secs(10), || new_client
            .get(&url)
            .send()
            .is_ok_and(|r| r.status() == 200)),
        "the renewed certificate is not served"
    );
    assert!(
        trusting(ca.pem()).get(&url).send().is_err(),
        "the old one still is"
    );

    // A key that is not the certificate's: `shoal up` says so and does not start.
    let other = ca
        .issue_server(&["other.test".into()])
        .unwrap()
        .keyed_chain();
    let wrong_key = site.path().join("other-key.pem");
    std::fs::write(&wrong_key, &other.key).unwrap();
    let out = std::process::Command::new(common::SHOAL)
        .arg("up")
        .arg("--data-dir")
        .arg(site.path().join("data"))
        .args(["--api", "127.0.0.1:0", "--gateway", "127.0.0.1:0"])
        .args(["--gateway-cert", cert, "--gateway-key"])
        .arg(&wrong_key)
        .env("SHOAL_CONFIG", site.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gateway-cert") && err.contains("its key"),
        "{err}"
    );
}

#[test]
fn up_checks_the_specs_it_is_to_apply_before_it_starts() {
    // A malformed spec to apply: `shoal up` names its line and column and starts nothing,
    // rather than a cluster without the app.
    let site = tempfile::tempdir().unwrap();
    let typo = write_spec(site.path(), "typo.toml", "name = \"typo\"\nreplicas = \n");
    let data = site.path().join("typo-data");
    let mut up = std::process::Command::new(common::SHOAL)
        .arg("up")
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--api",
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:0",
            "--apply",
        ])
        .arg(&typo)
        .env("SHOAL_CONFIG", site.path().join("typo-config.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // One that started would run until stopped: it is given a while to exit, then killed.
    let exited = poll(Duration::from_secs(30), || up.try_wait().unwrap().is_some());
    if !exited {
        let _ = up.kill();
    }
    let out = up.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited, "shoal up did not exit: {err}");
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("typo.toml:2:"), "{err}");
    assert!(!data.exists(), "shoal up started: {err}");
}

#[test]
fn jobs_run_to_completion_and_keep_their_logs() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &format!("{}/greet-job/app.toml", examples())]);
    assert!(poll(Duration::from_secs(30), || {
        let r = c.api_json("/v1/replicas?app=greet-job");
        r[0]["phase"] == "Succeeded"
    }));
    let r = c.api_json("/v1/replicas?app=greet-job");
    assert_eq!(r[0]["exit_code"], 0);
    let logs = c.cli_ok(&["logs", "greet-job"]);
    assert!(logs.contains("greet-job: starting"), "{logs}");
    assert!(logs.contains("stderr"), "{logs}");

    // A failing exit code is a Failed replica with that code.
    let failing = std::fs::read_to_string(format!("{}/greet-job/app.toml", examples()))
        .unwrap()
        .replace("name = \"greet-job\"", "name = \"failing-job\"")
        .replace("../target", &format!("{}/target", examples()));
    let failing = if failing.contains("[env]") {
        failing.replace("[env]", "[env]\nEXIT_CODE = \"3\"")
    } else {
        format!("{failing}\n[env]\nEXIT_CODE = \"3\"\n")
    };
    let path = write_spec(c.dir.path(), "failing.toml", &failing);
    c.cli_ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || {
        let r = c.api_json("/v1/replicas?app=failing-job");
        r[0]["phase"] == "Failed"
    }));
    assert_eq!(
        c.api_json("/v1/replicas?app=failing-job")[0]["exit_code"],
        3
    );
}

#[test]
fn state_survives_kill_9_and_compiled_code_is_reused() {
    let mut c = Cluster::start();
    c.cli_ok(&["apply", "-f", &hello_spec()]);
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    let cache = c.dir.path().join("data/cache");
    let artifacts = |dir: &std::path::Path| -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        walk(dir)
            .into_iter()
            .map(|p| {
                let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
                (p, modified)
            })
            .collect()
    };
    let before = artifacts(&cache);
    assert!(
        !before.is_empty(),
        "no precompiled artifact in {}",
        cache.display()
    );

    c.kill_and_restart();
    // Same app, same revision, served again without a new compile artifact.
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    let apps = c.api_json("/v1/apps");
    assert_eq!(apps.as_array().unwrap().len(), 1);
    assert_eq!(apps[0]["revision"], 1);
    // The precompiled file was read, not written again.
    assert_eq!(artifacts(&cache), before);
    let out = c.cli_ok(&["apply", "-f", &hello_spec()]);
    assert!(out.contains("unchanged"), "{out}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn daemons_restart_with_backoff_and_jobs_retry_on_failure() {
    let c = Cluster::start();
    let job = std::fs::read_to_string(format!("{}/greet-job/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    // greet-job run as a daemon exits at once, so its node keeps restarting it.
    let daemon = job
        .replace("name = \"greet-job\"", "name = \"greeter\"")
        .replace("kind = \"job\"", "kind = \"daemon\"");
    let path = write_spec(c.dir.path(), "daemon.toml", &daemon);
    // Timed from before the apply, not from when a poll saw restart 1, which a busy machine
    // can delay by more than a poll: the span then holds all of the backoff between restarts
    // 1 and 4, 100 + 200 + 400 ms.
    let first = std::time::Instant::now();
    c.cli_ok(&["apply", "-f", path.to_str().unwrap()]);
    let restarts = || {
        c.api_json("/v1/replicas?app=greeter")
            .get(0)
            .and_then(|r| r["restarts"].as_u64())
            .unwrap_or(0)
    };
    assert!(poll(Duration::from_secs(20), || restarts() >= 1));
    assert!(poll(Duration::from_secs(20), || restarts() >= 4));
    assert!(
        first.elapsed() >= Duration::from_millis(700),
        "{:?}",
        first.elapsed()
    );
    let r = &c.api_json("/v1/replicas?app=greeter")[0];
    assert!(
        r["phase"] == "CrashLoopBackOff" || r["phase"] == "Running",
        "{r}"
    );
    let describe = c.cli_ok(&["describe", "app", "greeter"]);
    assert!(describe.contains("BackOff"), "{describe}");

    // A job that fails is retried as its policy says, then fails for good.
    let failing = format!(
        "{}\n[job]\nrestart = \"on-failure\"\nretries = 2\n",
        job.replace("name = \"greet-job\"", "name = \"retrier\"")
            .replace("[env]", "[env]\nEXIT_CODE = \"3\"")
    );
    let path = write_spec(c.dir.path(), "retrier.toml", &failing);
    c.cli_ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(20), || {
        c.api_json("/v1/replicas?app=retrier")[0]["phase"] == "Failed"
    }));
    let r = &c.api_json("/v1/replicas?app=retrier")[0];
    assert_eq!(r["restarts"], 2, "{r}");
    assert_eq!(r["exit_code"], 3, "{r}");
    let logs = c.cli_ok(&["logs", "retrier"]);
    assert_eq!(logs.matches("greet-job: starting").count(), 3, "{logs}");
    // Each run's end is said once.
    assert_eq!(logs.matches("exited with code 3").count(), 3, "{logs}");
}

fn faulty_with(dir: &std::path::Path, file: &str, healthz: u16, health: &str) -> String {
    common::faulty_spec(
        dir,
        file,
        1,
        &format!("[env]\nHEALTHZ_STATUS = \"{healthz}\"\n{health}"),
    )
}

const READINESS: &str =
    "[health.readiness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";

#[test]
fn readiness_gates_traffic_and_a_bad_revision_never_takes_it() {
    let c = Cluster::start();
    // Failing readiness: the replica runs but gets no traffic, and says what the probe got.
    c.cli_ok(&[
        "apply",
        "-f",
        &faulty_with(c.dir.path(), "bad.toml", 503, READINESS),
    ]);
    assert!(
        poll(Duration::from_secs(20), || {
            c.api_json("/v1/replicas?app=faulty")
                .get(0)
                .is_some_and(|r| {
                    r["message"].as_str().is_some_and(|m| {
                        m.contains("readiness probe") && m.contains("answered 503")
                    })
                })
        }),
        "{}",
        c.api_json("/v1/replicas?app=faulty")
    );
    let resp = c.gw("/faulty/");
    assert_eq!(resp.status(), 503);

    // A healthy revision becomes Ready and serves.
    c.cli_ok(&[
        "apply",
        "-f",
        &faulty_with(c.dir.path(), "good.toml", 200, READINESS),
    ]);
    c.wait_gw("/faulty/", 200, "ok");

    // Under constant load, a revision failing readiness never receives a request
    // and the good one keeps serving.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gw = c.gateway.clone();
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let http = common::client();
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.get(format!("{gw}/faulty/")).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    c.cli_ok(&[
        "apply",
        "-f",
        &faulty_with(c.dir.path(), "bad2.toml", 503, READINESS),
    ]);
    assert!(poll(Duration::from_secs(20), || {
        let rs = c.api_json("/v1/replicas?app=faulty");
        rs.as_array().unwrap().iter().any(|r| {
            r["revision"] == 3
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("readiness"))
        })
    }));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "{failed} failed of {}", ok + failed);
    let rs = c.api_json("/v1/replicas?app=faulty");
    assert!(
        rs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["revision"] == 2 && r["phase"] == "Ready"),
        "{rs}"
    );
}

#[test]
fn a_replica_failing_liveness_is_restarted() {
    let c = Cluster::start();
    let liveness =
        "[health.liveness]\npath = \"/healthz\"\nperiod = \"100ms\"\nfailure_threshold = 2\n";
    c.cli_ok(&[
        "apply",
        "-f",
        &faulty_with(c.dir.path(), "sick.toml", 500, liveness),
    ]);
    assert!(poll(Duration::from_secs(20), || {
        c.api_json("/v1/replicas?app=faulty")
            .get(0)
            .and_then(|r| r["restarts"].as_u64())
            .is_some_and(|n| n >= 2)
    }));
    let describe = c.cli_ok(&["describe", "app", "faulty"]);
    assert!(
        describe.contains("Restarted") && describe.contains("liveness"),
        "{describe}"
    );
    let logs = c.cli_ok(&["logs", "faulty"]);
    assert!(logs.contains("liveness probe failed"), "{logs}");
}

#[test]
fn scale_sets_the_replica_count_until_the_next_apply() {
    let c = Cluster::start();
    let spec = hello_spec();
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    let ready = |n: usize| {
        poll(Duration::from_secs(20), || {
            let replicas = c.api_json("/v1/replicas?app=hello");
            let list = replicas.as_array().unwrap();
            list.len() == n && list.iter().all(|r| r["phase"] == "Ready")
        })
    };

    let out = c.cli_ok(&["scale", "hello", "--replicas", "3"]);
    assert!(
        out.contains("app default/hello scaled to 3 replicas"),
        "{out}"
    );
    assert!(ready(3), "{}", c.api_json("/v1/replicas?app=hello"));
    let described = c.api_json("/v1/apps/hello");
    assert_eq!(
        described["revisions"].as_array().unwrap().len(),
        1,
        "scale makes no revision: {described}"
    );
    let events = c.cli_ok(&["events", "--app", "hello"]);
    assert!(events.contains("scaled from 1 to 3 replicas"), "{events}");

    // To zero: nothing runs, the route answers 503; the file's count comes back on apply.
    c.cli_ok(&["scale", "hello", "--replicas", "0"]);
    assert!(ready(0));
    assert_eq!(c.gw("/hello").status(), 503);
    c.cli_ok(&["apply", "-f", &spec]);
    assert!(ready(1));

    let err = c.cli_err(&["scale", "ghost", "--replicas", "2"]);
    assert!(err.contains("app default/ghost does not exist"), "{err}");
}

/// Draining the one node leaves its replicas nowhere to go: they keep serving (new before
/// old), and the replacement waits, saying why.
#[test]
fn draining_the_only_node_keeps_its_replicas_serving() {
    let c = Cluster::start();
    let text = std::fs::read_to_string(hello_spec())
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", "replicas = 2");
    let spec = write_spec(c.dir.path(), "hello.toml", &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    assert!(poll(Duration::from_secs(30), || c
        .cli_ok(&["get", "apps"])
        .contains("2/2")));
    // Waiting for the drain gives up, saying why.
    let waited = c.cli(&["node", "drain", "node-1", "--wait", "--timeout", "2s"]);
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    let said = String::from_utf8_lossy(&waited.stderr);
    assert!(said.contains("still runs 2 replicas after 2s"), "{said}");
    // The replacement was tried, and fits nowhere.
    let mut replicas = String::new();
    assert!(
        poll(Duration::from_secs(20), || {
            replicas = c.cli_ok(&["get", "replicas"]);
            replicas.contains("cordoned")
        }),
        "{replicas}"
    );
    // Pass after pass, both old ones stay Ready and serve.
    for _ in 0..20 {
        let replicas = c.api_json("/v1/replicas?app=hello");
        let ready = replicas
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["phase"] == "Ready")
            .count();
        assert_eq!(ready, 2, "{replicas:#}");
        assert_eq!(c.gw("/hello").status(), 200);
    }
}

/// Namespaces are tenants on the network too: an app is called by name only by its
/// namespace's apps, unless its `[network] inbound` names others; changing who may call
/// makes no revision.
#[test]
fn an_app_is_called_from_another_namespace_only_if_it_says_so() {
    let c = Cluster::start();
    let read = |name: &str| {
        std::fs::read_to_string(format!("{}/{name}/app.toml", examples()))
            .unwrap()
            .replace("../target", &format!("{}/target", examples()))
    };
    let backend = format!(
        "namespace = \"data\"\n{}",
        read("backend").replace("routes = [\"/backend\"]", "routes = []")
    );
    let frontend = format!(
        "namespace = \"shop\"\n{}",
        read("frontend")
            .replace("replicas = 2", "replicas = 1")
            .replace("BACKEND = \"backend\"", "BACKEND = \"backend.data\"")
    );
    let backend_spec = write_spec(c.dir.path(), "backend.toml", &backend);
    let frontend_spec = write_spec(c.dir.path(), "frontend.toml", &frontend);
    c.cli_ok(&["apply", "-f", backend_spec.to_str().unwrap()]);
    c.cli_ok(&["apply", "-f", frontend_spec.to_str().unwrap()]);
    let ready = |ns: &str, app: &str, n: usize| {
        poll(Duration::from_secs(20), || {
            let list = c.api_json(&format!("/v1/replicas?namespace={ns}&app={app}"));
            let list = list.as_array().unwrap().clone();
            list.len() == n && list.iter().all(|r| r["phase"] == "Ready")
        })
    };
    assert!(ready("data", "backend", 2) && ready("shop", "frontend", 1));
    let refused = c.wait_gw("/frontend", 502, "frontend -> error");
    assert!(refused.to_lowercase().contains("denied"), "{refused}");
    // The caller's logs say which app refused it, and why.
    let said = "app backend.data's [network] inbound does not admit frontend.shop";
    assert!(
        poll(Duration::from_secs(10), || c
            .cli_ok(&["logs", "frontend", "-n", "shop"])
            .contains(said)),
        "{}",
        c.cli_ok(&["logs", "frontend", "-n", "shop"])
    );
    let services = c.cli_ok(&["get", "services", "-n", "data"]);
    assert!(
        services.contains("CALLERS") && services.contains("*.data"),
        "{services}"
    );

    let consenting = format!("{backend}\n[network]\ninbound = [\"frontend.shop\"]\n");
    std::fs::write(&backend_spec, consenting).unwrap();
    c.cli_ok(&["apply", "-f", backend_spec.to_str().unwrap()]);
    c.wait_gw("/frontend", 200, "frontend -> 200 Hello from the backend!");
    let services = c.cli_ok(&["get", "services", "-n", "data"]);
    assert!(services.contains("frontend.shop"), "{services}");
    let described = c.cli_ok(&["describe", "app", "backend", "-n", "data"]);
    assert!(
        described.contains("Callers:      frontend.shop"),
        "{described}"
    );
    let described = c.api_json("/v1/apps/backend?namespace=data");
    assert_eq!(
        described["revisions"].as_array().unwrap().len(),
        1,
        "who may call is no revision: {described}"
    );
}

#[test]
fn readiness_probes_read_the_whole_answer() {
    // A probe that dropped the answer unread broke off the guest's writing of it, which the
    // guest logged as a failure of its own: a stream of false errors in a healthy app's logs.
    let c = Cluster::start();
    let text = std::fs::read_to_string(hello_spec())
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let text = format!("{text}\n[health.readiness]\npath = \"/hello\"\nperiod = \"100ms\"\n");
    let spec = write_spec(c.dir.path(), "probed.toml", &text);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    // Some fifty probes' worth: none may say its answer was cut off.
    let cut = poll(Duration::from_secs(5), || {
        c.cli_ok(&["logs", "hello"])
            .contains("writing the response")
    });
    assert!(!cut, "{}", c.cli_ok(&["logs", "hello"]));
}
