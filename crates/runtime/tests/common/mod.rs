//! Helpers shared by the integration tests: a runtime on a private cache dir, loading the
//! fixture components, and building/reading HTTP messages.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use sha2::{Digest, Sha256};
use shoal_core::problem::ErrorBody;
use shoal_runtime::{InstanceConfig, Loaded, ResponseBody, Runtime, RuntimeConfig};

pub const MIB: u64 = 1 << 20;

/// A runtime with a small pool, so parallel tests do not reserve terabytes of address space.
pub fn runtime(cache_dir: &Path) -> Runtime {
    runtime_with_threads(cache_dir, 0)
}

/// [`runtime`] with `guest_threads` guest threads (0: one per core).
pub fn runtime_with_threads(cache_dir: &Path, guest_threads: usize) -> Runtime {
    let mut config = RuntimeConfig::new(cache_dir);
    config.max_instances = 64;
    config.max_memory_bytes = 256 * MIB;
    config.guest_threads = guest_threads;
    Runtime::new(config).expect("runtime starts")
}

/// `sha256:<hex>` of a file, as the control plane names modules.
pub fn digest_of(path: &str) -> String {
    let bytes = shoal_fixtures::read(path);
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

pub async fn load(runtime: &Runtime, path: &str) -> Loaded {
    runtime
        .load(&digest_of(path), Path::new(path))
        .await
        .expect("fixture loads")
}

pub fn config() -> InstanceConfig {
    InstanceConfig {
        memory_limit: 64 * MIB,
        ..InstanceConfig::default()
    }
}

pub fn get(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(path)
        .header("host", "test.local")
        .body(Empty::new())
        .expect("valid request")
}

/// What a guest's `/authority` answers for requests as each server hands them over: an
/// HTTP/1 one (its host in `host` alone), an HTTP/2 client's (in the URI alone), and one a
/// node's gateway forwarded over an HTTP/2 hop (the URI names the node, `host` the client's
/// host), and one whose client came over TLS: each the host the client addressed, as
/// `http://`, the last as `https://`.
pub async fn addressed_as(service: &shoal_runtime::HttpService, path: &str) -> Vec<String> {
    let requests = [
        http::Request::get(path).header("host", "shop.example"),
        http::Request::get(format!("https://shop.example{path}")),
        http::Request::get(format!("https://10.9.9.9:8080{path}"))
            .header("host", "shop.example:8443"),
    ];
    let mut seen = Vec::new();
    for request in requests {
        let response = service
            .handle(request.body(Empty::<Bytes>::new()).unwrap())
            .await;
        assert_eq!(response.status(), 200, "{path}");
        seen.push(body_text(response).await.trim().to_string());
    }
    // A client that came over TLS, to this node or to the one that forwarded it.
    let mut request = http::Request::get(path)
        .header("host", "shop.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    request.extensions_mut().insert(shoal_runtime::ClientTls);
    let response = service.handle(request).await;
    seen.push(body_text(response).await.trim().to_string());
    seen
}

pub async fn body_bytes(response: http::Response<ResponseBody>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body streams without error")
        .to_bytes()
}

pub async fn body_text(response: http::Response<ResponseBody>) -> String {
    String::from_utf8(body_bytes(response).await.to_vec()).expect("utf-8 body")
}

/// The body of an error the runtime answered, checked to be Shoal's JSON error shape.
pub async fn error_body(response: http::Response<ResponseBody>) -> ErrorBody {
    assert_eq!(response.headers()["content-type"], "application/json");
    let status = response.status().as_u16();
    let text = body_text(response).await;
    let body = ErrorBody::from_json(&text)
        .unwrap_or_else(|e| panic!("not a Shoal error body ({e}): {text}"));
    assert_eq!(status, body.status(), "the status is the code's: {text}");
    body
}

/// Waits until `service` keeps `n` instances waiting for a request: an instance goes back
/// after its guest returns, a moment after the client has the whole response.
pub async fn idle(service: &shoal_runtime::HttpService, n: usize) {
    eventually(
        Duration::from_secs(5),
        &format!("{n} idle instances"),
        || service.idle_instances() == n,
    )
    .await;
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, what: &str, check: impl FnMut() -> bool) {
    assert!(within(limit, check).await, "timed out waiting for: {what}");
}

/// Polls `check` until it holds or `limit` passes: whether it held.
pub async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Resident memory of this process now and at its peak since the peak was last reset, in
/// bytes (`VmRSS`, `VmHWM`).
pub fn resident() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Starts measuring the peak resident memory from now; returns what is resident now.
pub fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("peak RSS can be reset");
    resident().0
}

/// On a node with one instance slot, a client of `wasm` asks for `spin` (a guest that loops
/// for ever) and goes away: the slot must be free again long before the request's timeout,
/// as `/count` shows.
pub async fn a_client_leaving_frees_its_instance(wasm: &str, spin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut rc = shoal_runtime::RuntimeConfig::new(dir.path());
    rc.max_instances = 1;
    rc.max_memory_bytes = 256 * MIB;
    let runtime = shoal_runtime::Runtime::new(rc).unwrap();
    let loaded = load(&runtime, wasm).await;
    let cfg = InstanceConfig {
        timeout: Some(Duration::from_secs(120)),
        ..config()
    };
    let service = runtime.http_service(&loaded, cfg).unwrap();

    let spinning = tokio::spawn({
        let service = service.clone();
        let spin = spin.to_string();
        async move { service.handle(get(&spin)).await }
    });
    eventually(Duration::from_secs(10), "the guest spinning", || {
        runtime
            .cpu_usage()
            .iter()
            .any(|(_, usage)| usage.used_ns > 20_000_000)
    })
    .await;
    spinning.abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = service.handle(get("/count")).await;
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 503, "only the slot is missing");
        assert!(
            std::time::Instant::now() < deadline,
            "the spinning guest kept its slot"
        );
        tokio::task::yield_now().await;
    }
}

/// Asks `service` for `path`, a large answer, holding something, and reads none of it: the
/// hold goes once the guest is done with the request (here, stopped by its timeout while
/// blocked writing), though the body is still there; and for an answer read to its end, it
/// goes by then: `small`'s answer is returned.
pub async fn a_hold_goes_when_its_guest_is_done(
    service: &shoal_runtime::HttpService,
    path: &str,
    small: &str,
) -> Bytes {
    let hold = std::sync::Arc::new(());
    let response = service.handle_holding(get(path), hold.clone()).await;
    assert_eq!(response.status(), 200, "{path}");
    eventually(
        Duration::from_secs(10),
        "the hold goes with the guest",
        || std::sync::Arc::strong_count(&hold) == 1,
    )
    .await;
    drop(response);

    let hold = std::sync::Arc::new(());
    let response = service.handle_holding(get(small), hold.clone()).await;
    assert_eq!(response.status(), 200, "{small}");
    let answer = body_bytes(response).await;
    eventually(
        Duration::from_secs(10),
        "the hold goes with a finished answer",
        || std::sync::Arc::strong_count(&hold) == 1,
    )
    .await;
    answer
}
