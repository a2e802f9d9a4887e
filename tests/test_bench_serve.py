"""``python -m benchmarks.bench_serve`` with tiny settings: a live server on 127.0.0.1, every answer
checked, one record with the overhead and the load figures."""

from __future__ import annotations

import pytest
from sdrt.benchmarks import bench_serve
from sdrt.benchmarks.records import read_records

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_bench_serve_writes_one_checked_record(tmp_path, capsys):
    results = tmp_path / "serve.jsonl"
    assert bench_serve.main(["--clients", "2", "--requests", "2", "--sequential", "2", "--warmup", "1",
                             "--steps", "1", "--results", str(results)]) == 0
    [rec] = read_records([results])
    assert rec["measurement"] == "serve" and rec["status"] == "ok" and rec["steps"] == 1
    assert rec["device"]["kind"] == "cpu" and rec["workload"]["width"] == 64
    assert rec["direct"]["repeats"] == rec["server"]["repeats"] == 2
    assert rec["direct_ms"] > 0 and rec["server_ms"] > 0
    assert rec["overhead_ms"] == pytest.approx(rec["server_ms"] - rec["direct_ms"])
    assert rec["ratio"] == pytest.approx(rec["server_ms"] / rec["direct_ms"])
    load = rec["load"]
    assert load["ok"] + load["rejected_503"] == 4 and load["errors"] == 0 and load["ok"] >= 1
    assert load["p50_ms"] <= load["p95_ms"] <= load["max_ms"] and load["throughput_rps"] > 0
    assert rec["server_rss_mb"]["before"] > 0 and rec["server_rss_mb"]["after"] > 0
    out = capsys.readouterr().out
    assert "overhead per request" in out and "throughput" in out
