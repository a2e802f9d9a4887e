"""Shared fixtures: a tiny SD 1.x-architecture model, written as an A1111-layout checkpoint and exported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the tests build models with the export extra (torch)")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_configs():
    from sdrt.export.tiny import scaled_sd1_configs

    return scaled_sd1_configs()


@pytest.fixture(scope="session")
def tiny_modules(tiny_configs):
    from sdrt.export.tiny import random_modules

    return random_modules(tiny_configs, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_configs, tiny_modules) -> Path:
    """The tiny model as a single-file checkpoint in the original LDM / A1111 key layout."""
    from sdrt.export import convert
    from sdrt.export.write import save_checkpoint

    unet, vae, text_encoder = tiny_modules
    ldm = convert.diffusers_to_ldm(
        {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()},
        tiny_configs)
    return save_checkpoint(ldm, tiny_configs, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    from sdrt.export.write import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def sdxl_bundle(tmp_path_factory):
    """A tiny SDXL model's configs and its bundle (seeded random weights: ``random_modules(configs, seed=3)``)."""
    from sdrt.export.tiny import random_bundle, scaled_sdxl_configs

    configs = scaled_sdxl_configs()
    return configs, random_bundle(configs, tmp_path_factory.mktemp("sdxl") / "b", seed=3)


@pytest.fixture(scope="session")
def sd2v_bundle(tmp_path_factory):
    """A tiny SD 2.x v-prediction model's configs and its bundle (``random_modules(configs, seed=3)``)."""
    from sdrt.export.tiny import random_bundle, scaled_sd2_configs

    configs = scaled_sd2_configs(v_prediction=True)
    return configs, random_bundle(configs, tmp_path_factory.mktemp("sd2v") / "b", seed=3)


@pytest.fixture(scope="session")
def precise_bundle(tmp_path_factory, tiny_checkpoint) -> tuple[Path, str]:
    """The tiny model exported by the CLI with every reduced precision: int8, fp16, int8-static and
    ``mixed`` (chosen from the int8 ones' measurements); (bundle, stdout). Tests that write into the
    bundle remove what they wrote, or copy it first."""
    out = tmp_path_factory.mktemp("precision") / "tiny-reduced"
    r = run_sdrt("export", tiny_checkpoint, out, "--precision", "int8", "--precision", "fp16",
                 "--precision", "int8-static", "--precision", "mixed")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_bundle):
    from sdrt.runtime.pipeline.txt2img import Pipeline

    return Pipeline(tiny_bundle)


@pytest.fixture(scope="session")
def no_torch_dir(tmp_path_factory) -> Path:
    """A PYTHONPATH entry whose ``torch`` package fails to import."""
    d = tmp_path_factory.mktemp("no_torch")
    (d / "torch").mkdir()
    (d / "torch" / "__init__.py").write_text('raise ImportError("torch is blocked in this test")\n')
    return d


def run_sdrt(*args, env_extra: dict | None = None, pythonpath_first: Path | None = None, cwd=None,
             timeout=600) -> subprocess.CompletedProcess:
    """``sdrt ARGS`` in a subprocess (``python -m sdrt.cli``), output captured."""
    env = dict(os.environ)
    env.update(env_extra or {})
    if pythonpath_first is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath_first), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


# -- the PyTorch reference of the tiny model (img2img, inpainting, hires fix) --

@pytest.fixture(scope="module")
def ref(tiny_checkpoint, tiny_bundle):
    """The tiny model's PyTorch reference (diffusers modules; ``sdrt verify``'s)."""
    import torch
    from sdrt.export.reference import TorchReference

    torch.set_grad_enabled(False)
    return TorchReference(tiny_checkpoint, tiny_bundle / "tokenizer")


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling module (the samplers' reference)."""
    from test_samplers import load_k_diffusion_sampling

    return load_k_diffusion_sampling()
