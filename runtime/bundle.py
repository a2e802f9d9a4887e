"""Reading a bundle directory: sdrt's own (``sdrt.json``) or one written by ``optimum-cli export onnx``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime import kernels
from sdrt.runtime.errors import CheckpointError
from sdrt.runtime.precision import PRECISION_KINDS, int8_saturates

log = logging.getLogger(__name__)

MANIFEST = "sdrt.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED = ("text_encoder", "unet", "vae_decoder")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    native: bool  # written by sdrt (token-embedding text encoder, CLIP skip states)

    def component(self, name: str) -> Path:
        """The portable graph of a component: standard ONNX, what every execution provider runs."""
        return self.path / self.manifest["components"][name]["path"]

    def graph(self, name: str, device: str = "cpu", precision: str = "fp32") -> Path:
        """The graph to run ``name`` with on ``device`` at ``precision``.

        The export's optimized graphs for that kind of device come first when the bundle has them
        (``sdrt export`` writes ``model.cpu.onnx``, fused for ONNX Runtime's CPU provider and
        sdrt's kernels, and with ``--precision`` ``model.cpu-int8.onnx`` / ``model.cuda-fp16.onnx``;
        they share or mirror the portable graph's weights): the ``precision`` variant, else the
        fp32 one (components a precision leaves alone, such as the int8 variant's text encoder and
        VAE), else the portable graph. ``SDRT_GRAPHS=portable`` forces the portable graphs."""
        kind = device.split(":")[0]
        variants = self.manifest["components"][name].get("optimized", {})
        if os.environ.get("SDRT_GRAPHS", "auto") == "portable":
            return self.component(name)
        for key in ([f"{kind}-{precision}"] if precision != "fp32" else []) + [kind]:
            entry = variants.get(key)
            if not entry:
                continue
            path = self.path / entry["path"]
            if path.exists() and (not entry.get("custom_ops") or kernels.available()):
                return path
            log.warning("%s: optimized graph %s unusable (%s); running the next one", name, path,
                        "missing" if not path.exists() else "sdrt's kernels library is not built")
        return self.component(name)

    def precisions(self, device: str = "cpu") -> dict[str, dict]:
        """The reduced precisions exported for a device kind: {precision: the export's record,
        with its measured fidelity and whether it may be the default}."""
        kind = device.split(":")[0]
        return dict(self.manifest.get("precisions", {}).get(kind, {}))

    def default_precision(self, device: str = "cpu") -> str:
        """What ``--precision auto`` runs on ``device``: an exported reduced precision whose
        measured final-image PSNR against fp32 met the bar (``default`` in its record), else fp32;
        the fastest such one when several did (int8-static, then int8)."""
        passed = {p for p, r in self.precisions(device).items() if r.get("default") and self._holds_here(p, r)}
        return next((p for p in ("int8-static", "int8", "fp16") if p in passed), "fp32")

    @staticmethod
    def _holds_here(precision: str, record: dict) -> bool:
        """Whether an export's measurement of ``precision`` holds on this machine: int8 measured
        where int8 products are exact does not where they saturate (x86 without VNNI)."""
        if PRECISION_KINDS.get(precision) != "cpu" or not int8_saturates():
            return True
        if not (record.get("fidelity") or {}).get("int8_saturates", True):
            log.info("%s: measured on a CPU with VNNI; this one saturates int8 products, so auto runs fp32", precision)
            return False
        return True

    def has(self, name: str) -> bool:
        return name in self.manifest["components"] and self.component(name).exists()

    @property
    def name(self) -> str:
        return self.manifest.get("source", {}).get("name") or self.path.name

    @property
    def model_hash(self) -> str | None:
        return self.manifest.get("source", {}).get("hash")

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def prediction_type(self) -> str:
        return self.manifest["prediction_type"]

    @property
    def latent_channels(self) -> int:
        return self.manifest["latent_channels"]

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest["vae_scale_factor"]

    @property
    def latent_scale_factor(self) -> float:
        return self.manifest["latent_scale_factor"]

    @property
    def default_size(self) -> tuple[int, int]:
        w, h = self.manifest["default_size"]
        return int(w), int(h)

    @property
    def scheduler(self) -> dict:
        return self.manifest["scheduler"]

    @property
    def text_encoder(self) -> dict:
        return self.manifest["text_encoder"]


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle directory; one-line CheckpointError when it is not a readable bundle."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"not a bundle directory: {path}")
    native = (path / MANIFEST).exists()
    manifest = _read_manifest(path) if native else _infer_manifest(path)
    missing = [f"{n}/model.onnx" for n in REQUIRED
               if not (path / manifest["components"].get(n, {}).get("path", f"{n}/model.onnx")).exists()]
    if missing:
        raise CheckpointError(f"bundle {path} is incomplete: missing {', '.join(missing)}")
    return Bundle(path, manifest, native)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {p}: {e}") from None


def _read_manifest(path: Path) -> dict:
    m = _read_json(path / MANIFEST)
    version = m.get("format_version")
    if m.get("format") != "sdrt-bundle" or not isinstance(version, int):
        raise CheckpointError(f"{path / MANIFEST} is not an sdrt bundle manifest")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"bundle {path} has format version {version}; this sdrt reads up to {FORMAT_VERSION}"
                              " (upgrade sdrt or re-export)")
    return m


def _infer_manifest(path: Path) -> dict:
    """The manifest of an optimum / diffusers ONNX bundle, read off its component configs."""
    if not (path / "model_index.json").exists() and not (path / "unet" / "model.onnx").exists():
        raise CheckpointError(f"not a bundle: {path} has neither {MANIFEST} nor model_index.json")
    sched_path = path / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.exists() else {}
    vae = _read_json(path / "vae_decoder" / "config.json") if (path / "vae_decoder" / "config.json").exists() else {}
    unet = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").exists() else {}
    text = _read_json(path / "text_encoder" / "config.json") if (path / "text_encoder" / "config.json").exists() else {}
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    sample_size = unet.get("sample_size", 64)
    cross = unet.get("cross_attention_dim", 768)
    return {
        "format": "optimum",
        "architecture": {768: "sd1", 1024: "sd2"}.get(cross, "unknown"),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "latent_channels": vae.get("latent_channels", 4),
        "vae_scale_factor": vae_scale,
        "latent_scale_factor": vae.get("scaling_factor", 0.18215),
        "default_size": [sample_size * vae_scale] * 2,
        "scheduler": {
            "num_train_timesteps": sched.get("num_train_timesteps", 1000),
            "beta_start": sched.get("beta_start", 0.00085),
            "beta_end": sched.get("beta_end", 0.012),
            "beta_schedule": sched.get("beta_schedule", "scaled_linear"),
        },
        "text_encoder": {
            "hidden_size": text.get("hidden_size", cross),
            "num_layers": text.get("num_hidden_layers"),
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        "components": {n: {"path": f"{n}/model.onnx"} for n in COMPONENTS},
        "source": {"name": path.name, "hash": None},
    }
