"""One prepared run of sdrt's NVIDIA path: noise, CUDA kernels, fidelity, speed, TensorRT routes.

``python -m sdrt.benchmarks.gpu.prove --out DIR`` runs every stage, each in its own process
under its own time limit, and appends one JSON record per result to ``DIR/records.jsonl`` as it
goes, so a run cut short keeps what it measured. ``--dry-run`` (``--device cpu --tiny``) runs the
same stages on the CPU with the scaled-down SD 1.5; CUDA-only measurements record
``skipped: no CUDA``. README.md says how it is carried to the device and called.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# Stage -> (time limit in seconds on the device, needs onnxruntime-gpu on the path)
STAGES = {  # in run order; export early, since the later stages need its bundle
    "env": (60, True),
    "export": (240, False),
    "noise": (60, False),
    "tensorrt": (90, True),  # with a tiny engine build and its LoRA refit where TensorRT runs
    "kernels": (120, True),
    "fidelity": (150, True),
    "speed-sdrt": (150, True),
    "speed-torch": (90, False),
    "speed-compile": (150, False),
}
NOISE_SEEDS = (0, 1, 42, 1234, 2**31 - 1, 2**32 + 5, 2**63 + 11, 3_000_000_000)
NOISE_SHAPES = ((4, 64, 64), (4, 96, 64), (4, 128, 128), (1, 4, 512, 512), (7,), (3, 333, 1001))
MIN_LIMIT_S = 10  # no stage gets less, however scaled
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"


class Recorder:
    """Appends records to ``records.jsonl`` in ``out``, flushed at once."""

    def __init__(self, out: Path, stage: str):
        self.out, self.stage = out, stage

    def __call__(self, kind: str, **fields) -> dict:
        rec = {"stage": self.stage, "kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        with open(self.out / "records.jsonl", "a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")
        return rec


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _paths(args) -> dict:
    work = Path(args.work)
    return {"checkpoint": work / ("tiny.safetensors" if args.tiny else "sd15-random.safetensors"),
            "bundle": work / ("bundle-tiny" if args.tiny else "bundle-sd15")}


def _size(args) -> int:
    return 64 if args.tiny else 512


# --- stages ---------------------------------------------------------------------------------------

def stage_env(args, rec):
    import onnxruntime as ort
    import torch

    from sdrt.runtime.backends import gpu

    info = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "ort_cuda_build": gpu.ort_cuda_version(),
            "numpy": np.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError as e:
        info["diffusers"] = f"missing: {e}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    threads_per_sm=getattr(props, "max_threads_per_multi_processor", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"failed: {e}"
        try:
            ident = gpu.gpu_identity(0)
            info["gpu_identity"] = ident.slug
        except Exception as e:  # noqa: BLE001 - recorded, not raised
            info["gpu_identity"] = f"error: {e}"
    rec("env", **info)


def stage_tensorrt(args, rec):
    """Both TensorRT routes must refuse with one line when TensorRT is not installed."""
    from sdrt.export.tiny import scaled_sd1_configs  # noqa: F401 - the bundle below needs the export extra
    from sdrt.runtime.backends import gpu
    from sdrt.runtime.backends.factory import open_component
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.errors import SdrtError

    bundle = open_bundle(_tiny_bundle(args))
    try:
        rec("tensorrt_version", version=gpu.tensorrt_version())
    except SdrtError as e:
        rec("tensorrt_version", error=str(e), one_line="\n" not in str(e))
    for device in ("trt", "tensorrt"):
        try:
            backend = open_component(bundle, "unet", device)
            backend.load()
            rec("route", device=device, status="opened (TensorRT is installed?)")
        except SdrtError as e:
            rec("route", device=device, status="refused", error=str(e), one_line="\n" not in str(e))
        except Exception as e:  # noqa: BLE001 - not clean: recorded as such
            rec("route", device=device, status="unclean", error=f"{type(e).__name__}: {e}")
    _refit_check(args, rec, bundle)


def _refit_check(args, rec, bundle):
    """A LoRA refitted into sdrt's UNet engine gives the ONNX Runtime CPU session's output with the
    same LoRA (fp32 engine: to float tolerance), and back to no LoRA the engine's own output. The
    refit plan (named weights from the portable graph's merge) is computed wherever this runs."""
    import numpy as np
    from safetensors.numpy import save_file

    from sdrt.runtime.backends import Session, gpu
    from sdrt.runtime.backends.factory import open_component
    from sdrt.runtime.backends.profiles import build_shapes
    from sdrt.runtime.backends.tensorrt import build_engines
    from sdrt.runtime.errors import SdrtError
    from sdrt.runtime.networks.apply import Networks
    from sdrt.runtime.networks.onnx_weights import GraphWeights

    loras = Path(args.work) / "Lora"
    loras.mkdir(exist_ok=True)
    weights = GraphWeights(bundle.component("unet"))
    g = np.random.default_rng(3)
    tensors = {}
    for key in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "up_blocks.1.attentions.0.proj_in"):
        layer = "lora_unet_" + key.replace(".", "_")
        shape = Networks(bundle, loras).provenance("unet").shape(key + ".weight")
        tensors[f"{layer}.lora_down.weight"] = (g.standard_normal((4, *shape[1:])) * 0.3).astype(np.float32)
        tensors[f"{layer}.lora_up.weight"] = (g.standard_normal((shape[0], 4, *shape[2:])) * 0.3).astype(np.float32)
        tensors[f"{layer}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, str(loras / "probe.safetensors"))
    prompt = "x <lora:probe:1>"
    cpu = Session(bundle.component("unet"))
    Networks(bundle, loras).activate(prompt, {"unet": cpu})
    plan = cpu._overrides.arrays
    rec("refit_plan", weights=len(plan), names=sorted(plan)[:4],
        all_in_graph=all(n in weights.index for n in plan))
    if not cuda_available():
        rec("refit", status="skipped: no CUDA GPU")
        return
    try:
        gpu.tensorrt_version()
        build_engines(bundle, build_shapes(width=(64,) * 3, height=(64,) * 3), precision="fp32",
                      components=("unet",))
        engine = open_component(bundle, "unet", "trt:0")
    except SdrtError as e:
        rec("refit", status=f"skipped: {e}")
        return
    rng = np.random.default_rng(0)
    dim = cpu.inputs["encoder_hidden_states"].shape[-1]
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, dim), np.float32)}
    own = engine.run(feeds)["out_sample"]
    networks = Networks(bundle, loras)
    t0 = time.perf_counter()
    networks.activate(prompt, {"unet": engine})
    refit_s = time.perf_counter() - t0
    refitted = engine.run(feeds)["out_sample"]
    reference = cpu.run(feeds)["out_sample"]
    networks.activate("x", {"unet": engine})
    back = engine.run(feeds)["out_sample"]
    rec("refit", status="ran", refit_s=round(refit_s, 3), weights=len(plan),
        max_abs_vs_cpu_lora=float(np.abs(refitted - reference).max()),
        max_abs_lora_effect=float(np.abs(refitted - own).max()),
        restored_max_abs=float(np.abs(back - own).max()))


