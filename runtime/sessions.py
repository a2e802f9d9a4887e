"""ONNX Runtime sessions for bundle components, one per graph, on the requested device.

Devices: ``cpu``; ``cuda[:N]`` (ORT's CUDA EP, feeds and outputs through I/O binding);
``tensorrt[:N]`` (ORT's TensorRT EP, engine cache in the bundle's ``engines/``); ``trt[:N]``
(sdrt's own TensorRT engines, built by ``sdrt build``). A device whose provider or libraries are
missing is an error naming what is missing, never a silent run on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from sdrt.runtime import gpu, kernels
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import ComponentSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_TYPE_NAMES = {np.dtype(v).name: k for k, v in _ORT_TYPES.items()}  # "float32" -> "tensor(float)"

DEVICES = ("cpu", "cuda", "tensorrt", "trt")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class Port(NamedTuple):
    """An input or output as ORT's ``NodeArg`` describes it: name, ORT type text, shape."""

    name: str
    type: str
    shape: list


def check_device(device: str) -> tuple[str, int]:
    """(kind, index) of a device name such as ``cuda:1``; one-line error for unknown ones."""
    kind, index = gpu.parse_device(device)
    if kind not in DEVICES:
        raise SdrtError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)} (GPU ones take :N)")
    return kind, index


def providers_for(device: str, options: dict | None = None, cuda_graph: bool = False) -> list:
    """The execution providers for a device, with their options; never a silent fall back to the CPU.

    ``options`` maps a provider name to its options (the TensorRT EP's come from the engine cache)."""
    kind, index = check_device(device)
    if kind == "trt":
        raise SdrtError("device 'trt' runs sdrt's TensorRT engines (sdrt build), not ONNX Runtime sessions")
    wanted = _PROVIDERS[kind]
    available = ort.get_available_providers()
    if wanted not in available:
        raise SdrtError(gpu.missing_provider_message(device, wanted, available))
    if kind == "cpu":
        return [wanted]
    options = options or {}
    cuda_options = options.get("CUDAExecutionProvider") or gpu.cuda_provider_options(index, cuda_graph)
    cuda = ("CUDAExecutionProvider", cuda_options)
    if kind == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return [(wanted, options.get(wanted, {})), cuda, "CPUExecutionProvider"]


