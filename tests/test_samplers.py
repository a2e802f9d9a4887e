"""Every k-diffusion-family sampler against ``k_diffusion.sampling`` 0.1.1 in float64.

The reference module is loaded from the installed ``k-diffusion`` wheel without running the
package's ``__init__`` (which pulls in torchvision and friends): a private package holding
k-diffusion's ``sampling.py`` and a two-function stand-in for its ``utils``. The webui drives
k-diffusion's own ``torch.randn_like`` through a shim (``TorchHijack``); we do the same, so both
sides see one noise stream. SDE samplers use k-diffusion's ``BrownianTreeNoiseSampler`` (torchsde)
on one side and ``sdrt.runtime.sampling.noise.BrownianTreeNoise`` on the other: exact, not in distribution.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime import sampling
from sdrt.runtime.sampling import samplers
from sdrt.runtime.sampling.noise import BrownianTreeNoise

torch = pytest.importorskip("torch")
pytest.importorskip("scipy", reason="k-diffusion's LMS reference integrates with scipy")
pytest.importorskip("torchsde", reason="k-diffusion's SDE samplers need torchsde")

RTOL = 1e-6


def load_k_diffusion_sampling():
    """k_diffusion/sampling.py from the installed wheel, without the package's heavy __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    root = Path(list(spec.submodule_search_locations)[0])
    name = "_sdrt_kdiffusion_ref"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    utils.append_zero = lambda x: torch.cat([x, x.new_zeros([1])])
    saved = {k: sys.modules.get(k) for k in ("torchdiffeq",)}
    sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    if importlib.util.find_spec("torchdiffeq") is None:
        # only log_likelihood uses it
        sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    try:
        mod_spec = importlib.util.spec_from_file_location(f"{name}.sampling", root / "sampling.py")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


class NoiseStream:
    """The same pre-drawn noises, in order, for both sides (the webui's per-image generator)."""

    def __init__(self, shape, seed=0, n=400):
        g = torch.Generator().manual_seed(seed)
        self.noises = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
        self.i = 0

    def torch_next(self, *args):
        self.i += 1
        return self.noises[self.i - 1].clone()

    def numpy_next(self, *args):
        self.i += 1
        return self.noises[self.i - 1].numpy().copy()


class TorchShim:
    """Stands in for ``torch`` inside k-diffusion, as the webui's TorchHijack, to feed randn_like."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return self.stream.torch_next()


def analytic_denoiser(lib):
    """A smooth nonlinear D(x, sigma): the Gaussian-data optimum plus a sine term."""
    mu, s2 = 0.3, 0.25

    def denoise(x, sigma):
        sigma = float(sigma.reshape(-1)[0]) if hasattr(sigma, "reshape") else float(sigma)
        gauss = (s2 * x + sigma**2 * mu) / (s2 + sigma**2)
        return gauss + lib.sin(3 * x) * (0.1 / (1 + sigma))
    return denoise


SHAPE = (2, 4, 8, 8)


def sigma_table():
    from sdrt.runtime.sampling.schedules import alphas_cumprod, model_sigmas

    return model_sigmas(alphas_cumprod())


def karras(n):
    table = sigma_table()
    return sampling.schedule_sigmas("Karras", n, table)


def run_both(kd, monkeypatch, name, kd_fn, sigmas, x0, *, kd_kwargs=None, our_kwargs=None, brownian=False,
             seeds=(11, 12)):
    """(k-diffusion's result, ours) for one sampler, on identical inputs and noise."""
    kd_kwargs, our_kwargs = dict(kd_kwargs or {}), dict(our_kwargs or {})
    stream = NoiseStream(SHAPE)
    monkeypatch.setattr(kd, "torch", TorchShim(stream))
    t_sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float64))
    x_t = torch.from_numpy(x0.copy())
    if brownian:
        smin, smax = t_sigmas[t_sigmas > 0].min(), t_sigmas.max()
        kd_kwargs["noise_sampler"] = kd.BrownianTreeNoiseSampler(x_t, smin, smax, seed=list(seeds))
        noise = BrownianTreeNoise(SHAPE[1:], list(seeds), float(smin), float(smax), dtype=np.float64)
    else:
        noise = stream.numpy_next
    # k-diffusion's DPM-Solver makes its times with torch.tensor(float): float64 with this default
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = kd_fn(analytic_denoiser(torch), x_t, t_sigmas, disable=True, **kd_kwargs).numpy()
    finally:
        torch.set_default_dtype(default)
    monkeypatch.setattr(kd, "torch", torch)
    stream.i = 0
    ours = SAMPLER_FN[name](analytic_denoiser(np), x0.copy(), np.asarray(sigmas, dtype=np.float64), noise=noise,
                            **our_kwargs)
    return ref, ours


