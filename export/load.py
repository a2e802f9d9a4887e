"""Reading model weights from disk: single-file checkpoints and diffusers folders.

* :func:`load_state_dict` reads ``.safetensors`` files and PyTorch pickles
  (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``).  Pickles are only ever opened with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
  containers, so a malicious checkpoint cannot run code; the refusal becomes a
  :class:`CheckpointError` naming the offending global.
* :func:`detect_architecture` tells SD 1.x from SD 2.x, SDXL and friends by key
  names and shapes, so that unsupported files get a clear message.
* :func:`load_diffusers_folder` reads a diffusers pipeline folder (``unet/``,
  ``vae/``, ``text_encoder/``, ``scheduler/``).

Every error a user can trigger is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from sdrt.export.configs import architecture_of, check_configs, sd1_configs
from sdrt.runtime.errors import CheckpointError

__all__ = [
    "ARCHITECTURE_NAMES",
    "detect_architecture",
    "load_diffusers_folder",
    "load_state_dict",
    "sd1_configs",
]

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

#: Human-readable names of what :func:`detect_architecture` returns.
ARCHITECTURE_NAMES = {
    "sd1": "SD 1.x",
    "sd1-inpaint": "SD 1.x inpainting",
    "sd1-pix2pix": "SD 1.x InstructPix2Pix",
    "sd2": "SD 2.x",
    "sd2-inpaint": "SD 2.x inpainting",
    "sd2-pix2pix": "SD 2.x InstructPix2Pix",
    "sdxl": "SDXL",
    "sdxl-inpaint": "SDXL inpainting",
    "sdxl-refiner": "SDXL refiner",
    "sd3": "SD 3",
    "flux": "Flux",
    "cascade": "Stable Cascade",
    "lora": "LoRA",
    "vae": "standalone VAE",
    "diffusers": "diffusers-layout",
    "unknown": "unrecognised",
}


def _one_line(text: object, limit: int = 200) -> str:
    """Collapse an exception message to one short line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# single files
# ---------------------------------------------------------------------------


def _sniff_format(path: Path) -> str:
    """``"safetensors"``, ``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save) or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000:
            return "safetensors"
    if len(head) >= 4 and head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":  # pickle PROTO opcode
        return "pickle"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _PICKLE_SUFFIXES and len(head) > 0:
        return "pickle"
    return "unknown"


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"cannot read {path.name}: truncated or corrupt safetensors file ({_one_line(exc)})"
        ) from None


def _refused_globals(path: Path, message: str) -> list[str]:
    """The globals ``torch.load(weights_only=True)`` refused, from its message or a static scan."""
    names = re.findall(r"GLOBAL ([\w.]+)", message)
    if not names:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = []
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen


def _unpickler_detail(message: str) -> str:
    """The weights-only unpickler's own sentence, without torch's advice to disable it."""
    body = message.split("Check the documentation")[0]
    chunks = [c for c in re.split(r"\n\s*\n", body) if c.strip()]
    detail = chunks[-1] if chunks else body
    return _one_line(detail.split("WeightsUnpickler error:")[-1])


def _load_pickle(path: Path, is_zip: bool) -> object:
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the restricted unpickler still decides what is allowed
            warnings.simplefilter("ignore", UserWarning)
            # mmap avoids a second in-memory copy of multi-GB checkpoints; it needs the zip format.
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        refused = _refused_globals(path, message)
        if refused:
            what = f"it references {', '.join(refused[:3])}"
        else:
            what = f"it is not a plain tensor pickle ({_unpickler_detail(message)})"
        raise CheckpointError(
            f"refusing to unpickle {path.name}: {what} (only tensors and plain containers are allowed)"
        ) from None
    except Exception as exc:  # RuntimeError from the zip reader, EOFError, ...
        raise CheckpointError(
            f"cannot read {path.name}: truncated or corrupt PyTorch checkpoint ({_one_line(exc)})"
        ) from None


def _unwrap_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """Descend through ``{"state_dict": ...}`` nesting and keep the tensors."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in {name}")
    return tensors


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a single checkpoint file, safely.

    ``.safetensors`` files are read with safetensors.  PyTorch pickles (``.ckpt``,
    ``.pt``, ``.pth``, ``.bin``; the format is sniffed from the content, not trusted
    from the suffix) are read only with ``torch.load(weights_only=True)``: a pickle
    referencing any code (``os.system``, a Lightning callback class, ...) is refused
    without being executed.  The usual ``{"state_dict": {...}}`` nesting of
    Lightning ``.ckpt`` files is unwrapped; non-tensor entries are dropped.

    Returns ``{key: tensor}`` on the CPU, dtypes untouched.
    Raises :class:`CheckpointError` (one line) for missing, unreadable, truncated
    or refused files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (use a diffusers folder loader)")
    try:
        fmt = _sniff_format(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)}") from None
    if fmt == "safetensors":
        loaded: object = _load_safetensors(path)
    elif fmt in ("zip", "pickle"):
        loaded = _load_pickle(path, is_zip=fmt == "zip")
    elif path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path.name}: the file is empty")
    else:
        raise CheckpointError(f"cannot read {path.name}: not a safetensors file or PyTorch checkpoint")
    return _unwrap_state_dict(loaded, path.name)


