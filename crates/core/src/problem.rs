//! The one shape and vocabulary of every HTTP error Shoal itself produces, whoever answers
//! it (the control plane's `/v1` API, a node's gateway, the runtime on a guest's behalf):
//!
//! ```json
//! {"error":{"code":"at_capacity","message":"app default/web is at its max concurrency; retry shortly"}}
//! ```
//!
//! served as `content-type: application/json` ([`CONTENT_TYPE`]). `code` is stable, for
//! programs; `message` is for people and may change. A guest's own responses, errors
//! included, are passed through untouched: this is only what Shoal says.
//!
//! [`ErrorCode`] is the closed set of codes Shoal sends: every code is a variant, with the
//! HTTP status it is answered with. Codes that existed before this module (the control
//! plane's `unknown_module`, `too_large`…, the gateway's `no_route`, `at_capacity`…) keep
//! their spelling so clients do not break. Parsing an [`ErrorBody`] fails on a code this
//! build does not know; a client that must tolerate a newer server reads `code` as a string
//! and tries [`str::parse`] on it.
//!
//! No I/O and no HTTP types here: statuses are plain `u16`s.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The `content-type` of an [`ErrorBody`].
pub const CONTENT_TYPE: &str = "application/json";

/// What went wrong, for programs. Serialized in `snake_case` (`ErrorCode::AtCapacity` is
/// `"at_capacity"`), the same string [`ErrorCode::as_str`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    // ── The request is wrong (4xx) ──
    /// A malformed request: bad query, body or parameters.
    BadRequest,
    /// An app spec that does not validate.
    InvalidSpec,
    /// A spec names a module digest that was never uploaded.
    UnknownModule,
    /// A core WebAssembly module where a component is needed.
    NotAComponent,
    /// `rollout undo` on an app with a single revision.
    NoEarlierRevision,
    /// A node reported an incident reason the control plane does not know.
    InvalidIncident,
    /// A canary-only action (promote a step) on an app that rolls out without one.
    NotACanary,
    /// A node name that is not a valid name.
    InvalidNode,
    /// A module digest that is not `sha256:<64 hex>`.
    BadDigest,
    /// A node reporting for another node.
    WrongNode,
    /// No token, or a wrong one.
    Unauthorized,
    /// The caller is known but may not do this: e.g. a node's internal endpoints reached
    /// from outside the cluster.
    Forbidden,
    /// What an apply or a scale asks for would take its namespace past its quota (403, as
    /// Kubernetes answers "exceeded quota").
    QuotaExceeded,
    /// The object asked for does not exist.
    NotFound,
    /// No app is routed at this host and path on this gateway.
    NoRoute,
    /// The change conflicts with the current state (exists already, changed meanwhile…).
    Conflict,
    /// The history asked for was compacted away; read the snapshot again.
    Compacted,
    /// The upload is larger than allowed (HTTP 413, "payload too large"; spelled
    /// `too_large` as the control plane always has).
    TooLarge,
    /// The request's head (its line and headers) is larger than a gateway takes (HTTP 431).
    HeadTooLarge,
    /// The upload is not valid WebAssembly.
    InvalidWasm,
    /// The client did not send its request (its body) in time.
    RequestTimeout,
    /// The path exists, but not with this method; `Allow` lists those it has.
    MethodNotAllowed,

    // ── Shoal or the guest failed (5xx) ──
    /// Shoal failed; the cause is in its log, not in the message.
    Internal,
    /// The guest trapped (panic, `unreachable`, stack overflow…) while handling the request.
    GuestTrapped,
    /// The guest went over its memory limit.
    OutOfMemory,
    /// The guest failed otherwise: it could not start, answered with a `wasi:http` error
    /// code, or finished without answering.
    GuestFailed,
    /// The hop to the node running the chosen replica failed before any response.
    BadGateway,
    /// Temporarily unable to serve, for no more specific reason below.
    Unavailable,
    /// Every instance slot (the replica's `max_concurrency`, or the node's instance pool)
    /// stayed busy: nothing ran, retry shortly.
    AtCapacity,
    /// The app has no replica ready to take the request.
    NoReadyReplicas,
    /// The node no longer runs the replica the request was pinned to: nothing ran, retry.
    ReplicaGone,
    /// The guest did not finish within its timeout.
    Timeout,
    /// The OCI registry a spec names could not be reached, or refused or failed the pull.
    Registry,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &[ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::InvalidSpec,
        ErrorCode::UnknownModule,
        ErrorCode::NotAComponent,
        ErrorCode::NoEarlierRevision,
        ErrorCode::InvalidIncident,
        ErrorCode::NotACanary,
        ErrorCode::InvalidNode,
        ErrorCode::BadDigest,
        ErrorCode::WrongNode,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::QuotaExceeded,
        ErrorCode::NotFound,
        ErrorCode::NoRoute,
        ErrorCode::Conflict,
        ErrorCode::Compacted,
        ErrorCode::TooLarge,
        ErrorCode::HeadTooLarge,
        ErrorCode::InvalidWasm,
        ErrorCode::RequestTimeout,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Internal,
        ErrorCode::GuestTrapped,
        ErrorCode::OutOfMemory,
        ErrorCode::GuestFailed,
        ErrorCode::BadGateway,
        ErrorCode::Unavailable,
        ErrorCode::AtCapacity,
        ErrorCode::NoReadyReplicas,
        ErrorCode::ReplicaGone,
        ErrorCode::Timeout,
        ErrorCode::Registry,
    ];

    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::UnknownModule => "unknown_module",
            ErrorCode::NotAComponent => "not_a_component",
            ErrorCode::NoEarlierRevision => "no_earlier_revision",
            ErrorCode::InvalidIncident => "invalid_incident",
            ErrorCode::NotACanary => "not_a_canary",
            ErrorCode::InvalidNode => "invalid_node",
            ErrorCode::BadDigest => "bad_digest",
            ErrorCode::WrongNode => "wrong_node",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Compacted => "compacted",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::HeadTooLarge => "head_too_large",
            ErrorCode::InvalidWasm => "invalid_wasm",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
            ErrorCode::GuestTrapped => "guest_trapped",
            ErrorCode::OutOfMemory => "out_of_memory",
            ErrorCode::GuestFailed => "guest_failed",
            ErrorCode::BadGateway => "bad_gateway",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::AtCapacity => "at_capacity",
            ErrorCode::NoReadyReplicas => "no_ready_replicas",
            ErrorCode::ReplicaGone => "replica_gone",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Registry => "registry",
        }
    }

    /// The HTTP status Shoal answers this code with.
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidSpec
            | ErrorCode::UnknownModule
            | ErrorCode::NotAComponent
            | ErrorCode::NoEarlierRevision
            | ErrorCode::InvalidIncident
            | ErrorCode::NotACanary
            | ErrorCode::InvalidNode
            | ErrorCode::BadDigest
            | ErrorCode::WrongNode => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => 403,
            ErrorCode::NotFound | ErrorCode::NoRoute => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::Conflict => 409,
            ErrorCode::Compacted => 410,
            ErrorCode::TooLarge => 413,
            ErrorCode::HeadTooLarge => 431,
            ErrorCode::InvalidWasm => 422,
            ErrorCode::Internal
            | ErrorCode::GuestTrapped
            | ErrorCode::OutOfMemory
            | ErrorCode::GuestFailed => 500,
            ErrorCode::BadGateway | ErrorCode::Registry => 502,
            ErrorCode::Unavailable
            | ErrorCode::AtCapacity
            | ErrorCode::NoReadyReplicas
            | ErrorCode::ReplicaGone => 503,
            ErrorCode::Timeout => 504,
        }
    }

    /// Seconds a client should wait before sending the same request again (`Retry-After`),
    /// for the codes that promise nothing ran and a retry soon may succeed.
    pub const fn retry_after_secs(self) -> Option<u32> {
        match self {
            ErrorCode::AtCapacity | ErrorCode::ReplicaGone => Some(1),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code this build of Shoal does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.to_string()))
    }
}

