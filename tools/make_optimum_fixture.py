#!/usr/bin/env python3
"""Regenerate ``tests/data/optimum_tiny/``: a tiny SD 1.x model exported by the real ``optimum-cli``.

The fixture lets CI check, without optimum installed, that bundles written by
``optimum-cli export onnx --task text-to-image`` load and generate in sdrt
(tests/test_optimum_bundle.py). It holds:

* ``diffusers/`` -- the source pipeline folder: random weights (seed 0) at toy widths, SD 1.5's block
  layout, the full 49408-token CLIP vocabulary. The tokenizer files are left out (sdrt's export does
  not read them and the bundle carries a copy).
* ``onnx/``      -- what ``optimum-cli export onnx --model diffusers/ --task text-to-image onnx/``
  wrote, untouched.
* ``PROVENANCE.json`` -- package versions and the exact command.

Run it in a SEPARATE virtualenv (never the project's), offline; this is how the stored fixture was
made (CPU, Python 3.11)::

    python3 -m venv /tmp/venv-optimum
    . /tmp/venv-optimum/bin/activate
    pip install torch==2.13.0                       # the CPU build
    pip install "optimum-onnx[onnxruntime]==0.1.0" diffusers -c <(echo torch==2.13.0)
    # resolved: optimum 2.1.0, optimum-onnx 0.1.0, diffusers 0.39.0, transformers 4.57.6, onnx 1.23.2
    python tools/make_optimum_fixture.py            # HF_HUB_OFFLINE=1 is set for optimum-cli

With those versions a rerun rewrites the stored files byte for byte (checked). The weights come from
``sdrt.export.tiny.random_modules`` (torch's seeded initialisation), so another torch / diffusers /
transformers version, or a change there, may give other numbers; the test compares the stored
optimum bundle against an sdrt export of the stored ``diffusers/`` weights, so it holds for any
regenerated pair (only its check of the graphs' I/O names optimum 2.x's float scalar timestep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "optimum_tiny"

# Toy widths: the token-embedding table (49408 x 8 floats, 1.6 MB) dominates the size.
TINY = dict(unet_channels=(16, 32), unet_layers=1, attention_heads=2, context_dim=8,
            vae_channels=(8, 8, 8, 8), vae_layers=1, groups=4, text_layers=1, text_heads=2,
            text_intermediate=16, sample_size=8)


def import_sdrt():
    """Make ``sdrt`` importable from this checkout (export/ and runtime/ are its subpackages)."""
    try:
        import sdrt.export.tiny  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="sdrt-src-"))
    (root / "sdrt").mkdir()
    for sub in ("export", "runtime"):
        (root / "sdrt" / sub).symlink_to(REPO / sub)
    sys.path.insert(0, str(root))


def build_diffusers_folder(dst: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdrt.export.tiny import random_modules, scaled_sd1_configs
    from sdrt.runtime.text.tokenizer import ClipTokenizer

    configs = scaled_sd1_configs(**TINY)
    unet, vae, text_encoder = random_modules(configs, seed=0)
    tok_dir = dst.parent / "tokenizer-src"
    ClipTokenizer.default().write_files(tok_dir)
    scheduler = PNDMScheduler.from_config({k: v for k, v in configs["scheduler"].items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(dst, safe_serialization=True)
    shutil.rmtree(tok_dir)


def versions() -> dict:
    names = ("optimum", "optimum-onnx", "torch", "diffusers", "transformers", "onnx", "onnxruntime")
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    out["python"] = sys.version.split()[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--optimum-cli", default=shutil.which("optimum-cli") or "optimum-cli")
    args = ap.parse_args()
    import_sdrt()
    with tempfile.TemporaryDirectory(prefix="optimum-fixture-") as tmp:
        tmp = Path(tmp)
        src, onnx_dir = tmp / "diffusers", tmp / "onnx"
        build_diffusers_folder(src)
        # Relative paths, so the configs' ``_name_or_path`` holds no temporary folder name
        cmd = [args.optimum_cli, "export", "onnx", "--model", "diffusers", "--task", "text-to-image", "onnx"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        subprocess.run(cmd, check=True, env=env, cwd=tmp)
        shutil.rmtree(src / "tokenizer")  # not read by sdrt's export; onnx/tokenizer keeps a copy
        index = json.loads((src / "model_index.json").read_text())
        index.pop("tokenizer", None)
        (src / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        shutil.copytree(src, args.out / "diffusers")
        shutil.copytree(onnx_dir, args.out / "onnx")
        provenance = {
            "command": "optimum-cli export onnx --model diffusers --task text-to-image onnx",
            "env": {"HF_HUB_OFFLINE": "1"},
            "versions": versions(),
            "tiny_configs": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
            "seed": 0,
            "generator": "tools/make_optimum_fixture.py",
        }
        (args.out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
