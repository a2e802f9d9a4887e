"""The backend interface and ``open_component`` on the tiny bundle; the backends package's import graph."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.runtime.backends import Backend, Session, kernels, open_component
from sdrt.runtime.backends.onnxruntime import providers_for
from sdrt.runtime.backends.tensorrt import NO_TENSORRT, EngineComponent
from sdrt.runtime.bundle import open_bundle
from sdrt.runtime.errors import SdrtError

BACKENDS = Path(importlib.util.find_spec("sdrt.runtime.backends").origin).parent


def _unet_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"sample": rng.standard_normal((2, 4, 8, 8)),  # float64: the backend casts to the graph's dtypes
            "timestep": np.array([500.0, 20.0]),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32))}


def _direct(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph run with onnxruntime itself (sdrt's custom ops registered, as the graph may use them)."""
    opts = ort.SessionOptions()
    if kernels.available():
        opts.register_custom_ops_library(str(kernels.library_path()))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v.astype(np.float32) for k, v in feeds.items()})))


def test_cpu_component_runs_like_onnxruntime(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    unet = open_component(bundle, "unet")
    assert isinstance(unet, Session) and isinstance(unet, Backend) and unet.loaded
    assert unet.path == bundle.graph("unet", "cpu") and unet.device == "cpu"
    feeds = _unet_feeds(np.random.default_rng(0))
    got, want = unet.run(feeds), _direct(unet.path, feeds)
    assert list(got) == unet.outputs == ["out_sample"]
    np.testing.assert_allclose(got["out_sample"], want["out_sample"], rtol=1e-5, atol=1e-5)
    assert unet.input_dtype("timestep") is np.float32

    portable = open_component(bundle, "unet", graph=bundle.component("unet"))
    assert portable.path == bundle.component("unet")
    np.testing.assert_allclose(portable.run(feeds, ["out_sample"])["out_sample"],
                               _direct(bundle.component("unet"), feeds)["out_sample"], rtol=1e-5, atol=1e-5)


def test_lazy_component_answers_from_the_spec_and_reloads_after_release(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    vae = open_component(bundle, "vae_decoder", lazy=True)
    assert not vae.loaded
    spec_inputs, spec_outputs = vae.inputs, vae.outputs  # from the manifest's spec
    assert not vae.loaded
    assert list(spec_inputs) == ["latent_sample"] and spec_outputs == ["sample"]
    assert vae.input_dtype("latent_sample") is np.float32 and not vae.loaded

    z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = vae.run({"latent_sample": z})["sample"]
    assert vae.loaded
    assert {k: p.type for k, p in vae.inputs.items()} == {k: p.type for k, p in spec_inputs.items()}
    assert vae.outputs == spec_outputs
    vae.release()
    assert not vae.loaded
    np.testing.assert_array_equal(vae.run({"latent_sample": z})["sample"], first)
    assert vae.loaded


def test_trt_without_tensorrt_is_one_line(tiny_bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    bundle = open_bundle(tiny_bundle)
    for lazy in (False, True):
        with pytest.raises(SdrtError) as e:
            open_component(bundle, "unet", "trt", lazy=lazy)
        assert str(e.value) == NO_TENSORRT and "\n" not in str(e.value)


def test_tensorrt_ep_without_onnxruntime_gpu_is_one_line(tiny_bundle):
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT EP")
    with pytest.raises(SdrtError, match="needs onnxruntime-gpu") as e:
        open_component(open_bundle(tiny_bundle), "unet", "tensorrt:1")
    assert "\n" not in str(e.value)


def test_unknown_device_and_misrouted_sessions_are_one_line(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    with pytest.raises(SdrtError) as e:
        open_component(bundle, "unet", "gpu")
    assert str(e.value) == "unknown device 'gpu'; valid devices: cpu, cuda, tensorrt, trt (GPU ones take :N)"
    with pytest.raises(SdrtError, match="device 'trt' runs sdrt's TensorRT engines") as e:
        Session(bundle.component("unet"), "trt")
    assert "open_component" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SdrtError, match="device 'tensorrt' needs the TensorRT EP's options") as e:
        Session(bundle.component("unet"), "tensorrt")
    assert "\n" not in str(e.value)
    with pytest.raises(SdrtError, match="device 'trt' runs engines built from"):
        open_component(bundle, "unet", "trt", graph=bundle.path / "unet" / "model.cpu.onnx")


def test_every_backend_implements_the_interface():
    assert not Session.__abstractmethods__ and not EngineComponent.__abstractmethods__
    assert issubclass(EngineComponent, Backend)
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def _imports(path: Path) -> set[str]:
    """The backends modules a module imports anywhere in it (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdrt.runtime.backends"):
            if node.module == "sdrt.runtime.backends":
                found |= {a.name for a in node.names if (BACKENDS / f"{a.name}.py").exists()}
            else:
                found.add(node.module.split(".")[3])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[3] for a in node.names if a.name.startswith("sdrt.runtime.backends.")}
    return found


def test_backends_import_graph_has_no_cycles():
    modules = sorted(p.stem for p in BACKENDS.glob("*.py") if p.stem != "__init__")
    graph = {m: _imports(BACKENDS / f"{m}.py") - {m} for m in modules}
    assert graph["ort_tensorrt"] >= {"onnxruntime"} and "ort_tensorrt" not in graph["onnxruntime"]
    done, active = set(), []

    def visit(m):
        assert m not in active, f"import cycle: {' -> '.join([*active[active.index(m):], m])}"
        if m in done:
            return
        active.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        active.pop()
        done.add(m)

    for m in modules:
        visit(m)


@pytest.mark.parametrize("module", sorted(p.stem for p in BACKENDS.glob("*.py") if p.stem != "__init__"))
def test_each_backends_module_imports_fresh(module):
    code = (f"import sys, sdrt.runtime.backends.{module} as m; "
            "assert 'torch' not in sys.modules; print(m.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
    assert r.stdout.strip() == f"sdrt.runtime.backends.{module}"
