"""The webui's hypernetworks (``<hypernet:name:multiplier>``) put into the UNet graph (runtime/networks/hypernet.py).

The reference: the webui's ``HypernetworkModule`` (its Sequential, written here in torch) applied
the webui's way in every attention of the diffusers UNet of the torch reference (``context =
default(context, x)``, each hypernetwork's pair picked by the context's width, ``k = to_k(hn_k(
context))``, ``v = to_v(hn_v(context))``), sampled as ``sdrt verify`` samples; the runtime's
image must match it to 60 dB.
"""

from __future__ import annotations

import copy
import os
import zipfile

import numpy as np
import pytest
import torch
from sdrt.export.reference import TorchReference
from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.networks.hypernet import ACTIVATIONS, read_hypernetwork
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline, to_uint8
from sdrt.runtime.text.extra_networks import parse_prompt
from test_networks import layer_table, make_lora, webui_merge, write_network

PROMPT = "a red circle on a blue background"
STEPS, SEED = 4, 7
# The tiny SD 1.x UNet: self-attention over 32 channels (down 0, up 1) and 64 (mid), and a text
# context 32 wide: a module of width 32 serves both its self- and its cross-attentions
WIDTHS = (32, 64)

TORCH_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                     "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "hardswish": torch.nn.Hardswish,
                     "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU,
                     "silu": torch.nn.SiLU, "mish": torch.nn.Mish, "softplus": torch.nn.Softplus,
                     "selu": torch.nn.SELU, "celu": torch.nn.CELU, "relu6": torch.nn.ReLU6,
                     "hardtanh": torch.nn.Hardtanh, "hardsigmoid": torch.nn.Hardsigmoid,
                     "softsign": torch.nn.Softsign, "tanhshrink": torch.nn.Tanhshrink,
                     "logsigmoid": torch.nn.LogSigmoid}


# -- the webui's modules, in torch (modules/hypernetworks/hypernetwork.py) --

class WebuiModule(torch.nn.Module):
    """``HypernetworkModule``: Linear, activation (not after the last Linear unless activate_output),
    LayerNorm, Dropout per the dropout structure; ``x + linear(x) * multiplier``."""

    def __init__(self, dim, structure, activation=None, layer_norm=False, activate_output=False, dropout=None):
        super().__init__()
        dropout = dropout or [0] * len(structure)
        layers = []
        for i in range(len(structure) - 1):
            layers.append(torch.nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
            if not (activation in ("linear", None) or (i >= len(structure) - 2 and not activate_output)):
                layers.append(TORCH_ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * structure[i + 1])))
            if dropout[i + 1] > 0:
                layers.append(torch.nn.Dropout(p=dropout[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * self.multiplier


def make_hypernet(path, seed, structure=(1, 2, 1), activation=None, layer_norm=False, activate_output=False,
                  use_dropout=False, dropout=None, widths=WIDTHS, old=False, scale=0.3):
    """A webui hypernetwork file with random weights; returns its torch modules {width: (k, v)}."""
    g = torch.Generator().manual_seed(seed)
    modules, d = {}, {}
    for w in widths:
        pair = []
        for _ in "kv":
            m = WebuiModule(w, list(structure), activation, layer_norm, activate_output, dropout).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
            pair.append(m)
        modules[w] = tuple(pair)
        states = [m.state_dict() for m in pair]
        if old:
            states = [{k.replace("linear.0", "linear1").replace("linear.1", "linear2"): v for k, v in s.items()}
                      for s in states]
        d[w] = tuple(states)
    d.update(step=10, name=path.stem, activation_func=activation, is_layer_norm=layer_norm,
             weight_initialization="Normal", sd_checkpoint="0123abcd", sd_checkpoint_name="tiny",
             optional_info=None)
    if not old:
        d.update(layer_structure=list(structure), activate_output=activate_output, use_dropout=use_dropout,
                 last_layer_dropout=False)
        if dropout is not None:
            d["dropout_structure"] = list(dropout)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, str(path))
    return modules


class HyperProcessor:
    """The webui's attention forward with hypernetworks on diffusers' ``Attention``."""

    def __init__(self, chain):
        self.chain = chain  # [(modules {width: (k, v)}, multiplier)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = context
        for modules, multiplier in self.chain:
            pair = modules.get(ck.shape[2])
            if pair is not None:
                pair[0].multiplier = pair[1].multiplier = multiplier
                ck, cv = pair[0](ck), pair[1](cv)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ck))
        v = attn.head_to_batch_dim(attn.to_v(cv))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k, None), v))
        return attn.to_out[1](attn.to_out[0](out))


