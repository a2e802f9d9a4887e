"""The webui's outpainting scripts: "Poor man's outpainting" and "Outpainting mk2".

Poor man's outpainting (``scripts/poor_mans_outpainting.py``):

The init image is pasted into a canvas grown by ``pixels`` on the chosen sides (the canvas rounded
up to 64 pixels, the growth shared between opposite sides in proportion), black elsewhere; a mask
(white outside the image, the image's inside black, ``2 * mask_blur`` in from each grown side) and
a latent mask (``mask_blur // 2`` in) are drawn; the canvas is cut into request-size tiles
overlapping by ``pixels`` (``images.split_grid``); every tile that reaches a grown side is
inpainted (whole picture, mask blur ``2 * mask_blur``, the chosen masked content), one image
each, seeds counting up from the request's; the tiles are put back (``images.combine_grid``).
The result carries the first tile's infotext, as the webui's.

Outpainting mk2 (``scripts/outpainting_mk_2.py``): the sides grow one after the other (left,
right, up, down; the growth of each side shared out as poor man's, the canvas rounded up to 64
pixels); for each side the image so far is pasted into a canvas grown on that side (rounded up to
64), the new strip (and the rounding) filled with ``matched_noise`` (noise shaped in the Fourier
domain by the image's spectrum, its histogram matched to the image's), and the part next to the new
side, at most the request's width (or height) wide, inpainted: the whole picture, "original" masked
content, mask blur ``4 * mask_blur`` on the axis that grows (``mask_blur_x`` for left / right,
``mask_blur_y`` for up / down; the other 0 unless a side of that axis grows too), a mask drawn
``mask_blur`` in from the new strip's edge and a latent mask ``2 * mask_blur`` in. Every side's
run is one batch of ``batch_size`` images with the request's seed (seeds N, N+1, ... within it; a
seed of -1 draws a new random one per run, as the webui's ``process_images``); each of ``n_iter``
passes repeats that from the init image. Every image carries the first run's seed and infotext.
Not done: the webui's image grid of the results (``return_grid``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.params import Img2imgParams
from sdrt.runtime.pipeline.txt2img import GeneratedImage
from sdrt.runtime.pipeline.upscale import combine_grid, split_grid

DIRECTIONS = ("left", "right", "up", "down")
POOR_MAN = "Poor man's outpainting"
MK2 = "Outpainting mk2"
SCRIPTS = (MK2, POOR_MAN)  # the img2img scripts sdrt runs, by the webui's titles


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


# ---- Outpainting mk2 -------------------------------------------------------------------------------

def _centred_fft(a: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The script's ``_fft2`` / ``_ifft2``: per channel, the (inverse) orthonormal 2-D FFT of the
    shifted image, shifted back."""
    f = np.fft.ifft2 if inverse else np.fft.fft2
    return np.fft.ifftshift(f(np.fft.fftshift(a, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _match_cdf(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """One channel of scikit-image's ``match_histograms`` (float values): each distinct source value
    mapped to the template value at its quantile, linearly interpolated."""
    values, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
    t_values, t_counts = np.unique(template, return_counts=True)
    mapped = np.interp(np.cumsum(counts) / source.size, np.cumsum(t_counts) / template.size, t_values)
    return mapped[inverse.reshape(-1)]


def matched_noise(image: np.ndarray, mask: np.ndarray, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """The script's ``get_matched_noise`` (from g-diffuser-bot): ``image`` [h, w, 3] in [0, 1] with
    the masked part (``mask`` [h, w, 3], 1 = new) replaced by noise that has the unmasked part's
    spectrum (the magnitude to the power ``noise_q``: lower is more detail) and value histogram;
    ``color_variation`` blends the start noise from grey (0) to coloured (1). The start noise comes
    from NumPy's ``default_rng(0)``, so it does not follow the seed. float64 [h, w, 3] in [0, 1]."""
    image = np.asarray(image, np.float64)
    mask = np.asarray(mask, np.float64)
    h, w, channels = image.shape
    grey = mask.sum(axis=2) / 3.0
    new, kept = grey > 1e-6, grey < 1e-3
    with np.errstate(divide="ignore", invalid="ignore"):
        windowed = image * (1.0 - grey[..., None])
        windowed /= np.max(windowed)
        windowed += np.average(image) * mask  # the masked part at the mean colour, for the spectrum
        spectrum = _centred_fft(windowed)
        magnitude = np.abs(spectrum)
        phase = spectrum / magnitude
        # start noise: uniform, mostly grey, low-passed by 1 / ((x^2 + 1) (y^2 + 1)) over [-1, 1) scaled
        # by the aspect ratio (the script's "gaussian" window, mode 1)
        noise = np.random.default_rng(0).random((h, w, channels))
        noise = noise * color_variation + ((1.0 - color_variation) * noise.sum(axis=2) / 3.0)[..., None]
        ys = (np.arange(h) / h * 2.0 - 1.0) * (h / min(h, w))
        xs = (np.arange(w) / w * 2.0 - 1.0) * (w / min(h, w))
        window = (1.0 / ((ys[:, None] ** 2 + 1.0) * (xs[None, :] ** 2 + 1.0))) ** (3.14 / 3.14)
        noise = np.real(_centred_fft(_centred_fft(noise) * window[..., None], inverse=True))
        shaped = np.abs(_centred_fft(noise)) ** 2 * magnitude ** noise_q * phase
        shaped = np.real(_centred_fft(shaped, inverse=True))
        shaped -= np.min(shaped)
        shaped /= np.max(shaped)
    if new.any() and kept.any():
        source, template = shaped[new], image[kept]
        shaped[new] = np.stack([_match_cdf(source[:, c], template[:, c]) for c in range(channels)], axis=1)
    # (with nothing kept, scikit-image's match_histograms fails in the webui; the noise stays as shaped)
    out = image * (1.0 - mask) + shaped * mask
    return np.clip(out, 0.0, 1.0)


def _noised(canvas: Image.Image, mask: Image.Image, noise_q: float, color_variation: float) -> Image.Image:
    """The canvas with its masked part replaced by ``matched_noise``, 8-bit as the script truncates it."""
    x = matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0, noise_q, color_variation)
    return Image.fromarray(np.nan_to_num(np.clip(x * 255.0, 0.0, 255.0)).astype(np.uint8), mode="RGB")


def _grown(size: int, pixels: tuple[int, int]) -> tuple[int, int]:
    """The script's shares of the growth of one axis (first side, second side), the total rounded up to 64."""
    a, b = pixels
    target = math.ceil((size + a + b) / 64) * 64
    if a > 0:
        a = a * (target - size) // (a + b)
    if b > 0:
        b = target - size - a
    return a, b


def check_mk2(pixels, mask_blur, direction, noise_q, color_variation) -> None:
    """One-line errors for Outpainting mk2's arguments (the webui's sliders' ranges, but pixels and
    mask blur not bounded above)."""
    for name, v in (("pixels", pixels), ("mask blur", mask_blur)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "pixels" else 0):
            raise SdrtError(f"outpainting {name} must be a whole number >= {1 if name == 'pixels' else 0}, got {v!r}")
    for name, v, top in (("fall-off exponent", noise_q, 4.0), ("color variation", color_variation, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 <= v <= top:
            raise SdrtError(f"outpainting {name} must be a number in [0, {top:g}], got {v!r}")
    if isinstance(direction, str) or not isinstance(direction, (list, tuple)):
        raise SdrtError(f"outpainting directions must be a list of some of {', '.join(DIRECTIONS)}, got {direction!r}")
    unknown = [d for d in direction if d not in DIRECTIONS]
    if unknown or not direction:
        raise SdrtError(f"outpainting directions must be some of {', '.join(DIRECTIONS)}, got {list(direction)!r}")


def outpainting_mk2(pipe, p: Img2imgParams, pixels: int = 128, mask_blur: int = 8,
                    direction: Sequence[str] = DIRECTIONS,
                    noise_q: float = 1.0, color_variation: float = 0.05, callback=None) -> list[GeneratedImage]:
    """The script's run on an ``Img2imgPipeline``: ``p`` gives the prompt, the sampler, the seed,
    ``batch_size`` / ``n_iter`` and the largest inpainted part (its width and height); its first
    init image is grown. ``batch_size * n_iter`` images."""
    check_mk2(pixels, mask_blur, direction, noise_q, color_variation)
    images = [p.init_images] if isinstance(p.init_images, Image.Image) else list(p.init_images or [])
    if not images or not isinstance(images[0], Image.Image):
        raise SdrtError("Outpainting mk2 needs an init image")
    plan = pipe.plan(p.replace(init_images=images[:1], batch_size=1, n_iter=1))
    process_width, process_height = plan.width, plan.height
    # the webui pastes the image into RGB canvases: converted by Pillow (an alpha channel dropped, not
    # flattened onto white as img2img's init images; the plan above refused the modes Pillow clips)
    init = images[0].convert("RGB")
    left, right, up, down = (pixels if d in direction else 0 for d in DIRECTIONS)
    blur_x = mask_blur if left or right else 0
    blur_y = mask_blur if up or down else 0
    left, right = _grown(init.width, (left, right))
    up, down = _grown(init.height, (up, down))
    first: list[GeneratedImage] = []

    def expand(imgs: list[Image.Image], grow: int, side: str) -> list[Image.Image]:
        horizontal = side in ("left", "right")
        ph, pv = (grow, 0) if horizontal else (0, grow)
        res_w, res_h = imgs[0].width + ph, imgs[0].height + pv
        canvas_w, canvas_h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
        width = min(process_width, res_w) if horizontal else canvas_w
        height = canvas_h if horizontal else min(process_height, res_h)
        for name, v in (("width", width), ("height", height)):
            if v % 8:  # the webui fails there (its decoded image and overlay differ in size)
                raise SdrtError(f"Outpainting mk2: the {side} pass's {name} {v} is not a multiple of 8; give "
                                f"outpainting pixels that make the grown image a multiple of 8 (or -W / -H)")
        crop = (0 if side == "left" else canvas_w - width, 0 if side == "up" else canvas_h - height,
                width if side == "left" else canvas_w, height if side == "up" else canvas_h)
        outputs, inputs = [], []
        for image in imgs:
            canvas = Image.new("RGB", (canvas_w, canvas_h))
            canvas.paste(image, (ph if side == "left" else 0, pv if side == "up" else 0))
            mask = Image.new("RGB", (canvas_w, canvas_h), "white")
            ImageDraw.Draw(mask).rectangle((
                grow + blur_x if side == "left" else 0, grow + blur_y if side == "up" else 0,
                canvas_w - grow - blur_x if side == "right" else res_w,
                canvas_h - grow - blur_y if side == "down" else res_h), fill="black")
            outputs.append(_noised(canvas, mask, noise_q, color_variation))
            inputs.append(outputs[-1].crop(crop))
        mask = mask.crop(crop)
        latent_mask = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(latent_mask).rectangle((
            grow + blur_x * 2 if side == "left" else 0, grow + blur_y * 2 if side == "up" else 0,
            mask.width - grow - blur_x * 2 if side == "right" else res_w,
            mask.height - grow - blur_y * 2 if side == "down" else res_h), fill="black")
        q = p.replace(init_images=inputs, mask=mask, latent_mask=latent_mask, mask_blur=None, mask_blur_x=blur_x * 4,
                      mask_blur_y=blur_y * 4, inpainting_fill=1, inpaint_full_res=False, n_iter=1, width=width,
                      height=height, script_name=None, script_args=[])
        results = pipe.generate(q, callback)
        if not first:
            first.append(results[0])
        for out, result in zip(outputs, results):
            out.paste(result.image, (0 if side == "left" else out.width - result.image.width,
                                     0 if side == "up" else out.height - result.image.height))
        return [out.crop((0, 0, res_w, res_h)) for out in outputs]

    done: list[Image.Image] = []
    for _ in range(p.n_iter):
        imgs = [init] * p.batch_size
        for side, grow in zip(DIRECTIONS, (left, right, up, down)):
            if grow > 0:
                imgs = expand(imgs, grow, side)
        done += imgs
    return [GeneratedImage(image, first[0].seed, first[0].infotext) for image in done]


# ---- the scripts by name, as the webui's API takes them (script_name, script_args) -------------------

def _args(name: str, given, defaults: list) -> list:
    """``script_args`` over the script's defaults (the webui UI's values): a shorter list keeps the rest."""
    if given is None:
        given = []
    if not isinstance(given, (list, tuple)) or len(given) > len(defaults):
        raise SdrtError(f"script_args for {name!r} must be a list of at most {len(defaults)} values, got {given!r}")
    return [*given, *defaults[len(given):]]


def script_call(p: Img2imgParams):
    """(function, keyword arguments) of the script a request names (``script_name`` / ``script_args``
    in the webui's order), checked; one-line errors for another script or bad arguments. The name is
    matched ignoring case, as the webui's API does."""
    name = p.script_name
    if not isinstance(name, str):
        raise SdrtError(f"script_name must be a script's title, got {name!r}")
    if name.lower() == POOR_MAN.lower():
        name = POOR_MAN
        pixels, mask_blur, fill, direction = _args(name, p.script_args, [128, 4, 0, list(DIRECTIONS)])
        if isinstance(fill, bool) or fill not in range(4):
            raise SdrtError(f"poor man's outpainting masked content must be 0..3 (fill, original, latent noise, "
                            f"latent nothing), got {fill!r}")
        check_mk2(pixels, mask_blur, direction, 0.0, 0.0)
        return poor_mans_outpainting, {"pixels": int(pixels), "mask_blur": int(mask_blur), "inpainting_fill": int(fill),
                                       "direction": list(direction)}
    if name.lower() == MK2.lower():
        name = MK2
        # the first value is the script's info text (a gr.HTML in its UI), ignored
        _, pixels, mask_blur, direction, noise_q, color_variation = _args(
            name, p.script_args, [None, 128, 8, list(DIRECTIONS), 1.0, 0.05])
        check_mk2(pixels, mask_blur, direction, noise_q, color_variation)
        return outpainting_mk2, {"pixels": int(pixels), "mask_blur": int(mask_blur), "direction": list(direction),
                                 "noise_q": float(noise_q), "color_variation": float(color_variation)}
    raise SdrtError(f"script_name {name!r}: sdrt runs the img2img scripts {POOR_MAN!r} and {MK2!r}")


def grown_size(p: Img2imgParams) -> tuple[int, int]:
    """(width, height) of the image the script ``p`` names makes from its first init image (every
    pass of either script is at most that large)."""
    _, kwargs = script_call(p)
    image = p.init_images if isinstance(p.init_images, Image.Image) else p.init_images[0]
    left, right, up, down = (kwargs["pixels"] if d in kwargs["direction"] else 0 for d in DIRECTIONS)
    return math.ceil((image.width + left + right) / 64) * 64, math.ceil((image.height + up + down) / 64) * 64


def run_script(pipe, p: Img2imgParams, callback=None) -> list[GeneratedImage]:
    """The images of the script ``p`` names, run on ``pipe``."""
    fn, kwargs = script_call(p)
    base = p.replace(script_name=None, script_args=[])
    out = fn(pipe, base, callback=callback, **kwargs)
    return out if isinstance(out, list) else [out]
