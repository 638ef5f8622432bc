"""Learning-rate schedules, AdamW/Adam and the dynamic loss scale for the TI vectors.

Only `[N, D]` vectors are trained, so the update runs in numpy (microseconds) with the exact torch
formulas (`torch.optim.AdamW` / `Adam`, bias-corrected), which is what diffusers' trainer uses.
MindSpore's `AdamWeightDecay` omits bias correction and would not match. All state is plain numpy and
floats, so resuming restores it exactly.
"""

import math

import numpy as np


def learning_rate(step, *, start, end, scheduler, warmup_steps, decay_steps, milestones=(), decay_rate=0.9):
    """LR for optimizer step `step` (0-based), mindone semantics.

    Linear warm-up from 0 over `warmup_steps`; then `linear` decays start -> end over `decay_steps` and
    stays at `end`; `cosine` follows a half cosine start -> end over `decay_steps`; `constant` keeps
    `start`; `multi_step_decay` multiplies by `decay_rate` at each milestone passed.
    """
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    t = step - warmup_steps
    if scheduler == "constant":
        return start
    if scheduler == "multi_step_decay":
        return start * decay_rate ** sum(step >= m for m in milestones)
    progress = min(t / max(decay_steps, 1), 1.0)
    if scheduler == "linear":
        return start + (end - start) * progress
    if scheduler == "cosine":
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {scheduler!r}; valid: linear, constant, cosine, multi_step_decay")


class Adam:
    """torch.optim.AdamW (decoupled weight decay) or Adam (L2 added to the gradient), eps 1e-8."""

    def __init__(self, shape, betas=(0.9, 0.999), weight_decay=0.0, decoupled=True, eps=1e-8):
        self.beta1, self.beta2 = betas
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.eps = eps
        self.m = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.t = 0

    def step(self, params, grad, lr):
        """The updated params (float32) after one step with gradient `grad`."""
        params = params.astype(np.float32)
        grad = grad.astype(np.float32)
        if self.decoupled:
            params = params * (1.0 - lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad + self.weight_decay * params
        self.t += 1
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1.0 - self.beta2) * grad * grad
        m_hat = self.m / (1.0 - self.beta1 ** self.t)
        v_hat = self.v / (1.0 - self.beta2 ** self.t)
        return (params - lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(np.float32)

    def state_dict(self):
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state):
        self.m = np.asarray(state["m"], np.float32)
        self.v = np.asarray(state["v"], np.float32)
        self.t = int(state["t"])


def clip_grad_norm(grad, max_norm):
    """Scale `grad` down so its global L2 norm is at most `max_norm` (torch's clip_grad_norm_)."""
    norm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2)))
    return grad * min(1.0, max_norm / (norm + 1e-6)), norm


class DynamicLossScale:
    """fp16/bf16 loss scaling: halve (by `factor`) and skip the step on overflow, grow after `window` good steps."""

    def __init__(self, init_scale=2048.0, factor=2.0, window=200):
        self.scale = float(init_scale)
        self.factor = float(factor)
        self.window = int(window)
        self.good_steps = 0

    def update(self, finite):
        """Record one step; returns True when the step may be applied."""
        if not finite:
            self.scale = max(self.scale / self.factor, 1.0)
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= self.factor
            self.good_steps = 0
        return True

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
