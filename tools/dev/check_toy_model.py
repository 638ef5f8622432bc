"""Dev tool: sample the tiny toy-world model with diffusers and score the samples with the pixel judge.

Run with an interpreter that has torch and diffusers (the dev venv of requirements-dev.txt):

    .venv-dev/bin/python -m tools.dev.check_toy_model [--model models/tiny-sd] [--guidance 7.5]

Rows of the table:
  held-out    "a photo of a {fg} {shape} on a {bg} background" for triples never trained on
  trained     the same caption for triples in the training set
  purple star purple-star captions on every background (TI's object concept, named in words)
  purple star, no background  "a photo of a purple star", as TI's "a photo of <my-shape>" asks for it;
              its bg column is the share whose background differs from the foreground (the star shows)
  outlined    trained triples with a style phrase appended (", outlined")
The last column is the share of samples judged outlined: high in the outlined row, near 0 elsewhere.
  "a photo of a shape"  what TI's initializer prompt gives: how often that is already a purple star
"""
import argparse
import os

import numpy as np
import torch

from data import toy_world as tw
from tools import ROOT


def load_pipeline(model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts, steps, guidance, seed, batch=32):
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        imgs = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    height=tw.SIZE, width=tw.SIZE, output_type="np").images
        out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


def score(images, truths):
    """Per-field accuracy of the judge's verdicts against (shape, fg, bg) truths, and the outlined share.
    A bg of None (the caption names none) counts any background but the foreground's colour as right."""
    v = [tw.judge(im) for im in images]
    bg_ok = [x.bg == t[2] if t[2] else x.bg != x.fg for x, t in zip(v, truths)]
    shape = np.mean([x.shape == t[0] for x, t in zip(v, truths)])
    fg = np.mean([x.fg == t[1] for x, t in zip(v, truths)])
    bg = np.mean(bg_ok)
    allok = np.mean([x.shape == t[0] and x.fg == t[1] and ok for x, t, ok in zip(v, truths, bg_ok)])
    outlined = np.mean([x.style == tw.STYLE for x in v])
    return shape, fg, bg, allok, outlined


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-sd"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--per-combo", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=os.path.join(ROOT, "output", "tiny-sd-check.png"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)

    held = [c for c in tw.heldout_combos() for _ in range(a.per_combo)]
    trained = tw.training_combos()[::7][:len(held)]
    purple = [(s, f, b) for s, f, b in tw.all_combos() if (s, f) == tw.PURPLE_STAR] * 3
    rows = []
    grids = []
    outlined = tw.training_combos()[3::11][:24]
    no_bg = [(*tw.PURPLE_STAR, None)] * len(purple)
    for name, truths, suffix in (("held-out", held, ""), ("trained", trained, ""), ("purple star", purple, ""),
                                 ("purple star, no background", no_bg, ""), ("outlined", outlined, tw.STYLE_PHRASES[0])):
        imgs = sample(pipe, [tw.full_caption(*t) + suffix for t in truths], a.steps, a.guidance, a.seed)
        rows.append((name, len(truths), *score(imgs, truths)))
        grids.append(imgs[:12])
    init = sample(pipe, ["a photo of a shape"] * 32, a.steps, a.guidance, a.seed + 1)
    verdicts = [tw.judge(im) for im in init]
    ps = np.mean([(v.shape, v.fg) == tw.PURPLE_STAR for v in verdicts])
    grids.append(init[:12])

    print(f"DPM-Solver++ {a.steps} steps, guidance {a.guidance}, {a.model}")
    print("| prompts | n | shape | fg colour | bg colour | all three | outlined |")
    print("|---|---|---|---|---|---|---|")
    for name, n, s, f, b, al, o in rows:
        print(f"| {name} | {n} | {s:.2f} | {f:.2f} | {b:.2f} | {al:.2f} | {o:.2f} |")
    print(f"| \"a photo of a shape\" -> purple star | {len(init)} | | | | {ps:.2f} | |")
    os.makedirs(os.path.dirname(a.grid), exist_ok=True)
    from PIL import Image

    Image.fromarray(np.concatenate([np.concatenate(list(g), 1) for g in grids])).save(a.grid)


if __name__ == "__main__":
    main()
