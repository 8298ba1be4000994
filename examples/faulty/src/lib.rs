//! `faulty`: a guest that misbehaves on request, so tests can check that the host contains it
//! (traps, runaway loops, memory exhaustion, stack overflow, floods of output, huge bodies,
//! sandbox escapes) and that streaming, status codes, env and logs reach the client. Mounted
//! under `/faulty` (or `/faulty-<suffix>`, for more apps from this module) or at the root: that
//! leading segment is stripped, so `/faulty/trap`, `/faulty-b/trap` and `/trap` do the same
//! thing. `/count` says how many requests this instance has handled, itself included: 1 unless
//! instances are reused.

use std::io::Write as _;

use wasip2::clocks::monotonic_clock;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, RequestOptions,
    ResponseOutparam, Scheme,
};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

const MIB: usize = 1 << 20;

/// Requests this instance has handled: state that a reused instance carries over.
static HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Bounds `/net` so a black-holed network cannot hold the request for wasmtime's 600 s default.
const NET_TIMEOUT_NS: u64 = 5_000_000_000;

struct Faulty;

wasip2::http::proxy::export!(Faulty);

impl wasip2::exports::http::incoming_handler::Guest for Faulty {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let handled = HANDLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let target = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        // The mount point: `/faulty`, or `/faulty-b` for a second app from this module.
        let path = match path.strip_prefix("/faulty") {
            Some(rest) => rest.find('/').map_or("", |at| &rest[at..]),
            None => path,
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

        match segments.as_slice() {
            ["trap"] => panic!("faulty: trap requested"),
            ["count"] => respond(out, 200, handled.to_string().as_bytes()),
            ["loop"] => spin_forever(),
            ["oom"] => exhaust_memory(out),
            // Never answered: each traps, on the wasm call stack or on the shadow stack in
            // linear memory.
            ["stack"] => {
                let depth = overflow_call_stack(0);
                respond(out, 200, format!("recursed {depth} deep").as_bytes());
            }
            ["stack", "shadow"] => {
                let depth = overflow_shadow_stack(0);
                respond(out, 200, format!("recursed {depth} deep").as_bytes());
            }
            ["flood", mib] => flood(out, mib),
            ["huge", mib] => huge(out, mib),
            ["echo"] => echo(request, out),
            ["status", code] => status(out, code),
            ["env", name] => match std::env::var(name) {
                Ok(value) => respond(out, 200, value.as_bytes()),
                Err(e) => respond(out, 404, format!("{name}: {e}").as_bytes()),
            },
            ["log"] => log(out, query),
            ["sleep", ms] => sleep(out, ms),
            ["fs"] => respond(out, 200, probe_filesystem().as_bytes()),
            ["net"] => respond(out, 200, probe_network().as_bytes()),
            // Health as the spec's env says: HEALTHZ_STATUS=503 makes probes fail, and
            // SICK_NODE=n makes them fail only where NODE (set to "$(node)") is n.
            ["healthz"] => {
                let sick = std::env::var("SICK_NODE").ok();
                let code = if sick.is_some() && sick == std::env::var("NODE").ok() {
                    "500".into()
                } else {
                    std::env::var("HEALTHZ_STATUS").unwrap_or_else(|_| "200".into())
                };
                status(out, &code)
            }
            // What the request says it was addressed to, as `scheme://authority`.
            ["authority"] => {
                let scheme = match request.scheme() {
                    Some(Scheme::Http) => "http".to_string(),
                    Some(Scheme::Https) => "https".to_string(),
                    Some(Scheme::Other(s)) => s,
                    None => "none".to_string(),
                };
                let authority = request.authority().unwrap_or_else(|| "none".into());
                respond(out, 200, format!("{scheme}://{authority}").as_bytes())
            }
            ["whole"] => whole(out),
            ["headers"] => {
                let lines: String = request
                    .headers()
                    .entries()
                    .into_iter()
                    .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(&value)))
                    .collect();
                respond(out, 200, lines.as_bytes());
            }
            // DEFAULT_STATUS=500 makes a bad revision for canary tests.
            _ => match std::env::var("DEFAULT_STATUS") {
                Ok(code) => status(out, &code),
                Err(_) => respond(out, 200, b"ok"),
            },
        }
    }
}

/// Burns CPU until the host interrupts it; `black_box` keeps the optimiser from proving the
/// loop has no effect.
fn spin_forever() -> ! {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n).wrapping_add(1);
    }
}

/// Allocates and writes 1 MiB chunks until an allocation fails. If the host refuses to grow
/// memory without trapping, the allocator reports failure and the guest answers 500 saying how
/// far it got, so tests can compare that with the configured limit.
fn exhaust_memory(out: ResponseOutparam) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = Vec::new();
        if chunks.try_reserve(1).is_err() || chunk.try_reserve_exact(MIB).is_err() {
            break;
        }
        // Writing every byte makes the pages resident, not merely reserved.
        chunk.resize(MIB, 0xa5);
        chunks.push(std::hint::black_box(chunk));
    }
    let held = chunks.len();
    drop(chunks);
    eprintln!("faulty: allocation failed after {held} MiB");
    respond(
        out,
        500,
        format!("oom: allocation failed after {held} MiB").as_bytes(),
    );
}

