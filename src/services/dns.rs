//! The DNS forwarder at net + 3.
//!
//! UDP queries are relayed one host socket per query, to the first upstream,
//! then to the next one each time an upstream stays silent for the timeout
//! (slirp4netns only ever asks the first). Each socket is connected to the
//! upstream it asks (and bound to loopback for a loopback upstream), so the
//! kernel drops datagrams from anyone else; a datagram that does not answer
//! the query (ID, QR bit or question differ) is dropped and counted
//! (`dns_mismatch`), and the query keeps waiting for the real answer. TCP queries are ordinary TCP
//! flows whose host side connects to an upstream (see the engine), moving
//! on to the next upstream when a connect fails ([`tcp_failover`]).
//!
//! Upstreams come from `--dns-upstream` or from the `nameserver` lines of
//! /etc/resolv.conf, which is then followed ([`ResolvWatch`]: looked at on
//! a guest query, at most once a second, also inside the sandbox) so the
//! upstreams change when the host's do; loopback resolvers (such as systemd-resolved's
//! 127.0.0.53) are reached even when the gateway may not reach host loopback,
//! since the guest never picks the address. Queries and answers are relayed
//! byte for byte; only the header and question are read, to match them.

use std::ffi::OsString;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use crate::phy::tap::TapTx;
use crate::sandbox::KeptDir;
use crate::stack::{NetAddrs, Stack};
use crate::wire::emit::{self, Header, UDP_PAYLOAD_OFFSET, UDP6_PAYLOAD_OFFSET};

/// Reads the nameservers of a resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // Zone suffixes (fe80::1%eth0) are not usable from here.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Environment variable naming another resolv.conf to read instead of
/// /etc/resolv.conf. For rnet's tests (which must not touch the host's
/// file); not a user setting.
pub const ENV_RESOLV_CONF: &str = "RNET_RESOLV_CONF";

/// The resolv.conf rnet reads: /etc/resolv.conf (see [`ENV_RESOLV_CONF`]).
pub fn resolv_conf_path() -> PathBuf {
    std::env::var_os(ENV_RESOLV_CONF)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/etc/resolv.conf"), PathBuf::from)
}

/// The system's upstreams, from resolv.conf.
pub fn system_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string(resolv_conf_path())
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default()
}

/// How often at most [`ResolvWatch::poll`] looks at the file.
pub const RESOLV_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Follows resolv.conf so the upstreams change with the host's (a laptop
/// changing networks, systemd-resolved rewriting its file).
///
/// Opened before the sandbox: it keeps `O_PATH` descriptors of the
/// directory of the path and of the directory of the file its symbolic
/// links lead to, and names the file through them afterwards, when the
/// path no longer resolves (the sandbox's root is empty). A change is a
/// different device, inode, size, modification or change time of either
/// the link or the file; the file is then read again, by path if it still
/// resolves, else through the kept directory of its target.
pub struct ResolvWatch {
    path: PathBuf,
    /// Directory of `path` and the last name of `path`.
    link: (KeptDir, OsString),
    /// Directory of the file `path` leads to, and its name there.
    target: (KeptDir, OsString),
    seen: Option<[i64; 8]>,
    last_check: Option<Instant>,
}

/// Parent directory (kept for reading, so Landlock allows it inside the
/// sandbox) and last name of `path`.
fn dir_and_name(path: &Path) -> io::Result<(KeptDir, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?
        .to_os_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((KeptDir::open(dir)?, name))
}

