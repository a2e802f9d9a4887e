"""TensorRT engine profiles, cache keys, plan files, build locks; the ONNX Runtime GPU routes' plumbing.

Everything here but the last tests is pure Python and runs anywhere. The builder is a parameter of
the cache (a plain callable), so the locking and rebuild logic is tested with a fake one; the real
TensorRT builder and the CUDA route run only where TensorRT / a GPU exist, and skip otherwise.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.runtime.backends import cache, gpu, open_component, profiles
from sdrt.runtime.backends import tensorrt as engines
from sdrt.runtime.backends.cache import EngineCache, EngineFileError, EngineKey
from sdrt.runtime.backends.onnxruntime import providers_for
from sdrt.runtime.bundle import open_bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

from conftest import run_sdrt

UNET = unet_spec(4, 4, 768)
TEXT = text_encoder_spec(768, 12)
VAE = vae_decoder_spec(4)
GPU = gpu.GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")


def _trt_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is None


NO_TRT = "TensorRT is not installable in this environment (no NVIDIA libraries on PyPI here); the builder is unverified"


# --- profiles ---------------------------------------------------------------------------------

def test_static_profile_sd15_shapes():
    s = profiles.build_shapes(width=(512,) * 3, height=(768,) * 3, batch=(2,) * 3)
    assert s.static
    unet = profiles.profile_shapes(UNET, profiles.component_axes(UNET, s))
    # 2 images -> 4 guided rows; 768x512 pixels -> 96x64 latents; one prompt chunk -> 77 tokens
    assert unet == {"sample": ((4, 4, 96, 64),) * 3, "timestep": ((4,),) * 3,
                    "encoder_hidden_states": ((4, 77, 768),) * 3}
    text = profiles.profile_shapes(TEXT, profiles.component_axes(TEXT, s))
    assert text == {"inputs_embeds": ((1, 77, 768), (2, 77, 768), (16, 77, 768))}  # the spec's chunk batches
    vae = profiles.profile_shapes(VAE, profiles.component_axes(VAE, s))
    assert vae == {"latent_sample": ((1, 4, 96, 64),) * 3}
    enc_spec = vae_encoder_spec(4)
    enc = profiles.profile_shapes(enc_spec, profiles.component_axes(enc_spec, s))
    assert enc == {"sample": ((1, 3, 768, 512),) * 3}
    assert profiles.is_static(unet) and not profiles.is_static(text)


def test_sdxl_profile_shapes():
    """SDXL's UNet takes the added conditioning (text_embeds, time_ids) in the guided batch; the second
    text encoder gets engines like the first, and only the components a bundle has are built."""
    unet = unet_spec(4, 4, 2048, added=(1280, 6))
    text_2 = text_encoder_spec(1280, 32, name="text_encoder_2", raw_states=True)
    s = profiles.build_shapes(width=profiles.dim_range("width", 1024, 768, 1024),
                             height=profiles.dim_range("height", 1024, 768, 1024),
                             batch=profiles.dim_range("batch", 1, None, 2))
    shapes = profiles.profile_shapes(unet, profiles.component_axes(unet, s))
    assert shapes["sample"] == ((1, 4, 96, 96), (2, 4, 128, 128), (4, 4, 128, 128))
    assert shapes["encoder_hidden_states"] == ((1, 77, 2048), (2, 77, 2048), (4, 77, 2048))
    assert shapes["text_embeds"] == ((1, 1280), (2, 1280), (4, 1280))
    assert shapes["time_ids"] == ((1, 6), (2, 6), (4, 6))
    assert profiles.profile_shapes(text_2, profiles.component_axes(text_2, s)) == {
        "inputs_embeds": ((1, 77, 1280), (2, 77, 1280), (16, 77, 1280))}
    refiner = unet_spec(4, 4, 1280, added=(1280, 5))
    assert profiles.profile_shapes(refiner, profiles.component_axes(refiner, s))["time_ids"][2] == (4, 5)

    class Bundle:  # has() is all engine_components reads
        def __init__(self, *names):
            self.names = names

        def has(self, name):
            return name in self.names

    assert profiles.engine_components(Bundle("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")) == (
        "text_encoder", "text_encoder_2", "unet", "vae_decoder")
    assert profiles.engine_components(Bundle("text_encoder_2", "unet", "vae_decoder")) == (
        "text_encoder_2", "unet", "vae_decoder")


def test_dynamic_profile_shapes():
    s = profiles.build_shapes(width=profiles.dim_range("width", 512, 256, 1024),
                             height=profiles.dim_range("height", 512, 256, 768),
                             batch=profiles.dim_range("batch", 1, None, 4),
                             chunks=profiles.dim_range("prompt chunks", 1, None, 3))
    assert not s.static
    unet = profiles.profile_shapes(UNET, profiles.component_axes(UNET, s))
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 96, 128))
    assert unet["timestep"] == ((1,), (2,), (8,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))
    vae = profiles.profile_shapes(VAE, profiles.component_axes(VAE, s))
    assert vae["latent_sample"] == ((1, 4, 32, 32), (1, 4, 64, 64), (1, 4, 96, 128))
    assert profiles.covers(unet, {"sample": (2, 4, 64, 80), "timestep": (2,), "encoder_hidden_states": (2, 154, 768)})
    assert not profiles.covers(unet, {"sample": (2, 4, 64, 136)})
    assert not profiles.covers(unet, {"sample": (2, 4, 64)})


def test_vae_tile_profile():
    s = profiles.build_shapes(width=(1024,) * 3, height=(768,) * 3, vae_tile=256)
    vae = profiles.profile_shapes(VAE, profiles.component_axes(VAE, s))
    assert vae["latent_sample"] == ((1, 4, 32, 32),) * 3  # every tile has the tile size


@pytest.mark.parametrize("kwargs, message", [
    ({"width": (500,) * 3, "height": (512,) * 3}, "width must be a positive multiple of 8, got 500"),
    ({"width": (512,) * 3, "height": (512, 256, 1024)}, "height: min 512 <= opt 256 <= max 1024 does not hold"),
    ({"width": (512,) * 3, "height": (512,) * 3, "batch": (0, 1, 1)}, "batch must be at least 1, got 0"),
    ({"width": (512,) * 3, "height": (512,) * 3, "vae_tile": 100}, "VAE tile size must be a positive multiple of 8"),
    ({"width": (512,) * 3, "height": (512,) * 3, "chunks": (2, 1, 1)}, "prompt chunks: min 2 <= opt 1"),
])
def test_shape_errors_are_one_line(kwargs, message):
    with pytest.raises(SdrtError, match=message) as e:
        profiles.build_shapes(**kwargs)
    assert "\n" not in str(e.value)


def test_dim_range_and_missing_axis():
    assert profiles.dim_range("width", 512) == (512, 512, 512)
    assert profiles.dim_range("width", None, 256, 1024) == (256, 256, 1024)
    with pytest.raises(SdrtError, match="width: min 1024 <= opt 512"):
        profiles.dim_range("width", 512, 1024, None)
    with pytest.raises(SdrtError, match="no size for axis 'sequence' of input encoder_hidden_states"):
        profiles.profile_shapes(UNET, {"batch": (1, 1, 1), "height": (8, 8, 8), "width": (8, 8, 8)})


# --- keys and plan files --------------------------------------------------------------------------

def _key(**change) -> EngineKey:
    fields = dict(component="unet", gpu=GPU.name, compute_capability=GPU.compute_capability, tensorrt="10.3.0",
                  onnx_sha256="ab" * 32, precision="fp16", profile={"sample": ((2, 4, 64, 64),) * 3})
    fields.update(change)
    return EngineKey(**fields)


def test_key_covers_every_field():
    base = _key()
    assert base.digest == _key().digest and len(base.digest) == 64
    variants = [_key(gpu="NVIDIA H200"), _key(compute_capability="8.9"), _key(tensorrt="10.4.0"),
                _key(onnx_sha256="cd" * 32), _key(precision="fp32"), _key(component="vae_decoder"),
                _key(profile={"sample": ((2, 4, 64, 64), (2, 4, 64, 64), (2, 4, 96, 96))}),
                _key(runtime="onnxruntime-1.20.1"), _key(format=cache.ENGINE_FORMAT + 1)]
    assert len({base.digest, *(v.digest for v in variants)}) == len(variants) + 1
    assert base.directory == "nvidia-h100-80gb-hbm3-sm90-trt10.3.0"
    assert base.stem == f"unet-{base.digest[:16]}"
    assert EngineKey.from_fields(json.loads(json.dumps(base.fields()))) == base


def test_graph_digest_covers_external_weights(tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"graph")
    first = cache.graph_digest(d / "model.onnx")
    (d / "model.onnx_data").write_bytes(b"weights")
    second = cache.graph_digest(d / "model.onnx")
    (d / "model.onnx_data").write_bytes(b"weightz")  # same size, new content
    third = cache.graph_digest(d / "model.onnx")
    assert len({first, second, third}) == 3


def test_plan_file_checks(tmp_path):
    key, path = _key(), tmp_path / "unet.plan"
    plan = os.urandom(4096)
    cache.write_plan(path, key, plan)
    assert cache.read_plan(path, key) == plan
    data = path.read_bytes()

    path.write_bytes(data[:-100])
    with pytest.raises(EngineFileError, match="truncated"):
        cache.read_plan(path, key)
    path.write_bytes(data[:10])
    with pytest.raises(EngineFileError, match="truncated"):
        cache.read_plan(path, key)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(EngineFileError, match="corrupt"):
        cache.read_plan(path, key)
    path.write_bytes(os.urandom(5000))  # a raw TensorRT plan or anything else
    with pytest.raises(EngineFileError, match="not an sdrt engine file"):
        cache.read_plan(path, key)
    cache.write_plan(path, _key(precision="fp32"), plan)
    with pytest.raises(EngineFileError, match="another key"):
        cache.read_plan(path, key)
    with pytest.raises(cache.EngineMissing):
        cache.read_plan(tmp_path / "absent.plan", key)


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a.plan"
    cache.write_plan(path, _key(), b"old plan")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        cache.write_plan(path, _key(), b"new plan" * 1000)
    monkeypatch.undo()
    assert cache.read_plan(path, _key()) == b"old plan"
    assert [p.name for p in tmp_path.iterdir()] == ["a.plan"]  # no temporary file left behind


class CountingBuilder:
    def __init__(self, log: Path, plan: bytes = b"plan-bytes" * 100, delay: float = 0.0):
        self.log, self.plan, self.delay = log, plan, delay

    def __call__(self) -> bytes:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.delay)
        return self.plan


def _builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_cache_builds_loads_and_rebuilds_refused_files(tmp_path):
    store, key, log = EngineCache(tmp_path / "engines"), _key(), tmp_path / "builds.log"
    build = CountingBuilder(log)
    r = store.get_or_build(key, build)
    assert (r.status, _builds(log)) == ("built", 1)
    assert r.path == tmp_path / "engines" / key.directory / f"{key.stem}.plan"
    assert store.get_or_build(key, build).status == "loaded" and _builds(log) == 1

    r.path.write_bytes(r.path.read_bytes()[:-7])  # truncated
    r2 = store.get_or_build(key, build)
    assert r2.status == "rebuilt" and "truncated" in r2.reason and _builds(log) == 2
    assert cache.read_plan(r.path, key) == build.plan

    cache.write_plan(r.path, _key(tensorrt="9.9.9"), b"foreign")  # a plan for another key at this path
    r3 = store.get_or_build(key, build)
    assert r3.status == "rebuilt" and "another key" in r3.reason and _builds(log) == 3

    assert store.get_or_build(key, build, force=True).status == "rebuilt" and _builds(log) == 4
    other = store.get_or_build(_key(precision="fp32"), build)
    assert other.status == "built" and other.path != r.path and _builds(log) == 5


def _race(root: str, log: str, barrier, results):
    barrier.wait()
    r = EngineCache(root).get_or_build(_key(), CountingBuilder(Path(log), delay=0.5))
    results.put((r.status, r.plan))


def test_two_processes_build_the_same_engine_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "engines"), str(log), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _builds(log) == 1
    assert sorted(s for s, _ in outcomes) == ["built", "loaded"]
    assert outcomes[0][1] == outcomes[1][1]


# --- building a bundle's engines with an injected builder -----------------------------------------

@pytest.fixture
def spec_bundle(tmp_path):
    """A bundle directory with sdrt's manifest and stand-in graph files (never run, only hashed)."""
    root = tmp_path / "bundle"
    specs = {"text_encoder": text_encoder_spec(32, 2), "unet": unet_spec(4, 4, 32), "vae_decoder": VAE,
             "vae_encoder": vae_encoder_spec(4)}
    components = {}
    for name, spec in specs.items():
        (root / name).mkdir(parents=True)
        (root / name / "model.onnx").write_bytes(f"graph of {name}".encode())
        components[name] = {"path": f"{name}/model.onnx", "precision": "fp32", **spec.to_json()}
    manifest = {"format": "sdrt-bundle", "format_version": 1, "architecture": "sd1", "prediction_type": "epsilon",
                "latent_channels": 4, "vae_scale_factor": 8, "latent_scale_factor": 0.18215,
                "default_size": [512, 512], "components": components, "source": {"name": "fake", "hash": None},
                "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                              "beta_schedule": "scaled_linear"},
                "text_encoder": {"hidden_size": 32, "num_layers": 2}}
    (root / "sdrt.json").write_text(json.dumps(manifest))
    return open_bundle(root)


