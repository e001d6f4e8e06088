//! `rnet run`: starting a command in a new user + network namespace. The
//! command's process creates the namespaces, maps the caller's uid/gid to
//! root inside, reports back, and waits for a "go" before it execs, so the
//! caller can attach the network first.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, send, socketpair};
use nix::sys::stat::Mode;
use nix::unistd::{Pid, execvp, getgid, getpid, getppid, getuid, pipe2};

use super::NsError;
use super::process::{close_private_fds, describe, exit_child, kill_and_reap, reap};
use super::report::{self, ChildError, Report, Step, read_stream_report};
use crate::sys::{ForkResult, fork};

fn os_err(what: &'static str) -> impl Fn(Errno) -> NsError {
    move |errno| NsError::Os { what, errno }
}

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
    spawn_with(argv, &SpawnOptions::default())
}

/// How [`spawn_with`] sets up the command's namespaces beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct SpawnOptions {
    /// Also map the caller's subordinate uid/gid ranges (from /etc/subuid
    /// and /etc/subgid, through the setuid `newuidmap`/`newgidmap`), as
    /// RootlessKit does, so package managers and container runtimes work
    /// inside. Without them only the caller's own ids are mapped.
    pub subids: bool,
    /// Give the command a private mount namespace in which /etc/resolv.conf
    /// has this content (typically `nameserver 10.0.2.3`).
    pub resolv_conf: Option<String>,
}

/// A subordinate id range: `count` ids from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubRange {
    /// First id.
    pub start: u32,
    /// Number of ids.
    pub count: u32,
}

/// Finds the first range for `name` or `id` in a subuid/subgid text.
pub fn parse_subid(text: &str, name: Option<&str>, id: u32) -> Option<SubRange> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let who = f.next()?;
        let start = f.next()?.trim().parse().ok()?;
        let count = f.next()?.trim().parse().ok()?;
        let matches = Some(who) == name || who.parse::<u32>().ok() == Some(id);
        (matches && count > 0).then_some(SubRange { start, count })
    })
}

/// The caller's subordinate ranges and the helper binaries, if all exist.
fn find_subids() -> Result<(SubRange, SubRange, PathBuf, PathBuf), String> {
    let uid = getuid().as_raw();
    let gid = getgid().as_raw();
    let name = nix::unistd::User::from_uid(getuid())
        .ok()
        .flatten()
        .map(|u| u.name);
    let find_bin = |b: &str| {
        ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(b))
            .find(|p| p.exists())
            .ok_or_else(|| format!("{b} is not installed (package uidmap)"))
    };
    let newuidmap = find_bin("newuidmap")?;
    let newgidmap = find_bin("newgidmap")?;
    let read = |f: &str| std::fs::read_to_string(f).map_err(|e| format!("cannot read {f}: {e}"));
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    let u = parse_subid(&read("/etc/subuid")?, name.as_deref(), uid)
        .ok_or_else(|| format!("/etc/subuid has no range for {who}"))?;
    let g = parse_subid(&read("/etc/subgid")?, name.as_deref(), gid)
        .ok_or_else(|| format!("/etc/subgid has no range for {who}"))?;
    Ok((u, g, newuidmap, newgidmap))
}

