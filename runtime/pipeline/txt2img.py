"""txt2img: prompt -> conditioning -> sampling -> VAE decode -> images with webui infotext."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sdrt.runtime import __version__, png, sampling
from sdrt.runtime.backends import Backend, open_component
from sdrt.runtime.bundle import Bundle, open_bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks.apply import Networks
from sdrt.runtime.networks.vae import ExternalVae, with_vae_fields
from sdrt.runtime.pipeline import tiling
from sdrt.runtime.pipeline.params import GenerationParams
from sdrt.runtime.pipeline.plan import Batch, Plan, make_plan, noise_seeds
from sdrt.runtime.precision import MIXED_LAYERS, describe, resolve_precision
from sdrt.runtime.sampling import schedules
from sdrt.runtime.sampling.denoiser import (
    CFGDenoiser,
    Denoiser,
    EpsTimestepModel,
    LCMDenoiser,
    RefinerSwitch,
)
from sdrt.runtime.sampling.noise import BrownianTreeNoise, ImageRNG
from sdrt.runtime.text.encoder import (
    CondSchedule,
    MultiCond,
    make_text_encoder,
    ti_hashes,
)

log = logging.getLogger(__name__)

# normal: every graph loaded for the pipeline's life; med: the UNet stays, the text encoder and the
# VAE are loaded for their stage and released; low: every graph only for its stage (docs/NVIDIA.md)
MEMORY_MODES = ("normal", "med", "low")


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    # The step sampling stopped at when the generation was interrupted or skipped (the image is then
    # the last step's prediction, as the webui's); None for a finished image
    stopped_at: int | None = None

    def save(self, path: str | Path) -> Path:
        """Write the image as PNG at ``path`` with the webui's ``parameters`` text (atomically)."""
        return png.write_png(self.image, path, self.infotext)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, truncating like the webui's ``astype(np.uint8)``."""
    return (255.0 * np.moveaxis(x, 0, 2)).astype(np.uint8)


# callback(event) with event = {"batch": b, "batches": n, "step": i, "steps": s, "x": latents, ...}
StepCallback = Callable[[dict], None]


class _Stopped(Exception):
    """Raised from the step callback on interrupt or skip; carries the last prediction."""

    def __init__(self, denoised: np.ndarray, step: int):
        super().__init__(step)
        self.denoised, self.step = denoised, step


def with_mask_weight(fields: dict, weight: float) -> dict:
    """``fields`` with the webui's ``Conditional mask weight`` in its place: after ``Denoising
    strength`` (img2img, hires fix), else after ``Seed resize from``."""
    after = "Denoising strength" if "Denoising strength" in fields else "Seed resize from"
    out = {}
    for key, value in fields.items():
        out[key] = value
        if key == after:
            out["Conditional mask weight"] = weight
    return out



def short_title(pipe: Pipeline) -> str:
    """A model's name as the webui's infotext writes it (its checkpoint's ``short_title``: name [hash])."""
    b = pipe.bundle
    return f"{b.name} [{b.model_hash}]" if b.model_hash else b.name


def names_model(given: str, pipe: Pipeline) -> bool:
    """Whether a request's model name (``refiner_checkpoint``, ``hr_checkpoint_name``) is ``pipe``'s:
    its bundle name, its ``short_title``, or a file name / title whose stem is the bundle name."""
    return given in (pipe.bundle.name, short_title(pipe)) or Path(given.split(" [")[0]).stem == pipe.bundle.name

