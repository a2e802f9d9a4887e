"""Pipelines: a request resolved once into a ``Plan`` (``make_plan``), then the stages that consume
it (txt2img; img2img, inpainting and hires fix later)."""

from sdrt.runtime.pipeline.params import GenerationParams
from sdrt.runtime.pipeline.plan import Batch, Plan, make_plan
from sdrt.runtime.pipeline.txt2img import GeneratedImage, Pipeline, to_uint8

__all__ = ["Batch", "GeneratedImage", "GenerationParams", "Plan", "Pipeline", "make_plan", "to_uint8"]
