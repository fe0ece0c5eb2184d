//! The proxy around the routing decision: one request in, one upstream request out, the answer
//! streamed back. Upstream connections are pooled per worker thread (each worker is a
//! single-threaded runtime, so the pool needs no lock).

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version as HttpVersion};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::recorder::{LocalFailure, Metrics, Recorder, UpstreamFailure};
use crate::route::{route, Decision, RequestView, Version};
use crate::table::{RouteTable, UpstreamUrl};

/// Limits and timeouts of the proxy path.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response head arrives.
    pub response_timeout: Duration,
    /// Mirrored copies in flight per worker; more are dropped, never queued.
    pub mirror_concurrency: usize,
    /// Idle upstream connections kept per upstream per worker.
    pub max_idle_per_upstream: usize,
    /// How long a client may stall mid-body (sending a request or taking a response) before
    /// the router gives up on it: the client's failure, never the version's.
    pub client_stall_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            mirror_concurrency: 64,
            max_idle_per_upstream: 256,
            client_stall_timeout: Duration::from_secs(75),
        }
    }
}

/// State every worker shares.
pub struct Shared {
    pub table: ArcSwap<RouteTable>,
    pub metrics: Arc<Metrics>,
    pub options: ProxyOptions,
}

/// One worker thread's handle on the proxy.
#[derive(Clone)]
pub struct Worker {
    pub shared: Arc<Shared>,
    pub recorder: Arc<Recorder>,
    mirror_slots: Arc<Semaphore>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        let recorder = shared.metrics.new_recorder();
        let mirror_slots = Arc::new(Semaphore::new(shared.options.mirror_concurrency));
        Worker {
            shared,
            recorder,
            mirror_slots,
        }
    }
}

/// One client connection: its worker and what is known of the client.
pub struct Connection {
    pub worker: Worker,
    pub client: ClientInfo,
}

