"""The worker-process protocol: each backend is measured in a fresh ``python -m MODULE --worker``
process (``backends.WORKERS``), so one backend's memory and threads never colour another's.

The parent writes the job (JSON) to the worker's stdin; the worker writes one ``PROTOCOL`` line
per event (``start``, ``record``, ``error``) to its stdout and saves each output as ``.npy`` in the
job's ``outdir`` for the parent's fidelity comparison. A worker is a peer (``RuntimePeer`` in
``runtime_peer``, ``TorchPeer`` in ``workloads``) handed to ``worker_main``; ``measure`` runs each
task on it with the one timing loop and the memory probes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sdrt.benchmarks.memory import host_peak_mb, reset_host_peak
from sdrt.benchmarks.records import END_TO_END, finite, one_line
from sdrt.benchmarks.timing import time_fn
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling import schedules

PROTOCOL = "@@sdrt-bench "  # worker -> parent lines on the worker's stdout start with this


def task_label(task: dict) -> str:
    return f"{task['measurement']}-{task['steps']}" if task.get("steps") else task["measurement"]


def task_fields(task: dict) -> dict:
    return {"measurement": task["measurement"], "steps": task.get("steps")}


# --- the parent's side ----------------------------------------------------------------------

def backend_records(worker: str, job: dict, threads: int, on_start: Callable[[str], None]
                    ) -> Iterator[tuple[str, dict]]:
    """(label, record fields) per task of ``job`` from a ``worker`` module's process; failed
    records for the tasks a crashed worker did not reach."""
    pending = {task_label(t): t for t in job["tasks"]}
    with contextlib.closing(run_worker(worker, job, threads)) as events:
        for ev in events:
            if ev["type"] == "start":
                on_start(f"{job['tag']} {ev['label']}")
            elif ev["type"] == "record":
                label = task_label(ev["task"])
                pending.pop(label, None)
                yield label, ev["record"]
            else:
                for label, task in list(pending.items()):
                    pending.pop(label)
                    yield label, {**task_fields(task), "status": "failed", "note": ev["error"]}


def run_worker(worker: str, job: dict, threads: int = 0) -> Iterator[dict]:
    """Start ``python -m worker --worker`` on ``job`` and yield its events; the worker is stopped on
    close. ``threads`` (0: each library's default) goes to it as SDRT_THREADS and OMP_NUM_THREADS."""
    env = dict(os.environ)
    if threads:
        env.update(SDRT_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    err_path = Path(job["outdir"]) / f"{job['tag']}.stderr"
    with open(err_path, "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", worker, "--worker"], stdin=subprocess.PIPE,
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


def _failure(rc: int, stderr: str) -> str:
    """One line on why a worker died: its exception's line (not a library warning), or the signal."""
    if rc < 0:
        return f"the worker was stopped by signal {-rc} ({signal.Signals(-rc).name})"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
    return (raised or lines or [f"the worker exited with status {rc}"])[-1][:300]


# --- the worker's side ----------------------------------------------------------------------

def component_inputs(bundle, width: int, height: int, seed: int) -> dict:
    """The same seeded inputs for every backend: a latent and a mid-schedule sigma for the UNet step,
    random conditioning (so the step does not depend on a backend's text encoder) and a latent to decode.

    SDXL (and its refiner): the cross-attention states are both encoders' widths concatenated per token
    (the refiner's: bigG's alone), and ``added`` holds each side's UNet inputs beside them, as the
    runtime's CFG denoiser takes them: a random pooled vector (``text_embeds``, the width of bigG's
    projection) and the request's size conditioning (``time_ids``, as the webui's
    ``sd_models_xl.get_learned_conditioning`` builds it for this size: original size, crop (0, 0),
    target size; the refiner's: original size, crop and the aesthetic score, 6 and 2.5). None for
    SD 1.x / 2.x."""
    from sdrt.runtime.text.encoder import REFINER_AESTHETIC, SDXL_CROP

    rng = np.random.default_rng(seed)
    f, c = bundle.vae_scale_factor, bundle.latent_channels
    encoders = [info for info in (bundle.text_encoder, bundle.text_encoder_2) if info]
    hidden = sum(info["hidden_size"] for info in encoders)
    sigmas = schedules.model_sigmas(schedules.alphas_cumprod(**bundle.scheduler))
    sigma = float(sigmas[len(sigmas) // 2])
    latent = (1, c, height // f, width // f)
    inputs = {
        "x": (rng.standard_normal(latent, dtype=np.float32) * np.float32(sigma)),
        "sigma": sigma,
        "cond": rng.standard_normal((1, 77, hidden), dtype=np.float32),
        "uncond": rng.standard_normal((1, 77, hidden), dtype=np.float32),
        "latents": rng.standard_normal(latent, dtype=np.float32),
        "added": None,
    }
    if bundle.architecture.startswith("sdxl"):
        projection = (bundle.text_encoder_2 or {}).get("projection")
        if not projection:
            raise SdrtError(f"bundle {bundle.path} has no text_encoder_2 projection (SDXL's pooled vector)")
        pooled = np.load(bundle.path / projection, mmap_mode="r").shape[1]
        top, left = SDXL_CROP

        def time_ids(negative: bool) -> np.ndarray:
            if bundle.architecture == "sdxl-refiner":
                return np.array([height, width, top, left, REFINER_AESTHETIC[1 if negative else 0]], np.float32)
            return np.array([height, width, top, left, height, width], np.float32)

        inputs["added"] = {side: {"text_embeds": rng.standard_normal(pooled, dtype=np.float32),
                                  "time_ids": time_ids(side == "uncond")} for side in ("cond", "uncond")}
    return inputs


def measure(peer, task: dict, job: dict, inputs: dict) -> tuple[dict, np.ndarray]:
    """One measurement of a peer: (record fields, the last output). Peers implement ``sync``,
    ``text_encoder(p)``, ``unet_step(x, sigma, cond, uncond, cfg, added)`` (``added``: SDXL's
    {"cond": {name: [dim]}, "uncond": ...} of ``component_inputs``, else None), ``vae_decode(latents)``,
    ``generate(p) -> (image [3, H, W] in [0, 1], sampling seconds)``, ``device_memory_start()`` and
    ``device_memory_peak() -> (MB, method)``."""
    from sdrt.runtime.pipeline import GenerationParams

    s = job["settings"]
    m = task["measurement"]
    steps = task.get("steps") or 1
    p = GenerationParams(s["prompt"], negative_prompt=s["negative_prompt"], steps=steps, sampler_name=s["sampler"],
                         cfg_scale=s["cfg_scale"], seed=s["seed"], width=job["width"], height=job["height"])
    warmup, repeats = s["warmup"], s["repeats"]
    outputs, sampling_times = [], []
    if m == "text_encoder":
        shapes = {"prompts": 2, "tokens": 77}

        def call():
            outputs[:] = [peer.text_encoder(p)]
    elif m == "unet_step":
        shapes = {"sample": [2, *inputs["x"].shape[1:]], "encoder_hidden_states": [2, *inputs["cond"].shape[1:]]}
        if inputs["added"]:  # SDXL's UNet inputs beside the states, one row per side of CFG
            shapes |= {name: [2, *v.shape] for name, v in inputs["added"]["cond"].items()}

        def call():
            outputs[:] = [peer.unet_step(inputs["x"], inputs["sigma"], inputs["cond"], inputs["uncond"],
                                         s["cfg_scale"], inputs["added"])]
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
        sys.stdout.write(PROTOCOL + json.dumps(finite(obj)) + "\n")
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
        emit({"type": "error", "error": one_line(e)})
        return 1
    load = {"load_s": time.perf_counter() - t0, "load_peak_host_mb": host_peak_mb(), "base_host_mb": base_mb,
            "threads": getattr(peer, "threads", None)}
    for task in job["tasks"]:
        label = task_label(task)
        emit({"type": "start", "label": label})
        try:
            rec, out = measure(peer, task, job, inputs)
        except Exception as e:
            emit({"type": "record", "task": task, "record": {**task_fields(task), "status": "failed",
                                                              "note": one_line(e), **load}})
            continue
        path = Path(job["outdir"]) / f"{job['tag']}-{label}.npy"
        np.save(path, out)
        emit({"type": "record", "task": task, "record": {**rec, **load, "output": str(path)}})
    return 0
