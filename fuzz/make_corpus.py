#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/corpus/<target>/ (a few small, valid
inputs per target). Run from anywhere: python3 fuzz/make_corpus.py"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
GW_MAC = bytes([0x52, 0x55, 0x0A, 0x00, 0x02, 0x02])
GUEST_MAC = bytes([0x02, 0, 0, 0, 0, 0x64])
BCAST = b"\xff" * 6
GUEST = bytes([10, 0, 2, 100])
GW = bytes([10, 0, 2, 2])
DNS = bytes([10, 0, 2, 3])
ZERO = bytes(4)
ALL = b"\xff" * 4


def csum(data, acc=0):
    if len(data) % 2:
        data += b"\0"
    for (w,) in struct.iter_unpack("!H", data):
        acc += w
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return (~acc) & 0xFFFF


def eth(dst, ethertype, payload, src=GUEST_MAC):
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto, payload):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def pseudo(src, dst, proto, length):
    return src + dst + struct.pack("!BBH", 0, proto, length)


def udp(src, dst, sport, dport, data):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = csum(pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return ipv4(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])


def tcp(src, dst, sport, dport, seq, ack, flags, data=b"", opts=b""):
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + opts + data
    c = csum(pseudo(src, dst, 6, len(seg)) + seg)
    return ipv4(src, dst, 6, seg[:16] + struct.pack("!H", c) + seg[18:])


def icmp_echo(src, dst, ident, seq, data):
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    return ipv4(src, dst, 1, msg)


def arp_request(sender_ip, target_ip):
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + sender_ip + bytes(6) + target_ip
    return eth(BCAST, 0x0806, body)


def dns_query(name, qid=0x1234, qtype=1):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def dhcp(msgtype, xid=0x01020304, ciaddr=ZERO, opts=b"", flags=0):
    bootp = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, xid, 0, flags, ciaddr, ZERO, ZERO, ZERO)
    bootp += GUEST_MAC + bytes(10) + bytes(64) + bytes(128)
    options = bytes([53, 1, msgtype]) + opts + b"\xff"
    return bootp + struct.pack("!I", 0x63825363) + options


