"""CFGDenoiser's guidance against the CFG formula written out: one model call per conditioning.

The combination is the webui's ``combine_denoised``: out = uncond + sum_i (cond_i - uncond) * weight_i * scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.sampling.denoiser import CFGDenoiser
from sdrt.runtime.text.encoder import CondSchedule, MultiCond

SHAPE = (2, 4, 6, 6)
ATOL = 1e-7  # the guidance factor weight * scale is a float32 scalar, as in the webui's float32 CFG


def model(x, sigma, context):
    """A nonlinear model of x, sigma and each row's conditioning."""
    c = context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
    return np.tanh(x * (1 + c)) / (1 + sigma) + 0.3 * c * np.cos(x)


def context(value, tokens=5, width=3):
    return np.full((tokens, width), value, np.float64) + np.linspace(0, 0.1, tokens * width).reshape(tokens, width)


def explicit_cfg(x, sigma, parts, uncond, scale):
    out_uncond = model(x, sigma, uncond[None])
    return out_uncond + sum((model(x, sigma, c[None]) - out_uncond) * (w * scale) for c, w in parts)


# AND parts (cond value, weight): at cfg_scale 1 only a single part of weight 1 may skip the uncond
WEIGHTED = [[(0.4, 1.0), (-0.6, 0.7)], [(0.4, 0.5), (-0.6, 0.5)], [(0.4, 1.5), (-0.6, -0.5)], [(0.4, 0.5)],
            [(0.4, -1.0)], [(0.4, 1.0), (0.4, 1.0)], [(0.4, 0.8), (-0.6, 1.2), (0.9, 0.3)]]


@pytest.mark.parametrize("parts", WEIGHTED, ids=lambda p: "+".join(f"{w:g}" for _, w in p))
def test_cfg_scale_one_with_weighted_and_parts_is_the_full_formula(parts):
    parts = [(context(v), w) for v, w in parts]
    uncond = context(-0.2)
    x = np.random.default_rng(1).standard_normal(SHAPE)
    cond = MultiCond(tuple((CondSchedule((50,), (c,)), w) for c, w in parts))
    out = CFGDenoiser(model, cond, CondSchedule((50,), (uncond,)), 1.0)(x, 2.0)
    want = explicit_cfg(x, 2.0, parts, uncond, 1.0)
    np.testing.assert_allclose(out, want, atol=ATOL)
    # the uncond matters here: the conditional prediction alone is another image
    assert np.max(np.abs(out - model(x, 2.0, parts[0][0][None]))) > 1e-3


def test_cfg_scale_one_single_plain_part_is_the_conditional_prediction():
    x = np.random.default_rng(2).standard_normal(SHAPE)
    calls = []

    def counting(x, sigma, ctx):
        calls.append(len(ctx))
        return model(x, sigma, ctx)

    cond = MultiCond(((CondSchedule((50,), (context(0.4),)), 1.0),))
    out = CFGDenoiser(counting, cond, CondSchedule((50,), (context(-0.2),)), 1.0)(x, 2.0)
    np.testing.assert_allclose(out, model(x, 2.0, context(0.4)[None]), atol=ATOL)
    assert calls == [2]  # the two images' conditional rows only


@pytest.mark.parametrize("scale", [1.0, 0.56])
def test_keep_uncond_runs_and_keeps_the_unconditional_rows(scale):
    """What DDIM CFG++ reads: the shortcut is off and ``last_uncond`` is the uncond prediction."""
    x = np.random.default_rng(3).standard_normal(SHAPE)
    cond = MultiCond(((CondSchedule((50,), (context(0.4),)), 1.0),))
    den = CFGDenoiser(model, cond, CondSchedule((50,), (context(-0.2),)), scale)
    assert den.last_uncond is None
    den.keep_uncond = True
    out = den(x, 2.0)
    np.testing.assert_allclose(den.last_uncond, model(x, 2.0, context(-0.2)[None]), atol=ATOL)
    np.testing.assert_allclose(out, explicit_cfg(x, 2.0, [(context(0.4), 1.0)], context(-0.2), scale),
                               atol=ATOL)
