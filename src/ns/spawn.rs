//! `rnet run`: starting a command in a new user + network namespace. The
//! command's process creates the namespaces, maps the caller's uid/gid to
//! root inside, reports back, and waits for a "go" before it execs, so the
//! caller can attach the network first.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, send, socketpair};
use nix::sys::stat::Mode;
use nix::unistd::{ForkResult, Pid, execvp, fork, getgid, getpid, getppid, getuid, pipe2};

use super::NsError;
use super::process::{close_private_fds, describe, exit_child, kill_and_reap, reap};
use super::report::{self, ChildError, Report, Step, read_stream_report};

/// Exit code of the command's process when it never got to exec.
const NOT_STARTED_EXIT: i32 = 127;

/// A command waiting, in its own new user and network namespaces, for
/// [`release`](SpawnedCommand::release) before it execs.
///
/// Dropping it unreleased makes the process exit (status 127) and reaps it.
/// Once released, the process is the caller's to wait for.
#[derive(Debug)]
pub struct SpawnedCommand {
    pid: Pid,
    program: String,
    /// Parent end of the "go" channel; `None` once released.
    go: Option<OwnedFd>,
    /// Read end of the status pipe (close-on-exec in the child).
    status: Option<File>,
}

/// Forks a process that creates a new user namespace (mapping the caller's
/// uid and gid to 0) and a new network namespace, then waits to exec `argv`
/// (looked up in `PATH`). Returns once the namespaces exist, so the caller
/// can `open_tap(&Target::Pid(cmd.pid()), ..)` and then `release()` it.
///
/// The process gets SIGKILL if the thread that called this exits (Linux's
/// parent-death signal follows the creating thread), so call it from a
/// thread that lives as long as the command should.
pub fn spawn_in_new_namespaces(argv: &[OsString]) -> Result<SpawnedCommand, NsError> {
    let Some(first) = argv.first() else {
        return Err(NsError::EmptyCommand);
    };
    let program = first.to_string_lossy().into_owned();
    let cargs = argv
        .iter()
        .map(|a| {
            CString::new(a.as_bytes()).map_err(|_| NsError::NulInArgument {
                arg: a.to_string_lossy().into_owned(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid_map = format!("0 {} 1\n", getuid());
    let gid_map = format!("0 {} 1\n", getgid());
    let parent = getpid();
    let os = |what| move |errno| NsError::Os { what, errno };
    let (status_r, status_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(os("cannot create a pipe for the command's process"))?;
    // The "go" channel is a socket pair rather than a pipe so that release()
    // can write with MSG_NOSIGNAL even if the caller restored SIGPIPE.
    let (go_r, go_w) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(os("cannot create a socket pair for the command's process"))?;

    // SAFETY: the child branch runs only `child_main` (system calls and
    // small allocations) and then execs or `_exit`s through `exit_child`;
    // it never returns into the caller's code.
    match unsafe { fork() } {
        Err(errno) => Err(NsError::Os {
            what: "cannot fork the command's process",
            errno,
        }),
        Ok(ForkResult::Child) => {
            drop(status_r);
            drop(go_w);
            let ctx = ChildCtx {
                parent,
                status: status_w,
                go: go_r,
                argv: &cargs,
                uid_map: &uid_map,
                gid_map: &gid_map,
            };
            exit_child(move || child_main(ctx))
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_w);
            drop(go_r);
            let mut status = File::from(status_r);
            let ready = read_stream_report(&mut status);
            let mut cmd = SpawnedCommand {
                pid: child,
                program,
                go: Some(go_w),
                status: Some(status),
            };
            match ready {
                Ok(Some(bytes)) => match report::decode(&bytes) {
                    Ok(Report::Ok(_)) => Ok(cmd),
                    Ok(Report::Err(e)) => {
                        cmd.go = None;
                        let _ = reap(child);
                        Err(spawn_error(e, &cmd.program))
                    }
                    Err(detail) => Err(NsError::Helper { detail }),
                },
                Ok(None) => {
                    cmd.go = None;
                    let status = reap(child);
                    Err(NsError::Helper {
                        detail: format!(
                            "the command's process {} before creating its namespaces",
                            describe(status.ok().flatten())
                        ),
                    })
                }
                Err(e) => Err(NsError::Helper {
                    detail: format!("cannot read from the command's process: {e}"),
                }),
            }
            // Any Err above drops `cmd`, whose Drop kills and reaps the child
            // unless it was already reaped (go taken).
        }
    }
}

impl SpawnedCommand {
    /// The command's process id (also its pid as seen from outside the new
    /// namespaces).
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Lets the command exec now (call after the network is attached and
    /// ready). Returns [`NsError::Exec`] if exec failed (e.g. "cannot run
    /// `foo`: No such file or directory"); the process has then exited and
    /// been reaped. On success the caller owns the process and must reap it.
    /// Calling it again after success does nothing.
    pub fn release(&mut self) -> Result<(), NsError> {
        let Some(go) = self.go.take() else {
            return Ok(());
        };
        let sent = loop {
            match send(go.as_raw_fd(), b"G", MsgFlags::MSG_NOSIGNAL) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        drop(go);
        if sent.is_err() {
            // EPIPE: the process is gone before it could exec.
            let status = reap(self.pid);
            self.status = None;
            return Err(NsError::Helper {
                detail: format!(
                    "the command's process {} before it could run `{}`",
                    describe(status.ok().flatten()),
                    self.program
                ),
            });
        }
        let Some(mut status) = self.status.take() else {
            return Ok(());
        };
        // EOF: exec succeeded and closed the close-on-exec status pipe.
        match read_stream_report(&mut status) {
            Ok(None) => Ok(()),
            Ok(Some(bytes)) => {
                let _ = reap(self.pid);
                match report::decode(&bytes) {
                    Ok(Report::Err(e)) => Err(spawn_error(e, &self.program)),
                    Ok(Report::Ok(_)) => Err(NsError::Helper {
                        detail: "unexpected second ready report".to_owned(),
                    }),
                    Err(detail) => Err(NsError::Helper { detail }),
                }
            }
            Err(e) => Err(NsError::Helper {
                detail: format!("cannot read from the command's process: {e}"),
            }),
        }
    }
}

impl Drop for SpawnedCommand {
    fn drop(&mut self) {
        // Unreleased: closing the go channel makes the process exit; the
        // kill makes sure of it. Reap it either way.
        if self.go.take().is_some() {
            self.status = None;
            kill_and_reap(self.pid);
        }
    }
}

/// Turns the command process's error report into the user-facing error.
fn spawn_error(e: ChildError, program: &str) -> NsError {
    let errno = e.errno;
    match e.step {
        Step::Unshare => NsError::UsernsCreate { errno },
        Step::Setgroups | Step::UidMap | Step::GidMap => NsError::IdMap {
            file: e.context,
            errno,
        },
        Step::Exec => NsError::Exec {
            program: program.to_owned(),
            errno,
        },
        _ => NsError::Helper {
            detail: format!("{}: {}", e.context, errno.desc()),
        },
    }
}

/// What the command's process needs after the fork.
struct ChildCtx<'a> {
    parent: Pid,
    status: OwnedFd,
    go: OwnedFd,
    argv: &'a [CString],
    uid_map: &'a str,
    gid_map: &'a str,
}

/// Writes all of `data` to `fd` in one `write` (reports and id maps must
/// not be split).
fn write_once(fd: impl AsFd, data: &[u8]) -> Result<(), Errno> {
    loop {
        match nix::unistd::write(fd.as_fd(), data) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::EIO),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `data` into the /proc file `path` in a single write.
fn write_proc(path: &str, data: &str) -> Result<(), Errno> {
    let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    write_once(&fd, data.as_bytes())
}

/// Restores default signal dispositions and an empty signal mask, so the
/// command does not inherit what rnet blocked or ignored (e.g. SIGPIPE).
fn reset_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL registers no handler code; failures
        // (signals reserved by libc) are harmless and ignored.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// The command's process after fork: returns its exit code if it does not
/// exec.
fn child_main(ctx: ChildCtx<'_>) -> i32 {
    close_private_fds(&[ctx.status.as_raw_fd(), ctx.go.as_raw_fd()]);
    let fail = |e: ChildError| {
        let _ = write_once(&ctx.status, &e.encode());
        1
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return fail(ChildError::new(
            Step::Internal,
            e,
            "set the parent-death signal",
        ));
    }
    if getppid() != ctx.parent {
        // The parent died before the death signal was armed.
        return fail(ChildError::new(
            Step::ParentGone,
            Errno::ESRCH,
            "rnet exited",
        ));
    }
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET) {
        return fail(ChildError::new(Step::Unshare, e, "unshare"));
    }
    // Without setgroups=deny an unprivileged gid_map write is refused; old
    // kernels lack the file and need nothing.
    match write_proc("/proc/self/setgroups", "deny") {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => {
            return fail(ChildError::new(Step::Setgroups, e, "/proc/self/setgroups"));
        }
    }
    if let Err(e) = write_proc("/proc/self/uid_map", ctx.uid_map) {
        return fail(ChildError::new(Step::UidMap, e, "/proc/self/uid_map"));
    }
    if let Err(e) = write_proc("/proc/self/gid_map", ctx.gid_map) {
        return fail(ChildError::new(Step::GidMap, e, "/proc/self/gid_map"));
    }
    if write_once(&ctx.status, &report::encode_ok(&[])).is_err() {
        return 1;
    }
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(&ctx.go, &mut byte) {
            Ok(0) => return NOT_STARTED_EXIT,
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(_) => return NOT_STARTED_EXIT,
        }
    }
    drop(ctx.go);
    reset_signals();
    // Only returns on failure.
    let errno = match execvp(&ctx.argv[0], ctx.argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let _ = write_once(
        &ctx.status,
        &ChildError::new(Step::Exec, errno, "execvp").encode(),
    );
    NOT_STARTED_EXIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_nul_arguments() {
        assert!(matches!(
            spawn_in_new_namespaces(&[]),
            Err(NsError::EmptyCommand)
        ));
        let argv = [OsString::from("a\0b")];
        assert!(matches!(
            spawn_in_new_namespaces(&argv),
            Err(NsError::NulInArgument { .. })
        ));
    }

    #[test]
    fn error_mapping() {
        let e = spawn_error(ChildError::new(Step::Unshare, Errno::EPERM, "unshare"), "x");
        assert!(e.to_string().contains("cannot create a user namespace"));
        let e = spawn_error(ChildError::new(Step::Exec, Errno::ENOENT, "execvp"), "foo");
        assert_eq!(e.to_string(), "cannot run `foo`: No such file or directory");
        let e = spawn_error(
            ChildError::new(Step::UidMap, Errno::EPERM, "/proc/self/uid_map"),
            "x",
        );
        assert!(e.to_string().contains("/proc/self/uid_map"));
    }
}
