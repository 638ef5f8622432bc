"""Write tests/fixtures/samplers.npz: reference trajectories of the diffusers schedulers that ldm/samplers.py
reproduces, driven by a deterministic analytic stand-in for the UNet, and how diffusers resolves scheduler
configs.

Run with an interpreter that has torch and diffusers (not a project dependency):
    python -m tools.dev.make_sampler_fixtures

Every scheduler is created as users create one from a model folder, `Scheduler.from_config(config)`, so keys
the config lacks take that scheduler's own defaults. The plain cases use SD 1.5's scheduler_config.json from
the Hub; the variant cases (`VARIANTS`) change its timestep spacing, steps_offset, clip_sample,
set_alpha_to_one or skip_prk_steps, or are tests/fixtures/tiny-sd1's saved config (a DDIMScheduler's, which
spells out "leading" spacing and lacks skip_prk_steps). `resolved` records, for each config in `configs`,
every __init__ argument each scheduler class ends up with. The loop runs in float64 so the references carry
diffusers' arithmetic (its float32 schedule and coefficients) without float32 rounding of the latents. The
fake model is pure numpy and importable without torch, so the tests evaluate exactly the same function.
"""

import inspect
import json
import os
import sys

import numpy as np

from tools import ROOT
OUT_PATH = os.path.join(ROOT, "tests", "fixtures", "samplers.npz")

# scheduler/scheduler_config.json of the SD releases on the Hub (runwayml/stable-diffusion-v1-5, now
# stable-diffusion-v1-5/stable-diffusion-v1-5; stabilityai/stable-diffusion-2-1 and -2-1-base)
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_BASE_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
TINY_FOLDER_CONFIG = os.path.join(ROOT, "tests", "fixtures", "tiny-sd1", "scheduler", "scheduler_config.json")
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "uni_pc": "UniPCMultistepScheduler",
}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
STEP_COUNTS = (1, 2, 7, 10, 20, 50)
DDIM_ETA_STEPS = (7, 20)  # extra DDIM cases with eta=1, fed the same numpy noise our sampler draws
ETA = 1.0
# variant -> (changes to SD_SCHEDULER_CONFIG, or a whole config file; the samplers it changes)
VARIANTS = {
    "leading0": ({"timestep_spacing": "leading", "steps_offset": 0}, tuple(SCHEDULERS)),
    "trailing": ({"timestep_spacing": "trailing"}, tuple(SCHEDULERS)),
    "linspace": ({"timestep_spacing": "linspace"}, ("ddim", "plms")),  # DPM-Solver++'s and UniPC's default
    "clip": ({"clip_sample": True, "clip_sample_range": 1.5}, ("ddim",)),
    "alpha1": ({"set_alpha_to_one": True}, ("ddim", "plms")),
    # skip_prk_steps=False for PLMS, "leading" with steps_offset 1 for the others; its DDIM is the plain one
    "tiny-sd1": (TINY_FOLDER_CONFIG, ("plms", "dpm_solver", "uni_pc")),
}
VARIANT_STEPS = (1, 7, 10)
V_VARIANTS = ("clip", "tiny-sd1")  # also recorded for v-prediction
LATENT_SHAPE = (1, 4, 8, 8)
LATENT_SEED = 1234
NOISE_SEED = 99

_PATTERN = np.sin(0.37 * np.arange(np.prod(LATENT_SHAPE[1:]), dtype=np.float64)).reshape(LATENT_SHAPE[1:])


def fake_model(x: np.ndarray, t: int) -> np.ndarray:
    """Smooth, bounded, nonlinear in x and dependent on t; float64 so both sides evaluate it identically."""
    x = np.asarray(x, dtype=np.float64)
    s = t / 1000.0
    return (0.6 + 0.3 * s) * x + 0.2 * np.sin(2.5 * x + s) + 0.1 * np.cos(7.0 * s) * _PATTERN


def initial_latents() -> np.ndarray:
    return np.random.default_rng(LATENT_SEED).standard_normal(LATENT_SHAPE, dtype=np.float32)


def case_key(sampler: str, parameterization: str, num_steps: int, eta: float = 0.0) -> str:
    return f"{sampler}.{parameterization}.{num_steps}" + (f".eta{eta:g}" if eta else "")


