"""End to end on the tiny model: export layout, generation, PNG text, CLI behaviour and errors."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest
from PIL import Image

from sdrt.runtime.pipeline.txt2img import GenerationParams
from sdrt.runtime.png import parse_infotext

from conftest import run_sdrt


def test_bundle_layout_and_manifest(tiny_bundle, tiny_configs):
    for rel in ("model_index.json", "sdrt.json", "text_encoder/model.onnx", "text_encoder/model.embeds.onnx",
                "text_encoder/token_embeddings.npy",
                "unet/model.onnx", "vae_decoder/model.onnx", "vae_encoder/model.onnx", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (tiny_bundle / rel).is_file(), rel
    m = json.loads((tiny_bundle / "sdrt.json").read_text())
    assert m["architecture"] == "sd1" and m["prediction_type"] == "epsilon"
    assert m["latent_scale_factor"] == pytest.approx(0.18215) and m["vae_scale_factor"] == 8
    assert m["default_size"] == [64, 64]
    assert re.fullmatch(r"[0-9a-f]{10}", m["source"]["hash"]) and len(m["source"]["sha256"]) == 64
    assert m["text_encoder"]["num_layers"] == tiny_configs["text_encoder"]["num_hidden_layers"]
    # No leftovers of the temporary directory next to the bundle
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.endswith(".partial")]


def test_graph_dynamic_axes(tiny_bundle):
    unet = onnx.load(str(tiny_bundle / "unet" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert dims["sample"] == ["batch", 4, "height", "width"]
    assert dims["encoder_hidden_states"] == ["batch", "sequence", 32]
    te = onnx.load(str(tiny_bundle / "text_encoder" / "model.embeds.onnx"), load_external_data=False)
    assert [i.name for i in te.graph.input] == ["inputs_embeds"]
    assert [o.name for o in te.graph.output] == ["last_hidden_state", "normed_hidden_states"]
    # The optimum layout's graph: the same tower fed with token ids, transformers' outputs
    ids = onnx.load(str(tiny_bundle / "text_encoder" / "model.onnx"), load_external_data=False)
    assert [i.name for i in ids.graph.input] == ["input_ids"]
    assert [o.name for o in ids.graph.output] == ["last_hidden_state", "pooler_output"]


def test_generate_is_deterministic_and_seeds_follow_the_batch(tiny_pipeline):
    p = GenerationParams("a red circle", steps=4, sampler_name="Euler a", seed=123, batch_size=2)
    a = tiny_pipeline.generate(p)
    b = tiny_pipeline.generate(GenerationParams("a red circle", steps=4, sampler_name="Euler a", seed=124))
    assert [r.seed for r in a] == [123, 124]
    # Image 2 of a batch equals the same prompt generated alone with seed N+1
    assert np.array_equal(np.asarray(a[1].image), np.asarray(b[0].image))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(a[1].image))
    assert a[0].image.size == (64, 64)


def test_sizes_and_long_prompts(tiny_pipeline):
    long_prompt = ", ".join(["a small red circle on a blue background"] * 12)  # > 75 tokens: 2+ chunks
    cond, uncond = tiny_pipeline.conditioning(GenerationParams(long_prompt))
    assert cond.tokens % 77 == 0 and cond.tokens >= 154 and uncond.tokens == cond.tokens
    (img,) = tiny_pipeline.generate(GenerationParams(long_prompt, steps=2, sampler_name="Euler", seed=1,
                                                     width=96, height=72))
    assert img.image.size == (96, 72)


def test_infotext(tiny_pipeline):
    p = GenerationParams("a red circle, blue", negative_prompt="ugly", steps=3, sampler_name="Euler",
                         scheduler="Karras", cfg_scale=6.5, seed=42, clip_skip=2)
    (r,) = tiny_pipeline.generate(p)
    prompt, negative, params = parse_infotext(r.infotext)
    assert prompt == "a red circle, blue" and negative == "ugly"
    assert params["Steps"] == "3" and params["Sampler"] == "Euler" and params["Schedule type"] == "Karras"
    assert params["CFG scale"] == "6.5" and params["Seed"] == "42" and params["Size"] == "64x64"
    assert params["Clip skip"] == "2" and params["RNG"] == "CPU"
    assert params["Model"] == "tiny-sd1" and re.fullmatch(r"[0-9a-f]{10}", params["Model hash"])
    assert r.infotext.splitlines()[2].startswith("Steps: 3, Sampler: Euler, Schedule type: Karras, CFG scale: 6.5")


def test_clip_skip_changes_conditioning(tiny_pipeline):
    c1, _ = tiny_pipeline.conditioning(GenerationParams("a red circle", clip_skip=1))
    c2, _ = tiny_pipeline.conditioning(GenerationParams("a red circle", clip_skip=2))
    assert c1.tokens == c2.tokens and not np.allclose(c1.stacked(), c2.stacked())


def test_cli_generate_without_torch(tiny_bundle, tmp_path, no_torch_dir):
    """`sdrt generate` runs where importing torch fails, and writes NNNNN-SEED.png with the infotext."""
    out = tmp_path / "out"
    r = run_sdrt("generate", "a blue square", "--model", tiny_bundle, "--steps", 3, "--seed", 7,
                 "--batch-size", 2, "-o", out, pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "00000-7.png").stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes
    text = Image.open(out / "00001-8.png").text["parameters"]
    assert text.startswith("a blue square\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7,")
    assert "Seed: 8," in text
    check = run_sdrt("-v", "info", pythonpath_first=no_torch_dir)
    assert check.returncode == 0 and "CPUExecutionProvider" in check.stdout
    # The module really is blocked in that environment
    blocked = run_sdrt("export", "x", "y", pythonpath_first=no_torch_dir)
    assert blocked.returncode == 1 and "export extra" in blocked.stderr


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "width must be a positive multiple of 8, got 100"),
    (["--sampler", "Nope"], "unknown sampler 'Nope'; valid samplers: DPM++ 2M, DPM++ SDE"),
    (["--steps", "0"], "steps must be at least 1, got 0"),
    (["--scheduler", "Weird"], "unknown schedule 'Weird'"),
])
def test_cli_errors_are_one_line(tiny_bundle, tmp_path, args, message):
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "-o", tmp_path / "o", *args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_cli_sampler_options_and_rng_spelling(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "--steps", 2, "--seed", 3, "--sampler", "Euler",
                 "--s-churn", "0.5", "--s-tmin", "0.2", "--s-tmax", "9", "--rng", "CPU", "-o", out)
    assert r.returncode == 0, r.stderr
    _, _, params = parse_infotext(Image.open(out / "00000-3.png").text["parameters"])
    assert (params["Sigma churn"], params["Sigma tmin"], params["Sigma tmax"], params["RNG"]) == ("0.5", "0.2", "9.0",
                                                                                                  "CPU")
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "--rng", "gpu", "-o", tmp_path / "o2")
    assert r.returncode == 1 and "noise source 'gpu'" in r.stderr and not (tmp_path / "o2").exists()


def test_cli_missing_and_unreadable_models(tmp_path):
    r = run_sdrt("generate", "x", "--model", tmp_path / "nowhere")
    assert r.returncode == 1 and r.stderr.strip() == f"error: model not found: {tmp_path / 'nowhere'}"
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "sdrt.json").write_text("{not json")
    r = run_sdrt("generate", "x", "--model", broken)
    assert r.returncode == 1 and r.stderr.startswith("error: unreadable") and "Traceback" not in r.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    r = run_sdrt("generate", "x", "--model", junk, env_extra={"SDRT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "junk.safetensors" in r.stderr


def test_checkpoint_as_model_is_exported_once_into_the_cache(tiny_checkpoint, tmp_path):
    env = {"SDRT_CACHE": str(tmp_path / "cache")}
    for i in range(2):
        r = run_sdrt("-v", "generate", "a red circle", "--model", tiny_checkpoint, "--steps", 1, "--seed", 3,
                     "-o", tmp_path / "o", env_extra=env)
        assert r.returncode == 0, r.stderr
        assert ("exporting" in r.stderr) == (i == 0) and ("using cached bundle" in r.stderr) == (i == 1)
    bundles = list((tmp_path / "cache" / "bundles").iterdir())
    assert len(bundles) == 1 and (bundles[0] / "sdrt.json").exists()


def test_export_refuses_existing_output_and_bad_checkpoints(tiny_checkpoint, tiny_configs, tmp_path):
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    r = run_sdrt("export", tiny_checkpoint, target)
    assert r.returncode == 1 and "not empty" in r.stderr and (target / "keep.txt").exists()
    from safetensors.torch import load_file

    from sdrt.export.write import save_checkpoint

    sd = load_file(str(tiny_checkpoint))
    del sd["model.diffusion_model.out.2.weight"]
    bad = save_checkpoint(sd, tiny_configs, tmp_path / "bad.safetensors")
    r = run_sdrt("export", bad, tmp_path / "out")
    assert r.returncode == 1 and "model.diffusion_model.out.2.weight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
