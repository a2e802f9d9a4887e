"""One guided UNet step of the full-size SDXL architecture: sdrt's CPU graph vs torch eager vs OpenVINO.

    python -m benchmarks.bench_sdxl_step --sizes 1024 768 --threads 2
    python -m benchmarks.bench_sdxl_step --tiny      # the scaled-down SDXL config: a rehearsal

The SDXL UNet (2.6 B parameters) is about 10 GB in float32: torch's module, ONNX Runtime's
session and OpenVINO's compiled model do not fit this machine's 24 GB together, so each stage runs
in its own process, one after the other (``--stage``): ``export`` builds the UNet with seeded
random weights (torch's default initialisation, seed 0: ``benchmarks/export_memory.py``'s build)
and exports it with sdrt's exporter (weights in ``model.onnx_data``), then writes the CPU graph
``sdrt export`` writes (``model.cpu.onnx``: GroupNorm+SiLU in sdrt's kernels, MultiHeadAttention,
Gelu); ``torch`` builds the same module again from the same seed and runs it (its output is the
reference); ``sdrt`` runs ``model.cpu.onnx`` in ONNX Runtime with sdrt's kernels; ``openvino``
(when installed: ``pip install ".[bench]"``) compiles the portable graph at its best precision
on this CPU. Each guided step is batch 2 (cond + uncond) with SDXL's added conditioning
(``text_embeds`` [2, 1280], ``time_ids`` [2, 6]) and 77 tokens of 2048-wide text states, unit-normal
inputs at t = 500. Every stage process gets ``oom_score_adj`` 1000, so on a shared machine the
kernel ends the benchmark, not someone else's process; a stage ended that way is recorded as such.

sdrt's int8 graphs are not among the peers: ``--precision auto`` picks them only on CPUs whose int8
products match the measurement (VNNI), and calibrating the full SDXL UNet is its own long run.
The records go to ``benchmarks/results/sdxl_step_cpu.jsonl`` (the one record format), with each
stage's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.benchmarks.fidelity import fidelity
from sdrt.benchmarks.machine import device_info, machine, versions
from sdrt.benchmarks.memory import host_peak_mb
from sdrt.benchmarks.records import SCHEMA, RecordWriter, utc_now
from sdrt.benchmarks.timing import time_fn

RESULTS = Path(__file__).parent / "results"
STAGES = ("export", "torch", "sdrt", "openvino")


def _configs(tiny: bool) -> dict:
    if tiny:
        from sdrt.export.tiny import scaled_sdxl_configs
        return scaled_sdxl_configs()
    from sdrt.export.configs import family_configs
    return family_configs("sdxl")


def _added(configs: dict) -> tuple[int, int]:
    """(pooled width, number of time ids) of the UNet's added conditioning."""
    u = configs["unet"]
    proj = configs["text_encoder_2"]["projection_dim"]
    return proj, (u["projection_class_embeddings_input_dim"] - proj) // u["addition_time_embed_dim"]


def _feeds(configs: dict, size: int) -> dict[str, np.ndarray]:
    u = configs["unet"]
    pooled, ids = _added(configs)
    rng = np.random.default_rng(size)
    latent = size // 8
    return {"sample": rng.standard_normal((2, u["in_channels"], latent, latent), dtype=np.float32),
            "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, u["cross_attention_dim"]), dtype=np.float32),
            "text_embeds": rng.standard_normal((2, pooled), dtype=np.float32),
            "time_ids": np.tile(np.array([size, size, 0, 0, size, size], np.float32)[:ids], (2, 1))}