/// Recurses until the wasm call stack runs out (the engine's `max_wasm_stack`): small frames
/// that keep nothing in linear memory. Calling itself through `black_box` keeps the optimiser
/// from seeing that the recursion never ends or turning it into a loop, and the addition after
/// the call keeps it from being a tail call. Never returns.
#[inline(never)]
fn overflow_call_stack(depth: u64) -> u64 {
    let next: fn(u64) -> u64 = std::hint::black_box(overflow_call_stack);
    next(depth + 1).wrapping_add(std::hint::black_box(depth))
}

/// Recurses until the shadow stack (the part of the guest's linear memory where Rust keeps
/// locals whose address is taken, 1 MiB by default) runs out: each frame holds 512 bytes
/// there. The stack pointer then leaves the memory and the guest traps on an out-of-bounds
/// access before the wasm call stack fills. Never returns.
#[inline(never)]
fn overflow_shadow_stack(depth: u64) -> u64 {
    let mut frame = [0u8; 512];
    frame[(depth % 512) as usize] = depth as u8;
    let frame = std::hint::black_box(&mut frame);
    let next: fn(u64) -> u64 = std::hint::black_box(overflow_shadow_stack);
    let deeper = next(depth + 1);
    deeper.wrapping_add(u64::from(frame[(deeper % 512) as usize]))
}

/// Writes `mib` MiB of numbered lines in all, 64 KiB at a time alternately to stdout and
/// stderr, as fast as the host takes them, then answers 200.
fn flood(out: ResponseOutparam, mib: &str) {
    let Some(bytes) = mib.parse::<usize>().ok().and_then(|n| n.checked_mul(MIB)) else {
        return respond(out, 400, format!("not MiB: {mib}").as_bytes());
    };
    const CHUNK: usize = 64 * 1024;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut line = 0u64;
    let (mut written, mut chunks) = (0, 0u64);
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    while written < bytes {
        chunk.clear();
        while chunk.len() + 100 <= CHUNK {
            // 100 bytes a line, newline included.
            let _ = writeln!(chunk, "faulty: flood line {line:012} {:->67}", "");
            line += 1;
        }
        let stream: &mut dyn std::io::Write = if chunks.is_multiple_of(2) {
            &mut stdout
        } else {
            &mut stderr
        };
        if let Err(e) = stream.write_all(&chunk).and_then(|()| stream.flush()) {
            drop((stdout, stderr));
            return respond(out, 500, format!("flood: {e}").as_bytes());
        }
        written += chunk.len();
        chunks += 1;
    }
    drop((stdout, stderr));
    respond(
        out,
        200,
        format!("flooded {written} bytes in {line} lines").as_bytes(),
    );
}

/// Streams a `mib` MiB body, 64 KiB at a time, each chunk flushed before the next is made, so
/// the guest holds one chunk however big the body. Every byte is `b'x'`.
fn huge(out: ResponseOutparam, mib: &str) {
    let Some(bytes) = mib.parse::<usize>().ok().and_then(|n| n.checked_mul(MIB)) else {
        return respond(out, 400, format!("not MiB: {mib}").as_bytes());
    };
    let response = OutgoingResponse::new(headers(b"application/octet-stream"));
    let response_body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut output = response_body.write().expect("the stream is taken once");
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..bytes / chunk.len() {
        let sent = output
            .write_all(&chunk)
            .map_err(|e| e.to_string())
            .and_then(|()| output.blocking_flush().map_err(|e| e.to_string()));
        if let Err(e) = sent {
            // The client went away: dropping the unfinished body says the response was cut.
            eprintln!("faulty: huge: {e}");
            return;
        }
    }
    drop(output);
    OutgoingBody::finish(response_body, None).expect("the body has no declared length");
}

/// Copies the request body to the response chunk by chunk, so memory stays flat whatever the
/// body's size and the client sees bytes before the upload ends.
fn echo(request: IncomingRequest, out: ResponseOutparam) {
    let content_type = request
        .headers()
        .get("content-type")
        .into_iter()
        .next()
        .unwrap_or_else(|| b"application/octet-stream".to_vec());
    let body = request.consume().expect("the request body is taken once");
    let input = body.stream().expect("the request stream is taken once");

    let response = OutgoingResponse::new(headers(&content_type));
    let response_body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut output = response_body.write().expect("the stream is taken once");

    match copy(&input, &mut output) {
        Ok(()) => {
            // A child stream must go before its body; the request's go at the end of scope.
            drop(output);
            OutgoingBody::finish(response_body, None).expect("the body has no declared length");
        }
        // Dropping the unfinished body tells the host the response was cut short.
        Err(e) => eprintln!("faulty: echo: {e}"),
    }
}

