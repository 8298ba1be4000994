//! The `/v1` HTTP API. Handlers parse, call [`ControlPlane`], and map errors;
//! they hold no logic of their own.

use crate::access::{self, Caller, Rule, Scope};
use crate::api_error::{ApiError, JsonBody, Path, Query, Strict, StrictJson, WholeBody, strict};
use crate::audit::Audited;
use crate::configs::ConfigChange;
use crate::error::ControlError;
use crate::openapi::{Access, Endpoint, op};
use crate::state::ControlPlane;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use shoal_api::{
    AppCpu, AppSummary, AppTop, ApplyOutcome, ApplyResult, BucketView, CertificateRequest,
    ConfigSetRequest, ConfigSetView, ConfigSetWritten, CreatedToken, Deleted, Delta, Describe,
    IngressCertificate, IssuedCertificate, JobRun, JobSummary, JoinRequest, JoinResponse,
    KeyRotated, ModuleUploaded, NodeAction, NodeDeleted, NodeDescribe, NodeLabels, NodeSummary,
    NodeTop, NodeUsage, PoolWrite, QuotaPatch, QuotaView, Registered, ReplicaIncident,
    ReplicaReport, ReplicaSecrets, RolloutAction, RolloutView, RotatedJoinToken, SecretView,
    SecretWrite, SecretWritten, ServerSummary, ServerVersion, Service, Snapshot, TokenRequest,
    TokenView, VolumeUsage, VolumeView, Waiting,
};
use shoal_core::auth::Role;
use shoal_core::kv::{KvAnswer, KvOp, KvOutcome, MAX_BATCH};
use shoal_core::metrics::RevisionStats;
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::quota::QuotaLimits;
use shoal_core::spec::{AppKey, AppSpec, DEFAULT_NAMESPACE};
use shoal_core::{App, ConfigSet, Event, Module, Node, Pool, Replica, RolloutStatus};
use shoal_store::BlobError;
use std::sync::Arc;

/// Runs control-plane work off the executor; its errors answer as the API's.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ControlError> + Send + 'static,
    T: Send + 'static,
{
    crate::state::blocking(f).await.map_err(ApiError::from)
}

/// One route: the endpoint the document describes and the handler the router serves, from
/// one method token, so the two cannot disagree on it.
macro_rules! route {
    ($method:ident $path:literal => $handler:ident, $access:expr, $op:expr) => {
        (
            Endpoint {
                method: Method::$method,
                path: $path,
                id: stringify!($handler),
                access: $access,
                op: || $op,
            },
            on(MethodFilter::$method, $handler),
        )
    };
}

/// The admin API's routes, each with its access rule and what the document says of it: the
/// router, [`RULES`] and the OpenAPI document come from this one list, so no route is served
/// without a rule or left out of the document.
macro_rules! admin_api {
    ($( $method:ident $path:literal => $handler:ident, $role:ident, $scope:ident, $op:expr; )*) => {
        /// Every admin-API route's rule (see [`access::authorize`]).
        pub(crate) const RULES: &[Rule] = &[
            $( Rule { method: stringify!($method), path: $path, role: Role::$role, scope: Scope::$scope }, )*
        ];

        fn admin_routes() -> Vec<(Endpoint, MethodRouter<ControlPlane>)> {
            vec![
                $( route!($method $path => $handler, Access::Token(Role::$role, Scope::$scope), $op), )*
            ]
        }
    };
}

admin_api! {
    GET "/v1/modules" => list_modules, Viewer, Shared,
        op("List the uploaded modules").json_list::<Module>(StatusCode::OK);
    POST "/v1/modules" => upload_module, Deployer, Shared,
        op("Upload a module: a component or a core module, checked before it is kept")
            .body_raw("application/wasm")
            .json::<ModuleUploaded>(StatusCode::CREATED)
            .json::<ModuleUploaded>(StatusCode::OK);
    GET "/v1/modules/{digest}" => get_module, Viewer, Shared,
        op("Show a module").json::<Module>(StatusCode::OK);
    DELETE "/v1/modules/{digest}" => delete_module, Admin, Cluster,
        op("Delete a module no app uses").empty(StatusCode::NO_CONTENT);
    GET "/v1/apps" => list_apps, Viewer, NamespaceOrAll,
        op("List apps").query::<NsQuery>().json_list::<AppSummary>(StatusCode::OK);
    POST "/v1/apps" => apply, Deployer, Body,
        op("Create or update an app from its spec")
            .query::<ApplyQuery>()
            .body::<AppSpec>()
            .json::<ApplyResult>(StatusCode::CREATED)
            .json::<ApplyResult>(StatusCode::OK);
    GET "/v1/apps/{name}" => describe_app, Viewer, Namespace,
        op("Describe an app: its revisions, replicas and events")
            .query::<NsQuery>()
            .json::<Describe>(StatusCode::OK);
    DELETE "/v1/apps/{name}" => delete_app, Deployer, Namespace,
        op("Delete an app and its replicas").query::<NsQuery>().json::<Deleted>(StatusCode::OK);
    GET "/v1/apps/{name}/logs" => logs, Viewer, Namespace,
        op("Every replica's output merged in time order: lines `<replica> [<time>] <stream> <line>`, or NDJSON log entries with `format=json`; with `follow`, streamed across rollouts and node restarts")
            .query::<LogQuery>()
            .raw(StatusCode::OK, "text/plain");
    POST "/v1/apps/{name}/rollback" => rollback, Deployer, Namespace,
        op("Roll an app back to an earlier revision")
            .query::<RollbackQuery>()
            .json::<ApplyResult>(StatusCode::OK);
    POST "/v1/apps/{name}/restart" => restart, Deployer, Namespace,
        op("Restart an app: what runs now again as a new revision, which replaces every replica as a rollout does")
            .query::<NsQuery>()
            .json::<ApplyResult>(StatusCode::OK);
    POST "/v1/apps/{name}/run" => run_job, Deployer, Namespace,
        op("Ask for a run of a job now").query::<NsQuery>().json::<JobRun>(StatusCode::OK);
    POST "/v1/apps/{name}/scale" => scale, Deployer, Namespace,
        op("Set an app's replicas").query::<ScaleQuery>().json::<App>(StatusCode::OK);
    GET "/v1/apps/{name}/rollout" => rollout_status, Viewer, Namespace,
        op("Where an app's rollout stands")
            .query::<NsQuery>()
            .json::<RolloutView>(StatusCode::OK);
    POST "/v1/apps/{name}/rollout/{action}" => rollout_action, Deployer, Namespace,
        op("Pause, resume, promote or abort an app's rollout")
            .param::<RolloutAction>("action")
            .query::<RolloutActionQuery>()
            .json::<RolloutStatus>(StatusCode::OK);
    GET "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_get_root, Deployer, InPath,
        proxy_op();
    GET "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_get, Deployer, InPath,
        proxy_op();
    POST "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_post_root, Deployer, InPath,
        proxy_op();
    POST "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_post, Deployer, InPath,
        proxy_op();
    PUT "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_put_root, Deployer, InPath,
        proxy_op();
    PUT "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_put, Deployer, InPath,
        proxy_op();
    PATCH "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_patch_root, Deployer, InPath,
        proxy_op();
    PATCH "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_patch, Deployer, InPath,
        proxy_op();
    DELETE "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_delete_root, Deployer, InPath,
        proxy_op();
    DELETE "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_delete, Deployer, InPath,
        proxy_op();
    HEAD "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_head_root, Deployer, InPath,
        proxy_op();
    HEAD "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_head, Deployer, InPath,
        proxy_op();
    OPTIONS "/v1/namespaces/{namespace}/apps/{name}/proxy/" => proxy_options_root, Deployer, InPath,
        proxy_op();
    OPTIONS "/v1/namespaces/{namespace}/apps/{name}/proxy/{*path}" => proxy_options, Deployer, InPath,
        proxy_op();
    GET "/v1/configs" => list_configs, Viewer, NamespaceOrAll,
        op("List config sets").query::<NsQuery>().json_list::<ConfigSetView>(StatusCode::OK);
    GET "/v1/configs/{name}" => get_config, Viewer, Namespace,
        op("Show a config set with its values")
            .query::<NsQuery>()
            .json::<ConfigSet>(StatusCode::OK);
    PUT "/v1/configs/{name}" => put_config, Deployer, Namespace,
        op("Write a config set, whole or merged into what it has; the apps naming it are applied again")
            .query::<NsQuery>()
            .body::<ConfigSetRequest>()
            .json::<ConfigSetWritten>(StatusCode::OK);
    DELETE "/v1/configs/{name}" => delete_config, Deployer, Namespace,
        op("Delete a config set no app names").query::<NsQuery>().json::<Deleted>(StatusCode::OK);
    GET "/v1/secrets" => list_secrets, Viewer, NamespaceOrAll,
        op("List secrets, without their values")
            .query::<NsQuery>()
            .json_list::<SecretView>(StatusCode::OK);
    GET "/v1/secrets/{name}" => get_secret, Viewer, Namespace,
        op("Show a secret, without its values")
            .query::<NsQuery>()
            .json::<SecretView>(StatusCode::OK);
    PUT "/v1/secrets/{name}" => put_secret, Deployer, Namespace,
        op("Create a secret or write a new version of it; the apps naming it are applied again")
            .query::<NsQuery>()
            .body::<SecretWrite>()
            .json::<SecretWritten>(StatusCode::OK);
    DELETE "/v1/secrets/{name}" => delete_secret, Deployer, Namespace,
        op("Delete a secret no app names").query::<NsQuery>().json::<Deleted>(StatusCode::OK);
    POST "/v1/secret-key/rotate" => rotate_secret_key, Admin, Cluster,
        op("Seal every secret value again under a new key").json::<KeyRotated>(StatusCode::OK);
    GET "/v1/kv" => list_buckets, Viewer, NamespaceOrAll,
        op("List key-value buckets").query::<NsQuery>().json_list::<BucketView>(StatusCode::OK);
    GET "/v1/kv/{bucket}" => list_kv_keys, Viewer, Namespace,
        op("A page of a bucket's keys (a `keys` answer)")
            .query::<KeysQuery>()
            .json::<KvAnswer>(StatusCode::OK);
    GET "/v1/kv/{bucket}/{*key}" => get_kv, Viewer, Namespace,
        op("A key's value").query::<NsQuery>().raw(StatusCode::OK, "application/octet-stream");
    PUT "/v1/kv/{bucket}/{*key}" => put_kv, Deployer, Namespace,
        op("Set a key's value")
            .query::<NsQuery>()
            .body_raw("application/octet-stream")
            .empty(StatusCode::NO_CONTENT);
    DELETE "/v1/kv/{bucket}/{*key}" => delete_kv, Deployer, Namespace,
        op("Delete a key").query::<NsQuery>().empty(StatusCode::NO_CONTENT);
    GET "/v1/volumes" => list_volumes, Viewer, NamespaceOrAll,
        op("List volumes").query::<NsQuery>().json_list::<VolumeView>(StatusCode::OK);
    DELETE "/v1/volumes/{name}" => delete_volume, Deployer, Namespace,
        op("Delete a volume no app mounts").query::<NsQuery>().json::<Deleted>(StatusCode::OK);
    GET "/v1/jobs" => list_jobs, Viewer, NamespaceOrAll,
        op("List jobs and their runs").query::<NsQuery>().json_list::<JobSummary>(StatusCode::OK);
    GET "/v1/replicas" => list_replicas, Viewer, NamespaceOrAll,
        op("List replicas").query::<ReplicaQuery>().json_list::<Replica>(StatusCode::OK);
    GET "/v1/services" => list_services, Viewer, NamespaceOrAll,
        op("List services: http apps and their ready endpoints")
            .query::<NsQuery>()
            .json_list::<Service>(StatusCode::OK);
    GET "/v1/events" => list_events, Viewer, NamespaceOrAll,
        op("List events, oldest first").query::<EventQuery>().json_list::<Event>(StatusCode::OK);
    GET "/v1/servers" => list_servers, Viewer, Cluster,
        op("List the servers of the control plane and which one leads (runs the controller)")
            .json_list::<ServerSummary>(StatusCode::OK);
    GET "/v1/nodes" => list_nodes, Viewer, Cluster,
        op("List nodes and what is placed on them").json_list::<NodeSummary>(StatusCode::OK);
    GET "/v1/nodes/{name}" => describe_node, Viewer, Cluster,
        op("Describe a node: what is placed on it, what it uses now, its events")
            .json::<NodeDescribe>(StatusCode::OK);
    GET "/v1/top/nodes" => top_nodes, Viewer, Cluster,
        op("What each node's guests use now and what its gateway routed over the last minute")
            .json_list::<NodeTop>(StatusCode::OK);
    GET "/v1/top/apps" => top_apps, Viewer, NamespaceOrAll,
        op("Per app over the last minute: ready replicas, requests/s, 5xx/s, p99, CPU")
            .query::<NsQuery>()
            .json_list::<AppTop>(StatusCode::OK);
    GET "/v1/backup" => backup, Admin, Cluster,
        op("A backup of the cluster's state and modules at one revision, a tar file for `shoal server restore`; the headers `shoal-backup-revision`, `-keys` and `-modules` say what it holds")
            .raw(StatusCode::OK, "application/x-tar");
    GET "/v1/metrics" => prometheus_metrics, Viewer, Cluster,
        op("The cluster's metrics in Prometheus' text format")
            .raw(StatusCode::OK, "text/plain; version=0.0.4");
    DELETE "/v1/nodes/{name}" => delete_node, Admin, Cluster,
        op("Delete a node and revoke its credential; says which volumes were bound to it")
            .json::<NodeDeleted>(StatusCode::OK);
    PUT "/v1/nodes/{name}/labels" => label_node, Admin, Cluster,
        op("Set and remove a node's labels; they outlive its registrations")
            .body::<NodeLabels>()
            .json::<Node>(StatusCode::OK);
    POST "/v1/nodes/{name}/{action}" => node_action, Admin, Cluster,
        op("Cordon, uncordon or drain a node")
            .param::<NodeAction>("action")
            .json::<Node>(StatusCode::OK);
    GET "/v1/pools" => list_pools, Viewer, Cluster,
        op("List node pools and the nodes they started").json_list::<Pool>(StatusCode::OK);
    GET "/v1/pools/{name}" => get_pool, Viewer, Cluster,
        op("Show a node pool").json::<Pool>(StatusCode::OK);
    PUT "/v1/pools/{name}" => put_pool, Admin, Cluster,
        op("Create a node pool, or change its size, provider or cool-down")
            .body::<PoolWrite>()
            .json::<Pool>(StatusCode::OK);
    DELETE "/v1/pools/{name}" => delete_pool, Admin, Cluster,
        op("Delete a node pool that runs no node").empty(StatusCode::NO_CONTENT);
    GET "/v1/quotas" => list_quotas, Viewer, NamespaceOrAll,
        op("List namespaces' quotas, with what their apps ask for as the quotas count it")
            .query::<NsQuery>()
            .json_list::<QuotaView>(StatusCode::OK);
    PUT "/v1/quotas/{namespace}" => put_quota, Admin, Cluster,
        op("Set a namespace's quota: the caps on its apps, replicas and CPU and memory requests; what runs past a lowered one keeps running")
            .body::<QuotaLimits>()
            .json::<QuotaView>(StatusCode::OK);
    PATCH "/v1/quotas/{namespace}" => patch_quota, Admin, Cluster,
        op("Change some caps of a namespace's quota, merged into it as stored: a cap left out is kept, null takes it away")
            .body::<QuotaPatch>()
            .json::<QuotaView>(StatusCode::OK);
    DELETE "/v1/quotas/{namespace}" => delete_quota, Admin, Cluster,
        op("Delete a namespace's quota").empty(StatusCode::NO_CONTENT);
    POST "/v1/join-token/rotate" => rotate_join_token, Admin, Cluster,
        op("Replace the join token; nodes that joined carry on")
            .query::<RotateQuery>()
            .json::<RotatedJoinToken>(StatusCode::OK);
    GET "/v1/tokens" => list_tokens, Admin, Cluster,
        op("List API tokens, without their secrets").json_list::<TokenView>(StatusCode::OK);
    POST "/v1/tokens" => create_token, Admin, Cluster,
        op("Create an API token: the only answer that holds it")
            .body::<TokenRequest>()
            .json::<CreatedToken>(StatusCode::CREATED);
    DELETE "/v1/tokens/{name}" => revoke_token, Admin, Cluster,
        op("Revoke an API token").empty(StatusCode::NO_CONTENT);
}

