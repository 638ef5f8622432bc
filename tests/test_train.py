"""Textual Inversion training mechanics on the tiny random-weight SD1 reference model (tests/fixtures).

Learning itself is tested on the trained toy-world model (test_toy_learning.py): a random model's loss
barely depends on the text. Here: the gradient, that nothing but the vectors moves, the script's
outputs, resume, and every bad input.
"""

import logging
import os
import signal
import threading
import time

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

import train_textual_inversion as T
from data.dataset import get_templates
from ldm.embeddings import load_embedding
from ldm.pipeline import StableDiffusion
from ldm.scoring import best_row, read_metrics, write_metrics
from ldm.tokenizer import add_placeholder_tokens, placeholder_names
from ldm.training.config import ConfigError
from ldm.training.figures import PLOT_SIZE, save_captioned_grid, save_loss_curve
from ldm.training.loss import TextualInversionLoss
from ldm.training.optim import Adam
from tests.conftest import session_graphs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-sd1")
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "examples", "purple_star")
TINY_YAML = "configs/train/train_config_textual_inversion_tiny.yaml"
# The runs of this group (test_train, test_evaluate_ti, test_editability_study) train 2 vectors on
# batches of 2 64 px images: one training graph for all (`grad_fn`), compiled once.
RUN_SHAPE = ["--image_size", "64", "--num_vectors", "2", "--train_batch_size", "2"]


def run_argv(output_path, *extra):
    """The trainer's arguments for a run of this group: the tiny demo config on the tiny SD1 fixture."""
    return ["--train_config", TINY_YAML, "--pretrained_model_path", FIXTURE, "--model_config", "none",
            "--version", "1.5", *RUN_SHAPE, "--validation_prompt", "none", "--mode", "0",
            "--output_path", str(output_path), *extra]


def run(tmp_path, *extra, output="out"):
    return T.main(run_argv(tmp_path / output, *extra))


@pytest.fixture(scope="module")
def sd(_loaded):
    ms.set_context(mode=ms.GRAPH_MODE)
    with session_graphs(_loaded):
        model = StableDiffusion.load("1.5", FIXTURE)
    model.add_placeholder("<t>", np.random.default_rng(0).standard_normal((2, model.embedding_dim)).astype(np.float32)
                          * 0.02)
    return model


@pytest.fixture(scope="module")
def batch(sd):
    rng = np.random.default_rng(1)
    # the shapes and arguments of the runs' micro-batches (RUN_SHAPE, no SDXL size ids)
    size = 64 // sd.latent_factor
    latents = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    noise = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    ids = sd.token_ids(["a photo of <t>", "a <t> on a blue background"])
    return [ms.Tensor(latents), ms.Tensor(ids), ms.Tensor(noise), ms.Tensor(np.array([50, 700], np.int32)),
            ms.Tensor(1.0, ms.float32), None]


@pytest.fixture(scope="module")
def grad_fn(sd, _loaded):
    """The gradient, compiled once, of the 2-vector batch-2 training runs below."""
    with session_graphs(_loaded):
        # through the trainer's name, which share_graphs replaces with the session's loss
        loss = T.TextualInversionLoss(sd.unet, sd.conditioner, sd.alphas_cumprod, "eps")
        return ms.value_and_grad(loss, grad_position=0)


def test_gradient_matches_finite_differences(sd, batch, grad_fn):
    vectors = sd.extra_embeddings.copy()
    _, grad = grad_fn(ms.Tensor(vectors), *batch)
    grad = grad.asnumpy()
    assert grad.shape == vectors.shape and np.abs(grad).max() > 0
    direction = np.random.default_rng(2).standard_normal(vectors.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    h = 1e-2
    plus = float(grad_fn(ms.Tensor(vectors + h * direction), *batch)[0].asnumpy())
    minus = float(grad_fn(ms.Tensor(vectors - h * direction), *batch)[0].asnumpy())
    numeric = (plus - minus) / (2 * h)
    analytic = float(np.sum(grad * direction))
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-6)


