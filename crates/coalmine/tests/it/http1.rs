//! The router's HTTP/1.1 path byte by byte: raw client sockets, and upstreams that answer with
//! exactly the framing under test (chunked with trailers, 1xx, HEAD, 204, read-until-close, a
//! kept-alive connection closed under the router's feet). All on 127.0.0.1.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{Answer, Conn};
use common::*;

/// What a raw upstream does with one request.
enum Reply {
    /// Answers, and keeps the connection open or closes it.
    Send(&'static [u8], bool),
    /// Closes the connection without a word.
    Drop,
}

/// An upstream speaking raw HTTP/1.1: for each request head, `answer(path, n)` (`n` counts the
/// requests on this connection from 0) says what to do. Counts connections accepted.
fn raw_upstream(
    answer: fn(&str, usize) -> Reply,
) -> (String, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for n in 0.. {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    // Request bodies in these tests are small and come with the head.
                    buf.clear();
                    match answer(&path, n) {
                        Reply::Send(bytes, close) => {
                            if stream.write_all(bytes).is_err() || close {
                                return;
                            }
                        }
                        Reply::Drop => return,
                    }
                }
            });
        }
    });
    (url, accepted, handle)
}

fn framings(path: &str, _: usize) -> Reply {
    let bytes: &[u8] = match path {
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
        "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        "/none" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/close" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the upstream closes",
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    };
    Reply::Send(bytes, path == "/close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_client_on_one_kept_alive_connection() {
    let (url, accepted, _upstream) = raw_upstream(framings);
    let r = router(&["--stable", &url]);
    let mut c = Conn::open(&r);
    let get = |path: &str, method: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes()
    };

    c.send(&get("/chunked", "GET"));
    let a = c.answer(false);
    assert_eq!(a.status(), 200);
    assert_eq!(a.body, b"hello world", "chunked body with an extension");
    assert!(
        a.head.contains("transfer-encoding: chunked\n"),
        "{}",
        a.head
    );
    assert!(
        !a.head.contains("connection:"),
        "hop-by-hop header forwarded: {}",
        a.head
    );

    c.send(&get("/early", "GET"));
    let hints = c.answer(false);
    assert_eq!(hints.status(), 103);
    assert!(
        hints.head.contains("link: </a.css>; rel=preload"),
        "{}",
        hints.head
    );
    let a = c.answer(false);
    assert_eq!((a.status(), a.body.as_slice()), (200, &b"ok"[..]));

    // A HEAD answer carries a length but no body: the router must not wait for one.
    c.send(&get("/len", "HEAD"));
    let a = c.answer(true);
    assert!(a.head.contains("content-length: 100"), "{}", a.head);
    c.send(&get("/none", "GET"));
    assert_eq!(c.answer(false).status(), 204);

    // No length: the body runs until the upstream closes, so the client connection closes too.
    c.send(&get("/close", "GET"));
    let a = c.answer(false);
    assert_eq!(a.body, b"until the upstream closes");
    assert!(a.head.contains("connection: close"), "{}", a.head);

    // Five requests, one connection upstream until the read-until-close answer.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let st = stats(&r).await;
    assert_eq!(
        st["stable"]["requests"], 5,
        "the 103 is not a request of its own"
    );
}

/// Answers a connection's first request, and closes it without a word when the next one
/// arrives: an upstream's idle timeout striking just as the router reuses the connection.
fn drop_second(_: &str, n: usize) -> Reply {
    match n {
        0 => Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", false),
        _ => Reply::Drop,
    }
}

