//! hyper's request path: HTTP/2, upgrades, and the HTTP/1 requests the fast path ([`crate::http1`])
//! hands over. One request in, one upstream request out, the answer streamed back and counted
//! when its body has passed. A request without a body goes out on an upstream connection the
//! exchange owns, the fast path's kind ([`exchange_bodyless`], [`OwnedAnswer`]): hyper's client
//! would send it over a channel to a connection task of its own and parse the answer in a
//! second HTTP state machine. Requests with a body and upgrades go over hyper's HTTP/1 client.
//! Upstream connections of both kinds are pooled per worker thread (each worker is a
//! single-threaded runtime, so a pool needs no lock); the rules both paths share are
//! [`crate::upstream`]'s, [`crate::dispatch`]'s and [`crate::rewrite`]'s.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version as HttpVersion};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::dispatch::{answer_undeliverable, dispatch};
use crate::framing::{BadChunk, Framing};
use crate::mirror::{self, PairSide};
use crate::recorder::{Recorder, ServiceId, UpstreamFailure};
use crate::rewrite::{
    is_idempotent, is_upgrade, response_parts, strip_hop_by_hop, upstream_parts,
    write_upstream_head, ResponseHead,
};
use crate::route::{RequestView, Version};
use crate::table::{HeaderChanges, UpstreamUrl};
use crate::upstream::{
    checkout as checkout_owned, connect_tcp, count_broken_answer, count_failure, read_head,
    release, send_head, AttemptError, Attempts, ClientError, ExchangeError, IdlePool, TimedOut,
    Upstream, UpstreamError, MAX_RESPONSE_HEAD,
};
use crate::worker::{ClientInfo, Connection, ProxyOptions, Worker};

// ---------------------------------------------------------------------------------------------
// Bodies

/// A body relayed through hyper's path: a hyper [`Incoming`] streamed through `S`, which sees
/// every poll, or bytes already at hand.
pub enum Relayed<S> {
    Streamed(S),
    Full(Option<Bytes>),
}

/// What polling a body for its next frame gives.
type PolledFrame = Poll<Option<Result<Frame<Bytes>, hyper::Error>>>;

/// An [`Incoming`] body with something watching it as it is polled.
pub trait WatchedIncoming: Unpin {
    fn incoming(&self) -> &Incoming;
    fn poll_watched(&mut self, cx: &mut Context<'_>) -> PolledFrame;
}

impl<S: WatchedIncoming> Body for Relayed<S> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame {
        match self.get_mut() {
            Relayed::Streamed(s) => s.poll_watched(cx),
            Relayed::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            Relayed::Streamed(s) => s.incoming().is_end_stream(),
            Relayed::Full(b) => b.is_none(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            Relayed::Streamed(s) => s.incoming().size_hint(),
            Relayed::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Relayed::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// The body sent upstream: the client's own, streamed (with its progress watched), or nothing.
pub type UpstreamBody = Relayed<ClientUpload>;

/// The client's request body on its way upstream.
pub struct ClientUpload {
    body: Incoming,
    progress: Arc<BodyProgress>,
}

impl UpstreamBody {
    /// The client's body to send upstream, and its progress; nothing for a body that has
    /// already ended.
    fn from_client(body: Incoming) -> (Self, Option<Arc<BodyProgress>>) {
        if body.is_end_stream() {
            return (Relayed::Full(None), None);
        }
        let progress = BodyProgress::new();
        let upload = ClientUpload {
            body,
            progress: progress.clone(),
        };
        (Relayed::Streamed(upload), Some(progress))
    }
}

impl WatchedIncoming for ClientUpload {
    fn incoming(&self) -> &Incoming {
        &self.body
    }

    fn poll_watched(&mut self, cx: &mut Context<'_>) -> PolledFrame {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.progress.set(match &polled {
            Poll::Pending => WAITING_FOR_CLIENT,
            Poll::Ready(None) => SENT,
            Poll::Ready(Some(_)) if self.body.is_end_stream() => SENT,
            Poll::Ready(Some(_)) => WAITING_FOR_UPSTREAM,
        });
        polled
    }
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
            WAITING_FOR_CLIENT => (options.client_stall_timeout, || ClientError::Stalled.into()),
            SENT => (options.response_timeout, || {
                UpstreamError::timed_out(TimedOut::AnswerAfterRequest).into()
            }),
            _ => (options.response_timeout, || {
                UpstreamError::timed_out(TimedOut::RequestBody).into()
            }),
        };
        match since.checked_add(limit) {
            Some(deadline) if deadline <= now => BodyVerdict::Expired(expired()),
            Some(deadline) => BodyVerdict::Until(deadline),
            None => BodyVerdict::Until(now + Duration::from_secs(86_400)),
        }
    }
}