def test_recompute_changes_no_gradient(micro_sd1):
    """Gradient checkpointing (train key `recompute`) recomputes the UNet's blocks in the backward."""
    # on the micro model, against its plain gradient in PyNative mode: only the recomputing graph is compiled
    model = StableDiffusion.load("1.5", *micro_sd1)
    rng = np.random.default_rng(1)
    model.add_placeholder("<t>", rng.standard_normal((2, model.embedding_dim)).astype(np.float32))
    latents, noise = rng.standard_normal((2, 2, 4, 16, 16)).astype(np.float32)
    batch = [ms.Tensor(latents), ms.Tensor(model.token_ids(["a photo of <t>", "a <t> on a blue background"])),
             ms.Tensor(noise), ms.Tensor(np.array([50, 700], np.int32)), ms.Tensor(1.0, ms.float32), None]
    vectors = ms.Tensor(model.extra_embeddings)

    def value_and_grad():
        loss = TextualInversionLoss(model.unet, model.conditioner, model.alphas_cumprod, "eps")
        return [out.asnumpy() for out in ms.value_and_grad(loss, grad_position=0)(vectors, *batch)]

    previous = ms.get_context("mode")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        loss, grad = value_and_grad()
        ms.set_context(mode=ms.GRAPH_MODE)
        model.unet.enable_gradient_checkpointing()
        loss_r, grad_r = value_and_grad()
    finally:
        ms.set_context(mode=previous)
    assert np.abs(grad).max() > 0
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    np.testing.assert_allclose(grad_r, grad, rtol=1e-5, atol=1e-6 * np.abs(grad).max())


def test_only_the_vectors_change(sd, batch, grad_fn):
    cells = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}
    before = {f"{k}.{n}": p.asnumpy().copy() for k, c in cells.items() for n, p in c.parameters_and_names()}
    vectors = sd.extra_embeddings.copy()
    optimizer = Adam(vectors.shape, weight_decay=1e-2)
    for _ in range(3):
        _, grad = grad_fn(ms.Tensor(vectors), *batch)
        vectors = optimizer.step(vectors, grad.asnumpy(), 1e-2)
    assert not np.allclose(vectors, sd.extra_embeddings)
    after = {f"{k}.{n}": p.asnumpy() for k, c in cells.items() for n, p in c.parameters_and_names()}
    assert before.keys() == after.keys()
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert changed == []
    # the model weights are frozen: no parameter asks for a gradient
    assert all(not p.requires_grad for c in cells.values() for p in c.get_parameters())


