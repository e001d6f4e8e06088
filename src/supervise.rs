//! The supervisor: keeps the namespace's network when the data plane dies.
//!
//! # Theory of operation
//!
//! With [`crate::ConfigBuilder::supervise`], [`crate::Network::attach`]
//! does all of its set-up that must survive a crash in the calling process:
//! it opens the TAP (the guest's `tap0` and its addresses live as long as
//! that descriptor does), binds the control socket and the metrics
//! endpoint, and opens what `--publish-auto` reads. Then `start` turns
//! the calling process into the supervisor: it forks a worker and returns
//! only in the worker, which goes on exactly as an unsupervised rnet does
//! (a fresh epoll and event loop of its own, the published ports, the
//! fast path's agent, its own sandbox, the API and metrics threads over
//! the inherited listeners) and hands the process's `main` its
//! [`crate::Network`]. The supervisor never returns: it ends the process
//! with the worker's exit code once a worker exits on its own (the target
//! exited, the exit fd hung up, a stop), forwards SIGINT and SIGTERM to the
//! worker, and watches nothing else.
//!
//! Published listeners survive because the supervisor holds a copy of
//! each: the worker sends every listener it binds (at start and later,
//! through the control socket or `--publish-auto`) to the supervisor over a
//! `SOCK_SEQPACKET` pair, one message per listener with the descriptor as
//! SCM_RIGHTS (`L` id spec), and says `D` id when a rule is withdrawn. The
//! next worker adopts them with their ids instead of binding again, so a
//! port keeps listening through a restart and a client that connects
//! meanwhile waits in the listen backlog. A panic in the worker sends `P`
//! and its message, then aborts, so the cause is known.
//!
//! When a worker dies from a signal (SIGKILL by the OOM killer, SIGSYS
//! from the seccomp filter, SIGABRT after a panic), the supervisor forks a
//! new one at once (within milliseconds: nothing is opened again but the
//! worker's own epoll). What lived only in the worker is lost: every
//! established flow (the guest sees resets or retransmits into a new
//! stack), NAT and DNS state, the fast path's agent (the new worker starts
//! its own). At most [`MAX_RESTARTS`] restarts happen within [`WINDOW`];
//! the next crash ends rnet with exit code 1 and the last cause. A worker
//! that dies before it was ever ready (for example a port already in use)
//! is a start-up failure, not a crash: rnet exits as it would have.
//!
//! The supervisor is small: a `poll` over the worker's pidfd, its socket
//! and a signalfd, `waitpid` and `fork`; its only input is the worker's
//! socket, whose messages it parses strictly. With seccomp on it is
//! confined before the first fork ([`crate::sandbox::enter_supervisor`]):
//! no_new_privs and a deny-list (execve, ptrace, module loading, bpf and
//! the like kill it), which every worker inherits under its own full
//! sandbox. It cannot take the worker's allow-list, mount namespace or
//! Landlock rules: a filter is inherited by every later worker, and each
//! worker must still join the target's namespaces for its agent and
//! build its own sandbox from the host's filesystem.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::ns::fdpass::{recv_with_fd, send_with_fd};
use crate::ports::PortSpec;
use crate::sys::{ForkResult, fork, pidfd_open};

/// Restarts allowed within [`WINDOW`]; the next crash ends rnet.
pub const MAX_RESTARTS: usize = 5;
/// The window [`MAX_RESTARTS`] counts in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The environment variable that arms the test hooks (`1`): SIGUSR2 then
/// makes the data plane panic. For rnet's own tests only.
pub const TEST_HOOKS_ENV: &str = "RNET_TEST_HOOKS";

/// Data-plane restarts before this worker started (0 in the first worker
/// and without supervision).
static RESTARTS: AtomicU64 = AtomicU64::new(0);
/// The worker's end of its socket to the supervisor (-1: unsupervised).
static KEEPER: AtomicI32 = AtomicI32::new(-1);

/// Whether this process is a supervised worker (its supervisor then tells
/// systemd it is ready: only the main PID may).
pub fn in_worker() -> bool {
    KEEPER.load(Ordering::Relaxed) >= 0
}

