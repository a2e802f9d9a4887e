"""Runs optimum's ONNX Runtime pipelines on bundles, for tests/test_optimum.py (not a test itself).

optimum's pipelines need transformers 4.x, sdrt's environment has 5.x: this script runs in a
subprocess whose PYTHONPATH puts the packages of constraints/optimum.txt first. It reads a JSON
list of jobs (argv[1]) and writes one .npz per job: optimum's prompt embeddings (and SDXL's pooled
ones) and the image [h, w, 3] in [0, 1] for the job's starting latents.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline


def run(job: dict) -> None:
    xl = job["kind"] == "xl"
    pipe = (ORTStableDiffusionXLPipeline if xl else ORTStableDiffusionPipeline).from_pretrained(job["bundle"])
    out = {"scheduler": np.array(type(pipe.scheduler).__name__)}
    if xl:
        embeds = pipe.encode_prompt(prompt=job["prompt"], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=job["negative"])
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    else:
        embeds = pipe.encode_prompt(job["prompt"], "cpu", 1, True, job["negative"])
        names = ("prompt_embeds", "negative_prompt_embeds")
    out |= {name: value.numpy() for name, value in zip(names, embeds)}
    latents = torch.from_numpy(np.load(job["latents"]))
    image = pipe(job["prompt"], negative_prompt=job["negative"], num_inference_steps=job["steps"],
                 guidance_scale=job["guidance"], latents=latents, height=job["height"], width=job["width"],
                 output_type="np").images[0]
    np.savez(job["out"], image=image, **out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for job in json.load(f):
            run(job)
