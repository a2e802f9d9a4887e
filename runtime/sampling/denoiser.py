"""The one denoiser wrapper: network prediction (eps | v) -> denoised image, sigma -> timestep, CFG.

Samplers see only ``denoise(x, sigma)``; the scalings follow k-diffusion's DiscreteEpsDDPMDenoiser
and DiscreteVDDPMDenoiser with sigma_data = 1 (``external.py``).
"""

from __future__ import annotations

import numpy as np
from sdrt.runtime.backends.onnxruntime import Session
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling import schedules

ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL's UNet inputs beside encoder_hidden_states
IMAGE_CONDITIONING = "c_concat"  # an inpainting UNet's image conditioning, in a context dict


class Denoiser:
    """A UNet session as a denoiser D(x, sigma, context) over the discrete DDPM sigmas."""

    def __init__(self, unet: Session, alphas_cumprod: np.ndarray, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise SdrtError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")
        self.unet = unet
        self.prediction_type = prediction_type
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float32)
        # The sigma <-> timestep map the schedules are built on
        self.schedule = schedules.DiscreteSchedule(schedules.model_sigmas(alphas_cumprod))
        # Graphs exported with an integer timestep (optimum) get the nearest step; ours take the fraction
        self.integer_timestep = np.issubdtype(unet.input_dtype("timestep"), np.integer)
        # The timestep's declared shape: [] (a scalar: optimum >= 2), [1] or [batch / "steps"]
        self.timestep_shape = list(unet.inputs["timestep"].shape or [])
        # SDXL's added conditioning (optimum's names), fed from a context dict
        self.added_inputs = tuple(n for n in ADDED_INPUTS if n in unet.inputs)
        # Inpainting UNets take the image conditioning (mask + masked image latents) beside the latents;
        # the pipeline sets how many channels it has (the UNet's input channels over the latents')
        self.image_channels = 0

    @property
    def sigmas(self) -> np.ndarray:
        return self.schedule.sigmas

    def sigma_to_t(self, sigma: float) -> float:
        t = float(self.schedule.sigma_to_t(np.array([sigma]))[0])
        return float(np.rint(t)) if self.integer_timestep else t

    def timestep(self, t: float, batch: int) -> np.ndarray:
        """The UNet's ``timestep`` feed in the rank the graph declares (one value for the whole batch)."""
        if not self.timestep_shape:
            return np.array(t, dtype=np.float64)
        n = 1 if self.timestep_shape[0] == 1 else batch
        return np.full((n,), t, dtype=np.float64)

    def run_unet(self, x: np.ndarray, t: float, context: np.ndarray | dict) -> np.ndarray:
        """The raw network output for input ``x`` at (fractional) timestep ``t``.

        ``context``: the cross-attention states [batch, tokens, width], or a dict of UNet feeds
        holding them as ``encoder_hidden_states`` beside SDXL's ``text_embeds`` and ``time_ids``
        (the webui's dict conditioning: ``crossattn`` and ``vector``)."""
        if self.integer_timestep:
            t = float(np.rint(t))
        feeds = {"sample": x, "timestep": self.timestep(t, x.shape[0])}
        if isinstance(context, dict):
            feeds.update(context)
        else:
            feeds["encoder_hidden_states"] = context
        image = feeds.pop(IMAGE_CONDITIONING, None)
        if self.image_channels:
            if image is None or image.shape[1] != self.image_channels:
                raise SdrtError(f"this inpainting UNet needs {self.image_channels} channels of image conditioning "
                                "beside the latents")
            # the webui's c_concat: the scaled latents, then the conditioning as it is
            feeds["sample"] = np.concatenate([x, image.astype(x.dtype, copy=False)], axis=1)
        missing = [n for n in self.added_inputs if n not in feeds]
        if missing:
            raise SdrtError(f"this UNet needs SDXL's added conditioning ({', '.join(missing)}); the conditioning "
                            "given has none")
        return self.unet.run(feeds, ["out_sample"])["out_sample"].astype(x.dtype, copy=False)

    def __call__(self, x: np.ndarray, sigma: float, context: np.ndarray | dict) -> np.ndarray:
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        out = self.run_unet(x * np.float32(c_in), self.sigma_to_t(sigma), context)
        if self.prediction_type == "epsilon":
            return x + out * np.float32(-sigma)
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        return out * np.float32(c_out) + x * np.float32(c_skip)


