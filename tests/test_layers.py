"""ldm.modules.layers: the CPU replacements equal the native ops (values and gradients)."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

import ldm.modules.layers as layers
from ldm.modules.layers import Attention, Conv2d, GroupNorm, LayerNorm, Linear, attention, upsample_nearest2x


pytestmark = pytest.mark.usefixtures("pynative_mode")


def _set(param, array):
    # reshape: the CPU Conv2d keeps its weight as [out, in*k*k]
    param.set_data(Tensor(array.astype(np.float32).reshape(param.shape)))


# (kernel, stride, padding, pre-pad (left, right, top, bottom), input size)
CONV_CASES = {
    "3x3 s1": (3, 1, 1, None, 9),
    "3x3 s2": (3, 2, 1, None, 9),        # UNet Downsample, odd size: floor division of the output size
    "1x1": (1, 1, 0, None, 7),
    "3x3 s1, fewer pixels than channels": (3, 1, 1, None, 2),  # the batch-folded matmul
    "1x1, fewer pixels than channels": (1, 1, 0, None, 2),
    "vae downsample": (3, 2, 0, (0, 1, 0, 1), 8),
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_im2col_matches_native_forward_and_backward(case, batch):
    k, stride, padding, prepad, size = CONV_CASES[case]
    rng = np.random.default_rng(0)
    conv = Conv2d(6, 5, k, stride=stride, padding=padding)
    assert conv.im2col  # the CPU path is the one under test
    w = rng.standard_normal((5, 6, k, k)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    _set(conv.weight, w)
    _set(conv.bias, b)
    x = Tensor(rng.standard_normal((batch, 6, size, size)).astype(np.float32))

    def ours(x, weight):
        if prepad:
            x = ops.pad(x, prepad)
        return conv(x)

    def native(x, weight):
        if prepad:
            x = ops.pad(x, prepad)
        return ops.conv2d(x, weight, stride=stride, pad_mode="pad", padding=padding) + Tensor(b).reshape(1, -1, 1, 1)

    y_ref = native(x, Tensor(w))
    y = ours(x, conv.weight)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y.asnumpy(), y_ref.asnumpy(), atol=1e-5, rtol=1e-5)

    cotangent = Tensor(rng.standard_normal(y_ref.shape).astype(np.float32))
    dx_ref, dw_ref = ms.grad(lambda x, w: (native(x, w) * cotangent).sum(), grad_position=(0, 1))(x, Tensor(w))
    dx, dw = ms.grad(lambda x: (ours(x, None) * cotangent).sum(), grad_position=0, weights=[conv.weight])(x)
    np.testing.assert_allclose(dx.asnumpy(), dx_ref.asnumpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw[0].asnumpy().reshape(dw_ref.shape), dw_ref.asnumpy(), atol=1e-5, rtol=1e-5)


def test_upsample_nearest2x_repeats_pixels():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = upsample_nearest2x(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))


def _group_norm_np(x, groups, weight, bias, eps):
    b, c = x.shape[:2]
    xs = x.reshape(b, groups, -1).astype(np.float64)
    xs = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + eps)
    return xs.reshape(x.shape) * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)


def test_group_norm_matches_reference_and_keeps_half_input_dtype():
    rng = np.random.default_rng(1)
    norm = GroupNorm(4, 8, eps=1e-6)
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    _set(norm.weight, w)
    _set(norm.bias, b)
    x = (3 + 2 * rng.standard_normal((2, 8, 5, 5))).astype(np.float32)
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), _group_norm_np(x, 4, w, b, 1e-6), atol=1e-5)
    y16 = norm(Tensor(x, ms.float16))
    assert y16.dtype == ms.float16
    ref16 = _group_norm_np(x.astype(np.float16).astype(np.float32), 4, w, b, 1e-6)
    np.testing.assert_allclose(y16.asnumpy().astype(np.float32), ref16, atol=1e-2)


def test_layer_norm_and_linear_use_torch_layouts():
    rng = np.random.default_rng(2)
    lin = Linear(6, 3)
    assert lin.weight.shape == (3, 6) and lin.bias.shape == (3,)
    w, b = rng.standard_normal((3, 6)), rng.standard_normal(3)
    _set(lin.weight, w)
    _set(lin.bias, b)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(lin(Tensor(x)).asnumpy(), x @ w.T + b, atol=1e-5)

    ln = LayerNorm(6, eps=1e-5)
    g = rng.standard_normal(6)
    _set(ln.weight, g)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g
    np.testing.assert_allclose(ln(Tensor(x)).asnumpy(), ref, atol=1e-5)


def test_attention_matches_softmax_reference_with_mask():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((3, 5, 4)).astype(np.float32) for _ in range(3))
    mask = np.triu(np.full((5, 5), -1e9, np.float32), k=1)
    scores = q @ k.transpose(0, 2, 1) * 0.5 + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (weights / weights.sum(-1, keepdims=True)) @ v
    out = attention(Tensor(q), Tensor(k), Tensor(v), 0.5, Tensor(mask))
    np.testing.assert_allclose(out.asnumpy(), ref, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_backward_equals_autodiff_of_the_plain_formula(masked):
    """attention's written-out backward against autodiff of softmax(q k^T * scale + mask) v."""
    rng = np.random.default_rng(4)
    q, k, v, w = (Tensor(rng.standard_normal((3, 6, 4)).astype(np.float32)) for _ in range(4))
    mask = Tensor(np.triu(np.full((6, 6), -1e9, np.float32), k=1)) if masked else None

    def plain(q, k, v):
        scores = ops.BatchMatMul(transpose_b=True)(q * 0.5, k)
        return ops.bmm(ops.softmax(scores if mask is None else scores + mask, axis=-1), v)

    ours = ms.grad(lambda q, k, v: (attention(q, k, v, 0.5, mask) * w).sum(), grad_position=(0, 1, 2))(q, k, v)
    ref = ms.grad(lambda q, k, v: (plain(q, k, v) * w).sum(), grad_position=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5)


