"""The CUDA build of sdrt's kernels (libsdrt_kernels_cuda).

Compiled here whenever nvcc is found: on PATH, or pip's ``nvidia-cuda-nvcc`` that the dev extra
installs on Linux, so CI always compiles it. Loaded by ONNX Runtime on any machine (cudart is
linked statically; the driver is opened only by a kernel launch), where it serves the CPU op too.
Run on an NVIDIA GPU when ONNX Runtime's CUDA provider is present (onnxruntime-gpu)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_kernels import group_norm_ref

ROOT = Path(__file__).resolve().parent.parent


def find_nvcc() -> Path | None:
    """nvcc on PATH, else the one of pip's nvidia-cuda-nvcc package (site-packages/nvidia/cu13/bin)."""
    if shutil.which("nvcc"):
        return Path(shutil.which("nvcc"))
    try:
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13/bin/nvcc", "cuda_nvcc/bin/nvcc"):
            if (Path(base) / sub).is_file():
                return Path(base) / sub
    return None


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> Path:
    nvcc = find_nvcc()
    if nvcc is None or not sys.platform.startswith("linux"):
        if os.environ.get("CI"):
            pytest.fail("CI compiles the CUDA kernels, but no nvcc was found (the dev extra installs nvidia-cuda-nvcc)")
        pytest.skip("no nvcc here: the CUDA kernels are not compiled")
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the kernels (the dev extra installs it)"
    build = tmp_path_factory.mktemp("cuda-build")
    for cmd in ([cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_BUILD_TYPE=Release"],
                [cmake, "--build", str(build), "--target", "sdrt_kernels_cuda", "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lib = build / "libsdrt_kernels_cuda.so"
    assert lib.is_file()
    return lib


def group_norm_graph(dtype: int, channels_last: bool, silu: bool, shape: list[int]) -> bytes:
    node = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain="ai.sdrt", groups=32, epsilon=1e-5,
                            activation=int(silu), channels_last=int(channels_last))
    c = shape[-1] if channels_last else shape[1]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, shape),
                                            helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [c]),
                                            helper.make_tensor_value_info("beta", TensorProto.FLOAT, [c])],
                              [helper.make_tensor_value_info("y", dtype, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.sdrt", 1)],
                              ir_version=9)
    return model.SerializeToString()


def run_group_norm(lib: Path, provider: str, dtype: int, channels_last: bool, silu: bool):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 64, 12, 10)) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    ref = group_norm_ref(x, gamma, beta, 32, 1e-5, silu)
    inp = np.ascontiguousarray(np.moveaxis(x, 1, -1) if channels_last else x)
    inp = inp.astype(np.float16 if dtype == TensorProto.FLOAT16 else np.float32)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(lib))
    if provider != "CPUExecutionProvider":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node on the GPU
    sess = ort.InferenceSession(group_norm_graph(dtype, channels_last, silu, list(inp.shape)), opts,
                                providers=[provider])
    out = sess.run(None, {"x": inp, "gamma": gamma, "beta": beta})[0].astype(np.float64)
    return (np.moveaxis(out, -1, 1) if channels_last else out), ref, sess


def test_cuda_library_exports_its_entry_points_only(cuda_library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    symbols = subprocess.run([nm, "-D", "--defined-only", str(cuda_library)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    assert {"RegisterCustomOps", "sdrt_group_norm_f32", "sdrt_kernels_abi_version"} <= names
    assert not any("group_norm_kernel" in n or n.startswith("_ZN4sdrt") for n in names)
    assert not any(n.startswith(("cuda", "__cuda")) for n in names)  # the static cudart stays inside


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_library_loads_anywhere_and_serves_the_cpu_op(cuda_library, channels_last):
    out, ref, _ = run_group_norm(cuda_library, "CPUExecutionProvider", TensorProto.FLOAT, channels_last, True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _gpu() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_cuda_group_norm_on_the_gpu(cuda_library, dtype, channels_last, silu):
    out, ref, sess = run_group_norm(cuda_library, "CUDAExecutionProvider", dtype, channels_last, silu)
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    tol = 2e-2 if dtype == TensorProto.FLOAT16 else 1e-4
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
