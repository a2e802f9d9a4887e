"""Sampling: the webui's samplers and schedules by name (``registry``), the sampler functions
(``samplers``: k-diffusion and timestep families), schedules, the denoiser wrappers and the noise
sources (``noise``: the webui's seeds, Brownian trees). The package's names are the registry's."""

from sdrt.runtime.sampling.registry import (
                                            SAMPLERS,
                                            SCHEDULES,
                                            SamplerInfo,
                                            check_steps,
                                            infotext_schedule,
                                            options_infotext,
                                            resolve,
                                            sampler_options,
                                            schedule_sigmas,
                                            sigmas_for,
                                            timesteps_for,
)

__all__ = ["SAMPLERS", "SCHEDULES", "SamplerInfo", "check_steps", "infotext_schedule", "options_infotext", "resolve",
           "sampler_options", "schedule_sigmas", "sigmas_for", "timesteps_for"]
