"""Provenance by data: for each graph initializer, the source weight it holds and how it was transformed.

Each component's source tensors (the diffusers state dict the graphs were exported from) are
hashed in every layout an initializer may hold them in: as they are (``identity``, or
``reshape`` when the shape differs), transposed (2-D weights: torch exports ``Linear`` as
``MatMul`` by the transposed weight), in float32 and float16. Each float initializer of each
``.onnx`` file of the component is hashed the same way and looked up; one not found whole is
tried as a concat of equal parts along each axis (fused projections). A match is then checked
element for element (a float16 one up to the fp16 conversion's clamping of tiny values). No name is compared: what the exporter and the graph passes call a weight
(``onnx::MatMul_1234``, ``sdrt_gn_gamma_7``) does not matter.

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
from sdrt.runtime.networks import onnx_weights
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


def component_provenance(component_dir: Path, sources: dict[str, np.ndarray], ldm: dict[str, str]) -> dict:
    index = _Index(sources)
    graphs = {p.name: graph_provenance(p, index) for p in sorted(Path(component_dir).glob("*.onnx"))}
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
            log.info("%s/%s: %d initializers from %d source weights, %d graph constants", name, g,
                     len(entry["initializers"]), len({p[0] for e in entry["initializers"].values() for p in e["from"]}),
                     len(entry["unmatched"]))
        tmp = folder / f".{FILENAME}.partial"
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        tmp.replace(folder / FILENAME)