def test_train_script_outputs_and_resume_equals_uninterrupted(tmp_path, caplog, capsys, shared_graphs):
    common = ["--gradient_accumulation_steps", "2", "--scheduler", "linear", "--start_learning_rate", "5e-3",
              "--decay_steps", "4", "--ckpt_save_interval", "2", "--log_interval", "3"]
    validation = ["--validation_prompt", "a photo of <my-shape>", "--validation_steps", "4",
                  "--num_validation_images", "1"]
    handlers = [signal.getsignal(sig) for sig in T.STOP_SIGNALS]
    assert run(tmp_path, *common, "--max_steps", "4", *validation, output="full") == 0
    assert [signal.getsignal(sig) for sig in T.STOP_SIGNALS] == handlers   # the caller's handlers are back
    full = tmp_path / "full"
    ckpts = sorted(f for f in os.listdir(full / "weights") if f.endswith(".ckpt"))
    # and the best of the scored validations (the tiny config's validation_metric judge)
    assert ckpts == ["SDv1.5_textual_inversion_2_ti.ckpt", "SDv1.5_textual_inversion_4_ti.ckpt", "best_ti.ckpt"]
    emb = load_embedding(str(full / "weights" / ckpts[1]))
    assert emb.token == "<my-shape>" and emb.vectors.shape == (2, 6)
    # the validation image as an A1111 embedding card holding the same vectors
    assert sorted(os.listdir(full / "validation")) == ["step_0000004.png"]
    card = load_embedding(str(full / "weights" / "SDv1.5_textual_inversion_4_ti.png"))
    assert card.token == "<my-shape>" and card.source_format == "a1111_card"
    np.testing.assert_array_equal(card.vectors, emb.vectors)
    first = load_embedding(str(full / "weights" / ckpts[0]))
    assert not np.array_equal(first.vectors, emb.vectors)
    # a row every log_interval (3) steps and at the last step
    log = (full / "loss_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,loss_scale,seconds"
    rows = [line.split(",") for line in log[1:]]
    assert [int(r[0]) for r in rows] == [3, 4]
    assert [float(r[2]) for r in rows] == pytest.approx([5e-3 + (1e-7 - 5e-3) * s / 4 for s in (2, 3)])
    assert (full / "train_config_resolved.yaml").exists()
    assert Image.open(full / "loss.png").size == PLOT_SIZE
    # the grid of the one 64 px validation image below its caption strip
    width, height = Image.open(full / "validation" / "step_0000004.png").size
    assert width == 64 and height > 64

    # stop after 2 steps (same schedule), then resume to 4: identical to the uninterrupted run
    assert run(tmp_path, *common, "--max_steps", "2", output="split") == 0
    assert run(tmp_path, *common, "--max_steps", "4", "--resume", "latest", output="split") == 0
    resumed = load_embedding(str(tmp_path / "split" / "weights" / ckpts[1]))
    np.testing.assert_allclose(resumed.vectors, emb.vectors, rtol=0, atol=1e-7)
    # step 2 was the first run's last: logged; the resumed run logs the full run's losses and learning rates
    split_log = (tmp_path / "split" / "loss_log.csv").read_text().splitlines()
    split_rows = [line.split(",") for line in split_log[1:]]
    assert [int(r[0]) for r in split_rows] == [2, 3, 4]
    assert [r[2] for r in split_rows[1:]] == [r[2] for r in rows]
    assert [float(r[1]) for r in split_rows[1:]] == pytest.approx([float(r[1]) for r in rows], rel=1e-5)
    # another clip_skip would go on training for other features: refused, and the run's files are as they were
    before = {f: (tmp_path / "split" / f).read_bytes() for f in ("loss_log.csv", "train_config_resolved.yaml")}
    _expect_error(capsys, run(tmp_path, *common, "--max_steps", "6", "--resume", "latest", "--clip_skip", "2",
                              output="split"), "trained with clip_skip 1, this run has clip_skip 2", "--clip_skip 1")
    assert {f: (tmp_path / "split" / f).read_bytes() for f in before} == before

    # the newest state cut short (disk full, a killed copy): latest resumes from the readable one before it
    newest = tmp_path / "split" / "state" / "train_state_0000004.npz"
    newest.write_bytes(newest.read_bytes()[:300])
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, *common, "--max_steps", "4", "--resume", "latest", output="split") == 0
    assert any(str(newest) in r.message and "damaged" in r.message for r in caplog.records)
    again = load_embedding(str(tmp_path / "split" / "weights" / ckpts[1]))
    np.testing.assert_allclose(again.vectors, emb.vectors, rtol=0, atol=1e-7)
    # named explicitly, a damaged state is an error naming it (main() prints it as one line, exit 2)
    newest.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(T.DamagedStateError, match=f"--resume {newest} is damaged .*pass an earlier state"):
        T.load_resume_state(str(newest), str(tmp_path / "split"))
    assert issubclass(T.DamagedStateError, T.USER_ERRORS)


def test_scored_validation_keeps_the_best_embedding_across_resume(tmp_path, shared_graphs):
    scored = ["--validation_prompt", "a photo of <my-shape>", "--validation_steps", "1", "--num_validation_images", "1",
              "--validation_metric", "judge", "--ckpt_save_interval", "10", "--log_interval", "10"]
    assert run(tmp_path, *scored, "--max_steps", "1") == 0
    out = tmp_path / "out"
    weights = out / "weights"
    metrics = read_metrics(out / "metrics.csv")
    # a scored validation's embedding is saved, whatever ckpt_save_interval says
    assert list(metrics) == [1] and metrics[1]["checkpoint"] == "SDv1.5_textual_inversion_1_ti.ckpt"
    assert set(metrics[1]) == {"step", "checkpoint", "concept", "edit", "edit: a <my-shape> on a yellow background"}
    assert (weights / "best_ti.ckpt").read_bytes() == (weights / metrics[1]["checkpoint"]).read_bytes()
    assert (out / "scores.png").exists()
    # the validation grid: a row per prompt (the validation prompt's, the edited prompt's) of 64 px images
    width, height = Image.open(out / "validation" / "step_0000001.png").size
    assert width == 64 and height > 128

    # step 1 scored as well as a step can (by hand): the resumed run keeps it as the best, its own row added
    metrics[1].update(concept=1.0, edit=1.0)
    write_metrics(out / "metrics.csv", metrics.values())
    assert run(tmp_path, *scored, "--max_steps", "2", "--resume", "latest") == 0
    metrics = read_metrics(out / "metrics.csv")
    assert list(metrics) == [1, 2] and metrics[1]["concept"] == 1.0
    best = best_row(metrics.values(), 0.1)
    assert best["step"] == 1 and metrics[2]["checkpoint"] == "SDv1.5_textual_inversion_2_ti.ckpt"
    assert (weights / "best_ti.ckpt").read_bytes() == (weights / best["checkpoint"]).read_bytes()


