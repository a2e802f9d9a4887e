"""Scaled-down configs: the real architectures (SD 1.x, SD 2.x, SDXL and its refiner) at toy widths,
for tests and the embedded model."""

from __future__ import annotations

import copy

from sdrt.export.configs import TIME_IDS, architecture_of, family_configs, sd1_configs


def scaled_sd1_configs(*, unet_channels=(32, 64), unet_layers=1, attention_heads=2, context_dim=32,
                       vae_channels=(16, 16, 16, 16), vae_layers=1, groups=8, text_layers=2,
                       text_heads=2, text_intermediate=64, sample_size=8) -> dict:
    """SD 1.x configs with the widths and depths replaced; block types, the factor-8 VAE, the CLIP
    vocabulary and the noise schedule stay those of SD 1.5."""
    c = copy.deepcopy(sd1_configs())
    n = len(unet_channels)
    c["unet"].update(
        sample_size=sample_size,
        block_out_channels=list(unet_channels),
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        layers_per_block=unet_layers,
        attention_head_dim=attention_heads,
        cross_attention_dim=context_dim,
        norm_num_groups=groups,
    )
    _scale_vae(c["vae"], vae_channels, vae_layers, groups, sample_size)
    c["text_encoder"].update(
        hidden_size=context_dim,
        projection_dim=context_dim,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
    )
    return c


def scaled_sd2_configs(*, v_prediction: bool = False, unet_channels=(32, 64), unet_layers=1,
                       attention_heads=(2, 4), context_dim=32, vae_channels=(16, 16, 16, 16), vae_layers=1,
                       groups=8, text_layers=2, text_heads=2, text_intermediate=64, projection_dim=16,
                       sample_size=8) -> dict:
    """SD 2.x configs at toy widths: the 512 base (epsilon) or, with ``v_prediction``, the 768-v
    model. As the published ones: an OpenCLIP-like text tower (erf GELU, pad id 0), cross
    attention as wide as its states, linear transformer projections, per-block head counts."""
    c = family_configs("sd2-v" if v_prediction else "sd2")
    n = len(unet_channels)
    heads = list(attention_heads) if not isinstance(attention_heads, int) else [attention_heads] * n
    c["unet"].update(
        sample_size=sample_size,
        block_out_channels=list(unet_channels),
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        layers_per_block=unet_layers,
        attention_head_dim=heads[:n],
        cross_attention_dim=context_dim,
        norm_num_groups=groups,
    )
    _scale_vae(c["vae"], vae_channels, vae_layers, groups, sample_size)
    c["text_encoder"].update(hidden_size=context_dim, projection_dim=projection_dim,
                             intermediate_size=text_intermediate, num_hidden_layers=text_layers,
                             num_attention_heads=text_heads)
    return c


def scaled_sdxl_configs(*, refiner: bool = False, unet_channels=(32, 64, 64), unet_layers=1,
                        attention_heads=(2, 4, 4), transformer_layers=(1, 1, 2), text_hidden=(32, 48),
                        text_layers=(2, 3), text_heads=2, text_intermediate=(64, 96), projection_dim=40,
                        time_embed_dim=8, vae_channels=(16, 16, 16, 16), vae_layers=1, groups=8,
                        sample_size=8) -> dict:
    """SDXL base configs at toy widths (with ``refiner``, the refiner's: no CLIP ViT-L, 5 time ids).

    As in the published config: a first level without attention, more transformer layers deeper
    down (``transformer_layers_per_block``), linear projections, the ``text_time`` added embedding
    (``projection_class_embeddings_input_dim`` = pooled width + time ids x ``addition_time_embed_dim``),
    cross attention as wide as both encoders' states side by side, VAE scaling 0.13025."""
    family = "sdxl-refiner" if refiner else "sdxl"
    c = family_configs(family)
    n = len(unet_channels)
    heads = list(attention_heads) if not isinstance(attention_heads, int) else [attention_heads] * n
    depth = list(transformer_layers) if not isinstance(transformer_layers, int) else [transformer_layers] * n
    if refiner:  # the refiner's levels: no attention at either end
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 2) + ["DownBlock2D"]
        up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 2) + ["UpBlock2D"]
    else:
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
        up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
    c["text_encoder_2"].update(hidden_size=text_hidden[1], intermediate_size=text_intermediate[1],
                               num_hidden_layers=text_layers[1], num_attention_heads=text_heads,
                               projection_dim=projection_dim)
    if not refiner:
        c["text_encoder"].update(hidden_size=text_hidden[0], projection_dim=text_hidden[0],
                                 intermediate_size=text_intermediate[0], num_hidden_layers=text_layers[0],
                                 num_attention_heads=text_heads)
    c["unet"].update(
        sample_size=sample_size,
        block_out_channels=list(unet_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=unet_layers,
        attention_head_dim=heads[:n],
        transformer_layers_per_block=depth[:n],
        cross_attention_dim=sum(c[name]["hidden_size"] for name in ("text_encoder", "text_encoder_2") if name in c),
        norm_num_groups=groups,
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=projection_dim + TIME_IDS[family] * time_embed_dim,
    )
    _scale_vae(c["vae"], vae_channels, vae_layers, groups, sample_size)
    return c


def _scale_vae(vae: dict, channels, layers: int, groups: int, sample_size: int) -> None:
    m = len(channels)
    vae.update(block_out_channels=list(channels), down_block_types=["DownEncoderBlock2D"] * m,
               up_block_types=["UpDecoderBlock2D"] * m, layers_per_block=layers, norm_num_groups=groups,
               sample_size=sample_size * 2 ** (m - 1))


def random_modules(configs: dict, seed: int = 0):
    """The modules of any family with seeded random weights, eval mode, float32: ``(unet, vae,
    text_encoder)`` for SD 1.x / 2.x, ``(unet, vae, text_encoder, text_encoder_2)`` for SDXL
    (a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``; the refiner's ``text_encoder`` is
    None). SD 1.x modules are the same, weight for weight, as before the other families existed.

    Norm layers get random affine parameters (scale 1 +- 0.3, shift +- 0.3) instead of the
    fresh 1/0: trained models have them, and with a fresh final layer norm the text states have
    a mean of ~1e-9, which makes the webui's emphasis mean-restore (a ratio of two means) noise.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def public(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**public(configs["unet"]))
    vae = AutoencoderKL(**public(configs["vae"]))
    text_encoder = (CLIPTextModel(CLIPTextConfig(**public(configs["text_encoder"])))
                    if configs.get("text_encoder") is not None else None)
    text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**public(configs["text_encoder_2"])))
                      if configs.get("text_encoder_2") is not None else None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (unet, vae, text_encoder, text_encoder_2):
            for m in module.modules() if module is not None else ():
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    modules = tuple(m.eval() if m is not None else None for m in (unet, vae, text_encoder, text_encoder_2))
    return modules if architecture_of(configs) in TIME_IDS else modules[:3]


def random_bundle(configs: dict, out_dir, *, seed: int = 0, **kwargs):
    """Export :func:`random_modules` of ``configs`` to a bundle at ``out_dir`` (any family);
    ``kwargs`` go to :func:`sdrt.export.write.export_modules`. Returns the bundle path."""
    from sdrt.export.write import export_modules

    unet, vae, text_encoder, *rest = random_modules(configs, seed=seed)
    source = {"name": f"random-{architecture_of(configs)}-{seed}", "kind": "random", "sha256": None, "hash": None}
    return export_modules(unet, vae, text_encoder, configs, out_dir, source=source,
                          text_encoder_2=rest[0] if rest else None, **kwargs)
