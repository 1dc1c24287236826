//! hyper on the hub's own runtime: the smol `LocalExecutor` that runs
//! every connection, smol timers, and the byte-stream adapters between
//! `futures-io` (what futures-rustls speaks) and `hyper::rt`.
//!
//! Written here rather than taken from hyper-util, which is built around
//! tokio: the hub is one thread on smol, and hyper needs only these three
//! small traits.
//!
//! Not here: TLS, deadlines of the HTTP exchange (`server`, `limits`).

use smol::LocalExecutor;
use smol::io::{AsyncRead, AsyncWrite};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

thread_local! {
    /// The executor of the thread serving the hub (set by `server::serve`).
    static EXECUTOR: RefCell<Option<Rc<LocalExecutor<'static>>>> = const { RefCell::new(None) };
}

/// Makes `ex` the executor [`spawn`] and hyper use on this thread.
pub fn set_executor(ex: Rc<LocalExecutor<'static>>) {
    EXECUTOR.with(|e| *e.borrow_mut() = Some(ex));
}

/// Spawns a task on the hub's executor. The caller owns the task:
/// dropping it cancels the future (the drop guard of a response body
/// that a client abandoned).
pub fn spawn<T: 'static>(f: impl Future<Output = T> + 'static) -> smol::Task<T> {
    EXECUTOR.with(|e| match &*e.borrow() {
        Some(ex) => ex.spawn(f),
        // Only `serve` runs handlers, and it sets the executor first. A
        // caller without one gets an executor of its own on this thread,
        // whose tasks run only if something runs it: a misuse that waits
        // rather than panics.
        None => {
            let ex = Rc::new(LocalExecutor::new());
            let t = ex.spawn(f);
            *e.borrow_mut() = Some(ex);
            t
        }
    })
}

/// A client connection of the hub.
pub type Tls = futures_rustls::server::TlsStream<crate::socket::Socket>;

/// Sets `TCP_NOTSENT_LOWAT` on a tunnel's socket: the tunnel's scheduler,
/// not the kernel's send buffer, decides what crosses the link next (see
/// `crate::driver`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn tunnel_socket(tls: &Tls) -> io::Result<()> {
    socket2::SockRef::from(tls.get_ref().0.get_ref()).set_tcp_notsent_lowat(crate::driver::TUNNEL_NOTSENT_LOWAT)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn tunnel_socket(_: &Tls) -> io::Result<()> {
    Ok(())
}

/// hyper's executor: HTTP/2 streams run as tasks on the hub's thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exec;

impl<F: Future + 'static> hyper::rt::Executor<F> for Exec
where
    F::Output: 'static,
{
    fn execute(&self, fut: F) {
        // Detached: hyper owns the stream's lifetime through the
        // connection state it shares with this task; the task ends when
        // the stream does. Spawned as it is: an `async move` around it
        // moved the stream's future (10 KB, with the request's route)
        // once more per request.
        spawn(fut).detach();
    }
}

/// hyper's timer: smol timers (keep-alive pings, header read timeout).
#[derive(Clone, Copy, Debug, Default)]
pub struct Time;

struct Sleep(smol::Timer);

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

impl hyper::rt::Sleep for Sleep {}

impl hyper::rt::Timer for Time {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep(smol::Timer::after(d)))
    }
    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep(smol::Timer::at(at)))
    }
    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, at: Instant) {
        *sleep = self.sleep_until(at);
    }
}

/// See [`Io::with_head_deadline`].
struct HeadDeadline {
    d: Duration,
    active: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    /// `started` when the head began.
    seen: usize,
    /// When the first byte of a head not yet complete arrived.
    since: Option<Instant>,
    /// Armed only once a read finds nothing while a head is incomplete.
    /// A head that arrives whole (nearly every one) is parsed before the
    /// next read, so it costs no timer: each timer insert wakes
    /// async-io's poller (an eventfd write and read, and an
    /// `epoll_pwait`), 3 of the hub's syscalls per request.
    timer: Option<smol::Timer>,
}

