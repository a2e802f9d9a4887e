"""Procedural scenes for the embedded default model: one flat shape on a flat background, captioned.

The same module draws the training data (tools/train_default_model.py) and measures generated
images in the quality test (tests/test_default_model.py): the centre colour, the corner
colour, and which ideal shape mask fits the foreground best. numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # image side in pixels
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 220),
    "purple": (135, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
MIN_SIDE, MAX_SIDE = 64, 88  # the shape's bounding box side, pixels
JITTER = 6  # largest offset of the shape's centre from the image centre, pixels
CENTRE_PATCH = 8  # measured at the image centre: always inside the shape
CORNER_PATCH = 12  # measured in each corner: always background
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float = SIZE / 2  # centre of the shape's bounding box, pixels
    cy: float = SIZE / 2
    side: float = (MIN_SIDE + MAX_SIDE) / 2

    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str | None, background: str | None) -> str:
    """``a red circle on a blue background``; either colour may be left out."""
    thing = f"{colour} {shape}" if colour else shape
    text = f"{article(thing)} {thing}"
    return f"{text} on {article(background)} {background} background" if background else text


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn shape, colour, different background colour, size and position."""
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = [c for c in names if c != colour][rng.integers(len(names) - 1)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    cx, cy = SIZE / 2 + rng.uniform(-JITTER, JITTER, size=2)
    return Scene(shape, colour, background, float(cx), float(cy), float(rng.uniform(MIN_SIDE, MAX_SIDE)))


def polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """The outline of a square or an upright triangle filling ``box`` (x0, y0, x1, y1); None for a circle."""
    x0, y0, x1, y1 = box
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, box: tuple[float, float, float, float], size: tuple[int, int] = (SIZE, SIZE),
               supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1], [height, width] float32, of ``shape`` filling ``box`` (pixel coordinates)."""
    w, h = size
    s = supersample
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    big = tuple(v * s for v in box)
    outline = polygon(shape, big)
    if outline is None:
        draw.ellipse([big[0], big[1], big[2] - 1, big[3] - 1], fill=255)
    else:
        draw.polygon(outline, fill=255)
    if s > 1:
        canvas = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def draw(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as [size, size, 3] uint8 RGB."""
    half = scene.side / 2
    box = (scene.cx - half, scene.cy - half, scene.cx + half, scene.cy + half)
    k = size / SIZE
    mask = shape_mask(scene.shape, tuple(v * k for v in box), (size, size))[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(COLOURS[scene.background], np.float32)
    return np.round(mask * fg + (1.0 - mask) * bg).astype(np.uint8)


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` scenes drawn from ``seed``: ([n, 128, 128, 3] uint8 images, scenes)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([draw(s) for s in scenes]), scenes


# -- measuring generated images -------------------------------------------------------------------

def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], np.float32)
    return names[int(np.argmin(((palette - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def centre_colour(image: np.ndarray) -> np.ndarray:
    """Median RGB of the central patch."""
    h, w = image.shape[:2]
    r = CENTRE_PATCH // 2
    return np.median(image[h // 2 - r:h // 2 + r, w // 2 - r:w // 2 + r].reshape(-1, 3), axis=0)


def corner_colour(image: np.ndarray) -> np.ndarray:
    """Median RGB of the four corner patches together."""
    c = CORNER_PATCH
    patches = [image[:c, :c], image[:c, -c:], image[-c:, :c], image[-c:, -c:]]
    return np.median(np.concatenate([p.reshape(-1, 3) for p in patches]), axis=0)


def foreground(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels nearer the centre colour than the corner colour."""
    x = image.astype(np.float32)
    fg, bg = centre_colour(image), corner_colour(image)
    return ((x - fg) ** 2).sum(-1) < ((x - bg) ** 2).sum(-1)


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Intersection over union of ``mask`` with each ideal shape filling the mask's bounding box.

    The box spans the 1st to 99th percentile of the foreground coordinates, so stray pixels
    do not stretch it.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) < 16:
        return {s: 0.0 for s in SHAPES}
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    box = (float(x0), float(y0), float(x1) + 1, float(y1) + 1)
    h, w = mask.shape
    scores = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, box, (w, h), supersample=2) >= 0.5
        scores[shape] = float((ideal & mask).sum() / max(1, (ideal | mask).sum()))
    return scores


@dataclass(frozen=True)
class Measurement:
    colour: str
    background: str
    shape: str
    shape_scores: dict


def measure(image) -> Measurement:
    """Nearest palette colours of the centre and of the corners, and the best-fitting shape."""
    x = np.asarray(image)[..., :3]
    scores = shape_scores(foreground(x))
    return Measurement(nearest_colour(centre_colour(x)), nearest_colour(corner_colour(x)),
                       max(scores, key=scores.get), scores)
