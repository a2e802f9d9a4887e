"""The compiled kernels library against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.backends import kernels


def group_norm_ref(x, gamma, beta, groups, eps, silu):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1).astype(np.float64)
    y = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    y = y.reshape(x.shape) * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)
    return y / (1 + np.exp(-y)) if silu else y


def test_library_is_built():
    assert kernels.available(), f"missing {kernels.library_path()}"
    assert kernels.load().sdrt_kernels_abi_version() == 4


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


# -- Attention ------------------------------------------------------------------------------------

def attention_ref(q, k, v, heads, scale=None):
    b, s, hidden = q.shape
    d = hidden // heads
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d).transpose(0, 2, 1, 3).astype(np.float64)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) * (scale or d ** -0.5)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, hidden)


def psnr(out, ref):
    return 10 * np.log10(np.abs(ref).max() ** 2 / np.mean((out - ref) ** 2))


# (batch, queries, keys, heads, head size): the UNet's head sizes (40, 80, 160), keys that are no
# multiple of the 16-key vectors or the 64-key blocks, query counts no multiple of 4, a lone key
ATTENTION_SHAPES = [(2, 64, 77, 8, 40), (1, 37, 50, 3, 7), (2, 130, 129, 2, 80), (1, 9, 200, 1, 160), (1, 5, 1, 1, 3)]


def _has_avx2() -> bool:
    return kernels.attention(*(np.zeros((1, 1, 2), np.float32),) * 3, 1, math="float32-avx2")[1] == "float32-avx2"


# What each math runs on this CPU: float32 is the AVX-512 form, else the AVX2 one, else portable
FLOAT32_FORMS = {"float32": ("float32", "float32-avx2", "float32-portable"),
                 "float32-avx2": ("float32-avx2", "float32-portable"), "float32-portable": ("float32-portable",)}


@pytest.mark.parametrize("math", list(FLOAT32_FORMS))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_float32_matches_numpy(shape, math):
    """Every float32 form (the blocked AVX-512 one where the CPU has it, the blocked AVX2 one, and
    the portable one) agrees with float64 up to float32 rounding, with the default and an explicit
    scale."""
    b, s, l, h, d = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, s, h * d), dtype=np.float32) * 2
    k, v = (rng.standard_normal((b, l, h * d), dtype=np.float32) for _ in range(2))
    out, form = kernels.attention(q, k, v, h, math=math)
    assert form in FLOAT32_FORMS[math]
    if math == "float32-avx2":
        assert (form == "float32-avx2") == _has_avx2()
    np.testing.assert_allclose(out, attention_ref(q, k, v, h), rtol=1e-5, atol=1e-5)
    out, _ = kernels.attention(q, k, v, h, scale=0.3, math=math)
    np.testing.assert_allclose(out, attention_ref(q, k, v, h, 0.3), rtol=1e-5, atol=1e-5)


needs_bf16 = pytest.mark.skipif(not kernels.attention_bf16_supported(), reason="this CPU has no AVX-512 BF16")


@needs_bf16
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_bf16_is_close_and_is_bf16(shape):
    """bf16 operands (8 significant bits) with float32 sums: 55 dB or more against float64, and
    measurably not the float32 path's result."""
    b, s, l, h, d = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, s, h * d), dtype=np.float32) * 2
    k, v = (rng.standard_normal((b, l, h * d), dtype=np.float32) for _ in range(2))
    ref = attention_ref(q, k, v, h)
    out, path = kernels.attention(q, k, v, h, math="auto")
    assert path == "bfloat16"
    assert psnr(out, ref) > 55 and np.abs(out - ref).max() < 0.03
    assert np.abs(out - ref).max() > 1e-5 or l == 1  # one key: the output is v itself, rounded or not


@needs_bf16
def test_attention_bf16_softmax_over_a_wide_range():
    """Scores spread over hundreds (sharp attention): the running maximum keeps exp2 in range, no
    NaN or Inf, the winner's value comes through."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 20, 64), dtype=np.float32) * 30
    k = rng.standard_normal((1, 300, 64), dtype=np.float32) * 30
    v = rng.standard_normal((1, 300, 64), dtype=np.float32)
    ref = attention_ref(q, k, v, 1)
    out, _ = kernels.attention(q, k, v, 1)
    assert np.isfinite(out).all() and psnr(out, ref) > 35


@pytest.mark.skipif(not _has_avx2(), reason="this CPU has no AVX2/FMA")
def test_attention_avx2_sharp_softmax_and_many_rows():
    """The AVX2 form: scores spread over hundreds (exp2's clamp and the running maximum keep every
    weight finite, the winners come through), more query rows than one task (96) over keys in
    several 64-key blocks, and a head size that fills no 16-dimension chunk."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 200, 2 * 44), dtype=np.float32) * 6
    k = rng.standard_normal((1, 300, 2 * 44), dtype=np.float32) * 6
    v = rng.standard_normal((1, 300, 2 * 44), dtype=np.float32)
    ref = attention_ref(q, k, v, 2)
    assert np.abs(ref).max() > 0.5  # sharp: rows are nearly one key's value
    out, form = kernels.attention(q, k, v, 2, math="float32-avx2")
    assert form == "float32-avx2" and np.isfinite(out).all()
    # scores of +-100 carry float32's rounding (1e-5 of them) into the weights: the portable form's
    # error is of the same size
    portable, _ = kernels.attention(q, k, v, 2, math="float32-portable")
    assert np.abs(out - ref).max() < max(5e-5, 2 * np.abs(portable - ref).max())


