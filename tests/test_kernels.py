"""The compiled kernels library against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime import kernels


def group_norm_ref(x, gamma, beta, groups, eps, silu):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1).astype(np.float64)
    y = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    y = y.reshape(x.shape) * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)
    return y / (1 + np.exp(-y)) if silu else y


def test_library_is_built():
    assert kernels.available(), f"missing {kernels.library_path()}"
    assert kernels.load().sdrt_kernels_abi_version() == 1


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_matches_numpy(silu, channels_last):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 64, 9, 7)) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    ref = group_norm_ref(x, gamma, beta, 32, 1e-5, silu)
    inp = np.moveaxis(x, 1, -1) if channels_last else x
    out = kernels.group_norm(inp, gamma, beta, 32, 1e-5, channels_last=channels_last, silu=silu)
    if channels_last:
        out = np.moveaxis(out, -1, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_group_norm_rejects_bad_groups():
    x = np.zeros((1, 6, 2, 2), np.float32)
    with pytest.raises(Exception, match="6 channels cannot form 4 groups"):
        kernels.group_norm(x, np.ones(6), np.zeros(6), 4)


def test_group_norm_silu_over_a_wide_range():
    """SiLU's exp on large inputs of both signs (gamma and beta stretch the normalised values to
    about +-200): no overflow, no NaN, float accuracy against float64."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 33, 5)).astype(np.float32)
    gamma = np.full(8, 60.0, np.float32)
    beta = np.array([-40, -20, -5, 0, 0, 5, 20, 40], np.float32)
    ref = group_norm_ref(x, gamma, beta, 4, 1e-5, True)
    out = kernels.group_norm(x, gamma, beta, 4, 1e-5, silu=True)
    assert np.isfinite(out).all() and np.abs(ref).max() > 150
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-4)
