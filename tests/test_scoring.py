"""The scorer interface on the toy world (the pixel judge on images drawn by data/toy_world.py with known scenes),
the best-step rule, and metrics.csv and its plot."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.toy_world import STYLE, all_combos, random_scene, render
from ldm.errors import UserInputError
from ldm.scoring import (JudgeScorer, Scorer, ScorerError, best_row, make_scorer, prompt_fields, read_metrics,
                         write_metrics)
from ldm.training.figures import BEST, PLOT_SIZE, save_score_plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scenes(seed, n, combos, style=""):
    """n rendered images of scenes drawn from `combos` ((shape, fg, bg) triples)."""
    rng = random.Random(seed)
    return [render(random_scene(rng, combos, style)) for _ in range(n)]


@pytest.fixture(scope="module")
def purple_stars():
    return scenes(0, 6, [("star", "purple", bg) for bg in ("red", "green", "yellow", "blue")])


def test_judge_learns_the_object_and_scores_shares(purple_stars):
    scorer = make_scorer("judge", purple_stars, "<my-shape>")
    assert isinstance(scorer, JudgeScorer) and isinstance(scorer, Scorer)
    assert (scorer.name, scorer.kind, scorer.want) == ("judge", "object", {"shape": "star", "fg": "purple"})
    stars_on_yellow = scenes(1, 3, [("star", "purple", "yellow")])
    stars_on_blue = scenes(2, 2, [("star", "purple", "blue")])
    red_circles_on_yellow = scenes(3, 3, [("circle", "red", "yellow")])
    samples = np.stack(stars_on_yellow + stars_on_blue + red_circles_on_yellow)
    assert scorer.concept(samples) == pytest.approx(5 / 8)
    # the edit is what the prompt names, a yellow background, with the concept kept: a purple star on yellow
    assert scorer.edit(samples, "a <my-shape> on a yellow background") == pytest.approx(3 / 8)
    assert scorer.edit(samples, "a red circle on a yellow background next to <my-shape>") == pytest.approx(3 / 8)


def test_judge_learns_a_style_and_can_be_told_which():
    outlined = scenes(4, 6, all_combos(), style=STYLE)
    scorer = JudgeScorer(outlined, "<my-style>")
    assert (scorer.kind, scorer.want) == ("style", {"style": STYLE})
    samples = np.stack(scenes(5, 3, all_combos(), style=STYLE) + scenes(6, 1, all_combos()))
    assert scorer.concept(samples) == pytest.approx(3 / 4)
    assert scorer.edit(samples, "a yellow circle on a blue background in the style of <my-style>") == 0.0
    yellow_circle = scenes(7, 2, [("circle", "yellow", "blue")], style=STYLE)
    assert scorer.edit(np.stack(yellow_circle), "a yellow circle on a blue background, outlined") == 1.0
    # the style is kept unless the prompt says otherwise
    filled_circle = np.stack(scenes(7, 2, [("circle", "yellow", "blue")]))
    assert scorer.edit(filled_circle, "a yellow circle on a blue background in the style of <my-style>") == 0.0
    assert scorer.edit(filled_circle, "a yellow circle on a blue background, filled") == 1.0
    # filled shapes of assorted kinds share nothing the judge can name, unless told what to look for
    filled = scenes(8, 6, all_combos())
    with pytest.raises(ScorerError, match="share no shape and colour") as err:
        JudgeScorer(filled, "<t>")
    assert isinstance(err.value, UserInputError) and "\n" not in str(err.value)
    assert JudgeScorer(filled, "<t>", concept="style").want == {"style": STYLE}
    assert JudgeScorer(filled, "<t>", concept="object").kind == "object"


def test_prompt_fields_read_the_captions_grammar(purple_stars):
    assert prompt_fields("a yellow circle on a blue background") == {"shape": "circle", "fg": "yellow", "bg": "blue"}
    assert prompt_fields("a photo of a red shape, outlined") == {"fg": "red", "style": STYLE}
    assert prompt_fields("a square on green, filled") == {"shape": "square", "bg": "green", "style": ""}
    # the placeholder is taken out first: its own words ask for nothing
    scorer = JudgeScorer(purple_stars, "<purple-star>")
    assert scorer.prompt_fields("a <purple-star> on a white background") == {"bg": "white"}
    for prompt, fragment in [("a <purple-star> on the beach", "names nothing the toy-world judge can check"),
                             ("a circle and a star", "names several shape values")]:
        with pytest.raises(ScorerError, match=fragment) as err:
            scorer.check_prompt(prompt)
        assert "\n" not in str(err.value)


def test_make_scorer_names_and_clip_is_imported_lazily(purple_stars):
    with pytest.raises(ScorerError, match="unknown metric 'fid'; use one of judge, clip"):
        make_scorer("fid", purple_stars, "<t>")
    code = "import sys, ldm.scoring; print('ldm.clip_scorer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def rows(*scores):
    return [{"step": 10 * (i + 1), "checkpoint": f"e_{10 * (i + 1)}_ti.ckpt", "concept": c, "edit": e}
            for i, (c, e) in enumerate(scores)]


def test_best_rule():
    # the best concept among edits within the margin of the best edit
    assert best_row(rows((0.9, 0.8), (0.95, 0.5), (0.7, 0.85)), 0.1)["step"] == 10
    # a better edit can push an earlier best out of the margin: the best is then an earlier checkpoint still in it
    assert best_row(rows((0.9, 0.80), (0.85, 0.88), (0.5, 0.95)), 0.1)["step"] == 20
    # the margin is inclusive (0.9 - 0.1 is below 0.8 in floats)
    assert best_row(rows((0.9, 0.8), (0.5, 0.9)), 0.1)["step"] == 10
    # ties go to the earlier step, whatever the order given
    assert best_row(rows((0.5, 0.9), (0.9, 0.9), (0.9, 0.9))[::-1], 0.0)["step"] == 20
    # margin 0: the best edit, then the best concept among equals
    assert best_row(rows((0.99, 0.89), (0.1, 0.9), (0.2, 0.9)), 0.0)["step"] == 30


def test_metrics_round_trip_and_plot(tmp_path):
    table = [dict(r, **{"edit: a <t> on a blue background, outlined": r["edit"]}) for r in
             rows((1 / 3, 2 / 3), (0.875, 0.125), (0.5, 0.5))]
    for row in table:
        row["concept"], row["edit"] = round(row["concept"], 6), round(row["edit"], 6)
    path = tmp_path / "run" / "metrics.csv"
    write_metrics(path, table[::-1])
    assert os.listdir(path.parent) == ["metrics.csv"]   # atomic: no temp file left
    header = path.read_text().splitlines()[0]
    assert header == 'step,checkpoint,concept,edit,"edit: a <t> on a blue background, outlined"'
    back = read_metrics(path)
    assert list(back) == [10, 20, 30] and list(back.values()) == table
    # a row without a later prompt's column reads back as None there
    write_metrics(path, [*table, {"step": 40, "checkpoint": "x", "concept": 0.1, "edit": 0.2}])
    assert read_metrics(path)[40]["edit: a <t> on a blue background, outlined"] is None
    best = best_row(table, 0.2)
    save_score_plot(tmp_path / "scores.png", table, best, "judge")
    image = np.asarray(Image.open(tmp_path / "scores.png").convert("RGB"))
    assert image.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert (image == BEST).all(-1).sum() > 100   # the best step's marker
