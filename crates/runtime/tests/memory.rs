//! The node's memory budget, with real guests: instances never reserve more than it, whatever
//! the concurrency; one that finds no room in time is refused cleanly; idle instances make room
//! for waiting ones; and a memory bomb at full concurrency leaves the process and its
//! neighbours alive.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body::Frame;
use http_body_util::StreamBody;
use shoal_core::problem::{ErrorBody, ErrorCode};
use shoal_runtime::{
    ExitStatus, HttpService, InstanceConfig, LogSink, Reuse, Runtime, RuntimeConfig,
};

/// One test at a time: the bomb measures the whole process's resident memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A runtime whose guests may hold `budget` bytes at once, an instance waiting up to `wait`.
fn runtime_with_budget(dir: &tempfile::TempDir, budget: u64, wait: Duration) -> Runtime {
    let mut config = RuntimeConfig::new(dir.path());
    config.max_instances = 64;
    config.max_memory_bytes = 256 * MIB;
    config.memory_budget_bytes = budget;
    config.memory_wait = wait;
    Runtime::new(config).expect("runtime starts")
}

async fn service(runtime: &Runtime, wasm: &str, cfg: InstanceConfig) -> HttpService {
    let loaded = load(runtime, wasm).await;
    runtime.http_service(&loaded, cfg).expect("http service")
}

fn limited(memory_limit: u64) -> InstanceConfig {
    InstanceConfig {
        memory_limit,
        timeout: Some(Duration::from_secs(30)),
        ..InstanceConfig::default()
    }
}

/// Records the most `runtime` has reserved, read every millisecond until dropped.
struct PeakReserved {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PeakReserved {
    fn watch(runtime: &Runtime) -> PeakReserved {
        let (peak, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        tokio::spawn({
            let (runtime, peak, stop) = (runtime.clone(), peak.clone(), stop.clone());
            async move {
                let mut every = tokio::time::interval(Duration::from_millis(1));
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(runtime.memory_reserved(), Ordering::Relaxed);
                    every.tick().await;
                }
            }
        });
        PeakReserved { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakReserved {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Asks `hello` for its greeting until `done`, failing on any answer but 200; returns how many.
async fn keep_asking(hello: HttpService, done: Arc<AtomicBool>) -> usize {
    let mut answered = 0;
    while !done.load(Ordering::Relaxed) {
        let response = hello.handle(get("/")).await;
        let status = response.status();
        let body = body_text(response).await;
        assert_eq!(status, 200, "the neighbour answered {status}: {body}");
        answered += 1;
    }
    answered
}

async fn memory_released(runtime: &Runtime) {
    eventually(
        Duration::from_secs(10),
        "every reservation given back",
        || runtime.memory_reserved() == 0,
    )
    .await;
}

#[tokio::test]
async fn instances_never_reserve_more_than_the_budget() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 16 * MIB;
    let budget = 4 * limit;
    let runtime = runtime_with_budget(&dir, budget, Duration::from_secs(30));
    let faulty = service(&runtime, shoal_fixtures::FAULTY_WASM, limited(limit)).await;
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, limited(limit)).await;
    assert_eq!(runtime.memory_reserved(), 0);

    let peak = PeakReserved::watch(&runtime);
    let done = Arc::new(AtomicBool::new(false));
    let neighbour = tokio::spawn(keep_asking(hello, done.clone()));
    // Four times what fits: half eat all the memory they may, half hold theirs for a while.
    let requests: Vec<_> = (0..16)
        .map(|i| {
            let faulty = faulty.clone();
            let path = if i % 2 == 0 { "/oom" } else { "/sleep/100" };
            tokio::spawn(async move { (path, faulty.handle(get(path)).await) })
        })
        .collect();
    for request in requests {
        let (path, response) = request.await.unwrap();
        if path == "/oom" {
            assert_eq!(response.status(), 500);
            assert_eq!(error_body(response).await.code(), ErrorCode::OutOfMemory);
        } else {
            assert_eq!(response.status(), 200, "{path}");
        }
    }
    done.store(true, Ordering::Relaxed);
    let answered = neighbour.await.unwrap();

    assert!(answered > 0, "hello answered meanwhile");
    assert!(
        peak.peak() <= budget,
        "reserved {} of {budget}",
        peak.peak()
    );
    // The sleeping ones held the budget whole at some point: it was the limit.
    assert_eq!(peak.peak(), budget);
    memory_released(&runtime).await;
}

#[tokio::test]
async fn an_instance_that_finds_no_room_in_time_is_refused_cleanly() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 16 * MIB;
    let runtime = runtime_with_budget(&dir, limit, Duration::from_millis(50));
    let logs = LogSink::new(100);
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            logs: logs.clone(),
            ..limited(limit)
        },
    )
    .await;

