//! `counter`: counts requests in the cluster's key-value store, through `wasi:keyvalue`, so
//! every replica on every node adds to the same count.
//!
//! Under `/counter` (or `/counter-NAME`, for a second app from the same module), in bucket
//! `counter`: `POST /counter/NAME` (or `GET /counter/NAME/incr`) adds one to NAME
//! atomically and answers the new count; `GET /counter/NAME` answers the count (0 if none);
//! `PUT /counter/NAME` stores the request body as NAME's value (`set`); `DELETE` deletes it;
//! `GET /counter` lists the keys, one per line. A bucket it was not granted answers 403.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: "../../wit/deps/keyvalue",
    world: "wasi:keyvalue/imports@0.2.0-draft",
    generate_all,
});

use wasi::keyvalue::{atomics, store};

struct Counter;

wasip2::http::proxy::export!(Counter);

impl wasip2::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_else(|| "/".into());
        let path = target.split('?').next().unwrap_or("/");
        // The app's own segment (`/counter`, or `/counter-NAME` for a second app) goes.
        let rest = match path.strip_prefix("/counter") {
            Some(rest) => rest.split_once('/').map_or("", |(_, r)| r),
            None => path.trim_start_matches('/'),
        };
        let body = match request.method() {
            Method::Put => read_body(&request),
            _ => Vec::new(),
        };
        let (status, text) = match store::open("counter") {
            Ok(bucket) => answer(&bucket, request.method(), rest, body),
            Err(e) => failed(e),
        };
        respond(response_out, status, &text);
    }
}

/// The status and body for `method` on `rest`, the path after `/counter/`.
fn answer(bucket: &store::Bucket, method: Method, rest: &str, body: Vec<u8>) -> (u16, String) {
    let (name, incr) = match rest.strip_suffix("/incr") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    let post = matches!(method, Method::Post);
    match (method, name) {
        (Method::Get, "") => list(bucket),
        (Method::Post, name) | (Method::Get, name) if incr || post => {
            match atomics::increment(bucket, name, 1) {
                Ok(n) => (200, format!("{n}\n")),
                Err(e) => failed(e),
            }
        }
        (Method::Get, name) => match bucket.get(name) {
            Ok(Some(v)) => (200, format!("{}\n", String::from_utf8_lossy(&v))),
            Ok(None) => (200, "0\n".into()),
            Err(e) => failed(e),
        },
        (Method::Put, name) => match bucket.set(name, &body) {
            Ok(()) => (200, "stored\n".into()),
            Err(e) => failed(e),
        },
        (Method::Delete, name) => match bucket.delete(name) {
            Ok(()) => (200, "deleted\n".into()),
            Err(e) => failed(e),
        },
        _ => (405, "method not allowed\n".into()),
    }
}

/// Every key of the bucket, one per line, following the cursor.
fn list(bucket: &store::Bucket) -> (u16, String) {
    let mut out = String::new();
    let mut cursor = None;
    loop {
        match bucket.list_keys(cursor) {
            Ok(page) => {
                for key in page.keys {
                    out.push_str(&key);
                    out.push('\n');
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return (200, out),
                }
            }
            Err(e) => return failed(e),
        }
    }
}

/// A store error as the client sees it: denied is 403, anything else 500.
fn failed(e: store::Error) -> (u16, String) {
    match e {
        store::Error::AccessDenied => (403, "access denied\n".into()),
        store::Error::NoSuchStore => (404, "no such store\n".into()),
        store::Error::Other(m) => (500, format!("{m}\n")),
    }
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Ok(body) = request.consume() else {
        return bytes;
    };
    let Ok(stream) = body.stream() else {
        return bytes;
    };
    while let Ok(chunk) = stream.blocking_read(64 * 1024) {
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

fn respond(response_out: ResponseOutparam, status: u16, body: &str) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("content-type is a valid header");
    let response = OutgoingResponse::new(headers);
    response
        .set_status_code(status)
        .expect("a status between 100 and 599");
    let out = response.body().expect("the body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    let mut stream = out.write().expect("the stream is taken once");
    let written = stream
        .write_all(body.as_bytes())
        .and_then(|()| stream.blocking_flush().map_err(std::io::Error::other));
    drop(stream);
    match written {
        Ok(()) => OutgoingBody::finish(out, None).expect("the body has no declared length"),
        Err(e) => eprintln!("counter: writing the response: {e}"),
    }
}