/// Runs newuidmap/newgidmap for `pid`: 0 → the caller, 1.. → the range.
fn map_subids(pid: Pid, plan: &(SubRange, SubRange, PathBuf, PathBuf)) -> Result<(), String> {
    let (u, g, newuidmap, newgidmap) = plan;
    for (bin, own, r) in [
        (newuidmap, getuid().as_raw(), u),
        (newgidmap, getgid().as_raw(), g),
    ] {
        let out = std::process::Command::new(bin)
            .arg(pid.as_raw().to_string())
            .args([
                "0",
                &own.to_string(),
                "1",
                "1",
                &r.start.to_string(),
                &r.count.to_string(),
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The subordinate-id ranges to map for `--subids`, logged either way;
/// None maps only the caller's own ids.
fn subid_plan() -> Option<(SubRange, SubRange, PathBuf, PathBuf)> {
    match find_subids() {
        Ok(plan) => {
            tracing::info!(
                uids = format!("0={},1-{}={}+", getuid(), plan.0.count, plan.0.start),
                gids = format!("0={},1-{}={}+", getgid(), plan.1.count, plan.1.start),
                "mapping subordinate ids"
            );
            Some(plan)
        }
        Err(why) => {
            tracing::info!(
                "{why}: mapping only uid {} and gid {} to root in the namespace (package managers and container runtimes inside may fail)",
                getuid(),
                getgid()
            );
            None
        }
    }
}

/// The parent's side once the child has reported (or not) that its
/// namespaces exist: the command, or why it could not start. An error
/// drops `cmd`, whose Drop kills and reaps the child unless it was already
/// reaped (`go` taken).
fn settle(
    mut cmd: SpawnedCommand,
    ready: std::io::Result<Option<Vec<u8>>>,
) -> Result<SpawnedCommand, NsError> {
    let child = cmd.pid;
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
}

/// Like [`spawn_in_new_namespaces`], with the choices of `opts`.
pub fn spawn_with(argv: &[OsString], opts: &SpawnOptions) -> Result<SpawnedCommand, NsError> {
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
    let subids = if opts.subids { subid_plan() } else { None };
    let parent = getpid();
    // Child → parent "namespaces created", parent → child "ids mapped".
    let (sync_r, sync_w) = pipe2(OFlag::O_CLOEXEC)
        .map_err(os_err("cannot create a pipe for the command's process"))?;
    let (mapped_r, mapped_w) = pipe2(OFlag::O_CLOEXEC)
        .map_err(os_err("cannot create a pipe for the command's process"))?;
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
            drop(sync_r);
            drop(mapped_w);
            let ctx = ChildCtx {
                parent,
                status: status_w,
                go: go_r,
                argv: &cargs,
                uid_map: &uid_map,
                gid_map: &gid_map,
                sync: sync_w,
                mapped: mapped_r,
                wait_for_map: subids.is_some(),
                resolv_conf: opts.resolv_conf.as_deref(),
            };
            exit_child(move || child_main(ctx))
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_w);
            drop(go_r);
            drop(sync_w);
            drop(mapped_r);
            if let Some(plan) = &subids {
                let mut b = [0u8; 1];
                // EOF instead of the byte means the child failed; its report
                // follows on the status pipe.
                if matches!(nix::unistd::read(&sync_r, &mut b), Ok(1)) {
                    let answer = match map_subids(child, plan) {
                        Ok(()) => b"M",
                        Err(e) => {
                            tracing::warn!("{e}; mapping only the caller's own ids instead");
                            b"S"
                        }
                    };
                    let _ = write_once(&mapped_w, answer);
                }
            }
            drop(mapped_w);
            let mut status = File::from(status_r);
            let ready = read_stream_report(&mut status);
            let cmd = SpawnedCommand {
                pid: child,
                program,
                go: Some(go_w),
                status: Some(status),
            };
            settle(cmd, ready)
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
    /// Written once the namespaces exist (when the parent maps the ids).
    sync: OwnedFd,
    /// The parent's answer: `M` mapped, `S` (or EOF) map yourself.
    mapped: OwnedFd,
    wait_for_map: bool,
    resolv_conf: Option<&'a str>,
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

/// In the command's new mount namespace: stops propagation back to the
/// host, and bind-mounts a file holding `text` over /etc/resolv.conf. The
/// file is made on a tmpfs briefly mounted over /tmp, which is unmounted
/// again (the bind mount keeps that tmpfs alive), so the command sees the
/// host's /tmp.
fn private_resolv_conf(text: &str) -> Result<(), (Errno, &'static str)> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| (e, "private /etc/resolv.conf for the command (--host-resolv-conf skips it): make the mount namespace private"))?;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64k,mode=755"),
    )
    .map_err(|e| (e, "private /etc/resolv.conf for the command (--host-resolv-conf skips it): mount a tmpfs on /tmp"))?;
    let made = (|| {
        let fd = open(
            "/tmp/resolv.conf",
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| (e, "create resolv.conf"))?;
        write_once(&fd, text.as_bytes()).map_err(|e| (e, "write resolv.conf"))?;
        drop(fd);
        mount(
            Some("/tmp/resolv.conf"),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| (e, "private /etc/resolv.conf for the command (--host-resolv-conf skips it): bind-mount over /etc/resolv.conf"))
    })();
    umount2("/tmp", MntFlags::MNT_DETACH).map_err(|e| (e, "unmount the temporary tmpfs"))?;
    made
}

/// Restores default signal dispositions and an empty signal mask, so the
/// command does not inherit what rnet blocked or ignored (e.g. SIGPIPE).
fn reset_signals() {
    crate::sys::reset_signals(&[]);
}

/// The command's process after fork: returns its exit code if it does not
/// exec.
fn child_main(ctx: ChildCtx<'_>) -> i32 {
    close_private_fds(&[
        ctx.status.as_raw_fd(),
        ctx.go.as_raw_fd(),
        ctx.sync.as_raw_fd(),
        ctx.mapped.as_raw_fd(),
    ]);
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
    let mut flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET;
    if ctx.resolv_conf.is_some() {
        flags |= CloneFlags::CLONE_NEWNS;
    }
    if let Err(e) = unshare(flags) {
        return fail(ChildError::new(Step::Unshare, e, "unshare"));
    }
    let mut mapped_by_parent = false;
    if ctx.wait_for_map {
        let mut b = [0u8; 1];
        if write_once(&ctx.sync, b"U").is_ok() {
            mapped_by_parent =
                matches!(nix::unistd::read(&ctx.mapped, &mut b), Ok(1)) && b[0] == b'M';
        }
    }
    drop(ctx.sync);
    drop(ctx.mapped);
    if !mapped_by_parent {
        // Without setgroups=deny an unprivileged gid_map write is refused;
        // old kernels lack the file and need nothing.
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
    }
    if let Some(text) = ctx.resolv_conf
        && let Err((e, what)) = private_resolv_conf(text)
    {
        return fail(ChildError::new(Step::Internal, e, what));
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
mod subid_tests {
    use super::*;

    #[test]
    fn subid_lines() {
        let t = "# c\nalice:100000:65536\n1000:200000:65536\nbob:300000:0\n";
        assert_eq!(
            parse_subid(t, Some("alice"), 5),
            Some(SubRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            parse_subid(t, Some("carol"), 1000),
            Some(SubRange {
                start: 200000,
                count: 65536
            })
        );
        assert_eq!(parse_subid(t, Some("bob"), 7), None);
        assert_eq!(parse_subid("garbage\n::\n", None, 0), None);
    }
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
