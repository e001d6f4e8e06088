//! The namespace agent: a long-lived helper process inside the target's user
//! and network namespaces that opens guest-side TCP sockets for the
//! published-port fast path and hands them back over SCM_RIGHTS, so rnet can
//! move bytes between an accepted host connection and the guest server with
//! splice(2) instead of carrying them through its userspace TCP stack.
//!
//! Files: this one holds the agent's protocol, rnet's client side
//! ([`Agent`]) and the agent's own code; `launcher.rs` the process that
//! forks agents on request ([`Launcher`]); `confine.rs` the confinement
//! every helper in a guest's namespaces applies to itself.
//!
//! # Trust
//!
//! The agent lives where the guest is root. It is confined as
//! [`confine`] describes: undumpable before it joins anything, no
//! descriptors but its socket and the namespace's socket tables, an empty
//! environment, an empty read-only root of its own, only `CAP_NET_ADMIN`
//! (rules, `IP_TRANSPARENT`) and `CAP_NET_BIND_SERVICE` (client ports below
//! 1024), no_new_privs and a seccomp allow-list. rnet still treats it as
//! hostile: every descriptor it hands back is checked (a connected or
//! connecting IPv4 TCP socket to the expected guest endpoint, see
//! `engine/ports.rs`), and it is never waited for by rnet's event loop.
//!
//! # Restarts
//!
//! rnet's sandbox forbids `fork` and `setns` after start-up, so agents are
//! not forked by rnet but by the [`Launcher`], forked before the sandbox
//! with the target's namespace descriptors. rnet asks it for a new agent
//! whenever the current one dies, stalls or misbehaves.
//!
//! # Keeping the client's address
//!
//! The guest-side socket is created with `IP_TRANSPARENT` (the agent has
//! CAP_NET_ADMIN in the namespace's user namespace), bound to the client's
//! address and port and connected to the guest server. The server thus sees
//! the real client. Its replies are addressed to that client, which is not
//! local; before opening the socket the agent installs the per-connection
//! rule
//!
//! ```text
//! priority 99  to CLIENT_IP ipproto tcp dport CLIENT_PORT  lookup 0x524e
//! ```
//!
//! and once, in that table, `local 0.0.0.0/0 dev lo`, so those replies are
//! delivered locally to the transparent socket instead of leaving through
//! the TAP (rules are consulted before the main table, so this also wins for
//! clients shown as the gateway, 10.0.2.2, which is on-link via the TAP).
//! [`Agent::release`] removes it when the connection ends. Nothing else of
//! the guest's traffic is diverted, so connections carried by rnet's stack
//! (through the TAP) keep working beside the fast path, which is what lets
//! rnet fall back to the stack whenever the agent is unhealthy.
//! [`Agent::route_replies`] (a per-port rule) still exists for callers that
//! want every reply of a guest endpoint delivered locally.
//!
//! # Protocol
//!
//! One SEQPACKET datagram per request and per reply; the agent serves them
//! one at a time, in order, and never blocks for long (connects are
//! non-blocking). Requests are a tag byte and big-endian IPv4 endpoints;
//! replies use the helper report format of `report.rs` (ok + payload, or
//! errno + context).

pub(crate) mod confine;
pub mod launcher;

pub use launcher::Launcher;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::setns;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::unistd::{Pid, getppid};
use socket2::{Domain, Protocol, Socket, Type};

use super::fdpass::{recv_with_fd, send_with_fd};
use super::netlink::RtNetlink;
use super::nsfile::{JoinPlan, clone_flag};
use super::open_tap::tap_error;
use super::report::{self, ChildError, MAX_REPORT, Report, Step};
use super::{NsError, NsKind, Target};
use crate::ports::Proto;

/// The routing table holding `local 0.0.0.0/0 dev lo` ("RN").
pub const REPLY_TABLE: u32 = 0x524e;
/// Priority of the per-endpoint rules (before `main` at 32766).
pub const REPLY_RULE_PRIORITY: u32 = 100;

/// How long the parent waits for any answer of the agent.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request datagram.
const MAX_REQUEST: usize = 32;
/// Listing entries per reply datagram (each at most 20 bytes).
const LIST_CHUNK: usize = 1024;
/// Receive buffer for replies: a full listing chunk or an error report.
const MAX_REPLY: usize = 2 + LIST_CHUNK * 20 + MAX_REPORT;

const REQ_ROUTE: u8 = b'R';
const REQ_UNROUTE: u8 = b'U';
const REQ_TRANSPARENT: u8 = b'T';
const REQ_PLAIN: u8 = b'P';
const REQ_LISTENING: u8 = b'L';
const REQ_RELEASE: u8 = b'X';

/// Priority of the per-connection rules (before the per-port ones).
pub const CONN_RULE_PRIORITY: u32 = 99;

/// Why a request to the agent failed. It travels inside the
/// [`io::Error`] the [`Agent`] methods return (whose kind follows the
/// errno); get it back with [`AgentError::of`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent tried and the kernel in the namespace refused.
    #[error("in the namespace: {context}: {}", errno.desc())]
    Request {
        /// The system error, e.g. EADDRINUSE from the bind.
        errno: Errno,
        /// What the agent was doing, e.g. "bind 10.0.2.2:40001".
        context: String,
    },
    /// The agent process is gone or stopped answering; it was killed and
    /// reaped, and every later request fails the same way.
    #[error("the namespace agent {0}; spawn a new one")]
    Gone(String),
}

impl AgentError {
    /// The agent error inside an error returned by an [`Agent`] method.
    pub fn of(err: &io::Error) -> Option<&AgentError> {
        err.get_ref()?.downcast_ref::<AgentError>()
    }

    /// The namespace's errno, for [`AgentError::Request`].
    pub fn errno(&self) -> Option<Errno> {
        match self {
            AgentError::Request { errno, .. } => Some(*errno),
            AgentError::Gone(_) => None,
        }
    }

    fn into_io(self) -> io::Error {
        let kind = match &self {
            AgentError::Request { errno, .. } => io::Error::from_raw_os_error(*errno as i32).kind(),
            AgentError::Gone(_) => io::ErrorKind::BrokenPipe,
        };
        io::Error::new(kind, self)
    }
}

/// A request to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Route(SocketAddrV4),
    Unroute(SocketAddrV4),
    Transparent {
        client: SocketAddrV4,
        guest: SocketAddrV4,
    },
    Plain(SocketAddrV4),
    Listening,
    /// The transparent connection from this client ended: drop its rule.
    Release(SocketAddrV4),
}

