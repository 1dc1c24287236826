//! Tunnel protocol v1, sans-IO: the frame codec and the multiplexer state
//! machine. No sockets, no clock, no async; see [`mux`] for the session
//! and stream rules and `PROTOCOL.md` next to this file for the wire
//! format.

pub mod codec;
pub mod frame;
pub mod mux;
pub mod sched;

pub use codec::{DecodeError, Decoder, EncodeError, InputBuf};
pub use frame::*;
pub use mux::{AgentInfo, Config, Event, Mux, SessionError, StreamError};

#[cfg(test)]
mod tests;
