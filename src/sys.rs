//! The raw system calls of rnet's control plane, each behind a small
//! wrapper with its `// SAFETY:` reasoning: process set-up (fork, `_exit`,
//! signal dispositions, `mallopt`), descriptors (`pidfd_open`,
//! `close_range`, `fcntl`, stdio redirection, `openat2`), and confinement
//! (`prctl`, `capget`/`capset`, `seccomp`, Landlock). Where nix already offers a safe
//! call (`set_dumpable`, `set_pdeathsig`, `getrlimit`/`setrlimit`,
//! `sysconf`, `eventfd`, `fchmod`, socket options), the callers use nix and
//! nothing is wrapped here.
//!
//! What stays beside its own code, by design:
//!
//! - The hot path: the TAP reads and writes (`phy/tap.rs`), the
//!   `recvmmsg`/`sendmsg` batching (`nat/udpio.rs`), `splice`
//!   (`ports/splice.rs`) and the TCP socket options (`nat/tcp*`). Their
//!   invariants are about the buffers and descriptors of that code (slot
//!   lengths, iovec arrays, the ring a segment lands in), and the calls
//!   must inline into the loops that make them.
//! - The ioctls that nix's macros generate (`ns/open_tap.rs`,
//!   `ns/nsfile.rs`): their safety is the layout of the `struct ifreq`
//!   stand-in defined there.
//! - Claims of ownership (`OwnedFd::from_raw_fd`, `BorrowedFd::borrow_raw`)
//!   on descriptors handed over by a parent or the kernel: only the code
//!   that received the number knows it is open and nobody else's.
//! - The call sites of [`fork`] and of [`close_range`]/[`close`]: their
//!   soundness is the caller's (one thread; a child that never returns into
//!   the frames owning the descriptors), so the `unsafe` sits there.
//! - The environment wipe in `ns/agent/confine.rs`, which writes to
//!   memory, and the signal handler rnet installs in `supervise.rs`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
pub use nix::unistd::ForkResult;

/// `fork(2)`.
///
/// # Safety
///
/// The caller's process has a single thread, or the child only makes
/// async-signal-safe calls (system calls and small allocations, which
/// glibc keeps usable) until it execs or leaves through [`exit_now`]; and
/// the child never returns into frames whose owned descriptors or memory
/// the parent still uses, unless the process is single-threaded (then the
/// child is simply a copy).
pub unsafe fn fork() -> Result<ForkResult, Errno> {
    // SAFETY: the caller's contract (above) is nix's contract for fork.
    unsafe { nix::unistd::fork() }
}

/// `_exit(2)`: ends the process at once, running no destructors, atexit
/// handlers or stdio flushes (what a forked child needs).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Resets every catchable signal's disposition (1 through `SIGRTMAX`) to
/// its default, or to "ignore" for those in `ignored`, and empties the
/// signal mask: a child must not run handlers inherited from its parent.
pub fn reset_signals(ignored: &[libc::c_int]) {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let disposition = if ignored.contains(&sig) {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        // SAFETY: installing SIG_DFL or SIG_IGN registers no handler code;
        // failures (signals reserved by libc) are harmless and ignored.
        unsafe {
            libc::signal(sig, disposition);
        }
    }
}

/// `mallopt(M_MMAP_THRESHOLD, bytes)` (glibc only; elsewhere nothing).
pub fn set_mmap_threshold(bytes: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; any value is accepted
    // or refused with a return code, and no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = bytes;
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when `pid`
/// ends (Linux 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The descriptor flags of `fd` (`fcntl(F_GETFD)`); EBADF if the number
/// is not open.
pub fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD only reads the descriptor flags; a number that is
    // not open just fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Sets `O_NONBLOCK` on `fd` (`fcntl(F_GETFL)`, then `F_SETFL`).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes the flags by value; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `close_range(lo, hi, 0)` (Linux 5.9).
///
/// # Safety
///
/// No open descriptor in `lo..=hi` is used or closed again by whatever
/// owns it (e.g. the caller is a forked child that never returns into the
/// frames owning them).
pub unsafe fn close_range(lo: u32, hi: u32) -> Result<(), Errno> {
    // SAFETY: close_range passes no memory; the caller vouches for the
    // descriptors' owners.
    let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0) };
    Errno::result(r).map(drop)
}

/// `close(fd)`, ignoring the result (EBADF for a number not open).
///
/// # Safety
///
/// As for [`close_range`]: nothing that owns `fd` uses or closes it again.
pub unsafe fn close(fd: RawFd) {
    // SAFETY: close passes no memory; the caller vouches for the owner.
    unsafe {
        libc::close(fd);
    }
}

