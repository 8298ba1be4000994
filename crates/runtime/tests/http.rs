//! HTTP components end to end: the `hello` and `faulty` fixtures served through
//! `HttpService::handle`, including every way a guest can misbehave.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::SinkExt;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use sha2::{Digest, Sha256};
use shoal_core::problem::{ErrorBody, ErrorCode};
use shoal_runtime::{
    HttpService, Incident, IncidentKind, InstanceConfig, InstanceCounts, InstanceStats, LogSink,
    LogStream,
};
use std::sync::{Arc, Mutex};

async fn service(path: &str, cfg: InstanceConfig) -> (tempfile::TempDir, HttpService) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let loaded = load(&runtime, path).await;
    let service = runtime.http_service(&loaded, cfg).expect("http service");
    (dir, service)
}

fn log_texts(logs: &LogSink) -> Vec<String> {
    logs.lines(0).0.into_iter().map(|l| l.line).collect()
}

#[tokio::test]
async fn hello_answers_and_logs_each_request() {
    let logs = LogSink::new(100);
    let cfg = InstanceConfig {
        logs: logs.clone(),
        ..config()
    };
    let (_dir, hello) = service(shoal_fixtures::HELLO_WASM, cfg).await;

    let response = hello.handle(get("/hello?x=1")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(body_text(response).await, "Hello from Shoal!\n");

    // A request with no authority at all (a synthetic probe) is still served.
    let bare = http::Request::get("/healthz")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(hello.handle(bare).await.status(), 200);

    let (lines, cursor) = logs.lines(0);
    let texts: Vec<_> = lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(texts, ["hello: GET /hello?x=1", "hello: GET /healthz"]);
    assert!(lines.iter().all(|l| l.stream == LogStream::Stdout));
    assert_eq!(cursor, 2);
}

#[tokio::test]
async fn a_guest_sees_the_host_its_client_addressed() {
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    assert_eq!(
        addressed_as(&faulty, "/authority").await,
        [
            "http://shop.example",
            "http://shop.example",
            "http://shop.example:8443",
            "https://shop.example"
        ]
    );
}

#[tokio::test]
async fn greeting_comes_from_the_granted_env() {
    let cfg = InstanceConfig {
        env: vec![("GREETING".into(), "Ahoy".into())],
        ..config()
    };
    let (_dir, hello) = service(shoal_fixtures::HELLO_WASM, cfg).await;
    assert_eq!(body_text(hello.handle(get("/")).await).await, "Ahoy\n");
}

#[tokio::test]
async fn config_reaches_the_guest_through_wasi_config_and_only_what_was_given() {
    let cfg = InstanceConfig {
        config: vec![
            ("greeting".into(), "Ahoy".into()),
            ("log.level".into(), "debug".into()),
        ],
        ..config()
    };
    let (_dir, settings) = service(shoal_fixtures::SETTINGS_WASM, cfg).await;
    let answer = |path: &'static str| {
        let settings = settings.clone();
        async move {
            let response = settings.handle(get(path)).await;
            (response.status().as_u16(), body_text(response).await)
        }
    };
    assert_eq!(answer("/settings/greeting").await, (200, "Ahoy\n".into()));
    assert_eq!(
        answer("/settings").await,
        (200, "greeting=Ahoy\nlog.level=debug\n".into())
    );
    // A key that does not exist is `none`, as the interface says: the guest answers 404.
    assert_eq!(
        answer("/settings/missing").await,
        (404, "no such key: missing\n".into())
    );
    // Without `[config]` the guest still links and finds nothing.
    let (_dir, bare) = service(shoal_fixtures::SETTINGS_WASM, config()).await;
    let response = bare.handle(get("/settings")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "");
}

