//! One HTTP client for the `/v1` API, used by the CLI (admin token) and by
//! worker nodes (join token, then their own credential): the cluster's servers
//! and a bearer token, JSON in and out, and any `{"error": …}` answer turned
//! into a [`ClientError::Api`] carrying status, code and message. Callers
//! decide timeouts per request and say errors in their own words.
//!
//! Given several servers of one cluster, a call goes to the current one and,
//! when that one does not answer, on to the others in turn ([`Resend`] says
//! when that is safe); the server that failed is left for the next one by
//! every later call too.

use crate::servers::Servers;
use reqwest::{Method, Request, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

/// A Shoal API served at `servers`, called with `token`.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    servers: Servers,
    token: String,
}

/// Leaves the token out: a client may end up in a log.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the connection failed, broke or timed out. `base` names the server, or the
    /// servers tried, comma-separated.
    #[error("request to {base} failed: {source}")]
    Send {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// A non-2xx answer with the API's `{"error": …}` body.
    #[error("{message} ({}, {code})", .status.as_u16())]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// A non-2xx answer without it (not a Shoal API, a proxy in between);
    /// `body` is its text, trimmed.
    #[error("the API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    /// A 2xx answer whose body is not what the caller expected.
    #[error("unreadable response: {0}")]
    Decode(#[source] reqwest::Error),
}

impl ClientError {
    /// The answer's status, if there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Status { status, .. } => Some(*status),
            ClientError::Send { .. } | ClientError::Decode(_) => None,
        }
    }

    /// Whether no server can have received the request: no connection was made (refused,
    /// timed out connecting, TLS handshake cut, as by a server closing connections past a
    /// client's cap). Such a request can be sent again, whatever it does.
    pub fn unsent(&self) -> bool {
        matches!(self, ClientError::Send { source, .. } if Failure::of(source) == Failure::Unsent)
    }

    /// The API's error code (`not_found`, `conflict`, …), if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// When a request that one server did not answer may go to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// Only when no server can have received it: the connection was never made (refused,
    /// timed out connecting, TLS refused). What a request that changes something gets by
    /// default: sent twice, it could act twice.
    IfUnsent,
    /// Also after the connection broke or timed out once the request was sent, and after a
    /// 5xx answer: for requests that do the same the second time (reads, and writes of a whole
    /// state, such as an apply or a heartbeat).
    Idempotent,
}

impl Resend {
    /// What a request gets unless its caller says otherwise: reads are idempotent.
    pub fn by_method(method: &Method) -> Resend {
        if matches!(*method, Method::GET | Method::HEAD) {
            Resend::Idempotent
        } else {
            Resend::IfUnsent
        }
    }
}

/// How one server failed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// No connection was made: the request cannot have been received.
    Unsent,
    /// The connection broke or timed out after the request went out.
    NoAnswer,
    /// It answered with a 5xx status.
    ServerError,
}

impl Failure {
    fn of(e: &reqwest::Error) -> Failure {
        if e.is_connect() {
            Failure::Unsent
        } else {
            Failure::NoAnswer
        }
    }

    /// Whether the request goes on to the next server.
    fn resend(self, resend: Resend) -> bool {
        self == Failure::Unsent || resend == Resend::Idempotent
    }
}

/// What a request path may carry of a name as it is: letters, digits and `-._~` (RFC 3986's
/// unreserved characters).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `name` as one path segment or query value, the rest percent-encoded: whatever a name
/// holds, it cannot add a segment, a query parameter or a fragment to the request it is in
/// (`victim#x` must not become `victim`). Every name in a path goes through it.
pub fn seg(name: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(name, SEGMENT)
}

impl Client {
    /// A client with reqwest's defaults (no timeouts: set them per request).
    pub fn new(servers: Servers, token: &str) -> Client {
        Client::with_http(reqwest::Client::new(), servers, token)
    }

    /// A client over a configured `reqwest::Client` (connect timeout, pool…).
    pub fn with_http(http: reqwest::Client, servers: Servers, token: &str) -> Client {
        Client {
            http,
            servers,
            token: token.to_string(),
        }
    }

