//! Slow clients (slowloris) against a real gateway on loopback: clients trickling request
//! bodies do not hold a replica's permits, so they cannot take an app offline; a client that
//! stalls in its request head, or in its body, is cut off after its timeout.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use shoal_core::Route;
use shoal_gateway::{ConnectionStats, Endpoint, Gateway, GatewayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway routing `/faulty` to one faulty replica with 4 permits, and short client
/// timeouts.
async fn gateway() -> (tempfile::TempDir, std::net::SocketAddr) {
    let (dir, _, addr) = gateway_with(GatewayConfig {
        header_read_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(2),
        ..GatewayConfig::default()
    })
    .await;
    (dir, addr)
}

/// [`gateway`] with `config`.
async fn gateway_with(config: GatewayConfig) -> (tempfile::TempDir, Gateway, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(config);
    gateway.set_routes(vec![(Route::parse("/faulty").unwrap(), app("faulty"))]);
    let faulty = service(&runtime, shoal_fixtures::FAULTY_WASM, instance(&[])).await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local("faulty-1".into(), 1, faulty, 4),
    );
    let addr = serve(&gateway).await;
    (dir, gateway, addr)
}

/// Reads what the server sends until it closes the connection (or `limit` passes).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut received))
        .await
        .expect("the server closed the connection in time")
        .expect("reading the connection");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trickling_bodies_do_not_take_the_app_offline() {
    let (_dir, addr) = gateway().await;
    // 200 clients start a 100 kB POST to an app that reads its body, send 10 bytes, stall.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST /faulty/echo HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n0123456789",
            )
            .await
            .unwrap();
        slow.push(stream);
    }
    // Meanwhile a normal client is served, every time (with 4 permits held by trickling
    // clients it would wait 1 s and get 503).
    let client = HttpClient::new();
    for _ in 0..20 {
        let reply = client.get(&format!("http://{addr}/faulty/count")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // The trickling clients are answered 408 once their body timeout passes.
    for stream in slow.iter_mut().take(3) {
        let answer = read_until_closed(stream, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_its_request_head_is_cut_off() {
    let (_dir, addr) = gateway().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /faulty/count HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    read_until_closed(&mut stream, Duration::from_secs(10)).await;

    // An idle keep-alive connection goes the same way, after answering what it was sent.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /faulty/count HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// hyper reads HTTP/2's preface, and waits between an HTTP/2 connection's requests, with no
/// deadline of its own: a half-sent preface, or an HTTP/2 connection left idle, is let go
/// after the head timeout all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_preface_or_an_idle_http2_connection_is_let_go() {
    use http_body_util::{BodyExt, Empty};
    let (_dir, addr) = gateway().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5)).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    // A request longer than two head timeouts, and one after it: busy is not idle.
    for path in ["/faulty/sleep/4000", "/faulty/x"] {
        let request = http::Request::get(format!("http://{addr}{path}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.into_body().collect().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the gateway let the idle HTTP/2 connection go")
        .unwrap()
        .unwrap();
}

/// An HTTP/1.1 connection is left to hyper's own keep-alive timeout once it has had a
/// request: a long request and one after it, on one connection, both answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_outlives_a_long_request() {
    use http_body_util::{BodyExt, Empty};
    let (_dir, addr) = gateway().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for path in ["/faulty/sleep/2500", "/faulty/x"] {
        let request = http::Request::get(path)
            .header("host", "faulty")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        // Once the connection takes another request (an error if the gateway closed it).
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.into_body().collect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused() {
    let (_dir, addr) = gateway().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let huge = "x".repeat(1 << 20);
    let request = format!("GET /faulty/count HTTP/1.1\r\nhost: test\r\nx-big: {huge}\r\n\r\n");
    // The server may stop reading (and close) before it has all of it.
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}

/// A head past 64 KiB is refused with 431 however it arrives, and one within it is served:
/// before, HTTP/1.1's bound was hyper's read buffer, near 400 KiB and not at one size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_past_64_kib_is_refused_at_one_size() {
    let (_dir, addr) = gateway().await;
    for (bytes, status) in [(60 << 10, "HTTP/1.1 200"), (66 << 10, "HTTP/1.1 431")] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let big = "x".repeat(bytes);
        let request = format!(
            "GET /faulty/count HTTP/1.1\r\nhost: test\r\nx-big: {big}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        assert!(answer.starts_with(status), "{bytes}: {answer}");
        if status.ends_with("431") {
            assert!(answer.contains("head_too_large"), "{answer}");
        }
    }
}

/// One client holds at most its share of the gateway's connections: past it, its new ones
/// are closed unanswered, and one that ends gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holds_at_most_its_share_of_the_connections() {
    let (_dir, gateway, addr) = gateway_with(GatewayConfig {
        max_client_connections: 2,
        ..GatewayConfig::default()
    })
    .await;
    // A connection that asked for /faulty/count and got the start of its answer.
    let served = || async move {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /faulty/count HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .ok()?;
        let mut start = [0u8; 12];
        stream.read_exact(&mut start).await.ok()?;
        (&start == b"HTTP/1.1 200").then_some(stream)
    };
    let mut held = vec![served().await.unwrap(), served().await.unwrap()];
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /faulty/count HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer));
    let _ = read.await.expect("the third connection is closed at once");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(
        gateway.connections(),
        ConnectionStats {
            open: 2,
            refused: 1
        }
    );

    drop(held.pop());
    eventually(Duration::from_secs(10), "the slot comes back", || {
        gateway.connections().open == 1
    })
    .await;
    held.push(served().await.expect("served again"));
    assert_eq!(gateway.connections().open, 2);
}

/// A client that asks for a large answer and never reads it cannot hold the replica's
/// permits past its guest: once the guest has finished (here, stopped by its 1 s timeout
/// while blocked writing), the rest of the answer waiting for the client holds no permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_do_not_take_the_app_offline() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let gateway = Gateway::new(GatewayConfig::default());
    gateway.set_routes(vec![(Route::parse("/faulty").unwrap(), app("faulty"))]);
    let config = shoal_runtime::InstanceConfig {
        timeout: Some(Duration::from_secs(1)),
        ..instance(&[])
    };
    let faulty = service(&runtime, shoal_fixtures::FAULTY_WASM, config).await;
    gateway.add_endpoint(
        app("faulty"),
        Endpoint::local("faulty-1".into(), 1, faulty, 4),
    );
    let addr = serve(&gateway).await;
    // Every permit taken by a client asking for 64 MiB and reading none of it.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /faulty/huge/64 HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let client = HttpClient::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let reply = client.get(&format!("http://{addr}/faulty/count")).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled clients still hold every permit, long after their guests' timeout"
        );
    }
    drop(stalled);
}

