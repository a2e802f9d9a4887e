"""The engine cache: keys naming what makes a plan valid, plan files with a checked header, build locks.

An engine is valid only for one GPU model, one TensorRT version, one graph, one precision and one
profile; ``EngineKey`` hashes all of them (and this file format's version) and names the file
``engines/<gpu>-sm<cc>-trt<version>/<component>-<key16>.plan``. A plan file carries its own
header: a magic, the key's fields, the plan's length and sha256, so a truncated, corrupt or foreign
file is refused before TensorRT sees it. Files are written to a temporary name and renamed; an
exclusive ``flock`` on ``<plan>.lock`` makes a second process wait for the first one's build and
then load it. ONNX Runtime's TensorRT EP keeps its engines under the same keys (ort_tensorrt.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.backends.gpu import GpuIdentity
from sdrt.runtime.backends.profiles import BuildShapes, Shapes, bundle_spec, component_axes, is_static, profile_shapes
from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)

ENGINE_FORMAT = 2  # 2: engines built refittable (LoRA / VAE files refit their weights)
MAGIC = b"SDRTPLAN"
_HEADER = struct.Struct("<8sI")  # magic, header length; then the header JSON, then the plan bytes
_MAX_HEADER = 1 << 20
ENGINES_DIR = "engines"
RUNTIME_SDRT = "sdrt"


# --- keys ----------------------------------------------------------------------------------------

_digests: dict[tuple, str] = {}


def graph_digest(onnx_path: str | Path) -> str:
    """sha256 over the graph's folder: every regular file (model.onnx, external weights) by name,
    size and content, so a changed graph or weight file is a different key. Memoised per process
    by (name, size, mtime) of the files."""
    folder = Path(onnx_path).parent
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(folder.resolve()), stamp)
    if memo in _digests:
        return _digests[memo]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    _digests[memo] = h.hexdigest()
    return _digests[memo]


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan's validity depends on; two keys with equal fields name the same file."""

    component: str
    gpu: str                 # GPU name
    compute_capability: str  # "9.0"
    tensorrt: str            # TensorRT version
    onnx_sha256: str         # graph_digest of the component's folder
    precision: str           # fp16 | fp32
    profile: dict = field(default_factory=dict)  # input -> [min, opt, max] shapes
    runtime: str = RUNTIME_SDRT  # "sdrt" (own engines) or "onnxruntime-<version>" (the TensorRT EP's cache)
    format: int = ENGINE_FORMAT

    def fields(self) -> dict:
        return {
            "component": self.component, "gpu": self.gpu, "compute_capability": self.compute_capability,
            "tensorrt": self.tensorrt, "onnx_sha256": self.onnx_sha256, "precision": self.precision,
            "profile": {k: [list(s) for s in v] for k, v in sorted(self.profile.items())},
            "runtime": self.runtime, "format": self.format,
        }

    @classmethod
    def from_fields(cls, d: dict) -> EngineKey:
        profile = {k: tuple(tuple(s) for s in v) for k, v in d["profile"].items()}
        return cls(d["component"], d["gpu"], d["compute_capability"], d["tensorrt"], d["onnx_sha256"],
                   d["precision"], profile, d.get("runtime", RUNTIME_SDRT), d["format"])

    @property
    def digest(self) -> str:
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def directory(self) -> str:
        """``<gpu>-sm<cc>-trt<version>``: what ARCHITECTURE.md calls ``engines/<gpu>-<trt>/``."""
        return f"{GpuIdentity(self.gpu, self.compute_capability).slug}-trt{self.tensorrt}"

    @property
    def stem(self) -> str:
        return f"{self.component}-{self.digest[:16]}"


# --- plan files ----------------------------------------------------------------------------------

class EngineFileError(SdrtError):
    """An engine file that must not be loaded: missing, truncated, corrupt or built for another key."""


class EngineMissing(EngineFileError):
    pass


def atomic_write(path: Path, *chunks: bytes) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_plan(path: Path, key: EngineKey, plan: bytes, info: dict | None = None) -> None:
    header = {"format": ENGINE_FORMAT, "key": key.digest, "fields": key.fields(), "plan_bytes": len(plan),
              "plan_sha256": hashlib.sha256(plan).hexdigest(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
              **({"info": info} if info else {})}
    text = json.dumps(header, sort_keys=True).encode()
    atomic_write(path, _HEADER.pack(MAGIC, len(text)), text, plan)


def read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the plan bytes); EngineFileError if the file is not a whole sdrt plan file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise EngineFileError(f"{path.name} is truncated ({size} bytes)")
            magic, n = _HEADER.unpack(head)
            if magic != MAGIC:
                raise EngineFileError(f"{path.name} is not an sdrt engine file (foreign or raw TensorRT plan)")
            if n > _MAX_HEADER:
                raise EngineFileError(f"{path.name} is corrupt (header length {n})")
            text = f.read(n)
    except FileNotFoundError:
        raise EngineMissing(f"{path.name} does not exist") from None
    if len(text) < n:
        raise EngineFileError(f"{path.name} is truncated ({size} bytes)")
    try:
        header = json.loads(text)
        offset, expected = _HEADER.size + n, int(header["plan_bytes"])
    except (ValueError, KeyError, TypeError):
        raise EngineFileError(f"{path.name} is corrupt (unreadable header)") from None
    if not all(k in header for k in ("fields", "key", "plan_sha256")):
        raise EngineFileError(f"{path.name} is corrupt (incomplete header)")
    if size != offset + expected:
        raise EngineFileError(f"{path.name} is truncated or padded ({size - offset} plan bytes, "
                              f"header says {expected})")
    return header, offset


