"""Dev tool: torch.optim.AdamW / Adam trajectories for tests/test_optim.py.

Run with an interpreter that has torch (the dev venv of requirements-dev.txt):

    .venv-dev/bin/python -m tools.dev.make_optim_fixtures
"""
import os

import numpy as np
import torch

from tools import ROOT

OUT = os.path.join(ROOT, "tests", "fixtures", "optim.npz")


def trajectory(optim_cls, params0, grads, lrs, weight_decay):
    p = torch.nn.Parameter(torch.tensor(params0))
    opt = optim_cls([p], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    out = []
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.tensor(g)
        opt.step()
        out.append(p.detach().numpy().copy())
    return np.stack(out)


def main():
    rng = np.random.default_rng(0)
    params0 = rng.standard_normal((3, 8)).astype(np.float32)
    grads = rng.standard_normal((6, 3, 8)).astype(np.float32)
    lrs = np.array([1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 1e-3])
    np.savez(OUT, params0=params0, grads=grads, lrs=lrs,
             adamw=trajectory(torch.optim.AdamW, params0, grads, lrs, 1e-2),
             adam=trajectory(torch.optim.Adam, params0, grads, lrs, 1e-2))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
