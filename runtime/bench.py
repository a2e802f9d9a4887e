"""Benchmarks: the one timing loop, the one record format, the runtime's peer and the report.

Every sdrt benchmark (``sdrt bench``, ``benchmarks/*.py``) times with ``time_fn`` and writes
``RecordWriter`` lines. A run measures each backend (an ONNX Runtime execution provider driven by
sdrt, or a PyTorch peer from ``sdrt.export.bench``) in a fresh worker process, so one backend's
memory and threads never colour another's:

- timing: warm-up calls, then ``repeats`` timed calls, the device synchronised before each clock
  start and stop; the median is reported (``time_fn``);
- peak host memory: the worker's peak resident set (VmHWM) during the measurement; the peak is
  reset at the start of each measurement (``/proc/self/clear_refs``), so it counts the loaded
  weights and the work, not the load; the load's own peak is ``load_peak_host_mb``;
- peak device memory (GPUs only, null on the CPU): ``torch.cuda.max_memory_allocated`` for torch,
  and for ONNX Runtime the peak of the worker's memory as ``nvidia-smi`` reports it, sampled
  every 0.1 s (``peak_device_method`` names which);
- fidelity: each backend's outputs against the reference backend's of the same run (``torch-eager``
  fp32, or ``torch-sdpa`` fp32 in a run without it) on the same weights, inputs and noise: max-abs
  and PSNR.

Records are appended one complete line per ``os.write``: an interrupted run keeps every
measurement it finished and never a half line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.runtime import __version__, schedules
from sdrt.runtime.errors import SdrtError

SCHEMA = "sdrt-bench/1"
COMPONENTS = ("text_encoder", "unet_step", "vae_decode")
END_TO_END = "end_to_end"
MEASUREMENTS = (*COMPONENTS, END_TO_END)
GRID_STEPS = (2, 4, 8, 16, 32, 64)
REFERENCE = "torch-eager-fp32"
REFERENCES = (REFERENCE, "torch-sdpa-fp32")  # the first of these that runs is a run's fidelity reference
PROTOCOL = "@@sdrt-bench "  # worker -> parent lines on the worker's stdout start with this

# progress(event): {"event": "start" | "record", "done": k, "total": n, "label": str, "record": dict}
Progress = Callable[[dict], None]


# --- the timing loop ------------------------------------------------------------------------

def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3,
            sync: Callable[[], None] | None = None) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls (seconds).

    ``sync`` (a device synchronisation) runs before each clock start and before each clock stop,
    so queued device work is neither left out nor carried into the next call. ``first_s`` is the
    first warm-up call's time (compilation, allocator growth), kept apart from the median.
    """
    if repeats < 1 or warmup < 0:
        raise SdrtError(f"repeats must be at least 1 and warm-up at least 0, got {repeats} and {warmup}")
    sync = sync or (lambda: None)
    first = None
    for i in range(warmup):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "warmup": warmup, "repeats": repeats, "first_s": first}


# --- the machine ----------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, memory, OS and Python of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gb": mem_gb, "platform": platform.platform(),
            "python": platform.python_version(), "gpus": gpus()}


def gpus() -> list[dict]:
    """NVIDIA GPUs as ``nvidia-smi`` lists them (name, driver, memory); empty without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = float(parts[2]) / 1024 if parts[2].replace(".", "").isdigit() else None
            found.append({"name": parts[0], "driver": parts[1], "memory_gb": mem and round(mem, 1)})
    return found


def device_info(kind: str, host: dict | None = None) -> dict:
    """The device a backend runs on: the CPU, or the first NVIDIA GPU (name and driver)."""
    host = host or machine()
    if kind == "cpu":
        return {"kind": "cpu", "name": host["cpu"], "cores": host["cores"], "driver": None,
                "memory_gb": host["memory_gb"]}
    gpu = (host["gpus"] or [{}])[0]
    return {"kind": "cuda", "name": gpu.get("name"), "driver": gpu.get("driver"), "memory_gb": gpu.get("memory_gb")}


_DISTRIBUTIONS = ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "transformers", "tensorrt")


def versions() -> dict:
    """Versions of sdrt and the libraries it is measured with (None: not installed); ORT's providers."""
    out = {"sdrt": __version__}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    import onnxruntime as ort

    out["ort_providers"] = ort.get_available_providers()
    return out


def device_slug(host: dict | None = None) -> str:
    """A file-name-safe name for this machine's main device: its first GPU, else its CPU."""
    host = host or machine()
    name = host["gpus"][0]["name"] if host["gpus"] else f"{host['cpu']} {host['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# --- memory ---------------------------------------------------------------------------------

def _status_mb(field_name: str) -> float | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    return None


