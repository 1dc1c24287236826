//! Dialling: URLs, TCP with `TCP_NODELAY`, HTTP CONNECT through a proxy
//! read from the environment as curl reads it, and TLS with our rustls
//! configurations.
//!
//! Every network wait here has a deadline ([`dial_timeout`]): the TCP
//! connect, the proxy's CONNECT answer and the TLS handshake each, so a
//! peer that accepts and then says nothing (a black hole, a wedged server)
//! costs one deadline, never the kernel's minutes. An expired wait is an
//! [`io::ErrorKind::TimedOut`] error that names the hop.
//!
//! Deadlines share one reactor timer per thread ([`Expiry`]): a timer of
//! its own per request cost the reactor a wake-up each.
//!
//! Name resolution is a blocking `getaddrinfo` on the one thread. It runs
//! only when the hub is (re)dialled, when no stream is live, and for API
//! servers named by host name (in-cluster and k3s use IP literals); the
//! kube pool caches its addresses so a busy proxy does not resolve per
//! connection.

use crate::secret::Secret;
use crate::socket::Socket;
use base64::Engine as _;
use futures_rustls::TlsConnector;
use futures_rustls::client::TlsStream;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use smol::Async;
use smol::future::FutureExt as _;
use smol::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Default for [`dial_timeout`].
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`response_timeout`]: the API server's own default request
/// timeout, so a slow but working request is never cut by the agent first.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long each step of a dial may take: TCP connect, a proxy's CONNECT
/// answer, the TLS handshake, and the hub's answer to the tunnel request.
/// `UPLINK_DIAL_TIMEOUT` (e.g. `3s`) overrides [`DIAL_TIMEOUT`].
pub fn dial_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| env_duration("UPLINK_DIAL_TIMEOUT", DIAL_TIMEOUT))
}

/// How long the API server may take to send a response head. Bodies that
/// follow (watch, `logs -f`) are not bounded. `UPLINK_RESPONSE_TIMEOUT`
/// overrides [`RESPONSE_TIMEOUT`].
pub fn response_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| env_duration("UPLINK_RESPONSE_TIMEOUT", RESPONSE_TIMEOUT))
}

fn env_duration(name: &str, default: Duration) -> Duration {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => match crate::time::parse_duration(&v) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                log::warn!("{name}={v:?} is not a duration such as 10s; using {default:?}");
                default
            }
        },
        _ => default,
    }
}

/// `fut`, or a [`io::ErrorKind::TimedOut`] error saying that `what` took
/// longer than `limit`.
pub async fn deadline<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    fut.or(async {
        Expiry::after(limit).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, format!("{} timed out after {limit:?}", what())))
    })
    .await
}

/// A deadline on the one shared timer of this thread: resolves at its
/// instant (or a moment after).
///
/// Why not a `smol::Timer` each: async-io notifies its poller on every
/// timer it registers (an eventfd write, a read and one more
/// `epoll_wait`), and a proxied request armed two (the response head's
/// deadline and the body's stall check). Deadlines here are seconds long
/// and nearly always met, so they share one timer, armed at the earliest
/// one and moved only when an earlier one comes or it went off. With the
/// same limit for every request each new deadline is later than those
/// pending, so under load the timer moves about once per limit, not per
/// request. When it goes off it wakes every waiting deadline (they are
/// few: one per request in flight), and each checks its own instant.
pub struct Expiry {
    at: Instant,
    id: u64,
    /// A waker of this deadline's may be in the fan-out.
    registered: bool,
}

/// The shared timer's state; one per thread (the agent runs on one).
struct Clock {
    timer: smol::Timer,
    /// When `timer` is set to go off, if it is.
    armed: Option<Instant>,
    /// Every live [`Expiry`] not yet resolved.
    pending: BTreeSet<(Instant, u64)>,
    fanout: Arc<FanOut>,
    /// `fanout` as the waker the timer is polled with.
    waker: Waker,
    next_id: u64,
}

/// Wakes the tasks of every waiting deadline: the shared timer's waker.
/// A `Mutex`, since async-io may fire the timer on its helper thread. A
/// `BTreeMap`: the ids only grow, so an insert lands at the right edge,
/// and nothing is hashed.
#[derive(Default)]
struct FanOut(Mutex<BTreeMap<u64, Waker>>);

impl FanOut {
    fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        wakers.into_values().for_each(Waker::wake);
    }
}

impl Wake for FanOut {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}

