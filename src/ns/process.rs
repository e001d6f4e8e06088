//! Helper-process plumbing shared by the TAP opener and `rnet run`: running
//! the child side of a fork to `_exit`, reaping children, and describing how
//! a child ended.

use std::panic::{AssertUnwindSafe, catch_unwind};

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Exit code of a helper whose code panicked.
const PANIC_EXIT: i32 = 101;

/// Runs the child side of a fork and leaves the process with `_exit`, so
/// nothing of the parent's (atexit handlers, stdio buffers, destructors of
/// the parent's stack) runs in the child and no panic unwinds into the
/// parent's copied frames.
pub(crate) fn exit_child(body: impl FnOnce() -> i32) -> ! {
    let code = catch_unwind(AssertUnwindSafe(body)).unwrap_or(PANIC_EXIT);
    // SAFETY: _exit(2) ends the process at once; it is async-signal-safe and
    // has no preconditions.
    unsafe { libc::_exit(code) }
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
