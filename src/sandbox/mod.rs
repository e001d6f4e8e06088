//! Self-isolation once set-up is done: rnet gives up the filesystem, its
//! capabilities and most of the kernel's system calls before it starts
//! parsing frames from a guest it does not trust.
//!
//! # Theory of operation
//!
//! Set-up needs privileges and a view of the system that the data plane
//! does not: entering the target's namespaces, opening `/dev/net/tun`,
//! reading `/etc/resolv.conf`, forking the in-namespace agent, binding the
//! ports published at start and the control socket. Once those are done,
//! [`enter`] takes away, in stages, everything the running data plane can do
//! without. Each stage is inherited by every thread and process started
//! later, so [`enter`] runs while the process has a single thread (it checks,
//! and refuses otherwise): mount namespaces and capabilities belong to a
//! thread, not a process, and `unshare(CLONE_NEWUSER)` refuses a threaded
//! caller.
//!
//! 1. **Mount isolation** ([`SandboxOptions::mount`]). rnet moves into a
//!    mount namespace of its own: with `CAP_SYS_ADMIN` (root) just
//!    `unshare(CLONE_NEWNS)`, staying in the user namespace that owns the
//!    host's network (so stage 2 may keep `CAP_NET_BIND_SERVICE`);
//!    otherwise `unshare(CLONE_NEWUSER | CLONE_NEWNS)`, mapping its uid and
//!    gid to themselves (`setgroups` denied), which an unprivileged user
//!    may do. Propagation is made private, then an empty tmpfs, mounted
//!    over `/tmp` or another existing directory (in this namespace only),
//!    becomes the new root; each path of [`SandboxOptions::keep`] (read-only) and
//!    [`SandboxOptions::keep_writable`] is bind-mounted into it at the same
//!    place, symbolic links on the way recreated so the original name still
//!    resolves (`/etc/resolv.conf` → `../run/systemd/resolve/...` keeps
//!    working); `/etc` and `/run` exist in it even when nothing kept lies
//!    below them. Then `pivot_root`, the old root is detached
//!    (`umount2(MNT_DETACH)`) and the new root remounted read-only, nosuid,
//!    nodev, noexec.
//!    *Removed:* every file and directory not kept, `/proc` and `/dev`
//!    included. *Stays:* descriptors already open (the TAP, epoll, host
//!    sockets, listeners, the agent's socket, the target's pidfd, directory
//!    descriptors opened with [`KeptDir`]); the network namespace is
//!    unchanged, so host sockets opened later work exactly as before. In
//!    the new user namespace rnet has no privilege over the host's network
//!    namespace: host ports below 1024 stay refused, as they were for an
//!    unprivileged user. Signals and `wait` still reach rnet's children,
//!    which keep their own namespaces.
//!    **Landlock** (with mount isolation, where the kernel has it; without
//!    it rnet logs so and goes on): once no_new_privs is set (stage 3),
//!    every later open, from whatever descriptor, is confined to the new
//!    root (read only), the writable kept paths, and each [`KeptDir`] with
//!    only what it is kept for (reading for `/proc/PID/net`, removing the
//!    control socket for its directory), so a directory descriptor from
//!    before `pivot_root` no longer leads back to the host tree through
//!    `..`; connecting to abstract Unix sockets outside is refused too (ABI
//!    6).
//! 2. **Capabilities.** The ambient set is cleared, the bounding set dropped
//!    (when rnet holds `CAP_SETPCAP`, i.e. as root or in its new user
//!    namespace; an unprivileged process without it cannot, and gains
//!    nothing from it since it can no longer execute anything), and the
//!    effective, permitted and inheritable sets set to empty, except
//!    `CAP_NET_BIND_SERVICE` when rnet had it and still runs in the user
//!    namespace that owns the host's network (root without a new user
//!    namespace): publishing a port below 1024 through the control socket
//!    keeps working then. *Removed:* every other capability, in every set.
//! 3. **no_new_privs** (`PR_SET_NO_NEW_PRIVS`): no later `execve` could gain
//!    privileges (set-uid, file capabilities), and the seccomp filter below
//!    may be installed without `CAP_SYS_ADMIN`.
//! 4. **seccomp** ([`SandboxOptions::seccomp`]): an allow-list of the system
//!    calls the data plane, the control socket threads, the auto-publish
//!    watcher and the signal thread make ([`allowed()`], with a reason each).
//!    Any other call kills the whole process with `SIGSYS`
//!    (`SECCOMP_RET_KILL_PROCESS`). Some are narrowed by argument:
//!    `socket` to `AF_INET`, `AF_INET6` and `AF_UNIX`; `clone` to new
//!    threads (`CLONE_THREAD`: no `fork`); `ioctl` to a few socket and
//!    descriptor requests; `prctl` to thread names. `clone3`, whose flags a
//!    filter cannot read, fails with `ENOSYS`, so the C library falls back
//!    to `clone`. The filter is installed with `SECCOMP_FILTER_FLAG_TSYNC`.
//!    A third program makes some allowed calls fail with `EPERM` by their
//!    arguments (`deny_program`), where a mistake should cost an error,
//!    not the process: `kill` only to rnet itself and the children it has
//!    when entering (the agent, `rnet run`'s command; never a process group
//!    or `-1`), `tgkill` only within rnet, and no `socket(AF_UNIX)`.
//!    *Removed, among others:* `execve`/`execveat`, `ptrace`, `mount`,
//!    `umount2`, `pivot_root`, `setns`, `unshare`, `fork`, module loading,
//!    `kexec_load`, `bpf`, `keyctl`, `perf_event_open`, `process_vm_*`,
//!    `setuid` and friends, netlink and packet sockets.
//!
//! Why before the threads rather than after them with `TSYNC`: the seccomp
//! filter could be synchronised to running threads, but the mount
//! namespace, the user namespace and the capability sets cannot, so a
//! thread started earlier would keep the whole filesystem and every
//! capability.
//!
//! What must be ready before [`enter`]: the agent forked (it joins the
//! target's namespaces, which rnet can no longer do; so a target given as
//! a netns path works like a PID), the ports given at start bound, the
//! control socket bound, and files that are read later either kept or
//! opened as [`KeptDir`]s. A later `fork` or `execve` is fatal by design.
//! [`enter`] is meant to be called once.
//!
//! Files: this one holds [`enter`] and its options and errors; `mounts.rs`
//! stage 1; `landlock.rs` stage 1b and [`KeptDir`]; `caps.rs` stage 2;
//! `seccomp.rs` stage 4 and the supervisor's filter.
//!
//! # Debugging a kill
//!
//! A process killed by the filter exits on `SIGSYS` (status 159 from a
//! shell). To find the call: the kernel's audit log has a `type=SECCOMP`
//! (1326) line with `syscall=N` (`dmesg`, `journalctl -k`); or run under
//! `strace -f` and look at the last call before `+++ killed by SIGSYS +++`;
//! `--no-sandbox` confirms the sandbox is the cause. Add the call to
//! [`allowed()`] with its reason.

