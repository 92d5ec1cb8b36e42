"""Errors raised for bad input: each names the problem and the fix."""


class QZoomError(ValueError):
    """Input, configuration or checkpoint that Q-Zoom cannot use as given."""
