//! Serving HTTP requests with `wasi:http` components, as `wasmtime serve` does. A p2
//! (`wasi:http/proxy`) component is linked once, and every request gets a fresh store and
//! instance, so nothing leaks between requests and a crash only fails its own request. A
//! replica whose spec asks for reuse ([`crate::Reuse`]) keeps instances that answered cleanly
//! for its next requests instead, up to its count and its idle time, as `wasmtime serve
//! --max-instance-reuse-count` does: an instance belongs to one replica, so to one app and one
//! revision. A p3 (`wasi:http/handler@0.3`) component is served by workers ([`crate::p3`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tracing::Instrument;
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::ExpirationError;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use crate::config::{Incident, IncidentKind};
use crate::config::{format_bytes, format_duration};
use crate::cpu::Metered;
use crate::host::{CancelOnDrop, Failure, Host, InstanceSettings, new_store, with_timeout};
use crate::memory::MemoryBudget;
use crate::p3::{Ended, Gone, GoneOnDrop, Hold, Job, Workers};
use crate::runtime::Runtime;
use crate::stats::InstanceStats;
use shoal_core::problem::{self, ErrorBody};

/// Body of the responses [`HttpService::handle`] returns: the guest's streaming body, or
/// Shoal's JSON error body ([`problem_response`]).
pub type ResponseBody = wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// A linked `wasi:http` component with its instance settings. Cheap to clone; share it
/// across connections.
#[derive(Clone)]
pub struct HttpService {
    inner: Arc<ServiceInner>,
}

struct ServiceInner {
    runtime: Runtime,
    digest: Arc<str>,
    settings: Arc<InstanceSettings>,
    backend: Backend,
}

/// How the component is served: the WASI version it targets decides.
pub(crate) enum Backend {
    P2 {
        pre: ProxyPre<Host>,
        /// Instances waiting for their next request, oldest first; empty unless reuse is on.
        idle: Mutex<Idle>,
    },
    P3(Arc<Workers>),
}

impl Drop for ServiceInner {
    fn drop(&mut self) {
        if let Backend::P3(workers) = &self.backend {
            workers.close();
        }
    }
}

pub(crate) struct Idle {
    instances: Vec<Reusable>,
    /// Whether a task is dropping instances whose idle time ran out.
    sweeping: bool,
    /// Told of every instance that starts or stops waiting here.
    stats: Arc<InstanceStats>,
}

impl Idle {
    fn new(stats: Arc<InstanceStats>) -> Idle {
        Idle {
            instances: Vec::new(),
            sweeping: false,
            stats,
        }
    }

    fn push(&mut self, instance: Reusable) {
        self.instances.push(instance);
        self.stats.idle_more(1);
    }

    /// The most recently used instance.
    fn pop(&mut self) -> Option<Reusable> {
        let instance = self.instances.pop()?;
        self.stats.idle_fewer(1);
        Some(instance)
    }

    fn clear(&mut self) {
        self.stats.idle_fewer(self.instances.len());
        self.instances.clear();
    }

    /// Drops the instances that have waited `ttl` or longer.
    fn drop_stale(&mut self, ttl: std::time::Duration) {
        if let Some(fresh) = Instant::now().checked_sub(ttl) {
            let stale = self.instances.partition_point(|i| i.since <= fresh);
            self.instances.drain(..stale);
            self.stats.idle_fewer(stale);
        }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.stats.idle_fewer(self.instances.len());
    }
}

/// An instance that answered cleanly, with the requests it has served.
struct Reusable {
    store: Store<Host>,
    proxy: Proxy,
    served: u32,
    since: Instant,
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpService")
            .field("digest", &self.inner.digest)
            .finish_non_exhaustive()
    }
}

type GuestResponse = Result<http::Response<ResponseBody>, ErrorCode>;

impl HttpService {
    pub(crate) fn p2(
        runtime: Runtime,
        digest: Arc<str>,
        pre: ProxyPre<Host>,
        settings: InstanceSettings,
    ) -> HttpService {
        HttpService {
            inner: Arc::new(ServiceInner {
                runtime,
                digest,
                backend: Backend::P2 {
                    pre,
                    idle: Mutex::new(Idle::new(settings.stats.clone())),
                },
                settings: Arc::new(settings),
            }),
        }
    }

