//! `/v1/namespaces/{namespace}/apps/{name}/proxy/…`: a request sent to one of an app's ready
//! replicas through the API, as Kubernetes' service proxy does, for apps with no route (or
//! a route not reachable from where the caller is). `shoal port-forward` serves it on a
//! local port.
//!
//! The control plane sends the request to the replica's node as a hop pinned to that
//! replica (the `x-shoal-replica` and `x-shoal-app` headers), over mutual TLS with its own
//! certificate, the way it reads replicas' logs: the node's gateway serves it locally, past
//! the app's `[network] inbound`, since the caller was let in by its token's role instead.
//! An app scaled to zero that wakes on a request has no replica to pin: the request names
//! only the app and goes to a ready node, whose gateway holds it while the app wakes, as it
//! holds the app's own traffic.

use crate::error::ControlError;
use crate::state::{ControlPlane, blocking};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use futures::TryStreamExt;
use shoal_core::auth;
use shoal_core::objects::keys;
use shoal_core::spec::AppKey;
use shoal_core::{Node, Phase, Replica};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The replica a proxied request goes to: its id, node and that node's gateway. No replica:
/// any of the app's, the node's gateway picks (holding the request while the app wakes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub replica: Option<String>,
    pub node: String,
    pub gateway: String,
}

/// The ready replica of `replicas` the `turn`-th request goes to (round robin over those
/// whose node is known), if any is ready.
pub(crate) fn pick(
    replicas: &[Replica],
    gateways: &HashMap<String, String>,
    turn: usize,
) -> Option<Target> {
    let ready: Vec<Target> = replicas
        .iter()
        .filter(|r| r.phase == Phase::Ready)
        .filter_map(|r| {
            let node = r.node.as_ref()?;
            Some(Target {
                replica: Some(r.id.clone()),
                node: node.clone(),
                gateway: gateways.get(node)?.clone(),
            })
        })
        .collect();
    let n = ready.len();
    ready.into_iter().nth(turn.checked_rem(n)?)
}

/// The ready node of `nodes` the `turn`-th request for an app at zero goes to, its gateway to
/// hold it while the app wakes.
fn waking_at(nodes: &[Node], turn: usize) -> Option<Target> {
    let ready: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.state == shoal_core::NodeState::Ready)
        .collect();
    let node = ready.get(turn.checked_rem(ready.len())?)?;
    Some(Target {
        replica: None,
        node: node.name.clone(),
        gateway: node.gateway.clone(),
    })
}

/// Headers that stay with the API: the caller's credential for it, and those describing
/// one connection (RFC 9110 §7.6.1).
const NOT_FORWARDED: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::HOST,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::UPGRADE,
];

