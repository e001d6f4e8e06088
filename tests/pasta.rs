//! pasta mode, end to end, with the exact command lines Podman 5/6 and
//! RootlessKit 2/3 send: rnet runs under the name `pasta` (a symlink), must
//! exit 0 once the namespace is ready with the server left in the
//! background, and must leave when the namespace goes away.
//!
//! Every rnet started here gets `RNET_OUTBOUND_ALLOW=none` and a loopback
//! `RNET_DNS_UPSTREAM`, and explicit addresses (`-a 10.0.2.100 -n 24 -g
//! 10.0.2.2`), so nothing leaves the machine: guests only talk to the DNS
//! forwarder (answered by the test's responder on 127.0.0.1), to addresses
//! mapped to the host's loopback, and to published ports.
//!
//! Each case runs twice: as root (Podman's case: inside a user namespace
//! where the caller is root) and as uid 65534 (an unprivileged user, the
//! way rootless Podman and RootlessKit really run).

mod common;
#[path = "common/compat.rs"]
mod s4;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use s4::*;

/// Pids of running processes started from the `pasta` symlink whose
/// arguments include `marker`.
fn our_pastas(marker: &str) -> Vec<u32> {
    let me = pasta_bin().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first() == Some(&me) && args.iter().any(|a| a.contains(marker)) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Podman's side: a process holding a user and a mount namespace (Podman's
/// pause process), a network namespace made inside them and bind-mounted to
/// a file (as Podman does under /run/user/UID/netns), and commands run as
/// Podman runs pasta and enters containers.
struct Pod {
    holder: Target,
    nobody: bool,
    netns: PathBuf,
    _dir: TempDir,
}

impl Pod {
    fn create(nobody: bool) -> Pod {
        let dir = TempDir::new("pasta");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let prefix: &[&str] = if nobody { NOBODY_PREFIX } else { &[] };
        let holder = Target::start_via(prefix, &["-Urm", "--propagation", "private"]);
        let netns = dir.join("netns-ctr");
        let pod = Pod {
            holder,
            nobody,
            netns,
            _dir: dir,
        };
        let script = format!(
            "touch {f} && mount --bind /proc/self/ns/net {f}",
            f = pod.netns.display()
        );
        run(
            &mut pod.enter(&["unshare", "-n", "sh", "-c", &script]),
            secs(10),
        )
        .assert_success("create and bind-mount the netns");
        pod
    }

    /// `prog ARGS` inside the holder's user and mount namespaces.
    fn enter(&self, argv: &[&str]) -> Command {
        let mut c = as_user("nsenter", self.nobody);
        c.args(["--preserve-credentials", "-U", "-m", "-t"])
            .arg(self.holder.pid().to_string())
            .args(argv);
        clean_env(&mut c);
        c
    }

    /// A command inside the container's network namespace.
    fn guest(&self, argv: &[&str]) -> Command {
        let ns = format!("--net={}", self.netns.display());
        let mut full = vec!["nsenter", ns.as_str()];
        full.extend_from_slice(argv);
        self.enter(&full)
    }

    /// Podman's `netns rm`: unmount, then delete the file.
    fn remove_netns(&self) {
        let script = format!("umount {f} && rm {f}", f = self.netns.display());
        run(&mut self.enter(&["sh", "-c", &script]), secs(10)).assert_success("remove the netns");
    }
}

/// The `setpriv` prefix that makes a command run as uid 65534.
const NOBODY_PREFIX: &[&str] = &[
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
];

/// A guest HTTP server on `port` that answers `port PORT from PEER_IP`,
/// printing "listening" once bound.
fn guest_peer_server(port: u16) -> Vec<String> {
    let script = format!(
        "import socket\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen(8); print('listening', flush=True)\n\
         while True:\n\
         \x20   c,a=s.accept(); c.recv(4096)\n\
         \x20   b=('port {port} from %s' % a[0]).encode()\n\
         \x20   c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(b) + b); c.close()\n"
    );
    vec![PYTHON.into(), "-c".into(), script]
}

fn podman_argv(test: &str, nobody: bool) {
    if !require_userns(test) {
        return;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let pod = Pod::create(nobody);
    // Container servers on 80, 82 and 83; the host publishes one port on
    // 127.0.0.1 and a range on every address, as `podman run -p` does.
    let hp = free_service_block(3);
    let mut servers = Vec::new();
    for port in [80u16, 82, 83] {
        let argv = guest_peer_server(port);
        let mut s = LineProc::spawn(&mut pod.guest(&strs(&argv)));
        s.wait_line("guest server", secs(20), |l| l == "listening");
        servers.push(s);
    }
    let netns = pod.netns.to_string_lossy().into_owned();
    let t1 = format!("127.0.0.1/{hp}-{hp}:80-80");
    let t2 = format!("{}-{}:82-83", hp + 1, hp + 2);
    // Podman's argv (libnetwork/pasta), plus the test's explicit addresses.
    let mut cmd = pod.enter(&[pasta_bin().to_str().unwrap()]);
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-t",
        &t1,
        "-t",
        &t2,
        "--dns-forward",
        "169.254.1.1",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--no-map-gw",
        "--quiet",
        "--netns",
        &netns,
        "--map-guest-addr",
        "169.254.1.2",
    ]);
    // Ready means exited 0 with the output pipes closed (run() reads them to
    // the end), the server left behind.
    let out = run(&mut cmd, secs(20));
    assert_eq!(out.code(), Some(0), "pasta did not start: {out}");
    assert!(
        out.elapsed < secs(10),
        "pasta's parent took {:?}",
        out.elapsed
    );
    let bg = our_pastas(&netns);
    assert!(!bg.is_empty(), "no pasta left in the background: {out}");

    // What Podman reads from inside once pasta has exited.
    let addrs = run(
        &mut pod.guest(&["ip", "-o", "-4", "addr", "show"]),
        secs(10),
    );
    assert!(addrs.stdout.contains("inet 10.0.2.100/24"), "{addrs}");
    let routes = run(&mut pod.guest(&["ip", "-4", "route"]), secs(10));
    assert!(routes.stdout.contains("default via 10.0.2.2"), "{routes}");

    // DNS through --dns-forward, answered by the test's responder.
    let before = dns.queries();
    let dig = run(
        &mut pod.guest(&[
            "dig",
            "+short",
            "+time=3",
            "+tries=2",
            "@169.254.1.1",
            "db.example.test",
        ]),
        secs(20),
    );
    assert_eq!(dig.stdout.trim(), DNS_ANSWER.to_string(), "{dig}");
    assert!(dns.queries().0 > before.0, "the responder saw no query");

    // host.containers.internal (169.254.1.2) reaches the host's server on
    // 127.0.0.1; the gateway does not (--no-map-gw).
    let url = format!("http://169.254.1.2:{}/", http.port());
    let c = run(&mut pod.guest(&strs(&curl(&url))), secs(20));
    c.assert_success("curl host.containers.internal");
    assert_eq!(c.stdout, HTTP_BODY);
    let gw = format!("http://10.0.2.2:{}/", http.port());
    run(&mut pod.guest(&strs(&curl(&gw))), secs(20))
        .assert_failure("curl via the unmapped gateway");

    // Each published port from the host. The container sees the client's
    // address kept (a loopback client appears as the gateway), unlike
    // pasta, which shows 127.0.0.1.
    for (host, guest) in [(hp, 80), (hp + 1, 82), (hp + 2, 83)] {
        let body = host_get(host).unwrap_or_else(|e| panic!("host port {host}: {e}"));
        assert_eq!(
            body,
            format!("port {guest} from 10.0.2.2"),
            "host port {host}"
        );
    }

    // Podman's clean-up is removing the file; pasta must notice and leave.
    drop(servers);
    pod.remove_netns();
    assert!(
        eventually(secs(10), || our_pastas(&netns).is_empty()),
        "pasta still running after the netns file was removed: {:?}",
        our_pastas(&netns)
    );
}

