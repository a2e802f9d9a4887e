"""TensorRT engines: profiles from the I/O spec, a cache keyed by what makes a plan valid, the builder
and the runner.

Shapes. ``sdrt build`` takes sizes in the user's units (images per batch, pixels, prompt chunks);
``component_axes`` turns them into sizes of each component's symbolic axes and ``profile_shapes``
into TensorRT's (min, opt, max) shapes per input, read off the same ``ComponentSpec`` the exporter
and the runtime use. Equal min and max give a static engine (fastest, CUDA-graph capturable).

Cache. An engine is valid only for one GPU model, one TensorRT version, one graph, one precision
and one profile; ``EngineKey`` hashes all of them (and this file format's version) and names the
file ``engines/<gpu>-sm<cc>-trt<version>/<component>-<key16>.plan``. A plan file carries its own
header: a magic, the key's fields, the plan's length and sha256, so a truncated, corrupt or foreign
file is refused before TensorRT sees it. Files are written to a temporary name and renamed; an
exclusive ``flock`` on ``<plan>.lock`` makes a second process wait for the first one's build and
then load it.

The TensorRT builder and runner import ``tensorrt`` (and ``cupy`` for device buffers and CUDA
graphs) only when used; neither ran on a GPU where this was written (docs/NVIDIA.md).
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

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.gpu import GpuIdentity
from sdrt.runtime.spec import TEXT_TOKENS, ComponentSpec

log = logging.getLogger(__name__)

ENGINE_FORMAT = 1
MAGIC = b"SDRTPLAN"
_HEADER = struct.Struct("<8sI")  # magic, header length; then the header JSON, then the plan bytes
_MAX_HEADER = 1 << 20
ENGINE_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PRECISIONS = ("fp16", "fp32")
ENGINES_DIR = "engines"
RUNTIME_SDRT = "sdrt"

Range = tuple[int, int, int]
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


# --- profiles ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildShapes:
    """What engines are built for, in the user's units; each a (min, opt, max) range."""

    batch: Range             # images per batch
    height: Range            # pixels
    width: Range             # pixels
    chunks: Range = (1, 1, 1)  # 75-token prompt chunks: the UNet's sequence is 77 per chunk
    vae_tile: int | None = None  # latent side of the VAE decoder's tiles (tiled decoding), if any

    @property
    def static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width, self.chunks))


def dim_range(name: str, value: int | None, lo: int | None = None, hi: int | None = None) -> Range:
    """``--width 512`` -> (512, 512, 512); ``--min-width 256 --width 512 --max-width 1024`` -> a range
    with 512 as the size TensorRT tunes for (a missing bound is the value, a missing value the min)."""
    if value is None and lo is None and hi is None:
        raise SdrtError(f"no {name} given")
    opt = value if value is not None else (lo if lo is not None else hi)
    r = (lo if lo is not None else opt, opt, hi if hi is not None else opt)
    if not r[0] <= r[1] <= r[2]:
        raise SdrtError(f"{name}: min {r[0]} <= opt {r[1]} <= max {r[2]} does not hold")
    return r


def build_shapes(*, width: Range, height: Range, batch: Range = (1, 1, 1), chunks: Range = (1, 1, 1),
                 vae_tile: int | None = None, vae_scale_factor: int = 8) -> BuildShapes:
    """Validated shapes: pixel sizes positive multiples of 8 (and of the VAE's factor), counts >= 1,
    min <= opt <= max; ``vae_tile`` in pixels."""
    multiple = max(8, vae_scale_factor)
    for name, r in (("width", width), ("height", height)):
        for v in r:
            if v <= 0 or v % multiple:
                raise SdrtError(f"{name} must be a positive multiple of {multiple}, got {v}")
    for name, r in (("width", width), ("height", height), ("batch", batch), ("prompt chunks", chunks)):
        if not r[0] <= r[1] <= r[2]:
            raise SdrtError(f"{name}: min {r[0]} <= opt {r[1]} <= max {r[2]} does not hold")
    for name, r in (("batch", batch), ("prompt chunks", chunks)):
        if r[0] < 1:
            raise SdrtError(f"{name} must be at least 1, got {r[0]}")
    tile = None
    if vae_tile is not None:
        if vae_tile <= 0 or vae_tile % multiple:
            raise SdrtError(f"VAE tile size must be a positive multiple of {multiple}, got {vae_tile}")
        tile = vae_tile // vae_scale_factor
    return BuildShapes(tuple(batch), tuple(height), tuple(width), tuple(chunks), tile)


