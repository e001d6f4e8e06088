"""A hostile guest: raw Ethernet frames written on the TAP with an AF_PACKET
socket (the guest is root in its user namespace, so it has CAP_NET_RAW in
its network namespace), plus a well-behaved long-lived TCP client.

Every destination is rnet's gateway (10.0.2.2, the host's loopback when
rnet runs with --allow-host-loopback), rnet's DNS address, or an address
the test passes in (a test host it created and allowed). Each command is
bounded in count and time and stops by itself.

    hostile.py gwmac IFACE [IP]
        ARP-resolves IP (default 10.0.2.2) with a raw request; prints
        "mac XX:XX:XX:XX:XX:XX" (exit 1 if no reply in 3 tries).
    hostile.py synflood IFACE SECONDS SKIP TARGET...
        One TCP SYN (random source port and sequence number) to every port
        of every TARGET (IP:LO-HI), targets interleaved, ports in SKIP
        (comma list or "-") left out; stops after SECONDS. Self-clocked on
        rnet's answers (see flood). Prints JSON: sent, total, answered,
        stalls, enobufs, secs, tap_tx_dropped (frames the guest kernel
        dropped on the TAP during the flood).
    hostile.py udpflood IFACE SECONDS DST_IP DST_PORT SRC_IP:COUNT...
        One UDP datagram from each of COUNT source ports (20000 upwards) of
        each source address (addresses of the guest's /24), interleaved;
        stops after SECONDS. Prints JSON like synflood.
    hostile.py frames IFACE UDP_PORT TCP_PORT CASE...
        Writes one malformed frame per CASE (see CASES) towards the gateway
        (UDP_PORT: a host UDP socket behind 10.0.2.2, TCP_PORT: a host TCP
        listener), each followed by a valid datagram "marker CASE" to
        UDP_PORT. Prints "sent CASE LEN" per frame.
    hostile.py arpspoof IFACE
        Gratuitous ARP and ARP replies claiming 10.0.2.2 and 10.0.2.3 with
        the guest's own MAC, and ARP requests with 10.0.2.2 / 10.0.2.3 as
        sender. Prints "sent KIND" per frame.
    hostile.py loopback IFACE PORT
        A TCP SYN, a UDP datagram and an ICMP echo to 127.0.0.1 (PORT), a
        UDP datagram to ::1 (PORT), then the controls: a UDP datagram
        "marker" and a TCP SYN to 10.0.2.2:PORT. Prints "sent KIND".
    hostile.py hold HOST PORT MAX_SECS
        A normal TCP client: connects, prints "connected", then exchanges
        1 KiB messages with an echo server (checked byte for byte) about
        every 20 ms, printing "tick N EXCHANGES MAX_GAP_MS UNIX_TIME" each
        second (MAX_GAP_MS: the longest wait between two echoes in that
        second); on SIGTERM or after MAX_SECS prints a JSON summary and
        exits (exit 1 at the first error, after printing it).
"""
import errno
import json
import random
import select
import signal
import socket
import struct
import sys
import time

GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
GUEST = "10.0.2.100"
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4


def mac_bytes(s):
    return bytes(int(x, 16) for x in s.split(":"))


def mac_str(b):
    return ":".join("%02x" % x for x in b)


def own_mac(iface):
    # Not /sys/class/net: without a mount namespace of its own the guest
    # sees the host's sysfs. A packet socket bound to the device knows it.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((iface, 0))
    mac = s.getsockname()[4]
    s.close()
    return mac


def ip4(s):
    return socket.inet_aton(s)


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def raw_socket(iface, proto=ETH_P_ALL):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((iface, proto))
    return s


def send(s, frame, stats=None):
    """Writes one frame; waits and retries while the TAP queue is full."""
    while True:
        try:
            return s.send(frame)
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            if stats is not None:
                stats["enobufs"] += 1
            # The qdisc is full and the packet socket offers no readiness
            # signal for it: back off briefly.
            time.sleep(0.0005)


# ---------------------------------------------------------------- builders


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto, payload, ident=0, flags_frag=0x4000, ttl=64,
         version=4, ihl=5, total=None, bad_csum=False):
    total = 20 + len(payload) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total, ident,
                      flags_frag, ttl, proto, 0, ip4(src), ip4(dst))
    c = csum(hdr)
    if bad_csum:
        c ^= 0x5A5A
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def pseudo(src, dst, proto, length):
    return ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, length)