fn put_v4(out: &mut Vec<u8>, a: SocketAddrV4) {
    out.extend_from_slice(&a.ip().octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_v4(b: &[u8]) -> Option<SocketAddrV4> {
    let b: &[u8; 6] = b.try_into().ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13);
        match *self {
            Request::Route(g) => {
                out.push(REQ_ROUTE);
                put_v4(&mut out, g);
            }
            Request::Unroute(g) => {
                out.push(REQ_UNROUTE);
                put_v4(&mut out, g);
            }
            Request::Transparent { client, guest } => {
                out.push(REQ_TRANSPARENT);
                put_v4(&mut out, client);
                put_v4(&mut out, guest);
            }
            Request::Plain(g) => {
                out.push(REQ_PLAIN);
                put_v4(&mut out, g);
            }
            Request::Listening => out.push(REQ_LISTENING),
            Request::Release(c) => {
                out.push(REQ_RELEASE);
                put_v4(&mut out, c);
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Request> {
        let (&tag, rest) = b.split_first()?;
        Some(match (tag, rest.len()) {
            (REQ_ROUTE, 6) => Request::Route(get_v4(rest)?),
            (REQ_UNROUTE, 6) => Request::Unroute(get_v4(rest)?),
            (REQ_TRANSPARENT, 12) => Request::Transparent {
                client: get_v4(&rest[..6])?,
                guest: get_v4(&rest[6..])?,
            },
            (REQ_PLAIN, 6) => Request::Plain(get_v4(rest)?),
            (REQ_LISTENING, 0) => Request::Listening,
            (REQ_RELEASE, 6) => Request::Release(get_v4(rest)?),
            _ => return None,
        })
    }
}

/// Options of the agents a launcher starts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AgentOptions {
    /// Test hook ([`launcher::TEST_BAD_FD_ENV`]): answer connection
    /// requests with a pipe instead of the socket, so rnet's check of the
    /// descriptors it is handed can be seen refusing one.
    pub bad_fd: bool,
}

/// One answer of the agent to a request sent with [`Agent::submit`].
#[derive(Debug)]
pub enum Reply {
    /// Success; connection requests carry the guest-side socket. `fd_lost`:
    /// the agent sent a descriptor but rnet could not take it (no free
    /// descriptor numbers: `MSG_CTRUNC`).
    Ok {
        /// The descriptor sent along, if any.
        fd: Option<OwnedFd>,
        /// A descriptor was sent and discarded by the kernel.
        fd_lost: bool,
    },
    /// The agent tried and the namespace's kernel refused
    /// ([`AgentError::Request`]).
    Refused(AgentError),
}

/// A connection request for [`Agent::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submit {
    /// [`Agent::connect_transparent`].
    Transparent {
        /// The client address the socket is bound to.
        client: SocketAddrV4,
        /// The guest server.
        guest: SocketAddrV4,
    },
    /// [`Agent::connect_plain`].
    Plain(SocketAddrV4),
    /// [`Agent::release`].
    Release(SocketAddrV4),
}

/// A helper process living in a target's user and network namespaces that
/// opens sockets there on request, started by a [`Launcher`]. Requests are
/// served one at a time, in order. The blocking methods wait at most
/// [`REPLY_TIMEOUT`] for the answer; an event loop uses [`Agent::submit`]
/// and [`Agent::try_reply`] on the non-blocking socket instead.
///
/// Dropping it removes the reply rules it still has installed (best
/// effort), closes the control socket and kills the process (its launcher
/// reaps it). Rules of an agent that died stay in the namespace until
/// removed; a new agent's `route_replies` for the same endpoint does not
/// duplicate them.
#[derive(Debug)]
pub struct Agent {
    pid: Pid,
    /// The control socket (non-blocking); `None` once the agent is gone.
    sock: Option<OwnedFd>,
    /// Why the agent is gone, once it is.
    gone: Option<String>,
    /// How many `route_replies` each guest endpoint has outstanding.
    routes: HashMap<SocketAddrV4, usize>,
    /// Whether its "joined" report has arrived.
    joined: bool,
    launcher: Arc<Launcher>,
}

impl Agent {
    /// Starts a launcher for `target` and one agent from it, which joins
    /// `target`'s user namespace (if it differs from ours) and network
    /// namespace, confines itself (see [`confine`]), reports back, and then
    /// serves requests until the control socket closes. Both get SIGKILL
    /// when their parent ends: the launcher when the *thread* that called
    /// `spawn` exits (PR_SET_PDEATHSIG follows the creating thread), so
    /// call this from a thread that lives as long as the agent should. The
    /// agent ignores SIGINT and SIGHUP (a terminal's Ctrl-C reaches rnet,
    /// whose exit then ends the agent) and has every other signal at its
    /// default.
    ///
    /// Safe to call from a multi-threaded program: the forked children make
    /// only system calls and small allocations.
    pub fn spawn(target: &Target) -> Result<Agent, NsError> {
        Launcher::spawn(target)?.spawn_agent()
    }

    pub(super) fn from_launcher(
        pid: Pid,
        sock: OwnedFd,
        launcher: Arc<Launcher>,
    ) -> io::Result<Agent> {
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(Agent {
            pid,
            sock: Some(sock),
            gone: None,
            routes: HashMap::new(),
            joined: false,
            launcher,
        })
    }

    /// Waits (blocking, up to `timeout`) for the agent's "joined" report.
    pub(super) fn wait_joined(&mut self, timeout: Duration) -> Result<(), NsError> {
        let end = std::time::Instant::now() + timeout;
        loop {
            if self.poll_joined()? {
                return Ok(());
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                self.kill();
                return Err(NsError::Helper {
                    detail: format!(
                        "the agent did not answer within {} seconds and was killed",
                        timeout.as_secs()
                    ),
                });
            }
            if let Some(s) = &self.sock {
                launcher::wait_readable(s.as_fd(), left);
            }
        }
    }

    /// Checks, without blocking, for the agent's "joined" report: true once
    /// it has arrived; an error if the agent failed or ended.
    pub fn poll_joined(&mut self) -> Result<bool, NsError> {
        if self.joined {
            return Ok(true);
        }
        let Some(sock) = self.sock.as_ref() else {
            return Err(NsError::Helper {
                detail: "the agent is gone".to_owned(),
            });
        };
        let mut buf = [0u8; MAX_REPORT];
        let received = recv_with_fd(sock.as_fd(), &mut buf);
        match received {
            Err(Errno::EAGAIN) => Ok(false),
            Err(errno) => {
                self.kill();
                Err(NsError::Os {
                    what: "cannot receive from the namespace agent",
                    errno,
                })
            }
            Ok(r) if r.len == 0 => {
                self.kill();
                self.gone = Some("ended".to_owned());
                Err(NsError::Helper {
                    detail: "the agent ended without reporting".to_owned(),
                })
            }
            Ok(r) => match report::decode(&buf[..r.len]) {
                Ok(Report::Ok(_)) => {
                    self.joined = true;
                    Ok(true)
                }
                Ok(Report::Err(e)) => {
                    self.kill();
                    Err(tap_error(e, self.launcher.target(), ""))
                }
                Err(detail) => {
                    self.kill();
                    Err(NsError::Helper { detail })
                }
            },
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The control socket, for an event loop to watch (None once gone).
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    /// Whether the agent is still usable (it has not died or timed out).
    pub fn is_alive(&self) -> bool {
        self.sock.is_some()
    }

    /// Why the agent is gone (empty while it is not).
    pub fn gone_reason(&self) -> &str {
        self.gone.as_deref().unwrap_or("")
    }

    /// Makes the guest's replies from `guest` (its TCP server endpoint) go
    /// to local sockets: adds the rule `priority 100 from IP ipproto tcp
    /// sport PORT lookup 0x524e` and, the first time, `local 0.0.0.0/0 dev
    /// lo` in that table. Calls nest per endpoint: the rule stays until as
    /// many [`unroute_replies`](Self::unroute_replies). Fails with
    /// `Unsupported` on kernels older than 4.17, which would drop the
    /// protocol and port match silently.
    ///
    /// rnet's event loop does not use it: while such a rule is in place the
    /// guest's replies to connections arriving through the TAP would be
    /// lost, and those must keep working whenever the agent is unhealthy.
    /// The per-connection rules of
    /// [`connect_transparent`](Self::connect_transparent) are enough.
    pub fn route_replies(&mut self, guest: SocketAddrV4) -> io::Result<()> {
        let count = self.routes.get(&guest).copied().unwrap_or(0);
        if count == 0 {
            self.call(Request::Route(guest))?;
        }
        self.routes.insert(guest, count + 1);
        Ok(())
    }

    /// Undoes one [`route_replies`](Self::route_replies) for `guest`; the
    /// last one removes the rule (a rule already gone is fine). The table's
    /// local route stays: nothing reaches it without a rule.
    pub fn unroute_replies(&mut self, guest: SocketAddrV4) -> io::Result<()> {
        match self.routes.get(&guest).copied() {
            Some(n) if n > 1 => {
                self.routes.insert(guest, n - 1);
                Ok(())
            }
            _ => {
                self.call(Request::Unroute(guest))?;
                self.routes.remove(&guest);
                Ok(())
            }
        }
    }

    /// A TCP socket inside the namespace with `IP_TRANSPARENT` and
    /// SO_REUSEADDR, bound to `client`, whose non-blocking `connect()` to
    /// `guest` has been started, after the per-connection rule `to CLIENT
    /// ipproto tcp dport PORT lookup 0x524e` was added so the guest's
    /// replies reach it. The descriptor is non-blocking and close-on-exec;
    /// wait for it to become writable and read `SO_ERROR` (0: connected;
    /// ECONNREFUSED: no server). A busy client address shows as EADDRINUSE
    /// (bind) or EADDRNOTAVAIL (connect: the same four-tuple is still in
    /// use or in TIME_WAIT).
    pub fn connect_transparent(
        &mut self,
        client: SocketAddrV4,
        guest: SocketAddrV4,
    ) -> io::Result<OwnedFd> {
        self.call_fd(Request::Transparent { client, guest })
    }

    /// Ends what [`Agent::connect_transparent`] set up for `client` (its
    /// reply rule); call when that connection is closed.
    pub fn release(&mut self, client: SocketAddrV4) -> io::Result<()> {
        self.call(Request::Release(client)).map(|_| ())
    }

    /// Like [`connect_transparent`](Self::connect_transparent) without
    /// `IP_TRANSPARENT` or bind: the source is the namespace's own address
    /// for `guest` (the guest's address itself for a local server).
    pub fn connect_plain(&mut self, guest: SocketAddrV4) -> io::Result<OwnedFd> {
        self.call_fd(Request::Plain(guest))
    }

    /// The listening sockets in the namespace: TCP in state LISTEN and
    /// unconnected bound UDP, IPv4 and IPv6 (IPv6 without scope id), each
    /// (protocol, local address) once, from the namespace's
    /// `/proc/net/{tcp,tcp6,udp,udp6}` tables as the agent sees them.
    pub fn listening(&mut self) -> io::Result<Vec<(Proto, SocketAddr)>> {
        self.send(Request::Listening)?;
        let mut out = Vec::new();
        loop {
            let (payload, _) = self.recv_reply()?;
            let (more, entries) = payload.split_first().ok_or_else(|| {
                self.fail("sent an empty listing".to_owned())
                    .into_io_error()
            })?;
            let Some(list) = decode_listing(entries) else {
                return Err(self
                    .fail("sent a malformed listing".to_owned())
                    .into_io_error());
            };
            out.extend(list);
            if *more == 0 {
                return Ok(out);
            }
        }
    }

    /// Sends a request without waiting: its answer comes, in order, from
    /// [`Agent::try_reply`]. An error means the agent cannot take it now
    /// (gone, or its socket is full: it is not reading).
    pub fn submit(&mut self, req: Submit) -> io::Result<()> {
        self.send(match req {
            Submit::Transparent { client, guest } => Request::Transparent { client, guest },
            Submit::Plain(g) => Request::Plain(g),
            Submit::Release(c) => Request::Release(c),
        })
    }

    /// The next answer to a [`submit`](Self::submit)ted request, without
    /// blocking (`Ok(None)`: none yet). An error means the agent is gone
    /// (it ended or broke the protocol; it has been killed).
    pub fn try_reply(&mut self) -> Result<Option<Reply>, AgentError> {
        let sock = self.sock().map_err(|e| {
            AgentError::of(&e)
                .cloned()
                .unwrap_or(AgentError::Gone(String::new()))
        })?;
        let mut buf = vec![0u8; MAX_REPORT + 16];
        let got = match recv_with_fd(sock, &mut buf) {
            Ok(r) => r,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(errno) => {
                let Gone(d) = self.fail(format!("cannot be read from: {}", errno.desc()));
                return Err(AgentError::Gone(d));
            }
        };
        if got.len == 0 {
            let Gone(d) = self.fail("closed its socket (it ended or was killed)".to_owned());
            return Err(AgentError::Gone(d));
        }
        if got.data_truncated {
            let Gone(d) = self.fail("sent an oversized reply".to_owned());
            return Err(AgentError::Gone(d));
        }
        match report::decode(&buf[..got.len]) {
            Ok(Report::Ok(_)) => Ok(Some(Reply::Ok {
                fd: got.fd,
                fd_lost: got.fd_truncated,
            })),
            Ok(Report::Err(e)) => Ok(Some(Reply::Refused(AgentError::Request {
                errno: e.errno,
                context: e.context,
            }))),
            Err(detail) => {
                let Gone(d) = self.fail(format!("sent a bad reply: {detail}"));
                Err(AgentError::Gone(d))
            }
        }
    }

    /// Sends a request and returns the reply's payload.
    fn call(&mut self, req: Request) -> io::Result<Vec<u8>> {
        self.send(req)?;
        Ok(self.recv_reply()?.0)
    }

    /// Sends a request whose success reply carries a descriptor.
    fn call_fd(&mut self, req: Request) -> io::Result<OwnedFd> {
        self.send(req)?;
        match self.recv_reply()?.1 {
            Some(fd) => Ok(fd),
            None => Err(self
                .fail("reported success but sent no descriptor".to_owned())
                .into_io_error()),
        }
    }

    fn sock(&self) -> io::Result<BorrowedFd<'_>> {
        match &self.sock {
            Some(s) => Ok(s.as_fd()),
            None => Err(AgentError::Gone(self.gone.clone().unwrap_or_default()).into_io()),
        }
    }

    fn send(&mut self, req: Request) -> io::Result<()> {
        let sock = self.sock()?;
        match send_with_fd(sock, &req.encode(), None) {
            Ok(()) => Ok(()),
            // Not reading: the caller decides whether that is fatal.
            Err(Errno::EAGAIN) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            Err(errno) => Err(self
                .fail(format!("cannot be reached: {}", errno.desc()))
                .into_io_error()),
        }
    }

    /// Receives one reply (blocking up to [`REPLY_TIMEOUT`]): the ok
    /// payload and descriptor, or the error.
    fn recv_reply(&mut self) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let end = std::time::Instant::now() + REPLY_TIMEOUT;
        let mut buf = vec![0u8; MAX_REPLY];
        let got = loop {
            let sock = self.sock()?;
            match recv_with_fd(sock, &mut buf) {
                Ok(r) => break r,
                Err(Errno::EAGAIN) => {
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(self
                            .fail(format!(
                                "did not answer within {} seconds and was killed",
                                REPLY_TIMEOUT.as_secs()
                            ))
                            .into_io_error());
                    }
                    launcher::wait_readable(sock, left);
                }
                Err(errno) => {
                    return Err(self
                        .fail(format!("cannot be read from: {}", errno.desc()))
                        .into_io_error());
                }
            }
        };
        if got.len == 0 {
            let detail = "closed its socket (it ended or was killed)".to_owned();
            self.kill();
            self.gone = Some(detail.clone());
            return Err(AgentError::Gone(detail).into_io());
        }
        if got.truncated {
            return Err(self
                .fail("sent a truncated reply".to_owned())
                .into_io_error());
        }
        match report::decode(&buf[..got.len]) {
            Ok(Report::Ok(payload)) => Ok((payload.to_vec(), got.fd)),
            Ok(Report::Err(e)) => Err(AgentError::Request {
                errno: e.errno,
                context: e.context,
            }
            .into_io()),
            Err(detail) => Err(self
                .fail(format!("sent a bad reply: {detail}"))
                .into_io_error()),
        }
    }

    /// Marks the agent gone for `detail` and kills it.
    fn fail(&mut self, detail: String) -> Gone {
        self.kill();
        self.gone = Some(detail.clone());
        Gone(detail)
    }

    /// Closes the socket and kills the agent (its launcher reaps it).
    pub fn kill(&mut self) {
        if self.sock.take().is_some() {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
            self.launcher.kill_agent(self.pid);
            if self.gone.is_none() {
                self.gone = Some("was stopped by rnet".to_owned());
            }
        }
    }
}