#[test]
fn podman_argv_root_in_userns() {
    podman_argv("podman_argv_root_in_userns", false);
}

#[test]
fn podman_argv_as_nobody() {
    podman_argv("podman_argv_as_nobody", true);
}

/// RootlessKit's exact argv (pkg/network/pasta) with `auto` ports, for a
/// target given as `PID` or as `--userns=/proc/PID/ns/user --netns=PATH`.
fn rootlesskit_argv(test: &str, nobody: bool, by_path: bool) {
    if !require_userns(test) {
        return;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return;
    }
    let dns = DnsServer::start();
    let prefix: &[&str] = if nobody { NOBODY_PREFIX } else { &[] };
    let t = Target::start_via(prefix, &["-Urn"]);
    let pid = t.pid().to_string();
    let userns = format!("--userns=/proc/{pid}/ns/user");
    let netns = format!("--netns=/proc/{pid}/ns/net");
    let mut cmd = as_user(pasta_bin().to_str().unwrap(), nobody);
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "--stderr",
        "--ns-ifname=tap0",
        "--mtu=65520",
        "--config-net",
        "--address=10.0.2.100",
        "--netmask=24",
        "--gateway=10.0.2.2",
        "--dns-forward=10.0.2.3",
        "--no-map-gw",
        "--tcp-ports=auto",
        "--udp-ports=auto",
    ]);
    let marker = if by_path {
        cmd.args([&userns, &netns]);
        netns.clone()
    } else {
        cmd.arg(&pid);
        pid.clone()
    };
    let out = run(&mut cmd, secs(20));
    assert_eq!(out.code(), Some(0), "pasta did not start: {out}");
    assert!(
        !our_pastas(&marker).is_empty(),
        "no pasta in the background: {out}"
    );
    // Root inside the target's user namespace sees every rnet process that
    // joined it and may try to trace one: each must refuse.
    let inside = pastas_in_netns_of(t.pid());
    assert!(!inside.is_empty(), "no rnet process in the namespace");
    // The probe works: the guest's own process can be traced.
    let own = guest_ptrace(&mut guest_root(&t), t.pid());
    assert_eq!(
        own, "ok",
        "the probe could not trace the guest's own process"
    );
    for p in &inside {
        let got = guest_ptrace(&mut guest_root(&t), *p);
        // ESRCH: a short-lived helper that has exited since.
        let refused = got == "EPERM" || (got == "ESRCH" && !alive(*p));
        assert!(refused, "root in the guest traced rnet's pid {p}: {got}");
    }
    if by_path {
        // The `--netns` anchor: in the namespace, but in the host's mount
        // namespace (it looks at the path), so it must hold next to nothing.
        let anchor = anchor_of(&our_pastas(&marker), t.pid())
            .unwrap_or_else(|| panic!("no --netns anchor among {:?}", our_pastas(&marker)));
        assert!(
            inside.contains(&anchor),
            "the anchor is not in the namespace"
        );
        assert_eq!(status_field(anchor, "Seccomp"), "2", "anchor {anchor}");
        assert_eq!(status_field(anchor, "NoNewPrivs"), "1", "anchor {anchor}");
        // CAP_SYS_PTRACE (inside the guest's user namespace) only.
        assert_eq!(
            status_field(anchor, "CapEff"),
            "0000000000080000",
            "anchor {anchor}"
        );
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{anchor}/fd"))
            .expect("the anchor's descriptors")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            fds.iter().all(|f| ["0", "1", "2"].contains(&f.as_str())),
            "the anchor holds descriptors {fds:?}"
        );
    }
    // RootlessKit assumes tap0 is configured as given once pasta exited 0.
    let link = run(&mut t.exec(&["ip", "-o", "link", "show", "tap0"]), secs(10));
    assert!(link.stdout.contains("mtu 65520"), "{link}");
    assert!(link.stdout.contains("UP"), "{link}");
    let addr = run(
        &mut t.exec(&["ip", "-o", "-4", "addr", "show", "tap0"]),
        secs(10),
    );
    assert!(addr.stdout.contains("10.0.2.100/24"), "{addr}");
    let dig = run(
        &mut t.exec(&[
            "dig",
            "+short",
            "+time=3",
            "+tries=2",
            "@10.0.2.3",
            "rk.example.test",
        ]),
        secs(20),
    );
    assert_eq!(dig.stdout.trim(), DNS_ANSWER.to_string(), "{dig}");
    // `auto`: a listener that appears inside is published on the same host port.
    let port = free_service_block(1);
    let argv = guest_http_server(port, "auto published");
    let mut server = LineProc::spawn(&mut t.exec(&strs(&argv)));
    server.wait_line("guest server", secs(20), |l| l == "listening");
    let mut last = String::new();
    let ok = eventually(secs(10), || match host_get(port) {
        Ok(b) => b == "auto published",
        Err(e) => {
            last = e;
            false
        }
    });
    assert!(ok, "auto-published port {port} never answered: {last}");
    drop(server);
    // The target going away ends pasta.
    drop(t);
    assert!(
        eventually(secs(10), || our_pastas(&marker).is_empty()),
        "pasta still running after its target exited"
    );
}

