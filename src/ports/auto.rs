//! `--publish-auto`: publish whatever the namespace listens on.
//!
//! A watcher thread reads the target's socket tables
//! (`/proc/PID/net/{tcp,tcp6,udp,udp6}`, which show the network namespace
//! of PID) a few times a second. Each listening TCP socket, or bound UDP
//! socket below the namespace's ephemeral port range, whose port is in the
//! watched range gets the same host port (on 0.0.0.0) through the same path
//! as `rnet port add`; when it disappears, the rule is withdrawn. A host
//! port already in use is logged once and retried on later scans, never
//! fatal.
//!
//! Nothing the guest controls is followed into a device or FIFO: the tables
//! are read through a descriptor of rnet's own `/proc/PID/net` (opened
//! before the sandbox), each file opened `O_NOFOLLOW | O_NONBLOCK`, refused
//! unless a regular file and read up to [`TABLE_CAP`]; the ephemeral port
//! range, under the guest's root, is resolved inside that root only and
//! read only if it is a regular procfs file ([`read_in_root`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{PortControl, PortSpec, Proto};

/// How often the socket tables are read.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(250);

/// One `--publish-auto` rule: a port range and a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoPublish {
    /// Protocol watched.
    pub proto: Proto,
    /// First port watched.
    pub first: u16,
    /// Last port watched.
    pub last: u16,
}

impl FromStr for AutoPublish {
    type Err = String;

    /// `[FIRST[-LAST]][/tcp|/udp]`; empty means every TCP port.
    fn from_str(s: &str) -> Result<Self, String> {
        let (range, proto) = match s.rsplit_once('/') {
            Some((r, p)) => (r, p.parse().map_err(|e: super::PortSpecError| e.0)?),
            None => (s, Proto::Tcp),
        };
        let (first, last) = if range.is_empty() {
            (1, 65535)
        } else {
            let bad = || format!("bad --publish-auto range {range:?}: expected PORT or FIRST-LAST");
            match range.split_once('-') {
                Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
                None => {
                    let p = range.parse().map_err(|_| bad())?;
                    (p, p)
                }
            }
        };
        if first == 0 || last < first {
            return Err(format!(
                "bad --publish-auto range {range:?}: ports run 1-65535, first <= last"
            ));
        }
        Ok(AutoPublish { proto, first, last })
    }
}

/// Parses one `/proc/net/{tcp,udp}{,6}` table into (local address, state);
/// malformed lines are skipped. The one parser of these tables in rnet
/// (the namespace agent and pasta mode's `-T/-U auto` use it too).
pub fn parse_table(text: &str) -> Vec<(SocketAddr, u8)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _slot = f.next()?;
            let local = parse_hex_endpoint(f.next()?)?;
            let _remote = f.next()?;
            let state = u8::from_str_radix(f.next()?, 16).ok()?;
            Some((local, state))
        })
        .collect()
}

/// Parses `0100007F:0016` or the 32-hex-digit IPv6 form. The kernel prints
/// the address as native-endian 32-bit words of the network-order bytes,
/// and the port in host order.
pub fn parse_hex_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The state a listening socket shows: LISTEN for TCP, CLOSE (bound, not
/// connected) for UDP.
pub fn listen_state(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => UDP_UNCONNECTED,
    }
}

const TCP_LISTEN: u8 = 0x0a;
const UDP_UNCONNECTED: u8 = 0x07;

/// The ports a guest serves on, per protocol, as far as the host can reach
/// them (sockets bound to loopback inside the namespace are skipped).
fn scan(tables: &Tables) -> BTreeSet<(Proto, u16)> {
    let ephemeral_start = tables.ephemeral_start;
    let mut out = BTreeSet::new();
    for (proto, addr) in tables.listening() {
        let reachable = match addr.ip() {
            IpAddr::V4(ip) => !ip.is_loopback(),
            IpAddr::V6(ip) => {
                !ip.is_loopback() && ip.to_ipv4_mapped().is_none_or(|v4| !v4.is_loopback())
            }
        };
        let service = proto == Proto::Tcp || addr.port() < ephemeral_start;
        if reachable && service {
            out.insert((proto, addr.port()));
        }
    }
    out
}