def _tiny_bundle(args) -> Path:
    """A tiny bundle for the stages that need one but no real model (built once in ``work``)."""
    from sdrt.export.tiny import random_modules, scaled_sd1_configs
    from sdrt.export.write import export_modules

    path = Path(args.work) / "bundle-trt-probe"
    if not (path / "sdrt.json").exists():
        configs = scaled_sd1_configs()
        unet, vae, text = random_modules(configs, seed=0)
        export_modules(unet, vae, text, configs, path, source={"name": "tiny", "kind": "random", "sha256": None,
                                                                "hash": None}, optimize=False, overwrite=True)
    return path


def stage_noise(args, rec):
    """torch CUDA randn against sdrt's layout-exact Philox generator, for many seeds and shapes."""
    import torch

    from sdrt.runtime.sampling.noise import PhiloxNVGenerator, TorchCUDAGenerator

    cuda = cuda_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    sm = props.multi_processor_count if cuda else 132
    tps = getattr(props, "max_threads_per_multi_processor", 2048) if cuda else 2048
    fixtures = {}
    for seed in NOISE_SEEDS:
        ours = TorchCUDAGenerator(seed, sm_count=sm, threads_per_sm=tps)
        theirs = torch.Generator("cuda").manual_seed(seed) if cuda else None
        # Without CUDA the comparison runs against a second sdrt generator: a rehearsal of the code
        twin = None if cuda else TorchCUDAGenerator(seed, sm_count=sm, threads_per_sm=tps)
        for call, shape in enumerate(NOISE_SHAPES):  # successive calls: the offset advances between them
            a = ours.randn(shape)
            t = torch.randn(shape, generator=theirs, device="cuda").cpu().numpy() if cuda else twin.randn(shape)
            ulps = np.abs(a.view(np.int32).astype(np.int64) - t.view(np.int32).astype(np.int64))
            r = {"seed": seed, "shape": shape, "call": call, "sdrt_offset": ours.offset,
                 "status": "ok" if cuda else "rehearsal: no CUDA (sdrt against itself)",
                 "torch_offset": int(theirs.get_offset()) if cuda and hasattr(theirs, "get_offset") else None,
                 "exact_fraction": float((a == t).mean()), "max_abs": float(np.abs(a - t).max()),
                 "max_ulp": int(ulps.max()), "ulp_histogram": np.bincount(np.minimum(ulps, 8).ravel(), minlength=9)}
            if call == 0:
                nv = PhiloxNVGenerator(seed & (2**64 - 1)).randn(shape)
                r["nv_source_exact_fraction"] = float((nv == t).mean())
                r["nv_source_max_abs"] = float(np.abs(nv - t).max())
            rec("compare", **r)
            if math_prod(shape) <= 65536:
                fixtures[f"seed{seed}_call{call}_{'x'.join(map(str, shape))}"] = t
    if fixtures:
        np.savez_compressed(Path(args.out) / "noise-fixtures.npz", **fixtures)
        rec("fixtures", file="noise-fixtures.npz", arrays=len(fixtures), sm_count=sm, threads_per_sm=tps)