SAMPLER_FN = {info.name: info.fn for info in sampling.SAMPLERS.values()}


def assert_close(ref, ours, rtol=RTOL):
    err = np.max(np.abs(ref - ours)) / np.max(np.abs(ref))
    assert ours.dtype == np.float64 and err <= rtol, f"relative max abs error {err:.3g}"
    return err


def x_init(sigma_max, seed=5):
    return np.random.default_rng(seed).standard_normal(SHAPE) * sigma_max


# (webui name, k-diffusion function, k-diffusion kwargs, our kwargs, brownian, schedule steps)
CASES = [
    ("Euler", "sample_euler", {}, {}, False),
    ("Euler a", "sample_euler_ancestral", {"eta": 1.0}, {"eta": 1.0}, False),
    ("LMS", "sample_lms", {}, {}, False),
    ("Heun", "sample_heun", {}, {}, False),
    ("DPM2", "sample_dpm_2", {}, {}, False),
    ("DPM2 a", "sample_dpm_2_ancestral", {"eta": 1.0}, {"eta": 1.0}, False),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", {"eta": 1.0}, {"eta": 1.0}, False),
    ("DPM++ 2M", "sample_dpmpp_2m", {}, {}, False),
    ("DPM++ SDE", "sample_dpmpp_sde", {"eta": 1.0}, {"eta": 1.0}, True),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {"eta": 1.0}, {"eta": 1.0}, True),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"},
     {"eta": 1.0, "solver_type": "heun"}, True),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {"eta": 1.0}, {"eta": 1.0}, True),
]


@pytest.mark.parametrize("name, kd_name, kd_kwargs, our_kwargs, brownian", CASES, ids=[c[0] for c in CASES])
def test_matches_k_diffusion(kd, monkeypatch, name, kd_name, kd_kwargs, our_kwargs, brownian):
    sigmas = karras(12)
    ref, ours = run_both(kd, monkeypatch, name, getattr(kd, kd_name), sigmas, x_init(sigmas[0]),
                         kd_kwargs=kd_kwargs, our_kwargs=our_kwargs, brownian=brownian)
    assert_close(ref, ours)


@pytest.mark.parametrize("name, kd_name", [("Euler", "sample_euler"), ("Heun", "sample_heun"), ("DPM2", "sample_dpm_2")])
def test_churn_matches_k_diffusion(kd, monkeypatch, name, kd_name):
    """Churn noise comes from k-diffusion's own torch.randn_like (the webui's hijacked generator)."""
    sigmas = karras(10)
    opts = {"s_churn": 1.5, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.003}
    ref, ours = run_both(kd, monkeypatch, name, getattr(kd, kd_name), sigmas, x_init(sigmas[0]),
                         kd_kwargs=opts, our_kwargs=opts)
    assert_close(ref, ours)


@pytest.mark.parametrize("eta, s_noise", [(0.0, 1.0), (0.5, 1.1)])
def test_ancestral_options(kd, monkeypatch, eta, s_noise):
    sigmas = sampling.schedule_sigmas("Exponential", 9, sigma_table())
    for name, kd_name in (("Euler a", "sample_euler_ancestral"), ("DPM++ 2S a", "sample_dpmpp_2s_ancestral")):
        opts = {"eta": eta, "s_noise": s_noise}
        ref, ours = run_both(kd, monkeypatch, name, getattr(kd, kd_name), sigmas, x_init(sigmas[0]),
                             kd_kwargs=opts, our_kwargs=opts)
        assert_close(ref, ours)


