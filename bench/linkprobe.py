"""One TCP stream across the lab's migration link, to measure what the link carries.

``python -m bench.linkprobe receive --bind ADDR --port P`` prints ``READY``, takes one
connection, reads it to the end and prints ``{"bytes": N, "seconds": S}`` (first to
last byte). ``python -m bench.linkprobe send --to ADDR --port P --seconds S`` writes
as fast as it can for S seconds. Each side runs in its host's namespace.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence

from migrate import cli_args

_CHUNK = 1 << 20


def receive(bind: str, port: int) -> int:
    with socket.create_server((bind, port)) as server:
        print("READY", flush=True)
        conn, _ = server.accept()
        with conn:
            buffer = bytearray(_CHUNK)
            total, first, last = 0, 0.0, 0.0
            while (n := conn.recv_into(buffer)) > 0:
                now = time.monotonic()
                if total == 0:
                    first = now
                total, last = total + n, now
    print(json.dumps({"bytes": total, "seconds": last - first}), flush=True)
    return 0


def send(to: str, port: int, seconds: float) -> int:
    payload = bytes(range(256)) * (_CHUNK // 256)  # not zeros: nothing on the way compresses
    with socket.create_connection((to, port), timeout=10) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linkprobe")
    sub = parser.add_subparsers(dest="mode", required=True)
    rx = sub.add_parser("receive")
    rx.add_argument("--bind", required=True)
    rx.add_argument("--port", type=cli_args.int_in(1, 65535), required=True)
    tx = sub.add_parser("send")
    tx.add_argument("--to", required=True)
    tx.add_argument("--port", type=cli_args.int_in(1, 65535), required=True)
    tx.add_argument("--seconds", type=cli_args.positive_float(3600), default=1.0)
    args = parser.parse_args(argv)
    if args.mode == "receive":
        return receive(args.bind, args.port)
    return send(args.to, args.port, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