def math_prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def stage_kernels(args, rec):
    """tests/test_kernels_cuda.py (compiles the CUDA kernels with cmake + nvcc and runs them)."""
    root = Path(args.root)
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "test_kernels_cuda.py"), "-q", "-rs",
           "-p", "no:cacheprovider"]
    if not cuda_available():
        cmd.append("--collect-only")  # the dry run checks the command and the collection
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=STAGES["kernels"][0] - 10)
    tail = (r.stdout + r.stderr)[-3000:]
    rec("pytest", command=" ".join(cmd[2:]), returncode=r.returncode, seconds=round(time.perf_counter() - t0, 1),
        status="ok" if r.returncode == 0 else "failed", collect_only=not cuda_available(), tail=tail)


def stage_export(args, rec):
    """SD 1.5 (or the tiny model) with seeded random weights, exported by sdrt: fp32 + fp16."""
    import torch

    from sdrt.export import convert
    from sdrt.export.configs import sd1_configs
    from sdrt.export.tiny import random_modules, scaled_sd1_configs
    from sdrt.export.write import export_checkpoint, save_checkpoint

    p = _paths(args)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    configs = scaled_sd1_configs() if args.tiny else sd1_configs()
    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    unet, vae, text = random_modules(configs, seed=0)
    ldm = convert.diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(),
                                    "text_encoder": text.state_dict()}, configs)
    del unet, vae, text
    save_checkpoint(ldm, configs, p["checkpoint"])
    del ldm
    built = time.perf_counter() - t0
    precisions = ("fp32",) if args.tiny and not cuda_available() else ("fp32", "fp16")
    # This stage runs without onnxruntime-gpu (README): the export does not measure fp16 itself
    export_checkpoint(p["checkpoint"], p["bundle"], overwrite=True, optimize=False, precisions=precisions)
    rec("export", model="tiny" if args.tiny else "sd15", build_s=round(built, 1),
        export_s=round(time.perf_counter() - t0 - built, 1), precisions=precisions,
        bundle_mb=round(sum(f.stat().st_size for f in p["bundle"].rglob("*") if f.is_file()) / 1e6, 1))


