"""Hires fix: txt2img at the request's size, upscaled, then an img2img pass at the larger size.

The webui's rules (``StableDiffusionProcessingTxt2Img.init`` / ``calculate_target_resolution`` /
``sample`` / ``sample_hr_pass``, ``setup_img2img_steps`` with steps given):

- the target: ``int(width * hr_scale)`` x ``int(height * hr_scale)``; or ``hr_resize_x`` /
  ``hr_resize_y`` (one of them 0: the other side by the aspect ratio; both: the image is scaled to
  cover that size and the latents cropped to it, ``truncate_x`` / ``truncate_y``);
- latent upscalers ("Latent", "Latent (bicubic)", ...; None means "Latent") interpolate the first
  pass's latents to ``target // 8``; pixel upscalers (None, Lanczos, Nearest) decode them, resize
  the 8-bit images (``images.resize_image`` with the upscaler) and encode them again;
- the second pass is img2img from those latents with ``denoising_strength``: a schedule of
  ``int(n / min(d, 0.999))`` steps of which the last ``n`` run, ``n = hr_second_pass_steps or
  steps`` (the webui always passes the steps there, so ``img2img_fix_steps`` makes no difference);
  the sampler ``hr_sampler_name or sampler_name``, the schedule ``hr_scheduler or scheduler``,
  the prompts ``hr_prompt or prompt`` / ``hr_negative_prompt or negative_prompt``;
- its noise: a new ImageRNG of the same seeds (variation seeds, seed resize, ENSD) at the second
  pass's latent size, its first draw the start noise (no initial noise multiplier);
- the infotext: ``Size`` the first pass's; ``Denoising strength``, ``Hires sampler`` / ``Hires
  prompt`` / ``Hires negative prompt`` (when they differ), ``Hires schedule type``, ``Hires
  upscale`` or ``Hires resize``, ``Hires steps`` (when set), ``Hires upscaler`` (when named).

The image comes out at the second pass's latent size times 8 (a target that is no multiple of 8 is
rounded down, as the webui's). Deliberate differences: the second pass's prompt-editing schedules count
its own steps (the webui offsets them by the first pass's steps: ``[a:b:N]`` with N over both
passes; prompts without editing are the same); an
interrupt during the first pass returns the first pass's image (as the webui's).

Hires checkpoint (``hr_checkpoint_name``): the second pass runs on another model's pipeline
(``Img2imgPipeline.set_hires_checkpoint``), as the webui's reload before ``sample_hr_pass``: the first
pass decoded (pixel upscalers) by the first model's VAE, encoded again by the second's; the second
pass's prompts conditioned by its text encoder (its ``<lora:>`` tags on its graphs), its UNet and
schedule; the image decoded by its VAE; ``Hires checkpoint: name [hash]`` in the infotext, first of
the hires fields (omitted for "Use same checkpoint"). ESRGAN files are
named upscalers of the pipeline (``Img2imgPipeline(upscalers={name: ModelUpscaler})``, ``sdrt
generate --esrgan-dir``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import plan as planning
from sdrt.runtime.pipeline.params import GenerationParams
from sdrt.runtime.pipeline.plan import Plan, make_plan
from sdrt.runtime.pipeline.upscale import LATENT_DEFAULT, LATENT_MODES, check_upscaler

if TYPE_CHECKING:
    from sdrt.runtime.bundle import Bundle

_SAME = {None, "", "Use same sampler", "Use same scheduler"}  # the webui's "same as the first pass"
F = 8  # the webui's opt_f: hires sizes and their latent crop are in steps of 8 pixels


def hires_steps(steps: int, denoising_strength: float) -> tuple[int, int]:
    """(schedule length, t_enc) of the second pass: the webui's ``setup_img2img_steps`` with the
    steps given (``int(steps / min(d, 0.999))`` long, ``steps - 1`` = the last ``steps`` run)."""
    d = min(denoising_strength, 0.999)
    return (int(steps / d) if denoising_strength > 0 else 0), steps - 1


def target_resolution(width: int, height: int, p: GenerationParams) -> tuple[int, int, int, int]:
    """(upscale_to_x, upscale_to_y, truncate_x, truncate_y) as ``calculate_target_resolution``;
    the truncations are in latent pixels."""
    rx, ry = p.hr_resize_x, p.hr_resize_y
    if rx == 0 and ry == 0:
        return int(width * p.hr_scale), int(height * p.hr_scale), 0, 0
    if ry == 0:
        return rx, rx * height // width, 0, 0
    if rx == 0:
        return ry * width // height, ry, 0, 0
    if width / height < rx / ry:
        x, y = rx, rx * height // width
    else:
        x, y = ry * width // height, ry
    return x, y, (x - rx) // F, (y - ry) // F


@dataclass(frozen=True)
class HiresPlan(Plan):
    """The first pass's ``Plan`` (txt2img at the request's size) plus the second pass."""

    denoising_strength: float
    upscaler: str  # "Latent ..." or a pixel upscaler
    upscale_to: tuple[int, int]  # (width, height) the first pass is upscaled to
    truncate: tuple[int, int]  # (x, y) latent pixels cut off after the upscale
    hr_sampler: sampling.SamplerInfo
    hr_schedule: str
    hr_schedule_type: str | None  # the infotext's "Hires schedule type": set when it differs from the first pass's
    hr_options: dict
    hr_steps: int  # the steps asked for (hr_second_pass_steps or steps)
    schedule_steps: int
    t_enc: int
    hr_prompt: str
    hr_negative_prompt: str
    hr_checkpoint: str | None = None  # the second pass's model as the infotext names it (name [hash]), or None

    @property
    def latent_upscale(self) -> bool:
        return self.upscaler in LATENT_MODES

    @property
    def hr_latent_shape(self) -> tuple[int, int, int]:
        (x, y), (tx, ty) = self.upscale_to, self.truncate
        return self.latent_shape[0], y // F - ty, x // F - tx

    @property
    def hr_size(self) -> tuple[int, int]:
        """(width, height) of the final image."""
        _, h, w = self.hr_latent_shape
        return w * F, h * F

    @property
    def hr_pass_steps(self) -> int:
        """The sampler steps the second pass makes (as img2img's)."""
        if self.schedule_steps == 0:
            return 0
        return max(self.t_enc - 1, 0) if self.hr_sampler.family == "timesteps" else self.t_enc + 1

    @property
    def steps(self) -> int:
        return self.params.steps + self.hr_pass_steps

    @property
    def hr_condition_steps(self) -> int:
        return self.hr_steps * 2 if self.hr_sampler.second_order else self.hr_steps

    def infotext_fields(self, model_hash: str | None, model_name: str) -> dict:
        p = self.params
        hires = {
            "Hires checkpoint": self.hr_checkpoint,
            "Hires sampler": self.hr_sampler.name if self.hr_sampler.name != self.sampler.name else None,
            "Hires prompt": self.hr_prompt if self.hr_prompt != p.prompt else None,
            "Hires negative prompt": self.hr_negative_prompt if self.hr_negative_prompt != p.negative_prompt else None,
            "Hires schedule type": self.hr_schedule_type,
        }
        if p.hr_resize_x == 0 and p.hr_resize_y == 0:
            hires["Hires upscale"] = f"{p.hr_scale:g}"
        else:
            hires["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
        hires["Hires steps"] = p.hr_second_pass_steps or None
        hires["Hires upscaler"] = p.hr_upscaler
        fields = {}
        for key, value in super().infotext_fields(model_hash, model_name).items():
            fields[key] = value
            if key == "Seed resize from":
                fields["Denoising strength"] = self.denoising_strength
            elif key == "RNG":  # the webui's extra generation params follow its fixed ones
                fields.update(hires)
        return fields


def make_hires_plan(bundle: Bundle, p: GenerationParams, upscalers: tuple[str, ...] = (),
                    hr_checkpoint: str | None = None, **plan_options) -> HiresPlan:
    """Validate a hires-fix request with one-line errors (``make_plan``'s checks and the second
    pass's) and resolve it; ``upscalers``: the names of the model upscalers the pipeline has;
    ``hr_checkpoint``: the title of the model the second pass runs on, when the request names one."""
    d = p.denoising_strength
    if isinstance(d, bool) or not isinstance(d, (int, float, np.number)) or not 0.0 <= d <= 1.0:
        raise SdrtError(f"denoising_strength must be a number in [0, 1], got {d!r}")
    for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise SdrtError(f"{name} must be a whole number >= 0, got {v!r}")
    s = p.hr_scale
    if isinstance(s, bool) or not isinstance(s, (int, float, np.number)) or not math.isfinite(s) or s <= 0:
        raise SdrtError(f"hr_scale must be a number above 0, got {s!r}")
    if p.hr_upscaler is None:
        upscaler = LATENT_DEFAULT
    elif isinstance(p.hr_upscaler, str) and p.hr_upscaler in upscalers:
        upscaler = p.hr_upscaler
    else:
        upscaler = check_upscaler(p.hr_upscaler, field="hr_upscaler")
    for name in ("hr_prompt", "hr_negative_prompt"):
        if not isinstance(getattr(p, name), str):
            raise SdrtError(f"{name} must be text")
    for name in ("hr_sampler_name", "hr_scheduler"):
        if getattr(p, name) is not None and not isinstance(getattr(p, name), str):
            raise SdrtError(f"{name} must be a name, got {getattr(p, name)!r}")
    base = make_plan(bundle, p, allow_hires=True, **plan_options)
    hr_name = p.sampler_name if p.hr_sampler_name in _SAME else p.hr_sampler_name
    hr_schedule_name = p.scheduler if p.hr_scheduler in _SAME else p.hr_scheduler
    info, schedule = sampling.resolve(hr_name, hr_schedule_name)
    label = None
    if info.family != "timesteps":  # the webui's get_sigmas: written when the second pass's differs
        label = sampling.infotext_schedule(hr_name, hr_schedule_name)
        label = label if label not in (sampling.infotext_schedule(p.sampler_name, p.scheduler), "Automatic") else None
    if info.fn is sampling.samplers.sample_unipc:
        raise SdrtError("hires fix: sampler 'UniPC' does not support img2img in sdrt yet; set hr_sampler_name "
                        "to DDIM or a k-diffusion sampler")
    steps = p.hr_second_pass_steps or p.steps
    schedule_steps, t_enc = hires_steps(steps, float(d))
    if schedule_steps > 0:
        sampling.check_steps(info, schedule_steps)
    x, y, tx, ty = target_resolution(base.width, base.height, p)
    out_w, out_h = (x // F - tx) * F, (y // F - ty) * F
    if out_w < F or out_h < F:
        raise SdrtError(f"hires fix target {x}x{y} from {base.width}x{base.height} is too small")
    planning._check_memory(bundle, out_w, out_h, p.batch_size, plan_options.get("device", "cpu"),
                           plan_options.get("vae_tile"))
    options = sampling.sampler_options(info, eta=p.eta, s_noise=p.s_noise, s_churn=p.s_churn, s_tmin=p.s_tmin,
                                       s_tmax=p.s_tmax)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Plan)}
    return HiresPlan(**fields, denoising_strength=d, upscaler=upscaler, upscale_to=(x, y), truncate=(tx, ty),
                     hr_sampler=info, hr_schedule=schedule, hr_schedule_type=label, hr_options=options, hr_steps=steps,
                     schedule_steps=schedule_steps, t_enc=t_enc, hr_prompt=p.hr_prompt or p.prompt,
                     hr_negative_prompt=p.hr_negative_prompt or p.negative_prompt, hr_checkpoint=hr_checkpoint)