/// Makes descriptor `dst` (0, 1 or 2) a copy of `src` (`dup2`).
pub fn dup_to_stdio(src: RawFd, dst: RawFd) -> io::Result<()> {
    assert!((0..=2).contains(&dst), "not a standard descriptor: {dst}");
    // SAFETY: dup2 only replaces descriptor `dst` (0-2), which nothing in
    // the process holds as an owned Rust object, with a copy of `src`; a
    // `src` that is not open just fails with EBADF.
    if unsafe { libc::dup2(src, dst) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points stdin, stdout and stderr at `null` (an open `/dev/null`),
/// leaving alone a standard descriptor that is `null` itself.
pub fn stdio_to_null(null: RawFd) {
    for fd in 0..=2 {
        if fd != null {
            let _ = dup_to_stdio(null, fd);
        }
    }
}

/// The kernel's `struct open_how` (openat2(2)).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, {flags, 0, resolve})`: a new descriptor.
pub fn openat2(dir: BorrowedFd<'_>, path: &CStr, flags: u64, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags,
        mode: 0,
        resolve,
    };
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size
    // given), both live for the call; a new descriptor is returned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `write(fd, &value, 8)`, e.g. to an eventfd; async-signal-safe, so a
/// signal handler may call it. The result is ignored.
pub fn write_u64(fd: RawFd, value: u64) {
    // SAFETY: write(2) reads 8 bytes from a local of that size; a number
    // that is not open just fails with EBADF.
    unsafe { libc::write(fd, (&value as *const u64).cast(), 8) };
}

/// The current program break (`sbrk(0)`).
pub fn program_break() -> u64 {
    // SAFETY: sbrk(0) only reads the current program break.
    (unsafe { libc::sbrk(0) }) as u64
}

/// The kernel's `struct prctl_mm_map` (see `prctl(2)`, `PR_SET_MM_MAP`).
#[repr(C)]
#[derive(Default)]
pub struct MmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP, map)`: replaces the process's memory
/// map description (without `exe_fd`, no privilege is needed).
pub fn set_mm_map(map: &MmMap) -> Result<(), Errno> {
    const PR_SET_MM: libc::c_int = 35;
    const PR_SET_MM_MAP: libc::c_ulong = 14;
    // SAFETY: PR_SET_MM_MAP reads a `struct prctl_mm_map` of the given
    // size; `map` is one, alive for the call. The addresses in it are only
    // checked and recorded (`auxv`, read only if `auxv_size` is not 0,
    // through a checked copy).
    let r = unsafe {
        libc::prctl(
            PR_SET_MM,
            PR_SET_MM_MAP,
            map as *const MmMap,
            std::mem::size_of::<MmMap>(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
pub fn clear_ambient_caps() -> io::Result<()> {
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
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `prctl(PR_CAPBSET_DROP, cap)`: removes `cap` from the bounding set
/// (EINVAL past the kernel's last capability).
pub fn drop_bounding_cap(cap: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's capability sets, 64 bits each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

impl CapSets {
    /// Whether `cap` is effective.
    pub fn has(&self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }
}

const CAP_VERSION_3: u32 = 0x2008_0522;

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

/// `capget(2)` of the calling thread (the version 3 layout).
pub fn capget() -> io::Result<CapSets> {
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
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// `capset(2)` of the calling thread (the version 3 layout).
pub fn capset(caps: CapSets) -> io::Result<()> {
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
    let data = [0, 1].map(|n| CapData {
        effective: e[n],
        permitted: p[n],
        inheritable: i[n],
    });
    // SAFETY: capset reads the header and two CapData structs (the version
    // 3 layout), both valid and live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`: installs one classic BPF
/// program on the calling thread (no_new_privs or CAP_SYS_ADMIN needed).
pub fn seccomp_set_filter(prog: &[seccompiler::sock_filter]) -> Result<(), Errno> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(SET_MODE_FILTER) reads `len` instructions through
    // the sock_fprog (seccompiler's sock_filter has the kernel's layout);
    // `prog` outlives the call and the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    Errno::result(r).map(drop)
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`:
/// the Landlock ABI the kernel offers (0: none).
pub fn landlock_abi() -> i64 {
    const CREATE_RULESET_VERSION: u32 = 1 << 0;
    // SAFETY: with a null attribute and size 0 the kernel reads no memory
    // and only returns a number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    r.max(0)
}

/// The kernel's `struct landlock_ruleset_attr` (as of ABI 6).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `landlock_create_ruleset` of a ruleset handling the file-system rights
/// `handled_fs` and the `scoped` restrictions, passing the attribute's
/// length of ABI `abi` (older kernels refuse a longer one).
pub fn landlock_create_ruleset(abi: i64, handled_fs: u64, scoped: u64) -> io::Result<OwnedFd> {
    let attr = RulesetAttr {
        handled_access_fs: handled_fs,
        handled_access_net: 0,
        scoped,
    };
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    // SAFETY: the kernel reads `size` bytes of `attr` (never more than
    // its size, see above), all initialised and live for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The kernel's `struct landlock_path_beneath_attr`.
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// `landlock_add_rule(ruleset, LANDLOCK_RULE_PATH_BENEATH, {rights, dir})`.
pub fn landlock_add_path_beneath(
    ruleset: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    rights: u64,
) -> io::Result<()> {
    const RULE_PATH_BENEATH: i32 = 1;
    let rule = PathBeneath {
        allowed_access: rights,
        parent_fd: dir.as_raw_fd(),
    };
    // SAFETY: the kernel reads the packed rule, live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &rule as *const PathBeneath,
            0u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `landlock_restrict_self(ruleset, 0)`: the calling thread enters the
/// ruleset's domain (no_new_privs or CAP_SYS_ADMIN needed).
pub fn landlock_restrict_self(ruleset: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: landlock_restrict_self with a ruleset descriptor and no
    // flags; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_flags_tells_open_from_closed() {
        let (a, _b) = nix::unistd::pipe().expect("pipe");
        assert!(fd_flags(a.as_raw_fd()).is_ok());
        set_nonblocking(a.as_raw_fd()).expect("O_NONBLOCK");
        let fl = nix::fcntl::fcntl(&a, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_eq!(
            fd_flags(-1).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EBADF))
        );
    }

    #[test]
    fn capget_sees_effective_within_permitted() {
        let caps = capget().expect("capget");
        assert_eq!(caps.effective & !caps.permitted, 0);
    }
}
