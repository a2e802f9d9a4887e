"""SD 2.x and SDXL export: the shipped full-size configs, the tiny configs, the bundles' graphs
against the torch modules, single-file conversion both ways, SD 2.x eps / v detection."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from sdrt.export import convert  # noqa: E402
from sdrt.export.configs import (  # noqa: E402
    FAMILIES,
    architecture_of,
    check_configs,
    family_configs,
)
from sdrt.export.tiny import (  # noqa: E402
    random_bundle,
    random_modules,
    scaled_sd1_configs,
    scaled_sd2_configs,
    scaled_sdxl_configs,
)
from sdrt.runtime.bundle import MANIFEST, open_bundle  # noqa: E402
from sdrt.runtime.errors import CheckpointError  # noqa: E402

# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, arch, params, size, prediction", [
    ("sd2", "sd2", 865_910_724, 512, "epsilon"),
    ("sd2-v", "sd2", 865_910_724, 768, "v_prediction"),
    ("sdxl", "sdxl", 2_567_463_684, 1024, "epsilon"),
    ("sdxl-refiner", "sdxl-refiner", 2_259_526_660, 1024, "epsilon"),
])
def test_shipped_configs_are_the_published_models(family, arch, params, size, prediction):
    """The full-size configs build the published UNets (their parameter counts) and check out."""
    from diffusers import UNet2DConditionModel

    configs = check_configs(family_configs(family), family)
    assert architecture_of(configs) == arch
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
    assert sum(p.numel() for p in unet.parameters()) == params
    assert configs["unet"]["sample_size"] * 8 == size
    assert configs["scheduler"]["prediction_type"] == prediction
    if arch.startswith("sdxl"):
        assert configs["vae"]["scaling_factor"] == 0.13025
        assert configs["text_encoder_2"]["hidden_size"] == 1280 and configs["text_encoder_2"]["num_hidden_layers"] == 32


def test_family_configs_are_fresh_copies():
    a = family_configs("sdxl")
    a["unet"]["block_out_channels"][0] = 1
    assert family_configs("sdxl")["unet"]["block_out_channels"][0] == 320
    assert set(FAMILIES) == {"sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner"}


def test_tiny_configs_keep_the_architecture():
    sd2, sdxl, refiner = scaled_sd2_configs(), scaled_sdxl_configs(), scaled_sdxl_configs(refiner=True)
    assert [architecture_of(c) for c in (sd2, sdxl, refiner)] == ["sd2", "sdxl", "sdxl-refiner"]
    for c in (sd2, sdxl, refiner):
        check_configs(c, "tiny")
    assert sd2["text_encoder"]["hidden_act"] == "gelu" and sd2["unet"]["use_linear_projection"]
    assert sdxl["unet"]["cross_attention_dim"] == sdxl["text_encoder"]["hidden_size"] + sdxl["text_encoder_2"]["hidden_size"]
    assert sdxl["unet"]["projection_class_embeddings_input_dim"] == 40 + 6 * 8
    assert refiner["unet"]["projection_class_embeddings_input_dim"] == 40 + 5 * 8 and "text_encoder" not in refiner
    assert scaled_sd2_configs(v_prediction=True)["scheduler"]["prediction_type"] == "v_prediction"
    text = random_modules(sd2)[2]
    assert type(text).__name__ == "CLIPTextModel"
    text_2 = random_modules(sdxl)[3]
    assert type(text_2).__name__ == "CLIPTextModelWithProjection"
    # trained-looking norm affines on every module, the second text encoder included
    assert text_2.get_input_embeddings() is not None
    assert float(text_2.text_model.final_layer_norm.weight.std()) > 0.1
    assert random_modules(refiner)[2] is None


def test_sd1_random_modules_unchanged():
    """SD 1.x modules weight for weight as before the other families (the sums of every weight of
    each module, from the sd1-only random_modules of commit 3b9031d): fixtures depend on them."""
    modules = random_modules(scaled_sd1_configs(), seed=0)
    sums = [float(sum(v.double().sum() for v in m.state_dict().values() if v.is_floating_point()))
            for m in modules]
    assert sums == pytest.approx([1634.868216, 575.941443, 195.244265], abs=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["unet"].update(projection_class_embeddings_input_dim=87),
     r"projection_class_embeddings_input_dim 87 differs from text_encoder_2.projection_dim \+ 6 x"),
    (lambda c: c["unet"].update(cross_attention_dim=32),
     r"cross_attention_dim 32 differs from the sum of text_encoder.hidden_size \+ text_encoder_2.hidden_size 80"),
    (lambda c: c["unet"].update(addition_embed_type=None), r"addition_embed_type must be 'text_time'"),
    (lambda c: c["text_encoder_2"].pop("projection_dim"), r"text_encoder_2.projection_dim is missing"),
    (lambda c: c["text_encoder"].update(hidden_act="relu"), r"text_encoder.hidden_act must be one of"),
    (lambda c: c["unet"].update(use_linear_projection="yes"), r"use_linear_projection must be true, false or null"),
])
def test_bad_sdxl_configs_named(edit, message):
    c = scaled_sdxl_configs()
    edit(c)
    with pytest.raises(CheckpointError, match=message):
        check_configs(c, "x.safetensors")


def test_added_embedding_needs_a_second_encoder():
    c = scaled_sd2_configs()
    c["unet"].update(addition_embed_type="text_time")
    with pytest.raises(CheckpointError, match="needs a second text encoder"):
        check_configs(c, "x")


# --- bundles ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_bundle(sd2v_bundle):
    """The tiny SD 2.x v model (seed 3), exported once for the session (test_sdxl_fidelity uses it too)."""
    return sd2v_bundle


def _session(path):
    from sdrt.runtime.backends.onnxruntime import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _text_outputs(bundle, name, module, ids):
    """The graph's three outputs for token ids, and the torch module's hidden states for them."""
    table = np.load(bundle / f"{name}/token_embeddings.npy").astype(np.float32)
    out = _session(bundle / f"{name}/model.embeds.onnx").run(None, {"inputs_embeds": table[ids]})
    with torch.no_grad():
        ref = module(torch.tensor(ids), output_hidden_states=True)
    return out, ref


def _ids(n=2):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 49400, size=(n, 77))
    ids[:, 0] = 49406
    ids[:, 9:] = 49407
    return ids


def test_sd2_bundle(sd2_bundle):
    configs, path = sd2_bundle
    b = open_bundle(path)
    m = json.loads((path / MANIFEST).read_text())
    assert (m["format_version"], b.architecture, b.prediction_type) == (2, "sd2", "v_prediction")
    assert b.text_encoder["pad_token_id"] == 0 and b.text_encoder_2 is None
    assert "projection" not in b.text_encoder
    assert b.spec("text_encoder").output_names == ["last_hidden_state", "normed_hidden_states", "hidden_states"]
    assert b.spec("unet").input_names == ["sample", "timestep", "encoder_hidden_states"]
    _, _, text = random_modules(configs, seed=3)
    (last, normed, raw), ref = _text_outputs(path, "text_encoder", text, _ids())
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-5)
    for i in range(configs["text_encoder"]["num_hidden_layers"]):
        np.testing.assert_allclose(raw[i], ref.hidden_states[i + 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(normed[-1], last, atol=1e-6)


def test_sdxl_bundle(sdxl_bundle):
    configs, path = sdxl_bundle
    b = open_bundle(path)
    assert (b.architecture, b.latent_scale_factor, b.schema.format_version) == ("sdxl", 0.13025, 2)
    assert (b.text_encoder["pad_token_id"], b.text_encoder_2["pad_token_id"]) == (49407, 0)
    assert b.text_encoder_2["projection"] == "text_encoder_2/text_projection.npy"
    assert b.spec("unet").input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.shape for t in b.spec("unet").inputs[2:]] == [("batch", "sequence", 80), ("batch", 40), ("batch", 6)]
    assert (path / "tokenizer_2" / "vocab.json").exists()
    assert json.loads((path / "model_index.json").read_text())["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    unet, _, text, text_2 = random_modules(configs, seed=3)
    ids = _ids()
    (_, _, raw), ref = _text_outputs(path, "text_encoder", text, ids)
    np.testing.assert_allclose(raw[-2], ref.hidden_states[-2].numpy(), atol=1e-5)  # SDXL's z of CLIP ViT-L
    (last2, _, raw2), ref2 = _text_outputs(path, "text_encoder_2", text_2, ids)
    np.testing.assert_allclose(raw2[-2], ref2.hidden_states[-2].numpy(), atol=1e-5)  # bigG's penultimate
    # pooled: the final-normed state at the first end token, projected; transformers' text_embeds
    projection = np.load(path / "text_encoder_2/text_projection.npy")
    assert projection.dtype == np.float32 and projection.shape == (48, 40)
    pooled = last2[np.arange(len(ids)), (ids == 49407).argmax(1)] @ projection
    np.testing.assert_allclose(pooled, ref2.text_embeds.numpy(), atol=1e-5)
    # The token-id graphs (model.onnx, what optimum runs): transformers' outputs under their names
    for name, module, reference in (("text_encoder", text, ref), ("text_encoder_2", text_2, ref2)):
        session = _session(path / name / "model.onnx")
        assert [i.name for i in session.get_inputs()] == ["input_ids"]
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids})))
        layers = configs[name]["num_hidden_layers"]
        first = ["text_embeds", "last_hidden_state"] if name == "text_encoder_2" else ["last_hidden_state",
                                                                                       "pooler_output"]
        assert list(out) == first + [f"hidden_states.{k}" for k in range(layers + 1)]
        np.testing.assert_allclose(out["last_hidden_state"], reference.last_hidden_state.numpy(), atol=1e-5)
        for k in range(layers + 1):
            np.testing.assert_allclose(out[f"hidden_states.{k}"], reference.hidden_states[k].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["text_embeds"], ref2.text_embeds.numpy(), atol=1e-5)

    g = torch.Generator().manual_seed(1)
    feeds = {"sample": torch.randn(2, 4, 9, 7, generator=g), "timestep": torch.tensor([999.0, 10.0]),
             "encoder_hidden_states": torch.randn(2, 77, 80, generator=g), "text_embeds": torch.randn(2, 40, generator=g),
             "time_ids": torch.tensor([[72.0, 56, 0, 0, 72, 56], [1024, 1024, 0, 0, 1024, 1024]])}
    with torch.no_grad():
        want = unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}).sample
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    got = _session(path / "unet/model.onnx").run(None, np_feeds)[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    # the time ids reach the output (a UNet ignoring them would pass the comparison above as well)
    other = dict(np_feeds, time_ids=np_feeds["time_ids"][::-1].copy())
    assert np.abs(_session(path / "unet/model.onnx").run(None, other)[0] - got).max() > 1e-3


@pytest.mark.parametrize("which", ["sd2", "sdxl"])
def test_fusions_apply_to_the_new_graphs(which, sd2_bundle, sdxl_bundle):
    """The CPU graph passes fire on the new graphs (erf GELU in the OpenCLIP towers, attention with
    linear projections) and the fused graphs compute what the portable ones do."""
    from sdrt.runtime.backends import kernels

    _, path = sd2_bundle if which == "sd2" else sdxl_bundle
    m = json.loads((path / MANIFEST).read_text())
    unet = m["components"]["unet"]["optimized"]["cpu"]["passes"]
    assert unet["attention"] == (8 if which == "sd2" else 22) and unet["group_norm"] > 0 and unet["gelu"] > 0
    encoders = ["text_encoder"] + (["text_encoder_2"] if which == "sdxl" else [])
    fused = []
    for name in encoders:
        config = json.loads((path / name / "config.json").read_text())
        variant = m["components"][name].get("optimized", {}).get("cpu")
        if config["hidden_act"] == "gelu":  # OpenCLIP: erf GELU, fused once per layer
            assert variant["passes"]["gelu"] == config["num_hidden_layers"]
        else:  # CLIP ViT-L's quick_gelu is x * sigmoid(1.702 x): not the erf form
            assert variant is None or variant["passes"]["gelu"] == 0
        if variant is not None:
            fused.append(name)
    assert fused
    if not kernels.available():
        pytest.skip("sdrt's kernels library is not built (the fused graphs need it)")
    for name in fused:
        table = np.load(path / f"{name}/token_embeddings.npy").astype(np.float32)
        feeds = {"inputs_embeds": table[_ids()]}
        a = _session(path / name / "model.embeds.onnx").run(None, feeds)
        b = _session(path / name / "model.cpu.onnx").run(None, feeds)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=2e-4)


# --- single files and diffusers folders ---------------------------------------------------------

NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


def _components(modules) -> dict:
    return {n: m.state_dict() for n, m in zip(NAMES, modules) if m is not None}


def _file_layout(state: dict) -> dict:
    """A text model's state dict under the file names (transformers 5 leaves ``text_model.`` off)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sdxl-refiner"])
