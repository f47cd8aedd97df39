"""The strategies and policies the benchmark can ask the engine for.

Policies come from the engine (the ``livemig`` policy, and the peer presets of
:mod:`migrate.presets` once that module exists); the benchmark never defines its
own. :func:`availability` tells which scenarios of a suite this build can run.
"""

from __future__ import annotations

from bench.errors import SuiteError
from bench.scenario import LIVEMIG_POLICY, Availability
from migrate.engine import STRATEGIES
from migrate.policy import Policy


def policy_names() -> frozenset[str]:
    """Names of the policies this build knows."""
    return frozenset({LIVEMIG_POLICY})


def policy_named(name: str) -> Policy:
    """The engine's policy called ``name``. Raises :class:`SuiteError` if unknown."""
    if name == LIVEMIG_POLICY:
        return Policy()
    raise SuiteError(f"unknown policy {name!r}", tuple(sorted(policy_names())))


def availability() -> Availability:
    return Availability(strategies=frozenset(STRATEGIES), policies=policy_names())
