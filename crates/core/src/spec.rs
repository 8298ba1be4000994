//! The app spec: TOML as users write it, parsed into a validated, normalised
//! [`AppSpec`] with quantities resolved and maps ordered (BTreeMap), so two
//! files that mean the same thing produce the same struct and the same hash.

use crate::name::validate_name;
use crate::quantity::{parse_cpu, parse_duration_ms, parse_memory};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use thiserror::Error;
use toml::Spanned;

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_MEMORY: u64 = 64 << 20;
pub const DEFAULT_CPU_MILLIS: u32 = 100;
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Upper bounds keep one typo ("64Gi") from asking for the impossible.
pub const MAX_MEMORY: u64 = 4 << 30;
pub const MAX_REPLICAS: u32 = 1000;
pub const MAX_CONCURRENCY: u32 = 10_000;

/// What a component is run as, and so which WIT world it must implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Linear-memory limit of one instance, enforced by wasmtime; also what
    /// the scheduler reserves for the replica on its node.
    pub memory_bytes: u64,
    /// Scheduling request in millicores.
    pub cpu_millis: u32,
    /// Instances one replica may run at once; the node reserves that many
    /// pool slots, so its instance pool can never be overcommitted.
    pub max_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpSpec {
    pub routes: Vec<Route>,
    pub timeout_ms: u64,
}

/// How a new revision replaces the running one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CanaryStep {
    /// Percent of requests, 1 to 99.
    pub weight: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

/// How a canary is judged against the stable revision, on the requests the
/// gateways routed to each since the step began.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            strategy: Strategy::Rolling,
            max_surge: 1,
            max_unavailable: 0,
            progress_deadline_ms: DEFAULT_PROGRESS_DEADLINE_MS,
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

/// An HTTP probe of a replica, run in process by its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Never,
    OnFailure,
}

/// How a job runs: restart policy, retry limit and deadline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobSpec {
    pub restart: Restart,
    /// Restarts allowed after failures (with `restart = "on-failure"`).
    pub retries: u32,
    /// Longest one run may take; past it the run fails as timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComponentSpec {
    /// `sha256:<hex>` of an uploaded module.
    pub digest: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// How strongly an app's replicas avoid sharing a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Label keys and values in node selectors: short and plain, so they
/// compare exactly with what nodes register.
fn validate_label(what: &str, s: &str) -> Result<(), String> {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: String,
    pub namespace: String,
    pub component: ComponentSpec,
    pub resources: Resources,
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
    /// Hosts a guest may call over plain HTTP besides other apps (which it
    /// reaches by service name without a grant). Empty: no outbound network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
    #[serde(default, skip_serializing_if = "Rollout::is_default")]
    pub rollout: Rollout,
}

/// What makes a revision: everything that changes what runs in a replica.
/// Scale and routes are not part of it, as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub component: ComponentSpec,
    pub resources: Resources,
    pub timeout_ms: u64,
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
}

