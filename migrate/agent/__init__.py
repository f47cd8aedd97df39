"""The node agent: one per host, an HTTPS API over mutual TLS (aiohttp).

Modules: ``app`` (the application factory ``create_app``, the ``Router`` route
modules add to, the mutual-TLS rule and request log), ``tlsgate`` (the listening
site that logs refused TLS handshakes), ``routes_cluster`` (CA, join, members),
``routes_node`` (node info, ``/metrics``, OpenAPI), ``metrics`` (Prometheus),
``nodeinfo`` (CPU and memory probe), ``openapi`` (the API document), ``client``
(``AgentClient``: a member's mTLS client; the joining node's calls), ``join`` (the
new node's side of joining), ``nodes`` (``cluster nodes``), ``server`` (running it).
Trust material and the state directory are in ``migrate.cluster``.
"""
