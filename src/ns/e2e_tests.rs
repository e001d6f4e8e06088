//! End-to-end tests of the namespace module against the real kernel: a
//! command in fresh user + network namespaces, a TAP opened and configured
//! inside, checked with `nsenter ... ip`. They need no root, only
//! unprivileged user namespaces; without them (or without `nsenter`/`ip`)
//! they are skipped, except under `CI=true`, where they must run.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::*;

use super::test_env::require;

fn tools_present() -> bool {
    let have = |t: &str, flag: &str| {
        Command::new(t)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    require(
        have("nsenter", "--version") && have("ip", "-V"),
        "nsenter or ip is not installed",
    )
}

fn argv(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Spawns `args` in new namespaces, or None (skip) if user namespaces are
/// unavailable here.
fn spawn(args: &[&str]) -> Option<SpawnedCommand> {
    match spawn_in_new_namespaces(&argv(args)) {
        Ok(cmd) => Some(cmd),
        Err(e @ NsError::UsernsCreate { .. }) => {
            require(false, &format!("user namespaces unavailable: {e}"));
            None
        }
        Err(e) => panic!("spawn failed: {e}"),
    }
}

/// Kills and reaps a released command when the test ends, even on panic.
struct Reaper(i32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0);
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

/// Runs `ip ARGS` inside the namespaces of `pid` and returns its stdout.
fn ip_in(pid: i32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .args([
            "--preserve-credentials",
            "-U",
            "-n",
            "-t",
            &pid.to_string(),
            "ip",
        ])
        .args(args)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn guest_config(mac: Option<[u8; 6]>) -> IfaceConfig {
    IfaceConfig {
        addr: Ipv4Addr::new(10, 0, 2, 100),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        mac,
        ipv6: None,
    }
}

fn tap0(configure: Option<IfaceConfig>) -> TapSetup {
    TapSetup {
        name: "tap0".into(),
        mtu: 65520,
        vnet_hdr: false,
        configure,
    }
}

#[test]
fn run_command_and_configure_tap() {
    if !tools_present() {
        return;
    }
    let Some(mut cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let pid = cmd.pid();
    let tap = open_tap(&Target::Pid(pid), &tap0(Some(guest_config(None)))).expect("open_tap");
    cmd.release().expect("release");
    let _reaper = Reaper(pid);

    assert_eq!(tap.name, "tap0");
    assert_ne!(tap.mac, [0; 6]);
    assert_eq!(tap.mac[0] & 1, 0, "unicast MAC");
    let fl = OFlag::from_bits_truncate(fcntl(&tap.fd, FcntlArg::F_GETFL).expect("F_GETFL"));
    assert!(!fl.contains(OFlag::O_NONBLOCK), "fd must be blocking");
    assert!(fl.contains(OFlag::O_RDWR));

    let addr = ip_in(pid, &["-o", "addr", "show", "tap0"]);
    assert!(addr.contains("inet 10.0.2.100/24"), "{addr}");
    let link = ip_in(pid, &["-o", "link", "show", "tap0"]);
    assert!(link.contains("mtu 65520"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    assert!(
        link.contains(&format_mac(tap.mac)),
        "{link} vs {:?}",
        tap.mac
    );
    let lo = ip_in(pid, &["-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let route = ip_in(pid, &["route"]);
    assert!(route.contains("default via 10.0.2.2 dev tap0"), "{route}");

    // The descriptor really is that TAP: traffic to the gateway shows up as
    // an ARP request for 10.0.2.2 from the guest's MAC.
    let _ = Command::new("nsenter")
        .args(["--preserve-credentials", "-U", "-n", "-t", &pid.to_string()])
        .args(["ping", "-c", "1", "-W", "1", "10.0.2.2"])
        .output();
    assert!(
        saw_arp_for_gateway(&tap),
        "no ARP request for 10.0.2.2 on the TAP"
    );

    // A second opener of the same TAP is refused with a clear message.
    let err = open_tap(&Target::Pid(pid), &tap0(None)).expect_err("tap0 is busy");
    assert!(matches!(err, NsError::TapBusy { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("already in use by another process")
    );

    drop(_reaper);
}

/// Reads frames from the TAP for a while, looking for an ARP request for
/// 10.0.2.2.
fn saw_arp_for_gateway(tap: &OpenedTap) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(tap.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("poll: {e}"),
        }
        let n = nix::unistd::read(tap.fd.as_fd(), &mut buf).expect("read TAP");
        let f = &buf[..n];
        // Ethernet: ethertype at 12; ARP: op at 20, sender MAC at 22,
        // target IP at 38.
        if n >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == [10, 0, 2, 2]
        {
            assert_eq!(f[22..28], tap.mac);
            return true;
        }
    }
    false
}

#[test]
fn attach_to_existing_tap_with_mac_and_vnet_hdr() {
    if !tools_present() {
        return;
    }
    let Some(cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let pid = cmd.pid();
    // Like RootlessKit: the TAP exists before rnet attaches.
    ip_in(pid, &["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    let mac = [0x02, 0x52, 0x4e, 0x45, 0x54, 0x01];
    let setup = TapSetup {
        vnet_hdr: true,
        mtu: 1500,
        ..tap0(Some(guest_config(Some(mac))))
    };
    let tap = open_tap(&Target::Pid(pid), &setup).expect("attach to existing tap0");
    assert_eq!(tap.mac, mac);
    let link = ip_in(pid, &["-o", "link", "show", "tap0"]);
    assert!(link.contains("mtu 1500"), "{link}");
    assert!(link.contains("02:52:4e:45:54:01"), "{link}");
    // Re-running the configuration (address and route replaced) is fine.
    // Helpers forked meanwhile by other test threads may hold a copy of the
    // descriptor for a moment, so allow a short busy period.
    drop(tap);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match open_tap(&Target::Pid(pid), &setup) {
            Ok(_) => break,
            Err(NsError::TapBusy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("attach again: {e}"),
        }
    }
    // `cmd` is dropped unreleased: the process exits and is reaped.
    drop(cmd);
    assert_eq!(
        waitpid(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ECHILD)
    );
}

#[test]
fn unconfigured_tap_is_left_alone() {
    if !tools_present() {
        return;
    }
    let Some(cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let pid = cmd.pid();
    let tap = open_tap(&Target::Pid(pid), &tap0(None)).expect("open_tap");
    assert_ne!(tap.mac, [0; 6]);
    let link = ip_in(pid, &["-o", "link", "show", "tap0"]);
    assert!(!link.contains(",UP"), "{link}");
    let addr = ip_in(pid, &["-o", "addr", "show", "tap0"]);
    assert!(!addr.contains("inet "), "{addr}");
    assert!(tap.fd.as_raw_fd() >= 0);
}

#[test]
fn lo_is_not_a_tap() {
    let Some(cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let setup = TapSetup {
        name: "lo".into(),
        ..tap0(Some(guest_config(None)))
    };
    let err = open_tap(&Target::Pid(cmd.pid()), &setup).expect_err("lo is not a TAP");
    assert!(matches!(err, NsError::NotATap { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("already exists and is not a TAP device"),
        "{err}"
    );
}

#[test]
fn missing_process() {
    let err = open_tap(&Target::Pid(4_000_000), &tap0(None)).expect_err("no such pid");
    assert!(matches!(err, NsError::NoSuchProcess(4_000_000)), "{err}");
    assert!(err.to_string().contains("no such process: PID 4000000"));
}

#[test]
fn path_target_with_userns() {
    let Some(cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let pid = cmd.pid();
    let target = Target::Path {
        netns: format!("/proc/{pid}/ns/net").into(),
        userns: Some(format!("/proc/{pid}/ns/user").into()),
    };
    let tap = open_tap(&target, &tap0(Some(guest_config(None)))).expect("open_tap by path");
    assert_eq!(tap.name, "tap0");
}

#[test]
fn netns_without_its_userns_is_refused_unprivileged() {
    if nix::unistd::geteuid().is_root() {
        // Root has CAP_SYS_ADMIN over every namespace: nothing to refuse.
        return;
    }
    let Some(cmd) = spawn(&["sleep", "30"]) else {
        return;
    };
    let target = Target::Path {
        netns: format!("/proc/{}/ns/net", cmd.pid()).into(),
        userns: None,
    };
    let err = open_tap(&target, &tap0(None)).expect_err("needs the userns");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot join the network namespace of"),
        "{msg}"
    );
    assert!(msg.contains("--userns"), "{msg}");
}

#[test]
fn release_runs_the_command() {
    let Some(mut cmd) = spawn(&["sh", "-c", "exit 7"]) else {
        return;
    };
    let pid = Pid::from_raw(cmd.pid());
    cmd.release().expect("release");
    cmd.release().expect("second release is a no-op");
    assert_eq!(waitpid(pid, None), Ok(WaitStatus::Exited(pid, 7)));
}

#[test]
fn command_is_root_in_a_new_netns() {
    let ours = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let ours = ours.to_string_lossy().into_owned();
    let script = "test \"$(id -u)\" = 0 && test \"$(readlink /proc/self/ns/net)\" != \"$1\"";
    let Some(mut cmd) = spawn(&["sh", "-c", script, "sh", &ours]) else {
        return;
    };
    let pid = Pid::from_raw(cmd.pid());
    cmd.release().expect("release");
    assert_eq!(waitpid(pid, None), Ok(WaitStatus::Exited(pid, 0)));
}

#[test]
fn exec_failure_is_reported() {
    let Some(mut cmd) = spawn(&["/nonexistent/rnet-no-such-command"]) else {
        return;
    };
    let pid = Pid::from_raw(cmd.pid());
    let err = cmd.release().expect_err("cannot exec");
    assert!(matches!(err, NsError::Exec { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "cannot run `/nonexistent/rnet-no-such-command`: No such file or directory"
    );
    // Already reaped by release().
    assert_eq!(waitpid(pid, None), Err(nix::errno::Errno::ECHILD));
}

#[test]
fn command_gets_default_signal_state() {
    // Block and ignore signals here; the command must not inherit that.
    // (Only this thread's mask changes; the fork copies it.)
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)).expect("block");
    let spawned = spawn(&[
        "sh",
        "-c",
        "grep -q '^SigBlk:[[:space:]]*0*$' /proc/self/status",
    ]);
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None).expect("restore");
    let Some(mut cmd) = spawned else {
        return;
    };
    let pid = Pid::from_raw(cmd.pid());
    cmd.release().expect("release");
    assert_eq!(waitpid(pid, None), Ok(WaitStatus::Exited(pid, 0)));
}

#[test]
fn release_after_the_process_died_says_so() {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    // A process forked at that moment by another test thread may briefly
    // hold a copy of the go channel, so the send succeeds and the death
    // goes unnoticed by release(); retry a few times for the clear case.
    for _ in 0..5 {
        let Some(mut cmd) = spawn(&["sleep", "30"]) else {
            return;
        };
        let pid = Pid::from_raw(cmd.pid());
        kill(pid, Signal::SIGKILL).expect("kill");
        // Wait until it is dead, without reaping it.
        waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).expect("waitid");
        match cmd.release() {
            Err(err) => {
                let msg = err.to_string();
                assert!(msg.contains("was killed by signal SIGKILL"), "{msg}");
                assert_eq!(waitpid(pid, None), Err(nix::errno::Errno::ECHILD));
                return;
            }
            Ok(()) => {
                assert_eq!(
                    waitpid(pid, None),
                    Ok(WaitStatus::Signaled(pid, Signal::SIGKILL, false))
                );
            }
        }
    }
    panic!("release() never reported the dead process");
}
