"""How fast can one guided SD 1.5 UNet step be on this CPU? Work counted, peak rates measured.

Counts the arithmetic of one guided step (batch 2) of the full SD 1.5 UNet per kind of work --
convolutions, linear layers (torch's flop counter, on the meta device: no weights, no time) and
the attention products (q k^T and p v, counted from the shapes) -- and measures, in this process
and with the same thread count, the peak rate each kind can reach here:

- float32 GEMM (ONNX Runtime MatMul, 4096 x 1280 x 1280),
- int8 convolution (ONNX Runtime QLinearConv, u8 x s8, 3x3, batch 2, the best of the UNet's three
  levels: 320 channels over 64x64, 640 over 32x32, 1280 over 16x16) and int8 GEMM (QLinearMatMul,
  the best of three image-token projection shapes): what ``int8-static`` runs,
- sdrt's attention (``ai.sdrt.Attention``) at the 512x512 self-attention shape, in its best form
  here (bf16 where the CPU has AVX-512 BF16).

The bound for a size is the work of each kind divided by its measured peak, with nothing else
costing anything (no normalisation, no activation, no quantize/dequantize, no memory traffic
beyond the peaks' own); the step's torch time from ``bench_unet_step`` divided by that bound is the
largest speed-up over torch any graph of that arithmetic could show here.

    python -m benchmarks.roofline --sizes 256 512 --threads 2      (after bench_unet_step)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sdrt.benchmarks.machine import machine, versions
from sdrt.benchmarks.records import utc_now
from sdrt.benchmarks.timing import time_fn

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-s", type=float, nargs="*", default=None,
                    help="torch's guided-step time per size; default: the latest bench_unet_step run's records")
    ap.add_argument("--records", default=str(RESULTS / "unet_step_cpu.jsonl"),
                    help="bench_unet_step's records, where torch's times are read by default")
    ap.add_argument("--out", default=str(RESULTS / "roofline_cpu.json"))
    args = ap.parse_args(argv)

    torch_s = dict(zip(args.sizes, args.torch_s)) if args.torch_s else latest_torch_times(Path(args.records))
    work = {size: unet_work(size) for size in args.sizes}
    peaks = measure_peaks(args.threads)
    report = {"date": utc_now(), "machine": machine(), "versions": versions(),
              "threads": args.threads, "peaks_gops": peaks, "sizes": {}}
    for size in args.sizes:
        w = work[size]
        bound = {"conv": w["conv"] / peaks["int8_conv"], "linear": w["linear"] / peaks["int8_matmul"],
                 "attention": w["attention"] / peaks["attention"]}
        total = sum(bound.values())
        row = {"gop": {k: round(v, 1) for k, v in w.items()}, "bound_s": {k: round(v, 3) for k, v in bound.items()},
               "bound_total_s": round(total, 3)}
        line = (f"{size}x{size}: {sum(w.values()):.0f} GOP (conv {w['conv']:.0f}, linear {w['linear']:.0f}, "
                f"attention {w['attention']:.0f}); at the measured peaks >= {total:.2f} s")
        if size in torch_s:
            row["torch_s"] = torch_s[size]
            row["max_speedup_vs_torch"] = round(torch_s[size] / total, 2)
            line += f", at most {torch_s[size] / total:.2f}x over torch's {torch_s[size]:.2f} s"
        report["sizes"][str(size)] = row
        print(line, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


def latest_torch_times(records: Path) -> dict[int, float]:
    """torch's median guided-step time per size in the latest run recorded in ``records``."""
    if not records.exists():
        return {}
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("runtime") == "torch" and r.get("measurement") == "unet_step"]
    if not rows:
        return {}
    run = rows[-1]["run"]
    return {r["workload"]["width"]: r["timing"]["median_s"] for r in rows if r["run"] == run}


