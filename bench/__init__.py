"""Benchmarks for kvtornado: ``python -m bench`` (HTTP, exercise 3 vs 4) and ``python -m bench flush``."""
