//! WASIp3 components end to end: the `hello-p3` fixture served through `HttpService::handle`,
//! fresh per request, reused one request after another and several at once, and stopped when
//! it traps or runs out of time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_core::problem::ErrorCode;
use shoal_runtime::{HttpService, InstanceConfig, InstanceStats, Reuse};

/// `hello-p3` with `reuse`, a 300 ms timeout and its own runtime.
async fn hello_p3(reuse: Reuse) -> (tempfile::TempDir, HttpService) {
    hello_p3_with(reuse, Duration::from_millis(300), Arc::default()).await
}

/// [`hello_p3`] with another `timeout`, its instances counted in `stats`.
async fn hello_p3_with(
    reuse: Reuse,
    timeout: Duration,
    stats: Arc<InstanceStats>,
) -> (tempfile::TempDir, HttpService) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let loaded = load(&runtime, shoal_fixtures::HELLO_P3_WASM).await;
    assert!(
        loaded
            .exports()
            .iter()
            .any(|e| e == "wasi:http/handler@0.3.0"),
        "{:?}",
        loaded.exports()
    );
    let cfg = InstanceConfig {
        timeout: Some(timeout),
        reuse,
        stats,
        ..config()
    };
    let service = runtime
        .http_service(&loaded, cfg)
        .expect("a p3 http service");
    (dir, service)
}

#[tokio::test]
async fn a_p3_guest_sees_the_host_its_client_addressed() {
    let (_dir, hello) = hello_p3(Reuse::default()).await;
    assert_eq!(
        addressed_as(&hello, "/authority").await,
        [
            "http://shop.example",
            "http://shop.example",
            "http://shop.example:8443",
            "https://shop.example"
        ]
    );
}

fn reuse(requests: u32, concurrent: u32) -> Reuse {
    Reuse {
        requests,
        concurrent,
        idle: Duration::from_secs(60),
    }
}

async fn text(service: &HttpService, path: &str) -> String {
    let response = service.handle(get(path)).await;
    assert_eq!(response.status(), 200, "{path}");
    body_text(response).await
}

