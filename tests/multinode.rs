//! Two machines, one VXLAN overlay, each node rootless behind rnet: the
//! multi-node recipe of the README, end to end.
//!
//! The machines are two test hosts: network namespaces joined by a veth
//! pair, 198.18.50.1/24 and 198.18.50.2/24, with no other link (nothing
//! they send can leave them). On each, rnet runs *inside* the machine's
//! namespace (its host sockets are the machine's) and serves a node
//! namespace with `-p 8472:8472/udp -p 10250:10250` and
//! `--outbound-allow <the other machine>/32`, so the node reaches the other
//! machine and nothing else. The node (tests/guest/vxlan_node.sh) makes a
//! VXLAN device as Flannel does: VNI 1, port 8472, remote the other
//! machine's address, MTU = tap0's MTU - 50. A VXLAN datagram from node A
//! leaves through rnet A's NAT (from 198.18.50.1), arrives at machine B's
//! published 8472/udp and is delivered into node B from 198.18.50.1:PORT;
//! Linux VXLAN accepts any source port.
//!
//! Shown: overlay ping both ways (also with full-MTU packets that must not
//! be fragmented inside the overlay), the published kubelet port from the
//! other machine, the allow-list keeping the node off everything else
//! (its own machine's address included, except the ports rnet publishes,
//! which come back to the node: hairpin),
//! and 100 MiB across the overlay each way with matching SHA-256; with the
//! default TAP MTU (65520: VXLAN 65470, the underlay veth fragments the
//! datagrams) and with `--mtu 1500` (VXLAN 1450: nothing fragments, what a
//! real 1500-byte underlay needs). `rnet status` of a node, read during a
//! transfer, shows the VXLAN flows and growing byte counts, and its
//! Prometheus form parses with the Prometheus Python client's parser.
//!
//! Root only (it creates network namespaces); every rnet has an outbound
//! allow-list of the other machine and a DNS upstream on its machine's
//! loopback.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BULK: u64 = 100 * MIB;
const MACHINE: [&str; 2] = ["198.18.50.1", "198.18.50.2"];
const OVERLAY: [&str; 2] = ["10.244.0.1", "10.244.0.2"];
const SINK_PORT: &str = "5001";
const KUBELET_PORT: u16 = 10250;

/// Runs a setup command, panicking with its stderr when it fails.
#[track_caller]
fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- machines

/// Two test hosts ("machines" A and B): network namespaces
/// `rnet-mn-<pid>-<n>-{a,b}` joined only to each other by a veth pair,
/// [`MACHINE`] on it, IPv6 off. Deleted (with the veth) on drop.
struct Machines {
    ns: [String; 2],
}

impl Machines {
    fn create() -> Machines {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let m = Machines {
            ns: [
                format!("rnet-mn-{pid}-{n}-a"),
                format!("rnet-mn-{pid}-{n}-b"),
            ],
        };
        let ifs = [format!("rmn{pid}{n}a"), format!("rmn{pid}{n}b")];
        for ns in &m.ns {
            sh(&["ip", "netns", "add", ns]);
            for conf in ["all", "default"] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.disable_ipv6=1"),
                ]);
            }
        }
        sh(&[
            "ip", "link", "add", &ifs[0], "netns", &m.ns[0], "type", "veth", "peer", "name",
            &ifs[1], "netns", &m.ns[1],
        ]);
        for i in 0..2 {
            let ns = m.ns[i].as_str();
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", MACHINE[i]),
                "dev",
                &ifs[i],
            ]);
            sh(&["ip", "-n", ns, "link", "set", &ifs[i], "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        m
    }

    fn path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.ns[i])
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// ---------------------------------------------------------------- nodes

/// A node namespace on machine `i`, served by an rnet running in that
/// machine's namespace; stopped (SIGTERM, then SIGKILL) on drop.
struct Node {
    _rnet: LineProc,
    /// The node's shell (then its `sleep`), for nsenter -t.
    pid: u32,
    vxlan_mtu: u32,
    api: TempPath,
    _dns: Arc<DnsServer>,
}

