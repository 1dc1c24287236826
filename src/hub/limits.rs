//! How much the hub gives a client before it has proved who it is: the
//! deadlines for a connection's unauthenticated work and the caps on
//! connections, in total and per client address.
//!
//! ```text
//!  accept ─► Gate::admit(addr) ──over a cap──► 503 + Retry-After, close
//!               │ Ticket (counts toward the total, and toward its
//!               │         address while pending)
//!               ▼
//!  TLS handshake ≤ handshake ─► first byte ≤ idle ─► whole head ≤ head
//!               ─► credential valid? ─► Ticket::authenticated()
//!                  (no longer counts toward its address)
//!               ─► small in-memory body (activation, REST JSON, a body
//!                  left unread): progress every ≤ body_stall, all of it
//!                  ≤ small_body
//!               ─► proxied kube stream, agent tunnel: no deadline here
//! ```
//!
//! Why per address only while pending, and only once lingering: the
//! per-address cap is there so one host cannot hold every slot with
//! connections that never say who they are. Connections that proved a
//! credential are bounded by the people and agents the hub knows, and a
//! fleet of agents behind one NAT (hundreds of tunnels from one address)
//! must not be cut off by it. Nor must that fleet's redial burst after a
//! hub restart: a thousand handshakes from one address queue behind each
//! other for a moment. So a connection counts toward its address's cap
//! only after it has waited [`PENDING_GRACE`] without authenticating: a
//! burst of quick clients passes, connections that linger are capped.
//! (Measured with 1,000 simulated agents redialling a restarted hub from
//! one address: a plain cap of 128 doubled the time until all were back,
//! 9 s to 17.6 s.) The price: an address can pass its cap by what it
//! opens within one grace period; the total cap and the deadlines still
//! bound it. IPv6 clients are counted per /64, the block one subscriber
//! is usually given.
//!
//! Why deadlines never touch a proxied stream: a watch, `logs -f`, exec
//! or an agent's tunnel is idle by nature and belongs to someone the hub
//! already authenticated; the API server and the tunnel's keepalive
//! bound those.
//!
//! The policy is here, apart from the HTTP code that applies it
//! (`server`, `http`), so that it survives a change of HTTP library.
//!
//! Not here: reading requests, TLS, the 503's bytes on the wire.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Connections held at once, all kinds. Each costs a file descriptor and
/// a TLS session (tens of KiB); the hub lowers it at start to fit the
/// process's open-file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Connections one client address may hold that have waited
/// [`PENDING_GRACE`] without authenticating. kubectl opens a handful, a
/// browser six or so.
pub const DEFAULT_MAX_PENDING_PER_ADDRESS: usize = 128;
/// From accept to a finished TLS handshake.
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);
/// From a request head's first byte to its last.
pub const DEFAULT_HEAD: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may wait for its next request.
/// Below the 90 s after which Go's client (kubectl) drops idle ones.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Longest pause inside a small body read into memory.
pub const DEFAULT_BODY_STALL: Duration = Duration::from_secs(10);
/// Longest time to read a whole small body (activation: 64 KiB, REST
/// JSON: 1 MiB).
pub const DEFAULT_SMALL_BODY: Duration = Duration::from_secs(30);
/// How long a connection may wait to authenticate before it counts
/// toward its address's cap (see the module docs).
pub const PENDING_GRACE: Duration = Duration::from_secs(2);
/// What the 503 of a refused connection asks clients to wait, in seconds.
/// client-go retries a 503 with `Retry-After` by itself (up to ten
/// times), so a kubectl caught by a full hub waits instead of failing.
pub const RETRY_AFTER_SECS: u32 = 2;
/// Refusals in flight (handshake + 503) at once; past this, refused
/// connections are closed without a word, so refusing stays cheap under
/// a flood.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refusal may take, handshake included.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);
/// File descriptors kept back from the connection budget: the listener,
/// the database and its WAL, logs, stdio.
const FD_RESERVE: usize = 64;

/// The limits one hub applies. `serve` flags set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_per_address: usize,
    pub handshake: Duration,
    pub head: Duration,
    pub idle: Duration,
    pub body_stall: Duration,
    pub small_body: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_per_address: DEFAULT_MAX_PENDING_PER_ADDRESS,
            handshake: DEFAULT_HANDSHAKE,
            head: DEFAULT_HEAD,
            idle: DEFAULT_IDLE,
            body_stall: DEFAULT_BODY_STALL,
            small_body: DEFAULT_SMALL_BODY,
        }
    }
}

impl Limits {
    /// These limits with `max_connections` lowered to what `open_files`
    /// (the soft `RLIMIT_NOFILE`) leaves after a reserve: past it,
    /// `accept` fails with EMFILE and nobody gets even a 503.
    pub fn fit_open_files(mut self, open_files: Option<usize>) -> Self {
        if let Some(n) = open_files {
            self.max_connections = self.max_connections.min(n.saturating_sub(FD_RESERVE).max(1));
        }
        self
    }

