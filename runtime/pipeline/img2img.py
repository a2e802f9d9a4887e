"""img2img: init image(s) -> VAE encoder -> noised to the strength's sigma -> the rest of the schedule -> images.

The webui's rules (``StableDiffusionProcessingImg2Img.init`` / ``sample``, ``setup_img2img_steps``,
the samplers' ``sample_img2img``):

- each init image is flattened onto white (RGBA only, the ``img2img_background_color`` default),
  converted to RGB and resized to the request's size by ``resize_mode`` with Lanczos (no
  upscaler: the webui's ``upscaler_for_img2img`` default); mode 3 encodes the image at its own
  size and resizes the latents bilinearly instead;
- one init image serves every image of a batch; several set the batch size to their count (more
  than ``batch_size`` is an error); every batch of ``n_iter`` starts from the same latents;
- denoising strength d picks the schedule: ``steps`` sigmas, of which the last ``t_enc + 1``
  steps run, ``t_enc = int(min(d, 0.999) * steps)``; with ``img2img_fix_steps`` the schedule is
  ``int(steps / min(d, 0.999))`` long and ``steps`` of it run;
- k-diffusion samplers start from ``init + noise * sigma_sched[0]``; DDIM / PLMS from
  ``sqrt(abar) init + sqrt(1 - abar) noise`` at timestep ``timesteps[t_enc]``, then run over
  ``timesteps[:t_enc]`` (the webui's off-by-one kept); the noise is the seed's first draw of
  the webui's ImageRNG, as in txt2img, times ``initial_noise_multiplier``.

Deliberate differences from the webui:

- the init latent is the VAE posterior's mean times the latent scale factor; the webui samples
  the posterior (``DiagonalGaussianDistribution.sample``) with torch's global RNG, which no seed
  reproduces (the posterior's standard deviation is small next to the latents);
- UniPC is refused for img2img (sdrt's UniPC has no start time yet; the webui starts it at
  ``timesteps[-1] / 1000 + 1 / 1000``);
- 16-bit / 32-bit integer and float images (Pillow modes I;16, I, F) are refused by name: Pillow's
  conversion to RGB, which the webui uses, clips them to white; CMYK and palette images are
  converted as Pillow does;
- with ``img2img_fix_steps`` and strength 0 the init latents are decoded unchanged for every
  sampler (the webui does that for k-diffusion samplers and divides by zero for DDIM / PLMS).

With a ``mask`` this is inpainting (``inpaint.py``); txt2img with ``enable_hr`` runs here too, as
its second pass is img2img (``hires.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from sdrt.runtime import sampling
from sdrt.runtime.backends import open_component
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import inpaint, outpaint
from sdrt.runtime.pipeline.hires import HiresPlan, make_hires_plan
from sdrt.runtime.pipeline.params import GenerationParams, Img2imgParams
from sdrt.runtime.pipeline.plan import Batch, Plan, make_plan, noise_seeds
from sdrt.runtime.pipeline.txt2img import GeneratedImage, Pipeline, _Stopped, names_model, short_title, to_uint8
from sdrt.runtime.pipeline.upscale import resize_image, upscale_latents
from sdrt.runtime.sampling import samplers
from sdrt.runtime.sampling.denoiser import EpsTimestepModel, LCMDenoiser
from sdrt.runtime.sampling.noise import ImageRNG

# The webui's names of resize_mode 0..3 (its img2img "Resize mode" radio)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
BACKGROUND = "#ffffff"  # the webui's img2img_background_color default
_REFUSED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
                  "F": "32-bit float"}


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """(schedule length, t_enc) as the webui's ``setup_img2img_steps``: the sampler runs the
    schedule's last ``t_enc + 1`` steps (k-diffusion) or its first ``t_enc`` timesteps (DDIM / PLMS)."""
    d = min(denoising_strength, 0.999)
    if fix_steps:
        return (int(steps / d) if denoising_strength > 0 else 0), steps - 1
    return steps, int(d * steps)


