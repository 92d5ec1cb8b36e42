"""Picture of one answer: the source image, the twig heatmap over it, predicted and true boxes, and (optionally)
a caption band under the image that says what was asked, answered and decided, with a legend of the marks.

Colours (chosen against ZoomWorld, whose plates are red, blue, green, yellow, purple and orange with white codes
on clutter of near-greys 45-215, and which has no cyan or magenta anywhere):
* heatmap: a ramp from transparent to cyan `HEATMAP_RGB`, plus a solid cyan line where the map reaches half its
  peak. A translucent blend mixes with what is under it (cyan over a red plate looks grey), so the solid line is
  the mark that is always pure cyan; cyan is >= 190 RGB units from every plate colour and >= 170 from any grey;
* predicted box: a solid magenta `PRED_BOX_RGB` line edged in black (readable on light and dark ground; >= 150
  from every plate colour, the nearest being purple, and >= 170 from any grey), drawn inside the box;
* true box: a dashed line of alternating white and black (`TRUE_BOX_DASH`), drawn just outside the box so it never
  covers the plate it marks; the dashes, not a hue, identify it, so no plate colour can be mistaken for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HEATMAP_RGB = (0, 255, 255)
PRED_BOX_RGB = (255, 0, 255)
TRUE_BOX_DASH = ((255, 255, 255), (0, 0, 0))
EDGE_RGB = (0, 0, 0)
BAND_RGB = (22, 22, 26)  # caption band background
TEXT_RGB = (240, 240, 240)
RIGHT_RGB, WRONG_RGB, SKIP_RGB = (90, 230, 110), (255, 95, 80), (255, 200, 60)  # band text only, never on the image


@dataclass(frozen=True, kw_only=True)
class Caption:
    """What the caption band under the picture says; every field is optional (a missing one is left out).

    `correct` adds RIGHT/WRONG after the truth; `zoomed` adds the gate's decision (False: "gate skipped: answered
    from the global view, no zoom"); the predicted box's coordinates come from `heatmap_overlay(bbox=...)`."""

    title: str | None = None
    question: str | None = None
    answer: str | None = None
    truth: str | None = None
    correct: bool | None = None
    gate_prob: float | None = None
    gate_threshold: float | None = None
    zoomed: bool | None = None


