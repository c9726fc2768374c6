"""Benchmarks (not tests): each prints a table and adds its figures to out/bench.json."""