@pytest.mark.parametrize("n", [1, 5, 9, 10])
def test_dpm_fast(kd, monkeypatch, n):
    table = sigma_table()
    sigmas = sampling.schedule_sigmas("Uniform", n, table)
    smin, smax = float(table[0]), float(table[-1])
    x0 = x_init(smax)
    ref, ours = run_both(
        kd, monkeypatch, "DPM fast", lambda m, x, s, **kw: kd.sample_dpm_fast(m, x, smin, smax, n, **kw), sigmas, x0,
        kd_kwargs={"eta": 1.0}, our_kwargs={"eta": 1.0, "sigma_min": smin, "sigma_max": smax})
    assert_close(ref, ours)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive(kd, monkeypatch, eta):
    table = sigma_table()
    sigmas = sampling.schedule_sigmas("Uniform", 4, table)
    smin, smax = float(table[0]), float(table[-1])
    ref, ours = run_both(
        kd, monkeypatch, "DPM adaptive", lambda m, x, s, **kw: kd.sample_dpm_adaptive(m, x, smin, smax, **kw),
        sigmas, x_init(smax), kd_kwargs={"eta": eta, "rtol": 0.02},
        our_kwargs={"eta": eta, "rtol": 0.02, "sigma_min": smin, "sigma_max": smax})
    assert_close(ref, ours)


def test_lms_coefficients_match_scipy_quad(kd):
    sigmas = karras(8)
    for i in range(7):
        order = min(i + 1, 4)
        for j in range(order):
            want = kd.linear_multistep_coeff(order, sigmas, i, j)
            assert samplers.linear_multistep_coeff(order, sigmas, i, j) == pytest.approx(want, rel=1e-12, abs=1e-14)


def webui_restart_reference(kd, model, x, sigmas, noise):
    """The webui's restart_sampler, assembled from k-diffusion's Karras schedule and Heun sampler."""
    steps = len(sigmas) - 1
    restart = None
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = kd.get_sigmas_karras(steps - restart_steps * times, sigmas[-2].item(), sigmas[0].item())
        restart = (int(torch.argmin(abs(sigmas - 0.1))), restart_steps + 1, times, 2)
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if restart and i + 1 == restart[0]:
            max_idx = int(torch.argmin(abs(sigmas - restart[3])))
            if max_idx < restart[0]:
                sr = kd.get_sigmas_karras(restart[1], sigmas[restart[0]].item(), sigmas[max_idx].item())[:-1]
                pairs += list(zip(sr[:-1], sr[1:])) * restart[2]
    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + noise() * (old**2 - last**2) ** 0.5
        x = kd.sample_heun(model, x, torch.stack([old, new]), disable=True)
        last = new
    return x


@pytest.mark.parametrize("steps", [8, 20, 36])
def test_restart_matches_webui_algorithm(kd, steps):
    sigmas = karras(steps)
    x0 = x_init(sigmas[0])
    stream = NoiseStream(SHAPE)
    ref = webui_restart_reference(kd, analytic_denoiser(torch), torch.from_numpy(x0), torch.from_numpy(sigmas),
                                  stream.torch_next).numpy()
    stream.i = 0
    calls = []

    def counting(x, sigma):
        calls.append(sigma)
        return analytic_denoiser(np)(x, sigma)

    ours = samplers.sample_restart(counting, x0.copy(), sigmas, noise=stream.numpy_next)
    assert_close(ref, ours, rtol=2e-6)  # the restart sigmas are float32 on both sides
    if steps >= 20:
        assert stream.i == (2 if steps >= 36 else 1) and len(calls) > 2 * steps - 2


