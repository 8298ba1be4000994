//! A WASIp3 component (`examples/hello-p3`) end to end on a real `shoal up`: applied from its
//! example spec, served through the gateway with its instances reused, several requests at
//! once in one instance, and a trap failing only what that instance had in flight. (Timeouts
//! and concurrency limits are tested on the runtime itself: `crates/runtime/tests/p3.rs`.)

mod common;

use common::{Cluster, examples, write_spec};

fn hello_p3(c: &Cluster) -> String {
    let text = std::fs::read_to_string(format!("{}/hello-p3/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(c.config().parent().unwrap(), "hello-p3.toml", &text);
    spec.to_str().unwrap().to_string()
}

fn count(c: &Cluster) -> u64 {
    let resp = c.gw("/hello-p3/count");
    assert_eq!(resp.status(), 200);
    resp.text().unwrap().trim().parse().expect("a count")
}

#[test]
fn a_p3_app_serves_through_the_gateway_with_reused_instances() {
    let c = Cluster::start();
    c.cli_ok(&["apply", "-f", &hello_p3(&c)]);
    c.wait_gw("/hello-p3/hi", 200, "hello from p3 /hi");

    // One client, one request at a time: the example reuses each instance for 128 requests.
    let counts: Vec<u64> = (0..10).map(|_| count(&c)).collect();
    assert!(
        counts.iter().any(|n| *n > 1),
        "instances were reused: {counts:?}"
    );

    // Requests that wait inside the guest overlap: ten 300 ms sleeps at once.
    let sleepers: Vec<_> = (0..10)
        .map(|_| {
            let url = format!("{}/hello-p3/sleep?ms=300", c.gateway);
            std::thread::spawn(move || reqwest::blocking::get(url).unwrap().text().unwrap())
        })
        .collect();
    for sleeper in sleepers {
        assert_eq!(sleeper.join().unwrap(), "slept 300 ms\n");
    }

    // A trap fails its request; the app keeps serving from a fresh instance.
    assert_eq!(c.gw("/hello-p3/panic").status(), 500);
    assert!(count(&c) >= 1);
    let out = c.cli_ok(&["describe", "app", "hello-p3"]);
    assert!(
        out.contains("Reuse:        128 requests per instance, idle up to 10000 ms, 16 at once"),
        "{out}"
    );
    assert!(
        out.contains("Kind:         http (wasi:http/service, WASIp3)"),
        "{out}"
    );

    // A writable volume is WASIp2's only: refused at apply (its replicas could only fail),
    // and no volume is made for it.
    let text = std::fs::read_to_string(hello_p3(&c))
        .unwrap()
        .replace("name = \"hello-p3\"", "name = \"p3-writer\"")
        .replace("routes = [\"/hello-p3\"]", "routes = [\"/p3-writer\"]");
    let text =
        format!("{text}\n[[volumes]]\nname = \"scratch\"\nmount = \"/data\"\nsize = \"1Mi\"\n");
    let writer = write_spec(c.config().parent().unwrap(), "p3-writer.toml", &text);
    let out = c.cli(&["apply", "-f", writer.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("volume scratch is writable") && err.contains("read_only = true"),
        "{err}"
    );
    assert_eq!(c.api_json("/v1/volumes"), serde_json::json!([]));
}
