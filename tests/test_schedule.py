"""ldm.schedule: SD's scaled-linear schedule and the forward process."""
import numpy as np
from mindspore import Tensor

from ldm.models import ModelConfig
from ldm.schedule import NoiseSchedule, make_alphas_cumprod, make_betas


def test_scaled_linear_schedule_values():
    betas = make_betas(0.00085, 0.012, 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(betas[1]) - np.sqrt(betas[0]), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999)
    abar = make_alphas_cumprod()
    # diffusers' float32 DDPMScheduler(beta_schedule="scaled_linear") gives 0.99915, 0.0046600951
    np.testing.assert_allclose(abar[[0, -1]], [0.99915, 0.0046600951], rtol=1e-6)


def test_add_noise_and_v_target_gather_per_sample():
    schedule = NoiseSchedule.from_config(ModelConfig())
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    a = np.sqrt(schedule.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    s = np.sqrt(1 - schedule.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    xt = schedule.add_noise(Tensor(x0), Tensor(noise), Tensor(t)).asnumpy()
    v = schedule.v_target(Tensor(x0), Tensor(noise), Tensor(t)).asnumpy()
    np.testing.assert_allclose(xt, a * x0 + s * noise, atol=1e-6)
    np.testing.assert_allclose(v, a * noise - s * x0, atol=1e-6)
    # the v target recovers x0 from x_t: x0 = a x_t - s v
    np.testing.assert_allclose(a * xt - s * v, x0, atol=1e-5)
