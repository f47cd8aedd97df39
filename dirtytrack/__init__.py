"""Dirty-page bitmaps, trackers, RAM digests and the pre-copy convergence model."""
