"""ONNX Runtime sessions for bundle components, one per graph, on the requested device."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}

DEVICES = ("cpu", "cuda")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def providers_for(device: str) -> list[str]:
    """The execution providers for a device; never a silent fall back to the CPU."""
    if device not in _PROVIDERS:
        raise SdrtError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    wanted = _PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted not in available:
        raise SdrtError(f"device {device!r} needs ONNX Runtime's {wanted}, which this onnxruntime build lacks "
                        f"(available: {', '.join(available)}); for NVIDIA GPUs install onnxruntime-gpu "
                        "in place of onnxruntime")
    return [wanted] if device == "cpu" else [wanted, "CPUExecutionProvider"]


class Session:
    """One graph: feeds inputs in the dtypes the graph declares, returns outputs by name."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        path = Path(path)
        if not path.exists():
            raise SdrtError(f"missing graph: {path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or int(os.environ.get("SDRT_THREADS", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))
        except SdrtError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types with long messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SdrtError(f"cannot load {path}: {first}") from None
        self.path = path
        self.inputs = {i.name: i for i in self._session.get_inputs()}
        self.outputs = [o.name for o in self._session.get_outputs()]

    def input_dtype(self, name: str) -> type:
        return _ORT_TYPES.get(self.inputs[name].type, np.float32)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        typed = {k: np.ascontiguousarray(v, dtype=self.input_dtype(k)) for k, v in feeds.items()}
        names = outputs or self.outputs
        return dict(zip(names, self._session.run(names, typed)))