/// An agent that has just been declared gone.
struct Gone(String);

impl Gone {
    fn into_io_error(self) -> io::Error {
        AgentError::Gone(self.0).into_io()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Best effort: take out the rules still installed, so a later rnet
        // without the fast path is not left with replies routed to `lo`.
        let routed: Vec<SocketAddrV4> = self.routes.drain().map(|(g, _)| g).collect();
        for guest in routed {
            if !self.is_alive() {
                break;
            }
            let _ = self.call(Request::Unroute(guest));
        }
        // Closing the socket ends the agent's loop; the kill makes sure.
        self.kill();
    }
}
/// Restores an empty signal mask and default dispositions (the handlers
/// inherited from the parent would run its code on descriptors that are
/// closed or reused here), then ignores SIGINT, SIGHUP and SIGTERM.
fn reset_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SIGTERM too: a service manager's or timeout(1)'s SIGTERM to rnet's
        // process group must not end the launcher before rnet (which then
        // logs a lost launcher at a clean stop); it ends with rnet anyway
        // (its socket closes; PR_SET_PDEATHSIG), and is stopped by SIGKILL.
        let disposition = if sig == libc::SIGINT || sig == libc::SIGHUP || sig == libc::SIGTERM {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        // SAFETY: installing SIG_DFL or SIG_IGN registers no handler code;
        // failures (signals reserved by libc) are harmless and ignored.
        unsafe {
            libc::signal(sig, disposition);
        }
    }
}

