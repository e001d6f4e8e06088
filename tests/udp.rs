//! UDP in batches: bulk transfers guest → host and host → published port
//! → guest, over IPv4 and IPv6, with UDP segmentation offload on the TAP
//! and with it off (`RNET_NO_USO=1`). Every datagram is numbered and each
//! burst acknowledged before the next (tests/guest/udp_bulk.py), so the
//! transfer is lossless by construction and any loss, reordering or
//! corruption is rnet's. `rnet status --json` (its `udp_io` counters)
//! must show the batching: fewer send calls than datagrams (`UDP_SEGMENT`),
//! fewer `recvmmsg` calls than datagrams, and with USO super-frames to the
//! guest.
//!
//! The malformed-frame test plays the guest on a socket pair
//! (`Network::attach_tap_offload`) and hands over USO super-frames: a
//! valid one (it leaves as separate datagrams of its segment size) and
//! bad ones (segment size 0, larger than the payload, truncated), which are
//! dropped and counted.
//!
//! Every rnet has `--outbound-allow none` plus host loopback and a DNS
//! upstream on loopback; all host sockets are on 127.0.0.1 or ::1.

mod common;

use std::net::{SocketAddr, UdpSocket};

use std::time::Duration;

use common::*;
use serde_json::Value;

macro_rules! require {
    ($check:ident, $name:expr) => {
        if !$check($name) {
            return;
        }
    };
}

const COUNT: u32 = 6000;
const SIZE: usize = 1400;
const BURST: u32 = 32;

fn datagram(i: u32) -> Vec<u8> {
    let mut d = i.to_be_bytes().to_vec();
    d.resize(SIZE, i as u8);
    d
}

fn status(api: &TempPath) -> Value {
    let mut c = std::process::Command::new(RNET);
    c.args(["status", "--json", "--api-socket"]).arg(&api.0);
    clean_env(&mut c);
    let out = run(&mut c, secs(10));
    out.assert_success("rnet status");
    serde_json::from_str(&out.stdout).expect("rnet status --json")
}

fn rnet_cmd(api: &TempPath, uso: bool, extra: &[&str], guest: &[&str]) -> std::process::Command {
    let mut r = Rnet::new()
        .allow_host_loopback()
        .arg("--api-socket")
        .arg(&api.0);
    for a in extra {
        r = r.arg(*a);
    }
    let mut c = r.run_cmd(guest);
    if !uso {
        c.env("RNET_NO_USO", "1");
    }
    c
}

/// Guest → host: the guest sends, a sink on host loopback checks and acks.
fn bulk_out(v6: bool, uso: bool) {
    let sink = UdpSocket::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
    sink.set_read_timeout(Some(secs(30))).unwrap();
    let port = sink.local_addr().unwrap().port().to_string();
    let api = TempPath::new("api");
    let gw = if v6 { GATEWAY6 } else { GATEWAY };
    let script = guest_script("udp_bulk.py");
    let (count, size, burst) = (COUNT.to_string(), SIZE.to_string(), BURST.to_string());
    let mut guest = LineProc::spawn(&mut rnet_cmd(
        &api,
        uso,
        &[],
        &[PYTHON, &script, "send", gw, &port, &count, &size, &burst],
    ));
    let mut buf = vec![0u8; 65536];
    let mut peer = None;
    let mut i = 0;
    while i < COUNT {
        let (n, from) = sink.recv_from(&mut buf).expect("a datagram from the guest");
        if &buf[..n] == b"hi" {
            sink.send_to(b"ok", from).unwrap();
            continue;
        }
        assert_eq!(
            &buf[..n],
            &datagram(i)[..],
            "datagram {i} (v6 {v6}, uso {uso})"
        );
        peer = Some(from);
        if (i + 1) % BURST == 0 || i + 1 == COUNT {
            sink.send_to(&(i + 1).to_be_bytes(), from).unwrap();
        }
        i += 1;
    }
    guest.wait_line("sent", secs(30), |l| l.contains("\"sent\""));
    let st = status(&api);
    let io = &st["udp_io"];
    let sends = io["sends"].as_u64().unwrap();
    let out = io["datagrams_out"].as_u64().unwrap();
    assert!(out >= u64::from(COUNT), "{io}");
    // Bursts of 32 arrive together: most leave in UDP_SEGMENT sends.
    assert!(
        io["gso_sends"].as_u64().unwrap() > 0,
        "no segmented send: {io}"
    );
    assert!(sends * 2 < out, "one send per datagram: {io}");
    assert_eq!(st["tap"]["uso"].as_bool(), Some(uso_expected(uso)), "{st}");
    // Ends the guest.
    sink.send_to(b"end", peer.unwrap()).unwrap();
    let _ = guest.stop(secs(20));
}

