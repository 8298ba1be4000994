//! The listener speaks HTTP/1.1 and, to a client that opens with HTTP/2's preface (h2c with
//! prior knowledge), HTTP/2: many requests multiplexed on one connection, same routing. Hops
//! go over either, in TLS between members of the cluster.

mod common;

use bytes::Bytes;
use common::*;
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal_core::Route;
use shoal_gateway::{Endpoint, Gateway, GatewayConfig};

/// A gateway configured as `config` routing `/hello` to one local `hello` replica that
/// greets with "hi".
async fn hello_gateway(runtime: &shoal_runtime::Runtime, config: GatewayConfig) -> Gateway {
    let gateway = Gateway::new(config);
    gateway.set_routes(vec![(Route::parse("/hello").unwrap(), app("hello"))]);
    let hello = service(
        runtime,
        shoal_fixtures::HELLO_WASM,
        instance(&[("GREETING", "hi")]),
    )
    .await;
    gateway.add_endpoint(
        app("hello"),
        Endpoint::local("hello-1".into(), 1, hello, 64),
    );
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_carries_many_requests_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let addr = serve(&hello_gateway(&runtime, GatewayConfig::default()).await).await;

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an HTTP/2 connection");
    tokio::spawn(connection);
    // All in flight at once, on the one connection.
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let request = http::Request::get(format!("http://{addr}/hello?n={i}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = sender.send_request(request).await.expect("a response");
                let (version, status) = (response.version(), response.status());
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (version, status, String::from_utf8_lossy(&body).to_string())
            })
        })
        .collect();
    for request in requests {
        let (version, status, body) = request.await.unwrap();
        assert_eq!((version, status), (Version::HTTP_2, StatusCode::OK));
        assert_eq!(body, "hi\n");
    }
    let missing = http::Request::get(format!("http://{addr}/nowhere"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut sender = sender.clone();
    assert_eq!(
        sender.send_request(missing).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // HTTP/1.1 clients on the same listener are served as before.
    let reply = HttpClient::new().get(&format!("http://{addr}/hello")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "hi\n");
}

/// A peer that speaks one HTTP version only and answers every request with the version it
/// came in.
async fn one_version_peer(http2: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                let body = http_body_util::Full::new(Bytes::from(format!("{:?}", req.version())));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            let io = TokioIo::new(stream);
            if http2 {
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service),
                );
            } else {
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service),
                );
            }
        }
    });
    addr
}

/// A gateway routing `/hello` to one replica on the node whose gateway is `peer`, with
/// `timeout` as that replica's request timeout; the gateway's address.
async fn hopping_to(
    peer: std::net::SocketAddr,
    hop_http2: bool,
    timeout: Option<std::time::Duration>,
) -> std::net::SocketAddr {
    hopping_with(
        GatewayConfig {
            hop_http2,
            ..GatewayConfig::default()
        },
        peer,
        timeout,
    )
    .await
}

/// [`hopping_to`] with the gateway configured as `config`.
async fn hopping_with(
    config: GatewayConfig,
    peer: std::net::SocketAddr,
    timeout: Option<std::time::Duration>,
) -> std::net::SocketAddr {
    serve(&hopping_gateway(config, peer, timeout)).await
}