/// The routes outside the admin table, each with the credential it takes: what a client needs
/// before it has a token, what the join token opens, and what worker nodes call, each with its
/// own credential, for itself only.
fn other_routes() -> Vec<(Endpoint, MethodRouter<ControlPlane>)> {
    vec![
        route!(GET "/v1/healthz" => healthz, Access::Public,
            op("Whether the control plane answers").raw(StatusCode::OK, "text/plain")),
        route!(GET "/v1/version" => version, Access::Public,
            op("The server's release, as kubectl's /version tells it to anyone")
                .json::<ServerVersion>(StatusCode::OK)),
        route!(GET "/v1/cluster/ca" => cluster_ca, Access::Public,
            op("The cluster CA's certificate, which a join token's hash pins")
                .raw(StatusCode::OK, "application/x-pem-file")),
        route!(GET "/v1/openapi.json" => openapi, Access::Public,
            op("This document").raw(StatusCode::OK, "application/json")),
        route!(POST "/v1/cluster/join" => join_cluster, Access::JoinToken,
            op("Trade the join token for the node's own credential")
                .body::<JoinRequest>()
                .json::<JoinResponse>(StatusCode::CREATED)),
        route!(POST "/v1/cluster/nodes" => register_node, Access::Node,
            op("Register the node: its gateway, capacity and labels")
                .body::<Node>()
                .json::<Registered>(StatusCode::OK)),
        route!(POST "/v1/cluster/nodes/{name}/heartbeat" => heartbeat, Access::Node,
            op("Say the node is alive, with what its guests use now (no body: only alive); `?probe=true` only checks the credential")
                .query::<HeartbeatQuery>()
                .body::<NodeUsage>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/leave" => leave, Access::Node,
            op("The node shuts down: its replicas move to other nodes, new before old")
                .json::<Node>(StatusCode::OK)),
        route!(POST "/v1/cluster/nodes/{name}/reports" => report, Access::Node,
            op("Report a replica's phase")
                .body::<ReplicaReport>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/metrics" => node_metrics, Access::Node,
            op("Report what the node's gateway measured per app revision")
                .body_list::<RevisionStats>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/waiting" => node_waiting, Access::Node,
            op("Report requests held for apps with no ready replica")
                .body_list::<Waiting>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/cpu" => node_cpu, Access::Node,
            op("Report the CPU the node's guests used per app")
                .body_list::<AppCpu>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/incidents" => incident, Access::Node,
            op("Report what befell a replica: a timeout, out of memory, a trap")
                .body::<ReplicaIncident>()
                .empty(StatusCode::NO_CONTENT)),
        route!(POST "/v1/cluster/nodes/{name}/certificate" => node_certificate, Access::Node,
            op("Have the cluster CA sign the node's gateway certificate")
                .body::<CertificateRequest>()
                .json::<IssuedCertificate>(StatusCode::OK)),
        route!(GET "/v1/cluster/nodes/{name}/replicas/{namespace}/{app}/{id}/secrets" => replica_secrets, Access::Node,
            op("The secret values a replica placed on the node needs")
                .json::<ReplicaSecrets>(StatusCode::OK)),
        route!(POST "/v1/cluster/nodes/{name}/kv/{namespace}/{app}/{bucket}" => node_kv, Access::Node,
            op("A guest's `wasi:keyvalue` call on a bucket")
                .body::<KvOp>()
                .json::<KvAnswer>(StatusCode::OK)),
        route!(POST "/v1/cluster/nodes/{name}/kv/{namespace}/{app}/{bucket}/batch" => node_kv_batch, Access::Node,
            op("Guests' `wasi:keyvalue` calls on a bucket, sent together: each answered as if sent alone")
                .body_list::<KvOp>()
                .json_list::<KvOutcome>(StatusCode::OK)),
        route!(POST "/v1/cluster/nodes/{name}/volumes" => node_volumes, Access::Node,
            op("Report what the node's volumes hold; answers those bound to it")
                .body_list::<VolumeUsage>()
                .json_list::<VolumeUsage>(StatusCode::OK)),
        route!(GET "/v1/cluster/nodes/{name}/ingress" => node_ingress, Access::Node,
            op("Every app's HTTPS certificate, for the node's gateway")
                .json_list::<IngressCertificate>(StatusCode::OK)),
        route!(GET "/v1/cluster/snapshot" => snapshot, Access::Node,
            op("What the node acts on, at a store revision").json::<Snapshot>(StatusCode::OK)),
        route!(GET "/v1/cluster/watch" => watch, Access::Node,
            op("The changes after a snapshot, one delta per line, as they happen")
                .query::<WatchQuery>()
                .lines::<Delta>(StatusCode::OK)),
        route!(GET "/v1/cluster/modules/{digest}" => module_blob, Access::Node,
            op("A module's bytes, for a node that runs it").raw(StatusCode::OK, "application/wasm")),
    ]
}

/// Every route the router serves, with its handler.
fn routes() -> Vec<(Endpoint, MethodRouter<ControlPlane>)> {
    let mut routes = admin_routes();
    routes.extend(other_routes());
    routes
}

/// Every route the router serves, as the OpenAPI document describes it.
pub(crate) fn endpoints() -> Vec<Endpoint> {
    routes().into_iter().map(|(endpoint, _)| endpoint).collect()
}

/// The `/v1` API. Every route comes from [`routes`], each behind the check its access names,
/// so the OpenAPI document (built from the same list) describes every route served.
pub fn router(cp: ControlPlane) -> Router {
    let [mut public, mut join, mut nodes, mut authed]: [Router<ControlPlane>; 4] =
        Default::default();
    for (endpoint, handler) in routes() {
        let group = match endpoint.access {
            Access::Public => &mut public,
            Access::JoinToken => &mut join,
            Access::Node => &mut nodes,
            Access::Token(..) => &mut authed,
        };
        *group = std::mem::take(group).route(endpoint.path, handler);
    }
    let authed = authed
        .layer(DefaultBodyLimit::max(4 << 20))
        .route_layer(middleware::from_fn_with_state(cp.clone(), authorize))
        .route_layer(middleware::from_fn_with_state(
            cp.clone(),
            crate::audit::audit,
        ));
    // The join token opens one door: a node gets its own credential there.
    let join = join
        .route_layer(middleware::from_fn_with_state(
            cp.clone(),
            require_join_token,
        ))
        .route_layer(middleware::from_fn_with_state(
            cp.clone(),
            crate::audit::audit,
        ));
    // What worker nodes call, each with its own credential, for itself only. Room for a
    // guest's largest key-value set, whose bytes JSON writes as numbers (up to four
    // characters each) and whose keys it may escape (up to six): axum's default 2 MB refused
    // one of 600 KiB from a joined node.
    let nodes = nodes
        .layer(DefaultBodyLimit::max(
            6 * shoal_core::kv::MAX_SET_BYTES + (1 << 20),
        ))
        .route_layer(middleware::from_fn_with_state(cp.clone(), require_node));
    // Beside the API, the dashboard's static pages, which carry no data of their own.
    public
        .merge(crate::dashboard::routes())
        .merge(authed)
        .merge(join)
        .merge(nodes)
        .method_not_allowed_fallback(|req: Request| async move {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            method_not_allowed(&path)
        })
        .fallback(|uri: axum::http::Uri| async move {
            // `{*key}` matches no empty key: say what is wrong with it, not that the path is.
            let bucket = uri
                .path()
                .strip_prefix("/v1/kv/")
                .and_then(|b| b.strip_suffix('/'));
            match bucket {
                Some(b) if !b.is_empty() && !b.contains('/') => ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the key is missing: {}; GET /v1/kv/{b} lists the bucket's keys",
                        shoal_core::kv::check_key("").err().unwrap_or_default()
                    ),
                ),
                _ => ApiError::new(
                    ErrorCode::NotFound,
                    "no such API endpoint; GET /v1/openapi.json lists them all",
                ),
            }
        })
        .layer(middleware::from_fn(trace))
        .with_state(cp)
}

