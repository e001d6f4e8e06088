//! Linux namespaces: getting a TAP device inside a target's network
//! namespace (joining its user namespace when needed) and starting a command
//! in fresh user + network namespaces for `rnet run`.
//!
//! Everything that needs a single-threaded process (joining or creating a
//! user namespace) runs in a forked helper, so these functions may be called
//! from a program that already has threads. The helper does only system
//! calls and small allocations before it execs or exits.
//!
//! Files: `tap.rs` opens the TAP, `netlink.rs` configures it, `nsfile.rs`
//! handles namespace files, `spawn.rs` starts commands, `fdpass.rs` holds
//! the SCM_RIGHTS code, `report.rs` the helper-to-parent wire format,
//! `process.rs` the fork/reap plumbing and `agent/` the long-lived helper
//! that opens guest-side sockets for the published-port fast path.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub mod agent;
pub mod anchor;
mod error;
pub mod fdpass;
mod netlink;
mod nsfile;
mod open_tap;
pub mod opener;
mod process;
mod report;
mod spawn;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod test_env;

pub use agent::{Agent, AgentError, Launcher, Reply, Submit};
pub use error::{NsError, NsKind};
pub use nsfile::same_userns;
pub use open_tap::open_tap;
pub use spawn::{
    SpawnOptions, SpawnedCommand, SubRange, parse_subid, spawn_in_new_namespaces, spawn_with,
};

/// Whose network namespace to put the TAP device in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The namespaces of a running process (`/proc/PID/ns/{user,net}`); its
    /// user namespace is joined if it differs from ours.
    Pid(i32),
    /// Namespace files given by path, e.g. `/run/netns/NAME`.
    Path {
        /// The network namespace file.
        netns: PathBuf,
        /// The user namespace owning it, to join first; `None` joins only
        /// the network namespace (needs CAP_SYS_ADMIN over it already).
        userns: Option<PathBuf>,
    },
}

impl Target {
    /// How to name the target in messages about its `kind` namespace:
    /// "PID 123", or the namespace file's path.
    pub fn describe(&self, kind: NsKind) -> String {
        match (self, kind) {
            (Target::Pid(pid), _) => format!("PID {pid}"),
            (
                Target::Path {
                    userns: Some(u), ..
                },
                NsKind::User,
            ) => u.display().to_string(),
            (Target::Path { netns, .. }, _) => netns.display().to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "PID {pid}"),
            Target::Path {
                netns,
                userns: None,
            } => write!(f, "netns {}", netns.display()),
            Target::Path {
                netns,
                userns: Some(u),
            } => write!(f, "netns {} (userns {})", netns.display(), u.display()),
        }
    }
}

/// What TAP device to open and how to set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSetup {
    /// Interface name in the namespace, e.g. "tap0". An existing TAP of that
    /// name is attached to (RootlessKit pre-creates one); otherwise it is
    /// created and lives as long as the returned descriptor.
    pub name: String,
    /// MTU to set (only applied when `configure` is `Some`), e.g. 65520.
    pub mtu: u32,
    /// Request IFF_VNET_HDR (with a 12-byte virtio-net header).
    pub vnet_hdr: bool,
    /// Addressing to apply; `None` only creates/attaches the TAP and leaves
    /// it (down, unaddressed) to the user.
    pub configure: Option<IfaceConfig>,
}

/// Addressing applied to the TAP inside the namespace: `lo` up, MTU, MAC,
/// TAP up, `addr/prefix_len`, default route via `gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfaceConfig {
    /// The guest's address, e.g. 10.0.2.100.
    pub addr: Ipv4Addr,
    /// Its prefix length, e.g. 24.
    pub prefix_len: u8,
    /// The default gateway, inside `addr/prefix_len`, e.g. 10.0.2.2.
    pub gateway: Ipv4Addr,
    /// A MAC to set on the TAP before bringing it up.
    pub mac: Option<[u8; 6]>,
    /// IPv6: the guest's address (added as /64 without duplicate address
    /// detection) and the default route's gateway, inside that /64.
    pub ipv6: Option<(Ipv6Addr, Ipv6Addr)>,
}

/// A TAP device opened inside the target's network namespace.
#[derive(Debug)]
pub struct OpenedTap {
    /// The TAP descriptor: blocking mode, close-on-exec. Frames are
    /// Ethernet frames without packet info (IFF_NO_PI), each preceded by a
    /// 12-byte virtio-net header when `vnet_hdr` was requested.
    pub fd: OwnedFd,
    /// The interface name the kernel gave it.
    pub name: String,
    /// The TAP's MAC as seen in the namespace after configuration (the
    /// guest side's address).
    pub mac: [u8; 6],
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_descriptions() {
        let pid = Target::Pid(12);
        assert_eq!(pid.describe(NsKind::User), "PID 12");
        assert_eq!(pid.to_string(), "PID 12");
        let path = Target::Path {
            netns: "/run/netns/a".into(),
            userns: None,
        };
        assert_eq!(path.describe(NsKind::User), "/run/netns/a");
        assert_eq!(path.describe(NsKind::Net), "/run/netns/a");
        let both = Target::Path {
            netns: "/run/netns/a".into(),
            userns: Some("/proc/1/ns/user".into()),
        };
        assert_eq!(both.describe(NsKind::User), "/proc/1/ns/user");
        assert_eq!(
            both.to_string(),
            "netns /run/netns/a (userns /proc/1/ns/user)"
        );
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac([0x02, 0xab, 0, 1, 0x10, 0xff]),
            "02:ab:00:01:10:ff"
        );
    }
}
