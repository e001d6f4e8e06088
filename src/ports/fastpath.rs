//! The fast path's agent ([`FastPath`]), seen from the event loop: the
//! exchange with the namespace agent ([`crate::ns::Agent`]) and its
//! launcher ([`crate::ns::Launcher`]), their health, and what becomes of
//! each connection handed to them ([`Outcome`]).
//!
//! # Theory of operation
//!
//! The loop never waits for the agent: its socket is non-blocking and
//! watched by the loop (token [`AGENT`]), a connection accepted on a fast
//! listener is held while its request is out (at most `MAX_OUTSTANDING`
//! requests, each with a deadline of `AGENT_DEADLINE`), and the answer
//! starts the spliced flow ([`super::splice`]). While the agent is not
//! ready, or when it is declared unhealthy (it closed its socket, missed a
//! deadline, broke the protocol or sent a descriptor that fails
//! [`super::splice::check_guest_socket`]), connections take the stack path,
//! held ones included; the trouble is logged once, the agent is killed
//! and, after a backoff (`BACKOFF_MIN` doubling up to `BACKOFF_MAX`), a new
//! one is asked of the launcher (token [`LAUNCHER`]), forked before rnet's
//! sandbox because the sandbox forbids `fork` and `setns`. A descriptor
//! lost to a full descriptor table (`MSG_CTRUNC`) is not the agent's fault:
//! the pipes held in reserve are closed to make room, the loss is counted
//! and the connection takes the stack path.
//!
//! [`FastPath`] owns none of the flows: every call that settles a
//! connection reports it as an [`Outcome`], and the loop starts the stack
//! flow or the spliced one.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use smoltcp::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::ns::{Agent, Launcher, Reply, Submit, Target};
use crate::stats::{DropReason, Stats};

/// Token of the agent's control socket.
pub(crate) const AGENT: Token = Token(4);
/// Token of the launcher's control socket.
pub(crate) const LAUNCHER: Token = Token(5);

/// How long one agent request may stay unanswered before the agent is
/// declared stalled.
const AGENT_DEADLINE: Duration = Duration::from_millis(1500);
/// How long a new agent may take to be forked and to join the namespaces.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(5);
/// Agent requests outstanding at most; more connections take the stack.
const MAX_OUTSTANDING: usize = 64;
/// First and longest wait before a new agent is asked for.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Releases kept for a later agent at most.
const MAX_DEFERRED: usize = 4096;
/// Descriptors held in reserve (pipes: two each) for the moment a
/// descriptor from the agent finds no free number.
const RESERVE_PIPES: usize = 2;

/// An accepted connection of a fast listener, on its way to the guest.
pub(crate) struct Conn {
    pub(crate) stream: mio::net::TcpStream,
    pub(crate) peer: SocketAddr,
    /// The client as the guest sees it.
    pub(crate) client: SocketAddrV4,
    pub(crate) guest: SocketAddrV4,
    /// The rule it came in by.
    pub(crate) rule: u64,
}

/// What became of a connection handed to the fast path.
pub(crate) enum Outcome {
    /// It takes the stack path.
    Stack(Conn),
    /// The agent opened its guest side and rnet checked it: splice the two
    /// (`transparent`: bound to the client's address, whose reply rule is
    /// released when the flow ends).
    Splice {
        conn: Conn,
        fd: OwnedFd,
        transparent: bool,
    },
}

/// Where the agent of the fast path stands.
enum AgentState {
    /// No fast path (not asked for, or it cannot work here).
    Off,
    /// Serving requests.
    Ready(Agent),
    /// Forked, waiting for its "joined" report until the deadline.
    Joining(Agent, Instant),
    /// A new agent was asked of the launcher, until the deadline.
    Requested(Instant),
    /// Unhealthy: a new agent is asked for at this time.
    Backoff(Instant),
}

/// A request the agent has not answered yet.
struct Pending {
    what: PendingWhat,
    deadline: Instant,
}

