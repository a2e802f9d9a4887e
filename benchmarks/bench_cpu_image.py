"""The whole CPU image: sdrt at each precision against OpenVINO and torch eager, in one process.

Every path draws the same request (prompt, seed 1, Euler a, CFG 7) from the same weights:

- ``sdrt-<precision>``: sdrt's pipeline on the bundle's CPU graphs at ``fp32``, ``int8``,
  ``int8-static`` and ``mixed`` (those the bundle has); ``sdrt-auto`` is the one ``--precision auto``
  picks on this CPU, recorded under its own name with what it resolved to;
- ``openvino-bf16`` / ``openvino-f32``: the same sdrt pipeline (tokenizer, prompt, noise, sampler,
  CFG arithmetic) with its three components' portable ONNX graphs run in OpenVINO's CPU plugin at
  that inference precision (each graph compiled once per input shape, static), so only the
  components' compute differs from sdrt's;
- ``torch-eager``: diffusers / transformers modules from the checkpoint, classic attention, fp32
  (``sdrt bench``'s torch peer): the reference each path's fidelity is measured against (PSNR of
  the 8-bit image; of the raw outputs per component).

Measured per path: ``end_to_end`` at each ``--steps`` and ``--sizes`` (text encoder, sampling,
VAE decode; load excluded) and its components ``text_encoder``, ``unet_step`` (one guided step),
``vae_decode``, with ``sdrt bench``'s measurement code (``sdrt.benchmarks.worker.measure``).
Interleaved rounds: every round loads each path in turn, warms it up, measures it once and frees
it (the machine's memory holds one SD 1.5 path at a time); the record's median is over rounds,
and ratios are against peers of the same run. Records in ``results/cpu_image.jsonl``.

    sdrt export sd15.safetensors bundles/sd15 --precision mixed     # int8, int8-static, mixed
    python -m benchmarks.bench_cpu_image --bundle bundles/sd15 --checkpoint sd15.safetensors

Without ``--bundle`` the full-size SD 1.5 architecture with seeded random weights is built and
exported with ``--precision mixed`` into ``--workdir`` (what random weights mean for the figures:
docs/OPTIMIZATION.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from sdrt.benchmarks.fidelity import fidelity
from sdrt.benchmarks.machine import device_info, machine, versions
from sdrt.benchmarks.records import SCHEMA, RecordWriter, utc_now
from sdrt.benchmarks.worker import component_inputs, measure

RESULTS = Path(__file__).parent / "results"
COMPONENTS = ("text_encoder", "unet_step", "vae_decode")


class OpenVinoBackend:
    """A component's portable graph in OpenVINO's CPU plugin, behind the runtime's backend calls
    (``run``, ``inputs``, ``outputs``, ``input_dtype``): compiled per input shapes (static), at
    ``hint`` (``bf16`` / ``f32``). ``meta`` (a lazy ONNX Runtime backend of the same graph, never
    loaded) answers the questions about the inputs."""

    def __init__(self, core, meta, hint: str, threads: int):
        self.core, self.meta, self.hint, self.threads = core, meta, hint, threads
        self.path, self.device = meta.path, "cpu"
        self._model = None
        self._compiled: dict[tuple, object] = {}

    def __getattr__(self, name):  # inputs, outputs, input_dtype, typed, ...
        return getattr(self.meta, name)

    @property
    def loaded(self) -> bool:
        return bool(self._compiled)

    def load(self) -> None:
        pass

    def release(self) -> None:
        self._compiled.clear()

    def run(self, feeds, outputs=None):
        feeds = self.meta.typed(feeds)
        key = tuple((k, v.shape) for k, v in sorted(feeds.items()))
        request = self._compiled.get(key)
        if request is None:
            if self._model is None:
                self._model = self.core.read_model(str(self.path))
            model = self._model.clone()
            model.reshape({k: list(v.shape) for k, v in feeds.items()})
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.hint,
                                                              "PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_NUM_THREADS": self.threads})
            request = self._compiled[key] = compiled.create_infer_request()
        request.infer(feeds)
        names = outputs or self.meta.outputs
        ports = {o.get_any_name(): o for o in request.model_outputs}
        return {n: request.get_tensor(ports[n]).data.copy() for n in names}


def _sdrt_peer(bundle: Path, precision: str):
    from sdrt.benchmarks.runtime_peer import RuntimePeer

    return RuntimePeer({"bundle": str(bundle), "device": "cpu", "options": {}, "precision": precision})


def _openvino_peer(bundle: Path, hint: str, threads: int):
    """sdrt's fp32 pipeline with its text encoder, UNet and VAE decoder in OpenVINO."""
    import openvino as ov

    from sdrt.runtime.backends import open_component

    peer = _sdrt_peer(bundle, "fp32")
    pipe, core = peer.pipe, ov.Core()

    def backend(name):
        meta = open_component(pipe.bundle, name, "cpu", lazy=True, graph=pipe.bundle.component(name))
        return OpenVinoBackend(core, meta, hint, threads)

    pipe.text_encoder.session = backend("text_encoder")
    pipe.denoiser.unet = backend("unet")
    pipe.vae_decoder = backend("vae_decoder")
    return peer