thread_local! {
    static CLOCK: RefCell<Clock> = RefCell::new({
        let fanout = Arc::new(FanOut::default());
        Clock {
            timer: smol::Timer::never(),
            armed: None,
            pending: BTreeSet::new(),
            waker: Waker::from(fanout.clone()),
            fanout,
            next_id: 0,
        }
    });
}

impl Expiry {
    pub fn after(limit: Duration) -> Expiry {
        Expiry::at(Instant::now() + limit)
    }

    pub fn at(at: Instant) -> Expiry {
        CLOCK.with_borrow_mut(|c| {
            c.next_id += 1;
            c.pending.insert((at, c.next_id));
            Expiry { at, id: c.next_id, registered: false }
        })
    }

    fn forget(&self) {
        // `try_with`: an Expiry dropped while the thread's locals are torn down.
        let _ = CLOCK.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                c.pending.remove(&(self.at, self.id));
                if self.registered {
                    c.fanout.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
                }
            }
        });
    }
}

impl Future for Expiry {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.at {
            self.forget();
            return Poll::Ready(());
        }
        let this = self.get_mut();
        this.registered = true;
        let this = &*this;
        CLOCK.with_borrow_mut(|c| {
            {
                let mut wakers = c.fanout.0.lock().unwrap_or_else(PoisonError::into_inner);
                match wakers.get(&this.id) {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => {
                        wakers.insert(this.id, cx.waker().clone());
                    }
                }
            }
            // Deadlines already due whose tasks have not run yet: wake
            // them, rather than count on a timer that is moved past them.
            if c.pending.first().is_some_and(|&(t, _)| t <= now) {
                c.fanout.wake_all();
            }
            let next = c.pending.range((now, u64::MAX)..).next().map_or(this.at, |&(t, _)| t);
            c.arm(next, now);
        });
        Poll::Pending
    }
}

impl Clock {
    /// Sets the timer to go off at `next`, unless it already goes off
    /// earlier (and not yet by `now`), and registers it with the reactor
    /// under the fan-out waker (a no-op while it stays registered).
    fn arm(&mut self, next: Instant, now: Instant) {
        if self.armed.is_none_or(|a| next < a || a <= now) {
            self.armed = Some(next);
            self.timer.set_at(next);
        }
        let waker = self.waker.clone();
        if Pin::new(&mut self.timer).poll(&mut Context::from_waker(&waker)).is_ready() {
            // The instant passed after `now` was read: the timer reads the
            // clock again, and a poll that finds it due takes it out of
            // the reactor, so it will never go off there. Nothing else
            // wakes the waiting deadlines, so it is done here; each then
            // looks at its own instant and arms the timer again.
            self.armed = None;
            self.fanout.wake_all();
        }
    }
}

impl Drop for Expiry {
    fn drop(&mut self) {
        self.forget();
    }
}

/// Where to connect: scheme, host and port of an `http(s)://` URL, plus
/// the path prefix it carried (without a trailing slash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    pub path_prefix: String,
}

impl Target {
    /// Parses `https://host[:port][/prefix]` (or `http://`).
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        let (host, port) = split_host_port(authority).ok_or_else(|| format!("{url:?} has a bad host or port"))?;
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        Ok(Target { tls, host, port, path_prefix: path.trim_end_matches('/').to_string() })
    }

    /// The `Host` header value: the port only when it is not the default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if (self.tls && self.port == 443) || (!self.tls && self.port == 80) {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `host:port` with IPv6 brackets, as CONNECT wants it.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host (an IP literal needs no lookup).
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let addrs: Vec<_> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} resolved to no address", self.host)));
        }
        Ok(addrs)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.authority())
    }
}

/// Splits `host[:port]` / `[v6][:port]`.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), Some(p.parse().ok()?))),
        Some(_) => Some((s.to_string(), None)), // bare IPv6
        None => Some((s.to_string(), None)),
    }
}

/// A connection to a server: plain TCP or TLS over TCP.
/// Over [`Socket`], which skips the reads that would find nothing (the
/// event loop polls a reader far more often than bytes arrive).
pub enum Io {
    Plain(Socket),
    Tls(Box<TlsStream<Socket>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// TLS: sends close_notify, then shuts down the TCP write half, so the
    /// peer reads end-of-stream while this side can still read.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_close(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

impl Io {
    /// Keeps at most about `bytes` unsent in the kernel (`TCP_NOTSENT_LOWAT`,
    /// Linux; elsewhere a no-op): the tunnel's scheduler then decides
    /// what goes next, not a send buffer of megabytes.
    pub fn set_notsent_lowat(&self, bytes: u32) -> io::Result<()> {
        set_notsent_lowat(self.tcp(), bytes)
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s.get_ref(),
            Io::Tls(s) => s.get_ref().0.get_ref(),
        }
    }

    fn socket_mut(&mut self) -> &mut Socket {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_mut().0,
        }
    }

