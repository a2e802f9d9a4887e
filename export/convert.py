"""The one key conversion: original LDM / A1111 single-file layout <-> diffusers modules
(SD 1.x, SD 2.x, SDXL and the SDXL refiner).

A single-file SD 1.x checkpoint keeps the three networks under

* ``model.diffusion_model.*``                    -- the UNet (``openaimodel.UNetModel`` names),
* ``first_stage_model.*``                        -- the VAE (``AutoencoderKL`` of ``ldm``),
* ``cond_stage_model.transformer.text_model.*``  -- the CLIP text encoder (older files:
  ``cond_stage_model.transformer.*`` without ``text_model``),

next to EMA copies (``model_ema.*``) and the DDPM schedule buffers (``betas``,
``alphas_cumprod``, ...), which are ignored (``alphas_cumprod`` is handed back).

The mapping is *derived from the configs* (block types and channels, layers per
block, transformer depth, mid-block attention, number of CLIP layers), so it works
for the SD 1.5 configs shipped in :mod:`sdrt.export.configs` and for scaled-down
test configs alike.  Components are state dicts in the diffusers / transformers
*file* layout: ``unet`` and ``vae`` as ``diffusers`` names them, ``text_encoder``
with ``text_model.*`` keys (what ``text_encoder/model.safetensors`` holds, whatever
the installed transformers version calls the module's own keys).

SD 2.x files keep OpenCLIP ViT-H under ``cond_stage_model.model.*``; SDXL files CLIP ViT-L under
``conditioner.embedders.0.transformer.text_model.*`` and OpenCLIP ViT-bigG under
``conditioner.embedders.1.model.*`` (the refiner: bigG alone, under ``embedders.0``). OpenCLIP
towers have fused ``attn.in_proj_weight`` / ``in_proj_bias`` (split into q, k, v), a
``positional_embedding``, ``ln_final`` and a ``text_projection`` used as ``x @ P`` (a Linear's
transposed weight). SD 2.x's tower becomes the 23-layer ``CLIPTextModel`` diffusers ships: the
webui's "penultimate" layer runs 23 of the 24 blocks then ``ln_final``, so the last resblock
(and the unused projection and ``logit_scale``) are expected and ignored. SDXL's UNet adds
``label_emb`` (diffusers' ``add_embedding``) and per-level transformer depths, both derived from
the config like every other name.

After conversion the result is checked against the key set and shapes of modules
built from the configs (on the meta device); any mismatch is a one-line
:class:`CheckpointError` naming keys in the layout of the user's file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from sdrt.export.configs import architecture_of
from sdrt.export.load import (
    ARCHITECTURE_NAMES,
    detect_architecture,
    load_diffusers_folder,
    load_state_dict,
    sd1_configs,
)
from sdrt.runtime.errors import CheckpointError

__all__ = [
    "COMPONENTS",
    "LDM_PREFIXES",
    "build_modules",
    "diffusers_to_ldm",
    "expected_alphas_cumprod",
    "expected_shapes",
    "key_map",
    "ldm_to_diffusers",
    "load_components",
]

#: The networks of an SD 1.x / 2.x checkpoint, in conversion order.
COMPONENTS = ("unet", "vae", "text_encoder")
#: Every network a family may have (SDXL adds OpenCLIP bigG; the refiner has only that one).
ALL_COMPONENTS = (*COMPONENTS, "text_encoder_2")

#: Where each network lives in a single-file LDM checkpoint (current layout).
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
_LEGACY_CLIP_PREFIX = "cond_stage_model.transformer."
_TEXT_PREFIX = "text_model."  # diffusers folder / transformers file layout
_POSITION_IDS = "embeddings.position_ids"

_LABELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}

#: Where each family's single files keep their text encoders (sd1: also the legacy layout).
TEXT_PREFIXES = {
    "sd1": {"text_encoder": LDM_PREFIXES["text_encoder"]},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.text_model.",
             "text_encoder_2": "conditioner.embedders.1.model."},
    "sdxl-refiner": {"text_encoder_2": "conditioner.embedders.0.model."},
}
#: The text encoders stored in OpenCLIP's layout, per family.
_OPENCLIP = {"sd2": ("text_encoder",), "sdxl": ("text_encoder_2",), "sdxl-refiner": ("text_encoder_2",)}
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_PROJECTION = "text_projection"
# Keys under a component prefix that are never weights of the network.
_IGNORED_SUFFIXES = (_POSITION_IDS,)
_IGNORED_PREFIXES = ("first_stage_model.loss.",)
_SHOWN = 3  # how many key names an error message lists


# ---------------------------------------------------------------------------
# key maps, derived from the configs
# ---------------------------------------------------------------------------

Pairs = list  # list[tuple[str, str]]: (LDM name without prefix, diffusers name)


def _wb(ldm: str, diffusers: str) -> Pairs:
    return [(f"{ldm}.weight", f"{diffusers}.weight"), (f"{ldm}.bias", f"{diffusers}.bias")]


def _per_block(value, n: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise CheckpointError(f"unsupported config: {what} has {len(values)} entries for {n} blocks")
    return [int(v) for v in values]


def _unet_resnet(ldm: str, diffusers: str, shortcut: bool) -> Pairs:
    pairs = (
        _wb(f"{ldm}.in_layers.0", f"{diffusers}.norm1")
        + _wb(f"{ldm}.in_layers.2", f"{diffusers}.conv1")
        + _wb(f"{ldm}.emb_layers.1", f"{diffusers}.time_emb_proj")
        + _wb(f"{ldm}.out_layers.0", f"{diffusers}.norm2")
        + _wb(f"{ldm}.out_layers.3", f"{diffusers}.conv2")
    )
    if shortcut:
        pairs += _wb(f"{ldm}.skip_connection", f"{diffusers}.conv_shortcut")
    return pairs


def _spatial_transformer(ldm: str, diffusers: str, depth: int) -> Pairs:
    # SpatialTransformer and diffusers' Transformer2DModel use the same sub-module names.
    suffixes = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias"]
    for t in range(depth):
        block = f"transformer_blocks.{t}"
        for attn in ("attn1", "attn2"):
            suffixes += [f"{block}.{attn}.to_{p}.weight" for p in "qkv"]
            suffixes += [f"{block}.{attn}.to_out.0.weight", f"{block}.{attn}.to_out.0.bias"]
        suffixes += [f"{block}.ff.net.0.proj.weight", f"{block}.ff.net.0.proj.bias"]
        suffixes += [f"{block}.ff.net.2.weight", f"{block}.ff.net.2.bias"]
        suffixes += [f"{block}.norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    suffixes += ["proj_out.weight", "proj_out.bias"]
    return [(f"{ldm}.{s}", f"{diffusers}.{s}") for s in suffixes]


_UNET_UNSUPPORTED = (
    "class_embed_type",
    "encoder_hid_dim",
    "num_class_embeds",
    "time_cond_proj_dim",
)


def _unet_pairs(config: dict) -> Pairs:
    """(LDM, diffusers) names of ``UNet2DConditionModel`` weights for ``config``."""
    for option in _UNET_UNSUPPORTED:
        if config.get(option) is not None:
            raise CheckpointError(f"unsupported UNet config: {option}={config[option]!r}")
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(f"unsupported UNet config: addition_embed_type={config['addition_embed_type']!r}")
    if config.get("dual_cross_attention"):
        raise CheckpointError("unsupported UNet config: dual_cross_attention")
    if config.get("time_embedding_type", "positional") != "positional":
        raise CheckpointError(f"unsupported UNet config: time_embedding_type={config['time_embedding_type']!r}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    channels = [int(c) for c in config["block_out_channels"]]
    n = len(channels)
    if len(down) != n or len(up) != n:
        raise CheckpointError("unsupported UNet config: block type and channel lists differ in length")
    for kind in down:
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise CheckpointError(f"unsupported UNet config: down block type {kind}")
    for kind in up:
        if kind not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise CheckpointError(f"unsupported UNet config: up block type {kind}")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise CheckpointError(f"unsupported UNet config: mid block type {mid_type}")

    layers = _per_block(config.get("layers_per_block", 2), n, "layers_per_block")
    depth = _per_block(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse_depth = config.get("reverse_transformer_layers_per_block")
    up_depth = [int(d) for d in reverse_depth] if reverse_depth is not None else list(reversed(depth))
    if len(up_depth) != n:
        raise CheckpointError("unsupported UNet config: reverse_transformer_layers_per_block length")

    pairs: Pairs = []
    pairs += _wb("time_embed.0", "time_embedding.linear_1") + _wb("time_embed.2", "time_embedding.linear_2")
    if config.get("addition_embed_type") == "text_time":  # SDXL: the pooled text and size embedding
        pairs += _wb("label_emb.0.0", "add_embedding.linear_1") + _wb("label_emb.0.2", "add_embedding.linear_2")
    pairs += _wb("input_blocks.0.0", "conv_in")

    k = 1  # running index of LDM input_blocks
    previous = channels[0]
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            in_ch = previous if j == 0 else channels[i]
            pairs += _unet_resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", in_ch != channels[i])
            if kind == "CrossAttnDownBlock2D":
                pairs += _spatial_transformer(f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", depth[i])
            k += 1
        if i < n - 1:
            pairs += _wb(f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            k += 1
        previous = channels[i]

    if mid_type is not None:
        pairs += _unet_resnet("middle_block.0", "mid_block.resnets.0", False)
        pairs += _spatial_transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
        pairs += _unet_resnet("middle_block.2", "mid_block.resnets.1", False)

    reversed_channels = list(reversed(channels))
    up_layers = [x + 1 for x in reversed(layers)]
    k = 0  # running index of LDM output_blocks
    out_ch = reversed_channels[0]
    for i, kind in enumerate(up):
        prev_out, out_ch = out_ch, reversed_channels[i]
        block_in = reversed_channels[min(i + 1, n - 1)]
        attention = kind == "CrossAttnUpBlock2D"
        for j in range(up_layers[i]):
            skip_ch = block_in if j == up_layers[i] - 1 else out_ch
            res_in = (prev_out if j == 0 else out_ch) + skip_ch
            pairs += _unet_resnet(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", res_in != out_ch)
            if attention:
                pairs += _spatial_transformer(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", up_depth[i])
            if j == up_layers[i] - 1 and i < n - 1:
                slot = 2 if attention else 1
                pairs += _wb(f"output_blocks.{k}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv")
            k += 1

    pairs += _wb("out.0", "conv_norm_out") + _wb("out.2", "conv_out")
    return pairs


def _vae_resnet(ldm: str, diffusers: str, shortcut: bool) -> Pairs:
    pairs = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        pairs += _wb(f"{ldm}.{name}", f"{diffusers}.{name}")
    if shortcut:
        pairs += _wb(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return pairs


def _vae_mid(part: str, channels: int, attention: bool) -> Pairs:
    pairs = _vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
    if attention:
        ldm, diffusers = f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"
        pairs += _wb(f"{ldm}.norm", f"{diffusers}.group_norm")
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            pairs += _wb(f"{ldm}.{a}", f"{diffusers}.{b}")
    pairs += _vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
    return pairs


def _vae_pairs(config: dict) -> Pairs:
    """(LDM, diffusers) names of ``AutoencoderKL`` weights for ``config``."""
    channels = [int(c) for c in config["block_out_channels"]]
    n = len(channels)
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"] * n))
    if len(down) != n or len(up) != n:
        raise CheckpointError("unsupported VAE config: block type and channel lists differ in length")
    if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up):
        raise CheckpointError("unsupported VAE config: only DownEncoderBlock2D / UpDecoderBlock2D blocks")
    layers = int(config.get("layers_per_block", 1))
    attention = bool(config.get("mid_block_add_attention", True))

    pairs: Pairs = _wb("encoder.conv_in", "encoder.conv_in")
    previous = channels[0]
    for i in range(n):
        for j in range(layers):
            in_ch = previous if j == 0 else channels[i]
            ldm, diffusers = f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"
            pairs += _vae_resnet(ldm, diffusers, in_ch != channels[i])
        if i < n - 1:
            pairs += _wb(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        previous = channels[i]
    pairs += _vae_mid("encoder", channels[-1], attention)
    pairs += _wb("encoder.norm_out", "encoder.conv_norm_out") + _wb("encoder.conv_out", "encoder.conv_out")

    if config.get("use_quant_conv", True):
        pairs += _wb("quant_conv", "quant_conv")
    if config.get("use_post_quant_conv", True):
        pairs += _wb("post_quant_conv", "post_quant_conv")

    pairs += _wb("decoder.conv_in", "decoder.conv_in")
    pairs += _vae_mid("decoder", channels[-1], attention)
    reversed_channels = list(reversed(channels))
    previous = reversed_channels[0]
    for i in range(n):
        level = n - 1 - i  # LDM numbers decoder levels from the output side
        out_ch = reversed_channels[i]
        for j in range(layers + 1):
            in_ch = previous if j == 0 else out_ch
            pairs += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", in_ch != out_ch)
        if i < n - 1:
            pairs += _wb(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
        previous = out_ch
    pairs += _wb("decoder.norm_out", "decoder.conv_norm_out") + _wb("decoder.conv_out", "decoder.conv_out")
    return pairs


def _text_pairs(config: dict) -> Pairs:
    """(name under ``text_model.``, diffusers name) of ``CLIPTextModel`` weights for ``config``."""
    suffixes = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for layer in range(int(config.get("num_hidden_layers", 12))):
        block = f"encoder.layers.{layer}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            suffixes += [f"{block}.self_attn.{proj}.weight", f"{block}.self_attn.{proj}.bias"]
        for name in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            suffixes += [f"{block}.{name}.weight", f"{block}.{name}.bias"]
    suffixes += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return [(s, _TEXT_PREFIX + s) for s in suffixes]


def _openclip_pairs(config: dict, projection: bool) -> Pairs:
    """(name under an OpenCLIP tower's prefix, diffusers file-layout name) of a CLIP text model's
    weights; q, k and v each name the fused ``in_proj`` they are a third of (:func:`_from_ldm`)."""
    pairs: Pairs = [("token_embedding.weight", _TEXT_PREFIX + "embeddings.token_embedding.weight"),
                    ("positional_embedding", _TEXT_PREFIX + "embeddings.position_embedding.weight")]
    for layer in range(int(config.get("num_hidden_layers", 12))):
        ldm, hf = f"transformer.resblocks.{layer}", f"{_TEXT_PREFIX}encoder.layers.{layer}"
        for p in "qkv":
            pairs += [(f"{ldm}.attn.in_proj_weight", f"{hf}.self_attn.{p}_proj.weight"),
                      (f"{ldm}.attn.in_proj_bias", f"{hf}.self_attn.{p}_proj.bias")]
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2")):
            pairs += _wb(f"{ldm}.{a}", f"{hf}.{b}")
    pairs += _wb("ln_final", _TEXT_PREFIX + "final_layer_norm")
    if projection:
        pairs += [(_PROJECTION, "text_projection.weight")]
    return pairs


def _ignored_text_keys(family: str, configs: dict) -> tuple[str, ...]:
    """Key prefixes of a family's text towers that hold no weight of the diffusers modules: OpenCLIP's
    ``logit_scale``; for SD 2.x the last resblock and the projection (the webui's "penultimate"
    layer never runs them: ``FrozenOpenCLIPEmbedder.encode_with_transformer``)."""
    out = []
    for name in _OPENCLIP.get(family, ()):
        prefix = TEXT_PREFIXES[family][name]
        out.append(prefix + "logit_scale")
        if family == "sd2":
            layers = int(configs[name].get("num_hidden_layers", 23))
            out += [prefix + _PROJECTION, f"{prefix}transformer.resblocks.{layers}."]
    return tuple(out)


def _qkv_index(diffusers_key: str, ldm_key: str) -> int | None:
    """Which third of a fused OpenCLIP ``in_proj`` a q / k / v weight or bias is, else None."""
    if not ldm_key.endswith(_IN_PROJ):
        return None
    return "qkv".index(diffusers_key.rsplit(".", 2)[-2][0])


def _is_projection(ldm_key: str) -> bool:
    return ldm_key.endswith("." + _PROJECTION)


def _ldm_shape(diffusers_key: str, ldm_key: str, shape: tuple) -> tuple:
    """The shape ``ldm_key`` has in a file when the diffusers weight has ``shape``."""
    if _qkv_index(diffusers_key, ldm_key) is not None:
        return (3 * shape[0], *shape[1:])
    if _is_projection(ldm_key):
        return tuple(reversed(shape))
    if _is_vae_attention_weight(diffusers_key):
        return (*shape, 1, 1)
    return shape


def _from_ldm(diffusers_key: str, ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The diffusers weight stored as ``tensor`` under ``ldm_key`` (views: nothing is copied)."""
    index = _qkv_index(diffusers_key, ldm_key)
    if index is not None and tensor.shape[0] % 3 == 0:
        return tensor.chunk(3, dim=0)[index]
    if _is_projection(ldm_key) and tensor.ndim == 2:
        return tensor.t()
    if _is_vae_attention_weight(diffusers_key) and tensor.ndim > 2 and all(s == 1 for s in tensor.shape[2:]):
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    """VAE mid-block q/k/v/out weights: 1x1 convs in LDM, Linear layers in diffusers."""
    return ".mid_block.attentions." in diffusers_key and diffusers_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def key_map(configs: dict, *, legacy_clip: bool = False) -> dict[str, dict[str, str]]:
    """The full-name mapping for ``configs``: ``{component: {diffusers_key: ldm_key}}``.

    ``ldm_key`` carries its single-file prefix (:data:`LDM_PREFIXES`, the text encoders'
    :data:`TEXT_PREFIXES` of the configs' family); with ``legacy_clip`` the SD 1.x text encoder
    keys use the older ``cond_stage_model.transformer.<name>`` layout (no ``text_model``).
    OpenCLIP's fused ``in_proj`` is the LDM name of each of q, k and v.
    Raises :class:`CheckpointError` for configs using features the LDM layout
    cannot express (extra embeddings, other block types).
    """
    family = architecture_of(configs)
    maps = {
        "unet": {d: LDM_PREFIXES["unet"] + ldm for ldm, d in _unet_pairs(configs["unet"])},
        "vae": {d: LDM_PREFIXES["vae"] + ldm for ldm, d in _vae_pairs(configs["vae"])},
    }
    for name, prefix in TEXT_PREFIXES[family].items():
        if name in _OPENCLIP.get(family, ()):
            pairs = _openclip_pairs(configs[name], projection=name == "text_encoder_2")
        else:
            prefix = _LEGACY_CLIP_PREFIX if legacy_clip and family == "sd1" else prefix
            pairs = _text_pairs(configs[name])
        maps[name] = {d: prefix + ldm for ldm, d in pairs}
    return maps


# ---------------------------------------------------------------------------
# modules built from the configs
# ---------------------------------------------------------------------------


def _clip_config(config: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_dict(dict(config))


def _instantiate(configs: dict) -> tuple:
    """(unet, vae, text_encoder, text_encoder_2) for ``configs``; absent text encoders are None."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as df_logging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    df_verbosity = df_logging.get_verbosity()
    hf_verbosity = hf_logging.get_verbosity()
    df_logging.set_verbosity_error()  # unknown config keys (e.g. "_class_name") are fine
    hf_logging.set_verbosity_error()
    try:
        unet = UNet2DConditionModel.from_config(dict(configs["unet"]))
        vae = AutoencoderKL.from_config(dict(configs["vae"]))
        text_encoder = (CLIPTextModel(_clip_config(configs["text_encoder"]))
                        if configs.get("text_encoder") is not None else None)
        text_encoder_2 = (CLIPTextModelWithProjection(_clip_config(configs["text_encoder_2"]))
                          if configs.get("text_encoder_2") is not None else None)
    finally:
        df_logging.set_verbosity(df_verbosity)
        hf_logging.set_verbosity(hf_verbosity)
    return unet, vae, text_encoder, text_encoder_2


def _module_text_prefix(text_encoder: torch.nn.Module) -> str:
    """``"text_model."`` where the installed transformers nests the weights (4.x), else ``""`` (5.x)."""
    return _TEXT_PREFIX if any(k.startswith(_TEXT_PREFIX) for k in text_encoder.state_dict()) else ""


def _text_file_keys(text_encoder: torch.nn.Module) -> dict[str, tuple]:
    """A text model's weight shapes under their file-layout names (``text_model.*``; a
    ``CLIPTextModelWithProjection`` also ``text_projection.weight``, which keeps its name)."""
    inner = _module_text_prefix(text_encoder)
    return {(_TEXT_PREFIX + k[len(inner):] if k.startswith(inner) and not k.startswith(_PROJECTION) else k):
            tuple(v.shape) for k, v in text_encoder.state_dict().items() if not k.endswith(_POSITION_IDS)}


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(configs_json: str) -> dict:
    configs = json.loads(configs_json)
    with torch.device("meta"):
        unet, vae, text_encoder, text_encoder_2 = _instantiate(configs)
    out = {
        "unet": {k: tuple(v.shape) for k, v in unet.state_dict().items()},
        "vae": {k: tuple(v.shape) for k, v in vae.state_dict().items()},
    }
    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None:
            out[name] = _text_file_keys(module)
    return out


def expected_shapes(configs: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{component: {diffusers_key: shape}}`` of the modules ``configs`` describe (the text
    encoders it has: SD 1.x / 2.x ``text_encoder``, SDXL also ``text_encoder_2``).

    Built on the meta device (no weights are allocated) and cached per config.
    Text encoder keys are given in the ``text_model.*`` file layout.
    """
    subset = {c: configs[c] for c in ALL_COMPONENTS if configs.get(c) is not None}
    return {c: dict(v) for c, v in _expected_shapes_cached(json.dumps(subset, sort_keys=True)).items()}


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (", ..." if len(keys) > _SHOWN else "")


def _plural(count: int, label: str) -> str:
    return f"{count} {label} key{'s' if count != 1 else ''}"


class _Report:
    """Collects per-component problems and turns them into one line."""

    #: Beyond this many characters further problem groups are summarised as "...".
    MAX_CHARS = 400

    def __init__(self) -> None:
        self.missing: dict[str, list[str]] = {c: [] for c in ALL_COMPONENTS}
        self.total: dict[str, int] = {c: 0 for c in ALL_COMPONENTS}
        self.wrong: dict[str, list[tuple[str, str]]] = {c: [] for c in ALL_COMPONENTS}
        self.unexpected: dict[str, list[str]] = {c: [] for c in ALL_COMPONENTS}
        self.where: dict[str, str] = {}

    def _parts(self) -> list[str]:
        """Problem groups, most telling first: absent networks, wrong shapes, missing, unexpected keys."""
        absent, wrong_parts, missing_parts, unexpected_parts = [], [], [], []
        for c in ALL_COMPONENTS:
            label = _LABELS[c]
            missing, wrong, unexpected = self.missing[c], self.wrong[c], self.unexpected[c]
            if missing and len(missing) == self.total[c]:
                absent.append(f"no {label} weights ({self.where.get(c, '')}*)")
            elif missing:
                missing_parts.append(f"{_plural(len(missing), label)} missing ({_names(missing)})")
            if wrong:
                first_key, first_detail = wrong[0]
                shown = [f"{first_key} is {first_detail}"] + [key for key, _ in wrong[1:_SHOWN]]
                more = ", ..." if len(wrong) > _SHOWN else ""
                wrong_parts.append(f"{_plural(len(wrong), label)} with the wrong shape ({', '.join(shown)}{more})")
            if unexpected:
                unexpected_parts.append(
                    f"{len(unexpected)} unexpected {label} key{'s' if len(unexpected) != 1 else ''} "
                    f"({_names(unexpected)})"
                )
        return absent + wrong_parts + missing_parts + unexpected_parts

    def message(self, what: str) -> str | None:
        parts = self._parts()
        if not parts:
            return None
        only_missing = not any(self.wrong[c] or self.unexpected[c] for c in ALL_COMPONENTS)
        text = f"not a {'complete' if only_missing else 'valid'} {what}: {parts[0]}"
        for part in parts[1:]:
            if len(text) + len(part) > self.MAX_CHARS:
                return text + "; ..."
            text += "; " + part
        return text


# ---------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------

_DDPM_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


#: The single-file families sdrt converts (:data:`TEXT_PREFIXES`).
SUPPORTED = tuple(TEXT_PREFIXES)
_SUPPORTED_TEXT = "sdrt reads SD 1.x, SD 2.x, SDXL and the SDXL refiner"


def family_of(arch: str) -> str:
    """The family of what :func:`detect_architecture` named: ``sd2-inpaint`` -> ``sd2``."""
    return arch if arch in SUPPORTED else arch.split("-")[0]


def _check_supported(arch: str, state_dict: dict, configs: dict) -> None:
    family = family_of(arch)
    if arch not in SUPPORTED and family in SUPPORTED:
        # another input width (inpainting, pix2pix) is fine where the file's own configs say so
        conv_in = state_dict.get(LDM_PREFIXES["unet"] + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == configs["unet"].get("in_channels", 4):
            arch = family
    if arch in SUPPORTED:
        described = architecture_of(configs)
        if described != family:
            raise CheckpointError(f"this is an {ARCHITECTURE_NAMES[family]} checkpoint, but the configs given "
                                  f"describe {ARCHITECTURE_NAMES[described]}")
        return
    name = ARCHITECTURE_NAMES.get(arch, arch)
    if arch == "lora":
        raise CheckpointError("this is a LoRA, not a full Stable Diffusion checkpoint (LoRAs are not supported yet)")
    if arch == "vae":
        raise CheckpointError("this is a standalone VAE, not a full Stable Diffusion checkpoint")
    if arch == "diffusers":
        raise CheckpointError(
            "these weights are in the diffusers layout, not a single-file checkpoint: pass the diffusers folder"
        )
    if arch == "unknown":
        example = ", ".join(list(state_dict)[:_SHOWN])
        raise CheckpointError(f"not a Stable Diffusion checkpoint: unrecognised key layout ({example})")
    raise CheckpointError(f"{name} checkpoints are not supported yet ({_SUPPORTED_TEXT})")


def _is_ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES)


def ldm_to_diffusers(state_dict: dict[str, torch.Tensor], configs: dict) -> dict:
    """Convert a single-file (LDM / A1111 / sgm layout) state dict to diffusers components.

    ``configs`` holds the ``unet`` / ``vae`` / text encoder configs of the file's family (e.g.
    :func:`sd1_configs`, :func:`sdrt.export.configs.family_configs`); the key mapping is derived
    from them.  Returns ``{"unet": {...}, "vae": {...}, "text_encoder": {...}, ["text_encoder_2":
    {...}], "alphas_cumprod": tensor | None}``: state dicts in the diffusers file layout (text
    encoder keys ``text_model.*``), tensors shared with the input (VAE attention weights reshaped
    from 1x1 convs to Linear, OpenCLIP's fused q/k/v split into views, its projection transposed),
    dtypes untouched.  ``model_ema.*``, DDPM schedule buffers, ``position_ids``, OpenCLIP's
    ``logit_scale`` and SD 2.x's unused last resblock and projection are ignored;
    ``alphas_cumprod`` is returned if present.

    Raises :class:`CheckpointError` (one line) for unsupported architectures, configs of another
    family, and missing, misshapen or unexpected weights, naming the keys as they are (or would
    be) spelled in the file.
    """
    arch = detect_architecture(state_dict)
    _check_supported(arch, state_dict, configs)
    family = architecture_of(configs)
    legacy_clip = family == "sd1" and not any(k.startswith(LDM_PREFIXES["text_encoder"]) for k in state_dict) and any(
        k.startswith(_LEGACY_CLIP_PREFIX) for k in state_dict
    )
    maps = key_map(configs, legacy_clip=legacy_clip)
    expected = expected_shapes(configs)
    report = _Report()
    report.where = {"unet": LDM_PREFIXES["unet"], "vae": LDM_PREFIXES["vae"], **TEXT_PREFIXES[family]}
    if legacy_clip:
        report.where["text_encoder"] = _LEGACY_CLIP_PREFIX
    result: dict = {}
    used: set[str] = set()
    for component, shapes in expected.items():
        mapping, out = maps[component], {}
        report.total[component] = len(set(mapping.values()))
        for diffusers_key, shape in shapes.items():
            ldm_key = mapping.get(diffusers_key)
            if ldm_key is None:
                raise CheckpointError(
                    f"no LDM name for {_LABELS[component]} weight {diffusers_key} (unsupported diffusers version?)"
                )
            tensor = state_dict.get(ldm_key)
            if tensor is None:
                if ldm_key not in report.missing[component]:  # a fused in_proj is q, k and v
                    report.missing[component].append(ldm_key)
                continue
            used.add(ldm_key)
            want = _ldm_shape(diffusers_key, ldm_key, shape)
            found = tuple(tensor.shape)
            if found != want and not (_is_vae_attention_weight(diffusers_key) and found == shape):
                if all(key != ldm_key for key, _ in report.wrong[component]):
                    report.wrong[component].append((ldm_key, f"{_shape(found)}, expected {_shape(want)}"))
                continue
            out[diffusers_key] = _from_ldm(diffusers_key, ldm_key, tensor)
        result[component] = out
    owners = {"unet": (LDM_PREFIXES["unet"],), "vae": (LDM_PREFIXES["vae"],)}
    if family in ("sd1", "sd2"):
        owners["text_encoder"] = ("cond_stage_model.",)
    else:  # sgm's conditioner: one embedder per text encoder
        for name, prefix in TEXT_PREFIXES[family].items():
            owners[name] = (prefix.split(".model.")[0].split(".transformer.")[0] + ".",)
    ignored = _ignored_text_keys(family, configs)
    for key in state_dict:
        if key in used or _is_ignored(key) or key.startswith(ignored):
            continue
        for component, prefixes in owners.items():
            if key.startswith(prefixes):
                report.unexpected[component].append(key)
    message = report.message(f"{ARCHITECTURE_NAMES.get(family, family)} checkpoint")
    if message:
        raise CheckpointError(message)
    result["alphas_cumprod"] = state_dict.get("alphas_cumprod")
    return result


def _normalise_text_keys(text: dict) -> dict:
    if text and not any(k.startswith(_TEXT_PREFIX) for k in text):
        text = {(k if k.startswith(_PROJECTION) else _TEXT_PREFIX + k): v for k, v in text.items()}
    return {k: v for k, v in text.items() if not k.endswith(_POSITION_IDS)}


def diffusers_to_ldm(components: dict, configs: dict) -> dict[str, torch.Tensor]:
    """Convert diffusers components back to one single-file (LDM / A1111 / sgm layout) state dict.

    The exact inverse of :func:`ldm_to_diffusers`: ``components`` maps ``unet`` / ``vae`` / the
    family's text encoders to state dicts in the diffusers layout (text encoder keys with or
    without the ``text_model.`` prefix); an ``alphas_cumprod`` entry, if not ``None``, is written
    back as the ``alphas_cumprod`` buffer.  Text encoder keys are written under the family's
    :data:`TEXT_PREFIXES`, VAE attention weights as 1x1 convs, OpenCLIP's q/k/v fused into
    ``in_proj`` and its projection transposed (those are new tensors; the rest are shared).
    SD 2.x files are written without the 24th resblock the conversion ignores.

    Raises :class:`CheckpointError` (one line) for missing, misshapen or unexpected
    weights, naming diffusers keys.
    """
    family = architecture_of(configs)
    maps = key_map(configs)
    expected = expected_shapes(configs)
    report = _Report()
    report.where = {c: f"{c}/" for c in ALL_COMPONENTS}
    result: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for component, shapes in expected.items():
        given = dict(components.get(component) or {})
        if component.startswith("text_encoder"):
            given = _normalise_text_keys(given)
        mapping = maps[component]
        report.total[component] = len(shapes)
        for diffusers_key, shape in shapes.items():
            tensor = given.get(diffusers_key)
            if tensor is None:
                report.missing[component].append(diffusers_key)
                continue
            if tuple(tensor.shape) != shape:
                report.wrong[component].append((diffusers_key, f"{_shape(tensor.shape)}, expected {_shape(shape)}"))
                continue
            ldm_key = mapping.get(diffusers_key)
            if ldm_key is None:
                raise CheckpointError(
                    f"no LDM name for {_LABELS[component]} weight {diffusers_key} (unsupported diffusers version?)"
                )
            index = _qkv_index(diffusers_key, ldm_key)
            if index is not None:
                fused.setdefault(ldm_key, [None] * 3)[index] = tensor
                continue
            if _is_vae_attention_weight(diffusers_key):
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            elif _is_projection(ldm_key):
                tensor = tensor.t().contiguous()
            result[ldm_key] = tensor
        report.unexpected[component] = [k for k in given if k not in shapes]
    for ldm_key, parts in fused.items():
        if all(p is not None for p in parts):
            result[ldm_key] = torch.cat(parts, dim=0)
    message = report.message(f"{ARCHITECTURE_NAMES.get(family, family)} model")
    if message:
        raise CheckpointError(message)
    alphas_cumprod = components.get("alphas_cumprod")
    if alphas_cumprod is not None:
        result["alphas_cumprod"] = alphas_cumprod
    return result


# ---------------------------------------------------------------------------
# building torch modules
# ---------------------------------------------------------------------------


def _materialise_buffers(module: torch.nn.Module) -> None:
    """Give real values to the non-persistent buffers left on the meta device by a meta-device
    construction (checkpoints do not carry them): CLIP's ``position_ids`` is the only one."""
    for owner in module.modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(f"cannot build {type(owner).__name__}: buffer {name} has no value")
            owner.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


def _as_float32(state: dict, release: bool = False) -> dict:
    """``state`` in float32; with ``release`` each source tensor leaves ``state`` as it is converted,
    so an fp16 file's tensors are freed one by one instead of after the whole model is built."""
    if not release:
        return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    out = {}
    for k in list(state):
        v = state.pop(k)
        out[k] = v.to(torch.float32) if v.is_floating_point() else v
    return out


def _load_strict(module: torch.nn.Module, state: dict, label: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot load the {label} weights: {first}") from None


def build_modules(configs: dict, components: dict, *, release: bool = False) -> tuple:
    """Construct the modules of ``configs`` and load the weights strictly: ``(unet, vae,
    text_encoder)`` for SD 1.x / 2.x, ``(unet, vae, text_encoder, text_encoder_2)`` for SDXL (the
    refiner's ``text_encoder`` None), as :func:`sdrt.export.tiny.random_modules` returns them.

    ``unet`` is a ``diffusers.UNet2DConditionModel``, ``vae`` a ``diffusers.AutoencoderKL``,
    ``text_encoder`` a ``transformers.CLIPTextModel``, ``text_encoder_2`` a
    ``CLIPTextModelWithProjection``; all built from the config dicts (nothing fetched), in
    float32, eval mode, without gradients.  ``components`` are state dicts as returned by
    :func:`ldm_to_diffusers` or :func:`sdrt.export.load.load_diffusers_folder`; the modules take
    over their tensors (converted to float32 where needed) instead of allocating new ones.
    With ``release`` the state dicts are emptied as they are converted (``components`` keeps
    empty ones): an fp16 SDXL file's 6.6 GB are then never held beside all of its float32 copy.

    Raises :class:`CheckpointError` (one line) if a state dict does not match.
    """
    with torch.device("meta"):  # construct without allocating or initialising any weight
        modules = _instantiate(configs)
    unet, vae, text_encoder, text_encoder_2 = modules
    loads = [(unet, "unet", "UNet"), (vae, "vae", "VAE")]
    loads += [(module, name, _LABELS[name]) for module, name in ((text_encoder, "text_encoder"),
                                                                 (text_encoder_2, "text_encoder_2"))
              if module is not None]
    for module, name, label in loads:
        state = components[name]
        if release:
            components[name] = {}
        if name.startswith("text_encoder"):
            inner = _module_text_prefix(module)
            state = {(inner + k[len(_TEXT_PREFIX):] if k.startswith(_TEXT_PREFIX) else k): v
                     for k, v in _normalise_text_keys(dict(state)).items()}
        _load_strict(module, _as_float32(state, release), label)
        _materialise_buffers(module)
        module.eval()
        module.requires_grad_(False)
    return modules if text_encoder_2 is not None else modules[:3]


# ---------------------------------------------------------------------------
# conveniences
# ---------------------------------------------------------------------------


def expected_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The ``alphas_cumprod`` a scheduler config trains with (float64), to compare with a checkpoint's.

    Supports the ``linear`` and ``scaled_linear`` beta schedules of SD 1.x/2.x.
    """
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    start, end = float(scheduler_config["beta_start"]), float(scheduler_config["beta_end"])
    schedule = scheduler_config.get("beta_schedule", "linear")
    if schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise CheckpointError(f"unsupported beta schedule {schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def load_components(path) -> tuple[dict, dict]:
    """Load an SD 1.x model from a single file or a diffusers folder.

    Returns ``(configs, components)`` as :func:`sdrt.export.load.load_diffusers_folder`
    does; for a single file the configs are the shipped SD 1.5 ones
    (:func:`sd1_configs`) and ``components`` also carries ``alphas_cumprod``
    (``None`` if the file has none).
    """
    if Path(path).is_dir():
        return load_diffusers_folder(path)
    configs = sd1_configs()
    return configs, ldm_to_diffusers(load_state_dict(path), configs)
