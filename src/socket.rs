//! A TCP stream for the single-threaded event loop that does not ask the
//! kernel for bytes it knows are not there yet.
//!
//! `smol::Async<TcpStream>` tries a `recv` on every poll and only waits
//! for readiness when that fails with `WouldBlock`. On our event loops a
//! reading future is polled far more often than its socket turns
//! readable: the tunnel driver's reader is polled whenever the writer is
//! woken (every frame any stream queues), a proxied request's body read
//! is raced with the tunnel stream's close, and TLS reads again after each
//! record. Each such poll was a `recv` returning `EAGAIN`: about five per
//! proxied request on the agent, a quarter of its syscalls.
//!
//! [`Socket`] remembers when a read found the kernel's receive queue
//! empty (`WouldBlock`) and then waits for the reactor's readiness event
//! before reading again. That wait is
//! `Async::poll_readable`: a check of the reactor's tick, and an
//! `epoll_ctl` to arm the one-shot interest when none is armed, which the
//! failed `recv` needed too. Level-triggered readiness makes this safe:
//! bytes that arrive after the empty read, even before the interest is
//! armed, make the armed interest fire at once.
//!
//! The agent's tunnel also takes a short read right after a readiness
//! wait as the queue emptied ([`Socket::short_reads_after_wait_drain`]):
//! that read took one burst of frames, and the `recv` after it found
//! nothing, once per request at one client.
//!
//! A connection that goes idle between requests (the agent's pool of
//! API-server connections) is watched instead ([`Socket::watch_idle`]):
//! read interest is armed when it goes idle, so the first read of the
//! next answer waits for its readiness event rather than finding the
//! queue empty. Per reused connection that saves a failed `recv` and an
//! `epoll_ctl`. (Whether the server closed it is still a `peek`: the
//! reactor's silence is not proof, see `agent::net::Io::idle_alive`;
//! a bodiless GET on a connection used within the second skips it
//! and is retried on a fresh connection instead, see
//! `agent::http1::Pool::get_replayable`.)
//!
//! [`Prefixed`] puts bytes read past an upgrade's answer head back in
//! front of the stream.
//!
//! Not here: dialling, TLS, deadlines. Writes go straight to
//! `Async<TcpStream>` (they nearly always succeed at once).

use smol::Async;
use smol::io::{AsyncRead, AsyncWrite};
use std::io::{self, Read};
use std::net::TcpStream;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

/// A non-blocking TCP stream that reads only when it may have bytes.
#[derive(Debug)]
pub struct Socket {
    io: Async<TcpStream>,
    /// The last read emptied the receive queue: wait for readiness first.
    drained: bool,
    /// Take a short read as the queue emptied ([`Socket::short_reads_drain`]).
    short_reads_drain: bool,
    /// The same, for the first read after a readiness wait only
    /// ([`Socket::short_reads_after_wait_drain`]).
    short_reads_after_wait_drain: bool,
    /// The next read is the first since a readiness wait.
    woke: bool,
}

impl Socket {
    pub fn new(io: Async<TcpStream>) -> Socket {
        Socket { io, drained: false, short_reads_drain: false, short_reads_after_wait_drain: false, woke: false }
    }

    /// Whether a read that filled less than the buffer counts as having
    /// emptied the receive queue, so the next read waits for readiness.
    /// Right where a peer sends a request and then waits for the answer
    /// (the hub's client connections): the read after each request found
    /// nothing, a `recv` per request. Wrong for a stream that keeps
    /// coming (a tunnel's download), where the next bytes are usually
    /// there by the next poll; so off by default, and turned off again
    /// when the hub switches a connection to raw bytes.
    pub fn short_reads_drain(&mut self, on: bool) {
        self.short_reads_drain = on;
    }

    /// Whether a short read right after a readiness wait counts as having
    /// emptied the queue. Such a read took all the peer had sent since
    /// the queue was last empty: one burst (a request, a batch of
    /// frames), after which a `recv` at once would find nothing; the
    /// agent's tunnel paid that `recv` once per request at one client. A
    /// stream that keeps coming is left alone: its first read after a
    /// wait fills the buffer, and its short reads later on are not
    /// marked.
    pub fn short_reads_after_wait_drain(&mut self, on: bool) {
        self.short_reads_after_wait_drain = on;
    }

