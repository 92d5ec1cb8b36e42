"""Plots drawn with PIL (matplotlib is not a dependency): a log-x line plot of labelled points per series."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from qzoom_adapters.benchmarks.zoomworld.generator import _font


SERIES_COLOURS = {"baseline": (60, 90, 160), "Q-Zoom": (220, 110, 20), "plain": (60, 90, 160),
                  "zoomed": (220, 110, 20), "not zoomed": (40, 150, 80), "50% zoomed": (150, 60, 160),
                  "zoomed, fast vision": (200, 40, 40)}
PLOT_SIZE = (760, 500)
MARGINS = (80, 70, 40, 60)  # left, top, right, bottom: room for tick labels, title and legend


class LogXFrame:
    """Where data lands in the plot area: log-scale x over whole powers of two around the data, y over [0, y_max]."""

    def __init__(self, xs, size=PLOT_SIZE, margins=MARGINS, y_max: float = 1.0):
        self.y_max = y_max
        self.lo = 2 ** math.floor(math.log2(min(xs)))
        self.hi = max(2 ** math.ceil(math.log2(max(xs))), 2 * self.lo)
        self.size = size
        self.left, self.top = margins[0], margins[1]
        self.right, self.bottom = size[0] - margins[2], size[1] - margins[3]

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        fx = (math.log(x) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo))
        return self.left + fx * (self.right - self.left), self.bottom - y / self.y_max * (self.bottom - self.top)

    def x_ticks(self) -> list[int]:
        return [2**k for k in range(int(math.log2(self.lo)), int(math.log2(self.hi)) + 1)]


def line_plot(series: dict[str, list[tuple[float, float, str]]], title: str = "", y_label: str = "accuracy",
              y_max: float = 1.0, x_label: str = "mean visual tokens (log scale)") -> Image.Image:
    """y (default accuracy over [0, 1]) against visual tokens (x, log scale): a line of labelled points per series.

    `series`: name -> [(x, y, point label)]; names take their colour from `SERIES_COLOURS`.
    """
    frame = LogXFrame([x for points in series.values() for x, _, _ in points], y_max=y_max)
    img = Image.new("RGB", frame.size, "white")
    draw = ImageDraw.Draw(img)
    small, font = _font(12), _font(14)
    for y in [y_max * k / 5 for k in range(6)]:  # horizontal grid and y tick labels
        _, py = frame.to_pixel(frame.lo, y)
        draw.line([(frame.left, py), (frame.right, py)], fill=(225, 225, 225))
        draw.text((frame.left - 8, py), f"{y:.3g}", fill="black", font=small, anchor="rm")
    for x in frame.x_ticks():  # vertical grid and x tick labels
        px, _ = frame.to_pixel(x, 0.0)
        draw.line([(px, frame.top), (px, frame.bottom)], fill=(225, 225, 225))
        draw.text((px, frame.bottom + 6), str(x), fill="black", font=small, anchor="mt")
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline="black")
    draw.text(((frame.left + frame.right) / 2, frame.size[1] - 8), x_label, fill="black", font=font, anchor="md")
    draw.text((12, (frame.top + frame.bottom) / 2), y_label, fill="black", font=font, anchor="lm")
    draw.text((frame.left, 10), title, fill="black", font=font)
    lx = frame.left
    for name in series:  # legend above the plot area
        colour = SERIES_COLOURS[name]
        draw.line([(lx, 45), (lx + 24, 45)], fill=colour, width=2)
        draw.ellipse([lx + 8, 41, lx + 16, 49], fill=colour)
        draw.text((lx + 30, 45), name, fill="black", font=font, anchor="lm")
        lx += 50 + draw.textlength(name, font=font)
    for name, points in series.items():
        pixels = [(frame.to_pixel(x, y), label) for x, y, label in sorted(points)]
        colour = SERIES_COLOURS[name]
        if len(pixels) > 1:
            draw.line([p for p, _ in pixels], fill=colour, width=2)
        for (px, py), label in pixels:
            draw.text((px + 7, py - 7), label, fill=colour, font=small, anchor="lb")
    for name, points in series.items():  # points last, on top of lines and labels
        for x, y, _ in points:
            px, py = frame.to_pixel(x, y)
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=SERIES_COLOURS[name])
    return img