impl Node {
    fn start(m: &Machines, i: usize, tap_mtu: Option<u32>) -> Node {
        let other = MACHINE[1 - i];
        // The DNS upstream lives on the machine's own loopback.
        let dns = Arc::new(in_netns(&m.path(i), DnsServer::start));
        let api = TempPath::new("mn-api");
        let mut rnet = Rnet::with_dns(&dns)
            .outbound_allow(&format!("{other}/32"))
            .arg("-p")
            .arg("8472:8472/udp")
            .arg("-p")
            .arg(format!("{KUBELET_PORT}:{KUBELET_PORT}"))
            .arg("--api-socket")
            .arg(&api.0);
        if let Some(mtu) = tap_mtu {
            rnet = rnet.arg("--mtu").arg(mtu.to_string());
        }
        let script = guest_script("vxlan_node.sh");
        let overlay = format!("{}/24", OVERLAY[i]);
        let mut cmd = rnet.run_cmd(&["sh", &script, other, &overlay]);
        let ns = join_netns(&mut cmd, &m.path(i));
        let mut lp = LineProc::spawn(&mut cmd);
        drop(ns);
        let mtu = lp.wait_line("vxlan-mtu", secs(30), |l| l.starts_with("vxlan-mtu "));
        let ready = lp.wait_line("node-ready", secs(30), |l| l.starts_with("node-ready "));
        Node {
            _rnet: lp,
            pid: ready["node-ready ".len()..].parse().unwrap(),
            vxlan_mtu: mtu["vxlan-mtu ".len()..].parse().unwrap(),
            api,
            _dns: dns,
        }
    }

    /// A command run inside the node's namespaces.
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--preserve-credentials", "-U", "-n", "-t"])
            .arg(self.pid.to_string())
            .args(args);
        clean_env(&mut c);
        c
    }

    fn status(&self, format: &str) -> Output {
        let mut c = Command::new(RNET);
        c.args(["status", format, "--api-socket"]).arg(&self.api.0);
        clean_env(&mut c);
        let out = run(&mut c, secs(10));
        out.assert_success("rnet status");
        out
    }

    fn status_json(&self) -> Value {
        serde_json::from_str(&self.status("--json").stdout).expect("rnet status --json")
    }
}

/// Pings `dst` from `node` (3 echoes of `size` bytes, never fragmented
/// inside the node); panics unless all come back.
fn ping(node: &Node, dst: &str, size: u32) {
    let size = size.to_string();
    let out = run(
        &mut node.exec(&[
            "ping", "-c", "3", "-i", "0.2", "-W", "5", "-M", "do", "-s", &size, dst,
        ]),
        secs(30),
    );
    out.assert_success(&format!("overlay ping {dst} -s {size}"));
    assert!(
        out.stdout.contains("3 received"),
        "overlay ping {dst} -s {size} lost echoes: {out}"
    );
}

/// 100 MiB of the test pattern from `from` to a sink in `to` across the
/// overlay; checks both SHA-256s and returns the rate in MiB/s. `during`
/// runs while the bytes flow.
fn transfer(from: &Node, to: &Node, to_overlay: &str, during: impl FnOnce()) -> f64 {
    let server = guest_script("port_server.py");
    let stream = guest_script("stream.py");
    let mut sink = LineProc::spawn(&mut to.exec(&[PYTHON, &server, &format!("sink:{SINK_PORT}")]));
    sink.wait_line("listening", secs(30), |l| l == "listening");
    let t0 = Instant::now();
    let bulk = BULK.to_string();
    let sender =
        Proc::spawn(&mut from.exec(&[PYTHON, &stream, "send", to_overlay, SINK_PORT, &bulk]));
    during();
    let out = sender.finish(secs(300));
    out.assert_success("overlay sender");
    let got = sink.wait_line("sink result", secs(60), |l| l.starts_with("sink "));
    let rate = BULK as f64 / MIB as f64 / t0.elapsed().as_secs_f64();
    let sent = Digested::parse(out.stdout.trim());
    let got = Digested::parse(&got["sink ".len()..]);
    assert_eq!(sent, Pattern::digest(BULK), "sender's digest");
    assert_eq!(got, sent, "what arrived across the overlay");
    rate
}

/// The kubelet port: a server in node A on 10250, reached from machine B
/// (outside any node) at machine A's address; node A sees machine B.
fn kubelet_port_from_other_machine(m: &Machines, a: &Node) {
    let server = guest_script("port_server.py");
    let mut http =
        LineProc::spawn(&mut a.exec(&[PYTHON, &server, &format!("http:{KUBELET_PORT}")]));
    http.wait_line("listening", secs(30), |l| l == "listening");
    let dst = SocketAddr::from((MACHINE[0].parse::<Ipv4Addr>().unwrap(), KUBELET_PORT));
    let (body, local) = in_netns(&m.path(1), move || http_get(dst))
        .unwrap_or_else(|e| panic!("GET {dst} from machine B: {e}"));
    let seen = parse_seen(&body);
    assert_eq!(seen.guest_port, KUBELET_PORT, "{body}");
    assert_eq!(seen.client, local, "node A sees machine B's own address");
}

