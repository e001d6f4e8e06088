//! The namespace agent: a long-lived helper process inside the target's user
//! and network namespaces that opens guest-side TCP sockets for the
//! published-port fast path and hands them back over SCM_RIGHTS, so rnet can
//! move bytes between an accepted host connection and the guest server with
//! splice(2) instead of carrying them through its userspace TCP stack.
//!
//! Files: this one holds rnet's client side ([`Agent`]); `proto.rs` the
//! wire protocol between the two; `child.rs` the agent's own code, what
//! runs in the namespace; `launcher.rs` the process that forks agents on
//! request ([`Launcher`]); `confine.rs` the confinement every helper in a
//! guest's namespaces applies to itself.
//!
//! # Trust
//!
//! The agent lives where the guest is root. It is confined as
//! `confine` describes: undumpable before it joins anything, no
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

mod child;
pub(crate) mod confine;
pub mod launcher;
mod proto;

pub use launcher::Launcher;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::fdpass::{recv_with_fd, send_with_fd};
use super::open_tap::tap_error;
use super::report::{self, MAX_REPORT, Report};
use super::{NsError, Target};
use crate::ports::Proto;
use child::{agent_main, reset_signals};
use proto::{MAX_REPLY, Request, decode_listing};

/// The routing table holding `local 0.0.0.0/0 dev lo` ("RN").
pub const REPLY_TABLE: u32 = 0x524e;
/// Priority of the per-endpoint rules (before `main` at 32766).
pub const REPLY_RULE_PRIORITY: u32 = 100;

/// How long the parent waits for any answer of the agent.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
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
/// `REPLY_TIMEOUT` for the answer; an event loop uses [`Agent::submit`]
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

#[cfg(test)]
mod tests;
