"""The key sets of the checkpoints users download (tests/fixtures/checkpoint-keys: names and shapes from
public listings) through the whole single-file path: key mapping, config inference, the check against
the shipped config of their version, and the strict comparison with our cells' parameter names and
shapes. Names and shapes only: the values are zero-strided arrays (no memory), the cells are built
without parameter data (`build_models(init=False)`). tools/check_full_size.py loads and samples
full-size stand-ins of the same key sets.
"""
import logging
import os

import numpy as np
import pytest

import ldm.convert
from ldm.checkpoint_io import CheckpointError
from ldm.convert import (IGNORED_EMA, IGNORED_NON_EMA, IGNORED_SCHEDULE, IGNORED_TEXT_EXTRAS, IGNORED_TEXT_LAYERS,
                         IGNORED_TRAINING, PARTS, collect_key_reports, compare_keys, ema_name, load_pretrained)
from ldm.models import build_models, load_model_config
from ldm.pretrained import get_version
from tools.check_full_size import KEY_SETS, read_key_list

YAMLS = os.path.join(os.path.dirname(__file__), "fixtures", "yaml")

# per key set: layout, keys in the file, and the keys set aside by category. The rest (file keys, before
# OpenCLIP's packed q/k/v are split) is what is loaded.
EXPECTED = {
    "sd15_original": ("original", 1145, {IGNORED_SCHEDULE: 12, IGNORED_TRAINING: 2, IGNORED_TEXT_EXTRAS: 1}),
    "sd15_original_with_ema": ("original", 1831, {IGNORED_EMA: 686, IGNORED_SCHEDULE: 12, IGNORED_TRAINING: 2,
                                                  IGNORED_TEXT_EXTRAS: 1}),
    # SD 2.x: logit_scale and text_projection, and the last of OpenCLIP's 24 blocks (12 tensors)
    "sd21_original": ("original", 1242, {IGNORED_SCHEDULE: 12, IGNORED_TRAINING: 2, IGNORED_TEXT_EXTRAS: 2,
                                         IGNORED_TEXT_LAYERS: 12}),
    "mindone_sd15": ("mindone", 1082, {}),
    "mindone_sd21": ("mindone", 1214, {}),
    "mindone_sd21_vae_weightbias": ("mindone", 1214, {}),
}
CASES = [(name, version) for name, (versions, _) in KEY_SETS.items() for version in versions]


def state_dict(name, drop=()):
    """The key set with zero-memory values; each key's value is its index, to tell copies apart."""
    return {key: np.broadcast_to(np.float32(i), shape)
            for i, (key, shape) in enumerate(read_key_list(name)) if not key.startswith(drop)}


@pytest.fixture
def weights_file(monkeypatch):
    """Point the file reader at a key set: `weights_file(name)` -> the path to pass to load_pretrained."""
    def use(name, **kwargs):
        sd = state_dict(name, **kwargs)
        monkeypatch.setattr(ldm.convert, "load_state_dict", lambda path: sd)
        return f"models/{name}.safetensors"
    return use


@pytest.fixture(scope="module")
def cells():
    """Our cells (names and shapes only) per config file, built once."""
    cache = {}

    def get(config_path):
        if config_path not in cache:
            cache[config_path] = dict(zip(PARTS, build_models(load_model_config(config_path), init=False)))
        return cache[config_path]
    return get


