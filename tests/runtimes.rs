//! Real container runtimes over rnet, as an unprivileged user with
//! subordinate id ranges: rootless Podman (rnet as its `slirp4netns`, both
//! port handlers, DNS, 20 restarts, nothing left behind) and rootless Docker
//! (`dockerd-rootless.sh` with RootlessKit's slirp4netns network, both port
//! drivers; Debian's script always disables the host loopback, so the
//! container's refusal at 10.0.2.2 and its DNS are what is checked there)
//! and rootless containerd as a node runtime (inside RootlessKit with rnet
//! as its network, a container on a CNI bridge + portmap network in the
//! node, reached through a port rnet publishes).
//!
//! Podman's `--network pasta` is not run here: Debian's Podman 4.3 is
//! built without pasta networking (it takes `--network pasta` for the name
//! of a bridge network), so pasta mode is shown with the exact command
//! lines Podman 5/6 send, in tests/pasta.rs.
//!
//! Creating the user needs root, so these run where the tests run as root
//! (CI does); elsewhere they skip with the reason. Images are imported
//! from a local rootfs (Debian's static busybox and a static UDP echo built
//! here), never pulled. Every rnet started by a runtime gets the test
//! policy through `RNET_OUTBOUND_ALLOW=none` and `RNET_DNS_UPSTREAM` at a
//! loopback responder, which the runtimes pass on in the environment.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const USER: &str = "rnet-rt";
const IMAGE: &str = "localhost/rnet-busybox";
const DOCKER_IMAGE: &str = "rnet-busybox:local";
const PAGE: &str = "hello from the container\n";

/// Runtimes share one user's storage and are heavy on a small machine:
/// one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The unprivileged user, its directories, the rnet copy and the image.
struct Env {
    uid: u32,
    home: PathBuf,
    run: PathBuf,
    bin: PathBuf,
    rootfs_tar: PathBuf,
    dns: Arc<DnsServer>,
}

fn sh(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd, Duration::from_secs(120));
    out.assert_success(what);
    out
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        if Command::new("id").arg(USER).stdout(Stdio::null()).status().is_ok_and(|s| !s.success())
        {
            sh(
                Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/bin/sh", USER]),
                "useradd",
            );
        }
        let id = sh(Command::new("id").args(["-u", USER]), "id -u");
        let uid: u32 = id.stdout.trim().parse().expect("uid");
        // Subordinate ranges for newuidmap/newgidmap, added once.
        for f in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            if !text.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
                let mut t = text;
                if !t.is_empty() && !t.ends_with('\n') {
                    t.push('\n');
                }
                t.push_str(&format!("{USER}:300000:65536\n"));
                std::fs::write(f, t).unwrap();
            }
        }
        // Directories of earlier test processes that are gone.
        for d in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("rnet-rt-").and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
        let base = std::env::temp_dir().join(format!("rnet-rt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let home = base.join("home");
        let run_dir = base.join("run");
        let bin = base.join("bin");
        for d in [&base, &home, &run_dir, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        install_executable(Path::new(RNET), &bin.join("rnet"));
        std::os::unix::fs::symlink("rnet", bin.join("slirp4netns")).unwrap();

        // Podman: rnet as slirp4netns, storage and cgroups that work
        // without systemd or fuse.
        let cfg = home.join(".config/containers");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(
            cfg.join("containers.conf"),
            format!(
                "[engine]\nnetwork_cmd_path = \"{}\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n[containers]\nnetns = \"slirp4netns\"\n",
                bin.join("slirp4netns").display()
            ),
        )
        .unwrap();
        std::fs::write(cfg.join("storage.conf"), "[storage]\ndriver = \"vfs\"\n").unwrap();

        // The image: busybox (static) with a web root, and a static UDP
        // echo server built from tests/guest/udp_echo_static.rs.
        let root = base.join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("www")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "wget", "nslookup", "httpd", "sleep", "cat", "ip"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), PAGE).unwrap();
        sh(
            Command::new("rustc")
                .args(["-O", "-C", "target-feature=+crt-static", "-o"])
                .arg(root.join("bin/udp_echo"))
                .arg(guest_script("udp_echo_static.rs")),
            "building the static UDP echo",
        );
        let rootfs_tar = base.join("rootfs.tar");
        sh(
            Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&rootfs_tar).arg("."),
            "tar the rootfs",
        );
        sh(
            Command::new("chown").arg("-R").arg(format!("{USER}:")).arg(&base),
            "chown",
        );
        Env {
            uid,
            home,
            run: run_dir,
            bin,
            rootfs_tar,
            dns: Arc::new(DnsServer::start()),
        }
    })
}

impl Env {
    /// `COMMAND ARGS` as the user, with the test policy for rnet.
    fn as_user(&self, prog: &str, args: &[&str]) -> Command {
        self.as_user_with(&[], prog, args)
    }

