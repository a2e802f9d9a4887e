"""Model configurations shipped with sdrt, so that nothing is ever fetched from a hub.

One folder per model family, each holding the diffusers / transformers configurations of the
published models (the values of their hub ``config.json`` files):

* ``sd1/``           -- Stable Diffusion 1.5 (every SD 1.x single file shares these shapes)
* ``sd2/``           -- SD 2.x 512 "base" (epsilon prediction; stable-diffusion-2-base)
* ``sd2-v/``         -- SD 2.x 768-v (v prediction; stable-diffusion-2 / 2-1)
* ``sdxl/``          -- SDXL base 1.0
* ``sdxl-refiner/``  -- the SDXL 1.0 refiner (no CLIP ViT-L: only ``text_encoder_2``)

with, per folder:

* ``unet.json``            -- ``diffusers.UNet2DConditionModel``
* ``vae.json``             -- ``diffusers.AutoencoderKL``
* ``text_encoder.json``    -- ``transformers.CLIPTextConfig``: CLIP ViT-L/14 (SD 1.x, SDXL) or OpenCLIP
  ViT-H/14 (SD 2.x, 23 of its 24 blocks: the webui's "penultimate" layer, as diffusers ships it)
* ``text_encoder_2.json``  -- OpenCLIP ViT-bigG/14 as ``CLIPTextModelWithProjection`` (SDXL)
* ``scheduler.json``       -- the training noise schedule (scaled-linear betas, the prediction type)
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The components a config set may have, in the order they are usually handled.
CONFIG_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
#: The shipped families (folders beside this file).
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner")
#: The conditioning vector's size values per family with ``text_time`` added embeddings: SDXL's
#: (original size, crop, target size) and the refiner's (original size, crop, aesthetic score).
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}


@functools.cache
def _read(family: str) -> dict:
    folder = _HERE / family
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            for name in CONFIG_NAMES if (folder / f"{name}.json").exists()}


def family_configs(family: str) -> dict:
    """The shipped configs of a family (:data:`FAMILIES`) as ``{component: dict}``; a fresh deep copy."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; shipped: {', '.join(FAMILIES)}")
    return copy.deepcopy(_read(family))


def sd1_configs() -> dict:
    """The SD 1.5 configs as ``{"unet", "vae", "text_encoder", "scheduler"}`` -> plain dicts.

    Each call returns a fresh deep copy, so callers may modify it freely.
    """
    return family_configs("sd1")


def architecture_of(configs: dict) -> str:
    """The manifest architecture a config set describes: ``sdxl`` (two text encoders),
    ``sdxl-refiner`` (only ``text_encoder_2``), ``sd2`` (an OpenCLIP text tower, erf GELU) or ``sd1``."""
    if configs.get("text_encoder_2") is not None:
        return "sdxl" if configs.get("text_encoder") is not None else "sdxl-refiner"
    if (configs.get("text_encoder") or {}).get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def text_encoder_names(configs: dict) -> tuple[str, ...]:
    """The text encoder components of a config set, in conditioning order."""
    return tuple(n for n in ("text_encoder", "text_encoder_2") if configs.get(n) is not None)


# --- checking configs that come from a file ------------------------------------------------------

