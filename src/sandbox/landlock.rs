//! Stage 1b of the sandbox, Landlock: once the new root is in place,
//! every later open is confined to it (read only), the writable kept paths
//! and the [`KeptDir`]s, each with only the rights it is kept for. A
//! [`KeptDir`] is a directory held open across [`super::enter`] and used by
//! name afterwards (the control socket's directory, `/proc/PID/net`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use tracing::info;

use super::{SandboxError, SandboxOptions, Stage, at};
use crate::sys;

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
}

/// What a [`KeptDir`] may still be used for once Landlock is in force.
const KEPT_READ: u64 = ll::READ_FILE | ll::READ_DIR;
const KEPT_UNLINK: u64 = ll::REMOVE_FILE;

/// The [`KeptDir`]s alive (the descriptor of each, and the rights it
/// keeps), for the Landlock rules of [`enter`](super::enter); each removes itself when
/// dropped.
static KEPT: std::sync::Mutex<Vec<(std::os::fd::RawFd, u64)>> = std::sync::Mutex::new(Vec::new());

pub(super) use crate::sys::landlock_abi;

/// Stage 1b, after the new root is in place: Landlock confines every later
/// open, whatever descriptor it starts from, to the new root (read-only
/// rights), the writable kept paths, and the [`KeptDir`]s (each with only
/// the rights it is kept for). A directory descriptor from before
/// `pivot_root` then no longer leads back to the host tree through `..`.
/// Returns the ABI used, or `None` when the kernel has no Landlock (logged;
/// the mount isolation still holds, but kept descriptors could walk up).
pub(super) fn restrict_paths(opts: &SandboxOptions) -> Result<Option<i64>, SandboxError> {
    let s = Stage::Mount;
    let abi = landlock_abi();
    let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if abi < 1 {
        info!(
            "Landlock is not available in this kernel: directory descriptors kept across the sandbox (control socket, /proc/PID/net) are not confined"
        );
        return Ok(None);
    }
    let handled = handled_rights(abi);
    let ruleset = create_ruleset(abi, handled)?;
    let add = |dir: std::os::fd::BorrowedFd<'_>, rights: u64, what: &str| {
        add_rule(ruleset.as_fd(), dir, rights & handled, what)
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
    sys::landlock_restrict_self(ruleset.as_fd())
        .map_err(|e| SandboxError::new(s, "entering the Landlock domain", e))?;
    Ok(Some(abi))
}

/// The file-system rights a ruleset of this ABI handles (denies unless a
/// rule grants them).
fn handled_rights(abi: i64) -> u64 {
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
    handled
}

/// A new ruleset handling `handled` (and, from ABI 6, abstract Unix sockets).
fn create_ruleset(abi: i64, handled: u64) -> Result<OwnedFd, SandboxError> {
    let s = Stage::Mount;
    let scoped = if abi >= 6 {
        ll::SCOPE_ABSTRACT_UNIX_SOCKET
    } else {
        0
    };
    sys::landlock_create_ruleset(abi, handled, scoped)
        .map_err(|e| SandboxError::new(s, "creating a Landlock ruleset", e))
}

/// Grants `rights` beneath the directory `dir` in `ruleset`.
fn add_rule(
    ruleset: std::os::fd::BorrowedFd<'_>,
    dir: std::os::fd::BorrowedFd<'_>,
    rights: u64,
    what: &str,
) -> Result<(), SandboxError> {
    let s = Stage::Mount;
    sys::landlock_add_path_beneath(ruleset, dir, rights)
        .map_err(|e| SandboxError::new(s, format!("adding the Landlock rule for {what}"), e))
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

/// A directory held open across [`enter`](super::enter), usable by name afterwards
/// without being visible in the sandbox's filesystem: the control socket's
/// directory (to remove the socket at exit), `/proc/PID/net` (to read the
/// target's socket tables).
#[derive(Debug)]
pub struct KeptDir {
    pub(super) fd: OwnedFd,
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
