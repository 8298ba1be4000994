//! Guests that turn on the host, the ways the memory tests do not cover: a stack overflow, a
//! flood of output, a huge response body. Each must stay the guest's own problem: the request
//! fails or streams, the process's memory stays bounded, and a neighbour keeps answering.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use shoal_core::problem::{ErrorBody, ErrorCode};
use shoal_runtime::{DEFAULT_LOG_BYTES, HttpService, InstanceConfig, LogSink, Runtime};

/// One test at a time: two of them measure the whole process's resident memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any one of these tests may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(120);

async fn service(runtime: &Runtime, wasm: &str, cfg: InstanceConfig) -> HttpService {
    let loaded = load(runtime, wasm).await;
    runtime.http_service(&loaded, cfg).expect("http service")
}

async fn hello_answers(hello: &HttpService) {
    let response = hello.handle(get("/hello")).await;
    let status = response.status();
    let body = body_text(response).await;
    assert_eq!(status, 200, "the neighbour answered {status}: {body}");
    assert_eq!(body, "Hello from Shoal!\n");
}

/// Asks `hello` until `done`, counting its answers in `answered`; fails on any but a 200.
async fn keep_asking(hello: HttpService, done: Arc<AtomicBool>, answered: Arc<AtomicUsize>) {
    while !done.load(Ordering::Relaxed) {
        hello_answers(&hello).await;
        answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Bytes of text `logs` holds now, and how many lines.
fn held(logs: &LogSink) -> (usize, usize) {
    let (lines, _) = logs.lines(0);
    (lines.iter().map(|l| l.line.len()).sum(), lines.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_overflow_answers_guest_trapped_and_the_next_request_is_served() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let logs = LogSink::new(100);
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            logs: logs.clone(),
            timeout: Some(Duration::from_secs(30)),
            ..config()
        },
    )
    .await;
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, config()).await;

    tokio::time::timeout(LIMIT, async {
        // Several at once and one after another: each overflow takes only its own instance,
        // and the stacks and slots it used serve the next requests.
        for _ in 0..3 {
            let overflows: Vec<_> = ["/faulty/stack", "/faulty/stack/shadow"]
                .into_iter()
                .cycle()
                .take(4)
                .map(|path| {
                    let faulty = faulty.clone();
                    tokio::spawn(async move { faulty.handle(get(path)).await })
                })
                .collect();
            for overflow in overflows {
                let response = overflow.await.unwrap();
                assert_eq!(response.status(), 500);
                assert_eq!(
                    error_body(response).await,
                    ErrorBody::new(ErrorCode::GuestTrapped, "guest trapped")
                );
            }
            let response = faulty.handle(get("/faulty/status/201")).await;
            assert_eq!(response.status(), 201);
            assert_eq!(body_text(response).await, "status 201");
            hello_answers(&hello).await;
        }
    })
    .await
    .expect("the overflows and the requests after them were answered in time");

    // Each overflow is recorded as a trap, for what it ran out of: the wasm call stack, whose
    // limit the engine checks, or the shadow stack, whose pointer then leaves the guest's
    // memory.
    let lines: Vec<String> = logs.lines(0).0.into_iter().map(|l| l.line).collect();
    let count = |line: &str| lines.iter().filter(|l| *l == line).count();
    let call_stack = "[shoal] GET /faulty/stack: guest trapped: wasm trap: call stack exhausted";
    let shadow_stack =
        "[shoal] GET /faulty/stack/shadow: guest trapped: wasm trap: out of bounds memory access";
    assert_eq!(
        (count(call_stack), count(shadow_stack)),
        (6, 6),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_stays_within_the_log_ring_while_a_neighbour_answers() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    // The line count is out of reach: the byte budget alone bounds the ring.
    let logs = LogSink::with_limits(usize::MAX, DEFAULT_LOG_BYTES);
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            logs: logs.clone(),
            timeout: Some(Duration::from_secs(60)),
            ..config()
        },
    )
    .await;
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, config()).await;
    hello_answers(&hello).await;

    let before = reset_peak();
    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let neighbour = tokio::spawn(keep_asking(hello, done.clone(), answered.clone()));
    // What the ring holds, sampled while the guest writes.
    let most_held = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let (logs, done, most_held) = (logs.clone(), done.clone(), most_held.clone());
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            while !done.load(Ordering::Relaxed) {
                most_held.fetch_max(held(&logs).0, Ordering::Relaxed);
                every.tick().await;
            }
        }
    });

    let started = Instant::now();
    let response = tokio::time::timeout(LIMIT, faulty.handle(get("/faulty/flood/64")))
        .await
        .expect("the flood ended in time");
    let took = started.elapsed();
    let answered_during = answered.load(Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    neighbour.await.unwrap();
    sampler.await.unwrap();
    let (_, high) = resident();

    assert_eq!(response.status(), 200);
    let said = body_text(response).await;
    let lines_written: usize = said
        .strip_prefix("flooded ")
        .and_then(|rest| rest.split_once(" bytes in "))
        .filter(|(bytes, _)| bytes.parse::<u64>().is_ok_and(|b| b >= 64 * MIB))
        .and_then(|(_, lines)| lines.strip_suffix(" lines")?.parse().ok())
        .unwrap_or_else(|| panic!("the guest says it wrote 64 MiB: {said}"));
    // Every line went through the ring: its cursor counted them all.
    assert_eq!(logs.next_cursor(), lines_written);

    let (bytes, lines) = held(&logs);
    let grew = high.saturating_sub(before);
    eprintln!(
        "flood: {lines_written} lines in {took:?}; the ring holds {lines} lines, {bytes} bytes \
         (at most {} sampled); resident memory grew by {} KiB at its peak; the neighbour \
         answered {answered_during} times meanwhile",
        most_held.load(Ordering::Relaxed),
        grew >> 10
    );
    assert!(
        bytes <= DEFAULT_LOG_BYTES && most_held.load(Ordering::Relaxed) <= DEFAULT_LOG_BYTES,
        "the ring holds {bytes} bytes (at most {} sampled) past its {DEFAULT_LOG_BYTES}",
        most_held.load(Ordering::Relaxed)
    );
    assert!(
        lines > 0 && lines < lines_written,
        "{lines} of {lines_written}"
    );
    assert!(
        grew < 64 * MIB,
        "resident memory grew by {} MiB for 64 MiB of output",
        grew >> 20
    );
    assert!(
        answered_during > 0,
        "the neighbour answered during the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_streams_through_without_being_held() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            timeout: Some(Duration::from_secs(60)),
            ..config()
        },
    )
    .await;
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, config()).await;
    hello_answers(&hello).await;

    let size = 256 * MIB;
    let before = reset_peak();
    let started = Instant::now();
    let (received, neighbour_answered) = tokio::time::timeout(LIMIT, async {
        let response = faulty.handle(get("/faulty/huge/256")).await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let (mut received, mut neighbour_answered) = (0u64, 0);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the body streams without error");
            if let Some(data) = frame.data_ref() {
                assert!(data.iter().all(|&b| b == b'x'), "the guest's bytes");
                received += data.len() as u64;
            }
            // Twice on the way, stop reading for a while and ask the neighbour: a host that
            // buffered the body would let the guest run ahead into memory meanwhile.
            if neighbour_answered < 2 && received >= (neighbour_answered + 1) * size / 3 {
                for _ in 0..50 {
                    hello_answers(&hello).await;
                }
                neighbour_answered += 1;
            }
        }
        (received, neighbour_answered)
    })
    .await
    .expect("the body streamed in time");
    let took = started.elapsed();
    let (_, high) = resident();

    let grew = high.saturating_sub(before);
    eprintln!(
        "huge: {} MiB in {took:?}; resident memory grew by {} KiB at its peak",
        received >> 20,
        grew >> 10
    );
    assert_eq!(received, size, "the whole body arrived");
    assert_eq!(
        neighbour_answered, 2,
        "the neighbour answered while it streamed"
    );
    assert!(
        grew < 64 * MIB,
        "resident memory grew by {} MiB while a {} MiB body streamed",
        grew >> 20,
        size >> 20
    );
}