#[test]
fn rootlesskit_argv_pid() {
    rootlesskit_argv("rootlesskit_argv_pid", false, false);
}

#[test]
fn rootlesskit_argv_netns_path() {
    rootlesskit_argv("rootlesskit_argv_netns_path", false, true);
}

#[test]
fn rootlesskit_argv_pid_as_nobody() {
    rootlesskit_argv("rootlesskit_argv_pid_as_nobody", true, false);
}

#[test]
fn rootlesskit_argv_netns_path_as_nobody() {
    rootlesskit_argv("rootlesskit_argv_netns_path_as_nobody", true, true);
}

#[test]
fn command_line_texts_and_failures() {
    let dns = DnsServer::start();
    let pasta = |args: &[&str]| {
        let mut c = Command::new(pasta_bin());
        c.args(args);
        policy_env(&mut c, ALLOW_NONE, &dns);
        run(&mut c, secs(10))
    };
    // Podman probes for --map-guest-addr by this exact text.
    for (args, text) in [
        (
            vec!["--map-guest-adr", "169.254.1.2"],
            "pasta: unrecognized option '--map-guest-adr'",
        ),
        (vec!["--bogus"], "unrecognized option '--bogus'"),
        (vec!["-x"], "invalid option -- 'x'"),
        (vec!["-t"], "option requires an argument -- 't'"),
        (vec!["-t", "80-70"], "ends before it starts"),
        (
            vec![
                "-a",
                "10.0.2.100",
                "-n",
                "24",
                "-g",
                "10.0.2.2",
                "-U",
                "auto",
                "-U",
                "5353",
                "1",
            ],
            "-U auto cannot be combined with other -U port specs",
        ),
        (
            vec![
                "-a",
                "10.0.2.100",
                "-n",
                "24",
                "-g",
                "10.0.2.2",
                "-T",
                "127.0.0.1%lo/5432",
                "1",
            ],
            "-T: an interface (%lo) cannot be given",
        ),
        (
            vec![
                "-a",
                "10.0.2.100",
                "-n",
                "24",
                "-g",
                "10.0.2.2",
                "-t",
                "127.0.0.1%nosuchif0/5432",
                "1",
            ],
            "no network interface \"nosuchif0\"",
        ),
        (
            vec![
                "-a",
                "10.0.2.100",
                "-n",
                "24",
                "-g",
                "10.0.2.2",
                "--netns",
                "/nonexistent/rnet-netns",
            ],
            "/nonexistent/rnet-netns",
        ),
    ] {
        let out = pasta(&args);
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(text), "{args:?}: want {text:?}: {out}");
    }
    let out = pasta(&["--help"]);
    out.assert_success("--help");
    for probe in [
        "--map-guest-addr",
        "--dns-forward",
        "--netns",
        "--config-net",
        "-t, --tcp-ports",
    ] {
        assert!(out.stdout.contains(probe), "--help lacks {probe}: {out}");
    }
    let out = pasta(&["--version"]);
    out.assert_success("--version");
    assert!(out.stdout.starts_with("pasta "), "{out}");
    // The subcommand form.
    let mut c = Command::new(RNET);
    c.args(["pasta", "--version"]);
    let out = run(&mut c, secs(10));
    out.assert_success("rnet pasta --version");
    assert!(out.stdout.starts_with("pasta "), "{out}");
}

