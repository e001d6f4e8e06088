//! Confinement of rnet's helper processes inside a guest's namespaces (the
//! namespace agent, its launcher and the short-lived TAP helper): the
//! pieces each of them applies to itself after fork, before it reads a
//! single byte the guest could influence.
//!
//! A guest that is root in its own user namespace shares the helpers' user
//! namespace (they join it) and, unless it has a PID namespace of its own,
//! sees their PIDs. What keeps it out:
//!
//! - **Undumpable** ([`undumpable`]): `PR_SET_DUMPABLE 0`, set right after
//!   fork and again after every credential change. ptrace and the
//!   `/proc/PID/{mem,root,environ,fd,ns}` files then need `CAP_SYS_PTRACE`
//!   in the user namespace that owns the process's memory, which is rnet's
//!   (the helpers never exec), not the guest's.
//! - **No descriptors** ([`close_all_but`]): everything except the helper's
//!   own socket is closed with `close_range(2)`; stdin, stdout and stderr
//!   become `/dev/null` (opened by the launcher while it still sees the
//!   host's files; [`crate::sys::stdio_to_null`]), so no later socket can
//!   take their numbers.
//! - **No environment** ([`clear_environment`]): the inherited environment
//!   strings are zeroed and `PR_SET_MM_MAP` points the environment at an
//!   empty range, so `/proc/PID/environ` is empty.
//! - **An empty root**: a mount namespace of its own (created in the
//!   guest's user namespace, where the helper has `CAP_SYS_ADMIN`) whose
//!   root is an empty read-only tmpfs ([`crate::sandbox::empty_root`]).
//! - **Few capabilities** ([`crate::sandbox::drop_capabilities`]): only
//!   what the helper's requests need, in the effective and permitted sets;
//!   the bounding, inheritable and ambient sets are emptied.
//! - **no_new_privs and seccomp** ([`install_seccomp`]): an allow-list of
//!   the calls the helper makes; any other call kills it (`SIGSYS`).

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use crate::sys;
use nix::errno::Errno;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Capability numbers (linux/capability.h).
pub(crate) const CAP_SETPCAP: u32 = 8;
pub(crate) const CAP_NET_BIND_SERVICE: u32 = 10;
pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;

/// `PR_SET_DUMPABLE 0`.
pub(crate) fn undumpable() -> Result<(), Errno> {
    nix::sys::prctl::set_dumpable(false)
}

/// Whether the process is dumpable (for tests).
#[cfg(test)]
pub(crate) fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(false)
}

/// Closes every descriptor from 3 up except those in `keep`
/// (`close_range(2)`, Linux 5.9; older kernels: one `close` per open
/// descriptor listed in `/proc/self/fd`, or up to the descriptor limit).
pub(crate) fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: u32 = 3;
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    for &k in &keep {
        let k = k as u32;
        if k > from {
            ranges.push((from, k - 1));
        }
        from = k + 1;
    }
    ranges.push((from, u32::MAX));
    for (lo, hi) in ranges {
        // SAFETY: this runs in a freshly forked child that never returns
        // into code owning the descriptors it closes.
        if unsafe { sys::close_range(lo, hi) }.is_err() {
            close_slowly(lo, hi);
        }
    }
}

/// `close_range` without the system call.
fn close_slowly(lo: u32, hi: u32) {
    use nix::unistd::{SysconfVar, sysconf};
    let max = match sysconf(SysconfVar::OPEN_MAX) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 65536,
    };
    let hi = u64::from(hi).min(max.saturating_sub(1));
    for fd in u64::from(lo)..=hi {
        // SAFETY: as in close_all_but; EBADF for numbers not open.
        unsafe { sys::close(fd as RawFd) };
    }
}

/// Zeroes the inherited environment strings and makes `/proc/PID/environ`
/// empty. Needs `/proc/self/stat` (call before the root is emptied).
pub(crate) fn clear_environment() -> Result<(), Errno> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|_| Errno::EIO)?;
    // Fields after the command name (which may hold spaces), numbered as
    // in proc(5): the first one here is field 3.
    let rest = stat.rsplit_once(')').ok_or(Errno::EIO)?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let field = |n: usize| f.get(n - 3).copied().ok_or(Errno::EIO);
    let (env_start, env_end) = (field(50)?, field(51)?);
    if env_end > env_start {
        // SAFETY: [env_start, env_end) is this process's own environment
        // area at the top of its stack (from the kernel's mm); zeroing it
        // leaves every environ[] pointer at an empty string.
        unsafe {
            std::ptr::write_bytes(env_start as *mut u8, 0, (env_end - env_start) as usize);
        }
    }
    let brk = sys::program_break();
    let map = sys::MmMap {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: brk.max(field(47)?),
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start,
        env_end: env_start,
        auxv: 0,
        auxv_size: 0,
        exe_fd: u32::MAX,
    };
    sys::set_mm_map(&map)
}

