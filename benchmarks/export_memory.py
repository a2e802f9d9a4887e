"""Peak resident memory of exporting a full-size architecture with seeded random weights.

    python -m benchmarks.export_memory --family sdxl --component unet --out /tmp/xl --guard-gb 15

Builds the family's shipped configs' modules (``sdrt.export.tiny.random_modules``, seed 0,
float32), then exports one component's graph (``--component``) or the whole bundle
(``--component all``, ``export_modules``) and records the process's peak RSS (VmHWM) after the
build and after the export, with the wall time, in ``benchmarks/results/export_memory.jsonl``.
A guard thread ends the process (exit 3, a record saying so) when its RSS passes ``--guard-gb`` or
the machine's available memory falls under 1.5 GB, so a measurement on a shared machine does not
take the memory other processes need.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

from sdrt.benchmarks.machine import machine
from sdrt.benchmarks.memory import host_peak_mb

RESULTS = Path(__file__).resolve().parent / "results" / "export_memory.jsonl"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _available_mb() -> float:
    """The machine's MemAvailable (MB): what other processes still have."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _record(entry: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _guard(limit_mb: float, entry: dict, stage: dict, reserve_mb: float = 1536) -> None:
    """End the process when its RSS passes ``limit_mb`` or the machine has under ``reserve_mb`` left."""
    def watch():
        while True:
            rss = _rss_mb()
            if rss > limit_mb or _available_mb() < reserve_mb:
                _record({**entry, "stage": stage["name"], "guard_tripped_mb": round(rss),
                         "peak_rss_mb": round(host_peak_mb() or rss), "seconds": round(time.time() - stage["t0"], 1)})
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def _build(configs: dict, component: str):
    """One component's module at full size with seeded (torch's default) initialisation, float32."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    public = {k: v for k, v in configs[component].items() if not k.startswith("_")}
    with torch.no_grad():
        if component == "unet":
            return UNet2DConditionModel(**public).eval()
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**public)).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sdxl")
    ap.add_argument("--component", default="unet", help="unet, text_encoder, text_encoder_2 or all")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--guard-gb", type=float, default=15.0)
    ap.add_argument("--keep", action="store_true", help="keep the exported files")
    args = ap.parse_args(argv)

    import torch

    from sdrt.export import graphs
    from sdrt.export.configs import family_configs
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import export_modules
    from sdrt.runtime import spec as specs

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    entry = {"family": args.family, "component": args.component, "machine": machine(), "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "guard_mb": args.guard_gb * 1024}
    stage = {"name": "build", "t0": time.time()}
    _guard(args.guard_gb * 1024, entry, stage)
    configs = family_configs(args.family)
    if args.component == "all":
        with torch.no_grad():
            modules = dict(zip(("unet", "vae", "text_encoder", "text_encoder_2"), random_modules(configs, seed=0)))
    else:  # only the measured component's module (seeded as random_modules seeds them)
        modules = {args.component: _build(configs, args.component)}
    entry["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items() if m is not None}
    entry["built_rss_mb"] = round(_rss_mb())
    entry["build_seconds"] = round(time.time() - stage["t0"], 1)
    stage.update(name="export", t0=time.time())
    shutil.rmtree(args.out, ignore_errors=True)
    if args.component == "all":
        export_modules(modules["unet"], modules["vae"], modules["text_encoder"], configs, args.out,
                       text_encoder_2=modules.get("text_encoder_2"), optimize=False,
                       source={"name": f"random-{args.family}", "kind": "random", "sha256": None, "hash": None})
    else:
        module = modules.pop(args.component)
        if args.component == "unet":
            uconf = configs["unet"]
            added = None
            if uconf.get("addition_embed_type") == "text_time":
                proj = configs["text_encoder_2"]["projection_dim"]
                ids = (uconf["projection_class_embeddings_input_dim"] - proj) // uconf["addition_time_embed_dim"]
                added = (proj, ids)
            graph = graphs.UNetAddedGraph(module) if added else graphs.UNetGraph(module)
            spec = specs.unet_spec(uconf["in_channels"], uconf["out_channels"], uconf["cross_attention_dim"],
                                   added=added)
        else:
            conf = configs[args.component]
            graph = graphs.TextEncoderGraph(module, raw_states=True)
            spec = specs.text_encoder_spec(conf["hidden_size"], conf["num_hidden_layers"], name=args.component,
                                           raw_states=True)
        del module
        graphs.export_component(graph, spec, graphs.example_sizes(), args.out / args.component)
    entry["export_seconds"] = round(time.time() - stage["t0"], 1)
    entry["peak_rss_mb"] = round(host_peak_mb() or 0)
    entry["on_disk_mb"] = round(sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20)
    _record(entry)
    print(json.dumps(entry))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
