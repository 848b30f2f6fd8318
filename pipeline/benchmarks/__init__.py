"""Benchmarks behind `mlamoe bench --suite ...` (timings, not tests)."""
