"""The one timing loop of every sdrt benchmark, and ONNX Runtime's own time per op type."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError


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


def ort_op_profile(graph: str | Path, feeds: dict[str, np.ndarray], *, threads: int = 0, runs: int = 2) -> dict:
    """ONNX Runtime's own profile of ``graph`` on the CPU: time per op type over ``runs`` runs after
    a warm-up, largest first, as ``{op_type: {"ms": per run, "share": of all op time, "nodes": n}}``."""
    import onnxruntime as ort

    from sdrt.runtime.backends.onnxruntime import session_options

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