    /// Like [`Env::as_user`], with extra `NAME=VALUE` environment.
    fn as_user_with(&self, extra: &[String], prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", USER, "--regid", USER, "--init-groups", "--"])
            .arg("env")
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.run.display()))
            .arg(format!(
                "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                self.bin.display()
            ))
            .arg("RNET_OUTBOUND_ALLOW=none")
            .arg(format!("RNET_DNS_UPSTREAM={}", self.dns.addr))
            .args(extra)
            .arg(prog)
            .args(args)
            .current_dir(&self.home)
            .stdin(Stdio::null());
        clean_env(&mut c);
        c
    }

    fn podman(&self, args: &[&str]) -> Output {
        run(&mut self.as_user("podman", args), Duration::from_secs(120))
    }

    /// Ends podman's per-user pause process (it holds the user namespace
    /// between commands), by the pid podman recorded.
    fn stop_podman_pause(&self) {
        let f = self.run.join("libpod/tmp/pause.pid");
        if let Some(pid) = std::fs::read_to_string(&f)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory preconditions; the pid is the pause
            // process this test's podman commands started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// rnet processes of the user that still run (zombies waiting for
    /// their parent to reap them are not running).
    fn live_rnets(&self) -> Vec<String> {
        let exe = self.bin.join("rnet");
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let uid_ok = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .is_some_and(|u| u == self.uid.to_string());
            let zombie = status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'));
            let is_rnet = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe);
            if uid_ok && is_rnet && !zombie {
                found.push(format!(
                    "{pid}: {}",
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ")
                ));
            }
        }
        found
    }

    /// Socket files under the user's runtime directory.
    fn sockets(&self) -> Vec<PathBuf> {
        let out = run(
            Command::new("find").arg(&self.run).args(["-type", "s"]),
            Duration::from_secs(20),
        );
        out.stdout.lines().map(PathBuf::from).collect()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Polls GET / on a published port until it answers (the runtime's own
/// readiness is "container started", not "server listening").
fn page_at(port: u16, limit: Duration) -> Option<String> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    poll_until(limit, || http_get(addr).ok().map(|(body, _)| body)).map(|(b, _)| b)
}

fn udp_echo_at(port: u16, limit: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    poll_until(limit, || {
        s.send_to(b"rnet-udp", ("127.0.0.1", port)).ok()?;
        let (n, _) = s.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
    .map(|(v, _)| v)
}

fn require_runtime(test: &str, prog: &str) -> bool {
    require_root(test)
        && require_program(test, prog)
        && require_program(test, "newuidmap")
        && require_program(test, "rustc")
        && require_path(test, "/bin/busybox", "busybox-static")
}

fn import_podman_image(e: &Env) {
    let tar = e.rootfs_tar.to_string_lossy().into_owned();
    let out = e.podman(&["import", &tar, IMAGE]);
    out.assert_success("podman import");
}

#[test]
fn podman_rootless_over_rnet() {
    if !require_runtime("podman_rootless_over_rnet", "podman") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let e = env();
    import_podman_image(e);
    let srv = HttpServer::start();

    // The host's loopback through 10.0.2.2 when allowed.
    let url = format!("http://10.0.2.2:{}/", srv.port());
    let out = e.podman(&[
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "slirp4netns:allow_host_loopback=true",
        IMAGE,
        "wget",
        "-qO-",
        &url,
    ]);
    out.assert_success("container reaching the host's loopback");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    // DNS through 10.0.2.3, answered by the test's loopback responder.
    let before = e.dns.queries();
    let out = e.podman(&[
        "run",
        "--rm",
        "--pull=never",
        IMAGE,
        "nslookup",
        "node.example",
        "10.0.2.3",
    ]);
    out.assert_success("nslookup through 10.0.2.3");
    assert!(out.stdout.contains(&DNS_ANSWER.to_string()), "{out}");
    assert!(
        e.dns.queries() != before,
        "the query did not reach the upstream"
    );

    // -p with both port handlers, TCP and UDP.
    for handler in ["rootlesskit", "slirp4netns"] {
        let (tp, up) = (free_port(), free_port());
        let name = format!("rnet-web-{handler}");
        let network = format!("slirp4netns:port_handler={handler}");
        let tcp = format!("127.0.0.1:{tp}:80");
        let udp = format!("127.0.0.1:{up}:9000/udp");
        let out = e.podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--pull=never",
            "--network",
            &network,
            "-p",
            &tcp,
            "-p",
            &udp,
            IMAGE,
            "sh",
            "-c",
            "udp_echo 9000 & exec httpd -f -p 80 -h /www",
        ]);
        out.assert_success("podman run -d with ports");
        assert_eq!(
            page_at(tp, Duration::from_secs(30)).as_deref(),
            Some(PAGE),
            "TCP through port_handler={handler}"
        );
        assert_eq!(
            udp_echo_at(up, Duration::from_secs(30)).as_deref(),
            Some(&b"rnet-udp"[..]),
            "UDP through port_handler={handler}"
        );
        e.podman(&["rm", "-f", "-t", "0", &name])
            .assert_success("podman rm");
    }
    e.stop_podman_pause();
    println!("podman network cases took {:?}", t0.elapsed());
}

#[test]
fn podman_restart_20_times_with_the_slirp4netns_port_handler() {
    if !require_runtime(
        "podman_restart_20_times_with_the_slirp4netns_port_handler",
        "podman",
    ) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let e = env();
    import_podman_image(e);
    let sockets_before = e.sockets();
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let name = "rnet-restarts";
    let out = e.podman(&[
        "run",
        "-d",
        "--name",
        name,
        "--pull=never",
        "--network",
        "slirp4netns:port_handler=slirp4netns",
        "-p",
        &publish,
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    out.assert_success("podman run -d");
    assert_eq!(
        page_at(port, Duration::from_secs(30)).as_deref(),
        Some(PAGE)
    );
    for i in 1..=20 {
        let out = e.podman(&["restart", "-t", "0", name]);
        assert!(out.status.success(), "podman restart #{i} failed: {out}");
        assert_eq!(
            page_at(port, Duration::from_secs(30)).as_deref(),
            Some(PAGE),
            "the published port after restart #{i}"
        );
    }
    e.podman(&["rm", "-f", "-t", "0", name])
        .assert_success("podman rm");
    // Nothing of rnet's is left: no process, no socket file.
    let left = poll_until(Duration::from_secs(10), || {
        let l = e.live_rnets();
        l.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "rnet still running after podman rm: {:?}",
        e.live_rnets()
    );
    let new: Vec<_> = e
        .sockets()
        .into_iter()
        .filter(|s| !sockets_before.contains(s))
        .collect();
    assert!(new.is_empty(), "socket files left after podman rm: {new:?}");
    e.stop_podman_pause();
    println!("20 restarts took {:?}", t0.elapsed());
}

/// `dockerd-rootless.sh` under the user, RootlessKit with rnet as its
/// slirp4netns; stopped (SIGTERM to RootlessKit, by pid) on drop.
struct Dockerd {
    proc: Option<Proc>,
    sock: String,
}

impl Dockerd {
    fn start(e: &Env, port_driver: &str) -> Dockerd {
        let data = e.run.join(format!("docker-{port_driver}"));
        let sock = format!("unix://{}/docker-{port_driver}.sock", e.run.display());
        let data_s = data.to_string_lossy().into_owned();
        let extra = [
            "DOCKERD_ROOTLESS_ROOTLESSKIT_NET=slirp4netns".to_string(),
            format!("DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER={port_driver}"),
            "DOCKERD_ROOTLESS_ROOTLESSKIT_DISABLE_HOST_LOOPBACK=false".to_string(),
        ];
        let mut c = e.as_user_with(
            &extra,
            "/usr/share/docker.io/contrib/dockerd-rootless.sh",
            &[
                "--storage-driver",
                "vfs",
                "--data-root",
                &data_s,
                "-H",
                &sock,
            ],
        );
        let proc = Proc::spawn(&mut c);
        let d = Dockerd {
            proc: Some(proc),
            sock,
        };
        let up = poll_until(Duration::from_secs(90), || {
            std::thread::sleep(Duration::from_millis(200));
            d.docker(e, &["info", "--format", "{{.ServerVersion}}"])
                .status
                .success()
                .then_some(())
        });
        if up.is_none() {
            let mut d = d;
            let out = d.proc.take().unwrap().stop(Duration::from_secs(10)).1;
            panic!("rootless dockerd ({port_driver}) did not come up: {out}");
        }
        d
    }

    fn docker(&self, e: &Env, args: &[&str]) -> Output {
        let mut full = vec!["-H", self.sock.as_str()];
        full.extend_from_slice(args);
        run(&mut e.as_user("docker", &full), Duration::from_secs(120))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGTERM);
            let _ = p.stop(Duration::from_secs(30));
        }
    }
}

#[test]
fn rootless_docker_over_rnet() {
    if !require_runtime("rootless_docker_over_rnet", "dockerd")
        || !require_path(
            "rootless_docker_over_rnet",
            "/usr/share/docker.io/contrib/dockerd-rootless.sh",
            "docker.io",
        )
        || !require_program("rootless_docker_over_rnet", "rootlesskit")
    {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let e = env();
    let srv = HttpServer::start();
    let tar = e.rootfs_tar.to_string_lossy().into_owned();
    for driver in ["builtin", "slirp4netns"] {
        let t0 = Instant::now();
        let d = Dockerd::start(e, driver);
        d.docker(e, &["import", &tar, DOCKER_IMAGE])
            .assert_success("docker import");
        let port = free_port();
        let publish = format!("127.0.0.1:{port}:80");
        let name = format!("rnet-docker-{driver}");
        d.docker(
            e,
            &[
                "run",
                "-d",
                "--name",
                &name,
                "-p",
                &publish,
                DOCKER_IMAGE,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        )
        .assert_success("docker run -d -p");
        assert_eq!(
            page_at(port, Duration::from_secs(30)).as_deref(),
            Some(PAGE),
            "docker -p with the {driver} port driver"
        );
        // Debian's dockerd-rootless.sh (20.10) always passes RootlessKit
        // --disable-host-loopback: the gateway must then refuse at once.
        let url = format!("http://10.0.2.2:{}/", srv.port());
        let out = d.docker(e, &["run", "--rm", DOCKER_IMAGE, "wget", "-qO-", &url]);
        out.assert_failure("a docker container reaching 10.0.2.2 under --disable-host-loopback");
        assert!(out.stderr.contains("Network is unreachable"), "{out}");
        assert_eq!(srv.hits(), 0, "the host server was reached");
        // Outbound through rnet works: DNS via 10.0.2.3 reaches the test's
        // loopback responder.
        let out = d.docker(
            e,
            &[
                "run",
                "--rm",
                DOCKER_IMAGE,
                "nslookup",
                "node.example",
                "10.0.2.3",
            ],
        );
        out.assert_success("nslookup through 10.0.2.3 from a docker container");
        assert!(out.stdout.contains(&DNS_ANSWER.to_string()), "{out}");
        d.docker(e, &["rm", "-f", &name])
            .assert_success("docker rm");
        drop(d);
        println!(
            "rootless docker with the {driver} port driver took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn rootless_containerd_node_over_rnet() {
    let test = "rootless_containerd_node_over_rnet";
    if !require_runtime(test, "containerd")
        || !require_program(test, "ctr")
        || !require_program(test, "rootlesskit")
        || !require_program(test, "rootlessctl")
        || !require_path(test, "/usr/lib/cni/portmap", "containernetworking-plugins")
    {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let e = env();
    let srv = HttpServer::start();
    let state = e.run.join("containerd-node");
    std::fs::create_dir_all(&state).unwrap();
    sh(
        Command::new("chown").arg(format!("{USER}:")).arg(&state),
        "chown the node state",
    );
    let script = e.bin.join("containerd_node.sh");
    install_executable(Path::new(&guest_script("containerd_node.sh")), &script);
    let rootfs = e.rootfs_tar.with_file_name("rootfs");
    let node_port = "30080";
    let rk_state = state.join("rootlesskit");
    let slirp = e.bin.join("slirp4netns");
    let args: Vec<String> = vec![
        "--pidns".into(),
        "--net=slirp4netns".into(),
        format!("--slirp4netns-binary={}", slirp.display()),
        "--port-driver=slirp4netns".into(),
        "--copy-up=/etc".into(),
        "--copy-up=/run".into(),
        "--copy-up=/var/lib".into(),
        format!("--state-dir={}", rk_state.display()),
        script.to_string_lossy().into_owned(),
        state.to_string_lossy().into_owned(),
        rootfs.to_string_lossy().into_owned(),
        node_port.into(),
        srv.port().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node = LineProc::spawn(&mut e.as_user("rootlesskit", &args));
    let probe = node.wait_line("probe", Duration::from_secs(120), |l| {
        l.starts_with("probe-")
    });
    assert_eq!(
        probe, "probe-ok",
        "the container could not reach the host at 10.0.2.2"
    );
    assert!(srv.hits() >= 1, "the host server saw no request");
    node.wait_line("node-ready", Duration::from_secs(30), |l| l == "node-ready");

    // A port published through rnet (RootlessKit's slirp4netns port
    // driver, i.e. rnet's API) reaches the container by portmap's DNAT.
    let port = free_port();
    let api = rk_state.join("api.sock").to_string_lossy().into_owned();
    let spec = format!("127.0.0.1:{port}:{node_port}/tcp");
    let out = run(
        &mut e.as_user("rootlessctl", &["--socket", &api, "add-ports", &spec]),
        Duration::from_secs(30),
    );
    out.assert_success("rootlessctl add-ports");
    assert_eq!(
        page_at(port, Duration::from_secs(30)).as_deref(),
        Some(PAGE),
        "host -> rnet -> node:{node_port} -> portmap DNAT -> container:80"
    );
    let out = node.stop(Duration::from_secs(30));
    assert!(out.status.success() || out.status.code().is_none(), "{out}");
    let left = poll_until(Duration::from_secs(10), || {
        e.live_rnets().is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "rnet still running after the node stopped: {:?}",
        e.live_rnets()
    );
    println!("containerd node took {:?}", t0.elapsed());
}
