//! Pods behind a rootless node: Debian's CNI plugins (containernetworking-
//! plugins) inside a node namespace served by rnet, as on a rootless
//! Kubernetes node.
//!
//! The node is `rnet run --allow-host-loopback -p 127.0.0.1:HP:30080 --
//! unshare -m sh tests/guest/cni_node.sh 30080 http:80`: root of its user
//! namespace, with a mount namespace of its own whose /run and /var/lib are
//! fresh tmpfs mounts (so `ip netns add`, host-local IPAM and iptables'
//! lock write nowhere on the host). The script makes the pod netns, calls
//! the bridge plugin (cni0 as gateway, host-local 10.88.0.0/16, ipMasq)
//! and then portmap (hostPort 30080 -> pod:80, iptables DNAT on the nft
//! backend), and starts an HTTP server in the pod.
//!
//! Shown, on each of rnet's port paths:
//! - the pod reaches a host service at 10.0.2.2 (the host's loopback),
//!   masqueraded by the bridge plugin to the node's 10.0.2.100;
//! - 100 MiB pod -> host arrive with a matching SHA-256;
//! - a host client reaches the pod through the published port and the
//!   portmap DNAT: 127.0.0.1:HP -> rnet -> 10.0.2.100:30080 -> DNAT ->
//!   pod:80, and the pod sees the client as the gateway with its port.
//!
//! The last one fails on the fast path (ignored there, with the reason):
//! the fast path's namespace agent connects to 10.0.2.100:30080 from the
//! client's address with IP_TRANSPARENT and routes replies back to itself
//! by the policy rule `from 10.0.2.100 ipproto tcp sport 30080`, but after
//! the DNAT the pod's SYN-ACK is forwarded from 10.88.0.x:80, matches no
//! rule, leaves through tap0 (un-DNATed to 10.0.2.100:30080 on the way
//! out) and rnet's stack answers it with a RST; the agent's SYN is retried
//! until the client gives up.
//!
//! Every rnet runs with `--outbound-allow none` and a loopback DNS upstream
//! (the builder's defaults); the pod only talks to 10.0.2.2.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use common::*;

const MIB: u64 = 1 << 20;
const BULK: u64 = 100 * MIB;
/// The node port portmap maps to the pod's port 80 (NodePort range).
const NODE_PORT: u16 = 30080;
const POD_PORT: u16 = 80;

/// Everything the node needs: user namespaces, the CNI plugins, iptables.
fn prerequisites(test: &str) -> bool {
    const PKG: &str = "Debian package containernetworking-plugins";
    require_userns(test)
        && require_path(test, "/usr/lib/cni/bridge", PKG)
        && require_path(test, "/usr/lib/cni/host-local", PKG)
        && require_path(test, "/usr/lib/cni/portmap", PKG)
        && require_program(test, "iptables")
}

/// Which of rnet's port paths the node's published port uses.
#[derive(Clone, Copy, Debug)]
enum PortPath {
    /// `--port-path stack`.
    Stack,
    /// The default (`auto`), which must end up on the fast path.
    Default,
}

impl PortPath {
    fn shown(self) -> &'static str {
        match self {
            PortPath::Stack => "stack",
            PortPath::Default => "fast",
        }
    }
}

/// The node namespace with one pod, its rnet stopped on drop (SIGTERM:
/// the node script ends the pod server) and the pod server killed by pid
/// should it outlive the node.
struct Node {
    lp: LineProc,
    /// The node's shell, for nsenter -t.
    pid: u32,
    pod_server: u32,
    pod_ip: Ipv4Addr,
    host_port: u16,
    api: TempPath,
}

impl Node {
    fn start(path: PortPath) -> Node {
        let host_port = free_service_block(1);
        let api = TempPath::new("cni-api");
        let mut rnet = Rnet::new()
            .arg("-v")
            .allow_host_loopback()
            .arg("-p")
            .arg(format!("127.0.0.1:{host_port}:{NODE_PORT}"))
            .arg("--api-socket")
            .arg(&api.0);
        if let PortPath::Stack = path {
            rnet = rnet.arg("--port-path").arg("stack");
        }
        let script = guest_script("cni_node.sh");
        let np = NODE_PORT.to_string();
        let server = format!("http:{POD_PORT}");
        let mut lp =
            LineProc::spawn(&mut rnet.run_cmd(&["unshare", "-m", "sh", &script, &np, &server]));
        // The pod server's "listening" may come before or after the node's lines.
        let mut want = vec!["pod-ip ", "pod-server ", "node-ready ", "listening"];
        let mut got = Vec::new();
        while !want.is_empty() {
            let l = lp.wait_line("node set-up", secs(60), |l| {
                want.iter().any(|w| l.starts_with(w))
            });
            want.retain(|w| !l.starts_with(w));
            got.push(l);
        }
        let value = |key: &str| {
            got.iter()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .to_string()
        };
        Node {
            pid: value("node-ready ").parse().unwrap(),
            pod_server: value("pod-server ").parse().unwrap(),
            pod_ip: value("pod-ip ").parse().unwrap(),
            lp,
            host_port,
            api,
        }
    }

