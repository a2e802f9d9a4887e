"""Model configurations shipped with sdrt, so that nothing is ever fetched from a hub.

``sd1/`` holds the diffusers / transformers configurations of Stable Diffusion 1.5:

* ``unet.json``          -- ``diffusers.UNet2DConditionModel``
* ``vae.json``           -- ``diffusers.AutoencoderKL``
* ``text_encoder.json``  -- ``transformers.CLIPTextConfig`` (the ViT-L/14 text tower)
* ``scheduler.json``     -- the training noise schedule (scaled-linear betas, epsilon prediction)

All SD 1.x single-file checkpoints (1.4, 1.5 and their fine-tunes) share these shapes.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The components every config set has, in the order they are usually handled.
CONFIG_NAMES = ("unet", "vae", "text_encoder", "scheduler")


@functools.lru_cache(maxsize=None)
def _read(family: str) -> dict:
    folder = _HERE / family
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name in CONFIG_NAMES}


def sd1_configs() -> dict:
    """The SD 1.5 configs as ``{"unet", "vae", "text_encoder", "scheduler"}`` -> plain dicts.

    Each call returns a fresh deep copy, so callers may modify it freely.
    """
    return copy.deepcopy(_read("sd1"))


# --- checking configs that come from a file ------------------------------------------------------

# Fields every config set must have (sdrt reads them to size the graphs, specs and the manifest) or
# may have: "int" a positive integer, "ints" a non-empty list of them, "int|ints" either, "number" a
# positive finite number, "names" a list of strings, a tuple one of those strings
_INT, _INTS, _EITHER, _NUMBER, _NAMES = "int", "ints", "int|ints", "number", "names"
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
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
             "transformer_layers_per_block": _EITHER},
    "vae": {"layers_per_block": _INT, "norm_num_groups": _INT, "sample_size": _INT, "scaling_factor": _NUMBER,
            "down_block_types": _NAMES, "up_block_types": _NAMES},
    "text_encoder": {"vocab_size": _INT, "max_position_embeddings": _INT, "projection_dim": _INT,
                     "layer_norm_eps": _NUMBER},
    "scheduler": {"num_train_timesteps": _INT, "beta_schedule": BETA_SCHEDULES,
                  "prediction_type": PREDICTION_TYPES},
}


def check_configs(configs, where: str) -> dict:
    """``configs`` when it is a config set sdrt can build a model from, else a one-line
    ``CheckpointError`` naming ``where`` and the field: checked before any module is built, so a
    file's wrong metadata never reaches torch or diffusers."""
    from sdrt.runtime.errors import CheckpointError

    def fail(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {name} {problem}")

    if not isinstance(configs, dict):
        raise fail("configs", f"must be an object of {'/'.join(CONFIG_NAMES)}, got {type(configs).__name__}")
    for component in CONFIG_NAMES:
        config = configs.get(component)
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
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
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
    if text["hidden_size"] % text["num_attention_heads"]:
        raise fail("text_encoder.num_attention_heads", f"{text['num_attention_heads']} does not divide "
                   f"hidden_size {text['hidden_size']}")
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise fail("unet.cross_attention_dim", f"{unet['cross_attention_dim']} differs from the text encoder's "
                   f"hidden_size {text['hidden_size']}")
    if unet["in_channels"] != vae["latent_channels"]:
        raise fail("unet.in_channels", f"{unet['in_channels']} differs from vae.latent_channels "
                   f"{vae['latent_channels']}")
    scheduler = configs["scheduler"]
    if not scheduler["beta_start"] < scheduler["beta_end"] < 1:
        raise fail("scheduler.beta_end", f"must be above beta_start and below 1, got {scheduler['beta_end']}")
    if scheduler.get("num_train_timesteps", 1000) < 2:
        raise fail("scheduler.num_train_timesteps", f"must be at least 2, got {scheduler['num_train_timesteps']}")
    return configs


def _field_problem(value, kind) -> str | None:
    """What is wrong with a config value for its kind, or None."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if isinstance(kind, tuple):
        return None if value in kind else f"must be one of {', '.join(kind)}"
    if kind == _INT:
        return None if positive_int(value) else "must be a positive integer"
    if kind in (_INTS, _EITHER):
        if kind == _EITHER and positive_int(value):
            return None
        ok = isinstance(value, list) and value and all(positive_int(v) for v in value)
        return None if ok else "must be a non-empty list of positive integers"
    if kind == _NUMBER:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
        return None if ok else "must be a positive finite number"
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "must be a list of block type names"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
