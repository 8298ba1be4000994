//! Service discovery: a guest's outgoing request reaches another app by name (in process or
//! on another node), a granted host over the network, and nothing else.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use shoal_core::spec::{AppKey, Caller, Inbound};
use shoal_gateway::{Endpoint, Gateway, GatewayConfig, RemoteReplica};
use shoal_runtime::{HttpError, InstanceConfig, OutboundPolicy, WasiBody};
use tokio::net::TcpListener;

async fn call(policy: &dyn OutboundPolicy, url: &str) -> Result<(StatusCode, String), HttpError> {
    let response: Response<WasiBody> = policy.send(outgoing(url), None).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn replica(id: &str, gateway: String) -> RemoteReplica {
    RemoteReplica {
        node: GATEWAY_NODE.into(),
        replica: id.into(),
        revision: 1,
        gateway,
        timeout: None,
    }
}

/// A plain HTTP server outside Shoal, answering `tiny <path>`.
async fn tiny_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = format!("tiny {}", req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn names_resolve_to_apps_granted_hosts_go_out_and_the_rest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    // The stand-in for the outside listens on loopback, a private address.
    let gateway = Gateway::new(GatewayConfig {
        allow_private_egress: true,
        ..GatewayConfig::default()
    });
    let hello = service(
        &runtime,
        shoal_fixtures::HELLO_WASM,
        instance(&[("GREETING", "hi")]),
    )
    .await;
    // No routes: a service is reachable by name without being exposed.
    gateway.add_endpoint(
        app("hello"),
        Endpoint::local("hello-1".into(), 1, hello.clone(), 4),
    );
    let tiny = tiny_server().await;
    let closed = closed_port().await;
    let policy = gateway.outbound(&app("web"), vec![tiny.to_string(), closed.to_string()]);
    let policy = policy.as_ref();

    assert_eq!(
        call(policy, "http://hello/hello").await.unwrap(),
        (StatusCode::OK, "hi\n".into())
    );
    assert_eq!(
        call(policy, "http://HELLO.default/").await.unwrap().1,
        "hi\n"
    );
    assert_eq!(call(policy, "http://hello:8080/x").await.unwrap().1, "hi\n");

    assert!(matches!(
        call(policy, "http://nope/").await,
        Err(HttpError::DestinationNotFound)
    ));
    assert!(matches!(
        call(policy, "http://nope.default/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    assert!(matches!(
        call(policy, "http://example.com/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    assert!(matches!(
        call(policy, "http://127.0.0.2/").await,
        Err(HttpError::HttpRequestDenied)
    ));

    // A declared service with no ready replica answers, with a 503.
    gateway.set_services(vec![(app("idle"), Inbound::namespace("default"))]);
    let (status, body) = call(policy, "http://idle/").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no_ready_replicas"), "{body}");

    // Bare names are the caller's namespace; other namespaces need `NAME.NS`, and the
    // consent of the app called: without `[network] inbound`, its namespace's apps only.
    let other = gateway.outbound(&AppKey::new("other", "web"), vec![]);
    assert!(matches!(
        call(other.as_ref(), "http://hello/").await,
        Err(HttpError::DestinationNotFound)
    ));
    assert!(matches!(
        call(other.as_ref(), "http://hello.default/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    let callers = |entries: &[&str]| {
        Inbound::new(
            entries
                .iter()
                .map(|e| Caller::parse(e, "default").unwrap())
                .collect(),
        )
    };
    gateway.set_services(vec![
        (app("idle"), Inbound::namespace("default")),
        (app("hello"), callers(&["web.other"])),
    ]);
    let stranger = gateway.outbound(&AppKey::new("other", "cron"), vec![]);
    assert!(matches!(
        call(stranger.as_ref(), "http://hello.default/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    assert!(
        matches!(
            call(policy, "http://hello/").await,
            Err(HttpError::HttpRequestDenied)
        ),
        "named callers only, its own namespace's apps too"
    );
    gateway.set_services(vec![(app("hello"), callers(&["web.other", "web"]))]);
    assert_eq!(call(policy, "http://hello/").await.unwrap().1, "hi\n");
    assert_eq!(
        call(other.as_ref(), "http://hello.default/")
            .await
            .unwrap()
            .1,
        "hi\n"
    );

    // A granted host is reached over http; https:// goes over TLS, so a plain-HTTP server
    // (no handshake) fails the call rather than answer it in clear (tests/egress.rs has TLS).
    assert_eq!(
        call(policy, &format!("http://{tiny}/ping")).await.unwrap(),
        (StatusCode::OK, "tiny /ping".into())
    );
    let over_tls = call(policy, &format!("https://{tiny}/ping")).await;
    assert!(
        over_tls.is_err() && !matches!(over_tls, Err(HttpError::HttpRequestDenied)),
        "{over_tls:?}"
    );
    // A granted host goes out, though an app has its name; https:// is never an app.
    gateway.add_endpoint(
        app("localhost"),
        Endpoint::local("localhost-1".into(), 1, hello.clone(), 4),
    );
    let port = tiny.port();
    let shadowed = gateway.outbound(&app("web"), vec![format!("localhost:{port}")]);
    assert_eq!(
        call(shadowed.as_ref(), &format!("http://localhost:{port}/ping"))
            .await
            .unwrap()
            .1,
        "tiny /ping"
    );
    assert_eq!(
        call(policy, "http://localhost/").await.unwrap().1,
        "hi\n",
        "not granted: the app"
    );
    assert!(matches!(
        call(policy, "https://hello/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    // A host granted on another port is no service either: not the app of its name.
    let elsewhere = gateway.outbound(&app("web"), vec![format!("localhost:{}", port + 1)]);
    assert!(matches!(
        call(elsewhere.as_ref(), "http://localhost/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    assert!(matches!(
        call(policy, "https://hello.default/").await,
        Err(HttpError::HttpRequestDenied)
    ));
    // Granted but down: the guest sees a connection error, not a denial.
    assert!(matches!(
        call(policy, &format!("http://{closed}/")).await,
        Err(HttpError::ConnectionRefused)
    ));
}

#[tokio::test]
async fn a_service_on_another_node_is_called_through_its_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let b = Gateway::new(GatewayConfig::default());
    let hello = service(
        &runtime,
        shoal_fixtures::HELLO_WASM,
        instance(&[("GREETING", "from node b")]),
    )
    .await;
    b.add_endpoint(app("hello"), Endpoint::local("hello-b".into(), 1, hello, 4));
    let b_addr = serve(&b).await.to_string();
    let dead = closed_port().await.to_string();

    // A knows the app only from remote endpoints, one of them on a dead node.
    let a = Gateway::new(GatewayConfig::default());
    let mut remote: HashMap<AppKey, Vec<RemoteReplica>> = HashMap::new();
    remote.insert(
        app("hello"),
        vec![replica("hello-dead", dead), replica("hello-b", b_addr)],
    );
    a.set_remote_endpoints(remote);
    let policy = a.outbound(&AppKey::new("default", "caller"), vec![]);
    for _ in 0..30 {
        let (status, body) = call(policy.as_ref(), "http://hello/greet").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "from node b\n");
    }
    assert_eq!(a.endpoints(&app("hello")), ["hello-b"]);
}

#[tokio::test]
async fn a_guest_calls_a_service_by_name_through_wasi_http() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            // Of the namespace `com`, as the app it reaches below.
            outbound: gateway.outbound(&AppKey::new("com", "caller"), vec![]),
            ..instance(&[])
        },
    )
    .await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local("faulty-1".into(), 1, faulty.clone(), 4),
    );
    let probe = || async {
        let req = Request::get("/net")
            .header("host", "test.local")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = faulty.handle(req).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    };

    // faulty's `/net` calls http://example.com/: no such app, not granted.
    let seen = probe().await;
    assert!(seen.starts_with("denied"), "{seen}");

    // Read as `NAME.NS`, that host is app `example` in namespace `com`: once it exists,
    // the same call reaches it by name, from inside the sandbox.
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, instance(&[])).await;
    gateway.add_endpoint(
        AppKey::new("com", "example"),
        Endpoint::local("example-1".into(), 1, hello, 4),
    );
    let seen = tokio::time::timeout(Duration::from_secs(30), probe())
        .await
        .unwrap();
    assert_eq!(seen, "allowed: 200");
}

#[tokio::test]
async fn a_guest_call_to_a_dead_node_is_retried_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let example = AppKey::new("com", "example");
    let b = Gateway::new(GatewayConfig::default());
    let hello = service(&runtime, shoal_fixtures::HELLO_WASM, instance(&[])).await;
    b.add_endpoint(
        example.clone(),
        Endpoint::local("example-b".into(), 1, hello, 4),
    );
    let b_addr = serve(&b).await.to_string();
    let dead = closed_port().await.to_string();

    let a = Gateway::new(GatewayConfig::default());
    let mut remote: HashMap<AppKey, Vec<RemoteReplica>> = HashMap::new();
    remote.insert(
        example.clone(),
        vec![replica("example-dead", dead), replica("example-b", b_addr)],
    );
    a.set_remote_endpoints(remote);
    let faulty = service(
        &runtime,
        shoal_fixtures::FAULTY_WASM,
        InstanceConfig {
            outbound: a.outbound(&AppKey::new("com", "caller"), vec![]),
            ..instance(&[])
        },
    )
    .await;

    // The guest's GET carries a body handle it finishes only after sending: the gateway has
    // to see that body end empty before it may send the request a second time.
    for _ in 0..30 {
        let req = Request::get("/net")
            .header("host", "test.local")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = faulty.handle(req).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), "allowed: 200");
    }
    assert_eq!(a.endpoints(&example), ["example-b"]);
}
