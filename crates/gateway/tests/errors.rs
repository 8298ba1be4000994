//! Every error Shoal answers on a node's listener, the gateway's own and the runtime's for a
//! guest, has one shape: `{"error":{"code","message"}}` as `application/json`, with the
//! status its code maps to. And the node's internal surface (log reads, pinned hops) is
//! reachable only by the cluster's members: over TLS, with a certificate of the cluster CA.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use shoal_core::Route;
use shoal_core::auth::NODE_LOGS_PATH;
use shoal_core::problem::{ErrorBody, ErrorCode};
use shoal_gateway::{Endpoint, Gateway, GatewayConfig, RemoteReplica};
use shoal_runtime::{InstanceConfig, LogSink, Runtime, RuntimeConfig};

fn routed(config: GatewayConfig) -> Gateway {
    let gateway = Gateway::new(config);
    gateway.set_routes(vec![
        (Route::parse("/faulty").unwrap(), app("faulty")),
        (Route::parse("/idle").unwrap(), app("idle")),
    ]);
    gateway
}

/// `faulty` served locally by `gateway` as replica `id`.
async fn faulty_here(
    runtime: &Runtime,
    gateway: &Gateway,
    id: &str,
    max_concurrency: u32,
    timeout: Duration,
) {
    let config = InstanceConfig {
        timeout: Some(timeout),
        ..instance(&[])
    };
    let faulty = service(runtime, shoal_fixtures::FAULTY_WASM, config).await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local(id.into(), 1, faulty, max_concurrency),
    );
}

fn remote(replica: &str, node: &str) -> HashMap<shoal_core::spec::AppKey, Vec<RemoteReplica>> {
    HashMap::from([(
        app("faulty"),
        vec![RemoteReplica {
            node: GATEWAY_NODE.into(),
            replica: replica.into(),
            revision: 1,
            gateway: node.into(),
            timeout: None,
        }],
    )])
}

