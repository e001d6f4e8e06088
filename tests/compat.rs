//! slirp4netns compatibility mode, end to end: the command line as
//! consumers probe and call it (`--help`, `--version`, error texts and exit
//! codes), pid/path/tapfd modes in real namespaces, readiness, exit-fd,
//! SIGTERM, and Podman's exact argv.
//!
//! Every rnet started here gets `RNET_OUTBOUND_ALLOW=none` and a loopback
//! `RNET_DNS_UPSTREAM`; guests only talk to 10.0.2.2 (the host's loopback).

mod common;
#[path = "common/compat.rs"]
mod s4;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;
use s4::*;

const PROBES: &[&str] = &[
    "--netns-type",
    "--enable-ipv6",
    "--cidr",
    "--disable-host-loopback",
    "--api-socket",
    "--enable-sandbox",
    "--enable-seccomp",
    "--mtu",
    "--outbound-addr",
];

#[test]
fn help_contains_every_probed_option() {
    let dns = DnsServer::start();
    for mut cmd in [
        slirp(&["--help"], &dns),
        slirp(&["-h"], &dns),
        rnet_slirp(&["--help"], &dns),
    ] {
        let out = run(&mut cmd, secs(10));
        out.assert_success("--help");
        for p in PROBES {
            assert!(out.stdout.contains(p), "--help lacks {p}: {out}");
        }
    }
    // Rootless Docker's check, verbatim.
    let sh = format!(
        "{} --help | grep -qw -- --netns-type",
        slirp_bin().display()
    );
    run(Command::new("sh").args(["-c", &sh]), secs(10)).assert_success("docker's probe");
    // The text is true: the sandbox, the filter and IPv6 work.
    let out = run(&mut slirp(&["--help"], &dns), secs(10));
    for stale in ["later release", "no IPv6", "accepted;", "not supported"] {
        assert!(!out.stdout.contains(stale), "--help says {stale:?}: {out}");
    }
    let line = |opt: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(opt))
            .unwrap_or_else(|| panic!("no {opt} line: {out}"))
            .to_string()
    };
    assert!(
        line("--enable-sandbox").contains("empty read-only root"),
        "{out}"
    );
    assert!(line("--enable-seccomp").contains("syscall"), "{out}");
    assert!(line("-6, --enable-ipv6").contains("fd00::/64"), "{out}");
    assert!(
        line("--outbound-addr6").contains("IPv6 host sockets"),
        "{out}"
    );
    // rnet's own help lists the subcommand.
    let out = run(Command::new(RNET).arg("--help"), secs(10));
    assert!(out.stdout.contains("slirp4netns"), "{out}");
}

#[test]
fn version_is_machine_readable() {
    let dns = DnsServer::start();
    for mut cmd in [slirp(&["--version"], &dns), rnet_slirp(&["-v"], &dns)] {
        let out = run(&mut cmd, secs(10));
        out.assert_success("--version");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&"slirp4netns version 1.3.1+rnet"),
            "{out}"
        );
        let keys: Vec<&str> = lines[1..]
            .iter()
            .map(|l| l.split_once(": ").map_or(*l, |(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            [
                "commit",
                "libslirp",
                "SLIRP_CONFIG_VERSION_MAX",
                "libseccomp",
                "rnet"
            ],
            "{out}"
        );
        assert!(lines.contains(&"SLIRP_CONFIG_VERSION_MAX: 4"), "{out}");
        assert!(lines[2].contains("smoltcp"), "{out}");
        assert_eq!(lines[1], format!("commit: {}", built_commit()), "{out}");
    }
    // rnet's own --version names the commit too.
    let out = run(Command::new(RNET).arg("--version"), secs(10));
    out.assert_success("rnet --version");
    let (v, c) = (env!("CARGO_PKG_VERSION"), built_commit());
    let want = if c == v {
        format!("rnet {v}")
    } else {
        format!("rnet {v} (commit {c})")
    };
    assert_eq!(out.stdout.trim(), want, "{out}");
}

