//! Property tests, with shrinking, for every route of the API that takes a JSON body: arbitrary
//! JSON (nested, huge and odd numbers, unicode, nulls, duplicate keys, deep nesting) and
//! arbitrary edits of a body the route accepts are posted with the right credential. The answer
//! is never a 5xx (nor a panic), and every 4xx is Shoal's error shape with a code.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestError, TestRunner};
use shoal_control::{ControlConfig, ControlPlane};
use tower::ServiceExt;

/// A JSON document as text is written: numbers and some strings kept as their raw text (so
/// they can be out of any range, or not quite JSON), objects as lists (so keys can repeat).
#[derive(Clone, Debug)]
enum Json {
    Null,
    Bool(bool),
    /// Written as is: a number of any size, or a token that is almost one.
    Raw(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn render(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Raw(raw) => out.push_str(raw),
            Json::Str(s) => out.push_str(&serde_json::to_string(s).expect("a string renders")),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.render(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(key).expect("a key renders"));
                    out.push(':');
                    value.render(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    fn from_value(value: &serde_json::Value) -> Json {
        use serde_json::Value;
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Raw(n.to_string()),
            Value::String(s) => Json::Str(s.clone()),
            Value::Array(items) => Json::Arr(items.iter().map(Json::from_value).collect()),
            Value::Object(fields) => Json::Obj(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::from_value(v)))
                    .collect(),
            ),
        }
    }

    /// Every node's path from the root, the root included.
    fn paths(&self, at: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        out.push(at.clone());
        let children: Vec<&Json> = match self {
            Json::Arr(items) => items.iter().collect(),
            Json::Obj(fields) => fields.iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        for (i, child) in children.into_iter().enumerate() {
            at.push(i);
            child.paths(at, out);
            at.pop();
        }
    }

    fn at_mut(&mut self, path: &[usize]) -> &mut Json {
        match (self, path) {
            (node, []) => node,
            (Json::Arr(items), [i, rest @ ..]) => items[*i].at_mut(rest),
            (Json::Obj(fields), [i, rest @ ..]) => fields[*i].1.at_mut(rest),
            _ => unreachable!("paths come from the same tree"),
        }
    }

    fn apply(&mut self, edit: &Edit) {
        let mut paths = Vec::new();
        self.paths(&mut Vec::new(), &mut paths);
        let path = edit.at().get(&paths).clone();
        match edit {
            Edit::Replace(_, with) => *self.at_mut(&path) = with.clone(),
            Edit::Remove(_) => match path.split_last() {
                Some((last, parent)) => match self.at_mut(parent) {
                    Json::Arr(items) => {
                        items.remove(*last);
                    }
                    Json::Obj(fields) => {
                        fields.remove(*last);
                    }
                    _ => unreachable!("a parent holds children"),
                },
                None => *self = Json::Null,
            },
            Edit::Tweak(_, word, number) => match self.at_mut(&path) {
                Json::Str(s) => *s = word.clone(),
                Json::Raw(n) => *n = number.clone(),
                Json::Bool(b) => *b = !*b,
                _ => {}
            },
            Edit::Insert(_, key, value) => match self.at_mut(&path) {
                Json::Obj(fields) => fields.push((key.clone(), value.clone())),
                Json::Arr(items) => items.push(value.clone()),
                leaf => *leaf = value.clone(),
            },
        }
    }
}

/// One change to a body: each picks its place among the body's nodes.
#[derive(Clone, Debug)]
enum Edit {
    Replace(Index, Json),
    Remove(Index),
    /// A field (a key the types know, or any) into an object, an item into an array.
    Insert(Index, String, Json),
    /// A string, number or boolean changed for another of its kind, so the body keeps its
    /// shape and goes on to be validated and stored.
    Tweak(Index, String, String),
}

impl Edit {
    fn at(&self) -> &Index {
        match self {
            Edit::Replace(at, _)
            | Edit::Remove(at)
            | Edit::Insert(at, _, _)
            | Edit::Tweak(at, _, _) => at,
        }
    }
}

/// Field names of the bodies the API takes, so arbitrary objects hit real fields too.
const KEYS: &[&str] = &[
    "name",
    "namespace",
    "node",
    "app",
    "replica",
    "phase",
    "reason",
    "message",
    "role",
    "namespaces",
    "component",
    "digest",
    "kind",
    "capacity",
    "memory_bytes",
    "cpu_millis",
    "instances",
    "labels",
    "state",
    "revision",
    "requests",
    "errors",
    "latency",
    "counts",
    "used_ns",
    "throttled_ns",
    "replicas",
    "resources",
    "http",
    "routes",
    "scale",
    "env",
    "gateway",
];

/// Strings the API gives meaning to, and strings it should refuse.
const WORDS: &[&str] = &[
    "n1",
    "n2",
    "hello",
    "default",
    "Ready",
    "NotReady",
    "Running",
    "Failed",
    "Trapped",
    "OutOfMemory",
    "admin",
    "deployer",
    "viewer",
    "http",
    "job",
    "/hello",
    "127.0.0.1:1",
    "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
    " ",
    "-",
    "..",
    "../../etc/passwd",
    "\u{0}",
    "é",
    "🦀",
    "\u{202e}",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

/// Numbers, and things almost numbers, as JSON text: past u64 and i64, past f64, negative
/// zero, exponents, and a few that are not JSON at all.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e308",
    "1e309",
    "-1e400",
    "1e-400",
    "0.5",
    "1.0",
    "1E+2",
    "00",
    "1.",
    ".5",
    "NaN",
    "Infinity",
    "0x10",
];

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
    .boxed()
}

