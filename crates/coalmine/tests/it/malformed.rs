//! Malformed HTTP/1.x from raw sockets against a real router and a real upstream, all on
//! 127.0.0.1. The router's promise: malformed HTTP gets a 4xx or a closed connection, never a
//! panic, and an ambiguous request never reaches the upstream.
//!
//! A panic in a connection task is caught by tokio (the process stays up, the connection just
//! closes), so the router's stderr is checked for one too.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// A router whose stderr is watched

struct Watched {
    router: Router,
}

fn watched_router(extra: &[&str]) -> Watched {
    Watched {
        router: router(extra),
    }
}

impl Watched {
    fn addr(&self) -> String {
        self.router.base.trim_start_matches("http://").to_string()
    }

    /// The process is up, has printed no panic, and proxies a plain request.
    fn assert_healthy(&mut self, when: &str) {
        let exited = self.router.proc.child.try_wait().unwrap();
        assert!(exited.is_none(), "{when}: the router exited: {exited:?}");
        let seen = exchange(
            &self.addr(),
            &[b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
            false,
            Duration::from_secs(5),
        );
        let answers = parse_responses(&seen.bytes).unwrap();
        assert!(
            matches!(answers.first(), Some(a) if a.status == 200 && a.body == b"ok\n"),
            "{when}: a plain request through the router got {}",
            show(&seen.bytes)
        );
        self.assert_no_panic(when);
    }

    fn assert_no_panic(&self, when: &str) {
        let stderr = self.router.proc.stderr();
        assert!(
            !stderr.contains("panicked"),
            "{when}: the router panicked:\n{stderr}"
        );
    }

    async fn requests(&self) -> u64 {
        stats(&self.router).await["stable"]["requests"]
            .as_u64()
            .expect("stable request count")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw exchanges

/// What came back on one client connection.
struct Seen {
    bytes: Vec<u8>,
    /// The router closed the connection (end of stream or reset) before the time limit.
    closed: bool,
    took: Duration,
}

/// Opens a connection, writes `parts` (50 ms apart, so each arrives in a read of its own),
/// optionally closes the write side, and reads until the router closes the connection or
/// `limit` has passed since the connection opened.
fn exchange(addr: &str, parts: &[&[u8]], half_close: bool, limit: Duration) -> Seen {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect to the router");
    let _ = s.set_nodelay(true);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The router may answer and close before it has read everything.
        if s.write_all(part).is_err() {
            break;
        }
    }
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16384];
    let closed = loop {
        let Some(left) = limit
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
        else {
            break false;
        };
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            Err(_) => break true,
        }
    };
    Seen {
        bytes,
        closed,
        took: started.elapsed(),
    }
}

fn show(bytes: &[u8]) -> String {
    const MAX: usize = 600;
    if bytes.len() <= MAX {
        format!("b\"{}\"", bytes.escape_ascii())
    } else {
        format!(
            "b\"{}\"... ({} bytes)",
            bytes[..MAX].escape_ascii(),
            bytes.len()
        )
    }
}

/// One response as the client received it.
struct Answer {
    status: u16,
    /// Header lines, lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The status of a status line that starts "HTTP/1.1 " or "HTTP/1.0 " and three digits.
fn status_line(line: &[u8]) -> Option<u16> {
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let (digits, after) = rest.split_at_checked(3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !matches!(after.first(), None | Some(b' ')) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Could `bytes` be the start of a well-formed status line?
fn status_line_prefix(bytes: &[u8]) -> bool {
    let pattern = b"HTTP/1.";
    let n = bytes.len().min(pattern.len());
    bytes[..n] == pattern[..n]
        && bytes
            .iter()
            .enumerate()
            .skip(pattern.len())
            .take(5)
            .all(|(i, &b)| match i {
                7 => b == b'0' || b == b'1',
                8 => b == b' ',
                _ => b.is_ascii_digit(),
            })
}

/// Every response in what the router sent, in order; an error for a malformed status line or
/// head. A response cut short by the connection closing ends the list.
fn parse_responses(bytes: &[u8]) -> Result<Vec<Answer>, String> {
    let mut answers = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(head_len) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            let line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
            let cut_short = line.len() == rest.len() && status_line_prefix(rest);
            if cut_short || status_line(line.strip_suffix(b"\r").unwrap_or(line)).is_some() {
                break;
            }
            return Err(format!("malformed response start {}", show(rest)));
        };
        let head = &rest[..head_len];
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next().unwrap_or_default();
        let status =
            status_line(first).ok_or_else(|| format!("malformed status line {}", show(first)))?;
        let mut headers = Vec::new();
        for line in lines {
            let text = String::from_utf8_lossy(line);
            let (name, value) = text
                .split_once(':')
                .ok_or_else(|| format!("malformed response header {}", show(line)))?;
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        rest = &rest[head_len + 4..];
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            answers.push(answer);
            continue;
        }
        if answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            match dechunk(rest) {
                Some((body, used)) => {
                    answer.body = body;
                    rest = &rest[used..];
                    answers.push(answer);
                }
                None => break,
            }
        } else if let Some(len) = answer.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad response content-length {len:?}"))?;
            if rest.len() < len {
                break;
            }
            answer.body = rest[..len].to_vec();
            rest = &rest[len..];
            answers.push(answer);
        } else {
            answer.body = rest.to_vec();
            answers.push(answer);
            break;
        }
    }
    Ok(answers)
}