    pub(crate) fn p3(
        runtime: Runtime,
        digest: Arc<str>,
        pre: wasmtime_wasi_http::p3::bindings::ServicePre<Host>,
        settings: InstanceSettings,
    ) -> HttpService {
        let settings = Arc::new(settings);
        HttpService {
            inner: Arc::new(ServiceInner {
                backend: Backend::P3(Workers::new(runtime.clone(), pre, settings.clone())),
                runtime,
                digest,
                settings,
            }),
        }
    }

    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Runs one request in an instance of the component. Never fails: whatever goes wrong in
    /// the guest becomes a 5xx in Shoal's JSON error shape (`timeout` 504, `at_capacity` 503
    /// when the instance pool is full or the node's memory budget has no room for a new
    /// instance within the wait, `guest_trapped` / `out_of_memory` / `guest_failed` 500), is
    /// logged, and is written to the replica's logs.
    ///
    /// Bodies stream both ways. The guest runs on the runtime's guest threads, not the
    /// caller's, metered for its CPU group, and keeps running there after it sent the
    /// response head, until it finishes the body or its timeout stops it.
    pub async fn handle<B>(&self, req: http::Request<B>) -> http::Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.handle_holding(req, ()).await
    }

    /// [`HttpService::handle`], keeping `hold` until the guest is done with the request: its
    /// instance has finished it, failed or been stopped (a p3 instance, which may write a
    /// body after its handler returned: until the instance ends). The response body may
    /// outlive that, waiting for a client that reads slowly or not at all; what a caller
    /// holds for a running guest (a concurrency permit) goes with `hold`, not with the body.
    pub async fn handle_holding<B, H>(
        &self,
        mut req: http::Request<B>,
        hold: H,
    ) -> http::Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
        H: Send + 'static,
    {
        // wasi:http requires an authority; a request straight from an HTTP/1 server has it only
        // in `host`, and a synthetic one (health probes) may have neither.
        if req.uri().authority().is_none() && !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, HeaderValue::from_static("localhost"));
        }
        *req.uri_mut() = addressed(&req);
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string());
        let started = Instant::now();
        self.inner.settings.stats.request();
        let response = match &self.inner.backend {
            Backend::P2 { pre, .. } => self.handle_p2(pre, req, hold, &method, &path).await,
            Backend::P3(workers) => {
                self.handle_p3(workers, req, Box::new(hold), &method, &path)
                    .await
            }
        };
        tracing::debug!(
            digest = %self.digest(),
            %method,
            %path,
            status = response.status().as_u16(),
            elapsed = ?started.elapsed(),
            "handled request"
        );
        response
    }

    async fn handle_p2<B>(
        &self,
        pre: &ProxyPre<Host>,
        req: http::Request<B>,
        hold: impl Send + 'static,
        method: &http::Method,
        path: &str,
    ) -> http::Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let inner = &self.inner;
        let meter = inner.settings.cpu.meter();
        let (mut store, reused) = match self.take_idle() {
            Some(idle) => {
                inner.settings.stats.reuse();
                let mut store = idle.store;
                store
                    .data_mut()
                    .next_request(inner.settings.timeout, meter.clone());
                (store, Some((idle.proxy, idle.served)))
            }
            None => {
                let Some(memory) = inner.runtime.reserve_memory(&inner.settings).await else {
                    self.report(&Failure::NoMemory, method, path);
                    return self.failure_response(&Failure::NoMemory);
                };
                (
                    new_store(pre.engine(), &inner.settings, meter.clone(), memory),
                    None,
                )
            }
        };
        let (sender, receiver) = oneshot::channel::<GuestResponse>();
        let resources = {
            let mut http = store.data_mut().http();
            let scheme = match req.extensions().get::<ClientTls>() {
                Some(ClientTls) => Scheme::Https,
                None => Scheme::Http,
            };
            http.new_incoming_request(scheme, req)
                .and_then(|req| Ok((req, http.new_response_outparam(sender)?)))
        };
        let (guest_req, out) = match resources {
            Ok(resources) => resources,
            Err(e) => {
                tracing::debug!(%method, %path, error = %format!("{e:#}"), "rejected request");
                return problem_response(problem::ErrorCode::BadRequest, "bad request");
            }
        };

        let pre = pre.clone();
        let span = tracing::debug_span!("request", digest = %self.digest(), %method, %path);
        let failed = Arc::new(AtomicBool::new(false));
        let task = inner.runtime.guests().spawn(Metered::new(meter.clone(), {
            let service = self.clone();
            let method = method.clone();
            let path = path.to_string();
            let failed = failed.clone();
            async move {
                // Kept until the guest has finished, or is stopped (then dropped with the task).
                let _hold = hold;
                let deadline = store.data().deadline();
                let result = async {
                    // A group over its share waits before it starts, not a slice later.
                    meter.admit(deadline, false).await;
                    let (proxy, served) = match reused {
                        Some(reused) => reused,
                        None => (pre.instantiate_async(&mut store).await?, 0),
                    };
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, guest_req, out)
                        .await?;
                    wasmtime::Result::Ok((proxy, served + 1))
                };
                let timeout = service.inner.settings.timeout;
                let tick = service.inner.runtime.config().epoch_tick;
                match with_timeout(timeout, tick, result).await {
                    None => Some(Failure::TimedOut),
                    Some(Ok((proxy, served))) => {
                        service.keep(store, proxy, served);
                        None
                    }
                    Some(Err(e)) => Some(Failure::classify(store.data(), &e)),
                }
                .inspect(|failure| {
                    // Before the store, and the body's end with it, goes.
                    failed.store(true, Ordering::Release);
                    service.report(failure, &method, &path)
                })
            }
            .instrument(span)
        }));

        // A client that goes away before the response head takes its guest with it.
        let cancel = CancelOnDrop::new(task.abort_handle());
        let answer = receiver.await;
        if answer.is_ok() {
            // The guest goes on to write the body, or to finish after answering.
            cancel.disarm();
        }
        match answer {
            Ok(Ok(response)) => response.map(|body| CutShort { body, failed }.boxed_unsync()),
            Ok(Err(code)) => {
                tracing::debug!(%method, %path, ?code, "guest answered with an error code");
                problem_response(
                    problem::ErrorCode::GuestFailed,
                    &format!("guest failed the request: {code:?}"),
                )
            }
            // The guest dropped the response outparam: it finished or failed without
            // answering. The task says which.
            Err(_) => match task.await {
                Ok(Some(failure)) => self.failure_response(&failure),
                Ok(None) => {
                    let message = "guest did not set a response";
                    self.inner
                        .settings
                        .logs
                        .push_system(format!("{method} {path}: {message}"));
                    tracing::warn!(digest = %self.digest(), %method, %path, "{message}");
                    problem_response(problem::ErrorCode::GuestFailed, message)
                }
                Err(e) => {
                    tracing::error!(digest = %self.digest(), %method, %path, error = %e, "request task failed");
                    problem_response(problem::ErrorCode::Internal, "internal error")
                }
            },
        }
    }

    /// Queues the request for the replica's p3 workers and waits for their answer.
    async fn handle_p3<B>(
        &self,
        workers: &Arc<Workers>,
        req: http::Request<B>,
        hold: Hold,
        method: &http::Method,
        path: &str,
    ) -> http::Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let (reply, receiver) = futures::channel::oneshot::channel();
        let ended = Arc::new(Ended::default());
        let gone = Arc::new(Gone::default());
        workers.submit(Job {
            request: req.map(|body| body.map_err(Into::into).boxed_unsync()),
            reply,
            ended: ended.clone(),
            gone: gone.clone(),
            hold,
        });
        // A client that goes away before the response head may take its instance with it.
        let client = GoneOnDrop::new(gone);
        let answer = receiver.await;
        client.disarm();
        let failure = match answer {
            Ok(Ok(response)) => return response,
            Ok(Err(e)) if e.is::<ExpirationError>() => Failure::TimedOut,
            Ok(Err(e)) => {
                use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode as P3ErrorCode;
                if let Some(code) = e.downcast_ref::<P3ErrorCode>() {
                    tracing::debug!(%method, %path, ?code, "guest answered with an error code");
                    return problem_response(
                        problem::ErrorCode::GuestFailed,
                        &format!("guest failed the request: {code:?}"),
                    );
                }
                // A trap: the worker ends with it, and knows why (memory, time, a trap).
                ended
                    .wait()
                    .await
                    .unwrap_or_else(|| Failure::Failed(format!("{e:#}")))
            }
            // The instance went before it answered.
            Err(_) => ended.wait().await.unwrap_or_else(|| {
                Failure::Failed("the instance ended without answering".to_string())
            }),
        };
        self.report(&failure, method, path);
        self.failure_response(&failure)
    }

    /// Whether [`HttpService::handle_holding`]'s hold goes as soon as the guest is done with
    /// the request (p2), rather than when its instance ends (p3, whose instance may write a
    /// body after its handler returned, and live on for other requests).
    pub fn holds_per_request(&self) -> bool {
        matches!(self.inner.backend, Backend::P2 { .. })
    }

    /// Instances kept for reuse, waiting for a request.
    pub fn idle_instances(&self) -> usize {
        match &self.inner.backend {
            Backend::P2 { idle, .. } => idle.lock().expect("idle instances lock").instances.len(),
            Backend::P3(workers) => workers.idle(),
        }
    }

    /// Instances that take the next request without a new one starting: p2 instances kept
    /// for reuse, p3 instances below their concurrency (a p3 instance that just took a
    /// request has room again only once its event loop has run that request to a wait).
    pub fn instances_with_room(&self) -> usize {
        match &self.inner.backend {
            Backend::P2 { .. } => self.idle_instances(),
            Backend::P3(workers) => workers.available(),
        }
    }

    /// The most recently used instance still within its idle time, if reuse is on; the
    /// ones past it go.
    fn take_idle(&self) -> Option<Reusable> {
        let reuse = self.inner.settings.reuse;
        let Backend::P2 { idle, .. } = &self.inner.backend else {
            return None;
        };
        if reuse.requests <= 1 {
            return None;
        }
        let mut idle = idle.lock().expect("idle instances lock");
        idle.drop_stale(reuse.idle);
        idle.pop()
    }

    /// Keeps an instance that answered cleanly for the next request, unless it has served
    /// its count, kept a part of the request or response, or another instance waits for
    /// memory (then it is dropped).
    fn keep(&self, mut store: Store<Host>, proxy: Proxy, served: u32) {
        let reuse = self.inner.settings.reuse;
        let Backend::P2 { idle, .. } = &self.inner.backend else {
            return;
        };
        if served >= reuse.requests
            || store.data_mut().holds_request_parts()
            || self.inner.runtime.memory().under_pressure()
        {
            return;
        }
        let mut idle = idle.lock().expect("idle instances lock");
        idle.push(Reusable {
            store,
            proxy,
            served,
            since: Instant::now(),
        });
        if !idle.sweeping {
            idle.sweeping = true;
            let service = Arc::downgrade(&self.inner);
            let memory = self.inner.runtime.memory().clone();
            self.inner.runtime.guests().spawn(sweep(service, memory));
        }
    }

    fn failure_response(&self, failure: &Failure) -> http::Response<ResponseBody> {
        let settings = &self.inner.settings;
        match failure {
            Failure::TimedOut => problem_response(
                problem::ErrorCode::Timeout,
                &format!(
                    "guest timed out after {}",
                    format_duration(settings.timeout.unwrap_or_default())
                ),
            ),
            Failure::OutOfMemory => problem_response(
                problem::ErrorCode::OutOfMemory,
                &format!(
                    "guest exceeded its memory limit ({})",
                    format_bytes(settings.memory_limit as u64)
                ),
            ),
            Failure::Trapped(_) => {
                problem_response(problem::ErrorCode::GuestTrapped, "guest trapped")
            }
            Failure::AtCapacity(_) => problem_response(
                problem::ErrorCode::AtCapacity,
                "no instance slot available on this node; retry shortly",
            ),
            Failure::NoMemory => problem_response(
                problem::ErrorCode::AtCapacity,
                "no room in this node's memory budget for another instance; retry shortly",
            ),
            Failure::Failed(_) => {
                problem_response(problem::ErrorCode::GuestFailed, "guest failed to run")
            }
        }
    }

    /// Logs a failed request with tracing and in the replica's log ring.
    fn report(&self, failure: &Failure, method: &http::Method, path: &str) {
        let settings = &self.inner.settings;
        let digest = self.digest();
        let line = match failure {
            Failure::TimedOut => format!(
                "{method} {path}: guest timed out after {}",
                format_duration(settings.timeout.unwrap_or_default())
            ),
            Failure::OutOfMemory => format!(
                "{method} {path}: guest exceeded its memory limit ({})",
                format_bytes(settings.memory_limit as u64)
            ),
            Failure::Trapped(detail) => format!("{method} {path}: guest trapped: {detail}"),
            Failure::AtCapacity(detail) => format!("{method} {path}: not started: {detail}"),
            Failure::NoMemory => format!(
                "{method} {path}: not started: no room for {} in the node's memory budget",
                format_bytes(settings.memory_limit as u64)
            ),
            Failure::Failed(detail) => format!("{method} {path}: guest failed: {detail}"),
        };
        tracing::warn!(%digest, "{line}");
        let kind = match failure {
            Failure::TimedOut => Some(IncidentKind::TimedOut),
            Failure::OutOfMemory => Some(IncidentKind::OutOfMemory),
            Failure::Trapped(_) => Some(IncidentKind::Trapped),
            Failure::AtCapacity(_) | Failure::NoMemory | Failure::Failed(_) => None,
        };
        if let Some(kind) = kind {
            settings.stats.incident(kind);
            if let Some(hook) = &settings.incidents {
                hook(Incident {
                    kind,
                    message: line.clone(),
                });
            }
        }
        settings.logs.push_system(line);
    }
}

