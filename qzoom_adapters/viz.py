"""Picture of one answer: the source image, the twig heatmap over it, predicted and true boxes."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def heatmap_overlay(image: Image.Image, heatmap_logits: torch.Tensor | None, bbox=None, true_box=None,
                    alpha: float = 0.45) -> Image.Image:
    """Blend sigmoid(heatmap) in red over `image`; predicted box in yellow, true box in green."""
    base = image.convert("RGB")
    if heatmap_logits is not None:
        prob = torch.sigmoid(heatmap_logits.float()).numpy()
        prob = (prob - prob.min()) / max(float(prob.max() - prob.min()), 1e-6)
        heat = Image.fromarray((prob * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
        red = Image.new("RGB", base.size, (255, 0, 0))
        mask = heat.point(lambda v: int(v * alpha))
        base = Image.composite(red, base, mask)
    draw = ImageDraw.Draw(base)
    for box, colour in ((true_box, (0, 200, 0)), (bbox, (255, 220, 0))):
        if box is not None:
            draw.rectangle(list(box), outline=colour, width=max(2, base.size[0] // 200))
    return base