# numpy: tiny chunks (7 rows: 6 chunks, a ragged last); the C++ kernel: 2^18 scores per chunk over
# 1000 keys is 262 rows, so 600 queries make 3 chunks, a ragged last, as in a cross-attention (L != M)
HOST_CASES = {"kernel": ((2, 600, 40), (2, 1000, 40)), "numpy": ((2, 37, 8), (2, 37, 8))}


@pytest.mark.parametrize("impl", list(HOST_CASES))
@pytest.mark.parametrize("jit", [False, True])
def test_host_attention_equals_the_graph_attention_in_value_and_gradient(impl, jit, monkeypatch):
    """The row-chunked attention of long sequences on CPU against the graph's, eager and compiled."""
    monkeypatch.setattr(layers, "_HOST_CHUNK_SCORES", 100)
    rng = np.random.default_rng(5)
    q_shape, kv_shape = HOST_CASES[impl]
    q, w = (Tensor(rng.standard_normal(q_shape).astype(np.float32)) for _ in range(2))
    k, v = (Tensor(rng.standard_normal(kv_shape).astype(np.float32)) for _ in range(2))
    host, graph = Attention(0.5), Attention(0.5)
    host.min_host_scores, graph.min_host_scores = 0, None
    host.host_attention = layers.host_attention_op() if impl == "kernel" else layers._numpy_attention
    assert impl == "numpy" or host.host_attention is not layers._numpy_attention, "the kernel was not built"

    def loss(cell):
        def f(q, k, v):
            return (cell(q, k, v) * w).sum()
        step = ms.value_and_grad(f, grad_position=(0, 1, 2))
        return (ms.jit(step) if jit else step)(q, k, v)

    (a, grads_a), (b, grads_b) = loss(host), loss(graph)
    np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5)
    for x, y in zip(grads_a, grads_b):
        # float32 sums in another order: both sides are ~1e-6 of the largest entry from a float64 reference
        np.testing.assert_allclose(x.asnumpy(), y.asnumpy(), atol=1e-5 * max(1.0, np.abs(y.asnumpy()).max()))


def test_cpu_kernel_is_cached_and_falls_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    from ldm.modules import kernels
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = kernels.compiled_kernel("flash_attention")
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    built_at = os.path.getmtime(path)
    monkeypatch.setattr(kernels, "_built", {})
    assert kernels.compiled_kernel("flash_attention") == path and os.path.getmtime(path) == built_at
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")] == []  # no temp file left

    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING"):
        assert kernels.compiled_kernel("flash_attention") is None
    assert "no C++ compiler" in caplog.text and "plain path" in caplog.text


def test_attention_goes_out_of_the_graph_only_on_cpu_and_above_the_threshold(monkeypatch):
    assert Attention(1.0).min_host_scores == layers.KERNEL_ATTENTION_MIN_SCORES
    # SD 1.5's self-attention at 256 px (8 heads, 32x32 latents) goes to the kernel; its cross-attention
    # (77 keys) and the tiny model's (128 px, 16x16 latents, 4 heads) stay in the graph
    assert 8 * 1024 * 1024 >= layers.KERNEL_ATTENTION_MIN_SCORES > max(8 * 1024 * 77, 4 * 256 * 256)
    # numpy, without the kernel: only SD 1.5's self-attention at 512 px, which would not fit in the graph
    monkeypatch.setattr(layers, "host_attention_op", lambda: layers._numpy_attention)
    assert Attention(1.0).min_host_scores == layers.HOST_ATTENTION_MIN_SCORES
    assert 8 * 4096 * 4096 >= layers.HOST_ATTENTION_MIN_SCORES > 8 * 1024 * 1024
    monkeypatch.setattr(layers, "_on_cpu", lambda: False)
    assert Attention(1.0).min_host_scores is None


def test_host_attention_keeps_half_precision_and_rows_log_sum_exp():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((3, 9, 4)).astype(np.float16) for _ in range(3))
    out, lse = layers.host_attention_forward(q, k, v)
    s = q.astype(np.float32) @ k.astype(np.float32).transpose(0, 2, 1)
    np.testing.assert_allclose(lse[..., 0], np.log(np.exp(s).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(out, np.exp(s - lse) @ v.astype(np.float32), atol=1e-5)
    grads = layers.host_attention_backward(q, k, v, out.astype(np.float16), lse, np.ones_like(q))
    assert [g.dtype for g in grads] == [np.float16] * 3
