//! The namespace anchor: a small confined process that stands for a
//! network namespace given by path (pasta mode's `--netns PATH`), so that
//! the data plane can treat it like a PID target.
//!
//! rnet's serving process is sandboxed with an empty root, so it cannot
//! look at the namespace file's path once it runs. The anchor can: it
//! `stat`s the path at a fixed interval and exits once the path no longer
//! names the namespace it was started for (device and inode changed:
//! unmounted or deleted, which is all Podman does to clean up). Its exit is
//! what the data plane watches (a pidfd). It also joins the namespace (the
//! user namespace first, then the network namespace) so that
//! `/proc/ANCHOR/net` shows the namespace's sockets to `-t auto`.
//!
//! # Confinement
//!
//! Having joined the guest's user namespace, the anchor is a process the
//! guest's root can see and signal; it lives in the host's mount namespace
//! (to see the path), so it must give the guest nothing to use:
//!
//! - undumpable from the first instruction after `fork` (so no process of
//!   the guest's user namespace can `ptrace` it or open its `/proc` files:
//!   its memory belongs to rnet's user namespace, where the guest holds no
//!   capability);
//! - stdin, stdout and stderr on `/dev/null`, no other descriptor once it
//!   has reported, an empty environment, parent-death `SIGKILL`;
//! - no capability but `CAP_SYS_PTRACE` inside the guest's user namespace
//!   (see `CAP_SYS_PTRACE`), no_new_privs and a seccomp allow-list
//!   (`anchor_calls`: the stat calls, sleeping, memory, exit, and
//!   writing and closing its one report).
//!
//! # The namespaces it hands back
//!
//! Once inside, the anchor sends rnet its own `/proc/self/ns/{net,user}`
//! descriptors (SCM_RIGHTS) before confining itself; rnet attaches through
//! them ([`Anchor::target`]). Two other ways do not work: the anchor's
//! `/proc/PID/ns` is closed to an unprivileged rnet once the anchor is
//! undumpable, and a descriptor opened through the `--netns` path itself
//! would pin Podman's bind mount, so that its `umount` fails as busy.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::unistd::Pid;

use super::Target;
use super::agent::confine;
use super::fdpass::{recv_with_fd, send_with_fd};
use crate::sys::ForkResult;

/// The one capability the anchor keeps, in the guest's user namespace
/// only: following a `/proc/PID/ns/net` path (RootlessKit's `--netns`) is
/// a ptrace-mode access check against PID, which a process holding fewer
/// capabilities than PID fails. It gives power over the guest's own
/// processes, which the guest's root has anyway, and the seccomp filter
/// does not allow `ptrace`.
const CAP_SYS_PTRACE: u32 = 19;

/// A running anchor and the namespaces it joined.
#[derive(Debug)]
pub struct Anchor {
    pid: i32,
    net: OwnedFd,
    user: OwnedFd,
}

impl Anchor {
    /// The anchor's pid: its exit means the namespace file went away.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The namespaces to attach to, through the descriptors the anchor
    /// handed back (valid while `self` lives, before the sandbox hides
    /// `/proc`).
    pub fn target(&self) -> Target {
        let path = |fd: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Target::Path {
            netns: path(&self.net),
            userns: Some(path(&self.user)),
        }
    }
}

/// Forks the anchor for the network namespace file `netns`, joining
/// `userns` first if given. Returns once it is inside the namespace and
/// confined. It exits once `netns` stops naming that namespace (looked at
/// every `poll`) or when the calling process dies.
///
/// Call while the process is single-threaded (it forks).
pub fn spawn(netns: &Path, userns: Option<&Path>, poll: Duration) -> Result<Anchor, String> {
    let describe = |e: std::io::Error, p: &Path| format!("{}: {e}", p.display());
    // The anchor keeps looking at the path from wherever it was given.
    let path: PathBuf = std::path::absolute(netns).map_err(|e| describe(e, netns))?;
    let ns = File::open(&path).map_err(|e| describe(e, &path))?;
    let meta = ns.metadata().map_err(|e| describe(e, &path))?;
    let ident = (meta.dev(), meta.ino());
    let user = userns
        .map(|u| File::open(u).map_err(|e| describe(e, u)).map(|f| (f, u)))
        .transpose()?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the caller is single-threaded (documented above), so the
    // child may do anything the parent could; it never returns.
    match unsafe { crate::sys::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop((theirs, ns, user, null));
            let got = receive(&ours);
            drop(ours);
            match got {
                Ok((net, user)) => Ok(Anchor {
                    pid: child.as_raw(),
                    net,
                    user,
                }),
                Err(msg) => {
                    let _ = nix::sys::wait::waitpid(child, None);
                    Err(msg)
                }
            }
        }
        ForkResult::Child => {
            let _ = confine::undumpable();
            drop(ours);
            let plan = Plan {
                parent,
                path: &path,
                net: ns,
                user,
                null,
            };
            match plan.enter(&theirs) {
                Ok(()) => {
                    // The last report; closing the socket lets rnet go on.
                    let _ = send_with_fd(theirs.as_fd(), b"1", None);
                    drop(theirs);
                    watch(&path, ident, poll)
                }
                Err(msg) => {
                    let _ = send_with_fd(theirs.as_fd(), format!("E{msg}").as_bytes(), None);
                    std::process::exit(1)
                }
            }
        }
    }
}