/// How a call in an allow-list is narrowed by its arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// Any arguments.
    Any,
    /// Argument `n` (32 bits) is one of these values.
    OneOf(u8, &'static [u64]),
}

/// Builds the allow-list filter of `calls` (other calls kill the process)
/// and the ENOSYS filter for `clone3` (whose flags a filter cannot read).
pub(crate) fn build_seccomp(
    calls: &[(libc::c_long, Arg)],
) -> Result<[BpfProgram; 2], &'static str> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| "no seccomp arch")?;
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, arg) in calls {
        let rules = map.entry(*nr).or_default();
        if let Arg::OneOf(n, vals) = arg {
            for v in *vals {
                let c = SeccompCondition::new(*n, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                    .map_err(|_| "bad seccomp condition")?;
                rules.push(SeccompRule::new(vec![c]).map_err(|_| "bad seccomp rule")?);
            }
        }
    }
    map.insert(libc::SYS_clone3, Vec::new());
    let allow = SeccompFilter::new(map, SeccompAction::KillProcess, SeccompAction::Allow, arch)
        .map_err(|_| "cannot build the seccomp filter")?;
    let nosys = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|_| "cannot build the seccomp filter")?;
    Ok([
        allow
            .try_into()
            .map_err(|_| "cannot compile the seccomp filter")?,
        nosys
            .try_into()
            .map_err(|_| "cannot compile the seccomp filter")?,
    ])
}

/// Sets no_new_privs and installs `progs` (from [`build_seccomp`]) on the
/// calling thread.
pub(crate) fn install_seccomp(progs: &[BpfProgram; 2]) -> Result<(), Errno> {
    nix::sys::prctl::set_no_new_privs()?;
    for p in progs.iter().rev() {
        sys::seccomp_set_filter(p)?;
    }
    Ok(())
}

/// The calls every confined helper makes: memory, its socket, exit.
pub(crate) fn base_calls() -> Vec<(libc::c_long, Arg)> {
    use Arg::Any;
    let mut v = vec![
        (libc::SYS_read, Any),
        (libc::SYS_write, Any),
        (libc::SYS_close, Any),
        (libc::SYS_recvmsg, Any),
        (libc::SYS_sendmsg, Any),
        (libc::SYS_brk, Any),
        (libc::SYS_mmap, Any),
        (libc::SYS_munmap, Any),
        (libc::SYS_mremap, Any),
        (libc::SYS_madvise, Any),
        (libc::SYS_mprotect, Any),
        (libc::SYS_futex, Any),
        (libc::SYS_getrandom, Any),
        (libc::SYS_clock_gettime, Any),
        (libc::SYS_rt_sigreturn, Any),
        (libc::SYS_rt_sigprocmask, Any),
        (libc::SYS_sigaltstack, Any),
        (libc::SYS_getpid, Any),
        (libc::SYS_gettid, Any),
        (libc::SYS_tgkill, Any),
        (libc::SYS_exit, Any),
        (libc::SYS_exit_group, Any),
    ];
    #[cfg(target_arch = "x86_64")]
    v.push((libc::SYS_poll, Any));
    v.push((libc::SYS_ppoll, Any));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::process::{exit_child, reap};
    use crate::sys::{ForkResult, fork};
    use nix::sys::wait::WaitStatus;

    #[test]
    fn environment_becomes_empty() {
        // SAFETY: the child makes system calls and small allocations, then
        // leaves through exit_child.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                if clear_environment().is_err() {
                    return 2;
                }
                match std::fs::read("/proc/self/environ") {
                    Ok(v) if v.is_empty() => 0,
                    _ => 3,
                }
            }),
            ForkResult::Parent { child } => {
                assert_eq!(reap(child), Ok(Some(WaitStatus::Exited(child, 0))));
            }
        }
    }

    #[test]
    fn closes_all_but_kept() {
        let (a, _b) = nix::unistd::pipe().expect("pipe");
        let (c, _d) = nix::unistd::pipe().expect("pipe");
        use std::os::fd::AsRawFd;
        let (keep, gone) = (a.as_raw_fd(), c.as_raw_fd());
        // SAFETY: as above.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                close_all_but(&[keep]);
                let open = |fd| sys::fd_flags(fd).is_ok();
                i32::from(!(open(keep) && !open(gone) && open(2)))
            }),
            ForkResult::Parent { child } => {
                assert_eq!(reap(child), Ok(Some(WaitStatus::Exited(child, 0))));
            }
        }
    }

    #[test]
    fn undumpable_sticks_in_a_child() {
        // SAFETY: as above.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => exit_child(|| {
                if undumpable().is_err() {
                    return 2;
                }
                i32::from(is_dumpable())
            }),
            ForkResult::Parent { child } => {
                assert_eq!(reap(child), Ok(Some(WaitStatus::Exited(child, 0))));
            }
        }
    }
}
