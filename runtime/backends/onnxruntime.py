"""ONNX Runtime sessions for bundle components, one per graph, on the requested device.

Devices: ``cpu``; ``cuda[:N]`` (ORT's CUDA EP, feeds and outputs through I/O binding);
``tensorrt[:N]`` (ORT's TensorRT EP, its options and engine cache from ort_tensorrt.py, which
``open_component`` passes in). ``trt[:N]``, sdrt's own TensorRT engines, is tensorrt.py's
backend. A device whose provider or libraries are missing is an error naming what is missing,
never a silent run on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.runtime.backends import gpu, kernels
from sdrt.runtime.backends.base import DEVICES, Backend, Port, check_device, ports
from sdrt.runtime.backends.cache import file_lock
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import ComponentSpec

__all__ = ["DEVICES", "Port", "Session", "check_device", "providers_for", "session_options"]

log = logging.getLogger(__name__)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def providers_for(device: str, options: dict | None = None, cuda_graph: bool = False) -> list:
    """The execution providers for a device, with their options; never a silent fall back to the CPU.

    ``options`` maps a provider name to its options (the TensorRT EP's come from the engine cache)."""
    kind, index = check_device(device)
    if kind == "trt":
        raise SdrtError("device 'trt' runs sdrt's TensorRT engines (sdrt build), not ONNX Runtime sessions: "
                        "open it with sdrt.runtime.backends.open_component")
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


def ep_options_for(options: dict, overrides) -> dict:
    """The TensorRT EP's options for a session made with ``overrides`` (merged LoRA / VAE weights):
    its engine cache in a subfolder named by the values' digest. The EP keys its cached engines
    by the graph's structure and names, not by the weights' values, so an engine built with one
    set of weights would be loaded for another; each set of values builds its own engine once."""
    if overrides is None:
        return options
    folder = Path(options["trt_engine_cache_path"]) / f"weights-{overrides.digest[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return {**options, "trt_engine_cache_path": str(folder)}


class Session(Backend):
    """One graph in ONNX Runtime: feeds inputs in the dtypes the graph declares, returns outputs by name.

    ``lazy`` loads the graph at its first run instead of now, and ``release()`` frees it until
    the next run (the memory modes); ``io``, the component's spec, answers questions about the
    inputs without loading. ``cuda_graph`` captures CUDA graphs on GPU devices (fixed shapes).
    ``tensorrt`` devices need ``provider_options`` (the TensorRT EP's, from
    ``ort_tensorrt.ep_session_setup``) and take ``lock``, the file lock held while the EP builds."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, *, lazy: bool = False,
                 io: ComponentSpec | None = None, cuda_graph: bool = False, provider_options: dict | None = None,
                 lock: Path | None = None):
        path = Path(path)
        if not path.exists():
            raise SdrtError(f"missing graph: {path}")
        self.path, self.device = path, device
        self.kind, self.device_id = check_device(device)
        if self.kind == "tensorrt" and provider_options is None:
            raise SdrtError("device 'tensorrt' needs the TensorRT EP's options for a bundle component: "
                            "open it with sdrt.runtime.backends.open_component")
        providers_for(device)  # the provider exists, before anything is loaded
        self.threads = threads or int(os.environ.get("SDRT_THREADS", "0"))
        self.cuda_graph = cuda_graph
        self._provider_options = self._base_provider_options = provider_options
        self._lock = lock
        self._io = io
        self._overrides = None  # initializer values the session is made with (runtime/networks)
        self._override_values: list = []
        self._session: ort.InferenceSession | None = None
        self._binding = None
        self._inputs: dict | None = None
        self._outputs: list[str] | None = None
        if not lazy:
            self.load()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self._session is not None:
            return
        opts = session_options(self.threads, self.kind)
        values = self._overrides.add_to(opts, self.path) if self._overrides is not None else []
        custom_ops = kernels.available()
        options = {_PROVIDERS["tensorrt"]: self._provider_options} if self.kind == "tensorrt" else {}
        providers = providers_for(self.device, options, self.cuda_graph)
        if self.kind != "cpu":
            gpu.preload_cuda_libraries()
        # The TensorRT EP builds its engine while the session is created
        guard = file_lock(self._lock) if self._lock is not None else contextlib.nullcontext()
        try:
            with guard:
                model = self._overrides.model(self.path) if self._overrides is not None else str(self.path)
                session = ort.InferenceSession(model, sess_options=opts, providers=providers)
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
        self._override_values = values  # ONNX Runtime reads them in place: they live with the session
        # Plain copies: ORT's NodeArgs keep their session alive, which would defeat release()
        self._inputs = {i.name: Port(i.name, i.type, list(i.shape)) for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]
        if self.kind != "cpu":
            self._binding = gpu.BoundIO(session, "cuda", self.device_id, cuda_graph=self.cuda_graph)

    def release(self) -> None:
        self._session = None
        self._binding = None
        self._override_values = []

    # set_overrides also takes graph edits (hypernetworks' nodes): the session is made from bytes
    takes_graph_edits = True

    def set_overrides(self, overrides) -> None:
        """Make the session with these initializer values from now on (``runtime/networks``'
        ``Overrides``: ``add_to(options)`` puts some into the session options, ``model(path)`` gives
        the graph to load, its own file or its bytes with the others written in), or with the
        graph's own (None). A loaded session is made again now, an unloaded one at its next run."""
        if overrides is self._overrides:
            return
        loaded = self.loaded
        self.release()
        self._overrides = overrides
        if self.kind == "tensorrt":
            self._provider_options = ep_options_for(self._base_provider_options, overrides)
        if loaded:
            self.load()

    @property
    def inputs(self) -> dict[str, Port]:
        if self._inputs is None:
            if self._io is not None:
                return ports(self._io.inputs)
            self.load()
        return self._inputs

    @property
    def outputs(self) -> list[str]:
        if self._outputs is None:
            if self._io is not None:
                return self._io.output_names
            self.load()
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.load()
        typed = self.typed(feeds)
        names = outputs or self.outputs
        if self._binding is not None:
            return dict(zip(names, self._binding.run(typed, names)))
        return dict(zip(names, self._session.run(names, typed)))
