"""``sdrt bench``: workloads and settings, and the run that measures every workload on every backend.

The pieces it puts together, one concern a module (all under ``sdrt.benchmarks``):

- ``timing``: the one timing loop (warm-up calls, device sync before each clock start and stop,
  ``perf_counter``, median) and ONNX Runtime's time per op type;
- ``machine``: the CPU (model, cores, instruction set), memory, GPUs and library versions, and the
  identity under which the report groups a device's records;
- ``memory``: the worker's peak host memory (VmHWM, reset per measurement) and GPU memory;
- ``records``: the record format (``sdrt-bench/1``), written one complete line per ``os.write``;
- ``backends``: the ONNX Runtime providers, TensorRT and torch peers, runnable here or not and why;
- ``worker``: the worker-process protocol (each backend in a fresh process) and the measurements;
  ``runtime_peer`` and ``workloads`` are the sdrt and torch workers;
- ``fidelity``: each backend's outputs against the run's reference backend's;
- ``report`` and ``charts``: REPORT.md's tables and its images.

The CLI's names (``backends``, ``select_backends``, ``RecordWriter``, ``read_records``,
``render_markdown``, ``write_report``, ``device_slug``) and ``RuntimePeer`` are importable from here too.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sdrt.benchmarks.backends import Backend, backends, select_backends
from sdrt.benchmarks.fidelity import REFERENCES, Comparison
from sdrt.benchmarks.machine import device_info, device_slug, machine, versions
from sdrt.benchmarks.records import COMPONENTS, END_TO_END, MEASUREMENTS, SCHEMA, RecordWriter, read_records, utc_now
from sdrt.benchmarks.report import render_markdown, write_report
from sdrt.benchmarks.runtime_peer import RuntimePeer
from sdrt.benchmarks.worker import backend_records
from sdrt.runtime.errors import SdrtError

__all__ = ["WORKLOADS", "BenchSettings", "Progress", "Workload", "parse_list", "resolve_workloads", "run_bench",
           "Backend", "backends", "select_backends", "RecordWriter", "read_records", "render_markdown",
           "write_report", "device_slug", "RuntimePeer"]

# progress(event): {"event": "start" | "record", "done": k, "total": n, "label": str, "record": dict}
Progress = Callable[[dict], None]

WORKLOADS = {
    "sd15-random": "the SD 1.5 architecture with seeded random weights",
    "tiny-random": "the SD 1.x architecture at toy widths with seeded random weights",
    "embedded": "the embedded default model",
}


@dataclass
class Workload:
    """A bundle to measure, with the checkpoint it was exported from (for the torch peers)."""

    name: str
    bundle: Path
    checkpoint: Path | None = None
    size: tuple[int, int] | None = None  # (width, height); None: the bundle's default
    description: str = ""


@dataclass
class BenchSettings:
    measure: tuple[str, ...] = MEASUREMENTS
    steps: tuple[int, ...] = (20, 50)
    repeats: int = 3
    warmup: int = 1
    e2e_repeats: int | None = None  # None: as ``repeats``
    e2e_warmup: int | None = None   # None: as ``warmup``
    threads: int = 0                # 0: each library's default
    prompt: str = "a red circle on a blue background"
    negative_prompt: str = ""
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = 1
    note: str | None = None         # conditions worth knowing (a shared machine, niceness): each record's "conditions"

    def tasks(self) -> list[dict]:
        unknown = [m for m in self.measure if m not in MEASUREMENTS]
        if unknown:
            raise SdrtError(f"unknown measurement {unknown[0]!r}; valid measurements: {', '.join(MEASUREMENTS)}")
        tasks = [{"measurement": m} for m in COMPONENTS if m in self.measure]
        if END_TO_END in self.measure:
            if any(s < 1 for s in self.steps) or not self.steps:
                raise SdrtError("end-to-end step counts must be at least 1")
            tasks += [{"measurement": END_TO_END, "steps": s} for s in self.steps]
        if not tasks:
            raise SdrtError("nothing to measure")
        return tasks

    def worker_json(self) -> dict:
        """What a worker needs of the settings."""
        return {k: getattr(self, k) for k in ("repeats", "warmup", "e2e_repeats", "e2e_warmup", "threads", "prompt",
                                              "negative_prompt", "sampler", "cfg_scale", "seed")}


def parse_list(text: str | None, convert: Callable = str) -> list:
    """``"20,50"`` or ``"20 50"`` -> [20, 50]; one-line SdrtError for a bad item."""
    items = [t for t in re.split(r"[,\s]+", text or "") if t]
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise SdrtError(f"cannot read {text!r} as a list of {convert.__name__} values") from None


def run_bench(workloads: list[Workload], chosen: list[Backend], settings: BenchSettings, writer: RecordWriter, *,
              progress: Progress | None = None) -> list[dict]:
    """Measure every workload on every backend, appending each finished record to ``writer``.

    Runnable backends each get a fresh worker process; the reference backend runs first so the
    others' outputs can be compared with it as their records are written. Unavailable and skipped
    backends get one record saying why. A KeyboardInterrupt (or any exception, also from
    ``progress``) stops the worker and propagates; the records written so far stay.
    """
    from sdrt.runtime import sampling

    tasks = settings.tasks()
    sampling.resolve(settings.sampler)
    host = machine()
    common = {"schema": SCHEMA, "run": f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}",
              "machine": host, "versions": versions(), "conditions": settings.note}
    runnable = {b.key for b in chosen if b.status == "ok"}
    reference = next((k for k in REFERENCES if k in runnable), None)
    ordered = sorted(chosen, key=lambda b: b.key != reference)
    total = len(workloads) * sum(len(tasks) if b.status == "ok" else 1 for b in ordered)
    done = 0
    written = []

    def emit(rec: dict, label: str):
        nonlocal done
        rec = writer.write(rec)
        written.append(rec)
        done += 1
        if progress:
            progress({"event": "record", "done": done, "total": total, "label": label, "record": rec})

    def progress_start(label: str):
        if progress:
            progress({"event": "start", "done": done, "total": total, "label": label})

    with tempfile.TemporaryDirectory(prefix="sdrt-bench-") as tmp:
        for w in workloads:
            width, height = _size(w)
            comparison = Comparison(reference)
            for b in ordered:
                base = {**common, "workload": _describe(w, width, height), "backend": b.name,
                        "precision": b.precision, "runtime": b.runtime, "options": b.options,
                        "device": device_info(b.device, host), "threads": settings.threads or None,
                        "sampler": settings.sampler, "cfg_scale": settings.cfg_scale, "seed": settings.seed}
                why = b.note if b.status != "ok" else None
                if why is None and b.runtime == "torch" and w.checkpoint is None:
                    why = "no source checkpoint for the torch peers (pass --reference)"
                if why:  # one record saying why, on the machine's main device
                    emit({**base, "date": utc_now(), "device": device_info("cuda" if host["gpus"] else "cpu", host),
                          "measurement": None, "status": "skipped" if b.status == "ok" else b.status, "note": why},
                         f"{w.name} {b.key}")
                    continue
                job = {"bundle": str(w.bundle), "checkpoint": str(w.checkpoint) if w.checkpoint else None,
                       "device": b.device, "options": b.options, "precision": b.precision, "width": width,
                       "height": height, "tasks": tasks, "settings": settings.worker_json(), "outdir": tmp,
                       "tag": f"{w.name}-{b.key}"}
                for label, rec in backend_records(b.worker, job, settings.threads, progress_start):
                    if rec.get("status") == "ok":
                        rec["fidelity"] = comparison.record(b.key, label, rec["measurement"], rec.pop("output"))
                    emit({**base, "date": utc_now(), **rec}, f"{w.name} {b.key} {label}")
    return written


def _size(w: Workload) -> tuple[int, int]:
    if w.size:
        return w.size
    from sdrt.runtime.bundle import open_bundle

    return open_bundle(w.bundle).default_size


def _describe(w: Workload, width: int, height: int) -> dict:
    from sdrt.runtime.bundle import open_bundle

    b = open_bundle(w.bundle)
    return {"name": w.name, "description": w.description, "model": b.name, "model_hash": b.model_hash,
            "architecture": b.architecture, "width": width, "height": height, "batch": 1}


def resolve_workloads(names: Iterable[str], models: Iterable[str] = (), references: Iterable[str] = (), *,
                      size: int | None = None, cache: Path | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Workload], list[str]]:
    """The workloads to run and notes on those that cannot run here. Random-weight workloads are
    built, saved as checkpoints and exported once into the cache (this needs the export extra)."""
    from sdrt.models import CHECKPOINT_SUFFIXES, cache_dir, default_model_path, is_bundle, resolve_model

    out, notes = [], []
    wh = (size, size) if size else None
    for name in names:
        if name not in WORKLOADS:
            raise SdrtError(f"unknown workload {name!r}; valid workloads: {', '.join(WORKLOADS)}")
        if name == "embedded":
            path = default_model_path()
            if is_bundle(path):
                out.append(Workload(name, path, None, wh, WORKLOADS[name]))
            else:
                notes.append(f"the embedded model is not in this installation ({path}): workload skipped")
            continue
        try:
            from sdrt.benchmarks.workloads import random_workload
        except ImportError as e:
            raise SdrtError(f"the {name} workload builds a model with random weights, which needs the export "
                            f"extra (missing {e.name}): pip install 'sdrt[export]'") from None
        ckpt, bundle = random_workload(name, cache or cache_dir() / "bench", progress=progress)
        default = (512, 512) if name == "sd15-random" else None
        out.append(Workload(name, bundle, ckpt, wh or default, WORKLOADS[name]))
    models, references = list(models), list(references)
    if len(references) > len(models):
        raise SdrtError("more --reference checkpoints than --model entries")
    for i, model in enumerate(models):
        bundle = resolve_model(model, progress=progress)
        ref = references[i] if i < len(references) else None
        src = Path(model)
        if ref is None and not is_bundle(src) and (src.is_dir() or src.suffix.lower() in CHECKPOINT_SUFFIXES):
            ref = src  # a checkpoint or diffusers folder is its own reference
        out.append(Workload(src.stem if src.is_file() else src.name, Path(bundle), Path(ref) if ref else None, wh,
                            f"--model {model}"))
    return out, notes
