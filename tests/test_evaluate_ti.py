"""tools/evaluate_ti.py on a training run's output folder: 2 steps of the tiny demo config on the tiny random SD1
fixture, an embedding saved at each."""

import pytest
from PIL import Image

import train_textual_inversion as T
from ldm import pipeline
from ldm.scoring import best_row, read_metrics
from ldm.training.figures import PLOT_SIZE
from tests.conftest import session_graphs
from tests.test_train import run_argv
from tools import evaluate_ti

EDIT = "a <my-shape> on a yellow background"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, _loaded):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    with session_graphs(_loaded):
        assert T.main(run_argv(out, "--max_steps", "2", "--ckpt_save_interval", "1")) == 0
    return out


def test_every_saved_embedding_is_scored(run_dir, capsys, monkeypatch, shared_graphs):
    seeds = []

    def initial_latents(seed, n, *args, **kwargs):
        seeds.append(seed)
        return pipeline.initial_latents(seed, n, *args, **kwargs)

    monkeypatch.setattr(evaluate_ti, "initial_latents", initial_latents)
    # batches of 1: the validations' batch in this group, whose compiled sampling graphs these reuse
    assert evaluate_ti.main([str(run_dir), "--n", "2", "--batch", "1", "--seed", "7", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    metrics = read_metrics(run_dir / "evaluation" / "metrics.csv")
    # step 0: the vectors training started from, a reference left out of the rule
    assert list(metrics) == [0, 1, 2]
    assert [row["checkpoint"] for row in metrics.values()] == \
        ["initializer 'shape'", "SDv1.5_textual_inversion_1_ti.ckpt", "SDv1.5_textual_inversion_2_ti.ckpt"]
    assert all(set(row) == {"step", "checkpoint", "concept", "edit", f"edit: {EDIT}"} for row in metrics.values())
    assert all(0 <= row["concept"] <= 1 and row["edit"] == row[f"edit: {EDIT}"] for row in metrics.values())
    # the same seeds for every prompt of every checkpoint: batch j from seed + j
    assert seeds == [7, 8] * 2 * 3
    best = best_row([row for step, row in metrics.items() if step > 0], 0.1)
    assert f"best: step {best['step']} ({best['checkpoint']})" in printed
    assert f"| 2 | SDv1.5_textual_inversion_2_ti.ckpt | {metrics[2]['concept']:.3f} |" in printed
    assert Image.open(run_dir / "evaluation" / "scores.png").size == PLOT_SIZE


def test_one_embedding_the_old_way_and_mistakes(run_dir, tmp_path, capsys, shared_graphs):
    path = run_dir / "weights" / "SDv1.5_textual_inversion_2_ti.ckpt"
    assert evaluate_ti.main(["--ti_ckpt_path", str(path), "--n", "1", "--steps", "2",
                             "--out", str(tmp_path / "one"), "--edit_prompts", "a {} on a red background",
                             "a red square"]) == 0
    metrics = read_metrics(tmp_path / "one" / "metrics.csv")
    assert list(metrics) == [0, 2]
    assert list(metrics[2])[4:] == ["edit: a <my-shape> on a red background", "edit: a red square"]
    for argv, fragment in [([str(tmp_path)], "has no train_config_resolved.yaml"),
                           ([str(run_dir), "--edit_prompts", "a {} on the beach"], "names nothing the toy-world judge"),
                           (["--ti_ckpt_path", str(run_dir / "weights" / "best_ti.ckpt")], "not a saved embedding")]:
        with pytest.raises(SystemExit) as done:
            evaluate_ti.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1 and fragment in err[0], err