/// The gateway [`hopping_with`] serves.
fn hopping_gateway(
    config: GatewayConfig,
    peer: std::net::SocketAddr,
    timeout: Option<std::time::Duration>,
) -> Gateway {
    let gateway = Gateway::new(config);
    gateway.set_routes(vec![(Route::parse("/hello").unwrap(), app("hello"))]);
    gateway.set_remote_endpoints(std::collections::HashMap::from([(
        app("hello"),
        vec![shoal_gateway::RemoteReplica {
            node: GATEWAY_NODE.into(),
            replica: "hello-1".into(),
            revision: 1,
            gateway: peer.to_string(),
            timeout,
        }],
    )]));
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_go_over_the_http_version_the_gateway_is_told_to() {
    for peer_http2 in [true, false] {
        let peer = one_version_peer(peer_http2).await;
        for hop_http2 in [true, false] {
            let addr = hopping_to(peer, hop_http2, None).await;
            let client = HttpClient::new();
            for _ in 0..3 {
                let reply = client.get(&format!("http://{addr}/hello")).await;
                if hop_http2 == peer_http2 {
                    let version = if hop_http2 { "HTTP/2.0" } else { "HTTP/1.1" };
                    assert_eq!(
                        (reply.status, reply.text()),
                        (StatusCode::OK, version.into())
                    );
                } else {
                    // A hop in the version the peer does not speak gets nowhere.
                    assert!(reply.status.is_server_error(), "{}", reply.status);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_between_members_go_over_tls_in_either_http_version_and_outsiders_get_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let b_addr = serve(&hello_gateway(&runtime, members.gateway()).await).await;
    let client = HttpClient::new();
    for hop_http2 in [true, false] {
        let config = GatewayConfig {
            hop_http2,
            ..members.gateway()
        };
        let a = hopping_with(config, b_addr, None).await;
        for _ in 0..3 {
            let reply = client.get(&format!("http://{a}/hello")).await;
            assert_eq!(
                (reply.status, reply.text()),
                (StatusCode::OK, "hi\n".into())
            );
        }
    }
    // A head of as many fields as a client may send, with those a hop adds, crosses either
    // hop as it would reach the replica's own gateway: not refused for hyper's 100.
    for hop_http2 in [true, false] {
        let config = GatewayConfig {
            hop_http2,
            ..members.gateway()
        };
        let a = hopping_gateway(config, b_addr, None);
        let many = |fields: usize| {
            let mut req = http::Request::get("/hello").header("host", "example.com");
            for i in 1..fields {
                req = req.header(format!("x-field-{i}"), "v");
            }
            req.body(http_body_util::Empty::<Bytes>::new()).unwrap()
        };
        let status = a.handle(many(100)).await.status();
        assert_eq!(status, StatusCode::OK, "over HTTP/2: {hop_http2}");
        // One more, and any gateway refuses it, whatever the protocol it came in on.
        let refused = a.handle(many(101)).await;
        assert_eq!(
            refused.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
    // A gateway of no cluster hops in plain text, and another cluster's over TLS: neither
    // reaches b's replica.
    let plain = hopping_to(b_addr, true, None).await;
    let reply = client.get(&format!("http://{plain}/hello")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let stranger = hopping_with(Members::new().gateway(), b_addr, None).await;
    let reply = client.get(&format!("http://{stranger}/hello")).await;
    assert!(reply.status.is_server_error(), "{}", reply.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_to_a_node_that_never_answers_gives_up_after_the_replicas_timeout() {
    // A node that takes the connection and the request, and says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let addr = hopping_to(peer, false, Some(std::time::Duration::from_millis(100))).await;
    // The replica's 100 ms plus the hop's slack, then the client hears that it failed.
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        HttpClient::new().get(&format!("http://{addr}/hello")),
    )
    .await
    .expect("an answer before the client gives up");
    assert!(reply.status.is_server_error(), "{}", reply.status);
}

/// Sends `GET path` over TLS to `addr`, asking for `host` (SNI) and speaking `alpn`, trusting
/// only `ca` (PEM); the response's version, status and body.
async fn tls_get(
    addr: std::net::SocketAddr,
    host: &str,
    ca: &str,
    alpn: &[u8],
    path: &str,
    headers: &[(&str, &str)],
) -> (Version, StatusCode, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(shoal_tls::ca_der(ca).unwrap().into()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, stream)
        .await
        .expect("a TLS connection");
    let mut request = http::Request::get(format!("https://{host}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let response = if alpn == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let (version, status) = (response.version(), response.status());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (version, status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_gets_https_by_host_name_beside_plain_text_and_the_members() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let members = Members::new();
    let site_dir = tempfile::tempdir().unwrap();
    let site = shoal_tls::Authority::load_or_create(site_dir.path()).unwrap();
    let (ingress, _) = shoal_tls::ingress_config(&[site
        .issue_server(&["hello.test".into()])
        .unwrap()
        .keyed_chain()])
    .unwrap();
    let config = GatewayConfig {
        ingress_tls: Some(ingress),
        ..members.gateway()
    };
    let addr = serve(&hello_gateway(&runtime, config).await).await;

    // HTTPS for the host its certificate names, in the HTTP version the client offers.
    for (alpn, version) in [
        (&b"h2"[..], Version::HTTP_2),
        (b"http/1.1", Version::HTTP_11),
    ] {
        let reply = tls_get(addr, "hello.test", site.pem(), alpn, "/hello", &[]).await;
        assert_eq!(reply, (version, StatusCode::OK, "hi\n".into()));
    }
    // A public client over TLS is no member: internal headers get it a 403.
    let (_, status, _) = tls_get(
        addr,
        "hello.test",
        site.pem(),
        b"h2",
        "/hello",
        &[("x-shoal-replica", "hello-1"), ("x-shoal-hop", "1")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Plain text and the members are served on the same listener as before.
    let reply = HttpClient::new().get(&format!("http://{addr}/hello")).await;
    assert_eq!(
        (reply.status, reply.text()),
        (StatusCode::OK, "hi\n".into())
    );
    let reply = members
        .control_plane()
        .get(&format!("https://{addr}/_shoal/logs/nobody"))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
}
