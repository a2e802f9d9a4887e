"""What a user asks for: the webui API's generation fields (``/sdapi/v1/txt2img``'s payload names).

``GenerationParams`` carries the fields sdrt acts on, named as the webui's API names them
(``sampler_name``, ``n_iter``, ``cfg_scale``, ...), plus the webui settings that its API passes in
``override_settings`` (``CLIP_stop_at_last_layers``, ``eta_noise_seed_delta``, ``randn_source``, ...),
here as plain fields. ``from_webui`` reads a webui payload: a field sdrt does not know is an
error naming it, and a webui field sdrt does not implement is accepted only at its neutral value
(``restore_faces: false``), so a request is never silently rendered differently than asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from sdrt.runtime.errors import SdrtError


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None  # None: the bundle's default size
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1  # batch count
    # Variation seeds and seed resize, as the webui's "Extra" seed options (0 or less: off)
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
    # The webui's settings (override_settings in its API)
    clip_skip: int = 1  # CLIP_stop_at_last_layers
    rng: str = "cpu"  # randn_source: cpu, gpu or nv (the infotext's CPU / NV accepted too)
    ensd: int = 0  # eta_noise_seed_delta
    # "Inpainting conditioning mask strength" (inpainting models only): how much of the masked
    # source the image conditioning hides, 1 all of it, 0 none (the source unmasked)
    inpainting_mask_weight: float = 1.0
    # Pad the shorter of prompt and negative prompt with empty chunks so both go through the UNet
    # in one batch (the webui's "Pad prompt/negative prompt to be same length", off there by default)
    pad_conds: bool = True
    # Hires fix (txt2img's "Hires. fix", runtime/pipeline/hires.py): a second img2img pass at
    # hr_scale times the size (or hr_resize_x / hr_resize_y), from the first pass upscaled by
    # hr_upscaler (None: "Latent"); hr_second_pass_steps 0 = steps; None / "" for the hr sampler,
    # scheduler and prompts = the first pass's. denoising_strength is the second pass's.
    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # The model the second pass runs on (the webui's "Hires checkpoint"): None / "" / "Use same
    # checkpoint" = this one; else the name of the one attached (Img2imgPipeline.set_hires_checkpoint,
    # sdrt generate --hr-checkpoint MODEL), which must share this model's latent space
    hr_checkpoint_name: str | None = None
    # The refiner (the webui's names): the second model, which the pipeline must have attached
    # (Pipeline.set_refiner; sdrt generate --refiner MODEL), takes over at the switch
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    # SDXL's conditioning settings: the crop it is told of, the refiner's aesthetic scores
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_refiner_high_aesthetic_score: float = 6.0
    sdxl_refiner_low_aesthetic_score: float = 2.5
    # webui payload fields this request type adds to the neutral ones (the img2img-only fields)
    _neutral_extra: ClassVar[dict] = {}

    def replace(self, **changes):
        """A copy with ``changes``, which may use any name ``from_webui`` accepts."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self).from_webui({**current, **changes})

    @classmethod
    def from_webui(cls, payload: dict) -> GenerationParams:
        """Parameters from a webui API payload (or keyword arguments in its names).

        One-line ``SdrtError`` for an unknown field, or a known webui field set to something sdrt
        does not do yet."""
        if not isinstance(payload, dict):
            raise SdrtError(f"generation parameters must be a mapping of field names, got {type(payload).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        neutral = {**_NEUTRAL, **cls._neutral_extra}
        values: dict = {}
        for key, value in payload.items():
            if key == "override_settings":
                # img2img's settings (img2img_fix_steps, ...) change nothing in a txt2img request
                values.update({k: v for k, v in _settings(value).items() if k in fields})
            elif key in fields:
                values[key] = value
            elif key in _ALIASES:
                # a field's own name wins over its alias, wherever each stands (webui clients send
                # sampler_index after sampler_name; the webui takes sampler_name)
                if _ALIASES[key] not in payload:
                    values[_ALIASES[key]] = value
            elif key in neutral:
                if neutral[key] is not None and value not in neutral[key]:
                    raise SdrtError(f"{key}={value!r} is not supported by sdrt yet")
            else:
                raise SdrtError(f"unknown generation parameter {key!r}")
        if "prompt" not in values:
            values["prompt"] = ""
        return cls(**values)


# Names of the same field elsewhere: sdrt's CLI spellings and the webui's settings keys
_ALIASES = {"sampler": "sampler_name", "sampler_index": "sampler_name", "batch_count": "n_iter",
            "schedule_type": "scheduler", "CLIP_stop_at_last_layers": "clip_skip",
            "eta_noise_seed_delta": "ensd", "randn_source": "rng", "pad_cond_uncond": "pad_conds"}

# webui payload fields sdrt does not act on, with the values that ask for nothing (webui clients
# such as webuiapi send them all); None: any value, because the field only configures a feature
# that is off (hires fix settings while enable_hr is false) or saving, which the caller does
_NEUTRAL: dict[str, tuple | None] = {
    "styles": (None, [], ()), "restore_faces": (None, False), "tiling": (None, False),
    "firstphase_width": (None, 0), "firstphase_height": (None, 0),
    "s_min_uncond": (None, 0, 0.0), "do_not_save_samples": None, "do_not_save_grid": None, "send_images": None,
    "save_images": (None, False), "script_name": (None, ""), "script_args": (None, [], ()),
    "alwayson_scripts": (None, {}), "override_settings_restore_afterwards": None,
    "disable_extra_networks": (None, False), "comments": (None, {}), "infotext": (None, ""),
    "firstpass_image": (None, ""), "force_task_id": None,
}

# webui settings that change a generation, read from override_settings; others are refused by name
_SETTINGS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_noise_seed_delta": "ensd", "randn_source": "rng",
             "pad_cond_uncond": "pad_conds", "s_churn": "s_churn", "s_tmin": "s_tmin",
             "s_tmax": "s_tmax", "s_noise": "s_noise",
             "img2img_fix_steps": "img2img_fix_steps", "initial_noise_multiplier": "initial_noise_multiplier",
             "inpainting_mask_weight": "inpainting_mask_weight",
             **{k: k for k in ("sdxl_crop_top", "sdxl_crop_left", "sdxl_refiner_high_aesthetic_score",
                               "sdxl_refiner_low_aesthetic_score")}}


