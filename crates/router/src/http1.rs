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
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::dispatch::{answer_undeliverable, dispatch, Dispatch, Undeliverable};
use crate::drain;
use crate::framing::{head_end, BadChunk, Framing};
use crate::mirror::{self, PairSide};
use crate::recorder::UpstreamFailure;
use crate::rewrite::{
    header_slots, plain_response, response_head, AnswerChanges, RequestHead, ResponseHead,
};
use crate::table::RouteTable;
use crate::upstream::{
    checkout, connect_tcp, count_broken_answer, count_failure, read_head as read_response_head,
    release, send_head, AttemptError, Attempts, Buf, ClientError, ExchangeError, TimedOut,
    Upstream, UpstreamError, INITIAL_BUFFER, MAX_RESPONSE_HEAD,
};
use crate::worker::Connection;

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
// Requests

/// A request this path forwards: where it goes and what its head said.
struct Request<'t> {
    to: Dispatch<'t>,
    framing: Framing,
    /// The client asked to close after this exchange.
    close: bool,
    head_method: bool,
    /// RFC 9110 §9.2.2: sending it twice has the effect of sending it once.
    idempotent: bool,
    /// The user's side of the pair, when a copy went to the canary.
    pair: Option<PairSide>,
}

/// What the fast path makes of a request head.
enum Routed<'t> {
    To(Request<'t>),
    /// The router answers it (no service takes it, or its version has no endpoint), the
    /// connection kept only if nothing follows the head (a body is not read).
    Answered {
        why: Undeliverable,
        close: bool,
    },
}

/// Reads a complete request head, decides where the request goes (sending the canary its copy
/// when asked) and writes the upstream's head into `out`; `None` hands the connection to
/// hyper.
fn request_head<'t>(
    head: &[u8],
    conn: &Connection,
    table: &'t RouteTable,
    out: &mut Vec<u8>,
) -> Option<Routed<'t>> {
    let mut slots = header_slots();
    let head = RequestHead::parse(head, &mut slots)?;
    let to = match dispatch(
        table,
        &head.view(&conn.client, &conn.worker.shared.options.geo),
    ) {
        Ok(to) => to,
        Err(why) => {
            let close = head.close || !matches!(head.framing, Framing::Empty);
            return Some(Routed::Answered { why, close });
        }
    };
    let mut pair = None;
    if let Some(canary) = to.mirror_to {
        let (worker, client) = (&conn.worker, &conn.client);
        if !matches!(head.framing, Framing::Empty) {
            mirror::skipped_with_body(worker, to.counters());
        } else if !mirror::may_copy(head.method) {
            mirror::skipped_unsafe_method(worker, to.counters());
        } else {
            let service = (to.counters(), &to.service.doc.request_headers);
            pair = mirror::copy_to_canary(worker, client, service, canary, || head.to_parts());
        }
    }
    head.write_upstream(&conn.client, &to.service.doc.request_headers, out);
    Some(Routed::To(Request {
        to,
        close: head.close,
        head_method: head.is_head(),
        idempotent: head.is_idempotent(),
        framing: head.framing,
        pair,
    }))
}

/// The client's chunked body is malformed: answered 400, and the connection closes (where the
/// next request would start is unknown).
fn bad_chunk() -> ClientError {
    ClientError::Malformed("malformed chunked body".into())
}

// ---------------------------------------------------------------------------------------------
// Upstream connections