def test_batch_independent_brownian_noise():
    """Per-image trees: image 1's noise does not depend on the batch it is in (the webui's point)."""
    both = BrownianTreeNoise((4, 8, 8), [7, 8], 0.03, 14.6)
    alone = BrownianTreeNoise((4, 8, 8), [8], 0.03, 14.6)
    for s, sn in [(14.6, 9.0), (9.0, 2.5), (2.5, 0.03)]:
        assert np.array_equal(both(s, sn)[1], alone(s, sn)[0])


def test_brownian_noise_distribution():
    """Standard normal per step and independent across disjoint steps (what the SDE solvers assume)."""
    sigmas = karras(10)
    tree = BrownianTreeNoise((4, 32, 32), [123], float(sigmas[-2]), float(sigmas[0]))
    draws = [tree(float(sigmas[i]), float(sigmas[i + 1]))[0].ravel() for i in range(9)]
    for d in draws:
        assert abs(d.mean()) < 0.05 and abs(d.std() - 1) < 0.05
    corr = np.corrcoef(np.stack(draws))
    assert np.max(np.abs(corr - np.eye(9))) < 0.06
    # Additivity: W over [a, c] = W over [a, b] + W over [b, c]
    a, b, c = float(sigmas[6]), float(sigmas[4]), float(sigmas[2])
    whole = tree(c, a) * (c - a) ** 0.5
    parts = tree(c, b) * (c - b) ** 0.5 + tree(b, a) * (b - a) ** 0.5
    assert np.allclose(whole, parts, atol=1e-5)


