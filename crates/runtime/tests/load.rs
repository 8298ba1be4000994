//! Loading and caching components, checking their kind, and running commands.

mod common;

use std::path::Path;

use common::*;
use shoal_runtime::{
    CompileCache, ExitStatus, InstanceConfig, LoadSource, LogSink, LogStream, RuntimeError,
};

fn artifact(runtime: &shoal_runtime::Runtime, wasm: &str) -> std::path::PathBuf {
    let digest = digest_of(wasm);
    let hex = digest.strip_prefix("sha256:").unwrap();
    runtime.artifact_dir().join(format!("{hex}.cwasm"))
}

#[tokio::test]
async fn a_second_load_is_a_memory_hit() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let first = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(first.source(), LoadSource::Compiled);
    let second = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(second.source(), LoadSource::Memory);
    assert_eq!(second.digest(), first.digest());
    assert!(artifact(&runtime, shoal_fixtures::HELLO_WASM).is_file());

    // After eviction the disk cache serves it.
    assert!(runtime.evict(first.digest()));
    let third = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(third.source(), LoadSource::DiskCache);
}

#[tokio::test]
async fn a_forgotten_component_is_gone_from_memory_and_disk_and_its_services_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let first = runtime(dir.path());
    let hello = load(&first, shoal_fixtures::HELLO_WASM).await;
    drop(first);
    // A later run sees what earlier runs compiled.
    let runtime = runtime(dir.path());
    let faulty = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    let cached = runtime.cached();
    assert!(
        cached.contains(hello.digest()) && cached.contains(faulty.digest()),
        "{cached:?}"
    );

    let service = runtime.http_service(&faulty, config()).unwrap();
    runtime.forget(faulty.digest());
    assert!(!runtime.cached().contains(faulty.digest()));
    assert!(!artifact(&runtime, shoal_fixtures::FAULTY_WASM).exists());
    assert!(
        runtime.cached().contains(hello.digest()),
        "only what was asked"
    );
    assert_eq!(service.handle(get("/status/202")).await.status(), 202);
    // Loading it again compiles it again.
    let again = load(&runtime, shoal_fixtures::FAULTY_WASM).await;
    assert_eq!(again.source(), LoadSource::Compiled);
}

#[tokio::test]
async fn a_restarted_runtime_loads_from_disk_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let first = runtime(dir.path());
    let compiled = load(&first, shoal_fixtures::FAULTY_WASM).await;
    assert_eq!(compiled.source(), LoadSource::Compiled);
    load(&first, shoal_fixtures::FAULTY_WASM).await;
    // A compile is a miss; a load from memory is no lookup at all.
    assert_eq!(first.compile_cache(), CompileCache { hits: 0, misses: 1 });

    let restarted = runtime(dir.path());
    let cached = load(&restarted, shoal_fixtures::FAULTY_WASM).await;
    assert_eq!(cached.source(), LoadSource::DiskCache);
    assert_eq!(
        restarted.compile_cache(),
        CompileCache { hits: 1, misses: 0 }
    );
    assert!(
        cached.elapsed() < compiled.elapsed(),
        "disk load {:?} should beat compiling {:?}",
        cached.elapsed(),
        compiled.elapsed()
    );

    // And what came from disk runs.
    let service = restarted.http_service(&cached, config()).unwrap();
    assert_eq!(service.handle(get("/status/202")).await.status(), 202);
}

#[tokio::test]
async fn concurrent_loads_compile_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let loads = (0..8).map(|_| {
        let runtime = runtime.clone();
        tokio::spawn(async move { load(&runtime, shoal_fixtures::HELLO_WASM).await.source() })
    });
    let mut sources = Vec::new();
    for source in futures::future::join_all(loads).await {
        sources.push(source.unwrap());
    }
    let compiled = sources
        .iter()
        .filter(|s| **s == LoadSource::Compiled)
        .count();
    assert_eq!(compiled, 1, "{sources:?}");
    assert!(
        sources
            .iter()
            .all(|s| matches!(s, LoadSource::Compiled | LoadSource::Memory))
    );
}

#[tokio::test]
async fn garbage_in_the_cache_is_recompiled_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let path = artifact(&runtime, shoal_fixtures::HELLO_WASM);
    std::fs::write(&path, b"\x7fELF not really an artifact").unwrap();

    let loaded = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(loaded.source(), LoadSource::Compiled);
    let service = runtime.http_service(&loaded, config()).unwrap();
    assert_eq!(
        body_text(service.handle(get("/")).await).await,
        "Hello from Shoal!\n"
    );
    // The bad file was replaced by a good one.
    let restarted = common::runtime(dir.path());
    let again = load(&restarted, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(again.source(), LoadSource::DiskCache);
}

