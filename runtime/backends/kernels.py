"""The compiled kernels library (``sdrt/runtime/lib``), loaded with ctypes when present.

CMake installs it into the wheel's ``sdrt/runtime/lib``. A regular install has it beside the
package's sources; an editable install (``pip install -e .``) leaves the sources in the checkout
and the built library in site-packages, where the distribution's file list finds it."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import sys
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError

_NAMES = {"linux": "libsdrt_kernels.so", "darwin": "libsdrt_kernels.dylib", "win32": "sdrt_kernels.dll"}
_CUDA_NAMES = {"linux": "libsdrt_kernels_cuda.so", "win32": "sdrt_kernels_cuda.dll"}


_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # sdrt/runtime


@functools.cache
def _installed(name: str) -> Path:
    """``sdrt/runtime/lib/<name>``: beside the sources, else among the installed distribution's
    files (editable installs); the path beside the sources when neither has it."""
    here = _PACKAGE_DIR / "lib" / name
    if here.exists():
        return here
    try:
        dist = importlib.metadata.distribution("sdrt")
    except importlib.metadata.PackageNotFoundError:
        return here
    for f in dist.files or ():
        if f.name == name and f.parts[:3] == ("sdrt", "runtime", "lib"):
            found = Path(dist.locate_file(f))
            if found.exists():
                return found
    return here


def library_path() -> Path:
    return _installed(_NAMES.get(sys.platform, "libsdrt_kernels.so"))


def cuda_library_path() -> Path:
    """The CUDA build of the ops (built when nvcc was found at install time): the CPU ops plus
    their CUDA execution provider kernels, registered instead of the CPU library for GPU sessions."""
    return _installed(_CUDA_NAMES.get(sys.platform, "libsdrt_kernels_cuda.so"))


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
    lib.sdrt_attention_f32.argtypes = [f, f, f, f, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int32]
    lib.sdrt_attention_f32.restype = ctypes.c_int32
    lib.sdrt_conv3x3_f32.argtypes = [f, f, f, f, i64, i64, i64, i64, i64, ctypes.c_int32]
    lib.sdrt_conv3x3_f32.restype = ctypes.c_int32
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


# How ai.sdrt.Attention forms its products (kernels/attention/attention.h): "auto" and
# "bfloat16" take bf16 where the CPU has AVX-512 BF16; "float32" is the AVX-512 float32 form, or
# on CPUs without AVX-512 the AVX2/FMA one ("float32-avx2"), else the portable one;
# "float32-avx2" and "float32-portable" name those two forms, callable anywhere for tests (the
# AVX2 one falls to the portable one on a CPU without AVX2/FMA)
ATTENTION_MATH = {"auto": 0, "float32": 1, "bfloat16": 2, "float32-portable": 3, "float32-avx2": 4}
_ATTENTION_FORMS = {1: "float32", 2: "bfloat16", 3: "float32-portable", 4: "float32-avx2"}


def attention_bf16_supported() -> bool:
    """Whether ai.sdrt.Attention runs its bf16 path here (AVX-512 F, BW and BF16)."""
    q = np.zeros((1, 1, 2), np.float32)
    return attention(q, q, q, 1, math="bfloat16")[1] == "bfloat16"


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, scale: float | None = None,
              math: str = "auto") -> tuple[np.ndarray, str]:
    """softmax(scale * q k^T) v per item and head with the compiled CPU kernel (ai.sdrt.Attention).

    q is [B, S, heads*d], k and v [B, L, heads*d] (float32). ``math`` is a key of
    :data:`ATTENTION_MATH`. Returns the output and the form that ran ("float32", "bfloat16",
    "float32-avx2" or "float32-portable")."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise SdrtError(f"attention: q must be [B, S, hidden], k and v [B, L, hidden] alike; got "
                        f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if heads <= 0 or q.shape[2] % heads:
        raise SdrtError(f"attention: hidden size {q.shape[2]} is not a multiple of {heads} heads")
    if math not in ATTENTION_MATH:
        raise SdrtError(f"attention: unknown math {math!r} (choose from {', '.join(ATTENTION_MATH)})")
    out = np.empty_like(q)
    f = ctypes.POINTER(ctypes.c_float)
    b, s, hidden = q.shape
    rc = load().sdrt_attention_f32(q.ctypes.data_as(f), k.ctypes.data_as(f), v.ctypes.data_as(f),
                                   out.ctypes.data_as(f), b, s, k.shape[1], heads, hidden // heads,
                                   float(scale or 0.0), ATTENTION_MATH[math])
    if rc == -2:
        raise SdrtError(f"attention: out of memory for the packed keys and values of k {list(k.shape)}")
    if rc < 0:
        raise SdrtError(f"attention: the kernel refused shapes q {list(q.shape)}, k {list(k.shape)}")
    return out, _ATTENTION_FORMS[rc]


def conv3x3_avx2_supported() -> bool:
    """Whether ai.sdrt.Conv3x3 runs its AVX2/FMA product kernel here."""
    return conv3x3(np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 3, 3), np.float32))[1] == "avx2"


def conv3x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, portable: bool = False) -> tuple[np.ndarray, str]:
    """Conv(x, w, bias) with padding 1 and stride 1 by the compiled Winograd F(4x4, 3x3) kernel
    (ai.sdrt.Conv3x3), one thread: x [N, C, H, W], w [K, C, 3, 3], bias [K] (float32). Returns the
    output and the product kernel that ran ("avx2" or "portable"; ``portable`` forces the latter)."""
    x, w = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, w))
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != x.shape[1] or w.shape[2:] != (3, 3):
        raise SdrtError(f"conv3x3: x must be [N, C, H, W] and w [K, C, 3, 3]; got {list(x.shape)}, {list(w.shape)}")
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if b is not None and b.shape != (w.shape[0],):
        raise SdrtError(f"conv3x3: bias must be [{w.shape[0]}], got {list(b.shape)}")
    n, c, h, width = x.shape
    y = np.empty((n, w.shape[0], h, width), np.float32)
    f = ctypes.POINTER(ctypes.c_float)
    rc = load().sdrt_conv3x3_f32(x.ctypes.data_as(f), w.ctypes.data_as(f), None if b is None else b.ctypes.data_as(f),
                                 y.ctypes.data_as(f), n, c, h, width, w.shape[0], int(portable))
    if rc == -2:
        raise SdrtError(f"conv3x3: out of memory for x {list(x.shape)}, w {list(w.shape)}")
    if rc < 0:
        raise SdrtError(f"conv3x3: the kernel refused x {list(x.shape)}, w {list(w.shape)}")
    return y, "avx2" if rc == 1 else "portable"