fn word() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<String> {
    prop_oneof![
        2 => (0u64..1000).prop_map(|n| n.to_string()),
        1 => prop::sample::select(NUMBERS).prop_map(str::to_string),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

fn json() -> BoxedStrategy<Json> {
    let leaf = prop_oneof![
        2 => Just(Json::Null),
        2 => any::<bool>().prop_map(Json::Bool),
        3 => any::<i64>().prop_map(|n| Json::Raw(n.to_string())),
        3 => any::<u64>().prop_map(|n| Json::Raw(n.to_string())),
        2 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Json::Raw(format!("{f:e}"))),
        3 => prop::sample::select(NUMBERS).prop_map(|n| Json::Raw(n.to_string())),
        4 => prop::sample::select(WORDS).prop_map(|s| Json::Str(s.to_string())),
        4 => any::<String>().prop_map(Json::Str),
        // Escapes serde must refuse or decode: lone surrogates, a NUL, a surrogate pair.
        1 => prop::sample::select(&["\"\\ud800\"", "\"\\udfff\\ud800\"", "\"\\u0000\"", "\"\\ud83e\\udd80\""][..])
            .prop_map(|s| Json::Raw(s.to_string())),
        // Deeper than any parser's recursion should go.
        1 => (1usize..4000).prop_map(|depth| Json::Raw("[".repeat(depth) + &"]".repeat(depth))),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Json::Arr),
            prop::collection::vec((key(), inner), 0..8).prop_map(Json::Obj),
        ]
    })
    .boxed()
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), json()).prop_map(|(at, with)| Edit::Replace(at, with)),
        2 => any::<Index>().prop_map(Edit::Remove),
        2 => (any::<Index>(), key(), json()).prop_map(|(at, k, v)| Edit::Insert(at, k, v)),
        4 => (any::<Index>(), word(), number()).prop_map(|(at, w, n)| Edit::Tweak(at, w, n)),
    ]
}

/// A body for a route whose accepted body is `template`: the template itself, a few edits
/// of it (deep fields get arbitrary values), or arbitrary JSON.
fn body(template: serde_json::Value) -> impl Strategy<Value = Json> {
    let base = Json::from_value(&template);
    prop_oneof![
        1 => Just(base.clone()),
        6 => prop::collection::vec(edit(), 1..4).prop_map(move |edits| {
            let mut body = base.clone();
            for edit in &edits {
                body.apply(edit);
            }
            body
        }),
        3 => json(),
    ]
}

