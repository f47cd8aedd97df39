"""Sender and receiver over a real loopback socket, on RAM files; no QEMU.

The "guest" is this test writing into the source RAM file between rounds (and
while a round is being sent, from another thread).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtytrack.ram import WORDS_PER_PAGE, RamMapping
from dirtytrack.trackers import TrackerKind
from migrate.errors import StreamError
from migrate.pagestream.receiver import PageReceiver, ReceiverConfig
from migrate.pagestream.sender import SWEEP_PAGES, PageSender, SenderConfig, find_mapping_pid
from tests.doubles.faulty_receiver_agent import CorruptingReceiver

PAGES = 2048  # 8 MiB
SESSION = b"0123456789abcdef"


@dataclass
class Events:
    items: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((name, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [data for event, data in self.items if event == name]


def ram_file(path: Path, pages: int = PAGES, seed: int | None = 1) -> Path:
    data = np.zeros((pages, WORDS_PER_PAGE), dtype=np.uint64)
    if seed is not None:
        rng = np.random.default_rng(seed)
        filled = rng.random(pages) < 0.6
        data[filled] = rng.integers(0, 1 << 20, size=(int(filled.sum()), WORDS_PER_PAGE))
    path.write_bytes(data.tobytes())
    return path


@dataclass
class Rig:
    source: Path
    target: Path
    receiver: PageReceiver
    events: Events
    thread: threading.Thread
    errors: list[BaseException]

    def sender(self, **kwargs: Any) -> PageSender:
        config = SenderConfig(
            ram_path=self.source,
            host="127.0.0.1",
            port=self.receiver.port,
            session=SESSION,
            tracker=kwargs.pop("tracker", (TrackerKind.SHADOW_DIFF,)),
            **kwargs,
        )
        return PageSender.open(config)

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def start_receiver(
    tmp_path: Path,
    receiver_type: type[PageReceiver] = PageReceiver,
    target_pages: int = PAGES,
    source_pages: int = PAGES,
) -> Rig:
    source = ram_file(tmp_path / "source.ram", source_pages)
    target = ram_file(tmp_path / "target.ram", target_pages, seed=None)
    events = Events()
    receiver = receiver_type.bind(
        ReceiverConfig(
            ram_path=target,
            host="127.0.0.1",
            session=SESSION,
            accept_timeout_s=10,
        ),
        events,
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            receiver.run()
        except StreamError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return Rig(source, target, receiver, events, thread, errors)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    built = start_receiver(tmp_path)
    yield built
    built.receiver.close()
    built.join()


def guest_writes(path: Path, pages: list[int], value: int) -> None:
    with RamMapping(path, writable=True) as ram:
        words = ram.pages()
        for page in pages:
            words[page, :] = np.uint64(value)
        del words


def test_precopy_rounds_and_final_round_make_target_identical(rig: Rig) -> None:
    nonzero = int(_nonzero(rig.source).sum())
    with rig.sender(start_level=1) as sender:
        first = sender.sweep()
        assert first.round == 1 and first.pages == nonzero < PAGES  # zero pages skipped
        assert first.zero_pages == 0 and first.dirty_pages_per_s is None
        assert first.payload_bytes < first.raw_bytes  # small values compress
        assert first.scan_s > 0 and first.send_busy_s > 0
        # The guest keeps writing, also zeroing a page that held data.
        guest_writes(rig.source, [5, 6, 7, 1000], 0xABCDEF)
        guest_writes(rig.source, [int(np.flatnonzero(_nonzero(rig.source))[0])], 0)
        second = sender.sweep()
        assert second.pages == 5 and second.dirty_pages_per_s is not None
        assert second.zero_pages == 1 and second.data_pages == 4
        # Switchover: the guest is stopped; the final round and the digest.
        guest_writes(rig.source, [2047], 9)
        final = sender.sweep(final=True)
        assert final.pages == 1 and final.final
        sender.send_digest()
    rig.join()
    assert not rig.errors
    verified = rig.events.named("verified")
    assert verified and verified[0]["ok"] is True
    assert [e["round"] for e in rig.events.named("round")] == [1, 2, 3]
    assert rig.events.named("applied")[0]["round"] == 3
    assert rig.source.read_bytes() == rig.target.read_bytes()


def test_a_sweep_spanning_many_ranges_sends_every_page(tmp_path: Path) -> None:
    """RAM larger than one sweep range: pages from every range arrive."""
    pages = SWEEP_PAGES * 2 + 100
    rig = start_receiver(tmp_path, target_pages=pages, source_pages=pages)
    try:
        with rig.sender(batch_pages=37) as sender:
            first = sender.sweep()
            guest_writes(rig.source, [0, SWEEP_PAGES, pages - 1], 3)
            assert sender.sweep().pages == 3
            sender.sweep(final=True)
            sender.send_digest()
        rig.join()
    finally:
        rig.receiver.close()
    assert first.pages > SWEEP_PAGES
    assert rig.events.named("verified")[0]["ok"] is True
    assert rig.source.read_bytes() == rig.target.read_bytes()


def _nonzero(path: Path) -> np.ndarray[Any, np.dtype[np.bool_]]:
    with RamMapping(path) as ram:
        return np.asarray(ram.pages().any(axis=1)).copy()


def test_writes_racing_the_sender_are_caught_by_later_rounds(rig: Rig) -> None:
    stop = threading.Event()

    def guest() -> None:
        value = 1
        rng = np.random.default_rng(9)
        with RamMapping(rig.source, writable=True) as ram:
            words = ram.pages()
            while not stop.is_set():
                words[int(rng.integers(0, PAGES)), int(rng.integers(0, 512))] = value
                value += 1
            del words

    writer = threading.Thread(target=guest)
    writer.start()
    try:
        with rig.sender(tracker=(TrackerKind.PAGE_DIGESTS,)) as sender:
            for _ in range(4):
                sender.sweep()
            stop.set()
            writer.join()
            sender.sweep(final=True)
            sender.send_digest()
    finally:
        stop.set()
        writer.join()
    rig.join()
    assert rig.events.named("verified")[0]["ok"] is True
    assert rig.source.read_bytes() == rig.target.read_bytes()


def test_corrupted_page_in_the_receiver_fails_the_digest(tmp_path: Path) -> None:
    rig = start_receiver(tmp_path, CorruptingReceiver)
    try:
        with rig.sender() as sender:
            sender.sweep(final=True)
            sender.send_digest()
        rig.join()
    finally:
        rig.receiver.close()
    fault = rig.events.named("fault")[0]
    verified = rig.events.named("verified")[0]
    assert verified["ok"] is False and verified["differing_chunks"] == 1
    named = verified["named"][0]
    assert named["first_page"] <= fault["page"] <= named["last_page"]


def test_receiver_refuses_a_different_ram_size(tmp_path: Path) -> None:
    rig = start_receiver(tmp_path, target_pages=PAGES // 2)
    try:
        with rig.sender() as sender:
            rig.join()
            with pytest.raises(StreamError) as info:
                for _ in range(3):
                    sender.sweep()
            assert info.value.kind == "transport"
    finally:
        rig.receiver.close()
    assert "source RAM has 2048 pages, target RAM 1024" in str(rig.errors[0])


def test_receiver_refuses_another_session(rig: Rig) -> None:
    config = SenderConfig(
        ram_path=rig.source, host="127.0.0.1", port=rig.receiver.port, session=b"x" * 16
    )
    with PageSender.open(config):
        rig.join()
    assert "another migration" in str(rig.errors[0])


def test_stream_ending_early_is_reported(rig: Rig) -> None:
    with rig.sender() as sender:
        sender.sweep()
    rig.join()
    assert "ended before the final digest" in str(rig.errors[0])


def test_nothing_listening_is_a_transport_error(tmp_path: Path) -> None:
    source = ram_file(tmp_path / "source.ram")
    config = SenderConfig(ram_path=source, host="127.0.0.1", port=1, session=SESSION)
    with pytest.raises(StreamError) as info:
        PageSender.open(config)
    assert info.value.kind == "transport" and "cannot connect" in str(info.value)


def test_rate_limit_holds_the_average(rig: Rig) -> None:
    with rig.sender(rate_limit_bytes_per_s=20e6, start_level=None) as sender:
        stats = sender.sweep()
        # 60 % of 8 MiB raw at 20 MB/s: at least ~0.2 s (a lower bound, never tight).
        assert stats.wire_bytes > 4e6 and stats.duration_s >= stats.wire_bytes / 20e6 * 0.9
        sender.sweep(final=True)
        sender.send_digest()
    rig.join()
    assert rig.events.named("verified")[0]["ok"] is True


def test_prepared_receiver_clears_a_dirty_target(tmp_path: Path) -> None:
    rig = start_receiver(tmp_path)
    rig.receiver.close()
    rig.join()
    source = ram_file(tmp_path / "source2.ram")
    target = ram_file(tmp_path / "target2.ram", seed=4)  # garbage left in target RAM
    events = Events()
    receiver = PageReceiver.bind(
        ReceiverConfig(ram_path=target, host="127.0.0.1", session=SESSION, accept_timeout_s=10),
        events,
    )
    thread = threading.Thread(target=receiver.run, daemon=True)
    thread.start()
    try:
        config = SenderConfig(
            ram_path=source, host="127.0.0.1", port=receiver.port, session=SESSION
        )
        with PageSender.open(config) as sender:
            sender.sweep(final=True)
            sender.send_digest()
        thread.join(timeout=30)
    finally:
        receiver.close()
    assert events.named("prepared")[0]["cleared_pages"] > 0
    assert events.named("verified")[0]["ok"] is True
    assert source.read_bytes() == target.read_bytes()


def test_find_mapping_pid_finds_a_shared_mapping(tmp_path: Path) -> None:
    path = ram_file(tmp_path / "mapped.ram", pages=4)
    assert find_mapping_pid(path) is None  # we skip ourselves; nobody else maps it
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "maps").write_text(
        f"7f0000000000-7f0000004000 rw-s 00000000 00:1a 99 {path}\n"
    )
    (proc / "4343").mkdir()
    (proc / "4343" / "maps").write_text(
        f"7f0000000000-7f0000004000 rw-p 00000000 00:1a 99 {path}\n"
    )
    assert find_mapping_pid(path, proc) == 4242
    assert base64.b64decode(base64.b64encode(SESSION)) == SESSION