def test_build_engines_with_injected_builder(spec_bundle):
    calls = []

    def builder(onnx_path, shapes, precision):
        calls.append((Path(onnx_path).parent.name, shapes, precision))
        return f"engine {len(calls)}".encode()

    shapes = profiles.build_shapes(width=(512,) * 3, height=(512,) * 3)
    kw = dict(builder=builder, identity=GPU, tensorrt="10.3.0")
    first = engines.build_engines(spec_bundle, shapes, **kw)
    assert [(r.component, r.status) for r in first] == [("text_encoder", "built"), ("unet", "built"),
                                                        ("vae_decoder", "built")]
    assert calls[1] == ("unet", {"sample": ((2, 4, 64, 64),) * 3, "timestep": ((2,),) * 3,
                                 "encoder_hidden_states": ((2, 77, 32),) * 3}, "fp16")
    assert all(r.path.parent == spec_bundle.path / "engines" / "nvidia-h100-80gb-hbm3-sm90-trt10.3.0" for r in first)
    again = engines.build_engines(spec_bundle, shapes, **kw)
    assert [r.status for r in again] == ["loaded"] * 3 and len(calls) == 3
    # Another size, precision or graph is another engine, never the old one
    bigger = engines.build_engines(spec_bundle, profiles.build_shapes(width=(768,) * 3, height=(512,) * 3),
                                   components=("unet",), **kw)
    fp32 = engines.build_engines(spec_bundle, shapes, components=("unet",), precision="fp32", **kw)
    (spec_bundle.path / "unet" / "model.onnx").write_bytes(b"re-exported graph")
    regraph = engines.build_engines(spec_bundle, shapes, components=("unet",), **kw)
    paths = {first[1].path, bigger[0].path, fp32[0].path, regraph[0].path}
    assert len(paths) == 4 and [r.status for r in (*bigger, *fp32, *regraph)] == ["built"] * 3

    # The runtime's view: the unet engines for this GPU, TensorRT and current graph, static first
    match = {"gpu": GPU.name, "compute_capability": "9.0", "tensorrt": "10.3.0",
             "onnx_sha256": cache.graph_digest(spec_bundle.component("unet"))}
    found = EngineCache(spec_bundle.path / "engines").entries("unet", match)
    assert [p for p, _ in found] == [regraph[0].path]


