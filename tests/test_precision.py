"""Reduced precision: int8 CPU graphs, fp16 CUDA graphs, their measured fidelity and the runtime's choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.export import quantize as precision
from sdrt.export.reference import psnr
from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline
from sdrt.runtime.precision import int8_saturates

from conftest import run_sdrt

# PSNR figures below were measured with ONNX Runtime 1.32 on two kinds of x86-64 CPU: one with
# AVX-512 VNNI (int8 products exact) and an AVX2-only AMD EPYC (Zen 3), whose int8 products saturate
# (ONNX Runtime's u8 x s8 kernels sum pairs in int16 there; runtime/precision.py int8_saturates).
# Each is asserted within MARGIN dB of the figure measured on this kind of CPU.
MARGIN = 3.0
SATURATES = int8_saturates()


def on_this_cpu(vnni: float, saturating: float) -> float:
    """The figure measured on this kind of CPU: with exact int8 products, or saturating ones."""
    return saturating if SATURATES else vnni


def assert_db(value, measured: float, margin: float = MARGIN) -> None:
    assert value is not None and abs(value - measured) <= margin, f"PSNR {value} dB, measured {measured} +- {margin}"


def _matmul_model(tmp_path: Path) -> Path:
    """sample [1, 16, 64] -> MatMul W1 -> Add b -> MatMul W2 -> out; context [1, 8, 64] -> MatMul Wc -> ctx_out."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, "W1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.1, "W2"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, "Wc")]
    nodes = [helper.make_node("MatMul", ["sample", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("MatMul", ["hb", "W2"], ["out"], name="mm2"),
             helper.make_node("MatMul", ["context", "Wc"], ["ctx_out"], name="mmc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 16, 64]),
                                           helper.make_tensor_value_info("context", TensorProto.FLOAT, [1, 8, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 32]),
                               helper.make_tensor_value_info("ctx_out", TensorProto.FLOAT, [1, 8, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    return path


def test_image_stream_matmuls(tmp_path):
    model = onnx.load(str(_matmul_model(tmp_path)), load_external_data=False)
    assert precision.image_stream_matmuls(model) == {"mm1", "mm2"}  # not the context projection
    assert precision.image_stream_matmuls(model, "context") == {"mmc"}


def test_quantize_int8_shares_what_it_keeps(tmp_path):
    src = _matmul_model(tmp_path)
    dst = tmp_path / "model.cpu-int8.onnx"
    report = precision.quantize_int8(src, dst)
    assert report.counts == {"MatMulInteger": 2}  # mm1, mm2; the context MatMul stays fp32
    model = onnx.load(str(dst), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in model.graph.initializer}
    assert where["b"] == "model.onnx_data" and where["Wc"] == "model.onnx_data"  # unchanged: shared
    assert not any(name in where for name in ("W1", "W2"))  # replaced by their int8 forms
    assert report.shared_bytes == (64 + 64 * 64) * 4
    own = (tmp_path / "model.cpu-int8.onnx_data").stat().st_size if report.own_bytes else 0
    assert own == report.own_bytes and own < (64 * 64 + 64 * 32) * 4 / 2  # int8 weights, not fp32 copies
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".quantize-*"))

    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((1, 16, 64)).astype(np.float32),
             "context": rng.standard_normal((1, 8, 64)).astype(np.float32)}
    ref, ours = Session(src).run(feeds), Session(dst).run(feeds)
    np.testing.assert_array_equal(ref["ctx_out"], ours["ctx_out"])
    assert_db(psnr(ref["out"], ours["out"]), 52.4)  # quantized: close, not equal (52.43 on both kinds of CPU)


def _conv_model(tmp_path: Path) -> Path:
    """sample [1, 4, 16, 16] -> conv_in (4->16) -> Relu -> conv_a (16->16) -> conv_b (16->16) -> conv_out (16->4)."""
    rng = np.random.default_rng(0)
    shapes = {"conv_in": (16, 4), "conv_a": (16, 16), "conv_b": (16, 16), "conv_out": (4, 16)}
    inits, nodes, x = [], [], "sample"
    for name, (cout, cin) in shapes.items():
        inits += [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) / (3 * cin**0.5)).astype(np.float32),
                                          f"{name}.weight"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.bias")]
        y = "out_sample" if name == "conv_out" else f"{name}_out"
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name, pads=[1, 1, 1, 1]))
        x = y
        if name == "conv_in":
            nodes.append(helper.make_node("Relu", [x], ["relu_out"], name="relu"))
            x = "relu_out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
                    size_threshold=0)
    return path