/// Whether the TAP is expected to do USO: on when asked and the kernel
/// has it (6.2 and later).
fn uso_expected(asked: bool) -> bool {
    if !asked {
        return false;
    }
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = rel
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (a, b) >= (6, 2)
}

/// Host → published port → guest: a host sender, the guest checks and acks.
fn bulk_in(v6: bool, uso: bool) {
    let hp = free_service_block(1);
    let spec = if v6 {
        format!("[::1]:{hp}:5000/udp")
    } else {
        format!("127.0.0.1:{hp}:5000/udp")
    };
    let api = TempPath::new("api");
    let script = guest_script("udp_bulk.py");
    let (count, size, burst) = (COUNT.to_string(), SIZE.to_string(), BURST.to_string());
    let mut guest = LineProc::spawn(&mut rnet_cmd(
        &api,
        uso,
        &["-p", &spec],
        &[PYTHON, &script, "recv", "5000", &count, &size, &burst],
    ));
    guest.wait_line("listening", secs(30), |l| l == "listening");
    let tx = UdpSocket::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
    tx.set_read_timeout(Some(secs(30))).unwrap();
    let to: SocketAddr = if v6 {
        format!("[::1]:{hp}")
    } else {
        format!("127.0.0.1:{hp}")
    }
    .parse()
    .unwrap();
    let mut ack = [0u8; 64];
    // Handshake: "hi" until the guest answers (it has then spoken, and
    // rnet knows where it is).
    tx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut up = false;
    for _ in 0..100 {
        tx.send_to(b"hi", to).unwrap();
        if let Ok((n, _)) = tx.recv_from(&mut ack)
            && &ack[..n] == b"ok"
        {
            up = true;
            break;
        }
    }
    assert!(up, "no answer from the guest");
    tx.set_read_timeout(Some(secs(30))).unwrap();
    let mut i = 0;
    while i < COUNT {
        let n = BURST.min(COUNT - i);
        for k in 0..n {
            tx.send_to(&datagram(i + k), to).unwrap();
        }
        i += n;
        loop {
            let (m, _) = tx.recv_from(&mut ack).expect("an ack from the guest");
            if m == 4 && u32::from_be_bytes(ack[..4].try_into().unwrap()) >= i {
                break;
            }
        }
    }
    let line = guest.wait_line("result", secs(30), |l| l.starts_with('{'));
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["received"], COUNT, "{r}");
    assert_eq!(r["in_order"], true, "{r}");
    assert_eq!(r["corrupt"], 0, "{r}");
    let st = status(&api);
    let io = &st["udp_io"];
    let calls = io["recv_calls"].as_u64().unwrap();
    let got = io["datagrams_in"].as_u64().unwrap();
    assert!(got >= u64::from(COUNT), "{io}");
    assert!(calls * 2 < got, "one recv per datagram: {io}");
    let uso_out = io["uso_out"].as_u64().unwrap();
    if uso_expected(uso) {
        assert!(uso_out > 0, "no USO super-frame to the guest: {io}");
        assert!(io["uso_out_datagrams"].as_u64().unwrap() > uso_out, "{io}");
    } else {
        assert_eq!(uso_out, 0, "{io}");
    }
    tx.send_to(b"end", to).unwrap();
    let _ = guest.stop(secs(20));
}

#[test]
fn guest_to_host_v4_uso() {
    require!(require_userns, "guest_to_host_v4_uso");
    bulk_out(false, true);
}

#[test]
fn guest_to_host_v4_no_uso() {
    require!(require_userns, "guest_to_host_v4_no_uso");
    bulk_out(false, false);
}

