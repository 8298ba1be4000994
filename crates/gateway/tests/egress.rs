//! Granted egress reaches a granted host on its granted port, and only public addresses
//! unless the node allows private ones: a grant cannot be turned into a way into the node.

mod common;

use common::outgoing;
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use shoal_core::spec::AppKey;
use shoal_gateway::{Gateway, GatewayConfig};
use shoal_runtime::{HttpError, OutboundPolicy, WasiBody};
use tokio::net::TcpListener;

async fn call(policy: &dyn OutboundPolicy, url: &str) -> Result<StatusCode, HttpError> {
    let response: Response<WasiBody> = policy.send(outgoing(url), None).await?;
    Ok(response.status())
}

fn gateway(allow_private_egress: bool) -> Gateway {
    Gateway::new(GatewayConfig {
        allow_private_egress,
        ..GatewayConfig::default()
    })
}

/// A plain HTTP server on loopback standing in for a host outside Shoal.
async fn outside() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"outside"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An HTTPS server on loopback, its certificate (for `localhost`) from a CA of its own;
/// returns its address and that CA's certificate (DER).
async fn outside_over_tls() -> (SocketAddr, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = shoal_tls::Authority::load_or_create(dir.path()).unwrap();
    let issued = ca.issue_server(&["localhost".into()]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        shoal_tls::server_config(&shoal_tls::LiveCert::new(&issued).unwrap()).unwrap(),
    );
    let ca_der = shoal_tls::ca_der(ca.pem()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"over tls"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca_der)
}

#[tokio::test]
async fn https_egress_reaches_a_granted_host_whose_certificate_checks_out() {
    let (addr, ca) = outside_over_tls().await;
    let port = addr.port();
    let url = format!("https://localhost:{port}/");
    let grants = vec![format!("localhost:{port}")];

    let trusting = Gateway::new(GatewayConfig {
        allow_private_egress: true,
        egress_roots: vec![ca],
        ..GatewayConfig::default()
    });
    let policy = trusting.outbound(&caller(), grants.clone());
    assert_eq!(call(policy.as_ref(), &url).await.unwrap(), StatusCode::OK);

    // A certificate from a CA the node does not trust is not taken.
    let stranger = gateway(true);
    let policy = stranger.outbound(&caller(), grants.clone());
    let refused = call(policy.as_ref(), &url).await;
    assert!(refused.is_err(), "{refused:?}");
    // Nor is a name the certificate is not for.
    let policy = trusting.outbound(&caller(), vec![format!("127.0.0.1:{port}")]);
    let wrong_name = call(policy.as_ref(), &format!("https://127.0.0.1:{port}/")).await;
    assert!(wrong_name.is_err(), "{wrong_name:?}");
    // Plain HTTP to a TLS port gets no answer either.
    let policy = trusting.outbound(&caller(), grants);
    let plain = call(policy.as_ref(), &format!("http://localhost:{port}/")).await;
    assert!(!matches!(plain, Ok(StatusCode::OK)), "{plain:?}");
}

fn denied(result: &Result<StatusCode, HttpError>) -> bool {
    matches!(result, Err(HttpError::HttpRequestDenied))
}

/// The app whose guest calls out.
fn caller() -> AppKey {
    AppKey::new("default", "caller")
}

#[tokio::test]
async fn a_granted_host_is_reached_on_its_granted_port_only() {
    let granted = outside().await;
    let other = outside().await;
    let gateway = gateway(true);
    let port = granted.port();
    let policy = gateway.outbound(
        &caller(),
        vec![format!("localhost:{port}"), "127.0.0.1".into()],
    );
    let policy = policy.as_ref();

    assert_eq!(
        call(policy, &format!("http://localhost:{port}/"))
            .await
            .unwrap(),
        StatusCode::OK
    );
    let wrong_port = call(policy, &format!("http://localhost:{}/", other.port())).await;
    assert!(denied(&wrong_port), "{wrong_port:?}");
    // A grant without a port is port 80's.
    let unnamed_port = call(policy, &format!("http://{other}/")).await;
    assert!(denied(&unnamed_port), "{unnamed_port:?}");
}

/// `url` under `grant` is refused by a node that keeps guests off private addresses, and
/// reached through one that allows them.
async fn refused_unless_private_egress_is_allowed(grant: String, url: &str) {
    let strict = gateway(false);
    let refused = call(
        strict.outbound(&caller(), vec![grant.clone()]).as_ref(),
        url,
    )
    .await;
    assert!(denied(&refused), "{refused:?}");

    let open = gateway(true);
    let allowed = call(open.outbound(&caller(), vec![grant]).as_ref(), url).await;
    assert_eq!(allowed.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_unless_the_node_allows_it() {
    let outside = outside().await;
    let port = outside.port();
    refused_unless_private_egress_is_allowed(
        format!("localhost:{port}"),
        &format!("http://localhost:{port}/"),
    )
    .await;
}

#[tokio::test]
async fn a_private_address_granted_explicitly_needs_the_node_to_allow_it() {
    let outside = outside().await;
    refused_unless_private_egress_is_allowed(outside.to_string(), &format!("http://{outside}/"))
        .await;
}

#[tokio::test]
async fn link_local_addresses_are_never_granted() {
    let open = gateway(true);
    let policy = open.outbound(
        &caller(),
        vec![
            "169.254.169.254".into(),
            "[fe80::1]".into(),
            "[::ffff:169.254.169.254]".into(),
        ],
    );
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
    ] {
        let refused = call(policy.as_ref(), url).await;
        assert!(denied(&refused), "{url}: {refused:?}");
    }
    let spec = "name = \"x\"\n[component]\nkind = \"http\"\npath = \"x.wasm\"\n\
                [network]\noutbound = [\"169.254.169.254\"]\n";
    let error = shoal_core::parse_app(spec).expect_err("a link-local grant is refused");
    assert_eq!(error.field.as_deref(), Some("network.outbound"));
}
