"""Basic layers with torch-style parameters (`weight`, `bias`, torch shapes) and a compute dtype.

Parameters are always float32: checkpoints load into them and optimizers update them. Matmuls and
convolutions run in the cell's `dtype`; normalizations and softmax run in float32.

Every CPU workaround of the project lives in this file (measured numbers: docs/performance.md):
- MindSpore's CPU Conv2D kernel is pathologically slow (3x3 320->320 at 32x32 takes seconds), while
  its matmul is fast, so on CPU a convolution is im2col (`ops.unfold`) + matmul; a 1x1 convolution
  is a plain matmul. Other targets use the native kernel. The weight is kept in the matmul's layout
  `[out, in*k*k]` (checkpoints' `[out, in, k, k]` is reshaped on load, `ldm.convert.load_into`): a
  reshape of a Parameter inside the graph is a copy, and those copies stayed allocated, a second copy
  of every conv weight (SD 1.5: 3.2 GiB). With a batch, the matmul is a BatchMatMul of the broadcast
  weight and the columns (`ops.matmul` of a 2-D weight with 3-D columns makes the same copy and
  transposes explicitly in its backward), or, with fewer output pixels than channels, one 2-D matmul
  of the batch's columns laid side by side.
- The generic softmax backward makes four passes over the attention scores; `attention` has its own
  backward with two. With the BatchMatMul convolution: TI step of the `small` benchmark model at
  256 px 2.18 -> 1.55 s.
- The backward of a CPU attention keeps about five score-sized buffers until the step ends (SD 1.5 at
  512 px: 2.65 GB per L = 4096 block, 24 GB was not enough), whatever the formulation. Long attentions
  therefore run outside the graph, flash-attention style: row chunks of scores made and dropped, the
  forward keeps the rows' log-sum-exp and the backward recomputes the probabilities from it. The C++
  kernel `ldm/modules/kernels/flash_attention.cc` (oneDNN's sgemm, compiled on first use) takes those
  with at least `KERNEL_ATTENTION_MIN_SCORES` scores; where it cannot be built, numpy (slower) takes
  those with at least `HOST_ATTENTION_MIN_SCORES`.
- `ops.interpolate(scale_factor=..., mode="nearest")` fails on 4-D input on CPU: pass `size=`.
- `mint.arange` and `mint.nn.functional.conv2d` have no CPU kernel: the cells use `ops.*` and numpy
  constants instead.
- Broadcast adds are slow on CPU (a `[C]` bias onto `[N, C]`: ~7x a same-shape add), so biases go
  through `ops.BiasAdd`.
- Graph mode compiles a Tensor method (`x.reshape(...)`, `.astype`, `.transpose`, `.shape`) several
  milliseconds slower than the functional op (`ops.reshape`, `ops.cast`, ...), call by call, so the cells'
  `construct`s use the functional ops: the tiny SD1 UNet's forward compiled in 8.1-8.5 s instead of 9.1-9.3 s,
  the toy model's training gradient in 14.0-14.5 s instead of 15.7-16.9 s.
GroupNorm (`ops.group_norm`), attention's products (BatchMatMul with transpose_b) and nearest
upsampling (`ops.interpolate`) were measured against hand-written alternatives and are the faster.
"""
import functools
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Uniform, Zero, One

from ldm.modules.kernels import compiled_kernel


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
        shape = ops.shape(x)
        y = self.matmul(ops.reshape(ops.cast(x, self.dtype), (-1, shape[-1])), ops.cast(self.weight, self.dtype))
        if self.bias is not None:
            y = self.bias_add(y, ops.cast(self.bias, self.dtype))
        return ops.reshape(y, shape[:-1] + (self.out_features,))


