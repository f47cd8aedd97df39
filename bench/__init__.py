"""Migration benchmarks: scenarios, guest workloads, downtime measurement, reports."""
