"""Benchmarks (not tests): ``python bench/run.py``."""