def load_image(path: str | Path) -> Image.Image:
    """An init image from a file, upright by its EXIF orientation (the webui's ``images.read``);
    one-line ``SdrtError`` for a file Pillow cannot read."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise SdrtError(f"cannot read image {path}: {e}") from None


def flatten(image: Image.Image) -> Image.Image:
    """RGB as the webui's ``images.flatten``: RGBA composited onto white, other modes converted
    by Pillow (alpha of LA / PA dropped, CMYK without a color profile); refused by name: modes whose
    conversion clips (16-bit, 32-bit, float)."""
    if not isinstance(image, Image.Image):
        raise SdrtError(f"init images must be PIL images, got {type(image).__name__}")
    if image.mode in _REFUSED_MODES:
        raise SdrtError(f"init image mode {image.mode} ({_REFUSED_MODES[image.mode]} pixels) is not supported: "
                        "convert it to 8-bit RGB")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND)
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def resize_latents(z: np.ndarray, height: int, width: int) -> np.ndarray:
    """[n, c, h, w] -> [n, c, height, width] bilinearly as torch's ``interpolate(mode="bilinear")``
    (half-pixel centres, no antialiasing), which the webui's latent upscale resize mode uses."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
        i0 = src.astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0).astype(np.float32)
        return i0, i1, w1

    y0, y1, wy = axis(z.shape[2], height)
    x0, x1, wx = axis(z.shape[3], width)
    rows = z[:, :, y0] * (1 - wy)[:, None] + z[:, :, y1] * wy[:, None]
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


@dataclass(frozen=True)
class Img2imgPlan(Plan):
    """A txt2img ``Plan`` (sampler, size, seeds, batches) plus the init images and the step arithmetic."""

    init_images: tuple[Image.Image, ...]  # RGB; at the request's size except in latent upscale mode
    denoising_strength: float
    schedule_steps: int  # the schedule's length: steps, or more with img2img_fix_steps
    t_enc: int
    inpaint: inpaint.Inpaint | None = None  # with a mask

    @property
    def steps(self) -> int:
        """The sampler steps a batch reports (the webui's ``launch_sampling(t_enc + 1)``; DDIM and
        PLMS make one fewer than their timesteps)."""
        if self.schedule_steps == 0:
            return 0
        return max(self.t_enc - 1, 0) if self.sampler.family == "timesteps" else self.t_enc + 1

    def infotext_fields(self, model_hash: str | None, model_name: str) -> dict:
        fields = {}
        for key, value in super().infotext_fields(model_hash, model_name).items():
            fields[key] = value
            if key == "Seed resize from":  # the webui's place for it
                fields["Denoising strength"] = self.denoising_strength
            elif key == "RNG" and self.inpaint is not None:  # extra generation params follow the fixed ones
                fields.update(self.inpaint.fields)
        multiplier = self.params.initial_noise_multiplier
        return {**fields, "Noise multiplier": multiplier if multiplier != 1.0 else None}


