"""Upscalers as the webui has them: latent interpolation (hires fix), the pixel upscalers None,
Lanczos and Nearest (``modules/upscaler.py``), and ``images.resize_image`` with an upscaler.

The latent modes are ``shared.latent_upscale_modes``: torch's ``interpolate(size=...)`` in one of
its modes (bilinear, bicubic, with or without antialiasing, nearest, nearest-exact), reimplemented
here in numpy by torch's CPU kernels' arithmetic (float32 indices and weights, height taps outer
and width taps inner; antialiased modes width first, then height), so no torch is needed.

ESRGAN / Real-ESRGAN networks (``models/ESRGAN/*.pth``) run as ``ModelUpscaler``: the graph the
exporter made of the file (``export/esrgan.py``), tiled as the webui's ``upscale_with_model``
(``ESRGAN_tile`` 192, ``ESRGAN_tile_overlap`` 8, ``images.split_grid`` / ``combine_grid``). They are
used by ``sdrt upscale``; hires fix takes the built-in names only so far.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.errors import SdrtError

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

# The webui's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
LATENT_DEFAULT = "Latent"  # shared.latent_upscale_default_mode: what hires fix uses with no hr_upscaler
# The webui's built-in pixel upscalers (UpscalerNone, UpscalerLanczos, UpscalerNearest)
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")

_F = np.float32
_CUBIC_A = -0.75  # torch's bicubic (non-antialiased) coefficient
_CUBIC_AA_A = -0.5  # torch's antialiased bicubic filter (PIL's)


def check_upscaler(name, *, latent: bool = True, field: str | None = None):
    """``name`` if it is an upscaler sdrt has (or a ``ModelUpscaler``), else a one-line ``SdrtError``
    listing them (naming ``field``)."""
    known = (*LATENT_MODES, *PIXEL_UPSCALERS) if latent else PIXEL_UPSCALERS
    if isinstance(name, ModelUpscaler) or (isinstance(name, str) and name in known):
        return name
    hint = " (ESRGAN / Real-ESRGAN models are not supported by sdrt yet)" if isinstance(name, str) else ""
    where = f"{field}: " if field else ""
    raise SdrtError(f"{where}unknown upscaler {name!r}{hint}; choose one of {', '.join(known)}")


# ---- latent interpolation: torch.nn.functional.interpolate(x, size, mode, antialias) -------------

def _scale(n_in: int, n_out: int) -> np.float32:
    return _F(n_in) / _F(n_out)  # area_pixel_compute_scale: float(input_size) / output_size


def _linear_taps(n_in: int, n_out: int):
    """(indices [n_out, 2], weights [n_out, 2]): HelperInterpLinear.compute_indices_weights."""
    if n_in == n_out:
        i = np.arange(n_out)
        return np.stack([i, i], 1), np.stack([np.ones(n_out, _F), np.zeros(n_out, _F)], 1)
    src = _scale(n_in, n_out) * (np.arange(n_out).astype(_F) + _F(0.5)) - _F(0.5)
    src = np.where(src < 0, _F(0), src).astype(_F)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(_F), _F(0), _F(1)).astype(_F)
    i1 = i0 + (i0 < n_in - 1)
    return np.stack([i0, i1], 1), np.stack([_F(1) - lam, lam], 1)


def _cubic_taps(n_in: int, n_out: int):
    """(indices [n_out, 4], weights [n_out, 4]): HelperInterpCubic.compute_indices_weights (A = -0.75)."""
    a = _F(_CUBIC_A)
    src = _scale(n_in, n_out) * (np.arange(n_out).astype(_F) + _F(0.5)) - _F(0.5)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(_F), _F(0), _F(1)).astype(_F)

    def conv1(x):  # |x| <= 1
        return ((a + _F(2)) * x - (a + _F(3))) * x * x + _F(1)

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - _F(5) * a) * x + _F(8) * a) * x - _F(4) * a

    x2 = _F(1) - t
    w = np.stack([conv2(t + _F(1)), conv1(t), conv1(x2), conv2(x2 + _F(1))], 1).astype(_F)
    idx = np.clip(i0[:, None] - 1 + np.arange(4)[None], 0, n_in - 1)
    return idx, w


def _aa_taps(n_in: int, n_out: int, cubic: bool):
    """(first index [n_out], weights [n_out, k]) of torch's antialiased resampling
    (_compute_indices_min_size_weights_aa): PIL's triangle or cubic (a = -0.5) filter, its support
    widened by the scale when shrinking, weights normalised per output pixel."""
    scale = _scale(n_in, n_out)
    support = _F((2.0 if cubic else 1.0) * (float(scale) if scale >= 1 else 1.0))
    invscale = _F(1.0) / scale if scale >= 1 else _F(1.0)

    def filt(x):
        x = np.abs(x.astype(_F))
        if not cubic:
            return np.where(x < 1, _F(1) - x, _F(0)).astype(_F)
        a = _F(_CUBIC_AA_A)
        near = ((a + _F(2)) * x - (a + _F(3))) * x * x + _F(1)
        far = (((x - _F(5)) * x + _F(8)) * x - _F(4)) * a
        return np.where(x < 1, near, np.where(x < 2, far, _F(0))).astype(_F)

    starts, rows = [], []
    for i in range(n_out):
        center = _F(float(scale) * (i + 0.5))
        xmin = max(int(float(center - support) + 0.5), 0)
        xsize = min(int(float(center + support) + 0.5), n_in) - xmin
        j = np.arange(xsize)
        w = filt(_F(((j + xmin).astype(_F) - center).astype(np.float64) + 0.5) * np.float64(invscale))
        total = _F(0)
        for v in w:  # summed in order, in float32
            total = _F(total + v)
        if total != 0:
            w = (w / total).astype(_F)
        starts.append(xmin)
        rows.append(w)
    k = max(len(r) for r in rows)
    weights = np.zeros((n_out, k), _F)
    for i, r in enumerate(rows):
        weights[i, :len(r)] = r
    return np.array(starts), weights


def _nearest_index(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    """torch's nearest_idx / nearest_neighbor_exact_compute_source_index."""
    i = np.arange(n_out)
    if not exact:
        if n_in == n_out:
            return i
        if n_out == 2 * n_in:
            return i >> 1
    scale = _scale(n_in, n_out)
    offset = _F(0.5) if exact else _F(0)
    return np.minimum(np.floor((i.astype(_F) + offset) * scale).astype(np.int64), n_in - 1)


