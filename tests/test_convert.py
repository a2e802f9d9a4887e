"""Checkpoint loading and the LDM <-> diffusers key conversion (SD 1.x).

Tiny random SD1-shaped modules (fixed seed) exercise every code path cheaply; the
full SD 1.5 configs are checked on the meta device (no weights allocated).  The
LDM -> diffusers direction is cross-checked against diffusers' own single-file
conversion helpers, called offline on the LDM dicts we produce.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

torch.set_num_threads(1)

from sdrt.export.configs import sd1_configs  # noqa: E402
from sdrt.export.convert import (  # noqa: E402
    COMPONENTS,
    build_modules,
    diffusers_to_ldm,
    expected_alphas_cumprod,
    expected_shapes,
    key_map,
    ldm_to_diffusers,
    load_components,
)
from sdrt.export.load import detect_architecture, load_diffusers_folder, load_state_dict  # noqa: E402
from sdrt.runtime.errors import CheckpointError, SdrtError  # noqa: E402

# ---------------------------------------------------------------------------
# configs and fixtures
# ---------------------------------------------------------------------------

TINY_A = {
    # the smallest SD1-like shape: 2 UNet levels, 1 layer per block, 2 CLIP layers
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 32,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
        "bos_token_id": 998,
        "eos_token_id": 999,
        "pad_token_id": 999,
        "hidden_act": "quick_gelu",
    },
}

TINY_B = {
    # SD1.5's block pattern (3 cross-attn levels + plain level), 2 layers per block,
    # a level without channel change, transformer depth 2
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 2,
        "cross_attention_dim": 24,
        "attention_head_dim": 4,
        "transformer_layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "norm_num_groups": 8,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 32,
    },
    "text_encoder": {
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "vocab_size": 500,
        "max_position_embeddings": 16,
        "bos_token_id": 498,
        "eos_token_id": 499,
        "pad_token_id": 499,
        "hidden_act": "quick_gelu",
    },
}

TINY = {"a": TINY_A, "b": TINY_B}


def _single_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    assert isinstance(exc.value, SdrtError)
    return message


def _file_layout_text(state: dict) -> dict:
    """A CLIPTextModel state dict in the text_model.* file layout, any transformers version."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out


def _random_modules(configs: dict, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
    vae = AutoencoderKL.from_config(configs["vae"]).eval()
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():  # no zero-initialised layers: every tensor distinct
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return unet, vae, text


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    configs = TINY[request.param]
    unet, vae, text = _random_modules(configs)
    components = {
        "unet": dict(unet.state_dict()),
        "vae": dict(vae.state_dict()),
        "text_encoder": _file_layout_text(text.state_dict()),
    }
    return configs, (unet, vae, text), components


@pytest.fixture(scope="module")
def tiny_ldm():
    """An LDM single-file state dict of TINY_A (the error-case tests mutate copies)."""
    unet, vae, text = _random_modules(TINY_A)
    components = {
        "unet": dict(unet.state_dict()),
        "vae": dict(vae.state_dict()),
        "text_encoder": _file_layout_text(text.state_dict()),
    }
    return diffusers_to_ldm(components, TINY_A)


def _meta_components(configs: dict) -> dict:
    """Components with the exact keys/shapes of `configs`' modules, on the meta device."""
    return {
        c: {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
        for c, shapes in expected_shapes(configs).items()
    }


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in ours.items():
        other = theirs[key]
        assert tensor.shape == other.shape, key
        if tensor.device.type != "meta":
            assert torch.equal(tensor, other), key


# ---------------------------------------------------------------------------
# configs and key maps
# ---------------------------------------------------------------------------


def test_sd1_configs_are_sd15_and_fresh_copies():
    configs = sd1_configs()
    assert set(configs) == {"unet", "vae", "text_encoder", "scheduler"}
    unet, vae, text, sched = configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["down_block_types"][-1] == "DownBlock2D" and unet["up_block_types"][0] == "UpBlock2D"
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (49406, 49407, 49407)
    assert (sched["beta_schedule"], sched["steps_offset"], sched["prediction_type"]) == ("scaled_linear", 1, "epsilon")
    configs["unet"]["block_out_channels"].append(1)
    assert sd1_configs()["unet"]["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.parametrize("name", ["a", "b", "sd15"])
def test_key_map_matches_modules_built_from_config(name):
    configs = sd1_configs() if name == "sd15" else TINY[name]
    maps, shapes = key_map(configs), expected_shapes(configs)
    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.text_model.",
    }
    for component in COMPONENTS:
        assert set(maps[component]) == set(shapes[component]), component
        ldm_names = list(maps[component].values())
        assert len(set(ldm_names)) == len(ldm_names)
        assert all(n.startswith(prefixes[component]) for n in ldm_names)
    if name == "sd15":
        assert [len(shapes[c]) for c in COMPONENTS] == [686, 248, 196]


# Names and shapes as they appear in the original v1-5-pruned checkpoint.
SD15_LDM_KEYS = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,),
}


