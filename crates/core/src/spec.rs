//! The app spec: TOML as users write it, parsed into a validated, normalised
//! [`AppSpec`] with quantities resolved and maps ordered (BTreeMap), so two
//! files that mean the same thing produce the same struct and the same hash.

use crate::name::validate_name;
use crate::quantity::{parse_cpu, parse_duration_ms, parse_memory};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::PathBuf;
use thiserror::Error;
use toml::Spanned;

pub const DEFAULT_NAMESPACE: &str = "default";
/// An instance's memory limit when the spec names none.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
/// What the scheduler reserves for a replica when the spec names no memory
/// request. Instances come from the node's shared pool only while they run, so
/// an idle replica costs its compiled code's bookkeeping (~140 kB measured);
/// 1 MiB covers that with room to spare.
pub const DEFAULT_MEMORY_REQUEST: u64 = 1 << 20;
/// Autoscaling's stable window when the spec names none (Knative's default);
/// the panic window is a tenth of it.
pub const DEFAULT_SCALE_WINDOW_MS: u64 = 60_000;
/// How long an app with `min = 0` goes without requests before it scales to zero.
pub const DEFAULT_IDLE_MS: u64 = 300_000;
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// The longest span of time a spec may give (365 days): long enough for any timeout, pause or
/// deadline, and far from overflowing the clock readings it is added to.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3_600_000;
/// The most memory one instance may use (`resources.limits.memory`), cluster-wide. Nodes size
/// their instance pool's memory slots to it (the runtime's default `max_memory_bytes`), so a
/// larger limit is refused at apply rather than by every node the replica lands on.
pub const MAX_INSTANCE_MEMORY: u64 = 512 << 20;
/// Upper bounds keep one typo from asking for the impossible.
pub const MAX_REPLICAS: u32 = 1000;
pub const MAX_CONCURRENCY: u32 = 10_000;

/// What a component is run as, and so which WIT world it must implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// wasi:http/proxy: a fresh instance per request.
    Http,
    /// wasi:cli/command run to completion.
    Job,
    /// wasi:cli/command kept running.
    Daemon,
}

impl Kind {
    pub fn world(self) -> &'static str {
        match self {
            Kind::Http => "wasi:http/proxy",
            Kind::Job | Kind::Daemon => "wasi:cli/command",
        }
    }

    /// The export a component needs to run as this kind, as the runtime looks for it.
    pub fn needs(self) -> &'static str {
        match self {
            Kind::Http => "wasi:http/incoming-handler@0.2 (or wasi:http/handler@0.3)",
            Kind::Job | Kind::Daemon => "wasi:cli/run@0.2",
        }
    }

    /// The world a component exporting `exports` is served as under this kind: an `http`
    /// one exporting `wasi:http/handler@0.3` is served as WASIp3 ([`serves_p3`]).
    pub fn served_world(self, exports: &[String]) -> &'static str {
        match self {
            Kind::Http if serves_p3(exports) => "wasi:http/service, WASIp3",
            kind => kind.world(),
        }
    }

    /// Whether a component exporting `exports` can run as this kind.
    pub fn runs(self, exports: &[String]) -> bool {
        let has = |prefix: &str| exports.iter().any(|e| e.starts_with(prefix));
        match self {
            Kind::Http => has("wasi:http/incoming-handler@0.2") || has("wasi:http/handler@0.3"),
            Kind::Job | Kind::Daemon => has("wasi:cli/run@0.2"),
        }
    }
}

/// Whether an `http` component exporting `exports` is served as WASIp3: it exports
/// `wasi:http/handler@0.3`, which the runtime prefers when a component exports both.
pub fn serves_p3(exports: &[String]) -> bool {
    exports
        .iter()
        .any(|e| e.starts_with("wasi:http/handler@0.3"))
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Http => "http",
            Kind::Job => "job",
            Kind::Daemon => "daemon",
        })
    }
}

/// A gateway route: a path prefix, optionally bound to one host.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path: String,
}

impl Route {
    /// `"/hello"` is a path prefix on any host; `"api.example.com/v1"` binds a host.
    pub fn parse(s: &str) -> Result<Route, String> {
        let (host, path) = match s.find('/') {
            Some(0) => (None, s),
            Some(i) => (Some(&s[..i]), &s[i..]),
            None => {
                return Err(format!(
                    "route {s:?} must be a path prefix like \"/hello\" or HOST/PATH like \"api.example.com/\""
                ));
            }
        };
        if let Some(h) = host {
            validate_host(h)?;
        }
        validate_path(path)?;
        Ok(Route {
            host: host.map(str::to_string),
            path: normalise_path(path),
        })
    }
}

/// The route paths that serve `path`, longest first: the path itself, then cut at each `/`
/// (`/a/b/c`, `/a/b`, `/a`), then `/`. The gateway looks routes up by them; an apply finds
/// the route that serves a new one's paths now by them.
#[inline]
pub fn path_prefixes(path: &str) -> impl Iterator<Item = &str> {
    let cuts = path
        .char_indices()
        .rev()
        .filter(|&(i, c)| c == '/' && i > 0)
        .map(move |(i, _)| &path[..i]);
    std::iter::once(path)
        .filter(|p| *p != "/")
        .chain(cuts)
        .chain(std::iter::once("/"))
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(h) => write!(f, "{h}{}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

fn validate_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty() && h.len() <= 253 && h.split('.').all(|l| validate_name(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{h:?} is not a valid host: use lowercase DNS names like \"api.example.com\""
        ))
    }
}

/// One `[network] inbound` entry: apps that may call an app by its service name, written
/// as guests address services (`APP`, `APP.NS`), with `*` for any app.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Caller {
    /// `*`: every app of the cluster.
    Any,
    /// `*.NS`: every app of namespace `NS`.
    Namespace(String),
    /// `APP` (of the called app's namespace) or `APP.NS`.
    App(AppKey),
}

impl Caller {
    /// Reads one entry of the app in `namespace`, which a bare `APP` belongs to.
    pub fn parse(entry: &str, namespace: &str) -> Result<Caller, String> {
        if entry == "*" {
            return Ok(Caller::Any);
        }
        let (name, ns) = entry.split_once('.').unwrap_or((entry, namespace));
        validate_name(ns).map_err(|e| format!("{entry:?}: namespace: {e}"))?;
        if name == "*" {
            return Ok(Caller::Namespace(ns.to_string()));
        }
        validate_name(name)
            .map_err(|e| format!("{entry:?}: {e}; write APP, APP.NAMESPACE, *.NAMESPACE or *"))?;
        Ok(Caller::App(AppKey::new(ns, name)))
    }

    fn admits(&self, caller: &AppKey) -> bool {
        match self {
            Caller::Any => true,
            Caller::Namespace(ns) => *ns == caller.namespace,
            Caller::App(app) => app == caller,
        }
    }
}

/// Who may call an app by its service name (`[network] inbound`, read). Without the
/// setting, the apps of its own namespace: namespaces are tenants, and one tenant's
/// apps do not reach another's unless that one says so.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Inbound(Vec<Caller>);

/// As written in a spec, with the namespace always named: `*`, `*.NS`, `APP.NS`.
impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Any => f.write_str("*"),
            Caller::Namespace(ns) => write!(f, "*.{ns}"),
            Caller::App(app) => write!(f, "{}.{}", app.name, app.namespace),
        }
    }
}

impl Inbound {
    pub fn new(callers: Vec<Caller>) -> Inbound {
        Inbound(callers)
    }

    pub fn callers(&self) -> &[Caller] {
        &self.0
    }

    /// The apps of `namespace`.
    pub fn namespace(namespace: &str) -> Inbound {
        Inbound(vec![Caller::Namespace(namespace.to_string())])
    }

    pub fn admits(&self, caller: &AppKey) -> bool {
        self.0.iter().any(|c| c.admits(caller))
    }
}

/// One `[network] outbound` grant: a host and, if written, the one port it may be called on.
/// Without a port only the scheme's default is granted (80 for http, 443 for https), so
/// `"api.example.com"` does not open the host's other services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundGrant {
    pub host: OutboundHost,
    pub port: Option<u16>,
}

/// A granted host, or the host a request names: compared as such, so `[::1]` and `[0::1]`
/// are one address and names are compared lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundHost {
    /// A DNS name; where it resolves is checked when the gateway connects.
    Name(String),
    Ip(IpAddr),
}

impl OutboundHost {
    /// The host of a request's URI (`uri.host()`: IPv6 in brackets).
    pub fn of_uri(host: &str) -> OutboundHost {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse() {
            Ok(ip) => OutboundHost::Ip(ip),
            Err(_) => OutboundHost::Name(host.to_ascii_lowercase()),
        }
    }
}

impl OutboundGrant {
    /// `HOST` or `HOST:PORT`; HOST a lowercase DNS name, an IPv4 address or an IPv6 one in
    /// brackets. Addresses no guest may ever reach ([`Reach::Never`]) are refused here; private
    /// ones are accepted, and the node decides (a gateway setting, off by default).
    pub fn parse(grant: &str) -> Result<OutboundGrant, String> {
        let invalid_port = || {
            format!(
                "{grant:?} has an invalid port: use a number from 1 to 65535, like \"api.example.com:8080\""
            )
        };
        if grant.contains("://") {
            return Err(format!(
                "{grant:?} is a URL: grant the host alone, like \"api.example.com\" or \"api.example.com:8080\""
            ));
        }
        let (host, port) = match grant.strip_prefix('[') {
            Some(rest) => {
                let (inside, after) = rest.split_once(']').ok_or_else(|| {
                    format!("{grant:?} is not a valid host: an IPv6 address needs its closing ']'")
                })?;
                let ip: Ipv6Addr = inside
                    .parse()
                    .map_err(|_| format!("{grant:?} is not a valid IPv6 address"))?;
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or_else(invalid_port)?),
                };
                (OutboundHost::Ip(IpAddr::V6(ip)), port)
            }
            None => {
                let (host, port) = match grant.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (grant, None),
                };
                if port.is_some_and(|p| p.contains(':')) {
                    return Err(format!(
                        "{grant:?}: write an IPv6 address in brackets, like \"[2001:db8::1]:8080\""
                    ));
                }
                (outbound_host(host)?, port)
            }
        };
        let port = match port {
            None => None,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(
                p.parse()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(invalid_port)?,
            ),
            Some(_) => return Err(invalid_port()),
        };
        if let OutboundHost::Ip(ip) = host
            && reach(ip) == Reach::Never
        {
            return Err(format!(
                "{grant:?} cannot be granted: link-local (where cloud metadata lives), unspecified, \
                 multicast and broadcast addresses are never reachable from guests"
            ));
        }
        Ok(OutboundGrant { host, port })
    }

    /// Whether a request to `host` on `port` is granted; `default_port` is that of the
    /// request's scheme.
    pub fn allows(&self, host: &OutboundHost, port: u16, default_port: u16) -> bool {
        self.host == *host && port == self.port.unwrap_or(default_port)
    }
}

/// An IPv4 address or a DNS name. A name ending in a numeric label is refused: it is no DNS
/// name, but resolvers read `127.1` or `2130706433` as addresses.
fn outbound_host(host: &str) -> Result<OutboundHost, String> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(OutboundHost::Ip(IpAddr::V4(ip)));
    }
    validate_host(host)
        .map_err(|_| {
            format!(
                "{host:?} is not a valid host: use lowercase DNS names like \"api.example.com\", \
                 optionally with a port (\"api.example.com:8080\")"
            )
        })
        .and_then(|()| {
            let last = host.rsplit('.').next().unwrap_or(host);
            if last.bytes().all(|b| b.is_ascii_digit()) {
                Err(format!(
                    "{host:?} is not a valid host: write an IPv4 address as four numbers, like \"203.0.113.7\""
                ))
            } else {
                Ok(OutboundHost::Name(host.to_string()))
            }
        })
}

/// Which destinations a guest's granted egress may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Public,
    /// The node itself and its networks (loopback, RFC 1918, CGNAT 100.64/10, IPv6 ULA
    /// fc00::/7 and site-local): where the control plane and other nodes' APIs listen, so
    /// reachable only where the node allows it.
    Private,
    /// Link-local (169.254/16 with cloud metadata, fe80::/10), unspecified (connecting to
    /// it reaches the node itself), multicast, broadcast and reserved: never.
    Never,
}

/// What kind of destination `ip` is; IPv4 addresses inside IPv6 (mapped `::ffff:a.b.c.d`,
/// the deprecated compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002:aabb:ccdd::/48`)
/// count as the IPv4 address they reach.
pub fn reach(ip: IpAddr) -> Reach {
    match ip {
        IpAddr::V4(v4) => reach_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return reach_v4(v4);
            }
            let [.., a, b, c, d] = v6.octets();
            let compatible = segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
            if compatible || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return reach_v4(Ipv4Addr::new(a, b, c, d));
            }
            if segments[0] == 0x2002 {
                let [_, _, a, b, c, d, ..] = v6.octets();
                return reach_v4(Ipv4Addr::new(a, b, c, d));
            }
            if v6.is_unspecified() || v6.is_multicast() || segments[0] & 0xffc0 == 0xfe80 {
                Reach::Never
            } else if v6.is_loopback()
                || segments[0] & 0xfe00 == 0xfc00
                || segments[0] & 0xffc0 == 0xfec0
            {
                Reach::Private
            } else {
                Reach::Public
            }
        }
    }
}

fn reach_v4(ip: Ipv4Addr) -> Reach {
    let [a, b, ..] = ip.octets();
    if ip.is_link_local() || a == 0 || ip.is_multicast() || a >= 240 {
        Reach::Never
    } else if ip.is_loopback()
        || ip.is_private()
        || (a == 100 && b & 0xc0 == 64)
        || (a == 198 && b & 0xfe == 18)
    {
        Reach::Private
    } else {
        Reach::Public
    }
}

fn validate_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("route path {p:?} must start with '/'"));
    }
    if p.contains(['?', '#', ' ']) || p.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!(
            "route path {p:?} must be a plain path prefix (no query, fragment, spaces or dot segments)"
        ));
    }
    Ok(())
}

/// `/hello/` and `/hello` are the same prefix.
fn normalise_path(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

/// What a replica is given, Kubernetes-style: requests are what the scheduler
/// reserves on a node (and weigh the app's CPU share there), limits are what
/// the sandbox enforces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    pub requests: Requests,
    pub limits: Limits,
    /// Instances one replica may run at once: a cap, not a reservation. The
    /// node's instance pool is shared; an idle replica holds no slot.
    pub max_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Requests {
    /// Millicores reserved on the node; 0 (the default) asks for none and gets
    /// the smallest share of a busy node's CPU.
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    /// Linear memory of one instance, enforced by wasmtime.
    pub memory_bytes: u64,
    /// Millicores one replica's guests may use even when the node is idle (a
    /// quota per 100 ms period; an app's replicas on one node add up, as pods'
    /// limits do); none: they may use whatever is idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HttpSpec {
    pub routes: Vec<Route>,
    pub timeout_ms: u64,
    /// Requests one instance serves, one after another, before it is dropped (`[http] reuse`);
    /// 1 is a fresh instance per request. State in the guest carries over between them.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub reuse: u32,
    /// How long an instance kept for reuse may wait for its next request (`reuse_idle`).
    #[serde(
        default = "default_reuse_idle",
        skip_serializing_if = "is_default_reuse_idle"
    )]
    pub reuse_idle_ms: u64,
    /// Requests one reused WASIp3 instance serves at once (`reuse_concurrent`); p2 instances
    /// serve one at a time whatever it says.
    #[serde(
        default = "default_reuse_concurrent",
        skip_serializing_if = "is_default_reuse_concurrent"
    )]
    pub reuse_concurrent: u32,
    /// `[http] tls`: the secret whose `tls.crt` and `tls.key` every gateway presents to
    /// HTTPS clients asking for one of the app's route hosts. Pinned to the secret's latest
    /// version at each apply, like `secret_env`. Not part of the template: a new
    /// certificate changes no replica, as an Ingress's does not restart pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsRef>,
}

/// The secret an app's HTTPS certificate and key come from (`[http] tls`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsRef {
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The keys of a TLS secret, named as Kubernetes' `kubernetes.io/tls` secrets name them:
/// the certificate chain and its private key, PEM.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
const PULL_SECRET_WITHOUT_OCI: &str = "names the credentials for pulling `oci`; a component given by `path` or `digest` comes from no registry";

/// The keys of a registry pull secret (`[component] pull_secret`): the registry host the
/// credentials are for, as a reference names it (`host[:port]`), and the credentials.
pub const REGISTRY_KEY: &str = "registry";
pub const REGISTRY_USERNAME_KEY: &str = "username";
pub const REGISTRY_PASSWORD_KEY: &str = "password";

/// Requests per instance at most (`[http] reuse`).
pub const MAX_REUSE: u32 = 100_000;

/// Requests one p3 instance serves at once unless `reuse_concurrent` says: `wasmtime serve`'s
/// default for p3 components.
pub const DEFAULT_REUSE_CONCURRENT: u32 = 16;

/// Requests one p3 instance serves at once at most (`[http] reuse_concurrent`).
pub const MAX_REUSE_CONCURRENT: u32 = 1_000;

fn default_reuse_concurrent() -> u32 {
    DEFAULT_REUSE_CONCURRENT
}

fn is_default_reuse_concurrent(n: &u32) -> bool {
    *n == DEFAULT_REUSE_CONCURRENT
}

/// How long a reusable instance waits for its next request unless `reuse_idle` says.
pub const DEFAULT_REUSE_IDLE_MS: u64 = 10_000;

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn default_reuse_idle() -> u64 {
    DEFAULT_REUSE_IDLE_MS
}

fn is_default_reuse_idle(ms: &u64) -> bool {
    *ms == DEFAULT_REUSE_IDLE_MS
}

/// How a new revision replaces the running one.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Replace replicas a few at a time, new before old.
    #[default]
    Rolling,
    /// Run a few replicas of the new revision beside the stable ones, send them a growing
    /// share of traffic step by step, and promote or roll back on what the gateways measure.
    Canary,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Canary => "canary",
        })
    }
}

/// One canary step: this share of traffic goes to the new revision for `pause`
/// (`None`: until `shoal rollout promote`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CanaryStep {
    /// Percent of requests, 1 to 99.
    pub weight: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

/// How a canary is judged against the stable revision, on the requests the
/// gateways routed to each since the step began.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Analysis {
    /// Canary requests needed before it can be judged (and so before a step ends).
    pub min_requests: u64,
    /// How far the canary's error rate (5xx share) may exceed the stable one's, in
    /// basis points (100 = one percentage point).
    pub max_error_rate_increase_bp: u32,
    /// How far the canary's p99 latency may exceed the stable one's, in percent
    /// of it (150 = 1.5x); differences under 10 ms are noise and never fail it.
    pub max_p99_ratio_pct: u32,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            min_requests: 20,
            max_error_rate_increase_bp: 200,
            max_p99_ratio_pct: 150,
        }
    }
}

/// How replicas move from one revision to the next (or off a draining node).
/// Not part of the revision: how to roll, not what runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollout {
    #[serde(default)]
    pub strategy: Strategy,
    /// Replicas of the new revision allowed above `replicas` during a rollout.
    pub max_surge: u32,
    /// Replicas allowed below `replicas` serving during a rollout.
    pub max_unavailable: u32,
    /// A rollout that makes no progress for this long is rolled back (to the last
    /// revision that rolled out), as one whose new replicas crash-loop is at once.
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_ms: u64,
    /// How long a new replica must have been ready, without a restart, before it counts as
    /// available (Kubernetes' `minReadySeconds`): an old replica is removed, a canary step
    /// starts and a rollout completes only on available replicas, so one that passes its
    /// probe and crashes seconds later has not cost an old one yet.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_ready_ms: u64,
    /// Canary only: the traffic steps before full promotion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryStep>,
    #[serde(default)]
    pub analysis: Analysis,
}

pub const DEFAULT_PROGRESS_DEADLINE_MS: u64 = 600_000;

fn default_progress_deadline() -> u64 {
    DEFAULT_PROGRESS_DEADLINE_MS
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            strategy: Strategy::Rolling,
            max_surge: 1,
            max_unavailable: 0,
            progress_deadline_ms: DEFAULT_PROGRESS_DEADLINE_MS,
            min_ready_ms: 0,
            steps: Vec::new(),
            analysis: Analysis::default(),
        }
    }
}

