//! RootlessKit driving rnet as its slirp4netns: `rootlesskit --net=slirp4netns
//! --slirp4netns-binary=DIR/slirp4netns` where DIR/slirp4netns is a symlink
//! to rnet. RootlessKit creates and configures tap0 itself (10.0.2.100/24,
//! RootlessKit's default CIDR 10.0.2.0/24, MTU 65520) and runs
//! `slirp4netns --mtu 65520 -r 3 ... PID tap0` without `-c`.
//!
//! RootlessKit refuses to run without subordinate id ranges for its user
//! (`/etc/subuid`, `/etc/subgid`). As root (CI), the test runs it as uid
//! 65534 through `setpriv`, inside a private mount namespace in which
//! scratch copies of those two files, giving `nobody` one range, are
//! bind-mounted over the real ones; nothing on the host changes. As
//! another user it runs RootlessKit directly if that user has ranges, and
//! skips otherwise.
//!
//! RootlessKit passes its environment on to slirp4netns, which is how the
//! test's `RNET_OUTBOUND_ALLOW=none` and loopback `RNET_DNS_UPSTREAM` reach
//! rnet.

mod common;
#[path = "common/compat.rs"]
mod s4;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use s4::*;

const ROOTLESSKIT: &str = "rootlesskit";

/// Whether rootlesskit is installed (skip outside CI, fail in CI).
fn require_rootlesskit(test: &str) -> bool {
    if !require_userns(test) {
        return false;
    }
    let ok = Command::new(ROOTLESSKIT)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: rootlesskit is not installed (apt-get install rootlesskit)"
    );
    eprintln!("SKIP {test}: rootlesskit is not installed");
    false
}

/// The user name owning the current uid, from the passwd database.
fn user_name(uid: u32) -> Option<String> {
    let out = Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':')
        .next()
        .filter(|n| !n.is_empty())
        .map(String::from)
}

/// A scratch directory for one RootlessKit run, owned by the uid that runs it.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str, owner: Option<u32>) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rnet-test-{}-rk-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        }
        Scratch { dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How this test run can start RootlessKit, or None (skipped) if it cannot.
enum Runner {
    /// Root: private mount namespace with scratch subuid/subgid, then uid 65534.
    RootAsNobody { subid: PathBuf },
    /// A non-root user that has subordinate ranges.
    Direct,
}

fn runner(test: &str, scratch_parent: &Path) -> Option<Runner> {
    if is_root() {
        let name = user_name(NOBODY).expect("no passwd entry for uid 65534");
        let subid = scratch_parent.join("subid");
        std::fs::write(&subid, format!("{name}:100000:65536\n")).unwrap();
        std::fs::set_permissions(&subid, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Path::new("/etc/subuid").exists() && Path::new("/etc/subgid").exists(),
            "{test}: /etc/subuid and /etc/subgid must exist (even empty) to bind-mount over"
        );
        return Some(Runner::RootAsNobody { subid });
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let name = user_name(uid).unwrap_or_default();
    let has = |f: &str| {
        std::fs::read_to_string(f).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with(&format!("{name}:")) || l.starts_with(&format!("{uid}:")))
        })
    };
    if has("/etc/subuid") && has("/etc/subgid") {
        return Some(Runner::Direct);
    }
    assert!(!in_ci(), "{test}: no subordinate id ranges for {name}");
    eprintln!(
        "SKIP {test}: no /etc/subuid and /etc/subgid ranges for {name} (needed by rootlesskit)"
    );
    None
}

/// The full `rootlesskit ...` command line for `runner`, with the test's
/// rnet policy in the environment.
fn rootlesskit_cmd(
    runner: &Runner,
    scratch: &Scratch,
    dns: &DnsServer,
    rk_args: &[String],
    guest: &[String],
) -> Command {
    let mut argv: Vec<String> = vec![
        ROOTLESSKIT.into(),
        "--net=slirp4netns".into(),
        format!("--slirp4netns-binary={}", slirp_bin().display()),
        "--disable-host-loopback=false".into(),
        format!("--state-dir={}", scratch.state_dir().display()),
    ];
    argv.extend_from_slice(rk_args);
    argv.extend_from_slice(guest);
    let mut cmd = match runner {
        Runner::Direct => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Runner::RootAsNobody { subid } => {
            // sh -c 'mount ...; exec setpriv ... "$@"' sh ARGV...
            let script = "mount --bind \"$0\" /etc/subuid && mount --bind \"$0\" /etc/subgid && \
                          exec setpriv --reuid 65534 --regid 65534 --clear-groups \"$@\"";
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c", script])
                .arg(subid)
                .args(&argv);
            c
        }
    };
    policy_env(&mut cmd, ALLOW_NONE, dns);
    cmd.env("HOME", &scratch.dir)
        .env("XDG_RUNTIME_DIR", &scratch.dir);
    cmd
}