/// `pasta [OPTIONS] COMMAND...`: new namespaces running the command, pasta
/// in front, its exit status passed on.
fn command_shape(test: &str, nobody: bool) {
    if !require_userns(test) {
        return;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return;
    }
    let dns = DnsServer::start();
    let mut cmd = as_user(pasta_bin().to_str().unwrap(), nobody);
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-I",
        "tap0",
        "--",
        "sh",
        "-c",
        "ip -o -4 addr show tap0; dig +short +time=3 +tries=2 @10.0.2.3 cmd.example.test; exit 7",
    ]);
    let out = run(&mut cmd, secs(30));
    assert_eq!(out.code(), Some(7), "{out}");
    assert!(out.stdout.contains("10.0.2.100/24"), "{out}");
    assert!(out.stdout.contains(&DNS_ANSWER.to_string()), "{out}");
}

#[test]
fn command_shape_root() {
    command_shape("command_shape_root", false);
}

#[test]
fn command_shape_as_nobody() {
    command_shape("command_shape_as_nobody", true);
}

/// `-T NS_PORT:HOST_PORT`: the namespace's 127.0.0.1:NS_PORT reaches the
/// host's 127.0.0.1:HOST_PORT.
fn tcp_ns(test: &str, nobody: bool) {
    if !require_userns(test) {
        return;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let prefix: &[&str] = if nobody { NOBODY_PREFIX } else { &[] };
    let t = Target::start_via(prefix, &["-Urn"]);
    let pid = t.pid().to_string();
    let spec = format!("5432,8080:{}", http.port());
    let echo = UdpEcho::start();
    let uspec = format!("5353:{}", echo.addr.port());
    let mut cmd = as_user(pasta_bin().to_str().unwrap(), nobody);
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-I",
        "tap0",
        "--no-map-gw",
        "-T",
        &spec,
        "-U",
        &uspec,
        &pid,
    ]);
    let out = run(&mut cmd, secs(20));
    assert_eq!(out.code(), Some(0), "pasta did not start: {out}");
    // -U: a datagram to the namespace's 127.0.0.1:5353 reaches the host's
    // UDP echo, and the echo comes back to the sender.
    let probe = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                 s.settimeout(5); s.sendto(b'rnet-U', ('127.0.0.1', 5353)); \
                 print(s.recvfrom(100)[0].decode())";
    let u = run(&mut t.exec(&[PYTHON, "-c", probe]), secs(20));
    u.assert_success("a datagram to the namespace's 127.0.0.1:5353 (-U)");
    assert_eq!(u.stdout.trim(), "rnet-U", "{u}");
    assert!(echo.datagrams.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let c = run(
        &mut t.exec(&strs(&curl("http://127.0.0.1:8080/"))),
        secs(20),
    );
    c.assert_success("curl the namespace's 127.0.0.1:8080");
    assert_eq!(c.stdout, HTTP_BODY);
    assert!(http.hits() >= 1);
    // Nothing listens on the host's 5432: the connection is accepted and closed.
    let c = run(
        &mut t.exec(&strs(&curl("http://127.0.0.1:5432/"))),
        secs(20),
    );
    c.assert_failure("curl a -T port with no host server");
    drop(t);
    assert!(
        eventually(secs(10), || our_pastas(&pid).is_empty()),
        "pasta still running after its target exited"
    );
}

