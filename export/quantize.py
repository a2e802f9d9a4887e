"""Reduced-precision graphs: int8 for CPUs, fp16 for NVIDIA GPUs, and their measured fidelity.

``sdrt export --precision int8`` adds ``unet/model.cpu-int8.onnx``: the CPU graph (fused, see
:mod:`sdrt.export.passes`) with ONNX Runtime's dynamic quantization applied to its weight
MatMuls over image tokens (:func:`image_stream_matmuls`). Weights become int8 (symmetric, per tensor);
activations are quantized per run, per tensor, to uint8 (``DynamicQuantizeLinear``), so no
calibration set is needed and every timestep and prompt gets its own activation range. The
quantized graph stores only the tensors the quantizer created (int8 weights, scales, zero points)
in ``model.cpu-int8.onnx_data``; every tensor it keeps unchanged points into the fp32 graph's
``model.onnx_data``, so the bundle grows by the int8 weights only. Only the UNet is quantized:
it is the sampling loop's whole cost; the text encoder runs once and the VAE stays fp32 (what
the webui calls ``--no-half-vae``).

``sdrt export --precision int8-static`` adds ``unet/model.cpu-int8-static.onnx``: every
convolution and weight MatMul over image tokens in int8 (``QLinearConv`` / ``QLinearMatMul``,
MLAS's VNNI kernels), weights per output channel, activations with fixed ranges calibrated at
export (:func:`calibration_feeds`: the UNet inputs of every step of fp32 generations from
:data:`CALIBRATION_PROMPTS`, min/max over all of them), then the CPU graph passes. About 2.2x
the fp32 CPU graph's speed on the SD 1.5 UNet (AVX-512 VNNI, 2 threads; docs/OPTIMIZATION.md);
the fixed ranges cost fidelity, measured like every precision. The first and last convolutions
(4 latent channels in and out) stay fp32. The VAE decoder gets the same treatment
(``vae_decoder/model.cpu-int8-static.onnx``), calibrated on the final latents of the same
generations; :func:`kept_float_convs` names what stays fp32 and why.

``sdrt export --precision mixed`` writes no graphs of its own: per component it picks the fastest
variant whose own measured effect on the final image held the bar (``measure``'s
``components``), then measures the combination (``sdrt.export.write``).

``sdrt export --precision fp16`` adds ``<component>/model.cuda-fp16.onnx`` for ONNX Runtime's
CUDA provider: the portable graph with fp16 weights and activations (onnxruntime's float16
converter), fp32 inputs and outputs (the runtime's numpy loop stays fp32), and the ops that
overflow or lose too much in fp16 kept in fp32 (:data:`FP16_KEEP_FP32`). TensorRT engines take
their precision from ``sdrt build --precision`` instead and build from the portable graph.

:func:`measure` renders short generations (an ancestral and a deterministic sampler) with the
fp32 graphs and with a reduced precision, the same seed and noise, and reports the PSNR and
max-abs of the final 8-bit images. The exporter records it in the manifest; a precision becomes
its device's default (``--precision auto``) only when its worst image reaches
:data:`DEFAULT_MIN_PSNR` dB on this measurement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from sdrt.export import passes
from sdrt.runtime import pipeline
from sdrt.runtime.bundle import variant_key
from sdrt.runtime.networks import quantized
from sdrt.runtime.networks.onnx_weights import GraphWeights
from sdrt.runtime.precision import int8_saturates

log = logging.getLogger(__name__)

DEFAULT_MIN_PSNR = 35.0  # dB on the final image: below it a precision is opt-in only
INT8_SUFFIX = variant_key("cpu", "int8")
INT8_STATIC_SUFFIX = variant_key("cpu", "int8-static")
FP16_SUFFIX = variant_key("cuda", "fp16")
SUFFIXES = {"int8": INT8_SUFFIX, "int8-static": INT8_STATIC_SUFFIX, "fp16": FP16_SUFFIX}  # model.<suffix>.onnx
# The components int8-static quantizes, each with the input whose tokens its quantized MatMuls read
STATIC_COMPONENTS = {"unet": "sample", "vae_decoder": "latent_sample"}
# Calibration requests of int8-static: other prompts and seeds than the measurement's (see measure)
CALIBRATION_PROMPTS = ("a green triangle on a yellow background", "a photograph of a mountain lake at sunrise",
                       "a purple square on an orange background", "portrait of an old man, oil painting")
CALIBRATION_SEED = 1000
# Kept in fp32 in fp16 graphs: normalisations and their reductions (sums of squares overflow
# fp16's 65504), the softmax's exponent, the timestep embedding's sin/cos/exp (arguments up to
# 1000 lose their fraction in fp16), and the range-sensitive Pow / Sqrt / Reciprocal.
FP16_KEEP_FP32 = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "ReduceMean", "Pow",
                  "Sqrt", "Reciprocal", "Softmax", "Exp", "Sin", "Cos", "Range", "CumSum")


@dataclass
class QuantizeReport:
    counts: dict[str, int]   # quantized nodes per op type, e.g. {"MatMulInteger": 140}
    own_bytes: int           # bytes in the variant's own data file
    shared_bytes: int        # bytes read from the fp32 graph's data file
    custom_ops: bool = False  # the graph imports the ai.sdrt domain (needs sdrt's kernels library)
    bf16_attention: int = 0  # self-attention nodes given to ai.sdrt.Attention (passes.bf16_attention)
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it stayed fp32 (int8-static)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"int8: {ops}; bf16 attention {self.bf16_attention}; "
                f"{self.own_bytes / 2**20:.1f} MB of int8 weights, "
                f"{self.shared_bytes / 2**20:.1f} MB shared with the fp32 graph")


def quantize_int8(src: str | Path, dst: str | Path) -> QuantizeReport:
    """Write ``dst``: ``src`` with dynamic int8 quantization of its weight MatMuls.

    Convolutions stay fp32: ONNX Runtime's dynamic ``ConvInteger`` measured slower than its fp32
    Conv on the SD 1.5 UNet (2.89 s vs 2.44 s per guided step at 256x256, 2 AVX2 threads), and
    static QLinearConv would need calibrated activation ranges per timestep.

    ``src`` is an exported graph whose weights live in ``model.onnx_data`` beside it (as
    :func:`sdrt.export.graphs.externalize` leaves them); tensors the quantizer keeps as they were
    stay there and ``dst`` refers to them. Written to a temporary name, then renamed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as work:
        staged = Path(work) / dst.name
        # DefaultTensorType: outputs of sdrt's fused ops (unknown to onnx's shape inference) are
        # fp32; MatMulConstBOnly: activation x activation MatMuls (none left outside the fused
        # attention) stay fp32; symmetric int8 weights use MLAS's u8s8 kernels
        source = onnx.load(str(src), load_external_data=False)
        quantized = image_stream_matmuls(source)
        exclude = [n.name for n in source.graph.node if n.op_type == "MatMul" and n.name not in quantized]
        with _quiet_root_warnings():  # the quantizer logs advice to the root logger on every call
            quantize_dynamic(str(src), str(staged), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude,
                             per_channel=False, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return _save_quantized(staged, src, dst, ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                                                  "MatMulIntegerToFloat"))


