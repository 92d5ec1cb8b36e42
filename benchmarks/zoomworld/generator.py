"""ZoomWorld: seeded high-resolution scenes with small coded plates, and questions with known answers and boxes.

A scene is a cluttered 1-2 MP image of a random aspect ratio holding 2-5 plates of distinct colours.
Each plate carries a 3-character code (capitals and digits). Its size is set in visual tokens, not
pixels: one character advances 26-34 px of the image *as resized to 1024 visual tokens* (a merged
token is 28 px there, so about one token per character; the largest plate's code is 1.35x that).
At 256 tokens two characters share a token, at 64 tokens the whole ~8 px-high code fits in about
one token: readable at 1024 tokens, at full resolution or in a crop, not at 64. Questions:
* detail: "What is written on the red plate?" -> the code; box = that plate (needs the zoom). Benchmark
  samples never ask the largest plate: its code is drawn 1.35x bigger, and a trained model reads it at 64
  tokens (half of them, run 9), which no other code allows;
* global: "How many plates are there?" -> the count (box None), or "What colour is the largest
  plate?" -> its colour; box = that plate (both answerable at low resolution).
Everything is a function of the seed (deterministic, tested).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (210, 35, 35), "blue": (35, 70, 215), "green": (30, 150, 60), "yellow": (225, 195, 20),
           "purple": (130, 50, 170), "orange": (235, 120, 20)}
CODE_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"  # no 0/O, 1/I, Q: codes must be readable, not guessable
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3))
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

ADVANCE_1024 = (26.0, 34.0)  # a character's advance, in pixels of the image resized to 1024 visual tokens
LARGEST = 1.35  # the largest plate's code scale (its area is then >= 1.4x any other's)
_ADVANCE_PER_SIZE = 0.636  # mean advance / font size of CODE_CHARS in Pillow's embedded font
_PIXELS_1024 = 1024 * 28 * 28

VAL_SEED, TEST_SEED, TRAIN_SEED = 10_000_000, 20_000_000, 1_000  # disjoint seed ranges per split


@dataclass(frozen=True)
class Plate:
    colour: str
    code: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels (exclusive ends)
    glyphs: tuple = ()  # (char, (x1, y1, x2, y2)) per character of the code, as drawn

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass
class Sample:
    id: str
    seed: int
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    family: str  # "detail" | "global"
    kind: str  # "code" | "count" | "largest_colour"
    box: tuple[int, int, int, int] | None
    plates: list[Plate]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded font: the same glyphs on every machine


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, W: int, H: int) -> None:
    """Muted shapes and strokes (never a plate colour, never text) so the plates must be found."""
    for _ in range(rng.randint(40, 90)):
        grey = rng.randint(70, 190)
        tint = tuple(max(0, min(255, grey + rng.randint(-25, 25))) for _ in range(3))
        x, y = rng.randrange(W), rng.randrange(H)
        s = rng.randint(10, max(12, min(W, H) // 6))
        shape = rng.random()
        if shape < 0.4:
            draw.ellipse([x, y, x + s, y + rng.randint(5, s)], fill=tint)
        elif shape < 0.75:
            draw.line([x, y, x + rng.randint(-s, s), y + rng.randint(-s, s)], fill=tint, width=rng.randint(1, 5))
        else:
            draw.rectangle([x, y, x + s, y + rng.randint(5, s)], outline=tint, width=rng.randint(1, 3))


def _place(rng: random.Random, W: int, H: int, w: int, h: int, taken: list) -> tuple[int, int, int, int] | None:
    for _ in range(200):
        x, y = rng.randint(8, W - w - 8), rng.randint(8, H - h - 8)
        box = (x, y, x + w, y + h)
        if all(box[2] + 12 < t[0] or t[2] + 12 < box[0] or box[3] + 12 < t[1] or t[3] + 12 < box[1] for t in taken):
            return box
    return None


def make_scene(seed: int) -> tuple[Image.Image, list[Plate]]:
    """A cluttered scene and its plates; the largest plate is clearly the largest (>= 1.4x the area of the next)."""
    rng = random.Random(seed)
    aw, ah = rng.choice(ASPECTS)
    mp = rng.uniform(1.0, 2.0) * 1e6
    W = int((mp * aw / ah) ** 0.5)
    H = int(W * ah / aw)
    base = tuple(rng.randint(110, 170) for _ in range(3))
    image = Image.new("RGB", (W, H), base)
    draw = ImageDraw.Draw(image)
    _clutter(draw, rng, W, H)
    n = rng.randint(2, 5)
    colours = rng.sample(sorted(COLOURS), n)
    scale_1024 = (_PIXELS_1024 / (W * H)) ** 0.5  # source pixels -> pixels at 1024 visual tokens
    font_sizes = [round(rng.uniform(*ADVANCE_1024) / (_ADVANCE_PER_SIZE * scale_1024)) for _ in range(n)]
    big = rng.randrange(n)  # one plate is clearly the largest
    font_sizes[big] = round(max(font_sizes) * LARGEST)
    layouts = []  # (colour, code, font, text bbox, pad_x, pad_y, w, h), the largest first
    for colour, size in sorted(zip(colours, font_sizes), key=lambda cs: -cs[1]):
        code = "".join(rng.choice(CODE_CHARS) for _ in range(3))
        font = _font(size)
        l, t, r, b = draw.textbbox((0, 0), code, font=font)
        pad_x, pad_y = size // 2, size // 3
        layouts.append((colour, code, font, (l, t, r, b), pad_x, pad_y, (r - l) + 2 * pad_x, (b - t) + 2 * pad_y))
    # narrow characters can make a large font's plate small: widen the largest plate to >= 1.5x any other's area
    others = max((w * h for *_, w, h in layouts[1:]), default=0)
    colour, code, font, bbox, pad_x, pad_y, w, h = layouts[0]
    while w * h < 1.5 * others:
        pad_x, w = pad_x + 2, w + 4
    layouts[0] = (colour, code, font, bbox, pad_x, pad_y, w, h)
    plates, taken = [], []
    # the largest first, so that a crowded scene never drops it (placement can fail for small plates only)
    for colour, code, font, (l, t, r, b), pad_x, pad_y, w, h in layouts:
        box = _place(rng, W, H, w, h, taken)
        if box is None:
            continue
        taken.append(box)
        draw.rectangle(box, fill=COLOURS[colour], outline=(20, 20, 20), width=2)
        origin = (box[0] + pad_x - l, box[1] + pad_y - t)
        draw.text(origin, code, font=font, fill=(255, 255, 255))
        glyphs = tuple((ch, draw.textbbox((origin[0] + font.getlength(code[:k]), origin[1]), ch, font=font))
                       for k, ch in enumerate(code))
        plates.append(Plate(colour, code, (box[0], box[1], box[2] + 1, box[3] + 1), glyphs))
    return image, plates


def scene_questions(plates: list[Plate]) -> list[tuple[str, str, str, str, tuple | None]]:
    """Every question a scene answers: (question, answer, family, kind, box), one code question per plate."""
    largest = max(plates, key=lambda p: p.area)
    qs = [(f"What is written on the {p.colour} plate?", p.code, "detail", "code", p.box) for p in plates]
    qs.append(("How many plates are there?", str(len(plates)), "global", "count", None))
    qs.append(("What colour is the largest plate?", largest.colour, "global", "largest_colour", largest.box))
    return qs


def make_sample(seed: int, family: str | None = None) -> Sample:
    """One question about one scene; `family` None draws detail or global with equal odds. Detail questions
    never ask the largest plate (its enlarged code is readable at the lowest budget)."""
    image, plates = make_scene(seed)
    rng = random.Random(seed * 7919 + 1)
    family = family or rng.choice(["detail", "global"])
    if family not in ("detail", "global"):
        raise ValueError(f"family must be 'detail' or 'global', got {family!r}")
    largest = max(plates, key=lambda p: p.area).box
    # the largest plate's code is drawn LARGEST x bigger and a trained model reads it at 64 tokens, so detail
    # questions ask the other plates only (training still asks every plate: it teaches reading)
    q, a, family, kind, box = rng.choice([x for x in scene_questions(plates) if x[2] == family
                                          and not (x[3] == "code" and x[4] == largest)])
    return Sample(f"zw-{seed}", seed, image, q, a, family, kind, box, plates)


def split(name: str, n: int) -> list[Sample]:
    """The fixed validation/test sets: samples at seeds VAL_SEED + i / TEST_SEED + i."""
    start = {"val": VAL_SEED, "test": TEST_SEED}.get(name)
    if start is None:
        raise ValueError(f"split must be 'val' or 'test', got {name!r} (training uses train_stream)")
    return [make_sample(start + i) for i in range(n)]


def train_stream(start: int = 0):
    """An endless on-the-fly training stream (seeds disjoint from val/test)."""
    i = start
    while True:
        if TRAIN_SEED + i >= VAL_SEED:
            raise RuntimeError("the training stream ran into the validation seeds")
        yield make_sample(TRAIN_SEED + i)
        i += 1