/// A control plane with an admin and a join token, node `n1` joined, and a module uploaded.
struct Harness {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    router: Router,
    node_credential: String,
    digest: String,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let blobs = shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap();
        let config = ControlConfig {
            token: "admin".into(),
            join_token: "join".into(),
            join_token_file: Some(dir.path().join("join-token")),
            ..Default::default()
        };
        let cp = ControlPlane::new(store, blobs, config).unwrap();
        let node_credential = cp.join_node("n1").unwrap().credential;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let router = shoal_control::router(cp);
        let mut harness = Harness {
            _dir: dir,
            rt,
            router,
            node_credential,
            digest: String::new(),
        };
        // A real component: an apply checks that it exports what its kind runs.
        let (status, body) = harness.post_bytes(
            "/v1/modules",
            "admin",
            "application/wasm",
            shoal_fixtures::read(shoal_fixtures::HELLO_WASM),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let module: serde_json::Value = serde_json::from_str(&body).unwrap();
        harness.digest = module["module"]["digest"].as_str().unwrap().to_string();
        // An app for the nodes' reports and measurements to be about.
        let (status, body) = harness.post_bytes(
            "/v1/apps",
            "admin",
            "application/json",
            spec("hello", &harness.digest).to_string().into_bytes(),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
        harness
    }

    fn get(&self, uri: &str) -> (StatusCode, String) {
        let request = Request::get(uri)
            .header(header::AUTHORIZATION, "Bearer admin")
            .body(Body::empty())
            .unwrap();
        self.rt.block_on(async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    fn token(&self, who: Who) -> &str {
        match who {
            Who::Admin => "admin",
            Who::Join => "join",
            Who::Node => &self.node_credential,
        }
    }

    fn post_bytes(
        &self,
        uri: &str,
        token: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> (StatusCode, String) {
        let request = Request::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(bytes))
            .unwrap();
        self.rt.block_on(async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Admin,
    Join,
    Node,
}

/// What an answer must be: not a 5xx, and a 4xx in Shoal's error shape.
fn answered_well(status: StatusCode, body: &str) -> Result<(), TestCaseError> {
    prop_assert!(!status.is_server_error(), "{status}: {body}");
    if status.is_client_error() {
        let parsed: serde_json::Value = serde_json::from_str(body).map_err(|e| {
            TestCaseError::fail(format!(
                "{status} with a body that is not JSON ({e}): {body}"
            ))
        })?;
        prop_assert!(
            parsed["error"]["code"].is_string() && parsed["error"]["message"].is_string(),
            "{status} without an error code and message: {body}"
        );
    }
    Ok(())
}

/// Posts `cases` bodies made from `template` (given the uploaded module's digest) to `uri` as
/// `who`, after checking that the template itself is `accepted`.
fn posting_to(
    uri: &str,
    who: Who,
    accepted: StatusCode,
    cases: u32,
    template: impl Fn(&str) -> serde_json::Value,
) {
    let harness = Harness::new();
    let token = harness.token(who).to_string();
    let template = template(&harness.digest);
    // The credential and the template are right: what the cases get is about their bodies.
    let (status, said) = harness.post_bytes(
        uri,
        &token,
        "application/json",
        template.to_string().into_bytes(),
    );
    assert_eq!(status, accepted, "{uri}: the template itself: {said}");

    let statuses: std::sync::Mutex<std::collections::BTreeMap<u16, usize>> = Default::default();
    let sent = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    });
    let outcome = runner.run(&body(template), |body| {
        let text = body.text();
        sent.fetch_add(1, Ordering::Relaxed);
        let (status, said) = harness.post_bytes(uri, &token, "application/json", text.into_bytes());
        *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
        answered_well(status, &said)?;
        // Whatever the body left behind, what reads it still answers.
        for reader in READERS {
            let (status, said) = harness.get(reader);
            prop_assert!(
                !status.is_server_error(),
                "then GET {reader}: {status}: {said}"
            );
        }
        Ok(())
    });
    eprintln!(
        "{uri}: {} bodies, answered {:?}",
        sent.load(Ordering::Relaxed),
        statuses.lock().unwrap()
    );
    match outcome {
        Ok(()) => {}
        Err(TestError::Fail(why, body)) => {
            panic!("{uri}: {why}\nminimal body: {}", body.text())
        }
        Err(e) => panic!("{uri}: {e}"),
    }
}

/// What the admin reads of what these bodies write: apps, their measurements and rollout,
/// nodes, replicas, events and tokens.
const READERS: &[&str] = &[
    "/v1/apps",
    "/v1/apps/hello",
    "/v1/apps/hello/rollout",
    "/v1/nodes",
    "/v1/replicas",
    "/v1/events",
    "/v1/tokens",
];

const CASES: u32 = 256;

fn app(name: &str) -> serde_json::Value {
    serde_json::json!({"namespace": "default", "name": name})
}

/// An app spec as `shoal apply` posts it.
fn spec(name: &str, digest: &str) -> serde_json::Value {
    let src = format!(
        "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n\
         [resources]\nlimits = {{ memory = \"32Mi\" }}\n[scale]\nreplicas = 2\n\
         [http]\nroutes = [\"/{name}\"]\n[env]\nGREETING = \"hi\"\n"
    );
    let spec = shoal_core::spec::parse_app(&src)
        .and_then(|m| m.resolve(digest.to_string()))
        .unwrap();
    serde_json::to_value(spec).unwrap()
}

#[test]
fn apply_takes_any_json_without_a_5xx() {
    posting_to(
        "/v1/apps",
        Who::Admin,
        StatusCode::CREATED,
        CASES,
        |digest| spec("web", digest),
    );
}

#[test]
fn token_creation_takes_any_json_without_a_5xx() {
    posting_to(
        "/v1/tokens",
        Who::Admin,
        StatusCode::CREATED,
        CASES,
        |_| serde_json::json!({"name": "ci", "role": "deployer", "namespaces": ["default"]}),
    );
}

#[test]
fn joining_takes_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/join",
        Who::Join,
        StatusCode::CREATED,
        CASES,
        |_| serde_json::json!({"node": "n2"}),
    );
}

#[test]
fn node_registration_takes_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes",
        Who::Node,
        StatusCode::OK,
        CASES,
        |_| {
            serde_json::json!({
                "name": "n1", "gateway": "127.0.0.1:1", "state": "Ready", "schedulable": true,
                "draining": false, "joined_at": 0, "labels": {"zone": "a"},
                "capacity": {"cpu_millis": 1000, "memory_bytes": 1073741824u64, "instances": 10}
            })
        },
    );
}

