//! Sending requests over the network: to another node's gateway (one hop, pinned to a
//! replica) and, for guests granted hosts, to the outside. Each has its own pooled client:
//! egress connects only to addresses [`egress::Guard`] allows.

use crate::body::{ReadAheadError, Settled};
use crate::egress;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use shoal_core::spec::AppKey;
use shoal_runtime::{HttpError, WasiBody};
use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::sync::Mutex;
use std::time::Duration;

/// Names the replica a forwarded request must be served by. Its presence also means the
/// request already made its one hop: the receiver serves it locally or refuses it.
pub(crate) const REPLICA_HEADER: HeaderName =
    HeaderName::from_static(shoal_core::auth::REPLICA_HEADER);
/// The app (`namespace/name`) a forwarded request is for, so the receiver needs no route
/// for it: service calls are reachable by name, routes or not.
pub(crate) const APP_HEADER: HeaderName = HeaderName::from_static(shoal_core::auth::APP_HEADER);
/// Marks a request that crossed between gateways; never forwarded again.
pub(crate) const HOP_HEADER: HeaderName = HeaderName::from_static(shoal_core::auth::HOP_HEADER);
/// On a receiver's refusal, tells the sender it may retry elsewhere without parsing the body.
pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("x-shoal-error");
/// The `x-shoal-error` value (and error code) of a receiver's refusal.
pub(crate) const REPLICA_GONE: &str = shoal_core::problem::ErrorCode::ReplicaGone.as_str();

/// On a hop: the client came over TLS ([`shoal_runtime::ClientTls`]), so its guest is told
/// `https`.
pub(crate) const SCHEME_HEADER: HeaderName = HeaderName::from_static("x-shoal-scheme");

/// Connection-level headers (RFC 9110 §7.6.1): they describe one hop, so each hop sets its own.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// For hops: over mutual TLS with the cluster's certificates, or (tests, without them) plain.
pub(crate) type Client = legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, WasiBody>;
/// For guests' granted hosts: connects only where [`egress::Guard`] allows.
pub(crate) type EgressClient =
    legacy::Client<hyper_rustls::HttpsConnector<egress::Connector>, WasiBody>;

/// Idle connections are closed after this long; nodes come and go.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// The clients hops go out with. Over the cluster's TLS each node has its own, which takes
/// only that node's certificate ([`shoal_tls::Mutual::client_for`]): an address proves
/// nothing, as a node may be issued a certificate for any address it says it has. In plain
/// text (tests without certificates) one client serves every node.
pub(crate) struct Hops {
    connect_timeout: Duration,
    http2: bool,
    clients: HopClients,
}

enum HopClients {
    /// Plain text: one client for every node.
    Plain(Client),
    /// The cluster's TLS: a client per node, made on first use.
    Tls {
        tls: shoal_tls::Mutual,
        by_node: Mutex<HashMap<String, Client>>,
    },
}

impl Hops {
    pub(crate) fn new(
        connect_timeout: Duration,
        http2: bool,
        tls: Option<shoal_tls::Mutual>,
    ) -> Hops {
        let clients = match tls {
            Some(tls) => HopClients::Tls {
                tls,
                by_node: Mutex::new(HashMap::new()),
            },
            None => HopClients::Plain(client(connect_timeout, http2, None)),
        };
        Hops {
            connect_timeout,
            http2,
            clients,
        }
    }

