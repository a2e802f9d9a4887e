"""``sdrt bench``: the timing loop, the record format, the report, runs against torch, interruption."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdrt.benchmarks import backends, charts, fidelity, machine, records, report, timing
from sdrt.benchmarks import harness as bench
from sdrt.runtime.errors import SdrtError

from conftest import run_sdrt


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_fn_excludes_warmup_and_takes_the_median(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    durations = iter([5.0, 0.3, 0.1, 0.2, 0.9])  # one warm-up call, then four timed calls
    syncs = []

    def fn():
        clock.now += next(durations)

    t = timing.time_fn(fn, warmup=1, repeats=4, sync=lambda: syncs.append(clock.now))
    assert t["times_s"] == pytest.approx([0.3, 0.1, 0.2, 0.9])
    assert t["median_s"] == pytest.approx(0.25) and t["min_s"] == pytest.approx(0.1)
    assert t["first_s"] == pytest.approx(5.0)  # the warm-up is reported apart, never in the median
    assert (t["warmup"], t["repeats"]) == (1, 4)
    assert len(syncs) == 2 * 5  # before each clock start and before each clock stop
    with pytest.raises(SdrtError):
        timing.time_fn(fn, repeats=0)


def test_record_writer_lines_and_reader(tmp_path):
    path = tmp_path / "r.jsonl"
    w = records.RecordWriter(path)
    w.write({"schema": records.SCHEMA, "x": 1, "fidelity": {"psnr": float("inf"), "max_abs": 0.0}})
    w.write({"schema": records.SCHEMA, "x": 2})
    with open(path, "a") as f:
        f.write('{"schema": "sdrt-bench/1", "x": 3')  # a torn last line (a killed writer) is skipped
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["fidelity"]["psnr"] is None  # JSON has no infinity
    assert [r["x"] for r in records.read_records([tmp_path])] == [1, 2]
    assert w.count == 2


def test_parse_list_and_backend_selection():
    assert bench.parse_list("20,50") == ["20", "50"] and bench.parse_list("20 50", int) == [20, 50]
    with pytest.raises(SdrtError, match="list of int"):
        bench.parse_list("20,x", int)
    everything = backends.backends({"installed": True, "cuda": False}, compile=False)
    keys = {b.key: b for b in everything}
    assert keys["onnxruntime-cpu-fp32"].status == "ok"
    assert keys["torch-sdpa-fp16"].status == "unavailable" and "CUDA" in keys["torch-sdpa-fp16"].note
    assert keys["torch-compile-fp32"].status == "skipped"
    assert keys["tensorrt-engine-fp16"].status == "unavailable"
    assert [b.key for b in backends.select_backends(everything, ["torch-sdpa"])] == ["torch-sdpa-fp32", "torch-sdpa-fp16"]
    with pytest.raises(SdrtError, match="unknown backend"):
        backends.select_backends(everything, ["torch-fast"])
    with pytest.raises(SdrtError, match="unknown measurement"):
        bench.BenchSettings(measure=("unet",)).tasks()


def _record(backend, measurement, *, steps=None, ms=None, device="cpu", status="ok", note=None, fid=None, **extra):
    dev = ({"kind": "cpu", "name": "Test CPU", "cores": 2, "driver": None} if device == "cpu" else
           {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "memory_gb": 80} if device == "cuda"
           else device)
    rec = {"schema": records.SCHEMA, "date": "2026-11-21T00:00:00Z", "run": "t", "device": dev,
           "machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 8, "platform": "Linux", "python": "3.11"},
           "versions": {"sdrt": "0.1.0", "onnxruntime": "1.31.1", "torch": "2.13.0"}, "conditions": "shared machine",
           "workload": {"name": "sd15-random", "width": 512, "height": 512, "description": "random"},
           "backend": backend, "precision": "fp32", "runtime": "torch" if backend.startswith("torch") else "sdrt",
           "measurement": measurement, "steps": steps, "status": status, "threads": 2,
           "sampler": "Euler a", "cfg_scale": 7.0, "fidelity": fid, "peak_host_mb": 1000.0, "peak_device_mb": None}
    if note:
        rec["note"] = note
    if ms is not None:
        rec["ms"] = ms
    if measurement == records.END_TO_END and status == "ok":
        rec.update(s_per_image=ms / 1000, it_s=steps / (ms / 1000))
    return {**rec, **extra}


def test_report_renders_tables_chart_and_notes(tmp_path):
    ref = {"against": fidelity.REFERENCE, "reference": True}
    written = [
        _record("onnxruntime-cpu", "unet_step", ms=11600.0, fid={"against": fidelity.REFERENCE, "max_abs": 2e-5, "psnr": 120.0}),
        _record("onnxruntime-cpu", records.END_TO_END, steps=20, ms=240000.0,
                fid={"against": fidelity.REFERENCE, "max_abs": 2.0, "psnr": 55.5}),
        _record("torch-eager", "unet_step", ms=12700.0, fid=ref),
        _record("torch-eager", records.END_TO_END, steps=20, ms=260000.0, fid=ref),
        _record("onnxruntime-cuda", None, status="unavailable", note="not available on this machine: no CUDA"),
        _record("onnxruntime-cuda", records.END_TO_END, steps=20, ms=900.0, device="cuda"),
        # an older record of the same measurement is superseded by the newer one
        {**_record("onnxruntime-cpu", "unet_step", ms=99999.0), "date": "2026-01-01T00:00:00Z"},
        # another benchmark's record (same schema, no backend or workload) is left out of the tables
        {"schema": records.SCHEMA, "measurement": "sampler_step_overhead", "timing": {"median_s": 0.001}},
    ]
    path = tmp_path / "bench-test.jsonl"
    w = records.RecordWriter(path)
    for r in written:
        w.write(r)
    md = report.render_markdown(records.read_records([tmp_path]))
    assert "### GPU: NVIDIA H100 80GB HBM3, driver 580.1" in md
    assert "### CPU: Test CPU (2 cores; instruction set not recorded)" in md  # a record from before the field
    assert md.index("### GPU") < md.index("### CPU")
    row = next(line for line in md.splitlines() if line.startswith("| `onnxruntime-cpu`"))
    assert "11,600" in row and "240" in row and "55.5 dB / 2" in row and "99,999" not in md
    assert "reference" in next(line for line in md.splitlines() if line.startswith("| `torch-eager`"))
    assert "not available on this machine: no CUDA" in md and "Threads 2; conditions: shared machine." in md
    out = report.write_report(records.read_records([tmp_path]), tmp_path)
    assert (tmp_path / "REPORT.md").read_text().count("| `torch-eager`") == 1
    chart = tmp_path / "render_time.png"
    if importlib.util.find_spec("matplotlib"):
        assert chart in out["written"] and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not chart.exists() and "matplotlib" in out["notes"][0]


def test_cpu_identity_includes_the_instruction_set():
    isa = machine.cpu_isa()
    assert isa is not None and isa == [f for f in machine.ISA_FLAGS if f in isa]
    with open("/proc/cpuinfo") as f:
        words = set(f.read().split())
    assert set(isa) <= words
    features = machine._numpy_cpu_features()  # the fallback's table agrees with the kernel's flags
    assert {f for f, n in machine.ISA_FLAGS.items() if n and features.get(n)} == {f for f in isa
                                                                                   if machine.ISA_FLAGS[f]}
    host = machine.machine()
    assert host["cpu_isa"] == isa and machine.device_info("cpu", host)["isa"] == isa
    assert machine.isa_tier(["avx2", "fma"]) == "AVX2" and machine.isa_tier(["avx2", "avx512f", "avx512_bf16"]) \
        == "AVX-512 BF16" and machine.isa_tier([]) == "baseline" and machine.isa_tier(None) is None


def test_report_never_merges_cpus_of_one_name_with_different_instruction_sets():
    avx2 = {"kind": "cpu", "name": "Test CPU", "cores": 2, "driver": None, "isa": ["avx2", "fma"]}
    bf16 = {**avx2, "isa": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]}
    recs = [_record("onnxruntime-cpu", "unet_step", ms=300.0, device=avx2),
            _record("onnxruntime-cpu", "unet_step", ms=100.0, device=bf16, date="2026-11-22T00:00:00Z"),
            _record("onnxruntime-cpu", "unet_step", ms=200.0)]  # an old record: no instruction set
    assert len(records.latest(recs)) == 3
    md = report.render_markdown(recs)
    for heading, ms in (("### CPU: Test CPU (2 cores; avx2 fma)", "300"),
                        ("### CPU: Test CPU (2 cores; avx2 fma avx512f avx512_vnni avx512_bf16)", "100"),
                        ("### CPU: Test CPU (2 cores; instruction set not recorded)", "200")):
        section = md[md.index(heading):].split("\n### ")[0]
        row = next(line for line in section.splitlines() if line.startswith("| `onnxruntime-cpu`"))
        assert f"| {ms} |" in row


def test_committed_report_is_what_the_committed_records_render():
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    expected = report.report_markdown(records.read_records([results]))
    assert (results / "REPORT.md").read_text() == expected, \
        "benchmarks/results/REPORT.md is stale: run `sdrt bench --report --no-grid`"


def test_cli_bench_against_torch(tiny_bundle, tiny_checkpoint, tmp_path):
    results = tmp_path / "bench.jsonl"
    r = run_sdrt("bench", "-m", tiny_bundle, "--reference", tiny_checkpoint, "--steps", "3,5", "--repeats", 2,
                 "--warmup", 1, "--e2e-repeats", 1, "--threads", 1, "--no-compile", "--note", "test run",
                 "--backends", "onnxruntime-cpu,onnxruntime-tensorrt,torch-eager,torch-sdpa", "-o", results)
    assert r.returncode == 0, r.stderr
    recs = records.read_records([results])
    ok = [x for x in recs if x["status"] == "ok"]
    assert len(ok) == 3 * 5, sorted({x.get("note") or "" for x in recs})  # 3 backends x (3 components, 3 and 5 steps)
    assert recs[0]["backend"] == "torch-eager"  # the reference runs first
    trt = [x for x in recs if x["backend"] == "onnxruntime-tensorrt"]
    assert len(trt) == 1 and trt[0]["status"] == "unavailable" and "not available" in trt[0]["note"]
    for x in ok:
        assert {"schema", "date", "machine", "device", "versions", "workload", "backend", "precision", "shapes",
                "timing", "threads", "peak_host_mb", "peak_device_mb", "fidelity"} <= set(x)
        assert x["device"]["kind"] == "cpu" and x["device"]["name"] and x["peak_device_mb"] is None
        assert x["device"]["isa"] == machine.cpu_isa() == x["machine"]["cpu_isa"]
        assert x["precision"] == "fp32" and x["threads"] == 1 and x["conditions"] == "test run"
        assert x["timing"]["repeats"] == (1 if x["measurement"] == "end_to_end" else 2)
        assert x["peak_host_mb"] > 10 and x["versions"]["onnxruntime"]
    e2e = {(x["backend"], x["steps"]): x for x in ok if x["measurement"] == "end_to_end"}
    assert e2e[("torch-eager", 5)]["fidelity"]["reference"] is True
    ours = e2e[("onnxruntime-cpu", 5)]
    assert ours["it_s"] > 0 and ours["s_per_image"] > 0 and ours["shapes"]["image"] == [1, 3, 64, 64]
    assert ours["fidelity"]["against"] == "torch-eager-fp32"
    assert ours["fidelity"]["max_abs"] <= 2 and (ours["fidelity"]["psnr"] is None or ours["fidelity"]["psnr"] >= 45)
    unet = next(x for x in ok if x["backend"] == "onnxruntime-cpu" and x["measurement"] == "unet_step")
    assert unet["fidelity"]["max_abs"] < 1e-3 and unet["shapes"]["sample"] == [2, 4, 8, 8]
    sdpa = next(x for x in ok if x["backend"] == "torch-sdpa" and x["measurement"] == "unet_step")
    assert sdpa["options"] == {"attention": "sdpa"} and sdpa["fidelity"]["max_abs"] < 1e-3
    assert "| `onnxruntime-cpu` | fp32 |" in r.stdout and "records appended to" in r.stdout


def test_cli_bench_sdxl_against_torch(sdxl_bundle, tmp_path):
    """SDXL: the UNet step takes seeded pooled ``text_embeds`` and the size ``time_ids`` beside the
    states (through sdrt's CFG denoiser; diffusers' ``added_cond_kwargs`` in the torch peer), the text
    stage compares both encoders' states and the pooled vectors, and every stage agrees with torch."""
    from sdrt.export.tiny import random_modules

    configs, bundle = sdxl_bundle
    folder = tmp_path / "diffusers"  # the bundle's weights (the fixture's seed) as a diffusers folder
    for name, module in zip(("unet", "vae", "text_encoder", "text_encoder_2"), random_modules(configs, seed=3)):
        module.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    results = tmp_path / "bench.jsonl"
    r = run_sdrt("bench", "-m", bundle, "--reference", folder,
                 "--measure", "text_encoder,unet_step,vae_decode,end_to_end", "--steps", 2, "--size", 64, "--repeats", 1, "--warmup", 0, "--threads", 1,
                 "--backends", "onnxruntime-cpu,torch-eager-fp32", "-o", results)
    assert r.returncode == 0, r.stderr
    recs = records.read_records([results])
    statuses = [(x["backend"], x["status"]) for x in recs]
    assert statuses == [("torch-eager", "ok")] * 4 + [("onnxruntime-cpu", "ok")] * 4, [x.get("note") for x in recs]
    assert recs[0]["workload"]["architecture"] == "sdxl"
    ours = {x["measurement"]: x for x in recs if x["backend"] == "onnxruntime-cpu"}
    theirs = next(x for x in recs if x["backend"] == "torch-eager" and x["measurement"] == "unet_step")
    width = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
    assert ours["unet_step"]["shapes"] == theirs["shapes"] == {
        "sample": [2, 4, 8, 8], "encoder_hidden_states": [2, 77, width],
        "text_embeds": [2, configs["text_encoder_2"]["projection_dim"]], "time_ids": [2, 6]}
    fid = {m: x["fidelity"] for m, x in ours.items()}
    assert all(f["against"] == "torch-eager-fp32" for f in fid.values())
    # measured: text encoder 153.5 dB, UNet step 124.1 dB (max-abs 2.2e-5), VAE 134.6 dB, image 89.0 dB
    assert fid["text_encoder"]["psnr"] >= 120 and fid["vae_decode"]["psnr"] >= 120, fid
    assert fid["unet_step"]["psnr"] >= 100 and fid["unet_step"]["max_abs"] < 1e-3, fid
    assert fid["end_to_end"]["psnr"] >= 60 and fid["end_to_end"]["max_abs"] <= 2, fid