def read_plan(path: Path, key: EngineKey) -> bytes:
    """The plan bytes, after checking the header's key against ``key`` and the bytes against their sha256."""
    header, offset = read_header(path)
    if header["key"] != key.digest:
        raise EngineFileError(f"{path.name} belongs to another key (built for other settings)")
    with open(path, "rb") as f:
        f.seek(offset)
        plan = f.read()
    if hashlib.sha256(plan).hexdigest() != header["plan_sha256"]:
        raise EngineFileError(f"{path.name} is corrupt (sha256 of the plan does not match its header)")
    return plan


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path``, held by this process until the block ends.

    The lock file stays on disk (removing it would let a third process lock a new inode while a
    second still waits on the old one). ``on_wait`` is called once if another process holds it."""
    try:
        import fcntl
    except ImportError:
        raise SdrtError("engine cache locking needs fcntl (Linux or macOS)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class CacheResult:
    path: Path
    plan: bytes
    status: str  # loaded | built | rebuilt
    reason: str | None = None  # why an existing file was refused (rebuilt)
    seconds: float = 0.0


class EngineCache:
    """The bundle's ``engines/`` folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: EngineKey) -> Path:
        return self.root / key.directory / f"{key.stem}.plan"

    def timing_cache(self, key: EngineKey) -> Path:
        return self.root / key.directory / "timing.cache"

    def load(self, key: EngineKey) -> bytes:
        return read_plan(self.path(key), key)

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], *, force: bool = False,
                     on_event: Callable[[dict], None] | None = None) -> CacheResult:
        """The plan for ``key``: loaded when a valid file exists, else built once across processes.

        A file that fails its checks is refused (its reason logged and returned) and rebuilt;
        ``force`` rebuilds a valid one too."""
        path = self.path(key)
        emit = on_event or (lambda event: None)
        reason = None
        if not force:
            try:
                return CacheResult(path, read_plan(path, key), "loaded")
            except EngineMissing:
                pass
            except EngineFileError as e:
                reason = str(e)
                log.warning("refusing engine %s: %s; rebuilding", path, reason)
        with file_lock(path.with_name(path.name + ".lock"),
                       on_wait=lambda: emit({"event": "waiting", "component": key.component, "path": path})):
            if not force:
                with contextlib.suppress(EngineFileError):
                    # Another process may have built it while this one waited for the lock
                    return CacheResult(path, read_plan(path, key), "loaded")
            emit({"event": "building", "component": key.component, "path": path})
            start = time.perf_counter()
            plan = build()
            if not isinstance(plan, (bytes, bytearray, memoryview)) or not len(plan):
                raise SdrtError(f"the builder returned no engine for {key.component}")
            write_plan(path, key, bytes(plan))
            seconds = time.perf_counter() - start
        status = "rebuilt" if (reason or force) else "built"
        return CacheResult(path, bytes(plan), status, reason or ("forced" if force else None), seconds)

    def entries(self, component: str, match: dict, runtime: str = RUNTIME_SDRT) -> list[tuple[Path, dict]]:
        """(path, header) of the component's plan files whose key fields agree with ``match``,
        static profiles first, then newest first; unreadable files are skipped (and logged)."""
        found = []
        for path in self.root.glob(f"*/{component}-*.plan"):
            try:
                header, _ = read_header(path)
            except EngineFileError as e:
                log.warning("skipping engine %s: %s", path, e)
                continue
            fields = header["fields"]
            if (fields.get("component") != component or fields.get("runtime") != runtime
                    or any(fields.get(k) != v for k, v in match.items())):
                continue
            found.append((path, header))
        found.sort(key=lambda e: (not is_static(header_shapes(e[1])), -e[0].stat().st_mtime))
        return found


def header_shapes(header: dict) -> Shapes:
    """The profile a plan file's header records."""
    return {k: tuple(tuple(s) for s in v) for k, v in header["fields"]["profile"].items()}


@dataclass
class BuildResult:
    component: str
    path: Path
    status: str  # built | rebuilt | loaded
    reason: str | None
    shapes: Shapes
    seconds: float


def engine_key(bundle, name: str, shapes: BuildShapes, precision: str, identity: GpuIdentity,
               tensorrt: str, runtime: str = RUNTIME_SDRT) -> tuple[EngineKey, Shapes]:
    """The key (and profile) of a bundle component's engine for ``shapes``."""
    spec = bundle_spec(bundle, name)
    profile = profile_shapes(spec, component_axes(spec, shapes, bundle.vae_scale_factor))
    key = EngineKey(name, identity.name, identity.compute_capability, tensorrt,
                    graph_digest(bundle.component(name)), precision, profile, runtime)
    return key, profile