/// The agent after fork from its launcher: confines itself, joins the
/// namespaces, reports, serves requests. Returns its exit code.
///
/// Order matters: undumpable first (before anything of the guest's is
/// joined); descriptors closed; the user namespace joined (capabilities
/// there), then the network namespace; what the requests need later is
/// opened while the host's files are still visible (the socket tables, the
/// kernel release, `lo`'s index); then the empty root, the capability
/// drop, no_new_privs and the seccomp filter.
pub(super) fn agent_main(
    parent: Pid,
    plan: &JoinPlan,
    sock: OwnedFd,
    null: RawFd,
    opts: AgentOptions,
) -> i32 {
    let undumpable = confine::undumpable();
    confine::std_to_null(null);
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(plan.user.iter().chain(&plan.net).map(|f| f.as_raw_fd()));
    confine::close_all_but(&keep);
    reset_signals();
    let report = |r: &[u8]| i32::from(send_with_fd(sock.as_fd(), r, None).is_err());
    let internal =
        |e: Errno, what: &str| report(&ChildError::new(Step::Internal, e, what).encode());
    if let Err(e) = undumpable {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return internal(e, "set the parent-death signal");
    }
    if getppid() != parent {
        return report(&ChildError::new(Step::ParentGone, Errno::ESRCH, "rnet exited").encode());
    }
    if let Some(user) = &plan.user
        && let Err(e) = setns(user, clone_flag(NsKind::User))
    {
        return report(&ChildError::new(Step::JoinUserns, e, "setns user").encode());
    }
    if let Some(net) = &plan.net
        && let Err(e) = setns(net, clone_flag(NsKind::Net))
    {
        return report(&ChildError::new(Step::JoinNetns, e, "setns net").encode());
    }
    // Joining a user namespace is a credential change: make sure.
    if let Err(e) = confine::undumpable() {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    let mut state = AgentState {
        bad_fd: opts.bad_fd,
        ..AgentState::default()
    };
    for (name, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        // No IPv6 in this kernel or namespace: nothing listens there.
        if let Ok(f) = std::fs::File::open(format!("/proc/self/net/{name}")) {
            state.tables.push((proto, f));
        }
    }
    state.rules_ok = rules_supported().is_ok();
    state.lo = nix::net::if_::if_nametoindex("lo").unwrap_or(1);
    // The strings are zeroed first; a kernel without PR_SET_MM_MAP
    // (CONFIG_CHECKPOINT_RESTORE) still shows their (zeroed) bytes to
    // those who may read the file, which the guest may not.
    let _ = confine::clear_environment();
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(state.tables.iter().map(|(_, f)| f.as_raw_fd()));
    confine::close_all_but(&keep);
    if let Err(e) = crate::sandbox::empty_root() {
        let errno = Errno::from_raw(e.source.raw_os_error().unwrap_or(libc::EIO));
        return internal(errno, &format!("give the agent an empty root: {e}"));
    }
    let caps = (1u64 << confine::CAP_NET_ADMIN) | (1u64 << confine::CAP_NET_BIND_SERVICE);
    if let Err(e) = crate::sandbox::drop_capabilities(caps) {
        let errno = Errno::from_raw(e.source.raw_os_error().unwrap_or(libc::EPERM));
        return internal(errno, &format!("drop the agent's capabilities: {e}"));
    }
    if let Err(e) = confine::undumpable() {
        return internal(e, "make the agent undumpable (PR_SET_DUMPABLE)");
    }
    let filter = match confine::build_seccomp(&agent_calls()) {
        Ok(f) => f,
        Err(what) => return internal(Errno::EINVAL, what),
    };
    if let Err(e) = confine::install_seccomp(&filter) {
        return internal(e, "install the agent's seccomp filter");
    }
    drop(filter);
    if send_with_fd(sock.as_fd(), &report::encode_ok(&[]), None).is_err() {
        return 1;
    }
    serve(sock.as_fd(), state)
}

/// The system calls the agent makes once confined (see [`confine`]).
fn agent_calls() -> Vec<(libc::c_long, confine::Arg)> {
    use confine::Arg::{Any, OneOf};
    const FAMILIES: &[u64] = &[libc::AF_INET as u64, libc::AF_NETLINK as u64];
    let mut v = confine::base_calls();
    v.extend([
        (libc::SYS_socket, OneOf(0, FAMILIES)),
        (libc::SYS_setsockopt, Any),
        (libc::SYS_getsockopt, Any),
        (libc::SYS_getsockname, Any),
        (libc::SYS_bind, Any),
        (libc::SYS_connect, Any),
        (libc::SYS_sendto, Any),
        (libc::SYS_recvfrom, Any),
        (libc::SYS_fcntl, Any),
        (libc::SYS_lseek, Any),
        (libc::SYS_pread64, Any),
        // std's read_to_string asks for the file's size.
        (libc::SYS_statx, Any),
        (libc::SYS_fstat, Any),
        (libc::SYS_newfstatat, Any),
        (libc::SYS_pipe2, Any),
    ]);
    v
}

/// What the agent keeps between requests.
#[derive(Default)]
struct AgentState {
    /// Open netlink socket, reopened after an error.
    nl: Option<RtNetlink>,
    /// Whether the local route of [`REPLY_TABLE`] has been added.
    table_ready: bool,
    /// Clients with a per-connection reply rule installed.
    conn_rules: std::collections::HashSet<SocketAddrV4>,
    /// The namespace's socket tables, opened before the root was emptied.
    tables: Vec<(Proto, std::fs::File)>,
    /// Whether the kernel matches rules on protocol and port (4.17).
    rules_ok: bool,
    /// `lo`'s interface index.
    lo: u32,
    /// The test hook of [`AgentOptions::bad_fd`].
    bad_fd: bool,
}

/// The agent's request loop; returns the exit code (0 on EOF).
fn serve(sock: BorrowedFd<'_>, mut state: AgentState) -> i32 {
    let mut buf = [0u8; MAX_REQUEST];
    loop {
        let got = match recv_with_fd(sock, &mut buf) {
            Ok(r) => r,
            Err(_) => return 1,
        };
        if got.len == 0 {
            return 0;
        }
        drop(got.fd);
        let sent = match Request::decode(&buf[..got.len]).filter(|_| !got.truncated) {
            None => send_err(
                sock,
                ChildError::new(Step::Internal, Errno::EINVAL, "malformed request"),
            ),
            Some(req) => state.handle(sock, req),
        };
        if sent.is_err() {
            return 1;
        }
    }
}

fn send_err(sock: BorrowedFd<'_>, e: ChildError) -> nix::Result<()> {
    send_with_fd(sock, &e.encode(), None)
}

fn send_ok(sock: BorrowedFd<'_>, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    send_with_fd(sock, &report::encode_ok(payload), fd)
}

impl AgentState {
    /// Serves one request, sending its reply (or replies).
    fn handle(&mut self, sock: BorrowedFd<'_>, req: Request) -> nix::Result<()> {
        match req {
            Request::Route(guest) => match self.route(guest, true) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Unroute(guest) => match self.route(guest, false) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Transparent { client, guest } => {
                // Replies to this client come back to us whatever answers
                // them: the guest server itself, or (after a DNAT inside
                // the namespace, e.g. a CNI portmap rule) a pod, whose
                // replies the per-port rule cannot recognise.
                if self.bad_fd {
                    return self.send_pipe(sock);
                }
                if let Err(e) = self.conn_rule(client, true) {
                    return send_err(sock, e);
                }
                match open_guest_socket(Some(client), guest) {
                    Ok(fd) => send_ok(sock, &[], Some(fd.as_fd())),
                    Err(e) => {
                        let _ = self.conn_rule(client, false);
                        send_err(sock, e)
                    }
                }
            }
            Request::Release(client) => match self.conn_rule(client, false) {
                Ok(()) => send_ok(sock, &[], None),
                Err(e) => send_err(sock, e),
            },
            Request::Plain(_) if self.bad_fd => self.send_pipe(sock),
            Request::Plain(guest) => match open_guest_socket(None, guest) {
                Ok(fd) => send_ok(sock, &[], Some(fd.as_fd())),
                Err(e) => send_err(sock, e),
            },
            Request::Listening => match self.listening_sockets() {
                Ok(list) => {
                    let chunks: Vec<_> = list.chunks(LIST_CHUNK).collect();
                    if chunks.is_empty() {
                        return send_ok(sock, &[0], None);
                    }
                    for (i, chunk) in chunks.iter().enumerate() {
                        let more = u8::from(i + 1 < chunks.len());
                        let mut payload = vec![more];
                        encode_listing(chunk, &mut payload);
                        send_ok(sock, &payload, None)?;
                    }
                    Ok(())
                }
                Err(e) => send_err(sock, e),
            },
        }
    }

    /// The test hook: a pipe where a socket belongs.
    fn send_pipe(&mut self, sock: BorrowedFd<'_>) -> nix::Result<()> {
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok((r, _w)) => send_ok(sock, &[], Some(r.as_fd())),
            Err(e) => send_err(sock, ChildError::new(Step::Internal, e, "pipe")),
        }
    }

    /// Adds or removes the per-connection rule `to CLIENT ipproto tcp
    /// dport PORT lookup REPLY_TABLE`.
    fn conn_rule(&mut self, client: SocketAddrV4, add: bool) -> Result<(), ChildError> {
        if !add && !self.conn_rules.contains(&client) {
            // Perhaps added by an agent before this one: remove it if it is
            // there (a rule that is not is fine).
            if self.rules_ok {
                let nl = match &mut self.nl {
                    Some(nl) => nl,
                    None => match RtNetlink::open() {
                        Ok(nl) => self.nl.insert(nl),
                        Err(_) => return Ok(()),
                    },
                };
                let _ = nl.del_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY);
            }
            return Ok(());
        }
        if add && !self.rules_ok {
            return Err(ChildError::new(
                Step::Netlink,
                Errno::ENOTSUP,
                "rules matching on protocol and port need Linux 4.17",
            ));
        }
        let step = format!(
            "{} rule to {} ipproto tcp dport {} lookup {REPLY_TABLE:#x}",
            if add { "add" } else { "delete" },
            client.ip(),
            client.port()
        );
        let nl = match &mut self.nl {
            Some(nl) => nl,
            None => self.nl.insert(
                RtNetlink::open()
                    .map_err(|e| ChildError::new(Step::Netlink, e, "open a netlink socket"))?,
            ),
        };
        if add && !self.table_ready {
            nl.add_local_default_route_v4(REPLY_TABLE, self.lo)
                .map_err(|e| {
                    ChildError::new(
                        Step::Netlink,
                        e,
                        &format!("add local 0.0.0.0/0 dev lo table {REPLY_TABLE:#x}"),
                    )
                })?;
            self.table_ready = true;
        }
        let r = if add {
            nl.add_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY)
        } else {
            nl.del_tcp_dest_rule(client, REPLY_TABLE, CONN_RULE_PRIORITY)
        };
        r.map_err(|e| {
            self.nl = None;
            ChildError::new(Step::Netlink, e, &step)
        })?;
        if add {
            self.conn_rules.insert(client);
        } else {
            self.conn_rules.remove(&client);
        }
        Ok(())
    }

    /// Adds (`add`) or removes the reply rule for `guest`.
    fn route(&mut self, guest: SocketAddrV4, add: bool) -> Result<(), ChildError> {
        let what = if add { "add" } else { "delete" };
        let step = format!(
            "{what} rule from {} ipproto tcp sport {} lookup {REPLY_TABLE:#x}",
            guest.ip(),
            guest.port()
        );
        if add && !self.rules_ok {
            return Err(ChildError::new(Step::Netlink, Errno::ENOTSUP, &step));
        }
        let nl = match &mut self.nl {
            Some(nl) => nl,
            None => self.nl.insert(
                RtNetlink::open()
                    .map_err(|e| ChildError::new(Step::Netlink, e, "open a netlink socket"))?,
            ),
        };
        let result = if add {
            let table = if self.table_ready {
                Ok(())
            } else {
                nl.add_local_default_route_v4(REPLY_TABLE, self.lo)
                    .map_err(|e| {
                        ChildError::new(
                            Step::Netlink,
                            e,
                            &format!("add local 0.0.0.0/0 dev lo table {REPLY_TABLE:#x}"),
                        )
                    })
            };
            table.and_then(|()| {
                self.table_ready = true;
                nl.add_tcp_source_rule(guest, REPLY_TABLE, REPLY_RULE_PRIORITY)
                    .map_err(|e| ChildError::new(Step::Netlink, e, &step))
            })
        } else {
            nl.del_tcp_source_rule(guest, REPLY_TABLE, REPLY_RULE_PRIORITY)
                .map_err(|e| ChildError::new(Step::Netlink, e, &step))
        };
        if result.is_err() {
            // Start from a fresh socket next time (no stale replies).
            self.nl = None;
        }
        result
    }
}