def vnet_hdr(flags, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    """A virtio-net header in host byte order (little-endian here)."""
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


GUEST6 = bytes.fromhex("fd000000000000000000000000000100")
GW6 = bytes.fromhex("fd000000000000000000000000000002")
DNS6 = bytes.fromhex("fd000000000000000000000000000003")
DOC6 = bytes.fromhex("20010db8000000000000000000000001")
SNM_GW6 = bytes.fromhex("ff0200000000000000000001ff000002")
ALL_ROUTERS6 = bytes.fromhex("ff020000000000000000000000000002")


def ipv6(src, dst, nh, payload, hlim=64):
    return struct.pack("!IHBB", 0x60000000, len(payload), nh, hlim) + src + dst + payload


def pseudo6(src, dst, nh, length):
    return src + dst + struct.pack("!IxxxB", length, nh)


def udp6(src, dst, sport, dport, data):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = csum(pseudo6(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return ipv6(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])


def tcp6(src, dst, sport, dport, seq, ack, flags, data=b"", opts=b""):
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + opts + data
    c = csum(pseudo6(src, dst, 6, len(seg)) + seg)
    return ipv6(src, dst, 6, seg[:16] + struct.pack("!H", c) + seg[18:])


def icmp6(src, dst, typ, code, body):
    """ICMPv6 (NDP messages go out with hop limit 255)."""
    msg = struct.pack("!BBH", typ, code, 0) + body
    c = csum(pseudo6(src, dst, 58, len(msg)) + msg)
    return ipv6(src, dst, 58, msg[:2] + struct.pack("!H", c) + msg[4:], hlim=255)


def opt(code, value):
    return bytes([code, len(value)]) + value


REQ_IP = opt(50, bytes([10, 0, 2, 15]))
SERVER = opt(54, GW)
CLIENT_ID = opt(61, b"\x01" + GUEST_MAC)
PARAMS = opt(55, bytes([1, 3, 6, 26, 51, 58, 59]))


def dhcp_frame(msg, src=ZERO, dst=ALL):
    return eth(BCAST, 0x0800, udp(src, dst, 68, 67, msg))


def record(frame, flags=0):
    return bytes([flags]) + struct.pack("!H", len(frame)) + frame


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    arp = arp_request(GUEST, GW)
    ping = eth(GW_MAC, 0x0800, icmp_echo(GUEST, GW, 7, 1, b"rnet-fuzz"))
    query = eth(GW_MAC, 0x0800, udp(GUEST, DNS, 40000, 53, dns_query("example.com")))
    discover = dhcp_frame(dhcp(1, opts=PARAMS))
    request = dhcp_frame(dhcp(3, opts=REQ_IP + SERVER + PARAMS))
    syn_gw = eth(GW_MAC, 0x0800, tcp(GUEST, GW, 40001, 80, 1000, 0, 0x02))
    udp_out = eth(GW_MAC, 0x0800, udp(GUEST, bytes([192, 0, 2, 1]), 40002, 9, b"hello"))
    ping_out = eth(GW_MAC, 0x0800, icmp_echo(GUEST, bytes([192, 0, 2, 1]), 8, 1, b"x" * 8))

    # frame: single frames.
    for name, f in [("arp", arp), ("ping", ping), ("dns", query), ("dhcp_discover", discover),
                    ("syn", syn_gw), ("udp_denied", udp_out)]:
        write("frame", name, f)

    # ingress: MODE, then records of FLAGS LEN MESSAGE. MODE bit 0: the
    # offload network (each message a virtio-net header, then the frame);
    # bit 1: the closing barrier is an ICMPv6 echo.
    q = dns_query("example.org", qid=0x4242)
    dq = struct.pack("!H", len(q)) + q
    tsyn = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40100, 53, 5000, 0, 0x02, opts=b"\x02\x04\x05\xb4"))
    tack = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40100, 53, 5001, 0, 0x10))
    tdata = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40100, 53, 5001, 0, 0x18, dq))
    tfin = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40100, 53, 5001 + len(dq), 0, 0x11))
    v4 = {
        "arp_ping": [(arp, 0), (ping, 0)],
        "dns_udp": [(arp, 0), (query, 0)],
        "dhcp": [(discover, 0), (request, 0)],
        "denied": [(syn_gw, 0), (udp_out, 0), (ping_out, 0)],
        # DNS over TCP to the forwarder: the handshake's ACK and the data
        # take rnet's sequence number from its SYN-ACK (flag 4).
        "dns_tcp": [(arp, 0), (tsyn, 0), (tack, 4), (tdata, 4), (tfin, 4)],
    }

    ns = eth(b"\x33\x33\xff\x00\x00\x02", 0x86DD,
             icmp6(GUEST6, SNM_GW6, 135, 0, bytes(4) + GW6 + b"\x01\x01" + GUEST_MAC))
    rs = eth(b"\x33\x33\x00\x00\x00\x02", 0x86DD,
             icmp6(GUEST6, ALL_ROUTERS6, 133, 0, bytes(4) + b"\x01\x01" + GUEST_MAC))
    ping6 = eth(GW_MAC, 0x86DD, icmp6(GUEST6, GW6, 128, 0, struct.pack("!HH", 7, 1) + b"rnet-fuzz"))
    query6 = eth(GW_MAC, 0x86DD, udp6(GUEST6, DNS6, 40000, 53, dns_query("example.com")))
    udp_out6 = eth(GW_MAC, 0x86DD, udp6(GUEST6, DOC6, 40002, 9, b"hello"))
    tsyn6 = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40100, 53, 5000, 0, 0x02, opts=b"\x02\x04\x05\xa0"))
    tack6 = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40100, 53, 5001, 0, 0x10))
    tdata6 = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40100, 53, 5001, 0, 0x18, dq))
    tfin6 = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40100, 53, 5001 + len(dq), 0, 0x11))
    v6 = {
        "v6_ndp_ping": [(ns, 0), (rs, 0), (ping6, 0)],
        "v6_dns_udp": [(ns, 0), (query6, 0)],
        "v6_denied": [(ns, 0), (udp_out6, 0)],
        "v6_dns_tcp": [(ns, 0), (tsyn6, 0), (tack6, 4), (tdata6, 4), (tfin6, 4)],
    }

    def ingress(mode, recs, hdr=lambda f: vnet_hdr(0)):
        out = bytes([mode])
        for f, flags in recs:
            out += record((hdr(f) if mode & 1 else b"") + f, flags)
        return out

    for name, recs in v4.items():
        write("ingress", name, ingress(0, recs))
        write("ingress", "offload_" + name, ingress(1, recs))
    for name, recs in v6.items():
        write("ingress", name, ingress(2, recs))
        write("ingress", "offload_" + name, ingress(3, recs))

    # Offload framing as the guest kernel sends it: partial checksums
    # (NEEDS_CSUM; flag 8 points the header at the frame's TCP/UDP header)
    # and one TSO segment larger than the MTU for the forwarder's TCP.
    def is_ip(f):
        return f[12:14] in (b"\x08\x00", b"\x86\xdd")

    partial = lambda f: vnet_hdr(1) if is_ip(f) else vnet_hdr(0)
    big = struct.pack("!H", 3000) + b"z" * 3000
    tbig = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40101, 53, 7001, 0, 0x18, big))
    tsyn_b = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40101, 53, 7000, 0, 0x02, opts=b"\x02\x04\x05\xb4"))
    tack_b = eth(GW_MAC, 0x0800, tcp(GUEST, DNS, 40101, 53, 7001, 0, 0x10))
    tso = lambda f: vnet_hdr(1, 1, 0, 1448) if len(f) > 1514 else partial(f)
    write("ingress", "offload_partial_csum",
          ingress(1, [(arp, 0), (query, 8), (tsyn, 8), (tack, 4 | 8), (tdata, 4 | 8)], partial))
    write("ingress", "offload_tso",
          ingress(1, [(arp, 0), (tsyn_b, 8), (tack_b, 4 | 8), (tbig, 4 | 8)], tso))
    tbig6 = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40101, 53, 7001, 0, 0x18, big))
    tsyn6_b = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40101, 53, 7000, 0, 0x02, opts=b"\x02\x04\x05\xa0"))
    tack6_b = eth(GW_MAC, 0x86DD, tcp6(GUEST6, DNS6, 40101, 53, 7001, 0, 0x10))
    tso6 = lambda f: vnet_hdr(1, 4, 0, 1428) if len(f) > 1514 else partial(f)
    write("ingress", "offload_v6_tso",
          ingress(3, [(ns, 0), (tsyn6_b, 8), (tack6_b, 4 | 8), (tbig6, 4 | 8)], tso6))

    # dhcp: MODE 0 = one datagram; odd MODE = conversation (prefix = MODE >> 1).
    def conv(prefix, *msgs):
        return bytes([prefix << 1 | 1]) + b"".join(bytes([dt]) + struct.pack("!H", len(m)) + m
                                                   for dt, m in msgs)
    write("dhcp", "discover", b"\0" + dhcp(1, opts=PARAMS))
    write("dhcp", "request", b"\0" + dhcp(3, opts=REQ_IP + SERVER))
    write("dhcp", "inform", b"\0" + dhcp(8, ciaddr=GUEST))
    write("dhcp", "dora", conv(24, (0, dhcp(1, opts=CLIENT_ID)),
                               (1, dhcp(3, opts=CLIENT_ID + REQ_IP + SERVER))))
    write("dhcp", "renew_release", conv(24, (0, dhcp(1)), (0, dhcp(3, opts=REQ_IP + SERVER)),
                                        (0x80 | 100, dhcp(3, ciaddr=bytes([10, 0, 2, 15]))),
                                        (1, dhcp(7, ciaddr=bytes([10, 0, 2, 15]), opts=SERVER))))
    write("dhcp", "decline_small", conv(28, (0, dhcp(1)), (0, dhcp(4, opts=REQ_IP + SERVER)),
                                        (0, dhcp(1, flags=0x8000))))

    # api: the slirp4netns-style requests.
    for name, req in [
        ("add", {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                                         "host_port": 8080, "guest_port": 80}}),
        ("add_udp", {"execute": "add_hostfwd", "arguments": {"proto": "udp", "host_addr": "",
                                                             "host_port": 0, "guest_addr": "10.0.2.100",
                                                             "guest_port": 53}}),
        ("list", {"execute": "list_hostfwd"}),
        ("remove", {"execute": "remove_hostfwd", "arguments": {"id": 1}}),
    ]:
        write("api", name, json.dumps(req).encode())

    # vnet: GSO size asked for on transmit, a virtio-net header (host byte
    # order: little-endian here), then the frame as the TAP delivers it.

    inner = eth(GW_MAC, 0x0800, tcp(GUEST, GW, 40000, 80, 1, 1, 0x18, b"x" * 100))
    vxlan = struct.pack("!II", 0x08000000, 0x100) + inner
    outer = eth(GW_MAC, 0x0800, udp(GUEST, GW, 40001, 8472, vxlan))
    write("vnet", "vxlan_inner_partial",
          b"\0\0" + vnet_hdr(1, csum_start=14 + 20 + 8 + 8 + 14 + 20, csum_offset=16) + outer)
    big = eth(GW_MAC, 0x0800, tcp(GUEST, GW, 40000, 80, 1, 1, 0x18, b"y" * 3000))
    write("vnet", "tso_segment", struct.pack("!H", 1448) + vnet_hdr(1, 1, 54, 1448, 34, 16) + big)
    write("vnet", "plain_udp", b"\0\0" + vnet_hdr(0) + eth(GW_MAC, 0x0800, udp(GUEST, GW, 5, 53, b"q")))

    # specs: one kind of text per file.
    for name, text in [
        ("port", "8080:80"),
        ("port_full", "127.0.0.1:8000-8009:10.0.2.100:9000-9009/udp"),
        ("port_v6", "[::1]:0:80/tcp"),
        ("cidr", "10.0.2.0/24"),
        ("upstream", "[fe80::1]:5353"),
        ("autopub", "1024-65535/udp"),
        ("resolv", "# comment\nnameserver 127.0.0.53\nnameserver ::1\nsearch example\n"),
        ("table", "  sl  local_address rem_address   st\n"
                  "   0: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   0 0 1\n"
                  "   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A\n"),
    ]:
        write("specs", name, text.encode())


main()