def host_peak_mb() -> float | None:
    """This process's peak resident set since start or the last ``reset_host_peak`` (MB)."""
    peak = _status_mb("VmHWM")
    if peak is None:
        with contextlib.suppress(ImportError):
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return peak


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class NvidiaSmiPeak:
    """The peak GPU memory of this process as nvidia-smi reports it, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.1):
        self.exe = shutil.which("nvidia-smi")
        self.interval = interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> float | None:
        try:
            out = subprocess.run([self.exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(os.getpid()) and used.strip().isdigit():
                return float(used)
        return None

    def _loop(self):
        while not self._stop.is_set():
            mb = self._sample()
            if mb is not None:
                self.peak_mb = max(self.peak_mb or 0.0, mb)
            self._stop.wait(self.interval)

    def start(self):
        if self.exe:
            self.peak_mb, self._stop = None, threading.Event()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> float | None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak_mb


# --- records --------------------------------------------------------------------------------

class RecordWriter:
    """Appends records to a JSON-lines file, one complete line per ``os.write``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0

    def write(self, record: dict) -> dict:
        """Append ``record``; returns it as written (non-finite floats as None)."""
        record = _finite(record)
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.count += 1
        return record


def _finite(obj):
    """JSON-safe: non-finite floats (an infinite PSNR of identical outputs) become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_records(paths: Iterable[str | Path]) -> list[dict]:
    """Every sdrt-bench record in the given files (or ``*.jsonl`` of the given folders); lines
    that are not complete records of this schema are skipped."""
    records = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
                    records.append(rec)
    return records


def fidelity(reference: np.ndarray, output: np.ndarray, peak: float | None = None) -> dict:
    """Max-abs difference and PSNR (dB; peak = the reference's range unless given) of ``output``."""
    ref, out = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    if ref.shape != out.shape:
        raise SdrtError(f"cannot compare outputs of shapes {ref.shape} and {out.shape}")
    mse = float(np.mean((ref - out) ** 2))
    peak = float(ref.max() - ref.min()) if peak is None else peak
    psnr = float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse) if peak > 0 else None
    return {"max_abs": float(np.max(np.abs(ref - out))), "psnr": psnr}


def ort_op_profile(graph: str | Path, feeds: dict[str, np.ndarray], *, threads: int = 0, runs: int = 2) -> dict:
    """ONNX Runtime's own profile of ``graph`` on the CPU: time per op type over ``runs`` runs after
    a warm-up, largest first, as ``{op_type: {"ms": per run, "share": of all op time, "nodes": n}}``."""
    import onnxruntime as ort

    from sdrt.runtime.sessions import session_options

    opts = session_options(threads)
    with tempfile.TemporaryDirectory(prefix="sdrt-profile-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, dict] = {}
    # Only the timed runs: the node events after the last-but-`runs` model_run event began
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    since = starts[-runs] if len(starts) >= runs else 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < since:
            continue
        op = e.get("args", {}).get("op_name", "?")
        slot = per_op.setdefault(op, {"us": 0.0, "names": set()})
        slot["us"] += e.get("dur", 0)
        slot["names"].add(e["name"])
    total = sum(v["us"] for v in per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1]["us"])
    return {op: {"ms": round(v["us"] / runs / 1000, 3), "share": round(v["us"] / total, 4), "nodes": len(v["names"])}
            for op, v in ranked}


# --- backends and workloads -----------------------------------------------------------------

@dataclass
class Backend:
    """One way of running the model: an ORT execution provider under sdrt, or a torch peer."""

    name: str                    # onnxruntime-cpu | onnxruntime-cuda | onnxruntime-tensorrt | tensorrt-engine | torch-*
    precision: str               # fp32 | fp16
    device: str                  # cpu | cuda (where it runs)
    runtime: str                 # sdrt | torch | tensorrt
    options: dict = field(default_factory=dict)
    status: str = "ok"           # ok, or unavailable / skipped with ``note`` saying why
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}-{self.precision}"

    @property
    def worker(self) -> str:
        return {"sdrt": "sdrt.runtime.bench", "torch": "sdrt.export.bench"}[self.runtime]


_ORT_BACKENDS = (("onnxruntime-cpu", "cpu", "CPUExecutionProvider"),
                 ("onnxruntime-cuda", "cuda", "CUDAExecutionProvider"),
                 ("onnxruntime-tensorrt", "tensorrt", "TensorrtExecutionProvider"))


def probe_torch(timeout: float = 300) -> dict:
    """Whether torch is installed and sees a CUDA device, asked of a subprocess (this module never
    imports torch)."""
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'version': torch.__version__, "
            "'cuda': c, 'name': torch.cuda.get_device_name(0) if c else None}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        return {"installed": True, **json.loads(r.stdout.strip().splitlines()[-1])}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"installed": False}


