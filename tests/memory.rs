//! Memory per TCP flow: many flows moving data both ways all complete, the
//! rings give their memory back once the flows idle, and the global memory
//! budget pauses flows and resumes every one of them.
//!
//! Network rule: every flow goes to a host server on loopback behind
//! 10.0.2.2 (--allow-host-loopback); rnet runs with `--outbound-allow none`
//! and a loopback DNS upstream (see `common::Rnet`).
//!
//! The guest client and the host echo server are examples/memflows.rs (one
//! thread and one epoll set for all flows; Python would be the bottleneck).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

macro_rules! test_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// Flows at once, and bytes each moves each way.
const FLOWS: usize = 1000;
const BYTES: u64 = 1 << 20;
/// Rounds of the 1,000-flow run.
const ROUNDS: usize = 5;
/// Bound of one round; a flow not done by then is stalled.
const ROUND_SECS: u64 = 180;
/// rnet's resident memory with every flow idle after the rounds.
const IDLE_RSS_CEILING_KIB: u64 = 64 * 1024;

/// The memflows example next to rnet's binary, built when missing (a test
/// run of one target does not build the examples).
fn memflows() -> PathBuf {
    let dir = Path::new(RNET).parent().expect("rnet's directory");
    let exe = dir.join("examples").join("memflows");
    if !exe.exists() {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--locked", "--example", "memflows"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.ends_with("release") {
            c.arg("--release");
        }
        run(&mut c, Duration::from_secs(600)).assert_success("cargo build --example memflows");
    }
    assert!(exe.exists(), "no {}", exe.display());
    exe
}

/// The host echo server; its address on loopback.
fn echo_server(exe: &Path) -> (LineProc, SocketAddr) {
    let mut p = LineProc::spawn(Command::new(exe).arg("serve"));
    let l = p.wait_line("listening", secs(20), |l| l.contains("listening"));
    let v: Value = serde_json::from_str(&l).expect("listening JSON");
    let addr = v["listening"].as_str().unwrap().parse().unwrap();
    (p, addr)
}

/// A guest namespace served by `rnet attach` with a control socket.
struct Guest {
    target: Target,
    rnet: Proc,
    api: TempPath,
}

impl Guest {
    fn start(rnet: Rnet) -> Guest {
        let target = Target::userns();
        let api = TempPath::new("api");
        let rnet = rnet.arg("--api-socket").arg(&api.0).attach(target.pid());
        Guest { target, rnet, api }
    }

    fn status(&self) -> Value {
        status_json(&self.api.0)
    }

    fn rss_kib(&self) -> u64 {
        proc_kib(self.rnet.pid(), "VmRSS").expect("rnet is running")
    }

    /// The client command for `flows` flows to the host port `port`.
    fn client(&self, exe: &Path, port: u16, flows: usize, hold: bool) -> Command {
        let exe = exe.to_str().unwrap();
        let to = format!("10.0.2.2:{port}");
        let (flows, bytes, timeout) =
            (flows.to_string(), BYTES.to_string(), ROUND_SECS.to_string());
        let mut args = vec![
            exe,
            "client",
            "--connect",
            &to,
            "--flows",
            &flows,
            "--bytes",
            &bytes,
            "--timeout",
            &timeout,
        ];
        if hold {
            args.push("--hold");
        }
        self.target.exec(&args)
    }

    fn stop(mut self) -> Output {
        self.rnet.signal(libc::SIGTERM);
        self.rnet.stop(secs(10)).1
    }
}

/// One client run's result line.
struct Round {
    done: u64,
    failed: u64,
    stalled: u64,
    secs: f64,
    line: String,
}

fn parse_round(line: &str) -> Round {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Round {
        done: v["done"].as_u64().unwrap_or(0),
        failed: v["failed"].as_u64().unwrap_or(0),
        stalled: v["stalled"].as_u64().unwrap_or(0),
        secs: v["secs"].as_f64().unwrap_or(0.0),
        line: line.to_string(),
    }
}

/// Runs the client to completion and parses its line.
fn round(g: &Guest, exe: &Path, port: u16, flows: usize) -> Round {
    let out = run(
        &mut g.client(exe, port, flows, false),
        secs(ROUND_SECS + 60),
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("memflows client printed no result: {out}"))
        .to_string();
    parse_round(&line)
}

fn memory(status: &Value) -> &Value {
    &status["tcp_memory"]
}

