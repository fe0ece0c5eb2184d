//! Header rewriting, pure: what a request head becomes on its way upstream and what a
//! response head becomes on its way back. Hop-by-hop headers (RFC 9110 §7.6.1) and the ones
//! `Connection` names never cross; `x-forwarded-for` gets the client appended,
//! `x-forwarded-proto` is added when absent; Host and the origin-form target are kept.
//!
//! Two forms of the same rules: raw heads for the HTTP/1.1 fast path (httparse's view of the
//! client's bytes, written straight out again), and hyper's parsed `HeaderMap`s for the other
//! path. A raw request head also decides whether the fast path may take the request at all.

use std::mem::MaybeUninit;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri, Version as HttpVersion};

use crate::framing::{content_length, tokens, Chunked, Framing};
use crate::geo::Geo;
use crate::route::RequestView;
use crate::table::HeaderChanges;
use crate::worker::ClientInfo;

/// Headers one head may carry on the fast path (hyper's default limit too); a request with
/// more is handed to hyper, a response with more is a bad gateway.
pub(crate) const MAX_HEADERS: usize = 100;

// ---------------------------------------------------------------------------------------------
// Raw heads (the HTTP/1.1 fast path)

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

/// Where httparse puts a request head's headers: on the caller's stack, uninitialised.
pub(crate) type HeaderSlots<'h> = [MaybeUninit<httparse::Header<'h>>; MAX_HEADERS];

/// Room for a request head's headers.
pub(crate) fn header_slots<'h>() -> HeaderSlots<'h> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// A request head the fast path forwards, read and checked.
pub(crate) struct RequestHead<'s, 'h> {
    pub(crate) method: &'h str,
    /// The origin-form target.
    pub(crate) path: &'h str,
    pub(crate) headers: &'s [httparse::Header<'h>],
    /// Each header's meaning, classified once.
    kinds: [Kind; MAX_HEADERS],
    pub(crate) framing: Framing,
    /// The client asked to close after this exchange.
    pub(crate) close: bool,
    chunked: bool,
    has_proto: bool,
}