impl Rollout {
    fn check(&self, kind: Kind) -> Result<(), String> {
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(
                "max_surge and max_unavailable cannot both be 0: a rollout could never progress"
                    .into(),
            );
        }
        if self.progress_deadline_ms < 1_000 {
            return Err("progress_deadline must be at least 1s".into());
        }
        if self.min_ready_ms > 0 && kind == Kind::Job {
            return Err(
                "min_ready is for http and daemon apps: a job's runs are replaced, not rolled"
                    .into(),
            );
        }
        if self.min_ready_ms >= self.progress_deadline_ms {
            return Err(
                "min_ready must be less than progress_deadline: no replica could count as available before the rollout gave up"
                    .into(),
            );
        }
        match self.strategy {
            Strategy::Rolling if !self.steps.is_empty() => {
                Err("steps are for strategy = \"canary\"".into())
            }
            Strategy::Rolling => Ok(()),
            Strategy::Canary if kind != Kind::Http => Err(
                "strategy = \"canary\" splits HTTP traffic: only kind = \"http\" apps take it"
                    .into(),
            ),
            Strategy::Canary if self.steps.is_empty() => Err(
                "strategy = \"canary\" needs steps, e.g. steps = [{ weight = 10, pause = \"30s\" }, { weight = 50, pause = \"30s\" }]"
                    .into(),
            ),
            Strategy::Canary => {
                let mut last = 0;
                for s in &self.steps {
                    if s.weight == 0 || s.weight > 99 {
                        return Err(format!(
                            "step weight {} must be between 1 and 99 (100 is the promotion that follows the last step)",
                            s.weight
                        ));
                    }
                    if s.weight <= last {
                        return Err("step weights must increase".into());
                    }
                    last = s.weight;
                }
                if self.analysis.max_p99_ratio_pct < 100 {
                    return Err("analysis.max_p99_ratio must be at least 1.0".into());
                }
                if self.analysis.max_error_rate_increase_bp > 10_000 {
                    return Err("analysis.max_error_rate_increase must be at most 1.0".into());
                }
                Ok(())
            }
        }
    }

    pub fn is_default(&self) -> bool {
        self == &Rollout::default()
    }

    /// Replicas of the new revision a canary runs at `weight` percent of `replicas`:
    /// its share of the load, and at least one.
    pub fn canary_replicas(replicas: u32, weight: u8) -> u32 {
        (replicas * weight as u32).div_ceil(100).max(1)
    }
}

/// What changes an app's replica count besides `shoal scale`: load
/// (autoscaling) and time (windows on a schedule). Not part of the revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Scale {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleWindow>,
}

/// Replicas follow in-flight requests, as Knative's autoscaler does: the
/// average over `window_ms` decides, a tenth of it (the panic window) lets a
/// burst scale up at once, and scaling down waits out the whole window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    /// In-flight requests per replica to aim at.
    pub target_concurrency: u32,
    /// Requests per second per replica to aim at, besides concurrency; the
    /// larger of the two asks wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_rps: Option<u32>,
    pub window_ms: u64,
    /// With `min = 0`: how long without a request before the app has no replica.
    pub idle_ms: u64,
}

/// Bounds that apply while a window a cron schedule opens is open. `replicas =
/// N` in the file is `min = max = N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleWindow {
    pub name: String,
    /// When it opens: five cron fields (or six, seconds first).
    pub cron: String,
    /// IANA zone the cron fields are read in.
    pub timezone: String,
    /// How long it stays open; or else `end`, the cron schedule that closes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// `base` (min, max) as the windows of `schedule` that `open` says are open override it:
/// the largest min and the largest max of the open windows, as for an app's replicas
/// so for a node pool's nodes.
pub fn window_bounds(
    base: (u32, u32),
    schedule: &[ScheduleWindow],
    open: impl Fn(&ScheduleWindow) -> bool,
) -> Bounds {
    let (base_min, base_max) = base;
    let open: Vec<&ScheduleWindow> = schedule.iter().filter(|w| open(w)).collect();
    let min = open
        .iter()
        .map(|w| w.min.unwrap_or(base_min))
        .max()
        .unwrap_or(base_min);
    let max = open
        .iter()
        .map(|w| w.max.unwrap_or(base_max))
        .max()
        .unwrap_or(base_max);
    Bounds {
        min,
        max: max.max(min),
        windows: open.iter().map(|w| w.name.clone()).collect(),
    }
}

/// The replica bounds in force at one moment, and the windows that set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    /// Names of the open windows, in spec order.
    pub windows: Vec<String>,
}

impl Bounds {
    pub fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

impl ScheduleWindow {
    /// What is wrong with it, as (field under the window, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        crate::schedule::CronSchedule::parse(&self.cron, &self.timezone).map_err(|m| {
            let f = if m.starts_with("unknown time zone") {
                "timezone"
            } else {
                "cron"
            };
            (f, m)
        })?;
        match (&self.duration_ms, &self.end) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "duration",
                    "set one of duration (e.g. \"9h\") or end (a cron expression)".into(),
                ));
            }
            (Some(0), None) => return Err(("duration", "must be greater than 0".into())),
            (None, Some(end)) => {
                crate::schedule::CronSchedule::parse(end, &self.timezone)
                    .map_err(|m| ("end", m))?;
            }
            (Some(_), None) => {}
        }
        match (self.min, self.max) {
            (None, None) => Err((
                "min",
                "the window changes nothing: set min, max or replicas".into(),
            )),
            (Some(min), Some(max)) if min > max => {
                Err(("min", format!("min ({min}) is more than max ({max})")))
            }
            (_, Some(max)) if max > MAX_REPLICAS => {
                Err(("max", format!("must be at most {MAX_REPLICAS}")))
            }
            (Some(min), _) if min > MAX_REPLICAS => {
                Err(("min", format!("must be at most {MAX_REPLICAS}")))
            }
            _ => Ok(()),
        }
    }

    /// When the window is open at `now`: when it opened and when it closes.
    /// Only for windows that passed [`ScheduleWindow::check`].
    pub fn open_at(&self, now: crate::objects::Millis) -> Option<(u64, u64)> {
        use crate::schedule::{CronSchedule, WindowEnd, open_window};
        let start = CronSchedule::parse(&self.cron, &self.timezone).ok()?;
        let end = match (&self.duration_ms, &self.end) {
            (Some(d), _) => WindowEnd::After(*d),
            (None, Some(e)) => {
                WindowEnd::At(Box::new(CronSchedule::parse(e, &self.timezone).ok()?))
            }
            (None, None) => return None,
        };
        open_window(&start, &end, now)
    }

    /// When it next opens after `now`.
    pub fn next_open(&self, now: crate::objects::Millis) -> Option<u64> {
        crate::schedule::CronSchedule::parse(&self.cron, &self.timezone)
            .ok()?
            .next_after(now)
    }
}

impl Scale {
    pub fn is_default(&self) -> bool {
        self == &Scale::default()
    }

    /// Whether the autoscaler may take the app to zero for want of requests: its `min` is 0,
    /// or a window's is (not `replicas = 0`'s: that runs none, requests or not). Such an app
    /// wakes on a request, which gateways hold meanwhile.
    pub fn may_idle_to_zero(&self) -> bool {
        let idles = |w: &ScheduleWindow| w.min == Some(0) && w.max != Some(0);
        self.autoscale
            .as_ref()
            .is_some_and(|a| a.min == 0 || self.schedule.iter().any(idles))
    }

    /// The bounds at `now` for an app whose `replicas` is `replicas`.
    /// Without autoscaling the app's own bounds are `replicas` both ways. Open
    /// windows override them: each bound is the largest any open window gives
    /// (a window that leaves one unset gives the app's own), and if max ends
    /// below min, min wins, so the most capacity asked for is what runs.
    pub fn bounds(&self, replicas: u32, now: crate::objects::Millis) -> Bounds {
        self.bounds_with(replicas, |w| w.open_at(now).is_some())
    }

    /// [`Scale::bounds`] with the windows `open` says are open.
    pub fn bounds_with(&self, replicas: u32, open: impl Fn(&ScheduleWindow) -> bool) -> Bounds {
        let base = match &self.autoscale {
            Some(a) => (a.min, a.max),
            None => (replicas, replicas),
        };
        window_bounds(base, &self.schedule, open)
    }

    /// What is wrong with it, as (field, message).
    fn check(
        &self,
        kind: Kind,
        replicas: u32,
        max_concurrency: u32,
    ) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if kind == Kind::Job && !self.is_default() {
            return err(
                "scale",
                "a job runs to completion: autoscaling and schedule windows are for http and daemon apps".into(),
            );
        }
        if let Some(a) = &self.autoscale {
            if kind != Kind::Http {
                return err(
                    "scale",
                    "autoscaling follows HTTP load: only kind = \"http\" apps take min/max".into(),
                );
            }
            if a.max == 0 {
                return err("scale.max", "must be at least 1".into());
            }
            if a.max > MAX_REPLICAS {
                return err("scale.max", format!("must be at most {MAX_REPLICAS}"));
            }
            if a.min > a.max {
                return err(
                    "scale.min",
                    format!("min ({}) is more than max ({})", a.min, a.max),
                );
            }
            if a.target_concurrency == 0 || a.target_concurrency > max_concurrency {
                return err(
                    "scale.target_concurrency",
                    format!("must be between 1 and resources.max_concurrency ({max_concurrency})"),
                );
            }
            if a.target_rps == Some(0) {
                return err("scale.target_rps", "must be greater than 0".into());
            }
            if !(1_000..=3_600_000).contains(&a.window_ms) {
                return err("scale.window", "must be between 1s and 1h".into());
            }
            if a.idle_ms < 1_000 {
                return err("scale.idle", "must be at least 1s".into());
            }
            if replicas > a.max {
                return err(
                    "scale.replicas",
                    format!("{replicas} is more than max ({})", a.max),
                );
            }
        }
        for (i, w) in self.schedule.iter().enumerate() {
            if let Err((f, m)) = w.check() {
                return Err((format!("scale.schedule[{i}].{f}"), m));
            }
            if self.schedule[..i].iter().any(|o| o.name == w.name) {
                return Err((
                    format!("scale.schedule[{i}].name"),
                    format!("{:?} is used by another window", w.name),
                ));
            }
        }
        Ok(())
    }
}

/// An HTTP probe of a replica, run in process by its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Probe {
    pub path: String,
    pub period_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that flip it to failing.
    pub failure_threshold: u32,
    /// Consecutive successes that flip it to passing.
    pub success_threshold: u32,
}

/// Readiness gates traffic; liveness restarts a replica that keeps failing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

impl Health {
    pub fn is_default(&self) -> bool {
        self == &Health::default()
    }
}

/// What a job does when its run fails.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Never,
    OnFailure,
}

/// How a job runs: restart policy, retry limit and deadline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSpec {
    pub restart: Restart,
    /// Restarts allowed after failures (with `restart = "on-failure"`).
    pub retries: u32,
    /// Longest one run may take; past it the run fails as timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// What a job does when a run is due while earlier runs are still active, as
/// a Kubernetes CronJob's `concurrencyPolicy`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Concurrency {
    /// Start it beside them.
    #[default]
    Allow,
    /// Skip it.
    Forbid,
    /// Stop them and start it.
    Replace,
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Concurrency::Allow => "allow",
            Concurrency::Forbid => "forbid",
            Concurrency::Replace => "replace",
        })
    }
}

/// Finished runs kept, with their logs; older ones are deleted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct History {
    pub succeeded: u32,
    pub failed: u32,
}

/// Kubernetes' CronJob defaults.
impl Default for History {
    fn default() -> Self {
        History {
            succeeded: 3,
            failed: 1,
        }
    }
}

/// Most finished runs of one outcome a job keeps.
pub const MAX_HISTORY: u32 = 100;

/// When a job runs besides once per revision, and how its runs share time and
/// history, as a Kubernetes CronJob. Not part of the revision (when, not what
/// runs): changing it restarts nothing. `concurrency` and `history` also
/// govern the runs `shoal job run` starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRuns {
    /// Cron expression (five fields, or six with seconds first): a run starts
    /// at each firing instead of once per revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// IANA zone the schedule is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// A firing whose run could not start within this is skipped (`MissedRun`);
    /// none: the latest missed firing always starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline_ms: Option<u64>,
    #[serde(default)]
    pub history: History,
}

fn utc() -> String {
    "UTC".into()
}

impl Default for JobRuns {
    fn default() -> Self {
        JobRuns {
            schedule: None,
            timezone: utc(),
            concurrency: Concurrency::default(),
            starting_deadline_ms: None,
            history: History::default(),
        }
    }
}

impl JobRuns {
    pub fn is_default(&self) -> bool {
        self == &JobRuns::default()
    }

    /// The schedule, parsed; `None` without one. Only for specs that passed
    /// [`AppSpec::validate`].
    pub fn cron(&self) -> Option<crate::schedule::CronSchedule> {
        crate::schedule::CronSchedule::parse(self.schedule.as_deref()?, &self.timezone).ok()
    }

    /// `at` as a wall-clock time in the schedule's zone, for events.
    pub fn local_time(&self, at: crate::objects::Millis) -> String {
        use chrono::TimeZone;
        let tz: chrono_tz::Tz = self.timezone.parse().unwrap_or(chrono_tz::UTC);
        match i64::try_from(at)
            .ok()
            .and_then(|ms| tz.timestamp_millis_opt(ms).single())
        {
            Some(t) => t.format("%Y-%m-%d %H:%M:%S %Z").to_string(),
            None => format!("{at} ms"),
        }
    }

    /// What is wrong with it, as (field, message).
    fn check(&self, replicas: u32) -> Result<(), (&'static str, String)> {
        match &self.schedule {
            Some(expr) => {
                crate::schedule::CronSchedule::parse(expr, &self.timezone).map_err(|m| {
                    let f = if m.starts_with("unknown time zone") {
                        "job.timezone"
                    } else {
                        "job.schedule"
                    };
                    (f, m)
                })?;
                if replicas != 1 {
                    return Err((
                        "scale.replicas",
                        format!(
                            "a scheduled job starts one replica per run: replicas must be 1 (got {replicas})"
                        ),
                    ));
                }
            }
            None if self.timezone != utc() => {
                return Err((
                    "job.timezone",
                    "the time zone the schedule is read in: set schedule too".into(),
                ));
            }
            None if self.starting_deadline_ms.is_some() => {
                return Err((
                    "job.starting_deadline",
                    "only a scheduled run has a time to start by: set schedule too".into(),
                ));
            }
            None => {}
        }
        if self.starting_deadline_ms.is_some_and(|d| d < 1_000) {
            return Err(("job.starting_deadline", "must be at least 1s".into()));
        }
        if self.history.succeeded > MAX_HISTORY || self.history.failed > MAX_HISTORY {
            return Err((
                "job.history",
                format!("keeps at most {MAX_HISTORY} runs of each outcome"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ComponentSpec {
    /// `sha256:<hex>` of an uploaded module.
    pub digest: String,
    /// The OCI reference the module comes from (`oci = "…"` in the file): the control
    /// plane resolves it to `digest` at each apply, so a revision pins what the tag
    /// named then, and a moved tag shows as a changed digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// How strongly an app's replicas avoid sharing a node.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Nodes with fewer replicas of the app score higher, so one node going
    /// down takes as few of them as capacity allows.
    #[default]
    Preferred,
    /// At most one replica of the app per node; the rest stay Pending.
    Required,
}

/// Where an app's replicas may go. Not part of the revision, like scale:
/// it steers replicas placed from now on, and replicas never move.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Placement {
    /// Labels a node must all carry, with these values, to be eligible.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub spread: Spread,
}

impl Placement {
    /// So specs that never mention placement serialise as they always did.
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }
}

/// The most volumes one app may mount.
pub const MAX_VOLUMES: usize = 8;
/// A volume's size when its first spec does not say.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

/// `[[volumes]]`: a named volume of the app's namespace, given to the guest as a directory at
/// `mount` (a wasi:filesystem preopen). The volume is made by the first apply that names it, with
/// `size` as its limit (a spec that gives one sets it again; one that does not takes the
/// volume's as it is), and bound to the node of the first replica placed with it; replicas
/// that mount it are placed there from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    pub mount: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// The volume's size limit, in bytes, if the spec gives one; if not, the volume's as it
    /// is ([`DEFAULT_VOLUME_BYTES`] for one it makes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

impl VolumeMount {
    /// The size it gives the volume, or the size a volume it makes gets.
    pub fn size(&self) -> u64 {
        self.size_bytes.unwrap_or(DEFAULT_VOLUME_BYTES)
    }
}

/// A mount point: absolute, normalised (no `.`, `..` or empty segments), not `/` itself.
fn check_mount(mount: &str) -> Result<(), String> {
    let Some(rest) = mount.strip_prefix('/') else {
        return Err(format!("mount {mount:?} is not an absolute path"));
    };
    if rest.is_empty()
        || rest
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!(
            "mount {mount:?} must be a plain absolute path below / (no ., .. or empty segments)"
        ));
    }
    if mount.chars().any(char::is_control) || mount.len() > 256 {
        return Err(format!(
            "mount {mount:?}: at most 256 characters, none of them control characters"
        ));
    }
    Ok(())
}

/// Whether one of two mounts holds the other (or they are the same).
fn mounts_overlap(a: &str, b: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    within(a, b) || within(b, a)
}

/// The most `[config]` entries an app may have, and the most bytes all of them may take: they
/// ride in every snapshot to the nodes that run the app and in every instance.
pub const MAX_CONFIG_ENTRIES: usize = 1024;
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The most config sets one app may name.
pub const MAX_CONFIG_SETS: usize = 16;

/// A config set an app names, and the values the control plane filled in when it applied
/// the app (`None` until then: a spec as written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSetRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, String>>,
}

/// An env value or config key that is a key of a secret of the app's namespace: `{ secret =
/// "db", key = "password" }` in TOML. The control plane fills in the secret's version when it
/// applies the app, so each revision names the values it was made with; the values themselves
/// never enter a spec, a revision or a snapshot: a node asks for them when it starts a
/// replica that uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    pub secret: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl std::fmt::Display for SecretKeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "secret {} key {}", self.secret, self.key)?;
        match self.version {
            Some(v) => write!(f, " (version {v})"),
            None => Ok(()),
        }
    }
}

/// The secrets an app's `secret_env` and `secret_config` name, each once.
pub fn secrets_named<'a>(
    env: &'a BTreeMap<String, SecretKeyRef>,
    config: &'a BTreeMap<String, SecretKeyRef>,
) -> BTreeSet<&'a str> {
    env.values()
        .chain(config.values())
        .map(|r| r.secret.as_str())
        .collect()
}

/// `sets`' values in order, each over the one before, then `own` over them all.
fn merged_config(
    sets: &[ConfigSetRef],
    own: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut merged = BTreeMap::new();
    for set in sets {
        merged.extend(
            set.data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    merged.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
}

/// The facts about a replica an env value may ask for as `$(NAME)`, as Kubernetes' downward
/// API does: its node, its ID, its revision, its app and its namespace.
pub const DOWNWARD: [&str; 5] = ["node", "replica", "revision", "app", "namespace"];

/// A piece of an env value ([`env_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvPart<'a> {
    /// Text passed as written.
    Text(&'a str),
    /// `$(NAME)`: a fact about the replica, known ([`DOWNWARD`]) or not.
    Fact(&'a str),
    /// `$(config.KEY)`: the app's config value of KEY.
    Config(&'a str),
}

/// An env value's pieces, in order. As in Kubernetes, `$(NAME)` and `$(config.KEY)` are
/// references wherever they stand (`"$(app)-$(node)"`), `$$(` writes a `$(` that is text, and
/// a `$(` that makes no reference (`$(1 + 2)`, `$()`, no closing `)`) stays text. A name is
/// letters, digits, `_`, `-` and `.`; a config key anything up to the `)`. A reference that
/// resolves to nothing is refused when it is the whole value; within a longer one it is
/// passed as written, as Kubernetes passes it, and the apply warns ([`AppSpec::env_warnings`]).
pub fn env_parts(value: &str) -> Vec<EnvPart<'_>> {
    fn text<'a>(parts: &mut Vec<EnvPart<'a>>, t: &'a str) {
        if !t.is_empty() {
            parts.push(EnvPart::Text(t));
        }
    }
    let mut parts = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find("$(") {
        if rest[..at].ends_with('$') {
            text(&mut parts, &rest[..at - 1]);
            text(&mut parts, "$(");
            rest = &rest[at + 2..];
            continue;
        }
        let inner = &rest[at + 2..];
        let reference = inner
            .find(')')
            .and_then(|end| Some((env_reference(&inner[..end])?, end)));
        match reference {
            Some((part, end)) => {
                text(&mut parts, &rest[..at]);
                parts.push(part);
                rest = &inner[end + 1..];
            }
            None => {
                text(&mut parts, &rest[..at + 2]);
                rest = inner;
            }
        }
    }
    text(&mut parts, rest);
    parts
}

/// What `$(inner)` refers to, if it is a reference.
fn env_reference(inner: &str) -> Option<EnvPart<'_>> {
    if let Some(key) = inner.strip_prefix("config.") {
        return (!key.is_empty()).then_some(EnvPart::Config(key));
    }
    let plain = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    plain.then_some(EnvPart::Fact(inner))
}

/// `[config]` keys are 1 to 256 printable characters; all entries together stay within
/// [`MAX_CONFIG_ENTRIES`] and [`MAX_CONFIG_BYTES`].
pub fn check_config(config: &BTreeMap<String, String>) -> Result<(), String> {
    if config.len() > MAX_CONFIG_ENTRIES {
        return Err(format!(
            "{} entries: at most {MAX_CONFIG_ENTRIES}",
            config.len()
        ));
    }
    for key in config.keys() {
        if key.is_empty() || key.len() > 256 || key.chars().any(char::is_control) {
            return Err(format!(
                "{key:?} is not a valid key: 1 to 256 characters, none of them control characters"
            ));
        }
    }
    let bytes: usize = config.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_CONFIG_BYTES {
        return Err(format!(
            "{bytes} bytes of keys and values: at most {MAX_CONFIG_BYTES}"
        ));
    }
    Ok(())
}

/// A secret's keys follow the rule of `[config]` keys, since either may become the other.
pub fn check_secret_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 256 || key.chars().any(char::is_control) {
        return Err(format!(
            "{key:?} is not a valid secret key: 1 to 256 characters, none of them control characters"
        ));
    }
    Ok(())
}

