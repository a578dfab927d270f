//! The connection layer in front of hyper: caps on concurrent connections
//! (per client address and in total), the JSON form of the error answers
//! hyper writes by itself, and a lingering close after such an error.
//!
//! # Caps
//!
//! [`ConnectionCaps::admit`] is called by the accept loop for every new
//! connection, before any task is spawned for it: a connection over a cap
//! gets a fixed `503 connections` JSON answer written with one
//! non-blocking write (no task, no buffer of its own) and is closed at
//! once. An admitted connection holds a [`Admitted`] guard until it ends.
//! Addresses are grouped as for the rate limits
//! ([`crate::ratelimit::bucket_key`]: an IPv6 address counts for its /64).
//!
//! # Error answers hyper writes itself
//!
//! hyper answers a request it cannot parse (malformed request line or
//! header, a head larger than its limit, ...) by itself, before our
//! service sees anything, with a bare status line and `content-length: 0`.
//! [`Io`] wraps the TCP stream given to hyper and recognises those
//! answers: a head alone in one write (the server disables vectored
//! writes, so hyper writes each answer in one buffer), with an error
//! status and `content-length: 0`, and neither `content-type` nor
//! `x-request-id` (every answer of our own service has both: its errors are
//! JSON). It writes the API's JSON error answer instead, and marks the
//! connection for a lingering close.
//!
//! # Lingering close
//!
//! After such an error hyper drops the connection with the rest of the
//! request unread; closing a socket with unread data makes the kernel send
//! a reset, which may destroy the answer before the client reads it. So
//! the connection task shuts down the sending side (the answer and then a
//! FIN go out) and reads and discards what the client still sends, for at
//! most [`LINGER`] and [`LINGER_BYTES`], before closing.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::ratelimit::bucket_key;

/// Longest a connection is read (and what is read discarded) after an
/// error answer hyper made, before it is closed.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and discarded during a lingering close.
pub(crate) const LINGER_BYTES: usize = 1024 * 1024;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The relay holds its total of connections.
    Total,
    /// The client's address holds its share.
    Address,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// The connection caps of one server.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    /// Most connections in total (0: no cap).
    total: usize,
    /// Most connections per client address (0: no cap).
    per_address: usize,
    open: Mutex<Open>,
}

/// An admitted connection: counted until dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    caps: Arc<ConnectionCaps>,
    key: IpAddr,
}

impl ConnectionCaps {
    pub(crate) fn new(total: usize, per_address: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            total,
            per_address,
            open: Mutex::new(Open::default()),
        })
    }

    // Plain counters: a panic while holding the lock cannot leave them
    // inconsistent, so poisoning is ignored.
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new connection from `ip`, unless a cap is reached.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let key = bucket_key(ip);
        let mut open = self.lock();
        if self.total > 0 && open.total >= self.total {
            return Err(Refused::Total);
        }
        let mine = open.per_address.entry(key).or_insert(0);
        if self.per_address > 0 && *mine >= self.per_address {
            return Err(Refused::Address);
        }
        *mine += 1;
        open.total += 1;
        Ok(Admitted {
            caps: Arc::clone(self),
            key,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    /// Addresses with connections open now.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.lock().per_address.len()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.per_address.get_mut(&self.key) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.per_address.remove(&self.key);
            }
        }
    }
}

/// Refuses a connection over a cap: drains what already arrived (so that
/// closing does not reset the connection before the answer is read),
/// writes `answer` if the socket takes it at once, and closes. Never waits.
pub(crate) fn refuse(stream: TcpStream, answer: &[u8]) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = stream.try_write(answer);
}

/// Makes the JSON answer for an error status hyper answered by itself (see
/// the module docs); `None` keeps hyper's.
pub(crate) type Rewrite = Arc<dyn Fn(u16) -> Option<Vec<u8>> + Send + Sync>;

/// The TCP stream as hyper sees it (see the module docs).
pub(crate) struct Io {
    stream: Arc<TcpStream>,
    rewrite: Rewrite,
    /// A JSON answer replacing one of hyper's, and how much of it is
    /// written.
    replacement: Option<(Vec<u8>, usize)>,
    /// Set once an answer was replaced: the connection ends with a
    /// lingering close.
    errored: Arc<AtomicBool>,
}

impl Io {
    /// Wraps `stream`; returns the flag telling that an error answer was
    /// replaced (and the connection must linger).
    pub(crate) fn new(stream: Arc<TcpStream>, rewrite: Rewrite) -> (Self, Arc<AtomicBool>) {
        let errored = Arc::new(AtomicBool::new(false));
        (
            Io {
                stream,
                rewrite,
                replacement: None,
                errored: Arc::clone(&errored),
            },
            errored,
        )
    }

    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written >= bytes.len() {
                self.replacement = None;
                break;
            }
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(&bytes[*written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.stream.poll_read_ready(cx))?;
            match this.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        if let Some(json) = canned_error_status(buf).and_then(|status| (this.rewrite)(status)) {
            this.errored.store(true, Ordering::Relaxed);
            this.replacement = Some((json, 0));
            // Taken whole: the replacement goes out on the next write or
            // flush (hyper flushes after every answer).
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            ready!(this.stream.poll_write_ready(cx))?;
            match this.stream.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_replacement(cx)
    }

    /// Writes what is pending; the socket itself is closed (or shut down
    /// for a lingering close) by the connection task once hyper lets go
    /// of it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_replacement(cx)
    }
}

/// The status of an error answer hyper made by itself (see the module
/// docs), or `None` for anything else.
pub(crate) fn canned_error_status(buf: &[u8]) -> Option<u16> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if head_end + 4 != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("x-request-id") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            empty = value.trim() == "0";
        }
    }
    empty.then_some(status)
}

/// Ends a connection whose error answer was replaced (see the module
/// docs): shuts down the sending side, then reads and discards for at most
/// [`LINGER`] and [`LINGER_BYTES`].
pub(crate) async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 16 * 1024];
    let mut read = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while read < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hypers_bare_error_answers() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                          date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n";
        assert_eq!(canned_error_status(hyper_431), Some(431));
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(canned_error_status(hyper_400), Some(400));
        // Ours: JSON, with a request id.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     x-request-id: 1\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(canned_error_status(ours), None);
        let ours_head_only = b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\
                               x-request-id: 1\r\n\r\n";
        assert_eq!(canned_error_status(ours_head_only), None);
        // Successes, bodies after the head, partial heads.
        assert_eq!(
            canned_error_status(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert_eq!(
            canned_error_status(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx"),
            None
        );
        assert_eq!(
            canned_error_status(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"),
            None
        );
        assert_eq!(canned_error_status(b"\x00\x01"), None);
    }

    #[test]
    fn caps_per_address_and_in_total() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = caps.admit(a).unwrap();
        let a2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).unwrap_err(), Refused::Address);
        let b1 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).unwrap_err(), Refused::Total);
        assert_eq!(caps.open(), 3);
        drop(a1);
        assert_eq!(caps.open(), 2);
        let a3 = caps.admit(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!((caps.open(), caps.addresses()), (0, 0));
        // IPv6 addresses count for their /64.
        let caps = ConnectionCaps::new(0, 1);
        let _x = caps.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            caps.admit("2001:db8::2".parse().unwrap()).unwrap_err(),
            Refused::Address
        );
        assert!(caps.admit("2001:db8:0:1::2".parse().unwrap()).is_ok());
    }
}
