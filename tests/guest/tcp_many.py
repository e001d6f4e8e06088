"""Guest side of the concurrency test: N TCP connections to an echo server, all open at
once (a barrier holds them until every one is connected), each sending a distinct
message of SIZE+i bytes and reading it back.

    tcp_many.py HOST PORT N SIZE

Prints one JSON object: connections, ok, mismatched, errors (list of reprs).
"""
import asyncio
import hashlib
import json
import sys


async def one(host, port, i, size, barrier):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    except BaseException:
        await barrier.abort()  # one failed connect must not leave the others waiting
        raise
    try:
        await asyncio.wait_for(barrier.wait(), 60)
        seed = hashlib.sha256(b"conn%d" % i).digest()
        msg = (seed * ((size + i) // 32 + 1))[: size + i]
        writer.write(msg)
        got = await reader.readexactly(len(msg))
        return got == msg
    finally:
        writer.close()
        await writer.wait_closed()


async def main():
    host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    barrier = asyncio.Barrier(n)
    tasks = [one(host, port, i, size, barrier) for i in range(n)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    print(
        json.dumps(
            dict(
                connections=n,
                ok=sum(r is True for r in results),
                mismatched=sum(r is False for r in results),
                errors=[repr(r) for r in results if isinstance(r, BaseException)][:10],
            )
        ),
        flush=True,
    )


asyncio.run(main())