# ---------------------------------------------------------------------------
# architecture detection
# ---------------------------------------------------------------------------

_UNET = "model.diffusion_model."


def _in_channels_suffix(state_dict: dict) -> str:
    """``"-inpaint"`` / ``"-pix2pix"`` from the UNet's input width, else ``""``."""
    conv_in = state_dict.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        return ""
    return {9: "-inpaint", 8: "-pix2pix"}.get(int(conv_in.shape[1]), "")


def _cross_attention_width(state_dict: dict) -> int | None:
    for key, value in state_dict.items():
        if key.startswith(_UNET) and key.endswith("attn2.to_k.weight") and value.ndim == 2:
            return int(value.shape[1])
    return None


def detect_architecture(state_dict: dict) -> str:
    """Name the model family of a single-file checkpoint from its key names and shapes.

    Returns one of the keys of :data:`ARCHITECTURE_NAMES`:

    * ``"sd1"`` -- LDM layout with the CLIP ViT-L text encoder under
      ``cond_stage_model.transformer.*`` (or, without text encoder keys, 768-wide
      cross attention); ``"sd1-inpaint"`` / ``"sd1-pix2pix"`` for 9 / 8 input channels;
    * ``"sd2"`` (``cond_stage_model.model.*``, OpenCLIP; or 1024-wide cross attention)
      and its ``-inpaint`` / ``-pix2pix`` variants;
    * ``"sdxl"`` / ``"sdxl-refiner"`` (``conditioner.embedders.*``), ``"sd3"``, ``"flux"``,
      ``"cascade"`` (Stable Cascade's stages C and B);
    * ``"lora"``, ``"vae"`` (a standalone LDM VAE), ``"diffusers"`` (weights already
      in the diffusers module layout) and ``"unknown"``.

    Only detects; whether the result is supported is decided by the converter.
    """
    keys = list(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "lora"
    if has(_UNET + "joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has(_UNET + "double_blocks.") or has("double_blocks."):
        return "flux"
    # Stable Cascade's stage C (clf, the CLIP mappers) and stage B (effnet_mapper), bare or under model.
    bare = (k.removeprefix("model.") for k in keys)
    if any(k.startswith(("clf.1.", "clip_txt_mapper.", "effnet_mapper.")) for k in bare):
        return "cascade"
    suffix = _in_channels_suffix(state_dict)
    if has("conditioner.embedders."):
        if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
            return "sdxl-refiner"
        return "sdxl" + ("-inpaint" if suffix == "-inpaint" else "")
    if has("cond_stage_model.model."):
        return "sd2" + suffix
    if has("cond_stage_model.transformer."):
        return "sd1" + suffix
    if has(_UNET):
        width = _cross_attention_width(state_dict)
        if width == 1024:
            return "sd2" + suffix
        if width == 2048 or has(_UNET + "label_emb."):
            return "sdxl"
        return "sd1" + suffix
    if has("first_stage_model."):
        return "sd1"
    if has("encoder.down.") and has("decoder.up."):
        return "vae"
    if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys):
        return "diffusers"
    return "unknown"


# ---------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------

_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def _weight_candidates(component: str) -> list[str]:
    st_stem, bin_stem = _WEIGHT_FILES[component]
    names = []
    for variant in ("", ".fp16"):
        names += [
            f"{st_stem}{variant}.safetensors",
            f"{bin_stem}{variant}.bin",
            f"{st_stem}{variant}.safetensors.index.json",
            f"{bin_stem}{variant}.bin.index.json",
        ]
    return [f"{component}/{n}" for n in names]


def _load_weights(folder: Path, relative: str) -> dict[str, torch.Tensor]:
    path = folder / relative
    if not relative.endswith(".index.json"):
        return load_state_dict(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except Exception as exc:
        raise CheckpointError(f"cannot read {relative}: {_one_line(exc)}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_state_dict(path.parent / shard))
    return state


def _read_config(folder: Path, relative: str) -> dict:
    try:
        config = json.loads((folder / relative).read_text(encoding="utf-8"))
    except Exception as exc:
        raise CheckpointError(f"cannot read {relative} in {folder}: {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read {relative} in {folder}: not a JSON object")
    return config


def _model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except Exception:
        return {}
    return index if isinstance(index, dict) else {}


def _folder_text_encoders(folder: Path) -> tuple[str, ...]:
    """The text encoder folders a diffusers folder has or its ``model_index.json`` names: SDXL
    both, the refiner only ``text_encoder_2`` (its index names ``text_encoder`` as null)."""
    index = _model_index(folder)

    def named(name: str) -> bool | None:
        entry = index.get(name)
        return None if name not in index else isinstance(entry, list) and entry[:1] != [None]

    second = (folder / "text_encoder_2").exists() or bool(named("text_encoder_2"))
    first = (folder / "text_encoder").exists() or named("text_encoder") is not False
    if not second:
        first = True
    return tuple(n for n, present in (("text_encoder", first), ("text_encoder_2", second)) if present)


def _folder_architecture(configs: dict) -> str:
    suffix = {9: "-inpaint", 8: "-pix2pix"}.get(configs["unet"].get("in_channels", 4), "")
    arch = architecture_of(configs)
    if arch == "sd1" and configs["unet"].get("cross_attention_dim") == 1024:
        arch = "sd2"
    if arch == "sdxl":
        return arch + ("-inpaint" if suffix == "-inpaint" else "")
    return arch + suffix if arch in ("sd1", "sd2") else arch


def load_diffusers_folder(path: str | Path) -> tuple[dict, dict]:
    """Read a diffusers Stable Diffusion folder (SD 1.x, SD 2.x, SDXL or the SDXL refiner).

    Expects ``unet/`` and ``vae/`` (``config.json`` + ``diffusion_pytorch_model``
    ``.safetensors`` or ``.bin``), ``text_encoder/`` (``config.json`` +
    ``model.safetensors`` or ``pytorch_model.bin``; SDXL also ``text_encoder_2/``, the refiner
    only that one) and ``scheduler/scheduler_config.json``; ``.fp16`` variants and sharded
    ``*.index.json`` weights are accepted too.

    Returns ``(configs, components)``: ``configs`` maps ``unet`` / ``vae`` / the text encoders /
    ``scheduler`` to the config dicts as written in the folder; ``components`` maps ``unet`` /
    ``vae`` / the text encoders to state dicts in the diffusers / transformers file layout
    (text encoder keys start with ``text_model.`` whichever transformers version saved them;
    ``text_encoder_2`` also has ``text_projection.weight``).

    Raises :class:`CheckpointError` naming every missing part at once, or the
    architecture if it is not one sdrt exports (inpainting, pix2pix).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"not a diffusers folder: {folder}")
    texts = _folder_text_encoders(folder)
    wanted = [n for n in _CONFIG_FILES if not n.startswith("text_encoder") or n in texts]
    missing: list[str] = []
    for name in wanted:
        if not (folder / _CONFIG_FILES[name]).is_file():
            missing.append(_CONFIG_FILES[name])
    weight_files: dict[str, str] = {}
    for component in (n for n in _WEIGHT_FILES if n in wanted):
        candidates = _weight_candidates(component)
        found = next((c for c in candidates if (folder / c).is_file()), None)
        if found is None:
            st_stem, bin_stem = _WEIGHT_FILES[component]
            missing.append(f"{component}/{st_stem}.safetensors (or {bin_stem}.bin)")
        else:
            weight_files[component] = found
    if missing:
        raise CheckpointError(f"incomplete diffusers folder {folder}: missing {', '.join(missing)}")

    configs = {name: _read_config(folder, _CONFIG_FILES[name]) for name in wanted}
    arch = _folder_architecture(configs)
    if arch not in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
        raise CheckpointError(f"{ARCHITECTURE_NAMES[arch]} models are not supported yet "
                              f"(sdrt reads SD 1.x, SD 2.x, SDXL and the SDXL refiner): {folder}")
    check_configs(configs, str(folder))
    components = {name: _load_weights(folder, relative) for name, relative in weight_files.items()}
    for name in texts:
        text = components[name]
        if text and not any(k.startswith("text_model.") for k in text):
            components[name] = {k if k.startswith("text_projection") else f"text_model.{k}": v
                                for k, v in text.items()}
    return configs, components