    /// See [`Socket::short_reads_after_wait_drain`]: for the tunnel.
    pub fn short_reads_after_wait_drain(&mut self, on: bool) {
        self.socket_mut().short_reads_after_wait_drain(on);
    }

    /// The connection goes idle (into a pool): see [`Socket::watch_idle`].
    pub fn watch_idle(&mut self) {
        self.socket_mut().watch_idle();
    }

    /// Whether an idle connection can still carry a request: the server
    /// has neither closed it nor sent anything unasked (which, on an idle
    /// HTTP/1.1 connection, is a close or an error). One non-blocking
    /// `peek`, always: the reactor's word that nothing came is not proof
    /// (an event delivered by another thread's reactor turn in the tick
    /// the interest was armed is not reported as new; a unit test handed
    /// out a closed connection that way). The pool skips it only for a
    /// request it can replay on a fresh connection
    /// (`http1::Pool::get_replayable`).
    pub fn idle_alive(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.tcp().peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// `TCP_NOTSENT_LOWAT` on a socket; a no-op where the option is missing.
pub fn set_notsent_lowat(tcp: &TcpStream, bytes: u32) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return socket2::SockRef::from(tcp).set_tcp_notsent_lowat(bytes);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (tcp, bytes);
        Ok(())
    }
}

/// Connects to the first address that answers, with `TCP_NODELAY` set.
pub async fn tcp_connect(addrs: &[SocketAddr]) -> io::Result<Async<TcpStream>> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for addr in addrs {
        match deadline(dial_timeout(), || format!("TCP connect to {addr}"), Async::<TcpStream>::connect(*addr)).await {
            Ok(s) => {
                s.get_ref().set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Wraps a TCP connection in TLS when the target wants it.
pub async fn tls_wrap(tcp: Async<TcpStream>, target: &Target, tls: Option<&Arc<ClientConfig>>) -> io::Result<Io> {
    tls_wrap_as(tcp, target, &target.host, tls).await
}

/// [`tls_wrap`], checking the certificate against `name` (and sending it
/// as SNI) rather than the target's host: a hub replica reached at its own
/// address presents the certificate of the hub's public name.
pub async fn tls_wrap_as(
    tcp: Async<TcpStream>,
    target: &Target,
    name: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> io::Result<Io> {
    if !target.tls {
        return Ok(Io::Plain(Socket::new(tcp)));
    }
    let config = tls.ok_or_else(|| io::Error::other("https target without a TLS configuration"))?;
    let name = ServerName::try_from(name.to_string())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a valid TLS name")))?;
    let handshake = TlsConnector::from(config.clone()).connect(name, Socket::new(tcp));
    let stream = deadline(dial_timeout(), || format!("TLS handshake with {target}"), handshake).await?;
    Ok(Io::Tls(Box::new(stream)))
}

/// An HTTP proxy for CONNECT tunnels.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub target: Target,
    /// `user:password` from the proxy URL, sent as Basic credentials.
    pub credentials: Option<Secret>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({})", self.target)
    }
}

/// The proxy settings of the environment, as curl reads them for an
/// `https://` URL: `https_proxy` then `HTTPS_PROXY`, then `all_proxy` /
/// `ALL_PROXY`; exceptions from `no_proxy` / `NO_PROXY`.
#[derive(Clone, Debug, Default)]
pub struct ProxyEnv {
    pub proxy: Option<String>,
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    pub fn from_env() -> Self {
        let get = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()));
        ProxyEnv {
            proxy: get(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]),
            no_proxy: get(&["no_proxy", "NO_PROXY"]),
        }
    }

    /// The proxy to use for `target`, if any.
    pub fn for_target(&self, target: &Target) -> Result<Option<Proxy>, String> {
        let Some(url) = &self.proxy else { return Ok(None) };
        if let Some(no) = &self.no_proxy {
            if no_proxy_matches(no, &target.host) {
                return Ok(None);
            }
        }
        parse_proxy(url).map(Some)
    }
}

