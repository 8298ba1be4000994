//! Outgoing `wasi:http` requests. wasmtime-wasi-http would send them anywhere by default; here
//! every request goes through an [`OutboundPolicy`] the embedder supplies, and the default
//! policy refuses them all.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::logs::LogSink;

/// Decides what a guest's outgoing HTTP request gets: a response (from wherever the policy
/// routes it) or an error code the guest sees, e.g. [`HttpError::HttpRequestDenied`].
///
/// The request arrives with an absolute URI (`http://backend/path`), a `host` header, and the
/// guest's body streaming; `options` carries the timeouts the guest asked for, if any.
pub trait OutboundPolicy: Send + Sync + 'static {
    fn send(
        &self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> BoxFuture<'static, Result<http::Response<WasiBody>, HttpError>>;

    /// Why a request to `uri` was denied, for the replica's logs: a user reading them should
    /// learn which setting to change.
    fn why_denied(&self, uri: &http::Uri) -> String {
        let _ = uri;
        DENIED.into()
    }
}

/// Why a request is denied when nothing more precise is known.
pub const DENIED: &str = "not granted by the app's [network] outbound, or to a private address, which a node allows only with --allow-private-egress";

/// The default policy: no network. Every outgoing request fails with `HTTP-request-denied`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

impl OutboundPolicy for DenyAll {
    fn send(
        &self,
        _request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
    ) -> BoxFuture<'static, Result<http::Response<WasiBody>, HttpError>> {
        Box::pin(async { Err(HttpError::HttpRequestDenied) })
    }
}

/// The store's `WasiHttpHooks`: forwards to the policy and notes denials in the replica's logs,
/// so a user wondering why their call failed can see it in `shoal logs`.
pub(crate) struct OutboundHooks {
    pub(crate) policy: Arc<dyn OutboundPolicy>,
    pub(crate) logs: LogSink,
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_done: IoFuture,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>
    {
        let target = format!("{} {}", request.method(), request.uri());
        let uri = request.uri().clone();
        let response = self.policy.send(request, options);
        let policy = self.policy.clone();
        let logs = self.logs.clone();
        Box::new(async move {
            match response.await {
                Ok(response) => {
                    // The policy owns the connection, if any: nothing left to drive here.
                    let io: IoFuture = Box::new(async { Ok(()) });
                    Ok((response, io))
                }
                Err(err) => {
                    if matches!(err, HttpError::HttpRequestDenied) {
                        let why = policy.why_denied(&uri);
                        logs.push_system(format!("outbound request denied: {target} ({why})"));
                    }
                    tracing::debug!(%target, error = %err, "outbound request failed");
                    Err(err)
                }
            }
        })
    }
}