/// Whether the running kernel understands the protocol and port match of
/// rules (Linux 4.17). Older ones drop them silently, which would send all
/// of the guest's traffic to `lo`; refuse there (ENOTSUP).
fn rules_supported() -> Result<(), Errno> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|_| Errno::ENOTSUP)?;
    match kernel_version(&release) {
        Some(v) if v >= (4, 17) => Ok(()),
        _ => Err(Errno::ENOTSUP),
    }
}

/// (major, minor) of a kernel release string such as "6.8.0-45-generic".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Opens the guest-side socket: non-blocking, close-on-exec, connect to
/// `guest` started; with `client`, IP_TRANSPARENT and bound to it first.
fn open_guest_socket(
    client: Option<SocketAddrV4>,
    guest: SocketAddrV4,
) -> Result<OwnedFd, ChildError> {
    let err = |e: io::Error, ctx: &str| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        ChildError::new(Step::Internal, errno, ctx)
    };
    let sock = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| err(e, "create a TCP socket"))?;
    if let Some(client) = client {
        sock.set_ip_transparent_v4(true).map_err(|e| {
            err(
                e,
                "set IP_TRANSPARENT (needs CAP_NET_ADMIN in the namespace)",
            )
        })?;
        sock.set_reuse_address(true)
            .map_err(|e| err(e, "set SO_REUSEADDR"))?;
        sock.bind(&SocketAddr::V4(client).into())
            .map_err(|e| err(e, &format!("bind {client}")))?;
    }
    match sock.connect(&SocketAddr::V4(guest).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(err(e, &format!("connect to {guest}"))),
    }
    Ok(sock.into())
}

