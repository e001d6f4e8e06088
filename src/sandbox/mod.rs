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
//! # Debugging a kill
//!
//! A process killed by the filter exits on `SIGSYS` (status 159 from a
//! shell). To find the call: the kernel's audit log has a `type=SECCOMP`
//! (1326) line with `syscall=N` (`dmesg`, `journalctl -k`); or run under
//! `strace -f` and look at the last call before `+++ killed by SIGSYS +++`;
//! `--no-sandbox` confirms the sandbox is the cause. Add the call to
//! [`allowed()`] with its reason.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{chdir, pivot_root};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use tracing::{debug, info};

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

// ---------------------------------------------------------------------------
// Stage 1: mounts.

/// One thing to recreate in the new root.
enum Entry {
    /// A symbolic link at `at` whose text is `target`.
    Symlink { at: PathBuf, target: PathBuf },
    /// A bind mount of `src` (an `O_PATH` descriptor) at `at`.
    Bind {
        at: PathBuf,
        src: OwnedFd,
        dir: bool,
        writable: bool,
    },
}

/// Resolves `path` component by component, recording each symbolic link
/// met and, at the end, the real object to bind.
fn plan(path: &Path, writable: bool, out: &mut Vec<Entry>) -> io::Result<()> {
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "kept paths must be absolute",
        ));
    }
    let mut todo: Vec<OsString> = Vec::new();
    push_front(&mut todo, path);
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let meta = std::fs::symlink_metadata(&next)?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(&next)?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_front(&mut todo, &target);
            out.push(Entry::Symlink { at: next, target });
        } else {
            cur = next;
        }
    }
    if cur == Path::new("/") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the root directory cannot be kept",
        ));
    }
    let src = nix::fcntl::open(
        &cur,
        OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    let dir = std::fs::metadata(&cur)?.is_dir();
    out.push(Entry::Bind {
        at: cur,
        src,
        dir,
        writable,
    });
    Ok(())
}

/// Puts the components of `p` in front of the stack `todo` (which pops
/// from the end), in order.
fn push_front(todo: &mut Vec<OsString>, p: &Path) {
    let comps: Vec<OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    todo.extend(comps.into_iter().rev());
}

/// Stage 1. Returns whether a user namespace of rnet's own was created.
fn isolate_mounts(opts: &SandboxOptions, sys_admin: bool) -> Result<bool, SandboxError> {
    let s = Stage::Mount;
    let own_userns = !sys_admin;
    if own_userns {
        let uid = nix::unistd::geteuid();
        let gid = nix::unistd::getegid();
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
            .map_err(at(s, "unshare(CLONE_NEWUSER | CLONE_NEWNS)"))?;
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    } else {
        unshare(CloneFlags::CLONE_NEWNS).map_err(at(s, "unshare(CLONE_NEWNS)"))?;
    }
    // Nothing done below may propagate back to the host's mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(at(s, "making / private"))?;
    // Resolve and open everything kept while the whole filesystem is
    // still in view (the tmpfs below may hide some of it), and from inside
    // the new mount namespace (a bind's source must belong to it).
    let mut entries = Vec::new();
    for (p, w) in opts
        .keep
        .iter()
        .map(|p| (p, false))
        .chain(opts.keep_writable.iter().map(|p| (p, true)))
    {
        let mut one = Vec::new();
        match plan(p, w, &mut one) {
            Ok(()) => entries.extend(one),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(path = %p.display(), "kept path does not exist; skipped");
            }
            Err(e) => return Err(SandboxError::new(s, format!("keeping {}", p.display()), e)),
        }
    }
    let base = mount_base(&entries).ok_or_else(|| {
        SandboxError::new(
            s,
            "finding a directory to mount the new root on",
            io::ErrorKind::NotFound,
        )
    })?;
    let base = base.as_path();
    mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(at(s, format!("mounting a tmpfs on {}", base.display())))?;
    // `/etc` and `/run` always exist in the new root (read-only, like all
    // of it), as in slirp4netns's sandbox: scripts look for them, and the
    // kept paths below fill in what rnet reads (`/etc/resolv.conf`, and the
    // file under `/run` it may link to). The helpers that live in the
    // guest's namespaces ([`empty_root`], `opts.mount` false) get nothing.
    for d in ["etc", "run"].into_iter().filter(|_| opts.mount) {
        if let Err(err) = std::fs::create_dir(base.join(d))
            && err.kind() != io::ErrorKind::AlreadyExists
        {
            return Err(SandboxError::new(s, format!("creating /{d}"), err));
        }
    }

    let mut bound_dirs: Vec<PathBuf> = Vec::new();
    for e in &entries {
        let path = match e {
            Entry::Symlink { at, .. } | Entry::Bind { at, .. } => at,
        };
        // Already visible through a directory bound before: creating
        // anything there would write into the real directory.
        if bound_dirs.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        let inner = base.join(path.strip_prefix("/").unwrap_or(path));
        if let Some(parent) = inner.parent() {
            std::fs::create_dir_all(parent)
                .map_err(at_io(s, format!("creating {}", parent.display())))?;
        }
        match e {
            Entry::Symlink { target, .. } => {
                if let Err(err) = std::os::unix::fs::symlink(target, &inner)
                    && err.kind() != io::ErrorKind::AlreadyExists
                {
                    return Err(SandboxError::new(
                        s,
                        format!("recreating the link {}", path.display()),
                        err,
                    ));
                }
            }
            Entry::Bind {
                src, dir, writable, ..
            } => {
                let made = if *dir {
                    std::fs::create_dir(&inner)
                } else {
                    std::fs::File::create(&inner).map(drop)
                };
                if let Err(err) = made
                    && err.kind() != io::ErrorKind::AlreadyExists
                {
                    return Err(SandboxError::new(
                        s,
                        format!("creating the mount point for {}", path.display()),
                        err,
                    ));
                }
                let from = format!("/proc/self/fd/{}", src.as_raw_fd());
                mount(
                    Some(from.as_str()),
                    &inner,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(at(s, format!("binding {}", path.display())))?;
                remount_restricted(&inner, !*writable)
                    .map_err(at(s, format!("restricting {}", path.display())))?;
                if *dir {
                    bound_dirs.push(path.clone());
                }
            }
        }
    }
    drop(entries);

    chdir(base).map_err(at(s, "entering the new root"))?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching
    // it leaves the new root alone (see pivot_root(2)).
    pivot_root(".", ".").map_err(at(s, "pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(at(s, "detaching the old root"))?;
    chdir("/").map_err(at(s, "chdir /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(at(s, "remounting the new root read-only"))?;
    Ok(own_userns)
}

/// For a helper process that is already privileged over its user
/// namespace (the namespace agent, in the guest's): a mount namespace of
/// its own whose root is an empty read-only tmpfs, as stage 1 with nothing
/// kept.
///
/// Unlike rnet's own root, this one has no `/etc` or `/run`: nothing that
/// runs in the guest's namespaces needs them.
pub(crate) fn empty_root() -> Result<(), SandboxError> {
    isolate_mounts(&SandboxOptions::default(), true).map(drop)
}

/// Where to build the new root: an existing directory, not a symbolic
/// link, that is not a kept path or inside one (a recursive bind of a kept
/// directory would take along the tmpfs mounted there).
fn mount_base(entries: &[Entry]) -> Option<PathBuf> {
    let kept: Vec<&Path> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Bind { at, .. } => Some(at.as_path()),
            Entry::Symlink { .. } => None,
        })
        .collect();
    let preferred = ["/tmp", "/run", "/mnt", "/var/tmp", "/etc"]
        .into_iter()
        .map(PathBuf::from);
    let others = std::fs::read_dir("/")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()));
    preferred.chain(others).find(|p| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
            && !kept.iter().any(|k| p.starts_with(k))
    })
}

