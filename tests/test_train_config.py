import glob
import logging
import os
import stat

import pytest
import yaml

from ldm.training.config import ConfigError, TrainConfig, config_from_dict, parse_train_config, save_resolved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["--train_data_dir", "imgs", "--placeholder_token", "<t>"]


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_mindone_yaml_loads_with_its_quirks(tmp_path, caplog):
    # 1e-4 without a dot is a *string* to PyYAML; mindone's YAMLs are written that way.
    path = write_yaml(tmp_path / "mindone.yaml", """
mode: 0
use_parallel: False
train_data_dir: "datasets/cat_toy"
placeholder_token: "<cat-toy>"
initializer_token: "toy"
num_vectors: 3
version: "1.5"
max_steps: 3000
use_ema: False
start_learning_rate: 1e-4
scheduler: "multi_step_decay"
milestones: [200, 400, 800, 1600, 3200]
betas: [0.9, 0.98]
weight_decay: 1e-2
""")
    with caplog.at_level(logging.WARNING, logger="ldm.training.config"):
        cfg = parse_train_config(["--train_config", path])
    assert cfg.start_learning_rate == pytest.approx(1e-4)
    assert cfg.weight_decay == pytest.approx(1e-2)
    assert cfg.milestones == (200, 400, 800, 1600, 3200)
    assert cfg.betas == (0.9, 0.98)
    assert cfg.num_vectors == 3 and cfg.max_steps == 3000 and cfg.mode == 0
    assert cfg.train_config == path
    assert "use_ema" in caplog.text


def test_cli_overrides_yaml_both_flag_forms(tmp_path):
    path = write_yaml(tmp_path / "a.yaml", "train_data_dir: d\nplaceholder_token: <a>\nmax_steps: 100\nseed: 1\n")
    cfg = parse_train_config(["--train_config", path, "--max_steps", "7", "--seed=9", "--placeholder_token=<b>"])
    assert (cfg.max_steps, cfg.seed, cfg.placeholder_token, cfg.train_data_dir) == (7, 9, "<b>", "d")


def test_cli_flag_before_train_config_still_wins(tmp_path):
    path = write_yaml(tmp_path / "a.yaml", "train_data_dir: d\nplaceholder_token: <a>\nmax_steps: 100\n")
    assert parse_train_config(["--max_steps", "5", "--train_config", path]).max_steps == 5


@pytest.mark.parametrize("word,expected", [("true", True), ("False", False), ("1", True), ("0", False)])
def test_bool_words(word, expected):
    assert parse_train_config(REQUIRED + ["--scale_lr", word]).scale_lr is expected


def test_bare_bool_switch_and_none():
    cfg = parse_train_config(REQUIRED + ["--scale_lr", "--max_steps", "none", "--epochs", "3"])
    assert cfg.scale_lr is True and cfg.max_steps is None and cfg.epochs == 3


def test_list_flags():
    cfg = parse_train_config(REQUIRED + ["--betas", "0.8", "0.95", "--milestones=10,20", "--scheduler",
                                         "multi_step_decay"])
    assert cfg.betas == (0.8, 0.95) and cfg.milestones == (10, 20)
    assert parse_train_config(REQUIRED + ["--betas=[0.5, 0.6]"]).betas == (0.5, 0.6)


def test_version_as_unquoted_number_and_latent_cache_bool(tmp_path):
    path = write_yaml(tmp_path / "v.yaml",
                      "train_data_dir: d\nplaceholder_token: <a>\nversion: 2.0\nlatent_cache: false\n")
    cfg = parse_train_config(["--train_config", path])
    assert cfg.version == "2.0" and cfg.latent_cache == "false"