/// Label keys and values in node selectors: short and plain, so they
/// compare exactly with what nodes register.
pub(crate) fn validate_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1 to 63 letters, digits, '.', '_', '/' or '-'"
        ))
    }
}

/// A validated, normalised app: what the API accepts and the store keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSpec {
    pub name: String,
    pub namespace: String,
    pub component: ComponentSpec,
    /// `[component] pull_secret`: the secret of the app's namespace with the credentials
    /// for `component.oci`'s registry. Used at apply, when the module is pulled, so it is
    /// not part of the revision: what runs is the pinned digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret: Option<String>,
    pub resources: Resources,
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `[config]`: what the guest reads through `wasi:config/store`, as `wasmtime serve
    /// -Sconfig` serves `-Sconfig-var`s, on top of `config_sets`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Named config sets of the app's namespace, merged in order under `config`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_sets: Vec<ConfigSetRef>,
    /// Env values that are secrets' keys (`[env] NAME = { secret, key }`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, SecretKeyRef>,
    /// Config keys whose values are secrets' keys, over `config` and the sets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_config: BTreeMap<String, SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
    /// Hosts a guest may call over plain HTTP besides other apps (which it
    /// reaches by service name without a grant), each an [`OutboundGrant`]:
    /// `HOST` (port 80) or `HOST:PORT`. Empty: no outbound network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// `[network] inbound`: the apps that may call this one by its service name, each a
    /// [`Caller`]; `None` is the apps of its namespace, `[]` none. Not part of the
    /// revision: who may call is the network's business, not the replica's, as with routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Vec<String>>,
    /// `[keyvalue] buckets`: the namespace's `wasi:keyvalue` buckets the guest may open.
    /// Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyvalue: Vec<String>,
    /// `[[volumes]]`: directories that outlive instances, on the node the volume is bound to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    /// A job's schedule, concurrency and history: from its `[job]` section,
    /// but kept out of `job` so that they are not part of the revision.
    #[serde(default, skip_serializing_if = "JobRuns::is_default")]
    pub runs: JobRuns,
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
    #[serde(default, skip_serializing_if = "Rollout::is_default")]
    pub rollout: Rollout,
    /// Autoscaling and scheduled windows. With autoscaling on, `replicas` is
    /// the size the controller last chose, as an HPA writes a Deployment's.
    #[serde(default, skip_serializing_if = "Scale::is_default")]
    pub scale: Scale,
}

/// What makes a revision: everything that changes what runs in a replica.
/// Scale and routes are not part of it, as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Template {
    pub component: ComponentSpec,
    pub resources: Resources,
    pub timeout_ms: u64,
    /// `[http] reuse`, `reuse_idle` and `reuse_concurrent`: how the replica's instances
    /// serve requests.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub reuse: u32,
    #[serde(
        default = "default_reuse_idle",
        skip_serializing_if = "is_default_reuse_idle"
    )]
    pub reuse_idle_ms: u64,
    #[serde(
        default = "default_reuse_concurrent",
        skip_serializing_if = "is_default_reuse_concurrent"
    )]
    pub reuse_concurrent: u32,
    pub env: BTreeMap<String, String>,
    /// Empty leaves the hash of a template made before `[config]` existed unchanged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// The sets with the values this revision was made with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_sets: Vec<ConfigSetRef>,
    /// Env values and config keys from secrets, each at the version this revision was made with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, SecretKeyRef>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_config: BTreeMap<String, SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// The `wasi:keyvalue` buckets granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyvalue: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
}

impl Template {
    /// The fields that differ from `old`, named as in the app spec
    /// (`component.digest`, `env.GREETING`, `resources.limits.memory`…): why a new
    /// revision was made. Env values may be secrets: only their names appear.
    pub fn changed_fields(&self, old: &Template) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut check = |changed: bool, name: &str| {
            if changed {
                out.push(name.to_string());
            }
        };
        check(
            self.component.digest != old.component.digest,
            "component.digest",
        );
        check(self.component.oci != old.component.oci, "component.oci");
        check(self.component.kind != old.component.kind, "component.kind");
        check(self.component.args != old.component.args, "component.args");
        let (new, was) = (&self.resources, &old.resources);
        check(
            new.requests.cpu_millis != was.requests.cpu_millis,
            "resources.requests.cpu",
        );
        check(
            new.requests.memory_bytes != was.requests.memory_bytes,
            "resources.requests.memory",
        );
        check(
            new.limits.cpu_millis != was.limits.cpu_millis,
            "resources.limits.cpu",
        );
        check(
            new.limits.memory_bytes != was.limits.memory_bytes,
            "resources.limits.memory",
        );
        check(
            self.resources.max_concurrency != old.resources.max_concurrency,
            "resources.max_concurrency",
        );
        check(self.timeout_ms != old.timeout_ms, "http.timeout");
        check(self.reuse != old.reuse, "http.reuse");
        check(self.reuse_idle_ms != old.reuse_idle_ms, "http.reuse_idle");
        check(
            self.reuse_concurrent != old.reuse_concurrent,
            "http.reuse_concurrent",
        );
        let names: BTreeSet<&String> = self.env.keys().chain(old.env.keys()).collect();
        for name in names {
            check(
                self.env.get(name) != old.env.get(name),
                &format!("env.{name}"),
            );
        }
        // A reference that only moved to a newer version of its secret is the secret's change,
        // not the spec's: said once per secret, after the rest.
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        let mut differs = |new: Option<&SecretKeyRef>, was: Option<&SecretKeyRef>| match (new, was)
        {
            (Some(n), Some(w)) if n.secret == w.secret && n.key == w.key => {
                if n.version != w.version
                    && let Some(v) = n.version
                {
                    versions.insert(n.secret.clone(), v);
                }
                false
            }
            (n, w) => n != w,
        };
        let names: BTreeSet<&String> = self
            .secret_env
            .keys()
            .chain(old.secret_env.keys())
            .collect();
        for name in names {
            check(
                differs(self.secret_env.get(name), old.secret_env.get(name)),
                &format!("env.{name}"),
            );
        }
        let (config, was) = (self.effective_config(), old.effective_config());
        for key in config.keys().chain(was.keys()).collect::<BTreeSet<_>>() {
            check(config.get(key) != was.get(key), &format!("config.{key}"));
        }
        let keys: BTreeSet<&String> = self
            .secret_config
            .keys()
            .chain(old.secret_config.keys())
            .collect();
        for key in keys {
            check(
                differs(self.secret_config.get(key), old.secret_config.get(key)),
                &format!("config.{key}"),
            );
        }
        check(
            !self
                .config_sets
                .iter()
                .map(|r| &r.name)
                .eq(old.config_sets.iter().map(|r| &r.name)),
            "config_sets",
        );
        check(self.outbound != old.outbound, "network.outbound");
        check(self.keyvalue != old.keyvalue, "keyvalue.buckets");
        check(self.volumes != old.volumes, "volumes");
        check(self.job != old.job, "job");
        check(self.health != old.health, "health");
        for (secret, version) in versions {
            check(true, &format!("secret {secret} (version {version})"));
        }
        out
    }

    /// What the guest reads: the sets' values in order, then `[config]` over them.
    pub fn effective_config(&self) -> BTreeMap<String, String> {
        merged_config(&self.config_sets, &self.config)
    }

    /// Stable content hash, so re-applying the same spec is recognised as unchanged.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("template serialises");
        hex::encode(Sha256::digest(json))[..16].to_string()
    }
}

impl AppSpec {
    /// This spec running `template` instead: what a rollback applies. Scale,
    /// routes and placement stay as they are now.
    pub fn with_template(&self, template: &Template) -> AppSpec {
        let mut spec = self.clone();
        spec.component = template.component.clone();
        spec.resources = template.resources.clone();
        spec.env = template.env.clone();
        spec.config = template.config.clone();
        spec.config_sets = template.config_sets.clone();
        spec.secret_env = template.secret_env.clone();
        spec.secret_config = template.secret_config.clone();
        spec.outbound = template.outbound.clone();
        spec.keyvalue = template.keyvalue.clone();
        spec.volumes = template.volumes.clone();
        spec.job = template.job.clone();
        spec.health = template.health.clone();
        if let Some(http) = &mut spec.http {
            http.timeout_ms = template.timeout_ms;
            http.reuse = template.reuse;
            http.reuse_idle_ms = template.reuse_idle_ms;
            http.reuse_concurrent = template.reuse_concurrent;
        }
        spec
    }

    /// Who may call the app by its service name: `[network] inbound` read, or its namespace.
    /// An entry that no longer reads (a spec stored before a rule) admits no one.
    pub fn inbound(&self) -> Inbound {
        match &self.inbound {
            None => Inbound::namespace(&self.namespace),
            Some(entries) => Inbound::new(
                entries
                    .iter()
                    .filter_map(|e| Caller::parse(e, &self.namespace).ok())
                    .collect(),
            ),
        }
    }

    pub fn template(&self) -> Template {
        Template {
            component: self.component.clone(),
            resources: self.resources.clone(),
            timeout_ms: self.http.as_ref().map_or(0, |h| h.timeout_ms),
            reuse: self.http.as_ref().map_or(1, |h| h.reuse),
            reuse_idle_ms: self
                .http
                .as_ref()
                .map_or(DEFAULT_REUSE_IDLE_MS, |h| h.reuse_idle_ms),
            reuse_concurrent: self
                .http
                .as_ref()
                .map_or(DEFAULT_REUSE_CONCURRENT, |h| h.reuse_concurrent),
            env: self.env.clone(),
            config: self.config.clone(),
            config_sets: self.config_sets.clone(),
            secret_env: self.secret_env.clone(),
            secret_config: self.secret_config.clone(),
            outbound: self.outbound.clone(),
            keyvalue: self.keyvalue.clone(),
            volumes: self.volumes.clone(),
            job: self.job.clone(),
            health: self.health.clone(),
        }
    }

    /// Checks every rule the TOML parser checks, for specs arriving as JSON.
    /// Every span of time the spec gives, with its field: each is added to clock readings,
    /// so none may be so long that a sum overflows.
    fn durations(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let http = self.http.iter().flat_map(|h| {
            [
                ("http.timeout", h.timeout_ms),
                ("http.reuse_idle", h.reuse_idle_ms),
            ]
        });
        let o = &self.rollout;
        let rollout = [
            ("rollout.progress_deadline", o.progress_deadline_ms),
            ("rollout.min_ready", o.min_ready_ms),
        ]
        .into_iter()
        .chain(
            o.steps
                .iter()
                .filter_map(|s| Some(("rollout.steps", s.pause_ms?))),
        );
        let scale = self
            .scale
            .autoscale
            .iter()
            .flat_map(|a| [("scale.window", a.window_ms), ("scale.idle", a.idle_ms)]);
        let windows = (self.scale.schedule.iter())
            .filter_map(|w| Some(("scale.schedule.duration", w.duration_ms?)));
        let job = (self
            .job
            .iter()
            .filter_map(|j| Some(("job.deadline", j.deadline_ms?))))
        .chain(
            self.runs
                .starting_deadline_ms
                .map(|d| ("job.starting_deadline", d)),
        );
        let probes = [
            ("health.readiness", &self.health.readiness),
            ("health.liveness", &self.health.liveness),
        ]
        .into_iter()
        .filter_map(|(f, p)| p.as_ref().map(|p| (f, p)))
        .flat_map(|(f, p)| [(f, p.period_ms), (f, p.timeout_ms)]);
        http.chain(rollout)
            .chain(scale)
            .chain(windows)
            .chain(job)
            .chain(probes)
    }

    /// Refuses a span of time past [`MAX_DURATION_MS`]. Checked on what clients send (a file,
    /// an apply), not in [`AppSpec::validate`]: a spec stored before the cap still reads.
    pub fn check_durations(&self) -> Result<(), SpecError> {
        match self.durations().find(|(_, ms)| *ms > MAX_DURATION_MS) {
            Some((f, ms)) => Err(SpecError::field(f, too_long(ms))),
            None => Ok(()),
        }
    }

    /// Why reference `part` of an env value resolves to nothing, if it does: an unknown fact,
    /// or a config key that neither `[config]` nor its config sets (`config`, merged, once
    /// `resolved`) nor its secrets' keys have.
    fn unresolved(
        &self,
        config: &BTreeMap<String, String>,
        resolved: bool,
        part: EnvPart<'_>,
    ) -> Option<String> {
        match part {
            EnvPart::Fact(fact) if !DOWNWARD.contains(&fact) => Some(format!(
                "asks for $({fact}), no known fact: $(node), $(replica), $(revision), $(app), $(namespace) or $(config.KEY) (write $$( for a $( that is text)"
            )),
            EnvPart::Config(key)
                if resolved
                    && !config.contains_key(key)
                    && !self.secret_config.contains_key(key) =>
            {
                Some(format!(
                    "asks for config key {key:?}, which neither [config] nor its config sets have"
                ))
            }
            EnvPart::Text(_) | EnvPart::Fact(_) | EnvPart::Config(_) => None,
        }
    }

    /// What an apply warns of in the env: references within a longer value that resolve to
    /// nothing, passed as written (a typo such as `"$(nodee)-x"`, or text meant as such).
    pub fn env_warnings(&self) -> Vec<String> {
        let resolved = self.config_sets.iter().all(|r| r.data.is_some());
        let config = merged_config(&self.config_sets, &self.config);
        let mut warnings = Vec::new();
        for (name, value) in &self.env {
            let parts = env_parts(value);
            if parts.len() < 2 {
                continue;
            }
            for part in parts {
                if let Some(why) = self.unresolved(&config, resolved, part) {
                    warnings.push(format!(
                        "env {name} = \"{value}\" {why}; it is passed as written"
                    ));
                }
            }
        }
        warnings
    }