/// A node starting (again) does not know the cluster's routes until its agent has read them:
/// a request waits for them, and is served once they are loaded; past the wait it is a 503,
/// never a 404 `no_route` for an app that exists.
#[tokio::test]
async fn a_starting_gateway_waits_for_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    gateway.starting();
    let request = || {
        http::Request::get("/faulty/status/200")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let ready = || async {
        let req = http::Request::get(shoal_gateway::READY_PATH)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        gateway.handle(req).await.status()
    };
    // A load balancer asking is told at once: not yet.
    assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);
    let waiting = gateway.handle(request());
    tokio::pin!(waiting);
    assert!(
        futures::poll!(&mut waiting).is_pending(),
        "answered before the routes were loaded"
    );
    gateway.set_routes(vec![(Route::parse("/faulty").unwrap(), app("faulty"))]);
    faulty_here(&runtime, &gateway, "faulty-1", 8, Duration::from_secs(5)).await;
    gateway.loaded();
    assert_eq!(waiting.await.status(), StatusCode::OK);
    assert_eq!(ready().await, StatusCode::OK);
    // Shutting down: not ready any more, and serving on.
    gateway.stopping();
    assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(gateway.handle(request()).await.status(), StatusCode::OK);

    // One whose routes never come (its control plane is down) gets a 503 in time.
    let starting = Gateway::new(GatewayConfig {
        hold_timeout: Duration::from_millis(200),
        ..GatewayConfig::default()
    });
    starting.starting();
    let addr = serve(&starting).await;
    let reply = HttpClient::new()
        .get(&format!("http://{addr}/faulty/status/200"))
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.problem().code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn guest_failures_and_unknown_routes_answer_in_the_one_shape() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = routed(GatewayConfig::default());
    faulty_here(
        &runtime,
        &gateway,
        "faulty-1",
        8,
        Duration::from_millis(500),
    )
    .await;
    let addr = serve(&gateway).await;
    let client = HttpClient::new();

    let reply = client.get(&format!("http://{addr}/faulty/trap")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        reply.problem(),
        ErrorBody::new(ErrorCode::GuestTrapped, "guest trapped")
    );

    let reply = client
        .get(&format!("http://{addr}/faulty/sleep/60000"))
        .await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        reply.problem(),
        ErrorBody::new(ErrorCode::Timeout, "guest timed out after 500ms")
    );

    // A path with a dot segment reaches no app: routed as sent, `/faulty/..` would be
    // faulty's to resolve.
    let reply = client.get(&format!("http://{addr}/faulty/../idle/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem().code(), ErrorCode::BadRequest);

    // `OPTIONS *` and CONNECT are refused, whatever route `/` would find: only a path goes
    // to a replica.
    for (method, target) in [("OPTIONS", "*"), ("CONNECT", "faulty:443")] {
        let request = http::Request::builder()
            .method(method)
            .uri(target)
            .header("host", "faulty")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = gateway.handle(request).await;
        assert_eq!(
            answer.status(),
            StatusCode::BAD_REQUEST,
            "{method} {target}"
        );
    }

    // A URI's authority is the host, over a `host` sent beside it: the guest sees the one
    // the request was routed by.
    let request = http::Request::get("http://a.example/faulty/authority")
        .header("host", "attacker.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = gateway.handle(request).await;
    let body = http_body_util::BodyExt::collect(answer.into_body()).await;
    assert_eq!(&body.unwrap().to_bytes()[..], b"http://a.example");

    // A request off the wire that names no one host is refused (RFC 9112, 3.2); HTTP/1.0
    // needs none.
    for (head, status) in [
        (
            "GET /faulty/status/200 HTTP/1.1\r\nhost: a\r\nhost: b\r\n",
            "400",
        ),
        ("GET /faulty/status/200 HTTP/1.1\r\n", "400"),
        ("GET /faulty/status/200 HTTP/1.0\r\n", "200"),
    ] {
        let answer = raw_request(addr, &format!("{head}connection: close\r\n\r\n")).await;
        let line = answer.lines().next().unwrap_or_default();
        assert!(line.contains(&format!(" {status} ")), "{head}: {answer}");
    }
    // What the client's connection names as its own stops at the gateway.
    let request = http::Request::get("/faulty/headers")
        .header("host", "faulty")
        .header("connection", "x-secret")
        .header("x-secret", "s")
        .header("x-kept", "k")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = gateway.handle(request).await;
    let body = http_body_util::BodyExt::collect(answer.into_body()).await;
    let seen = String::from_utf8_lossy(&body.unwrap().to_bytes()).into_owned();
    assert!(
        seen.contains("x-kept") && !seen.contains("x-secret"),
        "{seen}"
    );

    let reply = client.get(&format!("http://{addr}/nowhere/x")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let body = reply.problem();
    assert_eq!(body.code(), ErrorCode::NoRoute);
    assert!(body.error.message.contains("/nowhere/x"), "{body:?}");

    let reply = client.get(&format!("http://{addr}/idle")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.problem().code(), ErrorCode::NoReadyReplicas);
    assert!(!reply.headers.contains_key("retry-after"));

    // A guest's own error answer is the guest's: passed through as it is.
    let reply = client
        .get(&format!("http://{addr}/faulty/status/500"))
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.text(), "status 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_capacity_is_the_same_503_from_the_gateway_and_the_runtime() {
    // The gateway's: the replica's one permit is taken and the queue timeout passes.
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = routed(GatewayConfig {
        queue_timeout: Duration::from_millis(50),
        ..GatewayConfig::default()
    });
    faulty_here(&runtime, &gateway, "faulty-1", 1, Duration::from_secs(10)).await;
    let permits = gateway_at_capacity(&gateway).await;

    // The runtime's: the node's instance pool has one slot, and it is taken.
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path());
    config.max_instances = 1;
    config.max_memory_bytes = 64 << 20;
    let small = Runtime::new(config).unwrap();
    let gateway = routed(GatewayConfig::default());
    faulty_here(&small, &gateway, "faulty-1", 8, Duration::from_secs(10)).await;
    let pool = gateway_at_capacity(&gateway).await;

    for reply in [&permits, &pool] {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.headers["retry-after"], "1");
        let body = reply.problem();
        assert_eq!(body.code(), ErrorCode::AtCapacity);
        assert!(body.error.message.ends_with("retry shortly"), "{body:?}");
    }
}

/// Holds `gateway`'s faulty replica busy with a slow request and returns what a second
/// request gets meanwhile.
async fn gateway_at_capacity(gateway: &Gateway) -> Reply {
    let addr = serve(gateway).await;
    let client = HttpClient::new();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get(&format!("http://{addr}/faulty/sleep/1500"))
                .await
        })
    };
    let key = app("faulty");
    eventually(Duration::from_secs(10), "the slow request runs", || {
        gateway.endpoint_status(&key).iter().any(|e| e.inflight > 0)
    })
    .await;
    // In flight once it holds the permit; it takes its instance a moment later. Ask
    // until the answer is a 503, for as long as the slow request runs.
    let mut reply = client
        .get(&format!("http://{addr}/faulty/status/200"))
        .await;
    while reply.status != StatusCode::SERVICE_UNAVAILABLE && !slow.is_finished() {
        reply = client
            .get(&format!("http://{addr}/faulty/status/200"))
            .await;
    }
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    reply
}