/// Removes from `headers` what must not cross the proxy either way: the connection's own
/// headers, the API's credential, and Shoal's internal `x-shoal-*` ones (a caller may not
/// pin a hop of its own; a node's refusal header is not the client's business).
fn scrub(headers: &mut HeaderMap) {
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-shoal-"))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// The URL of `path_and_query` at `gateway`, with its dot segments resolved as the request
/// will go; refused if it is the node's own (`/_shoal/…`, replicas' output), which no app is
/// served under and the proxy's member certificate must not open.
fn node_url(gateway: &str, path_and_query: &str) -> Result<reqwest::Url, ControlError> {
    let url = reqwest::Url::parse(&format!("https://{gateway}{path_and_query}")).map_err(|e| {
        ControlError::invalid(
            shoal_core::problem::ErrorCode::BadRequest,
            format!("{path_and_query:?} is no path and query: {e}"),
        )
    })?;
    if url.path().starts_with("/_shoal/") {
        return Err(ControlError::invalid(
            shoal_core::problem::ErrorCode::Forbidden,
            "paths under /_shoal/ are the nodes' own: no app is served there",
        ));
    }
    Ok(url)
}

/// Round robin over the ready replicas, shared by every proxied request.
static TURN: AtomicUsize = AtomicUsize::new(0);

impl ControlPlane {
    /// Where a request for `app` goes now; `NoReadyReplicas` when nowhere, saying why.
    fn proxy_target(&self, app: &AppKey) -> Result<Target, ControlError> {
        let Some((found, _)) = self.get::<shoal_core::App>(&keys::app(app))? else {
            return Err(ControlError::not_found(format!("app {app} does not exist")));
        };
        if found.spec.component.kind != shoal_core::spec::Kind::Http {
            return Err(ControlError::invalid(
                shoal_core::problem::ErrorCode::BadRequest,
                format!(
                    "app {app} is a {}: only http apps serve requests",
                    found.spec.component.kind
                ),
            ));
        }
        let nodes = self.list::<Node>(&keys::NODES)?;
        let gateways: HashMap<String, String> = nodes
            .iter()
            .map(|n| (n.name.clone(), n.gateway.clone()))
            .collect();
        let replicas = self.list::<Replica>(&keys::replicas_of(app))?;
        let turn = TURN.fetch_add(1, Ordering::Relaxed);
        let target = pick(&replicas, &gateways, turn).or_else(|| {
            found
                .spec
                .scale
                .may_idle_to_zero()
                .then(|| waking_at(&nodes, turn))
                .flatten()
        });
        target.ok_or_else(|| {
            ControlError::invalid(
                shoal_core::problem::ErrorCode::NoReadyReplicas,
                format!(
                    "app {app} has no ready replica ({} of {} wanted exist)",
                    replicas.len(),
                    found.spec.replicas
                ),
            )
        })
    }

    /// Sends `req` (its path and query already those the app is to see) to a ready replica
    /// of `app`, and streams back what it answers. A node that cannot be reached is a 502.
    pub(crate) async fn proxy(
        &self,
        app: AppKey,
        path_and_query: &str,
        req: Request<Body>,
    ) -> Result<Response<Body>, ControlError> {
        self.members()?;
        let (cp, key) = (self.clone(), app.clone());
        let target = blocking(move || cp.proxy_target(&key)).await?;
        let (mut parts, body) = req.into_parts();
        scrub(&mut parts.headers);
        // The app is called as another app calls it by name.
        let host = format!("{}.{}", app.name, app.namespace);
        let headers = &mut parts.headers;
        let value = |s: &str| HeaderValue::from_str(s).map_err(ControlError::internal);
        if let Some(replica) = &target.replica {
            headers.insert(auth::REPLICA_HEADER, value(replica)?);
        }
        headers.insert(auth::APP_HEADER, value(&app.to_string())?);
        headers.insert(auth::HOP_HEADER, HeaderValue::from_static("1"));
        headers.insert(header::HOST, value(&host)?);
        let url = node_url(&target.gateway, path_and_query)?;
        let answer = self
            .member_client(&target.node)?
            .request(parts.method, url)
            .headers(parts.headers)
            .body(reqwest::Body::wrap_stream(body.into_data_stream()))
            .send()
            .await
            .map_err(|e| {
                ControlError::invalid(
                    shoal_core::problem::ErrorCode::BadGateway,
                    match &target.replica {
                        Some(replica) => format!(
                            "replica {replica} of app {app} on node {} could not be reached: {e}",
                            target.node
                        ),
                        None => format!(
                            "node {}, to wake app {app} and send it the request, could not be reached: {e}",
                            target.node
                        ),
                    },
                )
            })?;
        let mut response = Response::builder().status(answer.status());
        if let Some(headers) = response.headers_mut() {
            *headers = answer.headers().clone();
            scrub(headers);
            headers.remove(header::TRANSFER_ENCODING);
        }
        let body = Body::from_stream(answer.bytes_stream().map_err(std::io::Error::other));
        response.body(body).map_err(ControlError::internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, node: Option<&str>, phase: Phase) -> Replica {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!("name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n");
        let spec = shoal_core::spec::parse_app(&src)
            .unwrap()
            .resolve(digest)
            .unwrap();
        let mut r = crate::state::tests::replica_of(&spec, id, 1, "n", phase);
        r.node = node.map(str::to_string);
        r
    }

    /// Only ready replicas on known nodes are sent requests, each in turn.
    #[test]
    fn requests_go_to_ready_replicas_in_turn() {
        let gateways: HashMap<String, String> = [("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]
            .into_iter()
            .map(|(n, g)| (n.to_string(), g.to_string()))
            .collect();
        let replicas = [
            replica("r1", Some("a"), Phase::Ready),
            replica("r2", Some("b"), Phase::Unready),
            replica("r3", None, Phase::Pending),
            replica("r4", Some("gone"), Phase::Ready),
            replica("r5", Some("b"), Phase::Ready),
        ];
        let picked: Vec<String> = (0..4)
            .map(|turn| pick(&replicas, &gateways, turn).unwrap().replica.unwrap())
            .collect();
        assert_eq!(picked, ["r1", "r5", "r1", "r5"]);
        assert_eq!(
            pick(&replicas, &gateways, 1),
            Some(Target {
                replica: Some("r5".into()),
                node: "b".into(),
                gateway: "127.0.0.1:2".into(),
            })
        );
        assert_eq!(pick(&replicas[1..4], &gateways, 0), None);
    }

    /// A path resolving under `/_shoal/` (where nodes serve replicas' output to the control
    /// plane) is refused however it is spelled; others go as resolved.
    #[test]
    fn the_nodes_own_paths_are_refused_however_spelled() {
        for path in [
            "/_shoal/logs/r1",
            "/a/../_shoal/logs/r1",
            "/%2e%2e/_shoal/logs/r1?x=1",
            "/./_shoal/",
        ] {
            assert!(node_url("127.0.0.1:1", path).is_err(), "{path}");
        }
        let url = node_url("127.0.0.1:1", "/a/../b?c=d").unwrap();
        assert_eq!(url.as_str(), "https://127.0.0.1:1/b?c=d");
        assert!(node_url("127.0.0.1:1", "/_shoalish").is_ok());
    }

    /// The API's credential, the connection's headers and Shoal's internal ones never cross.
    #[test]
    fn the_token_and_internal_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        headers.insert("x-shoal-replica", "other".parse().unwrap());
        headers.insert(header::CONNECTION, "close".parse().unwrap());
        headers.insert("x-request", "kept".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        scrub(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request"]);
    }
}