impl ResolvWatch {
    /// Starts following `path` (call before the sandbox is entered).
    pub fn open(path: &Path) -> io::Result<ResolvWatch> {
        let link = dir_and_name(path)?;
        let target = dir_and_name(&std::fs::canonicalize(path)?)?;
        let mut w = ResolvWatch {
            path: path.to_path_buf(),
            link,
            target,
            seen: None,
            last_check: None,
        };
        w.seen = Some(w.identity());
        Ok(w)
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn identity(&self) -> [i64; 8] {
        let st = |(dir, name): &(KeptDir, OsString), flags| {
            nix::sys::stat::fstatat(dir.as_fd(), name.as_os_str(), flags)
                .map(|s| {
                    [
                        s.st_ino as i64,
                        s.st_size,
                        s.st_mtime * 1_000_000_000 + s.st_mtime_nsec,
                        s.st_ctime * 1_000_000_000 + s.st_ctime_nsec,
                    ]
                })
                .unwrap_or([-1; 4])
        };
        let l = st(&self.link, AtFlags::AT_SYMLINK_NOFOLLOW);
        let t = st(&self.target, AtFlags::AT_SYMLINK_NOFOLLOW);
        [l[0], l[1], l[2], l[3], t[0], t[1], t[2], t[3]]
    }

    fn read(&self) -> io::Result<String> {
        if let Ok(t) = std::fs::read_to_string(&self.path) {
            return Ok(t);
        }
        let (dir, name) = &self.target;
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(64 << 10)
            .read_to_string(&mut text)?;
        Ok(text)
    }

    /// If at least [`RESOLV_CHECK_INTERVAL`] passed since the last look and
    /// the file changed, its nameservers (which may be none); else None.
    pub fn poll(&mut self, now: Instant) -> Option<io::Result<Vec<SocketAddr>>> {
        if self
            .last_check
            .is_some_and(|t| now.saturating_duration_since(t) < RESOLV_CHECK_INTERVAL)
        {
            return None;
        }
        self.last_check = Some(now);
        let id = self.identity();
        if self.seen == Some(id) {
            return None;
        }
        self.seen = Some(id);
        Some(self.read().map(|t| parse_resolv_conf(&t)))
    }
}

/// One guest query in flight.
pub struct DnsQuery {
    /// Guest endpoint that asked.
    pub guest: SocketAddr,
    /// The host socket the query went out on, connected to the upstream
    /// asked last (so the kernel takes datagrams from it alone).
    pub socket: UdpSocket,
    query: Box<[u8]>,
    /// Length of the query's question section (from byte 12), if the
    /// query could be read that far.
    question: Option<usize>,
    /// Index of the upstream asked last.
    pub upstream: usize,
}

/// What one datagram from the upstream was.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// It answers the query: relayed to the guest.
    Answer,
    /// It does not (ID, QR bit or question differ): dropped, and the query
    /// keeps waiting.
    Mismatch,
    /// Nothing more to read now.
    Empty,
}

