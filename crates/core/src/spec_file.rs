//! An app's spec written back as the TOML file that makes it: what `shoal get app NAME -o toml`
//! prints and `shoal edit app NAME` opens, as `kubectl get -o yaml` gives back a manifest.
//!
//! [`parse_app`](crate::parse_app) of the text gives the same spec again, except for what the
//! control plane fills in at apply and re-resolves at the next one: a secret's or a TLS
//! secret's version, a config set's values, and an autoscaled app's current replicas (the
//! autoscaler's to set; a file never says). A module comes back as its `digest`, or as the
//! `oci` reference it was pulled from.

use crate::spec::{
    AppSpec, Concurrency, DEFAULT_REUSE_CONCURRENT, DEFAULT_REUSE_IDLE_MS, History, Kind, Probe,
    Restart, ScheduleWindow, SecretKeyRef, Spread, Strategy,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

impl AppSpec {
    /// This spec as a spec file (see the module's doc).
    pub fn to_toml(&self) -> String {
        toml::to_string(&File::of(self)).expect("a spec file serialises")
    }

    /// What an edit started from: it changes when the spec does, except for an autoscaled
    /// app's replicas, which the autoscaler moves and an apply keeps. The control plane
    /// refuses an edit made over another change (`?if_spec=`), as Kubernetes refuses an
    /// update at a stale `resourceVersion`.
    pub fn fingerprint(&self) -> String {
        let mut spec = self.clone();
        if spec.scale.autoscale.is_some() {
            spec.replicas = 0;
        }
        let json = serde_json::to_vec(&spec).expect("a spec serialises");
        hex::encode(Sha256::digest(json))
    }
}

/// `30s`, `1m 30s`, `1s 500ms`: what [`parse_duration_ms`](crate::quantity::parse_duration_ms)
/// reads.
fn duration(ms: u64) -> String {
    crate::quantity::format_duration_ms(ms)
}

/// Bytes in the largest binary unit that holds them exactly (`64Mi`), else as a number.
fn memory(bytes: u64) -> String {
    for (unit, size) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn cpu(millis: u32) -> String {
    format!("{millis}m")
}

/// The file's layout: plain values first, then the sections in the README's order.
#[derive(Serialize)]
struct File {
    name: String,
    namespace: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    config_sets: Vec<String>,
    component: Component,
    resources: Resources,
    scale: Scale,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<Http>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    config: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    placement: Option<Placement>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keyvalue: Option<KeyValue>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<Volume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<Health>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<Rollout>,
}

#[derive(Serialize)]
struct Component {
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oci: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pull_secret: Option<String>,
    kind: Kind,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
}

#[derive(Serialize)]
struct Resources {
    max_concurrency: u32,
    requests: Quantities,
    limits: Quantities,
}

#[derive(Serialize)]
struct Quantities {
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<String>,
    memory: String,
}

#[derive(Serialize)]
struct Scale {
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_rps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    schedule: Vec<Window>,
}

#[derive(Serialize)]
struct Window {
    name: String,
    cron: String,
    timezone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u32>,
}

impl Window {
    fn of(w: &ScheduleWindow) -> Window {
        Window {
            name: w.name.clone(),
            cron: w.cron.clone(),
            timezone: w.timezone.clone(),
            duration: w.duration_ms.map(duration),
            end: w.end.clone(),
            min: w.min,
            max: w.max,
        }
    }
}

#[derive(Serialize)]
struct Http {
    routes: Vec<String>,
    timeout: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reuse: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reuse_idle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reuse_concurrent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<String>,
}

/// An `[env]` or `[config]` value: text, or a secret's key (its version left to the apply).
#[derive(Serialize)]
#[serde(untagged)]
enum Value {
    Text(String),
    Secret { secret: String, key: String },
}

/// Text values and secrets' keys, merged back into one table.
fn values(
    text: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, SecretKeyRef>,
) -> BTreeMap<String, Value> {
    let text = text
        .iter()
        .map(|(k, v)| (k.clone(), Value::Text(v.clone())));
    let secrets = secrets.iter().map(|(k, r)| {
        let value = Value::Secret {
            secret: r.secret.clone(),
            key: r.key.clone(),
        };
        (k.clone(), value)
    });
    text.chain(secrets).collect()
}

#[derive(Serialize)]
struct Placement {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    node_selector: BTreeMap<String, String>,
    spread: Spread,
}

#[derive(Serialize)]
struct Network {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outbound: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inbound: Option<Vec<String>>,
}

#[derive(Serialize)]
struct KeyValue {
    buckets: Vec<String>,
}

#[derive(Serialize)]
struct Volume {
    name: String,
    mount: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
}

#[derive(Serialize)]
struct Job {
    #[serde(skip_serializing_if = "Option::is_none")]
    restart: Option<Restart>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<Concurrency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    starting_deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<History>,
}

#[derive(Serialize)]
struct Health {
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness: Option<ProbeFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    liveness: Option<ProbeFile>,
}

#[derive(Serialize)]
struct ProbeFile {
    path: String,
    period: String,
    timeout: String,
    failure_threshold: u32,
    success_threshold: u32,
}

impl ProbeFile {
    fn of(p: &Probe) -> ProbeFile {
        ProbeFile {
            path: p.path.clone(),
            period: duration(p.period_ms),
            timeout: duration(p.timeout_ms),
            failure_threshold: p.failure_threshold,
            success_threshold: p.success_threshold,
        }
    }
}

#[derive(Serialize)]
struct Rollout {
    strategy: Strategy,
    max_surge: u32,
    max_unavailable: u32,
    progress_deadline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_ready: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    analysis: Option<Analysis>,
}

#[derive(Serialize)]
struct Step {
    weight: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pause: Option<String>,
}

#[derive(Serialize)]
struct Analysis {
    min_requests: u64,
    max_error_rate_increase: f64,
    max_p99_ratio: f64,
}

impl File {
    fn of(s: &AppSpec) -> File {
        let c = &s.component;
        let r = &s.resources;
        let scale = match &s.scale.autoscale {
            Some(a) => Scale {
                replicas: None,
                min: Some(a.min),
                max: Some(a.max),
                target_concurrency: Some(a.target_concurrency),
                target_rps: a.target_rps,
                window: Some(duration(a.window_ms)),
                // The file refuses `idle` unless the app may go to zero.
                idle: s.scale.may_idle_to_zero().then(|| duration(a.idle_ms)),
                schedule: Vec::new(),
            },
            None => Scale {
                replicas: Some(s.replicas),
                min: None,
                max: None,
                target_concurrency: None,
                target_rps: None,
                window: None,
                idle: None,
                schedule: Vec::new(),
            },
        };
        let scale = Scale {
            schedule: s.scale.schedule.iter().map(Window::of).collect(),
            ..scale
        };
        let runs = &s.runs;
        let defaults = crate::spec::JobRuns::default();
        File {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            config_sets: s.config_sets.iter().map(|c| c.name.clone()).collect(),
            component: Component {
                digest: c.oci.is_none().then(|| c.digest.clone()),
                oci: c.oci.clone(),
                pull_secret: s.pull_secret.clone(),
                kind: c.kind,
                args: c.args.clone(),
            },
            resources: Resources {
                max_concurrency: r.max_concurrency,
                requests: Quantities {
                    // A request left out would be the limit's, as in Kubernetes.
                    cpu: (r.requests.cpu_millis != 0 || r.limits.cpu_millis.is_some())
                        .then(|| cpu(r.requests.cpu_millis)),
                    memory: memory(r.requests.memory_bytes),
                },
                limits: Quantities {
                    cpu: r.limits.cpu_millis.map(cpu),
                    memory: memory(r.limits.memory_bytes),
                },
            },
            scale,
            http: s.http.as_ref().map(|h| Http {
                routes: h.routes.iter().map(ToString::to_string).collect(),
                timeout: duration(h.timeout_ms),
                reuse: (h.reuse != 1).then_some(h.reuse),
                reuse_idle: (h.reuse_idle_ms != DEFAULT_REUSE_IDLE_MS)
                    .then(|| duration(h.reuse_idle_ms)),
                reuse_concurrent: (h.reuse_concurrent != DEFAULT_REUSE_CONCURRENT)
                    .then_some(h.reuse_concurrent),
                tls: h.tls.as_ref().map(|t| t.secret.clone()),
            }),
            env: values(&s.env, &s.secret_env),
            config: values(&s.config, &s.secret_config),
            placement: (!s.placement.is_default()).then(|| Placement {
                node_selector: s.placement.node_selector.clone(),
                spread: s.placement.spread,
            }),
            network: (!s.outbound.is_empty() || s.inbound.is_some()).then(|| Network {
                outbound: s.outbound.clone(),
                inbound: s.inbound.clone(),
            }),
            keyvalue: (!s.keyvalue.is_empty()).then(|| KeyValue {
                buckets: s.keyvalue.clone(),
            }),
            volumes: s
                .volumes
                .iter()
                .map(|v| Volume {
                    name: v.name.clone(),
                    mount: v.mount.clone(),
                    read_only: v.read_only,
                    size: v.size_bytes.map(memory),
                })
                .collect(),
            // A spec sent as JSON may give a schedule without the rest: kept all the same.
            job: (s.job.is_some() || *runs != defaults).then(|| Job {
                restart: s.job.as_ref().map(|j| j.restart),
                retries: s.job.as_ref().map(|j| j.retries),
                deadline: s.job.as_ref().and_then(|j| j.deadline_ms).map(duration),
                schedule: runs.schedule.clone(),
                timezone: (runs.timezone != defaults.timezone).then(|| runs.timezone.clone()),
                concurrency: (runs.concurrency != defaults.concurrency).then_some(runs.concurrency),
                starting_deadline: runs.starting_deadline_ms.map(duration),
                history: (runs.history != defaults.history).then(|| runs.history.clone()),
            }),
            health: (!s.health.is_default()).then(|| Health {
                readiness: s.health.readiness.as_ref().map(ProbeFile::of),
                liveness: s.health.liveness.as_ref().map(ProbeFile::of),
            }),
            rollout: (!s.rollout.is_default()).then(|| {
                let o = &s.rollout;
                Rollout {
                    strategy: o.strategy,
                    max_surge: o.max_surge,
                    max_unavailable: o.max_unavailable,
                    progress_deadline: duration(o.progress_deadline_ms),
                    min_ready: (o.min_ready_ms != 0).then(|| duration(o.min_ready_ms)),
                    steps: o
                        .steps
                        .iter()
                        .map(|step| Step {
                            weight: step.weight,
                            pause: step.pause_ms.map(duration),
                        })
                        .collect(),
                    analysis: (o.analysis != crate::spec::Analysis::default()).then(|| Analysis {
                        min_requests: o.analysis.min_requests,
                        max_error_rate_increase: f64::from(o.analysis.max_error_rate_increase_bp)
                            / 10_000.0,
                        max_p99_ratio: f64::from(o.analysis.max_p99_ratio_pct) / 100.0,
                    }),
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::parse_app;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Parsed, written back and parsed again: the same spec.
    fn round_trip(src: &str) -> String {
        let first = parse_app(src).unwrap().resolve(DIGEST.into()).unwrap();
        let text = first.to_toml();
        let again = parse_app(&text)
            .unwrap_or_else(|e| panic!("{e}\nin:\n{text}"))
            .resolve(DIGEST.into())
            .unwrap();
        assert_eq!(first, again, "written back as:\n{text}");
        text
    }

    #[test]
    fn every_field_an_http_app_can_have_comes_back_the_same() {
        let text = round_trip(
            r#"
            name = "shop"
            namespace = "team-a"
            config_sets = ["shared", "eu"]

            [component]
            path = "shop.wasm"
            kind = "http"

            [resources]
            requests = { cpu = "0m", memory = "3000" }
            limits = { memory = "48Mi", cpu = "1.5" }
            max_concurrency = 7

            [scale]
            min = 0
            max = 9
            target_concurrency = 3
            target_rps = 40
            window = "90s"
            idle = "1h 15m"

            [[scale.schedule]]
            name = "day"
            cron = "0 9 * * MON-FRI"
            timezone = "Asia/Seoul"
            duration = "9h"
            replicas = 3

            [[scale.schedule]]
            cron = "0 0 * * SAT"
            end = "0 0 * * MON"
            max = 2

            [http]
            routes = ["/shop", "api.example.com/v1"]
            timeout = "1500ms"
            reuse = 64
            reuse_idle = "2m"
            reuse_concurrent = 4
            tls = "shop-tls"

            [env]
            GREETING = "it's \"quoted\"\nand multi-line"
            DB_PASSWORD = { secret = "db", key = "password" }
            NODE = "$(node)"

            [config]
            "log.level" = "debug"
            token = { secret = "api", key = "token" }

            [placement]
            node_selector = { zone = "a", disk = "ssd" }
            spread = "required"

            [network]
            outbound = ["api.stripe.com:443", "10.0.0.1"]
            inbound = []

            [keyvalue]
            buckets = ["carts"]

            [[volumes]]
            name = "data"
            mount = "/data"
            size = "3Gi"

            [[volumes]]
            name = "static"
            mount = "/srv/static"
            read_only = true

            [health]
            readiness = { path = "/ready", period = "2s", timeout = "500ms", failure_threshold = 5, success_threshold = 2 }
            liveness = { path = "/live" }

            [rollout]
            strategy = "canary"
            max_surge = 2
            max_unavailable = 1
            progress_deadline = "20m"
            min_ready = "15s"
            steps = [{ weight = 10, pause = "30s" }, { weight = 50 }]
            analysis = { min_requests = 50, max_error_rate_increase = 0.015, max_p99_ratio = 1.25 }
            "#,
        );
        assert!(text.contains("digest = \"sha256:0123"), "{text}");
    }

    #[test]
    fn jobs_daemons_and_defaults_come_back_the_same() {
        round_trip(
            r#"
            name = "nightly"
            [component]
            digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            kind = "job"
            args = ["--full", "--since=1d"]
            [job]
            restart = "on-failure"
            retries = 5
            deadline = "10m"
            schedule = "0 3 * * *"
            timezone = "Europe/Paris"
            concurrency = "forbid"
            starting_deadline = "5m"
            history = { succeeded = 7, failed = 2 }
            "#,
        );
        round_trip(
            r#"
            name = "once"
            [component]
            path = "x.wasm"
            kind = "job"
            "#,
        );
        round_trip(
            r#"
            name = "worker"
            [component]
            path = "x.wasm"
            kind = "daemon"
            [resources]
            limits = { cpu = "250m" }
            [scale]
            replicas = 0
            [rollout]
            max_surge = 0
            max_unavailable = 1
            "#,
        );
        let text = round_trip(
            r#"
            name = "bare"
            [component]
            path = "x.wasm"
            kind = "http"
            "#,
        );
        assert!(!text.contains("rollout"), "defaults stay out:\n{text}");
        // An app that idles to zero only while a window with `min = 0` is open keeps its
        // `idle`; a mount that gives no size gives none written back.
        let text = round_trip(
            r#"
            name = "nights"
            [component]
            path = "x.wasm"
            kind = "http"
            [[volumes]]
            name = "data"
            mount = "/data"
            read_only = true
            [scale]
            min = 1
            max = 4
            idle = "2m"
            [[scale.schedule]]
            name = "night"
            cron = "0 0 * * *"
            duration = "6h"
            min = 0
            "#,
        );
        assert!(text.contains("idle = \"2m\""), "{text}");
        assert!(!text.contains("size"), "{text}");
    }

    #[test]
    fn the_examples_come_back_the_same() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let spec = entry.unwrap().path().join("app.toml");
            if let Ok(src) = std::fs::read_to_string(&spec) {
                round_trip(&src);
                seen += 1;
            }
        }
        assert!(seen >= 5, "only {seen} examples found in {dir}");
    }

    #[test]
    fn an_oci_component_comes_back_as_its_reference_and_secret_versions_are_left_to_the_apply() {
        let mut spec = parse_app(
            r#"
            name = "pulled"
            [component]
            oci = "registry.example.com/team/hello:1.2.0"
            pull_secret = "regcred"
            kind = "http"
            [env]
            KEY = { secret = "s", key = "k" }
            "#,
        )
        .unwrap()
        .unresolved();
        spec.component.digest = DIGEST.into();
        spec.secret_env.get_mut("KEY").unwrap().version = Some(4);
        let text = spec.to_toml();
        assert!(
            text.contains("oci = \"registry.example.com/team/hello:1.2.0\"")
                && !text.contains("digest")
                && !text.contains("version"),
            "{text}"
        );
        let again = parse_app(&text).unwrap().unresolved();
        assert_eq!(again.pull_secret.as_deref(), Some("regcred"));
        assert_eq!(again.secret_env["KEY"].version, None);
    }

    #[test]
    fn the_fingerprint_follows_the_spec_but_not_an_autoscalers_replicas() {
        let spec = |src: &str| parse_app(src).unwrap().resolve(DIGEST.into()).unwrap();
        let fixed = spec("name = \"a\"\n[component]\npath = \"x.wasm\"\nkind = \"http\"\n");
        let mut scaled = fixed.clone();
        scaled.replicas = 3;
        assert_ne!(fixed.fingerprint(), scaled.fingerprint());
        let auto = spec(
            "name = \"a\"\n[component]\npath = \"x.wasm\"\nkind = \"http\"\n[scale]\nmax = 5\n",
        );
        let mut moved = auto.clone();
        moved.replicas = 4;
        assert_eq!(auto.fingerprint(), moved.fingerprint());
        let mut edited = auto.clone();
        edited.env.insert("A".into(), "b".into());
        assert_ne!(auto.fingerprint(), edited.fingerprint());
    }
}
