//! The self-healing data plane: `rnet attach` runs its data plane in a
//! worker that a supervisor restarts. Killing the worker (SIGKILL, or a
//! panic through the test hook) while a guest and a published port are in
//! use: within a second the guest reaches a host server again and the
//! published port serves a new connection, `tap0` keeps its ifindex, and
//! the restart shows in the log, in `rnet status` and in the metrics. A
//! port added at run time survives a restart; six crashes in a minute end
//! rnet with the cause; `--no-supervise` keeps the old behaviour.
//!
//! Every rnet runs with an outbound allow-list (`none`) and a loopback DNS
//! upstream (the builder's defaults); guests reach only 10.0.2.2.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;

macro_rules! module_path_test {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

macro_rules! require {
    ($check:ident) => {
        if !$check(module_path_test!()) {
            return;
        }
    };
}

const GUEST_PORT: u16 = 8080;
/// The `setpriv` prefix that makes the target run as uid 65534.
const NOBODY_PREFIX: &[&str] = &[
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
];
const GUEST_BODY: &str = "served by the guest";

/// A free host port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    loopback_listener().local_addr().unwrap().port()
}

/// `rnet attach` with `--ready-fd`, the test hooks armed, waited for.
fn start(rnet: &Rnet, tail: &[&str]) -> Proc {
    let (r, w) = pipe();
    let rnet = rnet
        .clone()
        .arg("--ready-fd")
        .arg(w.as_raw_fd().to_string());
    let mut cmd = rnet.command("attach", tail);
    cmd.env("RNET_TEST_HOOKS", "1");
    inherit_fd(&mut cmd, &w);
    let p = Proc::spawn(&mut cmd);
    drop(w);
    if let Err(e) = wait_ready(r, secs(20)) {
        panic!("rnet attach not ready: {e}\n{}", p.stop(Duration::ZERO).1);
    }
    p
}

