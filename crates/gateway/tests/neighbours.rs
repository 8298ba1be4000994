//! Noisy neighbours: an app whose requests spin keeps them in flight, and another app on the
//! same node still answers promptly, over real HTTP through the gateway. Guests run on the
//! runtime's own threads, short requests first (long ones move to lower-priority threads), so
//! neither the gateway's I/O nor the quiet app's turn waits behind the spinning guests.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use shoal_core::Route;
use shoal_gateway::{Endpoint, Gateway, GatewayConfig};
use shoal_runtime::{CpuShare, InstanceConfig, Runtime};

const SPINNERS: usize = 6;

fn used_ns(runtime: &Runtime, group: &str) -> u64 {
    runtime
        .cpu_usage()
        .into_iter()
        .find(|(g, _)| g.as_ref() == group)
        .map_or(0, |(_, usage)| usage.used_ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_app_answers_while_its_neighbour_spins() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    gateway.set_routes(vec![
        (Route::parse("/faulty").unwrap(), app("faulty")),
        (Route::parse("/hello").unwrap(), app("hello")),
    ]);
    // Both ask for the same share, as the examples' specs do.
    let faulty = InstanceConfig {
        timeout: Some(Duration::from_secs(6)),
        cpu: CpuShare::new("default/faulty", 50),
        ..instance(&[])
    };
    let faulty = service(&runtime, shoal_fixtures::FAULTY_WASM, faulty).await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local("faulty-1".into(), 1, faulty, SPINNERS as u32),
    );
    let hello = InstanceConfig {
        cpu: CpuShare::new("default/hello", 50),
        ..instance(&[("GREETING", "hi")])
    };
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, hello).await;
    gateway.add_endpoint(
        app("hello"),
        Endpoint::local("hello-1".into(), 1, hello, 64),
    );
    let addr = serve(&gateway).await;
    let client = HttpClient::new();

    let spinning: Vec<_> = (0..SPINNERS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get(&format!("http://{addr}/faulty/loop")).await })
        })
        .collect();
    let key = app("faulty");
    eventually(
        Duration::from_secs(10),
        "every spinner is in flight",
        || {
            gateway
                .endpoint_status(&key)
                .iter()
                .map(|e| e.inflight)
                .sum::<usize>()
                == SPINNERS
        },
    )
    .await;
    eventually(Duration::from_secs(10), "the spinners burn CPU", || {
        used_ns(&runtime, "default/faulty") > 100_000_000
    })
    .await;

    let mut latencies = Vec::new();
    for _ in 0..50 {
        let sent = Instant::now();
        let reply = client.get(&format!("http://{addr}/hello")).await;
        latencies.push(sent.elapsed());
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "hi\n");
    }
    assert!(
        spinning.iter().all(|s| !s.is_finished()),
        "the neighbour spun through every hello request"
    );
    latencies.sort();
    let (median, p99) = (latencies[25], latencies[49]);
    // Alone, hello answers in a millisecond or two; generous, as tests share 2 cores.
    assert!(
        median < Duration::from_millis(100),
        "median {median:?}, p99 {p99:?}"
    );
    assert!(
        p99 < Duration::from_secs(1),
        "median {median:?}, p99 {p99:?}"
    );

    // Short requests go first: hello never waited for its share, however far ahead of the
    // spinners its CPU was.
    let usage = runtime.cpu_usage();
    let hello = usage
        .iter()
        .find(|(g, _)| g.as_ref() == "default/hello")
        .map(|(_, u)| *u)
        .expect("hello's group");
    assert_eq!(hello.throttled_ns, 0, "{usage:?}");

    for spinner in spinning {
        assert_eq!(spinner.await.unwrap().status, StatusCode::GATEWAY_TIMEOUT);
    }
}
