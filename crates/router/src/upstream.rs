//! The upstream side of a request, for both request paths: the per-worker pool of idle
//! connections, the upstream connection an exchange owns (written to and read from by the
//! request's own task, no connection task between), connecting, the retry-once rule, and the
//! errors that say whose failure a request's end was — the upstream's (counted against its
//! version), the client's (never counted) or the router's own — with the counting that follows
//! from them.

use std::borrow::Cow;
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::framing::head_end;
use crate::recorder::{LocalFailure, Recorder, ServiceId, UpstreamFailure};
use crate::route::Version;
use crate::table::UpstreamUrl;

// ---------------------------------------------------------------------------------------------
// The pool

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
    static MAX_IDLE: Cell<usize> = const { Cell::new(256) };
}

/// Sets how many idle connections per upstream this worker thread keeps (in each pool).
pub fn set_max_idle(n: usize) {
    MAX_IDLE.with(|m| m.set(n));
}

// ---------------------------------------------------------------------------------------------
// Owned connections

/// A connection's read buffer to start with; it grows up to the head limit when a head needs it.
pub(crate) const INITIAL_BUFFER: usize = 8 * 1024;
/// Largest upstream response head accepted (hyper's client reads about as much).
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A read buffer: `data[start..end]` is read and not yet used.
pub(crate) struct Buf {
    pub(crate) data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    pub(crate) fn new(capacity: usize) -> Self {
        Buf {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn unread(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads more after the unread bytes (`Ok(0)`: end of stream). Room comes from moving the
    /// unread bytes to the front, then from growing the buffer up to `max`; `max` unread bytes
    /// are an error.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        max: usize,
    ) -> io::Result<usize> {
        self.make_room(max)?;
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Makes room like [`Buf::fill`] does, without reading.
    #[inline]
    fn make_room(&mut self, max: usize) -> io::Result<()> {
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
        Ok(())
    }

    /// [`Buf::fill`] as a poll, for a body polled by hyper.
    #[inline]
    pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        self.make_room(max)?;
        let mut read = ReadBuf::new(&mut self.data[self.end..]);
        ready!(Pin::new(io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }
}

/// An upstream connection with its own read buffer, owned by one exchange at a time.
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Buf,
}

thread_local! {
    static IDLE: std::cell::RefCell<IdlePool<Upstream>> =
        const { std::cell::RefCell::new(IdlePool::new()) };
}

impl Upstream {
    /// A new connection, with its read buffer.
    pub(crate) fn new(stream: TcpStream) -> Self {
        Upstream {
            stream,
            buf: Buf::new(INITIAL_BUFFER),
        }
    }

    /// False when the upstream has closed an idle connection (or sent something unasked).
    /// Free when the socket has no event; otherwise one read, which tokio needs anyway before
    /// it waits for the response.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

pub(crate) fn checkout(upstream: u64) -> Option<Upstream> {
    IDLE.with(|p| p.borrow_mut().take(upstream, Upstream::still_open))
}

pub(crate) fn release(upstream: u64, conn: Upstream) {
    IDLE.with(|p| p.borrow_mut().put(upstream, conn));
}

/// Writes the whole request head (and any body that came with it). A pooled connection that
/// fails before the kernel took a single byte has not taken the request
/// ([`AttemptError::NotTaken`]); after that, any failure is the upstream's, since it may have
/// read the request.
pub(crate) async fn send_head(
    up: &mut Upstream,
    head: &[u8],
    pooled: bool,
) -> Result<(), AttemptError> {
    let failed = |e: io::Error| UpstreamError::protocol(format!("write: {e}")).into();
    // Nearly always the socket takes the whole head at once: no future, no readiness dance.
    let mut written = match up.stream.try_write(head) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) if pooled => return Err(AttemptError::NotTaken),
        Err(e) => return Err(failed(e)),
    };
    while written < head.len() {
        match up.stream.write(&head[written..]).await {
            Ok(0) => return Err(UpstreamError::protocol("write: connection closed").into()),
            Ok(n) => written += n,
            Err(_) if written == 0 && pooled => return Err(AttemptError::NotTaken),
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(())
}

/// Reads until `up.buf` holds a complete response head; its length. `got_any`: bytes of this
/// answer came already (an informational head). [`AttemptError::Closed`]: the connection
/// closed before any byte of an answer came back (a kept-alive connection the upstream had just
/// closed). A plain function around a poll, not an `async fn`: it costs the request's future no
/// nested state machine.
pub(crate) fn read_head(
    up: &mut Upstream,
    mut got_any: bool,
    max_head: usize,
) -> impl Future<Output = Result<usize, AttemptError>> + '_ {
    std::future::poll_fn(move |cx| loop {
        if let Some(len) = head_end(up.buf.unread()) {
            return Poll::Ready(Ok(len));
        }
        if up.buf.unread().len() >= max_head {
            return Poll::Ready(Err(
                UpstreamError::protocol("response head too large").into()
            ));
        }
        let failed = match ready!(up.buf.poll_fill(cx, &mut up.stream, max_head)) {
            Ok(0) | Err(_) if !got_any => AttemptError::Closed,
            Ok(0) => UpstreamError::protocol("upstream closed the connection mid-head").into(),
            Ok(_) => {
                got_any = true;
                continue;
            }
            Err(e) => UpstreamError::protocol(format!("read: {e}")).into(),
        };
        return Poll::Ready(Err(failed));
    })
}

// ---------------------------------------------------------------------------------------------
// Connecting

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
        Err(_) => return Err(UpstreamError::timed_out(TimedOut::Connect)),
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

// ---------------------------------------------------------------------------------------------
// Whose failure

/// A wait on the upstream that ran out, named once for both paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimedOut {
    Connect,
    /// The upstream did not take the request head (a request whose body is still coming).
    RequestHead,
    /// The upstream took none of the request body for the response timeout.
    RequestBody,
    /// No response head within the response timeout of a request that came whole.
    Answer,
    /// No response head within the response timeout after the request's body ended.
    AnswerAfterRequest,
    /// The answer's body stopped coming for the response timeout.
    AnswerBody,
}

impl TimedOut {
    fn detail(self) -> &'static str {
        match self {
            TimedOut::Connect => "connect timed out",
            TimedOut::RequestHead => "the upstream did not take the request head",
            TimedOut::RequestBody => "the upstream took none of the body for the response timeout",
            TimedOut::Answer => "no response head within the response timeout",
            TimedOut::AnswerAfterRequest => {
                "no response head within the response timeout after the request"
            }
            TimedOut::AnswerBody => "the body stalled",
        }
    }
}

/// Why a request got no answer from its version: the version's failure (502/504), unless
/// `local` says it was the router's own.
#[derive(Debug)]
pub(crate) struct UpstreamError {
    pub(crate) failure: UpstreamFailure,
    /// The router itself failed (out of descriptors, say): the version is not to blame.
    pub(crate) local: Option<LocalFailure>,
    pub(crate) detail: Cow<'static, str>,
}

impl UpstreamError {
    pub(crate) fn new(failure: UpstreamFailure, detail: impl Into<Cow<'static, str>>) -> Self {
        UpstreamError {
            failure,
            local: None,
            detail: detail.into(),
        }
    }

