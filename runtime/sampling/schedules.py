"""Noise schedules: pure functions returning descending sigmas that end in 0 (k-diffusion style)."""

from __future__ import annotations

import math

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


class DiscreteSchedule:
    """The sigma <-> timestep map of a denoiser over a discrete sigma table (k-diffusion's
    ``DiscreteSchedule``); the schedules that need "the model" take one of these.

    ``t = index * t_scale + t_offset``: the standard DDPM models have scale 1 and offset 0; the
    webui's LCM denoiser keeps every 20th sigma of the 1000 and numbers them 19, 39, ... 999, and
    maps a sigma to the nearest of those timesteps (``quantize``).
    """

    def __init__(self, sigmas: np.ndarray, t_scale: int = 1, t_offset: int = 0, quantize: bool = False):
        self.sigmas = np.asarray(sigmas, dtype=np.float32)
        self.log_sigmas = np.log(self.sigmas.astype(np.float64))
        self.t_scale, self.t_offset, self.quantize = t_scale, t_offset, quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def t_max(self) -> float:
        return (len(self.sigmas) - 1) * self.t_scale + self.t_offset

    def sigma_to_t(self, sigma) -> np.ndarray:
        if self.quantize:
            log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
            idx = np.abs(log_sigma[None] - self.log_sigmas.reshape((-1,) + (1,) * np.ndim(log_sigma))).argmin(0)
            return idx * self.t_scale + self.t_offset
        return sigma_to_t(sigma, self.log_sigmas) * self.t_scale + self.t_offset

    def t_to_sigma(self, t) -> np.ndarray:
        idx = np.clip((np.asarray(t, dtype=np.float64) - self.t_offset) / self.t_scale, 0, len(self.sigmas) - 1)
        return t_to_sigma(idx, self.log_sigmas)


def get_sigmas_uniform(n: int, model: DiscreteSchedule) -> np.ndarray:
    """n sigmas at evenly spaced (fractional) model timesteps from the last to the first, plus 0
    (k-diffusion's ``DiscreteSchedule.get_sigmas``, the webui's "Uniform" and "Automatic")."""
    t = np.linspace(model.t_max, model.t_offset, n)
    return np.append(model.t_to_sigma(t), 0.0)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return np.append((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, 0.0)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in log sigma."""
    return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), 0.0)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """Log sigma as a polynomial (power rho) of the step ramp (k-diffusion)."""
    ramp = np.linspace(1, 0, n) ** rho
    return np.append(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)), 0.0)


def get_sigmas_sgm_uniform(n: int, model: DiscreteSchedule) -> np.ndarray:
    """Evenly spaced timesteps from the last, n of n + 1 (the last one dropped), plus 0 (SGM / SDXL)."""
    start = float(model.sigma_to_t(np.array([model.sigma_max]))[0])
    end = float(model.sigma_to_t(np.array([model.sigma_min]))[0])
    return np.append(model.t_to_sigma(np.linspace(start, end, n + 1)[:-1]), 0.0)


def get_sigmas_normal(n: int, model: DiscreteSchedule) -> np.ndarray:
    """Evenly spaced timesteps between those of the model's sigma_max and sigma_min, plus 0
    (ComfyUI's "normal"; with the model's own range it equals Uniform)."""
    start = float(model.sigma_to_t(np.array([model.sigma_max]))[0])
    end = float(model.sigma_to_t(np.array([model.sigma_min]))[0])
    return np.append(model.t_to_sigma(np.linspace(start, end, n)), 0.0)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """KL-optimal schedule of Sabour et al. (2024), evenly spaced in arctan(sigma).

    n + 1 values ending at sigma_min, NOT 0: the webui samples down to sigma_min with it."""
    alpha_min, alpha_max = math.atan(sigma_min), math.atan(sigma_max)
    i = np.arange(n + 1) / n
    return np.tan(i * alpha_min + (1.0 - i) * alpha_max)


# Align Your Steps (Sabour et al. 2024), NVIDIA's published 10-step sigmas per model family
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def get_sigmas_align_your_steps(n: int, arch: str = "sd1") -> np.ndarray:
    """Align Your Steps: the published 11 sigmas, log-linearly interpolated to n when n != 11.

    SDXL models get the SDXL list, every other architecture the SD 1.5 one (as the webui)."""
    table = np.array(AYS_SIGMAS["sdxl" if arch == "sdxl" else "sd1"])
    if n == len(table):
        return np.append(table, 0.0)
    # Log-linear interpolation over [0, 1] of the reversed (ascending) list
    ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
    return np.append(np.exp(ys)[::-1], 0.0)


def get_sigmas_simple(n: int, model: DiscreteSchedule) -> np.ndarray:
    """Every (len / n)-th sigma of the model's table from the top (ComfyUI's "simple"), plus 0."""
    ss = len(model.sigmas) / n
    return np.append([float(model.sigmas[-(1 + int(x * ss))]) for x in range(n)], 0.0)


def get_sigmas_ddim(n: int, model: DiscreteSchedule) -> np.ndarray:
    """The DDIM timesteps 1, 1 + k, 1 + 2k, ... (k = len // n) as sigmas, descending, plus 0.

    Like the webui (and DDIM's "leading" spacing) this gives more than n steps when n does not
    divide the table length."""
    ss = max(len(model.sigmas) // n, 1)
    return np.append(model.sigmas[1::ss][::-1].astype(np.float64), 0.0)


def get_sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Beta schedule of Lee et al. (2024): sigmas at the Beta(alpha, beta) quantiles of a ramp."""
    ppf = [beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return np.append([sigma_min + x * (sigma_max - sigma_min) for x in ppf], 0.0)


def _betainc(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)  # the fraction converges fast on this side
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of the Beta(a, b) distribution, by bisection of ``_betainc`` to float64."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
