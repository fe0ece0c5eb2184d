//! A raw HTTP/1.1 client on a plain socket: exactly the bytes a test writes, and each response
//! read as the client sees it, broken ones included.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::Router;

/// One client connection that reads responses one at a time.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A response as the client saw it: the head's text (lowercase) and the decoded body.
pub struct Answer {
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }
}

/// Why a response could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Broken {
    /// The connection ended (or was reset) before any byte of a response.
    NoAnswer,
    /// The connection ended (or was reset) after the response had begun.
    MidAnswer,
}

impl Conn {
    pub fn open(router: &Router) -> Conn {
        Conn::to(router.base.trim_start_matches("http://"))
    }

    /// A connection to `addr` (`host:port`).
    pub fn to(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// More bytes into the buffer; false at end of stream or a reset.
    fn more(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n > 0
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read from the router: {e}"),
        }
    }

    fn try_take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.more() {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    fn try_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.try_take(i + 2)?;
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if !self.more() {
                return None;
            }
        }
    }

    /// The next response; `head_request` when it answers a HEAD.
    pub fn answer(&mut self, head_request: bool) -> Answer {
        self.try_answer(head_request).expect("a whole response")
    }

    /// The next response, or how it broke.
    pub fn try_answer(&mut self, head_request: bool) -> Result<Answer, Broken> {
        let mut head = String::new();
        loop {
            let line = match self.try_line() {
                Some(line) => line,
                None if head.is_empty() && self.buf.is_empty() => return Err(Broken::NoAnswer),
                None => return Err(Broken::MidAnswer),
            };
            if line.is_empty() {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
            head.push('\n');
        }
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        };
        let status: u16 = head[9..12].parse().unwrap();
        let broken = Broken::MidAnswer;
        let body = if head_request || status < 200 || status == 204 || status == 304 {
            Vec::new()
        } else if header("transfer-encoding").as_deref() == Some("chunked") {
            let mut body = Vec::new();
            loop {
                let size_line = self.try_line().ok_or(Broken::MidAnswer)?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap(), 16).unwrap();
                if size == 0 {
                    while !self.try_line().ok_or(Broken::MidAnswer)?.is_empty() {}
                    break;
                }
                body.extend(self.try_take(size).ok_or(Broken::MidAnswer)?);
                assert_eq!(self.try_take(2).ok_or(Broken::MidAnswer)?, b"\r\n");
            }
            body
        } else if let Some(n) = header("content-length") {
            self.try_take(n.parse().unwrap()).ok_or(broken)?
        } else {
            while self.more() {}
            std::mem::take(&mut self.buf)
        };
        Ok(Answer { head, body })
    }

    /// True when the router closes the connection within `within` (nothing else arriving).
    pub fn closes_within(&mut self, within: Duration) -> bool {
        self.stream.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }
}
