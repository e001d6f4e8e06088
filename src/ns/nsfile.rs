//! Namespace files: opening a target's `/proc/PID/ns/*` (or given paths) in
//! the parent, checking they are namespaces of the right kind, and deciding
//! which ones actually need joining (those that differ from ours).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, fstat, stat};

use super::{NsError, NsKind, Target};

nix::ioctl_none_bad!(ns_get_nstype, libc::NS_GET_NSTYPE);

/// The namespaces a helper must join, already opened. `None` means the
/// target shares ours, so there is nothing to join.
#[derive(Debug)]
pub(crate) struct JoinPlan {
    /// The target's user namespace, when it differs from ours.
    pub user: Option<OwnedFd>,
    /// The target's network namespace, when it differs from ours.
    pub net: Option<OwnedFd>,
}

/// Whether the user namespace file `userns_file` (e.g. `/proc/PID/ns/user`)
/// is the user namespace this thread is in (same st_dev and st_ino).
pub fn same_userns(userns_file: &Path) -> io::Result<bool> {
    let theirs = stat(userns_file).map_err(io::Error::from)?;
    let ours = stat(own_ns_path(NsKind::User).as_path()).map_err(io::Error::from)?;
    Ok(theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino)
}

/// `/proc/thread-self/ns/KIND` (the calling thread's namespace, which a
/// forked child inherits), falling back to `/proc/self` on old kernels.
fn own_ns_path(kind: NsKind) -> PathBuf {
    let thread = PathBuf::from(format!("/proc/thread-self/ns/{}", kind.proc_name()));
    if thread.exists() {
        thread
    } else {
        PathBuf::from(format!("/proc/self/ns/{}", kind.proc_name()))
    }
}

/// Whether the open namespace `fd` is the calling thread's own of `kind`.
fn is_own(fd: BorrowedFd<'_>, kind: NsKind) -> Result<bool, Errno> {
    let theirs = fstat(fd)?;
    let ours = stat(own_ns_path(kind).as_path())?;
    Ok(theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino)
}

/// The clone flag naming `kind` for setns and NS_GET_NSTYPE.
pub(crate) fn clone_flag(kind: NsKind) -> CloneFlags {
    match kind {
        NsKind::User => CloneFlags::CLONE_NEWUSER,
        NsKind::Net => CloneFlags::CLONE_NEWNET,
    }
}

/// Checks with NS_GET_NSTYPE that `fd` is a namespace of `kind`. Kernels
/// without the ioctl (before 4.11) skip the check; setns() still verifies.
fn check_kind(fd: BorrowedFd<'_>, kind: NsKind, path: &Path) -> Result<(), NsError> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the type of
    // the namespace `fd` refers to; `fd` is a valid open descriptor.
    match unsafe { ns_get_nstype(fd.as_raw_fd()) } {
        Ok(t) if t == clone_flag(kind).bits() => Ok(()),
        Ok(_) => Err(NsError::WrongNamespaceType {
            path: path.to_owned(),
            expected: kind,
        }),
        // ENOTTY: an old kernel, or not a namespace file at all.
        Err(Errno::ENOTTY) => {
            if is_nsfs(fd) {
                Ok(())
            } else {
                Err(NsError::WrongNamespaceType {
                    path: path.to_owned(),
                    expected: kind,
                })
            }
        }
        Err(_) => Ok(()),
    }
}

/// Whether `fd` lives on the nsfs pseudo file system.
fn is_nsfs(fd: BorrowedFd<'_>) -> bool {
    const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
    match nix::sys::statfs::fstatfs(fd) {
        Ok(fs) => fs.filesystem_type().0 as libc::c_long == NSFS_MAGIC,
        // Cannot tell: let setns() decide.
        Err(_) => true,
    }
}

/// Opens a namespace file read-only, close-on-exec.
fn open_ns(path: &Path) -> Result<OwnedFd, Errno> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
}