def test_ldm_layout_agrees_with_diffusers_converters(family):
    """diffusers' own single-file converters read the LDM files sdrt writes back to the same weights:
    an independent check of the key names (fused in_proj order, the projection's transpose, label_emb,
    per-level transformer depths)."""
    from diffusers.loaders import single_file_utils as dsf

    configs = {"sd2": scaled_sd2_configs, "sdxl": scaled_sdxl_configs,
               "sdxl-refiner": lambda: scaled_sdxl_configs(refiner=True)}[family]()
    modules = random_modules(configs, seed=2)
    components = _components(modules)
    ldm = convert.diffusers_to_ldm(components, configs)
    for name, ours in (("unet", dsf.convert_ldm_unet_checkpoint(ldm, configs["unet"])),
                       ("vae", dsf.convert_ldm_vae_checkpoint(ldm, configs["vae"]))):
        assert set(ours) == set(components[name])
        assert all(torch.equal(ours[k], components[name][k]) for k in ours), name
    for name, prefix in convert.TEXT_PREFIXES[family].items():
        module = modules[NAMES.index(name)]
        if name in convert._OPENCLIP[family]:
            theirs = dsf.convert_open_clip_checkpoint(module, ldm, prefix=prefix)
        else:
            theirs = dsf.convert_ldm_clip_checkpoint(ldm, remove_prefix=prefix[:-len("text_model.")])
        theirs, want = _file_layout(theirs), _file_layout(module.state_dict())
        assert set(theirs) == set(want), name
        assert all(torch.equal(theirs[k], want[k]) for k in want), name