    /// `[http] reuse_concurrent` set where it changes nothing, so the apply says so: with
    /// `reuse = 1` (an instance serves one request), or for a component served as WASIp2
    /// (`serves_p3` false: its instances serve one request at a time). `serves_p3` is `None`
    /// when the module's exports are not known.
    pub fn reuse_warnings(&self, serves_p3: Option<bool>) -> Vec<String> {
        let Some(http) = &self.http else {
            return Vec::new();
        };
        let n = http.reuse_concurrent;
        if n == DEFAULT_REUSE_CONCURRENT {
            return Vec::new();
        }
        let why = if http.reuse == 1 {
            "with reuse = 1 an instance serves one request: set reuse above 1 for instances that serve several at once"
        } else if serves_p3 == Some(false) {
            "the component is served as WASIp2, whose instances serve one request at a time; it applies to WASIp3 components (exporting wasi:http/handler@0.3)"
        } else {
            return Vec::new();
        };
        vec![format!("http.reuse_concurrent = {n} has no effect: {why}")]
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let field = |f: &str, m: String| Err(SpecError::field(f, m));
        if let Err(e) = validate_name(&self.name) {
            return field("name", e.to_string());
        }
        if let Err(e) = validate_name(&self.namespace) {
            return field("namespace", e.to_string());
        }
        if let Err(m) = validate_digest(&self.component.digest) {
            return field("component.digest", m);
        }
        if let Some(Err(m)) = self.component.oci.as_deref().map(crate::oci::OciRef::parse) {
            return field("component.oci", m);
        }
        if let Some(secret) = &self.pull_secret {
            if self.component.oci.is_none() {
                return field("component.pull_secret", PULL_SECRET_WITHOUT_OCI.into());
            }
            if let Err(e) = validate_name(secret) {
                return field("component.pull_secret", e.to_string());
            }
        }
        let r = &self.resources;
        let mem = crate::quantity::format_memory;
        if r.limits.memory_bytes < (1 << 20) || r.limits.memory_bytes > MAX_INSTANCE_MEMORY {
            return field(
                "resources.limits.memory",
                format!(
                    "must be between 1Mi and {}, the most one instance may use (got {})",
                    mem(MAX_INSTANCE_MEMORY),
                    mem(r.limits.memory_bytes)
                ),
            );
        }
        if r.requests.memory_bytes > r.limits.memory_bytes {
            return field(
                "resources.requests.memory",
                format!(
                    "{} is more than the limit ({}): a replica cannot need more than it may use",
                    mem(r.requests.memory_bytes),
                    mem(r.limits.memory_bytes)
                ),
            );
        }
        if r.limits.cpu_millis == Some(0) {
            return field("resources.limits.cpu", "must be greater than 0".into());
        }
        if let Some(limit) = r.limits.cpu_millis
            && r.requests.cpu_millis > limit
        {
            return field(
                "resources.requests.cpu",
                format!(
                    "{}m is more than the limit ({limit}m)",
                    r.requests.cpu_millis
                ),
            );
        }
        if r.max_concurrency == 0 || r.max_concurrency > MAX_CONCURRENCY {
            return field(
                "resources.max_concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
        if self.replicas > MAX_REPLICAS {
            return field("scale.replicas", format!("must be at most {MAX_REPLICAS}"));
        }
        if let Err((f, m)) = self
            .scale
            .check(self.component.kind, self.replicas, r.max_concurrency)
        {
            return field(&f, m);
        }
        match (&self.http, self.component.kind) {
            (Some(_), Kind::Job | Kind::Daemon) => {
                return field(
                    "http",
                    format!(
                        "only kind = \"http\" apps take an [http] section (this one is {:?})",
                        self.component.kind.to_string()
                    ),
                );
            }
            (None, Kind::Http) => {
                return field(
                    "http",
                    "kind = \"http\" apps carry http settings (parse fills in defaults)".into(),
                );
            }
            (Some(h), Kind::Http) => {
                let mut seen = std::collections::HashSet::new();
                for r in &h.routes {
                    if let Some(host) = &r.host
                        && let Err(m) = validate_host(host)
                    {
                        return field("http.routes", m);
                    }
                    if let Err(m) = validate_path(&r.path) {
                        return field("http.routes", m);
                    }
                    if !seen.insert(r) {
                        return field("http.routes", format!("route {r} is listed twice"));
                    }
                }
                if h.timeout_ms == 0 {
                    return field("http.timeout", "must be greater than 0".into());
                }
                if let Err(m) = check_reuse(h.reuse) {
                    return field("http.reuse", m);
                }
                if h.reuse_idle_ms == 0 {
                    return field("http.reuse_idle", "must be greater than 0".into());
                }
                if let Err(m) = check_reuse_concurrent(h.reuse_concurrent) {
                    return field("http.reuse_concurrent", m);
                }
                if let Some(tls) = &h.tls {
                    if let Err(e) = validate_name(&tls.secret) {
                        return field("http.tls", format!("secret name: {e}"));
                    }
                    if h.routes.iter().all(|r| r.host.is_none()) {
                        return field(
                            "http.tls",
                            "a certificate is presented for a host: bind a route to one, like \"shop.example.com/\"".into(),
                        );
                    }
                }
            }
            (None, _) => {}
        }
        if self.component.kind == Kind::Http && !self.component.args.is_empty() {
            return field(
                "component.args",
                "args are only passed to job and daemon apps".into(),
            );
        }
        for key in self.env.keys().chain(self.secret_env.keys()) {
            if key.is_empty() || key.contains(['=', '\0']) {
                return field(
                    "env",
                    format!("{key:?} is not a valid variable name (no '=' or NUL, not empty)"),
                );
            }
            if self.env.contains_key(key) && self.secret_env.contains_key(key) {
                return field("env", format!("{key} is both a value and a secret"));
            }
        }
        // An environment variable ends at its first NUL: the guest would get less, silently.
        if let Some(key) = self
            .env
            .iter()
            .find_map(|(k, v)| v.contains('\0').then_some(k))
        {
            return field(
                &format!("env.{key}"),
                "holds a NUL character, which no environment variable can".into(),
            );
        }
        if let Err(m) = check_config(&self.config) {
            return field("config", m);
        }
        if let Some(key) = self
            .secret_config
            .keys()
            .find(|k| self.config.contains_key(*k))
        {
            return field("config", format!("{key} is both a value and a secret"));
        }
        let keys: BTreeMap<String, String> = self
            .secret_config
            .keys()
            .map(|k| (k.clone(), String::new()))
            .collect();
        if let Err(m) = check_config(&keys) {
            return field("config", m);
        }
        for (what, refs) in [("env", &self.secret_env), ("config", &self.secret_config)] {
            for (name, r) in refs {
                if let Err(e) = validate_name(&r.secret) {
                    return field(what, format!("{name}: secret {:?}: {e}", r.secret));
                }
                if let Err(m) = check_secret_key(&r.key) {
                    return field(what, format!("{name}: {m}"));
                }
            }
        }
        let mut named = BTreeSet::new();
        for set in &self.config_sets {
            if let Err(e) = validate_name(&set.name) {
                return field("config_sets", format!("{:?}: {e}", set.name));
            }
            if !named.insert(&set.name) {
                return field("config_sets", format!("{} is named twice", set.name));
            }
        }
        if self.config_sets.len() > MAX_CONFIG_SETS {
            return field(
                "config_sets",
                format!("{} sets: at most {MAX_CONFIG_SETS}", self.config_sets.len()),
            );
        }
        // Until the control plane has filled in the sets' values, a key may be in one of them.
        let resolved = self.config_sets.iter().all(|r| r.data.is_some());
        let config = merged_config(&self.config_sets, &self.config);
        if resolved && let Err(m) = check_config(&config) {
            return field("config_sets", m);
        }
        for (name, value) in &self.env {
            let [part] = env_parts(value)[..] else {
                continue;
            };
            if let Some(why) = self.unresolved(&config, resolved, part) {
                return field("env", format!("{name} = \"{value}\" {why}"));
            }
        }
        if let Err(m) = self.rollout.check(self.component.kind) {
            return field("rollout", m);
        }
        if !self.health.is_default() && self.component.kind != Kind::Http {
            return field(
                "health",
                "health probes are HTTP requests: only kind = \"http\" apps take them".into(),
            );
        }
        for (name, probe) in [
            ("health.readiness", &self.health.readiness),
            ("health.liveness", &self.health.liveness),
        ] {
            if let Some(p) = probe {
                if let Err(m) = validate_path(&p.path) {
                    return field(name, m);
                }
                if p.period_ms == 0 || p.timeout_ms == 0 {
                    return field(name, "period and timeout must be greater than 0".into());
                }
                if p.failure_threshold == 0 || p.success_threshold == 0 {
                    return field(name, "thresholds must be at least 1".into());
                }
            }
        }
        if let Some(job) = &self.job {
            if self.component.kind != Kind::Job {
                return field(
                    "job",
                    format!(
                        "only kind = \"job\" apps take a [job] section (this one is {:?})",
                        self.component.kind.to_string()
                    ),
                );
            }
            if job.retries > 100 {
                return field("job.retries", "must be at most 100".into());
            }
            if job.deadline_ms == Some(0) {
                return field("job.deadline", "must be greater than 0".into());
            }
        }
        if !self.runs.is_default() && self.component.kind != Kind::Job {
            return field(
                "job",
                "schedules and run history are for kind = \"job\" apps".into(),
            );
        }
        if let Err((f, m)) = self.runs.check(self.replicas) {
            return field(f, m);
        }
        for grant in &self.outbound {
            if let Err(m) = OutboundGrant::parse(grant) {
                return field("network.outbound", m);
            }
        }
        if let Some(inbound) = &self.inbound {
            if self.component.kind != Kind::Http {
                return field(
                    "network.inbound",
                    "only http apps are called by name; a job or daemon takes no calls".into(),
                );
            }
            let mut callers = Vec::new();
            for entry in inbound {
                match Caller::parse(entry, &self.namespace) {
                    Ok(c) if callers.contains(&c) => {
                        return field("network.inbound", format!("{entry} is named twice"));
                    }
                    Ok(c) => callers.push(c),
                    Err(m) => return field("network.inbound", m),
                }
            }
        }
        let mut buckets = BTreeSet::new();
        for bucket in &self.keyvalue {
            if let Err(e) = validate_name(bucket) {
                return field("keyvalue.buckets", format!("{bucket:?}: {e}"));
            }
            if !buckets.insert(bucket) {
                return field("keyvalue.buckets", format!("{bucket} is named twice"));
            }
        }
        if self.volumes.len() > MAX_VOLUMES {
            return field(
                "volumes",
                format!("{} volumes: at most {MAX_VOLUMES}", self.volumes.len()),
            );
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if let Err(e) = validate_name(&v.name) {
                return field("volumes", format!("{:?}: {e}", v.name));
            }
            if let Err(m) = check_mount(&v.mount) {
                return field("volumes", format!("{}: {m}", v.name));
            }
            if v.size_bytes == Some(0) {
                return field("volumes", format!("{}: size must be more than 0", v.name));
            }
            for other in &self.volumes[..i] {
                if other.name == v.name {
                    return field("volumes", format!("{} is mounted twice", v.name));
                }
                if mounts_overlap(&other.mount, &v.mount) {
                    return field(
                        "volumes",
                        format!(
                            "{} at {} overlaps {} at {}",
                            v.name, v.mount, other.name, other.mount
                        ),
                    );
                }
                // The runtime keeps one writable volume's size limit per instance.
                if !other.read_only && !v.read_only {
                    return field(
                        "volumes",
                        format!(
                            "{} and {} are both writable: an app may write to one volume; mount the others read_only = true",
                            other.name, v.name
                        ),
                    );
                }
            }
        }
        if self.keyvalue.len() > crate::kv::MAX_BUCKETS {
            return field(
                "keyvalue.buckets",
                format!(
                    "{} buckets: at most {}",
                    self.keyvalue.len(),
                    crate::kv::MAX_BUCKETS
                ),
            );
        }
        for (key, value) in &self.placement.node_selector {
            if let Err(m) =
                validate_label("label", key).and_then(|()| validate_label("value", value))
            {
                return field("placement.node_selector", m);
            }
        }
        Ok(())
    }

    pub fn key(&self) -> AppKey {
        AppKey::new(&self.namespace, &self.name)
    }

    /// The most replicas the app may run at once by its own bounds, what a namespace quota
    /// counts ([`crate::quota`]): autoscaled, its max or a schedule window's largest bound;
    /// else its replicas, or more where a window's min raises them (a window's max only ever
    /// lowers a fixed size).
    pub fn most_replicas(&self) -> u32 {
        let windows = self.scale.schedule.iter();
        match &self.scale.autoscale {
            Some(a) => windows
                .flat_map(|w| [w.min, w.max])
                .flatten()
                .fold(a.max.max(self.replicas), u32::max),
            None => windows.filter_map(|w| w.min).fold(self.replicas, u32::max),
        }
    }
}

/// Namespace + name: how apps are addressed everywhere.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct AppKey {
    pub namespace: String,
    pub name: String,
}

impl AppKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        AppKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks `d` is a module digest (see [`crate::Digest`]), with the reason as the message.
pub fn validate_digest(d: &str) -> Result<(), String> {
    d.parse::<crate::Digest>()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Where the module of a parsed file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleRef {
    /// A local file, relative to the spec file's directory; the CLI uploads it.
    Path(PathBuf),
    /// An already uploaded module.
    Digest(String),
    /// A component in an OCI registry, which the control plane pulls at apply.
    Oci(String),
}

/// A parsed spec file: the spec plus where its module is. `spec.component.digest`
/// is empty until the module is resolved with [`AppManifest::resolve`].
#[derive(Debug, Clone)]
pub struct AppManifest {
    pub module: ModuleRef,
    spec: AppSpec,
}

impl AppManifest {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    /// Puts the app in `namespace` (`-n`, for a file that names none); checked at `resolve`.
    pub fn set_namespace(&mut self, namespace: &str) {
        self.spec.namespace = namespace.to_string();
    }

    /// The routes it serves: two apps applied together may not share one.
    pub fn routes(&self) -> &[Route] {
        self.spec.http.as_ref().map_or(&[], |h| &h.routes)
    }

    /// Completes the spec with the digest of the uploaded module.
    pub fn resolve(mut self, digest: String) -> Result<AppSpec, SpecError> {
        self.spec.component.digest = digest;
        self.spec.validate()?;
        Ok(self.spec)
    }

    /// The spec of a file whose module is an OCI reference, for the control plane
    /// to resolve: its digest is empty until then (see [`ComponentSpec::oci`]).
    pub fn unresolved(self) -> AppSpec {
        self.spec
    }
}

/// A spec error a user can act on: which field, and where in the file.
#[derive(Debug, Clone, Error, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecError {
    pub field: Option<String>,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl SpecError {
    pub fn field(field: &str, message: String) -> Self {
        SpecError {
            field: Some(field.to_string()),
            message,
            line: None,
            column: None,
        }
    }

    fn at(mut self, src: &str, span: Option<Range<usize>>) -> Self {
        if let Some(span) = span {
            let (line, column) = line_col(src, span.start);
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
    (line, column)
}

// The file format. Spanned fields let validation errors point at the value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    component: Spanned<RawComponent>,
    #[serde(default)]
    resources: RawResources,
    scale: Option<Spanned<RawScale>>,
    http: Option<Spanned<RawHttp>>,
    env: Option<Spanned<BTreeMap<String, RawValue>>>,
    config: Option<Spanned<BTreeMap<String, RawValue>>>,
    config_sets: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    placement: RawPlacement,
    network: Option<Spanned<RawNetwork>>,
    keyvalue: Option<Spanned<RawKeyValue>>,
    volumes: Option<Spanned<Vec<RawVolume>>>,
    job: Option<Spanned<RawJob>>,
    health: Option<Spanned<RawHealth>>,
    rollout: Option<Spanned<RawRollout>>,
}

/// An `[env]` or `[config]` value: text, or a key of a secret.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a secret's key as { secret = \"NAME\", key = \"KEY\" }"
)]
enum RawValue {
    Text(String),
    Secret(RawSecretRef),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretRef {
    secret: String,
    key: String,
}

/// `values` split into text values and secrets' keys.
fn split_values(
    values: Option<Spanned<BTreeMap<String, RawValue>>>,
) -> (BTreeMap<String, String>, BTreeMap<String, SecretKeyRef>) {
    let (mut text, mut secrets) = (BTreeMap::new(), BTreeMap::new());
    for (name, value) in values.map(Spanned::into_inner).unwrap_or_default() {
        match value {
            RawValue::Text(v) => {
                text.insert(name, v);
            }
            RawValue::Secret(r) => {
                secrets.insert(
                    name,
                    SecretKeyRef {
                        secret: r.secret,
                        key: r.key,
                        version: None,
                    },
                );
            }
        }
    }
    (text, secrets)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default)]
    strategy: Strategy,
    max_surge: Option<u32>,
    max_unavailable: Option<u32>,
    progress_deadline: Option<Spanned<String>>,
    min_ready: Option<Spanned<String>>,
    steps: Option<Vec<Spanned<RawStep>>>,
    analysis: Option<Spanned<RawAnalysis>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    weight: u8,
    pause: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    min_requests: Option<u64>,
    /// A fraction: 0.02 lets the canary fail two more requests in a hundred.
    max_error_rate_increase: Option<f64>,
    max_p99_ratio: Option<f64>,
}