/// Parses a proxy URL; a missing scheme means `http://` (curl does so).
pub fn parse_proxy(url: &str) -> Result<Proxy, String> {
    let url = url.trim();
    let full = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    if full.starts_with("https://") {
        return Err(format!("proxy {url:?}: only http:// proxies are supported"));
    }
    let rest = full.trim_start_matches("http://");
    let authority = rest.split('/').next().unwrap_or("");
    let credentials =
        authority.rsplit_once('@').map(|(userinfo, _)| Secret::new(crate::http::percent_decode(userinfo)));
    let mut target = Target::parse(&full).map_err(|e| format!("proxy URL: {e}"))?;
    if !authority.rsplit('@').next().unwrap_or("").contains(':') || authority.ends_with(']') {
        target.port = 1080; // curl's default proxy port
    }
    Ok(Proxy { target, credentials })
}

/// Whether `host` is excluded from proxying by a `NO_PROXY` list, with
/// curl's rules: entries separated by commas (or spaces); `*` alone
/// matches every host; a name matches itself and its subdomains, a leading
/// dot being optional (`example.com` and `.example.com` both match
/// `api.example.com` and `example.com`); an IP matches itself, a CIDR
/// (`10.0.0.0/8`) every address inside. Case-insensitive; a trailing
/// `:port` in an entry is ignored.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    let host_ip = host.parse::<IpAddr>().ok();
    for entry in no_proxy.split([',', ' ', '\t']).map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        if let Some(ip) = host_ip {
            if let Some((net, bits)) = entry.split_once('/') {
                let net = net.trim_start_matches('[').trim_end_matches(']');
                if let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) {
                    if cidr_contains(net, bits, ip) {
                        return true;
                    }
                }
                continue;
            }
            let bare = strip_port(&entry);
            if bare.parse::<IpAddr>().ok() == Some(ip) {
                return true;
            }
            continue;
        }
        let name = strip_port(&entry);
        let name = name.trim_start_matches('.').trim_end_matches('.');
        if name.is_empty() {
            continue;
        }
        if host == name
            || (host.len() > name.len() && host.ends_with(name) && host[..host.len() - name.len()].ends_with('.'))
        {
            return true;
        }
    }
    false
}

fn strip_port(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => entry,
    }
}

fn cidr_contains(net: IpAddr, bits: u32, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// Asks an HTTP proxy to open a tunnel to `target` (RFC 9110 §9.3.6).
pub async fn proxy_connect(proxy: &Proxy, target: &Target) -> io::Result<Async<TcpStream>> {
    let addrs = proxy.target.resolve()?;
    let mut tcp = tcp_connect(&addrs).await?;
    let hp = target.host_port();
    let mut req = format!("CONNECT {hp} HTTP/1.1\r\nHost: {hp}\r\n");
    if let Some(c) = &proxy.credentials {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.expose());
        req.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Read the answer byte by byte up to the blank line: nothing after it
    // may be consumed, it belongs to the TLS handshake.
    let answer = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "proxy answer head too long"));
            }
            if tcp.read(&mut byte).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "proxy closed the connection"));
            }
            head.push(byte[0]);
        }
        Ok(head)
    };
    let answer =
        deadline(dial_timeout(), || format!("proxy {}'s answer to CONNECT {hp}", proxy.target), answer).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&answer) {
        Ok(httparse::Status::Complete(_)) if resp.code.is_some_and(|c| (200..300).contains(&c)) => Ok(tcp),
        Ok(httparse::Status::Complete(_)) => Err(io::Error::other(format!(
            "proxy {} refused CONNECT to {hp}: {} {}",
            proxy.target,
            resp.code.unwrap_or(0),
            resp.reason.unwrap_or("")
        ))),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "proxy answered CONNECT with a malformed head")),
    }
}

/// Dials `target` (through `proxy` when given) and does the TLS handshake.
pub async fn dial(target: &Target, tls: Option<&Arc<ClientConfig>>, proxy: Option<&Proxy>) -> io::Result<Io> {
    dial_as(target, &target.host, tls, proxy).await
}

