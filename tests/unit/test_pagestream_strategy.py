"""The pagestream strategy's pure parts: where the page stream goes."""

from __future__ import annotations

import pytest

from migrate.engine import STRATEGIES, strategy_for
from migrate.errors import ConfigError
from migrate.pagestream.options import PagestreamOptions, stream_host
from migrate.pagestream.strategy import PagestreamStrategy


@pytest.mark.parametrize(
    ("uri", "host"),
    [
        ("tcp:198.19.0.2:4444", "198.19.0.2"),
        ("tcp:localhost:1", "localhost"),
        ("tcp:[fd00::2]:4444", "fd00::2"),
    ],
)
def test_stream_host_is_the_migration_uris_host(uri: str, host: str) -> None:
    assert stream_host(uri) == host


@pytest.mark.parametrize("uri", ["unix:/run/mig.sock", "tcp:host", "exec:cat", "tcp::4444"])
def test_non_tcp_uris_are_refused_with_the_reason(uri: str) -> None:
    with pytest.raises(ConfigError, match="pagestream needs a tcp:HOST:PORT migration URI"):
        stream_host(uri)


def test_registered_as_a_strategy() -> None:
    assert STRATEGIES["pagestream"] is PagestreamStrategy
    strategy = strategy_for("pagestream")
    assert isinstance(strategy, PagestreamStrategy) and strategy.name == "pagestream"
    assert strategy.options == PagestreamOptions()