/// A client that stops reading its answer loses its connection once the gateway has been
/// unable to write to it for the send timeout: it cannot hold connections forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let (_dir, gateway, addr) = gateway_with(GatewayConfig {
        send_timeout: Duration::from_secs(1),
        ..GatewayConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /faulty/huge/64 HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).await.unwrap();
    assert_eq!(&start, b"HTTP/1.1 200");
    eventually(
        Duration::from_secs(15),
        "the stalled connection is closed",
        || gateway.connections().open == 0,
    )
    .await;
    drop(stream);
}

/// Over HTTP/2 a client that stops reading one answer stalls only that stream (its
/// flow-control window stays shut) while the socket still takes writes and the client
/// answers pings: the stream waiting for the send timeout cuts the connection all the same,
/// also once the connection is idle and shutting down gracefully (which waits for its
/// streams: the stalled one would never end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_a_stream_is_cut_off() {
    for header_read_timeout in [Duration::from_secs(30), Duration::from_millis(500)] {
        let (_dir, gateway, addr) = gateway_with(GatewayConfig {
            send_timeout: Duration::from_secs(3),
            header_read_timeout,
            ..GatewayConfig::default()
        })
        .await;
        stop_reading_one_stream(&gateway, addr).await;
    }
}

async fn stop_reading_one_stream(gateway: &Gateway, addr: std::net::SocketAddr) {
    use http_body_util::Empty;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .adaptive_window(false)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/faulty/huge/64"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Its body is never read, so no window update goes back.
    eventually(
        Duration::from_secs(20),
        "the connection with the stalled stream is closed",
        || gateway.connections().open == 0,
    )
    .await;
    drop(response);
    connection.abort();
}
