//! The namespace agent of the published-port fast path, as a guest that is
//! root in its own user namespace sees it, with rnet as uid 65534 on the
//! default (fast) port path: the agent cannot be traced, shows an empty
//! root and environment, runs with no_new_privs, seccomp and few
//! capabilities; stopping it stalls nothing (gateway pings stay fast,
//! published ports are served on the stack path) and rnet replaces it;
//! killing it makes rnet start a new one, and the fast path comes back. A
//! test hook makes the agent hand back a pipe instead of a socket: rnet
//! refuses it, counts it and still serves the client.
//!
//! The guest server is `tests/guest/port_server.py` under `rnet run`. Guest
//! root processes are started with `setpriv` (uid 65534) and `nsenter -U
//! -n` into the guest's namespaces, which makes them root there exactly as
//! the guest's own processes are. Every rnet runs with `--outbound-allow
//! none` and a loopback DNS upstream (the builder's defaults); the only
//! traffic is loopback clients of the published port and pings of the
//! gateway, which rnet answers itself.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use common::*;

/// CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12): all the agent keeps.
const AGENT_CAPS: u64 = (1 << 10) | (1 << 12);

/// A guest server under `rnet run` as uid 65534 with one published port,
/// and the API socket to watch it.
struct Setup {
    guest: LineProc,
    api: TempPath,
    port: u16,
}

fn start(env: &[(&str, &str)]) -> Setup {
    let api = TempPath::new("api");
    let port = free_service_block(1);
    let rnet = Rnet::new()
        .nobody()
        .arg("-v")
        .arg("-p")
        .arg(format!("127.0.0.1:{port}:8080"))
        .arg("--api-socket")
        .arg(&api.0);
    let script = guest_script("port_server.py");
    let mut cmd = rnet.run_cmd(&[PYTHON, &script, "http:8080"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut guest = LineProc::spawn(&mut cmd);
    guest.wait_line("listening", secs(30), |l| l == "listening");
    Setup { guest, api, port }
}

impl Setup {
    fn status(&self) -> serde_json::Value {
        status_json(&self.api.0)
    }

    /// Waits for a ready agent other than `not` and returns its pid.
    #[track_caller]
    fn ready_agent(&self, not: Option<u64>) -> u64 {
        let mut last = serde_json::Value::Null;
        let got = poll_until(secs(15), || {
            last = self.status();
            let a = &last["agent"];
            let pid = a["pid"].as_u64()?;
            (a["state"] == "ready" && Some(pid) != not).then_some(pid)
        });
        match got {
            Some((pid, _)) => pid,
            None => panic!("no ready agent (other than {not:?}): {}", last["agent"]),
        }
    }

    /// Bytes moved by spliced (fast-path) connections so far.
    fn spliced(&self) -> u64 {
        let s = self.status();
        s["spliced_bytes"]["to_guest"].as_u64().unwrap_or(0)
            + s["spliced_bytes"]["from_guest"].as_u64().unwrap_or(0)
    }

    /// GET through the published port; the guest's answer.
    #[track_caller]
    fn get(&self) -> String {
        let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let (body, _) = http_get(dst).unwrap_or_else(|e| panic!("GET through the port: {e}"));
        assert!(body.starts_with("client="), "{body:?}");
        body
    }

    /// The pid of the guest server (rnet's child running port_server.py).
    fn guest_pid(&self) -> u32 {
        let rnet = self.guest.pid();
        children(rnet)
            .into_iter()
            .find(|c| {
                std::fs::read(format!("/proc/{c}/cmdline"))
                    .is_ok_and(|b| String::from_utf8_lossy(&b).contains("port_server.py"))
            })
            .unwrap_or_else(|| panic!("no guest server among rnet {rnet}'s children"))
    }
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Ok(t) = t else { continue };
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse::<u32>().ok()),
        );
    }
    out
}