/// 1,000 concurrent flows through rnet to a host echo server, each moving
/// 1 MiB each way with checked data, five rounds: every flow of every round
/// completes. In the last round the connections stay open afterwards, and
/// rnet's RSS with all 1,000 of them idle falls to 64 MiB or less.
#[test]
fn thousand_flows_complete_and_idle_rss_returns() {
    if !require_userns(test_name!()) {
        return;
    }
    let exe = memflows();
    let (_server, addr) = echo_server(&exe);
    let g = Guest::start(Rnet::new().allow_host_loopback());
    let idle0 = g.rss_kib();
    let mut fails = Vec::new();
    let mut report = format!("rnet RSS at start {:.1} MiB\n", mib(idle0));
    for i in 1..ROUNDS {
        let r = round(&g, &exe, addr.port(), FLOWS);
        report += &format!(
            "round {i}: {} done, {} failed, {} stalled in {:.1} s; rnet RSS {:.1} MiB\n",
            r.done,
            r.failed,
            r.stalled,
            r.secs,
            mib(g.rss_kib())
        );
        if r.done != FLOWS as u64 {
            fails.push(format!("round {i}: {}", r.line));
        }
    }
    // The last round holds its connections open once done.
    let mut c = g.client(&exe, addr.port(), FLOWS, true);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().expect("spawn memflows client");
    let stdin = child.stdin.take();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().and_then(Result::ok).unwrap_or_default();
    let r = parse_round(&line);
    let busy = g.rss_kib();
    let hwm = proc_kib(g.rnet.pid(), "VmHWM").unwrap_or(0);
    report += &format!(
        "round {ROUNDS}: {} done, {} failed, {} stalled in {:.1} s; rnet RSS {:.1} MiB, VmHWM {:.1} MiB\n",
        r.done,
        r.failed,
        r.stalled,
        r.secs,
        mib(busy),
        mib(hwm)
    );
    if r.done != FLOWS as u64 {
        fails.push(format!("round {ROUNDS}: {line}"));
    }
    let open = g.status()["flows"]["tcp"].clone();
    // Idle rings give their memory back after rnet's idle delay: the ring
    // memory rnet accounts falls to zero, and RSS under the ceiling.
    let t0 = Instant::now();
    let idle = poll_until(secs(30), || {
        let k = g.rss_kib();
        let zero = memory(&g.status())["resident"].as_u64() == Some(0);
        (zero && k <= IDLE_RSS_CEILING_KIB).then_some(k)
    });
    let idle_kib = idle.map(|(k, _)| k).unwrap_or_else(|| g.rss_kib());
    let st = g.status();
    report += &format!(
        "idle with {FLOWS} open flows ({open}): rnet RSS {:.1} MiB after {:.1} s (ceiling {:.0} MiB); tcp_memory {}\n",
        mib(idle_kib),
        t0.elapsed().as_secs_f64(),
        mib(IDLE_RSS_CEILING_KIB),
        memory(&st)
    );
    if idle.is_none() {
        fails.push(format!(
            "RSS {:.1} MiB with the flows idle (ceiling {:.0} MiB)",
            mib(idle_kib),
            mib(IDLE_RSS_CEILING_KIB)
        ));
    }
    if memory(&st)["resident"].as_u64() != Some(0) {
        fails.push(format!("ring memory still accounted: {}", memory(&st)));
    }
    drop(stdin);
    let _ = child.wait();
    let gone = poll_until(secs(30), || {
        let f = &g.status()["flows"]["tcp"];
        f.as_object().is_none_or(|m| m.is_empty()).then_some(())
    });
    report += &format!(
        "after the flows closed: rnet RSS {:.1} MiB{}\n",
        mib(g.rss_kib()),
        if gone.is_some() {
            String::new()
        } else {
            format!(" (flows still listed: {})", g.status()["flows"]["tcp"])
        }
    );
    eprintln!("{report}");
    let out = g.stop();
    if out.stderr.contains("panicked") {
        fails.push(format!("rnet panicked: {out}"));
    }
    assert!(fails.is_empty(), "{}\n{report}", fails.join("\n"));
}

/// With an 8 MiB budget, 100 flows moving 1 MiB each way cannot all hold
/// their rings at once: the budget pauses flows (counted), and every one is
/// resumed and completes.
#[test]
fn small_budget_pauses_and_resumes_every_flow() {
    if !require_userns(test_name!()) {
        return;
    }
    let exe = memflows();
    let (_server, addr) = echo_server(&exe);
    let g = Guest::start(
        Rnet::new()
            .allow_host_loopback()
            .arg("--memory-budget")
            .arg("8"),
    );
    let r = round(&g, &exe, addr.port(), 100);
    let st = g.status();
    let m = memory(&st).clone();
    let hwm = proc_kib(g.rnet.pid(), "VmHWM").unwrap_or(u64::MAX);
    let report = format!(
        "100 flows, 8 MiB budget: {}; tcp_memory {m}; rnet VmHWM {:.1} MiB",
        r.line,
        mib(hwm)
    );
    eprintln!("{report}");
    let out = g.stop();
    assert!(!out.stderr.contains("panicked"), "rnet panicked: {out}");
    assert_eq!(r.done, 100, "not every flow completed: {report}");
    assert!(
        m["pauses"].as_u64().unwrap_or(0) > 0,
        "no pause counted: {report}"
    );
    assert!(
        m["resumes"].as_u64().unwrap_or(0) > 0,
        "no paused flow resumed: {report}"
    );
    assert_eq!(m["budget"].as_u64(), Some(8 << 20), "{report}");
    // The budget bounds rnet's memory: rnet's own ~6 MiB, the flows'
    // bookkeeping, and rings up to the hard ceiling a quarter above the
    // budget.
    assert!(hwm <= 32 * 1024, "rnet's RSS peaked past 32 MiB: {report}");
}
