import pytest

from migrate.phase import TRANSITIONS, Phase, PhaseError, PhaseTracker


def test_normal_path_reports_each_change() -> None:
    seen: list[tuple[Phase, Phase]] = []
    tracker = PhaseTracker(lambda a, b: seen.append((a, b)))
    for phase in (Phase.PRECOPY, Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMPLETED):
        tracker.advance(phase)
    assert seen == [
        (Phase.SETUP, Phase.PRECOPY),
        (Phase.PRECOPY, Phase.SWITCHOVER),
        (Phase.SWITCHOVER, Phase.COMPLETED),
    ]


def test_terminal_phases_are_final() -> None:
    for end in (Phase.COMPLETED, Phase.ABORTED, Phase.FAILED):
        assert end.terminal and TRANSITIONS[end] == frozenset()
    tracker = PhaseTracker()
    tracker.advance(Phase.FAILED)
    with pytest.raises(PhaseError, match="failed -> precopy"):
        tracker.advance(Phase.PRECOPY)


def test_illegal_jump_is_refused() -> None:
    with pytest.raises(PhaseError):
        PhaseTracker().advance(Phase.COMPLETED)


def test_every_phase_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase, targets in TRANSITIONS.items():
        if not phase.terminal:
            assert {Phase.ABORTED, Phase.FAILED} <= targets
