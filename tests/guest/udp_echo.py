"""Guest side of the UDP test: COUNT content-tagged datagrams of varied sizes to an
echo server, one at a time, each with a 1 s timeout and up to 3 retries (for loss only).

    udp_echo.py HOST PORT COUNT

Prints one JSON object: sent, answered, corrupted, retries, lost, bytes.
"""
import hashlib
import json
import socket
import sys


def payload(i):
    size = 30000 if i % 100 == 99 else 8 + (i * 7919) % 8192
    tag = b"%06d:" % i
    body = hashlib.sha256(tag).digest() * (size // 32 + 1)
    return tag, (tag + body)[:size]


def main():
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1.0)
    st = dict(sent=count, answered=0, corrupted=0, retries=0, lost=0, bytes=0)
    for i in range(count):
        tag, msg = payload(i)
        for attempt in range(4):
            st["retries"] += attempt > 0
            s.send(msg)
            try:
                reply = s.recv(65536)
                while reply[: len(tag)] != tag:  # a late answer to an earlier datagram
                    reply = s.recv(65536)
            except socket.timeout:
                continue
            if reply == msg:
                st["answered"] += 1
                st["bytes"] += len(msg)
            else:
                st["corrupted"] += 1
            break
        else:
            st["lost"] += 1
    print(json.dumps(st), flush=True)


main()