#[tokio::test]
async fn another_components_artifact_under_our_name_is_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let first = runtime(dir.path());
    load(&first, shoal_fixtures::GREET_JOB_WASM).await;
    // A valid artifact, but of greet-job, placed where hello's belongs.
    std::fs::copy(
        artifact(&first, shoal_fixtures::GREET_JOB_WASM),
        artifact(&first, shoal_fixtures::HELLO_WASM),
    )
    .unwrap();
    // A truncated one must not be used either.
    let truncated = {
        let bytes = std::fs::read(artifact(&first, shoal_fixtures::GREET_JOB_WASM)).unwrap();
        bytes[..bytes.len() / 2].to_vec()
    };

    let restarted = runtime(dir.path());
    let hello = load(&restarted, shoal_fixtures::HELLO_WASM).await;
    assert_eq!(hello.source(), LoadSource::Compiled);
    restarted
        .http_service(&hello, config())
        .expect("it is hello, not greet-job");

    std::fs::write(artifact(&first, shoal_fixtures::GREET_JOB_WASM), truncated).unwrap();
    let job = load(&runtime(dir.path()), shoal_fixtures::GREET_JOB_WASM).await;
    assert_eq!(job.source(), LoadSource::Compiled);
}

#[tokio::test]
async fn kinds_are_checked_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let job = load(&runtime, shoal_fixtures::GREET_JOB_WASM).await;
    let hello = load(&runtime, shoal_fixtures::HELLO_WASM).await;

    let err = runtime.http_service(&job, config()).unwrap_err();
    assert!(matches!(err, RuntimeError::NotHttp { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("does not export wasi:http/incoming-handler@0.2")
            && message.contains("kind \"http\" needs a wasi:http/proxy component")
            && message.contains("wasi:cli/run@0.2"),
        "{message}"
    );

    let err = runtime.command(&hello, config()).unwrap_err();
    assert!(matches!(err, RuntimeError::NotCommand { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("does not export wasi:cli/run@0.2")
            && message.contains("wasi:http/incoming-handler@0.2"),
        "{message}"
    );
}

#[tokio::test]
async fn bad_inputs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());

    let err = runtime
        .load("sha256:missing", Path::new("/nonexistent/app.wasm"))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::ReadWasm { .. }), "{err}");

    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, b"hello").unwrap();
    let err = runtime.load("sha256:notwasm", &not_wasm).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Compile { .. }), "{err}");
    // A failed load is not cached as a failure: fixing the file fixes the load.
    std::fs::copy(shoal_fixtures::HELLO_WASM, &not_wasm).unwrap();
    let fixed = runtime.load("sha256:notwasm", &not_wasm).await.unwrap();
    assert_eq!(fixed.source(), LoadSource::Compiled);

    let hello = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    let too_big = InstanceConfig {
        memory_limit: 1 << 40,
        ..config()
    };
    let err = runtime.http_service(&hello, too_big).unwrap_err();
    assert!(
        err.to_string()
            .contains("exceeds this node's per-instance maximum of 256 MiB"),
        "{err}"
    );
}

#[tokio::test]
async fn greet_job_runs_to_completion_with_captured_output() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let job = load(&runtime, shoal_fixtures::GREET_JOB_WASM).await;
    let logs = LogSink::new(100);
    let command = runtime
        .command(
            &job,
            InstanceConfig {
                env: vec![("NAME".into(), "Shoal".into())],
                args: vec!["greet-job".into()],
                logs: logs.clone(),
                ..config()
            },
        )
        .unwrap();

    assert_eq!(command.run().await, ExitStatus::Exited(0));
    let (lines, _) = logs.lines(0);
    let stdout: Vec<_> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(
        stdout,
        [
            "greet-job: starting",
            "greet-job: step 1/3, hello Shoal",
            "greet-job: step 2/3, hello Shoal",
            "greet-job: step 3/3, hello Shoal",
            "greet-job: done",
        ]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.stream == LogStream::Stderr
                && l.line == "greet-job: this line goes to stderr")
    );

    // Each run is a fresh instance: running again prints the same lines again.
    assert_eq!(command.run().await, ExitStatus::Exited(0));
    assert_eq!(logs.lines(0).0.len(), lines.len() * 2);
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let job = load(&runtime, shoal_fixtures::GREET_JOB_WASM).await;
    let logs = LogSink::new(100);
    let command = runtime
        .command(
            &job,
            InstanceConfig {
                env: vec![("EXIT_CODE".into(), "3".into())],
                logs: logs.clone(),
                ..config()
            },
        )
        .unwrap();

    let status = command.run().await;
    assert_eq!(status, ExitStatus::Exited(3));
    assert_eq!(status.to_string(), "exited with code 3");
    assert!(!status.success());
    let (lines, _) = logs.lines(0);
    assert_eq!(
        lines.last().map(|l| l.line.as_str()),
        Some("[shoal] exited with code 3")
    );
}