fn rollout(src: &str, raw: &Spanned<RawRollout>) -> Result<Rollout, SpecError> {
    let r = raw.get_ref();
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };
    let progress_deadline_ms = match &r.progress_deadline {
        Some(d) => parse_duration_ms(d.get_ref())
            .map_err(|e| fail("rollout.progress_deadline", e.to_string(), d.span()))?,
        None => DEFAULT_PROGRESS_DEADLINE_MS,
    };
    let min_ready_ms = match &r.min_ready {
        Some(d) => parse_duration_ms(d.get_ref())
            .map_err(|e| fail("rollout.min_ready", e.to_string(), d.span()))?,
        None => 0,
    };
    let mut steps = Vec::new();
    for s in r.steps.iter().flatten() {
        let pause_ms = match &s.get_ref().pause {
            Some(p) => Some(
                parse_duration_ms(p).map_err(|e| fail("rollout.steps", e.to_string(), s.span()))?,
            ),
            None => None,
        };
        steps.push(CanaryStep {
            weight: s.get_ref().weight,
            pause_ms,
        });
    }
    let mut analysis = Analysis::default();
    if let Some(a) = &r.analysis {
        let ra = a.get_ref();
        let fraction = |v: f64, what: &str, max: f64| {
            if v.is_finite() && (0.0..=max).contains(&v) {
                Ok(v)
            } else {
                Err(fail(
                    "rollout.analysis",
                    format!("{what} must be between 0 and {max} (got {v})"),
                    a.span(),
                ))
            }
        };
        if let Some(n) = ra.min_requests {
            analysis.min_requests = n;
        }
        if let Some(v) = ra.max_error_rate_increase {
            analysis.max_error_rate_increase_bp =
                (fraction(v, "max_error_rate_increase", 1.0)? * 10_000.0).round() as u32;
        }
        if let Some(v) = ra.max_p99_ratio {
            analysis.max_p99_ratio_pct =
                (fraction(v, "max_p99_ratio", 100.0)? * 100.0).round() as u32;
        }
    }
    Ok(Rollout {
        strategy: r.strategy,
        max_surge: r.max_surge.unwrap_or(1),
        max_unavailable: r.max_unavailable.unwrap_or(0),
        progress_deadline_ms,
        min_ready_ms,
        steps,
        analysis,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    readiness: Option<Spanned<RawProbe>>,
    liveness: Option<Spanned<RawProbe>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    path: String,
    period: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    failure_threshold: Option<u32>,
    success_threshold: Option<u32>,
}

fn probe(src: &str, field: &'static str, raw: &Spanned<RawProbe>) -> Result<Probe, SpecError> {
    let r = raw.get_ref();
    let duration = |d: &Option<Spanned<String>>, default: u64| match d {
        Some(d) => parse_duration_ms(d.get_ref())
            .map_err(|e| SpecError::field(field, e.to_string()).at(src, Some(d.span()))),
        None => Ok(default),
    };
    Ok(Probe {
        path: r.path.clone(),
        period_ms: duration(&r.period, 1_000)?,
        timeout_ms: duration(&r.timeout, 1_000)?,
        failure_threshold: r.failure_threshold.unwrap_or(3),
        success_threshold: r.success_threshold.unwrap_or(1),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    #[serde(default)]
    restart: Restart,
    retries: Option<u32>,
    deadline: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    concurrency: Option<Spanned<Concurrency>>,
    starting_deadline: Option<Spanned<String>>,
    history: Option<Spanned<RawHistory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    succeeded: Option<u32>,
    failed: Option<u32>,
}

/// The scheduling half of a `[job]` section (see [`JobRuns`]).
fn job_runs(
    src: &str,
    raw: &RawJob,
    spans: &mut HashMap<&'static str, Range<usize>>,
) -> Result<JobRuns, SpecError> {
    for (name, v) in [
        ("job.schedule", &raw.schedule),
        ("job.timezone", &raw.timezone),
        ("job.starting_deadline", &raw.starting_deadline),
    ] {
        if let Some(v) = v {
            spans.insert(name, v.span());
        }
    }
    if let Some(h) = &raw.history {
        spans.insert("job.history", h.span());
    }
    let defaults = JobRuns::default();
    let starting_deadline_ms = match &raw.starting_deadline {
        Some(d) => Some(parse_duration_ms(d.get_ref()).map_err(|e| {
            SpecError::field("job.starting_deadline", e.to_string()).at(src, Some(d.span()))
        })?),
        None => None,
    };
    Ok(JobRuns {
        schedule: raw.schedule.as_ref().map(|s| s.get_ref().clone()),
        timezone: raw
            .timezone
            .as_ref()
            .map_or(defaults.timezone, |t| t.get_ref().clone()),
        concurrency: raw
            .concurrency
            .as_ref()
            .map_or(defaults.concurrency, |c| *c.get_ref()),
        starting_deadline_ms,
        history: History {
            succeeded: raw
                .history
                .as_ref()
                .and_then(|h| h.get_ref().succeeded)
                .unwrap_or(defaults.history.succeeded),
            failed: raw
                .history
                .as_ref()
                .and_then(|h| h.get_ref().failed)
                .unwrap_or(defaults.history.failed),
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    outbound: Option<Spanned<Vec<String>>>,
    inbound: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyValue {
    buckets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    mount: String,
    #[serde(default)]
    read_only: bool,
    size: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    path: Option<Spanned<String>>,
    digest: Option<Spanned<String>>,
    oci: Option<Spanned<String>>,
    pull_secret: Option<Spanned<String>>,
    kind: Spanned<Kind>,
    args: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    max_concurrency: Option<Spanned<u32>>,
    #[serde(default)]
    requests: RawQuantities,
    #[serde(default)]
    limits: RawQuantities,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuantities {
    cpu: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScale {
    replicas: Option<Spanned<u32>>,
    min: Option<Spanned<u32>>,
    max: Option<Spanned<u32>>,
    target_concurrency: Option<Spanned<u32>>,
    target_rps: Option<Spanned<u32>>,
    window: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    #[serde(default)]
    schedule: Vec<Spanned<RawWindow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    name: Option<Spanned<String>>,
    cron: Spanned<String>,
    timezone: Option<Spanned<String>>,
    duration: Option<Spanned<String>>,
    end: Option<Spanned<String>>,
    min: Option<Spanned<u32>>,
    max: Option<Spanned<u32>>,
    replicas: Option<Spanned<u32>>,
}

/// The `[scale]` section as the spec keeps it, plus the initial `replicas`.
fn scale(
    src: &str,
    raw: &Spanned<RawScale>,
    max_concurrency: u32,
    spans: &mut HashMap<&'static str, Range<usize>>,
) -> Result<(u32, Scale), SpecError> {
    let r = raw.get_ref();
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };
    let duration = |field: &str, d: &Spanned<String>| {
        parse_duration_ms(d.get_ref()).map_err(|e| fail(field, e.to_string(), d.span()))
    };
    spans.insert("scale", raw.span());
    for (name, v) in [
        ("scale.replicas", &r.replicas),
        ("scale.min", &r.min),
        ("scale.max", &r.max),
        ("scale.target_concurrency", &r.target_concurrency),
        ("scale.target_rps", &r.target_rps),
    ] {
        if let Some(v) = v {
            spans.insert(name, v.span());
        }
    }
    for (name, v) in [("scale.window", &r.window), ("scale.idle", &r.idle)] {
        if let Some(v) = v {
            spans.insert(name, v.span());
        }
    }
    let autoscaled = r.min.is_some()
        || r.max.is_some()
        || r.target_concurrency.is_some()
        || r.target_rps.is_some()
        || r.window.is_some()
        || r.idle.is_some();
    let value = |v: &Option<Spanned<u32>>| v.as_ref().map(|v| *v.get_ref());
    let (replicas, autoscale) = if autoscaled {
        if let Some(n) = &r.replicas {
            return Err(fail(
                "scale.replicas",
                "set replicas (a fixed size) or min/max (autoscaling), not both".into(),
                n.span(),
            ));
        }
        let Some(max) = value(&r.max) else {
            return Err(fail(
                "scale.max",
                "autoscaling needs max, the most replicas it may run".into(),
                raw.span(),
            ));
        };
        let min = value(&r.min).unwrap_or(1);
        // A window's `replicas = 0` is no idling: it runs none while open, requests or not.
        let window_min_zero = r.schedule.iter().any(|w| {
            let w = w.get_ref();
            value(&w.min) == Some(0) && value(&w.max) != Some(0)
        });
        if let Some(idle) = &r.idle
            && min != 0
            && !window_min_zero
        {
            return Err(fail(
                "scale.idle",
                format!(
                    "idle is how long an app with min = 0 (or a window's) waits before scaling to zero; this one has min = {min}"
                ),
                idle.span(),
            ));
        }
        let autoscale = Autoscale {
            min,
            max,
            target_concurrency: value(&r.target_concurrency)
                .unwrap_or((max_concurrency * 7 / 10).max(1)),
            target_rps: value(&r.target_rps),
            window_ms: match &r.window {
                Some(w) => duration("scale.window", w)?,
                None => DEFAULT_SCALE_WINDOW_MS,
            },
            idle_ms: match &r.idle {
                Some(i) => duration("scale.idle", i)?,
                None => DEFAULT_IDLE_MS,
            },
        };
        // A new app starts with one replica even when it may go to zero, so
        // that an apply ends with something serving.
        (min.max(1).min(max), Some(autoscale))
    } else {
        (value(&r.replicas).unwrap_or(1), None)
    };
    let schedule = windows(src, &r.schedule, "scale.schedule")?;
    Ok((
        replicas,
        Scale {
            autoscale,
            schedule,
        },
    ))
}

/// Why a span of time `ms` long is refused ([`MAX_DURATION_MS`]).
fn too_long(ms: u64) -> String {
    format!(
        "{} is longer than the longest a spec may say, 365d",
        crate::quantity::format_duration_ms(ms)
    )
}

/// `[[…schedule]]` windows as a spec keeps them; `field` names them in errors
/// (`scale.schedule` for an app, `schedule` for a pool).
fn windows(
    src: &str,
    raw: &[Spanned<RawWindow>],
    field: &str,
) -> Result<Vec<ScheduleWindow>, SpecError> {
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };
    // Checked here, where each value's place is known, what `AppSpec::validate` would
    // otherwise find with no more than the section's.
    let duration = |field: &str, d: &Spanned<String>| {
        let ms =
            parse_duration_ms(d.get_ref()).map_err(|e| fail(field, e.to_string(), d.span()))?;
        match ms > MAX_DURATION_MS {
            true => Err(fail(field, too_long(ms), d.span())),
            false => Ok(ms),
        }
    };
    let value = |v: &Option<Spanned<u32>>| v.as_ref().map(|v| *v.get_ref());
    let mut schedule: Vec<ScheduleWindow> = Vec::new();
    for (i, w) in raw.iter().enumerate() {
        let rw = w.get_ref();
        let (min, max) = match (&rw.replicas, value(&rw.min), value(&rw.max)) {
            (Some(n), None, None) => (Some(*n.get_ref()), Some(*n.get_ref())),
            (Some(n), _, _) => {
                return Err(fail(
                    &format!("{field}.replicas"),
                    "set replicas or min/max in a window, not both".into(),
                    n.span(),
                ));
            }
            (None, min, max) => (min, max),
        };
        let window = ScheduleWindow {
            name: rw
                .name
                .as_ref()
                .map_or_else(|| format!("schedule-{}", i + 1), |n| n.get_ref().clone()),
            cron: rw.cron.get_ref().clone(),
            timezone: rw
                .timezone
                .as_ref()
                .map_or_else(|| "UTC".to_string(), |t| t.get_ref().clone()),
            duration_ms: rw
                .duration
                .as_ref()
                .map(|d| duration(&format!("{field}[{i}].duration"), d))
                .transpose()?,
            end: rw.end.as_ref().map(|e| e.get_ref().clone()),
            min,
            max,
        };
        if let Err((f, m)) = window.check() {
            let span = match f {
                "cron" => Some(rw.cron.span()),
                "timezone" => rw.timezone.as_ref().map(Spanned::span),
                "duration" => rw.duration.as_ref().map(Spanned::span),
                "end" => rw.end.as_ref().map(Spanned::span),
                "min" => rw.min.as_ref().or(rw.replicas.as_ref()).map(Spanned::span),
                "max" => rw.max.as_ref().or(rw.replicas.as_ref()).map(Spanned::span),
                _ => None,
            };
            // `replicas = N` is min and max both: named as written.
            let f = match (f, &rw.replicas) {
                ("min" | "max", Some(_)) => "replicas",
                _ => f,
            };
            let at = format!("{field}[{i}].{f}");
            return Err(fail(&at, m, span.unwrap_or_else(|| w.span())));
        }
        if schedule.iter().any(|o| o.name == window.name) {
            let span = rw.name.as_ref().map_or_else(|| w.span(), Spanned::span);
            let m = format!("{:?} is used by another window", window.name);
            return Err(fail(&format!("{field}[{i}].name"), m, span));
        }
        schedule.push(window);
    }
    Ok(schedule)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    routes: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
    reuse: Option<Spanned<i64>>,
    reuse_idle: Option<Spanned<String>>,
    reuse_concurrent: Option<Spanned<i64>>,
    tls: Option<Spanned<String>>,
}

/// `[http] reuse`: 1 (a fresh instance per request) to [`MAX_REUSE`].
fn check_reuse(n: impl Into<i64>) -> Result<u32, String> {
    match u32::try_from(n.into()) {
        Ok(n @ 1..=MAX_REUSE) => Ok(n),
        _ => Err(format!(
            "must be 1 (a fresh instance per request) to {MAX_REUSE}"
        )),
    }
}

/// `[http] reuse_concurrent`: 1 to [`MAX_REUSE_CONCURRENT`].
fn check_reuse_concurrent(n: impl Into<i64>) -> Result<u32, String> {
    match u32::try_from(n.into()) {
        Ok(n @ 1..=MAX_REUSE_CONCURRENT) => Ok(n),
        _ => Err(format!("must be 1 to {MAX_REUSE_CONCURRENT}")),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    node_selector: Option<Spanned<BTreeMap<String, String>>>,
    spread: Option<Spanned<Spread>>,
}

/// Parses and validates an app spec file.
/// A file TOML cannot read (or whose fields do not fit), at its line and column.
fn toml_error(src: &str, e: toml::de::Error) -> SpecError {
    let mut message = e.message().trim().to_string();
    // toml says "duplicate key" and where; the key itself is what a reader looks for.
    if message.starts_with("duplicate") {
        let key = e.span().and_then(|span| src.get(span)).map(str::trim);
        if let Some(key) = key.filter(|k| !k.is_empty() && k.len() <= 128) {
            message = format!("{message} `{key}`");
        }
    }
    // serde names Rust's types ("integer `-1`, expected u32"); a reader wants the range.
    for (ty, range) in [
        ("u16", "0 to 65535"),
        ("u32", "0 to 4294967295"),
        ("u64", "0 to 18446744073709551615"),
    ] {
        if let Some(head) = message.strip_suffix(&format!("expected {ty}")) {
            message = format!(
                "{}expected a whole number from {range}",
                head.replace(" as i128", "")
            );
        }
    }
    // A field missing at the top is the whole file's fault: it names the field, not the key
    // the file happens to start with.
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    let field = match (missing, e.span()) {
        (Some(name), Some(span)) if span.start == 0 => Some(name),
        (_, span) => span.and_then(|span| field_at(src, span.start)),
    };
    // An unknown key is named by the message; the field is the table it was found in
    // (none at the top).
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (field, unknown) {
        (Some(f), Some(key)) if f == key => None,
        (Some(f), Some(key)) => Some(
            f.strip_suffix(key)
                .and_then(|t| t.strip_suffix('.'))
                .map_or(f.clone(), str::to_string),
        ),
        (f, _) => f,
    };
    SpecError {
        field,
        message,
        line: None,
        column: None,
    }
    .at(src, e.span())
}

/// The field written at byte `at` of a TOML file, as far as its lines say: the table header
/// above it and the key its line gives (`env.A` for `A = 1` under `[env]`), so an error TOML
/// finds in a value names what the value is for.
fn field_at(src: &str, at: usize) -> Option<String> {
    let before = src.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    let line = src[line_start..].lines().next().unwrap_or("");
    if let Some(header) = table_header(line) {
        return Some(header);
    }
    // A header that does not parse (`[resources`) is no field of the table above it.
    if line.trim_start().starts_with('[') {
        return None;
    }
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with(['[', '{', '#']));
    let table = before[..line_start].lines().rev().find_map(table_header);
    match (table, key) {
        (Some(table), Some(key)) => Some(format!("{table}.{key}")),
        (None, Some(key)) => Some(key.to_string()),
        (Some(table), None) => Some(table),
        (None, None) => None,
    }
}

/// The table a `[name]` or `[[name]]` line opens.
fn table_header(line: &str) -> Option<String> {
    let line = line.trim();
    let name = line.strip_prefix("[[").and_then(|l| l.split_once("]]"));
    let name = name.or_else(|| line.strip_prefix('[').and_then(|l| l.split_once(']')));
    name.map(|(name, _)| name.trim().to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    min: Option<u32>,
    max: u32,
    provider: Option<String>,
    cooldown: Option<Spanned<String>>,
    #[serde(default)]
    labels: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    node_args: Vec<String>,
    #[serde(default)]
    schedule: Vec<Spanned<RawWindow>>,
}

/// The cool-down of a pool that names none.
pub const DEFAULT_POOL_COOLDOWN_MS: u64 = 300_000;

/// A node pool's file (`shoal pool apply -f`): its name and spec, or what is wrong with
/// it, at its line and column.
pub fn parse_pool(src: &str) -> Result<(String, crate::PoolSpec), SpecError> {
    let raw: RawPool = toml::from_str(src).map_err(|e| toml_error(src, e))?;
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };
    validate_name(raw.name.get_ref()).map_err(|e| fail("name", e.to_string(), raw.name.span()))?;
    let cooldown_ms = match &raw.cooldown {
        Some(c) => {
            parse_duration_ms(c.get_ref()).map_err(|e| fail("cooldown", e.to_string(), c.span()))?
        }
        None => DEFAULT_POOL_COOLDOWN_MS,
    };
    let labels_span = raw.labels.as_ref().map(|l| l.span());
    let spec = crate::PoolSpec {
        min: raw.min.unwrap_or(0),
        max: raw.max,
        provider: raw.provider,
        cooldown_ms,
        labels: raw.labels.map(Spanned::into_inner).unwrap_or_default(),
        node_args: raw.node_args,
        schedule: windows(src, &raw.schedule, "schedule")?,
    };
    spec.validate().map_err(|m| match labels_span {
        Some(span) if m.starts_with("label") => fail("labels", m, span),
        _ => SpecError {
            field: None,
            message: m,
            line: None,
            column: None,
        },
    })?;
    Ok((raw.name.into_inner(), spec))
}

pub fn parse_app(src: &str) -> Result<AppManifest, SpecError> {
    let raw: RawApp = toml::from_str(src).map_err(|e| toml_error(src, e))?;
    // Where each field sits in the file, to place errors from `validate`.
    let mut spans: HashMap<&'static str, Range<usize>> = HashMap::new();
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };

    let c = raw.component.get_ref();
    let module = match (&c.path, &c.digest, &c.oci) {
        (Some(p), None, None) => ModuleRef::Path(PathBuf::from(p.get_ref())),
        (None, Some(d), None) => {
            validate_digest(d.get_ref()).map_err(|m| fail("component.digest", m, d.span()))?;
            ModuleRef::Digest(d.get_ref().clone())
        }
        (None, None, Some(o)) => {
            crate::oci::OciRef::parse(o.get_ref())
                .map_err(|m| fail("component.oci", m, o.span()))?;
            ModuleRef::Oci(o.get_ref().clone())
        }
        _ => {
            return Err(fail(
                "component",
                "set exactly one of `path` (a local .wasm file to upload), `digest` (an uploaded module) or `oci` (a component in an OCI registry)"
                    .into(),
                raw.component.span(),
            ));
        }
    };
    spans.insert("component.digest", raw.component.span());
    if let Some(secret) = &c.pull_secret {
        if c.oci.is_none() {
            return Err(fail(
                "component.pull_secret",
                PULL_SECRET_WITHOUT_OCI.into(),
                secret.span(),
            ));
        }
        validate_name(secret.get_ref())
            .map_err(|e| fail("component.pull_secret", e.to_string(), secret.span()))?;
    }
    if let Some(a) = &c.args {
        spans.insert("component.args", a.span());
    }
    spans.insert("name", raw.name.span());
    if let Some(ns) = &raw.namespace {
        spans.insert("namespace", ns.span());
    }
    if let Some(e) = &raw.env {
        spans.insert("env", e.span());
    }
    if let Some(c) = &raw.config {
        spans.insert("config", c.span());
    }
    if let Some(c) = &raw.config_sets {
        spans.insert("config_sets", c.span());
    }
    if let Some(s) = &raw.placement.node_selector {
        spans.insert("placement.node_selector", s.span());
    }

    let kind = *c.kind.get_ref();
    let mut memory = |field: &'static str, q: &Option<Spanned<String>>| match q {
        Some(m) => {
            spans.insert(field, m.span());
            parse_memory(m.get_ref())
                .map(Some)
                .map_err(|e| fail(field, e.to_string(), m.span()))
        }
        None => Ok(None),
    };
    let memory_limit = memory("resources.limits.memory", &raw.resources.limits.memory)?
        .unwrap_or(DEFAULT_MEMORY_LIMIT);
    let memory_request = memory("resources.requests.memory", &raw.resources.requests.memory)?
        .unwrap_or(DEFAULT_MEMORY_REQUEST.min(memory_limit));
    let mut cpu = |field: &'static str, q: &Option<Spanned<String>>| match q {
        Some(m) => {
            spans.insert(field, m.span());
            parse_cpu(m.get_ref())
                .map(Some)
                .map_err(|e| fail(field, e.to_string(), m.span()))
        }
        None => Ok(None),
    };
    let cpu_limit = cpu("resources.limits.cpu", &raw.resources.limits.cpu)?;
    // As in Kubernetes: a limit without a request requests the limit.
    let cpu_request = cpu("resources.requests.cpu", &raw.resources.requests.cpu)?
        .or(cpu_limit)
        .unwrap_or(0);
    let max_concurrency = match &raw.resources.max_concurrency {
        Some(m) => {
            spans.insert("resources.max_concurrency", m.span());
            *m.get_ref()
        }
        None if kind == Kind::Http => DEFAULT_MAX_CONCURRENCY,
        None => 1,
    };
    let (replicas, scale) = match &raw.scale {
        Some(s) => scale(src, s, max_concurrency, &mut spans)?,
        None => (1, Scale::default()),
    };
    let http = match &raw.http {
        Some(h) => {
            spans.insert("http", h.span());
            let hr = h.get_ref();
            if let Some(routes) = &hr.routes {
                spans.insert("http.routes", routes.span());
            }
            let mut routes = Vec::new();
            for r in hr.routes.iter().flat_map(|r| r.get_ref()) {
                routes
                    .push(Route::parse(r.get_ref()).map_err(|m| fail("http.routes", m, r.span()))?);
            }
            let timeout_ms = match &hr.timeout {
                Some(t) => {
                    spans.insert("http.timeout", t.span());
                    parse_duration_ms(t.get_ref())
                        .map_err(|e| fail("http.timeout", e.to_string(), t.span()))?
                }
                None => DEFAULT_TIMEOUT_MS,
            };
            let reuse = match &hr.reuse {
                Some(n) => {
                    spans.insert("http.reuse", n.span());
                    check_reuse(*n.get_ref()).map_err(|m| fail("http.reuse", m, n.span()))?
                }
                None => 1,
            };
            let reuse_idle_ms = match &hr.reuse_idle {
                Some(t) => {
                    spans.insert("http.reuse_idle", t.span());
                    match parse_duration_ms(t.get_ref()) {
                        Ok(0) => {
                            return Err(fail(
                                "http.reuse_idle",
                                "must be greater than 0".into(),
                                t.span(),
                            ));
                        }
                        Ok(ms) => ms,
                        Err(e) => return Err(fail("http.reuse_idle", e.to_string(), t.span())),
                    }
                }
                None => DEFAULT_REUSE_IDLE_MS,
            };
            let reuse_concurrent = match &hr.reuse_concurrent {
                Some(n) => {
                    spans.insert("http.reuse_concurrent", n.span());
                    check_reuse_concurrent(*n.get_ref())
                        .map_err(|m| fail("http.reuse_concurrent", m, n.span()))?
                }
                None => DEFAULT_REUSE_CONCURRENT,
            };
            let tls = match &hr.tls {
                Some(t) => {
                    spans.insert("http.tls", t.span());
                    Some(TlsRef {
                        secret: t.get_ref().clone(),
                        version: None,
                    })
                }
                None => None,
            };
            Some(HttpSpec {
                routes,
                timeout_ms,
                reuse,
                reuse_idle_ms,
                reuse_concurrent,
                tls,
            })
        }
        // No routes: reachable only by service name from other apps.
        None if kind == Kind::Http => Some(HttpSpec {
            routes: Vec::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            reuse: 1,
            reuse_idle_ms: DEFAULT_REUSE_IDLE_MS,
            reuse_concurrent: DEFAULT_REUSE_CONCURRENT,
            tls: None,
        }),
        None => None,
    };

    let mut volumes = Vec::new();
    if let Some(raw_volumes) = raw.volumes {
        spans.insert("volumes", raw_volumes.span());
        for v in raw_volumes.into_inner() {
            let size_bytes = match &v.size {
                Some(size) => Some(parse_memory(size.get_ref()).map_err(|e| {
                    SpecError::field("volumes", format!("{}: size: {e}", v.name))
                        .at(src, Some(size.span()))
                })?),
                None => None,
            };
            volumes.push(VolumeMount {
                name: v.name,
                mount: v.mount,
                read_only: v.read_only,
                size_bytes,
            });
        }
    }
    let (env, secret_env) = split_values(raw.env);
    let (config, secret_config) = split_values(raw.config);
    let spec = AppSpec {
        name: raw.name.into_inner(),
        namespace: raw
            .namespace
            .map_or_else(|| DEFAULT_NAMESPACE.to_string(), Spanned::into_inner),
        component: ComponentSpec {
            digest: match &module {
                ModuleRef::Digest(d) => d.clone(),
                ModuleRef::Path(_) | ModuleRef::Oci(_) => String::new(),
            },
            oci: match &module {
                ModuleRef::Oci(o) => Some(o.clone()),
                ModuleRef::Path(_) | ModuleRef::Digest(_) => None,
            },
            kind,
            args: c
                .args
                .as_ref()
                .map(|a| a.get_ref().clone())
                .unwrap_or_default(),
        },
        pull_secret: c.pull_secret.as_ref().map(|s| s.get_ref().clone()),
        resources: Resources {
            requests: Requests {
                cpu_millis: cpu_request,
                memory_bytes: memory_request,
            },
            limits: Limits {
                memory_bytes: memory_limit,
                cpu_millis: cpu_limit,
            },
            max_concurrency,
        },
        replicas,
        scale,
        http,
        env,
        config,
        secret_env,
        secret_config,
        config_sets: raw
            .config_sets
            .map(Spanned::into_inner)
            .unwrap_or_default()
            .into_iter()
            .map(|name| ConfigSetRef { name, data: None })
            .collect(),
        placement: Placement {
            node_selector: raw
                .placement
                .node_selector
                .map(Spanned::into_inner)
                .unwrap_or_default(),
            spread: raw
                .placement
                .spread
                .map(Spanned::into_inner)
                .unwrap_or_default(),
        },
        rollout: match &raw.rollout {
            Some(r) => {
                spans.insert("rollout", r.span());
                rollout(src, r)?
            }
            None => Rollout::default(),
        },
        health: match &raw.health {
            Some(h) => {
                spans.insert("health", h.span());
                let rh = h.get_ref();
                if let Some(p) = &rh.readiness {
                    spans.insert("health.readiness", p.span());
                }
                if let Some(p) = &rh.liveness {
                    spans.insert("health.liveness", p.span());
                }
                Health {
                    readiness: rh
                        .readiness
                        .as_ref()
                        .map(|p| probe(src, "health.readiness", p))
                        .transpose()?,
                    liveness: rh
                        .liveness
                        .as_ref()
                        .map(|p| probe(src, "health.liveness", p))
                        .transpose()?,
                }
            }
            None => Health::default(),
        },
        job: match &raw.job {
            Some(j) => {
                spans.insert("job", j.span());
                let rj = j.get_ref();
                let deadline_ms = match &rj.deadline {
                    Some(d) => Some(
                        parse_duration_ms(d.get_ref())
                            .map_err(|e| fail("job.deadline", e.to_string(), d.span()))?,
                    ),
                    None => None,
                };
                Some(JobSpec {
                    restart: rj.restart,
                    retries: rj.retries.unwrap_or(3),
                    deadline_ms,
                })
            }
            None => None,
        },
        runs: match &raw.job {
            Some(j) => job_runs(src, j.get_ref(), &mut spans)?,
            None => JobRuns::default(),
        },
        // Errors point at the list that holds the bad entry.
        outbound: match raw
            .network
            .as_ref()
            .and_then(|n| n.get_ref().outbound.as_ref())
        {
            Some(o) => {
                spans.insert("network.outbound", o.span());
                o.get_ref().clone()
            }
            None => Vec::new(),
        },
        inbound: match raw
            .network
            .as_ref()
            .and_then(|n| n.get_ref().inbound.as_ref())
        {
            Some(i) => {
                spans.insert("network.inbound", i.span());
                Some(i.get_ref().clone())
            }
            None => None,
        },
        keyvalue: match raw.keyvalue {
            Some(k) => {
                spans.insert("keyvalue.buckets", k.span());
                k.into_inner().buckets
            }
            None => Vec::new(),
        },
        volumes,
    };
    // The digest is checked once it is known; everything else is checked now.
    let mut probe = spec.clone();
    if probe.component.digest.is_empty() {
        probe.component.digest = format!("sha256:{}", "0".repeat(64));
    }
    if let Err(e) = probe.validate().and_then(|()| probe.check_durations()) {
        // The field's own place, else its section's (`rollout.steps` in `[rollout]`).
        let mut field = e.field.as_deref();
        let mut span = None;
        while let Some(f) = field {
            span = spans.get(f).cloned();
            if span.is_some() {
                break;
            }
            field = f.rsplit_once('.').map(|(section, _)| section);
        }
        return Err(e.at(src, span));
    }
    Ok(AppManifest { module, spec })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
name = "hello"

[component]
path = "hello.wasm"
kind = "http"

[resources]
limits = { memory = "32Mi" }
requests = { cpu = "50m" }
max_concurrency = 8

[scale]
replicas = 2

[http]
routes = ["/hello/", "api.example.com/v1"]
timeout = "5s"

[env]
B = "2"
A = "1"
"#;

    #[test]
    fn env_values_and_config_keys_may_be_secrets_keys_and_only_their_names_change() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let plain = parse_app(HELLO).unwrap().resolve(digest.clone()).unwrap();
        let src = format!(
            "{HELLO}PASSWORD = {{ secret = \"db\", key = \"password\" }}\nUSER = \"$(config.user)\"\n[config]\nuser = {{ secret = \"db\", key = \"user\" }}\nplain = \"x\"\n"
        );
        let mut spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        assert_eq!(spec.env.keys().collect::<Vec<_>>(), ["A", "B", "USER"]);
        let pw = &spec.secret_env["PASSWORD"];
        assert_eq!(
            (pw.secret.as_str(), pw.key.as_str(), pw.version),
            ("db", "password", None)
        );
        assert_eq!(spec.secret_config["user"].key, "user");
        assert_eq!(spec.config.keys().collect::<Vec<_>>(), ["plain"]);
        // A template without secrets hashes as before they existed.
        assert!(
            !serde_json::to_string(&plain.template())
                .unwrap()
                .contains("secret")
        );

        // A new version is a new revision, named by the secret and its version (see
        // `a_newer_secret_version_is_the_secrets_change_not_the_specs`).
        spec.secret_env.get_mut("PASSWORD").unwrap().version = Some(1);
        spec.secret_config.get_mut("user").unwrap().version = Some(1);
        let mut changed = spec.clone();
        changed.secret_env.get_mut("PASSWORD").unwrap().version = Some(2);
        changed.secret_config.get_mut("user").unwrap().version = Some(2);
        assert_eq!(
            changed.template().changed_fields(&spec.template()),
            ["secret db (version 2)"]
        );
        assert_eq!(changed.with_template(&spec.template()), spec);

        // The same name as a value and a secret (possible only in JSON) is refused.
        let mut both = spec.clone();
        both.env.insert("PASSWORD".into(), "x".into());
        assert_eq!(both.validate().unwrap_err().field.as_deref(), Some("env"));
        let mut both = spec.clone();
        both.config.insert("user".into(), "x".into());
        assert_eq!(
            both.validate().unwrap_err().field.as_deref(),
            Some("config")
        );
        let mut bad = spec.clone();
        bad.secret_env.get_mut("PASSWORD").unwrap().secret = "Not A Name".into();
        assert!(bad.validate().unwrap_err().to_string().contains("PASSWORD"));

        // A table that is not a secret's key says what is expected, and where.
        let wrong = format!("{HELLO}X = {{ secret = \"db\" }}\n");
        let e = parse_app(&wrong).unwrap_err();
        assert!(
            e.to_string()
                .contains("{ secret = \"NAME\", key = \"KEY\" }"),
            "{e}"
        );
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn config_is_part_of_the_revision_and_bad_keys_say_where() {
        let with = |table: &str| format!("{HELLO}\n[config]\n{table}\n");
        let digest = format!("sha256:{}", "a".repeat(64));
        let spec = parse_app(&with(
            "db_host = \"db.internal\"\n\"log.level\" = \"debug\"",
        ))
        .unwrap()
        .resolve(digest.clone())
        .unwrap();
        assert_eq!(spec.config["db_host"], "db.internal");
        assert_eq!(spec.config["log.level"], "debug");
        let changed = parse_app(&with(
            "db_host = \"db2.internal\"\n\"log.level\" = \"debug\"",
        ))
        .unwrap()
        .resolve(digest.clone())
        .unwrap();
        assert_eq!(
            changed.template().changed_fields(&spec.template()),
            ["config.db_host"]
        );
        assert_ne!(changed.template().hash(), spec.template().hash());
        // A rollback brings the old values back.
        assert_eq!(changed.with_template(&spec.template()).config, spec.config);
        // No `[config]` leaves a template's hash as it was before config existed.
        let plain = parse_app(HELLO).unwrap().resolve(digest.clone()).unwrap();
        assert!(
            !serde_json::to_string(&plain.template())
                .unwrap()
                .contains("config")
        );

        let e = parse_app(&with("\"\" = \"x\"")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("config"), "{e}");
        assert!(e.to_string().contains("line"), "{e}");
        let mut big = spec.clone();
        big.config
            .insert("huge".into(), "x".repeat(MAX_CONFIG_BYTES));
        assert_eq!(big.validate().unwrap_err().field.as_deref(), Some("config"));
        let e = parse_app(&with("n = 1")).unwrap_err();
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn config_sets_merge_in_order_under_the_apps_own_config() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = HELLO.replacen(
            "name = \"hello\"",
            "name = \"hello\"\nconfig_sets = [\"base\", \"site\"]",
            1,
        );
        let src = format!("{src}\n[config]\nmine = \"own\"\n");
        let mut spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        let names: Vec<_> = spec.config_sets.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["base", "site"]);
        assert!(
            spec.config_sets.iter().all(|r| r.data.is_none()),
            "as written"
        );
        let data = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        spec.config_sets[0].data = data(&[("a", "base"), ("b", "base"), ("mine", "base")]);
        spec.config_sets[1].data = data(&[("b", "site")]);
        let effective = spec.template().effective_config();
        let pairs: Vec<_> = effective
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "base"), ("b", "site"), ("mine", "own")]);

        // A set's new value is a new revision naming the key; its old values come back with
        // the old template.
        let mut changed = spec.clone();
        changed.config_sets[1].data = data(&[("b", "site v2")]);
        assert_eq!(
            changed.template().changed_fields(&spec.template()),
            ["config.b"]
        );
        assert_ne!(changed.template().hash(), spec.template().hash());
        assert_eq!(changed.with_template(&spec.template()), spec);
        // $(config.KEY) may name a key of a set, once its values are in.
        spec.env.insert("B".into(), "$(config.b)".into());
        assert!(spec.validate().is_ok());
        spec.env.insert("Z".into(), "$(config.z)".into());
        assert_eq!(spec.validate().unwrap_err().field.as_deref(), Some("env"));
        spec.config_sets[0].data = None;
        assert!(
            spec.validate().is_ok(),
            "unresolved: the control plane will judge"
        );

        let twice = src.replace("[\"base\", \"site\"]", "[\"base\", \"base\"]");
        let e = parse_app(&twice).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("config_sets"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn env_may_ask_for_a_config_value_and_only_one_that_exists() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!("{HELLO}\n[config]\ndb_host = \"db\"\n");
        let asks = src.replace("A = \"1\"", "A = \"$(config.db_host)\"");
        assert!(parse_app(&asks).unwrap().resolve(digest.clone()).is_ok());
        let missing = src.replace("A = \"1\"", "A = \"$(config.nope)\"");
        let e = parse_app(&missing).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("env"), "{e}");
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }

    /// An environment variable ends at a NUL: a value holding one is refused at its line.
    #[test]
    fn an_env_value_with_a_nul_is_refused() {
        let e = parse_app(&HELLO.replace("A = \"1\"", "A = \"cut\\u0000here\"")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("env.A"), "{e}");
        assert!(e.message.contains("NUL"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn env_may_ask_for_a_known_fact_only() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for fact in DOWNWARD {
            let asks = HELLO.replace("A = \"1\"", &format!("A = \"at $({fact})!\""));
            assert!(parse_app(&asks).unwrap().resolve(digest.clone()).is_ok());
        }
        let typo = HELLO.replace("A = \"1\"", "A = \"$(nodee)\"");
        let e = parse_app(&typo).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("env"), "{e}");
        assert!(
            e.to_string().contains("asks for $(nodee), no known fact"),
            "{e}"
        );
        assert!(e.to_string().contains("$(node)"), "{e}");
        assert!(e.line.is_some(), "{e}");
        // Within a longer value, one that resolves to nothing is passed as written, as
        // Kubernetes passes it (a spec stored before references went anywhere still reads),
        // and the apply warns of it.
        for (value, warned) in [
            ("$(node)-$(nodee)", Some("$(nodee), no known fact")),
            ("x$(config.k)", Some("config key \"k\"")),
            ("cost $(1 + 2)", None),
            ("$$(nodee)", None),
            ("$(node", None),
            ("$()", None),
        ] {
            let src = HELLO.replace("A = \"1\"", &format!("A = \"{value}\""));
            let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
            let warnings = spec.env_warnings();
            match warned {
                Some(why) => assert!(
                    warnings.len() == 1 && warnings[0].contains(why),
                    "{value}: {warnings:?}"
                ),
                None => assert!(warnings.is_empty(), "{value}: {warnings:?}"),
            }
        }
    }

    /// An error TOML finds in a value names the field: its table and its key.
    #[test]
    fn a_value_toml_refuses_is_named_by_its_table_and_key() {
        let src = HELLO.replace("A = \"1\"", "A = 1");
        let e = parse_app(&src).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("env.A"), "{e}");
        assert!(e.line.is_some(), "{e}");
        let src = "name = \"x\"\n[[volumes]]\nname = \"v\"\nsize = 7\n";
        assert_eq!(
            field_at(src, src.find('7').unwrap()).as_deref(),
            Some("volumes.size")
        );
        assert_eq!(field_at(src, 0).as_deref(), Some("name"));
        let src = "[env]\n# A comment = no key\n";
        assert_eq!(
            field_at(src, src.find('#').unwrap()).as_deref(),
            Some("env")
        );
    }

    #[test]
    fn env_values_are_text_and_references_anywhere_in_them() {
        use EnvPart::{Config, Fact, Text};
        let cases: [(&str, &[EnvPart]); 10] = [
            ("plain", &[Text("plain")]),
            ("", &[]),
            ("$(node)", &[Fact("node")]),
            ("$(config.a.b)", &[Config("a.b")]),
            ("pre-$(node)", &[Text("pre-"), Fact("node")]),
            ("$(node)-$(app)", &[Fact("node"), Text("-"), Fact("app")]),
            (
                "x$(config.my key)y",
                &[Text("x"), Config("my key"), Text("y")],
            ),
            (
                "$$(node) is $(node)",
                &[Text("$("), Text("node) is "), Fact("node")],
            ),
            ("$(1 + 2) $()", &[Text("$("), Text("1 + 2) $("), Text(")")]),
            ("a$(b", &[Text("a$("), Text("b")]),
        ];
        for (value, parts) in cases {
            assert_eq!(env_parts(value), parts, "{value}");
        }
    }

    #[test]
    fn parses_and_normalises() {
        let m = parse_app(HELLO).unwrap();
        assert_eq!(m.module, ModuleRef::Path("hello.wasm".into()));
        let spec = m.resolve(format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.resources.limits.memory_bytes, 32 << 20);
        assert_eq!(spec.resources.requests.cpu_millis, 50);
        assert_eq!(spec.resources.requests.memory_bytes, DEFAULT_MEMORY_REQUEST);
        assert_eq!(spec.resources.limits.cpu_millis, None);
        assert_eq!(spec.replicas, 2);
        let http = spec.http.as_ref().unwrap();
        assert_eq!(
            http.routes[0],
            Route {
                host: None,
                path: "/hello".into()
            }
        );
        assert_eq!(
            http.routes[1],
            Route {
                host: Some("api.example.com".into()),
                path: "/v1".into()
            }
        );
        assert_eq!(http.timeout_ms, 5000);
        assert_eq!(spec.env.keys().collect::<Vec<_>>(), ["A", "B"]);
    }

    #[test]
    fn defaults() {
        let src = format!(
            "name = \"j\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n",
            "b".repeat(64)
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "b".repeat(64)))
            .unwrap();
        assert_eq!(spec.resources.limits.memory_bytes, DEFAULT_MEMORY_LIMIT);
        assert_eq!(spec.resources.requests.memory_bytes, DEFAULT_MEMORY_REQUEST);
        assert_eq!(spec.resources.requests.cpu_millis, 0);
        assert_eq!(spec.resources.max_concurrency, 1);
        assert_eq!(spec.replicas, 1);
        assert!(spec.http.is_none());
    }

    #[test]
    fn same_meaning_same_template_hash() {
        let a = parse_app(HELLO)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        let reordered = HELLO.replace("B = \"2\"\nA = \"1\"", "A = \"1\"\nB = \"2\"");
        let b = parse_app(&reordered)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(a.template().hash(), b.template().hash());
        let scaled = HELLO.replace("replicas = 2", "replicas = 5");
        let c = parse_app(&scaled)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(
            a.template().hash(),
            c.template().hash(),
            "scale is not a revision"
        );
        let env = HELLO.replace("A = \"1\"", "A = \"9\"");
        let d = parse_app(&env)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_ne!(a.template().hash(), d.template().hash());
    }

    #[test]
    fn a_templates_changes_are_named_as_in_the_spec() {
        let spec = |src: &str| {
            parse_app(src)
                .unwrap()
                .resolve(format!("sha256:{}", "a".repeat(64)))
                .unwrap()
                .template()
        };
        let old = spec(HELLO);
        assert!(old.changed_fields(&old).is_empty());
        let new = spec(
            &HELLO
                .replace("memory = \"32Mi\"", "memory = \"64Mi\"")
                .replace("A = \"1\"", "C = \"3\"")
                .replace("timeout = \"5s\"", "timeout = \"9s\""),
        );
        assert_eq!(
            new.changed_fields(&old),
            ["resources.limits.memory", "http.timeout", "env.A", "env.C"]
        );
        // Scale and routes are not the template's.
        let rescaled = spec(&HELLO.replace("replicas = 2", "replicas = 5"));
        assert!(rescaled.changed_fields(&old).is_empty());
    }

    fn err(src: &str) -> SpecError {
        parse_app(src).expect_err("spec should be rejected")
    }

    #[test]
    fn malformed_toml_has_line_and_column() {
        let e = err("name = \"x\"\n[component\nkind = \"http\"\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.column.is_some());
        // A header left open is no field of the table above it.
        let e = err("name = \"x\"\n[component]\nkind = \"http\"\n[resources\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(4), None), "{e}");
    }

    #[test]
    fn a_duplicate_key_or_table_is_named() {
        let e = err("name = \"x\"\nname = \"y\"\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (Some(2), "duplicate key `name`")
        );
        let e = err("name = \"x\"\n[http]\nroutes = []\n[http]\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.ends_with("`http`"), "{e}");
    }

    /// An unknown key is placed in the table it was found in, whether it opens a table of
    /// its own or sits under one: the message names the key, the field its table.
    #[test]
    fn an_unknown_key_is_named_in_its_own_table() {
        let at = |src: &str| {
            let e = err(src);
            assert!(e.message.starts_with("unknown field"), "{e}");
            (e.field, e.line)
        };
        let top = "name = \"x\"\n[http]\nroutes = [\"/\"]\n[scalee]\nreplicas = 3\n";
        assert_eq!(at(top), (None, Some(4)));
        let top_key = "name = \"x\"\nscalee = 3\n[http]\nroutes = [\"/\"]\n";
        assert_eq!(at(top_key), (None, Some(2)));
        let nested =
            "name = \"x\"\n[component]\nkind = \"http\"\n[http]\nroutes = [\"/\"]\nreuze = 2\n";
        assert_eq!(at(nested), (Some("http".into()), Some(6)));
        let sub = "name = \"x\"\n[http]\nroutes = [\"/\"]\n[resources.limitz]\ncpu = \"1\"\n";
        assert_eq!(at(sub), (Some("resources".into()), Some(4)));
    }

    #[test]
    fn a_number_out_of_range_says_the_range() {
        for n in ["-1", "4294967296", "99999999999999999999"] {
            let e = err(&HELLO.replace("max_concurrency = 8", &format!("max_concurrency = {n}")));
            assert!(
                e.message.ends_with(&format!(
                    "`{n}`, expected a whole number from 0 to 4294967295"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let src = HELLO.replace(
            "max_concurrency = 8",
            "max_concurrency = 8\nmemroy = \"1Mi\"",
        );
        let e = err(&src);
        assert!(e.message.contains("memroy"), "{e}");
        assert_eq!(e.line, Some(12), "{e}");
    }

    #[test]
    fn a_tls_secret_serves_the_apps_route_hosts_and_is_no_part_of_a_revision() {
        let with_tls = HELLO.replace("timeout = \"5s\"", "timeout = \"5s\"\ntls = \"api-cert\"");
        let digest = format!("sha256:{}", "a".repeat(64));
        let spec = parse_app(&with_tls)
            .unwrap()
            .resolve(digest.clone())
            .unwrap();
        let tls = spec.http.as_ref().unwrap().tls.clone().unwrap();
        assert_eq!((tls.secret.as_str(), tls.version), ("api-cert", None));
        let plain = parse_app(HELLO).unwrap().resolve(digest).unwrap();
        assert_eq!(spec.template(), plain.template());

        let e = err(&with_tls.replace("\"api-cert\"", "\"Api_Cert\""));
        assert_eq!(e.field.as_deref(), Some("http.tls"), "{e}");
        let hostless = with_tls.replace("\"api.example.com/v1\"", "\"/v1\"");
        let e = err(&hostless);
        assert_eq!(e.field.as_deref(), Some("http.tls"), "{e}");
        assert!(e.message.contains("bind a route"), "{e}");
    }

    #[test]
    fn invalid_name_names_the_field() {
        let e = err(&HELLO.replace("name = \"hello\"", "name = \"Hello_World\""));
        assert_eq!(e.field.as_deref(), Some("name"));
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("lowercase"), "{e}");
    }

    #[test]
    fn bad_quantities_and_routes() {
        let e = err(&HELLO.replace("\"32Mi\"", "\"32MB\""));
        assert_eq!(e.field.as_deref(), Some("resources.limits.memory"));
        assert_eq!(e.line, Some(9));
        let e = err(&HELLO.replace("\"/hello/\"", "\"hello\""));
        assert_eq!(e.field.as_deref(), Some("http.routes"), "{e}");
        let e = err(&HELLO.replace("\"/hello/\"", "\"/a/../b\""));
        assert_eq!(e.field.as_deref(), Some("http.routes"));
        let e = err(&HELLO.replace("\"5s\"", "\"5\""));
        assert_eq!(e.field.as_deref(), Some("http.timeout"));
        let e = err(&HELLO.replace("\"32Mi\"", "\"64Gi\""));
        assert_eq!(e.field.as_deref(), Some("resources.limits.memory"));
        assert_eq!(e.line, Some(9));
    }

    /// One instance may use at most the node's memory slot: a larger limit is refused at
    /// apply, naming the field and the maximum, from TOML and from JSON alike.
    #[test]
    fn instance_memory_above_the_cluster_maximum_is_refused() {
        assert_eq!(MAX_INSTANCE_MEMORY, 512 << 20);
        let at_max = parse_app(&HELLO.replace("\"32Mi\"", "\"512Mi\"")).unwrap();
        let spec = at_max
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(spec.resources.limits.memory_bytes, MAX_INSTANCE_MEMORY);

        let e = err(&HELLO.replace("\"32Mi\"", "\"513Mi\""));
        assert_eq!(e.field.as_deref(), Some("resources.limits.memory"));
        assert_eq!(e.line, Some(9));
        assert!(
            e.message.contains(
                "must be between 1Mi and 512Mi, the most one instance may use (got 513Mi)"
            ),
            "{e}"
        );

        let mut json = spec;
        json.resources.limits.memory_bytes = 1 << 30;
        let e = json.validate().unwrap_err();
        assert_eq!(e.field.as_deref(), Some("resources.limits.memory"));
        assert!(e.message.contains("(got 1Gi)"), "{e}");
    }

    #[test]
    fn reuse_is_part_of_the_revision_and_absent_when_off() {
        let resolve = |src: &str| {
            parse_app(src)
                .unwrap()
                .resolve(format!("sha256:{}", "a".repeat(64)))
                .unwrap()
        };
        let plain = resolve(HELLO);
        let http = plain.http.as_ref().unwrap();
        assert_eq!((http.reuse, http.reuse_idle_ms), (1, DEFAULT_REUSE_IDLE_MS));
        // Revisions made before reuse existed keep their hash: the fields are left out.
        let json = serde_json::to_string(&plain.template()).unwrap();
        assert!(!json.contains("reuse"), "{json}");

        let reusing = resolve(&HELLO.replace(
            "timeout = \"5s\"",
            "timeout = \"5s\"\nreuse = 128\nreuse_idle = \"1m\"",
        ));
        let t = reusing.template();
        assert_eq!((t.reuse, t.reuse_idle_ms), (128, 60_000));
        assert_eq!(
            t.changed_fields(&plain.template()),
            ["http.reuse", "http.reuse_idle"]
        );
        assert_eq!(plain.with_template(&t).http.unwrap().reuse, 128);
        let back: Template = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.reuse, 1,
            "a stored template without the field reads as off"
        );

        let e = err(&HELLO.replace("timeout = \"5s\"", "reuse = 0"));
        assert_eq!(e.field.as_deref(), Some("http.reuse"));
        assert_eq!(e.line, Some(18));

        let concurrent = resolve(&HELLO.replace(
            "timeout = \"5s\"",
            "timeout = \"5s\"\nreuse = 128\nreuse_concurrent = 4",
        ));
        let c = concurrent.template();
        assert_eq!(
            (c.reuse_concurrent, t.reuse_concurrent),
            (4, DEFAULT_REUSE_CONCURRENT)
        );
        assert_eq!(
            c.changed_fields(&t),
            ["http.reuse_idle", "http.reuse_concurrent"]
        );
        let e = err(&HELLO.replace("timeout = \"5s\"", "reuse_concurrent = 1001"));
        assert_eq!(e.field.as_deref(), Some("http.reuse_concurrent"));
        assert_eq!(e.line, Some(18));
    }

    /// `reuse_concurrent` where it changes nothing is applied, with a warning saying why.
    #[test]
    fn reuse_concurrent_that_changes_nothing_is_warned_of() {
        let with = |http: &str| resolve(&HELLO.replace("timeout = \"5s\"", http));
        let lone = with("reuse_concurrent = 4").reuse_warnings(Some(true));
        assert!(
            lone.len() == 1 && lone[0].contains("with reuse = 1"),
            "{lone:?}"
        );
        let reused = with("reuse = 128\nreuse_concurrent = 4");
        assert_eq!(reused.reuse_warnings(Some(true)), Vec::<String>::new());
        assert_eq!(reused.reuse_warnings(None), Vec::<String>::new());
        let p2 = reused.reuse_warnings(Some(false));
        assert!(p2.len() == 1 && p2[0].contains("WASIp2"), "{p2:?}");
        // Not set: nothing to say.
        let default = with("reuse = 128");
        assert_eq!(default.reuse_warnings(Some(false)), Vec::<String>::new());
    }

    /// A secret reference moved to a newer version is said as the secret's change, once,
    /// not as every env variable and config key that names it.
    #[test]
    fn a_newer_secret_version_is_the_secrets_change_not_the_specs() {
        let spec = parse_app(HELLO)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        let at = |version: u64, key: &str| SecretKeyRef {
            secret: "db".into(),
            key: key.into(),
            version: Some(version),
        };
        let mut old = spec.template();
        old.secret_env
            .insert("DB_PASSWORD".into(), at(4, "password"));
        old.secret_config
            .insert("password".into(), at(4, "password"));
        let mut new = old.clone();
        new.secret_env
            .insert("DB_PASSWORD".into(), at(5, "password"));
        new.secret_config
            .insert("password".into(), at(5, "password"));
        assert_eq!(new.changed_fields(&old), ["secret db (version 5)"]);
        // Another key of it is the spec's change.
        new.secret_env.insert("DB_PASSWORD".into(), at(5, "user"));
        assert_eq!(
            new.changed_fields(&old),
            ["env.DB_PASSWORD", "secret db (version 5)"]
        );
    }

    /// A section missing from the file is named as the field at fault, not the first key.
    #[test]
    fn a_missing_section_is_the_field_at_fault() {
        let src = "name = \"hello\"\n\n[http]\nroutes = [\"/hello\"]\n";
        let e = parse_app(src).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("component"), "{e}");
        assert!(e.message.contains("missing field `component`"), "{e}");
    }

    #[test]
    fn kind_and_sections_must_agree() {
        let e = err(&HELLO.replace("kind = \"http\"", "kind = \"job\""));
        assert_eq!(e.field.as_deref(), Some("http"));
        // Without routes an http app is a service other apps call by name.
        let no_http = HELLO.split("[http]").next().unwrap().to_string();
        let spec = parse_app(&no_http)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        let http = spec.http.unwrap();
        assert!(http.routes.is_empty());
        assert_eq!(http.timeout_ms, DEFAULT_TIMEOUT_MS);
        let e = err(&HELLO.replace("kind = \"http\"", "kind = \"lambda\""));
        assert!(
            e.message.contains("lambda") || e.message.contains("variant"),
            "{e}"
        );
    }

    #[test]
    fn path_xor_digest() {
        let both = HELLO.replace(
            "path = \"hello.wasm\"",
            &format!("path = \"x.wasm\"\ndigest = \"sha256:{}\"", "a".repeat(64)),
        );
        assert_eq!(err(&both).field.as_deref(), Some("component"));
        let bad = HELLO.replace("path = \"hello.wasm\"", "digest = \"md5:abc\"");
        assert_eq!(err(&bad).field.as_deref(), Some("component.digest"));
    }

    #[test]
    fn oci_reference_is_kept_for_the_control_plane_to_resolve() {
        let src = HELLO.replace(
            "path = \"hello.wasm\"",
            "oci = \"registry.example.com/team/hello:1.2.0\"",
        );
        let m = parse_app(&src).unwrap();
        assert_eq!(
            m.module,
            ModuleRef::Oci("registry.example.com/team/hello:1.2.0".into())
        );
        let spec = m.unresolved();
        assert_eq!(spec.component.digest, "");
        assert_eq!(
            spec.component.oci.as_deref(),
            Some("registry.example.com/team/hello:1.2.0")
        );
        let bad = HELLO.replace("path = \"hello.wasm\"", "oci = \"hello\"");
        let e = err(&bad);
        assert_eq!(e.field.as_deref(), Some("component.oci"));
        assert!(e.line.is_some(), "{e:?}");
        let both = HELLO.replace(
            "path = \"hello.wasm\"",
            "path = \"x.wasm\"\noci = \"r.example.com/x:1\"",
        );
        assert_eq!(err(&both).field.as_deref(), Some("component"));
    }

    #[test]
    fn a_pool_file_is_read_with_its_windows_and_refused_where_it_is_wrong() {
        let src = "name = \"workers\"\nmin = 1\nmax = 5\ncooldown = \"2m\"\nnode_args = [\"--memory\", \"2Gi\"]\n\
                   [labels]\nsize = \"big\"\n\
                   [[schedule]]\nname = \"night\"\ncron = \"0 22 * * *\"\ntimezone = \"Europe/Paris\"\nend = \"0 6 * * *\"\nreplicas = 0\n";
        let (name, spec) = parse_pool(src).unwrap();
        assert_eq!(name, "workers");
        assert_eq!((spec.min, spec.max, spec.cooldown_ms), (1, 5, 120_000));
        assert_eq!(spec.node_args, ["--memory", "2Gi"]);
        assert_eq!(spec.labels["size"], "big");
        assert_eq!(spec.schedule[0].name, "night");
        assert_eq!(
            (spec.schedule[0].min, spec.schedule[0].max),
            (Some(0), Some(0))
        );

        let e = parse_pool(&src.replace("0 22 * * *", "0 25 * * *")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedule[0].cron"));
        assert_eq!(e.line, Some(10), "{e:?}");
        for bad in ["size = \"not big\"", "\"shoal.dev/pool\" = \"other\""] {
            let e = parse_pool(&src.replace("size = \"big\"", bad)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("labels"), "{e:?}");
            assert_eq!(e.line, Some(6), "{e:?}");
        }
        let e = parse_pool(&src.replace("min = 1", "min = 9")).unwrap_err();
        assert!(e.message.contains("above max"), "{e:?}");
        let e = parse_pool("name = \"w\"\nmax = 1\nsize = 3\n").unwrap_err();
        assert!(e.line == Some(3) && e.message.contains("size"), "{e:?}");
    }

    #[test]
    fn a_pull_secret_goes_with_an_oci_reference_and_is_no_part_of_a_revision() {
        let oci = "oci = \"registry.example.com/team/hello:1.2.0\"";
        let with = |extra: &str| HELLO.replace("path = \"hello.wasm\"", &format!("{oci}{extra}"));
        let spec = parse_app(&with("\npull_secret = \"regcred\""))
            .unwrap()
            .unresolved();
        assert_eq!(spec.pull_secret.as_deref(), Some("regcred"));
        let mut other = spec.clone();
        other.pull_secret = Some("other".into());
        assert_eq!(spec.template(), other.template());

        let e = err(&HELLO.replace(
            "path = \"hello.wasm\"",
            "path = \"hello.wasm\"\npull_secret = \"regcred\"",
        ));
        assert_eq!(e.field.as_deref(), Some("component.pull_secret"));
        assert!(e.line.is_some() && e.message.contains("oci"), "{e:?}");
        let e = err(&with("\npull_secret = \"Not A Name\""));
        assert_eq!(e.field.as_deref(), Some("component.pull_secret"));
    }

    #[test]
    fn volumes_mount_at_plain_absolute_paths_that_do_not_overlap() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let volume = |name: &str, mount: &str, extra: &str| {
            format!("\n[[volumes]]\nname = \"{name}\"\nmount = \"{mount}\"\n{extra}")
        };
        let src = format!(
            "{HELLO}{}{}",
            volume("data", "/data", "size = \"10Mi\"\n"),
            volume("cache", "/cache", "read_only = true\n")
        );
        let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        assert_eq!(spec.volumes.len(), 2);
        assert_eq!(
            (spec.volumes[0].size_bytes, spec.volumes[0].read_only),
            (Some(10 << 20), false)
        );
        assert_eq!(
            (spec.volumes[1].size_bytes, spec.volumes[1].read_only),
            (None, true),
            "the volume's own size, whatever it is"
        );
        let plain = parse_app(HELLO).unwrap().resolve(digest).unwrap();
        assert_eq!(
            spec.template().changed_fields(&plain.template()),
            ["volumes"]
        );

        for (bad, says) in [
            (volume("data", "data", ""), "not an absolute path"),
            (volume("data", "/data/../etc", ""), "plain absolute path"),
            (volume("data", "/", ""), "plain absolute path"),
            (volume("data", "/data", "size = \"lots\"\n"), "size"),
            (
                format!(
                    "{}{}",
                    volume("a", "/data", ""),
                    volume("b", "/data/sub", "")
                ),
                "overlaps",
            ),
            (
                format!("{}{}", volume("a", "/x", ""), volume("a", "/y", "")),
                "mounted twice",
            ),
            (
                format!("{}{}", volume("a", "/x", ""), volume("b", "/y", "")),
                "both writable",
            ),
        ] {
            let e = parse_app(&format!("{HELLO}{bad}")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("volumes"), "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
        // Mounts that only share a prefix of characters do not overlap.
        let src = format!(
            "{HELLO}{}{}",
            volume("a", "/data", ""),
            volume("b", "/database", "read_only = true\n")
        );
        assert!(parse_app(&src).is_ok());
    }

    #[test]
    fn keyvalue_buckets_are_granted_by_name_and_part_of_the_revision() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!("{HELLO}\n[keyvalue]\nbuckets = [\"counter\", \"cache\"]\n");
        let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        assert_eq!(spec.keyvalue, ["counter", "cache"]);
        let plain = parse_app(HELLO).unwrap().resolve(digest).unwrap();
        assert!(plain.keyvalue.is_empty());
        assert_eq!(
            spec.template().changed_fields(&plain.template()),
            ["keyvalue.buckets"]
        );
        for bad in ["[\"Bad Name\"]", "[\"a\", \"a\"]"] {
            let src = format!("{HELLO}\n[keyvalue]\nbuckets = {bad}\n");
            let e = parse_app(&src).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("keyvalue.buckets"), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
    }

    #[test]
    fn outbound_hosts_are_granted_explicitly() {
        let granted = format!("{HELLO}\n[network]\noutbound = [\"api.example.com\"]\n");
        let spec = parse_app(&granted)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(spec.outbound, ["api.example.com"]);
        let plain = parse_app(HELLO)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert!(plain.outbound.is_empty());
        assert_ne!(
            plain.template().hash(),
            spec.template().hash(),
            "a grant is a revision"
        );
        let bad = format!("{HELLO}\n[network]\noutbound = [\"http://x\"]\n");
        assert_eq!(err(&bad).field.as_deref(), Some("network.outbound"));
    }

    #[test]
    fn callers_are_the_namespace_unless_the_app_names_them() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let with = |network: &str| {
            parse_app(&format!(
                "namespace = \"shop\"\n{HELLO}\n[network]\n{network}\n"
            ))
            .and_then(|m| m.resolve(digest.clone()))
        };
        let plain = parse_app(&format!("namespace = \"shop\"\n{HELLO}"))
            .unwrap()
            .resolve(digest.clone())
            .unwrap();
        let (web, cart, admin) = (
            AppKey::new("shop", "web"),
            AppKey::new("shop", "cart"),
            AppKey::new("ops", "admin"),
        );
        assert!(plain.inbound().admits(&web) && plain.inbound().admits(&cart));
        assert!(!plain.inbound().admits(&admin), "another namespace's app");
        let named = with("inbound = [\"web\", \"admin.ops\"]").unwrap();
        assert_eq!(
            named.template(),
            plain.template(),
            "callers are no revision"
        );
        let inbound = named.inbound();
        assert!(inbound.admits(&web) && inbound.admits(&admin));
        assert!(!inbound.admits(&cart), "named: only those named");
        assert!(!inbound.admits(&AppKey::new("ops", "web")));
        let ops = with("inbound = [\"*.ops\"]").unwrap().inbound();
        assert!(ops.admits(&admin) && !ops.admits(&web));
        let any = with("inbound = [\"*\"]").unwrap().inbound();
        assert!(any.admits(&admin) && any.admits(&web));
        let none = with("inbound = []").unwrap().inbound();
        assert!(!none.admits(&web), "[]: routes only");
        let shown: Vec<String> = named
            .inbound()
            .callers()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(shown, ["web.shop", "admin.ops"], "each with its namespace");
        // An entry stored before a rule refused it admits no one, rather than everyone.
        let mut stored = plain.clone();
        stored.inbound = Some(vec!["Web".into(), "a.b.c".into()]);
        assert!(!stored.inbound().admits(&web) && !stored.inbound().admits(&admin));
        for bad in [
            "inbound = [\"Web\"]",
            "inbound = [\"a.b.c\"]",
            "inbound = [\"web.*\"]",
            "inbound = [\"\"]",
            "inbound = [\"web\", \"web.shop\"]",
        ] {
            let e = with(bad).expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("network.inbound"), "{bad}: {e}");
            let network = format!("namespace = \"shop\"\n{HELLO}\n[network]\n")
                .lines()
                .count();
            assert_eq!(e.line, Some(network + 1), "the list's line: {bad}: {e}");
        }
        let job = "name = \"j\"\n[component]\npath = \"j.wasm\"\nkind = \"job\"\n";
        let e = err(&format!("{job}[network]\ninbound = [\"*\"]\n"));
        assert!(e.message.contains("only http apps"), "{e}");
    }

    #[test]
    fn outbound_grants_name_a_host_and_maybe_a_port() {
        let grant = |s: &str| OutboundGrant::parse(s);
        let name = |h: &str| OutboundHost::Name(h.into());
        let ip = |a: &str| OutboundHost::Ip(a.parse().unwrap());
        assert_eq!(
            grant("api.example.com"),
            Ok(OutboundGrant {
                host: name("api.example.com"),
                port: None
            })
        );
        assert_eq!(grant("api.example.com:8080").unwrap().port, Some(8080));
        assert_eq!(grant("203.0.113.7:81").unwrap().host, ip("203.0.113.7"));
        assert_eq!(grant("[2001:db8::1]").unwrap().host, ip("2001:db8::1"));
        assert_eq!(grant("[2001:db8::1]:81").unwrap().port, Some(81));
        // Private addresses parse: whether they are reached is the node's decision.
        assert!(grant("127.0.0.1:9000").is_ok());
        assert!(grant("10.0.0.5").is_ok());
        assert!(grant("[::1]:9000").is_ok());
        for bad in [
            "api.example.com:",
            "api.example.com:0",
            "api.example.com:65536",
            "api.example.com:+80",
            "api.example.com:http",
            "api.example.com:80:81",
            "2001:db8::1",
            "[2001:db8::1",
            "[2001:db8::1]80",
            "[api.example.com]",
            "API.example.com",
            "http://api.example.com",
            "127.1",
            "2130706433",
            "169.254.169.254",
            "169.254.169.254:80",
            "[fe80::1]",
            "[::ffff:169.254.169.254]",
            "0.0.0.0:8080",
            "[::]",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(grant(bad).is_err(), "{bad} should be refused");
        }
        let metadata = grant("169.254.169.254").unwrap_err();
        assert!(metadata.contains("link-local"), "{metadata}");
        let port = grant("api.example.com:http").unwrap_err();
        assert!(port.contains("invalid port"), "{port}");
        let url = grant("http://api.example.com").unwrap_err();
        assert!(url.contains("is a URL"), "{url}");

        let src = format!("{HELLO}\n[network]\noutbound = [\"169.254.169.254\"]\n");
        assert_eq!(err(&src).field.as_deref(), Some("network.outbound"));
        let src = format!("{HELLO}\n[network]\noutbound = [\"api.example.com:99999\"]\n");
        assert_eq!(err(&src).field.as_deref(), Some("network.outbound"));
    }

    #[test]
    fn a_grant_without_a_port_allows_only_the_schemes_default() {
        let host = OutboundHost::of_uri;
        let plain = OutboundGrant::parse("api.example.com").unwrap();
        assert!(plain.allows(&host("api.example.com"), 80, 80));
        assert!(plain.allows(&host("API.Example.com"), 80, 80));
        assert!(plain.allows(&host("api.example.com"), 443, 443));
        assert!(!plain.allows(&host("api.example.com"), 8080, 80));
        assert!(!plain.allows(&host("other.example.com"), 80, 80));
        let port = OutboundGrant::parse("api.example.com:8080").unwrap();
        assert!(port.allows(&host("api.example.com"), 8080, 80));
        assert!(!port.allows(&host("api.example.com"), 80, 80));
        let v6 = OutboundGrant::parse("[2001:db8::1]:81").unwrap();
        assert!(v6.allows(&host("[2001:db8:0::1]"), 81, 80));
        assert!(!v6.allows(&host("2001:db8::1.example"), 81, 80));
    }

    #[test]
    fn addresses_are_public_private_or_never_reached() {
        let reach_of = |a: &str| reach(a.parse().unwrap());
        for public in [
            "203.0.113.7",
            "8.8.8.8",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "2002:808:808::1",
            "198.20.0.1",
        ] {
            assert_eq!(reach_of(public), Reach::Public, "{public}");
        }
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.5",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "64:ff9b::10.0.0.1",
            "::127.0.0.1",
            "::10.1.2.3",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "198.18.0.1",
            "198.19.255.255",
        ] {
            assert_eq!(reach_of(private), Reach::Private, "{private}");
        }
        for never in [
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "fe80::1",
            "febf::1",
            "::",
            "ff02::1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::169.254.169.254",
            "2002:a9fe:a9fe::1",
        ] {
            assert_eq!(reach_of(never), Reach::Never, "{never}");
        }
    }

    #[test]
    fn health_probes_parse_with_defaults() {
        let src = format!(
            "{HELLO}\n[health.readiness]\npath = \"/healthz\"\nperiod = \"200ms\"\n[health.liveness]\npath = \"/live\"\nfailure_threshold = 5\n"
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        let r = spec.health.readiness.as_ref().unwrap();
        assert_eq!(
            (r.path.as_str(), r.period_ms, r.timeout_ms),
            ("/healthz", 200, 1000)
        );
        assert_eq!((r.failure_threshold, r.success_threshold), (3, 1));
        assert_eq!(spec.health.liveness.as_ref().unwrap().failure_threshold, 5);
        let e = err(&src.replace("\"/live\"", "\"live\""));
        assert_eq!(e.field.as_deref(), Some("health.liveness"));
        let e = err(&src.replace("\"200ms\"", "\"soon\""));
        assert_eq!(e.field.as_deref(), Some("health.readiness"));
        assert!(e.line.is_some());
    }

    #[test]
    fn rollout_limits_parse_and_must_allow_progress() {
        let src = format!(
            "{HELLO}\n[rollout]\nstrategy = \"rolling\"\nmax_surge = 0\nmax_unavailable = 1\n"
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(
            spec.rollout,
            Rollout {
                max_surge: 0,
                max_unavailable: 1,
                ..Rollout::default()
            }
        );
        let e = err(&src.replace("max_unavailable = 1", "max_unavailable = 0"));
        assert_eq!(e.field.as_deref(), Some("rollout"));
        assert!(e.line.is_some());
        let e = err(&src.replace("\"rolling\"", "\"canary\""));
        assert!(e.message.contains("needs steps"), "{e}");
        let e = err(&src.replace("\"rolling\"", "\"blue-green\""));
        assert!(e.message.contains("unknown variant"), "{e}");
    }

    #[test]
    fn min_ready_parses_and_must_be_less_than_the_progress_deadline() {
        let src = format!("{HELLO}\n[rollout]\nmin_ready = \"15s\"\nprogress_deadline = \"1m\"\n");
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        assert_eq!(spec.rollout.min_ready_ms, 15_000);
        // Stored only when set: apps stored before it existed read back the same.
        let json = serde_json::to_value(&spec.rollout).unwrap();
        assert_eq!(json["min_ready_ms"], 15_000);
        let plain = serde_json::to_value(Rollout::default()).unwrap();
        assert!(plain.get("min_ready_ms").is_none(), "{plain}");
        let e = err(&src.replace("\"15s\"", "\"1m\""));
        assert_eq!(e.field.as_deref(), Some("rollout"));
        assert!(e.message.contains("less than progress_deadline"), "{e}");
        let e = err(&src.replace("\"15s\"", "\"soon\""));
        assert_eq!(e.field.as_deref(), Some("rollout.min_ready"));
        assert!(e.line.is_some());
        let job = format!(
            "name = \"j\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n[rollout]\nmin_ready = \"5s\"\n",
            "a".repeat(64)
        );
        assert!(err(&job).message.contains("a job's runs"), "{}", err(&job));
    }

    /// A span of time past a year is refused at its line: added to a clock reading, the
    /// largest would overflow (a canary pause did, in the controller).
    #[test]
    fn durations_past_a_year_are_refused() {
        const BARE: &str = "name = \"hello\"\n[component]\npath = \"hello.wasm\"\nkind = \"http\"";
        for (section, field) in [
            (
                "[rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 10, pause = \"584542000y\" }]",
                "rollout.steps",
            ),
            (
                "[rollout]\nprogress_deadline = \"366d\"",
                "rollout.progress_deadline",
            ),
            ("[http]\ntimeout = \"400d\"", "http.timeout"),
            (
                "[health]\nliveness = { path = \"/\", period = \"9999d\" }",
                "health.liveness",
            ),
        ] {
            let e = err(&format!("{BARE}\n{section}\n"));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains("365d") && e.line.is_some(), "{e}");
        }
        let year = format!("{BARE}\n[http]\ntimeout = \"365d\"\n");
        assert!(parse_app(&year).is_ok());
    }

    #[test]
    fn canary_steps_and_analysis_parse() {
        let src = format!(
            "{HELLO}\n[rollout]\nstrategy = \"canary\"\nprogress_deadline = \"2m\"\nsteps = [{{ weight = 10, pause = \"30s\" }}, {{ weight = 50 }}]\n[rollout.analysis]\nmin_requests = 50\nmax_error_rate_increase = 0.05\nmax_p99_ratio = 2.0\n"
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        let r = &spec.rollout;
        assert_eq!(r.strategy, Strategy::Canary);
        assert_eq!(r.progress_deadline_ms, 120_000);
        assert_eq!(
            r.steps,
            vec![
                CanaryStep {
                    weight: 10,
                    pause_ms: Some(30_000)
                },
                CanaryStep {
                    weight: 50,
                    pause_ms: None
                }
            ]
        );
        assert_eq!(
            r.analysis,
            Analysis {
                min_requests: 50,
                max_error_rate_increase_bp: 500,
                max_p99_ratio_pct: 200
            }
        );
        assert_eq!(Rollout::canary_replicas(4, 10), 1);
        assert_eq!(Rollout::canary_replicas(4, 50), 2);
        assert_eq!(Rollout::canary_replicas(20, 10), 2);

        for (bad, says) in [
            ("weight = 50 }]", "must increase"),
            ("weight = 100 }]", "between 1 and 99"),
            ("pause = \"soon\"", "duration"),
            ("max_p99_ratio = 2.0", "must be between"),
        ] {
            let broken = match bad {
                "weight = 50 }]" => src.replace("weight = 10,", "weight = 60,"),
                "weight = 100 }]" => src.replace("weight = 50 }]", bad),
                "pause = \"soon\"" => src.replace("pause = \"30s\"", bad),
                _ => src.replace(bad, "max_p99_ratio = -1.0"),
            };
            let e = err(&broken);
            assert!(e.message.contains(says), "{bad}: {e}");
            assert!(e.line.is_some(), "{bad}: {e}");
        }
        let mut daemon = spec.clone();
        daemon.component.kind = Kind::Daemon;
        daemon.http = None;
        let e = daemon.validate().unwrap_err();
        assert!(e.message.contains("splits HTTP traffic"), "{e}");
    }

    #[test]
    fn jobs_take_a_restart_policy() {
        let src = format!(
            "name = \"j\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n[job]\nrestart = \"on-failure\"\nretries = 2\ndeadline = \"10s\"\n",
            "b".repeat(64)
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "b".repeat(64)))
            .unwrap();
        assert_eq!(
            spec.job,
            Some(JobSpec {
                restart: Restart::OnFailure,
                retries: 2,
                deadline_ms: Some(10_000)
            })
        );
        let e = err(&format!("{HELLO}\n[job]\nrestart = \"never\"\n"));
        assert_eq!(e.field.as_deref(), Some("job"));
        let e = err(&src.replace("on-failure", "always"));
        assert!(e.message.contains("always"), "{e}");
    }

    /// Job `j` whose `[job]` section is `job`, as a file: the section starts on line 5.
    fn cron_job(job: &str) -> String {
        format!(
            "name = \"j\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n[job]\n{job}\n",
            "b".repeat(64)
        )
    }

    #[test]
    fn scheduled_jobs_parse_with_kubernetes_defaults() {
        let spec = resolve(&cron_job(
            "schedule = \"*/5 * * * *\"\ntimezone = \"Asia/Seoul\"\nconcurrency = \"forbid\"\nstarting_deadline = \"30s\"\nhistory = { succeeded = 5 }",
        ));
        assert_eq!(
            spec.runs,
            JobRuns {
                schedule: Some("*/5 * * * *".into()),
                timezone: "Asia/Seoul".into(),
                concurrency: Concurrency::Forbid,
                starting_deadline_ms: Some(30_000),
                history: History {
                    succeeded: 5,
                    failed: 1
                },
            }
        );
        assert_eq!(
            spec.job.as_ref().unwrap().retries,
            3,
            "the rest of [job] as before"
        );
        let plain = resolve(&cron_job("schedule = \"*/2 * * * * *\""));
        assert_eq!(plain.runs.timezone, "UTC");
        assert_eq!(plain.runs.concurrency, Concurrency::Allow);
        assert_eq!(plain.runs.history, History::default());
        assert!(resolve(&cron_job("")).runs.is_default());
    }

    #[test]
    fn a_jobs_schedule_is_not_its_revision() {
        let once = resolve(&cron_job("retries = 1"));
        let nightly = resolve(&cron_job(
            "retries = 1\nschedule = \"0 3 * * *\"\nconcurrency = \"replace\"",
        ));
        assert_eq!(once.template(), nightly.template());
        assert_eq!(nightly.with_template(&once.template()).runs, nightly.runs);
        // Through JSON and back, as the API stores it.
        let json = serde_json::to_string(&nightly).unwrap();
        assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), nightly);
        assert!(!serde_json::to_string(&once).unwrap().contains("runs"));
    }

    #[test]
    fn bad_job_schedules_are_pointed_at() {
        let cases: &[(&str, &str, &str, (usize, usize))] = &[
            (
                "schedule = \"0 25 * * *\"",
                "job.schedule",
                "invalid cron expression",
                (6, 12),
            ),
            (
                "schedule = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"",
                "job.timezone",
                "unknown time zone",
                (7, 12),
            ),
            (
                "timezone = \"Asia/Seoul\"",
                "job.timezone",
                "set schedule too",
                (6, 12),
            ),
            (
                "starting_deadline = \"30s\"",
                "job.starting_deadline",
                "set schedule too",
                (6, 21),
            ),
            (
                "schedule = \"* * * * *\"\nstarting_deadline = \"10ms\"",
                "job.starting_deadline",
                "at least 1s",
                (7, 21),
            ),
            (
                "history = { failed = 101 }",
                "job.history",
                "at most 100",
                (6, 11),
            ),
        ];
        for (job, field, message, (line, column)) in cases {
            let e = err(&cron_job(job));
            assert_eq!(e.field.as_deref(), Some(*field), "{job}: {e}");
            assert!(e.message.contains(message), "{job}: {e}");
            assert_eq!(
                (e.line, e.column),
                (Some(*line), Some(*column)),
                "{job}: {e}"
            );
        }
        let e = err(&cron_job("concurrency = \"sometimes\""));
        assert!(e.message.contains("sometimes"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        // One replica per run.
        let e = err(&format!(
            "{}[scale]\nreplicas = 2\n",
            cron_job("schedule = \"0 3 * * *\"")
        ));
        assert_eq!(e.field.as_deref(), Some("scale.replicas"), "{e}");
        assert!(e.message.contains("one replica per run"), "{e}");
        assert_eq!((e.line, e.column), (Some(8), Some(12)), "{e}");
        // Only jobs have runs, also when the spec comes as JSON.
        let mut http = resolve_hello();
        http.runs.schedule = Some("0 3 * * *".into());
        assert_eq!(http.validate().unwrap_err().field.as_deref(), Some("job"));
    }

    #[test]
    fn most_replicas_is_the_largest_any_bound_allows() {
        let mut spec = resolve_hello();
        assert_eq!(spec.most_replicas(), 2);
        // A fixed size: a window's max only lowers it, a window's min raises it.
        let window = |min, max| ScheduleWindow {
            name: "w".into(),
            cron: "0 9 * * *".into(),
            timezone: "UTC".into(),
            duration_ms: Some(3_600_000),
            end: None,
            min,
            max,
        };
        spec.scale.schedule = vec![window(None, Some(10))];
        assert_eq!(spec.most_replicas(), 2);
        spec.scale.schedule = vec![window(Some(5), Some(10))];
        assert_eq!(spec.most_replicas(), 5);
        spec.scale.schedule.clear();
        spec.scale.autoscale = Some(Autoscale {
            min: 1,
            max: 6,
            target_concurrency: 10,
            target_rps: None,
            window_ms: 60_000,
            idle_ms: 0,
        });
        assert_eq!(spec.most_replicas(), 6);
        spec.scale.schedule.push(ScheduleWindow {
            name: "busy".into(),
            cron: "0 9 * * *".into(),
            timezone: "UTC".into(),
            duration_ms: Some(3_600_000),
            end: None,
            min: Some(9),
            max: None,
        });
        assert_eq!(spec.most_replicas(), 9);
    }

    fn resolve_hello() -> AppSpec {
        parse_app(HELLO)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap()
    }

    #[test]
    fn a_spec_with_an_old_template_has_that_template() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let old = parse_app(HELLO).unwrap().resolve(digest.clone()).unwrap();
        let new = parse_app(
            &HELLO
                .replace("A = \"1\"", "A = \"9\"")
                .replace("replicas = 2", "replicas = 4"),
        )
        .unwrap()
        .resolve(digest)
        .unwrap();
        let back = new.with_template(&old.template());
        assert_eq!(back.template(), old.template());
        assert_eq!(back.replicas, 4, "scale is kept");
    }

    #[test]
    fn json_specs_are_validated_too() {
        let mut spec = parse_app(HELLO)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        spec.replicas = MAX_REPLICAS + 1;
        assert_eq!(
            spec.validate().unwrap_err().field.as_deref(),
            Some("scale.replicas")
        );
        spec.replicas = 1;
        spec.component.digest = "sha256:../../etc".into();
        assert_eq!(
            spec.validate().unwrap_err().field.as_deref(),
            Some("component.digest")
        );
        spec.component.digest = format!("sha256:{}", "a".repeat(64));
        spec.placement
            .node_selector
            .insert("zone".into(), "".into());
        assert_eq!(
            spec.validate().unwrap_err().field.as_deref(),
            Some("placement.node_selector")
        );
    }

    const PLACED: &str = r#"
name = "placed"

[component]
path = "placed.wasm"
kind = "job"

[placement]
node_selector = { zone = "a", "shoal.dev/arch" = "x86_64" }
spread = "required"
"#;

    fn resolve(src: &str) -> AppSpec {
        parse_app(src)
            .unwrap()
            .resolve(format!("sha256:{}", "c".repeat(64)))
            .unwrap()
    }

    #[test]
    fn placement_parses() {
        let spec = resolve(PLACED);
        assert_eq!(
            spec.placement.node_selector,
            BTreeMap::from([
                ("shoal.dev/arch".to_string(), "x86_64".to_string()),
                ("zone".to_string(), "a".to_string()),
            ])
        );
        assert_eq!(spec.placement.spread, Spread::Required);
        let table = PLACED.replace(
            "node_selector = { zone = \"a\", \"shoal.dev/arch\" = \"x86_64\" }\nspread = \"required\"",
            "spread = \"required\"\n[placement.node_selector]\nzone = \"a\"\n\"shoal.dev/arch\" = \"x86_64\"",
        );
        assert_eq!(resolve(&table).placement, spec.placement);
    }

    #[test]
    fn placement_defaults_to_anywhere_preferring_spread() {
        let spec = resolve(HELLO);
        assert_eq!(spec.placement, Placement::default());
        assert!(spec.placement.node_selector.is_empty());
        assert_eq!(spec.placement.spread, Spread::Preferred);
        let spread_only = PLACED.replace(
            "node_selector = { zone = \"a\", \"shoal.dev/arch\" = \"x86_64\" }\n",
            "",
        );
        let spec = resolve(&spread_only);
        assert!(spec.placement.node_selector.is_empty());
        assert_eq!(spec.placement.spread, Spread::Required);
    }

    #[test]
    fn placement_rejects_unknown_keys_and_values_with_position() {
        let e = err(&PLACED.replace("spread = ", "affinity = \"x\"\nspread = "));
        assert!(e.message.contains("affinity"), "{e}");
        assert_eq!(e.line, Some(10), "{e}");
        let e = err(&PLACED.replace("\"required\"", "\"always\""));
        assert!(e.message.contains("always"), "{e}");
        assert_eq!(e.line, Some(10), "{e}");
    }

    #[test]
    fn placement_validates_selector_labels() {
        for bad in [
            "{ \"\" = \"a\" }",
            "{ zone = \"\" }",
            "{ \"zone a\" = \"b\" }",
            "{ zone = \"a!\" }",
            &format!("{{ zone = \"{}\" }}", "a".repeat(64)),
        ] {
            let src = PLACED.replace("{ zone = \"a\", \"shoal.dev/arch\" = \"x86_64\" }", bad);
            let e = err(&src);
            assert_eq!(
                e.field.as_deref(),
                Some("placement.node_selector"),
                "{bad}: {e}"
            );
            assert_eq!(e.line, Some(9), "{bad}: {e}");
        }
        let longest = PLACED.replace("\"a\"", &format!("\"{}\"", "a".repeat(63)));
        assert_eq!(resolve(&longest).placement.node_selector["zone"].len(), 63);
    }

    #[test]
    fn placement_is_not_a_revision() {
        let a = resolve(PLACED);
        let b = resolve(&PLACED.replace("zone = \"a\"", "zone = \"b\""));
        assert_ne!(a.placement, b.placement);
        assert_eq!(a.template().hash(), b.template().hash());
    }

    #[test]
    fn json_without_placement_still_parses() {
        let spec = resolve(HELLO);
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("placement").is_none(), "default is not written");
        let back: AppSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
        let placed = resolve(PLACED);
        let json = serde_json::to_string(&placed).unwrap();
        assert!(json.contains(r#""spread":"required""#), "{json}");
        assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), placed);
    }

    fn scaled(scale: &str) -> Result<AppSpec, SpecError> {
        let src = HELLO.replace("[scale]\nreplicas = 2\n", scale);
        parse_app(&src)?.resolve(format!("sha256:{}", "a".repeat(64)))
    }

    #[test]
    fn requests_and_limits() {
        let spec = scaled("").unwrap();
        assert_eq!(spec.replicas, 1);
        let src = HELLO.replace(
            "limits = { memory = \"32Mi\" }\nrequests = { cpu = \"50m\" }",
            "limits = { memory = \"32Mi\", cpu = \"500m\" }\nrequests = { memory = \"4Mi\" }",
        );
        let r = parse_app(&src).unwrap().spec.resources;
        assert_eq!(r.requests.memory_bytes, 4 << 20);
        // A limit without a request requests the limit, as in Kubernetes.
        assert_eq!(r.requests.cpu_millis, 500);
        assert_eq!(r.limits.cpu_millis, Some(500));
        let src = HELLO.replace(
            "requests = { cpu = \"50m\" }",
            "requests = { memory = \"64Mi\" }",
        );
        let e = err(&src);
        assert_eq!(e.field.as_deref(), Some("resources.requests.memory"), "{e}");
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.message.contains("more than the limit"), "{e}");
        // The old flat keys say where they went.
        let e = err(&HELLO.replace("max_concurrency = 8", "max_concurrency = 8\ncpu = \"1\""));
        assert!(e.message.contains("requests"), "{e}");
    }

    /// An app wakes on a request when its `min`, or a window's, lets it idle to zero: a
    /// night window with `min = 0` took an app of `min = 1` to zero, and no request woke it.
    #[test]
    fn an_app_may_idle_to_zero_by_its_min_or_a_windows() {
        let night = |bounds: &str| {
            format!("[[scale.schedule]]\ncron = \"0 0 * * *\"\nduration = \"6h\"\n{bounds}\n")
        };
        let idles = |scale: &str| scaled(scale).unwrap().scale.may_idle_to_zero();
        assert!(idles("[scale]\nmin = 0\nmax = 5\n"));
        assert!(!idles("[scale]\nmin = 1\nmax = 5\n"));
        assert!(idles(&format!(
            "[scale]\nmin = 1\nmax = 5\nidle = \"2m\"\n{}",
            night("min = 0")
        )));
        assert!(!idles(&format!(
            "[scale]\nmin = 1\nmax = 5\n{}",
            night("replicas = 0")
        )));
        assert!(!idles(&format!(
            "[scale]\nreplicas = 2\n{}",
            night("min = 0")
        )));
    }

    #[test]
    fn autoscaling_defaults_and_bounds() {
        let spec = scaled("[scale]\nmin = 0\nmax = 5\nidle = \"2m\"\n").unwrap();
        let a = spec.scale.autoscale.as_ref().unwrap();
        assert_eq!((a.min, a.max, a.idle_ms), (0, 5, 120_000));
        // 70 % of max_concurrency (8), as Knative aims below the hard limit.
        assert_eq!(a.target_concurrency, 5);
        assert_eq!(a.window_ms, DEFAULT_SCALE_WINDOW_MS);
        // Starts with one replica so the apply ends serving.
        assert_eq!(spec.replicas, 1);
        let spec = scaled("[scale]\nmin = 2\nmax = 5\ntarget_concurrency = 3\ntarget_rps = 50\nwindow = \"10s\"\n").unwrap();
        let a = spec.scale.autoscale.unwrap();
        assert_eq!(
            (a.target_concurrency, a.target_rps, a.window_ms),
            (3, Some(50), 10_000)
        );
        assert_eq!(spec.replicas, 2);
    }

    #[test]
    fn bad_scale_is_rejected_where_it_is_written() {
        let cases: &[(&str, &str, &str)] = &[
            ("[scale]\nmin = 4\nmax = 2\n", "scale.min", "more than max"),
            (
                "[scale]\nmax = 2\ntarget_concurrency = 0\n",
                "scale.target_concurrency",
                "between 1",
            ),
            (
                "[scale]\nmax = 2\ntarget_concurrency = 9\n",
                "scale.target_concurrency",
                "max_concurrency (8)",
            ),
            (
                "[scale]\nmin = 1\nmax = 2\nidle = \"5m\"\n",
                "scale.idle",
                "min = 0",
            ),
            (
                "[scale]\nreplicas = 2\nmax = 3\n",
                "scale.replicas",
                "not both",
            ),
            ("[scale]\nmin = 1\n", "scale.max", "needs max"),
            (
                "[scale]\nmax = 2\nwindow = \"500ms\"\n",
                "scale.window",
                "between 1s and 1h",
            ),
            (
                "[[scale.schedule]]\ncron = \"0 25 * * *\"\nduration = \"1h\"\nreplicas = 3\n",
                "scale.schedule[0].cron",
                "invalid cron expression",
            ),
            (
                "[[scale.schedule]]\ncron = \"0 9 * * *\"\ntimezone = \"Asia/Seul\"\nduration = \"1h\"\nreplicas = 3\n",
                "scale.schedule[0].timezone",
                "unknown time zone",
            ),
            (
                "[[scale.schedule]]\ncron = \"0 9 * * *\"\nduration = \"1h\"\n",
                "scale.schedule[0].min",
                "changes nothing",
            ),
            (
                "[[scale.schedule]]\ncron = \"0 9 * * *\"\nreplicas = 3\n",
                "scale.schedule[0].duration",
                "one of duration",
            ),
            (
                "[[scale.schedule]]\ncron = \"0 9 * * *\"\nduration = \"1h\"\nmin = 5\nmax = 2\n",
                "scale.schedule[0].min",
                "more than max",
            ),
        ];
        for (scale, field, message) in cases {
            let e = scaled(scale).expect_err(scale);
            assert_eq!(e.field.as_deref(), Some(*field), "{scale}: {e}");
            assert!(e.message.contains(message), "{scale}: {e}");
            assert!(e.line.is_some_and(|l| l >= 13), "{scale}: {e}");
        }
        // The cron error points at the cron string itself.
        let e =
            scaled("[[scale.schedule]]\ncron = \"0 25 * * *\"\nduration = \"1h\"\nreplicas = 3\n")
                .unwrap_err();
        assert_eq!((e.line, e.column), (Some(14), Some(8)), "{e}");
        // So do a window's other errors, at the value at fault, named as written.
        let window = |name: &str, duration: &str, replicas: &str| {
            format!(
                "[[scale.schedule]]\nname = \"{name}\"\ncron = \"0 9 * * *\"\nduration = \"{duration}\"\nreplicas = {replicas}\n"
            )
        };
        for (scale, field, line, message) in [
            (
                window("a", "400d", "3"),
                "scale.schedule[0].duration",
                16,
                "365d",
            ),
            (
                window("a", "1h", "100000"),
                "scale.schedule[0].replicas",
                17,
                "at most",
            ),
            (
                window("a", "1h", "3") + &window("a", "2h", "1"),
                "scale.schedule[1].name",
                19,
                "used by another window",
            ),
        ] {
            let e = scaled(&scale).expect_err(&scale);
            assert_eq!(e.field.as_deref(), Some(field), "{scale}: {e}");
            assert_eq!(e.line, Some(line), "{scale}: {e}");
            assert!(e.message.contains(message), "{scale}: {e}");
        }
        // Autoscaling is for http apps; a job takes no [scale] at all.
        let job = format!(
            "name = \"j\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"job\"\n[scale]\nmax = 3\n",
            "b".repeat(64)
        );
        let e = err(&job);
        assert_eq!(e.field.as_deref(), Some("scale"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");
    }

    #[test]
    fn open_windows_set_the_bounds() {
        let spec = scaled(
            "[scale]\nmin = 1\nmax = 4\n\
             [[scale.schedule]]\nname = \"mornings\"\ncron = \"0 9 * * *\"\ntimezone = \"Asia/Seoul\"\nduration = \"3h\"\nmin = 3\n\
             [[scale.schedule]]\nname = \"launch\"\ncron = \"0 10 * * *\"\ntimezone = \"Asia/Seoul\"\nend = \"0 11 * * *\"\nreplicas = 6\n",
        )
        .unwrap();
        // 2026-11-30 in Seoul (UTC+9): 08:00 = 23:00 UTC the day before.
        let seoul = |h: u64| 1_795_993_200_000 + (h - 8) * 3_600_000;
        let b = spec.scale.bounds(spec.replicas, seoul(8));
        assert_eq!((b.min, b.max), (1, 4));
        assert!(b.windows.is_empty());
        let b = spec.scale.bounds(spec.replicas, seoul(9));
        assert_eq!(
            (b.min, b.max, b.windows.clone()),
            (3, 4, vec!["mornings".to_string()])
        );
        // Overlap: the largest min and the largest max of the open windows.
        let b = spec.scale.bounds(spec.replicas, seoul(10));
        assert_eq!((b.min, b.max), (6, 6));
        assert_eq!(b.windows, ["mornings", "launch"]);
        assert_eq!(b.clamp(1), 6);
        let b = spec.scale.bounds(spec.replicas, seoul(12));
        assert_eq!((b.min, b.max), (1, 4));

        // Without autoscaling the app's own bounds are its replicas.
        let fixed = scaled(
            "[scale]\nreplicas = 2\n[[scale.schedule]]\ncron = \"0 9 * * *\"\nduration = \"1h\"\nreplicas = 5\n",
        )
        .unwrap();
        assert_eq!(fixed.scale.schedule[0].name, "schedule-1");
        let nine_utc = 1_796_029_200_000;
        assert_eq!(fixed.scale.bounds(2, nine_utc).clamp(2), 5);
        assert_eq!(fixed.scale.bounds(2, nine_utc + 3_600_000).clamp(2), 2);
    }
}
