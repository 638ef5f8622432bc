"""Basic layers with torch-style parameters (`weight`, `bias`, torch shapes) and a compute dtype.

Parameters are always float32: checkpoints load into them and optimizers update them. Matmuls and
convolutions run in the cell's `dtype`; normalizations and softmax run in float32.

Every CPU workaround of the project lives in this file (measured numbers: docs/performance.md):
- MindSpore's CPU Conv2D kernel is pathologically slow (3x3 320->320 at 32x32 takes seconds), while
  its matmul is fast, so on CPU a convolution is im2col (`ops.unfold`) + matmul; a 1x1 convolution
  is a plain matmul. Other targets use the native kernel. The matmul is a BatchMatMul of the weight
  (given a batch axis) and the columns: `ops.matmul` of a 2-D weight with 3-D columns copies the
  broadcast weight and transposes explicitly in its backward. With a batch and fewer output pixels
  than channels, the batch's columns are laid side by side for one 2-D matmul instead.
- The generic softmax backward makes four passes over the attention scores; `attention` has its own
  backward with two. With the BatchMatMul convolution: TI step of the `small` benchmark model at
  256 px 2.18 -> 1.55 s.
- `ops.interpolate(scale_factor=..., mode="nearest")` fails on 4-D input on CPU: pass `size=`.
- `mint.arange` and `mint.nn.functional.conv2d` have no CPU kernel: the cells use `ops.*` and numpy
  constants instead.
- Broadcast adds are slow on CPU (a `[C]` bias onto `[N, C]`: ~7x a same-shape add), so biases go
  through `ops.BiasAdd`.
GroupNorm (`ops.group_norm`), attention's products (BatchMatMul with transpose_b) and nearest
upsampling (`ops.interpolate`) were measured against hand-written alternatives and are the faster.
"""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Uniform, Zero, One


def _on_cpu():
    return ms.get_context("device_target") == "CPU"


def _uniform(bound, shape, name):
    return Parameter(initializer(Uniform(bound), shape, ms.float32), name=name)


class Linear(nn.Cell):
    """y = x W^T + b, W `[out, in]`; torch default init."""

    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform(bound, (out_features, in_features), "weight")
        self.bias = _uniform(bound, (out_features,), "bias") if bias else None
        self.out_features = out_features
        self.dtype = dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(self.dtype), self.weight.astype(self.dtype))
        if self.bias is not None:
            y = self.bias_add(y, self.bias.astype(self.dtype))
        return y.reshape(shape[:-1] + (self.out_features,))


