"""VM disks: what they are, where they live, how they move.

* :mod:`migrate.disks.model` — the data types: :class:`~migrate.disks.model.DiskSpec`
  (a disk of a VM definition), :class:`~migrate.disks.model.BlockDisk` (a disk as
  the running QEMU shows it), :class:`~migrate.disks.model.DiskMode`, and
  :class:`~migrate.disks.model.DiskPlacement` (a disk classified for one move).
* :mod:`migrate.disks.classify` — reads a QEMU's disks over QMP and classifies
  each writable one: shared (the target sees the same storage) or local.
* :mod:`migrate.disks.images` — qcow2/raw images on the host (``qemu-img``):
  create one like another, remove one.
* :mod:`migrate.disks.mirror` — the NBD mirror's lifecycle between two QEMUs
  (export on the target, ``blockdev-mirror`` on the source, READY, complete,
  abort).
* :mod:`migrate.disks.integrity` — the stopped source's image compared with the
  paused target's (allocated extents and digests of their data).

This package imports nothing from the rest of the engine's strategies; the
strategies import it.
"""
