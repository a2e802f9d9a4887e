"""Graph passes (sdrt.export.passes): each fusion on a subgraph built with onnx.helper, its count
and its numbers against the unfused graph in ONNX Runtime; then on real exported graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.export import passes
from sdrt.runtime.backends import kernels

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _out(name: str, rank: int):
    return helper.make_tensor_value_info(name, F, [f"d{i}" for i in range(rank)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(kernels.library_path()))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare our graph, not ORT's
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _fused(model: onnx.ModelProto, only: list[str]) -> tuple[onnx.ModelProto, dict]:
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    report = passes.optimize(fused, passes=only)
    onnx.checker.check_model(fused)  # a valid graph (custom domains are not schema-checked)
    return fused, report.counts()


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array)))


# -- GroupNorm ------------------------------------------------------------------------------------

def _group_norm_graph(channels=64, groups=32, silu=True, scale_one=True, extra_reader=False):
    rng = np.random.default_rng(1)
    gamma = rng.standard_normal((channels, 1, 1)).astype(np.float32)
    beta = rng.standard_normal((channels, 1, 1)).astype(np.float32)
    nodes = [
        _const("gshape", np.array([0, groups, -1], np.int64)),
        helper.make_node("Reshape", ["x", "gshape"], ["r1"]),
        helper.make_node("InstanceNormalization", ["r1", "ones", "zeros"], ["inorm"], epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Reshape", ["inorm", "xshape"], ["r2"]),
        helper.make_node("Mul", ["r2", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["normed"]),
    ]
    out = "normed"
    if silu:
        nodes += [helper.make_node("Sigmoid", ["normed"], ["sig"]), helper.make_node("Mul", ["normed", "sig"], ["act"])]
        out = "act"
    outputs = [_out(out, 4)]
    if extra_reader:  # the pre-activation value is also a graph output: SiLU must not be folded in
        outputs.append(_out("normed", 4))
    inits = [numpy_helper.from_array(np.full(groups, 1.0 if scale_one else 2.0, np.float32), "ones"),
             numpy_helper.from_array(np.zeros(groups, np.float32), "zeros"),
             numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["n", channels, "h", "w"])], outputs, inits)


@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_fusion(silu):
    model = _group_norm_graph(silu=silu)
    fused, counts = _fused(model, ["fold_constants", "group_norm", "dead_nodes"])
    assert counts["group_norm"] == 1
    assert _ops(fused) == ["GroupNorm"]
    (node,) = fused.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "ai.sdrt" and attrs["groups"] == 32 and attrs["activation"] == int(silu)
    x = (np.random.default_rng(0).standard_normal((2, 64, 5, 7)) * 4 + 2).astype(np.float32)
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_group_norm_keeps_silu_apart_when_its_input_is_read_elsewhere():
    model = _group_norm_graph(extra_reader=True)
    fused, counts = _fused(model, ["fold_constants", "group_norm", "dead_nodes"])
    assert counts["group_norm"] == 1 and sorted(_ops(fused)) == ["GroupNorm", "Mul", "Sigmoid"]
    x = np.random.default_rng(0).standard_normal((1, 64, 3, 3)).astype(np.float32)
    for a, b in zip(_run(fused, {"x": x}), _run(model, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_group_norm_left_alone_when_instance_norm_has_an_affine():
    fused, counts = _fused(_group_norm_graph(scale_one=False), ["fold_constants", "group_norm"])
    assert counts["group_norm"] == 0 and "InstanceNormalization" in _ops(fused)


# -- attention ------------------------------------------------------------------------------------

def _attention_graph(heads=4, dim=32, kv_dim=24, cross=True, dynamic_scale=True):
    """torch's scaled_dot_product_attention export, projections included."""
    d = dim // heads
    rng = np.random.default_rng(2)
    wq = rng.standard_normal((dim, dim)).astype(np.float32) / math.sqrt(dim)
    wk = rng.standard_normal((kv_dim if cross else dim, dim)).astype(np.float32) / math.sqrt(dim)
    wv = rng.standard_normal((kv_dim if cross else dim, dim)).astype(np.float32) / math.sqrt(dim)
    ctx = "ctx" if cross else "x"
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", [ctx, "wk"], ["k"]),
        helper.make_node("MatMul", [ctx, "wv"], ["v"]),
        # [B, -1, H, d] from the batch dim at run time, as torch exports it
        helper.make_node("Shape", ["x"], ["xs"]),
        _const("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["xs", "zero"], ["b"], axis=0),
        _const("axes", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        _const("minus1", np.array([-1], np.int64)),
        _const("heads", np.array([heads], np.int64)),
        _const("hd", np.array([d], np.int64)),
        helper.make_node("Concat", ["b1", "minus1", "heads", "hd"], ["split"], axis=0),
        _const("merge", np.array([0, -1, dim], np.int64)),
    ]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=perm)]
    if dynamic_scale:  # sqrt(1 / sqrt(d)) from the head tensor's shape, as torch exports it
        nodes += [helper.make_node("Shape", ["qt"], ["qts"]), _const("last", np.array([-1], np.int64)),
                  _const("end", np.array([2**62], np.int64)),
                  helper.make_node("Slice", ["qts", "last", "end"], ["dsz"]),
                  helper.make_node("Cast", ["dsz"], ["dszf"], to=F), helper.make_node("Sqrt", ["dszf"], ["sq"]),
                  _const("one", np.array([1.0], np.float32)), helper.make_node("Div", ["one", "sq"], ["inv"]),
                  helper.make_node("Cast", ["inv"], ["invf"], to=F), helper.make_node("Sqrt", ["invf"], ["s"])]
    else:
        nodes.append(_const("s", np.array(d ** -0.25, np.float32)))
    nodes += [
        helper.make_node("Mul", ["qt", "s"], ["qs"]),
        helper.make_node("Mul", ["kt", "s"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o4t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o4t", "merge"], ["attn"]),
        helper.make_node("MatMul", ["attn", "wo"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["b", "s", dim])]
    if cross:
        inputs.append(helper.make_tensor_value_info("ctx", F, ["b", "l", kv_dim]))
    inits = [numpy_helper.from_array(w, n) for w, n in ((wq, "wq"), (wk, "wk"), (wv, "wv"))]
    inits.append(numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "wo"))
    return _model(nodes, inputs, [_out("y", 3)], inits)


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("dynamic_scale", [True, False])
def test_attention_fusion(cross, dynamic_scale):
    model = _attention_graph(cross=cross, dynamic_scale=dynamic_scale)
    fused, counts = _fused(model, ["fold_constants", "attention", "dead_nodes"])
    assert counts["attention"] == 1
    assert sorted(_ops(fused)) == ["MatMul"] * 4 + ["MultiHeadAttention"]
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == 4 and mha.domain == "com.microsoft"
    if not dynamic_scale:
        assert attrs["scale"] == pytest.approx(8 ** -0.5, rel=1e-6)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 10, 32)).astype(np.float32)}
    if cross:
        feeds["ctx"] = rng.standard_normal((2, 7, 24)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def _masked(model, mask: np.ndarray):
    """``model`` with a mask added to the scores before the Softmax (the text encoder's causal form)."""
    nodes = list(model.graph.node)
    i = next(i for i, n in enumerate(nodes) if n.op_type == "Softmax")
    nodes[i] = helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)
    nodes.insert(i, helper.make_node("Add", ["scores", "mask"], ["masked"]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.append(numpy_helper.from_array(mask, "mask"))
    return model


def test_attention_with_a_causal_mask_takes_it_as_attention_bias():
    """Softmax(q k^T + mask): a 4-D mask ([1, 1, S, S], CLIP's causal one) goes into
    MultiHeadAttention's attention_bias; a mask of another rank leaves the subgraph alone."""
    causal = np.triu(np.full((10, 10), np.finfo(np.float32).min, np.float32), 1)
    model = _masked(_attention_graph(cross=False, dynamic_scale=False), causal[None, None])
    fused, counts = _fused(model, ["fold_constants", "attention", "dead_nodes"])
    assert counts["attention"] == 1 and "Softmax" not in _ops(fused)
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert list(mha.input) == ["x_q", "x_k", "x_v", "", "", "mask"] or list(mha.input)[3:] == ["", "", "mask"]
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 10, 32)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], rtol=1e-4, atol=1e-5)

    flat = _masked(_attention_graph(cross=False, dynamic_scale=False), causal)
    fused, counts = _fused(flat, ["fold_constants", "attention"])
    assert counts["attention"] == 0 and "Softmax" in _ops(fused)


