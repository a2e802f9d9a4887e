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
