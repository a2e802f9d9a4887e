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
                 progress: Callable[[str, int, int], None] | None = None, vae: str | Path | None = "auto",
                 vae_dir: str | Path | None = None, refiner: Bundle | str | Path | None = None, **options):
        """``vae``: a VAE file (or a file name in ``vae_dir``, default ``models/VAE``), ``"auto"`` the
        webui's Automatic rule (``nai.vae.pt`` beside ``nai.ckpt``), ``"none"`` the model's own;
        ``lora_dir`` (default ``models/Lora``): where ``<lora:name:weight>`` tags find their files;
        ``hypernetwork_dir`` (default ``models/hypernetworks``): ``<hypernet:name:multiplier>``'s;
        ``refiner``: a second model (SDXL's refiner) that requests naming it in ``refiner_checkpoint``
        switch to at ``refiner_switch_at``, as the webui's Refiner."""
        from sdrt.runtime.bundle import open_bundle
        from sdrt.runtime.networks.vae import choose_vae

        bundle = model if isinstance(model, Bundle) else open_bundle(resolve_model(model, progress=progress))
        vae = choose_vae(vae, None if isinstance(model, Bundle) else model, bundle.name,
                         [vae_dir] if vae_dir is not None else None)
        super().__init__(bundle, vae=vae, **options)
        if refiner is not None:
            shared = {k: options[k] for k in ("device", "precision", "memory", "half_vae") if k in options}
            self.set_refiner(Pipeline(refiner, progress=progress, vae="none", **shared))
