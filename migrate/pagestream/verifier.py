"""The integrity check before ``cont``: the stream's digest, then (optionally) the engine's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from migrate.integrity import IntegrityResult, RamCheck, RamComparison
from migrate.pagestream.control import AgentChannel
from migrate.report import Integrity


class StreamVerifier:
    """The receiver's ``verified`` verdict (target RAM after the final round against
    the source at stop), then, with ``comparison``, the engine's own comparison of
    both RAM files. A :class:`~migrate.safety.RamVerifier` for
    :func:`~migrate.safety.finish_on_target`; ``stream_ok`` is the digest's verdict
    once known."""

    def __init__(
        self,
        receiver: AgentChannel,
        comparison: RamCheck | None,
        files: tuple[Path, Path],
        timeout_s: float,
    ) -> None:
        self.receiver = receiver
        self.comparison = comparison
        self.files = files
        self.timeout_s = timeout_s
        self.stream_ok: bool | None = None

    async def compare(self, repair: bool = False) -> IntegrityResult:
        verdict = await self.receiver.wait_event("verified", self.timeout_s)
        self.stream_ok = bool(verdict["ok"])
        mib = int(verdict["ram_bytes"]) >> 20
        if not self.stream_ok:
            ranges = ", ".join(
                f"pages {chunk['first_page']}-{chunk['last_page']}" for chunk in verdict["named"]
            )
            detail = (
                f"pagestream digest mismatch: {verdict['differing_chunks']} of "
                f"{verdict['chunks']} chunks of target RAM differ from the source at stop "
                f"({ranges})"
            )
            exact = await self._name_pages()
            if exact is None:
                return IntegrityResult(Integrity.FAILED, detail)
            return IntegrityResult(
                Integrity.FAILED, f"{detail}; engine comparison: {exact.detail}",
                exact.differing_pages,
            )  # fmt: skip
        if self.comparison is None:
            return IntegrityResult(
                Integrity.OK,
                f"{mib} MiB of RAM identical (pagestream digest: source at stop against "
                "target after the final round, xxh3)",
            )
        result = await self.comparison.compare(repair=repair)
        return dataclasses.replace(result, detail=f"{result.detail}; pagestream digest ok")

    async def _name_pages(self) -> IntegrityResult | None:
        """The engine's comparison, to name the differing pages (never repairs: a
        stream that delivered wrong pages is not trusted); None where the engine
        cannot map both files."""
        if self.comparison is not None:
            return await self.comparison.compare(repair=False)
        comparison = RamComparison(*self.files)
        try:
            result = await comparison.compare(repair=False)
        finally:
            await comparison.close()
        return None if result.integrity is Integrity.UNCHECKED else result
