"""Benchmarks that write their figures to ``docs/`` (never asserted in tests)."""