def _build(configs: dict):
    """The UNet with seeded random weights (seed 0), as export_memory builds it."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    public = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    with torch.no_grad():
        return UNet2DConditionModel(**public).eval()


# --- the stages (each in its own process) -------------------------------------------------------

def _stage_export(args, configs: dict) -> dict:
    from sdrt.export import graphs, passes
    from sdrt.runtime import spec as specs

    t0 = time.perf_counter()
    unet = _build(configs)
    params = sum(p.numel() for p in unet.parameters())
    u = configs["unet"]
    spec = specs.unet_spec(u["in_channels"], u["out_channels"], u["cross_attention_dim"], added=_added(configs))
    graph = graphs.export_component(graphs.UNetAddedGraph(unet), spec, graphs.example_sizes(), args.work / "unet")
    del unet
    report = passes.optimize_file(graph, graph.with_name("model.cpu.onnx"))
    return {"params": params, "seconds": time.perf_counter() - t0, "passes": report.counts(),
            "on_disk_mb": sum(p.stat().st_size for p in graph.parent.iterdir()) / 2**20}


def _stage_torch(args, configs: dict) -> dict:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.set_num_threads(args.threads)
    unet = _build(configs)
    unet.set_attn_processor(AttnProcessor2_0())
    out = {}
    for size in args.sizes:
        f = {k: torch.from_numpy(v) for k, v in _feeds(configs, size).items()}

        def run():
            with torch.no_grad():
                return unet(f["sample"], f["timestep"], f["encoder_hidden_states"],
                            added_cond_kwargs={"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}).sample

        np.save(args.work / f"torch-{size}.npy", run().numpy())
        out[size] = time_fn(run, warmup=0, repeats=args.repeats)  # the reference run above was the warm-up
    return {"timings": out, "options": {"attention": "sdpa"}}


def _stage_sdrt(args, configs: dict) -> dict:
    from sdrt.runtime.backends import Session

    session = Session(args.work / "unet" / "model.cpu.onnx", "cpu", threads=args.threads)
    out = {}
    for size in args.sizes:
        feeds = _feeds(configs, size)
        np.save(args.work / f"sdrt-{size}.npy", session.run(feeds)["out_sample"])
        out[size] = time_fn(lambda: session.run(feeds), warmup=0, repeats=args.repeats)
    return {"timings": out, "options": {"graph": "model.cpu.onnx", "precision": "fp32"}}


def _stage_openvino(args, configs: dict) -> dict:
    import openvino as ov

    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    hint = "bf16" if "BF16" in caps else "f16" if "FP16" in caps else "f32"
    out = {}
    for size in args.sizes:
        feeds = _feeds(configs, size)
        model = core.read_model(str(args.work / "unet" / "model.onnx"))
        model.reshape({name: list(v.shape) for name, v in feeds.items()})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_NUM_THREADS": args.threads})
        del model
        request = compiled.create_infer_request()

        def run():
            request.infer(feeds)
            return request.get_output_tensor(0).data.copy()

        np.save(args.work / f"openvino-{size}.npy", run())
        out[size] = time_fn(run, warmup=0, repeats=args.repeats)
        del request, compiled
    return {"timings": out, "options": {"graph": "model.onnx", "openvino": ov.__version__, "precision_hint": hint,
                                        "capabilities": caps, "shapes": "static per size"}}


def _child(args) -> int:
    with open("/proc/self/oom_score_adj", "w") as f:  # the kernel's first choice when memory runs out
        f.write("1000")
    configs = _configs(args.tiny)
    result = {"export": _stage_export, "torch": _stage_torch, "sdrt": _stage_sdrt,
              "openvino": _stage_openvino}[args.stage](args, configs)
    result["peak_rss_mb"] = host_peak_mb()
    (args.work / f"{args.stage}.json").write_text(json.dumps(result))
    return 0


# --- the parent ----------------------------------------------------------------------------------

def _run_stage(args, stage: str) -> dict | str:
    """A stage's result, or why it has none (one line)."""
    cmd = [sys.executable, "-m", "sdrt.benchmarks.bench_sdxl_step", "--stage", stage, "--work", str(args.work),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes),
           *(["--tiny"] if args.tiny else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode == -signal.SIGKILL:
        return f"{stage}: ended by the kernel after {wall:.0f} s (out of memory)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{stage}: exit {proc.returncode}: {last}"
    return json.loads((args.work / f"{stage}.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 768])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per size after the untimed first one")
    ap.add_argument("--tiny", action="store_true", help="the scaled-down SDXL config (a rehearsal of the script)")
    ap.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--work", type=Path, default=None, help="where the graph and outputs go (default: a temp dir)")
    ap.add_argument("--results", default=str(RESULTS / "sdxl_step_cpu.jsonl"))
    ap.add_argument("--note", default=None, help="conditions kept with the records (e.g. a shared machine)")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        return _child(args)

    args.work = args.work or Path(tempfile.mkdtemp(prefix="sdrt-sdxl-step-"))
    stages = [s for s in STAGES if s != "openvino" or args.openvino]
    if args.openvino:
        try:
            import openvino  # noqa: F401 - only whether it is there
        except ImportError:
            print("openvino: not installed (pip install openvino), peer left out", flush=True)
            stages.remove("openvino")
    results = {}
    for stage in stages:
        r = _run_stage(args, stage)
        print(f"{stage}: {r if isinstance(r, str) else 'done'}", flush=True)
        if isinstance(r, str) and stage in ("export", "torch"):
            return 1
        results[stage] = r

    export = results["export"]
    host = machine()
    writer = RecordWriter(args.results)
    workload = {"name": "sdxl-unet-tiny-random" if args.tiny else "sdxl-unet-random",
                "description": "the SDXL UNet alone, seeded random weights", "params": export["params"], "batch": 2}
    common = {"schema": SCHEMA, "run": f"sdxl-step-{utc_now()}", "machine": host, "versions": versions(),
              "conditions": args.note, "device": device_info("cpu", host), "measurement": "unet_step",
              "steps": None, "threads": args.threads, "peak_device_mb": None,
              "peak_host_method": "VmHWM of the peer's own process (it loads only that peer)",
              "export": {"seconds": export["seconds"], "peak_rss_mb": export["peak_rss_mb"],
                         "on_disk_mb": export["on_disk_mb"], "passes": export["passes"]}}
    runtimes = {"torch": ("torch-sdpa", "torch", "fp32"), "sdrt": ("onnxruntime-cpu-fused", "sdrt", "fp32"),
                "openvino": ("openvino-cpu", "openvino", None)}
    for size in args.sizes:
        ref = np.load(args.work / f"torch-{size}.npy")
        t_torch = results["torch"]["timings"][str(size)]["median_s"]
        line = [f"{size}x{size}: torch-sdpa fp32 {t_torch:.1f} s"]
        for stage in ("torch", "sdrt", "openvino"):
            name, runtime, precision = runtimes[stage]
            r = results.get(stage)
            if r is None:
                continue
            entry = {**common, "date": utc_now(), "workload": {**workload, "width": size, "height": size},
                     "backend": name, "runtime": runtime}
            if isinstance(r, str):
                writer.write({**entry, "status": "failed", "error": r, "precision": precision})
                line.append(r)
                continue
            timing = r["timings"][str(size)]
            precision = precision or {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}[r["options"]["precision_hint"]]
            fid = ({"against": "torch-sdpa-fp32", "reference": True} if stage == "torch" else
                   {"against": "torch-sdpa-fp32", **fidelity(ref, np.load(args.work / f"{stage}-{size}.npy"))})
            writer.write({**entry, "status": "ok", "precision": precision, "options": r["options"],
                          "timing": timing, "ms": timing["median_s"] * 1000, "fidelity": fid,
                          "peak_host_mb": r["peak_rss_mb"]})
            if stage != "torch":
                line.append(f"{name} {precision} {timing['median_s']:.1f} s ({t_torch / timing['median_s']:.2f}x, "
                            f"{fid['psnr'] or float('inf'):.1f} dB)")
        print(", ".join(line) + " per guided UNet run", flush=True)
    print(f"export: {export['seconds']:.0f} s, peak RSS {export['peak_rss_mb']:.0f} MB; records: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