def test_unknown_yaml_key_suggests_ours(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "train_data_dir: d\nlearning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        parse_train_config(["--train_config", path])
    message = str(err.value)
    assert "learning_rate" in message and "'start_learning_rate'" in message and "bad.yaml" in message
    assert "\n" not in message


def test_unknown_cli_flag_suggests_by_similarity():
    with pytest.raises(ConfigError, match=r"--num_vector'.*did you mean 'num_vectors'"):
        parse_train_config(REQUIRED + ["--num_vector", "2"])


def test_wrong_type_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"max_steps expects an integer, got 'many' \(--max_steps\)"):
        parse_train_config(REQUIRED + ["--max_steps", "many"])
    path = write_yaml(tmp_path / "t.yaml", "train_data_dir: d\nplaceholder_token: <a>\nscale_lr: maybe\n")
    with pytest.raises(ConfigError, match=r"scale_lr expects true or false, got 'maybe' \(in .*t\.yaml\)"):
        parse_train_config(["--train_config", path])
    with pytest.raises(ConfigError, match="num_vectors expects an integer, got 2.5"):
        config_from_dict({"num_vectors": 2.5})


def test_yaml_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_train_config(["--train_config", str(tmp_path / "missing.yaml")])
    path = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_train_config(["--train_config", path])
    path = write_yaml(tmp_path / "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_train_config(["--train_config", path])


def test_ignored_mindone_keys_warn_on_cli(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.training.config"):
        cfg = parse_train_config(REQUIRED + ["--enable_modelarts", "False", "--sample_batch_size", "4"])
    assert "enable_modelarts" in caplog.text and "sample_batch_size" in caplog.text
    assert not hasattr(cfg, "enable_modelarts")


@pytest.mark.parametrize("flags,fragment", [
    (["--num_vectors", "0"], "num_vectors has to be >= 1"),
    (["--max_steps", "0"], "max_steps has to be >= 1"),
    (["--learnable_property", "person"], "learnable_property must be one of object, style"),
    (["--scheduler", "poly"], "scheduler must be one of"),
    (["--image_size", "100"], "multiple of 8"),
    (["--latent_cache", "true", "--random_crop", "true"], "latent_cache true needs random_crop false"),
    (["--version", "3.0"], "version must be one of"),
    (["--scheduler", "multi_step_decay", "--milestones", "30,20"], "milestones must be increasing"),
])
def test_validate_rejects(flags, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_train_config(REQUIRED + flags)


def test_validation_metric_and_edit_prompts(tmp_path):
    path = write_yaml(tmp_path / "m.yaml", "train_data_dir: d\nplaceholder_token: <t>\nvalidation_prompt: a <t>\n"
                      "validation_metric: judge\nvalidation_edit_prompts:\n  - \"a {} on a red background\"\n"
                      "  - a {} on a blue background\n")
    cfg = parse_train_config(["--train_config", path])
    assert cfg.validation_metric == "judge"
    assert cfg.edit_prompts() == ["a <t> on a red background", "a <t> on a blue background"]
    # on the command line a prompt's comma is its own; several prompts are several values
    assert parse_train_config(REQUIRED + ["--validation_edit_prompts", "a {}, outlined"]).edit_prompts() == \
        ["a <t>, outlined"]
    assert parse_train_config(REQUIRED + ["--validation_edit_prompts", "a {}", "b {}"]).validation_edit_prompts == \
        ("a {}", "b {}")
    # unset: the default of the learnable property, which names a scene every scorer can check
    assert parse_train_config(REQUIRED).edit_prompts() == ["a <t> on a yellow background"]
    assert parse_train_config(REQUIRED + ["--learnable_property", "style"]).edit_prompts() == \
        ["a yellow circle on a blue background in the style of <t>"]
    assert parse_train_config(REQUIRED).validation_metric == "none"


@pytest.mark.parametrize("flags,fragment", [
    (["--validation_metric", "fid"], "validation_metric must be one of judge, clip, none, got 'fid'"),
    (["--validation_edit_prompts", "a red circle"], r"validation_edit_prompts must be .* each with \{\}"),
    (["--validation_edit_prompts", "[]"], "validation_edit_prompts must be one or more prompts"),
])
def test_validation_metric_mistakes_are_one_line(flags, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        parse_train_config(REQUIRED + flags)
    assert "\n" not in str(err.value)


def test_required_keys_and_parse_without_validation():
    with pytest.raises(ConfigError, match="train_data_dir is required.*placeholder_token is required"):
        parse_train_config([])
    assert parse_train_config([], validate=False).train_data_dir is None


def test_save_resolved_round_trip(tmp_path):
    cfg = parse_train_config(REQUIRED + ["--betas", "0.8,0.9", "--max_steps", "none", "--validation_prompt",
                                         "a photo of <t>"])
    out = tmp_path / "run" / "train_config_resolved.yaml"
    previous = os.umask(0o022)
    try:
        save_resolved(cfg, str(out))
    finally:
        os.umask(previous)
    assert sorted(os.listdir(out.parent)) == ["train_config_resolved.yaml"]  # no temp file left behind
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644  # shareable as the other outputs, not mkstemp's 0600
    raw = yaml.safe_load(out.read_text())
    assert raw["betas"] == [0.8, 0.9] and raw["max_steps"] is None and "train_config" not in raw
    again = parse_train_config(["--train_config", str(out)])
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_load_and_validate():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "train", "train_config_textual_inversion_*.yaml")))
    names = [os.path.basename(p) for p in paths]
    assert names == ["train_config_textual_inversion_style_v1.yaml", "train_config_textual_inversion_tiny.yaml",
                     "train_config_textual_inversion_tiny_style.yaml", "train_config_textual_inversion_v1.yaml",
                     "train_config_textual_inversion_v2.yaml", "train_config_textual_inversion_xl.yaml"]
    cfgs = {n: parse_train_config(["--train_config", p]) for n, p in zip(names, paths)}
    v1 = cfgs["train_config_textual_inversion_v1.yaml"]
    assert (v1.num_vectors, v1.start_learning_rate, v1.max_steps, v1.gradient_accumulation_steps, v1.scale_lr) == \
        (3, 1e-4, 3000, 4, True)
    v2 = cfgs["train_config_textual_inversion_v2.yaml"]
    assert (v2.version, v2.start_learning_rate, v2.max_steps) == ("2.0", 5e-5, 6000)
    style = cfgs["train_config_textual_inversion_style_v1.yaml"]
    assert (style.learnable_property, style.placeholder_token, style.num_vectors) == ("style", "<chinese-art>", 1)
    tiny = cfgs["train_config_textual_inversion_tiny.yaml"]
    assert (tiny.version, tiny.image_size, tiny.random_crop) == ("tiny", 128, False)
    assert tiny.validation_metric == "judge" and tiny.edit_prompts() == ["a <my-shape> on a yellow background"]
    assert tiny.image_filter_size <= tiny.image_size
    xl = cfgs["train_config_textual_inversion_xl.yaml"]   # invoke-training's SDXL recipe
    assert (xl.version, xl.image_size, xl.num_vectors, xl.start_learning_rate, xl.scheduler, xl.warmup_steps,
            xl.max_steps, xl.gradient_accumulation_steps, xl.random_crop, xl.flip_p) == \
        ("xl", 1024, 4, 2e-3, "cosine", 200, 2000, 1, False, 0.0)
    tiny_style = cfgs["train_config_textual_inversion_tiny_style.yaml"]
    assert (tiny_style.version, tiny_style.learnable_property, tiny_style.placeholder_token,
            tiny_style.initializer_token, tiny_style.train_data_dir) == \
        ("tiny", "style", "<my-style>", "drawing", "data/examples/outlined")
    assert tiny_style.validation_metric == "judge"


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as done:
        parse_train_config(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--start_learning_rate" in text and "--latent_cache" in text and "use_ema" in text


def test_defaults_are_valid_once_required_keys_set():
    cfg = TrainConfig(train_data_dir="d", placeholder_token="<t>").validate()
    assert cfg.scheduler == "linear" and cfg.flip_p == 0.5 and cfg.latent_cache == "auto"
