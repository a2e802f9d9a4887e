"""External VAE files (``--vae``, the webui's ``models/VAE`` and ``model.vae.pt`` beside a checkpoint),
put into the bundle's VAE graphs by replacing their weights, without re-export.

A VAE file holds the LDM ``first_stage_model`` weights (``decoder.conv_in.weight``, ...), with
or without that prefix, as a ``.safetensors`` or a torch pickle (``.pt`` / ``.ckpt``, read by the
safe unpickler; a ``state_dict`` entry is unwrapped). Keys map to the graphs' source weights by
the LDM names the bundle's provenance records; a file in the diffusers layout is read as well.
Each graph gets every weight it holds from the file: a VAE file missing one of them is an error
naming the key (the webui loads VAE files strictly too).

The webui's rules (``modules/sd_vae.py``): ``--vae PATH`` wins; else "Automatic" takes the first
VAE whose file name starts with the checkpoint's (``nai.ckpt`` -> ``nai.vae.pt``) among the
``*.vae.pt`` / ``*.vae.ckpt`` / ``*.vae.safetensors`` beside the checkpoint and the files of the
VAE folder. The infotext names it: ``VAE hash`` (10 hex digits of the file's sha256) and ``VAE``
(the file name), after ``Model``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks import files, provenance
from sdrt.runtime.networks.apply import Overrides, build_overrides, check_session
from sdrt.runtime.networks.onnx_weights import GraphWeights

log = logging.getLogger(__name__)

DEFAULT_VAE_DIR = Path("models/VAE")
NEAR_CHECKPOINT = (".vae.pt", ".vae.ckpt", ".vae.safetensors")
_LDM_PREFIX = "first_stage_model."
_IGNORED = ("loss", "model_ema.")  # the webui's _load_vae_dict drops loss.* and the EMA counters
_SHOWN = 3


def vae_files(folders) -> list[Path]:
    """The VAE files of some folders (subfolders included), sorted by path."""
    out = []
    for folder in folders or ():
        folder = Path(folder)
        if folder.is_dir():
            out += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in files.EXTENSIONS)
    return out


def find_vae(checkpoint: str | Path | None, model_name: str | None, vae_dirs=None) -> Path | None:
    """The webui's "Automatic" VAE: the first candidate whose file name starts with the checkpoint's
    stem, candidates being the ``*.vae.*`` files beside the checkpoint, then the VAE folders'."""
    stem = Path(checkpoint).name.rsplit(".", 1)[0] if checkpoint is not None else model_name
    if not stem:
        return None
    candidates = []
    if checkpoint is not None:
        folder = Path(checkpoint).parent
        candidates += sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NEAR_CHECKPOINT))
    candidates += vae_files([DEFAULT_VAE_DIR] if vae_dirs is None else vae_dirs)
    return next((p for p in candidates if p.name.startswith(stem)), None)


def resolve_vae(vae: str | Path | None, vae_dirs=None) -> Path:
    """``--vae``'s value as a file: a path, or a file name / stem in the VAE folders."""
    path = Path(vae)
    if path.is_file():
        return path
    for p in vae_files([DEFAULT_VAE_DIR] if vae_dirs is None else vae_dirs):
        if p.name == str(vae) or p.stem == str(vae):
            return p
    where = ", ".join(str(d) for d in ([DEFAULT_VAE_DIR] if vae_dirs is None else vae_dirs))
    raise SdrtError(f"VAE not found: {vae} (a file, or a file name in {where}; --vae-dir sets the folder)")


def choose_vae(option: str | Path | None, model: str | Path | None, model_name: str | None, vae_dirs=None) -> Path | None:
    """The VAE file for ``--vae OPTION`` (the webui's ``sd_vae`` setting): ``auto`` (or None) the
    "Automatic" rule for the model (a checkpoint file: beside it and in the VAE folders; a bundle:
    by its source's name in the VAE folders), ``none`` the model's own, else a file."""
    if option is None or str(option).lower() in ("auto", "automatic"):
        checkpoint = Path(model) if model is not None and Path(model).is_file() else None
        return find_vae(checkpoint, model_name, vae_dirs)
    if str(option).lower() == "none":
        return None
    return resolve_vae(option, vae_dirs)


class ExternalVae:
    """One VAE file, put into the VAE graphs of a bundle (``apply(component, session)``)."""

    def __init__(self, bundle, path: str | Path):
        self.bundle, self.path = bundle, Path(path)
        self._values: dict[str, dict[str, np.ndarray]] = {}
        self._overrides: dict[str, Overrides] = {}
        self._tensors = None
        self.sha256 = files.sha256(self.path)

    def infotext(self) -> dict:
        return {"VAE hash": self.sha256[:10], "VAE": self.path.name}

    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            raw = files.read_tensors(self.path)
            self._tensors = {(k.removeprefix(_LDM_PREFIX)): v for k, v in raw.items()
                             if not k.startswith(_IGNORED)}
        return self._tensors

    def values(self, component: str) -> dict[str, np.ndarray]:
        """The file's weights for a VAE graph, by source key, in the source shapes."""
        if component not in self._values:
            prov = provenance.load(self.bundle.path / component)
            tensors = self.tensors()
            out, missing = {}, []
            for key, (shape, ldm) in prov.sources.items():
                name = ldm[len(_LDM_PREFIX):] if ldm and ldm.startswith(_LDM_PREFIX) else ldm
                value = tensors.get(name) if name in tensors else tensors.get(key)
                if value is None:
                    missing.append(name or key)
                    continue
                if value.size != int(np.prod(shape)):
                    raise SdrtError(f"{self.path}: {name or key} has shape {list(value.shape)}, expected {list(shape)}")
                out[key] = np.asarray(value, np.float32).reshape(shape)
            if missing:
                raise SdrtError(f"{self.path}: not a VAE for this model: {len(missing)} weights missing, such as "
                                f"{', '.join(missing[:_SHOWN])}")
            self._values[component] = out
        return self._values[component]

    def apply(self, component: str, session) -> None:
        """Make ``session`` (a VAE graph's) with this file's weights."""
        check_session(session, component, "external VAE files")
        graph = Path(session.path)
        key = str(graph)
        if key not in self._overrides:
            prov = provenance.load(self.bundle.path / component)
            self._overrides[key] = build_overrides(prov, prov.graph(graph), GraphWeights(graph),
                                                   self.values(component))
        session.set_overrides(self._overrides[key])


def with_vae_fields(fields: dict, vae: ExternalVae | None) -> dict:
    """The infotext fields with ``VAE hash`` and ``VAE`` after ``Model``, as the webui orders them."""
    if vae is None:
        return fields
    out = {}
    for k, v in fields.items():
        out[k] = v
        if k == "Model":
            out.update(vae.infotext())
    if "VAE" not in out:
        out.update(vae.infotext())
    return out