#[test]
fn tcp_ns_root() {
    tcp_ns("tcp_ns_root", false);
}

#[test]
fn tcp_ns_as_nobody() {
    tcp_ns("tcp_ns_as_nobody", true);
}

#[test]
fn foreground_and_pid_file() {
    if !require_userns("foreground_and_pid_file") {
        return;
    }
    let dns = DnsServer::start();
    let dir = TempDir::new("pasta-pid");
    let pid_file = dir.join("pasta.pid");
    let hp = free_service_block(1);
    let t = Target::userns();
    let mut cmd = Command::new(pasta_bin());
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "-f",
        "-P",
        pid_file.to_str().unwrap(),
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-I",
        "tap0",
        "-t",
        &format!("127.0.0.1/{hp}:80"),
    ])
    .arg(t.pid().to_string());
    let mut p = Proc::spawn(&mut cmd);
    // In front there is no ready signal; the published port listening is
    // the last visible step of the set-up (the address comes earlier).
    let listening = eventually(secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", hp)).is_ok()
    });
    assert!(listening, "the published port never listened");
    let a = run(&mut t.exec(&["ip", "-o", "-4", "addr", "show"]), secs(10));
    assert!(a.stdout.contains("10.0.2.100/24"), "{a}");
    // In front: the process we started is the server, and the pid file names it.
    assert!(p.wait_timeout(secs(0)).is_none(), "-f returned");
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), p.pid().to_string());
    drop(t);
    let out = p.finish(secs(10));
    assert_eq!(out.code(), Some(0), "{out}");
}

