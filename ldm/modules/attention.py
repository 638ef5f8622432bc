"""Transformer blocks of the LDM UNet (CompVis `ldm/modules/attention.py` structure and names)."""
import mindspore as ms
from mindspore import nn, ops

from ldm.modules.layers import (Attention, Linear, Conv2d, GroupNorm, LayerNorm, Identity, gelu, merge_heads,
                               split_heads, zero_)


class CrossAttention(nn.Cell):
    """Multi-head attention of `x` over `context` (self-attention when context is None)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dtype=ms.float32):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.attention = Attention(dim_head ** -0.5)
        self.to_q = Linear(query_dim, inner_dim, bias=False, dtype=dtype)
        self.to_k = Linear(context_dim, inner_dim, bias=False, dtype=dtype)
        self.to_v = Linear(context_dim, inner_dim, bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([Linear(inner_dim, query_dim, dtype=dtype), Identity()])

    def construct(self, x, context=None):
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(self.attention(q, k, v), self.heads))


class GEGLU(nn.Cell):
    def __init__(self, dim_in, dim_out, dtype=ms.float32):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype)

    def construct(self, x):
        x, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return x * gelu(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim, mult=4, dtype=ms.float32):
        super().__init__()
        inner_dim = dim * mult
        # index 1 is the (p=0) dropout slot of the original, kept so that net.2 keeps its name
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim, dtype=dtype), Identity(),
                                      Linear(inner_dim, dim, dtype=dtype)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim, n_heads, d_head, context_dim, dtype=ms.float32):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dtype=dtype)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """Transformer over the pixels of a feature map: `[B, C, H, W]` -> same, with a residual.

    proj_in/proj_out are 1x1 convolutions (SD1) or linear layers on the token axis (SD2,
    `use_linear`); proj_out starts at zero so the block starts as the identity.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False,
                 norm_num_groups=32, dtype=ms.float32):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim, dtype=dtype)
            self.proj_out = zero_(Linear(inner_dim, in_channels, dtype=dtype))
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, 1, dtype=dtype)
            self.proj_out = zero_(Conv2d(inner_dim, in_channels, 1, dtype=dtype))
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dtype=dtype)
             for _ in range(depth)])

    def construct(self, x, context):
        b, c, h, w = ops.shape(x)
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = ops.transpose(ops.reshape(x, (b, -1, h * w)), (0, 2, 1))
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = ops.reshape(ops.transpose(x, (0, 2, 1)), (b, -1, h, w))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
