"""Clip skip: our `clip_skip` k (A1111's "Clip skip", kohya's clip_skip) against diffusers' `clip_skip` k - 1.

References (tests/fixtures/clip-skip.npz, tools/dev/make_pipeline_fixtures.py) are the prompt embeddings of
diffusers' `StableDiffusionPipeline.encode_prompt` on the tiny reference models; tiny-sd1's include a
prompt with a 2-vector Textual Inversion embedding, the path training differentiates.
"""

import os

import mindspore as ms
import numpy as np
import pytest
import yaml
from PIL import Image

import text_to_image
import train_textual_inversion
from ldm.embeddings import load_embedding
from ldm.errors import UserInputError
from ldm.pipeline import StableDiffusion
from ldm.training.config import ConfigError, parse_train_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY_SD1 = os.path.join(FIXTURES, "tiny-sd1")
MODELS = {"tiny-sd1": "1.5", "tiny-sd2": "2.1"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURES, "clip-skip.npz")))


@pytest.fixture
def restore_mode():
    previous = ms.get_context("mode")
    yield
    ms.set_context(mode=previous)


def load(model, clip_skip):
    sd = StableDiffusion.load(MODELS[model], os.path.join(FIXTURES, model), clip_skip=clip_skip)
    if model == "tiny-sd1":
        emb = load_embedding(os.path.join(FIXTURES, "tiny-embeddings", "learned_embeds.bin"))
        sd.add_placeholder(emb.token, emb.vectors)
    return sd


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("model", MODELS)
def test_prompt_embeddings_match_diffusers(ref, model, mode, restore_mode):
    ms.set_context(mode=mode)
    prompts = [str(p) for p in ref[f"{model}.prompts"]]
    hidden = {k: load(model, k).encode_text(prompts)[0].asnumpy() for k in (1, 2)}
    for k, h in hidden.items():
        np.testing.assert_allclose(h, ref[f"{model}.clip_skip_{k}"], atol=TOLERANCE, err_msg=f"clip_skip {k}")
    # skipping the last layer changes the embeddings well beyond the tolerance
    assert np.abs(hidden[1] - hidden[2]).max() > 0.5


def test_out_of_range_is_refused():
    with pytest.raises(UserInputError) as err:
        StableDiffusion.load("1.5", TINY_SD1, clip_skip=3)
    assert str(err.value) == ("clip_skip 3: this text encoder has 2 layers; use --clip_skip 1 (the last layer, "
                              "no skip) to 2")


def _sample_args(tmp_path, *extra):
    return ["--version", "1.5", "--ckpt_path", TINY_SD1, "--prompt", "a red circle", "--H", "16", "--W", "16",
            "--n_samples", "1", "--sampling_steps", "1", "--skip_grid", "--mode", "1",
            "--output_path", str(tmp_path), *extra]


def test_sampling_records_clip_skip_and_refuses_bad_values(tmp_path, capsys, restore_mode):
    assert text_to_image.main(_sample_args(tmp_path, "--clip_skip", "2")) == 0
    with Image.open(tmp_path / "samples" / "00000.png") as image:
        parameters = image.text["parameters"]
    assert parameters.endswith(", Model: tiny-sd1, Version: 1.5, Clip skip: 2"), parameters

    assert text_to_image.main(_sample_args(tmp_path, "--clip_skip", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: clip_skip 3: this text encoder has 2 layers; use --clip_skip 1 (the last layer, " \
                      "no skip) to 2"
    with pytest.raises(SystemExit) as exit_:
        text_to_image.parse_args(_sample_args(tmp_path, "--clip_skip", "0"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --clip_skip must be >= 1")
    assert os.listdir(tmp_path / "samples") == ["00000.png"]


def test_train_config_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train_data_dir": "data", "placeholder_token": "<t>", "clip_skip": 2}))
    assert parse_train_config(["--train_config", str(path)]).clip_skip == 2
    assert parse_train_config(["--train_config", str(path), "--clip_skip", "1"]).clip_skip == 1
    with pytest.raises(ConfigError, match="clip_skip has to be >= 1"):
        parse_train_config(["--train_config", str(path), "--clip_skip", "0"])


def test_training_loads_the_text_encoder_with_the_configs_clip_skip(tmp_path, capsys, restore_mode):
    # an out-of-range value is refused by the loaded text encoder: proof that training builds it with clip_skip
    code = train_textual_inversion.main([
        "--train_config", "configs/train/train_config_textual_inversion_tiny.yaml", "--pretrained_model_path",
        TINY_SD1, "--model_config", "none", "--version", "1.5", "--output_path", str(tmp_path / "out"),
        "--mode", "1", "--clip_skip", "3"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: clip_skip 3: this text encoder has 2")