/// A p2 guest's response body, which fails rather than ends if the guest failed (timed
/// out, trapped, ran out of memory) while answering: wasmtime ends the body of an instance
/// that went as if it were whole, and a client would take a cut one for all of it. Failing,
/// it has the server cut the connection or reset the stream, as proxies do when their
/// upstream dies mid-body. A guest that finished its body and failed after is taken as
/// failing it too: the two cannot be told apart here, and the request did fail.
struct CutShort {
    body: ResponseBody,
    /// Set by the guest's task before its store goes.
    failed: Arc<AtomicBool>,
}

impl http_body::Body for CutShort {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() && self.failed.swap(false, Ordering::Acquire) {
            return std::task::Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(
                Some("the guest failed before it finished the response".into()),
            ))));
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream() && !self.failed.load(Ordering::Acquire)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Drops the idle instances of a service as their idle time runs out, so a quiet replica
/// holds no instance (nor its slot in the pool, nor its memory) for longer than that, and all
/// of them at once when another instance waits for memory; ends when none is left or the
/// service is gone.
async fn sweep(service: Weak<ServiceInner>, memory: Arc<MemoryBudget>) {
    let mut pressed = false;
    loop {
        let next = {
            let Some(inner) = service.upgrade() else {
                return;
            };
            let ttl = inner.settings.reuse.idle;
            let Backend::P2 { idle, .. } = &inner.backend else {
                return;
            };
            let mut idle = idle.lock().expect("idle instances lock");
            if pressed {
                idle.clear();
            }
            idle.drop_stale(ttl);
            match idle.instances.first() {
                Some(oldest) => oldest.since + ttl,
                None => {
                    idle.sweeping = false;
                    return;
                }
            }
        };
        pressed = tokio::select! {
            () = tokio::time::sleep_until(next.into()) => false,
            () = memory.pressed() => true,
        };
    }
}

