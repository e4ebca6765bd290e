"""What TLS 1.3 costs a deltabkp connection: handshakes per second, bytes per handshake, and
bulk throughput, TLS against ``--insecure-plaintext`` in the same run, on 127.0.0.1.

    python benchmarks/bench_tls.py [--connections 200] [--mib 256]

One process, real sockets, the real ``net.connect`` / ``net.accept`` (TLS, then the key
handshake); the bulk test streams ``delta-chunk`` frames of 256 KiB from an agent-role
responder, as a backup does.  Figures only: nothing is asserted (loopback has no network
latency, so the handshake figure is CPU, the part TLS adds).
"""

from __future__ import annotations

import argparse
import functools
import time

import trio

from deltabkp import net
from deltabkp import protocol as p

KEY = b"bench key, 32 bytes long........"
TLS = net.TlsSettings()
PLAIN = net.TlsSettings(plaintext=True)


async def _server(nursery: trio.Nursery, tls: net.TlsSettings, mib: int) -> net.Address:
    chunk = p.DeltaChunk(b"\xa5" * p.MAX_CHUNK)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            chan = await net.accept(stream, key=KEY, role="agent", roles=("server",), tls=tls)
            msg = await chan.receive()
            if isinstance(msg, p.BackupRequest):
                for _ in range(mib * (1 << 20) // p.MAX_CHUNK):
                    await chan.send(chunk)
                await chan.send(p.BackupDone(b"\0" * 32, 0, 0, (), ()))
            else:
                await chan.send(p.Pong({}))
            await chan.next_request(5)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return net.Address("127.0.0.1", listeners[0].socket.getsockname()[1])


async def _measure(tls: net.TlsSettings, connections: int, mib: int) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        addr = await _server(nursery, tls, mib)
        sent = received = 0
        t0 = time.perf_counter()
        for _ in range(connections):
            async with await net.connect(addr, key=KEY, role="server", tls=tls) as chan:
                sent, received = chan.bytes_sent, chan.bytes_received
                await chan.send(p.Ping())
                await chan.receive_a(p.Pong)
        per_conn = (time.perf_counter() - t0) / connections
        t0 = time.perf_counter()
        async with await net.connect(addr, key=KEY, role="server", tls=tls) as chan:
            await chan.send(p.BackupRequest("/bench", None, ()))
            n = 0
            while isinstance(msg := await chan.receive(timeout=60), p.DeltaChunk):
                n += len(msg.data)
            wire = chan.bytes_received
        secs = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return {"conn_ms": per_conn * 1000, "handshake_bytes": sent + received,
            "mib_s": n / secs / (1 << 20), "overhead": wire / n - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    results = {name: trio.run(_measure, tls, args.connections, args.mib)
               for name, tls in (("plaintext", PLAIN), ("tls1.3", TLS))}
    print(f"{'':10} {'connect+ping ms':>16} {'handshake bytes':>16} {'bulk MiB/s':>11} {'wire overhead':>14}")
    for name, r in results.items():
        print(f"{name:10} {r['conn_ms']:16.2f} {r['handshake_bytes']:16.0f} {r['mib_s']:11.1f} "
              f"{100 * r['overhead']:13.2f}%")
    t, pl = results["tls1.3"], results["plaintext"]
    print(f"TLS/plaintext: connect {t['conn_ms'] / pl['conn_ms']:.1f}x, bulk throughput "
          f"{t['mib_s'] / pl['mib_s']:.2f}x")


if __name__ == "__main__":
    main()
