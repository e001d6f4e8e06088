"""Guest side of the bulk TCP tests.

    stream.py send HOST PORT BYTES   send BYTES of the test pattern, then wait for the peer to close
    stream.py recv HOST PORT         read until EOF

Prints "<bytes> <sha256 hex>" of what was sent or received. The pattern is the one
tests/common/mod.rs generates: a 1 MiB base block of chained SHA-256 digests, block i
carrying i (u64 little-endian) in its first 8 bytes.
"""
import hashlib
import socket
import sys

BLOCK = 1 << 20


def blocks(total):
    base = bytearray(
        b"".join(
            hashlib.sha256(b"rnet-test" + k.to_bytes(4, "little")).digest()
            for k in range(BLOCK // 32)
        )
    )
    assert total % BLOCK == 0, "BYTES must be a multiple of 1 MiB"
    for i in range(total // BLOCK):
        base[0:8] = i.to_bytes(8, "little")
        yield base


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(120)
    h = hashlib.sha256()
    n = 0
    if mode == "send":
        for b in blocks(int(sys.argv[4])):
            h.update(b)
            s.sendall(b)
            n += len(b)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    else:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            k = s.recv_into(buf)
            if not k:
                break
            h.update(view[:k])
            n += k
    s.close()
    print(n, h.hexdigest(), flush=True)


main()
