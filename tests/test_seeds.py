"""Variation seeds, seed resize, ENSD and the sampler infotext entries, against the webui's algorithms."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.txt2img import GenerationParams
from sdrt.runtime.sampling.noise import ImageRNG, slerp

torch = pytest.importorskip("torch")


def torch_slerp(val, low, high):
    """The webui's slerp (modules/rng.py) in torch, vectors along dim 1."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def webui_first(shape, seed, subseed, strength, resize_hw=None):
    """The webui's ImageRNG.first() for one image on the CPU source."""
    noise_shape = shape if resize_hw is None else (shape[0], resize_hw[0] // 8, resize_hw[1] // 8)
    sub = randn(subseed, noise_shape) if strength else None
    noise = randn(seed, noise_shape)
    if sub is not None:
        noise = torch_slerp(strength, noise, sub)
    if noise_shape != shape:
        x = randn(seed, shape)
        dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
        noise = x
    return noise.numpy()


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.5, 1.0])
def test_variation_seeds_match_webui(strength):
    shape = (4, 16, 12)
    rng = ImageRNG(shape, [7, 8], subseeds=[100, 101], subseed_strength=strength)
    got = rng.next()
    for i, (seed, sub) in enumerate(((7, 100), (8, 101))):
        np.testing.assert_allclose(got[i], webui_first(shape, seed, sub, strength), rtol=0, atol=2e-6)


def test_slerp_parallel_fallback_keeps_webui_weights():
    a = np.ones((4, 8, 8), np.float32)
    assert np.allclose(slerp(0.25, a, 2 * a), torch_slerp(0.25, torch.ones(4, 8, 8), 2 * torch.ones(4, 8, 8)).numpy())


@pytest.mark.parametrize("resize_hw", [(96, 64), (128, 160), (64, 128)])
def test_seed_resize_matches_webui(resize_hw):
    shape = (4, 12, 10)  # a 96x80 image
    rng = ImageRNG(shape, [5], subseeds=[9], subseed_strength=0.3, seed_resize_from_h=resize_hw[0],
                   seed_resize_from_w=resize_hw[1])
    np.testing.assert_allclose(rng.next()[0], webui_first(shape, 5, 9, 0.3, resize_hw), atol=2e-6)


def test_ensd_reseeds_after_the_first_draw():
    rng = ImageRNG((4, 8, 8), [3], ensd=31337)
    first, second = rng.next(), rng.next()
    assert np.array_equal(first[0], randn(3, (4, 8, 8)).numpy())
    assert np.array_equal(second[0], randn(3 + 31337, (4, 8, 8)).numpy())


def test_gpu_source_is_not_available_yet():
    with pytest.raises(SdrtError, match="not implemented"):
        ImageRNG((4, 8, 8), [1], source="gpu")


def _params(pipe, p, seed=5, subseed=None):
    plan = pipe.plan(p)
    return plan.image_fields(plan.infotext_fields(pipe.bundle.model_hash, pipe.bundle.name), seed, subseed)


def test_infotext_entries(tiny_pipeline):
    pipe = tiny_pipeline
    base = dict(prompt="x", steps=4, seed=5)
    assert _params(pipe, GenerationParams(sampler_name="Euler a", ensd=7, **base))["ENSD"] == 7
    assert _params(pipe, GenerationParams(sampler_name="Euler", ensd=7, **base))["ENSD"] is None
    assert _params(pipe, GenerationParams(sampler_name="DPM++ 2M SDE", ensd=7, **base))["ENSD"] is None  # tree noise
    assert _params(pipe, GenerationParams(sampler_name="Euler a", ensd=7, eta=0.0, **base))["ENSD"] is None
    euler_a = _params(pipe, GenerationParams(sampler_name="Euler a", eta=0.5, s_noise=0.9, **base))
    assert euler_a["Eta"] == 0.5 and euler_a["Sigma noise"] == 0.9 and euler_a["Schedule type"] == "Automatic"
    assert "Eta" not in _params(pipe, GenerationParams(sampler_name="Euler a", **base))
    assert _params(pipe, GenerationParams(sampler_name="DDIM", eta=0.3, **base))["Eta DDIM"] == 0.3
    assert _params(pipe, GenerationParams(sampler_name="DPM++ 2M", **base))["Schedule type"] == "Karras"
    var = _params(pipe, GenerationParams(sampler_name="Euler", subseed=40, subseed_strength=0.25, seed_resize_from_w=96,
                                         seed_resize_from_h=64, **base), subseed=41)
    assert (var["Variation seed"], var["Variation seed strength"], var["Seed resize from"]) == (41, 0.25, "96x64")


def test_variation_seed_batch_keeps_the_seed(tiny_pipeline):
    p = GenerationParams("x", steps=2, sampler_name="Euler", seed=10, subseed=50, subseed_strength=0.5, batch_size=2)
    images = tiny_pipeline.generate(p)
    assert [im.seed for im in images] == [10, 10]
    assert "Variation seed: 50," in images[0].infotext and "Variation seed: 51," in images[1].infotext


def test_non_finite_latents_name_the_step(tiny_pipeline, monkeypatch):
    pipe = tiny_pipeline
    calls = []
    original = pipe.denoiser.run_unet

    def poisoned(x, t, context):
        calls.append(t)
        out = original(x, t, context)
        return out * np.float32(np.nan) if len(calls) >= 3 else out

    monkeypatch.setattr(pipe.denoiser, "run_unet", poisoned)
    p = GenerationParams("x", steps=6, sampler_name="Euler a", seed=1, cfg_scale=1.0)
    cond, uncond = pipe.conditioning(p)
    with pytest.raises(SdrtError, match="at step 3") as e:
        pipe.sample(p, [1], cond, uncond)
    assert "\n" not in str(e.value)
