//! The gateway's hot path: route, pick an endpoint, take a permit, call.

use crate::RoutingTable;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use shoal_core::{Route, spec::AppKey};
use shoal_runtime::{HttpService, ResponseBody};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a request waits for a busy replica before it gets a 503.
    pub queue_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// One ready replica the gateway can send requests to.
pub struct Endpoint {
    pub replica: String,
    service: HttpService,
    permits: Arc<Semaphore>,
    inflight: Arc<AtomicUsize>,
}

impl Endpoint {
    pub fn local(replica: String, service: HttpService, max_concurrency: u32) -> Self {
        Endpoint {
            replica,
            service,
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            inflight: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: GatewayConfig,
    table: RwLock<Arc<RoutingTable>>,
    endpoints: RwLock<HashMap<AppKey, Arc<[Arc<Endpoint>]>>>,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Self {
        Gateway {
            inner: Arc::new(Inner {
                config,
                table: RwLock::new(Arc::new(RoutingTable::default())),
                endpoints: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Replaces the whole routing table.
    pub fn set_routes(&self, routes: Vec<(Route, AppKey)>) {
        *self.inner.table.write().expect("routing lock") = Arc::new(RoutingTable::new(routes));
    }

    pub fn add_endpoint(&self, app: AppKey, endpoint: Endpoint) {
        let mut map = self.inner.endpoints.write().expect("endpoint lock");
        let mut list: Vec<Arc<Endpoint>> = map
            .get(&app)
            .map(|l| {
                l.iter()
                    .filter(|e| e.replica != endpoint.replica)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        list.push(Arc::new(endpoint));
        map.insert(app, list.into());
    }

    /// Stops sending new requests to a replica; in-flight ones finish.
    pub fn remove_endpoint(&self, app: &AppKey, replica: &str) -> bool {
        let mut map = self.inner.endpoints.write().expect("endpoint lock");
        let Some(list) = map.get(app) else {
            return false;
        };
        let kept: Vec<Arc<Endpoint>> = list
            .iter()
            .filter(|e| e.replica != replica)
            .cloned()
            .collect();
        let removed = kept.len() != list.len();
        if kept.is_empty() {
            map.remove(app);
        } else {
            map.insert(app.clone(), kept.into());
        }
        removed
    }

    /// Replica ids of an app's ready endpoints.
    pub fn endpoints(&self, app: &AppKey) -> Vec<String> {
        let map = self.inner.endpoints.read().expect("endpoint lock");
        map.get(app)
            .map(|l| l.iter().map(|e| e.replica.clone()).collect())
            .unwrap_or_default()
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let host = request_host(&req);
        let table = self.inner.table.read().expect("routing lock").clone();
        let Some((_, app)) = table.lookup(host.as_deref(), req.uri().path()) else {
            return error(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!(
                    "no app serves {}{} on this gateway",
                    host.as_deref().unwrap_or(""),
                    req.uri().path()
                ),
            );
        };
        let endpoints = self
            .inner
            .endpoints
            .read()
            .expect("endpoint lock")
            .get(app)
            .cloned();
        let Some(endpoints) = endpoints.filter(|e| !e.is_empty()) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_ready_replicas",
                &format!("app {app} has no ready replicas"),
            );
        };
        let endpoint = pick(&endpoints);
        let permit = match endpoint.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let wait = endpoint.permits.clone().acquire_owned();
                match tokio::time::timeout(self.inner.config.queue_timeout, wait).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        let mut resp = error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "at_capacity",
                            &format!("app {app} is at its max concurrency; retry shortly"),
                        );
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                        return resp;
                    }
                }
            }
        };
        endpoint.inflight.fetch_add(1, Ordering::Relaxed);
        let guard = Guard {
            _permit: permit,
            inflight: endpoint.inflight.clone(),
        };
        let span = tracing::debug_span!("request", app = %app, replica = %endpoint.replica);
        let resp = endpoint.service.handle(req).instrument(span).await;
        resp.map(|body| {
            Guarded {
                inner: body,
                _guard: guard,
            }
            .boxed_unsync()
        })
    }
}

/// Power of two choices: two random endpoints, the less busy one wins.
fn pick(endpoints: &[Arc<Endpoint>]) -> &Arc<Endpoint> {
    if endpoints.len() == 1 {
        return &endpoints[0];
    }
    let a = fastrand::usize(..endpoints.len());
    let mut b = fastrand::usize(..endpoints.len() - 1);
    if b >= a {
        b += 1;
    }
    if endpoints[b].inflight() < endpoints[a].inflight() {
        &endpoints[b]
    } else {
        &endpoints[a]
    }
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_string).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })?;
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => raw,
    };
    Some(host.to_ascii_lowercase())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("static response parts are valid")
}

/// Held for the life of a response body: the replica's concurrency permit
/// and its in-flight count, both released when the body is done or dropped.
struct Guard {
    _permit: OwnedSemaphorePermit,
    inflight: Arc<AtomicUsize>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Guarded {
    inner: ResponseBody,
    _guard: Guard,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts connections forever, serving each with HTTP/1.1 keep-alive.
pub async fn serve(listener: TcpListener, gateway: Gateway) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
            }
        });
    }
}