def test_build_without_tensorrt_is_a_one_line_error(spec_bundle):
    if not _trt_missing():
        pytest.skip("TensorRT is installed here")
    shapes = profiles.build_shapes(width=(512,) * 3, height=(512,) * 3)
    with pytest.raises(SdrtError, match="TensorRT is not installed"):
        engines.build_engines(spec_bundle, shapes, identity=GPU)
    r = run_sdrt("build", spec_bundle.path, "--width", 512, "--height", 512)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {engines.NO_TENSORRT}"]
    r = run_sdrt("build", spec_bundle.path, "--width", 500)
    assert r.returncode == 1 and r.stderr.strip() == "error: width must be a positive multiple of 8, got 500"


# --- ONNX Runtime GPU routes: options, diagnoses, I/O binding -------------------------------------

def test_missing_gpu_provider_names_the_package():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    for device in ("cuda", "cuda:1", "tensorrt"):
        with pytest.raises(SdrtError, match="needs onnxruntime-gpu") as e:
            providers_for(device)
        assert "\n" not in str(e.value)
    with pytest.raises(SdrtError, match="unknown device 'gpu'"):
        providers_for("gpu")
    with pytest.raises(SdrtError, match="device 'trt' runs sdrt's TensorRT engines"):
        providers_for("trt")