class Conv2d(nn.Cell):
    """Square-kernel 2-D convolution, weight `[out, in, k, k]`, symmetric zero padding; torch default init.

    Asymmetric padding (the VAE downsample) is the caller's `ops.pad` before a `padding=0` conv.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=ms.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.im2col = _on_cpu()
        shape = (out_channels, in_channels * kernel_size * kernel_size) if self.im2col else \
            (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = _uniform(bound, shape, "weight")
        self.bias = _uniform(bound, (out_channels,), "bias") if bias else None
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.pointwise = kernel_size == 1 and stride == 1 and padding == 0
        self.bias_add = ops.BiasAdd(data_format="NCHW")
        self.bmm = ops.BatchMatMul()
        self.matmul = ops.MatMul()
        k = (kernel_size, kernel_size)
        self.unfold = ops.Im2Col(ksizes=k, strides=(stride, stride), dilations=(1, 1), pads=(padding, padding))

    def construct(self, x):
        x = ops.cast(x, self.dtype)
        weight = ops.cast(self.weight, self.dtype)
        if self.im2col:
            b, c, h, w = ops.shape(x)
            k = c * self.kernel_size * self.kernel_size
            if self.pointwise:
                cols = ops.reshape(x, (b, k, h * w))
                oh, ow = h, w
            else:
                oh = (h + 2 * self.padding - self.kernel_size) // self.stride + 1
                ow = (w + 2 * self.padding - self.kernel_size) // self.stride + 1
                # unfold orders rows channel-major then kernel row/col: the layout of weight.reshape(out, -1)
                cols = ops.reshape(self.unfold(x), (b, k, oh * ow))
            if b == 1:
                y = ops.reshape(self.matmul(weight, ops.reshape(cols, (k, oh * ow))), (1, self.out_channels, oh, ow))
            elif oh * ow < self.out_channels:
                # Fewer pixels than channels (the deep levels): putting the samples' columns side by side
                # for one 2-D matmul copies less than giving each sample its own weight (SD's
                # 1280-channel conv at 4x4, batch 2: 98 -> 16 ms).
                y = self.matmul(weight, ops.reshape(ops.transpose(cols, (1, 0, 2)), (k, b * oh * ow)))
                y = ops.reshape(ops.transpose(ops.reshape(y, (self.out_channels, b, oh * ow)), (1, 0, 2)),
                                (b, self.out_channels, oh, ow))
            else:
                y = ops.reshape(self.bmm(ops.broadcast_to(weight, (b, self.out_channels, k)), cols),
                                (b, self.out_channels, oh, ow))
        else:
            y = ops.conv2d(x, weight, stride=self.stride, pad_mode="pad", padding=self.padding)
        if self.bias is not None:
            y = self.bias_add(y, ops.cast(self.bias, self.dtype))
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
        y = ops.group_norm(ops.cast(x, ms.float32), self.num_groups, self.weight, self.bias, self.eps)
        return ops.cast(y, x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32 and returned in the input dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = Parameter(initializer(One(), (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (dim,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(ops.cast(x, ms.float32), self.weight, self.bias)
        return ops.cast(y, x.dtype)


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
    _, _, h, w = ops.shape(x)
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
_row_sum = ops.ReduceSum(keep_dims=True)


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
        scores = ops.cast(_bmm_nt(q, k), ms.float32)
        if self.masked:
            scores = scores + mask
        weights = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
        return ops.bmm(weights, v), weights

    def bprop(self, q, k, v, mask, out, dout):
        o, weights = out
        do = dout[0]
        f32 = ms.float32
        delta = _row_sum(ops.cast(do * o, f32), -1)
        ds = ops.cast(ops.cast(weights, f32) * (ops.cast(_bmm_nt(do, v), f32) - delta), q.dtype)
        return ops.bmm(ds, k), _bmm_tn(ds, q), _bmm_tn(weights, do), ops.zeros_like(mask)


_attention = _Attention(masked=False)
_masked_attention = _Attention(masked=True)


# The C++ kernel is faster than the graph's attention from SD 1.5's L = 1024 self-attentions (256 px,
# 8M scores) up, and keeps none of their scores: those go to it; cross-attentions (77 keys) and the
# tiny model's attentions, where a call's fixed cost counts, stay in the graph.
KERNEL_ATTENTION_MIN_SCORES = 2 ** 20
# numpy is slower than the graph: only what would not fit goes there. 64M scores = 256 MB in float32:
# SD 1.5's L = 4096 self-attentions at 512 px (134M) go, everything at 256 px stays.
HOST_ATTENTION_MIN_SCORES = 2 ** 26
# Rows per host chunk are chosen so that one chunk's scores take about this many elements (32 MB).
_HOST_CHUNK_SCORES = 2 ** 23


def _host_chunks(q, k):
    rows = max(1, _HOST_CHUNK_SCORES // (q.shape[0] * k.shape[1]))
    return [slice(i, i + rows) for i in range(0, q.shape[1], rows)]


def host_attention_forward(q, k, v):
    """numpy softmax(q k^T) v in float32 row chunks; also returns the rows' log-sum-exp `[BH, L, 1]`."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    kt = k.transpose(0, 2, 1)
    out = np.empty(q.shape[:2] + v.shape[2:], np.float32)
    lse = np.empty(q.shape[:2] + (1,), np.float32)
    for rows in _host_chunks(q, k):
        s = np.matmul(q[:, rows], kt)
        m = s.max(-1, keepdims=True)
        np.exp(np.subtract(s, m, out=s), out=s)
        z = s.sum(-1, keepdims=True)
        np.divide(np.matmul(s, v), z, out=out[:, rows])
        lse[:, rows] = m + np.log(z)
    return out, lse


