//! Opening the TAP device inside a target's namespaces: the parent opens the
//! namespace files and forks a single-threaded helper, which joins them,
//! opens `/dev/net/tun`, attaches (or creates) the TAP, optionally configures
//! it over netlink, and sends the descriptor back with SCM_RIGHTS.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::setns;
use nix::sys::socket::{SockFlag, setsockopt, sockopt};
use nix::sys::stat::Mode;
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

use super::agent::confine;
use super::fdpass::{recv_with_fd, send_with_fd};
use super::netlink::{self, RtNetlink};
use super::nsfile::{JoinPlan, clone_flag, open_target};
use super::process::{describe, fork_helper, kill_and_reap, reap};
use super::report::{self, ChildError, MAX_REPORT, Report, Step};
use super::{IfaceConfig, NsError, NsKind, OpenedTap, TapSetup, Target};

/// Longest interface name (IFNAMSIZ minus the NUL).
const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;
/// Size of the virtio-net header requested with IFF_VNET_HDR.
const VNET_HDR_LEN: libc::c_int = 12;
/// How long the parent waits for the helper's answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// `struct ifreq` as far as the TAP ioctls use it: the name, then a
/// 24-byte union holding either the flags (a C short) or a sockaddr.
#[repr(C, align(8))]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    /// An ifreq naming `name` (at most IFNAMSIZ-1 bytes; longer is cut).
    fn named(name: &[u8]) -> Self {
        let mut req = IfReq::default();
        let len = name.len().min(MAX_IFNAME);
        req.name[..len].copy_from_slice(&name[..len]);
        req
    }

    /// The interface name the kernel wrote back.
    fn name(&self) -> &[u8] {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        &self.name[..end]
    }

    /// Stores the flags field.
    fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// The MAC in the hardware-address sockaddr (after its 2-byte family).
    fn hwaddr(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.data[2..8]);
        mac
    }
}

nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, IfReq);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);
nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);
nix::ioctl_readwrite_bad!(get_hwaddr, libc::SIOCGIFHWADDR, IfReq);

/// Checks that `name` can be a Linux interface name.
pub(crate) fn validate_tap_name(name: &str) -> Result<(), NsError> {
    let bad = name.is_empty()
        || name.len() > MAX_IFNAME
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(NsError::InvalidTapName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks that an interface configuration is self-consistent.
pub(crate) fn validate_config(cfg: &IfaceConfig) -> Result<(), NsError> {
    let invalid = |detail: String| Err(NsError::InvalidConfig { detail });
    if cfg.prefix_len > 32 {
        return invalid(format!(
            "prefix length {} is longer than 32 bits",
            cfg.prefix_len
        ));
    }
    if cfg.addr.is_unspecified() || cfg.addr.is_multicast() || cfg.addr.is_broadcast() {
        return invalid(format!("{} cannot be an interface address", cfg.addr));
    }
    let mask = if cfg.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(cfg.prefix_len))
    };
    let net = |a: Ipv4Addr| u32::from(a) & mask;
    if net(cfg.gateway) != net(cfg.addr) {
        return invalid(format!(
            "gateway {} is outside {}/{}",
            cfg.gateway, cfg.addr, cfg.prefix_len
        ));
    }
    if cfg.gateway == cfg.addr {
        return invalid(format!(
            "gateway {} is the interface's own address",
            cfg.gateway
        ));
    }
    if let Some(mac) = cfg.mac
        && (mac[0] & 1 == 1 || mac == [0; 6])
    {
        return invalid(format!(
            "MAC {} is not a unicast address",
            super::format_mac(mac)
        ));
    }
    if let Some((addr, gw)) = cfg.ipv6 {
        let net = |a: std::net::Ipv6Addr| u128::from(a) >> 64;
        if addr == gw || net(addr) != net(gw) || addr.is_multicast() || addr.is_unspecified() {
            return invalid(format!(
                "IPv6 address {addr}/64 and gateway {gw} are not two addresses of one /64"
            ));
        }
    }
    Ok(())
}