    /// For a connection going idle: arms read interest now (with a waker
    /// that does nothing) and marks the queue empty, so the first read
    /// after the next request waits for the answer's readiness event,
    /// whose interest is already armed, instead of a `recv` that would
    /// find nothing yet.
    pub fn watch_idle(&mut self) {
        // Ready: the reactor already reported bytes or the end; the next
        // read finds out which.
        self.drained = self.io.poll_readable(&mut Context::from_waker(Waker::noop())).is_pending();
    }

    pub fn get_ref(&self) -> &TcpStream {
        self.io.get_ref()
    }
}

impl From<Async<TcpStream>> for Socket {
    fn from(io: Async<TcpStream>) -> Socket {
        Socket::new(io)
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.drained {
                ready!(this.io.poll_readable(cx))?;
                this.drained = false;
                this.woke = true;
            }
            match (&mut this.io.get_ref()).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.drained = true,
                // By default not marked after a short read, though it
                // usually empties the queue: during a download the next
                // bytes are often there by the next poll, and waiting for
                // the reactor to say so cost a fifth of the bulk rate (e2e
                // bench).
                Ok(n) => {
                    let short = n < buf.len();
                    this.drained =
                        short && (this.short_reads_drain || (this.short_reads_after_wait_drain && this.woke));
                    this.woke = false;
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

/// A byte stream with some bytes already read from it put back in front:
/// the agent's tunnel and the hubs' peer hop after their HTTP/1.1 upgrade,
/// and every connection the hub switches (`hub::http::Upgraded`: the bytes
/// hyper read past the request head).
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    io: T,
}

impl<T> Prefixed<T> {
    /// `prefix` is read first (the bytes that came after an upgrade's
    /// answer head, read with it), then `io`.
    pub fn new(prefix: Vec<u8>, io: T) -> Prefixed<T> {
        Prefixed { prefix, pos: 0, io }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.len());
            buf[..n].copy_from_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use std::net::TcpListener;

    /// Every mode of marking the queue empty still sees every byte: those
    /// that come while the reader waits, those that came before it read,
    /// and the end.
    #[test]
    fn reads_what_arrives_after_an_empty_read_and_the_end() {
        for (short, after_wait) in [(false, false), (true, false), (false, true)] {
            reads_everything(short, after_wait);
        }
    }

    fn reads_everything(short_reads_drain: bool, after_wait: bool) {
        smol::block_on(async {
            let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
            let addr = listener.get_ref().local_addr().unwrap();
            let client = Async::<TcpStream>::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let mut reader = Socket::new(client);
            reader.short_reads_drain(short_reads_drain);
            reader.short_reads_after_wait_drain(after_wait);
            let mut writer = Socket::new(server);
            let mut buf = [0u8; 64];
            writer.write_all(b"first").await.unwrap();
            assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
            // Nothing more: the reader waits, and is woken by what comes.
            let late = async {
                smol::Timer::after(std::time::Duration::from_millis(20)).await;
                writer.write_all(b"later").await.unwrap();
            };
            let (n, ()) = smol::future::zip(reader.read(&mut buf), late).await;
            assert_eq!(n.unwrap(), 5);
            // Bytes that arrive while nobody waits are still seen.
            writer.write_all(b"second").await.unwrap();
            smol::Timer::after(std::time::Duration::from_millis(20)).await;
            assert_eq!(reader.read(&mut buf).await.unwrap(), 6);
            assert_eq!(&buf[..6], b"second");
            // A burst after a wait, read short: the next one comes still.
            let late = async {
                smol::Timer::after(std::time::Duration::from_millis(20)).await;
                writer.write_all(b"burst").await.unwrap();
            };
            let (n, ()) = smol::future::zip(reader.read(&mut buf), late).await;
            assert_eq!(n.unwrap(), 5);
            writer.write_all(b"next").await.unwrap();
            assert_eq!(reader.read(&mut buf).await.unwrap(), 4);
            // A full read does not mark it: the rest comes without a wait.
            writer.write_all(&[7u8; 100]).await.unwrap();
            smol::Timer::after(std::time::Duration::from_millis(20)).await;
            assert_eq!(reader.read(&mut buf).await.unwrap(), 64);
            assert_eq!(reader.read(&mut buf).await.unwrap(), 36);
            drop(writer);
            assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
            assert_eq!(reader.read(&mut buf).await.unwrap(), 0, "the end stays readable");
        });
    }

    #[test]
    fn prefixed_reads_prefix_first() {
        smol::block_on(async {
            use smol::io::AsyncReadExt as _;
            let mut p = Prefixed::new(b"ab".to_vec(), smol::io::Cursor::new(b"cd".to_vec()));
            let mut out = Vec::new();
            p.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, b"abcd");
        });
    }
}