def test_sd15_full_config_both_directions_on_meta():
    configs = sd1_configs()
    components = _meta_components(configs)
    ldm = diffusers_to_ldm(components, configs)
    assert len(ldm) == 686 + 248 + 196
    for key, shape in SD15_LDM_KEYS.items():
        assert tuple(ldm[key].shape) == shape, key
    assert detect_architecture(ldm) == "sd1"
    back = ldm_to_diffusers(ldm, configs)
    assert back["alphas_cumprod"] is None
    for c in COMPONENTS:
        assert {k: tuple(v.shape) for k, v in back[c].items()} == expected_shapes(configs)[c]


def test_sd15_build_modules_on_meta():
    configs = sd1_configs()
    unet, vae, text = build_modules(configs, _meta_components(configs))
    assert type(unet).__name__ == "UNet2DConditionModel" and type(vae).__name__ == "AutoencoderKL"
    assert type(text).__name__ == "CLIPTextModel" and text.config.eos_token_id == 49407
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 123_060_480
    for module in (unet, vae, text):
        assert not module.training
        assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in module.parameters())
    # non-persistent buffers (CLIP's position ids) are built for real, not left on meta
    buffers = dict(text.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())


# ---------------------------------------------------------------------------
# conversions on tiny random modules
# ---------------------------------------------------------------------------


