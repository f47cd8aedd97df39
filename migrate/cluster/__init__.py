"""The cluster's trust, offline: CA and node certificates, join keys, join tokens,
the state directory.

Modules: ``pki`` (X.509 through ``cryptography``), ``joinkey`` (the one-line join
key), ``tokens`` (one-time tokens, stored hashed), ``state`` (the state directory's
layout and atomic writes; its docstring lists the files), ``address`` (HOST:PORT),
``tls`` (``ssl`` contexts), ``errors``. Everything that talks over the network is in
``migrate.agent``.
"""
