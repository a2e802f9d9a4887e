"""The machine a benchmark ran on: CPU (with its instruction set), memory, GPUs, library versions,
and the identity under which the report groups a device's records."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata

from sdrt.runtime import __version__

# The instruction-set extensions that decide which kernels ONNX Runtime (MLAS), numpy and sdrt's
# own ops run, so that two CPUs of one model name that differ in them are two devices:
# /proc/cpuinfo's names, each with numpy's CPU-table name where numpy has one (the fallback)
ISA_FLAGS = {
    "avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
    "avx512_vnni": "AVX512VNNI", "avx_vnni": None, "avx512_bf16": "AVX512BF16", "avx512_fp16": "AVX512FP16",
    "amx_tile": None, "amx_bf16": None, "amx_int8": None,
    "asimd": "ASIMD", "asimddp": "ASIMDDP", "i8mm": None, "bf16": None, "sve": "SVE", "sve2": None,
}
# The short name of an instruction set (charts): its most capable extension
_ISA_TIERS = (("amx_tile", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512_vnni", "AVX-512 VNNI"),
              ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))


def cpu_isa() -> list[str] | None:
    """This CPU's extensions of ``ISA_FLAGS`` (in that order), from /proc/cpuinfo's flags (x86) or
    features (Arm), else numpy's CPU table; None when neither can be read."""
    found = None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    found = set(value.split())
                    break
    if found is None:
        features = _numpy_cpu_features()
        if features is None:
            return None
        found = {flag for flag, name in ISA_FLAGS.items() if name and features.get(name)}
    return [flag for flag in ISA_FLAGS if flag in found]


def _numpy_cpu_features() -> dict | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return features


def isa_tier(isa: list[str] | None) -> str | None:
    """The short name of an instruction set (``AVX-512 BF16``, ``AVX2``, ...); None when not recorded."""
    if isa is None:
        return None
    return next((name for flag, name in _ISA_TIERS if flag in isa), "baseline")


def machine() -> dict:
    """CPU model, cores, instruction set, memory, OS and Python of this machine."""
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
    return {"cpu": cpu, "cores": cores, "cpu_isa": cpu_isa(), "memory_gb": mem_gb, "platform": platform.platform(),
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
    """The device a backend runs on: the CPU (with its instruction set), or the first NVIDIA GPU."""
    host = host or machine()
    if kind == "cpu":
        return {"kind": "cpu", "name": host["cpu"], "cores": host["cores"], "isa": host.get("cpu_isa"),
                "driver": None, "memory_gb": host["memory_gb"]}
    gpu = (host["gpus"] or [{}])[0]
    return {"kind": "cuda", "name": gpu.get("name"), "driver": gpu.get("driver"), "memory_gb": gpu.get("memory_gb")}


def device_label(device: dict) -> str:
    """A device's identity in the report: records under one label are one kind of machine.

    A CPU is its model name, cores and instruction set; records written before the instruction set
    was recorded (no ``isa``) are a device of their own, "instruction set not recorded", never
    merged with records that have one. A GPU is its name and driver."""
    if device.get("kind") == "cpu":
        isa = device.get("isa")
        isa_text = "instruction set not recorded" if isa is None else " ".join(isa) or "no vector extensions"
        return f"CPU: {device.get('name')} ({device.get('cores')} cores; {isa_text})"
    driver = f", driver {device['driver']}" if device.get("driver") else ""
    return f"GPU: {device.get('name')}{driver}"


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
