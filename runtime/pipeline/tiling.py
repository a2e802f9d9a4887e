"""Tiled VAE decoding: overlapping latent tiles decoded one at a time, blended with linear feathers.

A decode's memory grows with the image; tiles bound it by the tile size. Tiles are laid out so
that every tile has exactly the tile size (the last one is moved back to end flush with the
image instead of being cut short), so a tiled decode feeds the decoder one shape only (what a
static TensorRT engine needs). In each overlap the two tiles' pixels are blended with weights
that ramp linearly across it, so no seam shows where one tile ends.

The result is close to, not equal to, a whole-image decode: the decoder's group norms take their
statistics over the tile instead of the image and its mid-block attention sees only the tile.
tests/test_memory_modes.py measures the difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import SdrtError


@dataclass(frozen=True)
class TileSpec:
    """Tile side and the least overlap between neighbouring tiles, in latent pixels."""

    size: int = 32     # 256 image pixels at the VAE's factor 8
    overlap: int = 8   # 64 image pixels

    def __post_init__(self):
        if self.size < 2 or not 0 < self.overlap <= self.size // 2:
            raise SdrtError(f"VAE tiles of {self.size} latents need an overlap between 1 and {self.size // 2}, "
                            f"got {self.overlap}")

    @classmethod
    def from_pixels(cls, size: int, vae_scale_factor: int = 8) -> TileSpec:
        """A tile of ``size`` image pixels, overlapping its neighbours by at least a quarter of it."""
        if size <= 0 or size % vae_scale_factor:
            raise SdrtError(f"VAE tile size must be a positive multiple of {vae_scale_factor} pixels, got {size}")
        latents = size // vae_scale_factor
        return cls(latents, max(1, latents // 4))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of side ``tile`` covering ``[0, length)`` with neighbours sharing
    at least ``overlap``, spread evenly, the last one flush with the end."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def feather(length: int, before: int, after: int) -> np.ndarray:
    """Weights along one tile side: a linear ramp up over the ``before`` pixels shared with the
    previous tile, 1 in between, a ramp down over the ``after`` pixels shared with the next."""
    w = np.ones(length, dtype=np.float32)
    if before:
        w[:before] = (np.arange(before, dtype=np.float32) + 0.5) / before
    if after:
        w[length - after:] = np.minimum(w[length - after:], (np.arange(after, 0, -1, dtype=np.float32) - 0.5) / after)
    return w


def _axis(length: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, np.ndarray]]:
    """(latent start, latent size, pixel weights) of the tiles along one axis."""
    size = min(tile, length)
    starts = tile_starts(length, tile, overlap)
    out = []
    for i, s in enumerate(starts):
        before = starts[i - 1] + size - s if i > 0 else 0
        after = s + size - starts[i + 1] if i + 1 < len(starts) else 0
        out.append((s, size, feather(size * scale, before * scale, after * scale)))
    return out


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latent: np.ndarray, tiles: TileSpec,
                 scale: int) -> np.ndarray:
    """One image's latent [C, h, w] -> pixels [3, h * scale, w * scale], decoding tiles of at most
    ``tiles.size`` latents with ``decode`` ([C, th, tw] -> [3, th * scale, tw * scale])."""
    _, h, w = latent.shape
    rows, cols = _axis(h, tiles.size, tiles.overlap, scale), _axis(w, tiles.size, tiles.overlap, scale)
    out = weight = None
    for y, th, wy in rows:
        for x, tw, wx in cols:
            pixels = np.asarray(decode(latent[:, y:y + th, x:x + tw]), dtype=np.float32)
            if pixels.shape[1:] != (th * scale, tw * scale):
                raise SdrtError(f"the VAE decoder turned a {th}x{tw} latent tile into {pixels.shape[1:]} pixels, "
                                f"not a factor {scale}")
            if out is None:
                out = np.zeros((pixels.shape[0], h * scale, w * scale), dtype=np.float32)
                weight = np.zeros((h * scale, w * scale), dtype=np.float32)
            wt = wy[:, None] * wx[None, :]
            region = (slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[(slice(None), *region)] += pixels * wt
            weight[region] += wt
    return out / weight