fn copy(input: &InputStream, output: &mut OutputStream) -> Result<(), String> {
    loop {
        match input.blocking_read(64 * 1024) {
            Ok(chunk) => {
                output.write_all(&chunk).map_err(|e| e.to_string())?;
                output.blocking_flush().map_err(|e| e.to_string())?;
            }
            Err(StreamError::Closed) => return Ok(()),
            Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
        }
    }
}

/// Final statuses only (1xx are interim); 204 and 304 go out without the body they forbid.
fn status(out: ResponseOutparam, code: &str) {
    match code.parse::<u16>() {
        Ok(status @ (204 | 304)) => respond(out, status, b""),
        Ok(status @ 200..=599) => respond(out, status, format!("status {status}").as_bytes()),
        _ => respond(
            out,
            400,
            format!("not a final status code: {code}").as_bytes(),
        ),
    }
}

fn log(out: ResponseOutparam, query: &str) {
    let msg = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("msg="))
        .map(percent_decode);
    match msg {
        Some(msg) => {
            println!("{msg}");
            eprintln!("err: {msg}");
            respond(out, 200, b"logged");
        }
        None => respond(out, 400, b"missing ?msg="),
    }
}

/// Waits on a wasi monotonic-clock pollable, the way a guest yields to the host while idle.
fn sleep(out: ResponseOutparam, ms: &str) {
    match ms.parse::<u64>() {
        Ok(ms) => {
            monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
            respond(out, 200, format!("slept {ms} ms").as_bytes());
        }
        Err(e) => respond(out, 400, format!("not milliseconds: {ms}: {e}").as_bytes()),
    }
}

fn probe_filesystem() -> String {
    let file = match std::fs::read_to_string("/etc/passwd") {
        Ok(_) => "allowed".to_string(),
        Err(e) => format!("denied ({e})"),
    };
    let dir = match std::fs::read_dir("/") {
        Ok(_) => "allowed".to_string(),
        Err(e) => format!("denied ({e})"),
    };
    format!("read /etc/passwd: {file}\nlist /: {dir}\n")
}

fn probe_network() -> String {
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_scheme(Some(&Scheme::Http))
        .and_then(|()| request.set_authority(Some("example.com")))
        .and_then(|()| request.set_path_with_query(Some("/")))
        .expect("the request target is valid");
    let body = request.body().expect("the body is taken once");
    let options = RequestOptions::new();
    // A host may not support timeouts; its defaults then apply.
    let _ = options.set_connect_timeout(Some(NET_TIMEOUT_NS));
    let _ = options.set_first_byte_timeout(Some(NET_TIMEOUT_NS));

    let pending = match outgoing_handler::handle(request, Some(options)) {
        Ok(pending) => pending,
        Err(e) => return format!("denied: {e}"),
    };
    if let Err(e) = OutgoingBody::finish(body, None) {
        return format!("denied: {e}");
    }
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Ok(response))) => format!("allowed: {}", response.status()),
        Some(Ok(Err(e))) => format!("denied: {e}"),
        Some(Err(())) | None => "denied: no response".to_string(),
    }
}

/// Answers `whole` with its body written and finished before the response is handed over,
/// as a guest that makes its whole answer first does: the host has all of it with the head.
fn whole(out: ResponseOutparam) {
    let response = OutgoingResponse::new(headers(b"text/plain"));
    let response_body = response.body().expect("the body is taken once");
    let stream = response_body.write().expect("the stream is taken once");
    stream
        .blocking_write_and_flush(b"whole")
        .expect("a small body fits the host's buffer");
    drop(stream);
    OutgoingBody::finish(response_body, None).expect("the body has no declared length");
    ResponseOutparam::set(out, Ok(response));
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let response = OutgoingResponse::new(headers(b"text/plain"));
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
        Err(e) => eprintln!("faulty: writing the response: {e}"),
    }
}

fn headers(content_type: &[u8]) -> Fields {
    Fields::from_list(&[("content-type".into(), content_type.to_vec())])
        .expect("content-type is a valid header")
}

/// Decodes `%XX` escapes and `+` as in a form-encoded query string.
fn percent_decode(s: &str) -> String {
    let mut decoded = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let [first, tail @ ..] = rest {
        match (first, hex_byte(tail)) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                rest = &tail[2..];
            }
            (b'+', _) => {
                decoded.push(b' ');
                rest = tail;
            }
            _ => {
                decoded.push(*first);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn hex_byte(bytes: &[u8]) -> Option<u8> {
    let [high, low, ..] = bytes else { return None };
    let digit = |b: &u8| char::from(*b).to_digit(16);
    u8::try_from(digit(high)? * 16 + digit(low)?).ok()
}
