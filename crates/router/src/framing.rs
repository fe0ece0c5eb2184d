//! HTTP/1.1 message framing, strictly: where a head ends, what a `Content-Length` is, where a
//! chunked body ends. Both request paths read framing through here, so they agree with each
//! other and refuse what a server behind them might read differently (request smuggling).
//!
//! It also holds the hyper path's smuggling guard. hyper resolves a request carrying both
//! `Content-Length` and `Transfer-Encoding` the RFC 9112 way (chunked wins, the length is
//! dropped, the connection closes afterwards), which leaves no trace in the parsed request. A
//! front proxy should refuse such a request outright, so [`Watched`] follows the request stream
//! hyper reads — every head, whatever the read boundaries, and over each body to the next head —
//! and [`HeadFlags`] tells the handler, request by request, what each head carried.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a head ends: after the first empty line (CRLF or a bare LF, as httparse accepts).
pub(crate) fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|i| match &bytes[i + 1..] {
        [b'\n', ..] => Some(i + 2),
        [b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// A Content-Length value: digits only.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The comma-separated tokens of a header value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `tchar` of RFC 9110 §5.6.2: what a header name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes (responses only).
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadChunk;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    /// Whitespace after the size, which only a `;` may follow.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Finds where a chunked body ends without changing it (RFC 9112 §7.1): sizes in hex (at most
/// 16 digits), extensions passed over, trailer lines checked as header fields, CRLF required
/// everywhere. Anything looser is refused, since a proxy and a server reading a body
/// differently is how requests get smuggled.
#[derive(Debug)]
pub(crate) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

impl Chunked {
    pub(crate) fn new() -> Self {
        Chunked {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes the next stretch of chunk data from `bytes`: how many bytes it went through
    /// (sizes, extensions, line ends, trailers) and where in `bytes` that data is; the range
    /// is empty when `bytes` ends before any data (or the body ends).
    pub(crate) fn data(&mut self, bytes: &[u8]) -> Result<(usize, Range<usize>), BadChunk> {
        let mut i = 0;
        while i < bytes.len() && !self.is_done() {
            if self.state == ChunkState::Data {
                let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.scan(&bytes[i..i + n])?;
                return Ok((i + n, i..i + n));
            }
            // The framing between data, a byte at a time: a few bytes per chunk.
            i += self.scan(&bytes[i..i + 1])?;
        }
        Ok((i, i..i))
    }

    /// How many of `bytes` belong to the body: all of them until its end is found.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Size => match (b as char).to_digit(16) {
                    Some(d) if self.digits < 16 => {
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                        Size
                    }
                    None if self.digits > 0 && b == b';' => Extension,
                    None if self.digits > 0 && matches!(b, b' ' | b'\t') => SizeSpace,
                    None if self.digits > 0 && b == b'\r' => SizeLf,
                    _ => return Err(BadChunk),
                },
                SizeSpace => match b {
                    b' ' | b'\t' => SizeSpace,
                    b';' => Extension,
                    _ => return Err(BadChunk),
                },
                Extension => match b {
                    b'\r' => SizeLf,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => Extension,
                    _ => return Err(BadChunk),
                },
                SizeLf if b == b'\n' && self.size == 0 => TrailerStart,
                SizeLf if b == b'\n' => Data,
                Data => {
                    // Data is skipped over whole, not looked at byte by byte.
                    let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= n as u64;
                    i += n;
                    self.state = if self.size == 0 { DataCr } else { Data };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => {
                    self.digits = 0;
                    Size
                }
                TrailerStart if b == b'\r' => EndLf,
                TrailerStart | TrailerName if is_token_byte(b) => TrailerName,
                TrailerName if b == b':' => TrailerValue,
                TrailerValue => match b {
                    b'\r' => TrailerLf,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => TrailerValue,
                    _ => return Err(BadChunk),
                },
                TrailerLf if b == b'\n' => TrailerStart,
                EndLf if b == b'\n' => {
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
                _ => return Err(BadChunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

// ---------------------------------------------------------------------------------------------
// The hyper path's guard

/// Where the request stream hyper reads stands.
enum Stream {
    /// Reading a head; its bytes so far are in `head`.
    Head,
    Length(u64),
    Chunked(Chunked),
    /// Past something hyper refuses (and then closes), or not HTTP/1 (HTTP/2's preface).
    Lost,
}

struct Follower {
    stream: Stream,
    head: Vec<u8>,
    max_head: usize,
    /// Per head read and not yet taken by the handler: did it carry both framing headers?
    both: VecDeque<bool>,
}

impl Follower {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.stream {
                Stream::Lost => return,
                Stream::Length(left) => {
                    let n = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.stream = Stream::Head;
                    }
                }
                Stream::Chunked(c) => match c.scan(bytes) {
                    Ok(n) => {
                        bytes = &bytes[n..];
                        if c.is_done() {
                            self.stream = Stream::Head;
                        }
                    }
                    Err(BadChunk) => self.stream = Stream::Lost,
                },
                Stream::Head => {
                    // The end may straddle the previous read: look from a little before it.
                    let from = self.head.len().saturating_sub(2);
                    let before = self.head.len();
                    self.head.extend_from_slice(bytes);
                    match head_end(&self.head[from..]) {
                        Some(end) => {
                            let end = from + end;
                            bytes = &bytes[end - before..];
                            self.stream = self.judge(end);
                            self.head.clear();
                        }
                        None => {
                            if self.head.len() > self.max_head {
                                self.stream = Stream::Lost;
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Records what the head in `self.head[..len]` carried and says how its body is framed.
    fn judge(&mut self, len: usize) -> Stream {
        let mut storage = [const { MaybeUninit::<httparse::Header>::uninit() }; 256];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(&self.head[..len], &mut storage) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Stream::Lost,
        }
        let mut length = None;
        let mut chunked = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = Some(content_length(h.value));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = Some(
                    tokens(h.value)
                        .last()
                        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")),
                );
            }
        }
        self.both.push_back(length.is_some() && chunked.is_some());
        match (chunked, length) {
            (Some(true), _) => Stream::Chunked(Chunked::new()),
            // hyper refuses these.
            (Some(false), _) | (None, Some(None)) => Stream::Lost,
            (None, Some(Some(n))) if n > 0 => Stream::Length(n),
            _ => Stream::Head,
        }
    }
}

/// What the guard saw in the request heads of one connection, handed to the handler in order.
#[derive(Clone)]
pub struct HeadFlags(Arc<Mutex<Follower>>);

impl HeadFlags {
    /// Heads longer than `max_head` are refused by hyper; the guard stops following there.
    pub fn new(max_head: usize) -> Self {
        HeadFlags(Arc::new(Mutex::new(Follower {
            stream: Stream::Head,
            head: Vec::new(),
            max_head,
            both: VecDeque::new(),
        })))
    }

    /// True when the next request hyper hands over carried both framing headers. Call once per
    /// HTTP/1 request, in order.
    pub fn take_both_framing_headers(&self) -> bool {
        self.0
            .lock()
            .map(|mut f| f.both.pop_front().unwrap_or(false))
            .unwrap_or(false)
    }

    fn scan(&self, bytes: &[u8]) {
        if let Ok(mut f) = self.0.lock() {
            f.feed(bytes);
        }
    }
}

/// A client connection as hyper reads it: first the bytes the HTTP/1.1 fast path already read
/// from it (`read`), then the socket; all of it followed by [`HeadFlags`].
pub struct Watched<T> {
    inner: T,
    flags: HeadFlags,
    read: Bytes,
}

impl<T> Watched<T> {
    pub fn new(inner: T, flags: HeadFlags, read: Bytes) -> Self {
        Watched { inner, flags, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = if self.read.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.read.len().min(buf.remaining());
            let replayed = self.read.split_to(n);
            buf.put_slice(&replayed);
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = polled {
            self.flags.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut c = Chunked::new();
        let n = c.scan(body)?;
        Ok((n, c.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nGET /next";
        assert_eq!(scan_all(body), Ok((body.len() - 9, true)));
        for ok in [
            &b"0\r\nx-sum: 1\r\ny:2\r\n\r\n"[..],
            b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
            b"0\r\nx-empty:\r\n\r\n",
        ] {
            assert_eq!(scan_all(ok), Ok((ok.len(), true)), "{ok:?}");
        }
        // Split anywhere inside, it ends in the same place.
        for split in 0..body.len() - 9 {
            let mut c = Chunked::new();
            let a = c.scan(&body[..split]).unwrap();
            assert_eq!(a, split);
            let b = c.scan(&body[split..]).unwrap();
            assert_eq!(a + b, body.len() - 9, "split at {split}");
            assert!(c.is_done());
        }
    }

    /// Decodes `body` fed in pieces of `piece` bytes: the data, and where the body ended.
    fn decode(body: &[u8], piece: usize) -> Result<(Vec<u8>, usize), BadChunk> {
        let (mut c, mut data, mut at) = (Chunked::new(), Vec::new(), 0);
        while !c.is_done() && at < body.len() {
            let end = (at + piece).min(body.len());
            let mut part = &body[at..end];
            while !part.is_empty() && !c.is_done() {
                let (n, range) = c.data(part)?;
                data.extend_from_slice(&part[range]);
                at += n;
                part = &part[n..];
            }
        }
        Ok((data, at))
    }

    #[test]
    fn chunked_bodies_decode_to_their_data_however_they_arrive() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx: 1\r\n\r\nGET /next";
        for piece in 1..body.len() {
            assert_eq!(
                decode(body, piece),
                Ok((b"helloabcdefghijklmnopqrstuvwxyz".to_vec(), body.len() - 9)),
                "pieces of {piece}"
            );
        }
        assert_eq!(decode(b"5\r\nhelloX\r\n", 64), Err(BadChunk));
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"11111111111111111\r\n",
            b"5 6\r\nhello\r\n",
            b"0 1\r\n\r\n",
            b"0\r\nx: 1\n\r\n",
            b"0\r\n\n",
            b"0\r\nno-colon-here\r\n\r\n",
            b"0\r\nx-sum: a\0b\r\n\r\n",
            b"0\r\nx-sum: a\r\n b\r\n\r\n",
            b"0\r\nbad name: 1\r\n\r\n",
        ] {
            assert_eq!(scan_all(bad), Err(BadChunk), "{bad:?}");
        }
    }

    #[test]
    fn heads_end_at_the_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nrest"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(content_length(b"42"), Some(42));
        for bad in [&b""[..], b"+1", b"1 2", b"0x10", b"99999999999999999999"] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
    }

    /// Feeds `stream` to a guard in reads cut at `cuts`, then takes one flag per request.
    fn flags(stream: &[u8], cuts: &[usize], requests: usize) -> Vec<bool> {
        let f = HeadFlags::new(64 * 1024);
        let mut at = 0;
        for &cut in cuts.iter().chain([stream.len()].iter()) {
            f.scan(&stream[at..cut]);
            at = cut;
        }
        (0..requests)
            .map(|_| f.take_both_framing_headers())
            .collect()
    }

    #[test]
    fn both_framing_headers_are_seen_in_every_head_whatever_the_reads() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
            POST /c HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            GET /d HTTP/1.1\r\nX-Note: content-length: 1\r\n\r\n";
        let expected = vec![false, false, true, false];
        assert_eq!(flags(stream, &[], 4), expected, "one read");
        for cut in 1..stream.len() {
            assert_eq!(flags(stream, &[cut], 4), expected, "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(flags(stream, &every_byte, 4), expected, "a byte per read");
    }

    #[test]
    fn the_guard_stops_following_what_hyper_refuses() {
        // HTTP/2's preface, then anything: no flags, never a false alarm.
        assert_eq!(
            flags(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\n",
                &[],
                1
            ),
            [false]
        );
    }
}
