"""pagestream: livemig's own pre-copy of guest RAM; QEMU migrates only device state.

Modules::

    strategy   PagestreamStrategy (the ``pagestream`` strategy)
    options    PagestreamOptions, stream_host (where the page stream goes)
    run        PagestreamRun: set-up, pre-copy sweeps, switchover (StrategyRun's hooks)
    verifier   StreamVerifier: the stream digest (and engine comparison) before cont
    totals     StreamTotals: the rounds added up, the report's StreamStats
    control    AgentChannel (the JSON-lines channel), AgentProcess: an agent as a child
               process (in a network namespace); across hosts the target's node agent
               runs the receiver (migrate.agent.streamlink, MigrationRequest.target_receiver)
    agent      python -m migrate.pagestream.agent --role sender|receiver
    sender     PageSender: tracker scan, capture, zstd pool, socket (in the source agent)
    receiver   PageReceiver: frame checks, writes into target RAM, digest (target agent)
    protocol   the wire format: versioned frames, extents, zstd, checksums, digest
    tuning     CompressionTuner: zstd level and threads from where the sender waits
    planner    SwitchoverPlanner: when the dirty set meets the policy's downtime limit

Errors are :class:`~migrate.errors.StreamError` (protocol, transport, integrity,
agent) and :class:`~migrate.errors.ConfigError` (no shared RAM, non-TCP URI).
"""
