"""Guest-visible downtime: ICMP echo probes from the client namespace.

A probe process (``python -m lab.probe``, started inside the client namespace)
sends sequence-numbered ICMP echo requests at a fixed interval (1 ms by default) and
records each send time and each reply's kernel receive timestamp (``SO_TIMESTAMPNS``,
CLOCK_REALTIME — the clock QMP stamps events with, so both share one timeline).
Echo replies come from the guest kernel, so the figure does not depend on guest
userspace. The longest interval without replies during a migration is the downtime
a user of the guest sees.

:class:`NetworkProbe` runs that process from the engine; :class:`ProbeRecord` holds
what it measured and answers questions about a time window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from lab.errors import ProbeError
from migrate import cli_args
from migrate.deadline import within

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0
_PAYLOAD = struct.Struct("!QQ")  # sequence (64 bit), send time (ns)
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


# -- the probe process ------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, sent_ns: int) -> bytes:
    payload = _PAYLOAD.pack(seq, sent_ns)
    header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, csum, ident, seq & 0xFFFF) + payload


def _realtime_priority() -> None:
    # The probe sleeps almost all the time; real-time priority keeps its sends on
    # schedule while the two cores are busy with QEMU, so gaps are the guest's.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


def run_probe(target: str, interval_s: float, out: Path) -> int:
    """Probe ``target`` every ``interval_s`` until SIGTERM/SIGINT; save arrays to ``out``."""
    stop = False

    def _stop(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _realtime_priority()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    sent_seq: list[int] = []
    sent_ns: list[int] = []
    reply_seq: list[int] = []
    reply_ns: list[int] = []
    seq = 0
    interval_ns = int(interval_s * 1e9)
    next_send = time.monotonic_ns()
    print("PROBE STARTED", flush=True)
    while not stop:
        now = time.monotonic_ns()
        if now >= next_send:
            t = time.time_ns()
            with contextlib.suppress(BlockingIOError, OSError):
                sock.sendto(_echo_request(ident, seq, t), (target, 0))
                sent_seq.append(seq)
                sent_ns.append(t)
            seq += 1
            # Fixed schedule; after a stall resume from now instead of bursting.
            next_send = max(next_send + interval_ns, now)
            continue
        with contextlib.suppress(InterruptedError):
            select.select([sock], [], [], (next_send - now) / 1e9)
        while True:
            try:
                data, anc, _flags, addr = sock.recvmsg(256, 64)
            except (BlockingIOError, InterruptedError):
                break
            if addr[0] != target:
                continue
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if len(icmp) < 8 + _PAYLOAD.size or icmp[0] != _ICMP_ECHO_REPLY:
                continue
            if struct.unpack("!H", icmp[4:6])[0] != ident:
                continue
            rseq, _ = _PAYLOAD.unpack(icmp[8 : 8 + _PAYLOAD.size])
            stamp = time.time_ns()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    stamp = sec * 1_000_000_000 + nsec
            reply_seq.append(rseq)
            reply_ns.append(stamp)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        interval_ns=np.int64(interval_ns),
        sent_seq=np.array(sent_seq, dtype=np.int64),
        sent_ns=np.array(sent_ns, dtype=np.int64),
        reply_seq=np.array(reply_seq, dtype=np.int64),
        reply_ns=np.array(reply_ns, dtype=np.int64),
    )
    os.replace(tmp, out)
    print("PROBE DONE", flush=True)
    return 0


# -- analysis ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyGap:
    """The longest interval without replies inside a window (realtime seconds)."""

    start: float
    end: float
    lost: int

    @property
    def duration_ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass(frozen=True, eq=False)
class ProbeRecord:
    """Everything one probe run measured; times are realtime nanoseconds."""

    interval_ns: int
    sent_seq: npt.NDArray[np.int64]
    sent_ns: npt.NDArray[np.int64]
    reply_seq: npt.NDArray[np.int64]
    reply_ns: npt.NDArray[np.int64]

    @classmethod
    def load(cls, path: Path) -> ProbeRecord:
        with np.load(path) as data:
            return cls(
                interval_ns=int(data["interval_ns"]),
                sent_seq=data["sent_seq"],
                sent_ns=data["sent_ns"],
                reply_seq=data["reply_seq"],
                reply_ns=data["reply_ns"],
            )

    def _sorted_replies(self) -> npt.NDArray[np.int64]:
        return np.sort(self.reply_ns)

    def longest_gap(self, start: float, end: float) -> ReplyGap | None:
        """The longest gap between consecutive replies overlapping ``[start, end]``.

        The replies just before ``start`` and just after ``end`` bound the window, so a
        gap that spans the window's edges is measured whole. None without replies.
        """
        replies = self._sorted_replies()
        if len(replies) < 2:
            return None
        lo = max(0, int(np.searchsorted(replies, int(start * 1e9))) - 1)
        hi = min(len(replies), int(np.searchsorted(replies, int(end * 1e9), side="right")) + 1)
        window = replies[lo:hi]
        if len(window) < 2:
            return None
        gaps = np.diff(window)
        i = int(np.argmax(gaps))
        g_start, g_end = int(window[i]), int(window[i + 1])
        return ReplyGap(
            start=g_start / 1e9, end=g_end / 1e9, lost=self._lost_between(g_start, g_end)
        )

    def _lost_between(self, start_ns: int, end_ns: int) -> int:
        mask = (self.sent_ns > start_ns) & (self.sent_ns < end_ns)
        return int(np.count_nonzero(~np.isin(self.sent_seq[mask], self.reply_seq)))

    def lost(self, start: float, end: float) -> int:
        """Requests sent in ``[start, end]`` that got no reply."""
        mask = (self.sent_ns >= int(start * 1e9)) & (self.sent_ns <= int(end * 1e9))
        return int(np.count_nonzero(~np.isin(self.sent_seq[mask], self.reply_seq)))

    def sent(self, start: float, end: float) -> int:
        mask = (self.sent_ns >= int(start * 1e9)) & (self.sent_ns <= int(end * 1e9))
        return int(np.count_nonzero(mask))

    def max_send_gap_ms(self, start: float, end: float) -> float:
        """The probe's own worst scheduling gap in the window: its time resolution."""
        mask = (self.sent_ns >= int(start * 1e9)) & (self.sent_ns <= int(end * 1e9))
        sends = self.sent_ns[mask]
        return float(np.diff(sends).max() / 1e6) if len(sends) > 1 else float("nan")

    def first_reply_after(self, t: float) -> float | None:
        replies = self._sorted_replies()
        i = int(np.searchsorted(replies, int(t * 1e9), side="right"))
        return float(replies[i]) / 1e9 if i < len(replies) else None