def session_options(threads: int = 0, kind: str = "cpu") -> ort.SessionOptions:
    """ONNX Runtime options for sdrt's graphs: all graph optimizations, ``threads`` intra-op threads
    (0: ONNX Runtime's default), quiet logs, and sdrt's custom ops (the ai.sdrt ops that export's
    graph passes fuse into) when the kernels library is built: its CUDA build for GPU sessions
    when that was built too (it holds the CPU ops as well; a session loads one of the two)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if kind != "cpu" and kernels.cuda_library_path().exists():
        try:
            opts.register_custom_ops_library(str(kernels.cuda_library_path()))
            return opts
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types; the CPU ops still serve
            log.warning("sdrt's CUDA kernels library did not load (%s); using the CPU one",
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if kernels.available():
        opts.register_custom_ops_library(str(kernels.library_path()))
    return opts


class Session:
    """One graph: feeds inputs in the dtypes the graph declares, returns outputs by name.

    ``lazy`` loads the graph at its first run instead of now, and ``release()`` frees it until
    the next run (the memory modes); ``io``, the component's spec, answers questions about the
    inputs without loading. ``cuda_graph`` captures CUDA graphs on GPU devices (fixed shapes)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, *, lazy: bool = False,
                 io: ComponentSpec | None = None, cuda_graph: bool = False, provider_options: dict | None = None):
        path = Path(path)
        if not path.exists():
            raise SdrtError(f"missing graph: {path}")
        self.path, self.device = path, device
        self.kind, self.device_id = check_device(device)
        self.threads = threads or int(os.environ.get("SDRT_THREADS", "0"))
        self.cuda_graph = cuda_graph
        self._provider_options = provider_options
        self._io = io
        self._session = None  # an ort.InferenceSession, or engines.EngineComponent for "trt"
        self._binding = None
        self._inputs: dict | None = None
        self._outputs: list[str] | None = None
        if not lazy:
            self.load()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self._session is None:
            self._load_engines() if self.kind == "trt" else self._load_ort()

    def release(self) -> None:
        """Free the loaded graph (device memory included); the next run loads it again."""
        self._session = None
        self._binding = None

    def _load_ort(self) -> None:
        opts = session_options(self.threads, self.kind)
        custom_ops = kernels.available()
        options, lock = {}, None
        if self.kind == "tensorrt":
            if self._provider_options is None:
                from sdrt.runtime.engines import ep_session_setup

                self._provider_options, lock, _ = ep_session_setup(self.path, self.device_id, self.cuda_graph)
            options = {_PROVIDERS["tensorrt"]: self._provider_options}
        providers = providers_for(self.device, options, self.cuda_graph)
        if self.kind != "cpu":
            gpu.preload_cuda_libraries()
        if lock is not None:
            from sdrt.runtime.engines import file_lock

            guard = file_lock(lock)  # the TensorRT EP builds its engine while the session is created
        else:
            guard = contextlib.nullcontext()
        try:
            with guard:
                session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except SdrtError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types with long messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not custom_ops and "ai.sdrt" in str(e):
                raise SdrtError(f"cannot load {self.path}: it uses sdrt's custom ops (ai.sdrt) and the kernels "
                                f"library {kernels.library_path()} is missing; reinstall sdrt, or export "
                                f"with --no-optimize") from None
            raise SdrtError(f"cannot load {self.path}: {first}") from None
        used = session.get_providers()
        for p in providers:
            name = p if isinstance(p, str) else p[0]
            if name not in used:  # ORT fell back (a CUDA / TensorRT library failed to load)
                raise SdrtError(gpu.provider_start_failure(name))
        self._session = session
        # Plain copies: ORT's NodeArgs keep their session alive, which would defeat release()
        self._inputs = {i.name: Port(i.name, i.type, list(i.shape)) for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]
        if self.kind != "cpu":
            self._binding = gpu.BoundIO(session, "cuda", self.device_id, cuda_graph=self.cuda_graph)

    def _load_engines(self) -> None:
        from sdrt.runtime.bundle import open_bundle
        from sdrt.runtime.engines import EngineComponent

        engines = EngineComponent(open_bundle(self.path.parent.parent), self.path.parent.name, self.device_id,
                                  self.cuda_graph)
        self._session = engines
        self._inputs = _ports(engines.spec.inputs)
        self._outputs = [t.name for t in engines.spec.outputs]

    @property
    def inputs(self) -> dict:
        if self._inputs is None:
            if self._io is not None:
                return _ports(self._io.inputs)
            self.load()
        return self._inputs

    @property
    def outputs(self) -> list[str]:
        if self._outputs is None:
            if self._io is not None:
                return [t.name for t in self._io.outputs]
            self.load()
        return self._outputs

    def input_dtype(self, name: str) -> type:
        return _ORT_TYPES.get(self.inputs[name].type, np.float32)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.load()
        typed = {k: _c_array(v, self.input_dtype(k)) for k, v in feeds.items()}
        names = outputs or self.outputs
        if self.kind == "trt":
            return self._session.run(typed, names)
        if self._binding is not None:
            return dict(zip(names, self._binding.run(typed, names)))
        return dict(zip(names, self._session.run(names, typed)))


def _ports(tensors) -> dict[str, Port]:
    return {t.name: Port(t.name, _TYPE_NAMES.get(t.dtype, "tensor(float)"), list(t.shape)) for t in tensors}


def _c_array(v, dtype) -> np.ndarray:
    """``v`` as a C-contiguous array of ``dtype``; 0-d stays 0-d (``np.ascontiguousarray`` makes it 1-d)."""
    a = np.asarray(v, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