def _params(args, steps: int, batch: int = 1, sampler: str = "Euler a"):
    from sdrt.runtime.pipeline.params import GenerationParams

    size = _size(args)
    return GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler_name=sampler, seed=1234,
                            width=size, height=size, cfg_scale=7.0, batch_size=batch)


def _torch_peer(args, precision: str, compile: bool = False, device: str | None = None):
    from sdrt.benchmarks.workloads import TorchPeer

    p = _paths(args)
    return TorchPeer({"options": {"attention": "sdpa", "compile": compile}, "device": device or args.device,
                      "precision": precision, "bundle": str(p["bundle"]), "checkpoint": str(p["checkpoint"])})


def stage_fidelity(args, rec):
    """sdrt's CUDA route fp32 / fp16 against torch fp32 (TF32 off): one guided UNet step, 20-step image."""
    import torch

    from sdrt.benchmarks.fidelity import fidelity
    from sdrt.benchmarks.runtime_peer import RuntimePeer
    from sdrt.runtime.pipeline.txt2img import to_uint8

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bundle = str(_paths(args)["bundle"])
    cuda = args.device == "cuda"
    ref = _torch_peer(args, "fp32")
    p = _params(args, steps=20, sampler="Euler")
    cond_both = ref.text_encoder(p)
    cond, uncond = cond_both[:1], cond_both[1:]
    rng = np.random.default_rng(0)
    size = _size(args) // 8
    sigma = float(ref.sigmas[-1])
    x = (rng.standard_normal((1, 4, size, size)) * sigma).astype(np.float32)
    want_step = ref.unet_step(x, sigma, cond, uncond, 7.0)
    want_image, _ = ref.generate(p)
    images = {"torch-fp32": to_uint8(want_image)}
    for precision in ("fp32", "fp16"):
        if precision == "fp16" and not cuda:
            rec("compare", backend=f"sdrt-cuda-{precision}", status="skipped: no CUDA")
            continue
        peer = RuntimePeer({"bundle": bundle, "options": {"session": args.device}, "device": args.device,
                            "precision": precision})
        step = peer.unet_step(x, sigma, cond, uncond, 7.0)
        image, _ = peer.generate(p)
        images[f"sdrt-{precision}"] = to_uint8(image)
        rec("compare", backend=f"sdrt-{args.device}-{precision}", against="torch-fp32", status="ok",
            graph=str(peer.pipe.unet.path) if hasattr(peer.pipe.unet, "path") else None,
            unet_step=fidelity(want_step, step), image_float=fidelity(want_image, image, peak=1.0),
            image_8bit=fidelity(to_uint8(want_image), to_uint8(image), peak=255.0),
            target_db=60 if precision == "fp32" else 35, steps=p.steps, sampler=p.sampler_name, size=_size(args))
        del peer
    if cuda:
        half = _torch_peer(args, "fp16")
        image, _ = half.generate(p)
        rec("compare", backend="torch-cuda-fp16", against="torch-fp32", status="ok",
            image_8bit=fidelity(to_uint8(want_image), to_uint8(image), peak=255.0))
    np.savez_compressed(Path(args.out) / "fidelity-images.npz", **images)


def _speed_cases(args):
    """(label, steps, batch): the issue's 50 steps batch 1, 20 steps, batch 4."""
    return [("50 steps", 50, 1), ("20 steps", 20, 1), ("batch 4, 20 steps", 20, 4)]


def _timing(args, fn, sync=None) -> dict:
    from sdrt.benchmarks.timing import time_fn

    return time_fn(fn, warmup=1, repeats=1 if args.tiny else 3, sync=sync)


