"""A request resolved once: ``make_plan`` checks every parameter against the bundle before any work
and fixes what the stages need (sampler, concrete schedule, size, seeds per image, sampler options,
the infotext fields), so no stage resolves a name or validates a value again."""

from __future__ import annotations

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

MAX_SEED = 2**32 - 1


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
              check_clip_skip: Callable[[int], None] | None = None) -> Plan:
    """Validate ``p`` against ``bundle`` with one-line errors, and resolve it.

    ``check_clip_skip``: the text encoder's own check of the CLIP skip it can give."""
    if not isinstance(p.prompt, str) or not isinstance(p.negative_prompt, str):
        raise SdrtError("prompt and negative prompt must be text")
    info, schedule = sampling.resolve(p.sampler_name, p.scheduler)
    _integers(p, "steps", "batch_size", "n_iter", "seed", "subseed", "seed_resize_from_w", "seed_resize_from_h",
              "clip_skip", "ensd")
    width, height = p.width or bundle.default_size[0], p.height or bundle.default_size[1]
    f = bundle.vae_scale_factor
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 8 or v % f:
            raise SdrtError(f"{name} must be a positive multiple of {max(8, f)}, got {v}")
    sampling.check_steps(info, p.steps)
    for name in ("cfg_scale", "subseed_strength", "s_noise", "s_churn", "s_tmin", "s_tmax"):
        if not _finite(getattr(p, name)):
            raise SdrtError(f"{name} must be a finite number, got {getattr(p, name)!r}")
    if p.eta is not None and not _finite(p.eta):
        raise SdrtError(f"eta must be a finite number, got {p.eta!r}")
    if not 0.0 <= p.subseed_strength <= 1.0:
        raise SdrtError(f"variation seed strength must be in [0, 1], got {p.subseed_strength}")
    if p.batch_size < 1 or p.n_iter < 1:
        raise SdrtError("batch size and batch count must be at least 1")
    rng = check_source(p.rng)
    if check_clip_skip is not None:
        check_clip_skip(p.clip_skip)
    options = sampling.sampler_options(info, eta=p.eta, s_noise=p.s_noise, s_churn=p.s_churn,
                                       s_tmin=p.s_tmin, s_tmax=p.s_tmax)
    seed = p.seed if p.seed >= 0 else random.randrange(MAX_SEED)
    subseed = p.subseed if p.subseed >= 0 else random.randrange(MAX_SEED)
    n = p.batch_size * p.n_iter
    # With variation seeds on, the webui keeps one seed for all images and varies the subseed
    seeds = [(seed + (i if p.subseed_strength == 0 else 0)) % (MAX_SEED + 1) for i in range(n)]
    subseeds = [(subseed + i) % (MAX_SEED + 1) for i in range(n)]
    k = p.batch_size
    batches = tuple(Batch(b, tuple(seeds[b * k:(b + 1) * k]), tuple(subseeds[b * k:(b + 1) * k]))
                    for b in range(p.n_iter))
    return Plan(p, info, schedule, width, height, (bundle.latent_channels, height // f, width // f), rng,
                seed, subseed, options, batches)


def _integers(p: GenerationParams, *names: str) -> None:
    for name in names:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SdrtError(f"{name} must be a whole number, got {v!r}")


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v))
