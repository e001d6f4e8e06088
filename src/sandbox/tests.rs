//! The sandbox, tried in forked children: each stage on its own and all
//! together, with the data plane still working under them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use crate::sys::{ForkResult, exit_now, fork};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};

use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{OFlag, openat};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;

use super::landlock::landlock_abi;
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
            exit_now(code)
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
    crate::ports::auto::parse_table(table)
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
    let low_port_open = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
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
        // What --publish-auto reads: another process's socket tables.
        let target_net =
            KeptDir::open(Path::new(&format!("/proc/{parent}/net"))).map_err(|e| e.to_string())?;
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
                exit_now(0)
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