/// The node may reach the other machine only: another address on the
/// machines' link is refused by the allow-list at once (ICMP
/// administratively prohibited: "No route to host"), its own machine's
/// address at a port rnet does not publish is refused as the host's own
/// (as host loopback: "Network is unreachable"), and `rnet status` counts
/// both as policy drops. Its own machine's address at the published
/// kubelet port comes back to the node's own server (hairpin), seen from
/// the gateway: what a single-node cluster's API server dialing the
/// node's advertised address needs.
fn allow_list_holds(a: &Node) {
    let policy = |s: Value| s["drops"]["policy"].as_u64().unwrap();
    let before = policy(a.status_json());
    let url = format!("http://198.18.50.3:{KUBELET_PORT}/");
    let out = run(&mut a.exec(&strs(&curl(&url))), secs(30));
    out.assert_failure("node A reaching an address outside its allow-list");
    assert_stderr_has(&out, "No route to host");
    let url = format!("http://{}:{}/", MACHINE[0], KUBELET_PORT + 1);
    let out = run(&mut a.exec(&strs(&curl(&url))), secs(30));
    out.assert_failure("node A reaching its own machine's address at an unpublished port");
    assert_stderr_has(&out, "Network is unreachable");
    assert!(
        policy(a.status_json()) >= before + 2,
        "no policy drops counted"
    );

    let server = guest_script("port_server.py");
    let mut http =
        LineProc::spawn(&mut a.exec(&[PYTHON, &server, &format!("http:{KUBELET_PORT}")]));
    http.wait_line("listening", secs(30), |l| l == "listening");
    let url = format!("http://{}:{KUBELET_PORT}/", MACHINE[0]);
    let out = run(&mut a.exec(&strs(&curl(&url))), secs(30));
    out.assert_success("node A reaching its own published kubelet port (hairpin)");
    let seen = parse_seen(&out.stdout);
    assert_eq!(seen.guest_port, KUBELET_PORT, "{out}");
    assert_eq!(
        seen.client.ip().to_string(),
        GATEWAY,
        "hairpin client: {out}"
    );
}

/// While `transfer` runs: `rnet status --json` of node A shows UDP flows
/// (the VXLAN datagrams) and TAP byte counts that grow; the Prometheus
/// form parses with the Prometheus client's parser and agrees.
fn status_during_transfer(a: &Node) {
    let first = a.status_json();
    let tap_bytes = |s: &Value| {
        s["tap"]["bytes_in"].as_u64().unwrap() + s["tap"]["bytes_out"].as_u64().unwrap()
    };
    let mut seen_udp = 0;
    let grew = poll_until(secs(30), || {
        let s = a.status_json();
        seen_udp = seen_udp.max(s["flows"]["udp"].as_u64().unwrap_or(0));
        (tap_bytes(&s) >= tap_bytes(&first) + 8 * MIB).then_some(s)
    });
    let (later, after) = grew.unwrap_or_else(|| panic!("TAP byte counts did not grow: {first}"));
    assert!(seen_udp >= 1, "no UDP flow (VXLAN) listed: {later}");
    eprintln!(
        "rnet status --json during the transfer: tap bytes {} -> {} within {after:?}, udp flows {seen_udp}",
        tap_bytes(&first),
        tap_bytes(&later)
    );
    assert_prometheus_parses(&a.status("--prometheus").stdout);
}

/// Parses the text with prometheus_client's parser (a standard one) and
/// checks that the TAP byte counters are there.
fn assert_prometheus_parses(text: &str) {
    let check = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
names = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        names.setdefault(s.name, []).append((s.labels, s.value))
tap = names.get("rnet_tap_bytes_total") or names.get("rnet_tap_bytes")
assert tap, sorted(names)
assert {l["direction"] for l, _ in tap} == {"in", "out"}, tap
assert all(v > 0 for _, v in tap), tap
print("parsed", len(names), "samples names")
"#;
    let file = TempPath::new("prometheus");
    std::fs::write(&file.0, text).unwrap();
    let out = run(
        Command::new(PYTHON).args(["-c", check]).arg(&file.0),
        secs(30),
    );
    out.assert_success(&format!("parsing rnet status --prometheus:\n{text}"));
}

