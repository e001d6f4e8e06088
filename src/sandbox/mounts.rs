//! Stage 1 of the sandbox: a mount namespace of rnet's own whose root is
//! an empty read-only tmpfs holding only the kept paths (bind-mounted at
//! their own place, symbolic links on the way recreated), entered with
//! `pivot_root`. The same step, with nothing kept, gives the helpers in the
//! guest's namespaces an empty root ([`empty_root`]).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{chdir, pivot_root};
use tracing::debug;

use super::{SandboxError, SandboxOptions, Stage, at, at_io};

/// One thing to recreate in the new root.
pub(super) enum Entry {
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
pub(super) fn plan(path: &Path, writable: bool, out: &mut Vec<Entry>) -> io::Result<()> {
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
pub(super) fn isolate_mounts(opts: &SandboxOptions, sys_admin: bool) -> Result<bool, SandboxError> {
    let own_userns = enter_namespace(sys_admin)?;
    let entries = resolve_kept(opts)?;
    let base = mount_new_root(opts, &entries)?;
    populate(&base, &entries)?;
    drop(entries);
    switch_root(&base)?;
    Ok(own_userns)
}

/// A mount namespace of its own (and a user namespace, without
/// `CAP_SYS_ADMIN`), whose mounts no longer propagate to the host's.
/// Returns whether a user namespace was created.
fn enter_namespace(sys_admin: bool) -> Result<bool, SandboxError> {
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
    Ok(own_userns)
}

/// Resolves and opens every kept path while the whole filesystem is still
/// in view; paths that do not exist are skipped.
fn resolve_kept(opts: &SandboxOptions) -> Result<Vec<Entry>, SandboxError> {
    let s = Stage::Mount;
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
    Ok(entries)
}

/// Mounts the empty tmpfs that becomes the new root, and returns where.
fn mount_new_root(opts: &SandboxOptions, entries: &[Entry]) -> Result<PathBuf, SandboxError> {
    let s = Stage::Mount;
    let base = mount_base(entries).ok_or_else(|| {
        SandboxError::new(
            s,
            "finding a directory to mount the new root on",
            io::ErrorKind::NotFound,
        )
    })?;
    mount(
        Some("tmpfs"),
        base.as_path(),
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

    Ok(base)
}

/// Recreates each kept path in the new root at `base`: symbolic links as
/// links, everything else as a restricted bind mount.
fn populate(base: &Path, entries: &[Entry]) -> Result<(), SandboxError> {
    let s = Stage::Mount;
    let mut bound_dirs: Vec<PathBuf> = Vec::new();
    for e in entries {
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
    Ok(())
}

/// Makes `base` the root, detaches the old one and remounts the new one
/// read-only, nosuid, nodev, noexec.
fn switch_root(base: &Path) -> Result<(), SandboxError> {
    let s = Stage::Mount;
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
    Ok(())
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