# -- GELU, constants, dead nodes ------------------------------------------------------------------

def _gelu_graph(divisor=math.sqrt(2), one=1.0, half=0.5):
    """x * 0.5 * (1 + erf(x / sqrt 2)) in torch's exported order, its three constants replaceable."""
    nodes = [_const("sqrt2", np.array(divisor, np.float32)), _const("one", np.array(one, np.float32)),
             _const("half", np.array(half, np.float32)),
             helper.make_node("Div", ["x", "sqrt2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["n", 8])], [_out("y", 2)])


GELU_X = np.linspace(-6, 6, 48, dtype=np.float32).reshape(6, 8)


def test_gelu_fusion():
    model = _gelu_graph()
    fused, counts = _fused(model, ["fold_constants", "gelu", "dead_nodes"])
    assert counts["gelu"] == 1 and _ops(fused) == ["Gelu"]
    np.testing.assert_allclose(_run(fused, {"x": GELU_X})[0], _run(model, {"x": GELU_X})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("constants", [{"divisor": 2.0}, {"divisor": 1.42}, {"one": 2.0}, {"half": 0.25}],
                         ids=["divisor-2", "divisor-1.42", "add-2", "mul-0.25"])
def test_gelu_left_alone_with_other_constants(constants):
    """The Erf-GELU shape with another divisor, offset or factor is not GELU: nothing fused, same numbers."""
    model = _gelu_graph(**constants)
    fused, counts = _fused(model, ["fold_constants", "gelu", "dead_nodes"])
    assert counts["gelu"] == 0 and "Gelu" not in _ops(fused) and "Erf" in _ops(fused)
    want = _run(model, {"x": GELU_X})[0]
    np.testing.assert_array_equal(_run(fused, {"x": GELU_X})[0], want)
    # and those numbers are not GELU's
    assert np.max(np.abs(want - _run(_gelu_graph(), {"x": GELU_X})[0])) > 1e-3


def _conv_graph(**attrs):
    """x [n, 8, h, w] -> Conv (3x3 weights [12, 8, 3, 3], bias) with ``attrs``."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 8, 3, 3)).astype(np.float32) / 8
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b")]
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="the_conv", **attrs)
    return _model([conv], [helper.make_tensor_value_info("x", F, ["n", 8, "h", "w"])], [_out("y", 4)], inits)


def test_winograd_conv_takes_3x3_padding_1_stride_1():
    """A 3x3 convolution of padding 1 and stride 1 becomes ai.sdrt.Conv3x3, keeping its name and
    its weight and bias inputs, and computes the same to float32 rounding; other strides, paddings,
    dilations and groups are left alone."""
    model = _conv_graph(pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3])
    fused, counts = _fused(model, ["conv3x3"])
    assert counts == {"conv3x3": 1} and _ops(fused) == ["Conv3x3"]
    node = fused.graph.node[0]
    assert node.domain == "ai.sdrt" and node.name == "the_conv" and list(node.input) == ["x", "w", "b"]
    x = np.random.default_rng(3).standard_normal((2, 8, 13, 10)).astype(np.float32)
    ref, ours = _run(model, {"x": x})[0], _run(fused, {"x": x})[0]
    assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max()
    for attrs in ({"pads": [0, 0, 0, 0]}, {"pads": [1, 1, 1, 1], "strides": [2, 2]},
                  {"pads": [1, 1, 1, 1], "dilations": [2, 2]}, {"pads": [1, 1, 1, 1], "auto_pad": "NOTSET"}, {}):
        assert _fused(_conv_graph(**attrs), ["conv3x3"])[1] == {"conv3x3": 0}, attrs


def test_fold_constants_and_dead_nodes():
    nodes = [_const("a", np.array([2, 3], np.int64)), _const("b", np.array([4], np.int64)),
             helper.make_node("Concat", ["a", "b"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"]),
             helper.make_node("Neg", ["x"], ["unused"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [24])], [_out("y", 3)])
    fused, counts = _fused(model, ["fold_constants", "dead_nodes"])
    assert counts == {"fold_constants": 3, "dead_nodes": 1}
    assert _ops(fused) == ["Reshape"]
    assert numpy_helper.to_array(next(t for t in fused.graph.initializer if t.name == "shape")).tolist() == [2, 3, 4]
    x = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(_run(fused, {"x": x})[0], x.reshape(2, 3, 4))


# -- real graphs ----------------------------------------------------------------------------------

def test_exported_bundle_graphs_are_fused_and_agree(tiny_bundle):
    """Every GroupNorm and attention of a real export is fused; outputs agree with the portable graph."""
    import json

    from sdrt.runtime.backends.onnxruntime import Session

    bundle = tiny_bundle
    manifest = json.loads((bundle / "sdrt.json").read_text())
    for name in ("unet", "vae_decoder"):
        portable = onnx.load(str(bundle / name / "model.onnx"), load_external_data=False)
        entry = manifest["components"][name]["optimized"]["cpu"]
        fused = onnx.load(str(bundle / entry["path"]), load_external_data=False)
        n_norms = _ops(portable).count("InstanceNormalization")
        n_attn = _ops(portable).count("Softmax")
        assert n_norms and entry["passes"]["group_norm"] == n_norms == _ops(fused).count("GroupNorm")
        assert entry["passes"]["attention"] == n_attn == _ops(fused).count("MultiHeadAttention")
        assert "InstanceNormalization" not in _ops(fused) and "Softmax" not in _ops(fused)
        assert entry["custom_ops"] is True
        # one copy of the weights: the fused graph refers to the portable graph's data file
        files = sorted(p.name for p in (bundle / name).iterdir())
        assert files == ["config.json", "model.cpu.onnx", "model.onnx", "model.onnx_data", "provenance.json"]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 6), dtype=np.float32),
             "timestep": np.array([900.0, 3.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    a = Session(bundle / "unet" / "model.onnx").run(feeds)["out_sample"]
    b = Session(bundle / "unet" / "model.cpu.onnx").run(feeds)["out_sample"]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_text_encoder_causal_attention_fused(tiny_bundle):
    """CLIP's export (heads split as [B, S, -1, d], the product reshaped to its own shape before
    the merge, the causal mask added to the scores): every attention becomes MultiHeadAttention
    with the mask as attention_bias, and the graph's outputs agree with the portable one's."""
    import json

    from sdrt.runtime.backends.onnxruntime import Session

    entry = json.loads((tiny_bundle / "sdrt.json").read_text())["components"]["text_encoder"]["optimized"]["cpu"]
    portable = onnx.load(str(tiny_bundle / "text_encoder" / "model.embeds.onnx"), load_external_data=False)
    fused = onnx.load(str(tiny_bundle / entry["path"]), load_external_data=False)
    layers = _ops(portable).count("Softmax")
    assert layers and entry["passes"]["attention"] == layers == _ops(fused).count("MultiHeadAttention")
    assert "Softmax" not in _ops(fused) and "Transpose" not in _ops(fused)
    mhas = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len({n.input[5] for n in mhas}) == 1  # the one causal mask, shared by every layer
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}["num_heads"] == 2 for n in mhas)
    x = np.random.default_rng(0).standard_normal((2, 77, 32)).astype(np.float32)
    a = Session(tiny_bundle / "text_encoder" / "model.embeds.onnx").run({"inputs_embeds": x})
    b = Session(tiny_bundle / entry["path"]).run({"inputs_embeds": x})
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5)


def test_sd15_unet_every_attention_and_group_norm_fused(tmp_path):
    """The full SD 1.5 UNet graph (weights of no value: uninitialised memory), exported by sdrt's
    exporter and optimized the way ``sdrt export`` does, without loading its 3.4 GB of weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.export.configs import sd1_configs
    from sdrt.export.graphs import UNetGraph, export_component
    from sdrt.export.write import _optimize_component
    from sdrt.runtime.spec import unet_spec

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd1_configs()["unet"])
    unet = unet.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in unet.parameters():  # finite values: the trace folds a few constants from them
            p.zero_()
    # a small trace (batch 1, 8x8 latents): the structure does not depend on it
    sizes = {"batch": 1, "height": 8, "width": 8, "sequence": 77}
    path = export_component(UNetGraph(unet), unet_spec(4, 4, 768), sizes, tmp_path / "unet")
    del unet
    portable = onnx.load(str(path), load_external_data=False)
    entry = _optimize_component(path)["cpu"]  # what `sdrt export` does with each graph (a manifest Variant)
    fused = onnx.load(str(path.parent / "model.cpu.onnx"), load_external_data=False)
    counts = entry.details["passes"]
    # SD 1.5: 61 GroupNorms (22 ResNet blocks x 2, 16 transformer blocks, the output norm), and 16
    # transformer blocks with self- and cross-attention
    assert _ops(portable).count("InstanceNormalization") == 61 and counts["group_norm"] == 61
    assert _ops(portable).count("Softmax") == 32 and counts["attention"] == 32
    assert counts["gelu"] == 16 and counts["layer_norm"] == 48
    # Winograd: the 3x3 convolutions of at most 640 output channels (and 1920 in): conv_in, conv_out
    # and the ResNet convolutions of the two largest resolutions (down blocks 0-1, up blocks 2-3),
    # with up block 2's upsampler; the stride-2 downsamplers, the 1x1 shortcuts and the
    # 1280-channel levels stay ONNX Runtime's Conv
    conv3x3 = {n.name for n in fused.graph.node if n.op_type == "Conv3x3"}
    resnets = {f"/unet/{block}/resnets.{i}/conv{j}/Conv" for block, count in
               (("down_blocks.0", 2), ("down_blocks.1", 2), ("up_blocks.2", 3), ("up_blocks.3", 3))
               for i in range(count) for j in (1, 2)}
    assert conv3x3 == resnets | {"/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/up_blocks.2/upsamplers.0/conv/Conv"}
    assert counts["conv3x3"] == 23 and _ops(fused).count("Conv") == 75
    assert _ops(fused).count("GroupNorm") == 61 and _ops(fused).count("MultiHeadAttention") == 32
    assert "InstanceNormalization" not in _ops(fused) and "Softmax" not in _ops(fused)
    # the reduced-precision graphs' pass: the 16 self-attentions, not the 16 cross-attentions
    reduced = onnx.ModelProto()
    reduced.CopyFrom(fused)
    assert passes.bf16_attention(passes.Graph(reduced)) == 16
    assert _ops(reduced).count("Attention") == 16 and _ops(reduced).count("MultiHeadAttention") == 16
    silu = sum(1 for n in fused.graph.node if n.op_type == "GroupNorm"
               and any(a.name == "activation" and a.i == 1 for a in n.attribute))
    assert silu == 44 + 1  # every ResNet norm and the output norm carry the SiLU that follows them
    # one copy of the weights (all zeros here, which the exporter shares between same-shaped
    # tensors): both graphs refer to model.onnx_data
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.cpu.onnx", "model.onnx", "model.onnx_data"]
    assert path.with_name("model.cpu.onnx").stat().st_size < 8 * 2**20 and path.stat().st_size < 8 * 2**20


def test_no_optimize_and_graph_choice(tiny_checkpoint, tiny_bundle, tmp_path, monkeypatch):
    """--no-optimize writes portable graphs only; the runtime picks the optimized graph on the CPU
    only, and falls back to the portable one when the kernels library is missing or when asked."""
    import json

    from sdrt.export.write import export_checkpoint
    from sdrt.runtime import bundle as bundle_mod
    from sdrt.runtime.bundle import open_bundle

    plain = export_checkpoint(tiny_checkpoint, tmp_path / "plain", optimize=False)
    # model.onnx_data only where the text encoder's two graphs share its weights
    assert not list(plain.rglob("model.cpu.onnx"))
    assert {p.parent.name for p in plain.rglob("model.onnx_data")} <= {"text_encoder"}
    assert all("optimized" not in c for c in json.loads((plain / "sdrt.json").read_text())["components"].values())
    assert open_bundle(plain).graph("unet") == plain / "unet" / "model.onnx"

    b = open_bundle(tiny_bundle)
    assert b.graph("unet", "cpu") == tiny_bundle / "unet" / "model.cpu.onnx"
    assert b.graph("unet", "cuda:0") == tiny_bundle / "unet" / "model.onnx"  # fused ops are CPU ops
    assert b.graph("text_encoder", "cpu") == tiny_bundle / "text_encoder" / "model.cpu.onnx"  # its attention
    assert b.graph("vae_encoder", "cpu:0") == tiny_bundle / "vae_encoder" / "model.cpu.onnx"
    monkeypatch.setenv("SDRT_GRAPHS", "portable")
    assert b.graph("unet", "cpu") == tiny_bundle / "unet" / "model.onnx"
    monkeypatch.delenv("SDRT_GRAPHS")
    monkeypatch.setattr(bundle_mod.kernels, "available", lambda: False)
    assert b.graph("unet", "cpu") == tiny_bundle / "unet" / "model.onnx"
    # ONNX Runtime's own ops only (no sdrt kernels): the fused text encoder runs without the library
    assert b.graph("text_encoder", "cpu") == tiny_bundle / "text_encoder" / "model.cpu.onnx"


def test_fused_graph_without_the_kernels_library_is_one_clear_error(tiny_bundle, monkeypatch):
    from sdrt.runtime.backends import onnxruntime as sessions
    from sdrt.runtime.errors import SdrtError

    monkeypatch.setattr(sessions.kernels, "available", lambda: False)
    with pytest.raises(SdrtError) as e:
        sessions.Session(tiny_bundle / "unet" / "model.cpu.onnx")
    message = str(e.value)
    assert "\n" not in message and "ai.sdrt" in message and "kernels library" in message


# -- bf16 attention (reduced-precision graphs only) --------------------------------------------------

def _self_and_cross_mha_graph(heads=2, dim=32, ctx_dim=24):
    """One self-attention MultiHeadAttention (keys from the sample) and one cross-attention (keys
    from the text context), as the fused UNet has them."""
    rng = np.random.default_rng(4)
    w = {n: (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
         for n, shape in (("wq", (dim, dim)), ("wk", (dim, dim)), ("wv", (dim, dim)), ("wq2", (dim, dim)),
                          ("wk2", (ctx_dim, dim)), ("wv2", (ctx_dim, dim)))}
    nodes = [helper.make_node("MatMul", ["sample", n], [n[1:]]) for n in ("wq", "wk", "wv")]
    nodes += [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["a1"], domain="com.microsoft", num_heads=heads),
              helper.make_node("MatMul", ["a1", "wq2"], ["q2"]),
              helper.make_node("MatMul", ["encoder_hidden_states", "wk2"], ["k2"]),
              helper.make_node("MatMul", ["encoder_hidden_states", "wv2"], ["v2"]),
              helper.make_node("MultiHeadAttention", ["q2", "k2", "v2"], ["y"], domain="com.microsoft",
                               num_heads=heads, scale=0.3)]
    inputs = [helper.make_tensor_value_info("sample", F, ["b", "s", dim]),
              helper.make_tensor_value_info("encoder_hidden_states", F, ["b", "l", ctx_dim])]
    model = _model(nodes, inputs, [_out("y", 3)], [numpy_helper.from_array(a, n) for n, a in w.items()])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_bf16_attention_takes_self_attention_only():
    model = _self_and_cross_mha_graph()
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert passes.bf16_attention(passes.Graph(fused)) == 1
    onnx.checker.check_model(fused)
    by_output = {n.output[0]: n for n in fused.graph.node}
    assert (by_output["a1"].op_type, by_output["a1"].domain) == ("Attention", "ai.sdrt")
    assert (by_output["y"].op_type, by_output["y"].domain) == ("MultiHeadAttention", "com.microsoft")
    assert any(o.domain == "ai.sdrt" for o in fused.opset_import)
    assert "bf16_attention" not in [name for name, _ in passes.PASSES]  # reduced-precision graphs only
    rng = np.random.default_rng(5)
    feeds = {"sample": rng.standard_normal((2, 100, 32), dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, 24), dtype=np.float32)}
    ref, out = _run(model, feeds)[0], _run(fused, feeds)[0]
    err = np.abs(out - ref)
    db = 10 * np.log10(np.abs(ref).max() ** 2 / np.mean(err ** 2))
    if kernels.attention_bf16_supported():
        assert 45 < db < 100, db  # bf16 products: close, and not float32's rounding
    else:
        assert db > 100, db  # the float32 path: ONNX Runtime's numbers up to float rounding


def test_bf16_attention_leaves_masked_attention_alone():
    model = _self_and_cross_mha_graph()
    node = model.graph.node[3]
    node.input.extend(["", "", "mask"])  # key padding mask: MultiHeadAttention's input 4
    assert passes.bf16_attention(passes.Graph(model)) == 0
