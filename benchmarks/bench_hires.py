"""Hires fix end to end: sdrt against torch eager on the same request, each peer in its own process.

The request: txt2img at ``--size`` (``--steps`` steps of Euler, CFG 7, seed 1), the first pass's
latents upscaled ``--scale`` times by the webui's "Latent" upscaler (bilinear), then the second pass
(img2img at the larger size, ``--hr-steps`` steps at denoising strength ``--strength``: the last
``hr_steps`` steps of an ``int(hr_steps / strength)`` schedule, from the seed's noise at the larger
size), the larger image decoded. The peers:

- ``sdrt``: ``Img2imgPipeline`` on the bundle at its default precision (``--precision auto``), as
  ``sdrt generate --enable-hr`` runs it;
- ``torch-eager``: diffusers / transformers modules from the same checkpoint (classic attention,
  fp32; ``sdrt bench``'s torch peer), the same webui arithmetic written in torch:
  ``torch.nn.functional.interpolate`` for the latent upscale, a new ``torch.Generator`` of the
  seed for the second pass's noise, the sampler functions over torch tensors.

Each peer runs in its own process (the machine holds one SD 1.5 peer at a time), timed by
``timing.time_fn`` over whole renders (text encoder, both passes, decode; the load left out); the
8-bit images are compared (PSNR against torch). Records in ``results/hires_cpu.jsonl``.

    python -m benchmarks.bench_hires --tiny                 # the tiny model: seconds (correctness)
    python -m benchmarks.bench_hires --size 512 --scale 2   # SD 1.5 with seeded random weights

Without ``--bundle``/``--checkpoint`` the model is the seeded random-weight workload
(``sd15-random``, or ``tiny-random`` with ``--tiny``), built and exported once into the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PEERS = ("sdrt", "torch-eager")


def _request(job: dict):
    from sdrt.runtime.pipeline import GenerationParams

    return GenerationParams(job["prompt"], steps=job["steps"], sampler_name="Euler", cfg_scale=7.0, seed=1,
                            width=job["size"], height=job["size"], enable_hr=True, hr_scale=job["scale"],
                            hr_upscaler="Latent", hr_second_pass_steps=job["hr_steps"],
                            denoising_strength=job["strength"])


def _sdrt_render(job: dict):
    """(render() -> uint8 image, what ran) for sdrt's pipeline."""
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.pipeline import Img2imgPipeline
    from sdrt.runtime.precision import describe

    pipe = Img2imgPipeline(open_bundle(job["bundle"]), device="cpu", precision="auto")
    p = _request(job)
    pipe.plan(p)
    return (lambda: np.asarray(pipe.generate(p)[0].image)), {"precision": describe(pipe.bundle, "cpu", pipe.precision)}


