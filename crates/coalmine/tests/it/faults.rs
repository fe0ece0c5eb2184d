//! The router under faults: upstreams that reset connections or break answers off, clients
//! that upload slowly or stall, a process out of file descriptors, idle HTTP/2 connections.
//! Real `coalmine` processes on 127.0.0.1; raw sockets where the exact bytes matter.

use crate::common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::{Broken, Conn};
use common::*;

/// What a stream of raw requests saw, and what the upstream and router counted.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Answers with a 5xx status.
    server_errors: u64,
    /// Connections that broke before or during an answer.
    broken: u64,
}

/// Sends `n` requests of `method` (with a 5-byte body unless GET) on `connections` kept-alive
/// raw connections, each head and body in one write, each with its own `x-request-id`; a
/// connection that breaks is replaced.
fn raw_requests(router: &Router, method: &str, n: u64, connections: u64, tag: &str) -> Tally {
    let per = n / connections;
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            let addr = router.base.trim_start_matches("http://").to_string();
            let (method, tag) = (method.to_string(), tag.to_string());
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                let mut conn = Conn::to(&addr);
                for i in 0..per {
                    let body = if method == "GET" { "" } else { "hello" };
                    let length = if body.is_empty() {
                        String::new()
                    } else {
                        format!("content-length: {}\r\n", body.len())
                    };
                    let request = format!(
                        "{method} /pay HTTP/1.1\r\nhost: shop\r\nx-request-id: {tag}-{t}-{i}\r\n{length}\r\n{body}"
                    );
                    tally.sent += 1;
                    if conn.stream.write_all(request.as_bytes()).is_err() {
                        tally.broken += 1;
                        conn = Conn::to(&addr);
                        continue;
                    }
                    match conn.try_answer(method == "HEAD") {
                        Ok(a) if a.status() >= 500 => {
                            tally.server_errors += 1;
                            if a.head.contains("connection: close") {
                                conn = Conn::to(&addr);
                            }
                        }
                        Ok(a) => {
                            if a.head.contains("connection: close") {
                                conn = Conn::to(&addr);
                            }
                        }
                        Err(Broken::NoAnswer | Broken::MidAnswer) => {
                            tally.broken += 1;
                            conn = Conn::to(&addr);
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        let t = t.join().unwrap();
        all.sent += t.sent;
        all.server_errors += t.server_errors;
        all.broken += t.broken;
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_resetting_five_percent_never_gets_a_post_twice_and_every_failure_counts() {
    // The upstream reads each whole request, then resets 5 % of connections without a word.
    let s = upstream("stable", &["--reset-rate", "0.05", "--seed", "11"]);
    let r = router(&["--stable", &s.url]);
    let posts = raw_requests(&r, "POST", 2000, 8, "post");
    let received = get_json(&format!("{}/_coalmine/received", s.url)).await;
    assert_eq!(
        received["duplicatesByMethod"]["POST"].as_u64().unwrap_or(0),
        0,
        "a POST reached the upstream twice: {received}"
    );
    assert_eq!(received["byMethod"]["POST"], 2000, "{received}");
    // About 100 resets (Binomial(2000, 0.05): sd 9.7), every one a failure the client saw.
    let seen = posts.server_errors + posts.broken;
    assert!((50..=150).contains(&seen), "{posts:?}");
    assert_eq!(
        posts.broken, 0,
        "the router answers 502, never drops: {posts:?}"
    );
    let st = stats(&r).await;
    eprintln!(
        "POST at 5 % resets: {} sent, {} received, {} twice; clients saw {seen} failures, the router counted {}",
        posts.sent,
        received["byMethod"]["POST"],
        received["duplicatesByMethod"]["POST"].as_u64().unwrap_or(0),
        server_errors(&st["stable"])
    );
    assert_eq!(
        server_errors(&st["stable"]),
        seen,
        "counted failures = failures clients saw: {st}"
    );
    assert_eq!(st["stable"]["retries"], 0, "no POST is retried: {st}");

    // GETs may go out again on a new connection (RFC 9110 §9.2.2), and every failure a client
    // still sees is counted.
    let gets = raw_requests(&r, "GET", 1000, 8, "get");
    let st = stats(&r).await;
    let received = get_json(&format!("{}/_coalmine/received", s.url)).await;
    let get_duplicates = received["duplicatesByMethod"]["GET"].as_u64().unwrap_or(0);
    eprintln!(
        "GET at 5 % resets: {} sent, {} received, {get_duplicates} twice ({} retries); clients saw {} failures",
        gets.sent,
        received["byMethod"]["GET"],
        st["stable"]["retries"],
        gets.server_errors + gets.broken
    );
    assert!(
        get_duplicates <= st["stable"]["retries"].as_u64().unwrap(),
        "{received} {st}"
    );
    assert_eq!(
        server_errors(&st["stable"]),
        seen + gets.server_errors + gets.broken,
        "{gets:?} {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_broken_off_mid_body_counts_as_the_versions_failure() {
    let s = upstream("stable", &["--reset-body-rate", "0.1", "--seed", "5"]);
    let r = router(&["--stable", &s.url]);
    let tally = raw_requests(&r, "GET", 400, 4, "body");
    // Binomial(400, 0.1): 40 ± 6.
    assert!((15..=65).contains(&tally.broken), "{tally:?}");
    let st = stats(&r).await;
    assert_eq!(server_errors(&st["stable"]), tally.broken, "{st}");
    assert_eq!(st["stable"]["failures"]["body"], tally.broken, "{st}");
    assert_eq!(
        st["stable"]["statuses"]["200"].as_u64().unwrap(),
        400 - tally.broken,
        "{st}"
    );
}

/// Sends `n` requests of `method` over one HTTP/2 connection, `concurrent` at a time, each with
/// its own `x-request-id` (a 5-byte body if `body`): how many answers were 5xx, and how many
/// streams broke (reset, or an answer cut short).
async fn h2_requests(r: &Router, method: &str, body: bool, n: u64, tag: &str) -> Tally {
    use http_body_util::{BodyExt, Full};
    let sender = h2c::<Full<bytes::Bytes>>(r).await;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut sender = sender.clone();
            let request = hyper::Request::builder()
                .method(method)
                .uri(format!("{}/pay", r.base))
                .header("x-request-id", format!("{tag}-{i}"))
                .body(Full::new(bytes::Bytes::from_static(if body {
                    b"hello"
                } else {
                    b""
                })))
                .unwrap();
            tokio::spawn(async move {
                let resp = sender.send_request(request).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            })
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.sent += 1;
        match t.await.unwrap() {
            Ok(status) if status.is_server_error() => tally.server_errors += 1,
            Ok(_) => {}
            Err(_) => tally.broken += 1,
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_resetting_http2_requests_never_gets_a_post_twice_and_every_failure_counts() {
    // HTTP/2 requests go upstream on the router's own HTTP/1.1 connections: the same rules as
    // the fast path's. The upstream resets 5 % of connections after reading a whole request.
    let s = upstream("stable", &["--reset-rate", "0.05", "--seed", "17"]);
    let r = router(&["--stable", &s.url]);
    let mut seen = 0;
    for (body, tag) in [(false, "empty"), (true, "body")] {
        let posts = h2_requests(&r, "POST", body, 1000, tag).await;
        // About 50 resets each (Binomial(1000, 0.05): sd 6.9), every one the version's 502.
        let failed = posts.server_errors + posts.broken;
        assert!((15..=90).contains(&failed), "{posts:?}");
        assert_eq!(posts.broken, 0, "answered 502, never broken: {posts:?}");
        seen += failed;
    }
    let received = get_json(&format!("{}/_coalmine/received", s.url)).await;
    assert_eq!(
        received["duplicatesByMethod"]["POST"].as_u64().unwrap_or(0),
        0,
        "a POST reached the upstream twice: {received}"
    );
    assert_eq!(received["byMethod"]["POST"], 2000, "{received}");
    let st = stats(&r).await;
    assert_eq!(server_errors(&st["stable"]), seen, "{st}");
    assert_eq!(st["stable"]["retries"], 0, "no POST is retried: {st}");
    assert_eq!(st["stable"]["statuses"]["200"], 2000 - seen, "{st}");

    // A GET may go out again, once, on a new connection; what a client still sees is counted.
    let gets = h2_requests(&r, "GET", false, 1000, "get").await;
    let st = stats(&r).await;
    let received = get_json(&format!("{}/_coalmine/received", s.url)).await;
    let duplicates = received["duplicatesByMethod"]["GET"].as_u64().unwrap_or(0);
    assert!(
        duplicates <= st["stable"]["retries"].as_u64().unwrap(),
        "{received} {st}"
    );
    assert_eq!(gets.broken, 0, "{gets:?}");
    assert_eq!(
        server_errors(&st["stable"]),
        seen + gets.server_errors,
        "{gets:?} {st}"
    );
}

/// A router over a plain upstream whose answers time out 1 s after the request has ended, and
/// whose clients may stall an upload for 2 s (the idle timeout).
fn upload_timing_router() -> (Upstream, Router) {
    let s = upstream("stable", &[]);
    let r = router(&[
        "--stable",
        &s.url,
        "--response-timeout",
        "1s",
        "--idle-timeout",
        "2s",
    ]);
    (s, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_timed_from_the_end_of_the_request_and_a_stalled_one_is_the_clients() {
    let (_s, r) = upload_timing_router();
    // Half the body, 1.5 s of silence (longer than the response timeout, shorter than the
    // stall limit), then the rest: the upstream answers at once after that.
    let mut c = Conn::open(&r);
    c.send(b"POST /pay HTTP/1.1\r\nhost: shop\r\ncontent-length: 10\r\n\r\nhello");
    std::thread::sleep(Duration::from_millis(1500));
    c.send(b"world");
    assert_eq!(c.answer(false).status(), 200);
    // The same in chunks.
    c.send(b"POST /pay HTTP/1.1\r\nhost: shop\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n");
    std::thread::sleep(Duration::from_millis(1500));
    c.send(b"5\r\nworld\r\n0\r\n\r\n");
    assert_eq!(c.answer(false).status(), 200);

    // A client that stops mid-body: 408 after the stall limit, and the version is not blamed.
    let mut c = Conn::open(&r);
    let started = Instant::now();
    c.send(b"POST /pay HTTP/1.1\r\nhost: shop\r\ncontent-length: 10\r\n\r\nhello");
    let a = c.answer(false);
    assert_eq!(a.status(), 408, "{}", a.head);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    let st = stats(&r).await;
    assert_eq!(st["stable"]["statuses"]["200"], 2, "{st}");
    assert_eq!(server_errors(&st["stable"]), 0, "{st}");
    assert_eq!(st["stable"]["requests"], 2, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_upload_is_the_clients_business_too() {
    use http_body_util::BodyExt;
    let (_s, r) = upload_timing_router();
    let mut sender = h2c(&r).await;
    // A body whose second half comes 1.5 s after the first.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(2);
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let request = hyper::Request::post(format!("{}/pay", r.base))
        .body(body)
        .unwrap();
    let answer = tokio::spawn(async move { sender.send_request(request).await });
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"hello",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"world",
    ))))
    .await
    .unwrap();
    drop(tx);
    let resp = answer.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    let st = stats(&r).await;
    assert_eq!(st["stable"]["statuses"]["200"], 1, "{st}");
    assert_eq!(server_errors(&st["stable"]), 0, "{st}");
}

/// A receiver as a stream, for a body fed by a test.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_router_backs_off_keeps_serving_and_blames_itself() {
    let (s, c) = (upstream("stable", &[]), upstream("canary", &[]));
    let r = split_router(&s, &c, &["--match", "x-canary=true"]);
    // Two kept-alive clients from before the shortage, each with a stable upstream connection
    // in the router's pool.
    let mut early = [Conn::open(&r), Conn::open(&r)];
    for conn in &mut early {
        conn.send(b"GET /pay HTTP/1.1\r\nhost: shop\r\n\r\n");
        assert_eq!(conn.answer(false).status(), 200);
    }
    // Squeeze the router to the descriptors it has now, then queue connections it cannot take.
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", r.proc.pid()))
        .unwrap()
        .count();
    let limit = (open_fds + 2).to_string();
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &r.proc.pid().to_string(),
            // The soft limit only: raising a hard limit again needs CAP_SYS_RESOURCE.
            &format!("--nofile={limit}:"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let addr = r.base.trim_start_matches("http://").to_string();
    let waiting: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Out of descriptors, accepting must not spin.
    let cpu_before = cpu_seconds(r.proc.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(r.proc.pid()) - cpu_before;
    assert!(
        cpu < 0.5,
        "the router used {cpu:.2} s of CPU in 2 s while out of descriptors"
    );
    // Existing connections keep being served from the pool...
    for conn in &mut early {
        conn.send(b"GET /pay HTTP/1.1\r\nhost: shop\r\n\r\n");
        assert_eq!(conn.answer(false).status(), 200);
    }
    // ...and a request that needs a new upstream connection is the router's failure (503),
    // not the canary's.
    early[0].send(b"GET /pay HTTP/1.1\r\nhost: shop\r\nx-canary: true\r\n\r\n");
    let a = early[0].answer(false);
    assert_eq!(a.status(), 503, "{}", String::from_utf8_lossy(&a.body));
    drop(waiting);
    drop(early);
    // Descriptors back: the queued connections are gone, new ones are served.
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &r.proc.pid().to_string(), "--nofile=1024:"])
        .status()
        .unwrap();
    assert!(raised.success());
    let mut later = Conn::open(&r);
    later.send(b"GET /pay HTTP/1.1\r\nhost: shop\r\nx-canary: true\r\n\r\n");
    assert_eq!(later.answer(false).status(), 200);
    let st = stats(&r).await;
    assert_eq!(server_errors(&st["canary"]), 0, "{st}");
    assert_eq!(st["canary"]["failures"]["connect"], 0, "{st}");
    assert!(st["router"]["acceptErrors"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["router"]["localFailures"]["resources"], 1, "{st}");
    let metrics = metrics_text(&r.admin).await;
    assert!(
        metrics.contains("coalmine_router_local_failures_total{reason=\"resources\"} 1\n"),
        "{metrics}"
    );
}

/// Seconds until the peer closes `stream` (reading and dropping whatever it sends), or `None`
/// if it is still open after `within`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<f64> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed().as_secs_f64()),
            Ok(Ok(_)) => {}
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_h2c_and_tls() {
    use tokio::io::AsyncWriteExt;
    let s = upstream("stable", &[]);
    let cert = self_signed("h2-idle");
    let timeouts = ["--header-read-timeout", "1s", "--idle-timeout", "2s"];
    let plain = router(&[&["--stable", &s.url][..], &timeouts].concat());
    let tls = router(&[&["--stable", &s.url][..], &cert.tls_flags(), &timeouts].concat());
    let tls_connector = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.certified.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    };
    let connect_tls = |addr: String| {
        let connector = tls_connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.unwrap()
        }
    };
    let plain_addr = plain.base.trim_start_matches("http://").to_string();
    let tls_addr = tls.base.trim_start_matches("http://").to_string();

    // A connection that sends the preface and no request: closed after the header timeout.
    let mut h2c = tokio::net::TcpStream::connect(&plain_addr).await.unwrap();
    h2c.write_all(H2_PREFACE).await.unwrap();
    let t = closed_after(&mut h2c, Duration::from_secs(6)).await;
    assert!(
        t.is_some_and(|t| (0.9..5.0).contains(&t)),
        "h2c without a request: {t:?}"
    );
    let mut h2 = connect_tls(tls_addr.clone()).await;
    h2.write_all(H2_PREFACE).await.unwrap();
    let t = closed_after(&mut h2, Duration::from_secs(6)).await;
    assert!(
        t.is_some_and(|t| (0.9..5.0).contains(&t)),
        "h2 over TLS without a request: {t:?}"
    );

    // A connection that made a request and then idles: closed after the idle timeout.
    for tls_on in [false, true] {
        let io: Box<dyn AsyncStream> = if tls_on {
            Box::new(connect_tls(tls_addr.clone()).await)
        } else {
            Box::new(tokio::net::TcpStream::connect(&plain_addr).await.unwrap())
        };
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .unwrap();
        let ended = tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        });
        let resp = sender
            .send_request(
                hyper::Request::get(format!("{}/pay", plain.base))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let answered = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(8), ended)
            .await
            .unwrap_or_else(|_| panic!("idle h2 connection (TLS: {tls_on}) still open after 8 s"))
            .unwrap();
        let idle = ended.duration_since(answered);
        assert!(
            (Duration::from_millis(1800)..Duration::from_secs(5)).contains(&idle),
            "TLS {tls_on}: closed after {idle:?}"
        );
    }
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

/// An upstream that answers every request with a chunked body trickling out: `chunks` chunks
/// of `chunk\n`, one every `gap`. Returns its URL.
fn trickling_upstream(chunks: usize, gap: Duration) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                for _ in 0..chunks {
                    std::thread::sleep(gap);
                    if stream.write_all(b"6\r\nchunk\n\r\n").is_err() {
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_on_a_hyper_served_connection_is_not_cut_as_idle() {
    use http_body_util::BodyExt;
    // 8 chunks over 4 s: longer than the idle timeout plus the grace after it.
    let upstream = trickling_upstream(8, Duration::from_millis(500));
    let r = router(&[
        "--stable",
        &upstream,
        "--idle-timeout",
        "2s",
        "--header-read-timeout",
        "1s",
    ]);
    // HTTP/1.0 is served by hyper (close-delimited answer), side by side with HTTP/2.
    let mut old = Conn::open(&r);
    let http10 = std::thread::spawn(move || {
        old.send(b"GET /download HTTP/1.0\r\nhost: shop\r\n\r\n");
        old.try_answer(false)
    });
    let mut sender = h2c(&r).await;
    let resp = sender
        .send_request(
            hyper::Request::get(format!("{}/download", r.base))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await;
    let body = body.expect("the HTTP/2 answer came whole").to_bytes();
    assert_eq!(body, "chunk\n".repeat(8).as_bytes());
    let a = tokio::task::spawn_blocking(move || http10.join().unwrap())
        .await
        .unwrap()
        .expect("an HTTP/1.0 answer");
    assert_eq!(a.status(), 200, "{}", a.head);
    assert_eq!(
        String::from_utf8_lossy(&a.body),
        "chunk\n".repeat(8),
        "the HTTP/1.0 answer came whole"
    );
}
