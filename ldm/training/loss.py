"""The Textual Inversion training loss: SD's denoising loss as a function of the placeholder vectors."""

import mindspore as ms
from mindspore import nn, ops

from ldm.schedule import NoiseSchedule


class TextualInversionLoss(nn.Cell):
    """Denoising loss as a function of the placeholder vectors (the only differentiated input).

    The conditioner (`ldm.modules.conditioner`) turns the captions' ids and the vectors into the UNet's
    context (and SDXL's vector of pooled text and size ids); the UNet sees the latents noised to each
    sample's timestep and predicts the noise (`parameterization` "eps") or v ("v"); the loss is the mean
    squared error times `loss_scale` (1 in fp32).
    """

    def __init__(self, unet, conditioner, alphas_cumprod, parameterization):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.schedule = NoiseSchedule(alphas_cumprod)
        self.v_prediction = parameterization == "v"

    def construct(self, vectors, latents, input_ids, noise, timesteps, loss_scale, size_ids=None):
        context, y = self.conditioner(input_ids, vectors, size_ids)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        pred = ops.cast(self.unet(noisy, timesteps, context, y), ms.float32)
        target = self.schedule.v_target(latents, noise, timesteps) if self.v_prediction else noise
        return ops.mean((pred - target) ** 2) * loss_scale