/// A socket connected to `upstream`: bound to loopback when the upstream
/// is on loopback (so nothing but the host's own stack can answer it).
fn socket_to(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let local = match (upstream.ip(), upstream.ip().is_loopback()) {
        (IpAddr::V4(_), true) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        (IpAddr::V4(_), false) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        (IpAddr::V6(_), true) => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        (IpAddr::V6(_), false) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(upstream)?;
    Ok(socket)
}

/// The length of the question section of `msg` (QDCOUNT questions from
/// byte 12), or None if it does not fit. A compression pointer ends a
/// name (its two bytes are compared as they are).
fn question_len(msg: &[u8]) -> Option<usize> {
    let count = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    let mut i = 12;
    for _ in 0..count {
        loop {
            let len = *msg.get(i)? as usize;
            if len == 0 {
                i += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                msg.get(i + 1)?;
                i += 2;
                break;
            }
            i += 1 + len;
        }
        // QTYPE and QCLASS.
        i += 4;
        msg.get(..i)?;
    }
    Some(i - 12)
}

/// DNS over TCP: where a guest connection to the forwarder goes after
/// its host connect to `failed` did not succeed: the upstream listed next,
/// if `dialled` (what the guest connected to) is the forwarder's port 53
/// on IPv4 or IPv6. None otherwise, or when no upstream is left.
pub fn tcp_failover(
    dialled: SocketAddr,
    failed: SocketAddr,
    addrs: &NetAddrs,
    upstreams: &[SocketAddr],
) -> Option<SocketAddr> {
    let forwarder = dialled == SocketAddr::from((addrs.dns, 53))
        || addrs
            .v6
            .is_some_and(|v6| dialled == SocketAddr::from((v6.dns, 53)));
    if !forwarder {
        return None;
    }
    let at = upstreams.iter().position(|u| *u == failed)?;
    upstreams.get(at + 1).copied()
}

/// Whether `reply` answers `query`: a response (QR set) with the same ID,
/// question count and question (names compared without regard to ASCII
/// case, as resolvers that randomise it expect).
pub fn answers(query: &[u8], question: Option<usize>, reply: &[u8]) -> bool {
    if reply.len() < 12 || query.len() < 12 || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    match question {
        // A query rnet could not read: ID and QR bit are all to check.
        None => true,
        Some(len) => {
            reply[4..6] == query[4..6]
                && reply
                    .get(12..12 + len)
                    .is_some_and(|q| q.eq_ignore_ascii_case(&query[12..12 + len]))
        }
    }
}

impl DnsQuery {
    /// Sends `query` to `upstreams[0]`.
    pub fn start(guest: SocketAddr, query: &[u8], upstreams: &[SocketAddr]) -> io::Result<Self> {
        let first = *upstreams
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no DNS upstream"))?;
        let socket = socket_to(first)?;
        socket.send(query)?;
        Ok(Self {
            guest,
            socket,
            question: question_len(query),
            query: query.into(),
            upstream: 0,
        })
    }

    /// Asks the next upstream after a timeout, on a new socket connected to
    /// it. Returns the previous socket (for the caller to stop watching),
    /// or None when no upstream is left.
    pub fn retry(&mut self, upstreams: &[SocketAddr]) -> Option<UdpSocket> {
        loop {
            self.upstream += 1;
            let next = *upstreams.get(self.upstream)?;
            // An upstream that cannot be asked is skipped.
            let Ok(socket) = socket_to(next) else {
                continue;
            };
            if socket.send(&self.query).is_ok() {
                return Some(std::mem::replace(&mut self.socket, socket));
            }
        }
    }

    /// Relays the next datagram from the upstream to the guest from
    /// `dns:53` (of the guest's family) if it answers the query.
    pub fn to_guest(&mut self, dns: SocketAddr, stack: &mut Stack, mut tx: TapTx<'_>) -> Reply {
        let Some(guest_mac) = stack.guest_mac() else {
            return Reply::Empty;
        };
        let h = Header {
            eth_src: stack.mac,
            eth_dst: guest_mac,
            ident: stack.next_ident(),
        };
        let (max, off) = if self.guest.is_ipv6() {
            (stack.mtu.saturating_sub(48), UDP6_PAYLOAD_OFFSET)
        } else {
            (stack.mtu.saturating_sub(28), UDP_PAYLOAD_OFFSET)
        };
        let (socket, guest) = (&self.socket, self.guest);
        let (query, question) = (&self.query, self.question);
        let mut got = Reply::Empty;
        tx.build(|buf| {
            let end = (off + max).min(buf.len());
            let Some(room) = buf.get_mut(off..end) else {
                return 0;
            };
            loop {
                match socket.recv(room) {
                    Ok(n) if !answers(query, question, &room[..n]) => {
                        got = Reply::Mismatch;
                        return 0;
                    }
                    Ok(n) => {
                        got = Reply::Answer;
                        return match (dns, guest) {
                            (SocketAddr::V4(d), SocketAddr::V4(g)) => {
                                emit::udp_frame(buf, &h, d, g, n)
                            }
                            (SocketAddr::V6(d), SocketAddr::V6(g)) => {
                                emit::udp6_frame(buf, &h, d, g, n)
                            }
                            _ => 0,
                        };
                    }
                    // An ICMP error from the upstream (a closed port)
                    // surfaces once; read on.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(_) => return 0,
                }
            }
        });
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` A/IN with ID `id`.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    fn reply_to(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[7] = 1; // one answer
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        r
    }

    #[test]
    fn replies_must_answer_their_query() {
        let q = query(0x1234, "example.test");
        let qlen = question_len(&q);
        assert_eq!(qlen, Some(q.len() - 12));
        let good = reply_to(&q);
        assert!(answers(&q, qlen, &good));
        // Names differing only in case still match (0x20 randomisation).
        assert!(answers(&q, qlen, &reply_to(&query(0x1234, "ExAmple.TEST"))));
        assert!(!answers(
            &q,
            qlen,
            &reply_to(&query(0x1235, "example.test"))
        ));
        assert!(!answers(
            &q,
            qlen,
            &reply_to(&query(0x1234, "example.tesu"))
        ));
        assert!(!answers(&q, qlen, &q), "QR bit clear");
        let mut qd0 = good.clone();
        qd0[5] = 0;
        assert!(!answers(&q, qlen, &qd0), "question count differs");
        assert!(!answers(&q, qlen, &good[..11]));
        assert!(!answers(&q, qlen, &good[..20]), "question cut short");
        // Unreadable queries are matched on ID and QR alone; nothing panics
        // on odd input.
        let odd = [0x12, 0x34, 1, 0, 0, 9, 0, 0, 0, 0, 0, 0, 63];
        assert_eq!(question_len(&odd), None);
        let mut r = odd.to_vec();
        r[2] |= 0x80;
        assert!(answers(&odd, None, &r));
        for n in 0..q.len() {
            let _ = question_len(&q[..n]);
            let _ = answers(&q, qlen, &good[..n]);
        }
    }

    #[test]
    fn resolv_watch_sees_changes_at_most_once_a_second() {
        let dir = std::env::temp_dir().join(format!("rnet-resolv-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("resolv.conf");
        std::fs::write(&file, "nameserver 127.0.0.1\n").unwrap();
        let mut w = ResolvWatch::open(&file).unwrap();
        let t0 = Instant::now();
        assert!(w.poll(t0).is_none(), "unchanged");
        std::fs::write(&file, "nameserver 127.0.0.2\nnameserver ::1\n").unwrap();
        assert!(
            w.poll(t0 + Duration::from_millis(500)).is_none(),
            "too soon"
        );
        let ups = w.poll(t0 + RESOLV_CHECK_INTERVAL).unwrap().unwrap();
        assert_eq!(
            ups,
            vec!["127.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        assert!(w.poll(t0 + 2 * RESOLV_CHECK_INTERVAL).is_none(), "seen");
        // Gone: an error to report, not a panic.
        std::fs::remove_file(&file).unwrap();
        assert!(w.poll(t0 + 3 * RESOLV_CHECK_INTERVAL).unwrap().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resolv_conf() {
        let t = "# c\nnameserver 127.0.0.53\nsearch x\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
