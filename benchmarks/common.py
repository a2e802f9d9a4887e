"""The one timing loop and record format of sdrt's benchmarks.

``time_fn`` runs warm-up calls, then timed calls with a device synchronisation before each
clock read, and returns the median. ``record`` appends one JSON line describing the machine,
library versions, the workload and the timings to a results file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3,
            sync: Callable[[], None] | None = None) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
            "python": platform.python_version()}


def versions(*modules: str) -> dict:
    out = {}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def record(results_file: str, rec: dict) -> None:
    """Append one JSON line (machine, time stamp and ``rec``) to ``benchmarks/results/<file>``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    line = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **rec}
    with open(RESULTS / results_file, "a") as f:
        f.write(json.dumps(line) + "\n")