impl<'s, 'h> RequestHead<'s, 'h> {
    /// Reads a complete request head; `None` leaves the request to hyper: not HTTP/1.1, not
    /// origin-form, a target with bytes RFC 3986 does not allow, `Upgrade`, `Expect`, a
    /// `Connection` naming other headers, not exactly one Host, duplicate or conflicting
    /// framing, a coding other than chunked, a head that does not parse whole.
    pub(crate) fn parse(head: &'h [u8], slots: &'s mut HeaderSlots<'h>) -> Option<Self> {
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, slots) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            _ => return None,
        }
        let (method, path) = (req.method?, req.path?);
        if req.version != Some(1) || !path.starts_with('/') || !path.bytes().all(is_uri_byte) {
            return None;
        }
        let headers: &'s [httparse::Header<'h>] = req.headers;
        let (mut length, mut chunked, mut close) = (None, false, false);
        let (mut has_proto, mut hosts) = (false, 0);
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
        Some(RequestHead {
            method,
            path,
            headers,
            kinds,
            framing,
            close,
            chunked,
            has_proto,
        })
    }

    /// What the routing decision reads of the request.
    pub(crate) fn view<'a>(
        &'a self,
        client: &ClientInfo,
        geo: &'a Geo,
    ) -> RequestView<'a, [httparse::Header<'h>]> {
        // memchr's search, not `split_once`'s: whether the latter got the vectorised one
        // varied from build to build.
        let (path, query) = match memchr::memchr(b'?', self.path.as_bytes()) {
            Some(i) => (&self.path[..i], Some(&self.path[i + 1..])),
            None => (self.path, None),
        };
        RequestView {
            headers: self.headers,
            query,
            client: Some((client.peer, geo)),
            host: self
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| h.value),
            path: path.as_bytes(),
            method: self.method.as_bytes(),
        }
    }

    /// Writes the head the upstream gets into `out` (replacing what it held): the request
    /// line as HTTP/1.1, the end-to-end headers as the client wrote them, chunked framing
    /// said once, `x-forwarded-for` with the client appended, `x-forwarded-proto` if absent;
    /// then the route's header `changes`.
    pub(crate) fn write_upstream(
        &self,
        client: &ClientInfo,
        changes: &HeaderChanges,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let classified = || self.headers.iter().zip(self.kinds);
        for (h, k) in classified() {
            let kept = match k {
                Kind::Other | Kind::ForwardedProto => {
                    changes.is_empty() || !changes.drops(h.name.as_bytes())
                }
                Kind::Host | Kind::ContentLength => true,
                _ => false,
            };
            if kept {
                put_header(out, h.name.as_bytes(), h.value);
            }
        }
        if self.chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for (h, _) in classified().filter(|(_, k)| *k == Kind::ForwardedFor) {
            out.extend_from_slice(h.value);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !self.has_proto {
            out.extend_from_slice(if client.tls {
                b"x-forwarded-proto: https\r\n"
            } else {
                b"x-forwarded-proto: http\r\n"
            });
        }
        for h in changes.appended() {
            put_header(out, h.name.as_str().as_bytes(), h.value.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The request as hyper's parts, for a mirrored copy (rewritten like any other request
    /// on hyper's path); `None` if hyper's types refuse a part.
    pub(crate) fn to_parts(&self) -> Option<http::request::Parts> {
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = http::Method::from_bytes(self.method.as_bytes()).ok()?;
        parts.uri = http::Uri::try_from(self.path).ok()?;
        for h in self.headers {
            parts.headers.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                http::HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        Some(parts)
    }

    /// `HEAD`: its answer has no body, whatever its head says.
    pub(crate) fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    pub(crate) fn is_idempotent(&self) -> bool {
        is_idempotent(self.method)
    }
}

/// RFC 9110 §9.2.2's idempotent methods: the only ones a proxy may send again after the
/// upstream could have acted on them.
pub(crate) fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// A response head as forwarded to the client.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The upstream connection can carry another request afterwards.
    pub(crate) reusable: bool,
    /// The client connection closes after this response.
    pub(crate) close: bool,
}

/// A response head read and classified: what both renderings of it start from.
struct ParsedResponse<'s, 'h> {
    reason: &'h str,
    headers: &'s [httparse::Header<'h>],
    kinds: [Kind; MAX_HEADERS],
    /// A Transfer-Encoding came: a length means nothing and is not passed on.
    coded: bool,
    named_by_connection: bool,
    head: ResponseHead,
}

impl<'h> ParsedResponse<'_, 'h> {
    /// Reads a complete response head (to a `HEAD` request when `head_method`); `close`: the
    /// client connection is to close after it. Inlined: each rendering then reads the fields it
    /// needs in place, as one function did before there were two (the fast path's share).
    #[inline(always)]
    fn parse<'s>(
        head: &'h [u8],
        head_method: bool,
        mut close: bool,
        storage: &'s mut [httparse::Header<'h>; MAX_HEADERS],
    ) -> Result<ParsedResponse<'s, 'h>, &'static str> {
        let mut resp = httparse::Response::new(storage);
        match resp.parse(head) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err("the response head did not parse"),
            Err(e) => return Err(httparse_reason(e)),
        }
        let status = resp.code.ok_or("no status")?;
        let version = resp.version;
        let reason = resp.reason.unwrap_or("");
        let headers: &'s [httparse::Header<'h>] = resp.headers;
        let (mut length, mut coding_chunked, mut coded) = (None, false, false);
        let mut reusable = version == Some(1);
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
                            reusable |= version == Some(0);
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
        let framing = if informational || head_method || status == 204 || status == 304 {
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
        Ok(ParsedResponse {
            reason,
            headers,
            kinds,
            coded,
            named_by_connection,
            head: ResponseHead {
                status,
                framing,
                reusable,
                close,
            },
        })
    }

    fn is_informational(&self) -> bool {
        (100..200).contains(&self.head.status)
    }

    /// Whether a header crosses the proxy (`Transfer-Encoding` only when `coding`).
    #[inline(always)]
    fn keeps(&self, h: &httparse::Header<'_>, k: Kind, coding: bool) -> bool {
        match k {
            Kind::Other | Kind::Expect | Kind::ForwardedFor | Kind::ForwardedProto | Kind::Host => {
                !self.named(h.name)
            }
            // Under a Transfer-Encoding a length means nothing (and is not sent on).
            Kind::ContentLength => !self.coded,
            Kind::TransferEncoding => coding,
            Kind::Connection | Kind::HopByHop | Kind::Upgrade => false,
        }
    }

    /// Whether `Connection` names this header (which then does not cross).
    fn named(&self, name: &str) -> bool {
        self.named_by_connection
            && self
                .headers
                .iter()
                .zip(self.kinds)
                .filter(|(_, k)| *k == Kind::Connection)
                .flat_map(|(h, _)| tokens(h.value))
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// What the router changes in an answer's head on its way to the client (final answers only):
/// the affinity cookie, and the route's then the backend's header changes (a later one wins a
/// header both set).
#[derive(Clone, Debug)]
pub(crate) struct AnswerChanges<'a> {
    pub(crate) cookie: Option<HeaderValue>,
    pub(crate) headers: [&'a HeaderChanges; 2],
}

impl AnswerChanges<'_> {
    fn changes(&self) -> impl Iterator<Item = &HeaderChanges> {
        self.headers.into_iter().filter(|c| !c.is_empty())
    }

    /// Whether the upstream's field of this name is dropped (set anew or removed).
    fn drops(&self, name: &[u8]) -> bool {
        self.changes().any(|c| c.drops(name))
    }

    /// The fields added, in the raw form: a route's, unless the backend's changes replace
    /// them, then the backend's; then the cookie.
    fn write_raw(&self, out: &mut Vec<u8>) {
        let [route, backend] = self.headers;
        for h in route.appended() {
            if !backend.drops(h.name.as_str().as_bytes()) {
                put_header(out, h.name.as_str().as_bytes(), h.value.as_bytes());
            }
        }
        for h in backend.appended() {
            put_header(out, h.name.as_str().as_bytes(), h.value.as_bytes());
        }
        if let Some(cookie) = &self.cookie {
            put_header(out, b"set-cookie", cookie.as_bytes());
        }
    }

    /// The same on hyper's form of an answer.
    pub(crate) fn apply(self, headers: &mut HeaderMap) {
        for changes in self.changes() {
            change_headers(headers, changes);
        }
        if let Some(cookie) = self.cookie {
            headers.append(header::SET_COOKIE, cookie);
        }
    }
}

