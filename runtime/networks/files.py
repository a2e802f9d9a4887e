"""Network and VAE files read without torch: ``.safetensors`` (with its metadata) and torch pickles
(``.pt`` / ``.ckpt``) through the safe unpickler of ``runtime/text/embeddings.py``; their hashes
as the webui writes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.text.embeddings import read_safetensors, read_torch_pickle

EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header ({} when it has none or is unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > path.stat().st_size - 8:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _flatten(obj, path: Path) -> dict[str, np.ndarray]:
    """A pickle's tensors by key: the top-level dict, or its ``state_dict`` entry."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SdrtError(f"{path}: not a state dict (a {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a network or VAE file, by key (numpy; bf16 widened to float32)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise SdrtError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(EXTENSIONS)})")
    if not path.is_file():
        raise SdrtError(f"{path}: no such file")
    if suffix == ".safetensors":
        return read_safetensors(path)
    return _flatten(read_torch_pickle(path), path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def addnet_hash(path: Path) -> str:
    """kohya-ss's hash of a safetensors file: the sha256 of everything after the header (the
    webui's ``hashes.addnet_hash_safetensors``), unchanged by edits of the metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def network_hash(path: Path, metadata: dict[str, str]) -> str:
    """A LoRA's hash as the webui's ``NetworkOnDisk`` sets it: the ``sshs_model_hash`` metadata, else
    the addnet hash for safetensors, else the file's sha256. ``Lora hashes`` writes 12 digits."""
    return metadata.get("sshs_model_hash") or (addnet_hash(path) if path.suffix.lower() == ".safetensors"
                                               else sha256(path))