impl AgentState {
    /// The listening sockets of the namespace, from the tables opened at
    /// start (each read again from its beginning).
    fn listening_sockets(&mut self) -> Result<Vec<(Proto, SocketAddr)>, ChildError> {
        use std::io::{Read, Seek};
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (proto, file) in &mut self.tables {
            let mut text = String::new();
            if let Err(e) = file.rewind().and_then(|()| file.read_to_string(&mut text)) {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                return Err(ChildError::new(
                    Step::Internal,
                    errno,
                    "read the namespace's socket tables",
                ));
            }
            for addr in parse_proc_net(&text, *proto) {
                if seen.insert((*proto, addr)) {
                    out.push((*proto, addr));
                }
            }
        }
        Ok(out)
    }
}

/// The local addresses of the sockets in a `/proc/net/{tcp,udp}[6]` table
/// that listen: state 0A (LISTEN) for TCP, 07 (CLOSE, i.e. bound and not
/// connected) for UDP. Malformed lines are skipped.
fn parse_proc_net(text: &str, proto: Proto) -> Vec<SocketAddr> {
    let want = crate::ports::auto::listen_state(proto);
    crate::ports::auto::parse_table(text)
        .into_iter()
        .filter(|(_, st)| *st == want)
        .map(|(a, _)| a)
        .collect()
}

/// Appends the listing entries: protocol (`t`/`u`), family (4/6), address,
/// port (big-endian).
fn encode_listing(list: &[(Proto, SocketAddr)], out: &mut Vec<u8>) {
    for (proto, addr) in list {
        out.push(match proto {
            Proto::Tcp => b't',
            Proto::Udp => b'u',
        });
        match addr.ip() {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&addr.port().to_be_bytes());
    }
}

