//! Shared pieces of the integration tests: the `rnet` command builder, host-side
//! servers on loopback, a DNS responder, test hosts (netns + veth), fd plumbing.
//!
//! Network rule: every rnet started here gets an outbound allow-list and a
//! `--dns-upstream` on loopback; guests only target 10.0.2.2, 10.0.2.3 or a
//! [`TestHost`] address in 198.18.0.0/15 that the test created.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const RNET: &str = env!("CARGO_BIN_EXE_rnet");
pub const PYTHON: &str = "/usr/bin/python3";
pub const GATEWAY: &str = "10.0.2.2";
/// The gateway's IPv6 address (default prefix).
pub const GATEWAY6: &str = "fd00::2";
pub const DNS_ADDR: &str = "10.0.2.3";
pub const NOBODY: u32 = 65534;

/// Path of a guest-side helper script in tests/guest/.
pub fn guest_script(name: &str) -> String {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "guest", name]
        .iter()
        .collect();
    p.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------- skipping

/// Whether this is a CI run (`CI=true` or `CI=1`), where no namespace test
/// may skip. The same rule as the library's own namespace unit tests.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The calling test's path (`suite::test_name`), for skip messages.
#[macro_export]
macro_rules! module_path_test {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// Returns from the test when a prerequisite is missing. `require!(check)`
/// calls `check(test_path)`; `require!(expr)` takes a ready `bool`. The
/// checks print why they skip, and fail instead of skipping in CI.
#[macro_export]
macro_rules! require {
    ($check:ident) => {
        if !$check($crate::module_path_test!()) {
            return;
        }
    };
    ($check:expr) => {
        if !$check {
            return;
        }
    };
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips (prints why, returns false) outside CI; in CI a missing prerequisite fails.
fn skip(test: &str, reason: &str) -> bool {
    assert!(!in_ci(), "{test}: cannot run in CI: {reason}");
    eprintln!("SKIP {test}: {reason}");
    false
}

/// Whether unprivileged-style user namespaces (`unshare -Urn`) work here.
pub fn require_userns(test: &str) -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        Command::new("unshare")
            .args(["-Urn", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    ok || skip(
        test,
        "user namespaces are unavailable (unshare -Urn true failed)",
    )
}

/// Whether the test runs as root (needed for veth test hosts, setpriv, sysctl).
pub fn require_root(test: &str) -> bool {
    require_userns(test) && (is_root() || skip(test, "needs root"))
}

// ---------------------------------------------------------------- processes

/// The result of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    #[track_caller]
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(self.status.success(), "{what} failed: {self}");
        self
    }

    #[track_caller]
    pub fn assert_failure(&self, what: &str) -> &Self {
        assert!(
            !self.status.success(),
            "{what} unexpectedly succeeded: {self}"
        );
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (signal {:?}) after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.status.signal(),
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Reads `r` to the end on a thread; the text arrives on the returned channel.
fn collect<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        let _ = tx.send(String::from_utf8_lossy(&s).into_owned());
    });
    rx
}

