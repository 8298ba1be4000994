//! The gateway's hot path: route, pick an endpoint, call it in process or one hop away.

use crate::RoutingTable;
use crate::body::ReadAheadError;
use crate::endpoint::{
    Endpoint, EndpointStatus, Group, InflightGuard, RemoteReplica, Split, Target, pick,
};
use crate::hold::Holds;
use crate::metrics::Registry;
use crate::outbound::ServicePolicy;
use crate::proxy::{self, APP_HEADER, ERROR_HEADER, Failure, REPLICA_GONE, REPLICA_HEADER};
use crate::stalls::{Stalls, Watched};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use shoal_core::Route;
use shoal_core::auth::NODE_LOGS_PATH as LOGS_PATH;
use shoal_core::clients::{Clients, ConnectionStats};
use shoal_core::logs::LogEntry;
use shoal_core::metrics::{NO_REVISION, RevisionStats};
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{AppKey, Inbound};
use shoal_runtime::problem_response;
use shoal_runtime::{HttpError, HttpService, LogSink, OutboundPolicy, ResponseBody, WasiBody};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, Span, field};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a request waits for a busy replica before it gets a 503.
    pub queue_timeout: Duration,
    /// How long connecting to another node (or a granted host) may take before that
    /// endpoint counts as unreachable.
    pub connect_timeout: Duration,
    /// How the cluster's members (other nodes' gateways, and the control plane reading
    /// logs) and this gateway prove themselves to each other: TLS where both ends present a
    /// certificate of the cluster CA. Hops go over it, and only a request that came over it
    /// may carry internal headers or ask for an internal path; any other is refused (403,
    /// see `Gateway::access`), so it cannot pin a replica, reach an app without routes, or
    /// read logs. `None` (tests): hops in plain text, and anyone trusted.
    pub members: Option<shoal_tls::Mutual>,
    /// TLS for the public: clients that ask for a host name (SNI) get the certificate
    /// naming it (see `shoal_tls::ingress_config`), over HTTP/2 or HTTP/1.1, on the same
    /// listener as plain text and the members' TLS (which asks for no name: members reach
    /// each other by address). `None`: TLS for members only.
    pub ingress_tls: Option<Arc<rustls::ServerConfig>>,
    /// How long a request for an app at zero replicas is held while one starts.
    pub hold_timeout: Duration,
    /// How many requests per app may be held at once; more get a 503 at once.
    pub hold_limit: u32,
    /// How long a client may take to send a request's head; also how long an idle
    /// keep-alive HTTP/1.1 connection is kept.
    pub header_read_timeout: Duration,
    /// How long a client may take to send the beginning of a request's body (all of a small
    /// one) before the request takes a replica's permit, and then each later piece of it.
    pub body_timeout: Duration,
    /// How long a client may leave its connection unable to take what the gateway writes
    /// (a full receive window: it reads slowly or not at all) before the connection is
    /// closed, as nginx's `send_timeout`.
    pub send_timeout: Duration,
    /// Client connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address, an IPv6 /64) holds at once; more are closed
    /// as they arrive. Members (other nodes, the control plane) count only until their
    /// certificate is checked. 0: no cap.
    pub max_client_connections: usize,
    /// Whether hops to other nodes' gateways go over HTTP/2 (one multiplexed connection per
    /// node) or pooled keep-alive HTTP/1.1 connections (the default: with the client off the
    /// forwarding node's CPU, it measured 0.91–1.06× of local against HTTP/2's 0.65–0.89×,
    /// BENCHMARKS.md).
    pub hop_http2: bool,
    /// Whether guests' granted egress may reach private addresses: loopback, RFC 1918,
    /// CGNAT and IPv6 ULA, whether granted as an address (`"10.0.0.5:9000"`) or reached
    /// through a granted name. Off by default, as that is where the control plane and the
    /// nodes listen. Link-local (cloud metadata) stays refused either way.
    pub allow_private_egress: bool,
    /// Certificates (DER) that `https://` egress trusts besides the Web PKI's roots: a
    /// company's own CA, say.
    pub egress_roots: Vec<Vec<u8>>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            queue_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            members: None,
            ingress_tls: None,
            hold_timeout: Duration::from_secs(30),
            hold_limit: 1_000,
            hop_http2: false,
            allow_private_egress: false,
            egress_roots: Vec::new(),
            header_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_client_connections: 1_000,
        }
    }
}

type EndpointMap = HashMap<AppKey, Arc<[Arc<Endpoint>]>>;

/// Everything a node's gateway routes by, from the cluster state: see
/// [`Gateway::set_tables`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables {
    /// Every http app's routes: every gateway serves every app.
    pub routes: Vec<(Route, AppKey)>,
    /// Apps other apps may call by name, each with who may; see [`Gateway::set_services`].
    pub services: Vec<(AppKey, Inbound)>,
    /// Ready replicas on other Ready nodes, reached through their gateways.
    pub remotes: HashMap<AppKey, Vec<RemoteReplica>>,
    /// Canary steps: an app's traffic split by weight between two revisions.
    pub splits: HashMap<AppKey, Split>,
    /// Apps that scale to zero: a request finding no endpoint waits for one.
    pub wake: Vec<AppKey>,
}

/// Where an app's requests may go. Splits live under the endpoints' lock so a request
/// takes one lock to read both.
#[derive(Default)]
struct Pool {
    endpoints: EndpointMap,
    splits: HashMap<AppKey, Split>,
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: GatewayConfig,
    table: RwLock<Arc<RoutingTable>>,
    pool: RwLock<Pool>,
    metrics: Registry,
    holds: Holds,
    /// Apps the agent declared as services; see [`Gateway::set_services`].
    services: RwLock<HashMap<AppKey, Inbound>>,
    /// The apps that wake on a request, as last set: the holds take the whole
    /// set, so one app's change is made here and handed over whole.
    wake: Mutex<HashSet<AppKey>>,
    /// For granted outbound hosts.
    client: proxy::EgressClient,
    /// For hops to other nodes' gateways.
    hops: proxy::Hops,
    /// Finds a local replica's log buffer, for the control plane's `logs`.
    logs: RwLock<Option<LogLookup>>,
    /// The nodes whose certificates a member's connection may present (besides the control
    /// plane's), once the agent has said (see [`Gateway::set_members`]).
    members: RwLock<Option<HashSet<String>>>,
    /// Set by [`Gateway::close`]: [`serve`] takes no more connections and ends those it has
    /// gracefully.
    closing: tokio::sync::watch::Sender<bool>,
    /// Whether the routes are loaded: false from [`Gateway::starting`] to [`Gateway::loaded`].
    loaded: tokio::sync::watch::Sender<bool>,
    /// Set by [`Gateway::stopping`]: the node shuts down, and says so at [`READY_PATH`].
    stopping: std::sync::atomic::AtomicBool,
    /// The connections each client holds.
    clients: Arc<Clients>,
}

/// Resolves once [`Gateway::close`] has been called.
async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard it answers with is dropped here, not held across an await.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Maps a replica id to its log buffer on this node; given an app, only a replica of that
/// app is found (the control plane looks for one that stopped on every node by its id).
pub type LogLookup =
    Arc<dyn Fn(&str, Option<&shoal_core::spec::AppKey>) -> Option<LogSink> + Send + Sync>;

