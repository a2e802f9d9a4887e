"""Weights re-quantized the way the exporter's quantizer made them, for LoRA on int8 graphs.

``sdrt export --precision int8`` / ``int8-static`` (``sdrt.export.quantize``) run ONNX Runtime's
quantizer, which turns a float weight ``W`` into an int8 initializer ``W_quantized`` with its
scale ``W_scale`` and zero point ``W_zero_point`` (per tensor, or per output channel along an
axis), and a convolution's float bias into int32 ``B_quantized`` at the scale ``input scale x
weight scale``. The exporter's provenance records, for each such initializer, the float
initializer of the graph it was quantized from and the parameters below, each checked at export
by quantizing that float value again here and comparing bit for bit (``sdrt.export.provenance``).

A merged weight is quantized again with this same arithmetic (ONNX Runtime's
``quantize_data`` / ``compute_scale_zp`` / ``quantize_nparray`` / ``quantize_bias_static_impl``,
version 1.32): range ``[min(w, 0), max(w, 0)]``, made symmetric ``[-absmax, absmax]`` for
symmetric weights; scale ``(rmax - rmin) / (qmax - qmin)`` in float64 stored as float32 (1.0 if
below float32's smallest normal); zero point ``round((qmin + qmax) / 2)`` symmetric, else
``round(qmin - rmin / scale)``; values ``round(w / scale) + zero point`` in float32, rounded half to
even, clipped to the type's full range. The new scale follows the merged weight's range, so the
LoRA costs no clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = {"int8": np.int8, "uint8": np.uint8}


@dataclass(frozen=True)
class Scheme:
    """How one weight was quantized: its integer type, the range its scale spans (``qmin`` ..
    ``qmax``: -127..127 for symmetric int8), symmetric or not, per tensor (``axis`` None) or per
    channel along ``axis``."""

    dtype: str
    qmin: int
    qmax: int
    symmetric: bool
    axis: int | None = None


def scale_zero_point(rmin: np.ndarray, rmax: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale (float32) and zero point, as ONNX Runtime's ``compute_scale_zp``."""
    rmin = np.minimum(rmin, np.float32(0))
    rmax = np.maximum(rmax, np.float32(0))
    if scheme.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.float64(scheme.qmax) - np.float64(scheme.qmin))
    tiny = scale < np.finfo(np.float32).tiny
    if scheme.symmetric:
        zero = np.full(scale.shape, np.round((scheme.qmin + scheme.qmax) / 2.0))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.round(scheme.qmin - rmin.astype(np.float64) / scale)
    zero = np.where(tiny, 0, zero).astype(DTYPES[scheme.dtype])
    return np.where(tiny, np.float32(1.0), scale.astype(np.float32)).astype(np.float32), zero


def quantize(value: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, scale, zero point) of a float weight: values in ``value``'s shape, scale and zero
    point 0-d per tensor or 1-d along the scheme's axis."""
    value = np.asarray(value, np.float32)
    if scheme.axis is None:
        rows = value.reshape(1, -1)
    else:
        rows = np.moveaxis(value, scheme.axis, 0).reshape(value.shape[scheme.axis], -1)
    scale, zero = scale_zero_point(rows.min(axis=1), rows.max(axis=1), scheme)
    info = np.iinfo(DTYPES[scheme.dtype])
    q = np.round(rows / scale[:, None]) + zero[:, None].astype(np.float32)
    q = np.clip(q, info.min, info.max).astype(DTYPES[scheme.dtype])
    if scheme.axis is None:
        return q.reshape(value.shape), scale.reshape(()), zero.reshape(())
    moved = list(value.shape)
    moved.insert(0, moved.pop(scheme.axis))
    return np.moveaxis(q.reshape(moved), 0, scheme.axis), scale, zero


def quantize_bias(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """A convolution's bias in int32 at the scale ``input_scale * weight_scale`` (zero point 0), as
    ONNX Runtime's ``quantize_bias_static_impl``."""
    scale = np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32)
    q = np.round(np.asarray(bias, np.float64) / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, np.float64(info.min), np.float64(info.max)).astype(np.int32).reshape(np.shape(bias))