/// A running child whose stdout/stderr are collected in the background; killed
/// (by its pid) on drop if still running.
pub struct Proc {
    child: Child,
    out: Option<mpsc::Receiver<String>>,
    err: Option<mpsc::Receiver<String>>,
    started: Instant,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = Some(collect(child.stdout.take()));
        let err = Some(collect(child.stderr.take()));
        Proc {
            child,
            out,
            err,
            started,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` unless the child was already reaped.
    pub fn signal(&mut self, sig: i32) {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        if self.status.is_none() {
            // SAFETY: the child is not reaped yet, so its pid is still ours.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
            if self.status.is_some() || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.status
    }

    /// Waits up to `timeout`; on timeout kills the child and panics with its output.
    #[track_caller]
    pub fn finish(self, timeout: Duration) -> Output {
        let (exited, out) = self.stop(timeout);
        assert!(exited, "timed out after {timeout:?}: {out}");
        out
    }

    /// Waits up to `timeout`, kills the child if it is still running, and returns
    /// its output with whether it had exited by itself.
    pub fn stop(mut self, timeout: Duration) -> (bool, Output) {
        let exited = self.wait_timeout(timeout).is_some();
        if !exited {
            self.signal(libc::SIGKILL);
            self.wait_timeout(Duration::from_secs(10));
        }
        // A grandchild (the guest of a killed `rnet run`) may hold the pipes open.
        let join = |rx: Option<mpsc::Receiver<String>>| {
            rx.map(|rx| {
                rx.recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| "<pipe still held open by a descendant>".into())
            })
        };
        let out = Output {
            status: self.status.expect("child did not die after SIGKILL"),
            stdout: join(self.out.take()).unwrap_or_default(),
            stderr: join(self.err.take()).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        };
        (exited, out)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion with a timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    Proc::spawn(cmd).finish(timeout)
}

/// Keeps `fd` open across exec in the child `cmd` spawns, at the same number.
pub fn inherit_fd(cmd: &mut Command, fd: &impl AsRawFd) -> RawFd {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl is async-signal-safe; it only touches the child's copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    fd
}

/// A pipe (read end, write end), both close-on-exec.
pub fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new fds that nothing else owns.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    }
}

/// Waits for the first byte on a `--ready-fd` pipe: Ok("1") when rnet wrote it,
/// Err on EOF (rnet closed the pipe or died) or timeout.
pub fn wait_ready(mut r: File, timeout: Duration) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut b = [0u8; 16];
        let _ = tx.send(r.read(&mut b).map(|n| b[..n].to_vec()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(b)) if !b.is_empty() => Ok(String::from_utf8_lossy(&b).into_owned()),
        Ok(Ok(_)) => Err("ready pipe closed without a byte".into()),
        Ok(Err(e)) => Err(format!("reading ready pipe: {e}")),
        Err(_) => Err(format!("not ready within {timeout:?}")),
    }
}

/// Removes proxy settings and chooses rnet's log level for a child.
pub fn clean_env(cmd: &mut Command) {
    for v in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
    match std::env::var("RNET_TEST_LOG") {
        Ok(v) => cmd.env("RUST_LOG", v),
        Err(_) => cmd.env_remove("RUST_LOG"),
    };
}

/// `setpriv` prefix that drops to uid/gid 65534 with no supplementary groups.
pub fn setpriv_nobody(prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        prog,
    ]);
    c
}

/// Copies the executable `src` to `dst` (mode 0755) in a child process
/// (`install`), so this process never holds `dst` open for writing: a copy
/// made here could leak its write descriptor into a child that another test
/// thread forks meanwhile, and exec of `dst` would then fail with "Text
/// file busy" (ETXTBSY) until that child execs.
pub fn install_executable(src: &std::path::Path, dst: &std::path::Path) {
    let st = Command::new("install")
        .args(["-m", "0755"])
        .arg(src)
        .arg(dst)
        .status()
        .unwrap_or_else(|e| panic!("install {}: {e}", dst.display()));
    assert!(
        st.success(),
        "install {} -> {}: {st}",
        src.display(),
        dst.display()
    );
}

/// A copy of the rnet binary that uid 65534 can execute: the build tree may
/// sit below a directory other users cannot traverse (a home directory, a
/// CI work folder), so the binary is copied once into a fresh 0755
/// directory under the system temp dir.
pub fn rnet_for_nobody() -> String {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::OnceLock;
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rnet-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create dir for the nobody binary");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let dst = dir.join("rnet");
        install_executable(std::path::Path::new(RNET), &dst);
        dst.to_string_lossy().into_owned()
    })
    .clone()
}

// ---------------------------------------------------------------- rnet builder

/// Builds `rnet run` / `rnet attach` command lines; always with an outbound
/// allow-list (`none` unless `outbound_allow` is used) and `--dns-upstream` at
/// a loopback DNS responder (a fresh one per builder unless `with_dns`).
#[derive(Clone)]
pub struct Rnet {
    opts: Vec<OsString>,
    allow: Vec<String>,
    dns: Arc<DnsServer>,
    nobody: bool,
    fds: Vec<RawFd>,
}

impl Rnet {
    pub fn new() -> Rnet {
        Rnet::with_dns(&Arc::new(DnsServer::start()))
    }

    pub fn with_dns(dns: &Arc<DnsServer>) -> Rnet {
        Rnet {
            opts: Vec::new(),
            allow: Vec::new(),
            dns: dns.clone(),
            nobody: false,
            fds: Vec::new(),
        }
    }

    pub fn dns(&self) -> &DnsServer {
        &self.dns
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Rnet {
        self.opts.push(a.into());
        self
    }

    pub fn allow_host_loopback(self) -> Rnet {
        self.arg("--allow-host-loopback")
    }

    pub fn outbound_allow(mut self, cidr: &str) -> Rnet {
        self.allow.push(cidr.to_string());
        self
    }

    /// `--exit-fd N` with `fd` (a pipe's read end) inherited as N; the caller
    /// keeps `fd` open until the child is spawned.
    pub fn exit_fd(mut self, fd: &impl AsRawFd) -> Rnet {
        self.fds.push(fd.as_raw_fd());
        self.arg("--exit-fd").arg(fd.as_raw_fd().to_string())
    }

    /// Runs rnet as uid/gid 65534 (through setpriv) when the test runs as root.
    pub fn nobody(mut self) -> Rnet {
        self.nobody = true;
        self
    }

    /// The command line `rnet SUB [OPTIONS] TAIL...`.
    pub fn command(&self, sub: &str, tail: &[&str]) -> Command {
        let mut c = if self.nobody && is_root() {
            setpriv_nobody(&rnet_for_nobody())
        } else {
            Command::new(RNET)
        };
        c.arg(sub).args(&self.opts);
        if self.allow.is_empty() {
            c.args(["--outbound-allow", "none"]);
        }
        for a in &self.allow {
            c.args(["--outbound-allow", a]);
        }
        c.arg("--dns-upstream").arg(self.dns.addr.to_string());
        c.args(tail);
        clean_env(&mut c);
        for fd in &self.fds {
            inherit_fd(&mut c, fd);
        }
        c
    }

    /// `rnet run ... -- GUEST...`
    pub fn run_cmd(&self, guest: &[&str]) -> Command {
        let mut tail = vec!["--"];
        tail.extend_from_slice(guest);
        self.command("run", &tail)
    }

    /// Runs GUEST inside a fresh namespace pair served by rnet, with a timeout.
    pub fn run(&self, guest: &[&str], timeout: Duration) -> Output {
        run(&mut self.run_cmd(guest), timeout)
    }

    /// Starts `rnet attach PID` with `--ready-fd` and waits until it is ready.
    pub fn attach(&self, pid: u32) -> Proc {
        self.start_attach(&[&pid.to_string()])
    }

    /// Starts `rnet attach [OPTIONS] TAIL...` with `--ready-fd` and waits until
    /// rnet reports ready (fails with rnet's output if it does not).
    pub fn start_attach(&self, tail: &[&str]) -> Proc {
        let (r, w) = pipe();
        let rnet = self
            .clone()
            .arg("--ready-fd")
            .arg(w.as_raw_fd().to_string());
        let mut cmd = rnet.command("attach", tail);
        inherit_fd(&mut cmd, &w);
        let p = Proc::spawn(&mut cmd);
        drop(w);
        match wait_ready(r, Duration::from_secs(20)) {
            Ok(b) => assert_eq!(b.trim(), "1", "unexpected ready byte"),
            Err(e) => panic!(
                "rnet attach {tail:?} not ready: {e}\n{}",
                p.stop(Duration::ZERO).1
            ),
        }
        p
    }
}

/// Guest curl with a fixed set of flags (`-v` so the connect error's errno text
/// shows on stderr, e.g. "Network is unreachable").
pub fn curl(url: &str) -> Vec<String> {
    [
        "curl",
        "-sS",
        "-v",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        url,
    ]
    .map(String::from)
    .to_vec()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------- namespace targets

/// A process in its own namespaces, made by `unshare ARGS sh -c 'echo ready; exec sleep N'`;
/// ready once it printed (so `unshare` finished, uid maps included). Killed on drop.
pub struct Target {
    pub proc: Proc,
    _stdout: BufReader<ChildStdout>,
}

impl Target {
    pub fn start(unshare_args: &[&str]) -> Target {
        Target::start_via(&[], unshare_args)
    }

    /// Like [`Target::start`] with `prefix` (e.g. a `setpriv` command line)
    /// in front of `unshare`.
    pub fn start_via(prefix: &[&str], unshare_args: &[&str]) -> Target {
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg("unshare");
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(unshare_args)
            .args(["sh", "-c", "echo ready; exec sleep 600"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn unshare");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "unshare target did not start");
        Target {
            proc: Proc {
                child,
                out: None,
                err: None,
                started: Instant::now(),
                status: None,
            },
            _stdout: out,
        }
    }

    /// `unshare -Urn` as the current user: rnet attach's usual target.
    pub fn userns() -> Target {
        Target::start(&["-Urn"])
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A guest command run inside the target's namespaces.
    pub fn exec(&self, guest: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--preserve-credentials", "-U", "-n", "-t"])
            .arg(self.pid().to_string())
            .args(guest);
        clean_env(&mut c);
        c
    }
}

// ---------------------------------------------------------------- host servers

fn spawn_accept(l: TcpListener, f: impl Fn(TcpStream) + Send + Sync + 'static) {
    let f = Arc::new(f);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let f = f.clone();
            thread::spawn(move || f(s));
        }
    });
}

pub fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

pub const HTTP_BODY: &str = "hello from the rnet test host server\n";

/// An HTTP/1.1 server answering every request with [`HTTP_BODY`]; counts connections.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl HttpServer {
    pub fn start() -> HttpServer {
        HttpServer::on(loopback_listener())
    }

    pub fn on(l: TcpListener) -> HttpServer {
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        spawn_accept(l, move |mut s| {
            h.fetch_add(1, Ordering::SeqCst);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
                HTTP_BODY.len()
            );
        });
        HttpServer { addr, hits }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A UDP echo server on loopback; counts datagrams.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub datagrams: Arc<AtomicUsize>,
}

impl UdpEcho {
    pub fn start() -> UdpEcho {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let datagrams = Arc::new(AtomicUsize::new(0));
        let d = datagrams.clone();
        thread::spawn(move || {
            let mut b = vec![0u8; 65536];
            while let Ok((n, peer)) = s.recv_from(&mut b) {
                d.fetch_add(1, Ordering::SeqCst);
                let _ = s.send_to(&b[..n], peer);
            }
        });
        UdpEcho { addr, datagrams }
    }
}

/// A TCP echo server on loopback; counts connections and the peak of open ones.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
}

impl TcpEcho {
    pub fn start() -> TcpEcho {
        let l = loopback_listener();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let (a, p) = (accepted.clone(), peak.clone());
        spawn_accept(l, move |mut s| {
            a.fetch_add(1, Ordering::SeqCst);
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut b = vec![0u8; 65536];
            loop {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
        TcpEcho {
            addr,
            accepted,
            peak,
        }
    }
}

/// Byte count and SHA-256 (hex) of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    pub bytes: u64,
    pub sha256: String,
}

impl Digested {
    /// Parses the guest scripts' "<bytes> <hex>" line.
    pub fn parse(line: &str) -> Digested {
        let mut it = line.split_whitespace();
        let (Some(b), Some(h), None) = (it.next(), it.next(), it.next()) else {
            panic!("bad digest line {line:?}");
        };
        Digested {
            bytes: b.parse().unwrap(),
            sha256: h.to_string(),
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub const BLOCK: usize = 1 << 20;

/// The deterministic test stream (same as tests/guest/stream.py): a 1 MiB base of
/// chained SHA-256 digests; block i has i (u64 LE) in its first 8 bytes.
pub struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    pub fn new() -> Pattern {
        let mut base = Vec::with_capacity(BLOCK);
        for k in 0..(BLOCK / 32) as u32 {
            let mut h = Sha256::new();
            h.update(b"rnet-test");
            h.update(k.to_le_bytes());
            base.extend_from_slice(&h.finalize());
        }
        Pattern { base }
    }

    pub fn block(&mut self, i: u64) -> &[u8] {
        self.base[..8].copy_from_slice(&i.to_le_bytes());
        &self.base
    }

    pub fn digest(total: u64) -> Digested {
        let mut p = Pattern::new();
        let mut h = Sha256::new();
        for i in 0..total / BLOCK as u64 {
            h.update(p.block(i));
        }
        Digested {
            bytes: total,
            sha256: hex(&h.finalize()),
        }
    }
}

/// Reads `r` to EOF: its length and SHA-256 (an error says how far it got).
pub fn digest_reader(r: &mut impl Read) -> io::Result<Digested> {
    let mut h = Sha256::new();
    let mut b = vec![0u8; BLOCK];
    let mut n = 0u64;
    loop {
        let k = r
            .read(&mut b)
            .map_err(|e| io::Error::new(e.kind(), format!("after {n} bytes: {e}")))?;
        if k == 0 {
            break;
        }
        h.update(&b[..k]);
        n += k as u64;
    }
    Ok(Digested {
        bytes: n,
        sha256: hex(&h.finalize()),
    })
}

/// Accepts one connection, reads it to EOF hashing, then closes; the result
/// arrives on the returned channel.
pub fn tcp_sink() -> (SocketAddr, mpsc::Receiver<io::Result<Digested>>) {
    tcp_sink_on(loopback_listener())
}

/// [`tcp_sink`] on a listener of the caller's choice.
pub fn tcp_sink_on(l: TcpListener) -> (SocketAddr, mpsc::Receiver<io::Result<Digested>>) {
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let res = (|| {
            let (mut s, _) = l.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            digest_reader(&mut s)
        })();
        let _ = tx.send(res);
    });
    (addr, rx)
}

/// Accepts one connection, sends `total` bytes of the [`Pattern`], then closes.
pub fn tcp_source(total: u64) -> (SocketAddr, mpsc::Receiver<io::Result<u64>>) {
    tcp_source_on(loopback_listener(), total)
}

/// [`tcp_source`] on a listener of the caller's choice.
pub fn tcp_source_on(l: TcpListener, total: u64) -> (SocketAddr, mpsc::Receiver<io::Result<u64>>) {
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let res = (|| {
            let (mut s, _) = l.accept()?;
            s.set_write_timeout(Some(Duration::from_secs(60)))?;
            let mut p = Pattern::new();
            for i in 0..total / BLOCK as u64 {
                s.write_all(p.block(i))?;
            }
            s.shutdown(Shutdown::Write)?;
            Ok(total)
        })();
        let _ = tx.send(res);
    });
    (addr, rx)
}

// ---------------------------------------------------------------- DNS responder

pub const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 55);

/// A minimal DNS responder on 127.0.0.1, UDP and TCP on one port: answers every
/// A/IN query with [`DNS_ANSWER`] (other types: NOERROR, no answer), echoing the
/// id and question. Counts queries per transport.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
}

impl DnsServer {
    pub fn start() -> DnsServer {
        let (udp, tcp) = (0..50)
            .find_map(|_| {
                let u = UdpSocket::bind("127.0.0.1:0").ok()?;
                let t = TcpListener::bind(u.local_addr().ok()?).ok()?;
                Some((u, t))
            })
            .expect("no free port for UDP+TCP DNS");
        let addr = udp.local_addr().unwrap();
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let uq = udp_queries.clone();
        thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut b) {
                if let Some(r) = dns_answer(&b[..n]) {
                    uq.fetch_add(1, Ordering::SeqCst);
                    let _ = udp.send_to(&r, peer);
                }
            }
        });
        let tq = tcp_queries.clone();
        spawn_accept(tcp, move |mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut len = [0u8; 2];
            while s.read_exact(&mut len).is_ok() {
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if s.read_exact(&mut q).is_err() {
                    return;
                }
                let Some(r) = dns_answer(&q) else { return };
                tq.fetch_add(1, Ordering::SeqCst);
                let mut msg = (r.len() as u16).to_be_bytes().to_vec();
                msg.extend_from_slice(&r);
                if s.write_all(&msg).is_err() {
                    return;
                }
            }
        });
        DnsServer {
            addr,
            udp_queries,
            tcp_queries,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn queries(&self) -> (usize, usize) {
        (
            self.udp_queries.load(Ordering::SeqCst),
            self.tcp_queries.load(Ordering::SeqCst),
        )
    }
}

/// The response to one query message, or None if it is not a parseable query.
pub fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + q[i] as usize;
    }
    let qend = i + 5;
    let question = q.get(12..qend)?;
    let (qtype, qclass) = (
        &question[question.len() - 4..][..2],
        &question[question.len() - 2..],
    );
    let is_a = qtype == [0, 1] && qclass == [0, 1];
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[..2]); // id
    r.push(0x80 | (q[2] & 0x79)); // QR, opcode and RD copied
    r.push(0x80); // RA, NOERROR
    r.extend_from_slice(&[0, 1, 0, is_a as u8, 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if is_a {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&DNS_ANSWER.octets());
    }
    Some(r)
}

// ---------------------------------------------------------------- test hosts

/// A test host: network namespace `rnet-test-<pid>-<n>` joined to the root
/// namespace by a veth pair on a /30 of 198.18.0.0/15 unique to this process
/// and host. IPv6 is off on both ends so the only traffic is the test's,
/// unless [`TestHost::create_v6`] made it. Deleted on drop.
pub struct TestHost {
    pub ns: String,
    pub host_if: String,
    /// Root-namespace end of the veth.
    pub near: Ipv4Addr,
    /// The test host's address.
    pub addr: Ipv4Addr,
    /// Root-namespace end and test host of the veth over IPv6
    /// ([`TestHost::create_v6`] only).
    pub v6: Option<(Ipv6Addr, Ipv6Addr)>,
    n: u64,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    pub fn create() -> TestHost {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        assert!(n < 16, "too many test hosts in one process");
        let block = (pid as u64 % 2048) * 16 + n;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 4 * block as u32;
        let th = TestHost {
            ns: format!("rnet-test-{pid}-{n}"),
            host_if: format!("rnt{pid}h{n}"),
            near: Ipv4Addr::from(base + 1),
            addr: Ipv4Addr::from(base + 2),
            v6: None,
            n,
        };
        let (ns, hif) = (th.ns.as_str(), th.host_if.as_str());
        sh(&["ip", "netns", "add", ns]);
        sh(&[
            "ip", "link", "add", hif, "type", "veth", "peer", "name", "veth0", "netns", ns,
        ]);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{hif}/disable_ipv6"), "1");
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ]);
        sh(&["ip", "addr", "add", &format!("{}/30", th.near), "dev", hif]);
        sh(&["ip", "link", "set", hif, "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", th.addr),
            "dev",
            "veth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "veth0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        th
    }

    /// A test host that also speaks IPv6: a /64 of fd42::/16 unique to this
    /// process and host on the veth, ::1 the root-namespace end and ::2 the
    /// test host. Duplicate address detection and router solicitations are
    /// off, so the addresses work at once; besides the test's packets only
    /// the kernels' link-local housekeeping (neighbour discovery, MLD)
    /// crosses the veth.
    pub fn create_v6() -> TestHost {
        let mut th = TestHost::create();
        let pid = std::process::id();
        let prefix = format!("fd42:{:x}:{:x}:{:x}", pid >> 16, pid & 0xffff, th.n);
        let (near, addr): (Ipv6Addr, Ipv6Addr) = (
            format!("{prefix}::1").parse().unwrap(),
            format!("{prefix}::2").parse().unwrap(),
        );
        let (ns, hif) = (th.ns.as_str(), th.host_if.as_str());
        for (k, v) in [
            ("accept_dad", "0"),
            ("accept_ra", "0"),
            ("router_solicitations", "0"),
            ("disable_ipv6", "0"),
        ] {
            let path = format!("/proc/sys/net/ipv6/conf/{hif}/{k}");
            std::fs::write(&path, v).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.veth0.accept_dad=0",
            "net.ipv6.conf.veth0.accept_ra=0",
            "net.ipv6.conf.veth0.router_solicitations=0",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.veth0.disable_ipv6=0",
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{near}/64"),
            "dev",
            hif,
            "nodad",
        ]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        th.v6 = Some((near, addr));
        th
    }

    /// The address as a /32 for `--outbound-allow`.
    pub fn cidr(&self) -> String {
        format!("{}/32", self.addr)
    }

    /// The IPv6 address ([`TestHost::create_v6`]) as a /128 for
    /// `--outbound-allow`.
    pub fn cidr6(&self) -> String {
        let (_, addr) = self.v6.expect("a test host made by create_v6");
        format!("{addr}/128")
    }

    /// Runs `f` on a thread that joined the test host's netns (sockets made
    /// there stay there).
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns);
        thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: a valid netns fd; only this short-lived thread moves.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// A TCP listener on the test host's address, inside its namespace.
    pub fn listen_tcp(&self) -> TcpListener {
        let addr = self.addr;
        self.in_ns(move || TcpListener::bind((addr, 0)).unwrap())
    }

    /// Packets sent by the root namespace towards the test host so far.
    pub fn tx_packets(&self) -> u64 {
        let p = format!("/sys/class/net/{}/statistics/tx_packets", self.host_if);
        std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

// ---------------------------------------------------------------- sysctl

/// Sets a /proc/sys value and restores the original on drop.
pub struct SysctlGuard {
    path: String,
    orig: String,
}

impl SysctlGuard {
    pub fn new(path: &str) -> SysctlGuard {
        let orig = std::fs::read_to_string(path).unwrap();
        SysctlGuard {
            path: path.into(),
            orig,
        }
    }

    pub fn set(&self, v: &str) {
        std::fs::write(&self.path, v).unwrap_or_else(|e| panic!("write {}: {e}", self.path));
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.orig.trim());
    }
}

/// A uniquely named scratch file path under the temp dir, removed on drop.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        TempPath(std::env::temp_dir().join(format!("rnet-test-{}-{tag}-{n}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Case-insensitive substring check on a command's stderr.
#[track_caller]
pub fn assert_stderr_has(out: &Output, needle: &str) {
    assert!(
        out.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {out}"
    );
}

/// The integer value of `"key": N` in a flat JSON object printed by a guest script.
#[track_caller]
pub fn json_num(json: &str, key: &str) -> i64 {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json:?}"))
        + pat.len();
    let end = json[at..]
        .find(|c: char| !c.is_ascii_digit() && c != '-')
        .map_or(json.len(), |e| at + e);
    json[at..end].parse().unwrap()
}

// ---------------------------------------------------------------- line-by-line output

/// A running child (typically `rnet run` with a guest server) whose stdout
/// arrives line by line, so a test can wait for the guest's own readiness
/// line ("listening") or for results it prints. Stopped with SIGTERM (which
/// `rnet run` passes on to the guest) and then SIGKILL on drop; if the test
/// is panicking, the child's output is printed to help the diagnosis.
pub struct LineProc {
    proc: Option<Proc>,
    lines: mpsc::Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
}

impl LineProc {
    pub fn spawn(cmd: &mut Command) -> LineProc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let err = Some(collect(child.stderr.take()));
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        LineProc {
            proc: Some(Proc {
                child,
                out: None,
                err,
                started,
                status: None,
            }),
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().unwrap().pid()
    }

    /// Waits up to `timeout` for the next stdout line for which `want` holds
    /// and returns it; panics with the child's output on timeout or exit.
    #[track_caller]
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if want(&l) {
                        return l;
                    }
                }
                Err(e) => {
                    let out = self.stop(Duration::from_secs(5));
                    panic!("no {what} line ({e:?}) within {timeout:?}: {out}");
                }
            }
        }
    }

    /// Whether the child is still running.
    pub fn running(&mut self) -> bool {
        let p = self.proc.as_mut().unwrap();
        p.wait_timeout(Duration::ZERO).is_none()
    }

    /// Sends `sig` to the child.
    pub fn signal(&mut self, sig: i32) {
        self.proc.as_mut().unwrap().signal(sig);
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL after that) and returns
    /// the output; stdout holds the lines not yet consumed as well as those seen.
    pub fn stop(&mut self, timeout: Duration) -> Output {
        let mut p = self.proc.take().expect("already stopped");
        p.signal(libc::SIGTERM);
        let (_, mut out) = p.stop(timeout);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.seen.push(l);
        }
        out.stdout = self.seen.join("\n");
        out
    }
}

impl Drop for LineProc {
    fn drop(&mut self) {
        if self.proc.is_some() {
            let out = self.stop(Duration::from_secs(5));
            if thread::panicking() {
                eprintln!("--- output of the child at the failure ---\n{out}");
            }
        }
    }
}

// ---------------------------------------------------------------- published ports

/// A scratch directory under the temp dir, removed with its contents on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("rnet-test-{}-{tag}-dir{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports a guest service may use and the host may publish: below the
/// host's ephemeral range (so the kernel never hands one out by itself) and
/// below a fresh namespace's (32768, so `--publish-auto` counts a UDP
/// socket there as a service).
pub fn service_port_band() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let lo: u32 = r.split_whitespace().next().unwrap().parse().unwrap();
    let top = lo.min(32768);
    if top >= 10000 + 4000 {
        (10000, top)
    } else {
        (1024, top)
    }
}

/// The first of `n` consecutive service ports (see [`service_port_band`])
/// that are free for TCP and UDP on 0.0.0.0 (so on every host address);
/// never the same port twice in one process.
pub fn free_service_block(n: u32) -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static TAKEN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
    let (lo, hi) = service_port_band();
    assert!(hi - lo > n, "port band {lo}-{hi} too small for {n} ports");
    for _ in 0..500 {
        let start =
            lo + (RandomState::new().hash_one(Instant::now()) % (hi - lo - n) as u64) as u32;
        let mut taken = TAKEN.lock().unwrap();
        let taken = taken.get_or_insert_with(HashSet::new);
        if (start..start + n).any(|p| taken.contains(&p)) {
            continue;
        }
        let free = (start..start + n).all(|p| {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, p as u16)).is_ok()
                && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p as u16)).is_ok()
        });
        if free {
            taken.extend(start..start + n);
            return start as u16;
        }
    }
    panic!("no {n} consecutive free ports in {lo}-{hi}");
}

/// Calls `f` until it returns Some or `limit` has passed (checking every
/// 10 ms); returns the value and when it came, or None at the deadline.
pub fn poll_until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((v, t0.elapsed()));
        }
        if t0.elapsed() >= limit {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// What the guest HTTP server (`port_server.py http`) reports: the client
/// address it saw and its own port.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub client: SocketAddr,
    pub guest_port: u16,
}

pub fn parse_seen(body: &str) -> Seen {
    let body = body.trim();
    let rest = body
        .strip_prefix("client=")
        .unwrap_or_else(|| panic!("unexpected guest reply {body:?}"));
    let (client, port) = rest
        .split_once(" port=")
        .unwrap_or_else(|| panic!("unexpected guest reply {body:?}"));
    Seen {
        client: client.parse().unwrap(),
        guest_port: port.parse().unwrap(),
    }
}

/// GET / over a fresh connection to `dst`; returns the body and the
/// client's local address.
pub fn http_get(dst: SocketAddr) -> io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = s.local_addr()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let (_, body) = r
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP head in {r:?}")))?;
    Ok((body.to_string(), local))
}

/// `rnet port ACTION --api-socket PATH ARGS...`
pub fn port_cli(api: &std::path::Path, action: &str, args: &[&str]) -> Output {
    let mut c = Command::new(RNET);
    c.args(["port", action, "--api-socket"]).arg(api).args(args);
    clean_env(&mut c);
    run(&mut c, Duration::from_secs(30))
}

/// The rows of `rnet port ls` below its header (ID PROTO HOST GUEST PATH),
/// each split on whitespace.
#[track_caller]
pub fn port_rows(api: &std::path::Path) -> Vec<Vec<String>> {
    let out = port_cli(api, "ls", &[]);
    out.assert_success("rnet port ls");
    let mut lines = out.stdout.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(head, ["ID", "PROTO", "HOST", "GUEST", "PATH"], "{out}");
    lines
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// Whether `prog` is on PATH (skips outside CI, fails in CI when missing).
pub fn require_program(test: &str, prog: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    found || skip(test, &format!("{prog} is not installed"))
}

// ---------------------------------------------------------------- named network namespaces

/// Whether `path` exists (skips outside CI, fails in CI when missing);
/// `what` says which package brings it.
pub fn require_path(test: &str, path: &str, what: &str) -> bool {
    std::path::Path::new(path).exists() || skip(test, &format!("{path} is missing ({what})"))
}

/// Makes the child `cmd` spawns join the network namespace at `ns` (e.g.
/// /run/netns/NAME) before it execs, so its sockets live there. The
/// namespace file is opened now and must outlive the spawn (returned).
pub fn join_netns(cmd: &mut Command, ns: &str) -> File {
    let f = File::open(ns).unwrap_or_else(|e| panic!("open {ns}: {e}"));
    let fd = f.as_raw_fd();
    // SAFETY: setns is async-signal-safe; it only moves the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    f
}

/// Runs `f` on a thread that joined the network namespace at `ns` (sockets
/// made there stay there, also when used from other threads later).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.to_string();
    thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid netns fd; only this short-lived thread moves.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

// ---------------------------------------------------------------- status and process figures

/// rnet logged the `ping_group_range` warning exactly once, however many
/// echo requests it could not relay (the line itself may name the sysctl
/// more than once, e.g. in its fix-it hint).
#[track_caller]
pub fn assert_one_ping_range_warning(out: &Output) {
    let warnings = out
        .stderr
        .lines()
        .filter(|l| l.contains("ping_group_range"))
        .count();
    assert_eq!(
        warnings, 1,
        "rnet must log the ping_group_range warning exactly once: {out}"
    );
}

/// `rnet status --api-socket PATH --json`, parsed.
#[track_caller]
pub fn status_json(api: &std::path::Path) -> serde_json::Value {
    let mut c = Command::new(RNET);
    c.args(["status", "--json", "--api-socket"]).arg(api);
    clean_env(&mut c);
    let out = run(&mut c, Duration::from_secs(30));
    out.assert_success("rnet status --json");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

/// The drop counters of a status report, by reason.
pub fn drop_counts(status: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    status["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Counters that grew from `before` to `after` (reason, increase).
pub fn drops_diff(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// The sandboxed data plane of the rnet process `pid`: `pid` itself
/// (`--no-supervise`, or no sandbox), or under a supervisor its worker,
/// the child that moved to a mount namespace of its own (the agent's
/// launcher, the other kind of child, stays in rnet's).
pub fn data_plane(pid: u32) -> u32 {
    let mnt = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    let own = mnt(&pid.to_string());
    if own != mnt("self") {
        return pid;
    }
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .find(|c| mnt(c) != own)
        .and_then(|c| c.parse().ok())
        .unwrap_or(pid)
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB; None once
/// the process is gone. Of rnet's data plane (see [`data_plane`]).
pub fn proc_kib(pid: u32, key: &str) -> Option<u64> {
    let pid = data_plane(pid);
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("{key}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of a process (entries of /proc/PID/fd); of rnet's
/// data plane (see [`data_plane`]).
pub fn open_fds(pid: u32) -> Option<usize> {
    let pid = data_plane(pid);
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// KiB as MiB, for reports.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// TCP ports in LISTEN state on the host (root network namespace, any
/// address, IPv4 and IPv6 tables), so a flood through the gateway can leave
/// real host services alone.
pub fn host_tcp_listen_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    for t in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(t) else {
            continue;
        };
        for l in s.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 3 && f[3] == "0A" {
                if let Some(p) = f[1].rsplit(':').next() {
                    if let Ok(p) = u16::from_str_radix(p, 16) {
                        ports.push(p);
                    }
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}
