"""The KL autoencoder of LDM (CompVis `ldm/modules/diffusionmodules/model.py` Encoder/Decoder names)."""
import mindspore as ms
from mindspore import nn, ops

from ldm.errors import ModelConfigError
from ldm.modules.layers import Attention, Conv2d, GroupNorm, Upsample


def swish(x):
    return ops.silu(x)


class ResnetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        self.norm1 = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1, dtype=dtype)

    def construct(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1x1 convs as in the original."""

    def __init__(self, channels, norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        self.norm = GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.q = Conv2d(channels, channels, 1, dtype=dtype)
        self.k = Conv2d(channels, channels, 1, dtype=dtype)
        self.v = Conv2d(channels, channels, 1, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, dtype=dtype)
        self.attention = Attention(channels ** -0.5)

    def construct(self, x):
        b, c, h, w = ops.shape(x)
        hn = self.norm(x)

        def tokens(t):
            return ops.transpose(ops.reshape(t, (b, c, h * w)), (0, 2, 1))

        out = self.attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        return x + self.proj_out(ops.reshape(ops.transpose(out, (0, 2, 1)), (b, c, h, w)))


class Downsample(nn.Cell):
    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype)

    def construct(self, x):
        # the original pads right/bottom only, then a valid stride-2 conv
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class _Level(nn.Cell):
    """One resolution of the encoder (`down.I`) or decoder (`up.I`): res blocks, optional attention
    after each of them, then an optional resampler (`downsample` / `upsample`)."""

    def __init__(self, channels_in, channels_out, num_blocks, use_attn, resample, norm_num_groups, dtype):
        super().__init__()
        blocks, attns = [], []
        for _ in range(num_blocks):
            blocks.append(ResnetBlock(channels_in, channels_out, norm_num_groups, dtype=dtype))
            channels_in = channels_out
            if use_attn:
                attns.append(AttnBlock(channels_out, norm_num_groups, dtype=dtype))
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.use_attn = use_attn
        self.resample = resample
        if resample == "down":
            self.downsample = Downsample(channels_out, dtype=dtype)
        elif resample == "up":
            self.upsample = Upsample(channels_out, dtype=dtype)

    def construct(self, h):
        for i in range(len(self.block)):
            h = self.block[i](h)
            if self.use_attn:
                h = self.attn[i](h)
        if self.resample == "down":
            h = self.downsample(h)
        elif self.resample == "up":
            h = self.upsample(h)
        return h


class _Mid(nn.Cell):
    def __init__(self, channels, norm_num_groups, dtype):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_num_groups, dtype=dtype)
        self.attn_1 = AttnBlock(channels, norm_num_groups, dtype=dtype)
        self.block_2 = ResnetBlock(channels, channels, norm_num_groups, dtype=dtype)

    def construct(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Cell):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1, dtype=dtype)
        levels, res, block_in = [], resolution, ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            levels.append(_Level(block_in, ch * mult, num_res_blocks, res in attn_resolutions,
                                 None if last else "down", norm_num_groups, dtype))
            block_in = ch * mult
            res = res if last else res // 2
        self.down = nn.CellList(levels)
        self.mid = _Mid(block_in, norm_num_groups, dtype)
        self.norm_out = GroupNorm(norm_num_groups, block_in, eps=1e-6)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1, dtype=dtype)
        self.mid = _Mid(block_in, norm_num_groups, dtype)
        levels = []
        for i in reversed(range(len(ch_mult))):
            levels.append(_Level(block_in, ch * ch_mult[i], num_res_blocks + 1, res in attn_resolutions,
                                 "up" if i != 0 else None, norm_num_groups, dtype))
            block_in = ch * ch_mult[i]
            res = res * 2 if i != 0 else res
        # `up.I` is resolution level I (up.0 the full-resolution one, run last), as in the original
        self.up = nn.CellList(levels[::-1])
        self.norm_out = GroupNorm(norm_num_groups, block_in, eps=1e-6)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1, dtype=dtype)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    """`encode(x) -> (mean, logvar)` of the latent posterior, `decode(z) -> image`.

    Latents are unscaled: callers multiply by the model's scale_factor.
    """

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), in_channels=3,
                 out_ch=3, z_channels=4, embed_dim=4, resolution=256, double_z=True, norm_num_groups=32,
                 dtype=ms.float32):
        super().__init__()
        if not double_z:
            raise ModelConfigError("AutoencoderKL needs double_z=True (the posterior has a mean and a log-variance)")
        self.dtype = dtype
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
                               z_channels, double_z, norm_num_groups, dtype=dtype)
        self.decoder = Decoder(ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                               norm_num_groups, dtype=dtype)
        self.quant_conv = Conv2d(2 * z_channels, 2 * embed_dim, 1, dtype=dtype)
        self.post_quant_conv = Conv2d(embed_dim, z_channels, 1, dtype=dtype)

    def encode(self, x):
        moments = ops.cast(self.quant_conv(self.encoder(ops.cast(x, self.dtype))), ms.float32)
        mean, logvar = ops.chunk(moments, 2, axis=1)
        return mean, ops.clamp(logvar, -30.0, 20.0)

    def decode(self, z):
        return ops.cast(self.decoder(self.post_quant_conv(ops.cast(z, self.dtype))), z.dtype)

    def construct(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)
