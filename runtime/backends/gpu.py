"""NVIDIA plumbing shared by the ONNX Runtime GPU routes and sdrt's TensorRT engines.

- which GPU this is (name, compute capability) and which TensorRT, asked of the driver and the
  libraries through ctypes, so no Python CUDA package is needed to key an engine cache;
- ONNX Runtime provider options for the CUDA and TensorRT execution providers;
- one-line diagnoses when a provider is missing or cannot start (never a silent CPU run);
- ``BoundIO``: a session run through I/O binding, feeds and outputs in device memory.

Nothing here imports torch; nothing here was run on a GPU in the environment it was written in
(docs/NVIDIA.md says what was verified where).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)

# CUdevice_attribute values from cuda.h
_CU_COMPUTE_CAPABILITY_MAJOR = 75
_CU_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class GpuIdentity:
    name: str                # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"

    @property
    def slug(self) -> str:
        """File-name-safe: ``nvidia-h100-80gb-hbm3-sm90``."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ("cuda", 1); ``"cpu"`` -> ("cpu", 0)."""
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise SdrtError(f"bad device {device!r}: the index after ':' must be a number (e.g. cuda:1)")
    return kind, int(index or 0)


def _load_library(names: list[str], mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL | None:
    for name in names:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name, mode=mode)
    return None


