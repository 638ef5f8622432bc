"""Time the ops ldm/modules/layers.py chose between: native MindSpore kernel vs an alternative.

    python -m tools.benchmark_ops [--repeat 3] [--device CPU]

Prints a markdown table (forward and forward+backward milliseconds, PyNative, float32) of the shapes
SD's UNet runs at 256 px (32x32 latents, 320 channels), and of its largest attention at 512 px, after
the machine's load and MindSpore's threads and matmul peak (as tools/benchmark_train_step.py measures
them). The numbers in docs/performance.md come from here.
"""
import argparse
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ldm.modules import layers
from tools.benchmark_train_step import mindspore_matmul_peak
from tools.torch_baseline import machine_load


def _block(out):
    for t in out if isinstance(out, tuple) else (out,):
        t.asnumpy()


def _ms(fn, args, repeat):
    _block(fn(*args))  # warm-up (kernel selection, first allocation)
    start = time.perf_counter()
    for _ in range(repeat):
        _block(fn(*args))
    return (time.perf_counter() - start) / repeat * 1000


def _fwd_bwd(fn, argnums):
    return ms.grad(lambda *a: (fn(*a) ** 2).sum(), grad_position=argnums)


def _cases(rng):
    def randn(*shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32))

    # conv 3x3 320->320, 32x32: ops.conv2d vs our im2col + matmul
    conv = layers.Conv2d(320, 320, 3, padding=1)
    conv_x = randn(1, 320, 32, 32)
    conv_w = Tensor(conv.weight.asnumpy().reshape(320, 320, 3, 3))
    conv_b = Tensor(conv.bias.asnumpy()).reshape(1, -1, 1, 1)

    def conv_native(x):
        return ops.conv2d(x, conv_w, pad_mode="pad", padding=1) + conv_b

    # GroupNorm 32 groups over [2, 320, 32, 32]: ops.group_norm vs reshape + mean/var
    gn_x, gn_w, gn_b = randn(2, 320, 32, 32), randn(320), randn(320)

    def gn_native(x):
        return ops.group_norm(x, 32, gn_w, gn_b, 1e-5)

    def gn_manual(x):
        xs = x.reshape(2, 32, -1)
        mean = xs.mean(-1, keep_dims=True)
        var = ((xs - mean) ** 2).mean(-1, keep_dims=True)
        y = ((xs - mean) * ops.rsqrt(var + 1e-5)).reshape(x.shape)
        return y * gn_w.reshape(1, -1, 1, 1) + gn_b.reshape(1, -1, 1, 1)

    # attention, 2 x 8 heads, 1024 tokens, 40 per head: BatchMatMul(transpose_b) vs matmul of a transpose
    q, k, v = randn(16, 1024, 40), randn(16, 1024, 40), randn(16, 1024, 40)

    def attn_ours(q, k, v):
        return layers.attention(q, k, v, 40 ** -0.5)

    def attn_transpose(q, k, v):
        return ops.matmul(ops.softmax(ops.matmul(q * 40 ** -0.5, k.swapaxes(1, 2)), -1), v)

    # SD 1.5's self-attentions at 256 and 512 px (8 heads, 1024 / 4096 tokens): in the graph vs the C++
    # flash-attention kernel vs numpy (the kernel's fallback)
    mq, mk, mv = randn(8, 1024, 40), randn(8, 1024, 40), randn(8, 1024, 40)
    lq, lk, lv = randn(8, 4096, 40), randn(8, 4096, 40), randn(8, 4096, 40)
    graph_attn, kernel_attn, numpy_attn = (layers.Attention(40 ** -0.5) for _ in range(3))
    graph_attn.min_host_scores, kernel_attn.min_host_scores, numpy_attn.min_host_scores = None, 0, 0
    kernel_attn.host_attention, numpy_attn.host_attention = layers.host_attention_op(), layers._numpy_attention

    # nearest 2x upsample of [2, 320, 32, 32]: interpolate(size=) vs broadcast + reshape
    up_x = randn(2, 320, 32, 32)

    def up_broadcast(x):
        return ops.broadcast_to(x[:, :, :, None, :, None], (2, 320, 32, 2, 32, 2)).reshape(2, 320, 64, 64)

    return [
        ("conv 3x3 320->320, 32x32", conv_native, conv, (conv_x,), 0, "im2col + matmul"),
        ("GroupNorm 32 groups, 2x320x32x32", gn_native, gn_manual, (gn_x,), 0, "native"),
        ("attention 16x1024x40", attn_ours, attn_transpose, (q, k, v), (0, 1, 2), "native (BatchMatMul nt)"),
        ("attention 8x1024x40", graph_attn, kernel_attn, (mq, mk, mv), (0, 1, 2), "C++ kernel from 1M scores"),
        ("attention 8x4096x40", graph_attn, kernel_attn, (lq, lk, lv), (0, 1, 2), "C++ kernel from 1M scores"),
        ("attention 8x4096x40, numpy", graph_attn, numpy_attn, (lq, lk, lv), (0, 1, 2), "numpy without the kernel"),
        ("nearest 2x upsample 2x320x32x32", layers.upsample_nearest2x, up_broadcast, (up_x,), 0, "native (size=)"),
    ]


def main():
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per op (their mean is printed)")
    parser.add_argument("--device", default="CPU", help="MindSpore device target")
    args = parser.parse_args()
    load = machine_load()
    ms.set_device(args.device)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    peak = mindspore_matmul_peak()
    print(f"{load}; MindSpore fp32 matmul peak 2048^3: {peak['flops'] / 1e9:.1f} GFLOP/s on {peak['threads']} threads")

    print("| op | native fwd ms | alternative fwd ms | native fwd+bwd ms | alternative fwd+bwd ms | layers.py uses |")
    print("|---|---:|---:|---:|---:|---|")
    for name, native, alternative, inputs, argnums, used in _cases(np.random.default_rng(0)):
        # the native conv takes seconds on CPU: one timed run is enough to show it
        repeat = 1 if name.startswith("conv") else args.repeat
        times = [_ms(native, inputs, repeat), _ms(alternative, inputs, args.repeat),
                 _ms(_fwd_bwd(native, argnums), inputs, repeat),
                 _ms(_fwd_bwd(alternative, argnums), inputs, args.repeat)]
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {used} |", flush=True)


if __name__ == "__main__":
    main()
