"""Sends malformed DHCP client datagrams, as a broken client would.

    dhcp_junk.py IFACE KIND...

Each KIND is one UDP datagram from 0.0.0.0:68 (or the interface's address
once it has one) to 255.255.255.255:67 out of IFACE:

    text      bytes that are no BOOTP message at all
    short     a BOOTREQUEST cut off after 100 bytes
    nomagic   a full-size BOOTREQUEST without the DHCP magic cookie
    noopts    a BOOTREQUEST with the cookie but no message type option

Prints "sent KIND LEN" for each (flushed).
"""
import socket
import sys


def bootrequest(n, cookie=True):
    b = bytearray(n)
    b[0], b[1], b[2] = 1, 1, 6  # BOOTREQUEST, Ethernet, hlen 6
    b[4:8] = b"\x12\x34\x56\x78"
    b[28:34] = b"\x02\x00\x00\x00\x00\x99"
    if cookie and n >= 240:
        b[236:240] = b"\x63\x82\x53\x63"
        if n > 240:
            b[240] = 255  # end
    return bytes(b)


KINDS = {
    "text": b"\xde\xad\xbe\xef this is not a DHCP message " * 3,
    "short": bootrequest(100),
    "nomagic": bootrequest(300, cookie=False),
    "noopts": bootrequest(300),
}

iface = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
s.bind(("0.0.0.0", 68))
for kind in sys.argv[2:]:
    n = s.sendto(KINDS[kind], ("255.255.255.255", 67))
    print("sent", kind, n, flush=True)
