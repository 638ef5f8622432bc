"""Samplers for latent diffusion: DDIM, PLMS, DPM-Solver++ (2M) and UniPC (bh2, order 2).

Each one reproduces a diffusers scheduler as `Scheduler.from_config(config)` makes it from the model's
scheduler_config.json: the keys the file has win, and the keys it lacks take that scheduler class's own
default, which differs between classes. So SD's hub folders, which leave timestep_spacing out, give DDIM
and PLMS "leading" steps but DPM-Solver++ and UniPC "linspace" ones, while a folder saved by a recent
diffusers spells out its scheduler's "leading", and all four follow it.
`scheduler_settings(config)` resolves one config for every sampler into a `SchedulerSettings`; what each
follows (in parentheses diffusers' default, taken when the config lacks the key):

- ``ddim``: DDIMScheduler: timestep_spacing ("leading"), steps_offset (0), clip_sample (True) of the x0
  prediction to +-clip_sample_range (1.0), set_alpha_to_one (True); optional eta noise.
- ``plms``: PNDMScheduler: timestep_spacing ("leading"), steps_offset (0), set_alpha_to_one (False),
  skip_prk_steps (False: F-PNDM, whose first three steps are Runge-Kutta steps of 4 evaluations each;
  True: PLMS proper, which SD's own configs ask for).
- ``dpm_solver``: DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", final sigma 0: timestep_spacing ("linspace"), steps_offset (0).
- ``uni_pc``: UniPCMultistepScheduler, bh2, solver_order=2, predict_x0, lower_order_final, final sigma 0:
  timestep_spacing ("linspace"), steps_offset (0).

Single files sample with SD's own scheduler config, `SD_SCHEDULER_CONFIG` (the same sampling keys for SD
1.x and 2.x): "leading" spacing with steps_offset 1, no clipping, set_alpha_to_one False and no Runge-Kutta
steps for DDIM and PLMS; "linspace" for DPM-Solver++ and UniPC. The prediction type is the caller's
`parameterization` (the model config's, which a diffusers folder takes from the same file) and the noise
schedule its `alphas_cumprod`. Other keys a scheduler class takes are implemented at diffusers' default
only (`Sampler.fixed`): a config that sets another value gets a warning and is sampled with the default.

The model is a plain callback ``model_fn(x, t) -> raw output`` (numpy in, numpy out); classifier-free
guidance belongs to the caller's wrapper around it. Coefficients and updates are computed in float64 from
``alphas_cumprod``; latents are kept in float32 between steps, as in a float32 pipeline.

DDIM with eta > 0 draws its noise from a caller-supplied ``numpy.random.Generator``, one
``standard_normal(x.shape, dtype=float32)`` per step, so a seed reproduces a sample here but can never
reproduce diffusers' torch-generated noise.
"""

import itertools
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import numpy as np

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "v")
SPACINGS = ("leading", "trailing", "linspace")

# The sampling keys of SD's scheduler_config.json on the Hub (SD 1.5's PNDMScheduler, 2.1-base's
# PNDMScheduler and 2.1's DDIMScheduler files agree on them; none sets timestep_spacing).
SD_SCHEDULER_CONFIG = {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}

# Callback signature: (evaluation index, timestep just evaluated, latents after the update).
Callback = Callable[[int, int, np.ndarray], None]
ModelFn = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class SchedulerSettings:
    """Where and how one sampler steps; a sampler reads only the fields its diffusers class has."""

    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True

    def __post_init__(self):
        if self.timestep_spacing not in SPACINGS:
            raise UserInputError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, "
                                 f"got {self.timestep_spacing!r}")


# ---------------------------------------------------------------- timestep spacings


def _checked(ts: np.ndarray, num_steps: int, num_train: int, s: SchedulerSettings) -> np.ndarray:
    if ts[-1] < 0 or ts[0] >= num_train or np.any(ts[1:] >= ts[:-1]):
        raise UserInputError(f"{num_steps} steps with {s.timestep_spacing!r} spacing and steps_offset "
                             f"{s.steps_offset} give timesteps outside [0, {num_train - 1}] or repeated ones; "
                             "choose another number of steps")
    return ts


