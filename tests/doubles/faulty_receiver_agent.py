"""A pagestream agent whose receiver corrupts one page after the final round.

What a bad write or a memory error on the target would leave behind: the stream's
digest must catch it and the VM stay on the source. :class:`CorruptingReceiver`
is the real :class:`~migrate.pagestream.receiver.PageReceiver` that, once the
final round is applied and before it reports ``applied``, flips bits in the last
data page it wrote. It reports that page as a ``fault`` event and on stderr (the
agent's log): :func:`corrupted_pages` reads it back.

Run as the agent of a migration with ``PagestreamOptions(agent_module=MODULE)``:
the real agent's :func:`~migrate.pagestream.agent.main` (both roles), with this
receiver. The repository root must be importable there (``PYTHONPATH``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Final

import numpy as np

from migrate.pagestream.agent import main
from migrate.pagestream.protocol import PageBatch, RoundEnd
from migrate.pagestream.receiver import PageReceiver, _Round

MODULE: Final = "tests.doubles.faulty_receiver_agent"
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
_LOG_LINE: Final = "faulty receiver: flipped bits in page"


class CorruptingReceiver(PageReceiver):
    last_data_page: int | None = None

    def _apply(self, batch: PageBatch) -> None:
        super()._apply(batch)
        if batch.rows is not None:
            extents = batch.extents
            self.last_data_page = int(extents.starts[-1] + extents.counts[-1]) - 1

    def _check_round(self, end: RoundEnd, got: _Round) -> None:
        super()._check_round(end, got)
        if end.final:
            self._corrupt()

    def _corrupt(self) -> None:
        page = self.last_data_page if self.last_data_page is not None else 0
        self.ram.pages()[page, 100] ^= np.uint64(0xDEADBEEF)
        self.emit("fault", {"page": page, "what": "flipped bits in word 100 after apply"})
        print(f"{_LOG_LINE} {page}", file=sys.stderr, flush=True)


def pythonpath_with_repo() -> str:
    """``PYTHONPATH`` for agent processes that must import :data:`MODULE`."""
    return os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))


def corrupted_pages(receiver_log: Path) -> list[int]:
    """The pages a :class:`CorruptingReceiver` agent corrupted, from its stderr log."""
    pattern = re.compile(rf"^{re.escape(_LOG_LINE)} (\d+)$", re.MULTILINE)
    return [int(page) for page in pattern.findall(receiver_log.read_text())]


if __name__ == "__main__":
    sys.exit(main(receiver_type=CorruptingReceiver))