def _separable_aa(x: np.ndarray, axis: int, n_out: int, cubic: bool) -> np.ndarray:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    starts, weights = _aa_taps(n_in, n_out, cubic)
    x = np.moveaxis(x, axis, -1)
    k = weights.shape[1]
    idx = np.minimum(starts[:, None] + np.arange(k)[None], n_in - 1)
    taps = x[..., idx]  # [..., n_out, k]; weights past a pixel's taps are 0
    out = taps[..., 0] * weights[:, 0]
    for j in range(1, k):
        out = (out + taps[..., j] * weights[:, j]).astype(_F)
    return np.moveaxis(out.astype(_F), -1, axis)


def interpolate(z: np.ndarray, height: int, width: int, mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """[n, c, h, w] float32 -> [n, c, height, width] as ``torch.nn.functional.interpolate(z,
    size=(height, width), mode=mode, antialias=antialias)`` (align_corners False) on the CPU."""
    z = np.asarray(z, dtype=_F)
    h, w = z.shape[2:]
    if mode in ("nearest", "nearest-exact"):
        exact = mode == "nearest-exact"
        return z[:, :, _nearest_index(h, height, exact)][..., _nearest_index(w, width, exact)]
    if mode not in ("bilinear", "bicubic"):
        raise SdrtError(f"unknown interpolation mode {mode!r}")
    if antialias:
        # separable: the width (contiguous) axis first, then the height
        return _separable_aa(_separable_aa(z, 3, width, mode == "bicubic"), 2, height, mode == "bicubic")
    taps = _cubic_taps if mode == "bicubic" else _linear_taps
    iy, wy = taps(h, height)
    ix, wx = taps(w, width)
    out = None
    for a in range(iy.shape[1]):  # height taps outer, width taps inner (torch's Interpolate<2>)
        rows = z[:, :, iy[:, a]]
        inner = rows[..., ix[:, 0]] * wx[:, 0]
        for b in range(1, ix.shape[1]):
            inner = (inner + rows[..., ix[:, b]] * wx[:, b]).astype(_F)
        term = (inner * wy[:, a][:, None]).astype(_F)
        out = term if out is None else (out + term).astype(_F)
    return out.astype(_F)


def upscale_latents(z: np.ndarray, height: int, width: int, upscaler: str) -> np.ndarray:
    """Latents to ``height`` x ``width`` by one of the webui's latent upscale modes."""
    mode, antialias = LATENT_MODES[upscaler]
    return interpolate(z, height, width, mode, antialias)


# ---- pixel upscalers: modules/upscaler.py --------------------------------------------------------

ESRGAN_TILE, ESRGAN_TILE_OVERLAP = 192, 8  # the webui's ESRGAN_tile / ESRGAN_tile_overlap defaults


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int):
    """``images.split_grid``: (tiles as [y, h, [[x, w, tile], ...]], ...) covering the image, spread evenly."""
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        tiles = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            tiles.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.append([y, tile_h, tiles])
    return grid