use std::io;
use std::path::PathBuf;

use tracing::info;

/// What [`enter`] does.
#[derive(Clone, Debug, Default)]
pub struct SandboxOptions {
    /// A private mount namespace whose root is an empty read-only tmpfs
    /// holding only the kept paths.
    pub mount: bool,
    /// The seccomp allow-list.
    pub seccomp: bool,
    /// Absolute paths (files or directories) that stay visible, read-only,
    /// at the same place; symbolic links on the way are followed and
    /// recreated. Missing paths are skipped. Read-only applies to the kept
    /// mount itself; mounts below a kept directory keep their own flags.
    pub keep: Vec<PathBuf>,
    /// Like [`SandboxOptions::keep`], but writable (for example the
    /// directory of a capture file that is rotated by renaming).
    pub keep_writable: Vec<PathBuf>,
}

/// A stage of [`enter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Checks made before anything changes.
    Precondition,
    /// The private user and mount namespaces and the new root.
    Mount,
    /// Dropping capabilities.
    Capabilities,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// Building or installing the seccomp filter.
    Seccomp,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Precondition => "precondition",
            Stage::Mount => "mount isolation",
            Stage::Capabilities => "dropping capabilities",
            Stage::NoNewPrivs => "no_new_privs",
            Stage::Seccomp => "seccomp filter",
        })
    }
}

