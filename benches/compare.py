#!/usr/bin/env python3
"""Side-by-side benchmark of rnet, slirp4netns and pasta (and, for published
ports, RootlessKit's builtin port driver).

Run through benches/compare.sh, which checks the tools and drops root
privileges. This script does the work:

    compare.py run --out DIR [--rnet PATH] --netbench PATH
                   [--tools rnet,slirp4netns,pasta,rootlesskit]
                   [--iperf-seconds 5] [--rtt-count 10000] [--cps-seconds 5]
                   [--flows 1000] [--many-flows 10000]

For each tool it creates a rootless namespace (`unshare -Urn`), attaches the
tool to it, and drives clients inside the namespace with `nsenter` against
servers listening on the host's 127.0.0.1, reached through the gateway
10.0.2.2, which every tool maps to host loopback:

- rnet:        rnet attach --allow-host-loopback --outbound-allow none
- slirp4netns: slirp4netns --configure (10.0.2.2 is host loopback by default)
- pasta:       pasta --config-net -a 10.0.2.100 -g 10.0.2.2 with its gateway
               mapping, every port forwarding off (-t/-u/-T/-U none)

The guest only ever connects to 10.0.2.2 (and, for the IPv6 row, to fd00::2,
which rnet with --allow-host-loopback, slirp4netns --enable-ipv6 and pasta's
gateway mapping all turn into the host's ::1). Latency and short connections
use the compiled `netbench` example (examples/netbench.rs) at both ends; the
readiness probe, the idle-flow holder and the peer check use this file as the
guest-side helper (`compare.py guest ...`), run inside the namespace.

Many open flows: on the instance used for RSS, the guest holds --many-flows
idle connections to a host holder, then one iperf3 stream runs namespace ->
host; its figure is compared with the one-flow figure of the same run.

Published ports (MTU 65520): a fresh namespace per forwarder publishes host
127.0.0.1:HP to guest port 5201, an iperf3 server runs inside the namespace,
and the iperf3 client on the host connects to 127.0.0.1:HP (and with -R):

- rnet:         -p 127.0.0.1:HP:5201 (fast path; `rnet port ls` must say fast)
- rnet-stack:   the same with --port-path stack
- slirp4netns:  --api-socket S, then {"execute": "add_hostfwd", ...}
- pasta:        -t 127.0.0.1/HP:5201
- rootlesskit:  rootlesskit --net=slirp4netns --port-driver=builtin
                -p 127.0.0.1:HP:5201/tcp (its child is the namespace)

Before iperf3, a one-connection guest server (`compare.py guest peer`)
reports the peer address it sees for a host client on 127.0.0.1.

Output: DIR/table.md, DIR/throughput.svg, DIR/results.json and every raw
output under DIR/raw/.
"""

import argparse
import errno
import json
import os
import platform
import queue
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

GATEWAY = "10.0.2.2"
# IPv6: the guest and gateway on fd00::/64 (rnet's and slirp4netns's default
# prefix; pasta is given the same); the gateway maps to the host's ::1.
GATEWAY6 = "fd00::2"
GUEST6 = "fd00::100"
GUEST_IFACE = "tap0"
TOOLS = ("rnet", "slirp4netns", "pasta", "rootlesskit")
# Tools with a column in the main table (rootlesskit only forwards ports here).
TABLE_TOOLS = ("rnet", "slirp4netns", "pasta")
GUEST_PORT = 5201
# Published-port forwarders: (name, tool, label).
FORWARDERS = (
    ("rnet", "rnet", "rnet fast path (-p)"),
    ("rnet-stack", "rnet", "rnet stack path (--port-path stack)"),
    ("slirp4netns", "slirp4netns", "slirp4netns (API add_hostfwd)"),
    ("pasta", "pasta", "pasta (-t)"),
    ("rootlesskit", "rootlesskit", "RootlessKit builtin driver"),
)
MTUS = (65520, 1500)
READY_TIMEOUT = 15.0
# Kernel-limit test hosts (compare.sh makes them as root): "guest" G and
# "host" H, a veth pair lim0 between them.
VETH_IF = "lim0"
VETH_HOST = "198.18.60.1"
VETH_GUEST = "198.18.60.2"
VETH_HOST6 = "fd01:60::1"
VETH_GUEST6 = "fd01:60::2"
# Ports of the servers in H (a namespace of its own: nothing else there).
VETH_IPERF, VETH_RR, VETH_CPS, VETH_UDP = 5201, 5202, 5203, 5204
# The VXLAN overlay (tests/multinode.rs): VNI 1, port 8472, remote the
# other machine; the TAP and the underlay at MTU 1500, VXLAN 1450.
VXLAN_OVERLAY = {"h": "10.244.0.1", "g": "10.244.0.2"}
VXLAN_MTU = 1500
UDP_SIZES = (1400, 64)
PUBLISHED_CONNECTIONS = 100
RR_CONNECTIONS = 64

# --------------------------------------------------------------------------
# guest side: clients run inside the namespace
# --------------------------------------------------------------------------


def connect(host, port, timeout=10.0):
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def guest_probe(host, port, timeout):
    """Polls until one request/response exchange through the gateway works."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with connect(host, port, timeout=1.0) as s:
                s.sendall(b"p")
                if s.recv(1) == b"p":
                    print(json.dumps({"ok": True}))
                    return 0
        except OSError as e:
            last = e
        time.sleep(0.02)
    print(json.dumps({"ok": False, "error": str(last)}))
    return 1


def guest_hold(host, port, count):
    """Opens `count` idle connections, says so, holds them until stdin closes.
    If one fails, says how many were open and why, and exits."""
    raise_nofile()
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((host, port), timeout=10.0))
    except OSError as e:
        print(json.dumps({"open": len(socks), "error": str(e) or type(e).__name__}), flush=True)
        return 1
    print(json.dumps({"open": len(socks)}), flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    return 0


def guest_peer(addr, port, timeout):
    """One-connection server: answers 1 byte and reports the peer it saw."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(16)
    ls.settimeout(timeout)
    print(json.dumps({"listening": True}), flush=True)
    try:
        c, peer = ls.accept()
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    c.settimeout(timeout)
    b = c.recv(1)
    if b:
        c.sendall(b)
    c.close()
    ls.close()
    print(json.dumps({"peer": peer[0], "port": peer[1]}), flush=True)
    return 0


