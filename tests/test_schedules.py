"""Schedules and the webui's sampler/schedule names: values against k-diffusion and scipy, quirks, errors."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime import sampling
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sampling import schedules

TABLE = schedules.model_sigmas(schedules.alphas_cumprod())
LO, HI = float(TABLE[0]), float(TABLE[-1])


@pytest.fixture(scope="module")
def kd():
    pytest.importorskip("torch")
    from test_samplers import load_k_diffusion_sampling

    return load_k_diffusion_sampling()


@pytest.mark.parametrize("n", [1, 2, 7, 20, 33])
def test_k_diffusion_schedules(kd, n):
    """k-diffusion computes these in float32: equal to float32 precision."""
    for ours, ref in ((schedules.get_sigmas_karras(n, LO, HI), kd.get_sigmas_karras(n, LO, HI)),
                      (schedules.get_sigmas_exponential(n, LO, HI), kd.get_sigmas_exponential(n, LO, HI)),
                      (schedules.get_sigmas_polyexponential(n, LO, HI, 1.0), kd.get_sigmas_polyexponential(n, LO, HI)),
                      (schedules.get_sigmas_polyexponential(n, LO, HI, 2.0),
                       kd.get_sigmas_polyexponential(n, LO, HI, 2.0))):
        assert ours.shape == (n + 1,) and ours[-1] == 0
        np.testing.assert_allclose(ours, ref.double().numpy(), rtol=2e-6)


def test_beta_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0)):
        for q in np.linspace(0, 1, 23):
            assert schedules.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-12, abs=1e-14)
    want = [LO + x * (HI - LO) for x in stats.beta.ppf(1 - np.linspace(0, 1, 12), 0.6, 0.6)] + [0.0]
    np.testing.assert_allclose(sampling.schedule_sigmas("Beta", 12, TABLE), want, rtol=1e-12)


def test_model_schedules():
    model = schedules.DiscreteSchedule(TABLE)
    uniform = schedules.get_sigmas_uniform(10, model)
    assert uniform[0] == pytest.approx(HI) and uniform[-2] == pytest.approx(LO) and uniform[-1] == 0
    np.testing.assert_allclose(schedules.get_sigmas_normal(10, model), uniform, rtol=1e-12)
    sgm = schedules.get_sigmas_sgm_uniform(10, model)
    assert len(sgm) == 11 and sgm[0] == pytest.approx(HI) and sgm[-2] > LO  # n of n + 1 points
    np.testing.assert_allclose(sgm[:-1], model.t_to_sigma(np.linspace(999, 0, 11)[:-1]), rtol=1e-12)
    simple = schedules.get_sigmas_simple(8, model)
    np.testing.assert_array_equal(simple[:-1], TABLE[[-1 - int(x * 1000 / 8) for x in range(8)]])
    ddim = schedules.get_sigmas_ddim(20, model)
    np.testing.assert_array_equal(ddim[:-1], TABLE[np.arange(1, 1000, 50)][::-1])
    assert len(schedules.get_sigmas_ddim(30, model)) == 32  # 31 steps: 1000 // 30 = 33 (the webui's quirk)


def test_kl_optimal_and_ays():
    kl = schedules.get_sigmas_kl_optimal(10, LO, HI)
    assert len(kl) == 11 and kl[0] == pytest.approx(HI) and kl[-1] == pytest.approx(LO)  # ends at sigma_min
    np.testing.assert_allclose(np.arctan(kl), np.linspace(np.arctan(HI), np.arctan(LO), 11), rtol=1e-12)
    np.testing.assert_allclose(schedules.get_sigmas_align_your_steps(11)[:-1], schedules.AYS_SIGMAS["sd1"])
    np.testing.assert_allclose(schedules.get_sigmas_align_your_steps(11, "sdxl")[:-1], schedules.AYS_SIGMAS["sdxl"])
    ays = schedules.get_sigmas_align_your_steps(20)
    assert len(ays) == 21 and ays[0] == pytest.approx(14.615) and ays[-2] == pytest.approx(0.029)
    assert np.all(np.diff(np.log(ays[:-1])) < 0)


@pytest.mark.parametrize("schedule", sampling.SCHEDULES)
def test_every_schedule_runs(schedule):
    sigmas = sampling.sigmas_for(schedule, 12, TABLE, sampler=sampling.SAMPLERS["Euler"])
    assert np.all(np.isfinite(sigmas)) and np.all(np.diff(sigmas) < 0) and sigmas[0] > 1
    assert np.array_equal(sigmas, sigmas.astype(np.float32).astype(np.float64))  # float32 like the webui's


def test_discard_penultimate_sigma():
    sigmas = sampling.sigmas_for("Karras", 20, TABLE, sampler=sampling.SAMPLERS["DPM2"])
    full = schedules.get_sigmas_karras(21, LO, HI).astype(np.float32)
    assert len(sigmas) == 21 and np.array_equal(sigmas, np.append(full[:-2], 0.0))


def test_webui_timesteps():
    ddim = sampling.SAMPLERS["DDIM"]
    assert list(sampling.timesteps_for(ddim, 20)) == list(range(1, 1000, 50))
    assert len(sampling.timesteps_for(ddim, 30)) == 31


@pytest.mark.parametrize("name, sampler, schedule", [
    ("Euler a", "Euler a", "Uniform"), ("k_euler_a", "Euler a", "Uniform"), ("k_dpm_2_a", "DPM2 a", "Karras"),
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("DPM++ 2M", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE", "DPM++ 2M SDE", "Exponential"), ("dpm++ 2m sde heun karras", "DPM++ 2M SDE Heun", "Karras"),
    ("Euler Exponential", "Euler", "Exponential"), ("LMS SGMUniform", "LMS", "SGM Uniform"),
    ("DDIM", "DDIM", "Uniform"), ("k_lcm", "LCM", "Uniform"), ("Restart", "Restart", "Karras"),
])
def test_resolve_names(name, sampler, schedule):
    info, sched = sampling.resolve(name)
    assert (info.name, sched) == (sampler, schedule)


def test_name_errors_are_one_line_and_list_the_names():
    with pytest.raises(SdrtError) as e:
        sampling.resolve("Euler b")
    msg = str(e.value)
    assert "\n" not in msg and all(name in msg for name in sampling.SAMPLERS)
    with pytest.raises(SdrtError) as e:
        sampling.resolve("Euler", "Karas")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in sampling.SCHEDULES)


def test_schedule_a_sampler_cannot_use():
    for name in ("DDIM", "PLMS", "UniPC", "DPM fast", "DPM adaptive"):
        with pytest.raises(SdrtError, match="cannot use schedule 'Karras'"):
            sampling.resolve(name, "Karras")
        sampling.resolve(name, "Automatic")


@pytest.mark.parametrize("name, too_few", [("Heun", 1), ("DPM2", 1), ("DPM++ 2S a", 1), ("DPM++ SDE", 1),
                                           ("Restart", 1), ("DDIM", 1), ("PLMS", 1), ("UniPC", 2)])
def test_too_few_steps(name, too_few):
    info = sampling.SAMPLERS[name]
    with pytest.raises(SdrtError, match=f"needs at least {too_few + 1} steps") as e:
        sampling.check_steps(info, too_few)
    assert "\n" not in str(e.value)
    sampling.check_steps(info, too_few + 1)