    // A limit the budget could never hold is refused when the replica starts, not per request.
    let loaded = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    let err = runtime
        .http_service(&loaded, limited(2 * limit))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("memory limit 32 MiB exceeds this node's memory budget of 16 MiB"),
        "{err}"
    );

    // `/echo` answers at once and then holds its instance, and the whole budget, until the
    // upload ends.
    let (upload, frames) =
        futures::channel::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let request = http::Request::post("/echo")
        .header("host", "test.local")
        .body(StreamBody::new(frames))
        .unwrap();
    let echo = faulty.handle(request).await;
    assert_eq!(echo.status(), 200);
    assert_eq!(runtime.memory_reserved(), limit);

    let response = faulty.handle(get("/status/200")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        error_body(response).await,
        ErrorBody::new(
            ErrorCode::AtCapacity,
            "no room in this node's memory budget for another instance; retry shortly"
        )
    );
    assert!(
        logs.lines(0).0.iter().any(|l| l.line
            == "[shoal] GET /status/200: not started: no room for 16 MiB in the node's memory budget"),
        "{:?}",
        logs.lines(0).0
    );
    // A job's run waits the same way, and fails the same way.
    let job = load(&runtime, shoal_fixtures::GREET_JOB_WASM).await;
    let job = runtime.command(&job, limited(limit)).unwrap();
    assert_eq!(
        job.run().await,
        ExitStatus::Failed("no room for 16 MiB in the node's memory budget".into())
    );

    drop(upload);
    assert!(body_bytes(echo).await.is_empty());
    memory_released(&runtime).await;
    assert_eq!(faulty.handle(get("/status/200")).await.status(), 200);
    assert_eq!(job.run().await, ExitStatus::Exited(0));
    memory_released(&runtime).await;
}

#[tokio::test]
async fn idle_instances_give_their_memory_to_a_waiting_one() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 16 * MIB;
    // Room for one instance; an idle one would hold it for a minute.
    let runtime = runtime_with_budget(&dir, limit, Duration::from_secs(30));
    let reuse = Reuse {
        requests: 100,
        idle: Duration::from_secs(60),
        concurrent: 1,
    };
    let cfg = InstanceConfig {
        reuse,
        ..limited(limit)
    };
    let p2 = service(&runtime, shoal_fixtures::FAULTY_WASM, cfg.clone()).await;
    let p3 = service(&runtime, shoal_fixtures::HELLO_P3_WASM, cfg).await;

    assert_eq!(p2.handle(get("/count")).await.status(), 200);
    idle(&p2, 1).await;
    assert_eq!(runtime.memory_reserved(), limit);
    // The p3 worker needs the memory the idle p2 instance holds: it gets it at once.
    let started = Instant::now();
    assert_eq!(p3.handle(get("/count")).await.status(), 200);
    assert_eq!(p2.idle_instances(), 0);
    idle(&p3, 1).await;
    // And the other way round.
    assert_eq!(p2.handle(get("/count")).await.status(), 200);
    assert_eq!(p3.idle_instances(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    drop((p2, p3));
    memory_released(&runtime).await;
}

#[tokio::test]
async fn a_memory_bomb_at_full_concurrency_leaves_the_node_and_its_neighbours_alive() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (bomb_limit, max_concurrency, rounds) = (64 * MIB, 32, 3);
    let budget = 256 * MIB;
    let runtime = runtime_with_budget(&dir, budget, Duration::from_secs(30));
    let bomb = service(&runtime, shoal_fixtures::FAULTY_WASM, limited(bomb_limit)).await;
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, limited(16 * MIB)).await;
    assert_eq!(hello.handle(get("/")).await.status(), 200);

    // Resident memory from here on: the peak starts again at what is resident now.
    let before = reset_peak();
    let peak = PeakReserved::watch(&runtime);
    let done = Arc::new(AtomicBool::new(false));
    let neighbour = tokio::spawn(keep_asking(hello, done.clone()));
    for _ in 0..rounds {
        let bombs: Vec<_> = (0..max_concurrency)
            .map(|_| {
                let bomb = bomb.clone();
                tokio::spawn(async move { bomb.handle(get("/oom")).await })
            })
            .collect();
        for response in futures::future::join_all(bombs).await {
            let response = response.unwrap();
            assert_eq!(response.status(), 500);
            assert_eq!(error_body(response).await.code(), ErrorCode::OutOfMemory);
        }
    }
    done.store(true, Ordering::Relaxed);
    let answered = neighbour.await.unwrap();
    let (_, high) = resident();

    // Unbounded, 32 bombs of 64 MiB make up to 2 GiB resident at once; the budget holds them
    // to 256 MiB, and the rest of the process (hello, compiled code) is small beside it.
    let grew = high.saturating_sub(before);
    assert!(peak.peak() <= budget, "reserved {} MiB", peak.peak() >> 20);
    assert!(
        grew <= budget + 64 * MIB,
        "resident memory grew by {} MiB (from {} MiB) with a budget of {} MiB",
        grew >> 20,
        before >> 20,
        budget >> 20
    );
    assert!(answered > 0, "hello answered throughout");
    memory_released(&runtime).await;
}
