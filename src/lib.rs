//! uplink connects Kubernetes clusters that live anywhere to one central
//! hub through a single outbound TLS connection made by a tiny agent.
//!
//! ```text
//!  people ── kubectl / browser / REST ──► uplink-hub ◄── one TLS tunnel ── uplink (agent) ──► API server
//! ```
//!
//! Module map:
//! - [`proto`]: the sans-IO tunnel protocol (frame codec and multiplexer
//!   state machine). No sockets, no clock, no async.
//! - [`driver`]: runs a [`proto::Mux`] over any async byte stream on a
//!   single-threaded smol executor; both binaries use it.
//! - [`http`]: HTTP/1.1 rules the agent and the hub share (hop-by-hop
//!   and list-valued fields, chunk framing, percent-decoding). No I/O,
//!   no reading loops: each side keeps its own.
//! - [`kube_status`]: the Kubernetes `Status` failure object both sides
//!   answer their own errors with. Not which code an error gets.
//! - [`time`]: RFC 3339 date-times to and from Unix milliseconds (hub
//!   timestamps, the activation's expiry). No clock, no time zones.
//! - [`tls`]: rustls client and server configurations (webpki roots,
//!   private CA, public-key pins).
//! - [`secret`]: redacted secret strings, constant-time comparison.
//! - [`agent`]: the agent (`uplink`): activation, state, tunnel, kube proxy.
//! - `hub` (feature `hub`): the control plane behind `uplink-hub`; the
//!   agent binary never links it.
//! - `render` (hub only): the Kubernetes manifest, systemd activation
//!   file and cleanup instructions the hub hands out for a cluster.
#![forbid(unsafe_code)]
pub mod agent;
pub mod driver;
pub mod http;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kube_status;
pub mod proto;
#[cfg(feature = "hub")]
pub mod render;
pub mod secret;
pub mod time;
pub mod tls;
