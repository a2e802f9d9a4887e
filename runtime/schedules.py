"""Noise schedules: pure functions returning descending sigmas that end in 0 (k-diffusion style)."""

from __future__ import annotations

import numpy as np


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   beta_schedule: str = "scaled_linear") -> np.ndarray:
    """The DDPM training schedule as the LDM code registers it: computed in float64, stored in float32."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
    return np.cumprod(1.0 - betas).astype(np.float32)


def model_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), ascending with t, in float32 like k-diffusion's buffer."""
    ac = alphas_cumprod.astype(np.float32)
    return (((1 - ac) / ac) ** 0.5).astype(np.float32)


def t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep -> sigma by linear interpolation of log sigma (k-diffusion DiscreteSchedule)."""
    t = np.asarray(t, dtype=np.float64)
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Sigma -> fractional timestep, the inverse interpolation (no quantisation, the webui default)."""
    log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
    dists = log_sigma[None] - log_sigmas[:, None]
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, len(log_sigmas) - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * high


def get_sigmas_uniform(n: int, sigmas: np.ndarray) -> np.ndarray:
    """n sigmas at evenly spaced (fractional) training timesteps from the last to 0, plus 0."""
    log_sigmas = np.log(sigmas.astype(np.float64))
    t = np.linspace(len(sigmas) - 1, 0, n)
    return np.append(t_to_sigma(t, log_sigmas), 0.0)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return np.append((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, 0.0)