def test_full_size_key_names():
    """The full-size maps name what the published files hold (sd_xl_base_1.0: 2515 keys, 1680 of
    them the UNet's; SD 2.x: OpenCLIP-H's 24 blocks, the last one ignored)."""
    xl = convert.key_map(family_configs("sdxl"))
    names = {c: set(m.values()) for c, m in xl.items()}
    assert {c: len(v) for c, v in names.items()} == {"unet": 1680, "vae": 248, "text_encoder": 196,
                                                     "text_encoder_2": 389}
    assert 2 + sum(len(v) for v in names.values()) == 2515  # + position_ids and logit_scale
    shapes = convert.expected_shapes(family_configs("sdxl"))
    ldm = {ldm_key: convert._ldm_shape(d, ldm_key, shapes[c][d]) for c, m in xl.items() for d, ldm_key in m.items()}
    for key, shape in {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    }.items():
        assert ldm[key] == shape, key
    sd2 = {v for m in convert.key_map(family_configs("sd2")).values() for v in m.values()}
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias" in sd2
    assert not any(".resblocks.23." in k for k in sd2)
    assert "cond_stage_model.model.ln_final.weight" in sd2 and "cond_stage_model.model.text_projection" not in sd2


def _sd2_extras(configs, ldm, g):
    """What a real SD 2.x file has beyond the 23 blocks: the 24th resblock, the projection, logit_scale."""
    prefix, width = "cond_stage_model.model.", configs["text_encoder"]["hidden_size"]
    last = configs["text_encoder"]["num_hidden_layers"]
    block = {k.replace(".resblocks.0.", f".resblocks.{last}."): torch.randn(v.shape, generator=g)
             for k, v in ldm.items() if k.startswith(prefix + "transformer.resblocks.0.")}
    return {**block, prefix + "text_projection": torch.randn(width, 16, generator=g),
            prefix + "logit_scale": torch.tensor(4.6)}


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """A tiny SDXL model as an fp16 .safetensors file, an fp32 .ckpt and a diffusers folder."""
    from sdrt.export.write import save_checkpoint
    from sdrt.runtime.text.tokenizer import ClipTokenizer

    root = tmp_path_factory.mktemp("sdxl-files")
    configs = scaled_sdxl_configs()
    modules = random_modules(configs, seed=5)
    ldm = convert.diffusers_to_ldm(_components(modules), configs)
    ldm |= {"conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    half = save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}, configs,
                           root / "xl16.safetensors")
    full = save_checkpoint(ldm, configs, root / "xl32.ckpt")
    folder = root / "xl-diffusers"
    for name, module in zip(NAMES, modules):
        module.save_pretrained(folder / name)
    ClipTokenizer.default().write_files(folder / "tokenizer")
    ClipTokenizer.default().write_files(folder / "tokenizer_2")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return configs, modules, half, full, folder