    /// How hops reach a node's gateway: `https` with the cluster's certificates.
    pub(crate) fn scheme(&self) -> &'static str {
        match self.clients {
            HopClients::Plain(_) => "http",
            HopClients::Tls { .. } => "https",
        }
    }

    /// The client for node `node`: the same one each time, so the endpoints of its replicas
    /// share its connections.
    pub(crate) fn client(&self, node: &str) -> Client {
        match &self.clients {
            HopClients::Plain(client) => client.clone(),
            HopClients::Tls { tls, by_node } => by_node
                .lock()
                .expect("hop clients lock")
                .entry(node.to_string())
                .or_insert_with(|| {
                    client(self.connect_timeout, self.http2, Some(tls.client_for(node)))
                })
                .clone(),
        }
    }

    /// Drops the clients of nodes not in `nodes`; their connections close once no request
    /// uses them.
    pub(crate) fn retain(&self, nodes: &HashSet<&str>) {
        if let HopClients::Tls { by_node, .. } = &self.clients {
            let mut clients = by_node.lock().expect("hop clients lock");
            clients.retain(|node, _| nodes.contains(node.as_str()));
        }
    }
}

/// A pooling client for hops ([`Hops`]); with `http2`, one that speaks HTTP/2 only (the gateways'
/// listeners accept it) and multiplexes requests on one connection per peer. With the cluster's
/// certificates (`tls`) it reaches only `https://` peers that present one, and presents its
/// own; without them, plain text with prior knowledge.
fn client(connect_timeout: Duration, http2: bool, tls: Option<rustls::ClientConfig>) -> Client {
    let mut http = HttpConnector::new();
    configure(&mut http, connect_timeout);
    // Probed after HOP_PING_EVERY idle, every 2 s, given up after 3 unanswered: about 16 s.
    http.set_keepalive(Some(HOP_PING_EVERY));
    http.set_keepalive_interval(Some(Duration::from_secs(2)));
    http.set_keepalive_retries(Some(3));
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match tls {
        Some(config) => builder.with_tls_config(config).https_only(),
        // Never used for TLS: hops go to `http://` peers then.
        None => builder
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .https_or_http(),
    };
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    let mut builder = pooling();
    // One connection carries every hop to a node, so a response its client does not read
    // must not hold the others: each stream gets a window of its own, and the connection
    // one that every stream the peer lets open at once could fill without stopping it
    // (windows that grow with the bandwidth-delay product keep the two equal, and one
    // stalled download then stops every other response on the connection).
    builder
        .http2_only(http2)
        .http2_initial_stream_window_size(HOP_STREAM_WINDOW)
        .http2_initial_connection_window_size(HOP_CONNECTION_WINDOW)
        // A guest's answer with more fields than hyper's 100 crosses as it is served locally
        // (up to HOP_MAX_HEADERS).
        .http1_max_headers(crate::server::HOP_MAX_HEADERS);
    if http2 {
        // A node that died without a word (power, partition) would hold every request sent
        // on its one connection, and every body streaming from it, until the head timeout or
        // forever: a ping unanswered closes the connection, and them with it.
        builder
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Some(HOP_PING_EVERY))
            .http2_keep_alive_timeout(HOP_PING_EVERY)
            .http2_keep_alive_while_idle(true);
    }
    builder.build(connector)
}

/// How often a hop's HTTP/2 connection is pinged, and how long the answer may take; also the
/// TCP keep-alive of hop connections (HTTP/1.1 ones too).
const HOP_PING_EVERY: Duration = Duration::from_secs(10);

/// How much of one hop response may arrive before its client reads it: enough for a
/// large body at a data centre's round trips.
const HOP_STREAM_WINDOW: u32 = 1 << 20;

/// How much of all hop responses on one connection may arrive before they are read: the
/// stream window for every stream a gateway lets a connection open at once.
const HOP_CONNECTION_WINDOW: u32 = crate::server::H2_MAX_STREAMS * HOP_STREAM_WINDOW;

