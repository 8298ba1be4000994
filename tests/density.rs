//! Density: thousands of small apps on one `shoal up` with default flags, all serving.
//! A replica reserves its requests only (1Mi of memory by default, no cpu), and an idle
//! one holds no instance slot, so the node's defaults are no limit here.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const APPS: usize = 2_000;

#[test]
fn two_thousand_apps_on_one_default_node_all_serve() {
    let c = Cluster::start();
    let hello = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        // Default resources: what a user who writes none gets.
        .replace(
            "limits = { memory = \"32Mi\" }\nrequests = { cpu = \"50m\" }\n",
            "",
        );
    let spec = write_spec(c.dir.path(), "hello.toml", &hello);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let base: Value = c.api_json("/v1/apps/hello")["app"]["spec"].clone();
    assert_eq!(base["resources"]["requests"]["cpu_millis"], 0, "{base}");

    // The rest through the API, as a deploy tool would.
    let started = Instant::now();
    apply_copies(&c, &base, "h", 1..APPS);
    let applied = started.elapsed();

    let mut ready = 0;
    let all = poll(Duration::from_secs(180), || {
        let apps = c.api_json("/v1/apps");
        ready = apps
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["ready"] == 1)
            .count();
        ready == APPS
    });
    assert!(
        all,
        "{ready} of {APPS} apps ready after {:?}",
        started.elapsed()
    );
    eprintln!(
        "{APPS} apps applied in {applied:?}, all ready after {:?}",
        started.elapsed()
    );

    // Every one of them answers.
    let http = client();
    for i in 1..APPS {
        let resp = http
            .get(format!("{}/h/{i}", c.gateway))
            .send()
            .expect("gateway request");
        assert_eq!(
            resp.status(),
            200,
            "hello-{i}: {}",
            resp.text().unwrap_or_default()
        );
    }
}
