"""sdrt.runtime.sampling.noise against real torch (bit for bit) and the webui's noise algorithms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling.noise import ImageRNG, PhiloxNVGenerator, TorchCPUGenerator, _fma32, philox4x32_10

try:
    import torch
except ImportError:  # the runtime itself never needs torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed; it is the reference for these tests")

SEEDS = [0, 1, 2, 42, 123456789, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**64 - 1, -1, -12345]
SHAPES = [(4, 64, 64), (4, 96, 64), (4, 9, 7), (4, 16, 16), (16,), (17,), (31,), (1,), (5,), (15,), (0,), (2, 0, 3)]


def _bits(a) -> np.ndarray:
    a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
    return a.view(np.uint32)


def _assert_bitwise(mine: np.ndarray, ref) -> None:
    ref = ref.numpy()
    assert mine.dtype == np.float32
    assert mine.shape == ref.shape
    bad = int((_bits(mine) != _bits(ref)).sum())
    assert bad == 0, f"{bad} of {ref.size} values differ from torch"


def _env_with_path(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def test_runtime_module_does_not_import_torch():
    code = "import sys; sys.modules['torch'] = None; import sdrt.runtime.sampling.noise as r; r.ImageRNG((4, 8, 8), [1]).next()"
    proc = subprocess.run([sys.executable, "-c", code], env=_env_with_path(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- TorchCPUGenerator vs torch.randn ---------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_matches_torch(seed):
    for shape in SHAPES:
        ref = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        _assert_bitwise(TorchCPUGenerator(seed).randn(shape), ref)


@needs_torch
@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_consecutive_draws_continue_the_stream(seed):
    # Mixed sizes: ragged tails (extra 16 draws), the small cached double path, rand.
    g = torch.Generator().manual_seed(seed)
    mine = TorchCPUGenerator(seed)
    for shape in [(4, 64, 64), (3,), (4, 9, 7), (1,), (1,), (5,), (17,), (4, 16, 16), (2,), (33,), (7,), (1,)]:
        _assert_bitwise(mine.randn(shape), torch.randn(shape, generator=g))
    _assert_bitwise(mine.rand((10, 3)), torch.rand((10, 3), generator=g))
    _assert_bitwise(mine.randn((4, 64, 64)), torch.randn((4, 64, 64), generator=g))


@needs_torch
def test_large_draws_match_torch():
    for seed in (3, 99991):
        ref = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
        _assert_bitwise(TorchCPUGenerator(seed).randn(1_000_003), ref)


@needs_torch
@pytest.mark.parametrize("seed", [5933, 1233])
def test_zero_uniform_edge_cases(seed):
    # Seed 5933 draws a uniform of exactly 0 as some u1 (radius = sqrt(-0.0) = -0.0); seed 1233
    # draws one as some u2 (theta = 0). torch outputs +0.0 there.
    ref = torch.randn((4, 64, 64), generator=torch.Generator().manual_seed(seed))
    _assert_bitwise(TorchCPUGenerator(seed).randn((4, 64, 64)), ref)


@needs_torch
def test_manual_seed_resets_state_and_cached_normal():
    mine = TorchCPUGenerator(11)
    mine.randn((3,))  # leaves a cached second Box-Muller value behind
    mine.manual_seed(12)
    g = torch.Generator().manual_seed(11)
    torch.randn((3,), generator=g)
    g.manual_seed(12)
    _assert_bitwise(mine.randn((1,)), torch.randn((1,), generator=g))
    assert mine.initial_seed() == g.initial_seed()
    assert TorchCPUGenerator(-5).initial_seed() == torch.Generator().manual_seed(-5).initial_seed()


@needs_torch
def test_shape_forms():
    ref = torch.randn(20, generator=torch.Generator().manual_seed(5))
    _assert_bitwise(TorchCPUGenerator(5).randn(20), ref)
    _assert_bitwise(TorchCPUGenerator(5).randn(np.array([4, 5])).reshape(20), ref)


@needs_torch
def test_scalar_kernel_is_close_to_torch_default_capability():
    # torch's scalar kernel (ATEN_CPU_CAPABILITY=default, also ARM) uses libm logf/cosf/sinf;
    # ours is correctly rounded, so it is close but not bit-identical (see rng.py).
    code = (
        "import json, torch; g = torch.Generator().manual_seed(1234);"
        "x = torch.randn((4, 64, 64), generator=g).flatten();"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), x.view(torch.int32).tolist()]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env_with_path(ATEN_CPU_CAPABILITY="default"),
                          capture_output=True, text=True, check=True)
    capability, ints = json.loads(proc.stdout.strip().splitlines()[-1])
    assert capability == "DEFAULT"
    ref = np.array(ints, np.int32).view(np.float32)
    mine = TorchCPUGenerator(1234, kernel="scalar").randn((4, 64, 64)).reshape(-1)
    differ = float((mine.view(np.uint32) != ref.view(np.uint32)).mean())
    assert differ < 0.05
    assert np.abs(mine - ref).max() < 1e-5
    # The two torch kernels really differ, so the choice matters.
    avx2 = TorchCPUGenerator(1234).randn((4, 64, 64)).reshape(-1)
    assert (avx2.view(np.uint32) != ref.view(np.uint32)).mean() > 0.2


def test_generator_errors():
    with pytest.raises(SdrtError):
        TorchCPUGenerator(1, kernel="sse")
    with pytest.raises(SdrtError):
        TorchCPUGenerator(2**64)
    with pytest.raises(SdrtError):
        TorchCPUGenerator("7")
    with pytest.raises(SdrtError):
        TorchCPUGenerator(1).randn((-1, 4))


# ---- float32 FMA emulation ---------------------------------------------------------------------

def _round_f32(q: Fraction) -> np.float32:
    """Correctly rounded (ties to even) float32 of an exact rational."""
    f = np.float32(float(q))
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.asarray(c).view(np.uint32)) & 1))


def test_fma32_is_single_rounding():
    f = np.float32
    # a*b + c lands just off a float32 midpoint: float64 then float32 rounding gets these wrong.
    a = np.array([1 + 2**-15, -(1 + 2**-15)], f)
    b = np.array([1 - 2**-15, 1 - 2**-15], f)
    c = np.array([2**24 + 2, 2**24 + 2], f)
    assert _fma32(a, b, c).tolist() == [2**24 + 2, 2**24 + 2]
    rng = np.random.default_rng(0)
    n = 3000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-8, 8, n)).astype(f)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-8, 8, n)).astype(f)
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 4, n)).astype(f)
    got = _fma32(a, b, c)
    want = [_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
    assert np.array_equal(got.view(np.uint32), np.array(want, f).view(np.uint32))


# ---- webui NV source ---------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10.
    kats = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, out in kats:
        got = philox4x32_10([np.array([w], np.uint32) for w in ctr], key)
        assert tuple(int(w[0]) for w in got) == out


def test_nv_matches_webui_algorithm():
    # Bits produced by the webui's modules/rng_philox.py Generator (numpy 2.4).
    g = PhiloxNVGenerator(0)
    first = g.randn((3, 4))
    assert first.dtype == np.float32 and first.shape == (3, 4)
    assert [hex(v) for v in _bits(first).ravel()] == [
        "0xbf6cb6ad", "0xbed9c6af", "0xc02934c5", "0x3e14ab15", "0xbdf788dc", "0xbf1468e7",
        "0xbf1f732f", "0xbea8225c", "0xbf898a98", "0xbeb9ee06", "0xbfd5e4fb", "0x4010fe09"]
    second = g.randn((3, 4))  # the counter's first word is the call number
    assert [hex(v) for v in _bits(second).ravel()[:4]] == ["0x3e392a6c", "0xbf0d6117", "0x3f6c7f09", "0xbf3c2704"]
    # Seeds above 32 bits fill the key's high word.
    big = PhiloxNVGenerator(2**32 + 7).randn((6,))
    assert [hex(v) for v in _bits(big)] == ["0xbe90c2ac", "0xbf81a392", "0x3c1c1ecb", "0x3ee4e84f", "0x3fca4931", "0x3f742590"]
    # Close to torch CUDA randn(3, 4) for seed 0, as printed in the webui's docstring.
    cuda = [-0.92466259, -0.42534415, -2.6438457, 0.14518388, -0.12086647, -0.57972564,
            -0.62285122, -0.32838709, -1.07454231, -0.36314407, -1.67105067, 2.26550497]
    assert np.abs(first.ravel() - np.array(cuda)).max() < 1e-6


def test_nv_statistics():
    x = PhiloxNVGenerator(5).randn((1 << 18,))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


# ---- ImageRNG ----------------------------------------------------------------------------------

def _webui_cpu_image_rng(shape, seeds, ensd, draws):
    """The webui's ImageRNG flow with the CPU source, on real torch generators."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = [torch.stack([torch.randn(shape, generator=g) for g in gens])]
    if ensd:
        gens = [torch.Generator().manual_seed(s + ensd) for s in seeds]
    for _ in range(draws - 1):
        out.append(torch.stack([torch.randn(shape, generator=g) for g in gens]))
    return out


