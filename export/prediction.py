"""SD 2.x files do not say whether they predict noise (the 512 "base") or v (the 768-v models):
decide it as the webui does, from what the UNet itself does on a fixed input.

The webui (``modules/sd_models_config.py``: ``is_using_v_parameterization_for_sd2``) runs the
UNet on a latent of 0.5s at timestep 999 with a context of two tokens of 0.5s, and takes the
model for v prediction when the mean of ``output - input`` is below -1: at t = 999 a v model's
output is about ``-x`` (v = alpha * eps - sigma * x with alpha ~ 0), an eps model's is noise of
mean ~0. A file the probe cannot tell (a model trained otherwise, a random one) takes
``sdrt export --prediction eps|v``.
"""

from __future__ import annotations

import torch

#: The webui's threshold on mean(output - input).
V_THRESHOLD = -1.0
PROBE_TIMESTEP = 999
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}  # --prediction's names -> the scheduler's


@torch.no_grad()
def v_probe(unet) -> float:
    """mean(unet(x, 999, context) - x) for x and context filled with 0.5 (8x8 latents, 2 tokens), in
    float32 on the CPU as the webui runs it."""
    config = unet.config
    x = torch.full((1, config.in_channels, 8, 8), 0.5)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5)
    out = unet(x, torch.tensor([PROBE_TIMESTEP]), context, return_dict=False)[0]
    return float((out - x).mean())


def is_v_prediction(probe: float) -> bool:
    """The webui's decision on :func:`v_probe`'s value."""
    return probe < V_THRESHOLD
