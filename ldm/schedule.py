"""The DDPM noise schedule of Stable Diffusion ("scaled linear" betas).

numpy float64 arrays are the source of truth (samplers do their arithmetic on them); `NoiseSchedule`
holds float32 copies as Tensors so that the forward process and the v target can be gathered per
sample inside a MindSpore graph.
"""
import numpy as np
from mindspore import nn, ops, Tensor


def make_betas(linear_start=0.00085, linear_end=0.012, timesteps=1000):
    """CompVis `make_beta_schedule("linear")`: linear in sqrt(beta), then squared."""
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2


def make_alphas_cumprod(linear_start=0.00085, linear_end=0.012, timesteps=1000):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64, length `timesteps`."""
    return np.cumprod(1.0 - make_betas(linear_start, linear_end, timesteps))


class NoiseSchedule(nn.Cell):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0.

    Built from the training schedule's `alphas_cumprod` (`[T]`, float64). `t` is an int Tensor `[B]`;
    x0 and noise are `[B, ...]`. Holds no parameters.
    """

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
        self.sqrt_alphas_cumprod = Tensor(np.sqrt(self.alphas_cumprod).astype(np.float32))
        self.sqrt_one_minus_alphas_cumprod = Tensor(np.sqrt(1.0 - self.alphas_cumprod).astype(np.float32))

    @classmethod
    def from_config(cls, cfg):
        """From a `ModelConfig` (its linear_start, linear_end, timesteps)."""
        return cls(make_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps))

    def _coefficients(self, x, t):
        shape = (-1,) + (1,) * (len(ops.shape(x)) - 1)
        return (ops.cast(ops.reshape(ops.gather(self.sqrt_alphas_cumprod, t, 0), shape), x.dtype),
                ops.cast(ops.reshape(ops.gather(self.sqrt_one_minus_alphas_cumprod, t, 0), shape), x.dtype))

    def add_noise(self, x0, noise, t):
        a, s = self._coefficients(x0, t)
        return a * x0 + s * noise

    def v_target(self, x0, noise, t):
        a, s = self._coefficients(x0, t)
        return a * noise - s * x0

    def construct(self, x0, noise, t):
        return self.add_noise(x0, noise, t)