def test_interrupt_keeps_finished_records(tiny_bundle, tmp_path):
    path = tmp_path / "r.jsonl"
    seen = []

    def progress(event):
        if event["event"] == "record":
            seen.append(event["label"])
            if len(seen) == 2:
                raise KeyboardInterrupt

    chosen = backends.select_backends(backends.backends({"installed": False}), ["onnxruntime-cpu"])
    workload = bench.Workload("tiny", tiny_bundle)
    settings = bench.BenchSettings(steps=(2, 3), repeats=1, warmup=0)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench([workload], chosen, settings, records.RecordWriter(path), progress=progress)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and path.read_text().endswith("\n")
    assert [json.loads(line)["measurement"] for line in lines] == ["text_encoder", "unet_step"]


def test_ctrl_c_stops_cleanly_with_status_130(tiny_bundle, tmp_path):
    path = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "bench", "-m", str(tiny_bundle),
                             "--backends", "onnxruntime-cpu", "--steps", "64", "--repeats", "1", "--e2e-repeats", "50",
                             "--e2e-warmup", "0", "-o", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            # a terminal's Ctrl-C reaches a foreground program whose SIGINT is not ignored;
                            # a test run started in the background by a shell (nohup ... &) ignores it and
                            # its children inherit that, so the child starts with the default action
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 3):
            time.sleep(0.2)
        assert path.exists(), "no record before the deadline"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: kept the 3 finished records" in err
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["status"] == "ok" for line in lines)


