//! Canary rollouts at the gateway: a split sends its weight to the canary revision and never
//! refuses traffic the other side can serve, and request outcomes are counted per revision,
//! once, by the gateway that routed them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use shoal_core::Route;
use shoal_core::metrics::RevisionStats;
use shoal_gateway::{Endpoint, Gateway, GatewayConfig, RemoteReplica, Split};
use shoal_runtime::Runtime;

fn routed(config: GatewayConfig) -> Gateway {
    let gateway = Gateway::new(config);
    gateway.set_routes(vec![
        (Route::parse("/faulty").unwrap(), app("faulty")),
        (Route::parse("/none").unwrap(), app("none")),
    ]);
    gateway
}

/// A faulty replica that answers `/faulty/env/REV` with `revision`.
async fn replica(runtime: &Runtime, id: &str, revision: u64, max_concurrency: u32) -> Endpoint {
    let rev = revision.to_string();
    let faulty = service(
        runtime,
        shoal_fixtures::FAULTY_WASM,
        instance(&[("REV", &rev)]),
    )
    .await;
    Endpoint::local(id.into(), revision, faulty, max_concurrency)
}

fn split(gateway: &Gateway, canary: u64, weight: u8) {
    gateway.set_splits(HashMap::from([(app("faulty"), Split { canary, weight })]));
}

/// One request through `gateway` in process, its body read to the end.
async fn send(
    gateway: &Gateway,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test.local")
        .body(Full::new(body.into()))
        .unwrap();
    let response = gateway.handle(req).await;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(gateway: &Gateway, path: &str) -> (StatusCode, String) {
    send(gateway, Method::GET, path, "").await
}

/// How many of `n` requests each revision served, by what the replicas answer.
async fn served(gateway: &Gateway, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (status, body) = get(gateway, "/faulty/env/REV").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        *seen.entry(body).or_default() += 1;
    }
    seen
}

/// `(revision, requests, errors)` per reported revision, with the latency histogram checked
/// to hold one sample per request.
fn counts(stats: &[RevisionStats]) -> Vec<(u64, u64, u64)> {
    stats
        .iter()
        .map(|s| {
            assert_eq!(s.app, app("faulty"));
            assert_eq!(s.latency.total(), s.requests, "{s:?}");
            (s.revision, s.requests, s.errors)
        })
        .collect()
}

#[tokio::test]
async fn a_split_sends_its_weight_to_the_canary() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = routed(GatewayConfig::default());
    for endpoint in [
        replica(&runtime, "stable-a", 1, 8).await,
        replica(&runtime, "stable-b", 1, 8).await,
        replica(&runtime, "canary", 2, 8).await,
    ] {
        gateway.add_endpoint(app("faulty"), endpoint);
    }

    split(&gateway, 2, 20);
    let seen = served(&gateway, 500).await;
    let canary = seen.get("2").copied().unwrap_or_default();
    assert!(
        (50..=150).contains(&canary),
        "canary served {canary} of 500"
    );
    assert_eq!(seen["1"] + canary, 500);
    // Metrics attribute each request to the revision that answered it.
    assert_eq!(
        counts(&gateway.take_metrics()),
        [(1, 500 - canary as u64, 0), (2, canary as u64, 0)]
    );

    split(&gateway, 2, 0);
    assert_eq!(
        served(&gateway, 100).await,
        HashMap::from([("1".into(), 100)])
    );
    split(&gateway, 2, 100);
    assert_eq!(
        served(&gateway, 100).await,
        HashMap::from([("2".into(), 100)])
    );
    // A split only for another app leaves this one to plain p2c over all three.
    gateway.set_splits(HashMap::from([(
        app("none"),
        Split {
            canary: 2,
            weight: 100,
        },
    )]));
    let seen = served(&gateway, 100).await;
    assert!(seen.len() == 2, "{seen:?}");
}

#[tokio::test]
async fn a_split_never_refuses_what_the_other_side_can_serve() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = routed(GatewayConfig::default());
    gateway.add_endpoint(app("faulty"), replica(&runtime, "stable", 1, 8).await);
    // The canary runs on a node nobody answers for.
    let dead = closed_port().await.to_string();
    let status = HashMap::from([(
        app("faulty"),
        vec![RemoteReplica {
            node: GATEWAY_NODE.into(),
            replica: "canary".into(),
            revision: 2,
            gateway: dead,
            timeout: None,
        }],
    )]);
    gateway.set_remote_endpoints(status.clone());

    // All to the canary: the first request fails there, is retried on the stable side, and
    // the canary, now down, leaves its share to the stable side.
    split(&gateway, 2, 100);
    assert_eq!(
        served(&gateway, 50).await,
        HashMap::from([("1".into(), 50)])
    );
    let canary = gateway
        .endpoint_status(&app("faulty"))
        .into_iter()
        .find(|e| e.replica == "canary")
        .unwrap();
    assert!(canary.down && canary.revision == 2, "{canary:?}");
    // The failed hop produced no response: the retry's revision gets the request.
    assert_eq!(counts(&gateway.take_metrics()), [(1, 50, 0)]);

    // A canary revision with no endpoint at all, and a stable side with none in rotation.
    split(&gateway, 3, 50);
    assert_eq!(
        served(&gateway, 20).await,
        HashMap::from([("1".into(), 20)])
    );
    split(&gateway, 1, 0);
    assert_eq!(
        served(&gateway, 20).await,
        HashMap::from([("1".into(), 20)])
    );
    gateway.take_metrics();

    // Listed again at once, the canary stays out of rotation a while: its node may be dead
    // and still listed (until it misses its heartbeats).
    gateway.set_remote_endpoints(status.clone());
    split(&gateway, 2, 100);
    let (code, body) = send(&gateway, Method::POST, "/faulty/echo", "payload").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    gateway.take_metrics();
    // A canary replica in rotation takes a POST that cannot be retried (its body, past
    // 64 KiB, streams through and is not kept): its 502 is its own.
    let mut fresh = status;
    fresh.get_mut(&app("faulty")).unwrap()[0].replica = "canary-2".into();
    gateway.set_remote_endpoints(fresh);
    let big = vec![b'x'; 100_000];
    let (status, body) = send(&gateway, Method::POST, "/faulty/echo", big).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(counts(&gateway.take_metrics()), [(2, 1, 1)]);
}