/// Largest socket table read per scan (some 50,000 sockets); a longer one
/// is cut at its last whole line.
pub const TABLE_CAP: usize = crate::sandbox::READ_CAP;
/// Largest sysctl file read.
const SYSCTL_CAP: usize = 4096;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// The first port of the namespace's ephemeral range, from the target's
/// own `/proc/sys` (the host's if that cannot be read safely), else 32768.
fn ephemeral_start(pid: i32) -> u16 {
    const RANGE: &str = "proc/sys/net/ipv4/ip_local_port_range";
    read_in_root(&format!("/proc/{pid}/root"), RANGE)
        .or_else(|e| {
            debug!(pid, error = %e, "cannot read the target's ip_local_port_range; using the host's");
            read_in_root("/", RANGE)
        })
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Reads `rel` below the directory `root` (the target's root, which the
/// guest controls) without letting it lead anywhere else: resolved as if
/// `root` were `/` (`openat2` with `RESOLVE_IN_ROOT`, no magic links, no
/// final symbolic link) and opened `O_PATH` first, so nothing the guest put
/// there (a FIFO, a device) is ever opened for reading; only a regular file
/// on a procfs is then reopened, without blocking, and read up to
/// `SYSCTL_CAP` bytes.
pub fn read_in_root(root: &str, rel: &str) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{AsFd, AsRawFd};

    use nix::fcntl::OFlag;
    let root = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let rel = std::ffi::CString::new(rel).map_err(|_| Error::from(ErrorKind::InvalidInput))?;
    let path_fd = crate::sys::openat2(
        root.as_fd(),
        &rel,
        (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )?;
    let st = nix::sys::stat::fstat(&path_fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let fs = nix::sys::statfs::fstatfs(&path_fd)?;
    if fs.filesystem_type().0 as i64 != PROC_SUPER_MAGIC {
        return Err(Error::new(ErrorKind::InvalidInput, "not a procfs file"));
    }
    // The very inode checked above, now opened for reading.
    let fd = nix::fcntl::open(
        format!("/proc/self/fd/{}", path_fd.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    crate::sandbox::read_regular(fd, SYSCTL_CAP)
}

/// Cuts a table read up to `cap` bytes back to its last whole line.
fn whole_lines(mut text: String, cap: usize) -> (String, bool) {
    if text.len() < cap {
        return (text, false);
    }
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text.truncate(end);
    (text, true)
}

/// The target's socket tables, opened before the sandbox hides /proc: a
/// descriptor of `/proc/PID/net` (each read shows the tables as they are
/// then) and the namespace's first ephemeral port.
pub struct Tables {
    pid: i32,
    net: crate::sandbox::KeptDir,
    ephemeral_start: u16,
}

impl Tables {
    /// Opens `/proc/PID/net` and reads the ephemeral port range.
    pub fn open(pid: i32) -> std::io::Result<Tables> {
        Ok(Tables {
            pid,
            net: crate::sandbox::KeptDir::open(std::path::Path::new(&format!("/proc/{pid}/net")))?,
            ephemeral_start: ephemeral_start(pid),
        })
    }

    /// Every listening TCP socket and bound, unconnected UDP socket the
    /// tables show now (a table that cannot be read shows nothing).
    pub fn listening(&self) -> Vec<(Proto, SocketAddr)> {
        let mut out = Vec::new();
        for (file, proto) in [
            ("tcp", Proto::Tcp),
            ("tcp6", Proto::Tcp),
            ("udp", Proto::Udp),
            ("udp6", Proto::Udp),
        ] {
            let Ok(text) = self.net.read_capped(file, TABLE_CAP) else {
                continue;
            };
            let (text, cut) = whole_lines(text, TABLE_CAP);
            if cut {
                debug!(
                    file,
                    cap = TABLE_CAP,
                    "socket table longer than the cap; the rest is not scanned"
                );
            }
            let want = listen_state(proto);
            out.extend(
                parse_table(&text)
                    .into_iter()
                    .filter(|(_, st)| *st == want)
                    .map(|(a, _)| (proto, a)),
            );
        }
        out
    }
}

/// Runs the watcher until the network stops.
pub fn watch(tables: Tables, rules: Vec<AutoPublish>, handle: &dyn PortControl) {
    let pid = tables.pid;
    let mut published: BTreeMap<(Proto, u16), u64> = BTreeMap::new();
    let mut warned: BTreeSet<(Proto, u16)> = BTreeSet::new();
    info!(pid, rules = ?rules, "watching the namespace's listening sockets");
    if crate::supervise::restarts() > 0 {
        // A restarted data plane adopted the rules the last one
        // auto-published: take them back as ours, so they are withdrawn
        // when their sockets go (see `crate::supervise`).
        for p in handle.ports().unwrap_or_default() {
            let s = p.spec;
            if s.count == 1
                && s.guest_ip.is_none()
                && s.host_port == s.guest_port
                && s.host_ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                && rules
                    .iter()
                    .any(|r| r.proto == s.proto && (r.first..=r.last).contains(&s.host_port))
            {
                published.insert((s.proto, s.host_port), p.id);
            }
        }
    }
    while handle.is_running() {
        let wanted: BTreeSet<(Proto, u16)> = scan(&tables)
            .into_iter()
            .filter(|(proto, port)| {
                rules
                    .iter()
                    .any(|r| r.proto == *proto && (r.first..=r.last).contains(port))
            })
            .collect();
        for key in &wanted {
            if published.contains_key(key) {
                continue;
            }
            let (proto, port) = *key;
            let spec = PortSpec::single(
                proto,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                None,
                port,
            );
            match handle.add_port(spec) {
                Ok(info) => {
                    info!(id = info.id, port, %proto, "auto-published");
                    published.insert(*key, info.id);
                    warned.remove(key);
                }
                Err(e) => {
                    if warned.insert(*key) {
                        warn!(port, %proto, "cannot auto-publish: {e}; will retry");
                    } else {
                        debug!(port, %proto, "auto-publish retry failed: {e}");
                    }
                }
            }
        }
        let gone: Vec<(Proto, u16)> = published
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            if let Some(id) = published.remove(&key) {
                info!(id, port = key.1, proto = %key.0, "auto-published port closed in the namespace; withdrawn");
                let _ = handle.remove_port(id);
            }
        }
        warned.retain(|k| wanted.contains(k));
        std::thread::sleep(SCAN_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:0035 00000000:0000 0A 0 0 0 0 0 0\n";
        let t = parse_table(v4);
        assert_eq!(t[0], ("0.0.0.0:8080".parse().unwrap(), 0x0a));
        assert_eq!(t[1], ("127.0.0.1:53".parse().unwrap(), 0x0a));
        let v6 = "header\n   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 0\n   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0\n";
        let t = parse_table(v6);
        assert_eq!(t[0], ("[::]:8081".parse().unwrap(), 0x0a));
        assert_eq!(t[1], ("[::1]:22".parse().unwrap(), 0x0a));
        assert!(parse_table("h\ngarbage line\n  0: zz:1 0 0A\n").is_empty());
    }

    #[test]
    fn guest_paths_never_lead_to_fifos_devices_or_the_host() {
        let dir = std::env::temp_dir().join(format!("rnet-autopub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sys = dir.join("proc/sys/net/ipv4");
        std::fs::create_dir_all(&sys).unwrap();
        let range = sys.join("ip_local_port_range");
        let root = dir.to_str().unwrap();
        let rel = "proc/sys/net/ipv4/ip_local_port_range";
        // A FIFO: refused at once, not a read that waits for a writer.
        nix::unistd::mkfifo(&range, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = std::time::Instant::now();
        assert!(read_in_root(root, rel).is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
        // A device.
        std::fs::remove_file(&range).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &range).unwrap();
        assert!(read_in_root(root, rel).is_err());
        // A link to the host's own file resolves inside the root: absent.
        std::fs::remove_file(&range).unwrap();
        std::os::unix::fs::symlink("/proc/sys/net/ipv4/ip_local_port_range", &range).unwrap();
        assert!(read_in_root(root, rel).is_err());
        // A regular file that is not procfs.
        std::fs::remove_file(&range).unwrap();
        std::fs::write(&range, "1\t2\n").unwrap();
        assert!(read_in_root(root, rel).is_err());
        // The real thing.
        let host = read_in_root("/", rel).expect("the host's own range");
        assert!(
            host.split_whitespace()
                .next()
                .unwrap()
                .parse::<u16>()
                .is_ok(),
            "{host:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let (t, cut) = whole_lines("a\nb\nc".to_string(), 5);
        assert_eq!((t.as_str(), cut), ("a\nb\n", true));
        let (t, cut) = whole_lines("a\nb".to_string(), 5);
        assert_eq!((t.as_str(), cut), ("a\nb", false));
    }

    #[test]
    fn auto_specs() {
        assert_eq!(
            "".parse::<AutoPublish>().unwrap(),
            AutoPublish {
                proto: Proto::Tcp,
                first: 1,
                last: 65535
            }
        );
        assert_eq!(
            "8000-9000/udp".parse::<AutoPublish>().unwrap(),
            AutoPublish {
                proto: Proto::Udp,
                first: 8000,
                last: 9000
            }
        );
        assert_eq!(
            "/udp".parse::<AutoPublish>().unwrap(),
            AutoPublish {
                proto: Proto::Udp,
                first: 1,
                last: 65535
            }
        );
        assert!("9000-8000".parse::<AutoPublish>().is_err());
        assert!("x".parse::<AutoPublish>().is_err());
    }
}
