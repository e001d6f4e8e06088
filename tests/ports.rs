//! Port publishing end to end: `-p`, the control socket (slirp4netns's JSON
//! protocol), `rnet port`, source addresses, UDP, ranges, bulk and
//! concurrent transfers, half-close and reset, start-up errors.
//!
//! The guest side is `tests/guest/port_server.py` run by `rnet run`; it
//! prints "listening" once every socket is bound, which is what the tests
//! wait for before a host client connects. Host ports are picked free
//! outside the kernel's ephemeral range (see [`free_block`]), so tests can
//! run in parallel. Every rnet runs with `--outbound-allow none` (the
//! builder's default) and a loopback DNS upstream.

mod common;

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
const GUEST: &str = "10.0.2.100";
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

// ---------------------------------------------------------------- host ports

/// Ports the kernel never hands out by itself: below (or above) the
/// ephemeral range, so a port checked free stays free unless another test
/// names it explicitly (and this process never hands one out twice).
fn port_band() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let v: Vec<u32> = r.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (lo, hi) = (v[0], v[1]);
    if lo >= 10000 + 8000 {
        (10000, lo)
    } else if hi + 8000 < 65536 {
        (hi + 1, 65536)
    } else {
        (1024, 65536)
    }
}

/// The first of `n` consecutive ports that are free for both TCP and UDP on `ip`.
fn free_block(ip: Ipv4Addr, n: u32) -> u16 {
    static TAKEN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
    let (lo, hi) = port_band();
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
            TcpListener::bind((ip, p as u16)).is_ok() && UdpSocket::bind((ip, p as u16)).is_ok()
        });
        if free {
            taken.extend(start..start + n);
            return start as u16;
        }
    }
    panic!("no {n} consecutive free ports on {ip} in {lo}-{hi}");
}

fn free_port(ip: Ipv4Addr) -> u16 {
    free_block(ip, 1)
}

// ---------------------------------------------------------------- guest servers

/// `rnet run [rnet's options] -- python3 port_server.py SPECS...`, started
/// and waited for until the guest prints "listening".
fn start_guest(rnet: &Rnet, specs: &[&str]) -> LineProc {
    let script = guest_script("port_server.py");
    let mut argv = vec![PYTHON, script.as_str()];
    argv.extend_from_slice(specs);
    let mut lp = LineProc::spawn(&mut rnet.run_cmd(&argv));
    lp.wait_line("listening", secs(30), |l| l == "listening");
    lp
}

/// `-p SPEC` for the builder.
fn publish(rnet: Rnet, spec: &str) -> Rnet {
    rnet.arg("-p").arg(spec)
}

/// Host curl to `http://127.0.0.1:PORT/`.
fn host_curl(port: u16) -> Output {
    let url = format!("http://127.0.0.1:{port}/");
    let mut c = Command::new("curl");
    c.args(["-sS", "--noproxy", "*", "--max-time", "5", &url]);
    clean_env(&mut c);
    run(&mut c, secs(15))
}

/// Curl to a published port must reach guest port `guest_port` and show a
/// loopback client as the gateway.
#[track_caller]
fn assert_curl_reaches(port: u16, guest_port: u16) {
    let out = host_curl(port);
    out.assert_success("host curl to a published port");
    let seen = parse_seen(&out.stdout);
    assert_eq!(seen.guest_port, guest_port, "{out}");
    assert_eq!(seen.client.ip().to_string(), GATEWAY, "{out}");
}

#[track_caller]
fn assert_refused(port: u16) {
    let r = TcpStream::connect_timeout(&SocketAddr::from((LOCALHOST, port)), secs(5));
    match r {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("connect to withdrawn port {port}: want connection refused, got {other:?}"),
    }
}

// ---------------------------------------------------------------- API client

/// Sends raw bytes to the control socket (half-closing if asked) and reads
/// the reply to EOF.
fn api_raw(path: &Path, req: &[u8], half_close: bool) -> String {
    api_exchange(path, req, half_close, false)
}

/// As [`api_raw`]; with `oversized`, a reset after the reply is accepted: a
/// server that answers a request of more than 4096 bytes and closes with
/// the rest unread makes the kernel report ECONNRESET after the reply.
fn api_exchange(path: &Path, req: &[u8], half_close: bool, oversized: bool) -> String {
    let shown = String::from_utf8_lossy(&req[..req.len().min(80)]).into_owned();
    let mut c =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    c.set_read_timeout(Some(secs(15))).unwrap();
    // A too-large request may be cut short by the server's reply and close.
    let _ = c.write_all(req);
    if half_close {
        let _ = c.shutdown(Shutdown::Write);
    }
    let mut r = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(n) => r.extend_from_slice(&b[..n]),
            Err(e) if oversized && e.kind() == io::ErrorKind::ConnectionReset && !r.is_empty() => {
                break;
            }
            Err(e) => panic!(
                "reading the reply to {} bytes {shown:?}... (got {:?} so far): {e}",
                req.len(),
                String::from_utf8_lossy(&r)
            ),
        }
    }
    String::from_utf8(r).unwrap()
}

