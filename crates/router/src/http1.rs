//! HTTP/1.1 proxied in the client connection's own task.
//!
//! hyper serves a client connection in one task and each pooled upstream connection in another,
//! builds a `HeaderMap` per message in each direction and wakes three tasks per request. Nearly
//! every proxied request is plain: HTTP/1.1, origin-form, no body or a `Content-Length` or
//! chunked one, no `Upgrade` or `Expect`. For those this path parses the head with httparse,
//! writes the upstream request straight from the client's bytes, reads the response on an
//! upstream connection the task owns for the exchange, and passes bodies through unchanged
//! (chunked framing is checked, never re-encoded).
//!
//! Anything else — HTTP/1.0, HTTP/2's preface, absolute-form targets, `Upgrade`, `Expect`,
//! ambiguous framing, a head that does not parse or is too large — is handed to hyper together
//! with every byte read so far, and hyper serves the connection from then on. So the odd cases
//! keep hyper's exact behaviour (and its 400/431 answers), and this path only has to be right
//! about the plain ones.

use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain;
use crate::framing::{content_length, head_end, tokens, BadChunk, Chunked};
use crate::proxy::{self, Connection, IdlePool, UpstreamError};
use crate::recorder::UpstreamFailure;
use crate::route::{route, RequestView, Version};
use crate::table::UpstreamUrl;

/// Headers one head may carry on this path (hyper's default limit too); a request with more is
/// handed to hyper, a response with more is a bad gateway.
const MAX_HEADERS: usize = 100;
/// A connection's read buffer to start with; it grows up to the head limit when a head needs it.
const INITIAL_BUFFER: usize = 8 * 1024;
/// Largest upstream response head accepted (hyper's client reads about as much).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The client-side limits of this path.
#[derive(Clone, Debug)]
pub struct Limits {
    /// From a head's first byte (or a new connection) to its blank line.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// How a connection left this path.
pub enum Ended {
    Closed,
    /// hyper serves the connection from here on; `read` holds what was read and not used.
    Handoff {
        read: Bytes,
    },
}

// ---------------------------------------------------------------------------------------------
// Buffers and framing

/// A read buffer: `data[start..end]` is read and not yet used.
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(capacity: usize) -> Self {
        Buf {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads more after the unread bytes (`Ok(0)`: end of stream). Room comes from moving the
    /// unread bytes to the front, then from growing the buffer up to `max`; `max` unread bytes
    /// are an error.
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R, max: usize) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else if self.data.len() < max {
                let grown = (self.data.len() * 2).min(max);
                self.data.resize(grown, 0);
            } else {
                return Err(io::Error::other("read buffer full"));
            }
        }
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Moves the body bytes `buf` holds into `out`; true once the whole body has passed.
fn take_body(buf: &mut Buf, framing: &mut Framing, out: &mut Vec<u8>) -> Result<bool, BadChunk> {
    let unread = buf.unread();
    let (n, done) = match framing {
        Framing::Empty => (0, true),
        Framing::Length(left) => {
            let n = unread
                .len()
                .min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= n as u64;
            (n, *left == 0)
        }
        Framing::Chunked(c) => {
            let n = c.scan(unread)?;
            (n, c.is_done())
        }
        Framing::UntilClose => (unread.len(), false),
    };
    out.extend_from_slice(&unread[..n]);
    buf.consume(n);
    Ok(done)
}

#[derive(Debug)]
enum Broken {
    /// The sending side closed early or failed.
    Source,
    /// The sending side sent nothing for the allowed time.
    SourceStalled,
    /// The receiving side failed.
    Sink,
    /// The receiving side took nothing for the allowed time.
    SinkStalled,
    BadChunk,
}

/// How long each side of a streamed body may stall: a read that brings nothing, or a write
/// that takes nothing, for this long breaks the stream.
#[derive(Clone, Copy)]
struct Stalls {
    source: Duration,
    sink: Duration,
}

/// Streams the rest of a body from `src` (after what `buf` held) to `dst`, unchanged.
async fn stream_body<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    scratch: &mut Vec<u8>,
    framing: &mut Framing,
    stalls: Stalls,
) -> Result<(), Broken>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let within = |limit: Duration| Instant::now().checked_add(limit);
    loop {
        scratch.clear();
        let cap = buf.data.len();
        let n = crate::timer::timeout_at(within(stalls.source), buf.fill(src, cap))
            .await
            .ok_or(Broken::SourceStalled)?
            .map_err(|_| Broken::Source)?;
        if n == 0 {
            return match framing {
                Framing::UntilClose => Ok(()),
                _ => Err(Broken::Source),
            };
        }
        let done = take_body(buf, framing, scratch).map_err(|_| Broken::BadChunk)?;
        let sent = async {
            dst.write_all(scratch).await?;
            if done {
                dst.flush().await?;
            }
            Ok::<(), io::Error>(())
        };
        crate::timer::timeout_at(within(stalls.sink), sent)
            .await
            .ok_or(Broken::SinkStalled)?
            .map_err(|_| Broken::Sink)?;
        if done {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Heads

/// What a header means to a proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop (RFC 9110 §7.6.1) and dropped, Connection and Transfer-Encoding aside.
    HopByHop,
    Upgrade,
    Expect,
    ForwardedFor,
    ForwardedProto,
    Host,
    Other,
}

/// Classifies a header name, case-insensitively; the length is compared first so most names
/// are told apart in an instruction or two.
fn kind(name: &str) -> Kind {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => Kind::HopByHop,
        4 if is("host") => Kind::Host,
        6 if is("expect") => Kind::Expect,
        7 if is("upgrade") => Kind::Upgrade,
        7 if is("trailer") => Kind::HopByHop,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::ForwardedFor,
        16 if is("proxy-connection") => Kind::HopByHop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::ForwardedProto,
        18 if is("proxy-authenticate") => Kind::HopByHop,
        19 if is("proxy-authorization") => Kind::HopByHop,
        _ => Kind::Other,
    }
}