def test_attention_rejects_bad_shapes():
    q = np.zeros((1, 4, 10), np.float32)
    with pytest.raises(Exception, match="hidden size 10 is not a multiple of 3 heads"):
        kernels.attention(q, q, q, 3)
    with pytest.raises(Exception, match="k and v"):
        kernels.attention(q, np.zeros((1, 4, 12), np.float32), np.zeros((1, 4, 12), np.float32), 2)
    with pytest.raises(Exception, match="unknown math 'fp8'"):
        kernels.attention(q, q, q, 2, math="fp8")


def _attention_session(op: str, domain: str, heads: int, hidden: int, **attrs):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", n + "_len", hidden]) for n in "qkv"]
    node = helper.make_node(op, ["q", "k", "v"], ["y"], domain=domain, num_heads=heads, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(kernels.library_path()))
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_attention_op_in_onnx_runtime():
    """The op as sessions run it (the session's threads): math=1 is ONNX Runtime's
    MultiHeadAttention up to float rounding, the default (bf16 where available) close to it, an
    explicit scale honoured; shapes that do not split into heads are one clear error."""
    rng = np.random.default_rng(3)
    feeds = {"q": rng.standard_normal((2, 70, 48), dtype=np.float32),
             "k": rng.standard_normal((2, 90, 48), dtype=np.float32),
             "v": rng.standard_normal((2, 90, 48), dtype=np.float32)}
    ref = _attention_session("MultiHeadAttention", "com.microsoft", 4, 48).run(None, feeds)[0]
    f32 = _attention_session("Attention", "ai.sdrt", 4, 48, math=1).run(None, feeds)[0]
    np.testing.assert_allclose(f32, ref, rtol=1e-5, atol=1e-5)
    auto = _attention_session("Attention", "ai.sdrt", 4, 48).run(None, feeds)[0]
    assert psnr(auto, ref) > 55
    scaled = _attention_session("Attention", "ai.sdrt", 4, 48, math=1, scale=0.2).run(None, feeds)[0]
    np.testing.assert_allclose(scaled, attention_ref(feeds["q"], feeds["k"], feeds["v"], 4, 0.2), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="hidden size 48 is not a multiple of 5 heads"):
        _attention_session("Attention", "ai.sdrt", 5, 48).run(None, feeds)


# -- Conv3x3 (Winograd F(4x4, 3x3)) ---------------------------------------------------------------

def conv3x3_ref(x, w, b):
    import torch

    return torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      None if b is None else torch.from_numpy(b).double(), padding=1).numpy()


@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),      # one pixel: every tap but the centre reads padding
    (1, 3, 5, 7, 2),      # sizes that fill no 4x4 tile, channels that fill no block of 16
    (2, 16, 9, 13, 20),   # two images, a partial panel of tiles
    (8, 1024, 16, 16, 17),  # 128 tiles of 1024 channels: more than one chunk of tiles
])
@pytest.mark.parametrize("portable", [False, True])
def test_conv3x3_matches_the_direct_convolution(shape, portable):
    """Winograd's F(4x4, 3x3) equals the direct convolution (float64) up to float32 rounding, with
    and without a bias, on either product kernel."""
    n, c, h, w, k = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c, 3, 3)) / (3 * c**0.5)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    for bias in (b, None):
        ref = conv3x3_ref(x, wt, bias)
        out, form = kernels.conv3x3(x, wt, bias, portable=portable)
        assert form == ("portable" if portable else "avx2" if kernels.conv3x3_avx2_supported() else "portable")
        scale = np.abs(ref).max()
        assert np.abs(out - ref).max() <= 2e-5 * scale, (np.abs(out - ref).max(), scale)
    other = kernels.conv3x3(x, -wt, b, portable=portable)[0]  # the filters are read, not remembered
    assert np.abs(other - conv3x3_ref(x, -wt, b)).max() <= 2e-5 * np.abs(ref).max() + 2e-5 * np.abs(b).max()


def test_conv3x3_rejects_bad_shapes():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(Exception, match=r"conv3x3: x must be \[N, C, H, W\] and w \[K, C, 3, 3\]"):
        kernels.conv3x3(x, np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(Exception, match=r"bias must be \[2\]"):
        kernels.conv3x3(x, np.zeros((2, 4, 3, 3), np.float32), np.zeros(3, np.float32))


def _conv3x3_session(op: str, w: np.ndarray, b: np.ndarray, threads: int = 2):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = (helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]) if op == "Conv"
            else helper.make_node("Conv3x3", ["x", "w", "b"], ["y"], domain="ai.sdrt"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.sdrt", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_conv3x3_op_in_onnx_runtime():
    """The op as sessions run it (its phases on the session's threads): ONNX Runtime's Conv up to
    float32 rounding, for two sizes in one session (its scratch reused and grown), and bad shapes
    one clear error."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((40, 24, 3, 3)) / 15).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    ours, ref = _conv3x3_session("Conv3x3", w, b), _conv3x3_session("Conv", w, b)
    for shape in ((2, 24, 30, 22), (1, 24, 64, 64), (2, 24, 7, 5)):
        x = rng.standard_normal(shape).astype(np.float32)
        y, r = ours.run(None, {"x": x})[0], ref.run(None, {"x": x})[0]
        assert y.shape == r.shape == (shape[0], 40, *shape[2:])
        assert np.abs(y - r).max() <= 2e-5 * np.abs(r).max()
    with pytest.raises(Exception, match=r"ai.sdrt.Conv3x3: X must be \[N, C, H, W\], W \[K, C, 3, 3\] and B \[K\]"):
        ours.run(None, {"x": np.zeros((1, 23, 8, 8), np.float32)})