@needs_torch
@pytest.mark.parametrize("ensd", [0, 31337])
@pytest.mark.parametrize("shape", [(4, 64, 64), (4, 9, 7), (4, 2, 1)])
def test_image_rng_cpu_matches_webui(shape, ensd):
    seeds = [1, 2**32 - 1, 123]
    want = _webui_cpu_image_rng(shape, seeds, ensd, draws=4)
    rng = ImageRNG(shape, seeds, ensd=ensd)
    got = [rng.next() for _ in range(4)]  # the first next() is first()
    for g, w in zip(got, want):
        assert g.shape == (len(seeds), *shape)
        _assert_bitwise(g, w)


@needs_torch
def test_image_rng_first_then_next():
    shape, seeds = (4, 16, 16), [10, 11]
    want = _webui_cpu_image_rng(shape, seeds, 7, draws=3)
    rng = ImageRNG(shape, seeds, ensd=7)
    _assert_bitwise(rng.first(), want[0])
    _assert_bitwise(rng.next(), want[1])  # continues (the webui would redraw first())
    _assert_bitwise(rng.next(), want[2])


def test_image_rng_nv_source():
    shape, seeds = (4, 8, 8), [3, 4]
    rng = ImageRNG(shape, seeds, source="NV", ensd=100)
    first = rng.next()
    assert np.array_equal(first, np.stack([PhiloxNVGenerator(s).randn(shape) for s in seeds]))
    assert np.array_equal(rng.next(), np.stack([PhiloxNVGenerator(s + 100).randn(shape) for s in seeds]))


def test_image_rng_errors():
    with pytest.raises(SdrtError, match="not implemented"):
        ImageRNG((4, 8, 8), [1], source="gpu")
    with pytest.raises(SdrtError):
        ImageRNG((4, 8, 8), [1], source="tpu")
    with pytest.raises(SdrtError):
        ImageRNG((4, 8, 8), [])
    with pytest.raises(SdrtError, match="strength"):
        ImageRNG((4, 8, 8), [1], subseeds=[2], subseed_strength=1.5)
