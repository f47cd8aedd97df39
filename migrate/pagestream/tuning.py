"""How hard to compress: zstd level and worker threads, adapted to the link.

The sender is a pipeline: capture → compress (worker threads) → send (socket).
Whichever stage the sender waits on is the bottleneck. Waiting on compression
means the link is faster than the compressor: use more threads, then lower
levels, down to sending raw pages. Waiting on the socket means the link is the
bottleneck and CPU is idle: raise the level to put fewer bytes on the wire.
Pure logic, no clocks: the sender feeds measured waits in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: The level ladder, fastest first. ``None`` sends pages raw (no zstd at all).
#: Measured here on one core (bench/trackers.py's synthetic page mix, 256 KiB
#: batches): -7 ≈ 1.0 GB/s at ratio 2.1, 1 ≈ 0.76 GB/s at 2.2, 3 ≈ 0.67 GB/s at
#: 2.3; level 6 trades more CPU for a little more ratio on slow links.
LEVELS: Final[tuple[int | None, ...]] = (None, -7, -3, -1, 1, 3, 6)


@dataclass(frozen=True)
class CompressionSetting:
    """zstd level (None: raw) and how many batches compress in parallel."""

    level: int | None
    threads: int


@dataclass(frozen=True)
class PipelineSample:
    """What one batch cost the sender (seconds spent waiting, bytes moved)."""

    raw_bytes: int
    wire_bytes: int
    compress_wait_s: float
    send_wait_s: float


@dataclass
class _Window:
    batches: int = 0
    compress_wait_s: float = 0.0
    send_wait_s: float = 0.0


@dataclass
class CompressionTuner:
    """Moves the :class:`CompressionSetting` one step at a time every ``window`` batches.

    A window is *compress-bound* when the sender waited on compression more than
    ``bias`` times as long as on the socket, *link-bound* in the opposite case,
    and balanced otherwise. Only ``patience`` windows in a row pointing the same
    way move the setting (one step), so that it settles instead of flapping
    between neighbours. Compress-bound adds a thread (up to ``max_threads``), then
    steps the level down; link-bound steps the level up. Raises :class:`ValueError` for a start
    level not on the ladder, ``max_threads`` < 1 or ``patience`` < 1.
    """

    max_threads: int
    start_level: int | None = 1
    window: int = 8
    bias: float = 2.0
    patience: int = 2
    levels: tuple[int | None, ...] = LEVELS
    history: list[CompressionSetting] = field(default_factory=list)
    _index: int = field(init=False, default=0)
    _threads: int = field(init=False, default=1)
    _current: _Window = field(init=False, default_factory=_Window)
    _leaning: int = field(init=False, default=0)  # +n: n link-bound windows, -n: compress-bound

    def __post_init__(self) -> None:
        if self.max_threads < 1 or self.patience < 1:
            raise ValueError(
                f"max_threads and patience must be >= 1, got {self.max_threads}, {self.patience}"
            )
        if self.start_level not in self.levels:
            raise ValueError(f"start level {self.start_level} is not one of {self.levels}")
        self._index = self.levels.index(self.start_level)
        self.history.append(self.setting)

    @property
    def setting(self) -> CompressionSetting:
        return CompressionSetting(self.levels[self._index], self._threads)

    def observe(self, sample: PipelineSample) -> CompressionSetting:
        """Add one batch; returns the setting for the next batches."""
        window = self._current
        window.batches += 1
        window.compress_wait_s += sample.compress_wait_s
        window.send_wait_s += sample.send_wait_s
        if window.batches < self.window:
            return self.setting
        self._current = _Window()
        if window.compress_wait_s > self.bias * window.send_wait_s:
            self._leaning = min(self._leaning, 0) - 1
        elif window.send_wait_s > self.bias * window.compress_wait_s:
            self._leaning = max(self._leaning, 0) + 1
        else:
            self._leaning = 0
        if abs(self._leaning) < self.patience:
            return self.setting
        before = self.setting
        if self._leaning < 0:
            if self._threads < self.max_threads:
                self._threads += 1
            elif self._index > 0:
                self._index -= 1
        elif self._index < len(self.levels) - 1:
            self._index += 1
        self._leaning = 0
        after = self.setting
        if after != before:
            self.history.append(after)
        return after


def level_label(level: int | None) -> str:
    """``"raw"`` or the zstd level as text (report keys)."""
    return "raw" if level is None else str(level)