def test_sdxl_single_files_fp16_and_fp32(sdxl_files):
    from sdrt.export.write import load_checkpoint

    configs, modules, half, full, folder = sdxl_files
    want = {n: _file_layout(s) if n.startswith("text") else s for n, s in _components(modules).items()}
    for path, dtype in ((half, torch.float16), (full, torch.float32)):
        got_configs, got, info = load_checkpoint(path)
        assert got_configs == configs and info["kind"] == path.suffix[1:]
        for name, state in want.items():
            assert set(got[name]) == set(state), name
            for k, v in state.items():
                assert got[name][k].dtype == dtype and torch.equal(got[name][k].float(), v.to(dtype).float()), k
    got_configs, got = convert.load_diffusers_folder(folder)
    assert set(got) == set(NAMES) and "text_projection.weight" in got["text_encoder_2"]
    assert convert.build_modules(got_configs, got)[3].text_projection.weight.shape == (40, 48)


def test_build_modules_releases_the_file_tensors(sdxl_files):
    """With ``release`` (what export_checkpoint uses) the fp16 file's tensors leave the components
    as they are converted; the modules are the same as without it."""
    from sdrt.export.write import load_checkpoint

    half = sdxl_files[2]
    configs, components, _ = load_checkpoint(half)
    kept = convert.build_modules(configs, {k: dict(v) if isinstance(v, dict) else v for k, v in components.items()})
    inner = dict(components["unet"])
    released = convert.build_modules(configs, components, release=True)
    assert all(components[n] == {} for n in NAMES) and inner  # the caller's dicts are emptied
    for a, b in zip(kept, released):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(v.dtype == torch.float32 for v in sb.values() if v.is_floating_point())