def stage_speed_sdrt(args, rec):
    """sdrt end to end on ORT CUDA fp16 (I/O binding, with and without CUDA graphs)."""
    from sdrt.runtime.pipeline.txt2img import Pipeline

    cuda = args.device == "cuda"
    variants = [("fp16", True), ("fp16", False)] if cuda else [("fp32", False)]
    for precision, graph in variants:
        name = f"sdrt-{args.device}-{precision}" + ("-cudagraph" if graph else "")
        try:
            pipe = Pipeline(str(_paths(args)["bundle"]), args.device, cuda_graph=graph, precision=precision)
        except Exception as e:  # noqa: BLE001 - recorded; the next variant still runs
            rec("speed", backend=name, status="failed", error=f"{type(e).__name__}: {e}")
            continue
        for label, steps, batch in _speed_cases(args):
            p = _params(args, steps, batch)
            parts = {}

            def run():
                t0 = time.perf_counter()
                plan = pipe.plan(p)
                cond, uncond = pipe.conditioning(plan)
                t1 = time.perf_counter()
                latents = pipe.sample(plan, plan.batches[0], cond, uncond)
                t2 = time.perf_counter()
                pipe.decode_float(latents)
                parts.update(text_s=t1 - t0, sampling_s=t2 - t1, decode_s=time.perf_counter() - t2)

            try:
                t = _timing(args, run)
            except Exception as e:  # noqa: BLE001 - recorded (CUDA graphs refuse some shapes)
                rec("speed", backend=name, case=label, status="failed", error=f"{type(e).__name__}: {e}")
                continue
            rec("speed", backend=name, case=label, status="ok", steps=steps, batch=batch, size=_size(args),
                end_to_end_ms=round(t["median_s"] * 1000, 2), first_s=round(t["first_s"] or 0, 2),
                last_run_parts_ms={k: round(v * 1000, 2) for k, v in parts.items()},
                per_step_ms=round(parts["sampling_s"] / steps * 1000, 3), times_s=t["times_s"])
        del pipe


