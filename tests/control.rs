//! Who may use the control socket, and for how long: a client of another
//! uid is refused (even when the socket file's mode would let it in), and a
//! request that trickles in byte by byte is cut at the whole-request
//! deadline while other clients are served meanwhile; out of descriptors,
//! `accept` backs off instead of spinning.
//!
//! Every rnet runs with `--outbound-allow none` and a loopback DNS upstream
//! (the builder's defaults); the guest only sleeps.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `rnet run --api-socket PATH -- sh -c 'echo ready; sleep 120'`, waited
/// for until the guest runs and the socket answers.
fn start(path: &Path) -> LineProc {
    let mut lp = LineProc::spawn(&mut Rnet::new().arg("--api-socket").arg(path).run_cmd(&[
        "sh",
        "-c",
        "echo ready; exec sleep 120",
    ]));
    lp.wait_line("ready", secs(30), |l| l == "ready");
    lp
}

/// One request, half-closed, and the reply read to EOF.
fn call(path: &Path, req: &str) -> io::Result<String> {
    let mut c = UnixStream::connect(path)?;
    c.set_read_timeout(Some(secs(15)))?;
    c.write_all(req.as_bytes())?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut r = String::new();
    c.read_to_string(&mut r)?;
    Ok(r)
}

const LIST: &str = r#"{"execute":"list_hostfwd"}"#;

/// A client running as uid 65534 reaches rnet's socket (the test opens its
/// mode up to 0666 to get past the file permissions) and is refused by
/// rnet's own SO_PEERCRED check with an error reply, which rnet logs; root,
/// rnet's own uid here, is still served.
#[test]
fn client_of_another_uid_is_refused() {
    let test = module_path_test!();
    if !(require_root(test) && require_userns(test) && require_program(test, "setpriv")) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let api = TempPath::new("control-uid");
    let mut rnet = start(&api.0);
    let meta = std::fs::symlink_metadata(&api.0).expect("the socket exists");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "socket mode");
    std::fs::set_permissions(&api.0, std::fs::Permissions::from_mode(0o666)).unwrap();

    // As uid 65534: connect, send a request, print the reply.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(15)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"execute":"list_hostfwd"}')
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass
reply = b""
while True:
    try:
        b = s.recv(4096)
    except ConnectionResetError:
        break
    if not b:
        break
    reply += b
print(reply.decode())
"#;
    let mut c = setpriv_nobody(PYTHON);
    c.args(["-c", script]).arg(&api.0);
    clean_env(&mut c);
    let out = run(&mut c, secs(30));
    out.assert_success("the uid 65534 client");
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("reply to uid 65534 is not JSON ({e}): {out}"));
    assert_eq!(
        v["error"]["desc"], "bad request: permission denied",
        "reply to uid 65534: {v}"
    );
    assert!(v.get("return").is_none(), "{v}");
    assert!(
        v["error"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("uid 65534")),
        "{v}"
    );

    // Root is served.
    let r = call(&api.0, LIST).expect("root's request");
    let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    assert!(v.get("error").is_none(), "root refused: {v}");

    let out = rnet.stop(secs(10));
    assert_stderr_has(&out, "refused a client");
}

/// A client that sends a request one byte every 200 ms (it would need
/// about 8 s) is cut at the 5 s whole-request deadline with a timeout
/// reply, although it never stays silent for a whole second; meanwhile
/// another client's requests are answered at once.
#[test]
fn trickled_request_is_cut_at_the_deadline() {
    let test = module_path_test!();
    if !require_userns(test) {
        return;
    }
    let api = TempPath::new("control-trickle");
    let _rnet = start(&api.0);
    // Valid JSON only once complete: padded so the whole takes ~8 s.
    let req = format!("{}{LIST}", " ".repeat(14));
    let mut slow = UnixStream::connect(&api.0).unwrap();
    let t0 = Instant::now();
    let mut writer = slow.try_clone().unwrap();
    let bytes = req.into_bytes();
    let trickle = std::thread::spawn(move || {
        for b in bytes {
            if writer.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    // Other clients are served while the slow one trickles.
    for _ in 0..5 {
        let t = Instant::now();
        let r = call(&api.0, LIST).expect("a fast client");
        let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
        assert!(v.get("error").is_none(), "fast client: {v}");
        assert!(
            t.elapsed() < secs(1),
            "a fast client waited {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    slow.set_read_timeout(Some(secs(15))).unwrap();
    let mut reply = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match slow.read(&mut b) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&b[..n]),
            // The server closes with the trickler's bytes unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !reply.is_empty() => break,
            Err(e) => panic!(
                "reading the slow client's reply after {:?}: {e}",
                t0.elapsed()
            ),
        }
    }
    let took = t0.elapsed();
    let r = String::from_utf8_lossy(&reply);
    let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    assert_eq!(v["error"]["desc"], "bad request: timed out", "{v}");
    eprintln!("slow client cut after {took:?}");
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_millis(7500),
        "the slow client was cut after {took:?}, not at the 5 s deadline"
    );
    trickle.join().unwrap();
}

/// CPU time (user + system, in clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field overall, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// With rnet out of descriptors (its limit lowered to what it has open plus
/// a few, then silent clients holding those), `accept` fails with EMFILE:
/// rnet backs off instead of spinning (its CPU time stays low while a
/// client waits in the backlog), says so, and serves the waiting client
/// once the silent ones are cut at the deadline.
#[test]
fn accept_out_of_descriptors_backs_off() {
    let test = module_path_test!();
    if !(require_root(test) && require_userns(test) && require_program(test, "prlimit")) {
        return;
    }
    let api = TempPath::new("control-emfile");
    let mut rnet = start(&api.0);
    let pid = rnet.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 4;
    let mut c = Command::new("prlimit");
    c.arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"));
    run(&mut c, secs(10)).assert_success("prlimit on rnet");
    // Silent clients take the last descriptors (one each in rnet).
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(UnixStream::connect(&api.0).unwrap());
    }
    // Wait until rnet holds its limit of descriptors.
    let deadline = Instant::now() + secs(5);
    while std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
        < limit
    {
        assert!(
            Instant::now() < deadline,
            "rnet never reached {limit} descriptors"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let waiting = std::thread::spawn({
        let p = api.0.clone();
        move || call(&p, LIST)
    });
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    eprintln!("rnet used {used} clock ticks in 2 s while out of descriptors");
    // A spinning accept loop burns ~200 ticks in 2 s; backing off, a few.
    assert!(used < 40, "rnet used {used} ticks in 2 s: accept spins");
    let r = waiting.join().unwrap().expect("the waiting client");
    let took = t0.elapsed();
    let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    assert!(v.get("error").is_none(), "waiting client: {v}");
    assert!(took < secs(10), "the waiting client took {took:?}");
    drop(silent);
    let out = rnet.stop(secs(10));
    assert_stderr_has(&out, "out of descriptors");
}
