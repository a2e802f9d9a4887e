"""Hostile and careless input (issue #21): every case of tools/make_hostile_corpus.py is refused.

For each case: a non-zero exit, exactly one line on stderr (no progress bar before it) naming the
problem, no traceback, nothing in the output folder, no bundle in the cache (SDRT_CACHE is the
case's own folder), the canary untouched. The corpus runs in one subprocess that forks a child per
case (tools/make_hostile_corpus.py --run); a few cases also run as plain ``python -m sdrt.cli``.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_sdrt

from tools import make_hostile_corpus as corpus

REPO = Path(__file__).resolve().parents[1]
CASES = corpus.cases()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_checkpoint, tiny_bundle):
    root = tmp_path_factory.mktemp("hostile")
    records = {r["name"]: r for r in corpus.write_corpus(root, tiny_checkpoint, tiny_bundle)}
    r = subprocess.run([sys.executable, "-m", "tools.make_hostile_corpus", "--run", str(root)], cwd=REPO,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return records, json.loads((root / "results.json").read_text())


def _check(record: dict, rc: int, stderr: str) -> None:
    lines = stderr.splitlines()
    assert rc != 0, f"exit status 0; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {stderr[-2000:]!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert record["expect"].lower() in lines[0].lower(), lines[0]
    d = Path(record["dir"])
    assert not any((d / "outputs").rglob("*")), list((d / "outputs").rglob("*"))
    assert not (d / "out").exists() or not any((d / "out").iterdir())
    # the cache may hold the checkpoint hash memo, never a bundle or a partial one
    cached = [p for p in (d / "cache").rglob("*") if p.is_file() and p.name != "hashes.json"]
    assert not cached, cached
    assert Path(record["canary"]).read_text() == corpus.CANARY_TEXT


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_case_is_one_line(hostile, name):
    records, results = hostile
    _check(records[name], results[name]["rc"], results[name]["stderr"])


@pytest.mark.parametrize("name", ["pickle-exec.ckpt-zip", "configs-negative-width", "width-0"])
def test_case_as_a_plain_subprocess(hostile, name):
    """The forked runner shows what ``python -m sdrt.cli`` shows."""
    records, results = hostile
    record = records[name]
    r = run_sdrt(*record["args"], env_extra={"SDRT_CACHE": str(Path(record["dir"]) / "cache2")})
    _check(record, r.returncode, r.stderr)
    assert r.stderr == results[name]["stderr"]


def test_payloads_are_armed(tmp_path):
    """Each payload, unpickled by an unrestricted unpickler, changes its canary: the refusals are real."""
    for name, (fn, args) in corpus._payloads(tmp_path / "canary.txt").items():
        canary = tmp_path / "canary.txt"
        canary.write_text(corpus.CANARY_TEXT)
        data = pickle.dumps(corpus._Evil(fn, args), protocol=2)
        if name == "os-remove":
            pickle.loads(data)
            assert not canary.exists()
        else:
            pickle.loads(data)
            assert canary.read_text() != corpus.CANARY_TEXT, name


# --- seeds: the webui's rule ---------------------------------------------------------------------

def _image(pipe, seed, rng="cpu"):
    [result] = pipe(prompt="a cat", steps=2, seed=seed, rng=rng)
    return np.asarray(result.image), result.infotext


def test_seeds_above_32_bits_follow_torch(tiny_pipeline):
    """torch's manual_seed takes 64-bit seeds and seeds mt19937 from the low 32 bits, so the webui's
    seed 2**40 draws seed 0's noise; its infotext keeps the seed given."""
    base, _ = _image(tiny_pipeline, 0)
    image, text = _image(tiny_pipeline, 2**40)
    assert np.array_equal(image, base)
    assert "Seed: 1099511627776," in text


def test_negative_seeds_are_used_as_given(tiny_pipeline):
    """Only -1 is random (the webui's get_fixed_seed); -5 is torch's seed 2**64 - 5."""
    wrapped, _ = _image(tiny_pipeline, 2**64 - 5)
    low, _ = _image(tiny_pipeline, (2**64 - 5) % 2**32)
    image, text = _image(tiny_pipeline, -5)
    assert np.array_equal(image, wrapped) and np.array_equal(image, low)
    assert "Seed: -5," in text
    nv_wrapped, _ = _image(tiny_pipeline, 2**64 - 5, "nv")
    nv, _ = _image(tiny_pipeline, -5, "nv")
    assert np.array_equal(nv, nv_wrapped) and not np.array_equal(nv, image)


def test_plan_seeds(tiny_bundle):
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.pipeline import GenerationParams, make_plan

    b = open_bundle(tiny_bundle)
    plan = make_plan(b, GenerationParams("x", seed=-3, batch_size=2, n_iter=2))
    assert [s for batch in plan.batches for s in batch.seeds] == [-3, -2, -1, 0]  # -1 here is a seed
    assert 0 <= make_plan(b, GenerationParams("x")).seed < 2**32 - 2
    assert make_plan(b, GenerationParams("x", width=None)).width == b.default_size[0]


def test_memory_estimate(tiny_bundle):
    from sdrt.runtime.bundle import open_bundle
    from sdrt.runtime.pipeline.plan import available_memory, memory_needed

    b = open_bundle(tiny_bundle)
    assert available_memory() > 0
    # 512x512: 64x64 latents, one 4096 x 4096 float32 score matrix plus the decoded image
    assert memory_needed(b, 512, 512, 1) == 4 * 4096**2 + 3 * 512 * 512 * 5
    # VAE tiles bound the scores by the tile
    assert memory_needed(b, 4096, 4096, 1, vae_tile=32) == 4 * 1024**2 + 3 * 4096 * 4096 * 5


def test_explicit_zero_size_is_refused_in_the_api(tiny_pipeline):
    """None is the model's size; 0 is an error, as in the CLI (the corpus's width-0 case)."""
    from sdrt.runtime.errors import SdrtError

    with pytest.raises(SdrtError, match="width must be a positive multiple of 8, got 0"):
        tiny_pipeline(prompt="a cat", steps=1, width=0)
    [image] = tiny_pipeline(prompt="a cat", steps=1, width=None, seed=1)
    assert image.image.size == tiny_pipeline.bundle.default_size