def tcp(src, dst, sport, dport, flags=0x02, seq=None, bad_csum=False):
    seq = random.getrandbits(32) if seq is None else seq
    # SYN with an MSS option, as a kernel would send.
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 6 << 4, flags, 64240, 0, 0)
    hdr += struct.pack("!BBH", 2, 4, 1460)
    c = csum(pseudo(src, dst, 6, len(hdr)) + hdr)
    if bad_csum:
        c ^= 0x5A5A
    return hdr[:16] + struct.pack("!H", c) + hdr[18:]


def udp(src, dst, sport, dport, data, bad_csum=False, zero_csum=False):
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    c = csum(pseudo(src, dst, 17, 8 + len(data)) + hdr + data) or 0xFFFF
    if zero_csum:
        c = 0
    elif bad_csum:
        c ^= 0x5A5A
    return hdr[:6] + struct.pack("!H", c) + data


def icmp_echo(ident, seq, data, bad_csum=False):
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    c = csum(hdr + data)
    if bad_csum:
        c ^= 0x5A5A
    return hdr[:2] + struct.pack("!H", c) + hdr[4:] + data


def arp(op, sha, spa, tha, tpa):
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, ip4(spa), tha, ip4(tpa))


def resolve(iface, ip=GATEWAY, tries=3):
    """The MAC that answers an ARP request for ip (sent from the guest)."""
    me = own_mac(iface)
    s = raw_socket(iface, ETH_P_ARP)
    req = eth(b"\xff" * 6, me, ETH_P_ARP, arp(1, me, GUEST, b"\0" * 6, ip))
    for _ in range(tries):
        send(s, req)
        deadline = time.monotonic() + 1.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([s], [], [], left)[0]:
                break
            b, addr = s.recvfrom(2048)
            if addr[2] == PACKET_OUTGOING or len(b) < 42:
                continue
            op, sha, spa = struct.unpack("!H6s4s", b[20:32])
            if op == 2 and spa == ip4(ip) and b[32:38] == me:
                s.close()
                return sha
    s.close()
    return None


def gateway_mac(iface):
    m = resolve(iface)
    if m is None:
        sys.exit("no ARP reply for %s" % GATEWAY)
    return m


# ---------------------------------------------------------------- commands


def cmd_gwmac(iface, ip=GATEWAY):
    m = resolve(iface, ip)
    if m is None:
        print("no reply", flush=True)
        sys.exit(1)
    print("mac", mac_str(m), flush=True)


