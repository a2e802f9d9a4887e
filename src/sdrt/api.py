"""``sdrt.Pipeline``: the runtime's pipeline for any model a user has at hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdrt.models import resolve_model
from sdrt.runtime.bundle import Bundle
from sdrt.runtime.pipeline import Img2imgPipeline


class Pipeline(Img2imgPipeline):
    """The runtime's pipeline (txt2img as ``pipe(prompt, ...)``, img2img as ``pipe.img2img(prompt,
    init_images=[...], denoising_strength=...)``) that also takes a checkpoint (``.safetensors``, ``.ckpt``)
    or a diffusers folder, exported into the cache on first use (this needs the export extra), and
    ``None`` for the embedded default model. ``progress(stage, done, total)`` reports that export."""

    def __init__(self, model: Bundle | str | Path | None = None, *,
                 progress: Callable[[str, int, int], None] | None = None, **options):
        super().__init__(model if isinstance(model, Bundle) else resolve_model(model, progress=progress), **options)
