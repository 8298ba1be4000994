//! One HTTP client for the `/v1` API, used by the CLI (admin token) and by
//! worker nodes (join token): a base URL and a bearer token, JSON in and out,
//! and any `{"error": …}` answer turned into a [`ClientError::Api`] carrying
//! status, code and message. Callers decide timeouts per request and say
//! errors in their own words.

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

/// A Shoal API at `base` (e.g. `http://127.0.0.1:7700`), called with `token`.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Leaves the token out: a client may end up in a log.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the connection failed, broke or timed out.
    #[error("request to {base} failed: {source}")]
    Send {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// A non-2xx answer with the API's `{"error": …}` body.
    #[error("{message} ({}, {code})", .status.as_u16())]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// A non-2xx answer without it (not a Shoal API, a proxy in between);
    /// `body` is its text, trimmed.
    #[error("the API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    /// A 2xx answer whose body is not what the caller expected.
    #[error("unreadable response: {0}")]
    Decode(#[source] reqwest::Error),
}

impl ClientError {
    /// The answer's status, if there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Status { status, .. } => Some(*status),
            ClientError::Send { .. } | ClientError::Decode(_) => None,
        }
    }

    /// The API's error code (`not_found`, `conflict`, …), if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl Client {
    /// A client with reqwest's defaults (no timeouts: set them per request).
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_http(reqwest::Client::new(), base, token)
    }

    /// A client over a configured `reqwest::Client` (connect timeout, pool…).
    pub fn with_http(http: reqwest::Client, base: &str, token: &str) -> Client {
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// The base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request to `path` (e.g. `/v1/apps`) carrying the token; add a body
    /// or a timeout, then pass it to [`Client::send`] or [`Client::checked`].
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends and decodes the JSON answer.
    pub async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.checked(req).await?;
        resp.json().await.map_err(ClientError::Decode)
    }

    /// Sends, and fails on a non-2xx answer.
    pub async fn checked(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Send {
            base: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<RawErrorBody>(&text) {
            Ok(b) => ClientError::Api {
                status,
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Status {
                status,
                body: text.trim().to_string(),
            },
        })
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route-per-path HTTP/1.1 server that also says whether the
    /// request carried the token.
    async fn server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf).to_lowercase();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let authed = head.contains("authorization: bearer secret\r\n");
                    let (status, body) = match path.as_str() {
                        "/ok" => ("200 OK", format!(r#"{{"authed":{authed}}}"#)),
                        "/missing" => (
                            "404 Not Found",
                            r#"{"error":{"code":"not_found","message":"app default/x does not exist"}}"#
                                .to_string(),
                        ),
                        "/proxy" => ("502 Bad Gateway", "upstream down\n".to_string()),
                        _ => ("200 OK", "not json".to_string()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn calls_carry_the_token_and_errors_are_typed() {
        let client = Client::new(&server().await, "secret");
        assert!(!client.base().ends_with('/'));

        let ok: serde_json::Value = client.get("/ok").await.unwrap();
        assert_eq!(ok["authed"], true);

        let err = client
            .get::<serde_json::Value>("/missing")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
        assert_eq!(err.code(), Some("not_found"));
        assert_eq!(
            err.to_string(),
            "app default/x does not exist (404, not_found)"
        );

        let err = client.get::<serde_json::Value>("/proxy").await.unwrap_err();
        assert!(matches!(err, ClientError::Status { .. }), "{err:?}");
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            "the API answered 502 Bad Gateway: upstream down"
        );

        let err = client
            .get::<serde_json::Value>("/garbage")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
    }

    #[tokio::test]
    async fn no_answer_is_a_send_error_naming_the_server() {
        // A port just freed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = Client::new(&format!("http://{addr}"), "secret");
        match client.get::<serde_json::Value>("/v1/apps").await {
            Err(ClientError::Send { base, source }) => {
                assert_eq!(base, format!("http://{addr}"));
                assert!(source.is_connect(), "{source}");
            }
            other => panic!("expected a send error, got {other:?}"),
        }
    }
}

/// `shoal_core::problem::ErrorBody` read with `code` as a plain string, so a
/// client tolerates codes newer than itself.
#[derive(serde::Deserialize)]
struct RawErrorBody {
    error: RawErrorDetail,
}

#[derive(serde::Deserialize)]
struct RawErrorDetail {
    code: String,
    message: String,
}
