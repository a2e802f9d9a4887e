"""Fidelity: each backend's outputs against the run's reference backend's, on the same weights,
inputs and noise (max-abs and PSNR)."""

from __future__ import annotations

import numpy as np

from sdrt.benchmarks.records import END_TO_END
from sdrt.runtime import metrics
from sdrt.runtime.errors import SdrtError

REFERENCE = "torch-eager-fp32"
REFERENCES = (REFERENCE, "torch-sdpa-fp32")  # the first of these that runs is a run's fidelity reference


def fidelity(reference: np.ndarray, output: np.ndarray, peak: float | None = None) -> dict:
    """Max-abs difference and PSNR (dB; peak = the reference's range unless given) of ``output``."""
    ref, out = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    if ref.shape != out.shape:
        raise SdrtError(f"cannot compare outputs of shapes {ref.shape} and {out.shape}")
    peak = float(ref.max() - ref.min()) if peak is None else peak
    identical = np.array_equal(ref, out)
    return {"max_abs": float(np.max(np.abs(ref - out))),
            "psnr": metrics.psnr(ref, out, peak) if peak > 0 or identical else None}  # None: a constant reference


class Comparison:
    """The outputs of one workload's backends (``.npy`` files) against those of ``reference`` (a
    backend key, None in a run without one), which is measured first."""

    def __init__(self, reference: str | None):
        self.reference = reference
        self._outputs: dict[str, str] = {}  # measurement label -> the reference's output file

    def record(self, key: str, label: str, measurement: str, output: str | None) -> dict | None:
        """The ``fidelity`` field of backend ``key``'s record of ``label``."""
        if output is None or self.reference is None:
            return None
        if key == self.reference:
            self._outputs[label] = output
            return {"against": self.reference, "reference": True}
        if label not in self._outputs:
            return None
        ref, out = np.load(self._outputs[label]), np.load(output)
        if measurement == END_TO_END:  # the 8-bit images, PSNR with peak 255, max-abs in levels
            from sdrt.runtime.pipeline.txt2img import to_uint8

            result = fidelity(to_uint8(ref), to_uint8(out), peak=255.0)
        else:
            result = fidelity(ref, out, peak=1.0 if measurement == "vae_decode" else None)
        return {"against": self.reference, **result}
