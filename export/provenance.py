"""Provenance by data: for each graph initializer, the source weight it holds and how it was transformed.

Each component's source tensors (the diffusers state dict the graphs were exported from) are
hashed in every layout an initializer may hold them in: as they are (``identity``, or
``reshape`` when the shape differs), transposed (2-D weights: torch exports ``Linear`` as
``MatMul`` by the transposed weight), in float32 and float16. Each float initializer of each
``.onnx`` file of the component is hashed the same way and looked up; one not found whole is
tried as a concat of equal parts along each axis (fused projections). A match is then checked
element for element (a float16 one up to the fp16 conversion's clamping of tiny values). No name is compared: what the exporter and the graph passes call a weight
(``onnx::MatMul_1234``, ``sdrt_gn_gamma_7``) does not matter.

The int8 graphs' quantized weights (``W_quantized`` with ``W_scale`` and ``W_zero_point``, as
ONNX Runtime's quantizer names them; a convolution's int32 ``B_quantized``) hold no source as
they are: each is recorded with the float initializer of the component's float graph it was
quantized from and the quantization (per tensor or per channel along an axis, symmetric or
not, the scale's range), found by name and accepted only when quantizing that float value again
(:mod:`sdrt.runtime.networks.quantized`) gives the int8 values, the scale and the zero point
bit for bit; a LoRA then re-quantizes the merged weight the same way.

Sources whose elements are all equal (a zero bias, a unit scale) are not indexed: the graph's
own constants would match them by accident. The result (:mod:`sdrt.runtime.networks.provenance`
documents the format) goes into ``<component>/provenance.json``; ``unmatched`` lists the float
initializers of more than one element that hold no source (constants of the graph itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from sdrt.runtime.networks import onnx_weights, quantized
from sdrt.runtime.networks.provenance import FILENAME, FORMAT, VERSION

log = logging.getLogger(__name__)

MAX_PARTS = 4  # a concat of up to this many equal parts (q/k/v: 3, GEGLU halves: 2)
HALF_CLAMP = 2e-7  # how far a float16 graph's tiny values may sit from the cast source's


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()


class _Index:
    """Source tensors by (dtype, element count, digest), per layout."""

    def __init__(self, sources: dict[str, np.ndarray]):
        self.sources = sources
        self._by_dtype: dict[str, dict] = {}

    def table(self, dtype) -> dict:
        name = np.dtype(dtype).name
        if name not in self._by_dtype:
            table: dict[tuple, list] = {}
            for key, value in self.sources.items():
                if value.size < 2 or np.all(value == value.flat[0]):
                    continue
                cast = value.astype(dtype)
                layouts = [("identity", cast)]
                if cast.ndim == 2:
                    layouts.append(("transpose", cast.T))
                for transform, arr in layouts:
                    table.setdefault((cast.size, _digest(arr)), []).append((key, transform))
            self._by_dtype[name] = table
        return self._by_dtype[name]

    def find(self, value: np.ndarray) -> list[tuple[str, str]]:
        """(key, transform) of every source this array holds whole, checked element for element."""
        found = []
        for key, transform in self.table(value.dtype).get((value.size, _digest(value)), []):
            source = self.sources[key].astype(value.dtype)
            layout = source.T if transform == "transpose" else source
            if not np.array_equal(np.ascontiguousarray(layout).reshape(-1), value.reshape(-1)):
                continue
            if transform == "transpose" and value.ndim != 2:
                continue
            if transform == "identity" and tuple(value.shape) != tuple(source.shape):
                transform = "reshape"
            found.append((key, transform))
        return found


def _near_half(index: _Index, value: np.ndarray) -> list[tuple[str, str]]:
    """A float16 initializer equal to a source's cast but for its tiniest elements: the fp16
    conversion (onnxconverter-common) clamps magnitudes below ~1e-7 up to its smallest value."""
    if value.dtype != np.float16:
        return []
    v = value.astype(np.float32).reshape(-1)
    for key, source in index.sources.items():
        if source.size != value.size:
            continue
        layouts = [("identity", source)] + ([("transpose", source.T)] if source.ndim == 2 else [])
        for transform, arr in layouts:
            cast = np.ascontiguousarray(arr).astype(np.float16).astype(np.float32).reshape(-1)
            if np.max(np.abs(cast - v)) <= HALF_CLAMP:
                if transform == "identity" and tuple(value.shape) != tuple(source.shape):
                    transform = "reshape"
                if transform != "transpose" or value.ndim == 2:
                    return [(key, transform)]
    return []


def _concat(index: _Index, value: np.ndarray) -> tuple[list[tuple[str, str]], int] | None:
    for axis in range(value.ndim):
        for n in range(2, MAX_PARTS + 1):
            if value.shape[axis] % n:
                continue
            parts = []
            for piece in np.split(value, n, axis=axis):
                found = index.find(np.ascontiguousarray(piece))
                if not found:
                    break
                parts.append(found[0])
            else:
                return parts, axis
    return None


def graph_provenance(path: Path, index: _Index) -> dict:
    """The provenance entry of one graph file."""
    weights = onnx_weights.GraphWeights(path)
    entries, unmatched, quantized = {}, [], False
    for name, t in weights.index.items():
        if t.data_type in (2, 3) and t.size > 1:  # uint8 / int8: quantized weights
            quantized = True
        if not t.is_float or t.size < 2:
            continue
        value = np.asarray(weights.read(name))
        found = index.find(value) or _near_half(index, value)
        if found:
            (key, transform), *rest = found
            entry = {"from": [[key, transform]]}
            if rest:
                entry["same"] = [k for k, _ in rest]
            entries[name] = entry
            continue
        concat = _concat(index, value)
        if concat is not None:
            entries[name] = {"from": [list(p) for p in concat[0]], "axis": concat[1]}
        else:
            unmatched.append(name)
    return {"quantized": quantized, "initializers": entries, "unmatched": sorted(unmatched)}


QUANTIZED_SUFFIX = "_quantized"  # ONNX Runtime's quantizer: W -> W_quantized, W_scale, W_zero_point
TRANSPOSED_SUFFIX = "_Transposed"  # its transposed copy of a Gemm's weight (transB)


def _schemes(q: np.ndarray, scale_size: int, shape: tuple[int, ...]):
    """The quantizations that could have made ``q`` (int8 / uint8) with a scale of ``scale_size``."""
    dtype = np.dtype(q.dtype).name
    info = np.iinfo(q.dtype)
    axes = [None] if scale_size == 1 else [a for a in range(len(shape)) if shape[a] == scale_size]
    for axis in axes:
        for symmetric in (True, False):
            low, high = (-127, 127) if symmetric and dtype == "int8" else (int(info.min), int(info.max))
            yield quantized.Scheme(dtype, low, high, symmetric, axis)


def quantization_records(path: Path, floats: dict[str, onnx_weights.GraphWeights]) -> tuple[dict, list[str]]:
    """({quantized initializer: its record}, quantized initializers no float weight reproduces) of
    the graph at ``path``; ``floats``: the component's float graphs by file name."""
    import onnx

    weights = onnx_weights.GraphWeights(path)
    biases = {}  # W_quantized -> (B_quantized, input scale) of the QLinearConvs that read it
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "QLinearConv" and len(node.input) > 8 and node.input[8]:
            biases[node.input[3]] = (node.input[8], node.input[1])
    records, unproven = {}, []
    for name, t in weights.index.items():
        if t.data_type not in (2, 3) or t.size < 2 or not name.endswith(QUANTIZED_SUFFIX):
            continue
        base = name[:-len(QUANTIZED_SUFFIX)]
        scale, zero = base + "_scale", base + "_zero_point"
        if scale not in weights.index or zero not in weights.index:
            unproven.append(name)
            continue
        q, s, z = weights.read(name), np.asarray(weights.read(scale), np.float32), weights.read(zero)
        candidates = [(base, False)] + ([(base[:-len(TRANSPOSED_SUFFIX)], True)]
                                        if base.endswith(TRANSPOSED_SUFFIX) else [])
        record = None
        for graph, fw in floats.items():
            for initializer, transpose in candidates:
                ft = fw.index.get(initializer)
                if ft is None or ft.data_type != 1 or ft.size != q.size:
                    continue
                value = np.asarray(fw.read(initializer), np.float32)
                value = value.T if transpose else value
                if value.shape != q.shape:
                    continue
                for scheme in _schemes(q, s.size, q.shape):
                    q2, s2, z2 = quantized.quantize(value, scheme)
                    if (np.array_equal(q2, q) and s2.tobytes() == s.reshape(s2.shape).tobytes()
                            and np.array_equal(z2.reshape(-1), z.reshape(-1))):
                        record = {"graph": graph, "initializer": initializer, "transpose": transpose,
                                  "scale": scale, "zero_point": zero, "dtype": scheme.dtype,
                                  "range": [scheme.qmin, scheme.qmax], "symmetric": scheme.symmetric,
                                  "axis": scheme.axis, "rounding": "half to even"}
                        break
                if record:
                    break
            if record:
                break
        if record and name in biases:
            bias_q, input_scale = biases[name]
            bias = bias_q[:-len(QUANTIZED_SUFFIX)] if bias_q.endswith(QUANTIZED_SUFFIX) else None
            fw = floats[record["graph"]]
            if (bias is None or bias not in fw.index or input_scale not in weights.index
                    or not np.array_equal(quantized.quantize_bias(fw.read(bias), weights.read(input_scale), s),
                                          weights.read(bias_q))):
                record = None
            else:
                record["bias"] = {"quantized": bias_q, "initializer": bias, "input_scale": input_scale}
        if record:
            records[name] = record
        else:
            unproven.append(name)
    return records, sorted(unproven)


