"""``open_component``: the one place that turns (bundle, component, device) into a backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sdrt.runtime.backends.base import Backend, check_device
from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.backends.ort_tensorrt import ep_session_setup
from sdrt.runtime.backends.tensorrt import EngineComponent
from sdrt.runtime.errors import SdrtError

if TYPE_CHECKING:
    from sdrt.runtime.bundle import Bundle


def open_component(bundle: Bundle, name: str, device: str = "cpu", precision: str = "fp32", *, lazy: bool = False,
                   cuda_graph: bool = False, threads: int | None = None, graph: str | Path | None = None) -> Backend:
    """The backend running component ``name`` of ``bundle`` on ``device``.

    ``cpu``, ``cuda[:N]`` and ``tensorrt[:N]`` run ``graph`` (default: the bundle's graph for the
    device and ``precision``) in ONNX Runtime, ``tensorrt`` through its TensorRT EP with the
    bundle's engine cache; ``trt[:N]`` runs sdrt's engines built from the portable graph (any
    precision ``sdrt build`` made). The manifest's I/O spec, where the bundle has one, answers
    ``inputs`` / ``outputs`` before a ``lazy`` backend loads."""
    kind, index = check_device(device)
    if kind == "trt":
        if graph is not None and Path(graph) != bundle.component(name):
            raise SdrtError(f"device 'trt' runs engines built from {bundle.component(name)}, not {graph}")
        return EngineComponent(bundle, name, index, cuda_graph, lazy=lazy)
    path = Path(graph) if graph is not None else bundle.graph(name, device, precision)
    options = lock = None
    if kind == "tensorrt":
        options, lock, _ = ep_session_setup(bundle, name, index, cuda_graph)
    return Session(path, device, threads, lazy=lazy, io=bundle.spec(name), cuda_graph=cuda_graph,
                   provider_options=options, lock=lock)