/// Reads a complete response head (to a `HEAD` request when `head_method`) and writes the
/// client's into `out` (after what `out` holds): hop-by-hop headers and the ones `Connection`
/// names dropped, the route's answer changes and `Connection: close` added when asked.
pub(crate) fn response_head(
    head: &[u8],
    head_method: bool,
    close: bool,
    changes: &AnswerChanges<'_>,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, &'static str> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let resp = ParsedResponse::parse(head, head_method, close, &mut storage)?;
    let status = resp.head.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    out.extend([status / 100, status / 10 % 10, status % 10].map(|d| b'0' + d as u8));
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    // The body passes through unchanged, so its coding is said as the upstream said it.
    let final_answer = !resp.is_informational();
    // Most routes change no header: then no name is compared.
    let dropping = final_answer && changes.changes().next().is_some();
    for (h, k) in resp.headers.iter().zip(resp.kinds) {
        if resp.keeps(h, k, true) && !(dropping && changes.drops(h.name.as_bytes())) {
            put_header(out, h.name.as_bytes(), h.value);
        }
    }
    if final_answer {
        changes.write_raw(out);
        if resp.head.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(resp.head)
}

/// Reads a complete response head (to a `HEAD` request when `head_method`) as hyper's parts,
/// for hyper's path, which frames the body itself: the same headers cross as on the fast path,
/// less `Transfer-Encoding` (the body is passed on decoded).
pub(crate) fn response_parts(
    head: &[u8],
    head_method: bool,
) -> Result<(http::response::Parts, ResponseHead), &'static str> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let resp = ParsedResponse::parse(head, head_method, false, &mut storage)?;
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(resp.head.status).map_err(|_| "bad status")?;
    parts.headers.reserve(resp.headers.len());
    for (h, k) in resp.headers.iter().zip(resp.kinds) {
        if !resp.keeps(h, k, false) {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "bad header name")?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| "bad header value")?;
        parts.headers.append(name, value);
    }
    Ok((parts, resp.head))
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::TooManyHeaders => "more than 100 response headers",
        httparse::Error::Version => "not an HTTP/1.x response",
        _ => "the response head did not parse",
    }
}

/// A short plain-text answer of the router's own.
pub(crate) fn plain_response(out: &mut Vec<u8>, status: StatusCode, text: &str, close: bool) {
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
// Parsed heads (hyper's path)

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1); a bit each in [`strip_hop_by_hop`]'s scan.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// The position of a (lowercase) header name in [`HOP_BY_HOP`]. A `match` on the string checks
/// the length first, so most names are turned away in an instruction or two.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "te" => 1,
        "trailer" => 2,
        "transfer-encoding" => 3,
        "upgrade" => 4,
        "proxy-authorization" => 5,
        "proxy-authenticate" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// True when a Connection value lists only options and hop-by-hop names (`keep-alive`,