    pub(crate) fn protocol(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(UpstreamFailure::Protocol, detail)
    }

    pub(crate) fn timed_out(wait: TimedOut) -> Self {
        Self::new(UpstreamFailure::Timeout, wait.detail())
    }

    pub(crate) fn status(&self) -> StatusCode {
        match (self.local, self.failure) {
            (Some(_), _) => StatusCode::SERVICE_UNAVAILABLE,
            (None, UpstreamFailure::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            (None, _) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The client's failure: never counted against a version.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// The request body broke off: the client is gone, there is nobody to answer.
    Gone,
    /// The request body is malformed: answered 400 with these words.
    Malformed(Cow<'static, str>),
    /// The client sent none of its body for the client stall timeout: answered 408.
    Stalled,
}

impl ClientError {
    /// What the client is told, if it can be told anything; its connection closes after.
    pub(crate) fn answer(&self) -> Option<(StatusCode, &str)> {
        match self {
            ClientError::Gone => None,
            ClientError::Malformed(why) => Some((StatusCode::BAD_REQUEST, why)),
            ClientError::Stalled => Some((
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )),
        }
    }
}

/// Why an exchange got no answer head, and whose failure that is.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    Upstream(UpstreamError),
    Client(ClientError),
}

impl From<UpstreamError> for ExchangeError {
    fn from(e: UpstreamError) -> Self {
        ExchangeError::Upstream(e)
    }
}

impl From<ClientError> for ExchangeError {
    fn from(e: ClientError) -> Self {
        ExchangeError::Client(e)
    }
}

/// How one attempt on one upstream connection ended without an answer head.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// Not one byte of the request was taken: the connection refused its first write, or
    /// hyper handed the request back unsent.
    NotTaken,
    /// The connection closed before a byte of an answer came back; the upstream may have read
    /// the request.
    Closed,
    Failed(ExchangeError),
}

impl From<UpstreamError> for AttemptError {
    fn from(e: UpstreamError) -> Self {
        AttemptError::Failed(e.into())
    }
}

impl From<ClientError> for AttemptError {
    fn from(e: ClientError) -> Self {
        AttemptError::Failed(e.into())
    }
}

// ---------------------------------------------------------------------------------------------
// The retry-once rule

/// The attempts at one request. A kept-alive connection may turn out closed under the
/// router's feet; the request then goes out a second time, on a new connection, only if not
/// one byte of it was taken, or if it is idempotent and whole at hand (RFC 9110 §9.2.2). Never
/// a third time.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    resent: bool,
}

impl Attempts {
    /// Whether this attempt may use a pooled connection: not once the request was resent.
    pub(crate) fn may_reuse(&self) -> bool {
        !self.resent
    }

