"""Pipelines: a request resolved once into a ``Plan`` (``make_plan``), then the stages that consume
it: txt2img (``Pipeline``) and img2img (``Img2imgPipeline``, which also runs inpainting with a mask and
txt2img's hires fix)."""

from sdrt.runtime.pipeline.img2img import Img2imgPipeline, Img2imgPlan, make_img2img_plan
from sdrt.runtime.pipeline.params import GenerationParams, Img2imgParams
from sdrt.runtime.pipeline.plan import Batch, Plan, make_plan
from sdrt.runtime.pipeline.txt2img import GeneratedImage, Pipeline, to_uint8

__all__ = ["Batch", "GeneratedImage", "GenerationParams", "Img2imgParams", "Img2imgPipeline", "Img2imgPlan", "Plan",
           "Pipeline", "make_img2img_plan", "make_plan", "to_uint8"]
