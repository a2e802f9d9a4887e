"""The runtime against the PyTorch reference (diffusers modules, same weights, noise and sampler)."""

from __future__ import annotations

import json

import pytest

from sdrt.export.reference import verify_bundle
from sdrt.runtime.pipeline.txt2img import GenerationParams

from conftest import run_sdrt


@pytest.mark.parametrize("sampler, kwargs", [
    ("Euler a", {}),
    ("Euler", {"negative_prompt": "blurry, ugly", "clip_skip": 2}),
    ("Euler", {"scheduler": "Karras", "ensd": 31337, "cfg_scale": 1.0}),
    ("Euler a", {"ensd": 31337, "width": 80, "height": 48}),
])
def test_fp32_matches_reference(tiny_bundle, tiny_checkpoint, sampler, kwargs):
    p = GenerationParams("a red circle on a blue background", sampler_name=sampler, steps=20, seed=11, **kwargs)
    report = verify_bundle(tiny_bundle, tiny_checkpoint, p)
    stages = report["stages"]
    assert stages["noise"]["max_abs"] == 0.0  # torch's CPU generator, bit for bit
    assert stages["text_encoder"]["psnr"] >= 90 and stages["unet"]["psnr"] >= 80
    assert stages["image"]["psnr"] >= 60, stages
    assert stages["latents"]["max_abs"] < 1e-3, stages


def test_long_prompt_matches_reference(tiny_bundle, tiny_checkpoint):
    prompt = ", ".join(["a small red circle on a blue background"] * 12)
    report = verify_bundle(tiny_bundle, tiny_checkpoint, GenerationParams(prompt, sampler_name="Euler", steps=8, seed=2))
    assert report["stages"]["image"]["psnr"] >= 60, report["stages"]


def test_cli_verify(tiny_bundle, tiny_checkpoint):
    r = run_sdrt("verify", tiny_bundle, "--reference", tiny_checkpoint, "--steps", 5, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["stages"]) == {"noise", "text_encoder", "unet", "vae_decoder", "latents", "image"}
    assert report["stages"]["image"]["psnr"] >= 60
    table = run_sdrt("verify", tiny_bundle, "--reference", tiny_checkpoint, "--steps", 2)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["stage", "max", "abs", "PSNR", "dB"]
