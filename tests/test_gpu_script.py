"""The prepared GPU proof (benchmarks/gpu) rehearsed on the CPU: every stage runs with the tiny
model, and its JSON records say what ran, what was skipped for want of CUDA, and finite numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdrt.benchmarks.gpu import prove
from sdrt.runtime.sampling.noise import PhiloxNVGenerator, TorchCUDAGenerator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    # The stage limits are the device's time budget; here they only guard against a hang (3x the
    # device's: a rehearsal is not a timing, and a shared 2-core machine ran past 0.5x of them)
    r = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.gpu.prove", "--dry-run", "--out", str(out),
                        "--work", str(work), "--root", str(ROOT), "--cpu-budget-scale", "3"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (out / "run.log").read_text()[-3000:]
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return out, recs


def _of(recs, stage, kind):
    return [r for r in recs if r["stage"] == stage and r["kind"] == kind]


def test_every_stage_finished(records):
    _, recs = records
    done = {r["stage"] for r in recs if r["kind"] == "stage" and r["status"] == "done"}
    assert done == set(prove.STAGES)


def test_env_and_tensorrt_records(records):
    _, recs = records
    (env,) = _of(recs, "env", "env")
    assert env["cuda_available"] is False and "onnxruntime" in env and "torch" in env
    routes = {r["device"]: r for r in _of(recs, "tensorrt", "route")}
    assert set(routes) == {"trt", "tensorrt"}
    for r in routes.values():  # refused cleanly: one line, an SdrtError
        assert r["status"] == "refused" and r["one_line"], r
    (plan,) = _of(recs, "tensorrt", "refit_plan")  # the LoRA's merged weights, by the graph's names
    assert plan["weights"] == 3 and plan["all_in_graph"], plan  # three layers, one weight each
    (refit,) = _of(recs, "tensorrt", "refit")
    assert refit["status"] == "skipped: no CUDA GPU"


def test_noise_records_and_fixtures(records):
    out, recs = records
    compares = _of(recs, "noise", "compare")
    assert len(compares) == len(prove.NOISE_SEEDS) * len(prove.NOISE_SHAPES)
    for r in compares:
        assert r["status"].startswith("rehearsal") and r["exact_fraction"] == 1.0 and r["max_ulp"] == 0
        assert math.isfinite(r["max_abs"]) and sum(r["ulp_histogram"]) == math.prod(r["shape"])
    fixtures = np.load(out / "noise-fixtures.npz")
    assert len(fixtures.files) == _of(recs, "noise", "fixtures")[0]["arrays"] > 0


def test_kernels_stage_collects_the_cuda_tests(records):
    _, recs = records
    (r,) = _of(recs, "kernels", "pytest")
    assert r["returncode"] == 0 and r["collect_only"] and "test_kernels_cuda.py" in r["tail"]


def test_fidelity_numbers_are_finite(records):
    out, recs = records
    rows = {r["backend"]: r for r in _of(recs, "fidelity", "compare")}
    assert rows["sdrt-cuda-fp16"]["status"] == "skipped: no CUDA"
    cpu = rows["sdrt-cpu-fp32"]
    for field in ("unet_step", "image_float", "image_8bit"):
        assert math.isfinite(cpu[field]["max_abs"])
        assert cpu[field]["psnr"] is None or math.isfinite(cpu[field]["psnr"])
    assert cpu["unet_step"]["psnr"] > 60  # the CPU route against torch on the same weights
    assert set(np.load(out / "fidelity-images.npz").files) == {"torch-fp32", "sdrt-fp32"}


def test_speed_records(records):
    _, recs = records
    ok = [r for r in recs if r["kind"] == "speed" and r.get("status") == "ok"]
    cases = {c for c, _, _ in prove._speed_cases(None)}
    for backend in ("sdrt-cpu-fp32", "torch-sdpa-cpu-fp32"):
        rows = [r for r in ok if r["backend"] == backend]
        assert {r["case"] for r in rows} == cases
        for r in rows:
            assert r["end_to_end_ms"] > 0 and r["per_step_ms"] > 0 and set(r["last_run_parts_ms"]) == {
                "text_s", "sampling_s", "decode_s"}
    (skip,) = [r for r in recs if r["stage"] == "speed-compile" and r["kind"] == "speed"]
    assert skip["status"].startswith("skipped: no CUDA")


def test_a_stage_over_its_limit_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(prove, "MIN_LIMIT_S", 1)  # importing torch alone takes longer
    rc = prove.main(["--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--stages", "env,noise",
                     "--cpu-budget-scale", "0.0001"])
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    statuses = [(r["stage"], r["status"]) for r in recs if r["kind"] == "stage"]
    assert rc == 1 and ("env", "timeout") in statuses
    assert ("noise", "timeout") in statuses or any(r["stage"] == "noise" for r in recs if r["kind"] == "compare")


def test_cuda_generator_layout():
    # One grid pass (4x64x64 on 132 SMs): thread i's first Philox draw is element i, the webui's NV layout,
    # which uses float64 arithmetic: the two agree to float32 rounding
    a, b = TorchCUDAGenerator(7).randn((4, 64, 64)), PhiloxNVGenerator(7).randn((4, 64, 64))
    assert np.abs(a - b).max() < 1e-5
    g = TorchCUDAGenerator(7)
    g.randn((4, 64, 64))
    assert g.offset == 4  # one draw of four words per thread
    # Past one grid pass the elements wrap over the threads and the SM count decides the values
    big = (3, 333, 1001)
    x, y = TorchCUDAGenerator(7, sm_count=132).randn(big), TorchCUDAGenerator(7, sm_count=108).randn(big)
    assert not np.array_equal(x, y) and abs(float(x.std()) - 1) < 0.01
