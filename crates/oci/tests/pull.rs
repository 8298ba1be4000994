//! Pulls from registries that are not Debian's `docker-registry` (which `tests/oci.rs` runs):
//! one with token authentication, as public registries have, and hostile ones whose answers
//! never end. Each is a small axum server on loopback.

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use shoal_core::oci::OciRef;
use shoal_oci::{Credentials, OciError, Registry, component_config, component_manifest, sha256};

const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr.to_string()
}

/// A body of `n` MiB of spaces, sent as it is read, with no length announced.
fn endless(n: usize) -> Body {
    let chunk = bytes::Bytes::from(vec![b' '; 1 << 20]);
    Body::from_stream(futures::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ))
}

fn registry(addr: &str, credentials: Option<Credentials>) -> Registry {
    let reference = OciRef::parse(&format!("{addr}/team/hello:1")).unwrap();
    Registry::new(&reference, &[], credentials)
}

/// A registry that wants a bearer token for everything, from its token service, which
/// gives one for `user:secret` only.
#[tokio::test]
async fn a_registry_with_a_token_service_is_pulled_from_with_its_token() {
    let config = component_config(COMPONENT, "2026-01-01T00:00:00Z");
    let manifest = serde_json::to_vec(&component_manifest(COMPONENT, &config)).unwrap();
    let digest = sha256(&manifest);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let realm = format!("http://{addr}/token");
    let challenge = move |headers: &HeaderMap| -> Option<Response> {
        let authorized = headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v == "Bearer good-token");
        (!authorized).then(|| {
            let value = format!(
                "Bearer realm=\"{realm}\",service=\"test\",scope=\"repository:team/hello:pull\""
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, value)],
            )
                .into_response()
        })
    };
    let (on_manifest, on_blob) = (challenge.clone(), challenge);
    let served = manifest.clone();
    let router = Router::new()
        .route(
            "/token",
            get(|req: Request| async move {
                let basic = "Basic dXNlcjpzZWNyZXQ="; // user:secret
                let query = req.uri().query().unwrap_or_default().to_string();
                let asked = query.contains("scope=repository%3Ateam%2Fhello%3Apull")
                    && query.contains("service=test");
                match req.headers().get(header::AUTHORIZATION) {
                    Some(v) if v == basic && asked => {
                        axum::Json(serde_json::json!({"token": "good-token"})).into_response()
                    }
                    _ => StatusCode::UNAUTHORIZED.into_response(),
                }
            }),
        )
        .route(
            "/v2/team/hello/manifests/1",
            get(move |headers: HeaderMap| async move {
                on_manifest(&headers).unwrap_or_else(|| served.clone().into_response())
            }),
        )
        .route(
            "/v2/team/hello/blobs/{digest}",
            get(move |headers: HeaderMap| async move {
                on_blob(&headers).unwrap_or_else(|| COMPONENT.into_response())
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let credentials = Credentials {
        username: "user".into(),
        password: "secret".into(),
    };
    let pulling = registry(&addr, Some(credentials));
    let resolved = pulling.resolve().await.unwrap();
    assert_eq!(resolved.manifest, digest);
    assert_eq!(resolved.layer.digest, sha256(COMPONENT));
    let mut layer = pulling.layer(&resolved.layer).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = layer.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes, COMPONENT);

    // Anonymous: the token service refuses, and that is said as a refusal.
    let refused = registry(&addr, None).resolve().await.unwrap_err();
    assert!(
        matches!(
            refused,
            OciError::Unauthorized {
                anonymous: true,
                ..
            }
        ),
        "{refused}"
    );
}

/// A manifest, or a token service's answer, that never ends is cut off at its bound: it
/// filled the control plane's memory, which anyone who may apply could make it read.
#[tokio::test]
async fn answers_that_never_end_are_cut_off() {
    let addr =
        serve(Router::new().route("/v2/team/hello/manifests/1", get(|| async { endless(64) })))
            .await;
    let e = registry(&addr, None).resolve().await.unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");

    let token_addr = serve(Router::new().route("/token", get(|| async { endless(64) }))).await;
    let realm = format!("Bearer realm=\"http://{token_addr}/token\",service=\"x\"");
    let addr = serve(Router::new().route(
        "/v2/team/hello/manifests/1",
        get(move || async move {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, realm)],
            )
                .into_response()
        }),
    ))
    .await;
    let e = registry(&addr, None).resolve().await.unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}