def backends(torch_info: dict | None = None, *, compile: bool = True) -> list[Backend]:
    """Every backend sdrt knows, each either runnable here or marked unavailable / skipped with why."""
    import onnxruntime as ort

    from sdrt.runtime import sessions

    providers = ort.get_available_providers()
    out = []
    for name, device, provider in _ORT_BACKENDS:
        b = Backend(name, "fp32", "cpu" if device == "cpu" else "cuda", "sdrt", {"provider": provider, "session": device})
        if provider not in providers:
            b.status, b.note = "unavailable", f"not available on this machine: this onnxruntime has no {provider}"
        elif device not in sessions.DEVICES:
            b.status, b.note = "unavailable", f"sdrt's sessions do not drive {provider} yet"
        out.append(b)
    trt = Backend("tensorrt-engine", "fp16", "cuda", "tensorrt", status="unavailable")
    trt.note = ("sdrt does not build TensorRT engines yet" if importlib.util.find_spec("tensorrt")
                else "not available on this machine: TensorRT is not installed")
    out.append(trt)

    info = torch_info if torch_info is not None else probe_torch()
    device = "cuda" if info.get("cuda") else "cpu"
    fast = "fp16" if device == "cuda" else "fp32"
    peers = [("torch-eager", "fp32", {"attention": "eager"}), ("torch-sdpa", "fp32", {"attention": "sdpa"}),
             ("torch-eager", "fp16", {"attention": "eager"}), ("torch-sdpa", "fp16", {"attention": "sdpa"}),
             ("torch-compile", fast, {"attention": "sdpa", "compile": True})]
    for name, precision, options in peers:
        b = Backend(name, precision, device, "torch", options)
        if not info.get("installed"):
            b.status, b.note = "unavailable", "torch is not installed (the export extra)"
        elif precision == "fp16" and device != "cuda":
            b.status, b.note = "unavailable", "not available on this machine: fp16 runs on CUDA only"
        elif options.get("compile") and not compile:
            b.status, b.note = "skipped", "skipped (--no-compile)"
        out.append(b)
    return out


def select_backends(all_backends: list[Backend], names: Iterable[str] | None) -> list[Backend]:
    """The backends named (by name, e.g. ``torch-sdpa``, or key, e.g. ``torch-sdpa-fp16``); all when None."""
    if not names:
        return list(all_backends)
    names = [n.strip() for n in names if n.strip()]
    known = {b.name for b in all_backends} | {b.key for b in all_backends}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SdrtError(f"unknown backend {unknown[0]!r}; valid backends: {', '.join(sorted(known))}")
    return [b for b in all_backends if b.name in names or b.key in names]


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


def parse_list(text: str | None, convert: Callable = str) -> list:
    """``"20,50"`` or ``"20 50"`` -> [20, 50]; one-line SdrtError for a bad item."""
    items = [t for t in re.split(r"[,\s]+", text or "") if t]
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise SdrtError(f"cannot read {text!r} as a list of {convert.__name__} values") from None


def _label(task: dict) -> str:
    return f"{task['measurement']}-{task['steps']}" if task.get("steps") else task["measurement"]


# --- running: the parent ----------------------------------------------------------------------

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
            reference_outputs: dict[str, str] = {}  # measurement label -> the reference's output file
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
                       "height": height, "tasks": tasks, "settings": _settings_json(settings), "outdir": tmp,
                       "tag": f"{w.name}-{b.key}"}
                for label, rec in _backend_records(b, job, settings, tmp, progress_start):
                    if rec.get("status") == "ok":
                        rec["fidelity"] = _compare(b, reference, label, rec.pop("output"), reference_outputs, rec)
                    emit({**base, "date": utc_now(), **rec}, f"{w.name} {b.key} {label}")
    return written


def _backend_records(b: Backend, job: dict, settings: BenchSettings, tmp: str,
                     on_start: Callable[[str], None]) -> Iterator[tuple[str, dict]]:
    """(label, record fields) per task from the backend's worker; failed records for the tasks a
    crashed worker did not reach."""
    pending = {_label(t): t for t in job["tasks"]}
    with contextlib.closing(_run_worker(b, job, settings, tmp)) as events:
        for ev in events:
            if ev["type"] == "start":
                on_start(f"{job['tag']} {ev['label']}")
            elif ev["type"] == "record":
                label = _label(ev["task"])
                pending.pop(label, None)
                yield label, ev["record"]
            else:
                for label, task in list(pending.items()):
                    pending.pop(label)
                    yield label, {**_task_fields(task), "status": "failed", "note": ev["error"]}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def _settings_json(s: BenchSettings) -> dict:
    return {k: getattr(s, k) for k in ("repeats", "warmup", "e2e_repeats", "e2e_warmup", "threads", "prompt",
                                       "negative_prompt", "sampler", "cfg_scale", "seed")}


