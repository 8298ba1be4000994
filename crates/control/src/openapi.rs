//! The `/v1` API as an OpenAPI 3.1 document, served at `GET /v1/openapi.json`. It is built
//! from the route lists the router is built from ([`crate::api`]), each route with its
//! [`Op`], and its schemas are derived from the wire types themselves (`utoipa::ToSchema` in
//! `shoal-api` and `shoal-core`), so a route cannot be served undocumented and a renamed
//! field renames itself in the document.

use crate::access::Scope;
use axum::http::{Method, StatusCode};
use shoal_core::auth::Role;
use shoal_core::problem::ErrorBody;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use utoipa::openapi::path::{HttpMethod, Operation, Parameter, ParameterIn};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    Components, Content, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required,
    Response,
};
use utoipa::{IntoParams, ToSchema};

/// Who may call a route: what credential the document asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Access {
    /// Anyone: what a client needs before it has a credential.
    Public,
    /// The cluster's join token, which only trades itself for a node credential.
    JoinToken,
    /// A node's own credential, acting for that node.
    Node,
    /// The admin token or an API token of at least this role, in this scope.
    Token(Role, Scope),
}

/// One route as the router serves it and the document describes it.
pub(crate) struct Endpoint {
    pub method: Method,
    /// As the router spells it: `{*key}` for a wildcard.
    pub path: &'static str,
    /// The handler's name, which is the operation's id.
    pub id: &'static str,
    pub access: Access,
    /// Called only for the document, so building a router derives no schema.
    pub op: fn() -> Op,
}

/// Named schemas an operation refers to, by name.
type Schemas = Vec<(String, RefOr<Schema>)>;