    /// How an in-memory body must keep moving.
    pub fn body_pace(&self) -> Pace {
        Pace { stall: self.body_stall, total: self.small_body }
    }
}

/// The soft open-file limit of this process (Linux: `/proc/self/limits`).
pub fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How a body read into memory must progress: some bytes at least every
/// `stall`, all of it within `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub stall: Duration,
    pub total: Duration,
}

/// A duration flag: `10s`, `500ms`, `2m`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl FromStr for Timeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration such as 10s, 500ms or 2m"))?;
        let d = match unit {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n * 60),
            _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
        };
        if d.is_zero() {
            return Err(format!("{s:?}: a timeout must be more than zero"));
        }
        Ok(Timeout(d))
    }
}

/// The flag's value, else the environment variable's, else `default`.
pub fn setting<T: FromStr<Err = E>, E: fmt::Display>(flag: Option<T>, env: &str, default: T) -> Result<T, String> {
    if let Some(v) = flag {
        return Ok(v);
    }
    match std::env::var(env) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e| format!("{env}={v:?}: {e}")),
        _ => Ok(default),
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The hub holds `max_connections` already.
    Total,
    /// This client address holds `max_pending_per_address` connections
    /// that have waited [`PENDING_GRACE`] and not authenticated.
    PerAddress,
}

impl Refused {
    /// What the 503 says; the same words go to the log.
    pub fn message(self, limits: &Limits) -> String {
        match self {
            Refused::Total => format!(
                "uplink-hub is at its connection limit ({}); retry in {RETRY_AFTER_SECS} s",
                limits.max_connections
            ),
            Refused::PerAddress => format!(
                "uplink-hub holds {} connections from your address that have not authenticated yet; \
                 finish or close some and retry in {RETRY_AFTER_SECS} s",
                limits.max_pending_per_address
            ),
        }
    }
}

/// The key a client address is counted under: IPv4 addresses (also when
/// mapped into IPv6) as they are, IPv6 addresses by their /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Per address, when each of its unauthenticated connections came.
    pending: HashMap<IpAddr, Vec<Instant>>,
    refusing: usize,
}

/// Connection accounting for one listener: who may come in, and how many
/// are in. Single-threaded, like the hub.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    counts: Rc<RefCell<Counts>>,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Gate { limits, counts: Default::default() }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Lets a new connection from `ip` in, or says which cap it meets.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, Refused> {
        self.admit_at(ip, Instant::now())
    }

    /// [`Gate::admit`] at `now`.
    pub fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<Ticket, Refused> {
        let mut c = self.counts.borrow_mut();
        let key = address_key(ip);
        if c.total >= self.limits.max_connections {
            return Err(Refused::Total);
        }
        let pending = c.pending.entry(key).or_default();
        // Bounded by the cap plus one grace period's arrivals.
        let lingering = pending.iter().filter(|&&t| now.saturating_duration_since(t) >= PENDING_GRACE).count();
        if lingering >= self.limits.max_pending_per_address {
            return Err(Refused::PerAddress);
        }
        pending.push(now);
        c.total += 1;
        Ok(Ticket { counts: self.counts.clone(), key, since: now, pending: true })
    }

    /// A slot to answer one refused connection in, while fewer than
    /// [`MAX_REFUSALS_IN_FLIGHT`] are being answered.
    pub fn refusal_slot(&self) -> Option<RefusalSlot> {
        let mut c = self.counts.borrow_mut();
        if c.refusing >= MAX_REFUSALS_IN_FLIGHT {
            return None;
        }
        c.refusing += 1;
        Some(RefusalSlot { counts: self.counts.clone() })
    }

    /// Connections held now: (all, not yet authenticated).
    pub fn open(&self) -> (usize, usize) {
        let c = self.counts.borrow();
        (c.total, c.pending.values().map(Vec::len).sum())
    }

    /// Distinct client addresses with unauthenticated connections.
    pub fn pending_addresses(&self) -> usize {
        self.counts.borrow().pending.len()
    }
}

/// One admitted connection; dropping it gives its slot back.
#[derive(Debug)]
pub struct Ticket {
    counts: Rc<RefCell<Counts>>,
    key: IpAddr,
    /// When it was admitted: its entry in the address's pending list.
    since: Instant,
    pending: bool,
}

impl Ticket {
    /// Whether the connection has not proved a credential yet.
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// The connection proved a credential: it stops counting toward its
    /// address's cap (it still counts toward the total).
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.pending) {
            release_pending(&mut self.counts.borrow_mut(), self.key, self.since);
        }
    }
}