#[tokio::test]
async fn metrics_count_requests_and_server_errors_per_revision() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = routed(GatewayConfig {
        queue_timeout: Duration::from_millis(50),
        ..GatewayConfig::default()
    });
    gateway.add_endpoint(app("faulty"), replica(&runtime, "one", 1, 1).await);
    gateway.add_endpoint(app("faulty"), replica(&runtime, "two", 2, 8).await);
    assert!(gateway.take_metrics().is_empty());

    // Revision 2: the guest's own statuses, and a trap the runtime turns into a 500.
    split(&gateway, 2, 100);
    for (path, status) in [
        ("/faulty/status/200", 200),
        ("/faulty/status/200", 200),
        ("/faulty/status/404", 404),
        ("/faulty/status/500", 500),
        ("/faulty/status/503", 503),
        ("/faulty/trap", 500),
    ] {
        assert_eq!(get(&gateway, path).await.0.as_u16(), status, "{path}");
    }

    // Revision 1, one permit: a slow request holds it, the next waits 50 ms and gets a 503.
    split(&gateway, 1, 100);
    let slow = tokio::spawn({
        let gateway = gateway.clone();
        async move { get(&gateway, "/faulty/sleep/500").await }
    });
    eventually(Duration::from_secs(10), "the slow request runs", || {
        gateway
            .endpoint_status(&app("faulty"))
            .iter()
            .any(|e| e.replica == "one" && e.inflight == 1)
    })
    .await;
    assert_eq!(
        get(&gateway, "/faulty/x").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "slept 500 ms".into()));
    assert_eq!(get(&gateway, "/faulty/x").await.0, StatusCode::OK);

    // No endpoint, no revision to blame: counted for the app under revision 0, so an app
    // that cannot serve shows in its error rate.
    let (status, body) = get(&gateway, "/none").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no_ready_replicas"), "{body}");

    let (stats, none): (Vec<_>, Vec<_>) =
        (gateway.take_metrics().into_iter()).partition(|s| s.app == app("faulty"));
    assert_eq!(
        none.iter()
            .map(|s| (&s.app, s.revision, s.requests, s.errors))
            .collect::<Vec<_>>(),
        [(&app("none"), 0, 1, 1)]
    );
    assert_eq!(counts(&stats), [(1, 3, 1), (2, 6, 3)]);
    // Time to the response head: the slow request is in the slowest bucket seen.
    assert!(stats[0].latency.quantile(1.0) >= Some(500), "{stats:?}");

    assert!(gateway.take_metrics().is_empty());
    get(&gateway, "/faulty/x").await;
    assert_eq!(counts(&gateway.take_metrics()), [(1, 1, 0)]);
}

#[tokio::test]
async fn a_forwarded_request_is_counted_by_the_gateway_that_routed_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let b = routed(GatewayConfig::default());
    b.add_endpoint(app("faulty"), replica(&runtime, "faulty-b", 7, 8).await);
    let b_addr = serve(&b).await.to_string();

    let a = routed(GatewayConfig::default());
    let remote = |replica: &str, revision, gateway: String| RemoteReplica {
        node: GATEWAY_NODE.into(),
        replica: replica.into(),
        revision,
        gateway,
        timeout: None,
    };
    a.set_remote_endpoints(HashMap::from([(
        app("faulty"),
        vec![
            remote("faulty-dead", 6, closed_port().await.to_string()),
            remote("faulty-b", 7, b_addr.clone()),
        ],
    )]));
    let a_addr = serve(&a).await;
    let client = HttpClient::new();

    // Idle endpoints tie, and a tie goes either way: enough rounds try the dead one.
    let mut requests = 0;
    while a.endpoints(&app("faulty")).len() == 2 {
        assert!(requests < 40, "the dead endpoint was never tried");
        let reply = client.get(&format!("http://{a_addr}/faulty/env/REV")).await;
        assert_eq!((reply.status, reply.text()), (StatusCode::OK, "7".into()));
        requests += 1;
    }
    // A guest's 5xx crosses the hop as it is, and counts as an error.
    let reply = client
        .get(&format!("http://{a_addr}/faulty/status/502"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);

    assert_eq!(counts(&a.take_metrics()), [(7, requests + 1, 1)]);
    assert!(b.take_metrics().is_empty(), "B counted forwarded requests");

    // B counts what it routes itself.
    let reply = client.get(&format!("http://{b_addr}/faulty/x")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(counts(&b.take_metrics()), [(7, 1, 0)]);
    assert!(a.take_metrics().is_empty());
}