/// Why [`enter`] failed. The process may be partly sandboxed: stages before
/// the failing one stay in force.
#[derive(Debug, thiserror::Error)]
#[error("sandbox ({stage}): {what}: {source}")]
pub struct SandboxError {
    /// The stage that failed.
    pub stage: Stage,
    /// What was being done.
    pub what: String,
    /// The underlying error.
    pub source: io::Error,
}

impl SandboxError {
    fn new(stage: Stage, what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        SandboxError {
            stage,
            what: what.into(),
            source: source.into(),
        }
    }
}

fn at(stage: Stage, what: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::new(stage, what, io::Error::from(e))
}

fn at_io(stage: Stage, what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::new(stage, what, e)
}

/// Applies the sandbox to the calling process, stage by stage (see the
/// module documentation). Call it once, after set-up, while the process
/// has exactly one thread; threads started afterwards inherit everything.
pub fn enter(opts: &SandboxOptions) -> Result<(), SandboxError> {
    let threads = thread_count().map_err(at_io(
        Stage::Precondition,
        "counting threads in /proc/self/task",
    ))?;
    if threads != 1 {
        return Err(SandboxError::new(
            Stage::Precondition,
            format!("the process has {threads} threads"),
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the sandbox must be entered before any other thread is started",
            ),
        ));
    }
    let initial = capget().map_err(at_io(Stage::Precondition, "capget"))?;
    // Built first, so that an architecture without a filter changes nothing.
    // Signals stay pinned to rnet itself and the children it has now (the
    // agent, `rnet run`'s command): the filter forbids any later fork.
    let filters = if opts.seccomp {
        let me = std::process::id() as i32;
        Some((programs()?, deny_program(me, &children(me))?))
    } else {
        None
    };
    let mut own_userns = false;
    if opts.mount {
        own_userns = isolate_mounts(opts, initial.has(CAP_SYS_ADMIN))?;
    }
    let keep = if initial.has(CAP_NET_BIND_SERVICE) && !own_userns {
        1u64 << CAP_NET_BIND_SERVICE
    } else {
        0
    };
    drop_capabilities(keep)?;
    nix::sys::prctl::set_no_new_privs().map_err(at(Stage::NoNewPrivs, "prctl"))?;
    let landlock = if opts.mount {
        restrict_paths(opts)?
    } else {
        None
    };
    if let Some((progs, deny)) = filters {
        // First: installing needs calls the allow-list forbids.
        seccompiler::apply_filter_all_threads(&deny).map_err(|e| {
            SandboxError::new(
                Stage::Seccomp,
                "installing",
                io::Error::other(e.to_string()),
            )
        })?;
        install_filters(&progs)?;
    }
    info!(
        mount = opts.mount,
        landlock = ?landlock,
        own_userns,
        capabilities = if keep == 0 {
            "none"
        } else {
            "CAP_NET_BIND_SERVICE"
        },
        seccomp = opts.seccomp,
        "sandbox entered"
    );
    Ok(())
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

mod caps;
mod landlock;
mod mounts;
mod seccomp;
#[cfg(test)]
mod tests;

pub(crate) use caps::drop_capabilities;
use caps::{CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN, capget};
pub(crate) use landlock::read_regular;
use landlock::restrict_paths;
pub use landlock::{KeptDir, READ_CAP};
pub(crate) use mounts::empty_root;
use mounts::isolate_mounts;
#[cfg(test)]
use mounts::plan;
pub(crate) use seccomp::deny_program;
pub use seccomp::{
    Allowed, ENOSYS_CALLS, Narrow, SUPERVISOR_DENIED, allowed, enter_supervisor, programs,
};
use seccomp::{children, install_filters};