def _line_width(W: int, H: int) -> int:
    return max(2, min(W, H) // 200)


def _draw_heatmap(base: Image.Image, heatmap_logits: torch.Tensor, alpha: float) -> Image.Image:
    prob = torch.sigmoid(heatmap_logits.float()).cpu().numpy()
    prob = (prob - prob.min()) / max(float(prob.max() - prob.min()), 1e-6)
    heat = Image.fromarray((prob * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    colour = Image.new("RGB", base.size, HEATMAP_RGB)
    base = Image.composite(colour, base, heat.point(lambda v: int(v * alpha)))
    if float(prob.max()) > 0:  # a flat map (all 0 after normalising) has no half-peak line
        half = np.asarray(heat) >= 128
        r = max(1, _line_width(*base.size) // 2)
        line = _dilate(half, r) & _dilate(~half, r)  # within r pixels of the half-peak boundary
        base.paste(HEATMAP_RGB, mask=Image.fromarray(line.astype(np.uint8) * 255))
    return base


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, separably by shifts (fast on megapixel masks)."""
    out = mask
    for axis in (0, 1):
        acc = out.copy()
        n = out.shape[axis]
        for d in range(1, min(r, n - 1) + 1):
            lo, hi = [slice(None)] * 2, [slice(None)] * 2
            lo[axis], hi[axis] = slice(d, None), slice(None, n - d)
            acc[tuple(lo)] |= out[tuple(hi)]
            acc[tuple(hi)] |= out[tuple(lo)]
        out = acc
    return out


def _draw_pred_box(draw: ImageDraw.ImageDraw, box, w: int) -> None:
    """Magenta between two black edges, inside `box`."""
    x1, y1, x2, y2 = box
    e = max(1, w // 4)
    draw.rectangle((x1, y1, x2, y2), outline=EDGE_RGB, width=w + 2 * e)
    draw.rectangle((x1 + e, y1 + e, x2 - e, y2 - e), outline=PRED_BOX_RGB, width=w)


def _draw_dashed_box(draw: ImageDraw.ImageDraw, box, w: int, outside: bool = True) -> None:
    """Alternating white/black dashes `w` thick, just outside `box` (or inside when `outside` is False)."""
    x1, y1, x2, y2 = box
    if outside:
        x1, y1, x2, y2 = x1 - w, y1 - w, x2 + w, y2 + w
    dash = 3 * w
    for ax, ay, bx, by in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x1, y2, x2, y2), (x1, y1, x1, y2)):
        horizontal = ay == by
        length = (bx - ax) if horizontal else (by - ay)
        for k, start in enumerate(range(0, max(length, 1), dash)):
            end = min(start + dash, length)
            colour = TRUE_BOX_DASH[k % 2]
            if horizontal:
                yy = ay if ay == y1 else ay - w + 1
                draw.rectangle((ax + start, yy, ax + end, yy + w - 1), fill=colour)
            else:
                xx = ax if ax == x1 else ax - w + 1
                draw.rectangle((xx, ay + start, xx + w - 1, ay + end), fill=colour)


def _fmt_box(box) -> str:
    return "(" + ", ".join(str(int(v)) for v in box) + ")"


def _caption_lines(caption: Caption, drew_heat: bool, bbox, true_box) -> list[list[tuple]]:
    """Logical lines; each a list of ("text", str, rgb) items (wrapped between words), ("swatch", kind) items and
    ("keep", [items]) groups (never wrapped inside: a swatch and its label, a box's coordinates)."""
    lines: list[list[tuple]] = []
    t = lambda s, rgb=TEXT_RGB: ("text", s, rgb)  # noqa: E731
    keep = lambda *items: ("keep", list(items))  # noqa: E731
    if caption.title:
        lines.append([t(caption.title, (170, 170, 180))])
    if caption.question is not None:
        lines.append([t("Question: " + caption.question)])
    qa = []
    if caption.answer is not None:
        qa.append(t(f"Model answer: {caption.answer!r}     "))
    if caption.truth is not None:
        qa.append(t(f"Truth: {caption.truth!r}     "))
    if caption.correct is not None:
        qa.append(t("RIGHT", RIGHT_RGB) if caption.correct else t("WRONG", WRONG_RGB))
    if qa:
        lines.append(qa)
    gate = [] if caption.gate_prob is None else [t(f"Gate p(zoom) = {caption.gate_prob:.3f}")]
    if gate and caption.gate_threshold is not None:
        sign = ">=" if caption.gate_prob >= caption.gate_threshold else "<"
        gate.append(t(f" {sign} threshold {caption.gate_threshold:g}"))
    if caption.zoomed is True:
        gate += [t("  ->  ")] if gate else []
        gate.append(t("ZOOMED"))
        if bbox is not None:
            gate += [t(" "), keep(t(f"into box {_fmt_box(bbox)}:"))]
        gate.append(t(" answered from the global view + crop" if bbox is not None
                      else ": answered from the global view + crop"))
    elif caption.zoomed is False:
        gate += [t("  ->  ")] if gate else []
        gate.append(t("GATE SKIPPED: answered from the global view, no zoom", SKIP_RGB))
    elif bbox is not None:
        gate += [t("   ")] if gate else []
        gate.append(keep(t(f"Predicted box {_fmt_box(bbox)}")))
    if gate:
        lines.append(gate)
    legend = [t("Legend:   " if drew_heat or bbox is not None or true_box is not None else "Marks:   ")]
    if drew_heat:
        legend += [keep(("swatch", "heat"), t(" twig heatmap (line: half its peak)")), t("     ")]
    if bbox is not None:
        legend += [keep(("swatch", "pred"), t(" predicted box")), t("     ")]
    if true_box is not None:
        legend += [keep(("swatch", "true"), t(" true box")), t("     ")]
    missing = [name for name, here in (("heatmap", drew_heat), ("predicted box", bbox is not None)) if not here]
    if missing:
        why = " (not zoomed)" if caption.zoomed is False else ""
        legend.append(t(f"no {' and no '.join(missing)} drawn{why}", SKIP_RGB if caption.zoomed is False
                        else TEXT_RGB))
    if true_box is None:
        legend.append(t(("     " if len(legend) > 1 else "") + ("no true box (whole-image question)"
                        if caption.truth is not None else "no true box given")))
    lines.append(legend)
    return lines


def caption_lines(caption: Caption, *, drew_heatmap: bool = False, bbox=None, true_box=None) -> list[str]:
    """The caption band's lines as plain text (before wrapping), e.g. for a log or an image's alt text."""
    def text(item):
        if item[0] == "keep":
            return "".join(text(sub) for sub in item[1])
        return item[1] if item[0] == "text" else "[" + item[1] + "]"

    return ["".join(text(item) for item in line).rstrip()
            for line in _caption_lines(caption, drew_heatmap, bbox, true_box)]


def _draw_swatch(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, sw: int, sh: int, w: int) -> None:
    if kind == "heat":
        for i in range(sw):  # the ramp from the band colour to cyan, then the solid half-peak line
            a = i / max(sw - 1, 1)
            draw.line((x + i, y, x + i, y + sh), fill=tuple(round(b + (c - b) * a) for b, c in
                                                              zip(BAND_RGB, HEATMAP_RGB)))
        draw.rectangle((x + sw // 2, y, x + sw // 2 + w - 1, y + sh), fill=HEATMAP_RGB)
    elif kind == "pred":
        draw.rectangle((x, y, x + sw, y + sh), fill=(128, 128, 128))
        _draw_pred_box(draw, (x, y, x + sw, y + sh), w)
    else:
        draw.rectangle((x, y, x + sw, y + sh), fill=(128, 128, 128))
        _draw_dashed_box(draw, (x, y, x + sw, y + sh), w, outside=False)


def caption_band(width: int, caption: Caption, *, drew_heatmap: bool = False, bbox=None, true_box=None,
                 font_size: int | None = None) -> Image.Image:
    """The caption band (an RGB image `width` wide) that `heatmap_overlay(caption=...)` puts under the picture.

    `font_size` defaults to width / 48 (>= 14 px); `heatmap_overlay` passes sqrt(image area) / 46 (at most
    width / 28), readable when a 1-2 MP picture is shown whole on a screen."""
    size = font_size or max(14, round(width / 48))
    font = ImageFont.load_default(size=size)
    pad, step = size // 2 + 2, round(size * 1.4)
    sw, sh, w = round(size * 2.2), round(size * 0.9), max(2, size // 8)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, row = [], pad, 0  # (row, x, item)
    for line in _caption_lines(caption, drew_heatmap, bbox, true_box):
        for item in line:
            if item[0] != "text":  # a swatch or a group: placed whole
                group = item[1] if item[0] == "keep" else [item]
                lengths = [sw if sub[0] == "swatch" else scratch.textlength(sub[1], font=font) for sub in group]
                if x + sum(lengths) > width - pad and x > pad:
                    row, x = row + 1, pad
                for sub, length in zip(group, lengths):
                    placed.append((row, x, sub))
                    x += length
                continue
            for word in item[1].replace(" ", " \0").split("\0"):  # words keep their trailing space
                wl = scratch.textlength(word, font=font)
                if x + scratch.textlength(word.rstrip(), font=font) > width - pad and x > pad:
                    row, x = row + 1, pad
                    word = word.lstrip()
                    wl = scratch.textlength(word, font=font)
                placed.append((row, x, ("text", word, item[2])))
                x += wl
        row, x = row + 1, pad
    band = Image.new("RGB", (width, 2 * pad + row * step), BAND_RGB)
    draw = ImageDraw.Draw(band)
    for r, x0, item in placed:
        y = pad + r * step
        if item[0] == "swatch":
            _draw_swatch(draw, item[1], round(x0), y + (step - sh) // 2 - size // 8, sw, sh, w)
        elif item[1]:
            draw.text((round(x0), y), item[1], font=font, fill=item[2])
    return band


def heatmap_overlay(image: Image.Image, heatmap_logits: torch.Tensor | None = None, bbox=None, true_box=None,
                    alpha: float = 0.45, *, caption: Caption | None = None) -> Image.Image:
    """Blend sigmoid(heatmap) in cyan over `image` (solid cyan line at half its peak); predicted box in magenta
    edged in black, true box dashed white/black (see the module docstring for why these colours).

    Without `caption` the result has the size of `image`. With one, `caption_band` is added *under* the image (the
    picture is that much taller; the image area is never covered by text), saying the question, answer, truth,
    gate probability and decision, the box, and a legend of the marks drawn; when nothing was zoomed it says so.
    """
    base = image.convert("RGB")
    drew_heat = heatmap_logits is not None
    if drew_heat:
        base = _draw_heatmap(base, heatmap_logits, alpha)
    draw = ImageDraw.Draw(base)
    w = _line_width(*base.size)
    if true_box is not None:
        _draw_dashed_box(draw, true_box, w)
    if bbox is not None:
        _draw_pred_box(draw, bbox, w)
    if caption is None:
        return base
    size = max(14, min(round((base.width * base.height) ** 0.5 / 46), base.width // 28))
    band = caption_band(base.width, caption, drew_heatmap=drew_heat, bbox=bbox, true_box=true_box, font_size=size)
    out = Image.new("RGB", (base.width, base.height + band.height), BAND_RGB)
    out.paste(base, (0, 0))
    out.paste(band, (0, base.height))
    return out
