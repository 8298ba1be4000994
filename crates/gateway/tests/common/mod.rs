//! Helpers shared by the gateway's integration tests: fixture components on a private
//! runtime, gateways served on ephemeral loopback ports, an HTTP client (plain, or over TLS
//! as a member of the cluster), and a cluster CA with its members' certificates.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use shoal_core::problem::ErrorBody;
use shoal_core::spec::AppKey;
use shoal_gateway::Gateway;
use shoal_runtime::{HttpService, InstanceConfig, Runtime, RuntimeConfig};
use tokio::net::TcpListener;

const MIB: u64 = 1 << 20;

/// A runtime on its own cache dir, with a small pool so parallel tests stay light.
pub fn runtime(cache_dir: &Path) -> Runtime {
    let mut config = RuntimeConfig::new(cache_dir);
    config.max_instances = 64;
    config.max_memory_bytes = 256 * MIB;
    Runtime::new(config).expect("runtime starts")
}

pub fn instance(env: &[(&str, &str)]) -> InstanceConfig {
    InstanceConfig {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        memory_limit: 64 * MIB,
        ..InstanceConfig::default()
    }
}

pub async fn service(runtime: &Runtime, wasm: &str, config: InstanceConfig) -> HttpService {
    let bytes = shoal_fixtures::read(wasm);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let loaded = runtime
        .load(&digest, Path::new(wasm))
        .await
        .expect("fixture loads");
    runtime.http_service(&loaded, config).expect("http service")
}

pub fn app(name: &str) -> AppKey {
    AppKey::new("default", name)
}

/// Serves `gateway` on an ephemeral loopback port.
pub async fn serve(gateway: &Gateway) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(shoal_gateway::serve(listener, gateway.clone()));
    addr
}

/// An address nothing listens on: bound, then released.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `error.code` of a gateway's JSON error body.
    pub fn error_code(&self) -> String {
        self.problem().code().as_str().to_string()
    }

    /// The body of an error Shoal answered, checked to be its one JSON error shape, served
    /// as `application/json` with the status its code maps to.
    pub fn problem(&self) -> ErrorBody {
        assert_eq!(
            self.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "{} {}",
            self.status,
            self.text()
        );
        let body = ErrorBody::from_json(&self.text())
            .unwrap_or_else(|e| panic!("not a Shoal error body ({e}): {}", self.text()));
        assert_eq!(self.status.as_u16(), body.status(), "{}", self.text());
        body
    }
}

#[derive(Clone)]
pub struct HttpClient(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>);

impl HttpClient {
    /// A plain-text client (it refuses `https://`).
    pub fn new() -> Self {
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        Self::over(tls)
    }

    /// A client for `https://` and `http://` with these TLS settings: a member's, say.
    pub fn over(tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        HttpClient(Client::builder(TokioExecutor::new()).build(https))
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_send(method, url, headers, body)
            .await
            .expect("the request is answered")
    }

    /// [`HttpClient::send`], with why it got no answer (a refused handshake, say).
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("valid request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.0.request(req))
            .await
            .expect("answered within 30 s")
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body streams").to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }
}

/// The node every gateway of [`Members::gateway`] is: hops to them name it.
pub const GATEWAY_NODE: &str = "n";

/// A cluster CA, and certificates of its members on 127.0.0.1: what nodes' gateways and
/// the control plane prove themselves to each other with.
pub struct Members {
    ca: shoal_tls::Authority,
    _dir: tempfile::TempDir,
}

impl Members {
    pub fn new() -> Members {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = shoal_tls::Authority::load_or_create(dir.path()).expect("a CA");
        Members { ca, _dir: dir }
    }

    /// A new member's TLS settings, from a key of its own, as a node gets them at start.
    pub fn member(&self) -> shoal_tls::Mutual {
        self.node(GATEWAY_NODE)
    }

    /// [`Members::member`] for node `name`.
    pub fn node(&self, name: &str) -> shoal_tls::Mutual {
        let key = shoal_tls::NodeKey::generate().unwrap();
        let pem = self
            .ca
            .issue_node(&key.request(name).unwrap(), name, &["127.0.0.1".into()])
            .unwrap();
        shoal_tls::mutual(&key.with_certificate(&pem).unwrap(), self.ca.pem()).unwrap()
    }

    /// A client with the control plane's certificate, for the gateways of [`Members::gateway`].
    pub fn control_plane(&self) -> HttpClient {
        let issued = self.ca.issue_client(shoal_tls::CONTROL_PLANE).unwrap();
        HttpClient::over(
            shoal_tls::mutual(&issued, self.ca.pem())
                .unwrap()
                .client_for(GATEWAY_NODE),
        )
    }

    /// A gateway configuration of a member.
    pub fn gateway(&self) -> shoal_gateway::GatewayConfig {
        shoal_gateway::GatewayConfig {
            members: Some(self.member()),
            ..shoal_gateway::GatewayConfig::default()
        }
    }

    /// A client that trusts the cluster CA but has no certificate of its own.
    pub fn anonymous_client(&self) -> HttpClient {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(shoal_tls::ca_der(self.ca.pem()).unwrap().into())
            .unwrap();
        HttpClient::over(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    /// A client presenting a member's certificate, for the gateways of [`Members::gateway`].
    pub fn client(&self) -> HttpClient {
        HttpClient::over(self.member().client_for(GATEWAY_NODE))
    }
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request as wasmtime hands an outbound policy: absolute URI, `host` header, empty body.
pub fn outgoing(url: &str) -> http::Request<shoal_runtime::WasiBody> {
    let uri: http::Uri = url.parse().expect("valid url");
    let host = uri.authority().expect("absolute url").to_string();
    http::Request::get(uri)
        .header("host", host)
        .body(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("valid request")
}