def _torch_speed(args, rec, compile: bool):
    import torch

    from sdrt.runtime import sampling

    cuda = args.device == "cuda"
    precision = "fp16" if cuda else "fp32"
    name = f"torch-{'compile' if compile else 'sdpa'}-{args.device}-{precision}"
    if compile and not cuda:
        rec("speed", backend=name, status="skipped: no CUDA (torch.compile is timed on the GPU only)")
        return
    if not cuda:  # a rehearsal: one thread, since a 2-thread OpenMP pool stalls on a shared 2-core machine
        torch.set_num_threads(1)
    peer = _torch_peer(args, precision, compile=compile)
    for label, steps, batch in _speed_cases(args):
        p = _params(args, steps, batch)
        parts = {}

        def run():
            t0 = time.perf_counter()
            info, schedule = sampling.resolve(p.sampler_name, p.scheduler)
            sigmas = sampling.sigmas_for(schedule, steps, peer.sigmas, sampler=info, arch=peer.bundle.architecture)
            context = peer._conditioning(p)[0].to(peer.dtype)  # SD 1.x: no added conditioning
            peer.sync()
            t1 = time.perf_counter()
            gen = torch.Generator().manual_seed(p.seed)
            shape = (batch, 4, _size(args) // 8, _size(args) // 8)

            def noise(s, sn):
                return torch.randn(shape, generator=gen).to(peer.device)

            x = noise(None, None) * float(sigmas[0])
            latents = info.fn(lambda x, s: peer._denoise(x, s, context, p.cfg_scale), x, sigmas, noise=noise,
                              **sampling.sampler_options(info))
            peer.sync()
            t2 = time.perf_counter()
            peer._decode(latents).cpu()
            parts.update(text_s=t1 - t0, sampling_s=t2 - t1, decode_s=time.perf_counter() - t2)

        t = _timing(args, run, sync=peer.sync)
        rec("speed", backend=name, case=label, status="ok", steps=steps, batch=batch, size=_size(args),
            end_to_end_ms=round(t["median_s"] * 1000, 2), first_s=round(t["first_s"] or 0, 2),
            last_run_parts_ms={k: round(v * 1000, 2) for k, v in parts.items()},
            per_step_ms=round(parts["sampling_s"] / steps * 1000, 3), times_s=t["times_s"])


def stage_speed_torch(args, rec):
    _torch_speed(args, rec, compile=False)


def stage_speed_compile(args, rec):
    _torch_speed(args, rec, compile=True)


RUNNERS = {"env": stage_env, "tensorrt": stage_tensorrt, "noise": stage_noise, "kernels": stage_kernels,
           "export": stage_export, "fidelity": stage_fidelity, "speed-sdrt": stage_speed_sdrt,
           "speed-torch": stage_speed_torch, "speed-compile": stage_speed_compile}


# --- driver ---------------------------------------------------------------------------------------

def run_stage(args) -> int:
    rec = Recorder(Path(args.out), args.stage)
    t0 = time.perf_counter()
    try:
        RUNNERS[args.stage](args, rec)
    except Exception as e:  # noqa: BLE001 - a stage's failure is a record, and the next stage runs
        rec("stage", status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:],
            seconds=round(time.perf_counter() - t0, 1))
        return 1
    rec("stage", status="done", seconds=round(time.perf_counter() - t0, 1))
    return 0


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    scale = 1.0 if args.device == "cuda" else args.cpu_budget_scale
    summary = []
    for stage in stages:
        limit, wants_gpu_ort = STAGES[stage]
        limit = max(MIN_LIMIT_S, int(limit * scale))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.ort_site and wants_gpu_ort:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (args.ort_site, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "sdrt.benchmarks.gpu.prove", "--stage", stage, "--out", str(out),
               "--work", args.work, "--device", args.device, "--root", args.root] + (["--tiny"] if args.tiny else [])
        t0 = time.perf_counter()
        with open(out / "run.log", "a") as log:
            log.write(f"\n=== {stage} (limit {limit} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = "done" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                status = f"timeout after {limit} s: skipped to the next stage"
                Recorder(out, stage)("stage", status="timeout", limit_s=limit)
        seconds = round(time.perf_counter() - t0, 1)
        summary.append((stage, status, seconds))
        print(f"{stage:14s} {seconds:7.1f} s  {status}", flush=True)
    _print_table(out)
    return 0 if all(s == "done" for _, s, _ in summary) else 1


def _print_table(out: Path) -> None:
    """The short table the device tool's reply carries (the records hold the full numbers)."""
    path = out / "records.jsonl"
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "speed" and r.get("status") == "ok":
            print(f"speed   {r['backend']:28s} {r['case']:18s} {r['end_to_end_ms']:9.1f} ms  "
                  f"{r['per_step_ms']:7.2f} ms/step")
        elif r["kind"] == "compare" and r["stage"] == "fidelity" and r.get("status") == "ok":
            print(f"fidelity {r['backend']:27s} image {r['image_8bit']['psnr']} dB  max-abs {r['image_8bit']['max_abs']}")
        elif r["kind"] == "compare" and r["stage"] == "noise" and "exact_fraction" in r and r["call"] == 0:
            print(f"noise   seed {r['seed']:<20d} exact {r['exact_fraction']:.4f}  max ulp {r['max_ulp']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--work", default="/tmp/sdrt-gpu", help="bundles and checkpoints (kept between calls)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the scaled-down SD 1.5 instead of the real size")
    ap.add_argument("--dry-run", action="store_true", help="--device cpu --tiny: rehearse every stage here")
    ap.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    ap.add_argument("--ort-site", help="folder holding onnxruntime-gpu, put first on the path of the GPU stages")
    ap.add_argument("--cpu-budget-scale", type=float, default=0.5, help="stage limits on the CPU, as a fraction")
    ap.add_argument("--root", default=str(Path.cwd()), help="the repository (for tests/)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.stage:
        return run_stage(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