# Fields every config set must have (sdrt reads them to size the graphs, specs and the manifest) or
# may have: "int" a positive integer, "ints" a non-empty list of them, "int|ints" either, "number" a
# positive finite number, "names" a list of strings, a tuple one of those strings
_INT, _INTS, _EITHER, _NUMBER, _NAMES = "int", "ints", "int|ints", "number", "names"
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
_BOOL, _INT_OR_NULL = "bool", "int|null"
_REQUIRED = {
    "unet": {"sample_size": _INT, "in_channels": _INT, "out_channels": _INT, "block_out_channels": _INTS,
             "down_block_types": _NAMES, "up_block_types": _NAMES, "cross_attention_dim": _INT},
    "vae": {"in_channels": _INT, "out_channels": _INT, "latent_channels": _INT, "block_out_channels": _INTS},
    "text_encoder": {"hidden_size": _INT, "num_hidden_layers": _INT, "num_attention_heads": _INT,
                     "intermediate_size": _INT},
    "scheduler": {"beta_start": _NUMBER, "beta_end": _NUMBER},
}
_OPTIONAL = {
    "unet": {"layers_per_block": _EITHER, "attention_head_dim": _EITHER, "norm_num_groups": _INT,
             "transformer_layers_per_block": _EITHER, "use_linear_projection": _BOOL, "upcast_attention": _BOOL,
             "addition_embed_type": ("text_time", None), "addition_time_embed_dim": _INT_OR_NULL,
             "projection_class_embeddings_input_dim": _INT_OR_NULL},
    "vae": {"layers_per_block": _INT, "norm_num_groups": _INT, "sample_size": _INT, "scaling_factor": _NUMBER,
            "down_block_types": _NAMES, "up_block_types": _NAMES},
    "text_encoder": {"vocab_size": _INT, "max_position_embeddings": _INT, "projection_dim": _INT,
                     "layer_norm_eps": _NUMBER, "hidden_act": ("quick_gelu", "gelu")},
    "scheduler": {"num_train_timesteps": _INT, "beta_schedule": BETA_SCHEDULES,
                  "prediction_type": PREDICTION_TYPES},
}
# The second text encoder (OpenCLIP bigG) has the first one's fields and must have its projection
_REQUIRED["text_encoder_2"] = {**_REQUIRED["text_encoder"], "projection_dim": _INT}
_OPTIONAL["text_encoder_2"] = {k: v for k, v in _OPTIONAL["text_encoder"].items() if k != "projection_dim"}


