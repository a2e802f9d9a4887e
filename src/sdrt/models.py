"""``--model``: a bundle, a diffusers folder or a checkpoint file -> a bundle directory.

Checkpoints and diffusers folders are exported once into a cache keyed by their content
(sha256 of the file; of the weight files for a folder) and the sdrt version; a stale or
partial cache entry is never read because bundles are renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from sdrt import runtime
from sdrt.runtime import __version__
from sdrt.runtime.bundle import MANIFEST, file_sha256
from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def default_model_path() -> Path:
    """The embedded default model shipped inside the package."""
    return Path(runtime.__file__).parent / "data" / "default_model"


def cache_dir() -> Path:
    root = os.environ.get("SDRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"
    return Path(root)


def is_bundle(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).exists() or (path / "unet" / "model.onnx").exists())


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").exists() and (path / "unet" / "config.json").exists() \
        and not (path / "unet" / "model.onnx").exists()


def content_hash(path: Path) -> str:
    """sha256 of a checkpoint file (remembered by size and mtime, as the webui caches hashes);
    for a diffusers folder, a sha256 over its weight and config files."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.suffix in (*CHECKPOINT_SUFFIXES, ".json", ".txt"))
    memo_path = cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    outer = hashlib.sha256()
    digests = []
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(f)
        digests.append(memo[key])
        outer.update(f"{f.relative_to(path) if path.is_dir() else ''}:{memo[key]}\n".encode())
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        log.warning("could not write the hash cache %s", memo_path)
    return digests[0] if path.is_file() else outer.hexdigest()


def resolve_model(model: str | Path | None,
                  progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The bundle directory for ``--model``, exporting a checkpoint into the cache on first use."""
    if model is None:
        path = default_model_path()
        if not is_bundle(path):
            raise SdrtError(f"the embedded default model is missing from this installation ({path}); "
                            "pass --model")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise SdrtError(f"model not found: {model}")
    if is_bundle(path):
        return path
    if not (is_diffusers_folder(path) or (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES)):
        raise SdrtError(f"not a bundle, diffusers folder or checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}): {model}")
    digest = content_hash(path)
    target = cache_dir() / "bundles" / f"{digest[:16]}-sdrt{__version__}"
    if is_bundle(target):
        log.info("using cached bundle %s for %s", target, path)
        return target
    try:
        from sdrt.export.write import export_checkpoint
    except ImportError as e:
        raise SdrtError(f"{path.name} must be exported first, which needs the export extra "
                        f"(missing {e.name}): pip install 'sdrt[export]', or pass an exported bundle") from None
    log.info("exporting %s into the cache at %s", path, target)
    return export_checkpoint(path, target, overwrite=True, progress=progress)