def reference_image(checkpoint, pipe: Pipeline, prompt: str, chain, unet=None) -> np.ndarray:
    """The 8-bit image of the torch reference with the hypernetworks applied the webui's way."""
    ref = TorchReference(checkpoint, pipe.bundle.path / "tokenizer")
    if unet is not None:
        ref.unet = unet
    ref.unet.set_attn_processor(HyperProcessor(chain))
    plan = pipe.plan(GenerationParams(prompt, sampler_name="Euler", steps=STEPS, seed=SEED))
    info = plan.sampler
    sigmas = sampling.sigmas_for(plan.schedule, STEPS, pipe.denoiser.schedule, sampler=info,
                                 arch=pipe.bundle.architecture)
    cond, uncond = ref.encode(parse_prompt(prompt)[0], 1, 1), ref.encode("", 1, 1)
    f = pipe.bundle.vae_scale_factor
    shape = (pipe.bundle.latent_channels, plan.height // f, plan.width // f)
    gen = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(shape, generator=gen)[None] * float(sigmas[0])
    with torch.no_grad():
        lat = info.fn(lambda x, s: ref.denoise(x, s, cond, uncond, 7.0), x0, sigmas,
                      noise=lambda s, sn: torch.randn(shape, generator=gen)[None], **info.options)
    return to_uint8(ref.decode(lat)[0])


def runtime_image(pipe, prompt: str):
    (out,) = pipe(prompt, sampler_name="Euler", steps=STEPS, seed=SEED)
    return np.asarray(out.image), out.infotext


@pytest.fixture(scope="module")
def hn_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hypernetworks")


@pytest.fixture(scope="module")
def pipe(tiny_bundle, hn_dir, tmp_path_factory):
    return Pipeline(tiny_bundle, hypernetwork_dir=hn_dir, lora_dir=tmp_path_factory.mktemp("Lora"))


@pytest.fixture(scope="module")
def plain(pipe):
    return runtime_image(pipe, PROMPT)[0]


# -- fidelity --

STRUCTURES = {
    "linear_121": dict(structure=(1, 2, 1)),
    "relu_ln_1_1.5_1": dict(structure=(1, 1.5, 1), activation="relu", layer_norm=True),
    "tanh_out_dropout": dict(structure=(1, 2, 2, 1), activation="tanh", activate_output=True, use_dropout=True,
                             dropout=(0, 0.3, 0.3, 0)),
    "old_linear1_linear2": dict(old=True),
}


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_structure_matches_the_webui(kind, pipe, hn_dir, tiny_checkpoint, plain):
    modules = make_hypernet(hn_dir / f"{kind}.pt", seed=len(kind), **STRUCTURES[kind])
    prompt = f"{PROMPT} <hypernet:{kind}:0.8>"
    image, info = runtime_image(pipe, prompt)
    ref = reference_image(tiny_checkpoint, pipe, prompt, [(modules, 0.8)])
    print(f"{kind}: PSNR {psnr(ref, image, 255.0):.1f} dB against the reference, {psnr(plain, image, 255.0):.1f} "
          f"against no hypernetwork")
    assert psnr(ref, image, 255.0) >= 60, kind
    assert psnr(plain, image, 255.0) < 40  # the hypernetwork changed the image
    assert f"<hypernet:{kind}:0.8>" in info.splitlines()[0] and "Hypernet" not in info.splitlines()[-1]
