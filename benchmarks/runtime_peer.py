"""sdrt's own pipeline (numpy + ONNX Runtime) as a ``sdrt bench`` worker:
``python -m sdrt.benchmarks.runtime_peer --worker`` (started by the harness, job on stdin)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from sdrt.benchmarks.memory import NvidiaSmiPeak
from sdrt.benchmarks.worker import worker_main


class RuntimePeer:
    """sdrt's own pipeline (numpy + ONNX Runtime) on one execution provider."""

    def __init__(self, job: dict):
        from sdrt.runtime.pipeline.txt2img import Pipeline

        # The backend's own precision, never the bundle's measured default (--precision auto)
        self.pipe = Pipeline(job["bundle"], job["options"].get("session", job["device"]), precision=job["precision"])
        self.threads = int(os.environ.get("SDRT_THREADS", "0")) or None
        self._gpu = NvidiaSmiPeak() if job["device"] == "cuda" else None

    def sync(self):
        """ONNX Runtime's ``run`` returns host arrays: it has finished when it returns."""

    def text_encoder(self, p):
        """The states of the prompt's parts and the negative prompt [parts + 1, tokens, width]; SDXL:
        raveled, then their pooled vectors raveled (the torch peers' layout)."""
        cond, uncond = self.pipe.conditioning(p)  # a MultiCond and a CondSchedule; step 0 for plain prompts
        states = np.concatenate([cond.stacked(0), uncond.at(0)[None]])
        added = cond.added_at(0) + [uncond.added_at(0)]
        if added[-1] is None:
            return states
        return np.concatenate([states.ravel(), np.stack([a["text_embeds"] for a in added]).ravel()])

    def unet_step(self, x, sigma, cond, uncond, cfg_scale, added=None):
        """One guided step through sdrt's own CFG denoiser; SDXL's ``added`` conditioning goes in as
        the schedules the pipeline's conditioning hands it (one entry, one ``AND`` part)."""
        from sdrt.runtime.sampling.denoiser import CFGDenoiser
        from sdrt.runtime.text.encoder import CondSchedule, MultiCond

        if added is not None:
            def schedule(states, side):
                return CondSchedule((1,), (states[0],), pooled=(side["text_embeds"],), time_ids=side["time_ids"])

            cond, uncond = MultiCond(((schedule(cond, added["cond"]), 1.0),)), schedule(uncond, added["uncond"])
        return CFGDenoiser(self.pipe.denoiser, cond, uncond, cfg_scale)(x, sigma)

    def vae_decode(self, latents):
        return self.pipe.decode_float(latents)

    def generate(self, p):
        cond, uncond = self.pipe.conditioning(p)
        t0 = time.perf_counter()
        latents = self.pipe.sample(p, [p.seed], cond, uncond)
        sampling_s = time.perf_counter() - t0
        return self.pipe.decode_float(latents)[0], sampling_s

    def device_memory_start(self):
        if self._gpu:
            self._gpu.start()

    def device_memory_peak(self) -> tuple[float | None, str | None]:
        if not self._gpu:
            return None, None
        return self._gpu.stop(), "nvidia-smi per-process used memory, sampled every 0.1 s"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    try:
        sys.exit(worker_main(RuntimePeer))
    except KeyboardInterrupt:
        sys.exit(130)
