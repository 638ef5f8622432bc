"""The LDM UNet (CompVis `ldm/modules/diffusionmodules/openaimodel.py` structure and names)."""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from ldm.errors import ModelConfigError
from ldm.modules.layers import Linear, Conv2d, GroupNorm, SiLU, Identity, Upsample, zero_
from ldm.modules.attention import SpatialTransformer


def timestep_frequencies(dim, max_period=10000):
    """The `dim // 2` frequencies of the sinusoidal timestep embedding (float32 numpy).

    CompVis `timestep_embedding` and diffusers' SD UNet (flip_sin_to_cos=True, freq_shift=0) agree:
    freq_i = max_period ** (-i / half), embedding = [cos(t f), sin(t f)].
    """
    half = dim // 2
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)


def timestep_embedding(timesteps, freqs):
    """`[B]` timesteps -> `[B, 2 * len(freqs)]` float32 embedding, cos half first."""
    args = ops.expand_dims(ops.cast(timesteps, ms.float32), 1) * ops.expand_dims(freqs, 0)
    return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)


def size_embedding(time_ids, dim):
    """SDXL's size/crop conditioning: `[B, K]` "time ids" -> `[B, K * dim]` float32, each id through the
    timestep sinusoid (sgm ConcatTimestepEmbedderND; diffusers' add_time_proj)."""
    b, k = ops.shape(time_ids)
    embedding = timestep_embedding(ops.reshape(time_ids, (-1,)), Tensor(timestep_frequencies(dim)))
    return ops.reshape(embedding, (b, k * dim))


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv twice with the timestep embedding added in between, plus a skip."""

    def __init__(self, channels, emb_channels, out_channels=None, norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.SequentialCell([
            GroupNorm(norm_num_groups, channels), SiLU(), Conv2d(channels, out_channels, 3, padding=1, dtype=dtype)])
        self.emb_layers = nn.SequentialCell([SiLU(), Linear(emb_channels, out_channels, dtype=dtype)])
        # index 2 is the dropout slot of the original (p=0 for SD), kept for the out_layers.3 name
        self.out_layers = nn.SequentialCell([
            GroupNorm(norm_num_groups, out_channels), SiLU(), Identity(),
            zero_(Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype))])
        self.skip_connection = (Identity() if out_channels == channels
                                else Conv2d(channels, out_channels, 1, dtype=dtype))

    def construct(self, x, emb):
        h = self.in_layers(x)
        h = h + ops.expand_dims(ops.expand_dims(self.emb_layers(emb), 2), 3)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Cell):
    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype)

    def construct(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.SequentialCell):
    """A SequentialCell whose members get the inputs they need: ResBlocks the embedding,
    SpatialTransformers the context, resamplers only x."""

    def construct(self, x, emb, context):
        for layer in self.cell_list:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Cell):
    """`construct(x [B,C,h,w], timesteps [B] int, context [B,L,context_dim], y=None) -> [B,out_channels,h,w]`.

    transformer_depth: one depth for every level, or one per level (SDXL); the middle block takes the last
    level's (sgm). adm_in_channels > 0: the UNet needs `y [B, adm_in_channels]` (SDXL: pooled text ++ size
    embedding), which goes through `label_emb` and is added to the timestep embedding (sgm's num_classes
    "sequential"); otherwise y is not used.
    """

    def __init__(self, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1),
                 num_res_blocks=2, channel_mult=(1, 2, 4, 4), num_heads=8, num_head_channels=-1,
                 transformer_depth=1, context_dim=768, use_linear_in_transformer=False, norm_num_groups=32,
                 adm_in_channels=0, dtype=ms.float32):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ModelConfigError("UNetModel: set num_heads or num_head_channels")
        depths = ((transformer_depth,) * len(channel_mult) if isinstance(transformer_depth, int)
                  else tuple(transformer_depth))
        if len(depths) != len(channel_mult):
            raise ModelConfigError(f"UNetModel: transformer_depth {tuple(depths)} needs one depth per level of "
                                   f"channel_mult {tuple(channel_mult)}, or a single number")
        self.dtype = dtype
        self.freqs = Tensor(timestep_frequencies(model_channels))
        time_embed_dim = model_channels * 4
        self.time_embed = nn.SequentialCell([
            Linear(model_channels, time_embed_dim, dtype=dtype), SiLU(),
            Linear(time_embed_dim, time_embed_dim, dtype=dtype)])
        # nested as in sgm, for the label_emb.0.0 / label_emb.0.2 names
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            Linear(adm_in_channels, time_embed_dim, dtype=dtype), SiLU(),
            Linear(time_embed_dim, time_embed_dim, dtype=dtype)])]) if adm_in_channels else None

        def res_block(ch_in, ch_out):
            return ResBlock(ch_in, time_embed_dim, ch_out, norm_num_groups, dtype=dtype)

        def transformer(ch, depth):
            # num_head_channels, when set, fixes the head width (SD2, SDXL); otherwise the head count (SD1)
            if num_head_channels != -1:
                heads, dim_head = ch // num_head_channels, num_head_channels
            else:
                heads, dim_head = num_heads, ch // num_heads
            return SpatialTransformer(ch, heads, dim_head, depth, context_dim,
                                      use_linear_in_transformer, norm_num_groups, dtype=dtype)

        input_blocks = [TimestepEmbedSequential([Conv2d(in_channels, model_channels, 3, padding=1, dtype=dtype)])]
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                input_blocks.append(TimestepEmbedSequential([Downsample(ch, dtype=dtype)]))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.CellList(input_blocks)

        self.middle_block = TimestepEmbedSequential([res_block(ch, ch), transformer(ch, depths[-1]),
                                                   res_block(ch, ch)])

        output_blocks = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, dtype=dtype))
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([
            GroupNorm(norm_num_groups, ch), SiLU(),
            zero_(Conv2d(model_channels, out_channels, 3, padding=1, dtype=dtype))])

    def enable_gradient_checkpointing(self):
        """Recompute each block's activations in the backward instead of keeping them (graph mode only;
        diffusers' name, mindone's `use_recompute`): less memory held for the backward, one more forward."""
        for block in list(self.input_blocks) + [self.middle_block] + list(self.output_blocks):
            block.recompute()

    def construct(self, x, timesteps, context, y=None):
        emb = self.time_embed(ops.cast(timestep_embedding(timesteps, self.freqs), self.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(ops.cast(y, self.dtype))
        context = ops.cast(context, self.dtype)
        h = ops.cast(x, self.dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        # skips are consumed last-in first-out (indexing: list.pop does not compile in graph mode)
        for i in range(len(self.output_blocks)):
            h = self.output_blocks[i](ops.cat([h, hs[len(hs) - 1 - i]], axis=1), emb, context)
        return ops.cast(self.out(h), x.dtype)