class Pipeline:
    """A bundle's sessions serving any number of generations: loaded once (``memory="normal"``),
    or for their stage only (``"med"``: the text encoder and VAE; ``"low"``: every graph).

    ``pipe(prompt, steps=20, sampler_name="Euler a", ...)`` takes the webui API's field names
    (``GenerationParams``); ``interrupt()`` and ``skip()``, from any thread, stop the running
    generation as the webui's buttons do."""

    def __init__(self, bundle: Bundle | str | Path, device: str = "cpu",
                 embeddings_dir: str | Path | list | None = None, memory: str = "normal",
                 vae_tiling: tiling.TileSpec | None = None, cuda_graph: bool = False,
                 precision: str = "auto", half_vae: bool = True, lora_dir: str | Path | list | None = None,
                 vae: str | Path | None = None, hypernetwork_dir: str | Path | list | None = None):
        if memory not in MEMORY_MODES:
            raise SdrtError(f"unknown memory mode {memory!r}; valid modes: {', '.join(MEMORY_MODES)}")
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.device = device
        self.memory = memory
        self.vae_tiling = vae_tiling  # None: decode whole images
        self.precision = resolve_precision(self.bundle, device, precision)
        # SDXL: both text encoders (sdrt.runtime.text.encoder.SDXLConditioner)
        self.text_encoder = make_text_encoder(self.bundle, device, embeddings_dir=embeddings_dir,
                                              precision=self.precision)
        if memory != "normal":
            self.text_encoder.release()
        unet = open_component(self.bundle, "unet", device, self.precision, lazy=memory == "low",
                              cuda_graph=cuda_graph)
        # The VAE at reduced precision only when asked (half_vae=False is the webui's --no-half-vae)
        self.vae_decoder = open_component(self.bundle, "vae_decoder", device,
                                          self.precision if half_vae else "fp32", lazy=memory != "normal")
        # An external VAE file: its weights replace the VAE graphs' (runtime/networks/vae.py)
        self.vae = ExternalVae(self.bundle, vae) if vae is not None else None
        if self.vae is not None:
            self.vae.apply("vae_decoder", self.vae_decoder)
        # The denoiser owns the UNet's backend; ``unet`` reads it there
        self.denoiser = Denoiser(unet, schedules.alphas_cumprod(**self.bundle.scheduler),
                                 self.bundle.prediction_type)
        spec = self.bundle.spec("unet")
        channels = spec.inputs[0].shape[1] if spec is not None and spec.inputs else self.bundle.latent_channels
        if isinstance(channels, int) and channels > self.bundle.latent_channels:
            # an inpainting UNet (9 = 4 latents + 1 mask + 4 masked-image latents)
            self.denoiser.image_channels = channels - self.bundle.latent_channels
        # <lora:...> tags: merged into the text encoder and UNet sessions; <hypernet:...> tags: nodes
        # added to the UNet graph (runtime/networks)
        self.networks = Networks(self.bundle, lora_dir, hypernetwork_dir)
        self._interrupted = threading.Event()
        self._warned_ranges = False  # _warn_fixed_ranges said its line
        self._skipped = threading.Event()

    @property
    def unet(self) -> Backend:
        return self.denoiser.unet

    refiner: Pipeline | None = None  # the second model requests may switch to (set_refiner)

    def set_refiner(self, refiner: Pipeline | None) -> None:
        """Attach the pipeline of a refiner model (the webui's "Refiner", an SDXL refiner or any model
        with the same latent space). A request names it in ``refiner_checkpoint`` (its bundle name or
        ``"name [hash]"``) and switches to it at ``refiner_switch_at``."""
        if refiner is not None:
            self._check_latent_space(refiner)
        self.refiner = refiner

    def _check_latent_space(self, refiner: Pipeline) -> None:
        if (refiner.bundle.latent_channels, refiner.bundle.vae_scale_factor) != (
                self.bundle.latent_channels, self.bundle.vae_scale_factor):
            raise SdrtError(f"refiner {refiner.bundle.name} has another latent space than {self.bundle.name} "
                            f"({refiner.bundle.latent_channels} vs {self.bundle.latent_channels} channels)")

    def refiner_title(self, refiner: Pipeline | None = None) -> str | None:
        """The name of the refiner (``refiner``, else the one attached) as the webui's infotext writes it."""
        refiner = refiner if refiner is not None else self.refiner
        return None if refiner is None else short_title(refiner)

    def check_refiner(self, p: GenerationParams, refiner: Pipeline | None = None) -> bool:
        """Whether ``p`` uses the refiner (the webui: ``refiner_checkpoint`` names one; its
        ``refiner_switch_at`` alone does nothing); one-line errors for a refiner that is not the one
        attached (or ``refiner``, one about to be: ``sdrt serve`` checks a request against the refiner
        it names before the job attaches it), a switch outside (0, 1], or hires fix with a refiner."""
        if p.refiner_checkpoint in (None, "", "None", "none"):
            return False
        if refiner is not None:
            self._check_latent_space(refiner)
        refiner = refiner if refiner is not None else self.refiner
        if refiner is None:
            raise SdrtError(f"refiner_checkpoint {p.refiner_checkpoint!r}: no refiner model is loaded "
                            "(sdrt generate --refiner MODEL; Pipeline.set_refiner)")
        given = str(p.refiner_checkpoint)
        if not names_model(given, refiner):
            raise SdrtError(f"refiner_checkpoint {given!r} is not the refiner loaded ({short_title(refiner)})")
        at = p.refiner_switch_at
        if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float, np.number))
                               or not 0.0 < float(at) <= 1.0):
            raise SdrtError(f"refiner_switch_at must be a number in (0, 1], got {at!r}")
        if getattr(p, "enable_hr", False):
            raise SdrtError("the refiner with hires fix is not supported by sdrt yet")
        return True

    def wrap_unet(self, wrap: Callable[[Backend], Backend]) -> None:
        """Put ``wrap(unet)`` in the UNet's place (something that runs it, such as a recorder of its
        inputs for calibration)."""
        self.denoiser.unet = wrap(self.denoiser.unet)

    def __call__(self, prompt: str = "", **params) -> list[GeneratedImage]:
        """Images for ``prompt`` with the webui API's parameters (``GenerationParams`` fields, its
        ``override_settings``); one-line ``SdrtError`` for a wrong argument."""
        return self.generate(GenerationParams.from_webui({"prompt": prompt, **params}))

    def interrupt(self) -> None:
        """Stop the running generation at the next step (the webui's Interrupt): the batch being
        sampled is decoded from its last prediction, later batches are not started."""
        self._interrupted.set()

    def skip(self) -> None:
        """Stop sampling the current batch at the next step and go on with the next (the webui's Skip)."""
        self._skipped.set()

    def plan(self, p: GenerationParams) -> Plan:
        """Validate everything before any work, with one-line errors, and resolve the request once."""
        self.check_refiner(p)
        tile = self.vae_tiling.size if self.vae_tiling is not None else None
        return make_plan(self.bundle, p, check_clip_skip=self.text_encoder.check_clip_skip, device=self.device,
                         vae_tile=tile)

    def _as_plan(self, p: Plan | GenerationParams) -> Plan:
        return p if isinstance(p, Plan) else self.plan(p)

    def conditioning(self, plan: Plan | GenerationParams) -> tuple[MultiCond, CondSchedule]:
        """(cond, uncond) over the denoiser's calls: ``AND`` parts and prompt-editing schedules."""
        plan = self._as_plan(plan)
        p = plan.params
        return self.text_encoder.conditioning(p.prompt, p.negative_prompt, plan.condition_steps, p.clip_skip,
                                              p.pad_conds, width=plan.width, height=plan.height,
                                              crop=(p.sdxl_crop_top, p.sdxl_crop_left),
                                              aesthetic=(p.sdxl_refiner_high_aesthetic_score,
                                                         p.sdxl_refiner_low_aesthetic_score))

    def sample(self, plan: Plan | GenerationParams, batch: Batch | Sequence[int], cond: MultiCond | np.ndarray,
               uncond: CondSchedule | np.ndarray, callback: StepCallback | None = None) -> np.ndarray:
        """Latents for one batch: the webui's noise, the sampler over its schedule, CFG.

        ``batch``: one of the plan's batches, or the seeds of one (variation seeds from the plan's
        subseed on). On interrupt or skip, the last step's prediction of the clean latents (as the
        webui's)."""
        plan = self._as_plan(plan)
        if not isinstance(batch, Batch):
            seeds = tuple(int(s) for s in batch)
            batch = Batch(0, seeds, tuple(plan.subseed + i for i in range(len(seeds))))
        return self._sample_batch(plan, batch, cond, uncond, callback)[0]

    def _sample_batch(self, plan: Plan, batch: Batch, cond, uncond, callback) -> tuple[np.ndarray, int | None]:
        """(latents, the step sampling stopped at on interrupt or skip, else None)."""
        try:
            return self._sample(plan, batch, cond, uncond, callback), None
        except _Stopped as stop:
            return stop.denoised, stop.step

    def _on_step(self, plan: Plan, callback: StepCallback | None) -> Callable[[dict], None]:
        """The samplers' per-step callback: NaN/Inf checks, progress events, Interrupt and Skip."""
        info = plan.sampler

        def on_step(state):
            for name in ("denoised", "x"):
                if not np.all(np.isfinite(state[name])):
                    raise SdrtError(f"{info.name}: non-finite values (NaN/Inf) in the "
                                    f"{'prediction' if name == 'denoised' else 'latents'} at step {state['i'] + 1}")
            if callback is not None:
                callback({"step": state["i"] + 1, "steps": plan.steps, **state})
            if self._interrupted.is_set() or self._skipped.is_set():
                raise _Stopped(state["denoised"], state["i"] + 1)

        return on_step

    def _guided(self, plan: Plan, cond, uncond, image_cond: np.ndarray | None = None) -> Callable:
        """Wraps a denoiser in CFG (it repeats the conds per image); DDIM CFG++ guides at cfg_scale
        / 12.5, the infotext keeping cfg_scale. With a refiner, the CFG switches to it
        (``RefinerSwitch``, recorded in ``self._switches``). ``image_cond``: an inpainting model's
        image conditioning, the same for an image's conditional and unconditional rows."""
        scale = plan.params.cfg_scale * plan.sampler.cfg_scale_multiplier
        refiner = self.check_refiner(plan.params)

        def guided(inner):
            cfg = CFGDenoiser(inner, cond, uncond, scale)
            cfg.image_cond = image_cond
            if refiner:
                cfg.refiner = self._refiner_switch(plan, inner)
                self._switches = (*self._switches, cfg.refiner)
            return cfg

        return guided

    def image_conditioning(self, plan: Plan, images: int) -> np.ndarray | None:
        """An inpainting model's image conditioning for txt2img (None for other models): the webui's
        ``txt2img_image_conditioning``, a mask of ones (everything repainted) and the latents of a
        mid-grey image, [images, 1 + latent channels, h, w]."""
        if not self.denoiser.image_channels:
            return None
        raise SdrtError("an inpainting model needs its VAE encoder for txt2img (its conditioning is an encoded "
                        "image), which this bundle lacks")

    _switches: tuple = ()  # the refiner switches of the batch being sampled

    def _refiner_switch(self, plan: Plan, inner) -> RefinerSwitch:
        """The switch to the refiner's model of the same kind as ``inner``, its conditioning computed
        at the switch and kept for the plan's later batches."""
        refiner = self.refiner
        if isinstance(inner, EpsTimestepModel):
            model, table = EpsTimestepModel(refiner.denoiser), None  # the webui: sigma is the timestep
        elif isinstance(inner, LCMDenoiser):
            model = LCMDenoiser(refiner.denoiser)
            table = inner.schedule.sigmas  # the webui reads the LCM denoiser's own 50 sigmas
        else:
            model, table = refiner.denoiser, inner.sigmas

        def conds():
            if self._refiner_conds is None or self._refiner_conds[0] is not plan:
                self._refiner_conds = (plan, refiner.conditioning(plan))
            return self._refiner_conds[1]

        at = plan.params.refiner_switch_at
        return RefinerSwitch(0.0 if at is None else at, table, model, conds)

    _refiner_conds: tuple | None = None

    @staticmethod
    def image_rng(plan: Plan, batch: Batch) -> ImageRNG:
        """The webui's noise for one batch (its ``p.rng``): each image's seed, variation seeds, ENSD."""
        p = plan.params
        return ImageRNG(plan.latent_shape, noise_seeds(batch.seeds, plan.rng), source=plan.rng, ensd=p.ensd,
                        subseeds=noise_seeds(batch.subseeds, plan.rng),
                        subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                        seed_resize_from_w=p.seed_resize_from_w)

    @staticmethod
    def brownian_noise(plan: Plan, batch: Batch, sigmas: np.ndarray) -> BrownianTreeNoise:
        """The webui's create_noise_sampler for the SDE samplers: one Brownian tree per image seed
        over the whole schedule's sigma range (img2img too, though it samples only part of it)."""
        return BrownianTreeNoise(plan.latent_shape, noise_seeds(batch.seeds, plan.rng), float(sigmas[sigmas > 0].min()),
                                 float(sigmas.max()), source=plan.rng)

    def _sample(self, plan: Plan, batch: Batch, cond, uncond, callback) -> np.ndarray:
        p, info = plan.params, plan.sampler
        rng = self.image_rng(plan, batch)
        options = dict(plan.options)

        on_step = self._on_step(plan, callback)

        def next_noise(sigma, sigma_next):
            return rng.next()

        guided = self._guided(plan, cond, uncond, self.image_conditioning(plan, len(batch.seeds)))

        if info.family == "timesteps":
            # DDIM / PLMS / UniPC: CFG on eps over DDPM timesteps, from unit-variance noise
            model = guided(EpsTimestepModel(self.denoiser))
            timesteps = sampling.timesteps_for(info, p.steps, len(self.denoiser.alphas_cumprod))
            return info.fn(model, rng.next(), timesteps, alphas_cumprod=self.denoiser.alphas_cumprod,
                           noise=next_noise, callback=on_step, **options)
        inner = LCMDenoiser(self.denoiser) if info.family == "lcm" else self.denoiser
        model = guided(inner)
        sigmas = sampling.sigmas_for(plan.schedule, p.steps, inner.schedule, sampler=info,
                                     arch=self.bundle.architecture)
        if info.fixed_schedule:
            # DPM fast / adaptive span the model's own sigma range (the webui passes it)
            options.update(sigma_min=inner.schedule.sigma_min, sigma_max=inner.schedule.sigma_max)
        x = rng.next() * np.float32(sigmas[0])
        noise = self.brownian_noise(plan, batch, sigmas) if info.brownian else next_noise
        return info.fn(model, x, sigmas, noise=noise, callback=on_step, **options)

    def _warn_fixed_ranges(self) -> None:
        """Once per pipeline: add-on networks on graphs whose int8 activation ranges were calibrated
        (int8-static, mixed's per-layer graphs) run outside what the export measured: the ranges
        and the layers kept in fp32 were chosen without the network (docs/OPTIMIZATION.md)."""
        static = (self.precision == "int8-static" or self.precision == "mixed" and any(
            v in ("int8-static", MIXED_LAYERS) for v in self.bundle.mixed_components(self.device).values()))
        if static and not self._warned_ranges:
            self._warned_ranges = True
            log.warning("precision %s: its int8 activation ranges were calibrated and its fidelity measured "
                        "without add-on networks; with them the image can be further from fp32 than measured "
                        "(--precision int8 or fp32 keep to it)", describe(self.bundle, self.device, self.precision))

    def generate(self, p: GenerationParams | Plan, callback: StepCallback | None = None) -> list[GeneratedImage]:
        """Images for ``n_iter`` batches of ``batch_size``, seeds N, N+1, ... as in the webui.

        Interrupted, it returns the images of the batches sampled so far (the one stopped included)."""
        plan = self._as_plan(p)
        p = plan.params
        self._interrupted.clear()
        networks = self.networks.activate(p.prompt, self._network_sessions())
        if any(networks.values()):
            self._warn_fixed_ranges()
        cond, uncond = self.conditioning(plan)
        self._done_with(self.text_encoder, "med", "low")
        fields = {**with_vae_fields(plan.infotext_fields(self.bundle.model_hash, self.bundle.name), self.vae),
                  **networks,
                  "TI hashes": ti_hashes(cond, uncond), "Pad conds": True if cond.padded or uncond.padded else None,
                  # sdrt's own field: the graphs' precision when not fp32 (the webui's CPU default)
                  "Precision": describe(self.bundle, self.device, self.precision) if self.precision != "fp32" else None,
                  "Version": f"sdrt {__version__}"}
        if self.denoiser.image_channels:  # the webui writes it whenever it conditions an inpainting model
            fields = with_mask_weight(fields, p.inpainting_mask_weight)
        sampled = []  # every batch sampled before any is decoded: one UNet load, then one VAE load
        for batch in plan.batches:
            if self._interrupted.is_set():
                break
            self._skipped.clear()
            on_event = callback and (lambda e, b=batch.index: callback({"batch": b, "batches": p.n_iter, **e}))
            self._switches = ()
            result = self._sample_batch(plan, batch, cond, uncond, on_event)
            sampled.append((batch, *result, any(s.switched for s in self._switches)))
        self._done_with(self.unet, "low")
        results = []
        for batch, latents, stopped, refined in sampled:
            # After the switch the webui's loaded model is the refiner: its VAE decodes
            if refined:
                decoder, image_fields = self.refiner, self._refined_fields(fields, p)
            else:  # the model that sampled last (a hires checkpoint's) decodes
                decoder, image_fields = self._decoder(plan), fields
            for seed, subseed, image in zip(batch.seeds, batch.subseeds, decoder.decode(latents)):
                text = png.infotext(p.prompt, p.negative_prompt, plan.image_fields(image_fields, seed, subseed))
                results.append(GeneratedImage(image, seed, text, stopped))
        self._done_with(self.vae_decoder, "med", "low")
        return results

    def _decoder(self, plan: Plan) -> Pipeline:
        """The pipeline whose VAE decodes the plan's images (another model's after a hires checkpoint)."""
        return self

    def _refined_fields(self, fields: dict, p: GenerationParams) -> dict:
        """The infotext with the webui's ``Refiner`` and ``Refiner switch at``, written at the switch
        (after the conditioning's fields, before ``Pad conds``, which the sampler writes at its end)."""
        refiner = {"Refiner": self.refiner_title(), "Refiner switch at": p.refiner_switch_at}
        out = {}
        for key, value in fields.items():
            if key in ("Pad conds", "Version") and "Refiner" not in out:
                out.update(refiner)
            out[key] = value
        return {**out, **refiner}

    def _network_sessions(self) -> dict[str, Backend]:
        """The sessions LoRA networks change, by component (both text encoders on SDXL)."""
        encoders = getattr(self.text_encoder, "encoders", [self.text_encoder])
        return {**{e.component: e.session for e in encoders}, "unet": self.unet}

    def _done_with(self, session: Backend, *modes: str) -> None:
        """Release a session after its stage in the given memory modes."""
        if self.memory in modes:
            session.release()

    def loaded(self) -> list[str]:
        """The components whose graphs are loaded now."""
        sessions = {"text_encoder": self.text_encoder, "unet": self.unet, "vae_decoder": self.vae_decoder}
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
        self.vae_decoder = open_component(self.bundle, "vae_decoder", self.device, "fp32", lazy=lazy)
        if self.vae is not None:
            self.vae.apply("vae_decoder", self.vae_decoder)
        return True

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Latents -> 8-bit RGB images: 255 * x truncated, as the webui does (diffusers rounds)."""
        return [Image.fromarray(to_uint8(x)) for x in self.decode_float(latents)]
