"""Scaled-down SD 1.x configs: the real architecture at toy widths, for tests and the embedded model."""

from __future__ import annotations

import copy

from sdrt.export.configs import sd1_configs


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
    m = len(vae_channels)
    c["vae"].update(
        block_out_channels=list(vae_channels),
        down_block_types=["DownEncoderBlock2D"] * m,
        up_block_types=["UpDecoderBlock2D"] * m,
        layers_per_block=vae_layers,
        norm_num_groups=groups,
        sample_size=sample_size * 2 ** (m - 1),
    )
    c["text_encoder"].update(
        hidden_size=context_dim,
        projection_dim=context_dim,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
    )
    return c


def random_modules(configs: dict, seed: int = 0):
    """(unet, vae, text_encoder) torch modules with seeded random weights, eval mode, float32.

    Norm layers get random affine parameters (scale 1 +- 0.3, shift +- 0.3) instead of the
    fresh 1/0: trained models have them, and with a fresh final layer norm the text states have
    a mean of ~1e-9, which makes the webui's emphasis mean-restore (a ratio of two means) noise.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def public(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**public(configs["unet"]))
    vae = AutoencoderKL(**public(configs["vae"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**public(configs["text_encoder"])))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for m in module.modules():
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return unet.eval(), vae.eval(), text_encoder.eval()