enum PendingWhat {
    Connect { conn: Conn, transparent: bool },
    Release(SocketAddrV4),
}

/// The fast path's agent and everything the loop keeps about it. While the
/// agent is anything but ready, published TCP ports take the stack path.
pub struct FastPath {
    target: Option<Target>,
    launcher: Option<std::sync::Arc<Launcher>>,
    state: AgentState,
    /// Answers expected from the agent, oldest first (it answers in order).
    pending: VecDeque<Pending>,
    /// Consecutive agent failures (for the backoff).
    failures: u32,
    /// Agents started after the first.
    restarts: u64,
    /// Whether the current trouble was logged.
    warned: bool,
    reserve: Vec<OwnedFd>,
    next_refill: Instant,
    /// Per-connection reply rules to remove once an agent can take the
    /// request (their connection ended, or never got its socket, while no
    /// agent was ready): a rule left behind would divert the guest's
    /// replies to a later stack-path connection from the same client.
    deferred: Vec<SocketAddrV4>,
}

impl Default for FastPath {
    fn default() -> Self {
        FastPath {
            target: None,
            launcher: None,
            state: AgentState::Off,
            pending: VecDeque::new(),
            failures: 0,
            restarts: 0,
            warned: false,
            reserve: Vec::new(),
            next_refill: Instant::ZERO,
            deferred: Vec::new(),
        }
    }
}

impl FastPath {
    /// Asks for the fast path in `target`'s namespaces.
    pub(crate) fn enable(&mut self, target: Target) {
        self.target = Some(target);
    }

    /// Whether the fast path exists at all (a launcher runs).
    pub(crate) fn enabled(&self) -> bool {
        self.launcher.is_some()
    }

    /// Whether a new connection can go through the agent now.
    pub(crate) fn ready(&self) -> bool {
        matches!(self.state, AgentState::Ready(_)) && self.pending.len() < MAX_OUTSTANDING
    }

    /// Starts the launcher and the first agent, watched by `reg`. Blocks (up
    /// to a few seconds) for the agent: this runs at start-up. True when
    /// the agent is ready (the loop then moves its TCP rules onto it).
    pub(crate) fn start(&mut self, reg: &Registry) -> bool {
        let Some(target) = self.target.take() else {
            return false;
        };
        let started = Launcher::spawn(&target).and_then(|l| {
            let agent = l.spawn_agent()?;
            Ok((l, agent))
        });
        let (launcher, agent) = match started {
            Ok(x) => x,
            Err(e) => {
                warn!(
                    "fast path for published TCP ports unavailable ({e}); they use the stack path"
                );
                return false;
            }
        };
        let registered = reg
            .register(
                &mut SourceFd(&launcher.raw_fd()),
                LAUNCHER,
                Interest::READABLE,
            )
            .and_then(|()| match agent.raw_fd() {
                Some(fd) => reg.register(&mut SourceFd(&fd), AGENT, Interest::READABLE),
                None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
            });
        if let Err(e) = registered {
            warn!(
                "fast path for published TCP ports unavailable (cannot watch the agent: {e}); they use the stack path"
            );
            return false;
        }
        info!(
            pid = agent.pid(),
            launcher = launcher.pid(),
            "namespace agent ready"
        );
        self.launcher = Some(launcher);
        self.state = AgentState::Ready(agent);
        self.refill_reserve(crate::stack::now());
        true
    }

    /// Hands an accepted connection to the agent (the answer comes later,
    /// through [`FastPath::on_event`]); given back if it cannot take it.
    pub(crate) fn submit(&mut self, conn: Conn) -> Result<(), Conn> {
        let submitted = match &mut self.state {
            AgentState::Ready(agent) if self.pending.len() < MAX_OUTSTANDING => agent
                .submit(Submit::Transparent {
                    client: conn.client,
                    guest: conn.guest,
                })
                .is_ok(),
            _ => false,
        };
        if !submitted {
            return Err(conn);
        }
        self.pending.push_back(Pending {
            what: PendingWhat::Connect {
                conn,
                transparent: true,
            },
            deadline: crate::stack::now() + AGENT_DEADLINE,
        });
        Ok(())
    }

