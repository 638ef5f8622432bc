"""Does a train config keep toy-world concepts editable? Train random concepts, keep the best step, judge it.

    python -m tools.editability_study
    python -m tools.editability_study --concepts 4 --ti_seeds 2 --n 32 --set max_steps=200 --set num_vectors=2

Draws `--concepts` (shape, colour) pairs at random (seeded by `--seed`; never the shipped purple star), each with
an edit background, among those the base model draws with their own words as well as the targets ask (the
learned word can do no better), and renders 8 images of each with the toy-world generator
(data/toy_world.object_scenes, new image seeds). Each concept is
trained with the tiny object config (`--train_config`, plus `--set KEY=VALUE` overrides) once per TI seed, the
pixel judge scoring every validation into metrics.csv and keeping weights/best_ti.ckpt (ldm/scoring.py's rule);
the edited prompt puts the concept on the drawn background. The best checkpoint is then judged on `--n`
fresh samples per prompt (tools/evaluate_ti.py, other seeds than validation's): concept (the learned word draws
the shape in its colour), initializer (its start vectors in its place do) and edited (the concept on the
background the prompt names). Prints a table and whether each run meets the targets.
"""

import argparse
import os
import random
import sys

import mindspore as ms
from PIL import Image

import train_textual_inversion as T
from data.toy_world import COLORS, PURPLE_STAR, SHAPES, judge, object_scenes, render
from ldm.errors import USER_ERRORS
from ldm.scoring import JudgeScorer, best_row, read_metrics, share
from ldm.training.config import parse_train_config
from tools.evaluate_ti import build_parser, evaluate_run, sample

TARGETS = {"concept": (">=", 0.8), "initializer": ("<=", 0.2), "edited": (">=", 0.7)}
N_IMAGES = 8
TOKEN = "<my-shape>"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.editability_study", description=__doc__.split("\n")[0])
    p.add_argument("--train_config", default="configs/train/train_config_textual_inversion_tiny.yaml",
                   help="the train config every run starts from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train config override for every run (repeatable), e.g. max_steps=200")
    p.add_argument("--concepts", type=int, default=4, help="random (shape, colour) concepts")
    p.add_argument("--ti_seeds", type=int, default=2, help="training seeds per concept")
    p.add_argument("--n", type=int, default=32, help="samples per prompt for the final judgement")
    p.add_argument("--seed", type=int, default=0, help="seed of the concepts' draw and of their images")
    p.add_argument("--out", default="output/editability", help="folder for the images and the runs")
    p.add_argument("--all_concepts", action="store_true", help="draw from every concept, not only those the base "
                   "model draws with their own words (for a model that draws none, such as a random one)")
    args = p.parse_args(argv)
    for kv in args.set:
        if "=" not in kv:
            p.error(f"--set {kv}: write KEY=VALUE, e.g. --set max_steps=200")
    if os.path.exists(args.out):
        p.error(f"--out {args.out} exists; pass a new folder (a study does not overwrite another's runs)")
    # judging samples in graph mode, as training does
    ms.set_context(mode=ms.GRAPH_MODE)
    overrides = [arg for kv in args.set for arg in (f"--{kv.partition('=')[0]}", kv.partition("=")[2])]
    try:
        rows = study(args, overrides)
    except USER_ERRORS as err:
        p.exit(2, f"error: {err}\n")
    return 0 if all(meets(row) for row in rows) else 1


def study(args, overrides):
    """The table's rows, one per concept and TI seed, printed as they come."""
    rows = []
    for (shape, fg, bg), words in draw_concepts(args.concepts, args.seed,
                                                None if args.all_concepts else words_judge(args, overrides)):
        images = write_images(os.path.join(args.out, "data", f"{fg}_{shape}"), shape, fg, args.seed)
        for ti_seed in range(args.ti_seeds):
            run = os.path.join(args.out, f"{fg}_{shape}_seed{ti_seed}")
            train(args.train_config, images, run, ti_seed, bg, overrides)
            row = {"concept": f"{fg} {shape}", "edit bg": bg, "words": words}
            rows.append(row | judge_best(run, ti_seed, args.n))
            print_table(rows, args)
    return rows


