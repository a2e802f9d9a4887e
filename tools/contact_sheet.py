"""A prompt grid of the embedded default model's outputs, for the README.

    python -m tools.contact_sheet --out docs/contact_sheet.png

Rows are shapes, columns colour / background pairs; every cell is ``sdrt generate`` with the
cell's caption, Euler a, 20 steps, CFG 7, seed 1000 + cell index. Torch is not needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from sdrt.models import default_model_path
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

from tools import shapes

PAIRS = [("red", "blue"), ("green", "yellow"), ("blue", "white"), ("yellow", "purple"),
         ("purple", "orange"), ("orange", "black"), ("white", "green"), ("black", "red")]
LABEL = 28  # pixels of caption under each cell


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/contact_sheet.png")
    ap.add_argument("--model", default=None, help="bundle (default: the embedded model)")
    ap.add_argument("--sampler", default="Euler a")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)

    pipe = Pipeline(args.model or default_model_path())
    side = shapes.SIZE
    sheet = Image.new("RGB", (side * len(PAIRS), (side + LABEL) * len(shapes.SHAPES)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, shape in enumerate(shapes.SHAPES):
        for col, (fg, bg) in enumerate(PAIRS):
            prompt = shapes.caption(shape, fg, bg)
            p = GenerationParams(prompt, steps=args.steps, sampler_name=args.sampler, seed=1000 + row * len(PAIRS) + col)
            (result,) = pipe.generate(p)
            x, y = col * side, row * (side + LABEL)
            sheet.paste(result.image, (x, y))
            draw.text((x + 3, y + side + 2), f"{fg} {shape}", fill="black")
            draw.text((x + 3, y + side + 14), f"on {bg}", fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    sheet.save(tmp)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
