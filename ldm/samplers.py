"""Samplers for latent diffusion: DDIM, PLMS, DPM-Solver++ (2M) and UniPC (bh2, order 2).

Each one reproduces the diffusers scheduler that Stable Diffusion pipelines use, as created by
`Scheduler.from_config(...)` from SD's scheduler_config.json (steps_offset=1, set_alpha_to_one=False,
skip_prk_steps=True, clip_sample=False; every other setting at that scheduler's own default):

- ``ddim``: DDIMScheduler, "leading" timestep spacing, optional eta noise.
- ``plms``: PNDMScheduler with skip_prk_steps=True, "leading" spacing.
- ``dpm_solver``: DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final, final sigma 0, "linspace" spacing.
- ``uni_pc``: UniPCMultistepScheduler, bh2, solver_order=2, predict_x0, lower_order_final, final sigma 0,
  "linspace" spacing.

The model is a plain callback ``model_fn(x, t) -> raw output`` (numpy in, numpy out); classifier-free
guidance belongs to the caller's wrapper around it. Coefficients and updates are computed in float64 from
``alphas_cumprod``; latents are kept in float32 between steps, as in a float32 pipeline.

DDIM with eta > 0 draws its noise from a caller-supplied ``numpy.random.Generator``, one
``standard_normal(x.shape, dtype=float32)`` per step, so a seed reproduces a sample here but can never
reproduce diffusers' torch-generated noise.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np

PARAMETERIZATIONS = ("eps", "v")

# Callback signature: (evaluation index, timestep just evaluated, latents after the update).
Callback = Callable[[int, int, np.ndarray], None]
ModelFn = Callable[[np.ndarray, int], np.ndarray]


# ---------------------------------------------------------------- timestep spacings


def _leading_timesteps(num_steps: int, num_train: int) -> np.ndarray:
    # diffusers "leading" spacing with SD's steps_offset=1: multiples of T // n shifted up by one,
    # so the last step is taken at t=1 and the first at (n-1) * (T // n) + 1.
    return np.arange(num_steps - 1, -1, -1, dtype=np.int64) * (num_train // num_steps) + 1


def _linspace_timesteps(num_steps: int, num_train: int) -> np.ndarray:
    # diffusers "linspace" spacing: n+1 rounded points spread over [0, T-1], minus the 0 end because
    # these solvers take their last step to the clean sample (sigma 0) instead of to t=0.
    return np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def _plms_timesteps(num_steps: int, num_train: int) -> np.ndarray:
    # Without the Runge-Kutta warm-up, diffusers' PLMS evaluates the second timestep twice: once after
    # a plain first step and once more after redoing that first step with the averaged outputs.
    ts = _leading_timesteps(num_steps, num_train)
    return np.concatenate([ts[:1], ts[1:2], ts[1:]])


# ---------------------------------------------------------------- shared math


def _split_prediction(out: np.ndarray, x: np.ndarray, abar: float, parameterization: str):
    """(x0, eps) implied by the raw model output `out` at latents `x` and noise level `abar`."""
    out = np.asarray(out, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    if parameterization == "eps":
        return (x - s * out) / a, out
    # v = a * eps - s * x0 (Salimans & Ho), solved for x0 and eps with a^2 + s^2 = 1
    return a * x - s * out, a * out + s * x


def _ddim_update(x0: np.ndarray, eps: np.ndarray, abar_prev: float, std: float = 0.0) -> np.ndarray:
    # DDIM eq. 12 without its noise term; PNDM's transfer formula is algebraically the same update.
    return np.sqrt(abar_prev) * x0 + np.sqrt(1.0 - abar_prev - std**2) * eps


def _abar_before(abar: np.ndarray, t: int) -> float:
    # Stepping past t=0 lands on abar[0], not on 1 (SD's set_alpha_to_one=False).
    return float(abar[t]) if t >= 0 else float(abar[0])


# ---------------------------------------------------------------- DDIM and PLMS


def _run_ddim(model_fn, x, abar, num_steps, parameterization, report, eta, rng):
    stride = len(abar) // num_steps
    for i, t in enumerate(_leading_timesteps(num_steps, len(abar))):
        abar_t, abar_prev = float(abar[t]), _abar_before(abar, t - stride)
        x0, eps = _split_prediction(model_fn(x, int(t)), x, abar_t, parameterization)
        # sigma_t of DDIM eq. 16: eta=1 is ancestral DDPM sampling, eta=0 the deterministic ODE step
        std = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        x_next = _ddim_update(x0, eps, abar_prev, std)
        if eta > 0:
            x_next = x_next + std * rng.standard_normal(x.shape, dtype=np.float32)
        x = x_next.astype(np.float32)
        report(i, int(t), x)
    return x


# Adams-Bashforth weights by history length, newest output first (PNDM paper eq. 12 and its warm-up).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _run_plms(model_fn, x, abar, num_steps, parameterization, report):
    stride = len(abar) // num_steps
    outputs = []  # raw outputs at the accepted points, oldest first; the first step's probe is not kept
    x_start = x
    for i, t in enumerate(_plms_timesteps(num_steps, len(abar))):
        out = np.asarray(model_fn(x, int(t)), dtype=np.float64)
        if i == 1:
            # Redo the first step from its start with the mean of the outputs at both of its ends.
            t_from, x_from, combined = t + stride, x_start, (outputs[0] + out) / 2
        else:
            outputs = (outputs + [out])[-4:]
            weights = _ADAMS_BASHFORTH[len(outputs)]
            combined = sum(w * o for w, o in zip(weights, reversed(outputs)))
            t_from, x_from = t, x
        # Raw outputs are combined first and only the combination is converted to eps, at the point the
        # step starts from. For v-prediction that differs (at second order in the step size) from
        # combining per-point eps; diffusers does it this way and is the reference.
        x0, eps = _split_prediction(combined, x_from, float(abar[t_from]), parameterization)
        x = _ddim_update(x0, eps, _abar_before(abar, t_from - stride)).astype(np.float32)
        report(i, int(t), x)
    return x


# ---------------------------------------------------------------- DPM-Solver++ and UniPC


def _multistep_order(i: int, num_steps: int) -> int:
    # Order 1 on the first step (no history yet) and on the last one (lower_order_final; landing on
    # sigma 0 makes the step in lambda infinite, where a second-order correction is meaningless).
    return 1 if i == 0 or i == num_steps - 1 else 2


def _unic_weights(h: float, r: float):
    """UniC (bh2, order 2) weights (rho_hist, rho_new): solve [[1, 1], [r, 1]] rho = (b1, b2)."""
    hh = -h  # data prediction integrates in -lambda
    b_h = np.expm1(hh)
    phi = b_h / hh - 1.0
    b1 = phi / b_h
    b2 = 2.0 * (phi / hh - 0.5) / b_h
    rho_hist = (b1 - b2) / (1.0 - r)
    return rho_hist, b1 - rho_hist


def _run_multistep(model_fn, x, abar, num_steps, parameterization, report, corrector):
    """DPM-Solver++(2M); with `corrector`, UniPC, whose bh2 order-2 predictor is this same 2M step."""
    ts = _linspace_timesteps(num_steps, len(abar))
    levels = np.append(abar[ts].astype(np.float64), 1.0)  # the last step lands on the clean sample
    alpha, sigma = np.sqrt(levels), np.sqrt(1.0 - levels)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # half log-SNR; +inf at the final level

    def exp_euler(x_from, k, j, x0):
        # Exact solution of the data-prediction ODE from level k to level j with x0 held constant;
        # at the final level it returns x0 itself (sigma 0, expm1(-inf) = -1).
        return sigma[j] / sigma[k] * x_from.astype(np.float64) - alpha[j] * np.expm1(lam[k] - lam[j]) * x0

    x0_hist = []  # data predictions of the last two steps, oldest first
    x_from = None
    for i, t in enumerate(ts):
        x0, _ = _split_prediction(model_fn(x, int(t)), x, levels[i], parameterization)
        if corrector and i > 0:
            # UniC: redo the previous step with the output at its end, which was computed for the
            # uncorrected x and is still reused below (the corrector costs no extra evaluation).
            h = lam[i] - lam[i - 1]
            if _multistep_order(i - 1, num_steps) == 1:
                x0_eff = (x0_hist[-1] + x0) / 2
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_hist, rho_new = _unic_weights(h, r)
                m0, m1 = x0_hist[-1], x0_hist[-2]
                x0_eff = m0 + rho_hist * (m1 - m0) / r + rho_new * (x0 - m0)
            x = exp_euler(x_from, i - 1, i, x0_eff).astype(np.float32)
        x0_hist = (x0_hist + [x0])[-2:]
        x_from = x
        if _multistep_order(i, num_steps) == 1:
            x0_eff = x0
        else:
            # midpoint 2M: D1 = (m0 - m1) / r0 with r0 = h_prev / h, applied with weight 1/2
            r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            x0_eff = x0_hist[-1] + 0.5 * (x0_hist[-1] - x0_hist[-2]) / r0
        x = exp_euler(x_from, i, i + 1, x0_eff).astype(np.float32)
        report(i, int(t), x)
    return x


# ---------------------------------------------------------------- registry and entry points


@dataclass(frozen=True)
class Sampler:
    """A sampling algorithm: where it evaluates the model and the loop that does it."""

    timesteps: Callable[[int, int], np.ndarray]  # (num_steps, num_train_timesteps) -> evaluation timesteps
    loop: Callable[..., np.ndarray]
    takes_eta: bool = False


SAMPLERS = {
    "ddim": Sampler(_leading_timesteps, _run_ddim, takes_eta=True),
    "plms": Sampler(_plms_timesteps, _run_plms),
    "dpm_solver": Sampler(_linspace_timesteps, partial(_run_multistep, corrector=False)),
    "uni_pc": Sampler(_linspace_timesteps, partial(_run_multistep, corrector=True)),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def timesteps(name: str, num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timesteps `name` evaluates the model at, in order (diffusers' `scheduler.timesteps`).

    PLMS evaluates num_steps + 1 times (its second timestep twice); the others num_steps times.
    """
    _check_num_steps(num_steps, num_train_timesteps)
    return get_sampler(name).timesteps(num_steps, num_train_timesteps)