/// Opens (attaching to, or creating) the TAP device `setup.name` inside the
/// network namespace of `target`, configures it if asked, and returns its
/// descriptor (blocking mode, close-on-exec) and MAC address.
///
/// All namespace work happens in a forked single-threaded helper process,
/// so this may be called from a multi-threaded program; the helper only
/// makes system calls and small allocations before it exits.
pub fn open_tap(target: &Target, setup: &TapSetup) -> Result<OpenedTap, NsError> {
    validate_tap_name(&setup.name)?;
    if let Some(cfg) = &setup.configure {
        validate_config(cfg)?;
    }
    let plan = open_target(target)?;
    // The child borrows `plan` and never drops it: `close_all_but` has
    // closed the descriptors it holds beyond the two kept, so dropping it
    // there would close them twice.
    let (child, parent_sock) = fork_helper(SockFlag::empty(), |child_sock| {
        // Undumpable before anything of the guest's is joined.
        let _ = confine::undumpable();
        let mut keep = vec![child_sock.as_raw_fd()];
        keep.extend(plan.user.iter().chain(&plan.net).map(|f| f.as_raw_fd()));
        confine::close_all_but(&keep);
        let report = match helper_main(&plan, setup) {
            Ok((fd, mac, name)) => {
                let mut payload = Vec::with_capacity(6 + name.len());
                payload.extend_from_slice(&mac);
                payload.extend_from_slice(&name);
                return match send_with_fd(
                    child_sock.as_fd(),
                    &report::encode_ok(&payload),
                    Some(fd.as_fd()),
                ) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
            }
            Err(e) => e.encode(),
        };
        match send_with_fd(child_sock.as_fd(), &report, None) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    })
    .map_err(|errno| NsError::Os {
        what: "cannot fork the namespace helper process",
        errno,
    })?;
    drop(plan);
    if let Err(errno) = setsockopt(
        &parent_sock,
        sockopt::ReceiveTimeout,
        &TimeVal::new(HELPER_TIMEOUT.as_secs() as _, 0),
    ) {
        kill_and_reap(child);
        return Err(NsError::Os {
            what: "cannot set a timeout on the namespace helper socket",
            errno,
        });
    }
    parent_side(child, parent_sock.as_fd(), target, setup)
}

/// Receives the helper's answer, reaps it and builds the result.
fn parent_side(
    child: Pid,
    sock: BorrowedFd<'_>,
    target: &Target,
    setup: &TapSetup,
) -> Result<OpenedTap, NsError> {
    let mut buf = [0u8; MAX_REPORT];
    let received = match recv_with_fd(sock, &mut buf) {
        Ok(r) => r,
        Err(Errno::EAGAIN) => {
            kill_and_reap(child);
            return Err(NsError::Helper {
                detail: format!(
                    "it did not answer within {} seconds and was killed",
                    HELPER_TIMEOUT.as_secs()
                ),
            });
        }
        Err(errno) => {
            kill_and_reap(child);
            return Err(NsError::Os {
                what: "cannot receive from the namespace helper",
                errno,
            });
        }
    };
    let status = reap(child).map_err(|errno| NsError::Os {
        what: "cannot wait for the namespace helper",
        errno,
    })?;
    if received.len == 0 {
        return Err(NsError::Helper {
            detail: format!("it {} without reporting", describe(status)),
        });
    }
    if received.truncated {
        return Err(NsError::Helper {
            detail: "its report was truncated".to_owned(),
        });
    }
    match report::decode(&buf[..received.len]) {
        Err(detail) => Err(NsError::Helper { detail }),
        Ok(Report::Err(e)) => Err(tap_error(e, target, &setup.name)),
        Ok(Report::Ok(payload)) => {
            let fd = received.fd.ok_or_else(|| NsError::Helper {
                detail: "it reported success but sent no file descriptor".to_owned(),
            })?;
            if payload.len() < 6 {
                return Err(NsError::Helper {
                    detail: format!("short success report ({} bytes)", payload.len()),
                });
            }
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&payload[..6]);
            let name = String::from_utf8_lossy(&payload[6..]).into_owned();
            Ok(OpenedTap { fd, name, mac })
        }
    }
}