/// A complete chunked body at the start of `bytes`: the data and the bytes it took.
fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&bytes[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            loop {
                let end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        body.extend_from_slice(bytes.get(at..at + size)?);
        at += size + 2;
    }
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// What the upstream's /echo says it received is unambiguous: one framing header at most, no
/// control bytes in field values, no whitespace in field names.
fn echo_is_unambiguous(echo: &serde_json::Value) -> Result<(), String> {
    let headers = echo["headers"]
        .as_object()
        .ok_or_else(|| format!("no headers in the echo {echo}"))?;
    if headers.contains_key("content-length") && headers.contains_key("transfer-encoding") {
        return Err(format!("the upstream got both framing headers: {echo}"));
    }
    for (name, value) in headers {
        let value = value.as_str().unwrap_or_default();
        if name.bytes().any(|b| b.is_ascii_whitespace() || b == 0)
            || value.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
        {
            return Err(format!(
                "the upstream got a malformed field {name:?}: {value:?}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. A table of smuggling and framing attacks

/// A request after the body of an attack: if anything answers it 2xx, the router lost track of
/// where the attack ended.
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

/// What RFC 9112 lets the router do with a request.
enum Rule {
    /// Must not be forwarded: a 4xx or a closed connection, never a 2xx, the upstream counts
    /// no request.
    Refuse,
    /// Valid (or repairable, e.g. obs-fold replaced by a space): refusing is allowed; if
    /// forwarded, /echo must show exactly this body, unambiguous headers, and one request.
    MayForward(&'static [u8]),
}

struct Attack {
    name: &'static str,
    parts: Vec<Vec<u8>>,
    rule: Rule,
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A POST to /echo with the given framing headers and body, then [`SMUGGLED`].
fn smuggle(headers: &str, body: &[u8]) -> Vec<u8> {
    cat(&[
        b"POST /echo HTTP/1.1\r\nHost: a\r\n",
        headers.as_bytes(),
        b"\r\n",
        body,
        SMUGGLED,
    ])
}

fn attacks() -> Vec<Attack> {
    use Rule::*;
    let one = |name, bytes: Vec<u8>, rule| Attack {
        name,
        parts: vec![bytes],
        rule,
    };
    // A TE reader sees an empty body and then SMUGGLED; a CL reader sees one body.
    let zero_then: Vec<u8> = cat(&[b"0\r\n\r\n", SMUGGLED]);
    let cl_te = format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        zero_then.len()
    );
    let te_cl = format!(
        "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
        zero_then.len()
    );
    let hello: &[u8] = b"5\r\nhello\r\n0\r\n\r\n";
    let chunked_trailer = |trailer: &[u8]| {
        cat(&[
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n0\r\n",
            trailer,
            b"\r\n",
        ])
    };
    let chunked_post = |te_line: &str| {
        cat(&[
            b"POST /echo HTTP/1.1\r\nHost: a\r\n",
            te_line.as_bytes(),
            b"\r\n\r\n",
            hello,
        ])
    };
    vec![
        one(
            "CL then TE",
            cat(&[
                b"POST /echo HTTP/1.1\r\nHost: a\r\n",
                cl_te.as_bytes(),
                b"\r\n",
                &zero_then,
            ]),
            Refuse,
        ),
        one(
            "TE then CL",
            cat(&[
                b"POST /echo HTTP/1.1\r\nHost: a\r\n",
                te_cl.as_bytes(),
                b"\r\n",
                &zero_then,
            ]),
            Refuse,
        ),
        one(
            "CL then TE spelled CHUNKED",
            smuggle(
                "Content-Length: 5\r\nTransfer-Encoding: CHUNKED\r\n",
                b"0\r\n\r\n",
            ),
            Refuse,
        ),
        one(
            "TE: xchunked",
            smuggle("Transfer-Encoding: xchunked\r\n", hello),
            Refuse,
        ),
        one(
            "TE: xchunked with CL",
            smuggle(
                "Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n",
                b"hello",
            ),
            Refuse,
        ),
        one(
            "TE: chunked, identity (chunked not last)",
            smuggle("Transfer-Encoding: chunked, identity\r\n", hello),
            Refuse,
        ),
        one(
            "TE: chunked and a second TE: identity",
            smuggle(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                hello,
            ),
            Refuse,
        ),
        one(
            "TE in an HTTP/1.0 request",
            cat(&[
                b"POST /echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                hello,
                SMUGGLED,
            ]),
            Refuse,
        ),
        one(
            "TE:  chunked (two spaces of OWS)",
            chunked_post("Transfer-Encoding:  chunked"),
            MayForward(b"hello"),
        ),
        one(
            "TE:<tab>chunked",
            chunked_post("Transfer-Encoding:\tchunked"),
            MayForward(b"hello"),
        ),
        one(
            "TE: chunked<tab> (trailing OWS)",
            chunked_post("Transfer-Encoding: chunked\t"),
            MayForward(b"hello"),
        ),
        one(
            "TE: Chunked (codings are case-insensitive)",
            chunked_post("Transfer-Encoding: Chunked"),
            MayForward(b"hello"),
        ),
        one(
            "two CLs, 5 and 6",
            smuggle("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
            Refuse,
        ),
        one(
            "CL: 5, 6",
            smuggle("Content-Length: 5, 6\r\n", b"hello!"),
            Refuse,
        ),
        one(
            "CL: +5",
            smuggle("Content-Length: +5\r\n", b"hello"),
            Refuse,
        ),
        one(
            "CL: 5 5",
            smuggle("Content-Length: 5 5\r\n", b"hello"),
            Refuse,
        ),
        one(
            "CL: 0x5",
            smuggle("Content-Length: 0x5\r\n", b"hello"),
            Refuse,
        ),
        one(
            "CL: -1",
            smuggle("Content-Length: -1\r\n", b"hello"),
            Refuse,
        ),
        one(
            "CL beyond u64",
            smuggle("Content-Length: 18446744073709551621\r\n", b"hello"),
            Refuse,
        ),
        one(
            "chunk size of 17 hex digits (wraps to 5 in 64 bits)",
            smuggle(
                "Transfer-Encoding: chunked\r\n",
                b"10000000000000005\r\nhello\r\n0\r\n\r\n",
            ),
            Refuse,
        ),
        one(
            "chunk size ended by a bare LF",
            smuggle(
                "Transfer-Encoding: chunked\r\n",
                b"5\nhello\r\n0\r\n\r\n",
            ),
            Refuse,
        ),
        one(
            "chunk data without its CRLF",
            smuggle("Transfer-Encoding: chunked\r\n", b"5\r\nhello0\r\n\r\n"),
            Refuse,
        ),
        one(
            "chunk data ended by a bare LF",
            smuggle("Transfer-Encoding: chunked\r\n", b"5\r\nhello\n0\r\n\r\n"),
            Refuse,
        ),
        one(
            "chunk size '5 6' (a space inside the size)",
            smuggle(
                "Transfer-Encoding: chunked\r\n",
                b"5 6\r\nhello\r\n0\r\n\r\n",
            ),
            Refuse,
        ),
        one(
            "last chunk's blank line a bare LF",
            smuggle("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\n"),
            Refuse,
        ),
        one(
            "space before the colon: 'Transfer-Encoding : chunked' with CL",
            smuggle(
                "Content-Length: 5\r\nTransfer-Encoding : chunked\r\n",
                b"0\r\n\r\n",
            ),
            Refuse,
        ),
        one(
            "space before the colon: 'Content-Length : 5'",
            smuggle("Content-Length : 5\r\n", b"hello"),
            Refuse,
        ),
        one(
            "obs-fold: a header line starting with a space, naming TE",
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Note: a\r\n Transfer-Encoding: chunked\r\n\r\nhello"
                .to_vec(),
            MayForward(b"hello"),
        ),
        one(
            "obs-fold: a header line starting with a tab, on CL",
            smuggle("Content-Length: 5\r\n\t6\r\n", b"hello!"),
            Refuse,
        ),
        one(
            "NUL in the request line",
            cat(&[b"GET /e\0cho HTTP/1.1\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "NUL in the method",
            cat(&[b"G\0ET /echo HTTP/1.1\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "NUL in a header value",
            b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Note: a\0b\r\n\r\n".to_vec(),
            MayForward(b""),
        ),
        one(
            "NUL in a CL value",
            smuggle("Content-Length: 5\0\r\n", b"hello"),
            Refuse,
        ),
        one(
            "bare CR in a header value, then TE",
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Note: a\rTransfer-Encoding: chunked\r\n\r\nhello"
                .to_vec(),
            MayForward(b"hello"),
        ),
        one(
            "absolute-form (hyper's path): chunk data without its CRLF",
            cat(&[
                b"POST http://a/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"5\r\nhelloX0\r\n\r\n",
                SMUGGLED,
            ]),
            Refuse,
        ),
        one(
            "NUL in a trailer field",
            chunked_trailer(b"X-Sum: a\0b\r\n"),
            MayForward(b"hello"),
        ),
        one(
            "a trailer line without a colon",
            chunked_trailer(b"no-colon-here\r\n"),
            Refuse,
        ),
        one(
            "obs-fold in the trailer section",
            chunked_trailer(b"X-Sum: a\r\n b\r\n"),
            MayForward(b"hello"),
        ),
        one(
            "two Host headers",
            cat(&[b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "an HTTP/1.1 request without Host",
            cat(&[b"GET /echo HTTP/1.1\r\nX-Note: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "request target with characters a URI cannot hold",
            cat(&[b"GET /echo?q=\"<>{}| HTTP/1.1\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "request line without a version",
            cat(&[b"GET /echo\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "HTTP/2.0 in an HTTP/1 request line",
            cat(&[b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "HTTP/1.10 as the version",
            cat(&[b"GET /echo HTTP/1.10\r\nHost: a\r\n\r\n", SMUGGLED]),
            Refuse,
        ),
        one(
            "a 100 KB header",
            cat(&[
                b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: ",
                &[b'a'; 100_000],
                b"\r\n\r\n",
                SMUGGLED,
            ]),
            Refuse,
        ),
        Attack {
            name: "a 100 KB header in 12 writes",
            parts: (0..12)
                .map(|i| match i {
                    0 => b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec(),
                    11 => b"\r\n\r\n".to_vec(),
                    _ => vec![b'a'; 10_000],
                })
                .collect(),
            rule: Refuse,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_framing_attacks_get_4xx_or_close_and_never_reach_the_upstream() {
    let s = upstream("stable", &[]);
    let mut r = watched_router(&[
        "--stable",
        &s.url,
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "1s",
        "--response-timeout",
        "2s",
    ]);
    let addr = r.addr();
    let mut failures = Vec::new();
    for attack in attacks() {
        let before = r.requests().await;
        let parts: Vec<&[u8]> = attack.parts.iter().map(Vec::as_slice).collect();
        let seen = exchange(&addr, &parts, false, Duration::from_secs(5));
        let forwarded = r.requests().await - before;
        let mut fail = |why: String| {
            failures.push(format!(
                "{}: {why}\n  sent {}\n  got  {}",
                attack.name,
                show(&attack.parts.concat()),
                show(&seen.bytes)
            ))
        };
        let answers = match parse_responses(&seen.bytes) {
            Ok(a) => a,
            Err(e) => {
                fail(e);
                continue;
            }
        };
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        eprintln!(
            "{:<60} statuses {statuses:?} closed {} in {:?}, upstream requests +{forwarded}",
            attack.name, seen.closed, seen.took
        );
        // Every connection ends: refused at once, or kept alive for the 1 s idle timeout.
        if !seen.closed {
            fail(format!("connection still open after {:?}", seen.took));
        }
        match attack.rule {
            Rule::Refuse => {
                if answers.iter().any(|a| !(400..500).contains(&a.status)) {
                    fail(format!("answered {statuses:?} (want only 4xx, or a close)"));
                }
                if forwarded != 0 {
                    fail(format!("{forwarded} request(s) reached the upstream"));
                }
            }
            Rule::MayForward(body) => {
                let mut ok = 0;
                for a in &answers {
                    if (200..300).contains(&a.status) {
                        let echo: serde_json::Value = match serde_json::from_slice(&a.body) {
                            Ok(e) => e,
                            Err(_) => {
                                fail(format!("a 2xx that is not the echo: {}", show(&a.body)));
                                continue;
                            }
                        };
                        if echo["uri"] != "/echo"
                            || echo["bodyBytes"] != body.len()
                            || echo["bodyXxh3"] != xxh3_hex(body)
                        {
                            fail(format!(
                                "forwarded, but not as sent: the upstream got {echo}"
                            ));
                        }
                        if let Err(e) = echo_is_unambiguous(&echo) {
                            fail(e);
                        }
                        ok += 1;
                    } else if !(400..500).contains(&a.status) {
                        fail(format!("answered {} (want the echo or a 4xx)", a.status));
                    }
                }
                if forwarded != ok {
                    fail(format!(
                        "{forwarded} request(s) reached the upstream, {ok} echo answer(s)"
                    ));
                }
            }
        }
    }
    r.assert_healthy("after the attacks");
    assert!(
        failures.is_empty(),
        "{} attack(s) mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Randomized mutations of valid requests

/// xorshift64: enough randomness for mutations, and the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that mean something to an HTTP/1 parser.
const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"0",
    b"f",
    b"\xff",
    b"\r\n\r\n",
    b"ffffffffffffffff",
    b"10000000000000000",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99\r\n",
    b"Connection: close\r\n",
    b"Expect: 100-continue\r\n",
    b" HTTP/1.0",
    b"GET / HTTP/1.1\r\n\r\n",
];

fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(10) {
            // Flip a bit.
            0..=2 if at < v.len() => v[at] ^= 1 << rng.below(8),
            // Overwrite a byte with one that matters.
            3 if at < v.len() => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                v[at] = token[0];
            }
            // Insert something that matters, or a random byte.
            4..=5 => {
                let random = [rng.next() as u8];
                let token: &[u8] = if rng.below(3) == 0 {
                    &random
                } else {
                    INTERESTING[rng.below(INTERESTING.len())]
                };
                v.splice(at..at, token.iter().copied());
            }
            // Delete a few bytes.
            6..=7 => {
                let end = (at + 1 + rng.below(8)).min(v.len());
                v.drain(at.min(end)..end);
            }
            // Truncate.
            8 => v.truncate(at),
            // Repeat a slice somewhere else.
            _ => {
                let from = rng.below(v.len());
                let to = (from + 1 + rng.below(40)).min(v.len());
                let slice = v[from..to].to_vec();
                let into = rng.below(v.len() + 1);
                v.splice(into..into, slice);
            }
        }
    }
    v
}

fn fuzz_bases() -> [Vec<u8>; 4] {
    let chunked: &[u8] = b"POST /echo?fuzz=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Note: fuzz\r\n\r\n5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let length: &[u8] =
        b"POST /echo?fuzz=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nX-Note: fuzz\r\n\r\nhello world";
    let next: &[u8] = b"GET /echo?next=1 HTTP/1.1\r\nHost: a\r\n\r\n";
    [
        chunked.to_vec(),
        length.to_vec(),
        cat(&[chunked, next]),
        cat(&[length, next]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_mutations_never_break_the_router_or_its_status_lines() {
    const CASES: usize = 300;
    const BATCH: usize = 50;
    const SEED: u64 = 0x00c0_a1f1_5e55_ed01;
    let started = Instant::now();
    let s = upstream("stable", &[]);
    let mut r = watched_router(&[
        "--stable",
        &s.url,
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "1s",
        "--response-timeout",
        "2s",
    ]);
    let addr = r.addr();
    let bases = fuzz_bases();
    let mut rng = XorShift(SEED);
    let cases: Vec<Vec<u8>> = (0..CASES)
        .map(|i| mutate(&mut rng, &bases[i % bases.len()]))
        .collect();
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut slowest = Duration::ZERO;
    for (b, batch) in cases.chunks(BATCH).enumerate() {
        // A batch runs at once, one connection per case; three in four close their write side
        // after the request, so the router sees the end at once.
        let seen: Vec<Seen> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, case)| {
                    let addr = addr.as_str();
                    scope.spawn(move || {
                        exchange(addr, &[case.as_slice()], i % 4 != 0, Duration::from_secs(5))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (case, seen)) in batch.iter().zip(&seen).enumerate() {
            let n = b * BATCH + i;
            slowest = slowest.max(seen.took);
            let mut fail = |why: String| {
                failures.push(format!(
                    "case {n}: {why}\n  sent {}\n  got  {}",
                    show(case),
                    show(&seen.bytes)
                ))
            };
            if !seen.closed {
                fail(format!("connection still open after {:?}", seen.took));
            }
            match parse_responses(&seen.bytes) {
                Err(e) => fail(e),
                Ok(answers) => {
                    for a in answers {
                        *statuses.entry(a.status).or_default() += 1;
                        if a.status == 200 && a.header("x-upstream").is_some() {
                            if let Ok(echo) = serde_json::from_slice(&a.body) {
                                if let Err(e) = echo_is_unambiguous(&echo) {
                                    fail(e);
                                }
                            }
                        }
                    }
                }
            }
        }
        r.assert_healthy(&format!("after {} cases", (b + 1) * BATCH));
    }
    // The upstream answers /echo and every other path 200: a 4xx counted against it means it
    // got a request the router should not have forwarded.
    let st = stats(&r.router).await;
    let upstream_statuses = st["stable"]["statuses"].as_object().unwrap();
    for (status, count) in upstream_statuses {
        if status.starts_with('4') {
            failures.push(format!(
                "the upstream answered {count} request(s) {status}: {st}"
            ));
        }
    }
    eprintln!(
        "{CASES} mutated requests in {:?} (slowest {slowest:?}); statuses seen {statuses:?}; \
         upstream statuses {upstream_statuses:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} mutated request(s) mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Pipelining: a valid request, then garbage in the same write

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_request_pipelined_with_garbage_is_answered_and_the_garbage_is_not() {
    let s = upstream("stable", &[]);
    let mut r = watched_router(&[
        "--stable",
        &s.url,
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "1s",
    ]);
    let addr = r.addr();
    let first: &[u8] = b"GET /echo?first=1 HTTP/1.1\r\nHost: a\r\n\r\n";
    // Served by hyper rather than the fast path: absolute-form.
    let first_hyper = format!("GET http://{addr}/echo?first=1 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let garbage: [(&str, &[u8]); 8] = [
        ("a request line that is not one", b"GARBAGE\r\n\r\n"),
        ("binary", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        (
            "a space before a colon",
            b"GET /echo?second=1 HTTP/1.1\r\nHost : a\r\n\r\n",
        ),
        (
            "CL and TE",
            b"POST /echo?second=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "a malformed chunk",
            b"POST /echo?second=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        ),
        (
            "an overflowing chunk size",
            b"POST /echo?second=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "NUL in the request line",
            b"GET /echo?second=\x001 HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        ("half a request line", b"GET /echo?sec"),
    ];
    let mut failures = Vec::new();
    for (what, bad) in garbage {
        for (via, first) in [("fast path", first), ("hyper", first_hyper.as_bytes())] {
            let before = r.requests().await;
            let sent = cat(&[first, bad, SMUGGLED]);
            let seen = exchange(&addr, &[sent.as_slice()], false, Duration::from_secs(5));
            let forwarded = r.requests().await - before;
            let mut fail = |why: String| {
                failures.push(format!(
                    "{what} after a valid request ({via}): {why}\n  got {}",
                    show(&seen.bytes)
                ))
            };
            let answers = match parse_responses(&seen.bytes) {
                Ok(a) => a,
                Err(e) => {
                    fail(e);
                    continue;
                }
            };
            let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
            eprintln!(
                "{what:<32} {via:<9} statuses {statuses:?} closed {} in {:?}, upstream +{forwarded}",
                seen.closed, seen.took
            );
            match answers.first() {
                Some(a) if a.status == 200 => {
                    let echo: serde_json::Value =
                        serde_json::from_slice(&a.body).unwrap_or_default();
                    if echo["uri"] != "/echo?first=1" {
                        fail(format!("the first answer is not its echo: {echo}"));
                    }
                }
                _ => fail(format!("the valid request got {statuses:?}")),
            }
            if let Some(a) = answers
                .iter()
                .skip(1)
                .find(|a| !(400..500).contains(&a.status))
            {
                fail(format!("the garbage was answered {}", a.status));
            }
            if !seen.closed {
                fail(format!("connection still open after {:?}", seen.took));
            }
            if forwarded != 1 {
                fail(format!(
                    "{forwarded} request(s) reached the upstream, want 1"
                ));
            }
        }
    }
    r.assert_healthy("after the pipelines");
    assert!(
        failures.is_empty(),
        "{} pipeline(s) mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Both framing headers, wherever the reads split the head

/// A POST to /echo carrying both framing headers, the Transfer-Encoding line starting at byte
/// `te_at` (a padding header fills the gap), then [`SMUGGLED`].
fn cl_te_with_te_line_at(te_at: usize) -> Vec<u8> {
    let mut head = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Pad: ".to_vec();
    let pad = te_at - head.len() - 2;
    head.extend(std::iter::repeat_n(b'a', pad));
    head.extend_from_slice(b"\r\n");
    assert_eq!(head.len(), te_at);
    cat(&[
        &head,
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        SMUGGLED,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_framing_headers_are_refused_however_the_reads_split_the_head() {
    let s = upstream("stable", &[]);
    let mut r = watched_router(&[
        "--stable",
        &s.url,
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "1s",
    ]);
    let addr = r.addr();
    // hyper, served a handed-off head, reads it 24 bytes (the HTTP/2 preface check), then up
    // to byte 16,384: these put the Transfer-Encoding line across that read, and on it.
    let big = [cl_te_with_te_line_at(16_376), cl_te_with_te_line_at(16_384)];
    // On a connection hyper already serves (an absolute-form request first), the framing
    // headers of the next request arrive in separate writes.
    let first = format!("GET http://{addr}/echo?first=1 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let post: &[u8] = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n";
    let rest = cat(&[b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", SMUGGLED]);
    let cases: Vec<(&str, Vec<&[u8]>, usize)> = vec![
        ("16 KB head, TE line across byte 16,384", vec![&big[0]], 0),
        ("16 KB head, TE line at byte 16,384", vec![&big[1]], 0),
        (
            "after a hyper-served request, TE line in a write of its own",
            vec![first.as_bytes(), post, &rest],
            1,
        ),
        (
            "after a hyper-served request, TE name split across writes",
            vec![first.as_bytes(), post, &rest[..12], &rest[12..]],
            1,
        ),
    ];
    let mut failures = Vec::new();
    for (what, parts, valid) in cases {
        let before = r.requests().await;
        let seen = exchange(&addr, &parts, false, Duration::from_secs(5));
        let forwarded = r.requests().await - before;
        let mut fail = |why: String| {
            failures.push(format!(
                "{what}: {why}\n  sent {}\n  got  {}",
                show(&parts.concat()),
                show(&seen.bytes)
            ))
        };
        let answers = match parse_responses(&seen.bytes) {
            Ok(a) => a,
            Err(e) => {
                fail(e);
                continue;
            }
        };
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        eprintln!(
            "{what:<60} statuses {statuses:?} closed {} in {:?}, upstream +{forwarded}",
            seen.closed, seen.took
        );
        if answers.iter().take(valid).any(|a| a.status != 200) {
            fail(format!("the valid request first got {statuses:?}"));
        }
        if let Some(a) = answers
            .iter()
            .skip(valid)
            .find(|a| !(400..500).contains(&a.status))
        {
            fail(format!(
                "the request with both framing headers was answered {}",
                a.status
            ));
        }
        if !seen.closed {
            fail(format!("connection still open after {:?}", seen.took));
        }
        if forwarded != valid as u64 {
            fail(format!(
                "{forwarded} request(s) reached the upstream, want {valid}"
            ));
        }
    }
    r.assert_healthy("after the split heads");
    assert!(
        failures.is_empty(),
        "{} split head(s) mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
