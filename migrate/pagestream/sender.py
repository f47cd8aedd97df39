"""The sending end: sweep source RAM for dirty pages, capture, compress, send.

Runs inside the source-side agent process (plain threads and a blocking socket:
this is the data plane, there is no event loop to protect). A round is a *sweep*:
the driving thread scans RAM range by range (the only thread touching the
tracker), captures each range's dirty pages in batches and hands them to a zstd
pool (zstd releases the GIL, so batches compress in parallel); a writer thread
sends the finished frames in order, which is where a slow link pushes back. So
scanning the next range overlaps sending the last one: a round costs about
max(scan, send), not their sum, and so does the final round in the downtime.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

import numpy as np
import numpy.typing as npt

from dirtytrack.bitmap import Bitmap, Extent
from dirtytrack.digest import ram_digest
from dirtytrack.ram import PAGE_SIZE, RamMapping
from dirtytrack.rate import DirtyRateEstimator
from dirtytrack.trackers import Baseline, ProcFS, Tracker, TrackerKind, choose_tracker
from migrate.errors import ConfigError, StreamError
from migrate.pagestream.protocol import (
    EncodedBatch,
    Hello,
    RoundEnd,
    encode_digest,
    encode_hello,
    encode_pages,
    encode_round_end,
)
from migrate.pagestream.tuning import CompressionTuner, PipelineSample, level_label
from migrate.tls import NodeCredentials, client_context

#: pagestream's tracker preference: kernel bits first (no scan), then the shadow
#: diff, whose scan runs on several threads (numpy releases the GIL: ~21 GB/s on
#: two cores here against ~14 GB/s for page digests, which hold the GIL), then page
#: digests when the host cannot spare a copy of guest RAM. Every round and the
#: downtime itself pay one full scan, so scan speed is what matters.
PAGESTREAM_PREFERENCE: Final = (
    TrackerKind.SOFT_DIRTY,
    TrackerKind.SHADOW_DIFF,
    TrackerKind.PAGE_DIGESTS,
)
#: Share of the host's available memory a shadow copy of guest RAM may take.
SHADOW_MEMORY_SHARE: Final = 0.5
#: Highest zstd level of the final round (the VM is stopped while it runs).
FINAL_MAX_LEVEL: Final = 1
#: Pages per range of a sweep: 64 MiB, so sending one range overlaps scanning
#: the next while each tracker call still covers a lot of RAM.
SWEEP_PAGES: Final = 16384
#: 64 pages (256 KiB) per frame: big enough for zstd to find matches across pages
#: and to amortise per-frame overhead, small enough to pipeline.
DEFAULT_BATCH_PAGES: Final = 64


@dataclass(frozen=True)
class SenderConfig:
    """Where the source RAM is and where to send it.

    ``tracker`` is the preference order handed to :func:`choose_tracker`, with
    ``memory_budget_bytes`` for its tracking memory (None: half of the host's
    available memory) and ``scan_threads`` for the shadow diff; ``qemu_pid`` lets
    soft-dirty be tried; ``rate_limit_bytes_per_s`` caps the stream (None: as
    fast as the link and the compressor allow). ``tls`` runs the stream over
    mutual TLS with these (client) credentials; the receiver's certificate must
    name ``tls_hostname`` (None: ``host``).
    """

    ram_path: Path
    host: str
    port: int
    session: bytes
    tracker: tuple[TrackerKind, ...] = PAGESTREAM_PREFERENCE
    memory_budget_bytes: int | None = None
    scan_threads: int = 2
    qemu_pid: int | None = None
    batch_pages: int = DEFAULT_BATCH_PAGES
    max_threads: int = 2
    start_level: int | None = 1
    rate_limit_bytes_per_s: float | None = None
    connect_timeout_s: float = 10.0
    io_timeout_s: float = 60.0
    tls: NodeCredentials | None = None
    tls_hostname: str | None = None


@dataclass(frozen=True)
class RoundStats:
    """What one sweep found and sent.

    ``pages`` were found dirty and sent (``data_pages`` + ``zero_pages``). Byte
    counts: ``raw`` = non-zero page bytes, ``payload`` = what they became (zstd
    or raw), ``wire`` = every frame byte. Seconds: ``duration`` the whole sweep,
    ``scan`` and ``capture`` the driving thread's tracker calls, ``send_busy``
    the writer's time waiting on compression or the socket (the pipeline's
    throughput is ``pages / send_busy``). ``dirty_pages_per_s`` is the
    estimator's smoothed dirty rate (None on the first sweep, which runs against
    zero RAM).
    """

    round: int
    final: bool
    pages: int
    data_pages: int
    zero_pages: int
    raw_bytes: int
    payload_bytes: int
    wire_bytes: int
    duration_s: float
    scan_s: float
    capture_s: float
    compress_wait_s: float
    send_wait_s: float
    level: int | None
    threads: int
    batches_by_level: dict[str, int]
    dirty_pages_per_s: float | None = None
    working_set_pages: int | None = None

    @property
    def send_busy_s(self) -> float:
        return self.compress_wait_s + self.send_wait_s


@dataclass(frozen=True)
class DigestStats:
    chunks: int
    digest_s: float


@dataclass
class _Totals:
    pages: int = 0
    data_pages: int = 0
    zero_pages: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    scan_s: float = 0.0
    capture_s: float = 0.0
    compress_wait_s: float = 0.0
    send_wait_s: float = 0.0
    batches_by_level: dict[str, int] = field(default_factory=dict)


class _Writer:
    """Sends encoded batches in submission order from its own thread.

    :meth:`submit` blocks while more batches are in flight than the tuner's
    thread count allows (plus the one being sent). After a failure the writer
    keeps draining (cancelling) so the submitter never blocks for good, and
    :meth:`finish` re-raises the failure in the submitting thread.
    """

    def __init__(self, sender: PageSender, totals: _Totals) -> None:
        self._sender = sender
        self._totals = totals
        self._queue: queue.SimpleQueue[Future[EncodedBatch] | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._inflight = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pagestream-writer", daemon=True)
        self._thread.start()
        self._finished = False

    def submit(self, future: Future[EncodedBatch]) -> None:
        with self._room:
            while self._inflight > self._sender.tuner.setting.threads and self.error is None:
                self._room.wait()
            self._inflight += 1
        self._queue.put(future)
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait until everything submitted is sent; raise the writer's failure."""
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (future := self._queue.get()) is not None:
            try:
                if self.error is None:
                    self._send(future)
                else:
                    future.cancel()
            except BaseException as exc:  # noqa: BLE001 - handed to the submitter by finish()
                self.error = exc
            finally:
                with self._room:
                    self._inflight -= 1
                    self._room.notify_all()

    def _send(self, future: Future[EncodedBatch]) -> None:
        began = time.monotonic()
        encoded = future.result()
        waited = time.monotonic() - began
        began = time.monotonic()
        self._sender._send(encoded.frames)
        sent = time.monotonic() - began
        totals = self._totals
        totals.pages += encoded.data_pages + encoded.zero_pages
        totals.data_pages += encoded.data_pages
        totals.zero_pages += encoded.zero_pages
        totals.raw_bytes += encoded.raw_bytes
        totals.payload_bytes += encoded.payload_bytes
        totals.wire_bytes += encoded.wire_bytes
        totals.compress_wait_s += waited
        totals.send_wait_s += sent
        self._sender.tuner.observe(
            PipelineSample(encoded.raw_bytes, encoded.wire_bytes, waited, sent)
        )


