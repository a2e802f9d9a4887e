"""sdrt's TensorRT engines: the builder, the runner, and the backend that runs a component's engines.

The profiles come from profiles.py and the plans live in the keyed cache of cache.py. Engines are
built refittable (``BuilderFlag.REFIT``): LoRA / LyCORIS and VAE files change their weights by
TensorRT's Refitter (:func:`refit_engine`), by the ONNX initializer names that TensorRT's ONNX
parser gives the engine's weights, from the merged values ``runtime/networks`` computes for the
portable graph the engines are built from. The builder
and runner import ``tensorrt`` (and ``cupy`` for device buffers and CUDA graphs) only when used;
neither ran on a GPU where this was written (docs/NVIDIA.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sdrt.runtime.backends.base import Backend, Port, ports
from sdrt.runtime.backends.cache import (
    ENGINE_FORMAT,
    ENGINES_DIR,
    BuildResult,
    EngineCache,
    EngineFileError,
    EngineKey,
    atomic_write,
    engine_key,
    graph_digest,
    header_shapes,
    read_plan,
)
from sdrt.runtime.backends.gpu import GpuIdentity, gpu_identity
from sdrt.runtime.backends.profiles import (
    PRECISIONS,
    BuildShapes,
    Shapes,
    bundle_spec,
    covers,
    describe,
    engine_components,
    is_static,
)
from sdrt.runtime.errors import SdrtError

log = logging.getLogger(__name__)


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
        config.set_flag(trt.BuilderFlag.REFIT)  # LoRA and VAE files refit the weights (refit_engine)
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


def refit_weights(graph: Path, arrays: dict[str, np.ndarray] | None, previous) -> dict[str, np.ndarray]:
    """The named weights one refit sets: ``arrays`` (a set's merged initializers of ``graph``, by
    ONNX name; None: the graph's own), and the graph's own value of every name ``previous`` (the
    names the engine was last refitted with) that ``arrays`` leaves out, so a switch to another set
    or to none restores what the set before changed."""
    from sdrt.runtime.networks.onnx_weights import GraphWeights

    named = dict(arrays or {})
    restore = sorted(set(previous) - set(named))
    if restore:
        weights = GraphWeights(graph)
        named.update({n: np.asarray(weights.read(n)) for n in restore})
    return named


def refit_engine(trt, engine, logger, named: dict[str, np.ndarray], graph: Path) -> list[str]:
    """Refit ``engine`` with ``named`` weights through ``trt.Refitter``; returns the names set.

    Each value is cast to the type of the engine's weights prototype (``get_weights_prototype``:
    the type the ONNX parser gave them, float32 for sdrt's portable graphs, whatever the engine's
    precision) and must have its element count. Weights TensorRT combined with a set one (the
    refitter's ``get_missing_weights``) get their value from ``named`` or else the graph. One-line
    errors for an engine built without the refit flag, a weight TensorRT folded away, a refused
    weight, and a failed refit."""
    from sdrt.runtime.networks.onnx_weights import GraphWeights

    if not getattr(engine, "refittable", True):
        raise SdrtError("the TensorRT engine was built without the refit flag (by an older sdrt): "
                        "run `sdrt build --force` to rebuild it")
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    folded = sorted(n for n in named if n not in refittable)
    if folded:
        raise SdrtError(f"the TensorRT engine of {graph} has no refittable weight named {folded[0]} (TensorRT folded "
                        f"it into a constant; {len(folded)} such): networks cannot change it on this engine")
    held = []  # TensorRT reads the arrays when it refits: they live until then

    def put(name: str, value: np.ndarray) -> None:
        proto = refitter.get_weights_prototype(name) if hasattr(refitter, "get_weights_prototype") else None
        dtype = np.dtype(trt.nptype(proto.dtype)) if proto is not None else np.asarray(value).dtype
        array = np.ascontiguousarray(value, dtype=dtype).reshape(-1)
        if proto is not None and proto.size != array.size:
            raise SdrtError(f"TensorRT's weight {name} has {proto.size} elements, the merged value {array.size}")
        held.append(array)
        if not refitter.set_named_weights(name, array):
            raise SdrtError(f"TensorRT refused the new value of weight {name} (type or size) while refitting the "
                            f"engine of {graph}")

    for name, value in named.items():
        put(name, value)
    missing = [n for n in refitter.get_missing_weights() if n not in named]
    if missing:
        weights = GraphWeights(graph)
        for name in missing:
            if name not in weights.index:
                raise SdrtError(f"TensorRT needs weight {name} to refit the engine of {graph}, which the graph "
                                f"does not hold; run `sdrt build --force`")
            put(name, np.asarray(weights.read(name)))
    still = refitter.get_missing_weights()
    if still:
        raise SdrtError(f"TensorRT still misses {len(still)} weights (such as {still[0]}) to refit the engine of "
                        f"{graph}")
    if not refitter.refit_cuda_engine():
        raise SdrtError(f"TensorRT failed to refit the engine of {graph} (run with -v for its log)")
    return sorted(named) + sorted(missing)


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
        self.refitted: list[str] = []  # the weight names the last refit set

    def refit(self, named: dict[str, np.ndarray], graph: Path) -> None:
        """Refit this engine's weights (:func:`refit_engine`); a captured CUDA graph is captured again."""
        trt = import_tensorrt()
        with self.cp.cuda.Device(self.device_id):
            self.refitted = refit_engine(trt, self.engine, _trt_logger(trt), named, graph)
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


class EngineComponent(Backend):
    """A bundle component's engines in the bundle's cache for this GPU, TensorRT and graph; each
    run uses the engine whose profile covers its shapes (static engines first, then the newest).

    TensorRT and CuPy are checked when it is made; ``load()`` finds the engines, and each engine
    is deserialized at the first run it serves. ``release()`` frees them all."""

    def __init__(self, bundle, name: str, device_id: int = 0, cuda_graph: bool = False, *, lazy: bool = False):
        self._trt = import_tensorrt()
        import_cupy()
        self.bundle, self.name, self.device_id, self.cuda_graph = bundle, name, device_id, cuda_graph
        self.path = bundle.component(name)  # the graph the engines are built from
        self.device = f"trt:{device_id}"
        self.spec = bundle_spec(bundle, name)
        self.entries: list[tuple[Path, dict]] | None = None
        self._runners: dict[Path, EngineRunner] = {}
        self._overrides = None  # merged weights (runtime/networks' Overrides) refitted into each engine
        if not lazy:
            self.load()

    @property
    def loaded(self) -> bool:
        return self.entries is not None

    def load(self) -> None:
        if self.entries is not None:
            return
        trt, identity = self._trt, gpu_identity(self.device_id)
        root = self.bundle.path / ENGINES_DIR
        match = {"gpu": identity.name, "compute_capability": identity.compute_capability,
                 "tensorrt": trt.__version__, "onnx_sha256": graph_digest(self.path), "format": ENGINE_FORMAT}
        entries = EngineCache(root).entries(self.name, match)
        if not entries:
            raise SdrtError(f"no TensorRT engine for {self.name} in {root} for this GPU, TensorRT and graph "
                            f"({identity.name}, TensorRT {trt.__version__}): run `sdrt build {self.bundle.path}` "
                            "with the sizes to generate")
        self.entries = entries

    def release(self) -> None:
        self.entries = None
        self._runners.clear()

    def set_overrides(self, overrides) -> None:
        """Run with these merged weights from now on (``runtime/networks``' ``Overrides``, whose
        ``arrays`` are initializers of the portable graph by name), or the graph's own (None):
        every deserialized engine is refitted now, the others when they are deserialized."""
        if overrides is self._overrides:
            return
        self._overrides = overrides
        arrays = overrides.arrays if overrides is not None else None
        for runner in self._runners.values():
            runner.refit(refit_weights(self.path, arrays, runner.refitted), self.path)
            runner.refitted = sorted(arrays or ())  # what differs from the graph's own now

    @property
    def inputs(self) -> dict[str, Port]:
        return ports(self.spec.inputs)

    @property
    def outputs(self) -> list[str]:
        return self.spec.output_names

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.load()
        feeds = self.typed(feeds)
        fed = {k: tuple(v.shape) for k, v in feeds.items()}
        for path, header in self.entries:
            shapes = header_shapes(header)
            if covers(shapes, fed):
                break
        else:
            built = "; ".join(describe({k: v[2] for k, v in header_shapes(h).items()}) for _, h in self.entries)
            raise SdrtError(f"no TensorRT engine for {self.name} covers {describe(fed)} (largest built: {built}); "
                            "run `sdrt build` with these sizes (or ranges)")
        runner = self._runners.get(path)
        if runner is None:
            key = EngineKey.from_fields(header["fields"])
            try:
                plan = read_plan(path, key)
            except EngineFileError as e:
                raise SdrtError(f"refusing engine {path}: {e}; run `sdrt build` again to rebuild it") from None
            runner = EngineRunner(plan, shapes, self.device_id, self.cuda_graph)
            if self._overrides is not None:  # a fresh engine holds the graph's weights
                runner.refit(refit_weights(self.path, self._overrides.arrays, ()), self.path)
                runner.refitted = sorted(self._overrides.arrays)
            self._runners[path] = runner
        return runner.run(feeds, outputs or self.outputs)


# --- building a bundle's engines -----------------------------------------------------------------

def build_engines(bundle, shapes: BuildShapes, *, precision: str = "fp16",
                  components: tuple[str, ...] | None = None, force: bool = False,
                  builder: Callable[[Path, Shapes, str], bytes] | None = None,
                  identity: GpuIdentity | None = None, tensorrt: str | None = None, device_id: int = 0,
                  on_event: Callable[[dict], None] | None = None) -> list[BuildResult]:
    """Build (or find valid in the cache) sdrt's TensorRT engine for each component.

    ``builder``, ``identity`` and ``tensorrt`` default to the real TensorRT builder, this machine's
    GPU and the installed TensorRT; passing them builds without TensorRT (tests)."""
    if precision not in PRECISIONS:
        raise SdrtError(f"unknown engine precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    components = engine_components(bundle) if components is None else components
    for name in components:
        if not bundle.has(name):
            raise SdrtError(f"bundle {bundle.path} has no {name} graph")
    if builder is None or tensorrt is None:
        trt = import_tensorrt()
        tensorrt = tensorrt or trt.__version__
    if identity is None:
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

