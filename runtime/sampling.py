"""The webui's sampler and schedule names, resolved to sampler functions and sigma schedules.

Names, aliases and per-sampler defaults follow the AUTOMATIC1111 webui (``sd_samplers_kdiffusion``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime import samplers, schedules
from sdrt.runtime.errors import SdrtError


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    fn: Callable
    aliases: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    default_schedule: str | None = None  # the schedule "Automatic" means for this sampler
    ancestral: bool = False  # draws fresh noise each step: ENSD applies


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo("Euler", samplers.sample_euler, ("k_euler",)),
        # The webui's eta for ancestral samplers defaults to 1.0 (opts.eta_ancestral)
        SamplerInfo("Euler a", samplers.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"),
                    {"eta": 1.0, "s_noise": 1.0}, ancestral=True),
    )
}

SCHEDULES = ("Automatic", "Uniform", "Karras")


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().split())


def resolve(sampler: str, schedule: str = "Automatic") -> tuple[SamplerInfo, str]:
    """(sampler, schedule) from webui names, old combined names like ``Euler Karras`` included."""
    by_name = {}
    for info in SAMPLERS.values():
        for alias in (info.name, *info.aliases):
            by_name[_norm(alias)] = info
    key = _norm(sampler)
    info = by_name.get(key)
    if info is None:
        for sched in SCHEDULES[1:]:
            suffix = " " + _norm(sched)
            if key.endswith(suffix) and key[: -len(suffix)] in by_name:
                info, schedule = by_name[key[: -len(suffix)]], sched
                break
    if info is None:
        raise SdrtError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    schedules_by_name = {_norm(s): s for s in SCHEDULES}
    if _norm(schedule) not in schedules_by_name:
        raise SdrtError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    schedule = schedules_by_name[_norm(schedule)]
    if schedule == "Automatic":
        schedule = info.default_schedule or "Uniform"
    return info, schedule


def sigmas_for(schedule: str, steps: int, model_sigmas: np.ndarray) -> np.ndarray:
    """The sigma schedule, steps + 1 values ending in 0, over the model's sigma range."""
    if steps < 1:
        raise SdrtError(f"steps must be at least 1, got {steps}")
    if schedule == "Uniform":
        return schedules.get_sigmas_uniform(steps, model_sigmas)
    if schedule == "Karras":
        # The webui takes sigma_min/max from the model (not k-diffusion's old 0.1 / 10)
        return schedules.get_sigmas_karras(steps, float(model_sigmas[0]), float(model_sigmas[-1]))
    raise SdrtError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