def _check_num_steps(num_steps: int, num_train: int) -> None:
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")


def sample(
    name: str,
    model_fn: ModelFn,
    x_T: np.ndarray,
    alphas_cumprod: np.ndarray,
    num_steps: int,
    parameterization: str = "eps",
    eta: float = 0.0,
    rng: Optional[np.random.Generator] = None,
    callback: Optional[Callback] = None,
) -> np.ndarray:
    """Run sampler `name` from pure noise `x_T` and return the final latents x_0 (float32).

    model_fn(x, t) gets float32 latents and an int timestep and returns the raw model output (eps or v,
    as `parameterization` says). alphas_cumprod is the training schedule (length = train timesteps).
    eta (DDIM only) scales the per-step noise, which is drawn from `rng`. callback(i, t, x) runs after
    every model evaluation with the updated latents.
    """
    spec = get_sampler(name)
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or not np.all((abar > 0) & (abar < 1)):
        raise ValueError("alphas_cumprod must be a 1-D array of values in (0, 1)")
    _check_num_steps(num_steps, len(abar))
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    extra = {}
    if spec.takes_eta:
        if eta > 0 and rng is None:
            raise ValueError("eta > 0 needs a numpy Generator as rng")
        extra = {"eta": float(eta), "rng": rng}
    elif eta != 0:
        raise ValueError(f"eta only applies to ddim, not to {name!r}")
    # every one of these schedulers has init_noise_sigma = 1, so x_T is used as it is
    x = np.array(x_T, dtype=np.float32)
    report = callback if callback is not None else (lambda i, t, x: None)
    return spec.loop(model_fn, x, abar, num_steps, parameterization, report, **extra)