/// What a request target may hold on this path: RFC 3986's characters. Anything else (quotes,
/// braces, spaces smuggled past a lenient parser) goes to hyper, which refuses what `http::Uri`
/// does not take.
fn is_uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%[]".contains(&b)
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request this path forwards, as read from its head.
struct Request {
    version: Version,
    framing: Framing,
    /// The client asked to close after this exchange.
    close: bool,
    head_method: bool,
    /// RFC 9110 §9.2.2: sending it twice has the effect of sending it once.
    idempotent: bool,
    set_affinity: bool,
}

/// RFC 9110 §9.2.2's idempotent methods: the only ones a proxy may send again after the
/// upstream could have acted on them.
fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Reads a complete request head and writes the upstream's into `out`; `None` hands the
/// connection to hyper.
fn request_head(
    head: &[u8],
    conn: &Connection,
    table: &crate::table::RouteTable,
    out: &mut Vec<u8>,
) -> Option<Request> {
    let mut storage = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut storage) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    let (method, path) = (req.method?, req.path?);
    if req.version != Some(1) || !path.starts_with('/') || !path.bytes().all(is_uri_byte) {
        return None;
    }
    let headers: &[httparse::Header] = req.headers;
    let (mut length, mut chunked, mut close) = (None, false, false);
    let (mut has_proto, mut hosts) = (false, 0);
    // Each name is classified once; the head is written from these.
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, k) in headers.iter().zip(kinds.iter_mut()) {
        *k = kind(h.name);
        match *k {
            Kind::ContentLength if length.is_none() => length = Some(content_length(h.value)?),
            Kind::TransferEncoding if !chunked && h.value.eq_ignore_ascii_case(b"chunked") => {
                chunked = true
            }
            Kind::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                        // Upgrade, or headers it names that must be dropped: hyper's path.
                        return None;
                    }
                }
            }
            Kind::ForwardedProto => has_proto = true,
            Kind::Host => hosts += 1,
            Kind::ForwardedFor | Kind::HopByHop | Kind::Other => {}
            // Duplicate framing headers, other codings, Upgrade and Expect.
            _ => return None,
        }
    }
    // RFC 9112 §3.2: exactly one Host; hyper's path answers 400 otherwise.
    if hosts != 1 {
        return None;
    }
    let framing = match (length, chunked) {
        (Some(_), true) => return None,
        (Some(0) | None, false) => Framing::Empty,
        (Some(n), false) => Framing::Length(n),
        (None, true) => Framing::Chunked(Chunked::new()),
    };
    let query = path.split_once('?').map(|(_, q)| q);
    let view = RequestView { headers, query };
    let decision = route(table, &view, proxy::next_random());
    if decision.mirror {
        let canary = table.doc.canary.clone().expect("mirror only with a canary");
        if matches!(framing, Framing::Empty) {
            proxy::mirror_head(&conn.worker, &conn.client, canary, || {
                let mut parts = http::Request::new(()).into_parts().0;
                parts.method = http::Method::from_bytes(method.as_bytes()).ok()?;
                parts.uri = http::Uri::try_from(path).ok()?;
                for h in headers {
                    parts.headers.append(
                        http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        http::HeaderValue::from_bytes(h.value).ok()?,
                    );
                }
                Some(parts)
            });
        } else {
            let metrics = &conn.worker.shared.metrics;
            metrics
                .mirror_skipped_body
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let classified = || headers.iter().zip(kinds);
    for (h, k) in classified() {
        if matches!(
            k,
            Kind::Other | Kind::Host | Kind::ContentLength | Kind::ForwardedProto
        ) {
            put_header(out, h.name.as_bytes(), h.value);
        }
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for (h, _) in classified().filter(|(_, k)| *k == Kind::ForwardedFor) {
        out.extend_from_slice(h.value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(conn.client.peer_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !has_proto {
        out.extend_from_slice(if conn.client.tls {
            b"x-forwarded-proto: https\r\n"
        } else {
            b"x-forwarded-proto: http\r\n"
        });
    }
    out.extend_from_slice(b"\r\n");
    Some(Request {
        version: decision.version,
        framing,
        close,
        head_method: method == "HEAD",
        idempotent: is_idempotent(method),
        set_affinity: decision.set_affinity,
    })
}

/// A response head as forwarded to the client.
struct Response {
    status: u16,
    framing: Framing,
    /// The upstream connection can carry another request afterwards.
    reusable: bool,
    /// The client connection closes after this response.
    close: bool,
}

/// Reads a complete response head and writes the client's into `out` (after what `out`
/// holds): hop-by-hop headers dropped, the affinity cookie and `Connection: close` added when
/// asked.
fn response_head(
    head: &[u8],
    request: &Request,
    mut close: bool,
    set_cookie: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<Response, &'static str> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err("the response head did not parse"),
        Err(e) => return Err(httparse_reason(e)),
    }
    let status = resp.code.ok_or("no status")?;
    let headers: &[httparse::Header] = resp.headers;
    let (mut length, mut coding_chunked, mut coded) = (None, false, false);
    let mut reusable = resp.version == Some(1);
    let mut named_by_connection = false;
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, k) in headers.iter().zip(kinds.iter_mut()) {
        *k = kind(h.name);
        match *k {
            Kind::ContentLength => {
                let n = content_length(h.value).ok_or("bad Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length");
                }
                length = Some(n);
            }
            Kind::TransferEncoding => {
                coded = true;
                coding_chunked = tokens(h.value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            }
            Kind::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        reusable = false;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        reusable |= resp.version == Some(0);
                    } else {
                        named_by_connection = true;
                    }
                }
            }
            _ => {}
        }
    }
    let informational = (100..200).contains(&status);
    if status == 101 {
        return Err("101 Switching Protocols without an upgrade request");
    }
    let framing = if informational || request.head_method || status == 204 || status == 304 {
        Framing::Empty
    } else if coded && coding_chunked {
        Framing::Chunked(Chunked::new())
    } else if coded {
        Framing::UntilClose
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if matches!(framing, Framing::UntilClose) {
        (reusable, close) = (false, true);
    }
    // Both framings in one response hint at response splitting: the coding wins (RFC 9112
    // §6.3), the length is not passed on, and the connection is not trusted again.
    if coded && length.is_some() {
        reusable = false;
    }
    let classified = || headers.iter().zip(kinds);
    let named = |name: &str| {
        named_by_connection
            && classified()
                .filter(|(_, k)| *k == Kind::Connection)
                .flat_map(|(h, _)| tokens(h.value))
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    };

    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    out.extend([status / 100, status / 10 % 10, status % 10].map(|d| b'0' + d as u8));
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (h, k) in classified() {
        let keep = match k {
            Kind::Other | Kind::Expect | Kind::ForwardedFor | Kind::ForwardedProto | Kind::Host => {
                !named(h.name)
            }
            // Under a Transfer-Encoding a length means nothing (and is not sent on).
            Kind::ContentLength => !coded,
            Kind::TransferEncoding => true,
            Kind::Connection | Kind::HopByHop | Kind::Upgrade => false,
        };
        if keep {
            put_header(out, h.name.as_bytes(), h.value);
        }
    }
    if !informational {
        if let Some(cookie) = set_cookie {
            put_header(out, b"set-cookie", cookie);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Response {
        status,
        framing,
        reusable,
        close,
    })
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::TooManyHeaders => "more than 100 response headers",
        httparse::Error::Version => "not an HTTP/1.x response",
        _ => "the response head did not parse",
    }
}

/// A short plain-text answer of the router's own.
fn plain_response(out: &mut Vec<u8>, status: StatusCode, text: &str, close: bool) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text.len() + 1,
        if close { "connection: close\r\n" } else { "" },
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream connections

/// An upstream connection with its own read buffer, owned by one exchange at a time.
struct Upstream {
    stream: TcpStream,
    buf: Buf,
}

thread_local! {
    static IDLE: std::cell::RefCell<IdlePool<Upstream>> =
        const { std::cell::RefCell::new(IdlePool::new()) };
}

impl Upstream {
    /// False when the upstream has closed an idle connection (or sent something unasked).
    /// Free when the socket has no event; otherwise one read, which tokio needs anyway before
    /// it waits for the response.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

fn checkout(upstream: u64) -> Option<Upstream> {
    IDLE.with(|p| p.borrow_mut().take(upstream, Upstream::still_open))
}

fn release(upstream: u64, conn: Upstream) {
    IDLE.with(|p| p.borrow_mut().put(upstream, conn));
}

fn protocol(detail: impl Into<String>) -> UpstreamError {
    UpstreamError::protocol(detail)
}

/// Why an exchange ended without a usable response head.
enum Failed {
    Upstream(UpstreamError),
    /// A kept-alive upstream connection refused the head before taking any of it: the request
    /// cannot have been processed, so it may go out again on a new connection.
    NotSent,
    /// The client's body broke off; nothing can be answered on this connection.
    Client,
    /// The client stopped sending its body for the idle timeout: answered 408, not counted
    /// against the version.
    ClientStalled,
    /// The client's chunked body is malformed.
    BadChunk,
}

/// Writes the whole request head (and any body that came with it). A pooled connection that
/// fails before the kernel took a single byte is [`Failed::NotSent`]; after that, any failure
/// is the upstream's, since it may have read the request.
async fn send_head(up: &mut Upstream, head: &[u8], pooled: bool) -> Result<(), Failed> {
    // Nearly always the socket takes the whole head at once: no future, no readiness dance.
    let mut written = match up.stream.try_write(head) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) if pooled => return Err(Failed::NotSent),
        Err(e) => return Err(Failed::Upstream(protocol(format!("write: {e}")))),
    };
    while written < head.len() {
        match up.stream.write(&head[written..]).await {
            Ok(0) => return Err(Failed::Upstream(protocol("write: connection closed"))),
            Ok(n) => written += n,
            Err(_) if written == 0 && pooled => return Err(Failed::NotSent),
            Err(e) => return Err(Failed::Upstream(protocol(format!("write: {e}")))),
        }
    }
    Ok(())
}