# --------------------------------------------------------------------------
# host side: servers on 127.0.0.1 (and ::1)
# --------------------------------------------------------------------------


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def free_port(addr="127.0.0.1"):
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class Holder:
    """Accepts TCP connections on 127.0.0.1 in a thread and keeps them open
    (the idle flows of the RSS and many-flows rows)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    time.sleep(0.01)
                    continue
                return
            with self.lock:
                self.held.append(c)

    def held_count(self):
        with self.lock:
            return len(self.held)

    def release(self):
        with self.lock:
            for c in self.held:
                c.close()
            self.held = []


class NetbenchServer:
    """A `netbench rr-server` or `cps-server` on a loopback address (127.0.0.1
    or ::1), started by this script and stopped by its pid."""

    def __init__(self, netbench, mode, addr, raw):
        self.log = open(raw.path(f"netbench-{mode}-{'v6' if ':' in addr else 'v4'}.log"), "w")
        listen = f"[{addr}]:0" if ":" in addr else f"{addr}:0"
        self.proc = subprocess.Popen(
            [netbench, mode, "--listen", listen],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True,
        )
        self.port = None
        r, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT)
        if r:
            try:
                self.port = int(json.loads(self.proc.stdout.readline())["listening"].rsplit(":", 1)[1])
            except (ValueError, KeyError, IndexError):
                pass
        if self.port is None:
            self.close()
            raise SystemExit(f"netbench {mode} on {addr} did not start (see raw/{os.path.basename(self.log.name)})")

    def close(self):
        stop_pid(self.proc)
        self.log.close()


# --------------------------------------------------------------------------
# namespaces and tools
# --------------------------------------------------------------------------


class Raw:
    """Collects raw outputs under DIR/raw."""

    def __init__(self, out):
        self.dir = os.path.join(out, "raw")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, text):
        with open(self.path(name), "w") as f:
            f.write(text)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def stop_pid(proc, timeout=5.0):
    """Ends a process this script started: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Namespace:
    """A rootless user+network namespace served by one tool.

    With `publish` (a host port), the tool also forwards host
    127.0.0.1:publish to the guest's port GUEST_PORT; `port_path` "stack"
    asks rnet for its userspace-stack path. With `ipv6`, the link also
    carries IPv6 with the gateway GATEWAY6 mapped to the host's ::1, and the
    readiness probe goes through it (`probe_port` is then a port on ::1).
    """

    def __init__(self, tool, mtu, args, raw, label, probe_port, publish=None, port_path=None, ipv6=False):
        self.tool = tool
        self.ipv6 = ipv6
        self.mtu = mtu
        self.args = args
        self.raw = raw
        self.label = label
        self.publish = publish
        self.port_path = port_path
        self.target = None
        self.ns_pid = None
        self.proc = None
        self.log = None
        self.error = None
        self.scratch = None
        self.api = None
        try:
            self._start(probe_port)
        except BaseException:
            self.close()
            raise

    def _scratch(self):
        if self.scratch is None:
            # Short path: unix socket names are limited to 108 bytes.
            self.scratch = tempfile.mkdtemp(prefix="rnet-cmp-")
        return self.scratch

    def _start(self, probe_port):
        self.log = open(self.raw.path(f"{self.label}.log"), "w")
        if self.tool == "rootlesskit":
            self._start_rootlesskit()
            return
        # The target: its first output line says the namespaces exist.
        self.target = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", "echo up; exec sleep infinity"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        if not wait_line(self.target.stdout, READY_TIMEOUT):
            raise RuntimeError("unshare did not start (are unprivileged user namespaces enabled?)")
        self.ns_pid = self.target.pid
        pid = str(self.target.pid)
        r, w = os.pipe()
        if self.tool == "rnet":
            cmd = [
                self.args.rnet, "attach", "--mtu", str(self.mtu), "--tap", GUEST_IFACE,
                "--allow-host-loopback", "--outbound-allow", "none", "--disable-dns",
                "--ready-fd", str(w),
            ]
            if self.publish:
                self.api = os.path.join(self._scratch(), "api.sock")
                cmd += ["--api-socket", self.api, "-p", f"127.0.0.1:{self.publish}:{GUEST_PORT}"]
                # The same port number over UDP (the published-UDP rows).
                cmd += ["-p", f"127.0.0.1:{self.publish}:{GUEST_PORT}/udp"]
                if self.port_path:
                    cmd += ["--port-path", self.port_path]
            cmd.append(pid)
        elif self.tool == "slirp4netns":
            cmd = [
                "slirp4netns", "--configure", f"--mtu={self.mtu}", "--disable-dns",
                f"--ready-fd={w}",
            ]
            if self.ipv6:
                # The guest takes an fd00::/64 address by SLAAC; the
                # gateway fd00::2 is the host's ::1 (host loopback is on).
                cmd.append("--enable-ipv6")
            if self.publish:
                self.api = os.path.join(self._scratch(), "api.sock")
                cmd.append(f"--api-socket={self.api}")
            cmd += [pid, GUEST_IFACE]
        else:
            # No ready fd in this pasta: readiness is the probe below.
            os.close(w)
            w = None
            tcp = f"127.0.0.1/{self.publish}:{GUEST_PORT}" if self.publish else "none"
            udp = tcp
            cmd = [
                "pasta", "--foreground", "--quiet", "--config-net",
                "--mtu", str(self.mtu), "--ns-ifname", GUEST_IFACE,
                "--address", "10.0.2.100", "--netmask", "24", "--gateway", GATEWAY,
            ]
            if self.ipv6:
                # Its gateway mapping covers IPv6 too: fd00::2 is the
                # host's ::1. NDP stays on for the gateway's neighbour entry.
                cmd += ["--address", GUEST6, "--gateway", GATEWAY6]
            else:
                cmd += ["-4", "--no-ndp"]
            cmd += [
                "--tcp-ports", tcp, "--udp-ports", udp, "--tcp-ns", "none", "--udp-ns", "none",
                "--no-dhcp", "--no-dhcpv6", "--no-ra", pid,
            ]
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
            pass_fds=(w,) if w is not None else (),
        )
        if w is not None:
            os.close(w)
            ready = wait_bytes(r, READY_TIMEOUT)
            if not ready:
                os.close(r)
                raise RuntimeError(f"{self.tool} did not signal readiness (see raw/{self.label}.log)")
        os.close(r)
        # Every tool: one real exchange through the gateway (for IPv6, once
        # the guest's address is usable: SLAAC and DAD take a moment).
        gw = GATEWAY6 if self.ipv6 else GATEWAY
        out = self.guest(["probe", gw, str(probe_port), str(READY_TIMEOUT)], timeout=READY_TIMEOUT + 5)
        if not json.loads(out.strip().splitlines()[-1]).get("ok"):
            raise RuntimeError(f"{self.tool}: the namespace cannot reach the host through {gw}: {out}")
        if self.publish and self.tool == "slirp4netns":
            for proto in ("tcp", "udp"):
                req = {
                    "execute": "add_hostfwd",
                    "arguments": {"proto": proto, "host_addr": "127.0.0.1", "host_port": self.publish, "guest_port": GUEST_PORT},
                }
                reply = api_call(self.api, req)
                self.log.write(f"# api: {json.dumps(req)} -> {json.dumps(reply)}\n")
                self.log.flush()
                if "return" not in reply:
                    raise RuntimeError(f"slirp4netns add_hostfwd {proto} failed: {reply}")

    def _start_rootlesskit(self):
        # RootlessKit makes the namespaces itself (with slirp4netns for the
        # network); its child, found through the state directory, is the
        # target. Its guest never talks to the host: --disable-host-loopback.
        state = os.path.join(self._scratch(), "state")
        cmd = [
            "rootlesskit", f"--state-dir={state}", "--net=slirp4netns", f"--mtu={self.mtu}",
            "--disable-host-loopback", "--port-driver=builtin",
            "-p", f"127.0.0.1:{self.publish}:{GUEST_PORT}/tcp",
            "sleep", "infinity",
        ]
        env = dict(os.environ, HOME=self._scratch(), XDG_RUNTIME_DIR=self._scratch())
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=env)
        child = os.path.join(state, "child_pid")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rootlesskit exited with {self.proc.returncode} (see raw/{self.label}.log)")
            try:
                with open(child) as f:
                    self.ns_pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        if self.ns_pid is None:
            raise RuntimeError(f"rootlesskit wrote no child_pid (see raw/{self.label}.log)")
        # The port is published once the host side listens.
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.publish), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"rootlesskit: 127.0.0.1:{self.publish} never listened (see raw/{self.label}.log)")

    def nsenter(self, argv):
        return ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(self.ns_pid)] + argv

    def guest(self, argv, timeout=120):
        cmd = self.nsenter([self.args.python, os.path.abspath(__file__), "guest"] + argv)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 and not p.stdout.strip():
            raise RuntimeError(f"guest {argv[0]} failed: {p.stderr.strip()}")
        return p.stdout

    def pid(self):
        return self.proc.pid

    def close(self):
        if self.target:
            stop_pid(self.target)
        if self.proc:
            stop_pid(self.proc)
        if self.log:
            self.log.close()
            self.log = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def api_call(path, req, timeout=READY_TIMEOUT):
    """One request on a slirp4netns-style API socket; the decoded reply."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5.0)
                s.connect(path)
                s.sendall(json.dumps(req).encode())
                s.shutdown(socket.SHUT_WR)
                data = b""
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    data += b
            return json.loads(data.decode() or "{}")
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no API socket at {path}")
            time.sleep(0.02)


def wait_line(f, timeout):
    r, _, _ = select.select([f], [], [], timeout)
    return bool(r) and bool(f.readline())


def wait_bytes(fd, timeout):
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r) and bool(os.read(fd, 16))


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------


def iperf(ns, port, seconds, reverse, raw, name, ipv6=False):
    argv = ["iperf3", "-c", GATEWAY6 if ipv6 else GATEWAY, "-p", str(port), "-t", str(seconds), "-J"]
    if ipv6:
        argv.append("-6")
    if reverse:
        argv.append("-R")
    p = subprocess.run(ns.nsenter(argv), capture_output=True, text=True, timeout=seconds + 60)
    raw.write(name, p.stdout + (("\n# stderr\n" + p.stderr) if p.stderr else ""))
    try:
        j = json.loads(p.stdout)
        if "error" in j:
            return None, j["error"]
        return j["end"]["sum_received"]["bits_per_second"] / 1e9, None
    except (ValueError, KeyError) as e:
        return None, f"unparsable iperf3 output ({e})"


def iperf_cmd(prefix, server, port, seconds, raw, name, extra=()):
    """iperf3 client `prefix + iperf3 -c server`; the receiver's Gbit/s (for
    -P, the sum over the streams)."""
    argv = list(prefix) + ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J"] + list(extra)
    first = None
    # The server takes a moment after a test before it accepts the next
    # ("the server is busy running a test"): a few tries, said in the result.
    for attempt in range(4):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90)
        raw.write(name, p.stdout + (("\n# stderr\n" + p.stderr) if p.stderr else ""))
        try:
            j = json.loads(p.stdout)
            got = j.get("end", {}).get("sum_received", {})
            if "error" in j and got.get("bytes"):
                # The measured interval completed (the receiver's sum is
                # there); the error came at teardown, e.g. a forwarder still
                # draining queued data when the control connection ends.
                return got["bits_per_second"] / 1e9, f"iperf3 ended with an error after the measurement: {j['error']}"
            if "error" in j:
                err = j["error"]
            else:
                gbps = j["end"]["sum_received"]["bits_per_second"] / 1e9
                return gbps, (f"ok on try {attempt + 1}, first: {first}" if first else None)
        except (ValueError, KeyError) as e:
            err = f"unparsable iperf3 output ({e})"
        first = first or err
        if "busy" not in err and attempt >= 1:
            break
        time.sleep(1.0)
    return None, err


def read_json_line(proc, timeout):
    """The first JSON line a started process prints (None on timeout/exit)."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    if not r:
        return None
    try:
        return json.loads(proc.stdout.readline())
    except ValueError:
        return None