/// Decodes what [`encode_listing`] wrote; `None` if malformed.
fn decode_listing(mut b: &[u8]) -> Option<Vec<(Proto, SocketAddr)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let proto = match b[0] {
            b't' => Proto::Tcp,
            b'u' => Proto::Udp,
            _ => return None,
        };
        let (ip, rest) = match *b.get(1)? {
            4 => {
                let a: [u8; 4] = b.get(2..6)?.try_into().ok()?;
                (IpAddr::V4(a.into()), &b[6..])
            }
            6 => {
                let a: [u8; 16] = b.get(2..18)?.try_into().ok()?;
                (IpAddr::V6(a.into()), &b[18..])
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
        out.push((proto, SocketAddr::new(ip, port)));
        b = &rest[2..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::OsString;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::sockopt;
    use nix::unistd::{ForkResult, fork};

    use crate::ns::process::{exit_child, kill_and_reap};
    use nix::sys::socket::{SockaddrIn, getpeername, getsockname};
    use nix::sys::wait::waitpid;

    use crate::ns::{IfaceConfig, OpenedTap, SpawnedCommand, TapSetup, open_tap};

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

    use crate::ns::test_env::require;

    /// A `sleep` in fresh user + network namespaces with a configured tap0,
    /// or None (skip) if user namespaces are unavailable.
    struct Guest {
        cmd: SpawnedCommand,
        tap: OpenedTap,
    }

    fn guest() -> Option<Guest> {
        let argv: Vec<OsString> = ["sleep", "60"].iter().map(OsString::from).collect();
        let cmd = match crate::ns::spawn_in_new_namespaces(&argv) {
            Ok(cmd) => cmd,
            Err(e @ NsError::UsernsCreate { .. }) => {
                require(false, &format!("user namespaces unavailable: {e}"));
                return None;
            }
            Err(e) => panic!("spawn failed: {e}"),
        };
        let setup = TapSetup {
            name: "tap0".into(),
            mtu: 65520,
            vnet_hdr: false,
            configure: Some(IfaceConfig {
                addr: GUEST,
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                mac: None,
                ipv6: None,
            }),
        };
        let tap = open_tap(&Target::Pid(cmd.pid()), &setup).expect("open_tap");
        // Left unreleased: dropping `cmd` kills and reaps the sleep.
        Some(Guest { cmd, tap })
    }

    /// `nsenter` into the guest's namespaces, running `args`.
    fn nsenter(pid: i32, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--preserve-credentials", "-U", "-n", "-t", &pid.to_string()]);
        c.args(args);
        c
    }

    fn tools_present() -> bool {
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        require(
            ok(Command::new("nsenter").arg("--version"))
                && ok(Command::new("/usr/bin/python3").arg("--version"))
                && ok(Command::new("ip").arg("-V")),
            "nsenter, ip or /usr/bin/python3 is not installed",
        )
    }

    /// A TCP echo server on 10.0.2.100:PORT inside the guest (plus a UDP
    /// socket on PORT+1) that prints `peer IP:PORT` for each connection.
    const SERVER: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.2.100", port))
s.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port + 1))
print("ready", flush=True)
while True:
    c, a = s.accept()
    print("peer %s:%d" % a, flush=True)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
"#;

    /// The server process (killed and reaped on drop) and its output lines.
    struct Server {
        child: Child,
        lines: mpsc::Receiver<String>,
    }

    impl Server {
        fn start(pid: i32, port: u16) -> Server {
            let mut child = nsenter(pid, &["/usr/bin/python3", "-c", SERVER, &port.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start python server");
            let out = child.stdout.take().expect("stdout");
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let server = Server { child, lines };
            assert_eq!(server.line(), "ready");
            server
        }

        fn line(&self) -> String {
            self.lines
                .recv_timeout(Duration::from_secs(10))
                .expect("a line from the server")
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn wait_for(fd: BorrowedFd<'_>, flags: PollFlags) {
        let mut fds = [PollFd::new(fd, flags)];
        let n = poll(&mut fds, PollTimeout::from(5000u16)).expect("poll");
        assert_eq!(n, 1, "timed out waiting for {flags:?}");
    }

    /// Waits for the connect to finish and checks it succeeded.
    fn connected(fd: &OwnedFd) {
        wait_for(fd.as_fd(), PollFlags::POLLOUT);
        let err = nix::sys::socket::getsockopt(fd, sockopt::SocketError).expect("SO_ERROR");
        assert_eq!(err, 0, "connect failed: {}", Errno::from_raw(err));
    }

    /// Sends `msg` and reads the echo back through the non-blocking `fd`.
    fn echo(fd: &OwnedFd, msg: &[u8]) {
        assert_eq!(nix::unistd::write(fd, msg).expect("write"), msg.len());
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < msg.len() {
            wait_for(fd.as_fd(), PollFlags::POLLIN);
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => panic!("EOF after {got:?}"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(Errno::EAGAIN) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, msg);
    }

    fn local_and_peer(fd: &OwnedFd) -> (SocketAddrV4, SocketAddrV4) {
        let conv = |a: SockaddrIn| SocketAddrV4::new(a.ip(), a.port());
        (
            conv(getsockname::<SockaddrIn>(fd.as_raw_fd()).expect("getsockname")),
            conv(getpeername::<SockaddrIn>(fd.as_raw_fd()).expect("getpeername")),
        )
    }

    /// IPv4 frames (ethertype 0x0800) or ARP (0x0806) written to the TAP so
    /// far; IPv6 housekeeping (router solicitations, MLD) is ignored.
    fn ipv4_frames_on(tap: &OpenedTap) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let mut fds = [PollFd::new(tap.fd.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).expect("poll TAP") == 0 {
                return frames;
            }
            let n = nix::unistd::read(&tap.fd, &mut buf).expect("read TAP");
            if n >= 14 && matches!(buf[12..14], [0x08, 0x00] | [0x08, 0x06]) {
                frames.push(buf[..n].to_vec());
            }
        }
    }

    fn rules(pid: i32) -> String {
        let out = nsenter(pid, &["ip", "rule"]).output().expect("ip rule");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn transparent_connections_keep_the_client_address() {
        if !tools_present() {
            return;
        }
        let Some(g) = guest() else {
            return;
        };
        let pid = g.cmd.pid();
        let mut agent = Agent::spawn(&Target::Pid(pid)).expect("spawn agent");
        assert!(agent.is_alive());
        let port = 8080;
        let server = Server::start(pid, port);
        let guest_ep = SocketAddrV4::new(GUEST, port);

        agent.route_replies(guest_ep).expect("route_replies");
        agent.route_replies(guest_ep).expect("route_replies nests");
        let listed = rules(pid);
        let rule = format!("from 10.0.2.100 ipproto tcp sport {port} lookup 21070");
        assert_eq!(listed.matches(&rule).count(), 1, "{listed}");
        assert!(listed.contains("100:"), "{listed}");
        let table = nsenter(pid, &["ip", "route", "show", "table", "21070"])
            .output()
            .expect("ip route");
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(table.contains("local default dev lo"), "{table}");

        // A client from elsewhere, and a host-loopback client shown as the
        // on-link gateway.
        for client in [
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 40001),
        ] {
            let fd = agent
                .connect_transparent(client, guest_ep)
                .expect("connect_transparent");
            let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
            assert_ne!(fl & libc::O_NONBLOCK, 0, "must be non-blocking");
            let fdfl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
            assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "must be close-on-exec");
            connected(&fd);
            assert_eq!(local_and_peer(&fd), (client, guest_ep));
            assert_eq!(server.line(), format!("peer {client}"));
            echo(&fd, b"hello through the namespace");
            echo(&fd, &vec![0x5a; 200_000]);
            // The same client address again while it is connected.
            let err = agent
                .connect_transparent(client, guest_ep)
                .expect_err("four-tuple in use");
            let errno = AgentError::of(&err).and_then(AgentError::errno);
            assert!(
                matches!(errno, Some(Errno::EADDRINUSE | Errno::EADDRNOTAVAIL)),
                "{err}"
            );
            assert!(agent.is_alive());
        }

        // Without transparency the server sees the guest's own address.
        let fd = agent.connect_plain(guest_ep).expect("connect_plain");
        connected(&fd);
        let (local, _) = local_and_peer(&fd);
        assert_eq!(*local.ip(), GUEST);
        assert_eq!(server.line(), format!("peer {local}"));
        echo(&fd, b"plain");
        drop(fd);

        // No server: the socket comes back and the connect is refused (the
        // guest's RST is a reply too, so it needs the rule as well).
        let closed = SocketAddrV4::new(GUEST, 9);
        agent.route_replies(closed).expect("route_replies");
        let fd = agent
            .connect_transparent(
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40002),
                closed,
            )
            .expect("socket for a closed port");
        wait_for(fd.as_fd(), PollFlags::POLLOUT);
        let err = nix::sys::socket::getsockopt(&fd, sockopt::SocketError).expect("SO_ERROR");
        assert_eq!(Errno::from_raw(err), Errno::ECONNREFUSED);
        agent.unroute_replies(closed).expect("unroute_replies");

        // Nothing of this left the namespace through the TAP.
        let leaked = ipv4_frames_on(&g.tap);
        assert!(leaked.is_empty(), "IPv4/ARP frames on the TAP: {leaked:?}");

        // listening() sees the python server's sockets.
        let list = agent.listening().expect("listening");
        assert!(
            list.contains(&(Proto::Tcp, SocketAddr::V4(guest_ep))),
            "{list:?}"
        );
        assert!(
            list.contains(&(
                Proto::Udp,
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port + 1)
            )),
            "{list:?}"
        );
        assert!(
            !list
                .iter()
                .any(|(p, a)| *p == Proto::Tcp && a.port() == 40000),
            "connections are not listeners: {list:?}"
        );

        // Unrouting nests too; the last one removes the rule.
        agent.unroute_replies(guest_ep).expect("unroute 1");
        assert!(rules(pid).contains(&rule));
        agent.unroute_replies(guest_ep).expect("unroute 2");
        assert!(!rules(pid).contains(&rule), "{}", rules(pid));
        agent
            .unroute_replies(guest_ep)
            .expect("unroute when absent");
        drop(server);
    }

    #[test]
    fn agent_exits_when_dropped() {
        if !tools_present() {
            return;
        }
        let Some(g) = guest() else {
            return;
        };
        let mut agent = Agent::spawn(&Target::Pid(g.cmd.pid())).expect("spawn agent");
        let pid = Pid::from_raw(agent.pid());
        agent
            .route_replies(SocketAddrV4::new(GUEST, 443))
            .expect("route_replies");
        assert!(rules(g.cmd.pid()).contains("sport 443 lookup 21070"));
        drop(agent);
        // Its rules went with it.
        let left = rules(g.cmd.pid());
        assert!(!left.contains("lookup 21070"), "{left}");
        // Already reaped by the drop.
        assert_eq!(waitpid(pid, None), Err(Errno::ECHILD));
    }

    /// Whether `pid` is gone or a zombie.
    fn dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[test]
    fn agent_exits_when_its_parent_dies() {
        let Some(g) = guest() else {
            return;
        };
        let target = Target::Pid(g.cmd.pid());
        let (r, w) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child spawns the agent (system calls and small
        // allocations), writes its pid and waits to be killed; it leaves
        // only through `exit_child`.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                drop(r);
                let Ok(agent) = Agent::spawn(&target) else {
                    return 1;
                };
                let _ = nix::unistd::write(&w, &agent.pid().to_ne_bytes());
                loop {
                    nix::unistd::pause();
                }
            }),
            ForkResult::Parent { child } => {
                drop(w);
                let mut buf = [0u8; 4];
                let n = nix::unistd::read(&r, &mut buf).expect("read agent pid");
                assert_eq!(n, 4, "the middle process could not spawn the agent");
                let agent_pid = i32::from_ne_bytes(buf);
                assert!(!dead(agent_pid));
                kill_and_reap(child);
                let deadline = Instant::now() + Duration::from_secs(5);
                while !dead(agent_pid) {
                    assert!(Instant::now() < deadline, "agent {agent_pid} outlived rnet");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    #[test]
    fn lost_descriptor_keeps_the_agent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let Ok(SocketAddr::V4(addr)) = listener.local_addr() else {
            panic!("IPv4 listener expected");
        };
        // SAFETY: the child spawns an agent (system calls and small
        // allocations) and leaves only through `exit_child`.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                let Ok(mut agent) = Agent::spawn(&Target::Pid(std::process::id() as i32)) else {
                    return 2;
                };
                // Leave no free descriptor number: a limit just above the
                // highest one open, and every hole below filled.
                let max = std::fs::read_dir("/proc/self/fd")
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                            .max()
                            .unwrap_or(3)
                    })
                    .unwrap_or(1024);
                let (_, hard) =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .unwrap_or((0, 4096));
                if nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    max + 1,
                    hard,
                )
                .is_err()
                {
                    return 3;
                }
                let mut fill = Vec::new();
                while let Ok(fd) = nix::fcntl::open(
                    "/dev/null",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                ) {
                    fill.push(fd);
                }
                if agent.submit(Submit::Plain(addr)).is_err() {
                    return 4;
                }
                let end = Instant::now() + Duration::from_secs(5);
                loop {
                    match agent.try_reply() {
                        Ok(Some(Reply::Ok {
                            fd: None,
                            fd_lost: true,
                        })) => break,
                        Ok(None) if Instant::now() < end => {
                            let Some(raw) = agent.raw_fd() else { return 5 };
                            // SAFETY: the agent's socket, open while
                            // `agent` lives, borrowed for the poll only.
                            let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                            launcher::wait_readable(fd, Duration::from_millis(100));
                        }
                        other => {
                            let msg = format!("unexpected answer: {other:?}\n");
                            // SAFETY: writing a buffer to stderr.
                            unsafe {
                                libc::write(2, msg.as_ptr().cast(), msg.len());
                            }
                            return 6;
                        }
                    }
                }
                drop(fill);
                // The agent was not blamed and still serves.
                match agent.connect_plain(addr) {
                    Ok(_) if agent.is_alive() => 0,
                    _ => 7,
                }
            }),
            ForkResult::Parent { child } => {
                assert_eq!(
                    super::super::process::reap(child),
                    Ok(Some(nix::sys::wait::WaitStatus::Exited(child, 0)))
                );
            }
        }
    }

    #[test]
    fn spawn_errors() {
        assert!(matches!(
            Agent::spawn(&Target::Pid(4_000_000)),
            Err(NsError::NoSuchProcess(4_000_000))
        ));
    }

    #[test]
    fn own_namespace_agent_lists_sockets() {
        // Our own namespaces: nothing to join, the agent only forks.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut agent = Agent::spawn(&Target::Pid(std::process::id() as i32)).expect("spawn agent");
        let list = agent.listening().expect("listening");
        assert!(list.contains(&(Proto::Tcp, addr)), "{addr} not in {list:?}");
    }

    #[test]
    fn requests_round_trip() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 100), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000);
        for req in [
            Request::Route(a),
            Request::Unroute(a),
            Request::Transparent {
                client: b,
                guest: a,
            },
            Request::Plain(a),
            Request::Listening,
        ] {
            let bytes = req.encode();
            assert!(bytes.len() <= MAX_REQUEST);
            assert_eq!(Request::decode(&bytes), Some(req));
        }
        assert_eq!(Request::decode(&[]), None);
        assert_eq!(Request::decode(b"R12"), None);
        assert_eq!(Request::decode(b"L1"), None);
        assert_eq!(Request::decode(b"X"), None);
    }

    #[test]
    fn proc_net_parsing() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 6402000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 6402000A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: garbage
