//! Jobs end to end on real processes: runs fired by a seconds-resolution
//! schedule, history trimmed to its limits, `shoal job run` starting one now,
//! `shoal get jobs` showing them, and each kept run's output readable.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The `greet-job` example named `name`, with `job` as its `[job]` section;
/// returns the spec's path.
fn job_spec(dir: &Path, name: &str, job: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/greet-job/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("name = \"greet-job\"", &format!("name = \"{name}\""));
    write_spec(
        dir,
        &format!("{name}.toml"),
        &format!("{text}\n[job]\n{job}\n"),
    )
    .to_str()
    .unwrap()
    .to_string()
}

/// `shoal job run once`: the run it started.
fn run_once(c: &Cluster) -> String {
    let out = c.cli_ok(&["job", "run", "once"]);
    out.trim()
        .strip_prefix("job default/once: run ")
        .and_then(|s| s.strip_suffix(" started"))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

fn replicas(c: &Cluster, app: &str) -> Vec<Value> {
    c.api_json(&format!("/v1/replicas?app={app}"))
        .as_array()
        .unwrap()
        .clone()
}

fn phases(replicas: &[Value], phase: &str) -> usize {
    replicas.iter().filter(|r| r["phase"] == phase).count()
}

/// Messages of `app`'s events with this reason, oldest first.
fn events(c: &Cluster, app: &str, reason: &str) -> Vec<String> {
    c.api_json(&format!("/v1/events?app={app}&limit=1000"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

/// `app`'s row of `shoal get jobs -o json`.
fn job_row(c: &Cluster, app: &str) -> Value {
    let jobs: Value = serde_json::from_str(&c.cli_ok(&["get", "jobs", "-o", "json"])).unwrap();
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == app)
        .cloned()
        .unwrap_or_else(|| panic!("{app} is not in {jobs}"))
}

#[test]
fn scheduled_runs_fire_repeatedly_and_keep_only_their_history() {
    let c = Cluster::start();
    let spec = job_spec(
        c.dir.path(),
        "tick",
        "schedule = \"*/2 * * * * *\"\nhistory = { succeeded = 2, failed = 1 }",
    );
    c.cli_ok(&["apply", "-f", &spec]);

    // A run every two seconds; the finished ones beyond two are deleted.
    let mut last = String::new();
    let trimmed = poll(Duration::from_secs(60), || {
        let started = events(&c, "tick", "JobStarted").len();
        let rs = replicas(&c, "tick");
        last = format!("{started} started, replicas: {rs:?}");
        started >= 4 && phases(&rs, "Succeeded") == 2 && rs.len() <= 3
    });
    assert!(trimmed, "{last}");
    // Each run is for its own firing, on an even second.
    let mut firings: Vec<u64> = replicas(&c, "tick")
        .iter()
        .map(|r| r["scheduled_at"].as_u64().expect("a run has its firing"))
        .collect();
    firings.sort();
    let runs = firings.len();
    firings.dedup();
    assert_eq!(firings.len(), runs, "one run per firing");
    assert!(firings.iter().all(|t| t % 2_000 == 0), "{firings:?}");
    let started = events(&c, "tick", "JobStarted");
    assert!(
        started[0].contains("started for the firing at ") && started[0].ends_with(" UTC"),
        "{started:?}"
    );

    // `shoal get jobs` shows the schedule, the last run and the next firing.
    let table = c.cli_ok(&["get", "jobs"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("tick"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("*/2 * * * * * (UTC)"), "{table}");
    assert!(line.contains(" ago)") && line.contains("in "), "{table}");
    let row = job_row(&c, "tick");
    assert_eq!(row["timezone"], "UTC", "{row}");
    assert_eq!(row["concurrency"], "allow", "{row}");
    let next = row["next"].as_u64().unwrap();
    assert_eq!(next % 2_000, 0, "{row}");
    assert!(row["last_run"]["replica"].is_string(), "{row}");

    // A finished run's output stays readable by its replica, until the
    // history lets it go (so ask again if it went meanwhile).
    let mut last = String::new();
    let read = poll(Duration::from_secs(30), || {
        let rs = replicas(&c, "tick");
        let Some(done) = rs
            .iter()
            .filter(|r| r["phase"] == "Succeeded")
            .max_by_key(|r| r["created_at"].as_u64())
        else {
            return false;
        };
        let id = done["id"].as_str().unwrap();
        let out = c.cli(&["logs", "tick", "--replica", id]);
        last = String::from_utf8_lossy(&out.stdout).to_string();
        out.status.success()
            && last.contains("greet-job: done")
            && last.lines().all(|l| l.starts_with(id))
    });
    assert!(read, "{last}");
}

#[test]
fn a_run_by_hand_starts_now_beside_the_jobs_own_and_both_keep_their_output() {
    let c = Cluster::start();
    // Unscheduled: the job runs once for its revision.
    c.cli_ok(&["apply", "-f", &job_spec(c.dir.path(), "once", "")]);
    assert!(poll(Duration::from_secs(30), || {
        phases(&replicas(&c, "once"), "Succeeded") == 1
    }));
    let first = replicas(&c, "once")[0]["id"].as_str().unwrap().to_string();
    // Finished, it wants nothing running: not 0 of 1 ready, as if it were failing.
    let apps: Value = serde_json::from_str(&c.cli_ok(&["get", "apps", "-o", "json"])).unwrap();
    let row = apps
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "once");
    let row = row.unwrap_or_else(|| panic!("{apps}"));
    assert_eq!(
        (&row["ready"], &row["desired"]),
        (&0.into(), &0.into()),
        "{row}"
    );
    // A job has no rollout to pause, resume or restart: refused, saying why.
    for action in ["pause", "resume", "restart"] {
        let out = c.cli(&["rollout", action, "once"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{action}: {stderr}");
        assert!(stderr.contains("is a job"), "{action}: {stderr}");
    }

    let id = run_once(&c);
    assert_ne!(id, first);
    // Both runs finish and stay: the run by hand is not counted as a replica.
    let mut last = Vec::new();
    let both = poll(Duration::from_secs(30), || {
        last = replicas(&c, "once");
        last.len() == 2 && phases(&last, "Succeeded") == 2
    });
    assert!(both, "{last:?}");
    let started = events(&c, "once", "JobStarted");
    assert_eq!(
        started,
        [format!("run {id} started by `shoal job run`")],
        "{started:?}"
    );
    let logs = c.cli_ok(&["logs", "once", "--replica", &id]);
    assert!(logs.contains("greet-job: done"), "{logs}");
    assert!(!logs.contains(&first), "only the run asked for: {logs}");
    let all = c.cli_ok(&["logs", "once"]);
    assert!(all.contains(&first) && all.contains(&id), "{all}");
    let err = c.cli_err(&["logs", "once", "--replica", "once-1-nope"]);
    assert!(err.contains("no replica once-1-nope"), "{err}");

    // Followed with every run finished: the follow waits for the next run, shows it, and
    // ends with it.
    let mut follow = common::Killed::new(
        std::process::Command::new(common::SHOAL)
            .args(["logs", "once", "-f"])
            .env("SHOAL_CONFIG", c.config())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = common::read_lines(&mut follow);
    let said = |what: &str, id: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(id) && line.contains(what) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    assert!(said("greet-job: done", &id), "the runs so far");
    // Three of its relists (one a second) with no run going: it must not end.
    let quiet = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < quiet {
        assert_eq!(follow.try_wait().unwrap(), None, "the follow ended");
        let _ = lines.recv_timeout(Duration::from_millis(100));
    }
    let next = run_once(&c);
    assert!(
        said("greet-job: done", &next),
        "the follow missed run {next}"
    );
    assert!(
        poll(Duration::from_secs(30), || follow
            .try_wait()
            .unwrap()
            .is_some_and(|s| s.success())),
        "the follow did not end with the run"
    );

    // A schedule that fires at 03:00 in Seoul waits for it, but runs by hand now.
    let nightly = job_spec(
        c.dir.path(),
        "nightly",
        "schedule = \"0 3 * * *\"\ntimezone = \"Asia/Seoul\"\nconcurrency = \"forbid\"",
    );
    c.cli_ok(&["apply", "-f", &nightly]);
    let row = job_row(&c, "nightly");
    assert!(row["last_run"].is_null(), "{row}");
    assert_eq!(row["next"].as_u64().unwrap() % 86_400_000, 18 * 3_600_000);
    let out = c.cli_ok(&["job", "run", "nightly"]);
    assert!(out.contains(" started"), "{out}");
    assert!(poll(Duration::from_secs(30), || {
        job_row(&c, "nightly")["last_run"]["phase"] == "Succeeded"
    }));
    // The apply started nothing: the one run is the one asked for.
    assert_eq!(replicas(&c, "nightly").len(), 1);

    let err = c.cli_err(&["job", "run", "ghost"]);
    assert!(err.contains("does not exist"), "{err}");

    // --wait follows the run to its end and exits by it: a CI step that runs a migration.
    let out = c.cli_ok(&["job", "run", "once", "--wait", "--timeout", "60s"]);
    assert!(out.contains("succeeded, exit code 0"), "{out}");
    let failing = std::fs::read_to_string(job_spec(c.dir.path(), "failing", "restart = \"never\""))
        .unwrap()
        .replace("NAME = \"Shoal\"", "NAME = \"Shoal\"\nEXIT_CODE = \"3\"");
    let failing = write_spec(c.dir.path(), "failing.toml", &failing);
    c.cli_ok(&["apply", "-f", failing.to_str().unwrap()]);
    let out = c.cli(&["job", "run", "failing", "--wait", "--timeout", "60s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed, exit code 3"), "{err}");
}