/// Answers and closes at once without saying so beforehand: an idle kept-alive connection the
/// upstream closed a while before the router reuses it.
fn close_after_answer(_: &str, _: usize) -> Reply {
    Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_upstream_connections_the_upstream_closed_cost_no_idempotent_request() {
    // Closed after the request arrived, without a word: the upstream may have acted on it.
    // An idempotent request goes out again on a new connection (RFC 9110 §9.2.2); a POST is
    // never sent twice: it is the version's 502.
    let (url, accepted, _upstream) = raw_upstream(drop_second);
    let r = router(&["--stable", &url]);
    let mut c = Conn::open(&r);
    let requests: [(&[u8], u16); 3] = [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            502,
        ),
    ];
    for (i, (request, status)) in requests.iter().enumerate() {
        c.send(request);
        assert_eq!(c.answer(false).status(), *status, "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let st = stats(&r).await;
    assert_eq!(st["stable"]["statuses"]["200"], 2, "{st}");
    assert_eq!(st["stable"]["statuses"]["502"], 1, "{st}");
    assert_eq!(st["stable"]["retries"], 1, "{st}");

    // Closed earlier: a body still on its way from the client cannot be sent twice, so the
    // router notices the closed connection before it sends anything on it.
    let (url, accepted, _upstream) = raw_upstream(close_after_answer);
    let r = router(&["--stable", &url]);
    let mut c = Conn::open(&r);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.answer(false).status(), 200);
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"hello");
    let a = c.answer(false);
    assert_eq!((a.status(), a.body.as_slice()), (200, &b"one"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_and_pipelined_requests_pass_byte_for_byte() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url]);
    let mut c = Conn::open(&r);
    let echo = |a: Answer| -> serde_json::Value {
        assert_eq!(a.status(), 200);
        serde_json::from_slice(&a.body).unwrap()
    };

    // A megabyte with a length, written in one go.
    let body = pattern(1 << 20);
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req);
    let e = echo(c.answer(false));
    assert_eq!(e["bodyBytes"], body.len());
    assert_eq!(e["bodyXxh3"], xxh3_hex(&body));

    // Chunked, in separate writes, with an extension and a trailer.
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    let parts = [pattern(10), pattern(70_000), pattern(3)];
    for p in &parts {
        std::thread::sleep(Duration::from_millis(10));
        c.send(format!("{:x};note=x\r\n", p.len()).as_bytes());
        c.send(p);
        c.send(b"\r\n");
    }
    c.send(b"0\r\nx-checksum: 1\r\n\r\n");
    let e = echo(c.answer(false));
    let all = parts.concat();
    assert_eq!(e["bodyBytes"], all.len());
    assert_eq!(e["bodyXxh3"], xxh3_hex(&all));
    assert_eq!(e["headers"]["transfer-encoding"], "chunked");

    // Two requests in one write come back in order.
    c.send(b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(echo(c.answer(false))["uri"], "/echo?n=1");
    assert_eq!(echo(c.answer(false))["uri"], "/echo?n=2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_fast_path_hands_to_hyper_are_served_on_the_same_connection() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url]);
    let host = r.base.trim_start_matches("http://").to_string();
    let echo = |a: Answer| -> serde_json::Value {
        assert_eq!(a.status(), 200, "{}", a.head);
        serde_json::from_slice(&a.body).unwrap()
    };
    let mut c = Conn::open(&r);
    c.send(b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(echo(c.answer(false))["uri"], "/echo?n=1");
    // Absolute-form goes to hyper, with everything after it on this connection.
    c.send(format!("GET http://{host}/echo?n=2 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    let e = echo(c.answer(false));
    assert_eq!(
        (e["uri"].as_str(), e["headers"]["host"].as_str()),
        (Some("/echo?n=2"), Some(host.as_str()))
    );
    c.send(b"GET /echo?n=3 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(echo(c.answer(false))["uri"], "/echo?n=3");

    // HTTP/1.0.
    let mut c = Conn::open(&r);
    c.send(b"GET /echo?old=1 HTTP/1.0\r\nHost: a\r\n\r\n");
    let a = c.answer(false);
    assert!(a.head.starts_with("http/1."), "{}", a.head);
    assert_eq!(echo(a)["uri"], "/echo?old=1");

    // Expect: 100-continue: the body is sent only after the router says so.
    let mut c = Conn::open(&r);
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.answer(false).status(), 100);
    c.send(b"body");
    assert_eq!(echo(c.answer(false))["bodyBytes"], 4);
    let st = stats(&r).await;
    assert_eq!(st["stable"]["requests"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_close_when_the_client_asks_or_after_the_idle_timeout() {
    let s = upstream("stable", &[]);
    let r = router(&["--stable", &s.url, "--idle-timeout", "1s"]);
    let mut c = Conn::open(&r);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let a = c.answer(false);
    assert_eq!(a.status(), 200);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(c.closes_within(Duration::from_secs(2)));

    let mut c = Conn::open(&r);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.answer(false).status(), 200);
    let idle = Instant::now();
    assert!(
        c.closes_within(Duration::from_secs(5)),
        "idle connection kept"
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}, idle timeout 1s"
    );
}
