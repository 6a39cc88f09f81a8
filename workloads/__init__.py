"""Workload and trace builders (run from the repository root: ``python3 -m workloads.X``)."""
