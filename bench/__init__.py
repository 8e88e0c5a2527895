"""Benchmarks: scripts run by hand, each printing a table and writing its figures to bench/results/."""