def _save_quantized(staged: Path, src: Path, dst: Path, op_types: tuple[str, ...],
                    stream_input: str = "sample") -> QuantizeReport:
    """Move a quantizer's output (``staged``, with its weights) to ``dst``: tensors equal to
    ``src``'s are read from ``src``'s data file, the rest go to ``dst``'s own; counts ``op_types``.

    On the way, self-attention becomes sdrt's bf16 attention (:func:`passes.bf16_attention`): a
    reduced-precision graph takes it with its int8 products, and is measured with it."""
    model = onnx.load(str(staged), load_external_data=True)
    attention = passes.bf16_attention(passes.Graph(model, staged.parent), stream_input)
    shared = _share_unchanged(model, src)
    # The data file first, under the name the graph refers to; the graph last, renamed into place
    data_name = dst.name[:-len(".onnx")] + ".onnx_data"
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    own = (dst.parent / data_name).stat().st_size if (dst.parent / data_name).exists() else 0
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in op_types:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    os.replace(tmp, dst)
    return QuantizeReport(counts, own, shared, any(o.domain == passes.SDRT_DOMAIN for o in model.opset_import),
                          attention)


def quantize_int8_static(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]], *,
                         optimize: bool = True, stream_input: str = "sample", keep: dict[str, str] | None = None,
                         ranges: Path | None = None) -> QuantizeReport:
    """Write ``dst``: the portable graph ``src`` with static int8 convolutions and MatMuls.

    Activation ranges are the min/max over ``feeds`` (:func:`calibration_feeds`) of every tensor a
    quantized op reads or writes; weights are int8 symmetric per output channel, activations uint8
    with a zero point (u8 x s8, the VNNI instruction's form). Quantized: the MatMuls over
    ``stream_input``'s tokens (:func:`image_stream_matmuls`; the UNet's ``sample``, the VAE
    decoder's ``latent_sample``) and every convolution but those :func:`kept_float_convs` names
    (the ones on the latent's channels, which carry the sample itself). With ``optimize`` the CPU
    graph passes run on the result (its GroupNorms, attention and GELU stay fp32 and fuse as in
    ``model.cpu.onnx``). Unchanged tensors are read from ``src``'s data file, as in
    :func:`quantize_int8`. The report's ``kept_float`` says which nodes stayed fp32 and why.

    ``keep`` names more nodes to leave in fp32, each with why (the ``mixed`` precision's layer
    search, :func:`layer_sensitivity`). ``ranges``: a file for the calibrated activation ranges,
    written by the first call that names it and read by the next ones instead of calibrating
    again (ONNX Runtime's calibration cache; where this ONNX Runtime has none, every call
    calibrates, to the same ranges)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    if not feeds:
        raise ValueError("static int8 quantization needs calibration feeds")
    src, dst = Path(src), Path(dst)
    source = onnx.load(str(src), load_external_data=False)
    targets, kept = static_targets(source, stream_input)
    kept.update({name: why for name, why in (keep or {}).items() if name in targets})
    exclude = [n.name for n in source.graph.node if n.op_type in ("Conv", "MatMul") and n.name not in targets
               or n.name in kept]
    cache = {"calibration_cache_path": str(ranges)} if ranges is not None and _has_calibration_cache() else {}
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as work:
        staged = Path(work) / "model.onnx"
        with _quiet_root_warnings():
            quantize_static(str(src), str(staged), Reader(), quant_format=QuantFormat.QOperator,
                            op_types_to_quantize=["Conv", "MatMul"], nodes_to_exclude=exclude, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=True,
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options={"MatMulConstBOnly": True}, **cache)
        if optimize:
            fused = staged.with_name("model.cpu.onnx")
            report = passes.optimize_file(staged, fused)
            log.info("int8-static: %s", report.summary())
            staged = fused
        report = _save_quantized(staged, src, dst, ("QLinearConv", "QLinearMatMul"), stream_input)
        report.kept_float = kept
        return report


def static_targets(model, stream_input: str = "sample") -> tuple[set[str], dict[str, str]]:
    """What int8-static quantizes in a portable graph, and what it leaves in fp32 and why: every
    convolution but :func:`kept_float_convs`'s, and the weight MatMuls over ``stream_input``'s
    tokens (:func:`image_stream_matmuls`); the other weight MatMuls stay fp32."""
    weights = {t.name for t in model.graph.initializer}
    matmuls = image_stream_matmuls(model, stream_input)
    kept = {n.name: "a MatMul off the image tokens: costs next to nothing at any size"
            for n in model.graph.node if n.op_type == "MatMul" and n.name not in matmuls and n.input[1] in weights}
    kept.update(kept_float_convs(model))
    targets = {n.name for n in model.graph.node if n.name not in kept
               and (n.op_type == "Conv" or n.name in matmuls)}
    return targets, kept


def _has_calibration_cache() -> bool:
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def kept_float_convs(model, latent_channels: int = 4) -> dict[str, str]:
    """The convolutions int8-static leaves in fp32, each with why: those reading a graph input or
    writing a graph output, and those with at most ``latent_channels`` channels in or out (the
    UNet's first and last, the VAE decoder's post-quant and first convolutions and its last, to
    RGB): their few channels carry the sample itself, where int8's 256 levels cost the most
    fidelity, and they cost little time."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    kept = {}
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        dims = weights.get(n.input[1]) if len(n.input) > 1 else None
        if n.input[0] in inputs:
            kept[n.name] = "reads the graph input"
        elif n.output[0] in outputs:
            kept[n.name] = "writes the graph output"
        elif dims and len(dims) >= 2 and min(dims[0], dims[1]) <= latent_channels:
            kept[n.name] = f"{dims[1]} channels in, {dims[0]} out: the latent's or the image's own"
    return kept