def make_img2img_plan(bundle, p: Img2imgParams, **plan_options) -> Img2imgPlan:
    """Validate an img2img request with one-line errors (``make_plan``'s checks and img2img's) and
    resolve it; the init images are flattened and resized here."""
    if not isinstance(p, Img2imgParams):
        raise SdrtError("img2img needs Img2imgParams (init_images, denoising_strength, resize_mode)")
    d = p.denoising_strength
    if isinstance(d, bool) or not isinstance(d, (int, float, np.number)) or not 0.0 <= d <= 1.0:
        raise SdrtError(f"denoising_strength must be a number in [0, 1], got {d!r}")
    if isinstance(p.resize_mode, bool) or p.resize_mode not in range(len(RESIZE_MODES)):
        modes = ", ".join(f"{i} {name}" for i, name in enumerate(RESIZE_MODES))
        raise SdrtError(f"resize_mode must be one of {modes}; got {p.resize_mode!r}")
    m = p.initial_noise_multiplier
    if isinstance(m, bool) or not isinstance(m, (int, float, np.number)) or not np.isfinite(m):
        raise SdrtError(f"initial_noise_multiplier must be a finite number, got {m!r}")
    if p.enable_hr:
        raise SdrtError("enable_hr (hires fix) is a txt2img option; img2img does not take it")
    masked = p.mask is not None and not (isinstance(p.mask, str) and p.mask == "")
    if masked:
        inpaint.check(p)
    images = p.init_images
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise SdrtError("img2img needs at least one init image")
    images = [flatten(im) for im in images]
    if len(images) > 1:
        if len(images) > p.batch_size:
            raise SdrtError(f"{len(images)} init images for batch size {p.batch_size}: give at most "
                            "batch size images (one is used for the whole batch)")
        # The webui runs the batch at the number of images given
        p = dataclasses.replace(p, batch_size=len(images))
    plan = make_plan(bundle, p, **plan_options)
    if plan.sampler.fn is samplers.sample_unipc:
        raise SdrtError("sampler 'UniPC' does not support img2img in sdrt yet; use DDIM or a k-diffusion sampler")
    masking = None
    if masked:
        images, masking = inpaint.prepare(p, images, plan.width, plan.height, plan.latent_shape[1:])
    elif p.resize_mode != 3:
        images = [resize_image(p.resize_mode, im, plan.width, plan.height) for im in images]
    schedule_steps, t_enc = img2img_steps(p.steps, float(d), bool(p.img2img_fix_steps))
    if schedule_steps > 0:
        sampling.check_steps(plan.sampler, schedule_steps)
    base = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
    return Img2imgPlan(**base, init_images=tuple(images), denoising_strength=d, schedule_steps=schedule_steps,
                       t_enc=t_enc, inpaint=masking)