async fn healthz(State(cp): State<ControlPlane>) -> Response {
    // A shared store is asked, which may take a moment: off the executor.
    let unhealthy = tokio::task::spawn_blocking(move || cp.unhealthy())
        .await
        .unwrap_or_else(|e| Some(format!("the health check failed: {e}")));
    match unhealthy {
        None => "ok\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

async fn version() -> Json<ServerVersion> {
    Json(ServerVersion {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// The OpenAPI document: public, as the CA is, since it tells nothing of the cluster.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}

/// A span per API request, with method and path; at debug, its status and how long it took.
async fn trace(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!("api", method = %req.method(), path = %req.uri().path());
    async move {
        let started = std::time::Instant::now();
        let resp = next.run(req).await;
        tracing::debug!(
            status = resp.status().as_u16(),
            took_ms = started.elapsed().as_millis() as u64,
            "done"
        );
        resp
    }
    .instrument(span)
    .await
}

/// A 405 for a path served only with other methods, `Allow` naming them.
fn method_not_allowed(path: &str) -> Response {
    let allowed: Vec<&str> = RULES
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.method)
        .collect();
    let mut response = ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{path} takes {}", allowed.join(", ")),
    )
    .into_response();
    if let Ok(allow) = header::HeaderValue::from_str(&allowed.join(", ")) {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// Who is calling, and may they: the caller's token (the admin token, or an
/// API token) against the route's rule in [`crate::access::RULES`]. The
/// caller goes into the request for handlers that check more (apply checks
/// the namespace of the app in its body).
async fn authorize(State(cp): State<ControlPlane>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if access::rule_for(req.method().as_str(), &path).is_none() {
        return method_not_allowed(&path);
    }
    let Some(presented) = bearer(req.headers()).map(str::to_string) else {
        return ApiError::new(ErrorCode::Unauthorized,
            "missing token: send `Authorization: Bearer <token>` (the admin token is in the data dir's `token` file)",
        )
        .into_response();
    };
    // Most calls carry the admin token: it needs no store read, so no blocking thread.
    let found = if cp.is_admin_token(&presented) {
        Ok(Ok(Caller::admin()))
    } else {
        blocking(move || cp.authenticate(&presented)).await
    };
    let caller = match found {
        Ok(Ok(caller)) => caller,
        Ok(Err(refused)) => {
            return ApiError::new(ErrorCode::Unauthorized, refused.message()).into_response();
        }
        Err(e) => return e.into_response(),
    };
    let Some(rule) = access::rule_for(req.method().as_str(), &path) else {
        tracing::error!(method = %req.method(), path, "a route without an access rule");
        return ApiError::new(ErrorCode::Forbidden, "this route has no access rule")
            .into_response();
    };
    let namespace = match rule.scope {
        Scope::InPath => namespace_in_path(req.uri().path()).map(str::to_string),
        _ => axum::extract::Query::<NsQuery>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.namespace),
    };
    if let Some(audited) = req.extensions().get::<Audited>() {
        audited.caller(&caller.name);
    }
    if let Err(why) = access::authorize(&caller, rule, namespace.as_deref()) {
        return ApiError::new(ErrorCode::Forbidden, why).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The token of an `Authorization: Bearer` header; the scheme's case does not matter
/// (RFC 9110, 11.1).
fn bearer(headers: &header::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn require_join_token(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
    let presented = bearer(req.headers()).map(str::to_string);
    // On a shared store the token in force is read from it: off the async workers.
    let matches = match presented {
        Some(t) => tokio::task::spawn_blocking(move || cp.join_token_matches(&t))
            .await
            .unwrap_or(false),
        None => false,
    };
    match matches {
        true => {
            // A joining node is a node: its connection, which the node's client keeps for
            // its next calls, leaves its address's share as `require_node`'s do.
            if let Some(slot) = req.extensions().get::<crate::serve::ClientSlot>() {
                slot.exempt();
            }
            if let Some(audited) = req.extensions().get::<Audited>() {
                audited.caller("join token");
            }
            next.run(req).await
        }
        false => ApiError::new(ErrorCode::Unauthorized,
            "joining needs the cluster's join token (printed by `shoal server`, stored in its data dir as `join-token`)",
        )
        .into_response(),
    }
}

/// The node a request's credential belongs to: handlers take it to act for
/// that node only.
#[derive(Clone)]
struct NodeIdentity(String);

async fn require_node(State(cp): State<ControlPlane>, mut req: Request, next: Next) -> Response {
    let Some(presented) = bearer(req.headers()).map(str::to_string) else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "a node sends its own credential, which it gets by joining with the join token",
        )
        .into_response();
    };
    match blocking(move || cp.authenticate_node(&presented)).await {
        Ok(Some(node)) => {
            // A node is no client to cap: its connections leave its address's share.
            if let Some(slot) = req.extensions().get::<crate::serve::ClientSlot>() {
                slot.exempt();
            }
            req.extensions_mut().insert(NodeIdentity(node));
            next.run(req).await
        }
        Ok(None) => ApiError::new(
            ErrorCode::Unauthorized,
            "unknown or revoked node credential (was the node deleted?): join again with the join token",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Refuses a node acting for another.
fn itself(me: &NodeIdentity, name: &str) -> Result<(), ApiError> {
    if me.0 == name {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("node {} may act only for itself, not for node {name}", me.0),
        ))
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
struct NsQuery {
    /// The namespace: `default` when absent, or every namespace for a list.
    namespace: Option<String>,
}

impl NsQuery {
    fn key(&self, name: String) -> AppKey {
        AppKey {
            namespace: self.namespace(),
            name,
        }
    }

    /// The namespace asked for, or the default one.
    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into())
    }
}

async fn upload_module(State(cp): State<ControlPlane>, req: Request) -> Result<Response, ApiError> {
    let limit = cp.config().max_module_bytes;
    let too_large = || {
        ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "module is larger than the {limit}-byte limit (set --max-module-size on the server to raise it)"
            ),
        )
    };
    // The limit is enforced while streaming, not from Content-Length, so
    // the client has sent its body when the 413 comes and can read it.
    let stream = req.into_body().into_data_stream().boxed();
    let put = cp
        .blobs()
        .put_stream(stream, limit)
        .await
        .map_err(|e| match e {
            BlobError::TooLarge { .. } => too_large(),
            other => ControlError::internal(other).into(),
        })?;
    let cp2 = cp.clone();
    let digest = put.digest.clone();
    let (module, existed) =
        blocking(move || cp2.register_module(&digest, put.size, put.existed, None)).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(ModuleUploaded { module, existed })).into_response())
}

async fn list_modules(State(cp): State<ControlPlane>) -> Result<Json<Vec<Module>>, ApiError> {
    blocking(move || cp.list::<Module>(&keys::MODULES))
        .await
        .map(Json)
}

async fn get_module(
    State(cp): State<ControlPlane>,
    Path(digest): Path<String>,
) -> Result<Json<Module>, ApiError> {
    blocking(move || {
        cp.get::<Module>(&keys::module(&digest))?
            .map(|(m, _)| m)
            .ok_or_else(|| {
                ControlError::not_found(format!("module {digest} has not been uploaded"))
            })
    })
    .await
    .map(Json)
}

async fn delete_module(
    State(cp): State<ControlPlane>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.delete_module(&digest)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ApplyQuery {
    /// Check and compare only: nothing is stored.
    #[serde(default)]
    dry_run: bool,
    /// Roll out again a template whose last rollout was rolled back or aborted (refused
    /// otherwise, as a conflict).
    #[serde(default)]
    retry: bool,
    /// The `fingerprint` of the app's spec (from `GET /v1/apps/{name}`) this one was made
    /// from: a change is refused as a conflict (409) unless the stored spec still has it, so
    /// an edit does not undo a change made since it was read. An apply that would change
    /// nothing passes.
    #[serde(default)]
    if_spec: Option<String>,
}

async fn apply(
    State(cp): State<ControlPlane>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ApplyQuery>,
    WholeBody(body): WholeBody,
) -> Result<Response, ApiError> {
    let spec: AppSpec = strict(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidSpec,
            match e {
                Strict::Invalid(e) => format!("app spec is not valid JSON for an app: {e}"),
                unknown => format!("app spec: {unknown}"),
            },
        )
    })?;
    caller
        .check_namespace(&spec.namespace)
        .map_err(|why| ApiError::new(ErrorCode::Forbidden, why))?;
    spec.check_durations().map_err(ControlError::from)?;
    let spec = cp.resolve_oci(spec, q.dry_run).await?;
    let result =
        blocking(move || cp.apply_retrying(spec, q.dry_run, q.retry, q.if_spec.as_deref())).await?;
    let status = if result.outcome == ApplyOutcome::Created && !result.dry_run {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(result)).into_response())
}

async fn list_apps(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.summaries(q.namespace.as_deref()))
        .await
        .map(|s| Json(s).into_response())
}

async fn describe_app(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let key = q.key(name);
    blocking(move || cp.describe(&key))
        .await
        .map(|d| Json(d).into_response())
}

async fn delete_app(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let key = q.key(name);
    let k2 = key.clone();
    blocking(move || cp.delete_app(&k2)).await?;
    Ok(Json(Deleted {
        deleted: key.to_string(),
    })
    .into_response())
}

async fn list_configs(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.config_sets(q.namespace.as_deref()))
        .await
        .map(|s| Json(s).into_response())
}

async fn get_config(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    blocking(move || cp.config_set(&ns, &name))
        .await
        .map(|s| Json(s).into_response())
}

async fn put_config(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
    StrictJson(req): StrictJson<ConfigSetRequest>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let change = match (req.merge, req.create) {
        (true, true) => {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                "merge changes a set that exists: a new one is created whole",
            )
            .into());
        }
        (true, false) if req.unset.iter().any(|k| req.data.contains_key(k)) => {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                "a key is set or unset, not both",
            )
            .into());
        }
        (true, false) => ConfigChange::Merge {
            set: req.data,
            unset: req.unset,
        },
        (false, _) if !req.unset.is_empty() => {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                "unset goes with merge: a set written whole has only the keys given",
            )
            .into());
        }
        (false, _) => ConfigChange::Replace(req.data),
    };
    let (set, rolled) = blocking(move || {
        // An apply naming the set writes it again as read; a merge is made again on what
        // the set has then.
        crate::state::retrying(|| cp.put_config_set(&ns, &name, change.clone(), req.create))
    })
    .await?;
    let unchanged = rolled.is_none();
    let rolled = rolled.iter().flatten().map(|k| k.name.clone()).collect();
    Ok(Json(ConfigSetWritten {
        set,
        rolled,
        unchanged,
    })
    .into_response())
}

async fn delete_config(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let deleted = name.clone();
    blocking(move || cp.delete_config_set(&ns, &name)).await?;
    Ok(Json(Deleted { deleted }).into_response())
}

async fn list_secrets(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.secrets(q.namespace.as_deref()))
        .await
        .map(|s| Json(s).into_response())
}

async fn get_secret(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    blocking(move || cp.secret(&ns, &name))
        .await
        .map(|s| Json(s).into_response())
}

async fn put_secret(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
    StrictJson(write): StrictJson<SecretWrite>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    // An apply naming the secret writes it again as read.
    let (secret, rolled) =
        blocking(move || crate::state::retrying(|| cp.put_secret(&ns, &name, write.clone())))
            .await?;
    let unchanged = rolled.is_none();
    let rolled = rolled.iter().flatten().map(|k| k.name.clone()).collect();
    Ok(Json(SecretWritten {
        secret,
        rolled,
        unchanged,
    })
    .into_response())
}

