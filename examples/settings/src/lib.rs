//! `settings`: answers with its configuration, read through `wasi:config/store` (the app's
//! `[config]`), so that a changed value is visible on the next request.
//!
//! `GET /settings` lists every `key=value`, one per line, sorted; `GET /settings/KEY` answers
//! the value of KEY, or 404 `no such key: KEY`. With `?from=env`, KEY is read from the
//! environment instead: the same guest, so a benchmark can weigh a config lookup against an
//! env lookup.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: "../../wit/deps/config.wit",
    world: "wasi:config/imports@0.2.0-rc.1",
    generate_all,
});

use wasi::config::store;

struct Settings;

wasip2::http::proxy::export!(Settings);

impl wasip2::exports::http::incoming_handler::Guest for Settings {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let rest = path.strip_prefix("/settings").unwrap_or(path);
        let (status, body) = if query.split('&').any(|p| p == "from=env") {
            from_env(rest.trim_start_matches('/'))
        } else {
            answer(rest)
        };
        respond(response_out, status, &body);
    }
}

/// The status and body for `rest`, the path after `/settings`.
fn answer(rest: &str) -> (u16, String) {
    match rest.trim_start_matches('/') {
        "" => match store::get_all() {
            Ok(mut all) => {
                all.sort();
                let lines: String = all.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                (200, lines)
            }
            Err(e) => (500, format!("config: {e:?}\n")),
        },
        key => match store::get(key) {
            Ok(Some(value)) => (200, format!("{value}\n")),
            Ok(None) => (404, format!("no such key: {key}\n")),
            Err(e) => (500, format!("config: {e:?}\n")),
        },
    }
}

/// The status and body for environment variable `name`.
fn from_env(name: &str) -> (u16, String) {
    match std::env::var(name) {
        Ok(value) => (200, format!("{value}\n")),
        Err(_) => (404, format!("no such variable: {name}\n")),
    }
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
        Err(e) => eprintln!("settings: writing the response: {e}"),
    }
}