fn release_pending(c: &mut Counts, key: IpAddr, since: Instant) {
    if let Some(list) = c.pending.get_mut(&key) {
        if let Some(i) = list.iter().position(|&t| t == since) {
            list.swap_remove(i);
        }
        if list.is_empty() {
            c.pending.remove(&key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.counts.borrow_mut();
        c.total -= 1;
        if self.pending {
            release_pending(&mut c, self.key, self.since);
        }
    }
}

/// One refusal being answered; dropping it frees the slot.
#[derive(Debug)]
pub struct RefusalSlot {
    counts: Rc<RefCell<Counts>>,
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.counts.borrow_mut().refusing -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_in_total_and_per_pending_address() {
        let gate = Gate::new(Limits { max_connections: 4, max_pending_per_address: 2, ..Limits::default() });
        let t0 = Instant::now();
        let later = t0 + PENDING_GRACE;
        let a1 = gate.admit_at(ip("10.0.0.1"), t0).unwrap();
        let mut a2 = gate.admit_at(ip("10.0.0.1"), t0).unwrap();
        // Two that have lingered past the grace fill the address's cap.
        assert_eq!(gate.admit_at(ip("10.0.0.1"), later).unwrap_err(), Refused::PerAddress);
        // Authenticated connections leave the address's count...
        a2.authenticated();
        assert!(!a2.is_pending());
        let a3 = gate.admit_at(ip("10.0.0.1"), later).unwrap();
        assert_eq!(gate.open(), (3, 2));
        // ...but not the total.
        let b1 = gate.admit_at(ip("10.0.0.2"), later).unwrap();
        assert_eq!(gate.admit_at(ip("10.0.0.3"), later).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(gate.open(), (3, 2));
        let c1 = gate.admit_at(ip("10.0.0.3"), later).unwrap();
        drop((a2, a3, b1, c1));
        assert_eq!(gate.open(), (0, 0));
        assert_eq!(gate.pending_addresses(), 0);
    }

    #[test]
    fn a_burst_within_the_grace_passes_the_address_cap() {
        let gate = Gate::new(Limits { max_pending_per_address: 2, ..Limits::default() });
        let t0 = Instant::now();
        // A fleet redialling from one address: all new, none lingering.
        let burst: Vec<_> = (0..100).map(|_| gate.admit_at(ip("10.0.0.1"), t0).unwrap()).collect();
        assert_eq!(gate.open(), (100, 100));
        let soon = t0 + PENDING_GRACE / 2;
        assert!(gate.admit_at(ip("10.0.0.1"), soon).is_ok());
        // The same hundred still unauthenticated after the grace: capped.
        assert_eq!(gate.admit_at(ip("10.0.0.1"), t0 + PENDING_GRACE).unwrap_err(), Refused::PerAddress);
        drop(burst);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let gate = Gate::new(Limits { max_pending_per_address: 1, ..Limits::default() });
        let (t0, later) = (Instant::now(), Instant::now() + PENDING_GRACE);
        let _a = gate.admit_at(ip("2001:db8:1:2::1"), t0).unwrap();
        assert_eq!(gate.admit_at(ip("2001:db8:1:2:ffff::9"), later).unwrap_err(), Refused::PerAddress);
        let _b = gate.admit_at(ip("2001:db8:1:3::1"), later).unwrap();
        let _c = gate.admit_at(ip("192.0.2.7"), t0).unwrap();
        assert_eq!(gate.admit_at(ip("::ffff:192.0.2.7"), later).unwrap_err(), Refused::PerAddress);
    }

    #[test]
    fn refusals_in_flight_are_bounded() {
        let gate = Gate::new(Limits::default());
        let slots: Vec<_> = (0..MAX_REFUSALS_IN_FLIGHT).map(|_| gate.refusal_slot().unwrap()).collect();
        assert!(gate.refusal_slot().is_none());
        drop(slots);
        assert!(gate.refusal_slot().is_some());
    }

    #[test]
    fn settings_and_timeouts() {
        assert_eq!("10s".parse::<Timeout>().unwrap().0, Duration::from_secs(10));
        assert_eq!("250ms".parse::<Timeout>().unwrap().0, Duration::from_millis(250));
        assert_eq!("2m".parse::<Timeout>().unwrap().0, Duration::from_secs(120));
        assert_eq!("7".parse::<Timeout>().unwrap().0, Duration::from_secs(7));
        for bad in ["", "s", "0", "+5s", "5h", "1.5s", "-1"] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad:?}");
        }
        assert_eq!(setting(Some(3usize), "UPLINK_TEST_UNSET_SETTING", 9), Ok(3));
        assert_eq!(setting(None::<usize>, "UPLINK_TEST_UNSET_SETTING", 9), Ok(9));
    }

    #[test]
    fn connection_budget_fits_open_files() {
        let l = Limits::default().fit_open_files(Some(1024));
        assert_eq!(l.max_connections, 1024 - FD_RESERVE);
        assert_eq!(Limits::default().fit_open_files(Some(1 << 20)).max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(Limits::default().fit_open_files(None).max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(Limits::default().fit_open_files(Some(10)).max_connections, 1);
    }
}
