//! How the API answers errors: a status, a stable machine code and a message
//! for humans, in the one shape every Shoal error has
//! (`shoal_core::problem::ErrorBody`). Control-plane errors become these here
//! and nowhere else; internal causes were logged, never sent.

use crate::error::ControlError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shoal_core::problem::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    /// An error answered with its code's status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(code.status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let message = e.to_string();
        let code = match e {
            ControlError::NotFound(_) => ErrorCode::NotFound,
            ControlError::Conflict(_) | ControlError::Raced(_) => ErrorCode::Conflict,
            ControlError::Invalid { code, .. } => code,
            ControlError::Compacted(_) => ErrorCode::Compacted,
            ControlError::Unavailable(_) => ErrorCode::Unavailable,
            ControlError::Internal => ErrorCode::Internal,
        };
        ApiError::new(code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.code.retry_after_secs();
        let mut response =
            (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Extractor rejections (a bad query string, a body that is not the JSON
/// expected) answer in the same `{"error": …}` shape as everything else.
macro_rules! rejection {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(r: $t) -> Self {
                let code = match r.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
                    _ => ErrorCode::BadRequest,
                };
                ApiError {
                    status: r.status(),
                    code,
                    message: r.body_text(),
                }
            }
        }
    )*};
}

rejection!(
    axum::extract::rejection::BytesRejection,
    axum::extract::rejection::JsonRejection,
    axum::extract::rejection::QueryRejection,
    axum::extract::rejection::PathRejection
);

/// A request's whole body, with [`ApiError`] rejections (one over the body limit is a 413
/// `too_large`).
pub(crate) struct WholeBody(pub bytes::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for WholeBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        bytes::Bytes::from_request(req, state)
            .await
            .map(WholeBody)
            .map_err(ApiError::from)
    }
}

/// `axum::Json` with [`ApiError`] rejections.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(crate) struct JsonBody<T>(pub T);

/// A JSON body a user wrote (a spec, a pool, a token request…): as [`JsonBody`], and a field
/// it does not know is a 400 naming it, as kubectl's strict field validation does, not a
/// setting silently dropped. What nodes send stays [`JsonBody`], so a newer node's extra
/// fields do not stop an older control plane.
pub(crate) struct StrictJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S>
    for StrictJson<T>
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json);
        if !json {
            return Err(ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: ErrorCode::BadRequest,
                message: "Expected request with `Content-Type: application/json`".into(),
            });
        }
        let WholeBody(body) = WholeBody::from_request(req, state).await?;
        strict(&body).map(StrictJson).map_err(|e| {
            let message = match e {
                Strict::Invalid(e) => {
                    format!("Failed to deserialize the JSON body into the target type: {e}")
                }
                unknown => unknown.to_string(),
            };
            ApiError::new(ErrorCode::BadRequest, message)
        })
    }
}

/// Whether a `Content-Type` is JSON (`application/json`, or `application/…+json`), as
/// `axum::Json` decides.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// `body` as a `T`, refusing fields `T` does not have.
pub(crate) fn strict<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Strict> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_ignored::deserialize(&mut de, |path| unknown.push(dotted(&path)))
        .and_then(|v| de.end().map(|()| v))
        .map_err(Strict::Invalid)?;
    match unknown.is_empty() {
        true => Ok(value),
        false => Err(Strict::Unknown(unknown)),
    }
}

/// A field's path as a user writes it: `http.routes[0]`, where serde_ignored would say
/// `http.?.routes.0` (`?` for an `Option`).
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        Path::Map { parent, key } => match dotted(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

/// Why a body is not the `T` asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Strict {
    #[error("{0}")]
    Invalid(serde_json::Error),
    /// The paths of the fields it does not have, e.g. `http.reuse_count`.
    #[error("unknown field{} {}", if .0.len() == 1 { "" } else { "s" }, quoted(.0))]
    Unknown(Vec<String>),
}

fn quoted(fields: &[String]) -> String {
    let quoted: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    quoted.join(", ")
}

/// `axum::extract::Query` with [`ApiError`] rejections.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct Query<T>(pub T);

/// `axum::extract::Path` with [`ApiError`] rejections.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct Path<T>(pub T);