/// After the transfers at TAP MTU 1500 (VXLAN datagrams of about 1,500
/// bytes, 100 MiB each way): node `n`'s `udp_io` counters show the overlay
/// batched. The guest kernel segments each TCP burst into a run of
/// same-size VXLAN datagrams, which leave in `UDP_SEGMENT` sends (far fewer
/// sends than datagrams); the other machine's datagrams come in `recvmmsg`
/// batches (far fewer calls than datagrams) and, where the TAP has USO,
/// reach the node as super-frames of several datagrams each.
fn overlay_batched(n: &Node, name: &str) {
    let st = n.status_json();
    let io = &st["udp_io"];
    let get = |k: &str| io[k].as_u64().unwrap_or_else(|| panic!("udp_io.{k}: {st}"));
    let (sends, out) = (get("sends"), get("datagrams_out"));
    assert!(
        out > 50_000,
        "node {name}: too few VXLAN datagrams out: {io}"
    );
    assert!(
        get("gso_sends") > 0,
        "node {name}: no UDP_SEGMENT send: {io}"
    );
    assert!(
        sends * 2 < out,
        "node {name}: about one send per datagram: {io}"
    );
    let (calls, got) = (get("recv_calls"), get("datagrams_in"));
    assert!(
        got > 50_000,
        "node {name}: too few VXLAN datagrams in: {io}"
    );
    assert!(
        calls * 2 < got,
        "node {name}: about one recv per datagram: {io}"
    );
    if st["tap"]["uso"].as_bool() == Some(true) {
        let uso = get("uso_out");
        assert!(
            uso > 0,
            "node {name}: no USO super-frame to the guest: {io}"
        );
        assert!(get("uso_out_datagrams") >= 2 * uso, "node {name}: {io}");
        // Fewer frames written to the TAP than datagrams delivered.
        let frames = st["tap"]["frames_out"].as_u64().unwrap();
        assert!(frames < got, "node {name}: a frame per datagram: {st}");
    }
    // With UDP-tunnel GSO (Linux 6.17) the node's VXLAN device hands rnet
    // one encapsulated 64 KiB TCP segment at a time: fewer frames read than
    // datagrams sent, each cut into a UDP_SEGMENT send.
    let tnl = st["tap"]["udp_tunnel_gso"].as_bool();
    assert_eq!(tnl, Some(tunnel_gso_expected()), "node {name}: {st}");
    if tnl == Some(true) {
        let cut = st["tap"]["tunnel_frames_in"].as_u64().unwrap();
        assert!(cut > 0, "node {name}: no tunnel super-frame: {st}");
        assert!(get("uso_in") >= cut, "node {name}: {st}");
        let frames = st["tap"]["frames_in"].as_u64().unwrap();
        assert!(frames < out, "node {name}: a frame read per datagram: {st}");
    }
    eprintln!(
        "node {name} after the transfers: tap {} udp_io {io}",
        st["tap"]
    );
}

/// Whether the TAP is expected to take UDP-tunnel GSO: the kernel has it
/// (6.17 and later) and USO is not turned off.
fn tunnel_gso_expected() -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = rel
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (a, b) >= (6, 17)
}

fn overlay(test: &str, tap_mtu: Option<u32>) {
    let m = Machines::create();
    let a = Node::start(&m, 0, tap_mtu);
    let b = Node::start(&m, 1, tap_mtu);
    let want_mtu = tap_mtu.unwrap_or(65520) - 50;
    assert_eq!((a.vxlan_mtu, b.vxlan_mtu), (want_mtu, want_mtu));

    ping(&a, OVERLAY[1], 56);
    ping(&b, OVERLAY[0], 56);
    // Full-size overlay packets (IPv4 20 + ICMP 8 bytes of headers), DF set.
    ping(&a, OVERLAY[1], want_mtu - 28);
    ping(&b, OVERLAY[0], want_mtu - 28);

    kubelet_port_from_other_machine(&m, &a);
    allow_list_holds(&a);

    let ab = transfer(&a, &b, OVERLAY[1], || status_during_transfer(&a));
    let ba = transfer(&b, &a, OVERLAY[0], || ());
    if tap_mtu == Some(1500) {
        // At 65520 each VXLAN datagram is near 64 KiB: nothing to batch.
        overlay_batched(&a, "A");
        overlay_batched(&b, "B");
    }
    eprintln!(
        "{test}: VXLAN MTU {want_mtu}: 100 MiB A->B {ab:.0} MiB/s, B->A {ba:.0} MiB/s (sha256 match)"
    );
    drop((a, b));
}

#[test]
fn vxlan_overlay_default_mtu() {
    require!(require_root);
    overlay(module_path_test!(), None);
}

#[test]
fn vxlan_overlay_mtu_1500() {
    require!(require_root);
    overlay(module_path_test!(), Some(1500));
}
