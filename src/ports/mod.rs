//! Port publishing: every piece that makes a host port reach a guest
//! server.
//!
//! - [`spec`](PortSpec): the rule grammar shared by `-p`, `rnet port add`
//!   and the control socket, and what publishing reports back.
//! - [`api`]: the control socket (slirp4netns's JSON protocol), which adds,
//!   lists and removes rules while the network runs.
//! - [`auto`]: `--publish-auto`, which follows the namespace's listening
//!   sockets and publishes them as they appear.
//! - [`splice`]: the fast path's flow, two kernel sockets joined with
//!   splice(2).
//! - `listeners` (crate-private): `Publisher`, the
//!   rules and their host listeners, the published-UDP client table and the
//!   hairpin lookup; the `Command`s other threads send.
//! - `fastpath` (crate-private): `FastPath`, the
//!   exchange with the agent that opens the fast path's guest sockets.
//! - the engine's `ports` glue turns what these two decide into flows of
//!   the loop's slab (accepted connections, datagrams both ways); it stays
//!   with the engine because it works on the flow table.
//!
//! # Theory of operation
//!
//! Each published host port is a listening socket in the event loop. An
//! accepted TCP connection becomes a flow whose smoltcp socket connects to
//! the guest *from the client's own address and port*, so the guest server
//! sees the real client (a client on the host's loopback appears as the
//! gateway, which is the only address the guest can answer). A UDP datagram
//! is delivered the same way, and the guest's answers, addressed to that
//! client, are matched back to the listener they came in on and sent from
//! it. This is the "stack" path; it needs no privilege and no helper inside
//! the namespace.
//!
//! The "fast" path carries IPv4 TCP connections without the stack: an agent
//! inside the guest's namespaces opens the guest-side socket (transparently
//! bound to the client's address, so the server still sees the real
//! client) and hands it to rnet, which joins it to the accepted connection
//! with splice(2) ([`splice`]). Whenever the agent is not ready,
//! connections take the stack path.
//!
//! The guest reaches rnet's own published ports at the gateway or at the
//! host's addresses (hairpin, as a home router's NAT loopback): such a
//! connection or datagram is sent to the listener over the host's loopback
//! and comes back in as a published one.
//!
//! Requests from other threads (the control socket, `--publish-auto`, the
//! library's handle) reach the loop through [`PortControl`], which the
//! library's handle implements: the modules here never name the handle.

pub mod api;
pub mod auto;
pub(crate) mod fastpath;
pub(crate) mod listeners;
mod spec;
pub mod splice;

pub use spec::{IfName, PortError, PortInfo, PortSpec, PortSpecError, Proto};

/// What port publishing asks of a running network: the narrow interface the
/// control socket and `--publish-auto` drive (implemented by
/// [`crate::Handle`]).
pub trait PortControl: Send + Sync {
    /// Publishes a rule (host port 0: the kernel picks one, which the
    /// answer shows).
    fn add_port(&self, spec: PortSpec) -> Result<PortInfo, PortError>;
    /// Withdraws a rule by id; live connections are left to finish.
    fn remove_port(&self, id: u64) -> Result<(), PortError>;
    /// The rules published now.
    fn ports(&self) -> Result<Vec<PortInfo>, PortError>;
    /// The status report (see [`crate::status`]).
    fn status(&self) -> Result<serde_json::Value, PortError>;
    /// Whether the network still runs.
    fn is_running(&self) -> bool;
}