def test_single_file_and_diffusers_folder_give_the_same_bundle(sdxl_files, tmp_path):
    from sdrt.export.write import export_checkpoint

    _, _, _, full, folder = sdxl_files
    a = export_checkpoint(full, tmp_path / "from-file", optimize=False)
    b = export_checkpoint(folder, tmp_path / "from-folder", optimize=False)
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    assert ma["source"]["kind"] == "ckpt" and mb["source"]["kind"] == "diffusers"
    for m in (ma, mb):
        del m["source"]
    assert ma == mb
    for rel in ("text_encoder/model.onnx", "text_encoder_2/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx",
                "vae_encoder/model.onnx", "text_encoder/token_embeddings.npy", "text_encoder_2/token_embeddings.npy",
                "text_encoder_2/text_projection.npy"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_sd2_single_file_drops_the_last_block(tmp_path):
    """A real SD 2.x file's 24th resblock, projection and logit_scale are expected and ignored; a
    25th block is not."""
    configs = scaled_sd2_configs()
    modules = random_modules(configs, seed=6)
    ldm = convert.diffusers_to_ldm(_components(modules), configs)
    g = torch.Generator().manual_seed(0)
    extras = _sd2_extras(configs, ldm, g)
    got = convert.ldm_to_diffusers({**ldm, **extras}, configs)
    text = _file_layout(modules[2].state_dict())
    assert set(got["text_encoder"]) == set(text)
    assert all(torch.equal(got["text_encoder"][k], text[k]) for k in text)
    beyond = {k.replace(".resblocks.2.", ".resblocks.3."): v for k, v in extras.items() if ".resblocks.2." in k}
    with pytest.raises(CheckpointError, match=r"^not a valid SD 2.x checkpoint: 12 unexpected text encoder keys "
                                              r"\(cond_stage_model.model.transformer.resblocks.3."):
        convert.ldm_to_diffusers({**ldm, **extras, **beyond}, configs)


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def sdxl_ldm():
    configs = scaled_sdxl_configs()
    return configs, convert.diffusers_to_ldm(_components(random_modules(configs, seed=7)), configs)


def test_sdxl_missing_and_misshapen_keys_named(sdxl_ldm):
    configs, ldm = sdxl_ldm
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    broken = {k: v for k, v in ldm.items() if k not in (in_proj, "model.diffusion_model.label_emb.0.0.weight")}
    with pytest.raises(CheckpointError) as exc:
        convert.ldm_to_diffusers(broken, configs)
    assert _one_line(exc) == ("not a complete SDXL checkpoint: 1 UNet key missing "
                              "(model.diffusion_model.label_emb.0.0.weight); 1 second text encoder key missing "
                              f"({in_proj})")
    bad = dict(ldm, **{in_proj: torch.zeros(3 * 48 + 3, 48),
                       "conditioner.embedders.1.model.text_projection": torch.zeros(40, 48)})
    with pytest.raises(CheckpointError) as exc:
        convert.ldm_to_diffusers(bad, configs)
    assert _one_line(exc) == ("not a valid SDXL checkpoint: 2 second text encoder keys with the wrong shape "
                              f"({in_proj} is [147, 48], expected [144, 48], "
                              "conditioner.embedders.1.model.text_projection)")
    no_g = {k: v for k, v in ldm.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(CheckpointError) as exc:
        convert.ldm_to_diffusers(no_g, configs)
    assert "no second text encoder weights (conditioner.embedders.1.model.*)" in _one_line(exc)


def test_sdxl_file_with_sd1_configs_refused(sdxl_ldm):
    _, ldm = sdxl_ldm
    with pytest.raises(CheckpointError) as exc:
        convert.ldm_to_diffusers(ldm, scaled_sd1_configs())
    assert _one_line(exc) == "this is an SDXL checkpoint, but the configs given describe SD 1.x"


@pytest.mark.parametrize("key, name", [
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD 3"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("clf.1.weight", "Stable Cascade"),
    ("model.effnet_mapper.0.weight", "Stable Cascade"),
])
def test_unsupported_families_named(tmp_path, key, name):
    from safetensors.torch import save_file

    from sdrt.export.write import export_checkpoint

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2, 2), "down_blocks.0.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as exc:
        export_checkpoint(path, tmp_path / "out")
    assert _one_line(exc) == (f"{name} checkpoints are not supported yet "
                              "(sdrt reads SD 1.x, SD 2.x, SDXL and the SDXL refiner)")
    assert not (tmp_path / "out").exists()


# --- SD 2.x: epsilon or v -----------------------------------------------------------------------


def _constant_unet(configs, value: float, seed: int = 8):
    """A tiny SD 2.x UNet whose output is ``value`` everywhere (conv_out zeroed, its bias set): the
    webui's probe then reads exactly mean(out - x) = value - 0.5."""
    unet = random_modules(configs, seed=seed)[0]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(value)
    return unet


def test_v_probe_is_the_webuis_decision():
    """mean(unet(0.5s, t=999, context 0.5s) - 0.5s) below -1 means v (sd_models_config.py)."""
    from sdrt.export.prediction import is_v_prediction, v_probe

    configs = scaled_sd2_configs()
    assert v_probe(_constant_unet(configs, -0.45)) == pytest.approx(-0.95)
    assert v_probe(_constant_unet(configs, -0.55)) == pytest.approx(-1.05)
    assert not is_v_prediction(-0.95) and is_v_prediction(-1.05) and not is_v_prediction(-1.0)
    # the probe runs the UNet: its input and timestep reach the output
    unet = random_modules(configs, seed=8)[0]
    assert v_probe(unet) != pytest.approx(v_probe(_constant_unet(configs, 0.0)))


def test_decide_prediction_picks_the_sd2_model():
    """With the shipped SD 2.x configs the probe picks the 512 base or the 768-v model; a config that
    names its prediction type keeps it; --prediction overrides both."""
    from sdrt.export.write import decide_prediction

    tiny = scaled_sd2_configs()
    v_unet, eps_unet = _constant_unet(tiny, -2.0), _constant_unet(tiny, 0.5)
    configs, record = decide_prediction(family_configs("sd2"), v_unet)
    assert configs == family_configs("sd2-v") and configs["unet"]["sample_size"] == 96
    assert record["by"] == "probe" and record["type"] == "v_prediction" and record["probe"] == pytest.approx(-2.5)
    configs, record = decide_prediction(family_configs("sd2"), eps_unet)
    assert configs == family_configs("sd2") and record["type"] == "epsilon"
    configs, record = decide_prediction(family_configs("sd2"), v_unet, "eps")
    assert configs == family_configs("sd2") and record == {"type": "epsilon", "by": "--prediction"}
    named = scaled_sd2_configs(v_prediction=True)
    assert decide_prediction(named, eps_unet)[1] == {"type": "v_prediction", "by": "config"}
    configs, record = decide_prediction(scaled_sdxl_configs(), eps_unet, "v")
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and record["by"] == "--prediction"


def test_sd2_file_prediction_detected_and_overridden(tmp_path):
    """End to end: a tiny SD 2.x file whose configs do not name the prediction type is probed
    (v here), and ``sdrt export --prediction eps`` overrides the detection."""
    from conftest import run_sdrt

    from sdrt.export.write import export_checkpoint, save_checkpoint

    configs = scaled_sd2_configs()
    del configs["scheduler"]["prediction_type"]
    unet = _constant_unet(configs, -2.0)
    _, vae, text = random_modules(configs, seed=8)
    ldm = convert.diffusers_to_ldm(_components((unet, vae, text)), configs)
    ldm |= _sd2_extras(configs, ldm, torch.Generator().manual_seed(1))
    path = save_checkpoint(ldm, configs, tmp_path / "sd2.safetensors")
    bundle = export_checkpoint(path, tmp_path / "detected", optimize=False)
    m = json.loads((bundle / MANIFEST).read_text())
    assert m["prediction_type"] == "v_prediction" and m["architecture"] == "sd2"
    assert m["exporter"]["prediction"]["by"] == "probe"
    assert json.loads((bundle / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    result = run_sdrt("export", path, tmp_path / "eps", "--prediction", "eps", "--no-optimize")
    assert result.returncode == 0, result.stderr
    m = json.loads((tmp_path / "eps" / MANIFEST).read_text())
    assert m["prediction_type"] == "epsilon" and m["exporter"]["prediction"] == {"type": "epsilon", "by": "--prediction"}


# --- the refiner, optimum folders ---------------------------------------------------------------


def test_refiner_file_and_bundle(tmp_path):
    """The refiner: OpenCLIP bigG alone under conditioner.embedders.0.model, 5 time ids (the
    aesthetic score in place of the target size), no text_encoder component."""
    configs = scaled_sdxl_configs(refiner=True)
    modules = random_modules(configs, seed=9)
    ldm = convert.diffusers_to_ldm(_components(modules), configs)
    assert {k.split(".model.")[0] for k in ldm if k.startswith("conditioner.")} == {"conditioner.embedders.0"}
    back = convert.ldm_to_diffusers(ldm, configs)
    assert set(back) == {"unet", "vae", "text_encoder_2", "alphas_cumprod"}
    path = random_bundle(configs, tmp_path / "refiner", seed=9, optimize=False)
    b = open_bundle(path)
    assert (b.architecture, b.text_encoder, b.schema.format_version) == ("sdxl-refiner", None, 2)
    assert b.text_encoder_2["pad_token_id"] == 0 and not b.has("text_encoder")
    assert [t.shape for t in b.spec("unet").inputs[2:]] == [("batch", "sequence", 48), ("batch", 40), ("batch", 5)]
    assert json.loads((path / "model_index.json").read_text())["text_encoder"] == [None, None]
    raw = json.loads((path / MANIFEST).read_text())
    del raw["text_encoder_2"]
    (path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="text_encoder_2 is missing"):
        open_bundle(path)


def _optimum_folder(root, configs: dict, components: tuple[str, ...]):
    """The files ``optimum-cli export onnx`` writes for a pipeline (graphs as empty placeholders:
    opening a bundle reads configs and checks the graphs exist)."""
    for name in components:
        (root / name).mkdir(parents=True)
        (root / name / "model.onnx").write_bytes(b"")
        key = "vae" if name.startswith("vae") else name
        (root / name / "config.json").write_text(json.dumps(configs[key]))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ORTStableDiffusionXLPipeline"}))
    return root


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner", "sd2-v"])
def test_optimum_folders_inferred(tmp_path, family):
    configs = family_configs(family)
    texts = tuple(n for n in ("text_encoder", "text_encoder_2") if n in configs)
    b = open_bundle(_optimum_folder(tmp_path / family, configs, (*texts, "unet", "vae_decoder", "vae_encoder")))
    assert not b.native and b.architecture == family.removesuffix("-v")
    size = {"sdxl": 1024, "sdxl-refiner": 1024, "sd2-v": 768}[family]
    assert b.default_size == (size, size)
    assert b.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    if family.startswith("sdxl"):
        assert b.latent_scale_factor == 0.13025
        assert b.text_encoder_2 == {"hidden_size": 1280, "num_layers": 32, "bos_token_id": 49406,
                                    "eos_token_id": 49407, "pad_token_id": 0}
        assert (b.text_encoder is None) == (family == "sdxl-refiner")
    else:
        assert b.text_encoder["pad_token_id"] == 0 and b.text_encoder["hidden_size"] == 1024
    if family == "sdxl":
        assert b.text_encoder["pad_token_id"] == 49407


def test_scattered_external_data_streamed_into_one_file(tmp_path, sd2_bundle):
    """Graphs over 2 GB come out of torch with one file per tensor; consolidate streams them into
    the one model.onnx_data without loading them together, and the graph computes the same."""
    import onnx

    from sdrt.export.graphs import EXTERNAL_DATA, consolidate

    _, bundle = sd2_bundle
    work = tmp_path / "unet"
    work.mkdir()
    model = onnx.load(str(bundle / "unet" / "model.onnx"))
    onnx.save_model(model, str(work / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024)
    scattered = len(list(work.iterdir()))
    assert scattered > 20
    consolidate(work / "model.onnx", limit=1 << 20)
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", EXTERNAL_DATA]
    g = np.random.default_rng(0)
    feeds = {"sample": g.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": g.standard_normal((1, 77, 32), dtype=np.float32)}
    want = _session(bundle / "unet" / "model.onnx").run(None, feeds)[0]
    np.testing.assert_array_equal(_session(work / "model.onnx").run(None, feeds)[0], want)
