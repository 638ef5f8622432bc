"""The MindSpore CLIP against transformers on the tiny random CLIP (tools/dev/make_clip_fixtures.py), and the
CLIP scorer's values, placeholder removal and loading errors."""
import os
import shutil

import numpy as np
import pytest
from huggingface_hub import constants

from ldm.checkpoint_io import CheckpointError, load_state_dict, save_safetensors
from ldm.clip_scorer import CLIP, ClipScorer, normalized, resolve_clip, without_placeholder
from ldm.errors import ModelConfigError
from ldm.pretrained import WeightsNotFoundError
from ldm.scoring import make_scorer
from ldm.tokenizer import tokenize

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "tiny-clip")
PLACEHOLDER = "<cat-toy>"
EDIT_PROMPT = f"a photo of {PLACEHOLDER} {PLACEHOLDER}_1 on the beach"


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIXTURES, "tiny-clip-reference.npz"))


@pytest.fixture(scope="module")
def images(ref):
    return [ref[f"image_{i}"] for i in range(len(ref["pixel_values"]))]


@pytest.fixture(scope="module")
def clip(pynative_mode):
    return CLIP(FOLDER)


def test_preprocessing_and_token_ids_match_clip_processor(clip, ref, images):
    # landscape, portrait, square and upscaled images, resized to 40 then cropped to 32 as the folder says
    np.testing.assert_allclose(clip.preprocess(images), ref["pixel_values"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(tokenize(clip.tokenizer, list(ref["prompts"])), ref["input_ids"])


def test_image_and_text_embeddings_match_transformers(clip, ref, images):
    image_features = clip.image_features(images)
    text_features = clip.text_features(list(ref["prompts"]))
    np.testing.assert_allclose(image_features, ref["image_features"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(text_features, ref["text_features"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(normalized(image_features), ref["image_embeds"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(normalized(text_features), ref["text_embeds"], rtol=0, atol=1e-4)


def test_placeholder_and_its_numbered_tokens_are_removed():
    assert without_placeholder(EDIT_PROMPT, PLACEHOLDER) == "a photo of on the beach"
    assert without_placeholder("<t>'s toy, by <t>_12.", "<t>") == "'s toy, by ."
    # whole words only
    assert without_placeholder("sks asks about sks_2 and sksx", "sks") == "asks about and sksx"


def test_scorer_values_are_mean_raw_cosines(pynative_mode, ref, images):
    scorer = make_scorer("clip", images[:2], PLACEHOLDER, model=FOLDER)
    assert isinstance(scorer, ClipScorer) and scorer.name == "clip" and 0 < scorer.margin < 0.1
    embeds = ref["image_embeds"]
    # CLIP-I: every (sample, training image) pair
    expected_concept = np.mean([embeds[i] @ embeds[j] for i in (2, 3) for j in (0, 1)])
    assert scorer.concept(images[2:]) == pytest.approx(expected_concept, abs=1e-5)
    # CLIP-T: against the prompt without the placeholder, as transformers embeds "a photo of on the beach"
    text = ref["text_embeds"][list(ref["prompts"]).index("a photo of on the beach")]
    assert scorer.edit(images, EDIT_PROMPT) == pytest.approx(np.mean(embeds @ text), abs=1e-5)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    # the hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well as the variable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_offline_and_not_cached_is_one_line_naming_repo_and_folder(offline):
    models = offline / "models"
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_clip("openai/clip-vit-large-patch14", models_dir=str(models))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("CLIP model openai/clip-vit-large-patch14 not found: put config.json, "
                              "model.safetensors and preprocessor_config.json from "
                              f"huggingface.co/openai/clip-vit-large-patch14 in {models}/clip-vit-large-patch14/")
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(WeightsNotFoundError, match="CLIP model someone/no-such-clip not found"):
        ClipScorer([], PLACEHOLDER, model="someone/no-such-clip")


def test_hub_id_is_found_in_the_models_folder(offline):
    models = offline / "models"
    shutil.copytree(FOLDER, models / "tiny-clip")
    assert resolve_clip("someone/tiny-clip", models_dir=str(models)) == str(models / "tiny-clip")
    with pytest.raises(WeightsNotFoundError, match="no-such-folder: no such folder"):
        resolve_clip(str(offline / "no-such-folder"))


def test_loading_is_strict_and_names_the_file(pynative_mode, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(FOLDER, folder)
    path = str(folder / "model.safetensors")
    state = load_state_dict(path)
    del state["vision_model.post_layernorm.bias"]
    state["vision_model.extra.weight"] = np.zeros(2, np.float16)
    # accepted and unused
    state["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    save_safetensors(state, path)
    with pytest.raises(CheckpointError) as info:
        CLIP(str(folder))
    message = str(info.value)
    assert message.startswith(f"{path}: CLIP vision weights do not match the model: "
                              "missing 1 (vision_model.post_layernorm.bias); unexpected 1 (vision_model.extra.weight)")
    with pytest.raises(ModelConfigError, match="text_encoder/config.json: not a CLIPModel config"):
        CLIP(os.path.join(FIXTURES, "tiny-sd1", "text_encoder"))