def variant_config(variant: str) -> dict:
    changes = VARIANTS[variant][0]
    if isinstance(changes, str):
        with open(changes) as f:
            return json.load(f)
    return {**SD_SCHEDULER_CONFIG, **changes}


def _run_diffusers(scheduler, num_steps, eta=0.0):
    import torch

    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(initial_latents().astype(np.float64)) * scheduler.init_noise_sigma
    rng = np.random.default_rng(NOISE_SEED)
    path = []
    for t in scheduler.timesteps:
        out = torch.from_numpy(fake_model(x.numpy(), int(t)))
        kwargs = {}
        if eta:
            # the draw ldm.samplers makes per step, handed over in place of torch's own noise
            noise = rng.standard_normal(LATENT_SHAPE, dtype=np.float32).astype(np.float64)
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noise)}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        path.append(x.numpy().copy())
    return scheduler.timesteps.numpy().astype(np.int64), path


def _resolved(cls, config):
    """Every __init__ argument of `cls` as `from_config(config)` sets it (the config also keeps unused keys)."""
    scheduler = cls.from_config(config)
    return {k: scheduler.config[k] for k in inspect.signature(cls.__init__).parameters if k in scheduler.config}


def _record(arrays, key, ts, path, mid=True):
    arrays[f"{key}.timesteps"] = ts
    if mid:
        arrays[f"{key}.mid_index"] = np.int64(len(path) // 2)
        arrays[f"{key}.mid"] = path[len(path) // 2].astype(np.float32)
    arrays[f"{key}.final"] = path[-1].astype(np.float32)
    print(f"{key:36s} {len(ts):3d} evaluations, final |x| max {np.abs(path[-1]).max():.3f}")


def main() -> None:
    import diffusers

    classes = {name: getattr(diffusers, cls) for name, cls in SCHEDULERS.items()}
    arrays = {"x_T": initial_latents()}
    cases = [(s, p, n, 0.0) for s in SCHEDULERS for p in PREDICTION_TYPES for n in STEP_COUNTS]
    cases += [("ddim", p, n, ETA) for p in PREDICTION_TYPES for n in DDIM_ETA_STEPS]
    for sampler, param, num_steps, eta in cases:
        scheduler = classes[sampler].from_config({**SD_SCHEDULER_CONFIG, "prediction_type": PREDICTION_TYPES[param]})
        abar = scheduler.alphas_cumprod.numpy()
        arrays.setdefault("alphas_cumprod", abar)
        assert np.array_equal(arrays["alphas_cumprod"], abar), sampler
        _record(arrays, case_key(sampler, param, num_steps, eta), *_run_diffusers(scheduler, num_steps, eta))

    variant_cases, refused = [], []
    for variant, (_, samplers) in VARIANTS.items():
        for sampler in samplers:
            for param in PREDICTION_TYPES if variant in V_VARIANTS else ("eps",):
                config = {**variant_config(variant), "prediction_type": PREDICTION_TYPES[param]}
                for num_steps in VARIANT_STEPS:
                    key = f"{variant}:{case_key(sampler, param, num_steps)}"
                    scheduler = classes[sampler].from_config(config)
                    assert np.array_equal(arrays["alphas_cumprod"], scheduler.alphas_cumprod.numpy()), key
                    try:
                        ts, path = _run_diffusers(scheduler, num_steps)
                    except ValueError as err:  # F-PNDM's warm-up cannot take fewer than 4 steps
                        print(f"{key:36s} refused: {err}")
                        refused.append(key)
                        continue
                    _record(arrays, key, ts, path, mid=False)
                    variant_cases.append(key)
    arrays["variant_cases"] = np.array(variant_cases)
    arrays["variant_refused"] = np.array(refused)

    configs = {"sd15": SD_SCHEDULER_CONFIG, "sd21": SD21_SCHEDULER_CONFIG, "sd21-base": SD21_BASE_SCHEDULER_CONFIG,
               "empty": {}, **{variant: variant_config(variant) for variant in VARIANTS}}
    arrays["configs"] = np.array(json.dumps(configs))
    resolved = {name: {sampler: _resolved(cls, config) for sampler, cls in classes.items()}
                for name, config in configs.items()}
    arrays["resolved"] = np.array(json.dumps(resolved))
    arrays["diffusers_version"] = np.array(diffusers.__version__)
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    np.savez_compressed(OUT_PATH, **arrays)
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