/// A command run as a root process of the guest: uid 65534 on the host,
/// in the guest's user and network namespaces (uid 0 there).
fn as_guest_root(guest_pid: u32, argv: &[&str]) -> Command {
    let mut c = setpriv_nobody("nsenter");
    // uid 65534 is the guest's root: keep it (the guest's setgroups is
    // denied, so nsenter must not try to switch credentials).
    c.args([
        "--preserve-credentials",
        "-t",
        &guest_pid.to_string(),
        "-U",
        "-n",
        "--",
    ]);
    c.args(argv);
    c
}

/// Tries, from a guest root process, what a hostile guest would do to the
/// agent: PTRACE_SEIZE it, read its environment, list its root. Prints one
/// line per attempt, "NAME ok" or "NAME errno=N".
const PROBE: &str = r#"
import ctypes, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206
r = libc.ptrace(PTRACE_SEIZE, pid, None, None)
print("ptrace ok" if r == 0 else "ptrace errno=%d" % ctypes.get_errno(), flush=True)
for name, f in (("environ", lambda: open("/proc/%d/environ" % pid, "rb").read()),
                ("root", lambda: os.listdir("/proc/%d/root" % pid))):
    try:
        f()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, "errno=%d" % e.errno, flush=True)
"#;

fn status_field(pid: u64, name: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    st.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status: {st}"))
}

fn hex(pid: u64, name: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, name), 16).unwrap_or(u64::MAX)
}

/// The tests here run one at a time: the stall test measures latencies.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require(test: &str) -> bool {
    require_root(test)
        && require_program(test, "nsenter")
        && require_program(test, "setpriv")
        && require_program(test, "ping")
}

#[test]
fn agent_is_confined() {
    if !require("agent_is_confined") {
        return;
    }
    let _serial = serial();
    let s = start(&[]);
    let agent = s.ready_agent(None);
    // Fast path in use.
    let before = s.spliced();
    s.get();
    assert!(
        poll_until(secs(5), || (s.spliced() > before).then_some(())).is_some(),
        "the GET did not take the fast path: {}",
        s.status()
    );

    // What the host sees (as root).
    assert_eq!(status_field(agent, "NoNewPrivs"), "1");
    assert_eq!(status_field(agent, "Seccomp"), "2");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(hex(agent, set) & !AGENT_CAPS, 0, "{set} of the agent");
    }
    assert_eq!(hex(agent, "CapInh"), 0);
    assert_eq!(hex(agent, "CapAmb"), 0);
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/root"))
        .expect("list the agent's root")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(root.is_empty(), "the agent's root holds {root:?}");
    let environ = std::fs::read(format!("/proc/{agent}/environ")).expect("read environ");
    assert!(environ.is_empty(), "the agent's environment: {environ:?}");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .expect("list the agent's fds")
        .filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            Some(link.to_string_lossy().into_owned())
        })
        .collect();
    // stdin/out/err (/dev/null), its socket, four socket tables, the
    // netlink socket of the reply rules.
    assert!(fds.len() <= 9, "the agent holds {fds:?}");
    assert!(
        fds.iter()
            .all(|l| l == "/dev/null" || l.starts_with("socket:") || l.contains("/net/")),
        "the agent holds {fds:?}"
    );
    let fds = fds.len();
    eprintln!(
        "agent {agent}: CapEff {:#x}, {fds} descriptors",
        hex(agent, "CapEff")
    );

    // What a guest root can do to it: nothing.
    let out = run(
        &mut as_guest_root(s.guest_pid(), &[PYTHON, "-c", PROBE, &agent.to_string()]),
        secs(30),
    );
    out.assert_success("the guest-root probe");
    for l in ["ptrace errno=1", "environ errno=13", "root errno=13"] {
        assert!(out.stdout.lines().any(|x| x == l), "want {l:?}: {out}");
    }
    // And it still works.
    s.get();
    drop(s);
}

/// `ping -c 5 -i 0.2` of the gateway from the guest; the round-trip times.
fn ping_gateway(guest_pid: u32) -> Vec<f64> {
    let out = run(
        &mut as_guest_root(guest_pid, &["ping", "-n", "-c", "5", "-i", "0.2", GATEWAY]),
        secs(30),
    );
    out.assert_success("ping the gateway from the guest");
    let times: Vec<f64> = out
        .stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(times.len(), 5, "{out}");
    times
}

