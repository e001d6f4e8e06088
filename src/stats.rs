//! Counters the data plane keeps and any thread may read.
//!
//! The event loop is the only writer; counters are relaxed atomics so a
//! reader (the CLI, an embedder, the control socket) never blocks it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame or a flow was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Truncated or inconsistent headers.
    Malformed,
    /// A checksum that does not verify.
    BadChecksum,
    /// IP fragments (not reassembled).
    Fragment,
    /// Not addressed to rnet's link (other MAC, multicast, ARP for others).
    NotForUs,
    /// A source address the guest may not use.
    SpoofedSource,
    /// A protocol or message rnet does not forward.
    Unsupported,
    /// Refused by the address policy (host loopback, allow-list, DNS off).
    Policy,
    /// A segment for no known flow.
    NoFlow,
    /// The host refused to give a socket (limits, permissions).
    HostSocket,
    /// A DHCP message the server could not use.
    Dhcp,
    /// A state bound was reached (see `Limits`).
    Limit,
    /// The namespace agent sent a descriptor that is not the guest-side
    /// socket asked for (the connection took the stack path).
    AgentBadFd,
    /// A descriptor from the agent was lost because rnet had no free
    /// descriptor number (`MSG_CTRUNC`; the connection took the stack
    /// path).
    AgentFdLost,
    /// A host-side datagram the inbound UDP filter refused.
    Filtered,
    /// A DNS reply that does not answer its query (ID, QR bit or question
    /// differ): not relayed to the guest.
    DnsMismatch,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 15] = [
        DropReason::Malformed,
        DropReason::BadChecksum,
        DropReason::Fragment,
        DropReason::NotForUs,
        DropReason::SpoofedSource,
        DropReason::Unsupported,
        DropReason::Policy,
        DropReason::NoFlow,
        DropReason::HostSocket,
        DropReason::Dhcp,
        DropReason::Limit,
        DropReason::AgentBadFd,
        DropReason::AgentFdLost,
        DropReason::Filtered,
        DropReason::DnsMismatch,
    ];

    /// A short, stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Fragment => "fragment",
            DropReason::NotForUs => "not_for_us",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Unsupported => "unsupported",
            DropReason::Policy => "policy",
            DropReason::NoFlow => "no_flow",
            DropReason::HostSocket => "host_socket",
            DropReason::Dhcp => "dhcp",
            DropReason::Limit => "limit",
            DropReason::AgentBadFd => "agent_bad_fd",
            DropReason::AgentFdLost => "agent_fd_lost",
            DropReason::Filtered => "filtered",
            DropReason::DnsMismatch => "dns_mismatch",
        }
    }
}

/// Live counters of one network.
#[derive(Default, Debug)]
pub struct Stats {
    /// Frames read from the TAP.
    pub frames_in: AtomicU64,
    /// Bytes read from the TAP.
    pub bytes_in: AtomicU64,
    /// Frames written to the TAP: a copy of the TAP writer's own count
    /// (`Tap::out_counters`), stored by the loop after each batch.
    pub frames_out: AtomicU64,
    /// TCP flows currently open.
    pub tcp_flows: AtomicU64,
    /// UDP flows currently open.
    pub udp_flows: AtomicU64,
    /// ICMP echo flows currently open.
    pub icmp_flows: AtomicU64,
    /// DNS queries in flight.
    pub dns_queries: AtomicU64,
    /// TCP flows opened since start.
    pub tcp_opened: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl Stats {
    /// Counts one drop.
    pub fn count_drop(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }

    /// Drops counted for one reason.
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Relaxed)
    }

    /// A consistent-enough copy for display.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            frames_in: self.frames_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            tcp_flows: self.tcp_flows.load(Relaxed),
            udp_flows: self.udp_flows.load(Relaxed),
            icmp_flows: self.icmp_flows.load(Relaxed),
            dns_queries: self.dns_queries.load(Relaxed),
            tcp_opened: self.tcp_opened.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name(), self.drops(*r)))
                .collect(),
        }
    }
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frames read from the TAP.
    pub frames_in: u64,
    /// Bytes read from the TAP.
    pub bytes_in: u64,
    /// Frames written to the TAP.
    pub frames_out: u64,
    /// TCP flows open.
    pub tcp_flows: u64,
    /// UDP flows open.
    pub udp_flows: u64,
    /// ICMP echo flows open.
    pub icmp_flows: u64,
    /// DNS queries in flight.
    pub dns_queries: u64,
    /// TCP flows opened since start.
    pub tcp_opened: u64,
    /// Drops by reason name.
    pub drops: Vec<(&'static str, u64)>,
}