/// [`dial`], checking the certificate against `name` (see [`tls_wrap_as`]).
pub async fn dial_as(
    target: &Target,
    name: &str,
    tls: Option<&Arc<ClientConfig>>,
    proxy: Option<&Proxy>,
) -> io::Result<Io> {
    let tcp = match proxy {
        Some(p) => proxy_connect(p, target).await?,
        None => tcp_connect(&target.resolve()?).await?,
    };
    tls_wrap_as(tcp, target, name, tls).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn shared_deadlines_go_off_in_order_and_only_when_due() {
        smol::block_on(async {
            let start = Instant::now();
            // A long one first, then shorter ones: the timer moves earlier.
            let long = Expiry::after(Duration::from_secs(30));
            let order = Rc::new(RefCell::new(Vec::new()));
            let ex = smol::LocalExecutor::new();
            for ms in [120u64, 40, 80] {
                let order = order.clone();
                ex.spawn(async move {
                    Expiry::after(Duration::from_millis(ms)).await;
                    order.borrow_mut().push(ms);
                })
                .detach();
            }
            // One met before it expires does not keep others waiting.
            let met = deadline(Duration::from_secs(5), || "quick".into(), async { Ok(7) });
            ex.run(async {
                assert_eq!(met.await.unwrap(), 7);
                Expiry::after(Duration::from_millis(200)).await;
            })
            .await;
            assert_eq!(*order.borrow(), vec![40, 80, 120]);
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(5), "{took:?}");
            let e = deadline(Duration::from_millis(30), || "silence".into(), std::future::pending::<io::Result<()>>())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(e.to_string().contains("silence timed out after 30ms"), "{e}");
            drop(long);
            assert!(CLOCK.with_borrow(|c| c.pending.is_empty()), "every deadline forgotten once dropped");
        });
    }

    /// The race that left a request waiting forever (a frozen API
    /// server's TLS handshake, 2 runs in 29 of the faults test under
    /// load, none in 50 after): a deadline armed
    /// the timer for an instant that passed between its clock reading
    /// and the timer's own, and that timer poll's `Ready` was dropped.
    /// The clock reading is passed in here, so the race is not left to
    /// chance: the instant is due for the timer, not yet for `now`.
    #[test]
    fn a_timer_due_while_it_is_armed_still_wakes_the_deadlines() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(Default::default()));
        CLOCK.with_borrow_mut(|c| {
            c.fanout.0.lock().unwrap().insert(u64::MAX, Waker::from(count.clone()));
            let next = Instant::now();
            c.arm(next, next - Duration::from_micros(1));
            assert_eq!(c.armed, None, "a timer that went off is not counted as armed");
        });
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1, "the waiting deadline was not woken");
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("https://hub.example.com:8443/base/").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port, t.path_prefix.as_str()), (true, "hub.example.com", 8443, "/base"));
        assert_eq!(t.authority(), "hub.example.com:8443");
        let t = Target::parse("https://[::1]:6443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 6443));
        assert_eq!(t.host_port(), "[::1]:6443");
        let t = Target::parse("http://10.0.0.1").unwrap();
        assert_eq!((t.tls, t.port, t.authority()), (false, 80, "10.0.0.1".to_string()));
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("https://host:notaport").is_err());
    }

    #[test]
    fn no_proxy_follows_curl() {
        assert!(no_proxy_matches("*", "anything.example"));
        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("example.com", "api.example.com"));
        assert!(no_proxy_matches(".example.com", "api.example.com"));
        assert!(no_proxy_matches(".example.com", "example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(no_proxy_matches("foo, EXAMPLE.com", "Api.Example.Com"));
        assert!(no_proxy_matches("localhost,127.0.0.1", "127.0.0.1"));
        assert!(!no_proxy_matches("127.0.0.1", "127.0.0.2"));
        assert!(no_proxy_matches("10.0.0.0/8", "10.1.2.3"));
        assert!(!no_proxy_matches("10.0.0.0/8", "11.1.2.3"));
        assert!(no_proxy_matches("::1", "::1"));
        assert!(no_proxy_matches("fd00::/8", "fd12::1"));
        assert!(no_proxy_matches("hub.local:8443", "hub.local"));
        assert!(!no_proxy_matches("", "hub.local"));
        assert!(!no_proxy_matches("*.example.com", "api.other.com"));
    }

    #[test]
    fn proxy_urls() {
        let p = parse_proxy("proxy.corp:3128").unwrap();
        assert_eq!((p.target.host.as_str(), p.target.port, p.credentials.is_none()), ("proxy.corp", 3128, true));
        let p = parse_proxy("http://us%40er:p%3Ass@10.0.0.9:8080/").unwrap();
        assert_eq!(p.credentials.unwrap().expose(), "us@er:p:ss");
        assert_eq!(p.target.port, 8080);
        let p = parse_proxy("http://proxy").unwrap();
        assert_eq!(p.target.port, 1080);
        assert!(parse_proxy("https://proxy:443").is_err());
        let env = ProxyEnv { proxy: Some("http://p:3128".into()), no_proxy: Some("internal".into()) };
        assert!(env.for_target(&Target::parse("https://hub.internal").unwrap()).unwrap().is_none());
        assert!(env.for_target(&Target::parse("https://hub.example.com").unwrap()).unwrap().is_some());
    }
}