async fn count(service: &HttpService) -> u64 {
    text(service, "/count")
        .await
        .trim()
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn a_p3_component_answers_with_a_fresh_instance_per_request_by_default() {
    let (_dir, hello) = hello_p3(Reuse::default()).await;
    assert_eq!(text(&hello, "/hi?x=1").await, "hello from p3 /hi\n");
    for _ in 0..3 {
        assert_eq!(count(&hello).await, 1);
    }
    idle(&hello, 0).await;
}

#[tokio::test]
async fn a_reused_p3_instance_serves_its_count() {
    let stats = Arc::new(InstanceStats::default());
    let (_dir, hello) =
        hello_p3_with(reuse(3, 16), Duration::from_millis(300), stats.clone()).await;
    let mut counts = Vec::new();
    for kept in [1, 1, 0, 1] {
        counts.push(count(&hello).await);
        idle(&hello, kept).await;
    }
    assert_eq!(
        counts,
        [1, 2, 3, 1],
        "three requests, then a fresh instance"
    );
    // Two workers started; the second waits for a request, as the stats say too, once the
    // first, done with its three, has ended (just after its last answer).
    eventually(Duration::from_secs(5), "the first instance ended", || {
        stats.read().live == 1
    })
    .await;
    let stats = stats.read();
    assert_eq!((stats.requests, stats.cold_starts, stats.reuses), (4, 2, 2));
    assert_eq!((stats.live, stats.idle), (1, 1));
}

/// A kept instance waits its idle time for its next request, however short the request
/// timeout: that bounds requests, not the wait between them (as `wasmtime serve`'s
/// `--idle-instance-timeout` does not depend on its request timeout).
#[tokio::test]
async fn a_kept_p3_instance_waits_past_its_request_timeout() {
    let (_dir, hello) =
        hello_p3_with(reuse(100, 16), Duration::from_millis(200), Arc::default()).await;
    assert_eq!(count(&hello).await, 1);
    idle(&hello, 1).await;
    // Five request timeouts on, it still waits.
    let ended = within(Duration::from_secs(1), || hello.idle_instances() != 1).await;
    assert!(!ended, "the kept instance ended");
    assert_eq!(count(&hello).await, 2, "served by the kept instance");
}

#[tokio::test]
async fn a_p3_instance_serves_requests_at_once_up_to_its_concurrency() {
    for (concurrent, room, expected) in [(16, 1, 3), (1, 0, 1)] {
        // Time enough for the sleeper on a busy machine: it must not time out.
        let (_dir, hello) = hello_p3_with(
            reuse(100, concurrent),
            Duration::from_secs(5),
            Arc::default(),
        )
        .await;
        assert_eq!(count(&hello).await, 1);
        idle(&hello, 1).await;
        // A request that waits (on a clock) inside the instance...
        let sleeper = tokio::spawn({
            let hello = hello.clone();
            async move { text(&hello, "/sleep?ms=250").await }
        });
        idle(&hello, 0).await;
        // ...leaves room for another one in it once it waits, if the concurrency allows.
        eventually(Duration::from_secs(5), "room in the instance", || {
            hello.instances_with_room() == room
        })
        .await;
        assert_eq!(count(&hello).await, expected, "concurrent = {concurrent}");
        assert_eq!(sleeper.await.unwrap(), "slept 250 ms\n");
    }
}

#[tokio::test]
async fn a_p3_request_past_its_timeout_gets_504_and_a_trap_500() {
    let (_dir, hello) = hello_p3(reuse(100, 16)).await;
    for (path, code) in [
        ("/sleep?ms=60000", ErrorCode::Timeout),
        ("/spin", ErrorCode::Timeout),
        ("/panic", ErrorCode::GuestTrapped),
    ] {
        let response = hello.handle(get(path)).await;
        assert_eq!(error_body(response).await.error.code, code, "{path}");
        // The instance is gone with it; the next request gets a fresh one.
        idle(&hello, 0).await;
        assert_eq!(count(&hello).await, 1, "after {path}");
        idle(&hello, 1).await;
    }
}

#[tokio::test]
async fn a_p3_component_compiles_once_then_loads_from_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let first = runtime(dir.path());
    let loaded = load(&first, shoal_fixtures::HELLO_P3_WASM).await;
    assert_eq!(loaded.source(), shoal_runtime::LoadSource::Compiled);
    drop(first);

    let restarted = runtime(dir.path());
    let loaded = load(&restarted, shoal_fixtures::HELLO_P3_WASM).await;
    assert_eq!(loaded.source(), shoal_runtime::LoadSource::DiskCache);
    let hello = restarted
        .http_service(&loaded, config())
        .expect("a p3 http service");
    assert_eq!(text(&hello, "/").await, "hello from p3 /\n");
    // p2 components beside it are served as before.
    let p2 = load(&restarted, shoal_fixtures::HELLO_WASM).await;
    let p2 = restarted.http_service(&p2, config()).unwrap();
    assert_eq!(p2.handle(get("/")).await.status(), 200);
}

#[tokio::test]
async fn a_fresh_p3_instance_stops_when_its_client_goes_away_before_the_answer() {
    // One instance slot: while the guest spins in it, nothing else can start; its client
    // going away must free it.
    a_client_leaving_frees_its_instance(shoal_fixtures::HELLO_P3_WASM, "/spin").await;
}

#[tokio::test]
async fn what_a_p3_request_holds_goes_when_its_instance_ends_not_its_body() {
    let (_dir, hello) = hello_p3(Reuse::default()).await;
    let answer = a_hold_goes_when_its_guest_is_done(&hello, "/huge?mib=64", "/huge?mib=1");
    assert_eq!(answer.await.len(), 1 << 20);
}