/// The body of every error Shoal answers: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.error.code
    }

    /// The HTTP status to answer with: the code's.
    pub fn status(&self) -> u16 {
        self.error.code.status()
    }

    /// The body as sent, one line of JSON without a trailing newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error body always serializes")
    }

    /// Reads a body Shoal sent.
    pub fn from_json(text: &str) -> Result<ErrorBody, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_documented_shape() {
        let body = ErrorBody::new(ErrorCode::AtCapacity, "busy \"now\"; retry shortly");
        assert_eq!(
            body.to_json(),
            r#"{"error":{"code":"at_capacity","message":"busy \"now\"; retry shortly"}}"#
        );
        assert_eq!(ErrorBody::from_json(&body.to_json()).unwrap(), body);
        assert_eq!(body.status(), 503);
        let back = ErrorBody::from_json(
            r#"{"error":{"message":"app default/x does not exist","code":"not_found"}}"#,
        )
        .unwrap();
        assert_eq!(back.code(), ErrorCode::NotFound);
        assert!(ErrorBody::from_json(r#"{"error":{"code":"nope","message":""}}"#).is_err());
    }

    #[test]
    fn serde_as_str_and_parse_agree_on_every_code() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            assert_eq!(code.to_string(), code.as_str());
            assert!((400..600).contains(&code.status()), "{code}");
        }
        assert_eq!(
            "payload_too_large".parse::<ErrorCode>(),
            Err(UnknownCode("payload_too_large".into()))
        );
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "codes are distinct");
    }

    #[test]
    fn codes_clients_already_match_on_keep_their_spelling_and_status() {
        for (code, wire, status) in [
            (ErrorCode::BadRequest, "bad_request", 400),
            (ErrorCode::InvalidSpec, "invalid_spec", 400),
            (ErrorCode::UnknownModule, "unknown_module", 400),
            (ErrorCode::NotAComponent, "not_a_component", 400),
            (ErrorCode::NoEarlierRevision, "no_earlier_revision", 400),
            (ErrorCode::InvalidIncident, "invalid_incident", 400),
            (ErrorCode::NotACanary, "not_a_canary", 400),
            (ErrorCode::InvalidNode, "invalid_node", 400),
            (ErrorCode::Unauthorized, "unauthorized", 401),
            (ErrorCode::NotFound, "not_found", 404),
            (ErrorCode::NoRoute, "no_route", 404),
            (ErrorCode::Conflict, "conflict", 409),
            (ErrorCode::Compacted, "compacted", 410),
            (ErrorCode::TooLarge, "too_large", 413),
            (ErrorCode::HeadTooLarge, "head_too_large", 431),
            (ErrorCode::InvalidWasm, "invalid_wasm", 422),
            (ErrorCode::Internal, "internal", 500),
            (ErrorCode::BadGateway, "bad_gateway", 502),
            (ErrorCode::AtCapacity, "at_capacity", 503),
            (ErrorCode::NoReadyReplicas, "no_ready_replicas", 503),
            (ErrorCode::ReplicaGone, "replica_gone", 503),
            (ErrorCode::Timeout, "timeout", 504),
        ] {
            assert_eq!((code.as_str(), code.status()), (wire, status));
        }
    }

    #[test]
    fn only_nothing_ran_codes_ask_for_a_retry() {
        let retried: Vec<_> = ErrorCode::ALL
            .iter()
            .filter(|c| c.retry_after_secs().is_some())
            .collect();
        assert_eq!(retried, [&ErrorCode::AtCapacity, &ErrorCode::ReplicaGone]);
        assert_eq!(ErrorCode::AtCapacity.retry_after_secs(), Some(1));
    }
}
