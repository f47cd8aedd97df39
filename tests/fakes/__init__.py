"""In-process stand-ins for the things the engine talks to, for fast unit tests."""

from tests.fakes.qmp import (
    DEFAULT,
    Call,
    Default,
    Delay,
    Entry,
    Fail,
    FakeQmp,
    FakeWorld,
    Hang,
    LoseReply,
    Reply,
    fake_pair,
)

__all__ = [
    "DEFAULT",
    "Call",
    "Default",
    "Delay",
    "Entry",
    "Fail",
    "FakeQmp",
    "FakeWorld",
    "Hang",
    "LoseReply",
    "Reply",
    "fake_pair",
]
