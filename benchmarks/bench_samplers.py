"""The numpy overhead of one sampler step, for every sampler, beside the UNet step it wraps.

A 4x4x64x64 batch (four 512x512 images), float32. The denoiser is free (it returns a prepared
array), so the time is the sampler's own arithmetic per model call; the noise draws are timed on
their own (the torch-exact CPU generator, and the SDE samplers' Brownian tree), since they are
the seeds' cost, not the step's. The UNet step beside it is the latest SD 1.5 512x512 guided step
on record (``benchmarks/results/unet_step_cpu.jsonl``, written by ``bench_unet_step.py``).

    python -m benchmarks.bench_samplers [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sdrt.benchmarks.machine import machine, versions
from sdrt.benchmarks.records import RecordWriter, read_records, utc_now
from sdrt.benchmarks.timing import time_fn
from sdrt.runtime import sampling
from sdrt.runtime.sampling import schedules
from sdrt.runtime.sampling.noise import BrownianTreeNoise, ImageRNG

RESULTS = Path(__file__).parent / "results"
SHAPE = (4, 4, 64, 64)


class FreeDenoiser:
    """A denoiser that costs nothing: it returns a prepared array, and keeps it as its unconditional
    prediction too, as a ``CFGDenoiser`` does for the CFG++ samplers (``keep_uncond``, ``last_uncond``)."""

    def __init__(self, out: np.ndarray):
        self.out = self.last_uncond = out
        self.keep_uncond = False
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.out


def unet_step_ms() -> tuple[float | None, str]:
    """The latest recorded SD 1.5 512x512 guided UNet step (ms) and what ran it."""
    path = RESULTS / "unet_step_cpu.jsonl"
    if not path.exists():
        return None, "no record"
    recs = [r for r in read_records([path]) if r.get("runtime") == "sdrt"
            and r.get("workload", {}).get("width") == 512 and r.get("status") == "ok"]
    if not recs:
        return None, "no record"
    r = recs[-1]
    return r["ms"], f"{r['backend']} on {r['device']['name']} ({r['threads']} threads, batch {r['workload']['batch']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(RESULTS / "samplers_cpu.jsonl"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    out = (rng.standard_normal(SHAPE) * 0.5).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    table = schedules.model_sigmas(schedules.alphas_cumprod())
    ac = schedules.alphas_cumprod()
    unet_ms, unet_what = unet_step_ms()
    writer = RecordWriter(args.results)
    run = f"samplers-{utc_now()}"

    print(f"sampler overhead per model call, batch {SHAPE}, {args.steps} steps, float32")
    print(f"{'sampler':<20}{'calls':>6}{'ms/call':>10}{'vs UNet step':>14}")
    for info in sampling.SAMPLERS.values():
        denoise = FreeDenoiser(out)
        options = dict(info.options)
        if info.family == "timesteps":
            ts = sampling.timesteps_for(info, args.steps)
            fn = lambda: info.fn(denoise, x0, ts, alphas_cumprod=ac, noise=lambda *a: noise, **options)  # noqa: E731
        else:
            _, schedule = sampling.resolve(info.name)
            sigmas = sampling.sigmas_for(schedule, args.steps, table, sampler=info)
            if info.fixed_schedule:
                options.update(sigma_min=float(table[0]), sigma_max=float(table[-1]))
            # the tree's draws are timed apart below: here the SDE samplers get plain noise too
            fn = lambda: info.fn(denoise, x0 * np.float32(sigmas[0]), sigmas, noise=lambda *a: noise,  # noqa: E731
                                 **options)
        timing = time_fn(fn, warmup=1, repeats=args.repeats)
        n_calls = denoise.calls // (args.repeats + 1)
        ms = timing["median_s"] * 1e3 / n_calls
        ratio = f"{ms / unet_ms:.2e}" if unet_ms else "-"
        print(f"{info.name:<20}{n_calls:>6}{ms:>10.3f}{ratio:>14}")
        writer.write({"schema": "sdrt-bench/1", "run": run, "measurement": "sampler_step_overhead",
                      "machine": machine(), "versions": versions(), "sampler": info.name,
                      "shapes": {"x": list(SHAPE)}, "steps": args.steps, "model_calls": n_calls,
                      "timing": timing, "ms": ms, "unet_step_ms": unet_ms, "status": "ok"})

    image_rng = ImageRNG(SHAPE[1:], [1, 2, 3, 4])
    image_rng.next()
    t_rng = time_fn(image_rng.next, warmup=1, repeats=args.repeats)
    tree = BrownianTreeNoise(SHAPE[1:], [1, 2, 3, 4], float(table[0]), float(table[-1]))
    sig = sampling.sigmas_for("Karras", args.steps, table)
    steps_iter = iter(range(10**9))

    def tree_step():
        i = next(steps_iter) % (args.steps - 1)  # the SDE samplers draw no noise on the last step
        return tree(float(sig[i]), float(sig[i + 1]))
    t_tree = time_fn(tree_step, warmup=args.steps, repeats=args.steps)
    print(f"noise per step: image generators {t_rng['median_s'] * 1e3:.2f} ms, "
          f"Brownian tree (4 trees, each step a new interval) {t_tree['median_s'] * 1e3:.2f} ms")
    print(f"UNet step (SD 1.5, 512x512, guided): {f'{unet_ms:.0f} ms' if unet_ms else '-'} [{unet_what}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