# -- the engine's handle ---------------------------------------------------------------


class NetworkProbe:
    """Runs the probe process in ``netns`` against ``target``; an async context manager.

    ``record`` is available after the block exits (or after :meth:`stop`).
    """

    def __init__(self, target: str, netns: str | None, interval_s: float = 0.001) -> None:
        if interval_s <= 0:
            raise ProbeError(f"probe interval must be positive, not {interval_s}")
        self.target = target
        self.netns = netns
        self.interval_s = interval_s
        self._dir = Path(tempfile.mkdtemp(prefix="livemig-probe-"))
        self._out = self._dir / "probe.npz"
        self._proc: asyncio.subprocess.Process | None = None
        self.record: ProbeRecord | None = None

    async def __aenter__(self) -> NetworkProbe:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        argv = [sys.executable, "-m", "lab.probe", self.target,
                "--interval-ms", str(self.interval_s * 1e3), "--out", str(self._out)]  # fmt: skip
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        try:
            line = await within(self._proc.stdout.readline(), 10)
        except TimeoutError:
            line = b""
        if b"PROBE STARTED" not in line:
            await self.stop()
            raise ProbeError(
                f"network probe to {self.target} did not start: {line.decode().strip()}"
            )

    async def stop(self) -> ProbeRecord | None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    _, err = await within(proc.communicate(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    err = b"timed out"
                if self._out.exists():
                    self.record = ProbeRecord.load(self._out)
                elif self.record is None:
                    raise ProbeError(f"network probe left no record: {err.decode().strip()[-200:]}")
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.probe")
    parser.add_argument("target")
    parser.add_argument("--interval-ms", type=cli_args.positive_float(1000), default=1.0)
    parser.add_argument("--out", type=cli_args.path, required=True)
    args = parser.parse_args(argv)
    return run_probe(args.target, args.interval_ms / 1e3, args.out)


if __name__ == "__main__":
    sys.exit(main())