def test_captions_must_fit_the_context():
    # 80 vectors make every object caption longer than CLIP's 77 tokens: refused, naming the largest count that fits
    tokenizer = StableDiffusion.load("1.5", FIXTURE).tokenizer
    templates = get_templates("object")
    names = add_placeholder_tokens(tokenizer, "<t>", 80) and placeholder_names("<t>", 80)
    with pytest.raises(ConfigError, match="num_vectors 80: the caption template .* at most") as err:
        T.check_captions_fit(tokenizer, templates, " ".join(names), 80)
    limit = int(str(err.value).rsplit(" ", 1)[1])
    T.check_captions_fit(tokenizer, templates, " ".join(names[:limit]), limit)
    with pytest.raises(ConfigError):
        T.check_captions_fit(tokenizer, templates, " ".join(names[:limit + 1]), limit + 1)


def test_loss_plot_and_captioned_grid_are_images_of_their_size(tmp_path):
    # a log with an fp16 overflow step (non-finite loss, not plotted), a one-row log, a constant one
    steps = np.arange(1, 51)
    losses = 0.2 + 0.05 * np.random.default_rng(0).standard_normal(50)
    losses[10] = np.inf
    logs = [(steps, losses, np.minimum(steps / 10, 1.0) * 1e-3), ([1], [0.3], [1e-3]), ([5, 10], [0.1, 0.1], [0, 0])]
    for i, log in enumerate(logs):
        save_loss_curve(tmp_path / f"loss{i}.png", *log)
        assert Image.open(tmp_path / f"loss{i}.png").size == PLOT_SIZE
    grid = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    save_captioned_grid(tmp_path / "grid.png", grid, ["step 100", "a photo of <my-shape> on a yellow background"])
    image = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert image.shape[1] == 64 and image.shape[0] > 32
    np.testing.assert_array_equal(image[-32:], grid)  # the grid whole, below its caption
    assert image[:-32].min() < 128  # the caption's text


