#!/usr/bin/env python3
"""Side-by-side benchmark of rnet, slirp4netns and pasta (and, for published
ports, RootlessKit's builtin port driver).

Run through benches/compare.sh, which checks the tools and drops root
privileges. This script does the work:

    compare.py run --out DIR [--rnet PATH]
                   [--tools rnet,slirp4netns,pasta,rootlesskit]
                   [--iperf-seconds 5] [--rtt-count 10000] [--cps-seconds 5]
                   [--flows 1000]

For each tool it creates a rootless namespace (`unshare -Urn`), attaches the
tool to it, and drives clients inside the namespace with `nsenter` against
servers listening on the host's 127.0.0.1, reached through the gateway
10.0.2.2, which every tool maps to host loopback:

- rnet:        rnet attach --allow-host-loopback --outbound-allow none
- slirp4netns: slirp4netns --configure (10.0.2.2 is host loopback by default)
- pasta:       pasta --config-net -a 10.0.2.100 -g 10.0.2.2 with its gateway
               mapping, every port forwarding off (-t/-u/-T/-U none)

The guest only ever connects to 10.0.2.2. The same file is also the guest-side
client (`compare.py guest ...`), run inside the namespace.

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
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

GATEWAY = "10.0.2.2"
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


def guest_latency(host, port, count):
    """1-byte ping-pong over one connection; round-trip times in µs."""
    s = connect(host, port)
    buf = b"x"
    for _ in range(min(1000, count // 10)):  # warm-up
        s.sendall(buf)
        s.recv(1)
    samples = []
    clock = time.perf_counter_ns
    send, recv = s.send, s.recv
    for _ in range(count):
        t0 = clock()
        send(buf)
        if not recv(1):
            raise SystemExit("server closed the connection")
        samples.append(clock() - t0)
    s.close()
    samples.sort()
    us = [x / 1000.0 for x in samples]
    out = {
        "count": count,
        "median_us": statistics.median(us),
        "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
        "min_us": us[0],
        "max_us": us[-1],
        "mean_us": statistics.fmean(us),
    }
    print(json.dumps(out))
    return 0


def guest_cps(host, port, seconds):
    """Short connections: connect, send 1 byte, read 1 byte, close."""
    n = errors = 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        try:
            s = socket.create_connection((host, port), timeout=5.0)
            s.sendall(b"c")
            ok = s.recv(1) == b"c"
            s.close()
            if ok:
                n += 1
            else:
                errors += 1
        except OSError:
            errors += 1
    elapsed = time.monotonic() - t0
    print(json.dumps({"connections": n, "errors": errors, "seconds": elapsed, "per_sec": n / elapsed}))
    return 0


def guest_hold(host, port, count):
    """Opens `count` idle connections, says so, holds them until stdin closes."""
    raise_nofile()
    socks = []
    for _ in range(count):
        socks.append(socket.create_connection((host, port), timeout=10.0))
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
# host side: servers on 127.0.0.1
# --------------------------------------------------------------------------


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A TCP server on 127.0.0.1 in a thread.

    mode "echo": echo everything on each connection (one thread each);
    mode "cps": read 1 byte, answer it, close (inline, one at a time);
    mode "hold": accept and keep the connection open.
    """

    def __init__(self, mode):
        self.mode = mode
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
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mode == "echo":
                threading.Thread(target=self._echo, args=(c,), daemon=True).start()
            elif self.mode == "cps":
                try:
                    b = c.recv(1)
                    if b:
                        c.sendall(b)
                except OSError:
                    pass
                c.close()
            else:
                with self.lock:
                    self.held.append(c)

    @staticmethod
    def _echo(c):
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        c.close()

    def held_count(self):
        with self.lock:
            return len(self.held)

    def release(self):
        with self.lock:
            for c in self.held:
                c.close()
            self.held = []


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
    asks rnet for its userspace-stack path.
    """

    def __init__(self, tool, mtu, args, raw, label, probe_port, publish=None, port_path=None):
        self.tool = tool
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
                if self.port_path:
                    cmd += ["--port-path", self.port_path]
            cmd.append(pid)
        elif self.tool == "slirp4netns":
            cmd = [
                "slirp4netns", "--configure", f"--mtu={self.mtu}", "--disable-dns",
                f"--ready-fd={w}",
            ]
            if self.publish:
                self.api = os.path.join(self._scratch(), "api.sock")
                cmd.append(f"--api-socket={self.api}")
            cmd += [pid, GUEST_IFACE]
        else:
            # No ready fd in this pasta: readiness is the probe below.
            os.close(w)
            w = None
            tcp = f"127.0.0.1/{self.publish}:{GUEST_PORT}" if self.publish else "none"
            cmd = [
                "pasta", "--foreground", "--quiet", "--config-net", "-4",
                "--mtu", str(self.mtu), "--ns-ifname", GUEST_IFACE,
                "--address", "10.0.2.100", "--netmask", "24", "--gateway", GATEWAY,
                "--tcp-ports", tcp, "--udp-ports", "none", "--tcp-ns", "none", "--udp-ns", "none",
                "--no-dhcp", "--no-dhcpv6", "--no-ndp", "--no-ra", pid,
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
        # Every tool: one real exchange through the gateway.
        out = self.guest(["probe", GATEWAY, str(probe_port), str(READY_TIMEOUT)], timeout=READY_TIMEOUT + 5)
        if not json.loads(out.strip().splitlines()[-1]).get("ok"):
            raise RuntimeError(f"{self.tool}: the namespace cannot reach the host through {GATEWAY}: {out}")
        if self.publish and self.tool == "slirp4netns":
            req = {
                "execute": "add_hostfwd",
                "arguments": {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": self.publish, "guest_port": GUEST_PORT},
            }
            reply = api_call(self.api, req)
            self.log.write(f"# api: {json.dumps(req)} -> {json.dumps(reply)}\n")
            self.log.flush()
            if "return" not in reply:
                raise RuntimeError(f"slirp4netns add_hostfwd failed: {reply}")

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


def iperf(ns, port, seconds, reverse, raw, name):
    argv = ["iperf3", "-c", GATEWAY, "-p", str(port), "-t", str(seconds), "-J"]
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


def run_tool(tool, args, raw, servers, results, notes):
    r = results.setdefault(tool, {})
    for mtu in MTUS:
        label = f"{tool}-mtu{mtu}"
        log(f"{tool}: MTU {mtu}")
        try:
            ns = Namespace(tool, mtu, args, raw, label, servers["cps"].port)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            notes.append(f"{tool} MTU {mtu}: {e}")
            log(f"  failed: {e}")
            continue
        try:
            for reverse in (False, True):
                key = f"{'host_to_ns' if reverse else 'ns_to_host'}_{mtu}"
                gbps, err = iperf(ns, servers["iperf"], args.iperf_seconds, reverse, raw, f"{label}-iperf{'-R' if reverse else ''}.json")
                r[key] = gbps
                log(f"  {key}: {fmt(gbps)} Gbit/s" + (f" ({err})" if err else ""))
                if err:
                    notes.append(f"{tool} {key}: {err}")
            if mtu == 65520:
                out = ns.guest(["latency", GATEWAY, str(servers["echo"].port), str(args.rtt_count)])
                raw.write(f"{label}-latency.json", out)
                lat = json.loads(out.strip().splitlines()[-1])
                r["rtt_median_us"] = lat["median_us"]
                r["rtt_p99_us"] = lat["p99_us"]
                log(f"  rtt: median {lat['median_us']:.1f} µs, p99 {lat['p99_us']:.1f} µs")
                out = ns.guest(["cps", GATEWAY, str(servers["cps"].port), str(args.cps_seconds)], timeout=args.cps_seconds + 120)
                raw.write(f"{label}-cps.json", out)
                cps = json.loads(out.strip().splitlines()[-1])
                r["cps"] = cps["per_sec"]
                log(f"  short connections: {cps['per_sec']:.0f}/s ({cps['errors']} errors)")
                if cps["errors"]:
                    notes.append(f"{tool}: {cps['errors']} failed short connections")
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            notes.append(f"{tool} MTU {mtu}: {e}")
            log(f"  failed: {e}")
        finally:
            ns.close()

    # Memory, on a fresh instance so earlier traffic does not count.
    label = f"{tool}-rss"
    try:
        ns = Namespace(tool, 65520, args, raw, label, servers["cps"].port)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"{tool} RSS: {e}")
        return
    hold = None
    try:
        r["rss_idle_kib"] = rss_kib(ns.pid())
        hold = subprocess.Popen(
            ns.nsenter([args.python, os.path.abspath(__file__), "guest", "hold", GATEWAY, str(servers["hold"].port), str(args.flows)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if not wait_line(hold.stdout, 120):
            raise RuntimeError(f"holding {args.flows} connections failed: {hold.stderr.read() if hold.poll() is not None else 'timeout'}")
        deadline = time.monotonic() + 30
        while servers["hold"].held_count() < args.flows and time.monotonic() < deadline:
            time.sleep(0.01)
        r["rss_flows_kib"] = rss_kib(ns.pid())
        r["flows_held"] = servers["hold"].held_count()
        raw.write(f"{label}.json", json.dumps({"idle_kib": r["rss_idle_kib"], "flows_kib": r["rss_flows_kib"], "flows": r["flows_held"]}) + "\n")
        log(f"  RSS idle {r['rss_idle_kib']} KiB, with {r['flows_held']} flows {r['rss_flows_kib']} KiB")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"{tool} RSS: {e}")
        log(f"  failed: {e}")
    finally:
        if hold:
            try:
                hold.stdin.close()
            except OSError:
                pass
            try:
                hold.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hold.kill()
                hold.wait()
        servers["hold"].release()
        ns.close()


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
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        notes.append(f"{fwd} published port: {e}")
        log(f"  failed: {e}")
    finally:
        if srv:
            stop_pid(srv)
        ns.close()


def fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def log(msg):
    print(msg, flush=True)


ROWS = [
    # key, label, unit, digits, target
    ("ns_to_host_65520", "namespace → host, MTU 65520", "Gbit/s", 2, "≥ 2.0×"),
    ("host_to_ns_65520", "host → namespace, MTU 65520", "Gbit/s", 2, "≥ 1.5×"),
    ("ns_to_host_1500", "namespace → host, MTU 1500", "Gbit/s", 2, "≥ 4.0×"),
    ("host_to_ns_1500", "host → namespace, MTU 1500", "Gbit/s", 2, "≥ 3.0×"),
    ("ns_to_host_v6_65520", "namespace → host over IPv6, MTU 65520", "Gbit/s", 2, None),
    ("published_in", "published port, host → namespace, MTU 65520", "Gbit/s", 2, "≥ 2.5×"),
    ("published_out", "published port, namespace → host, MTU 65520", "Gbit/s", 2, "≥ 2.5×"),
    ("published_seen", "published port: a 127.0.0.1 client is seen as", "", None, "source kept"),
    ("rtt_median_us", "TCP request/response, median", "µs", 1, "≤ 0.8×"),
    ("rtt_p99_us", "TCP request/response, p99", "µs", 1, ""),
    ("cps", "short TCP connections", "per s", 0, "≥ 1.5×"),
    ("rss_idle_mib", "RSS idle", "MiB", 1, "≤ 8 MiB"),
    ("rss_flows_mib", "RSS with {flows} open idle TCP flows", "MiB", 1, "≤ 64 MiB"),
]
PLACEHOLDERS = {"ns_to_host_v6_65520": "n/a: IPv6 not yet"}


def seen_cell(p):
    if not p or p.get("peer") is None:
        return "–"
    return f"{p['peer']} ({'kept' if p.get('source_kept') else 'not kept'})"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def table(results, ports, args, meta, notes):
    tools = [t for t in args.tools if t in TABLE_TOOLS]
    fwds = [f for f, tool, _ in FORWARDERS if tool in args.tools]
    for t in tools:
        r = results.setdefault(t, {})
        for k in ("idle", "flows"):
            v = r.get(f"rss_{k}_kib")
            r[f"rss_{k}_mib"] = None if v is None else v / 1024.0
        # The main table's published rows: rnet's fast path, each tool's own way.
        for k in ("published_in", "published_out"):
            r[k] = ports.get(t, {}).get(k)
    lines = [
        f"### rnet vs slirp4netns vs pasta — {meta['date']}",
        "",
        f"Machine: {meta['machine']}. {meta['versions']}. iperf3 {args.iperf_seconds} s, one stream; "
        f"ping-pong over {args.rtt_count} round trips (python3 client and server); "
        f"short connections for {args.cps_seconds} s (python3); all as an unprivileged user, "
        "guest → gateway 10.0.2.2 → host 127.0.0.1; published ports: host client → 127.0.0.1:HP → guest port "
        f"{GUEST_PORT}. "
        f"Load average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}.",
        "",
        "| figure | unit | " + " | ".join(tools) + " | rnet / slirp4netns | target |",
        "|---|---|" + "---|" * len(tools) + "---|---|",
    ]
    for key, label, unit, digits, target in ROWS:
        label = label.format(flows=args.flows)
        if key in PLACEHOLDERS:
            cells = [PLACEHOLDERS[key]] * len(tools)
            rat = "n/a"
        elif key == "published_seen":
            cells = [seen_cell(ports.get(t)) for t in tools]
            rat = ""
        else:
            cells = [fmt(results.get(t, {}).get(key), digits) for t in tools]
            rat = ratio(results.get("rnet", {}).get(key), results.get("slirp4netns", {}).get(key))
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {rat} | {target or ''} |")
    lines.append("")
    lines.append(
        "Ratios are rnet / slirp4netns from the same run (lower is better for latency and RSS). "
        "Published-port rows: rnet's fast path, slirp4netns's API-added port, pasta's -t; "
        "all forwarders, RootlessKit included, in the next table."
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
        groups.append((direction, mtu, [(t, results.get(t, {}).get(key)) for t in tools]))
    for key, direction in (("published_in", "published, host → ns"), ("published_out", "published, ns → host")):
        groups.append((direction, "MTU 65520", [(f, ports.get(f, {}).get(key)) for f in fwds]))
    vals = [v for _, _, ss in groups for _, v in ss if v is not None]
    vmax = max(vals + [1.0])
    step = nice_step(vmax)
    top = step * (int(vmax / step) + 1)
    W, H = 1000, 440
    left, right, ytop, bottom = 60, 20, 60, 100
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
        sep = left + 4 * gw
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
    }


def cmd_run(args):
    raise_nofile()
    os.makedirs(args.out, exist_ok=True)
    raw = Raw(args.out)
    args.tools = [t for t in args.tools.split(",") if t]
    meta = machine_meta(args)
    log(f"{meta['date']}: {meta['machine']}")
    log(meta["versions"])
    servers = {"echo": Server("echo"), "cps": Server("cps"), "hold": Server("hold")}
    iperf_port = free_port()
    iperf_log = open(raw.path("iperf3-server.log"), "w")
    iperf_srv = subprocess.Popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
        stdout=iperf_log, stderr=iperf_log, stdin=subprocess.DEVNULL,
    )
    servers["iperf"] = iperf_port
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", iperf_port), timeout=1).close()
            break
        except OSError:
            if iperf_srv.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the iperf3 server did not start")
            time.sleep(0.02)
    results, ports, notes = {}, {}, []
    try:
        for tool in args.tools:
            if tool in TABLE_TOOLS:
                run_tool(tool, args, raw, servers, results, notes)
        for fwd, tool, _ in FORWARDERS:
            if tool in args.tools:
                run_published(fwd, tool, args, raw, servers, ports, notes)
    finally:
        stop_pid(iperf_srv)
        iperf_log.close()
    meta["loadavg_end"] = os.getloadavg()
    md = table(results, ports, args, meta, notes)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "throughput.svg"), "w") as f:
        f.write(svg_chart(results, ports, args, meta))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "ports": ports, "notes": notes}, f, indent=2, default=str)
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
    g = sub.add_parser("guest", help="(inside the namespace) one client")
    g.add_argument("what", choices=["probe", "latency", "cps", "hold", "peer"])
    g.add_argument("host")
    g.add_argument("port", type=int)
    g.add_argument("n", type=float)
    a = ap.parse_args()
    if a.cmd == "run":
        a.rnet = os.path.abspath(a.rnet)
        return cmd_run(a)
    if a.what == "probe":
        return guest_probe(a.host, a.port, a.n)
    if a.what == "latency":
        return guest_latency(a.host, a.port, int(a.n))
    if a.what == "cps":
        return guest_cps(a.host, a.port, a.n)
    if a.what == "peer":
        return guest_peer(a.host, a.port, a.n)
    return guest_hold(a.host, a.port, int(a.n))


if __name__ == "__main__":
    sys.exit(main())
