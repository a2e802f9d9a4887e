"""Backends: where a component's graph runs (ONNX Runtime's providers, sdrt's TensorRT engines),
behind one interface (base.Backend), opened by ``open_component``."""

from sdrt.runtime.backends.base import Backend, check_device
from sdrt.runtime.backends.factory import open_component
from sdrt.runtime.backends.onnxruntime import Session

__all__ = ["Backend", "Session", "check_device", "open_component"]
