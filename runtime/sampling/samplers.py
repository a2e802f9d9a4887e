"""Samplers: one pure function each, ``sample_<name>(denoise, x, sigmas, *, noise, callback, **options)``.

The k-diffusion family works in sigma space: ``denoise(x, sigma)`` returns the denoised image and
``sigmas`` is the descending schedule. ``noise(sigma, sigma_next)`` returns fresh standard normal
noise shaped like ``x``: the webui's per-image generators, or a Brownian tree for the SDE samplers.
The timestep family (DDIM, DDIM CFG++, PLMS, UniPC) works on the DDPM timesteps: ``eps(x, t)``
returns the predicted noise and ``alphas_cumprod`` is the training schedule.

Scalars (sigmas, step sizes) are Python floats, so float32 latents stay float32 and float64 ones
float64. Each function follows ``k_diffusion.sampling`` (0.1.1) or the webui's own samplers step for
step; where the webui adds a quirk it is named beside the code.
"""

from __future__ import annotations

import math
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


def _t(sigma: float) -> float:
    """Log-SNR time t = -log(sigma) of the DPM-Solver samplers (inf at sigma 0)."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _sigma(t: float) -> float:
    return math.exp(-t)


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, sigma: float, sigma_next: float, n: int, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s stochastic churn: raise the noise level to sigma_hat = sigma * (1 + gamma).

    k-diffusion draws this noise every step, used or not; we draw it every step once churn is on,
    so the webui's noise stream stays aligned, and never when it is off (no effect on the image).
    """
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if s_churn > 0:
        eps = noise(sigma, sigma_next) * s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def sample_euler(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler method, Algorithm 2 of Karras et al. (2022), with optional churn."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigma_next, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigma, sigma_hat, denoised)
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
        _report(callback, x, i, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        # Euler method
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            # Ancestral step: add fresh noise
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_heun(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun's method, Algorithm 2 of Karras et al. (2022), with optional churn."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigma_next, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigma, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            # Euler method
            x = x + d * dt
        else:
            # Heun's method: average the slopes at both ends
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)), the geometric mean as torch's lerp computes it."""
    la, lb = math.log(a), math.log(b)
    return math.exp(lb - (lb - la) * 0.5)


def sample_dpm_2(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """DPM-Solver-2 steps in sigma (Lu et al. 2022) inside Algorithm 2 of Karras et al. (2022)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigma_next, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigma, sigma_hat, denoised)
        if sigma_next == 0:
            # Euler method
            x = x + d * (sigma_next - sigma_hat)
        else:
            # DPM-Solver-2: the slope at the log-midpoint carries the whole step
            sigma_mid = _log_midpoint(sigma_hat, sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigma_next - sigma_hat)
    return x


def sample_dpm_2_ancestral(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with DPM-Solver-2 steps."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        _report(callback, x, i, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            # Euler method
            x = x + d * (sigma_down - sigma)
        else:
            # DPM-Solver-2 down to sigma_down, then fresh noise
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigma)
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order: int, t, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the j-th Lagrange basis polynomial through t_i, t_i-1, ...

    k-diffusion integrates it numerically (scipy quad); the polynomial is integrated exactly here."""
    tj = float(t[i - j])
    coeffs = [1.0]  # ascending powers of tau
    for k in range(order):
        if k == j:
            continue
        tk = float(t[i - k])
        # multiply by (tau - tk) / (tj - tk)
        shifted = [0.0] + coeffs
        coeffs = [(hi - tk * lo) / (tj - tk) for hi, lo in zip(shifted, coeffs + [0.0])]

    def antiderivative(tau):
        return sum(c * tau ** (n + 1) / (n + 1) for n, c in enumerate(coeffs))

    return antiderivative(float(t[i + 1])) - antiderivative(float(t[i]))


def sample_lms(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
               order: int = 4):
    """Linear multistep method (Adams-Bashforth in sigma) of up to ``order`` (k-diffusion)."""
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        ds.append(to_d(x, sigma, denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, sigma, sigma, denoised)
        cur_order = min(i + 1, order)
        # Linear multistep: weighted sum of the last slopes, newest first
        coeffs = [linear_multistep_coeff(cur_order, sigmas, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2s_ancestral(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                              eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (Lu et al. 2022)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        _report(callback, x, i, sigma, sigma, denoised)
        if sigma_down == 0:
            # Euler method
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            # DPM-Solver++(2S): a half step in log-SNR, then the full step from its prediction
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - math.expm1(-h * 0.5) * denoised
            denoised_2 = denoise(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            # Noise addition
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """DPM-Solver++ (stochastic), second order, with ancestral noise at both stages (k-diffusion)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            # Euler method
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Step 1: to the intermediate time s, with its share of noise
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - math.expm1(t - s_) * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = denoise(x_2, _sigma(s))
        # Step 2: the full step with the blended prediction, then its noise
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - math.expm1(t - t_next_) * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


def sample_dpmpp_2m(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None):
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. (2022)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, sigma, denoised)
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            # First-order step (DPM-Solver++ 1 = DDIM)
            x = (_sigma(t_next) / _sigma(t)) * x - math.expm1(-h) * denoised
        else:
            # Second order: extrapolate the prediction from the previous step's
            r = (t - _t(float(sigmas[i - 1]))) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE, with the midpoint or Heun second-order correction (k-diffusion)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            # Denoising step
            x = denoised
        else:
            # DPM-Solver++(2M) SDE: exponential integrator with noise damping eta * h
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = sigma_next / sigma * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_3m_sde(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                        eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE, the third-order multistep SDE solver (k-diffusion)."""
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            # Denoising step
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            # First-order exponential step
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            if h_2 is not None:
                # Third order: first and second divided differences of the predictions
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                # Second order
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ---- DPM-Solver (fast, adaptive) ----------------------------------------------------------------

class _DPMSolver:
    """DPM-Solver-1/2/3 steps in log-SNR time t = -log(sigma) (Lu et al. 2022), as k-diffusion's.

    k-diffusion keeps t and the step coefficients in 0-dim tensors of torch's default dtype
    (float32 in the webui); here they are float64 Python floats (see docs/DIFFERENCES.md).
    """

    def __init__(self, denoise: Denoise, callback: Callback | None):
        self.denoise = denoise
        self.callback = callback

    def eps(self, cache: dict, key: str, x, t: float):
        if key not in cache:
            cache[key] = (x - self.denoise(x, _sigma(t))) / _sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - _sigma(t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
              - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)

    def report(self, x, i, t, t_up, denoised, **extra):
        if self.callback is not None:
            self.callback({"x": x, "i": i, "sigma": _sigma(t), "sigma_hat": _sigma(t_up), "denoised": denoised, **extra})


def _ancestral_t(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """The ancestral split of a DPM-Solver step: the time to solve to and the noise to add."""
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = min(t_end, _t(sd))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


def _linspace(start: float, end: float, steps: int, dtype=np.float64) -> list[float]:
    """torch.linspace's arithmetic (the first half from start, the second from end) in ``dtype``."""
    start, end = dtype(start), dtype(end)
    if steps == 1:
        return [float(start)]
    step = (end - start) / dtype(steps - 1)
    return [float(start + step * dtype(i)) if i < steps // 2 else float(end - step * dtype(steps - i - 1))
            for i in range(steps)]


def _dpm_range(sigmas, sigma_min, sigma_max) -> tuple[float, float]:
    sigmas = np.asarray(sigmas, dtype=np.float64)
    sigma_max = float(sigmas[0]) if sigma_max is None else float(sigma_max)
    sigma_min = float(sigmas[sigmas > 0].min()) if sigma_min is None else float(sigma_min)
    return _t(sigma_max), _t(sigma_min)


def sample_dpm_fast(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                    eta: float = 0.0, s_noise: float = 1.0, sigma_min: float | None = None,
                    sigma_max: float | None = None):
    """DPM-Solver-Fast (Lu et al. 2022): fixed steps of order 3, 3, ..., 2/1 for len(sigmas) - 1 evaluations.

    Of ``sigmas`` only the length is used, and the ends unless ``sigma_min``/``sigma_max`` are
    given (the webui passes the model's), like k-diffusion's ``sample_dpm_fast(sigma_min, sigma_max, n)``.
    """
    nfe = len(sigmas) - 1
    t_start, t_end = _dpm_range(sigmas, sigma_min, sigma_max)
    solver = _DPMSolver(denoise, callback)
    m = nfe // 3 + 1
    ts = _linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_t(t, t_next, t_end, eta) if eta else (t_next, 0.0)
        eps = solver.eps(cache, "eps", x, t)
        solver.report(x, i, t, t, x - _sigma(t) * eps)
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, t_next_, cache)
        if eta:
            # Ancestral noise for the part of the step not solved
            x = x + su * s_noise * noise(_sigma(t), _sigma(t_next))
    return x


def sample_dpm_adaptive(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0, sigma_min: float | None = None,
                        sigma_max: float | None = None):
    """DPM-Solver-12/23 with adaptive step size (Lu et al. 2022) and k-diffusion's PID controller.

    Only the ends of ``sigmas`` (or ``sigma_min``/``sigma_max``) are used; the number of steps
    follows from the error control.
    """
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    t_start, t_end = _dpm_range(sigmas, sigma_min, sigma_max)
    solver = _DPMSolver(denoise, callback)
    pid = _PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, steps, n_accept, n_reject, nfe = t_start, x, 0, 0, 0, 0
    while s < t_end - 1e-5:
        cache: dict = {}
        t = min(t_end, s + pid.h)
        t_, su = _ancestral_t(s, t, t_end, eta) if eta else (t, 0.0)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        # A lower- and a higher-order solution; their difference is the error estimate
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
        error = float(np.linalg.norm(((x_low - x_high) / delta).ravel()) / x.size ** 0.5)
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise(_sigma(s), _sigma(t)) if eta else x_high
            s = t
            n_accept += 1
        else:
            n_reject += 1
        nfe += order
        steps += 1
        solver.report(x, steps - 1, s, s, denoised, error=error, h=pid.h, steps=steps, nfe=nfe,
                      n_accept=n_accept, n_reject=n_reject)
    return x


class _PIDStepSizeController:
    """PID control of the log-SNR step size h from the inverse error (k-diffusion)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


# ---- webui samplers outside k-diffusion ---------------------------------------------------------

def restart_steps(sigmas) -> list[tuple[float, float]]:
    """The webui's Restart schedule (Xu et al. 2023): its (from, to) sigma pairs, restarts included.

    From 20 steps on, the main schedule is rebuilt as Karras over fewer steps and one (from 36
    steps: two) restart segments of Karras steps from sigma ~2 down to ~0.1 are inserted.
    """
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    restart_list: dict = {}
    if steps >= 20:
        restart_steps_, restart_times = 9, 1
        if steps >= 36:
            restart_steps_, restart_times = steps // 4, 2
        # The webui computes these Karras sigmas in float32 (torch.linspace)
        sigmas = [float(s) for s in _float32_karras(steps - restart_steps_ * restart_times, sigmas[-2], sigmas[0])]
        restart_list = {0.1: [restart_steps_ + 1, restart_times, 2]}
    nearest = lambda v: int(np.argmin([abs(s - v) for s in sigmas]))  # noqa: E731
    restart_list = {nearest(k): v for k, v in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            n_restart, times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, nearest(restart_max)
            if max_idx < min_idx:
                sigma_restart = [float(s) for s in _float32_karras(n_restart, sigmas[min_idx], sigmas[max_idx])[:-1]]
                pairs.extend(list(zip(sigma_restart[:-1], sigma_restart[1:])) * times)
    return pairs


def _float32_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """k-diffusion's get_sigmas_karras as torch computes it, in float32."""
    ramp = np.array(_linspace(0.0, 1.0, n, np.float32), dtype=np.float32)
    min_inv_rho = np.float32(sigma_min ** (1 / rho))
    max_inv_rho = np.float32(sigma_max ** (1 / rho))
    return np.append((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** np.float32(rho), np.float32(0.0))


def sample_restart(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None,
                   s_noise: float = 1.0):
    """Restart sampling (Xu et al. 2023) with Heun steps, as the webui's ``restart_sampler``."""
    last_sigma = None
    for i, (old_sigma, new_sigma) in enumerate(restart_steps(sigmas)):
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            # Restart: renoise from last_sigma back up to old_sigma
            x = x + noise(last_sigma, old_sigma) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        denoised = denoise(x, old_sigma)
        d = to_d(x, old_sigma, denoised)
        _report(callback, x, i, new_sigma, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            # Euler method
            x = x + d * dt
        else:
            # Heun's method
            x_2 = x + d * dt
            d_2 = to_d(x_2, new_sigma, denoise(x_2, new_sigma))
            x = x + (d + d_2) / 2 * dt
        last_sigma = new_sigma
    return x


def sample_lcm(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the prediction, renoise to the next sigma.

    ``denoise`` must be the consistency-model denoiser (``denoiser.LCMDenoiser``), as the webui's.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * noise(sigma, sigma_next)
    return x


# ---- timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) ------------------------------------------

EpsModel = Callable[[np.ndarray, float], np.ndarray]


def _ddim_alphas(timesteps, alphas_cumprod):
    """abar at each timestep and at the one before it (abar_0 for the first), in float64."""
    ac = np.asarray(alphas_cumprod)
    ts = np.asarray(timesteps, dtype=np.int64)
    return ac[ts].astype(np.float64), ac[np.concatenate([[0], ts[:-1]])].astype(np.float64)


def _ddim(eps_model: EpsModel, x, timesteps, alphas_cumprod, noise, callback, eta, direction):
    """The webui's DDIM loop; ``direction(e_t)`` is the noise that points back to x_t."""
    alphas, alphas_prev = _ddim_alphas(timesteps, alphas_cumprod)
    # DDIM's sigma_t: eta = 1 is DDPM's posterior noise
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    sqrt_one_minus = np.sqrt(1 - alphas.astype(np.float32)).astype(np.float64)
    n = len(timesteps)
    for i in range(n - 1):
        index = n - 1 - i
        e_t = eps_model(x, float(timesteps[index]))
        a_t, a_prev, sigma_t = float(alphas[index]), float(alphas_prev[index]), float(sigmas[index])
        # Predicted x0, the direction to x_t, and (eta > 0) fresh noise
        pred_x0 = (x - float(sqrt_one_minus[index]) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1.0 - a_prev - sigma_t**2) * direction(e_t)
        x = math.sqrt(a_prev) * pred_x0 + dir_xt
        if sigma_t > 0:
            x = x + sigma_t * noise(0.0, 0.0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


def sample_ddim(eps_model: EpsModel, x, timesteps, *, alphas_cumprod, noise: Noise | None = None,
                callback: Callback | None = None, eta: float = 0.0):
    """DDIM (Song et al. 2021) over ascending ``timesteps``, from the last down, as the webui's ``ddim``.

    Webui quirk kept: the loop makes len(timesteps) - 1 steps, from timesteps[-1] down to
    timesteps[0] (the first timestep is the target, never a model input).
    """
    return _ddim(eps_model, x, timesteps, alphas_cumprod, noise, callback, eta, lambda e_t: e_t)


def sample_ddim_cfgpp(eps_model: EpsModel, x, timesteps, *, alphas_cumprod, noise: Noise | None = None,
                      callback: Callback | None = None, eta: float = 0.0):
    """DDIM with CFG++ (Chung et al. 2024), as the webui's ``ddim_cfgpp``: x0 from the guided noise,
    the step back to x_t along the unconditional noise of the same model call.

    ``eps_model`` is a ``CFGDenoiser``: the sampler sets its ``keep_uncond`` and reads its
    ``last_uncond``. The webui also divides the CFG scale by 12.5 (the registry's
    ``cfg_scale_multiplier``); that is the caller's part, as the guidance is built before sampling.
    """
    if not hasattr(eps_model, "last_uncond"):
        raise TypeError("DDIM CFG++ needs a CFG model that keeps its unconditional prediction (CFGDenoiser)")
    eps_model.keep_uncond = True
    return _ddim(eps_model, x, timesteps, alphas_cumprod, noise, callback, eta, lambda e_t: eps_model.last_uncond)


def sample_plms(eps_model: EpsModel, x, timesteps, *, alphas_cumprod, noise: Noise | None = None,
                callback: Callback | None = None):
    """PLMS, the pseudo linear multistep method of Liu et al. (2022), as the LDM / webui ``plms``."""
    alphas, alphas_prev = _ddim_alphas(timesteps, alphas_cumprod)
    sqrt_one_minus = np.sqrt(1 - alphas.astype(np.float32)).astype(np.float64)
    n = len(timesteps)
    old_eps: list = []

    def step(x, e_t, index):
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        pred_x0 = (x - float(sqrt_one_minus[index]) * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * e_t, pred_x0

    for i in range(n - 1):
        index = n - 1 - i
        e_t = eps_model(x, float(timesteps[index]))
        if not old_eps:
            # Pseudo improved Euler (2nd order) for the first step
            x_prev, _ = step(x, e_t, index)
            e_t_next = eps_model(x_prev, float(timesteps[max(index - 1, 0)]))
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            # 2nd order pseudo linear multistep (Adams-Bashforth)
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            # 3rd order
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            # 4th order
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = step(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


class _VPSchedule:
    """The continuous-time VP view of a discrete DDPM schedule (UniPC's ``NoiseScheduleVP('discrete')``):
    log alpha_t piecewise linear in t over t_n = n / N."""

    def __init__(self, alphas_cumprod):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        self.total_n = len(ac)
        self.t_array = np.linspace(0.0, 1.0, self.total_n + 1)[1:]
        self.log_alpha_array = 0.5 * np.log(ac)

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self.t_array, self.log_alpha_array,
                               left=None, right=None)) if self.t_array[0] <= t <= 1.0 else self._extrapolate(t)

    def _extrapolate(self, t: float) -> float:
        i = 0 if t < self.t_array[0] else -2
        x0, x1 = self.t_array[i], self.t_array[i + 1]
        y0, y1 = self.log_alpha_array[i], self.log_alpha_array[i + 1]
        return float(y0 + (t - x0) * (y1 - y0) / (x1 - x0))

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def std(self, t: float) -> float:
        return math.sqrt(1.0 - math.exp(2.0 * self.log_alpha(t)))

    def lam(self, t: float) -> float:
        """lambda_t = log(alpha_t / sigma_t), the half log-SNR."""
        la = self.log_alpha(t)
        return la - 0.5 * math.log(1.0 - math.exp(2.0 * la))

    def inverse_lambda(self, lam: float) -> float:
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        return float(np.interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1]))


def unipc_times(vp: _VPSchedule, steps: int, skip_type: str = "time_uniform") -> list[float]:
    """UniPC's continuous times from t_T = 1 down to t_0 = 1 / N (``get_time_steps``)."""
    t_T, t_0 = 1.0, 1.0 / vp.total_n
    if skip_type == "logSNR":
        lams = np.linspace(vp.lam(t_T), vp.lam(t_0), steps + 1)
        return [vp.inverse_lambda(float(v)) for v in lams]
    if skip_type == "time_uniform":
        return [float(v) for v in np.linspace(t_T, t_0, steps + 1)]
    if skip_type == "time_quadratic":
        return [float(v) for v in np.linspace(t_T**0.5, t_0**0.5, steps + 1) ** 2]
    raise ValueError(f"unknown UniPC skip type {skip_type!r}")


def sample_unipc(eps_model: EpsModel, x, timesteps, *, alphas_cumprod, noise: Noise | None = None,
                 callback: Callback | None = None, order: int = 3, variant: str = "bh1",
                 skip_type: str = "time_uniform", lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023): multistep predictor-corrector on the data prediction, as the webui's.

    Makes len(timesteps) steps in continuous time (the webui passes its DDIM timesteps only for
    their count); the model sees the fractional timesteps (t - 1/N) * N.
    """
    vp = _VPSchedule(alphas_cumprod)
    steps = len(timesteps)
    if steps < order:
        raise ValueError(f"UniPC order {order} needs at least {order} steps, got {steps}")
    ts = unipc_times(vp, steps, skip_type)
    index = 0

    def model_x0(x, t):
        # Data prediction from the noise prediction: x0 = (x - sigma_t eps) / alpha_t
        eps = eps_model(x, (t - 1.0 / vp.total_n) * vp.total_n)
        return (x - vp.std(t) * eps) / vp.alpha(t)

    def update(x, model_prev, t_prev, t, order, use_corrector):
        lam_prev_0, lam_t = vp.lam(t_prev[-1]), vp.lam(t)
        m0 = model_prev[-1]
        sigma_prev_0, sigma_t, alpha_t = vp.std(t_prev[-1]), vp.std(t), vp.alpha(t)
        h = lam_t - lam_prev_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = (vp.lam(t_prev[-(i + 1)]) - lam_prev_0) / h
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        rks_arr = np.array(rks)
        hh = -h  # data prediction
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else math.expm1(hh)
        factorial_i = 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(rks_arr ** (i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat, b = np.stack(rows), np.array(b)
        # Predictor (UniP): the B(h) expansion's coefficients for the earlier differences
        x_t_ = sigma_t / sigma_prev_0 * x - alpha_t * h_phi_1 * m0
        if d1s:
            rhos_p = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
            pred_res = sum(float(r) * d for r, d in zip(rhos_p, d1s))
            x_t = x_t_ - alpha_t * b_h * pred_res
        else:
            x_t = x_t_
        model_t = None
        if use_corrector:
            # Corrector (UniC): refit with the model's prediction at the new point
            rhos_c = [0.5] if order == 1 else np.linalg.solve(r_mat, b)
            model_t = model_x0(x_t, t)
            corr_res = sum(float(r) * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
            x_t = x_t_ - alpha_t * b_h * (corr_res + float(rhos_c[-1]) * (model_t - m0))
        return x_t, model_t

    def report(x, model_x):
        nonlocal index
        if callback is not None:
            # After the last step there is no new prediction: report the result itself
            callback({"x": x, "i": index, "sigma": 0, "sigma_hat": 0, "denoised": x if model_x is None else model_x})
        index += 1

    t_prev = [ts[0]]
    model_prev = [model_x0(x, ts[0])]
    # Warm-up: the first order - 1 steps at increasing order
    for step in range(1, order):
        x, model_x = update(x, model_prev, t_prev, ts[step], step, use_corrector=True)
        report(x, model_x)
        t_prev.append(ts[step])
        model_prev.append(model_x if model_x is not None else model_x0(x, ts[step]))
    for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        # No corrector after the last step: it would cost a model call for nothing
        x, model_x = update(x, model_prev, t_prev, ts[step], step_order, use_corrector=step != steps)
        report(x, model_x)
        t_prev = t_prev[1:] + [ts[step]]
        if step < steps:
            model_prev = model_prev[1:] + [model_x if model_x is not None else model_x0(x, ts[step])]
    return x
