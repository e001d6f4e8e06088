//! The operator's kit: the Prometheus endpoint (`--metrics-addr`) scraped by
//! a real Prometheus server, its refusals and deadlines, JSON log lines,
//! shell completions and the manual page.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// One HTTP/1.0 exchange: the status line and the body.
fn http(addr: SocketAddr, request: &[u8]) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

fn scrape(addr: SocketAddr) -> (String, String) {
    http(addr, b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").expect("scrape")
}

/// The value of the sample `name{labels}` in an exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A guest under rnet with `--metrics-addr`, and a host server it can reach.
struct Served {
    target: Target,
    rnet: Proc,
    srv: HttpServer,
    metrics: SocketAddr,
}

fn serve_with_metrics() -> Served {
    let target = Target::userns();
    let srv = HttpServer::start();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let rnet = Rnet::new()
        .allow_host_loopback()
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .attach(target.pid());
    Served {
        target,
        rnet,
        srv,
        metrics,
    }
}

impl Served {
    fn curl_gateway(&self) {
        let url = format!("http://{GATEWAY}:{}/", self.srv.port());
        let out = run(
            &mut self.target.exec(&strs(&curl(&url))),
            Duration::from_secs(30),
        );
        out.assert_success("guest curl to the gateway");
        assert_eq!(out.stdout, HTTP_BODY, "{out}");
    }

    fn stop(self) {
        let mut p = self.rnet;
        p.signal(libc::SIGTERM);
        let (clean, out) = p.stop(Duration::from_secs(5));
        assert!(clean && out.code() == Some(0), "rnet did not exit 0: {out}");
    }
}

#[test]
fn metrics_endpoint_serves_the_status_families() {
    if !require_userns("metrics_endpoint_serves_the_status_families") {
        return;
    }
    let s = serve_with_metrics();
    let (status, before) = scrape(s.metrics);
    assert_eq!(status, "HTTP/1.1 200 OK", "{before}");
    for family in [
        "# TYPE rnet_tap_bytes_total counter",
        "# TYPE rnet_flows gauge",
        "# TYPE rnet_drops_total counter",
        "# TYPE rnet_build_info gauge",
        "# TYPE rnet_restarts_total counter",
    ] {
        assert!(before.contains(family), "no {family:?} in:\n{before}");
    }
    assert!(
        before.contains(&format!(
            "rnet_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{before}"
    );
    let in0 = sample(&before, "rnet_tap_bytes_total{direction=\"in\"}").expect("bytes in");
    s.curl_gateway();
    let (_, after) = scrape(s.metrics);
    let in1 = sample(&after, "rnet_tap_bytes_total{direction=\"in\"}").expect("bytes in");
    println!("rnet_tap_bytes_total{{direction=\"in\"}}: {in0} -> {in1}");
    assert!(in1 > in0, "bytes in did not grow: {in0} -> {in1}");

    // Anything but GET /metrics gets a plain error, and scraping goes on.
    let (st, _) = http(s.metrics, b"GET /nothing HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(st, "HTTP/1.1 404 Not Found");
    let (st, _) = http(s.metrics, b"POST /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(st, "HTTP/1.1 405 Method Not Allowed");
    let (st, _) = http(s.metrics, b"\x16\x03\x01 garbage\r\n\r\n").unwrap();
    assert_eq!(st, "HTTP/1.1 400 Bad Request");

    // A client that trickles its request is cut off at the deadline for the
    // whole head (2 s); the scrape behind it is answered after that.
    let mut slow = TcpStream::connect(s.metrics).unwrap();
    slow.write_all(b"GET /met").unwrap();
    let t = Instant::now();
    let trickle = std::thread::spawn(move || {
        for b in b"rics HTTP/1.0\r\n" {
            if slow.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        let mut rest = Vec::new();
        let _ = slow.read_to_end(&mut rest);
        rest
    });
    let (st, _) = scrape(s.metrics);
    let waited = t.elapsed();
    assert_eq!(st, "HTTP/1.1 200 OK");
    println!("scrape behind a trickling client answered after {waited:?}");
    assert!(
        waited < Duration::from_secs(5),
        "the trickling client held the endpoint for {waited:?}"
    );
    let rest = trickle.join().unwrap();
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "the trickling client was served"
    );
    s.curl_gateway();
    s.stop();
}

#[test]
fn metrics_addr_must_be_loopback_unless_public() {
    if !require_userns("metrics_addr_must_be_loopback_unless_public") {
        return;
    }
    // Refused while parsing settings, before anything is bound or joined.
    let out = run(
        &mut Rnet::new().command("attach", &["--metrics-addr", "0.0.0.0:9", "1"]),
        Duration::from_secs(20),
    );
    out.assert_failure("rnet with a public --metrics-addr");
    assert_stderr_has(&out, "--metrics-addr-public");
    let out = run(
        &mut Rnet::new().command("attach", &["--metrics-addr-public", "1"]),
        Duration::from_secs(20),
    );
    out.assert_failure("--metrics-addr-public alone");
    assert_stderr_has(&out, "--metrics-addr");
}

#[test]
fn prometheus_scrapes_rnet() {
    if !require_userns("prometheus_scrapes_rnet")
        || !require_program("prometheus_scrapes_rnet", "prometheus")
    {
        return;
    }
    let s = serve_with_metrics();
    let dir = TempDir::new("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: rnet\n    static_configs:\n      - targets: ['{}']\n",
            s.metrics
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut prom = Command::new("prometheus");
    prom.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null());
    clean_env(&mut prom);
    let prom = Proc::spawn(&mut prom);
    let query = |q: &str| -> Option<f64> {
        let req = format!("GET /api/v1/query?query={q} HTTP/1.0\r\nHost: test\r\n\r\n");
        // Prometheus is polled a few times a second, not in a tight loop.
        std::thread::sleep(Duration::from_millis(200));
        let (st, body) = http(web, req.as_bytes()).ok()?;
        if !st.contains("200") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    // rnet_tap_bytes_total{direction="in"}, URL-encoded.
    let q = "rnet_tap_bytes_total%7Bdirection%3D%22in%22%7D";
    let first = poll_until(Duration::from_secs(60), || query(q));
    let Some((first, took)) = first else {
        panic!(
            "Prometheus never returned rnet_tap_bytes_total: {}",
            prom.stop(Duration::from_secs(5)).1
        );
    };
    println!("first sample {first} through Prometheus after {took:?}");
    s.curl_gateway();
    let grown = poll_until(Duration::from_secs(30), || query(q).filter(|v| *v > first));
    let Some((grown, took)) = grown else {
        panic!(
            "rnet_tap_bytes_total did not grow in Prometheus past {first}: {}",
            prom.stop(Duration::from_secs(5)).1
        );
    };
    println!("grew to {grown} after {took:?}");
    let up = query("up%7Bjob%3D%22rnet%22%7D");
    assert_eq!(up, Some(1.0), "Prometheus does not see the target up");
    drop(prom);
    s.stop();
}

#[test]
fn json_log_lines() {
    if !require_userns("json_log_lines") {
        return;
    }
    let target = Target::userns();
    let mut p = Rnet::new()
        .arg("--log-format")
        .arg("json")
        .attach(target.pid());
    p.signal(libc::SIGTERM);
    let (clean, out) = p.stop(Duration::from_secs(5));
    assert!(clean && out.code() == Some(0), "{out}");
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines: {out}");
    let mut messages = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    assert!(
        messages.iter().any(|m| m == "network stopped"),
        "no 'network stopped' line: {messages:?}"
    );
}

#[test]
fn completions_load_in_bash() {
    if !require_program("completions_load_in_bash", "bash") {
        return;
    }
    let script = run(
        Command::new(RNET).args(["completions", "bash"]),
        Duration::from_secs(10),
    );
    script.assert_success("rnet completions bash");
    let file = TempPath::new("rnet-completion.bash");
    std::fs::write(&file.0, &script.stdout).unwrap();
    let out = run(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source {}; complete -p rnet", file.0.display())),
        Duration::from_secs(10),
    );
    out.assert_success("bash loading the completion");
    assert!(
        out.stdout.contains("complete") && out.stdout.contains(" rnet"),
        "{out}"
    );
    for shell in ["zsh", "fish"] {
        let out = run(
            Command::new(RNET).args(["completions", shell]),
            Duration::from_secs(10),
        );
        out.assert_success(shell);
        assert!(out.stdout.contains("attach"), "{shell}: {out}");
    }
}

#[test]
fn man_page_renders() {
    if !require_program("man_page_renders", "man") {
        return;
    }
    let page = TempPath::new("rnet.1");
    let out = run(Command::new(RNET).arg("man"), Duration::from_secs(10));
    out.assert_success("rnet man");
    std::fs::write(&page.0, &out.stdout).unwrap();
    let mut man = Command::new("man");
    man.arg("-l")
        .arg(&page.0)
        .env("MANPAGER", "cat")
        .env("COLUMNS", "100");
    let out = run(&mut man, Duration::from_secs(20));
    out.assert_success("man -l rnet.1");
    for want in ["NAME", "SYNOPSIS", "attach", "--log-format"] {
        assert!(
            out.stdout.contains(want),
            "no {want:?} in the rendered page: {out}"
        );
    }
    let dir = TempDir::new("man");
    let out = run(
        Command::new(RNET).arg("man").arg("--dir").arg(dir.path()),
        Duration::from_secs(10),
    );
    out.assert_success("rnet man --dir");
    for page in ["rnet.1", "rnet-attach.1", "rnet-run.1", "rnet-port.1"] {
        assert!(dir.join(page).is_file(), "no {page} written");
    }
}

#[test]
fn systemd_notify_ready() {
    if !require_userns("systemd_notify_ready") {
        return;
    }
    let target = Target::userns();
    let srv = HttpServer::start();
    let sock_path = TempPath::new("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path.0).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = Rnet::new()
        .allow_host_loopback()
        .command("attach", &[&target.pid().to_string()]);
    cmd.env("NOTIFY_SOCKET", &sock_path.0);
    let mut p = Proc::spawn(&mut cmd);
    let mut buf = [0u8; 64];
    let n = match sock.recv(&mut buf) {
        Ok(n) => n,
        Err(e) => panic!("no READY=1 ({e}): {}", p.stop(Duration::ZERO).1),
    };
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means usable: the guest reaches the host at once.
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = run(
        &mut target.exec(&strs(&curl(&url))),
        Duration::from_secs(30),
    );
    out.assert_success("guest curl right after READY=1");
    assert_eq!(out.stdout, HTTP_BODY);
    p.signal(libc::SIGTERM);
    let (clean, out) = p.stop(Duration::from_secs(5));
    assert!(clean && out.code() == Some(0), "{out}");
}