def test_float32_stays_float32():
    sigmas = karras(6)
    x = x_init(sigmas[0]).astype(np.float32)
    den = analytic_denoiser(np)
    for info in sampling.SAMPLERS.values():
        if info.family != "sigma":
            continue
        noise = BrownianTreeNoise(SHAPE[1:], [1, 2], float(sigmas[-2]), float(sigmas[0])) if info.brownian else \
            (lambda *a: np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
        out = info.fn(lambda x, s: den(x, s).astype(np.float32), x.copy(), sigmas, noise=noise, **info.options)
        assert out.dtype == np.float32 and np.all(np.isfinite(out)), info.name


# ---- timestep family against diffusers' schedulers ----------------------------------------------

def sd_alphas_cumprod():
    from sdrt.runtime.sampling.schedules import alphas_cumprod

    return alphas_cumprod()


SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def analytic_eps(lib):
    """A smooth eps(x, t) for the timestep samplers."""
    def eps(x, t):
        t = float(t.reshape(-1)[0]) if hasattr(t, "reshape") else float(t)
        return 0.3 * x * (t / 1000) + 0.1 * lib.sin(2 * x) + 0.02 * (1 - t / 1000)
    return eps


def diffusers_ddim(eps, x, steps, eta=0.0, noises=None):
    """diffusers' DDIMScheduler with SD's settings, all but its last step (the webui's DDIM stops there)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing="leading")
    sch.set_timesteps(steps)
    for i, t in enumerate(sch.timesteps[:-1]):
        noise = None if noises is None else noises[i]
        x = sch.step(eps(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    return x


def diffusers_plms(eps, x, steps):
    """diffusers' PNDMScheduler in PLMS mode (skip_prk_steps), without its last step."""
    from diffusers import PNDMScheduler

    sch = PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(steps)
    for t in sch.timesteps[:-1]:
        x = sch.step(eps(x, t), t, x).prev_sample
    return x


def diffusers_unipc(eps, x, steps, order=3, variant="bh1"):
    """diffusers' UniPCMultistepScheduler on the webui's continuous-time grid: its sigmas and (fractional)
    model timesteps replaced by the webui UniPC's t = 1 ... 1/1000, uniform in time."""
    from diffusers import UniPCMultistepScheduler

    from sdrt.runtime.sampling.samplers import _VPSchedule, unipc_times

    sch = UniPCMultistepScheduler(**SD_SCHEDULER, solver_order=order, predict_x0=True, solver_type=variant,
                                  lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min")
    sch.set_timesteps(steps)
    vp = _VPSchedule(sd_alphas_cumprod())
    ts = unipc_times(vp, steps)
    sch.sigmas = torch.tensor([vp.std(t) / vp.alpha(t) for t in ts], dtype=torch.float64)
    sch.timesteps = torch.tensor([(t - 1e-3) * 1000 for t in ts[:-1]], dtype=torch.float64)
    # diffusers works on the unit-variance sample: x_VP = x, as the webui's UniPC
    for t in sch.timesteps:
        x = sch.step(eps(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [10, 20])
def test_ddim_matches_diffusers(eta, steps):
    from sdrt.runtime.sampling.registry import SAMPLERS, timesteps_for

    x0 = np.random.default_rng(3).standard_normal(SHAPE)
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
              for i in range(steps)]
    ref = diffusers_ddim(analytic_eps(torch), torch.from_numpy(x0), steps, eta, noises).numpy()
    it = iter(noises)
    ours = samplers.sample_ddim(analytic_eps(np), x0.copy(), timesteps_for(SAMPLERS["DDIM"], steps),
                                alphas_cumprod=sd_alphas_cumprod(), eta=eta, noise=lambda *a: next(it).numpy())
    assert_close(ref, ours)


def webui_ddim_cfgpp(eps_parts, x, timesteps, alphas_cumprod, cfg_scale, eta=0.0, noises=None):
    """The webui 1.10's ``ddim_cfgpp`` in torch, with its CFG denoiser's ``combine_denoised`` at
    cfg_scale / 12.5 (``cond_scale_miltiplier``): x0 from the guided noise, the direction to x_t
    along the unconditional noise (``last_noise_uncond``), ``randn_like`` drawn every step.

    ``eps_parts(x, t)`` returns ([(cond eps, weight), ...], uncond eps) for one model call."""
    ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float32)
    ts = torch.as_tensor(np.asarray(timesteps), dtype=torch.int64)
    alphas = ac[ts]
    alphas_prev = ac[torch.nn.functional.pad(ts[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas.double()) * (1 - alphas.double() / alphas_prev))
    scale = cfg_scale * (1 / 12.5)
    for i in range(len(ts) - 1):
        index = len(ts) - 1 - i
        conds, uncond = eps_parts(x, float(ts[index]))
        e_t = uncond.clone()
        for e_c, weight in conds:
            e_t = e_t + (e_c - uncond) * (weight * scale)
        a_t = torch.tensor(alphas[index].item(), dtype=x.dtype)
        a_prev = torch.tensor(alphas_prev[index].item(), dtype=x.dtype)
        sigma_t = torch.tensor(sigmas[index].item(), dtype=x.dtype)
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * uncond
        noise = sigma_t * (noises[i] if noises is not None else torch.zeros_like(x))
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


def context_eps(lib):
    """analytic_eps plus a term that depends on the conditioning (its mean per row)."""
    base = analytic_eps(lib)

    def eps(x, t, context):
        c = context.mean(axis=(1, 2)) if lib is np else context.mean(dim=(1, 2))
        return base(x, t) + 0.2 * c.reshape(-1, 1, 1, 1) * lib.cos(x)
    return eps


# (cfg_scale, [(cond value, AND weight), ...], eta): 12.5 is guidance 1, where CFG would skip the uncond
CFGPP_CASES = [(7.0, [(0.4, 1.0)], 0.0), (12.5, [(0.4, 1.0)], 0.0), (5.0, [(0.4, 1.0), (-0.3, 0.6)], 0.7)]


@pytest.mark.parametrize("cfg_scale, parts, eta", CFGPP_CASES)
def test_ddim_cfgpp_matches_webui_algorithm(cfg_scale, parts, eta):
    from sdrt.runtime.sampling.denoiser import CFGDenoiser
    from sdrt.runtime.text.encoder import CondSchedule, MultiCond

    info, _ = sampling.resolve("DDIM CFG++")
    steps = 10
    timesteps = sampling.timesteps_for(info, steps)
    x0 = np.random.default_rng(8).standard_normal(SHAPE)
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + i), dtype=torch.float64)
              for i in range(steps)]
    contexts = [(np.full((3, 2), value), weight) for value, weight in parts]
    uncond_ctx = np.full((3, 2), -0.1)

    t_eps = context_eps(torch)

    def eps_parts(x, t):
        conds = [(t_eps(x, t, torch.from_numpy(c)[None]), w) for c, w in contexts]
        return conds, t_eps(x, t, torch.from_numpy(uncond_ctx)[None])

    ref = webui_ddim_cfgpp(eps_parts, torch.from_numpy(x0), timesteps, sd_alphas_cumprod(), cfg_scale, eta,
                           noises).numpy()
    cond = MultiCond(tuple((CondSchedule((100,), (c,)), w) for c, w in contexts))
    # What the pipeline builds: the guidance at cfg_scale times the sampler's multiplier
    model = CFGDenoiser(lambda x, t, ctx: context_eps(np)(x, t, ctx), cond, CondSchedule((100,), (uncond_ctx,)),
                        cfg_scale * info.cfg_scale_multiplier)
    it = iter(noises)
    ours = info.fn(model, x0.copy(), timesteps, alphas_cumprod=sd_alphas_cumprod(), eta=eta,
                   noise=lambda *a: next(it).numpy())
    assert_close(ref, ours)
    # The renoising direction matters: plain DDIM through the same guidance lands elsewhere
    plain = samplers.sample_ddim(CFGDenoiser(model.model, cond, model.uncond, model.cfg_scale), x0.copy(), timesteps,
                                 alphas_cumprod=sd_alphas_cumprod())
    assert np.max(np.abs(plain - ours)) > 1e-3


