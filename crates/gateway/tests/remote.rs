//! Two gateways on loopback standing in for two nodes: requests to A for a replica on B are
//! proxied to B, dead nodes are retried around and marked down, forwarded requests are
//! pinned to their replica, and p2c spreads load.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use shoal_core::Route;
use shoal_gateway::{Endpoint, Gateway, GatewayConfig, RemoteReplica};

fn routes(gateway: &Gateway) {
    gateway.set_routes(vec![
        (Route::parse("/hello").unwrap(), app("hello")),
        (Route::parse("/faulty").unwrap(), app("faulty")),
    ]);
}

fn remote(
    entries: &[(&str, &str, String)],
) -> HashMap<shoal_core::spec::AppKey, Vec<RemoteReplica>> {
    let mut map: HashMap<_, Vec<_>> = HashMap::new();
    for (name, replica, node) in entries {
        map.entry(app(name)).or_default().push(RemoteReplica {
            node: GATEWAY_NODE.into(),
            replica: replica.to_string(),
            revision: 1,
            gateway: node.clone(),
            timeout: None,
        });
    }
    map
}

/// Node B runs `hello-b` (greeting "from node b") and `faulty-b`; returns B's gateway and
/// address.
async fn node_b(runtime: &shoal_runtime::Runtime) -> (Gateway, String) {
    let b = Gateway::new(GatewayConfig::default());
    routes(&b);
    let hello = service(
        runtime,
        shoal_fixtures::HELLO_WASM,
        instance(&[("GREETING", "from node b")]),
    )
    .await;
    let faulty = service(runtime, shoal_fixtures::FAULTY_WASM, instance(&[])).await;
    b.add_endpoint(app("hello"), Endpoint::local("hello-b".into(), 1, hello, 8));
    b.add_endpoint(
        app("faulty"),
        Endpoint::local("faulty-b".into(), 1, faulty, 8),
    );
    let addr = serve(&b).await.to_string();
    (b, addr)
}

#[tokio::test]
async fn a_replica_on_another_node_answers_through_this_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;

    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    a.set_remote_endpoints(remote(&[
        ("hello", "hello-b", b_addr.clone()),
        ("faulty", "faulty-b", b_addr.clone()),
    ]));
    let a_addr = serve(&a).await;
    let client = HttpClient::new();

    let reply = client.get(&format!("http://{a_addr}/hello/x?y=1")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/plain");
    assert_eq!(reply.text(), "from node b\n");
    for header in [
        "x-shoal-replica",
        "x-shoal-app",
        "x-shoal-hop",
        "x-shoal-error",
    ] {
        assert!(
            !reply.headers.contains_key(header),
            "{header} leaked to the client"
        );
    }

    // The guest learns the client's address and scheme from the gateway the client
    // reached; the hop to B adds nothing of its own.
    let reply = client
        .send(
            Method::GET,
            &format!("http://{a_addr}/faulty/headers"),
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            Bytes::new(),
        )
        .await;
    let seen = reply.text();
    let forwarded: Vec<&str> = seen
        .lines()
        .filter(|l| l.starts_with("x-forwarded-"))
        .collect();
    assert_eq!(
        forwarded,
        [
            "x-forwarded-for: 203.0.113.7, 127.0.0.1",
            "x-forwarded-proto: http"
        ],
        "{seen}"
    );

    // A guest's status and a streamed 1 MiB body come back intact, both ways.
    let reply = client
        .get(&format!("http://{a_addr}/faulty/status/418"))
        .await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    let upload: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let reply = client
        .send(
            Method::POST,
            &format!("http://{a_addr}/faulty/echo"),
            &[("content-type", "application/x-test")],
            upload.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/x-test");
    assert_eq!(reply.body.len(), upload.len());
    assert!(reply.body == upload, "the echoed body differs");

    // The remote endpoint's in-flight count returns to zero once the bodies are done.
    let faulty = app("faulty");
    eventually(Duration::from_secs(5), "no request in flight on A", || {
        a.endpoint_status(&faulty).iter().all(|e| e.inflight == 0)
    })
    .await;
    let status = a.endpoint_status(&faulty);
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].node_gateway.as_deref(), Some(b_addr.as_str()));
    assert!(!status[0].down);
}

