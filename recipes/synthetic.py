"""Small synthetic scenes for the CPU demo: a cluttered image with one coloured plate holding a code."""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


@dataclass
class Scene:
    image: Image.Image
    question: str
    answer: str
    box: tuple[int, int, int, int]  # the plate, in pixels
    colour: str = ""


def demo_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        W, H = rng.choice([(320, 240), (240, 320), (360, 200)])
        img = Image.new("RGB", (W, H), tuple(rng.randrange(90, 160) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(25):  # clutter
            x, y = rng.randrange(W), rng.randrange(H)
            draw.ellipse([x, y, x + rng.randrange(4, 30), y + rng.randrange(4, 30)],
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        name, colour = rng.choice(sorted(_COLOURS.items()))
        w, h = 44, 20
        x, y = rng.randrange(0, W - w), rng.randrange(0, H - h)
        code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(3))
        draw.rectangle([x, y, x + w, y + h], fill=colour)
        draw.text((x + 6, y + 4), code, fill=(255, 255, 255))
        scenes.append(Scene(img, f"What is written on the {name} plate?", code, (x, y, x + w, y + h), name))
    return scenes