def host_attention_backward(q, k, v, out, lse, dout):
    """Gradients of `host_attention_forward` to q, k, v, recomputing each chunk's probabilities."""
    dtype = q.dtype
    q, k, v, out, dout = (np.asarray(x, np.float32) for x in (q, k, v, out, dout))
    kt, vt = k.transpose(0, 2, 1), v.transpose(0, 2, 1)
    delta = (dout * out).sum(-1, keepdims=True)  # rowsum(dP * P), as in _Attention.bprop
    dq, dk, dv = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
    for rows in _host_chunks(q, k):
        p = np.matmul(q[:, rows], kt)
        np.exp(np.subtract(p, lse[:, rows], out=p), out=p)
        dv += np.matmul(p.transpose(0, 2, 1), dout[:, rows])
        ds = np.matmul(dout[:, rows], vt)
        np.multiply(np.subtract(ds, delta[:, rows], out=ds), p, out=ds)
        dq[:, rows] = np.matmul(ds, k)
        dk += np.matmul(ds.transpose(0, 2, 1), q[:, rows])
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)


def _host_forward(q, k, v):
    out, lse = host_attention_forward(q, k, v)
    return out.astype(q.dtype), lse


_host_backward_op = ops.Custom(host_attention_backward, out_shape=lambda q, k, v, o, lse, do: (q, k, v),
                               out_dtype=lambda q, k, v, o, lse, do: (q, k, v), func_type="pyfunc")


def _host_bprop(q, k, v, out, dout):
    return _host_backward_op(q, k, v, out[0], out[1], dout[0])


def _attention_shape(q, k, v):
    return q[:2] + v[2:], q[:2] + [1]


_numpy_attention = ops.Custom(_host_forward, out_shape=_attention_shape, out_dtype=lambda q, k, v: (q, ms.float32),
                              func_type="pyfunc", bprop=_host_bprop)


@functools.lru_cache(maxsize=None)
def host_attention_op():
    """The op for long attentions on CPU: q, k, v -> (out, rows' log-sum-exp), with its backward; the C++
    kernel (float32) when it builds, else numpy."""
    path = compiled_kernel("flash_attention")
    if path is None:
        return _numpy_attention
    backward = ops.Custom(path + ":FlashAttentionBackward", out_shape=lambda q, k, v, o, lse, do: (q, k, v),
                          out_dtype=lambda q, k, v, o, lse, do: (q, k, v), func_type="aot")

    def bprop(q, k, v, out, dout):
        return backward(q, k, v, out[0], out[1], dout[0])

    return ops.Custom(path + ":FlashAttentionForward", out_shape=_attention_shape,
                      out_dtype=lambda q, k, v: (q, ms.float32), func_type="aot", bprop=bprop)


def split_heads(x, heads):
    """`[B, L, heads * d]` -> `[B * heads, L, d]`, the layout `attention` takes."""
    b, n, c = ops.shape(x)
    x = ops.transpose(ops.reshape(x, (b, n, heads, c // heads)), (0, 2, 1, 3))
    return ops.reshape(x, (b * heads, n, c // heads))


def merge_heads(x, heads):
    """`split_heads` undone: `[B * heads, L, d]` -> `[B, L, heads * d]`."""
    bh, n, d = ops.shape(x)
    x = ops.transpose(ops.reshape(x, (bh // heads, heads, n, d)), (0, 2, 1, 3))
    return ops.reshape(x, (bh // heads, n, heads * d))


def attention(q, k, v, scale, mask=None):
    """softmax(q k^T * scale + mask) v for `[B*heads, L, d]` inputs; the softmax runs in float32.

    q is scaled before the product so that half-precision scores stay in range.
    """
    if mask is None:
        return _attention(q * scale, k, v, ops.zeros((), q.dtype))[0]
    return _masked_attention(q * scale, k, v, mask)[0]


class Attention(nn.Cell):
    """`attention` without a mask, for the UNet's and the VAE's blocks, whose sequences get long.

    On CPU, products with at least `min_host_scores` scores run outside the graph (see the module
    docstring). The device is read here, once: graph mode cannot ask for it inside `construct`.
    """

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.host_attention = host_attention_op() if _on_cpu() else None
        self.min_host_scores = None
        if self.host_attention is not None:
            numpy = self.host_attention is _numpy_attention
            self.min_host_scores = HOST_ATTENTION_MIN_SCORES if numpy else KERNEL_ATTENTION_MIN_SCORES

    def construct(self, q, k, v):
        bh, n, _ = ops.shape(q)
        if self.min_host_scores is not None and bh * n * ops.shape(k)[1] >= self.min_host_scores:
            f32 = ms.float32
            out = self.host_attention(ops.cast(q * self.scale, f32), ops.cast(k, f32), ops.cast(v, f32))[0]
            return ops.cast(out, q.dtype)
        return attention(q, k, v, self.scale)


def zero_(cell):
    """Zero all parameters of `cell` (CompVis `zero_module`: residual branches start as identity)."""
    for p in cell.get_parameters():
        p.set_data(initializer(Zero(), p.shape, p.dtype))
    return cell