/// Starts pasta on a fresh `unshare -Urn` target with `extra` options and
/// the gateway mapped to the host's loopback; returns the target.
fn pasta_with(dns: &DnsServer, extra: &[&str]) -> Target {
    let t = Target::userns();
    let pid = t.pid().to_string();
    let mut cmd = Command::new(pasta_bin());
    policy_env(&mut cmd, ALLOW_NONE, dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-I",
        "tap0",
    ])
    .args(extra)
    .arg(&pid);
    let out = run(&mut cmd, secs(20));
    assert_eq!(out.code(), Some(0), "pasta {extra:?} did not start: {out}");
    t
}

/// What the guest gets of TCP (curl to the host's loopback through the
/// gateway), UDP (a DNS answer through 10.0.2.3) and ICMP (ping of the
/// gateway).
fn services_seen(t: &Target, http: &HttpServer) -> (bool, bool, bool) {
    let url = format!("http://{GATEWAY}:{}/", http.port());
    let tcp = run(&mut t.exec(&strs(&curl(&url))), secs(20));
    let dig = run(
        &mut t.exec(&[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@10.0.2.3",
            "svc.example.test",
        ]),
        secs(20),
    );
    let ping = run(
        &mut t.exec(&["ping", "-c", "1", "-W", "2", GATEWAY]),
        secs(20),
    );
    (
        tcp.status.success() && tcp.stdout == HTTP_BODY,
        dig.stdout.trim() == DNS_ANSWER.to_string(),
        ping.status.success(),
    )
}

#[test]
fn no_tcp_udp_icmp_turn_services_off() {
    if !require_userns("no_tcp_udp_icmp_turn_services_off") {
        return;
    }
    let dns = DnsServer::start();
    let http = HttpServer::start();
    let t = pasta_with(&dns, &[]);
    assert_eq!(services_seen(&t, &http), (true, true, true), "all on");
    drop(t);
    let t = pasta_with(&dns, &["--no-tcp", "--no-icmp"]);
    assert_eq!(
        services_seen(&t, &http),
        (false, true, false),
        "--no-tcp --no-icmp: only UDP is left"
    );
    drop(t);
    let t = pasta_with(&dns, &["--no-udp"]);
    assert_eq!(
        services_seen(&t, &http),
        (true, false, true),
        "--no-udp: DNS over UDP is gone, TCP and ICMP stay"
    );
}

