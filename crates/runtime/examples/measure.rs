//! Measures the numbers the runtime is judged by: compiling `hello`, loading it back from the
//! disk cache, and per-request latency of `HttpService::handle`.
//!
//! `cargo run --release -p shoal-runtime --example measure`

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use shoal_runtime::{InstanceConfig, LogSink, Runtime, RuntimeConfig};

const SEQUENTIAL: usize = 1000;
const CONCURRENT_TASKS: usize = 16;
const CONCURRENT_REQUESTS: usize = 20_000;

fn request() -> http::Request<Empty<Bytes>> {
    http::Request::get("/hello")
        .header("host", "bench.local")
        .body(Empty::new())
        .expect("valid request")
}

async fn one(service: &shoal_runtime::HttpService) {
    let response = service.handle(request()).await;
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"Hello from Shoal!\n");
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wasm = Path::new(shoal_fixtures::HELLO_WASM);
    let digest = "sha256:measure-hello";

    let started = Instant::now();
    let runtime = Runtime::new(RuntimeConfig::new(dir.path())).expect("runtime");
    let engine_setup = started.elapsed();

    let fresh = runtime.load(digest, wasm).await.expect("compile");
    let restarted = Runtime::new(RuntimeConfig::new(dir.path())).expect("runtime");
    let cached = restarted.load(digest, wasm).await.expect("disk load");
    let memory = restarted.load(digest, wasm).await.expect("memory load");
    println!("engine setup (pool + linker): {engine_setup:?}");
    println!("load hello, {}: {:?}", fresh.source(), fresh.elapsed());
    println!("load hello, {}: {:?}", cached.source(), cached.elapsed());
    println!("load hello, {}: {:?}", memory.source(), memory.elapsed());
    drop(runtime);

    let cfg = InstanceConfig {
        logs: LogSink::new(5000),
        ..InstanceConfig::default()
    };
    let service = restarted.http_service(&cached, cfg).expect("service");
    for _ in 0..50 {
        one(&service).await; // warm pool slots and caches
    }

    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let sent = Instant::now();
        one(&service).await;
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / SEQUENTIAL as u32;
    println!(
        "{SEQUENTIAL} sequential requests: mean {mean:?}, p50 {:?}, p99 {:?}, max {:?}",
        latencies[SEQUENTIAL / 2],
        latencies[SEQUENTIAL * 99 / 100],
        latencies[SEQUENTIAL - 1]
    );

    let started = Instant::now();
    let tasks = (0..CONCURRENT_TASKS).map(|_| {
        let service = service.clone();
        tokio::spawn(async move {
            for _ in 0..CONCURRENT_REQUESTS / CONCURRENT_TASKS {
                one(&service).await;
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.expect("task");
    }
    let elapsed = started.elapsed();
    println!(
        "{CONCURRENT_REQUESTS} requests from {CONCURRENT_TASKS} tasks on {} threads: {:.0} req/s",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        CONCURRENT_REQUESTS as f64 / elapsed.as_secs_f64()
    );
}
