"""Inpainting for regular (4-channel UNet) models, as the webui's img2img with a mask.

The webui's rules (``StableDiffusionProcessingImg2Img.init`` / ``sample``, ``modules/masking.py``,
``apply_overlay``, the CFG denoiser's mask blend), in order:

- the mask: an RGBA mask with a non-opaque alpha is its alpha, thresholded at 128 (``mask_round``);
  any other is converted to L as Pillow does; white is repainted. ``inpainting_mask_invert``
  inverts it; ``mask_blur_x`` / ``mask_blur_y`` blur it (OpenCV's 8-bit Gaussian, reimplemented
  here bit for bit: kernel ``2 * int(2.5 * blur + 0.5) + 1``, fixed-point weights, reflected borders);
- "whole picture" (``inpaint_full_res`` false): the mask is resized to the request's size by the
  resize mode, and the mask kept for the paste back is its double (``clip(2 * mask)``);
- "only masked" (``inpaint_full_res``, the API's default): the masked region's box, widened by
  ``inpaint_full_res_padding`` and grown to the request's aspect ratio, is cut from the init image
  and the mask and resized (resize and fill) to the request's size; the result is resized back
  into the box (crop and resize) and pasted into the init image. An all-black mask falls back to
  plain img2img, as the webui does;
- ``inpainting_fill``: 0 fill (the masked area painted with blurred colours from around it,
  ``masking.fill``), 1 original, 2 latent noise (the init latents replaced under the mask by the
  first batch's seeds' noise, as the webui), 3 latent nothing (zeros);
- every step the prediction is blended with the init latents, ``init * mask + x * nmask`` with the
  mask resized to the latents (bicubic, rounded): k-diffusion samplers blend the denoised
  prediction, DDIM / PLMS the latents before the UNet (the webui's ``mask_before_denoising``, with
  the clean init latents); the result is blended once more after sampling;
- the decoded image is composited over the init image outside the (blurred) mask.

Init image and mask of different sizes: as the webui, each is resized to the request's size on its
own ("whole picture"); "only masked" finds the box on the mask at its own size and cuts it from the
init image at its own size, so give both at the same size there.

Inpainting checkpoints' image conditioning (the masked image and the mask beside the latents) is
``Img2imgPipeline.image_conditioning``, from this plan's ``image_mask``. Not here: the webui's soft
inpainting. ``latent_mask`` (a second mask for the fill and the latent blend, at the
request's size) is taken as the webui takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.upscale import resize_image

# The webui's img2img "Masked content" radio, inpainting_fill 0..3
FILLS = ("fill", "original", "latent noise", "latent nothing")
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # masking.fill: (blur radius, repeats)


def binary_mask(image: Image.Image, round_mask: bool = True) -> Image.Image:
    """The webui's ``create_binary_mask``: an RGBA mask with transparency is its alpha (thresholded
    at 128 with ``round_mask``); any other mode is converted to L as Pillow does."""
    if not isinstance(image, Image.Image):
        raise SdrtError(f"the mask must be a PIL image, got {type(image).__name__}")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_mask else alpha
    return image.convert("L")


def _gaussian_kernel(n: int, sigma: float) -> np.ndarray:
    """OpenCV's bit-exact 8-bit Gaussian kernel: weights in 1/256ths, rounded with the rounding
    error carried outwards in, the centre taking what makes the sum exactly 256."""
    x = np.arange(1 - n, n, 2, dtype=np.float64)
    values = np.exp(x * x * (-0.125 / (sigma * sigma)))
    total = 0.0
    for v in values:
        total += v
    k = values * (1.0 / total)
    out = np.zeros(n, np.int64)
    err, half = 0.0, 0
    for i in range(n // 2):
        adjusted = k[i] * 256 + err
        v0 = int(np.rint(adjusted))
        err = adjusted - v0
        out[i] = out[n - 1 - i] = v0
        half += v0
    out[n // 2] = 256 - 2 * half
    return out


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 index (gfedcb|abcdefgh|gfedcba), repeated for long kernels."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def gaussian_blur(mask: np.ndarray, sigma: int, axis: int) -> np.ndarray:
    """uint8 [h, w] blurred along ``axis`` as ``cv2.GaussianBlur(mask, (k, 1) or (1, k), sigma)``
    with the webui's ``k = 2 * int(2.5 * sigma + 0.5) + 1`` (OpenCV's fixed-point 8-bit path)."""
    n = mask.shape[axis]
    size = 2 * int(2.5 * sigma + 0.5) + 1
    if n == 1 or size == 1:
        return mask
    kernel = _gaussian_kernel(size, float(sigma))
    a = np.moveaxis(mask.astype(np.int64), axis, -1)
    r = size // 2
    acc = np.zeros(a.shape, np.int64)
    for j in range(size):
        acc += a[..., _reflect101(np.arange(n) + j - r, n)] * kernel[j]
    out = np.clip((acc * 256 + (1 << 15)) >> 16, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """``masking.get_crop_region_v2``: the box around the mask's non-zero pixels, padded, or None."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)) if pad else box


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """One axis of ``expand_crop_region``: [lo, hi) grown by ``diff`` around its centre, shifted back
    inside [0, limit)."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_crop_region(region, width: int, height: int, image_width: int, image_height: int):
    """``masking.expand_crop_region``: the box grown to the processing size's aspect ratio, kept inside the image."""
    x1, y1, x2, y2 = region
    ratio_region, ratio_processing = (x2 - x1) / (y2 - y1), width / height
    if ratio_region > ratio_processing:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``masking.fill``: the masked area painted with the colours around it, blurred at falling radii."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in _FILL_LAYERS:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass(frozen=True)