def component_provenance(component_dir: Path, sources: dict[str, np.ndarray], ldm: dict[str, str]) -> dict:
    index = _Index(sources)
    paths = sorted(Path(component_dir).glob("*.onnx"))
    graphs = {p.name: graph_provenance(p, index) for p in paths}
    floats = {p.name: onnx_weights.GraphWeights(p) for p in paths if not graphs[p.name]["quantized"]}
    for p in paths:
        if graphs[p.name]["quantized"]:
            records, unproven = quantization_records(p, floats)
            graphs[p.name]["quantization"] = records
            graphs[p.name]["unrecorded"] = unproven
    return {
        "format": FORMAT,
        "version": VERSION,
        "component": Path(component_dir).name,
        "sources": {k: {"shape": list(v.shape), "ldm": ldm.get(k)} for k, v in sources.items()},
        "graphs": graphs,
    }


def state_arrays(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays (float tensors only)."""
    import torch

    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in module.state_dict().items()
            if v.is_floating_point()}


def write_provenance(bundle_dir: Path, modules: dict, configs: dict) -> None:
    """``<component>/provenance.json`` for each component in ``modules`` (name -> torch module),
    written to a temporary name and renamed. ``ldm`` names come from the one key conversion
    (``convert.key_map``); configs it cannot map (other architectures) leave them out."""
    from sdrt.export import convert

    try:
        ldm_maps = convert.key_map(configs)
    except Exception:  # noqa: BLE001 - a config the LDM layout cannot express: no LDM names
        ldm_maps = {}
    cache: dict[int, dict] = {}
    for name, module in modules.items():
        folder = Path(bundle_dir) / name
        if module is None or not folder.is_dir():
            continue
        sources = cache.setdefault(id(module), state_arrays(module))
        if name.startswith("text_encoder"):  # the diffusers file layout, whatever transformers calls the module's keys
            sources = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sources.items()}
        ldm = ldm_maps.get({"vae_decoder": "vae", "vae_encoder": "vae"}.get(name, name), {})
        if name in ("vae_decoder", "vae_encoder"):
            prefix = "decoder." if name == "vae_decoder" else "encoder."
            keep = ("post_quant_conv.",) if name == "vae_decoder" else ("quant_conv.",)
            sources = {k: v for k, v in sources.items() if k.startswith((prefix, *keep))}
        d = component_provenance(folder, sources, ldm)
        for g, entry in d["graphs"].items():
            log.info("%s/%s: %d initializers from %d source weights, %d graph constants, %d quantized weights "
                     "recorded (%d not)", name, g, len(entry["initializers"]),
                     len({p[0] for e in entry["initializers"].values() for p in e["from"]}),
                     len(entry["unmatched"]), len(entry.get("quantization", {})), len(entry.get("unrecorded", [])))
        tmp = folder / f".{FILENAME}.partial"
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        tmp.replace(folder / FILENAME)
