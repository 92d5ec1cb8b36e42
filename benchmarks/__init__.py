"""Accuracy and speed benchmarks: ZoomWorld (task, scorer) and measured results."""