def calibrated_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """{tensor: (min, max)} from an int8-static calibration cache (``quantize_int8_static``'s
    ``ranges``)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: tuple(float(v) for v in np.asarray(d.range_value).ravel()[:2])
            for name, d in load_tensors_data(path).data.items()}


# int8-static's quantization, as ONNX Runtime's quantizer does it (the runtime's mirror of it,
# which re-quantizes LoRA-merged weights bit for bit): activations uint8 with a zero point,
# weights int8 symmetric per output channel
ACTIVATIONS = quantized.Scheme("uint8", 0, 255, symmetric=False)


def _int8_layer(node, w: np.ndarray, bias: np.ndarray | None, x_range, y_range) -> bytes:
    """A one-node graph running ``node`` (a Conv or a weight MatMul) as int8-static runs it:
    QuantizeLinear of its input over the calibrated range, ``QLinearConv`` / ``QLinearMatMul``
    with int8 weights symmetric per output channel (and an int32 bias), DequantizeLinear of its
    output over its calibrated range: float in, float out."""
    from onnx import TensorProto, helper, numpy_helper

    conv = node.op_type == "Conv"
    wq, ws, wz = quantized.quantize(w, quantized.Scheme("int8", -127, 127, symmetric=True, axis=0 if conv else 1))
    (xs,), (xz,) = quantized.scale_zero_point(np.float32([x_range[0]]), np.float32([x_range[1]]), ACTIVATIONS)
    (ys,), (yz,) = quantized.scale_zero_point(np.float32([y_range[0]]), np.float32([y_range[1]]), ACTIVATIONS)
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in (
        ("xs", xs), ("xz", xz), ("wq", wq), ("ws", ws), ("wz", wz), ("ys", ys), ("yz", yz))]
    inputs = ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"]
    if conv and bias is not None:
        inits.append(numpy_helper.from_array(quantized.quantize_bias(bias, xs, ws), "bq"))
        inputs.append("bq")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if conv else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv" if conv else "QLinearMatMul", inputs, ["yq"], **attrs),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def layer_sensitivity(src: str | Path, feeds: list[dict[str, np.ndarray]], ranges: dict[str, tuple[float, float]],
                      nodes: set[str], samples: int = 4) -> dict[str, float | None]:
    """{node: dB}: each of ``nodes`` (int8-static's convolutions and MatMuls) measured alone, the
    signal-to-noise ratio of its output when only it runs in int8, against its fp32 output on the
    same fp32 input. It runs as int8-static runs it, on ONNX Runtime's own int8 kernels on this
    CPU (:func:`_int8_layer`), so what those kernels do to the products (int16 saturation on x86
    CPUs without VNNI) is in the figure. Inputs are the fp32 graph's own activations on
    ``samples`` of the calibration ``feeds`` spread over the trajectory (from pure noise to the
    last step). Lower is worse; None: exact. The ``mixed`` precision keeps the worst in fp32
    (``sdrt.export.write``).

    The ranking is a proxy (an error's effect on the final image also depends on what follows the
    layer); what is kept is decided on the final image (``measure``)."""
    import onnxruntime as ort

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    chosen = [n for n in model.graph.node if n.name in nodes and n.input[0] in ranges and n.output[0] in ranges]
    have = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(t for n in chosen for t in (n.input[0], n.output[0]) if t not in have))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(os.environ.get("SDRT_THREADS", "0"))
    weights = GraphWeights(src)  # read one tensor at a time, never the whole file

    def array(name: str) -> np.ndarray | None:
        return np.asarray(weights.read(name), np.float32) if name and name in weights.index else None

    layers = {n.name: ort.InferenceSession(
        _int8_layer(n, array(n.input[1]), array(n.input[2]) if n.op_type == "Conv" and len(n.input) > 2 else None,
                    ranges[n.input[0]], ranges[n.output[0]]), opts, providers=["CPUExecutionProvider"])
        for n in chosen}
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)
    picks = sorted({round(i) for i in np.linspace(0, len(feeds) - 1, min(samples, len(feeds)))})
    with tempfile.TemporaryDirectory(prefix=".sensitivity-", dir=src.parent) as work:
        # beside the graph: its external data is found by its relative location
        augmented = src.parent / f"{Path(work).name}.onnx"
        try:
            onnx.save_model(model, str(augmented))
            session = ort.InferenceSession(str(augmented), opts, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            for i in picks:
                values = dict(zip(names, session.run(None, feeds[i])))
                for n in chosen:
                    y = values[n.output[0]].astype(np.float64)
                    yq = layers[n.name].run(None, {"x": values[n.input[0]]})[0]
                    signal[n.name] += float(np.square(y).sum())
                    noise[n.name] += float(np.square(y - yq).sum())
                del values
        finally:
            augmented.unlink(missing_ok=True)
    return {name: round(float(10 * np.log10(signal[name] / noise[name])), 2) if noise[name] > 0 else None
            for name in signal}


class _RecordingUNet:
    """Stands in for a pipeline's UNet session: runs it and keeps each input, typed as the graph
    takes it, for calibration."""

    def __init__(self, session):
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds, outputs=None):
        self.feeds.append({k: np.ascontiguousarray(v, dtype=self.session.input_dtype(k)) for k, v in feeds.items()})
        return self.session.run(feeds, outputs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def calibration_feeds(bundle_dir: str | Path, *, prompts: tuple[str, ...] = CALIBRATION_PROMPTS, steps: int = 10,
                      samplers: tuple[str, ...] = ("Euler a", "DPM++ 2M"), seed: int = CALIBRATION_SEED,
                      max_size: int = 256, components: tuple[str, ...] = ("unet",)) -> dict[str, list[dict]]:
    """{component: its inputs} over fp32 CPU generations, one per prompt (samplers taken in turn,
    seeds from ``seed``), at the bundle's default size capped at ``max_size``. ``unet``: its inputs
    at every step, what the network sees over a whole trajectory, from pure noise to the last
    step, with CFG's batch; ``vae_decoder``: the final latents of the same generations, as the
    pipeline decodes them (so one calibration run serves both)."""
    pipe = pipeline.Pipeline(bundle_dir, device="cpu", precision="fp32")
    pipe.wrap_unet(_RecordingUNet)
    recorder = pipe.unet
    decoder = pipe.vae_decoder = _RecordingUNet(pipe.vae_decoder)
    width, height = (min(v, max_size) for v in pipe.bundle.default_size)
    for k, prompt in enumerate(prompts):
        params = pipeline.GenerationParams(prompt, steps=steps, sampler_name=samplers[k % len(samplers)],
                                           seed=seed + k, width=width, height=height, cfg_scale=7.0)
        plan = pipe.plan(params)
        cond, uncond = pipe.conditioning(plan)
        latents = pipe.sample(plan, plan.batches[0], cond, uncond)
        if "vae_decoder" in components:
            pipe.decode_float(latents)
    return {"unet": recorder.feeds, "vae_decoder": decoder.feeds}


def image_stream_matmuls(model, stream_input: str = "sample") -> set[str]:
    """Names of the weight MatMuls whose activations depend on ``stream_input``: in the UNet, the
    projections over image tokens, whose cost grows with the image. The others (the text
    context's K/V projections, the timestep embedding's) cost next to nothing at any size and
    stay fp32: quantizing them would add error and no speed."""
    reached = passes.reached_from(model.graph, stream_input)
    weights = {t.name for t in model.graph.initializer}
    return {n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[0] in reached and n.input[1] in weights}


@contextlib.contextmanager
def _quiet_root_warnings():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _share_unchanged(model, src: Path) -> int:
    """Point the initializers of ``model`` that equal ``src``'s byte for byte at ``src``'s data
    file (relative location, same folder) and drop their copies; the bytes so shared."""
    from onnx.external_data_helper import uses_external_data

    source = onnx.load(str(src), load_external_data=False)
    where = {}
    for t in source.graph.initializer:
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            where[t.name] = (t, info)
    files: dict[str, np.memmap] = {}
    shared = 0
    for t in model.graph.initializer:
        hit = where.get(t.name)
        if hit is None or not t.HasField("raw_data"):
            continue
        original, info = hit
        if original.data_type != t.data_type or list(original.dims) != list(t.dims):
            continue
        location = info["location"]
        if location not in files:
            files[location] = np.memmap(src.parent / location, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if length != len(t.raw_data) or files[location][offset:offset + length].tobytes() != t.raw_data:
            continue
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.extend(original.external_data)
        shared += length
    return shared


def convert_fp16(src: str | Path, dst: str | Path, keep_fp32: tuple[str, ...] = FP16_KEEP_FP32) -> dict:
    """Write ``dst``: ``src`` in fp16 with fp32 inputs/outputs and ``keep_fp32`` ops in fp32.

    Weights go to ``<dst stem>.onnx_data`` (fp16 values differ from the fp32 ones: nothing is
    shared). Returns {"fp32_nodes": ops kept in fp32, "casts": n, "nodes": n}."""
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    # The converter places its casts by the value types shape inference gives; inferred here on the
    # structure alone (a graph over 2 GB cannot go through onnx's in-memory inference with weights)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    load_external_data_for_model(model, str(src.parent))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32),
                                    disable_shape_infer=True)
    _drop_repeated_nodes(half)
    _restore_fp32_constants(half, keep_fp32)
    kept = sum(1 for n in half.graph.node if n.op_type in keep_fp32)
    casts = sum(1 for n in half.graph.node if n.op_type == "Cast")
    data_name = dst.name[:-len(".onnx")] + ".onnx_data"
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save_model(half, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    os.replace(tmp, dst)
    return {"fp32_nodes": kept, "casts": casts, "nodes": len(half.graph.node)}


MEASURE_SAMPLERS = ("Euler a", "DPM++ 2M")


def _drop_repeated_nodes(model) -> None:
    """The converter inserts the same Cast twice when one value feeds two blocked ops through
    different paths (same name, input and output): keep the first; anything else writing an
    output twice is a converter bug to surface."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString()
        first = next((seen[o] for o in node.output if o in seen), None)
        if first is None:
            seen.update({o: key for o in node.output})
            keep.append(node)
        elif first != key:
            raise ValueError(f"fp16 conversion wrote {node.output[0]} twice, differently")
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _restore_fp32_constants(model, keep_fp32: tuple[str, ...]) -> None:
    """Give back fp32 constants to the inputs that must be fp32 after conversion: every constant
    input of an op kept in fp32, and Resize's roi and scales (fp32 whatever the data's type).

    The converter leaves a blocked op's initializers in fp16 when another node shares them (torch
    deduplicates equal tensors, such as the all-ones scales of freshly built LayerNorms), and it
    turns the Constant nodes torch exports for Resize's scales into fp16. Each such input gets an
    fp32 copy of the constant."""
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    copies: dict[str, str] = {}

    def fp32_copy(name: str) -> str | None:
        source = producers.get(name)
        if name in inits:
            tensor = inits[name]
        elif source is not None and source.op_type == "Constant" and source.attribute[0].name == "value":
            tensor = source.attribute[0].t
        else:
            return None
        if tensor.data_type != onnx.TensorProto.FLOAT16:
            return None
        if name not in copies:
            copies[name] = f"{name}_fp32"
            array = numpy_helper.to_array(tensor).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(array, copies[name]))
        return copies[name]

    for node in model.graph.node:
        slots = (range(1, min(3, len(node.input))) if node.op_type == "Resize"
                 else range(len(node.input)) if node.op_type in keep_fp32 else ())
        for k in slots:
            if node.input[k] and (copy := fp32_copy(node.input[k])) is not None:
                node.input[k] = copy


