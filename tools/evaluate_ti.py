"""Score every saved embedding of a training run and name the best step: when to stop.

    python -m tools.evaluate_ti output/tiny
    python -m tools.evaluate_ti output/tiny-style --n 64
    python -m tools.evaluate_ti --ti_ckpt_path output/tiny/weights/SDvtiny_textual_inversion_300_ti.ckpt

Loads the run's model and training images as its train_config_resolved.yaml says, then for each saved
`weights/*_{step}_ti.ckpt` (or only the `--ti_ckpt_path` files) and for the vectors training started from (step 0:
the initializer's, a reference the rule leaves out) samples the concept prompt and each edited prompt n times, with
the same seeds for every checkpoint (DPM-Solver++, 20 steps by default), and scores them (ldm/scoring.py, `--metric`):
concept = how much the concept prompt's samples show the training images' concept, edit = how much each edited
prompt's samples show what it asks. Prints the table, writes `metrics.csv` and `scores.png` (scores vs step) to
OUTPUT_DIR/evaluation, and names the best step by the rule: the best concept score among the checkpoints whose edit
score is within the metric's margin of the best edit score; ties go to the earlier step.
"""

import argparse
import os
import re
import sys

import mindspore as ms
import numpy as np

import train_textual_inversion as T
from data.dataset import TextualInversionDataset
from ldm.embeddings import check_fits, load_embedding
from ldm.errors import USER_ERRORS, UserInputError
from ldm.pipeline import initial_latents
from ldm.scoring import SCORERS, best_row, make_scorer, score_row, training_images, write_metrics
from ldm.training.config import config_from_dict, load_yaml
from ldm.training.figures import save_score_plot

# the concept prompt of a run without a validation_prompt: the first caption template of its kind
CONCEPT_PROMPTS = {"object": "a photo of {}", "style": "a painting in the style of {}"}
STEP = re.compile(r"_(\d+)_ti\.ckpt$")


