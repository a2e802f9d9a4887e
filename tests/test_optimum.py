"""sdrt bundles run from text in optimum's ``ORTStableDiffusionPipeline`` / ``ORTStableDiffusionXLPipeline``.

The real optimum package runs in a subprocess (``tests/optimum_worker.py``): its ONNX Runtime
pipelines need transformers 4.x, which ``pip install --no-deps --target .venv/optimum -r
constraints/optimum.txt`` puts beside sdrt's environment (README). Checked, for a tiny SD 1.x bundle,
a tiny SDXL bundle and the shipped default bundle:

- optimum's prompt embeddings (``encode_prompt``: the token-id graphs ``text_encoder*/model.onnx``)
  equal sdrt's conditioning of the same plain prompt (SDXL: both encoders' penultimate states and
  the pooled vector);
- optimum's image equals diffusers' PyTorch pipeline on the same weights, scheduler (the bundle's
  scheduler config) and starting latents (the default bundle: an image, not a flat field).

The other way, without optimum: an SDXL bundle in optimum's layout (sdrt's token-id graphs, no
``sdrt.json``) generates in sdrt as the sdrt bundle does, its pooled vector read from ``text_embeds``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

OPTIMUM_PACKAGES = Path(os.environ.get("SDRT_OPTIMUM_PACKAGES", Path(sys.prefix) / "optimum"))
WORKER = Path(__file__).parent / "optimum_worker.py"
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a photo of a cat, best quality", "blurry", 6, 7.0

needs_optimum = pytest.mark.skipif(
    not (OPTIMUM_PACKAGES / "optimum" / "onnxruntime").is_dir(),
    reason=f"optimum is not installed at {OPTIMUM_PACKAGES}: pip install --no-deps --target .venv/optimum "
           "-r constraints/optimum.txt (README)")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def latents(bundle: Path, seed: int) -> np.ndarray:
    from sdrt.runtime.bundle import open_bundle

    b = open_bundle(bundle)
    w, h = b.default_size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, b.latent_channels, h // b.vae_scale_factor, w // b.vae_scale_factor),
                               dtype=np.float32)


@pytest.fixture(scope="module")
def sdxl(sdxl_bundle):
    """The tiny SDXL model (conftest's): (its torch modules, its sdrt bundle)."""
    from sdrt.export.tiny import random_modules

    configs, path = sdxl_bundle
    return random_modules(configs, seed=3), path


@pytest.fixture(scope="module")
def optimum_runs(tmp_path_factory, tiny_bundle, sdxl):
    """optimum's results ({name: npz}) for the three bundles, from one worker process."""
    from sdrt.models import default_model_path

    work = tmp_path_factory.mktemp("optimum_runs")
    bundles = {"sd1": (tiny_bundle, "sd"), "sdxl": (sdxl[1], "xl"), "default": (default_model_path(), "sd")}
    jobs = []
    for name, (bundle, kind) in bundles.items():
        np.save(work / f"{name}.npy", latents(bundle, seed=1))
        from sdrt.runtime.bundle import open_bundle

        w, h = open_bundle(bundle).default_size
        jobs.append({"bundle": str(bundle), "kind": kind, "prompt": PROMPT, "negative": NEGATIVE, "steps": STEPS,
                     "guidance": GUIDANCE, "latents": str(work / f"{name}.npy"), "width": w, "height": h,
                     "out": str(work / f"{name}.npz")})
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(OPTIMUM_PACKAGES), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(WORKER), str(work / "jobs.json")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: dict(np.load(work / f"{name}.npz")) for name in bundles}, work


def sdrt_conditioning(bundle: Path, text: str):
    """sdrt's states (and pooled vector) of one plain text."""
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.text.encoder import make_text_encoder

    s = make_text_encoder(open_bundle(bundle)).schedule([(STEPS, text)])
    return s.conds[0], (s.pooled[0] if s.pooled else None)


