"""Guest-side servers for the port publishing tests.

    port_server.py SPEC...      SPEC is MODE:PORTS[:ARG], PORTS one port or FIRST-LAST

Binds every socket of every SPEC on 0.0.0.0, then prints "listening" (flushed), and
serves until killed. Modes (TCP unless noted):

    http        read a request head, answer HTTP/1.0 200 with the body
                "client=IP:PORT port=LOCALPORT\\n" (the address the server sees), close
    echo        echo everything until EOF
    udp         UDP: answer each datagram with b"client=IP:PORT|" + the datagram
    sink        read to EOF, print "sink <bytes> <sha256 hex>", then close
    source:N    send N bytes of the test pattern (see stream.py), then close
    halfclose   read to EOF, then answer b"got N bytes: " + the data, then close
    rst         read one chunk, then close with SO_LINGER 0 (a reset); print "rst sent"
    peer        send b"ready\\n", read until EOF or error; print "peer: eof" or "peer: reset"
"""
import hashlib
import resource
import selectors
import socket
import struct
import sys
import threading

BLOCK = 1 << 20


def say(*a):
    print(*a, flush=True)


def pattern(total):
    base = bytearray(
        b"".join(
            hashlib.sha256(b"rnet-test" + k.to_bytes(4, "little")).digest()
            for k in range(BLOCK // 32)
        )
    )
    for i in range(total // BLOCK):
        base[0:8] = i.to_bytes(8, "little")
        yield base


def read_all(c):
    data = bytearray()
    while True:
        b = c.recv(65536)
        if not b:
            return bytes(data)
        data += b


def h_http(c, peer, arg):
    head = b""
    while b"\r\n\r\n" not in head:
        b = c.recv(4096)
        if not b:
            return
        head += b
    body = b"client=%s:%d port=%d\n" % (peer[0].encode(), peer[1], c.getsockname()[1])
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def h_echo(c, peer, arg):
    while True:
        b = c.recv(65536)
        if not b:
            return
        c.sendall(b)


def h_sink(c, peer, arg):
    h = hashlib.sha256()
    n = 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        h.update(view[:k])
        n += k
    say("sink", n, h.hexdigest())


def h_source(c, peer, arg):
    for b in pattern(int(arg)):
        c.sendall(b)
    c.shutdown(socket.SHUT_WR)


def h_halfclose(c, peer, arg):
    data = read_all(c)
    c.sendall(b"got %d bytes: " % len(data) + data)


def h_rst(c, peer, arg):
    c.recv(65536)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    say("rst sent")


def h_peer(c, peer, arg):
    c.sendall(b"ready\n")
    try:
        while c.recv(65536):
            pass
        say("peer: eof")
    except ConnectionResetError:
        say("peer: reset")
    except OSError as e:
        say("peer: error", e)


HANDLERS = {
    "http": h_http,
    "echo": h_echo,
    "sink": h_sink,
    "source": h_source,
    "halfclose": h_halfclose,
    "rst": h_rst,
    "peer": h_peer,
}


def serve_conn(handler, c, peer, arg):
    try:
        c.settimeout(600)
        handler(c, peer, arg)
    except OSError as e:
        say("error", repr(e))
    finally:
        try:
            c.close()
        except OSError:
            pass


def ports(s):
    a, _, b = s.partition("-")
    return range(int(a), int(b or a) + 1)


def main():
    # The large range test needs a listener per port.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        mode, prange, arg = (spec.split(":") + [None])[:3]
        for p in ports(prange):
            if mode == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("0.0.0.0", p))
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", p))
                s.listen(256)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, (mode, arg))
    say("listening")
    while True:
        for key, _ in sel.select():
            s, (mode, arg) = key.fileobj, key.data
            try:
                if mode == "udp":
                    data, peer = s.recvfrom(65536)
                    s.sendto(b"client=%s:%d|" % (peer[0].encode(), peer[1]) + data, peer)
                    continue
                c, peer = s.accept()
            except (BlockingIOError, InterruptedError):
                continue
            c.setblocking(True)
            threading.Thread(
                target=serve_conn, args=(HANDLERS[mode], c, peer, arg), daemon=True
            ).start()


main()
