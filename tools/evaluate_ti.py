"""Known-answer evaluation of a Textual Inversion embedding on the toy-world `tiny` model.

    python tools/evaluate_ti.py --ti_ckpt_path output/tiny/weights/SDvtiny_textual_inversion_200_ti.ckpt

Samples n images per prompt (DPM-Solver++, 20 steps), lets the pixel judge (data/toy_world.py) name
shape and colours, and prints the share of samples that show the concept's colour, its shape, both,
and a yellow background: with the learned vectors, with the initializer's embedding in their place
(what training started from), and in an edited prompt (editability: the concept on a background it
was never shown with).
"""

import argparse
import os
import sys

import mindspore as ms
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.toy_world import PURPLE_STAR, judge  # noqa: E402
from ldm.embeddings import load_embedding  # noqa: E402
from ldm.pipeline import StableDiffusion, initial_latents  # noqa: E402
from ldm.tokenizer import init_vectors, initializer_ids  # noqa: E402


def judge_prompt(sd, prompt, n, seed=0, steps=20, scale=7.5, batch=8):
    """Judge verdicts of n samples of `prompt` (batches of `batch`, iteration j seeded seed + j)."""
    verdicts = []
    for j in range(0, n, batch):
        k = min(batch, n - j)
        size = sd.config.image_size
        latents = initial_latents(seed + j // batch, k, size, size, factor=sd.latent_factor)
        images = sd.sample([prompt] * k, latents, steps=steps, scale=scale)
        verdicts += [judge(img) for img in images]
    return verdicts


def share(verdicts, **want):
    """Fraction of verdicts whose fields equal `want` (e.g. shape="star", fg="purple")."""
    return float(np.mean([all(getattr(v, k) == x for k, x in want.items()) for v in verdicts]))


def evaluate(sd, token, vectors, initializer, n=64, seed=0):
    """Judge verdicts `{row name: [Verdict]}` for the purple-star object concept `token`.

    Rows: the learned vectors in "a photo of <t>", the same prompt with the initializer's embedding in
    their place (what training started from), and the learned vectors in an edited prompt.
    """
    ids = sd.add_placeholder(token, vectors)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight.asnumpy()
    start = init_vectors(table, initializer_ids(sd.tokenizer, initializer), len(vectors))
    rows = {}
    for name, vecs, prompt in (("learned", vectors, f"a photo of {token}"),
                               (f"initializer '{initializer}'", start, f"a photo of {token}"),
                               ("learned, edited", vectors, f"a {token} on a yellow background")):
        sd.set_placeholder_vectors(ids, vecs)
        rows[f"{name}: {prompt}"] = judge_prompt(sd, prompt, n, seed)
    sd.set_placeholder_vectors(ids, vectors)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ti_ckpt_path", required=True)
    p.add_argument("--initializer", default="shape")
    p.add_argument("--n", type=int, default=64, help="samples per prompt")
    p.add_argument("--seed", type=int, default=1000)
    args = p.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    sd = StableDiffusion.load("tiny")
    emb = load_embedding(args.ti_ckpt_path)
    rows = evaluate(sd, emb.token, emb.vectors, args.initializer, args.n, args.seed)
    shape, colour = PURPLE_STAR
    print(f"| prompt ({args.n} samples each, DPM-Solver++ 20 steps) | {colour} fg | {shape} | {colour} {shape} "
          "| yellow bg |")
    print("|---|---|---|---|---|")
    for name, verdicts in rows.items():
        cells = [share(verdicts, fg=colour), share(verdicts, shape=shape), share(verdicts, fg=colour, shape=shape),
                 share(verdicts, bg="yellow")]
        print(f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