/// Turns a helper's error report into the user-facing error.
pub(crate) fn tap_error(e: ChildError, target: &Target, name: &str) -> NsError {
    let name = name.to_owned();
    let errno = e.errno;
    match e.step {
        Step::JoinUserns => NsError::JoinUserns {
            target: target.describe(NsKind::User),
            errno,
        },
        Step::JoinNetns => NsError::JoinNetns {
            target: target.describe(NsKind::Net),
            errno,
        },
        Step::OpenTun => match errno {
            Errno::EACCES | Errno::EPERM => NsError::TunAccess,
            Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => NsError::TunMissing,
            _ => NsError::TunOpen { errno },
        },
        Step::SetIff => match errno {
            Errno::EINVAL => NsError::NotATap { name },
            Errno::EBUSY => NsError::TapBusy { name },
            Errno::EPERM => NsError::TapPermission { name },
            _ => NsError::TapSetup {
                name,
                step: "attach the TAP device (TUNSETIFF)".to_owned(),
                errno,
            },
        },
        Step::VnetHdrSize => NsError::TapSetup {
            name,
            step: "set the virtio-net header size (TUNSETVNETHDRSZ)".to_owned(),
            errno,
        },
        Step::Offload => NsError::TapSetup {
            name,
            step:
                "enable checksum and segmentation offloads (TUNSETOFFLOAD; --no-offload skips them)"
                    .to_owned(),
            errno,
        },
        Step::ReadMac => NsError::TapSetup {
            name,
            step: "read its MAC address".to_owned(),
            errno,
        },
        Step::Netlink => NsError::Netlink {
            name,
            step: e.context,
            errno,
        },
        Step::ParentGone
        | Step::Unshare
        | Step::Setgroups
        | Step::UidMap
        | Step::GidMap
        | Step::Exec
        | Step::Internal => NsError::Helper {
            detail: format!("{}: {}", e.context, errno.desc()),
        },
    }
}

/// The helper's work, in the child: returns the TAP descriptor, its MAC
/// and the kernel's name for it.
fn helper_main(
    plan: &JoinPlan,
    setup: &TapSetup,
) -> Result<(OwnedFd, [u8; 6], Vec<u8>), ChildError> {
    if let Some(user) = &plan.user {
        setns(user, clone_flag(NsKind::User))
            .map_err(|e| ChildError::new(Step::JoinUserns, e, "setns user"))?;
    }
    if let Some(net) = &plan.net {
        setns(net, clone_flag(NsKind::Net))
            .map_err(|e| ChildError::new(Step::JoinNetns, e, "setns net"))?;
    }
    // The TAP is created in the namespace current at open() time.
    let tun = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ChildError::new(Step::OpenTun, e, "open /dev/net/tun"))?;
    // Best effort: the TAP must open wherever it did before (with
    // --no-sandbox too), so a kernel refusing a stage leaves the helper
    // less confined rather than failing the start.
    let _ = confine_helper(plan);

    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if setup.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    let mut req = IfReq::named(setup.name.as_bytes());
    // The IFF_* values used all fit in a C short, as the kernel expects.
    req.set_flags(flags as libc::c_short);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
    // properly sized and aligned stand-in that lives across the call, and
    // `tun` is an open /dev/net/tun descriptor.
    unsafe { tun_set_iff(tun.as_raw_fd(), &mut req) }
        .map_err(|e| ChildError::new(Step::SetIff, e, "TUNSETIFF"))?;
    let kernel_name = req.name().to_vec();

    if setup.vnet_hdr {
        let len = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one C int through the pointer, which
        // points at `len`, alive for the call.
        unsafe { tun_set_vnet_hdr_sz(tun.as_raw_fd(), &len) }
            .map_err(|e| ChildError::new(Step::VnetHdrSize, e, "TUNSETVNETHDRSZ"))?;
        // Partial checksums and TCP segments of up to 64 KiB from the guest,
        // and GSO frames towards it (see the tap module of the data plane).
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; `tun` is an open
        // TAP descriptor.
        unsafe { tun_set_offload(tun.as_raw_fd(), offloads as libc::c_int) }
            .map_err(|e| ChildError::new(Step::Offload, e, "TUNSETOFFLOAD"))?;
    }

    if let Some(cfg) = &setup.configure {
        let name = String::from_utf8_lossy(&kernel_name).into_owned();
        configure(&name, setup.mtu, cfg)?;
    }

    let mut req = IfReq::named(&kernel_name);
    // SAFETY: SIOCGIFHWADDR on a TAP descriptor reads the name from and
    // writes the hardware address into one `struct ifreq`; `req` is a valid,
    // live stand-in for it.
    unsafe { get_hwaddr(tun.as_raw_fd(), &mut req) }
        .map_err(|e| ChildError::new(Step::ReadMac, e, "SIOCGIFHWADDR"))?;
    Ok((tun, req.hwaddr(), kernel_name))
}