/// An answer the guest finished before its head went out is sent with its length, on the
/// replica's node and through a hop: head and body in one write, no chunks. HEAD gets no
/// length made up from its empty body, and an answer still being written stays chunked.
#[tokio::test]
async fn a_finished_answer_goes_out_with_its_length_through_a_hop() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;
    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    a.set_remote_endpoints(remote(&[("faulty", "faulty-b", b_addr.clone())]));
    let a_addr = serve(&a).await.to_string();
    let client = HttpClient::new();
    for addr in [&b_addr, &a_addr] {
        let reply = client.get(&format!("http://{addr}/faulty/whole")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["content-length"], "5", "{addr}");
        assert!(!reply.headers.contains_key("transfer-encoding"), "{addr}");
        assert_eq!(reply.text(), "whole");

        let head = (client.send(
            Method::HEAD,
            &format!("http://{addr}/faulty/whole"),
            &[],
            "",
        ))
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(!head.headers.contains_key("content-length"), "{addr}");

        // 1 MiB streamed 64 KiB at a time: more than is taken before the head goes out.
        let huge = client.get(&format!("http://{addr}/faulty/huge/1")).await;
        assert_eq!(huge.status, StatusCode::OK);
        assert_eq!(huge.headers["transfer-encoding"], "chunked", "{addr}");
        assert_eq!(huge.body.len(), 1 << 20);
    }
}

#[tokio::test]
async fn requests_in_flight_count_on_the_node_whose_replica_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (b, b_addr) = node_b(&runtime).await;
    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    a.set_remote_endpoints(remote(&[("faulty", "faulty-b", b_addr)]));
    let a_addr = serve(&a).await;
    let slow = tokio::spawn(async move {
        HttpClient::new()
            .get(&format!("http://{a_addr}/faulty/sleep/1000"))
            .await
    });
    let (faulty, hello) = (app("faulty"), app("hello"));
    eventually(Duration::from_secs(10), "the request runs on B", || {
        b.local_in_flight() == [(faulty.clone(), 1, 1), (hello.clone(), 1, 0)]
    })
    .await;
    // A routed it, B's replica serves it: only B counts it as its own.
    assert!(a.local_in_flight().is_empty());
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    eventually(Duration::from_secs(5), "the request done on B", || {
        b.local_in_flight() == [(faulty.clone(), 1, 0), (hello.clone(), 1, 0)]
    })
    .await;
}