class EpsTimestepModel:
    """The network as a noise predictor over DDPM timesteps, for DDIM, PLMS and UniPC.

    ``model(x, t, context) -> eps`` on the unscaled (variance-preserving) latents, like the webui's
    ``CompVisTimestepsDenoiser``; v-prediction output is turned into eps with abar at int(t) as
    its ``CompVisTimestepsVDenoiser`` does. CFG on top of it combines the eps predictions
    (the webui's ``CFGDenoiserTimesteps``).
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.alphas_cumprod = denoiser.alphas_cumprod

    def __call__(self, x: np.ndarray, t: float, context: np.ndarray | dict) -> np.ndarray:
        out = self.denoiser.run_unet(x, t, context)
        if self.denoiser.prediction_type == "epsilon":
            return out
        # eps = sqrt(abar) v + sqrt(1 - abar) x, with abar at the truncated timestep
        abar = float(self.alphas_cumprod[int(t)])
        return out * np.float32(abar**0.5) + x * np.float32((1 - abar) ** 0.5)


class LCMDenoiser:
    """The webui's LCM denoiser (``sd_samplers_lcm.LCMCompVisDenoiser``) over an eps model.

    It keeps the 50 timesteps an LCM was distilled on (19, 39, ..., 999), maps each sigma to the
    nearest of them, and applies the consistency-model boundary scalings (sigma_data 0.5,
    timestep scale 10) to the denoised image. Like the webui it takes c_skip times the
    sigma-space input (diffusers applies it to the unit-variance sample; c_skip < 1e-5 there).
    """

    original_steps = 50

    def __init__(self, denoiser: Denoiser):
        if denoiser.prediction_type != "epsilon":
            raise SdrtError("the LCM sampler needs an epsilon-prediction model")
        self.denoiser = denoiser
        n = len(denoiser.alphas_cumprod)
        skip = n // self.original_steps
        valid = denoiser.alphas_cumprod[n - 1 - skip * np.arange(self.original_steps)[::-1]]
        self.schedule = schedules.DiscreteSchedule(schedules.model_sigmas(valid), t_scale=skip,
                                                   t_offset=skip - 1, quantize=True)

    def __call__(self, x: np.ndarray, sigma: float, context: np.ndarray | dict) -> np.ndarray:
        t = float(self.schedule.sigma_to_t(np.array([sigma]))[0])
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        eps = self.denoiser.run_unet(x * np.float32(c_in), t, context)
        denoised = x + eps * np.float32(-sigma)
        # Consistency boundary condition: c_skip -> 1, c_out -> 0 as t -> 0
        scaled_t = t * 10.0
        c_skip = 0.25 / (scaled_t**2 + 0.25)
        c_out = scaled_t / (scaled_t**2 + 0.25) ** 0.5
        return denoised * np.float32(c_out) + x * np.float32(c_skip)


class RefinerSwitch:
    """The webui's refiner switch (``sd_samplers_common.apply_refiner``): at the first denoiser call
    whose sigma has reached ``switch_at`` of the way through the training timesteps, the second
    model takes over with its own conditioning, for the rest of the sampling.

    The call's "completed ratio" is ``(999 - t) / 1000``: ``t`` the index of the model sigma nearest
    to the call's sigma (``table``, the denoiser's sigmas; LCM's 50), or the timestep itself for
    DDIM / PLMS / UniPC (``table`` None). ``model`` is the refiner's inner model (of the same kind
    as the base's); ``conds()`` its (cond, uncond), computed at the switch as the webui's
    ``setup_conds``. ``switched`` tells afterwards whether it happened."""

    def __init__(self, switch_at: float, table: np.ndarray | None, model, conds):
        self.switch_at = float(switch_at)
        self.table = None if table is None else np.asarray(table, dtype=np.float32)
        self.model, self.conds = model, conds
        self.switched = False

    def due(self, sigma) -> bool:
        s = float(np.max(sigma))
        t = int(s) if self.table is None else int(np.argmin(np.abs(self.table - np.float32(s))))
        return (999 - t) / 1000 >= self.switch_at


class CFGDenoiser:
    """Classifier-free guidance, composable (``AND``) and scheduled (prompt editing), in one UNet run.

    ``model(x, sigma, context)`` is any inner model (a k-diffusion denoiser, an eps model over
    timesteps); guidance combines whatever it returns, as the webui's ``combine_denoised``:
    ``out = uncond + sum_i (cond_i - uncond) * (weight_i * cfg_scale)``. ``cond`` is a
    ``MultiCond`` (or one array, [1 or batch, tokens, width]); ``uncond`` a ``CondSchedule`` (or
    an array). The conditioning of each call is the one for ``self.step``, the number of calls
    made so far: the webui's denoiser counts its calls, so a second-order sampler moves through
    a prompt's schedule twice as fast (the webui builds such samplers' schedules over twice the
    steps). Each image's rows are its ``AND`` parts, then come the unconditional rows; when the
    two sides differ in length (no padding) they go through the model in two runs, as the webui
    does. At ``cfg_scale == 1`` with a single part of weight 1 the unconditional rows are
    skipped: the result is the conditional prediction either way. A sampler that needs the
    unconditional prediction itself (DDIM CFG++) sets ``keep_uncond``: the shortcut is then off
    and each call leaves its unconditional rows in ``last_uncond`` (the webui's
    ``need_last_noise_uncond`` and ``last_noise_uncond``). SDXL's schedules carry a pooled vector
    per entry and the size conditioning (``CondSchedule.added_at``): they go to the model beside
    the states, row for row, as a dict of UNet feeds (the webui's dict conditioning).
    """

    def __init__(self, model, cond, uncond, cfg_scale: float):
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.cfg_scale = float(cfg_scale)
        self.step = 0
        self.keep_uncond = False
        self.last_uncond: np.ndarray | None = None
        self.refiner: RefinerSwitch | None = None
        # An inpainting model's image conditioning [images, channels, h, w]: the same for an image's
        # conditional and unconditional rows (the webui's image_cond_in)
        self.image_cond: np.ndarray | None = None
        if isinstance(cond, np.ndarray) and isinstance(uncond, np.ndarray) and cond.shape[2:] != uncond.shape[2:]:
            raise SdrtError(f"conditioning widths differ: {cond.shape} vs {uncond.shape}")

    def added_at(self, step: int) -> tuple[list[dict] | None, dict | None]:
        """SDXL: each part's and the uncond's added conditioning ({name: [dim]}) for call ``step``;
        (None, None) for conditioning without it."""
        if isinstance(self.cond, np.ndarray) or isinstance(self.uncond, np.ndarray):
            return None, None
        parts, uncond = self.cond.added_at(step), self.uncond.added_at(step)
        if uncond is None and all(a is None for a in parts):
            return None, None
        if uncond is None or any(a is None for a in parts):
            raise SdrtError("the prompt and negative prompt conditioning differ in their added (SDXL) conditioning")
        return parts, uncond

    def conds_at(self, step: int) -> tuple[list[tuple[np.ndarray, float]], np.ndarray]:
        """([(cond [1 or batch, tokens, width], weight), ...], uncond) for call number ``step``."""
        if isinstance(self.cond, np.ndarray):
            parts = [(self.cond, 1.0)]
        else:
            parts = [(c[None], w) for c, w in self.cond.at(step)]
        uncond = self.uncond if isinstance(self.uncond, np.ndarray) else self.uncond.at(step)[None]
        return parts, uncond

    def __call__(self, x: np.ndarray, sigma) -> np.ndarray:
        if self.refiner is not None and not self.refiner.switched and self.refiner.due(sigma):
            self.model = self.refiner.model
            self.cond, self.uncond = self.refiner.conds()
            self.refiner.switched = True
        parts, uncond = self.conds_at(self.step)
        added_parts, added_uncond = self.added_at(self.step)
        self.step += 1
        n = x.shape[0]

        def rows(c):
            if len(c) not in (1, n):
                raise SdrtError(f"conditioning for {len(c)} images, latents for {n}")
            return np.broadcast_to(c, (n, *c.shape[1:])) if len(c) == 1 else c

        def context(ctx, added, repeat=1, parts=1):
            """The UNet's feeds: the states, SDXL's added conditioning of each row (``added``: one dict
            per part, the rows ordered image by image, then part by part) and an inpainting model's
            image conditioning (``parts`` rows per image)."""
            ctx = np.ascontiguousarray(ctx)
            if added is None and self.image_cond is None:
                return ctx
            feeds = {"encoder_hidden_states": ctx}
            if added is not None:
                feeds |= {name: np.tile(np.stack([a[name] for a in added]), (repeat, 1)) for name in added[0]}
            if self.image_cond is not None:
                feeds[IMAGE_CONDITIONING] = np.repeat(rows(self.image_cond), parts, axis=0)
            return feeds

        if self.cfg_scale == 1.0 and len(parts) == 1 and parts[0][1] == 1.0 and not self.keep_uncond:
            return self.model(x, sigma, context(rows(parts[0][0]), added_parts, n))
        k = len(parts)
        # Row i * k + j: image i with part j (the webui's x_in order), then one uncond row per image
        cond_ctx = np.stack([rows(c) for c, _ in parts], axis=1).reshape(n * k, *parts[0][0].shape[1:])
        x_cond = np.repeat(x, k, axis=0) if k > 1 else x
        uncond_ctx = rows(uncond)
        added_u = None if added_uncond is None else [added_uncond]
        if cond_ctx.shape[1] == uncond_ctx.shape[1]:
            c, u = context(cond_ctx, added_parts, n, k), context(uncond_ctx, added_u, n)
            both = np.concatenate([c, u]) if isinstance(c, np.ndarray) else {name: np.concatenate([c[name], u[name]])
                                                                           for name in c}
            out = self.model(np.concatenate([x_cond, x]), sigma, both)
            out_cond, out_uncond = out[:n * k], out[n * k:]
        else:
            out_cond = self.model(x_cond, sigma, context(cond_ctx, added_parts, n, k))
            out_uncond = self.model(x, sigma, context(uncond_ctx, added_u, n))
        out_cond = out_cond.reshape(n, k, *out_cond.shape[1:])
        if self.keep_uncond:
            self.last_uncond = out_uncond
        denoised = out_uncond.copy()
        for j, (_, weight) in enumerate(parts):
            denoised += (out_cond[:, j] - out_uncond) * np.float32(weight * self.cfg_scale)
        return denoised
