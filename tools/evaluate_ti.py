"""Known-answer evaluation of a Textual Inversion embedding on the toy-world `tiny` model.

    python -m tools.evaluate_ti --ti_ckpt_path output/tiny/weights/SDvtiny_textual_inversion_300_ti.ckpt
    python -m tools.evaluate_ti --concept style --ti_ckpt_path output/tiny-style/weights/SDvtiny_textual_inversion_100_ti.ckpt

Samples n images per prompt (DPM-Solver++, 20 steps), lets the pixel judge (data/toy_world.py) read
them, and prints the share of samples that show the concept: with the learned vectors, with the
initializer's embedding in their place (what training started from), and in an edited prompt
(editability: the concept in a scene the prompt describes: on a yellow background for the object (one of
its 8 images has one), as a yellow circle on blue for the style (none of its images is one)).

- object: the purple star (`<my-shape>`, initializer "shape"); columns: purple foreground, star, both,
  and the yellow background the edited prompt asks for.
- style: the outlined style (`<my-style>`, initializer "drawing"); columns: outlined, and the yellow
  foreground on blue the prompt asks for.
"""

import argparse
import sys

import mindspore as ms
import numpy as np

from data.toy_world import PURPLE_STAR, STYLE, judge
from ldm.embeddings import check_fits, load_embedding
from ldm.errors import UserInputError
from ldm.pipeline import StableDiffusion, initial_latents
from ldm.tokenizer import init_vectors, initializer_ids

# per concept: its initializer, the (row, prompt) pairs with "{}" for the placeholder, and the
# columns: (name, judge fields every sample is checked for)
CONCEPTS = {
    "object": dict(
        initializer="shape",
        prompts=(("learned", "a photo of {}"), ("initializer", "a photo of {}"),
                 ("learned, edited", "a {} on a yellow background")),
        columns=((f"{PURPLE_STAR[1]} fg", dict(fg=PURPLE_STAR[1])), (PURPLE_STAR[0], dict(shape=PURPLE_STAR[0])),
                 (" ".join(PURPLE_STAR[::-1]), dict(shape=PURPLE_STAR[0], fg=PURPLE_STAR[1])),
                 ("yellow bg", dict(bg="yellow")))),
    "style": dict(
        initializer="drawing",
        prompts=(("learned", "a painting in the style of {}"), ("initializer", "a painting in the style of {}"),
                 ("learned, edited", "a yellow circle on a blue background in the style of {}")),
        columns=((STYLE, dict(style=STYLE)), ("yellow on blue", dict(fg="yellow", bg="blue")),
                 (f"{STYLE} yellow on blue", dict(style=STYLE, fg="yellow", bg="blue")))),
}


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


def evaluate(sd, token, vectors, concept="object", initializer=None, n=64, seed=0):
    """Judge verdicts `{row name: [Verdict]}` of `concept`'s prompts for the embedding `token`.

    The initializer row puts the initializer's embedding in place of the learned vectors.
    """
    spec = CONCEPTS[concept]
    initializer = initializer or spec["initializer"]
    ids = sd.add_placeholder(token, vectors)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight.asnumpy()
    start = init_vectors(table, initializer_ids(sd.tokenizer, initializer), len(vectors))
    rows = {}
    for name, template in spec["prompts"]:
        vecs, name = (start, f"initializer '{initializer}'") if name == "initializer" else (vectors, name)
        sd.set_placeholder_vectors(ids, vecs)
        prompt = template.format(token)
        rows[f"{name}: {prompt}"] = judge_prompt(sd, prompt, n, seed)
    sd.set_placeholder_vectors(ids, vectors)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.evaluate_ti", description=__doc__.split("\n")[0])
    p.add_argument("--ti_ckpt_path", required=True, help="the embedding to judge, in any format text_to_image.py reads")
    p.add_argument("--concept", choices=sorted(CONCEPTS), default="object", help="what the embedding was trained on")
    p.add_argument("--initializer", default=None, help="default: the concept's (shape / drawing)")
    p.add_argument("--n", type=int, default=64, help="samples per prompt")
    p.add_argument("--seed", type=int, default=1000, help="seed of the initial latents (as text_to_image.py's --seed)")
    args = p.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    sd = StableDiffusion.load("tiny")
    try:
        emb = load_embedding(args.ti_ckpt_path)
        check_fits(emb, sd.embedding_dims, args.ti_ckpt_path)
        rows = evaluate(sd, emb.token, emb.vectors, args.concept, args.initializer, args.n, args.seed)
    except UserInputError as err:
        p.exit(2, f"error: {err}\n")
    columns = CONCEPTS[args.concept]["columns"]
    print(f"| prompt ({args.n} samples each, DPM-Solver++ 20 steps) | " + " | ".join(c for c, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, verdicts in rows.items():
        print(f"| {name} | " + " | ".join(f"{share(verdicts, **want):.0%}" for _, want in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