/// A replica whose node sends no response head within its timeout and the node's waits is
/// a 504 (not sent again: it may have run), and its endpoint is out until the next status.
#[tokio::test]
async fn a_late_answer_is_a_timeout_and_takes_its_endpoint_out() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;
    let a = Gateway::new(GatewayConfig {
        body_timeout: Duration::from_millis(50),
        queue_timeout: Duration::from_millis(50),
        ..GatewayConfig::default()
    });
    routes(&a);
    let mut status = remote(&[("faulty", "faulty-b", b_addr.clone())]);
    for replicas in status.values_mut() {
        replicas[0].timeout = Some(Duration::from_millis(100));
    }
    a.set_remote_endpoints(status);
    let a_addr = serve(&a).await;
    // Node B's own timeout for it is 30 s: it answers after 7 s, past 0.1 + 0.05 + 5 (a GET
    // has no body to wait for).
    let reply = HttpClient::new()
        .get(&format!("http://{a_addr}/faulty/sleep/7000"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert_eq!(reply.error_code(), "timeout");
    assert!(a.endpoints(&app("faulty")).is_empty());
}

#[tokio::test]
async fn a_dead_node_is_retried_around_and_kept_down_until_listed_again_a_while_later() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;
    let dead = closed_port().await.to_string();

    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    let status = remote(&[
        ("hello", "hello-dead", dead.clone()),
        ("hello", "hello-b", b_addr.clone()),
        ("faulty", "faulty-dead", dead.clone()),
    ]);
    a.set_remote_endpoints(status.clone());
    let a_addr = serve(&a).await;
    let client = HttpClient::new();

    let hello = app("hello");
    for _ in 0..30 {
        let reply = client.get(&format!("http://{a_addr}/hello")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), "from node b\n");
    }
    // p2c over two endpoints picks both in turn when idle, so the dead one was tried.
    assert_eq!(a.endpoints(&hello), ["hello-b"]);
    let dead_status = a
        .endpoint_status(&hello)
        .into_iter()
        .find(|e| e.replica == "hello-dead")
        .expect("still listed");
    assert!(dead_status.down);
    assert_eq!(dead_status.inflight, 0);
    // The dead node refused a connection: its replicas of other apps went down with it.
    assert!(a.endpoints(&app("faulty")).is_empty());

    // A status that lists the endpoints again brings them back, once they have been out a
    // while (3 s): a dead node is listed until it misses its heartbeats.
    a.set_remote_endpoints(status.clone());
    assert_eq!(a.endpoints(&hello), ["hello-b"], "not at once");
    eventually(Duration::from_secs(10), "back in rotation", || {
        a.endpoints(&hello).len() == 2
    })
    .await;
    // No other replica to send it to: a 502.
    let reply = client
        .send(
            Method::POST,
            &format!("http://{a_addr}/faulty/echo"),
            &[],
            "payload",
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), "bad_gateway");
    // The client learns which replica and why, not where the node is.
    assert!(reply.text().contains("faulty-dead"), "{}", reply.text());
    assert!(!reply.text().contains(&dead), "{}", reply.text());
    // Now down, and with nothing else to pick, the app has no ready replicas.
    let reply = client.get(&format!("http://{a_addr}/faulty/x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_ready_replicas");

    a.set_remote_endpoints(status);
    eventually(Duration::from_secs(10), "back in rotation", || {
        !a.endpoints(&app("faulty")).is_empty()
    })
    .await;
    // Back again: a GET with only a dead endpoint has nowhere to retry: 502, and it is down again.
    let reply = client.get(&format!("http://{a_addr}/faulty/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), "bad_gateway");
    assert!(a.endpoints(&app("faulty")).is_empty());
}

/// A request with a small body is sent again to another replica where no guest can have
/// seen it (the node refused the connection); one whose connection broke once it was sent
/// only if its method is idempotent.
#[tokio::test]
async fn a_request_with_a_body_is_sent_again_only_where_no_guest_saw_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;
    let dead = closed_port().await.to_string();
    // A node that takes each connection, reads the request and drops it unanswered.
    let breaker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken = breaker.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = breaker.accept().await {
            let mut request = [0; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut request).await;
        }
    });
    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    let a_addr = serve(&a).await;
    let client = HttpClient::new();
    let faulty = app("faulty");
    let echo = format!("http://{a_addr}/faulty/echo");

    a.set_remote_endpoints(remote(&[
        ("faulty", "faulty-dead", dead),
        ("faulty", "faulty-b", b_addr.clone()),
    ]));
    for _ in 0..10 {
        let reply = client.send(Method::POST, &echo, &[], "payload").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), "payload");
    }
    // p2c picks both of two idle endpoints in turn: the dead one was tried.
    assert_eq!(a.endpoints(&faulty), ["faulty-b"]);

    a.set_remote_endpoints(remote(&[
        ("faulty", "faulty-broken", broken.clone()),
        ("faulty", "faulty-b", b_addr.clone()),
    ]));
    let mut failed = 0;
    for _ in 0..10 {
        let reply = client.send(Method::POST, &echo, &[], "payload").await;
        match reply.status {
            StatusCode::OK => assert_eq!(reply.text(), "payload"),
            StatusCode::BAD_GATEWAY => failed += 1,
            other => panic!("{other}: {}", reply.text()),
        }
        if a.endpoints(&faulty) == ["faulty-b"] {
            break;
        }
    }
    assert_eq!(
        failed, 1,
        "the POST that reached the broken node was not sent again"
    );

    a.set_remote_endpoints(remote(&[
        ("faulty", "faulty-broken-2", broken),
        ("faulty", "faulty-b", b_addr),
    ]));
    for _ in 0..10 {
        let reply = client.send(Method::PUT, &echo, &[], "payload").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), "payload");
    }
    assert_eq!(a.endpoints(&faulty), ["faulty-b"]);
}

