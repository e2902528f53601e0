"""Benchmarks shipped with the project: each compares against a baseline run side by side in one process."""