def test_ddim_cfgpp_needs_a_cfg_model():
    info, _ = sampling.resolve("ddim_cfgpp")
    with pytest.raises(TypeError, match="CFGDenoiser"):
        info.fn(analytic_eps(np), np.zeros(SHAPE), sampling.timesteps_for(info, 4), alphas_cumprod=sd_alphas_cumprod())


def test_ddim_cfgpp_float32_stays_float32():
    from sdrt.runtime.sampling.denoiser import CFGDenoiser

    info = sampling.SAMPLERS["DDIM CFG++"]
    eps = context_eps(np)
    model = CFGDenoiser(lambda x, t, ctx: eps(x, t, ctx).astype(np.float32), np.full((1, 3, 2), 0.4, np.float32),
                        np.zeros((1, 3, 2), np.float32), 7.0 * info.cfg_scale_multiplier)
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    out = info.fn(model, x, sampling.timesteps_for(info, 6), alphas_cumprod=sd_alphas_cumprod())
    assert out.dtype == np.float32 and model.last_uncond.dtype == np.float32 and np.all(np.isfinite(out))


def test_ddim_cfgpp_registry():
    from sdrt.runtime.errors import SdrtError

    info, schedule = sampling.resolve("DDIM CFG++")
    assert sampling.resolve("ddim_cfgpp")[0] is info and sampling.resolve("ddim cfg++")[0] is info
    assert info.fn is samplers.sample_ddim_cfgpp and info.family == "timesteps" and schedule == "Uniform"
    # The webui's sampler sets cond_scale_miltiplier = 1 / 12.5; no other sampler scales CFG
    assert info.cfg_scale_multiplier == 1 / 12.5
    assert all(s.cfg_scale_multiplier == 1.0 for s in sampling.SAMPLERS.values() if s is not info)
    # The webui lists it right after DDIM
    names = list(sampling.SAMPLERS)
    assert names[names.index("DDIM") + 1] == "DDIM CFG++"
    # Its steps are DDIM's timesteps, and like DDIM it needs 2 steps and takes no schedule
    assert np.array_equal(sampling.timesteps_for(info, 30), sampling.timesteps_for(sampling.SAMPLERS["DDIM"], 30))
    with pytest.raises(SdrtError, match="at least 2 steps"):
        sampling.check_steps(info, 1)
    with pytest.raises(SdrtError, match="Automatic"):
        sampling.resolve("DDIM CFG++", "Karras")
    assert sampling.infotext_schedule("DDIM CFG++") == "Automatic"
    # eta is the webui's eta_ddim: default 0, written as "Eta DDIM" when set
    assert sampling.sampler_options(info) == {"eta": 0.0} and not info.ancestral
    assert sampling.options_infotext(info, sampling.sampler_options(info)) == {}
    options = sampling.sampler_options(info, eta=0.3)
    assert sampling.options_infotext(info, options) == {"Eta DDIM": 0.3}
    # With eta it draws from the (ENSD-reseeded) generators; the webui would not write ENSD (no uses_ensd)
    assert info.draws_noise(options) and not info.uses_ensd


