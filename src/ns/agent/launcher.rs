//! The agent launcher: a small process forked from rnet before the sandbox
//! that holds the target's namespace descriptors and forks a fresh,
//! confined agent whenever rnet asks, so rnet can replace an agent that
//! died, stalled or misbehaved although its own sandbox forbids `fork` and
//! `setns`.
//!
//! # Protocol
//!
//! One SEQPACKET datagram per message. rnet sends `S` (start an agent) or
//! `K` + pid (kill that agent, one of the launcher's children). The launcher
//! answers `S` with `A` + pid and, as SCM_RIGHTS, rnet's end of the new
//! agent's socket pair, or `E` + errno. Numbers are 4 bytes little-endian.
//! The agent's own "joined" report then arrives on that socket.
//!
//! The launcher stays in rnet's namespaces and never talks to the guest. It
//! is undumpable, has an empty environment, `/dev/null` as standard
//! descriptors and nothing else open but its socket and the two namespace
//! descriptors, no_new_privs, and of its capabilities only those its agents
//! need before they join a user namespace (`CAP_SYS_ADMIN`,
//! `CAP_NET_ADMIN`, `CAP_NET_BIND_SERVICE`, `CAP_SETPCAP`; none when rnet
//! runs unprivileged). It has no seccomp filter: its agents inherit it and
//! need, until they install their own, the calls of their whole set-up
//! (setns, mounts, pivot_root, capset, seccomp); its only input is rnet's
//! socket, two fixed-size messages. It gets SIGKILL when rnet's thread that
//! created it ends, and exits (killing its agents) when rnet closes the
//! socket. Its agents get SIGKILL when it dies.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::SockFlag;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Pid, getpid, getppid};

use super::confine;
use super::{Agent, AgentOptions, agent_main, reset_signals};
use crate::ns::fdpass::{recv_with_fd, send_with_fd};
use crate::ns::nsfile::{JoinPlan, open_target};
use crate::ns::process::{fork_helper, kill_and_reap};
use crate::ns::{NsError, Target};

/// How long the blocking helpers wait for the launcher or a new agent.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable of the test hook that makes every agent answer
/// connection requests with a pipe instead of a socket (see
/// `AgentOptions::bad_fd`). Read once, when the launcher starts; for
/// rnet's own tests only.
pub const TEST_BAD_FD_ENV: &str = "RNET_TEST_AGENT_BAD_FD";

/// rnet's handle on the launcher. Dropping it closes the socket (the
/// launcher then kills its agents and exits) and kills and reaps it.
#[derive(Debug)]
pub struct Launcher {
    pid: Pid,
    sock: OwnedFd,
    target: Target,
}

