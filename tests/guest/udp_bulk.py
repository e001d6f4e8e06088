"""Guest side of the UDP bulk tests: numbered datagrams in bursts, each
burst acknowledged before the next, so nothing is lost to full buffers and
every loss or reordering is rnet's.

    udp_bulk.py send HOST PORT COUNT SIZE BURST   # to a host sink that acks
    udp_bulk.py recv PORT COUNT SIZE BURST        # from a host sender; acks

Each side first trades "hi"/"ok" (the sender repeats "hi" until answered)
so the path is up before the bulk. A datagram is SIZE bytes: its 4-byte big-endian number, then that number's
byte repeated. After every BURST datagrams (and at the end) the receiver
sends the count it holds. `recv` prints "listening" once bound, then one
JSON line: received, in_order, corrupt. Both then wait for an "end"
datagram from the host before exiting.
"""
import json
import socket
import struct
import sys


def datagram(i, size):
    return struct.pack(">I", i) + bytes([i & 0xFF]) * (size - 4)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def send(host, port, count, size, burst):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect((host, port))
    # Handshake first: the path (ARP, the flow) is up before the bulk.
    s.settimeout(0.2)
    for _ in range(100):
        s.send(b"hi")
        try:
            if s.recv(64) == b"ok":
                break
        except OSError:
            pass
    s.settimeout(5.0)
    i = 0
    while i < count:
        n = min(burst, count - i)
        for k in range(n):
            s.send(datagram(i + k, size))
        i += n
        while True:
            a = s.recv(64)
            if len(a) == 4 and struct.unpack(">I", a)[0] >= i:
                break
    print(json.dumps({"sent": count}), flush=True)
    wait_end(s)


def recv(port, count, size, burst):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    s.settimeout(20.0)
    print("listening", flush=True)
    st = {"received": 0, "in_order": True, "corrupt": 0}
    while st["received"] < count:
        d, peer = s.recvfrom(65536)
        if d == b"hi":
            s.sendto(b"ok", peer)
            continue
        i = st["received"]
        if len(d) != size or d != datagram(struct.unpack(">I", d[:4])[0], size):
            st["corrupt"] += 1
        if struct.unpack(">I", d[:4])[0] != i:
            st["in_order"] = False
        st["received"] += 1
        if st["received"] % burst == 0 or st["received"] == count:
            s.sendto(struct.pack(">I", st["received"]), peer)
    print(json.dumps(st), flush=True)
    wait_end(s)


def wait_end(s):
    """Stays (so rnet's counters can be read) until the host says "end"."""
    s.settimeout(30.0)
    try:
        while s.recv(64) != b"end":
            pass
    except OSError:
        pass


def main():
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        recv(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))


if __name__ == "__main__":
    main()
