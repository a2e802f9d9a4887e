"""A request resolved once: ``make_plan`` checks every parameter against the bundle before any work
and fixes what the stages need (sampler, concrete schedule, size, seeds per image, sampler options,
the infotext fields), so no stage resolves a name or validates a value again."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.params import GenerationParams
from sdrt.runtime.sampling.noise import check_source

if TYPE_CHECKING:
    from sdrt.runtime.bundle import Bundle

MAX_SEED = 2**32 - 1  # the webui draws -1's random seeds below it
# The seeds torch.Generator.manual_seed takes (the webui passes its seeds there as they are): it
# unpacks them to uint64, so negatives wrap, and mt19937 is initialised from the low 32 bits
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class Batch:
    index: int
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    params: GenerationParams
    sampler: sampling.SamplerInfo
    schedule: str  # concrete: "Automatic" resolved to the sampler's default
    width: int
    height: int
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one image's latents
    rng: str  # the noise source, canonical (cpu, gpu, nv)
    seed: int  # the first image's seed (a random one drawn here for -1)
    subseed: int
    options: dict  # the sampler's keyword options
    batches: tuple[Batch, ...]

    @property
    def steps(self) -> int:
        return self.params.steps

    @property
    def condition_steps(self) -> int:
        """The steps prompt-editing schedules count: the denoiser's calls, as in the webui, so a
        second-order sampler's schedules run over twice the steps (``SamplerData.total_steps``)."""
        return self.params.steps * 2 if self.sampler.second_order else self.params.steps

    @property
    def images(self) -> int:
        return sum(len(b.seeds) for b in self.batches)

    def infotext_fields(self, model_hash: str | None, model_name: str) -> dict:
        """The webui's generation parameters common to every image, in its order; the per-image
        ``Seed`` and ``Variation seed`` are filled in by ``image_fields``."""
        p, info = self.params, self.sampler
        return {
            "Steps": p.steps,
            "Sampler": info.name,
            "Schedule type": sampling.infotext_schedule(p.sampler_name, p.scheduler),
            "CFG scale": f"{p.cfg_scale:g}",
            "Seed": None,
            "Size": f"{self.width}x{self.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Variation seed": None,
            "Variation seed strength": p.subseed_strength or None,
            "Seed resize from": (f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
                                 if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0 else None),
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            # Written whenever the sampler draws from the reseeded generators (webui: uses_ensd samplers)
            "ENSD": p.ensd if p.ensd and info.draws_noise(self.options) else None,
            "RNG": {"cpu": "CPU", "nv": "NV"}.get(self.rng),
            **sampling.options_infotext(info, self.options),
        }

    def image_fields(self, fields: dict, seed: int, subseed: int) -> dict:
        return {**fields, "Seed": seed, "Variation seed": subseed if self.params.subseed_strength else None}