def _task_fields(task: dict) -> dict:
    return {"measurement": task["measurement"], "steps": task.get("steps")}


def _compare(b: Backend, reference: str | None, label: str, output: str | None, reference_outputs: dict,
             rec: dict) -> dict | None:
    """Fidelity of this output against the reference backend's output of the same measurement."""
    if output is None or reference is None:
        return None
    if b.key == reference:
        reference_outputs[label] = output
        return {"against": reference, "reference": True}
    if label not in reference_outputs:
        return None
    ref, out = np.load(reference_outputs[label]), np.load(output)
    if rec["measurement"] == END_TO_END:  # the 8-bit images, PSNR with peak 255, max-abs in levels
        from sdrt.runtime.pipeline import to_uint8

        result = fidelity(to_uint8(ref), to_uint8(out), peak=255.0)
    else:
        result = fidelity(ref, out, peak=1.0 if rec["measurement"] == "vae_decode" else None)
    return {"against": reference, **result}


def _run_worker(b: Backend, job: dict, settings: BenchSettings, tmp: str) -> Iterator[dict]:
    """Start the backend's worker process and yield its events; the worker is stopped on close."""
    env = dict(os.environ)
    if settings.threads:
        env.update(SDRT_THREADS=str(settings.threads), OMP_NUM_THREADS=str(settings.threads))
    err_path = Path(tmp) / f"{job['tag']}.stderr"
    with open(err_path, "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", b.worker, "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            for line in proc.stdout:
                if line.startswith(PROTOCOL):
                    yield json.loads(line[len(PROTOCOL):])
            rc = proc.wait()
            if rc in (130, -signal.SIGINT):  # the worker got the Ctrl-C too
                raise KeyboardInterrupt
            if rc != 0:
                err.seek(0)
                yield {"type": "error", "error": _failure(rc, err.read())}
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()


# --- running: the worker --------------------------------------------------------------------

def component_inputs(bundle, width: int, height: int, seed: int) -> dict:
    """The same seeded inputs for every backend: a latent and a mid-schedule sigma for the UNet step,
    random conditioning (so the step does not depend on a backend's text encoder) and a latent to decode."""
    rng = np.random.default_rng(seed)
    f, c = bundle.vae_scale_factor, bundle.latent_channels
    hidden = bundle.text_encoder["hidden_size"]
    sigmas = schedules.model_sigmas(schedules.alphas_cumprod(**bundle.scheduler))
    sigma = float(sigmas[len(sigmas) // 2])
    latent = (1, c, height // f, width // f)
    return {
        "x": (rng.standard_normal(latent, dtype=np.float32) * np.float32(sigma)),
        "sigma": sigma,
        "cond": rng.standard_normal((1, 77, hidden), dtype=np.float32),
        "uncond": rng.standard_normal((1, 77, hidden), dtype=np.float32),
        "latents": rng.standard_normal(latent, dtype=np.float32),
    }


def measure(peer, task: dict, job: dict, inputs: dict) -> tuple[dict, np.ndarray]:
    """One measurement of a peer: (record fields, the last output). Peers implement ``sync``,
    ``text_encoder(p)``, ``unet_step(x, sigma, cond, uncond, cfg)``, ``vae_decode(latents)``,
    ``generate(p) -> (image [3, H, W] in [0, 1], sampling seconds)``, ``device_memory_start()`` and
    ``device_memory_peak() -> (MB, method)``."""
    from sdrt.runtime.pipeline import GenerationParams

    s = job["settings"]
    m = task["measurement"]
    steps = task.get("steps") or 1
    p = GenerationParams(s["prompt"], negative_prompt=s["negative_prompt"], steps=steps, sampler=s["sampler"],
                         cfg_scale=s["cfg_scale"], seed=s["seed"], width=job["width"], height=job["height"])
    warmup, repeats = s["warmup"], s["repeats"]
    outputs, sampling_times = [], []
    if m == "text_encoder":
        shapes = {"prompts": 2, "tokens": 77}

        def call():
            outputs[:] = [peer.text_encoder(p)]
    elif m == "unet_step":
        shapes = {"sample": [2, *inputs["x"].shape[1:]], "encoder_hidden_states": [2, *inputs["cond"].shape[1:]]}

        def call():
            outputs[:] = [peer.unet_step(inputs["x"], inputs["sigma"], inputs["cond"], inputs["uncond"],
                                         s["cfg_scale"])]
    elif m == "vae_decode":
        shapes = {"latent_sample": list(inputs["latents"].shape)}

        def call():
            outputs[:] = [peer.vae_decode(inputs["latents"])]
    elif m == END_TO_END:
        shapes = {"image": [1, 3, job["height"], job["width"]]}
        warmup = s["e2e_warmup"] if s.get("e2e_warmup") is not None else warmup
        repeats = s["e2e_repeats"] if s.get("e2e_repeats") is not None else repeats

        def call():  # also keeps the sampling loop's own time, for it/s
            image, sampling_s = peer.generate(p)
            outputs[:] = [image]
            sampling_times.append(sampling_s)
    else:
        raise SdrtError(f"unknown measurement {m!r}")

    reset = reset_host_peak()
    peer.device_memory_start()
    timing = time_fn(call, warmup=warmup, repeats=repeats, sync=peer.sync)
    device_mb, device_method = peer.device_memory_peak()
    rec = {"measurement": m, "steps": task.get("steps"), "status": "ok", "shapes": shapes, "timing": timing,
           "ms": timing["median_s"] * 1000, "peak_host_mb": host_peak_mb(),
           "peak_host_method": "VmHWM reset per measurement" if reset else "peak RSS since worker start",
           "peak_device_mb": device_mb, "peak_device_method": device_method}
    if m == END_TO_END:
        rec["s_per_image"] = timing["median_s"]
        rec["sampling_s"] = statistics.median(sampling_times[warmup:])
        rec["it_s"] = steps / rec["sampling_s"]
    return rec, np.asarray(outputs[0], dtype=np.float32)


def _die_with_parent() -> None:
    """Linux: have the kernel stop this worker if the benchmark process dies first."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_main(make_peer: Callable[[dict], object]) -> int:
    """A worker process: read the job (JSON) from stdin, build the peer, run each task, and write one
    protocol line per event to stdout."""
    from sdrt.runtime.bundle import open_bundle

    def emit(obj):
        sys.stdout.write(PROTOCOL + json.dumps(_finite(obj)) + "\n")
        sys.stdout.flush()

    _die_with_parent()
    job = json.loads(sys.stdin.read())
    base_mb = host_peak_mb()
    t0 = time.perf_counter()
    try:
        peer = make_peer(job)
        bundle = open_bundle(job["bundle"])
        inputs = component_inputs(bundle, job["width"], job["height"], job["settings"]["seed"])
    except Exception as e:  # the parent turns this into one failed record per task
        emit({"type": "error", "error": _one_line(e)})
        return 1
    load = {"load_s": time.perf_counter() - t0, "load_peak_host_mb": host_peak_mb(), "base_host_mb": base_mb,
            "threads": getattr(peer, "threads", None)}
    for task in job["tasks"]:
        label = _label(task)
        emit({"type": "start", "label": label})
        try:
            rec, out = measure(peer, task, job, inputs)
        except Exception as e:
            emit({"type": "record", "task": task, "record": {**_task_fields(task), "status": "failed",
                                                              "note": _one_line(e), **load}})
            continue
        path = Path(job["outdir"]) / f"{job['tag']}-{label}.npy"
        np.save(path, out)
        emit({"type": "record", "task": task, "record": {**rec, **load, "output": str(path)}})
    return 0


def _failure(rc: int, stderr: str) -> str:
    """One line on why a worker died: its exception's line (not a library warning), or the signal."""
    if rc < 0:
        return f"the worker was stopped by signal {-rc} ({signal.Signals(-rc).name})"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
    return (raised or lines or [f"the worker exited with status {rc}"])[-1][:300]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class RuntimePeer:
    """sdrt's own pipeline (numpy + ONNX Runtime) on one execution provider."""

    def __init__(self, job: dict):
        from sdrt.runtime.pipeline import Pipeline

        # The backend's own precision, never the bundle's measured default (--precision auto)
        self.pipe = Pipeline(job["bundle"], job["options"].get("session", job["device"]), precision=job["precision"])
        self.threads = int(os.environ.get("SDRT_THREADS", "0")) or None
        self._gpu = NvidiaSmiPeak() if job["device"] == "cuda" else None

    def sync(self):
        """ONNX Runtime's ``run`` returns host arrays: it has finished when it returns."""

    def text_encoder(self, p):
        cond, uncond = self.pipe.conditioning(p)  # a MultiCond and a CondSchedule; step 0 for plain prompts
        return np.concatenate([cond.stacked(0), uncond.at(0)[None]])

    def unet_step(self, x, sigma, cond, uncond, cfg_scale):
        from sdrt.runtime.denoiser import CFGDenoiser

        return CFGDenoiser(self.pipe.denoiser, cond, uncond, cfg_scale)(x, sigma)

    def vae_decode(self, latents):
        return self.pipe.decode_float(latents)

    def generate(self, p):
        cond, uncond = self.pipe.conditioning(p)
        t0 = time.perf_counter()
        latents = self.pipe.sample(p, [p.seed], cond, uncond)
        sampling_s = time.perf_counter() - t0
        return self.pipe.decode_float(latents)[0], sampling_s

    def device_memory_start(self):
        if self._gpu:
            self._gpu.start()

    def device_memory_peak(self) -> tuple[float | None, str | None]:
        if not self._gpu:
            return None, None
        return self._gpu.stop(), "nvidia-smi per-process used memory, sampled every 0.1 s"


# --- workloads ----------------------------------------------------------------------------

WORKLOADS = {
    "sd15-random": "the SD 1.5 architecture with seeded random weights",
    "tiny-random": "the SD 1.x architecture at toy widths with seeded random weights",
    "embedded": "the embedded default model",
}


def resolve_workloads(names: Iterable[str], models: Iterable[str] = (), references: Iterable[str] = (), *,
                      size: int | None = None, cache: Path | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Workload], list[str]]:
    """The workloads to run and notes on those that cannot run here. Random-weight workloads are
    built, saved as checkpoints and exported once into the cache (this needs the export extra)."""
    from sdrt.runtime.models import CHECKPOINT_SUFFIXES, cache_dir, default_model_path, is_bundle, resolve_model

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
            from sdrt.export.bench import random_workload
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


# --- the report -----------------------------------------------------------------------------

def latest(records: list[dict]) -> list[dict]:
    """The newest record per device, workload (and size), backend, precision and measurement, of the
    records the report shows (the measurements above; other benchmarks' records are left out)."""
    best: dict[tuple, dict] = {}
    for r in records:
        if not (isinstance(r.get("workload"), dict) and r.get("backend") and r.get("device")
                and r.get("measurement") in (*MEASUREMENTS, None)):
            continue
        w = r.get("workload") or {}
        key = (_device_label(r), w.get("name"), w.get("width"), w.get("height"), r.get("backend"),
               r.get("precision"), r.get("measurement"), r.get("steps"))
        if key not in best or (r.get("date") or "") >= (best[key].get("date") or ""):
            best[key] = r
    return list(best.values())


def _device_label(r: dict) -> str:
    d = r.get("device") or {}
    if d.get("kind") == "cpu":
        return f"CPU: {d.get('name')} ({d.get('cores')} cores)"
    driver = f", driver {d['driver']}" if d.get("driver") else ""
    return f"GPU: {d.get('name')}{driver}"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _fid(f: dict | None) -> str:
    if not f:
        return "—"
    if f.get("reference"):
        return "reference"
    against = "" if f.get("against") == REFERENCE else f" vs `{f.get('against')}`"
    if f.get("max_abs") == 0:
        return "identical" + against
    psnr = f"{f['psnr']:.1f} dB" if f.get("psnr") is not None else "—"
    return f"{psnr} / {f['max_abs']:.3g}{against}"


def render_markdown(records: list[dict]) -> str:
    """A markdown table per device and workload from the newest records."""
    recs = latest(records)
    if not recs:
        return "No benchmark records.\n"
    lines = ["Times are medians after warm-up; *s/image* is one 1-image end-to-end generation (text encoder, "
             "sampling, VAE decode), *it/s* is sampling steps per second. Fidelity: PSNR / max-abs of each "
             f"backend's output against the reference of the same run (`{REFERENCE}`; cells name any other) on "
             "the same weights, inputs and noise (the UNet step on its raw output, the image in 8-bit levels). Peak host memory: the worker's peak resident set "
             "while measuring, the loaded weights included.", ""]
    by_device: dict[str, list[dict]] = {}
    for r in recs:
        by_device.setdefault(_device_label(r), []).append(r)
    for device in sorted(by_device, key=lambda d: (d.startswith("CPU"), d)):
        rows = by_device[device]
        lines.append(f"### {device}")
        lines.append("")
        lines.append(_machine_line(rows))
        lines.append("")
        workloads: dict[tuple, list[dict]] = {}
        for r in rows:
            w = r.get("workload") or {}
            workloads.setdefault((w.get("name"), w.get("width"), w.get("height")), []).append(r)
        for (name, width, height), wrows in sorted(workloads.items(), key=lambda kv: str(kv[0])):
            lines += _workload_table(name, width, height, wrows)
    return "\n".join(lines) + "\n"


def _machine_line(rows: list[dict]) -> str:
    r = max(rows, key=lambda x: x.get("date") or "")
    m, v = r.get("machine") or {}, r.get("versions") or {}
    libs = ", ".join(f"{k} {v[k]}" for k in ("sdrt", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers",
                                              "transformers") if v.get(k))
    dates = sorted({(x.get("date") or "")[:10] for x in rows if x.get("date")})
    parts = [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB, {m.get('platform')}, "
             f"Python {m.get('python')}", libs]
    if dates:
        parts.append(f"measured {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}")
    return "; ".join(parts) + "."


def _workload_table(name, width, height, rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    steps = sorted({r["steps"] for r in ok if r.get("measurement") == END_TO_END and r.get("steps")})
    desc = next((r["workload"].get("description") for r in rows if r["workload"].get("description")), "")
    sampler = next((f"{r.get('sampler')}, CFG {r.get('cfg_scale'):g}" for r in ok if r.get("sampler")), "")
    header = ["backend", "precision", "text encoder ms", "UNet step ms", "VAE decode ms"]
    for s in steps:
        header += [f"{s} steps s/image", f"{s} steps it/s"]
    header += ["peak host MB", "peak GPU MB", "UNet step vs torch", "image vs torch", "note"]
    threads = sorted({r["threads"] for r in ok if r.get("threads")})
    conditions = sorted({r["conditions"] for r in ok if r.get("conditions")})
    about = [f"{'thread' if threads == [1] else 'threads'} {', '.join(map(str, threads))}"] if threads else []
    about += [f"conditions: {c}" for c in conditions]
    out = [f"#### {name}, {width}x{height}" + (f": {desc}" if desc else "") + (f"; {sampler}" if sampler else ""),
           ""] + ([f"{'; '.join(about)[0].upper()}{'; '.join(about)[1:]}.", ""] if about else []) + [
           "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    backends_seen: dict[tuple, list[dict]] = {}
    for r in rows:
        backends_seen.setdefault((r.get("backend"), r.get("precision")), []).append(r)

    def order(key):
        rs = backends_seen[key]
        return (not any(r.get("status") == "ok" for r in rs), key[0] or "", key[1] or "")

    for key in sorted(backends_seen, key=order):
        rs = backends_seen[key]
        by_m = {(r.get("measurement"), r.get("steps")): r for r in rs}
        cells = [f"`{key[0]}`", key[1] or "—"]
        for m in COMPONENTS:
            r = by_m.get((m, None))
            cells.append(_fmt(r.get("ms")) if r and r.get("status") == "ok" else "—")
        for s in steps:
            r = by_m.get((END_TO_END, s))
            good = r and r.get("status") == "ok"
            cells += [_fmt(r.get("s_per_image")) if good else "—", _fmt(r.get("it_s")) if good else "—"]
        host = [r["peak_host_mb"] for r in rs if r.get("peak_host_mb") and r.get("status") == "ok"]
        dev = [r["peak_device_mb"] for r in rs if r.get("peak_device_mb") and r.get("status") == "ok"]
        cells += [_fmt(max(host)) if host else "—", _fmt(max(dev)) if dev else "—"]
        unet = by_m.get(("unet_step", None))
        cells.append(_fid(unet.get("fidelity")) if unet else "—")
        images = [by_m[(END_TO_END, s)] for s in steps if (END_TO_END, s) in by_m]
        image = next((r for r in images if r.get("fidelity")), None)
        cells.append((_fid(image["fidelity"]) + (f" ({image['steps']} steps)" if len(steps) > 1 else ""))
                     if image else "—")
        notes = sorted({r["note"] for r in rs if r.get("note") and r.get("status") != "ok"})
        cells.append("; ".join(notes))
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    out.append("")
    return out


def render_chart(records: list[dict], path: str | Path) -> bool:
    """A bar chart of render time by device and backend (seconds per image, end to end; the UNet
    step where a workload has no end-to-end records). False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    recs = [r for r in latest(records) if r.get("status") == "ok"]
    panels = []
    for name, width, height in sorted({(r["workload"]["name"], r["workload"].get("width") or 0,
                                        r["workload"].get("height") or 0) for r in recs}):
        rs = [r for r in recs if (r["workload"]["name"], r["workload"].get("width") or 0,
                                  r["workload"].get("height") or 0) == (name, width, height)]
        e2e = [r for r in rs if r.get("measurement") == END_TO_END]
        if e2e:
            steps = min({r["steps"] for r in e2e}, key=lambda s: (s != 20, s))
            bars = [(r, r["s_per_image"]) for r in e2e if r["steps"] == steps]
            title, unit = f"{name}: seconds per image, {steps} steps", "s / image"
        else:
            bars = [(r, r["ms"] / 1000) for r in rs if r.get("measurement") == "unet_step"]
            title, unit = f"{name}: seconds per guided UNet step", "s / step"
        if bars:
            panels.append((f"{title} ({width}x{height})", unit, sorted(bars, key=lambda b: -b[1])))
    if not panels:
        return False
    heights = [max(1.2, 0.42 * len(b) + 0.9) for _, _, b in panels]
    fig = Figure(figsize=(9, sum(heights) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colors = {"sdrt": "#2b6cb0", "torch": "#dd6b20", "tensorrt": "#2f855a"}
    for ax, (title, unit, bars) in zip(axes, panels):
        labels = [f"{r['device'].get('name')} · {r['backend']} {r['precision']}" for r, _ in bars]
        values = [v for _, v in bars]
        ax.barh(labels, values, color=[colors.get(r.get("runtime"), "#718096") for r, _ in bars])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel(f"{unit} (lower is better)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max(values) * 1.18)
    fig.suptitle("sdrt: render time by device and backend (blue: sdrt on ONNX Runtime, orange: PyTorch)",
                 fontsize=10)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    return True


def sampler_grid(bundle: str | Path, *, samplers: Iterable[str] | None = None, steps: Iterable[int] = GRID_STEPS,
                 prompt: str = "a red circle on a blue background", seed: int = 1, cfg_scale: float = 7.0,
                 cell: int | None = None, progress: Callable[[str, int, int], None] | None = None):
    """A "sampler vs steps" grid image: one row per sampler (every sampler of ``sampling.SAMPLERS``
    unless named), one column per step count, the same prompt and seed in every cell; cells are
    ``cell`` pixels (default: the model's own size, kept between 64 and 256)."""
    from PIL import Image, ImageDraw, ImageFont

    from sdrt.runtime import sampling
    from sdrt.runtime.pipeline import GenerationParams, Pipeline

    pipe = Pipeline(bundle)
    cell = cell or min(256, max(64, pipe.bundle.default_size[0]))
    names = list(samplers) if samplers else list(sampling.SAMPLERS)
    steps = list(steps)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    label_w = max(120, 8 * max(len(n) for n in names) + 16)
    top = 28
    grid = Image.new("RGB", (label_w + cell * len(steps), top + cell * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((8, top // 2), "sampler / steps", fill="black", font=font, anchor="lm")
    for j, s in enumerate(steps):
        draw.text((label_w + j * cell + cell // 2, top // 2), str(s), fill="black", font=font, anchor="mm")
    total, done = len(names) * len(steps), 0
    failures = []
    for i, name in enumerate(names):
        draw.text((8, top + i * cell + cell // 2), name, fill="black", font=font, anchor="lm")
        for j, s in enumerate(steps):
            if progress:
                progress(f"{name}, {s} steps", done, total)
            box = (label_w + j * cell, top + i * cell)
            try:
                image = pipe.generate(GenerationParams(prompt, steps=s, sampler=name, seed=seed, cfg_scale=cfg_scale))[0]
                grid.paste(image.image.resize((cell, cell), Image.Resampling.LANCZOS), box)
            except Exception as e:  # one failing sampler is shown in its cells, not fatal to the grid
                failures.append(f"{name}, {s} steps: {_one_line(e)}")
                refused = isinstance(e, SdrtError)  # e.g. too few steps for the sampler's order
                color = "gray" if refused else "red"
                draw.rectangle((*box, box[0] + cell - 1, box[1] + cell - 1), outline=color)
                draw.text((box[0] + 4, box[1] + 4), "n/a" if refused else "error", fill=color, font=font)
                if not refused:
                    draw.text((box[0] + 4, box[1] + 20), type(e).__name__[:16], fill=color, font=font)
            done += 1
    if progress:
        progress("done", total, total)
    grid.info["failures"] = failures
    return grid


def write_report(records: list[dict], out_dir: str | Path, *, grid_bundle: str | Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """REPORT.md, render_time.png (with matplotlib) and sampler_steps.png (with a grid bundle) in
    ``out_dir``; returns the paths written and notes on what was not."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    md = out_dir / "REPORT.md"
    _write_text(md, "# sdrt benchmark results\n\nRendered by `sdrt bench --report` from the records in this "
                    "folder (the newest record per device, workload, backend and measurement).\n\n"
                + "![render time by device and backend](render_time.png)\n\n" + render_markdown(records))
    written.append(md)
    chart = out_dir / "render_time.png"
    if render_chart(records, chart):
        written.append(chart)
    else:
        notes.append("the chart needs matplotlib (pip install 'sdrt[bench]'); wrote the markdown only"
                     if importlib.util.find_spec("matplotlib") is None else "no timing records to chart")
    if grid_bundle is not None:
        grid = out_dir / "sampler_steps.png"
        image = sampler_grid(grid_bundle, progress=progress)
        notes += [f"sampler grid cell failed: {f}" for f in image.info.get("failures", [])]
        tmp = grid.with_name(f".{grid.name}.partial")
        image.save(tmp, format="PNG", optimize=True)
        tmp.replace(grid)
        written.append(grid)
    return {"written": written, "notes": notes}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    try:
        sys.exit(worker_main(RuntimePeer))
    except KeyboardInterrupt:
        sys.exit(130)