def _torch_render(job: dict):
    """(render() -> uint8 image, what ran): the webui's hires fix in torch on diffusers' modules."""
    import torch

    from sdrt.benchmarks.workloads import TorchPeer
    from sdrt.runtime import sampling

    peer = TorchPeer({"bundle": job["bundle"], "checkpoint": job["checkpoint"], "device": "cpu",
                      "options": {"attention": "eager"}, "precision": "fp32"})
    p = _request(job)
    b = peer.bundle
    info, schedule = sampling.resolve(p.sampler_name, p.scheduler)
    options = sampling.sampler_options(info)
    f, c = b.vae_scale_factor, b.latent_channels

    def sample(context, x_of, shape, sigmas):
        gen = torch.Generator().manual_seed(p.seed)  # the seed's generator at this size: first draw, then the sampler's

        def noise(sigma=None, sigma_next=None):
            return torch.randn(shape, generator=gen)[None]

        x = x_of(noise(), float(sigmas[0]))
        return info.fn(lambda x, s: peer._denoise(x, s, context, p.cfg_scale), x, sigmas, noise=noise, **options)

    def render():
        context, _ = peer._conditioning(p)  # SD 1.x: no added conditioning
        sigmas = sampling.sigmas_for(schedule, p.steps, peer.sigmas, sampler=info, arch=b.architecture)
        low = sample(context, lambda n, s: n * s, (c, p.height // f, p.width // f), sigmas)
        w, h = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
        z = torch.nn.functional.interpolate(low, size=(h // f, w // f), mode="bilinear", antialias=False)
        total, t_enc = int(p.hr_second_pass_steps / min(p.denoising_strength, 0.999)), p.hr_second_pass_steps - 1
        hr_sigmas = sampling.sigmas_for(schedule, total, peer.sigmas, sampler=info, arch=b.architecture)
        hr_context, _ = peer._conditioning(p)  # the webui conditions the second pass again (the same prompts here)
        x = sample(hr_context, lambda n, s: z + n * s, tuple(z.shape[1:]), hr_sigmas[total - t_enc - 1:])
        pixels = peer._decode(x)[0].cpu().numpy()
        return (255.0 * np.moveaxis(pixels, 0, 2)).astype(np.uint8)  # truncated, as the webui's

    return render, {"precision": "fp32", "attention": "eager"}


def run_peer(name: str, job: dict, out: Path) -> dict:
    """In the peer's own process: load, time whole renders, save the last image."""
    from sdrt.benchmarks.memory import host_peak_mb
    from sdrt.benchmarks.timing import time_fn

    os.environ["SDRT_THREADS"] = str(job["threads"])
    render, options = (_sdrt_render if name == "sdrt" else _torch_render)(job)
    images = []
    timing = time_fn(lambda: images.append(render()), warmup=job["warmup"], repeats=job["repeats"])
    np.save(out / f"{name}.npy", images[-1])
    return {"timing": timing, "options": options, "peak_host_mb": host_peak_mb()}


def _model(args) -> tuple[str, str]:
    if args.bundle:
        return args.bundle, args.checkpoint
    from sdrt.benchmarks.workloads import random_workload

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "sdrt-bench-hires")
    checkpoint, bundle = random_workload("tiny-random" if args.tiny else "sd15-random", workdir / "checkpoints")
    return str(bundle), str(checkpoint)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny random-weight model (a correctness run)")
    ap.add_argument("--bundle", default=None, help="an sdrt bundle (with --checkpoint, torch's weights)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", type=int, default=None, help="first pass size (default 512; 64 with --tiny)")
    ap.add_argument("--scale", type=float, default=2.0, help="hires fix scale (hr_scale)")
    ap.add_argument("--steps", type=int, default=2, help="first pass steps")
    ap.add_argument("--hr-steps", type=int, default=2, help="second pass steps (hr_second_pass_steps)")
    ap.add_argument("--strength", type=float, default=0.5, help="second pass denoising strength")
    ap.add_argument("--warmup", type=int, default=None, help="untimed renders first (default 1; 0 at full size)")
    ap.add_argument("--repeats", type=int, default=None, help="timed renders (default 3; 1 at full size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the random-weight checkpoint is built")
    ap.add_argument("--results", default=str(RESULTS / "hires_cpu.jsonl"))
    ap.add_argument("--no-record", action="store_true", help="print only (a correctness run)")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--note", default=None, help="conditions kept with the records (e.g. a shared machine)")
    ap.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # a peer's own process
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        job = json.loads(Path(args.job).read_text())
        result = run_peer(args.peer, job, Path(job["out"]))
        Path(job["out"], f"{args.peer}.json").write_text(json.dumps(result))
        return 0

    from sdrt.benchmarks.machine import device_info, machine, versions
    from sdrt.benchmarks.records import SCHEMA, RecordWriter, utc_now
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.metrics import psnr

    full = not args.tiny
    bundle, checkpoint = _model(args)
    if not checkpoint:
        raise SystemExit("--bundle needs --checkpoint (torch's weights)")
    size = args.size or (512 if full else 64)
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-hires-") as tmp:
        job = {"bundle": bundle, "checkpoint": checkpoint, "size": size, "scale": args.scale, "steps": args.steps,
               "hr_steps": args.hr_steps, "strength": args.strength, "prompt": args.prompt, "threads": args.threads,
               "warmup": args.warmup if args.warmup is not None else (0 if full else 1),
               "repeats": args.repeats if args.repeats is not None else (1 if full else 3), "out": tmp}
        Path(tmp, "job.json").write_text(json.dumps(job))
        results, images = {}, {}
        for name in PEERS:
            print(f"{name}: {size} -> {int(size * args.scale)}, {args.steps} + {args.hr_steps} steps ...", flush=True)
            subprocess.run([sys.executable, "-m", "sdrt.benchmarks.bench_hires", "--peer", name, "--job",
                            str(Path(tmp, "job.json"))], check=True)
            results[name] = json.loads(Path(tmp, f"{name}.json").read_text())
            images[name] = np.load(Path(tmp, f"{name}.npy"))
    s, t = (results[n]["timing"]["median_s"] for n in PEERS)
    score = psnr(images["torch-eager"], images["sdrt"], peak=255.0)
    print(f"sdrt {s:.2f} s, torch eager {t:.2f} s: sdrt {t / s:.2f}x torch; PSNR {score:.1f} dB "
          f"({images['sdrt'].shape[1]}x{images['sdrt'].shape[0]})", flush=True)
    if args.no_record:
        return 0
    host = machine()
    b = open_bundle(bundle)
    workload = {"name": f"{b.name} hires fix", "bundle": bundle, "width": size, "height": size,
                "hr_width": images["sdrt"].shape[1], "hr_height": images["sdrt"].shape[0], "hr_scale": args.scale,
                "hr_upscaler": "Latent", "steps": args.steps, "hr_steps": args.hr_steps,
                "denoising_strength": args.strength, "prompt": args.prompt, "sampler": "Euler", "cfg_scale": 7.0,
                "seed": 1}
    writer = RecordWriter(args.results)
    run = f"hires-{utc_now()}"
    for name in PEERS:
        r = results[name]
        other = PEERS[1 - PEERS.index(name)]
        writer.write({"schema": SCHEMA, "run": run, "date": utc_now(), "machine": host, "versions": versions(),
                      "conditions": args.note, "device": device_info("cpu", host), "threads": args.threads,
                      "status": "ok", "workload": workload, "backend": name, "runtime": name.split("-")[0],
                      "precision": r["options"]["precision"], "options": r["options"],
                      "measurement": "hires_end_to_end", "steps": args.steps + args.hr_steps,
                      "timing": r["timing"], "s_per_image": r["timing"]["median_s"],
                      "ms": r["timing"]["median_s"] * 1e3,
                      "peak_host_mb": r["peak_host_mb"], "peak_host_method": "VmHWM (load included)",
                      "peak_device_mb": None, "peak_device_method": None,
                      "fidelity": {"against": "torch-eager-fp32", "psnr_db": score if name == "sdrt" else None},
                      "speedup_over": {other: results[other]["timing"]["median_s"] / r["timing"]["median_s"]}})
    print(f"records: {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
