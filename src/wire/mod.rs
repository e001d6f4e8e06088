//! Frames on the wire, as views and builders, with no state of their own.
//!
//! - [`classify`]: the first look at every guest frame (validation and the
//!   verdict saying who handles it); the only parser of untrusted bytes
//!   before a handler.
//! - [`emit`]: the frames rnet builds itself (UDP datagrams, ICMP and
//!   ICMPv6 messages, neighbour and router advertisements).

pub mod classify;
pub mod emit;