class Inpaint:
    """What a masked img2img request adds to the plan, resolved once."""

    fill: int  # inpainting_fill 0..3
    latent_mask: np.ndarray  # [h, w] float32 at the latent size: 1 repainted (the webui's nmask), 0 kept
    overlays: tuple[Image.Image, ...]  # RGBA: the init image where kept, transparent where repainted
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) in the init image ("only masked")
    fields: dict  # infotext entries, in the webui's order
    # The mask at the processing size (blurred, cropped, resized): an inpainting model's conditioning
    image_mask: Image.Image | None = None

    def fill_latents(self, init: np.ndarray, noise: Callable[[], np.ndarray]) -> np.ndarray:
        """The init latents under the mask as ``inpainting_fill`` asks: latent noise (``noise()``,
        the first batch's seeds' first draw) or latent nothing (zeros); else unchanged."""
        if self.fill == 2:
            return init * (np.float32(1) - self.latent_mask) + noise() * self.latent_mask
        if self.fill == 3:
            return init * (np.float32(1) - self.latent_mask)
        return init

    def blend(self, x: np.ndarray, init: np.ndarray) -> np.ndarray:
        """``x * nmask + init * mask``, the webui's blend (the mask kept, nmask repainted)."""
        return x * self.latent_mask + init * (np.float32(1) - self.latent_mask)

    def guided(self, guided: Callable, init: np.ndarray, before: bool) -> Callable:
        """Wrap a CFG-guided model so each step blends in ``init``: the denoised prediction
        (k-diffusion), or the latents before the model (``before``: DDIM / PLMS)."""
        return lambda inner: _Blended(guided(inner), self, init, before)

    def overlay(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Decoded images (the i-th of a batch over the i-th overlay; one init image's over every
        image of the batch) pasted back as ``apply_overlay``."""
        out = []
        for i, image in enumerate(images):
            overlay = self.overlays[i if len(self.overlays) > 1 else 0]
            if self.paste_to is not None:
                x, y, w, h = self.paste_to
                base = Image.new("RGBA", overlay.size)
                base.paste(resize_image(1, image, w, h), (x, y))
                image = base
            image = image.convert("RGBA")
            image.alpha_composite(overlay)
            out.append(image.convert("RGB"))
        return out


class _Blended:
    """A CFG model with the mask blend: k-diffusion ``denoise(x, sigma)`` blended after, the
    timestep samplers' ``eps_model(x, t)`` fed the blended latents (DDIM CFG++ reads and sets the
    inner model's unconditional prediction through here)."""

    def __init__(self, model, inpaint: Inpaint, init: np.ndarray, before: bool):
        self.__dict__.update(model=model, inpaint=inpaint, init=init, before=before)

    def __call__(self, x, t):
        if self.before:
            return self.model(self.inpaint.blend(x, self.init), t)
        return self.inpaint.blend(self.model(x, t), self.init)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __setattr__(self, name, value):
        setattr(self.model, name, value)


def prepare(p, images: Sequence[Image.Image], width: int, height: int,
            latent_size: tuple[int, int]) -> tuple[list[Image.Image], Inpaint | None]:
    """(the init images as the sampler starts from them, the inpainting plan) for a request with a
    mask, as the webui's ``init``; ``images`` are flattened RGB at their own size. An all-black mask
    with "only masked" is plain img2img (None), as in the webui."""
    blur_x, blur_y = (p.mask_blur, p.mask_blur) if p.mask_blur is not None else (p.mask_blur_x, p.mask_blur_y)
    mask = binary_mask(p.mask, bool(p.mask_round))
    fields: dict = {}
    if p.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        fields["Mask mode"] = "Inpaint not masked"
    a = np.asarray(mask)
    if blur_x > 0:
        a = gaussian_blur(a, blur_x, axis=1)
    if blur_y > 0:
        a = gaussian_blur(a, blur_y, axis=0)
    mask = Image.fromarray(a)
    if blur_x > 0 or blur_y > 0:
        fields["Mask blur"] = blur_x if blur_x == blur_y else None
    region = paste_to = None
    if p.inpaint_full_res:
        overlay_mask = mask
        region = crop_region(mask, p.inpaint_full_res_padding)
        if region is None:
            return [resize_image(p.resize_mode, im, width, height) if p.resize_mode != 3 else im for im in images], None
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        x1, y1, x2, y2 = region
        mask = resize_image(2, mask.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        fields.update({"Inpaint area": "Only masked", "Masked area padding": p.inpaint_full_res_padding})
    else:
        mask = resize_image(p.resize_mode, mask, width, height)
        overlay_mask = Image.fromarray(np.clip(np.asarray(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8))
    image_mask = mask
    if p.latent_mask is not None and not (isinstance(p.latent_mask, str) and p.latent_mask == ""):
        # the webui's latent_mask: used as given (at the request's size) for the fill and the blend
        if not isinstance(p.latent_mask, Image.Image) or p.latent_mask.size != (width, height):
            raise SdrtError(f"latent_mask must be a PIL image of {width}x{height}")
        mask = p.latent_mask.convert("L")
    prepared, overlays = [], []
    for image in images:
        if region is None and p.resize_mode != 3:
            image = resize_image(p.resize_mode, image, width, height)
        elif region is None and image.size != (width, height):
            # the webui fails here too (its fill pastes a mask of another size)
            raise SdrtError(f"resize mode 3 (latent upscale) with a mask needs the init image at {width}x{height} "
                            f"for the whole picture, got {image.width}x{image.height}; use inpaint_full_res or "
                            "another resize mode")
        if overlay_mask.size != image.size:
            overlay_mask = resize_image(p.resize_mode, overlay_mask, image.width, image.height)
        kept = Image.new("RGBa", image.size)
        kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
        overlays.append(kept.convert("RGBA"))
        if region is not None:
            image = resize_image(2, image.crop(region), width, height)
        if p.inpainting_fill != 1:
            image = fill(image, mask)
        prepared.append(image)
    fields["Masked content"] = FILLS[p.inpainting_fill] if p.inpainting_fill != 1 else None
    # the latent mask: the processing-size mask resized to the latents (Pillow's default, bicubic)
    h, w = latent_size
    latent = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / np.float32(255)
    if p.mask_round:
        latent = np.around(latent)
    return prepared, Inpaint(int(p.inpainting_fill), latent.astype(np.float32), tuple(overlays), paste_to, fields,
                             image_mask)


def check(p) -> None:
    """One-line errors for the inpainting fields of an img2img request."""
    for name in ("mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise SdrtError(f"{name} must be a whole number >= 0, got {v!r}")
    v = p.mask_blur
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
        raise SdrtError(f"mask_blur must be a whole number >= 0, got {v!r}")
    if isinstance(p.inpainting_fill, bool) or p.inpainting_fill not in range(len(FILLS)):
        fills = ", ".join(f"{i} {name}" for i, name in enumerate(FILLS))
        raise SdrtError(f"inpainting_fill must be one of {fills}; got {p.inpainting_fill!r}")
    if p.inpainting_mask_invert not in (0, 1, False, True):
        raise SdrtError(f"inpainting_mask_invert must be 0 or 1, got {p.inpainting_mask_invert!r}")
