"""Samplers: one pure function each, ``sample_<name>(denoise, x, sigmas, *, noise, callback)``.

``denoise(x, sigma)`` returns the denoised image; ``noise(sigma, sigma_next)`` returns fresh
standard normal noise shaped like ``x`` (the per-image generators of the webui). Sigma values
are used as Python floats so float32 latents stay float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Noise = Callable[[float, float], np.ndarray]
Callback = Callable[[dict], None]


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_to into a deterministic step down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_euler(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler method, Algorithm 2 of Karras et al. (2022), with optional churn."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            # Churn: raise the noise level to sigma_hat
            x = x + noise(sigma, sigma_next) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
        # Euler method
        x = x + d * (sigma_next - sigma_hat)
    return x


def sample_euler_ancestral(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with Euler method steps."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        d = to_d(x, sigma, denoised)
        # Euler method
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            # Ancestral step: add fresh noise
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x
