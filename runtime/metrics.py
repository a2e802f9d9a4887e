"""Fidelity figures shared by ``sdrt verify``, the export's precision measurements and the benchmarks."""

from __future__ import annotations

import math

import numpy as np


def psnr(ref: np.ndarray, out: np.ndarray, peak: float | None = None) -> float:
    """PSNR of ``out`` against ``ref``; the peak is the reference's range unless given."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    mse = float(np.mean((ref - out) ** 2))
    peak = float(ref.max() - ref.min()) if peak is None else peak
    if mse == 0:
        return float("inf")
    return 10 * math.log10(peak**2 / mse)
