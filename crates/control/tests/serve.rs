//! The API's listener against slow and many clients: a client stalling in its request head is
//! cut off, past the connection cap new clients wait until one leaves, and past its share a
//! client is refused.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use shoal_control::{ServeLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn api(limits: ServeLimits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/ok", get(|| async { "ok" }));
    tokio::spawn(serve(listener, router, limits, None, limits.clients()));
    addr
}

/// Everything the server sends until it closes the connection.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the server closed the connection in time")
        .unwrap();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_client_stalling_in_its_head_is_cut_off() {
    let addr = api(ServeLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServeLimits::default()
    })
    .await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x")
        .await
        .unwrap();
    until_closed(&mut stalled).await;
    // Half of HTTP/2's preface, which hyper reads with no deadline of its own.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    until_closed(&mut stalled).await;

    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The security review's hold: an HTTP/2 preface and settings, then silence, kept a slot
/// for good. Unanswered pings close it.
#[tokio::test]
async fn an_http2_client_that_answers_no_ping_is_cut_off() {
    let addr = api(ServeLimits {
        h2_ping: Duration::from_millis(300),
        ..ServeLimits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    until_closed(&mut silent).await;
}

#[tokio::test]
async fn past_the_cap_a_client_waits_for_a_connection_to_end() {
    let addr = api(ServeLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 1,
        ..ServeLimits::default()
    })
    .await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // The first connection is kept alive: the second is not served while it lasts.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
    assert!(early.is_err(), "served past the cap");
    drop(first);
    let answer = until_closed(&mut second).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn over_tls_clients_that_trust_the_ca_get_answers_and_plain_text_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = shoal_tls::Authority::load_or_create(dir.path()).unwrap();
    let issued = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/ok", get(|| async { "ok" }));
    let tls = shoal_tls::server_config(&shoal_tls::LiveCert::new(&issued).unwrap()).unwrap();
    let limits = ServeLimits {
        header_read_timeout: Duration::from_millis(500),
        ..ServeLimits::default()
    };
    tokio::spawn(serve(listener, router, limits, Some(tls), limits.clients()));

    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://{addr}/ok");
    let resp = trusting.get(&url).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    // A client that does not trust the cluster's CA refuses the server.
    let stranger = reqwest::Client::new();
    assert!(stranger.get(&url).send().await.is_err());
    // Plain HTTP on the TLS port gets no answer, and a client that never starts its
    // handshake is cut off.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(!until_closed(&mut plain).await.contains("200"));
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut silent).await, "");
}

/// One client holds at most its share: its next connection is closed unanswered.
#[tokio::test]
async fn a_client_past_its_share_is_closed_at_once() {
    let addr = api(ServeLimits {
        max_client_connections: 1,
        ..ServeLimits::default()
    })
    .await;
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut start = [0u8; 12];
    held.read_exact(&mut start).await.unwrap();
    assert_eq!(&start, b"HTTP/1.1 200");
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let _ = refused
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), refused.read_to_end(&mut answer));
    let _ = read.await.expect("closed at once");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // Its held connection ends, the server closing it: its slot comes back. It is given
    // back as the server's task ends, just after the close reaches us, so a try may still
    // be refused; each one waits on the server, none on a timer.
    held.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    until_closed(&mut held).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = TcpStream::connect(addr).await.unwrap();
        let _ = again
            .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = again.read_to_end(&mut answer).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
    }
}

/// A client that stops reading its answer is cut off after the send timeout: here it held
/// the only connection slot, and the next client is served once it is gone.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    let limits = ServeLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 1,
        send_timeout: Duration::from_millis(500),
        ..ServeLimits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/big", get(|| async { vec![b'x'; 64 << 20] }));
    tokio::spawn(serve(listener, router, limits, None, limits.clients()));
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let mut next = TcpStream::connect(addr).await.unwrap();
    next.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut next).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(stalled);
}
