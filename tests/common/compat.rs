//! Helpers for the slirp4netns compatibility tests: a `slirp4netns` symlink
//! to the rnet binary in a scratch directory, command builders that always
//! set rnet's outbound allow-list and a loopback DNS upstream (through the
//! compat mode's `RNET_OUTBOUND_ALLOW` / `RNET_DNS_UPSTREAM`), a tiny API
//! socket client and guest-side helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::common::{
    DnsServer, Proc, RNET, Target, clean_env, inherit_fd, pipe, setpriv_nobody, wait_ready,
};

/// A scratch directory (mode 0755, so uid 65534 can use it) holding a
/// `slirp4netns` symlink to rnet (to a copy of it when running as root). A test binary cannot clean up
/// at exit, so the directory is per process, and those of test processes
/// that are gone are removed when the next one starts.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("rnet-test-")
                .and_then(|r| r.strip_suffix("-s4nn"))
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = tmp.join(format!("rnet-test-{}-s4nn", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        if super::common::is_root() {
            // Root runs some of these as uid 65534, which may be unable to
            // traverse the directories above the build tree: use a copy.
            super::common::install_executable(Path::new(RNET), &d.join("rnet"));
            std::os::unix::fs::symlink("rnet", d.join("slirp4netns")).unwrap();
        } else {
            std::os::unix::fs::symlink(RNET, d.join("slirp4netns")).unwrap();
        }
        d
    })
}

/// Path of the `slirp4netns` symlink.
pub fn slirp_bin() -> PathBuf {
    bin_dir().join("slirp4netns")
}

/// The `pasta` symlink next to the rnet copy (made once per process).
pub fn pasta_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let link = bin_dir().join("pasta");
        if !link.exists() {
            let to = if super::common::is_root() {
                PathBuf::from("rnet")
            } else {
                PathBuf::from(RNET)
            };
            // Another test binary may make the same link at the same time.
            if let Err(e) = std::os::unix::fs::symlink(to, &link) {
                assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            }
        }
        link
    })
}

/// `prog` as uid 65534 (through setpriv) or as the current user.
pub fn as_user(prog: &str, nobody: bool) -> Command {
    if nobody {
        setpriv_nobody(prog)
    } else {
        Command::new(prog)
    }
}

/// The outbound allow-list every test uses unless it says otherwise: nothing
/// beyond the gateway (host loopback) and the DNS forwarder.
pub const ALLOW_NONE: &str = "none";

/// Sets rnet's compat-mode policy environment on `cmd`: outbound allow-list
/// and DNS upstream at `dns`.
pub fn policy_env(cmd: &mut Command, allow: &str, dns: &DnsServer) {
    clean_env(cmd);
    cmd.env("RNET_OUTBOUND_ALLOW", allow)
        .env("RNET_DNS_UPSTREAM", dns.addr.to_string());
}

/// `slirp4netns ARGS...` through the symlink, with the test policy.
pub fn slirp(args: &[&str], dns: &DnsServer) -> Command {
    let mut c = Command::new(slirp_bin());
    c.args(args);
    policy_env(&mut c, ALLOW_NONE, dns);
    c
}

/// `rnet slirp4netns ARGS...` (the subcommand form), with the test policy.
pub fn rnet_slirp(args: &[&str], dns: &DnsServer) -> Command {
    let mut c = Command::new(RNET);
    c.arg("slirp4netns").args(args);
    policy_env(&mut c, ALLOW_NONE, dns);
    c
}

/// Adds `-r N` with a fresh pipe inherited as N, spawns, and waits for the
/// ready byte (panicking with the output if it does not come).
pub fn spawn_ready(mut cmd: Command, what: &str) -> Proc {
    let (r, w) = pipe();
    let n = inherit_fd(&mut cmd, &w);
    cmd.arg("-r").arg(n.to_string());
    spawn_ready_on(cmd, r, w, what)
}

/// Spawns `cmd`, which already names the ready pipe `w`, and waits on `r`.
pub fn spawn_ready_on(mut cmd: Command, r: std::fs::File, w: std::fs::File, what: &str) -> Proc {
    let p = Proc::spawn(&mut cmd);
    drop(w);
    match wait_ready(r, Duration::from_secs(20)) {
        Ok(b) => assert_eq!(b, "1", "{what}: unexpected ready bytes"),
        Err(e) => panic!("{what} not ready: {e}\n{}", p.stop(Duration::ZERO).1),
    }
    p
}

/// Sends one API request and returns the reply (the server closes after it).
pub fn api(sock: &Path, req: &str) -> String {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest command that serves one HTTP reply with `body` on every
/// connection to 0.0.0.0:`port`, printing "listening" once bound.
pub fn guest_http_server(port: u16, body: &str) -> Vec<String> {
    let script = format!(
        "import socket\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen(8); print('listening', flush=True)\n\
         while True:\n\
         \x20   c,_=s.accept(); c.recv(4096)\n\
         \x20   b=b'{body}'\n\
         \x20   c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(b) + b); c.close()\n"
    );
    vec![super::common::PYTHON.into(), "-c".into(), script]
}

/// A host-side HTTP GET to 127.0.0.1:`port`; Ok(body) or Err(why).
pub fn host_get(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )
    .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_string()),
        None => Err(format!("no HTTP reply: {out:?}")),
    }
}

/// Whether a process with this pid still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start());
            !matches!(state.and_then(|r| r.chars().next()), Some('Z') | None)
        })
        .unwrap_or(false)
}

/// `setpriv` to uid 65534 in front of `prog` when running as root, else `prog`.
pub fn maybe_nobody(prog: &OsStr, as_nobody: bool) -> Command {
    if as_nobody {
        setpriv_nobody(&prog.to_string_lossy())
    } else {
        Command::new(prog)
    }
}

/// `nsenter` into `t`'s user namespace only (not its netns), running `prog`.
pub fn in_userns(t: &Target, prog: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["--preserve-credentials", "-U", "-t"])
        .arg(t.pid().to_string())
        .arg(prog);
    c
}
