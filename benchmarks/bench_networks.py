"""Switching LoRA sets on the full SD 1.5 UNet against loading its session fresh, in one run.

The UNet of the SD 1.5 architecture with seeded random weights is exported as ``sdrt export``
does (portable graph, fused CPU graph, provenance), or ``--bundle`` names an exported bundle.
Two kohya LoRA files (rank ``--rank`` on every attention projection, feed-forward and
``proj_in`` / ``proj_out``, random weights) are written, then timed with sdrt's one loop:

- ``load``: a fresh ONNX Runtime session of the fused CPU graph (the reference);
- ``switch_new``: from one set to another never merged before (the merge plus the session);
- ``switch_cached``: back to the previous set (merged weights cached: the session only);
- ``same_set``: the set in place again (nothing to do).

    python -m benchmarks.bench_networks --threads 2

Records go to ``results/lora_switch_cpu.jsonl`` (``--note`` says what else ran on the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _lora(unet, rank: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if not name.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                              "proj_out")):
            continue
        w = m.weight
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.01
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []),
                                                  generator=g) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def _export(work: Path, tiny: bool):
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.export import passes
    from sdrt.export.configs import sd1_configs
    from sdrt.export.graphs import UNetGraph, example_sizes, export_component, externalize
    from sdrt.export.provenance import write_provenance
    from sdrt.runtime.spec import unet_spec

    torch.manual_seed(0)
    if tiny:
        from sdrt.export.tiny import scaled_sd1_configs

        configs = scaled_sd1_configs()
    else:
        configs = sd1_configs()
    unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
    graph = export_component(UNetGraph(unet), unet_spec(4, 4, configs["unet"]["cross_attention_dim"]),
                             example_sizes(), work / "unet")
    externalize(graph)
    passes.optimize_file(graph, graph.with_name("model.cpu.onnx"))
    write_provenance(work, {"unet": unet}, configs)
    return unet


class _Bundle:
    """What ``Networks`` reads of a bundle: its folder."""

    def __init__(self, path: Path):
        self.path = path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to export the UNet (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="the scaled-down test UNet instead (checks the script)")
    ap.add_argument("--results", default=None,
                    help=f"append the record here (default: {RESULTS / 'lora_switch_cpu.jsonl'}; none with --tiny)")
    ap.add_argument("--note", default="", help="conditions of the run (other load on the machine)")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from sdrt.benchmarks.machine import machine, versions
    from sdrt.benchmarks.records import RecordWriter, utc_now
    from sdrt.benchmarks.timing import time_fn
    from sdrt.runtime.backends import Session
    from sdrt.runtime.networks.apply import Networks

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdrt-bench-networks-"))
    t0 = time.perf_counter()
    unet = _export(work, args.tiny)
    what = "the tiny UNet" if args.tiny else "the SD 1.5 UNet"
    print(f"exported {what} with provenance in {time.perf_counter() - t0:.0f} s", flush=True)
    loras = work / "Lora"
    loras.mkdir(exist_ok=True)
    for i, name in enumerate(("a", "b", "c")):
        save_file({k: v.contiguous() for k, v in _lora(unet, args.rank, i).items()}, str(loras / f"{name}.safetensors"))
    del unet
    graph = work / "unet" / "model.cpu.onnx"

    def fresh():
        s = Session(graph, threads=args.threads)
        s.release()

    results = {"load": time_fn(fresh, warmup=1, repeats=args.repeats)}
    networks = Networks(_Bundle(work), loras)
    session = Session(graph, threads=args.threads)
    sets = iter(["a", "b", "c"] * 4)

    def switch_new():  # a set never merged before: the merge and the session
        networks.activate(f"x <lora:{next(sets)}:0.8>", {"unet": session})

    results["switch_new"] = time_fn(switch_new, warmup=0, repeats=min(args.repeats, 3))
    last = [None]

    def switch_cached():  # back and forth between two cached sets: the session only
        name = "a" if last[0] != "a" else "b"
        last[0] = name
        networks.activate(f"x <lora:{name}:0.8>", {"unet": session})

    networks.activate("x <lora:a:0.8>", {"unet": session})
    networks.activate("x <lora:b:0.8>", {"unet": session})
    last[0] = "b"
    results["switch_cached"] = time_fn(switch_cached, warmup=0, repeats=args.repeats)
    results["same_set"] = time_fn(lambda: networks.activate(f"x <lora:{last[0]}:0.8>", {"unet": session}),
                                  warmup=0, repeats=args.repeats)
    load = results["load"]["median_s"]
    record = {"measurement": "lora_switch", "date": utc_now(), "machine": machine(), "versions": versions(),
              "conditions": args.note, "graph": f"{what}, model.cpu.onnx, fp32", "rank": args.rank,
              "threads": args.threads, "repeats": args.repeats,
              **{k: {"median_s": round(v["median_s"], 3)} for k, v in results.items()},
              # the peer: a fresh session of the same graph, measured in the same run
              "ratio_to_load": {k: round(v["median_s"] / load, 3) for k, v in results.items() if k != "load"}}
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "versions")}, indent=1))
    results_path = args.results or (None if args.tiny else RESULTS / "lora_switch_cpu.jsonl")
    if results_path:
        RecordWriter(results_path).write(record)
        print(f"record appended to {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