def build_parser():
    """The command line; `build_parser().parse_args([...])` is also how other code asks for an evaluation."""
    p = argparse.ArgumentParser(prog="python -m tools.evaluate_ti", description=__doc__.split("\n")[0])
    p.add_argument("output_dir", nargs="?", help="a training run's output_path (default: the run --ti_ckpt_path is in)")
    p.add_argument("--ti_ckpt_path", action="append", help="score only this saved embedding (repeatable)")
    p.add_argument("--metric", choices=SCORERS, default="judge", help="judge: the toy world's pixel judge (shares "
                   "of samples, offline); clip: CLIP-I and CLIP-T (raw cosines)")
    p.add_argument("--concept", choices=("object", "style"), help="judge: what the run learned (default: told from "
                   "the training images)")
    p.add_argument("--clip_model", help="clip: a transformers CLIPModel folder or hub id (default: the scorer's)")
    p.add_argument("--prompt", help="the concept prompt, {} for the placeholder (default: the run's "
                   "validation_prompt, else " + " / ".join(f"'{t}'" for t in CONCEPT_PROMPTS.values()) + ")")
    p.add_argument("--edit_prompts", nargs="+", help="edited prompts, {} for the placeholder (default: the run's "
                   "validation_edit_prompts or their default)")
    p.add_argument("--n", type=int, default=32, help="samples per prompt and checkpoint")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first batch's initial latents (batch j: "
                   "seed + j, as text_to_image.py's --seed)")
    p.add_argument("--batch", type=int, default=8, help="samples per sampler call")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (DPM-Solver++, as validation samples)")
    p.add_argument("--out", help="folder for metrics.csv and scores.png (default: OUTPUT_DIR/evaluation)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.output_dir or args.ti_ckpt_path):
        p.error("pass a training run's output folder or --ti_ckpt_path")
    ms.set_context(mode=ms.GRAPH_MODE)
    output_dir = args.output_dir or os.path.dirname(os.path.dirname(os.path.abspath(args.ti_ckpt_path[0])))
    try:
        rows, metric = evaluate_run(output_dir, args)
    except USER_ERRORS as err:
        p.exit(2, f"error: {err}\n")
    best = best_row([row for row in rows if row["step"] > 0], metric.margin)
    out = args.out or os.path.join(output_dir, "evaluation")
    write_metrics(os.path.join(out, "metrics.csv"), rows)
    save_score_plot(os.path.join(out, "scores.png"), rows, best, metric.name)
    print(f"best: step {best['step']} ({best['checkpoint']}), the best concept score among the checkpoints whose edit "
          f"score is within {metric.margin:g} of the best; wrote {out}/metrics.csv and scores.png")
    return 0


def evaluate_run(output_dir, args):
    """The metrics rows of a run's embeddings (step 0: the vectors training started from), printed as a table as
    they come, and the scorer."""
    cfg = run_config(output_dir)
    paths = args.ti_ckpt_path
    checkpoints = [(embedding_step(path), path) for path in paths] if paths else saved_embeddings(output_dir)
    scorer = run_scorer(cfg, args)
    token = cfg.placeholder_token
    prompt = concept_prompt(cfg, args)
    edit_prompts = [e.replace("{}", token) for e in args.edit_prompts] if args.edit_prompts else cfg.edit_prompts()
    for edit_prompt in edit_prompts:
        scorer.check_prompt(edit_prompt)
    sd, ids, start = T.load_models(cfg)
    print(f"| step | embedding | concept: {prompt} | edit (mean) | " + " | ".join(edit_prompts) + " |")
    print("|---:|---|---:|---:|" + "---:|" * len(edit_prompts))
    start_label = f"initializer '{cfg.initializer_token}'" if cfg.initializer_token else "random start"
    rows = []
    for step, label, vectors in [(0, start_label, start)] + [
            (step, os.path.basename(path), embedding_vectors(sd, path)) for step, path in checkpoints]:
        samples = sample_prompts(sd, ids, vectors, [prompt] + edit_prompts, cfg.image_size, args)
        rows.append(score_row(scorer, step, label, samples.pop(prompt), samples))
        print(f"| {step} | {label} | " + " | ".join(f"{v:.3f}" for v in list(rows[-1].values())[2:]) + " |",
              flush=True)
    return rows, scorer


def concept_prompt(cfg, args):
    """The concept prompt, placeholder in: --prompt, else the run's validation_prompt, else its kind's default."""
    return (args.prompt or cfg.validation_prompt or CONCEPT_PROMPTS[cfg.learnable_property]).replace(
        "{}", cfg.placeholder_token)


def sample_prompts(sd, ids, vectors, prompts, size, args):
    """`{prompt: samples}` from the placeholder vectors `vectors`, every prompt from the same seeds (--n, --seed,
    --batch, --steps)."""
    sd.set_placeholder_vectors(ids, vectors)
    return {p: sample(sd, p, args.n, size, args.seed, args.batch, args.steps) for p in prompts}


def run_scorer(cfg, args):
    """The `--metric` scorer of the run's training images."""
    dataset = TextualInversionDataset.from_config(cfg, cfg.placeholder_token)
    kwargs = {"concept": args.concept} if args.metric == "judge" else {"model": args.clip_model}
    return make_scorer(args.metric, training_images(dataset), cfg.placeholder_token, **kwargs)


def run_config(output_dir):
    """The train config a run resolved (train_config_resolved.yaml in its output folder)."""
    path = os.path.join(output_dir, "train_config_resolved.yaml")
    if not os.path.isfile(path):
        raise UserInputError(f"{output_dir} has no train_config_resolved.yaml; pass the output_path of a training run")
    return config_from_dict(load_yaml(path), path)


def saved_embeddings(output_dir):
    """`(step, path)` of the run's saved `weights/*_{step}_ti.ckpt`, by step."""
    weights = os.path.join(output_dir, "weights")
    names = [n for n in os.listdir(weights) if STEP.search(n)] if os.path.isdir(weights) else []
    if not names:
        raise UserInputError(f"{weights} holds no *_{{step}}_ti.ckpt embeddings; pass a training run's output_path")
    return sorted((int(STEP.search(n).group(1)), os.path.join(weights, n)) for n in names)


def embedding_step(path):
    """The training step in a saved embedding's name (`..._{step}_ti.ckpt`)."""
    found = STEP.search(os.path.basename(path))
    if not found:
        raise UserInputError(f"--ti_ckpt_path {path}: not a saved embedding of a run (*_{{step}}_ti.ckpt)")
    return int(found.group(1))


def embedding_vectors(sd, path):
    """`[N, D]` placeholder vectors of the embedding file `path` (SDXL: both sets side by side)."""
    embedding = load_embedding(path)
    check_fits(embedding, sd.embedding_dims, path)
    return embedding.all_vectors


def sample(sd, prompt, n, size, seed=0, batch=8, steps=20, scale=7.5):
    """uint8 `[n, size, size, 3]` samples of `prompt` in batches of `batch`, batch j from the latents of seed + j."""
    return np.concatenate([sd.sample([prompt] * min(batch, n - j),
                                     initial_latents(seed + j // batch, min(batch, n - j), size, size,
                                                     factor=sd.latent_factor), steps=steps, scale=scale)
                           for j in range(0, n, batch)])


if __name__ == "__main__":
    sys.exit(main())