/// The parent's side: the two namespace descriptors, then `1`.
fn receive(sock: &OwnedFd) -> Result<(OwnedFd, OwnedFd), String> {
    let (mut net, mut user) = (None, None);
    let mut buf = [0u8; 512];
    loop {
        let r = recv_with_fd(sock.as_fd(), &mut buf)
            .map_err(|e| format!("the namespace anchor's report: {e}"))?;
        match (&buf[..r.len], r.fd) {
            (b"N", Some(fd)) => net = Some(fd),
            (b"U", Some(fd)) => user = Some(fd),
            (b"1", None) => {
                return net
                    .zip(user)
                    .ok_or_else(|| "the namespace anchor sent no namespaces".into());
            }
            ([b'E', msg @ ..], _) => return Err(String::from_utf8_lossy(msg).into_owned()),
            ([], _) => return Err("the namespace anchor died while starting".into()),
            _ => return Err("the namespace anchor sent a bad report".into()),
        }
    }
}

/// What the child starts with.
struct Plan<'a> {
    parent: Pid,
    path: &'a Path,
    net: File,
    user: Option<(File, &'a Path)>,
    null: File,
}

impl Plan<'_> {
    /// Joins the namespaces, hands them to rnet through `report` and
    /// confines the process; `report` is its only descriptor left open
    /// afterwards (besides 0-2 on /dev/null).
    fn enter(self, report: &OwnedFd) -> Result<(), String> {
        crate::sys::stdio_to_null(self.null.as_raw_fd());
        let mut keep = vec![report.as_raw_fd(), self.net.as_raw_fd()];
        if let Some((u, _)) = &self.user {
            keep.push(u.as_raw_fd());
        }
        // `null` is closed here as a raw descriptor: forget the File so it
        // is not closed a second time.
        std::mem::forget(self.null);
        confine::close_all_but(&keep);
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| format!("parent-death signal: {e}"))?;
        if nix::unistd::getppid() != self.parent {
            return Err("rnet exited".into());
        }
        if let Some((u, p)) = &self.user {
            setns(u, CloneFlags::CLONE_NEWUSER)
                .map_err(|e| format!("joining the user namespace {}: {e}", p.display()))?;
        }
        setns(&self.net, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining the network namespace {}: {e}", self.path.display()))?;
        drop(self.net);
        drop(self.user);
        for (tag, file) in [(b"N", "/proc/self/ns/net"), (b"U", "/proc/self/ns/user")] {
            let fd = File::open(file).map_err(|e| format!("{file}: {e}"))?;
            send_with_fd(report.as_fd(), tag, Some(fd.as_fd()))
                .map_err(|e| format!("handing back {file}: {e}"))?;
        }
        // setns into a user namespace grants every capability there; keep
        // only CAP_SYS_PTRACE, and stay undumpable (a credential change may
        // reset it).
        let _ = confine::clear_environment();
        crate::sandbox::drop_capabilities(1 << CAP_SYS_PTRACE)
            .map_err(|e| format!("dropping the anchor's capabilities: {e}"))?;
        confine::undumpable().map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
        let filter = confine::build_seccomp(&anchor_calls()).map_err(|w| w.to_string())?;
        confine::install_seccomp(&filter)
            .map_err(|e| format!("installing the anchor's seccomp filter: {e}"))?;
        drop(filter);
        Ok(())
    }
}

/// The anchor's life once confined: look at the path until it changes.
fn watch(path: &Path, ident: (u64, u64), poll: Duration) -> ! {
    loop {
        std::thread::sleep(poll);
        let same = std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == ident);
        if !same {
            std::process::exit(0);
        }
    }
}

/// The anchor's seccomp allow-list: the helpers' base calls plus looking
/// at a path and sleeping.
fn anchor_calls() -> Vec<(libc::c_long, confine::Arg)> {
    use confine::Arg::{Any, OneOf};
    let mut v = confine::base_calls();
    v.extend([
        // Debug builds look at a descriptor (F_GETFD) before closing it.
        (libc::SYS_fcntl, OneOf(1, &[libc::F_GETFD as u64])),
        (libc::SYS_statx, Any),
        (libc::SYS_newfstatat, Any),
        (libc::SYS_fstat, Any),
        (libc::SYS_nanosleep, Any),
        (libc::SYS_clock_nanosleep, Any),
        (libc::SYS_restart_syscall, Any),
    ]);
    #[cfg(target_arch = "x86_64")]
    v.extend([(libc::SYS_stat, Any), (libc::SYS_lstat, Any)]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_named() {
        let err = spawn(
            Path::new("/nonexistent/rnet-anchor-netns"),
            None,
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert!(err.contains("/nonexistent/rnet-anchor-netns"), "{err}");
    }
}