def test_quantize_int8_static(tmp_path):
    src = _conv_model(tmp_path)
    rng = np.random.default_rng(1)
    calibration = [{"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(8)]
    dst = tmp_path / "model.cpu-int8-static.onnx"
    report = precision.quantize_int8_static(src, dst, calibration)
    assert report.counts == {"QLinearConv": 2}  # conv_a, conv_b; the first and last stay fp32
    assert report.kept_float == {"conv_in": "reads the graph input", "conv_out": "writes the graph output"}
    model = onnx.load(str(dst), load_external_data=False)
    # fp32, and through the CPU graph passes: sdrt's Winograd convolution
    assert sorted(n.name for n in model.graph.node if n.op_type == "Conv3x3") == ["conv_in", "conv_out"]
    where = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in model.graph.initializer}
    assert where["conv_in.weight"] == where["conv_out.weight"] == "model.onnx_data"  # unchanged: shared
    assert report.shared_bytes == (16 * 4 * 9 + 16 + 4 * 16 * 9 + 4) * 4
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".quantize-*"))
    with pytest.raises(ValueError, match="calibration feeds"):
        precision.quantize_int8_static(src, tmp_path / "other.onnx", [])

    feeds = {"sample": np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)}  # held out
    ref, ours = Session(src).run(feeds)["out_sample"], Session(dst).run(feeds)["out_sample"]
    assert_db(psnr(ref, ours), 53.2)  # quantized: close, not equal (53.15 on both kinds of CPU)