def combine_grid(grid, tile_h: int, image_w: int, image_h: int, overlap: int) -> Image.Image:
    """``images.combine_grid``: tiles pasted back, their overlaps blended with linear masks."""
    def ramp(shape):
        return Image.fromarray((np.arange(overlap, dtype=np.float32).reshape(shape) * 255 / overlap).astype(np.uint8),
                               "L")

    mask_w = ramp((1, overlap)).resize((overlap, tile_h), Image.Resampling.NEAREST)
    mask_h = ramp((overlap, 1)).resize((image_w, overlap), Image.Resampling.NEAREST)
    combined = Image.new("RGB", (image_w, image_h))
    for y, h, row in grid:
        line = Image.new("RGB", (image_w, h))
        for x, w, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            line.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            line.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, line.width, overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, line.width, h)), (0, y + overlap))
    return combined


class ModelUpscaler:
    """An ESRGAN-family network's graph (``image`` [1, 3, H, W] BGR in [0, 1] -> ``upscaled``), run
    as the webui's ``upscale_with_model``: in ``tile``-pixel tiles overlapping by ``overlap``
    (``tile`` 0: the whole image at once), each tile as ``upscale_pil_patch`` (BGR, rounded)."""

    def __init__(self, name: str, graph, scale: int, device: str = "cpu", tile: int = ESRGAN_TILE,
                 overlap: int = ESRGAN_TILE_OVERLAP):
        self.name, self.scale, self.tile, self.overlap = name, int(scale), int(tile), int(overlap)
        self.session = Session(graph, device)

    def patch(self, image: Image.Image) -> Image.Image:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        x = (np.ascontiguousarray(np.transpose(bgr, (2, 0, 1))) / 255).astype(np.float32)[None]
        y = self.session.run({"image": x}, ["upscaled"])["upscaled"][0]
        out = (255.0 * np.moveaxis(np.clip(y.astype(np.float32), 0, 1), 0, 2)).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]), "RGB")

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.tile <= 0:
            return self.patch(image)
        grid = split_grid(image, self.tile, self.tile, self.overlap)
        s = None
        tiles = []
        for y, h, row in grid:
            out_row = []
            for x, w, tile in row:
                up = self.patch(tile)
                s = up.width // tile.width
                out_row.append([x * s, w * s, up])
            tiles.append([y * s, h * s, out_row])
        return combine_grid(tiles, self.tile * s, image.width * s, image.height * s, self.overlap * s)


