"""One guided UNet step of the full SD 1.5 architecture: ONNX Runtime CPU vs torch eager.

Seeded random weights (timing needs no trained weights), batch 2 (cond + uncond), 77 text
tokens, fp32. Both peers run in this process with the same thread count; the printed ratio
is what to compare across machines. The ONNX graph is exported by sdrt's own exporter
(weights over 2 GB go to ``model.onnx_data``).

    python -m benchmarks.bench_unet_step --sizes 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import record, time_fn, versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to write the ONNX graph (default: a temp dir)")
    ap.add_argument("--results", default="unet_step_cpu.jsonl")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from sdrt.export.configs import sd1_configs
    from sdrt.export.onnx import UNetGraph, export_component, example_sizes
    from diffusers import UNet2DConditionModel
    from sdrt.runtime.sessions import Session
    from sdrt.runtime.spec import unet_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd1_configs()["unet"]).eval()
    params = sum(p.numel() for p in unet.parameters())
    print(f"SD 1.5 UNet: {params / 1e6:.0f}M parameters, {args.threads} threads", flush=True)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdrt-bench-"))
    spec = unet_spec(4, 4, 768)
    graph = export_component(UNetGraph(unet), spec, example_sizes(), work / "unet")
    files = {p.name: p.stat().st_size for p in graph.parent.iterdir()}
    print(f"exported {graph} ({', '.join(f'{k} {v / 2**20:.0f} MB' for k, v in files.items())})", flush=True)
    session = Session(graph, "cpu", threads=args.threads)

    for size in args.sizes:
        lat = size // 8
        rng = np.random.default_rng(size)
        x = rng.standard_normal((2, 4, lat, lat), dtype=np.float32)
        t = np.full((2,), 500.0, np.float32)
        ctx = rng.standard_normal((2, 77, 768), dtype=np.float32)
        feeds = {"sample": x, "timestep": t, "encoder_hidden_states": ctx}
        xt, tt, ct = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

        def run_torch():
            with torch.no_grad():
                return unet(xt, tt, ct).sample

        ours = session.run(feeds)["out_sample"]
        ref = run_torch().numpy()
        max_abs = float(np.abs(ours - ref).max())
        t_ort = time_fn(lambda: session.run(feeds), repeats=args.repeats)
        t_torch = time_fn(run_torch, repeats=args.repeats)
        ratio = t_torch["median_s"] / t_ort["median_s"]
        print(f"{size}x{size}: torch eager fp32 {t_torch['median_s']:.2f} s, onnxruntime cpu fp32 "
              f"{t_ort['median_s']:.2f} s per guided step -> {ratio:.2f}x (max abs diff {max_abs:.2e})", flush=True)
        record(args.results, {
            "benchmark": "unet_guided_step", "model": "sd15-unet-random", "params": params,
            "size": size, "batch": 2, "threads": args.threads, "precision": "fp32",
            "peers": {"torch_eager_fp32": t_torch, "onnxruntime_cpu_fp32": t_ort},
            "ratio_torch_over_ort": ratio, "max_abs_diff": max_abs,
            "versions": {**versions("torch", "onnxruntime", "numpy", "diffusers"), "ort_providers": ort.get_available_providers()},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
