"""The backends ``sdrt bench`` knows: ONNX Runtime execution providers driven by sdrt, TensorRT
engines and the PyTorch peers, each runnable here or marked unavailable / skipped with why."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from sdrt.runtime.errors import SdrtError

# The module each runtime's worker process runs (``python -m MODULE --worker``)
WORKERS = {"sdrt": "sdrt.benchmarks.runtime_peer", "torch": "sdrt.benchmarks.workloads"}


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
        return WORKERS[self.runtime]


_ORT_BACKENDS = (("onnxruntime-cpu", "cpu", "CPUExecutionProvider"),
                 ("onnxruntime-cuda", "cuda", "CUDAExecutionProvider"),
                 ("onnxruntime-tensorrt", "tensorrt", "TensorrtExecutionProvider"))


def probe_torch(timeout: float = 300) -> dict:
    """Whether torch is installed and sees a CUDA device, asked of a subprocess (the harness never
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

    from sdrt.runtime.backends import onnxruntime as sessions

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
