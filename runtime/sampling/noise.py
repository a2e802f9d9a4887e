"""Seeded noise, bit-compatible with torch and the AUTOMATIC1111 webui, in numpy only.

* :class:`TorchCPUGenerator` -- ``torch.Generator()`` (CPU, mt19937) with ``torch.randn`` /
  ``torch.rand`` reproduced bit for bit, including how the stream continues between calls.
* :class:`PhiloxNVGenerator` -- the webui's "NV" noise source (Philox4x32-10 + Box-Muller).
* :class:`ImageRNG` -- the webui's per-image generators (``modules/rng.py``, ``ImageRNG``).

torch's CPU ``randn`` (float32, numel >= 16) runs one of two kernels depending on the CPU:

* ``"avx2"``: every x86-64 CPU with AVX2, AVX-512 ones included (torch registers no AVX-512
  ``normal`` kernel, so those fall back to AVX2). It evaluates log/sin/cos with the Cephes
  polynomials of ``avx_mathfun.h``; GCC contracts some of its multiply-adds into FMAs. We
  replay that exact float32 arithmetic, so the result is bit-identical.
* ``"scalar"``: CPUs without AVX2 and non-x86 machines (ARM, Apple Silicon). It calls the C
  library's ``logf``/``cosf``/``sinf``, which are not correctly rounded and differ between
  libraries (glibc, Apple). We use correctly rounded values instead, so roughly 1.5% of the
  outputs differ from torch+glibc by an ulp or so. Close, but not bit-identical.

This module must never import torch.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from sdrt.runtime.errors import SdrtError

__all__ = [
    "TorchCPUGenerator",
    "PhiloxNVGenerator",
    "ImageRNG",
    "BrownianTreeNoise",
    "slerp",
    "create_generator",
    "SOURCES",
    "CPU_KERNELS",
]

SOURCES = ("cpu", "gpu", "nv")
CPU_KERNELS = ("avx2", "scalar")

_F32 = np.float32
_F64 = np.float64
_U32 = np.uint32
_U64 = np.uint64

# Seeds torch.Generator.manual_seed accepts (it unpacks to uint64; negatives wrap).
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1


def _shape_tuple(shape) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a shape tuple, like torch does."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise SdrtError(f"noise shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise SdrtError(f"noise shape must not have negative dimensions, got {dims}")
    return dims


def _seed_int(seed) -> int:
    """Validate a seed the way torch.Generator.manual_seed does and return it as an int."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise SdrtError(f"seed must be an integer, got {seed!r}") from None
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise SdrtError(f"seed {seed} is out of range [-2**63, 2**64)")
    return seed


# --------------------------------------------------------------------------------------------
# float32 arithmetic helpers
# --------------------------------------------------------------------------------------------

