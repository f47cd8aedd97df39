"""Dirty-page bitmaps, trackers, RAM digests and the pre-copy convergence model.

Modules (imported explicitly; this package imports nothing heavy on its own so that
``dirtytrack.errors`` stays cheap for the CLI):

- :mod:`dirtytrack.bitmap`   ``Bitmap`` (packed uint64 words), ``Extent``
- :mod:`dirtytrack.trackers` ``Tracker`` and its shadow-diff, page-digest and
  soft-dirty implementations, ``choose_tracker``
- :mod:`dirtytrack.rate`     ``DirtyRateEstimator`` → ``DirtyRateEstimate``
- :mod:`dirtytrack.model`    ``PrecopyScenario`` → ``predict`` → ``Prediction``,
  ``min_downtime_limit``, ``required_throttle``
- :mod:`dirtytrack.digest`   xxh3 RAM and page digests (integrity checks)
- :mod:`dirtytrack.ram`      ``RamMapping`` of a guest RAM backing file
- :mod:`dirtytrack.errors`   the ``DirtyTrackError`` tree
"""
