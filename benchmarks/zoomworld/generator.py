"""ZoomWorld: seeded high-resolution scenes with small coded plates, and questions with known answers and boxes.

A scene is a cluttered 1-2 MP image of a random aspect ratio holding 2-5 plates of distinct colours.
Each plate carries a 3-character code (capitals and digits). Its size is set in visual tokens, not
pixels: one character advances 26-34 px of the image *as resized to 1024 visual tokens* (a merged
token is 28 px there, so about one token per character, on every plate: the largest plate is largest by
its margin, not its code).
At 256 tokens two characters share a token, at 64 tokens the whole ~8 px-high code fits in about
one token: readable at 1024 tokens, at full resolution or in a crop, not at 64. Questions:
* detail: "What is written on the red plate?" -> the code; box = that plate (needs the zoom), any plate;
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
LARGEST_AREA = 1.5  # the largest plate's area over any other's (grown by padding; its code is drawn as the others)
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
    """A cluttered scene and its plates; the largest plate is clearly the largest (>= 1.4x the area of the next).

    Every code is drawn at the same scale in visual tokens: the largest plate is made large by its padding
    (margin around the code), never by its font, so its code is no easier to read than any other."""
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
    big = rng.randrange(n)  # one plate is clearly the largest: by its padding, not its code
    layouts = []  # [colour, code, font, text bbox, pad_x, pad_y, w, h]
    for colour, size in zip(colours, font_sizes):
        code = "".join(rng.choice(CODE_CHARS) for _ in range(3))
        font = _font(size)
        l, t, r, b = draw.textbbox((0, 0), code, font=font)
        pad_x, pad_y = size // 2, size // 3
        layouts.append([colour, code, font, (l, t, r, b), pad_x, pad_y, (r - l) + 2 * pad_x, (b - t) + 2 * pad_y])
    others = max((L[6] * L[7] for k, L in enumerate(layouts) if k != big), default=0)
    L = layouts[big]
    while L[6] * L[7] < LARGEST_AREA * others:  # grow the margin (x twice as fast as y) until clearly largest
        L[4], L[6] = L[4] + 2, L[6] + 4
        L[5], L[7] = L[5] + 1, L[7] + 2
    plates, taken = [], []
    # the largest first, so that a crowded scene never drops it (placement can fail for small plates only)
    for colour, code, font, (l, t, r, b), pad_x, pad_y, w, h in [layouts[big]] + layouts[:big] + layouts[big + 1:]:
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


GROUNDING_PROMPT = "Output the box."  # stage 1's natural-mode instruction (recipe `grounding_prompt`)
BOX_GRID = 1000  # box coordinates in answers: integers on a 0-1000 grid of the image shown, "[x1,y1,x2,y2]"


def box_text(box, size: tuple[int, int]) -> str:
    """A pixel box (x1, y1, x2, y2, exclusive ends) of an image of `size` (W, H) as the model writes it:
    "[x1,y1,x2,y2]" in integers on a 0-1000 grid of that image (x over its width, y over its height)."""
    W, H = size
    x1, y1, x2, y2 = box
    vals = (x1 / W, y1 / H, x2 / W, y2 / H)
    return "[" + ",".join(str(min(BOX_GRID, max(0, round(v * BOX_GRID)))) for v in vals) + "]"


def parse_box_text(text: str, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The pixel box of an answer written as `box_text` does, or None when it is not one (malformed, or
    x2 <= x1 / y2 <= y1)."""
    import re

    m = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]\s*", text or "")
    if m is None:
        return None
    x1, y1, x2, y2 = (min(BOX_GRID, int(v)) for v in m.groups())
    if x2 <= x1 or y2 <= y1:
        return None
    W, H = size
    return (round(x1 * W / BOX_GRID), round(y1 * H / BOX_GRID), round(x2 * W / BOX_GRID), round(y2 * H / BOX_GRID))


def grounding_questions(plates: list[Plate], size: tuple[int, int]) -> list[tuple[str, str, str, str, tuple]]:
    """The grounding questions a scene (or a view of it, `plates` in its coordinates) answers, as real VLMs'
    grounding data: per plate "Where is the red plate?" and the detail question followed by GROUNDING_PROMPT,
    both answered with `box_text`; and the reverse binding "Which colour is the plate that reads K7Q?"."""
    qs = []
    for p in plates:
        where = box_text(p.box, size)
        qs.append((f"Where is the {p.colour} plate?", where, "grounding", "where", p.box))
        qs.append((f"What is written on the {p.colour} plate?\n{GROUNDING_PROMPT}", where, "grounding", "box_for",
                   p.box))
        qs.append((f"Which colour is the plate that reads {p.code}?", p.colour, "grounding", "reverse", p.box))
    return qs


def make_sample(seed: int, family: str | None = None) -> Sample:
    """One question about one scene; `family` None draws detail or global with equal odds."""
    image, plates = make_scene(seed)
    rng = random.Random(seed * 7919 + 1)
    family = family or rng.choice(["detail", "global"])
    if family not in ("detail", "global"):
        raise ValueError(f"family must be 'detail' or 'global', got {family!r}")
    q, a, family, kind, box = rng.choice([x for x in scene_questions(plates) if x[2] == family])
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