def component_axes(spec: ComponentSpec, shapes: BuildShapes, vae_scale_factor: int = 8) -> dict[str, Range]:
    """Sizes of a component's symbolic axes for ``shapes``.

    The UNet sees the guided batch: a static batch of B images is built for 2B rows (conditional
    and unconditional); a range spans B_min rows (CFG scale 1) to 2 B_max. The text encoder keeps
    the batch range of its spec (it runs on prompt chunks, not images). The VAE decodes one image
    at a time, or tiles of ``vae_tile`` latents."""
    f = vae_scale_factor

    def latent(r: Range) -> Range:
        return tuple(v // f for v in r)

    if spec.name == "text_encoder":
        return {"batch": spec.profile.get("batch", (1, 2, 16))}
    if spec.name == "unet":
        b = shapes.batch
        batch = (2 * b[0],) * 3 if b[0] == b[2] else (b[0], 2 * b[1], 2 * b[2])
        return {"batch": batch, "height": latent(shapes.height), "width": latent(shapes.width),
                "sequence": tuple(TEXT_TOKENS * c for c in shapes.chunks)}
    if spec.name == "vae_decoder":
        h, w = latent(shapes.height), latent(shapes.width)
        if shapes.vae_tile:
            h, w = (tuple(min(shapes.vae_tile, v) for v in r) for r in (h, w))
        return {"batch": (1, 1, 1), "height": h, "width": w}
    if spec.name == "vae_encoder":
        return {"batch": (1, 1, 1), "image_height": shapes.height, "image_width": shapes.width}
    raise SdrtError(f"no engine profile for component {spec.name!r}")


def profile_shapes(spec: ComponentSpec, axes: dict[str, Range]) -> Shapes:
    """TensorRT's (min, opt, max) shape of every input: fixed dims from the spec, symbolic ones from ``axes``."""
    out = {}
    for t in spec.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, str):
                if d not in axes:
                    raise SdrtError(f"{spec.name}: no size for axis {d!r} of input {t.name}")
                dims.append(tuple(axes[d]))
            else:
                dims.append((d, d, d))
        out[t.name] = tuple(tuple(r[i] for r in dims) for i in range(3))
    return out


