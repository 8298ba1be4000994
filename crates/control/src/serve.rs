//! Serving the API to clients that may be slow or many: axum's own `serve` has no limits, so
//! the API gets the gateway's: a request head must arrive within a timeout (which also closes
//! idle keep-alive connections), an HTTP/2 peer must answer pings, a client must take what
//! is written to it (within the send timeout), connections beyond a cap
//! wait to be accepted, and one client may hold only so many. Over TLS by
//! default (see `shoal-tls`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::audit::Peer;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use shoal_core::clients::{Clients, Slot};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits on the API's clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// How long a client may take to send a request head; also how long an idle keep-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client (an IP address) holds at once; more are closed
    /// as they arrive, so one client cannot take every slot from the nodes' heartbeats and
    /// everyone else's commands. 0: no cap.
    pub max_client_connections: usize,
    /// How often an HTTP/2 connection is pinged, and how long an answer may take: one whose
    /// peer answers nothing (gone, or holding a slot with a preface and then silence) is
    /// closed, as the gateway closes them.
    pub h2_ping: Duration,
    /// How long a client may leave its connection unable to take what the API writes (it
    /// reads slowly or not at all) before the connection is closed, as the gateway does.
    pub send_timeout: Duration,
}

impl ServeLimits {
    /// What [`serve`] counts each client's connections on, against this cap: by address,
    /// IPv6 too, since the API's clients are nodes and operators, who may share a /64.
    pub fn clients(&self) -> Arc<Clients> {
        Clients::new(self.max_client_connections, 128)
    }
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 1_000,
            max_client_connections: 100,
            h2_ping: Duration::from_secs(20),
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `router` on `listener` until the task is dropped, over TLS with `tls` (the client
/// must finish its handshake within the header-read timeout too), or in plain text without.
/// Each client's connections are counted on `clients` ([`ServeLimits::clients`]), whose
/// numbers the caller may report.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    clients: Arc<Clients>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = connections
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A streamed answer (a proxied app's, a follower's logs) is written a piece at a
        // time: without this, Nagle holds each small piece until the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutWriter::new(stream);
        stream.set_timeout(Some(limits.send_timeout));
        let stream = Box::pin(stream);
        let client = match clients.admit(peer.ip()) {
            Ok(client) => client,
            Err(refused) => {
                if refused.first {
                    tracing::warn!(client = %peer.ip(), "closing this client's new API connections: it holds its most (--api-client-connections)");
                }
                continue;
            }
        };
        // Each request of the connection carries its slot: one a node's credential
        // authenticates lets it go of the per-client count (`api::require_node`).
        let client = ClientSlot(Arc::new(std::sync::Mutex::new(client)));
        let tagged = client.clone();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starts = started.clone();
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                starts.store(true, std::sync::atomic::Ordering::Relaxed);
                req.extensions_mut().insert(tagged.clone());
                req.extensions_mut().insert(Peer(peer.ip()));
                req
            },
        ));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slots = (slot, client);
            let result = match acceptor {
                None => serve_connection(stream, service, limits, started).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(tls)) => serve_connection(tls, service, limits, started).await,
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}

/// The per-client slot of the connection a request came on.
#[derive(Clone)]
pub(crate) struct ClientSlot(Arc<std::sync::Mutex<Slot>>);

impl ClientSlot {
    /// Off its client's count from now on: a node of the cluster, whose long-lived
    /// connections would otherwise fill the share of an address it shares with other nodes
    /// (a host running several, a NAT) and keep its own heartbeats out.
    pub(crate) fn exempt(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .exempt();
    }
}

/// Serves one connection; `started` turns true at its first request.
async fn serve_connection<I, S>(
    io: I,
    service: TowerToHyperService<S>,
    limits: ServeLimits,
    started: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut server = auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    server
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.h2_ping))
        .keep_alive_timeout(limits.h2_ping);
    let conn = server.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // hyper reads HTTP/2's preface with no deadline: a connection that has started no request
    // within the head timeout (a stalled preface) is let go, as a stalled HTTP/1.1 head is.
    tokio::select! {
        ended = conn.as_mut() => return ended,
        () = tokio::time::sleep(limits.header_read_timeout) => {}
    }
    if !started.load(std::sync::atomic::Ordering::Relaxed) {
        conn.as_mut().graceful_shutdown();
    }
    conn.await
}
