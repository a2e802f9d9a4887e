"""The Python API: ``sdrt.Pipeline``, the webui's field names, results that save their PNG text,
Interrupt and Skip from another thread, and one plan per request."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.runtime import sampling
from sdrt.runtime.pipeline import GenerationParams, Pipeline, make_plan
from sdrt.runtime.png import parse_infotext


def test_sdrt_pipeline_takes_a_checkpoint_and_webui_names(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pipe = sdrt.Pipeline(str(tiny_checkpoint))  # exported into the cache on first use
    images = pipe("a red circle", negative_prompt="blurry", steps=3, sampler_name="Euler", cfg_scale=5, seed=11,
                  n_iter=2, batch_size=1, override_settings={"eta_noise_seed_delta": 3})
    assert [im.seed for im in images] == [11, 12]
    path = images[1].save(tmp_path / "out" / "b.png")
    with Image.open(path) as im:
        text = im.text["parameters"]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(images[1].image))
    assert text == images[1].infotext
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("a red circle", "blurry")
    assert params["Seed"] == "12" and params["Sampler"] == "Euler" and params["CFG scale"] == "5"
    assert not list((tmp_path / "out").glob("*.partial*"))


def test_the_same_request_by_either_name_draws_the_same_image(tiny_pipeline):
    a = tiny_pipeline("a cat", steps=2, sampler_name="DPM++ 2M", seed=3, CLIP_stop_at_last_layers=1)[0]
    b = tiny_pipeline.generate(GenerationParams("a cat", steps=2, sampler_name="DPM++ 2M", seed=3))[0]
    c = tiny_pipeline("a cat", steps=2, sampler="DPM++ 2M", seed=3)[0]  # sdrt's CLI spelling
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.infotext == b.infotext == c.infotext


@pytest.mark.parametrize("kwargs, message", [
    ({"samplr_name": "Euler"}, "unknown generation parameter 'samplr_name'"),
    ({"restore_faces": True}, "restore_faces=True is not supported"),
    ({"override_settings": {"sd_model_checkpoint": "x"}}, "override_settings: not supported by sdrt: sd_model"),
    ({"steps": "20"}, "steps must be a whole number"),
    ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
    ({"cfg_scale": 10**400}, "cfg_scale must be a finite number"),
    ({"width": 65}, "width must be a positive multiple of 8"),
    ({"sampler_name": "Euler z"}, "unknown sampler 'Euler z'"),
    ({"rng": "gpu"}, "noise source 'gpu'"),
])
def test_wrong_arguments_are_one_sdrt_error(tiny_pipeline, kwargs, message):
    with pytest.raises(sdrt.SdrtError, match=message) as e:
        tiny_pipeline("x", **kwargs)
    assert "\n" not in str(e.value)


def test_webui_neutral_fields_are_accepted(tiny_pipeline):
    # What webui clients send by default: features that are off, saving flags
    (image,) = tiny_pipeline("x", steps=1, sampler_name="Euler", seed=1, restore_faces=False, tiling=False,
                             enable_hr=False, denoising_strength=0.7, styles=[], send_images=True,
                             save_images=False, override_settings={}, script_args=[])
    assert image.seed == 1


def test_rng_as_the_infotext_spells_it(tiny_pipeline):
    a = tiny_pipeline("x", steps=2, sampler_name="Euler a", seed=4, rng="CPU")[0]
    b = tiny_pipeline("x", steps=2, sampler_name="Euler a", seed=4, rng="cpu")[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_a_plan_resolves_the_request_once(tiny_pipeline, monkeypatch):
    import sdrt.runtime.pipeline.plan as plan_module

    calls = []

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("resolve", "sampler_options", "check_steps"):
        monkeypatch.setattr(plan_module.sampling, name, counting(getattr(sampling, name)))
    plan = tiny_pipeline.plan(GenerationParams("x", steps=2, sampler_name="Euler a", seed=9, batch_size=2, n_iter=2))
    assert [b.seeds for b in plan.batches] == [(9, 10), (11, 12)]
    assert plan.latent_shape == (4, 8, 8) and plan.schedule == "Uniform"
    images = tiny_pipeline.generate(plan)
    assert len(images) == 4
    assert sorted(calls) == ["check_steps", "resolve", "sampler_options"]  # once each, for 2 batches of 2


def test_a_gpu_noise_source_fails_before_any_work(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(tiny_pipeline.text_encoder, "conditioning", lambda *a: pytest.fail("text encoded"))
    with pytest.raises(sdrt.SdrtError, match="gpu"):
        tiny_pipeline.generate(GenerationParams("x", rng="gpu"))


def _from_another_thread(action):
    t = threading.Thread(target=action)
    t.start()
    t.join()


def test_interrupt_returns_what_finished(tiny_pipeline):
    p = GenerationParams("a red circle", steps=6, sampler_name="Euler", seed=20, n_iter=3)

    def on_step(e):
        if e["batch"] == 1 and e["step"] == 2:
            _from_another_thread(tiny_pipeline.interrupt)

    images = tiny_pipeline.generate(p, callback=on_step)
    assert [(im.seed, im.stopped_at) for im in images] == [(20, None), (21, 2)]
    full = tiny_pipeline.generate(p.replace(n_iter=1))[0]
    assert np.array_equal(np.asarray(images[0].image), np.asarray(full.image))
    assert not np.array_equal(np.asarray(images[1].image),
                              np.asarray(tiny_pipeline.generate(p.replace(seed=21, n_iter=1))[0].image))
    # The next generation is not interrupted by the last one's request
    assert len(tiny_pipeline.generate(p.replace(n_iter=2))) == 2


def test_skip_stops_one_batch_and_goes_on(tiny_pipeline):
    p = GenerationParams("a red circle", steps=5, sampler_name="Euler a", seed=30, n_iter=3)

    def on_step(e):
        if e["batch"] == 0 and e["step"] == 3:
            _from_another_thread(tiny_pipeline.skip)

    images = tiny_pipeline.generate(p, callback=on_step)
    assert [(im.seed, im.stopped_at) for im in images] == [(30, 3), (31, None), (32, None)]
    again = tiny_pipeline.generate(p.replace(seed=31, n_iter=2))
    for got, want in zip(images[1:], again):
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_make_plan_needs_no_sessions(tiny_bundle):
    from sdrt.runtime.bundle import open_bundle

    plan = make_plan(open_bundle(tiny_bundle), GenerationParams("x", sampler_name="DPM++ 2M Karras", steps=3))
    assert plan.sampler.name == "DPM++ 2M" and plan.schedule == "Karras" and 0 <= plan.seed < 2**32


def test_runtime_pipeline_is_the_same_class(tiny_bundle):
    assert issubclass(sdrt.Pipeline, Pipeline)
    assert sdrt.GenerationParams is GenerationParams


def test_a_field_wins_over_its_alias():
    p = GenerationParams.from_webui({"prompt": "x", "sampler_name": "DDIM", "sampler_index": "Euler a"})
    assert p.sampler_name == "DDIM"
    assert GenerationParams.from_webui({"prompt": "x", "sampler_index": "Euler"}).sampler_name == "Euler"


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "DPM++ 2M", "DPM adaptive"])
def test_finished_images_are_not_marked_stopped(tiny_pipeline, sampler):
    (image,) = tiny_pipeline("x", steps=3, sampler_name=sampler, seed=2)
    assert image.stopped_at is None