def _torch_peer(bundle: Path, checkpoint: Path):
    from sdrt.benchmarks.workloads import TorchPeer

    return TorchPeer({"bundle": str(bundle), "checkpoint": str(checkpoint), "device": "cpu",
                      "options": {"attention": "eager"}, "precision": "fp32"})


def _random_bundle(workdir: Path) -> tuple[Path, Path]:
    """(bundle, checkpoint): full-size SD 1.5 with seeded random weights, exported with mixed."""
    from sdrt.benchmarks.workloads import random_workload
    from sdrt.export.write import export_checkpoint

    checkpoint, _ = random_workload("sd15-random", workdir / "checkpoints")
    bundle = workdir / f"{checkpoint.stem}-mixed"
    if not (bundle / "sdrt.json").exists():
        export_checkpoint(checkpoint, bundle, precisions=("fp32", "mixed"))
    return bundle, checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="an sdrt bundle exported with --precision mixed")
    ap.add_argument("--checkpoint", default=None, help="the checkpoint it was exported from (torch's weights)")
    ap.add_argument("--workload", default=None, help="the workload's name in the records (default: the bundle's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 20])
    ap.add_argument("--skip", nargs="*", default=[], metavar="SIZExSTEPS",
                    help="size/steps pairs left out, e.g. 512x20 (slow on 2 cores)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", nargs="*", default=None, help="only these paths (default: all that run here)")
    ap.add_argument("--components", action=argparse.BooleanOptionalAction, default=True,
                    help="also time text encoder, UNet step and VAE decode (at each size's first steps count)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default=str(RESULTS / "cpu_image.jsonl"))
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--note", default=None, help="conditions kept with the records (e.g. a shared machine)")
    args = ap.parse_args(argv)

    os.environ["SDRT_THREADS"] = str(args.threads)  # sdrt's sessions and the torch peer read it
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.precision import describe, resolve_precision

    if args.bundle is None:
        bundle, checkpoint = _random_bundle(Path(args.workdir or tempfile.mkdtemp(prefix="sdrt-bench-")))
    else:
        bundle, checkpoint = Path(args.bundle), Path(args.checkpoint) if args.checkpoint else None
    b = open_bundle(bundle)
    auto = resolve_precision(b, "cpu", "auto")
    peers = {"torch-eager": (lambda: _torch_peer(bundle, checkpoint)) if checkpoint else None}
    for p in ("fp32", "int8", "int8-static", "mixed"):
        if p == "fp32" or p in b.precisions("cpu"):
            peers[f"sdrt-{p}"] = lambda p=p: _sdrt_peer(bundle, p)
    try:
        import openvino  # noqa: F401

        peers["openvino-bf16"] = lambda: _openvino_peer(bundle, "bf16", args.threads)
        peers["openvino-f32"] = lambda: _openvino_peer(bundle, "f32", args.threads)
    except ImportError:
        print("openvino: not installed (pip install openvino), peers left out", flush=True)
    peers = {k: v for k, v in peers.items() if v is not None and (args.paths is None or k in args.paths)}
    print(f"{b.name}: auto on this CPU = {describe(b, 'cpu', auto)}; paths {', '.join(peers)}", flush=True)

    settings = {"prompt": args.prompt, "negative_prompt": "", "sampler": "Euler a", "cfg_scale": 7.0, "seed": 1,
                "warmup": 0, "repeats": 1}
    tasks = []  # (size, measurement, steps)
    for size in args.sizes:
        for k, steps in enumerate(args.steps):
            if f"{size}x{steps}" not in args.skip:
                tasks.append((size, "end_to_end", steps))
                if k == 0 and args.components:
                    tasks += [(size, m, None) for m in COMPONENTS]
    times: dict[tuple, list[float]] = {}
    outputs: dict[tuple, np.ndarray] = {}
    extra: dict[tuple, dict] = {}
    sampling: dict[tuple, list[float]] = {}  # end to end: the sampling loop's own seconds
    for r in range(args.rounds):
        for name, load in peers.items():
            peer = load()
            for size in args.sizes:
                job = {"settings": settings, "width": size, "height": size}
                inputs = component_inputs(b, size, size, seed=size)
                # warm-up: a one-step image compiles and sizes every component's shapes (OpenVINO's
                # static graphs, ONNX Runtime's and torch's allocators); its time is left out
                measure(peer, {"measurement": "end_to_end", "steps": 1}, job, inputs)
                for tsize, m, steps in tasks:
                    if tsize != size:
                        continue
                    rec, out = measure(peer, {"measurement": m, "steps": steps}, job, inputs)
                    key = (name, size, m, steps)
                    times.setdefault(key, []).append(rec["timing"]["median_s"])
                    if "sampling_s" in rec:
                        sampling.setdefault(key, []).append(rec["sampling_s"])
                    outputs[key] = out
                    extra[key] = {k: rec[k] for k in ("shapes", "peak_host_mb", "peak_host_method")}
                    print(f"round {r + 1} {name} {size}x{size} {m}{f' {steps} steps' if steps else ''}: "
                          f"{rec['timing']['median_s']:.2f} s", flush=True)
            del peer
            gc.collect()

    host = machine()
    run = f"cpu-image-{utc_now()}"
    common = {"schema": SCHEMA, "run": run, "machine": host, "versions": versions(), "conditions": args.note,
              "device": device_info("cpu", host), "threads": args.threads, "status": "ok",
              "peak_device_mb": None, "peak_device_method": None}
    workload = {"name": args.workload or b.name, "bundle": str(bundle), "auto": auto,
                "auto_components": b.mixed_components("cpu") if auto == "mixed" else None,
                "prompt": args.prompt, "sampler": "Euler a", "cfg_scale": 7.0, "seed": 1}
    writer = RecordWriter(args.results)
    reference = "torch-eager" if "torch-eager" in peers else "sdrt-fp32"
    for (name, size, m, steps), ts in times.items():
        median = statistics.median(ts)
        ref_key = (reference, size, m, steps)
        peak = 255.0 if m == "end_to_end" else 1.0 if m == "vae_decode" else None
        out = outputs[(name, size, m, steps)]
        if m == "end_to_end":  # the 8-bit images, as the PNG holds them
            out = np.round(np.clip(out, 0, 1) * 255)
            ref = np.round(np.clip(outputs[ref_key], 0, 1) * 255)
        else:
            ref = outputs[ref_key]
        fid = {"against": reference if reference.startswith("sdrt") else f"{reference}-fp32", **fidelity(ref, out, peak)}
        ratios = {p: statistics.median(times[(p, size, m, steps)]) / median
                  for p in peers if (p, size, m, steps) in times and p != name}
        runtime = name.split("-")[0]
        precision = name.split("-", 1)[1] if runtime != "torch" else "fp32"
        options = {"graphs": "portable model.onnx", "inference_precision_hint": precision} if runtime == "openvino" \
            else {"attention": "eager"} if runtime == "torch" else {"precision": precision}
        if runtime == "sdrt" and precision == "mixed":
            options["components"] = b.mixed_components("cpu")
        record = {**common, "date": utc_now(), "workload": {**workload, "width": size, "height": size},
                  "backend": name, "runtime": runtime, "precision": precision, "options": options,
                  "measurement": m, "steps": steps, **extra[(name, size, m, steps)],
                  "timing": {"median_s": median, "rounds": ts}, "ms": median * 1000, "fidelity": fid,
                  "speedup_over": ratios}
        if m == "end_to_end":
            record["s_per_image"] = median
            record["sampling_s"] = statistics.median(sampling[(name, size, m, steps)])
            record["it_s"] = steps / record["sampling_s"]
        writer.write(record)
        if name == f"sdrt-{auto}":
            writer.write({**record, "backend": "sdrt-auto", "options": {**options, "auto": auto}})
    # the summary: seconds per image and ratios against OpenVINO bf16 and torch
    for size in args.sizes:
        for steps in args.steps:
            row = {name: statistics.median(times[(name, size, "end_to_end", steps)])
                   for name in peers if (name, size, "end_to_end", steps) in times}
            if row:
                line = ", ".join(f"{k} {v:.2f} s" for k, v in row.items())
                ours = row.get(f"sdrt-{auto}")
                # OpenVINO's fastest precision on this CPU (bf16 where it has AVX-512 BF16 / AMX)
                ov = min((k for k in row if k.startswith("openvino")), key=row.get, default=None)
                vs = f"; auto ({auto}) {row[ov] / ours:.2f}x {ov}" if ours and ov else ""
                print(f"{size}x{size} {steps} steps: {line}{vs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
