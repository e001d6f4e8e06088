//! rnet gives an unprivileged network namespace a real network interface.
//!
//! It creates a TAP device inside the target's namespaces, configures it
//! (address, MTU, default route, `lo` up) and runs, outside the namespace, a
//! userspace TCP/IP stack ([smoltcp]) that terminates the guest's TCP, UDP
//! and ICMP and carries them over ordinary host sockets (NAT). The virtual
//! network has a gateway (which may stand for the host's loopback), a DNS
//! forwarder, a DHCPv4 server and, over IPv6, router advertisements.
//!
//! # Layers
//!
//! - [`ns`]: entering the target's namespaces, creating and configuring
//!   the TAP, passing its descriptor back (SCM_RIGHTS), `rnet run`'s
//!   fresh namespaces.
//! - [`phy`]: the TAP descriptor (frames, offload header), the smoltcp
//!   device over it, `--pcap` captures.
//! - [`wire`]: frame classification and the frames rnet builds itself.
//! - [`stack`]: the smoltcp interface and the virtual hosts.
//! - [`nat`]: the address policy and the TCP, UDP and ICMP flows, and the
//!   spliced fast path of published ports.
//! - [`services`]: the DNS forwarder and the DHCPv4 server.
//! - [`ports`], [`api`], [`autopub`]: port publishing, the control socket
//!   (slirp4netns's JSON protocol), `--publish-auto`.
//! - [`status`], [`metrics`], [`stats`]: what an operator sees
//!   (the status report, the Prometheus endpoint, counters).
//! - [`sandbox`]: self-isolation once set up.
//! - [`supervise`]: the supervisor that restarts a data plane that died.
//! - the event loop (private) ties them together on one thread.
//!
//! # Example
//!
//! Attach to a process's namespaces and run until it exits:
//!
//! ```no_run
//! use rnet::{Config, Network, OutboundPolicy, Target};
//!
//! let config = Config::builder()
//!     .allow_host_loopback(true)
//!     .outbound(OutboundPolicy::Only(vec!["198.18.0.0/15".parse()?]))
//!     .dns_upstreams(vec!["127.0.0.1:5353".parse()?])
//!     .build()?;
//! let net = Network::attach(Target::Pid(4242), config)?;
//! println!("{:?}", net.handle().stats());
//! let why = net.wait()?;
//! println!("network ended: {why:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [smoltcp]: https://docs.rs/smoltcp

#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod autopub;
pub mod config;
mod engine;
mod handle;
pub mod metrics;
pub mod nat;
mod network;
pub mod ns;
pub mod phy;
pub mod ports;
pub mod sandbox;
pub mod services;
pub mod stack;
pub mod stats;
pub mod status;
pub mod supervise;
pub mod wire;

pub use config::{
    Config, ConfigBuilder, ConfigError, IpCidr, Ipv4Cidr, Ipv6Cidr, Limits, OutboundPolicy,
    Services, UdpFilter,
};
pub use engine::ExitReason;
pub use handle::{COMMAND_QUEUE, Handle};
pub use network::{Error, Network, wait_for_exit};
pub use ns::{NsError, Target};
pub use ports::{PortError, PortInfo, PortSpec, Proto};
pub use stats::{DropReason, StatsSnapshot};

/// The commit rnet was built from (`unknown` when built outside a git
/// checkout, for example from a release tarball).
pub const BUILD_COMMIT: &str = match option_env!("RNET_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};
