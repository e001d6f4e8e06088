//! Stage 4 of the sandbox: the seccomp programs. The allow-list
//! ([`allowed()`], one reason per call, narrowed by argument where it can
//! be), the `ENOSYS` list, the `EPERM` program for signals and Unix sockets
//! ([`deny_program`]), and the supervisor's deny-list.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SandboxError, Stage};

/// The pids of the calling process's children (one thread: its tid is its
/// pid), from `/proc/self/task/PID/children`; empty if unreadable.
pub(super) fn children(me: i32) -> Vec<i32> {
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
pub(super) fn install_filters(progs: &[BpfProgram; 2]) -> Result<(), SandboxError> {
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
