"""The webui's "Poor man's outpainting" script (``scripts/poor_mans_outpainting.py``).

The init image is pasted into a canvas grown by ``pixels`` on the chosen sides (the canvas rounded
up to 64 pixels, the growth shared between opposite sides in proportion), black elsewhere; a mask
(white outside the image, the image's inside black, ``2 * mask_blur`` in from each grown side) and
a latent mask (``mask_blur // 2`` in) are drawn; the canvas is cut into request-size tiles
overlapping by ``pixels`` (``images.split_grid``); every tile that reaches a grown side is
inpainted (whole picture, mask blur ``2 * mask_blur``, the chosen masked content), one image
each, seeds counting up from the request's; the tiles are put back (``images.combine_grid``).
The result carries the first tile's infotext, as the webui's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.params import Img2imgParams
from sdrt.runtime.pipeline.txt2img import GeneratedImage
from sdrt.runtime.pipeline.upscale import combine_grid, split_grid

DIRECTIONS = ("left", "right", "up", "down")


def canvas(image: Image.Image, pixels: int, mask_blur: int, direction: Sequence[str]):
    """(canvas, mask, latent mask, (left, right, up, down)) as the script draws them."""
    left, right, up, down = (pixels if d in direction else 0 for d in DIRECTIONS)
    target_w = math.ceil((image.width + left + right) / 64) * 64
    target_h = math.ceil((image.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - image.width) // (left + right)
    if right > 0:
        right = target_w - image.width - left
    if up > 0:
        up = up * (target_h - image.height) // (up + down)
    if down > 0:
        down = target_h - image.height - up
    img = Image.new("RGB", (target_w, target_h))
    img.paste(image, (left, up))

    def drawn(inset: int) -> Image.Image:
        m = Image.new("L", img.size, "white")
        ImageDraw.Draw(m).rectangle((left + (inset if left > 0 else 0), up + (inset if up > 0 else 0),
                                     m.width - right - (inset if right > 0 else 0),
                                     m.height - down - (inset if down > 0 else 0)), fill="black")
        return m

    return img, drawn(mask_blur * 2), drawn(mask_blur // 2), (left, right, up, down)


def poor_mans_outpainting(pipe, p: Img2imgParams, pixels: int = 128, mask_blur: int = 4, inpainting_fill: int = 0,
                          direction: Sequence[str] = DIRECTIONS, callback=None) -> GeneratedImage:
    """The script's run on an ``Img2imgPipeline``: ``p`` gives the prompt, the sampler, the seed and
    the tile size (its width and height); one init image."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise SdrtError(f"outpainting pixels must be a whole number >= 1, got {pixels!r}")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or mask_blur < 0:
        raise SdrtError(f"outpainting mask blur must be a whole number >= 0, got {mask_blur!r}")
    unknown = [d for d in direction if d not in DIRECTIONS]
    if unknown or not direction:
        raise SdrtError(f"outpainting directions must be some of {', '.join(DIRECTIONS)}, got {list(direction)!r}")
    images = [p.init_images] if isinstance(p.init_images, Image.Image) else list(p.init_images)
    if len(images) != 1 or not isinstance(images[0], Image.Image):
        raise SdrtError("poor man's outpainting takes one init image")
    plan = pipe.plan(p.replace(n_iter=1, batch_size=1))
    width, height = plan.width, plan.height
    if pixels >= min(width, height):
        raise SdrtError(f"outpainting pixels ({pixels}) must be less than the tile size {width}x{height}")
    img, mask, latent_mask, (left, right, up, down) = canvas(images[0].convert("RGB"), pixels, mask_blur, direction)
    grids = [split_grid(im, width, height, pixels) for im in (img, mask, latent_mask)]

    def inside(x: int, w: int, y: int, h: int) -> bool:
        return x >= left and x + w <= img.width - right and y >= up and y + h <= img.height - down

    seed, first = plan.seed, None
    for (y, h, row), (_, _, mask_row), (_, _, latent_row) in zip(*grids):
        for tile, mask_tile, latent_tile in zip(row, mask_row, latent_row):
            x, w = tile[:2]
            if inside(x, w, y, h):
                continue
            q = p.replace(init_images=[tile[2]], mask=mask_tile[2], latent_mask=latent_tile[2], mask_blur=mask_blur * 2,
                          inpainting_fill=inpainting_fill, inpaint_full_res=False, n_iter=1, batch_size=1, seed=seed,
                          width=width, height=height)
            result = pipe.generate(q, callback)[0]
            first = first or result
            seed = result.seed + 1
            tile[2] = result.image
    combined = combine_grid(grids[0], height, img.width, img.height, pixels)
    if first is None:  # nothing to outpaint: the canvas as it is
        return GeneratedImage(combined, plan.seed, "")
    return GeneratedImage(combined, first.seed, first.infotext)