async fn delete_secret(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let deleted = name.clone();
    blocking(move || cp.delete_secret(&ns, &name)).await?;
    Ok(Json(Deleted { deleted }).into_response())
}

async fn rotate_secret_key(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.rotate_secret_key())
        .await
        .map(|r| Json(r).into_response())
}

/// The cluster's metrics for Prometheus (`metrics_path: /v1/metrics`, with a viewer token).
async fn prometheus_metrics(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    let text = blocking(move || cp.prometheus()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn list_volumes(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.volumes(q.namespace.as_deref()))
        .await
        .map(|v| Json(v).into_response())
}

async fn delete_volume(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let deleted = name.clone();
    blocking(move || cp.delete_volume(&ns, &name)).await?;
    Ok(Json(Deleted { deleted }).into_response())
}

async fn list_buckets(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let buckets = blocking(move || cp.kv_buckets(q.namespace.as_deref())).await?;
    let buckets: Vec<_> = buckets
        .into_iter()
        .map(|(namespace, bucket, usage)| BucketView {
            namespace,
            bucket,
            keys: usage.keys,
            bytes: usage.bytes,
        })
        .collect();
    Ok(Json(buckets).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct KeysQuery {
    /// The bucket's namespace: `default` when absent.
    namespace: Option<String>,
    /// Where the page starts: the `cursor` of the page before.
    cursor: Option<u64>,
}

async fn list_kv_keys(
    State(cp): State<ControlPlane>,
    Path(bucket): Path<String>,
    Query(q): Query<KeysQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let op = KvOp::List { cursor: q.cursor };
    blocking(move || cp.kv(&ns, &bucket, op))
        .await
        .map(|a| Json(a).into_response())
}

async fn get_kv(
    State(cp): State<ControlPlane>,
    Path((bucket, key)): Path<(String, String)>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let what = format!("key {key:?} of bucket {bucket}");
    let op = KvOp::Get { keys: vec![key] };
    match blocking(move || cp.kv(&ns, &bucket, op)).await? {
        KvAnswer::Values { mut values } if values.len() == 1 => match values.remove(0) {
            Some(v) => {
                Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v).into_response())
            }
            None => Err(ApiError::new(ErrorCode::NotFound, format!("no {what}"))),
        },
        _ => Err(ControlError::internal("a get answered something else").into()),
    }
}

async fn put_kv(
    State(cp): State<ControlPlane>,
    Path((bucket, key)): Path<(String, String)>,
    Query(q): Query<NsQuery>,
    WholeBody(body): WholeBody,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let op = KvOp::Set {
        entries: vec![(key, body.to_vec())],
    };
    blocking(move || cp.kv(&ns, &bucket, op)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_kv(
    State(cp): State<ControlPlane>,
    Path((bucket, key)): Path<(String, String)>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let ns = q.namespace();
    let op = KvOp::Delete { keys: vec![key] };
    blocking(move || cp.kv(&ns, &bucket, op)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ScaleQuery {
    /// The app's namespace: `default` when absent.
    namespace: Option<String>,
    replicas: u32,
}

async fn scale(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<ScaleQuery>,
) -> Result<Response, ApiError> {
    let key = AppKey::new(q.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), &name);
    blocking(move || cp.scale(&key, q.replicas))
        .await
        .map(|a| Json(a).into_response())
}

async fn run_job(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let key = q.key(name);
    blocking(move || cp.run_job(&key))
        .await
        .map(|r| Json(r).into_response())
}

async fn list_jobs(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.jobs(q.namespace.as_deref()))
        .await
        .map(|j| Json(j).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct RollbackQuery {
    /// The app's namespace: `default` when absent.
    namespace: Option<String>,
    /// The revision to go back to: the one before the current when absent.
    to: Option<u64>,
}

async fn rollback(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<RollbackQuery>,
) -> Result<Response, ApiError> {
    let key = AppKey::new(q.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), &name);
    blocking(move || cp.rollback(&key, q.to))
        .await
        .map(|r| Json(r).into_response())
}

async fn restart(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let key = q.key(name);
    blocking(move || cp.restart(&key))
        .await
        .map(|r| Json(r).into_response())
}

async fn rollout_status(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let key = q.key(name);
    blocking(move || cp.rollout_view(&key))
        .await
        .map(|v| Json(v).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct RolloutActionQuery {
    /// The app's namespace: `default` when absent.
    namespace: Option<String>,
    /// With `promote`: skip every remaining canary step, not only the current one.
    #[serde(default)]
    full: bool,
}

async fn rollout_action(
    State(cp): State<ControlPlane>,
    Path((name, action)): Path<(String, String)>,
    Query(q): Query<RolloutActionQuery>,
) -> Result<Response, ApiError> {
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "promote" => RolloutAction::Promote,
        "abort" => RolloutAction::Abort,
        other => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("unknown rollout action {other:?}: use pause, resume, promote or abort"),
            ));
        }
    };
    let key = AppKey::new(q.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), &name);
    blocking(move || cp.rollout_action(&key, action, q.full))
        .await
        .map(|s| Json(s).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ReplicaQuery {
    /// Only this namespace's replicas (the app's, with `app`; `default` when absent).
    namespace: Option<String>,
    /// Only this app's replicas.
    app: Option<String>,
}

async fn list_replicas(
    State(cp): State<ControlPlane>,
    Query(q): Query<ReplicaQuery>,
) -> Result<Json<Vec<Replica>>, ApiError> {
    blocking(move || {
        let prefix = match (&q.namespace, &q.app) {
            (ns, Some(app)) => keys::replicas_of(&AppKey::new(
                ns.as_deref().unwrap_or(DEFAULT_NAMESPACE),
                app,
            )),
            (Some(ns), None) => keys::replicas_in(ns),
            (None, None) => keys::REPLICAS,
        };
        cp.list::<Replica>(&prefix)
    })
    .await
    .map(Json)
}

async fn list_services(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    let mut services = blocking(move || cp.services()).await?;
    if let Some(ns) = &q.namespace {
        services.retain(|s| &s.namespace == ns);
    }
    Ok(Json(services).into_response())
}

async fn list_tokens(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.tokens())
        .await
        .map(|t| Json(t).into_response())
}

async fn create_token(
    State(cp): State<ControlPlane>,
    StrictJson(req): StrictJson<TokenRequest>,
) -> Result<Response, ApiError> {
    blocking(move || cp.create_token(req))
        .await
        .map(|t| (StatusCode::CREATED, Json(t)).into_response())
}

async fn revoke_token(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.revoke_token(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn top_nodes(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.top_nodes())
        .await
        .map(|n| Json(n).into_response())
}

async fn top_apps(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.top_apps(q.namespace.as_deref()))
        .await
        .map(|a| Json(a).into_response())
}

async fn describe_node(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.describe_node(&name))
        .await
        .map(|d| Json(d).into_response())
}

async fn list_servers(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.servers())
        .await
        .map(|s| Json(s).into_response())
}

async fn list_nodes(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.node_summaries())
        .await
        .map(|n| Json(n).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct EventQuery {
    /// Only this namespace's events, and the cluster's own (nodes).
    namespace: Option<String>,
    /// Only this app's events.
    app: Option<String>,
    /// At most this many, the newest (100 when absent).
    limit: Option<usize>,
    /// Only events numbered above this (a follower passes the last `seq` it saw).
    after: Option<u64>,
}

async fn list_events(
    State(cp): State<ControlPlane>,
    Query(q): Query<EventQuery>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let key = q
            .app
            .map(|a| AppKey::new(q.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), &a));
        // Apps' events of other namespaces go; cluster events (nodes) stay, but not for a
        // token limited to namespaces, which may not read nodes, tokens or pools otherwise
        // either: it sees what names one of its namespaces.
        let visible = |e: &Event| {
            caller.namespaces.is_empty()
                || in_namespace(e).is_some_and(|ns| caller.namespaces.iter().any(|n| n == ns))
        };
        // `-n`: that namespace's events, and the cluster's own (nodes), not another's.
        let keep = |e: &Event| {
            key.as_ref().is_none_or(|k| e.app.as_ref() == Some(k))
                && q.namespace
                    .as_ref()
                    .is_none_or(|ns| in_namespace(e).is_none_or(|of| of == ns))
                && visible(e)
        };
        let limit = q.limit.unwrap_or(100);
        match q.after {
            // A follower reads on from where it was, oldest first.
            Some(after) => cp.events_after(Some(&keep), after, limit),
            None => {
                let mut events = cp.events(None, usize::MAX)?;
                events.retain(keep);
                let skip = events.len().saturating_sub(limit);
                Ok(events.split_off(skip))
            }
        }
    })
    .await
    .map(|e| Json(e).into_response())
}

/// The namespace an event is about: its app's, or its object's ([`namespace_of`]).
fn in_namespace(e: &Event) -> Option<&str> {
    e.app
        .as_ref()
        .map(|a| a.namespace.as_str())
        .or_else(|| namespace_of(&e.object))
}

/// The namespace of what an event is about when that belongs to one (`secret/NS/NAME`,
/// `config/NS/NAME`, `volume/NS/NAME`, `app/NS/NAME`, `replica/NS/NAME/ID`, `quota/NS`);
/// `None` for the cluster's own (nodes, tokens, pools).
fn namespace_of(object: &str) -> Option<&str> {
    let mut parts = object.split('/');
    let kind = parts.next()?;
    let ns = parts.next()?;
    matches!(
        kind,
        "secret" | "config" | "volume" | "app" | "replica" | "quota"
    )
    .then_some(ns)
}

#[derive(Deserialize, utoipa::IntoParams)]
struct LogQuery {
    /// The app's namespace: `default` when absent.
    namespace: Option<String>,
    /// Keep the answer open and stream new lines as they come.
    #[serde(default)]
    follow: bool,
    /// Only the last this many lines of each replica.
    tail: Option<usize>,
    /// Only this replica's output: one run of a job.
    replica: Option<String>,
    /// Only lines written in the last this many milliseconds.
    since_ms: Option<u64>,
    /// Each line with its time (RFC 3339, UTC) after its replica.
    #[serde(default)]
    timestamps: bool,
    /// `json`: NDJSON entries (replica, seq, time, stream, line) instead of text.
    format: Option<String>,
}

/// How often a following stream checks that its caller's token still holds.
const REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves once `bearer` no longer authenticates (its token revoked or expired), looked at every
/// [`REVOCATION_CHECK`]: a stream that follows (`logs --follow`) is one request that does not
/// end, and must stop when every next request would be refused. A store that cannot answer
/// for a moment cuts nothing.
async fn revoked(cp: ControlPlane, bearer: String) {
    loop {
        tokio::time::sleep(REVOCATION_CHECK).await;
        if cp.is_admin_token(&bearer) {
            continue;
        }
        let (cp, bearer) = (cp.clone(), bearer.clone());
        if let Ok(Err(_)) = blocking(move || cp.authenticate(&bearer)).await {
            return;
        }
    }
}

/// Guest output of every replica of an app, merged in time order: text lines `<replica>
/// [<time>] <stream> <line>`, or NDJSON; with `follow`, the response stays open and streams
/// new lines, across rollouts and node restarts (see `crate::logs`).
async fn logs(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
    headers: header::HeaderMap,
) -> Result<Response, ApiError> {
    let key = AppKey::new(q.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), &name);
    let json = match q.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("format {other:?}: use text or json"),
            ));
        }
    };
    let since_time = q.since_ms.map(|ms| shoal_core::now_ms().saturating_sub(ms));
    let query = crate::logs::LogQuery {
        follow: q.follow,
        tail: q.tail,
        replica: q.replica,
        since_time,
        timestamps: q.timestamps,
        json,
    };
    let presented = bearer(&headers).unwrap_or_default().to_string();
    let body = until_revoked(cp.app_logs(key, query).await?, revoked(cp, presented));
    let kind = if json {
        "application/x-ndjson"
    } else {
        "text/plain; charset=utf-8"
    };
    Ok(([(header::CONTENT_TYPE, kind)], Body::from_stream(body)).into_response())
}