    /// A command run in the node's user, network and mount namespaces.
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--preserve-credentials", "-U", "-n", "-m", "-t"])
            .arg(self.pid.to_string())
            .args(args);
        clean_env(&mut c);
        c
    }

    /// A command run in the pod (through `ip netns exec` in the node).
    fn pod(&self, args: &[&str]) -> Command {
        let mut argv = vec!["ip", "netns", "exec", "pod1"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// Waits until `rnet port ls` shows the published port on `want`.
    #[track_caller]
    fn assert_path(&self, want: &str) {
        let mut rows = Vec::new();
        let ok = poll_until(secs(5), || {
            rows = port_rows(&self.api.0);
            (rows.len() == 1 && rows[0].get(4).map(String::as_str) == Some(want)).then_some(())
        });
        assert!(
            ok.is_some(),
            "the published port must be on {want}: {rows:?}"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let out = self.lp.stop(secs(10));
        if std::thread::panicking() {
            eprintln!("--- the node at the failure ---\n{out}");
        }
        // Only if that pid is still the pod's server (not reused).
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", self.pod_server)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("port_server.py") {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pod_server as i32, libc::SIGKILL) };
        }
    }
}

/// The pod reaches a host HTTP server on the host's loopback at 10.0.2.2.
fn pod_reaches_host(node: &Node) {
    let http = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", http.port());
    let out = run(&mut node.pod(&strs(&curl(&url))), secs(30));
    out.assert_success("pod -> host service");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    assert_eq!(http.hits(), 1);
    // The bridge plugin's ipMasq chain for the pod counted it.
    let nat = run(
        &mut node.exec(&[
            "iptables",
            "-t",
            "nat",
            "-L",
            "POSTROUTING",
            "-v",
            "-n",
            "-x",
        ]),
        secs(30),
    );
    nat.assert_success("iptables -t nat -L POSTROUTING");
    let pod = node.pod_ip.to_string();
    let packets: u64 = nat
        .stdout
        .lines()
        .find(|l| {
            l.split_whitespace()
                .any(|w| w == pod || w == format!("{pod}/32"))
        })
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no ipMasq rule for the pod {pod}: {nat}"));
    assert!(packets > 0, "the pod's traffic was not masqueraded: {nat}");
}

/// 100 MiB pod -> host sink on loopback, SHA-256 checked; returns MiB/s.
fn pod_bulk_to_host(node: &Node) -> f64 {
    let (addr, rx) = tcp_sink();
    let stream = "/run/rnet-test/stream.py";
    let (port, bulk) = (addr.port().to_string(), BULK.to_string());
    let t0 = Instant::now();
    let out = run(
        &mut node.pod(&[PYTHON, stream, "send", GATEWAY, &port, &bulk]),
        secs(300),
    );
    out.assert_success("pod -> host bulk sender");
    let got = rx
        .recv_timeout(secs(60))
        .expect("host sink")
        .expect("host sink");
    let rate = BULK as f64 / MIB as f64 / t0.elapsed().as_secs_f64();
    let sent = Digested::parse(out.stdout.trim());
    assert_eq!(sent, Pattern::digest(BULK), "sender's digest");
    assert_eq!(got, sent, "what the host received");
    rate
}

/// A host client reaches the pod's server through the published port and
/// the portmap DNAT; the pod sees the gateway with the client's port.
fn host_reaches_pod(node: &Node, path: PortPath) {
    node.assert_path(path.shown());
    for i in 0..5 {
        let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, node.host_port));
        let (body, local) = http_get(dst).unwrap_or_else(|e| {
            panic!(
                "GET {i} 127.0.0.1:{} -> node :{NODE_PORT} -> pod {}:{POD_PORT} on the {} path: {e}",
                node.host_port,
                node.pod_ip,
                path.shown()
            )
        });
        let seen = parse_seen(&body);
        assert_eq!(seen.guest_port, POD_PORT, "served by the pod: {body}");
        assert_eq!(
            seen.client,
            SocketAddr::from(([10, 0, 2, 2], local.port())),
            "the pod sees the gateway with the client's port"
        );
    }
}

#[test]
fn pod_behind_cni_stack_path() {
    let test = module_path_test!();
    require!(prerequisites(test));
    let node = Node::start(PortPath::Stack);
    pod_reaches_host(&node);
    host_reaches_pod(&node, PortPath::Stack);
    let rate = pod_bulk_to_host(&node);
    eprintln!(
        "{test}: pod {}: 100 MiB pod -> host at {rate:.0} MiB/s (sha256 match)",
        node.pod_ip
    );
}

#[test]
fn pod_behind_cni_default_path() {
    let test = module_path_test!();
    require!(prerequisites(test));
    let node = Node::start(PortPath::Default);
    node.assert_path("fast");
    pod_reaches_host(&node);
    let rate = pod_bulk_to_host(&node);
    eprintln!(
        "{test}: pod {}: 100 MiB pod -> host at {rate:.0} MiB/s (sha256 match)",
        node.pod_ip
    );
}

/// The pod's replies come from the pod, not from the node port; the
/// agent's per-connection rule (`to CLIENT dport PORT`) brings them back.
#[test]
fn host_reaches_pod_through_portmap_fast_path() {
    require!(prerequisites(module_path_test!()));
    let node = Node::start(PortPath::Default);
    host_reaches_pod(&node, PortPath::Default);
}
