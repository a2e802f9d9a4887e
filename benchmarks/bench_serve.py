"""``sdrt serve`` under load, and its overhead per request against the Python API in-process.

Starts ``sdrt serve`` on a free 127.0.0.1 port with the embedded model, then times the same
txt2img payloads (distinct seeds) three ways: through ``sdrt.Pipeline()`` in this process, one
after another (the direct peer); through the server from one client (overhead = median server
latency - median direct latency: HTTP, JSON, PNG encoding and base64, the queue); and from
``--clients`` concurrent clients sending ``--requests`` each (throughput, p50/p95/max latency,
503s from a full queue, which are counted and not retried). Every image is decoded and the seed in
its infotext checked against the request. The server is stopped at the end, also on error.

    python -m benchmarks.bench_serve [--clients 16] [--requests 32] [--sequential 32] [--queue-size 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from sdrt.benchmarks.machine import device_info, machine, versions
from sdrt.benchmarks.records import RecordWriter, utc_now
from sdrt.benchmarks.timing import time_fn
from sdrt.runtime import png

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only


def payload(seed: int, args) -> dict:
    return {"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "seed": seed, "steps": args.steps,
            "width": args.size, "height": args.size, "sampler_name": args.sampler, "cfg_scale": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), None where /proc cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    """``sdrt serve`` in a child process on a free loopback port; ``stop()`` sends SIGTERM."""

    def __init__(self, folder: Path, queue_size: int, max_steps: int):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = folder / "serve.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdrt.cli", "serve", "--host", HOST, "--port", str(self.port),
             "--ckpt-dir", str(folder / "none"), "--queue-size", str(queue_size), "--max-steps", str(max_steps)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/sdapi/v1/options", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sdrt serve did not start:\n{self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def txt2img(self, body: dict, timeout: float = 120) -> tuple[int, dict | None]:
        req = urllib.request.Request(f"{self.url}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            e.read()
            return e.code, None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def check_response(body: dict, seed: int, size: int) -> None:
    """The one image decodes at the requested size and its infotext carries the requested seed."""
    images = body.get("images") or []
    if len(images) != 1:
        raise AssertionError(f"seed {seed}: {len(images)} images")
    image = Image.open(io.BytesIO(base64.b64decode(images[0])))
    image.load()
    if image.size != (size, size):
        raise AssertionError(f"seed {seed}: image is {image.size}")
    got = int(png.parse_infotext(image.info["parameters"])[2]["Seed"])
    if got != seed:
        raise AssertionError(f"asked for seed {seed}, the infotext says {got}")


def latency_stats(times_s: list[float]) -> dict:
    if not times_s:
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}
    a = np.asarray(times_s) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max())}


def sequential(server: Server, pipe, args) -> dict:
    """The same payloads in-process and through the server, one at a time (seeds 0, 1, ...)."""
    direct_seeds, server_seeds = itertools.count(), itertools.count()

    def direct_fn():
        seed = next(direct_seeds)
        out = pipe(**payload(seed, args))
        if out[0].seed != seed:
            raise AssertionError(f"direct: asked for seed {seed}, got {out[0].seed}")

    def server_fn():
        seed = next(server_seeds)
        status, body = server.txt2img(payload(seed, args))
        if status != 200:
            raise AssertionError(f"server: status {status} for seed {seed}")
        check_response(body, seed, args.size)

    direct = time_fn(direct_fn, warmup=args.warmup, repeats=args.sequential)
    served = time_fn(server_fn, warmup=args.warmup, repeats=args.sequential)
    overhead = served["median_s"] - direct["median_s"]
    return {"direct": direct, "server": served, "overhead_ms": overhead * 1000,
            "ratio": served["median_s"] / direct["median_s"]}


def under_load(server: Server, args) -> dict:
    """``clients`` threads, each sending ``requests`` payloads in turn; every answer checked."""
    base = 1_000_000  # seeds apart from the sequential runs'
    latencies, rejected, errors = [], 0, []
    lock = threading.Lock()

    def client(c: int):
        nonlocal rejected
        for i in range(args.requests):
            seed = base + c * args.requests + i
            t0 = time.perf_counter()
            try:
                status, body = server.txt2img(payload(seed, args))
                if status == 200:
                    check_response(body, seed, args.size)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                elif status == 503:
                    rejected += 1
                else:
                    errors.append(f"status {status} for seed {seed}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client, range(args.clients)))
    wall = time.perf_counter() - t0
    return {"clients": args.clients, "requests_per_client": args.requests, "ok": len(latencies),
            "rejected_503": rejected, "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "throughput_rps": len(latencies) / wall, **latency_stats(latencies)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="requests per client under load")
    ap.add_argument("--sequential", type=int, default=32, help="timed requests per peer, one at a time")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--queue-size", type=int, default=16, help="the server's --queue-size (small: see 503s)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sampler", default="Euler a")
    ap.add_argument("--note", default=None, help="conditions kept in the record")
    ap.add_argument("--results", default=str(RESULTS / "serve_cpu.jsonl"))
    args = ap.parse_args(argv)
    for name in ("clients", "requests", "sequential", "queue_size", "steps"):
        if not 1 <= getattr(args, name) <= 1024:
            ap.error(f"--{name.replace('_', '-')} must be between 1 and 1024")

    import sdrt

    pipe = sdrt.Pipeline()  # the embedded model, as the server's
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-serve-") as tmp:
        server = Server(Path(tmp), args.queue_size, max(args.steps, 150))
        try:
            rss_before = rss_mb(server.proc.pid)
            seq = sequential(server, pipe, args)
            load = under_load(server, args)
            rss_after = rss_mb(server.proc.pid)
        finally:
            server.stop()

    host = machine()
    bundle = pipe.bundle
    record = {
        "schema": "sdrt-bench/1", "date": utc_now(), "run": f"serve-{utc_now()}", "measurement": "serve",
        "machine": host, "versions": versions(), "device": device_info("cpu", host), "conditions": args.note,
        "workload": {"name": "embedded", "description": "the embedded default model", "model_hash": bundle.model_hash,
                     "width": args.size, "height": args.size, "batch": 1},
        "backend": "onnxruntime-cpu", "runtime": "sdrt", "sampler": args.sampler, "steps": args.steps,
        "cfg_scale": 7.0, "queue_size": args.queue_size,
        "status": "ok" if load["errors"] == 0 else "failed",
        "direct": seq["direct"], "server": seq["server"], "direct_ms": seq["direct"]["median_s"] * 1000,
        "server_ms": seq["server"]["median_s"] * 1000, "overhead_ms": seq["overhead_ms"], "ratio": seq["ratio"],
        "load": load, "server_rss_mb": {"before": rss_before, "after": rss_after},
    }
    RecordWriter(args.results).write(record)

    print(f"sdrt serve, embedded model, {args.size}x{args.size}, {args.steps} steps, {args.sampler}")
    print(f"sequential ({args.sequential} requests each, median):")
    print(f"  direct (Python API)   {record['direct_ms']:9.1f} ms")
    print(f"  server (1 client)     {record['server_ms']:9.1f} ms")
    print(f"  overhead per request  {record['overhead_ms']:9.1f} ms  (server / direct = {record['ratio']:.2f}x)")
    print(f"under load ({args.clients} clients x {args.requests} requests, queue size {args.queue_size}):")
    print(f"  ok {load['ok']}, 503 {load['rejected_503']}, errors {load['errors']} in {load['wall_s']:.1f} s")
    print(f"  throughput {load['throughput_rps']:.1f} requests/s "
          f"(the direct peer, one at a time: {1000 / record['direct_ms']:.1f})")
    if load["ok"]:
        print(f"  latency p50 {load['p50_ms']:.1f} ms, p95 {load['p95_ms']:.1f} ms, max {load['max_ms']:.1f} ms")
    before, after = ("?" if v is None else f"{v:.0f} MB" for v in (rss_before, rss_after))
    print(f"server RSS {before} before, {after} after")
    for e in load["first_errors"]:
        print(f"  error: {e}")
    print(f"record appended to {args.results}")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
