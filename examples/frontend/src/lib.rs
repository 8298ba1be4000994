//! `frontend`: calls another app by its service name and relays the answer, to show
//! service-to-service calls. Every request, whatever its path, makes one outgoing
//! `GET http://$BACKEND/hello` (`$BACKEND` defaults to `backend`) and answers 200
//! `frontend -> STATUS BODY`, or 502 `frontend -> error: ERROR` if the call fails.
//! Mounted under `/frontend` or at the root: a leading `/frontend` is stripped.

use std::io::Write as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, RequestOptions, ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

/// Bounds the call so an unreachable backend cannot hold the request for wasmtime's 600 s
/// default.
const BACKEND_TIMEOUT_NS: u64 = 5_000_000_000;
const BACKEND_PATH: &str = "/hello";

struct Frontend;

wasip2::http::proxy::export!(Frontend);

impl wasip2::exports::http::incoming_handler::Guest for Frontend {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_else(|| "/".into());
        let path = match target.strip_prefix("/frontend") {
            Some("") => "/",
            Some(rest) if rest.starts_with(['/', '?']) => rest,
            _ => &target,
        };
        let method = method_name(&request.method()).to_string();
        let backend = std::env::var("BACKEND").unwrap_or_else(|_| "backend".into());

        let (status, body) = match call(&backend) {
            Ok((status, body)) => {
                println!("frontend: {method} {path} -> {backend}{BACKEND_PATH}: {status}");
                let body = body.trim_end_matches(['\n', '\r']);
                (200, format!("frontend -> {status} {body}"))
            }
            Err(error) => {
                println!("frontend: {method} {path} -> {backend}{BACKEND_PATH}: error: {error}");
                (502, format!("frontend -> error: {error}"))
            }
        };
        respond(out, status, body.as_bytes());
    }
}

/// `GET http://{authority}/hello`: the status and the whole body, or the failure as the
/// debug form of its `error-code` (or a description when the host gave none).
fn call(authority: &str) -> Result<(u16, String), String> {
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_method(&Method::Get)
        .and_then(|()| request.set_scheme(Some(&Scheme::Http)))
        .and_then(|()| request.set_authority(Some(authority)))
        .and_then(|()| request.set_path_with_query(Some(BACKEND_PATH)))
        .map_err(|()| format!("invalid backend authority {authority:?}"))?;
    let body = request.body().expect("the body is taken once");
    let options = RequestOptions::new();
    // A host may not support timeouts; its defaults then apply.
    let _ = options.set_connect_timeout(Some(BACKEND_TIMEOUT_NS));
    let _ = options.set_first_byte_timeout(Some(BACKEND_TIMEOUT_NS));

    let pending = outgoing_handler::handle(request, Some(options)).map_err(debug)?;
    OutgoingBody::finish(body, None).map_err(debug)?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(debug(e)),
        Some(Err(())) | None => return Err("no response".into()),
    };
    let status = response.status();
    let body = read_body(&response)?;
    Ok((status, body))
}

fn read_body(response: &IncomingResponse) -> Result<String, String> {
    let body = response.consume().map_err(|()| "body already taken")?;
    let stream = body.stream().map_err(|()| "stream already taken")?;
    let mut bytes = Vec::new();
    let result = loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break Ok(()),
            Err(StreamError::LastOperationFailed(e)) => {
                break Err(match wasip2::http::types::http_error_code(&e) {
                    Some(code) => debug(code),
                    None => e.to_debug_string(),
                });
            }
        }
    };
    // A child stream must go before its body.
    drop(stream);
    drop(body);
    result.map(|()| String::from_utf8_lossy(&bytes).into_owned())
}

fn debug(code: ErrorCode) -> String {
    format!("{code:?}")
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("content-type is a valid header");
    let response = OutgoingResponse::new(headers);
    response
        .set_status_code(status)
        .expect("callers pass valid status codes");
    let response_body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));

    let mut stream = response_body.write().expect("the stream is taken once");
    let written = stream
        .write_all(body)
        .and_then(|()| stream.blocking_flush().map_err(std::io::Error::other));
    drop(stream);
    match written {
        Ok(()) => {
            OutgoingBody::finish(response_body, None).expect("the body has no declared length");
        }
        // Dropping an unfinished body tells the host the response was cut short.
        Err(e) => eprintln!("frontend: writing the response: {e}"),
    }
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}
