"""The embedded default model: shipped files, re-export, torch-free default generation, quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.models import default_model_path
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

from conftest import run_sdrt
from tools import shapes

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "sdrt-shapes-v1.safetensors"
SOURCE_BUNDLE = ROOT / "runtime" / "data" / "default_model"

# 24 fixed requests: every shape with eight colour / background pairs, all eight colours used
PAIRS = [("red", "blue"), ("green", "yellow"), ("blue", "white"), ("yellow", "purple"),
         ("purple", "orange"), ("orange", "black"), ("white", "green"), ("black", "red")]
REQUESTS = [(shape, fg, bg) for i, shape in enumerate(shapes.SHAPES)
            for fg, bg in PAIRS[i:] + PAIRS[:i]]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def test_shipped_files_fit_the_budget():
    assert CHECKPOINT.is_file() and (SOURCE_BUNDLE / "sdrt.json").is_file()
    total = _size(CHECKPOINT) + _size(SOURCE_BUNDLE)
    assert total <= 25_000_000, f"{total / 1e6:.1f} MB"  # the 25 MB, read as 25,000,000 bytes
    manifest = json.loads((SOURCE_BUNDLE / "sdrt.json").read_text())
    assert manifest["default_size"] == [128, 128] and manifest["architecture"] == "sd1"
    assert manifest["scheduler"] == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                     "beta_schedule": "scaled_linear"}
    assert manifest["prediction_type"] == "epsilon" and manifest["latent_channels"] == 4
    # The installed package carries the same bundle
    assert json.loads((default_model_path() / "sdrt.json").read_text())["source"] == manifest["source"]


def test_checkpoint_is_in_the_a1111_layout():
    from sdrt.export.load import detect_architecture, load_state_dict

    sd = load_state_dict(CHECKPOINT)
    assert detect_architecture(sd) == "sd1"
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes <= {"model", "first_stage_model", "cond_stage_model", "alphas_cumprod"}


def test_reexport_matches_the_shipped_bundle(tmp_path):
    from sdrt.export.write import export_checkpoint
    from sdrt.runtime.backends.onnxruntime import Session

    fresh = export_checkpoint(CHECKPOINT, tmp_path / "reexported")
    shipped, ours = json.loads((SOURCE_BUNDLE / "sdrt.json").read_text()), json.loads((fresh / "sdrt.json").read_text())
    assert ours["source"]["sha256"] == shipped["source"]["sha256"]
    assert ours["components"] == shipped["components"] and ours["latent_scale_factor"] == shipped["latent_scale_factor"]
    assert np.array_equal(np.load(fresh / "text_encoder" / "token_embeddings.npy"),
                          np.load(SOURCE_BUNDLE / "text_encoder" / "token_embeddings.npy"))
    rng = np.random.default_rng(0)
    feeds = {
        "text_encoder": {"inputs_embeds": rng.standard_normal((2, 77, 32), dtype=np.float32)},
        "unet": {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
                 "timestep": np.array([999.0, 10.5], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 16, 16), dtype=np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)},
    }
    paths = {name: c["path"] for name, c in shipped["components"].items()}
    # The text encoder's token-id graph (what optimum runs) too
    feeds["text_encoder_ids"] = {"input_ids": rng.integers(0, 49408, (2, 77))}
    paths["text_encoder_ids"] = shipped["components"]["text_encoder"]["token_ids"]["path"]
    for name, feed in feeds.items():
        a = Session(SOURCE_BUNDLE / paths[name]).run(feed)
        b = Session(fresh / paths[name]).run(feed)
        for key in a:
            assert np.abs(a[key] - b[key]).max() <= 1e-5, (name, key)


def test_default_generate_without_torch(tmp_path, no_torch_dir):
    out = tmp_path / "out"
    r = run_sdrt("generate", "a red circle on a blue background", "--seed", 1, "-o", out,
                 pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    (png,) = out.iterdir()
    image = Image.open(png)
    assert png.name == "00000-1.png" and image.size == (128, 128)
    assert "Model: sdrt-shapes-v1" in image.text["parameters"]


@pytest.fixture(scope="module")
def default_pipeline():
    return Pipeline(default_model_path())


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_quality(default_pipeline, sampler):
    """Requested colours (centre and corners) and shapes, measured, over 24 prompts at 20 steps."""
    colours = shape_hits = 0
    misses = []
    for i, (shape, fg, bg) in enumerate(REQUESTS):
        p = GenerationParams(shapes.caption(shape, fg, bg), steps=20, sampler_name=sampler, cfg_scale=7.0, seed=1000 + i)
        (result,) = default_pipeline.generate(p)
        m = shapes.measure(result.image)
        colours += m.colour == fg and m.background == bg
        shape_hits += m.shape == shape
        if (m.colour, m.background, m.shape) != (fg, bg, shape):
            misses.append(f"{p.prompt} -> {m.colour} {m.shape} on {m.background}")
    n = len(REQUESTS)
    assert colours / n >= 0.90 and shape_hits / n >= 0.75, (
        f"{sampler}: colours {colours}/{n}, shapes {shape_hits}/{n}; misses: {misses}")