/// Processes started from the `pasta` symlink (their name) that are in the
/// network namespace of `pid`.
fn pastas_in_netns_of(pid: u32) -> Vec<u32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let named = status.lines().next() == Some("Name:\tpasta");
        if named && std::fs::read_link(format!("/proc/{p}/ns/net")).ok() == Some(ns.clone()) {
            out.push(p);
        }
    }
    out
}

/// A command prefix that runs as root (uid 0) of `t`'s user namespace,
/// with every capability there, in its network namespace: the guest's
/// strongest process.
fn guest_root(t: &Target) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-U", "-n", "-t"]).arg(t.pid().to_string());
    clean_env(&mut c);
    c
}

/// What `PTRACE_SEIZE` of `pid` gives a process started by `guest` (a
/// command prefix that enters the guest's namespaces as its root): "ok", or
/// the errno's name.
fn guest_ptrace(guest: &mut Command, pid: u32) -> String {
    const SEIZE: &str = "import ctypes, errno, sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        r = libc.ptrace(0x4206, int(sys.argv[1]), None, None)\n\
        print('ok' if r == 0 else errno.errorcode[ctypes.get_errno()])\n";
    let out = run(
        guest.args(["python3", "-c", SEIZE, &pid.to_string()]),
        secs(10),
    );
    out.assert_success("the guest's ptrace probe");
    out.stdout.trim().to_string()
}

/// The `--netns` anchor among `pastas`: the process that joined the network
/// namespace of `pid` while keeping the test's own mount namespace.
fn anchor_of(pastas: &[u32], pid: u32) -> Option<u32> {
    let link = |p: String| std::fs::read_link(p).ok();
    let net = link(format!("/proc/{pid}/ns/net"))?;
    let mnt = link("/proc/self/ns/mnt".into())?;
    pastas.iter().copied().find(|p| {
        link(format!("/proc/{p}/ns/net")).as_ref() == Some(&net)
            && link(format!("/proc/{p}/ns/mnt")).as_ref() == Some(&mnt)
    })
}

/// One field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A UDP echo on the host's 127.0.0.1:`port`.
fn udp_echo_on(port: u16) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let echo = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((n, peer)) = echo.recv_from(&mut b) {
            let _ = echo.send_to(&b[..n], peer);
        }
    });
    s
}