/// An error Shoal itself answers, runtime or gateway: `code`'s status, the
/// `{"error":{"code","message"}}` body as `application/json`, and `Retry-After` when the code
/// asks for one (so every "at capacity" 503 is the same). The one place such a response is
/// rendered; the gateway uses it too.
pub fn problem_response(code: problem::ErrorCode, message: &str) -> http::Response<ResponseBody> {
    let body = Full::new(Bytes::from(ErrorBody::new(code, message).to_json()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = http::Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(problem::CONTENT_TYPE),
    );
    if let Some(secs) = code.retry_after_secs() {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Marks a request whose client came over TLS (on any node): its guest is told the scheme
/// is `https`, else `http`.
#[derive(Debug, Clone, Copy)]
pub struct ClientTls;

/// The request's URI as the guest is given it: the scheme its client used ([`ClientTls`]),
/// the host the client addressed (its `host` header, which a hop between nodes keeps, else
/// the URI's own authority) and the path. Over an HTTP/2 hop the URI's authority is the node
/// the request was forwarded to, and an HTTP/1 request has none at all: a WASIp3 guest
/// reads its authority and scheme from the URI alone, a WASIp2 one its authority from it
/// first.
fn addressed<B>(req: &http::Request<B>) -> http::Uri {
    let scheme = match req.extensions().get::<ClientTls>() {
        Some(ClientTls) => http::uri::Scheme::HTTPS,
        None => http::uri::Scheme::HTTP,
    };
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let mut parts = req.uri().clone().into_parts();
    let Some(authority) = host.or(parts.authority.take()) else {
        return req.uri().clone();
    };
    parts.authority = Some(authority);
    parts.scheme = Some(scheme);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    http::Uri::from_parts(parts).unwrap_or_else(|_| req.uri().clone())
}
