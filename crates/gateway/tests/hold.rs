//! Scale from zero at the gateway: a request for an app that wakes on demand is held,
//! counted for the agent to report, and answered once an endpoint arrives; within bounds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use shoal_core::Route;
use shoal_core::spec::Inbound;
use shoal_gateway::{Endpoint, Gateway, GatewayConfig, Tables};

fn tables(wake: bool) -> Tables {
    Tables {
        routes: vec![(Route::parse("/faulty").unwrap(), app("faulty"))],
        wake: if wake { vec![app("faulty")] } else { vec![] },
        ..Tables::default()
    }
}

/// Polls the gateway's held-request counts until `app` shows `n`.
async fn until_waiting(gateway: &Gateway, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            () = gateway.waiting_changed() => {}
            () = tokio::time::sleep_until(deadline.into()) => panic!("never {n} waiting"),
        }
        if gateway.take_waiting().contains(&(app("faulty"), n)) {
            return;
        }
    }
}

#[tokio::test]
async fn a_request_waits_for_the_first_endpoint_and_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    gateway.set_tables(tables(true));
    let addr = serve(&gateway).await;

    let client = HttpClient::new();
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.get(&format!("http://{addr}/faulty/env/REV")).await }
    });
    until_waiting(&gateway, 1).await;
    assert!(!held.is_finished(), "answered without an endpoint");

    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        instance(&[("REV", "1")]),
    )
    .await;
    gateway.add_endpoint(app("faulty"), Endpoint::local("r1".into(), 1, faulty, 4));
    let reply = held.await.unwrap();
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, "1".into()));
    // Nobody waits any more, and the agent hears so.
    until_waiting(&gateway, 0).await;
}

#[tokio::test]
async fn holding_is_bounded_in_time_and_number_and_only_for_apps_that_wake() {
    let gateway = Gateway::new(GatewayConfig {
        hold_timeout: Duration::from_millis(300),
        hold_limit: 1,
        ..GatewayConfig::default()
    });
    gateway.set_tables(tables(true));
    let addr = serve(&gateway).await;
    let client = HttpClient::new();

    let held = tokio::spawn({
        let client = client.clone();
        async move { client.get(&format!("http://{addr}/faulty/x")).await }
    });
    until_waiting(&gateway, 1).await;
    // Over the limit: refused at once, told when to retry.
    let over = client.get(&format!("http://{addr}/faulty/x")).await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(over.error_code(), "at_capacity");
    assert!(over.headers.contains_key("retry-after"));
    // Past the time bound: a 503 that says when to retry.
    let timed_out = held.await.unwrap();
    assert_eq!(timed_out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(timed_out.error_code(), "no_ready_replicas");
    assert!(timed_out.headers.contains_key("retry-after"));

    // An app that does not scale to zero answers 503 at once.
    gateway.set_tables(tables(false));
    let started = Instant::now();
    let reply = client.get(&format!("http://{addr}/faulty/x")).await;
    assert_eq!(reply.error_code(), "no_ready_replicas");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "it was held"
    );
}

#[tokio::test]
async fn a_request_held_for_an_app_deleted_meanwhile_is_told_so_at_once() {
    let gateway = Gateway::new(GatewayConfig::default());
    gateway.set_tables(tables(true));
    let addr = serve(&gateway).await;
    let client = HttpClient::new();
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.get(&format!("http://{addr}/faulty/x")).await }
    });
    until_waiting(&gateway, 1).await;

    // Its minimum raised, the app stops waking but is still coming: the request waits on.
    gateway.set_tables(Tables {
        wake: vec![],
        services: vec![(app("faulty"), Inbound::namespace("default"))],
        ..tables(false)
    });
    tokio::task::yield_now().await;
    assert!(
        !held.is_finished(),
        "let go while its app was still on its way"
    );

    // Deleted: a 404 now, not a 503 when the 30 s hold runs out.
    gateway.set_tables(Tables::default());
    let reply = held.await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "no_route");
    until_waiting(&gateway, 0).await;
}
