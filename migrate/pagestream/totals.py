"""pagestream's running figures: the sender's rounds added up, and the report's StreamStats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from migrate.pagestream.tuning import level_label
from migrate.report import StreamStats


@dataclass
class StreamTotals:
    """The page stream so far, from the sender's round statistics (``sweep``/``final``)."""

    rounds: int = 0
    pages_sent: int = 0
    zero_pages_sent: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    stream_bytes: int = 0
    scan_ms: float = 0.0
    batches_by_level: dict[str, int] = field(default_factory=dict)
    final_level: str = ""
    threads: int = 1
    final_round_pages: int = 0
    final_scan_ms: float = 0.0
    final_round_ms: float = 0.0
    zero_pages_skipped: int = 0
    digest: str = "not received"
    last_mbps: float = 0.0

    def add_round(self, stats: dict[str, Any], ram_pages: int) -> None:
        """Add one round; ``ram_pages`` is the size of guest RAM in pages."""
        self.rounds += 1
        self.pages_sent += int(stats["data_pages"])
        self.zero_pages_sent += int(stats["zero_pages"])
        self.raw_bytes += int(stats["raw_bytes"])
        self.payload_bytes += int(stats["payload_bytes"])
        self.stream_bytes += int(stats["wire_bytes"])
        self.threads = max(self.threads, int(stats["threads"]))
        for label, batches in dict(stats["batches_by_level"]).items():
            self.batches_by_level[label] = self.batches_by_level.get(label, 0) + int(batches)
        self.final_level = level_label(stats["level"])
        duration = float(stats["duration_s"])
        if duration > 0:
            self.last_mbps = int(stats["wire_bytes"]) * 8 / duration / 1e6
        self.scan_ms += float(stats["scan_s"]) * 1e3
        if self.rounds == 1:
            # The first sweep runs against zero RAM: what it did not find is zero.
            self.zero_pages_skipped = ram_pages - int(stats["pages"])

    def add_final_round(self, stats: dict[str, Any], ram_pages: int) -> None:
        """Add the final round (the VM stopped), also kept on its own."""
        self.add_round(stats, ram_pages)
        self.final_round_pages = int(stats["pages"])
        self.final_scan_ms = float(stats["scan_s"]) * 1e3
        self.final_round_ms = float(stats["duration_s"]) * 1e3

    def stats(
        self,
        tracker: str,
        tracker_reason: str,
        device_state_bytes: int,
        switchover_ms: dict[str, float],
    ) -> StreamStats:
        """The report's figures; see :class:`~migrate.report.StreamStats`."""
        return StreamStats(
            tracker=tracker,
            tracker_reason=tracker_reason,
            rounds=self.rounds,
            pages_sent=self.pages_sent,
            zero_pages_sent=self.zero_pages_sent,
            zero_pages_skipped=self.zero_pages_skipped,
            raw_bytes=self.raw_bytes,
            payload_bytes=self.payload_bytes,
            stream_bytes=self.stream_bytes,
            device_state_bytes=device_state_bytes,
            compression_ratio=(self.raw_bytes / self.payload_bytes if self.payload_bytes else 1.0),
            zstd_batches=dict(self.batches_by_level),
            final_level=self.final_level,
            compress_threads=self.threads,
            scan_ms_total=self.scan_ms,
            final_round_pages=self.final_round_pages,
            final_scan_ms=self.final_scan_ms,
            final_round_ms=self.final_round_ms,
            digest=self.digest,
            switchover_ms=switchover_ms,
        )