def _fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``a*b + c`` with a single rounding (what vfmadd does).

    a*b of two float32 values is exact in float64, so only the float64 addition and the final
    cast round. That double rounding differs from a single rounding only when the float64 sum
    lands exactly half-way between two float32 values while the addition was inexact; those
    (very rare) lanes are redone with the exact addition error (TwoSum) deciding the side.
    Assumes results in the float32 normal range, which holds for every use in this module.
    """
    p = np.multiply(a, b, dtype=_F64)
    s = p + c
    out = s.astype(_F32)
    bits = s.view(_U64)
    tie = (bits & _U64(0x1FFFFFFF)) == _U64(0x10000000)
    if tie.any():
        idx = np.nonzero(tie)
        ps, ss = p[idx], s[idx]
        cs = np.broadcast_to(np.asarray(c, _F64), s.shape)[idx]
        # TwoSum: err is exactly (p + c) - s.
        pv = ss - cs
        err = (ps - pv) + (cs - (ss - pv))
        # Move s one float64 ulp towards the exact value; the cast then rounds correctly.
        nudged = np.where(err != 0, np.nextafter(ss, np.where(err > 0, np.inf, -np.inf)), ss)
        out[idx] = nudged.astype(_F32)
    return out


# --------------------------------------------------------------------------------------------
# torch CPU normal kernels
# --------------------------------------------------------------------------------------------

# avx_mathfun.h constants (Cephes single-precision log / sin / cos), rounded to float32.
_SQRTHF = _F32(0.707106781186547524)
_LOG_P = tuple(_F32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_MINUS_DP1 = _F32(-0.78515625)
_MINUS_DP2 = _F32(-2.4187564849853515625e-4)
_MINUS_DP3 = _F32(-3.77489497744594108e-8)
_SINCOF = tuple(_F32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
_COSCOF = tuple(_F32(v) for v in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2))
_FOPI = _F32(1.27323954473516)  # 4 / pi
_TWO_PI_F32 = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """log256_ps from torch's avx_mathfun.h (Cephes logf), replaying its float32 steps.

    Inputs here are 1 - u with u in [0, 1 - 2**-24], i.e. in [2**-24, 1]: never <= 0 or
    denormal, so the NaN mask and the min-normal clamp of the original are no-ops and left out.
    """
    one = _F32(1.0)
    bits = x.view(_U32)
    # Split x = m * 2**e with m in [0.5, 1): exponent from the bits, mantissa forced to 0.5's.
    e = ((bits >> _U32(23)).astype(np.int32) - 0x7F).astype(_F32) + one
    m = ((bits & _U32(0x807FFFFF)) | _U32(0x3F000000)).view(_F32)
    # if m < sqrt(1/2): e -= 1, m = m + m - 1  else: m = m - 1
    small = m < _SQRTHF
    m = (m - one) + np.where(small, m, _F32(0.0))
    e = e - np.where(small, one, _F32(0.0))
    z = m * m
    # Horner polynomial; GCC fuses each mul+add into an FMA.
    y = np.full_like(m, _LOG_P[0])
    for coef in _LOG_P[1:]:
        y = _fma32(y, m, coef)
    y = y * m
    # y = y*z + e*q1: GCC fuses the y*z product (e*q1 is rounded on its own).
    y = _fma32(y, z, e * _LOG_Q1)
    y = y - z * _F32(0.5)  # z*0.5 is exact, so fused or not is the same
    # x + y + e*q2: e*q2 is exact (q2 has 9 significant bits, |e| <= 25).
    return (m + y) + e * _LOG_Q2


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps from torch's avx_mathfun.h (Cephes sinf/cosf), for x >= 0.

    Inputs here are 2*pi*u in [0, 2*pi), so the sign handling of negative x is left out.
    """
    # Octant: j = (int(x * 4/pi) + 1) & ~1 (cvttps truncates).
    j = (x * _FOPI).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(_F32)
    sin_neg = (j & 4) != 0
    cos_neg = ((j - 2) & 4) == 0
    use_sin_poly_for_sin = (j & 2) == 0
    # Extended-precision reduction x - y*pi/4 in three FMAs.
    x = _fma32(y, _MINUS_DP1, x)
    x = _fma32(y, _MINUS_DP2, x)
    x = _fma32(y, _MINUS_DP3, x)
    z = x * x
    # Cosine polynomial: 1 - z/2 + z*z*P(z); GCC fuses (y*z)*z - z*0.5.
    yc = _fma32(_COSCOF[0], z, _COSCOF[1])
    yc = _fma32(yc, z, _COSCOF[2])
    yc = yc * z
    yc = _fma32(yc, z, -(z * _F32(0.5)))
    yc = yc + _F32(1.0)
    # Sine polynomial: x + x*z*Q(z); the last mul+add is an FMA.
    ys = _fma32(_SINCOF[0], z, _SINCOF[1])
    ys = _fma32(ys, z, _SINCOF[2])
    ys = ys * z
    ys = _fma32(ys, x, x)
    # The original selects by masking and adding to +0.0 (turning -0.0 into +0.0).
    sin = np.where(use_sin_poly_for_sin, ys, yc) + _F32(0.0)
    cos = np.where(use_sin_poly_for_sin, yc, ys) + _F32(0.0)
    sin = np.where(sin_neg, -sin, sin)
    cos = np.where(cos_neg, -cos, cos)
    return sin, cos