/// The supervisor's children: its data-plane worker.
fn workers(rnet: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{rnet}/task/{rnet}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The one worker, waited for (it differs from `not`).
#[track_caller]
fn worker(rnet: u32, not: Option<u32>) -> u32 {
    poll_until(secs(5), || match workers(rnet).as_slice() {
        [w] if Some(*w) != not => Some(*w),
        _ => None,
    })
    .unwrap_or_else(|| panic!("no new worker under {rnet}: {:?}", workers(rnet)))
    .0
}

/// tap0's ifindex inside the target's namespace.
fn tap_index(t: &Target) -> u32 {
    let out = run(&mut t.exec(&["ip", "-o", "link", "show", "tap0"]), secs(10));
    out.assert_success("ip link show tap0");
    out.stdout
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {out}"))
}

/// A guest server on GUEST_PORT answering every connection.
fn guest_server(t: &Target) -> LineProc {
    let script = format!(
        "import socket\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {GUEST_PORT})); s.listen(64); print('listening', flush=True)\n\
         while True:\n\
         \x20   c,_=s.accept(); c.settimeout(5)\n\
         \x20   try:\n\
         \x20       c.recv(4096); b=b'{GUEST_BODY}'\n\
         \x20       c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b) + b)\n\
         \x20   except OSError: pass\n\
         \x20   c.close()\n"
    );
    let mut lp = LineProc::spawn(&mut t.exec(&[PYTHON, "-c", &script]));
    lp.wait_line("listening", secs(20), |l| l == "listening");
    lp
}

/// The guest fetches from the host server once (short timeouts).
fn guest_reaches(t: &Target, srv: &HttpServer) -> bool {
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let mut c = t.exec(&[
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--connect-timeout",
        "0.5",
        "--max-time",
        "1",
        &url,
    ]);
    let out = run(&mut c, secs(10));
    out.code() == Some(0) && out.stdout == HTTP_BODY
}

/// A host client gets the guest's reply through the published port.
fn published_serves(port: u16) -> bool {
    let dst = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    http_get(dst).is_ok_and(|(body, _)| body == GUEST_BODY)
}

fn metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

/// A guest and a published port in use, the worker made to die by
/// `crash`; everything must be back within a second.
fn restart_keeps_network(rnet: Rnet, nobody: bool, crash: fn(u32)) {
    let t = if nobody {
        Target::start_via(NOBODY_PREFIX, &["-Urn"])
    } else {
        Target::userns()
    };
    let srv = HttpServer::start();
    let api = TempPath::new("supervise-api");
    let port = free_port();
    let maddr = format!("127.0.0.1:{}", free_port());
    let publish = format!("127.0.0.1:{port}:{GUEST_PORT}");
    let rnet_p = start(
        &rnet.allow_host_loopback(),
        &[
            "-p",
            &publish,
            "--api-socket",
            api.0.to_str().unwrap(),
            "--metrics-addr",
            &maddr,
            &t.pid().to_string(),
        ],
    );
    let _guest = guest_server(&t);
    let index = tap_index(&t);
    assert!(guest_reaches(&t, &srv), "guest before the crash");
    assert!(published_serves(port), "published port before the crash");
    assert_eq!(status_json(&api.0)["restarts"], 0);
    let old = worker(rnet_p.pid(), None);
    // The supervisor is confined too (its deny-list filter).
    let st = std::fs::read_to_string(format!("/proc/{}/status", rnet_p.pid())).unwrap();
    assert!(st.contains("\nSeccomp:\t2\n"), "{st}");
    assert!(st.contains("\nNoNewPrivs:\t1\n"), "{st}");

    crash(old);
    let crashed = Instant::now();
    let back =
        poll_until(secs(10), || guest_reaches(&t, &srv).then_some(())).map(|_| crashed.elapsed());
    let served =
        poll_until(secs(10), || published_serves(port).then_some(())).map(|_| crashed.elapsed());
    let new = worker(rnet_p.pid(), Some(old));
    eprintln!("guest back after {back:?}, published port after {served:?}");
    let back = back.expect("the guest never reached the host again");
    let served = served.expect("the published port never served again");
    assert!(back <= secs(1), "guest reached the host after {back:?}");
    assert!(served <= secs(1), "published port served after {served:?}");
    assert_ne!(new, old);
    assert_eq!(tap_index(&t), index, "tap0 was replaced");
    let st = status_json(&api.0);
    assert_eq!(st["restarts"], 1, "{st}");
    let m = metrics(&maddr);
    assert!(m.contains("\nrnet_restarts_total 1\n"), "{m}");

    let out = term(rnet_p);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_stderr_has(&out, "data plane died");
    assert_stderr_has(&out, "established flows are reset");
    assert_stderr_has(&out, "data plane restarted");
}

/// Stops rnet with SIGTERM; its output.
#[track_caller]
fn term(mut p: Proc) -> Output {
    p.signal(libc::SIGTERM);
    let (exited, out) = p.stop(secs(10));
    assert!(exited, "rnet did not stop on SIGTERM: {out}");
    out
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on the worker the test found as rnet's child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn panic_hook(pid: u32) {
    // SAFETY: kill(2) on the worker the test found as rnet's child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR2) };
}

/// (a) SIGKILL of the worker.
#[test]
fn sigkill_worker_restarts() {
    require!(require_userns);
    restart_keeps_network(Rnet::new(), false, sigkill);
}

/// (a) as uid 65534.
#[test]
fn sigkill_worker_restarts_as_nobody() {
    require!(require_root);
    restart_keeps_network(Rnet::new().nobody(), true, sigkill);
}

/// (b) A panic in the data plane (the test hook); the log has the message.
#[test]
fn panic_restarts() {
    require!(require_userns);
    restart_keeps_network(Rnet::new(), false, panic_hook);
}

/// (c) A port published at run time through the control socket still
/// serves after a restart, and keeps its id.
#[test]
fn runtime_port_survives_restart() {
    require!(require_userns);
    let t = Target::userns();
    let api = TempPath::new("supervise-port");
    let rnet = start(
        &Rnet::new(),
        &[
            "--api-socket",
            api.0.to_str().unwrap(),
            &t.pid().to_string(),
        ],
    );
    let _guest = guest_server(&t);
    let port = free_port();
    port_cli(&api.0, "add", &[&format!("127.0.0.1:{port}:{GUEST_PORT}")])
        .assert_success("rnet port add");
    assert!(published_serves(port), "runtime port before the crash");
    let rows = port_rows(&api.0);
    let old = worker(rnet.pid(), None);
    sigkill(old);
    let _ = worker(rnet.pid(), Some(old));
    assert!(
        poll_until(secs(5), || published_serves(port).then_some(())).is_some(),
        "the runtime port does not serve after the restart"
    );
    assert_eq!(port_rows(&api.0), rows, "rules after the restart");
    let out = term(rnet);
    assert_stderr_has(&out, "data plane restarted");
}

/// (b') The panic's message is the cause in the log.
#[test]
fn panic_cause_is_logged() {
    require!(require_userns);
    let t = Target::userns();
    let rnet = start(&Rnet::new(), &[&t.pid().to_string()]);
    let old = worker(rnet.pid(), None);
    panic_hook(old);
    let _ = worker(rnet.pid(), Some(old));
    let out = term(rnet);
    assert_stderr_has(&out, "data plane died (panic: test hook");
}

/// (d) The sixth crash within a minute ends rnet, non-zero, with the cause.
#[test]
fn six_crashes_end_rnet() {
    require!(require_userns);
    let t = Target::userns();
    let api = TempPath::new("supervise-give-up");
    let mut rnet = start(
        &Rnet::new(),
        &[
            "--api-socket",
            api.0.to_str().unwrap(),
            &t.pid().to_string(),
        ],
    );
    assert!(api.0.exists(), "no API socket at {}", api.0.display());
    let mut w = worker(rnet.pid(), None);
    for _ in 0..5 {
        sigkill(w);
        w = worker(rnet.pid(), Some(w));
    }
    sigkill(w);
    assert!(rnet.wait_timeout(secs(10)).is_some(), "rnet still runs");
    let out = rnet.stop(Duration::ZERO).1;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_stderr_has(&out, "killed by SIGKILL");
    assert_stderr_has(&out, "6th crash within 60 s; giving up");
    // No worker was left to remove it: the supervisor did.
    assert!(
        !api.0.exists(),
        "API socket {} left after giving up",
        api.0.display()
    );
}

/// (e) With `--no-supervise` the data plane is rnet itself: a panic ends
/// rnet with an error and nothing restarts it.
#[test]
fn no_supervise_panic_ends_rnet() {
    require!(require_userns);
    let t = Target::userns();
    let mut rnet = start(&Rnet::new().arg("--no-supervise"), &[&t.pid().to_string()]);
    panic_hook(rnet.pid());
    assert!(rnet.wait_timeout(secs(10)).is_some(), "rnet still runs");
    let out = rnet.stop(Duration::ZERO).1;
    // Exit code 1, or a signal if the panic's report trips the sandbox.
    assert!(!out.status.success(), "{out}");
    assert_stderr_has(&out, "test hook: SIGUSR2");
    assert!(!out.stderr.contains("restarted"), "{out}");
}
