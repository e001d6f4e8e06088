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
//!   (see [`CAP_SYS_PTRACE`]), no_new_privs and a seccomp allow-list
//!   ([`anchor_calls`]: the stat calls, sleeping, memory, exit, and
//!   writing and closing its one report).
//!
//! rnet opens the namespace files itself (by path, [`crate::Target::Path`]),
//! never through the anchor's `/proc/PID/ns`, which an undumpable process
//! does not show to an unprivileged caller.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::unistd::{ForkResult, Pid};

use super::agent::confine;

/// The one capability the anchor keeps, in the guest's user namespace
/// only: following a `/proc/PID/ns/net` path (RootlessKit's `--netns`) is
/// a ptrace-mode access check against PID, which a process holding fewer
/// capabilities than PID fails. It gives power over the guest's own
/// processes, which the guest's root has anyway, and the seccomp filter
/// does not allow `ptrace`.
const CAP_SYS_PTRACE: u32 = 19;

/// Forks the anchor for the network namespace file `netns`, joining
/// `userns` first if given. Returns its pid once it is inside the
/// namespace and confined. It exits once `netns` stops naming that
/// namespace (looked at every `poll`) or when the calling process dies.
///
/// Call while the process is single-threaded (it forks).
pub fn spawn(netns: &Path, userns: Option<&Path>, poll: Duration) -> Result<i32, String> {
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
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the caller is single-threaded (documented above), so the
    // child may do anything the parent could; it never returns.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(w);
            let mut word = Vec::new();
            let _ = File::from(r).read_to_end(&mut word);
            if word.first() == Some(&b'1') {
                Ok(child.as_raw())
            } else {
                let _ = nix::sys::wait::waitpid(child, None);
                let msg = String::from_utf8_lossy(&word).trim_end().to_string();
                Err(if msg.is_empty() {
                    "the namespace anchor died while starting".into()
                } else {
                    msg
                })
            }
        }
        ForkResult::Child => {
            let _ = confine::undumpable();
            drop(r);
            let plan = Plan {
                parent,
                path: &path,
                net: ns,
                user,
                null,
            };
            let mut w = File::from(w);
            match plan.enter(&w) {
                Ok(()) => {
                    // The one report; closing it lets the parent go on.
                    let _ = w.write_all(b"1");
                    drop(w);
                    watch(&path, ident, poll)
                }
                Err(msg) => {
                    let _ = w.write_all(msg.as_bytes());
                    std::process::exit(1)
                }
            }
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
    /// Joins the namespaces and confines the process; `report` is the
    /// only descriptor left open afterwards (besides 0-2 on /dev/null).
    fn enter(self, report: &File) -> Result<(), String> {
        confine::std_to_null(self.null.as_raw_fd());
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
