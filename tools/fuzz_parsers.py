"""Coverage-guided fuzz targets (atheris) for sdrt's parsers of untrusted text and files.

    python -m tools.fuzz_parsers TARGET [libFuzzer options, e.g. -max_total_time=15 CORPUS_DIR]

Targets: ``safetensors`` (the torch-free header reader of embeddings, runtime/text/embeddings.py),
``manifest`` (``Manifest.from_json`` on JSON mutated from a real manifest, and raw JSON),
``infotext`` (runtime/png.py ``parse_infotext``, and writing back what it read) and ``prompt``
(runtime/text/prompt.py's prompt language and runtime/text/extra_networks.py's tags). Each input
may be refused with the documented one-line ``SdrtError`` (``CheckpointError`` included); any
other exception is a crash: atheris prints it and writes the input as ``crash-*`` (the
``-artifact_prefix`` option sets where). tests/test_fuzz.py runs each target for a bounded time.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

import atheris
from sdrt.runtime import bundle, png
from sdrt.runtime.bundle import Manifest
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.text import embeddings, extra_networks, prompt
from sdrt.runtime.text.embeddings import read_safetensors


def _instrument(module) -> None:
    """Coverage for a module's functions and methods (atheris patches their code in place)."""
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        for fn in (vars(obj).values() if inspect.isclass(obj) else (obj,)):
            fn = getattr(fn, "__func__", fn)  # classmethods, staticmethods
            if inspect.isfunction(fn):
                atheris.instrument_func(fn)


# Where the safetensors target writes its file (SDRT_FUZZ_TMP, else a new temporary folder)
_TMP = Path("/nonexistent")


_HEADER_VALUES = (None, True, 0, -1, 1, 4, 2**31, 2**62, 2**64, 1.5, 1e400, float("nan"), "F32", "F16", "BF16",
                  "I64", "x", [], [0], [1, 4], [0, 16], [16, 0], [2**62, 4], {}, {"a": "b"})


def _safetensors_header(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A JSON header of one to three tensors whose fields are drawn from odd values."""
    entries = {}
    for i in range(fdp.ConsumeIntInRange(1, 3)):
        entry = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}
        for key in list(entry):
            if fdp.ConsumeBool():
                entry[key] = copy.deepcopy(_HEADER_VALUES[fdp.ConsumeIntInRange(0, len(_HEADER_VALUES) - 1)])
        entries["__metadata__" if i == 0 and fdp.ConsumeBool() else f"t{i}"] = entry
    return json.dumps(entries).encode()


def fuzz_safetensors(data: bytes) -> None:
    path = _TMP / "x.safetensors"
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():  # a well-framed file with a strange header
        header = _safetensors_header(fdp)
        data = len(header).to_bytes(8, "little") + header + fdp.ConsumeBytes(fdp.remaining_bytes())
    path.write_bytes(data)
    try:
        read_safetensors(path)
    except SdrtError:
        pass


# A manifest as sdrt export writes it (the shape of the tiny model's), the base for mutations
BASE_MANIFEST = {
    "format": "sdrt-bundle", "format_version": 1, "architecture": "sd1", "prediction_type": "epsilon",
    "latent_channels": 4, "vae_scale_factor": 8, "latent_scale_factor": 0.18215, "default_size": [64, 64],
    "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear"},
    "text_encoder": {"hidden_size": 32, "num_layers": 2, "token_embeddings": "text_encoder/token_embeddings.npy",
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    "components": {
        name: {"path": f"{name}/model.onnx", "precision": "fp32",
               "optimized": {"cpu": {"path": f"{name}/model.cpu.onnx", "custom_ops": True}}}
        for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder")},
    "source": {"name": "tiny", "kind": "safetensors", "sha256": None, "hash": None},
    "precisions": {"cpu": {"int8": {"components": {"unet": {}}, "min_default_psnr": 35.0, "fidelity": None,
                                    "default": False}}},
}
_VALUES = (None, True, False, 0, -1, 1, 2, 3, 7, 2**63, -2**63, 1.5, -0.5, 1e308, float("nan"), float("inf"), "",
           "x", "../x", "/etc/hostname", "unet/model.onnx", [], [1], [64, 64], [0, -8], {}, {"path": "x"})


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutated_manifest(fdp: atheris.FuzzedDataProvider):
    m = json.loads(json.dumps(BASE_MANIFEST))
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        paths = list(_paths(m))
        path = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
        how = fdp.ConsumeIntInRange(0, 3)
        value = (copy.deepcopy(_VALUES[fdp.ConsumeIntInRange(0, len(_VALUES) - 1)]) if how == 0 else
                 fdp.ConsumeInt(8) if how == 1 else fdp.ConsumeUnicodeNoSurrogates(12) if how == 2 else ...)
        if not path:
            m = value if value is not ... else None
            continue
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if value is ...:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return m


def fuzz_manifest(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        m = _mutated_manifest(fdp)
    else:
        try:
            m = json.loads(fdp.ConsumeBytes(fdp.remaining_bytes()))
        except ValueError:
            return
    try:
        Manifest.from_json(m, _TMP)
    except SdrtError:
        pass


def fuzz_infotext(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    positive, negative, params = png.parse_infotext(text)
    png.infotext(positive, negative, params)


def fuzz_prompt(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    steps = fdp.ConsumeIntInRange(1, 150)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    try:
        stripped, networks = extra_networks.parse_prompt(text)
        for network in networks:
            network.multipliers()
        for sub in prompt.parse_prompt(stripped, steps):
            for _, scheduled in sub.schedule:
                prompt.parse_emphasis(scheduled)
    except SdrtError:
        pass


TARGETS = {"safetensors": fuzz_safetensors, "manifest": fuzz_manifest, "infotext": fuzz_infotext,
           "prompt": fuzz_prompt}


def seeds(target: str) -> list[bytes]:
    """A few well-formed inputs to start the target's corpus from."""
    if target == "safetensors":
        header = json.dumps({"__metadata__": {"a": "b"}, "emb": {"dtype": "F32", "shape": [1, 4],
                                                                 "data_offsets": [0, 16]}}).encode()
        return [b"\x00" + len(header).to_bytes(8, "little") + header + bytes(16), b"\x01" * 24]
    if target == "manifest":
        return [b"\x00" + json.dumps(BASE_MANIFEST).encode(), b"\x01" * 32]
    if target == "infotext":
        return [(b"a (cat:1.2), [dog|fox]\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                 b"CFG scale: 7, Seed: 1, Size: 512x512, Lora hashes: \"x: 1, y: 2\"")]
    return [b"\x10a (cat:1.2) [dog:fox:0.5] [a|b] <lora:x:0.5:unet=1> BREAK \\(x\\) AND c :0.3"]


if __name__ == "__main__":
    name = sys.argv.pop(1)
    _TMP = Path(os.environ.get("SDRT_FUZZ_TMP") or tempfile.mkdtemp(prefix="sdrt-fuzz-"))
    for module in (bundle, png, embeddings, extra_networks, prompt):
        _instrument(module)
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()