def make_plan(bundle: Bundle, p: GenerationParams, *,
              check_clip_skip: Callable[[int], None] | None = None, device: str = "cpu",
              vae_tile: int | None = None, allow_hires: bool = False) -> Plan:
    """Validate ``p`` against ``bundle`` with one-line errors, and resolve it.

    ``check_clip_skip``: the text encoder's own check of the CLIP skip it can give; ``device`` and
    ``vae_tile`` (the VAE's tile side in latent pixels, None: whole images) size the memory check.
    ``allow_hires``: the caller runs hires fix (``hires.make_hires_plan``); else ``enable_hr`` is refused."""
    if not isinstance(p.prompt, str) or not isinstance(p.negative_prompt, str):
        raise SdrtError("prompt and negative prompt must be text")
    if p.enable_hr and not allow_hires:
        raise SdrtError("hires fix (enable_hr) needs the VAE encoder's pipeline: Img2imgPipeline or sdrt.Pipeline")
    info, schedule = sampling.resolve(p.sampler_name, p.scheduler)
    _integers(p, "steps", "batch_size", "n_iter", "seed", "subseed", "seed_resize_from_w", "seed_resize_from_h",
              "clip_skip", "ensd", "sdxl_crop_top", "sdxl_crop_left")
    # None: the bundle's size; an explicit 0 is an error (the webui's API has no "0 = default")
    width = bundle.default_size[0] if p.width is None else p.width
    height = bundle.default_size[1] if p.height is None else p.height
    f = bundle.vae_scale_factor
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % 8 or v % f:
            raise SdrtError(f"{name} must be a positive multiple of {max(8, f)}, got {v}")
    sampling.check_steps(info, p.steps)
    for name in ("cfg_scale", "subseed_strength", "s_noise", "s_churn", "s_tmin", "s_tmax",
                 "sdxl_refiner_high_aesthetic_score", "sdxl_refiner_low_aesthetic_score", "inpainting_mask_weight"):
        if not _finite(getattr(p, name)):
            raise SdrtError(f"{name} must be a finite number, got {getattr(p, name)!r}")
    if p.eta is not None and not _finite(p.eta):
        raise SdrtError(f"eta must be a finite number, got {p.eta!r}")
    if not 0.0 <= p.subseed_strength <= 1.0:
        raise SdrtError(f"variation seed strength must be in [0, 1], got {p.subseed_strength}")
    if not 0.0 <= p.inpainting_mask_weight <= 1.0:  # every request: txt2img writes it in the infotext too
        raise SdrtError(f"inpainting_mask_weight must be a number in [0, 1], got {p.inpainting_mask_weight!r}")
    if p.batch_size < 1 or p.n_iter < 1:
        raise SdrtError("batch size and batch count must be at least 1")
    rng = check_source(p.rng)
    if check_clip_skip is not None:
        check_clip_skip(p.clip_skip)
    options = sampling.sampler_options(info, eta=p.eta, s_noise=p.s_noise, s_churn=p.s_churn,
                                       s_tmin=p.s_tmin, s_tmax=p.s_tmax)
    # The webui's get_fixed_seed: only -1 draws a random seed; any other seed, negative ones
    # included, is used as given (torch wraps it) and written so in the infotext
    seed = int(p.seed) if p.seed != -1 else random.randrange(MAX_SEED - 1)
    subseed = int(p.subseed) if p.subseed != -1 else random.randrange(MAX_SEED - 1)
    n = p.batch_size * p.n_iter
    # With variation seeds on, the webui keeps one seed for all images and varies the subseed
    seeds = [seed + (i if p.subseed_strength == 0 else 0) for i in range(n)]
    subseeds = [subseed + i for i in range(n)]
    _check_seeds("seed", seeds, rng, int(p.ensd))
    if p.subseed_strength:
        _check_seeds("variation seed", subseeds, rng, 0)
    _check_memory(bundle, width, height, p.batch_size, device, vae_tile)
    k = p.batch_size
    batches = tuple(Batch(b, tuple(seeds[b * k:(b + 1) * k]), tuple(subseeds[b * k:(b + 1) * k]))
                    for b in range(p.n_iter))
    return Plan(p, info, schedule, width, height, (bundle.latent_channels, height // f, width // f), rng,
                seed, subseed, options, batches)


def noise_seeds(seeds, rng: str) -> list[int]:
    """The seeds the noise generators take: the webui's torch generators take any seed in
    ``SEED_RANGE`` (negatives wrap to uint64); its NV generator keys Philox with the seed as a
    uint64, so a negative seed is wrapped here as torch would."""
    return [s % 2**64 if rng == "nv" else s for s in seeds]


def _check_seeds(name: str, seeds: list[int], rng: str, ensd: int) -> None:
    """Every seed a generator will be given (each image's, and with ENSD its reseeded one) must be
    one torch's manual_seed takes, as the webui would fail on any other."""
    lo, hi = SEED_RANGE
    for given, s in zip(seeds, noise_seeds(seeds, rng)):
        for v in (given, s + ensd) if ensd else (given,):
            if not lo <= v <= hi:
                what = f"{name} {given}" if v == given else f"{name} {given} + ENSD {ensd}"
                raise SdrtError(f"{what} is out of range: seeds are -2**63 .. 2**64-1 (torch's manual_seed), "
                                "-1 for a random one")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def memory_needed(bundle: Bundle, width: int, height: int, batch_size: int, vae_tile: int | None = None) -> int:
    """A lower bound on the bytes a generation of ``width`` x ``height`` holds at once on the CPU.

    Two terms that no graph the exporter writes avoids: one float32 attention-score matrix over
    the latent pixels (the VAE decoder's mid-block self-attention, one head, one image; ONNX
    Runtime's attention keeps the scores whole; over a tile's latents with VAE tiling), and the
    decoded batch as float32 pixels plus its 8-bit images. The UNet's first-level attention (two
    images per prompt for CFG, several heads) needs more than this, so a request refused here
    could never run; one passing it may still run out."""
    f = bundle.vae_scale_factor
    tokens = (height // f) * (width // f)
    if vae_tile is not None:
        tokens = min(tokens, vae_tile * vae_tile)
    return 4 * tokens * tokens + batch_size * 3 * width * height * (4 + 1)


def _check_memory(bundle: Bundle, width: int, height: int, batch_size: int, device: str,
                  vae_tile: int | None) -> None:
    """Refuse a request that cannot fit in the CPU's available memory. GPU devices are not checked
    here: their memory is the provider's, which reports its own allocation failures."""
    if device.split(":")[0] != "cpu":
        return
    available = available_memory()
    needed = memory_needed(bundle, width, height, batch_size, vae_tile)
    if available is not None and needed > available:
        raise SdrtError(f"{width}x{height} (batch size {batch_size}) needs at least {_gib(needed)} of memory; "
                        f"{_gib(available)} is available")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**50 else f"{n / 2**40:.3g} TiB"


def _integers(p: GenerationParams, *names: str) -> None:
    for name in names:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SdrtError(f"{name} must be a whole number, got {v!r}")


def _finite(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int beyond float's range
        return False