#[tokio::test]
async fn a_trap_fails_only_its_own_request() {
    let logs = LogSink::new(100);
    let cfg = InstanceConfig {
        logs: logs.clone(),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;

    let response = faulty.handle(get("/faulty/trap")).await;
    assert_eq!(response.status(), 500);
    // What the client sees is Shoal's error shape, without the trap's details.
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(ErrorCode::GuestTrapped, "guest trapped")
    );

    let texts = log_texts(&logs);
    assert!(
        texts.iter().any(|l| l.contains("faulty: trap requested")),
        "the guest's panic message is captured: {texts:?}"
    );
    assert_eq!(
        texts.last().map(String::as_str),
        Some(
            "[shoal] GET /faulty/trap: guest trapped: wasm trap: wasm `unreachable` \
             instruction executed"
        ),
        "the runtime records the trap on one line: {texts:?}"
    );

    let response = faulty.handle(get("/faulty/status/201")).await;
    assert_eq!(response.status(), 201);
    assert_eq!(body_text(response).await, "status 201");
}

/// `faulty` with the given timeout and `hello`, on one runtime with `guest_threads` (0: one
/// per core).
async fn faulty_and_hello(
    timeout: Duration,
    guest_threads: usize,
) -> (tempfile::TempDir, HttpService, HttpService) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_with_threads(dir.path(), guest_threads);
    let faulty = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    let hello = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    let faulty = runtime
        .http_service(
            &faulty,
            InstanceConfig {
                timeout: Some(timeout),
                ..config()
            },
        )
        .unwrap();
    let hello = runtime.http_service(&hello, config()).unwrap();
    (dir, faulty, hello)
}

async fn hello_latency(hello: &HttpService) -> Duration {
    let sent = Instant::now();
    let response = hello.handle(get("/hello")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "Hello from Shoal!\n");
    sent.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_guest_times_out_while_others_are_served() {
    // A 3 s timeout leaves room for 20 requests even on a loaded 2-core CI machine.
    let (_dir, faulty, hello) = faulty_and_hello(Duration::from_secs(3), 0).await;

    let started = Instant::now();
    let looping = tokio::spawn(async move {
        let response = faulty.handle(get("/loop")).await;
        (started.elapsed(), response)
    });

    for _ in 0..20 {
        let latency = hello_latency(&hello).await;
        assert!(
            latency < Duration::from_millis(500),
            "hello took {latency:?} while /loop was running"
        );
    }
    assert!(
        !looping.is_finished(),
        "the hello requests were served while /loop was still spinning"
    );

    let (elapsed, response) = looping.await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(ErrorCode::Timeout, "guest timed out after 3s")
    );
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(4500),
        "/loop stopped after {elapsed:?}"
    );
}

/// With a single guest thread, `hello` can only be served while `/loop` spins if the
/// looping guest yields at every epoch tick. Each hand-off between the two costs up to a tick,
/// so this checks that hello completes, not that it is fast. (Both are in the default CPU
/// group, so this is the plain yield, not fair sharing between apps.)
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_guest_yields_its_thread() {
    let (_dir, faulty, hello) = faulty_and_hello(Duration::from_secs(3), 1).await;

    let looping = tokio::spawn(async move { faulty.handle(get("/loop")).await.status() });
    let latency = hello_latency(&hello).await;
    assert!(
        !looping.is_finished(),
        "hello was served while /loop was still spinning"
    );
    assert!(latency < Duration::from_secs(2), "hello took {latency:?}");
    assert_eq!(looping.await.unwrap(), 504);
}

