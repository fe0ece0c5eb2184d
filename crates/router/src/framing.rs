//! Request-smuggling guard for HTTP/1.1.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` the RFC 9112
//! way (chunked wins, the length is dropped, the connection closes afterwards), which leaves no
//! trace in the parsed request. A front proxy should refuse such a request outright, so this
//! wrapper watches the raw request head as it is read and tells the handler what it saw.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const ARMED: u8 = 1;
const SAW_CONTENT_LENGTH: u8 = 2;
const SAW_TRANSFER_ENCODING: u8 = 4;

/// What the wrapper saw in the head of the request being handled.
#[derive(Clone, Default)]
pub struct HeadFlags(Arc<AtomicU8>);

impl HeadFlags {
    pub fn new() -> Self {
        HeadFlags(Arc::new(AtomicU8::new(ARMED)))
    }

    /// True when the last head read carried both framing headers. Re-arms for the next head.
    pub fn take_both_framing_headers(&self) -> bool {
        let seen = self.0.swap(ARMED, Relaxed);
        seen & (SAW_CONTENT_LENGTH | SAW_TRANSFER_ENCODING)
            == SAW_CONTENT_LENGTH | SAW_TRANSFER_ENCODING
    }

    /// Scans freshly read bytes while armed; disarms at the blank line that ends the head, so
    /// bodies are not scanned.
    fn scan(&self, bytes: &[u8]) {
        let mut state = self.0.load(Relaxed);
        if state & ARMED == 0 {
            return;
        }
        for i in memchr::memchr_iter(b'\n', bytes) {
            let line = &bytes[i + 1..];
            if line.first() == Some(&b'\r') || line.first() == Some(&b'\n') {
                state &= !ARMED;
                break;
            }
            if starts_with_ignore_case(line, b"content-length:") {
                state |= SAW_CONTENT_LENGTH;
            } else if starts_with_ignore_case(line, b"transfer-encoding:") {
                state |= SAW_TRANSFER_ENCODING;
            }
        }
        self.0.store(state, Relaxed);
    }
}

fn starts_with_ignore_case(haystack: &[u8], prefix: &[u8]) -> bool {
    haystack.len() >= prefix.len() && haystack[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// A client connection as hyper reads it: first the bytes the HTTP/1.1 fast path already read
/// from it (`read`), then the socket; all of it scanned by [`HeadFlags`].
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

    #[test]
    fn flags_both_framing_headers_in_one_head_only() {
        let f = HeadFlags::new();
        f.scan(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(f.take_both_framing_headers());
        f.scan(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\ncontent-length: 1\r\n");
        assert!(
            !f.take_both_framing_headers(),
            "body text after the head is not scanned"
        );
        f.scan(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd");
        assert!(!f.take_both_framing_headers());
    }
}