class Img2imgPipeline(Pipeline):
    """``Pipeline`` with the VAE encoder: ``pipe.img2img(prompt, init_images=[image], denoising_strength=0.75,
    ...)`` takes the webui img2img API's field names (``Img2imgParams``); txt2img calls work as before."""

    def __init__(self, bundle, *args, half_vae: bool = True, upscalers: dict | None = None, **kwargs):
        super().__init__(bundle, *args, half_vae=half_vae, **kwargs)
        # hires fix's model upscalers by name (ESRGAN files: upscale.ModelUpscaler), beside the built-in ones
        self.upscalers = dict(upscalers or {})
        self.vae_encoder = open_component(self.bundle, "vae_encoder", self.device,
                                          self.precision if half_vae else "fp32", lazy=True)
        if self.vae is not None:
            self.vae.apply("vae_encoder", self.vae_encoder)
        self._encoded: tuple[Img2imgPlan, np.ndarray] | None = None
        self._current: Plan | None = None  # the plan being generated (its inpainting overlays)
        self._hr_conds: tuple[HiresPlan, object, object] | None = None  # hires fix's second-pass prompts

    hires_checkpoint: Img2imgPipeline | None = None  # the model hr_checkpoint_name may name (set_hires_checkpoint)

    def set_hires_checkpoint(self, pipe: Img2imgPipeline | None) -> None:
        """Attach the pipeline of the model hires fix's second pass may run on (the webui's "Hires
        checkpoint"): a request names it in ``hr_checkpoint_name`` (its bundle name or ``"name
        [hash]"``). It must share this model's latent space (channels, scale factors); it follows
        this pipeline's interrupt and skip."""
        if pipe is not None:
            if not isinstance(pipe, Img2imgPipeline):
                raise SdrtError("the hires checkpoint needs an Img2imgPipeline (its VAE encoder)")
            a, b = self.bundle, pipe.bundle
            space = (a.latent_channels, a.latent_scale_factor, a.vae_scale_factor)
            if space != (b.latent_channels, b.latent_scale_factor, b.vae_scale_factor):
                raise SdrtError(f"hires checkpoint {b.name} has another latent space than {a.name} "
                                f"({b.architecture}: {b.latent_channels} channels x {b.latent_scale_factor:g} vs "
                                f"{a.architecture}: {a.latent_channels} x {a.latent_scale_factor:g})")
            pipe._interrupted, pipe._skipped = self._interrupted, self._skipped
        self.hires_checkpoint = pipe

    def _hires_title(self, p: GenerationParams) -> str | None:
        """The title (``name [hash]``, the webui's ``short_title``) of the model ``hr_checkpoint_name``
        names, None for the same model; one-line errors for a model that is neither this one nor the
        one attached."""
        given = p.hr_checkpoint_name
        if given in (None, "", "Use same checkpoint"):
            return None
        if not isinstance(given, str):
            raise SdrtError(f"hr_checkpoint_name must be a model's name, got {given!r}")
        for pipe in (self.hires_checkpoint, self):
            if pipe is not None and names_model(given, pipe):
                return short_title(pipe)
        attached = f"the one attached is {short_title(self.hires_checkpoint)}" if self.hires_checkpoint \
            else "none is attached (sdrt generate --hr-checkpoint MODEL; Img2imgPipeline.set_hires_checkpoint)"
        raise SdrtError(f"hr_checkpoint_name {given!r} is not a model loaded here: {attached}")

    def _hires_pipe(self, plan: Plan) -> Img2imgPipeline:
        """The pipeline that runs a hires plan's second pass: the attached hires checkpoint when the
        plan names it, else this one."""
        other = self.hires_checkpoint
        if isinstance(plan, HiresPlan) and other is not None and plan.hr_checkpoint == short_title(other):
            return other
        return self

    def _decoder(self, plan: Plan) -> Pipeline:
        return self._hires_pipe(plan)

    def img2img(self, prompt: str = "", **params) -> list[GeneratedImage]:
        """Images from ``init_images`` and ``prompt``; one-line ``SdrtError`` for a wrong argument."""
        return self.generate(Img2imgParams.from_webui({"prompt": prompt, **params}))

    def plan(self, p: GenerationParams) -> Plan:
        self.check_refiner(p)
        tile = self.vae_tiling.size if self.vae_tiling is not None else None
        options = {"check_clip_skip": self.text_encoder.check_clip_skip, "device": self.device, "vae_tile": tile}
        if isinstance(p, Img2imgParams):
            if p.script_name not in (None, ""):
                outpaint.script_call(p)  # the script's arguments checked; its runs make their own plans
            return make_img2img_plan(self.bundle, p, **options)
        if p.enable_hr:
            return make_hires_plan(self.bundle, p, upscalers=tuple(self.upscalers), hr_checkpoint=self._hires_title(p),
                                   **options)
        return super().plan(p)

    def conditioning(self, plan: Plan | GenerationParams):
        plan = self._as_plan(plan)
        conds = super().conditioning(plan)
        if isinstance(plan, HiresPlan):
            self._hires_conditioning(plan)
        return conds

    def _hires_conditioning(self, plan: HiresPlan):
        """The second pass's (cond, uncond): hr_prompt / hr_negative_prompt over its steps, at the
        upscaled size (the webui's ``calculate_hr_conds``); made once per plan."""
        if self._hr_conds is None or self._hr_conds[0] is not plan:
            p = plan.params
            width, height = plan.upscale_to
            hr = self._hires_pipe(plan)
            if hr is not self:  # the webui activates the second pass's networks on the model it loads
                hr.networks.activate(plan.hr_prompt, hr._network_sessions())
            conds = hr.text_encoder.conditioning(plan.hr_prompt, plan.hr_negative_prompt, plan.hr_condition_steps,
                                                   p.clip_skip, p.pad_conds, width=width, height=height,
                                                   crop=(p.sdxl_crop_top, p.sdxl_crop_left),
                                                   aesthetic=(p.sdxl_refiner_high_aesthetic_score,
                                                              p.sdxl_refiner_low_aesthetic_score))
            self._hr_conds = (plan, *conds)
        return self._hr_conds[1:]

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> scaled latents [n, C, h, w]: one encoder run per image (as the webui), the
        posterior's mean times the latent scale factor."""
        pixels = []
        for im in images:
            x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
            pixels.append(np.moveaxis(x, 2, 0) * np.float32(2.0) - np.float32(1.0))
        return self.encode_pixels(pixels)

    def encode_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Images [3, H, W] in [-1, 1] -> scaled latents [n, C, h, w], as ``encode``."""
        c = self.bundle.latent_channels
        out = []
        for x in pixels:
            x = np.ascontiguousarray(x, dtype=np.float32)[None]
            params = self.vae_encoder.run({"sample": x}, ["latent_parameters"])["latent_parameters"]
            z = params[0, :c] * np.float32(self.bundle.latent_scale_factor)
            if not np.all(np.isfinite(z)):
                raise SdrtError(f"the VAE encoder produced NaN/Inf ({Path(self.vae_encoder.path).name})")
            out.append(z.astype(np.float32))
        return np.stack(out)

    def image_conditioning(self, plan: Plan, images: int, sources: Sequence[Image.Image] | None = None,
                           mask: Image.Image | None = None) -> np.ndarray | None:
        """An inpainting model's image conditioning, [images, 1 + latent channels, h, w] (None for other
        models): the webui's ``inpainting_image_conditioning``. The mask (white: repainted; rounded,
        as the webui's ``mask_round``; all ones without one: txt2img, img2img without a mask, the hires
        pass) at the processing size, the source images with the masked part set to 0 (mid-grey)
        encoded, the mask brought to the latent size by nearest sampling (torch's ``interpolate``).
        With ``inpainting_mask_weight`` w (the webui's "inpainting conditioning mask strength") the
        encoded source is ``lerp(source, source * (1 - mask), w)`` as the webui's, so a request
        without a mask but with w < 1 conditions on ``source * (1 - w)``."""
        if not self.denoiser.image_channels:
            return None
        # encoded once per plan, as the init latents: every batch of a request has the same conditioning
        if self._conditioned is None or self._conditioned[0] is not plan:
            self._conditioned = (plan, self._encode_conditioning(plan, sources, mask))
        cond = self._conditioned[1]
        return np.repeat(cond, images, axis=0) if len(cond) == 1 else cond

    _conditioned: tuple | None = None  # (plan, its image conditioning)

    def _encode_conditioning(self, plan: Plan, sources, mask) -> np.ndarray:
        h, w = plan.latent_shape[1:]
        if mask is None:
            m = np.ones((plan.height, plan.width), np.float32)
        else:
            m = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
            if getattr(plan.params, "mask_round", True):
                m = np.around(m)
        weight = np.float32(plan.params.inpainting_mask_weight)
        if not sources or (mask is None and weight == 1.0):
            pixels = [np.zeros((3, *m.shape), np.float32)]  # every pixel masked: the source does not matter
        else:
            if any(im.size != (plan.width, plan.height) for im in sources):  # latent upscale keeps the size
                raise SdrtError("an inpainting model's image conditioning needs the init image at the processing "
                                "size; resize mode 3 (latent upscale) does not give it")
            # lerp(a, a * (1 - m), w) = a * (1 - w * m), in [-1, 1] as the webui's source_image
            pixels = [(np.moveaxis(np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0), 2, 0)
                       * np.float32(2.0) - np.float32(1.0)) * (np.float32(1.0) - weight * m) for im in sources]
        z = self.encode_pixels(pixels)
        self._done_with(self.vae_encoder, "med", "low")
        rows = (np.arange(h) * (m.shape[0] / h)).astype(np.int64).clip(max=m.shape[0] - 1)
        cols = (np.arange(w) * (m.shape[1] / w)).astype(np.int64).clip(max=m.shape[1] - 1)
        small = np.broadcast_to(m[rows][:, cols], (len(z), 1, h, w))
        return np.concatenate([small, z], axis=1).astype(np.float32)

    def init_latents(self, plan: Img2imgPlan) -> np.ndarray:
        """The plan's init latents at the latent size, encoded once per plan (every batch starts from them)."""
        if self._encoded is None or self._encoded[0] is not plan:
            z = self.encode(plan.init_images)
            if plan.params.resize_mode == 3:
                z = resize_latents(z, plan.latent_shape[1], plan.latent_shape[2])
            self._done_with(self.vae_encoder, "med", "low")
            self._encoded = (plan, z)
        return self._encoded[1]

    def generate(self, p, callback=None) -> list[GeneratedImage]:
        """As ``Pipeline.generate``; a request naming a script (``script_name``: the outpainting
        scripts) runs the script, which makes its own requests."""
        script = p.params if isinstance(p, Plan) else p
        if isinstance(script, Img2imgParams) and script.script_name not in (None, ""):
            return outpaint.run_script(self, script, callback)
        self._current = self._as_plan(p)
        try:
            return super().generate(self._current, callback)
        finally:
            self._encoded = self._current = self._hr_conds = self._conditioned = None

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """As ``Pipeline.decode``; inpainting pastes each image back over its init image (the
        webui's ``apply_overlay``)."""
        images = super().decode(latents)
        masking = getattr(self._current, "inpaint", None)
        return masking.overlay(images) if masking is not None else images

    def loaded(self) -> list[str]:
        return super().loaded() + (["vae_encoder"] if self.vae_encoder.loaded else [])

    def _sample(self, plan: Plan, batch: Batch, cond, uncond, callback) -> np.ndarray:
        if isinstance(plan, HiresPlan):
            return self._sample_hires(plan, batch, cond, uncond, callback)
        if not isinstance(plan, Img2imgPlan):
            return super()._sample(plan, batch, cond, uncond, callback)
        p = plan.params
        init = self.init_latents(plan)
        if len(init) != len(batch.seeds):
            if len(init) != 1:
                raise SdrtError(f"{len(init)} init images for a batch of {len(batch.seeds)} seeds")
            init = np.repeat(init, len(batch.seeds), axis=0)
        rng = self.image_rng(plan, batch)
        noise = rng.next()
        if p.initial_noise_multiplier != 1.0:
            noise = noise * np.float32(p.initial_noise_multiplier)
        masking = plan.inpaint
        if masking is None:
            return self._sample_from(plan, batch, rng, init, noise, cond, uncond, callback)
        # latent noise: the first batch's seeds for every batch, as the webui's init
        seeds = noise_seeds(plan.batches[0].seeds[:len(init)], plan.rng)
        init = masking.fill_latents(init, lambda: ImageRNG(plan.latent_shape, seeds, source=plan.rng).next())
        try:
            x = self._sample_from(plan, batch, rng, init, noise, cond, uncond, callback, masking)
        except _Stopped as stop:
            stop.denoised = masking.blend(stop.denoised, init)
            raise
        return masking.blend(x, init)

    def _sample_hires(self, plan: HiresPlan, batch: Batch, cond, uncond, callback) -> np.ndarray:
        """txt2img at the request's size, upscaled (latents, or decoded pixels encoded again), then
        img2img at the larger size from the same seeds' noise at that size."""
        samples = super()._sample(plan, batch, cond, uncond, callback)
        if self._interrupted.is_set():
            return samples
        (x, y), (tx, ty) = plan.upscale_to, plan.truncate
        factor = self.bundle.vae_scale_factor
        hr_pipe = self._hires_pipe(plan)  # a hires checkpoint: its VAE encodes, its UNet samples
        if plan.latent_upscale:
            z = upscale_latents(samples, y // factor, x // factor, plan.upscaler)
        else:
            pixels = self.decode_float(samples)
            self._done_with(self.vae_decoder, "low")
            upscaler = self.upscalers.get(plan.upscaler, plan.upscaler)
            images = [resize_image(0, Image.fromarray(to_uint8(px)), x, y, upscaler) for px in pixels]
            z = hr_pipe.encode(images)
            hr_pipe._done_with(hr_pipe.vae_encoder, "med", "low")
        z = z[:, :, ty // 2:z.shape[2] - (ty + 1) // 2, tx // 2:z.shape[3] - (tx + 1) // 2]
        base = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
        (w, h), shape = plan.hr_size, (plan.latent_shape[0], *z.shape[2:])
        hr = Img2imgPlan(**{**base, "sampler": plan.hr_sampler, "schedule": plan.hr_schedule, "width": w, "height": h,
                            "latent_shape": shape, "options": plan.hr_options},
                         init_images=(), denoising_strength=plan.denoising_strength,
                         schedule_steps=plan.schedule_steps, t_enc=plan.t_enc)
        rng = self.image_rng(hr, batch)
        hr_cond, hr_uncond = self._hires_conditioning(plan)
        offset = plan.params.steps
        on_event = callback and (lambda e: callback({**e, "step": e["step"] + offset, "steps": plan.steps}))
        try:
            return hr_pipe._sample_from(hr, batch, rng, z, rng.next(), hr_cond, hr_uncond, on_event)
        except _Stopped as stop:  # the step counted over both passes, as the progress events
            stop.step += offset
            raise
        finally:
            if hr_pipe is not self:
                hr_pipe._conditioned = None

    def _sample_from(self, plan: Img2imgPlan, batch: Batch, rng: ImageRNG, init: np.ndarray, noise: np.ndarray,
                     cond, uncond, callback, masking: inpaint.Inpaint | None = None) -> np.ndarray:
        """The partial schedule from ``init`` and its start ``noise`` (``rng``'s first draw; the
        sampler draws on from ``rng``), blending in ``init`` each step with a mask."""
        info = plan.sampler
        if plan.schedule_steps == 0:
            return init
        options = dict(plan.options)

        on_step = self._on_step(plan, callback)

        def next_noise(sigma, sigma_next):
            return rng.next()

        image_cond = None
        if self.denoiser.image_channels:
            image_cond = self.image_conditioning(plan, len(init), plan.init_images,
                                                 masking.image_mask if masking else None)
        guided = self._guided(plan, cond, uncond, image_cond)
        if masking is not None:
            guided = masking.guided(guided, init, before=info.family == "timesteps")

        if info.family == "timesteps":
            ac = self.denoiser.alphas_cumprod
            timesteps = sampling.timesteps_for(info, plan.schedule_steps, len(ac))
            a = np.float32(ac[timesteps[plan.t_enc]])
            x = init * np.sqrt(a) + noise * np.sqrt(np.float32(1.0) - a)
            if plan.t_enc < 2:  # no step between the timesteps left
                return x
            return info.fn(guided(EpsTimestepModel(self.denoiser)), x, timesteps[:plan.t_enc], alphas_cumprod=ac,
                           noise=next_noise, callback=on_step, **options)
        inner = LCMDenoiser(self.denoiser) if info.family == "lcm" else self.denoiser
        sigmas = sampling.sigmas_for(plan.schedule, plan.schedule_steps, inner.schedule, sampler=info,
                                     arch=self.bundle.architecture)
        sigma_sched = sigmas[plan.schedule_steps - plan.t_enc - 1:]
        if info.fixed_schedule:
            # DPM fast / adaptive over the part of the schedule left (the webui: the last sigma above 0)
            options.update(sigma_min=float(sigma_sched[-2]), sigma_max=float(sigma_sched[0]))
        x = init + noise * np.float32(sigma_sched[0])
        sampler_noise = self.brownian_noise(plan, batch, sigmas) if info.brownian else next_noise
        return info.fn(guided(inner), x, sigma_sched, noise=sampler_noise, callback=on_step, **options)