fn write_proc(path: &str, text: &str) -> Result<(), SandboxError> {
    std::fs::write(path, text).map_err(at_io(Stage::Mount, format!("writing {path}")))
}

/// Remounts the bind mount at `p` nosuid, nodev, noexec and, if asked,
/// read-only. Flags the bind inherited from a mount of a more privileged
/// namespace are locked and must be repeated, atime handling included.
fn remount_restricted(p: &Path, read_only: bool) -> nix::Result<()> {
    let have = statvfs(p)?.flags();
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if read_only || have.contains(FsFlags::ST_RDONLY) {
        flags |= MsFlags::MS_RDONLY;
    }
    if have.contains(FsFlags::ST_NOATIME) {
        flags |= MsFlags::MS_NOATIME;
    } else if have.contains(FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_RELATIME;
    } else {
        flags |= MsFlags::MS_STRICTATIME;
    }
    if have.contains(FsFlags::ST_NODIRATIME) {
        flags |= MsFlags::MS_NODIRATIME;
    }
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
}

// ---------------------------------------------------------------------------
// Stage 1b: Landlock.

/// Landlock file-system rights (linux/landlock.h).
mod ll {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_REG: u64 = 1 << 8;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const IOCTL_DEV: u64 = 1 << 15;
    /// Every right of ABI 1.
    pub const ABI1: u64 = (1 << 13) - 1;
    /// `scoped`, ABI 6: no connecting to abstract Unix sockets outside.
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const CREATE_RULESET_VERSION: u32 = 1 << 0;
    pub const RULE_PATH_BENEATH: i32 = 1;
}

/// What a [`KeptDir`] may still be used for once Landlock is in force.
const KEPT_READ: u64 = ll::READ_FILE | ll::READ_DIR;
const KEPT_UNLINK: u64 = ll::REMOVE_FILE;

/// The [`KeptDir`]s alive (the descriptor of each, and the rights it
/// keeps), for the Landlock rules of [`enter`]; each removes itself when
/// dropped.
static KEPT: std::sync::Mutex<Vec<(std::os::fd::RawFd, u64)>> = std::sync::Mutex::new(Vec::new());

/// The Landlock ABI the kernel offers (0: none).
fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a
    // number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            ll::CREATE_RULESET_VERSION,
        )
    };
    r.max(0)
}

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// Stage 1b, after the new root is in place: Landlock confines every later
/// open, whatever descriptor it starts from, to the new root (read-only
/// rights), the writable kept paths, and the [`KeptDir`]s (each with only
/// the rights it is kept for). A directory descriptor from before
/// `pivot_root` then no longer leads back to the host tree through `..`.
/// Returns the ABI used, or `None` when the kernel has no Landlock (logged;
/// the mount isolation still holds, but kept descriptors could walk up).
fn restrict_paths(opts: &SandboxOptions) -> Result<Option<i64>, SandboxError> {
    let s = Stage::Mount;
    let abi = landlock_abi();
    let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if abi < 1 {
        info!(
            "Landlock is not available in this kernel: directory descriptors kept across the sandbox (control socket, /proc/PID/net) are not confined"
        );
        return Ok(None);
    }
    let mut handled = ll::ABI1;
    if abi >= 2 {
        handled |= ll::REFER;
    }
    if abi >= 3 {
        handled |= ll::TRUNCATE;
    }
    if abi >= 5 {
        handled |= ll::IOCTL_DEV;
    }
    let attr = RulesetAttr {
        handled_access_fs: handled,
        handled_access_net: 0,
        scoped: if abi >= 6 {
            ll::SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        },
    };
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    // SAFETY: the kernel reads `size` bytes of `attr`, all initialised.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    if fd < 0 {
        return Err(SandboxError::new(
            s,
            "creating a Landlock ruleset",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor nothing else owns.
    let ruleset = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let add =
        |dir: std::os::fd::BorrowedFd<'_>, rights: u64, what: &str| -> Result<(), SandboxError> {
            let rule = PathBeneath {
                allowed_access: rights & handled,
                parent_fd: dir.as_raw_fd(),
            };
            // SAFETY: the kernel reads the packed rule, live for the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.as_raw_fd(),
                    ll::RULE_PATH_BENEATH,
                    &rule as *const PathBeneath,
                    0u32,
                )
            };
            if r != 0 {
                return Err(SandboxError::new(
                    s,
                    format!("adding the Landlock rule for {what}"),
                    io::Error::last_os_error(),
                ));
            }
            Ok(())
        };
    let open_path = |p: &Path| {
        nix::fcntl::open(p, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(at(s, format!("opening {} for Landlock", p.display())))
    };
    add(
        open_path(Path::new("/"))?.as_fd(),
        ll::READ_FILE | ll::READ_DIR,
        "/",
    )?;
    for p in &opts.keep_writable {
        let Ok(fd) = nix::fcntl::open(p.as_path(), OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        else {
            continue;
        };
        let rights = ll::READ_FILE
            | ll::READ_DIR
            | ll::WRITE_FILE
            | ll::MAKE_REG
            | ll::REMOVE_FILE
            | ll::TRUNCATE;
        add(fd.as_fd(), rights, &p.display().to_string())?;
    }
    for (fd, rights) in &kept {
        // SAFETY: each registered descriptor belongs to a live KeptDir,
        // which deregisters it before closing it.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
        add(fd, *rights, "a kept directory")?;
    }
    debug_assert_eq!(ll::EXECUTE & (ll::READ_FILE | ll::READ_DIR), 0);
    // SAFETY: landlock_restrict_self with a ruleset descriptor and no flags.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if r != 0 {
        return Err(SandboxError::new(
            s,
            "entering the Landlock domain",
            io::Error::last_os_error(),
        ));
    }
    Ok(Some(abi))
}

