"""torch modules -> ONNX graphs, one per component, with the I/O of ``sdrt.runtime.spec``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import torch
from torch import nn

from sdrt.runtime.spec import TEXT_TOKENS, ComponentSpec

log = logging.getLogger(__name__)

OPSET = 17
_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20  # stay clear of protobuf's 2 GB ceiling
EXTERNAL_DATA = "model.onnx_data"


class TextEncoderGraph(nn.Module):
    """CLIP text tower from token embeddings: position embeddings, causal layers, final norm.

    Returns the normed last state and the final layer norm of every layer's output, the
    latter being what the webui reads for CLIP skip (``hidden_states[-n]`` then the norm).
    With ``raw_states`` (SD 2.x, SDXL) also every layer's output without the norm (SDXL's
    conditioning is the raw penultimate layer); SD 1.x graphs are traced without it.
    """

    def __init__(self, text_model: nn.Module, raw_states: bool = False):
        super().__init__()
        self.text_model = text_model.text_model if hasattr(text_model, "text_model") else text_model
        self.raw_states = raw_states

    def forward(self, inputs_embeds: torch.Tensor):
        tm = self.text_model
        hidden = tm.embeddings(inputs_embeds=inputs_embeds)
        n = inputs_embeds.shape[1]
        # Additive causal mask, as transformers builds it: the dtype's lowest value above the diagonal
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
        normed, raw = [], []
        for layer in tm.encoder.layers:
            hidden = layer(hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            raw.append(hidden)
            normed.append(tm.final_layer_norm(hidden))
        if self.raw_states:
            return normed[-1], torch.stack(normed), torch.stack(raw)
        return normed[-1], torch.stack(normed)


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetAddedGraph(nn.Module):
    """SDXL's UNet: the pooled text embedding and the size / crop (refiner: aesthetic score) time ids
    as the ``text_time`` added conditioning, under optimum's input names."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    """Unscaled latents in (the runtime divides by the latent scale factor), pixels in [-1, 1] out."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """Pixels in [-1, 1] in; the diagonal Gaussian's mean and log-variance out (``quant_conv`` applied)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


def _example_inputs(spec: ComponentSpec, sizes: dict[str, int]) -> tuple[torch.Tensor, ...]:
    out = []
    g = torch.Generator().manual_seed(0)
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        out.append(torch.randn(shape, generator=g, dtype=getattr(torch, t.dtype)))
    return tuple(out)


def export_component(module: nn.Module, spec: ComponentSpec, sizes: dict[str, int], out_dir: Path,
                     filename: str = "model.onnx") -> Path:
    """Export one graph to ``out_dir/filename``, weights in ``model.onnx_data`` when over 2 GB."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    args = _example_inputs(spec, sizes)
    module = module.eval()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
        )
    consolidate(path)
    log.info("exported %s (%s)", spec.name, _human(_size_on_disk(out_dir)))
    return path


def consolidate(path: Path, limit: int = _PROTOBUF_LIMIT) -> None:
    """Leave one ``model.onnx``, plus one ``model.onnx_data`` when the weights exceed ``limit``.

    The exporter writes one external file per tensor for graphs over 2 GB; gather them into
    the single data file the optimum layout uses, and delete the scattered ones. The weights are
    streamed file by file into the data file (:func:`_gather_external`), never loaded together:
    a full-size SDXL UNet holds 10 GB of them.
    """
    before = set(os.listdir(path.parent))
    total = sum((path.parent / name).stat().st_size for name in before)  # a > 2 GB proto cannot be sized
    if total <= limit and before == {path.name}:
        return
    if total > limit:
        _gather_external(path, before - {path.name})
        return
    model = onnx.load(str(path), load_external_data=True)
    for name in before - {path.name}:
        (path.parent / name).unlink()
    onnx.save_model(model, str(path))


def _gather_external(path: Path, scattered: set[str], threshold: int = 1024, chunk: int = 64 << 20) -> None:
    """Move every initializer over ``threshold`` bytes into ``model.onnx_data`` beside ``path``:
    those in the exporter's per-tensor files copied ``chunk`` bytes at a time, inline ones written
    out; then the small graph is saved and the per-tensor files removed (the data file is written
    under a temporary name first, so a failure leaves the exported files as they were)."""
    folder = path.parent
    model = onnx.load(str(path), load_external_data=False)
    tmp = folder / f".{EXTERNAL_DATA}.partial"
    offset = 0
    with open(tmp, "wb") as out:
        for tensor in model.graph.initializer:
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if not external and len(tensor.raw_data) <= threshold:
                continue
            start = offset
            if external:
                info = {e.key: e.value for e in tensor.external_data}
                with open(folder / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    left = int(info["length"]) if "length" in info else None
                    while left is None or left > 0:
                        block = src.read(chunk if left is None else min(chunk, left))
                        if not block:
                            break
                        out.write(block)
                        offset += len(block)
                        left = None if left is None else left - len(block)
            else:
                out.write(tensor.raw_data)
                offset += len(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", EXTERNAL_DATA), ("offset", str(start)), ("length", str(offset - start))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    for name in scattered:
        (folder / name).unlink()
    tmp.replace(folder / EXTERNAL_DATA)
    onnx.save_model(model, str(path))


def externalize(path: Path) -> None:
    """Move a graph's weights into ``model.onnx_data`` beside it (when they are inline), so that
    the optimized graph written next to it can share them instead of holding a second copy."""
    if (path.parent / EXTERNAL_DATA).exists():
        return
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def example_sizes() -> dict[str, int]:
    """Trace-time sizes. Every symbolic axis stays dynamic in the graph; the latent sides are odd
    and unequal on purpose: diffusers' UNet then passes each skip connection's size to its
    upsamplers, so the traced graph serves sides that are not multiples of the UNet's overall
    down factor (SD 1.x: 8 latents, 64 pixels) too."""
    height, width = 13, 11
    return {"batch": 2, "height": height, "width": width, "sequence": TEXT_TOKENS,
            "image_height": height * 8, "image_width": width * 8}