def measure(bundle_dir: str | Path, precision: str, *, device: str = "cpu", prompt: str | None = None,
            steps: int = 10, samplers: tuple[str, ...] = MEASURE_SAMPLERS, seed: int = 1,
            max_size: int = 256, reference: dict | None = None) -> dict:
    """Final-image fidelity of ``precision`` against the fp32 graphs, on one generation per sampler,
    whole and per component.

    Both pipelines run the bundle's graphs for ``device`` with the same prompt, seed and noise,
    at the bundle's default size capped at ``max_size`` (the export pays for this run: SD 1.5 at
    256x256 takes about two minutes on two cores). The fp32 graphs match the PyTorch reference to
    far beyond 8-bit resolution (``sdrt verify`` shows it per stage), so this is the precision's
    own loss. An ancestral sampler (Euler a) and a deterministic one (DPM++ 2M) both run: small
    differences can move an ancestral trajectory more. The precision may be its device's default
    when the worst image reaches :data:`DEFAULT_MIN_PSNR`.

    ``components`` holds each component's own effect on the final image: the others left in fp32
    (the UNet's: its sampling decoded by the fp32 VAE; the VAE decoder's: the fp32 latents decoded
    by it; the text encoder's: its conditioning sampled and decoded in fp32), for each component
    whose graph differs from the fp32 pipeline's.

    ``reference``: a dict kept by the caller across calls on the same bundle, holding the fp32
    generations (plan, conditioning, latents, image) per request, so that later calls sample only
    the precision measured (the ``mixed`` layer search measures several graphs in turn)."""
    from sdrt.runtime.metrics import psnr

    prompt = prompt or "a red circle on a blue background"
    pipes = {p: pipeline.Pipeline(bundle_dir, device=device, precision=p) for p in ("fp32", precision)}
    ref, var = pipes["fp32"], pipes[precision]
    varied = [name for name, graph in _graphs(var).items() if graph != _graphs(ref)[name]]
    width, height = (min(v, max_size) for v in ref.bundle.default_size)

    def image(pipe, latents):
        return pipeline.to_uint8(pipe.decode_float(latents)[0]).astype(np.float64)

    def compare(a, b):
        return {"image_psnr": _finite(psnr(a, b, peak=255.0)), "image_max_abs": int(np.abs(a - b).max())}

    runs, effects = [], {name: [] for name in varied}
    for sampler in samplers:
        params = pipeline.GenerationParams(prompt, steps=steps, sampler_name=sampler, seed=seed, width=width,
                                           height=height, cfg_scale=7.0)
        key = (sampler, prompt, steps, seed, width, height)
        if reference is None or key not in reference:
            plan = ref.plan(params)
            cond = ref.conditioning(plan)
            lat = ref.sample(plan, plan.batches[0], *cond)
            fp32 = (plan, cond, lat, image(ref, lat))
            if reference is not None:
                reference[key] = fp32
        else:
            fp32 = reference[key]
        plans = {"fp32": fp32[0], precision: var.plan(params)}
        conds = {"fp32": fp32[1], precision: var.conditioning(plans[precision])}
        latents = {"fp32": fp32[2], precision: var.sample(plans[precision], plans[precision].batches[0],
                                                          *conds[precision])}
        a, b = fp32[3], image(var, latents[precision])
        runs.append({"sampler": sampler, **compare(a, b),
                     "latents_psnr": _finite(psnr(latents["fp32"], latents[precision]))})
        for name in varied:
            if name == "vae_decoder":
                alone = image(var, latents["fp32"])
            elif name == "unet":
                sampled = (latents[precision] if "text_encoder" not in varied
                           else var.sample(plans[precision], plans[precision].batches[0], *conds["fp32"]))
                alone = image(ref, sampled)
            else:  # the text encoder
                alone = image(ref, ref.sample(plans["fp32"], plans["fp32"].batches[0], *conds[precision]))
            effects[name].append({"sampler": sampler, **compare(a, alone)})
    return {
        "against": "fp32 graphs (ONNX Runtime)",
        "request": {"prompt": prompt, "steps": steps, "seed": seed, "cfg_scale": 7.0, "size": f"{width}x{height}"},
        "runs": runs,
        **_worst(runs),
        "default": passes_bar(runs),
        "components": {name: {"graph": _graphs(var)[name], **_worst(rs), "default": passes_bar(rs), "runs": rs}
                       for name, rs in effects.items()},
        # int8 figures measured where int8 products are exact do not hold where they saturate
        "int8_saturates": int8_saturates() if device == "cpu" else None,
        # whether ai.sdrt.Attention ran its bf16 form here (elsewhere it runs float32: closer to fp32)
        "attention_bf16": _attention_bf16() if device == "cpu" else None,
    }