#[tokio::test]
async fn forwarded_requests_are_pinned_to_their_replica_and_headers_stay_internal() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let (_b, b_addr) = node_b(&runtime).await;
    let client = HttpClient::new();

    // B refuses a replica it does not run, even though the app has another one there.
    let reply = client
        .send(
            Method::GET,
            &format!("http://{b_addr}/faulty/x"),
            &[
                ("x-shoal-replica", "faulty-gone"),
                ("x-shoal-app", "default/faulty"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "replica_gone");

    // The replica it does run gets the request without Shoal's headers.
    let reply = client
        .send(
            Method::GET,
            &format!("http://{b_addr}/faulty/headers"),
            &[
                ("x-shoal-replica", "faulty-b"),
                ("x-shoal-app", "default/faulty"),
                ("x-shoal-hop", "1"),
                ("x-custom", "kept"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.text();
    assert!(seen.contains("x-custom: kept"), "{seen}");
    assert!(
        !seen.contains("x-shoal"),
        "internal headers reached the guest: {seen}"
    );

    // Through A, a stale endpoint (B no longer runs it) is retried on the live one and
    // marked down; the guest sees no internal header either way.
    let a = Gateway::new(GatewayConfig::default());
    routes(&a);
    a.set_remote_endpoints(remote(&[
        ("faulty", "faulty-gone", b_addr.clone()),
        ("faulty", "faulty-b", b_addr.clone()),
    ]));
    let a_addr = serve(&a).await;
    // Idle endpoints tie, and a tie goes either way: enough rounds pick the stale one.
    for _ in 0..40 {
        let reply = client
            .send(
                Method::GET,
                &format!("http://{a_addr}/faulty/headers"),
                &[("x-shoal-replica", "spoofed")],
                Bytes::new(),
            )
            .await;
        // A request arriving with the header is itself treated as forwarded: A does not
        // run "spoofed", so it refuses rather than forwarding a second time.
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.error_code(), "replica_gone");

        let reply = client.get(&format!("http://{a_addr}/faulty/headers")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(!reply.text().contains("x-shoal"), "{}", reply.text());
    }
    assert_eq!(a.endpoints(&app("faulty")), ["faulty-b"]);
}

#[tokio::test]
async fn p2c_spreads_concurrent_requests_over_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    routes(&gateway);
    let faulty = service(&runtime, shoal_fixtures::FAULTY_WASM, instance(&[])).await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local("one".into(), 1, faulty.clone(), 8),
    );
    gateway.add_endpoint(app("faulty"), Endpoint::local("two".into(), 1, faulty, 8));
    let addr = serve(&gateway).await;
    let client = HttpClient::new();

    let requests: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            let url = format!("http://{addr}/faulty/sleep/500");
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    let key = app("faulty");
    let mut peak: HashMap<String, usize> = HashMap::new();
    eventually(Duration::from_secs(10), "both endpoints busy", || {
        for e in gateway.endpoint_status(&key) {
            let p = peak.entry(e.replica).or_default();
            *p = e.inflight.max(*p);
        }
        peak.len() == 2 && peak.values().all(|&n| n > 0)
    })
    .await;
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.text(), "slept 500 ms");
    }
}

#[tokio::test]
async fn equal_load_prefers_the_local_replica() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    routes(&gateway);
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, instance(&[])).await;
    gateway.add_endpoint(app("hello"), Endpoint::local("here".into(), 1, hello, 8));
    // A remote endpoint nobody answers for: picking it even once would mark it down.
    let dead = closed_port().await.to_string();
    gateway.set_remote_endpoints(remote(&[("hello", "there", dead)]));

    for _ in 0..20 {
        let req = http::Request::get("/hello")
            .header("host", "test.local")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = gateway.handle(req).await;
        assert_eq!(response.status(), StatusCode::OK);
        // Reading the body to its end releases the in-flight count before the next request.
        response.into_body().collect().await.unwrap();
    }
    let mut ready = gateway.endpoints(&app("hello"));
    ready.sort();
    assert_eq!(
        ready,
        ["here", "there"],
        "the remote endpoint was never tried"
    );
}