/// `-t 127.0.0.1%lo/PORT` is published (and bound to lo); `-T auto -U
/// auto`: host servers started after rnet are reached from the
/// namespace's 127.0.0.1 on the same port within seconds; every rnet
/// process inside the namespace is confined.
fn ns_auto(test: &str, nobody: bool) {
    if !require_userns(test) {
        return;
    }
    if nobody && !is_root() {
        eprintln!("SKIP {test}: needs root to become uid 65534");
        assert!(!in_ci(), "{test}: CI runs the tests as root");
        return;
    }
    let dns = DnsServer::start();
    let prefix: &[&str] = if nobody { NOBODY_PREFIX } else { &[] };
    let t = Target::start_via(prefix, &["-Urn"]);
    let pid = t.pid().to_string();
    let pub_port = free_service_block(1);
    let published = format!("127.0.0.1%lo/{pub_port}");
    let mut cmd = as_user(pasta_bin().to_str().unwrap(), nobody);
    policy_env(&mut cmd, ALLOW_NONE, &dns);
    cmd.args([
        "--config-net",
        "-a",
        "10.0.2.100",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "--no-map-gw",
        "-t",
        &published,
        "-T",
        "auto",
        "-U",
        "auto",
        &pid,
    ]);
    let out = run(&mut cmd, secs(20));
    assert_eq!(out.code(), Some(0), "pasta did not start: {out}");
    // `-t 127.0.0.1%lo/PORT`: bound to lo, and left out of `-T auto` (else
    // the namespace's 127.0.0.1:PORT would be taken before the guest
    // server binds it).
    let argv = guest_http_server(pub_port, "bound to lo");
    let mut server = LineProc::spawn(&mut t.exec(&strs(&argv)));
    server.wait_line("guest server", secs(20), |l| l == "listening");
    let mut last = String::new();
    let ok = eventually(secs(10), || match host_get(pub_port) {
        Ok(b) => b == "bound to lo",
        Err(e) => {
            last = e;
            false
        }
    });
    assert!(ok, "-t 127.0.0.1%lo/{pub_port} never answered: {last}");
    let filter = format!("sport = :{pub_port}");
    let ss = run(Command::new("ss").args(["-Hltn", &filter]), secs(10));
    assert!(
        ss.stdout.contains(&format!("127.0.0.1%lo:{pub_port}")),
        "the host listener is not bound to lo: {ss}"
    );
    drop(server);
    // Servers that start after rnet.
    let port = free_service_block(2);
    let http = HttpServer::on(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let _echo = udp_echo_on(port + 1);
    let url = format!("http://127.0.0.1:{port}/");
    let ok = eventually(secs(10), || {
        let c = run(&mut t.exec(&strs(&curl(&url))), secs(10));
        last = c.to_string();
        c.code() == Some(0) && c.stdout == HTTP_BODY
    });
    assert!(ok, "-T auto: {url} never answered inside: {last}");
    assert!(http.hits() >= 1);
    let probe = format!(
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.settimeout(0.5); s.sendto(b'rnet-U-auto', ('127.0.0.1', {})); \
         print(s.recvfrom(100)[0].decode())",
        port + 1
    );
    let ok = eventually(secs(10), || {
        let u = run(&mut t.exec(&[PYTHON, "-c", &probe]), secs(10));
        last = u.to_string();
        u.code() == Some(0) && u.stdout.trim() == "rnet-U-auto"
    });
    assert!(
        ok,
        "-U auto: no echo from the host's port {}: {last}",
        port + 1
    );
    // Every rnet process in the namespace: seccomp filter, no_new_privs,
    // at most CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, an empty root; the
    // socket opener among them with CAP_NET_BIND_SERVICE alone.
    let inside = pastas_in_netns_of(t.pid());
    assert!(!inside.is_empty(), "no rnet process in the namespace");
    // The probe works: the guest's own process can be traced.
    let own = guest_ptrace(&mut guest_root(&t), t.pid());
    assert_eq!(
        own, "ok",
        "the probe could not trace the guest's own process"
    );
    let allowed: u64 = (1 << 12) | (1 << 10);
    let mut opener = false;
    for p in &inside {
        assert_eq!(status_field(*p, "Seccomp"), "2", "pid {p}");
        assert_eq!(status_field(*p, "NoNewPrivs"), "1", "pid {p}");
        let caps = u64::from_str_radix(&status_field(*p, "CapEff"), 16).unwrap();
        assert_eq!(caps & !allowed, 0, "pid {p}: CapEff {caps:x}");
        opener |= caps == 1 << 10;
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{p}/root"))
            .unwrap()
            .collect();
        assert!(root.is_empty(), "pid {p}: root not empty: {root:?}");
    }
    assert!(opener, "no socket opener among {inside:?}");
    drop(t);
    assert!(
        eventually(secs(10), || our_pastas(&pid).is_empty()),
        "pasta still running after its target exited"
    );
}

#[test]
fn ns_auto_root() {
    ns_auto("ns_auto_root", false);
}

#[test]
fn ns_auto_as_nobody() {
    ns_auto("ns_auto_as_nobody", true);
}