fn api(path: &Path, req: &Value) -> Value {
    let r = api_raw(path, req.to_string().as_bytes(), true);
    serde_json::from_str(&r).unwrap_or_else(|e| panic!("reply to {req} is not JSON ({e}): {r:?}"))
}

/// The request must get `{"error":{"desc":DESC}}` (rnet may add a `detail`
/// only where the failure has one, i.e. add_hostfwd's bind).
#[track_caller]
fn assert_api_error(path: &Path, req: &[u8], desc: &str) {
    let r = api_raw(path, req, true);
    let v: Value =
        serde_json::from_str(&r).unwrap_or_else(|e| panic!("reply {r:?} is not JSON: {e}"));
    let shown = String::from_utf8_lossy(&req[..req.len().min(200)]).into_owned();
    assert_eq!(
        v["error"]["desc"],
        json!(desc),
        "request {shown}: reply {r}"
    );
    if desc.ends_with("slirp_add_hostfwd failed") {
        assert!(v.get("return").is_none(), "request {shown}: reply {r}");
    } else {
        assert_eq!(
            v,
            json!({"error": {"desc": desc}}),
            "request {shown}: exact reply"
        );
    }
}

fn add_req(proto: &str, host_addr: &str, host_port: u16, guest_port: u16) -> Value {
    json!({"execute": "add_hostfwd", "arguments": {
        "proto": proto, "host_addr": host_addr, "host_port": host_port,
        "guest_addr": GUEST, "guest_port": guest_port}})
}

/// add_hostfwd that must succeed; returns (id, host_port from the reply).
#[track_caller]
fn api_add(path: &Path, req: &Value) -> (u64, u16) {
    let v = api(path, req);
    let id = v["return"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("add {req}: reply {v}"));
    let hp = v["return"]["host_port"].as_u64().unwrap_or(0) as u16;
    (id, hp)
}

/// `rnet port ACTION --api-socket PATH ARGS...`
fn port_cli(path: &Path, action: &str, args: &[&str]) -> Output {
    let mut c = Command::new(RNET);
    c.args(["port", action, "--api-socket"])
        .arg(path)
        .args(args);
    clean_env(&mut c);
    run(&mut c, secs(30))
}

/// Entries of list_hostfwd without rnet's extra fields, sorted by id.
fn listed(path: &Path) -> Vec<Value> {
    let v = api(path, &json!({"execute": "list_hostfwd"}));
    let mut e: Vec<Value> = v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("list reply {v}"))
        .iter()
        .map(|e| {
            let mut o = serde_json::Map::new();
            for k in [
                "id",
                "proto",
                "host_addr",
                "host_port",
                "guest_addr",
                "guest_port",
            ] {
                o.insert(k.into(), e[k].clone());
            }
            Value::Object(o)
        })
        .collect();
    e.sort_by_key(|e| e["id"].as_u64());
    e
}

fn entry(id: u64, proto: &str, host_addr: &str, host_port: u16, guest_port: u16) -> Value {
    json!({"id": id, "proto": proto, "host_addr": host_addr, "host_port": host_port,
           "guest_addr": GUEST, "guest_port": guest_port})
}

// ---------------------------------------------------------------- 1. -p, API, rnet port