/// `close`, `Upgrade`): nothing further to look up.
fn names_only_hop_by_hop(v: &HeaderValue) -> bool {
    v.as_bytes().split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty()
            || t.eq_ignore_ascii_case(b"close")
            || HOP_BY_HOP
                .iter()
                .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()))
    })
}

/// Hop-by-hop headers never cross the proxy, nor headers that `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass of cheap name comparisons finds which are present, so only those are removed:
    // nearly every upstream response carries `Connection: keep-alive` and nothing else of the
    // kind, and a removal (a hashed lookup) per absent name cost more than the rest of the
    // response path's header work.
    let mut present = 0u16;
    let mut names_others = false;
    for (k, v) in headers.iter() {
        if let Some(i) = hop_by_hop_index(k.as_str()) {
            present |= 1 << i;
            names_others |= i == 0 && !names_only_hop_by_hop(v);
        }
    }
    if present == 0 {
        return;
    }
    if names_others {
        // Names listed in Connection that are themselves hop-by-hop (keep-alive, upgrade) are
        // already covered; others are looked for among the keys before paying for a removal.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if let Some(k) = headers
                .keys()
                .find(|k| k.as_str().eq_ignore_ascii_case(token))
            {
                if hop_by_hop_index(k.as_str()).is_none() && !named.contains(k) {
                    named.push(k.clone());
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == HttpVersion::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Turns the client's request into the upstream's: origin-form URI, HTTP/1.1, Host kept (an
/// HTTP/2 client's `:authority` becomes Host), hop-by-hop headers dropped, the client appended
/// to `x-forwarded-for`.
pub(crate) fn upstream_parts(
    parts: &mut http::request::Parts,
    client: &ClientInfo,
    upgrade: bool,
    changes: &HeaderChanges,
) {
    let upgrade_header = if upgrade {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_header {
        parts.headers.insert(header::UPGRADE, u);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // The entry API hashes each name once where contains_key + insert hashed it twice.
    if let Entry::Vacant(host) = parts.headers.entry(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                host.insert(v);
            }
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Ok(uri) = Uri::try_from(path) {
            parts.uri = uri;
        }
    }
    parts.version = HttpVersion::HTTP_11;
    match parts.headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut xff) => {
            let prev = xff.get();
            let mut joined = Vec::with_capacity(prev.len() + 2 + client.peer_ip.len());
            joined.extend_from_slice(prev.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.peer_ip.as_bytes());
            // Replaces every earlier value, like insert.
            xff.insert(HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client.peer_ip.clone()));
        }
        Entry::Vacant(xff) => {
            xff.insert(client.peer_ip.clone());
        }
    }
    if let Entry::Vacant(xfp) = parts.headers.entry(X_FORWARDED_PROTO) {
        xfp.insert(HeaderValue::from_static(if client.tls {
            "https"
        } else {
            "http"
        }));
    }
    if !changes.is_empty() {
        change_headers(&mut parts.headers, changes);
    }
}

/// A route's header changes on hyper's form of a request: what is set or removed goes, then
/// every `set` and `add` is appended (the contract checked names and values).
fn change_headers(headers: &mut HeaderMap, changes: &HeaderChanges) {
    let name = |n: &crate::table::HeaderName| http::HeaderName::from_bytes(n.as_str().as_bytes());
    for gone in changes.set.iter().map(|h| &h.name).chain(&changes.remove) {
        if let Ok(n) = name(gone) {
            headers.remove(n);
        }
    }
    for h in changes.appended() {
        if let (Ok(n), Ok(v)) = (name(&h.name), HeaderValue::from_str(&h.value)) {
            headers.append(n, v);
        }
    }
}

/// The upstream's request head for a client's request on hyper's path, written as bytes (what
/// [`upstream_parts`] makes of the parts, for an upstream connection of the router's own):
/// origin-form target, HTTP/1.1, Host kept (an HTTP/2 client's `:authority` becomes Host),
/// hop-by-hop headers and the ones `Connection` names dropped, the client appended to
/// `x-forwarded-for`, `x-forwarded-proto` added when absent; then the route's header
/// `changes`, as [`upstream_parts`] makes them (what they set or remove goes, the router's own
/// `x-forwarded-*` included; what they set and add comes last). The body's framing is the
/// caller's: it writes `transfer-encoding: chunked` before the blank line when the length is
/// unknown (`chunked`).
pub(crate) fn write_upstream_head(
    parts: &http::request::Parts,
    client: &ClientInfo,
    chunked: bool,
    changes: &HeaderChanges,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = &parts.headers;
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            put_header(out, b"host", authority.as_str().as_bytes());
        }
    }
    let names_others = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| !names_only_hop_by_hop(v));
    let named = |name: &HeaderName| {
        names_others
            && headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| tokens(v.as_bytes()))
                .any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()))
    };
    let dropped = |name: &[u8]| !changes.is_empty() && changes.drops(name);
    let mut has_proto = false;
    for (name, value) in headers {
        if hop_by_hop_index(name.as_str()).is_some()
            || *name == X_FORWARDED_FOR
            || named(name)
            || dropped(name.as_str().as_bytes())
        {
            continue;
        }
        // Under chunked framing a length means nothing (an HTTP/2 request may carry both).
        if chunked && *name == header::CONTENT_LENGTH {
            continue;
        }
        has_proto |= *name == X_FORWARDED_PROTO;
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !dropped(X_FORWARDED_FOR.as_str().as_bytes()) {
        out.extend_from_slice(b"x-forwarded-for: ");
        for value in headers.get_all(X_FORWARDED_FOR) {
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_proto && !dropped(X_FORWARDED_PROTO.as_str().as_bytes()) {
        out.extend_from_slice(if client.tls {
            b"x-forwarded-proto: https\r\n"
        } else {
            b"x-forwarded-proto: http\r\n"
        });
    }
    for h in changes.appended() {
        put_header(out, h.name.as_str().as_bytes(), h.value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::HeadFlags;

    fn client(tls: bool) -> ClientInfo {
        ClientInfo::new("10.1.2.3:5000".parse().unwrap(), tls, HeadFlags::new(1024))
    }

    /// The upstream's head for a client's, and what was read of it; `None`: hyper's.
    fn forward(head: &str, tls: bool) -> Option<(String, Framing, bool)> {
        let mut slots = header_slots();
        let h = RequestHead::parse(head.as_bytes(), &mut slots)?;
        let mut out = Vec::new();
        h.write_upstream(&client(tls), &HeaderChanges::default(), &mut out);
        Some((String::from_utf8(out).unwrap(), h.framing, h.close))
    }

    #[test]
    fn a_request_head_goes_upstream_without_hop_by_hop_headers_and_with_the_client_appended() {
        let (head, framing, close) = forward(
            "GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             TE: trailers\r\nProxy-Authorization: x\r\nX-Forwarded-For: 10.0.0.1\r\n\
             x-forwarded-for: 10.0.0.2\r\nAccept: */*\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            head,
            "GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.1.2.3\r\nx-forwarded-proto: http\r\n\r\n"
        );
        assert!(matches!(framing, Framing::Empty) && !close);
        // A proto the client (or a proxy before us) set is kept as it is.
        let (head, _, close) = forward(
            "GET / HTTP/1.1\r\nX-Forwarded-Proto: http\r\nhost: a\r\nConnection: close\r\n\r\n",
            true,
        )
        .unwrap();
        assert_eq!(
            head,
            "GET / HTTP/1.1\r\nX-Forwarded-Proto: http\r\nhost: a\r\nx-forwarded-for: 10.1.2.3\r\n\r\n"
        );
        assert!(close, "the client asked to close after this exchange");
        let (head, _, _) = forward("GET / HTTP/1.1\r\nHost: a\r\n\r\n", true).unwrap();
        assert!(head.ends_with("x-forwarded-proto: https\r\n\r\n"), "{head}");
    }

    #[test]
    fn a_request_bodys_framing_is_read_and_said_once() {
        let (head, framing, _) = forward(
            "POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(head.contains("\r\nContent-Length: 5\r\n"), "{head}");
        assert!(matches!(framing, Framing::Length(5)));
        let (head, framing, _) = forward(
            "POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(!head.contains("Chunked"), "{head}");
        assert!(
            head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert!(matches!(framing, Framing::Chunked(_)));
        let (_, framing, _) = forward(
            "POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(framing, Framing::Empty));
    }

    #[test]
    fn what_the_fast_path_leaves_to_hyper() {
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let hypers = [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n".to_string(),
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            "GET /{x} HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
                .into(),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n".into(),
            "GET / HTTP/1.1\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                .into(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET".into(),
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n"),
        ];
        for head in &hypers {
            assert!(
                forward(head, false).is_none(),
                "{head:?} stayed on the fast path"
            );
        }
    }

    #[test]
    fn a_request_head_shows_the_decision_its_query_and_a_mirror_its_parts() {
        let mut slots = header_slots();
        let text = b"HEAD /p?x=1&y=2 HTTP/1.1\r\nHost: a\r\nCookie: c=1\r\n\r\n";
        let head = RequestHead::parse(text, &mut slots).unwrap();
        let client = client(false);
        let geo = Geo::default();
        assert_eq!(head.view(&client, &geo).query, Some("x=1&y=2"));
        assert!(head.is_head() && head.is_idempotent());
        let parts = head.to_parts().unwrap();
        assert_eq!(
            (parts.method.as_str(), parts.uri.to_string().as_str()),
            ("HEAD", "/p?x=1&y=2")
        );
        assert_eq!(parts.headers["cookie"], "c=1");
        let mut slots = header_slots();
        let post = RequestHead::parse(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", &mut slots).unwrap();
        assert!(!post.is_idempotent());
    }

    /// The client's head for an upstream's, and what was read of it.
    fn answer(
        head: &str,
        head_method: bool,
        close: bool,
        cookie: Option<&[u8]>,
    ) -> Result<(String, ResponseHead), &'static str> {
        let none = HeaderChanges::default();
        let changes = AnswerChanges {
            cookie: cookie.map(|c| HeaderValue::from_bytes(c).unwrap()),
            headers: [&none, &none],
        };
        let mut out = Vec::new();
        let r = response_head(head.as_bytes(), head_method, close, &changes, &mut out)?;
        Ok((String::from_utf8(out).unwrap(), r))
    }

    #[test]
    fn a_routes_and_a_backends_answer_changes_are_the_same_on_both_forms() {
        let route: HeaderChanges = serde_json::from_value(serde_json::json!({
            "set": [{"name": "x-served-by", "value": "edge"}, {"name": "x-tier", "value": "route"}],
            "remove": ["server"]
        }))
        .unwrap();
        let backend: HeaderChanges = serde_json::from_value(serde_json::json!({
            "set": [{"name": "x-tier", "value": "canary"}],
            "add": [{"name": "set-cookie", "value": "flagger-cookie=abc; Max-Age=60"}]
        }))
        .unwrap();
        let changes = AnswerChanges {
            cookie: None,
            headers: [&route, &backend],
        };
        let upstream =
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nX-Tier: upstream\r\nContent-Length: 0\r\n\r\n";
        let mut out = Vec::new();
        response_head(upstream.as_bytes(), false, false, &changes, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-served-by: edge\r\nx-tier: canary\r\n\
             set-cookie: flagger-cookie=abc; Max-Age=60\r\n\r\n"
        );
        // hyper's form: the same headers.
        let (mut parts, _) = response_parts(upstream.as_bytes(), false).unwrap();
        changes.apply(&mut parts.headers);
        let get = |n: &str| -> Vec<&str> {
            parts
                .headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert!(get("server").is_empty());
        assert_eq!(get("x-tier"), ["canary"]);
        assert_eq!(get("x-served-by"), ["edge"]);
        assert_eq!(get("set-cookie"), ["flagger-cookie=abc; Max-Age=60"]);
    }

    /// [`answer`] to a GET, the client's connection staying open, no affinity cookie.
    fn plain_answer(head: &str) -> (String, ResponseHead) {
        answer(head, false, false, None).unwrap()
    }

    #[test]
    fn a_response_head_comes_back_without_hop_by_hop_headers_or_the_ones_connection_names() {
        let (head, r) = plain_answer(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-internal\r\nX-Internal: 1\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 2\r\nX-Kept: 1\r\n\r\n",
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Kept: 1\r\n\r\n"
        );
        assert!(matches!(r.framing, Framing::Length(2)));
        assert_eq!((r.status, r.reusable, r.close), (200, true, false));
    }

    #[test]
    fn the_affinity_cookie_and_a_close_are_added_to_final_answers_only() {
        let (head, r) = answer(
            "HTTP/1.1 204 No Content\r\n\r\n",
            false,
            true,
            Some(b"pin=1"),
        )
        .unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 204 No Content\r\nset-cookie: pin=1\r\nconnection: close\r\n\r\n"
        );
        assert!(r.close && matches!(r.framing, Framing::Empty));
        let (head, _) = answer(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
            false,
            true,
            Some(b"pin=1"),
        )
        .unwrap();
        assert_eq!(head, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
    }

    #[test]
    fn a_response_bodys_framing_decides_whether_either_connection_lasts() {
        // HEAD: a length, no body.
        let (head, r) = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            true,
            false,
            None,
        )
        .unwrap();
        assert!(head.contains("Content-Length: 100"));
        assert!(matches!(r.framing, Framing::Empty) && r.reusable);
        // No length: until the upstream closes, so both connections close.
        let (head, r) = plain_answer("HTTP/1.1 200 OK\r\n\r\n");
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert!(matches!(r.framing, Framing::UntilClose) && !r.reusable && r.close);
        // Both framings: the coding wins, the length is not passed on, the connection is not
        // trusted again.
        let (head, r) = plain_answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert!(matches!(r.framing, Framing::Chunked(_)) && !r.reusable && !r.close);
        // HTTP/1.0 lasts only when it says keep-alive.
        let http10 = |extra: &str| {
            plain_answer(&format!(
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n{extra}\r\n"
            ))
            .1
            .reusable
        };
        assert!(!http10(""));
        assert!(http10("Connection: keep-alive\r\n"));
    }

    #[test]
    fn a_broken_response_head_is_refused_with_its_reason() {
        let refused = |head: &str| answer(head, false, false, None).unwrap_err();
        assert_eq!(
            refused("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            "conflicting Content-Length"
        );
        assert_eq!(
            refused("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            "bad Content-Length"
        );
        assert_eq!(
            refused("HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            "101 Switching Protocols without an upgrade request"
        );
        assert_eq!(refused("HTTP/2 200\r\n\r\n"), "not an HTTP/1.x response");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            "more than 100 response headers"
        );
    }

    #[test]
    fn the_routers_own_answers_are_plain_text() {
        let mut out = b"left over".to_vec();
        plain_response(
            &mut out,
            StatusCode::BAD_GATEWAY,
            "stable upstream x: refused",
            true,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: 27\r\n\
             connection: close\r\n\r\nstable upstream x: refused\n"
        );
    }

    #[test]
    fn both_forms_drop_the_same_hop_by_hop_names() {
        for name in HOP_BY_HOP {
            let dropped = matches!(
                kind(name.as_str()),
                Kind::Connection | Kind::HopByHop | Kind::TransferEncoding | Kind::Upgrade
            );
            assert!(dropped, "{name} crosses the fast path");
        }
        for name in [
            "host",
            "content-length",
            "expect",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-other",
        ] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.append(header::CONNECTION, " X-Other ,close".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // The common upstream answer: only Connection itself goes.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Keep-Alive".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "7".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::CONTENT_LENGTH]);
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(h.as_str()), Some(i));
        }
        assert_eq!(hop_by_hop_index("content-length"), None);
    }

    #[test]
    fn forwarded_request_is_origin_form_http11_with_host_and_xff() {
        let (mut parts, ()) = Request::builder()
            .uri("http://example.com/a?b=1")
            .version(HttpVersion::HTTP_2)
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap()
            .into_parts();
        let client = ClientInfo::new(
            "127.0.0.9:5000".parse().unwrap(),
            false,
            HeadFlags::new(1024),
        );
        upstream_parts(&mut parts, &client, false, &HeaderChanges::default());
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.version, HttpVersion::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "example.com");
        assert_eq!(parts.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn an_http2_request_goes_upstream_as_an_http11_head_by_the_same_rules() {
        let (parts, ()) = Request::builder()
            .method("DELETE")
            .uri("https://shop.example/cart/1?x=%20y")
            .version(HttpVersion::HTTP_2)
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .header("te", "trailers")
            .header("connection", "x-internal")
            .header("x-internal", "1")
            .header("accept", "*/*")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        write_upstream_head(
            &parts,
            &client(true),
            false,
            &HeaderChanges::default(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "DELETE /cart/1?x=%20y HTTP/1.1\r\nhost: shop.example\r\naccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.1.2.3\r\nx-forwarded-proto: https\r\n\r\n"
        );
        // A Host of its own is kept; a proto the client set is kept; a streamed body is chunked.
        let (parts, ()) = Request::builder()
            .method("POST")
            .uri("/up")
            .header("host", "a")
            .header("content-length", "5")
            .header("x-forwarded-proto", "http")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        write_upstream_head(
            &parts,
            &client(false),
            true,
            &HeaderChanges::default(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /up HTTP/1.1\r\nhost: a\r\nx-forwarded-proto: http\r\n\
             transfer-encoding: chunked\r\nx-forwarded-for: 10.1.2.3\r\n\r\n"
        );
    }

    #[test]
    fn a_response_head_for_hyper_keeps_what_the_fast_path_keeps_less_its_coding() {
        let head =
            "HTTP/1.1 201 Created\r\nConnection: keep-alive, x-internal\r\nX-Internal: 1\r\n\
                    Transfer-Encoding: chunked\r\nX-Kept: 1\r\nX-Kept: 2\r\n\r\n";
        let (parts, r) = response_parts(head.as_bytes(), false).unwrap();
        assert_eq!(parts.status, StatusCode::CREATED);
        let names: Vec<_> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(names, [("x-kept", "1"), ("x-kept", "2")]);
        assert!(matches!(r.framing, Framing::Chunked(_)));
        assert!(r.reusable);
        let (parts, r) =
            response_parts(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true).unwrap();
        assert_eq!(parts.headers[header::CONTENT_LENGTH], "7");
        assert!(
            matches!(r.framing, Framing::Empty),
            "an answer to HEAD has no body"
        );
        assert_eq!(
            response_parts(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .err(),
            Some("conflicting Content-Length")
        );
    }

    #[test]
    fn a_routes_header_changes_are_the_same_on_both_forms() {
        let changes: HeaderChanges = serde_json::from_value(serde_json::json!({
            "set": [{"name": "X-Env", "value": "canary"}],
            "add": [{"name": "x-trace", "value": "2"}],
            "remove": ["x-debug"]
        }))
        .unwrap();
        // The fast path's raw head.
        let mut slots = header_slots();
        let raw = "GET / HTTP/1.1\r\nHost: shop\r\nX-ENV: stable\r\nx-env: other\r\n\
                   X-Debug: 1\r\nx-trace: 1\r\nAccept: */*\r\n\r\n";
        let h = RequestHead::parse(raw.as_bytes(), &mut slots).unwrap();
        let mut out = Vec::new();
        h.write_upstream(&client(false), &changes, &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "GET / HTTP/1.1\r\nHost: shop\r\nx-trace: 1\r\nAccept: */*\r\n\
             x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\n\
             x-env: canary\r\nx-trace: 2\r\n\r\n"
        );
        // hyper's form written as bytes (a bodyless request on an owned connection).
        let mut written = Vec::new();
        let parts = h.to_parts().unwrap();
        write_upstream_head(&parts, &client(false), false, &changes, &mut written);
        assert_eq!(
            String::from_utf8(written).unwrap().to_ascii_lowercase(),
            String::from_utf8(out).unwrap().to_ascii_lowercase(),
            "the same head (names in hyper's lowercase)"
        );
        // Changes naming the router's own x-forwarded-* replace them there too.
        let own: HeaderChanges = serde_json::from_value(serde_json::json!({
            "set": [{"name": "x-forwarded-for", "value": "192.0.2.1"}],
            "remove": ["x-forwarded-proto"]
        }))
        .unwrap();
        let mut written = Vec::new();
        write_upstream_head(&parts, &client(false), false, &own, &mut written);
        let mut hypers = parts.clone();
        upstream_parts(&mut hypers, &client(false), false, &own);
        assert_eq!(hypers.headers["x-forwarded-for"], "192.0.2.1");
        assert!(!hypers.headers.contains_key("x-forwarded-proto"));
        assert!(
            String::from_utf8(written)
                .unwrap()
                .ends_with("accept: */*\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"),
            "as hyper's form has them"
        );
        // hyper's form.
        let mut parts = h.to_parts().unwrap();
        upstream_parts(&mut parts, &client(false), false, &changes);
        let values = |n: &str| -> Vec<&str> {
            parts
                .headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(values("x-env"), ["canary"]);
        assert_eq!(values("x-trace"), ["1", "2"]);
        assert!(values("x-debug").is_empty());
        assert_eq!(values("accept"), ["*/*"]);
    }
}