class PageSender:
    """Owns the source RAM mapping, the tracker, the socket and the compressor pool.

    Build with :meth:`open`; close with :meth:`close` (or ``with``). Not
    thread-safe: one caller drives sweep → ... → sweep(final) → send_digest.
    """

    def __init__(
        self,
        config: SenderConfig,
        ram: RamMapping,
        tracker: Tracker,
        reason: str,
        sock: socket.socket,
    ) -> None:
        self.config = config
        self.ram = ram
        self.tracker = tracker
        self.tracker_reason = reason
        self.sock = sock
        self.tuner = CompressionTuner(
            max_threads=config.max_threads, start_level=config.start_level
        )
        self.rate = DirtyRateEstimator(tracker.page_count)
        self._pool = ThreadPoolExecutor(max_workers=config.max_threads, thread_name_prefix="zstd")
        self._round = 0
        self._last_sweep_start: float | None = None
        self._sent_bytes = 0
        self._started = time.monotonic()
        self.zero_at_start: int | None = None

    @classmethod
    def open(cls, config: SenderConfig) -> PageSender:
        """Map the RAM, pick the tracker, connect and send HELLO.

        Raises :class:`StreamError` (transport) if the receiver cannot be reached,
        :class:`~dirtytrack.errors.DirtyTrackError` if RAM or trackers fail.
        """
        ram = RamMapping(config.ram_path, populate=True)
        ram.open()
        try:
            budget = config.memory_budget_bytes
            if budget is None:
                available = ProcFS().mem_available_bytes()
                budget = None if available is None else int(available * SHADOW_MEMORY_SHARE)
            choice = choose_tracker(
                ram,
                preference=config.tracker,
                qemu_pid=config.qemu_pid,
                ram_path=config.ram_path,
                baseline=Baseline.ZERO,
                memory_budget_bytes=budget,
                scan_threads=config.scan_threads,
            )
            try:
                sock = socket.create_connection(
                    (config.host, config.port), timeout=config.connect_timeout_s
                )
            except OSError as exc:
                choice.tracker.close()
                raise StreamError(
                    f"cannot connect to the receiver at {config.host}:{config.port}: {exc}",
                    side="sender",
                    kind="transport",
                ) from exc
        except BaseException:
            ram.close()
            raise
        sock.settimeout(config.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.tls is not None:
            sock = _wrap_client(sock, config)
        sender = cls(config, ram, choice.tracker, choice.reason, sock)
        try:
            sender._send(encode_hello(Hello(PAGE_SIZE, ram.page_count, config.session)))
        except BaseException:
            sender.close()
            raise
        return sender

    def __enter__(self) -> PageSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def round(self) -> int:
        return self._round

    # --- the loop -----------------------------------------------------------------

    def sweep(self, final: bool = False) -> RoundStats:
        """One round: every page that differs from what the receiver holds, found
        range by range and sent while the next range is scanned; then END_ROUND.

        Raises :class:`StreamError` if the socket fails.
        """
        self._round += 1
        began = time.monotonic()
        totals = _Totals()
        found: list[npt.NDArray[np.int64]] = []
        batch = self.config.batch_pages
        writer = _Writer(self, totals)
        try:
            for first in range(0, self.tracker.page_count, SWEEP_PAGES):
                count = min(SWEEP_PAGES, self.tracker.page_count - first)
                scanned = time.monotonic()
                dirty = self.tracker.collect_range(Extent(first, count))
                totals.scan_s += time.monotonic() - scanned
                found.append(dirty)
                for start in range(0, len(dirty), batch):
                    numbers = dirty[start : start + batch]
                    captured = time.monotonic()
                    rows = self.tracker.capture_pages(numbers)
                    totals.capture_s += time.monotonic() - captured
                    level = self.tuner.setting.level
                    if final and level is not None and level > FINAL_MAX_LEVEL:
                        # The VM is stopped: latency beats ratio (levels above 1 cost
                        # several times the CPU for a few % fewer bytes).
                        level = FINAL_MAX_LEVEL
                    label = level_label(level)
                    totals.batches_by_level[label] = totals.batches_by_level.get(label, 0) + 1
                    writer.submit(
                        self._pool.submit(encode_pages, self._round, numbers, rows, level)
                    )
            writer.finish()
        finally:
            writer.close()
        end = RoundEnd(self._round, final, totals.pages, totals.data_pages, totals.zero_pages)
        frame = encode_round_end(end)
        self._send(frame)
        totals.wire_bytes += len(frame)
        if self.zero_at_start is None:
            self.zero_at_start = self.tracker.page_count - totals.pages
        estimate = None
        if self._last_sweep_start is not None:
            # A page found now was dirtied after its capture one sweep ago.
            dirty_all = Bitmap.from_indices(self.tracker.page_count, np.concatenate(found))
            estimate = self.rate.observe(dirty_all, start_s=self._last_sweep_start, end_s=began)
        self._last_sweep_start = began
        setting = self.tuner.setting
        return RoundStats(
            round=self._round,
            final=final,
            pages=totals.pages,
            data_pages=totals.data_pages,
            zero_pages=totals.zero_pages,
            raw_bytes=totals.raw_bytes,
            payload_bytes=totals.payload_bytes,
            wire_bytes=totals.wire_bytes,
            duration_s=time.monotonic() - began,
            scan_s=totals.scan_s,
            capture_s=totals.capture_s,
            compress_wait_s=totals.compress_wait_s,
            send_wait_s=totals.send_wait_s,
            level=setting.level,
            threads=setting.threads,
            batches_by_level=totals.batches_by_level,
            dirty_pages_per_s=estimate.pages_per_s_ewma if estimate else None,
            working_set_pages=estimate.working_set_pages if estimate else None,
        )

    def send_digest(self) -> DigestStats:
        """Send the digest of all source RAM and end the stream (call with the VM
        stopped, after the final round: then RAM, the tracker's baseline and the
        target agree)."""
        start = time.monotonic()
        digest = ram_digest(self.ram.buffer())
        self._send(encode_digest(self._round, digest))
        with contextlib.suppress(OSError):  # the receiver may have closed first
            self.sock.shutdown(socket.SHUT_WR)
        return DigestStats(chunks=len(digest.hashes), digest_s=time.monotonic() - start)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise StreamError(
                f"sending to the receiver failed: {exc.strerror or exc}",
                side="sender",
                kind="transport",
            ) from exc
        self._sent_bytes += len(data)
        limit = self.config.rate_limit_bytes_per_s
        if limit:
            # Pacing, not synchronisation: hold the average rate under the cap.
            ahead = self._sent_bytes / limit - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        """Stop the pool, close the socket, drop the tracker and unmap RAM."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self.sock.close()
        finally:
            self.tracker.close()
            self.ram.close()


def _wrap_client(sock: socket.socket, config: SenderConfig) -> socket.socket:
    """The TLS handshake as a client (closes ``sock`` and raises :class:`StreamError` on failure)."""
    assert config.tls is not None
    try:
        context = client_context(config.tls)
        return context.wrap_socket(sock, server_hostname=config.tls_hostname or config.host)
    except (OSError, ConfigError) as exc:
        sock.close()
        raise StreamError(
            f"TLS with the receiver at {config.host}:{config.port} failed: {exc}",
            side="sender",
            kind="transport",
        ) from exc


def find_mapping_pid(ram_path: Path, proc: Path = Path("/proc")) -> int | None:
    """The process that maps ``ram_path`` shared (QEMU), for the soft-dirty tracker.

    Scans ``/proc/*/maps``; None if no process (readable to us) maps it.
    """
    target = os.fspath(ram_path)
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with (entry / "maps").open() as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() == target and "s" in fields[1]:
                        return int(entry.name)
        except OSError:
            continue  # gone, or not ours to read
    return None