#[test]
fn publish_by_flag_api_and_port_cli() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let (hp1, hp2, hp3) = (
        free_port(LOCALHOST),
        free_port(LOCALHOST),
        free_port(LOCALHOST),
    );
    let rnet = publish(Rnet::new(), &format!("127.0.0.1:{hp1}:8080"))
        .arg("--api-socket")
        .arg(p);
    let mut guest = start_guest(&rnet, &["http:8080-8082"]);

    // -p at start.
    assert_curl_reaches(hp1, 8080);

    // The control socket.
    let (id2, shown) = api_add(p, &add_req("tcp", "127.0.0.1", hp2, 8081));
    assert_eq!((id2, shown), (2, hp2), "the -p rule is id 1");
    assert_curl_reaches(hp2, 8081);

    // rnet port add.
    let out = port_cli(p, "add", &[&format!("127.0.0.1:{hp3}:8082")]);
    out.assert_success("rnet port add");
    assert_eq!(
        out.stdout.trim(),
        format!("id 3: host port {hp3} published"),
        "{out}"
    );
    assert_curl_reaches(hp3, 8082);

    // rnet port ls: a table with a header and one row per port ...
    let out = port_cli(p, "ls", &[]);
    out.assert_success("rnet port ls");
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(&rows[0][..4], ["ID", "PROTO", "HOST", "GUEST"], "{out}");
    for (id, hp, gp) in [(1, hp1, 8080), (2, hp2, 8081), (3, hp3, 8082)] {
        let want = [
            id.to_string(),
            "tcp".into(),
            format!("127.0.0.1:{hp}"),
            format!("{GUEST}:{gp}"),
        ];
        assert!(
            rows.iter().any(|r| r.len() >= 4 && r[..4] == want),
            "no row {want:?}: {out}"
        );
    }
    assert_eq!(rows.len(), 4, "header and three rows: {out}");
    // ... and --json, the list_hostfwd reply.
    let out = port_cli(p, "ls", &["--json"]);
    out.assert_success("rnet port ls --json");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let ids: Vec<u64> = v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3], "{out}");
    assert_eq!(
        listed(p),
        [
            entry(1, "tcp", "127.0.0.1", hp1, 8080),
            entry(2, "tcp", "127.0.0.1", hp2, 8081),
            entry(3, "tcp", "127.0.0.1", hp3, 8082),
        ]
    );

    // rnet port rm, the API's remove, and the -p rule's removal: the next connect is refused.
    let out = port_cli(p, "rm", &["3"]);
    out.assert_success("rnet port rm 3");
    assert_eq!(out.stdout.trim(), "id 3 removed", "{out}");
    assert_refused(hp3);
    let out = host_curl(hp3);
    assert_eq!(out.code(), Some(7), "curl must fail to connect: {out}");
    assert_eq!(
        api(
            p,
            &json!({"execute": "remove_hostfwd", "arguments": {"id": 2}})
        ),
        json!({"return": {}})
    );
    assert_refused(hp2);
    assert_eq!(listed(p), [entry(1, "tcp", "127.0.0.1", hp1, 8080)]);
    let out = port_cli(p, "rm", &["1"]);
    out.assert_success("rnet port rm 1");
    assert_refused(hp1);
    assert_eq!(listed(p), Vec::<Value>::new());

    // rnet port add with host port 0 prints the port the kernel chose.
    let out = port_cli(p, "add", &["127.0.0.1:0:8080"]);
    out.assert_success("rnet port add 127.0.0.1:0:8080");
    let line = out.stdout.trim();
    let chosen: u16 = line
        .strip_prefix("id 4: host port ")
        .and_then(|r| r.strip_suffix(" published"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {out}"));
    assert_ne!(chosen, 0, "{out}");
    assert_curl_reaches(chosen, 8080);

    // The socket goes away with rnet.
    let out = guest.stop(secs(10));
    assert!(
        !p.exists(),
        "API socket left behind after rnet exited: {out}"
    );
}

// ---------------------------------------------------------------- 2. the API protocol

/// Every request shape and error text of slirp4netns's API.
#[test]
fn api_error_texts_and_ids() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let _guest = start_guest(
        &Rnet::new().arg("--api-socket").arg(p),
        &["http:8080-8083", "udp:5353"],
    );

    assert_eq!(
        api(p, &json!({"execute": "list_hostfwd"})),
        json!({"entries": []})
    );

    const PARSE: &str = "bad request: cannot parse JSON";
    const OBJECT: &str = "bad request: json_object() failed";
    const NO_EXEC: &str = "bad request: no execute found";
    const UNKNOWN: &str = "bad request: unknown execute";
    let add = |a: &str| format!(r#"{{"execute":"add_hostfwd","arguments":{a}}}"#);
    let bad = |f: &str| format!("bad request: add_hostfwd: bad arguments.{f}");
    let ok = r#""proto":"tcp","host_addr":"127.0.0.1","host_port":1,"guest_addr":"10.0.2.100","guest_port":80"#;
    let with = |key: &str, val: &str| {
        // `ok` with KEY set to VAL (or left out when VAL is empty).
        let mut parts: Vec<String> = ok
            .split(',')
            .filter(|kv| !kv.starts_with(&format!("\"{key}\"")))
            .map(String::from)
            .collect();
        if !val.is_empty() {
            parts.push(format!("\"{key}\":{val}"));
        }
        add(&format!("{{{}}}", parts.join(",")))
    };
    let mut cases: Vec<(String, String)> = vec![
        ("not json".into(), PARSE.into()),
        (r#"{"execute":"list_hostfwd""#.into(), PARSE.into()),
        ("".into(), PARSE.into()),
        ("[1,2]".into(), OBJECT.into()),
        (r#""list_hostfwd""#.into(), OBJECT.into()),
        ("42".into(), OBJECT.into()),
        ("{}".into(), NO_EXEC.into()),
        (r#"{"arguments":{"id":1}}"#.into(), NO_EXEC.into()),
        (r#"{"execute":"reboot"}"#.into(), UNKNOWN.into()),
        (r#"{"execute":"add_hostfwd2"}"#.into(), UNKNOWN.into()),
        (r#"{"execute":"add_hostfwd"}"#.into(), bad("proto")),
        (
            r#"{"execute":"remove_hostfwd"}"#.into(),
            "bad request: remove_hostfwd: bad arguments.id".into(),
        ),
    ];
    for (key, vals) in [
        ("proto", &["", r#""sctp""#, r#""TCP""#, "6"][..]),
        ("host_addr", &[r#""not-an-ip""#, r#""256.1.1.1""#, "5"]),
        ("host_port", &["", "-1", "65536", r#""8080""#]),
        ("guest_addr", &[r#""x""#, r#""10.0.2""#, "5"]),
        ("guest_port", &["", "0", "65536", r#""80""#]),
    ] {
        for v in vals {
            cases.push((with(key, v), bad(key)));
        }
    }
    for id in [r#"{}"#, r#"{"id":"1"}"#, r#"{"id":-1}"#, r#"{"id":999}"#] {
        cases.push((
            format!(r#"{{"execute":"remove_hostfwd","arguments":{id}}}"#),
            "bad request: remove_hostfwd: bad arguments.id".into(),
        ));
    }
    for (req, desc) in &cases {
        assert_api_error(p, req.as_bytes(), desc);
    }

    // Ports in use on the host: slirp_add_hostfwd failed (no id consumed).
    let taken_tcp = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let taken_udp = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let failed = "bad request: add_hostfwd: slirp_add_hostfwd failed";
    let req = add_req(
        "tcp",
        "127.0.0.1",
        taken_tcp.local_addr().unwrap().port(),
        8080,
    );
    assert_api_error(p, req.to_string().as_bytes(), failed);
    let req = add_req(
        "udp",
        "127.0.0.1",
        taken_udp.local_addr().unwrap().port(),
        5353,
    );
    assert_api_error(p, req.to_string().as_bytes(), failed);

    // Ids start at 1, increase, and are never reused.
    let ports: Vec<u16> = (0..4).map(|_| free_port(LOCALHOST)).collect();
    let (id1, _) = api_add(p, &add_req("tcp", "127.0.0.1", ports[0], 8080));
    let (id2, _) = api_add(p, &add_req("udp", "127.0.0.1", ports[1], 5353));
    let (id3, _) = api_add(p, &add_req("tcp", "127.0.0.1", ports[2], 8082));
    assert_eq!((id1, id2, id3), (1, 2, 3));
    // The same host port again: in use by rnet's own listener.
    let req = add_req("tcp", "127.0.0.1", ports[0], 8081);
    assert_api_error(p, req.to_string().as_bytes(), failed);
    assert_eq!(
        api(
            p,
            &json!({"execute": "remove_hostfwd", "arguments": {"id": 2}})
        ),
        json!({"return": {}})
    );
    assert_api_error(
        p,
        br#"{"execute":"remove_hostfwd","arguments":{"id":2}}"#,
        "bad request: remove_hostfwd: bad arguments.id",
    );
    // Empty host_addr means 0.0.0.0 and empty guest_addr the guest (as Podman sends).
    let req = json!({"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "", "host_port": ports[3], "guest_addr": "", "guest_port": 8083}});
    let (id4, _) = api_add(p, &req);
    assert_eq!(id4, 4, "id 2 must not be reused");
    assert_eq!(
        listed(p),
        [
            entry(1, "tcp", "127.0.0.1", ports[0], 8080),
            entry(3, "tcp", "127.0.0.1", ports[2], 8082),
            entry(4, "tcp", "0.0.0.0", ports[3], 8083),
        ]
    );
    assert_curl_reaches(ports[3], 8083);

    // host_port 0: the reply names the chosen port, which works.
    let v = api(p, &add_req("tcp", "127.0.0.1", 0, 8081));
    let chosen = v["return"]["host_port"].as_u64().unwrap_or(0) as u16;
    assert_eq!(v, json!({"return": {"id": 5, "host_port": chosen}}));
    assert_ne!(chosen, 0, "{v}");
    assert_curl_reaches(chosen, 8081);
    assert!(
        listed(p).contains(&entry(5, "tcp", "127.0.0.1", chosen, 8081)),
        "{:?}",
        listed(p)
    );
}

/// One request per connection, with or without half-close or a trailing newline.
#[test]
fn api_request_shapes() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let _guest = start_guest(&Rnet::new().arg("--api-socket").arg(p), &["http:8080"]);
    let empty = json!({"entries": []});
    for (req, half_close) in [
        (&br#"{"execute":"list_hostfwd"}"#[..], true),
        (br#"{"execute":"list_hostfwd"}"#, false),
        (b"{\"execute\":\"list_hostfwd\"}\n", true),
        (b"{\"execute\":\"list_hostfwd\"}\n", false),
        (
            b"  {\"execute\" : \"list_hostfwd\", \"arguments\": {}}\r\n",
            false,
        ),
    ] {
        let t0 = Instant::now();
        let r = api_raw(p, req, half_close);
        let shown = String::from_utf8_lossy(req);
        let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{shown:?}: {r:?}: {e}"));
        assert_eq!(v, empty, "{shown:?} half_close={half_close}");
        assert!(
            t0.elapsed() < secs(2),
            "{shown:?} half_close={half_close}: reply took {:?}",
            t0.elapsed()
        );
    }
}

/// A padded list_hostfwd request of exactly `len` bytes, the padding inside
/// a string so that the JSON only completes at the last byte.
fn padded_request(len: usize) -> Vec<u8> {
    let head = br#"{"execute":"list_hostfwd","pad":""#;
    let tail = br#""}"#;
    let mut r = head.to_vec();
    r.resize(len - tail.len(), b'x');
    r.extend_from_slice(tail);
    assert_eq!(r.len(), len);
    r
}

#[test]
fn api_too_large_message() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let _guest = start_guest(&Rnet::new().arg("--api-socket").arg(p), &["http:8080"]);
    let too_large = "bad request: too large message";

    // 4095 bytes is still a request.
    let r = api_raw(p, &padded_request(4095), true);
    assert_eq!(r.parse::<Value>().ok(), Some(json!({"entries": []})), "{r}");
    // An endless stream (slirp4netns's own test: `cat /dev/zero | ncat -U`).
    let r = api_exchange(p, &[0u8; 65536], false, true);
    assert_eq!(
        r.parse::<Value>().ok(),
        Some(json!({"error": {"desc": too_large}})),
        "64 KiB of NUL bytes: {r}"
    );
    // 4096 bytes or more is not, with or without half-close.
    for len in [4096, 4097, 10000] {
        for half_close in [true, false] {
            let r = api_exchange(p, &padded_request(len), half_close, len > 4096);
            assert_eq!(
                r.parse::<Value>().ok(),
                Some(json!({"error": {"desc": too_large}})),
                "{len} bytes, half_close={half_close}: {r}"
            );
        }
    }
}

/// slirp4netns reads one message of up to 4096 bytes and rejects a full
/// buffer, whatever it holds: a complete request followed by whitespace
/// up to 4096 bytes is "too large message" too.
#[test]
fn api_too_large_message_with_trailing_whitespace() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let _guest = start_guest(&Rnet::new().arg("--api-socket").arg(p), &["http:8080"]);
    let mut req = br#"{"execute":"list_hostfwd"}"#.to_vec();
    req.resize(4096, b' ');
    let r = api_raw(p, &req, true);
    assert_eq!(
        r.parse::<Value>().ok(),
        Some(json!({"error": {"desc": "bad request: too large message"}})),
        "4096 bytes (26 of JSON, then spaces): {r}"
    );
}

/// The socket file is mode 0600 and is removed when rnet exits, whether the
/// command ends by itself or rnet is stopped by SIGTERM.
#[test]
fn api_socket_mode_and_removal() {
    require!(require_userns);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    // The command ends by itself; it sees the socket (same mount namespace).
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let out = Rnet::new().arg("--api-socket").arg(p).run(
        &[
            "sh",
            "-c",
            r#"test -S "$0" && stat -c %a "$0""#,
            &p.to_string_lossy(),
        ],
        secs(30),
    );
    out.assert_success("guest stat of the API socket");
    assert_eq!(out.stdout.trim(), "600", "{out}");
    assert!(!p.exists(), "API socket left behind: {out}");

    // rnet stopped by SIGTERM while serving.
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let mut guest = start_guest(&Rnet::new().arg("--api-socket").arg(p), &["http:8080"]);
    let meta = std::fs::symlink_metadata(p).expect("API socket exists");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{meta:?}");
    let out = guest.stop(secs(10));
    assert!(!p.exists(), "API socket left behind after SIGTERM: {out}");
}

/// A client that connects and sends nothing (or half a request) does not
/// keep another client or the data plane waiting.
#[test]
fn api_silent_client_blocks_nobody() {
    require!(require_userns);
    let api_path = TempPath::new("api");
    let p = api_path.0.as_path();
    let hp = free_port(LOCALHOST);
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:8080"))
            .arg("--api-socket")
            .arg(p),
        &["http:8080-8081"],
    );
    let mut silent = UnixStream::connect(p).unwrap();
    let mut partial = UnixStream::connect(p).unwrap();
    partial.write_all(br#"{"execute":"#).unwrap();

    let t0 = Instant::now();
    assert_eq!(listed(p), [entry(1, "tcp", "127.0.0.1", hp, 8080)]);
    let hp2 = free_port(LOCALHOST);
    let (id, _) = api_add(p, &add_req("tcp", "127.0.0.1", hp2, 8081));
    assert_eq!(id, 2);
    assert_curl_reaches(hp, 8080);
    assert_curl_reaches(hp2, 8081);
    let took = t0.elapsed();
    assert!(
        took < secs(3),
        "requests next to silent clients took {took:?}"
    );

    // The silent clients are still connected and have no answer yet.
    for (name, c) in [("silent", &mut silent), ("partial", &mut partial)] {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("{name} client: expected no reply yet, got {other:?}"),
        }
    }
    // Finishing the partial request gets its answer.
    partial.set_nonblocking(false).unwrap();
    partial.set_read_timeout(Some(secs(10))).unwrap();
    partial.write_all(br#""list_hostfwd"}"#).unwrap();
    partial.shutdown(Shutdown::Write).unwrap();
    let mut r = String::new();
    partial.read_to_string(&mut r).unwrap();
    let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    assert_eq!(v["entries"].as_array().map(Vec::len), Some(2), "{r}");
}

// ---------------------------------------------------------------- 3. source address

/// A client in a test-host namespace is seen by the guest with its own
/// address and port, over TCP and UDP; a loopback client as the gateway.
#[test]
fn source_address_kept_tcp_and_udp() {
    require!(require_root);
    let th = TestHost::create();
    let near = th.near;
    let (tcp_port, udp_port) = (free_port(near), free_port(Ipv4Addr::UNSPECIFIED));
    let rnet = publish(Rnet::new(), &format!("{near}:{tcp_port}:8080"));
    let rnet = publish(rnet, &format!("0.0.0.0:{udp_port}:5353/udp"));
    let _guest = start_guest(&rnet, &["http:8080", "udp:5353"]);
    let client = th.addr;

    // TCP from the test host.
    let (body, local) = th
        .in_ns(move || http_get(SocketAddr::from((near, tcp_port))))
        .expect("TCP from the test host to the published port");
    let seen = parse_seen(&body);
    assert_eq!(
        seen.client, local,
        "guest must see the test host's own address and port"
    );
    assert_eq!(seen.client.ip(), client);

    // UDP from the test host: the reply comes back from the published address.
    let (reply, from, local) = th.in_ns(move || {
        let s = UdpSocket::bind((client, 0)).unwrap();
        s.set_read_timeout(Some(secs(5))).unwrap();
        s.send_to(b"hello", (near, udp_port)).unwrap();
        let mut b = [0u8; 2048];
        let (n, from) = s
            .recv_from(&mut b)
            .expect("UDP reply from the published port");
        (
            String::from_utf8_lossy(&b[..n]).into_owned(),
            from,
            s.local_addr().unwrap(),
        )
    });
    assert_eq!(from, SocketAddr::from((near, udp_port)), "reply source");
    assert_eq!(
        reply,
        format!("client={local}|hello"),
        "guest must see the test host's own address"
    );

    // Loopback clients appear as the gateway.
    let (body, _) = http_get(SocketAddr::from((near, tcp_port))).expect("TCP from the host itself");
    // (The host reaching its own veth address is a local, non-loopback
    // source; only 127.0.0.0/8 is shown as the gateway.)
    let seen = parse_seen(&body);
    assert_eq!(
        seen.client.ip(),
        near,
        "host-local client via the veth address: {body}"
    );
    let s = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    s.send_to(b"lo", (LOCALHOST, udp_port)).unwrap();
    let mut b = [0u8; 2048];
    let (n, from) = s.recv_from(&mut b).expect("UDP reply to a loopback client");
    assert_eq!(from, SocketAddr::from((LOCALHOST, udp_port)));
    let reply = String::from_utf8_lossy(&b[..n]);
    let lport = s.local_addr().unwrap().port();
    assert_eq!(
        reply,
        format!("client={GATEWAY}:{lport}|lo"),
        "a loopback client is the gateway"
    );
}

/// A client on 127.0.0.1 appears as 10.0.2.2 (no root needed).
#[test]
fn loopback_client_appears_as_gateway() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:8080")),
        &["http:8080"],
    );
    let (body, local) =
        http_get(SocketAddr::from((LOCALHOST, hp))).expect("GET through the published port");
    let seen = parse_seen(&body);
    assert_eq!(seen.client.ip().to_string(), GATEWAY, "{body}");
    assert_eq!(
        seen.client.port(),
        local.port(),
        "the client's port is kept: {body}"
    );
    assert_eq!(seen.guest_port, 8080);
}

// ---------------------------------------------------------------- 4. UDP

/// Two host clients on one published UDP port each get only their own replies.
#[test]
fn udp_two_clients_get_their_own_replies() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:5353/udp")),
        &["udp:5353"],
    );
    let clients: Vec<UdpSocket> = (0..2)
        .map(|_| {
            let s = UdpSocket::bind((LOCALHOST, 0)).unwrap();
            s.connect((LOCALHOST, hp)).unwrap();
            s.set_read_timeout(Some(secs(5))).unwrap();
            s
        })
        .collect();
    let names = ["A", "B"];
    let mut b = [0u8; 2048];
    for i in 0..200 {
        for (c, name) in clients.iter().zip(names) {
            c.send(format!("{name}-{i}").as_bytes()).unwrap();
        }
        for (c, name) in clients.iter().zip(names) {
            let n = c
                .recv(&mut b)
                .unwrap_or_else(|e| panic!("client {name}, datagram {i}: no reply: {e}"));
            let want = format!(
                "client={GATEWAY}:{}|{name}-{i}",
                c.local_addr().unwrap().port()
            );
            assert_eq!(
                String::from_utf8_lossy(&b[..n]),
                want,
                "client {name}, datagram {i}"
            );
        }
    }
}

// ---------------------------------------------------------------- 5. ranges

#[track_caller]
fn assert_range_carries(first: u16, guest_first: u16, count: u16, host: Ipv4Addr) {
    for i in [0, count / 2, count - 1] {
        let (body, _) = http_get(SocketAddr::from((host, first + i)))
            .unwrap_or_else(|e| panic!("GET on host port {} (range offset {i}): {e}", first + i));
        assert_eq!(
            parse_seen(&body).guest_port,
            guest_first + i,
            "host port {}: {body}",
            first + i
        );
    }
}

#[test]
fn published_range_small() {
    require!(require_userns);
    let hp = free_block(LOCALHOST, 3);
    let spec = format!("127.0.0.1:{hp}-{}:9000-9002", hp + 2);
    let _guest = start_guest(&publish(Rnet::new(), &spec), &["http:9000-9002"]);
    assert_range_carries(hp, 9000, 3, LOCALHOST);
}

/// The NodePort-sized range (2768 ports) on 127.0.0.2, with the common
/// default soft limit of 1024 open files (hard limit unchanged), as in a
/// user's shell.
#[test]
fn published_range_nodeport_size() {
    require!(require_userns);
    const N: u16 = 2768;
    let lo2 = Ipv4Addr::new(127, 0, 0, 2);
    let hp = free_block(lo2, N as u32);
    let spec = format!("127.0.0.2:{hp}-{}:30000-32767", hp + N - 1);
    let mut cmd = publish(Rnet::new(), &spec).run_cmd(&[
        PYTHON,
        &guest_script("port_server.py"),
        "http:30000-32767",
    ]);
    // SAFETY: getrlimit/setrlimit are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return Err(io::Error::last_os_error());
            }
            l.rlim_cur = l.rlim_max.min(1024);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut guest = LineProc::spawn(&mut cmd);
    guest.wait_line("listening", secs(60), |l| l == "listening");
    eprintln!(
        "{N} ports published and guest listening after {:?}",
        t0.elapsed()
    );
    assert_range_carries(hp, 30000, N, lo2);
}

// ---------------------------------------------------------------- 6. load

/// 100 concurrent connections through a published port (host client
/// tests/guest/tcp_many.py against a guest echo server).
#[test]
fn concurrent_100_connections() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7000")),
        &["echo:7000"],
    );
    let mut c = Command::new(PYTHON);
    c.args([
        &guest_script("tcp_many.py"),
        "127.0.0.1",
        &hp.to_string(),
        "100",
        "65536",
    ]);
    let out = run(&mut c, secs(180));
    out.assert_success("host tcp_many.py");
    let stats = out.stdout.trim();
    eprintln!("tcp_many through a published port: {stats}");
    assert_eq!(json_num(stats, "ok"), 100, "{out}");
    assert_eq!(json_num(stats, "mismatched"), 0, "{out}");
}

#[test]
fn bulk_1gib_host_to_guest() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let mut guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7001")),
        &["sink:7001"],
    );
    let expected = thread::spawn(|| Pattern::digest(GIB));
    let t0 = Instant::now();
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_write_timeout(Some(secs(60))).unwrap();
    s.set_read_timeout(Some(secs(60))).unwrap();
    let mut p = Pattern::new();
    for i in 0..GIB / BLOCK as u64 {
        s.write_all(p.block(i))
            .unwrap_or_else(|e| panic!("sending block {i}: {e}"));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the guest closes after EOF");
    let line = guest.wait_line("sink digest", secs(120), |l| l.starts_with("sink "));
    eprintln!(
        "host->guest 1 GiB through a published port in {:?} ({:.0} MB/s)",
        t0.elapsed(),
        GIB as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
    assert_eq!(
        Digested::parse(&line["sink ".len()..]),
        expected.join().unwrap()
    );
}

#[test]
fn bulk_1gib_guest_to_host() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let spec = format!("source:7002:{GIB}");
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7002")),
        &[&spec],
    );
    let expected = thread::spawn(|| Pattern::digest(GIB));
    let t0 = Instant::now();
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_read_timeout(Some(secs(60))).unwrap();
    let got = digest_reader(&mut s).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest->host 1 GiB through a published port in {:?} ({:.0} MB/s)",
        t0.elapsed(),
        GIB as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
    assert_eq!(got, expected.join().unwrap());
}

// ---------------------------------------------------------------- 7. half-close and reset

#[test]
fn tcp_half_close_propagates() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let _guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7003")),
        &["halfclose:7003"],
    );
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(b"hello half-close").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r)
        .expect("the reply after our FIN, then the guest's FIN");
    assert_eq!(r, "got 16 bytes: hello half-close");
}

/// The guest server resets (SO_LINGER 0): the host client sees a reset (or
/// at least an end of stream) promptly.
#[test]
fn tcp_reset_propagates_guest_to_host() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let mut guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7004")),
        &["rst:7004"],
    );
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    s.write_all(b"x").unwrap();
    guest.wait_line("rst sent", secs(10), |l| l == "rst sent");
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let r = s.read(&mut b);
    let took = t0.elapsed();
    eprintln!("host client after the guest's reset: {r:?} after {took:?}");
    match r {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(0) => {}
        other => panic!("want ECONNRESET or EOF, got {other:?} after {took:?}"),
    }
    assert!(took < secs(2), "took {took:?}");
}

/// The host client resets (SO_LINGER 0): the guest server sees ECONNRESET.
#[test]
fn tcp_reset_propagates_host_to_guest() {
    require!(require_userns);
    let hp = free_port(LOCALHOST);
    let mut guest = start_guest(
        &publish(Rnet::new(), &format!("127.0.0.1:{hp}:7005")),
        &["peer:7005"],
    );
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_read_timeout(Some(secs(10))).unwrap();
    let mut b = [0u8; 6];
    s.read_exact(&mut b).expect("the guest's greeting");
    assert_eq!(&b, b"ready\n");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    drop(s);
    let line = guest.wait_line("peer result", secs(10), |l| l.starts_with("peer:"));
    assert_eq!(
        line, "peer: reset",
        "the guest must see the host client's reset"
    );
}

// ---------------------------------------------------------------- 8. start-up errors

#[test]
fn startup_bad_spec() {
    require!(require_userns);
    for spec in ["8080", "1000-1001:80", "8080:80/sctp", "a:80"] {
        let out = publish(Rnet::new(), spec).run(&["true"], secs(30));
        assert_eq!(
            out.code(),
            Some(2),
            "-p {spec} must be a usage error: {out}"
        );
        assert_stderr_has(&out, spec);
    }
}

#[test]
fn startup_port_in_use() {
    require!(require_userns);
    let tcp = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let udp = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    for spec in [
        format!("127.0.0.1:{}:80", tcp.local_addr().unwrap().port()),
        format!("127.0.0.1:{}:53/udp", udp.local_addr().unwrap().port()),
    ] {
        let out = publish(Rnet::new(), &spec).run(&["true"], secs(30));
        assert_eq!(out.code(), Some(1), "-p {spec}: {out}");
        assert_stderr_has(&out, spec.trim_end_matches("/udp"));
        assert_stderr_has(&out, "already in use");
    }
}

#[test]
fn startup_privileged_port_as_nobody() {
    require!(require_root);
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = publish(Rnet::new().nobody(), "127.0.0.1:80:80").run(&["true"], secs(30));
    if start <= 80 {
        eprintln!(
            "SKIP the CAP_NET_BIND_SERVICE assertion: net.ipv4.ip_unprivileged_port_start is {start}, so uid 65534 may bind port 80 ({})",
            out.status
        );
        return;
    }
    assert_eq!(out.code(), Some(1), "{out}");
    assert_stderr_has(&out, "127.0.0.1:80:80");
    assert_stderr_has(&out, "CAP_NET_BIND_SERVICE");
}
