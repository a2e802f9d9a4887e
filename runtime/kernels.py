"""The compiled kernels library (``sdrt/runtime/lib``), loaded with ctypes when present."""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

_NAMES = {"linux": "libsdrt_kernels.so", "darwin": "libsdrt_kernels.dylib", "win32": "sdrt_kernels.dll"}
_CUDA_NAMES = {"linux": "libsdrt_kernels_cuda.so", "win32": "sdrt_kernels_cuda.dll"}


def library_path() -> Path:
    return Path(__file__).parent / "lib" / _NAMES.get(sys.platform, "libsdrt_kernels.so")


def cuda_library_path() -> Path:
    """The CUDA build of the ops (built when nvcc was found at install time): the CPU ops plus
    their CUDA execution provider kernels, registered instead of the CPU library for GPU sessions."""
    return Path(__file__).parent / "lib" / _CUDA_NAMES.get(sys.platform, "libsdrt_kernels_cuda.so")


@functools.cache
def load() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        raise SdrtError(f"the sdrt kernels library is not built: {path} is missing (reinstall sdrt)")
    lib = ctypes.CDLL(str(path))
    lib.sdrt_kernels_abi_version.restype = ctypes.c_int32
    f = ctypes.POINTER(ctypes.c_float)
    i64 = ctypes.c_int64
    lib.sdrt_group_norm_f32.argtypes = [f, f, f, f, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int32,
                                        ctypes.c_int32]
    lib.sdrt_group_norm_f32.restype = ctypes.c_int32
    return lib


def available() -> bool:
    return library_path().exists()


def group_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, eps: float = 1e-5,
               *, channels_last: bool = False, silu: bool = False) -> np.ndarray:
    """GroupNorm (+ SiLU) of a float32 NCHW (or NHWC) array with the compiled CPU kernel."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    gamma = np.ascontiguousarray(gamma, dtype=np.float32)
    beta = np.ascontiguousarray(beta, dtype=np.float32)
    n = x.shape[0]
    c = x.shape[-1] if channels_last else x.shape[1]
    hw = x.size // max(1, n * c)
    y = np.empty_like(x)
    f = ctypes.POINTER(ctypes.c_float)
    rc = load().sdrt_group_norm_f32(x.ctypes.data_as(f), gamma.ctypes.data_as(f), beta.ctypes.data_as(f),
                                    y.ctypes.data_as(f), n, c, hw, groups, eps, int(channels_last), int(silu))
    if rc != 0:
        raise SdrtError(f"group_norm: {c} channels cannot form {groups} groups")
    return y