def check_configs(configs, where: str) -> dict:
    """``configs`` when it is a config set sdrt can build a model from, else a one-line
    ``CheckpointError`` naming ``where`` and the field: checked before any module is built, so a
    file's wrong metadata never reaches torch or diffusers.

    ``text_encoder`` is required except for the SDXL refiner (``text_encoder_2`` only); with two
    encoders the UNet's cross attention takes their states side by side (768 + 1280 = 2048 for
    SDXL), and ``text_time`` added embeddings must fit the second encoder's pooled projection and
    the family's time ids (:data:`TIME_IDS`)."""
    from sdrt.runtime.errors import CheckpointError

    def fail(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {name} {problem}")

    if not isinstance(configs, dict):
        raise fail("configs", f"must be an object of {'/'.join(CONFIG_NAMES)}, got {type(configs).__name__}")
    optional = {"text_encoder_2"} | ({"text_encoder"} if configs.get("text_encoder_2") is not None else set())
    for component in CONFIG_NAMES:
        config = configs.get(component)
        if config is None and component in optional:
            continue
        if not isinstance(config, dict):
            raise fail(component, "is missing" if config is None else
                       f"must be a config object, got {_short(config)}")
        fields = {**_REQUIRED[component], **_OPTIONAL[component]}
        for key, kind in fields.items():
            if key not in config:
                if key in _REQUIRED[component]:
                    raise fail(f"{component}.{key}", "is missing")
                continue
            problem = _field_problem(config[key], kind)
            if problem:
                raise fail(f"{component}.{key}", f"{problem}, got {_short(config[key])}")
    unet, vae = configs["unet"], configs["vae"]
    texts = [(name, configs[name]) for name in text_encoder_names(configs)]
    n = len(unet["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(unet[key]) != n:
            raise fail(f"unet.{key}", f"has {len(unet[key])} entries for {n} block_out_channels")
    for key in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
        if isinstance(unet.get(key), list) and len(unet[key]) != n:
            raise fail(f"unet.{key}", f"has {len(unet[key])} entries for {n} block_out_channels")
    for name, config in (("unet", unet), ("vae", vae)):
        groups = config.get("norm_num_groups", 32)
        if any(c % groups for c in config["block_out_channels"]):
            raise fail(f"{name}.norm_num_groups", f"{groups} does not divide block_out_channels "
                       f"{config['block_out_channels']}")
    heads = unet.get("attention_head_dim", 8)
    for c, h in zip(unet["block_out_channels"], heads if isinstance(heads, list) else [heads] * n):
        if c % h:
            raise fail("unet.attention_head_dim", f"{h} does not divide the block width {c}")
    for name, text in texts:
        if text["hidden_size"] % text["num_attention_heads"]:
            raise fail(f"{name}.num_attention_heads", f"{text['num_attention_heads']} does not divide "
                       f"hidden_size {text['hidden_size']}")
    width = sum(text["hidden_size"] for _, text in texts)
    if unet["cross_attention_dim"] != width:
        whose = ("the text encoder's hidden_size" if len(texts) == 1 and texts[0][0] == "text_encoder" else
                 f"the sum of {' + '.join(f'{n}.hidden_size' for n, _ in texts)}")
        raise fail("unet.cross_attention_dim", f"{unet['cross_attention_dim']} differs from {whose} {width}")
    _check_added_embeddings(configs, fail)
    # the latents, or an inpainting UNet's latents + mask + masked image's latents
    if unet["in_channels"] not in (vae["latent_channels"], 2 * vae["latent_channels"] + 1):
        raise fail("unet.in_channels", f"{unet['in_channels']} is neither vae.latent_channels "
                   f"{vae['latent_channels']} nor an inpainting UNet's {2 * vae['latent_channels'] + 1}")
    scheduler = configs["scheduler"]
    if not scheduler["beta_start"] < scheduler["beta_end"] < 1:
        raise fail("scheduler.beta_end", f"must be above beta_start and below 1, got {scheduler['beta_end']}")
    if scheduler.get("num_train_timesteps", 1000) < 2:
        raise fail("scheduler.num_train_timesteps", f"must be at least 2, got {scheduler['num_train_timesteps']}")
    return configs


def _check_added_embeddings(configs: dict, fail) -> None:
    """SDXL's ``text_time`` conditioning: present exactly when there is a second text encoder, and
    ``projection_class_embeddings_input_dim`` = pooled width + time ids x ``addition_time_embed_dim``."""
    unet, arch = configs["unet"], architecture_of(configs)
    added = unet.get("addition_embed_type")
    if arch not in TIME_IDS:
        if added is not None:
            raise fail("unet.addition_embed_type", f"{added!r} needs a second text encoder (text_encoder_2)")
        return
    if added != "text_time":
        raise fail("unet.addition_embed_type", f"must be 'text_time' with text_encoder_2, got {_short(added)}")
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if unet.get(key) is None:
            raise fail(f"unet.{key}", "is missing")
    want = configs["text_encoder_2"]["projection_dim"] + TIME_IDS[arch] * unet["addition_time_embed_dim"]
    if unet["projection_class_embeddings_input_dim"] != want:
        raise fail("unet.projection_class_embeddings_input_dim",
                   f"{unet['projection_class_embeddings_input_dim']} differs from text_encoder_2.projection_dim + "
                   f"{TIME_IDS[arch]} x addition_time_embed_dim = {want}")


def _field_problem(value, kind) -> str | None:
    """What is wrong with a config value for its kind, or None."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if isinstance(kind, tuple):
        return None if value in kind else f"must be one of {', '.join('null' if k is None else k for k in kind)}"
    if kind == _INT:
        return None if positive_int(value) else "must be a positive integer"
    if kind in (_INTS, _EITHER):
        if kind == _EITHER and positive_int(value):
            return None
        ok = isinstance(value, list) and value and all(positive_int(v) for v in value)
        return None if ok else "must be a non-empty list of positive integers"
    if kind == _INT_OR_NULL:
        return None if value is None or positive_int(value) else "must be a positive integer or null"
    if kind == _BOOL:
        return None if value is None or isinstance(value, bool) else "must be true, false or null"
    if kind == _NUMBER:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
        return None if ok else "must be a positive finite number"
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "must be a list of block type names"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
