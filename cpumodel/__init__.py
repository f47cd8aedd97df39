"""CPU flags and models, host probes, migration compatibility and cluster baselines."""