def udp_measure(netbench, sink_prefix, sink_listen, send_prefix, send_to, size, seconds, raw, name):
    """A `netbench udp-sink` (under `sink_prefix`, e.g. an nsenter) and a
    `netbench udp-send` of `size`-byte datagrams for `seconds`; the sink's
    delivered rate and the loss. Returns (dict, error)."""
    sink = subprocess.Popen(
        list(sink_prefix) + [netbench, "udp-sink", "--listen", sink_listen, "--seconds", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        if read_json_line(sink, READY_TIMEOUT) is None:
            return None, f"udp-sink did not start: {sink.stderr.read().strip() if sink.poll() is not None else 'timeout'}"
        snd = subprocess.run(
            list(send_prefix) + [netbench, "udp-send", "--connect", send_to, "--size", str(size), "--seconds", str(seconds)],
            capture_output=True, text=True, timeout=seconds + 60,
        )
        try:
            out, err = sink.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stop_pid(sink)
            out, err = sink.communicate()
        raw.write(name, f"# sender\n{snd.stdout}{snd.stderr}\n# sink\n{out}{err}")
        if snd.returncode != 0:
            return None, f"udp-send failed: {snd.stderr.strip()}"
        sent = json.loads(snd.stdout.strip().splitlines()[-1])
        got = json.loads(out.strip().splitlines()[-1])
        if got.get("sent") is None:
            # The end marker was lost: the sender's own count.
            got["sent"] = sent["sent"]
            got["loss"] = 1.0 - min(got["datagrams"], sent["sent"]) / sent["sent"] if sent["sent"] else None
        got["sent_gbps"] = sent["gbps"]
        got["kpps"] = got["pps"] / 1000.0
        return got, None
    except (ValueError, KeyError, IndexError, OSError, subprocess.SubprocessError) as e:
        return None, f"UDP measurement failed: {e}"
    finally:
        stop_pid(sink)


def store_udp(r, key, got, err, notes, who):
    """Stores one UDP result: Gbit/s (1,400 B) or kdatagrams/s (64 B) and the loss."""
    if err:
        r[key] = None
        notes.append(f"{who} {key}: {err}")
        log(f"  {key}: – ({err})")
        return
    r[key] = got["gbps"] if key.endswith("_1400") else got["kpps"]
    r[key + "_loss"] = got["loss"]
    log(f"  {key}: {got['gbps']:.3f} Gbit/s, {got['kpps']:.0f} k/s delivered, loss {100 * (got['loss'] or 0):.1f}% "
        f"(sender {got['sent_gbps']:.3f} Gbit/s)")


# --------------------------------------------------------------------------
# the kernel's limit: a veth pair between two test hosts, and host loopback
# --------------------------------------------------------------------------


class Veth:
    """The kernel-limit test hosts made by compare.sh (as root): network
    namespaces G ("guest") and H ("host") in user namespaces owned by this
    uid, joined by the veth pair lim0. This process enters them with nsenter
    and sets their addresses and MTU; compare.sh removes them."""

    def __init__(self, spec):
        g, h = spec.split(",")
        self.pid = {"g": int(g), "h": int(h)}
        self.addr = {"g": VETH_GUEST, "h": VETH_HOST}
        self.addr6 = {"g": VETH_GUEST6, "h": VETH_HOST6}
        for side in ("g", "h"):
            self.ip(side, "link", "set", "lo", "up")
            self.ip(side, "addr", "add", f"{self.addr[side]}/24", "dev", VETH_IF)
            self.ip(side, "addr", "add", f"{self.addr6[side]}/64", "dev", VETH_IF, "nodad")
            self.ip(side, "link", "set", VETH_IF, "up")

    def nsenter(self, side, argv):
        return ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(self.pid[side])] + list(argv)

    def ip(self, side, *argv, check=True):
        p = subprocess.run(self.nsenter(side, ["ip"] + list(argv)), capture_output=True, text=True, timeout=30)
        if check and p.returncode != 0:
            raise RuntimeError(f"ip {' '.join(argv)} in test host {side}: {p.stderr.strip()}")
        return p

    def mtu(self, mtu):
        for side in ("g", "h"):
            self.ip(side, "link", "set", VETH_IF, "mtu", str(mtu))

    def start(self, side, argv, raw, name):
        """A server in a test host; its first JSON line (netbench) or None."""
        f = open(raw.path(name), "w")
        proc = subprocess.Popen(self.nsenter(side, argv), stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        f.close()
        return proc


def wait_tcp(prefix, host, port, proc, what):
    """Polls until `host:port` accepts a TCP connection from inside `prefix`
    (a test host), or fails if `proc` exits or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    while True:
        p = subprocess.run(list(prefix) + [sys.executable, "-c", code], capture_output=True, timeout=30)
        if p.returncode == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def run_limits(args, raw, servers, limits, notes):
    """Every guest-side row once more over the veth pair (client in G, the
    same server in H) and every published-port row over a direct host
    loopback connection."""
    lim = lambda key, value, kind: limits.__setitem__(key, {"value": value, "kind": kind}) if value is not None else None
    if args.veth:
        veth = args.veth
        log("kernel limit: veth pair between two test hosts")
        started = []
        try:
            if args.udp_only:
                raise SkipRows()
            started.append(veth.start("h", ["iperf3", "-s", "-p", str(VETH_IPERF)], raw, "veth-iperf3-server.log"))
            started.append(veth.start("h", [args.netbench, "rr-server", "--listen", f"0.0.0.0:{VETH_RR}"], raw, "veth-rr-server.log"))
            started.append(veth.start("h", [args.netbench, "cps-server", "--listen", f"0.0.0.0:{VETH_CPS}"], raw, "veth-cps-server.log"))
            for port, proc in zip((VETH_IPERF, VETH_RR, VETH_CPS), started):
                wait_tcp(veth.nsenter("g", []), VETH_HOST, port, proc, f"the server on {VETH_HOST}:{port}")
            g = veth.nsenter("g", [])
            for mtu in MTUS:
                veth.mtu(mtu)
                for reverse in (False, True):
                    key = f"{'host_to_ns' if reverse else 'ns_to_host'}_{mtu}"
                    gbps, err = iperf_cmd(g, VETH_HOST, VETH_IPERF, args.iperf_seconds, raw,
                                          f"veth-mtu{mtu}-iperf{'-R' if reverse else ''}.json", ["-R"] if reverse else [])
                    lim(key, gbps, "veth")
                    log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
                    if err:
                        notes.append(f"veth {key}: {err}")
            veth.mtu(65520)
            gbps, err = iperf_cmd(g, VETH_HOST6, VETH_IPERF, args.iperf_seconds, raw, "veth-ipv6-iperf.json", ["-6"])
            lim("ns_to_host_v6_65520", gbps, "veth")
            log(f"  ns_to_host_v6_65520: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
            # The kernel's one active flow does not notice idle ones: the
            # one-flow figure is the limit of the many-flows row too.
            if "ns_to_host_65520" in limits:
                limits["ns_to_host_many_65520"] = dict(limits["ns_to_host_65520"], kind="veth, 1 flow")
            lat = json.loads(subprocess.run(
                g + [args.netbench, "rr-client", "--connect", f"{VETH_HOST}:{VETH_RR}", "--count", str(args.rtt_count)],
                capture_output=True, text=True, timeout=300, check=True).stdout.strip().splitlines()[-1])
            lim("rtt_median_us", lat["median_us"], "veth")
            lim("rtt_p99_us", lat["p99_us"], "veth")
            log(f"  rtt: median {lat['median_us']:.1f} µs, p99 {lat['p99_us']:.1f} µs")
            cps = json.loads(subprocess.run(
                g + [args.netbench, "cps-client", "--connect", f"{VETH_HOST}:{VETH_CPS}", "--seconds", str(args.cps_seconds)],
                capture_output=True, text=True, timeout=args.cps_seconds + 120, check=True).stdout.strip().splitlines()[-1])
            lim("cps", cps["per_sec"], "veth")
            log(f"  short connections: {cps['per_sec']:.0f}/s")
        except SkipRows:
            pass
        except (RuntimeError, OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
            notes.append(f"veth limit: {e}")
            log(f"  failed: {e}")
        finally:
            for proc in started:
                stop_pid(proc)
        try:
            g = veth.nsenter("g", [])
            veth.mtu(65520)
            for size in UDP_SIZES:
                key = f"udp_out_{size}"
                got, err = udp_measure(args.netbench, veth.nsenter("h", []), f"0.0.0.0:{VETH_UDP}", g,
                                       f"{VETH_HOST}:{VETH_UDP}", size, args.iperf_seconds, raw, f"veth-udp-{size}.txt")
                tmp = {}
                store_udp(tmp, key, got, err, notes, "veth")
                lim(key, tmp.get(key), "veth")
                if key + "_loss" in tmp:
                    limits[key]["loss"] = tmp[key + "_loss"]
                log(f"  {key}: {fmt(tmp.get(key))}")
        except (RuntimeError, OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
            notes.append(f"veth UDP limit: {e}")
            log(f"  failed: {e}")
    else:
        notes.append("no veth limit column: the harness makes its veth test hosts only when started as root")

    log("kernel limit: direct host loopback connection (published-port rows)")
    lo = "127.0.0.1"
    for reverse in (False, True) if not args.udp_only else ():
        key = "published_out" if reverse else "published_in"
        gbps, err = iperf_cmd([], lo, servers["iperf"], args.iperf_seconds, raw, f"loopback-iperf{'-R' if reverse else ''}.json",
                              ["-R"] if reverse else [])
        lim(key, gbps, "loopback")
        gbps, err2 = iperf_cmd([], lo, servers["iperf"], args.iperf_seconds, raw,
                               f"loopback-iperf-P{PUBLISHED_CONNECTIONS}{'-R' if reverse else ''}.json",
                               ["-P", str(PUBLISHED_CONNECTIONS)] + (["-R"] if reverse else []))
        lim(f"{key}_p{PUBLISHED_CONNECTIONS}", gbps, "loopback")
        for e in (err, err2):
            if e:
                notes.append(f"loopback {key}: {e}")
    try:
        if args.udp_only:
            raise SkipRows()
        rr = json.loads(subprocess.run(
            [args.netbench, "rr-load", "--connect", f"{lo}:{servers['echo'].port}", "--connections", str(RR_CONNECTIONS),
             "--seconds", str(args.cps_seconds)],
            capture_output=True, text=True, timeout=args.cps_seconds + 120, check=True).stdout.strip().splitlines()[-1])
        lim("published_rr64", rr["per_sec"], "loopback")
    except SkipRows:
        pass
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
        notes.append(f"loopback rr-load: {e}")
    for size in UDP_SIZES:
        key = f"udp_in_{size}"
        port = free_port()
        got, err = udp_measure(args.netbench, [], f"{lo}:{port}", [], f"{lo}:{port}", size, args.iperf_seconds, raw,
                               f"loopback-udp-{size}.txt")
        tmp = {}
        store_udp(tmp, key, got, err, notes, "loopback")
        lim(key, tmp.get(key), "loopback")
        if key + "_loss" in tmp:
            limits[key]["loss"] = tmp[key + "_loss"]
    for key, v in limits.items():
        log(f"  limit {key}: {fmt(v['value'])} ({v['kind']})")


def vxlan_bare(veth, side):
    """The overlay device of tests/guest/vxlan_node.sh, directly on a test host."""
    other = "g" if side == "h" else "h"
    veth.ip(side, "link", "add", "vxlan1", "type", "vxlan", "id", "1", "dstport", "8472",
            "remote", veth.addr[other], "dev", VETH_IF)
    veth.ip(side, "link", "set", "vxlan1", "mtu", str(VXLAN_MTU - 50))
    veth.ip(side, "addr", "add", f"{VXLAN_OVERLAY[side]}/24", "dev", "vxlan1")
    veth.ip(side, "link", "set", "vxlan1", "up")


def overlay_iperf(client_prefix, server_prefix, server_addr, args, raw, label, r, notes, who):
    """iperf3 over the overlay both ways (client G side -> server H side)."""
    srv_log = open(raw.path(f"{label}-iperf3-server.log"), "w")
    srv = subprocess.Popen(list(server_prefix) + ["iperf3", "-s", "-p", str(VETH_IPERF)],
                           stdout=srv_log, stderr=srv_log, stdin=subprocess.DEVNULL)
    srv_log.close()
    try:
        wait_tcp(client_prefix, server_addr, VETH_IPERF, srv, f"the iperf3 server on {server_addr} ({who})")
        for reverse in (False, True):
            key = "vxlan_ba" if reverse else "vxlan_ab"
            gbps, err = iperf_cmd(client_prefix, server_addr, VETH_IPERF, args.iperf_seconds, raw,
                                  f"{label}-iperf{'-R' if reverse else ''}.json", ["-R"] if reverse else [])
            r[key] = gbps
            log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
            if err:
                notes.append(f"{who} {key}: {err}")
    finally:
        stop_pid(srv)


def run_vxlan_veth(args, raw, limits, notes):
    """The overlay of tests/multinode.rs on the bare veth pair (no rnet)."""
    veth = args.veth
    log(f"kernel limit: VXLAN overlay on the bare veth pair, MTU {VXLAN_MTU}")
    r = {}
    try:
        veth.mtu(VXLAN_MTU)
        for side in ("h", "g"):
            vxlan_bare(veth, side)
        overlay_iperf(veth.nsenter("g", []), veth.nsenter("h", []), VXLAN_OVERLAY["h"], args, raw, "veth-vxlan", r, notes, "veth")
        for key, v in r.items():
            if v is not None:
                limits[key] = {"value": v, "kind": "veth"}
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"veth VXLAN overlay: {e}")
        log(f"  failed: {e}")
    finally:
        for side in ("g", "h"):
            veth.ip(side, "link", "del", "vxlan1", check=False)


def wait_node_ready(proc, logf, what):
    """Reads a node's output ("vxlan-mtu N", then "node-ready PID") into its
    log until it is ready; the PID. A reader thread, since select on a
    buffered pipe misses the second line."""
    lines = queue.Queue()
    threading.Thread(target=lambda f=proc.stdout, q=lines: [q.put(x) for x in f] + [q.put("")], daemon=True).start()
    deadline = time.monotonic() + 30
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            line = ""
        if not line:
            raise RuntimeError(f"{what} did not come up")
        logf.write(line)
        logf.flush()
        if line.startswith("node-ready "):
            return int(line.split()[1])


def vxlan_script():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "guest", "vxlan_node.sh")


def run_vxlan_rnet(args, raw, results, notes):
    """The overlay between two rnet nodes, as tests/multinode.rs: on each
    test host an rnet serves a node namespace with -p 8472:8472/udp and
    --outbound-allow <the other host>/32; the node makes the VXLAN device
    (tests/guest/vxlan_node.sh). TCP across it both ways."""
    veth = args.veth
    r = results.setdefault("rnet", {})
    log(f"rnet: VXLAN overlay between two rnet nodes, TAP MTU {VXLAN_MTU}")
    nodes, logs, pids = [], [], {}
    try:
        veth.mtu(VXLAN_MTU)
        for side in ("h", "g"):
            other = veth.addr["g" if side == "h" else "h"]
            cmd = veth.nsenter(side, [
                args.rnet, "run", "--mtu", str(VXLAN_MTU), "--outbound-allow", f"{other}/32", "--disable-dns",
                "-p", "8472:8472/udp", "--", "sh", vxlan_script(), other, f"{VXLAN_OVERLAY[side]}/24",
            ])
            logf = open(raw.path(f"rnet-vxlan-{side}.log"), "w")
            logs.append(logf)
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, text=True)
            nodes.append(proc)
            pids[side] = wait_node_ready(proc, logf, f"rnet node on test host {side} (see raw/rnet-vxlan-{side}.log)")
        node = lambda side: ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(pids[side])]
        overlay_iperf(node("g"), node("h"), VXLAN_OVERLAY["h"], args, raw, "rnet-vxlan", r, notes, "rnet")
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        notes.append(f"rnet VXLAN overlay: {e}")
        log(f"  failed: {e}")
    finally:
        for proc in nodes:
            stop_pid(proc)
        for f in logs:
            f.close()


def slirp_node(veth, side, raw, procs, logf, scratch):
    """A node namespace on test host `side` served by slirp4netns as the rnet
    nodes are served: made inside the test host (so slirp4netns's sockets
    are the test host's), TAP tap0 at MTU VXLAN_MTU, host loopback and DNS
    off, the test host's 8472/udp forwarded to the node (API add_hostfwd).
    The test host has only lo and the veth pair: nothing leaves it. Returns
    the pid whose namespaces are the node's."""
    target = subprocess.Popen(
        veth.nsenter(side, ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", "echo up; exec sleep infinity"]),
        stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
    procs.append(target)
    if not wait_line(target.stdout, READY_TIMEOUT):
        raise RuntimeError(f"the slirp4netns node namespace on test host {side} did not start")
    api = os.path.join(scratch, f"api-{side}.sock")
    r, w = os.pipe()
    cmd = veth.nsenter(side, [
        "slirp4netns", "--configure", f"--mtu={VXLAN_MTU}", "--disable-dns", "--disable-host-loopback",
        f"--api-socket={api}", f"--ready-fd={w}", str(target.pid), "tap0",
    ])
    logf.write("$ " + " ".join(cmd) + "\n")
    logf.flush()
    procs.append(subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, pass_fds=(w,)))
    os.close(w)
    ready = wait_bytes(r, READY_TIMEOUT)
    os.close(r)
    if not ready:
        raise RuntimeError(f"slirp4netns on test host {side} did not signal readiness")
    req = {"execute": "add_hostfwd",
           "arguments": {"proto": "udp", "host_addr": "0.0.0.0", "host_port": 8472, "guest_port": 8472}}
    reply = api_call(api, req)
    logf.write(f"# api: {json.dumps(req)} -> {json.dumps(reply)}\n")
    logf.flush()
    if "return" not in reply:
        raise RuntimeError(f"slirp4netns add_hostfwd udp 8472 failed: {reply}")
    return target.pid


def run_vxlan_slirp(args, raw, results, notes):
    """The same overlay between two slirp4netns nodes ([`slirp_node`]), each
    running tests/guest/vxlan_node.sh. TCP across it both ways."""
    veth = args.veth
    r = results.setdefault("slirp4netns", {})
    log(f"slirp4netns: VXLAN overlay between two slirp4netns nodes, TAP MTU {VXLAN_MTU}")
    procs, logs, pids = [], [], {}
    scratch = tempfile.mkdtemp(prefix="rnet-cmp-")
    try:
        veth.mtu(VXLAN_MTU)
        for side in ("h", "g"):
            other = veth.addr["g" if side == "h" else "h"]
            logf = open(raw.path(f"slirp4netns-vxlan-{side}.log"), "w")
            logs.append(logf)
            pid = slirp_node(veth, side, raw, procs, logf, scratch)
            cmd = ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(pid),
                   "sh", vxlan_script(), other, f"{VXLAN_OVERLAY[side]}/24"]
            script = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, text=True)
            procs.append(script)
            wait_node_ready(script, logf, f"slirp4netns node on test host {side} (see raw/slirp4netns-vxlan-{side}.log)")
            pids[side] = pid
        node = lambda side: ["nsenter", "--preserve-credentials", "-U", "-n", "-t", str(pids[side])]
        overlay_iperf(node("g"), node("h"), VXLAN_OVERLAY["h"], args, raw, "slirp4netns-vxlan", r, notes, "slirp4netns")
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        notes.append(f"slirp4netns VXLAN overlay: {e}")
        log(f"  failed: {e}")
    finally:
        for proc in reversed(procs):
            stop_pid(proc)
        for f in logs:
            f.close()
        shutil.rmtree(scratch, ignore_errors=True)


def run_vxlan_rows(args, raw, results, limits, notes):
    """The VXLAN overlay rows: bare veth (the limit), rnet, slirp4netns."""
    if not args.veth:
        notes.append("VXLAN overlay rows: need the veth test hosts (run compare.sh as root)")
        return
    run_vxlan_veth(args, raw, limits, notes)
    if "rnet" in args.tools:
        run_vxlan_rnet(args, raw, results, notes)
    if "slirp4netns" in args.tools:
        run_vxlan_slirp(args, raw, results, notes)


def netbench_guest(ns, argv, raw, name, timeout):
    """Runs the netbench client inside the namespace; its JSON result."""
    p = subprocess.run(ns.nsenter([ns.args.netbench] + argv), capture_output=True, text=True, timeout=timeout)
    raw.write(name, p.stdout + (("\n# stderr\n" + p.stderr) if p.stderr else ""))
    if p.returncode != 0:
        raise RuntimeError(f"netbench {argv[0]} failed: {p.stderr.strip() or p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_tool(tool, args, raw, servers, results, notes):
    r = results.setdefault(tool, {})
    for mtu in MTUS if not args.udp_only else (65520,):
        label = f"{tool}-mtu{mtu}"
        log(f"{tool}: MTU {mtu}")
        try:
            ns = Namespace(tool, mtu, args, raw, label, servers["cps"].port)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            notes.append(f"{tool} MTU {mtu}: {e}")
            log(f"  failed: {e}")
            continue
        try:
            for reverse in (False, True) if not args.udp_only else ():
                key = f"{'host_to_ns' if reverse else 'ns_to_host'}_{mtu}"
                gbps, err = iperf(ns, servers["iperf"], args.iperf_seconds, reverse, raw, f"{label}-iperf{'-R' if reverse else ''}.json")
                r[key] = gbps
                log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
                if err:
                    notes.append(f"{tool} {key}: {err}")
            if mtu == 65520 and not args.udp_only:
                lat = netbench_guest(
                    ns, ["rr-client", "--connect", f"{GATEWAY}:{servers['echo'].port}", "--count", str(args.rtt_count)],
                    raw, f"{label}-latency.json", timeout=300,
                )
                r["rtt_median_us"] = lat["median_us"]
                r["rtt_p99_us"] = lat["p99_us"]
                log(f"  rtt: median {lat['median_us']:.1f} µs, p99 {lat['p99_us']:.1f} µs")
                cps = netbench_guest(
                    ns, ["cps-client", "--connect", f"{GATEWAY}:{servers['cps'].port}", "--seconds", str(args.cps_seconds)],
                    raw, f"{label}-cps.json", timeout=args.cps_seconds + 120,
                )
                r["cps"] = cps["per_sec"]
                log(f"  short connections: {cps['per_sec']:.0f}/s ({cps['errors']} errors)")
                if cps["errors"]:
                    notes.append(f"{tool}: {cps['errors']} failed short connections (first: {cps.get('first_error', '?')})")
            if mtu == 65520:
                # UDP guest -> host: a sink on the host's 127.0.0.1, the
                # sender inside, through the gateway.
                for size in UDP_SIZES:
                    port = free_port()
                    got, err = udp_measure(args.netbench, [], f"127.0.0.1:{port}", ns.nsenter([]), f"{GATEWAY}:{port}",
                                           size, args.iperf_seconds, raw, f"{label}-udp-{size}.txt")
                    store_udp(r, f"udp_out_{size}", got, err, notes, tool)
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            notes.append(f"{tool} MTU {mtu}: {e}")
            log(f"  failed: {e}")
        finally:
            ns.close()

    if not args.udp_only:
        run_ipv6(tool, args, raw, servers, r, notes)
        run_flows(tool, args, raw, servers, r, notes)


def run_ipv6(tool, args, raw, servers, r, notes):
    """Namespace -> host over IPv6 at MTU 65520: guest -> fd00::2 -> host ::1."""
    label = f"{tool}-ipv6"
    log(f"{tool}: IPv6, MTU 65520")
    try:
        ns = Namespace(tool, 65520, args, raw, label, servers["cps6"].port, ipv6=True)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        r["ns_to_host_v6_65520"] = f"n/a: {tool} set-up failed"
        notes.append(f"{tool} IPv6: {e}")
        log(f"  failed: {e}")
        return
    try:
        gbps, err = iperf(ns, servers["iperf6"], args.iperf_seconds, False, raw, f"{label}-iperf.json", ipv6=True)
        r["ns_to_host_v6_65520"] = gbps
        log(f"  ns_to_host_v6_65520: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
        if err:
            notes.append(f"{tool} ns_to_host_v6_65520: {err}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"{tool} IPv6: {e}")
        log(f"  failed: {e}")
    finally:
        ns.close()


class SkipRows(Exception):
    """Rows left out by --rows."""


class HoldError(RuntimeError):
    """The guest opened only `opened` of the connections asked for."""

    def __init__(self, msg, opened):
        super().__init__(msg)
        self.opened = opened


def hold_flows(ns, args, port, count, timeout):
    """A guest process holding `count` idle connections to the host holder."""
    hold = subprocess.Popen(
        ns.nsenter([args.python, os.path.abspath(__file__), "guest", "hold", GATEWAY, str(port), str(count)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    r, _, _ = select.select([hold.stdout], [], [], timeout)
    line = hold.stdout.readline() if r else ""
    try:
        said = json.loads(line)
    except ValueError:
        said = {}
    if said.get("open") == count and "error" not in said:
        return hold
    end_holder(hold)
    if "error" in said:
        raise HoldError(f"the guest opened {said['open']} of {count} connections, then: {said['error']}", said["open"])
    why = hold.stderr.read().strip() if hold.poll() is not None else f"timeout after {timeout} s"
    raise RuntimeError(f"holding {count} connections failed: {why}")


def end_holder(hold):
    try:
        hold.stdin.close()
    except OSError:
        pass
    try:
        hold.wait(timeout=60)
    except subprocess.TimeoutExpired:
        hold.kill()
        hold.wait()


def wait_held(holder, count, timeout):
    deadline = time.monotonic() + timeout
    while holder.held_count() < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder.held_count()


def nofile_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def run_flows(tool, args, raw, servers, r, notes):
    """RSS on a fresh instance (idle, then with --flows idle connections);
    then, on the same instance, --many-flows idle connections and one
    iperf3 stream namespace -> host."""
    label = f"{tool}-rss"
    log(f"{tool}: RSS, {args.flows} and {args.many_flows} open flows")
    try:
        ns = Namespace(tool, 65520, args, raw, label, servers["cps"].port)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"{tool} RSS: {e}")
        return
    holds = []
    holder = servers["hold"]
    try:
        r["rss_idle_kib"] = rss_kib(ns.pid())
        holds.append(hold_flows(ns, args, holder.port, args.flows, 120))
        r["flows_held"] = wait_held(holder, args.flows, 30)
        r["rss_flows_kib"] = rss_kib(ns.pid())
        log(f"  RSS idle {r['rss_idle_kib']} KiB, with {r['flows_held']} flows {r['rss_flows_kib']} KiB")
        # Every idle flow is a descriptor in the guest holder, in the host
        # holder (this process) and in the forwarder; all three inherit this
        # process's limit (raised to the hard limit at start; rnet raises its
        # own too). Spare room for everything else.
        limit = nofile_limit()
        if limit is not None and limit < args.many_flows + 512:
            r["ns_to_host_many_65520"] = f"n/a: open-file limit {limit}"
            notes.append(
                f"{tool} {args.many_flows} flows: skipped, the open-file limit is {limit} and the row needs about "
                f"{args.many_flows + 512} (raise the hard limit: ulimit -Hn, LimitNOFILE=)"
            )
            log(f"  {args.many_flows} flows: skipped, open-file limit {limit}")
        elif args.many_flows > 0:
            many_flows(tool, args, raw, servers, r, notes, ns, holds, limit)
        raw.write(
            f"{label}.json",
            json.dumps({k: r.get(k) for k in (
                "rss_idle_kib", "flows_held", "rss_flows_kib", "many_flows_held", "rss_many_flows_kib",
                "ns_to_host_many_65520", "many_flows_share",
            )}) + "\n",
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"{tool} RSS / many flows: {e}")
        log(f"  failed: {e}")
    finally:
        for hold in holds:
            end_holder(hold)
        holder.release()
        ns.close()


def many_flows(tool, args, raw, servers, r, notes, ns, holds, limit):
    """Tops the guest's idle flows up to --many-flows, then one iperf3 stream
    namespace -> host; its share of the tool's one-flow figure."""
    holder = servers["hold"]
    t0 = time.monotonic()
    more = args.many_flows - args.flows
    if more > 0:
        try:
            holds.append(hold_flows(ns, args, holder.port, more, 600))
        except HoldError as e:
            reached = args.flows + e.opened
            r["ns_to_host_many_65520"] = f"n/a: stalled at {reached:,} flows"
            why = str(e)
            if tool == "pasta" and limit is not None and limit // 2 < args.many_flows + 64:
                why += (
                    f" (this pasta accepts about half its open-file limit, here {limit}, in TCP connections; "
                    f"a hard limit of {2 * (args.many_flows + 64)} or more would let it hold {args.many_flows:,})"
                )
            notes.append(f"{tool} {args.many_flows} flows: {why}")
            log(f"  {args.many_flows} flows: {why}")
            return
    held = wait_held(holder, max(args.many_flows, args.flows), 60)
    r["many_flows_held"] = held
    r["rss_many_flows_kib"] = rss_kib(ns.pid())
    log(f"  {held} flows open after {time.monotonic() - t0:.1f} s, RSS {r['rss_many_flows_kib']} KiB")
    gbps, err = iperf(ns, servers["iperf"], args.iperf_seconds, False, raw, f"{tool}-flows{args.many_flows}-iperf.json")
    r["ns_to_host_many_65520"] = gbps
    one = r.get("ns_to_host_65520")
    r["many_flows_share"] = gbps / one if gbps is not None and one else None
    share = f" ({100 * r['many_flows_share']:.0f}% of 1 flow)" if r["many_flows_share"] is not None else ""
    log(f"  ns_to_host with {held} flows open: {fmt(gbps)} Gbit/s{share}" + (f" ({err})" if err else ""))
    if err:
        notes.append(f"{tool} {args.many_flows} flows: {err}")
    if held < args.many_flows:
        notes.append(f"{tool}: only {held} of {args.many_flows} idle flows reached the host holder")


def ns_listening(ns, port):
    """Whether a TCP socket listens on `port` inside the namespace."""
    p = subprocess.run(ns.nsenter(["cat", "/proc/net/tcp", "/proc/net/tcp6"]), capture_output=True, text=True, timeout=30)
    want = f":{port:04X}"
    for line in p.stdout.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[1].endswith(want) and f[3] == "0A":
            return True
    return False


def peer_check(ns, hp, raw, label):
    """The address a guest server sees for a host client on 127.0.0.1."""
    srv = subprocess.Popen(
        ns.nsenter([ns.args.python, os.path.abspath(__file__), "guest", "peer", "0.0.0.0", str(GUEST_PORT), str(READY_TIMEOUT)]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if not wait_line(srv.stdout, READY_TIMEOUT):
            raise RuntimeError(f"guest peer server did not start: {srv.stderr.read() if srv.poll() is not None else 'timeout'}")
        deadline = time.monotonic() + READY_TIMEOUT
        last = None
        while True:
            try:
                with socket.create_connection(("127.0.0.1", hp), timeout=2.0) as c:
                    c.settimeout(2.0)
                    c.sendall(b"s")
                    if c.recv(1) == b"s":
                        client = c.getsockname()
                        break
                    last = "closed without an answer"
            except OSError as e:
                last = str(e)
            if time.monotonic() > deadline or srv.poll() is not None:
                raise RuntimeError(f"no exchange through 127.0.0.1:{hp}: {last}")
            time.sleep(0.05)
        out, err = srv.communicate(timeout=READY_TIMEOUT)
        raw.write(f"{label}-peer.json", out + (("\n# stderr\n" + err) if err else ""))
        seen = json.loads(out.strip().splitlines()[-1])
        if "peer" not in seen:
            raise RuntimeError(f"guest peer server: {seen}")
        return seen["peer"], client
    finally:
        stop_pid(srv)


def iperf_host(hp, seconds, reverse, raw, name):
    """iperf3 client on the host against 127.0.0.1:hp (receiver's Gbit/s)."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(hp), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    raw.write(name, p.stdout + (("\n# stderr\n" + p.stderr) if p.stderr else ""))
    try:
        j = json.loads(p.stdout)
        if "error" in j:
            return None, j["error"]
        return j["end"]["sum_received"]["bits_per_second"] / 1e9, None
    except (ValueError, KeyError) as e:
        return None, f"unparsable iperf3 output ({e})"


def run_published(fwd, tool, args, raw, servers, ports, notes):
    """Published port, MTU 65520: peer address, then iperf3 both ways."""
    r = ports.setdefault(fwd, {})
    label = f"{fwd}-published"
    log(f"{fwd}: published port")
    hp = free_port()
    try:
        ns = Namespace(
            tool, 65520, args, raw, label, servers["cps"].port, publish=hp,
            port_path="stack" if fwd == "rnet-stack" else None,
        )
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        notes.append(f"{fwd} published port: {e}")
        log(f"  failed: {e}")
        return
    srv = None
    if args.udp_only:
        try:
            if fwd in TABLE_TOOLS:
                published_udp(fwd, ns, hp, args, raw, r, notes)
        finally:
            ns.close()
        return
    try:
        if tool == "rnet":
            p = subprocess.run([args.rnet, "port", "ls", "--api-socket", ns.api], capture_output=True, text=True, timeout=30)
            raw.write(f"{label}-port-ls.txt", p.stdout + p.stderr)
            words = p.stdout.split()
            r["path"] = "fast" if "fast" in words else "stack" if "stack" in words else "?"
            log(f"  rnet port ls: path {r['path']}")
            want = "stack" if fwd == "rnet-stack" else "fast"
            if r["path"] != want:
                notes.append(f"{fwd}: `rnet port ls` shows path {r['path']}, expected {want}")
        peer, client = peer_check(ns, hp, raw, label)
        r["peer"] = peer
        r["client"] = f"{client[0]}:{client[1]}"
        # A loopback client is "kept" when it appears as the gateway: the
        # forwarder delivers the client's own address (loopback mapped to
        # 10.0.2.2), not a connection of its own from inside the namespace.
        r["source_kept"] = peer == GATEWAY
        log(f"  guest sees the 127.0.0.1 client as {peer} (source kept: {'yes' if r['source_kept'] else 'no'})")
        srv_log = open(raw.path(f"{label}-iperf3-server.log"), "w")
        srv = subprocess.Popen(
            ns.nsenter(["iperf3", "-s", "-p", str(GUEST_PORT)]),
            stdout=srv_log, stderr=srv_log, stdin=subprocess.DEVNULL,
        )
        srv_log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ns_listening(ns, GUEST_PORT):
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the iperf3 server in the namespace did not start")
            time.sleep(0.05)
        for reverse in (False, True):
            key = "published_out" if reverse else "published_in"
            gbps, err = iperf_host(hp, args.iperf_seconds, reverse, raw, f"{label}-iperf{'-R' if reverse else ''}.json")
            r[key] = gbps
            log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
            if err:
                notes.append(f"{fwd} {key}: {err}")
        if fwd in TABLE_TOOLS:
            published_more(fwd, ns, hp, args, raw, r, notes, srv)
            srv = None
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        notes.append(f"{fwd} published port: {e}")
        log(f"  failed: {e}")
    finally:
        if srv:
            stop_pid(srv)
        ns.close()


def published_more(fwd, ns, hp, args, raw, r, notes, srv):
    """The newer published-port rows (main-table tools): iperf3 with 100
    streams each way, request/response at 64 connections, and UDP through
    the published UDP port (same number). Ends the iperf3 server `srv`."""
    n = PUBLISHED_CONNECTIONS
    try:
        for reverse in (False, True):
            key = f"{'published_out' if reverse else 'published_in'}_p{n}"
            gbps, err = iperf_cmd([], "127.0.0.1", hp, args.iperf_seconds, raw,
                                  f"{ns.label}-iperf-P{n}{'-R' if reverse else ''}.json", ["-P", str(n)] + (["-R"] if reverse else []))
            r[key] = gbps
            log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
            if err:
                notes.append(f"{fwd} {key}: {err}")
    finally:
        stop_pid(srv)
    # Request/response: netbench rr-server on the guest port.
    rr_log = open(raw.path(f"{ns.label}-rr-server.log"), "w")
    rr = subprocess.Popen(ns.nsenter([args.netbench, "rr-server", "--listen", f"0.0.0.0:{GUEST_PORT}"]),
                          stdout=rr_log, stderr=rr_log, stdin=subprocess.DEVNULL)
    rr_log.close()
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ns_listening(ns, GUEST_PORT):
            if rr.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("netbench rr-server in the namespace did not start")
            time.sleep(0.05)
        p = subprocess.run(
            [args.netbench, "rr-load", "--connect", f"127.0.0.1:{hp}", "--connections", str(RR_CONNECTIONS),
             "--seconds", str(args.cps_seconds)],
            capture_output=True, text=True, timeout=args.cps_seconds + 120,
        )
        raw.write(f"{ns.label}-rr{RR_CONNECTIONS}.json", p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"netbench rr-load failed: {p.stderr.strip()}")
        got = json.loads(p.stdout.strip().splitlines()[-1])
        r["published_rr64"] = got["per_sec"]
        log(f"  request/response at {RR_CONNECTIONS} connections: {got['per_sec']:.0f}/s ({got['errors']} errors)")
        if got["errors"]:
            notes.append(f"{fwd}: {got['errors']} of {RR_CONNECTIONS} request/response connections failed")
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
        notes.append(f"{fwd} published request/response: {e}")
        log(f"  failed: {e}")
    finally:
        stop_pid(rr)
    published_udp(fwd, ns, hp, args, raw, r, notes)


def published_udp(fwd, ns, hp, args, raw, r, notes):
    """UDP from the host through the published UDP port to the guest."""
    for size in UDP_SIZES:
        got, err = udp_measure(args.netbench, ns.nsenter([]), f"0.0.0.0:{GUEST_PORT}", [], f"127.0.0.1:{hp}",
                               size, args.iperf_seconds, raw, f"{ns.label}-udp-{size}.txt")
        store_udp(r, f"udp_in_{size}", got, err, notes, fwd)
        log(f"  udp_in_{size}: {fmt(r.get(f'udp_in_{size}'))}")


def fmt(v, digits=2):
    if isinstance(v, str):  # a reason, e.g. "n/a: ..."
        return v
    return "–" if v is None else f"{v:.{digits}f}"


def num(v):
    return v if isinstance(v, (int, float)) else None


def log(msg):
    print(msg, flush=True)


ROWS = [
    # key, label, unit, digits, target
    ("ns_to_host_65520", "namespace → host, MTU 65520", "Gbit/s", 2, "≥ 2.0×"),
    ("host_to_ns_65520", "host → namespace, MTU 65520", "Gbit/s", 2, "≥ 1.5×"),
    ("ns_to_host_1500", "namespace → host, MTU 1500", "Gbit/s", 2, "≥ 4.0×"),
    ("host_to_ns_1500", "host → namespace, MTU 1500", "Gbit/s", 2, "≥ 3.0×"),
    ("ns_to_host_v6_65520", "namespace → host over IPv6, MTU 65520", "Gbit/s", 2, None),
    ("ns_to_host_many_65520", "{many_flows:,} open flows: one active flow's throughput, namespace → host, MTU 65520",
     "Gbit/s (share of 1 flow)", 2, "≥ 80% of 1 flow"),
    ("published_in", "published port, host → namespace, MTU 65520", "Gbit/s", 2, "≥ 2.5×; ≥ 0.9× loopback"),
    ("published_out", "published port, namespace → host, MTU 65520", "Gbit/s", 2, "≥ 2.5×; ≥ 0.9× loopback"),
    ("published_in_p100", "published port, host → namespace, 100 connections (aggregate)", "Gbit/s", 2, None),
    ("published_out_p100", "published port, namespace → host, 100 connections (aggregate)", "Gbit/s", 2, None),
    ("published_rr64", "published port: request/response at 64 connections", "per s", 0, None),
    ("published_seen", "published port: a 127.0.0.1 client is seen as", "", None, "source kept"),
    ("udp_out_1400", "UDP namespace → host, 1,400-byte datagrams, delivered", "Gbit/s", 2, "≥ 3×; ≥ 0.7× veth"),
    ("udp_out_64", "UDP namespace → host, 64-byte datagrams, delivered", "k/s", 0, None),
    ("udp_in_1400", "UDP host → published port → namespace, 1,400 B, delivered", "Gbit/s", 2, "≥ 3×; ≥ 0.7× veth"),
    ("udp_in_64", "UDP host → published port → namespace, 64 B, delivered", "k/s", 0, None),
    ("vxlan_ab", "TCP over a VXLAN overlay between two nodes, A → B, TAP MTU 1500", "Gbit/s", 2, "≥ 3×; ≥ 0.5× veth"),
    ("vxlan_ba", "TCP over a VXLAN overlay between two nodes, B → A (-R), TAP MTU 1500", "Gbit/s", 2, "≥ 3×; ≥ 0.5× veth"),
    ("rtt_median_us", "TCP request/response, median", "µs", 1, "≤ 0.8×; ≤ 1.5× veth"),
    ("rtt_p99_us", "TCP request/response, p99", "µs", 1, ""),
    ("cps", "short TCP connections", "per s", 0, "≥ 1.5×; ≥ 0.5× veth"),
    ("rss_idle_mib", "RSS idle", "MiB", 1, "≤ 8 MiB"),
    ("rss_flows_mib", "RSS with {flows} open idle TCP flows", "MiB", 1, "≤ 64 MiB"),
]


def seen_cell(p):
    if not p or p.get("peer") is None:
        return "–"
    return f"{p['peer']} ({'kept' if p.get('source_kept') else 'not kept'})"


def ratio(a, b):
    a, b = num(a), num(b)
    return f"{a / b:.2f}×" if a is not None and b else "–"


PUBLISHED_KEYS = ("published_in", "published_out", "published_in_p100", "published_out_p100", "published_rr64",
                  "udp_in_1400", "udp_in_1400_loss", "udp_in_64", "udp_in_64_loss")


def limit_cell(limits, key, digits):
    lim = limits.get(key)
    if not lim:
        return "–"
    cell = f"{lim['kind']} {fmt(lim['value'], digits)}"
    if lim.get("loss") is not None:
        cell += f" (lost {100 * lim['loss']:.1f}%)"
    return cell


def tool_cell(r, key, digits, limits):
    """A tool's figure, its loss (UDP) and its fraction of the kernel's limit."""
    cell = fmt(r.get(key), digits)
    extra = []
    lim = limits.get(key)
    v = num(r.get(key))
    if v is not None and lim and lim["value"]:
        extra.append(f"{v / lim['value']:.2f}× {lim['kind'].split(',')[0]}")
    loss = r.get(key + "_loss")
    if v is not None and loss is not None:
        extra.append(f"lost {100 * loss:.1f}%")
    return cell + (f" ({'; '.join(extra)})" if extra else "")


def issue16_targets(results, ports, limits):
    """The "kernel's limit" targets for rnet, each named met or missed."""
    rn = results.get("rnet", {})
    lv = lambda k: (limits.get(k) or {}).get("value")
    parts = []

    def check(what, a, b, want, higher=True, of=""):
        a, b = num(a), num(b)
        if a is None or not b:
            parts.append(f"{what}: –")
            return
        r = a / b
        ok = r >= want if higher else r <= want
        parts.append(f"{what}: {r:.2f}× {of} ({'met' if ok else 'missed'}, want {'≥' if higher else '≤'} {want}×)")

    for k, d in (("udp_out_1400", "UDP ns → host 1,400 B"), ("udp_in_1400", "UDP published → ns 1,400 B")):
        check(f"{d} vs slirp4netns", rn.get(k), results.get("slirp4netns", {}).get(k), 3.0, of="slirp4netns")
        # The issue sets both UDP directions against the veth guest -> host figure.
        check(f"{d} vs veth", rn.get(k), lv("udp_out_1400"), 0.7, of="veth")
    check("VXLAN overlay A → B vs bare veth", rn.get("vxlan_ab"), lv("vxlan_ab"), 0.5, of="veth")
    check("VXLAN overlay B → A vs bare veth", rn.get("vxlan_ba"), lv("vxlan_ba"), 0.5, of="veth")
    for k, d in (("vxlan_ab", "A → B"), ("vxlan_ba", "B → A")):
        check(f"VXLAN overlay {d} vs slirp4netns", rn.get(k), results.get("slirp4netns", {}).get(k), 3.0, of="slirp4netns")
    for k, d in (("published_in", "published TCP host → ns"), ("published_out", "published TCP ns → host")):
        check(f"{d} vs loopback", rn.get(k), lv(k), 0.9, of="loopback")
        check(f"{d} vs RootlessKit builtin", rn.get(k), ports.get("rootlesskit", {}).get(k), 1.0, of="RootlessKit")
    check("short connections vs pasta", rn.get("cps"), results.get("pasta", {}).get("cps"), 2.0, of="pasta")
    check("short connections vs veth", rn.get("cps"), lv("cps"), 0.5, of="veth")
    check("request/response median vs veth", rn.get("rtt_median_us"), lv("rtt_median_us"), 1.5, higher=False, of="veth")
    return "Issue 16 targets (rnet, this run): " + "; ".join(parts) + "."


def table(results, ports, args, meta, notes, limits):
    tools = [t for t in args.tools if t in TABLE_TOOLS]
    fwds = [f for f, tool, _ in FORWARDERS if tool in args.tools]
    for t in tools:
        r = results.setdefault(t, {})
        for k in ("idle", "flows"):
            v = r.get(f"rss_{k}_kib")
            r[f"rss_{k}_mib"] = None if v is None else v / 1024.0
        # The main table's published rows: rnet's fast path, each tool's own way.
        for k in PUBLISHED_KEYS:
            r[k] = ports.get(t, {}).get(k)
    lines = [
        f"### rnet vs slirp4netns vs pasta — {meta['date']}",
        "",
        f"Machine: {meta['machine']}. {meta['versions']}. iperf3 {args.iperf_seconds} s, one stream; "
        f"ping-pong over {args.rtt_count} round trips and short connections (connect, 1 byte each way, "
        f"the server closes) for {args.cps_seconds} s, both with the compiled netbench client and server "
        "(examples/netbench.rs, std only) at both ends; all as an unprivileged user, "
        f"guest → gateway {GATEWAY} → host 127.0.0.1 (IPv6: {GATEWAY6} → host ::1); "
        f"{args.many_flows:,} open flows: idle connections held by the guest while one iperf3 stream runs, "
        "share of the same tool's 1-flow figure from this run; published ports: host client → 127.0.0.1:HP → guest port "
        f"{GUEST_PORT}. "
        f"Load average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}"
        + (f"; input-backlog drops during the run (softnet_stat, a loaded machine): "
           f"{meta['softnet_drops_end'] - meta['softnet_drops_start']:,}"
           if meta.get("softnet_drops_start") is not None and meta.get("softnet_drops_end") is not None else "")
        + ".",
        "",
        "| figure | unit | " + " | ".join(tools) + " | kernel limit | rnet / slirp4netns | target |",
        "|---|---|" + "---|" * len(tools) + "---|---|---|",
    ]
    for key, label, unit, digits, target in ROWS:
        label = label.format(flows=args.flows, many_flows=args.many_flows)
        lim = ""
        if key == "published_seen":
            cells = [seen_cell(ports.get(t)) for t in tools]
            rat = ""
        else:
            cells = [tool_cell(results.get(t, {}), key, digits, limits) for t in tools]
            lim = limit_cell(limits, key, digits) if not key.startswith("rss_") else "–"
            if key == "ns_to_host_many_65520":
                for i, t in enumerate(tools):
                    share = results.get(t, {}).get("many_flows_share")
                    if share is not None:
                        cells[i] += f" ({100 * share:.0f}%)"
            rat = ratio(results.get("rnet", {}).get(key), results.get("slirp4netns", {}).get(key))
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {lim} | {rat} | {target or ''} |")
    lines.append("")
    lines.append(
        "Kernel limit: the kernel doing the same work in this run. veth: a veth pair between two test hosts "
        f"(network namespaces the harness makes as root), the client in the \"guest\" {VETH_GUEST}, the same server "
        f"in the \"host\" {VETH_HOST} (UDP: netbench udp-send → udp-sink; VXLAN: the same overlay devices directly "
        "on the veth pair, no forwarder); loopback: the same client and server over a direct host 127.0.0.1 connection "
        "(published-port rows). In brackets after each figure: its fraction of that limit (for latency, lower is "
        "better) and, for UDP, the share of datagrams sent that never arrived. UDP rows are delivered rates "
        "(netbench udp-sink), never the sender's. The 64-byte rows count datagrams delivered per second (k/s)."
    )
    lines.append("")
    lines.append(
        "Ratios are rnet / slirp4netns from the same run (lower is better for latency and RSS). "
        f"{args.many_flows:,} open flows: in brackets, the share of the same tool's namespace → host, MTU 65520 figure "
        "(one flow, nothing else open) from this run. "
        "Published-port rows: rnet's fast path, slirp4netns's API-added port, pasta's -t; "
        "all forwarders, RootlessKit included, in the next table."
    )
    lines += ["", issue16_targets(results, ports, limits)]
    share = results.get("rnet", {}).get("many_flows_share")
    if share is not None:
        lines.append("")
        lines.append(
            f"{args.many_flows:,}-flow target (rnet, ≥ 80% of its 1-flow figure): {100 * share:.0f}% "
            f"({'met' if share >= 0.8 else 'missed'})."
        )
    if fwds:
        fast = ports.get("rnet", {})
        lines += [
            "",
            f"#### Published TCP port, MTU 65520 — {meta['date']}",
            "",
            "| forwarder | host → namespace (Gbit/s) | namespace → host (Gbit/s) | 127.0.0.1 client seen as | source kept | rnet fast / this, host → ns | rnet fast / this, ns → host |",
            "|---|---|---|---|---|---|---|",
        ]
        for f, tool, flabel in FORWARDERS:
            if f not in fwds:
                continue
            p = ports.get(f, {})
            kept = "–" if p.get("peer") is None else ("yes" if p.get("source_kept") else "no")
            lines.append(
                f"| {flabel}{' [path: ' + p['path'] + ']' if p.get('path') else ''} | {fmt(p.get('published_in'))} | "
                f"{fmt(p.get('published_out'))} | {p.get('peer') or '–'} | {kept} | "
                f"{ratio(fast.get('published_in'), p.get('published_in')) if f != 'rnet' else '1.00×'} | "
                f"{ratio(fast.get('published_out'), p.get('published_out')) if f != 'rnet' else '1.00×'} |"
            )
        if limits.get("published_in") or limits.get("published_out"):
            li, lo_ = (limits.get(k, {}).get("value") for k in ("published_in", "published_out"))
            lines.append(
                f"| direct host loopback connection (kernel limit) | {fmt(li)} | {fmt(lo_)} | – | – | "
                f"{ratio(fast.get('published_in'), li)} | {ratio(fast.get('published_out'), lo_)} |"
            )
        lines.append("")
        tgt = []
        for other, want in (("slirp4netns", 2.5), ("rootlesskit", 1.0)):
            if other not in fwds:
                continue
            parts = []
            for k, d in (("published_in", "host → ns"), ("published_out", "ns → host")):
                a, b = fast.get(k), ports.get(other, {}).get(k)
                if a is None or not b:
                    parts.append(f"{d} –")
                else:
                    parts.append(f"{d} {a / b:.2f}× ({'met' if a / b >= want else 'missed'})")
            tgt.append(f"≥ {want:.1f}× {other}: " + ", ".join(parts))
        if fast.get("peer") is not None:
            tgt.append(f"source kept: {'yes' if fast.get('source_kept') else 'no'} ({fast['peer']})")
        lines.append("Issue 3 target (rnet fast path): " + "; ".join(tgt) + ".")
        lines.append("")
        lines.append(
            "\"Seen as\": the peer address a one-connection guest server (python3) reports for a host client on "
            "127.0.0.1. A forwarder that hands the guest the client's own address shows a loopback client as the "
            "gateway 10.0.2.2 (source kept); one that opens its own connection inside the namespace shows 127.0.0.1 "
            "for every client. pasta's 127.0.0.1 comes from its loopback splice path, which it uses for host-loopback "
            "clients only (non-loopback clients take its tap path); this harness has loopback clients only."
        )
    if notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"


COLORS = {
    "rnet": "#d1495b",
    "rnet-stack": "#f08a8a",
    "slirp4netns": "#00798c",
    "pasta": "#edae49",
    "rootlesskit": "#66a182",
}
SERIES_LABEL = {
    "rnet": "rnet (ports: fast path)",
    "rnet-stack": "rnet ports: stack path",
    "slirp4netns": "slirp4netns",
    "pasta": "pasta",
    "rootlesskit": "RootlessKit builtin (ports)",
}


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(results, ports, args, meta):
    tools = [t for t in args.tools if t in TABLE_TOOLS]
    fwds = [f for f, tool, _ in FORWARDERS if tool in args.tools]
    # Groups: (direction, detail, [(series, value)]).
    groups = []
    for key, label, *_ in ROWS[:4]:
        direction, mtu = label.split(", ")
        groups.append((direction, mtu, [(t, num(results.get(t, {}).get(key))) for t in tools]))
    groups.append(("namespace → host", "IPv6, MTU 65520", [(t, num(results.get(t, {}).get("ns_to_host_v6_65520"))) for t in tools]))
    groups.append((
        "namespace → host", f"{args.many_flows:,} flows open",
        [(t, num(results.get(t, {}).get("ns_to_host_many_65520"))) for t in tools],
    ))
    main_groups = len(groups)
    for key, direction in (("published_in", "published, host → ns"), ("published_out", "published, ns → host")):
        groups.append((direction, "MTU 65520", [(f, num(ports.get(f, {}).get(key))) for f in fwds]))
    vals = [v for _, _, ss in groups for _, v in ss if v is not None]
    vmax = max(vals + [1.0])
    step = nice_step(vmax)
    top = step * (int(vmax / step) + 1)
    left, right, ytop, bottom = 60, 20, 60, 100
    # Wide enough for each group's two label lines (about 130 px).
    W, H = max(1000, left + right + 135 * len(groups)), 440
    pw, ph = W - left - right, H - ytop - bottom
    gw = pw / len(groups)
    bw = min(34, (gw - 16) / max(len(ss) for _, _, ss in groups))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">TCP throughput, one stream (Gbit/s, higher is better)</text>',
        f'<text x="{W / 2}" y="40" text-anchor="middle" fill="#555">{esc(meta["date"])} · {esc(meta["machine"])}</text>',
    ]
    v = 0.0
    while v <= top + 1e-9:
        y = ytop + ph - ph * v / top
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    out.append(f'<line x1="{left}" y1="{ytop + ph}" x2="{W - right}" y2="{ytop + ph}" stroke="#333"/>')
    for i, (direction, detail, series) in enumerate(groups):
        gx = left + i * gw + (gw - bw * len(series)) / 2
        for j, (t, val) in enumerate(series):
            x = gx + j * bw
            if val is None:
                out.append(f'<text x="{x + bw / 2:.1f}" y="{ytop + ph - 4}" text-anchor="middle" fill="#999">–</text>')
                continue
            h = ph * val / top
            y = ytop + ph - h
            out.append(f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" fill="{COLORS.get(t, "#888")}"><title>{esc(SERIES_LABEL.get(t, t))}: {val:.2f} Gbit/s</title></rect>')
            out.append(f'<text x="{x + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="9">{val:.2f}</text>')
        cx = left + i * gw + gw / 2
        out.append(f'<text x="{cx:.1f}" y="{ytop + ph + 18}" text-anchor="middle">{esc(direction)}</text>')
        out.append(f'<text x="{cx:.1f}" y="{ytop + ph + 33}" text-anchor="middle" fill="#555">{esc(detail)}</text>')
    if fwds:
        sep = left + main_groups * gw
        out.append(f'<line x1="{sep:.1f}" y1="{ytop}" x2="{sep:.1f}" y2="{ytop + ph + 36}" stroke="#999" stroke-dasharray="4 3"/>')
    lx = left
    for t in list(dict.fromkeys(tools + fwds)):
        out.append(f'<rect x="{lx}" y="{H - 30}" width="12" height="12" fill="{COLORS.get(t, "#888")}"/>')
        name = SERIES_LABEL.get(t, t)
        out.append(f'<text x="{lx + 16}" y="{H - 20}">{esc(name)}</text>')
        lx += 16 + 7 * len(name) + 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_step(vmax):
    for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50):
        if vmax / s <= 8:
            return s
    return 100


def version_of(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip() and "syslog" not in line]
        return lines[0].strip() if lines else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def dpkg_version(pkg):
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True, timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def softnet_drops():
    """Packets the kernel dropped for a full per-CPU input backlog
    (/proc/net/softnet_stat, second column, summed over CPUs): veth, tun
    and loopback all pass through it, and a loaded machine drops there."""
    try:
        with open("/proc/net/softnet_stat") as f:
            return sum(int(line.split()[1], 16) for line in f if line.strip())
    except (OSError, ValueError, IndexError):
        return None


def machine_meta(args):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1048576:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    distro = "?"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    versions = []
    if "rnet" in args.tools:
        versions.append(version_of([args.rnet, "--version"]) + (f" ({args.rnet_rev})" if args.rnet_rev else ""))
    if "slirp4netns" in args.tools:
        versions.append(version_of(["slirp4netns", "--version"]))
    if "pasta" in args.tools:
        v = dpkg_version("passt")
        versions.append(f"pasta {v}" if v else "pasta (version unknown)")
    if "rootlesskit" in args.tools:
        versions.append(version_of(["rootlesskit", "--version"]))
    versions.append(version_of(["iperf3", "--version"]))
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} × {cpu}, {mem}, Linux {platform.release()}, {distro}",
        "versions": ", ".join(versions),
        "loadavg_start": os.getloadavg(),
        "softnet_drops_start": softnet_drops(),
    }


def cmd_run(args):
    raise_nofile()
    os.makedirs(args.out, exist_ok=True)
    raw = Raw(args.out)
    args.tools = [t for t in args.tools.split(",") if t]
    meta = machine_meta(args)
    log(f"{meta['date']}: {meta['machine']}")
    log(meta["versions"])
    # Every server listens on host loopback only: 127.0.0.1, or ::1 for the
    # IPv6 row (the forwarders map their gateway there).
    servers = {"hold": Holder()}
    started = []
    iperf_logs = []
    results, ports, notes, limits = {}, {}, [], {}
    try:
        for key, mode, addr in (("echo", "rr-server", "127.0.0.1"), ("cps", "cps-server", "127.0.0.1"), ("cps6", "cps-server", "::1")):
            servers[key] = NetbenchServer(args.netbench, mode, addr, raw)
            started.append(servers[key])
        for key, addr, logname in (("iperf", "127.0.0.1", "iperf3-server.log"), ("iperf6", "::1", "iperf3-server-v6.log")):
            port = free_port(addr)
            iperf_logs.append(open(raw.path(logname), "w"))
            srv = subprocess.Popen(
                ["iperf3", "-s", "-B", addr, "-p", str(port)],
                stdout=iperf_logs[-1], stderr=iperf_logs[-1], stdin=subprocess.DEVNULL,
            )
            started.append(srv)
            servers[key] = port
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                try:
                    socket.create_connection((addr, port), timeout=1).close()
                    break
                except OSError:
                    if srv.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the iperf3 server on {addr} did not start")
                    time.sleep(0.02)
        if not args.vxlan_only:
            run_limits(args, raw, servers, limits, notes)
            for tool in args.tools:
                if tool in TABLE_TOOLS:
                    run_tool(tool, args, raw, servers, results, notes)
        if not args.udp_only:
            run_vxlan_rows(args, raw, results, limits, notes)
        for fwd, tool, _ in FORWARDERS if not args.vxlan_only else ():
            if tool in args.tools:
                run_published(fwd, tool, args, raw, servers, ports, notes)
    finally:
        for srv in started:
            if isinstance(srv, NetbenchServer):
                srv.close()
            else:
                stop_pid(srv)
        for f in iperf_logs:
            f.close()
    meta["loadavg_end"] = os.getloadavg()
    meta["softnet_drops_end"] = softnet_drops()
    md = table(results, ports, args, meta, notes, limits)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "throughput.svg"), "w") as f:
        f.write(svg_chart(results, ports, args, meta))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "ports": ports, "limits": limits, "notes": notes}, f, indent=2, default=str)
    print()
    print(md)
    log(f"written: {args.out}/table.md, {args.out}/throughput.svg, {args.out}/results.json, raw outputs in {raw.dir}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the comparison")
    r.add_argument("--out", required=True)
    r.add_argument("--rnet", default="target/release/rnet")
    r.add_argument("--rnet-rev", default="")
    r.add_argument("--tools", default=",".join(TOOLS))
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--iperf-seconds", type=int, default=5)
    r.add_argument("--rtt-count", type=int, default=10000)
    r.add_argument("--cps-seconds", type=int, default=5)
    r.add_argument("--flows", type=int, default=1000)
    r.add_argument("--many-flows", type=int, default=10000)
    r.add_argument("--netbench", required=True, help="the built examples/netbench binary")
    r.add_argument("--rows", default="all", help="row group: all, udp (only the UDP rows and their limits) or vxlan (only the VXLAN overlay rows)")
    r.add_argument("--veth", default=None, help="G_PID,H_PID: the kernel-limit test hosts made by compare.sh")
    g = sub.add_parser("guest", help="(inside the namespace) one client")
    g.add_argument("what", choices=["probe", "hold", "peer"])
    g.add_argument("host")
    g.add_argument("port", type=int)
    g.add_argument("n", type=float)
    a = ap.parse_args()
    if a.cmd == "run":
        rows = {x for x in a.rows.split(",") if x}
        if not rows <= {"all", "udp", "vxlan"} or len(rows) != 1:
            print(f"compare.py: unknown row group in {a.rows!r} (one of all, udp, vxlan)", file=sys.stderr)
            return 2
        a.udp_only = rows == {"udp"}
        a.vxlan_only = rows == {"vxlan"}
        a.rnet = os.path.abspath(a.rnet)
        a.netbench = os.path.abspath(a.netbench)
        try:
            a.veth = Veth(a.veth) if a.veth else None
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
            print(f"compare.py: the veth test hosts are unusable, no veth limit column: {e}", file=sys.stderr)
            a.veth = None
        return cmd_run(a)
    if a.what == "probe":
        return guest_probe(a.host, a.port, a.n)
    if a.what == "peer":
        return guest_peer(a.host, a.port, a.n)
    return guest_hold(a.host, a.port, int(a.n))


if __name__ == "__main__":
    sys.exit(main())
