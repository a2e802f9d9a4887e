"""The webui's sampler and schedule names, resolved to sampler functions and sigma schedules.

Names, aliases and per-sampler quirks follow the AUTOMATIC1111 webui 1.10
(``sd_samplers_kdiffusion``, ``sd_samplers_timesteps``, ``sd_samplers_lcm``, ``sd_schedulers``):

- "Automatic" means the sampler's own default schedule (Karras for DPM++ 2M, Exponential for
  the 2M/3M SDE samplers, the model's uniform timesteps otherwise);
- DPM2, DPM2 a and DPM++ 3M SDE build the schedule for steps + 1 and drop the penultimate sigma;
- Karras, Exponential, Polyexponential, KL Optimal and Beta span the model's own sigma range
  (sigma_min = sigmas[0], sigma_max = sigmas[-1], not k-diffusion's old 0.1 / 10);
- every sampler that takes ``eta`` gets the webui's default 1.0 (``eta_ancestral``), DPM fast and
  DPM adaptive included (k-diffusion's own default there is 0); DDIM's and DDIM CFG++'s is 0
  (``eta_ddim``, written as "Eta DDIM");
- DDIM CFG++ guides at the CFG scale / 12.5 (``cfg_scale_multiplier``), as the webui's sampler
  sets on its CFG denoiser;
- the SDE samplers draw their noise from a Brownian tree seeded with each image's seed;
- DDIM (CFG++ too), PLMS and UniPC use the webui's DDIM timesteps 1, 1 + k, ... (k = 1000 // steps),
  so a step count that does not divide 1000 gives more steps, and DDIM/PLMS make one step fewer
  than there are timesteps; DPM fast and DPM adaptive use only the model's sigma range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling import samplers, schedules


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    fn: Callable
    aliases: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)  # the webui's defaults, passed to ``fn``
    default_schedule: str | None = None  # the schedule "Automatic" means (None: Uniform)
    family: str = "sigma"  # "sigma" (k-diffusion), "timesteps" (DDIM/PLMS/UniPC) or "lcm"
    discard_penultimate: bool = False  # schedule for steps + 1, drop the next-to-last sigma
    second_order: bool = False  # two model calls per step: needs at least 2 steps
    brownian: bool = False  # SDE noise from a Brownian tree seeded per image
    uses_ensd: bool = False  # the webui writes ENSD for it (when eta != 0)
    fixed_schedule: bool = False  # ignores schedules: only "Automatic" applies
    min_steps: int = 1
    cfg_scale_multiplier: float = 1.0  # the guidance runs at cfg_scale times this (the infotext keeps cfg_scale)

    @property
    def ancestral(self) -> bool:
        """Draws fresh noise from the image generators each step (with the default options)."""
        return self.draws_noise(self.options)

    @property
    def takes_eta(self) -> bool:
        return "eta" in self.options

    @property
    def eta_default(self) -> float:
        return self.options.get("eta", 0.0)

    @property
    def eta_infotext_field(self) -> str:
        return "Eta DDIM" if self.family == "timesteps" else "Eta"

    def draws_noise(self, options: dict) -> bool:
        """Whether sampling with these options draws from the per-image generators (ENSD applies)."""
        if self.brownian:
            return False
        if self.fn in (samplers.sample_restart, samplers.sample_lcm):
            return True
        if "s_churn" in options:
            return options["s_churn"] > 0
        return bool(options.get("eta", 0.0))


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}

SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo("DPM++ 2M", samplers.sample_dpmpp_2m, ("k_dpmpp_2m",), default_schedule="Karras"),
        SamplerInfo("DPM++ SDE", samplers.sample_dpmpp_sde, ("k_dpmpp_sde",), dict(_ANCESTRAL),
                    default_schedule="Karras", second_order=True, brownian=True, min_steps=2),
        SamplerInfo("DPM++ 2M SDE", samplers.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), dict(_ANCESTRAL),
                    default_schedule="Exponential", brownian=True),
        SamplerInfo("DPM++ 2M SDE Heun", samplers.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",),
                    {**_ANCESTRAL, "solver_type": "heun"}, default_schedule="Exponential", brownian=True),
        SamplerInfo("DPM++ 2S a", samplers.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), dict(_ANCESTRAL),
                    default_schedule="Karras", second_order=True, uses_ensd=True, min_steps=2),
        SamplerInfo("DPM++ 3M SDE", samplers.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",), dict(_ANCESTRAL),
                    default_schedule="Exponential", discard_penultimate=True, brownian=True),
        SamplerInfo("Euler a", samplers.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"),
                    dict(_ANCESTRAL), uses_ensd=True),
        SamplerInfo("Euler", samplers.sample_euler, ("k_euler",), dict(_CHURN)),
        SamplerInfo("LMS", samplers.sample_lms, ("k_lms",)),
        SamplerInfo("Heun", samplers.sample_heun, ("k_heun",), dict(_CHURN), second_order=True, min_steps=2),
        SamplerInfo("DPM2", samplers.sample_dpm_2, ("k_dpm_2",), dict(_CHURN), default_schedule="Karras",
                    discard_penultimate=True, second_order=True, min_steps=2),
        SamplerInfo("DPM2 a", samplers.sample_dpm_2_ancestral, ("k_dpm_2_a",), dict(_ANCESTRAL),
                    default_schedule="Karras", discard_penultimate=True, second_order=True, uses_ensd=True,
                    min_steps=2),
        SamplerInfo("DPM fast", samplers.sample_dpm_fast, ("k_dpm_fast",), dict(_ANCESTRAL), uses_ensd=True,
                    fixed_schedule=True),
        SamplerInfo("DPM adaptive", samplers.sample_dpm_adaptive, ("k_dpm_ad",), dict(_ANCESTRAL),
                    uses_ensd=True, fixed_schedule=True),
        SamplerInfo("Restart", samplers.sample_restart, ("restart",), {"s_noise": 1.0}, default_schedule="Karras",
                    second_order=True, min_steps=2),
        SamplerInfo("DDIM", samplers.sample_ddim, ("ddim",), {"eta": 0.0}, family="timesteps",
                    fixed_schedule=True, min_steps=2),
        # CFG++ maps the webui's CFG scales [0, 12.5] onto guidance [0, 1]
        SamplerInfo("DDIM CFG++", samplers.sample_ddim_cfgpp, ("ddim_cfgpp",), {"eta": 0.0}, family="timesteps",
                    fixed_schedule=True, min_steps=2, cfg_scale_multiplier=1 / 12.5),
        SamplerInfo("PLMS", samplers.sample_plms, ("plms",), family="timesteps", fixed_schedule=True, min_steps=2),
        # The webui's UniPC options (uni_pc_variant, _order, _skip_type, _lower_order_final) at their defaults
        SamplerInfo("UniPC", samplers.sample_unipc, ("unipc",),
                    {"order": 3, "variant": "bh1", "skip_type": "time_uniform", "lower_order_final": True},
                    family="timesteps", fixed_schedule=True, min_steps=3),
        SamplerInfo("LCM", samplers.sample_lcm, ("k_lcm",), family="lcm"),
    )
}

SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
             "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
# The webui's internal scheduler names and aliases, accepted too
_SCHEDULE_ALIASES = {"sgmuniform": "SGM Uniform", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                     "align_your_steps": "Align Your Steps"}


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def _schedule_name(name: str) -> str | None:
    key = _norm(name)
    for s in SCHEDULES:
        if _norm(s) == key:
            return s
    return _SCHEDULE_ALIASES.get(key.replace(" ", "_")) or _SCHEDULE_ALIASES.get(key)


def resolve(sampler: str, schedule: str = "Automatic") -> tuple[SamplerInfo, str]:
    """(sampler, schedule) from webui names, old combined names like ``DPM++ 2M Karras`` included.

    The schedule returned is concrete ("Automatic" resolved to the sampler's default).
    """
    by_name = {}
    for info in SAMPLERS.values():
        for alias in (info.name, *info.aliases):
            by_name[_norm(alias)] = info
    key = _norm(sampler)
    info = by_name.get(key)
    if info is None:
        # An old combined name: "<sampler> <schedule>" (the suffix wins, as in the webui)
        for sched in (*SCHEDULES[1:], "SGMUniform"):
            suffix = " " + _norm(sched)
            if key.endswith(suffix) and key[: -len(suffix)] in by_name:
                info, schedule = by_name[key[: -len(suffix)]], sched
                break
    if info is None:
        raise SdrtError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    name = _schedule_name(schedule)
    if name is None:
        raise SdrtError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if info.fixed_schedule and name != "Automatic":
        raise SdrtError(f"sampler {info.name!r} uses its own fixed steps and cannot use schedule {name!r}; "
                        "use schedule 'Automatic'")
    if name == "Automatic":
        name = info.default_schedule or "Uniform"
    return info, name


def check_steps(info: SamplerInfo, steps: int) -> None:
    """One-line error when a sampler cannot run in this many steps."""
    if steps < 1:
        raise SdrtError(f"steps must be at least 1, got {steps}")
    if steps < info.min_steps:
        why = "UniPC's order is 3" if info.fn is samplers.sample_unipc else (
            "it is a second-order method" if info.second_order else "one step would return the noise unchanged")
        raise SdrtError(f"sampler {info.name!r} needs at least {info.min_steps} steps ({why}), got {steps}")


def sampler_options(info: SamplerInfo, *, eta: float | None = None, s_noise: float = 1.0, s_churn: float = 0.0,
                    s_tmin: float = 0.0, s_tmax: float = 0.0) -> dict:
    """The sampler's keyword options: the webui's defaults, overridden where the sampler takes them.

    ``s_tmax`` 0 means infinity, as the webui's setting does.
    """
    options = dict(info.options)
    if eta is not None and "eta" in options:
        options["eta"] = float(eta)
    if "s_noise" in options:
        options["s_noise"] = float(s_noise)
    if "s_churn" in options:
        options.update(s_churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax) or float("inf"))
    return options


def _as_model(model_sigmas) -> schedules.DiscreteSchedule:
    if isinstance(model_sigmas, schedules.DiscreteSchedule):
        return model_sigmas
    return schedules.DiscreteSchedule(np.asarray(model_sigmas))


def schedule_sigmas(schedule: str, steps: int, model, arch: str = "sd1") -> np.ndarray:
    """The named schedule for ``steps`` steps over the model's sigmas (a DiscreteSchedule or table)."""
    model = _as_model(model)
    lo, hi = model.sigma_min, model.sigma_max
    if schedule in ("Uniform", "Automatic"):
        return schedules.get_sigmas_uniform(steps, model)
    if schedule == "Karras":
        return schedules.get_sigmas_karras(steps, lo, hi)
    if schedule == "Exponential":
        return schedules.get_sigmas_exponential(steps, lo, hi)
    if schedule == "Polyexponential":
        return schedules.get_sigmas_polyexponential(steps, lo, hi)
    if schedule == "SGM Uniform":
        return schedules.get_sigmas_sgm_uniform(steps, model)
    if schedule == "KL Optimal":
        return schedules.get_sigmas_kl_optimal(steps, lo, hi)
    if schedule == "Align Your Steps":
        return schedules.get_sigmas_align_your_steps(steps, arch)
    if schedule == "Simple":
        return schedules.get_sigmas_simple(steps, model)
    if schedule == "Normal":
        return schedules.get_sigmas_normal(steps, model)
    if schedule == "DDIM":
        return schedules.get_sigmas_ddim(steps, model)
    if schedule == "Beta":
        # The webui's beta_dist_alpha / beta_dist_beta defaults
        return schedules.get_sigmas_beta(steps, lo, hi, 0.6, 0.6)
    raise SdrtError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def sigmas_for(schedule: str, steps: int, model_sigmas, *, sampler: SamplerInfo | None = None,
               arch: str = "sd1") -> np.ndarray:
    """The sigmas a sampler runs over: the schedule (steps + 1 values, ending in 0 except KL Optimal),
    with the sampler's penultimate sigma dropped where the webui drops it.

    Values are rounded to float32 like the webui's float32 schedule tensors, kept as float64.
    """
    if sampler is not None:
        check_steps(sampler, steps)
    elif steps < 1:
        raise SdrtError(f"steps must be at least 1, got {steps}")
    discard = sampler is not None and sampler.discard_penultimate
    sigmas = schedule_sigmas(schedule, steps + 1 if discard else steps, model_sigmas, arch)
    if discard:
        sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])
    return sigmas.astype(np.float32).astype(np.float64)


