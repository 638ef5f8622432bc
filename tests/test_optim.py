"""AdamW/Adam against torch's trajectories, the LR schedules, clipping and the loss scale."""

import os

import numpy as np
import pytest

from ldm.training.optim import Adam, DynamicLossScale, clip_grad_norm, learning_rate

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "optim.npz")


@pytest.mark.parametrize("name, decoupled", [("adamw", True), ("adam", False)])
def test_adam_matches_torch(name, decoupled):
    ref = np.load(FIXTURE)
    params = ref["params0"]
    opt = Adam(params.shape, (0.9, 0.999), weight_decay=1e-2, decoupled=decoupled)
    for i, (grad, lr) in enumerate(zip(ref["grads"], ref["lrs"])):
        params = opt.step(params, grad, float(lr))
        np.testing.assert_allclose(params, ref[name][i], rtol=1e-6, atol=1e-7)


def test_adam_state_round_trip_continues_identically():
    ref = np.load(FIXTURE)
    a = Adam(ref["params0"].shape, weight_decay=1e-2)
    p = a.step(ref["params0"], ref["grads"][0], 1e-2)
    b = Adam(ref["params0"].shape, weight_decay=1e-2)
    b.load_state_dict({k: np.copy(v) for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a.step(p, ref["grads"][1], 1e-2), b.step(p, ref["grads"][1], 1e-2))


def test_schedules():
    kw = dict(start=1e-3, end=1e-5, warmup_steps=2, decay_steps=4)
    assert [learning_rate(s, scheduler="linear", **kw) for s in range(8)] == pytest.approx(
        [5e-4, 1e-3, 1e-3, 7.525e-4, 5.05e-4, 2.575e-4, 1e-5, 1e-5])
    assert learning_rate(5, scheduler="constant", **kw) == 1e-3
    assert learning_rate(4, scheduler="cosine", **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    ms = [learning_rate(s, scheduler="multi_step_decay", milestones=(3, 5), decay_rate=0.5, **kw) for s in (2, 3, 5)]
    assert ms == pytest.approx([1e-3, 5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="unknown scheduler"):
        learning_rate(3, scheduler="step", **kw)


def test_clip_grad_norm():
    grad = np.full((2, 2), 3.0, np.float32)  # norm 6
    clipped, norm = clip_grad_norm(grad, 1.5)
    assert norm == pytest.approx(6.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.5, rel=1e-5)
    same, _ = clip_grad_norm(grad, 10.0)
    np.testing.assert_array_equal(same, grad)


def test_dynamic_loss_scale_skips_overflow_and_grows():
    scale = DynamicLossScale(init_scale=1024, factor=2, window=3)
    assert scale.update(False) is False and scale.scale == 512
    assert [scale.update(True) for _ in range(3)] == [True, True, True]
    assert scale.scale == 1024 and scale.good_steps == 0