";
        let got = parse_proc_net(tcp, Proto::Tcp);
        let want: SocketAddr = "10.0.2.100:8080".parse().expect("addr");
        if cfg!(target_endian = "little") {
            assert_eq!(got, vec![want]);
        }
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07
";
        assert_eq!(
            parse_proc_net(tcp6, Proto::Tcp),
            vec!["[::]:80".parse::<SocketAddr>().expect("addr")]
        );
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net(tcp6, Proto::Udp),
                vec!["[::1]:53".parse::<SocketAddr>().expect("addr")]
            );
        }
    }

    #[test]
    fn listing_round_trip() {
        let list = vec![
            (Proto::Tcp, "10.0.2.100:80".parse().expect("addr")),
            (Proto::Udp, "[::1]:53".parse().expect("addr")),
        ];
        let mut bytes = Vec::new();
        encode_listing(&list, &mut bytes);
        assert_eq!(decode_listing(&bytes), Some(list));
        assert_eq!(decode_listing(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_listing(b"x4"), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.8.0-45-generic\n"), Some((6, 8)));
        assert_eq!(kernel_version("4.17"), Some((4, 17)));
        assert_eq!(kernel_version("weird"), None);
        assert!(Some((4, 9)) < Some((4, 17)));
    }

    #[test]
    fn errors_carry_the_errno() {
        let e = AgentError::Request {
            errno: Errno::EADDRINUSE,
            context: "bind 10.0.2.2:1".into(),
        }
        .into_io();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            AgentError::of(&e).and_then(AgentError::errno),
            Some(Errno::EADDRINUSE)
        );
        assert_eq!(
            e.to_string(),
            "in the namespace: bind 10.0.2.2:1: Address already in use"
        );
        let gone = AgentError::Gone("was killed by signal SIGKILL".into()).into_io();
        assert_eq!(gone.kind(), io::ErrorKind::BrokenPipe);
        assert!(gone.to_string().contains("spawn a new one"));
    }
}