class Conv2d(nn.Cell):
    """Square-kernel 2-D convolution, weight `[out, in, k, k]`, symmetric zero padding; torch default init.

    Asymmetric padding (the VAE downsample) is the caller's `ops.pad` before a `padding=0` conv.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=ms.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = _uniform(bound, (out_channels, in_channels, kernel_size, kernel_size), "weight")
        self.bias = _uniform(bound, (out_channels,), "bias") if bias else None
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.im2col = _on_cpu()
        self.pointwise = kernel_size == 1 and stride == 1 and padding == 0
        self.bias_add = ops.BiasAdd(data_format="NCHW")
        self.bmm = ops.BatchMatMul()
        self.matmul = ops.MatMul()

    def construct(self, x):
        x = x.astype(self.dtype)
        weight = self.weight.astype(self.dtype)
        if self.im2col:
            b, c, h, w = x.shape
            if self.pointwise:
                cols = x.reshape(b, c, h * w)
                oh, ow = h, w
            else:
                # unfold orders rows channel-major then kernel row/col: the layout of weight.reshape(out, -1)
                cols = ops.unfold(x, self.kernel_size, 1, self.padding, self.stride)
                oh = (h + 2 * self.padding - self.kernel_size) // self.stride + 1
                ow = (w + 2 * self.padding - self.kernel_size) // self.stride + 1
            if b > 1 and oh * ow < self.out_channels:
                # Fewer pixels than channels (the deep levels): putting the samples' columns side by side
                # for one 2-D matmul copies less than giving each sample its own weight (SD's
                # 1280-channel conv at 4x4, batch 2: 98 -> 16 ms).
                k = cols.shape[1]
                y = self.matmul(weight.reshape(self.out_channels, k), cols.transpose(1, 0, 2).reshape(k, b * oh * ow))
                y = y.reshape(self.out_channels, b, oh * ow).transpose(1, 0, 2).reshape(b, self.out_channels, oh, ow)
            else:
                weight = weight.reshape(1, self.out_channels, -1)
                if b > 1:
                    weight = ops.broadcast_to(weight, (b,) + weight.shape[1:])
                y = self.bmm(weight, cols).reshape(b, self.out_channels, oh, ow)
        else:
            y = ops.conv2d(x, weight, stride=self.stride, pad_mode="pad", padding=self.padding)
        if self.bias is not None:
            y = self.bias_add(y, self.bias.astype(self.dtype))
        return y


class GroupNorm(nn.Cell):
    """GroupNorm over `[B, C, ...]`, computed in float32 and returned in the input dtype."""

    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(initializer(One(), (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (num_channels,), ms.float32), name="bias")

    def construct(self, x):
        y = ops.group_norm(x.astype(ms.float32), self.num_groups, self.weight, self.bias, self.eps)
        return y.astype(x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32 and returned in the input dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = Parameter(initializer(One(), (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (dim,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(x.astype(ms.float32), self.weight, self.bias)
        return y.astype(x.dtype)


class SiLU(nn.Cell):
    def construct(self, x):
        return ops.silu(x)


class Identity(nn.Cell):
    """Placeholder that keeps the original module indices (e.g. a p=0 dropout slot)."""

    def construct(self, x):
        return x


def gelu(x):
    """Exact (erf) GELU."""
    return ops.gelu(x, approximate="none")


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * ops.sigmoid(1.702 * x)


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling of `[B, C, H, W]` (`size=`, since `scale_factor=` fails on CPU)."""
    _, _, h, w = x.shape
    return ops.interpolate(x, size=(2 * h, 2 * w), mode="nearest")


class Upsample(nn.Cell):
    """Nearest 2x then a 3x3 conv: the upsampler of both the UNet and the VAE decoder."""

    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))


_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm_tn = ops.BatchMatMul(transpose_a=True)


class _Attention(nn.Cell):
    """softmax(q k^T [+ mask]) v with the backward written out (q comes scaled).

    The generic softmax backward makes four passes over the `[B*heads, L, M]` scores
    (dP * P, its row sum, the subtraction, * P); the row sum equals rowsum(dO * O) over the much smaller
    `[B*heads, L, d]` output, which leaves two. P is returned as a second output for the backward.
    """

    def __init__(self, masked):
        super().__init__()
        self.masked = masked

    def construct(self, q, k, v, mask):
        scores = _bmm_nt(q, k).astype(ms.float32)
        if self.masked:
            scores = scores + mask
        weights = ops.softmax(scores, axis=-1).astype(v.dtype)
        return ops.bmm(weights, v), weights

    def bprop(self, q, k, v, mask, out, dout):
        o, weights = out
        do = dout[0]
        delta = (do * o).astype(ms.float32).sum(-1, keepdims=True)
        ds = (weights.astype(ms.float32) * (_bmm_nt(do, v).astype(ms.float32) - delta)).astype(q.dtype)
        return ops.bmm(ds, k), _bmm_tn(ds, q), _bmm_tn(weights, do), ops.zeros_like(mask)


_attention = _Attention(masked=False)
_masked_attention = _Attention(masked=True)


def attention(q, k, v, scale, mask=None):
    """softmax(q k^T * scale + mask) v for `[B*heads, L, d]` inputs; the softmax runs in float32.

    q is scaled before the product so that half-precision scores stay in range.
    """
    if mask is None:
        return _attention(q * scale, k, v, ops.zeros((), q.dtype))[0]
    return _masked_attention(q * scale, k, v, mask)[0]


def zero_(cell):
    """Zero all parameters of `cell` (CompVis `zero_module`: residual branches start as identity)."""
    for p in cell.get_parameters():
        p.set_data(initializer(Zero(), p.shape, p.dtype))
    return cell