def _trailing_timesteps(num_steps: int, num_train: int) -> np.ndarray:
    # the same in all four schedulers: n evenly spaced points counted down from the last timestep
    return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1


def _single_step_timesteps(num_steps: int, num_train: int, s: SchedulerSettings) -> np.ndarray:
    """DDIMScheduler's and PNDMScheduler's timesteps, descending (steps_offset applies to "leading" only)."""
    if s.timestep_spacing == "leading":
        ts = np.arange(num_steps - 1, -1, -1, dtype=np.int64) * (num_train // num_steps) + s.steps_offset
    elif s.timestep_spacing == "trailing":
        ts = _trailing_timesteps(num_steps, num_train)
    else:
        ts = np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
    return _checked(ts, num_steps, num_train, s)


def _multistep_timesteps(num_steps: int, num_train: int, s: SchedulerSettings) -> np.ndarray:
    """DPMSolverMultistepScheduler's and UniPCMultistepScheduler's timesteps, descending.

    "leading" and "linspace" lay n + 1 points and drop the one at 0, because these solvers take their
    last step to the clean sample (sigma 0) instead of to a timestep.
    """
    if s.timestep_spacing == "leading":
        ts = np.arange(num_steps, 0, -1, dtype=np.int64) * (num_train // (num_steps + 1)) + s.steps_offset
    elif s.timestep_spacing == "trailing":
        ts = _trailing_timesteps(num_steps, num_train)
    else:
        ts = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    return _checked(ts, num_steps, num_train, s)


def _plms_timesteps(num_steps: int, num_train: int, s: SchedulerSettings) -> np.ndarray:
    ts = _single_step_timesteps(num_steps, num_train, s)
    if s.skip_prk_steps:
        # PLMS evaluates the second timestep twice: once after a plain first step and once more after
        # redoing that first step with the averaged outputs.
        return np.concatenate([ts[:1], ts[1:2], ts[1:]])
    if num_steps < 4:
        raise UserInputError(f"plms with skip_prk_steps=False (the model's scheduler config, or PNDMScheduler's "
                             f"default when it lacks the key) takes Runge-Kutta steps over its first 4 timesteps and "
                             f"needs num_steps >= 4, got {num_steps}")
    # each Runge-Kutta step evaluates its start, its midpoint twice and its end
    mids = ts[1:4] + num_train // num_steps // 2
    return np.concatenate([np.stack([ts[:3], mids, mids, ts[1:4]], axis=1).ravel(), ts[3:]])


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


def _abar_before(abar: np.ndarray, t: int, set_alpha_to_one: bool) -> float:
    # Stepping past t=0 lands on 1 with set_alpha_to_one, else on abar[0] (SD's configs).
    if t >= 0:
        return float(abar[t])
    return 1.0 if set_alpha_to_one else float(abar[0])


# ---------------------------------------------------------------- DDIM and PLMS
# Both step from t to t - T // n whatever the spacing, as diffusers does: with "linspace" or "trailing"
# that is not always the next timestep.


def _run_ddim(model_fn, x, abar, num_steps, parameterization, report, settings, eta, rng):
    stride = len(abar) // num_steps
    for i, t in enumerate(_single_step_timesteps(num_steps, len(abar), settings)):
        abar_t, abar_prev = float(abar[t]), _abar_before(abar, t - stride, settings.set_alpha_to_one)
        x0, eps = _split_prediction(model_fn(x, int(t)), x, abar_t, parameterization)
        if settings.clip_sample:
            # eps stays the model's (diffusers' use_clipped_model_output=False, as its pipelines call it)
            x0 = np.clip(x0, -settings.clip_sample_range, settings.clip_sample_range)
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


def _run_plms(model_fn, x, abar, num_steps, parameterization, report, settings):
    stride = len(abar) // num_steps
    ts = _plms_timesteps(num_steps, len(abar), settings)
    evaluation = itertools.count()

    def transfer(x_from, t_from, t_to, out):
        # Raw outputs are combined first and only the combination is converted to eps, at the point the
        # step starts from. For v-prediction that differs (at second order in the step size) from
        # combining per-point eps; diffusers does it this way and is the reference.
        x0, eps = _split_prediction(out, x_from, float(abar[t_from]), parameterization)
        return _ddim_update(x0, eps, _abar_before(abar, t_to, settings.set_alpha_to_one)).astype(np.float32)

    outputs = []  # raw outputs at the accepted points, oldest first
    if not settings.skip_prk_steps:
        # F-PNDM's warm-up: classic RK4 from each of the first three timesteps to the next, evaluated at
        # (t, mid, mid, next); as in diffusers, the first probe steps to t - stride // 2, not to mid.
        for t, t_mid, _, t_next in ts[:12].reshape(3, 4):
            x_start, k = x, []
            for t_eval, t_to in ((t, t - stride // 2), (t_mid, t_mid), (t_mid, t_next), (t_next, t_next)):
                k.append(np.asarray(model_fn(x, int(t_eval)), dtype=np.float64))
                out = k[-1] if len(k) < 4 else (k[0] + 2 * k[1] + 2 * k[2] + k[3]) / 6
                x = transfer(x_start, t, t_to, out)
                report(next(evaluation), int(t_eval), x)
            outputs.append(k[0])
        ts = ts[12:]
    x_start = x
    for j, t in enumerate(ts):
        out = np.asarray(model_fn(x, int(t)), dtype=np.float64)
        if settings.skip_prk_steps and j == 1:
            # Redo the first step from its start with the mean of the outputs at both of its ends.
            t_from, x_from, combined = t + stride, x_start, (outputs[0] + out) / 2
        else:
            outputs = (outputs + [out])[-4:]
            combined = sum(w * o for w, o in zip(_ADAMS_BASHFORTH[len(outputs)], reversed(outputs)))
            t_from, x_from = t, x
        x = transfer(x_from, t_from, t_from - stride, combined)
        report(next(evaluation), int(t), x)
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


def _run_multistep(model_fn, x, abar, num_steps, parameterization, report, settings, corrector):
    """DPM-Solver++(2M); with `corrector`, UniPC, whose bh2 order-2 predictor is this same 2M step."""
    ts = _multistep_timesteps(num_steps, len(abar), settings)
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
    """A sampling algorithm: where it evaluates the model, the loop that does it, what config it follows."""

    timesteps: Callable[[int, int, SchedulerSettings], np.ndarray]  # (n, train timesteps, settings) -> evaluations
    loop: Callable[..., np.ndarray]
    defaults: dict  # its diffusers class's defaults for the SchedulerSettings fields that class has
    fixed: dict = field(default_factory=dict)  # other keys of the class: the one value implemented, diffusers' default
    takes_eta: bool = False


_MULTISTEP_FIXED = dict(solver_order=2, thresholding=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                        use_beta_sigmas=False, final_sigmas_type="zero", rescale_betas_zero_snr=False)

SAMPLERS = {
    "ddim": Sampler(
        _single_step_timesteps, _run_ddim,
        dict(timestep_spacing="leading", steps_offset=0, clip_sample=True, clip_sample_range=1.0,
             set_alpha_to_one=True),
        dict(thresholding=False, rescale_betas_zero_snr=False), takes_eta=True),
    "plms": Sampler(
        _plms_timesteps, _run_plms,
        dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=False, skip_prk_steps=False)),
    # lower_order_final and euler_at_final change nothing at order 2 with a final sigma of 0
    "dpm_solver": Sampler(
        _multistep_timesteps, partial(_run_multistep, corrector=False),
        dict(timestep_spacing="linspace", steps_offset=0),
        dict(_MULTISTEP_FIXED, algorithm_type="dpmsolver++", solver_type="midpoint", use_lu_lambdas=False,
             lambda_min_clipped=-np.inf)),
    "uni_pc": Sampler(
        _multistep_timesteps, partial(_run_multistep, corrector=True),
        dict(timestep_spacing="linspace", steps_offset=0),
        dict(_MULTISTEP_FIXED, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[])),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise UserInputError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def scheduler_settings(config: Optional[dict] = None, source: str = "SD's scheduler config") -> dict:
    """`{sampler: SchedulerSettings}` from a diffusers scheduler config (the dict of a scheduler_config.json),
    each resolved as that sampler's diffusers class's `from_config` does; None = `SD_SCHEDULER_CONFIG`.

    `source` names the config in errors and in the warning about values not followed.
    """
    config = SD_SCHEDULER_CONFIG if config is None else config
    settings, ignored = {}, {}
    for name, spec in SAMPLERS.items():
        try:
            settings[name] = SchedulerSettings(**{k: config.get(k, v) for k, v in spec.defaults.items()})
        except UserInputError as err:
            raise UserInputError(f"{source}: {err}") from None
        for key, value in spec.fixed.items():
            if key in config and config[key] != value:
                ignored.setdefault(f"{key}={config[key]!r}", []).append(name)
    if ignored:
        logger.warning("%s: not followed, sampled with diffusers' defaults instead: %s", source,
                       "; ".join(f"{key} ({', '.join(names)})" for key, names in ignored.items()))
    return settings


def timesteps(name: str, num_steps: int, num_train_timesteps: int = 1000,
              settings: Optional[SchedulerSettings] = None) -> np.ndarray:
    """The timesteps `name` evaluates the model at, in order (diffusers' `scheduler.timesteps`).

    PLMS evaluates num_steps + 1 times (its second timestep twice), or with Runge-Kutta steps 12 times over
    its first 4 timesteps and once at each later one; the others num_steps times. settings: None = SD's.
    """
    spec = get_sampler(name)
    _check_num_steps(num_steps, num_train_timesteps)
    return spec.timesteps(num_steps, num_train_timesteps, settings or scheduler_settings()[name])


def _check_num_steps(num_steps: int, num_train: int) -> None:
    if not 1 <= num_steps <= num_train:
        raise UserInputError(f"num_steps must be in [1, {num_train}], got {num_steps}")


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
    settings: Optional[SchedulerSettings] = None,
) -> np.ndarray:
    """Run sampler `name` from pure noise `x_T` and return the final latents x_0 (float32).

    model_fn(x, t) gets float32 latents and an int timestep and returns the raw model output (eps or v,
    as `parameterization` says). alphas_cumprod is the training schedule (length = train timesteps).
    eta (DDIM only) scales the per-step noise, which is drawn from `rng`. callback(i, t, x) runs after
    every model evaluation with the updated latents. settings: the model's for this sampler (see
    `scheduler_settings`); None = SD's.
    """
    spec = get_sampler(name)
    settings = settings or scheduler_settings()[name]
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or not np.all((abar > 0) & (abar < 1)):
        raise ValueError("alphas_cumprod must be a 1-D array of values in (0, 1)")
    _check_num_steps(num_steps, len(abar))
    spec.timesteps(num_steps, len(abar), settings)  # refuses timesteps off the schedule before any evaluation
    if eta < 0:
        raise UserInputError(f"eta must be >= 0, got {eta}")
    extra = {}
    if spec.takes_eta:
        if eta > 0 and rng is None:
            raise ValueError("eta > 0 needs a numpy Generator as rng")
        extra = {"eta": float(eta), "rng": rng}
    elif eta != 0:
        raise UserInputError(f"eta only applies to ddim, not to {name!r}")
    # every one of these schedulers has init_noise_sigma = 1, so x_T is used as it is
    x = np.array(x_T, dtype=np.float32)
    report = callback if callback is not None else (lambda i, t, x: None)
    return spec.loop(model_fn, x, abar, num_steps, parameterization, report, settings, **extra)