def _box_muller16_avx2(u: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16_AVX2 on every block of 16 uniforms (first 8 -> u1, last 8 -> u2)."""
    blocks = u.reshape(-1, 2, 8)
    u1 = _F32(1.0) - blocks[:, 0]  # [0, 1) -> (0, 1] for log
    radius = np.sqrt(_F32(-2.0) * _log_avx2(u1))
    theta = _TWO_PI_F32 * blocks[:, 1]  # float32 product, unlike the scalar kernel
    sin, cos = _sincos_avx2(theta)
    out = np.empty_like(blocks)
    np.multiply(radius, cos, out=out[:, 0])
    np.multiply(radius, sin, out=out[:, 1])
    # fma(n, std=1, mean=+0.0): exact, except that it turns -0.0 (from u1 == 1) into +0.0.
    out += _F32(0.0)
    return out.reshape(-1)


def _box_muller16_scalar(u: np.ndarray) -> np.ndarray:
    """torch's scalar normal_fill_16 on every block of 16 uniforms.

    Deliberate difference: torch calls the C library's logf/cosf/sinf; we round float64
    log/cos/sin to float32 (correctly rounded results). glibc's float functions are not
    correctly rounded, so about 1.5% of outputs differ from torch by an ulp or so.
    """
    blocks = u.reshape(-1, 2, 8)
    u1 = _F32(1.0) - blocks[:, 0]
    log_u1 = np.log(u1.astype(_F64)).astype(_F32)  # ~ logf
    radius = np.sqrt(_F32(-2.0) * log_u1)
    # theta = 2.0f * c10::pi<double> * u2: a double product, then cast to float.
    theta = (_F64(2.0 * math.pi) * blocks[:, 1].astype(_F64)).astype(_F32).astype(_F64)
    out = np.empty_like(blocks)
    np.multiply(radius, np.cos(theta).astype(_F32), out=out[:, 0])  # ~ cosf
    np.multiply(radius, np.sin(theta).astype(_F32), out=out[:, 1])  # ~ sinf
    out += _F32(0.0)  # * std + mean with std=1, mean=+0.0
    return out.reshape(-1)


_KERNELS = {"avx2": _box_muller16_avx2, "scalar": _box_muller16_scalar}


class TorchCPUGenerator:
    """torch's CPU generator (mt19937, torch's Box-Muller ``randn``) reproduced in numpy.

    ``TorchCPUGenerator(seed).randn(shape)`` equals
    ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` bit for bit, and
    further calls continue the stream exactly as further torch calls on that generator do.

    ``kernel`` picks which torch CPU kernel to reproduce (see the module docstring): ``"avx2"``
    (any x86-64 CPU with AVX2; bit-exact) or ``"scalar"`` (ARM / no AVX2; approximate).
    """

    def __init__(self, seed: int, *, kernel: str = "avx2") -> None:
        if kernel not in _KERNELS:
            raise SdrtError(f"unknown CPU noise kernel {kernel!r}; expected one of {', '.join(CPU_KERNELS)}")
        self.kernel = kernel
        self._box_muller16 = _KERNELS[kernel]
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "TorchCPUGenerator":
        """Reseed like ``torch.Generator.manual_seed``: mt19937 init_genrand(seed mod 2**32)."""
        self._seed = _seed_int(seed)
        # numpy's MT19937 legacy seeding is the reference init_genrand; random_raw() then
        # yields the reference genrand_int32 outputs, which is what torch draws.
        self._mt = np.random.MT19937(0)
        self._mt._legacy_seeding(self._seed & 0xFFFFFFFF)
        # torch caches the second value of the double-precision Box-Muller pair; reseeding
        # clears it.
        self._next_double_normal: float | None = None
        return self

    def initial_seed(self) -> int:
        """The seed as torch reports it (negative seeds wrap to uint64)."""
        return self._seed & _SEED_MAX

    # ---- raw draws -------------------------------------------------------------------------

    def _random32(self, n: int) -> np.ndarray:
        """n successive 32-bit mt19937 outputs (``CPUGeneratorImpl::random``)."""
        return self._mt.random_raw(n).astype(_U32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        """torch float uniform [0, 1): one 32-bit draw each, (x & 0xFFFFFF) * 2**-24."""
        return (self._random32(n) & _U32(0xFFFFFF)).astype(_F32) * _F32(2.0 ** -24)

    def _uniform_f64(self, n: int) -> np.ndarray:
        """torch double uniform [0, 1): two 32-bit draws (hi, lo), low 53 bits * 2**-53."""
        r = self._mt.random_raw(2 * n).astype(_U64).reshape(n, 2)
        bits = ((r[:, 0] << _U64(32)) | r[:, 1]) & _U64((1 << 53) - 1)
        return bits.astype(_F64) * 2.0 ** -53

    # ---- public draws ----------------------------------------------------------------------

    def rand(self, shape) -> np.ndarray:
        """``torch.rand(shape, generator=g)`` (float32 uniform in [0, 1))."""
        dims = _shape_tuple(shape)
        return self._uniform_f32(math.prod(dims)).reshape(dims)

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        """``torch.randn(shape, generator=g, dtype=dtype)``: float32 bit for bit; float64 too up to
        the last ulp of the C library's double log/cos/sin (numpy's may differ by one)."""
        dims = _shape_tuple(shape)
        n = math.prod(dims)
        if np.dtype(dtype) == _F64:
            out = self._normal_fill_f64(n) if n >= 16 else self._normal_small(n, _F64)
        elif np.dtype(dtype) == _F32:
            out = self._normal_fill(n) if n >= 16 else self._normal_small(n)
        else:
            raise SdrtError(f"randn supports float32 and float64, not {np.dtype(dtype)}")
        return out.reshape(dims)

    def _normal_fill_f64(self, n: int) -> np.ndarray:
        """torch's double normal_fill: 53-bit uniforms, Box-Muller per block of 16 in double,
        a ragged tail recomputed from 16 fresh uniforms like the float kernel."""
        def box_muller16(u):
            blocks = u.reshape(-1, 2, 8)
            radius = np.sqrt(-2.0 * np.log(1.0 - blocks[:, 0]))
            theta = (2.0 * math.pi) * blocks[:, 1]
            return (np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1) + 0.0).reshape(-1)

        uniforms = self._uniform_f64(n)
        head = n - n % 16
        out = np.empty(n, _F64)
        out[:head] = box_muller16(uniforms[:head])
        if n % 16:
            out[n - 16:] = box_muller16(self._uniform_f64(16))
        return out

    def _normal_fill(self, n: int) -> np.ndarray:
        """torch normal_fill: n uniforms, Box-Muller per block of 16; a ragged tail redraws
        16 fresh uniforms and overwrites the last 16 values with them."""
        uniforms = self._uniform_f32(n)
        if n % 16 == 0:
            return self._box_muller16(uniforms)
        head = n - n % 16
        out = np.empty(n, _F32)
        out[:head] = self._box_muller16(uniforms[:head])
        out[n - 16:] = self._box_muller16(self._uniform_f32(16))
        return out

    def _normal_small(self, n: int, dtype=_F32) -> np.ndarray:
        """numel < 16: torch's double-precision normal_distribution, one value per element,
        with the second value of each Box-Muller pair cached on the generator.

        torch calls the C library's double log1p/cos/sin; numpy's float64 functions agree with
        them to within an ulp of float64, which survives the cast to float32 only in the
        rarest of cases (glibc-backed numpy, as here, agrees exactly)."""
        values: list[np.ndarray] = []
        need = n
        if need and self._next_double_normal is not None:
            values.append(np.array([self._next_double_normal]))
            self._next_double_normal = None
            need -= 1
        if need:
            pairs = (need + 1) // 2
            u = self._uniform_f64(2 * pairs).reshape(pairs, 2)
            u1, u2 = u[:, 0], u[:, 1]
            r = np.sqrt(-2.0 * np.log1p(-u2))
            theta = (2.0 * math.pi) * u1
            both = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)
            values.append(both[:need])
            if need % 2:
                self._next_double_normal = float(both[need])
        if not values:
            return np.empty(0, dtype)
        # transformation::normal: v * std + mean with std=1, mean=0 (turns -0.0 into +0.0).
        return (np.concatenate(values) + 0.0).astype(dtype)

    def __repr__(self) -> str:
        return f"TorchCPUGenerator(seed={self._seed}, kernel={self.kernel!r})"


# --------------------------------------------------------------------------------------------
# webui "NV" source
# --------------------------------------------------------------------------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
# The webui's Box-Muller constants: float32 2**-32 and float32(2**-32 * 2pi).
_NV_INV32 = _F64(_F32(2.3283064e-10))
_NV_INV32_HALF = _F64(_F32(2.3283064e-10) / _F32(2))
_NV_INV32_2PI = _F64(_F32(2.3283064e-10 * 6.2831855))
_NV_INV32_2PI_HALF = _F64(_F32(2.3283064e-10 * 6.2831855) / _F32(2))


def philox4x32_10(counter: Sequence[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox4x32-10 (Salmon et al. 2011) on arrays of 32-bit counter words and one 64-bit key."""
    c0, c1, c2, c3 = (np.asarray(c, _U32).astype(_U64) for c in counter)
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        # 32x32 -> 64-bit products; hi/lo halves feed the next round.
        p0 = c0 * _U64(_PHILOX_M0)
        p1 = c2 * _U64(_PHILOX_M1)
        c0, c1, c2, c3 = (
            (p1 >> _U64(32)) ^ c1 ^ _U64(k0),
            p1 & _U64(_MASK32),
            (p0 >> _U64(32)) ^ c3 ^ _U64(k1),
            p0 & _U64(_MASK32),
        )
    return [c.astype(_U32) for c in (c0, c1, c2, c3)]


class PhiloxNVGenerator:
    """The webui's "NV" noise (``modules/rng_philox.py``): Philox4x32-10 + float64 Box-Muller.

    Element i of the k-th ``randn`` call uses counter (k, 0, i, 0) and key (seed lo, seed hi),
    and keeps one value, sqrt(-2 ln u) * sin(v), from the first two output words -- the
    layout torch's CUDA ``randn`` has for tensors that fit in one grid pass. Like the webui,
    the arithmetic is float64 (CUDA uses float32 intrinsics), so this reproduces the webui's
    NV output, which is close to, but not bit-identical with, torch CUDA noise.
    """

    def __init__(self, seed: int) -> None:
        seed = operator.index(seed)
        if not 0 <= seed <= _SEED_MAX:
            raise SdrtError(f"NV noise seed {seed} is out of range [0, 2**64)")
        self.seed = seed
        self.offset = 0  # number of randn calls so far; the first counter word

    def randn(self, shape) -> np.ndarray:
        """The webui's ``rng_philox.Generator.randn``: float32 standard normal noise."""
        dims = _shape_tuple(shape)
        n = math.prod(dims)
        if n > 1 << 32:
            raise SdrtError("NV noise supports at most 2**32 values per draw")
        zeros = np.zeros(n, _U32)
        counter = (np.full(n, self.offset & _MASK32, _U32), zeros, np.arange(n, dtype=_U32), zeros)
        self.offset += 1
        x, y, _, _ = philox4x32_10(counter, (self.seed & _MASK32, self.seed >> 32))
        # u in (0, 1], v in (0, 2pi]: uint32 * float32 constant, promoted to float64 as in numpy.
        u = x.astype(_F64) * _NV_INV32 + _NV_INV32_HALF
        v = y.astype(_F64) * _NV_INV32_2PI + _NV_INV32_2PI_HALF
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F32).reshape(dims)

    def __repr__(self) -> str:
        return f"PhiloxNVGenerator(seed={self.seed}, offset={self.offset})"


# torch CUDA randn (the webui's "GPU" source): the launch layout of torch's normal_ kernel
_CUDA_BLOCK = 256  # torch's block_size_bound for the random kernels
_CURAND_INV32 = _F32(2.3283064e-10)  # CURAND_2POW32_INV
_CURAND_INV32_2PI = _F32(2.3283064e-10 * 6.2831855)  # CURAND_2POW32_INV_2PI (float product)


class TorchCUDAGenerator:
    """torch's CUDA generator and float32 ``randn``, layout exact, arithmetic approximate.

    torch fills a tensor of n values with a grid of min(ceil(n / 256), SMs * (threads per SM //
    256)) blocks of 256 threads; thread t starts curand's Philox4x32-10 at subsequence t and the
    generator's offset, so its j-th draw uses counter (offset / 4 + j, 0, t, 0) and key (seed lo,
    seed hi). Each draw (four words) is two Box-Muller pairs, written to the elements
    t + stride * (4j + k), k = 0..3 (stride = threads in the grid): sin then cos of each pair. A
    call advances the offset by 4 per draw of a thread, so large tensors depend on the SM count.

    Not bit-exact: curand evaluates ``__sincosf`` (the GPU's approximate special-function unit)
    and libdevice ``logf``; we use correctly rounded float32 sin/cos/log, so values can differ by
    a few ulps. ``benchmarks/gpu`` measures it against torch on a GPU; until that shows it
    bit-exact, ``create_generator`` does not offer the ``gpu`` source.
    """

    def __init__(self, seed: int, *, sm_count: int = 132, threads_per_sm: int = 2048) -> None:
        seed = _seed_int(seed)
        self.seed = seed & _SEED_MAX  # torch's CUDA manual_seed takes it as uint64
        self.max_blocks = int(sm_count) * (int(threads_per_sm) // _CUDA_BLOCK)
        self.offset = 0  # philox_offset_per_thread

    def randn(self, shape) -> np.ndarray:
        """``torch.randn(shape, device="cuda", generator=g)`` (float32)."""
        dims = _shape_tuple(shape)
        n = math.prod(dims)
        if n == 0:
            return np.empty(dims, _F32)
        stride = _CUDA_BLOCK * min(-(-n // _CUDA_BLOCK), self.max_blocks)
        draws = (n - 1) // (stride * 4) + 1  # per thread
        base, self.offset = self.offset, self.offset + draws * 4
        e = np.arange(n, dtype=_U64)
        thread, j, k = e % _U64(stride), e // _U64(4 * stride), (e // _U64(stride)) % _U64(4)
        ctr = _U64(base // 4) + j  # 64-bit counter in words 0-1; the thread in words 2-3
        words = philox4x32_10((ctr & _U64(_MASK32), ctr >> _U64(32), thread & _U64(_MASK32), thread >> _U64(32)),
                              (self.seed & _MASK32, self.seed >> 32))
        pair = (k >= _U64(2))
        x = np.where(pair, words[2], words[0])
        y = np.where(pair, words[3], words[1])
        # _curand_box_muller: u in (0, 1], v in (0, 2pi]; nvcc contracts the mul+add to an FMA
        u = _fma32(x.astype(_F32), _CURAND_INV32, _CURAND_INV32 / _F32(2))
        v = _fma32(y.astype(_F32), _CURAND_INV32_2PI, _CURAND_INV32_2PI / _F32(2))
        s = np.sqrt(_F32(-2.0) * np.log(u.astype(_F64)).astype(_F32))
        trig = np.where(k % _U64(2) == _U64(0), np.sin(v.astype(_F64)), np.cos(v.astype(_F64))).astype(_F32)
        return (trig * s + _F32(0.0)).reshape(dims)  # * std + mean turns -0.0 into +0.0

    def __repr__(self) -> str:
        return f"TorchCUDAGenerator(seed={self.seed}, offset={self.offset})"


# --------------------------------------------------------------------------------------------
# webui per-image RNG
# --------------------------------------------------------------------------------------------

def create_generator(seed: int, source: str = "cpu", *, kernel: str = "avx2"):
    """One seeded noise generator for a webui noise source ("cpu", "gpu" or "nv").

    The returned object has ``randn(shape) -> np.ndarray[float32]``.
    """
    src = _source_name(source)
    if src == "cpu":
        return TorchCPUGenerator(seed, kernel=kernel)
    if src == "nv":
        return PhiloxNVGenerator(seed)
    raise SdrtError("noise source 'gpu' (torch CUDA randn) is not implemented yet; use 'cpu' or 'nv'")


def _source_name(source: str) -> str:
    src = str(source).lower()
    if src not in SOURCES:
        raise SdrtError(f"unknown noise source {source!r}; expected one of {', '.join(SOURCES)}")
    return src


def check_source(source: str) -> str:
    """The canonical name of a noise source (the webui's infotext spells them ``CPU``, ``NV``),
    refusing before any work one that cannot draw here."""
    src = _source_name(source)
    if src == "gpu":
        create_generator(0, src)  # raises its one-line reason
    return src


def slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The webui's variation-seed blend: spherical interpolation from ``low`` (t=0) to ``high``.

    Like the webui, vectors are taken along axis 1 of a (C, H, W) noise (columns), and for nearly
    parallel inputs it falls back to ``low * val + high * (1 - val)`` (sic: the weights swapped).
    """
    low_norm = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_norm = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * np.float32(val) + high * np.float32(1 - val)
    omega = np.arccos(dot)
    so = np.sin(omega)
    return (np.sin((1.0 - val) * omega) / so)[:, None] * low + (np.sin(val * omega) / so)[:, None] * high


class ImageRNG:
    """Per-image noise generators, as the webui's ``modules/rng.py`` ``ImageRNG``.

    One generator per image, seeded with that image's seed. ``first()`` draws the initial
    latent noise, shape ``(len(seeds), *shape)``. When ``ensd`` (eta noise seed delta) is
    non-zero, the generators are then replaced by ones seeded with ``seed + ensd``. ``next()``
    draws fresh noise per image (the sampler's noise); its first call returns ``first()``
    when that has not been drawn yet, as in the webui.

    Variation seeds: with ``subseed_strength`` > 0 the initial noise is ``slerp(strength, noise
    of seed, noise of subseed)``. Seed resize: with ``seed_resize_from_w/h`` > 0 the noise is
    drawn at that (pixel) size and pasted, centred, into fresh noise of the real size, so an
    image keeps its composition when its size changes (as the webui does).

    Deliberate difference: the webui's ``next()`` only tracks its own first call, so calling
    ``first()`` and then ``next()`` there draws the initial noise a second time; here
    ``next()`` after ``first()`` continues with fresh noise.
    """

    def __init__(self, shape, seeds: Sequence[int], *, source: str = "cpu", ensd: int = 0,
                 kernel: str = "avx2", subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0,
                 seed_resize_from_w: int = 0) -> None:
        self.shape = _shape_tuple(shape)
        self.seeds = [_seed_int(s) for s in seeds]
        if not self.seeds:
            raise SdrtError("ImageRNG needs at least one seed")
        self.source = _source_name(source)
        self.ensd = operator.index(ensd)
        self.kernel = kernel
        self.subseeds = None if subseeds is None else [_seed_int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise SdrtError(f"variation seed strength must be in [0, 1], got {subseed_strength}")
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.generators = [create_generator(s, self.source, kernel=kernel) for s in self.seeds]
        self._first_drawn = False

    def _fresh(self, seed: int, shape) -> np.ndarray:
        return create_generator(seed, self.source, kernel=self.kernel).randn(shape)

    def first(self) -> np.ndarray:
        """Initial latent noise for every image, float32 ``(batch, *shape)``."""
        resize = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        # The webui divides the pixel size by 8 whatever the model's VAE factor
        noise_shape = ((self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)
                       if resize else self.shape)
        xs = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._fresh(subseed, noise_shape)
            noise = self._fresh(seed, noise_shape) if noise_shape != self.shape else gen.randn(self.shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise).astype(np.float32)
            if noise_shape != self.shape:
                noise = _paste_centred(noise, gen.randn(self.shape))
            xs.append(noise)
        if self.ensd:
            self.generators = [create_generator(s + self.ensd, self.source, kernel=self.kernel)
                               for s in self.seeds]
        self._first_drawn = True
        return np.stack(xs)

    def next(self) -> np.ndarray:
        """Fresh noise for every image (``first()`` on the first call if not yet drawn)."""
        if not self._first_drawn:
            return self.first()
        return np.stack([g.randn(self.shape) for g in self.generators])


def _paste_centred(noise: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Paste ``noise`` (C, h, w) centred into ``x`` (C, H, W), cropping where it is larger."""
    dx = (x.shape[2] - noise.shape[2]) // 2
    dy = (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return x


# --------------------------------------------------------------------------------------------
# Brownian tree noise (SDE samplers)
# --------------------------------------------------------------------------------------------

class _Interval:
    """A node of the Brownian tree: an interval, its increment W (lazily) and, once split, children."""

    __slots__ = ("start", "end", "parent", "is_left", "midway", "spawn_key", "depth", "w_seed", "left", "right")

    def __init__(self, start, end, parent, is_left):
        self.start, self.end = _round6(start), _round6(end)
        self.parent, self.is_left = parent, is_left
        self.midway = None


def _round6(t: float) -> float:
    """torchsde's time quantisation at tol=1e-6: Python's round(t, 6)."""
    return round(t, 6)


class BrownianTree:
    """One image's Brownian motion on [t0, t1], reproducing torchsde's ``BrownianTree``.

    torchsde (as k-diffusion's ``BrownianTreeNoiseSampler`` uses it: tol 1e-6, pool size 24,
    halfway tree, no Levy area) bisects [t0, t1] at midpoints rounded to 6 decimals; each split
    interval draws its Brownian-bridge noise with a fresh generator whose seed comes from numpy's
    ``SeedSequence(entropy, spawn_key=(key, depth), pool_size=24)``. We replay that with the same
    SeedSequence and our bit-exact torch generator, so the increments equal torchsde's on the CPU.
    ``randn(seed, shape)`` draws one such leaf; results are cached in a small LRU like torchsde's.
    """

    def __init__(self, t0: float, t1: float, shape, entropy: int, randn, cache_size: int = 64):
        self.shape, self.entropy, self.randn = tuple(shape), int(entropy), randn
        self.root = _Interval(t0, t1, None, None)
        self.root.spawn_key, self.root.depth = 0, 0
        w_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=24).generate_state(3)[0]
        w = self.randn(int(w_seed), self.shape)
        self.root_w = w * w.dtype.type(math.sqrt(t1 - t0))
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    def _split_exact(self, node: _Interval, midway: float) -> None:
        node.midway = _round6(midway)
        if node.parent is not None:
            node.spawn_key = 2 * node.parent.spawn_key + (0 if node.is_left else 1)
            node.depth = node.parent.depth + 1
        seq = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.spawn_key, node.depth), pool_size=24)
        node.w_seed = int(seq.generate_state(4)[0])
        node.left = _Interval(node.start, midway, node, True)
        node.right = _Interval(midway, node.end, node, False)

    def _split(self, node: _Interval, midway: float) -> None:
        # Halfway tree: split at the (rounded) midpoint, then recurse towards the wanted point
        self._split_exact(node, 0.5 * (node.end + node.start))
        if midway > node.midway:
            self._split(node.right, midway)
        elif midway < node.midway:
            self._split(node.left, midway)

    def _locate(self, node: _Interval, ta: float, tb: float, out: list) -> None:
        """The existing-or-new intervals that make up [ta, tb], in order (torchsde's ``_loc``)."""
        while True:
            if ta < node.start or tb > node.end:
                node = node.parent  # outside this interval: ask the parent, which is larger
                continue
            if ta == node.start and tb == node.end:
                out.append(node)
                return
            if node.midway is None:
                if ta == node.start:
                    self._split(node, tb)
                    node = node.left
                    continue
                self._split(node, ta)
                node = node.right
                continue
            if tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._locate(node.left, ta, node.midway, out)
                node, ta = node.right, node.midway

    def _increment(self, node: _Interval) -> np.ndarray:
        if node.parent is None:
            return self.root_w
        w = self.cache.get(node)
        if w is not None:
            self.cache.move_to_end(node)
            return w
        parent = node.parent
        pw = self._increment(parent)
        f = pw.dtype.type
        # Brownian bridge: the left part has mean (left/h) W and variance left*right/h
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff = parent.midway - parent.start
        right_diff = parent.end - parent.midway
        mean = pw * f(left_diff) * f(h_reciprocal)
        var = left_diff * right_diff * h_reciprocal
        left_w = mean + f(math.sqrt(var)) * self.randn(parent.w_seed, self.shape)
        w = left_w if node.is_left else pw - left_w
        self.cache[node] = w
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return w

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """W(tb) - W(ta) for t0 <= ta <= tb <= t1 (clamped into the interval like torchsde)."""
        ta = min(max(float(ta), self.root.start), self.root.end)
        tb = min(max(float(tb), self.root.start), self.root.end)
        if ta == tb:
            return np.zeros(self.shape, self.root_w.dtype)
        out: list = []
        self._locate(self.root, _round6(ta), _round6(tb), out)
        w = self._increment(out[0])
        for node in out[1:]:
            w = w + self._increment(node)
        return w


class BrownianTreeNoise:
    """The noise of k-diffusion's ``BrownianTreeNoiseSampler`` with one tree per image seed.

    ``noise(sigma, sigma_next)`` is the tree's increment between the two sigmas divided by the
    square root of their distance: standard normal per step, and correlated across steps and
    batch sizes the way the webui's SDE samplers are (``create_noise_sampler``).

    The leaves are drawn with a fresh generator of the image's noise source: ``cpu`` is torch's
    CPU generator bit for bit, so this equals the webui running the sampler on the CPU; ``nv``
    uses Philox (the webui's GPU draws them with torch's CUDA generator, which NV approximates).
    """

    def __init__(self, shape, seeds: Sequence[int], sigma_min: float, sigma_max: float, *,
                 source: str = "cpu", dtype=np.float32, kernel: str = "avx2"):
        source = _source_name(source)
        dtype = np.dtype(dtype)

        def randn(seed, shape):
            gen = create_generator(seed, source, kernel=kernel)
            return gen.randn(shape, dtype) if source == "cpu" else gen.randn(shape).astype(dtype)

        t0, t1 = sorted((float(sigma_min), float(sigma_max)))
        self.trees = [BrownianTree(t0, t1, shape, _seed_int(s), randn) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> np.ndarray:
        sigma, sigma_next = float(sigma), float(sigma_next)
        # Going down in sigma is going back in the tree's time: the increment changes sign
        ta, tb, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        w = np.stack([tree(ta, tb) for tree in self.trees])
        if ta == tb:
            return w  # zeros (k-diffusion would divide 0 by 0)
        if sign < 0:
            w = -w
        return w / w.dtype.type(abs(tb - ta) ** 0.5)