/// How many times the data plane was restarted.
pub fn restarts() -> u64 {
    RESTARTS.load(Ordering::Relaxed)
}

/// A published rule the supervisor holds: its id, the rule as shown (host
/// port 0 resolved) and one listener per port.
pub(crate) struct Kept {
    pub(crate) id: u64,
    pub(crate) spec: PortSpec,
    pub(crate) fds: Vec<OwnedFd>,
}

/// What a worker gets from its supervisor.
pub(crate) struct Worker {
    /// The rules to adopt; None in the first worker (it publishes the
    /// configured ones itself).
    pub(crate) kept: Option<Vec<Kept>>,
    /// The first rule id the worker may use for a new rule.
    pub(crate) next_rule: u64,
}

/// Tells the supervisor (if any) about a rule just published, with its
/// listeners. Errors are logged: the rule then works until the next
/// restart only.
pub(crate) fn keep_rule(id: u64, spec: &PortSpec, fds: &[BorrowedFd<'_>]) {
    let Some(sock) = keeper() else { return };
    for fd in fds {
        let msg = format!("L {id} {spec}");
        if let Err(e) = send_with_fd(sock, msg.as_bytes(), Some(*fd)) {
            warn!(id, rule = %spec, "cannot hand the listener to the supervisor ({e}); the port will not survive a data-plane restart");
            return;
        }
    }
}

/// Tells the supervisor (if any) that rule `id` was withdrawn.
pub(crate) fn forget_rule(id: u64) {
    if let Some(sock) = keeper() {
        let _ = send_with_fd(sock, format!("D {id}").as_bytes(), None);
    }
}

fn keeper() -> Option<BorrowedFd<'static>> {
    let fd = KEEPER.load(Ordering::Relaxed);
    // SAFETY: KEEPER holds the worker's end of the socket pair, which the
    // worker never closes (it lives until the process ends).
    (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Whether the test hooks are armed.
pub(crate) fn test_hooks() -> bool {
    std::env::var_os(TEST_HOOKS_ENV).is_some_and(|v| v == "1")
}

/// Becomes the supervisor: returns only in a worker. `ready_fd` is the
/// `--ready-fd`, written by the first worker only; `target` the PID whose
/// exit ends rnet.
/// `api_socket` names the control socket's file, which the supervisor
/// removes when it ends (a worker that dies cannot); a worker that stops
/// cleanly has removed it already.
pub(crate) fn start(
    ready_fd: &mut Option<RawFd>,
    target: Option<i32>,
    confine: bool,
    api_socket: Option<crate::ports::api::SocketName>,
) -> Result<Worker, crate::Error> {
    if confine {
        crate::sandbox::enter_supervisor()?;
    }
    start_inner(ready_fd, target, api_socket).map_err(|e| crate::Error::Io {
        context: "starting the data-plane worker".into(),
        source: e,
    })
}

fn start_inner(
    ready_fd: &mut Option<RawFd>,
    target: Option<i32>,
    api_socket: Option<crate::ports::api::SocketName>,
) -> io::Result<Worker> {
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&sigs), Some(&mut old))?;
    let sfd = SignalFd::with_flags(&sigs, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let target_fd = target.and_then(|p| pidfd_open(p).ok());
    let mut sup = Supervisor {
        rules: BTreeMap::new(),
        next_rule: 1,
        crashes: VecDeque::new(),
        generation: 0,
    };
    let supervisor = nix::unistd::getpid();
    loop {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        sup.generation += 1;
        // SAFETY: the process has a single thread here (the caller's
        // contract for supervise); the child only continues rnet's set-up.
        match unsafe { fork() }? {
            ForkResult::Child => {
                // A worker never outlives its supervisor (which holds the
                // listeners and would be missed by nobody else).
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                if nix::unistd::getppid() != supervisor {
                    std::process::exit(1);
                }
                drop(ours);
                drop(sfd);
                drop(target_fd);
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
                RESTARTS.store(sup.generation - 1, Ordering::Relaxed);
                KEEPER.store(
                    std::os::fd::IntoRawFd::into_raw_fd(theirs),
                    Ordering::Relaxed,
                );
                install_panic_report();
                let kept = (sup.generation > 1).then(|| {
                    std::mem::take(&mut sup.rules)
                        .into_iter()
                        .map(|(id, (spec, fds))| Kept { id, spec, fds })
                        .collect()
                });
                return Ok(Worker {
                    kept,
                    next_rule: sup.next_rule,
                });
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                if let Some(fd) = ready_fd.take() {
                    // The first worker writes it; later ones must not.
                    // SAFETY: the caller handed this descriptor to rnet;
                    // the worker has its own copy.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if sup.generation > 1 {
                    info!(
                        pid = child.as_raw(),
                        restarts = sup.generation - 1,
                        "data plane restarted"
                    );
                }
                let code = sup.watch(child, &ours, &sfd, target_fd.as_ref());
                if let Some(code) = code {
                    if let Some(name) = &api_socket {
                        name.remove();
                    }
                    std::process::exit(code);
                }
            }
        }
    }
}

struct Supervisor {
    rules: BTreeMap<u64, (PortSpec, Vec<OwnedFd>)>,
    next_rule: u64,
    crashes: VecDeque<Instant>,
    generation: u64,
}

impl Supervisor {
    /// Watches worker `child` until it ends; Some(code) when rnet must end
    /// with that code, None to start a new worker.
    fn watch(
        &mut self,
        child: Pid,
        sock: &OwnedFd,
        sfd: &SignalFd,
        target: Option<&OwnedFd>,
    ) -> Option<i32> {
        let Ok(pidfd) = pidfd_open(child.as_raw()) else {
            // Cannot watch it without a pidfd: wait for it blocking.
            return Some(exit_code(waitpid(child, None).ok()));
        };
        let mut ready = false;
        let mut panic_msg: Option<String> = None;
        let mut stopping = false;
        loop {
            let mut fds = [
                PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("supervisor: poll: {e}");
                    let _ = kill(child, Signal::SIGKILL);
                    return Some(exit_code(waitpid(child, None).ok()));
                }
            }
            let has = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let (exited, msg, sig) = (has(&fds[0]), has(&fds[1]), has(&fds[2]));
            if sig {
                while let Ok(Some(info)) = sfd.read_signal() {
                    let signo = info.ssi_signo as i32;
                    stopping = true;
                    if let Ok(s) = Signal::try_from(signo) {
                        let _ = kill(child, s);
                    }
                }
            }
            if msg {
                // Drain what is queued; EAGAIN-free because poll said so
                // for the first, and the rest are read until none is left.
                loop {
                    let mut buf = [0u8; 512];
                    let mut p = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
                    if !matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0) {
                        break;
                    }
                    match recv_with_fd(sock.as_fd(), &mut buf) {
                        Ok(r) if r.len == 0 => break,
                        Ok(r) => {
                            let text = String::from_utf8_lossy(&buf[..r.len]).into_owned();
                            self.on_message(&text, r.fd, &mut ready, &mut panic_msg);
                        }
                        Err(_) => break,
                    }
                }
            }
            if !exited {
                continue;
            }
            let status = waitpid(child, None).ok();
            let cause = match (status, &panic_msg) {
                (_, Some(m)) => format!("panic: {m}"),
                (Some(WaitStatus::Signaled(_, s, _)), None) => format!("killed by {s}"),
                (Some(WaitStatus::Exited(_, c)), None) => {
                    // Ended on its own (or failed at start): so does rnet.
                    return Some(c);
                }
                _ => return Some(1),
            };
            // The first worker dying before it was ready is a failed
            // start; a later one is a crash like any other.
            if stopping || (!ready && self.generation == 1) {
                error!("data plane died ({cause}); not restarted");
                return Some(1);
            }
            if target.is_some_and(|t| {
                let mut p = [PollFd::new(t.as_fd(), PollFlags::POLLIN)];
                matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
            }) {
                info!("data plane died ({cause}) after the target exited; stopping");
                return Some(0);
            }
            let now = Instant::now();
            while self
                .crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > WINDOW)
            {
                self.crashes.pop_front();
            }
            if self.crashes.len() >= MAX_RESTARTS {
                error!(
                    "data plane died ({cause}), its {} crash within {} s; giving up",
                    ordinal(self.crashes.len() + 1),
                    WINDOW.as_secs()
                );
                return Some(1);
            }
            self.crashes.push_back(now);
            warn!(
                "data plane died ({cause}); restarting it: the TAP, its addresses and the published ports are kept, established flows are reset"
            );
            return None;
        }
    }

    fn on_message(
        &mut self,
        text: &str,
        fd: Option<OwnedFd>,
        ready: &mut bool,
        panic_msg: &mut Option<String>,
    ) {
        let (kind, rest) = text.split_once(' ').unwrap_or((text, ""));
        match (kind, fd) {
            ("Y", None) => {
                if !*ready && self.generation == 1 {
                    notify_systemd();
                }
                *ready = true;
            }
            ("P", None) => *panic_msg = Some(rest.to_string()),
            ("L", Some(fd)) => {
                let parsed = rest
                    .split_once(' ')
                    .and_then(|(id, spec)| Some((id.parse::<u64>().ok()?, spec.parse().ok()?)));
                match parsed {
                    Some((id, spec)) => {
                        self.next_rule = self.next_rule.max(id + 1);
                        self.rules
                            .entry(id)
                            .or_insert_with(|| (spec, Vec::new()))
                            .1
                            .push(fd);
                    }
                    None => warn!("supervisor: malformed message from the data plane ignored"),
                }
            }
            ("D", None) => {
                if let Ok(id) = rest.parse::<u64>() {
                    self.rules.remove(&id);
                }
            }
            _ => warn!("supervisor: malformed message from the data plane ignored"),
        }
    }
}

