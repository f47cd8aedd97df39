"""Test doubles of engine parts (run in-process, or as the process they replace)."""
