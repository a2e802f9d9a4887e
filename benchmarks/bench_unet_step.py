"""One guided UNet step of the full SD 1.5 architecture: ONNX Runtime CPU vs torch, in one process.

Peers: torch eager (SDPA or classic attention), ONNX Runtime on the portable graph, and on the
graph ``sdrt export`` optimizes for the CPU (``model.cpu.onnx``: fused GroupNorm+SiLU in sdrt's
kernels, MultiHeadAttention, Gelu), on its int8 form (``sdrt export --precision int8``:
the image-token MatMuls quantized dynamically) and on its static int8 form (``--precision
int8-static``: convolutions and MatMuls in int8 with activation ranges calibrated beforehand;
both int8 forms run self-attention in sdrt's ``ai.sdrt.Attention``, bf16 products on CPUs with
AVX-512 BF16;
here, with random weights and no generations to record, on unit-normal latents and contexts at
five timesteps at 256x256, not the measured input); and OpenVINO's CPU plugin on the portable graph when
``openvino`` is installed (what CPU users of FastSD run; at its best precision on this CPU).
``--profile`` saves ONNX Runtime's time per op type of the ONNX Runtime graphs.

Seeded random weights (timing needs no trained weights), batch 2 (cond + uncond), 77 text
tokens, fp32. Both peers run in this process with the same thread count, timed by sdrt's one
loop (``sdrt.benchmarks.timing.time_fn``) and written in its record format; the printed ratio is
what to compare across machines. Only the UNet graph is exported (by sdrt's own exporter;
weights over 2 GB go to ``model.onnx_data``). ``sdrt bench`` measures the whole pipeline, each
backend in its own process; this script is the quick UNet-only check.

    python -m benchmarks.bench_unet_step --sizes 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sdrt.benchmarks.fidelity import fidelity
from sdrt.benchmarks.machine import device_info, machine, versions
from sdrt.benchmarks.records import SCHEMA, RecordWriter, utc_now
from sdrt.benchmarks.timing import ort_op_profile, time_fn

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                    help="torch attention: diffusers' default SDPA processor or the classic AttnProcessor")
    ap.add_argument("--workdir", default=None, help="where to write the ONNX graph (default: a temp dir)")
    ap.add_argument("--results", default=str(RESULTS / "unet_step_cpu.jsonl"))
    ap.add_argument("--note", default=None, help="conditions kept with the records (e.g. a shared machine)")
    ap.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True,
                    help="include OpenVINO (when installed) on the portable graph, its best precision here")
    ap.add_argument("--profile", action="store_true",
                    help="also save ONNX Runtime's time per op type for both graphs beside the results")
    args = ap.parse_args(argv)

    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from sdrt.export import passes
    from sdrt.export import quantize as export_precision
    from sdrt.export.configs import sd1_configs
    from sdrt.export.graphs import UNetGraph, example_sizes, export_component
    from sdrt.runtime.backends import Session
    from sdrt.runtime.spec import unet_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd1_configs()["unet"]).eval()
    unet.set_attn_processor(AttnProcessor2_0() if args.attention == "sdpa" else AttnProcessor())
    params = sum(p.numel() for p in unet.parameters())
    print(f"SD 1.5 UNet: {params / 1e6:.0f}M parameters, {args.threads} threads", flush=True)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdrt-bench-"))
    graph = export_component(UNetGraph(unet), unet_spec(4, 4, 768), example_sizes(), work / "unet")
    fused = graph.with_name("model.cpu.onnx")
    report = passes.optimize_file(graph, fused)  # as `sdrt export` does
    print(f"graph passes: {report.summary()}", flush=True)
    int8 = graph.with_name(f"model.{export_precision.INT8_SUFFIX}.onnx")
    quantized = export_precision.quantize_int8(fused, int8)  # as `sdrt export --precision int8` does
    print(f"quantization: {quantized.summary()}", flush=True)
    static = graph.with_name(f"model.{export_precision.INT8_STATIC_SUFFIX}.onnx")
    calibration = [_random_feeds(np.random.default_rng(t), 32, float(t)) for t in (999, 750, 500, 250, 1)]
    quantized_static = export_precision.quantize_int8_static(graph, static, calibration)
    print(f"static quantization: {quantized_static.summary()}", flush=True)
    files = {p.name: p.stat().st_size for p in graph.parent.iterdir()}
    print(f"exported {graph} ({', '.join(f'{k} {v / 2**20:.0f} MB' for k, v in files.items())})", flush=True)
    # One peer loaded at a time (loaded, timed, released): all of them together with torch's
    # model would not fit in this machine's 24 GB at 512x512
    graphs = {"onnxruntime-cpu": graph, "onnxruntime-cpu-fused": fused, "onnxruntime-cpu-int8": int8,
              "onnxruntime-cpu-int8-static": static}
    openvino = _openvino(args.threads) if args.openvino else None
    if args.openvino and openvino is None:
        print("openvino: not installed (pip install openvino), peer left out", flush=True)

    from sdrt.runtime.backends import kernels
    attention = ("ai.sdrt.Attention, bf16 products (AVX-512 BF16)" if kernels.attention_bf16_supported()
                 else "ai.sdrt.Attention, float32 (no AVX-512 BF16 here)")
    writer = RecordWriter(args.results)
    host = machine()
    common = {"schema": SCHEMA, "run": f"unet-step-{utc_now()}", "machine": host,
              "versions": versions(), "conditions": args.note, "device": device_info("cpu", host),
              "precision": "fp32", "measurement": "unet_step", "steps": None, "status": "ok",
              "threads": args.threads, "peak_host_mb": None, "peak_device_mb": None,
              "peak_host_method": "not measured (both peers share one process)"}
    for size in args.sizes:
        feeds = _random_feeds(np.random.default_rng(size), size // 8, 500.0)
        xt, tt, ct = (torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))

        def run_torch():
            with torch.no_grad():
                return unet(xt, tt, ct).sample

        ref = run_torch().numpy()
        t_torch = time_fn(run_torch, repeats=args.repeats)
        torch_name = f"torch-{args.attention}"
        rows = [(torch_name, "torch", t_torch, {"against": f"{torch_name}-fp32", "reference": True}, "fp32")]
        line = [f"{size}x{size}: {torch_name} fp32 {t_torch['median_s']:.2f} s"]
        loaders = {name: (lambda p=p: _ort_peer(Session(p, "cpu", threads=args.threads), feeds))
                   for name, p in graphs.items()}
        if openvino is not None:
            loaders["openvino-cpu"] = lambda: openvino(graph, feeds)
        for name, load in loaders.items():
            run = load()
            ours = run()
            timing = time_fn(run, repeats=args.repeats)
            runtime = "openvino" if name.startswith("openvino") else "sdrt"
            precision = ({"f32": "fp32", "f16": "fp16", "bf16": "bf16"}[openvino.hint] if runtime == "openvino"
                         else "int8" if "-int8" in name else "fp32")
            rows.append((name, runtime, timing, {"against": f"{torch_name}-fp32", **fidelity(ref, ours)},
                         precision))
            line.append(f"{name} {precision} {timing['median_s']:.2f} s "
                        f"({t_torch['median_s'] / timing['median_s']:.2f}x)")
            del run
            gc.collect()
        print(", ".join(line) + " per guided UNet run", flush=True)
        workload = {"name": "sd15-unet-random", "description": "the SD 1.5 UNet alone, seeded random weights",
                    "params": params, "width": size, "height": size, "batch": 2}
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        for name, runtime, timing, fid, precision in rows:
            options = {"attention": args.attention} if runtime == "torch" else {}
            if name.endswith("-fused"):
                options = {"graph": "model.cpu.onnx", "passes": report.counts()}
            if name.endswith("-int8"):
                options = {"graph": int8.name, "passes": report.counts(), "quantized": quantized.counts,
                           "scheme": "dynamic: int8 symmetric per-tensor weights, uint8 per-run activations",
                           "self_attention": attention}
            if name.endswith("-int8-static"):
                options = {"graph": static.name, "quantized": quantized_static.counts,
                           "scheme": "static: int8 symmetric per-channel weights, uint8 activations with ranges "
                                     "calibrated on unit-normal latents and contexts at t = 999, 750, 500, 250, 1",
                           "self_attention": attention}
            if runtime == "openvino":
                options = {"graph": "model.onnx", "openvino": openvino.version, "shapes": "static per size",
                           "precision_hint": openvino.hint, "capabilities": openvino.capabilities}
            writer.write({**common, "date": utc_now(), "workload": workload, "backend": name, "runtime": runtime,
                          "precision": precision, "options": options, "shapes": shapes, "timing": timing, "ms": timing["median_s"] * 1000,
                          "fidelity": fid})
        if args.profile:
            for name, path in graphs.items():
                summary = ort_op_profile(path, feeds, threads=args.threads)
                out = Path(args.results).with_name(f"unet_step_profile_{name}_{size}.json")
                out.write_text(json.dumps({"graph": path.name, "size": size, "threads": args.threads,
                                           "machine": host, "by_op_type": summary}, indent=2) + "\n")
                top = ", ".join(f"{k} {v['share']:.0%}" for k, v in list(summary.items())[:6])
                print(f"  profile {name}: {top} -> {out}", flush=True)
    return 0


def _random_feeds(rng, latent: int, t: float) -> dict[str, np.ndarray]:
    """A guided step's UNet inputs: unit-normal latents and text states, batch 2, timestep ``t``."""
    return {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
            "timestep": np.full((2,), t, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}


def _ort_peer(session, feeds):
    def run():
        return session.run(feeds)["out_sample"]
    return run


def _openvino(threads: int):
    """OpenVINO's CPU plugin as a peer: the portable graph reshaped to each size's static shapes,
    compiled for latency with ``threads`` threads, at its best precision on this CPU (f32 where it
    reports no BF16 / FP16 capability; int8 would need a calibrated, quantized model). Returns a
    factory ``(graph, feeds) -> run`` or None when openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    hint = "bf16" if "BF16" in caps else "f16" if "FP16" in caps else "f32"

    def factory(graph, feeds):
        model = core.read_model(str(graph))
        model.reshape({name: list(v.shape) for name, v in feeds.items()})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()

        def run():
            request.infer(feeds)
            return request.get_output_tensor(0).data.copy()
        return run

    factory.version = ov.__version__
    factory.capabilities = caps
    factory.hint = hint
    return factory


if __name__ == "__main__":
    sys.exit(main())
