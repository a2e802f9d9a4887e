"""Graph precisions: which exist, which device kind each is made for, and which one a pipeline runs.

Light on imports: the CLI reads the names for its options."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdrt.runtime.errors import SdrtError

if TYPE_CHECKING:
    from sdrt.runtime.bundle import Bundle

# The device kind each reduced precision's graphs are made for (sdrt.export.quantize): int8 and
# int8-static CPU graphs, fp16 CUDA graphs; mixed: per component the fastest CPU variant whose
# measured effect on the final image holds, its own graph only where that is int8-static with
# some layers kept in fp32 (MIXED_LAYERS; Bundle.graph)
PRECISION_KINDS = {"int8": "cpu", "int8-static": "cpu", "mixed": "cpu", "fp16": "cuda"}
# What a component of ``mixed`` runs when int8-static held only with some layers kept in fp32,
# chosen by measurement at export: its own graph, the ``cpu-mixed`` variant (model.cpu-mixed.onnx)
MIXED_LAYERS = "int8-static per layer"
PRECISIONS = ("fp32", *PRECISION_KINDS)


def resolve_precision(bundle: Bundle, device: str, precision: str) -> str:
    """The precision a pipeline runs: ``auto`` is the device's measured default (see
    :meth:`Bundle.default_precision`); a named one must have been exported for the device kind.

    Deliberate difference from the webui (docs/DIFFERENCES.md): it has no int8 path, and its CPU
    runs fp32; here ``auto`` may run a measured int8 graph."""
    kind = device.split(":")[0]
    if precision == "auto":
        return bundle.default_precision(device) if kind in ("cpu", "cuda") else "fp32"
    if precision not in PRECISIONS:
        raise SdrtError(f"unknown precision {precision!r}; valid: auto, {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return precision
    if kind not in ("cpu", "cuda"):
        raise SdrtError(f"--precision {precision} applies to the cpu and cuda devices; TensorRT engines take "
                        "theirs from `sdrt build --precision`")
    if precision not in bundle.precisions(device):
        where = PRECISION_KINDS[precision]
        hint = (f"export them with `sdrt export --precision {precision}`" if where == kind
                else f"{precision} graphs are made for the {where} device")
        raise SdrtError(f"bundle {bundle.name} has no {precision} graphs for {kind} ({hint})")
    return precision


def int8_saturates() -> bool:
    """Whether this CPU's int8 products can saturate in ONNX Runtime's u8 x s8 kernels: x86 CPUs
    without VNNI (AVX2's ``vpmaddubsw`` adds pairs of products into int16, which clips at 32767;
    VNNI's ``vpdpbusd`` and Arm's dot products add into int32). An int8 graph's fidelity measured
    on a CPU with VNNI does not hold on one without it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = _cpuinfo_flags()
    if flags is not None:  # Linux: the kernel's names (numpy 2's table has no AVX-VNNI entry)
        return not ({"avx512_vnni", "avx_vnni"} & flags)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:  # the table is numpy's own: without it, assume the worse case
            return True
    return not (features.get("AVX512VNNI") or features.get("AVXVNNI"))


def _cpuinfo_flags() -> set[str] | None:
    """The first processor's feature flags from /proc/cpuinfo; None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def describe(bundle: Bundle, device: str, precision: str) -> str:
    """The precision a pipeline runs, for the PNG text: its name, and for ``mixed`` what each
    component runs (``mixed (unet int8, vae_decoder int8-static)``)."""
    if precision != "mixed":
        return precision
    chosen = bundle.mixed_components(device)
    return f"mixed ({', '.join(f'{k} {v}' for k, v in chosen.items() if v != 'fp32') or 'fp32'})"