@pytest.mark.parametrize("steps", [5, 20])
def test_plms_matches_diffusers(steps):
    from sdrt.runtime.sampling.registry import SAMPLERS, timesteps_for

    x0 = np.random.default_rng(4).standard_normal(SHAPE)
    ref = diffusers_plms(analytic_eps(torch), torch.from_numpy(x0), steps).numpy()
    ours = samplers.sample_plms(analytic_eps(np), x0.copy(), timesteps_for(SAMPLERS["PLMS"], steps),
                                alphas_cumprod=sd_alphas_cumprod())
    assert_close(ref, ours)


@pytest.mark.parametrize("steps, order, variant", [(9, 3, "bh1"), (20, 3, "bh1"), (12, 2, "bh2"), (4, 3, "bh2")])
def test_unipc_matches_diffusers(steps, order, variant):
    x0 = np.random.default_rng(5).standard_normal(SHAPE)
    ref = diffusers_unipc(analytic_eps(torch), torch.from_numpy(x0), steps, order, variant).numpy()
    ours = samplers.sample_unipc(analytic_eps(np), x0.copy(), np.arange(steps), alphas_cumprod=sd_alphas_cumprod(),
                                 order=order, variant=variant)
    assert_close(ref, ours)


class FakeEpsDenoiser:
    """What LCMDenoiser needs of a Denoiser: the training schedule and a raw eps network."""

    prediction_type = "epsilon"

    def __init__(self, eps):
        self.alphas_cumprod = sd_alphas_cumprod()
        self.eps = eps

    def run_unet(self, x, t, context):
        return self.eps(x, t)


@pytest.mark.parametrize("steps", [2, 8])
def test_lcm_matches_diffusers(steps):
    """Where the webui's LCM sigmas fall on the LCM timesteps (n - 1 divides 49), it is diffusers' LCMScheduler."""
    from diffusers import LCMScheduler

    from sdrt.runtime.sampling.denoiser import LCMDenoiser
    from sdrt.runtime.sampling.registry import sigmas_for

    lcm = LCMDenoiser(FakeEpsDenoiser(analytic_eps(np)))
    sigmas = sigmas_for("Uniform", steps, lcm.schedule, sampler=sampling.SAMPLERS["LCM"])
    timesteps = [int(t) for t in lcm.schedule.sigma_to_t(sigmas[:-1])]
    assert timesteps[0] == 999 and timesteps[-1] == 19
    sch = LCMScheduler(**SD_SCHEDULER, set_alpha_to_one=False, steps_offset=1, timestep_scaling=10.0)
    sch.set_timesteps(timesteps=timesteps)
    x0 = np.random.default_rng(6).standard_normal(SHAPE)
    gen = torch.Generator().manual_seed(9)
    # k-diffusion starts from noise * sigma_max: in diffusers' unit-variance terms that is noise * c_in
    x = torch.from_numpy(x0 * (sigmas[0] / (sigmas[0] ** 2 + 1) ** 0.5))
    for t in sch.timesteps:
        x, denoised = sch.step(analytic_eps(torch)(x, t), t, x, generator=gen, return_dict=False)
    gen = torch.Generator().manual_seed(9)
    ours = samplers.sample_lcm(lambda x, s: lcm(x, s, None), x0 * sigmas[0], sigmas,
                               noise=lambda *a: torch.randn(SHAPE, generator=gen, dtype=torch.float64).numpy())
    assert_close(denoised.numpy(), ours, rtol=2e-6)  # c_skip on the sigma-space input, as the webui