def draw_concepts(n, seed, can_draw=None):
    """n ((shape, colour, edit background), words' shares) drawn at random, no (shape, colour) twice, no purple
    star, and only those the base model draws with their own words as well as the targets ask of the learned word:
    `can_draw(triple)` gives the shares (concept, edited) of the words' samples (None: every triple, no shares).
    Textual Inversion finds a word for what the frozen model can draw; the tiny model draws some scenes in the
    wrong colours even when told."""
    rng = random.Random(seed)
    triples = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c and (s, c) != PURPLE_STAR]
    rng.shuffle(triples)
    drawn = []
    for shape, fg, bg in triples:
        if len(drawn) == n:
            break
        if (shape, fg) in {(s, c) for (s, c, _), _ in drawn}:
            continue
        if can_draw is None:
            drawn.append(((shape, fg, bg), None))
            continue
        words = can_draw((shape, fg, bg))
        ok = words[0] >= TARGETS["concept"][1] and words[1] >= TARGETS["edited"][1]
        print(f"{fg} {shape} on {bg}, with words: {words[0]:.0%} / {words[1]:.0%}: {'drawn' if ok else 'skipped'}",
              flush=True)
        if ok:
            drawn.append(((shape, fg, bg), words))
    return drawn


def words_judge(args, overrides):
    """`can_draw` of the base model: judge shares of its samples of the concept's and the edit's own words
    ("a photo of a red star", "a red star on a blue background"), `--n` samples each."""
    cfg = parse_train_config(["--train_config", args.train_config, "--train_data_dir", ".", "--placeholder_token",
                              TOKEN, *overrides])
    sd = T.load_models(cfg)[0]
    # the seeds the learned word is judged on (evaluate_ti's)
    seed = build_parser().get_default("seed")

    def can_draw(triple):
        shape, fg, bg = triple
        concept = [judge(image) for image in sample(sd, f"a photo of a {fg} {shape}", args.n, cfg.image_size, seed)]
        edited = [judge(image) for image in
                  sample(sd, f"a {fg} {shape} on a {bg} background", args.n, cfg.image_size, seed)]
        return share(concept, shape=shape, fg=fg), share(edited, shape=shape, fg=fg, bg=bg)

    return can_draw


def write_images(folder, shape, fg, seed):
    """The concept's training images, drawn by the generator with a seed of the study's own."""
    os.makedirs(folder, exist_ok=True)
    for i, scene in enumerate(object_scenes(shape, fg, N_IMAGES, seed=10_000 + seed)):
        Image.fromarray(render(scene)).save(os.path.join(folder, f"{i:02d}_{fg}_{shape}_on_{scene.bg}.png"))
    return folder


def train(config, images, run, ti_seed, bg, overrides):
    """One training run into `run`."""
    argv = ["--train_config", config, "--train_data_dir", images, "--output_path", run, "--seed", str(ti_seed),
            "--placeholder_token", TOKEN, "--validation_prompt", f"a photo of {TOKEN}", "--validation_metric",
            "judge", "--validation_edit_prompts", f"a {{}} on a {bg} background", *overrides]
    if T.main(argv) != 0:
        raise SystemExit(f"error: training {run} failed (its error is above)")


def judge_best(run, ti_seed, n):
    """The best-by-rule checkpoint of a run judged on n new samples per prompt: the table's row."""
    best = best_row(read_metrics(os.path.join(run, "metrics.csv")).values(), JudgeScorer.margin)
    args = build_parser().parse_args([run, "--ti_ckpt_path", os.path.join(run, "weights", best["checkpoint"]),
                                      "--concept", "object", "--n", str(n)])
    start, learned = evaluate_run(run, args)[0]
    return {"TI seed": ti_seed, "best step": best["step"], "concept share": learned["concept"],
            "initializer": start["concept"], "edited": learned["edit"]}


def meets(row):
    values = {"concept": row["concept share"], "initializer": row["initializer"], "edited": row["edited"]}
    return all(values[k] >= bar if op == ">=" else values[k] <= bar for k, (op, bar) in TARGETS.items())


def print_table(rows, args):
    print(f"\neditability study: {args.train_config} {' '.join(args.set)} ({args.n} samples per prompt)")
    print("| concept | edit background | TI seed | best step | concept (words) | initializer | edited (words) "
          "| targets |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        words = [f"{w:.0%}" for w in row["words"]] if row["words"] else ["-", "-"]
        print(f"| {row['concept']} | {row['edit bg']} | {row['TI seed']} | {row['best step']} | "
              f"{row['concept share']:.0%} ({words[0]}) | {row['initializer']:.0%} | {row['edited']:.0%} "
              f"({words[1]}) | {'met' if meets(row) else 'missed'} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