/// Node B of the cluster of `members`, serving `faulty-b` over TLS; B and its address.
async fn member_b(runtime: &Runtime, members: &Members) -> (Gateway, String) {
    let b = routed(members.gateway());
    faulty_here(runtime, &b, "faulty-b", 8, Duration::from_secs(10)).await;
    let addr = serve(&b).await.to_string();
    (b, addr)
}

#[tokio::test]
async fn a_hop_to_a_gone_replica_answers_replica_gone() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let (_b, b_addr) = member_b(&runtime, &members).await;
    let client = HttpClient::new();

    // B itself, asked by a peer for a replica it does not run: refused, with the header
    // that tells the sender nothing ran.
    let reply = members
        .client()
        .send(
            Method::GET,
            &format!("https://{b_addr}/faulty/x"),
            &[
                ("x-shoal-replica", "faulty-gone"),
                ("x-shoal-app", "default/faulty"),
                ("x-shoal-hop", "1"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["x-shoal-error"], "replica_gone");
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.problem().code(), ErrorCode::ReplicaGone);

    // A, whose only endpoint is that stale one: the client gets replica_gone, and no
    // internal header.
    let a = routed(members.gateway());
    a.set_remote_endpoints(remote("faulty-gone", &b_addr));
    let a_addr = serve(&a).await;
    let reply = client
        .send(
            Method::POST,
            &format!("http://{a_addr}/faulty/echo"),
            &[],
            "payload",
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert!(!reply.headers.contains_key("x-shoal-error"));
    let body = reply.problem();
    assert_eq!(body.code(), ErrorCode::ReplicaGone);
    assert!(body.error.message.contains("faulty-gone"), "{body:?}");
    assert!(a.endpoints(&app("faulty")).is_empty(), "marked down");
}

/// A node that takes no connection (killed) takes every replica it ran out of rotation at the
/// first refusal, so the retry goes to another node, not to the next replica of the dead one.
#[tokio::test]
async fn a_refused_connection_takes_the_whole_node_out_of_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let (_b, b_addr) = member_b(&runtime, &members).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut endpoints = remote("faulty-b", &b_addr);
    let list = endpoints.get_mut(&app("faulty")).unwrap();
    for i in 0..8 {
        list.push(RemoteReplica {
            node: "dead".into(),
            replica: format!("faulty-dead-{i}"),
            revision: 1,
            gateway: dead_addr.clone(),
            timeout: None,
        });
    }
    let a = routed(members.gateway());
    a.set_remote_endpoints(endpoints);
    let a_addr = serve(&a).await;
    let client = HttpClient::new();
    for _ in 0..10 {
        let reply = client
            .get(&format!("http://{a_addr}/faulty/status/418"))
            .await;
        assert_eq!(reply.status, StatusCode::IM_A_TEAPOT, "{}", reply.text());
    }
    assert_eq!(a.endpoints(&app("faulty")), ["faulty-b"]);
}

