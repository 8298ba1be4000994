//! Elasticity end to end on real processes: autoscaling on load, scale to zero and
//! back through a gateway, scheduled windows with a seconds-resolution cron, and
//! thousands of apps on one default node.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

fn reasons(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}: {}", e["reason"].as_str().unwrap(), e["message"]))
        .collect()
}

#[test]
fn load_scales_an_app_up_and_its_end_scales_it_down() {
    let c = Cluster::start();
    let spec = faulty_scaled(
        c.dir.path(),
        "[scale]\nmin = 1\nmax = 3\ntarget_concurrency = 1\nwindow = \"2s\"\n",
    );
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty/status/200", 200, "");

    // Four clients each keep a slow request in flight: four per replica's one.
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(format!("{}/faulty/sleep/200", c.gateway)))
        .collect();
    let mut last = Value::Null;
    let up = poll(Duration::from_secs(40), || {
        last = app_row(&c.api_json("/v1/apps"), "faulty");
        last["desired"] == 3 && last["ready"] == 3
    });
    let results: Vec<LoadResult> = loads.into_iter().map(Load::stop).collect();
    assert!(up, "never scaled to 3 ready replicas under load: {last}");
    assert_eq!(last["autoscale"]["min"], 1, "{last}");
    assert_eq!(last["autoscale"]["max"], 3, "{last}");
    let failed: usize = results.iter().map(|r| r.failed).sum();
    assert_eq!(
        failed,
        0,
        "{:?}",
        results.iter().map(|r| &r.failures).collect::<Vec<_>>()
    );

    // No load: back to min once a window without it has passed.
    let down = poll(Duration::from_secs(40), || {
        last = app_row(&c.api_json("/v1/apps"), "faulty");
        last["desired"] == 1
    });
    assert!(down, "never scaled back down: {last}");
    let events = reasons(&c.api_json("/v1/apps/faulty")["events"]);
    assert!(
        events.iter().any(|e| e.starts_with("ScaledUp")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("ScaledDown")),
        "{events:?}"
    );
    let get = c.cli_ok(&["get", "apps"]);
    assert!(get.contains("1-3"), "{get}");
    // Its guests' CPU beside what it requested, from the node's reports.
    let text = c.cli_ok(&["describe", "app", "faulty"]);
    assert!(text.contains("m requested"), "{text}");
    assert!(c.api_json("/v1/apps/faulty")["cpu"]["used_millis"].is_u64());
}

/// Waits until app faulty wants no replica and has none left that has not finished.
fn at_zero(server: &Server) {
    let mut last = Value::Null;
    let zero = poll(Duration::from_secs(30), || {
        last = app_row(&server.api_json("/v1/apps"), "faulty");
        let active = server
            .replicas("faulty")
            .iter()
            .filter(|r| r["phase"] != "Succeeded" && r["phase"] != "Failed")
            .count();
        last["desired"] == 0 && active == 0
    });
    assert!(zero, "never scaled to zero: {last}");
}

/// A request through the API's proxy (`shoal port-forward`) wakes an app at zero as one at
/// a gateway does: the node it goes to holds it while a replica starts.
#[test]
fn a_request_through_the_api_proxy_wakes_an_app_at_zero() {
    let (dir, server, _nodes) = cluster(1, &[]);
    let spec = faulty_scaled(
        dir.path(),
        "[scale]\nmin = 0\nmax = 2\nidle = \"1s\"\nwindow = \"1s\"\n",
    );
    server.cli_ok(&["apply", "-f", &spec]);
    let proxied = |path: &str| {
        let resp = server
            .http()
            .get(format!(
                "{}/v1/namespaces/default/apps/faulty/proxy/{path}",
                server.api
            ))
            .bearer_auth(&server.token)
            .send()
            .expect("proxied");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    assert!(
        poll(Duration::from_secs(30), || proxied("status/200").0 == 200),
        "never served: {:?}",
        proxied("status/200")
    );
    at_zero(&server);

    let (status, body) = proxied("status/200");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        app_row(&server.api_json("/v1/apps"), "faulty")["desired"],
        1
    );
}