impl Template {
    /// The fields that differ from `old`, named as in the app spec
    /// (`component.digest`, `env.GREETING`, `resources.memory`…): why a new
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
        check(self.component.kind != old.component.kind, "component.kind");
        check(self.component.args != old.component.args, "component.args");
        check(
            self.resources.memory_bytes != old.resources.memory_bytes,
            "resources.memory",
        );
        check(
            self.resources.cpu_millis != old.resources.cpu_millis,
            "resources.cpu",
        );
        check(
            self.resources.max_concurrency != old.resources.max_concurrency,
            "resources.max_concurrency",
        );
        check(self.timeout_ms != old.timeout_ms, "http.timeout");
        let names: BTreeSet<&String> = self.env.keys().chain(old.env.keys()).collect();
        for name in names {
            check(
                self.env.get(name) != old.env.get(name),
                &format!("env.{name}"),
            );
        }
        check(self.outbound != old.outbound, "network.outbound");
        check(self.job != old.job, "job");
        check(self.health != old.health, "health");
        out
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
        spec.outbound = template.outbound.clone();
        spec.job = template.job.clone();
        spec.health = template.health.clone();
        if let Some(http) = &mut spec.http {
            http.timeout_ms = template.timeout_ms;
        }
        spec
    }

    pub fn template(&self) -> Template {
        Template {
            component: self.component.clone(),
            resources: self.resources.clone(),
            timeout_ms: self.http.as_ref().map_or(0, |h| h.timeout_ms),
            env: self.env.clone(),
            outbound: self.outbound.clone(),
            job: self.job.clone(),
            health: self.health.clone(),
        }
    }

    /// Checks every rule the TOML parser checks, for specs arriving as JSON.
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
        let r = &self.resources;
        if r.memory_bytes < (1 << 20) || r.memory_bytes > MAX_MEMORY {
            return field(
                "resources.memory",
                format!(
                    "must be between 1Mi and 4Gi (got {})",
                    crate::quantity::format_memory(r.memory_bytes)
                ),
            );
        }
        if r.cpu_millis == 0 {
            return field("resources.cpu", "must be greater than 0".into());
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
            }
            (None, _) => {}
        }
        if self.component.kind == Kind::Http && !self.component.args.is_empty() {
            return field(
                "component.args",
                "args are only passed to job and daemon apps".into(),
            );
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return field(
                    "env",
                    format!("{key:?} is not a valid variable name (no '=' or NUL, not empty)"),
                );
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
        for host in &self.outbound {
            if let Err(m) = validate_host(host) {
                return field("network.outbound", m);
            }
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
}

/// Namespace + name: how apps are addressed everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

    /// Completes the spec with the digest of the uploaded module.
    pub fn resolve(mut self, digest: String) -> Result<AppSpec, SpecError> {
        self.spec.component.digest = digest;
        self.spec.validate()?;
        Ok(self.spec)
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
    #[serde(default)]
    scale: RawScale,
    http: Option<Spanned<RawHttp>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    placement: RawPlacement,
    network: Option<Spanned<RawNetwork>>,
    job: Option<Spanned<RawJob>>,
    health: Option<Spanned<RawHealth>>,
    rollout: Option<Spanned<RawRollout>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default)]
    strategy: Strategy,
    max_surge: Option<u32>,
    max_unavailable: Option<u32>,
    progress_deadline: Option<Spanned<String>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    outbound: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    path: Option<Spanned<String>>,
    digest: Option<Spanned<String>>,
    kind: Spanned<Kind>,
    args: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory: Option<Spanned<String>>,
    cpu: Option<Spanned<String>>,
    max_concurrency: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScale {
    replicas: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    routes: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    node_selector: Option<Spanned<BTreeMap<String, String>>>,
    spread: Option<Spanned<Spread>>,
}