impl HeadDeadline {
    /// After a read of `n` bytes (`None`: none ready).
    fn poll(&mut self, cx: &mut Context<'_>, n: Option<usize>) -> Poll<io::Result<()>> {
        let started = self.started.load(Ordering::Relaxed);
        if self.active.load(Ordering::Relaxed) > 0 || started != self.seen {
            self.timer = None;
            self.since = None;
            self.seen = started;
            if self.active.load(Ordering::Relaxed) > 0 {
                return Poll::Pending;
            }
        }
        match n {
            Some(n) => {
                if n > 0 && self.since.is_none() {
                    self.since = Some(Instant::now());
                }
            }
            None => {
                if let Some(since) = self.since {
                    let timer = self.timer.get_or_insert_with(|| smol::Timer::at(since + self.d));
                    if Pin::new(timer).poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received in time",
                        )));
                    }
                }
            }
        }
        Poll::Pending
    }
}

/// Largest read handed to hyper at once.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The buffer every [`Io`] on this thread reads through, zeroed once.
    /// A fresh zeroed array per read was 16 KiB of `memset` per poll,
    /// also for the polls that find nothing: 7 % of the hub's
    /// instructions per proxied request. One buffer per thread, not per
    /// connection, keeps idle connections small.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// A `futures-io` byte stream as `hyper::rt` IO. `into_inner` gives the
/// stream back after an upgrade (`hyper::upgrade::Upgraded::downcast`).
///
/// Reads go through a buffer of the thread's: `#![forbid(unsafe_code)]`
/// rules out reading into hyper's uninitialised buffer directly. It is one copy of
/// at most 16 KiB per TLS read, on HTTP traffic only: an upgraded tunnel
/// gets the TLS stream itself back.
pub struct Io<T> {
    inner: T,
    /// HTTP/1.1's head deadline, when set.
    head: Option<HeadDeadline>,
    /// How long a write may wait on a client that does not read.
    stall: Option<Duration>,
    /// Armed while a write waits.
    stalled: Option<smol::Timer>,
}

impl<T> Io<T> {
    pub fn new(inner: T) -> Self {
        Io { inner, head: None, stall: None, stalled: None }
    }

    /// Fails a read (and so the connection) once `d` has passed since the
    /// first byte of a request head that is still incomplete. `active`
    /// counts the connection's requests in flight: bytes that arrive while
    /// it is zero start a head, and `started` (requests begun) moving on
    /// means that head arrived. (hyper's own `header_read_timeout` starts
    /// when it begins waiting, which would close every kept-alive HTTP/1.1
    /// connection after `d` instead of after the idle timeout.)
    pub fn with_head_deadline(mut self, d: Duration, active: Arc<AtomicUsize>, started: Arc<AtomicUsize>) -> Self {
        self.head = Some(HeadDeadline { d, active, started, seen: 0, since: None, timer: None });
        self
    }

    /// Fails a write (and so the connection) that could not progress for
    /// `d`: a client that stops reading (a slow read) must not hold what
    /// the hub has queued for it. Over HTTP/2 a stalled stream is held by
    /// flow control instead, which does not stop the socket.
    pub fn with_write_stall(mut self, d: Duration) -> Self {
        self.stall = Some(d);
        self
    }

    /// `Pending` from a write: arms the stall timer, or says it went off.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(d) = self.stall else { return Poll::Pending };
        let timer = self.stalled.get_or_insert_with(|| smol::Timer::after(d));
        match Pin::new(timer).poll(cx) {
            Poll::Ready(_) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading its answer")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
    pub fn into_inner(self) -> T {
        self.inner
    }
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> hyper::rt::Read for Io<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(READ_CHUNK);
        let this = &mut *self;
        let read = READ_BUF.with(|tmp| match tmp.try_borrow_mut() {
            Ok(mut tmp) => match Pin::new(&mut this.inner).poll_read(cx, &mut tmp[..want]) {
                Poll::Ready(Ok(n)) => {
                    buf.put_slice(&tmp[..n]);
                    Poll::Ready(Ok(n))
                }
                other => other,
            },
            // Not reached (a read does not read another `Io`), but safe.
            Err(_) => {
                let mut tmp = vec![0u8; want];
                let r = Pin::new(&mut this.inner).poll_read(cx, &mut tmp);
                if let Poll::Ready(Ok(n)) = r {
                    buf.put_slice(&tmp[..n]);
                }
                r
            }
        });
        match read {
            Poll::Ready(Ok(n)) => {
                if let Some(h) = &mut this.head {
                    let _ = h.poll(cx, Some(n));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match &mut this.head {
                Some(h) => h.poll(cx, None),
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for Io<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.stalled(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.stalled(cx).map_ok(|_| ()),
            done => {
                self.stalled = None;
                done
            }
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stalled(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}
