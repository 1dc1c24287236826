//! uplink connects Kubernetes clusters that live anywhere to one central
//! hub through a single outbound TLS connection made by a tiny agent.
//!
//! ```text
//!  people ── kubectl / browser / REST ──► uplink-hub ◄── one TLS tunnel ── uplink (agent) ──► API server
//! ```
//!
//! Two binaries come from this crate: `uplink` (the agent, built with
//! `--no-default-features`, static and single-threaded) and `uplink-hub`
//! (the control plane, feature `hub`). What both need lives at the top
//! level; the agent never links what only the hub needs.
//!
//! Module map, shared by both binaries:
//! - [`proto`]: the sans-IO tunnel protocol, frame codec and multiplexer
//!   state machine. Not sockets, clocks or async.
//! - [`driver`]: runs a [`proto::Mux`] over any async byte stream on a
//!   single-threaded smol executor. Not dialling, TLS or reconnecting.
//! - [`socket`]: a TCP stream that skips the reads it knows would find
//!   nothing (waits for readiness after a short read). Not dialling or TLS.
//! - [`tls`]: rustls client and server configurations (webpki roots,
//!   private CA, public-key pins). Not dialling or certificate generation.
//! - [`http`]: HTTP/1.1 rules the agent and the hub share (hop-by-hop
//!   and list-valued fields, the one accepted `Content-Length`, chunk
//!   framing, percent-decoding). Not I/O or
//!   reading loops: the agent keeps its own client; the hub's server is
//!   hyper (`hub::server`, `hub::rt`), with its request and response
//!   types in `hub::http`.
//! - [`kube_status`]: the Kubernetes `Status` failure object both answer
//!   their own errors with. Not which code or reason an error gets.
//! - [`time`]: RFC 3339 date-times to and from Unix milliseconds (hub
//!   timestamps, the activation's expiry). Not a clock or time zones.
//! - [`names`]: which user and group names can travel in `Impersonate-*`
//!   fields (any string Kubernetes accepts, but no control characters),
//!   checked by the hub and again by the agent. Not quoting names in
//!   URLs or YAML, nor what a cluster grants them.
//! - [`secret`]: secret strings with a redacted `Debug`, constant-time
//!   comparison. Not storage or hashing policy.
//!
//! One binary each:
//! - [`agent`]: the agent (`uplink`): activation, persisted state, tunnels
//!   (one per hub replica), impersonating kube proxy, health. Not anything
//!   the hub runs.
//! - `hub` (feature `hub`): the control plane behind `uplink-hub`: store
//!   (SQLite, or PostgreSQL shared by several replicas), replica rows and
//!   the hand-off of a request to the replica holding its tunnel,
//!   auth and grants (hub tokens, the organisation's OIDC provider), REST
//!   API, tunnel sessions, kube front end, the fleet view (one read to
//!   many clusters, merged), console, connection caps and deadlines
//!   (`hub::limits`). Never linked into the agent.
//! - `render` (feature `hub`): the Kubernetes manifest, systemd activation
//!   file and cleanup instructions the hub hands out for a cluster. Not
//!   name validation or applying anything.
#![forbid(unsafe_code)]
pub mod agent;
pub mod driver;
pub mod http;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kube_status;
pub mod names;
pub mod proto;
#[cfg(feature = "hub")]
pub mod render;
pub mod secret;
pub mod socket;
pub mod time;
pub mod tls;
