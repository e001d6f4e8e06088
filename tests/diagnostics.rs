//! What an operator uses when a node misbehaves: `--pcap FILE` (read back
//! with `tcpdump -r`) and its size cap. (`rnet status` during a transfer,
//! JSON and Prometheus, is exercised by tests/multinode.rs on a VXLAN
//! node.)
//!
//! Every rnet runs with `--outbound-allow none` and a loopback DNS upstream
//! (the builder's defaults); guests only reach the host's loopback through
//! 10.0.2.2.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// `tcpdump -nn -r FILE`, which must succeed; its lines.
fn tcpdump_read(file: &std::path::Path) -> Vec<String> {
    let out = run(
        Command::new("tcpdump").args(["-nn", "-r"]).arg(file),
        secs(30),
    );
    out.assert_success(&format!("tcpdump -r {}", file.display()));
    out.stdout.lines().map(String::from).collect()
}

/// A capture taken during a guest curl to a host server shows the TCP
/// handshake, the request and the response, in order.
#[test]
fn pcap_shows_curl_handshake() {
    let test = module_path_test!();
    require!(require_userns(test) && require_program(test, "tcpdump"));
    let pcap = TempPath::new("capture.pcap");
    let http = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", http.port());
    let out = Rnet::new()
        .allow_host_loopback()
        .arg("--pcap")
        .arg(&pcap.0)
        .run(&strs(&curl(&url)), secs(30));
    out.assert_success("guest curl with --pcap");
    assert_eq!(out.stdout, HTTP_BODY);

    let lines = tcpdump_read(&pcap.0);
    let server = format!("{GATEWAY}.{}", http.port());
    let find = |from: usize, what: &str, want: &dyn Fn(&str) -> bool| {
        lines[from..]
            .iter()
            .position(|l| want(l))
            .map(|i| from + i)
            .unwrap_or_else(|| panic!("no {what} after line {from} in:\n{}", lines.join("\n")))
    };
    let syn = find(0, "SYN", &|l| {
        l.contains(&format!("> {server}: Flags [S],")) && l.contains("10.0.2.100.")
    });
    // The client's port, from "IP 10.0.2.100.PORT > ...".
    let client = lines[syn]
        .split_whitespace()
        .find(|w| w.starts_with("10.0.2.100."))
        .unwrap()
        .to_string();
    let syn_ack = find(syn, "SYN-ACK", &|l| {
        l.contains(&format!("{server} > {client}: Flags [S.],"))
    });
    let ack = find(syn_ack, "ACK", &|l| {
        l.contains(&format!("{client} > {server}: Flags [.],"))
    });
    let request = find(ack, "request", &|l| {
        l.contains(&format!("{client} > {server}: Flags [P.],")) && !l.ends_with("length 0")
    });
    find(request, "response", &|l| {
        l.contains(&format!("{server} > {client}: Flags [")) && !l.ends_with("length 0")
    });
    // The payloads, in ASCII.
    let ascii = run(
        Command::new("tcpdump")
            .args(["-nn", "-A", "-r"])
            .arg(&pcap.0),
        secs(30),
    );
    for want in ["GET / HTTP/1.1", "HTTP/1.1 200 OK", HTTP_BODY.trim()] {
        assert!(
            ascii.stdout.contains(want),
            "no {want:?} in the capture: {ascii}"
        );
    }
}

/// A capture file is created `0600`; a symbolic link at the `--pcap` path
/// makes start-up fail with a message naming the link, and nothing is
/// written through it.
#[test]
fn pcap_is_private_and_never_follows_links() {
    let test = module_path_test!();
    require!(require_userns(test));
    let pcap = TempPath::new("capture-mode.pcap");
    Rnet::new()
        .arg("--pcap")
        .arg(&pcap.0)
        .run(&["true"], secs(30))
        .assert_success("guest with --pcap");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pcap.0).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "capture file mode {mode:o}");

    let target = TempPath::new("capture-target");
    let link = TempPath::new("capture-link.pcap");
    std::os::unix::fs::symlink(&target.0, &link.0).unwrap();
    let out = Rnet::new()
        .arg("--pcap")
        .arg(&link.0)
        .run(&["true"], secs(30));
    out.assert_failure("--pcap at a symbolic link");
    assert_stderr_has(&out, "is a symbolic link");
    assert_stderr_has(&out, &link.0.display().to_string());
    assert!(!target.0.exists(), "a file was created through the link");
}

/// With `--pcap-max-mib 1`, a 4 MiB download leaves FILE and FILE.1, each
/// about 1 MiB (at most one frame over), both readable by tcpdump.
#[test]
fn pcap_size_cap_rotates() {
    let test = module_path_test!();
    require!(require_userns(test) && require_program(test, "tcpdump"));
    let pcap = TempPath::new("capture-cap.pcap");
    let mut name = pcap.0.clone().into_os_string();
    name.push(".1");
    let rotated = TempPath(name.into());
    let total = 4 * MIB;
    let (addr, rx) = tcp_source(total);
    let out = Rnet::new()
        .allow_host_loopback()
        .arg("--pcap")
        .arg(&pcap.0)
        .arg("--pcap-max-mib")
        .arg("1")
        .run(
            &[
                PYTHON,
                &guest_script("stream.py"),
                "recv",
                GATEWAY,
                &addr.port().to_string(),
            ],
            secs(60),
        );
    out.assert_success("guest download with --pcap");
    assert_eq!(rx.recv_timeout(secs(10)).unwrap().unwrap(), total);
    assert_eq!(Digested::parse(out.stdout.trim()), Pattern::digest(total));

    for f in [&pcap.0, &rotated.0] {
        let len = std::fs::metadata(f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .len();
        // One frame (at most the TAP MTU plus headers) past the cap.
        assert!(
            len <= MIB + 65536 + 64,
            "{} is {len} bytes, over the 1 MiB cap",
            f.display()
        );
        assert!(!tcpdump_read(f).is_empty(), "{} is empty", f.display());
    }
}