/// A body's media type and, for JSON, its schema.
type Payload = (&'static str, Option<RefOr<Schema>>);

/// One operation's summary, parameters, body and answers, and the schemas they name. Errors
/// are not listed: every operation answers them in the one shape ([`ErrorBody`]).
pub(crate) struct Op {
    summary: &'static str,
    parameters: Vec<Parameter>,
    /// Path parameters whose schema is a type's, not a plain string.
    typed_path: Vec<(&'static str, RefOr<Schema>)>,
    body: Option<Payload>,
    answers: Vec<(StatusCode, Option<Payload>)>,
    schemas: Schemas,
}

const JSON: &str = "application/json";

/// An operation that does what `summary` says.
pub(crate) fn op(summary: &'static str) -> Op {
    Op {
        summary,
        parameters: Vec::new(),
        typed_path: Vec::new(),
        body: None,
        answers: Vec::new(),
        schemas: Vec::new(),
    }
}

impl Op {
    /// Query parameters: the fields of the struct the handler parses the query into.
    pub(crate) fn query<Q: IntoParams>(mut self) -> Self {
        self.parameters
            .extend(Q::into_params(|| Some(ParameterIn::Query)));
        self
    }

    /// The path parameter `name` takes the values of `T` (an enum of actions, say).
    pub(crate) fn param<T: ToSchema>(mut self, name: &'static str) -> Self {
        let schema = self.named::<T>();
        self.typed_path.push((name, schema));
        self
    }

    /// A JSON body of a `T`.
    pub(crate) fn body<T: ToSchema>(mut self) -> Self {
        let schema = self.named::<T>();
        self.body = Some((JSON, Some(schema)));
        self
    }

    /// A JSON body of a list of `T`s.
    pub(crate) fn body_list<T: ToSchema>(mut self) -> Self {
        let schema = self.list::<T>();
        self.body = Some((JSON, Some(schema)));
        self
    }

    /// A body of bytes of `media` type, not JSON.
    pub(crate) fn body_raw(mut self, media: &'static str) -> Self {
        self.body = Some((media, None));
        self
    }

    /// Answers `status` with a JSON `T`.
    pub(crate) fn json<T: ToSchema>(mut self, status: StatusCode) -> Self {
        let schema = self.named::<T>();
        self.answers.push((status, Some((JSON, Some(schema)))));
        self
    }

    /// Answers `status` with a JSON list of `T`s.
    pub(crate) fn json_list<T: ToSchema>(mut self, status: StatusCode) -> Self {
        let schema = self.list::<T>();
        self.answers.push((status, Some((JSON, Some(schema)))));
        self
    }

    /// Answers `status` with a stream of JSON `T`s, one per line, for as long as it lasts.
    pub(crate) fn lines<T: ToSchema>(mut self, status: StatusCode) -> Self {
        let schema = self.named::<T>();
        self.answers
            .push((status, Some(("application/x-ndjson", Some(schema)))));
        self
    }

    /// Answers `status` with bytes or text of `media` type.
    pub(crate) fn raw(mut self, status: StatusCode, media: &'static str) -> Self {
        self.answers.push((status, Some((media, None))));
        self
    }

    /// Answers `status` with no body.
    pub(crate) fn empty(mut self, status: StatusCode) -> Self {
        self.answers.push((status, None));
        self
    }

    fn named<T: ToSchema>(&mut self) -> RefOr<Schema> {
        named::<T>(&mut self.schemas)
    }

    fn list<T: ToSchema>(&mut self) -> RefOr<Schema> {
        let item = self.named::<T>();
        ArrayBuilder::new().items(item).build().into()
    }

    fn operation(self, endpoint: &Endpoint, path: &str) -> (Operation, Schemas) {
        for (name, _) in &self.typed_path {
            assert!(
                path_params(path).any(|p| p == *name),
                "{path} has no parameter {name}"
            );
        }
        let mut parameters: Vec<Parameter> = path_params(path)
            .map(|name| {
                let schema = self
                    .typed_path
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_else(|| ObjectBuilder::new().schema_type(Type::String).into());
                Parameter::builder()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .description(path_param_description(name))
                    .schema(Some(schema))
                    .build()
            })
            .collect();
        parameters.extend(self.parameters);
        let mut operation = Operation::builder()
            .operation_id(Some(endpoint.id))
            .summary(Some(self.summary))
            .tag(tag(endpoint.path))
            .parameters(Some(parameters))
            .request_body(self.body.map(|(media, schema)| {
                RequestBody::builder()
                    .required(Some(Required::True))
                    .content(media, Content::new(schema))
                    .build()
            }));
        for (status, body) in self.answers {
            let mut response =
                Response::builder().description(status.canonical_reason().unwrap_or_default());
            if let Some((media, schema)) = body {
                response = response.content(media, Content::new(schema));
            }
            operation = operation.response(status.as_str(), response.build());
        }
        operation = operation.response("default", Ref::from_response_name("Error"));
        operation = match endpoint.access {
            Access::Public => operation.description(Some("Needs no credential.")),
            Access::JoinToken => operation
                .security(SecurityRequirement::new("joinToken", Vec::<String>::new()))
                .description(Some("Needs the cluster's join token.")),
            Access::Node => operation
                .security(SecurityRequirement::new(
                    "nodeCredential",
                    Vec::<String>::new(),
                ))
                .description(Some(
                    "Needs the credential of a node that has joined; it acts for that node only.",
                )),
            Access::Token(role, scope) => operation
                .security(SecurityRequirement::new("token", Vec::<String>::new()))
                .description(Some(format!(
                    "Needs a token of role {role} or above. {}",
                    scope_description(scope)
                )))
                .extensions(Some(
                    [
                        ("x-shoal-role", role.as_str()),
                        ("x-shoal-scope", scope_name(scope)),
                    ]
                    .into_iter()
                    .collect(),
                )),
        };
        (operation.build(), self.schemas)
    }
}

/// A reference to `T`'s schema, which goes into `schemas` with those it names.
fn named<T: ToSchema>(schemas: &mut Schemas) -> RefOr<Schema> {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
    Ref::from_schema_name(T::name()).into()
}

/// The route as OpenAPI spells it: a wildcard `{*key}` is the parameter `{key}`.
pub(crate) fn openapi_path(path: &str) -> String {
    path.replace("{*", "{")
}

/// The names of the parameters of a path as OpenAPI spells it, in order.
fn path_params(path: &str) -> impl Iterator<Item = &str> + Clone {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
}

fn path_param_description(name: &str) -> Option<&'static str> {
    Some(match name {
        "name" => "Its name.",
        "digest" => "The module's digest: `sha256:` and 64 lowercase hex digits.",
        "action" => "What to do.",
        "bucket" => "The key-value bucket.",
        "key" => "The key; it may hold slashes.",
        "namespace" => "The app's namespace.",
        "app" => "The app's name.",
        "id" => "The replica's id.",
        _ => return None,
    })
}

/// Operations are grouped by what they act on: the first segment after `/v1/`.
fn tag(path: &str) -> &str {
    path.trim_start_matches("/v1/")
        .split(['/', '.'])
        .next()
        .unwrap_or_default()
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Cluster => "cluster",
        Scope::Shared => "shared",
        Scope::Namespace => "namespace",
        Scope::NamespaceOrAll => "namespace-or-all",
        Scope::Body => "body",
        Scope::InPath => "namespace-in-path",
    }
}