/// Confines the helper once it has joined the namespaces and opened
/// `/dev/net/tun` (see `agent/confine.rs`), stopping at the first stage
/// that fails: undumpable again (joining a
/// user namespace changed its credentials), the namespace descriptors
/// closed, an empty environment and an empty read-only root, only
/// CAP_NET_ADMIN (TUNSETIFF, netlink), no_new_privs and a seccomp
/// allow-list of what is left to do.
fn confine_helper(plan: &JoinPlan) -> Result<(), ChildError> {
    let internal = |e: Errno, what: &str| ChildError::new(Step::Internal, e, what);
    let os = |e: &crate::sandbox::SandboxError| {
        Errno::from_raw(e.source.raw_os_error().unwrap_or(libc::EPERM))
    };
    confine::undumpable().map_err(|e| internal(e, "PR_SET_DUMPABLE"))?;
    for fd in plan.user.iter().chain(&plan.net) {
        // SAFETY: the helper's own copies of the namespace descriptors,
        // used only by the setns calls above; `plan` is never used again
        // (the parent's copies are separate after fork).
        unsafe {
            libc::close(fd.as_raw_fd());
        }
    }
    confine::clear_environment().map_err(|e| internal(e, "empty the environment"))?;
    crate::sandbox::empty_root()
        .map_err(|e| internal(os(&e), &format!("give the helper an empty root: {e}")))?;
    crate::sandbox::drop_capabilities(1 << confine::CAP_NET_ADMIN)
        .map_err(|e| internal(os(&e), &format!("drop capabilities: {e}")))?;
    confine::undumpable().map_err(|e| internal(e, "PR_SET_DUMPABLE"))?;
    let calls = helper_calls();
    let filter = confine::build_seccomp(&calls).map_err(|w| internal(Errno::EINVAL, w))?;
    confine::install_seccomp(&filter).map_err(|e| internal(e, "install the seccomp filter"))
}

