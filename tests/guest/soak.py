"""Guest side of the soak test: mixed load with connection churn for a
fixed time, towards rnet's gateway (the host's loopback) and DNS forwarder.

    soak.py ECHO_PORT UDP_PORT SECONDS

Runs at once, until SECONDS have passed:
  - 4 workers opening short TCP connections to 10.0.2.2:ECHO_PORT (a host
    echo server): connect, send 1-16 KiB, read it back, close, 20 ms pause;
  - 1 long stream: one connection to the same echo server kept for the
    whole run, 64 KiB at a time;
  - 2 UDP workers: request/response to 10.0.2.2:UDP_PORT (a host echo
    server), a new socket (source port) every 200 datagrams;
  - 2 DNS workers: A queries to 10.0.2.3:53, a new socket per query.
Prints one JSON object: counts per kind, errors (with the first few), and
the seconds it ran. Exits 0 unless a worker saw corrupted data.
"""
import json
import random
import socket
import struct
import sys
import threading
import time

GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"

lock = threading.Lock()
stats = dict(short_tcp=0, stream_bytes=0, udp=0, udp_sockets=0, dns=0,
             errors=0, corrupt=0, first_errors=[])


def count(key, n=1):
    with lock:
        stats[key] += n


def error(what, e):
    with lock:
        stats["errors"] += 1
        if len(stats["first_errors"]) < 5:
            stats["first_errors"].append("%s: %r" % (what, e))


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return bytes(b)


def short_tcp(port, end, seed):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        try:
            with socket.create_connection((GATEWAY, port), timeout=10) as s:
                s.settimeout(10)
                msg = rnd.randbytes(rnd.randint(1024, 16384))
                s.sendall(msg)
                if recv_exact(s, len(msg)) != msg:
                    count("corrupt")
            count("short_tcp")
            # Paced: every closed connection leaves the guest a TIME_WAIT
            # port for 60 s; 4 workers at this pace stay far below the
            # guest's ~28,000 ephemeral ports for any length of run.
            time.sleep(0.02)
        except OSError as e:
            error("short tcp", e)
            time.sleep(0.1)


def stream(port, end):
    rnd = random.Random(7)
    block = rnd.randbytes(65536)
    try:
        with socket.create_connection((GATEWAY, port), timeout=10) as s:
            s.settimeout(20)
            while time.monotonic() < end:
                s.sendall(block)
                if recv_exact(s, len(block)) != block:
                    count("corrupt")
                count("stream_bytes", len(block))
    except OSError as e:
        error("stream", e)


def udp(port, end, seed):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            count("udp_sockets")
            for _ in range(200):
                if time.monotonic() >= end:
                    break
                msg = rnd.randbytes(rnd.randint(16, 1400))
                try:
                    s.sendto(msg, (GATEWAY, port))
                    got, _ = s.recvfrom(2048)
                    if got != msg:
                        count("corrupt")
                    count("udp")
                except OSError as e:
                    error("udp", e)
            time.sleep(0.01)


def dns_query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def dns(end, seed):
    rnd = random.Random(seed)
    while time.monotonic() < end:
        qid = rnd.randrange(65536)
        name = "host%d.soak.test" % rnd.randrange(1000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(dns_query(qid, name), (DNS, 53))
                r, _ = s.recvfrom(512)
                if struct.unpack("!H", r[:2])[0] != qid or r[2] & 0x80 == 0:
                    count("corrupt")
            count("dns")
        except OSError as e:
            error("dns", e)
        time.sleep(0.005)


def main():
    echo, uport, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    t0 = time.monotonic()
    end = t0 + secs
    workers = [threading.Thread(target=short_tcp, args=(echo, end, i)) for i in range(4)]
    workers.append(threading.Thread(target=stream, args=(echo, end)))
    workers += [threading.Thread(target=udp, args=(uport, end, 100 + i)) for i in range(2)]
    workers += [threading.Thread(target=dns, args=(end, 200 + i)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats["secs"] = round(time.monotonic() - t0, 1)
    print(json.dumps(stats), flush=True)
    sys.exit(1 if stats["corrupt"] else 0)


main()