fn scope_description(scope: Scope) -> &'static str {
    match scope {
        Scope::Cluster => "It is cluster-wide: a token limited to namespaces may not call it.",
        Scope::Shared => "Modules are shared by every namespace: any token of the role may.",
        Scope::Namespace => {
            "It acts in `?namespace=` (`default` when absent), which the token must reach."
        }
        Scope::NamespaceOrAll => {
            "It acts in `?namespace=`, or in every namespace when absent: a token limited to \
             namespaces must name one of its own."
        }
        Scope::Body => {
            "It acts in the namespace of the app in the body, which the token must reach."
        }
        Scope::InPath => "It acts in the path's namespace, which the token must reach.",
    }
}

/// The HTTP method as OpenAPI names it; the routes use none it cannot.
fn http_method(method: &Method) -> HttpMethod {
    [
        (Method::GET, HttpMethod::Get),
        (Method::POST, HttpMethod::Post),
        (Method::PUT, HttpMethod::Put),
        (Method::DELETE, HttpMethod::Delete),
        (Method::PATCH, HttpMethod::Patch),
        (Method::HEAD, HttpMethod::Head),
        (Method::OPTIONS, HttpMethod::Options),
        (Method::TRACE, HttpMethod::Trace),
    ]
    .into_iter()
    .find_map(|(m, h)| (m == method).then_some(h))
    .unwrap_or_else(|| panic!("OpenAPI 3.1 has no {method} operation"))
}

/// The document of `endpoints`.
pub(crate) fn document(endpoints: &[Endpoint]) -> OpenApi {
    let mut paths = Paths::new();
    let mut schemas = BTreeMap::new();
    let mut add = |found: Schemas| {
        for (name, schema) in found {
            if let Some(other) = schemas.insert(name.clone(), schema.clone()) {
                assert!(other == schema, "two types have the schema name {name}");
            }
        }
    };
    let mut errors = Vec::new();
    let error = named::<ErrorBody>(&mut errors);
    add(errors);
    for endpoint in endpoints {
        let path = openapi_path(endpoint.path);
        let (operation, found) = (endpoint.op)().operation(endpoint, &path);
        add(found);
        paths.add_path_operation(path, vec![http_method(&endpoint.method)], operation);
    }
    let bearer = |description: &str| {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(description.to_string());
        SecurityScheme::Http(http)
    };
    let components = Components::builder()
        .schemas_from_iter(schemas)
        .response(
            "Error",
            Response::builder()
                .description("An error: a stable code for programs and a message for people.")
                .content(JSON, Content::new(Some(error)))
                .build(),
        )
        .security_scheme(
            "token",
            bearer(
                "The admin token (the data dir's `token` file) or an API token \
                 (`shoal token create`).",
            ),
        )
        .security_scheme(
            "joinToken",
            bearer("The cluster's join token (the data dir's `join-token` file)."),
        )
        .security_scheme(
            "nodeCredential",
            bearer("A node's own credential, `NAME.SECRET`, which joining gives it."),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Shoal")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The control plane's `/v1` API. Every error answers \
                     `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`.",
                )),
        )
        .paths(paths)
        .components(Some(components))
        .build()
}