#[test]
fn guest_to_host_v6_uso() {
    require!(require_userns, "guest_to_host_v6_uso");
    bulk_out(true, true);
}

#[test]
fn published_to_guest_v4_uso() {
    require!(require_userns, "published_to_guest_v4_uso");
    bulk_in(false, true);
}

#[test]
fn published_to_guest_v4_no_uso() {
    require!(require_userns, "published_to_guest_v4_no_uso");
    bulk_in(false, false);
}

#[test]
fn published_to_guest_v6_uso() {
    require!(require_userns, "published_to_guest_v6_uso");
    bulk_in(true, true);
}

// ------------------------------------------------------------ socket pair

/// One USO super-frame from 10.0.2.100:4000 to 10.0.2.2:`port` carrying
/// `payload`, behind a virtio-net header with `gso_size`; `cut` bytes
/// missing at the end (truncated).
fn super_frame(port: u16, payload: &[u8], gso_size: u16, cut: usize) -> Vec<u8> {
    let mut f = Vec::new();
    let mut h = [0u8; 12];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 5; // GSO_UDP_L4
    h[2..4].copy_from_slice(&42u16.to_ne_bytes());
    h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
    h[6..8].copy_from_slice(&34u16.to_ne_bytes());
    h[8..10].copy_from_slice(&6u16.to_ne_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(&rnet::stack::GATEWAY_MAC);
    f.extend_from_slice(&[0x52, 0x55, 10, 0, 2, 100, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 2, 100, 10, 0, 2, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum = 0u32;
    for w in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f.truncate(f.len() - cut);
    f
}

#[test]
fn uso_super_frames_valid_and_malformed() {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(secs(10))).unwrap();
    let port = sink.local_addr().unwrap().port();
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let config = rnet::Config::builder()
        .allow_host_loopback(true)
        .outbound(rnet::OutboundPolicy::Only(vec![]))
        .dns_upstreams(vec![SocketAddr::from(([127, 0, 0, 1], 53))])
        .disable_dns(true)
        .build()
        .expect("config");
    let net = rnet::Network::attach_tap_offload(theirs, None, config).expect("data plane");
    let handle = net.handle();
    let write = |f: &[u8]| {
        nix::unistd::write(&ours, f).expect("write a frame");
    };
    // Valid: 5 datagrams of 1000 bytes and a last of 300.
    let payload: Vec<u8> = (0..5300u32).map(|i| (i / 1000) as u8).collect();
    write(&super_frame(port, &payload, 1000, 0));
    let mut buf = [0u8; 4096];
    for k in 0..6 {
        let (n, _) = sink
            .recv_from(&mut buf)
            .expect("a segment of the super-frame");
        assert_eq!(n, if k < 5 { 1000 } else { 300 }, "segment {k}");
        assert!(
            buf[..n].iter().all(|&b| b == k as u8),
            "segment {k} content"
        );
    }
    let before = handle.stats();
    let malformed = |s: &rnet::StatsSnapshot| {
        s.drops
            .iter()
            .find(|(n, _)| *n == "malformed")
            .map_or(0, |(_, v)| *v)
    };
    write(&super_frame(port, &payload, 0, 0));
    write(&super_frame(port, &payload, 6000, 0));
    write(&super_frame(port, &payload, 1000, 700));
    // Frames are handled in order: once this one's two datagrams arrive,
    // the malformed ones before it were seen, and none was forwarded.
    let marker: Vec<u8> = vec![0xee; 1600];
    write(&super_frame(port, &marker, 800, 0));
    for _ in 0..2 {
        let (n, _) = sink.recv_from(&mut buf).expect("the marker's segments");
        assert_eq!((n, buf[0]), (800, 0xee), "a malformed frame was forwarded");
    }
    let after = handle.stats();
    assert_eq!(malformed(&after), malformed(&before) + 3, "{after:?}");
    let st = handle.status().expect("status").to_json();
    assert_eq!(st["udp_io"]["uso_in"].as_u64(), Some(2), "{st}");
    assert_eq!(st["udp_io"]["uso_in_bad"].as_u64(), Some(3), "{st}");
    drop(net);
}
