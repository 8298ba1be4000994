//! Service discovery: what a guest's outgoing `wasi:http` request reaches. Another app by
//! name, through the same endpoint picking as external traffic; a host its spec grants; or
//! nothing.

use crate::proxy;
use crate::server::{Gateway, Inner};
use http::uri::Scheme;
use http::{Request, Response};
use shoal_core::spec::{AppKey, OutboundGrant, OutboundHost};
use shoal_runtime::{DENIED, HttpError, OutboundPolicy, RequestOptions, WasiBody};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, Weak};
use tracing::{Instrument, field};

pub(crate) struct ServicePolicy {
    gateway: Weak<Inner>,
    /// The executor the policy was made on (the gateway's). Guests run on the runtime's own
    /// threads; their calls are made here so the pooled connections they open, and the
    /// dispatch to other apps, live with the gateway's I/O rather than among busy guests.
    io: Option<tokio::runtime::Handle>,
    /// The app whose guests call: bare names are of its namespace, and the called app's
    /// `[network] inbound` must admit it.
    caller: AppKey,
    /// Host and port; where a granted name resolves is checked when egress connects.
    grants: Vec<OutboundGrant>,
    /// The apps whose `[network] inbound` refused this caller, each logged once.
    refused: Mutex<HashSet<AppKey>>,
}

enum Destination {
    Service(AppKey),
    Egress,
    /// A bare name (`http://nope/`) that is no app: the guest meant a service.
    UnknownService,
    /// An app whose `[network] inbound` does not admit the caller.
    Refused(AppKey),
    Denied,
}

impl ServicePolicy {
    pub(crate) fn new(gateway: &Gateway, caller: &AppKey, allowed_hosts: Vec<String>) -> Self {
        ServicePolicy {
            gateway: gateway.downgrade(),
            io: tokio::runtime::Handle::try_current().ok(),
            caller: caller.clone(),
            grants: allowed_hosts
                .iter()
                .filter_map(|grant| {
                    // Specs are validated before they are stored; one stored before a rule
                    // was added may still hold a grant that is refused now.
                    OutboundGrant::parse(grant)
                        .inspect_err(|e| tracing::warn!(%grant, "outbound grant ignored: {e}"))
                        .ok()
                })
                .collect(),
            refused: Mutex::default(),
        }
    }

    /// `NAME` is an app in the caller's namespace, `NAME.NS` one in `NS` if there is such an
    /// app, on any port, over `http://`; otherwise a host is reachable only on a port it is
    /// granted. A host the caller is granted (on any port) is never a service, nor is an
    /// `https://` call: a tenant naming an app `example` in a namespace `com` takes no one's
    /// calls to example.com they were granted, and a certificate is checked wherever the
    /// guest asked for one.
    fn resolve(&self, gateway: &Gateway, host: &str, uri: &http::Uri) -> Destination {
        let mut labels = host.split('.');
        let app = match (labels.next(), labels.next(), labels.next()) {
            (Some(name), None, _) => Some(AppKey::new(&self.caller.namespace, name)),
            (Some(name), Some(namespace), None) => Some(AppKey::new(namespace, name)),
            _ => None,
        };
        let target = OutboundHost::of_uri(host);
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let default_port = if https { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let granted = |g: &OutboundGrant| g.allows(&target, port, default_port);
        if self.grants.iter().any(granted) {
            return Destination::Egress;
        }
        let named = self.grants.iter().any(|g| g.host == target);
        match app {
            Some(app) if !https && !named && gateway.knows(&app) => {
                if gateway.may_call(&self.caller, &app) {
                    Destination::Service(app)
                } else {
                    Destination::Refused(app)
                }
            }
            // A granted host on another port is denied, not taken for a missing service; an
            // IPv6 address is no service either, nor an app called over https.
            Some(_)
                if !https
                    && !named
                    && !host.contains('.')
                    && matches!(target, OutboundHost::Name(_)) =>
            {
                Destination::UnknownService
            }
            _ => Destination::Denied,
        }
    }
}

type SendFuture = Pin<Box<dyn Future<Output = Result<Response<WasiBody>, HttpError>> + Send>>;

impl OutboundPolicy for ServicePolicy {
    fn send(&self, request: Request<WasiBody>, options: Option<RequestOptions>) -> SendFuture {
        // Gone only while the node shuts down.
        let Some(gateway) = Gateway::upgrade(&self.gateway) else {
            return Box::pin(async { Err(HttpError::DestinationUnavailable) });
        };
        let host = request
            .uri()
            .host()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let destination = self.resolve(&gateway, &host, request.uri());
        if let Destination::Refused(app) = &destination {
            // Once per app called: a guest retrying in a loop does not flood the node's log.
            let first = self
                .refused
                .lock()
                .expect("refused lock")
                .insert(app.clone());
            if first {
                tracing::warn!(%app, caller = %self.caller, "service call refused: not admitted by the app's [network] inbound");
            }
        }
        // The wait for the response head; connecting is bounded by the gateway's own timeout.
        let head_timeout = options.and_then(|o| o.first_byte_timeout);
        let send = async move {
            let call = async {
                match destination {
                    Destination::Service(app) => {
                        let span = tracing::debug_span!(
                            "service_call",
                            app = field::Empty,
                            replica = field::Empty,
                        );
                        Ok(gateway.dispatch(&app, request).instrument(span).await)
                    }
                    Destination::Egress => proxy::egress(gateway.client(), request).await,
                    Destination::UnknownService => Err(HttpError::DestinationNotFound),
                    Destination::Denied | Destination::Refused(_) => {
                        Err(HttpError::HttpRequestDenied)
                    }
                }
            };
            match head_timeout {
                Some(limit) => tokio::time::timeout(limit, call)
                    .await
                    .unwrap_or(Err(HttpError::ConnectionReadTimeout)),
                None => call.await,
            }
        };
        match &self.io {
            Some(io) => {
                let mut task = AbortOnDrop(io.spawn(send));
                Box::pin(async move {
                    (&mut task.0).await.unwrap_or_else(|e| {
                        Err(HttpError::InternalError(Some(format!(
                            "the outbound call's task ended: {e}"
                        ))))
                    })
                })
            }
            None => Box::pin(send),
        }
    }

    fn why_denied(&self, uri: &http::Uri) -> String {
        let Some(gateway) = Gateway::upgrade(&self.gateway) else {
            return DENIED.into();
        };
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        match self.resolve(&gateway, &host, uri) {
            Destination::Refused(app) => format!(
                "app {}.{}'s [network] inbound does not admit {}.{}",
                app.name, app.namespace, self.caller.name, self.caller.namespace
            ),
            _ if uri.scheme() == Some(&Scheme::HTTPS)
                && matches!(OutboundHost::of_uri(&host), OutboundHost::Name(_))
                && host.matches('.').count() <= 1 =>
            {
                format!("{DENIED}; an app is called by name over http://, never https://")
            }
            _ => DENIED.into(),
        }
    }
}

/// Cancels the call when the guest stops waiting for it (it was dropped or timed out).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