/// The error for a namespace file of `target` that could not be opened.
fn open_error(target: &Target, kind: NsKind, path: &Path, errno: Errno) -> NsError {
    let who = target.describe(kind);
    match (target, errno) {
        (Target::Pid(pid), Errno::ENOENT | Errno::ESRCH) => NsError::NoSuchProcess(*pid),
        (Target::Path { .. }, Errno::ENOENT) => NsError::NamespaceFileMissing {
            path: path.to_owned(),
        },
        (_, Errno::EACCES | Errno::EPERM) => match kind {
            NsKind::User => NsError::JoinUserns {
                target: who,
                errno: Errno::EACCES,
            },
            NsKind::Net => NsError::JoinNetns {
                target: who,
                errno: Errno::EACCES,
            },
        },
        _ => NsError::NamespaceOpen {
            path: path.to_owned(),
            errno,
        },
    }
}

/// Opens one namespace file of `target` and returns it unless it is ours.
fn open_one(target: &Target, kind: NsKind, path: &Path) -> Result<Option<OwnedFd>, NsError> {
    let fd = open_ns(path).map_err(|e| open_error(target, kind, path, e))?;
    check_kind(fd.as_fd(), kind, path)?;
    match is_own(fd.as_fd(), kind) {
        Ok(true) => Ok(None),
        Ok(false) => Ok(Some(fd)),
        // Cannot compare: join it anyway; setns() reports real problems.
        Err(_) => Ok(Some(fd)),
    }
}

/// Validates `target` and opens the namespaces a helper has to join.
pub(crate) fn open_target(target: &Target) -> Result<JoinPlan, NsError> {
    match target {
        Target::Pid(pid) => {
            let pid = *pid;
            if pid <= 0 {
                return Err(NsError::NoSuchProcess(pid));
            }
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            match stat(proc_dir.as_path()) {
                Ok(_) => {}
                Err(Errno::ENOENT) => return Err(NsError::NoSuchProcess(pid)),
                Err(errno) => {
                    return Err(NsError::NamespaceOpen {
                        path: proc_dir,
                        errno,
                    });
                }
            }
            let user = open_one(target, NsKind::User, &proc_dir.join("ns/user"))?;
            let net = open_one(target, NsKind::Net, &proc_dir.join("ns/net"))?;
            Ok(JoinPlan { user, net })
        }
        Target::Path { netns, userns } => {
            let user = match userns {
                Some(p) => open_one(target, NsKind::User, p)?,
                None => None,
            };
            let net = open_one(target, NsKind::Net, netns)?;
            Ok(JoinPlan { user, net })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespaces_need_no_join() {
        let me = std::process::id() as i32;
        let plan = open_target(&Target::Pid(me)).expect("open own namespaces");
        assert!(plan.user.is_none());
        assert!(plan.net.is_none());
        assert!(same_userns(Path::new("/proc/self/ns/user")).expect("stat"));
    }

    #[test]
    fn missing_process_and_paths() {
        assert!(matches!(
            open_target(&Target::Pid(4_000_000)),
            Err(NsError::NoSuchProcess(4_000_000))
        ));
        assert!(matches!(
            open_target(&Target::Pid(0)),
            Err(NsError::NoSuchProcess(0))
        ));
        let missing = PathBuf::from("/nonexistent/rnet-netns");
        match open_target(&Target::Path {
            netns: missing.clone(),
            userns: None,
        }) {
            Err(e @ NsError::NamespaceFileMissing { .. }) => {
                assert!(e.to_string().contains("/nonexistent/rnet-netns"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_kind_is_rejected() {
        // A user namespace file given as the network namespace.
        match open_target(&Target::Path {
            netns: PathBuf::from("/proc/self/ns/user"),
            userns: None,
        }) {
            Err(e @ NsError::WrongNamespaceType { .. }) => {
                assert!(e.to_string().contains("is not a network namespace file"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // A regular file.
        match open_target(&Target::Path {
            netns: PathBuf::from("/proc/self/status"),
            userns: None,
        }) {
            Err(NsError::WrongNamespaceType { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