def unet_work(size: int) -> dict[str, float]:
    """GOP (1 multiply-add = 2 operations) of one guided step (batch 2) at ``size`` pixels."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from sdrt.export.configs import sd1_configs

    config = sd1_configs()["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
        # the classic processor: its q k^T and p v are bmm calls the counter sees, and are
        # counted here from the shapes instead
        unet.set_attn_processor(AttnProcessor())
        latent = size // 8
        x = torch.empty(2, 4, latent, latent)
        t = torch.empty(2)
        ctx = torch.empty(2, 77, config["cross_attention_dim"])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, ctx)
    counts = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts()["Global"].items()}
    conv = counts.get("convolution", 0)
    linear = counts.get("addmm", 0) + counts.get("mm", 0)
    # attention products per transformer block: self (n x n) and cross (n x 77), q k^T and p v
    attention = 0.0
    channels = config["block_out_channels"]
    per_level = config["layers_per_block"]
    for level, c in enumerate(channels):
        if level == len(channels) - 1:
            continue  # SD 1.5's last down level and first up level have no attention
        n = (latent // 2 ** level) ** 2
        blocks = per_level + (per_level + 1)  # down blocks, up blocks
        attention += blocks * 2 * 2 * 2 * (n * n + n * 77) * c
    n = (latent // 2 ** (len(channels) - 1)) ** 2  # the mid block's transformer
    attention += 2 * 2 * 2 * (n * n + n * 77) * channels[-1]
    return {"conv": conv / 1e9, "linear": linear / 1e9, "attention": attention / 1e9}


def measure_peaks(threads: int) -> dict[str, float]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.runtime.backends import kernels

    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(kernels.library_path()))

    def rate(nodes, inputs, feeds, inits, gop, out_type=TensorProto.FLOAT):
        graph = helper.make_graph(nodes, "peak", inputs, [helper.make_tensor_value_info("y", out_type, None)],
                                  initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.sdrt", 1)])
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        timing = time_fn(lambda: session.run(None, feeds), repeats=5)
        return round(gop / timing["median_s"], 1)

    def scalar(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    def qparams(prefix):
        return [scalar(f"{prefix}_s", 0.02, np.float32), scalar(f"{prefix}_z", 128, np.uint8)]

    peaks = {}
    m, k, n = 4096, 1280, 1280
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    peaks["fp32_matmul"] = rate([helper.make_node("MatMul", ["a", "w"], ["y"])],
                                [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])], {"a": a}, [w],
                                2 * m * k * n / 1e9)
    # int8: the best of the UNet's own shapes (image tokens x channels; 3x3 convolutions per level)
    best = 0.0
    for m, k, n in ((8192, 320, 1280), (2048, 640, 2560), (8192, 1280, 320)):
        a8 = rng.integers(0, 255, (m, k), dtype=np.uint8)
        w8 = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w8")
        inits = [w8, scalar("w_s", 0.01, np.float32), scalar("w_z", 0, np.int8), *qparams("a"), *qparams("y")]
        best = max(best, rate([helper.make_node("QLinearMatMul", ["a", "a_s", "a_z", "w8", "w_s", "w_z", "y_s", "y_z"],
                                                ["y"])],
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])], {"a": a8}, inits,
                              2 * m * k * n / 1e9, TensorProto.UINT8))
    peaks["int8_matmul"] = best
    best = 0.0
    for c, hw in ((320, 64), (640, 32), (1280, 16)):
        x8 = rng.integers(0, 255, (2, c, hw, hw), dtype=np.uint8)
        wc = numpy_helper.from_array(rng.integers(-127, 127, (c, c, 3, 3), dtype=np.int8), "wc")
        inits = [wc, numpy_helper.from_array(np.full(c, 0.01, np.float32), "w_s"),
                 numpy_helper.from_array(np.zeros(c, np.int8), "w_z"), *qparams("x"), *qparams("y")]
        best = max(best, rate([helper.make_node("QLinearConv", ["x", "x_s", "x_z", "wc", "w_s", "w_z", "y_s", "y_z"],
                                                ["y"], pads=[1, 1, 1, 1])],
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, c, hw, hw])], {"x": x8},
                              inits, 2 * 2 * c * c * 9 * hw * hw / 1e9, TensorProto.UINT8))
    peaks["int8_conv"] = best
    tokens, heads, d = 4096, 8, 40
    feeds = {name: rng.standard_normal((2, tokens, heads * d), dtype=np.float32) for name in "qkv"}
    peaks["attention"] = rate([helper.make_node("Attention", ["q", "k", "v"], ["y"], domain="ai.sdrt", num_heads=heads)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, tokens, heads * d]) for x in "qkv"],
                              feeds, [], 2 * 2 * 2 * tokens * tokens * heads * d / 1e9)
    for name, value in peaks.items():
        print(f"peak {name}: {value:.0f} GOP/s", flush=True)
    return peaks


if __name__ == "__main__":
    sys.exit(main())