def covers(shapes: Shapes, feeds: dict[str, tuple[int, ...]]) -> bool:
    """Whether every fed shape lies within the profile."""
    for name, shape in feeds.items():
        if name not in shapes:
            return False
        lo, _, hi = shapes[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def is_static(shapes: Shapes) -> bool:
    return all(lo == hi for lo, _, hi in shapes.values())


def describe(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())


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
        found.sort(key=lambda e: (not is_static(_shapes(e[1])), -e[0].stat().st_mtime))
        return found


def _shapes(header: dict) -> Shapes:
    return {k: tuple(tuple(s) for s in v) for k, v in header["fields"]["profile"].items()}


# --- TensorRT ------------------------------------------------------------------------------------

NO_TENSORRT = ("TensorRT is not installed (import tensorrt failed): on a machine with an NVIDIA GPU, "
               "pip install tensorrt-cu12 or tensorrt-cu13 (TensorRT 10 or later, matching the CUDA driver); "
               "see docs/NVIDIA.md")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise SdrtError(NO_TENSORRT) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise SdrtError(f"TensorRT {trt.__version__} is too old: sdrt's engines need TensorRT 10 or later")
    return trt


def import_cupy():
    try:
        import cupy
    except ImportError:
        raise SdrtError("running TensorRT engines needs CuPy for device buffers and CUDA graphs: "
                        "pip install cupy-cuda12x (or cupy-cuda13x for CUDA 13)") from None
    return cupy


def _trt_logger(trt):
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _Logger()


class TensorRTBuilder:
    """``builder(onnx_path, shapes, precision) -> plan bytes`` with TensorRT's Python API.

    One optimisation profile from ``shapes``; fp16 kernels allowed for ``fp16``; the timing cache
    file is read before and written (atomically) after each build, so later builds on this GPU and
    TensorRT reuse its kernel timings."""

    def __init__(self, timing_cache: Path, optimization_level: int = 3, workspace_gb: float | None = None):
        self.trt = import_tensorrt()
        self.timing_cache = Path(timing_cache)
        self.optimization_level = optimization_level
        self.workspace_gb = workspace_gb

    def __call__(self, onnx_path: Path, shapes: Shapes, precision: str) -> bytes:
        trt = self.trt
        logger = _trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
            raise SdrtError(f"TensorRT cannot parse {onnx_path}: {errors}".splitlines()[0])
        config = builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        config.builder_optimization_level = self.optimization_level
        if self.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * 2**30))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(self._read_timing_cache())
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise SdrtError(f"TensorRT failed to build an engine from {onnx_path} (run with -v for its log)")
        atomic_write(self.timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    def _read_timing_cache(self) -> bytes:
        try:
            return self.timing_cache.read_bytes()
        except FileNotFoundError:
            return b""


class EngineRunner:
    """One deserialized engine run on numpy feeds: device buffers (CuPy) per shape signature, one
    CUDA stream, and for static engines a CUDA graph of ``execute_async_v3`` replayed each run."""

    def __init__(self, plan: bytes, shapes: Shapes, device_id: int = 0, cuda_graph: bool = False):
        trt, self.cp = import_tensorrt(), import_cupy()
        self.device_id = device_id
        with self.cp.cuda.Device(device_id):
            self._runtime = trt.Runtime(_trt_logger(trt))
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise SdrtError("TensorRT could not deserialize the engine (built by another TensorRT or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = self.cp.cuda.Stream(non_blocking=True)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.cuda_graph = cuda_graph and is_static(shapes)
        self._signature = None
        self._buffers: dict = {}
        self._graph = None

    def _bind(self, feeds: dict[str, np.ndarray]) -> None:
        cp = self.cp
        for n in self.input_names:
            self.context.set_input_shape(n, tuple(feeds[n].shape))
        self._buffers = {n: cp.empty(feeds[n].shape, self.dtypes[n]) for n in self.input_names}
        for n in self.output_names:
            self._buffers[n] = cp.empty(tuple(self.context.get_tensor_shape(n)), self.dtypes[n])
        for n, b in self._buffers.items():
            self.context.set_tensor_address(n, b.data.ptr)
        self._graph = None

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise SdrtError(f"missing engine inputs: {', '.join(sorted(missing))}")
        with self.cp.cuda.Device(self.device_id):
            signature = tuple((n, feeds[n].shape) for n in self.input_names)
            if signature != self._signature:
                self._bind(feeds)
                self._signature = signature
            for n in self.input_names:
                self._buffers[n].set(np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]), stream=self.stream)
            if self._graph is not None:
                self._graph.launch(stream=self.stream)
            else:
                if not self.context.execute_async_v3(self.stream.ptr):
                    raise SdrtError("TensorRT failed to run the engine (run with -v for its log)")
                if self.cuda_graph:
                    # After one regular run (TensorRT's deferred setup happens there) capture the next
                    self.stream.begin_capture()
                    self.context.execute_async_v3(self.stream.ptr)
                    self._graph = self.stream.end_capture()
            out = {n: self._buffers[n].get(stream=self.stream) for n in names}
            self.stream.synchronize()
        return out


def bundle_spec(bundle, name: str) -> ComponentSpec:
    entry = bundle.manifest["components"].get(name, {})
    if "inputs" not in entry:
        raise SdrtError(f"TensorRT engines need the I/O spec of an sdrt bundle; {bundle.path} has none for {name} "
                        "(exported by optimum?): re-export the checkpoint with `sdrt export`")
    return ComponentSpec.from_json(name, entry)


