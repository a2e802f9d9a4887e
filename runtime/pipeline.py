"""txt2img: prompt -> conditioning -> sampling -> VAE decode -> images with webui infotext."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime import __version__, png, sampling, schedules, tiling
from sdrt.runtime.bundle import Bundle, open_bundle
from sdrt.runtime.denoiser import CFGDenoiser, Denoiser, EpsTimestepModel, LCMDenoiser
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.precision import resolve_precision
from sdrt.runtime.rng import BrownianTreeNoise, ImageRNG
from sdrt.runtime.sessions import Session
from sdrt.runtime.spec import ComponentSpec
from sdrt.runtime.text import CondSchedule, MultiCond, TextEncoder, ti_hashes

log = logging.getLogger(__name__)

RNG_SOURCES = ("cpu", "gpu", "nv")
# normal: every graph loaded for the pipeline's life; med: the UNet stays, the text encoder and the
# VAE are loaded for their stage and released; low: every graph only for its stage (docs/NVIDIA.md)
MEMORY_MODES = ("normal", "med", "low")
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
    # Variation seeds and seed resize, as the webui's "Extra" seed options
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    # Sampler options: None / the defaults mean the webui's settings (eta: 1 ancestral, 0 DDIM)
    eta: float | None = None
    s_noise: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0 = infinity, as the webui's setting
    # Pad the shorter of prompt and negative prompt with empty chunks so both go through the UNet
    # in one batch (the webui's "Pad prompt/negative prompt to be same length", off there by default)
    pad_conds: bool = True


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
    """A bundle's sessions serving any number of generations: loaded once (``memory="normal"``),
    or for their stage only (``"med"``: the text encoder and VAE; ``"low"``: every graph)."""

    def __init__(self, bundle: Bundle | str | Path, device: str = "cpu",
                 embeddings_dir: str | Path | list | None = None, memory: str = "normal",
                 vae_tiling: tiling.TileSpec | None = None, cuda_graph: bool = False,
                 precision: str = "auto", half_vae: bool = True):
        if memory not in MEMORY_MODES:
            raise SdrtError(f"unknown memory mode {memory!r}; valid modes: {', '.join(MEMORY_MODES)}")
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.device = device
        self.memory = memory
        self.vae_tiling = vae_tiling  # None: decode whole images
        self.precision = resolve_precision(self.bundle, device, precision)
        self.text_encoder = TextEncoder(self.bundle, device, embeddings_dir=embeddings_dir, precision=self.precision)
        if memory != "normal":
            self.text_encoder.session.release()
        self.unet = Session(self.bundle.graph("unet", device, self.precision), device, lazy=memory == "low",
                            io=self._spec("unet"), cuda_graph=cuda_graph)
        # The VAE at reduced precision only when asked (half_vae=False is the webui's --no-half-vae)
        self.vae_decoder = Session(self.bundle.graph("vae_decoder", device, self.precision if half_vae else "fp32"),
                                   device, lazy=memory != "normal", io=self._spec("vae_decoder"))
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
        sampling.check_steps(info, p.steps)
        if not 0.0 <= p.subseed_strength <= 1.0:
            raise SdrtError(f"variation seed strength must be in [0, 1], got {p.subseed_strength}")
        if p.batch_size < 1 or p.batch_count < 1:
            raise SdrtError("batch size and batch count must be at least 1")
        if p.rng not in RNG_SOURCES:
            raise SdrtError(f"unknown RNG source {p.rng!r}; valid sources: {', '.join(RNG_SOURCES)}")
        self.text_encoder.check_clip_skip(p.clip_skip)
        if not np.isfinite(p.cfg_scale):
            raise SdrtError(f"CFG scale must be a finite number, got {p.cfg_scale}")
        return info, schedule, width, height

    def conditioning(self, p: GenerationParams) -> tuple[MultiCond, CondSchedule]:
        """(cond, uncond) over the denoiser's calls: ``AND`` parts and prompt-editing schedules.

        As in the webui, schedules count the denoiser's calls, and second-order samplers get
        schedules over twice the steps (``SamplerData.total_steps``)."""
        info, _ = sampling.resolve(p.sampler, p.scheduler)
        total_steps = p.steps * 2 if info.second_order else p.steps
        return self.text_encoder.conditioning(p.prompt, p.negative_prompt, total_steps, p.clip_skip, p.pad_conds)

    def sample(self, p: GenerationParams, seeds: list[int], cond: MultiCond | np.ndarray,
               uncond: CondSchedule | np.ndarray,
               callback: StepCallback | None = None, subseeds: list[int] | None = None) -> np.ndarray:
        """Latents for one batch of seeds: webui noise, the sampler over its schedule, CFG."""
        info, schedule, width, height = self.check(p)
        f = self.bundle.vae_scale_factor
        shape = (self.bundle.latent_channels, height // f, width // f)
        rng = ImageRNG(shape, seeds, source=p.rng, ensd=p.ensd, subseeds=subseeds,
                       subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                       seed_resize_from_w=p.seed_resize_from_w)
        options = sampling.sampler_options(info, eta=p.eta, s_noise=p.s_noise, s_churn=p.s_churn,
                                           s_tmin=p.s_tmin, s_tmax=p.s_tmax)

        def on_step(state):
            for name in ("denoised", "x"):
                if not np.all(np.isfinite(state[name])):
                    raise SdrtError(f"{info.name}: non-finite values (NaN/Inf) in the "
                                    f"{'prediction' if name == 'denoised' else 'latents'} at step {state['i'] + 1}")
            if callback is not None:
                callback({"step": state["i"] + 1, "steps": p.steps, **state})

        def next_noise(sigma, sigma_next):
            return rng.next()

        def guided(inner):
            return CFGDenoiser(inner, cond, uncond, p.cfg_scale)  # it repeats the conds per image

        if info.family == "timesteps":
            # DDIM / PLMS / UniPC: CFG on eps over DDPM timesteps, from unit-variance noise
            model = guided(EpsTimestepModel(self.denoiser))
            timesteps = sampling.timesteps_for(info, p.steps, len(self.denoiser.alphas_cumprod))
            return info.fn(model, rng.next(), timesteps, alphas_cumprod=self.denoiser.alphas_cumprod,
                           noise=next_noise, callback=on_step, **options)
        inner = LCMDenoiser(self.denoiser) if info.family == "lcm" else self.denoiser
        model = guided(inner)
        sigmas = sampling.sigmas_for(schedule, p.steps, inner.schedule, sampler=info, arch=self.bundle.architecture)
        if info.fixed_schedule:
            # DPM fast / adaptive span the model's own sigma range (the webui passes it)
            options.update(sigma_min=inner.schedule.sigma_min, sigma_max=inner.schedule.sigma_max)
        x = rng.next() * np.float32(sigmas[0])
        noise = next_noise
        if info.brownian:
            # The webui's create_noise_sampler: one Brownian tree per image seed over the schedule's range
            noise = BrownianTreeNoise(shape, seeds, float(sigmas[sigmas > 0].min()), float(sigmas.max()),
                                      source=p.rng)
        return info.fn(model, x, sigmas, noise=noise, callback=on_step, **options)

    def generate(self, p: GenerationParams, callback: StepCallback | None = None) -> list[GeneratedImage]:
        """Images for ``batch_count`` batches of ``batch_size``, seeds N, N+1, ... as in the webui."""
        info, schedule, width, height = self.check(p)
        seed = p.seed if p.seed >= 0 else random.randrange(MAX_SEED)
        subseed = p.subseed if p.subseed >= 0 else random.randrange(MAX_SEED)
        n = p.batch_size * p.batch_count
        # With variation seeds on, the webui keeps one seed for all images and varies the subseed
        all_seeds = [(seed + (i if p.subseed_strength == 0 else 0)) % (MAX_SEED + 1) for i in range(n)]
        all_subseeds = [(subseed + i) % (MAX_SEED + 1) for i in range(n)]
        cond, uncond = self.conditioning(p)
        self._done_with(self.text_encoder.session, "med", "low")
        extra = {"TI hashes": ti_hashes(cond, uncond), "Pad conds": True if cond.padded or uncond.padded else None}
        batches = []  # every batch sampled before any is decoded: one UNet load, then one VAE load
        for b in range(p.batch_count):
            seeds = all_seeds[b * p.batch_size:(b + 1) * p.batch_size]
            subseeds = all_subseeds[b * p.batch_size:(b + 1) * p.batch_size]
            latents = self.sample(p, seeds, cond, uncond,
                                  callback and (lambda e, b=b: callback({"batch": b, "batches": p.batch_count, **e})),
                                  subseeds=subseeds)
            batches.append((seeds, subseeds, latents))
        self._done_with(self.unet, "low")
        results = []
        for seeds, subseeds, latents in batches:
            for seed_i, subseed_i, image in zip(seeds, subseeds, self.decode(latents)):
                params = self.infotext_params(p, info, seed_i, width, height, extra, subseed=subseed_i)
                results.append(GeneratedImage(image, seed_i, png.infotext(p.prompt, p.negative_prompt, params)))
        self._done_with(self.vae_decoder, "med", "low")
        return results

    def _spec(self, name: str) -> ComponentSpec | None:
        """The manifest's I/O spec of a component (sdrt bundles): lazy sessions answer from it unloaded."""
        entry = self.bundle.manifest["components"].get(name, {})
        return ComponentSpec.from_json(name, entry) if "inputs" in entry else None

    def _done_with(self, session: Session, *modes: str) -> None:
        """Release a session after its stage in the given memory modes."""
        if self.memory in modes:
            session.release()

    def loaded(self) -> list[str]:
        """The components whose graphs are loaded now."""
        sessions = {"text_encoder": self.text_encoder.session, "unet": self.unet, "vae_decoder": self.vae_decoder}
        return [name for name, s in sessions.items() if s.loaded]

    def decode_float(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> [n, 3, H, W] pixels in [0, 1], one VAE run per image (as the webui decodes), or one
        per tile with ``vae_tiling``."""
        def decode_one(z):
            return self.vae_decoder.run({"latent_sample": z[None]}, ["sample"])["sample"][0]

        def decode(z):
            if self.vae_tiling is not None:
                return tiling.decode_tiled(decode_one, z, self.vae_tiling, self.bundle.vae_scale_factor)
            return decode_one(z)

        out = []
        for z in latents:
            if not np.all(np.isfinite(z)):
                raise SdrtError("the latents given to the VAE decoder hold NaN/Inf")
            z = z / np.float32(self.bundle.latent_scale_factor)
            x = decode(z)
            if not np.all(np.isfinite(x)) and self._vae_to_fp32():
                x = decode(z)
            if not np.all(np.isfinite(x)):
                raise SdrtError(f"the VAE decoder produced NaN/Inf ({Path(self.vae_decoder.path).name})")
            out.append(np.clip((x + 1.0) / 2.0, 0.0, 1.0))
        return np.stack(out)

    def _vae_to_fp32(self) -> bool:
        """After NaN/Inf from a reduced-precision VAE: switch to its fp32 graph for this image and
        the rest of the pipeline's life, as the webui does ("converting VAE into 32-bit float and
        retrying"). False when the VAE already runs in fp32."""
        fp32 = self.bundle.graph("vae_decoder", self.device, "fp32")
        if Path(self.vae_decoder.path) == fp32:
            return False
        log.warning("the VAE decoder produced NaN/Inf at %s precision (%s); retrying with the fp32 graph",
                    self.precision, Path(self.vae_decoder.path).name)
        lazy = self.memory != "normal"
        self.vae_decoder.release()
        self.vae_decoder = Session(fp32, self.device, lazy=lazy, io=self._spec("vae_decoder"))
        return True

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Latents -> 8-bit RGB images: 255 * x truncated, as the webui does (diffusers rounds)."""
        return [Image.fromarray(to_uint8(x)) for x in self.decode_float(latents)]

    def infotext_params(self, p: GenerationParams, info: sampling.SamplerInfo, seed: int,
                        width: int, height: int, extra: dict | None = None, subseed: int | None = None) -> dict:
        """The webui's generation parameters, in its order; ``extra`` (its ``extra_generation_params``,
        such as ``TI hashes``) stands before ``Version`` as there."""
        options = sampling.sampler_options(info, eta=p.eta, s_noise=p.s_noise, s_churn=p.s_churn,
                                           s_tmin=p.s_tmin, s_tmax=p.s_tmax)
        return {
            "Steps": p.steps,
            "Sampler": info.name,
            "Schedule type": sampling.infotext_schedule(p.sampler, p.scheduler),
            "CFG scale": f"{p.cfg_scale:g}",
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model hash": self.bundle.model_hash,
            "Model": self.bundle.name,
            "Variation seed": subseed if p.subseed_strength else None,
            "Variation seed strength": p.subseed_strength or None,
            "Seed resize from": (f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
                                 if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0 else None),
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            # Written whenever the sampler draws from the reseeded generators (webui: uses_ensd samplers)
            "ENSD": p.ensd if p.ensd and info.draws_noise(options) else None,
            "RNG": {"cpu": "CPU", "nv": "NV"}.get(p.rng),
            **sampling.options_infotext(info, options),
            **(extra or {}),
            "Version": f"sdrt {__version__}",
        }