def test_roundtrip_diffusers_ldm_diffusers_is_exact(tiny):
    configs, _, components = tiny
    ldm = diffusers_to_ldm(components, configs)
    assert {k.split(".")[0] for k in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    attn_q = "first_stage_model.encoder.mid.attn_1.q.weight"
    width = configs["vae"]["block_out_channels"][-1]
    assert tuple(ldm[attn_q].shape) == (width, width, 1, 1)
    back = ldm_to_diffusers(ldm, configs)
    assert set(back) == {*COMPONENTS, "alphas_cumprod"}
    for c in COMPONENTS:
        _assert_same_tensors(back[c], components[c])
    again = diffusers_to_ldm(back, configs)
    _assert_same_tensors(again, ldm)


def _diffusers_reference(ldm: dict, configs: dict) -> dict:
    """diffusers' own single-file converters applied to our LDM dict (no hub access)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    return {
        "unet": convert_ldm_unet_checkpoint(dict(ldm), configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(dict(ldm), configs["vae"]),
        "text_encoder": convert_ldm_clip_checkpoint(dict(ldm)),
    }


def test_ldm_to_diffusers_agrees_with_diffusers_single_file_utils(tiny):
    configs, _, components = tiny
    ldm = diffusers_to_ldm(components, configs)
    ours = ldm_to_diffusers(ldm, configs)
    reference = _diffusers_reference(ldm, configs)
    for c in COMPONENTS:
        _assert_same_tensors(ours[c], reference[c])


def test_sd15_ldm_to_diffusers_agrees_with_diffusers_single_file_utils_on_meta():
    configs = sd1_configs()
    ldm = diffusers_to_ldm(_meta_components(configs), configs)
    ours = ldm_to_diffusers(ldm, configs)
    reference = _diffusers_reference(ldm, configs)
    for c in COMPONENTS:
        _assert_same_tensors(ours[c], reference[c])


def test_build_modules_reproduces_the_original_modules(tiny):
    configs, (unet, vae, text), components = tiny
    ldm = diffusers_to_ldm(components, configs)
    ldm = {k: v.half() for k, v in ldm.items()}  # fp16 files come back as float32 modules
    originals = [m.half().float() for m in (unet, vae, text)]  # same rounding as the fp16 file
    built = build_modules(configs, ldm_to_diffusers(ldm, configs))
    for module, original in zip(built, originals):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
        _assert_same_tensors(dict(module.state_dict()), dict(original.state_dict()))
    b_unet, b_vae, b_text = built
    o_unet, o_vae, o_text = originals
    generator = torch.Generator().manual_seed(1)
    size = configs["unet"]["sample_size"]
    sample = torch.randn(1, 4, size, size, generator=generator)
    context = torch.randn(1, 5, configs["unet"]["cross_attention_dim"], generator=generator)
    latent = torch.randn(1, 4, 4, 4, generator=generator)
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    with torch.no_grad():
        assert torch.equal(b_unet(sample, 10, context).sample, o_unet(sample, 10, context).sample)
        assert torch.equal(b_vae.decode(latent).sample, o_vae.decode(latent).sample)
        assert torch.equal(b_text(ids).last_hidden_state, o_text(ids).last_hidden_state)


def test_legacy_clip_layout_ema_and_ddpm_buffers(tiny_ldm):
    reference = ldm_to_diffusers(tiny_ldm, TINY_A)
    legacy = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in tiny_ldm.items()}
    legacy["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None].float()
    legacy["model_ema.decay"] = torch.tensor(0.9999)
    legacy["model_ema.diffusion_modelout2weight"] = torch.zeros(1)
    legacy["first_stage_model.loss.logvar"] = torch.zeros(())
    alphas = expected_alphas_cumprod(sd1_configs()["scheduler"]).float()
    legacy["betas"] = 1 - alphas
    legacy["alphas_cumprod"] = alphas
    legacy["alphas_cumprod_prev"] = alphas
    converted = ldm_to_diffusers(legacy, TINY_A)
    for c in COMPONENTS:
        _assert_same_tensors(converted[c], reference[c])
    assert converted["alphas_cumprod"] is alphas
    assert diffusers_to_ldm(converted, TINY_A)["alphas_cumprod"] is alphas


def test_linear_shaped_vae_attention_is_accepted(tiny_ldm):
    flat = {k: (v[:, :, 0, 0] if ".mid.attn_1." in k and v.ndim == 4 else v) for k, v in tiny_ldm.items()}
    assert flat["first_stage_model.decoder.mid.attn_1.k.weight"].ndim == 2
    converted, reference = ldm_to_diffusers(flat, TINY_A), ldm_to_diffusers(tiny_ldm, TINY_A)
    _assert_same_tensors(converted["vae"], reference["vae"])


def test_schedule_helper_matches_diffusers():
    from diffusers import DDPMScheduler

    scheduler_config = sd1_configs()["scheduler"]
    ours = expected_alphas_cumprod(scheduler_config)
    theirs = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    ).alphas_cumprod
    assert torch.allclose(ours.float(), theirs, atol=1e-6)


# ---------------------------------------------------------------------------
# conversion errors
# ---------------------------------------------------------------------------


def test_missing_unet_keys_are_named_in_ldm_layout(tiny_ldm):
    broken = dict(tiny_ldm)
    for key in ("out.2.weight", "out.2.bias", "time_embed.0.weight"):
        del broken["model.diffusion_model." + key]
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(broken, TINY_A)
    message = _single_line(exc)
    assert message.startswith("not a complete SD 1.x checkpoint: 3 UNet keys missing (")
    assert "model.diffusion_model.out.2.weight" in message and "model.diffusion_model.time_embed.0.weight" in message


def test_wrong_shape_and_unexpected_keys(tiny_ldm):
    broken = dict(tiny_ldm)
    broken["first_stage_model.encoder.conv_in.weight"] = torch.zeros(5, 3, 3, 3)
    broken["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(broken, TINY_A)
    message = _single_line(exc)
    assert message.startswith("not a valid SD 1.x checkpoint:")
    assert (
        "1 VAE key with the wrong shape "
        "(first_stage_model.encoder.conv_in.weight is [5, 3, 3, 3], expected [8, 3, 3, 3])"
    ) in message
    assert (
        "1 unexpected UNet key (model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias)"
    ) in message


def test_missing_component_and_legacy_names(tiny_ldm):
    no_vae = {k: v for k, v in tiny_ldm.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(no_vae, TINY_A)
    assert _single_line(exc) == "not a complete SD 1.x checkpoint: no VAE weights (first_stage_model.*)"

    legacy = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in tiny_ldm.items()}
    del legacy["cond_stage_model.transformer.final_layer_norm.bias"]
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(legacy, TINY_A)
    assert "1 text encoder key missing (cond_stage_model.transformer.final_layer_norm.bias)" in _single_line(exc)


def test_full_sd15_config_rejects_tiny_checkpoint(tiny_ldm):
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(tiny_ldm, sd1_configs())
    message = _single_line(exc)
    assert message.startswith("not a valid SD 1.x checkpoint:") and "wrong shape" in message


def test_diffusers_to_ldm_reports_diffusers_names(tiny):
    configs, _, components = tiny
    broken = {c: dict(components[c]) for c in COMPONENTS}
    del broken["unet"]["conv_out.weight"]
    with pytest.raises(CheckpointError) as exc:
        diffusers_to_ldm(broken, configs)
    assert _single_line(exc) == "not a complete SD 1.x model: 1 UNet key missing (conv_out.weight)"


@pytest.mark.parametrize(
    "keys, arch, message",
    [
        (
            {
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                "conditioner.embedders.1.model.ln_final.weight": (1280,),
                "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
            },
            "sdxl",
            "this is an SDXL checkpoint, but the configs given describe SD 1.x",
        ),
        (
            {"conditioner.embedders.0.model.ln_final.weight": (1280,)},
            "sdxl-refiner",
            "this is an SDXL refiner checkpoint, but the configs given describe SD 1.x",
        ),
        (
            {
                "cond_stage_model.model.ln_final.weight": (1024,),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            },
            "sd2",
            "this is an SD 2.x checkpoint, but the configs given describe SD 1.x",
        ),
        (
            {
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
                "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
            },
            "sd1-inpaint",
            "SD 1.x inpainting checkpoints are not supported yet (sdrt reads SD 1.x, SD 2.x, SDXL and the SDXL refiner)",
        ),
        (
            {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 2048)},
            "sdxl",
            "this is an SDXL checkpoint, but the configs given describe SD 1.x",
        ),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
            "lora",
            "this is a LoRA, not a full Stable Diffusion checkpoint (LoRAs are not supported yet)",
        ),
        (
            {
                "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
                "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3),
            },
            "vae",
            "this is a standalone VAE, not a full Stable Diffusion checkpoint",
        ),
        (
            {"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
            "diffusers",
            "these weights are in the diffusers layout, not a single-file checkpoint: pass the diffusers folder",
        ),
        (
            {"foo.weight": (3,)},
            "unknown",
            "not a Stable Diffusion checkpoint: unrecognised key layout (foo.weight)",
        ),
    ],
)
def test_other_architectures_are_detected_and_refused(keys, arch, message):
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    assert detect_architecture(state) == arch
    with pytest.raises(CheckpointError) as exc:
        ldm_to_diffusers(state, sd1_configs())
    assert _single_line(exc) == message


def test_detects_sd1_without_text_encoder_by_cross_attention_width():
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state = {key: torch.empty(320, 768, device="meta")}
    assert detect_architecture(state) == "sd1"


# ---------------------------------------------------------------------------
# loading files
# ---------------------------------------------------------------------------

_TENSORS = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2, dtype=torch.float16)}


def _assert_tensors(loaded: dict) -> None:
    assert sorted(loaded) == sorted(_TENSORS)
    for k, v in _TENSORS.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


def test_load_safetensors_and_torch_formats(tmp_path):
    from safetensors.torch import save_file

    save_file(_TENSORS, str(tmp_path / "m.safetensors"))
    _assert_tensors(load_state_dict(tmp_path / "m.safetensors"))

    lightning = {"state_dict": dict(_TENSORS), "global_step": 470000, "epoch": 3}
    torch.save(lightning, tmp_path / "m.ckpt")
    _assert_tensors(load_state_dict(tmp_path / "m.ckpt"))

    nested = {"state_dict": {"state_dict": dict(_TENSORS)}}
    torch.save(nested, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _assert_tensors(load_state_dict(tmp_path / "legacy.pth"))

    torch.save(dict(_TENSORS, note="not a tensor"), tmp_path / "pytorch_model.bin")
    _assert_tensors(load_state_dict(tmp_path / "pytorch_model.bin"))


class _Payload:
    """Pickles to a call of os.system: executing it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CustomObject:
    pass


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": dict(_TENSORS), "callbacks": _Payload(marker)}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(tmp_path / "model.ckpt")
    message = _single_line(exc)
    assert message.startswith("refusing to unpickle model.ckpt: it references ")
    assert "system" in message and message.endswith("(only tensors and plain containers are allowed)")

    (tmp_path / "raw.ckpt").write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(tmp_path / "raw.ckpt")
    assert _single_line(exc).startswith("refusing to unpickle raw.ckpt: it references ")
    assert not marker.exists()

    torch.save({"state_dict": dict(_TENSORS), "cb": _CustomObject()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(tmp_path / "custom.pt")
    assert f"it references {__name__}._CustomObject (" in _single_line(exc)


def test_lightning_callbacks_are_refused_by_name(tmp_path, monkeypatch):
    import sys
    import types

    # Old full .ckpt files pickle Lightning callback objects next to the state dict.
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = fake.__name__, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__]
    for name in names:
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    torch.save({"state_dict": dict(_TENSORS), "callbacks": {"cb": ModelCheckpoint()}}, tmp_path / "model.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(tmp_path / "model.ckpt")
    assert _single_line(exc) == (
        "refusing to unpickle model.ckpt: it references pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
        " (only tensors and plain containers are allowed)"
    )


def test_unreadable_files(tmp_path):
    from safetensors.torch import save_file

    save_file(_TENSORS, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    torch.save(dict(_TENSORS), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "noise.ckpt").write_bytes(b"this is not a checkpoint at all")
    (tmp_path / "nothing.pt").write_bytes(b"")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    expectations = {
        "cut.safetensors": "cannot read cut.safetensors: truncated or corrupt safetensors file (",
        "cut.ckpt": "cannot read cut.ckpt: truncated or corrupt PyTorch checkpoint (",
        "empty.safetensors": "cannot read empty.safetensors: truncated or corrupt safetensors file (",
        "noise.ckpt": "cannot read noise.ckpt: truncated or corrupt PyTorch checkpoint (",
        "nothing.pt": "cannot read nothing.pt: the file is empty",
        "no_tensors.pt": "no tensors found in no_tensors.pt",
        "absent.safetensors": "no such checkpoint: ",
    }
    for name, start in expectations.items():
        with pytest.raises(CheckpointError) as exc:
            load_state_dict(tmp_path / name)
        assert _single_line(exc).startswith(start), name


# ---------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------


def _write_folder(root, modules, configs, *, safe=True):
    unet, vae, text = modules
    unet.save_pretrained(root / "unet", safe_serialization=safe)
    vae.save_pretrained(root / "vae", safe_serialization=safe)
    text.save_pretrained(root / "text_encoder", safe_serialization=safe)
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd1_configs()["scheduler"]))


def test_load_diffusers_folder_round_trip(tmp_path):
    modules = _random_modules(TINY_A)
    components = {
        "unet": dict(modules[0].state_dict()),
        "vae": dict(modules[1].state_dict()),
        "text_encoder": _file_layout_text(modules[2].state_dict()),
    }
    for safe in (True, False):
        root = tmp_path / f"model-{safe}"
        _write_folder(root, modules, TINY_A, safe=safe)
        configs, loaded = load_diffusers_folder(root)
        assert configs["unet"]["block_out_channels"] == [32, 64]
        assert configs["text_encoder"]["num_hidden_layers"] == 2
        assert configs["scheduler"]["beta_schedule"] == "scaled_linear"
        for c in COMPONENTS:
            _assert_same_tensors(loaded[c], components[c])
        built = build_modules(configs, loaded)
        assert built[2].config.num_hidden_layers == 2
    folder_configs, via_helper = load_components(root)
    assert folder_configs["unet"] == configs["unet"]
    _assert_same_tensors(via_helper["unet"], components["unet"])


def test_load_diffusers_folder_errors(tmp_path):
    modules = _random_modules(TINY_A)
    root = tmp_path / "model"
    _write_folder(root, modules, TINY_A)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "text_encoder" / "config.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        load_diffusers_folder(root)
    message = _single_line(exc)
    assert message.startswith(f"incomplete diffusers folder {root}: missing ")
    assert "text_encoder/config.json" in message
    assert "unet/diffusion_pytorch_model.safetensors (or diffusion_pytorch_model.bin)" in message

    xl = tmp_path / "xl"  # SDXL folders are read (tests/test_sdxl_export.py); an empty text_encoder_2 is named
    _write_folder(xl, modules, TINY_A)
    (xl / "text_encoder_2").mkdir()
    with pytest.raises(CheckpointError) as exc:
        load_diffusers_folder(xl)
    assert _single_line(exc) == (f"incomplete diffusers folder {xl}: missing text_encoder_2/config.json, "
                                 "text_encoder_2/model.safetensors (or pytorch_model.bin)")

    with pytest.raises(CheckpointError) as exc:
        load_diffusers_folder(tmp_path / "absent")
    assert _single_line(exc).startswith("not a diffusers folder: ")


def test_load_components_single_file(tmp_path, tiny_ldm):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ldm.items()}, str(path))
    # The shipped SD 1.5 configs are used for single files: a tiny file is rejected, one line.
    with pytest.raises(CheckpointError) as exc:
        load_components(path)
    assert _single_line(exc).startswith("not a valid SD 1.x checkpoint: ")
    converted = ldm_to_diffusers(load_state_dict(path), TINY_A)
    _assert_same_tensors(converted["unet"], ldm_to_diffusers(tiny_ldm, TINY_A)["unet"])