/// An answer to count once its body has passed: the client may yet see it break off.
pub struct PendingRecord {
    recorder: Arc<Recorder>,
    service: ServiceId,
    version: Version,
    status: u16,
    head_elapsed: Duration,
    /// The user's side of the pair, when a copy of the request went to the canary.
    pair: Option<PairSide>,
}

impl PendingRecord {
    /// The upstream's answer reached the client whole, or the client went away: the status
    /// stands.
    fn answered(self) {
        self.recorder
            .record(self.service, self.version, self.status, self.head_elapsed);
        if let Some(pair) = self.pair {
            pair.answered(self.status, self.head_elapsed);
        }
    }

    /// The upstream broke its answer off (or stalled) after the head: the client saw a
    /// failure, the version's, counted as a 502.
    fn broken(self, failure: UpstreamFailure) {
        count_broken_answer(
            &self.recorder,
            self.service,
            self.version,
            failure,
            self.head_elapsed,
        );
        if let Some(pair) = self.pair {
            pair.answered(StatusCode::BAD_GATEWAY.as_u16(), self.head_elapsed);
        }
    }
}

/// What a body sent to the client fails with: hyper ends the client's stream (HTTP/2) or
/// connection (HTTP/1) on it, so a broken answer never looks whole.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body sent to the client: the upstream's, streamed, or a text of the router's own.
pub enum ClientBody {
    Text(Option<Bytes>),
    /// Read on an upstream connection of the router's own ([`OwnedAnswer`]).
    Owned(OwnedAnswer),
    /// Read through hyper's client (requests with a body, upgrades refused).
    Hyper(Relayed<UpstreamAnswer>),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Text(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ClientBody::Owned(a) => a.poll_data(cx),
            ClientBody::Hyper(r) => Pin::new(r).poll_frame(cx).map_err(Into::into),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Text(b) => b.is_none(),
            ClientBody::Owned(a) => a.is_end_stream(),
            ClientBody::Hyper(r) => r.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Text(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ClientBody::Text(None) => SizeHint::with_exact(0),
            ClientBody::Owned(a) => a.size_hint(),
            ClientBody::Hyper(r) => r.size_hint(),
        }
    }
}

/// The upstream's answer body on its way to the client, holding its pooled connection until
/// the last byte so the connection goes back to the pool only when it is free again, and
/// counting the answer when it ends.
pub struct UpstreamAnswer {
    body: Incoming,
    conn: Option<PooledConn>,
    record: Option<PendingRecord>,
    /// Armed while waiting for the upstream's next frame.
    stall: Option<crate::timer::Sleep>,
    stall_limit: Duration,
}

impl ClientBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        ClientBody::Text(Some(s.into()))
    }

    pub(crate) fn upstream(
        body: Incoming,
        conn: Option<PooledConn>,
        record: Option<PendingRecord>,
        stall_limit: Duration,
    ) -> Self {
        ClientBody::Hyper(Relayed::Streamed(UpstreamAnswer {
            body,
            conn,
            record,
            stall: None,
            stall_limit,
        }))
    }
}

impl WatchedIncoming for UpstreamAnswer {
    fn incoming(&self) -> &Incoming {
        &self.body
    }