/// `git rev-parse --short HEAD` of this checkout, if it is one.
fn git_head() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let top = Command::new("git")
        .args(["-C", dir, "rev-parse", "--show-toplevel"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let top = std::path::PathBuf::from(String::from_utf8_lossy(&top.stdout).trim());
    if top.canonicalize().ok()? != std::path::Path::new(dir).canonicalize().ok()? {
        return None;
    }
    let out = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What `commit:` must say: the checkout's commit, or without one the
/// crate version (a build from a release tarball).
fn built_commit() -> String {
    git_head().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

#[test]
fn errors_have_slirp4netns_texts_and_exit_1() {
    if !require_userns("errors_have_slirp4netns_texts_and_exit_1") {
        return;
    }
    let dns = DnsServer::start();
    // A real (harmless) target, so a wrongly accepted command line could only
    // ever touch a throw-away namespace.
    let t = Target::userns();
    let pid = t.pid().to_string();
    let long_sock = format!("/tmp/{}", "s".repeat(104));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--mtu=0"], "MTU must be a positive integer (< 65522)"),
        (
            vec!["-m", "65522"],
            "MTU must be a positive integer (< 65522)",
        ),
        (
            vec!["--mtu", "big"],
            "MTU must be a positive integer (< 65522)",
        ),
        (vec!["-c", "--cidr", "24"], "invalid CIDR: 24"),
        (vec!["-c", "--cidr", "foo"], "invalid CIDR: foo"),
        (vec!["-c", "--cidr", "10.0.2.0"], "invalid CIDR: 10.0.2.0"),
        (
            vec!["-c", "--cidr", "10.0.2.100/24"],
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24",
        ),
        (
            vec!["-c", "--cidr=10.0.2.100/26"],
            "prefix length needs to be 1-25",
        ),
        (
            vec!["--macaddress=02:00:00:00:00:01"],
            "--macaddr cannot be specified when --configure or -c is not specified",
        ),
        (
            vec!["-a", &long_sock],
            "the specified API socket path is too long (>= 108)",
        ),
        (vec!["--bogus"], "unrecognized option '--bogus'"),
        (vec!["-e", "x"], "exit-fd must be a non-negative integer"),
        (
            vec!["--outbound-addr=no-such-if0"],
            "outbound-addr has to be valid ipv4 address or interface name",
        ),
        (
            vec!["--outbound-addr6=no-such-if0"],
            "outbound-addr6 has to be valid ipv6 address or interface name",
        ),
    ];
    for (extra, text) in cases {
        let mut args = extra.clone();
        args.extend([pid.as_str(), "tap0"]);
        let out = run(&mut slirp(&args, &dns), secs(10));
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(text), "{args:?}: want {text:?}: {out}");
    }
    for (args, text) in [
        (vec![pid.as_str()], "missing PID and TAPNAME"),
        (vec!["abc", "tap0"], "PID must be a positive integer"),
        (
            vec!["--netns-type=path", "/nonexistent/rnet-netns", "tap0"],
            "existing path expected when --netns-type=path",
        ),
        (vec!["--netns-type=tapfd", "999"], "tap fd 999"),
    ] {
        let out = run(&mut slirp(&args, &dns), secs(10));
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(text), "{args:?}: want {text:?}: {out}");
    }
    // Nothing was configured in the target by any of these.
    let out = run(&mut t.exec(&["ip", "-o", "link"]), secs(10));
    assert!(!out.stdout.contains("tap0"), "{out}");
}

fn guest_addr(t: &Target, dev: &str) -> String {
    let out = run(
        &mut t.exec(&["ip", "-o", "-4", "addr", "show", dev]),
        secs(10),
    );
    out.stdout
}

fn guest_curl(t: &Target, port: u16) -> Output {
    let url = format!("http://{GATEWAY}:{port}/");
    run(&mut t.exec(&strs(&curl(&url))), secs(20))
}