impl Launcher {
    /// Forks the launcher for `target` (whose namespace files it opens
    /// now). Call before the sandbox, from a thread that lives as long as
    /// the launcher should (its parent-death signal follows that thread).
    pub fn spawn(target: &Target) -> Result<Arc<Launcher>, NsError> {
        let plan = open_target(target)?;
        let opts = AgentOptions {
            bad_fd: std::env::var_os(TEST_BAD_FD_ENV).is_some_and(|v| v == "1"),
        };
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|errno| NsError::Os {
            what: "cannot open /dev/null for the namespace agent",
            errno,
        })?;
        let parent = getpid();
        let (child, parent_sock) = fork_helper(SockFlag::SOCK_NONBLOCK, |child_sock| {
            launcher_main(parent, plan, child_sock, null, opts)
        })
        .map_err(|errno| NsError::Os {
            what: "cannot fork the agent launcher",
            errno,
        })?;
        let launcher = Launcher {
            pid: child,
            sock: parent_sock,
            target: target.clone(),
        };
        let mut buf = [0u8; 8];
        match launcher.recv_blocking(&mut buf, START_TIMEOUT) {
            Ok((1, None)) if buf[0] == b'L' => Ok(Arc::new(launcher)),
            Ok(_) => Err(NsError::Helper {
                detail: "the agent launcher sent a bad start report".to_owned(),
            }),
            Err(detail) => Err(NsError::Helper {
                detail: format!("the agent launcher {detail}"),
            }),
        }
    }

    /// The launcher's process id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The control socket (non-blocking), for an event loop to watch.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The target the agents join.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Asks for a new agent (answered by [`Launcher::receive_agent`]).
    pub fn request_agent(&self) -> io::Result<()> {
        send_with_fd(self.sock.as_fd(), b"S", None).map_err(io::Error::from)
    }

    /// Asks the launcher to kill its agent `pid` (best effort).
    pub(super) fn kill_agent(&self, pid: Pid) {
        let mut msg = vec![b'K'];
        msg.extend_from_slice(&pid.as_raw().to_le_bytes());
        let _ = send_with_fd(self.sock.as_fd(), &msg, None);
    }

    /// The agent a [`Launcher::request_agent`] produced, once the launcher
    /// has answered (`Ok(None)`: not yet). The agent's "joined" report is
    /// still to come: see [`Agent::poll_joined`].
    pub fn receive_agent(self: &Arc<Self>) -> io::Result<Option<Agent>> {
        let mut buf = [0u8; 16];
        let got = match recv_with_fd(self.sock.as_fd(), &mut buf) {
            Ok(g) => g,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.decode_agent(&buf, got.len, got.fd, got.truncated)
            .map(Some)
    }

    fn decode_agent(
        self: &Arc<Self>,
        buf: &[u8],
        len: usize,
        fd: Option<OwnedFd>,
        truncated: bool,
    ) -> io::Result<Agent> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the agent launcher is gone",
            ));
        }
        let num =
            |b: &[u8]| -> Option<i32> { Some(i32::from_le_bytes(b.get(1..5)?.try_into().ok()?)) };
        match (buf[0], len, fd) {
            (b'A', 5, Some(fd)) if !truncated => {
                let pid = num(buf).unwrap_or(0);
                Agent::from_launcher(Pid::from_raw(pid), fd, self.clone())
            }
            (b'E', 5, None) => Err(io::Error::from_raw_os_error(num(buf).unwrap_or(libc::EIO))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the agent launcher sent a bad reply",
            )),
        }
    }

    /// Starts an agent and waits for it to join the namespaces.
    pub fn spawn_agent(self: &Arc<Self>) -> Result<Agent, NsError> {
        let helper = |detail: String| NsError::Helper { detail };
        self.request_agent()
            .map_err(|e| helper(format!("the agent launcher cannot be reached: {e}")))?;
        let mut buf = [0u8; 16];
        let (len, fd) = self
            .recv_blocking(&mut buf, START_TIMEOUT)
            .map_err(|d| helper(format!("the agent launcher {d}")))?;
        let mut agent = self
            .decode_agent(&buf, len, fd, false)
            .map_err(|e| helper(format!("cannot start the namespace agent: {e}")))?;
        agent.wait_joined(START_TIMEOUT)?;
        Ok(agent)
    }

    /// Blocking receive with a timeout; the error says what went wrong.
    fn recv_blocking(
        &self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<(usize, Option<OwnedFd>), String> {
        let end = Instant::now() + timeout;
        loop {
            match recv_with_fd(self.sock.as_fd(), buf) {
                Ok(g) if g.len == 0 => return Err("ended without answering".to_owned()),
                Ok(g) if g.truncated => return Err("sent a truncated reply".to_owned()),
                Ok(g) => return Ok((g.len, g.fd)),
                Err(Errno::EAGAIN) => {}
                Err(e) => return Err(format!("cannot be read from: {}", e.desc())),
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "did not answer within {} seconds",
                    timeout.as_secs()
                ));
            }
            wait_readable(self.sock.as_fd(), left);
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

/// Waits until `fd` is readable or `left` has passed.
pub(super) fn wait_readable(fd: BorrowedFd<'_>, left: Duration) {
    let ms = u16::try_from(left.as_millis().clamp(1, 10_000)).unwrap_or(10_000);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// The launcher after fork. Returns its exit code.
fn launcher_main(
    parent: Pid,
    plan: JoinPlan,
    sock: OwnedFd,
    null: OwnedFd,
    opts: AgentOptions,
) -> i32 {
    let _ = confine::undumpable();
    crate::sys::stdio_to_null(null.as_raw_fd());
    let mut keep = vec![sock.as_raw_fd(), null.as_raw_fd()];
    keep.extend(plan.user.iter().chain(&plan.net).map(|f| f.as_raw_fd()));
    confine::close_all_but(&keep);
    reset_signals();
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
        return 1;
    }
    let _ = confine::clear_environment();
    // What its agents may need before they join a user namespace (where
    // they get a full set there): joining and mounting, rules, low ports,
    // and dropping the bounding set. Nothing else, and no_new_privs.
    let keep = [
        confine::CAP_SYS_ADMIN,
        confine::CAP_NET_ADMIN,
        confine::CAP_NET_BIND_SERVICE,
        confine::CAP_SETPCAP,
    ]
    .iter()
    .fold(0u64, |m, c| m | (1 << c));
    if crate::sandbox::drop_capabilities(keep).is_err()
        || nix::sys::prctl::set_no_new_privs().is_err()
    {
        return 1;
    }
    // The launcher blocks on its socket; rnet's end is non-blocking.
    let _ = nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    );
    if send_with_fd(sock.as_fd(), b"L", None).is_err() {
        return 1;
    }
    let me = getpid();
    let mut children: HashSet<Pid> = HashSet::new();
    let mut buf = [0u8; 16];
    let code = loop {
        let got = match recv_with_fd(sock.as_fd(), &mut buf) {
            Ok(g) => g,
            Err(_) => break 1,
        };
        if got.len == 0 {
            break 0;
        }
        drop(got.fd);
        match (buf[0], got.len) {
            (b'S', 1) => {
                let reply = start_agent(me, &plan, &null, opts);
                let sent = match reply {
                    Ok((pid, fd)) => {
                        children.insert(pid);
                        let mut msg = vec![b'A'];
                        msg.extend_from_slice(&pid.as_raw().to_le_bytes());
                        send_with_fd(sock.as_fd(), &msg, Some(fd.as_fd()))
                    }
                    Err(errno) => {
                        let mut msg = vec![b'E'];
                        msg.extend_from_slice(&(errno as i32).to_le_bytes());
                        send_with_fd(sock.as_fd(), &msg, None)
                    }
                };
                if sent.is_err() {
                    break 1;
                }
            }
            (b'K', 5) => {
                let pid = Pid::from_raw(i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]));
                if children.contains(&pid) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            _ => {}
        }
        // Collect the agents that ended.
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            match status.pid() {
                Some(pid) => {
                    children.remove(&pid);
                }
                None => break,
            }
        }
    };
    for pid in children {
        kill_and_reap(pid);
    }
    code
}

/// Forks one agent; returns its pid and rnet's end of its socket pair.
fn start_agent(
    me: Pid,
    plan: &JoinPlan,
    null: &OwnedFd,
    opts: AgentOptions,
) -> Result<(Pid, OwnedFd), Errno> {
    // The agent closes everything but its own socket (the launcher's
    // included) first thing.
    fork_helper(SockFlag::empty(), |agent_end| {
        agent_main(me, plan, agent_end, null.as_raw_fd(), opts)
    })
}
