#!/usr/bin/env python3
"""Connection burst: N clients connect at the same instant; how many get the NBD greeting.

What many nodes do when their server comes back (every node's agent reconnects at once), and
what made many_nodes.py's 384-node runs hang: for each server and count, the server starts as
many_nodes.py starts it (netswapd with swap.max_nodes = N), N non-blocking connects go out
back to back, and each waits for the server's first 18 bytes (the NBD greeting, which the
server sends unasked). Printed: how many were greeted, when the half and the last arrived, and
how many connections the kernel dropped at a full listen queue meanwhile (TcpExt
ListenOverflows). A client whose final ACK is dropped there believes it is connected and
waits, so a dropped connection is not retried by TCP: the client's own timeout must notice.

    python3 bench/connect_burst.py                      # 128,256,384; netswapd and nbdkit
    python3 bench/connect_burst.py --counts 384 --servers netswapd --wait 30

Standard library only; nbdkit must be installed for its rows.
"""

from __future__ import annotations

import argparse
import selectors
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fio_matrix import NBD_MAGIC, reap_orphans, set_child_subreaper  # noqa: E402
from many_nodes import NodesServer, listen_overflows, use_this_checkout  # noqa: E402


def burst(server: NodesServer, count: int, wait: float) -> dict:
    """`count` connects at once to the running server; greetings within `wait` seconds."""
    selector = selectors.DefaultSelector()
    socks = []
    before = listen_overflows()
    started = time.monotonic()
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", server.port))
            except BlockingIOError:
                pass
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        greeted, times = 0, []
        while len(times) < count and time.monotonic() - started < wait:
            for key, _ in selector.select(0.2):
                try:
                    data = key.fileobj.recv(18)
                except OSError:
                    data = b""
                selector.unregister(key.fileobj)
                times.append(time.monotonic() - started)
                if data.startswith(NBD_MAGIC):
                    greeted += 1
        return {"count": count, "greeted": greeted, "answered": len(times),
                "half_s": sorted(times)[count // 2 - 1] if len(times) >= count // 2 else None,
                "last_s": max(times) if len(times) == count else None,
                "overflows": listen_overflows() - before}
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="128,256,384", help="connections per burst")
    p.add_argument("--servers", default="netswapd,nbdkit")
    p.add_argument("--wait", type=float, default=15.0,
                   help="seconds each burst waits for its greetings (15)")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    servers = args.servers.split(",")
    if "netswapd" in servers:
        print(f"netswap from {use_this_checkout()}")
    print(f"somaxconn {Path('/proc/sys/net/core/somaxconn').read_text().strip()}, "
          f"tcp_syncookies {Path('/proc/sys/net/ipv4/tcp_syncookies').read_text().strip()}")
    set_child_subreaper()
    print("| server | connections | greeted | half greeted by | all by | listen-queue drops |")
    print("|---|---:|---:|---:|---:|---:|")
    status = 0
    for count in counts:
        for name in servers:
            tmp = Path(tempfile.mkdtemp(prefix="netswap-connect-burst-", dir=args.dir))
            image = tmp / "nodes.img"
            with open(image, "wb") as f:
                f.truncate(count << 20)
            server = NodesServer(name=name, image=image, size=count << 20, workdir=tmp,
                                 workers=8, netswapd_log_level="warning", nodes=count,
                                 node_size=1 << 20)
            try:
                server.start()
                time.sleep(1)  # past start-up: the pool faulted in, every thread idle
                r = burst(server, count, args.wait)
            except (RuntimeError, KeyboardInterrupt) as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                status = 1
                if isinstance(exc, KeyboardInterrupt):
                    return 130
                continue
            finally:
                server.stop()
                reap_orphans(1)
                shutil.rmtree(tmp, ignore_errors=True)
            half = "n/a" if r["half_s"] is None else f"{r['half_s']:.2f} s"
            last = f"not within {args.wait:g} s" if r["last_s"] is None else f"{r['last_s']:.2f} s"
            print(f"| {name} | {count} | {r['greeted']} | {half} | {last} | {r['overflows']} |",
                  flush=True)
            if r["greeted"] < count:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