def diffusers_image(pipeline_cls, bundle: Path, latent: np.ndarray, **modules) -> np.ndarray:
    """diffusers' PyTorch pipeline on the torch modules, with the bundle's scheduler and tokenizers."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    config = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    tokenizers = {name: CLIPTokenizer.from_pretrained(bundle / name) for name in ("tokenizer", "tokenizer_2")
                  if (bundle / name).is_dir()}
    pipe = pipeline_cls(scheduler=scheduler, **tokenizers, **modules)
    h, w = latent.shape[2] * 8, latent.shape[3] * 8
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=torch.from_numpy(latent), height=h, width=w, output_type="np").images[0]


@needs_optimum
def test_sd1_text_encoder_matches_sdrt(optimum_runs, tiny_bundle):
    runs, _ = optimum_runs
    cond, _ = sdrt_conditioning(tiny_bundle, PROMPT)
    uncond, _ = sdrt_conditioning(tiny_bundle, NEGATIVE)
    np.testing.assert_allclose(runs["sd1"]["prompt_embeds"][0], cond, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["sd1"]["negative_prompt_embeds"][0], uncond, rtol=1e-5, atol=1e-5)


@needs_optimum
def test_sd1_image_matches_diffusers(optimum_runs, tiny_bundle, tiny_modules):
    from diffusers import StableDiffusionPipeline

    runs, work = optimum_runs
    unet, vae, text_encoder = tiny_modules
    ref = diffusers_image(StableDiffusionPipeline, tiny_bundle, np.load(work / "sd1.npy"), unet=unet, vae=vae,
                          text_encoder=text_encoder, safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    image = runs["sd1"]["image"]
    assert str(runs["sd1"]["scheduler"]) == "PNDMScheduler" and image.shape == ref.shape
    assert image.std() > 0.02
    assert psnr(image, ref) >= 90.0  # measured: 131.7 dB (SD 1.x), 130.4 dB (SDXL)


@needs_optimum
def test_sdxl_text_encoders_match_sdrt(optimum_runs, sdxl):
    runs, _ = optimum_runs
    for text, states, pooled in ((PROMPT, "prompt_embeds", "pooled_prompt_embeds"),
                                 (NEGATIVE, "negative_prompt_embeds", "negative_pooled_prompt_embeds")):
        cond, vector = sdrt_conditioning(sdxl[1], text)
        np.testing.assert_allclose(runs["sdxl"][states][0], cond, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(runs["sdxl"][pooled][0], vector, rtol=1e-5, atol=1e-5)


@needs_optimum
def test_sdxl_image_matches_diffusers(optimum_runs, sdxl):
    from diffusers import StableDiffusionXLPipeline

    runs, work = optimum_runs
    (unet, vae, text_encoder, text_encoder_2), bundle = sdxl
    ref = diffusers_image(StableDiffusionXLPipeline, bundle, np.load(work / "sdxl.npy"), unet=unet, vae=vae,
                          text_encoder=text_encoder, text_encoder_2=text_encoder_2, add_watermarker=False)
    image = runs["sdxl"]["image"]
    assert str(runs["sdxl"]["scheduler"]) == "EulerDiscreteScheduler" and image.shape == ref.shape
    assert image.std() > 0.02
    assert psnr(image, ref) >= 90.0  # measured: 131.7 dB (SD 1.x), 130.4 dB (SDXL)


@needs_optimum
def test_default_bundle_runs_in_optimum(optimum_runs):
    from sdrt.models import default_model_path

    runs, _ = optimum_runs
    cond, _ = sdrt_conditioning(default_model_path(), PROMPT)
    np.testing.assert_allclose(runs["default"]["prompt_embeds"][0], cond, rtol=1e-5, atol=1e-5)
    image = runs["default"]["image"]
    assert image.shape == (128, 128, 3) and image.std() > 0.05


def test_sdxl_bundle_in_optimum_layout_generates_in_sdrt(sdxl, tmp_path):
    """No sdrt.json, no token tables, no text projection: sdrt infers the bundle as optimum's and
    reads the penultimate states from ``hidden_states.{L-1}`` and the pooled vector from ``text_embeds``."""
    import shutil

    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

    native = sdxl[1]
    layout = tmp_path / "optimum-layout"
    shutil.copytree(native, layout, ignore=shutil.ignore_patterns("sdrt.json", "*.npy", "model.*.onnx",
                                                                   "provenance.json"))
    b = open_bundle(layout)
    assert b.manifest["format"] == "optimum" and b.architecture == "sdxl"
    for text in (PROMPT, NEGATIVE):
        (cond, pooled), (ref_cond, ref_pooled) = sdrt_conditioning(layout, text), sdrt_conditioning(native, text)
        np.testing.assert_allclose(cond, ref_cond, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    p = GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler_name="Euler", seed=1, width=64,
                         height=64)
    a = np.asarray(Pipeline(layout).generate(p)[0].image)
    assert psnr(a, np.asarray(Pipeline(native).generate(p)[0].image), 255.0) >= 60.0