/// `stream`'s items until it ends, or until `revoked` resolves: then an error, which breaks
/// the response off (a clean end would read as all there was), so the client asks again and
/// is told its token is no longer valid.
fn until_revoked<T: Send + 'static>(
    stream: impl futures::Stream<Item = T> + Send + 'static,
    revoked: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = std::io::Result<T>> + Send + 'static {
    let state = (Box::pin(stream), Box::pin(revoked), false);
    futures::stream::unfold(state, |(mut stream, mut revoked, cut)| async move {
        if cut {
            return None;
        }
        tokio::select! {
            item = stream.next() => item.map(|item| (Ok(item), (stream, revoked, false))),
            () = &mut revoked => {
                let why = std::io::Error::other("the caller's token was revoked");
                Some((Err(why), (stream, revoked, true)))
            }
        }
    })
}

/// What the proxy routes document: any body in, the app's answer out.
fn proxy_op() -> crate::openapi::Op {
    op("Send a request to one of an app's ready replicas, as another app calls it by name (`Host: NAME.NAMESPACE`): the path after `proxy` and the query are the app's; `Authorization` and `x-shoal-*` headers are not passed on. An app scaled to zero (`min = 0`) is woken, the request held meanwhile")
        .body_raw("*/*")
        .raw(StatusCode::OK, "*/*")
}

// One handler; an operation id for each method and path.
use self::proxy as proxy_get;
use self::proxy as proxy_get_root;
use self::proxy as proxy_post;
use self::proxy as proxy_post_root;
use self::proxy as proxy_put;
use self::proxy as proxy_put_root;
use self::proxy as proxy_patch;
use self::proxy as proxy_patch_root;
use self::proxy as proxy_delete;
use self::proxy as proxy_delete_root;
use self::proxy as proxy_head;
use self::proxy as proxy_head_root;
use self::proxy as proxy_options;
use self::proxy as proxy_options_root;

#[derive(Deserialize)]
struct ProxyPath {
    namespace: String,
    name: String,
}

/// `…/proxy/{path}`: the request, its path and query as the app is to see them, to a ready
/// replica of the app (see `crate::proxy`).
async fn proxy(
    State(cp): State<ControlPlane>,
    Path(at): Path<ProxyPath>,
    req: Request,
) -> Result<Response, ApiError> {
    // The raw path, not the decoded parameter: `%2F` in it stays what the client sent.
    let rest = req
        .uri()
        .path()
        .splitn(7, '/')
        .nth(6)
        .and_then(|p| p.strip_prefix("proxy"))
        .unwrap_or("/");
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let app = AppKey::new(&at.namespace, &at.name);
    Ok(cp.proxy(app, &path_and_query, req).await?)
}

/// The namespace of a path `/v1/namespaces/{namespace}/…`.
fn namespace_in_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/namespaces/")?.split('/').next()
}

async fn label_node(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    StrictJson(change): StrictJson<NodeLabels>,
) -> Result<Response, ApiError> {
    blocking(move || cp.label_node(&name, change))
        .await
        .map(|n| Json(n).into_response())
}

async fn node_action(
    State(cp): State<ControlPlane>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let action = match action.as_str() {
        "cordon" => NodeAction::Cordon,
        "uncordon" => NodeAction::Uncordon,
        "drain" => NodeAction::Drain,
        other => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("unknown node action {other:?}: use cordon, uncordon or drain"),
            ));
        }
    };
    blocking(move || cp.set_node_scheduling(&name, action))
        .await
        .map(|n| Json(n).into_response())
}

/// The cluster CA's certificate, for a joining node to check against the hash
/// its join token carries: public, so served without a token.
async fn cluster_ca(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    match &cp.config().authority {
        Some(ca) => Ok((
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            ca.pem().to_string(),
        )
            .into_response()),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            "this control plane has no cluster CA",
        )),
    }
}

async fn join_cluster(
    State(cp): State<ControlPlane>,
    JsonBody(join): JsonBody<JoinRequest>,
) -> Result<Response, ApiError> {
    blocking(move || cp.join_node(&join.node))
        .await
        .map(|j| (StatusCode::CREATED, Json(j)).into_response())
}

async fn list_pools(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    blocking(move || cp.pools())
        .await
        .map(|p| Json(p).into_response())
}

async fn get_pool(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.pool(&name))
        .await
        .map(|p| Json(p).into_response())
}

async fn put_pool(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    StrictJson(write): StrictJson<PoolWrite>,
) -> Result<Response, ApiError> {
    blocking(move || cp.put_pool(&name, write))
        .await
        .map(|p| Json(p).into_response())
}

async fn list_quotas(
    State(cp): State<ControlPlane>,
    Query(q): Query<NsQuery>,
) -> Result<Response, ApiError> {
    blocking(move || cp.quotas(q.namespace.as_deref()))
        .await
        .map(|q| Json(q).into_response())
}

async fn put_quota(
    State(cp): State<ControlPlane>,
    Path(namespace): Path<String>,
    StrictJson(limits): StrictJson<QuotaLimits>,
) -> Result<Response, ApiError> {
    blocking(move || cp.set_quota(&namespace, limits))
        .await
        .map(|q| Json(q).into_response())
}

async fn patch_quota(
    State(cp): State<ControlPlane>,
    Path(namespace): Path<String>,
    StrictJson(patch): StrictJson<QuotaPatch>,
) -> Result<Response, ApiError> {
    blocking(move || cp.patch_quota(&namespace, patch))
        .await
        .map(|q| Json(q).into_response())
}

