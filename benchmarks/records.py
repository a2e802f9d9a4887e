"""The one record format (``sdrt-bench/1``, JSON lines): its measurements, writing, reading and
the newest record of each measurement.

Records are appended one complete line per ``os.write``: an interrupted run keeps every
measurement it finished and never a half line.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

from sdrt.benchmarks.machine import device_label

SCHEMA = "sdrt-bench/1"
COMPONENTS = ("text_encoder", "unet_step", "vae_decode")
END_TO_END = "end_to_end"
MEASUREMENTS = (*COMPONENTS, END_TO_END)


class RecordWriter:
    """Appends records to a JSON-lines file, one complete line per ``os.write``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0

    def write(self, record: dict) -> dict:
        """Append ``record``; returns it as written (non-finite floats as None)."""
        record = finite(record)
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


def finite(obj):
    """JSON-safe: non-finite floats (an infinite PSNR of identical outputs) become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
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


def latest(records: list[dict]) -> list[dict]:
    """The newest record per device (``machine.device_label``: a CPU with its instruction set),
    workload (and size), backend, precision and measurement, of the records with a workload, a
    backend and one of ``MEASUREMENTS`` (or none: an unavailable backend); other benchmarks'
    records are left out."""
    best: dict[tuple, dict] = {}
    for r in records:
        if not (isinstance(r.get("workload"), dict) and r.get("backend") and r.get("device")
                and r.get("measurement") in (*MEASUREMENTS, None)):
            continue
        w = r.get("workload") or {}
        key = (device_label(r["device"]), w.get("name"), w.get("width"), w.get("height"), r.get("backend"),
               r.get("precision"), r.get("measurement"), r.get("steps"))
        if key not in best or (r.get("date") or "") >= (best[key].get("date") or ""):
            best[key] = r
    return list(best.values())


def utc_now() -> str:
    """A record's ``date``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def one_line(e: BaseException) -> str:
    """A record's ``note`` for a failure: the exception's type and first line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