class EngineComponent:
    """A component's engines in the bundle's cache for this GPU, TensorRT and graph; each run uses
    the engine whose profile covers its shapes (static engines first, then the newest)."""

    def __init__(self, bundle, name: str, device_id: int = 0, cuda_graph: bool = False):
        from sdrt.runtime.gpu import gpu_identity

        trt = import_tensorrt()
        import_cupy()
        self.name, self.device_id, self.cuda_graph = name, device_id, cuda_graph
        self.spec = bundle_spec(bundle, name)
        identity = gpu_identity(device_id)
        self.cache = EngineCache(bundle.path / ENGINES_DIR)
        match = {"gpu": identity.name, "compute_capability": identity.compute_capability,
                 "tensorrt": trt.__version__, "onnx_sha256": graph_digest(bundle.component(name)),
                 "format": ENGINE_FORMAT}
        self.entries = self.cache.entries(name, match)
        if not self.entries:
            raise SdrtError(f"no TensorRT engine for {name} in {bundle.path / ENGINES_DIR} for this GPU, TensorRT "
                            f"and graph ({identity.name}, TensorRT {trt.__version__}): run `sdrt build {bundle.path}` "
                            "with the sizes to generate")
        self._runners: dict[Path, EngineRunner] = {}

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        fed = {k: tuple(v.shape) for k, v in feeds.items()}
        for path, header in self.entries:
            shapes = _shapes(header)
            if covers(shapes, fed):
                break
        else:
            built = "; ".join(describe({k: v[2] for k, v in _shapes(h).items()}) for _, h in self.entries)
            raise SdrtError(f"no TensorRT engine for {self.name} covers {describe(fed)} (largest built: {built}); "
                            "run `sdrt build` with these sizes (or ranges)")
        runner = self._runners.get(path)
        if runner is None:
            key = EngineKey.from_fields(header["fields"])
            try:
                plan = read_plan(path, key)
            except EngineFileError as e:
                raise SdrtError(f"refusing engine {path}: {e}; run `sdrt build` again to rebuild it") from None
            runner = self._runners[path] = EngineRunner(plan, shapes, self.device_id, self.cuda_graph)
        return runner.run(feeds, names)

    def release(self) -> None:
        self._runners.clear()


# --- building a bundle's engines -----------------------------------------------------------------

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
    spec = bundle_spec(bundle, name)
    profile = profile_shapes(spec, component_axes(spec, shapes, bundle.vae_scale_factor))
    key = EngineKey(name, identity.name, identity.compute_capability, tensorrt,
                    graph_digest(bundle.component(name)), precision, profile, runtime)
    return key, profile