/// Stops `agent`, GETs through the port while pinging the gateway from the
/// guest; the ping times and how long the GET took.
fn stall_round(s: &Setup, guest_pid: u32, agent: u64) -> (Vec<f64>, std::time::Duration) {
    // SAFETY: kill(2) with a pid read from rnet's status.
    assert_eq!(unsafe { libc::kill(agent as i32, libc::SIGSTOP) }, 0);
    let spliced = s.spliced();
    let t0 = Instant::now();
    let port = s.port;
    let client = std::thread::spawn(move || {
        http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map(|(b, _)| (b, t0.elapsed()))
    });
    let times = ping_gateway(guest_pid);
    let (body, took) = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("GET while the agent is stopped: {e}"));
    assert!(body.starts_with("client="), "{body:?}");
    assert_eq!(s.spliced(), spliced, "the GET cannot have been spliced");
    (times, took)
}

#[test]
fn stopped_or_killed_agent_is_replaced() {
    if !require("stopped_or_killed_agent_is_replaced") {
        return;
    }
    let _serial = serial();
    let s = start(&[]);
    let guest_pid = s.guest_pid();
    let first = s.ready_agent(None);
    let first_of_all = first;

    // Stopped: a connection waits for it in vain while pings of the
    // gateway stay fast; the connection is served on the stack path. On a
    // loaded machine a ping may be late for reasons of its own: up to three
    // rounds (each with the agent rnet started after the last), one must
    // have every ping under 10 ms.
    let mut agent = first;
    let mut rounds = Vec::new();
    for round in 0..3 {
        if round > 0 {
            agent = s.ready_agent(Some(agent));
        }
        let (times, took) = stall_round(&s, guest_pid, agent);
        let worst = times.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "agent {agent} stopped: gateway ping rtts {times:?} ms (worst {worst}); GET took {took:?}"
        );
        rounds.push(times);
        if worst < 10.0 {
            break;
        }
    }
    assert!(
        rounds.iter().any(|t| t.iter().all(|&ms| ms < 10.0)),
        "gateway pings with the agent stopped: {rounds:?} ms"
    );
    let first = agent;

    // rnet killed the stopped agent and started another.
    let second = s.ready_agent(Some(first));
    let before = s.spliced();
    s.get();
    assert!(
        poll_until(secs(5), || (s.spliced() > before).then_some(())).is_some(),
        "the new agent {second} does not carry the fast path: {}",
        s.status()
    );

    // Killed: replaced as well, and the fast path comes back.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(second as i32, libc::SIGKILL) }, 0);
    let third = s.ready_agent(Some(second));
    assert_ne!(third, first);
    assert_ne!(third, first_of_all);
    let before = s.spliced();
    s.get();
    assert!(
        poll_until(secs(5), || (s.spliced() > before).then_some(())).is_some(),
        "the agent {third} does not carry the fast path: {}",
        s.status()
    );
    let st = s.status();
    assert!(
        st["agent"]["restarts"].as_u64() >= Some(2),
        "{}",
        st["agent"]
    );
    assert_eq!(status_field(third, "Seccomp"), "2");
    drop(s);
}

#[test]
fn bad_descriptor_from_the_agent_is_refused() {
    if !require("bad_descriptor_from_the_agent_is_refused") {
        return;
    }
    let _serial = serial();
    // Test hook: every agent answers connection requests with a pipe.
    let s = start(&[("RNET_TEST_AGENT_BAD_FD", "1")]);
    s.ready_agent(None);
    let before = drop_counts(&s.status());
    for _ in 0..2 {
        s.get();
    }
    let st = s.status();
    let after = drop_counts(&st);
    let bad = after.get("agent_bad_fd").copied().unwrap_or(0)
        - before.get("agent_bad_fd").copied().unwrap_or(0);
    assert!(bad >= 1, "no agent_bad_fd counted: {}", st["drops"]);
    assert_eq!(s.spliced(), 0, "a pipe cannot carry a connection");
    eprintln!("agent_bad_fd: {bad}; agent {}", st["agent"]);
    drop(s);
}