/// The document as served: built once, since it depends on the code alone.
pub(crate) fn json() -> bytes::Bytes {
    static DOCUMENT: LazyLock<bytes::Bytes> = LazyLock::new(|| {
        serde_json::to_vec(&document(&crate::api::endpoints()))
            .expect("an OpenAPI document is JSON")
            .into()
    });
    DOCUMENT.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn served() -> Value {
        serde_json::from_slice(&json()).unwrap()
    }

    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    found.push(r);
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_and_every_ref_resolves() {
        let doc = served();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3."),
            "{}",
            doc["openapi"]
        );
        assert_eq!(doc["info"]["title"], "Shoal");
        assert!(doc["info"]["version"].is_string());
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 100, "{} refs", found.len());
        for r in found {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r} is not local"));
            let target = doc.pointer(pointer);
            assert!(
                target.is_some_and(Value::is_object),
                "{r} resolves to nothing"
            );
            assert!(
                r.starts_with("#/components/schemas/") || r == "#/components/responses/Error",
                "{r} is not a component"
            );
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in schemas.keys() {
            // A primitive's name here means an alias (`Millis`) hid the primitive from utoipa.
            assert!(
                name.starts_with(char::is_uppercase),
                "a schema named {name}"
            );
        }
        let schemes = &doc["components"]["securitySchemes"];
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let names = path_params(path);
            assert!(
                names
                    .clone()
                    .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
                "{path}: a parameter OpenAPI cannot name"
            );
            for (method, op) in item.as_object().unwrap() {
                let what = format!("{method} {path}");
                assert!(
                    ["get", "put", "post", "patch", "delete", "head", "options"]
                        .contains(&method.as_str()),
                    "{what}"
                );
                assert!(
                    ids.insert(op["operationId"].as_str().unwrap()),
                    "{what}: its id again"
                );
                assert!(op["summary"].is_string(), "{what}");
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.keys().any(|s| s.starts_with('2')), "{what}");
                assert!(responses.contains_key("default"), "{what}");
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert_eq!(declared, names.clone().collect::<Vec<_>>(), "{what}");
                for requirement in op["security"].as_array().into_iter().flatten() {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert_eq!(schemes[scheme]["scheme"], "bearer", "{what}: {scheme}");
                    }
                }
            }
        }
    }

    /// Whether `value` could be a `name` as the document says: every field it has is a
    /// property of the schema (or of one it is made of), and it has every required one.
    fn fits(doc: &Value, name: &str, value: &Value) {
        let mut properties = BTreeSet::new();
        let mut required = BTreeSet::new();
        let mut parts = vec![&doc["components"]["schemas"][name]];
        while let Some(schema) = parts.pop() {
            assert!(schema.is_object(), "no schema {name}");
            if let Some(r) = schema["$ref"].as_str() {
                parts.push(doc.pointer(r.trim_start_matches('#')).unwrap());
            }
            parts.extend(schema["allOf"].as_array().into_iter().flatten());
            properties.extend(
                schema["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.as_str()),
            );
            required.extend(
                schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| k.as_str().unwrap()),
            );
        }
        let fields: BTreeSet<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            fields.is_subset(&properties),
            "{name}: {fields:?} against {properties:?}"
        );
        assert!(
            required.is_subset(&fields),
            "{name}: {fields:?} lacks some of {required:?}"
        );
    }

    /// Serde's attributes shape the schemas as they shape the JSON: renames, defaults, fields
    /// left out when empty, flattened structs and tagged enums.
    #[test]
    fn schemas_describe_what_the_types_serialise_to() {
        let doc = served();
        let digest = format!("sha256:{}", "a".repeat(64));
        let spec = shoal_core::spec::parse_app(
            "name = \"web\"\n[component]\npath = \"web.wasm\"\nkind = \"http\"\n\
             [http]\nroutes = [\"/web\"]\n[env]\nGREETING = \"hi\"\n",
        )
        .unwrap()
        .resolve(digest)
        .unwrap();
        fits(&doc, "AppSpec", &serde_json::to_value(&spec).unwrap());
        let node = shoal_core::Node {
            name: "n1".into(),
            gateway: "n1:8080".into(),
            capacity: Default::default(),
            labels: Default::default(),
            state: shoal_core::NodeState::Ready,
            schedulable: true,
            draining: false,
            leaving: None,
            joined_at: 0,
            label_overrides: Default::default(),
        };
        let summary = shoal_api::NodeSummary {
            node,
            allocated: Default::default(),
            replicas: 0,
            last_heartbeat: 0,
            silent: false,
            instances_alive: Some(1),
        };
        fits(
            &doc,
            "NodeSummary",
            &serde_json::to_value(&summary).unwrap(),
        );
        let event = shoal_core::Event {
            seq: 1,
            time: 0,
            kind: shoal_core::EventType::Normal,
            reason: "Scheduled".into(),
            object: "node/n1".into(),
            app: None,
            message: "m".into(),
        };
        fits(&doc, "Event", &serde_json::to_value(&event).unwrap());
        let error = ErrorBody::new(shoal_core::problem::ErrorCode::NotFound, "gone");
        fits(&doc, "ErrorBody", &serde_json::to_value(&error).unwrap());
        // `Change::Put` holds an `Object`, which utoipa would take for any JSON object by name.
        assert_eq!(
            doc["components"]["schemas"]["Change"]["oneOf"][0]["properties"]["put"]["$ref"],
            "#/components/schemas/Object"
        );
        // Each variant of an internally tagged enum carries its tag.
        let ops = doc["components"]["schemas"]["KvOp"]["oneOf"]
            .as_array()
            .unwrap();
        assert_eq!(ops.len(), 6);
        for variant in ops {
            assert!(
                variant["required"]
                    .as_array()
                    .unwrap()
                    .contains(&"op".into()),
                "{variant}"
            );
        }
        assert_eq!(
            doc["components"]["schemas"]["Role"]["enum"],
            serde_json::json!(["viewer", "deployer", "admin"])
        );
    }
}