    /// The server calls go to now, without a trailing `/`.
    pub fn base(&self) -> String {
        self.servers.current()
    }

    /// Every server this client may call.
    pub fn servers(&self) -> &Servers {
        &self.servers
    }

    /// `path` at the current server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// A request to `path` (e.g. `/v1/apps`) at the current server, carrying the token; add a
    /// body or a timeout, then pass it to [`Client::send`] or [`Client::checked`], which take
    /// it to another server if need be.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends and decodes the JSON answer.
    pub async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let req = self.build(req)?;
        let resend = Resend::by_method(req.method());
        self.decoded(req, resend).await
    }

    /// [`Client::send`], resent to other servers as `resend` says.
    pub async fn send_as<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        resend: Resend,
    ) -> Result<T, ClientError> {
        let req = self.build(req)?;
        self.decoded(req, resend).await
    }

    /// Sends, and fails on a non-2xx answer. Reads go to the next server after any failure,
    /// other requests only when they cannot have been received ([`Resend::by_method`]).
    pub async fn checked(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        let req = self.build(req)?;
        let resend = Resend::by_method(req.method());
        status_checked(self.attempt(req, resend).await?).await
    }

    /// [`Client::checked`], resent to other servers as `resend` says.
    pub async fn checked_as(
        &self,
        req: RequestBuilder,
        resend: Resend,
    ) -> Result<Response, ClientError> {
        let req = self.build(req)?;
        status_checked(self.attempt(req, resend).await?).await
    }

    /// Sends, and hands back the answer whatever its status, for a caller that reads a 4xx
    /// itself; resent to other servers as [`Client::checked`] does.
    pub async fn answer(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        let req = self.build(req)?;
        let resend = Resend::by_method(req.method());
        self.attempt(req, resend).await
    }

    /// [`Client::answer`], resent to other servers as `resend` says.
    pub async fn answer_as(
        &self,
        req: RequestBuilder,
        resend: Resend,
    ) -> Result<Response, ClientError> {
        let req = self.build(req)?;
        self.attempt(req, resend).await
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    fn build(&self, req: RequestBuilder) -> Result<Request, ClientError> {
        req.build().map_err(|source| ClientError::Send {
            base: self.base(),
            source,
        })
    }

    /// The JSON answer to `req`. An answer that breaks off before its end is a call that
    /// failed too: the server is left, and an idempotent request goes once more, to the next
    /// one.
    async fn decoded<T: DeserializeOwned>(
        &self,
        req: Request,
        resend: Resend,
    ) -> Result<T, ClientError> {
        let again = match resend {
            Resend::Idempotent => req.try_clone(),
            Resend::IfUnsent => None,
        };
        let resp = status_checked(self.attempt(req, resend).await?).await?;
        let from = self.servers.of(resp.url().as_str());
        let e = match resp.json().await {
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        // Garbage in a whole answer is no broken connection: the server is not to blame.
        let cut = !std::error::Error::source(&e).is_some_and(|s| s.is::<serde_json::Error>());
        let Some(from) = from.filter(|_| cut) else {
            return Err(ClientError::Decode(e));
        };
        self.left(from, &shoal_core::causes(&e));
        let to = self.servers.order(from).nth(1).filter(|&to| to != from);
        match to
            .zip(again)
            .and_then(|(to, again)| self.copy_for(&again, to))
        {
            Some(req) => {
                let resp = status_checked(self.attempt(req, resend).await?).await?;
                resp.json().await.map_err(ClientError::Decode)
            }
            None => Err(ClientError::Decode(e)),
        }
    }

    /// A copy of `req` (made for one of the servers) for server `to`; `None` if its body
    /// cannot be copied (a stream).
    fn copy_for(&self, req: &Request, to: usize) -> Option<Request> {
        let made_for = self.servers.of(req.url().as_str())?;
        let path = req
            .url()
            .as_str()
            .strip_prefix(self.servers.url(made_for).as_str())?;
        let mut copy = req.try_clone()?;
        *copy.url_mut() = reqwest::Url::parse(&format!("{}{path}", self.servers.url(to))).ok()?;
        Some(copy)
    }

    /// Server `server` failed a call, `why`: later calls start past it.
    fn left(&self, server: usize, why: &str) {
        if self.servers.failed(server) {
            tracing::warn!(
                server = self.servers.url(server),
                next = self.servers.current(),
                error = why,
                "a server of the control plane failed a call; calls go to the next one"
            );
        }
    }

    /// Sends `req` to the server it was made for, then, while a server fails it and `resend`
    /// allows, to the next ones, each once. A server that fails is left: later calls start
    /// at the one after it. One round per call: callers that try again pace themselves.
    async fn attempt(&self, req: Request, resend: Resend) -> Result<Response, ClientError> {
        let url = req.url().as_str().to_string();
        // A URL of none of the servers (a caller's own) is sent where it says, once.
        let Some(mut server) = self.servers.of(&url) else {
            return self
                .http
                .execute(req)
                .await
                .map_err(|source| ClientError::Send { base: url, source });
        };
        let mut rest = self.servers.order(server).skip(1);
        let mut req = req;
        let mut tried = Vec::new();
        // The last server's failing answer: it says more than a later server that could not
        // be reached at all.
        let mut answered = None;
        loop {
            // The request for the next server, made before this one consumes it: a body that
            // is a stream cannot be copied, and such a request is sent once.
            let next = rest.next().and_then(|n| Some((n, self.copy_for(&req, n)?)));
            tried.push(self.servers.url(server));
            let (failure, outcome) = match self.http.execute(req).await {
                Ok(resp) if !resp.status().is_server_error() => return Ok(resp),
                // What a server's upstream (a registry, a node) failed fails at every server.
                Ok(resp) if upstream_failed(resp.status()) => return Ok(resp),
                Ok(resp) => (Failure::ServerError, Ok(resp)),
                Err(e) => (Failure::of(&e), Err(e)),
            };
            let why = match &outcome {
                Ok(resp) => resp.status().to_string(),
                Err(e) => shoal_core::causes(e),
            };
            self.left(server, &why);
            match next {
                Some((n, copy)) if failure.resend(resend) => {
                    if let Ok(resp) = outcome {
                        answered = Some(resp);
                    }
                    (server, req) = (n, copy);
                }
                _ => {
                    return match (outcome, answered) {
                        (Ok(resp), _) | (Err(_), Some(resp)) => Ok(resp),
                        (Err(source), None) => Err(ClientError::Send {
                            base: tried.join(", "),
                            source,
                        }),
                    };
                }
            }
        }
    }
}

/// A 502 or 504: the server answered for something behind it (an OCI registry, a node's
/// gateway) that failed, which another server would find failing as well.
fn upstream_failed(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::BAD_GATEWAY || status == reqwest::StatusCode::GATEWAY_TIMEOUT
}

/// Fails on a non-2xx answer, reading the API's `{"error": …}` body.
async fn status_checked(resp: Response) -> Result<Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(match serde_json::from_str::<RawErrorBody>(&text) {
        Ok(b) => ClientError::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ClientError::Status {
            status,
            body: text.trim().to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stays_one_segment_whatever_it_holds() {
        assert_eq!(seg("hello-1.v_2~").to_string(), "hello-1.v_2~");
        assert_eq!(seg("victim#typo").to_string(), "victim%23typo");
        assert_eq!(
            seg("victim?namespace=other&x=").to_string(),
            "victim%3Fnamespace%3Dother%26x%3D"
        );
        assert_eq!(seg("a/../b").to_string(), "a%2F..%2Fb");
        assert_eq!(seg("é %").to_string(), "%C3%A9%20%25");
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the test server answers to a path (and whether the request carried the token):
    /// a status line and a body, or nothing, dropping the connection once the request is in.
    type Route = fn(&str, bool) -> Option<(&'static str, String)>;

    fn api(path: &str, authed: bool) -> Option<(&'static str, String)> {
        Some(match path {
            "/ok" => ("200 OK", format!(r#"{{"authed":{authed}}}"#)),
            "/missing" => (
                "404 Not Found",
                r#"{"error":{"code":"not_found","message":"app default/x does not exist"}}"#
                    .to_string(),
            ),
            "/proxy" => ("502 Bad Gateway", "upstream down\n".to_string()),
            _ => ("200 OK", "not json".to_string()),
        })
    }

    /// An HTTP/1.1 server answering by `route`; returns its URL and how many requests it got.
    async fn server_with(route: Route) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&buf).to_lowercase();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let authed = head.contains("authorization: bearer secret\r\n");
                    let Some((status, body)) = route(&path, authed) else {
                        return;
                    };
                    // "cut": the head and part of the body, then the connection closes.
                    let length = if status == "cut" { 100 } else { body.len() };
                    let status = if status == "cut" { "200 OK" } else { status };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n{body}"
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}/"), seen)
    }

    /// A URL where nothing listens: a port just freed.
    fn refusing() -> String {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        format!("http://{addr}")
    }

    fn servers(urls: &[&str]) -> Servers {
        Servers::parse(&urls.join(",")).unwrap()
    }

    #[tokio::test]
    async fn calls_carry_the_token_and_errors_are_typed() {
        let (url, _) = server_with(api).await;
        let client = Client::new(servers(&[&url]), "secret");
        assert!(!client.base().ends_with('/'));

        let ok: serde_json::Value = client.get("/ok").await.unwrap();
        assert_eq!(ok["authed"], true);

        let err = client
            .get::<serde_json::Value>("/missing")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
        assert_eq!(err.code(), Some("not_found"));
        assert_eq!(
            err.to_string(),
            "app default/x does not exist (404, not_found)"
        );

        let err = client.get::<serde_json::Value>("/proxy").await.unwrap_err();
        assert!(matches!(err, ClientError::Status { .. }), "{err:?}");
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            "the API answered 502 Bad Gateway: upstream down"
        );

        let err = client
            .get::<serde_json::Value>("/garbage")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
    }

    #[tokio::test]
    async fn no_answer_is_a_send_error_naming_the_server() {
        let dead = refusing();
        let client = Client::new(servers(&[&dead]), "secret");
        match client.get::<serde_json::Value>("/v1/apps").await {
            Err(e @ ClientError::Send { .. }) => {
                assert!(e.unsent(), "{e:?}");
                let ClientError::Send { base, source } = e else {
                    unreachable!()
                };
                assert_eq!(base, dead);
                assert!(source.is_connect(), "{source}");
            }
            other => panic!("expected a send error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_sends_any_request_on_and_later_calls_follow() {
        let (live, seen) = server_with(api).await;
        let dead = refusing();
        let client = Client::new(servers(&[&dead, &live]), "secret");
        // A write that no server can have received goes on too.
        let resp = client
            .checked(client.request(Method::POST, "/ok").body("{}"))
            .await
            .unwrap();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["authed"], true, "the token went along");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(client.base(), live.trim_end_matches('/'));
        // The next call starts at the live server: it reaches it with one request.
        let _: serde_json::Value = client.get("/ok").await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        // Every server down: the error names them all.
        let client = Client::new(servers(&[&dead, &refusing()]), "secret");
        let err = client.get::<serde_json::Value>("/ok").await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Send { base, .. } if base.contains(&dead) && base.contains(", ")),
            "{err}"
        );
    }

    /// A server that answers every request 503: its store is unreachable.
    fn unavailable(_: &str, _: bool) -> Option<(&'static str, String)> {
        Some((
            "503 Service Unavailable",
            r#"{"error":{"code":"unavailable","message":"the store is unreachable"}}"#.into(),
        ))
    }

    #[tokio::test]
    async fn only_idempotent_requests_go_on_after_a_5xx_or_no_answer() {
        fn hang_up(_: &str, _: bool) -> Option<(&'static str, String)> {
            None
        }
        for route in [unavailable as Route, hang_up] {
            let (failing, failing_seen) = server_with(route).await;
            let (live, live_seen) = server_with(api).await;
            let client = Client::new(servers(&[&failing, &live]), "secret");
            // A POST may have acted: it is not sent again, and the failing server is left.
            let err = client
                .checked(client.request(Method::POST, "/ok"))
                .await
                .unwrap_err();
            assert!(
                matches!(err.status(), None | Some(StatusCode::SERVICE_UNAVAILABLE)),
                "{err}"
            );
            assert_eq!(failing_seen.load(Ordering::SeqCst), 1);
            assert_eq!(live_seen.load(Ordering::SeqCst), 0);
            assert_eq!(client.base(), live.trim_end_matches('/'));
            // Back on the failing server, a read goes on to the next one…
            client.servers().failed(1);
            let _: serde_json::Value = client.get("/ok").await.unwrap();
            assert_eq!(failing_seen.load(Ordering::SeqCst), 2);
            assert_eq!(live_seen.load(Ordering::SeqCst), 1);
            // …and so does a write its caller says is idempotent.
            client.servers().failed(1);
            let _: serde_json::Value = client
                .send_as(client.request(Method::POST, "/ok"), Resend::Idempotent)
                .await
                .unwrap();
            assert_eq!(live_seen.load(Ordering::SeqCst), 2);
        }
    }

    /// A server's answer is what the caller hears, not a later server that could not be
    /// reached; and what a server's upstream failed (a 502: a registry, a node) is not asked
    /// of every other server.
    #[tokio::test]
    async fn a_servers_answer_beats_a_dead_server_and_an_upstreams_failure_is_not_resent() {
        let (failing, _) = server_with(unavailable).await;
        let client = Client::new(servers(&[&failing, &refusing()]), "secret");
        let err = client.get::<serde_json::Value>("/ok").await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");
        assert!(
            err.to_string().contains("the store is unreachable"),
            "{err}"
        );

        let (proxying, proxying_seen) = server_with(api).await;
        let (live, live_seen) = server_with(api).await;
        let client = Client::new(servers(&[&proxying, &live]), "secret");
        let err = client.get::<serde_json::Value>("/proxy").await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY), "{err}");
        assert_eq!(proxying_seen.load(Ordering::SeqCst), 1);
        assert_eq!(live_seen.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_answer_broken_off_sends_an_idempotent_request_on() {
        fn cut(_: &str, _: bool) -> Option<(&'static str, String)> {
            Some(("cut", r#"{"authed":"#.into()))
        }
        let (cutting, cutting_seen) = server_with(cut).await;
        let (live, live_seen) = server_with(api).await;
        let client = Client::new(servers(&[&cutting, &live]), "secret");
        let err = client
            .send::<serde_json::Value>(client.request(Method::POST, "/ok"))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
        assert_eq!(live_seen.load(Ordering::SeqCst), 0, "a POST may have acted");
        assert_eq!(
            client.base(),
            live.trim_end_matches('/'),
            "the server is left"
        );
        client.servers().failed(1);
        let answer: serde_json::Value = client.get("/ok").await.unwrap();
        assert_eq!(answer["authed"], true);
        assert_eq!(cutting_seen.load(Ordering::SeqCst), 2);
        assert_eq!(live_seen.load(Ordering::SeqCst), 1);
        assert_eq!(client.base(), live.trim_end_matches('/'));
        // Garbage in a whole answer is not a broken connection: not sent again.
        let err = client
            .get::<serde_json::Value>("/garbage")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
        assert_eq!(live_seen.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn which_failures_send_a_request_on() {
        for resend in [Resend::IfUnsent, Resend::Idempotent] {
            assert!(Failure::Unsent.resend(resend));
        }
        assert!(!Failure::NoAnswer.resend(Resend::IfUnsent));
        assert!(!Failure::ServerError.resend(Resend::IfUnsent));
        assert!(Failure::NoAnswer.resend(Resend::Idempotent));
        assert!(Failure::ServerError.resend(Resend::Idempotent));
        assert_eq!(Resend::by_method(&Method::GET), Resend::Idempotent);
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            assert_eq!(Resend::by_method(&method), Resend::IfUnsent, "{method}");
        }
    }
}

/// `shoal_core::problem::ErrorBody` read with `code` as a plain string, so a
/// client tolerates codes newer than itself.
#[derive(serde::Deserialize)]
struct RawErrorBody {
    error: RawErrorDetail,
}

#[derive(serde::Deserialize)]
struct RawErrorDetail {
    code: String,
    message: String,
}