def _settings(settings) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise SdrtError(f"override_settings must be a mapping, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise SdrtError(f"override_settings: not supported by sdrt: {', '.join(unknown)}")
    return {_SETTINGS[k]: v for k, v in settings.items()}



@dataclass
class Img2imgParams(GenerationParams):
    """An img2img request: ``/sdapi/v1/img2img``'s payload names on top of txt2img's.

    ``init_images``: PIL images (one, used for every image of a batch, or up to ``batch_size``);
    ``resize_mode``: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent
    upscale); ``img2img_fix_steps``: the webui's "do exactly the amount of steps the slider
    specifies" setting."""
    init_images: list = field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float = 0.75
    initial_noise_multiplier: float = 1.0
    img2img_fix_steps: bool = False
    # Inpainting (runtime/pipeline/inpaint.py), the webui API's names and defaults: mask (a PIL
    # image, white = repaint; None: plain img2img), mask_blur (sets both of mask_blur_x / _y),
    # inpainting_fill 0 fill / 1 original / 2 latent noise / 3 latent nothing, inpaint_full_res
    # ("only masked", the API's default; the webui's page defaults to the whole picture)
    mask: object = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    # the mask the latents are blended and filled with, when it is not ``mask`` (at the request's
    # size; the webui's poor man's outpainting sets it)
    latent_mask: object = None
    # The webui's img2img scripts by title (runtime/pipeline/outpaint.py): "Poor man's outpainting"
    # (script_args [pixels, mask_blur, inpainting_fill, direction]) and "Outpainting mk2" ([info,
    # pixels, mask_blur, direction, noise_q, color_variation]); None / "": none
    script_name: str | None = None
    script_args: list = field(default_factory=list)
    # img2img payload fields sdrt accepts at their neutral values only
    _neutral_extra: ClassVar[dict] = {"include_init_images": None, "image_cfg_scale": None}