/// A node may be issued a certificate for any address it says it has, so the address a hop
/// dials proves nothing: the peer must present the certificate of the node the status
/// names. Here B (node "n") stands at the address the status gives for node "m".
#[tokio::test]
async fn a_hop_takes_only_the_certificate_of_the_node_it_means() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let (_b, b_addr) = member_b(&runtime, &members).await;
    let a = routed(members.gateway());
    let a_addr = serve(&a).await;
    let client = HttpClient::new();

    let mut elsewhere = remote("faulty-b", &b_addr);
    for r in elsewhere.values_mut().flatten() {
        r.node = "m".into();
    }
    a.set_remote_endpoints(elsewhere);
    let reply = client
        .get(&format!("http://{a_addr}/faulty/status/418"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.text().contains("certificate"), "{}", reply.text());

    // Named as the node it is, B serves the same hop.
    a.set_remote_endpoints(remote("faulty-b", &b_addr));
    let reply = client
        .get(&format!("http://{a_addr}/faulty/status/418"))
        .await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT, "{}", reply.text());
}

#[tokio::test]
async fn internal_requests_from_outside_the_cluster_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let (b, b_addr) = member_b(&runtime, &members).await;
    let logs = LogSink::new(10);
    logs.push_system("started");
    b.set_log_lookup(Arc::new(move |replica: &str, _| {
        (replica == "faulty-b").then(|| logs.clone())
    }));
    let client = HttpClient::new();
    let pinned = [
        ("x-shoal-replica", "faulty-b"),
        ("x-shoal-app", "default/faulty"),
        ("x-shoal-hop", "1"),
    ];
    let send = |client: &HttpClient, url: String, headers: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        async move { client.send(Method::GET, &url, &headers, Bytes::new()).await }
    };

    // Any internal header, or the internal path, in plain text is refused whole: not
    // pinned, not routed with the headers stripped, not served.
    let refused = [
        ("/faulty/headers", pinned.to_vec()),
        ("/faulty/headers", vec![("x-shoal-replica", "faulty-b")]),
        ("/faulty/headers", vec![("x-shoal-hop", "1")]),
        ("/faulty/headers", vec![("x-shoal-error", "replica_gone")]),
        // The whole prefix is the cluster's, names it does not use yet too.
        ("/faulty/headers", vec![("X-Shoal-Caller", "evil")]),
        ("/_shoal/logs/faulty-b", vec![]),
    ];
    for (path, headers) in refused {
        let reply = send(&client, format!("http://{b_addr}{path}"), headers.clone()).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path} {headers:?}");
        assert_eq!(reply.problem().code(), ErrorCode::Forbidden);
        assert!(!reply.text().contains("started"), "{}", reply.text());
    }
    // Over TLS, a client without a certificate, or with another cluster's, gets no
    // connection at all.
    let stranger = Members::new().client();
    let anonymous = members.anonymous_client();
    for outsider in [&stranger, &anonymous] {
        for path in ["/_shoal/logs/faulty-b", "/faulty/headers"] {
            let url = format!("https://{b_addr}{path}");
            let refused = outsider
                .try_send(Method::GET, &url, &pinned, Bytes::new())
                .await;
            assert!(refused.is_err(), "{path}: {:?}", refused.map(|r| r.status));
        }
    }

    // Once the agent says who the nodes are, a certificate of a node no longer among them
    // (deleted) gets no connection, while the nodes' and the control plane's still do.
    b.set_members(["n".to_string(), "n2".to_string()]);
    let deleted = HttpClient::over(members.node("gone").client_for(GATEWAY_NODE));
    let logs_url = format!("https://{b_addr}{NODE_LOGS_PATH}faulty-b");
    let refused = deleted
        .try_send(Method::GET, &logs_url, &[], Bytes::new())
        .await;
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.status));
    let control_plane = members.control_plane();
    let reply = control_plane
        .send(Method::GET, &logs_url, &[], Bytes::new())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Replicas' output is the control plane's to read: another node's certificate hops, but
    // reads no logs.
    let n2 = HttpClient::over(members.node("n2").client_for(GATEWAY_NODE));
    let reply = n2.send(Method::GET, &logs_url, &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(!reply.text().contains("started"), "{}", reply.text());

    // The same requests from a member reach the internal surface...
    let member = members.client();
    let reply = send(
        &member,
        format!("https://{b_addr}/faulty/headers"),
        pinned.to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(!reply.text().contains("x-shoal"), "{}", reply.text());
    let reply = send(
        &control_plane,
        format!("https://{b_addr}{NODE_LOGS_PATH}faulty-b"),
        vec![],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let entry: serde_json::Value = serde_json::from_str(reply.text().trim()).unwrap();
    assert_eq!(
        (
            &entry["replica"],
            &entry["seq"],
            &entry["stream"],
            &entry["line"]
        ),
        (
            &serde_json::json!("faulty-b"),
            &serde_json::json!(0),
            &serde_json::json!("stderr"),
            &serde_json::json!("[shoal] started")
        ),
        "{entry}"
    );
    // A hop pinned to a replica is the app's request whatever its path says: never a read of
    // replicas' output, even from the control plane (its API proxy sends such hops).
    let reply = send(
        &control_plane,
        format!("https://{b_addr}{NODE_LOGS_PATH}faulty-b"),
        pinned.to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(!reply.text().contains("started"), "{}", reply.text());
    let reply = send(
        &control_plane,
        format!("https://{b_addr}{NODE_LOGS_PATH}elsewhere"),
        vec![],
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.problem().code(), ErrorCode::NotFound);
    // A request naming the app and no replica (the API proxy's, for an app at zero) is the
    // control plane's alone to send: dispatched as the app's traffic is. A node's is not.
    let unpinned = vec![("x-shoal-app", "default/faulty"), ("x-shoal-hop", "1")];
    let url = format!("https://{b_addr}/faulty/headers");
    let reply = send(&control_plane, url.clone(), unpinned.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(!reply.text().contains("x-shoal"), "{}", reply.text());
    let reply = send(&n2, url, unpinned).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.problem().code(), ErrorCode::ReplicaGone);
    // ...and a plain request is routed as ever.
    let reply = send(&client, format!("http://{b_addr}/faulty/headers"), vec![]).await;
    assert_eq!(reply.status, StatusCode::OK);

    // A gateway that would forward to B refuses a forged request instead of sending it on:
    // nothing is dispatched, so nothing is counted.
    let a = routed(members.gateway());
    a.set_remote_endpoints(remote("faulty-b", &b_addr));
    let a_addr = serve(&a).await;
    let reply = client
        .send(
            Method::GET,
            &format!("http://{a_addr}/faulty/headers"),
            &pinned,
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.problem().code(), ErrorCode::Forbidden);
    assert!(a.take_metrics().is_empty());
    // Its own hops go over TLS as a member, so B serves them.
    let reply = client.get(&format!("http://{a_addr}/faulty/headers")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(!reply.text().contains("x-shoal"), "{}", reply.text());
    assert_eq!(a.take_metrics().len(), 1);
}

/// Sends `request` as it is on a new connection to `addr` and reads the answer to its end.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}
