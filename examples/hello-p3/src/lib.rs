//! `hello-p3`: a WASIp3 `wasi:http/service` guest, for testing Shoal's p3 support. It exports
//! `wasi:http/handler@0.3.0` with an `async` `handle`, so one instance may serve several
//! requests at once. Mounted under `/hello-p3` or at the root: that leading segment is
//! stripped, so `/hello-p3/count` and `/count` do the same thing.
//!
//! - `/count`: how many requests this instance has handled, this one included (a global, so
//!   it only grows when the host reuses the instance);
//! - `/sleep?ms=N`: waits N ms on `wasi:clocks/monotonic-clock.wait-for` (an async import that
//!   suspends only this request), then `slept N ms`;
//! - `/huge?mib=N`: N MiB of `x`, written 64 KiB at a time as the host reads them;
//! - `/panic`: panics, so the instance traps;
//! - `/spin`: loops forever without yielding, until the host's timeout stops it;
//! - anything else: `hello from p3 PATH`.
//!
//! Everything comes from p3 imports: no `std` I/O, which would pull in WASIp2 imports.

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::clocks::monotonic_clock;
use wasip3::http::types::{ErrorCode, Fields, Request, Response, Scheme};
use wasip3::{wit_future, wit_stream};

/// Requests this instance has handled: state that a reused instance carries over.
static HANDLED: AtomicU64 = AtomicU64::new(0);

struct HelloP3;

wasip3::http::service::export!(HelloP3);

impl wasip3::exports::http::handler::Guest for HelloP3 {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let handled = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
        let target = request.get_path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let path = match path.strip_prefix("/hello-p3") {
            Some(rest) => rest.find('/').map_or("/", |at| &rest[at..]),
            None => path,
        };

        let body = match path {
            "/count" => handled.to_string(),
            "/sleep" => {
                let ms = query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("ms="))
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .unwrap_or(0);
                monotonic_clock::wait_for(ms.saturating_mul(1_000_000)).await;
                format!("slept {ms} ms")
            }
            // What the request says it was addressed to, as `scheme://authority`.
            "/authority" => {
                let scheme = match request.get_scheme() {
                    Some(Scheme::Http) => "http".to_string(),
                    Some(Scheme::Https) => "https".to_string(),
                    Some(Scheme::Other(s)) => s,
                    None => "none".to_string(),
                };
                let authority = request.get_authority().unwrap_or_else(|| "none".into());
                format!("{scheme}://{authority}")
            }
            "/huge" => {
                let mib = query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("mib="))
                    .and_then(|mib| mib.parse::<usize>().ok())
                    .unwrap_or(1);
                return Ok(huge_response(mib));
            }
            "/panic" => panic!("asked to panic"),
            "/spin" => spin(),
            _ => format!("hello from p3 {path}"),
        };
        Ok(text_response(format!("{body}\n").into_bytes()))
    }
}

/// Burns CPU forever; `black_box` keeps the loop from being optimised away.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// A 200 response of `mib` MiB, written in 64 KiB pieces: memory stays flat, and the writer
/// waits on a client that does not read.
fn huge_response(mib: usize) -> Response {
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(Fields::new(), Some(body_rx), trailers_rx);
    wasip3::spawn_local(async move {
        for _ in 0..mib * 16 {
            if !body_tx.write_all(vec![b'x'; 64 << 10]).await.is_empty() {
                // The client went away.
                return;
            }
        }
    });
    response
}

/// A 200 `text/plain` response whose body is written once the host starts reading it.
fn text_response(body: Vec<u8>) -> Response {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("content-type is a valid header");
    let (mut body_tx, body_rx) = wit_stream::new();
    // No trailers: the future resolves to `Ok(None)` when its writer is dropped.
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    // The host reads the body only after `handle` returns, so write it from a task of its own.
    wasip3::spawn_local(async move {
        // What is left unwritten if the client went away; nothing to do about it then.
        let _ = body_tx.write_all(body).await;
    });
    response
}
