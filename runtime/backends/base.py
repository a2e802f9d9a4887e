"""The interface every backend implements: one component's graph, fed numpy arrays by name.

A backend knows its graph's ``path`` and ``device``; ``load()`` and ``release()`` hold and free
the graph (the memory modes), and ``inputs`` / ``outputs`` answer from the component's I/O spec
without loading when the bundle has one. ``run`` casts feeds to the dtypes the graph declares.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sdrt.runtime.backends import gpu
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import TensorSpec

DEVICES = ("cpu", "cuda", "tensorrt", "trt")

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_TYPE_NAMES = {np.dtype(v).name: k for k, v in ORT_TYPES.items()}  # "float32" -> "tensor(float)"


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


def ports(tensors: tuple[TensorSpec, ...]) -> dict[str, Port]:
    """A spec's tensors as ports, with ORT's type names."""
    return {t.name: Port(t.name, _TYPE_NAMES.get(t.dtype, "tensor(float)"), list(t.shape)) for t in tensors}


def c_array(v, dtype) -> np.ndarray:
    """``v`` as a C-contiguous array of ``dtype``; 0-d stays 0-d (``np.ascontiguousarray`` makes it 1-d)."""
    a = np.asarray(v, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class Backend(abc.ABC):
    """One component's graph on one device (ONNX Runtime session or sdrt's TensorRT engines)."""

    path: Path
    device: str

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """Whether the graph is held now."""

    @abc.abstractmethod
    def load(self) -> None:
        """Hold the graph (a no-op when it is held); ``run`` calls it."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free the graph (device memory included); the next run loads it again."""

    @property
    @abc.abstractmethod
    def inputs(self) -> dict[str, Port]:
        ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[str]:
        ...

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """The named outputs (all by default) for ``feeds``, cast to the dtypes the graph declares."""

    def input_dtype(self, name: str) -> type:
        return ORT_TYPES.get(self.inputs[name].type, np.float32)

    def typed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` as C-contiguous arrays of the declared input dtypes."""
        return {k: c_array(v, self.input_dtype(k)) for k, v in feeds.items()}
