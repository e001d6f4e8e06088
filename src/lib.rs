//! rnet gives an unprivileged network namespace a real network interface.
//!
//! It creates a TAP device inside the target's namespaces, configures it
//! (address, MTU, default route, `lo` up) and runs, outside the namespace, a
//! userspace TCP/IP stack ([smoltcp]) that terminates the guest's TCP, UDP
//! and ICMP and carries them over ordinary host sockets (NAT). The virtual
//! network has a gateway (which may stand for the host's loopback), a DNS
//! forwarder, a DHCPv4 server and, over IPv6, router advertisements.
//!
//! # Public API
//!
//! What a program that sets up networking needs is at the crate root:
//! [`Config`] and its [`ConfigBuilder`] (addresses, [`OutboundPolicy`],
//! [`Limits`], [`Services`], [`UdpFilter`], published ports as
//! [`PortSpec`] and [`AutoPublish`]), [`Network`] with its [`Target`],
//! [`Handle`] for a running network (counters as [`StatsSnapshot`], a live
//! [`StatusReport`], ports as [`PortInfo`]), and the errors ([`Error`] and
//! the [`ConfigError`], [`NsError`], [`PortError`] and [`SandboxError`]
//! it wraps). The modules behind them are public only so that the `rnet`
//! binary, the benchmarks and the fuzzers can reach their parts; they are
//! hidden from these docs and not a stable interface.
//!
//! # Module map
//!
//! - `network`, `handle`: [`Network`] (start-up in stages: prepare,
//!   isolate, run) and [`Handle`] (requests over a bounded channel).
//! - `config`: settings and their validation.
//! - `ns`: entering the target's namespaces, creating and configuring
//!   the TAP, passing its descriptor back (SCM_RIGHTS), `rnet run`'s
//!   fresh namespaces, the fast-path namespace agent.
//! - `phy`: the TAP descriptor, the virtio-net offload header and its
//!   checksums, UDP-tunnel GSO cutting, the smoltcp device over the TAP,
//!   `--pcap` captures.
//! - `wire`: frame classification and the frames rnet builds itself.
//! - `stack`: the smoltcp interface and the virtual hosts.
//! - `engine`: the event loop that ties them together on one thread.
//! - `nat`: the address policy and the TCP, UDP and ICMP flows.
//! - `services`: the DNS forwarder and the DHCPv4 server.
//! - `ports`: port publishing: the rules and host listeners, the spliced
//!   fast path and its agent, the control socket (slirp4netns's JSON
//!   protocol), `--publish-auto`.
//! - `status`, `metrics`, `stats`: what an operator sees (the
//!   [`StatusReport`] and its renderings, the Prometheus endpoint,
//!   counters).
//! - `sandbox`: self-isolation once set up.
//! - `supervise`: the supervisor that restarts a data plane that died.
//! - `sys`: the control plane's raw system calls behind safe wrappers.
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

#[doc(hidden)]
pub mod config;
mod engine;
mod handle;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod nat;
mod network;
#[doc(hidden)]
pub mod ns;
#[doc(hidden)]
pub mod phy;
#[doc(hidden)]
pub mod ports;
#[doc(hidden)]
pub mod sandbox;
#[doc(hidden)]
pub mod services;
#[doc(hidden)]
pub mod stack;
#[doc(hidden)]
pub mod stats;
#[doc(hidden)]
pub mod status;
#[doc(hidden)]
pub mod supervise;
#[doc(hidden)]
pub mod sys;
#[doc(hidden)]
pub mod wire;

pub use config::{
    Config, ConfigBuilder, ConfigError, IpCidr, Ipv4Cidr, Ipv6Cidr, Limits, OutboundPolicy,
    Services, UdpFilter,
};
pub use engine::ExitReason;
pub use handle::{COMMAND_QUEUE, Handle};
pub use network::{Error, Network, wait_for_exit};
pub use ns::{NsError, NsKind, SpawnOptions, Target};
pub use ports::auto::AutoPublish;
pub use ports::{PortError, PortInfo, PortSpec, PortSpecError, Proto};
pub use sandbox::SandboxError;
pub use stats::{DropReason, StatsSnapshot};
pub use status::{
    AgentStatus, FlowCounts, PortStatus, ReportError, SplicedBytes, StatusReport, TapStatus,
    TcpMemory, UdpIoCounters,
};

/// The commit rnet was built from (`unknown` when built outside a git
/// checkout, for example from a release tarball).
pub const BUILD_COMMIT: &str = match option_env!("RNET_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};