def timesteps_for(sampler: SamplerInfo, steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The webui's DDIM timesteps for DDIM/PLMS/UniPC: 1, 1 + k, 1 + 2k, ... with k = N // steps."""
    check_steps(sampler, steps)
    steps += 1 if sampler.discard_penultimate else 0
    return np.clip(np.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1, 0, num_train_timesteps - 1)


def infotext_schedule(sampler: str, schedule: str = "Automatic") -> str:
    """The "Schedule type" the webui writes: the schedule used, or "Automatic" where the sampler's
    default is the model's own timesteps (or the sampler has fixed steps)."""
    info, resolved = resolve(sampler, schedule)
    if info.fixed_schedule or (resolved == "Uniform" and info.default_schedule is None
                               and _schedule_name(schedule) == "Automatic" and _norm(sampler) in _names(info)):
        return "Automatic"
    return resolved


def _names(info: SamplerInfo) -> set[str]:
    return {_norm(n) for n in (info.name, *info.aliases)}


def options_infotext(info: SamplerInfo, options: dict) -> dict:
    """The webui's extra generation parameters for sampler options away from their defaults."""
    out = {}
    if "eta" in options and options["eta"] != info.eta_default:
        out[info.eta_infotext_field] = options["eta"]
    for key, label, default in (("s_churn", "Sigma churn", 0.0), ("s_tmin", "Sigma tmin", 0.0),
                                ("s_tmax", "Sigma tmax", float("inf")), ("s_noise", "Sigma noise", 1.0)):
        if key in options and options[key] != default:
            out[label] = options[key]
    return out