def _do_upscale(name, image: Image.Image, scale: float) -> Image.Image:
    if isinstance(name, ModelUpscaler):
        return name(image)
    if name == "None":
        return image
    size = (int(image.width * scale), int(image.height * scale))
    return image.resize(size, resample=LANCZOS if name == "Lanczos" else NEAREST)


def upscale(image: Image.Image, scale: float, upscaler: str) -> Image.Image:
    """The webui's ``Upscaler.upscale``: to ``int(side * scale) // 8 * 8`` pixels, the upscaler's
    own passes (at most three, until large enough), then Lanczos to the exact size."""
    check_upscaler(upscaler, latent=False)
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        image = _do_upscale(upscaler, image, scale)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def resize_image(mode: int, image: Image.Image, width: int, height: int, upscaler: str | None = None) -> Image.Image:
    """``image`` at ``width`` x ``height`` as the webui's ``images.resize_image``: 0 stretch; 1 scale
    to cover and crop the centre; 2 scale to fit, centre, and fill the two bands by stretching the
    image's edge rows or columns. Enlarging goes through ``upscaler`` (then Lanczos to the exact
    size); None, "None" and L-mode images (masks) use Lanczos alone. Modes 1 and 2 return RGB."""
    if image.mode == "RGBA":
        image = image.convert("RGB")

    def resize(im: Image.Image, w: int, h: int) -> Image.Image:
        if upscaler is None or upscaler == "None" or im.mode == "L":
            return im.resize((w, h), resample=LANCZOS)
        scale = max(w / im.width, h / im.height)
        if scale > 1.0:
            im = upscale(im, scale, upscaler)
        if im.size != (w, h):
            im = im.resize((w, h), resample=LANCZOS)
        return im

    if mode == 0:
        return resize(image, width, height)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    # The width is matched when covering a wider target, or fitting a wider image; else the height
    if (ratio > src_ratio) if cover else (ratio < src_ratio):
        src_w, src_h = width, image.height * width // image.width
    else:
        src_w, src_h = image.width * height // image.height, height
    resized = resize(image, src_w, src_h)
    out = Image.new("RGB", (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    out.paste(resized, box=(left, top))
    if cover:
        return out
    if ratio < src_ratio and top > 0:  # bands above and below: the first and last rows stretched
        out.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, top), box=(0, resized.height, width, resized.height)), box=(0, top + src_h))
    elif ratio > src_ratio and left > 0:  # bands left and right: the first and last columns stretched
        out.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((left, height), box=(resized.width, 0, resized.width, height)), box=(left + src_w, 0))
    return out


# ---- the Extras tab: one image upscaled (scripts/postprocessing_upscale.py) ---------------------------

_REFUSED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
                  "F": "32-bit float"}


def extras_upscale(image: Image.Image, scale: float, upscaler: str) -> tuple[Image.Image, dict]:
    """(the image upscaled, its "postprocessing" fields) as the webui's Extras "Scale by": the image
    converted to RGB (refused by name: 16-bit / 32-bit modes, which Pillow's conversion clips),
    then ``Upscaler.upscale``; the upscaler "None" leaves the image as it is (the webui skips the step)."""
    check_upscaler(upscaler, latent=False)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise SdrtError(f"scale must be a number above 0, got {scale!r}")
    if image.mode in _REFUSED_MODES:
        raise SdrtError(f"image mode {image.mode} ({_REFUSED_MODES[image.mode]} pixels) is not supported: "
                        "convert it to 8-bit RGB")
    image = image.convert("RGB")
    if upscaler == "None":
        return image, {}
    out = upscale(image, scale, upscaler)
    if out.width < 1 or out.height < 1:
        raise SdrtError(f"{image.width}x{image.height} scaled by {scale:g} is empty")
    name = upscaler.name if isinstance(upscaler, ModelUpscaler) else upscaler
    return out, {"Postprocess upscale by": f"{scale:g}", "Postprocess upscaler": name}