    /// After an attempt on a `pooled` (or new) connection got no answer: `Ok(())` to send the
    /// request again on a new connection, else the error to answer. `idempotent_and_whole`:
    /// sending it twice has the effect of sending it once, and all of it is at hand.
    pub(crate) fn after(
        &mut self,
        pooled: bool,
        e: AttemptError,
        idempotent_and_whole: bool,
    ) -> Result<(), ExchangeError> {
        let resend = pooled
            && !self.resent
            && match e {
                AttemptError::NotTaken => true,
                AttemptError::Closed => idempotent_and_whole,
                AttemptError::Failed(_) => false,
            };
        if resend {
            self.resent = true;
            return Ok(());
        }
        Err(match e {
            AttemptError::NotTaken => {
                UpstreamError::protocol("upstream closed the connection").into()
            }
            AttemptError::Closed => {
                UpstreamError::protocol("upstream closed the connection before answering").into()
            }
            AttemptError::Failed(e) => e,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Counting

/// Counts an upstream failure against its version (as that version's 502/504) and says what to
/// answer the client. A failure of the router's own (out of descriptors) is counted as the
/// router's and answered 503: the version never saw the request.
pub(crate) fn count_failure(
    recorder: &Recorder,
    service: ServiceId,
    version: Version,
    target: &UpstreamUrl,
    e: &UpstreamError,
    started: Instant,
) -> (StatusCode, String) {
    let status = e.status();
    if let Some(local) = e.local {
        recorder.record_local_failure(local);
        tracing::warn!(version = version.as_str(), upstream = %target, "{}", e.detail);
        return (status, format!("coalmine router: {}", e.detail));
    }
    recorder.record(service, version, status.as_u16(), started.elapsed());
    recorder.record_failure(service, version, e.failure);
    tracing::debug!(version = version.as_str(), upstream = %target, "upstream failed: {}", e.detail);
    (
        status,
        format!("{} upstream {target}: {}", version.as_str(), e.detail),
    )
}

/// Counts an answer whose head reached the client but whose body the upstream broke off (or
/// stalled): a failure the client saw, so the version's, as a 502 timed to the head.
pub(crate) fn count_broken_answer(
    recorder: &Recorder,
    service: ServiceId,
    version: Version,
    failure: UpstreamFailure,
    head_elapsed: Duration,
) {
    recorder.record(
        service,
        version,
        StatusCode::BAD_GATEWAY.as_u16(),
        head_elapsed,
    );
    recorder.record_failure(service, version, failure);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(e: Result<(), ExchangeError>) -> String {
        match e {
            Err(ExchangeError::Upstream(e)) => e.detail.into_owned(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_goes_out_again_once_and_only_when_it_cannot_have_been_processed_twice() {
        // Not one byte taken by a kept-alive connection: again, on a new one, whatever it is.
        let mut a = Attempts::default();
        assert!(a.may_reuse());
        assert!(a.after(true, AttemptError::NotTaken, false).is_ok());
        assert!(!a.may_reuse());
        // Never a third time.
        assert_eq!(
            failed(a.after(true, AttemptError::NotTaken, true)),
            "upstream closed the connection"
        );

        // Closed after the upstream may have read it: only an idempotent, whole request.
        let mut a = Attempts::default();
        assert_eq!(
            failed(a.after(true, AttemptError::Closed, false)),
            "upstream closed the connection before answering"
        );
        let mut a = Attempts::default();
        assert!(a.after(true, AttemptError::Closed, true).is_ok());

        // A new connection that fails is the upstream's failure, never retried.
        let mut a = Attempts::default();
        assert!(a.after(false, AttemptError::Closed, true).is_err());
        assert!(a.after(false, AttemptError::NotTaken, true).is_err());
        assert!(a.may_reuse());

        // Any other failure stands, whoever's it is.
        let mut a = Attempts::default();
        let stalled = AttemptError::from(ClientError::Stalled);
        assert!(matches!(
            a.after(true, stalled, true),
            Err(ExchangeError::Client(ClientError::Stalled))
        ));
    }

    #[test]
    fn what_a_failure_answers_says_whose_it_is() {
        let timeout = UpstreamError::timed_out(TimedOut::Answer);
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            timeout.detail,
            "no response head within the response timeout"
        );
        assert_eq!(
            UpstreamError::protocol("x").status(),
            StatusCode::BAD_GATEWAY
        );
        let local = UpstreamError {
            local: Some(LocalFailure::Resources),
            ..UpstreamError::new(UpstreamFailure::Connect, "out of descriptors")
        };
        assert_eq!(local.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ClientError::Gone.answer(), None);
        assert_eq!(
            ClientError::Stalled.answer(),
            Some((
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time"
            ))
        );
        assert_eq!(
            ClientError::Malformed("malformed chunked body".into()).answer(),
            Some((StatusCode::BAD_REQUEST, "malformed chunked body"))
        );
    }

    #[test]
    fn a_failure_counts_against_its_version_and_the_routers_own_against_nobody() {
        let metrics = crate::recorder::Metrics::new("i".into(), 0);
        let recorder = metrics.new_recorder();
        let service = metrics.service_id("default").unwrap();
        let target = UpstreamUrl::parse("http://127.0.0.1:1").unwrap();
        let started = Instant::now();
        let e = UpstreamError::new(UpstreamFailure::Connect, "connect: refused");
        let (status, text) =
            count_failure(&recorder, service, Version::Canary, &target, &e, started);
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(text, "canary upstream http://127.0.0.1:1: connect: refused");
        let local = UpstreamError {
            local: Some(LocalFailure::Resources),
            ..UpstreamError::new(
                UpstreamFailure::Connect,
                "the router cannot open a connection",
            )
        };
        let (status, text) = count_failure(
            &recorder,
            service,
            Version::Canary,
            &target,
            &local,
            started,
        );
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, "coalmine router: the router cannot open a connection");
        count_broken_answer(
            &recorder,
            service,
            Version::Stable,
            UpstreamFailure::Body,
            Duration::ZERO,
        );
        let all = metrics.snapshot([]);
        let s = &all.services["default"];
        assert_eq!(
            s.versions[1].statuses[&502], 1,
            "the router's own is not the canary's"
        );
        assert_eq!(s.versions[1].failures[UpstreamFailure::Connect as usize], 1);
        assert_eq!(all.local_failures["resources"], 1);
        assert_eq!(s.versions[0].statuses[&502], 1);
        assert_eq!(s.versions[0].failures[UpstreamFailure::Body as usize], 1);
    }
}
