"""ldm.samplers against diffusers' schedulers (recorded by tools/dev/make_sampler_fixtures.py), pure numpy."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from ldm import samplers
from ldm.errors import UserInputError
from tools.dev.make_sampler_fixtures import DDIM_ETA_STEPS, ETA, NOISE_SEED, STEP_COUNTS, case_key, fake_model

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers.npz"))
CASES = [(s, p, n, 0.0) for s in samplers.SAMPLERS for p in samplers.PARAMETERIZATIONS for n in STEP_COUNTS]
CASES += [("ddim", p, n, ETA) for p in samplers.PARAMETERIZATIONS for n in DDIM_ETA_STEPS]
CONFIGS = json.loads(str(FIXTURES["configs"]))  # name -> a scheduler_config.json's dict
RESOLVED = json.loads(str(FIXTURES["resolved"]))  # name -> sampler -> what diffusers' from_config set
# Measured: max |ours - diffusers| <= 2e-6 over every case (latents up to ~8 in magnitude); the gap is
# diffusers' float32 coefficients and float32 latents on our side.
TOL = dict(rtol=1e-5, atol=1e-5)


def _variant_case(key):
    """'variant:sampler.parameterization.steps' -> (variant, sampler, parameterization, steps)"""
    variant, case = key.split(":")
    name, parameterization, num_steps = case.split(".")
    return variant, name, parameterization, int(num_steps)


def _run(name, parameterization, num_steps, eta=0.0, seed=NOISE_SEED, alphas_cumprod=None, settings=None):
    seen = []
    x = samplers.sample(
        name,
        fake_model,
        FIXTURES["x_T"],
        FIXTURES["alphas_cumprod"] if alphas_cumprod is None else alphas_cumprod,
        num_steps,
        parameterization,
        eta=eta,
        rng=np.random.default_rng(seed) if eta else None,
        callback=lambda i, t, x: seen.append((i, t, x.copy())),
        settings=settings,
    )
    return x, seen


@pytest.mark.parametrize("name,parameterization,num_steps,eta", CASES, ids=[case_key(*c) for c in CASES])
def test_matches_diffusers(name, parameterization, num_steps, eta):
    key = case_key(name, parameterization, num_steps, eta)
    x, seen = _run(name, parameterization, num_steps, eta)
    expected_ts = FIXTURES[f"{key}.timesteps"]
    np.testing.assert_array_equal(samplers.timesteps(name, num_steps), expected_ts)
    np.testing.assert_array_equal([t for _, t, _ in seen], expected_ts)
    assert [i for i, _, _ in seen] == list(range(len(expected_ts)))
    assert x.dtype == np.float32 and x.shape == FIXTURES["x_T"].shape
    np.testing.assert_allclose(seen[int(FIXTURES[f"{key}.mid_index"])][2], FIXTURES[f"{key}.mid"], **TOL)
    np.testing.assert_allclose(x, FIXTURES[f"{key}.final"], **TOL)
    np.testing.assert_array_equal(seen[-1][2], x)


@pytest.mark.parametrize("key", list(FIXTURES["variant_cases"]))
def test_follows_the_scheduler_config_as_diffusers_does(key):
    variant, name, parameterization, num_steps = _variant_case(key)
    settings = samplers.scheduler_settings(CONFIGS[variant])[name]
    x, seen = _run(name, parameterization, num_steps, settings=settings)
    expected_ts = FIXTURES[f"{key}.timesteps"]
    np.testing.assert_array_equal(samplers.timesteps(name, num_steps, settings=settings), expected_ts)
    np.testing.assert_array_equal([t for _, t, _ in seen], expected_ts)
    assert [i for i, _, _ in seen] == list(range(len(expected_ts)))
    np.testing.assert_allclose(x, FIXTURES[f"{key}.final"], **TOL)


@pytest.mark.parametrize("key", list(FIXTURES["variant_refused"]))
def test_refuses_what_diffusers_cannot_run(key):
    # diffusers' Runge-Kutta warm-up (PNDMScheduler, skip_prk_steps=False) breaks below 4 steps
    variant, name, parameterization, num_steps = _variant_case(key)
    settings = samplers.scheduler_settings(CONFIGS[variant])[name]
    with pytest.raises(UserInputError, match="skip_prk_steps=False .* needs num_steps >= 4"):
        _run(name, parameterization, num_steps, settings=settings)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_settings_resolve_as_diffusers_from_config(config):
    # SD's hub configs, the tiny folder's saved one, an empty one (every class default) and the variants
    ours = samplers.scheduler_settings(CONFIGS[config])
    for name, spec in samplers.SAMPLERS.items():
        theirs = RESOLVED[config][name]
        fields = [f.name for f in dataclasses.fields(samplers.SchedulerSettings) if f.name in theirs]
        assert sorted(spec.defaults) == sorted(fields), name
        assert {f: getattr(ours[name], f) for f in fields} == {f: theirs[f] for f in fields}, name


def test_release_settings_are_sd_hub_configs():
    # what single files sample with is what every SD release's hub folder resolves to
    release = samplers.scheduler_settings()
    for config in ("sd15", "sd21", "sd21-base"):
        assert samplers.scheduler_settings(CONFIGS[config]) == release


def test_defaults_and_fixed_values_are_diffusers_defaults():
    defaults = RESOLVED["empty"]
    for name, spec in samplers.SAMPLERS.items():
        assert {k: defaults[name][k] for k in spec.defaults} == spec.defaults, name
        assert {k: defaults[name][k] for k in spec.fixed} == spec.fixed, name


def test_values_not_followed_are_warned_about(caplog):
    config = {**CONFIGS["sd15"], "use_karras_sigmas": True, "thresholding": True}
    with caplog.at_level(logging.WARNING, logger="ldm.samplers"):
        settings = samplers.scheduler_settings(config, "x/scheduler/scheduler_config.json")
    assert settings == samplers.scheduler_settings()
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("x/scheduler/scheduler_config.json: not followed")
    assert "use_karras_sigmas=True (dpm_solver, uni_pc)" in message
    assert "thresholding=True (ddim, dpm_solver, uni_pc)" in message


def test_bad_timestep_spacing_names_the_config():
    with pytest.raises(UserInputError, match="^x.json: timestep_spacing must be one of leading, trailing, linspace"):
        samplers.scheduler_settings({"timestep_spacing": "karras"}, "x.json")


@pytest.mark.parametrize("name,num_steps,spacing", [("ddim", 1000, "leading"), ("dpm_solver", 61, "trailing")])
def test_timesteps_off_the_schedule_are_refused(name, num_steps, spacing):
    # SD's steps_offset 1 puts 1000 "leading" steps' first timestep at 1000 (diffusers: IndexError); 1000 / 61
    # rounds so that numpy's arange makes 62 "trailing" steps, the last at -1 (diffusers samples with it)
    settings = samplers.scheduler_settings({**CONFIGS["sd15"], "timestep_spacing": spacing})[name]
    with pytest.raises(UserInputError, match=f"{num_steps} steps with '{spacing}' spacing and steps_offset 1 give "
                                             "timesteps outside"):
        _run(name, "eps", num_steps, settings=settings)


def test_float64_schedule_also_matches():
    # A schedule computed in float64 (not diffusers' float32 cumprod) moves results by well under TOL.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    for name in samplers.SAMPLERS:
        x, _ = _run(name, "eps", 20, alphas_cumprod=abar)
        np.testing.assert_allclose(x, FIXTURES[f"{case_key(name, 'eps', 20)}.final"], **TOL)


def test_ddim_eta_is_deterministic_per_seed():
    a, _ = _run("ddim", "eps", 10, eta=0.5, seed=7)
    b, _ = _run("ddim", "eps", 10, eta=0.5, seed=7)
    c, _ = _run("ddim", "eps", 10, eta=0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_plms_evaluates_second_timestep_twice():
    ts = samplers.timesteps("plms", 10)
    assert len(ts) == 11 and ts[1] == ts[2] and ts[0] == 901 and ts[-1] == 1


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(UserInputError) as err:
        samplers.sample("euler", fake_model, FIXTURES["x_T"], FIXTURES["alphas_cumprod"], 10)
    for name in samplers.SAMPLERS:
        assert name in str(err.value)
    with pytest.raises(UserInputError, match="ddim"):
        samplers.timesteps("k_lms", 10)


# what a user sets (--sampling_steps, --ddim_eta, the sampler flag) is a UserInputError; what only code
# passes (the schedule, its parameterization, the rng) stays a ValueError, whose traceback shows the bug
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(name="plms", eta=0.5), UserInputError, "eta only applies to ddim"),
        (dict(name="ddim", eta=0.5), ValueError, "rng"),
        (dict(name="ddim", eta=-1.0), UserInputError, "eta must be"),
        (dict(name="ddim", parameterization="x0"), ValueError, "parameterization"),
        (dict(name="ddim", num_steps=0), UserInputError, "num_steps"),
        (dict(name="ddim", num_steps=1001), UserInputError, "num_steps"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, message):
    args = dict(name="ddim", num_steps=10, parameterization="eps", eta=0.0)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        samplers.sample(
            args["name"],
            fake_model,
            FIXTURES["x_T"],
            FIXTURES["alphas_cumprod"],
            args["num_steps"],
            args["parameterization"],
            eta=args["eta"],
        )