async fn delete_quota(
    State(cp): State<ControlPlane>,
    Path(namespace): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.delete_quota(&namespace)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_pool(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || cp.delete_pool(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_node(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let deleted = name.clone();
    let volumes = blocking(move || cp.delete_node(&name)).await?;
    Ok(Json(NodeDeleted { deleted, volumes }).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct RotateQuery {
    /// Answer with the new token itself, not only where it is kept.
    #[serde(default)]
    reveal: bool,
}

async fn rotate_join_token(
    State(cp): State<ControlPlane>,
    Query(q): Query<RotateQuery>,
) -> Result<Response, ApiError> {
    let (token, file) = blocking(move || cp.rotate_join_token()).await?;
    Ok(Json(RotatedJoinToken {
        file: file.map(|f| f.display().to_string()),
        token: q.reveal.then_some(token),
    })
    .into_response())
}

async fn register_node(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    JsonBody(node): JsonBody<Node>,
) -> Result<Response, ApiError> {
    itself(&me, &node.name)?;
    let revision = blocking(move || cp.register_node(node)).await?;
    Ok(Json(Registered { revision }).into_response())
}

async fn node_certificate(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<CertificateRequest>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    let certificate = blocking(move || cp.issue_certificate(&name, &request)).await?;
    Ok(Json(IssuedCertificate { certificate }).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct HeartbeatQuery {
    /// A node starting checks its credential and learns the servers, and is not taken as
    /// alive yet: it registers next, so a node back from NotReady says so once, joining.
    #[serde(default)]
    probe: bool,
}

async fn heartbeat(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    Query(q): Query<HeartbeatQuery>,
    WholeBody(body): WholeBody,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    // A node checking its credential sends no body, nor did nodes before `NodeUsage`.
    let usage = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<Option<NodeUsage>>(&body)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("node usage: {e}")))?
    };
    let servers = blocking(move || {
        if !q.probe {
            cp.heartbeat(&name, usage)?;
        }
        Ok(cp.servers_told())
    })
    .await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    // A node given one server learns the others, as Nomad's clients do from theirs.
    if let Some(value) = servers.and_then(|s| axum::http::HeaderValue::from_str(&s).ok()) {
        response
            .headers_mut()
            .insert(shoal_api::SERVERS_HEADER, value);
    }
    Ok(response)
}

async fn leave(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || cp.leave_node(&name))
        .await
        .map(|n| Json(n).into_response())
}

async fn report(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(report): JsonBody<ReplicaReport>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    if report.node != name {
        return Err(ApiError::new(
            ErrorCode::WrongNode,
            format!("node {name} cannot report for node {}", report.node),
        ));
    }
    blocking(move || cp.report_replica(report)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn node_metrics(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(stats): JsonBody<Vec<RevisionStats>>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || {
        cp.record_metrics(&name, stats);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn node_cpu(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(usage): JsonBody<Vec<AppCpu>>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || {
        cp.record_cpu(&name, usage);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn node_waiting(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(waiting): JsonBody<Vec<Waiting>>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || {
        cp.record_waiting(&name, waiting);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn incident(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(incident): JsonBody<ReplicaIncident>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    if incident.node != name {
        return Err(ApiError::new(
            ErrorCode::WrongNode,
            format!("node {name} cannot report for node {}", incident.node),
        ));
    }
    blocking(move || cp.record_incident(incident)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What a node's volumes hold; answers the volumes bound to it.
async fn node_volumes(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
    JsonBody(usage): JsonBody<Vec<VolumeUsage>>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || cp.record_volume_usage(&name, usage))
        .await
        .map(|v| Json(v).into_response())
}

/// Every app's HTTPS certificate for its route hosts, for a node's gateway.
async fn node_ingress(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    blocking(move || cp.ingress_certificates())
        .await
        .map(|v| Json(v).into_response())
}

/// A guest's `wasi:keyvalue` call, from the node that runs it.
async fn node_kv(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path((name, namespace, app, bucket)): Path<(String, String, String, String)>,
    JsonBody(op): JsonBody<KvOp>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    let app = AppKey {
        namespace,
        name: app,
    };
    blocking(move || cp.kv_for_node(&name, &app, &bucket, op))
        .await
        .map(|a| Json(a).into_response())
}

/// Guests' `wasi:keyvalue` calls on one bucket that a node sent together while earlier ones
/// were on their way: each runs as if sent alone, side by side (so writes still share the
/// bucket's transactions), and is answered in the order sent.
async fn node_kv_batch(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path((name, namespace, app, bucket)): Path<(String, String, String, String)>,
    JsonBody(ops): JsonBody<Vec<KvOp>>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    if ops.len() > MAX_BATCH {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("at most {MAX_BATCH} key-value calls go in one batch"),
        ));
    }
    let app = AppKey {
        namespace,
        name: app,
    };
    let calls = ops.into_iter().map(|op| {
        let (cp, name, app, bucket) = (cp.clone(), name.clone(), app.clone(), bucket.clone());
        async move {
            match blocking(move || cp.kv_for_node(&name, &app, &bucket, op)).await {
                Ok(answer) => KvOutcome::Answered { answer },
                Err(e) if e.status.is_server_error() => KvOutcome::Failed { message: e.message },
                Err(e) => KvOutcome::Refused { message: e.message },
            }
        }
    });
    Ok(Json(futures::future::join_all(calls).await).into_response())
}

/// The secret values a replica placed on the calling node needs to start.
async fn replica_secrets(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path((name, namespace, app, id)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    itself(&me, &name)?;
    let app = AppKey {
        namespace,
        name: app,
    };
    blocking(move || cp.replica_secrets(&name, &app, &id))
        .await
        .map(|s| Json(s).into_response())
}

async fn snapshot(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
) -> Result<Response, ApiError> {
    blocking(move || cp.snapshot_for(&me.0))
        .await
        .map(|s| Json(s).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct WatchQuery {
    /// The first store revision to send: the snapshot's revision plus one.
    from: u64,
    /// The snapshot's store ([`Snapshot::store`]): another store refuses to go on from it.
    #[serde(default)]
    store: u64,
}

/// Newline-delimited JSON, one [`shoal_api::Delta`] per store revision from
/// `from` on that changed what nodes act on (apps, revisions, replicas, nodes,
/// rollouts). Nodes apply them to their copy of the snapshot; the stream ends
/// where the watch cannot go on, and a history already compacted is refused
/// up front: either way the node re-reads the snapshot.
async fn watch(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Query(q): Query<WatchQuery>,
) -> Result<Response, ApiError> {
    // Starting a watch may read the store (on etcd, the revision "now" is), so it runs off
    // the executor.
    let starter = cp.clone();
    let (from, theirs) = (q.from, q.store);
    let watcher = tokio::task::spawn_blocking(move || {
        let store = starter.store();
        let reread = |why: String| Err(ApiError::new(ErrorCode::Compacted, format!("{why}; re-read the snapshot")));
        // Another store than the one the node read (restored from another's copy, migrated):
        // its revisions are of another history.
        let ours = store.id();
        if theirs != 0 && ours != 0 && theirs != ours {
            return reread("this is not the store the snapshot was read from: it was restored from another or replaced".into());
        }
        // Ahead of this store: its state was restored from a backup (or replaced) since the
        // node read it. Resuming would skip what the store holds now; the node reads it anew,
        // as a reflector relists on a resource version too new. (0: not known, as when etcd
        // cannot be read; an empty store is one the node registers with again anyway.)
        let now = store.revision();
        if now > 0 && from > now + 1 {
            return reread(format!("revision {from} is ahead of this store's {now}: its state was restored or replaced"));
        }
        match store.watch("/", from) {
            Ok(watcher) => Ok(watcher),
            Err(shoal_store::StoreError::Compacted { compacted }) => {
                reread(format!("revision {from} is compacted (up to {compacted})"))
            }
            Err(other) => Err(ControlError::internal(other).into()),
        }
    })
    .await
    .map_err(ControlError::internal)??;
    let reader = cp.clone();
    let scope = blocking(move || reader.scope_for(&me.0)).await?;
    // Scoping a delta may read the store (a revision, whole), so it runs where blocking is
    // allowed, one delta at a time.
    let scope = Arc::new(std::sync::Mutex::new(scope));
    let lines = crate::link::deltas(watcher).then(move |delta| {
        let (scope, cp) = (Arc::clone(&scope), cp.clone());
        async move {
            let line = tokio::task::spawn_blocking(move || {
                let mut scope = scope.lock().expect("node scope lock");
                let delta = scope.delta(delta, |app, number| cp.revision_now(app, number));
                let mut line = serde_json::to_vec(&delta).expect("deltas serialise");
                line.push(b'\n');
                bytes::Bytes::from(line)
            })
            .await
            .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(line)
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// The cluster's backup (`shoal backup`), streamed from the temp file it was written to.
async fn backup(State(cp): State<ControlPlane>) -> Result<Response, ApiError> {
    let (file, manifest) = cp.backup().await?;
    let size = file.metadata().map_err(ControlError::internal)?.len();
    let mut headers = header::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-tar"),
    );
    headers.insert(header::CONTENT_LENGTH, size.into());
    for (name, value) in [
        ("shoal-backup-revision", manifest.revision),
        ("shoal-backup-keys", manifest.keys as u64),
        ("shoal-backup-modules", manifest.modules as u64),
    ] {
        headers.insert(name, value.into());
    }
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// A module's bytes, for nodes to fetch and verify by digest.
async fn module_blob(
    State(cp): State<ControlPlane>,
    Extension(me): Extension<NodeIdentity>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let (reader, wanted) = (cp.clone(), digest.clone());
    if !blocking(move || reader.node_runs_module(&me.0, &wanted)).await? {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("no replica on this node runs module {digest}"),
        ));
    }
    let path = cp
        .blobs()
        .try_path(&digest)
        .map_err(|e| ApiError::new(ErrorCode::BadDigest, e.to_string()))?;
    cp.fetch_module(&digest).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|_| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("module {digest} has not been uploaded"),
        )
    })?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(header::CONTENT_TYPE, "application/wasm")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::ready_node;
    use axum::http::Request as HttpRequest;
    use http_body_util::BodyExt;
    use std::collections::BTreeSet;
    use tower::ServiceExt;

    fn control_plane_with_token() -> (tempfile::TempDir, ControlPlane) {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let blobs = shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap();
        let config = crate::ControlConfig {
            token: "admin".into(),
            join_token: "join".into(),
            join_token_file: Some(dir.path().join("join-token")),
            authority: Some(std::sync::Arc::new(
                shoal_tls::Authority::load_or_create(dir.path()).unwrap(),
            )),
            ..Default::default()
        };
        let cp = ControlPlane::new(store, blobs, config).unwrap();
        (dir, cp)
    }

    fn router_with_token() -> (tempfile::TempDir, Router) {
        let (dir, cp) = control_plane_with_token();
        (dir, router(cp))
    }

    /// `req` with no body, and `token` if given, answered by `router`.
    async fn respond(
        router: &Router,
        mut req: axum::http::request::Builder,
        token: Option<&str>,
    ) -> Response {
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn call(
        router: &Router,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let resp = respond(router, HttpRequest::get(uri), token).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn every_error_is_json_with_a_code() {
        let (_dir, router) = router_with_token();
        let (status, body) = call(&router, "/v1/events?limit=many", Some("admin")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        let (status, body) = call(&router, "/v1/nothing", Some("admin")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        let (status, body) = call(&router, "/v1/apps", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "unauthorized");
        // The scheme is case-insensitive.
        let req = HttpRequest::get("/v1/apps")
            .header(header::AUTHORIZATION, "bearer admin")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.clone().oneshot(req).await.unwrap().status(),
            StatusCode::OK
        );
        let (status, _) = call(&router, "/v1/apps/ghost", Some("admin")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // A bucket's path with an empty key breaks the key rule; it is not an unknown endpoint.
        for method in ["GET", "PUT", "DELETE"] {
            let req = HttpRequest::builder().method(method).uri("/v1/kv/cache/");
            let resp = respond(&router, req, Some("admin")).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{method}");
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("the key is missing: a key is 1 to"),
                "{body}"
            );
        }
    }

    /// A field the API does not know is named, not dropped: a typo in a hand-written body
    /// would otherwise leave a setting at its default without a word.
    #[tokio::test]
    async fn unknown_fields_in_what_users_write_are_refused_by_name() {
        let (_dir, router) = router_with_token();
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"hello\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/hello\"]\n"
        );
        let parsed = shoal_core::spec::parse_app(&src).unwrap();
        let spec = serde_json::to_value(parsed.resolve(digest).unwrap()).unwrap();
        // As the CLI sends it, it gets past parsing: only its module is unknown.
        let (status, body) = post(&router, "/v1/apps", "admin", spec.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("module"), "{body}");
        // A span of time past a year, which the controller would add to its clock.
        let mut forever = spec.clone();
        forever["http"]["timeout_ms"] = u64::MAX.into();
        let (status, body) = post(&router, "/v1/apps", "admin", forever).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("365d"), "{body}");
        let mut typo = spec;
        typo["replica"] = 2.into();
        typo["http"]["reuse_count"] = 3.into();
        let (status, body) = post(&router, "/v1/apps", "admin", typo).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_spec", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("`http.reuse_count`"), "{body}");
        assert!(message.contains("`replica`"), "{body}");

        let token = serde_json::json!({"name": "ci", "role": "viewer", "namespace": ["a"]});
        let (status, body) = post(&router, "/v1/tokens", "admin", token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["message"], "unknown field `namespace`");
        let token = serde_json::json!({"name": "ci", "role": "viewer", "namespaces": ["a"]});
        assert_eq!(
            post(&router, "/v1/tokens", "admin", token).await.0,
            StatusCode::CREATED
        );
    }

    /// Mangles `json` a few bytes at a time: cuts, and characters JSON and our types care about.
    fn mangled(seed: &mut u64, json: &str) -> Vec<u8> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let pieces: [&[u8]; 14] = [
            b"\"",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"-1",
            b"1e999",
            b"null",
            b"\\u0000",
            b"18446744073709551616",
            b"\xff",
            b"\"a\"",
        ];
        let mut bytes = json.as_bytes().to_vec();
        for _ in 0..1 + next() % 3 {
            let at = (next() % (bytes.len() as u64 + 1)) as usize;
            if next() % 2 == 0 {
                let end = (at + (next() % 8) as usize).min(bytes.len());
                bytes.drain(at..end);
            } else {
                let piece = pieces[(next() % pieces.len() as u64) as usize];
                bytes.splice(at..at, piece.iter().copied());
            }
        }
        bytes
    }

    #[tokio::test]
    async fn mangled_bodies_get_a_4xx_with_a_code_never_a_5xx() {
        let (_dir, cp) = control_plane_with_token();
        let n1 = cp.join_node("n1").unwrap().credential;
        let router = router(cp);
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"hello\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/hello\"]\n[env]\nGREETING = \"hi\"\n"
        );
        let parsed = shoal_core::spec::parse_app(&src).unwrap();
        let spec = serde_json::to_string(&parsed.resolve(digest.clone()).unwrap()).unwrap();
        let node = serde_json::json!({
            "name": "n1", "gateway": "127.0.0.1:1", "state": "Ready", "schedulable": true,
            "draining": false, "joined_at": 0, "labels": {},
            "capacity": {"cpu_millis": 1000, "memory_bytes": 1073741824u64, "instances": 10}
        })
        .to_string();
        let stats = serde_json::json!([{
            "app": {"namespace": "default", "name": "hello"}, "revision": 1,
            "requests": 1, "errors": 0, "latency": {"counts": [1]}, "busy_ms": 1
        }])
        .to_string();
        let join = serde_json::json!({ "node": "n2" }).to_string();
        let targets = [
            ("/v1/apps", "admin", spec),
            ("/v1/cluster/join", "join", join),
            ("/v1/cluster/nodes", n1.as_str(), node),
            ("/v1/cluster/nodes/n1/metrics", n1.as_str(), stats),
        ];
        // Unmangled, each body gets past parsing: the app's module is unknown, the join, the
        // node and its report are taken.
        let expected = [
            StatusCode::BAD_REQUEST,
            StatusCode::CREATED,
            StatusCode::OK,
            StatusCode::NO_CONTENT,
        ];
        for ((uri, token, body), expected) in targets.iter().zip(expected) {
            let req = HttpRequest::post(*uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let resp = router.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), expected, "{uri}");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for (uri, token, body) in &targets {
            for round in 0..300 {
                let bytes = mangled(&mut seed, body);
                let req = HttpRequest::post(*uri)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(bytes.clone()))
                    .unwrap();
                let resp = router.clone().oneshot(req).await.unwrap();
                let status = resp.status();
                let text = resp.into_body().collect().await.unwrap().to_bytes();
                let said = String::from_utf8_lossy(&bytes);
                assert!(
                    !status.is_server_error(),
                    "{uri} round {round}: {status} for {said}: {text:?}"
                );
                if status.is_client_error() {
                    let body: serde_json::Value = serde_json::from_slice(&text).unwrap();
                    assert!(body["error"]["code"].is_string(), "{uri}: {body}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_wrong_method_is_a_405_naming_the_right_ones_and_a_big_body_a_413() {
        let (_dir, router) = router_with_token();
        for token in [Some("admin"), None] {
            let resp = respond(&router, HttpRequest::patch("/v1/apps/hello"), token).await;
            assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(resp.headers()[header::ALLOW], "GET, DELETE");
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        }
        // Over the body limit, in the same shape.
        let req = HttpRequest::post("/v1/apps")
            .header(header::AUTHORIZATION, "Bearer admin")
            .body(Body::from(vec![b' '; 5 << 20]))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "too_large", "{body}");
    }

    #[tokio::test]
    async fn error_bodies_have_the_one_shape() {
        let (_dir, router) = router_with_token();
        let (_, body) = call(&router, "/v1/apps/ghost", Some("admin")).await;
        let parsed: shoal_core::problem::ErrorBody = serde_json::from_value(body).unwrap();
        assert_eq!(parsed.code(), ErrorCode::NotFound);
        assert!(parsed.error.message.contains("ghost"), "{parsed:?}");
    }

    #[tokio::test]
    async fn the_watch_streams_one_delta_per_line() {
        let (_dir, cp) = control_plane_with_token();
        let n1 = ready_node("n1");
        let credential = cp.join_node("n1").unwrap().credential;
        let revision = cp.register_node(n1.clone()).unwrap();
        let req = HttpRequest::get(format!("/v1/cluster/watch?from={revision}"))
            .header(header::AUTHORIZATION, format!("Bearer {credential}"))
            .body(Body::empty())
            .unwrap();
        // The watch ends with the store: keep it open past the request.
        let resp = router(cp.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut read = Vec::new();
        while !read.contains(&b'\n') {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("a line")
                .expect("an open stream")
                .unwrap();
            read.extend_from_slice(frame.data_ref().expect("data"));
        }
        let line = read.split(|&b| b == b'\n').next().unwrap();
        let delta: shoal_api::Delta = serde_json::from_slice(line).unwrap();
        assert_eq!(delta.revision, revision);
        assert_eq!(
            delta.changes,
            [shoal_api::Change::Put(shoal_api::Object::Node(n1))]
        );
    }

    #[tokio::test]
    async fn a_watch_from_past_the_stores_revision_is_told_to_read_the_snapshot_again() {
        let (_dir, cp) = control_plane_with_token();
        let credential = cp.join_node("n1").unwrap().credential;
        let now = cp.store().revision();
        let ours = cp.store().id();
        // A node that read this store before it was restored from an older copy, or that
        // read another store (this one was migrated, or restored from another's copy).
        for (query, ok) in [
            (format!("from={}", now + 1), true),
            (format!("from={}&store={ours}", now + 1), true),
            (format!("from={}", now + 2), false),
            (format!("from={}", now + 1000), false),
            (format!("from={}&store={}", now + 1, ours ^ 1), false),
        ] {
            let from = &query;
            let req = HttpRequest::get(format!("/v1/cluster/watch?{query}"))
                .header(header::AUTHORIZATION, format!("Bearer {credential}"))
                .body(Body::empty())
                .unwrap();
            let resp = router(cp.clone()).oneshot(req).await.unwrap();
            if ok {
                assert_eq!(resp.status(), StatusCode::OK, "from {from}");
                continue;
            }
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], "compacted", "from {from}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("restored"),
                "{body}"
            );
            assert_ne!(ours, 0);
        }
    }

    /// Cordoning (or draining) a node that already is changes nothing, and says nothing.
    #[test]
    fn a_node_cordoned_again_gets_no_second_event() {
        let (_dir, cp) = control_plane_with_token();
        cp.register_node(ready_node("n")).unwrap();
        let said = |reason: &str| {
            let events = cp.events(None, 100).unwrap();
            events.iter().filter(|e| e.reason == reason).count()
        };
        for _ in 0..2 {
            cp.set_node_scheduling("n", NodeAction::Cordon).unwrap();
            cp.set_node_scheduling("n", NodeAction::Cordon).unwrap();
            cp.set_node_scheduling("n", NodeAction::Drain).unwrap();
            cp.set_node_scheduling("n", NodeAction::Drain).unwrap();
            cp.set_node_scheduling("n", NodeAction::Uncordon).unwrap();
        }
        assert_eq!(
            (said("Cordoned"), said("Draining"), said("Uncordoned")),
            (2, 2, 2)
        );
    }

    #[test]
    fn a_node_back_from_leaving_is_as_it_was_and_an_operators_word_stays() {
        let (_dir, cp) = control_plane_with_token();
        let node = ready_node;
        let get = |name: &str| {
            let nodes = cp.node_summaries().unwrap();
            nodes
                .into_iter()
                .find(|n| n.node.name == name)
                .unwrap()
                .node
        };
        let names = ["own", "cordoned", "recordoned", "claims"];
        for name in names {
            cp.register_node(node(name)).unwrap();
        }
        cp.set_node_scheduling("cordoned", NodeAction::Cordon)
            .unwrap();
        for name in ["own", "cordoned", "recordoned"] {
            let left = cp.leave_node(name).unwrap();
            assert!(!left.schedulable && left.draining, "{left:?}");
            assert_eq!(get(name), left);
        }
        // Asked again (a retried call), nothing changes.
        assert_eq!(cp.leave_node("own").unwrap(), get("own"));
        // An operator's cordon of a node that left is the operator's from then on.
        cp.set_node_scheduling("recordoned", NodeAction::Cordon)
            .unwrap();
        // A node cannot claim a leave it did not make: what it registers with is not taken.
        let mut forged = node("claims");
        cp.set_node_scheduling("claims", NodeAction::Cordon)
            .unwrap();
        forged.leaving = Some(shoal_core::Leaving { schedulable: true });
        cp.register_node(forged.clone()).unwrap();
        assert_eq!(get("claims").leaving, None);
        cp.register_node(forged).unwrap();
        for name in ["own", "cordoned", "recordoned"] {
            cp.register_node(node(name)).unwrap();
        }
        let back = |name: &str| {
            let n = get(name);
            assert_eq!(n.leaving, None, "{name}");
            (n.schedulable, n.draining)
        };
        assert_eq!(back("own"), (true, false), "its own cordon is lifted");
        assert_eq!(
            back("cordoned"),
            (false, false),
            "the operator's cordon stays, the drain goes"
        );
        assert_eq!(back("recordoned"), (false, false), "cordoned while away");
        assert_eq!(back("claims"), (false, false), "still cordoned");
        let events = cp.events(None, 100).unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.reason == "Leaving" && e.object == "node/own"),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn tokens_open_only_their_own_doors() {
        let (_dir, router) = router_with_token();
        assert_eq!(
            call(&router, "/v1/apps", Some("join")).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&router, "/v1/cluster/snapshot", Some("admin")).await.0,
            StatusCode::UNAUTHORIZED
        );
        // The join token opens the join only; a node's own credential the rest.
        assert_eq!(
            call(&router, "/v1/cluster/snapshot", Some("join")).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&router, "/v1/apps", Some("admin")).await.0,
            StatusCode::OK
        );
    }

    async fn post(
        router: &Router,
        uri: &str,
        token: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let req = HttpRequest::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    fn node_json(name: &str, gateway: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name, "gateway": gateway, "state": "Ready", "schedulable": true,
            "draining": false, "joined_at": 0, "labels": {},
            "capacity": {"cpu_millis": 1000, "memory_bytes": 1073741824u64, "instances": 10}
        })
    }

    /// The reviewer's finding: with the join token, anyone could register over a live
    /// node (its gateway address included), heartbeat for it and report for its replicas.
    #[tokio::test]
    async fn a_node_acts_only_for_itself_and_the_join_token_only_joins() {
        let (_dir, cp) = control_plane_with_token();
        let router = router(cp.clone());
        let (status, joined) = post(
            &router,
            "/v1/cluster/join",
            "join",
            serde_json::json!({"node": "n1"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{joined}");
        let n1 = joined["credential"].as_str().unwrap().to_string();
        assert!(n1.starts_with("n1."), "{n1}");
        let n2 = cp.join_node("n2").unwrap().credential;
        for (token, name) in [(&n1, "n1"), (&n2, "n2")] {
            let (status, _) = post(
                &router,
                "/v1/cluster/nodes",
                token,
                node_json(name, &format!("{name}:8080")),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
        }

        // The join token no longer registers, heartbeats or reads anything.
        let (status, _) = post(
            &router,
            "/v1/cluster/nodes",
            "join",
            node_json("n1", "10.9.9.9:1"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            post(
                &router,
                "/v1/cluster/nodes/n1/heartbeat",
                "join",
                serde_json::Value::Null
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        // Nor does it join again as a node that has joined: no taking over n1.
        let (status, body) = post(
            &router,
            "/v1/cluster/join",
            "join",
            serde_json::json!({"node": "n1"}),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("shoal node delete n1")
        );

        // n2's credential acts for n2 only.
        let (status, body) = post(
            &router,
            "/v1/cluster/nodes",
            &n2,
            node_json("n1", "10.9.9.9:1"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let key = shoal_tls::NodeKey::generate().unwrap();
        let request = serde_json::json!({
            "csr": key.request("n1").unwrap(),
            "hosts": ["10.9.9.9"],
        });
        for path in [
            "heartbeat",
            "leave",
            "metrics",
            "cpu",
            "waiting",
            "certificate",
        ] {
            let body = match path {
                "heartbeat" | "leave" => serde_json::Value::Null,
                "certificate" => request.clone(),
                _ => serde_json::json!([]),
            };
            let (status, _) =
                post(&router, &format!("/v1/cluster/nodes/n1/{path}"), &n2, body).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        }
        let nodes = cp.node_summaries().unwrap();
        let n1_record = nodes.iter().find(|n| n.node.name == "n1").unwrap();
        assert_eq!(n1_record.node.gateway, "n1:8080", "n1 untouched");
        assert!(n1_record.node.schedulable, "n1 not made to leave");
        // n1 gets its certificate for its own key, signed by the cluster CA; a request
        // naming no host, or too many, or that is no request, is refused.
        let (status, issued) =
            post(&router, "/v1/cluster/nodes/n1/certificate", &n1, request).await;
        assert_eq!(status, StatusCode::OK, "{issued}");
        let pem = issued["certificate"].as_str().unwrap();
        assert!(key.with_certificate(pem).is_ok(), "{pem}");
        for (csr, hosts) in [
            (key.request("n1").unwrap(), serde_json::json!([])),
            (key.request("n1").unwrap(), serde_json::json!(vec!["h"; 9])),
            ("not a request".to_string(), serde_json::json!(["10.0.0.1"])),
        ] {
            let body = serde_json::json!({ "csr": csr, "hosts": hosts });
            let (status, answer) =
                post(&router, "/v1/cluster/nodes/n1/certificate", &n1, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        }

        // A wrong secret under n1's name is refused.
        let forged = shoal_core::auth::Credential::new("n1", &[0; 32]).expose();
        assert_eq!(
            post(
                &router,
                "/v1/cluster/nodes/n1/heartbeat",
                &forged,
                serde_json::Value::Null
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        // A node starting probes its credential: taken, but not as a sign of life, so a
        // NotReady n1 stays so until it registers (one NodeReady); a heartbeat brings it back.
        let key = shoal_core::objects::keys::node("n1");
        let state = || cp.get::<shoal_core::Node>(&key).unwrap().unwrap().0.state;
        let mut record = cp.get::<shoal_core::Node>(&key).unwrap().unwrap().0;
        record.state = shoal_core::NodeState::NotReady;
        let put = shoal_store::Op::put(key.clone(), crate::state::encode(&record));
        cp.store().txn(shoal_store::Txn::new().then(put)).unwrap();
        for (path, after) in [
            ("heartbeat?probe=true", shoal_core::NodeState::NotReady),
            ("heartbeat", shoal_core::NodeState::Ready),
        ] {
            let uri = format!("/v1/cluster/nodes/n1/{path}");
            let status = post(&router, &uri, &n1, serde_json::Value::Null).await.0;
            assert_eq!(status, StatusCode::NO_CONTENT, "{path}");
            assert_eq!(state(), after, "{path}");
        }
        // Deleting n1 revokes its credential; it may then join again.
        cp.delete_node("n1").unwrap();
        assert_eq!(
            post(
                &router,
                "/v1/cluster/nodes/n1/heartbeat",
                &n1,
                serde_json::Value::Null
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            cp.node_summaries()
                .unwrap()
                .iter()
                .all(|n| n.node.name != "n1")
        );
        let (status, _) = post(
            &router,
            "/v1/cluster/join",
            "join",
            serde_json::json!({"node": "n1"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }

    /// A guest's set of the largest value a bucket takes, as a joined node's link sends it.
    #[tokio::test]
    async fn a_node_sets_a_value_of_the_largest_size() {
        let (_dir, cp) = control_plane_with_token();
        let router = router(cp.clone());
        let n1 = cp.join_node("n1").unwrap().credential;
        let value = vec![255u8; shoal_core::kv::MAX_VALUE_BYTES];
        let op = KvOp::Set {
            entries: vec![("k".into(), value)],
        };
        let body = serde_json::to_value(&op).unwrap();
        let (status, body) =
            post(&router, "/v1/cluster/nodes/n1/kv/default/web/b", &n1, body).await;
        assert_ne!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    }

    /// Calls a node sends together are each answered as if sent alone, in the order sent:
    /// increments side by side count every one, a refused call is refused by itself, and a
    /// node runs them only on a bucket its replicas are granted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nodes_batch_of_key_value_calls_is_answered_call_by_call() {
        use crate::state::encode;
        use crate::state::tests::{replica_of, uploaded};
        use shoal_core::kv::{KvOutcome, MAX_BATCH};
        use shoal_store::{Op, Txn};
        let (_dir, cp) = control_plane_with_token();
        let router = router(cp.clone());
        let n1 = cp.join_node("n1").unwrap().credential;
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/web\"]\n[keyvalue]\nbuckets = [\"b\"]\n"
        );
        let spec = shoal_core::parse_app(&src)
            .unwrap()
            .resolve(digest)
            .unwrap();
        cp.apply(spec.clone(), false).unwrap();
        let replica = replica_of(&spec, "r1", 1, "n1", shoal_core::Phase::Running);
        cp.store()
            .txn(Txn::new().then(Op::put(keys::replica(&spec.key(), "r1"), encode(&replica))))
            .unwrap();
        let increment = |key: &str| KvOp::Increment {
            key: key.into(),
            delta: 1,
        };
        let mut ops = vec![increment("hits"); 6];
        ops.insert(2, increment(""));
        ops.insert(
            4,
            KvOp::Get {
                keys: vec!["hits".into(), "none".into()],
            },
        );
        let body = serde_json::to_value(&ops).unwrap();
        let (status, body) = post(
            &router,
            "/v1/cluster/nodes/n1/kv/default/web/b/batch",
            &n1,
            body,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let outcomes: Vec<KvOutcome> = serde_json::from_value(body).unwrap();
        assert_eq!(outcomes.len(), 8);
        let mut counts = Vec::new();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match (i, outcome) {
                (2, KvOutcome::Refused { message }) => {
                    assert!(message.contains("a key is 1 to 1024 bytes"), "{message}")
                }
                (
                    4,
                    KvOutcome::Answered {
                        answer: KvAnswer::Values { values },
                    },
                ) => {
                    assert_eq!(values.len(), 2);
                    assert_eq!(values[1], None);
                }
                (
                    _,
                    KvOutcome::Answered {
                        answer: KvAnswer::Count { value },
                    },
                ) => counts.push(value),
                other => panic!("unexpected {other:?}"),
            }
        }
        counts.sort_unstable();
        assert_eq!(counts, [1, 2, 3, 4, 5, 6]);

        // Another app's bucket is refused call by call, as a call alone would be; too many
        // calls at once are refused whole.
        let body = serde_json::to_value(vec![increment("hits")]).unwrap();
        let (status, body) = post(
            &router,
            "/v1/cluster/nodes/n1/kv/default/web/other/batch",
            &n1,
            body,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body[0]["message"]
                .as_str()
                .unwrap()
                .contains("is granted bucket other"),
            "{body}"
        );
        let body = serde_json::to_value(vec![increment("hits"); MAX_BATCH + 1]).unwrap();
        let (status, body) = post(
            &router,
            "/v1/cluster/nodes/n1/kv/default/web/b/batch",
            &n1,
            body,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            cp.kv(
                "default",
                "b",
                KvOp::Get {
                    keys: vec!["hits".into()]
                }
            )
            .unwrap(),
            KvAnswer::Values {
                values: vec![Some(b"6".to_vec())]
            }
        );
    }

    #[tokio::test]
    async fn a_rotated_join_token_stops_working_and_joined_nodes_carry_on() {
        let (dir, cp) = control_plane_with_token();
        let file = dir.path().join("join-token");
        let router = router(cp.clone());
        let n1 = cp.join_node("n1").unwrap().credential;
        let req = HttpRequest::post("/v1/join-token/rotate?reveal=true")
            .header(header::AUTHORIZATION, "Bearer admin")
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let rotated: RotatedJoinToken = serde_json::from_slice(&bytes).unwrap();
        let new = rotated.token.unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), new);
        assert_eq!(rotated.file.as_deref(), file.to_str());
        let join = |token: String, node: &str| {
            let router = router.clone();
            let body = serde_json::json!({ "node": node });
            async move { post(&router, "/v1/cluster/join", &token, body).await.0 }
        };
        assert_eq!(join("join".into(), "n2").await, StatusCode::UNAUTHORIZED);
        assert_eq!(join(new, "n2").await, StatusCode::CREATED);
        assert_eq!(
            post(
                &router,
                "/v1/cluster/nodes/n1/heartbeat",
                &n1,
                serde_json::Value::Null
            )
            .await
            .0,
            StatusCode::NOT_FOUND,
            "n1's credential still opens its door (it has not registered yet)"
        );
        // Only admins rotate; without `reveal` the token is not in the answer.
        let req = HttpRequest::post("/v1/join-token/rotate")
            .header(header::AUTHORIZATION, format!("Bearer {n1}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.clone().oneshot(req).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let req = HttpRequest::post("/v1/join-token/rotate")
            .header(header::AUTHORIZATION, "Bearer admin")
            .body(Body::empty())
            .unwrap();
        let bytes = router
            .clone()
            .oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let rotated: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(rotated.get("token").is_none(), "{rotated}");
    }

    fn openapi_document() -> serde_json::Value {
        serde_json::from_slice(&crate::openapi::json()).unwrap()
    }

    /// The OpenAPI document lists every route the router serves, from the admin table's
    /// rules and the list of the others, and the router serves every operation it lists.
    #[tokio::test]
    async fn the_openapi_document_lists_every_route_and_only_routes() {
        let doc = openapi_document();
        let served: BTreeSet<(String, String)> = RULES
            .iter()
            .map(|r| (r.method.to_string(), r.path))
            .chain(
                other_routes()
                    .iter()
                    .map(|(e, _)| (e.method.to_string(), e.path)),
            )
            .map(|(method, path)| (method, crate::openapi::openapi_path(path)))
            .collect();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(|method| (method.to_uppercase(), path.clone()))
            })
            .collect();
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served, not documented"
        );
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented, not served"
        );
        for rule in RULES {
            let op =
                &doc["paths"][crate::openapi::openapi_path(rule.path)][rule.method.to_lowercase()];
            assert_eq!(op["x-shoal-role"], rule.role.as_str(), "{}", rule.path);
        }
        // Asked without a credential, each operation is routed: the public ones answer, the
        // others refuse; none gets the fallback's 404 or a 405.
        let (_dir, router) = router_with_token();
        for (method, path) in &documented {
            let uri: String = path
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let req = HttpRequest::builder()
                .method(method.as_str())
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            let status = router.clone().oneshot(req).await.unwrap().status();
            let public = doc["paths"][path][method.to_lowercase()]["security"].is_null();
            let expected = if public {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status, expected, "{method} {path}");
        }
    }

    #[tokio::test]
    async fn the_openapi_document_is_served_without_a_token() {
        let (_dir, router) = router_with_token();
        let req = HttpRequest::get("/v1/openapi.json")
            .body(Body::empty())
            .unwrap();
        let resp = router.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc, openapi_document());
        assert!(doc["paths"]["/v1/openapi.json"]["get"].is_object());
    }

    /// Walks every admin-API route: no token is refused (401), a role below the route's or a
    /// namespace out of the token's scope is refused (403), the right token gets through.
    #[tokio::test]
    async fn every_route_refuses_who_it_must_and_lets_in_who_it_may() {
        let (_dir, cp) = control_plane_with_token();
        let router = router(cp.clone());
        let token = |role: Role, namespaces: &[&str]| {
            let name = format!("{role}-token-{}", namespaces.join("-"));
            cp.create_token(TokenRequest {
                name: name.trim_end_matches('-').to_string(),
                role,
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                expires_in_seconds: None,
            })
            .unwrap()
            .token
        };
        let everywhere: Vec<String> = Role::ALL.iter().map(|r| token(*r, &[])).collect();
        let team_a: Vec<String> = Role::ALL.iter().map(|r| token(*r, &["team-a"])).collect();
        let digest = format!("sha256:{}", "a".repeat(64));
        let spec = |ns: &str| {
            let src = format!(
                "name = \"web\"\nnamespace = \"{ns}\"\n[component]\ndigest = \"{digest}\"\n\
                 kind = \"http\"\n[http]\nroutes = [\"/web\"]\n"
            );
            let spec = shoal_core::spec::parse_app(&src)
                .unwrap()
                .resolve(digest.clone())
                .unwrap();
            serde_json::to_vec(&spec).unwrap()
        };
        let send = |method: &str, uri: String, bearer: Option<&str>, body: Vec<u8>| {
            let mut req = HttpRequest::builder()
                .method(method)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(t) = bearer {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let router = router.clone();
            let req = req.body(Body::from(body)).unwrap();
            async move { router.oneshot(req).await.unwrap().status() }
        };
        for rule in RULES {
            let path = rule
                .path
                .replace("{digest}", &digest)
                .replace("{name}", "web")
                .replace("{bucket}", "b")
                .replace("{*key}", "k")
                .replace("{*path}", "p")
                .replace(
                    "{action}",
                    if rule.path.starts_with("/v1/nodes") {
                        "cordon"
                    } else {
                        "pause"
                    },
                );
            let at = |ns: &str| match rule.scope {
                Scope::Namespace | Scope::NamespaceOrAll => format!("{path}?namespace={ns}"),
                Scope::InPath => path.replace("{namespace}", ns),
                _ => path.clone(),
            };
            let body = |ns: &str| {
                if rule.scope == Scope::Body {
                    spec(ns)
                } else {
                    b"{}".to_vec()
                }
            };
            let what = format!("{} {}", rule.method, rule.path);
            let role = Role::ALL.iter().position(|r| *r == rule.role).unwrap();

            assert_eq!(
                send(rule.method, at("team-a"), None, body("team-a")).await,
                StatusCode::UNAUTHORIZED,
                "{what}"
            );
            assert_eq!(
                send(
                    rule.method,
                    at("team-a"),
                    Some("not-a-token"),
                    body("team-a")
                )
                .await,
                StatusCode::UNAUTHORIZED,
                "{what}"
            );
            if role > 0 {
                let below = &everywhere[role - 1];
                assert_eq!(
                    send(rule.method, at("team-a"), Some(below), body("team-a")).await,
                    StatusCode::FORBIDDEN,
                    "{what}"
                );
            }
            let (right, wrong_ns) = match rule.scope {
                // Cluster-wide: only tokens of every namespace.
                Scope::Cluster => (&everywhere[role], Some(&team_a[2])),
                Scope::Shared => (&team_a[role], None),
                _ => (&team_a[role], Some(&team_a[2])),
            };
            if let Some(wrong) = wrong_ns {
                let status = send(rule.method, at("team-b"), Some(wrong), body("team-b")).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
            }
            let status = send(rule.method, at("team-a"), Some(right), body("team-a")).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{what}: {status}"
            );
            assert!(status != StatusCode::METHOD_NOT_ALLOWED, "{what} is routed");
        }
        // A token limited to namespaces must say which when the route could mean all.
        let status = send("GET", "/v1/apps".into(), Some(&team_a[0]), Vec::new()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // A revoked token is refused from then on.
        cp.revoke_token("viewer-token").unwrap();
        let status = send("GET", "/v1/apps".into(), Some(&everywhere[0]), Vec::new()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Node credentials and the join token open no admin route.
        let node = cp.join_node("n1").unwrap().credential;
        for t in [node.as_str(), "join"] {
            assert_eq!(
                send("GET", "/v1/apps".into(), Some(t), Vec::new()).await,
                StatusCode::UNAUTHORIZED
            );
        }
        let listed = cp.tokens().unwrap();
        assert_eq!(listed.len(), 5);
        assert!(
            serde_json::to_string(&listed)
                .unwrap()
                .find(&everywhere[1][9..])
                .is_none()
        );
    }
}
