"""The coverage-guided fuzz targets of tools/fuzz_parsers.py, each run for a bounded time.

A target fails on any exception other than the documented one-line ``SdrtError`` (atheris then
exits non-zero and writes the input as ``crash-*``); crashes found so far are cases of the
hostile corpus (tools/make_hostile_corpus.py, group "fuzz"). SDRT_FUZZ_SECONDS sets the time per
target (15 by default: a minute in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="fuzzing needs atheris (the dev extra)")

from tools import fuzz_parsers

REPO = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("SDRT_FUZZ_SECONDS", "15"))


@pytest.mark.parametrize("target", sorted(fuzz_parsers.TARGETS))
def test_fuzz_target(target, tmp_path):
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for i, data in enumerate(fuzz_parsers.seeds(target)):
        (seeds / f"seed-{i}").write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "tools.fuzz_parsers", target, f"-max_total_time={SECONDS}",
                        "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(seeds)],
                       cwd=REPO, capture_output=True, text=True, timeout=SECONDS + 120,
                       env={**os.environ, "SDRT_FUZZ_TMP": str(tmp_path)})
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert r.returncode == 0 and not crashes, f"{crashes}\n{r.stderr[-4000:]}"
    assert "DONE" in r.stderr, r.stderr[-2000:]