def test_layer_sensitivity_ranks_int8_layers_by_their_own_error(tmp_path):
    """Each int8-static layer measured alone on ONNX Runtime's int8 kernels: a layer whose
    calibrated input range is 100x too wide wastes 40 dB of its 256 levels and ranks worst; with
    its true range it is as faithful as its neighbour; the ranges cache makes a second
    quantization reuse the calibration, and ``keep`` leaves a layer in fp32 with its reason."""
    src = _conv_model(tmp_path)
    rng = np.random.default_rng(1)
    feeds = [{"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(6)]
    ranges_file = tmp_path / "ranges.json"
    precision.quantize_int8_static(src, tmp_path / "model.cpu-int8-static.onnx", feeds, ranges=ranges_file)
    assert ranges_file.exists()
    ranges = precision.calibrated_ranges(ranges_file)
    targets, kept = precision.static_targets(onnx.load(str(src), load_external_data=False))
    assert targets == {"conv_a", "conv_b"} and set(kept) == {"conv_in", "conv_out"}
    true = precision.layer_sensitivity(src, feeds, ranges, targets)
    assert set(true) == {"conv_a", "conv_b"} and all(30 < db < 60 for db in true.values()), true
    lo, hi = ranges["conv_a_out"]
    wide = {**ranges, "conv_a_out": (100 * lo, 100 * hi)}  # conv_a's output is conv_b's input
    bad = precision.layer_sensitivity(src, feeds, wide, targets)
    assert bad["conv_b"] < true["conv_b"] - 25 and bad["conv_a"] < true["conv_a"] - 25  # its output too
    assert abs(bad["conv_a"] - bad["conv_b"]) < 10 and min(bad.values()) < 25

    # a second quantization reads the ranges file (not the feeds) and keeps what it is told in fp32
    keep = {"conv_b": "measured"}
    louder = [{"sample": 10 * feeds[0]["sample"]}]  # would calibrate 10x wider ranges
    report = precision.quantize_int8_static(src, tmp_path / "kept.onnx", louder, ranges=ranges_file, keep=keep)
    assert report.counts == {"QLinearConv": 1} and report.kept_float["conv_b"] == "measured"

    def scales(path):
        model = onnx.load(str(path), load_external_data=False)
        return {t.name: float(numpy_helper.to_array(t)) for t in model.graph.initializer
                if t.name.endswith("_scale") and not t.dims}

    assert scales(tmp_path / "kept.onnx")["relu_out_scale"] == scales(tmp_path / "model.cpu-int8-static.onnx")["relu_out_scale"]
    cached = Session(tmp_path / "kept.onnx").run(feeds[0])["out_sample"]
    full = Session(tmp_path / "model.cpu-int8-static.onnx").run(feeds[0])["out_sample"]
    ref = Session(src).run(feeds[0])["out_sample"]
    assert psnr(ref, cached) > psnr(ref, full)  # one layer fewer in int8, same calibration: closer


def test_export_writes_and_measures_each_precision(precise_bundle):
    bundle, stdout = precise_bundle
    m = json.loads((bundle / "sdrt.json").read_text())
    unet = m["components"]["unet"]["optimized"]
    assert unet["cpu-int8"]["path"] == "unet/model.cpu-int8.onnx" and unet["cpu-int8"]["quantized"]["MatMulInteger"] > 0
    # every self-attention (half the fused attention nodes) runs sdrt's bf16 attention in both int8 graphs
    self_attention = unet["cpu"]["passes"]["attention"] // 2
    assert self_attention > 0
    assert unet["cpu-int8"]["bf16_attention"] == unet["cpu-int8-static"]["bf16_attention"] == self_attention
    assert all("cpu-int8" not in m["components"][n].get("optimized", {}) for n in ("text_encoder", "vae_decoder"))
    assert all(m["components"][n]["optimized"]["cuda-fp16"]["fp32_nodes"] > 0
               for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))
    int8 = m["precisions"]["cpu"]["int8"]
    runs = int8["fidelity"]["runs"]
    assert [r["sampler"] for r in runs] == ["Euler a", "DPM++ 2M"]
    # measured: Euler a 50.10, DPM++ 2M 53.21 dB (dynamic); 23.37, 27.82 dB (static) with VNNI;
    # 31.55, 34.16 and 22.42, 25.62 dB where int8 products saturate
    for r, measured in zip(runs, (on_this_cpu(50.1, 31.6), on_this_cpu(53.2, 34.2))):
        assert_db(r["image_psnr"], measured)
    for r, measured in zip(m["precisions"]["cpu"]["int8-static"]["fidelity"]["runs"],
                           (on_this_cpu(23.4, 22.4), on_this_cpu(27.8, 25.6))):
        assert_db(r["image_psnr"], measured)
    worst = min(99.0 if r["image_psnr"] is None else r["image_psnr"] for r in runs)
    assert int8["default"] == (worst >= precision.DEFAULT_MIN_PSNR)
    assert m["precisions"]["cuda"]["fp16"] == {**m["precisions"]["cuda"]["fp16"], "fidelity": None, "default": False}
    assert "int8 (cpu): final image" in stdout and "fp16 (cuda): not measured at export" in stdout
    assert "int8-static (cpu): final image" in stdout
    static = m["precisions"]["cpu"]["int8-static"]
    assert unet["cpu-int8-static"]["path"] == "unet/model.cpu-int8-static.onnx"
    assert unet["cpu-int8-static"]["quantized"]["QLinearConv"] > 0 and unet["cpu-int8-static"]["custom_ops"]
    assert static["calibration"]["feeds"] > 0 and static["calibration"]["prompts"] == list(precision.CALIBRATION_PROMPTS)
    assert [r["sampler"] for r in static["fidelity"]["runs"]] == ["Euler a", "DPM++ 2M"]
    assert static["fidelity"]["int8_saturates"] in (True, False)
    assert static["fidelity"]["attention_bf16"] == int8["fidelity"]["attention_bf16"] in (True, False)
    # The int8 graph adds its int8 weights only; fp16 graphs hold half-size copies
    data = (bundle / "unet" / "model.onnx_data").stat().st_size
    assert (bundle / "unet" / "model.cpu-int8.onnx_data").stat().st_size < data / 3
    assert (bundle / "unet" / "model.cuda-fp16.onnx_data").stat().st_size < data * 0.6
    assert not list(bundle.parent.glob(".*partial*"))


def test_runtime_picks_the_precision(precise_bundle, tmp_path):
    bundle, _ = precise_bundle
    pipe = Pipeline(bundle, precision="int8")
    assert Path(pipe.unet.path).name == "model.cpu-int8.onnx"
    assert Path(pipe.vae_decoder.path).name == "model.cpu.onnx"  # int8 leaves the VAE in fp32
    p = GenerationParams("a red circle", steps=4, seed=3, sampler_name="DPM++ 2M")
    int8 = np.asarray(pipe.generate(p)[0].image, dtype=np.float64)
    fp32 = np.asarray(Pipeline(bundle, precision="fp32").generate(p)[0].image, dtype=np.float64)
    assert_db(psnr(fp32, int8, peak=255.0), on_this_cpu(50.4, 38.1))  # measured 50.40 (VNNI), 38.10

    # auto: fp32 unless the export's measurement made int8 the CPU default
    copy = shutil.copytree(bundle, tmp_path / "copy")
    m = json.loads((copy / "sdrt.json").read_text())
    m["precisions"]["cpu"]["int8-static"]["default"] = False
    m["precisions"]["cpu"]["mixed"]["default"] = False  # test_mixed_precision_is_chosen_by_measurement's
    for default in (False, True):
        m["precisions"]["cpu"]["int8"]["default"] = default
        (copy / "sdrt.json").write_text(json.dumps(m))
        auto = Pipeline(copy)
        assert auto.precision == ("int8" if default else "fp32")
        assert Path(auto.unet.path).name == ("model.cpu-int8.onnx" if default else "model.cpu.onnx")
    # both int8 variants passed: the faster static one
    m["precisions"]["cpu"]["int8-static"]["default"] = True
    (copy / "sdrt.json").write_text(json.dumps(m))
    assert Path(Pipeline(copy).unet.path).name == "model.cpu-int8-static.onnx"

    # sdrt bench's fp32 backend runs fp32 graphs whatever the bundle's default
    from sdrt.benchmarks.harness import RuntimePeer

    peer = RuntimePeer({"bundle": str(copy), "device": "cpu", "options": {"session": "cpu"}, "precision": "fp32"})
    assert peer.pipe.precision == "fp32" and Path(peer.pipe.unet.path).name == "model.cpu.onnx"

    static = Pipeline(bundle, precision="int8-static")
    assert Path(static.unet.path).name == "model.cpu-int8-static.onnx"
    image = np.asarray(static.generate(p)[0].image, dtype=np.float64)
    assert_db(psnr(fp32, image, peak=255.0), on_this_cpu(23.5, 22.3))  # measured 23.50 (VNNI), 22.29


def test_auto_int8_only_where_its_measurement_holds(precise_bundle, tmp_path, monkeypatch):
    """An int8 default measured on a CPU with VNNI is not taken on one whose int8 products
    saturate (x86 without VNNI); one measured on such a CPU is. The CPU's features cannot be
    changed in a test, so the detector's answer is replaced."""
    import sdrt.runtime.bundle as bundle_mod

    copy = shutil.copytree(precise_bundle[0], tmp_path / "copy")
    m = json.loads((copy / "sdrt.json").read_text())
    m["precisions"]["cpu"]["int8-static"]["default"] = False
    m["precisions"]["cpu"]["mixed"]["default"] = False
    m["precisions"]["cpu"]["int8"]["default"] = True
    for measured_saturating, here_saturating, expected in ((False, False, "int8"), (False, True, "fp32"),
                                                          (True, True, "int8"), (True, False, "int8")):
        m["precisions"]["cpu"]["int8"]["fidelity"]["int8_saturates"] = measured_saturating
        (copy / "sdrt.json").write_text(json.dumps(m))
        monkeypatch.setattr(bundle_mod, "int8_saturates", lambda: here_saturating)
        assert bundle_mod.open_bundle(copy).default_precision("cpu") == expected


def test_precision_errors(precise_bundle, tiny_bundle):
    bundle, _ = precise_bundle
    with pytest.raises(SdrtError, match=r"bundle tiny-sd1 has no int8 graphs for cpu \(export them with `sdrt export --precision int8`\)"):
        Pipeline(tiny_bundle, precision="int8")
    with pytest.raises(SdrtError, match="fp16 graphs are made for the cuda device"):
        Pipeline(bundle, precision="fp16")
    with pytest.raises(SdrtError, match="unknown precision 'bf16'"):
        Pipeline(bundle, precision="bf16")
    r = run_sdrt("generate", "x", "--model", tiny_bundle, "--precision", "int8", "--steps", 1)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bundle tiny-sd1 has no int8 graphs for cpu")


def test_fp16_graphs_keep_fp32_io_and_agree(precise_bundle):
    """fp16 graphs run on ONNX Runtime's CPU kernels too: fp32 in and out, close to fp32."""
    bundle, _ = precise_bundle
    half = Session(bundle / "unet" / "model.cuda-fp16.onnx")
    assert {p.type for p in half.inputs.values()} == {"tensor(float)"}
    model = onnx.load(str(bundle / "unet" / "model.cuda-fp16.onnx"), load_external_data=False)
    weights = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)  # ONNX Runtime checked the types
    kept = [n for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization", "InstanceNormalization")]
    assert kept and all(n.op_type in precision.FP16_KEEP_FP32 for n in kept)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([999.0, 999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    ref = Session(bundle / "unet" / "model.onnx").run(feeds)["out_sample"]
    out = half.run(feeds)["out_sample"]
    assert out.dtype == np.float32
    assert_db(psnr(ref, out), 62.4)  # measured 62.39


def test_half_vae_nan_is_retried_in_fp32(precise_bundle, caplog):
    """Latents that overflow fp16 inside the VAE: the fp16 graph gives NaN/Inf, the pipeline warns,
    switches to the fp32 graph and decodes the same image the fp32 pipeline does."""
    bundle, _ = precise_bundle
    pipe = Pipeline(bundle, precision="fp32")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32) * 2e4
    expected = pipe.decode_float(latents)
    half = bundle / "vae_decoder" / "model.cuda-fp16.onnx"
    scaled = latents / np.float32(pipe.bundle.latent_scale_factor)
    assert not np.isfinite(Session(half).run({"latent_sample": scaled})["sample"]).all()  # the premise
    pipe.vae_decoder = Session(half)
    with caplog.at_level("WARNING"):
        got = pipe.decode_float(latents)
    assert "retrying with the fp32 graph" in caplog.text
    np.testing.assert_array_equal(got, expected)
    assert Path(pipe.vae_decoder.path).name == "model.cpu.onnx"


def test_verify_measures_a_precision_against_torch(precise_bundle, tiny_checkpoint):
    from sdrt.export.reference import verify_bundle

    bundle, _ = precise_bundle
    p = GenerationParams("a red circle", steps=4, seed=2, sampler_name="DPM++ 2M")
    fp32 = verify_bundle(bundle, tiny_checkpoint, p)
    int8 = verify_bundle(bundle, tiny_checkpoint, p, precision="int8")
    assert int8["request"]["precision"] == "int8" and fp32["request"]["precision"] == "fp32"
    assert fp32["stages"]["unet"]["psnr"] > 80
    assert_db(int8["stages"]["unet"]["psnr"], on_this_cpu(48.6, 39.0))  # measured 48.58 (VNNI), 38.98
    assert int8["stages"]["text_encoder"]["psnr"] == fp32["stages"]["text_encoder"]["psnr"]  # fp32 in both



def test_kept_float_convs_name_the_latent_channels(tmp_path):
    """A convolution on the latent's 4 channels stays fp32 even away from the graph's ends (the VAE
    decoder's conv_in after post_quant_conv)."""
    model = onnx.load(str(_conv_model(tmp_path)), load_external_data=False)
    assert set(precision.kept_float_convs(model)) == {"conv_in", "conv_out"}
    model.graph.node[0].input[0] = "elsewhere"  # conv_in no longer reads the graph input
    assert precision.kept_float_convs(model)["conv_in"] == "4 channels in, 16 out: the latent's or the image's own"
    assert "conv_a" not in precision.kept_float_convs(model, latent_channels=15)
    assert "conv_a" in precision.kept_float_convs(model, latent_channels=16)


@pytest.fixture(scope="module")
def mixed_bundle(precise_bundle) -> tuple[Path, str]:
    """The tiny model exported with ``--precision mixed`` (which writes int8 and int8-static too;
    conftest's export, which adds fp16, a CUDA precision that the CPU's choices never read)."""
    return precise_bundle


def test_int8_static_quantizes_the_vae_decoder(mixed_bundle):
    """int8-static covers the VAE decoder's convolutions too, calibrated on the final latents of
    the UNet's calibration generations; each component's own effect on the final image is measured."""
    bundle, _ = mixed_bundle
    m = json.loads((bundle / "sdrt.json").read_text())
    vae = m["components"]["vae_decoder"]["optimized"]["cpu-int8-static"]
    assert vae["path"] == "vae_decoder/model.cpu-int8-static.onnx" and vae["quantized"]["QLinearConv"] > 0
    assert vae["quantized"]["QLinearMatMul"] == 4  # the mid-block attention's q, k, v and output projections
    assert vae["kept_float"] == {"/post_quant_conv/Conv": "reads the graph input",
                                 "/decoder/conv_in/Conv": "4 channels in, 16 out: the latent's or the image's own",
                                 "/decoder/conv_out/Conv": "writes the graph output"}
    static = m["precisions"]["cpu"]["int8-static"]
    assert static["calibration"]["vae_decoder_feeds"] == len(precision.CALIBRATION_PROMPTS)
    assert static["components"]["vae_decoder"]["kept_float"] == vae["kept_float"]
    effects = static["fidelity"]["components"]
    assert set(effects) == {"unet", "vae_decoder"}
    assert effects["vae_decoder"]["graph"] == vae["path"]
    # measured: the UNet's own 23.37 / 27.68 dB, the VAE decoder's own 43.13 / 43.98 dB with VNNI;
    # 23.93 and 28.25 dB where int8 products saturate (the decoder's own effect then misses the bar)
    assert_db(effects["unet"]["image_psnr"], on_this_cpu(23.4, 23.9))
    assert_db(effects["vae_decoder"]["image_psnr"], on_this_cpu(43.1, 28.3))
    assert effects["vae_decoder"]["default"] is not SATURATES and not effects["unet"]["default"]
    assert [r["sampler"] for r in effects["vae_decoder"]["runs"]] == ["Euler a", "DPM++ 2M"]
    # the VAE decoder's int8 graph alone, on the latents of a request neither calibration nor measurement used
    pipe = Pipeline(bundle, precision="fp32")
    p = GenerationParams("a blue square", steps=4, seed=11, sampler_name="Euler")
    plan = pipe.plan(p)
    latents = pipe.sample(plan, plan.batches[0], *pipe.conditioning(plan))
    fp32 = pipe.decode_float(latents)
    pipe.vae_decoder = Session(bundle / vae["path"])
    assert_db(psnr(fp32, pipe.decode_float(latents), peak=1.0), on_this_cpu(42.9, 28.6))


def test_mixed_precision_is_chosen_by_measurement(mixed_bundle, tmp_path, monkeypatch):
    """mixed: per component the fastest variant whose own effect held; where int8-static's did not
    (the UNet's, 23 dB), int8-static with its least faithful layers kept in fp32, the count searched
    on the final image; measured whole; auto runs it and the PNG text names it."""
    import sdrt.runtime.bundle as bundle_mod
    from sdrt.export.write import LAYER_SEARCH_ROUNDS
    from sdrt.runtime.png import parse_infotext
    from sdrt.runtime.precision import MIXED_LAYERS

    bundle, stdout = mixed_bundle
    m = json.loads((bundle / "sdrt.json").read_text())
    mixed = m["precisions"]["cpu"]["mixed"]
    assert not m["precisions"]["cpu"]["int8-static"]["fidelity"]["components"]["unet"]["default"]
    unet, layers = mixed["components"]["unet"], mixed["components"]["unet"]["layers"]
    assert unet["precision"] == MIXED_LAYERS
    static = m["components"]["unet"]["optimized"]["cpu-int8-static"]["quantized"]
    graph = m["components"]["unet"]["optimized"]["cpu-mixed"]
    n = static["QLinearConv"] + static["QLinearMatMul"]
    assert graph["path"] == "unet/model.cpu-mixed.onnx" and (bundle / graph["path"]).exists()
    assert layers["of"] == n and layers["int8"] + layers["kept_float"] == n and 0 < layers["kept_float"] < n
    assert graph["quantized"]["QLinearConv"] + graph["quantized"]["QLinearMatMul"] == layers["int8"]
    searched = {k: float(v.split(" dB")[0]) for k, v in graph["kept_float"].items() if "mixed precision's search" in v}
    assert len(searched) == layers["kept_float"]
    # the bisection: every count below the one kept missed the bar, the one kept held it
    rounds = layers["rounds"]
    assert 1 <= len(rounds) <= LAYER_SEARCH_ROUNDS and rounds[0]["kept_float"] == n // 2
    held = [r["kept_float"] for r in rounds if r["image_psnr"] is None or r["image_psnr"] >= precision.DEFAULT_MIN_PSNR]
    assert min(held) == layers["kept_float"]
    assert all(r["image_psnr"] < precision.DEFAULT_MIN_PSNR for r in rounds if r["kept_float"] < layers["kept_float"])
    assert unet["own_image_psnr"] >= precision.DEFAULT_MIN_PSNR
    assert mixed["default"] and mixed["fidelity"]["image_psnr"] >= precision.DEFAULT_MIN_PSNR
    label = f"unet {MIXED_LAYERS} ({layers['int8']} of {n} layers in int8)"
    assert label in stdout
    vae = mixed["components"]["vae_decoder"]
    if SATURATES:
        # measured here: the UNet 26 of 63 layers in int8 (own 37.5 dB); the VAE decoder's counts that
        # held alone were 5, 6 and 13 layers in fp32 of 27 (35.7, 35.7, 59.4 dB); with the UNet's the
        # first two missed (33.4 dB whole), so it stepped down to 13 (37.5 dB whole)
        assert_db(unet["own_image_psnr"], 37.5)
        assert 20 <= layers["int8"] <= 32
        assert vae["precision"] == MIXED_LAYERS and 0 < vae["layers"]["int8"] < vae["layers"]["of"]
        tried = mixed["fidelity"]["tried"]
        assert tried and all(t["image_psnr"] < precision.DEFAULT_MIN_PSNR for t in tried)
        assert all(t["components"]["vae_decoder"].startswith(MIXED_LAYERS) for t in tried)
        # each step kept more of the decoder's layers in fp32 than the one before
        kept = [int(t["components"]["vae_decoder"].split(", ")[1].split()[0]) for t in tried]
        assert kept == sorted(kept) and kept[-1] < vae["layers"]["kept_float"]
        assert_db(mixed["fidelity"]["image_psnr"], 37.5)
    else:
        assert vae["precision"] in ("int8-static", MIXED_LAYERS, "fp32")  # its int8-static held alone with VNNI

    auto = Pipeline(bundle)
    assert auto.precision == "mixed"
    assert Path(auto.unet.path).name == "model.cpu-mixed.onnx"
    assert Path(auto.text_encoder.session.path).name == "model.cpu.onnx"  # fused, fp32
    image = auto(prompt="a red circle", steps=2, seed=5)[0]
    chosen = ", ".join(f"{k} {v['precision']}" for k, v in mixed["components"].items() if v["precision"] != "fp32")
    assert parse_infotext(image.infotext)[2]["Precision"] == f"mixed ({chosen})"
    fp32 = Pipeline(bundle, precision="fp32")(prompt="a red circle", steps=2, seed=5)[0]
    assert "Precision" not in parse_infotext(fp32.infotext)[2]  # fp32, as the webui's CPU runs: no field
    path = image.save(tmp_path / "out.png")
    from PIL import Image
    text = Image.open(path).text["parameters"]
    assert parse_infotext(text)[2]["Precision"] == f"mixed ({chosen})"
    assert ("," in chosen) == (f'Precision: "mixed ({chosen})"' in text)  # quoted where it holds a comma, as the webui does
    assert Pipeline(bundle, precision="int8-static")(prompt="x", steps=1)[0].infotext.count("Precision: int8-static") == 1

    if vae["precision"] == MIXED_LAYERS:
        assert Path(auto.vae_decoder.path).name == "model.cpu-mixed.onnx"
    # measured where int8 products saturate, it holds on a CPU where they are exact; not the reverse
    monkeypatch.setattr(bundle_mod, "int8_saturates", lambda: not SATURATES)
    assert bundle_mod.open_bundle(bundle).default_precision("cpu") == ("mixed" if SATURATES else "fp32")


def test_int8_saturates_reads_the_cpu():
    """The detector (numpy's CPU feature table) agrees with the kernel's CPU flags."""
    import platform

    from sdrt.runtime.precision import int8_saturates

    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("reads /proc/cpuinfo on x86-64 Linux")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert int8_saturates() == ("avx512_vnni" not in flags and "avx_vnni" not in flags)


def test_int8_saturates_falls_back_to_numpys_table(monkeypatch):
    """Without /proc/cpuinfo, numpy's CPU table decides; it agrees where it lists the feature
    (AVX-512 VNNI; numpy 2 has no AVX-VNNI entry, which is why the kernel's flags come first)."""
    import platform

    from sdrt.runtime import precision

    if platform.machine() != "x86_64" or precision._cpuinfo_flags() is None:
        pytest.skip("compares with /proc/cpuinfo on x86-64 Linux")
    flags = precision._cpuinfo_flags()
    if "avx_vnni" in flags and "avx512_vnni" not in flags:
        pytest.skip("numpy's table cannot see AVX-VNNI")
    expected = precision.int8_saturates()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: None)
    assert precision.int8_saturates() == expected