def test_sampler_grid(tiny_bundle, tmp_path):
    steps = []
    image = charts.sampler_grid(tiny_bundle, samplers=["Euler", "Euler a"], steps=(2, 4, 8), cell=32,
                               progress=lambda label, done, total: steps.append(done))
    assert image.size[1] == 28 + 2 * 32 and image.size[0] >= 3 * 32 + 120
    assert steps[-1] == 6
    pixels = np.asarray(image)
    assert pixels[28:, -32:].std() > 0  # the last column holds an image, not the background


def test_cli_report(tiny_bundle, tmp_path):
    records.RecordWriter(tmp_path / "bench-x.jsonl").write(_record("onnxruntime-cpu", "unet_step", ms=5.0))
    r = run_sdrt("bench", "--report", "--results-dir", tmp_path, "--no-grid")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "REPORT.md").exists() and "REPORT.md" in r.stdout


def test_failing_worker_gives_failed_records(tiny_bundle, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    # without torch-eager, torch-sdpa fp32 is the run's reference and runs first
    chosen = backends.select_backends(backends.backends({"installed": True, "cuda": False}),
                                   ["onnxruntime-cpu", "torch-sdpa-fp32"])
    settings = bench.BenchSettings(measure=("unet_step", "end_to_end"), steps=(2,), repeats=1, warmup=0)
    recs = bench.run_bench([bench.Workload("tiny", tiny_bundle, bad)], chosen, settings,
                           records.RecordWriter(tmp_path / "r.jsonl"))
    assert [(r["backend"], r["measurement"], r["steps"], r["status"]) for r in recs] == [
        ("torch-sdpa", "unet_step", None, "failed"), ("torch-sdpa", "end_to_end", 2, "failed"),
        ("onnxruntime-cpu", "unet_step", None, "ok"), ("onnxruntime-cpu", "end_to_end", 2, "ok")]
    assert all(r["note"] and "\n" not in r["note"] and "Error" in r["note"] for r in recs[:2])
    assert recs[2]["fidelity"] is None  # no reference output to compare with
    row = next(line for line in report.render_markdown(recs).splitlines() if line.startswith("| `torch-sdpa`"))
    assert recs[0]["note"] in row


def test_cli_bench_builds_the_random_workload(tmp_path):
    results = tmp_path / "r.jsonl"
    r = run_sdrt("bench", "--workload", "tiny-random", "--measure", "unet_step", "--backends", "onnxruntime-cpu",
                 "--repeats", 1, "--warmup", 0, "-o", results, env_extra={"SDRT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    (rec,) = records.read_records([results])
    assert rec["workload"]["name"] == "tiny-random" and rec["workload"]["width"] == 64 and rec["status"] == "ok"
    assert len(list((tmp_path / "cache" / "bench").glob("tiny-random-seed0-*.safetensors"))) == 1
    assert len(list((tmp_path / "cache" / "bundles").iterdir())) == 1