/// The system calls the TAP helper makes once confined.
fn helper_calls() -> Vec<(libc::c_long, confine::Arg)> {
    use confine::Arg::{Any, OneOf};
    const FAMILIES: &[u64] = &[
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
        libc::AF_NETLINK as u64,
    ];
    let mut v = confine::base_calls();
    v.extend([
        // TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD, SIOCGIFHWADDR, and
        // SIOCGIFINDEX of if_nametoindex.
        (libc::SYS_ioctl, Any),
        (libc::SYS_socket, OneOf(0, FAMILIES)),
        (libc::SYS_setsockopt, Any),
        (libc::SYS_getsockopt, Any),
        (libc::SYS_getsockname, Any),
        (libc::SYS_bind, Any),
        (libc::SYS_connect, Any),
        (libc::SYS_sendto, Any),
        (libc::SYS_recvfrom, Any),
        (libc::SYS_fcntl, Any),
        // Waits between retries.
        (libc::SYS_clock_nanosleep, Any),
        (libc::SYS_nanosleep, Any),
    ]);
    v
}

/// Configures `lo` and the TAP over netlink in the current namespace.
fn configure(name: &str, mtu: u32, cfg: &IfaceConfig) -> Result<(), ChildError> {
    let nl_err = |step: &str| {
        let step = step.to_owned();
        move |e: Errno| ChildError::new(Step::Netlink, e, &step)
    };
    let mut nl = RtNetlink::open().map_err(nl_err("open a netlink socket"))?;
    let lo = nix::net::if_::if_nametoindex("lo").map_err(nl_err("look up lo"))?;
    nl.set_up(lo).map_err(nl_err("bring lo up"))?;
    let index = nix::net::if_::if_nametoindex(name).map_err(nl_err(&format!("look up {name}")))?;
    nl.set_mtu(index, mtu)
        .map_err(nl_err(&format!("set MTU {mtu}")))?;
    if let Some(mac) = cfg.mac {
        nl.set_mac(index, mac)
            .map_err(nl_err(&format!("set MAC {}", super::format_mac(mac))))?;
    }
    nl.set_up(index)
        .map_err(nl_err(&format!("bring {name} up")))?;
    nl.add_ipv4_address(index, cfg.addr, cfg.prefix_len)
        .map_err(nl_err(&format!(
            "add address {}/{}",
            cfg.addr, cfg.prefix_len
        )))?;
    // The gateway routes wait for the kernel to take the gateway as
    // on-link (see `netlink::until_ready`); if it never does, the error
    // says so.
    let route_err = |what: String, addr: String| {
        move |(e, refused): (Errno, u32)| {
            let step = if refused == 0 {
                what
            } else {
                format!(
                    "{what} (refused {refused} times over {} s while waiting for {name} and its address {addr} to be ready: the kernel does not see the gateway as on-link; check that {name} is up and has {addr})",
                    netlink::READY_DEADLINE.as_secs()
                )
            };
            ChildError::new(Step::Netlink, e, &step)
        }
    };
    let v4 = format!("{}/{}", cfg.addr, cfg.prefix_len);
    netlink::until_ready(netlink::READY_DEADLINE, || {
        nl.add_default_route_v4(index, cfg.gateway)
    })
    .map_err(route_err(
        format!("add default route via {}", cfg.gateway),
        v4,
    ))?;
    if let Some((addr, gateway)) = cfg.ipv6 {
        nl.add_ipv6_address(index, addr, 64)
            .map_err(nl_err(&format!("add address {addr}/64")))?;
        netlink::until_ready(netlink::READY_DEADLINE, || {
            nl.add_default_route_v6(index, gateway)
        })
        .map_err(route_err(
            format!("add IPv6 default route via {gateway}"),
            format!("{addr}/64"),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        for ok in ["tap0", "a", "x234567890123456"[..15].as_ref(), "tap%d"] {
            assert!(validate_tap_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "x2345678901234567",
            "a/b",
            "a:b",
            "a b",
            ".",
            "..",
            "a\0",
        ] {
            match validate_tap_name(bad) {
                Err(e @ NsError::InvalidTapName { .. }) => {
                    assert!(e.to_string().contains("--tap"));
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    fn cfg() -> IfaceConfig {
        IfaceConfig {
            addr: Ipv4Addr::new(10, 0, 2, 100),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            mac: None,
            ipv6: None,
        }
    }

    #[test]
    fn configs() {
        assert!(validate_config(&cfg()).is_ok());
        assert!(
            validate_config(&IfaceConfig {
                mac: Some([0x02, 0, 0, 0, 0, 1]),
                ..cfg()
            })
            .is_ok()
        );
        let bad = [
            IfaceConfig {
                prefix_len: 33,
                ..cfg()
            },
            IfaceConfig {
                gateway: Ipv4Addr::new(10, 0, 3, 2),
                ..cfg()
            },
            IfaceConfig {
                gateway: Ipv4Addr::new(10, 0, 2, 100),
                ..cfg()
            },
            IfaceConfig {
                addr: Ipv4Addr::UNSPECIFIED,
                ..cfg()
            },
            IfaceConfig {
                mac: Some([0x01, 0, 0, 0, 0, 1]),
                ..cfg()
            },
        ];
        for c in bad {
            match validate_config(&c) {
                Err(NsError::InvalidConfig { .. }) => {}
                other => panic!("{c:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn ifreq_layout() {
        assert_eq!(
            std::mem::size_of::<IfReq>(),
            std::mem::size_of::<libc::ifreq>()
        );
        let mut r = IfReq::named(b"tap0");
        assert_eq!(r.name(), b"tap0");
        r.set_flags(0x1002);
        assert_eq!(libc::c_short::from_ne_bytes([r.data[0], r.data[1]]), 0x1002);
        r.data[2..8].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(r.hwaddr(), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn error_mapping() {
        let pid = Target::Pid(77);
        let err = |step, errno| tap_error(ChildError::new(step, errno, "ctx"), &pid, "tap0");
        assert!(matches!(
            err(Step::OpenTun, Errno::EACCES),
            NsError::TunAccess
        ));
        assert!(matches!(
            err(Step::OpenTun, Errno::EPERM),
            NsError::TunAccess
        ));
        assert!(matches!(
            err(Step::OpenTun, Errno::ENOENT),
            NsError::TunMissing
        ));
        assert!(matches!(
            err(Step::OpenTun, Errno::ENODEV),
            NsError::TunMissing
        ));
        assert!(matches!(
            err(Step::SetIff, Errno::EINVAL),
            NsError::NotATap { .. }
        ));
        assert!(matches!(
            err(Step::SetIff, Errno::EBUSY),
            NsError::TapBusy { .. }
        ));
        assert!(matches!(
            err(Step::SetIff, Errno::EPERM),
            NsError::TapPermission { .. }
        ));
        let msg = err(Step::JoinUserns, Errno::EPERM).to_string();
        assert!(
            msg.contains("cannot join the user namespace of PID 77"),
            "{msg}"
        );
        let msg = err(Step::JoinNetns, Errno::EPERM).to_string();
        assert!(
            msg.contains("cannot join the network namespace of PID 77"),
            "{msg}"
        );
        let msg = tap_error(
            ChildError::new(Step::Netlink, Errno::EEXIST, "add address 10.0.2.100/24"),
            &pid,
            "tap0",
        )
        .to_string();
        assert_eq!(
            msg,
            "configuring tap0: add address 10.0.2.100/24: File exists"
        );

        let path = Target::Path {
            netns: "/run/netns/a".into(),
            userns: Some("/proc/9/ns/user".into()),
        };
        let msg = tap_error(
            ChildError::new(Step::JoinUserns, Errno::EPERM, ""),
            &path,
            "t",
        )
        .to_string();
        assert!(
            msg.contains("cannot join the user namespace of /proc/9/ns/user"),
            "{msg}"
        );
        let msg = tap_error(
            ChildError::new(Step::JoinNetns, Errno::EPERM, ""),
            &path,
            "t",
        )
        .to_string();
        assert!(
            msg.contains("cannot join the network namespace of /run/netns/a"),
            "{msg}"
        );
    }
}