#[test]
fn an_idle_app_goes_to_zero_and_a_request_at_another_node_wakes_it() {
    let (dir, mut server, nodes) = cluster(2, &[]);
    let spec = faulty_scaled(
        dir.path(),
        "[scale]\nmin = 0\nmax = 2\nidle = \"1s\"\nwindow = \"1s\"\n",
    );
    server.cli_ok(&["apply", "-f", &spec]);
    // It starts with one replica, serving.
    assert!(
        poll(Duration::from_secs(30), || nodes[0]
            .get("/faulty/status/200")
            .is_ok_and(|(s, _)| s == 200)),
        "never served"
    );
    // Idle: no replica left anywhere.
    at_zero(&server);

    // A request at either node is held while a replica starts, then answered.
    let (status, body) = nodes[1].get("/faulty/status/200").expect("answered");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        app_row(&server.api_json("/v1/apps"), "faulty")["desired"],
        1
    );
    let events = reasons(&server.api_json("/v1/apps/faulty")["events"]);
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("ScaledDown") && e.contains("idle")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("ScaledUp") && e.contains("0 → 1")),
        "{events:?}"
    );

    // A request held while the control plane is down, which the node could not report, still
    // wakes the app once it is back (it forgot every count): held ones are reported again.
    at_zero(&server);
    server.kill();
    let held = std::thread::spawn({
        let node = nodes[1].gateway.clone();
        move || {
            // Longer than the gateway holds it (30 s): a slow wake shows as its 503.
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let answer = client.get(format!("{node}/faulty/status/200")).send();
            answer
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        }
    });
    server.restart();
    assert_eq!(held.join().unwrap(), Ok(200));
}

#[test]
fn a_schedule_window_resizes_an_app_while_it_is_open() {
    let c = Cluster::start();
    // Opens at every third of a minute, for 8 s: seen within 20 s, whenever the test runs.
    let spec = faulty_scaled(
        c.dir.path(),
        "[scale]\nreplicas = 1\n\n[[scale.schedule]]\nname = \"burst\"\ncron = \"*/20 * * * * *\"\nduration = \"8s\"\nreplicas = 2\n",
    );
    c.cli_ok(&["apply", "-f", &spec]);
    let mut last = Value::Null;
    let opened = poll(Duration::from_secs(30), || {
        last = app_row(&c.api_json("/v1/apps"), "faulty");
        last["desired"] == 2 && last["ready"] == 2 && last["windows"][0] == "burst"
    });
    assert!(opened, "the window never took effect: {last}");
    let closed = poll(Duration::from_secs(30), || {
        last = app_row(&c.api_json("/v1/apps"), "faulty");
        last["desired"] == 1 && last["ready"] == 1
    });
    assert!(closed, "the window never closed: {last}");
    let describe = c.api_json("/v1/apps/faulty");
    // The user's own size is untouched by the window.
    assert_eq!(describe["app"]["spec"]["replicas"], 1);
    let events = reasons(&describe["events"]);
    assert!(
        events.iter().any(|e| e.starts_with("WindowOpened")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("WindowClosed")),
        "{events:?}"
    );
    let text = c.cli_ok(&["describe", "app", "faulty"]);
    assert!(
        text.contains("burst: \"*/20 * * * * *\" UTC for 8s: replicas 2"),
        "{text}"
    );
}

#[test]
fn bad_scale_specs_are_refused_with_their_place() {
    let c = Cluster::start();
    let spec = faulty_scaled(c.dir.path(), "[scale]\nmin = 3\nmax = 2\n");
    let err = c.cli_err(&["apply", "-f", &spec]);
    assert!(
        err.contains("faulty.toml:13:7: scale.min: min (3) is more than max (2)"),
        "{err}"
    );
    let spec = faulty_scaled(
        c.dir.path(),
        "[[scale.schedule]]\ncron = \"0 9 * * *\"\ntimezone = \"Mars/Olympus\"\nduration = \"1h\"\nreplicas = 2\n",
    );
    let err = c.cli_err(&["apply", "-f", &spec]);
    assert!(err.contains("unknown time zone \"Mars/Olympus\""), "{err}");
    // A manual size is for apps that are not autoscaled.
    let spec = faulty_scaled(c.dir.path(), "[scale]\nmin = 1\nmax = 2\n");
    c.cli_ok(&["apply", "-f", &spec]);
    let err = c.cli_err(&["scale", "faulty", "--replicas", "5"]);
    assert!(err.contains("autoscaled between 1 and 2"), "{err}");
}