/// The pids of the calling process's children (one thread: its tid is its
/// pid), from `/proc/self/task/PID/children`; empty if unreadable.
fn children(me: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/self/task/{me}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The third program: calls allowed by the allow-list that fail with
/// `EPERM` for some arguments, so that a mistake costs an error, not the
/// process. `kill` only to `me` and `children` (never to a process group,
/// `-1`, or anyone else), `tgkill` only within `me`, and no
/// `socket(AF_UNIX)` (nothing rnet does after set-up needs one: its Unix
/// sockets are bound, paired or accepted before or without `socket`).
pub(crate) fn deny_program(me: i32, children: &[i32]) -> Result<BpfProgram, SandboxError> {
    use SeccompCmpArgLen::Dword;
    fn bad(e: impl std::fmt::Display) -> SandboxError {
        SandboxError::new(
            Stage::Seccomp,
            "building the filter",
            io::Error::other(e.to_string()),
        )
    }
    let ne = |v: i32| cond(0, Dword, SeccompCmpOp::Ne, v as u32 as u64);
    let kill: Vec<SeccompCondition> = std::iter::once(me)
        .chain(children.iter().copied())
        .map(ne)
        .collect();
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    map.insert(libc::SYS_kill, vec![SeccompRule::new(kill).map_err(bad)?]);
    map.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![ne(me)]).map_err(bad)?],
    );
    map.insert(
        libc::SYS_socket,
        vec![
            SeccompRule::new(vec![cond(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])
                .map_err(bad)?,
        ],
    );
    let f = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(bad)?;
    f.try_into().map_err(bad)
}

// ---------------------------------------------------------------------------
// Stage 2: capabilities.