def test_provider_start_failure_names_the_library(tmp_path):
    (tmp_path / "libonnxruntime_providers_cuda.so").write_bytes(b"not an ELF file")
    message = gpu.provider_start_failure("CUDAExecutionProvider", capi_dir=tmp_path)
    assert message.startswith("ONNX Runtime could not start its CUDAExecutionProvider: ")
    assert "libonnxruntime_providers_cuda.so" in message and "cuDNN 9" in message and "\n" not in message
    message = gpu.provider_start_failure("TensorrtExecutionProvider", capi_dir=tmp_path)
    assert "libonnxruntime_providers_tensorrt.so is missing" in message and "libnvinfer" in message


def test_provider_options_from_the_profile(tmp_path):
    shapes = profiles.profile_shapes(UNET, profiles.component_axes(
        UNET, profiles.build_shapes(width=(512, 512, 768), height=(512,) * 3)))
    opts = gpu.tensorrt_ep_options(tmp_path / "ort-unet-x", shapes, fp16=True)
    # A static batch of one image is two guided rows; the width spans 64..96 latents
    assert opts["trt_profile_min_shapes"] == "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768"
    assert opts["trt_profile_max_shapes"] == "sample:2x4x64x96,timestep:2,encoder_hidden_states:2x77x768"
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path / "ort-unet-x")
    assert opts["trt_timing_cache_path"] == str(tmp_path)
    assert gpu.cuda_provider_options(1, cuda_graph=True)["enable_cuda_graph"] == "1"
    assert gpu.parse_device("cuda:1") == ("cuda", 1)