fn timed_out(detail: &str) -> Failed {
    Failed::Upstream(UpstreamError::timeout(detail))
}

/// Reads a response head on `up` and writes the client's head into `out`, forwarding any 1xx
/// heads to the client on the way. `Ok(None)`: the connection closed before any byte came
/// back (a kept-alive connection the upstream had just closed).
async fn read_response<I: AsyncWrite + Unpin>(
    up: &mut Upstream,
    client: &mut I,
    request: &Request,
    close: bool,
    set_cookie: Option<&[u8]>,
    max_head: usize,
    out: &mut Vec<u8>,
) -> Result<Option<Response>, UpstreamError> {
    let mut got_any = false;
    loop {
        if let Some(len) = head_end(up.buf.unread()) {
            out.clear();
            let resp = response_head(&up.buf.unread()[..len], request, close, set_cookie, out)
                .map_err(protocol)?;
            up.buf.consume(len);
            if (100..200).contains(&resp.status) {
                // Flushed: over TLS an early hint would otherwise wait for the final answer.
                let sent = match client.write_all(out).await {
                    Ok(()) => client.flush().await,
                    Err(e) => Err(e),
                };
                sent.map_err(|e| protocol(format!("client: {e}")))?;
                continue;
            }
            return Ok(Some(resp));
        }
        if up.buf.unread().len() >= max_head {
            return Err(protocol("response head too large"));
        }
        match up.buf.fill(&mut up.stream, max_head).await {
            Ok(0) | Err(_) if !got_any => return Ok(None),
            Ok(0) => return Err(protocol("upstream closed the connection mid-head")),
            Ok(_) => got_any = true,
            Err(e) => return Err(protocol(format!("read: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The connection loop

/// Serves a client connection until it closes, or until a request needs hyper.
pub async fn serve<I>(
    io: &mut I,
    conn: &Connection,
    limits: &Limits,
    guard: &mut drain::Guard,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Buf::new(INITIAL_BUFFER);
    let (mut upstream_out, mut client_out) = (Vec::new(), Vec::new());
    let mut first = true;
    loop {
        let head_len = match read_head(io, &mut buf, limits, guard, first).await {
            HeadRead::Ready(n) => n,
            HeadRead::Closed => return Ended::Closed,
            HeadRead::Handoff => break,
            HeadRead::TimedOut => {
                plain_response(
                    &mut client_out,
                    StatusCode::REQUEST_TIMEOUT,
                    "request head not received in time",
                    true,
                );
                let _ = io.write_all(&client_out).await;
                let _ = io.shutdown().await;
                return Ended::Closed;
            }
        };
        first = false;
        let next = exchange(
            io,
            &mut buf,
            head_len,
            conn,
            &*guard,
            &mut upstream_out,
            &mut client_out,
        )
        .await;
        match next {
            Next::KeepAlive => {}
            Next::Handoff => break,
            Next::Close => {
                let _ = io.shutdown().await;
                return Ended::Closed;
            }
        }
    }
    Ended::Handoff {
        read: Bytes::copy_from_slice(buf.unread()),
    }
}

enum HeadRead {
    Ready(usize),
    Closed,
    TimedOut,
    Handoff,
}

/// Waits for a complete request head in `buf`. An idle connection closes when the worker
/// drains or after the idle timeout; a started head must complete within the header timeout
/// (so must a new connection's first).
async fn read_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut Buf,
    limits: &Limits,
    guard: &mut drain::Guard,
    first: bool,
) -> HeadRead {
    let mut deadline =
        (first || !buf.is_empty()).then(|| Instant::now() + limits.header_read_timeout);
    loop {
        if let Some(n) = head_end(buf.unread()) {
            return HeadRead::Ready(n);
        }
        if buf.unread().len() >= limits.max_header_bytes {
            // hyper answers 431.
            return HeadRead::Handoff;
        }
        let idle = buf.is_empty();
        let until = deadline.unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        let max = limits.max_header_bytes;
        let read = {
            let mut fill = std::pin::pin!(buf.fill(io, max));
            crate::timer::timeout_at(
                Some(until),
                std::future::poll_fn(|cx| {
                    if idle && guard.poll_draining(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    fill.as_mut().poll(cx).map(Some)
                }),
            )
            .await
        };
        match read {
            None if idle && !first => return HeadRead::Closed,
            None => return HeadRead::TimedOut,
            Some(None) | Some(Some(Ok(0))) | Some(Some(Err(_))) => return HeadRead::Closed,
            Some(Some(Ok(_))) => {
                deadline.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
            }
        }
    }
}

enum Next {
    KeepAlive,
    Close,
    Handoff,
}

/// Proxies the request whose head is the first `head_len` bytes of `buf`.
async fn exchange<I>(
    io: &mut I,
    buf: &mut Buf,
    head_len: usize,
    conn: &Connection,
    guard: &drain::Guard,
    upstream_out: &mut Vec<u8>,
    client_out: &mut Vec<u8>,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let worker = &conn.worker;
    let shared = &*worker.shared;
    let options = &shared.options;
    let table = shared.table.load_full();
    let Some(mut request) = request_head(&buf.unread()[..head_len], conn, &table, upstream_out)
    else {
        return Next::Handoff;
    };
    buf.consume(head_len);
    let body_done = match take_body(buf, &mut request.framing, upstream_out) {
        Ok(done) => done,
        Err(BadChunk) => return bad_chunk(io, client_out).await,
    };
    let _in_flight = worker.recorder.enter();
    let target: &UpstreamUrl = match request.version {
        Version::Stable => &table.doc.stable,
        Version::Canary => table
            .doc
            .canary
            .as_ref()
            .expect("canary routed only if set"),
    };
    let set_cookie = if request.set_affinity {
        proxy::affinity_set_cookie(&table)
    } else {
        None
    };
    let timeout = options.response_timeout;
    let request_stalls = Stalls {
        // A client that stops sending its body: the client's failure. An upstream that stops
        // taking it: the version's.
        source: options.client_stall_timeout,
        sink: timeout,
    };
    // A kept-alive connection may turn out closed: the request goes out again on a new one
    // only if it cannot have been processed (no byte of it was taken), or if it is idempotent
    // and whole in `upstream_out`, as RFC 9110 §9.2.2 allows.
    let mut fresh_only = false;
    let result = loop {
        let pooled_conn = (!fresh_only).then(|| checkout(target.id())).flatten();
        let (mut up, pooled) = match pooled_conn {
            Some(up) => (up, true),
            None => match proxy::connect_tcp(target, options.connect_timeout).await {
                Ok(stream) => {
                    let buf = Buf::new(INITIAL_BUFFER);
                    (Upstream { stream, buf }, false)
                }
                Err(e) => break Err(Failed::Upstream(e)),
            },
        };
        let close = request.close || guard.is_draining();
        let cookie = set_cookie.as_ref().map(|c| c.as_bytes());
        let read = if body_done {
            // The request is complete already: one timer for the whole exchange.
            let exchange = async {
                send_head(&mut up, upstream_out, pooled).await?;
                let read = read_response(
                    &mut up,
                    io,
                    &request,
                    close,
                    cookie,
                    MAX_RESPONSE_HEAD,
                    client_out,
                );
                read.await.map_err(Failed::Upstream)
            };
            let deadline = started.checked_add(timeout);
            crate::timer::timeout_at(deadline, exchange)
                .await
                .unwrap_or_else(|| Err(timed_out("no response head within the response timeout")))
        } else {
            // Boxed: rare, and its state would otherwise size every request's future.
            let streamed = StreamedRequest {
                request: &mut request,
                upstream_out,
                pooled,
                started,
                timeout,
                stalls: request_stalls,
                close,
                cookie,
            };
            Box::pin(streamed.send(&mut up, io, buf, client_out)).await
        };
        match read {
            Ok(Some(resp)) => break Ok((up, resp)),
            Err(Failed::NotSent) => {
                worker.recorder.record_retry(request.version);
                fresh_only = true;
            }
            Ok(None) if pooled && body_done && request.idempotent => {
                worker.recorder.record_retry(request.version);
                fresh_only = true;
            }
            Ok(None) => {
                break Err(Failed::Upstream(protocol(
                    "upstream closed the connection before answering",
                )))
            }
            Err(e) => break Err(e),
        }
    };
    let (mut up, mut resp) = match result {
        Ok(r) => r,
        Err(Failed::Client) => return Next::Close,
        Err(Failed::ClientStalled) => {
            plain_response(
                client_out,
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
                true,
            );
            let _ = io.write_all(client_out).await;
            return Next::Close;
        }
        Err(Failed::BadChunk) => return bad_chunk(io, client_out).await,
        Err(Failed::NotSent) => unreachable!("retried above"),
        Err(Failed::Upstream(e)) => {
            let (status, text) =
                proxy::record_upstream_failure(worker, request.version, target, &e, started);
            // A body the upstream never took may still be on its way: close after answering.
            let close = request.close || !body_done || guard.is_draining();
            plain_response(client_out, status, &text, close);
            if io.write_all(client_out).await.is_err() || io.flush().await.is_err() || close {
                return Next::Close;
            }
            return Next::KeepAlive;
        }
    };
    // Counted once the body has passed: an answer the upstream breaks off is a failure the
    // client saw, so the version's; a client that goes away is nobody's failure but its own.
    let head_elapsed = started.elapsed();
    let body = match take_body(&mut up.buf, &mut resp.framing, client_out) {
        Err(BadChunk) => Err(Broken::BadChunk),
        Ok(done) => match io.write_all(client_out).await {
            Err(_) => Err(Broken::Sink),
            Ok(()) if !done => {
                let response_stalls = Stalls {
                    source: timeout,
                    sink: options.client_stall_timeout,
                };
                // Boxed: its timers would otherwise size every request's future.
                let streamed = stream_body(
                    &mut up.stream,
                    &mut up.buf,
                    io,
                    upstream_out,
                    &mut resp.framing,
                    response_stalls,
                );
                Box::pin(streamed).await
            }
            Ok(()) => io.flush().await.map_err(|_| Broken::Sink),
        },
    };
    match body {
        Ok(()) => {
            worker
                .recorder
                .record(request.version, resp.status, head_elapsed);
        }
        Err(Broken::Sink | Broken::SinkStalled) => {
            worker
                .recorder
                .record(request.version, resp.status, head_elapsed);
            return Next::Close;
        }
        Err(broken @ (Broken::Source | Broken::SourceStalled | Broken::BadChunk)) => {
            let (failure, detail) = match broken {
                Broken::SourceStalled => (UpstreamFailure::Timeout, "the body stalled"),
                Broken::BadChunk => (UpstreamFailure::Protocol, "malformed chunked body"),
                _ => (UpstreamFailure::Body, "the body broke off"),
            };
            let e = UpstreamError::new(failure, detail);
            proxy::record_broken_body(worker, request.version, target, &e, head_elapsed);
            return Next::Close;
        }
    }
    // Bytes after the response would be a broken upstream: such a connection is not reused.
    if resp.reusable && up.buf.is_empty() {
        release(target.id(), up);
    }
    if resp.close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// A request whose body is still arriving from the client, on its way upstream.
struct StreamedRequest<'a> {
    request: &'a mut Request,
    upstream_out: &'a [u8],
    pooled: bool,
    started: Instant,
    timeout: Duration,
    stalls: Stalls,
    close: bool,
    cookie: Option<&'a [u8]>,
}

impl StreamedRequest<'_> {
    /// Sends the head and streams the body, then reads the answer. The upstream is timed from
    /// the end of the request: a slow upload is the client's business, not the version's.
    async fn send<I>(
        self,
        up: &mut Upstream,
        io: &mut I,
        buf: &mut Buf,
        client_out: &mut Vec<u8>,
    ) -> Result<Option<Response>, Failed>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let head = send_head(up, self.upstream_out, self.pooled);
        crate::timer::timeout_at(self.started.checked_add(self.timeout), head)
            .await
            .unwrap_or_else(|| Err(timed_out("the upstream did not take the request head")))?;
        let body = stream_body(
            io,
            buf,
            &mut up.stream,
            client_out,
            &mut self.request.framing,
            self.stalls,
        );
        body.await.map_err(|broken| match broken {
            Broken::Source => Failed::Client,
            Broken::SourceStalled => Failed::ClientStalled,
            Broken::BadChunk => Failed::BadChunk,
            Broken::Sink => Failed::Upstream(protocol("the upstream stopped reading the body")),
            Broken::SinkStalled => {
                timed_out("the upstream took none of the body for the response timeout")
            }
        })?;
        let read = read_response(
            up,
            io,
            self.request,
            self.close,
            self.cookie,
            MAX_RESPONSE_HEAD,
            client_out,
        );
        crate::timer::timeout_at(Instant::now().checked_add(self.timeout), read)
            .await
            .unwrap_or_else(|| {
                Err(UpstreamError::timeout(
                    "no response head within the response timeout after the request",
                ))
            })
            .map_err(Failed::Upstream)
    }
}

/// Answers a malformed chunked request body: 400, and the connection closes (where the next
/// request would start is unknown).
async fn bad_chunk<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> Next {
    plain_response(out, StatusCode::BAD_REQUEST, "malformed chunked body", true);
    let _ = io.write_all(out).await;
    Next::Close
}
