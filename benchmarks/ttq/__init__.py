"""The time-to-quality study under a budget (benchmarks/time_to_quality.py is its command)."""
