"""The one denoiser wrapper: network prediction (eps | v) -> denoised image, sigma -> timestep, CFG.

Samplers see only ``denoise(x, sigma)``; the scalings follow k-diffusion's DiscreteEpsDDPMDenoiser
and DiscreteVDDPMDenoiser with sigma_data = 1 (``external.py``).
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime import schedules
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sessions import Session


class Denoiser:
    """A UNet session as a denoiser D(x, sigma, context) over the discrete DDPM sigmas."""

    def __init__(self, unet: Session, alphas_cumprod: np.ndarray, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise SdrtError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")
        self.unet = unet
        self.prediction_type = prediction_type
        self.sigmas = schedules.model_sigmas(alphas_cumprod)
        self.log_sigmas = np.log(self.sigmas.astype(np.float64))
        # Graphs exported with an integer timestep (optimum) get the nearest step; ours take the fraction
        self.integer_timestep = np.issubdtype(unet.input_dtype("timestep"), np.integer)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        t = float(schedules.sigma_to_t(np.array([sigma]), self.log_sigmas)[0])
        return float(np.rint(t)) if self.integer_timestep else t

    def __call__(self, x: np.ndarray, sigma: float, context: np.ndarray) -> np.ndarray:
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        t = np.full((x.shape[0],), self.sigma_to_t(sigma), dtype=np.float32)
        out = self.unet.run({"sample": x * np.float32(c_in), "timestep": t, "encoder_hidden_states": context},
                            ["out_sample"])["out_sample"].astype(x.dtype, copy=False)
        if self.prediction_type == "epsilon":
            return x + out * np.float32(-sigma)
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        return out * np.float32(c_out) + x * np.float32(c_skip)


class CFGDenoiser:
    """Classifier-free guidance with conditional and unconditional inputs batched into one UNet run.

    ``denoised = uncond + (cond - uncond) * cfg_scale``, applied to the denoised images as the
    webui does (equivalent to applying it to eps, up to rounding). At ``cfg_scale == 1`` the
    unconditional half is skipped: the result is the conditional prediction either way.
    """

    def __init__(self, model: Denoiser, cond: np.ndarray, uncond: np.ndarray, cfg_scale: float):
        if cond.shape != uncond.shape:
            raise SdrtError(f"conditioning shapes differ: {cond.shape} vs {uncond.shape}")
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.cfg_scale = float(cfg_scale)
        self.context = np.concatenate([cond, uncond]) if self.cfg_scale != 1.0 else cond

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        if self.cfg_scale == 1.0:
            return self.model(x, sigma, self.cond)
        n = x.shape[0]
        out = self.model(np.concatenate([x, x]), sigma, self.context)
        cond, uncond = out[:n], out[n:]
        return uncond + (cond - uncond) * np.float32(self.cfg_scale)