/// A pooling HTTP/1.1 client for egress, over TLS for `https://` (checked against the Web
/// PKI's roots and `extra_roots`, DER). It is separate from the hops' client so that the
/// address checks apply to guests' calls only; hops go to other nodes, private by nature.
pub(crate) fn egress_client(
    connect_timeout: Duration,
    allow_private: bool,
    extra_roots: &[Vec<u8>],
) -> EgressClient {
    let guard = egress::Guard { allow_private };
    let mut http = HttpConnector::new_with_resolver(egress::Resolver(guard));
    configure(&mut http, connect_timeout);
    // The connector leaves `https://` to the TLS layer around it.
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_roots {
        if let Err(e) = roots.add(rustls::pki_types::CertificateDer::from(der.clone())) {
            tracing::warn!(error = %e, "an extra egress root certificate was not taken");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(egress::Connector { http, guard });
    pooling().build(https)
}

fn configure<R>(connector: &mut HttpConnector<R>, connect_timeout: Duration) {
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
}

fn pooling() -> legacy::Builder {
    let mut builder = legacy::Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new());
    builder
}

/// What made a remote endpoint unusable for this request; no guest saw it, unless it is
/// [`Failure::Late`].
pub(crate) enum Failure {
    /// No connection to the node's gateway could be made: nothing behind it can be reached.
    Unconnected(String),
    /// No response head: the connection broke.
    Unreachable(String),
    /// No response head within the time a replica's own timeout and the node's waits
    /// before it can take: the request may have run, or still runs, so it is not sent again.
    Late(Duration),
    /// The node answered that it no longer runs the replica.
    ReplicaGone,
}

/// Sends `req` to `replica` through the gateway at `node`, streaming the body both ways.
pub(crate) async fn forward(
    client: &Client,
    node: &str,
    app: &AppKey,
    replica: &str,
    scheme: &str,
    head_within: Option<Duration>,
    req: Request<WasiBody>,
) -> Result<Response<WasiBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    // Keep the host the caller addressed (a guest's absolute URI may be the only place it
    // is), not the node's address: the replica should not see how it was reached.
    if !parts.headers.contains_key(header::HOST) {
        let host = parts.uri.authority().map_or("localhost", |a| a.as_str());
        if let Ok(host) = HeaderValue::from_str(host) {
            parts.headers.insert(header::HOST, host);
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{scheme}://{node}{path}")
        .parse::<Uri>()
        .map_err(|e| Failure::Unreachable(format!("node gateway address {node:?}: {e}")))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    strip_internal(&mut parts.headers);
    let headers = &mut parts.headers;
    let value = |s: &str| {
        HeaderValue::from_str(s).map_err(|e| Failure::Unreachable(format!("header value: {e}")))
    };
    headers.insert(REPLICA_HEADER, value(replica)?);
    headers.insert(APP_HEADER, value(&app.to_string())?);
    headers.insert(HOP_HEADER, HeaderValue::from_static("1"));
    if parts.extensions.get::<shoal_runtime::ClientTls>().is_some() {
        headers.insert(SCHEME_HEADER, HeaderValue::from_static("https"));
    }

    let request = client.request(Request::from_parts(parts, body));
    let response = match head_within {
        Some(limit) => tokio::time::timeout(limit, request)
            .await
            .map_err(|_| Failure::Late(limit))?,
        None => request.await,
    }
    .map_err(|e| match e.is_connect() {
        true => Failure::Unconnected(error_chain(&e)),
        false => Failure::Unreachable(error_chain(&e)),
    })?;
    let gone = response.status() == StatusCode::SERVICE_UNAVAILABLE
        && response
            .headers()
            .get(ERROR_HEADER)
            .is_some_and(|v| v == REPLICA_GONE);
    if gone {
        return Err(Failure::ReplicaGone);
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_internal(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(HttpError::Hyper).boxed_unsync(),
    ))
}

/// Sends a guest's request to a host its spec grants, as a plain client would.
pub(crate) async fn egress(
    client: &EgressClient,
    mut req: Request<WasiBody>,
) -> Result<Response<WasiBody>, HttpError> {
    strip_internal(req.headers_mut());
    let response = client.request(req).await.map_err(|e| client_error(&e))?;
    Ok(response.map(|body| body.map_err(HttpError::Hyper).boxed_unsync()))
}

/// Whether a header of Shoal's own is present: any `x-shoal-*`, the prefix being reserved
/// whole, so a name the cluster starts using later is one no client could have set.
pub(crate) fn has_internal(headers: &HeaderMap) -> bool {
    headers.keys().any(is_internal)
}

/// Removes Shoal's own headers (`x-shoal-*`) so guests and the outside never see or forge them.
pub(crate) fn strip_internal(headers: &mut HeaderMap) {
    if headers.keys().any(is_internal) {
        let ours: Vec<HeaderName> = headers.keys().filter(|n| is_internal(n)).cloned().collect();
        for name in ours {
            headers.remove(name);
        }
    }
}

/// Header names are lower case in `http`, whatever the client sent.
fn is_internal(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-shoal-")
}

/// Removes the headers that describe one connection, including those `connection` names.
/// `transfer-encoding` goes too: hyper frames the body again for the next hop.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The address a client connected to this gateway from, as the connection gave it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) std::net::IpAddr);

/// What a client's request carries to the guest of where it came from, as a proxy in front of
/// a server says (nginx's `$proxy_add_x_forwarded_for`, Envoy's edge): the client's address
/// appended to `x-forwarded-for` (what the client sent itself comes first, and is only as
/// true as the client), and `x-forwarded-proto` set to the scheme it used. Done once, at the
/// gateway the client reached: a hop to another node carries both unchanged.
pub(crate) fn forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr, https: bool) {
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    let mut value = Vec::new();
    for sent in headers.get_all(&X_FORWARDED_FOR) {
        value.extend_from_slice(sent.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(client.to_canonical().to_string().as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let scheme = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
}

/// Methods that mean the same when sent twice (RFC 9110 §9.2.2), minus CONNECT and PATCH.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether `req` may still have body to send: the node it is forwarded to reads the first of
/// it before the guest starts, which the hop's wait for a response head must allow for.
pub(crate) fn may_have_body<B: Body>(req: &Request<B>) -> bool {
    !req.body().is_end_stream() && req.body().size_hint().exact() != Some(0)
}

/// The headers promise no body: no `transfer-encoding`, `content-length` absent or 0.
fn declares_no_body(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Whether a failed send may be repeated on another endpoint as it is: an idempotent method
/// and a body known to be empty, so the copy we resend is the whole request.
fn resendable<B: Body>(req: &Request<B>) -> bool {
    is_idempotent(req.method())
        && declares_no_body(req.headers())
        && (req.body().is_end_stream() || req.body().size_hint().exact() == Some(0))
}

/// Could this request become [`resendable`] once its body is seen to be empty?
fn maybe_resendable<B: Body>(req: &Request<B>) -> bool {
    is_idempotent(req.method()) && declares_no_body(req.headers())
}

/// A request kept to be sent again should its hop fail ([`keep_for_resend`]): its head, and
/// its body if it had one, read whole.
pub(crate) struct Resend {
    method: Method,
    uri: Uri,
    version: http::Version,
    headers: HeaderMap,
    body: Option<Bytes>,
}

impl Resend {
    fn of<B>(req: &Request<B>, body: Option<Bytes>) -> Resend {
        Resend {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    }

    /// Whether the request may go again after `failure`. Never after a late answer: it may
    /// have run, or still runs. After a connection that broke, only if its method is
    /// idempotent (sent twice, it means the same). After no connection, or the node's
    /// answer that it no longer runs the replica, always: no guest saw it.
    pub(crate) fn after(&self, failure: &Failure) -> bool {
        match failure {
            Failure::Late(_) => false,
            Failure::Unreachable(_) => is_idempotent(&self.method),
            Failure::Unconnected(_) | Failure::ReplicaGone => true,
        }
    }

    pub(crate) fn request(self) -> Request<WasiBody> {
        let body = match self.body {
            Some(bytes) => full(bytes),
            None => empty(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The largest request body a gateway keeps to send again if its hop fails: what the node it
/// goes to reads ahead anyway (a form, a JSON call). A bigger one streams through and is not
/// sent again.
const RESEND_BODY_MAX: u64 = crate::body::READ_AHEAD as u64;

/// Readies a request for a remote endpoint to be sent again should its hop fail, and says
/// how ([`Resend::after`]). A bodiless one is kept as it is, once its body is seen to be
/// empty ([`peek_body`]); one whose body has a known length of at most [`RESEND_BODY_MAX`]
/// has it read whole first, within `body_timeout` as the node it goes to would; any other
/// is not kept. A body with trailers streams on, not kept either.
pub(crate) async fn keep_for_resend(
    req: Request<WasiBody>,
    body_timeout: Duration,
) -> Result<(Request<WasiBody>, Option<Resend>), ReadAheadError> {
    let req = match maybe_resendable(&req) && !resendable(&req) {
        true => peek_body(req).await,
        false => req,
    };
    if resendable(&req) {
        let resend = Resend::of(&req, None);
        return Ok((req, Some(resend)));
    }
    let small = (req.body().size_hint().exact()).is_some_and(|n| n <= RESEND_BODY_MAX);
    if !small {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let collected = match tokio::time::timeout(body_timeout, body.collect()).await {
        Err(_elapsed) => return Err(ReadAheadError::TimedOut),
        Ok(Err(e)) => return Err(ReadAheadError::Broken(e)),
        Ok(Ok(collected)) => collected,
    };
    if let Some(trailers) = collected.trailers().cloned() {
        let frames = [Frame::data(collected.to_bytes()), Frame::trailers(trailers)];
        let body = StreamBody::new(futures::stream::iter(frames.map(Ok))).boxed_unsync();
        return Ok((Request::from_parts(parts, body), None));
    }
    let bytes = collected.to_bytes();
    let req = Request::from_parts(parts, full(bytes.clone()));
    let resend = Resend::of(&req, Some(bytes));
    Ok((req, Some(resend)))
}

/// How long a request that may be resent waits for its body to show it is empty. Only a
/// guest's body needs it (a server-parsed one knows its size); a guest finishes the body of a
/// GET right after sending it, and one that does not is simply not resent.
const BODY_PEEK: Duration = Duration::from_millis(20);

/// Reads the first frame of a [`maybe_resendable`] request's body, briefly: an empty body
/// becomes one that says so, making the request [`resendable`]; anything else is put back.
async fn peek_body(req: Request<WasiBody>) -> Request<WasiBody> {
    let (parts, mut body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_PEEK, body.frame()).await {
        Err(_elapsed) => body,
        Ok(None) => empty(),
        Ok(Some(first)) => Settled::prepend(first, body).boxed_unsync(),
    };
    Request::from_parts(parts, body)
}

pub(crate) fn empty() -> WasiBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

fn full(bytes: Bytes) -> WasiBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// A client error and its causes on one line: `client error (Connect): tcp connect error: …`.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `wasi:http` error code a guest sees for a failed egress request.
fn client_error(e: &legacy::Error) -> HttpError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    let mut io_kind = None;
    let mut dns = false;
    let mut hyper_error = None;
    while let Some(cause) = source {
        if cause.is::<egress::Refused>() {
            return HttpError::HttpRequestDenied;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            hyper_error.get_or_insert(h);
        }
        // hyper-util's connector names DNS failures only in its message.
        dns |= cause.to_string() == "dns error";
        source = cause.source();
    }
    if e.is_connect() {
        return match io_kind {
            _ if dns => HttpError::DnsError {
                rcode: None,
                info_code: None,
            },
            Some(std::io::ErrorKind::ConnectionRefused) => HttpError::ConnectionRefused,
            Some(std::io::ErrorKind::TimedOut) => HttpError::ConnectionTimeout,
            _ => HttpError::DestinationUnavailable,
        };
    }
    match hyper_error {
        Some(h) if h.is_timeout() => HttpError::HttpResponseTimeout,
        Some(h) if h.is_incomplete_message() || h.is_closed() || h.is_canceled() => {
            HttpError::ConnectionTerminated
        }
        Some(h) if h.is_parse() => HttpError::HttpProtocolError,
        _ => HttpError::InternalError(Some(error_chain(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's address goes after what it sent, over one or several fields; the scheme
    /// is the gateway's to say, whatever the client claimed.
    #[test]
    fn the_client_address_is_appended_to_x_forwarded_for() {
        let v4: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        let mut headers = HeaderMap::new();
        forwarded_for(&mut headers, v4, false);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.9");
        assert_eq!(headers["x-forwarded-proto"], "http");

        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let mapped: std::net::IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        forwarded_for(&mut headers, mapped, false);
        let all: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["203.0.113.7, 198.51.100.1, 192.0.2.9"]);
        assert_eq!(headers["x-forwarded-proto"], "http");

        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let mut headers = HeaderMap::new();
        forwarded_for(&mut headers, v6, true);
        assert_eq!(headers["x-forwarded-for"], "2001:db8::1");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<WasiBody> {
        let mut r = Request::new(empty());
        *r.method_mut() = method;
        for (k, v) in headers {
            r.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        r
    }

    #[test]
    fn only_idempotent_bodiless_requests_are_resent_as_they_are() {
        assert!(resendable(&req(Method::GET, &[])));
        assert!(resendable(&req(Method::DELETE, &[("content-length", "0")])));
        assert!(!resendable(&req(Method::POST, &[])));
        assert!(!resendable(&req(Method::PUT, &[("content-length", "3")])));
        assert!(!resendable(&req(
            Method::GET,
            &[("transfer-encoding", "chunked")]
        )));
        // A guest's body: nothing says it is empty until it has been read.
        let streaming = Request::get("/").body(Unknown).unwrap();
        assert!(!resendable(&streaming));
        assert!(maybe_resendable(&streaming));
    }

    fn with_body(method: Method, body: impl Into<Bytes>) -> Request<WasiBody> {
        let mut r = Request::new(full(body.into()));
        *r.method_mut() = method;
        r
    }

    #[tokio::test]
    async fn a_small_body_is_kept_and_sent_again_only_where_no_guest_saw_it() {
        let within = Duration::from_secs(1);
        let (req, post) = keep_for_resend(with_body(Method::POST, "payload"), within)
            .await
            .unwrap();
        assert_eq!(
            req.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );
        let post = post.expect("a small body is kept");
        assert!(post.after(&Failure::Unconnected("refused".into())));
        assert!(post.after(&Failure::ReplicaGone));
        assert!(!post.after(&Failure::Unreachable("broken once sent".into())));
        assert!(!post.after(&Failure::Late(within)));
        let again = post.request();
        assert_eq!(again.method(), Method::POST);
        assert_eq!(
            again.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );

        let (_, put) = keep_for_resend(with_body(Method::PUT, "x"), within)
            .await
            .unwrap();
        assert!(
            put.unwrap()
                .after(&Failure::Unreachable("broken once sent".into()))
        );

        // Too big to keep, or of a length not known: it streams on, not kept.
        let big = vec![b'x'; RESEND_BODY_MAX as usize + 1];
        let (req, kept) = keep_for_resend(with_body(Method::POST, big), within)
            .await
            .unwrap();
        assert!(kept.is_none());
        assert_eq!(req.body().size_hint().exact(), Some(RESEND_BODY_MAX + 1));
        let frames = futures::stream::iter([Ok(Frame::data(Bytes::from_static(b"x")))]);
        let mut unknown = Request::new(StreamBody::new(frames).boxed_unsync());
        *unknown.method_mut() = Method::POST;
        let (_, kept) = keep_for_resend(unknown, within).await.unwrap();
        assert!(kept.is_none());
    }

    struct Unknown;

    impl Body for Unknown {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
    }

    #[test]
    fn hop_by_hop_and_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-foo"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }
}