/// Parses and validates an app spec file.
pub fn parse_app(src: &str) -> Result<AppManifest, SpecError> {
    let raw: RawApp = toml::from_str(src).map_err(|e| {
        SpecError {
            field: None,
            message: e.message().trim().to_string(),
            line: None,
            column: None,
        }
        .at(src, e.span())
    })?;
    // Where each field sits in the file, to place errors from `validate`.
    let mut spans: HashMap<&'static str, Range<usize>> = HashMap::new();
    let fail = |field: &str, message: String, span: Range<usize>| {
        SpecError::field(field, message).at(src, Some(span))
    };

    let c = raw.component.get_ref();
    let module = match (&c.path, &c.digest) {
        (Some(p), None) => ModuleRef::Path(PathBuf::from(p.get_ref())),
        (None, Some(d)) => {
            validate_digest(d.get_ref()).map_err(|m| fail("component.digest", m, d.span()))?;
            ModuleRef::Digest(d.get_ref().clone())
        }
        _ => {
            return Err(fail(
                "component",
                "set exactly one of `path` (a local .wasm file to upload) or `digest` (an uploaded module)"
                    .into(),
                raw.component.span(),
            ));
        }
    };
    spans.insert("component.digest", raw.component.span());
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
    if let Some(s) = &raw.placement.node_selector {
        spans.insert("placement.node_selector", s.span());
    }

    let kind = *c.kind.get_ref();
    let memory_bytes = match &raw.resources.memory {
        Some(m) => {
            spans.insert("resources.memory", m.span());
            parse_memory(m.get_ref())
                .map_err(|e| fail("resources.memory", e.to_string(), m.span()))?
        }
        None => DEFAULT_MEMORY,
    };
    let cpu_millis = match &raw.resources.cpu {
        Some(m) => {
            spans.insert("resources.cpu", m.span());
            parse_cpu(m.get_ref()).map_err(|e| fail("resources.cpu", e.to_string(), m.span()))?
        }
        None => DEFAULT_CPU_MILLIS,
    };
    let max_concurrency = match &raw.resources.max_concurrency {
        Some(m) => {
            spans.insert("resources.max_concurrency", m.span());
            *m.get_ref()
        }
        None if kind == Kind::Http => DEFAULT_MAX_CONCURRENCY,
        None => 1,
    };
    let replicas = match &raw.scale.replicas {
        Some(r) => {
            spans.insert("scale.replicas", r.span());
            *r.get_ref()
        }
        None => 1,
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
            Some(HttpSpec { routes, timeout_ms })
        }
        // No routes: reachable only by service name from other apps.
        None if kind == Kind::Http => Some(HttpSpec {
            routes: Vec::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }),
        None => None,
    };

    let spec = AppSpec {
        name: raw.name.into_inner(),
        namespace: raw
            .namespace
            .map_or_else(|| DEFAULT_NAMESPACE.to_string(), Spanned::into_inner),
        component: ComponentSpec {
            digest: match &module {
                ModuleRef::Digest(d) => d.clone(),
                ModuleRef::Path(_) => String::new(),
            },
            kind,
            args: c
                .args
                .as_ref()
                .map(|a| a.get_ref().clone())
                .unwrap_or_default(),
        },
        resources: Resources {
            memory_bytes,
            cpu_millis,
            max_concurrency,
        },
        replicas,
        http,
        env: raw.env.map(Spanned::into_inner).unwrap_or_default(),
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
        outbound: match raw.network {
            Some(n) => {
                spans.insert("network.outbound", n.span());
                n.into_inner().outbound
            }
            None => Vec::new(),
        },
    };
    // The digest is checked once it is known; everything else is checked now.
    let mut probe = spec.clone();
    if probe.component.digest.is_empty() {
        probe.component.digest = format!("sha256:{}", "0".repeat(64));
    }
    if let Err(e) = probe.validate() {
        let span = e.field.as_deref().and_then(|f| spans.get(f).cloned());
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
memory = "32Mi"
cpu = "50m"
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
    fn parses_and_normalises() {
        let m = parse_app(HELLO).unwrap();
        assert_eq!(m.module, ModuleRef::Path("hello.wasm".into()));
        let spec = m.resolve(format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.resources.memory_bytes, 32 << 20);
        assert_eq!(spec.resources.cpu_millis, 50);
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
        assert_eq!(spec.resources.memory_bytes, DEFAULT_MEMORY);
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
            ["resources.memory", "http.timeout", "env.A", "env.C"]
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
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let src = HELLO.replace("cpu = \"50m\"", "cpu = \"50m\"\nmemroy = \"1Mi\"");
        let e = err(&src);
        assert!(e.message.contains("memroy"), "{e}");
        assert_eq!(e.line, Some(11), "{e}");
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
        assert_eq!(e.field.as_deref(), Some("resources.memory"));
        assert_eq!(e.line, Some(9));
        let e = err(&HELLO.replace("\"/hello/\"", "\"hello\""));
        assert_eq!(e.field.as_deref(), Some("http.routes"), "{e}");
        let e = err(&HELLO.replace("\"/hello/\"", "\"/a/../b\""));
        assert_eq!(e.field.as_deref(), Some("http.routes"));
        let e = err(&HELLO.replace("\"5s\"", "\"5\""));
        assert_eq!(e.field.as_deref(), Some("http.timeout"));
        let e = err(&HELLO.replace("\"32Mi\"", "\"64Gi\""));
        assert_eq!(e.field.as_deref(), Some("resources.memory"));
        assert_eq!(e.line, Some(9));
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
}
