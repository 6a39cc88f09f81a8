"""Benchmark library: traces, request timing records, SLO/fairness metrics, reports, replay clients."""
