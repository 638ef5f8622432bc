"""Write tests/fixtures/samplers.npz: reference trajectories of the diffusers schedulers that ldm/samplers.py
reproduces, driven by a deterministic analytic stand-in for the UNet.

Run with an environment that has torch and diffusers (not a project dependency):
    /work/devvenv/bin/python tools/make_sampler_fixtures.py

Every scheduler is created the way SD pipelines create it, `Scheduler.from_config(SD_SCHEDULER_CONFIG)`, so
keys the config lacks (timestep_spacing, solver_order, ...) take that scheduler's own defaults. The loop runs
in float64 so the references carry diffusers' arithmetic (its float32 schedule and coefficients) without
float32 rounding of the latents. The fake model is pure numpy and importable without torch, so the tests
evaluate exactly the same function.
"""

import os
import sys

import numpy as np

SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
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
LATENT_SHAPE = (1, 4, 8, 8)
LATENT_SEED = 1234
NOISE_SEED = 99

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(ROOT, "tests", "fixtures", "samplers.npz")

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


def _run_diffusers(scheduler, num_steps, eta):
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


def main() -> None:
    import diffusers

    arrays = {"x_T": initial_latents()}
    cases = [(s, p, n, 0.0) for s in SCHEDULERS for p in PREDICTION_TYPES for n in STEP_COUNTS]
    cases += [("ddim", p, n, ETA) for p in PREDICTION_TYPES for n in DDIM_ETA_STEPS]
    for sampler, param, num_steps, eta in cases:
        cls = getattr(diffusers, SCHEDULERS[sampler])
        scheduler = cls.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": PREDICTION_TYPES[param]})
        abar = scheduler.alphas_cumprod.numpy()
        arrays.setdefault("alphas_cumprod", abar)
        assert np.array_equal(arrays["alphas_cumprod"], abar), sampler
        ts, path = _run_diffusers(scheduler, num_steps, eta)
        key = case_key(sampler, param, num_steps, eta)
        mid = len(path) // 2
        arrays[f"{key}.timesteps"] = ts
        arrays[f"{key}.mid_index"] = np.int64(mid)
        arrays[f"{key}.mid"] = path[mid].astype(np.float32)
        arrays[f"{key}.final"] = path[-1].astype(np.float32)
        print(f"{key:28s} {len(ts):3d} evaluations, final |x| max {np.abs(path[-1]).max():.3f}")
    arrays["diffusers_version"] = np.array(diffusers.__version__)
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    np.savez_compressed(OUT_PATH, **arrays)
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
