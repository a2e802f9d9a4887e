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
    # Pad the shorter of prompt and negative prompt with empty chunks so both go through the UNet
    # in one batch (the webui's "Pad prompt/negative prompt to be same length", off there by default)
    pad_conds: bool = True
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
    "enable_hr": (None, False), "denoising_strength": None, "firstphase_width": None, "firstphase_height": None,
    "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None, "hr_resize_x": None, "hr_resize_y": None,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": None,
    "hr_negative_prompt": None, "refiner_checkpoint": (None, ""), "refiner_switch_at": None,
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
             "img2img_fix_steps": "img2img_fix_steps", "initial_noise_multiplier": "initial_noise_multiplier"}


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
    specifies" setting. ``denoising_strength`` is a neutral field of txt2img (used there only by
    hires fix, as in the webui) and a real one here."""
    init_images: list = field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float = 0.75
    initial_noise_multiplier: float = 1.0
    img2img_fix_steps: bool = False
    # img2img payload fields that configure inpainting, which is off while no mask is given
    _neutral_extra: ClassVar[dict] = {
        "mask": (None, ""), "latent_mask": (None, ""), "mask_blur": None, "mask_blur_x": None, "mask_blur_y": None,
        "inpainting_fill": None, "inpaint_full_res": None, "inpaint_full_res_padding": None,
        "inpainting_mask_invert": None, "mask_round": None, "include_init_images": None,
        "image_cfg_scale": None,
    }