def tx_dropped(iface):
    """Frames the guest kernel dropped on iface's transmit side (the TAP's
    queue towards rnet was full); /proc/net/dev is per network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                return int(rest.split()[11])
    return 0


def flood(iface, seconds, frames, total, window):
    """Sends the frames the generator yields until done or out of time.

    Self-clocked: rnet answers each frame of a flood (a RST, an ICMP error,
    an echoed datagram), so at most `window` frames are left unanswered;
    the TAP's queue (raised by the test) holds more than that, so the
    kernel drops none of them on the way to rnet. Frames rnet keeps
    without an answer (a held SYN-ACK) are written off after 2 s of
    silence ("stalls")."""
    s = raw_socket(iface)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    r = raw_socket(iface, ETH_P_IP)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    r.setblocking(False)
    st = dict(sent=0, total=total, answered=0, stalls=0, enobufs=0)
    dropped0 = tx_dropped(iface)
    written_off = 0

    def drain(timeout):
        if not select.select([r], [], [], timeout)[0]:
            return
        while True:
            try:
                _, addr = r.recvfrom(64)
            except BlockingIOError:
                return
            if addr[2] == socket.PACKET_HOST:
                st["answered"] += 1

    t0 = time.monotonic()
    end = t0 + seconds
    for f in frames:
        while st["sent"] - st["answered"] - written_off >= window:
            before = st["answered"]
            drain(2.0)
            if st["answered"] == before:
                st["stalls"] += 1
                written_off = st["sent"] - st["answered"]
        send(s, f, st)
        st["sent"] += 1
        if st["sent"] % 64 == 0:
            drain(0)
            if time.monotonic() > end:
                break
    drain(0.2)
    st["secs"] = round(time.monotonic() - t0, 2)
    st["tap_tx_dropped"] = tx_dropped(iface) - dropped0
    print(json.dumps(st), flush=True)


def cmd_synflood(iface, seconds, skip, *targets):
    me, gw = own_mac(iface), gateway_mac(iface)
    skip = set() if skip == "-" else {int(p) for p in skip.split(",") if p}
    lists = []
    for t in targets:
        ip, rng = t.rsplit(":", 1)
        lo, hi = (int(x) for x in rng.split("-"))
        lists.append((ip, [p for p in range(lo, hi + 1) if p not in skip]))
    total = sum(len(ports) for _, ports in lists)

    def frames():
        hdrs = {ip: eth(gw, me, ETH_P_IP, b"") for ip, _ in lists}
        longest = max(len(p) for _, p in lists)
        for i in range(longest):
            for ip, ports in lists:
                if i < len(ports):
                    seg = tcp(GUEST, ip, random.randrange(1024, 65536), ports[i])
                    yield hdrs[ip] + ipv4(GUEST, ip, 6, seg, ident=i & 0xFFFF)

    flood(iface, float(seconds), frames(), total, 2048)


def cmd_udpflood(iface, seconds, dst, dport, *sources):
    me, gw = own_mac(iface), gateway_mac(iface)
    dport = int(dport)
    srcs = []
    for spec in sources:
        ip, n = spec.rsplit(":", 1)
        srcs.append((ip, int(n)))
    total = sum(n for _, n in srcs)

    def frames():
        for i in range(max(n for _, n in srcs)):
            for ip, n in srcs:
                if i < n:
                    data = b"flood %s %d" % (ip.encode(), i)
                    dgram = udp(ip, dst, 20000 + i, dport, data)
                    yield eth(gw, me, ETH_P_IP, ipv4(ip, dst, 17, dgram, ident=i & 0xFFFF))

    flood(iface, float(seconds), frames(), total, 1024)


def cases(me, gw, uport, tport):
    """Each malformed frame by name."""
    G = GATEWAY

    def ip_eth(payload):
        return eth(gw, me, ETH_P_IP, payload)

    good_udp = udp(GUEST, G, 40000, uport, b"must not arrive")
    good_syn = tcp(GUEST, G, 40001, tport)
    full = ipv4(GUEST, G, 17, good_udp)
    big = b"x" * 4000
    return {
        # Truncated: an IPv4 header cut short, TCP and UDP headers cut
        # short (the IP total length says so too), ARP cut short.
        "trunc_ip": ip_eth(full[:12]),
        "trunc_tcp": ip_eth(ipv4(GUEST, G, 6, good_syn[:10])),
        "trunc_udp": ip_eth(ipv4(GUEST, G, 17, good_udp[:5])),
        "trunc_arp": eth(gw, me, ETH_P_ARP, arp(1, me, GUEST, b"\0" * 6, G)[:12]),
        # Oversized: a UDP datagram in a frame larger than rnet's MTU (the
        # test runs rnet with --mtu 1500 and raises the guest's TAP MTU).
        "oversized": ip_eth(ipv4(GUEST, G, 17, udp(GUEST, G, 40002, uport, big))),
        # Bad checksums.
        "bad_ip_csum": ip_eth(ipv4(GUEST, G, 17, good_udp, bad_csum=True)),
        "bad_tcp_csum": ip_eth(ipv4(GUEST, G, 6, tcp(GUEST, G, 40003, tport, bad_csum=True))),
        "bad_udp_csum": ip_eth(ipv4(GUEST, G, 17, udp(GUEST, G, 40004, uport, b"bad", bad_csum=True))),
        "bad_icmp_csum": ip_eth(ipv4(GUEST, G, 1, icmp_echo(7, 1, b"bad", bad_csum=True))),
        # Bad headers.
        "ip_version5": ip_eth(ipv4(GUEST, G, 17, good_udp, version=5)),
        "ip_ihl4": ip_eth(ipv4(GUEST, G, 17, good_udp, ihl=4)),
        "ip_totlen_gt_frame": ip_eth(ipv4(GUEST, G, 17, good_udp, total=1000)),
        # Fragments (valid header checksums).
        "frag_mf": ip_eth(ipv4(GUEST, G, 17, good_udp, ident=77, flags_frag=0x2000)),
        "frag_offset": ip_eth(ipv4(GUEST, G, 17, good_udp[8:], ident=77, flags_frag=185)),
    }


def cmd_frames(iface, uport, tport, *names):
    me, gw = own_mac(iface), gateway_mac(iface)
    all_cases = cases(me, gw, int(uport), int(tport))
    uport = int(uport)
    s = raw_socket(iface)
    for n in names:
        f = all_cases[n]
        send(s, f)
        # A valid datagram to the same UDP socket right behind it: rnet
        # handles frames in order, so once the host sees the marker the
        # frame before it has been dealt with.
        marker = b"marker " + n.encode()
        send(s, eth(gw, me, ETH_P_IP, ipv4(GUEST, GATEWAY, 17, udp(GUEST, GATEWAY, 40005, uport, marker))))
        print("sent", n, len(f), flush=True)


def cmd_arpspoof(iface):
    me = own_mac(iface)
    gw = gateway_mac(iface)
    bc, zero = b"\xff" * 6, b"\0" * 6
    frames = [
        # Gratuitous ARP (request and reply forms) for the gateway and DNS.
        ("garp_request_gateway", eth(bc, me, ETH_P_ARP, arp(1, me, GATEWAY, zero, GATEWAY))),
        ("garp_reply_gateway", eth(bc, me, ETH_P_ARP, arp(2, me, GATEWAY, bc, GATEWAY))),
        ("garp_request_dns", eth(bc, me, ETH_P_ARP, arp(1, me, DNS, zero, DNS))),
        ("garp_reply_dns", eth(bc, me, ETH_P_ARP, arp(2, me, DNS, bc, DNS))),
        # Unsolicited replies to rnet claiming the other virtual host.
        ("reply_dns_is_me_to_gateway", eth(gw, me, ETH_P_ARP, arp(2, me, DNS, gw, GATEWAY))),
        ("reply_gateway_is_me_to_dns", eth(gw, me, ETH_P_ARP, arp(2, me, GATEWAY, gw, DNS))),
        # Requests with a virtual host as sender.
        ("request_from_gateway", eth(bc, me, ETH_P_ARP, arp(1, me, GATEWAY, zero, DNS))),
        ("request_from_dns", eth(bc, me, ETH_P_ARP, arp(1, me, DNS, zero, GATEWAY))),
    ]
    s = raw_socket(iface)
    for kind, f in frames:
        send(s, f)
        print("sent", kind, flush=True)
    # rnet still answers for both virtual hosts with its own MAC.
    for ip in (GATEWAY, DNS):
        m = resolve(iface, ip)
        print("answer", ip, mac_str(m) if m else "none", flush=True)


def ip6(s):
    return socket.inet_pton(socket.AF_INET6, s)


def ipv6_icmp(src, dst, icmp):
    """An IPv6 packet (hop limit 255, as NDP requires) carrying `icmp`
    (ICMPv6 with its checksum field zero), checksum filled in."""
    pseudo6 = ip6(src) + ip6(dst) + struct.pack("!I3xB", len(icmp), 58)
    c = csum(pseudo6 + icmp)
    icmp = icmp[:2] + struct.pack("!H", c) + icmp[4:]
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 255, ip6(src), ip6(dst))
    return hdr + icmp


def cmd_ndpspoof(iface, guest6, gw6, dns6):
    """Neighbour advertisements from the guest claiming the gateway's and
    the DNS host's IPv6 addresses (unicast to rnet, override flag, the
    guest's own MAC as target link-layer address), and a solicitation sent
    as if from the gateway. rnet must ignore all of them."""
    me = own_mac(iface)
    gw = gateway_mac(iface)
    frames = []
    for name, target in (("gateway", gw6), ("dns", dns6)):
        na = struct.pack("!BBHI16s", 136, 0, 0, 0xA0000000, ip6(target)) + bytes([2, 1]) + me
        frames.append(("na_claims_" + name, eth(gw, me, ETH_P_IPV6, ipv6_icmp(guest6, target, na))))
    ns = struct.pack("!BBHI16s", 135, 0, 0, 0, ip6(dns6)) + bytes([1, 1]) + me
    frames.append(("ns_from_gateway", eth(gw, me, ETH_P_IPV6, ipv6_icmp(gw6, dns6, ns))))
    s = raw_socket(iface)
    for kind, f in frames:
        send(s, f)
        print("sent", kind, flush=True)


def cmd_loopback(iface, port):
    me, gw = own_mac(iface), gateway_mac(iface)
    port = int(port)
    L = "127.0.0.1"
    e = lambda p: eth(gw, me, ETH_P_IP, p)  # noqa: E731
    # IPv6 to ::1 (rnet has no IPv6: dropped as unsupported).
    src6 = bytes.fromhex("fe800000000000000000000000000064")
    dst6 = bytes(15) + b"\x01"
    d6 = b"to ::1"
    u6 = struct.pack("!HHHH", 40012, port, 8 + len(d6), 0) + d6
    c6 = csum(src6 + dst6 + struct.pack("!IxxxB", len(u6), 17) + u6) or 0xFFFF
    u6 = u6[:6] + struct.pack("!H", c6) + u6[8:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(u6), 17, 64) + src6 + dst6 + u6
    frames = [
        ("tcp_syn_127.0.0.1", e(ipv4(GUEST, L, 6, tcp(GUEST, L, 40010, port)))),
        ("udp_127.0.0.1", e(ipv4(GUEST, L, 17, udp(GUEST, L, 40011, port, b"to 127.0.0.1")))),
        ("icmp_127.0.0.1", e(ipv4(GUEST, L, 1, icmp_echo(9, 1, b"to 127.0.0.1")))),
        ("udp_::1", eth(gw, me, ETH_P_IPV6, ip6)),
        # Controls, after everything above: the same port through the gateway.
        ("udp_marker_gateway", e(ipv4(GUEST, GATEWAY, 17, udp(GUEST, GATEWAY, 40013, port, b"marker")))),
        ("tcp_syn_gateway", e(ipv4(GUEST, GATEWAY, 6, tcp(GUEST, GATEWAY, 40014, port)))),
    ]
    s = raw_socket(iface)
    for kind, f in frames:
        send(s, f)
        print("sent", kind, flush=True)


def cmd_hold(host, port, max_secs):
    st = dict(exchanges=0, max_gap_ms=0.0, errors=0)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    c = socket.create_connection((host, int(port)), timeout=10)
    c.settimeout(10)
    print("connected", flush=True)
    t0 = last_ok = next_tick = time.monotonic()
    tick, tick_gap = 0, 0.0
    rnd = random.Random(1)
    try:
        while not stop and time.monotonic() - t0 < float(max_secs):
            msg = struct.pack("!Q", st["exchanges"]) + rnd.randbytes(1016)
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                b = c.recv(len(msg) - len(got))
                if not b:
                    raise ConnectionError("echo server closed the connection")
                got += b
            if got != msg:
                raise ValueError("echo mismatch at exchange %d" % st["exchanges"])
            now = time.monotonic()
            gap = (now - last_ok) * 1000
            tick_gap = max(tick_gap, gap)
            st["max_gap_ms"] = round(max(st["max_gap_ms"], gap), 1)
            st["exchanges"] += 1
            last_ok = now
            if now >= next_tick:
                tick += 1
                print("tick %d %d %.1f %.3f" % (tick, st["exchanges"], tick_gap, time.time()),
                      flush=True)
                next_tick = now + 1.0
                tick_gap = 0.0
            time.sleep(0.02)
    except Exception as e:  # noqa: BLE001
        st["errors"] += 1
        st["error"] = repr(e)
        print("error", repr(e), flush=True)
        print(json.dumps(st), flush=True)
        sys.exit(1)
    c.close()
    print(json.dumps(st), flush=True)


COMMANDS = {
    "gwmac": cmd_gwmac,
    "synflood": cmd_synflood,
    "udpflood": cmd_udpflood,
    "frames": cmd_frames,
    "arpspoof": cmd_arpspoof,
    "ndpspoof": cmd_ndpspoof,
    "loopback": cmd_loopback,
    "hold": cmd_hold,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
