//! CPU sharing between apps with real guests: spinning `faulty` requests charged to their
//! groups, shared by weight on the guest threads, and held to a hard limit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shoal_runtime::{CpuShare, CpuUsage, HttpService, InstanceConfig, Runtime};

fn usage_of(runtime: &Runtime, group: &str) -> CpuUsage {
    runtime
        .cpu_usage()
        .into_iter()
        .find(|(g, _)| g.as_ref() == group)
        .map(|(_, usage)| usage)
        .unwrap_or_else(|| panic!("no account for {group}: {:?}", runtime.cpu_usage()))
}

async fn spinner(runtime: &Runtime, cpu: CpuShare, timeout: Duration) -> HttpService {
    let faulty = load(runtime, shoal_fixtures::FAULTY_WASM).await;
    runtime
        .http_service(
            &faulty,
            InstanceConfig {
                timeout: Some(timeout),
                cpu,
                ..config()
            },
        )
        .expect("http service")
}

const MS: u64 = 1_000_000;

#[tokio::test]
async fn a_hard_limit_throttles_a_spinning_guest_even_alone() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    // 100m: 10 ms of every 100 ms period.
    let limited = CpuShare {
        limit_millis: Some(100),
        ..CpuShare::new("limited", 100)
    };
    let faulty = spinner(&runtime, limited, Duration::from_secs(1)).await;

    let started = Instant::now();
    let response = faulty.handle(get("/loop")).await;
    let elapsed = started.elapsed();
    // Throttled or not, the timeout holds.
    assert_eq!(response.status(), 504);
    assert!(
        elapsed < Duration::from_millis(2500),
        "the throttled guest stopped after {elapsed:?}"
    );

    // About 10 periods of 10 ms, plus at most a slice of overrun: far from the second it spun.
    let usage = usage_of(&runtime, "limited");
    assert!(
        usage.used_ns > 10 * MS && usage.used_ns < 400 * MS,
        "{usage:?}"
    );
    // And the limit is what held it back: it waited on its quota. (On an idle machine most of
    // the second; on a starved one, where the guest could not even use its 10 %, much less:
    // 33 ms once, with a CI run and a test run sharing both cores.)
    assert!(usage.throttled_ns > 10 * MS, "{usage:?}");
}

#[tokio::test]
async fn spinning_groups_share_the_batch_thread_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    // One guest thread and one batch thread: the spinners compete for the batch one (where
    // they move after their first 2 ms), whatever the machine.
    let runtime = runtime_with_threads(dir.path(), 1);
    let timeout = Duration::from_millis(1500);
    let light = spinner(&runtime, CpuShare::new("light", 100), timeout).await;
    let heavy = spinner(&runtime, CpuShare::new("heavy", 300), timeout).await;

    let mut requests = Vec::new();
    for service in [&light, &heavy, &light, &heavy, &light, &heavy] {
        let service = service.clone();
        requests.push(tokio::spawn(async move {
            service.handle(get("/loop")).await.status()
        }));
    }
    for request in requests {
        assert_eq!(request.await.unwrap(), 504);
    }

    let light = usage_of(&runtime, "light");
    let heavy = usage_of(&runtime, "heavy");
    let ratio = heavy.used_ns as f64 / light.used_ns.max(1) as f64;
    // 3:1 by weight; generous, as the first and last slices fall as they may.
    assert!(
        (2.0..=4.5).contains(&ratio),
        "heavy/light = {ratio:.2}: light {light:?}, heavy {heavy:?}"
    );
    assert!(
        light.throttled_ns > heavy.throttled_ns,
        "{light:?} {heavy:?}"
    );
}

#[tokio::test]
async fn a_group_is_listed_while_it_has_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let hello = load(&runtime, shoal_fixtures::HELLO_WASM).await;
    let replica = || InstanceConfig {
        cpu: CpuShare::new("default/hello", 50),
        ..config()
    };
    let one = runtime.http_service(&hello, replica()).unwrap();
    let two = runtime.http_service(&hello, replica()).unwrap();
    assert_eq!(
        body_text(one.handle(get("/")).await).await,
        "Hello from Shoal!\n"
    );
    assert_eq!(
        body_text(two.handle(get("/")).await).await,
        "Hello from Shoal!\n"
    );

    let usage = runtime.cpu_usage();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].0.as_ref(), "default/hello");
    // A poll is charged when it ends, which may be just after the client has the body.
    eventually(Duration::from_secs(5), "CPU charged", || {
        runtime.cpu_usage()[0].1.used_ns > 0
    })
    .await;

    drop(one);
    assert_eq!(runtime.cpu_usage().len(), 1);
    drop(two);
    // A request's task lets go of its replica just after the body ended: poll for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !runtime.cpu_usage().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", runtime.cpu_usage());
        tokio::task::yield_now().await;
    }

    let zero = InstanceConfig {
        cpu: CpuShare {
            limit_millis: Some(0),
            ..CpuShare::new("default/hello", 50)
        },
        ..config()
    };
    let error = runtime.http_service(&hello, zero).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("CPU limit must be greater than 0"),
        "{error}"
    );
}
