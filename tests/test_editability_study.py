"""tools/editability_study.py end to end on the tiny random SD1 fixture: one random concept, one TI seed, 2 steps."""

import os

import pytest

from ldm.scoring import best_row, read_metrics
from tests.test_train import RUN_SHAPE
from tools import editability_study

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-sd1")
# the group's run shape (its compiled training graph), as --set KEY=VALUE
FAST = [f"{flag[2:]}={value}" for flag, value in zip(RUN_SHAPE[::2], RUN_SHAPE[1::2])] + [
    "pretrained_model_path=" + FIXTURE, "model_config=none", "version=1.5", "max_steps=2", "validation_steps=1",
    "num_validation_images=1", "ckpt_save_interval=2"]


def test_a_concept_is_drawn_trained_and_its_best_step_judged(tmp_path, capsys, shared_graphs):
    out = tmp_path / "study"
    # a random model draws no concept with its words: every concept may be drawn
    argv = ["--concepts", "1", "--ti_seeds", "1", "--n", "1", "--seed", "3", "--out", str(out), "--all_concepts"]
    code = editability_study.main(argv + [arg for kv in FAST for arg in ("--set", kv)])
    ((shape, fg, bg), words), = editability_study.draw_concepts(1, 3)
    assert words is None
    images = sorted(os.listdir(out / "data" / f"{fg}_{shape}"))
    # every other colour once as the background, then a repeat: the concept is the shape and its colour
    assert len(images) == 8 and all(name.split("_")[1:3] == [fg, shape] for name in images)
    assert len({name.split("_on_")[1] for name in images}) == 7
    run = out / f"{fg}_{shape}_seed0"
    metrics = read_metrics(run / "metrics.csv")
    # every validation scored (the edit on the drawn background), the best by the rule kept
    assert list(metrics) == [1, 2] and all(f"edit: a <my-shape> on a {bg} background" in r for r in metrics.values())
    best = best_row(metrics.values(), 0.1)
    assert (run / "weights" / "best_ti.ckpt").read_bytes() == (run / "weights" / best["checkpoint"]).read_bytes()
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith(f"| {fg} {shape} | {bg} | 0 | {best['step']} | ") and "% (-) |" in row
    # the exit code says whether every run met the targets
    assert code == (0 if row.endswith("| met |") else 1)


def test_concepts_are_those_the_base_model_draws_with_words():
    said = {}

    def can_draw(triple):
        # the base model, say, draws stars with their words but not on a white background
        said[triple] = (1.0 if triple[0] == "star" else 0.5, 0.0 if triple[2] == "white" else 0.9)
        return said[triple]

    drawn = editability_study.draw_concepts(3, 0, can_draw)
    assert len(drawn) == 3 and len({(shape, fg) for (shape, fg, _), _ in drawn}) == 3
    assert all(shape == "star" and bg != "white" and fg != bg and (shape, fg) != ("star", "purple")
               and words == said[(shape, fg, bg)] for (shape, fg, bg), words in drawn)
    # the same seed draws the same concepts
    assert editability_study.draw_concepts(3, 0, can_draw) == drawn


def test_mistakes(tmp_path, capsys):
    for argv, fragment in [(["--set", "max_steps"], "--set max_steps: write KEY=VALUE"),
                           (["--out", str(tmp_path)], f"--out {tmp_path} exists; pass a new folder"),
                           (["--out", str(tmp_path / "new"), "--set", "max_step=2"], "unknown command-line flag")]:
        with pytest.raises(SystemExit) as done:
            editability_study.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and fragment in err[-1], err