def build_engines(bundle, shapes: BuildShapes, *, precision: str = "fp16",
                  components: tuple[str, ...] = ENGINE_COMPONENTS, force: bool = False,
                  builder: Callable[[Path, Shapes, str], bytes] | None = None,
                  identity: GpuIdentity | None = None, tensorrt: str | None = None, device_id: int = 0,
                  on_event: Callable[[dict], None] | None = None) -> list[BuildResult]:
    """Build (or find valid in the cache) sdrt's TensorRT engine for each component.

    ``builder``, ``identity`` and ``tensorrt`` default to the real TensorRT builder, this machine's
    GPU and the installed TensorRT; passing them builds without TensorRT (tests)."""
    if precision not in PRECISIONS:
        raise SdrtError(f"unknown engine precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    for name in components:
        if not bundle.has(name):
            raise SdrtError(f"bundle {bundle.path} has no {name} graph")
    if builder is None or tensorrt is None:
        trt = import_tensorrt()
        tensorrt = tensorrt or trt.__version__
    if identity is None:
        from sdrt.runtime.gpu import gpu_identity

        identity = gpu_identity(device_id)
    cache = EngineCache(bundle.path / ENGINES_DIR)
    results = []
    for name in components:
        key, profile = engine_key(bundle, name, shapes, precision, identity, tensorrt)
        build = builder or TensorRTBuilder(cache.timing_cache(key))
        onnx_path = bundle.component(name)
        r = cache.get_or_build(key, lambda: build(onnx_path, profile, precision), force=force, on_event=on_event)
        results.append(BuildResult(name, r.path, r.status, r.reason, profile, r.seconds))
    return results


# --- ONNX Runtime's TensorRT execution provider --------------------------------------------------

EP_RECORD = "sdrt-profile.json"


def ep_cache_dir(root: Path, key: EngineKey) -> Path:
    """Where the TensorRT EP keeps this key's engines: ``engines/<gpu>-<trt>/ort-<component>-<key16>/``."""
    return root / key.directory / f"ort-{key.stem}"


def ep_session_setup(onnx_path: Path, device_id: int = 0, cuda_graph: bool = False,
                     shapes: BuildShapes | None = None, precision: str = "fp16") -> tuple[dict, Path, EngineKey]:
    """(TensorRT EP options, lock file, key) for a bundle component's graph.

    With ``shapes`` (``sdrt build --device tensorrt``) the profile is derived from them; without,
    the newest profile ``sdrt build`` recorded for this GPU, TensorRT, ORT and graph, else the
    spec's own default ranges. The EP's engine cache goes to a directory named by the key, so a
    change of any of them is a new directory, never a stale engine."""
    import onnxruntime as ort

    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.gpu import gpu_identity, tensorrt_ep_options, tensorrt_version

    onnx_path = Path(onnx_path)
    bundle = open_bundle(onnx_path.parent.parent)
    name = onnx_path.parent.name
    spec = bundle_spec(bundle, name)
    identity, trt_version = gpu_identity(device_id), tensorrt_version()
    runtime = f"onnxruntime-{ort.__version__}"
    root = bundle.path / ENGINES_DIR
    if shapes is not None:
        key, profile = engine_key(bundle, name, shapes, precision, identity, trt_version, runtime)
    else:
        key = _recorded_ep_key(root, bundle, name, identity, trt_version, runtime)
        if key is None:
            profile = profile_shapes(spec, dict(spec.profile))
            key = EngineKey(name, identity.name, identity.compute_capability, trt_version,
                            graph_digest(bundle.component(name)), precision, profile, runtime)
        profile = key.profile
    cache_dir = ep_cache_dir(root, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    options = tensorrt_ep_options(cache_dir, profile, key.precision == "fp16", device_id, cuda_graph)
    return options, cache_dir.with_name(cache_dir.name + ".lock"), key


def _recorded_ep_key(root: Path, bundle, name: str, identity: GpuIdentity, trt_version: str,
                     runtime: str) -> EngineKey | None:
    match = {"gpu": identity.name, "compute_capability": identity.compute_capability, "tensorrt": trt_version,
             "onnx_sha256": graph_digest(bundle.component(name)), "runtime": runtime, "format": ENGINE_FORMAT}
    records = []
    for path in root.glob(f"*/ort-{name}-*/{EP_RECORD}"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            fields = json.loads(path.read_text())
            if all(fields.get(k) == v for k, v in match.items()):
                records.append((path.stat().st_mtime, EngineKey.from_fields(fields)))
    return max(records, key=lambda r: r[0])[1] if records else None


def record_ep_key(cache_dir: Path, key: EngineKey) -> None:
    atomic_write(cache_dir / EP_RECORD, json.dumps(key.fields(), sort_keys=True).encode())


def build_ep_engines(bundle, shapes: BuildShapes, *, precision: str = "fp16",
                     components: tuple[str, ...] = ENGINE_COMPONENTS, force: bool = False, device_id: int = 0,
                     on_event: Callable[[dict], None] | None = None) -> list[BuildResult]:
    """Have ONNX Runtime's TensorRT EP build its engines for ``shapes`` into the keyed cache
    directories (creating the session builds them), and record the profile for ``generate``."""
    import shutil

    from sdrt.runtime.sessions import Session, providers_for

    providers_for(f"tensorrt:{device_id}")  # onnxruntime-gpu with its TensorRT EP, before anything else
    results = []
    for name in components:
        onnx_path = bundle.component(name)
        options, lock, key = ep_session_setup(onnx_path, device_id, False, shapes, precision)
        cache_dir = Path(options["trt_engine_cache_path"])
        with file_lock(lock, on_wait=lambda: on_event and on_event({"event": "waiting", "component": name})):
            existed = (cache_dir / EP_RECORD).exists()
            if force and existed:
                shutil.rmtree(cache_dir)
                cache_dir.mkdir(parents=True)
            if on_event:
                on_event({"event": "building", "component": name, "path": cache_dir})
            start = time.perf_counter()
            Session(onnx_path, f"tensorrt:{device_id}", provider_options=options)
            record_ep_key(cache_dir, key)
        status = "loaded" if existed and not force else ("rebuilt" if force else "built")
        results.append(BuildResult(name, cache_dir, status, None, key.profile, time.perf_counter() - start))
    return results
