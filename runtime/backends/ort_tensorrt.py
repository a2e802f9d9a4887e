"""ONNX Runtime's TensorRT execution provider: its options and engine cache for a bundle component.

The EP builds its engines itself when a session is created; sdrt gives it a profile (from
``sdrt build --device tensorrt`` shapes, else the newest one recorded, else the spec's default
ranges) and a cache directory named by the same ``EngineKey`` as sdrt's own engines, with the
ONNX Runtime version as the runtime, so a change of GPU, TensorRT, ORT, graph, precision or
profile is a new directory, never a stale engine.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
from sdrt.runtime.backends.cache import (
    ENGINE_FORMAT,
    ENGINES_DIR,
    BuildResult,
    EngineKey,
    atomic_write,
    engine_key,
    file_lock,
    graph_digest,
)
from sdrt.runtime.backends.gpu import (
    GpuIdentity,
    gpu_identity,
    tensorrt_ep_options,
    tensorrt_version,
)
from sdrt.runtime.backends.onnxruntime import Session, providers_for
from sdrt.runtime.backends.profiles import (
    BuildShapes,
    bundle_spec,
    engine_components,
    profile_shapes,
)

EP_RECORD = "sdrt-profile.json"


def ep_cache_dir(root: Path, key: EngineKey) -> Path:
    """Where the TensorRT EP keeps this key's engines: ``engines/<gpu>-<trt>/ort-<component>-<key16>/``."""
    return root / key.directory / f"ort-{key.stem}"


def ep_session_setup(bundle, name: str, device_id: int = 0, cuda_graph: bool = False,
                     shapes: BuildShapes | None = None, precision: str = "fp16") -> tuple[dict, Path, EngineKey]:
    """(TensorRT EP options, lock file, key) for a bundle component.

    With ``shapes`` (``sdrt build --device tensorrt``) the profile is derived from them; without,
    the newest profile ``sdrt build`` recorded for this GPU, TensorRT, ORT and graph, else the
    spec's own default ranges. One-line errors, first, for an onnxruntime without the TensorRT EP."""
    providers_for(f"tensorrt:{device_id}")
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
                     components: tuple[str, ...] | None = None, force: bool = False, device_id: int = 0,
                     on_event: Callable[[dict], None] | None = None) -> list[BuildResult]:
    """Have ONNX Runtime's TensorRT EP build its engines for ``shapes`` into the keyed cache
    directories (creating the session builds them), and record the profile for ``generate``."""
    results = []
    for name in engine_components(bundle) if components is None else components:
        options, lock, key = ep_session_setup(bundle, name, device_id, False, shapes, precision)
        cache_dir = Path(options["trt_engine_cache_path"])
        with file_lock(lock, on_wait=lambda: on_event and on_event({"event": "waiting", "component": name})):
            existed = (cache_dir / EP_RECORD).exists()
            if force and existed:
                shutil.rmtree(cache_dir)
                cache_dir.mkdir(parents=True)
            if on_event:
                on_event({"event": "building", "component": name, "path": cache_dir})
            start = time.perf_counter()
            # The lock is held here, so the session is given none (a second flock would wait on this one)
            Session(bundle.component(name), f"tensorrt:{device_id}", provider_options=options)
            record_ep_key(cache_dir, key)
        status = "loaded" if existed and not force else ("rebuilt" if force else "built")
        results.append(BuildResult(name, cache_dir, status, None, key.profile, time.perf_counter() - start))
    return results
