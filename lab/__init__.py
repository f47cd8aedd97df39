"""livemig's test lab: what boots and watches guests around the engine, never part of it.

``net`` (the network-namespace lab: hosts A and B, a client, the migration link),
``qemu`` (QemuProcess: launches and owns a QEMU), ``guest`` (the cached test-guest
build), ``accel`` (KVM only if a probe boot proves it), ``probe`` (ICMP downtime
probe), ``demo`` (one migration in a fresh lab, as ``livemig demo`` runs it).

The lab imports the engine (``migrate``); the engine never imports the lab. The
CLI loads it only inside the handlers of ``demo``, ``plan --lab`` and ``bench``
(whose runs are demo runs).
"""