def gpu_identity(device_id: int = 0) -> GpuIdentity:
    """Name and compute capability of GPU ``device_id``, from the driver API (libcuda)."""
    lib = _load_library(["libcuda.so.1", "libcuda.so", "nvcuda.dll"])
    if lib is None:
        raise SdrtError("no NVIDIA driver found (libcuda cannot be loaded): TensorRT engines need an NVIDIA GPU")

    def check(status: int, call: str):
        if status != 0:
            name = ctypes.c_char_p()
            lib.cuGetErrorName(status, ctypes.byref(name))
            raise SdrtError(f"the CUDA driver failed {call}: {(name.value or b'?').decode()} ({status})")

    check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(dev), device_id), f"cuDeviceGet({device_id})")
    buf = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(buf, len(buf), dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    check(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    return GpuIdentity(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def tensorrt_version() -> str:
    """The TensorRT version: the ``tensorrt`` module's, else libnvinfer's (what ORT's TensorRT EP loads)."""
    with contextlib.suppress(ImportError):
        import tensorrt

        return tensorrt.__version__
    lib = _load_library(["libnvinfer.so.10", "libnvinfer.so", "nvinfer_10.dll", "nvinfer.dll"])
    if lib is None:
        raise SdrtError("TensorRT is not installed: neither the tensorrt Python package nor libnvinfer can be "
                        "loaded (docs/NVIDIA.md)")
    v = int(lib.getInferLibVersion())
    # NV_TENSORRT_VERSION: major * 10000 + minor * 100 + patch from TensorRT 10, major * 1000 + ... before
    if v >= 10000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


# --- ONNX Runtime execution providers ----------------------------------------------------------

def cuda_provider_options(device_id: int = 0, cuda_graph: bool = False) -> dict:
    """The CUDA EP's options: exhaustive cuDNN algorithm search (once per shape), the largest cuDNN
    workspace, and CUDA graphs when asked for (they need fixed shapes and I/O binding)."""
    return {
        "device_id": device_id,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }


def profile_option(shapes: dict[str, tuple[tuple[int, ...], ...]], which: int) -> str:
    """``trt_profile_*_shapes`` text: ``name:1x4x64x64,other:2`` for min (0), opt (1) or max (2)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


def tensorrt_ep_options(cache_dir: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], fp16: bool,
                        device_id: int = 0, cuda_graph: bool = False) -> dict:
    """ONNX Runtime TensorRT EP options: explicit profile shapes from the I/O spec, fp16, engine and
    timing caches in ``cache_dir`` (a directory keyed like sdrt's own engines)."""
    return {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir.parent),
        "trt_cuda_graph_enable": cuda_graph,
        "trt_profile_min_shapes": profile_option(shapes, 0),
        "trt_profile_opt_shapes": profile_option(shapes, 1),
        "trt_profile_max_shapes": profile_option(shapes, 2),
    }


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def missing_provider_message(device: str, provider: str, available: list[str]) -> str:
    """Why ``provider`` is not among ONNX Runtime's providers, and what to install."""
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    if gpu is None:
        return (f"device {device!r} needs onnxruntime-gpu, but only the CPU build is installed "
                f"(onnxruntime {cpu or '?'}): pip uninstall onnxruntime && pip install onnxruntime-gpu")
    if cpu is not None:
        return (f"device {device!r}: onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed and the CPU "
                "build shadows the GPU one: pip uninstall onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return (f"device {device!r} needs ONNX Runtime's {provider}, which this onnxruntime-gpu {gpu} build lacks "
            f"(available: {', '.join(available)})")


def ort_cuda_version() -> str | None:
    """The CUDA version this onnxruntime-gpu wheel was built for (``"12.8"``), None for CPU builds."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    return getattr(info, "cuda_version", None)


def _provider_hint(provider: str) -> str:
    cuda = ort_cuda_version()
    major = cuda.split(".")[0] if cuda else "12"
    built = f"this onnxruntime-gpu was built for CUDA {cuda}" if cuda else "onnxruntime-gpu"
    if provider == "CUDAExecutionProvider":
        return (f"{built} and needs that CUDA major version's libraries and cuDNN 9: "
                "pip install 'onnxruntime-gpu[cuda,cudnn]', or put the system's on LD_LIBRARY_PATH")
    if provider == "TensorrtExecutionProvider":
        return (f"the TensorRT EP needs TensorRT 10's libraries (libnvinfer.so.10) besides CUDA and cuDNN: "
                f"pip install tensorrt-cu{major}-libs, or put them on LD_LIBRARY_PATH")
    return ""


_PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "onnxruntime_providers_cuda",
                       "TensorrtExecutionProvider": "onnxruntime_providers_tensorrt"}


def library_error(path: Path) -> str | None:
    """Why the shared library at ``path`` does not load (the loader's first line), or None if it does."""
    try:
        ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", ctypes.DEFAULT_MODE))
    except OSError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def provider_start_failure(provider: str, capi_dir: Path | None = None) -> str:
    """The one-line reason ONNX Runtime fell back from ``provider``: the library the provider
    cannot load, found by loading the provider's own shared library as ORT would."""
    if capi_dir is None:
        import onnxruntime

        capi_dir = Path(onnxruntime.__file__).parent / "capi"
    lib, hint = _PROVIDER_LIBRARIES.get(provider), _provider_hint(provider)
    windows = sys.platform == "win32"
    reason = None
    if lib is not None:
        shared = capi_dir / ("onnxruntime_providers_shared.dll" if windows else "libonnxruntime_providers_shared.so")
        reason = library_error(shared) if shared.exists() else None
        target = capi_dir / (f"{lib}.dll" if windows else f"lib{lib}.so")
        if reason is None:
            reason = library_error(target) if target.exists() else f"{target.name} is missing from {capi_dir}"
    reason = reason or "it loads, but failed to start (run with -v for ONNX Runtime's log)"
    return f"ONNX Runtime could not start its {provider}: {reason}; {hint}".rstrip("; ")


_preloaded = False


def preload_cuda_libraries() -> None:
    """Let ONNX Runtime find CUDA / cuDNN installed as pip wheels (``onnxruntime-gpu[cuda,cudnn]``).

    Only when those wheels are present (the ``nvidia`` namespace package) and this ORT has
    ``preload_dlls`` (1.21+); its printed notes go to the log, not the terminal."""
    import importlib.util

    import onnxruntime as ort

    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls") or importlib.util.find_spec("nvidia") is None:
        return
    _preloaded = True
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ort.preload_dlls(directory="")
    if out.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", out.getvalue().strip())


# --- I/O binding --------------------------------------------------------------------------------

class BoundIO:
    """Runs an ONNX Runtime session through I/O binding on ``device_type`` ("cuda", or "cpu").

    Feeds are copied to device memory, and a feed equal to the previous run's (the prompt's
    conditioning across sampling steps) is not copied again; outputs are allocated on the device
    and copied back once. With ``cuda_graph`` every feed and output keeps one device buffer per
    shape signature, updated in place, and each signature replays its own captured graph
    (ORT's ``gpu_graph_id`` run option): the CUDA EP's requirement for graphs.
    """

    def __init__(self, session, device_type: str = "cuda", device_id: int = 0, cuda_graph: bool = False):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.device_type = device_type
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self._last: dict[str, tuple[np.ndarray, object]] = {}  # name -> (host copy, device OrtValue)
        self._graphs: dict[tuple, dict] = {}  # signature -> {"id", "inputs", "outputs"}
        self.copies_skipped = 0  # feeds reused from the previous run (for tests and logs)

    def _device_value(self, name: str, a: np.ndarray):
        prev = self._last.get(name)
        if prev is not None and prev[0].shape == a.shape and prev[0].dtype == a.dtype and np.array_equal(prev[0], a):
            self.copies_skipped += 1
            return prev[1]
        value = self._ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)
        self._last[name] = (a.copy(), value)
        return value

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if self.cuda_graph:
            return self._run_graph(feeds, names)
        binding = self.session.io_binding()
        for name, a in feeds.items():
            binding.bind_ortvalue_input(name, self._device_value(name, a))
        for name in names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _run_graph(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        signature = tuple((k, feeds[k].shape, feeds[k].dtype.str) for k in sorted(feeds)) + (tuple(names),)
        graph = self._graphs.get(signature)
        ort = self._ort
        binding = self.session.io_binding()
        options = ort.RunOptions()
        if graph is None:
            graph = {"id": len(self._graphs) + 1, "outputs": None,
                     "inputs": {k: ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)
                                for k, a in feeds.items()}}
            self._graphs[signature] = graph
        else:
            for k, a in feeds.items():
                graph["inputs"][k].update_inplace(a)
        options.add_run_config_entry("gpu_graph_id", str(graph["id"]))
        for k, value in graph["inputs"].items():
            binding.bind_ortvalue_input(k, value)
        if graph["outputs"] is None:  # first run of this signature: ORT allocates, then captures
            for name in names:
                binding.bind_output(name, self.device_type, self.device_id)
        else:
            for name, value in zip(names, graph["outputs"]):
                binding.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(binding, options)
        if graph["outputs"] is None:
            graph["outputs"] = list(binding.get_outputs())
        return [v.numpy() for v in graph["outputs"]]