#[test]
fn replica_reports_take_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes/n1/reports",
        Who::Node,
        StatusCode::NO_CONTENT,
        CASES,
        |_| {
            serde_json::json!({
                "app": app("hello"), "replica": "hello-0001", "node": "n1", "phase": "Ready",
                "message": "ready", "exit_code": null, "restarts": 0
            })
        },
    );
}

#[test]
fn node_metrics_take_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes/n1/metrics",
        Who::Node,
        StatusCode::NO_CONTENT,
        CASES,
        |_| {
            serde_json::json!([{
                "app": app("hello"), "revision": 1, "requests": 10, "errors": 1,
                "latency": {"counts": [1, 2, 3]}, "busy_ms": 5
            }])
        },
    );
}

#[test]
fn node_cpu_usage_takes_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes/n1/cpu",
        Who::Node,
        StatusCode::NO_CONTENT,
        CASES,
        |_| serde_json::json!([{"app": app("hello"), "used_ns": 1000, "throttled_ns": 0}]),
    );
}

#[test]
fn node_waiting_counts_take_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes/n1/waiting",
        Who::Node,
        StatusCode::NO_CONTENT,
        CASES,
        |_| serde_json::json!([{"app": app("hello"), "requests": 3}]),
    );
}

#[test]
fn incidents_take_any_json_without_a_5xx() {
    posting_to(
        "/v1/cluster/nodes/n1/incidents",
        Who::Node,
        StatusCode::NO_CONTENT,
        CASES,
        |_| {
            serde_json::json!({
                "app": app("hello"), "replica": "hello-0001", "node": "n1",
                "reason": "Trapped", "message": "GET /: guest trapped"
            })
        },
    );
}