def test_gpu_identity_without_a_driver():
    if gpu._load_library(["libcuda.so.1", "libcuda.so", "nvcuda.dll"]) is not None:
        pytest.skip("an NVIDIA driver is installed here")
    with pytest.raises(SdrtError, match="no NVIDIA driver found"):
        gpu.gpu_identity()


def _small_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    c = helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.random.default_rng(0).standard_normal(64).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["xw"]),
                               helper.make_node("Add", ["xw", "context"], ["y"])], "g", [x, c], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_bound_io_matches_a_plain_run_and_reuses_constant_feeds(tmp_path):
    session = ort.InferenceSession(str(_small_graph(tmp_path / "g.onnx")), providers=["CPUExecutionProvider"])
    bound = gpu.BoundIO(session, "cpu")
    rng = np.random.default_rng(1)
    context = rng.standard_normal((2, 8)).astype(np.float32)
    for step in range(3):
        x = rng.standard_normal((2, 8)).astype(np.float32)
        (got,) = bound.run({"x": x, "context": context}, ["y"])
        (want,) = session.run(["y"], {"x": x, "context": context})
        np.testing.assert_array_equal(got, want)
    assert bound.copies_skipped == 2  # the context went to the device once


# --- real hardware only ----------------------------------------------------------------------------

@pytest.mark.skipif(_trt_missing(), reason=NO_TRT)
def test_tensorrt_engine_builds_and_matches_onnxruntime(tiny_bundle, tmp_path):  # pragma: no cover - GPU only
    import shutil

    bundle = open_bundle(shutil.copytree(tiny_bundle, tmp_path / "tiny"))
    shapes = profiles.build_shapes(width=(64,) * 3, height=(64,) * 3)
    results = engines.build_engines(bundle, shapes, precision="fp32", components=("unet",))
    assert results[0].status == "built"
    assert engines.build_engines(bundle, shapes, precision="fp32", components=("unet",))[0].status == "loaded"
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.full((2,), 500.0, np.float32),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)}
    want = open_component(bundle, "unet", graph=bundle.component("unet")).run(feeds)["out_sample"]
    got = open_component(bundle, "unet", "trt", cuda_graph=True)
    for _ in range(3):  # the second and third runs replay the captured CUDA graph
        np.testing.assert_allclose(got.run(feeds)["out_sample"], want, atol=2e-3)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no onnxruntime-gpu here (CPU build): the CUDA route runs only on NVIDIA machines")
def test_cuda_pipeline_matches_cpu(tiny_bundle):  # pragma: no cover - GPU only
    from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline

    p = GenerationParams("a red circle", steps=4, sampler_name="Euler a", seed=3)
    cpu = Pipeline(tiny_bundle).generate(p)[0].image
    cuda = Pipeline(tiny_bundle, device="cuda").generate(p)[0].image
    diff = np.abs(np.asarray(cpu, np.int16) - np.asarray(cuda, np.int16))
    assert diff.max() <= 3