/// Per-connection facts the proxy adds to forwarded requests.
#[derive(Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// What the raw request head carried (see [`crate::framing`]).
    pub head: crate::framing::HeadFlags,
    /// The peer's IP as a header value, made once per connection.
    pub peer_ip: HeaderValue,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, tls: bool, head: crate::framing::HeadFlags) -> Self {
        let peer_ip =
            HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a header value");
        ClientInfo {
            peer,
            tls,
            head,
            peer_ip,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// The body sent upstream: the client's own, streamed (with its progress watched), or nothing.
pub enum UpstreamBody {
    Client {
        body: Incoming,
        progress: Arc<BodyProgress>,
    },
    Empty,
}

/// How far a streamed request body has got, so the upstream is timed from the end of the
/// request and a stalled client is told apart from an upstream that stopped reading.
pub struct BodyProgress {
    origin: Instant,
    /// One of the `WAITING_*` / `SENT` states.
    state: std::sync::atomic::AtomicU8,
    /// Microseconds after `origin` when `state` last changed.
    since_micros: std::sync::atomic::AtomicU64,
}

/// The upstream side has the last frame and has not asked for another.
const WAITING_FOR_UPSTREAM: u8 = 0;
/// Asked for the next frame, the client has not sent it.
const WAITING_FOR_CLIENT: u8 = 1;
/// The whole body has gone upstream.
const SENT: u8 = 2;

/// What a request body's progress says at some moment.
enum BodyVerdict {
    /// Look again at this instant.
    Until(Instant),
    Expired(ExchangeError),
}

impl BodyProgress {
    fn new() -> Arc<Self> {
        Arc::new(BodyProgress {
            origin: Instant::now(),
            state: std::sync::atomic::AtomicU8::new(WAITING_FOR_UPSTREAM),
            since_micros: AtomicU64::new(0),
        })
    }

    fn set(&self, state: u8) {
        if self.state.load(Relaxed) != state {
            let micros = self.origin.elapsed().as_micros() as u64;
            self.since_micros.store(micros, Relaxed);
            self.state.store(state, Relaxed);
        }
    }

    fn verdict(&self, now: Instant, options: &ProxyOptions) -> BodyVerdict {
        let since = self.origin + Duration::from_micros(self.since_micros.load(Relaxed));
        let (limit, expired): (Duration, fn() -> ExchangeError) = match self.state.load(Relaxed) {
            WAITING_FOR_CLIENT => (options.client_stall_timeout, || {
                ExchangeError::ClientStalled
            }),
            SENT => (options.response_timeout, || {
                ExchangeError::Upstream(UpstreamError::timeout(
                    "no response head within the response timeout after the request",
                ))
            }),
            _ => (options.response_timeout, || {
                ExchangeError::Upstream(UpstreamError::timeout(
                    "the upstream took none of the body for the response timeout",
                ))
            }),
        };
        match since.checked_add(limit) {
            Some(deadline) if deadline <= now => BodyVerdict::Expired(expired()),
            Some(deadline) => BodyVerdict::Until(deadline),
            None => BodyVerdict::Until(now + Duration::from_secs(86_400)),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Client { body, progress } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                progress.set(match &polled {
                    Poll::Pending => WAITING_FOR_CLIENT,
                    Poll::Ready(None) => SENT,
                    Poll::Ready(Some(_)) if body.is_end_stream() => SENT,
                    Poll::Ready(Some(_)) => WAITING_FOR_UPSTREAM,
                });
                polled
            }
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client { body, .. } => body.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client { body, .. } => body.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// An answer to count once its body has passed: the client may yet see it break off.
pub struct PendingRecord {
    recorder: Arc<Recorder>,
    version: Version,
    status: u16,
    head_elapsed: Duration,
}

impl PendingRecord {
    /// The upstream's answer reached the client whole, or the client went away: the status
    /// stands.
    fn answered(self) {
        self.recorder
            .record(self.version, self.status, self.head_elapsed);
    }

    /// The upstream broke its answer off (or stalled) after the head: the client saw a
    /// failure, the version's, counted as a 502.
    fn broken(self, failure: UpstreamFailure) {
        self.recorder.record(
            self.version,
            StatusCode::BAD_GATEWAY.as_u16(),
            self.head_elapsed,
        );
        self.recorder.record_failure(self.version, failure);
    }
}

/// The body sent to the client: the upstream's, streamed, holding its pooled connection until
/// the last byte so the connection goes back to the pool only when it is free again, and
/// counting the answer when it ends.
pub enum ClientBody {
    Upstream {
        body: Incoming,
        conn: Option<PooledConn>,
        record: Option<PendingRecord>,
        /// Armed while waiting for the upstream's next frame.
        stall: Option<crate::timer::Sleep>,
        stall_limit: Duration,
    },
    Full(Option<Bytes>),
}

impl ClientBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        ClientBody::Full(Some(s.into()))
    }

    fn upstream(
        body: Incoming,
        conn: Option<PooledConn>,
        record: Option<PendingRecord>,
        stall_limit: Duration,
    ) -> Self {
        ClientBody::Upstream {
            body,
            conn,
            record,
            stall: None,
            stall_limit,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Upstream {
                body,
                conn,
                record,
                stall,
                stall_limit,
            } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Pending => {
                        let limit = Instant::now().checked_add(*stall_limit);
                        let timer = match (stall.as_mut(), limit) {
                            (Some(t), _) => t,
                            (None, Some(deadline)) => {
                                stall.insert(crate::timer::Sleep::until(deadline))
                            }
                            (None, None) => return Poll::Pending,
                        };
                        if Pin::new(timer).poll(cx).is_ready() {
                            // The upstream sent nothing for the response timeout: end the
                            // answer here; hyper closes the client's connection.
                            if let Some(r) = record.take() {
                                r.broken(UpstreamFailure::Timeout);
                            }
                            conn.take();
                            return Poll::Ready(None);
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(r) = record.take() {
                            r.broken(UpstreamFailure::Body);
                        }
                    }
                    Poll::Ready(Some(Ok(_))) => {
                        if let (Some(t), Some(deadline)) =
                            (stall.as_mut(), Instant::now().checked_add(*stall_limit))
                        {
                            t.reset(deadline);
                        }
                    }
                    Poll::Ready(None) => {}
                }
                if matches!(polled, Poll::Ready(None)) || body.is_end_stream() {
                    if let Some(r) = record.take() {
                        r.answered();
                    }
                    if let Some(c) = conn.take() {
                        c.release();
                    }
                }
                polled
            }
            ClientBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Upstream { body, .. } => body.is_end_stream(),
            ClientBody::Full(b) => b.is_none(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Upstream { body, .. } => body.size_hint(),
            ClientBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ClientBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // A body with nothing left to read (HEAD, 204, Content-Length: 0, or fully streamed)
        // leaves its connection reusable; one dropped half-way does not. An answer not yet
        // counted was either whole or left by its client: its status stands.
        if let ClientBody::Upstream {
            body, conn, record, ..
        } = self
        {
            if let Some(r) = record.take() {
                r.answered();
            }
            if body.is_end_stream() {
                if let Some(c) = conn.take() {
                    c.release();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection pool

type Sender = SendRequest<UpstreamBody>;

/// Idle upstream connections of one kind on this worker thread, per upstream. Each worker is a
/// single-threaded runtime, so a pool is a thread-local without a lock.
pub(crate) struct IdlePool<T> {
    by_upstream: Vec<(u64, Vec<T>)>,
}

impl<T> IdlePool<T> {
    pub(crate) const fn new() -> Self {
        IdlePool {
            by_upstream: Vec::new(),
        }
    }

    /// The most recently released connection to `upstream` that is still `usable`; unusable
    /// ones met on the way are dropped.
    pub(crate) fn take(&mut self, upstream: u64, usable: impl Fn(&T) -> bool) -> Option<T> {
        let (_, idle) = self
            .by_upstream
            .iter_mut()
            .find(|(id, _)| *id == upstream)?;
        while let Some(c) = idle.pop() {
            if usable(&c) {
                return Some(c);
            }
        }
        None
    }

    /// Keeps a connection for reuse, unless this worker already keeps its maximum.
    pub(crate) fn put(&mut self, upstream: u64, conn: T) {
        let max = MAX_IDLE.with(Cell::get);
        match self.by_upstream.iter_mut().find(|(id, _)| *id == upstream) {
            Some((_, idle)) if idle.len() < max => idle.push(conn),
            Some(_) => {}
            None => self.by_upstream.push((upstream, vec![conn])),
        }
    }
}

thread_local! {
    static SENDERS: RefCell<IdlePool<Sender>> = const { RefCell::new(IdlePool::new()) };
    static MAX_IDLE: Cell<usize> = const { Cell::new(256) };
    static RNG: Cell<u64> = Cell::new(seed_from_thread());
}

/// Sets how many idle connections per upstream this worker thread keeps.
pub fn set_max_idle(n: usize) {
    MAX_IDLE.with(|m| m.set(n));
}

fn seed_from_thread() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let stack = &t as *const u64 as u64;
    xxhash_rust::xxh3::xxh3_64_with_seed(&t.to_le_bytes(), stack) | 1
}

/// wyrand: fast, good enough for traffic splitting, one per thread.
pub(crate) fn next_random() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let m = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((m >> 64) as u64) ^ (m as u64)
    })
}

/// A pooled upstream connection on loan to one exchange.
pub struct PooledConn {
    upstream: u64,
    sender: Sender,
}

impl PooledConn {
    fn release(self) {
        if !self.sender.is_closed() {
            SENDERS.with(|p| p.borrow_mut().put(self.upstream, self.sender));
        }
    }
}

fn checkout(upstream: u64) -> Option<Sender> {
    SENDERS.with(|p| p.borrow_mut().take(upstream, |s| !s.is_closed()))
}

/// Why a request got no answer from its version.
#[derive(Debug)]
pub(crate) struct UpstreamError {
    pub(crate) failure: UpstreamFailure,
    /// The router itself failed (out of descriptors, say): the version is not to blame.
    pub(crate) local: Option<LocalFailure>,
    pub(crate) detail: String,
}

impl UpstreamError {
    pub(crate) fn new(failure: UpstreamFailure, detail: impl Into<String>) -> Self {
        UpstreamError {
            failure,
            local: None,
            detail: detail.into(),
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        Self::new(UpstreamFailure::Protocol, detail)
    }

    pub(crate) fn timeout(detail: impl Into<String>) -> Self {
        Self::new(UpstreamFailure::Timeout, detail)
    }

    pub(crate) fn status(&self) -> StatusCode {
        match (self.local, self.failure) {
            (Some(_), _) => StatusCode::SERVICE_UNAVAILABLE,
            (None, UpstreamFailure::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            (None, _) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// True for errors that say this process or host ran out of something (descriptors, memory,
/// local ports), not that the upstream failed.
pub(crate) fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// A new TCP connection to an upstream, Nagle off.
pub(crate) async fn connect_tcp(
    upstream: &UpstreamUrl,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let addr = (upstream.host(), upstream.port());
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(UpstreamError::timeout("connect timed out")),
        Ok(Err(e)) if is_local_exhaustion(&e) => {
            return Err(UpstreamError {
                local: Some(LocalFailure::Resources),
                ..UpstreamError::new(
                    UpstreamFailure::Connect,
                    format!("the router cannot open a connection: {e}"),
                )
            })
        }
        Ok(Err(e)) => {
            return Err(UpstreamError::new(
                UpstreamFailure::Connect,
                format!("connect: {e}"),
            ))
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect(
    upstream: &UpstreamUrl,
    timeout: Duration,
    upgrades: bool,
) -> Result<Sender, UpstreamError> {
    let stream = connect_tcp(upstream, timeout).await?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        // One buffer per request: a plain send, where a vectored write of one or two slices
        // takes the kernel's longer writev path.
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::new(UpstreamFailure::Connect, format!("handshake: {e}")))?;
    if upgrades {
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
    } else {
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    Ok(sender)
}

/// Why an exchange got no response head.
enum ExchangeError {
    Upstream(UpstreamError),
    /// The client's request body broke off or was malformed: not the upstream's fault, so not
    /// counted against its version.
    ClientBody(String),
    /// The client stopped sending its body for the stall timeout: answered 408, not counted.
    ClientStalled,
}

impl From<UpstreamError> for ExchangeError {
    fn from(e: UpstreamError) -> Self {
        ExchangeError::Upstream(e)
    }
}

/// Sends on a pooled connection, or a new one. A request that a stale pooled connection never
/// took is retried once on a fresh connection (hyper hands it back unsent).
async fn exchange(
    upstream: &UpstreamUrl,
    mut req: Request<UpstreamBody>,
    options: &ProxyOptions,
) -> Result<(Response<Incoming>, PooledConn), ExchangeError> {
    loop {
        let (mut sender, fresh) = match checkout(upstream.id()) {
            Some(s) => (s, false),
            None => (
                // Boxed: the connect future is large and rarely needed, and unboxed it would
                // size (and make every move of) the request future.
                Box::pin(connect(upstream, options.connect_timeout, false)).await?,
                true,
            ),
        };
        if sender.ready().await.is_err() {
            if fresh {
                return Err(ExchangeError::Upstream(UpstreamError::protocol(
                    "upstream closed the connection",
                )));
            }
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                return Ok((
                    resp,
                    PooledConn {
                        upstream: upstream.id(),
                        sender,
                    },
                ))
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !fresh => req = unsent,
                // The only body hyper sends for us is the client's.
                _ if e.error().is_user() => {
                    return Err(ExchangeError::ClientBody(
                        std::error::Error::source(e.error())
                            .map_or_else(|| e.error().to_string(), ToString::to_string),
                    ))
                }
                _ => {
                    return Err(ExchangeError::Upstream(UpstreamError::protocol(
                        e.error().to_string(),
                    )))
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers

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
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

fn is_upgrade(req: &Request<Incoming>) -> bool {
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
fn upstream_parts(parts: &mut http::request::Parts, client: &ClientInfo, upgrade: bool) {
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
}

fn error_response(status: StatusCode, text: &str, close: bool) -> Response<ClientBody> {
    let mut resp = Response::new(ClientBody::text(format!("{text}\n")));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Requests whose framing is ambiguous are refused, never guessed at (request smuggling).
/// hyper itself rejects conflicting Content-Length values and a Transfer-Encoding that does not
/// end in chunked; what it resolves silently is checked here.
fn framing_error(req: &Request<Incoming>, client: &ClientInfo) -> Option<&'static str> {
    if req.version() >= HttpVersion::HTTP_2 {
        return None;
    }
    let both_in_head = client.head.take_both_framing_headers();
    if req.version() == HttpVersion::HTTP_11
        && req.headers().get_all(header::HOST).iter().count() != 1
    {
        // RFC 9112 §3.2: a server must refuse an HTTP/1.1 request without exactly one Host.
        return Some("an HTTP/1.1 request needs exactly one Host header");
    }
    let mut encodings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    match (encodings.next(), encodings.next()) {
        (Some(_), Some(_)) => Some("several Transfer-Encoding headers"),
        (Some(_), None) if both_in_head => Some("both Transfer-Encoding and Content-Length"),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The request path

/// Serves one client request. Never fails: upstream trouble becomes a 502/504 counted against
/// the version that caused it, so a dead canary shows as canary errors.
pub async fn handle(
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> Result<Response<ClientBody>, Infallible> {
    let started = Instant::now();
    let (worker, client) = (&conn.worker, &conn.client);
    let shared = &*worker.shared;
    let _in_flight = worker.recorder.enter();
    if let Some(why) = framing_error(&req, client) {
        return Ok(error_response(StatusCode::BAD_REQUEST, why, true));
    }
    // The table is held (one reference count) rather than the upstream URL cloned (two
    // strings) for the life of the request.
    let table = shared.table.load_full();
    let (decision, target, affinity_cookie) = {
        let view = RequestView {
            headers: req.headers(),
            query: req.uri().query(),
        };
        let decision = route(&table, &view, next_random());
        let target = match decision.version {
            Version::Stable => &table.doc.stable,
            Version::Canary => table
                .doc
                .canary
                .as_ref()
                .expect("route() picks canary only if set"),
        };
        let cookie = if decision.set_affinity {
            affinity_set_cookie(&table)
        } else {
            None
        };
        let mirror_to = if decision.mirror {
            table.doc.canary.clone()
        } else {
            None
        };
        if let Some(canary) = mirror_to {
            mirror(worker, &req, client, canary);
        }
        (decision, target, cookie)
    };
    let upgrade = is_upgrade(&req);
    if upgrade {
        // Boxed for the same reason as a new upstream connection in `exchange`.
        return Ok(Box::pin(proxy_upgrade(
            worker, client, req, decision, target, started,
        ))
        .await);
    }
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, client, false);
    let options = &shared.options;
    let (body, progress) = if body.is_end_stream() {
        (UpstreamBody::Empty, None)
    } else {
        let progress = BodyProgress::new();
        let body = UpstreamBody::Client {
            body,
            progress: progress.clone(),
        };
        (body, Some(progress))
    };
    let upstream_req = Request::from_parts(parts, body);
    let sent = exchange(target, upstream_req, options);
    let result = match progress {
        // The request is complete already: one timer from its start.
        None => crate::timer::timeout_at(started.checked_add(options.response_timeout), sent)
            .await
            .unwrap_or_else(|| {
                Err(ExchangeError::Upstream(UpstreamError::timeout(
                    "no response head within the response timeout",
                )))
            }),
        // The upstream is timed from the end of the request, not its start.
        Some(progress) => answered_in_time(sent, &progress, options).await,
    };
    match result {
        Ok((resp, conn)) => {
            let (mut parts, body) = resp.into_parts();
            let record = PendingRecord {
                recorder: worker.recorder.clone(),
                version: decision.version,
                status: parts.status.as_u16(),
                head_elapsed: started.elapsed(),
            };
            strip_hop_by_hop(&mut parts.headers);
            if let Some(c) = affinity_cookie {
                parts.headers.append(header::SET_COOKIE, c);
            }
            let body =
                ClientBody::upstream(body, Some(conn), Some(record), options.response_timeout);
            Ok(Response::from_parts(parts, body))
        }
        Err(ExchangeError::ClientBody(why)) => Ok(error_response(
            StatusCode::BAD_REQUEST,
            &format!("request body: {why}"),
            true,
        )),
        Err(ExchangeError::ClientStalled) => Ok(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
            true,
        )),
        Err(ExchangeError::Upstream(e)) => Ok(upstream_failed(
            worker,
            decision.version,
            target,
            e,
            started,
        )),
    }
}

/// Waits for `sent` while a request body streams: the client may stall for the client stall
/// timeout, the upstream may take no body for the response timeout, and once the whole body
/// has gone the answer must come within the response timeout.
async fn answered_in_time<T>(
    sent: impl Future<Output = Result<T, ExchangeError>>,
    progress: &BodyProgress,
    options: &ProxyOptions,
) -> Result<T, ExchangeError> {
    let mut sent = std::pin::pin!(sent);
    let first = match progress.verdict(Instant::now(), options) {
        BodyVerdict::Until(at) => at,
        BodyVerdict::Expired(e) => return Err(e),
    };
    let mut timer = crate::timer::Sleep::until(first);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = sent.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        while Pin::new(&mut timer).poll(cx).is_ready() {
            match progress.verdict(Instant::now(), options) {
                BodyVerdict::Expired(e) => return Poll::Ready(Err(e)),
                BodyVerdict::Until(at) => timer.reset(at),
            }
        }
        Poll::Pending
    })
    .await
}

fn upstream_failed(
    worker: &Worker,
    version: Version,
    target: &UpstreamUrl,
    e: UpstreamError,
    started: Instant,
) -> Response<ClientBody> {
    let (status, text) = record_upstream_failure(worker, version, target, &e, started);
    error_response(status, &text, false)
}

/// Counts an upstream failure against its version (as that version's 502/504) and says what
/// to answer the client. A failure of the router's own (out of descriptors) is counted as the
/// router's and answered 503: the version never saw the request. Both HTTP/1.1 paths answer
/// failures through here.
pub(crate) fn record_upstream_failure(
    worker: &Worker,
    version: Version,
    target: &UpstreamUrl,
    e: &UpstreamError,
    started: Instant,
) -> (StatusCode, String) {
    let status = e.status();
    if let Some(local) = e.local {
        worker.recorder.record_local_failure(local);
        tracing::warn!(version = version.as_str(), upstream = %target, "{}", e.detail);
        return (status, format!("coalmine router: {}", e.detail));
    }
    worker
        .recorder
        .record(version, status.as_u16(), started.elapsed());
    worker.recorder.record_failure(version, e.failure);
    tracing::debug!(version = version.as_str(), upstream = %target, "upstream failed: {}", e.detail);
    (
        status,
        format!("{} upstream {target}: {}", version.as_str(), e.detail),
    )
}

/// Counts an answer whose head reached the client but whose body the upstream broke off (or
/// stalled): a failure the client saw, so the version's, as a 502 timed to the head.
pub(crate) fn record_broken_body(
    worker: &Worker,
    version: Version,
    target: &UpstreamUrl,
    e: &UpstreamError,
    head_elapsed: Duration,
) {
    worker
        .recorder
        .record(version, StatusCode::BAD_GATEWAY.as_u16(), head_elapsed);
    worker.recorder.record_failure(version, e.failure);
    tracing::debug!(version = version.as_str(), upstream = %target, "upstream broke its answer: {}", e.detail);
}

pub(crate) fn affinity_set_cookie(table: &RouteTable) -> Option<HeaderValue> {
    let aff = table.doc.affinity.as_ref()?;
    HeaderValue::from_str(&format!(
        "{}={}; Max-Age={}; Path=/",
        aff.cookie_name, table.affinity_token, aff.max_age
    ))
    .ok()
}

/// WebSocket and other `Upgrade` requests: a dedicated upstream connection; after a 101 the
/// two sides are spliced byte for byte until either closes.
async fn proxy_upgrade(
    worker: &Worker,
    client: &ClientInfo,
    mut req: Request<Incoming>,
    decision: Decision,
    target: &UpstreamUrl,
    started: Instant,
) -> Response<ClientBody> {
    let options = &worker.shared.options;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, client, true);
    let body = if body.is_end_stream() {
        UpstreamBody::Empty
    } else {
        UpstreamBody::Client {
            body,
            progress: BodyProgress::new(),
        }
    };
    let sent = async {
        let mut sender = connect(target, options.connect_timeout, true).await?;
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| UpstreamError::protocol(e.to_string()))
    };
    let result = match tokio::time::timeout(options.response_timeout, sent).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::timeout(
            "no response head within the response timeout",
        )),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => return upstream_failed(worker, decision.version, target, e, started),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        worker
            .recorder
            .record(decision.version, resp.status().as_u16(), started.elapsed());
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, ClientBody::Full(None));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let record = PendingRecord {
        recorder: worker.recorder.clone(),
        version: decision.version,
        status: parts.status.as_u16(),
        head_elapsed: started.elapsed(),
    };
    let body = ClientBody::upstream(body, None, Some(record), options.response_timeout);
    Response::from_parts(parts, body)
}

/// Copies a stable-bound request to the canary, fire-and-forget: the user's response never waits
/// for it, copies beyond the concurrency limit are dropped, and the answers are recorded apart.
/// Only requests without a body are copied; a body would have to be buffered whole.
fn mirror(worker: &Worker, req: &Request<Incoming>, client: &ClientInfo, canary: UpstreamUrl) {
    if !req.body().is_end_stream() || is_upgrade(req) {
        worker
            .shared
            .metrics
            .mirror_skipped_body
            .fetch_add(1, Relaxed);
        return;
    }
    mirror_head(worker, client, canary, || {
        let mut copy = Request::new(());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy.into_parts().0)
    });
}

/// Sends a copy of a bodyless request head (made by `copy` only once a slot is free) to the
/// canary. Both HTTP/1.1 paths mirror through here.
pub(crate) fn mirror_head(
    worker: &Worker,
    client: &ClientInfo,
    canary: UpstreamUrl,
    copy: impl FnOnce() -> Option<http::request::Parts>,
) {
    let metrics = &worker.shared.metrics;
    let Ok(permit) = worker.mirror_slots.clone().try_acquire_owned() else {
        metrics.mirror_dropped.fetch_add(1, Relaxed);
        return;
    };
    let Some(mut parts) = copy() else {
        return;
    };
    upstream_parts(&mut parts, client, false);
    parts
        .headers
        .insert("x-coalmine-mirror", HeaderValue::from_static("true"));
    let request = Request::from_parts(parts, UpstreamBody::Empty);
    let recorder = worker.recorder.clone();
    let options = worker.shared.options.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let started = Instant::now();
        let sent = tokio::time::timeout(
            options.response_timeout,
            exchange(&canary, request, &options),
        );
        match sent.await {
            Ok(Ok((resp, conn))) => {
                recorder.record_mirror(Some((resp.status().as_u16(), started.elapsed())));
                let body = ClientBody::upstream(
                    resp.into_body(),
                    Some(conn),
                    None,
                    options.response_timeout,
                );
                let _ = http_body_util::BodyExt::collect(body).await;
            }
            _ => recorder.record_mirror(None),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
            crate::framing::HeadFlags::new(1024),
        );
        upstream_parts(&mut parts, &client, false);
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.version, HttpVersion::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "example.com");
        assert_eq!(parts.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn random_values_spread_over_buckets() {
        let n = 100_000;
        let canary = (0..n)
            .filter(|_| (next_random() & 0xffff_ffff) % 10_000 < 500)
            .count();
        // 5 % of 100,000 is 5,000 with a standard deviation of about 69.
        assert!((4_700..=5_300).contains(&canary), "{canary}");
    }
}
