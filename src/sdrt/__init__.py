"""sdrt: Stable Diffusion checkpoints as ONNX bundles, sampled by a torch-free numpy + ONNX Runtime loop.

    import sdrt
    pipe = sdrt.Pipeline("bundles/model")      # or a checkpoint, a diffusers folder; None: the embedded model
    images = pipe("a castle on a hill", steps=20, sampler_name="Euler a", cfg_scale=7, seed=1234)
    images[0].save("castle.png")               # with the webui's PNG "parameters" text
    pipe.img2img("a castle at night", init_images=[images[0].image], denoising_strength=0.6)

Arguments take the webui API's names (``sampler_name``, ``scheduler``, ``cfg_scale``, ``n_iter``,
``batch_size``, ``seed``, ``subseed``, ``override_settings``, ...). ``pipe.interrupt()`` and
``pipe.skip()`` stop a running generation from another thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdrt.runtime import __version__
from sdrt.runtime.errors import CheckpointError, SdrtError

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import GeneratedImage, GenerationParams, Img2imgParams, Pipeline

__all__ = ["CheckpointError", "GeneratedImage", "GenerationParams", "Img2imgParams", "Pipeline", "SdrtError",
           "__version__"]


def __getattr__(name: str):
    # ONNX Runtime loads only when a pipeline is asked for: `import sdrt` stays cheap
    if name == "Pipeline":
        from sdrt.api import Pipeline

        return Pipeline
    if name in ("GeneratedImage", "GenerationParams", "Img2imgParams"):
        from sdrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