#[tokio::test]
async fn a_guest_blocked_in_the_host_times_out_too() {
    let cfg = InstanceConfig {
        timeout: Some(Duration::from_millis(500)),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;

    let started = Instant::now();
    let response = faulty.handle(get("/sleep/60000")).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(ErrorCode::Timeout, "guest timed out after 500ms")
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");

    // Within its deadline the same call succeeds.
    let response = faulty.handle(get("/sleep/10")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn exceeding_the_memory_limit_fails_the_request() {
    let logs = LogSink::new(100);
    let cfg = InstanceConfig {
        memory_limit: 32 * MIB,
        logs: logs.clone(),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;

    let response = faulty.handle(get("/oom")).await;
    assert_eq!(response.status(), 500);
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(
            ErrorCode::OutOfMemory,
            "guest exceeded its memory limit (32 MiB)"
        )
    );
    assert!(
        log_texts(&logs)
            .iter()
            .any(|l| l == "[shoal] GET /oom: guest exceeded its memory limit (32 MiB)"),
        "{:?}",
        log_texts(&logs)
    );

    // The next instance starts from a fresh memory.
    for _ in 0..3 {
        let response = faulty.handle(get("/status/200")).await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn echo_streams_a_large_body_both_ways() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 128; // 8 MiB

    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    let (mut upload, frames) =
        futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let request = http::Request::post("/faulty/echo")
        .header("host", "test.local")
        .body(StreamBody::new(frames))
        .unwrap();

    // The guest answers before reading the body, so the head arrives with nothing uploaded.
    let response = faulty.handle(request).await;
    assert_eq!(response.status(), 200);
    let mut download = response.into_body();

    let mut sent = Sha256::new();
    let mut received = Sha256::new();
    let mut received_len = 0;
    for i in 0..CHUNKS {
        let chunk: Vec<u8> = (0..CHUNK).map(|j| (i * 31 + j * 7) as u8).collect();
        sent.update(&chunk);
        upload
            .send(Ok(Frame::data(Bytes::from(chunk))))
            .await
            .unwrap();
        // Each chunk comes back before the next one is sent: nothing is buffered whole.
        while received_len < (i + 1) * CHUNK {
            let frame = download
                .frame()
                .await
                .expect("body continues")
                .expect("no body error");
            if let Ok(data) = frame.into_data() {
                received.update(&data);
                received_len += data.len();
            }
        }
    }
    drop(upload);
    while let Some(frame) = download.frame().await {
        if let Ok(data) = frame.expect("no body error").into_data() {
            received.update(&data);
            received_len += data.len();
        }
    }
    assert_eq!(received_len, CHUNK * CHUNKS);
    assert_eq!(received.finalize(), sent.finalize());
}

#[tokio::test]
async fn status_codes_pass_through() {
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    let response = faulty.handle(get("/status/418")).await;
    assert_eq!(response.status(), 418);
    assert_eq!(body_text(response).await, "status 418");
}

#[tokio::test]
async fn the_filesystem_is_not_reachable() {
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    let response = faulty.handle(get("/fs")).await;
    assert_eq!(response.status(), 200);
    let body = body_text(response).await;
    assert!(body.contains("read /etc/passwd: denied"), "{body}");
    assert!(body.contains("list /: denied"), "{body}");
}

#[tokio::test]
async fn outbound_http_is_denied_by_default() {
    let logs = LogSink::new(100);
    let cfg = InstanceConfig {
        logs: logs.clone(),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;
    let response = faulty.handle(get("/net")).await;
    assert_eq!(response.status(), 200);
    let body = body_text(response).await;
    assert!(body.starts_with("denied"), "{body}");
    assert!(
        log_texts(&logs)
            .iter()
            .any(|l| l.starts_with("[shoal] outbound request denied: GET http://example.com/ (")),
        "{:?}",
        log_texts(&logs)
    );
}

#[tokio::test]
async fn only_granted_env_vars_are_visible() {
    assert!(std::env::var_os("PATH").is_some(), "the host has PATH set");
    let (_dir, plain) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    assert_eq!(plain.handle(get("/env/SECRET")).await.status(), 404);
    assert_eq!(plain.handle(get("/env/PATH")).await.status(), 404);

    let cfg = InstanceConfig {
        env: vec![("SECRET".into(), "s3cret".into())],
        ..config()
    };
    let (_dir, granted) = service(shoal_fixtures::FAULTY_WASM, cfg).await;
    let response = granted.handle(get("/env/SECRET")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "s3cret");
}

#[tokio::test]
async fn request_headers_reach_the_guest() {
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    let request = http::Request::get("/headers")
        .header("host", "test.local")
        .header("x-shoal-test", "yes")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let body = body_text(faulty.handle(request).await).await;
    assert!(body.contains("x-shoal-test: yes"), "{body}");
}

#[tokio::test]
async fn concurrent_requests_get_separate_instances() {
    let (_dir, hello) = service(shoal_fixtures::HELLO_WASM, config()).await;
    let requests = (0..32).map(|_| {
        let hello = hello.clone();
        tokio::spawn(async move { body_text(hello.handle(get("/")).await).await })
    });
    for body in futures::future::join_all(requests).await {
        assert_eq!(body.unwrap(), "Hello from Shoal!\n");
    }
}

#[tokio::test]
async fn a_full_instance_pool_answers_503_until_a_slot_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = shoal_runtime::RuntimeConfig::new(dir.path());
    config.max_instances = 1;
    config.max_memory_bytes = 64 * MIB;
    let runtime = shoal_runtime::Runtime::new(config).unwrap();
    let faulty = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    let faulty = runtime.http_service(&faulty, common::config()).unwrap();

    // `/echo` answers at once and then holds its instance until the upload ends.
    let (upload, frames) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let request = http::Request::post("/echo")
        .header("host", "test.local")
        .body(StreamBody::new(frames))
        .unwrap();
    let echo = faulty.handle(request).await;
    assert_eq!(echo.status(), 200);

    let response = faulty.handle(get("/status/200")).await;
    assert_eq!(response.status(), 503);
    // The same "at capacity" as the gateway's when a replica's permits are all taken.
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(
            ErrorCode::AtCapacity,
            "no instance slot available on this node; retry shortly"
        )
    );

    drop(upload);
    assert!(body_bytes(echo).await.is_empty());
    // The slot returns when the finished request's store is dropped, just after its body
    // ended: poll for it rather than assume the order.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = faulty.handle(get("/status/200")).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::task::yield_now().await;
    }
}

/// The timeout of tests that also run `/oom` and `/trap`: time enough for those to end by
/// themselves on a busy machine (at 300 ms, `/oom` once timed out first, a 504).
const KILL_AFTER: Duration = Duration::from_secs(2);

#[tokio::test]
async fn killed_instances_are_reported_as_incidents() {
    let seen: Arc<Mutex<Vec<Incident>>> = Arc::default();
    let hook = {
        let seen = seen.clone();
        Arc::new(move |i: Incident| seen.lock().unwrap().push(i))
    };
    let cfg = InstanceConfig {
        memory_limit: 32 * MIB,
        timeout: Some(KILL_AFTER),
        incidents: Some(hook),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;
    assert_eq!(faulty.handle(get("/oom")).await.status(), 500);
    assert_eq!(faulty.handle(get("/sleep/60000")).await.status(), 504);
    assert_eq!(faulty.handle(get("/faulty/trap")).await.status(), 500);
    // A guest's own error answer is not an incident.
    assert_eq!(faulty.handle(get("/status/500")).await.status(), 500);
    let kinds: Vec<IncidentKind> = seen.lock().unwrap().iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [
            IncidentKind::OutOfMemory,
            IncidentKind::TimedOut,
            IncidentKind::Trapped
        ]
    );
    assert_eq!(IncidentKind::TimedOut.reason(), "KilledByTimeout");
    assert!(seen.lock().unwrap()[1].message.contains("GET /sleep/60000"));
}

/// Faulty with instances reused for `requests` requests, idle up to `idle`, and a timeout
/// of [`KILL_AFTER`].
async fn reusing(requests: u32, idle: Duration) -> (tempfile::TempDir, HttpService) {
    let cfg = InstanceConfig {
        timeout: Some(KILL_AFTER),
        reuse: shoal_runtime::Reuse {
            requests,
            idle,
            ..Default::default()
        },
        ..config()
    };
    service(shoal_fixtures::FAULTY_WASM, cfg).await
}

async fn count(service: &HttpService) -> u64 {
    let response = service.handle(get("/count")).await;
    assert_eq!(response.status(), 200);
    body_text(response).await.parse().expect("a count")
}

#[tokio::test]
async fn a_reused_instance_serves_its_count_and_a_failure_ends_it() {
    let (_dir, faulty) = reusing(3, Duration::from_secs(60)).await;
    let mut counts = Vec::new();
    for kept in [1, 1, 0, 1] {
        counts.push(count(&faulty).await);
        idle(&faulty, kept).await;
    }
    assert_eq!(
        counts,
        [1, 2, 3, 1],
        "three requests, then a fresh instance"
    );

    // A timeout, a trap or running out of memory drops the instance.
    for (path, status) in [("/loop", 504), ("/trap", 500), ("/oom", 500)] {
        assert_eq!(faulty.handle(get(path)).await.status(), status, "{path}");
        idle(&faulty, 0).await;
        assert_eq!(count(&faulty).await, 1, "after {path}");
        idle(&faulty, 1).await;
    }

    // Two services of one component (two apps, or two revisions) never share one.
    let runtime = runtime(_dir.path());
    let loaded = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    let cfg = InstanceConfig {
        reuse: shoal_runtime::Reuse {
            requests: 100,
            idle: Duration::from_secs(60),
            ..Default::default()
        },
        ..config()
    };
    let other = runtime.http_service(&loaded, cfg).unwrap();
    assert_eq!(count(&other).await, 1);
    idle(&other, 1).await;
    assert_eq!(count(&faulty).await, 2);
    idle(&faulty, 1).await;
    assert_eq!(count(&other).await, 2);
}

#[tokio::test]
async fn instances_go_once_idle_for_their_time() {
    let (_dir, faulty) = reusing(100, Duration::from_millis(100)).await;
    assert_eq!(count(&faulty).await, 1);
    idle(&faulty, 1).await;
    idle(&faulty, 0).await;
    assert_eq!(
        count(&faulty).await,
        1,
        "a fresh instance after the idle time"
    );
}

#[tokio::test]
async fn instance_stats_count_requests_cold_starts_reuses_and_kills() {
    let stats = Arc::new(InstanceStats::default());
    let cfg = InstanceConfig {
        timeout: Some(KILL_AFTER),
        stats: stats.clone(),
        ..config()
    };
    let (dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;
    for _ in 0..3 {
        assert_eq!(count(&faulty).await, 1);
    }
    for (path, status) in [("/loop", 504), ("/trap", 500), ("/oom", 500)] {
        assert_eq!(faulty.handle(get(path)).await.status(), status, "{path}");
    }
    // A request's instance goes once its task has finished the body.
    eventually(Duration::from_secs(5), "no instance alive", || {
        stats.read().live == 0
    })
    .await;
    assert_eq!(
        stats.read(),
        InstanceCounts {
            requests: 6,
            cold_starts: 6,
            timeouts: 1,
            out_of_memory: 1,
            traps: 1,
            ..InstanceCounts::default()
        }
    );

    // Another replica of the revision, reusing instances, adds to the same counts.
    let runtime = runtime(dir.path());
    let loaded = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    let cfg = InstanceConfig {
        reuse: shoal_runtime::Reuse {
            requests: 100,
            idle: Duration::from_secs(60),
            ..Default::default()
        },
        stats: stats.clone(),
        ..config()
    };
    let reusing = runtime.http_service(&loaded, cfg).unwrap();
    for n in 1..=3 {
        assert_eq!(count(&reusing).await, n);
        idle(&reusing, 1).await;
    }
    let counts = stats.read();
    assert_eq!(
        (counts.requests, counts.cold_starts, counts.reuses),
        (9, 7, 2)
    );
    assert_eq!((counts.live, counts.idle), (1, 1));
    // An instance waiting for reuse goes with its replica.
    drop(reusing);
    eventually(Duration::from_secs(5), "the idle instance gone", || {
        let counts = stats.read();
        (counts.live, counts.idle) == (0, 0)
    })
    .await;
}

#[tokio::test]
async fn without_reuse_every_request_has_a_fresh_instance() {
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, config()).await;
    for _ in 0..3 {
        assert_eq!(count(&faulty).await, 1);
    }
    assert_eq!(faulty.idle_instances(), 0);
}

#[tokio::test]
async fn a_guest_stops_when_its_client_goes_away_before_the_answer() {
    // One instance slot: while the guest spins in it, nothing else can start; its client
    // going away must free it.
    a_client_leaving_frees_its_instance(shoal_fixtures::FAULTY_WASM, "/loop").await;
}

#[tokio::test]
async fn what_a_request_holds_goes_when_its_guest_is_done_not_its_body() {
    let cfg = InstanceConfig {
        timeout: Some(Duration::from_millis(300)),
        ..config()
    };
    let (_dir, faulty) = service(shoal_fixtures::FAULTY_WASM, cfg).await;
    let answer = a_hold_goes_when_its_guest_is_done(&faulty, "/faulty/huge/64", "/faulty/huge/1");
    assert_eq!(answer.await.len(), 1 << 20);
}