/// Tells the supervisor (if any) that the worker is ready: from now on its
/// death is a crash, not a failed start.
pub(crate) fn worker_ready() {
    if let Some(sock) = keeper() {
        let _ = send_with_fd(sock, b"Y", None);
    }
}

/// In a worker: a panic anywhere is reported to the supervisor with its
/// message, after the usual report on stderr, and then aborts (a half
/// unwound data plane must not linger).
fn install_panic_report() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Reported first: the usual report below may need a system call
        // the sandbox refuses.
        let p = info.payload();
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let mut msg = format!("P {msg}");
        msg.truncate(400);
        if let Some(sock) = keeper() {
            let _ = send_with_fd(sock, msg.as_bytes(), None);
        }
        prev(info);
        std::process::abort();
    }));
}

/// systemd's `READY=1` (`Type=notify`), sent by the supervisor, the unit's
/// main PID, once the first worker is ready.
fn notify_systemd() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent =
        UnixDatagram::unbound().and_then(|s| addr.and_then(|a| s.send_to_addr(b"READY=1\n", &a)));
    if let Err(e) = sent {
        warn!(
            "NOTIFY_SOCKET {}: {e}; systemd will not hear that rnet is ready",
            path.to_string_lossy()
        );
    }
}

fn exit_code(status: Option<WaitStatus>) -> i32 {
    match status {
        Some(WaitStatus::Exited(_, c)) => c,
        Some(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
        _ => 1,
    }
}

fn ordinal(n: usize) -> String {
    match n {
        1 => "1st".into(),
        2 => "2nd".into(),
        3 => "3rd".into(),
        n => format!("{n}th"),
    }
}

/// The test hook: with [`TEST_HOOKS_ENV`] set to 1, SIGUSR2 writes to
/// the returned eventfd, which the event loop watches and answers with a
/// panic. None (and SIGUSR2 keeps its default action) otherwise.
pub(crate) fn panic_hook_fd() -> Option<OwnedFd> {
    if !test_hooks() {
        return None;
    }
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let owned =
        OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).ok()?);
    HOOK_FD.store(owned.as_raw_fd(), Ordering::Relaxed);
    extern "C" fn on_usr2(_: libc::c_int) {
        crate::sys::write_u64(HOOK_FD.load(Ordering::Relaxed), 1);
    }
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_usr2),
        nix::sys::signal::SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only makes an async-signal-safe write.
    unsafe { nix::sys::signal::sigaction(Signal::SIGUSR2, &action) }.ok()?;
    Some(owned)
}

static HOOK_FD: AtomicI32 = AtomicI32::new(-1);