def _load(path, config_path, caplog, use_ema=False):
    """load_pretrained as the scripts call it (key mapping, config inferred from the weights and checked
    against the config); returns (config, parts, layout, KeyReport)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.convert"), collect_key_reports() as reports:
        cfg, parts, layout = load_pretrained(path, load_model_config(config_path), use_ema)
    (report,) = reports
    return cfg, parts, layout, report


def _assert_strict_fit(parts, cells):
    for part in PARTS:
        missing, unexpected, mismatched = compare_keys(cells[part], parts[part])
        assert (missing, unexpected, mismatched) == ([], [], []), part
        assert len(parts[part]) == len(list(cells[part].get_parameters())), part


@pytest.mark.parametrize("name,version", CASES)
def test_real_key_set_loads_with_the_shipped_config_of_its_version(name, version, weights_file, cells, caplog):
    config_path = get_version(version).config_path
    _, parts, layout, report = _load(weights_file(name), config_path, caplog)
    layout_expected, total, ignored = EXPECTED[name]
    assert (layout, report.layout, report.total) == (layout_expected, layout_expected, total)
    assert {category: len(keys) for category, keys in report.ignored.items()} == ignored
    assert report.loaded == total - sum(ignored.values())
    _assert_strict_fit(parts, cells(config_path))


@pytest.mark.parametrize("yaml_name,name", [
    ("compvis-v1-inference", "sd15_original"), ("mindone-v1-inference", "mindone_sd15"),
    ("stability-v2-inference", "sd21_original"), ("stability-v2-inference-v", "sd21_original"),
    ("mindone-v2-inference", "mindone_sd21"), ("mindone-v2-inference", "mindone_sd21_vae_weightbias")])
def test_reference_yaml_as_config_loads_the_key_set(yaml_name, name, weights_file, cells, caplog):
    config_path = os.path.join(YAMLS, yaml_name + ".yaml")
    _, parts, _, report = _load(weights_file(name), config_path, caplog)
    assert report.loaded == EXPECTED[name][1] - sum(EXPECTED[name][2].values())
    _assert_strict_fit(parts, cells(config_path))


def test_openclip_last_layer_config_keeps_all_24_blocks(weights_file, tmp_path, caplog):
    # Stability's FrozenOpenCLIPEmbedder with layer: last reads the 24th block: nothing is left over
    text = open(os.path.join(YAMLS, "stability-v2-inference.yaml")).read().replace('"penultimate"', '"last"')
    (tmp_path / "last.yaml").write_text(text)
    cfg, parts, _, report = _load(weights_file("sd21_original"), str(tmp_path / "last.yaml"), caplog)
    assert cfg.text_encoder.layers == 24 and IGNORED_TEXT_LAYERS not in report.ignored
    assert "text_model.encoder.layers.23.self_attn.q_proj.weight" in parts["text_encoder"]


def test_ema_copies_are_set_aside_unless_asked_for(weights_file, caplog):
    path = weights_file("sd15_original_with_ema")
    sd = ldm.convert.load_state_dict(path)
    config_path = get_version("1.5").config_path
    _, parts, _, report = _load(path, config_path, caplog)
    assert "using the non-EMA ones" in caplog.text and "--extract_ema" in caplog.text
    for key, value in parts["unet"].items():
        assert value[(0,) * value.ndim] == sd["model.diffusion_model." + key][(0,) * value.ndim]

    _, parts, _, report = _load(path, config_path, caplog, use_ema=True)
    assert "using the EMA UNet weights" in caplog.text
    assert {category: len(keys) for category, keys in report.ignored.items()}[IGNORED_NON_EMA] == 686
    assert report.loaded == 1130
    for key, value in parts["unet"].items():
        assert value[(0,) * value.ndim] == sd[ema_name(key)][(0,) * value.ndim]
    assert ema_name("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


@pytest.mark.parametrize("name", ["sd15_original", "mindone_sd21"])
def test_extract_ema_without_ema_copies_fails_in_one_line(name, weights_file):
    path = weights_file(name)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, load_model_config(get_version("1.5" if "15" in name else "2.1").config_path), True)
    message = str(err.value)
    assert message.startswith(path) and "no EMA copies" in message and "\n" not in message


@pytest.mark.parametrize("drop", [("model_ema.",), ("betas", "alphas", "sqrt_", "log_one", "posterior_"),
                                  ("cond_stage_model.transformer.text_model.embeddings.position_ids",)])
def test_optional_keys_may_be_absent(drop, weights_file, cells, caplog):
    config_path = get_version("1.5").config_path
    _, parts, _, report = _load(weights_file("sd15_original", drop=drop), config_path, caplog)
    assert report.loaded == 1130
    _assert_strict_fit(parts, cells(config_path))


@pytest.mark.parametrize("extra", ["model_ema.diffusion_modelnot_a_layerweight", "lora_unet_down.alpha", "logvar"])
def test_unknown_keys_are_errors(extra, weights_file):
    path = weights_file("sd15_original_with_ema")
    ldm.convert.load_state_dict(path)[extra] = np.zeros(2, np.float16)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, load_model_config(get_version("1.5").config_path))
    message = str(err.value)
    assert message == f"{path}: unexpected keys, neither Stable Diffusion weights nor known extras: 1 ({extra})"


def test_unknown_keys_under_a_model_prefix_fail_the_strict_load(weights_file, cells, caplog):
    # e.g. an OpenCLIP file that kept the vision tower: converted as is, refused by the strict comparison
    path = weights_file("sd21_original")
    ldm.convert.load_state_dict(path)["cond_stage_model.model.visual.proj"] = np.zeros((2, 2), np.float16)
    config_path = get_version("2.1").config_path
    _, parts, _, _ = _load(path, config_path, caplog)
    assert compare_keys(cells(config_path)["text_encoder"], parts["text_encoder"]) == ([], ["visual.proj"], [])


def test_extract_ema_on_a_diffusers_folder_fails_in_one_line():
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-sd1")
    with pytest.raises(CheckpointError, match="extract_ema is set but a diffusers folder"):
        load_pretrained(folder, use_ema=True)