/// Reads a response head on `up` and writes the client's head into `out`, forwarding any 1xx
/// heads to the client on the way. [`AttemptError::Closed`]: the connection closed before any
/// byte came back (a kept-alive connection the upstream had just closed).
async fn read_response<I: AsyncWrite + Unpin>(
    up: &mut Upstream,
    client: &mut I,
    head_method: bool,
    close: bool,
    changes: &AnswerChanges<'_>,
    max_head: usize,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, AttemptError> {
    let mut informational = false;
    loop {
        let len = read_response_head(up, informational, max_head).await?;
        out.clear();
        let resp = response_head(&up.buf.unread()[..len], head_method, close, changes, out)
            .map_err(UpstreamError::protocol)?;
        up.buf.consume(len);
        if !(100..200).contains(&resp.status) {
            return Ok(resp);
        }
        informational = true;
        // Flushed: over TLS an early hint would otherwise wait for the final answer.
        let sent = match client.write_all(out).await {
            Ok(()) => client.flush().await,
            Err(e) => Err(e),
        };
        sent.map_err(|e| UpstreamError::protocol(format!("client: {e}")))?;
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
    let mut request = match request_head(&buf.unread()[..head_len], conn, &table, upstream_out) {
        None => return Next::Handoff,
        Some(Routed::To(request)) => request,
        Some(Routed::Answered { why, close }) => {
            buf.consume(head_len);
            let (status, text) = answer_undeliverable(&worker.recorder, why, started);
            let close = close || guard.is_draining();
            plain_response(client_out, status, text, close);
            if io.write_all(client_out).await.is_err() || io.flush().await.is_err() || close {
                return Next::Close;
            }
            return Next::KeepAlive;
        }
    };
    buf.consume(head_len);
    let body_done = match take_body(buf, &mut request.framing, upstream_out) {
        Ok(done) => done,
        Err(BadChunk) => return refuse(io, client_out, bad_chunk()).await,
    };
    let _in_flight = worker.recorder.enter();
    let (service, version, target) = (request.to.counters(), request.to.version, request.to.target);
    let answer_changes = request.to.answer_changes();
    let timeout = options.response_timeout;
    let request_stalls = Stalls {
        // A client that stops sending its body: the client's failure. An upstream that stops
        // taking it: the version's.
        source: options.client_stall_timeout,
        sink: timeout,
    };
    // A kept-alive connection may turn out closed: the retry-once rule ([`Attempts`]) says
    // whether the request goes out again on a new one (whole at hand means: in `upstream_out`).
    let mut attempts = Attempts::default();
    let result = loop {
        let pooled_conn = attempts
            .may_reuse()
            .then(|| checkout(target.id()))
            .flatten();
        let (mut up, pooled) = match pooled_conn {
            Some(up) => (up, true),
            None => match connect_tcp(target, options.connect_timeout).await {
                Ok(stream) => (Upstream::new(stream), false),
                Err(e) => break Err(ExchangeError::from(e)),
            },
        };
        let close = request.close || guard.is_draining();
        let changes = &answer_changes;
        let read = if body_done {
            // The request is complete already: one timer for the whole exchange.
            let exchange = async {
                send_head(&mut up, upstream_out, pooled).await?;
                let read = read_response(
                    &mut up,
                    io,
                    request.head_method,
                    close,
                    changes,
                    MAX_RESPONSE_HEAD,
                    client_out,
                );
                read.await
            };
            let deadline = started.checked_add(timeout);
            crate::timer::timeout_at(deadline, exchange)
                .await
                .unwrap_or_else(|| Err(UpstreamError::timed_out(TimedOut::Answer).into()))
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
                changes,
            };
            Box::pin(streamed.send(&mut up, io, buf, client_out)).await
        };
        match read {
            Ok(resp) => break Ok((up, resp)),
            Err(e) => match attempts.after(pooled, e, body_done && request.idempotent) {
                Ok(()) => worker.recorder.record_retry(service, version),
                Err(e) => break Err(e),
            },
        }
    };
    let (mut up, mut resp) = match result {
        Ok(r) => r,
        Err(ExchangeError::Client(e)) => return refuse(io, client_out, e).await,
        Err(ExchangeError::Upstream(e)) => {
            if let Some(pair) = request.pair.take() {
                pair.failed(&e, started.elapsed());
            }
            let (status, text) =
                count_failure(&worker.recorder, service, version, target, &e, started);
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
    // The pair is counted with the user's answer, as the version's: the status the client got.
    let pair = request.pair.take();
    match body {
        Ok(()) => {
            worker
                .recorder
                .record(service, version, resp.status, head_elapsed);
            if let Some(pair) = pair {
                pair.answered(resp.status, head_elapsed);
            }
        }
        Err(Broken::Sink | Broken::SinkStalled) => {
            worker
                .recorder
                .record(service, version, resp.status, head_elapsed);
            if let Some(pair) = pair {
                pair.answered(resp.status, head_elapsed);
            }
            return Next::Close;
        }
        Err(broken @ (Broken::Source | Broken::SourceStalled | Broken::BadChunk)) => {
            if let Some(pair) = pair {
                pair.answered(StatusCode::BAD_GATEWAY.as_u16(), head_elapsed);
            }
            let e = match broken {
                Broken::SourceStalled => UpstreamError::timed_out(TimedOut::AnswerBody),
                Broken::BadChunk => UpstreamError::protocol("malformed chunked body"),
                _ => UpstreamError::new(UpstreamFailure::Body, "the body broke off"),
            };
            count_broken_answer(&worker.recorder, service, version, e.failure, head_elapsed);
            tracing::debug!(version = version.as_str(), upstream = %target, "upstream broke its answer: {}", e.detail);
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
struct StreamedRequest<'a, 't> {
    request: &'a mut Request<'t>,
    upstream_out: &'a [u8],
    pooled: bool,
    started: Instant,
    timeout: Duration,
    stalls: Stalls,
    close: bool,
    changes: &'a AnswerChanges<'a>,
}

impl StreamedRequest<'_, '_> {
    /// Sends the head and streams the body, then reads the answer. The upstream is timed from
    /// the end of the request: a slow upload is the client's business, not the version's.
    async fn send<I>(
        self,
        up: &mut Upstream,
        io: &mut I,
        buf: &mut Buf,
        client_out: &mut Vec<u8>,
    ) -> Result<ResponseHead, AttemptError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let head = send_head(up, self.upstream_out, self.pooled);
        crate::timer::timeout_at(self.started.checked_add(self.timeout), head)
            .await
            .unwrap_or_else(|| Err(UpstreamError::timed_out(TimedOut::RequestHead).into()))?;
        let body = stream_body(
            io,
            buf,
            &mut up.stream,
            client_out,
            &mut self.request.framing,
            self.stalls,
        );
        body.await.map_err(|broken| -> AttemptError {
            match broken {
                Broken::Source => ClientError::Gone.into(),
                Broken::SourceStalled => ClientError::Stalled.into(),
                Broken::BadChunk => bad_chunk().into(),
                Broken::Sink => {
                    UpstreamError::protocol("the upstream stopped reading the body").into()
                }
                Broken::SinkStalled => UpstreamError::timed_out(TimedOut::RequestBody).into(),
            }
        })?;
        let read = read_response(
            up,
            io,
            self.request.head_method,
            self.close,
            self.changes,
            MAX_RESPONSE_HEAD,
            client_out,
        );
        crate::timer::timeout_at(Instant::now().checked_add(self.timeout), read)
            .await
            .unwrap_or_else(|| Err(UpstreamError::timed_out(TimedOut::AnswerAfterRequest).into()))
    }
}

/// Ends an exchange that failed on the client's account: told what it can be told (nothing
/// if it is gone), never counted against a version; the connection closes.
async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>, e: ClientError) -> Next {
    if let Some((status, text)) = e.answer() {
        plain_response(out, status, text, true);
        let _ = io.write_all(out).await;
    }
    Next::Close
}

/// The fast path driven in-process: the client over `tokio::io::duplex`, upstreams scripted on
/// 127.0.0.1 in this process, all on the test's single-threaded runtime like a worker's.
#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::drain::Drain;
    use crate::framing::HeadFlags;
    use crate::recorder::Metrics;
    use crate::route::Version;
    use crate::table::{RoutesDoc, UpstreamUrl};
    use crate::worker::{ClientInfo, ProxyOptions, Shared, Worker};

    const LIMIT: Duration = Duration::from_secs(10);

    /// What a scripted upstream does with a request.
    enum Reply {
        /// Answers with these bytes and keeps the connection.
        Keep(&'static [u8]),
        /// Answers with these bytes and closes the connection.
        Close(&'static [u8]),
        /// Closes the connection without a word.
        Drop,
    }

    /// What a scripted upstream does with the `n`th request (from 0) on its `c`th connection.
    type Script = fn(c: usize, n: usize) -> Reply;

    struct Upstream {
        url: UpstreamUrl,
        /// Every request head (and body) it read, as text.
        requests: mpsc::UnboundedReceiver<String>,
        accepted: Arc<AtomicUsize>,
    }

    fn content_length(head: &str) -> usize {
        head.lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0)
    }

    /// Reads one message (head and `Content-Length` body) from `io`, after what `buf` holds;
    /// `None` at the end of the stream.
    async fn read_message<R: AsyncRead + Unpin>(
        io: &mut R,
        buf: &mut Vec<u8>,
    ) -> Option<(String, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = head_end(buf) {
                break end;
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let want = content_length(&head);
        while buf.len() < want {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf.drain(..want.min(buf.len())).collect();
        Some((head, body))
    }

    async fn upstream(script: Script) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let c = count.fetch_add(1, SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        let Some((head, body)) = read_message(&mut stream, &mut buf).await else {
                            return;
                        };
                        let _ = tx.send(head + &String::from_utf8_lossy(&body));
                        let (answer, keep) = match script(c, n) {
                            Reply::Keep(answer) => (answer, true),
                            Reply::Close(answer) => (answer, false),
                            Reply::Drop => return,
                        };
                        if stream.write_all(answer).await.is_err() || !keep {
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            url,
            requests,
            accepted,
        }
    }

    fn connection(routes: RoutesDoc) -> Arc<Connection> {
        services(vec![routes])
    }

    fn services(routes: Vec<RoutesDoc>) -> Arc<Connection> {
        let metrics = Arc::new(Metrics::new("test".into(), 0));
        let table = RouteTable::new(routes, 1, &metrics).unwrap();
        let shared = Arc::new(Shared::new(table, metrics, ProxyOptions::default()));
        Arc::new(Connection {
            worker: Worker::new(shared),
            client: ClientInfo::new(
                "10.9.8.7:4000".parse().unwrap(),
                false,
                HeadFlags::new(1024),
            ),
        })
    }

    fn stable_only(url: &UpstreamUrl) -> Arc<Connection> {
        connection(RoutesDoc::stable_only(url.clone().into()))
    }

    /// Serves a client connection on the fast path; the client's end, and how serving ended.
    fn serve_client(conn: &Arc<Connection>) -> (DuplexStream, tokio::task::JoinHandle<Ended>) {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let conn = conn.clone();
        let served = tokio::spawn(async move {
            let drain = Drain::default();
            let mut guard = drain.enter();
            let limits = Limits {
                header_read_timeout: LIMIT,
                idle_timeout: LIMIT,
                max_header_bytes: 16 * 1024,
            };
            serve(&mut server, &conn, &limits, &mut guard).await
        });
        (client, served)
    }

    /// Sends a request and reads its answer.
    async fn ask(client: &mut DuplexStream, request: &[u8]) -> (String, Vec<u8>) {
        client.write_all(request).await.unwrap();
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(LIMIT, read_message(client, &mut buf)).await;
        answer.unwrap().expect("an answer")
    }

    fn status(head: &str) -> u16 {
        head[9..12].parse().unwrap()
    }

    fn stats(conn: &Connection, version: Version) -> crate::recorder::VersionSnapshot {
        service_stats(conn, "default", version)
    }

    fn service_stats(
        conn: &Connection,
        service: &str,
        version: Version,
    ) -> crate::recorder::VersionSnapshot {
        let mut s = conn.worker.shared.metrics.snapshot([service]);
        let [stable, canary] = s.services.remove(service).unwrap().versions;
        match version {
            Version::Stable => stable,
            Version::Canary => canary,
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok";

    #[tokio::test]
    async fn a_request_goes_upstream_rewritten_and_comes_back_counted_on_kept_alive_connections() {
        let mut up = upstream(|_, _| Reply::Keep(OK)).await;
        let conn = stable_only(&up.url);
        let (mut client, served) = serve_client(&conn);
        let get = b"GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
        for _ in 0..3 {
            let (head, body) = ask(&mut client, get).await;
            assert_eq!((status(&head), body.as_slice()), (200, &b"ok"[..]));
            assert_eq!(
                head, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
                "hop-by-hop headers cross"
            );
            assert_eq!(
                up.requests.recv().await.unwrap(),
                "GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nx-forwarded-for: 10.0.0.1, 10.9.8.7\r\nx-forwarded-proto: http\r\n\r\n"
            );
        }
        assert_eq!(
            up.accepted.load(SeqCst),
            1,
            "one upstream connection, kept alive"
        );
        let stable = stats(&conn, Version::Stable);
        assert_eq!(stable.statuses[&200], 3);
        assert_eq!(stable.latency.len(), 3);
        drop(client);
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }

    /// Answers a connection's first request, and closes it without a word when the next one
    /// arrives: an upstream's idle timeout striking just as the router reuses the connection.
    fn drop_second(_: usize, n: usize) -> Reply {
        match n {
            0 => Reply::Keep(OK),
            _ => Reply::Drop,
        }
    }

    #[tokio::test]
    async fn a_connection_closed_under_the_routers_feet_costs_an_idempotent_request_nothing_and_a_post_its_answer(
    ) {
        let up = upstream(drop_second).await;
        let conn = stable_only(&up.url);
        let (mut client, _served) = serve_client(&conn);
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(status(&ask(&mut client, get).await.0), 200);
        // Sent on the kept-alive connection, which closes: again, once, on a new connection.
        assert_eq!(status(&ask(&mut client, get).await.0), 200);
        assert_eq!(up.accepted.load(SeqCst), 2);
        // The upstream may have acted on a POST it read: never sent twice, the version's 502.
        let post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        let (head, body) = ask(&mut client, post).await;
        assert_eq!(status(&head), 502);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!(
                "stable upstream {}: upstream closed the connection before answering\n",
                up.url
            )
        );
        assert_eq!(up.accepted.load(SeqCst), 2, "the POST went out once");
        let stable = stats(&conn, Version::Stable);
        assert_eq!((stable.statuses[&200], stable.statuses[&502]), (2, 1));
        assert_eq!(stable.retries, 1);
        assert_eq!(stable.failures[UpstreamFailure::Protocol as usize], 1);
    }

    #[tokio::test]
    async fn the_first_request_the_fast_path_does_not_take_goes_to_hyper_with_every_byte_read() {
        let mut up = upstream(|_, _| Reply::Keep(OK)).await;
        let conn = stable_only(&up.url);
        let (mut client, served) = serve_client(&conn);
        let upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nafter";
        let mut pipelined = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        pipelined.extend_from_slice(upgrade);
        client.write_all(&pipelined).await.unwrap();
        let mut buf = Vec::new();
        let (head, _) = read_message(&mut client, &mut buf).await.unwrap();
        assert_eq!(status(&head), 200, "the first is the fast path's");
        assert!(up.requests.recv().await.unwrap().starts_with("GET /1 "));
        match served.await.unwrap() {
            Ended::Handoff { read } => assert_eq!(read.as_ref(), &upgrade[..]),
            Ended::Closed => panic!("closed instead of handed over"),
        }
        assert_eq!(stats(&conn, Version::Stable).statuses[&200], 1);

        let (mut client, served) = serve_client(&conn);
        let http10 = b"GET / HTTP/1.0\r\n\r\n";
        client.write_all(http10).await.unwrap();
        match served.await.unwrap() {
            Ended::Handoff { read } => assert_eq!(read.as_ref(), &http10[..]),
            Ended::Closed => panic!("closed instead of handed over"),
        }
    }

    #[tokio::test]
    async fn an_answer_the_upstream_breaks_off_is_the_versions_502_and_the_client_connection_closes(
    ) {
        let up = upstream(|_, _| Reply::Close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
            .await;
        let conn = stable_only(&up.url);
        let (mut client, served) = serve_client(&conn);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        tokio::time::timeout(LIMIT, client.read_to_end(&mut seen))
            .await
            .unwrap()
            .unwrap();
        let seen = String::from_utf8(seen).unwrap();
        assert_eq!(
            seen, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            "then the end"
        );
        assert!(matches!(served.await.unwrap(), Ended::Closed));
        let stable = stats(&conn, Version::Stable);
        assert_eq!(
            stable.statuses.get(&200),
            None,
            "the client never got a whole 200"
        );
        assert_eq!(stable.statuses[&502], 1);
        assert_eq!(stable.failures[UpstreamFailure::Body as usize], 1);
    }

    #[tokio::test]
    async fn the_clients_failures_are_answered_and_never_counted_against_a_version() {
        let up = upstream(|_, _| Reply::Keep(OK)).await;
        let conn = stable_only(&up.url);
        let (mut client, served) = serve_client(&conn);
        let bad = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let (head, body) = ask(&mut client, bad).await;
        assert_eq!(status(&head), 400);
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body, b"malformed chunked body\n");
        assert!(matches!(served.await.unwrap(), Ended::Closed));

        // A body that breaks off after its head went upstream: nobody to answer.
        let (mut client, served) = serve_client(&conn);
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\npart")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, b"", "nothing to answer a client that left");
        assert!(matches!(served.await.unwrap(), Ended::Closed));

        let stable = stats(&conn, Version::Stable);
        assert!(stable.statuses.is_empty(), "{:?}", stable.statuses);
        assert_eq!(stable.failures, [0; 5]);
    }

    #[tokio::test]
    async fn an_upstream_that_cannot_be_reached_is_its_versions_502_and_the_client_may_go_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let conn = stable_only(&url);
        let (mut client, _served) = serve_client(&conn);
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for _ in 0..2 {
            let (head, body) = ask(&mut client, get).await;
            assert_eq!(status(&head), 502);
            assert!(!head.contains("connection: close"), "{head}");
            let body = String::from_utf8(body).unwrap();
            assert!(
                body.starts_with(&format!("stable upstream {url}: connect: ")),
                "{body}"
            );
        }
        let stable = stats(&conn, Version::Stable);
        assert_eq!(stable.statuses[&502], 2);
        assert_eq!(stable.failures[UpstreamFailure::Connect as usize], 2);
    }

    #[tokio::test]
    async fn a_mirrored_request_reaches_the_canary_as_a_marked_copy_counted_apart() {
        let mut stable = upstream(|_, _| Reply::Keep(OK)).await;
        let mut canary = upstream(|_, _| {
            Reply::Keep(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        })
        .await;
        let mut routes = RoutesDoc::stable_only(stable.url.clone().into());
        routes.canary = Some(canary.url.clone().into());
        routes.mirror = crate::table::Weight::FULL;
        routes.request_headers = serde_json::from_value(serde_json::json!({
            "set": [{"name": "x-env", "value": "shop"}], "remove": ["x-debug"]
        }))
        .unwrap();
        let conn = connection(routes);
        let (mut client, _served) = serve_client(&conn);
        let get = b"GET /m HTTP/1.1\r\nHost: a\r\nX-Debug: 1\r\n\r\n";
        let (head, _) = ask(&mut client, get).await;
        assert_eq!(status(&head), 200, "the client gets stable's answer");
        let sent = stable.requests.recv().await.unwrap();
        assert!(sent.starts_with("GET /m "), "{sent}");
        let copy = canary.requests.recv().await.unwrap();
        assert!(copy.starts_with("GET /m HTTP/1.1\r\n"), "{copy}");
        assert!(copy.contains("x-coalmine-mirror: true\r\n"), "{copy}");
        assert!(copy.contains("x-forwarded-for: 10.9.8.7\r\n"), "{copy}");
        // The route's header changes: on the request and on its copy alike.
        for request in [&sent, &copy] {
            assert!(request.contains("x-env: shop\r\n"), "{request}");
            assert!(
                !request.to_ascii_lowercase().contains("x-debug"),
                "{request}"
            );
        }
        // The copy's answer is counted once the mirror task has read it.
        let metrics = &conn.worker.shared.metrics;
        for _ in 0..1000 {
            if metrics.snapshot([]).services["default"]
                .mirror
                .pairs
                .outcomes
                .iter()
                .flatten()
                .sum::<u64>()
                == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let s = metrics.snapshot([]).services.remove("default").unwrap();
        assert_eq!(s.mirror.statuses.get(&503), Some(&1));
        // Paired with the user's answer to the same request: stable well, the canary failed.
        assert_eq!(s.mirror.pairs.outcomes, [[0, 1], [0, 0]]);
        assert!(
            s.versions[Version::Canary.index()].statuses.is_empty(),
            "a copy is not a canary request"
        );

        // A request with a body is not copied: it would have to be buffered whole.
        let post = b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(status(&ask(&mut client, post).await.0), 200);
        let s = metrics.snapshot([]).services.remove("default").unwrap();
        assert_eq!(s.mirror.skipped_with_body, 1);

        // Nor one that changes something: both versions share their data, so a copy would
        // ship the order twice (or, late, delete what the user made since).
        for unsafe_request in [
            &b"POST /orders/7/ship HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"[..],
            b"DELETE /cart/items/3 HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(status(&ask(&mut client, unsafe_request).await.0), 200);
        }
        let after = b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(status(&ask(&mut client, after).await.0), 200);
        let copy = canary.requests.recv().await.unwrap();
        assert!(copy.starts_with("GET /after "), "{copy}");
        let s = metrics.snapshot([]).services.remove("default").unwrap();
        assert_eq!(s.mirror.skipped_unsafe_method, 2);
    }

    #[tokio::test]
    async fn each_host_reaches_its_service_and_an_unknown_one_gets_the_routers_404() {
        let mut shop = upstream(|_, _| Reply::Keep(OK)).await;
        let mut api = upstream(|_, _| Reply::Keep(OK)).await;
        let doc = |service: &str, url: &UpstreamUrl, selector: serde_json::Value| {
            let mut doc = selector;
            doc["service"] = service.into();
            doc["stable"] = url.as_str().into();
            serde_json::from_value::<RoutesDoc>(doc).unwrap()
        };
        let conn = services(vec![
            doc(
                "shop",
                &shop.url,
                serde_json::json!({"hosts": ["shop.test"]}),
            ),
            doc(
                "api",
                &api.url,
                serde_json::json!({"hosts": ["*.test"], "paths": ["/api"]}),
            ),
        ]);
        let (mut client, _served) = serve_client(&conn);
        let (head, _) = ask(
            &mut client,
            b"GET /x HTTP/1.1\r\nHost: Shop.Test:8080\r\n\r\n",
        )
        .await;
        assert_eq!(status(&head), 200);
        assert!(shop.requests.recv().await.unwrap().starts_with("GET /x "));
        let (head, _) = ask(&mut client, b"GET /api/v1 HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
        assert_eq!(status(&head), 200);
        assert!(api
            .requests
            .recv()
            .await
            .unwrap()
            .starts_with("GET /api/v1 "));
        // No service: 404 from the router, the connection kept, no version's count.
        let (head, body) = ask(&mut client, b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
        assert_eq!(status(&head), 404, "{head}");
        assert!(String::from_utf8_lossy(&body).contains("no service"));
        let (head, _) = ask(&mut client, b"GET /y HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
        assert_eq!(status(&head), 200, "the connection goes on after a 404");
        assert_eq!(
            service_stats(&conn, "shop", Version::Stable).statuses[&200],
            2
        );
        assert_eq!(
            service_stats(&conn, "api", Version::Stable).statuses[&200],
            1
        );
        let s = conn.worker.shared.metrics.snapshot([]);
        assert_eq!(s.local_failures["no_service"], 1);
        // A 404 with a body closes: the body is not read.
        let post = b"POST /x HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 2\r\n\r\nhi";
        let (head, _) = ask(&mut client, post).await;
        assert!(head.contains("connection: close"), "{head}");
    }
}