def _image_dir(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for fname, content in files.items():
        (folder / fname).write_bytes(content)
    return str(folder)


def _expect_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ")
    for needle in needles:
        assert needle in err[-1], err[-1]


@pytest.mark.parametrize("args, needles", [
    (["--num_vectors", "0"], ["num_vectors"]),
    (["--num_vectors", "80"], ["num_vectors 80", "at most"]),
    (["--learning_rate", "1e-4"], ["learning_rate", "start_learning_rate"]),
    (["--max_steps", "many"], ["max_steps"]),
    (["--initializer_token", "<my-shape>"], ["<my-shape>", "placeholder"]),
    (["--placeholder_token", "cat"], ["'cat'", "already exists"]),
    (["--model_config", "configs/v2-inference.yaml"], ["tiny-sd1", "2.x"]),
    (["--train_data_dir", "does/not/exist"], ["does/not/exist"]),
    (["--pretrained_model_path", "no/sd.safetensors"], ["pretrained_model_path: no/sd.safetensors does not exist"]),
    (["--pretrained_model_file", "sd.ckpt"], [f"pretrained_model_path + pretrained_model_file: {FIXTURE}/sd.ckpt"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needles):
    code = run(tmp_path, "--max_steps", "1", *args)
    _expect_error(capsys, code, *needles)
    assert not (tmp_path / "out" / "weights").exists() or not os.listdir(tmp_path / "out" / "weights")


def test_bad_image_folders(tmp_path, capsys):
    empty = _image_dir(tmp_path, "empty", {})
    _expect_error(capsys, run(tmp_path, "--train_data_dir", empty), "empty")
    texts = _image_dir(tmp_path, "texts", {"a.txt": b"hello"})
    _expect_error(capsys, run(tmp_path, "--train_data_dir", texts), "texts")
    corrupt = _image_dir(tmp_path, "corrupt", {"a.png": b"\x89PNG\r\n\x1a\nbroken"})
    _expect_error(capsys, run(tmp_path, "--train_data_dir", corrupt), "corrupt")


def test_output_path_not_writable_or_holding_a_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _expect_error(capsys, run(tmp_path, "--output_path", str(blocker / "sub")), "output_path")
    weights = tmp_path / "out" / "weights"
    weights.mkdir(parents=True)
    earlier = weights / "SDv1.5_textual_inversion_9_ti.ckpt"
    earlier.write_bytes(b"earlier run")
    _expect_error(capsys, run(tmp_path, "--max_steps", "1"), "--resume latest")
    assert earlier.read_bytes() == b"earlier run"


def test_non_finite_gradient_stops_and_keeps_the_last_good_embedding(tmp_path, capsys, shared_graphs):
    # an absurd learning rate blows the vectors up to ~1e38; the next gradient overflows
    code = run(tmp_path, "--start_learning_rate", "1e38", "--scheduler", "constant", "--max_steps", "4",
               "--ckpt_save_interval", "1")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert "not finite at step 3" in err and "SDv1.5_textual_inversion_2_ti.ckpt" in err
    weights = tmp_path / "out" / "weights"
    assert sorted(os.listdir(weights)) == ["SDv1.5_textual_inversion_1_ti.ckpt", "SDv1.5_textual_inversion_2_ti.ckpt"]
    assert np.isfinite(load_embedding(str(weights / "SDv1.5_textual_inversion_2_ti.ckpt")).vectors).all()


def test_sigterm_saves_a_resumable_state(tmp_path, shared_graphs):
    # in this process, so the run reuses the session's compiled graphs; the script exits with main()'s code
    log = tmp_path / "out" / "loss_log.csv"

    def terminate_after_two_steps():
        deadline = time.time() + 300
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    threading.Thread(target=terminate_after_two_steps, daemon=True).start()
    code = run(tmp_path, "--max_steps", "1000", "--ckpt_save_interval", "1000", "--log_interval", "1")
    assert code == 128 + signal.SIGTERM
    step = len(log.read_text().splitlines()) - 1
    assert 2 <= step < 1000
    assert (tmp_path / "out" / "state" / f"train_state_{step:07d}.npz").exists()
    assert (tmp_path / "out" / "weights" / f"SDv1.5_textual_inversion_{step}_ti.ckpt").exists()


def test_v_prediction_loss_targets_v():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        sd = StableDiffusion.load("2.1-v", os.path.join(os.path.dirname(FIXTURE), "tiny-sd2-v"))
        assert sd.config.parameterization == "v"
        rng = np.random.default_rng(3)
        latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        t = np.array([10, 900], np.int32)
        ids = sd.token_ids(["a photo", "a cat"])
        loss_net = TextualInversionLoss(sd.unet, sd.conditioner, sd.alphas_cumprod, "v")
        vectors = np.zeros((1, sd.embedding_dim), np.float32)
        loss = float(loss_net(ms.Tensor(vectors), ms.Tensor(latents), ms.Tensor(ids), ms.Tensor(noise), ms.Tensor(t),
                              ms.Tensor(1.0, ms.float32)).asnumpy())
        a = np.sqrt(sd.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
        s = np.sqrt(1 - sd.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
        noisy = (a * latents + s * noise).astype(np.float32)
        pred = sd.unet(ms.Tensor(noisy), ms.Tensor(t), sd.text_encoder(ms.Tensor(ids))).asnumpy()
        expected = np.mean((pred - (a * noise - s * latents)) ** 2)
        assert loss == pytest.approx(expected, rel=1e-5)
        assert abs(expected - np.mean((pred - noise) ** 2)) > 1e-3  # v and eps targets really differ here
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