impl Gateway {
    pub fn new(config: GatewayConfig) -> Self {
        let client = proxy::egress_client(
            config.connect_timeout,
            config.allow_private_egress,
            &config.egress_roots,
        );
        let hops = proxy::Hops::new(
            config.connect_timeout,
            config.hop_http2,
            config.members.clone(),
        );
        Gateway {
            inner: Arc::new(Inner {
                table: RwLock::new(Arc::new(RoutingTable::default())),
                pool: RwLock::new(Pool::default()),
                metrics: Registry::default(),
                holds: Holds::default(),
                services: RwLock::new(HashMap::new()),
                wake: Mutex::new(HashSet::new()),
                client,
                hops,
                logs: RwLock::new(None),
                members: RwLock::new(None),
                closing: tokio::sync::watch::Sender::new(false),
                loaded: tokio::sync::watch::Sender::new(true),
                stopping: std::sync::atomic::AtomicBool::new(false),
                clients: Clients::new(config.max_client_connections, 64),
                config,
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(inner: &Weak<Inner>) -> Option<Gateway> {
        inner.upgrade().map(|inner| Gateway { inner })
    }

    pub(crate) fn client(&self) -> &proxy::EgressClient {
        &self.inner.client
    }

    /// Replaces routes, services, canary splits and remote endpoints at once,
    /// holding every lock they live under (in the order lookups take them), so no
    /// request sees one table new and another old.
    pub fn set_tables(&self, tables: Tables) {
        let mut services = self.inner.services.write().expect("services lock");
        let mut pool = self.inner.pool.write().expect("endpoint lock");
        let mut table = self.inner.table.write().expect("routing lock");
        *services = tables.services.into_iter().collect();
        pool.splits = tables.splits;
        replace_remotes(
            &self.inner.metrics,
            &self.inner.hops,
            &mut pool.endpoints,
            tables.remotes,
        );
        *table = Arc::new(RoutingTable::new(tables.routes));
        let mut wake = self.inner.wake.lock().expect("wake lock");
        *wake = tables.wake.into_iter().collect();
        self.inner.holds.set_wake(wake.iter().cloned().collect());
        self.inner.holds.arrivals.notify_waiters();
    }

    /// Replaces what the gateway routes by for the apps named (routes, service, remote
    /// endpoints, split, wake) with what `tables` says of them, and leaves every other
    /// app's as it is: a change to a few apps costs those apps. An app named that `tables`
    /// does not mention is forgotten. Takes the locks [`Gateway::set_tables`] takes, in
    /// the same order, so no request sees an app half changed. The apps that wake go to
    /// the holds as a whole set, only when one of these joins or leaves it.
    pub fn update_tables(&self, apps: Vec<AppKey>, tables: Tables) {
        if apps.is_empty() {
            return;
        }
        let Tables {
            routes,
            services: served,
            mut remotes,
            mut splits,
            wake: waking,
        } = tables;
        let mut routes_of: HashMap<AppKey, Vec<Route>> = HashMap::new();
        for (route, app) in routes {
            routes_of.entry(app).or_default().push(route);
        }
        let mut served: HashMap<AppKey, Inbound> = served.into_iter().collect();
        let waking: HashSet<AppKey> = waking.into_iter().collect();
        let mut services = self.inner.services.write().expect("services lock");
        let mut pool = self.inner.pool.write().expect("endpoint lock");
        let mut table = self.inner.table.write().expect("routing lock");
        let mut wake = self.inner.wake.lock().expect("wake lock");
        // Lookups use the table under the lock and never keep it: it is not copied here.
        let routing = Arc::make_mut(&mut table);
        let mut woken = false;
        for app in apps {
            routing.set_app(&app, routes_of.remove(&app).unwrap_or_default());
            match served.remove(&app) {
                Some(inbound) => services.insert(app.clone(), inbound),
                None => services.remove(&app),
            };
            match splits.remove(&app) {
                Some(split) => pool.splits.insert(app.clone(), split),
                None => pool.splits.remove(&app),
            };
            let replicas = remotes.remove(&app).unwrap_or_default();
            replace_app_remotes(
                &self.inner.metrics,
                &self.inner.hops,
                &mut pool.endpoints,
                &app,
                replicas,
            );
            woken |= if waking.contains(&app) {
                wake.insert(app)
            } else {
                wake.remove(&app)
            };
        }
        if woken {
            self.inner.holds.set_wake(wake.iter().cloned().collect());
        }
        self.inner.holds.arrivals.notify_waiters();
    }

    /// Puts every remote endpoint marked down back in rotation, each once it has been out
    /// for `DOWN_AT_LEAST` (3 s). Down lasts until the next status that lists the endpoint;
    /// the agent says the cluster still lists them every few seconds this way, without
    /// handing every app's tables over again.
    pub fn revive_remotes(&self) {
        let pool = self.inner.pool.read().expect("endpoint lock");
        for endpoint in pool.endpoints.values().flat_map(|l| l.iter()) {
            if !endpoint.is_local() {
                endpoint.relist();
            }
        }
    }

    /// Replaces the whole routing table.
    pub fn set_routes(&self, routes: Vec<(Route, AppKey)>) {
        *self.inner.table.write().expect("routing lock") = Arc::new(RoutingTable::new(routes));
    }

    /// Replaces every app's traffic split; an app without one sends requests to all of
    /// its endpoints alike.
    pub fn set_splits(&self, splits: HashMap<AppKey, Split>) {
        self.inner.pool.write().expect("endpoint lock").splits = splits;
    }

    /// Request outcomes per app revision since the last call (only revisions that served
    /// any), counted where each request was routed: a forwarded request counts on the
    /// gateway that forwarded it, not on the one that ran it.
    pub fn take_metrics(&self) -> Vec<RevisionStats> {
        self.inner.metrics.take()
    }

    /// Requests held per app for lack of a ready replica, each app whose count
    /// changed since the last call (zero once, when the last one left).
    pub fn take_waiting(&self) -> Vec<(AppKey, u32)> {
        self.inner.holds.take()
    }

    /// Resolves when a held-request count changed: time to call [`Gateway::take_waiting`].
    pub async fn waiting_changed(&self) {
        self.inner.holds.changed().await;
    }

    /// Declares every http app of the cluster, so guests can call one by name even while it
    /// has no route and no ready replica (it then answers 503, not "not found"), and which
    /// apps may (its `[network] inbound`). An app with routes or endpoints here is known
    /// without being declared, and callable by its namespace's apps.
    pub fn set_services(&self, apps: Vec<(AppKey, Inbound)>) {
        *self.inner.services.write().expect("services lock") = apps.into_iter().collect();
    }

    /// The cluster's nodes as of now: from here on a member's connection is let in only if
    /// its certificate is one of theirs or the control plane's, so a deleted node's
    /// certificate, still signed by the cluster CA, no longer reaches this node. Hop clients
    /// of other nodes go.
    pub fn set_members(&self, nodes: impl IntoIterator<Item = String>) {
        let nodes: HashSet<String> = nodes.into_iter().collect();
        self.inner
            .hops
            .retain(&nodes.iter().map(String::as_str).collect());
        let mut members = self.inner.members.write().expect("members lock");
        if members.as_ref() != Some(&nodes) {
            *members = Some(nodes);
        }
    }

    /// Whether a member's connection presenting `certificate` (DER, checked against the
    /// cluster CA) may go on: the control plane's, or a current node's. Before the agent has
    /// said who the nodes are, any.
    fn admits(&self, certificate: Option<&[u8]>) -> bool {
        let Some(name) = certificate.and_then(shoal_tls::member_of) else {
            return false;
        };
        if name == shoal_tls::CONTROL_PLANE {
            return true;
        }
        let members = self.inner.members.read().expect("members lock");
        members.as_ref().is_none_or(|nodes| nodes.contains(&name))
    }

    /// Has [`serve`] stop taking connections and end the ones it has as their requests
    /// finish (idle ones at once; HTTP/2 ones with a GOAWAY), then return: a node shutting
    /// down lets what is in flight through it complete.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Until [`Gateway::loaded`], the routes are not known yet (a node starting, or starting
    /// again, before it has read the cluster's state): a public request waits for them, up
    /// to [`LOAD_WAIT`] (or `hold_timeout`, if shorter), then gets a 503. Without this, an
    /// app that exists was a 404 `no_route` for the first moments of a restarted node.
    pub fn starting(&self) {
        self.inner.loaded.send_replace(false);
    }

    /// The routes are loaded: requests waiting for them go on, and later ones wait no more.
    pub fn loaded(&self) {
        self.inner.loaded.send_replace(true);
    }

    /// The node is shutting down: [`READY_PATH`] answers 503 from now on, so a load balancer
    /// sends new clients elsewhere, while requests are still served until [`Gateway::close`].
    pub fn stopping(&self) {
        (self.inner.stopping).store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// What [`READY_PATH`] answers: 200 while this gateway serves the cluster's routes, 503
    /// while it has not read them yet or its node shuts down, as a load balancer's health
    /// check wants it (Kubernetes' `/readyz`, Envoy's `/ready`).
    fn readiness(&self) -> Response<ResponseBody> {
        let (status, said) = if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping: this node shuts down\n",
            )
        } else if !*self.inner.loaded.borrow() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: the routes are not read yet\n",
            )
        } else {
            (StatusCode::OK, "ready\n")
        };
        let body = Full::new(Bytes::from_static(said.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    /// Whether the routes are loaded, waiting for them a while if they are not.
    async fn wait_loaded(&self) -> bool {
        if *self.inner.loaded.borrow() {
            return true;
        }
        let mut loaded = self.inner.loaded.subscribe();
        let wait = self.inner.config.hold_timeout.min(LOAD_WAIT);
        let waited = tokio::time::timeout(wait, loaded.wait_for(|loaded| *loaded)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// Lets the control plane read local replicas' output through this gateway.
    pub fn set_log_lookup(&self, lookup: LogLookup) {
        *self.inner.logs.write().expect("logs lock") = Some(lookup);
    }

    /// A replica's output on this node, NDJSON ([`LogEntry`]): its lines from `since` (a
    /// sequence number) or the last `tail`, written at or after `since_time` (ms since the
    /// epoch); with `follow`, then each new line as it comes, until the replica stops. With
    /// `app=NAMESPACE/NAME`, only a replica of that app. Internal: reached only through
    /// [`Gateway::serve_internal`].
    fn serve_logs(&self, req: &Request<WasiBody>) -> Response<ResponseBody> {
        let replica = req.uri().path().trim_start_matches(LOGS_PATH).to_string();
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let number = |name: &str| param(name).and_then(|n| n.parse::<u64>().ok());
        let since = number("since").unwrap_or(0) as usize;
        let tail = number("tail").map_or(usize::MAX, |n| n as usize);
        let since_time = number("since_time").unwrap_or(0);
        let follow = param("follow").is_some_and(|f| f == "true" || f == "1");
        let app = param("app")
            .and_then(|a| a.split_once('/'))
            .map(|(ns, name)| shoal_core::spec::AppKey::new(ns, name));
        let lookup = self.inner.logs.read().expect("logs lock").clone();
        let Some(sink) = lookup.and_then(|f| f(&replica, app.as_ref())) else {
            return problem_response(ErrorCode::NotFound, "no such replica on this node");
        };
        let entries = move |lines: Vec<shoal_runtime::LogLine>, next: usize, skip: usize| {
            let first = next - lines.len();
            let mut text = Vec::new();
            for (i, l) in lines.into_iter().enumerate().skip(skip) {
                if l.millis() < since_time {
                    continue;
                }
                let entry = LogEntry {
                    replica: replica.clone(),
                    seq: (first + i) as u64,
                    time: l.millis(),
                    stream: l.stream,
                    line: l.line,
                };
                serde_json::to_writer(&mut text, &entry).expect("a log entry serialises");
                text.push(b'\n');
            }
            Bytes::from(text)
        };
        let (lines, next) = sink.lines(since);
        let skip = lines.len().saturating_sub(tail);
        // Where what this answer carries starts: a follower that reconnects asks from there.
        let from = next - lines.len() + skip;
        let first = entries(lines, next, skip);
        let body = if follow {
            let more = futures::stream::unfold((sink, next), move |(sink, cursor)| {
                let entries = entries.clone();
                async move {
                    loop {
                        sink.wait_for(cursor).await;
                        let (lines, next) = sink.lines(cursor);
                        if lines.is_empty() && sink.is_closed() {
                            return None;
                        }
                        if !lines.is_empty() {
                            return Some((entries(lines, next, 0), (sink, next)));
                        }
                    }
                }
            });
            use futures::StreamExt;
            let frames = futures::stream::once(async move { first })
                .chain(more)
                .map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)));
            http_body_util::StreamBody::new(frames)
                .map_err(|e| match e {})
                .boxed_unsync()
        } else {
            Full::new(first).map_err(|e| match e {}).boxed_unsync()
        };
        Response::builder()
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .header(shoal_core::auth::LOGS_FROM_HEADER, from)
            .body(body)
            .expect("static response parts are valid")
    }

    /// The one check between the public listener and the node's internal surface (log reads
    /// under [`LOGS_PATH`], hops pinned by `x-shoal-*` headers), made before anything else
    /// looks at the request. A request that asks for neither is public; one that does must
    /// have come from a member of the cluster (a connection [`serve`] marked [`Member`]), or
    /// it is refused whole: never served internally, never routed or forwarded with those
    /// headers. Without the cluster's certificates (tests) every request is trusted.
    fn access<B>(&self, req: &Request<B>) -> Access {
        let logs = is_logs_path(req);
        if !logs && !proxy::has_internal(req.headers()) {
            return Access::Public;
        }
        if self.inner.config.members.is_none() {
            return Access::Internal;
        }
        match req.extensions().get::<Member>() {
            // Replicas' output is the control plane's to read (`shoal logs`), not other nodes'.
            Some(member) if logs && !member.control_plane => Access::Refused,
            Some(_) => Access::Internal,
            None => Access::Refused,
        }
    }

    /// A request [`Gateway::access`] let through: a log read (from the control plane) or a
    /// hop from another gateway, which is served here by the replica it names or refused,
    /// never forwarded again. The control plane's proxy may name only the app (one at zero,
    /// with no replica to name): that is dispatched as the app's own traffic is, held while
    /// the app wakes.
    async fn serve_internal(&self, req: Request<WasiBody>) -> Response<ResponseBody> {
        if is_logs_path(&req) {
            return self.serve_logs(&req);
        }
        let span = request_span(&req);
        if let Some(app) = self.unpinned_from_control_plane(&req) {
            return self.dispatch(&app, req).instrument(span).await;
        }
        self.serve_pinned(req).instrument(span).await
    }

    /// The app a request of the control plane names without a replica, if that is what it
    /// is. Other members' hops always name a replica.
    fn unpinned_from_control_plane<B>(&self, req: &Request<B>) -> Option<AppKey> {
        let trusted = self.inner.config.members.is_none() || sent_by_control_plane(req);
        if !trusted || req.headers().contains_key(REPLICA_HEADER) {
            return None;
        }
        let (namespace, name) = req
            .headers()
            .get(APP_HEADER)
            .and_then(|v| v.to_str().ok())?
            .split_once('/')?;
        Some(AppKey::new(namespace, name))
    }

    /// Whether `caller` may call `app` by name: as the app's `[network] inbound` says, or,
    /// for an app not declared (yet), if both are of one namespace.
    pub(crate) fn may_call(&self, caller: &AppKey, app: &AppKey) -> bool {
        match self.inner.services.read().expect("services lock").get(app) {
            Some(inbound) => inbound.admits(caller),
            None => app.namespace == caller.namespace,
        }
    }

    /// Whether service discovery resolves `app`: declared, routed, or with endpoints.
    pub(crate) fn knows(&self, app: &AppKey) -> bool {
        self.inner
            .services
            .read()
            .expect("services lock")
            .contains_key(app)
            || self
                .inner
                .pool
                .read()
                .expect("endpoint lock")
                .endpoints
                .contains_key(app)
            || self.inner.table.read().expect("routing lock").serves(app)
    }

    /// Adds (or replaces, by replica id) one endpoint, local or remote.
    pub fn add_endpoint(&self, app: AppKey, mut endpoint: Endpoint) {
        endpoint.counters = self.inner.metrics.counters(&app, endpoint.revision);
        let map = &mut self.inner.pool.write().expect("endpoint lock").endpoints;
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
        self.inner.holds.arrivals.notify_waiters();
    }

    /// Stops sending new requests to a replica; in-flight ones finish.
    pub fn remove_endpoint(&self, app: &AppKey, replica: &str) -> bool {
        let map = &mut self.inner.pool.write().expect("endpoint lock").endpoints;
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

    /// Replaces every remote endpoint with `remote`, in one swap, keeping local endpoints.
    /// An endpoint that stays keeps its in-flight count, so p2c does not forget the load it
    /// sent; one marked down is back in rotation, as this is the fresh status that lists it,
    /// once it has been out `DOWN_AT_LEAST` (3 s).
    /// A replica that is also local stays local.
    pub fn set_remote_endpoints(&self, remote: HashMap<AppKey, Vec<RemoteReplica>>) {
        let map = &mut self.inner.pool.write().expect("endpoint lock").endpoints;
        replace_remotes(&self.inner.metrics, &self.inner.hops, map, remote);
        self.inner.holds.arrivals.notify_waiters();
    }

    /// Replica ids of an app's endpoints in rotation (ready, and not marked down).
    pub fn endpoints(&self, app: &AppKey) -> Vec<String> {
        let pool = self.inner.pool.read().expect("endpoint lock");
        pool.endpoints
            .get(app)
            .map(|l| {
                l.iter()
                    .filter(|e| !e.is_down())
                    .map(|e| e.replica.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// When the certificate this gateway presents to other members expires (none without
    /// member TLS): it renews it well before, and a metric says whether it did.
    pub fn member_certificate_expires(&self) -> Option<std::time::SystemTime> {
        let members = self.inner.config.members.as_ref()?;
        Some(members.cert().expires())
    }

    /// Requests in flight on this node's replicas in rotation, summed per app revision: from
    /// the permit until the response body is sent, whichever gateway routed them. Read from
    /// the counters p2c picks by, so the hot path pays nothing more for it.
    pub fn local_in_flight(&self) -> Vec<(AppKey, u64, usize)> {
        let pool = self.inner.pool.read().expect("endpoint lock");
        let mut sums: HashMap<(&AppKey, u64), usize> = HashMap::new();
        for (app, endpoints) in &pool.endpoints {
            for e in endpoints.iter().filter(|e| e.is_local()) {
                *sums.entry((app, e.revision)).or_default() += e.inflight();
            }
        }
        let mut out: Vec<(AppKey, u64, usize)> = sums
            .into_iter()
            .map(|((app, revision), n)| (app.clone(), revision, n))
            .collect();
        out.sort();
        out
    }

    /// The client connections served now, and those closed as they came because their client held
    /// its most ([`GatewayConfig::max_client_connections`]).
    pub fn connections(&self) -> ConnectionStats {
        self.inner.clients.stats()
    }

    /// Every endpoint of an app, down ones included, as the gateway sees it now.
    pub fn endpoint_status(&self, app: &AppKey) -> Vec<EndpointStatus> {
        let pool = self.inner.pool.read().expect("endpoint lock");
        pool.endpoints
            .get(app)
            .map(|l| l.iter().map(|e| e.status()).collect())
            .unwrap_or_default()
    }

    /// The outbound policy for guests of one replica of app `caller`: calls to `http://NAME/`
    /// or `http://NAME.NAMESPACE/` go to that app's replicas through this gateway (in process,
    /// or to the node that runs one) if it admits the caller ([`Gateway::set_services`]);
    /// calls to a host and port `allowed_hosts` grants (over http or https, and never to an
    /// app) go out to the network, to public addresses only (unless
    /// [`GatewayConfig::allow_private_egress`]); everything else is refused. The policy holds the gateway weakly, so a
    /// replica's service never keeps the gateway that holds it alive.
    pub fn outbound(&self, caller: &AppKey, allowed_hosts: Vec<String>) -> Arc<dyn OutboundPolicy> {
        Arc::new(ServicePolicy::new(self, caller, allowed_hosts))
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        if req.uri().path() == READY_PATH && matches!(*req.method(), Method::GET | Method::HEAD) {
            return self.readiness();
        }
        let mut req = req.map(|b| b.map_err(Into::<HttpError>::into).boxed_unsync());
        // A member's hop carries a client's head, which its gateway took, and its own fields.
        let bytes = head_bytes(&req);
        if bytes > MAX_HEAD_BYTES as usize && req.extensions().get::<Member>().is_none() {
            return problem_response(
                ErrorCode::HeadTooLarge,
                &format!(
                    "the request's line and headers are {bytes} bytes: a gateway takes at most {MAX_HEAD_BYTES}"
                ),
            );
        }
        match self.access(&req) {
            Access::Public if req.headers().len() > MAX_HEADER_FIELDS => {
                return problem_response(
                    ErrorCode::HeadTooLarge,
                    &format!(
                        "the request has {} header fields: a gateway takes at most {MAX_HEADER_FIELDS}",
                        req.headers().len()
                    ),
                );
            }
            Access::Public => {
                if let Some(proxy::ClientAddr(client)) = req.extensions().get().copied() {
                    let https = req.extensions().get::<shoal_runtime::ClientTls>().is_some();
                    proxy::forwarded_for(req.headers_mut(), client, https);
                }
                // The host routed by is the guest's too (it reads `host`): a URI's authority
                // (HTTP/2's, or HTTP/1.1's absolute form) is the one that counts, over any
                // `host` sent beside it (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
                let authority = req.uri().authority().map(|a| a.as_str());
                if let Some(authority) = authority.and_then(|a| a.rsplit('@').next())
                    && let Ok(host) = header::HeaderValue::from_str(authority)
                {
                    req.headers_mut().insert(header::HOST, host);
                }
            }
            Access::Internal => return self.serve_internal(req).await,
            Access::Refused => {
                tracing::debug!(
                    method = %req.method(),
                    path = %req.uri().path(),
                    "refused an internal request from outside the cluster"
                );
                return problem_response(
                    ErrorCode::Forbidden,
                    "internal endpoint: x-shoal-* headers and /_shoal/ paths are for the \
                     cluster's own gateways and control plane",
                );
            }
        }
        let span = request_span(&req);
        async move {
            if !self.wait_loaded().await {
                return problem_response(
                    ErrorCode::Unavailable,
                    "this node is starting and has not read the cluster's routes yet: try again, or another node",
                );
            }
            if let Some(refused) = not_a_path(&req) {
                return refused;
            }
            if crate::routing::has_dot_segment(req.uri().path()) {
                return problem_response(
                    ErrorCode::BadRequest,
                    "the path has a \".\" or \"..\" segment: resolve it before sending (RFC 3986, 5.2.4)",
                );
            }
            let host = request_host(&req);
            let app = {
                let table = self.inner.table.read().expect("routing lock");
                table
                    .lookup(host.as_deref(), req.uri().path())
                    .map(|(_, app)| app.clone())
            };
            let Some(app) = app else {
                return problem_response(
                    ErrorCode::NoRoute,
                    &format!(
                        "no app serves {}{} on this gateway",
                        host.as_deref().unwrap_or(""),
                        req.uri().path()
                    ),
                );
            };
            self.dispatch(&app, req).await
        }
        .instrument(span)
        .await
    }

    /// Sends a request to one of `app`'s endpoints, whatever the route table says: external
    /// traffic after routing, and service calls from guests. The app's split, if any, chooses
    /// the revisions to pick from. A remote endpoint that cannot be reached is marked down
    /// and, if the request can be sent again, one other is tried, of the same revisions if
    /// possible. The outcome counts for the revision of the endpoint that answered last.
    pub(crate) async fn dispatch(
        &self,
        app: &AppKey,
        mut req: Request<WasiBody>,
    ) -> Response<ResponseBody> {
        // A guest's service call comes here without `handle`'s checks.
        if let Some(refused) = not_a_path(&req) {
            return refused;
        }
        let start = Instant::now();
        let span = Span::current();
        span.record("app", field::display(app));
        let (mut endpoints, mut split) = self.endpoints_of(app);
        if endpoints.is_empty() && self.inner.holds.wakes(app) {
            (endpoints, split) = match self.hold(app).await {
                Ok(found) => found,
                Err(response) => return self.unserved(app, start, response),
            };
        }
        let group = Group::draw(split);
        let Some(first) = pick(&endpoints, group) else {
            let response = problem_response(
                ErrorCode::NoReadyReplicas,
                &format!("app {app} has no ready replicas"),
            );
            return self.unserved(app, start, response);
        };
        let mut _busy = first.counters.busy();
        span.record("replica", first.replica.as_str());
        let mut resend = None;
        if !first.is_local() {
            (req, resend) = match proxy::keep_for_resend(req, self.inner.config.body_timeout).await
            {
                Ok(kept) => kept,
                Err(e) => return unreadable_body(e),
            };
        }
        let (last, response) = match self.call(&first, app, req, true).await {
            Ok(response) => (first, response),
            Err(failure) => {
                self.mark_down(&first, app, &failure);
                let resend = resend.filter(|r| r.after(&failure));
                match resend.and_then(|r| pick(&endpoints, group).map(|e| (e, r))) {
                    None => {
                        let response = failure_response(app, &first, failure);
                        (first, response)
                    }
                    Some((second, resend)) => {
                        span.record("replica", second.replica.as_str());
                        _busy = second.counters.busy();
                        tracing::debug!(failed = %first.replica, "retrying on another endpoint");
                        let response = match self.call(&second, app, resend.request(), true).await {
                            Ok(response) => response,
                            Err(failure) => {
                                self.mark_down(&second, app, &failure);
                                failure_response(app, &second, failure)
                            }
                        };
                        (second, response)
                    }
                }
            }
        };
        last.counters.record(response.status(), start.elapsed());
        response
    }

    /// `response`, given with no replica to send the request to (none ready, too many
    /// waiting for one), counted for `app` under revision [`NO_REVISION`]: an app that
    /// cannot serve must show in its error rate, not as an app that gets no requests.
    fn unserved(
        &self,
        app: &AppKey,
        start: Instant,
        response: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        (self.inner.metrics.counters(app, NO_REVISION)).record(response.status(), start.elapsed());
        response
    }

    /// Takes `endpoint` out of rotation until a status lists it again, 3 s on. A node gateway
    /// that takes no connection fails every replica behind it, of every app, so they all go:
    /// the retry, and the requests after it, go to other nodes rather than find out one
    /// replica at a time (a node killed with several replicas cost one failed request each).
    /// A late answer takes only its own endpoint out, whose node may be only slow: the next
    /// status brings it back, and a node that died without a word loses its endpoints one
    /// late request each (until its hop connection's pings give up and refuse them all).
    fn mark_down(&self, endpoint: &Endpoint, app: &AppKey, failure: &Failure) {
        endpoint.set_down();
        let reason = match failure {
            Failure::Unconnected(e) | Failure::Unreachable(e) => e.as_str(),
            Failure::ReplicaGone => "the node no longer runs it",
            Failure::Late(_) => "no response head in time",
        };
        let node = endpoint.node_gateway();
        if let (Failure::Unconnected(_), Some(node)) = (failure, node) {
            let pool = self.inner.pool.read().expect("endpoint lock");
            pool.endpoints
                .values()
                .flat_map(|endpoints| endpoints.iter())
                .filter(|e| e.node_gateway() == Some(node))
                .for_each(|e| e.set_down());
        }
        tracing::warn!(
            %app,
            replica = %endpoint.replica,
            node = node.unwrap_or("local"),
            %reason,
            "endpoint marked down until the next status"
        );
    }

    fn endpoints_of(&self, app: &AppKey) -> (Arc<[Arc<Endpoint>]>, Option<Split>) {
        let pool = self.inner.pool.read().expect("endpoint lock");
        let endpoints = pool.endpoints.get(app).cloned();
        (
            endpoints.unwrap_or_else(|| Arc::from([])),
            pool.splits.get(app).copied(),
        )
    }

    /// Waits, within the hold's bounds, for `app` (scaled to zero) to have an endpoint.
    async fn hold(
        &self,
        app: &AppKey,
    ) -> Result<(Arc<[Arc<Endpoint>]>, Option<Split>), Response<ResponseBody>> {
        let config = &self.inner.config;
        let Some(_held) = self.inner.holds.enter(app, config.hold_limit) else {
            return Err(problem_response(
                ErrorCode::AtCapacity,
                &format!(
                    "{} requests already wait for app {app} to start; retry shortly",
                    config.hold_limit
                ),
            ));
        };
        tracing::debug!(%app, "holding the request while the app starts");
        let deadline = tokio::time::Instant::now() + config.hold_timeout;
        loop {
            let arrived = self.inner.holds.arrivals.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (endpoints, split) = self.endpoints_of(app);
            if !endpoints.is_empty() {
                return Ok((endpoints, split));
            }
            // Deleted while the request waited: nothing will start, so it need not wait out
            // the hold. An app that merely stopped waking (its minimum raised) is coming up.
            if !self.inner.holds.wakes(app) && !self.knows(app) {
                return Err(problem_response(
                    ErrorCode::NoRoute,
                    &format!("app {app} was deleted while this request waited for it to start"),
                ));
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let mut response = problem_response(
                    ErrorCode::NoReadyReplicas,
                    &format!(
                        "app {app} is starting but no replica was ready within {} s; retry shortly",
                        config.hold_timeout.as_secs_f64()
                    ),
                );
                // Unlike an app with no replica at all, this one is on its way up.
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                return Err(response);
            }
        }
    }

    /// A request another gateway forwarded: served by the replica it names, here, or refused
    /// so the sender can try elsewhere. Never forwarded again.
    async fn serve_pinned(&self, req: Request<WasiBody>) -> Response<ResponseBody> {
        let (replica, app) = {
            let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
            let replica = header(REPLICA_HEADER).unwrap_or_default().to_string();
            let app = match header(APP_HEADER).and_then(|v| v.split_once('/')) {
                Some((namespace, name)) => Some(AppKey::new(namespace, name)),
                None => {
                    let table = self.inner.table.read().expect("routing lock");
                    table
                        .lookup(request_host(&req).as_deref(), req.uri().path())
                        .map(|(_, app)| app.clone())
                }
            };
            (replica, app)
        };
        let endpoint = app.as_ref().and_then(|app| {
            let pool = self.inner.pool.read().expect("endpoint lock");
            pool.endpoints
                .get(app)?
                .iter()
                .find(|e| e.replica == replica && e.is_local())
                .cloned()
        });
        let (Some(app), Some(endpoint)) = (app, endpoint) else {
            return replica_gone(&replica);
        };
        let span = Span::current();
        span.record("app", field::display(&app));
        span.record("replica", replica.as_str());
        // Another gateway's hop was counted where it came in; the API proxy's request counts
        // here, as the app's load (`top apps`, the autoscaler) like any other.
        let counted = sent_by_control_plane(&req).then(Instant::now);
        let _busy = counted.map(|_| endpoint.counters.busy());
        let response = match self.call(&endpoint, &app, req, false).await {
            Ok(response) => response,
            Err(failure) => failure_response(&app, &endpoint, failure),
        };
        if let Some(start) = counted {
            endpoint.counters.record(response.status(), start.elapsed());
        }
        response
    }

    /// Sends `req` to `endpoint`; a local one at its max concurrency hands it to another local
    /// replica of the same revision with room, if `movable` (not a hop pinned to it).
    async fn call(
        &self,
        endpoint: &Arc<Endpoint>,
        app: &AppKey,
        req: Request<WasiBody>,
        movable: bool,
    ) -> Result<Response<ResponseBody>, Failure> {
        match &endpoint.target {
            Target::Local { .. } => Ok(self.call_local(endpoint, app, req, movable).await),
            Target::Remote {
                gateway,
                client,
                timeout,
                ..
            } => {
                let inflight = endpoint.enter();
                // What the node may take before the guest's timeout even starts: the wait for
                // a permit, and the read-ahead of a body, past which it answers.
                let config = &self.inner.config;
                let waits = match proxy::may_have_body(&req) {
                    true => config.queue_timeout + config.body_timeout,
                    false => config.queue_timeout,
                };
                let response = proxy::forward(
                    client,
                    gateway,
                    app,
                    &endpoint.replica,
                    self.inner.hops.scheme(),
                    timeout.map(|t| t + waits + HOP_SLACK),
                    req,
                )
                .await?;
                Ok(response.map(|body| guarded(body, None, inflight)))
            }
        }
    }

    /// Takes one of the replica's permits (waiting up to the queue timeout) and runs the
    /// request in a fresh instance; permit and in-flight count go when the body is done.
    /// With `movable`, a replica with no permit free is not waited on alone: the first
    /// replica of the same revision on this node to have one takes the request, so that a
    /// request does not queue behind a busy replica while others idle (the two random
    /// choices can both land on busy ones, and a burst woken from zero arrives with one
    /// replica ready and the rest coming up).
    async fn call_local(
        &self,
        endpoint: &Arc<Endpoint>,
        app: &AppKey,
        mut req: Request<WasiBody>,
        movable: bool,
    ) -> Response<ResponseBody> {
        // A hop says so of a client that came over TLS to the gateway that forwarded it.
        if req
            .headers()
            .get(proxy::SCHEME_HEADER)
            .is_some_and(|v| v == "https")
        {
            req.extensions_mut().insert(shoal_runtime::ClientTls);
        }
        proxy::strip_internal(req.headers_mut());
        // The guest is behind this gateway as a replica behind a hop is: what the client's
        // connection named as its own (`Connection: x-secret`) stops here.
        proxy::strip_hop_by_hop(req.headers_mut());
        let (parts, body) = req.into_parts();
        let body = match crate::body::read_ahead(body, self.inner.config.body_timeout).await {
            Ok(body) => body,
            Err(e) => return unreadable_body(e),
        };
        let req = Request::from_parts(parts, body);
        let Some((endpoint, service, permit)) = self.room(endpoint, app, movable).await else {
            return problem_response(
                ErrorCode::AtCapacity,
                &format!("app {app} is at its max concurrency; retry shortly"),
            );
        };
        let inflight = endpoint.enter();
        // The permit goes with the guest: a client that does not read its answer must not
        // hold it after its guest has finished, and one that drops it (a HEAD, a client gone
        // after the head) must not free it while the guest runs on. A p3 instance gives its
        // holds back only when it ends, so there the body's end gives the permit back too.
        let permit = SharedPermit(Arc::new(std::sync::Mutex::new(Some(permit))));
        let body_share = (!service.holds_per_request()).then(|| permit.clone());
        let head = req.method() == Method::HEAD;
        let resp = service.handle_holding(req, permit).await;
        let (mut parts, body) = resp.into_parts();
        // A guest cannot speak for Shoal: e.g. `x-shoal-error: replica_gone` would make the
        // forwarding gateway mark this endpoint down.
        proxy::strip_internal(&mut parts.headers);
        let body = match may_settle(head, &parts) {
            true => crate::body::settle(body).await.boxed_unsync(),
            false => body,
        };
        Response::from_parts(parts, guarded(body, body_share, inflight))
    }
}

impl Gateway {
    /// A permit of local replica `endpoint`, or with `movable` of another local replica of
    /// the app at the same revision, whichever has one first within the queue timeout.
    async fn room(
        &self,
        endpoint: &Arc<Endpoint>,
        app: &AppKey,
        movable: bool,
    ) -> Option<(
        Arc<Endpoint>,
        HttpService,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let local = |e: &Arc<Endpoint>| match &e.target {
            Target::Local { service, permits } => {
                Some((e.clone(), service.clone(), permits.clone()))
            }
            Target::Remote { .. } => None,
        };
        let (endpoint, service, own) = local(endpoint)?;
        if let Ok(p) = own.clone().try_acquire_owned() {
            return Some((endpoint, service, p));
        }
        let queue = self.inner.config.queue_timeout;
        if !movable {
            let p = tokio::time::timeout(queue, own.acquire_owned()).await;
            return Some((endpoint, service, p.ok()?.ok()?));
        }
        let deadline = tokio::time::Instant::now() + queue;
        loop {
            // The app's replicas as they are now: a wake from zero brings more of them.
            let (endpoints, _) = self.endpoints_of(app);
            let mut same: Vec<&Arc<Endpoint>> = endpoints
                .iter()
                .filter(|e| e.revision == endpoint.revision && e.is_local() && !e.is_down())
                .collect();
            same.sort_by_key(|e| e.inflight());
            let free = same.into_iter().find_map(|e| {
                let (e, service, permits) = local(e)?;
                Some((e, service, permits.try_acquire_owned().ok()?))
            });
            if free.is_some() {
                return free;
            }
            // Its own permit the moment one is freed; the others looked at again soon.
            let wait = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + ROOM_LOOK_EVERY),
                own.clone().acquire_owned(),
            );
            if let Ok(Ok(p)) = wait.await {
                return Some((endpoint, service, p));
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }
}

/// How often a request waiting for room looks at the app's other local replicas.
const ROOM_LOOK_EVERY: Duration = Duration::from_millis(5);

/// What a client whose request body could not be read gets.
fn unreadable_body(e: ReadAheadError) -> Response<ResponseBody> {
    match e {
        ReadAheadError::TimedOut => problem_response(
            ErrorCode::RequestTimeout,
            "the request body did not arrive in time",
        ),
        ReadAheadError::Broken(e) => problem_response(
            ErrorCode::BadRequest,
            &format!("reading the request body failed: {e}"),
        ),
    }
}

/// Whether a response's length may be taken from the body the guest has finished
/// ([`crate::body::settle`]): not for HEAD, whose body is not the one a GET would get, nor
/// when the guest gave a length or framing itself, nor for statuses that have no body.
fn may_settle(head: bool, parts: &http::response::Parts) -> bool {
    let framed = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    !head && !framed && !bodiless
}

/// What the client gets when no endpoint could take the request: the replica and why, not
/// where its node is (the client may be anyone; the node's log, written by
/// [`Gateway::mark_down`], has the address).
fn failure_response(app: &AppKey, endpoint: &Endpoint, failure: Failure) -> Response<ResponseBody> {
    match failure {
        Failure::Unconnected(e) | Failure::Unreachable(e) => problem_response(
            ErrorCode::BadGateway,
            &format!(
                "app {app}: replica {} is unreachable: {e}",
                endpoint.replica
            ),
        ),
        Failure::Late(limit) => problem_response(
            ErrorCode::Timeout,
            &format!(
                "app {app}: replica {} sent no response within {}s",
                endpoint.replica,
                limit.as_secs()
            ),
        ),
        // Nothing ran: the client may safely send it again.
        Failure::ReplicaGone => problem_response(
            ErrorCode::ReplicaGone,
            &format!(
                "app {app}: replica {} is no longer on its node; retry shortly",
                endpoint.replica
            ),
        ),
    }
}

/// The receiver's refusal of a forwarded request; the header lets the sender tell it from a
/// guest's own 503.
fn replica_gone(replica: &str) -> Response<ResponseBody> {
    let mut resp = problem_response(
        ErrorCode::ReplicaGone,
        &format!("replica {replica:?} does not run on this node"),
    );
    resp.headers_mut()
        .insert(ERROR_HEADER, header::HeaderValue::from_static(REPLICA_GONE));
    resp
}

/// Only a path goes to a replica, here or over a hop: `OPTIONS *` would make the hop's URI
/// `https://node:port*`, whose port reads as none, so the node's gateway would be dialled on
/// 443, refuse, and be marked down for every app. A 400 for it, and for CONNECT.
fn not_a_path<B>(req: &Request<B>) -> Option<Response<ResponseBody>> {
    let path = req.uri().path().starts_with('/') && req.method() != http::Method::CONNECT;
    (!path).then(|| {
        problem_response(
            ErrorCode::BadRequest,
            "the request target must be a path (starting with /): `OPTIONS *` and CONNECT are not served",
        )
    })
}

/// A request off the wire that names no one host: several Host headers, or none in an
/// HTTP/1.1 request with no absolute target either (RFC 9112, 3.2, which says to answer
/// 400). A proxy in front that reads another of them than Shoal does would route it to
/// another app.
fn ambiguous_host<B>(req: &Request<B>) -> Option<Response<ResponseBody>> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    let why = match (req.version(), hosts, req.uri().authority()) {
        (_, 2.., _) => "several Host headers",
        (http::Version::HTTP_11, 0, None) => "no Host header",
        _ => return None,
    };
    Some(problem_response(
        ErrorCode::BadRequest,
        &format!("the request has {why}: it names no one host to route by"),
    ))
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
    // `shop.example.` is `shop.example`, fully qualified: without this it would miss the
    // host's routes and fall to an any-host route, perhaps another namespace's.
    let host = host.strip_suffix('.').unwrap_or(&host);
    Some(host.to_ascii_lowercase())
}

/// What [`Gateway::access`] decided about a request.
enum Access {
    /// Asks for nothing internal: routed like any client's.
    Public,
    /// Asks for the internal surface and proved it may.
    Internal,
    /// Asks for the internal surface from outside the cluster: a 403, nothing else.
    Refused,
}

/// The most header fields a client's request may have, over either HTTP version: hyper's
/// HTTP/1.1 default, and Envoy's (`max_headers_count`).
const MAX_HEADER_FIELDS: usize = 100;

/// The most header fields a head may have over an HTTP/1.1 hop, either way: a client's
/// [`MAX_HEADER_FIELDS`] and the few a hop adds, with room for a guest's answer, so a request
/// does not pass or fail by the node it came in at. Not more: hyper allocates the room for
/// every head it reads, and 2,000 fields' worth cost a hop a quarter of its throughput.
pub(crate) const HOP_MAX_HEADERS: usize = 256;

/// Where a load balancer asks whether to send this gateway requests ([`Gateway::readiness`]):
/// under `/_shoal/`, the gateway's own prefix, answered before any app's route.
pub const READY_PATH: &str = "/_shoal/ready";

/// The longest a public request waits for a starting node's routes ([`Gateway::starting`]).
const LOAD_WAIT: Duration = Duration::from_secs(5);

/// Marks a request that came over a connection whose peer presented a certificate of the
/// cluster CA: another node's gateway, or the control plane.
#[derive(Clone, Copy)]
struct Member {
    control_plane: bool,
}

/// Whether `req` came over mutual TLS from the control plane (its API's proxy, `shoal
/// port-forward`), not from another node's gateway.
fn sent_by_control_plane<B>(req: &Request<B>) -> bool {
    req.extensions()
        .get::<Member>()
        .is_some_and(|m| m.control_plane)
}

/// Whether `req` reads a replica's output: a path under [`LOGS_PATH`], and no hop pinned to a
/// replica (whose path is the app's, whatever it says).
fn is_logs_path<B>(req: &Request<B>) -> bool {
    req.uri().path().starts_with(LOGS_PATH) && !req.headers().contains_key(REPLICA_HEADER)
}

/// A replica's concurrency permit shared by a request's guest and its response body: the
/// first of them to be dropped gives it back.
#[derive(Clone)]
struct SharedPermit(Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>);

impl Drop for SharedPermit {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn guarded(
    inner: ResponseBody,
    permit: Option<SharedPermit>,
    inflight: InflightGuard,
) -> ResponseBody {
    Guarded {
        inner,
        _permit: permit,
        _inflight: inflight,
    }
    .boxed_unsync()
}

/// A response body that holds, until it is done or dropped, the replica's in-flight count
/// and its share of the concurrency permit (local replicas only; the guest holds the other).
struct Guarded {
    inner: ResponseBody,
    _permit: Option<SharedPermit>,
    _inflight: InflightGuard,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = HttpError;

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

/// The largest request head (line and headers) a gateway takes, over HTTP/1.1 and HTTP/2
/// alike (as Envoy's 60 KiB default). HTTP/2's is refused by hyper from the header list's
/// size; HTTP/1.1's by [`head_bytes`] once hyper has read it, since hyper's own bound is its
/// read buffer (~400 KiB, where a head stops depending on how it arrived), and a smaller
/// buffer also throttles bodies, which stalled an 8 MiB echo.
const MAX_HEAD_BYTES: u32 = 64 << 10;

/// What `req`'s head weighs as HTTP/2 counts a header list (each field's name and value
/// and 32 bytes), with its method and target.
fn head_bytes<B>(req: &Request<B>) -> usize {
    let fields: usize = (req.headers().iter())
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    fields + target + req.method().as_str().len()
}

/// How long past a remote replica's request timeout, and the node's waits before it, a hop
/// may wait for its response head: that node answers 504 at the timeout, so by then it is
/// stuck, and the client gets a 504 too.
const HOP_SLACK: Duration = Duration::from_secs(5);

/// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
const H2_PING_EVERY: Duration = Duration::from_secs(20);

/// How many requests one HTTP/2 connection may have going at once (hyper's default, made
/// explicit: hops size their connection window by it).
pub(crate) const H2_MAX_STREAMS: u32 = 200;

/// The first byte of a TLS connection: a handshake record (RFC 8446 §5.1). No HTTP/1.1
/// method and not HTTP/2's preface starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts connections until [`Gateway::close`] (then returns once those it has have ended),
/// serving each with HTTP/1.1 keep-alive or, for a client that
/// starts with HTTP/2's preface (h2c with prior knowledge, as gRPC clients and load balancers
/// do in plain text), HTTP/2 with its requests multiplexed on the one connection. A
/// connection that starts a TLS handshake is told apart by its hello: one that asks for a
/// host name is the public's (`GatewayConfig::ingress_tls`); one that asks for none is a
/// member's (a hop, or the control plane reading logs), which must present a certificate of
/// the cluster CA, and its requests are marked [`Member`].
pub async fn serve(listener: TcpListener, gateway: Gateway) {
    let config = &gateway.inner.config;
    let (head_timeout, max_connections) = (config.header_read_timeout, config.max_connections);
    let tls = config.members.is_some() || config.ingress_tls.is_some();
    let connections = Arc::new(Semaphore::new(max_connections));
    let mut closing = gateway.inner.closing.subscribe();
    loop {
        // At the cap, connections wait in the listen backlog until one ends.
        let next = async {
            let slot = connections
                .clone()
                .acquire_owned()
                .await
                .expect("the connection semaphore is never closed");
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            next = next => next,
            _ = closed(&mut closing) => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Counted from the start: a client cannot hold more by stalling its handshake. A
        // member's connection is let go of the count once its certificate is checked.
        let client = match gateway.inner.clients.admit(peer.ip()) {
            Ok(client) => client,
            Err(refused) => {
                if refused.first {
                    tracing::warn!(client = %peer.ip(), "closing this client's new connections: it holds its most (--gateway-client-connections)");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutWriter::new(stream);
        stream.set_timeout(Some(config.send_timeout));
        let stream = Box::pin(stream);
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut client = client;
            if !tls {
                return serve_connection(gateway, stream, peer, None, false).await;
            }
            let deadline = tokio::time::Instant::now() + head_timeout;
            let mut first = [0u8; 1];
            match tokio::time::timeout_at(deadline, stream.get_ref().peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
                Ok(Ok(1)) => return serve_connection(gateway, stream, peer, None, false).await,
                // Closed, failed, or silent past the head timeout.
                _ => return,
            }
            let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
            let start = match tokio::time::timeout_at(deadline, acceptor).await {
                Ok(Ok(start)) => start,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "not a TLS hello"),
                Err(_) => return tracing::debug!(%peer, "a TLS hello took too long"),
            };
            let config = &gateway.inner.config;
            let (tls, is_member) = match start.client_hello().server_name() {
                Some(_) => (config.ingress_tls.clone(), false),
                None => (config.members.as_ref().map(|m| m.server.clone()), true),
            };
            let Some(tls) = tls else {
                return tracing::debug!(%peer, member = is_member, "no TLS for this kind of client");
            };
            match tokio::time::timeout_at(deadline, start.into_stream(tls)).await {
                Ok(Ok(stream)) => {
                    let presented = stream.get_ref().1.peer_certificates();
                    let first = presented.and_then(|c| c.first()).map(|c| c.as_ref());
                    if is_member && !gateway.admits(first) {
                        return tracing::debug!(%peer, "refused a member's certificate: not one of the cluster's nodes");
                    }
                    if is_member {
                        // Hops and the control plane are no client to cap: nodes may share an
                        // address or a /64 with each other and with the public.
                        client.exempt();
                    }
                    let member = is_member.then(|| Member {
                        control_plane: first.and_then(shoal_tls::member_of).as_deref()
                            == Some(shoal_tls::CONTROL_PLANE),
                    });
                    serve_connection(gateway, stream, peer, member, !is_member).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "refused a TLS connection"),
                Err(_) => tracing::debug!(%peer, "a TLS handshake took too long"),
            }
        });
    }
    // Closed: new connections are refused, and the ones there are end as they finish.
    drop(listener);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
}

/// Serves one accepted connection; its requests carry `member` when it is a member's, and
/// [`shoal_runtime::ClientTls`] when it is a client's over TLS (`tls`).
async fn serve_connection<I>(
    gateway: Gateway,
    io: I,
    peer: std::net::SocketAddr,
    member: Option<Member>,
    tls: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_read_timeout = gateway.inner.config.header_read_timeout;
    let mut closing = gateway.inner.closing.subscribe();
    let send_timeout = gateway.inner.config.send_timeout;
    let activity = Arc::new(Activity::default());
    let counted = activity.clone();
    let stalls = Arc::new(Stalls::new());
    let watching = stalls.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let http2 = req.version() == http::Version::HTTP_2;
        let busy = counted.start(http2);
        // A client's HTTP/2 streams: one it stops reading is no stalled socket write.
        let stalls = (http2 && member.is_none()).then(|| watching.clone());
        let gateway = gateway.clone();
        if let Some(member) = member {
            req.extensions_mut().insert(member);
        }
        req.extensions_mut().insert(proxy::ClientAddr(peer.ip()));
        if tls {
            req.extensions_mut().insert(shoal_runtime::ClientTls);
        }
        async move {
            let response = match ambiguous_host(&req) {
                Some(refused) => refused,
                None => gateway.handle(req).await,
            };
            drop(busy);
            let response = response.map(|body| match &stalls {
                Some(stalls) => stalls.watch(body),
                None => Watched::plain(body),
            });
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut server = auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    if member.is_some() {
        // A hop carries a head another gateway took, perhaps over HTTP/2, whose limit is
        // the head's size, not its count of fields past hyper's 100.
        server.http1().max_headers(HOP_MAX_HEADERS);
    }
    // Flow-control windows that grow with the connection's bandwidth-delay product, so
    // a large body over an HTTP/2 hop is not held to the 64 KiB default window; pings
    // find connections whose peer went away.
    server
        .http2()
        .adaptive_window(true)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES)
        .keep_alive_interval(Some(H2_PING_EVERY))
        .keep_alive_timeout(H2_PING_EVERY);
    let conn = server.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // A client's connection that starts no request within a head timeout, or an HTTP/2 one
    // idle for as long, is let go: hyper reads HTTP/2's preface, and waits between an HTTP/2
    // connection's requests, with no deadline (HTTP/1.1 has its own, and is left to it), so
    // a stalled preface or an idle HTTP/2 connection would hold a connection slot forever.
    // Responses still streaming finish. Members' hops stay open for reuse.
    let idle = activity.idle(header_read_timeout);
    tokio::pin!(idle);
    let stalled = stalls.stalled(send_timeout);
    tokio::pin!(stalled);
    // Shut down gracefully (GOAWAY, the streams there are finish): the stall watch goes on,
    // or one stream the client never reads would hold the connection for good.
    let mut shutting = false;
    let ended = loop {
        tokio::select! {
            ended = conn.as_mut() => break ended,
            _ = closed(&mut closing), if !shutting => {
                conn.as_mut().graceful_shutdown();
                shutting = true;
            }
            () = &mut idle, if member.is_none() && !shutting => {
                conn.as_mut().graceful_shutdown();
                shutting = true;
            }
            () = &mut stalled, if member.is_none() => {
                // The other streams get a moment to finish; the stalled one never will.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(STALLED_GRACE, conn.as_mut()).await;
                return tracing::debug!(%peer, "closed an HTTP/2 connection: the client read nothing of a stream for the send timeout");
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
    }
}

/// How long the other streams of an HTTP/2 connection with a stalled one may take to finish
/// before the connection is dropped.
const STALLED_GRACE: Duration = Duration::from_secs(5);

/// What a client connection has done, for [`serve_connection`]'s idle watch.
#[derive(Default)]
struct Activity {
    /// Requests started.
    started: std::sync::atomic::AtomicU64,
    /// Requests whose response head is not sent yet.
    active: std::sync::atomic::AtomicUsize,
    /// Requests whose response head went.
    answered: std::sync::atomic::AtomicU64,
    /// It speaks HTTP/2.
    http2: std::sync::atomic::AtomicBool,
}

/// A request of an [`Activity`] until its response head goes.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.answered.fetch_add(1, Relaxed);
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl Activity {
    fn start(self: &Arc<Self>, http2: bool) -> Busy {
        use std::sync::atomic::Ordering::Relaxed;
        self.started.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        if http2 {
            self.http2.store(true, Relaxed);
        }
        Busy(self.clone())
    }

    /// Ends when the connection has started no request within `timeout`, or, over HTTP/2,
    /// when a whole `timeout` passed with none started, none answered and none waiting for
    /// its head; never for an HTTP/1.1 connection once it has had a request.
    async fn idle(&self, timeout: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut seen = (0, 0);
        loop {
            tokio::time::sleep(timeout).await;
            let now = (self.started.load(Relaxed), self.answered.load(Relaxed));
            if now.0 == 0 {
                return;
            }
            if !self.http2.load(Relaxed) {
                return std::future::pending().await;
            }
            // Answered since the last look counts: a long request's answer just before it,
            // and the client's next request just after, is no idle connection.
            if now == seen && self.active.load(Relaxed) == 0 {
                return;
            }
            seen = now;
        }
    }
}

/// Every remote endpoint of `map` replaced with `remote`; see
/// [`Gateway::set_remote_endpoints`].
fn replace_remotes(
    metrics: &Registry,
    hops: &proxy::Hops,
    map: &mut EndpointMap,
    mut remote: HashMap<AppKey, Vec<RemoteReplica>>,
) {
    let apps: HashSet<AppKey> = map.keys().chain(remote.keys()).cloned().collect();
    for app in apps {
        let replicas = remote.remove(&app).unwrap_or_default();
        replace_app_remotes(metrics, hops, map, &app, replicas);
    }
}

/// [`replace_remotes`] for one app.
fn replace_app_remotes(
    metrics: &Registry,
    hops: &proxy::Hops,
    map: &mut EndpointMap,
    app: &AppKey,
    replicas: Vec<RemoteReplica>,
) {
    let old = map.get(app);
    let mut list: Vec<Arc<Endpoint>> = old
        .map(|l| l.iter().filter(|e| e.is_local()).cloned().collect())
        .unwrap_or_default();
    for r in replicas {
        if list.iter().any(|e| e.replica == r.replica) {
            continue;
        }
        let kept = old
            .and_then(|l| {
                l.iter().find(|e| {
                    e.replica == r.replica
                        && e.revision == r.revision
                        && matches!(&e.target, Target::Remote { node, gateway, .. }
                            if *node == r.node && *gateway == r.gateway)
                })
            })
            .cloned();
        let endpoint = match kept {
            Some(e) => {
                e.relist();
                e
            }
            None => {
                let (client, revision) = (hops.client(&r.node), r.revision);
                let mut e = Endpoint::remote(r, client);
                e.counters = metrics.counters(app, revision);
                Arc::new(e)
            }
        };
        list.push(endpoint);
    }
    if list.is_empty() {
        map.remove(app);
    } else {
        map.insert(app.clone(), list.into());
    }
}

/// The span of one request, its app and replica recorded once known.
fn request_span<B>(req: &Request<B>) -> Span {
    tracing::debug_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        app = field::Empty,
        replica = field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> AppKey {
        AppKey::new("default", name)
    }

    /// An HTTP/2 connection whose request was answered just after the idle watch last looked
    /// is not idle at its next look: the client's next request may be on its way.
    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_answered_within_the_last_timeout_is_not_idle() {
        let second = Duration::from_secs(1);
        let activity = Arc::new(Activity::default());
        let busy = activity.start(true);
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(second).await }
        });
        tokio::time::sleep(second * 3 / 2).await;
        drop(busy);
        tokio::time::sleep(second).await;
        assert!(!idle.is_finished(), "answered half a timeout ago");
        tokio::time::sleep(second).await;
        assert!(idle.is_finished(), "a whole timeout with nothing");
    }

    #[test]
    fn a_host_is_read_without_its_port_case_or_final_dot() {
        let host = |uri: &str, header: Option<&str>| {
            let mut req = Request::get(uri);
            if let Some(h) = header {
                req = req.header(header::HOST, h);
            }
            request_host(&req.body(()).unwrap())
        };
        for (uri, header) in [
            ("/", Some("Shop.Example:8080")),
            ("/", Some("shop.example.")),
            ("/", Some("shop.example.:443")),
            ("http://SHOP.example./x", None),
        ] {
            assert_eq!(
                host(uri, header).as_deref(),
                Some("shop.example"),
                "{uri} {header:?}"
            );
        }
        assert_eq!(host("/", None), None);
    }

    /// `name` served at `/{name}`, with one remote replica, a canary split, waking.
    fn tables_of(name: &str) -> Tables {
        Tables {
            routes: vec![(Route::parse(&format!("/{name}")).unwrap(), app(name))],
            services: vec![(app(name), Inbound::namespace("default"))],
            remotes: HashMap::from([(
                app(name),
                vec![RemoteReplica {
                    replica: format!("{name}-1"),
                    revision: 1,
                    node: "b".into(),
                    gateway: "b:8080".into(),
                    timeout: None,
                }],
            )]),
            splits: HashMap::from([(
                app(name),
                Split {
                    canary: 2,
                    weight: 10,
                },
            )]),
            wake: vec![app(name)],
        }
    }

    fn routed(g: &Gateway, path: &str) -> Option<String> {
        let table = g.inner.table.read().unwrap();
        table.lookup(None, path).map(|(_, a)| a.name.clone())
    }

    fn split(g: &Gateway, name: &str) -> Option<Split> {
        g.endpoints_of(&app(name)).1
    }

    #[test]
    fn updating_some_apps_leaves_the_others_alone() {
        let g = Gateway::new(GatewayConfig::default());
        let (mut all, b) = (tables_of("a"), tables_of("b"));
        all.routes.extend(b.routes);
        all.services.extend(b.services);
        all.remotes.extend(b.remotes);
        all.splits.extend(b.splits);
        all.wake.extend(b.wake);
        g.set_tables(all);

        let a2 = RemoteReplica {
            replica: "a-2".into(),
            revision: 1,
            node: "c".into(),
            gateway: "c:8080".into(),
            timeout: None,
        };
        let moved = Tables {
            routes: vec![(Route::parse("/a2").unwrap(), app("a"))],
            services: vec![(app("a"), Inbound::namespace("default"))],
            remotes: HashMap::from([(app("a"), vec![a2])]),
            ..Tables::default()
        };
        g.update_tables(vec![app("a")], moved);
        assert_eq!(routed(&g, "/a"), None);
        assert_eq!(routed(&g, "/a2").as_deref(), Some("a"));
        assert_eq!(g.endpoints(&app("a")), ["a-2"]);
        assert_eq!(
            (split(&g, "a"), g.inner.holds.wakes(&app("a"))),
            (None, false)
        );
        assert_eq!(routed(&g, "/b").as_deref(), Some("b"), "b is as it was");
        assert_eq!(g.endpoints(&app("b")), ["b-1"]);
        assert!(split(&g, "b").is_some() && g.inner.holds.wakes(&app("b")));

        g.update_tables(vec![app("b")], Tables::default());
        assert_eq!(
            routed(&g, "/b"),
            None,
            "an app named and not described is forgotten"
        );
        assert!(!g.knows(&app("b")) && !g.inner.holds.wakes(&app("b")));
        assert!(g.knows(&app("a")));
    }

    #[test]
    fn revived_remote_endpoints_are_back_in_rotation() {
        let g = Gateway::new(GatewayConfig::default());
        g.set_tables(tables_of("a"));
        let (endpoints, _) = g.endpoints_of(&app("a"));
        endpoints[0].set_down();
        assert!(g.endpoints(&app("a")).is_empty());
        // Not at once: a killed node is listed until it misses its heartbeats.
        g.revive_remotes();
        assert!(g.endpoints(&app("a")).is_empty(), "back within 3 s");
        endpoints[0].down_earlier(crate::endpoint::DOWN_AT_LEAST);
        assert_eq!(g.endpoints(&app("a")), ["a-1"]);
        // Out long enough, it still waits for a status listing it.
        endpoints[0].set_down();
        endpoints[0].down_earlier(crate::endpoint::DOWN_AT_LEAST * 10);
        assert!(g.endpoints(&app("a")).is_empty(), "back unlisted");
        g.revive_remotes();
        assert_eq!(g.endpoints(&app("a")), ["a-1"]);
    }
}