#[test]
fn pid_mode_configures_and_reaches_host_loopback() {
    if !require_userns("pid_mode_configures_and_reaches_host_loopback") {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let t = Target::userns();
    let pid = t.pid().to_string();
    // Options after the positionals (getopt permutation).
    let mut p = spawn_ready(slirp(&[&pid, "-c", "tap0"], &dns), "slirp4netns -c");
    let addr = guest_addr(&t, "tap0");
    assert!(addr.contains("10.0.2.100/24"), "{addr}");
    let link = run(&mut t.exec(&["ip", "-o", "link", "show", "tap0"]), secs(10));
    assert!(link.stdout.contains("mtu 1500"), "default MTU: {link}");
    let route = run(&mut t.exec(&["ip", "route"]), secs(10));
    assert!(route.stdout.contains("default via 10.0.2.2"), "{route}");
    // Host loopback is reachable by default in compat mode.
    let out = guest_curl(&t, http.port());
    out.assert_success("curl via 10.0.2.2");
    assert_eq!(out.stdout, HTTP_BODY);
    assert!(http.hits() >= 1);
    // SIGTERM: clean exit 0.
    p.signal(libc::SIGTERM);
    let out = p.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
}

/// `-6` (with `-c`): the guest gets fd00::100/64 and pings the v6 gateway;
/// without `-6` no fd00 address appears.
#[test]
fn enable_ipv6_gives_the_guest_fd00() {
    if !require_userns("enable_ipv6_gives_the_guest_fd00") {
        return;
    }
    let dns = DnsServer::start();
    let t = Target::userns();
    let pid = t.pid().to_string();
    let mut p = spawn_ready(
        slirp(&["-c", "-6", &pid, "tap0"], &dns),
        "slirp4netns -c -6",
    );
    let addr = run(
        &mut t.exec(&["ip", "-o", "-6", "addr", "show", "tap0"]),
        secs(10),
    );
    assert!(addr.stdout.contains("fd00::100/64"), "{addr}");
    let ping = run(
        &mut t.exec(&["ping", "-6", "-c", "2", "-W", "2", "fd00::2"]),
        secs(20),
    );
    ping.assert_success("ping -6 fd00::2");
    p.signal(libc::SIGTERM);
    assert_eq!(p.finish(secs(10)).code(), Some(0));

    let t = Target::userns();
    let pid = t.pid().to_string();
    let mut p = spawn_ready(slirp(&["-c", &pid, "tap0"], &dns), "slirp4netns -c");
    let addr = run(
        &mut t.exec(&["ip", "-o", "-6", "addr", "show", "tap0"]),
        secs(10),
    );
    assert!(!addr.stdout.contains("fd00::"), "{addr}");
    p.signal(libc::SIGTERM);
    assert_eq!(p.finish(secs(10)).code(), Some(0));
}

#[test]
fn disable_host_loopback_blocks_the_gateway() {
    if !require_userns("disable_host_loopback_blocks_the_gateway") {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let t = Target::userns();
    let pid = t.pid().to_string();
    // The subcommand form and --opt=value spellings.
    let mut p = spawn_ready(
        rnet_slirp(
            &["--configure", "--disable-host-loopback", &pid, "tap0"],
            &dns,
        ),
        "rnet slirp4netns --disable-host-loopback",
    );
    let out = guest_curl(&t, http.port());
    out.assert_failure("curl to the gateway with host loopback disabled");
    assert_eq!(http.hits(), 0, "{out}");
    p.signal(libc::SIGTERM);
    assert_eq!(p.finish(secs(10)).code(), Some(0));
}

#[test]
fn no_configure_leaves_the_tap_alone_and_exit_fd_ends_it() {
    if !require_userns("no_configure_leaves_the_tap_alone_and_exit_fd_ends_it") {
        return;
    }
    let dns = DnsServer::start();
    let t = Target::userns();
    let pid = t.pid().to_string();
    let (exit_r, exit_w) = pipe();
    let mut cmd = slirp(&["--mtu", "65520", &pid, "tap7"], &dns);
    let n = inherit_fd(&mut cmd, &exit_r);
    cmd.arg("-e").arg(n.to_string());
    let mut p = spawn_ready(cmd, "slirp4netns without -c");
    drop(exit_r);
    // The TAP exists but is not configured: no address.
    let link = run(&mut t.exec(&["ip", "-o", "link", "show", "tap7"]), secs(10));
    link.assert_success("tap7 exists");
    assert!(!guest_addr(&t, "tap7").contains("inet"));
    // Data on the exit fd does nothing; hang-up ends rnet with 0.
    let mut w = exit_w;
    w.write_all(b"x").unwrap();
    assert!(p.wait_timeout(Duration::from_millis(500)).is_none());
    drop(w);
    let out = p.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn existing_tap_is_reused() {
    if !require_userns("existing_tap_is_reused") {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let t = Target::userns();
    // As RootlessKit does: the tap exists and is up before slirp4netns runs.
    run(
        &mut t.exec(&["ip", "tuntap", "add", "name", "tap0", "mode", "tap"]),
        secs(10),
    )
    .assert_success("ip tuntap add");
    let pid = t.pid().to_string();
    let mut p = spawn_ready(slirp(&["-c", &pid, "tap0"], &dns), "existing tap");
    guest_curl(&t, http.port()).assert_success("curl through the pre-created tap");
    p.signal(libc::SIGTERM);
    assert_eq!(p.finish(secs(10)).code(), Some(0));
}

/// Podman's argv, run from inside the user namespace that owns the netns
/// (as Podman does), with readiness on fd 3 and exit on fd 4.
#[test]
fn podman_argv() {
    if !require_userns("podman_argv") {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let t = Target::userns();
    let netns = format!("/proc/{}/ns/net", t.pid());
    let (ready_r, ready_w) = pipe();
    let (exit_r, exit_w) = pipe();
    let mut cmd = in_userns(&t, &slirp_bin());
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    let r = inherit_fd(&mut cmd, &ready_w);
    let e = inherit_fd(&mut cmd, &exit_r);
    let (r, e) = (r.to_string(), e.to_string());
    cmd.args([
        "--disable-host-loopback",
        "--mtu=65520",
        "--enable-sandbox",
        "--enable-seccomp",
        "-c",
        "-r",
        &r,
        "-e",
        &e,
        "--netns-type=path",
        &netns,
        "tap0",
    ]);
    let mut p = spawn_ready_on(cmd, ready_r, ready_w, "podman argv");
    drop(exit_r);
    let link = run(&mut t.exec(&["ip", "-o", "link", "show", "tap0"]), secs(10));
    assert!(link.stdout.contains("mtu 65520"), "{link}");
    assert!(guest_addr(&t, "tap0").contains("10.0.2.100/24"));
    // Gateway answers ping even with host loopback disabled; TCP to it fails.
    run(
        &mut t.exec(&["ping", "-c", "1", "-W", "5", GATEWAY]),
        secs(10),
    )
    .assert_success("ping gateway");
    guest_curl(&t, http.port()).assert_failure("curl with --disable-host-loopback");
    assert!(p.wait_timeout(Duration::from_millis(100)).is_none());
    drop(exit_w);
    let out = p.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
}

/// An ARP request from `mac` at 10.0.2.100 for `target`.
fn arp_request(mac: [u8; 6], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[10, 0, 2, 100]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// `--netns-type=tapfd`: rnet serves an inherited descriptor (here one end
/// of a SOCK_SEQPACKET pair standing in for a TAP) and answers ARP for the
/// gateway on it.
#[test]
fn tapfd_mode_serves_an_inherited_descriptor() {
    let dns = DnsServer::start();
    let (ours, theirs) = seqpacket_pair();
    let mut cmd = slirp(&["--netns-type=tapfd"], &dns);
    let n = inherit_fd(&mut cmd, &theirs);
    cmd.arg(n.to_string());
    let mut p = spawn_ready(cmd, "tapfd mode");
    drop(theirs);
    let mac = [0x02, 0, 0, 0, 0, 0x64];
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = None;
    for _ in 0..5 {
        ours.send(&arp_request(mac, [10, 0, 2, 2])).unwrap();
        let mut b = [0u8; 2048];
        if let Ok(n) = ours.recv(&mut b) {
            let f = &b[..n];
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                reply = Some(f.to_vec());
                break;
            }
        }
    }
    let Some(reply) = reply else {
        panic!("no ARP reply: {}", p.stop(secs(0)).1);
    };
    assert_eq!(&reply[0..6], &mac, "ARP reply to our MAC");
    assert_eq!(&reply[28..32], &[10, 0, 2, 2], "sender is the gateway");
    p.signal(libc::SIGTERM);
    assert_eq!(p.finish(secs(10)).code(), Some(0));
}

fn seqpacket_pair() -> (UnixDatagram, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two new descriptors that nothing else owns.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both fds were just created and are owned here. A
    // UnixDatagram's send/recv work on a connected SEQPACKET socket.
    unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// Port publishing through the API socket as Podman does it (`guest_addr`
/// empty), readiness only after the socket listens, and no socket file left
/// after SIGTERM.
#[test]
fn api_add_hostfwd_publishes_a_guest_port() {
    if !require_userns("api_add_hostfwd_publishes_a_guest_port") {
        return;
    }
    let dns = DnsServer::start();
    let t = Target::userns();
    let pid = t.pid().to_string();
    let sock = TempPath::new("api.sock");
    let sock_s = sock.0.to_string_lossy().into_owned();
    let mut p = spawn_ready(
        slirp(&["-c", "--api-socket", &sock_s, &pid, "tap0"], &dns),
        "slirp4netns --api-socket",
    );
    assert!(sock.0.exists(), "API socket must exist once ready");
    let mut guest = Proc::spawn(&mut t.exec(&strs(&guest_http_server(8080, "from the guest"))));
    // The guest server prints "listening"; give it a moment to bind.
    std::thread::sleep(Duration::from_millis(500));
    let host_port = loopback_listener().local_addr().unwrap().port();
    let reply = api(
        &sock.0,
        &format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"127.0.0.1","host_port":{host_port},"guest_addr":"","guest_port":8080}}}}"#
        ),
    );
    assert!(
        reply.contains(r#""return""#) && reply.contains(r#""id":1"#),
        "{reply}"
    );
    let list = api(&sock.0, r#"{"execute":"list_hostfwd"}"#);
    assert!(list.contains(r#""guest_addr":"10.0.2.100""#), "{list}");
    // slirp4netns's shape: `entries` at the top level, not under `return`.
    let v: serde_json::Value =
        serde_json::from_str(list.trim()).unwrap_or_else(|e| panic!("{e}: {list}"));
    assert!(v.get("return").is_none(), "{list}");
    assert_eq!(v["entries"][0]["id"], 1, "{list}");
    let got = eventually(secs(10), || {
        host_get(host_port).is_ok_and(|b| b == "from the guest")
    });
    assert!(
        got,
        "published port did not reach the guest: {:?}",
        host_get(host_port)
    );
    let reply = api(
        &sock.0,
        r#"{"execute":"remove_hostfwd","arguments":{"id":1}}"#,
    );
    assert_eq!(reply.trim(), r#"{"return":{}}"#);
    guest.signal(libc::SIGKILL);
    p.signal(libc::SIGTERM);
    let out = p.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!sock.0.exists(), "API socket file left behind");
}

/// Podman's restart: the new instance starts on the same `--api-socket`
/// path while the old one is still running or exiting. The old one must
/// not remove the new one's socket at exit; 50 hand-overs, alternating
/// "new instance ready before the old one is told to stop" (the old one
/// removing the path by name would always delete the new socket) and
/// "new instance started right after SIGTERM to the old one".
#[test]
fn api_socket_survives_a_restart_on_the_same_path() {
    if !require_userns("api_socket_survives_a_restart_on_the_same_path") {
        return;
    }
    let dns = DnsServer::start();
    // Two namespaces, used in turn: each instance has its own TAP.
    let targets = [Target::userns(), Target::userns()];
    let dir = TempDir::new("api-restart");
    let sock = dir.join("s4nn.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    // Every other pair of rounds in the sandbox, where the old instance
    // checks and removes the file through a directory descriptor.
    let start = |i: usize| {
        let pid = targets[i % 2].pid().to_string();
        let mut args = vec!["-c", "--api-socket", &sock_s, &pid, "tap0"];
        if i % 4 >= 2 {
            args.extend(["--enable-sandbox", "--enable-seccomp"]);
        }
        spawn_ready(slirp(&args, &dns), "slirp4netns --api-socket")
    };
    let mut cur = start(0);
    // Whether `cur` took the path over from a live instance.
    let mut cur_replaced = false;
    for i in 1..=50 {
        let replaced_first = i % 2 == 1;
        let mut old = cur;
        let next = if replaced_first {
            let next = start(i);
            old.signal(libc::SIGTERM);
            next
        } else {
            old.signal(libc::SIGTERM);
            start(i)
        };
        let old = old.finish(secs(10));
        assert_eq!(old.code(), Some(0), "round {i}: old instance: {old}");
        assert!(
            sock.exists(),
            "round {i}: the new instance's socket is gone"
        );
        let reply = api(&sock, r#"{"execute":"list_hostfwd"}"#);
        assert_eq!(reply.trim(), r#"{"entries":[]}"#, "round {i}");
        if replaced_first {
            assert_stderr_has(&old, "now names another socket");
        }
        if cur_replaced {
            assert_stderr_has(&old, "replacing the socket file");
        }
        cur = next;
        cur_replaced = replaced_first;
    }
    cur.signal(libc::SIGTERM);
    let out = cur.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!sock.exists(), "API socket file left behind");
}