    /// The agent's or the launcher's socket is readable; the connections
    /// this settles are pushed to `out`.
    pub(crate) fn on_event(
        &mut self,
        token: Token,
        reg: &Registry,
        stats: &Stats,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        if token == LAUNCHER {
            self.launcher_event(reg, now, out);
            return;
        }
        match &mut self.state {
            AgentState::Joining(agent, _) => match agent.poll_joined() {
                Ok(false) => return,
                Ok(true) => {
                    let AgentState::Joining(agent, _) =
                        std::mem::replace(&mut self.state, AgentState::Off)
                    else {
                        return;
                    };
                    info!(
                        pid = agent.pid(),
                        "namespace agent restarted; published TCP ports use the fast path again"
                    );
                    self.restarts += 1;
                    self.warned = false;
                    self.state = AgentState::Ready(agent);
                }
                Err(e) => {
                    self.unhealthy(&format!("a new agent failed: {e}"), reg, now, out);
                    return;
                }
            },
            AgentState::Ready(_) => {}
            _ => return,
        }
        // Answers, in the order of the requests.
        loop {
            let AgentState::Ready(agent) = &mut self.state else {
                return;
            };
            let reply = match agent.try_reply() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    self.unhealthy(&e.to_string(), reg, now, out);
                    return;
                }
            };
            let Some(p) = self.pending.pop_front() else {
                self.unhealthy("answered a request that was never sent", reg, now, out);
                return;
            };
            if let PendingWhat::Connect { conn, transparent } = p.what
                && let Some(why) = self.answered(conn, transparent, reply, stats, now, out)
            {
                self.unhealthy(&why, reg, now, out);
            }
        }
    }

    /// One answer of the agent to the connection request for `conn`;
    /// what makes the agent unhealthy, if the answer does.
    fn answered(
        &mut self,
        conn: Conn,
        transparent: bool,
        reply: Reply,
        stats: &Stats,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) -> Option<String> {
        let fd = match reply {
            Reply::Ok { fd: Some(fd), .. } => fd,
            Reply::Ok {
                fd: None,
                fd_lost: true,
            } => {
                // No free descriptor number in rnet: free the reserve so
                // this connection (on the stack path) and the next ones
                // have room; the agent did nothing wrong.
                self.reserve.clear();
                self.next_refill = now + Duration::from_secs(1);
                stats.count_drop(DropReason::AgentFdLost);
                warn!(
                    "a descriptor from the namespace agent was lost (rnet is out of descriptors; raise its open-file limit); the connection takes the stack path"
                );
                if transparent {
                    self.release(conn.client);
                }
                out.push(Outcome::Stack(conn));
                return None;
            }
            Reply::Ok { fd: None, .. } => {
                out.push(Outcome::Stack(conn));
                return Some("reported success but sent no descriptor".into());
            }
            Reply::Refused(e) => {
                if transparent {
                    self.connect_plainly(conn, &e, now, out);
                } else {
                    debug!(error = %e, "plain connect failed");
                    stats.count_drop(DropReason::HostSocket);
                }
                return None;
            }
        };
        let expect_local = transparent.then_some(conn.client);
        if let Err(why) = super::splice::check_guest_socket(&fd, expect_local, conn.guest) {
            drop(fd);
            stats.count_drop(DropReason::AgentBadFd);
            out.push(Outcome::Stack(conn));
            return Some(format!(
                "sent a descriptor that is not the socket asked for ({why:?})"
            ));
        }
        self.failures = 0;
        out.push(Outcome::Splice {
            conn,
            fd,
            transparent,
        });
        None
    }

    /// A transparent connect was refused: the client's address cannot be
    /// reused right now (e.g. the same loopback port still in TIME-WAIT),
    /// so the agent connects without it, or the stack path takes it.
    fn connect_plainly(
        &mut self,
        conn: Conn,
        e: &crate::ns::AgentError,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        debug!(client = %conn.client, error = %e, "transparent connect failed; connecting plainly");
        let again = match &mut self.state {
            AgentState::Ready(agent) => agent.submit(Submit::Plain(conn.guest)).is_ok(),
            _ => false,
        };
        if again {
            self.pending.push_back(Pending {
                what: PendingWhat::Connect {
                    conn,
                    transparent: false,
                },
                deadline: now + AGENT_DEADLINE,
            });
        } else {
            out.push(Outcome::Stack(conn));
        }
    }

    /// The launcher answered (a new agent), or went away.
    fn launcher_event(&mut self, reg: &Registry, now: Instant, out: &mut Vec<Outcome>) {
        let Some(launcher) = self.launcher.clone() else {
            return;
        };
        loop {
            match launcher.receive_agent() {
                Ok(None) => return,
                Ok(Some(agent)) => {
                    if !matches!(self.state, AgentState::Requested(_)) {
                        // Not asked for (any more): let it go.
                        drop(agent);
                        continue;
                    }
                    let watched = agent.raw_fd().is_some_and(|fd| {
                        reg.register(&mut SourceFd(&fd), AGENT, Interest::READABLE)
                            .is_ok()
                    });
                    if !watched {
                        self.unhealthy("cannot watch the new agent", reg, now, out);
                        continue;
                    }
                    self.state = AgentState::Joining(agent, now + AGENT_START_DEADLINE);
                }
                Err(e) => {
                    warn!(
                        "the namespace agent's launcher is gone ({e}); published TCP ports use the stack path from now on"
                    );
                    let _ = reg.deregister(&mut SourceFd(&launcher.raw_fd()));
                    self.launcher = None;
                    if !matches!(self.state, AgentState::Ready(_)) {
                        self.state = AgentState::Off;
                    }
                    return;
                }
            }
        }
    }

    /// Deadlines of the agent's requests and restarts; run every loop turn.
    pub(crate) fn tick(&mut self, reg: &Registry, now: Instant, out: &mut Vec<Outcome>) {
        if !self.enabled() {
            if let AgentState::Ready(_) = self.state {
                // The launcher went; the agent may keep serving.
            } else {
                return;
            }
        }
        self.refill_reserve(now);
        if !self.deferred.is_empty() {
            self.flush_deferred();
        }
        if self.pending.front().is_some_and(|p| p.deadline <= now) {
            self.unhealthy(
                &format!("did not answer within {} ms", AGENT_DEADLINE.total_millis()),
                reg,
                now,
                out,
            );
        }
        match self.state {
            AgentState::Joining(_, at) if at <= now => {
                self.unhealthy(
                    "a new agent did not join the namespaces in time",
                    reg,
                    now,
                    out,
                );
            }
            AgentState::Requested(at) if at <= now => {
                self.unhealthy(
                    "the launcher did not start a new agent in time",
                    reg,
                    now,
                    out,
                );
            }
            AgentState::Backoff(at) if at <= now => {
                let asked = self
                    .launcher
                    .as_ref()
                    .is_some_and(|l| l.request_agent().is_ok());
                self.state = if asked {
                    AgentState::Requested(now + AGENT_START_DEADLINE)
                } else {
                    AgentState::Off
                };
            }
            _ => {}
        }
    }

    /// The agent died, stalled or misbehaved: it is killed, its waiting
    /// connections take the stack path, and a new one is asked for after a
    /// backoff. Logged once per incident.
    fn unhealthy(&mut self, why: &str, reg: &Registry, now: Instant, out: &mut Vec<Outcome>) {
        let old = std::mem::replace(&mut self.state, AgentState::Off);
        let pid = match old {
            AgentState::Ready(mut a) | AgentState::Joining(mut a, _) => {
                if let Some(fd) = a.raw_fd() {
                    let _ = reg.deregister(&mut SourceFd(&fd));
                }
                a.kill();
                Some(a.pid())
            }
            _ => None,
        };
        let backoff = BACKOFF_MIN
            .total_millis()
            .saturating_mul(1u64 << self.failures.min(10))
            .min(BACKOFF_MAX.total_millis());
        self.failures = self.failures.saturating_add(1);
        if !self.warned {
            self.warned = true;
            warn!(
                ?pid,
                "namespace agent unhealthy: {why}; published TCP ports use the stack path until a new agent is ready"
            );
        } else {
            debug!(?pid, "namespace agent unhealthy again: {why}");
        }
        if self.launcher.is_some() {
            self.state = AgentState::Backoff(now + Duration::from_millis(backoff));
        }
        let pending: Vec<Pending> = self.pending.drain(..).collect();
        for p in pending {
            match p.what {
                PendingWhat::Connect { conn, transparent } => {
                    // The agent may have added the client's rule before it
                    // stopped answering.
                    if transparent {
                        self.defer_release(conn.client);
                    }
                    out.push(Outcome::Stack(conn));
                }
                PendingWhat::Release(client) => self.defer_release(client),
            }
        }
    }

    /// The earliest deadline the loop must wake up for.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let state = match &self.state {
            AgentState::Joining(_, at) | AgentState::Requested(at) | AgentState::Backoff(at) => {
                Some(*at)
            }
            _ => None,
        };
        let front = self.pending.front().map(|p| p.deadline);
        match (state, front) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Releases the reply rule of a transparent connection that ended;
    /// later if no agent can take the request now.
    pub(crate) fn release(&mut self, client: SocketAddrV4) {
        if let AgentState::Ready(agent) = &mut self.state
            && self.pending.len() < 2 * MAX_OUTSTANDING
            && agent.submit(Submit::Release(client)).is_ok()
        {
            self.pending.push_back(Pending {
                what: PendingWhat::Release(client),
                deadline: crate::stack::now() + AGENT_DEADLINE,
            });
        } else {
            self.defer_release(client);
        }
    }

    fn defer_release(&mut self, client: SocketAddrV4) {
        if self.deferred.len() < MAX_DEFERRED {
            self.deferred.push(client);
        }
    }

    /// Sends deferred releases while the agent is ready and not busy.
    fn flush_deferred(&mut self) {
        while matches!(self.state, AgentState::Ready(_)) && self.pending.len() < MAX_OUTSTANDING {
            let Some(client) = self.deferred.pop() else {
                return;
            };
            let left = self.deferred.len();
            self.release(client);
            if self.deferred.len() > left {
                // Deferred again: the agent cannot take it now.
                return;
            }
        }
    }

    /// Keeps [`RESERVE_PIPES`] pipes open, trying at most once a second.
    fn refill_reserve(&mut self, now: Instant) {
        if self.reserve.len() >= 2 * RESERVE_PIPES || now < self.next_refill {
            return;
        }
        self.next_refill = now + Duration::from_secs(1);
        while self.reserve.len() < 2 * RESERVE_PIPES {
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    self.reserve.push(r);
                    self.reserve.push(w);
                }
                Err(_) => return,
            }
        }
    }

    /// The agent's part of the status report.
    pub(crate) fn status(&self) -> crate::status::AgentStatus {
        let (state, pid) = match &self.state {
            AgentState::Off => ("off", None),
            AgentState::Ready(a) => ("ready", Some(a.pid())),
            AgentState::Joining(a, _) => ("starting", Some(a.pid())),
            AgentState::Requested(_) => ("starting", None),
            AgentState::Backoff(_) => ("restarting", None),
        };
        crate::status::AgentStatus {
            state: state.to_string(),
            pid,
            restarts: self.restarts,
            outstanding: self.pending.len() as u64,
        }
    }
}
