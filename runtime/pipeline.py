"""txt2img: prompt -> conditioning -> sampling -> VAE decode -> images with webui infotext."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime import __version__, png, sampling, schedules
from sdrt.runtime.bundle import Bundle, open_bundle
from sdrt.runtime.denoiser import CFGDenoiser, Denoiser
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.rng import ImageRNG
from sdrt.runtime.sessions import Session
from sdrt.runtime.text import TextEncoder

log = logging.getLogger(__name__)

RNG_SOURCES = ("cpu", "gpu", "nv")
MAX_SEED = 2**32 - 1


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None  # None: the bundle's default size
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    rng: str = "cpu"
    ensd: int = 0


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, truncating like the webui's ``astype(np.uint8)``."""
    return (255.0 * np.moveaxis(x, 0, 2)).astype(np.uint8)


# callback(event) with event = {"image": k, "images": n, "step": i, "steps": s, "x": latents, ...}
StepCallback = Callable[[dict], None]


class Pipeline:
    """A bundle's sessions, loaded once, serving any number of generations."""

    def __init__(self, bundle: Bundle | str | Path, device: str = "cpu"):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.device = device
        self.text_encoder = TextEncoder(self.bundle, device)
        self.unet = Session(self.bundle.component("unet"), device)
        self.vae_decoder = Session(self.bundle.component("vae_decoder"), device)
        self.denoiser = Denoiser(self.unet, schedules.alphas_cumprod(**self.bundle.scheduler),
                                 self.bundle.prediction_type)

    def check(self, p: GenerationParams) -> tuple[sampling.SamplerInfo, str, int, int]:
        """Validate everything before any work, with one-line errors."""
        info, schedule = sampling.resolve(p.sampler, p.scheduler)
        width, height = p.width or self.bundle.default_size[0], p.height or self.bundle.default_size[1]
        f = self.bundle.vae_scale_factor
        for name, v in (("width", width), ("height", height)):
            if v <= 0 or v % 8 or v % f:
                raise SdrtError(f"{name} must be a positive multiple of {max(8, f)}, got {v}")
        if p.steps < 1:
            raise SdrtError(f"steps must be at least 1, got {p.steps}")
        if p.batch_size < 1 or p.batch_count < 1:
            raise SdrtError("batch size and batch count must be at least 1")
        if p.rng not in RNG_SOURCES:
            raise SdrtError(f"unknown RNG source {p.rng!r}; valid sources: {', '.join(RNG_SOURCES)}")
        if p.clip_skip < 1:
            raise SdrtError(f"clip skip must be at least 1, got {p.clip_skip}")
        if not np.isfinite(p.cfg_scale):
            raise SdrtError(f"CFG scale must be a finite number, got {p.cfg_scale}")
        return info, schedule, width, height

    def conditioning(self, p: GenerationParams) -> tuple[np.ndarray, np.ndarray]:
        """(cond, uncond) [1, 77 * chunks, hidden], the shorter padded with empty chunks to match."""
        cond = self.text_encoder.encode([p.prompt], p.clip_skip)
        uncond = self.text_encoder.encode([p.negative_prompt], p.clip_skip, min_chunks=cond.shape[1] // 77)
        if uncond.shape[1] > cond.shape[1]:
            cond = self.text_encoder.encode([p.prompt], p.clip_skip, min_chunks=uncond.shape[1] // 77)
        return cond, uncond

    def sample(self, p: GenerationParams, seeds: list[int], cond: np.ndarray, uncond: np.ndarray,
               callback: StepCallback | None = None) -> np.ndarray:
        """Latents for one batch of seeds: webui noise, the sampler over its schedule, CFG."""
        info, schedule, width, height = self.check(p)
        sigmas = sampling.sigmas_for(schedule, p.steps, self.denoiser.sigmas)
        f = self.bundle.vae_scale_factor
        rng = ImageRNG((self.bundle.latent_channels, height // f, width // f), seeds, source=p.rng, ensd=p.ensd)
        k = len(seeds)
        model = CFGDenoiser(self.denoiser, np.repeat(cond, k, 0), np.repeat(uncond, k, 0), p.cfg_scale)

        def on_step(state):
            if not np.all(np.isfinite(state["denoised"])):
                raise SdrtError(f"the UNet produced NaN/Inf at step {state['i'] + 1} of {p.steps}")
            if callback is not None:
                callback({"step": state["i"] + 1, "steps": p.steps, **state})

        x = rng.next() * np.float32(sigmas[0])
        return info.fn(model, x, sigmas, noise=lambda s, s_next: rng.next(), callback=on_step, **info.options)

    def generate(self, p: GenerationParams, callback: StepCallback | None = None) -> list[GeneratedImage]:
        """Images for ``batch_count`` batches of ``batch_size``, seeds N, N+1, ... as in the webui."""
        info, schedule, width, height = self.check(p)
        seed = p.seed if p.seed >= 0 else random.randrange(MAX_SEED)
        all_seeds = [(seed + i) % (MAX_SEED + 1) for i in range(p.batch_size * p.batch_count)]
        cond, uncond = self.conditioning(p)
        results = []
        for b in range(p.batch_count):
            seeds = all_seeds[b * p.batch_size:(b + 1) * p.batch_size]
            latents = self.sample(p, seeds, cond, uncond,
                                  callback and (lambda e, b=b: callback({"batch": b, "batches": p.batch_count, **e})))
            for seed_i, image in zip(seeds, self.decode(latents)):
                params = self.infotext_params(p, info, seed_i, width, height)
                results.append(GeneratedImage(image, seed_i, png.infotext(p.prompt, p.negative_prompt, params)))
        return results

    def decode_float(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> [n, 3, H, W] pixels in [0, 1], one VAE run per image (as the webui decodes)."""
        out = []
        for z in latents:
            x = self.vae_decoder.run({"latent_sample": z[None] / np.float32(self.bundle.latent_scale_factor)},
                                     ["sample"])["sample"][0]
            if not np.all(np.isfinite(x)):
                raise SdrtError("the VAE decoder produced NaN/Inf")
            out.append(np.clip((x + 1.0) / 2.0, 0.0, 1.0))
        return np.stack(out)

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Latents -> 8-bit RGB images: 255 * x truncated, as the webui does (diffusers rounds)."""
        return [Image.fromarray(to_uint8(x)) for x in self.decode_float(latents)]

    def infotext_params(self, p: GenerationParams, info: sampling.SamplerInfo, seed: int,
                        width: int, height: int) -> dict:
        return {
            "Steps": p.steps,
            "Sampler": info.name,
            "Schedule type": p.scheduler,
            "CFG scale": f"{p.cfg_scale:g}",
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model hash": self.bundle.model_hash,
            "Model": self.bundle.name,
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            "ENSD": p.ensd if p.ensd and info.ancestral else None,
            "RNG": {"cpu": "CPU", "nv": "NV"}.get(p.rng),
            "Version": f"sdrt {__version__}",
        }
