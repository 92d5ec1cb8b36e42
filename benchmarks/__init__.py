"""Accuracy and speed benchmarks (not in this release)."""