const CAP_VERSION_3: u32 = 0x2008_0522;
/// Capability numbers (linux/capability.h).
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets, 64 bits each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Caps {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

impl Caps {
    fn has(&self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }
}

fn capget() -> io::Result<Caps> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two CapData structs (the
    // version 3 layout), both valid and live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Caps {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn capset(caps: Caps) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let split = |v: u64| [v as u32, (v >> 32) as u32];
    let (e, p, i) = (
        split(caps.effective),
        split(caps.permitted),
        split(caps.inheritable),
    );
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: capset reads the header and two CapData structs (the version
    // 3 layout), both valid and live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stage 2: only the capabilities in `keep` remain, in the effective and
/// permitted sets; none are inheritable, ambient or in the bounding set.
pub(crate) fn drop_capabilities(keep: u64) -> Result<(), SandboxError> {
    let s = Stage::Capabilities;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: a kernel older than 4.3, which has no ambient set.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(SandboxError::new(s, "clearing the ambient set", e));
        }
    }
    let have = capget().map_err(at_io(s, "capget"))?;
    if have.has(CAP_SETPCAP) {
        for cap in 0..64u32 {
            if keep & (1u64 << cap) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    // Past the kernel's last capability.
                    break;
                }
                return Err(SandboxError::new(
                    s,
                    format!("dropping capability {cap} from the bounding set"),
                    e,
                ));
            }
        }
    }
    let want = Caps {
        effective: keep & have.permitted,
        permitted: keep & have.permitted,
        inheritable: 0,
    };
    capset(want).map_err(at_io(s, "capset"))?;
    let now = capget().map_err(at_io(s, "capget"))?;
    if now != want {
        return Err(SandboxError::new(
            s,
            format!("capabilities are {now:x?} after capset"),
            io::Error::other("capabilities not dropped"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Stage 4: seccomp.

/// How a call in [`allowed()`] is narrowed by its arguments.
#[derive(Clone, Copy, Debug)]
pub enum Narrow {
    /// Any arguments.
    Any,
    /// `socket`: the address family (argument 0) is one of these.
    SocketFamily(&'static [i32]),
    /// `clone`: the flags (argument 0) include `CLONE_THREAD`.
    ThreadOnly,
    /// `ioctl`: the request (argument 1) is one of these.
    IoctlRequest(&'static [u64]),
    /// `prctl`: the option (argument 0) is one of these.
    PrctlOption(&'static [i32]),
}

/// An allowed system call, how it is narrowed and why rnet needs it.
#[derive(Clone, Copy, Debug)]
pub struct Allowed {
    /// The system call's number on this architecture.
    pub nr: libc::c_long,
    /// Its name, for documentation and tests.
    pub name: &'static str,
    /// How its arguments are narrowed.
    pub narrow: Narrow,
    /// Why the running data plane needs it.
    pub reason: &'static str,
}

const fn a(nr: libc::c_long, name: &'static str, narrow: Narrow, reason: &'static str) -> Allowed {
    Allowed {
        nr,
        name,
        narrow,
        reason,
    }
}

use Narrow::Any;

/// Address families the data plane opens sockets in: host-side flows and
/// published ports (IPv4, IPv6) and the control socket's wake-up (Unix).
const FAMILIES: &[i32] = &[libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];
/// `ioctl` requests made after set-up: non-blocking and close-on-exec
/// switches (std, mio) and queue sizes.
#[allow(clippy::unnecessary_cast)] // c_ulong with glibc, c_int with musl
const IOCTLS: &[u64] = &[
    libc::FIONBIO as u64,
    libc::FIOCLEX as u64,
    libc::FIONCLEX as u64,
    libc::FIONREAD as u64,
    libc::TIOCOUTQ as u64,
];
/// `prctl` options: naming a new thread (std does it from the thread).
const PRCTLS: &[i32] = &[libc::PR_SET_NAME, libc::PR_GET_NAME];

/// The system calls the sandboxed process may make, with the reason for
/// each. Everything else kills the process.
pub fn allowed() -> Vec<Allowed> {
    let mut v = vec![
        // Frames, host sockets, pipes.
        a(
            libc::SYS_read,
            "read",
            Any,
            "TAP frames, host sockets, pipes, --exit-fd",
        ),
        a(
            libc::SYS_write,
            "write",
            Any,
            "TAP frames, host sockets, logging to stderr",
        ),
        a(libc::SYS_readv, "readv", Any, "vectored reads (std, TAP)"),
        a(
            libc::SYS_writev,
            "writev",
            Any,
            "vectored writes (std, TAP, logging)",
        ),
        a(
            libc::SYS_pread64,
            "pread64",
            Any,
            "positioned reads by std's file helpers",
        ),
        a(
            libc::SYS_lseek,
            "lseek",
            Any,
            "std's file reads; pcap rotation",
        ),
        a(libc::SYS_close, "close", Any, "closing flows, pipes, files"),
        a(
            libc::SYS_fcntl,
            "fcntl",
            Any,
            "O_NONBLOCK and FD_CLOEXEC on new descriptors",
        ),
        a(
            libc::SYS_ioctl,
            "ioctl",
            Narrow::IoctlRequest(IOCTLS),
            "FIONBIO/FIOCLEX and queue sizes",
        ),
        a(
            libc::SYS_pipe2,
            "pipe2",
            Any,
            "splice pipes of fast-path connections",
        ),
        a(
            libc::SYS_splice,
            "splice",
            Any,
            "fast path for published TCP ports",
        ),
        // Sockets.
        a(
            libc::SYS_socket,
            "socket",
            Narrow::SocketFamily(FAMILIES),
            "host sockets for new flows and published ports",
        ),
        a(
            libc::SYS_connect,
            "connect",
            Any,
            "outbound TCP/UDP flows, DNS upstreams, control-socket wake-up",
        ),
        a(
            libc::SYS_bind,
            "bind",
            Any,
            "--outbound-addr, published ports added at run time",
        ),
        a(
            libc::SYS_listen,
            "listen",
            Any,
            "published TCP ports added at run time",
        ),
        a(
            libc::SYS_accept4,
            "accept4",
            Any,
            "published TCP ports, control socket clients",
        ),
        a(
            libc::SYS_recvfrom,
            "recvfrom",
            Any,
            "UDP, ICMP and DNS replies",
        ),
        a(libc::SYS_sendto, "sendto", Any, "UDP, ICMP and DNS queries"),
        a(
            libc::SYS_recvmsg,
            "recvmsg",
            Any,
            "agent replies with descriptors (SCM_RIGHTS)",
        ),
        a(
            libc::SYS_sendmsg,
            "sendmsg",
            Any,
            "agent requests, UDP_SEGMENT sends of guest datagrams",
        ),
        a(
            libc::SYS_recvmmsg,
            "recvmmsg",
            Any,
            "batched datagram receive (UDP flows, published UDP ports)",
        ),
        a(libc::SYS_sendmmsg, "sendmmsg", Any, "batched datagram send"),
        a(
            libc::SYS_setsockopt,
            "setsockopt",
            Any,
            "socket options on new host sockets",
        ),
        a(
            libc::SYS_getsockopt,
            "getsockopt",
            Any,
            "SO_ERROR after a non-blocking connect",
        ),
        a(
            libc::SYS_getsockname,
            "getsockname",
            Any,
            "the port the kernel picked",
        ),
        a(
            libc::SYS_getpeername,
            "getpeername",
            Any,
            "peer addresses of accepted connections",
        ),
        a(
            libc::SYS_shutdown,
            "shutdown",
            Any,
            "half-closing TCP flows, control connections",
        ),
        // Event loop, time, threads.
        a(
            libc::SYS_epoll_ctl,
            "epoll_ctl",
            Any,
            "registering flows with the event loop",
        ),
        a(
            libc::SYS_epoll_pwait,
            "epoll_pwait",
            Any,
            "the event loop's wait (aarch64, riscv64)",
        ),
        a(
            libc::SYS_ppoll,
            "ppoll",
            Any,
            "poll(2) as some architectures spell it",
        ),
        a(
            libc::SYS_clock_gettime,
            "clock_gettime",
            Any,
            "timers, when the vDSO falls back",
        ),
        a(
            libc::SYS_clock_nanosleep,
            "clock_nanosleep",
            Any,
            "thread::sleep (auto-publish watcher)",
        ),
        a(
            libc::SYS_nanosleep,
            "nanosleep",
            Any,
            "thread::sleep on older C libraries",
        ),
        a(
            libc::SYS_futex,
            "futex",
            Any,
            "locks, channels, thread join",
        ),
        a(libc::SYS_sched_yield, "sched_yield", Any, "spinning locks"),
        a(
            libc::SYS_sched_getaffinity,
            "sched_getaffinity",
            Any,
            "std's available_parallelism",
        ),
        a(
            libc::SYS_clone,
            "clone",
            Narrow::ThreadOnly,
            "control-socket client threads (threads only, no fork)",
        ),
        a(
            libc::SYS_set_robust_list,
            "set_robust_list",
            Any,
            "start of a new thread",
        ),
        a(libc::SYS_rseq, "rseq", Any, "start of a new thread"),
        a(
            libc::SYS_prctl,
            "prctl",
            Narrow::PrctlOption(PRCTLS),
            "naming a new thread",
        ),
        a(
            libc::SYS_sigaltstack,
            "sigaltstack",
            Any,
            "std's stack-overflow guard on new threads",
        ),
        a(
            libc::SYS_rt_sigprocmask,
            "rt_sigprocmask",
            Any,
            "thread creation, signal mask",
        ),
        a(
            libc::SYS_rt_sigaction,
            "rt_sigaction",
            Any,
            "std's stack-overflow handler",
        ),
        a(
            libc::SYS_rt_sigreturn,
            "rt_sigreturn",
            Any,
            "returning from a signal handler",
        ),
        a(
            libc::SYS_rt_sigtimedwait,
            "rt_sigtimedwait",
            Any,
            "the SIGINT/SIGTERM thread",
        ),
        a(
            libc::SYS_restart_syscall,
            "restart_syscall",
            Any,
            "restarting an interrupted wait",
        ),
        a(libc::SYS_exit, "exit", Any, "a thread ends"),
        a(libc::SYS_exit_group, "exit_group", Any, "the process ends"),
        // Memory.
        a(libc::SYS_brk, "brk", Any, "allocator"),
        a(libc::SYS_mmap, "mmap", Any, "allocator, thread stacks"),
        a(libc::SYS_munmap, "munmap", Any, "allocator, thread stacks"),
        a(
            libc::SYS_mremap,
            "mremap",
            Any,
            "allocator (growing buffers)",
        ),
        a(
            libc::SYS_mprotect,
            "mprotect",
            Any,
            "allocator arenas, stack guard pages",
        ),
        a(
            libc::SYS_madvise,
            "madvise",
            Any,
            "allocator returning memory",
        ),
        a(
            libc::SYS_getrandom,
            "getrandom",
            Any,
            "HashMap keys, TCP initial sequence numbers",
        ),
        // Processes.
        a(
            libc::SYS_getpid,
            "getpid",
            Any,
            "logging, agent bookkeeping",
        ),
        a(libc::SYS_gettid, "gettid", Any, "thread bookkeeping"),
        a(libc::SYS_getuid, "getuid", Any, "messages"),
        a(libc::SYS_geteuid, "geteuid", Any, "messages"),
        a(libc::SYS_getgid, "getgid", Any, "messages"),
        a(
            libc::SYS_getegid,
            "getegid",
            Any,
            "ping_group_range message",
        ),
        a(
            libc::SYS_kill,
            "kill",
            Any,
            "stopping the agent; rnet run forwards signals",
        ),
        a(libc::SYS_tgkill, "tgkill", Any, "raise/abort on panic"),
        a(
            libc::SYS_pidfd_send_signal,
            "pidfd_send_signal",
            Any,
            "signalling children by pidfd",
        ),
        a(
            libc::SYS_wait4,
            "wait4",
            Any,
            "reaping the agent and rnet run's command",
        ),
        a(libc::SYS_waitid, "waitid", Any, "reaping by pidfd"),
        // Files (only what the mount stage left, or directory descriptors).
        a(
            libc::SYS_openat,
            "openat",
            Any,
            "reading kept files and /proc tables through KeptDir; pcap",
        ),
        a(
            libc::SYS_newfstatat,
            "newfstatat",
            Any,
            "std's file metadata",
        ),
        a(libc::SYS_fstat, "fstat", Any, "std's file metadata"),
        a(libc::SYS_statx, "statx", Any, "std's file metadata"),
        a(
            libc::SYS_getdents64,
            "getdents64",
            Any,
            "listing a directory (harmless in the empty root)",
        ),
        a(
            libc::SYS_unlinkat,
            "unlinkat",
            Any,
            "removing the control socket at exit",
        ),
        a(libc::SYS_renameat, "renameat", Any, "pcap rotation"),
        a(libc::SYS_renameat2, "renameat2", Any, "pcap rotation"),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        a(
            libc::SYS_epoll_wait,
            "epoll_wait",
            Any,
            "the event loop's wait",
        ),
        a(libc::SYS_poll, "poll", Any, "std's blocking helpers"),
        a(libc::SYS_rename, "rename", Any, "pcap rotation"),
        a(
            libc::SYS_unlink,
            "unlink",
            Any,
            "removing the control socket at exit",
        ),
    ]);
    v
}

/// The system calls that fail with `ENOSYS` instead: `clone3` (its flags
/// are behind a pointer a filter cannot read; the C library then uses
/// `clone`, whose flags the allow-list checks).
pub const ENOSYS_CALLS: &[libc::c_long] = &[libc::SYS_clone3];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, v: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, v).expect("argument index below 6")
}

fn rules(narrow: Narrow) -> Vec<SeccompRule> {
    use SeccompCmpArgLen::{Dword, Qword};
    let one = |c| SeccompRule::new(vec![c]).expect("one condition");
    match narrow {
        Narrow::Any => Vec::new(),
        Narrow::SocketFamily(fams) => fams
            .iter()
            .map(|f| one(cond(0, Dword, SeccompCmpOp::Eq, *f as u64)))
            .collect(),
        Narrow::ThreadOnly => vec![one(cond(
            0,
            Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        ))],
        Narrow::IoctlRequest(reqs) => reqs
            .iter()
            .map(|r| one(cond(1, Dword, SeccompCmpOp::Eq, *r)))
            .collect(),
        Narrow::PrctlOption(opts) => opts
            .iter()
            .map(|o| one(cond(0, Dword, SeccompCmpOp::Eq, *o as u64)))
            .collect(),
    }
}

fn arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        SandboxError::new(
            Stage::Seccomp,
            format!("no filter for {}", std::env::consts::ARCH),
            io::Error::new(io::ErrorKind::Unsupported, e.to_string()),
        )
    })
}

/// The two programs installed: the allow-list, then the `ENOSYS` list
/// (where both have a verdict the kernel applies the stricter one).
pub fn programs() -> Result<[BpfProgram; 2], SandboxError> {
    let arch = arch()?;
    fn bad(e: impl std::fmt::Display) -> SandboxError {
        SandboxError::new(
            Stage::Seccomp,
            "building the filter",
            io::Error::other(e.to_string()),
        )
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for c in allowed() {
        map.entry(c.nr).or_default().extend(rules(c.narrow));
    }
    // Let through here so the second filter's ENOSYS is the verdict
    // (KILL_PROCESS would win over ERRNO).
    for nr in ENOSYS_CALLS {
        map.insert(*nr, Vec::new());
    }
    let allow = SeccompFilter::new(map, SeccompAction::KillProcess, SeccompAction::Allow, arch)
        .map_err(bad)?;
    let nosys = SeccompFilter::new(
        ENOSYS_CALLS.iter().map(|n| (*n, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(bad)?;
    Ok([
        allow.try_into().map_err(bad)?,
        nosys.try_into().map_err(bad)?,
    ])
}

/// The system calls the supervisor ([`crate::supervise`]) and everything
/// it starts later may never make: a deny-list (each kills the process),
/// since each worker must still set up its agent and its own sandbox.
pub const SUPERVISOR_DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

/// Confines the supervisor (and, inherited, its workers): no_new_privs
/// and a seccomp filter killing the process on any of
/// [`SUPERVISOR_DENIED`]. Each worker adds the full sandbox on top.
pub fn enter_supervisor() -> Result<(), SandboxError> {
    fn bad(e: impl std::fmt::Display) -> SandboxError {
        SandboxError::new(
            Stage::Seccomp,
            "building the supervisor's filter",
            io::Error::other(e.to_string()),
        )
    }
    let f = SeccompFilter::new(
        SUPERVISOR_DENIED.iter().map(|n| (*n, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch()?,
    )
    .map_err(bad)?;
    let prog: BpfProgram = f.try_into().map_err(bad)?;
    // seccompiler sets no_new_privs first.
    seccompiler::apply_filter(&prog).map_err(|e| {
        SandboxError::new(
            Stage::Seccomp,
            "installing the supervisor's filter",
            io::Error::other(e.to_string()),
        )
    })
}

/// Stage 4.
fn install_filters(progs: &[BpfProgram; 2]) -> Result<(), SandboxError> {
    let s = Stage::Seccomp;
    // seccompiler sets no_new_privs with prctl before each install, which
    // the allow-list forbids: it goes last (the order of verdicts does not
    // depend on the order of installation).
    for p in progs.iter().rev() {
        seccompiler::apply_filter_all_threads(p)
            .map_err(|e| SandboxError::new(s, "installing", io::Error::other(e.to_string())))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Directories kept by descriptor.

/// Largest file [`KeptDir::read_to_string`] reads: a socket table of some
/// 50,000 sockets.
pub const READ_CAP: usize = 8 << 20;

/// Reads at most `cap` bytes of `fd`, which must be a regular file (procfs
/// files are); lossy UTF-8.
pub(crate) fn read_regular(fd: OwnedFd, cap: usize) -> io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::from(fd);
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or socket is never read)",
        ));
    }
    let mut buf = Vec::new();
    f.take(cap as u64).read_to_end(&mut buf)?;
    Ok(match String::from_utf8(buf) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// A directory held open across [`enter`], usable by name afterwards
/// without being visible in the sandbox's filesystem: the control socket's
/// directory (to remove the socket at exit), `/proc/PID/net` (to read the
/// target's socket tables).
#[derive(Debug)]
pub struct KeptDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Drop for KeptDir {
    fn drop(&mut self) {
        let raw = self.fd.as_raw_fd();
        KEPT.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(fd, _)| *fd != raw);
    }
}

impl KeptDir {
    /// Opens `path` (a directory) before the sandbox is entered, to read
    /// files in it.
    pub fn open(path: &Path) -> io::Result<KeptDir> {
        KeptDir::open_for(path, KEPT_READ)
    }

    /// Opens `path` for use with `rights` once Landlock is in force (the
    /// sandbox grants those rights beneath it, nothing more).
    fn open_for(path: &Path, rights: u64) -> io::Result<KeptDir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        KEPT.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((fd.as_raw_fd(), rights));
        Ok(KeptDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens the parent directory of `file` (for [`KeptDir::unlink`] of
    /// `file`'s name later).
    pub fn of_parent(file: &Path) -> io::Result<KeptDir> {
        let parent = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        KeptDir::open_for(parent, KEPT_UNLINK)
    }

    /// The path it was opened at (for messages; it may not resolve inside
    /// the sandbox).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor, for `*at` calls relative to it (with
    /// Landlock in force, within the rights it was kept for).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads the file `name` of this directory, at most [`READ_CAP`] bytes
    /// (see [`KeptDir::read_capped`]).
    pub fn read_to_string(&self, name: &str) -> io::Result<String> {
        self.read_capped(name, READ_CAP)
    }

    /// Reads at most `cap` bytes of the file `name` of this directory. The
    /// name is opened without following a link and without blocking
    /// (`O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`), and anything but a regular
    /// file (a FIFO, a device, a socket) is refused before it is read.
    pub fn read_capped(&self, name: &str, cap: usize) -> io::Result<String> {
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY
                | OFlag::O_CLOEXEC
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        read_regular(fd, cap)
    }

    /// Removes the entry `name` (not a directory) of this directory.
    ///
    /// (With Landlock in force, only removals are allowed beneath a
    /// directory kept by [`KeptDir::of_parent`], only reads beneath one kept
    /// by [`KeptDir::open`].)
    pub fn unlink(&self, name: &std::ffi::OsStr) -> io::Result<()> {
        if name.as_bytes().contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a name, not a path",
            ));
        }
        nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
    use std::os::unix::ffi::OsStrExt;
    use std::panic::AssertUnwindSafe;
    use std::time::Duration;

    use nix::sys::signal::Signal;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Outcome {
        Exited(i32, String),
        /// The signal, and what the child wrote to its note pipe.
        Signaled(Signal, String),
    }

    /// Runs `f` in a forked child (which has only the calling thread) and
    /// reports how it ended; an `Err` text, or notes `f` writes, come back
    /// through a pipe.
    fn in_child(f: impl FnOnce(&mut std::fs::File) -> Result<(), String>) -> Outcome {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        // SAFETY: fork(2). The child runs only `f` and then _exits; glibc
        // keeps malloc usable in the child of a threaded parent.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(r);
                let mut notes = std::fs::File::from(w);
                let code = match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut notes))) {
                    Ok(Ok(())) => 0,
                    Ok(Err(msg)) => {
                        let _ = notes.write_all(msg.as_bytes());
                        1
                    }
                    Err(_) => 2,
                };
                // SAFETY: _exit(2) ends the child at once, running none of
                // the parent's destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(w);
                let status = waitpid(child, None).expect("waitpid");
                // Read after the child is gone, without blocking: a child
                // forked meanwhile by another test may hold the write end.
                let _ = nix::fcntl::fcntl(
                    &r,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let mut msg = String::new();
                let _ = std::fs::File::from(r).read_to_string(&mut msg);
                match status {
                    WaitStatus::Exited(_, c) => Outcome::Exited(c, msg),
                    WaitStatus::Signaled(_, s, _) => Outcome::Signaled(s, msg),
                    other => panic!("child: {other:?}"),
                }
            }
        }
    }

    fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
        if ok { Ok(()) } else { Err(what()) }
    }

    /// A field of /proc/self/status, read through a descriptor opened
    /// before the sandbox.
    fn status_field(proc_self: &KeptDir, name: &str) -> Result<String, String> {
        let text = proc_self
            .read_to_string("status")
            .map_err(|e| format!("reading status: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("no {name} in status"))
    }

    fn cap_field(proc_self: &KeptDir, name: &str) -> Result<u64, String> {
        let v = status_field(proc_self, name)?;
        u64::from_str_radix(&v, 16).map_err(|e| format!("{name} {v}: {e}"))
    }

    fn full() -> SandboxOptions {
        SandboxOptions {
            mount: true,
            seccomp: true,
            keep: Vec::new(),
            keep_writable: Vec::new(),
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rnet-sandbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    /// The port of a TCP socket in LISTEN state in a /proc/net/tcp table.
    fn listening(table: &str, port: u16) -> bool {
        crate::autopub::parse_table(table)
            .iter()
            .any(|(a, st)| a.port() == port && *st == 0x0a)
    }

    #[test]
    fn full_sandbox_keeps_the_data_plane_working() {
        let dir = scratch("full");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/real.conf"), "nameserver 192.0.2.1\n").unwrap();
        std::os::unix::fs::symlink("real.conf", dir.join("etc/resolv.conf")).unwrap();
        std::fs::create_dir_all(dir.join("rw")).unwrap();
        std::fs::create_dir_all(dir.join("api")).unwrap();
        std::fs::write(dir.join("api/sock"), "").unwrap();
        std::fs::write(dir.join("hidden"), "secret").unwrap();

        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let parent = std::process::id();
        let low_port_open =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .is_some_and(|start| start == 0);

        let d = dir.clone();
        let outcome = in_child(move |_| {
            let before = capget().map_err(|e| e.to_string())?;
            let keeps_bind = before.has(CAP_SYS_ADMIN) && before.has(CAP_NET_BIND_SERVICE);
            let expected = if keeps_bind {
                1u64 << CAP_NET_BIND_SERVICE
            } else {
                0
            };
            let proc_self = KeptDir::open(Path::new("/proc/self")).map_err(|e| e.to_string())?;
            // What autopub reads: another process's socket tables.
            let target_net = KeptDir::open(Path::new(&format!("/proc/{parent}/net")))
                .map_err(|e| e.to_string())?;
            let api_dir = KeptDir::of_parent(&d.join("api/sock")).map_err(|e| e.to_string())?;
            let opts = SandboxOptions {
                keep: vec![
                    d.join("etc/resolv.conf"),
                    PathBuf::from("/nonexistent/file"),
                ],
                keep_writable: vec![d.join("rw")],
                ..full()
            };
            enter(&opts).map_err(|e| e.to_string())?;

            // Status: capabilities, no_new_privs, seccomp.
            for f in ["CapEff", "CapPrm"] {
                let v = cap_field(&proc_self, f)?;
                ensure(v == expected, || {
                    format!("{f} {v:x}, expected {expected:x}")
                })?;
            }
            ensure(cap_field(&proc_self, "CapInh")? == 0, || "CapInh".into())?;
            ensure(cap_field(&proc_self, "CapAmb")? == 0, || "CapAmb".into())?;
            let bnd = cap_field(&proc_self, "CapBnd")?;
            ensure(bnd == expected, || format!("CapBnd {bnd:x}"))?;
            ensure(status_field(&proc_self, "NoNewPrivs")? == "1", || {
                "NoNewPrivs".into()
            })?;
            ensure(status_field(&proc_self, "Seccomp")? == "2", || {
                "Seccomp".into()
            })?;

            // The filesystem: only what was kept, read-only.
            let mut top: Vec<String> = std::fs::read_dir("/")
                .map_err(|e| format!("listing /: {e}"))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            top.sort();
            let first = d.components().nth(1).unwrap().as_os_str().to_string_lossy();
            let mut want = vec![first.to_string(), "etc".into(), "run".into()];
            want.sort();
            want.dedup();
            ensure(top == want, || format!("/ holds {top:?}"))?;
            // /etc and /run are there, empty (nothing kept below them).
            for d in ["/etc", "/run"] {
                let n = std::fs::read_dir(d)
                    .map_err(|e| format!("{d}: {e}"))?
                    .count();
                ensure(n == 0 || first == d[1..], || {
                    format!("{d} holds {n} entries")
                })?;
            }
            for gone in ["/etc/passwd", "/proc/self/status", "/dev/null", "/usr"] {
                ensure(std::fs::symlink_metadata(gone).is_err(), || {
                    format!("{gone} is visible")
                })?;
            }
            ensure(std::fs::metadata(d.join("hidden")).is_err(), || {
                "an unkept file is visible".into()
            })?;
            let conf = std::fs::read_to_string(d.join("etc/resolv.conf"))
                .map_err(|e| format!("kept file through its link: {e}"))?;
            ensure(conf.contains("192.0.2.1"), || conf.clone())?;
            let e = std::fs::write(d.join("etc/real.conf"), "x").unwrap_err();
            ensure(e.raw_os_error() == Some(libc::EROFS), || {
                format!("writing a read-only kept file: {e}")
            })?;
            let e = std::fs::write("/new", "x").unwrap_err();
            ensure(e.raw_os_error() == Some(libc::EROFS), || {
                format!("writing in the root: {e}")
            })?;
            std::fs::write(d.join("rw/out"), "written").map_err(|e| format!("rw: {e}"))?;
            std::fs::rename(d.join("rw/out"), d.join("rw/out.1"))
                .map_err(|e| format!("rename in rw: {e}"))?;

            // Descriptors kept across: a target's socket table, and the
            // control socket's directory for the unlink at exit.
            let table = target_net
                .read_to_string("tcp")
                .map_err(|e| e.to_string())?;
            ensure(listening(&table, tcp_port), || {
                format!("port {tcp_port} not listening in the target's table")
            })?;
            api_dir
                .unlink(std::ffi::OsStr::from_bytes(b"sock"))
                .map_err(|e| format!("unlink through KeptDir: {e}"))?;

            // Host sockets opened afterwards work; the same from a thread
            // started afterwards (clone3 -> ENOSYS -> clone).
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, tcp_port))
                .map_err(|e| format!("tcp connect: {e}"))?;
            s.write_all(b"tcp ok").map_err(|e| e.to_string())?;
            let t = std::thread::Builder::new()
                .name("sandboxed".into())
                .spawn(move || -> Result<(), String> {
                    let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
                    u.send_to(b"udp ok", udp_addr).map_err(|e| e.to_string())?;
                    Ok(())
                })
                .map_err(|e| format!("thread spawn: {e}"))?;
            t.join().map_err(|_| "thread panicked".to_string())??;

            // Ports below 1024: as before for root, refused otherwise.
            if !low_port_open {
                for port in (900..1024).rev() {
                    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                        Ok(_) => {
                            ensure(keeps_bind, || format!("bound privileged port {port}"))?;
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                        Err(e) => {
                            ensure(
                                !keeps_bind && e.raw_os_error() == Some(libc::EACCES),
                                || format!("port {port}: {e}"),
                            )?;
                            break;
                        }
                    }
                }
            }
            Ok(())
        });
        assert_eq!(outcome, Outcome::Exited(0, String::new()));

        let (mut conn, _) = tcp.accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert_eq!(got, "tcp ok");
        let mut buf = [0u8; 16];
        let (n, _) = udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"udp ok");
        assert_eq!(
            std::fs::read_to_string(dir.join("rw/out.1")).unwrap(),
            "written"
        );
        assert!(!dir.join("api/sock").exists(), "socket not unlinked");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Calls the filter must stop: each kills the process with SIGSYS.
    /// After `enter`, a directory kept from before can still be read, but
    /// `..` from it leads nowhere (Landlock, where the kernel has it);
    /// signals reach only rnet itself and `socket(AF_UNIX)` fails, without
    /// killing the process.
    #[test]
    fn kept_descriptors_and_signals_stay_confined() {
        let dir = scratch("confined");
        std::fs::create_dir_all(dir.join("kept")).unwrap();
        std::fs::write(dir.join("kept/file"), "kept").unwrap();
        std::fs::write(dir.join("secret"), "secret").unwrap();
        let landlock = landlock_abi() >= 1;
        let outcome = in_child(|_| {
            let kept = KeptDir::open(&dir.join("kept")).map_err(|e| e.to_string())?;
            enter(&full()).map_err(|e| e.to_string())?;
            let got = kept
                .read_to_string("file")
                .map_err(|e| format!("kept file: {e}"))?;
            ensure(got == "kept", || format!("kept file holds {got:?}"))?;
            let up = openat(
                kept.fd.as_fd(),
                "../secret",
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            if landlock {
                ensure(
                    up.as_ref().err() == Some(&nix::errno::Errno::EACCES),
                    || format!("../secret from a kept directory: {up:?}"),
                )?;
                let listing = openat(
                    kept.fd.as_fd(),
                    "..",
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                );
                ensure(listing.is_err(), || "listing .. of a kept directory".into())?;
            }
            let me = nix::unistd::getpid();
            nix::sys::signal::kill(me, None).map_err(|e| format!("kill(self, 0): {e}"))?;
            for (what, pid) in [("pid 1", 1), ("every process", -1), ("the group", 0)] {
                let r = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
                ensure(r == Err(nix::errno::Errno::EPERM), || {
                    format!("kill({what}, 0): {r:?}")
                })?;
            }
            // SAFETY: tgkill with integer arguments and signal 0 (a check).
            let r = unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            ensure(
                r == -1 && nix::errno::Errno::last() == nix::errno::Errno::EPERM,
                || format!("tgkill(1, 1, 0) = {r}"),
            )?;
            let unix = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None);
            ensure(
                unix.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EPERM),
                || format!("socket(AF_UNIX): {unix:?}"),
            )?;
            Ok(())
        });
        assert_eq!(
            outcome,
            Outcome::Exited(0, String::new()),
            "Landlock: {landlock}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn forbidden_calls_kill_the_process() {
        type Attempt = fn();
        let attempts: &[(&str, Attempt)] = &[
            ("execve", || {
                let _ = std::process::Command::new("/bin/true").status();
            }),
            ("fork", || {
                // SAFETY: fork(2); the child (if any) _exits at once.
                if let Ok(ForkResult::Child) = unsafe { fork() } {
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) }
                }
            }),
            ("netlink socket", || {
                let _ = socket2::Socket::new(
                    socket2::Domain::from(libc::AF_NETLINK),
                    socket2::Type::RAW,
                    None,
                );
            }),
            ("unshare", || {
                let _ = unshare(CloneFlags::CLONE_NEWNET);
            }),
            ("mount", || {
                let _ = mount(
                    Some("tmpfs"),
                    "/",
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                );
            }),
            ("ptrace", || {
                // SAFETY: ptrace(2) with integer arguments only.
                let _ = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            }),
            ("setuid", || {
                let _ = nix::unistd::setuid(nix::unistd::getuid());
            }),
            ("prctl other than thread names", || {
                let _ = nix::sys::prctl::set_dumpable(false);
            }),
        ];
        for (what, attempt) in attempts {
            let outcome = in_child(|notes| {
                enter(&SandboxOptions {
                    mount: false,
                    ..full()
                })
                .map_err(|e| e.to_string())?;
                notes.write_all(b"entered").map_err(|e| e.to_string())?;
                attempt();
                Err(format!("; {what} was allowed"))
            });
            assert_eq!(
                outcome,
                Outcome::Signaled(Signal::SIGSYS, "entered".into()),
                "{what}"
            );
        }
    }

    #[test]
    fn seccomp_without_mount_isolation() {
        let outcome = in_child(|_| {
            enter(&SandboxOptions {
                mount: false,
                ..full()
            })
            .map_err(|e| e.to_string())?;
            // The filesystem is untouched; the status is readable by path.
            let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
            ensure(status.contains("Seccomp:\t2"), || "Seccomp".into())?;
            ensure(status.contains("NoNewPrivs:\t1"), || "NoNewPrivs".into())?;
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX))
                .unwrap_or(u64::MAX);
            ensure(eff & !(1u64 << CAP_NET_BIND_SERVICE) == 0, || {
                format!("CapEff {eff:x}")
            })?;
            Ok(())
        });
        assert_eq!(outcome, Outcome::Exited(0, String::new()));
    }

    #[test]
    fn mount_isolation_without_seccomp() {
        let outcome = in_child(|_| {
            enter(&SandboxOptions {
                seccomp: false,
                ..full()
            })
            .map_err(|e| e.to_string())?;
            let mut top: Vec<String> = std::fs::read_dir("/")
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            top.sort();
            ensure(top == ["etc", "run"], || format!("/ holds {top:?}"))?;
            // No filter: a fork works (and the child sees the same root).
            std::process::Command::new("/bin/true")
                .status()
                .err()
                .ok_or_else(|| "exec found /bin/true".to_string())?;
            Ok(())
        });
        assert_eq!(outcome, Outcome::Exited(0, String::new()));
    }

    #[test]
    fn refuses_a_threaded_process() {
        let outcome = in_child(|_| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _ = rx.recv();
            });
            let r = enter(&full());
            drop(tx);
            let _ = t.join();
            match r {
                Err(e) if e.stage == Stage::Precondition => {}
                other => return Err(format!("{other:?}")),
            }
            // Nothing was applied.
            let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
            ensure(status.contains("Seccomp:\t0"), || "filter installed".into())?;
            Ok(())
        });
        assert_eq!(outcome, Outcome::Exited(0, String::new()));
    }

    #[test]
    fn allow_list_is_sound() {
        let list = allowed();
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_pivot_root,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_perf_event_open,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_seccomp,
        ];
        for c in &list {
            assert!(!forbidden.contains(&c.nr), "{} is allowed", c.name);
            assert!(!c.reason.is_empty(), "{} has no reason", c.name);
        }
        let mut nrs: Vec<_> = list.iter().map(|c| c.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), list.len(), "duplicate entries");
        programs().expect("filters build");
    }

    /// Keeping the directory the new root is usually built on (a capture
    /// file in /tmp): the root is built elsewhere, the file stays writable.
    #[test]
    fn keeping_the_temp_directory_itself() {
        let tmp = std::env::temp_dir();
        let file = tmp.join(format!("rnet-sandbox-tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let inside = file.clone();
        let outcome = in_child(move |_| {
            enter(&SandboxOptions {
                keep_writable: vec![tmp],
                ..full()
            })
            .map_err(|e| e.to_string())?;
            std::fs::write(&inside, "inside").map_err(|e| format!("{}: {e}", inside.display()))
        });
        assert_eq!(outcome, Outcome::Exited(0, String::new()));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "inside");
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn relative_keep_is_refused() {
        let mut out = Vec::new();
        assert!(plan(Path::new("etc/resolv.conf"), false, &mut out).is_err());
        assert!(plan(Path::new("/"), false, &mut out).is_err());
    }
}