/// Pids of processes started from our `slirp4netns` symlink.
fn our_slirps() -> Vec<u32> {
    let prefix = slirp_bin().to_string_lossy().into_owned();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if String::from_utf8_lossy(argv0) == prefix && alive(pid) {
            v.push(pid);
        }
    }
    v
}

/// Checks that no rnet started by RootlessKit is left and no API socket remains.
fn assert_clean(scratch: &Scratch) {
    let gone = eventually(secs(10), || our_slirps().is_empty());
    assert!(
        gone,
        "rnet (as slirp4netns) still running: {:?}",
        our_slirps()
    );
    let sock = scratch.state_dir().join(".s4nn.sock");
    assert!(!sock.exists(), "API socket left behind: {}", sock.display());
}

#[test]
fn rootlesskit_guest_reaches_host_loopback_and_shuts_down() {
    guest_reaches_host_loopback(
        "rootlesskit_guest_reaches_host_loopback_and_shuts_down",
        &[],
    );
}

/// The same with RootlessKit asking for slirp4netns's sandbox and seccomp
/// filter (`--enable-sandbox --enable-seccomp` reach rnet's compat mode).
#[test]
fn rootlesskit_with_slirp4netns_sandbox_and_seccomp() {
    guest_reaches_host_loopback(
        "rootlesskit_with_slirp4netns_sandbox_and_seccomp",
        &[
            "--slirp4netns-sandbox=true".into(),
            "--slirp4netns-seccomp=true".into(),
        ],
    );
}

fn guest_reaches_host_loopback(test: &str, rk_args: &[String]) {
    if !require_rootlesskit(test) {
        return;
    }
    let owner = is_root().then_some(NOBODY);
    let scratch = Scratch::new(
        if rk_args.is_empty() {
            "curl"
        } else {
            "curl-sbx"
        },
        owner,
    );
    let Some(runner) = runner(test, &scratch.dir) else {
        return;
    };
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", http.port());
    let guest: Vec<String> = [
        "sh",
        "-c",
        "ip -o -4 addr show tap0 && ip -o link show tap0 && exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .into_iter()
    .chain(curl(&url))
    .collect();
    let out = run(
        &mut rootlesskit_cmd(&runner, &scratch, &dns, rk_args, &guest),
        secs(60),
    );
    out.assert_success("rootlesskit --net=slirp4netns with rnet");
    assert!(out.stdout.contains("10.0.2.100/24"), "{out}");
    assert!(out.stdout.contains("mtu 65520"), "{out}");
    assert!(out.stdout.ends_with(HTTP_BODY), "{out}");
    assert!(http.hits() >= 1);
    assert_clean(&scratch);
}

/// `--port-driver=slirp4netns -p 127.0.0.1:HP:GP/tcp`: RootlessKit publishes
/// through rnet's API socket (`add_hostfwd`).
#[test]
fn rootlesskit_port_driver_slirp4netns_publishes() {
    let test = "rootlesskit_port_driver_slirp4netns_publishes";
    if !require_rootlesskit(test) {
        return;
    }
    let owner = is_root().then_some(NOBODY);
    let scratch = Scratch::new("ports", owner);
    let Some(runner) = runner(test, &scratch.dir) else {
        return;
    };
    let dns = DnsServer::start();
    let host_port = loopback_listener().local_addr().unwrap().port();
    let guest_port = 8080;
    let rk_args = vec![
        "--port-driver=slirp4netns".to_string(),
        "-p".into(),
        format!("127.0.0.1:{host_port}:{guest_port}/tcp"),
    ];
    // The guest serves until RootlessKit is stopped.
    let guest = guest_http_server(guest_port, "published by rootlesskit");
    let mut p = Proc::spawn(&mut rootlesskit_cmd(
        &runner, &scratch, &dns, &rk_args, &guest,
    ));
    let got = eventually(secs(30), || {
        host_get(host_port).is_ok_and(|b| b == "published by rootlesskit")
    });
    if !got {
        let why = host_get(host_port);
        let (_, out) = p.stop(secs(0));
        panic!("port not published: {why:?}\n{out}");
    }
    assert!(
        scratch.state_dir().join(".s4nn.sock").exists(),
        "API socket missing while running"
    );
    // Ending the guest ends RootlessKit, which kills its slirp4netns.
    p.signal(libc::SIGTERM);
    let (exited, out) = p.stop(secs(20));
    assert!(exited, "rootlesskit did not end on SIGTERM: {out}");
    assert_clean(&scratch);
}
