//! Helper-process plumbing shared by the TAP opener, the agent launcher and
//! `rnet run`: forking a helper with a socket pair to it, running the child
//! side of a fork to `_exit`, reaping children, and describing how a child
//! ended.

use std::os::fd::{OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::sys::{self, ForkResult, fork};

/// Forks a helper process joined to its parent by a close-on-exec
/// SOCK_SEQPACKET pair. The child gets its end and runs `child` to `_exit`
/// (through [`exit_child`]); the parent gets the child's pid and its own
/// end, with `parent_flags` (e.g. `SOCK_NONBLOCK`) applied. Whatever
/// `child` captured is dropped in the parent, so descriptors meant only for
/// the helper close on the parent's side once it runs.
///
/// The caller must be in a state where forking is sound: `child` may only
/// make system calls and small allocations (no lock of another thread's may
/// be needed), which is what every helper here does.
pub(crate) fn fork_helper(
    parent_flags: SockFlag,
    child: impl FnOnce(OwnedFd) -> i32,
) -> Result<(Pid, OwnedFd), Errno> {
    let (parent_end, child_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    if parent_flags.contains(SockFlag::SOCK_NONBLOCK) {
        nix::fcntl::fcntl(
            &parent_end,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
    }
    // SAFETY: the child branch runs only `child` (system calls and small
    // allocations, as this function's contract requires) and leaves through
    // `exit_child`'s `_exit`; it never returns into the caller's frames.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(parent_end);
            exit_child(|| child(child_end))
        }
        ForkResult::Parent { child: pid } => {
            drop(child_end);
            Ok((pid, parent_end))
        }
    }
}

/// Exit code of a helper whose code panicked.
const PANIC_EXIT: i32 = 101;

/// Runs the child side of a fork and leaves the process with `_exit`, so
/// nothing of the parent's (atexit handlers, stdio buffers, destructors of
/// the parent's stack) runs in the child and no panic unwinds into the
/// parent's copied frames.
pub(crate) fn exit_child(body: impl FnOnce() -> i32) -> ! {
    let code = catch_unwind(AssertUnwindSafe(body)).unwrap_or(PANIC_EXIT);
    sys::exit_now(code)
}

/// In a freshly forked child: closes every close-on-exec descriptor above
/// stderr except those in `keep`. Those are the parent's private ones (exec
/// would close them anyway); closing them at once keeps a helper from
/// holding, while it waits, pipe or socket ends that other threads of the
/// parent are using (e.g. another helper's "go" channel or a TAP), which
/// would delay their EOFs. Descriptors without close-on-exec are left for
/// the command to inherit. Best effort: without /proc nothing is closed.
pub(crate) fn close_private_fds(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collect first: the directory iterator holds a descriptor of its own.
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd <= 2 || keep.contains(&fd) {
            continue;
        }
        // A stale number (the read_dir descriptor, now closed) has no flags.
        if sys::fd_flags(fd).is_ok_and(|f| f & libc::FD_CLOEXEC != 0) {
            // SAFETY: this runs only in a forked child that will exec or
            // _exit without returning to the code that owns these
            // descriptors: their owners live in the parent's other threads
            // (absent here) or in frames that never resume, so nothing uses
            // or closes them again. `keep` protects the child's own.
            unsafe { sys::close(fd) };
        }
    }
}

/// Waits for `pid` to end and reaps it. `Ok(None)` if it was already reaped
/// elsewhere (ECHILD, e.g. SIGCHLD is ignored).
pub(crate) fn reap(pid: Pid) -> Result<Option<WaitStatus>, Errno> {
    loop {
        match waitpid(pid, None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return Ok(Some(status));
            }
            // Stopped/continued: keep waiting for the real end.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Kills `pid` with SIGKILL and reaps it, ignoring errors (best effort
/// clean-up on an error path).
pub(crate) fn kill_and_reap(pid: Pid) {
    // ESRCH (already gone) is fine: reap() below collects it.
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = reap(pid);
}

/// "exited with status 3", "was killed by signal SIGSEGV", ... for messages.
pub(crate) fn describe(status: Option<WaitStatus>) -> String {
    match status {
        Some(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Some(WaitStatus::Signaled(_, sig, _)) => format!("was killed by signal {sig}"),
        Some(other) => format!("ended oddly ({other:?})"),
        None => "was reaped by someone else".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn closes_only_private_descriptors() {
        use std::os::fd::AsRawFd;
        let (keep_r, _keep_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let (gone_r, _gone_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let (inherit_r, _inherit_w) = nix::unistd::pipe().expect("pipe");
        let (keep, gone, inherit) = (
            keep_r.as_raw_fd(),
            gone_r.as_raw_fd(),
            inherit_r.as_raw_fd(),
        );
        // SAFETY: the child only makes system calls and `_exit`s.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                close_private_fds(&[keep]);
                let open = |fd| sys::fd_flags(fd).is_ok();
                i32::from(!(open(keep) && !open(gone) && open(inherit)))
            }),
            ForkResult::Parent { child } => {
                assert_eq!(reap(child), Ok(Some(WaitStatus::Exited(child, 0))));
            }
        }
    }

    #[test]
    fn descriptions() {
        let pid = Pid::from_raw(1);
        assert_eq!(
            describe(Some(WaitStatus::Exited(pid, 3))),
            "exited with status 3"
        );
        assert_eq!(
            describe(Some(WaitStatus::Signaled(pid, Signal::SIGKILL, false))),
            "was killed by signal SIGKILL"
        );
    }
}