    fn poll_watched(&mut self, cx: &mut Context<'_>) -> PolledFrame {
        let UpstreamAnswer {
            body,
            conn,
            record,
            stall,
            stall_limit,
        } = self;
        let polled = Pin::new(&mut *body).poll_frame(cx);
        match &polled {
            Poll::Pending => {
                let limit = Instant::now().checked_add(*stall_limit);
                let timer = match (stall.as_mut(), limit) {
                    (Some(t), _) => t,
                    (None, Some(deadline)) => stall.insert(crate::timer::Sleep::until(deadline)),
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
}

impl Drop for UpstreamAnswer {
    fn drop(&mut self) {
        // A body with nothing left to read (HEAD, 204, Content-Length: 0, or fully streamed)
        // leaves its connection reusable; one dropped half-way does not. An answer not yet
        // counted was either whole or left by its client: its status stands.
        if let Some(r) = self.record.take() {
            r.answered();
        }
        if self.body.is_end_stream() {
            if let Some(c) = self.conn.take() {
                c.release();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream connections of the router's own

/// The upstream's answer body read on a connection the exchange owns (the fast path's kind,
/// [`Upstream`]): decoded from its HTTP/1.1 framing into frames for hyper, the answer counted
/// when it ends, the connection back in the worker's pool once the last byte is read.
pub struct OwnedAnswer {
    /// Gone once the body has ended (or broken off).
    up: Option<Upstream>,
    upstream: u64,
    framing: Framing,
    reusable: bool,
    record: Option<PendingRecord>,
    /// Armed while waiting for the upstream's next bytes.
    stall: Option<crate::timer::Sleep>,
    stall_limit: Duration,
}

impl OwnedAnswer {
    pub(crate) fn new(
        up: Upstream,
        upstream: u64,
        head: ResponseHead,
        record: Option<PendingRecord>,
        stall_limit: Duration,
    ) -> Self {
        let mut answer = OwnedAnswer {
            up: Some(up),
            upstream,
            framing: head.framing,
            reusable: head.reusable,
            record,
            stall: None,
            stall_limit,
        };
        if matches!(answer.framing, Framing::Empty) {
            answer.ended();
        }
        answer
    }

    fn is_end_stream(&self) -> bool {
        self.up.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.up, &self.framing) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Framing::Length(left)) => SizeHint::with_exact(*left),
            (Some(_), _) => SizeHint::default(),
        }
    }

    /// The whole answer has been read: counted, and its connection pooled if it can carry
    /// another request (bytes after the answer would be a broken upstream).
    fn ended(&mut self) {
        if let Some(r) = self.record.take() {
            r.answered();
        }
        if let Some(up) = self.up.take() {
            if self.reusable && up.buf.is_empty() {
                release(self.upstream, up);
            }
        }
    }

    /// The upstream broke its answer off (or stalled) after the head: the version's 502, and
    /// the client's stream ends in an error rather than looking whole.
    fn broken(&mut self, e: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(r) = self.record.take() {
            r.broken(e.failure);
        }
        self.up = None;
        Poll::Ready(Some(Err(e.detail.into())))
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let Some(up) = self.up.as_mut() else {
                return Poll::Ready(None);
            };
            let unread = up.buf.unread();
            let (consumed, data) = match &mut self.framing {
                Framing::Empty => (0, 0..0),
                Framing::Length(left) => {
                    let n = unread
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    (n, 0..n)
                }
                Framing::Chunked(c) => match c.data(unread) {
                    Ok(decoded) => decoded,
                    Err(BadChunk) => {
                        return self.broken(UpstreamError::protocol("malformed chunked body"))
                    }
                },
                Framing::UntilClose => (unread.len(), 0..unread.len()),
            };
            let data = (!data.is_empty()).then(|| Bytes::copy_from_slice(&unread[data]));
            up.buf.consume(consumed);
            let done = match &self.framing {
                Framing::Empty => true,
                Framing::Length(left) => *left == 0,
                Framing::Chunked(c) => c.is_done(),
                Framing::UntilClose => false,
            };
            if done {
                self.ended();
            }
            if let Some(data) = data {
                if let (Some(t), Some(deadline)) = (
                    self.stall.as_mut(),
                    Instant::now().checked_add(self.stall_limit),
                ) {
                    t.reset(deadline);
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if done {
                return Poll::Ready(None);
            }
            if consumed > 0 {
                // Chunk framing without data: look again at what is left.
                continue;
            }
            let up = self.up.as_mut().expect("not ended");
            let cap = up.buf.data.len();
            match up.buf.poll_fill(cx, &mut up.stream, cap) {
                Poll::Ready(Ok(0)) if matches!(self.framing, Framing::UntilClose) => {
                    self.reusable = false;
                    self.ended();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0) | Err(_)) => {
                    return self.broken(UpstreamError::new(
                        UpstreamFailure::Body,
                        "the body broke off",
                    ))
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {
                    let limit = Instant::now().checked_add(self.stall_limit);
                    let timer = match (self.stall.as_mut(), limit) {
                        (Some(t), _) => t,
                        (None, Some(deadline)) => {
                            self.stall.insert(crate::timer::Sleep::until(deadline))
                        }
                        (None, None) => return Poll::Pending,
                    };
                    if Pin::new(timer).poll(cx).is_ready() {
                        return self.broken(UpstreamError::timed_out(TimedOut::AnswerBody));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for OwnedAnswer {
    fn drop(&mut self) {
        // An answer not yet counted was left by its client: its status stands. Its connection,
        // half read, is not reused.
        if let Some(r) = self.record.take() {
            r.answered();
        }
    }
}

/// A bodyless request on an upstream connection of the router's own, by the retry-once rule
/// ([`Attempts`]): the answer's head, and the connection its body is to be read from. `head`
/// is the upstream request head ([`write_upstream_head`]); `resent` hears of a second attempt.
pub(crate) async fn exchange_bodyless(
    target: &UpstreamUrl,
    head: &[u8],
    head_method: bool,
    idempotent: bool,
    options: &ProxyOptions,
    mut resent: impl FnMut(),
) -> Result<(http::response::Parts, ResponseHead, Upstream), ExchangeError> {
    let mut attempts = Attempts::default();
    loop {
        let pooled = attempts
            .may_reuse()
            .then(|| checkout_owned(target.id()))
            .flatten();
        let (mut up, reused) = match pooled {
            Some(up) => (up, true),
            // Boxed: the connect future is rarely needed, and unboxed it would size (and make
            // every move of) the request future.
            None => {
                let stream = Box::pin(connect_tcp(target, options.connect_timeout)).await?;
                (Upstream::new(stream), false)
            }
        };
        match answer_head(&mut up, head, head_method, reused).await {
            Ok((parts, resp)) => return Ok((parts, resp, up)),
            // The whole request is at hand: only an idempotent one may go out after the
            // upstream could have read it.
            Err(e) => attempts.after(reused, e, idempotent)?,
        }
        resent();
    }
}

/// One attempt: sends `head` and reads the final answer's head (hyper's client passed over
/// informational answers too: nothing sends them on to the client).
async fn answer_head(
    up: &mut Upstream,
    head: &[u8],
    head_method: bool,
    pooled: bool,
) -> Result<(http::response::Parts, ResponseHead), AttemptError> {
    send_head(up, head, pooled).await?;
    let mut informational = false;
    loop {
        let len = read_head(up, informational, MAX_RESPONSE_HEAD).await?;
        let (parts, resp) = response_parts(&up.buf.unread()[..len], head_method)
            .map_err(UpstreamError::protocol)?;
        up.buf.consume(len);
        if !(100..200).contains(&resp.status) {
            return Ok((parts, resp));
        }
        informational = true;
    }
}

// ---------------------------------------------------------------------------------------------
// hyper's upstream connections

type Sender = SendRequest<UpstreamBody>;

thread_local! {
    static SENDERS: RefCell<IdlePool<Sender>> = const { RefCell::new(IdlePool::new()) };
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

/// Sends on a pooled connection, or a new one, by the retry-once rule ([`Attempts`]): a
/// request a stale pooled connection never took (hyper hands it back unsent, or the connection
/// is closed before it is sent) goes out again on a new connection, and `resent` hears of it.
pub(crate) async fn exchange(
    upstream: &UpstreamUrl,
    mut req: Request<UpstreamBody>,
    options: &ProxyOptions,
    mut resent: impl FnMut(),
) -> Result<(Response<Incoming>, PooledConn), ExchangeError> {
    let mut attempts = Attempts::default();
    loop {
        let pooled = attempts
            .may_reuse()
            .then(|| checkout(upstream.id()))
            .flatten();
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            // Boxed: the connect future is large and rarely needed, and unboxed it would
            // size (and make every move of) the request future.
            None => Box::pin(connect(upstream, options.connect_timeout, false)).await?,
        };
        let failed = if sender.ready().await.is_err() {
            AttemptError::NotTaken
        } else {
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
                    Some(unsent) if reused => {
                        req = unsent;
                        AttemptError::NotTaken
                    }
                    // The only body hyper sends for us is the client's.
                    _ if e.error().is_user() => {
                        let why = std::error::Error::source(e.error())
                            .map_or_else(|| e.error().to_string(), ToString::to_string);
                        let why = format!("request body: {why}");
                        return Err(ClientError::Malformed(why.into()).into());
                    }
                    _ => return Err(UpstreamError::protocol(e.error().to_string()).into()),
                },
            }
        };
        // hyper cannot tell a connection closed before answering from one that broke: only a
        // request it never sent goes out again.
        attempts.after(reused, failed, false)?;
        resent();
    }
}

// ---------------------------------------------------------------------------------------------
// Answers of the router's own

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
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers().get(header::HOST).map(|h| h.as_bytes()));
    let to = match dispatch(
        &table,
        &RequestView {
            headers: req.headers(),
            query: req.uri().query(),
            client: Some((client.peer, &shared.options.geo)),
            host,
            path: req.uri().path().as_bytes(),
            method: req.method().as_str().as_bytes(),
        },
    ) {
        Ok(to) => to,
        Err(why) => {
            let (status, text) = answer_undeliverable(&worker.recorder, why, started);
            return Ok(error_response(status, text, false));
        }
    };
    let (service, version, target) = (to.counters(), to.version, to.target);
    let changes = &to.service.doc.request_headers;
    let answer_changes = to.answer_changes();
    let pair = to
        .mirror_to
        .and_then(|canary| mirror(worker, &req, client, (service, changes), canary));
    let upgrade = is_upgrade(&req);
    if upgrade {
        // Boxed for the same reason as a new upstream connection in `exchange`.
        let at = (service, version);
        let upgrade = proxy_upgrade(worker, client, req, at, (target, changes), started);
        return Ok(Box::pin(upgrade).await);
    }
    if !req.body().is_end_stream() {
        // Boxed: rarer, and its state would otherwise size every request's future.
        let at = (service, version);
        let streamed = proxy_streamed(worker, client, req, at, (target, changes), started);
        return Ok(match Box::pin(streamed).await {
            Ok(mut resp) => {
                answer_changes.apply(resp.headers_mut());
                resp
            }
            Err(own) => own,
        });
    }
    let options = &shared.options;
    // The client's request is gone before the first wait: it would otherwise be part of the
    // request's future, which hyper moves into a task of its own.
    let (head, head_method, idempotent) = {
        let (parts, _) = req.into_parts();
        let mut head = Vec::with_capacity(512);
        write_upstream_head(&parts, client, false, changes, &mut head);
        let method = parts.method.as_str();
        (head, method == "HEAD", is_idempotent(method))
    };
    let sent = exchange_bodyless(target, &head, head_method, idempotent, options, || {
        worker.recorder.record_retry(service, version)
    });
    // The request is complete already: one timer from its start.
    let result = crate::timer::timeout_at(started.checked_add(options.response_timeout), sent)
        .await
        .unwrap_or_else(|| Err(UpstreamError::timed_out(TimedOut::Answer).into()));
    Ok(match result {
        Ok((mut parts, head, up)) => {
            let record = PendingRecord {
                recorder: worker.recorder.clone(),
                service,
                version,
                status: head.status,
                head_elapsed: started.elapsed(),
                pair,
            };
            answer_changes.apply(&mut parts.headers);
            let body = OwnedAnswer::new(
                up,
                target.id(),
                head,
                Some(record),
                options.response_timeout,
            );
            Response::from_parts(parts, ClientBody::Owned(body))
        }
        Err(ExchangeError::Upstream(e)) => {
            if let Some(pair) = pair {
                pair.failed(&e, started.elapsed());
            }
            upstream_failed(worker, (service, version), target, e, started)
        }
        // Nothing of a bodyless request is the client's to break.
        Err(ExchangeError::Client(e)) => {
            let (status, text) = e
                .answer()
                .unwrap_or((StatusCode::BAD_REQUEST, "bad request"));
            error_response(status, text, true)
        }
    })
}

/// A request whose body streams from the client, over hyper's HTTP/1 client. `Err` holds an
/// answer of the router's own, which takes no affinity cookie.
async fn proxy_streamed(
    worker: &Worker,
    client: &ClientInfo,
    req: Request<Incoming>,
    (service, version): (ServiceId, Version),
    (target, changes): (&UpstreamUrl, &HeaderChanges),
    started: Instant,
) -> Result<Response<ClientBody>, Response<ClientBody>> {
    let options = &worker.shared.options;
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, client, false, changes);
    let (body, progress) = UpstreamBody::from_client(body);
    let upstream_req = Request::from_parts(parts, body);
    let sent = exchange(target, upstream_req, options, || {
        worker.recorder.record_retry(service, version)
    });
    let result = match progress {
        // The request is complete already: one timer from its start.
        None => crate::timer::timeout_at(started.checked_add(options.response_timeout), sent)
            .await
            .unwrap_or_else(|| Err(UpstreamError::timed_out(TimedOut::Answer).into())),
        // The upstream is timed from the end of the request, not its start.
        Some(progress) => answered_in_time(sent, &progress, options).await,
    };
    match result {
        Ok((resp, conn)) => {
            let (mut parts, body) = resp.into_parts();
            let record = PendingRecord {
                recorder: worker.recorder.clone(),
                service,
                version,
                status: parts.status.as_u16(),
                head_elapsed: started.elapsed(),
                pair: None,
            };
            strip_hop_by_hop(&mut parts.headers);
            let body =
                ClientBody::upstream(body, Some(conn), Some(record), options.response_timeout);
            Ok(Response::from_parts(parts, body))
        }
        Err(ExchangeError::Client(e)) => {
            // hyper reports a body that broke off as malformed; it still has a client to tell.
            let (status, text) = e
                .answer()
                .unwrap_or((StatusCode::BAD_REQUEST, "request body broke off"));
            Err(error_response(status, text, true))
        }
        Err(ExchangeError::Upstream(e)) => Err(upstream_failed(
            worker,
            (service, version),
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
    (service, version): (ServiceId, Version),
    target: &UpstreamUrl,
    e: UpstreamError,
    started: Instant,
) -> Response<ClientBody> {
    let (status, text) = count_failure(&worker.recorder, service, version, target, &e, started);
    error_response(status, &text, false)
}

/// WebSocket and other `Upgrade` requests: a dedicated upstream connection; after a 101 the
/// two sides are spliced byte for byte until either closes.
async fn proxy_upgrade(
    worker: &Worker,
    client: &ClientInfo,
    mut req: Request<Incoming>,
    (service, version): (ServiceId, Version),
    (target, changes): (&UpstreamUrl, &HeaderChanges),
    started: Instant,
) -> Response<ClientBody> {
    let options = &worker.shared.options;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, client, true, changes);
    let (body, _) = UpstreamBody::from_client(body);
    let sent = async {
        let mut sender = connect(target, options.connect_timeout, true).await?;
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| UpstreamError::protocol(e.to_string()))
    };
    let result = match tokio::time::timeout(options.response_timeout, sent).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::timed_out(TimedOut::Answer)),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => return upstream_failed(worker, (service, version), target, e, started),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        worker
            .recorder
            .record(service, version, resp.status().as_u16(), started.elapsed());
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, ClientBody::Text(None));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let record = PendingRecord {
        recorder: worker.recorder.clone(),
        service,
        version,
        status: parts.status.as_u16(),
        head_elapsed: started.elapsed(),
        pair: None,
    };
    let body = ClientBody::upstream(body, None, Some(record), options.response_timeout);
    Response::from_parts(parts, body)
}

/// A copy of a stable-bound request for the canary (see [`crate::mirror`]): only one without
/// a body or an upgrade, of a safe method.
fn mirror(
    worker: &Worker,
    req: &Request<Incoming>,
    client: &ClientInfo,
    (service, changes): (ServiceId, &HeaderChanges),
    canary: &UpstreamUrl,
) -> Option<PairSide> {
    if !req.body().is_end_stream() || is_upgrade(req) {
        mirror::skipped_with_body(worker, service);
        return None;
    }
    if !mirror::may_copy(req.method().as_str()) {
        mirror::skipped_unsafe_method(worker, service);
        return None;
    }
    mirror::copy_to_canary(worker, client, (service, changes), canary, || {
        let mut copy = Request::new(());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy.into_parts().0)
    })
}