def passes_bar(runs: list[dict]) -> bool:
    """Whether every run's final image reaches :data:`DEFAULT_MIN_PSNR` (None: identical)."""
    return all(r["image_psnr"] is None or r["image_psnr"] >= DEFAULT_MIN_PSNR for r in runs)


def _worst(runs: list[dict]) -> dict:
    worst = min(runs, key=lambda r: np.inf if r["image_psnr"] is None else r["image_psnr"])
    return {"image_psnr": worst["image_psnr"], "image_max_abs": max(r["image_max_abs"] for r in runs)}


def _graphs(pipe) -> dict[str, str]:
    """The graph file each component of a pipeline runs (relative to the bundle)."""
    encoders = getattr(pipe.text_encoder, "encoders", [pipe.text_encoder])
    paths = {getattr(e, "component", "text_encoder"): e.session.path for e in encoders}
    paths |= {"unet": pipe.unet.path, "vae_decoder": pipe.vae_decoder.path}
    root = Path(pipe.bundle.path).resolve()
    return {k: Path(v).resolve().relative_to(root).as_posix() if Path(v).resolve().is_relative_to(root)
            else str(v) for k, v in paths.items()}


def _attention_bf16() -> bool | None:
    from sdrt.runtime.backends import kernels

    return kernels.attention_bf16_supported() if kernels.available() else None


def _finite(db: float) -> float | None:
    return round(float(db), 2) if np.isfinite(db) else None
